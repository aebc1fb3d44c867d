//! Pushing a manifest under a tag, and with it promotion: every blob and child manifest the
//! manifest needs is brought into the repository first, by cross-repository mount from a
//! repository that holds it (so copying `manifest.json` between repositories moves no layer
//! bytes). The result reaches the metadata cache as an event, and the kernel forgets the tag's
//! old entry.

use bytes::Bytes;

use super::meta::{pushed_manifest, Event};
use super::node::Node;
use super::Fs;
use crate::digest::digest_hex;
use crate::error::{FsError, FsResult, RegistryError};
use crate::manifest::{self, Parsed};

/// How deep an index of indexes is followed when its children are copied.
const MAX_INDEX_DEPTH: usize = 4;
/// How many repositories are asked to lend a missing blob by cross-repository mount.
const MAX_MOUNT_SOURCES: usize = 20;

impl Fs {
    /// Push a manifest under a tag: bring its blobs (and an index's children) into the
    /// repository first, by cross-repository mount where another repository has them.
    pub async fn push_manifest(&self, repo: &str, tag: &str, body: Bytes) -> FsResult<String> {
        let ct = crate::push::manifest_content_type(&body)?;
        let parsed = manifest::parse(&ct, &body).map_err(FsError::from)?;
        self.ensure_references(repo, &parsed, 0).await?;
        let digest = self
            .reg
            .put_manifest(repo, tag, &ct, body.clone())
            .await
            .map_err(|e| FsError::io(format!("the registry refused manifest {repo}:{tag}: {e}")))?;
        self.meta.apply(Event::ManifestPushed {
            repo: repo.to_string(),
            tag: tag.to_string(),
            entry: pushed_manifest(digest.clone(), ct, body, parsed),
        });
        self.staging.remove_pending_tag(repo, tag);
        self.invalidate_tag(repo, tag);
        log::info!("pushed manifest {repo}:{tag} ({digest})");
        Ok(digest)
    }

    /// Tell the kernel to forget `tags/<tag>` of `repo`, so the new manifest shows at once.
    fn invalidate_tag(&self, repo: &str, tag: &str) {
        let Some(inval) = self.invalidator.get() else {
            return;
        };
        if let Some(ino) = self
            .inodes
            .find(|n| matches!(n, Node::Tags { repo: r } if r == repo))
        {
            inval(ino, tag.to_string());
        }
    }

    /// Make every blob and child manifest `parsed` refers to present in `repo`.
    async fn ensure_references(&self, repo: &str, parsed: &Parsed, depth: usize) -> FsResult<()> {
        match parsed {
            Parsed::Image { config, layers } => {
                self.ensure_blob(repo, &config.digest, "config").await?;
                for (i, l) in layers.iter().enumerate() {
                    self.ensure_blob(repo, &l.digest, &format!("layer {i}"))
                        .await?;
                }
            }
            Parsed::Index { manifests } => {
                if depth >= MAX_INDEX_DEPTH {
                    return Err(FsError::io("index nesting is too deep"));
                }
                for m in manifests {
                    Box::pin(self.ensure_child_manifest(repo, &m.digest, depth)).await?;
                }
            }
        }
        Ok(())
    }

    /// Repositories that may hold `digest`, best first: those where regfs has seen it, then the
    /// catalog.
    async fn sources_for(&self, repo: &str, digest: &str) -> Vec<String> {
        let mut out = self.meta.repos_holding(repo, digest_hex(digest));
        if out.is_empty() {
            if let Ok(Some(cat)) = self.meta.catalog().await {
                out.extend(cat.iter().filter(|r| r.as_str() != repo).cloned());
            }
        }
        out.truncate(MAX_MOUNT_SOURCES);
        out
    }

    async fn ensure_blob(&self, repo: &str, digest: &str, what: &str) -> FsResult<()> {
        match self.reg.blob_size(repo, digest).await {
            Ok(_) => return Ok(()),
            Err(RegistryError::NotFound(_)) => {}
            Err(e) => {
                return Err(FsError::io(format!(
                    "checking {what} {digest} in {repo}: {e}"
                )))
            }
        }
        for from in self.sources_for(repo, digest).await {
            match self.reg.mount_blob(repo, digest, &from).await {
                Ok(true) => {
                    log::info!("mounted {what} {digest} from {from} into {repo}");
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => log::debug!("mount of {digest} from {from} failed: {e}"),
            }
        }
        Err(FsError::io(format!(
            "{what} {digest} is missing from {repo} and no repository regfs knows holds it \
             (push it first, e.g. cp FILE {repo}/blobs/sha256/{})",
            digest_hex(digest)
        )))
    }

    async fn ensure_child_manifest(&self, repo: &str, digest: &str, depth: usize) -> FsResult<()> {
        match self.reg.manifest_head(repo, digest).await {
            Ok(_) => return Ok(()),
            Err(RegistryError::NotFound(_)) => {}
            Err(e) => {
                return Err(FsError::io(format!(
                    "checking manifest {digest} in {repo}: {e}"
                )))
            }
        }
        for from in self.sources_for(repo, digest).await {
            let Ok(m) = self.reg.manifest(&from, digest).await else {
                continue;
            };
            let parsed = manifest::parse(&m.media_type, &m.body).map_err(FsError::from)?;
            self.ensure_references(repo, &parsed, depth + 1).await?;
            self.reg
                .put_manifest(repo, digest, &m.media_type, m.body.clone())
                .await
                .map_err(|e| {
                    FsError::io(format!("copying child manifest {digest} into {repo}: {e}"))
                })?;
            log::info!("copied child manifest {digest} from {from} into {repo}");
            return Ok(());
        }
        Err(FsError::io(format!(
            "child manifest {digest} is missing from {repo} and no repository regfs knows holds it"
        )))
    }
}
