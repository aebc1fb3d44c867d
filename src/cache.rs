//! The chunk cache: bytes in chunks under typed keys ([`ChunkKey`]: a blob chunk, a span of a
//! layer's uncompressed stream, or a TOC chunk of a file), in an LRU capped in bytes. Concurrent
//! readers of a chunk that is not cached yet share one fetch, and its result: when it fails, they
//! all fail with it.
//!
//! Lock order: `inflight` is never held while `lru` is taken, and neither is held across `.await`
//! (see `fs::inodes` for the whole crate).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use lru::LruCache;

use crate::digest::Digest;

/// What a cached chunk is. Every key names the blob its bytes come from, so dropping a blob
/// ([`ChunkCache::evict_digest`]) drops every kind of chunk made from it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChunkKey {
    /// Chunk `index` (of `--chunk-size` bytes) of a blob, as fetched for a descriptor that says
    /// the blob has `size` bytes. The size is part of the key: a descriptor with a wrong size
    /// fetches (and fails on) its own chunks, never poisoning those of a right one.
    Blob {
        digest: Digest,
        size: u64,
        index: u64,
    },
    /// Span `index` (of `--chunk-size` bytes) of a compressed layer's uncompressed stream.
    Span { digest: Digest, index: u64 },
    /// The decompressed, verified chunk of an eStargz / zstd:chunked file that starts at
    /// compressed offset `start` of the layer.
    TocChunk {
        digest: Digest,
        start: u64,
        end: u64,
    },
}

impl ChunkKey {
    /// The blob the chunk comes from.
    pub fn digest(&self) -> &Digest {
        match self {
            ChunkKey::Blob { digest, .. }
            | ChunkKey::Span { digest, .. }
            | ChunkKey::TocChunk { digest, .. } => digest,
        }
    }
}

struct Lru {
    map: LruCache<ChunkKey, Bytes>,
    bytes: u64,
    /// Bytes of fetches in flight that have reserved room (see [`Fetching::reserve`]): they
    /// count against the cap like cached bytes, so cached plus arriving stays within it.
    reserved: u64,
}

/// A bounded, content-keyed chunk cache.
pub struct ChunkCache {
    capacity: u64,
    lru: Mutex<Lru>,
    inflight: Mutex<HashMap<ChunkKey, Arc<Flight>>>,
    /// Buffers of evicted chunks, for reuse ([`ChunkCache::buffer`]).
    pool: Mutex<Pool>,
    /// Buffers of replies that joined two or more chunks, for the next such reply
    /// ([`ChunkCache::join_buffer`]).
    joins: Arc<Mutex<Pool>>,
    // ctl: hit and miss counters for `.regfs/stats` (a hit: `get` found the chunk; a miss: a
    // fetch ran).
    hits: AtomicU64,
    misses: AtomicU64,
    /// ctl: bytes copied into join buffers (reads that spanned two or more chunks).
    joined: AtomicU64,
}

/// Buffers kept for reuse: 16 chunk buffers (16 MiB at the default chunk size, a sixteenth of
/// the default cache) outside the byte cap, enough to cover the fetches a sequential reader has
/// streaming at once. Never more than a sixteenth of the cap in all.
const POOLED_BUFFERS: usize = 16;

/// Join buffers kept for reuse, apart from [`POOLED_BUFFERS`]: a read that spans two chunks is
/// joined into one buffer (fuser's reply takes one slice). Files ask for chunk-sized reads
/// (`st_blksize`), so a sequential reader's reads no longer span two chunks; random and odd-sized
/// reads still do. Kept in the same pool as the chunks' buffers (and recycled only by whoever
/// dropped them last, often the hasher's stash), joins were taken by fetches filling the cache
/// and each mapped and faulted in a fresh buffer. A join now goes back to its own pool when its
/// last holder lets go. 8, at most a thirty-second of the cap (8 MiB at the default 256 MiB
/// cache, 2 MiB at 64 MiB): twice that raised the peak RSS of 64 random readers over a 64 MiB
/// cache by about 5 MiB, for joins that sequential readers no longer make.
const JOIN_BUFFERS: usize = 8;

/// Recycled buffers, and their bytes (capacity) in all.
#[derive(Default)]
struct Pool {
    bufs: Vec<BytesMut>,
    bytes: usize,
}

/// Whether `buf` suits `len` bytes. Only a close fit: the cache counts lengths, so a much
/// larger buffer holding a small chunk would be memory past the cap.
fn fits(buf: &BytesMut, len: usize) -> bool {
    buf.capacity() >= len && buf.capacity() / 2 <= len
}

/// A join buffer lent out as [`Bytes`]: back to its pool once nobody holds it.
struct Joined {
    buf: BytesMut,
    pool: Arc<Mutex<Pool>>,
    room: u64,
}

impl AsRef<[u8]> for Joined {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        // Small joins (a file's bytes in a tar layer, a TOC) are not kept: they would take the
        // pool's places from the 1 MiB joins it is for. Full: the buffer is freed.
        if buf.capacity() >= POOLED_MIN {
            buf.clear();
            let _ = ChunkCache::put_into(&self.pool, buf, JOIN_BUFFERS, self.room);
        }
    }
}

/// Smaller buffers are not worth keeping (slices of network reads, small documents).
const POOLED_MIN: usize = 64 << 10;

/// The error of a failed fetch, shared by every reader that waited on it (type-erased, because
/// callers use their own error types; each reader gets a clone of its own).
pub type SharedError = Arc<dyn std::any::Any + Send + Sync>;

/// How a fetch in flight ended.
#[derive(Clone)]
enum Landing {
    Done(Result<Bytes, SharedError>),
    /// The fetcher went away without an answer (cancelled): waiters claim the key again.
    Abandoned,
}

/// One fetch in flight. Readers of its key wait on it; its [`Fetching`] guard lands it.
#[derive(Default)]
pub struct Flight {
    /// A leaf lock (see `fs::inodes`): taken alone, briefly, never across an `.await`.
    landing: Mutex<Option<Landing>>,
    landed: tokio::sync::Notify,
    /// Its blob was found bad (and dropped) while this fetch was under way: what it brings was
    /// asked for before the verdict, so it is not cached, and its waiters are sent to claim the
    /// key again (see [`ChunkCache::evict_digest`]).
    poisoned: std::sync::atomic::AtomicBool,
}

impl Flight {
    /// The fetch's outcome once it lands; `None` if it was abandoned (claim the key again).
    pub async fn wait(&self) -> Option<Result<Bytes, SharedError>> {
        loop {
            let notified = self.landed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match crate::sync::lock(&self.landing).clone() {
                Some(Landing::Done(r)) => return Some(r),
                Some(Landing::Abandoned) => return None,
                None => {}
            }
            notified.await;
        }
    }

    /// Whether its blob was dropped while it was under way (see [`Flight::poisoned`]).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    fn land(&self, l: Landing) {
        let mut landing = crate::sync::lock(&self.landing);
        if landing.is_none() {
            *landing = Some(l);
        }
        drop(landing);
        self.landed.notify_waiters();
    }
}

/// The right, and the duty, to fetch one key: [`Fetching::fulfil`] or [`Fetching::fail`] it.
/// Dropped unanswered (its task was cancelled), it is abandoned and its waiters claim again,
/// so no waiter is ever left asleep.
pub struct Fetching {
    cache: Arc<ChunkCache>,
    key: ChunkKey,
    flight: Arc<Flight>,
    answered: bool,
    /// Room reserved in the cache for the bytes on their way.
    reserved: u64,
    /// A buffer for those bytes: one that the reservation evicted from the cache (or a pooled
    /// one), so a fetch that displaces a chunk refills that chunk's memory instead of mapping
    /// and faulting in a fresh megabyte ([`Fetching::take_buffer`]).
    buffer: Option<BytesMut>,
}

impl Fetching {
    pub fn key(&self) -> &ChunkKey {
        &self.key
    }

    /// Count the `n` bytes this fetch will bring against the cache's cap from now on (older
    /// chunks are evicted to make room), so memory holds while many fetches stream at once.
    /// Evicted chunks' buffers go to the pool (or are freed).
    pub fn reserve(&mut self, n: u64) {
        self.reserve_as(n, false);
    }

    /// [`Fetching::reserve`] for a prefetch, which keeps a buffer for its bytes: the first
    /// evicted chunk whose buffer fits (else a pooled one). At most one per reservation, a
    /// close fit. (Before this, the chunks a large readahead evicted at once overflowed the
    /// small pool and were unmapped, and the same megabytes faulted in again moments later: 70%
    /// of a cold sequential read's pages were page faults.) A reader's own blocks do not keep
    /// one: 64 random readers holding buffers from reservation to first byte raised peak RSS by
    /// about 10 MiB over a 64 MiB cache.
    pub fn reserve_for_prefetch(&mut self, n: u64) {
        self.reserve_as(n, true);
    }

    fn reserve_as(&mut self, n: u64, keep: bool) {
        let n = n.min(self.cache.capacity);
        let evicted = self.cache.reserve(n);
        self.reserved += n;
        let want = usize::try_from(n).unwrap_or(usize::MAX);
        for b in evicted {
            let Some(buf) = ChunkCache::reusable(b) else {
                continue;
            };
            if keep && self.buffer.is_none() && fits(&buf, want) {
                self.buffer = Some(buf);
            } else {
                self.cache.pool_put(buf);
            }
        }
        if keep && self.buffer.is_none() {
            self.buffer = self.cache.pooled(want);
        }
    }

    /// The buffer to fill with this fetch's bytes, if it has one (else use
    /// [`ChunkCache::buffer`]).
    pub fn take_buffer(&mut self) -> Option<BytesMut> {
        self.buffer.take()
    }

    /// The flight this guard lands, for the fetcher to wait on like any reader.
    pub fn flight(&self) -> Arc<Flight> {
        self.flight.clone()
    }

    /// Its blob was dropped while this fetch was under way (see [`Flight::poisoned`]): the
    /// fetcher should not keep what it brings anywhere either (the disk tier).
    pub fn is_poisoned(&self) -> bool {
        self.flight.poisoned.load(Ordering::SeqCst)
    }

    /// Cache `data` under the key and hand it to every waiter. A poisoned fetch caches nothing
    /// and is abandoned instead: its waiters claim the key again and fetch it afresh, after the
    /// verdict.
    pub fn fulfil(mut self, data: Bytes) {
        self.release();
        // The flag is checked again under the LRU's lock as the chunk goes in, and
        // `evict_digest` sets it before it clears the LRU: a verdict either finds the chunk
        // there and drops it, or is seen here and nothing goes in.
        let poisoned =
            self.cache
                .insert_unless(self.key.clone(), data.clone(), Some(&self.flight.poisoned));
        if poisoned {
            self.cache.retire(&self.key, &self.flight);
            self.answered = true;
            self.flight.land(Landing::Abandoned);
            return;
        }
        self.answer(Landing::Done(Ok(data)));
    }

    /// Fail every waiter with `err`; nothing is cached, and the next reader fetches afresh.
    pub fn fail(mut self, err: SharedError) {
        self.answer(Landing::Done(Err(err)));
    }

    /// Fail several fetches with one error. All of them leave the in-flight map before any
    /// waiter wakes: a reader woken by the first cannot join the next one's doomed flight.
    pub fn fail_all(all: impl IntoIterator<Item = Fetching>, err: SharedError) {
        let mut all: Vec<Fetching> = all.into_iter().collect();
        for f in &mut all {
            f.release();
            f.cache.retire(&f.key, &f.flight);
        }
        for f in &mut all {
            f.answered = true;
            f.flight.land(Landing::Done(Err(err.clone())));
        }
    }

    fn release(&mut self) {
        self.cache.unreserve(std::mem::take(&mut self.reserved));
    }

    fn answer(&mut self, l: Landing) {
        self.release();
        self.answered = true;
        self.cache.retire(&self.key, &self.flight);
        self.flight.land(l);
    }
}

impl Drop for Fetching {
    fn drop(&mut self) {
        if let Some(buf) = self.buffer.take() {
            self.cache.pool_put(buf);
        }
        self.release();
        if !self.answered {
            self.cache.retire(&self.key, &self.flight);
            self.flight.land(Landing::Abandoned);
        }
    }
}

/// What [`ChunkCache::claim`] found for a key.
pub enum Claim {
    /// Cached.
    Ready(Bytes),
    /// Somebody is fetching it: wait on that.
    Wait(Arc<Flight>),
    /// Nobody has it: the caller fetches it.
    Fetch(Fetching),
}

impl ChunkCache {
    pub fn new(capacity_bytes: u64) -> Self {
        ChunkCache {
            capacity: capacity_bytes,
            lru: Mutex::new(Lru {
                map: LruCache::unbounded(),
                bytes: 0,
                reserved: 0,
            }),
            inflight: Mutex::new(HashMap::new()),
            pool: Mutex::new(Pool::default()),
            joins: Arc::new(Mutex::new(Pool::default())),
            hits: AtomicU64::new(0),   // ctl
            misses: AtomicU64::new(0), // ctl
            joined: AtomicU64::new(0), // ctl
        }
    }

    /// Bytes copied so far to join reads that spanned two or more chunks (the one copy a reply
    /// makes; a read within one chunk is a slice of it).
    pub fn joined_bytes(&self) -> u64 {
        self.joined.load(Ordering::Relaxed)
    }

    /// Byte cap.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The cached chunk, if any (marks it recently used).
    pub fn get(&self, key: &ChunkKey) -> Option<Bytes> {
        let b = crate::sync::lock(&self.lru).map.get(key).cloned();
        if b.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed); // ctl
        }
        b
    }

    /// Whether `key` is cached, without marking it used.
    pub fn contains(&self, key: &ChunkKey) -> bool {
        crate::sync::lock(&self.lru).map.contains(key)
    }

    pub fn insert(&self, key: ChunkKey, data: Bytes) {
        self.insert_unless(key, data, None);
    }

    /// [`ChunkCache::insert`], unless `poisoned` is set (read under the LRU's lock); says
    /// whether it was.
    fn insert_unless(
        &self,
        key: ChunkKey,
        data: Bytes,
        poisoned: Option<&std::sync::atomic::AtomicBool>,
    ) -> bool {
        let evicted = {
            let mut lru = crate::sync::lock(&self.lru);
            if poisoned.is_some_and(|p| p.load(Ordering::SeqCst)) {
                return true;
            }
            if data.len() as u64 > self.capacity {
                return false; // would evict everything and still not fit
            }
            lru.bytes += data.len() as u64;
            if let Some(old) = lru.map.put(key, data) {
                lru.bytes -= old.len() as u64;
            }
            Self::shrink(&mut lru, self.capacity)
        };
        self.recycle(evicted);
        false
    }

    /// Evict least recently used chunks until cached plus reserved bytes fit `capacity`.
    fn shrink(lru: &mut Lru, capacity: u64) -> Vec<Bytes> {
        let mut evicted = Vec::new();
        while lru.bytes + lru.reserved > capacity {
            match lru.map.pop_lru() {
                Some((_, v)) => {
                    lru.bytes -= v.len() as u64;
                    evicted.push(v);
                }
                None => break,
            }
        }
        evicted
    }

    /// Count `n` more bytes in flight against the cap; the chunks evicted to make room.
    fn reserve(&self, n: u64) -> Vec<Bytes> {
        let mut lru = crate::sync::lock(&self.lru);
        lru.reserved += n;
        Self::shrink(&mut lru, self.capacity)
    }

    /// Keep the buffers of evicted chunks that nobody else holds, for the next fetch to fill
    /// ([`ChunkCache::buffer`]): a sequential reader then reuses memory whose pages are already
    /// mapped instead of faulting in and zeroing a fresh megabyte per chunk. Taken after the
    /// LRU lock is released (the pool's lock is a leaf too).
    fn recycle(&self, evicted: Vec<Bytes>) {
        evicted.into_iter().for_each(|b| self.recycle_one(b));
    }

    /// Keep `b`'s buffer for reuse if nobody else holds it (a read's reply, once sent): at
    /// most [`POOLED_BUFFERS`], and at most a sixteenth of the cap in all (the pool is memory
    /// outside the cap, so a small cache keeps a small pool).
    pub fn recycle_one(&self, b: Bytes) {
        if let Some(buf) = Self::reusable(b) {
            self.pool_put(buf);
        }
    }

    /// `b`'s buffer, emptied, if nobody else holds it and it is worth keeping.
    fn reusable(b: Bytes) -> Option<BytesMut> {
        let mut buf = b.try_into_mut().ok()?; // else still held (cached, or a reader's slice)
        if buf.capacity() < POOLED_MIN {
            return None;
        }
        buf.clear();
        Some(buf)
    }

    fn pool_put(&self, buf: BytesMut) {
        // The pool is full: the buffer is freed.
        let _ = Self::put_into(&self.pool, buf, POOLED_BUFFERS, self.capacity / 16);
    }

    /// Put `buf` into `pool` if it stays within `count` buffers and `room` bytes; else give it
    /// back.
    fn put_into(pool: &Mutex<Pool>, buf: BytesMut, count: usize, room: u64) -> Option<BytesMut> {
        let room = usize::try_from(room).unwrap_or(usize::MAX);
        let mut pool = crate::sync::lock(pool);
        let after = pool.bytes.saturating_add(buf.capacity());
        if pool.bufs.len() < count && after <= room {
            pool.bytes = after;
            pool.bufs.push(buf);
            None
        } else {
            Some(buf)
        }
    }

    /// An empty buffer of at least `len` bytes: a recycled one when one is big enough.
    pub fn buffer(&self, len: usize) -> BytesMut {
        self.pooled(len)
            .unwrap_or_else(|| BytesMut::with_capacity(len))
    }

    /// A buffer to join a read's pieces into: a recycled join buffer, else as
    /// [`ChunkCache::buffer`]. Hand it back filled through [`ChunkCache::seal_join`].
    pub fn join_buffer(&self, len: usize) -> BytesMut {
        Self::take_from(&self.joins, len).unwrap_or_else(|| self.buffer(len))
    }

    /// A filled join buffer as bytes that return it to the join pool ([`JOIN_BUFFERS`]) when
    /// the last holder lets go: the reply, or the handle's hasher, whichever is later.
    pub fn seal_join(&self, buf: BytesMut) -> Bytes {
        self.joined.fetch_add(buf.len() as u64, Ordering::Relaxed); // ctl
        Bytes::from_owner(Joined {
            buf,
            pool: self.joins.clone(),
            room: self.capacity / 32,
        })
    }

    /// A pooled buffer for `len` bytes, if one fits.
    fn pooled(&self, len: usize) -> Option<BytesMut> {
        Self::take_from(&self.pool, len)
    }

    fn take_from(pool: &Mutex<Pool>, len: usize) -> Option<BytesMut> {
        let mut pool = crate::sync::lock(pool);
        let found = pool
            .bufs
            .iter()
            .position(|b| fits(b, len))
            .map(|i| pool.bufs.swap_remove(i));
        if let Some(b) = &found {
            pool.bytes = pool.bytes.saturating_sub(b.capacity());
        }
        found
    }

    fn unreserve(&self, n: u64) {
        let mut lru = crate::sync::lock(&self.lru);
        lru.reserved = lru.reserved.saturating_sub(n);
    }

    /// Cached, in flight, or the caller's to fetch. The in-flight entry is made under the
    /// `inflight` lock, then the cache is checked again (a fetch that landed between the first
    /// miss and the entry left the chunk in the LRU: no second request).
    pub fn claim(self: &Arc<Self>, key: &ChunkKey) -> Claim {
        if let Some(b) = self.get(key) {
            return Claim::Ready(b);
        }
        let flight = {
            let mut inflight = crate::sync::lock(&self.inflight);
            if let Some(f) = inflight.get(key) {
                return Claim::Wait(f.clone());
            }
            let f = Arc::new(Flight::default());
            inflight.insert(key.clone(), f.clone());
            f
        };
        let fetching = Fetching {
            cache: self.clone(),
            key: key.clone(),
            flight,
            answered: false,
            reserved: 0,
            buffer: None,
        };
        match self.get(key) {
            Some(b) => {
                fetching.fulfil(b.clone());
                Claim::Ready(b)
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed); // ctl
                Claim::Fetch(fetching)
            }
        }
    }

    /// Drop the in-flight entry of `key` if it is still `flight`.
    fn retire(&self, key: &ChunkKey, flight: &Arc<Flight>) {
        let mut inflight = crate::sync::lock(&self.inflight);
        if inflight.get(key).is_some_and(|c| Arc::ptr_eq(c, flight)) {
            inflight.remove(key);
        }
    }

    /// The chunk for `key`: from the cache, from a fetch already in flight, or by running `fetch`.
    ///
    /// Every reader that joins one in-flight fetch gets that fetch's result, error included: a
    /// failed fetch fails its waiters once, and they do not queue up to retry it one after
    /// another (the registry client already retried within its budget). A failure caches
    /// nothing, and the next new reader starts a fresh fetch. If the reader running the fetch is
    /// cancelled, its waiters claim the key again, so no waiter is left asleep.
    pub async fn get_or_fetch<F, Fut, E>(
        self: &Arc<Self>,
        key: ChunkKey,
        fetch: F,
    ) -> Result<Bytes, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
        E: Clone + Send + Sync + 'static,
    {
        loop {
            match self.claim(&key) {
                Claim::Ready(b) => return Ok(b),
                Claim::Fetch(f) => {
                    return match fetch().await {
                        Ok(data) => {
                            f.fulfil(data.clone());
                            Ok(data)
                        }
                        Err(e) => {
                            f.fail(Arc::new(e.clone()));
                            Err(e)
                        }
                    };
                }
                Claim::Wait(flight) => match flight.wait().await {
                    None => continue,
                    Some(Ok(b)) => return Ok(b),
                    Some(Err(shared)) => match shared.downcast_ref::<E>() {
                        Some(e) => return Err(e.clone()),
                        // Another kind of caller failed this key with another error type:
                        // this reader cannot be handed that error, so it fetches for itself
                        // (caching nothing new on failure, as ever).
                        None => {
                            let data = fetch().await?;
                            self.insert(key, data.clone());
                            return Ok(data);
                        }
                    },
                },
            }
        }
    }

    /// Drop every chunk made from `digest`, of every kind (after a digest mismatch, a delete),
    /// and poison its fetches in flight: bytes asked for before the verdict are never cached.
    pub fn evict_digest(&self, digest: &str) {
        // Poison first: a fetch landing from now on sees it under the LRU's lock (see
        // `Fetching::fulfil`); one that landed before is in the LRU, cleared below.
        {
            let inflight = crate::sync::lock(&self.inflight);
            for (k, f) in inflight.iter() {
                if k.digest().as_str() == digest {
                    f.poisoned.store(true, Ordering::SeqCst);
                }
            }
        }
        let mut lru = crate::sync::lock(&self.lru);
        let keys: Vec<ChunkKey> = lru
            .map
            .iter()
            .filter(|(k, _)| k.digest().as_str() == digest)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            if let Some(v) = lru.map.pop(&k) {
                lru.bytes -= v.len() as u64;
            }
        }
    }

    /// Bytes held.
    pub fn used_bytes(&self) -> u64 {
        crate::sync::lock(&self.lru).bytes
    }

    // ctl: read-only queries for `.regfs/stats` and `user.regfs.cached`.
    /// (hits, misses) so far: lookups that found their chunk, and fetches that ran.
    pub fn hits_misses(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Bytes held of the blob `digest` read for a descriptor of `size` bytes (its blob chunks;
    /// not spans or TOC chunks made from it). Does not mark anything used.
    pub fn blob_bytes(&self, digest: &str, size: u64) -> u64 {
        crate::sync::lock(&self.lru)
            .map
            .iter()
            .filter(|(k, _)| {
                matches!(k, ChunkKey::Blob { digest: d, size: s, .. } if d.as_str() == digest && *s == size)
            })
            .map(|(_, v)| v.len() as u64)
            .sum()
    }

    /// Chunks held.
    pub fn len(&self) -> usize {
        crate::sync::lock(&self.lru).map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const MIB: usize = 1 << 20;

    fn key(d: &str, i: u64) -> ChunkKey {
        ChunkKey::Blob {
            digest: Digest::from(d),
            size: 0,
            index: i,
        }
    }

    #[tokio::test]
    async fn caps_bytes_and_evicts_lru() {
        let c = Arc::new(ChunkCache::new(10));
        for i in 0..4 {
            c.get_or_fetch(key("a", i), || async {
                Ok::<_, ()>(Bytes::from_static(b"1234"))
            })
            .await
            .unwrap();
        }
        assert_eq!(c.used_bytes(), 8);
        assert_eq!(c.len(), 2);
        assert!(c.get(&key("a", 3)).is_some());
        assert!(c.get(&key("a", 0)).is_none());
        c.insert(
            ChunkKey::Span {
                digest: Digest::from("a"),
                index: 0,
            },
            Bytes::from_static(b"s"),
        );
        c.insert(
            ChunkKey::TocChunk {
                digest: Digest::from("b"),
                start: 0,
                end: 1,
            },
            Bytes::from_static(b"t"),
        );
        c.evict_digest("a");
        assert_eq!(
            c.len(),
            1,
            "every kind of chunk of a digest goes, others stay"
        );
        c.evict_digest("b");
        assert!(c.is_empty());
        assert_eq!(c.used_bytes(), 0);
    }

    #[tokio::test]
    async fn concurrent_readers_share_one_fetch() {
        let c = Arc::new(ChunkCache::new(1 << 20));
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let c = c.clone();
            let fetches = fetches.clone();
            tasks.push(tokio::spawn(async move {
                c.get_or_fetch(key("d", 0), || async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    Ok::<_, ()>(Bytes::from_static(b"x"))
                })
                .await
                .unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(&t.await.unwrap()[..], b"x");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_fetch_in_flight_when_its_blob_is_dropped_caches_nothing() {
        let c = Arc::new(ChunkCache::new(1 << 20));
        let Claim::Fetch(f) = c.claim(&key("bad", 0)) else {
            panic!("nothing cached yet")
        };
        let Claim::Wait(w) = c.claim(&key("bad", 0)) else {
            panic!("in flight")
        };
        let Claim::Fetch(other) = c.claim(&key("good", 0)) else {
            panic!("nothing cached yet")
        };
        c.evict_digest("bad"); // the blob's verdict comes in while the fetch streams
        assert!(f.is_poisoned() && !other.is_poisoned());
        f.fulfil(Bytes::from_static(b"asked for before the verdict"));
        assert!(w.wait().await.is_none(), "the waiter claims again");
        assert!(c.get(&key("bad", 0)).is_none(), "nothing cached");
        assert!(
            matches!(c.claim(&key("bad", 0)), Claim::Fetch(_)),
            "fetched afresh"
        );
        other.fulfil(Bytes::from_static(b"fine"));
        assert!(c.get(&key("good", 0)).is_some());
    }

    #[test]
    fn a_fetch_refills_the_memory_of_the_chunk_it_displaces() {
        let c = Arc::new(ChunkCache::new(2 * MIB as u64));
        let block = |v: u8| {
            let mut b = BytesMut::with_capacity(MIB);
            b.resize(MIB, v);
            b.freeze()
        };
        let (a, b) = (block(1), block(2));
        let a_ptr = a.as_ptr();
        c.insert(key("x", 0), a);
        c.insert(key("x", 1), b);
        let Claim::Fetch(mut f) = c.claim(&key("y", 0)) else {
            panic!("nothing cached yet")
        };
        f.reserve_for_prefetch(MIB as u64); // evicts x/0, the least recently used
        assert!(c.get(&key("x", 0)).is_none());
        let buf = f.take_buffer().expect("the evicted chunk's buffer");
        assert_eq!(buf.as_ptr(), a_ptr, "the same memory, not a fresh mapping");
        assert!(buf.is_empty() && buf.capacity() >= MIB);
        // A chunk still held elsewhere (a reader's reply) is not reused.
        let held = c.get(&key("x", 1)).unwrap();
        let Claim::Fetch(mut g) = c.claim(&key("y", 1)) else {
            panic!("nothing cached yet")
        };
        g.reserve_for_prefetch(2 * MIB as u64);
        assert!(g.take_buffer().is_none());
        drop(held);
    }

    #[test]
    fn a_join_buffer_goes_back_to_its_pool_when_its_last_holder_lets_go() {
        let c = ChunkCache::new(1 << 30); // room for JOIN_BUFFERS of 1 MiB
        let mut buf = c.join_buffer(MIB);
        let at = buf.as_ptr();
        buf.extend_from_slice(&[7u8; MIB]);
        let reply = c.seal_join(buf);
        let hasher = reply.clone(); // the handle's hasher holds it past the reply
        c.recycle_one(reply.clone()); // the reply's recycle cannot take it
        drop(reply);
        assert!(ChunkCache::take_from(&c.joins, MIB).is_none(), "still held");
        assert_eq!(&hasher[..4], &[7, 7, 7, 7]);
        drop(hasher);
        let again = c.join_buffer(MIB);
        assert_eq!(again.as_ptr(), at, "the same memory, not a fresh mapping");
        assert!(again.is_empty());
        // Never more than JOIN_BUFFERS kept (nor more than a thirty-second of the cap).
        let held: Vec<Bytes> = (0..JOIN_BUFFERS + 3)
            .map(|_| c.seal_join(c.join_buffer(MIB)))
            .collect();
        drop(held);
        assert_eq!(crate::sync::lock(&c.joins).bufs.len(), JOIN_BUFFERS);
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let c = Arc::new(ChunkCache::new(100));
        let r = c
            .get_or_fetch(key("e", 0), || async {
                Err(crate::error::RegistryError::Transport("boom".into()))
            })
            .await;
        assert!(r.is_err());
        assert!(c.is_empty());
        let r = c
            .get_or_fetch(key("e", 0), || async {
                Ok::<_, crate::error::RegistryError>(Bytes::from_static(b"ok"))
            })
            .await
            .unwrap();
        assert_eq!(&r[..], b"ok");
    }
}
