//! A registry that holds back part of one blob: [`GatedRegistry`] wraps any registry and makes
//! every range read of the gated blob that overlaps `[from, to)` wait until the gate is opened
//! (a layer whose middle has not arrived yet; its footer, past `to`, still answers).
//! It records the ranges of that blob it served, so a test can say how far into a layer regfs
//! had read when an operation answered (progressive indexing), and which exact ranges a read
//! fetched (TOC formats).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use regfs::error::RegistryResult;
use regfs::registry::{ManifestBlob, ManifestHead, Registry, RequestStats, Sink, UploadSession};

/// See the module doc.
pub struct GatedRegistry {
    inner: Arc<dyn Registry>,
    /// (digest, from, to): ranges of that blob overlapping `[from, to)` wait for the gate.
    gated: Mutex<Option<(String, u64, u64)>>,
    open: tokio::sync::watch::Sender<bool>,
    /// Ranges `[start, end)` served of the gated blob (or of every blob when none is gated).
    served: Mutex<Vec<(String, u64, u64)>>,
}

impl GatedRegistry {
    pub fn new(inner: Arc<dyn Registry>) -> Self {
        GatedRegistry {
            inner,
            gated: Mutex::new(None),
            open: tokio::sync::watch::channel(true).0,
            served: Mutex::new(Vec::new()),
        }
    }

    /// Hold back reads of `digest` that overlap bytes `[from, to)`, until [`Self::open`].
    pub fn close(&self, digest: &str, from: u64, to: u64) {
        *self.gated.lock().unwrap() = Some((digest.to_string(), from, to));
        self.open.send_replace(false);
    }

    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// Every range served so far, as (digest, start, end exclusive).
    pub fn served(&self) -> Vec<(String, u64, u64)> {
        self.served.lock().unwrap().clone()
    }

    /// The ranges served of `digest` (start, end exclusive), in order.
    pub fn ranges_of(&self, digest: &str) -> Vec<(u64, u64)> {
        self.served()
            .into_iter()
            .filter(|(d, _, _)| d == digest)
            .map(|(_, s, e)| (s, e))
            .collect()
    }

    /// Bytes served of `digest`.
    pub fn bytes_of(&self, digest: &str) -> u64 {
        self.ranges_of(digest).iter().map(|(s, e)| e - s).sum()
    }

    /// Forget the ranges served so far.
    pub fn reset(&self) {
        self.served.lock().unwrap().clear();
    }
}

#[async_trait]
impl Registry for GatedRegistry {
    async fn catalog(&self) -> RegistryResult<Vec<String>> {
        self.inner.catalog().await
    }
    async fn tags(&self, repo: &str) -> RegistryResult<Vec<String>> {
        self.inner.tags(repo).await
    }
    async fn manifest(&self, repo: &str, reference: &str) -> RegistryResult<ManifestBlob> {
        self.inner.manifest(repo, reference).await
    }
    async fn manifest_head(&self, repo: &str, reference: &str) -> RegistryResult<ManifestHead> {
        self.inner.manifest_head(repo, reference).await
    }
    async fn blob_size(&self, repo: &str, digest: &str) -> RegistryResult<u64> {
        self.inner.blob_size(repo, digest).await
    }
    async fn blob_range(
        &self,
        repo: &str,
        digest: &str,
        start: u64,
        end: u64,
    ) -> RegistryResult<Bytes> {
        let held = matches!(&*self.gated.lock().unwrap(),
            Some((d, from, to)) if d == digest && end >= *from && start < *to);
        if held {
            let mut rx = self.open.subscribe();
            // Bounded: the test opens the gate (or drops the registry, which ends the wait).
            let _ = rx.wait_for(|open| *open).await;
        }
        let data = self.inner.blob_range(repo, digest, start, end).await?;
        self.served
            .lock()
            .unwrap()
            .push((digest.to_string(), start, start + data.len() as u64));
        Ok(data)
    }
    /// Streamed like a real body: the bytes before the gate arrive at once, the rest once it
    /// opens (a body whose tail is still on its way).
    async fn blob_range_into(
        &self,
        repo: &str,
        digest: &str,
        start: u64,
        end: u64,
        sink: &mut Sink<'_>,
    ) -> RegistryResult<()> {
        let gate_from = match &*self.gated.lock().unwrap() {
            Some((d, from, to)) if d == digest && end >= *from && start < *to => Some(*from),
            _ => None,
        };
        let mut at = start;
        if let Some(from) = gate_from.filter(|f| *f > start) {
            let head = self.inner.blob_range(repo, digest, start, from - 1).await?;
            self.served
                .lock()
                .unwrap()
                .push((digest.to_string(), start, from));
            at = from;
            if sink(head).is_break() {
                return Ok(());
            }
        }
        let rest = self.blob_range(repo, digest, at, end).await?;
        let _ = sink(rest);
        Ok(())
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> RegistryResult<String> {
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
        self.inner.upload_patch(repo, session, data).await
    }
    async fn upload_finish(
        &self,
        repo: &str,
        session: UploadSession,
        digest: &str,
        last: Bytes,
    ) -> RegistryResult<()> {
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
