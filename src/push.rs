//! Pushing by writing: a chunked blob upload driven by sequential `write`s.
//!
//! Bytes are hashed as they arrive and sent as PATCH chunks of the upload chunk size (at least the
//! registry's `OCI-Chunk-Min-Length`). One PATCH is in flight while the next chunk fills, so memory
//! stays at about two chunks whatever the file size. The commit (PUT `?digest=`) happens in
//! [`BlobUpload::finish`]; any failure (a refused write included) poisons the upload and cancels
//! the session, so nothing claims to be complete.
//!
//! Errors are [`PushError`]s; `error.rs` decides which errno the writer sees.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::task::JoinHandle;

use crate::digest::StreamingDigest;
pub use crate::error::PushError;
use crate::error::{PushResult, RegistryError, RegistryResult};
use crate::registry::{Registry, UploadSession};

type Inflight = JoinHandle<(UploadSession, RegistryResult<()>)>;

/// The largest `OCI-Chunk-Min-Length` honoured beyond `--upload-chunk-size`: an upload holds
/// about two chunks in memory, so a registry's minimum is a memory demand, and a hostile one
/// (say 2^63) would hold the whole file. 64 MiB is twelve times S3's 5 MiB part minimum (ECR),
/// the largest real minimum; above it the push fails with the reason, and the session is
/// cancelled.
pub const MAX_REGISTRY_MIN_CHUNK: u64 = 64 << 20;

/// One blob being written.
pub struct BlobUpload {
    reg: Arc<dyn Registry>,
    repo: String,
    chunk: u64,
    /// The digest the content must have (`blobs/sha256/<hex>`), if known in advance.
    expected: Option<String>,
    /// The registry already has `expected`: hash to check the content, send nothing.
    skip: bool,
    written: u64,
    hasher: StreamingDigest,
    buf: BytesMut,
    session: Option<UploadSession>,
    inflight: Option<Inflight>,
    /// The first failure; every later call returns it.
    failed: Option<PushError>,
}

fn push_error(repo: &str, e: RegistryError) -> PushError {
    PushError::Registry {
        repo: repo.to_string(),
        source: e,
    }
}

impl BlobUpload {
    pub fn new(
        reg: Arc<dyn Registry>,
        repo: &str,
        chunk: u64,
        expected: Option<String>,
        skip: bool,
    ) -> Self {
        BlobUpload {
            reg,
            repo: repo.to_string(),
            chunk,
            expected,
            skip,
            written: 0,
            hasher: StreamingDigest::default(),
            buf: BytesMut::new(),
            session: None,
            inflight: None,
            failed: None,
        }
    }

    /// Bytes accepted so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn fail(&mut self, e: PushError) -> PushError {
        if self.failed.is_none() {
            self.failed = Some(e.clone());
        }
        e
    }

    /// Accept `data` at `offset`, which must be where the previous write ended.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> PushResult<u32> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if offset != self.written {
            let e = PushError::OutOfOrder {
                offset,
                expected: self.written,
            };
            return Err(self.fail(e));
        }
        self.hasher.update(data);
        self.written += data.len() as u64;
        if !self.skip {
            self.buf.extend_from_slice(data);
            self.pump().await?;
        }
        Ok(data.len() as u32)
    }

    /// The chunk size in force: ours, or the registry's minimum when that is larger.
    fn threshold(&self) -> u64 {
        let min = self.session.as_ref().and_then(|s| s.min_chunk).unwrap_or(0);
        self.chunk.max(min)
    }

    /// Send every full chunk in the buffer (at most one PATCH in flight).
    async fn pump(&mut self) -> PushResult<()> {
        while self.buf.len() as u64 >= self.threshold() {
            self.wait_inflight().await?;
            if self.session.is_none() {
                match self.reg.upload_start(&self.repo).await {
                    Ok(s) => {
                        let limit = self.chunk.max(MAX_REGISTRY_MIN_CHUNK);
                        if let Some(min) = s.min_chunk.filter(|&m| m > limit) {
                            self.reg.upload_cancel(&self.repo, s).await;
                            let e = RegistryError::Protocol(format!(
                                "the registry wants PATCH chunks of at least {min} bytes \
                                 (OCI-Chunk-Min-Length), more than regfs holds for one upload \
                                 ({limit} bytes; see --upload-chunk-size)"
                            ));
                            return Err(self.fail(push_error(&self.repo, e)));
                        }
                        self.session = Some(s)
                    }
                    Err(e) => {
                        let e = push_error(&self.repo, e);
                        return Err(self.fail(e));
                    }
                }
                if (self.buf.len() as u64) < self.threshold() {
                    break;
                }
            }
            let data = self.buf.split_to(self.threshold() as usize).freeze();
            let mut session = self.session.take().expect("session started above");
            let (reg, repo) = (self.reg.clone(), self.repo.clone());
            self.inflight = Some(tokio::spawn(async move {
                let r = reg.upload_patch(&repo, &mut session, data).await;
                (session, r)
            }));
        }
        Ok(())
    }

    /// Wait for the PATCH in flight, if any, and take its session back.
    async fn wait_inflight(&mut self) -> PushResult<()> {
        let Some(h) = self.inflight.take() else {
            return Ok(());
        };
        match h.await {
            Ok((session, result)) => {
                self.session = Some(session);
                if let Err(e) = result {
                    let e = push_error(&self.repo, e);
                    return Err(self.fail(e));
                }
                Ok(())
            }
            Err(e) => {
                let e = PushError::Task {
                    repo: self.repo.clone(),
                    message: e.to_string(),
                };
                Err(self.fail(e))
            }
        }
    }

    /// `fsync`: send what can go as chunks now and wait for it; report a failed chunk.
    pub async fn sync(&mut self) -> PushResult<()> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if !self.skip {
            self.pump().await?;
            self.wait_inflight().await?;
        }
        Ok(())
    }

    /// Commit: the last bytes and PUT `?digest=`. Returns the digest. On failure the session is
    /// cancelled.
    pub async fn finish(&mut self) -> PushResult<String> {
        let result = self.finish_inner().await;
        if result.is_err() {
            self.abort().await;
        }
        result
    }

    async fn finish_inner(&mut self) -> PushResult<String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.wait_inflight().await?;
        let digest = self.hasher.clone().finish();
        if let Some(exp) = &self.expected {
            if *exp != digest {
                let e = PushError::DigestMismatch {
                    repo: self.repo.clone(),
                    expected: exp.clone(),
                    actual: digest,
                };
                return Err(self.fail(e));
            }
        }
        if self.skip {
            return Ok(digest);
        }
        if self.session.is_none() {
            // Everything fits in one request: skip it if the registry already has the blob.
            if self.reg.blob_size(&self.repo, &digest).await.is_ok() {
                self.buf.clear();
                return Ok(digest);
            }
            match self.reg.upload_start(&self.repo).await {
                Ok(s) => self.session = Some(s),
                Err(e) => {
                    let e = push_error(&self.repo, e);
                    return Err(self.fail(e));
                }
            }
        }
        let session = self.session.clone().expect("session exists");
        let last = self.buf.split().freeze();
        match self
            .reg
            .upload_finish(&self.repo, session, &digest, last)
            .await
        {
            Ok(()) => {
                self.session = None;
                Ok(digest)
            }
            Err(e) => {
                let e = push_error(&self.repo, e);
                Err(self.fail(e))
            }
        }
    }

    /// Cancel the upload session, if one is open.
    pub async fn abort(&mut self) {
        if let Some(h) = self.inflight.take() {
            if let Ok((s, _)) = h.await {
                self.session = Some(s);
            }
        }
        if let Some(s) = self.session.take() {
            self.reg.upload_cancel(&self.repo, s).await;
        }
        self.buf = BytesMut::new();
    }
}

/// A manifest being written: kept whole (manifests are small), pushed at commit.
pub struct ManifestWrite {
    pub repo: String,
    pub tag: String,
    pub buf: Vec<u8>,
}

/// Registries refuse manifests above 4 MiB.
pub const MAX_MANIFEST: usize = 4 << 20;

impl ManifestWrite {
    pub fn write(&mut self, offset: u64, data: &[u8]) -> PushResult<u32> {
        if offset != self.buf.len() as u64 {
            return Err(PushError::OutOfOrder {
                offset,
                expected: self.buf.len() as u64,
            });
        }
        if self.buf.len() + data.len() > MAX_MANIFEST {
            return Err(PushError::ManifestTooLarge);
        }
        self.buf.extend_from_slice(data);
        Ok(data.len() as u32)
    }
}

/// The Content-Type to PUT a manifest body with: [`crate::manifest::media_type_of`].
pub fn manifest_content_type(body: &[u8]) -> PushResult<String> {
    crate::manifest::media_type_of(body).map_err(|e| PushError::NotJson(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::sha256_digest;
    use crate::registry::fake::FakeRegistry;
    use crate::registry::faulty::{Fault, FaultError, FaultyRegistry, Op};

    const CHUNK: u64 = 4096;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn upload(reg: &Arc<FakeRegistry>, expected: Option<String>, skip: bool) -> BlobUpload {
        BlobUpload::new(reg.clone(), "app", CHUNK, expected, skip)
    }

    /// Write `d` in pieces of `piece` bytes.
    async fn write_all(up: &mut BlobUpload, d: &[u8], piece: usize) -> PushResult<()> {
        let mut off = 0;
        for p in d.chunks(piece) {
            assert_eq!(up.write(off, p).await? as usize, p.len());
            off += p.len() as u64;
        }
        Ok(())
    }

    #[tokio::test]
    async fn full_chunks_go_as_patches_and_the_rest_with_the_put() {
        let reg = Arc::new(FakeRegistry::new());
        let mut up = upload(&reg, None, false);
        let d = data(2 * CHUNK as usize + 3);
        write_all(&mut up, &d, 1000).await.unwrap();
        assert_eq!(up.written(), d.len() as u64);
        let digest = up.finish().await.unwrap();
        assert_eq!(digest, sha256_digest(&d));
        assert!(reg.has_blob("app", &digest));
        let s = reg.stats().snapshot();
        assert_eq!(s.upload_starts, 1);
        assert_eq!(s.upload_patches, 2);
        assert_eq!(s.upload_bytes, d.len() as u64);
        assert_eq!(reg.open_uploads(), 0);
    }

    #[tokio::test]
    async fn sync_sends_the_full_chunks_only() {
        let reg = Arc::new(FakeRegistry::new());
        let mut up = upload(&reg, None, false);
        write_all(&mut up, &data(CHUNK as usize + 10), 512)
            .await
            .unwrap();
        up.sync().await.unwrap();
        let s = reg.stats().snapshot();
        assert_eq!((s.upload_patches, s.upload_bytes), (1, CHUNK));
        assert_eq!(reg.open_uploads(), 1);
        up.abort().await;
        assert_eq!(reg.open_uploads(), 0);
    }

    #[tokio::test]
    async fn a_small_blob_is_one_post_and_put_or_nothing_when_present() {
        let reg = Arc::new(FakeRegistry::new());
        let d = data(100);
        let mut up = upload(&reg, None, false);
        write_all(&mut up, &d, 100).await.unwrap();
        assert_eq!(up.finish().await.unwrap(), sha256_digest(&d));
        let s = reg.stats().snapshot();
        assert_eq!((s.upload_starts, s.upload_patches), (1, 0));
        // The same bytes again: the HEAD finds them, nothing is sent.
        let mut up = upload(&reg, None, false);
        write_all(&mut up, &d, 100).await.unwrap();
        assert_eq!(up.finish().await.unwrap(), sha256_digest(&d));
        assert_eq!(reg.stats().snapshot().upload_starts, 1);
    }

    #[tokio::test]
    async fn an_out_of_order_write_poisons_the_upload() {
        let reg = Arc::new(FakeRegistry::new());
        let mut up = upload(&reg, None, false);
        up.write(0, b"abc").await.unwrap();
        assert!(matches!(
            up.write(0, b"x").await,
            Err(PushError::OutOfOrder {
                offset: 0,
                expected: 3
            })
        ));
        // The right offset now is refused too, and nothing is committed.
        assert!(matches!(
            up.write(3, b"d").await,
            Err(PushError::OutOfOrder { .. })
        ));
        assert!(up.finish().await.is_err());
        assert!(!reg.has_blob("app", &sha256_digest(b"abc")));
        assert_eq!(reg.stats().snapshot().upload_starts, 0);
    }

    #[tokio::test]
    async fn content_must_hash_to_the_expected_digest() {
        let reg = Arc::new(FakeRegistry::new());
        let d = data(3 * CHUNK as usize);
        let wrong = sha256_digest(b"other");
        let mut up = upload(&reg, Some(wrong.clone()), false);
        write_all(&mut up, &d, 1000).await.unwrap();
        match up.finish().await {
            Err(PushError::DigestMismatch {
                expected, actual, ..
            }) => {
                assert_eq!(expected, wrong);
                assert_eq!(actual, sha256_digest(&d));
            }
            other => panic!("{other:?}"),
        }
        assert!(!reg.has_blob("app", &sha256_digest(&d)));
        assert_eq!(reg.open_uploads(), 0, "the session was cancelled");
        // The right name, and the registry has it already: checked, nothing sent.
        reg.add_blob("app", d.clone());
        let before = reg.stats().snapshot();
        let mut up = upload(&reg, Some(sha256_digest(&d)), true);
        write_all(&mut up, &d, 1000).await.unwrap();
        up.sync().await.unwrap();
        assert_eq!(up.finish().await.unwrap(), sha256_digest(&d));
        assert_eq!(reg.stats().snapshot(), before);
    }

    #[tokio::test]
    async fn a_failed_chunk_poisons_the_upload_and_cancels_it() {
        let fake = Arc::new(FakeRegistry::new());
        let faults = Arc::new(FaultyRegistry::new(fake.clone()));
        faults.inject(Op::UploadPatch, Fault::Error(FaultError::Server));
        let mut up = BlobUpload::new(faults.clone(), "app", CHUNK, None, false);
        let d = data(2 * CHUNK as usize);
        // The first PATCH runs in the background; its failure shows at the next wait.
        let first = write_all(&mut up, &d, CHUNK as usize).await;
        let e = match first {
            Err(e) => e,
            Ok(()) => up.sync().await.unwrap_err(),
        };
        assert!(matches!(e, PushError::Registry { .. }), "{e}");
        // Every later call returns the first failure.
        assert!(matches!(
            up.write(up.written(), b"x").await,
            Err(PushError::Registry { .. })
        ));
        assert!(matches!(up.finish().await, Err(PushError::Registry { .. })));
        assert_eq!(fake.open_uploads(), 0);
        assert!(fake.stats().snapshot().upload_cancels >= 1);
    }

    #[test]
    fn manifest_writes_are_sequential_and_bounded() {
        let mut m = ManifestWrite {
            repo: "app".into(),
            tag: "v1".into(),
            buf: Vec::new(),
        };
        m.write(0, b"{}").unwrap();
        assert!(matches!(
            m.write(1, b"x"),
            Err(PushError::OutOfOrder {
                offset: 1,
                expected: 2
            })
        ));
        assert!(matches!(
            m.write(2, &vec![b' '; MAX_MANIFEST]),
            Err(PushError::ManifestTooLarge)
        ));
        assert!(matches!(
            manifest_content_type(b"{nope"),
            Err(PushError::NotJson(_))
        ));
        assert_eq!(
            manifest_content_type(br#"{"manifests":[]}"#).unwrap(),
            crate::manifest::OCI_INDEX
        );
    }
}
