//! Walk-ahead: readahead for directory walks. When `tags/` of one repository after another is
//! listed in catalog order (`ls */tags/*/`, a shell loop over repositories, `find`), the next
//! `--walk-ahead` repositories are listed ahead in the background, as a listing of their
//! `tags/` would (`fs::tree::repository`), so the walk finds them ready.
//!
//! Over a WAN each repository costs three dependent round trips (its tag list, its tags'
//! manifests, their configs for the directories' times), and a walker asks for one repository
//! at a time, so without this nothing overlaps across repositories.
//!
//! The rule, like a reader's readahead: a listing of the repository at catalog position `p`
//! continues a walk if the last repository listed sat at most [`WALK_SKIP`] positions before
//! it. Then the repositories up to `p + walk_ahead` that were not listed ahead yet are. Any other
//! listing starts a new walk and lists nothing ahead; listing one repository again changes
//! nothing. Only registries with a catalog have an order to walk (the catalog cached for the
//! listing itself: no request is made to find it).
//!
//! Bounds: [`WALK_PARALLEL`] repositories are listed ahead at a time, each resolving
//! [`WALK_TAG_CONCURRENCY`] tags at a time; a repository with more than [`WALK_TAGS`] tags gets only
//! its tag list fetched ahead. What is fetched lands in the caches a listing uses, under the
//! same TTLs, and a listing that arrives while its repository is being listed ahead waits for
//! those requests instead of sending its own (`fs::flight`). A failure is logged at debug and
//! kept nowhere: the walk's own listing asks again.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::sync::lock;

/// A walk may pass over this many repositories minus one between two listings (those it
/// filters out, such as `ls */tags/` over names that are namespaces).
pub(crate) const WALK_SKIP: usize = 4;
/// Repositories listed ahead at once. At 50 ms per round trip a repository of a few tags
/// takes about 180 ms to list, and a walker a few ms per repository it finds ready, so a walk
/// of ten outruns two at a time (1.0 s for the bench's 10 repositories) but hardly four.
pub(crate) const WALK_PARALLEL: usize = 4;
/// Tags of one repository resolved at once when it is listed ahead: with [`WALK_PARALLEL`],
/// at most 16 requests, the HTTP client's idle connections per host, on top of a listing's own
/// [`crate::fs::TAG_CONCURRENCY`].
pub(crate) const WALK_TAG_CONCURRENCY: usize = 4;
/// A repository with more tags than this has only its tag list fetched ahead: resolving them
/// all is a listing's cost, not a guess's.
pub(crate) const WALK_TAGS: usize = 64;

/// Where a walk stands.
#[derive(Default)]
struct State {
    /// Catalog position of the repository listed last.
    last: Option<usize>,
    /// Positions below this were listed ahead already (in this walk).
    until: usize,
}

/// The walk detector and the walk-ahead's bounds.
pub(crate) struct Walk {
    ahead: usize,
    state: Mutex<State>,
    slots: Arc<Semaphore>,
    /// Repositories listed ahead, started and finished (`.regfs/stats` `walk_ahead`).
    started: AtomicU64,
    finished: AtomicU64,
}

impl Walk {
    /// `ahead`: repositories listed ahead of a walk (0: none).
    pub fn new(ahead: usize) -> Self {
        Walk {
            ahead,
            state: Mutex::new(State::default()),
            slots: Arc::new(Semaphore::new(WALK_PARALLEL)),
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
        }
    }

    /// The repository at catalog position `pos` (of `len`) is being listed: the positions to
    /// list ahead now (empty unless this listing continues a walk).
    pub fn reached(&self, pos: usize, len: usize) -> Range<usize> {
        if self.ahead == 0 {
            return 0..0;
        }
        let mut s = lock(&self.state);
        match s.last {
            Some(l) if l == pos => return 0..0,
            Some(l) if pos > l && pos - l <= WALK_SKIP => {}
            _ => {
                *s = State {
                    last: Some(pos),
                    until: pos.saturating_add(1),
                };
                return 0..0;
            }
        }
        s.last = Some(pos);
        let from = s.until.max(pos + 1);
        let to = pos.saturating_add(1 + self.ahead).min(len);
        s.until = s.until.max(to);
        from..to
    }

    /// A permit to list one repository ahead (at most [`WALK_PARALLEL`] at once), counted.
    pub async fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        self.started.fetch_add(1, Ordering::Relaxed);
        Some(permit)
    }

    /// One repository listed ahead (whatever the outcome).
    pub fn done(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    /// (started, finished) repositories listed ahead.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.started.load(Ordering::Relaxed),
            self.finished.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_is_listed_ahead_once_and_a_jump_starts_over() {
        let w = Walk::new(3);
        assert_eq!(w.reached(0, 100), 0..0, "one listing is no walk");
        assert_eq!(w.reached(1, 100), 2..5);
        assert_eq!(w.reached(1, 100), 0..0, "the same repository again");
        assert_eq!(w.reached(2, 100), 5..6, "only what is new");
        assert_eq!(w.reached(5, 100), 6..9, "a skip within WALK_SKIP continues");
        assert_eq!(w.reached(50, 100), 0..0, "a jump starts a new walk");
        assert_eq!(w.reached(49, 100), 0..0, "backwards starts one too");
        assert_eq!(w.reached(50, 100), 51..54);
        assert_eq!(w.reached(98, 100), 0..0);
        assert_eq!(
            w.reached(99, 100),
            100..100,
            "nothing past the catalog's end"
        );
        let off = Walk::new(0);
        assert_eq!(off.reached(0, 10), 0..0);
        assert_eq!(off.reached(1, 10), 0..0);
    }
}
