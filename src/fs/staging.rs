//! What is being written through the mount: files under `uploads/`, `blobs/sha256/` and
//! `tags/<tag>/manifest.json` with their size so far, where their writing stands and, once
//! committed, their digest; and the tags made by mkdir whose manifest is not pushed yet. Memory
//! only (documented in SEMANTICS).
//!
//! A reader that opens a file whose commit is under way waits for it ([`Staging::settle`]): every
//! change of a file's state wakes the waiters, who look again.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::node::{Area, StagedKey};
use crate::digest::Digest;
use crate::sync::lock;

/// Where the writing of a file stands (until it is committed or dropped).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WriteState {
    /// Bytes may still come: written since the last flush, or never flushed.
    #[default]
    Writing,
    /// Flushed after the last write (a deferred flush): the commit comes next, at `release` or at
    /// the opener's next flush.
    Flushed,
    /// The commit is under way.
    Committing,
}

/// What is known of a written file.
#[derive(Debug, Clone, Default)]
pub struct StagedInfo {
    /// Bytes written so far (the final size once committed).
    pub size: u64,
    /// Set once the registry accepted it.
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
    pub state: WriteState,
}

/// What a reader finds after [`Staging::settle`].
#[derive(Debug)]
pub(crate) enum Settled {
    /// Committed: readable.
    Committed,
    /// Not listed (any more). `waited`: it was being committed or closed when the reader came,
    /// so its push failed.
    Gone { waited: bool },
    /// Still being written (bytes may come), or its commit outlasted the wait.
    Busy(WriteState),
}

/// Why an `uploads/` entry could not be removed.
pub(crate) enum UnlinkRefused {
    Missing,
    BeingWritten,
}

pub(crate) struct Staging {
    staged: Mutex<HashMap<StagedKey, StagedInfo>>,
    pending_tags: Mutex<BTreeSet<(String, String)>>,
    /// Bumped at every change of a file's state, commit or removal (wakes [`Staging::settle`]).
    changed: watch::Sender<u64>,
}

impl Default for Staging {
    fn default() -> Self {
        Staging {
            staged: Mutex::default(),
            pending_tags: Mutex::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl Staging {
    fn wake(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Where the writing of `key` stands now (a change wakes the readers waiting on it).
    pub fn set_state(&self, key: &StagedKey, state: WriteState) {
        let changed = match lock(&self.staged).get_mut(key) {
            Some(i) if i.state != state => {
                i.state = state;
                true
            }
            _ => false,
        };
        if changed {
            self.wake();
        }
    }

    /// Wait until `key` is committed, gone, or being written again: at most `commit_wait` while
    /// its commit is under way, and `flushed_wait` while it is flushed but not yet committing
    /// (its `release` is on its way). A file still being written is `Busy` at once.
    pub async fn settle(
        &self,
        key: &StagedKey,
        commit_wait: Duration,
        flushed_wait: Duration,
    ) -> Settled {
        // Subscribed before the first look, so no change between the look and the wait is lost.
        let mut rx = self.changed.subscribe();
        let start = Instant::now();
        let mut waited = false;
        loop {
            let (state, wait) = match self.info(key) {
                None => return Settled::Gone { waited },
                Some(i) if i.digest.is_some() => return Settled::Committed,
                Some(i) => match i.state {
                    WriteState::Writing => return Settled::Busy(i.state),
                    WriteState::Flushed => (i.state, flushed_wait),
                    WriteState::Committing => (i.state, commit_wait),
                },
            };
            let left = wait.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Settled::Busy(state);
            }
            waited = true;
            // A change, or the end of the wait: look again (the sender lives as long as `self`,
            // so `changed` only returns on a change).
            let _ = tokio::time::timeout(left, rx.changed()).await;
        }
    }

    /// A write starts: the file is listed with size 0 and no digest.
    pub fn start(&self, key: StagedKey) {
        lock(&self.staged).insert(key, StagedInfo::default());
    }

    pub fn info(&self, key: &StagedKey) -> Option<StagedInfo> {
        lock(&self.staged).get(key).cloned()
    }

    pub fn size(&self, key: &StagedKey) -> u64 {
        lock(&self.staged).get(key).map_or(0, |i| i.size)
    }

    /// A write landed: the size so far, and the file is being written.
    pub fn set_size(&self, key: &StagedKey, size: u64) {
        if let Some(i) = lock(&self.staged).get_mut(key) {
            i.size = size;
        }
        self.set_state(key, WriteState::Writing);
    }

    /// The registry accepted it.
    pub fn committed(&self, key: &StagedKey, digest: Digest, size: u64) {
        if let Some(i) = lock(&self.staged).get_mut(key) {
            i.digest = Some(digest);
            i.size = size;
        }
        self.wake();
    }

    /// A failed write: nothing that claims to be complete stays behind.
    pub fn remove(&self, key: &StagedKey) {
        lock(&self.staged).remove(key);
        self.wake();
    }

    pub fn contains(&self, key: &StagedKey) -> bool {
        lock(&self.staged).contains_key(key)
    }

    /// Listed and still being written (no digest yet).
    pub fn is_writing(&self, key: &StagedKey) -> bool {
        lock(&self.staged)
            .get(key)
            .is_some_and(|i| i.digest.is_none())
    }

    /// Names under `uploads/` of `repo`, sorted.
    pub fn uploads(&self, repo: &str) -> Vec<StagedKey> {
        let mut out: Vec<StagedKey> = lock(&self.staged)
            .keys()
            .filter(|k| k.repo == repo && k.area == Area::Uploads)
            .cloned()
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// `rm uploads/NAME`: drops the listing of a committed upload (the blob stays).
    pub fn unlink_upload(&self, key: &StagedKey) -> Result<(), UnlinkRefused> {
        let mut staged = lock(&self.staged);
        match staged.get(key) {
            Some(i) if i.digest.is_some() => {
                staged.remove(key);
                Ok(())
            }
            Some(_) => Err(UnlinkRefused::BeingWritten),
            None => Err(UnlinkRefused::Missing),
        }
    }

    pub fn add_pending_tag(&self, repo: &str, tag: &str) {
        lock(&self.pending_tags).insert((repo.to_string(), tag.to_string()));
    }

    /// Was it pending (and so is now removed)?
    pub fn remove_pending_tag(&self, repo: &str, tag: &str) -> bool {
        lock(&self.pending_tags).remove(&(repo.to_string(), tag.to_string()))
    }

    pub fn has_pending_tag(&self, repo: &str, tag: &str) -> bool {
        lock(&self.pending_tags).contains(&(repo.to_string(), tag.to_string()))
    }

    /// Pending tags of `repo` that `except` does not list.
    pub fn pending_tags(&self, repo: &str, except: &[String]) -> Vec<String> {
        lock(&self.pending_tags)
            .iter()
            .filter(|(r, t)| r == repo && !except.contains(t))
            .map(|(_, t)| t.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(name: &str) -> StagedKey {
        StagedKey {
            repo: "r".into(),
            area: Area::Uploads,
            name: name.into(),
        }
    }

    #[test]
    fn an_upload_is_listed_while_written_and_removable_once_committed() {
        let s = Staging::default();
        s.start(up("b"));
        s.start(up("a"));
        s.set_size(&up("a"), 10);
        assert!(s.is_writing(&up("a")));
        assert_eq!(s.size(&up("a")), 10);
        assert!(matches!(
            s.unlink_upload(&up("a")),
            Err(UnlinkRefused::BeingWritten)
        ));
        s.committed(&up("a"), Digest::from("sha256:aa"), 12);
        assert!(!s.is_writing(&up("a")));
        assert_eq!(s.info(&up("a")).unwrap().size, 12);
        let names: Vec<_> = s.uploads("r").into_iter().map(|k| k.name).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(s.unlink_upload(&up("a")).is_ok());
        assert!(matches!(
            s.unlink_upload(&up("a")),
            Err(UnlinkRefused::Missing)
        ));
        s.remove(&up("b"));
        assert!(s.uploads("r").is_empty());
    }

    #[tokio::test]
    async fn a_reader_waits_for_a_commit_under_way_but_not_for_a_writer() {
        const LONG: Duration = Duration::from_secs(600);
        let s = std::sync::Arc::new(Staging::default());
        let waiter = |name: &'static str| {
            let s = s.clone();
            tokio::spawn(async move { s.settle(&up(name), LONG, LONG).await })
        };
        // Let the waiters run up to their wait (the test runtime has one thread).
        let settle_in = || async {
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
        };
        s.start(up("x"));
        // Being written: busy at once, however long the wait allowed.
        assert!(matches!(
            s.settle(&up("x"), LONG, LONG).await,
            Settled::Busy(WriteState::Writing)
        ));
        s.set_state(&up("x"), WriteState::Committing);
        let w = waiter("x");
        settle_in().await;
        assert!(!w.is_finished(), "the reader waits for the commit");
        s.committed(&up("x"), Digest::from("sha256:aa"), 3);
        assert!(matches!(w.await.unwrap(), Settled::Committed));
        // Flushed, then committing, then failed: the waiter hears of the failure.
        s.start(up("y"));
        s.set_state(&up("y"), WriteState::Flushed);
        let w = waiter("y");
        settle_in().await;
        s.set_state(&up("y"), WriteState::Committing);
        settle_in().await;
        assert!(!w.is_finished());
        s.remove(&up("y"));
        assert!(matches!(w.await.unwrap(), Settled::Gone { waited: true }));
        // Written again after a flush: busy.
        s.start(up("z"));
        s.set_state(&up("z"), WriteState::Flushed);
        let w = waiter("z");
        settle_in().await;
        s.set_size(&up("z"), 5);
        assert!(matches!(
            w.await.unwrap(),
            Settled::Busy(WriteState::Writing)
        ));
        // A commit that outlasts the wait, and a file never listed.
        s.set_state(&up("z"), WriteState::Committing);
        assert!(matches!(
            s.settle(&up("z"), Duration::ZERO, LONG).await,
            Settled::Busy(WriteState::Committing)
        ));
        assert!(matches!(
            s.settle(&up("nope"), LONG, LONG).await,
            Settled::Gone { waited: false }
        ));
    }

    #[test]
    fn pending_tags() {
        let s = Staging::default();
        s.add_pending_tag("r", "v1");
        s.add_pending_tag("r", "v2");
        s.add_pending_tag("q", "v1");
        assert!(s.has_pending_tag("r", "v1"));
        assert_eq!(s.pending_tags("r", &["v2".into()]), ["v1"]);
        assert!(s.remove_pending_tag("r", "v1"));
        assert!(!s.remove_pending_tag("r", "v1"));
    }
}
