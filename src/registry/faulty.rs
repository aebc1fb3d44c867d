//! A registry that fails on demand: [`FaultyRegistry`] wraps any [`Registry`] (the fake or the
//! real HTTP client) and injects queued [`Fault`]s into the next matching requests, so the core's
//! error paths can be driven without a misbehaving server.
//!
//! A request answered with an injected error is counted in the inner registry's [`RequestStats`]
//! as if it had been sent (it never reaches the inner registry). Body faults (truncated, whole
//! body, corrupt) apply to blob range reads: the inner registry serves the read, and the answer is
//! spoiled on the way back.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ManifestBlob, ManifestHead, Registry, RequestStats, UploadSession};
use crate::error::{RegistryError, RegistryResult};

/// A failure injected into the next matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer as an error.
    Error(FaultError),
    /// Serve fewer bytes than asked (a truncated body). Blob range reads only.
    Truncate,
    /// Serve the whole blob instead of the range (a Range answered with 200, handled badly). Blob
    /// range reads only; the blob's size is asked of the inner registry first (a HEAD).
    WholeBody,
    /// Flip the bytes served (a digest mismatch). Blob range reads only.
    Corrupt,
}

/// The error an [`Fault::Error`] answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultError {
    /// 404.
    NotFound,
    /// 401.
    Unauthorized,
    /// 429.
    TooManyRequests,
    /// 500.
    Server,
}

/// Which request a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Catalog,
    Tags,
    /// Manifest GET or HEAD.
    Manifest,
    BlobHead,
    BlobRange,
    /// PATCH of an upload.
    UploadPatch,
    /// The closing PUT of an upload.
    UploadFinish,
    PutManifest,
}

/// A [`Registry`] that delegates to `inner`, except where a fault is queued.
pub struct FaultyRegistry {
    inner: Arc<dyn Registry>,
    faults: Mutex<HashMap<Op, VecDeque<Fault>>>,
}

impl FaultyRegistry {
    pub fn new(inner: Arc<dyn Registry>) -> Self {
        FaultyRegistry {
            inner,
            faults: Mutex::new(HashMap::new()),
        }
    }

    /// The wrapped registry.
    pub fn inner(&self) -> &Arc<dyn Registry> {
        &self.inner
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

    /// Faults queued and not yet met by a request.
    pub fn pending(&self) -> usize {
        self.faults
            .lock()
            .unwrap()
            .values()
            .map(VecDeque::len)
            .sum()
    }

    fn take(&self, op: Op) -> Option<Fault> {
        self.faults.lock().unwrap().get_mut(&op)?.pop_front()
    }

    /// The next fault for `op`, if it is an error: counted in `counter` as a request sent.
    /// Body faults queued for operations other than blob reads are dropped here.
    fn error(&self, op: Op, counter: Option<&AtomicU64>) -> RegistryResult<()> {
        match self.take(op) {
            Some(Fault::Error(f)) => {
                if let Some(c) = counter {
                    RequestStats::inc(c);
                }
                Err(injected(op, &f))
            }
            _ => Ok(()),
        }
    }
}

fn injected(op: Op, f: &FaultError) -> RegistryError {
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

#[async_trait]
impl Registry for FaultyRegistry {
    async fn catalog(&self) -> RegistryResult<Vec<String>> {
        self.error(Op::Catalog, Some(&self.stats().catalog_pages))?;
        self.inner.catalog().await
    }

    async fn tags(&self, repo: &str) -> RegistryResult<Vec<String>> {
        self.error(Op::Tags, Some(&self.stats().tag_pages))?;
        self.inner.tags(repo).await
    }

    async fn manifest(&self, repo: &str, reference: &str) -> RegistryResult<ManifestBlob> {
        self.error(Op::Manifest, Some(&self.stats().manifest_gets))?;
        self.inner.manifest(repo, reference).await
    }

    async fn manifest_head(&self, repo: &str, reference: &str) -> RegistryResult<ManifestHead> {
        self.error(Op::Manifest, Some(&self.stats().manifest_heads))?;
        self.inner.manifest_head(repo, reference).await
    }

    async fn blob_size(&self, repo: &str, digest: &str) -> RegistryResult<u64> {
        self.error(Op::BlobHead, Some(&self.stats().blob_heads))?;
        self.inner.blob_size(repo, digest).await
    }

    async fn blob_range(
        &self,
        repo: &str,
        digest: &str,
        start: u64,
        end: u64,
    ) -> RegistryResult<Bytes> {
        match self.take(Op::BlobRange) {
            None => self.inner.blob_range(repo, digest, start, end).await,
            Some(Fault::Error(f)) => {
                RequestStats::inc(&self.stats().blob_gets);
                Err(injected(Op::BlobRange, &f))
            }
            Some(Fault::Truncate) => {
                let out = self.inner.blob_range(repo, digest, start, end).await?;
                Ok(out.slice(..out.len() / 2))
            }
            Some(Fault::Corrupt) => {
                let out = self.inner.blob_range(repo, digest, start, end).await?;
                Ok(out.iter().map(|b| b ^ 0xff).collect::<Vec<_>>().into())
            }
            Some(Fault::WholeBody) => {
                let size = self.inner.blob_size(repo, digest).await?;
                self.inner
                    .blob_range(repo, digest, 0, size.saturating_sub(1))
                    .await
            }
        }
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> RegistryResult<String> {
        self.error(Op::PutManifest, Some(&self.stats().pushes))?;
        self.inner
            .put_manifest(repo, reference, media_type, body)
            .await
    }

    async fn upload_start(&self, repo: &str) -> RegistryResult<UploadSession> {
        self.inner.upload_start(repo).await
    }

    async fn upload_patch(
        &self,
        repo: &str,
        session: &mut UploadSession,
        data: Bytes,
    ) -> RegistryResult<()> {
        self.error(Op::UploadPatch, Some(&self.stats().upload_patches))?;
        self.inner.upload_patch(repo, session, data).await
    }

    async fn upload_finish(
        &self,
        repo: &str,
        session: UploadSession,
        digest: &str,
        last: Bytes,
    ) -> RegistryResult<()> {
        // The closing PUT is not a counted request (only its bytes are).
        self.error(Op::UploadFinish, None)?;
        self.inner.upload_finish(repo, session, digest, last).await
    }

    async fn upload_cancel(&self, repo: &str, session: UploadSession) {
        self.inner.upload_cancel(repo, session).await
    }

    async fn mount_blob(&self, repo: &str, digest: &str, from: &str) -> RegistryResult<bool> {
        self.inner.mount_blob(repo, digest, from).await
    }

    async fn delete_manifest(&self, repo: &str, digest: &str) -> RegistryResult<()> {
        self.inner.delete_manifest(repo, digest).await
    }

    async fn delete_blob(&self, repo: &str, digest: &str) -> RegistryResult<()> {
        self.inner.delete_blob(repo, digest).await
    }

    fn stats(&self) -> &RequestStats {
        self.inner.stats()
    }
}
