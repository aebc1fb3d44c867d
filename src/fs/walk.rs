//! Walk-ahead: readahead for directory walks. When `tags/` of one repository after another is
//! listed in catalog order (`ls */tags/*/`, a shell loop over repositories, `find`), the
//! repositories the walk reaches next are listed ahead in the background, as a listing of their
//! `tags/` would (`fs::tree::repository`), so the walk finds them ready.
//!
//! Over a WAN each repository costs three dependent round trips (its tag list, its tags'
//! manifests, their configs for the directories' times), and a walker asks for one repository
//! at a time, so without this nothing overlaps across repositories.
//!
//! The rule, like a reader's readahead. A walk runs over the repositories of one namespace (the
//! catalog's names with the same parent, in catalog order). A listing of the repository at
//! position `p` there continues the walk if the last repository listed was in the same namespace
//! at most [`WALK_SKIP`] positions before it. The window of repositories listed ahead then
//! starts at [`WALK_START`] and doubles, up to `--walk-ahead`, each time the walk reaches a
//! repository that was listed ahead; the repositories up to `p + window` not listed ahead yet
//! are. Any other listing starts a new walk, lists nothing ahead, and drops what the old walk
//! still had waiting; listing one repository again changes nothing. Only registries with a
//! catalog have an order to walk (the catalog cached for the listing itself: no request is made
//! to find it).
//!
//! Bounds: [`WALK_PARALLEL`] repositories are listed ahead at a time, and all of them together
//! resolve at most [`crate::fs::TAG_CONCURRENCY`] tags at a time (what one listing holds in
//! flight). A repository whose tags do not fit in one page of `tags/list`, or number more than
//! [`WALK_TAGS`], gets only that one page fetched. At most [`MAX_WALK_QUEUE`] repositories wait
//! for their turn. What is fetched lands in the caches a listing uses, under the same TTLs, and a
//! listing that arrives while its repository is being listed ahead shares those requests
//! (`fs::flight`). A failure is logged at debug and kept nowhere: the walk's own listing asks
//! again.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::fs::TAG_CONCURRENCY;
use crate::sync::lock;

/// A walk may pass over this many repositories minus one between two listings (names it
/// filters out), while a jump elsewhere starts a new walk.
pub(crate) const WALK_SKIP: usize = 4;
/// The first window of a walk: one round of [`WALK_PARALLEL`]. A walk that stops at once has
/// cost four repositories' listings; one that goes on finds them ready (at 50 ms, a start of 2
/// left the bench's walk of 10 repositories waiting: 0.89 s, against 0.6 to 0.7 s).
pub(crate) const WALK_START: usize = WALK_PARALLEL;
/// Repositories listed ahead at once. At 50 ms per round trip a repository of a few tags takes
/// about 180 ms to list, and a walker a few ms per repository it finds ready, so a walk of ten
/// outruns two at a time but hardly four.
pub(crate) const WALK_PARALLEL: usize = 4;
/// A repository with more tags than this has only its tag list fetched ahead: resolving them
/// all is a listing's cost, not a guess's.
pub(crate) const WALK_TAGS: usize = 64;
/// Repositories waiting for their turn to be listed ahead, at most (the largest `--walk-ahead`).
pub(crate) const MAX_WALK_QUEUE: u64 = crate::config::MAX_WALK_AHEAD as u64;

/// Where a walk stands.
#[derive(Default)]
struct State {
    /// The namespace walked ("" = the root).
    parent: String,
    /// Position (among `parent`'s repositories) of the repository listed last.
    last: Option<usize>,
    /// Positions below this were listed ahead already (in this walk).
    until: usize,
    /// Repositories listed ahead of the walker.
    window: usize,
    /// Which walk this is: what an older one still has waiting is dropped.
    epoch: u64,
}

/// Repositories to list ahead, for the walk `epoch`.
pub(crate) struct Ahead {
    pub positions: Range<usize>,
    pub epoch: u64,
}

/// The walk detector and the walk-ahead's bounds.
pub(crate) struct Walk {
    ahead: usize,
    state: Mutex<State>,
    repos: Arc<Semaphore>,
    resolutions: Arc<Semaphore>,
    /// Repositories queued to be listed ahead, finished (however it went), and dropped because
    /// their walk ended first (`.regfs/stats` `walk_ahead`).
    queued: AtomicU64,
    finished: AtomicU64,
    dropped: AtomicU64,
}

impl Walk {
    /// `ahead`: repositories listed ahead of a walk, at most (0: none).
    pub fn new(ahead: usize) -> Self {
        Walk {
            ahead,
            state: Mutex::new(State::default()),
            repos: Arc::new(Semaphore::new(WALK_PARALLEL)),
            resolutions: Arc::new(Semaphore::new(TAG_CONCURRENCY)),
            queued: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// The repository at position `pos` of the `len` repositories in namespace `parent` is being
    /// listed: what to list ahead now (nothing unless this listing continues a walk).
    pub fn reached(&self, parent: &str, pos: usize, len: usize) -> Ahead {
        let mut s = lock(&self.state);
        let nothing = |s: &State| Ahead {
            positions: 0..0,
            epoch: s.epoch,
        };
        if self.ahead == 0 {
            return nothing(&s);
        }
        let same = s.parent == parent;
        match s.last {
            Some(l) if same && l == pos => return nothing(&s),
            Some(l) if same && pos > l && pos - l <= WALK_SKIP => {}
            _ => {
                *s = State {
                    parent: parent.to_string(),
                    last: Some(pos),
                    until: pos.saturating_add(1),
                    window: 0,
                    epoch: s.epoch.wrapping_add(1),
                };
                return nothing(&s);
            }
        }
        let hit = pos < s.until;
        s.window = if hit {
            s.window.saturating_mul(2)
        } else {
            s.window
        }
        .max(WALK_START)
        .min(self.ahead);
        s.last = Some(pos);
        let from = s.until.max(pos + 1);
        let to = pos.saturating_add(1 + s.window).min(len);
        s.until = s.until.max(to);
        Ahead {
            positions: from..to,
            epoch: s.epoch,
        }
    }

    /// Queue one repository to be listed ahead: false if the queue is full.
    pub fn queue(&self) -> bool {
        let waiting = self.queued.load(Ordering::Relaxed) - self.finished.load(Ordering::Relaxed);
        if waiting >= MAX_WALK_QUEUE {
            return false;
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A queued repository's turn (at most [`WALK_PARALLEL`] at once): None if its walk `epoch`
    /// ended while it waited (counted as dropped).
    pub async fn turn(&self, epoch: u64) -> Option<OwnedSemaphorePermit> {
        let permit = self.repos.clone().acquire_owned().await.ok()?;
        if lock(&self.state).epoch != epoch {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(permit)
    }

    /// A permit to resolve one tag ahead (shared by every repository listed ahead).
    pub async fn resolution(&self) -> Option<OwnedSemaphorePermit> {
        self.resolutions.clone().acquire_owned().await.ok()
    }

    /// One queued repository is done with (whatever the outcome).
    pub fn finished(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    /// (queued, finished, dropped) repositories.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.queued.load(Ordering::Relaxed),
            self.finished.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(w: &Walk, parent: &str, pos: usize) -> Range<usize> {
        w.reached(parent, pos, 100).positions
    }

    #[test]
    fn a_walk_starts_small_doubles_on_hits_and_a_jump_starts_over() {
        let w = Walk::new(8);
        assert_eq!(at(&w, "", 0), 0..0, "one listing is no walk");
        assert_eq!(at(&w, "", 1), 2..6, "a walk: WALK_START ahead");
        assert_eq!(at(&w, "", 1), 0..0, "the same repository again");
        assert_eq!(
            at(&w, "", 2),
            6..11,
            "a hit doubles the window, up to --walk-ahead"
        );
        assert_eq!(at(&w, "", 3), 11..12, "then one more per step");
        assert_eq!(at(&w, "", 7), 12..16, "a skip within WALK_SKIP continues");
        let e = w.reached("", 7, 100).epoch;
        assert_eq!(at(&w, "", 50), 0..0, "a jump starts a new walk");
        assert_ne!(w.reached("", 50, 100).epoch, e, "and ends the old one");
        assert_eq!(at(&w, "", 49), 0..0, "backwards starts one too");
        assert_eq!(at(&w, "", 50), 51..55);
        assert_eq!(
            at(&w, "team", 51),
            0..0,
            "another namespace is another walk"
        );
        assert_eq!(
            w.reached("team", 52, 54).positions,
            53..54,
            "not past the end"
        );
        let off = Walk::new(0);
        assert_eq!(at(&off, "", 0), 0..0);
        assert_eq!(at(&off, "", 1), 0..0);
    }

    #[test]
    fn the_queue_is_bounded() {
        let w = Walk::new(8);
        for _ in 0..MAX_WALK_QUEUE {
            assert!(w.queue());
        }
        assert!(!w.queue());
        w.finished();
        assert!(w.queue());
    }
}
