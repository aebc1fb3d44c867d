//! An in-memory registry for the fast test tier. It counts every request in the same
//! [`RequestStats`] as the HTTP client. To make it fail on demand, wrap it in
//! [`super::faulty::FaultyRegistry`].
//!
//! Read requests count as in flight while they are answered. After
//! [`FakeRegistry::yield_in_requests`] each also yields to the runtime once while in flight (as
//! a network request would wait), so concurrent callers overlap and `max_requests_in_flight`
//! shows whether they were issued at once or one after another. Nothing waits on a clock. Off
//! by default: then a request is answered without letting spawned tasks (readahead) run.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::{InFlight, ManifestBlob, ManifestHead, Registry, RequestStats, UploadSession};
use crate::digest::sha256_digest;
use crate::error::{RegistryError, RegistryResult};
use crate::manifest::sniff_media_type;

#[derive(Default)]
struct Repo {
    tags: BTreeMap<String, String>,
    manifests: HashMap<String, (String, Bytes)>,
    blobs: HashMap<String, Bytes>,
}

/// The in-memory registry.
#[derive(Default)]
pub struct FakeRegistry {
    repos: Mutex<BTreeMap<String, Repo>>,
    no_catalog: std::sync::atomic::AtomicBool,
    yield_in_requests: std::sync::atomic::AtomicBool,
    /// Open upload sessions: id -> (repo, bytes so far).
    uploads: Mutex<HashMap<String, (String, Vec<u8>)>>,
    next_upload: std::sync::atomic::AtomicU64,
    stats: RequestStats,
    /// Every blob Range asked for, in order: (start, end inclusive).
    ranges: Mutex<Vec<(u64, u64)>>,
}

impl FakeRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Make `_catalog` answer 401, as Docker Hub and GHCR do.
    /// Every blob Range asked for so far, in order (start, end inclusive).
    pub fn blob_ranges(&self) -> Vec<(u64, u64)> {
        self.ranges.lock().unwrap().clone()
    }

    pub fn disable_catalog(&self) {
        self.no_catalog
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Let every read request yield to the runtime once while it is in flight.
    pub fn yield_in_requests(&self) {
        self.yield_in_requests
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Store a blob in `repo`; returns its digest.
    pub fn add_blob(&self, repo: &str, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let d = sha256_digest(&data);
        self.repos
            .lock()
            .unwrap()
            .entry(repo.into())
            .or_default()
            .blobs
            .insert(d.clone(), data);
        d
    }

    /// Store a manifest under its digest and, if given, a tag. Returns its digest.
    pub fn add_manifest(&self, repo: &str, tag: Option<&str>, body: impl Into<Bytes>) -> String {
        let body = body.into();
        let d = sha256_digest(&body);
        let mt = sniff_media_type(&body);
        let mut repos = self.repos.lock().unwrap();
        let r = repos.entry(repo.into()).or_default();
        r.manifests.insert(d.clone(), (mt, body));
        if let Some(t) = tag {
            r.tags.insert(t.into(), d.clone());
        }
        d
    }

    /// Store raw bytes under a tag with a claimed digest that may not match (a lying registry).
    pub fn add_manifest_raw(
        &self,
        repo: &str,
        tag: &str,
        digest: &str,
        media_type: &str,
        body: &[u8],
    ) {
        let mut repos = self.repos.lock().unwrap();
        let r = repos.entry(repo.into()).or_default();
        r.manifests.insert(
            digest.into(),
            (media_type.into(), Bytes::copy_from_slice(body)),
        );
        r.tags.insert(tag.into(), digest.into());
    }

    /// Is an upload session still open?
    pub fn open_uploads(&self) -> usize {
        self.uploads.lock().unwrap().len()
    }

    /// Does `repo` hold blob `digest`?
    pub fn has_blob(&self, repo: &str, digest: &str) -> bool {
        self.repos
            .lock()
            .unwrap()
            .get(repo)
            .is_some_and(|r| r.blobs.contains_key(digest))
    }

    /// The tags of `repo`, straight from storage.
    pub fn tag_names(&self, repo: &str) -> Vec<String> {
        self.repos
            .lock()
            .unwrap()
            .get(repo)
            .map(|r| r.tags.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn resolve(&self, repo: &str, reference: &str) -> RegistryResult<(String, String, Bytes)> {
        let repos = self.repos.lock().unwrap();
        let r = repos
            .get(repo)
            .ok_or_else(|| RegistryError::NotFound(format!("NAME_UNKNOWN: {repo}")))?;
        let digest = if reference.contains(':') {
            reference.to_string()
        } else {
            r.tags.get(reference).cloned().ok_or_else(|| {
                RegistryError::NotFound(format!("MANIFEST_UNKNOWN: {repo}:{reference}"))
            })?
        };
        let (mt, body) =
            r.manifests.get(&digest).cloned().ok_or_else(|| {
                RegistryError::NotFound(format!("MANIFEST_UNKNOWN: {repo}@{digest}"))
            })?;
        Ok((digest, mt, body))
    }

    /// Count a request in flight (and, when asked to, let other tasks run once before it is
    /// answered).
    async fn in_flight(&self) -> InFlight<'_> {
        let guard = self.stats.in_flight();
        if self
            .yield_in_requests
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            tokio::task::yield_now().await;
        }
        guard
    }

    fn blob(&self, repo: &str, digest: &str) -> RegistryResult<Bytes> {
        let repos = self.repos.lock().unwrap();
        let r = repos
            .get(repo)
            .ok_or_else(|| RegistryError::NotFound(format!("NAME_UNKNOWN: {repo}")))?;
        r.blobs
            .get(digest)
            .or_else(|| r.manifests.get(digest).map(|(_, b)| b))
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(format!("BLOB_UNKNOWN: {digest}")))
    }
}

#[async_trait]
impl Registry for FakeRegistry {
    async fn catalog(&self) -> RegistryResult<Vec<String>> {
        RequestStats::inc(&self.stats.catalog_pages);
        let _in_flight = self.in_flight().await;
        if self.no_catalog.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(RegistryError::Unauthorized("catalog not offered".into()));
        }
        let repos = self.repos.lock().unwrap();
        Ok(repos
            .iter()
            .filter(|(_, r)| !r.tags.is_empty())
            .map(|(k, _)| k.clone())
            .collect())
    }

    async fn tags(&self, repo: &str) -> RegistryResult<Vec<String>> {
        RequestStats::inc(&self.stats.tag_pages);
        let _in_flight = self.in_flight().await;
        let repos = self.repos.lock().unwrap();
        let r = repos
            .get(repo)
            .ok_or_else(|| RegistryError::NotFound(format!("NAME_UNKNOWN: {repo}")))?;
        Ok(r.tags.keys().cloned().collect())
    }

    async fn manifest(&self, repo: &str, reference: &str) -> RegistryResult<ManifestBlob> {
        RequestStats::inc(&self.stats.manifest_gets);
        let _in_flight = self.in_flight().await;
        let (digest, media_type, body) = self.resolve(repo, reference)?;
        // Like the HTTP client: verify what was served against the digest it claims.
        crate::digest::verify(&digest, &body)?;
        Ok(ManifestBlob {
            digest,
            media_type,
            body,
        })
    }

    async fn manifest_head(&self, repo: &str, reference: &str) -> RegistryResult<ManifestHead> {
        RequestStats::inc(&self.stats.manifest_heads);
        let _in_flight = self.in_flight().await;
        let (digest, media_type, body) = self.resolve(repo, reference)?;
        Ok(ManifestHead {
            digest,
            media_type,
            size: body.len() as u64,
        })
    }

    async fn blob_size(&self, repo: &str, digest: &str) -> RegistryResult<u64> {
        RequestStats::inc(&self.stats.blob_heads);
        let _in_flight = self.in_flight().await;
        Ok(self.blob(repo, digest)?.len() as u64)
    }

    async fn blob_range(
        &self,
        repo: &str,
        digest: &str,
        start: u64,
        end: u64,
    ) -> RegistryResult<Bytes> {
        RequestStats::inc(&self.stats.blob_gets);
        self.ranges.lock().unwrap().push((start, end));
        let _in_flight = self.in_flight().await;
        let blob = self.blob(repo, digest)?;
        if start >= blob.len() as u64 || end < start {
            return Err(RegistryError::Protocol("range refused (416)".into()));
        }
        let end = end.min(blob.len() as u64 - 1);
        let out = blob.slice(start as usize..=end as usize);
        RequestStats::add(&self.stats.blob_bytes, out.len() as u64);
        Ok(out)
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        _media_type: &str,
        body: Bytes,
    ) -> RegistryResult<String> {
        RequestStats::inc(&self.stats.pushes);
        // Like a registry: every blob the manifest references must be in the repository.
        if let Ok(crate::manifest::Parsed::Image { config, layers }) =
            crate::manifest::parse("", &body)
        {
            for d in std::iter::once(&config).chain(&layers) {
                if !self.has_blob(repo, &d.digest) {
                    return Err(RegistryError::Invalid(format!(
                        "MANIFEST_BLOB_UNKNOWN: blob unknown to registry: {}",
                        d.digest
                    )));
                }
            }
        }
        let tag = (!reference.contains(':')).then_some(reference);
        Ok(self.add_manifest(repo, tag, body))
    }

    async fn upload_start(&self, repo: &str) -> RegistryResult<UploadSession> {
        RequestStats::inc(&self.stats.upload_starts);
        let id = format!(
            "fake-upload-{}",
            self.next_upload
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        self.uploads
            .lock()
            .unwrap()
            .insert(id.clone(), (repo.to_string(), Vec::new()));
        Ok(UploadSession {
            location: id,
            offset: 0,
            min_chunk: None,
        })
    }

    async fn upload_patch(
        &self,
        _repo: &str,
        session: &mut UploadSession,
        data: Bytes,
    ) -> RegistryResult<()> {
        RequestStats::inc(&self.stats.upload_patches);
        let mut uploads = self.uploads.lock().unwrap();
        let (_, buf) = uploads
            .get_mut(&session.location)
            .ok_or_else(|| RegistryError::NotFound("BLOB_UPLOAD_UNKNOWN".into()))?;
        buf.extend_from_slice(&data);
        session.offset += data.len() as u64;
        RequestStats::add(&self.stats.upload_bytes, data.len() as u64);
        Ok(())
    }

    async fn upload_finish(
        &self,
        repo: &str,
        session: UploadSession,
        digest: &str,
        last: Bytes,
    ) -> RegistryResult<()> {
        let (_, mut buf) = self
            .uploads
            .lock()
            .unwrap()
            .remove(&session.location)
            .ok_or_else(|| RegistryError::NotFound("BLOB_UPLOAD_UNKNOWN".into()))?;
        buf.extend_from_slice(&last);
        RequestStats::add(&self.stats.upload_bytes, last.len() as u64);
        let actual = sha256_digest(&buf);
        if actual != digest {
            return Err(RegistryError::Invalid(format!(
                "DIGEST_INVALID: {digest} (content is {actual})"
            )));
        }
        self.add_blob(repo, buf);
        Ok(())
    }

    async fn upload_cancel(&self, _repo: &str, session: UploadSession) {
        RequestStats::inc(&self.stats.upload_cancels);
        self.uploads.lock().unwrap().remove(&session.location);
    }

    async fn mount_blob(&self, repo: &str, digest: &str, from: &str) -> RegistryResult<bool> {
        RequestStats::inc(&self.stats.blob_mounts);
        let Ok(data) = self.blob(from, digest) else {
            return Ok(false);
        };
        self.add_blob(repo, data);
        Ok(true)
    }

    async fn delete_manifest(&self, repo: &str, digest: &str) -> RegistryResult<()> {
        RequestStats::inc(&self.stats.deletes);
        let mut repos = self.repos.lock().unwrap();
        let r = repos
            .get_mut(repo)
            .ok_or_else(|| RegistryError::NotFound(format!("NAME_UNKNOWN: {repo}")))?;
        r.manifests
            .remove(digest)
            .ok_or_else(|| RegistryError::NotFound(format!("MANIFEST_UNKNOWN: {digest}")))?;
        // Like distribution: every tag pointing at the manifest goes with it.
        r.tags.retain(|_, d| d != digest);
        Ok(())
    }

    async fn delete_blob(&self, repo: &str, digest: &str) -> RegistryResult<()> {
        RequestStats::inc(&self.stats.deletes);
        let mut repos = self.repos.lock().unwrap();
        repos
            .get_mut(repo)
            .and_then(|r| r.blobs.remove(digest))
            .map(|_| ())
            .ok_or_else(|| RegistryError::NotFound(format!("BLOB_UNKNOWN: {digest}")))
    }

    fn stats(&self) -> &RequestStats {
        &self.stats
    }
}
