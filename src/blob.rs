//! The one blob read path: a byte range -> the chunks that cover it -> the chunk cache -> Range
//! requests to the registry, with readahead on sequential reads. Verification lives here too:
//! a blob that fits in one chunk is checked before it is cached, and a handle that reads a larger
//! blob from start to end checks the whole against its digest ([`Verifier`]).
//!
//! Layer readers use the same path, blocking, through [`BlobCursor`].

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use crate::cache::{ChunkCache, ChunkKey};
use crate::digest::{Digest, StreamingDigest};
use crate::disk::{BlockKey, DiskCache, MapCheck}; // disk tier
use crate::error::{RegistryError, RegistryResult};
use crate::registry::Registry;

/// Out-of-order read data one handle keeps while waiting for the gap, for digest verification.
/// Past this the handle gives up verifying (the data was read too far out of order). Stashed
/// pieces are copied out of their chunks, so this is what the stash really holds.
const MAX_PENDING_VERIFY: usize = 16 << 20;

/// A read that starts this far or farther past the verified prefix is not the kernel's readahead
/// arriving out of order (1 MiB requests, a dozen in flight) but random access: the handle gives
/// up verifying at once rather than stash data it would never hash.
const VERIFY_WINDOW: u64 = 16 << 20;

/// Out-of-order data all handles together may stash. 16 threads reading at random would
/// otherwise hold 16 stashes; past this a handle gives up verifying (see [`VerifyBudget`]).
pub const MAX_PENDING_VERIFY_TOTAL: usize = 32 << 20;

/// What [`gather`] reserves up front at most; a longer range grows as it fills (its length may
/// come from an untrusted descriptor).
const MAX_GATHER_RESERVE: u64 = 16 << 20;

/// One piece of a range cut at fixed-size chunk boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    /// Chunk number.
    pub index: u64,
    /// The piece's bounds inside the chunk.
    pub from: usize,
    pub to: usize,
}

/// The chunks of `chunk` bytes that cover bytes `offset..end` (empty if the range is).
pub fn chunk_spans(offset: u64, end: u64, chunk: u64) -> impl Iterator<Item = ChunkSpan> {
    let (first, last) = if end > offset && chunk > 0 {
        (offset / chunk, (end - 1) / chunk + 1)
    } else {
        (0, 0)
    };
    (first..last).map(move |index| {
        let start = index * chunk;
        ChunkSpan {
            index,
            from: (offset.max(start) - start) as usize,
            to: (end.min(start + chunk) - start) as usize,
        }
    })
}

/// Bytes `offset..end` assembled from fixed-size chunks got by `get`. A chunk shorter than its
/// span is `short(index)`'s error. One chunk is returned as a slice of it, without a copy.
pub async fn gather<E, F, Fut>(
    offset: u64,
    end: u64,
    chunk: u64,
    mut get: F,
    short: impl Fn(u64) -> E,
) -> Result<Bytes, E>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<Bytes, E>>,
{
    let spans: Vec<ChunkSpan> = chunk_spans(offset, end, chunk).collect();
    let mut out = BytesMut::new();
    for s in &spans {
        let data = get(s.index).await?;
        if data.len() < s.to {
            return Err(short(s.index));
        }
        if spans.len() == 1 {
            return Ok(data.slice(s.from..s.to));
        }
        if out.is_empty() {
            // Sizes can come from a descriptor: never reserve more than a bounded guess.
            out.reserve((end - offset).min(MAX_GATHER_RESERVE) as usize);
        }
        out.extend_from_slice(&data[s.from..s.to]);
    }
    Ok(out.freeze())
}

/// A blob as a reader needs it: where it lives, what it is, how big it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub repo: String,
    pub digest: Digest,
    pub size: u64,
}

/// Blob bytes through the chunk cache, and what has been verified.
pub struct Blobs {
    reg: Arc<dyn Registry>,
    cache: Arc<ChunkCache>,
    chunk_size: u64,
    readahead_chunks: u64,
    /// Blob digests whose whole content has been checked.
    verified: Mutex<HashSet<Digest>>,
    /// What every handle's verifier stashes, together.
    budget: Arc<VerifyBudget>,
    /// The blocks kept in --cache-dir across mounts, and the chunk maps. // disk tier
    disk: Option<Arc<DiskCache>>,
}

impl Blobs {
    pub fn new(
        reg: Arc<dyn Registry>,
        cache: Arc<ChunkCache>,
        chunk_size: u64,
        readahead_chunks: u64,
    ) -> Self {
        Blobs {
            reg,
            cache,
            chunk_size,
            readahead_chunks,
            verified: Mutex::new(HashSet::new()),
            budget: Arc::new(VerifyBudget::new(MAX_PENDING_VERIFY_TOTAL)),
            disk: None,
        }
    }

    /// Use a disk tier under the memory cache. // disk tier
    pub fn with_disk(mut self, disk: Option<Arc<DiskCache>>) -> Self {
        self.disk = disk;
        self
    }

    /// The disk tier, if the mount has one. // disk tier
    pub fn disk(&self) -> Option<&Arc<DiskCache>> {
        self.disk.as_ref()
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// Chunk `index` of a blob: cached, in flight, or fetched now.
    pub async fn chunk(&self, blob: &BlobRef, index: u64) -> RegistryResult<Bytes> {
        let key = ChunkKey::Blob {
            digest: blob.digest.clone(),
            size: blob.size,
            index,
        };
        self.cache
            .get_or_fetch(key, || {
                // disk tier
                fetch_block(
                    self.reg.clone(),
                    self.disk.clone(),
                    blob.clone(),
                    index,
                    self.chunk_size,
                )
            })
            .await
    }

    /// Bytes `offset..end` of a blob. A sequential read also starts fetching the next
    /// `--readahead-chunks` chunks in the background.
    pub async fn read(
        &self,
        blob: &BlobRef,
        offset: u64,
        end: u64,
        sequential: bool,
    ) -> RegistryResult<Bytes> {
        let cs = self.chunk_size;
        let last = end.saturating_sub(1) / cs;
        if sequential && self.readahead_chunks > 0 && last >= 1 {
            let total = blob.size.div_ceil(cs);
            for index in (last + 1)..(last + 1 + self.readahead_chunks).min(total) {
                let key = ChunkKey::Blob {
                    digest: blob.digest.clone(),
                    size: blob.size,
                    index,
                };
                if self.cache.get(&key).is_some() {
                    continue;
                }
                let (reg, cache, blob) = (self.reg.clone(), self.cache.clone(), blob.clone());
                let disk = self.disk.clone(); // disk tier
                tokio::spawn(async move {
                    let _ = cache
                        .get_or_fetch(key, || fetch_block(reg, disk, blob, index, cs))
                        .await;
                });
            }
        }
        gather(
            offset,
            end,
            cs,
            |index| self.chunk(blob, index),
            |index| {
                RegistryError::Protocol(format!(
                    "{}@{}: chunk {index} is shorter than the blob's size says",
                    blob.repo, blob.digest
                ))
            },
        )
        .await
    }

    /// A blocking `Read + Seek` over a blob for the layer readers (run it on a blocking thread).
    pub fn cursor(self: &Arc<Self>, blob: BlobRef) -> BlobCursor {
        BlobCursor {
            rt: tokio::runtime::Handle::current(),
            blobs: self.clone(),
            blob,
            pos: 0,
            cur: Bytes::new(),
            cur_start: 0,
        }
    }

    pub fn is_verified(&self, digest: &Digest) -> bool {
        crate::sync::lock(&self.verified).contains(digest)
    }

    /// A verifier for a handle reading `blob`, when one is needed: blobs of one chunk are
    /// verified as they are fetched, and only sha256 can be checked.
    pub fn verifier(&self, blob: &BlobRef) -> Option<Verifier> {
        (blob.size > self.chunk_size && blob.digest.is_sha256()).then(|| {
            let v = Verifier::new(blob.digest.clone(), blob.size, self.budget.clone());
            // disk tier: also hash each block, for the chunk map recorded when verified.
            match self.disk {
                Some(_) => v.with_block_sums(self.chunk_size),
                None => v,
            }
        })
    }

    /// A whole document (a config) of at most `cap` bytes. A descriptor that says more is an
    /// error before anything is fetched or allocated; the bytes are checked against the digest
    /// as they always are.
    pub async fn read_whole(&self, blob: &BlobRef, cap: u64) -> RegistryResult<Bytes> {
        if blob.size > cap {
            return Err(RegistryError::Protocol(format!(
                "{}@{}: the descriptor says {} bytes, more than the {cap} bytes allowed for it",
                blob.repo, blob.digest, blob.size
            )));
        }
        let body = self.read(blob, 0, blob.size, false).await?;
        if blob.size > self.chunk_size && blob.digest.is_sha256() {
            crate::digest::verify(blob.digest.as_str(), &body)?;
        }
        Ok(body)
    }

    /// After a handle read `data` at `offset` of `blob`: feed its verifier, and act on the
    /// outcome (mark the blob verified, or drop its cached chunks and fail).
    /// `verifier` is the handle's, locked only inside `feed`. `block_sums` are the verifier's
    /// per-block hashes when it verified the blob ([`Verifier::take_block_sums`]).
    pub fn settle(
        &self,
        blob: &BlobRef,
        outcome: Checked,
        block_sums: Option<Vec<[u8; 32]>>,
    ) -> RegistryResult<()> {
        match outcome {
            Checked::Pending => Ok(()),
            Checked::Verified => {
                crate::sync::lock(&self.verified).insert(blob.digest.clone());
                // disk tier: the blob is proven; its chunk map checks every later fetch.
                if let (Some(disk), Some(sums)) = (&self.disk, block_sums) {
                    disk.record_map(&blob.digest, blob.size, self.chunk_size, sums);
                }
                Ok(())
            }
            Checked::Mismatch(actual) => {
                self.cache.evict_digest(&blob.digest);
                if let Some(disk) = &self.disk {
                    disk.forget(&blob.digest); // disk tier
                }
                Err(RegistryError::DigestMismatch {
                    expected: blob.digest.to_string(),
                    actual: format!("{actual}; cached chunks dropped"),
                })
            }
        }
    }

    /// A blob of one chunk was verified when it was fetched.
    pub fn single_chunk_verified(&self, blob: &BlobRef) -> bool {
        if blob.size <= self.chunk_size {
            crate::sync::lock(&self.verified).insert(blob.digest.clone());
            return true;
        }
        false
    }

    /// Forget a blob's cached bytes (deleted, or found bad).
    pub fn evict(&self, digest: &Digest) {
        self.cache.evict_digest(digest);
        if let Some(disk) = &self.disk {
            disk.forget(digest); // disk tier
        }
    }
}

/// disk tier: chunk `index` of a blob from the disk tier, else from the registry. A block from
/// the registry is checked against the blob's verified chunk map (a mismatch is an error, never
/// cached, never served), then stored on disk. A one-chunk blob, verified as it is fetched, gets
/// its chunk map at once.
async fn fetch_block(
    reg: Arc<dyn Registry>,
    disk: Option<Arc<DiskCache>>,
    blob: BlobRef,
    index: u64,
    chunk_size: u64,
) -> RegistryResult<Bytes> {
    let Some(disk) = disk else {
        return fetch_chunk(reg, blob, index, chunk_size).await;
    };
    let key = BlockKey {
        digest: blob.digest.clone(),
        blob_size: blob.size,
        block_size: chunk_size,
        index,
    };
    if let Some(data) = disk.get(&key) {
        return Ok(data);
    }
    let data = fetch_chunk(reg, blob.clone(), index, chunk_size).await?;
    if blob.size <= chunk_size && blob.digest.is_sha256() {
        let sum = crate::disk::block_sha256(&data);
        disk.record_map(&blob.digest, blob.size, chunk_size, vec![sum]);
    }
    if disk.check(&key, &data) == MapCheck::Mismatch {
        return Err(RegistryError::DigestMismatch {
            expected: format!(
                "{} block {index} as its verified chunk map says",
                blob.digest
            ),
            actual: crate::digest::sha256_digest(&data),
        });
    }
    disk.put(&key, data.clone());
    Ok(data)
}

/// Fetch chunk `index` of a blob with one closed Range request. A blob that fits in one chunk is
/// verified against its digest before it can be cached.
async fn fetch_chunk(
    reg: Arc<dyn Registry>,
    blob: BlobRef,
    index: u64,
    chunk_size: u64,
) -> RegistryResult<Bytes> {
    let start = index * chunk_size;
    if start >= blob.size {
        return Err(RegistryError::Protocol(format!(
            "{}@{}: chunk {index} is past the end ({} bytes)",
            blob.repo, blob.digest, blob.size
        )));
    }
    let end = (start + chunk_size).min(blob.size) - 1;
    let data = reg.blob_range(&blob.repo, &blob.digest, start, end).await?;
    if data.len() as u64 != end - start + 1 {
        return Err(RegistryError::Protocol(format!(
            "{}@{}: asked for bytes {start}-{end}, got {} bytes",
            blob.repo,
            blob.digest,
            data.len()
        )));
    }
    if start == 0 && end + 1 == blob.size && blob.digest.is_sha256() {
        crate::digest::verify(&blob.digest, &data)?;
    }
    Ok(data)
}

/// What feeding a verifier found.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    /// Not at the end yet (or not verifying any more).
    Pending,
    /// This read completed a successful check.
    Verified,
    /// The whole blob hashes to this other digest.
    Mismatch(String),
}

/// The stash memory shared by every handle's [`Verifier`].
pub struct VerifyBudget {
    used: std::sync::atomic::AtomicUsize,
    cap: usize,
}

impl VerifyBudget {
    pub fn new(cap: usize) -> Self {
        VerifyBudget {
            used: Default::default(),
            cap,
        }
    }

    /// Take `n` bytes, or false when that would pass the cap.
    fn take(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let prev = self.used.fetch_add(n, SeqCst);
        if prev.saturating_add(n) > self.cap {
            self.used.fetch_sub(n, SeqCst);
            return false;
        }
        true
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Bytes stashed now, by all handles.
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Digest verification of a blob read by one handle from start to end.
///
/// Reads that arrive out of order (the kernel's readahead runs requests in parallel) are
/// stashed until the gap fills. Stashed pieces are copied out of their chunk (a slice would pin
/// the whole chunk behind it), and the stash is bounded three ways: a piece that starts
/// [`VERIFY_WINDOW`] or more past the verified prefix, a handle stash past
/// [`MAX_PENDING_VERIFY`], or all stashes together past the shared [`VerifyBudget`] make the
/// handle give up verifying (its reads are then served unverified, as any out-of-order read is).
pub struct Verifier {
    digest: Digest,
    size: u64,
    hasher: StreamingDigest,
    pending: BTreeMap<u64, Bytes>,
    pending_bytes: usize,
    budget: Arc<VerifyBudget>,
    /// Gave up (data too far out of order) or already finished.
    done: bool,
    /// The blob failed verification: every later read through this handle fails too, so a
    /// kernel retry of a failed readahead cannot slip the bad bytes through.
    failed: Option<String>,
    /// disk tier: the sha256 of each block as the stream passes.
    blocks: Option<BlockSums>,
}

/// disk tier: sha256 of each `size`-byte block of a stream, in order.
struct BlockSums {
    size: u64,
    current: sha2::Sha256,
    filled: u64,
    done: Vec<[u8; 32]>,
}

impl BlockSums {
    fn update(&mut self, mut data: &[u8]) {
        use sha2::Digest as _;
        while !data.is_empty() {
            let room = (self.size - self.filled).min(data.len() as u64) as usize;
            self.current.update(&data[..room]);
            self.filled += room as u64;
            data = &data[room..];
            if self.filled == self.size {
                self.finish_block();
            }
        }
    }

    fn finish_block(&mut self) {
        use sha2::Digest as _;
        let h = std::mem::take(&mut self.current).finalize();
        self.done.push(h.into());
        self.filled = 0;
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.budget.give(self.pending_bytes);
    }
}

impl Verifier {
    pub fn new(digest: Digest, size: u64, budget: Arc<VerifyBudget>) -> Self {
        Verifier {
            digest,
            size,
            hasher: StreamingDigest::default(),
            pending: BTreeMap::new(),
            pending_bytes: 0,
            budget,
            done: false,
            failed: None,
            blocks: None,
        }
    }

    /// disk tier: also hash each `block_size` piece (see [`Verifier::take_block_sums`]).
    pub fn with_block_sums(mut self, block_size: u64) -> Self {
        self.blocks = (block_size > 0).then(|| BlockSums {
            size: block_size,
            current: Default::default(),
            filled: 0,
            done: Vec::new(),
        });
        self
    }

    /// disk tier: once the blob verified, the sha256 of each of its blocks.
    pub fn take_block_sums(&mut self) -> Option<Vec<[u8; 32]>> {
        // Only a verified stream keeps its sums (giving up or a mismatch drops them).
        if !self.done {
            return None;
        }
        let mut b = self.blocks.take()?;
        if b.filled > 0 {
            b.finish_block();
        }
        Some(b.done)
    }

    /// Hash the next contiguous bytes of the stream.
    fn absorb(&mut self, data: &[u8]) {
        self.hasher.update(data);
        if let Some(b) = &mut self.blocks {
            b.update(data); // disk tier
        }
    }

    /// The digest the blob was found to have, if it failed.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Stop verifying and free the stash.
    fn give_up(&mut self) -> Checked {
        self.done = true;
        self.blocks = None;
        self.pending.clear();
        self.budget.give(self.pending_bytes);
        self.pending_bytes = 0;
        Checked::Pending
    }

    /// Feed data read at `offset`.
    pub fn feed(&mut self, offset: u64, data: &Bytes) -> Checked {
        if self.done {
            return Checked::Pending;
        }
        let next = self.hasher.bytes;
        let end = offset.saturating_add(data.len() as u64);
        if offset > next {
            if offset - next >= VERIFY_WINDOW
                || self.pending_bytes.saturating_add(data.len()) > MAX_PENDING_VERIFY
                || !self.budget.take(data.len())
            {
                return self.give_up();
            }
            self.pending_bytes += data.len();
            // A copy: a slice would keep its whole chunk alive while it waits here.
            self.pending
                .insert(offset, Bytes::copy_from_slice(data))
                .inspect(|old| {
                    self.pending_bytes -= old.len();
                    self.budget.give(old.len());
                });
            return Checked::Pending;
        }
        if end > next {
            self.absorb(&data[(next - offset) as usize..]);
        }
        // Drain stashed pieces that are now contiguous.
        while let Some((&off, _)) = self.pending.first_key_value() {
            let next = self.hasher.bytes;
            if off > next {
                break;
            }
            let Some((_, piece)) = self.pending.pop_first() else {
                break;
            };
            self.pending_bytes -= piece.len();
            self.budget.give(piece.len());
            let pend = off + piece.len() as u64;
            if pend > next {
                self.absorb(&piece[(next - off) as usize..]);
            }
        }
        if self.hasher.bytes >= self.size {
            self.done = true;
            let actual = std::mem::take(&mut self.hasher).finish();
            if actual != self.digest.as_str() {
                self.blocks = None;
                self.failed = Some(actual.clone());
                return Checked::Mismatch(actual);
            }
            return Checked::Verified;
        }
        Checked::Pending
    }
}

/// A blocking `Read + Seek` over a blob, chunk by chunk through the cache. Runs on a blocking
/// thread and waits on the runtime for each chunk.
pub struct BlobCursor {
    rt: tokio::runtime::Handle,
    blobs: Arc<Blobs>,
    blob: BlobRef,
    pos: u64,
    cur: Bytes,
    cur_start: u64,
}

impl Read for BlobCursor {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.blob.size || buf.is_empty() {
            return Ok(0);
        }
        let in_cur =
            self.pos >= self.cur_start && self.pos < self.cur_start + self.cur.len() as u64;
        if !in_cur {
            let index = self.pos / self.blobs.chunk_size;
            self.cur = self
                .rt
                .block_on(self.blobs.chunk(&self.blob, index))
                .map_err(std::io::Error::other)?;
            self.cur_start = index * self.blobs.chunk_size;
            if self.pos >= self.cur_start + self.cur.len() as u64 {
                return Err(std::io::Error::other(format!(
                    "{}: chunk {index} is shorter than the blob's size says",
                    self.blob.digest
                )));
            }
        }
        let from = (self.pos - self.cur_start) as usize;
        let n = buf.len().min(self.cur.len() - from);
        buf[..n].copy_from_slice(&self.cur[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for BlobCursor {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => i128::from(p),
            SeekFrom::Current(d) => i128::from(self.pos) + i128::from(d),
            SeekFrom::End(d) => i128::from(self.blob.size) + i128::from(d),
        };
        self.pos = u64::try_from(new).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek out of range")
        })?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(o: u64, e: u64, c: u64) -> Vec<(u64, usize, usize)> {
        chunk_spans(o, e, c)
            .map(|s| (s.index, s.from, s.to))
            .collect()
    }

    #[test]
    fn ranges_cut_at_chunk_boundaries() {
        assert_eq!(spans(0, 10, 4), [(0, 0, 4), (1, 0, 4), (2, 0, 2)]);
        assert_eq!(spans(5, 6, 4), [(1, 1, 2)]);
        assert_eq!(spans(4, 8, 4), [(1, 0, 4)]);
        assert!(spans(3, 3, 4).is_empty());
        assert!(spans(3, 2, 4).is_empty());
    }

    #[tokio::test]
    async fn gather_slices_one_chunk_and_joins_several() {
        let data: Vec<u8> = (0..20).collect();
        let get = |i: u64| {
            let d = Bytes::copy_from_slice(&data[(i as usize * 8)..((i as usize + 1) * 8).min(20)]);
            async move { Ok::<_, String>(d) }
        };
        let one = gather(9, 12, 8, get, |_| "short".to_string())
            .await
            .unwrap();
        assert_eq!(&one[..], &data[9..12]);
        let many = gather(3, 20, 8, get, |_| "short".to_string())
            .await
            .unwrap();
        assert_eq!(&many[..], &data[3..20]);
        let short = gather(0, 30, 8, get, |i| format!("short {i}")).await;
        assert_eq!(short.unwrap_err(), "short 2");
    }

    fn blob(data: &[u8]) -> (Digest, Vec<Bytes>) {
        let d = Digest::from(crate::digest::sha256_digest(data));
        (d, data.chunks(4).map(Bytes::copy_from_slice).collect())
    }

    #[test]
    fn verifier_in_order_and_out_of_order() {
        let data = b"0123456789abcdef";
        let (d, parts) = blob(data);
        let mut v = Verifier::new(d.clone(), 16, budget());
        assert_eq!(v.feed(0, &parts[0]), Checked::Pending);
        // Out of order: stashed, then drained when the gap fills.
        assert_eq!(v.feed(8, &parts[2]), Checked::Pending);
        assert_eq!(v.feed(12, &parts[3]), Checked::Pending);
        assert_eq!(v.feed(4, &parts[1]), Checked::Verified);
        // Re-reads after the end change nothing.
        assert_eq!(v.feed(0, &parts[0]), Checked::Pending);
        // Overlapping re-reads are hashed once.
        let mut v = Verifier::new(d, 16, budget());
        v.feed(0, &Bytes::copy_from_slice(&data[..6]));
        v.feed(2, &Bytes::copy_from_slice(&data[2..10]));
        assert_eq!(
            v.feed(10, &Bytes::copy_from_slice(&data[10..])),
            Checked::Verified
        );
    }

    #[test]
    fn verifier_reports_a_mismatch_and_stays_failed() {
        let (d, _) = blob(b"0123456789abcdef");
        let mut v = Verifier::new(d, 16, budget());
        let r = v.feed(0, &Bytes::from_static(b"0123456789abcdeX"));
        assert!(matches!(r, Checked::Mismatch(_)));
        assert!(v.failed().is_some());
    }

    fn budget() -> Arc<VerifyBudget> {
        Arc::new(VerifyBudget::new(MAX_PENDING_VERIFY_TOTAL))
    }

    #[test]
    fn verifier_gives_up_past_its_stash_budget() {
        let (d, _) = blob(b"x");
        let shared = budget();
        let mut v = Verifier::new(d.clone(), u64::MAX, shared.clone());
        let big = Bytes::from(vec![0u8; MAX_PENDING_VERIFY]);
        assert_eq!(v.feed(1, &big), Checked::Pending);
        assert_eq!(shared.used(), MAX_PENDING_VERIFY);
        assert_eq!(
            v.feed(1 + big.len() as u64, &Bytes::from_static(b"y")),
            Checked::Pending
        );
        assert!(v.pending.is_empty(), "the stash is dropped when giving up");
        assert_eq!(shared.used(), 0, "and its budget given back");
        assert_eq!(v.feed(0, &Bytes::from_static(b"z")), Checked::Pending);
        // A read far past the verified prefix is random access: give up at once.
        let mut v = Verifier::new(d, u64::MAX, shared.clone());
        assert_eq!(
            v.feed(VERIFY_WINDOW, &Bytes::from_static(b"far")),
            Checked::Pending
        );
        assert!(v.done && shared.used() == 0);
    }

    #[test]
    fn stashed_pieces_are_copies_and_share_one_budget() {
        let (d, _) = blob(b"x");
        let shared = Arc::new(VerifyBudget::new(10));
        let chunk = Bytes::from(vec![1u8; 4 << 20]);
        let mut a = Verifier::new(d.clone(), u64::MAX, shared.clone());
        a.feed(4096, &chunk.slice(4096..4104)); // 8 bytes of a 4 MiB chunk
        let (_, piece) = a.pending.first_key_value().unwrap();
        assert_ne!(
            piece.as_ptr(),
            chunk[4096..].as_ptr(),
            "a stashed piece does not point into (and pin) its chunk"
        );
        assert_eq!(shared.used(), 8);
        // A second handle cannot stash past the shared cap: it gives up.
        let mut b = Verifier::new(d, u64::MAX, shared.clone());
        b.feed(100, &Bytes::from_static(b"0123"));
        assert!(b.done);
        assert_eq!(shared.used(), 8);
        drop(a);
        assert_eq!(shared.used(), 0, "a dropped handle gives its stash back");
    }
}
