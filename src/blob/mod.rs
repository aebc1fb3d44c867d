//! The one blob read path, as an engine. A byte range becomes blocks of `--chunk-size` (the
//! cache's unit); blocks nobody has become a few large Range requests, started at once on the
//! runtime and streamed block by block into the cache ([`fetch`]), so a reader waits for its own
//! block, not for a whole request. Each reader has a readahead window ([`window`]) that grows
//! while it reads forward and prefetches within a bounded budget of bytes in flight; a random
//! reader asks for its block alone. Whole-blob verification runs beside the reads ([`verify`]).
//!
//! Layer readers use the same path, blocking, through [`BlobCursor`], with their own window.

pub mod fetch;
pub mod memory;
pub mod verify;
pub mod window;

use std::collections::HashSet;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use crate::cache::{ChunkCache, ChunkKey, Claim};
use crate::digest::Digest;
use crate::disk::DiskCache;
use crate::error::{RegistryError, RegistryResult};
use crate::registry::Registry;
use memory::BlockMemory;

pub use verify::{
    Checked, HashFeed, StreamHasher, Verdicts, Verifier, VerifyBudget, MAX_PENDING_VERIFY_TOTAL,
};
pub use window::Readahead;

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
    get: F,
    short: impl Fn(u64) -> E,
) -> Result<Bytes, E>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<Bytes, E>>,
{
    gather_with(
        offset,
        end,
        chunk,
        get,
        short,
        BytesMut::with_capacity,
        BytesMut::freeze,
    )
    .await
}

/// [`gather`], with the buffer for joined pieces from `alloc` and made bytes by `seal` (a
/// recycled one that goes back to its pool, see [`ChunkCache::join_buffer`]).
pub async fn gather_with<E, F, Fut>(
    offset: u64,
    end: u64,
    chunk: u64,
    mut get: F,
    short: impl Fn(u64) -> E,
    alloc: impl FnOnce(usize) -> BytesMut,
    seal: impl FnOnce(BytesMut) -> Bytes,
) -> Result<Bytes, E>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<Bytes, E>>,
{
    let spans: Vec<ChunkSpan> = chunk_spans(offset, end, chunk).collect();
    // Every piece first, the join buffer only then: a reader waiting for its second chunk
    // holds chunks the cache counts, not a join buffer outside the cap (64 random readers
    // waiting on fetches each held one).
    let mut pieces = Vec::with_capacity(spans.len());
    for s in &spans {
        let data = get(s.index).await?;
        if data.len() < s.to {
            return Err(short(s.index));
        }
        pieces.push(data.slice(s.from..s.to));
    }
    match pieces.len() {
        0 => return Ok(Bytes::new()),
        1 => return Ok(pieces.swap_remove(0)),
        _ => {}
    }
    // Sizes can come from a descriptor: never reserve more than a bounded guess.
    let mut out = alloc((end - offset).min(MAX_GATHER_RESERVE) as usize);
    for p in &pieces {
        out.extend_from_slice(p);
    }
    Ok(seal(out))
}

/// A blob as a reader needs it: where it lives, what it is, how big it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub repo: String,
    pub digest: Digest,
    pub size: u64,
}

/// Fetches of one chunk that may be abandoned in a row before a reader gives up: a fetch's task
/// is dropped only when the runtime shuts down, so this never fails a working mount.
const MAX_ABANDONED: u32 = 3;

/// How the engine fetches: block size, request size, readahead and its budget.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// The cache's unit, and the least a cold read fetches.
    pub block_size: u64,
    /// The largest single Range request; a longer run of blocks is split into several requests
    /// that run in parallel.
    pub max_request: u64,
    /// The largest single Range request while the registry is near (its blob answers come
    /// within `near`): fewer, longer requests, since parallel ones gain nothing there.
    pub max_request_near: u64,
    /// How soon blob answers must come for the registry to count as near.
    pub near: std::time::Duration,
    /// The largest readahead window of one reader.
    pub max_window: u64,
    /// Bytes all readers together may have in flight ahead of their reads.
    pub prefetch_budget: u64,
}

impl EngineConfig {
    /// Blocks of `block_size`, one block per request, no readahead (for tests).
    pub fn plain(block_size: u64) -> Self {
        EngineConfig {
            block_size,
            max_request: block_size,
            max_request_near: block_size,
            near: std::time::Duration::ZERO,
            max_window: 0,
            prefetch_budget: 0,
        }
    }
}

/// Blob bytes through the chunk cache, and what has been verified.
pub struct Blobs {
    reg: Arc<dyn Registry>,
    cache: Arc<ChunkCache>,
    cfg: EngineConfig,
    /// Prefetch bytes in flight now, by all readers (see [`EngineConfig::prefetch_budget`]).
    prefetching: Arc<AtomicU64>,
    /// Blob digests whose whole content has been checked.
    verified: Arc<Mutex<HashSet<Digest>>>,
    /// What every handle's verifier stashes, together.
    budget: Arc<VerifyBudget>,
    /// The blocks kept in --cache-dir across mounts, and the chunk maps (the disk tier).
    disk: Option<Arc<DiskCache>>,
    /// Verified chunk maps kept in memory (see [`Blobs::record_map`]).
    maps: Arc<ChunkMaps>,
    /// Slots for fetched blocks, reused (see [`memory`]); `None` if the system refused them.
    memory: Option<Arc<BlockMemory>>,
}

/// Chunk maps in memory: the sha256 of every block of a blob proven whole, checked against
/// every block of it fetched since. Recorded by a plain tar layer's index pass (which reads
/// the whole blob anyway), so its files, read later straight from blob blocks, are checked.
/// At most [`MAX_MEMORY_MAPS`] blobs (32 bytes per MiB each), least recently recorded dropped.
pub(crate) type ChunkMaps = Mutex<lru::LruCache<(Digest, u64, u64), Arc<Vec<[u8; 32]>>>>;

/// Blobs whose chunk maps are kept in memory: 256 maps of 1 GiB blobs at 1 MiB blocks are 8 MiB.
const MAX_MEMORY_MAPS: usize = 256;

impl Blobs {
    /// Use a disk tier under the memory cache.
    pub fn with_disk(mut self, disk: Option<Arc<DiskCache>>) -> Self {
        self.disk = disk;
        self
    }

    /// The cache's unit: what a cold read fetches at least, and where blob reads are split.
    pub fn block_size(&self) -> u64 {
        self.cfg.block_size
    }

    /// The disk tier, if the mount has one.
    pub fn disk(&self) -> Option<&Arc<DiskCache>> {
        self.disk.as_ref()
    }

    pub fn new(reg: Arc<dyn Registry>, cache: Arc<ChunkCache>, cfg: EngineConfig) -> Self {
        // The cap plus a sixteenth: blocks the cache evicted that replies and hashers still hold.
        let room = cache.capacity().saturating_add(cache.capacity() / 16);
        let memory = usize::try_from(cfg.block_size)
            .ok()
            .and_then(|slot| BlockMemory::new(slot, room));
        Blobs {
            memory,
            reg,
            cache,
            cfg,
            prefetching: Arc::new(AtomicU64::new(0)),
            verified: Arc::new(Mutex::new(HashSet::new())),
            budget: Arc::new(VerifyBudget::new(MAX_PENDING_VERIFY_TOTAL)),
            disk: None,
            maps: Arc::new(Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(MAX_MEMORY_MAPS).expect("not zero"),
            ))),
        }
    }

    /// Record a verified chunk map for a blob proven whole (`sums`: the sha256 of each block
    /// of `--chunk-size`): every block of it fetched from now on is checked against it before
    /// anyone sees it; with a disk tier, in later mounts too.
    pub fn record_map(&self, digest: &Digest, size: u64, sums: Vec<[u8; 32]>) {
        let bs = self.cfg.block_size;
        if let Some(disk) = &self.disk {
            disk.record_map(digest, size, bs, sums.clone());
        }
        crate::sync::lock(&self.maps).put((digest.clone(), size, bs), Arc::new(sums));
    }

    /// ctl: the block memory's (slots, held now, ever touched, blocks that found none free),
    /// if the mount has one (see [`memory`]).
    pub fn slot_counts(&self) -> Option<(usize, usize, usize, u64)> {
        self.memory.as_ref().map(|m| m.counts())
    }

    pub fn chunk_size(&self) -> u64 {
        self.cfg.block_size
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// A fresh readahead window for one reader.
    pub fn readahead(&self) -> Readahead {
        Readahead::new(self.cfg.block_size, self.cfg.max_window)
    }

    fn key(blob: &BlobRef, index: u64) -> ChunkKey {
        ChunkKey::Blob {
            digest: blob.digest.clone(),
            size: blob.size,
            index,
        }
    }

    /// Block `index` of a blob: cached, in flight, or fetched now (alone).
    pub async fn chunk(&self, blob: &BlobRef, index: u64) -> RegistryResult<Bytes> {
        // A fetch is abandoned only when its task is dropped: the runtime is shutting down (a
        // blocking layer pass may still be asking). Claiming again then spins, so give up.
        let mut abandoned = 0;
        loop {
            let flight = match self.cache.claim(&Self::key(blob, index)) {
                Claim::Ready(b) => return Ok(b),
                Claim::Wait(f) => f,
                Claim::Fetch(mut f) => {
                    f.reserve(fetch::block_len(blob.size, self.cfg.block_size, index));
                    let flight = f.flight();
                    self.spawn_run(blob, vec![f], false);
                    flight
                }
            };
            match flight.wait().await {
                // Its blob was found bad meanwhile: fetch afresh, after the verdict.
                None if flight.is_poisoned() => {}
                None if abandoned < MAX_ABANDONED => abandoned += 1, // claim again
                None => {
                    return Err(RegistryError::Transport(format!(
                    "{}@{}: chunk {index}: its fetch was dropped {abandoned} times (shutting down)",
                    blob.repo, blob.digest
                )))
                }
                Some(Ok(b)) => return Ok(b),
                Some(Err(e)) => return Err(fetch::registry_error(&e)),
            }
        }
    }

    /// The bytes of one block a read started (or found) earlier.
    async fn wait_slot(
        &self,
        blob: &BlobRef,
        index: u64,
        slot: Option<fetch::Slot>,
    ) -> RegistryResult<Bytes> {
        match slot {
            Some(fetch::Slot::Ready(b)) => Ok(b),
            Some(fetch::Slot::Wait(f)) => match f.wait().await {
                Some(Ok(b)) => Ok(b),
                Some(Err(e)) => Err(fetch::registry_error(&e)),
                None => self.chunk(blob, index).await, // abandoned: claim again
            },
            None => self.chunk(blob, index).await,
        }
    }

    /// Bytes `offset..end` of a blob; `ahead` is a range to prefetch (from the reader's
    /// [`Readahead`]). Blocks of the range that nobody has are fetched together first, then the
    /// prefetch starts, then the read waits for its own blocks only.
    pub async fn read(
        &self,
        blob: &BlobRef,
        offset: u64,
        end: u64,
        ahead: Option<(u64, u64)>,
    ) -> RegistryResult<Bytes> {
        self.read_ahead(blob, offset, end, ahead)
            .await
            .map(|(data, _)| data)
    }

    /// [`Blobs::read`], also saying where the prefetch stopped when the budget held it back
    /// (give it to the reader's [`Readahead::held_back`], so the next read asks again from there
    /// instead of leaving those blocks to be fetched one read at a time).
    pub async fn read_ahead(
        &self,
        blob: &BlobRef,
        offset: u64,
        end: u64,
        ahead: Option<(u64, u64)>,
    ) -> RegistryResult<(Bytes, Option<u64>)> {
        let bs = self.cfg.block_size;
        if end <= offset {
            return Ok((Bytes::new(), None));
        }
        let first = offset / bs;
        let (mut slots, _) = self.start(blob, first, (end - 1) / bs + 1, false);
        let mut held_back = None;
        if let Some((a, b)) = ahead {
            if b > a {
                held_back = self.start(blob, a / bs, (b - 1) / bs + 1, true).1;
            }
        }
        let data = gather_with(
            offset,
            end,
            bs,
            |index| {
                let slot = usize::try_from(index - first)
                    .ok()
                    .and_then(|i| slots.get_mut(i))
                    .map(|s| std::mem::replace(s, fetch::Slot::Ready(Bytes::new())));
                self.wait_slot(blob, index, slot)
            },
            |index| {
                RegistryError::Protocol(format!(
                    "{}@{}: chunk {index} is shorter than the blob's size says",
                    blob.repo, blob.digest
                ))
            },
            |n| self.cache.join_buffer(n),
            |b| self.cache.seal_join(b),
        )
        .await?;
        Ok((data, held_back))
    }

    /// A blocking `Read + Seek` over a blob for the layer readers (run it on a blocking thread).
    pub fn cursor(self: &Arc<Self>, blob: BlobRef) -> BlobCursor {
        self.cursor_with(blob, self.readahead())
    }

    /// [`Blobs::cursor`] for a reader that will read the whole blob from its start (an index
    /// pass): its window starts at the largest, so the first round trip already asks for
    /// `--readahead` bytes in parallel requests instead of doubling from one block, one round
    /// trip per doubling (five over a WAN before the window is full).
    pub fn stream_cursor(self: &Arc<Self>, blob: BlobRef) -> BlobCursor {
        let max = self.cfg.max_window;
        self.cursor_with(blob, Readahead::new(max.max(self.cfg.block_size), max))
    }

    fn cursor_with(self: &Arc<Self>, blob: BlobRef, ra: Readahead) -> BlobCursor {
        BlobCursor {
            rt: tokio::runtime::Handle::current(),
            blobs: self.clone(),
            ra,
            blob,
            pos: 0,
            cur: Bytes::new(),
            cur_start: 0,
        }
    }

    pub fn is_verified(&self, digest: &Digest) -> bool {
        crate::sync::lock(&self.verified).contains(digest)
    }

    /// A hashing feed for a handle reading `blob`, when one is needed: blobs of one block are
    /// verified as they are fetched, and only sha256 can be checked.
    pub fn verifier(&self, blob: &BlobRef) -> Option<HashFeed> {
        (blob.size > self.cfg.block_size && blob.digest.is_sha256()).then(|| {
            HashFeed::start(
                blob.digest.clone(),
                blob.size,
                self.cfg.block_size,
                self.budget.clone(),
                Verdicts {
                    verified: self.verified.clone(),
                    cache: self.cache.clone(),
                    disk: self.disk.clone().map(|d| (d, self.cfg.block_size)),
                },
            )
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
        let body = self.read(blob, 0, blob.size, None).await?;
        if blob.size > self.cfg.block_size && blob.digest.is_sha256() {
            crate::digest::verify(blob.digest.as_str(), &body)?;
        }
        Ok(body)
    }

    /// The error for a read through a handle whose hasher found the blob bad, and the outcome
    /// of a piece it sent (a mismatch is an error; the cached bytes are already dropped).
    pub fn settle(&self, blob: &BlobRef, outcome: Checked) -> RegistryResult<()> {
        match outcome {
            Checked::Mismatch(actual) => Err(RegistryError::DigestMismatch {
                expected: blob.digest.to_string(),
                actual: format!("{actual}; cached chunks dropped"),
            }),
            _ => Ok(()),
        }
    }

    /// A blob of one block was verified when it was fetched.
    pub fn single_chunk_verified(&self, blob: &BlobRef) -> bool {
        if blob.size <= self.cfg.block_size && blob.digest.is_sha256() {
            crate::sync::lock(&self.verified).insert(blob.digest.clone());
            return true;
        }
        false
    }

    /// Forget a blob's cached bytes (deleted, or found bad).
    pub fn evict(&self, digest: &Digest) {
        self.cache.evict_digest(digest);
        if let Some(disk) = &self.disk {
            disk.forget(digest);
        }
    }
}

/// A blocking `Read + Seek` over a blob, block by block through the cache, with a readahead
/// window like any reader (so an index pass streams). Runs on a blocking thread and waits on
/// the runtime for each block.
pub struct BlobCursor {
    rt: tokio::runtime::Handle,
    blobs: Arc<Blobs>,
    blob: BlobRef,
    ra: Readahead,
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
            let bs = self.blobs.cfg.block_size;
            let index = self.pos / bs;
            let (start, end) = (
                index * bs,
                (index * bs).saturating_add(bs).min(self.blob.size),
            );
            let ahead = self.ra.on_read(start, end, self.blob.size);
            let (cur, held_back) = self
                .rt
                .block_on(self.blobs.read_ahead(&self.blob, start, end, ahead))
                .map_err(std::io::Error::other)?;
            self.cur = cur;
            if let Some(at) = held_back {
                self.ra.held_back(at);
            }
            self.cur_start = start;
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
}
