//! The disk tier: blob blocks kept in `--cache-dir` across mounts, under a byte cap
//! (`--cache-dir-size`), each checked against its own sha256 on every read; verified chunk maps
//! that check blocks fetched later against what the blob was proven to hold; and whole blobs
//! assembled on disk for FUSE passthrough.
//!
//! Layout under the cache dir (docs/ARCHITECTURE.md, "On-disk layout"):
//! - `disk.lock`: held with `flock` by the one mount that uses the dir (a second is refused);
//! - `blocks/<hex>/<blob size>.<block size>.<index>`: one block ([`block`] format);
//! - `maps/<hex>.<blob size>.<block size>.map`: a verified chunk map ([`map`] format);
//! - `blobs/<hex>.<blob size>` and `.ok`: a whole blob verified against its digest, and the stat
//!   fingerprint it had when it was ([`whole`]).
//!
//! Reads (`get`, `check`, `passthrough_file`) happen on the caller's thread; every write happens on
//! one writer thread fed by a bounded queue, so `put` costs the caller a queue push.

mod block;
mod evict;
mod files;
mod map;
mod whole;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::digest::Digest;
use crate::sync::lock;
use block::{block_len, digest_bytes, Header, HEADER_LEN};
use evict::{on_disk, Lru};
use map::MapKey;

/// Block bytes waiting for the writer, at most. Past this `put` drops the block (it is fetched
/// again if read again): 32 MiB absorbs a burst of readahead while bounding memory.
const QUEUE_BYTES: usize = 32 << 20;
/// The largest request a prefetch makes with a disk tier, near registry or not: a quarter of
/// the writer's queue, so its room comes free while the writer drains the requests before it.
/// (A 32 MiB request to a near registry waited for the whole queue to drain, and on a busy
/// machine gave up after [`MAX_ROOM_WAIT`] and dropped blocks the next mount then fetched.)
pub const MAX_REQUEST_WITH_DISK: u64 = (QUEUE_BYTES / 4) as u64;
/// How long a prefetch waits for the writer's queue to have room for its bytes before it is
/// fetched anyway (and its blocks may be dropped): see [`DiskCache::wait_for_room`]. 250 ms
/// lets a disk that writes 32 MB/s or more keep every block of an 8 MiB request, while a
/// slower or stuck one delays readahead by at most this much per request.
pub const MAX_ROOM_WAIT: std::time::Duration = std::time::Duration::from_millis(250);
/// Jobs waiting for the writer, at most (maps and barriers are small; blocks are bounded above).
const QUEUE_JOBS: usize = 1024;
/// Chunk maps kept in memory (a 1 GiB blob's map in 1 MiB blocks is 32 KiB).
const MAPS_IN_MEMORY: usize = 256;

/// Room held in the disk writer's queue ([`DiskCache::wait_for_room`]); what is not used by
/// the time it is dropped is given back.
pub struct Room {
    inner: Arc<Inner>,
    held: usize,
}

impl Drop for Room {
    fn drop(&mut self) {
        if self.held > 0 {
            self.inner
                .queued_bytes
                .fetch_sub(self.held, Ordering::SeqCst);
            self.inner.drained.notify_waiters();
        }
    }
}

/// Which block of which blob, cut at which size. A changed block size never mixes with another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub digest: Digest,
    pub blob_size: u64,
    pub block_size: u64,
    pub index: u64,
}

/// A block checked against its blob's verified chunk map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapCheck {
    /// No map for this blob (not verified whole yet): nothing to check against.
    Unmapped,
    Match,
    /// The bytes are not what the blob holds: never cache, never serve.
    Mismatch,
}

/// Counters of the disk tier (in `user.regfs.stats` as `disk_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DiskStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Blocks or whole files found damaged (dropped, fetched again).
    pub checksum_failures: u64,
    /// Blocks from the network refused by their chunk map.
    pub map_mismatches: u64,
    pub passthrough_opens: u64,
    pub blocks_written: u64,
    /// Blocks not written because the writer's queue was full, or because they were fetched
    /// before a forget (a blob found bad) asked for since.
    pub blocks_dropped: u64,
    /// Prefetches that waited [`MAX_ROOM_WAIT`] for the writer and went ahead anyway.
    pub room_waits_expired: u64,
    pub blobs_assembled: u64,
    /// Bytes on disk (blocks and whole blobs, in 4 KiB units).
    pub bytes: u64,
    pub entries: u64,
}

/// Why the disk cache could not open.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cache dir {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error(
        "cache dir {0} is in use by another regfs mount (it holds {0}/disk.lock); \
         give each mount its own --cache-dir"
    )]
    InUse(PathBuf),
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    checksum_failures: AtomicU64,
    map_mismatches: AtomicU64,
    passthrough_opens: AtomicU64,
    blocks_written: AtomicU64,
    blocks_dropped: AtomicU64,
    room_waits_expired: AtomicU64,
    blobs_assembled: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A blob's verified chunk map: the sha256 of each block.
type Sums = Arc<Vec<[u8; 32]>>;

/// What the writer thread is asked to do.
enum Job {
    /// A block, and the forget epoch (see [`DiskCache::epoch`]) read before its fetch checked
    /// its blob was not found bad.
    Put(BlockKey, Bytes, u64),
    /// A map was recorded: check the blob's blocks against it, assemble the blob if complete.
    Mapped(MapKey, Sums),
    Forget([u8; 32]),
    Barrier(std::sync::mpsc::Sender<()>),
}

/// State shared by the callers and the writer thread.
struct Inner {
    dir: PathBuf,
    cap: u64,
    lru: Mutex<Lru>,
    /// Loaded maps; `None` remembers that there is no map file.
    maps: Mutex<HashMap<MapKey, Option<Sums>>>,
    counters: Counters,
    queued_bytes: AtomicUsize,
    /// Forgets asked for so far (see [`DiskCache::epoch`]).
    forgets: AtomicU64,
    /// Signalled by the writer after each job (see [`DiskCache::wait_for_room`]).
    drained: tokio::sync::Notify,
    /// Holds the flock for the life of the cache.
    _lock: File,
}

/// The disk tier of one mount.
pub struct DiskCache {
    inner: Arc<Inner>,
    /// Taken at drop, so the writer finishes the queue and exits (and the lock is released).
    tx: Option<SyncSender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DiskCache({}, cap {})",
            self.inner.dir.display(),
            self.inner.cap
        )
    }
}

fn io_err(p: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |e| DiskError::Io(p.to_path_buf(), e)
}

/// Take `dir/disk.lock` exclusively, or say who has it.
fn take_lock(dir: &Path) -> Result<File, DiskError> {
    use std::os::fd::AsRawFd;
    let p = dir.join("disk.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(io_err(&p))?;
    // SAFETY: flock on an fd we own; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.kind() {
            std::io::ErrorKind::WouldBlock => DiskError::InUse(dir.to_path_buf()),
            _ => DiskError::Io(p, e),
        });
    }
    Ok(f)
}

fn block_name(hex: &str, blob_size: u64, block_size: u64, index: u64) -> String {
    format!("blocks/{hex}/{blob_size}.{block_size}.{index}")
}

fn whole_name(hex: &str, blob_size: u64) -> String {
    format!("blobs/{hex}.{blob_size}")
}

impl DiskCache {
    /// Open (creating) the disk tier in `dir` with a cap of `cap_bytes`: take the lock (a second
    /// mount on the same dir is refused), drop what a crash left half-written, index what is
    /// there (oldest first by mtime) and trim it to the cap, then start the writer thread.
    pub fn open(dir: &Path, cap_bytes: u64) -> Result<Arc<DiskCache>, DiskError> {
        for sub in ["blocks", "maps", "blobs"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let lock_file = take_lock(dir)?;
        let mut found = whole::scan(dir).map_err(io_err(dir))?;
        found.sort_by_key(|f| f.2);
        let mut lru = Lru::default();
        for (name, bytes, _) in found {
            lru.insert(name, bytes);
        }
        let (tx, rx) = sync_channel(QUEUE_JOBS);
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            cap: cap_bytes,
            lru: Mutex::new(lru),
            maps: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            queued_bytes: AtomicUsize::new(0),
            forgets: AtomicU64::new(0),
            drained: tokio::sync::Notify::new(),
            _lock: lock_file,
        });
        inner.make_room(0);
        let w = inner.clone();
        let handle = std::thread::Builder::new()
            .name("regfs-disk".into())
            .spawn(move || writer(w, rx))
            .map_err(io_err(dir))?;
        let (entries, used) = {
            let l = lock(&inner.lru);
            (l.len(), l.used())
        };
        log::info!(
            "disk cache {}: {entries} entries, {used} bytes (cap {cap_bytes})",
            dir.display()
        );
        Ok(Arc::new(DiskCache {
            inner,
            tx: Some(tx),
            writer: Some(handle),
        }))
    }

    /// Block `key`, if it is on disk and intact (its sha256 checked now, and its map entry when
    /// the blob has a map). A damaged block is dropped and counted; the caller fetches it again.
    pub fn get(&self, key: &BlockKey) -> Option<Bytes> {
        let got = self.inner.read_block(key);
        inc(if got.is_some() {
            &self.inner.counters.hits
        } else {
            &self.inner.counters.misses
        });
        got
    }

    /// Wait (at most `max`) until the writer's queue has room for `bytes` more (at most the
    /// whole queue), and hold that room: the blocks [`DiskCache::put_within`] later puts with
    /// the returned [`Room`] are queued even if other puts filled the queue meanwhile. A
    /// prefetch asks this before it fetches, so a read that outruns the disk (a loopback
    /// registry on a busy machine: the writer shares the CPU with hashing) slows its readahead
    /// to the disk's pace instead of dropping blocks that the next mount would fetch again. A
    /// reader that reaches one of those blocks waits with it: a reader's own blocks never wait
    /// (they are not a prefetch), but its prefetched ones may, at most `max`, and only while
    /// the writer is behind. (Ending the wait as soon as a reader waited left 2 to 42 of 1024
    /// blocks dropped on a CPU-bound loopback read: the reader is right behind the prefetch.)
    /// Without room by then, the room is empty (its blocks may be dropped). Woken by the
    /// writer as it drains.
    pub async fn wait_for_room(&self, bytes: usize, max: std::time::Duration) -> Room {
        let bytes = bytes.min(QUEUE_BYTES);
        let deadline = tokio::time::Instant::now() + max;
        let q = &self.inner.queued_bytes;
        loop {
            let drained = self.inner.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            let now = q.load(Ordering::SeqCst);
            if now.saturating_add(bytes) <= QUEUE_BYTES {
                if q.compare_exchange(now, now + bytes, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    return Room {
                        inner: self.inner.clone(),
                        held: bytes,
                    };
                }
                continue;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                inc(&self.inner.counters.room_waits_expired);
                return Room {
                    inner: self.inner.clone(),
                    held: 0,
                };
            }
            let _ = tokio::time::timeout(left, drained).await;
        }
    }

    /// Store a block, later, on the writer thread (dropped when the queue is full).
    pub fn put(&self, key: &BlockKey, data: Bytes) {
        self.put_within(key, data, None, self.epoch());
    }

    /// How many forgets have been asked for. A fetch reads it before it checks that its blob
    /// was not found bad, and its block carries it to the writer, which drops a block older
    /// than a forget asked for since: a verdict that came between that check and the put (and
    /// whose forget the writer may have done already) cannot leave the block on disk. Forgets
    /// are rare (a blob that failed verification), so dropping other blobs' blocks in flight at
    /// that moment costs nothing that matters.
    pub fn epoch(&self) -> u64 {
        self.inner.forgets.load(Ordering::SeqCst)
    }

    /// [`DiskCache::put`], using room held by `room` first (see [`DiskCache::wait_for_room`]).
    pub fn put_within(&self, key: &BlockKey, data: Bytes, room: Option<&mut Room>, epoch: u64) {
        let n = data.len();
        let q = &self.inner.queued_bytes;
        let from_room = room.map_or(0, |r| {
            let take = r.held.min(n);
            r.held -= take;
            take
        });
        // The part not covered by held room must fit the queue.
        let extra = n - from_room;
        if extra > 0 && q.fetch_add(extra, Ordering::SeqCst).saturating_add(extra) > QUEUE_BYTES {
            q.fetch_sub(n, Ordering::SeqCst); // both parts: the block is not queued
            inc(&self.inner.counters.blocks_dropped);
            return;
        }
        if self.send(Job::Put(key.clone(), data, epoch)).is_err() {
            q.fetch_sub(n, Ordering::SeqCst);
            inc(&self.inner.counters.blocks_dropped);
        }
    }

    /// `data`, fetched as block `key`, against the blob's verified chunk map.
    pub fn check(&self, key: &BlockKey, data: &[u8]) -> MapCheck {
        let Some(mk) = map_key(key.digest.as_str(), key.blob_size, key.block_size) else {
            return MapCheck::Unmapped;
        };
        let Some(sums) = self.inner.map(&mk) else {
            return MapCheck::Unmapped;
        };
        let expect_len = block_len(key.blob_size, key.block_size, key.index);
        let ok = usize::try_from(key.index)
            .ok()
            .and_then(|i| sums.get(i))
            .is_some_and(|s| expect_len == Some(data.len() as u64) && *s == block::sha256(data));
        if ok {
            MapCheck::Match
        } else {
            inc(&self.inner.counters.map_mismatches);
            MapCheck::Mismatch
        }
    }

    /// Record the chunk map of a blob just verified whole: the sha256 of every `block_size`
    /// piece, in order. Kept in memory at once; the file and the sweep of the blob's blocks
    /// happen on the writer thread.
    pub fn record_map(
        &self,
        digest: &Digest,
        blob_size: u64,
        block_size: u64,
        block_sha256: Vec<[u8; 32]>,
    ) {
        let Some(mk) = map_key(digest.as_str(), blob_size, block_size) else {
            return;
        };
        if mk.blocks() != Some(block_sha256.len() as u64) {
            log::warn!("disk cache: a map of {digest} with the wrong number of blocks, ignored");
            return;
        }
        let sums = Arc::new(block_sha256);
        self.inner.remember_map(mk.clone(), Some(sums.clone()));
        let _ = self.send(Job::Mapped(mk, sums));
    }

    /// The whole blob as a file the kernel may read directly, if it is on disk, was verified
    /// whole when assembled, and its stat fingerprint is unchanged since.
    pub fn passthrough_file(&self, digest: &Digest, blob_size: u64) -> Option<File> {
        let d = digest_bytes(digest.as_str())?;
        let f = self.inner.whole_file(&d, blob_size)?;
        inc(&self.inner.counters.passthrough_opens);
        Some(f)
    }

    /// Drop every block and whole file of a blob (found bad, or deleted). Never lost: when the
    /// writer's queue is full, a thread of its own waits to queue it (puts may be dropped;
    /// a forget must not be, or bad blocks would outlive their verdict).
    pub fn forget(&self, digest: &Digest) {
        let Some(d) = digest_bytes(digest.as_str()) else {
            return;
        };
        // Before the job is queued: a block put since carries the new epoch only if its fetch
        // read it after this (and so saw the poison set before this call).
        self.inner.forgets.fetch_add(1, Ordering::SeqCst);
        if self.send(Job::Forget(d)).is_ok() {
            return;
        }
        if let Some(tx) = self.tx.clone() {
            let spawned = std::thread::Builder::new()
                .name("regfs-disk-forget".into())
                .spawn(move || {
                    let _ = tx.send(Job::Forget(d));
                });
            if let Err(e) = spawned {
                log::warn!("disk cache: could not queue dropping a bad blob's blocks: {e}");
            }
        }
    }

    /// Wait until the writer has done everything queued before this call.
    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|t| t.send(Job::Barrier(tx)).is_ok());
        if sent {
            let _ = rx.recv();
        }
    }

    /// Queue a job without waiting (refused when the queue is full).
    fn send(&self, job: Job) -> Result<(), ()> {
        match &self.tx {
            Some(t) => t.try_send(job).map_err(|_| ()),
            None => Err(()),
        }
    }

    pub fn stats(&self) -> DiskStats {
        let c = &self.inner.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (bytes, entries) = {
            let l = lock(&self.inner.lru);
            (l.used(), l.len() as u64)
        };
        DiskStats {
            hits: g(&c.hits),
            misses: g(&c.misses),
            evictions: g(&c.evictions),
            checksum_failures: g(&c.checksum_failures),
            map_mismatches: g(&c.map_mismatches),
            passthrough_opens: g(&c.passthrough_opens),
            blocks_written: g(&c.blocks_written),
            blocks_dropped: g(&c.blocks_dropped),
            room_waits_expired: g(&c.room_waits_expired),
            blobs_assembled: g(&c.blobs_assembled),
            bytes,
            entries,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

/// The sha256 of a block, as chunk maps hold it.
pub fn block_sha256(data: &[u8]) -> [u8; 32] {
    block::sha256(data)
}

fn map_key(digest: &str, blob_size: u64, block_size: u64) -> Option<MapKey> {
    Some(MapKey {
        digest: digest_bytes(digest)?,
        blob_size,
        block_size,
    })
}

/// The header a block file for `key` must carry (without its sum), or None for keys that
/// cannot be cached (not sha256, index past the end).
fn want_header(key: &BlockKey) -> Option<Header> {
    Some(Header {
        digest: digest_bytes(key.digest.as_str())?,
        blob_size: key.blob_size,
        block_size: key.block_size,
        index: key.index,
        len: block_len(key.blob_size, key.block_size, key.index)?,
        sha256: [0; 32],
    })
}

impl Inner {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn remember_map(&self, mk: MapKey, sums: Option<Sums>) {
        let mut maps = lock(&self.maps);
        if maps.len() >= MAPS_IN_MEMORY && !maps.contains_key(&mk) {
            maps.clear();
        }
        maps.insert(mk, sums);
    }

    /// The verified map of a blob: from memory, else from its file.
    fn map(&self, mk: &MapKey) -> Option<Sums> {
        if let Some(m) = lock(&self.maps).get(mk) {
            return m.clone();
        }
        let n = mk.blocks()?;
        let p = mk.path(&self.dir.join("maps"));
        let loaded = files::read_capped(&p, 64 + 32 * (n + 1))
            .ok()
            .and_then(|b| map::decode(mk, &b))
            .map(Arc::new);
        self.remember_map(mk.clone(), loaded.clone());
        loaded
    }

    /// A damaged entry: drop it and count it.
    fn drop_damaged(&self, name: &str, why: &str) {
        log::warn!("disk cache: {name} is damaged ({why}): dropped, fetched again if read");
        inc(&self.counters.checksum_failures);
        lock(&self.lru).remove(name);
        files::remove(&self.path(name));
        if name.starts_with("blobs/") {
            files::remove(&self.path(&format!("{name}.ok")));
        }
    }

    fn read_block(&self, key: &BlockKey) -> Option<Bytes> {
        let want = want_header(key)?;
        let hex = key.digest.hex();
        let mk = MapKey {
            digest: want.digest,
            blob_size: key.blob_size,
            block_size: key.block_size,
        };
        let sums = self.map(&mk);
        let expected = sums
            .as_ref()
            .and_then(|s| s.get(usize::try_from(key.index).ok()?).copied());
        if let Some(exp) = expected {
            if let Some(b) = whole::read_piece(self, &want, hex, exp) {
                return Some(b);
            }
        }
        let name = block_name(hex, key.blob_size, key.block_size, key.index);
        let bytes = files::read_capped(&self.path(&name), HEADER_LEN as u64 + want.len).ok()?;
        match block::decode(&bytes, &want) {
            Ok((_, sum)) if expected.is_some_and(|e| e != sum) => {
                self.drop_damaged(&name, "not what the blob's chunk map says");
                None
            }
            Ok(_) => {
                lock(&self.lru).touch(&name);
                Some(Bytes::from(bytes).slice(HEADER_LEN..))
            }
            Err(e) => {
                self.drop_damaged(&name, &format!("{e:?}"));
                None
            }
        }
    }

    /// Evict least recently used entries until `bytes` more fit under the cap; false if they
    /// never can.
    fn make_room(&self, bytes: u64) -> bool {
        if bytes > self.cap {
            return false;
        }
        loop {
            let victim = {
                let mut l = lock(&self.lru);
                if l.used().saturating_add(bytes) <= self.cap {
                    return true;
                }
                l.pop_oldest()
            };
            let Some((name, _)) = victim else {
                return true;
            };
            inc(&self.counters.evictions);
            files::remove(&self.path(&name));
            if name.starts_with("blobs/") {
                files::remove(&self.path(&format!("{name}.ok")));
            }
        }
    }

    /// Write one block (writer thread).
    fn store_block(&self, key: &BlockKey, data: &[u8]) {
        let Some(mut h) = want_header(key) else {
            return;
        };
        if h.len != data.len() as u64 {
            return;
        }
        let hex = key.digest.hex().to_string();
        if lock(&self.lru).contains(&whole_name(&hex, key.blob_size)) {
            return;
        }
        h.sha256 = block::sha256(data);
        let mk = MapKey {
            digest: h.digest,
            blob_size: key.blob_size,
            block_size: key.block_size,
        };
        let sums = self.map(&mk);
        if let Some(s) = &sums {
            if usize::try_from(key.index).ok().and_then(|i| s.get(i)) != Some(&h.sha256) {
                inc(&self.counters.map_mismatches);
                return;
            }
        }
        let name = block_name(&hex, key.blob_size, key.block_size, key.index);
        let bytes = on_disk(HEADER_LEN as u64 + h.len);
        if !self.make_room(bytes) {
            return;
        }
        let p = self.path(&name);
        if let Some(parent) = p.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let head = block::encode(&h, &[]);
        match files::write_atomic(&p, &[&head, data], false) {
            Ok(()) => {
                lock(&self.lru).insert(name, bytes);
                inc(&self.counters.blocks_written);
                if let Some(s) = sums {
                    whole::maybe_assemble(self, &mk, &s);
                }
            }
            Err(e) => log::warn!("disk cache: writing {}: {e}", p.display()),
        }
    }

    /// A map arrived (writer thread): persist it, drop blocks that disagree, maybe assemble.
    fn store_map(&self, mk: &MapKey, sums: &[[u8; 32]]) {
        let p = mk.path(&self.dir.join("maps"));
        if let Err(e) = files::write_atomic(&p, &[&map::encode(mk, sums)], true) {
            log::warn!("disk cache: writing {}: {e}", p.display());
        }
        let hex = hex::encode(mk.digest);
        let prefix = format!("blocks/{hex}/{}.{}.", mk.blob_size, mk.block_size);
        let names = lock(&self.lru).with_prefix(&prefix);
        for name in names {
            let Some(index) = name[prefix.len()..].parse::<usize>().ok() else {
                continue;
            };
            let Ok(bytes) = files::read_capped(&self.path(&name), HEADER_LEN as u64) else {
                continue;
            };
            let ok =
                block::parse_header(&bytes).is_some_and(|h| sums.get(index) == Some(&h.sha256));
            if !ok {
                self.drop_damaged(&name, "not what the blob's chunk map says");
            }
        }
        whole::maybe_assemble(self, mk, sums);
    }

    fn forget(&self, digest: &[u8; 32]) {
        let hex = hex::encode(digest);
        let names = {
            let l = lock(&self.lru);
            let mut v = l.with_prefix(&format!("blocks/{hex}/"));
            v.extend(l.with_prefix(&format!("blobs/{hex}.")));
            v
        };
        for name in names {
            lock(&self.lru).remove(&name);
            files::remove(&self.path(&name));
            if name.starts_with("blobs/") {
                files::remove(&self.path(&format!("{name}.ok")));
            }
        }
    }
}

/// The writer thread: runs until the cache is dropped (every sender gone).
fn writer(inner: Arc<Inner>, rx: Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        match job {
            Job::Put(key, data, epoch) => {
                if epoch < inner.forgets.load(Ordering::SeqCst) {
                    // Fetched before a forget asked for since: maybe the forgotten blob's.
                    inc(&inner.counters.blocks_dropped);
                } else {
                    inner.store_block(&key, &data);
                }
                inner.queued_bytes.fetch_sub(data.len(), Ordering::SeqCst);
                inner.drained.notify_waiters();
            }
            Job::Mapped(mk, sums) => inner.store_map(&mk, &sums),
            Job::Forget(d) => inner.forget(&d),
            Job::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests;
