//! Extended attributes: `user.oci.digest` and `user.oci.mediatype` on files with a digest and
//! on tag directories, the PAX xattrs of image contents, and `user.regfs.stats` on the root.

use bytes::Bytes;

use super::node::{Node, StagedKey};
use super::types::Ino;
use super::Fs;
use crate::error::{FsError, FsResult};

impl Fs {
    fn staged_digest(&self, k: &StagedKey) -> Option<String> {
        self.staging
            .info(k)
            .and_then(|i| i.digest)
            .map(|d| d.to_string())
    }

    /// Extended attribute names of a node.
    pub async fn listxattr(&self, ino: Ino) -> FsResult<Vec<String>> {
        let node = self.inodes.node(ino)?;
        Ok(match &*node {
            Node::Root => vec!["user.regfs.stats".into()],
            Node::Image { .. } => vec!["user.oci.digest".into()],
            Node::TreeEntry(t) => t
                .entry
                .xattrs
                .iter()
                .filter(|(k, _)| k.starts_with("user."))
                .map(|(k, _)| k.clone())
                .collect(),
            Node::Staged(k) => match self.staged_digest(k) {
                Some(_) => vec!["user.oci.digest".into()],
                None => vec![],
            },
            Node::File(f) if f.digest().is_some() => {
                let mut v = vec!["user.oci.digest".to_string()];
                if f.media_type.is_some() {
                    v.push("user.oci.mediatype".into());
                }
                v
            }
            _ => vec![],
        })
    }

    pub async fn getxattr(&self, ino: Ino, name: &str) -> FsResult<Bytes> {
        let node = self.inodes.node(ino)?;
        let v = match (&*node, name) {
            (Node::Root, "user.regfs.stats") => self.stats_json(),
            (Node::Image { digest, .. }, "user.oci.digest") => digest.to_string(),
            (Node::TreeEntry(t), n) if n.starts_with("user.") => {
                return t
                    .entry
                    .xattrs
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| Bytes::from(v.clone()))
                    .ok_or_else(FsError::no_attr)
            }
            (Node::PendingTag { repo, tag }, "user.oci.digest") => {
                match self.meta.resolve_tag(repo, tag).await {
                    Ok(h) => h.digest,
                    Err(_) => return Err(FsError::no_attr()),
                }
            }
            (Node::Staged(k), "user.oci.digest") => {
                self.staged_digest(k).ok_or_else(FsError::no_attr)?
            }
            (Node::File(f), "user.oci.digest") => {
                f.digest().ok_or_else(FsError::no_attr)?.to_string()
            }
            (Node::File(f), "user.oci.mediatype") if f.digest().is_some() => {
                f.media_type.clone().ok_or_else(FsError::no_attr)?
            }
            _ => return Err(FsError::no_attr()),
        };
        Ok(Bytes::from(v))
    }

    /// The request and cache counters, as the `user.regfs.stats` JSON.
    fn stats_json(&self) -> String {
        let mut v = serde_json::to_value(self.reg.stats().snapshot()).unwrap_or_default();
        let cache = self.blobs.cache();
        v["cache_bytes"] = cache.used_bytes().into();
        v["cache_chunks"] = cache.len().into();
        if let Some(disk) = self.blobs.disk() {
            let s = serde_json::to_value(disk.stats()).unwrap_or_default();
            for (k, val) in s.as_object().into_iter().flatten() {
                v[format!("disk_{k}")] = val.clone();
            }
        }
        v.to_string()
    }
}
