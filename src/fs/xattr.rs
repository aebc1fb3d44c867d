//! Extended attributes: `user.oci.digest` and `user.oci.mediatype` on files with a digest and
//! on tag directories, `user.regfs.cached` (bytes held in the chunk cache) on blob files, the PAX
//! xattrs of image contents, and `user.regfs.stats` on the root.

use bytes::Bytes;

use super::node::{Content, FileNode, Node, StagedKey};
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
            Node::Staged(k) => match self.staged_file(k) {
                Ok(f) if self.cached_bytes(&f).is_some() => {
                    vec!["user.oci.digest".into(), "user.regfs.cached".into()]
                }
                Ok(_) => vec!["user.oci.digest".into()],
                Err(_) => vec![],
            },
            Node::File(f) if f.digest().is_some() => {
                let mut v = vec!["user.oci.digest".to_string()];
                if f.media_type.is_some() {
                    v.push("user.oci.mediatype".into());
                }
                if matches!(f.content, Content::Blob { .. }) {
                    v.push("user.regfs.cached".into());
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
            (Node::Staged(k), "user.regfs.cached") => {
                let f = self.staged_file(k).map_err(|_| FsError::no_attr())?;
                self.cached_bytes(&f)
                    .ok_or_else(FsError::no_attr)?
                    .to_string()
            }
            (Node::File(f), "user.regfs.cached") => self
                .cached_bytes(f)
                .ok_or_else(FsError::no_attr)?
                .to_string(),
            _ => return Err(FsError::no_attr()),
        };
        Ok(Bytes::from(v))
    }

    /// Bytes of a blob file held in the chunk cache (its blob chunks, for its size); None for
    /// files that are not blobs.
    fn cached_bytes(&self, f: &FileNode) -> Option<u64> {
        match &f.content {
            Content::Blob { digest } => {
                Some(self.blobs.cache().blob_bytes(digest.as_str(), f.size))
            }
            _ => None,
        }
    }

    /// The request and cache counters, as the `user.regfs.stats` JSON (over mirrors: the sum
    /// over every source).
    fn stats_json(&self) -> String {
        let mut v = serde_json::to_value(self.reg.snapshot()).unwrap_or_default();
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
