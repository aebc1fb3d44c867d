//! A registry that fails on demand: [`FaultyRegistry`] wraps any [`Registry`] (the fake or the
//! real HTTP client) and injects queued [`Fault`]s into the next matching requests, so the core's
//! error paths can be driven without a misbehaving server. A fault can be kept for the requests of
//! one reference (a tag or digest: [`FaultyRegistry::inject_for`]); others pass it by.
//!
//! A request answered with an injected error is counted in the inner registry's [`RequestStats`]
//! as if it had been sent (it never reaches the inner registry). Body faults (truncated, whole
//! body, corrupt) apply to blob range reads: the inner registry serves the read, and the answer is
//! spoiled on the way back. [`Fault::Hold`] keeps a request waiting at a [`Gate`] until the test
//! opens it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use super::{ManifestBlob, ManifestHead, Registry, RequestStats, UploadSession};
use crate::error::{RegistryError, RegistryResult};
use crate::sync::lock;

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
    /// The request waits at the gate until [`Gate::open`], then goes on unharmed.
    Hold(Gate),
}

/// Where a [`Fault::Hold`] keeps its requests: a test waits for one to arrive
/// ([`Gate::arrived`]), checks what happens meanwhile, and lets them go ([`Gate::open`]).
#[derive(Debug, Clone)]
pub struct Gate {
    /// Requests that reached the gate so far.
    arrived: Arc<watch::Sender<usize>>,
    open: Arc<watch::Sender<bool>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            arrived: Arc::new(watch::channel(0).0),
            open: Arc::new(watch::channel(false).0),
        }
    }
}

impl PartialEq for Gate {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.open, &other.open)
    }
}

impl Eq for Gate {}

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Wait until at least one request is held here (or has passed).
    pub async fn arrived(&self) {
        let mut rx = self.arrived.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = rx.wait_for(|n| *n > 0).await;
    }

    /// Let every held request (and every later one) through.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    async fn pass(&self) {
        self.arrived.send_modify(|n| *n += 1);
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
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
    /// Manifest HEAD only (met before faults queued for [`Op::Manifest`]).
    ManifestHead,
    BlobHead,
    BlobRange,
    /// PATCH of an upload.
    UploadPatch,
    /// The closing PUT of an upload.
    UploadFinish,
    PutManifest,
}

/// A queued fault, and the reference (tag or digest) it is kept for, if any.
type Queued = (Option<String>, Fault);

/// A [`Registry`] that delegates to `inner`, except where a fault is queued.
pub struct FaultyRegistry {
    inner: Arc<dyn Registry>,
    faults: Mutex<HashMap<Op, VecDeque<Queued>>>,
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
        lock(&self.faults)
            .entry(op)
            .or_default()
            .push_back((None, fault));
    }

    /// Queue a fault for the next request of kind `op` about `reference`: the tag or digest of a
    /// manifest request, the digest of a blob request or of an upload's closing PUT, the tag of a
    /// manifest PUT, the repository of a tag list. Requests about other references pass it by.
    pub fn inject_for(&self, op: Op, reference: &str, fault: Fault) {
        lock(&self.faults)
            .entry(op)
            .or_default()
            .push_back((Some(reference.to_string()), fault));
    }

    /// Faults queued and not yet met by a request.
    pub fn pending(&self) -> usize {
        lock(&self.faults).values().map(VecDeque::len).sum()
    }

    /// The first fault queued for `op` that applies to `reference`, taken off the queue.
    fn take(&self, op: Op, reference: Option<&str>) -> Option<Fault> {
        let mut faults = lock(&self.faults);
        let q = faults.get_mut(&op)?;
        let i = q
            .iter()
            .position(|(r, _)| r.is_none() || r.as_deref() == reference)?;
        q.remove(i).map(|(_, f)| f)
    }

    /// Is a fault queued for `op` that applies to `reference`?
    fn queued_for(&self, op: Op, reference: &str) -> bool {
        lock(&self.faults).get(&op).is_some_and(|q| {
            q.iter()
                .any(|(r, _)| r.is_none() || r.as_deref() == Some(reference))
        })
    }

    /// Run `call` unless the next fault for `op` (about `reference`) says otherwise.
    async fn guard<T, F>(
        &self,
        op: Op,
        reference: Option<&str>,
        counter: Option<&AtomicU64>,
        call: F,
    ) -> RegistryResult<T>
    where
        F: std::future::Future<Output = RegistryResult<T>>,
    {
        apply(op, self.take(op, reference), counter, call).await
    }
}

/// Answer `call` as `fault` says: an error (counted in `counter` as a request sent), a hold, or
/// untouched. Body faults (meant for blob reads) are ignored here.
async fn apply<T, F>(
    op: Op,
    fault: Option<Fault>,
    counter: Option<&AtomicU64>,
    call: F,
) -> RegistryResult<T>
where
    F: std::future::Future<Output = RegistryResult<T>>,
{
    match fault {
        Some(Fault::Error(f)) => {
            if let Some(c) = counter {
                RequestStats::inc(c);
            }
            Err(injected(op, &f))
        }
        Some(Fault::Hold(gate)) => {
            gate.pass().await;
            call.await
        }
        _ => call.await,
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
        let c = Some(&self.stats().catalog_pages);
        self.guard(Op::Catalog, None, c, self.inner.catalog()).await
    }

    async fn tags(&self, repo: &str) -> RegistryResult<Vec<String>> {
        let c = Some(&self.stats().tag_pages);
        self.guard(Op::Tags, Some(repo), c, self.inner.tags(repo))
            .await
    }

    async fn manifest(&self, repo: &str, reference: &str) -> RegistryResult<ManifestBlob> {
        let c = Some(&self.stats().manifest_gets);
        let call = self.inner.manifest(repo, reference);
        self.guard(Op::Manifest, Some(reference), c, call).await
    }

    async fn manifest_head(&self, repo: &str, reference: &str) -> RegistryResult<ManifestHead> {
        let c = Some(&self.stats().manifest_heads);
        // A fault for HEADs only comes first; then one for any manifest request.
        let op = if self.queued_for(Op::ManifestHead, reference) {
            Op::ManifestHead
        } else {
            Op::Manifest
        };
        let call = self.inner.manifest_head(repo, reference);
        self.guard(op, Some(reference), c, call).await
    }

    async fn blob_size(&self, repo: &str, digest: &str) -> RegistryResult<u64> {
        let c = Some(&self.stats().blob_heads);
        let call = self.inner.blob_size(repo, digest);
        self.guard(Op::BlobHead, Some(digest), c, call).await
    }

    async fn blob_range(
        &self,
        repo: &str,
        digest: &str,
        start: u64,
        end: u64,
    ) -> RegistryResult<Bytes> {
        let op = Op::BlobRange;
        let call = self.inner.blob_range(repo, digest, start, end);
        match self.take(op, Some(digest)) {
            Some(Fault::Truncate) => {
                let out = call.await?;
                Ok(out.slice(..out.len() / 2))
            }
            Some(Fault::Corrupt) => {
                let out = call.await?;
                Ok(out.iter().map(|b| b ^ 0xff).collect::<Vec<_>>().into())
            }
            Some(Fault::WholeBody) => {
                let size = self.inner.blob_size(repo, digest).await?;
                self.inner
                    .blob_range(repo, digest, 0, size.saturating_sub(1))
                    .await
            }
            other => apply(op, other, Some(&self.stats().blob_gets), call).await,
        }
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> RegistryResult<String> {
        let c = Some(&self.stats().pushes);
        let call = self.inner.put_manifest(repo, reference, media_type, body);
        self.guard(Op::PutManifest, Some(reference), c, call).await
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
        let c = Some(&self.stats().upload_patches);
        let call = self.inner.upload_patch(repo, session, data);
        self.guard(Op::UploadPatch, None, c, call).await
    }

    async fn upload_finish(
        &self,
        repo: &str,
        session: UploadSession,
        digest: &str,
        last: Bytes,
    ) -> RegistryResult<()> {
        // The closing PUT is not a counted request (only its bytes are).
        let call = self.inner.upload_finish(repo, session, digest, last);
        self.guard(Op::UploadFinish, Some(digest), None, call).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::fake::FakeRegistry;

    #[tokio::test]
    async fn faults_kept_for_a_reference_or_for_heads_pass_others_by() {
        let fake = Arc::new(FakeRegistry::new());
        let cfg = fake.add_blob("r", b"{}".to_vec());
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cfg}","size":2}},"layers":[]}}"#
        );
        fake.add_manifest("r", Some("a"), m.clone());
        fake.add_manifest("r", Some("b"), m);
        let f = FaultyRegistry::new(fake.clone());
        f.inject_for(Op::ManifestHead, "b", Fault::Error(FaultError::Server));
        // Another reference, and a GET of the same one, pass it by.
        f.manifest_head("r", "a").await.unwrap();
        f.manifest("r", "b").await.unwrap();
        assert_eq!(f.pending(), 1);
        let e = f.manifest_head("r", "b").await.unwrap_err();
        assert!(
            matches!(e, RegistryError::Server { status: 500, .. }),
            "{e}"
        );
        assert_eq!(f.pending(), 0);
        f.manifest_head("r", "b").await.unwrap();
        // A fault for any manifest request meets a HEAD too.
        f.inject(Op::Manifest, Fault::Error(FaultError::NotFound));
        assert!(f.manifest_head("r", "a").await.is_err());
        // A held request goes on once the gate opens.
        let gate = Gate::new();
        f.inject_for(Op::BlobHead, &cfg, Fault::Hold(gate.clone()));
        let f = Arc::new(f);
        let head = tokio::spawn({
            let (f, cfg) = (f.clone(), cfg.clone());
            async move { f.blob_size("r", &cfg).await }
        });
        gate.arrived().await;
        assert!(!head.is_finished());
        gate.open();
        assert_eq!(head.await.unwrap().unwrap(), 2);
    }
}
