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

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::fs::TAG_CONCURRENCY;
use crate::sync::lock;

/// A walk may pass over this many repositories minus one between two listings (names it
/// filters out), while a jump elsewhere starts a new walk.
pub(crate) const WALK_SKIP: usize = 4;
/// Repositories listed ahead at once. At 50 ms per round trip a repository of a few tags takes
/// about 180 ms to list, and a walker a few ms per repository it finds ready, so a walk of ten
/// outruns two at a time but hardly four.
pub(crate) const WALK_PARALLEL: usize = 4;
/// The first window of a walk: one round of [`WALK_PARALLEL`]. A walk that stops at once has
/// cost four repositories' listings; one that goes on finds them ready (the bench's walk of 10
/// repositories at 50 ms: 0.89 s with a start of 2, 0.77 to 0.84 s with 4).
pub(crate) const WALK_START: usize = WALK_PARALLEL;
/// A repository with more tags than this has only its tag list fetched ahead: resolving them
/// all is a listing's cost, not a guess's.
pub(crate) const WALK_TAGS: usize = 64;
/// Repositories queued or being listed ahead, at most (the largest `--walk-ahead`).
pub(crate) const MAX_WALK_QUEUE: u64 = crate::config::MAX_WALK_AHEAD as u64;
/// Namespaces whose walks are followed at once: `find` and `ls -R` go into nested
/// repositories' namespaces and come back to their own walk.
const WALKS: usize = 16;

/// Where the walk over one namespace stands.
#[derive(Default, Clone)]
struct State {
    /// Position (among the namespace's repositories) of the repository listed last.
    last: usize,
    /// Positions below this were listed ahead already (in this walk).
    until: usize,
    /// Repositories listed ahead of the walker.
    window: usize,
    /// Which walk this is: what an older one still has queued is dropped.
    epoch: u64,
}

/// Repositories to list ahead, for the walk `epoch`.
pub(crate) struct Ahead {
    pub positions: Range<usize>,
    pub epoch: u64,
}

/// Which walk a repository listed ahead belongs to: (namespace, epoch).
pub(crate) type WalkId = (String, u64);

/// Catalog positions by namespace, worked out once per catalog fetched (a listing would
/// otherwise scan the whole catalog).
pub(crate) struct Siblings {
    /// The catalog this was made from.
    catalog: Arc<Vec<String>>,
    /// Repository -> (namespace, position among its repositories).
    at: HashMap<String, (String, usize)>,
    /// Namespace -> catalog indexes of its repositories, in catalog order.
    of: HashMap<String, Vec<usize>>,
}

impl Siblings {
    fn new(catalog: Arc<Vec<String>>) -> Self {
        let mut at = HashMap::with_capacity(catalog.len());
        let mut of: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, name) in catalog.iter().enumerate() {
            let ns = parent_of(name);
            let list = of.entry(ns.to_string()).or_default();
            at.entry(name.clone())
                .or_insert_with(|| (ns.to_string(), list.len()));
            list.push(i);
        }
        Siblings { catalog, at, of }
    }

    /// `repo`'s namespace, its position there, and how many repositories the namespace has.
    pub fn place(&self, repo: &str) -> Option<(&str, usize, usize)> {
        let (ns, pos) = self.at.get(repo)?;
        Some((ns, *pos, self.of.get(ns).map_or(0, Vec::len)))
    }

    /// The repository at `pos` in namespace `ns`.
    pub fn name(&self, ns: &str, pos: usize) -> Option<&str> {
        let i = *self.of.get(ns)?.get(pos)?;
        self.catalog.get(i).map(String::as_str)
    }
}

/// The namespace a repository is in ("" for the root).
pub(crate) fn parent_of(repo: &str) -> &str {
    repo.rsplit_once('/').map_or("", |(p, _)| p)
}

/// The walk detector and the walk-ahead's bounds.
pub(crate) struct Walk {
    ahead: usize,
    /// The walks followed, by namespace (least recently walked first out).
    walks: Mutex<lru::LruCache<String, State>>,
    /// Epochs are unique across namespaces (a walk forgotten and started again is new).
    epochs: AtomicU64,
    siblings: Mutex<Option<Arc<Siblings>>>,
    repos: Arc<Semaphore>,
    resolutions: Arc<Semaphore>,
    /// Repositories queued or being listed ahead (the bound).
    waiting: AtomicU64,
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
            walks: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(WALKS).expect("non-zero"),
            )),
            epochs: AtomicU64::new(0),
            siblings: Mutex::new(None),
            repos: Arc::new(Semaphore::new(WALK_PARALLEL)),
            resolutions: Arc::new(Semaphore::new(TAG_CONCURRENCY)),
            waiting: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Is walk-ahead on?
    pub fn on(&self) -> bool {
        self.ahead > 0
    }

    /// The namespaces of `catalog` (made once per catalog, off any lock).
    pub fn siblings(&self, catalog: Arc<Vec<String>>) -> Arc<Siblings> {
        if let Some(s) = lock(&self.siblings).as_ref() {
            if Arc::ptr_eq(&s.catalog, &catalog) {
                return s.clone();
            }
        }
        let made = Arc::new(Siblings::new(catalog));
        *lock(&self.siblings) = Some(made.clone());
        made
    }

    /// The repository at position `pos` of the `len` repositories in namespace `ns` is being
    /// listed: what to list ahead now (nothing unless this listing continues a walk).
    pub fn reached(&self, ns: &str, pos: usize, len: usize) -> Ahead {
        let mut walks = lock(&self.walks);
        let mut s = match walks.get(ns) {
            Some(s) if s.last == pos => {
                return Ahead {
                    positions: 0..0,
                    epoch: s.epoch,
                }
            }
            Some(s) if pos > s.last && pos - s.last <= WALK_SKIP => s.clone(),
            _ => {
                let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
                let fresh = State {
                    last: pos,
                    until: pos.saturating_add(1),
                    window: 0,
                    epoch,
                };
                walks.put(ns.to_string(), fresh);
                return Ahead {
                    positions: 0..0,
                    epoch,
                };
            }
        };
        let hit = pos < s.until;
        s.window = if hit {
            s.window.saturating_mul(2)
        } else {
            s.window
        }
        .max(WALK_START)
        .min(self.ahead);
        s.last = pos;
        let from = s.until.max(pos + 1);
        let to = pos.saturating_add(1 + s.window).min(len);
        s.until = s.until.max(to);
        let epoch = s.epoch;
        walks.put(ns.to_string(), s);
        Ahead {
            positions: from..to,
            epoch,
        }
    }

    /// Walk `id` could not queue the repository at `pos` (the queue was full): its frontier
    /// goes back there, so the next step of the walk offers it again instead of skipping it.
    pub fn retreat(&self, id: &WalkId, pos: usize) {
        let mut walks = lock(&self.walks);
        if let Some(s) = walks.peek_mut(&id.0).filter(|s| s.epoch == id.1) {
            s.until = s.until.min(pos);
        }
    }

    /// Is walk `id` still the one going on in its namespace?
    pub fn current(&self, id: &WalkId) -> bool {
        lock(&self.walks)
            .peek(&id.0)
            .is_some_and(|s| s.epoch == id.1)
    }

    /// Queue one repository to be listed ahead: false if [`MAX_WALK_QUEUE`] are queued or being
    /// listed. Each one queued is [`Walk::release`]d exactly once, however its task ends.
    pub fn queue(&self) -> bool {
        let reserved = self
            .waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                (w < MAX_WALK_QUEUE).then_some(w + 1)
            })
            .is_ok();
        if reserved {
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
        reserved
    }

    /// A queued repository is done with (listed, dropped, failed or cancelled).
    pub fn release(&self) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    /// A queued repository's turn (at most [`WALK_PARALLEL`] at once): None if its walk ended
    /// while it waited (counted as dropped).
    pub async fn turn(&self, id: &WalkId) -> Option<OwnedSemaphorePermit> {
        let permit = self.repos.clone().acquire_owned().await.ok()?;
        if !self.current(id) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(permit)
    }

    /// A permit to resolve one tag ahead for walk `id` (shared by every repository listed
    /// ahead): None once that walk has ended.
    pub async fn resolution(&self, id: &WalkId) -> Option<OwnedSemaphorePermit> {
        let permit = self.resolutions.clone().acquire_owned().await.ok()?;
        self.current(id).then_some(permit)
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

    fn at(w: &Walk, ns: &str, pos: usize) -> Range<usize> {
        w.reached(ns, pos, 100).positions
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
        assert!(w.current(&(String::new(), e)));
        assert_eq!(at(&w, "", 50), 0..0, "a jump starts a new walk");
        assert!(!w.current(&(String::new(), e)), "and ends the old one");
        assert_eq!(at(&w, "", 49), 0..0, "backwards starts one too");
        assert_eq!(at(&w, "", 50), 51..55);
        // Another namespace has a walk of its own (find, ls -R go into nested ones and back).
        assert_eq!(at(&w, "team", 0), 0..0);
        assert_eq!(w.reached("team", 1, 4).positions, 2..4, "not past the end");
        assert_eq!(at(&w, "", 51), 55..60, "the root's walk goes on");
        let off = Walk::new(0);
        assert!(!off.on());
    }

    #[test]
    fn a_repository_the_full_queue_refused_is_offered_again() {
        let w = Walk::new(8);
        at(&w, "", 0);
        let ahead = w.reached("", 1, 100);
        assert_eq!(ahead.positions, 2..6);
        // The queue was full from position 3 on: 3..6 were not queued.
        w.retreat(&(String::new(), ahead.epoch), 3);
        assert_eq!(
            at(&w, "", 2),
            3..11,
            "offered again, with the doubled window"
        );
        // A stale walk's retreat changes nothing.
        w.retreat(&(String::new(), ahead.epoch + 100), 0);
        assert_eq!(at(&w, "", 3), 11..12);
    }

    #[test]
    fn the_queue_is_bounded_and_counts_survive_races() {
        let w = Arc::new(Walk::new(8));
        for _ in 0..MAX_WALK_QUEUE {
            assert!(w.queue());
        }
        assert!(!w.queue());
        for _ in 0..MAX_WALK_QUEUE {
            w.release();
        }
        assert_eq!(w.counts(), (MAX_WALK_QUEUE, MAX_WALK_QUEUE, 0));
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for _ in 0..100_000 {
                        if w.queue() {
                            w.release();
                        }
                    }
                })
            })
            .collect();
        for r in racers {
            r.join().unwrap();
        }
        let (queued, finished, _) = w.counts();
        assert_eq!(queued, finished);
        assert_eq!(w.waiting.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn namespaces_are_found_once_per_catalog() {
        let cat = Arc::new(
            ["a", "team/a", "team/a/cache", "team/b", "z"]
                .map(String::from)
                .to_vec(),
        );
        let w = Walk::new(8);
        let s = w.siblings(cat.clone());
        assert!(Arc::ptr_eq(&s, &w.siblings(cat)));
        assert_eq!(s.place("team/b"), Some(("team", 1, 2)));
        assert_eq!(s.place("z"), Some(("", 1, 2)));
        assert_eq!(s.name("team", 1), Some("team/b"));
        assert_eq!(s.name("team/a", 0), Some("team/a/cache"));
        assert_eq!(s.place("nope"), None);
    }
}
