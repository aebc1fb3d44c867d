//! Mirrors, the way fleets scale: [`MirrorRegistry`] is a [`Registry`] over an ordered list of
//! pull-through registries (`--mirror URL`, repeatable) in front of the registry itself.
//!
//! - Blobs (HEAD and Range GETs) and manifests by digest go to the first mirror that answers;
//!   a mirror that fails is passed over for the next, and the registry itself comes last.
//! - Tags (the tag list, a manifest or HEAD by tag) resolve at the registry, so a mirror's stale
//!   copy of a moved tag is never seen, unless `--mirror-tags` sends them to mirrors too.
//! - The catalog and every write (uploads, manifest PUTs, mounts, deletes) go to the registry only:
//!   a pull-through cache neither lists what it has not cached nor accepts pushes.
//!
//! A mirror that failed in a way that will repeat (connection refused, timeout, 5xx, 401/403, bad
//! content) is skipped for [`MIRROR_COOLDOWN`], so a dead or black-holed mirror costs one failed
//! request per cooldown, not one per read. A 404 only passes that one request on: a mirror may
//! proxy another upstream, or not have what is asked.
//!
//! Each mirror is its own [`crate::registry::http::HttpRegistry`]: its own origin, its own
//! credentials (looked up by the mirror's host), so no credential ever goes to another host.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use super::{
    ManifestBlob, ManifestHead, RateLimit, Registry, RequestStats, StatsSnapshot, UploadSession,
};
use crate::digest::is_sha256_digest;
use crate::error::{RegistryError, RegistryResult};

/// How long a failed mirror is passed over. 30 s: a restarting cache is back within it, and a
/// dead one costs one failed request (at most one connect timeout) per 30 s instead of one per
/// read; the registry serves meanwhile.
pub const MIRROR_COOLDOWN: Duration = Duration::from_secs(30);

/// One mirror and what it did.
pub struct Mirror {
    name: String,
    reg: Arc<dyn Registry>,
    down_until: Mutex<Option<Instant>>,
    answered: AtomicU64,
    failures: AtomicU64,
    skipped: AtomicU64,
}

impl Mirror {
    /// `name` is how logs and stats show it (its URL; never credentials).
    pub fn new(name: impl Into<String>, reg: Arc<dyn Registry>) -> Self {
        Mirror {
            name: name.into(),
            reg,
            down_until: Mutex::new(None),
            answered: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    fn is_down(&self, now: Instant) -> bool {
        crate::sync::lock(&self.down_until).is_some_and(|t| now < t)
    }
}

/// What `.regfs/stats` shows of one source (a mirror, or the registry itself).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SourceStats {
    /// The mirror's URL, or `registry`.
    pub name: String,
    /// Requests sent to this source (its own counters).
    pub requests: StatsSnapshot,
    /// Operations this mirror answered, failed, and was passed over for while down.
    pub answered: u64,
    pub failures: u64,
    pub skipped: u64,
    /// Passed over right now (failed within the cooldown).
    pub down: bool,
    pub rate_limit: Option<RateLimit>,
}

/// A registry with pull-through mirrors in front of it (see the module doc).
pub struct MirrorRegistry {
    upstream: Arc<dyn Registry>,
    mirrors: Vec<Mirror>,
    mirror_tags: bool,
    cooldown: Duration,
}

/// Does this failure say the mirror will fail the next request too?
fn mirror_broken(e: &RegistryError) -> bool {
    !matches!(e, RegistryError::NotFound(_) | RegistryError::Invalid(_))
}

impl MirrorRegistry {
    pub fn new(upstream: Arc<dyn Registry>, mirrors: Vec<Mirror>, mirror_tags: bool) -> Self {
        let names: Vec<&str> = mirrors.iter().map(|m| m.name.as_str()).collect();
        log::info!(
            "mirrors, tried in order for content by digest{}: {}",
            if mirror_tags { " and for tags" } else { "" },
            names.join(", ")
        );
        MirrorRegistry {
            upstream,
            mirrors,
            mirror_tags,
            cooldown: MIRROR_COOLDOWN,
        }
    }

    /// Set how long a failed mirror is passed over (tests use zero or hours).
    pub fn with_cooldown(mut self, d: Duration) -> Self {
        self.cooldown = d;
        self
    }

    /// Run `op` on the first mirror that answers, else on the registry. `by_mirror` false: the
    /// registry only.
    async fn first<T, F, Fut>(&self, what: &str, by_mirror: bool, op: F) -> RegistryResult<T>
    where
        F: Fn(Arc<dyn Registry>) -> Fut,
        Fut: Future<Output = RegistryResult<T>>,
    {
        if by_mirror {
            for m in &self.mirrors {
                if m.is_down(Instant::now()) {
                    m.skipped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match op(m.reg.clone()).await {
                    Ok(v) => {
                        m.answered.fetch_add(1, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Err(e) => self.failed(m, &e, what),
                }
            }
        }
        op(self.upstream.clone()).await
    }

    /// Note that mirror `m` failed `what` with `e`, and pass it over for a while if that will
    /// repeat.
    fn failed(&self, m: &Mirror, e: &RegistryError, what: &str) {
        m.failures.fetch_add(1, Ordering::Relaxed);
        if mirror_broken(e) {
            *crate::sync::lock(&m.down_until) = Instant::now().checked_add(self.cooldown);
            log::warn!(
                "{what}: mirror {} failed ({e}); passing it over for {} s, trying the next source",
                m.name,
                self.cooldown.as_secs()
            );
        } else {
            log::debug!("{what}: mirror {}: {e}; trying the next source", m.name);
        }
    }

    /// Does a manifest reference go to mirrors? Digests always; tags with `--mirror-tags`.
    fn mirrored(&self, reference: &str) -> bool {
        self.mirror_tags || is_sha256_digest(reference)
    }
}

#[async_trait]
impl Registry for MirrorRegistry {
    async fn catalog(&self) -> RegistryResult<Vec<String>> {
        self.upstream.catalog().await
    }

    async fn tags(&self, repo: &str) -> RegistryResult<Vec<String>> {
        let what = format!("tags of {repo}");
        self.first(
            &what,
            self.mirror_tags,
            |r| async move { r.tags(repo).await },
        )
        .await
    }

    async fn tags_if_few(&self, repo: &str) -> RegistryResult<Option<Vec<String>>> {
        let what = format!("tags of {repo}");
        self.first(&what, self.mirror_tags, |r| async move {
            r.tags_if_few(repo).await
        })
        .await
    }

    async fn manifest(&self, repo: &str, reference: &str) -> RegistryResult<ManifestBlob> {
        let what = format!("GET {repo}:{reference}");
        self.first(&what, self.mirrored(reference), |r| async move {
            r.manifest(repo, reference).await
        })
        .await
    }

    async fn manifest_head(&self, repo: &str, reference: &str) -> RegistryResult<ManifestHead> {
        let what = format!("HEAD {repo}:{reference}");
        self.first(&what, self.mirrored(reference), |r| async move {
            r.manifest_head(repo, reference).await
        })
        .await
    }

    async fn blob_size(&self, repo: &str, digest: &str) -> RegistryResult<u64> {
        let what = format!("HEAD {repo}@{digest}");
        self.first(
            &what,
            true,
            |r| async move { r.blob_size(repo, digest).await },
        )
        .await
    }

    async fn blob_range(
        &self,
        repo: &str,
        digest: &str,
        start: u64,
        end: u64,
    ) -> RegistryResult<Bytes> {
        let what = format!("GET {repo}@{digest} bytes {start}-{end}");
        self.first(&what, true, |r| async move {
            r.blob_range(repo, digest, start, end).await
        })
        .await
    }

    async fn blob_range_into(
        &self,
        repo: &str,
        digest: &str,
        start: u64,
        end: u64,
        sink: &mut super::Sink<'_>,
    ) -> RegistryResult<()> {
        // Streamed from the first source that answers; when a mirror fails mid-body, the next
        // source goes on from the byte where it stopped (what arrived was handed on already).
        let what = format!("GET {repo}@{digest} bytes {start}-{end}");
        let mut got = 0u64;
        for m in &self.mirrors {
            if m.is_down(Instant::now()) {
                m.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let from = start + got;
            if from > end {
                return Ok(()); // all of it arrived before the failure
            }
            let mut counting = |piece: Bytes| {
                got += piece.len() as u64;
                sink(piece)
            };
            match m
                .reg
                .blob_range_into(repo, digest, from, end, &mut counting)
                .await
            {
                Ok(()) => {
                    m.answered.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => self.failed(m, &e, &what),
            }
        }
        if start + got > end {
            return Ok(());
        }
        self.upstream
            .blob_range_into(repo, digest, start + got, end, sink)
            .await
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> RegistryResult<String> {
        self.upstream
            .put_manifest(repo, reference, media_type, body)
            .await
    }

    async fn upload_start(&self, repo: &str) -> RegistryResult<UploadSession> {
        self.upstream.upload_start(repo).await
    }

    async fn upload_patch(
        &self,
        repo: &str,
        session: &mut UploadSession,
        data: Bytes,
    ) -> RegistryResult<()> {
        self.upstream.upload_patch(repo, session, data).await
    }

    async fn upload_finish(
        &self,
        repo: &str,
        session: UploadSession,
        digest: &str,
        last: Bytes,
    ) -> RegistryResult<()> {
        self.upstream
            .upload_finish(repo, session, digest, last)
            .await
    }

    async fn upload_cancel(&self, repo: &str, session: UploadSession) {
        self.upstream.upload_cancel(repo, session).await
    }

    async fn mount_blob(&self, repo: &str, digest: &str, from: &str) -> RegistryResult<bool> {
        self.upstream.mount_blob(repo, digest, from).await
    }

    async fn delete_manifest(&self, repo: &str, digest: &str) -> RegistryResult<()> {
        self.upstream.delete_manifest(repo, digest).await
    }

    async fn delete_blob(&self, repo: &str, digest: &str) -> RegistryResult<()> {
        self.upstream.delete_blob(repo, digest).await
    }

    /// The registry's own counters; [`Registry::snapshot`] sums every source.
    fn stats(&self) -> &RequestStats {
        self.upstream.stats()
    }

    fn snapshot(&self) -> StatsSnapshot {
        let mut s = self.upstream.snapshot();
        for m in &self.mirrors {
            s.add(&m.reg.snapshot());
        }
        s
    }

    /// The farthest of the sources that have served blobs: a read may go to any of them, and
    /// a far source needs the parallel requests of a far registry.
    fn blob_latency(&self) -> Option<Duration> {
        self.mirrors
            .iter()
            .map(|m| m.reg.blob_latency())
            .chain([self.upstream.blob_latency()])
            .flatten()
            .max()
    }

    fn sources(&self) -> Vec<SourceStats> {
        let now = Instant::now();
        let mut v: Vec<SourceStats> = self
            .mirrors
            .iter()
            .map(|m| SourceStats {
                name: m.name.clone(),
                requests: m.reg.snapshot(),
                answered: m.answered.load(Ordering::Relaxed),
                failures: m.failures.load(Ordering::Relaxed),
                skipped: m.skipped.load(Ordering::Relaxed),
                down: m.is_down(now),
                rate_limit: m.reg.rate_limit(),
            })
            .collect();
        v.push(SourceStats {
            name: "registry".into(),
            requests: self.upstream.snapshot(),
            answered: 0,
            failures: 0,
            skipped: 0,
            down: false,
            rate_limit: self.upstream.rate_limit(),
        });
        v
    }
}

/// A mirror over HTTP at `base`, with the credentials stored for `host` (docker config.json,
/// helpers, auth.json; never the registry's). `like` gives TLS and timeouts. A mirror gets no
/// retry budget: one try, and a failure passes on to the next source at once.
pub fn http_mirror(
    base: reqwest::Url,
    host: &str,
    like: &super::http::HttpOptions,
) -> RegistryResult<Mirror> {
    let reg = super::http::HttpRegistry::new(super::http::HttpOptions {
        base: base.clone(),
        credentials: super::credentials::lookup(host),
        ..like.clone()
    })?
    .with_retry_budget(Duration::ZERO);
    Ok(Mirror::new(base.as_str(), Arc::new(reg)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::fake::FakeRegistry;
    use crate::registry::faulty::{Fault, FaultError, FaultyRegistry, Op};

    async fn seeded() -> (Arc<FakeRegistry>, String) {
        let up = Arc::new(FakeRegistry::new());
        let d = crate::registry::push_whole_blob(up.as_ref(), "a/b", Bytes::from_static(b"0123"))
            .await
            .unwrap();
        (up, d)
    }

    #[tokio::test]
    async fn blobs_come_from_the_first_mirror_that_answers() {
        let (up, d) = seeded().await;
        let (m1, _) = seeded().await;
        let dead = Arc::new(FaultyRegistry::new(Arc::new(FakeRegistry::new())));
        dead.inject(Op::BlobRange, Fault::Error(FaultError::Server));
        let reg = MirrorRegistry::new(
            up.clone(),
            vec![
                Mirror::new("dead", dead.clone()),
                Mirror::new("m1", m1.clone()),
            ],
            false,
        );
        assert_eq!(&reg.blob_range("a/b", &d, 1, 2).await.unwrap()[..], b"12");
        assert_eq!(&reg.blob_range("a/b", &d, 0, 0).await.unwrap()[..], b"0");
        let s = reg.sources();
        assert_eq!((s[0].failures, s[0].skipped, s[0].down), (1, 1, true));
        assert_eq!((s[1].answered, s[1].requests.blob_gets), (2, 2));
        assert_eq!(up.stats().snapshot().blob_gets, 0);
        // The sum over every source: the dead mirror's failed GET counts too.
        assert_eq!(reg.snapshot().blob_gets, 3);
    }

    #[tokio::test]
    async fn a_missing_blob_passes_on_without_marking_the_mirror_down() {
        let (up, d) = seeded().await;
        let empty = Arc::new(FakeRegistry::new());
        let reg = MirrorRegistry::new(up.clone(), vec![Mirror::new("empty", empty)], false);
        assert_eq!(reg.blob_size("a/b", &d).await.unwrap(), 4);
        assert_eq!(reg.blob_size("a/b", &d).await.unwrap(), 4);
        let s = reg.sources();
        assert_eq!((s[0].failures, s[0].skipped, s[0].down), (2, 0, false));
        assert_eq!(up.stats().snapshot().blob_heads, 2);
    }

    #[tokio::test]
    async fn tags_resolve_at_the_registry_unless_mirror_tags() {
        let (up, _) = seeded().await;
        let (m, _) = seeded().await;
        let reg = MirrorRegistry::new(up.clone(), vec![Mirror::new("m", m.clone())], false);
        let _ = reg.manifest_head("a/b", "latest").await;
        let _ = reg.tags("a/b").await;
        assert_eq!(m.stats().snapshot().manifest_heads, 0);
        assert_eq!(m.stats().snapshot().tag_pages, 0);
        let reg = MirrorRegistry::new(up.clone(), vec![Mirror::new("m", m.clone())], true);
        let _ = reg.manifest_head("a/b", "latest").await;
        let _ = reg.tags("a/b").await;
        assert_eq!(m.stats().snapshot().manifest_heads, 1);
        assert_eq!(m.stats().snapshot().tag_pages, 1);
        // Writes never go to a mirror.
        let before = m.stats().snapshot();
        crate::registry::push_whole_blob(&reg, "a/b", Bytes::from_static(b"new"))
            .await
            .unwrap();
        assert_eq!(m.stats().snapshot(), before);
    }

    #[tokio::test]
    async fn a_down_mirror_is_tried_again_after_the_cooldown() {
        let (up, d) = seeded().await;
        let flaky = Arc::new(FaultyRegistry::new(seeded().await.0));
        flaky.inject(Op::BlobRange, Fault::Error(FaultError::Server));
        let reg = MirrorRegistry::new(up.clone(), vec![Mirror::new("flaky", flaky)], false)
            .with_cooldown(Duration::ZERO);
        for _ in 0..3 {
            reg.blob_range("a/b", &d, 0, 3).await.unwrap();
        }
        let s = reg.sources();
        assert_eq!((s[0].failures, s[0].answered, s[0].skipped), (1, 2, 0));
        assert_eq!(up.stats().snapshot().blob_gets, 1);
    }
}
