//! Per-reader sequential detection: the readahead window. It starts at one block, doubles while
//! the reader goes forward, tolerates small skips and the kernel's out-of-order readahead, and
//! falls back to nothing on random access. Pure arithmetic, no I/O: the read path asks it what
//! to prefetch after each read.

/// A reader's readahead state, in bytes of one blob.
#[derive(Debug, Clone)]
pub struct Readahead {
    /// Where the reader is: the end of the furthest read of the current sequential run.
    next: u64,
    /// Bytes the reader has been promised ahead of `next` (the end of what was requested).
    ahead_to: u64,
    window: u64,
    init: u64,
    max: u64,
    /// A read has been seen: before that, only a read from the start counts as sequential.
    started: bool,
}

impl Readahead {
    /// A window that starts at `init` bytes and grows to `max` (0: no readahead at all).
    pub fn new(init: u64, max: u64) -> Self {
        let init = init.max(1);
        Readahead {
            next: 0,
            ahead_to: 0,
            window: init,
            init,
            max: if max == 0 { 0 } else { max.max(init) },
            started: false,
        }
    }

    /// The current window.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Note a read of `offset..end` of a blob of `size` bytes, and say what to fetch ahead of
    /// it, if anything. A read counts as sequential when it lands within one window of where
    /// the reader was (the kernel runs readahead requests in parallel, so they arrive a little
    /// out of order, and tools skip small holes); anything else is random access and resets the
    /// window (a first read counts as sequential only at the start of the blob, so a cold
    /// random read fetches its own block and nothing more). A new request is made only when less than half a window is left ahead, so
    /// requests are large, and each one doubles the window.
    pub fn on_read(&mut self, offset: u64, end: u64, size: u64) -> Option<(u64, u64)> {
        if self.max == 0 {
            return None;
        }
        let sequential = if self.started {
            offset <= self.next.saturating_add(self.window)
                && offset.saturating_add(self.window) >= self.next
        } else {
            offset == 0
        };
        self.started = true;
        if !sequential {
            self.window = self.init;
            self.next = end;
            self.ahead_to = end;
            return None;
        }
        self.next = self.next.max(end);
        self.ahead_to = self.ahead_to.max(self.next);
        let left = self.ahead_to - self.next;
        if left >= self.window / 2 || self.ahead_to >= size {
            return None;
        }
        let to = self.next.saturating_add(self.window).min(size);
        // From the end of the last request: blocks before it were asked for already (asking
        // again from the reader's position would refetch those a small cache has evicted).
        let from = self.ahead_to;
        self.ahead_to = to;
        self.window = self.window.saturating_mul(2).min(self.max);
        (to > from).then_some((from, to))
    }

    /// The prefetch asked for last stopped at byte `at` (the shared budget was spent): ask
    /// again from there on the next read instead of past it.
    pub fn held_back(&mut self, at: u64) {
        self.ahead_to = self.ahead_to.min(at.max(self.next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn a_sequential_reader_gets_growing_requests() {
        let mut r = Readahead::new(M, 16 * M);
        let mut sizes = Vec::new();
        let mut off = 0;
        while off < 200 * M {
            if let Some((a, b)) = r.on_read(off, off + 128 * 1024, 1 << 40) {
                sizes.push(b - a);
            }
            off += 128 * 1024;
        }
        assert!(sizes.len() > 4, "{sizes:?}");
        assert!(sizes.windows(2).take(4).all(|w| w[1] > w[0]), "{sizes:?}");
        assert!(sizes.iter().all(|&s| s <= 16 * M));
        assert_eq!(r.window(), 16 * M);
    }

    #[test]
    fn random_access_fetches_nothing_ahead_and_resets() {
        let mut r = Readahead::new(M, 16 * M);
        for i in 0..40 {
            r.on_read(i * M, (i + 1) * M, 1 << 40);
        }
        assert_eq!(r.window(), 16 * M);
        assert_eq!(r.on_read(900 * M, 900 * M + 4096, 1 << 40), None);
        assert_eq!(r.window(), M);
        assert_eq!(r.on_read(300 * M, 300 * M + 4096, 1 << 40), None);
        // Going on from there is sequential again, starting small.
        let (a, b) = r.on_read(300 * M + 4096, 300 * M + 8192, 1 << 40).unwrap();
        assert_eq!((a, b), (300 * M + 8192, 300 * M + 8192 + M));
    }

    #[test]
    fn out_of_order_readahead_and_small_skips_stay_sequential() {
        let mut r = Readahead::new(M, 16 * M);
        r.on_read(0, M, 1 << 40);
        r.on_read(2 * M, 3 * M, 1 << 40);
        r.on_read(M, 2 * M, 1 << 40);
        assert!(r.window() > M);
        // Never past the end of the blob.
        let mut r = Readahead::new(M, 16 * M);
        assert_eq!(r.on_read(0, 100, 3 * M), Some((100, M + 100)));
        assert_eq!(r.on_read(100, M, 3 * M), Some((M + 100, 3 * M)));
        assert_eq!(r.on_read(M, 3 * M, 3 * M), None);
    }

    #[test]
    fn a_prefetch_the_budget_held_back_is_asked_again() {
        let mut r = Readahead::new(M, 16 * M);
        assert_eq!(r.on_read(0, M, 1 << 40), Some((M, 2 * M)));
        assert_eq!(r.on_read(M, 2 * M, 1 << 40), Some((2 * M, 4 * M)));
        r.held_back(2 * M); // none of it fit the budget
        let (a, _) = r.on_read(2 * M, 3 * M, 1 << 40).unwrap();
        assert_eq!(a, 3 * M, "asked again from the reader, not past the hole");
    }
}
