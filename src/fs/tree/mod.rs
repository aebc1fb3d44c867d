//! The tree: what each directory node holds ([`Fs::children`]) and how one name is found in it
//! without listing everything where that is cheaper ([`Fs::find_child`]). One file per area:
//! the namespace (root, namespaces, repository directories), a repository's own directories,
//! an image's directories, and image contents (rootfs/ and layer trees); `times` gives the
//! directories that show an image their time, worked out before their attributes are given.

mod contents;
mod control;
mod image;
mod namespace;
mod repository;
mod times;

use super::node::Node;
use super::Fs;
use crate::error::{FsError, FsResult};

pub(crate) use contents::tree_attr;
pub(crate) use control::{Control, CONTROL_DIR};
pub use repository::TAG_CONCURRENCY;

impl Fs {
    /// The children of a directory node, as (name, node).
    pub(super) async fn children(&self, node: &Node) -> FsResult<Vec<(String, Node)>> {
        match node {
            Node::Root | Node::Dir { .. } | Node::NsEscape { .. } => {
                self.namespace_children(node).await
            }
            Node::Tags { repo } => self.tags_children(repo).await,
            Node::PendingTag { repo, tag } => {
                // Once its manifest is pushed, a pending tag shows the image.
                match self.tag_node(repo, tag).await {
                    Ok(Node::Image { digest, .. }) => self.image_children(repo, &digest).await,
                    _ => Ok(Vec::new()),
                }
            }
            Node::Image { repo, digest, .. } => self.image_children(repo, digest).await,
            Node::Layers { repo, digest } => self.layers_children(repo, digest).await,
            Node::Blobs { repo } => Ok(vec![(
                "sha256".into(),
                Node::BlobsAlgo { repo: repo.clone() },
            )]),
            Node::BlobsAlgo { repo } => Ok(self
                .meta
                .seen_blobs(repo)
                .into_iter()
                .map(|(hex, f)| (hex, Node::File(f)))
                .collect()),
            Node::Uploads { repo } => Ok(self
                .staging
                .uploads(repo)
                .into_iter()
                .map(|k| (k.name.clone(), Node::Staged(k)))
                .collect()),
            Node::TreeDir(d) => self.tree_children(d).await,
            Node::Control => Ok(control::children()),
            Node::File(_)
            | Node::IndexJson { .. }
            | Node::Staged(_)
            | Node::TreeEntry(_)
            | Node::ControlFile(_) => Err(FsError::not_dir("not a directory")),
        }
    }

    /// Find one child by name without listing the whole directory where that is cheaper. A
    /// directory that shows an image comes with its time settled (see `times`).
    pub(super) async fn find_child(&self, node: &Node, name: &str) -> FsResult<Option<Node>> {
        let found = self.find_node(node, name).await?;
        if let Some(n) = &found {
            self.settle_time(n).await;
        }
        Ok(found)
    }

    async fn find_node(&self, node: &Node, name: &str) -> FsResult<Option<Node>> {
        match node {
            Node::Root | Node::NsEscape { .. } | Node::Dir { .. } => {
                self.find_in_namespace(node, name).await
            }
            Node::Tags { repo } => self.find_tag(repo, name).await,
            Node::Uploads { repo } => Ok(self.find_upload(repo, name)),
            Node::BlobsAlgo { repo } => self.find_blob(repo, name).await,
            // One map lookup in the layer index or merged tree, never the whole listing.
            Node::TreeDir(d) => self.find_in_tree(d, name).await,
            _ => Ok(self
                .children(node)
                .await?
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, n)| n)),
        }
    }

    /// A node as it is served: `IndexJson` becomes its `File`; everything else is itself.
    pub(super) async fn materialize(&self, node: Node) -> FsResult<Node> {
        match node {
            Node::IndexJson { repo } => self.index_json(repo).await,
            n => Ok(n),
        }
    }
}
