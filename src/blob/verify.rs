//! Whole-blob verification of what a handle reads, off the reply path. A handle that reads a
//! blob larger than a block hands each piece it replies with (a slice of cached bytes, no copy)
//! to its own hashing task ([`HashFeed`]); the task runs the [`Verifier`] on another thread. The
//! read whose piece completes the blob waits for the verdict, so a `cat` of a bad blob still
//! fails on its last read, and no read takes a lock while hashing.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::cache::ChunkCache;
use crate::digest::{Digest, StreamingDigest};

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

/// What feeding a verifier found.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Stashed pieces by offset, each with what it is counted as (see [`Verifier::sharing`]).
    pending: BTreeMap<u64, (Bytes, usize)>,
    pending_bytes: usize,
    budget: Arc<VerifyBudget>,
    /// The block size of the pieces fed, when long ones may be stashed without a copy (see
    /// [`Verifier::sharing`]).
    share_block: Option<usize>,
    /// Gave up (data too far out of order) or already finished.
    done: bool,
    /// The blob failed verification: every later read through this handle fails too, so a
    /// kernel retry of a failed readahead cannot slip the bad bytes through.
    failed: Option<String>,
    /// disk tier: the sha256 of each block as the stream passes.
    blocks: Option<BlockSums>,
}

/// The sha256 of a whole stream and of each of its blocks, in one pass (a plain tar layer's
/// index pass, which reads the blob in order anyway).
pub struct StreamHasher {
    whole: StreamingDigest,
    blocks: BlockSums,
}

impl StreamHasher {
    pub fn new(block_size: u64) -> Self {
        StreamHasher {
            whole: StreamingDigest::default(),
            blocks: BlockSums {
                size: block_size.max(1),
                current: Default::default(),
                filled: 0,
                done: Vec::new(),
            },
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.whole.update(data);
        self.blocks.update(data);
    }

    /// Bytes hashed so far.
    pub fn bytes(&self) -> u64 {
        self.whole.bytes
    }

    /// The stream's digest (`sha256:...`) and its blocks' sha256s.
    pub fn finish(mut self) -> (String, Vec<[u8; 32]>) {
        if self.blocks.filled > 0 {
            self.blocks.finish_block();
        }
        (self.whole.finish(), self.blocks.done)
    }
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
            share_block: None,
            done: false,
            failed: None,
            blocks: None,
        }
    }

    /// Stash pieces of at least half a block of `block_size` without copying them, counted
    /// at twice the larger of their length and a block: such a piece keeps at most that much
    /// memory alive (a slice of one cached block, whose buffer is at most twice a block, or a
    /// read's own buffer, which the pool sizes within twice its length). Out-of-order 1 MiB
    /// kernel readahead pieces are then never copied; small ones still are. The price: a
    /// handle's 16 MiB stash holds 8 such pieces, not 16.
    pub fn sharing(mut self, block_size: u64) -> Self {
        self.share_block = Some(usize::try_from(block_size).unwrap_or(usize::MAX));
        self
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
            b.update(data);
        }
    }

    /// The digest the blob was found to have, if it failed.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Stop verifying and free the stash.
    fn give_up(&mut self) -> Checked {
        self.done = true;
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
            // A piece already stashed at this offset that is as long covers this one (a
            // re-read): keep it, never lose the bytes between a shorter piece's end and its.
            if self
                .pending
                .get(&offset)
                .is_some_and(|(old, _)| old.len() >= data.len())
            {
                return Checked::Pending;
            }
            // A short piece is copied: a slice would keep its whole chunk alive while it
            // waits here. A long one is kept as it is, counted at twice the larger of its
            // length and a block (see `sharing`).
            let shared = self
                .share_block
                .filter(|bs| data.len() >= bs.div_ceil(2).max(1));
            let (piece, cost) = if let Some(bs) = shared {
                (data.clone(), data.len().max(bs).saturating_mul(2))
            } else {
                (Bytes::copy_from_slice(data), data.len())
            };
            if offset - next >= VERIFY_WINDOW
                || self.pending_bytes.saturating_add(cost) > MAX_PENDING_VERIFY
                || !self.budget.take(cost)
            {
                return self.give_up();
            }
            self.pending_bytes += cost;
            self.pending
                .insert(offset, (piece, cost))
                .inspect(|(_, old)| {
                    self.pending_bytes -= old;
                    self.budget.give(*old);
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
            let Some((_, (piece, cost))) = self.pending.pop_first() else {
                break;
            };
            self.pending_bytes -= cost;
            self.budget.give(cost);
            let pend = off + piece.len() as u64;
            if pend > next {
                self.absorb(&piece[(next - off) as usize..]);
            }
        }
        if self.hasher.bytes >= self.size {
            self.done = true;
            let actual = std::mem::take(&mut self.hasher).finish();
            if actual != self.digest.as_str() {
                self.failed = Some(actual.clone());
                return Checked::Mismatch(actual);
            }
            return Checked::Verified;
        }
        Checked::Pending
    }
}

/// Pieces a handle may have queued for its hashing task. Each is at most one FUSE read (1 MiB),
/// a slice of cached bytes: 16 keeps the hasher busy while pinning at most 16 MiB.
const FEED_DEPTH: usize = 16;

/// Byte ranges a handle has sent to its hasher; past this many separate ranges it stops
/// tracking (and verifying): that is random access, not a reader streaming the blob.
const MAX_SENT_RANGES: usize = 1024;

/// What a blob's verdict changes, shared by every handle of one mount.
#[derive(Clone)]
pub struct Verdicts {
    pub verified: Arc<Mutex<HashSet<Digest>>>,
    pub cache: Arc<ChunkCache>,
    /// The disk tier and its block size, whose chunk map a verified blob gets.
    pub disk: Option<(Arc<crate::disk::DiskCache>, u64)>,
}

impl Verdicts {
    /// Record a final outcome: a verified blob is remembered (with its chunk map, on a disk
    /// tier), a bad one's cached bytes go, from memory and disk.
    fn record(&self, digest: &Digest, size: u64, outcome: &Checked, sums: Option<Vec<[u8; 32]>>) {
        match outcome {
            Checked::Verified => {
                crate::sync::lock(&self.verified).insert(digest.clone());
                if let (Some((disk, bs)), Some(sums)) = (&self.disk, sums) {
                    disk.record_map(digest, size, *bs, sums);
                }
            }
            Checked::Mismatch(_) => {
                self.cache.evict_digest(digest);
                if let Some((disk, _)) = &self.disk {
                    disk.forget(digest);
                }
            }
            Checked::Pending => {}
        }
    }
}

struct Piece {
    offset: u64,
    data: Bytes,
    /// Set on the piece after which every byte has been sent: told the final verdict.
    verdict: Option<oneshot::Sender<Checked>>,
}

/// One handle's side of its hashing task.
pub struct HashFeed {
    tx: Option<mpsc::Sender<Piece>>,
    size: u64,
    /// Ranges sent so far, merged (start -> end).
    sent: BTreeMap<u64, u64>,
    /// The digest the blob was found to have, once it failed.
    failed: Arc<OnceLock<String>>,
}

/// What a read hands its hasher, taken from the [`HashFeed`] under the handle's lock and sent
/// after it is released.
pub struct Send {
    tx: mpsc::Sender<Piece>,
    piece: Piece,
    verdict: Option<oneshot::Receiver<Checked>>,
}

impl Send {
    /// Queue the piece (waits only when the hasher is [`FEED_DEPTH`] pieces behind); for the
    /// piece that completes the blob, wait for the verdict.
    pub async fn run(self) -> Checked {
        let Send { tx, piece, verdict } = self;
        if tx.send(piece).await.is_err() {
            return Checked::Pending;
        }
        // Our sender goes before we wait: if the hasher can never finish (a piece it needs will
        // not come), the channel closes once every read has sent, and the wait ends Pending.
        drop(tx);
        match verdict {
            // The hasher dropped the sender: it gave up, so there is no verdict.
            Some(rx) => rx.await.unwrap_or(Checked::Pending),
            None => Checked::Pending,
        }
    }
}

impl HashFeed {
    /// Start the hashing task for one handle reading `digest` (`size` bytes, read in blocks of
    /// `block_size` through the cache).
    pub fn start(
        digest: Digest,
        size: u64,
        block_size: u64,
        budget: Arc<VerifyBudget>,
        verdicts: Verdicts,
    ) -> HashFeed {
        let (tx, rx) = mpsc::channel(FEED_DEPTH);
        let failed = Arc::new(OnceLock::new());
        let v = Verifier::new(digest, size, budget).sharing(block_size);
        let v = match &verdicts.disk {
            Some((_, bs)) => v.with_block_sums(*bs),
            None => v,
        };
        tokio::spawn(hash_task(v, rx, verdicts, failed.clone()));
        HashFeed {
            tx: Some(tx),
            size,
            sent: BTreeMap::new(),
            failed,
        }
    }

    /// The digest the blob was found to have, if it failed.
    pub fn failed(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// The hand-off for `data`, read at `offset`, or `None` when nothing is to be sent (no
    /// longer verifying).
    pub fn prepare(&mut self, offset: u64, data: &Bytes) -> Option<Send> {
        let tx = self.tx.as_ref()?;
        if data.is_empty() {
            return None;
        }
        if tx.is_closed() {
            self.tx = None; // the hasher finished or gave up
            return None;
        }
        let tx = tx.clone();
        let end = offset.saturating_add(data.len() as u64);
        if !self.note_sent(offset, end) {
            self.tx = None;
            return None;
        }
        let complete = self.sent.get(&0).is_some_and(|&e| e >= self.size);
        let (verdict, rx) = if complete {
            let (t, r) = oneshot::channel();
            // Nothing more to send after this piece.
            self.tx = None;
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        Some(Send {
            tx,
            piece: Piece {
                offset,
                data: data.clone(),
                verdict,
            },
            verdict: rx,
        })
    }

    /// Merge `start..end` into the sent ranges; false when there are too many to track.
    fn note_sent(&mut self, start: u64, end: u64) -> bool {
        let (mut s, mut e) = (start, end);
        // Every range that overlaps or touches s..e merges into it.
        let touching: Vec<u64> = self
            .sent
            .range(..=e)
            .rev()
            .take_while(|(_, &re)| re >= s)
            .map(|(&rs, _)| rs)
            .collect();
        for rs in touching {
            if let Some(re) = self.sent.remove(&rs) {
                s = s.min(rs);
                e = e.max(re);
            }
        }
        self.sent.insert(s, e);
        self.sent.len() <= MAX_SENT_RANGES
    }
}

/// One handle's hashing task: feeds the verifier in the order pieces come, records the final
/// outcome, and tells it to whoever sent the last piece.
async fn hash_task(
    mut v: Verifier,
    mut rx: mpsc::Receiver<Piece>,
    verdicts: Verdicts,
    failed: Arc<OnceLock<String>>,
) {
    let digest = v.digest.clone();
    // The sender of the completing piece may queue it before a piece sent just before it:
    // keep its answer until the verdict is in.
    let mut waiting: Vec<oneshot::Sender<Checked>> = Vec::new();
    while let Some(p) = rx.recv().await {
        waiting.extend(p.verdict);
        let outcome = v.feed(p.offset, &p.data);
        // The reply has usually gone by now: its buffer is free for the next fetch.
        verdicts.cache.recycle_one(p.data);
        if outcome != Checked::Pending {
            let sums = v.take_block_sums();
            verdicts.record(&digest, v.size, &outcome, sums);
            if let Checked::Mismatch(actual) = &outcome {
                let _ = failed.set(actual.clone());
            }
            for w in waiting.drain(..) {
                let _ = w.send(outcome.clone());
            }
            return;
        }
        if v.done {
            return; // gave up: dropping `waiting` answers Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(data: &[u8]) -> (Digest, Vec<Bytes>) {
        let d = Digest::from(crate::digest::sha256_digest(data));
        (d, data.chunks(4).map(Bytes::copy_from_slice).collect())
    }

    #[test]
    fn a_shorter_re_read_never_replaces_a_stashed_piece() {
        let data = b"0123456789abcdef";
        let (d, _) = blob(data);
        let mut v = Verifier::new(d, 16, budget());
        let b = |r: std::ops::Range<usize>| Bytes::copy_from_slice(&data[r]);
        assert_eq!(v.feed(8, &b(8..16)), Checked::Pending);
        assert_eq!(v.feed(8, &b(8..10)), Checked::Pending);
        assert_eq!(v.feed(0, &b(0..8)), Checked::Verified);
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
    fn long_stashed_pieces_are_kept_as_they_are_and_counted_twice() {
        let data: Vec<u8> = (0..64u32).map(|i| i as u8).collect();
        let d = Digest::from(crate::digest::sha256_digest(&data));
        let shared = Arc::new(VerifyBudget::new(1 << 20));
        // Blocks of 16 bytes: pieces of 8 or more are shared.
        let mut v = Verifier::new(d, 64, shared.clone()).sharing(16);
        let whole = Bytes::from(data.clone());
        let long = whole.slice(16..32);
        assert_eq!(v.feed(16, &long), Checked::Pending);
        let (_, (piece, cost)) = v.pending.first_key_value().unwrap();
        assert_eq!(piece.as_ptr(), long.as_ptr(), "not copied");
        assert_eq!(*cost, 32);
        assert_eq!(shared.used(), 32);
        assert_eq!(v.feed(40, &whole.slice(40..44)), Checked::Pending); // short: copied
        assert_eq!(shared.used(), 36);
        assert_eq!(v.feed(32, &whole.slice(32..40)), Checked::Pending);
        assert_eq!(v.feed(44, &whole.slice(44..64)), Checked::Pending);
        assert_eq!(v.feed(0, &whole.slice(0..16)), Checked::Verified);
        assert_eq!(shared.used(), 0, "every stashed piece gave its budget back");
    }

    #[test]
    fn stashed_pieces_are_copies_and_share_one_budget() {
        let (d, _) = blob(b"x");
        let shared = Arc::new(VerifyBudget::new(10));
        let chunk = Bytes::from(vec![1u8; 4 << 20]);
        let mut a = Verifier::new(d.clone(), u64::MAX, shared.clone());
        a.feed(4096, &chunk.slice(4096..4104)); // 8 bytes of a 4 MiB chunk
        let (_, (piece, _)) = a.pending.first_key_value().unwrap();
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
