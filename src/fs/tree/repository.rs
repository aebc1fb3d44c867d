//! A repository's own directories: `tags/`, `blobs/sha256/`, `uploads/`, and `index.json`.

use std::sync::Arc;

use bytes::Bytes;

use crate::digest::Digest;
use crate::error::{FsError, FsResult, RegistryError};
use crate::fs::node::{Area, Content, FileNode, Node, StagedKey};
use crate::fs::Fs;
use crate::manifest;
use crate::registry::is_valid_tag;

impl Fs {
    /// `tags/<tag>/` as the tag points now.
    pub(in crate::fs) async fn tag_node(&self, repo: &str, tag: &str) -> FsResult<Node> {
        let head = self.meta.resolve_tag(repo, tag).await?;
        Ok(Node::Image {
            repo: repo.to_string(),
            tag: Some(tag.to_string()),
            digest: Digest::from(head.digest),
        })
    }

    /// The tags of a repository; none for one made here that the registry does not know yet.
    async fn tags_of(&self, repo: &str) -> FsResult<Arc<Vec<String>>> {
        match self.meta.tag_list(repo).await {
            Ok(t) => Ok(t),
            Err(e) if e.is_not_found() && self.meta.knows_repo(repo) => Ok(Arc::new(vec![])),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn tags_children(&self, repo: &str) -> FsResult<Vec<(String, Node)>> {
        let tags = self.tags_of(repo).await?;
        let mut out = Vec::new();
        for t in tags.iter() {
            if let Ok(n) = self.tag_node(repo, t).await {
                out.push((t.clone(), n));
            }
        }
        for t in self.staging.pending_tags(repo, &tags) {
            out.push((
                t.clone(),
                Node::PendingTag {
                    repo: repo.to_string(),
                    tag: t,
                },
            ));
        }
        Ok(out)
    }

    pub(super) async fn find_tag(&self, repo: &str, name: &str) -> FsResult<Option<Node>> {
        if !is_valid_tag(name) {
            return Ok(None);
        }
        match self.tag_node(repo, name).await {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.is_not_found() => {
                Ok(self
                    .staging
                    .has_pending_tag(repo, name)
                    .then(|| Node::PendingTag {
                        repo: repo.to_string(),
                        tag: name.to_string(),
                    }))
            }
            Err(e) => Err(e),
        }
    }

    pub(super) fn find_upload(&self, repo: &str, name: &str) -> Option<Node> {
        let key = StagedKey {
            repo: repo.to_string(),
            area: Area::Uploads,
            name: name.to_string(),
        };
        self.staging.contains(&key).then_some(Node::Staged(key))
    }

    /// `blobs/sha256/<hex>`: being written, seen, or asked of the registry (a blob, else a
    /// manifest).
    pub(super) async fn find_blob(&self, repo: &str, name: &str) -> FsResult<Option<Node>> {
        let Some(digest) = Digest::sha256_of_hex(name) else {
            return Ok(None);
        };
        let key = StagedKey {
            repo: repo.to_string(),
            area: Area::Blobs,
            name: name.to_string(),
        };
        if self.staging.is_writing(&key) {
            return Ok(Some(Node::Staged(key)));
        }
        if let Some(f) = self.meta.seen_blob(repo, name) {
            return Ok(Some(Node::File(f)));
        }
        let ctx = || format!("{repo}@{digest}");
        let file = match self.reg.blob_size(repo, &digest).await {
            Ok(size) => FileNode {
                repo: repo.to_string(),
                content: Content::Blob { digest },
                size,
                media_type: None,
            },
            Err(RegistryError::NotFound(_)) => match self.reg.manifest_head(repo, &digest).await {
                Ok(h) => FileNode {
                    repo: repo.to_string(),
                    content: Content::Manifest { digest },
                    size: h.size,
                    media_type: Some(h.media_type),
                },
                Err(RegistryError::NotFound(_)) => return Ok(None),
                Err(e) => return Err(FsError::registry(e, ctx())),
            },
            Err(e) => return Err(FsError::registry(e, ctx())),
        };
        self.meta.remember_blob(repo, file.clone());
        Ok(Some(Node::File(file)))
    }

    /// `index.json` of a repository: every tag as a descriptor with its ref name.
    pub(super) async fn index_json(&self, repo: String) -> FsResult<Node> {
        let tags = self.tags_of(&repo).await?;
        let mut manifests = Vec::new();
        for t in tags.iter() {
            match self.meta.resolve_tag(&repo, t).await {
                Ok(h) => manifests.push(serde_json::json!({
                    "mediaType": h.media_type,
                    "digest": h.digest,
                    "size": h.size,
                    "annotations": {"org.opencontainers.image.ref.name": t},
                })),
                // A tag deleted between the listing and the HEAD is simply left out.
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        let doc = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_INDEX,
            "manifests": manifests,
        });
        let body = Bytes::from(serde_json::to_vec_pretty(&doc).unwrap_or_default());
        Ok(Node::File(FileNode {
            repo,
            size: body.len() as u64,
            content: Content::Inline(body),
            media_type: Some(manifest::OCI_INDEX.into()),
        }))
    }
}
