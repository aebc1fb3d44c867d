//! A repository's own directories: `tags/`, `blobs/sha256/`, `uploads/`, and `index.json`.
//!
//! Listing `tags/` (and making `index.json`) resolves the tags concurrently, at most
//! [`TAG_CONCURRENCY`] at once, in tag order; a listing also settles each tag's time, which
//! fetches its manifest and config, so the `ls -l tags/` or `ls tags/*/` that follows asks the
//! registry for nothing more.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};

use crate::digest::Digest;
use crate::error::{FsError, FsResult, RegistryError};
use crate::fs::node::{Area, Content, FileNode, Node, StagedKey};
use crate::fs::walk::{WalkId, WALK_TAGS};
use crate::fs::Fs;
use crate::manifest;
use crate::registry::is_valid_tag;

/// Tags resolved at once when a listing needs them all. Over a WAN each resolution is a round
/// trip, so a listing costs about one RTT per this many tags instead of one per tag. 8 keeps
/// within the HTTP client's 16 idle connections per host (so connections are reused, not
/// opened per request), is polite to shared registries, and bounds what a listing holds in
/// flight against a hostile registry: 8 manifest bodies of at most 4 MiB, then 8 configs read
/// for their time under the same cap.
pub const TAG_CONCURRENCY: usize = 8;

/// `f` for every tag, at most `at_once` at a time; the results in tag order.
async fn each_tag<'a, T, Fut>(
    tags: &'a [String],
    at_once: usize,
    f: impl Fn(&'a str) -> Fut,
) -> Vec<T>
where
    Fut: Future<Output = T> + 'a,
{
    // Futures are made only as slots free up (a tag list may hold 100,000s of names), and
    // driven here rather than through a `map`ped stream, whose closure over borrowed tags would
    // not be provably Send for every lifetime.
    let mut running = FuturesOrdered::new();
    let mut next = tags.iter();
    let mut out = Vec::with_capacity(tags.len());
    loop {
        while running.len() < at_once.max(1) {
            match next.next() {
                Some(t) => running.push_back(f(t.as_str())),
                None => break,
            }
        }
        match running.next().await {
            Some(r) => out.push(r),
            None => return out,
        }
    }
}

/// A repository queued to be listed ahead, with the core its task holds: released when
/// dropped, however the task ends (even unpolled, at shutdown).
struct Queued(Arc<Fs>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.walk.release();
    }
}

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
        self.walk_on(repo);
        let tags = self.tags_of(repo).await?;
        let nodes = each_tag(&tags, TAG_CONCURRENCY, |t| async move {
            let node = self.tag_node(repo, t).await.ok()?;
            self.settle_time(&node).await;
            Some((t.to_string(), node))
        })
        .await;
        let mut out: Vec<(String, Node)> = nodes.into_iter().flatten().collect();
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

    /// A listing of `repo`'s `tags/`: if it continues a walk, queue the repositories the walk
    /// reaches next to be listed in the background (`fs::walk`).
    fn walk_on(&self, repo: &str) {
        if !self.walk.on() {
            return;
        }
        let Some(catalog) = self.meta.fresh_catalog() else {
            return;
        };
        let siblings = self.walk.siblings(catalog);
        let Some((ns, pos, len)) = siblings.place(repo) else {
            return;
        };
        let ahead = self.walk.reached(ns, pos, len);
        for p in ahead.positions {
            let Some(next) = siblings.name(ns, p).map(str::to_string) else {
                return;
            };
            if self.meta.has_tag_list(&next) {
                continue; // listed within the TTL: the walk will find it ready
            }
            let Some(fs) = self.me.upgrade() else {
                return;
            };
            let id = (ns.to_string(), ahead.epoch);
            if !self.walk.queue() {
                self.walk.retreat(&id, p);
                return;
            }
            let queued = Queued(fs);
            tokio::spawn(async move {
                let fs = &queued.0;
                if let Some(_turn) = fs.walk.turn(&id).await {
                    fs.list_ahead(&next, &id).await;
                }
            });
        }
    }

    /// What a listing of `repo`'s `tags/` fetches, fetched ahead of it, for at most
    /// [`WALK_TAGS`] tags in one page of `tags/list` (nothing for tags made by mkdir: they are
    /// local). A failure leaves nothing behind.
    async fn list_ahead(&self, repo: &str, walk: &WalkId) {
        let tags = match self.meta.few_tags(repo).await {
            Ok(Some(t)) if t.len() <= WALK_TAGS => t,
            Ok(_) => return,
            Err(e) => {
                log::debug!("walk-ahead: {e}");
                return;
            }
        };
        each_tag(&tags, TAG_CONCURRENCY, |t| async move {
            let Some(_resolving) = self.walk.resolution(walk).await else {
                return; // the walk has ended
            };
            match self.tag_node(repo, t).await {
                Ok(node) => self.settle_time(&node).await,
                Err(e) => log::debug!("walk-ahead: {e}"),
            }
        })
        .await;
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
        let heads = each_tag(&tags, TAG_CONCURRENCY, |t| self.meta.resolve_tag(&repo, t)).await;
        let mut manifests = Vec::new();
        for (t, head) in tags.iter().zip(heads) {
            match head {
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
