//! An in-memory registry for the fast test tier. It counts every request in the same
//! [`RequestStats`] as the HTTP client, and fails on demand ([`Fault`]) so the core's error paths
//! can be driven without a network.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ManifestBlob, ManifestHead, Registry, RequestStats};
use crate::digest::sha256_digest;
use crate::error::{RegistryError, RegistryResult};
use crate::manifest::sniff_media_type;

/// A failure the fake injects into the next matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer as an error.
    Error(FaultError),
    /// Serve fewer bytes than asked (a truncated body).
    Truncate,
    /// Serve the whole blob instead of the range (a Range answered with 200, handled badly).
    WholeBody,
    /// Flip the bytes served (a digest mismatch).
    Corrupt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultError {
    NotFound,
    Unauthorized,
    TooManyRequests,
    Server,
}

/// Which request a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Catalog,
    Tags,
    Manifest,
    BlobHead,
    BlobRange,
}

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
    faults: Mutex<HashMap<Op, VecDeque<Fault>>>,
    no_catalog: std::sync::atomic::AtomicBool,
    stats: RequestStats,
}

impl FakeRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Make `_catalog` answer 401, as Docker Hub and GHCR do.
    pub fn disable_catalog(&self) {
        self.no_catalog
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Queue a fault for the next request of kind `op`.
    pub fn inject(&self, op: Op, fault: Fault) {
        self.faults
            .lock()
            .unwrap()
            .entry(op)
            .or_default()
            .push_back(fault);
    }

    fn take_fault(&self, op: Op) -> Option<Fault> {
        self.faults.lock().unwrap().get_mut(&op)?.pop_front()
    }

    fn fail(op: Op, f: &FaultError) -> RegistryError {
        let m = format!("injected fault on {op:?}");
        match f {
            FaultError::NotFound => RegistryError::NotFound(m),
            FaultError::Unauthorized => RegistryError::Unauthorized(m),
            FaultError::TooManyRequests => RegistryError::TooManyRequests(m),
            FaultError::Server => RegistryError::Server {
                status: 500,
                message: m,
            },
        }
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
        if let Some(Fault::Error(f)) = self.take_fault(Op::Catalog) {
            return Err(Self::fail(Op::Catalog, &f));
        }
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
        if let Some(Fault::Error(f)) = self.take_fault(Op::Tags) {
            return Err(Self::fail(Op::Tags, &f));
        }
        let repos = self.repos.lock().unwrap();
        let r = repos
            .get(repo)
            .ok_or_else(|| RegistryError::NotFound(format!("NAME_UNKNOWN: {repo}")))?;
        Ok(r.tags.keys().cloned().collect())
    }

    async fn manifest(&self, repo: &str, reference: &str) -> RegistryResult<ManifestBlob> {
        RequestStats::inc(&self.stats.manifest_gets);
        let fault = self.take_fault(Op::Manifest);
        if let Some(Fault::Error(f)) = &fault {
            return Err(Self::fail(Op::Manifest, f));
        }
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
        if let Some(Fault::Error(f)) = self.take_fault(Op::Manifest) {
            return Err(Self::fail(Op::Manifest, &f));
        }
        let (digest, media_type, body) = self.resolve(repo, reference)?;
        Ok(ManifestHead {
            digest,
            media_type,
            size: body.len() as u64,
        })
    }

    async fn blob_size(&self, repo: &str, digest: &str) -> RegistryResult<u64> {
        RequestStats::inc(&self.stats.blob_heads);
        if let Some(Fault::Error(f)) = self.take_fault(Op::BlobHead) {
            return Err(Self::fail(Op::BlobHead, &f));
        }
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
        let fault = self.take_fault(Op::BlobRange);
        if let Some(Fault::Error(f)) = &fault {
            return Err(Self::fail(Op::BlobRange, f));
        }
        let blob = self.blob(repo, digest)?;
        if start >= blob.len() as u64 || end < start {
            return Err(RegistryError::Protocol("range refused (416)".into()));
        }
        let end = end.min(blob.len() as u64 - 1);
        let mut out = blob.slice(start as usize..=end as usize);
        match fault {
            Some(Fault::Truncate) => out = out.slice(..out.len() / 2),
            Some(Fault::WholeBody) => out = blob.clone(),
            Some(Fault::Corrupt) => out = out.iter().map(|b| b ^ 0xff).collect::<Vec<_>>().into(),
            _ => {}
        }
        self.stats
            .blob_bytes
            .fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(out)
    }

    async fn push_blob(&self, repo: &str, data: Bytes) -> RegistryResult<String> {
        RequestStats::inc(&self.stats.pushes);
        Ok(self.add_blob(repo, data))
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        _media_type: &str,
        body: Bytes,
    ) -> RegistryResult<String> {
        RequestStats::inc(&self.stats.pushes);
        let tag = (!reference.contains(':')).then_some(reference);
        Ok(self.add_manifest(repo, tag, body))
    }

    fn stats(&self) -> &RequestStats {
        &self.stats
    }
}
