//! Memory for fetched blocks: one mapping, reserved when the mount starts for the cache's cap
//! plus a sixteenth, cut into block-sized slots that are handed out lowest first and come back
//! when the last holder of a block lets go. The mapping asks for transparent huge pages.
//!
//! Why: a cold sequential read fills the cache with fresh memory, and every fresh 4 KiB page is a
//! fault and a zeroing. Measured here (`perf`, a 1 GiB cold read at loopback), those faults were
//! 12 % of the daemon's CPU: filling fresh 4 KiB pages costs about 0.5 s per GiB of memory, 2 MiB
//! pages about 0.06 s. Slots that come back are filled again without any fault. A mapping that
//! is never touched costs nothing (`MAP_NORESERVE`); what is touched stays mapped for the life
//! of the mount, at most the cap plus a sixteenth, the bound the cache already keeps. When every
//! slot is held (replies and hashers still hold blocks the cache evicted), a block takes plain
//! heap memory, as before. Where the system disables transparent huge pages (`never`), the
//! slots are plain pages, still reused.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// The mapping starts on a huge page boundary, so every 2 MiB of it can be one huge page.
const HUGE_PAGE: usize = 2 << 20;

/// The reserved mapping and which of its slots are free.
pub struct BlockMemory {
    /// Where the mapping starts (`map`) and where its first slot starts (`base`, aligned).
    map: NonNull<u8>,
    map_len: usize,
    base: NonNull<u8>,
    slot: usize,
    slots: usize,
    /// A leaf lock (see `fs::inodes`): taken alone, briefly.
    free: Mutex<Free>,
    /// ctl: blocks that found no free slot and took heap memory instead.
    missed: AtomicU64,
}

/// Free slots: those given back (lowest first, so the touched part of the mapping stays
/// compact), and the untouched ones from `fresh` on.
struct Free {
    returned: BinaryHeap<Reverse<usize>>,
    fresh: usize,
    in_use: usize,
}

// SAFETY: the mapping is only reached through slots. A slot belongs to one `SlotBuf` (the only
// writer, `&mut`) until it is frozen, then to one `FrozenSlot` (read-only, shared through
// `Bytes`), and goes back to the free list only when that owner drops. The free list is under a
// mutex. So no two threads ever write the same bytes, nor read bytes being written.
unsafe impl Send for BlockMemory {}
unsafe impl Sync for BlockMemory {}

impl BlockMemory {
    /// Room for `bytes` in slots of `slot` bytes; `None` when that is no slot, or the system
    /// refuses the mapping (blocks then take heap memory, as before).
    pub fn new(slot: usize, bytes: u64) -> Option<Arc<Self>> {
        let slot = slot.checked_next_multiple_of(4096).filter(|&s| s > 0)?;
        let slots = usize::try_from(bytes).ok()? / slot;
        if slots == 0 {
            return None;
        }
        let map_len = slots.checked_mul(slot)?.checked_add(HUGE_PAGE)?;
        // SAFETY: a fresh anonymous private mapping; no memory of ours is touched.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            log::debug!(
                "no mapping of {map_len} bytes for blocks: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        let map = NonNull::new(map.cast::<u8>())?;
        let skip = map.as_ptr().align_offset(HUGE_PAGE).min(HUGE_PAGE);
        // SAFETY: `skip` < HUGE_PAGE, within the mapping.
        let base = unsafe { NonNull::new_unchecked(map.as_ptr().add(skip)) };
        // SAFETY: advice on our own mapping; failure (no THP in this kernel) changes nothing.
        unsafe {
            libc::madvise(base.as_ptr().cast(), slots * slot, libc::MADV_HUGEPAGE);
        }
        Some(Arc::new(BlockMemory {
            map,
            map_len,
            base,
            slot,
            slots,
            free: Mutex::new(Free {
                returned: BinaryHeap::new(),
                fresh: 0,
                in_use: 0,
            }),
            missed: AtomicU64::new(0),
        }))
    }

    /// A free slot to fill with up to `len` bytes, the lowest; `None` when `len` does not fit
    /// in a slot or every slot is held (counted: use heap memory then).
    pub fn take(self: &Arc<Self>, len: usize) -> Option<SlotBuf> {
        if len > self.slot {
            return None;
        }
        let index = {
            let mut free = crate::sync::lock(&self.free);
            let index = match free.returned.pop() {
                Some(Reverse(i)) => Some(i),
                None if free.fresh < self.slots => {
                    free.fresh += 1;
                    Some(free.fresh - 1)
                }
                None => None,
            };
            free.in_use += usize::from(index.is_some());
            index
        };
        let Some(index) = index else {
            self.missed.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        Some(SlotBuf {
            slot: Some(Slot {
                mem: self.clone(),
                index,
            }),
            len: 0,
        })
    }

    fn give_back(&self, index: usize) {
        let mut free = crate::sync::lock(&self.free);
        free.returned.push(Reverse(index));
        free.in_use -= 1;
    }

    fn start(&self, index: usize) -> *mut u8 {
        debug_assert!(index < self.slots);
        // SAFETY: index < slots, so the slot lies within the mapping.
        unsafe { self.base.as_ptr().add(index * self.slot) }
    }

    /// ctl: (slots, slots held now, slots ever touched, blocks that found none free).
    pub fn counts(&self) -> (usize, usize, usize, u64) {
        let free = crate::sync::lock(&self.free);
        (
            self.slots,
            free.in_use,
            free.fresh,
            self.missed.load(Ordering::Relaxed),
        )
    }
}

impl Drop for BlockMemory {
    fn drop(&mut self) {
        // SAFETY: every slot holds an `Arc` of this, so none is alive: the mapping is ours alone.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), self.map_len);
        }
    }
}

/// A slot owned by one holder; back on the free list when it drops.
struct Slot {
    mem: Arc<BlockMemory>,
    index: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.mem.give_back(self.index);
    }
}

/// A slot being filled: the one writer of its bytes.
pub struct SlotBuf {
    /// Always `Some` until [`SlotBuf::freeze`] moves it out.
    slot: Option<Slot>,
    len: usize,
}

impl SlotBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append `bytes`. The caller asked for a slot no smaller than all it appends; past the
    /// slot's end is a bug, and panics rather than write outside it.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        let Some(slot) = &self.slot else {
            return;
        };
        let end = self.len + bytes.len();
        assert!(end <= slot.mem.slot, "a block larger than its slot");
        // SAFETY: the slot is ours alone (see `BlockMemory`'s Send/Sync) and `end` is within
        // it; `bytes` is not in this slot (nobody else can reach it, and we hold `&mut self`).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                slot.mem.start(slot.index).add(self.len),
                bytes.len(),
            );
        }
        self.len = end;
    }

    /// The filled bytes, shared; the slot comes back when the last `Bytes` of them drops.
    pub fn freeze(mut self) -> Bytes {
        match self.slot.take() {
            Some(slot) => Bytes::from_owner(FrozenSlot {
                slot,
                len: self.len,
            }),
            None => Bytes::new(),
        }
    }
}

/// A filled slot, read-only from now on.
struct FrozenSlot {
    slot: Slot,
    len: usize,
}

impl AsRef<[u8]> for FrozenSlot {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the slot were written before it froze, and nobody
        // writes them again until this drops.
        unsafe { std::slice::from_raw_parts(self.slot.mem.start(self.slot.index), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_back_lowest_first() {
        let mem = BlockMemory::new(1 << 20, 3 << 20).expect("a mapping");
        assert_eq!(mem.counts().0, 3);
        let a = mem.take(1 << 20).expect("slot 0");
        let b = mem.take(100).expect("slot 1");
        let c = mem.take(1).expect("slot 2");
        assert!(mem.take(1).is_none(), "all three held");
        assert_eq!(mem.counts(), (3, 3, 3, 1));
        drop(b);
        let mut a2 = mem.take(5).expect("slot 1 again");
        a2.extend_from_slice(b"hello");
        let frozen = a2.freeze();
        assert_eq!(&frozen[..], b"hello");
        drop((a, c));
        assert_eq!(mem.counts().1, 1, "only the frozen one is held");
        let again = mem.take(1).expect("the lowest: slot 0");
        assert_eq!(again.slot.as_ref().map(|s| s.index), Some(0));
        drop(frozen);
        drop(again);
        assert_eq!(mem.counts().1, 0);
    }

    #[test]
    fn frozen_bytes_outlive_everything_else() {
        let mem = BlockMemory::new(8192, 8192).expect("a mapping");
        let mut s = mem.take(8192).expect("a slot");
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        s.extend_from_slice(&data[..4000]);
        s.extend_from_slice(&data[4000..]);
        assert_eq!(s.len(), 8192);
        let b = s.freeze();
        drop(mem);
        let part = b.slice(100..200);
        drop(b);
        assert_eq!(&part[..], &data[100..200]);
    }

    #[test]
    fn too_large_or_nothing() {
        assert!(BlockMemory::new(0, 1 << 20).is_none());
        assert!(BlockMemory::new(1 << 20, 1000).is_none());
        let mem = BlockMemory::new(4096, 4096).expect("a mapping");
        assert!(mem.take(4097).is_none());
        let empty = mem.take(10).expect("a slot").freeze();
        assert!(empty.is_empty());
    }
}
