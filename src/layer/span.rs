//! The uncompressed stream of a gzip or zstd layer in chunk-sized spans: [`SpanTee`] records the
//! stream while it is indexed (spans into the chunk cache, the sha256 of the whole stream for the
//! diff_id check, and the sha256 of each span), and [`check_span`] binds a span inflated again
//! later (from a checkpoint or frame start, where the gzip CRC cannot be checked) to the digest
//! recorded in the verified pass.
//!
//! Spans are inserted into the cache while the pass runs, and published (with their digests and
//! the restart points before them) to the layer's [`Progress`]: a read of a file found early
//! (progressive indexing) is served from them before the pass has checked the whole stream
//! against the diff_id. A pass that fails (diff_id mismatch, corrupt or truncated stream) evicts
//! the layer's entries from the cache before it returns, and every later read of the layer
//! fails: no span of a failed pass is served after the failure is known.

use std::io::Read;
use std::sync::Arc;

use bytes::BytesMut;
use sha2::{Digest as _, Sha256};

use super::progress::{Progress, Restarts};
use super::LayerIndex;
use crate::cache::{ChunkCache, ChunkKey};
use crate::digest::Digest;

/// Check span `index` of a layer's uncompressed stream against the digest the indexing pass
/// recorded. An index without span digests (built from a TOC) has nothing to check against.
pub fn check_span(idx: &LayerIndex, index: u64, data: &[u8]) -> std::io::Result<()> {
    if idx.span_digests.is_empty() {
        return Ok(());
    }
    let want = usize::try_from(index)
        .ok()
        .and_then(|i| idx.span_digests.get(i));
    let ok = match want {
        Some(want) => Sha256::digest(data).as_slice() == want,
        // Past the recorded stream: only an empty span is right.
        None => data.is_empty(),
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "span {index} of the uncompressed stream differs from the one checked when \
                 the layer was indexed"
            ),
        ))
    }
}

/// Passes an uncompressed stream through, storing it in the cache in chunk-sized spans, and
/// hashing it (the layer's diff_id) and each span.
pub struct SpanTee {
    cache: Arc<ChunkCache>,
    digest: Digest,
    span: u64,
    buf: BytesMut,
    index: u64,
    hasher: crate::digest::StreamingDigest,
    /// Digests of spans finished since the last publication.
    pending: Vec<[u8; 32]>,
    progress: Arc<Progress>,
}

/// A reader whose output a [`SpanTee`] records.
struct Teed<'a, R> {
    inner: R,
    tee: &'a mut SpanTee,
}

impl SpanTee {
    pub fn new(cache: Arc<ChunkCache>, digest: Digest, span: u64, progress: Arc<Progress>) -> Self {
        SpanTee {
            cache,
            digest,
            span: span.max(1),
            buf: BytesMut::new(),
            index: 0,
            hasher: Default::default(),
            pending: Vec::new(),
            progress,
        }
    }

    /// Index the stream `inner`, read it to its end, and check it against `diff_id`.
    /// Returns the index (with its span digests and the diff_id it was checked against) and
    /// the inner reader. On any error the spans cached so far are evicted.
    pub fn index<R: Read + Restarts>(
        mut self,
        inner: R,
        diff_id: Option<String>,
    ) -> std::io::Result<(LayerIndex, R)> {
        let (cache, digest) = (self.cache.clone(), self.digest.clone());
        let result = self.pass(inner, diff_id);
        if result.is_err() {
            cache.evict_digest(digest.as_str());
        }
        result
    }

    fn pass<R: Read + Restarts>(
        &mut self,
        inner: R,
        diff_id: Option<String>,
    ) -> std::io::Result<(LayerIndex, R)> {
        let progress = self.progress.clone();
        let mut teed = Teed { inner, tee: self };
        {
            let mut archive = ::tar::Archive::new(&mut teed);
            LayerIndex::scan(archive.entries()?, |e| progress.add(e))?;
        }
        std::io::copy(&mut teed, &mut std::io::sink())?;
        teed.publish();
        let inner = teed.inner;
        let actual = std::mem::take(&mut self.hasher).finish();
        match &diff_id {
            Some(want) if *want != actual => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "uncompressed content hashes to {actual}, not to the config's diff_id \
                         {want}; its spans were dropped from the cache"
                    ),
                ))
            }
            _ => {}
        }
        // What the stream hashes to, whether or not the config named it: a later image that
        // shares this layer is checked against it (`Layers::index`).
        let mut idx = progress.take_partial();
        idx.finish();
        idx.diff_id = Some(actual);
        idx.span_size = self.span;
        idx.layer = self.digest.to_string();
        Ok((idx, inner))
    }

    fn flush_span(&mut self) {
        if !self.buf.is_empty() {
            let data = std::mem::take(&mut self.buf).freeze();
            self.pending.push(Sha256::digest(&data).into());
            self.cache.insert(
                ChunkKey::Span {
                    digest: self.digest.clone(),
                    index: self.index,
                },
                data,
            );
            self.index += 1;
        }
    }

    fn record(&mut self, data: &[u8]) {
        self.hasher.update(data);
        let mut rest = data;
        while !rest.is_empty() {
            let room = (self.span as usize).saturating_sub(self.buf.len());
            let take = room.min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() as u64 >= self.span {
                self.flush_span();
            }
        }
    }
}

impl<R: Restarts> Teed<'_, R> {
    /// Publish the spans finished so far, with the restart points recorded before them.
    fn publish(&mut self) {
        self.tee
            .progress
            .spans(&mut self.tee.pending, Some(&self.inner));
    }
}

impl<R: Read + Restarts> Read for Teed<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(out)?;
        self.tee.record(&out[..n]);
        if n == 0 {
            self.tee.flush_span();
        }
        if !self.tee.pending.is_empty() {
            self.publish();
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::tar::tar_of;

    impl Restarts for &[u8] {
        fn restarts_into(&self, _: &mut LayerIndex) {}
    }

    fn tee_index(
        stream: &[u8],
        diff_id: Option<String>,
    ) -> (Arc<ChunkCache>, std::io::Result<LayerIndex>) {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let d = Digest::from(format!("sha256:{}", "1".repeat(64)));
        let r = SpanTee::new(cache.clone(), d, 512, Default::default())
            .index(stream, diff_id)
            .map(|(idx, _)| idx);
        (cache, r)
    }

    #[test]
    fn spans_are_recorded_checked_and_dropped_on_a_failed_pass() {
        let t = tar_of(&[("a", ::tar::EntryType::Regular, &[7u8; 3000], None)]);
        let want = crate::digest::sha256_digest(&t);
        let (cache, idx) = tee_index(&t, Some(want.clone()));
        let idx = idx.unwrap();
        assert_eq!(idx.diff_id.as_deref(), Some(want.as_str()));
        assert_eq!(idx.span_digests.len(), t.len().div_ceil(512));
        assert_eq!(cache.len(), idx.span_digests.len());
        for (i, span) in t.chunks(512).enumerate() {
            check_span(&idx, i as u64, span).unwrap();
        }
        // A span that differs from the one the checked pass saw is refused.
        let mut bad = t[..512].to_vec();
        bad[100] ^= 1;
        assert!(check_span(&idx, 0, &bad).is_err());
        assert!(check_span(&idx, 1000, b"past the end").is_err());
        check_span(&idx, 1000, b"").unwrap();
        // A diff_id mismatch: an error, and none of the pass's spans stays cached.
        let (cache, r) = tee_index(&t, Some(format!("sha256:{}", "0".repeat(64))));
        assert!(r.is_err());
        assert_eq!(cache.len(), 0, "spans of a failed pass are evicted");
    }
}
