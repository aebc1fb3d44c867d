//! Fetching blocks: the runs of blocks nobody has become Range requests of at most
//! `max_request` bytes (`max_request_near` while the registry's blob answers come within
//! `near`), each spawned on the runtime (a reader that goes away does not cancel a
//! fetch others wait on) and streamed: every block is cached and handed to its waiters the
//! moment its last byte arrives. Prefetch runs only start within the shared prefetch budget.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::memory::{BlockMemory, SlotBuf};
use super::{BlobRef, Blobs};
use crate::cache::{ChunkCache, Claim, Fetching, SharedError};
use crate::disk::{BlockKey, DiskCache, MapCheck};
use crate::error::RegistryError;
use crate::registry::Registry;

/// The registry error a shared fetch failed with.
pub(crate) fn registry_error(e: &SharedError) -> RegistryError {
    match e.downcast_ref::<RegistryError>() {
        Some(e) => e.clone(),
        None => RegistryError::Transport("a shared fetch failed".into()),
    }
}

impl Blobs {
    /// Make sure blocks `first..last` of a blob are cached or in flight. A prefetch claims
    /// blocks only while the prefetch budget has room, and stops at the first that does not fit.
    /// A read gets back what it must wait on for each block (cached bytes or a flight), so it
    /// gets the outcome of the very fetch it started. A prefetch cut short by the budget says
    /// where it stopped (a byte offset), for the reader's window to ask from there next time.
    pub(super) fn start(
        &self,
        blob: &BlobRef,
        first: u64,
        last: u64,
        prefetch: bool,
    ) -> (Vec<Slot>, Option<u64>) {
        let mut slots = Vec::new();
        let mut held_back = None;
        let bs = self.cfg.block_size;
        let last = last.min(blob.size.div_ceil(bs));
        // Worked out at the first block to fetch: a read of cached blocks needs no estimate.
        let mut per_request = None;
        let mut run: Vec<Fetching> = Vec::new();
        for index in first..last {
            let key = Self::key(blob, index);
            if prefetch && self.cache.contains(&key) {
                continue; // a prefetch does not even touch what is cached
            }
            let claimed = if prefetch && !self.take_budget(block_len(blob.size, bs, index)) {
                None
            } else {
                match self.cache.claim(&key) {
                    Claim::Fetch(mut f) => {
                        if prefetch {
                            f.reserve_for_prefetch(block_len(blob.size, bs, index));
                        } else {
                            f.reserve(block_len(blob.size, bs, index));
                        }
                        if !prefetch {
                            slots.push(Slot::Wait(f.flight()));
                        }
                        Some(f)
                    }
                    other => {
                        if prefetch {
                            self.give_budget(block_len(blob.size, bs, index));
                        } else {
                            slots.push(match other {
                                Claim::Ready(b) => Slot::Ready(b),
                                Claim::Wait(f) => Slot::Wait(f),
                                Claim::Fetch(_) => unreachable!("matched above"),
                            });
                        }
                        None
                    }
                }
            };
            let out_of_budget = prefetch && claimed.is_none() && !self.has_budget(blob, index);
            match claimed {
                Some(f) => {
                    // Runs are contiguous: a gap ends the current one.
                    let contiguous = run.last().is_none_or(|l| block_index(l) + 1 == index);
                    let per_request = *per_request
                        .get_or_insert_with(|| (self.max_request() / bs).max(1) as usize);
                    if !contiguous || run.len() == per_request {
                        self.spawn_run(blob, std::mem::take(&mut run), prefetch);
                    }
                    run.push(f);
                }
                None => {
                    if !run.is_empty() {
                        self.spawn_run(blob, std::mem::take(&mut run), prefetch);
                    }
                    if out_of_budget {
                        held_back = Some(index.saturating_mul(bs));
                        break;
                    }
                }
            }
        }
        if !run.is_empty() {
            self.spawn_run(blob, run, prefetch);
        }
        (slots, held_back)
    }

    /// The largest request now: [`EngineConfig::max_request_near`] while the registry's blob
    /// answers come within `near`, else [`EngineConfig::max_request`]; with a disk tier at most
    /// [`crate::disk::MAX_REQUEST_WITH_DISK`].
    ///
    /// [`EngineConfig::max_request_near`]: super::EngineConfig::max_request_near
    /// [`EngineConfig::max_request`]: super::EngineConfig::max_request
    fn max_request(&self) -> u64 {
        let most = match self.reg.blob_latency() {
            Some(l) if l <= self.cfg.near => self.cfg.max_request_near,
            _ => self.cfg.max_request,
        };
        match self.disk {
            Some(_) => most.min(crate::disk::MAX_REQUEST_WITH_DISK.max(self.cfg.block_size)),
            None => most,
        }
    }

    fn has_budget(&self, blob: &BlobRef, index: u64) -> bool {
        let need = block_len(blob.size, self.cfg.block_size, index);
        self.prefetching.load(Ordering::Relaxed) + need <= self.cfg.prefetch_budget
    }

    fn take_budget(&self, n: u64) -> bool {
        let prev = self.prefetching.fetch_add(n, Ordering::SeqCst);
        if prev + n > self.cfg.prefetch_budget {
            self.prefetching.fetch_sub(n, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn give_budget(&self, n: u64) {
        self.prefetching.fetch_sub(n, Ordering::SeqCst);
    }

    /// Fetch a contiguous run of claimed blocks with one streamed Range request, on the runtime.
    pub(super) fn spawn_run(&self, blob: &BlobRef, run: Vec<Fetching>, prefetch: bool) {
        let Some(first) = run.first().map(block_index) else {
            return;
        };
        let bs = self.cfg.block_size;
        let held = if prefetch {
            run.iter()
                .map(|f| block_len(blob.size, bs, block_index(f)))
                .sum()
        } else {
            0
        };
        let release = BudgetRelease {
            counter: self.prefetching.clone(),
            held,
        };
        let src = Source {
            reg: self.reg.clone(),
            disk: self.disk.clone(),
            cache: self.cache.clone(),
            maps: self.maps.clone(),
            memory: self.memory.clone(),
        };
        let blob = blob.clone();
        tokio::spawn(async move {
            let _release = release;
            if src.disk.is_some() {
                from_disk_then_registry(&src, blob, bs, run, prefetch).await
            } else {
                fetch_run(&src, blob, bs, first, run, prefetch).await
            }
        });
    }
}

/// What a read waits on for one block.
pub(super) enum Slot {
    Ready(Bytes),
    Wait(Arc<crate::cache::Flight>),
}

/// Gives a prefetch's budget back when its request ends, however it ends.
struct BudgetRelease {
    counter: Arc<AtomicU64>,
    held: u64,
}

impl Drop for BudgetRelease {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.held, Ordering::SeqCst);
    }
}

fn block_index(f: &Fetching) -> u64 {
    match f.key() {
        crate::cache::ChunkKey::Blob { index, .. } => *index,
        _ => u64::MAX,
    }
}

/// Bytes of block `index` of a blob of `size` bytes.
pub(super) fn block_len(size: u64, bs: u64, index: u64) -> u64 {
    size.saturating_sub(index.saturating_mul(bs)).min(bs)
}

fn block_key(blob: &BlobRef, bs: u64, index: u64) -> BlockKey {
    BlockKey {
        digest: blob.digest.clone(),
        blob_size: blob.size,
        block_size: bs,
        index,
    }
}

/// With a disk tier: blocks held on disk land at once (read and checked off the runtime's
/// threads); the rest are fetched in contiguous runs, in parallel.
async fn from_disk_then_registry(
    src: &Source,
    blob: BlobRef,
    bs: u64,
    run: Vec<Fetching>,
    prefetch: bool,
) {
    let Some(disk) = src.disk.clone() else {
        return;
    };
    let keys: Vec<BlockKey> = run
        .iter()
        .map(|f| block_key(&blob, bs, block_index(f)))
        .collect();
    let d = disk.clone();
    let found =
        tokio::task::spawn_blocking(move || keys.iter().map(|k| d.get(k)).collect::<Vec<_>>())
            .await
            .unwrap_or_default();
    let mut runs: Vec<Vec<Fetching>> = Vec::new();
    for (i, f) in run.into_iter().enumerate() {
        match found.get(i).cloned().flatten() {
            Some(b) => f.fulfil(b),
            None => match runs.last_mut() {
                Some(r)
                    if r.last()
                        .is_some_and(|l| block_index(l) + 1 == block_index(&f)) =>
                {
                    r.push(f)
                }
                _ => runs.push(vec![f]),
            },
        }
    }
    let fetches = runs.into_iter().map(|r| {
        let first = block_index(&r[0]);
        fetch_run(src, blob.clone(), bs, first, r, prefetch)
    });
    futures_util::future::join_all(fetches).await;
}

/// Where a run's bytes come from and go.
struct Source {
    reg: Arc<dyn Registry>,
    disk: Option<Arc<DiskCache>>,
    cache: Arc<ChunkCache>,
    maps: Arc<super::ChunkMaps>,
    memory: Option<Arc<BlockMemory>>,
}

/// One Range request for blocks `first..first + run.len()`, landed block by block.
async fn fetch_run(
    src: &Source,
    blob: BlobRef,
    bs: u64,
    first: u64,
    run: Vec<Fetching>,
    prefetch: bool,
) {
    let start = first * bs;
    let end = (first + run.len() as u64)
        .saturating_mul(bs)
        .min(blob.size)
        .saturating_sub(1);
    if start >= blob.size {
        let e = RegistryError::Protocol(format!(
            "{}@{}: block {first} is past the end ({} bytes)",
            blob.repo, blob.digest, blob.size
        ));
        fail_all(run.into(), &e);
        return;
    }
    // With a disk tier, a prefetch first waits for room in the writer's queue for exactly the
    // blocks it is about to fetch, and holds it for them (see `DiskCache::wait_for_room`).
    let mut room = match (&src.disk, prefetch) {
        (Some(disk), true) => {
            let bytes = usize::try_from(end + 1 - start).unwrap_or(usize::MAX);
            Some(disk.wait_for_room(bytes, crate::disk::MAX_ROOM_WAIT).await)
        }
        _ => None,
    };
    let map = crate::sync::lock(&src.maps)
        .get(&(blob.digest.clone(), blob.size, bs))
        .cloned();
    let mut asm = Assembler {
        blob: &blob,
        map: map.as_deref().map(Vec::as_slice),
        cache: &src.cache,
        memory: src.memory.as_ref().filter(|_| prefetch),
        disk: src.disk.as_deref(),
        bs,
        next: first,
        waiting: run.into(),
        cur: Filling::Empty,
        failed: None,
        room: room.as_mut(),
    };
    let r = src
        .reg
        .blob_range_into(&blob.repo, &blob.digest, start, end, &mut |piece| {
            asm.push(piece)
        })
        .await;
    let failed = asm.failed.take();
    let waiting = std::mem::take(&mut asm.waiting);
    let err = match (r, failed) {
        (_, Some(e)) | (Err(e), None) => e,
        (Ok(()), None) if waiting.is_empty() => return,
        (Ok(()), None) => RegistryError::Protocol(format!(
            "{}@{}: asked for bytes {start}-{end}, the answer ended early",
            blob.repo, blob.digest
        )),
    };
    fail_all(waiting, &err);
}

fn fail_all(waiting: VecDeque<Fetching>, e: &RegistryError) {
    Fetching::fail_all(waiting, Arc::new(e.clone()));
}

/// Cuts a streamed body into blocks and lands each one as soon as it is whole.
struct Assembler<'a> {
    blob: &'a BlobRef,
    /// The blob's verified chunk map in memory, if it has one.
    map: Option<&'a [[u8; 32]]>,
    cache: &'a ChunkCache,
    /// Slots for blocks (else heap buffers): a prefetch's only. A reader's own blocks (random
    /// access) take heap memory that is freed once evicted: 64 random readers over a 64 MiB
    /// cache peaked 4 to 9 MiB higher when their blocks took slots too, since a slot's memory
    /// stays mapped after the burst that filled it.
    memory: Option<&'a Arc<BlockMemory>>,
    disk: Option<&'a DiskCache>,
    bs: u64,
    /// The block being filled.
    next: u64,
    waiting: VecDeque<Fetching>,
    cur: Filling,
    /// A block failed its check: the rest of the body is ignored.
    failed: Option<RegistryError>,
    /// Room held in the disk writer's queue for these blocks (a prefetch).
    room: Option<&'a mut crate::disk::Room>,
}

impl Assembler<'_> {
    /// Take the next piece of the body; `Break` once no block can use more of it (a block
    /// failed its check, or every block has landed).
    fn push(&mut self, mut piece: Bytes) -> std::ops::ControlFlow<()> {
        while !piece.is_empty() && self.failed.is_none() && !self.waiting.is_empty() {
            let want = block_len(self.blob.size, self.bs, self.next) as usize;
            let need = want - self.cur.len();
            let take = need.min(piece.len());
            if self.cur.is_empty() && take == want {
                // The whole block in one piece: no copy.
                self.land(piece.slice(..take));
            } else {
                if let Filling::Empty = self.cur {
                    self.cur = self.buffer(want);
                }
                self.cur.extend_from_slice(&piece[..take]);
                if self.cur.len() == want {
                    let block = std::mem::replace(&mut self.cur, Filling::Empty).freeze();
                    self.land(block);
                }
            }
            piece = piece.slice(take..);
        }
        if self.failed.is_some() || self.waiting.is_empty() {
            return std::ops::ControlFlow::Break(());
        }
        std::ops::ControlFlow::Continue(())
    }

    /// Memory for the next block: the buffer of the chunk its fetch displaced, when it kept
    /// one; else a slot; else a fresh heap buffer.
    fn buffer(&mut self, want: usize) -> Filling {
        if let Some(b) = self.waiting.front_mut().and_then(Fetching::take_buffer) {
            return Filling::Heap(b);
        }
        match self.memory.and_then(|m| m.take(want)) {
            Some(s) => Filling::Slot(s),
            None => Filling::Heap(self.cache.buffer(want)),
        }
    }

    fn land(&mut self, block: Bytes) {
        let Some(f) = self.waiting.pop_front() else {
            return;
        };
        self.next += 1;
        let index = self.next - 1;
        // A blob that is one block is checked against its digest before anyone sees it.
        let whole = block.len() as u64 == self.blob.size && self.blob.digest.is_sha256();
        if whole {
            if let Err(e) = crate::digest::verify(&self.blob.digest, &block) {
                f.fail(Arc::new(e.clone()));
                self.failed = Some(e);
                return;
            }
        }
        if let Some(map) = self.map {
            let sum = crate::disk::block_sha256(&block);
            if usize::try_from(index).ok().and_then(|i| map.get(i)) != Some(&sum) {
                let e = RegistryError::DigestMismatch {
                    expected: format!(
                        "{} block {index} as its verified chunk map says",
                        self.blob.digest
                    ),
                    actual: crate::digest::sha256_digest(&block),
                };
                f.fail(Arc::new(e.clone()));
                self.failed = Some(e);
                return;
            }
        }
        if let Some(disk) = self.disk {
            let key = block_key(self.blob, self.bs, index);
            if whole {
                // Verified whole: its chunk map is the one block's hash.
                let sum = crate::disk::block_sha256(&block);
                disk.record_map(&self.blob.digest, self.blob.size, self.bs, vec![sum]);
            }
            // A blob verified once has a chunk map: every block fetched since is checked
            // against it before anyone sees it, and a bad one is never cached.
            // (Checked once: a blob with a map in memory was checked against it above.)
            if self.map.is_none() && disk.check(&key, &block) == MapCheck::Mismatch {
                let e = RegistryError::DigestMismatch {
                    expected: format!(
                        "{} block {index} as its verified chunk map says",
                        self.blob.digest
                    ),
                    actual: crate::digest::sha256_digest(&block),
                };
                f.fail(Arc::new(e.clone()));
                self.failed = Some(e);
                return;
            }
            // Asked for before its blob was found bad: kept nowhere (fulfil caches nothing). The
            // epoch is read first, so a verdict between the check and the put drops the block.
            let epoch = disk.epoch();
            if !f.is_poisoned() {
                disk.put_within(&key, block.clone(), self.room.as_deref_mut(), epoch);
            }
        }
        f.fulfil(block);
    }
}

/// The block an [`Assembler`] is filling, and where its bytes go.
enum Filling {
    Empty,
    Heap(BytesMut),
    Slot(SlotBuf),
}

impl Filling {
    fn len(&self) -> usize {
        match self {
            Filling::Empty => 0,
            Filling::Heap(b) => b.len(),
            Filling::Slot(s) => s.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn extend_from_slice(&mut self, bytes: &[u8]) {
        match self {
            Filling::Empty => *self = Filling::Heap(BytesMut::from(bytes)),
            Filling::Heap(b) => b.extend_from_slice(bytes),
            Filling::Slot(s) => s.extend_from_slice(bytes),
        }
    }

    fn freeze(self) -> Bytes {
        match self {
            Filling::Empty => Bytes::new(),
            Filling::Heap(b) => b.freeze(),
            Filling::Slot(s) => s.freeze(),
        }
    }
}
