//! The namespace: the root, namespace directories, repository directories (a path can be both),
//! and `_ns/`, which reaches nested repositories whose names are reserved.

use bytes::Bytes;

use crate::error::FsResult;
use crate::fs::node::{Content, FileNode, Node};
use crate::fs::tree::CONTROL_DIR;
use crate::fs::{Fs, NS_ESCAPE, RESERVED};
use crate::registry::is_valid_component;

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}/{name}")
    }
}

impl Fs {
    pub(super) async fn namespace_children(&self, node: &Node) -> FsResult<Vec<(String, Node)>> {
        let (path, escape) = match node {
            Node::Root => ("", true),
            Node::Dir { path } => (path.as_str(), false),
            Node::NsEscape { path } => (path.as_str(), true),
            _ => return Ok(Vec::new()),
        };
        let nested = self.meta.nested_names(path).await?;
        let dir = |c: &String| {
            (
                c.clone(),
                Node::Dir {
                    path: join(path, c),
                },
            )
        };
        if escape || !self.meta.is_repo(path).await? {
            let mut out: Vec<_> = nested.iter().map(dir).collect();
            if matches!(node, Node::Root) {
                // The control directory: a dot name, which no repository can have.
                out.insert(0, (CONTROL_DIR.into(), Node::Control));
            }
            return Ok(out);
        }
        let mut out = repo_children(path);
        if nested.iter().any(|c| RESERVED.contains(&c.as_str())) {
            out.push((NS_ESCAPE.into(), Node::NsEscape { path: path.into() }));
        }
        out.extend(
            nested
                .iter()
                .filter(|c| !RESERVED.contains(&c.as_str()))
                .map(dir),
        );
        Ok(out)
    }

    pub(super) async fn find_in_namespace(
        &self,
        node: &Node,
        name: &str,
    ) -> FsResult<Option<Node>> {
        let path = match node {
            Node::Root if name == CONTROL_DIR => return Ok(Some(Node::Control)),
            Node::Root => "",
            Node::Dir { path } | Node::NsEscape { path } => path.as_str(),
            _ => return Ok(None),
        };
        if let Node::Dir { path } = node {
            if self.meta.is_repo(path).await? {
                if let Some((_, n)) = repo_children(path).into_iter().find(|(n, _)| n == name) {
                    return Ok(Some(self.materialize(n).await?));
                }
                if name == NS_ESCAPE {
                    return Ok(Some(Node::NsEscape { path: path.clone() }));
                }
            }
        }
        if !is_valid_component(name) {
            return Ok(None);
        }
        let candidate = join(path, name);
        let catalog = self.meta.catalog().await?;
        let known = self.meta.repo_names().await?;
        let under = format!("{candidate}/");
        if known
            .iter()
            .any(|r| r == &candidate || r.starts_with(&under))
            || self.meta.is_repo(&candidate).await?
            // Without a catalog a namespace cannot be told from nothing: let the user walk it.
            || catalog.is_none()
        {
            return Ok(Some(Node::Dir { path: candidate }));
        }
        Ok(None)
    }
}

/// The fixed children of a repository directory (index.json is made on lookup).
fn repo_children(repo: &str) -> Vec<(String, Node)> {
    let r = || repo.to_string();
    vec![
        ("index.json".into(), Node::IndexJson { repo: r() }),
        ("tags".into(), Node::Tags { repo: r() }),
        ("blobs".into(), Node::Blobs { repo: r() }),
        ("uploads".into(), Node::Uploads { repo: r() }),
        (
            "oci-layout".into(),
            Node::File(FileNode {
                repo: r(),
                content: Content::Inline(Bytes::from_static(OCI_LAYOUT)),
                size: OCI_LAYOUT.len() as u64,
                media_type: None,
            }),
        ),
    ]
}
