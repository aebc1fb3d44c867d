//! A layer index while its pass runs ([`Progress`]): the entries seen so far (with their paths),
//! the restart points (gzip checkpoints, zstd frame starts) and span digests recorded so far,
//! and at the end the finished index or the error. Lookups and reads that can be answered from
//! what is already known do not wait for the end (see docs/SEMANTICS.md, "Progressive
//! indexing"); everything else waits for it with [`Progress::wait`].
//!
//! The pass publishes under one leaf lock, taken for each entry and each finished span, never
//! across a read of the stream; every change wakes the waiters, which look again.

use std::sync::{Arc, Mutex};

use super::index::LayerIndex;
use super::{gzip, zstd, Format, TarEntry};
use crate::error::{FsError, FsResult};
use crate::sync::lock;

/// What is known of one layer's index.
#[derive(Default)]
pub struct State {
    /// Entries and paths (`entries`, `by_path`; no `dirs` or `nlink` yet), `format`, restart
    /// points and span digests published so far. Emptied when the pass takes it to finish it.
    pub partial: LayerIndex,
    /// The format of the stream the pass reads, once it has started (kept when `partial` is
    /// taken: a reader between that and the end must not see the default format).
    pub streaming: Option<Format>,
    /// The finished index, or why there is none.
    pub end: Option<FsResult<Arc<LayerIndex>>>,
}

/// One layer's index, published while it is built.
#[derive(Default)]
pub struct Progress {
    state: Mutex<State>,
    changed: tokio::sync::Notify,
}

/// Restart points a decompressing reader has recorded, copied into the partial index.
pub trait Restarts {
    /// Append the points recorded since the last call to `idx`.
    fn restarts_into(&self, idx: &mut LayerIndex);
}

impl<R> Restarts for gzip::Indexer<R> {
    fn restarts_into(&self, idx: &mut LayerIndex) {
        if let Some(new) = self.checkpoints.get(idx.checkpoints.len()..) {
            idx.checkpoints.extend_from_slice(new);
        }
    }
}

impl<R> Restarts for zstd::FrameIndexer<R> {
    fn restarts_into(&self, idx: &mut LayerIndex) {
        if let Some(new) = self.frames.get(idx.zstd_frames.len()..) {
            idx.zstd_frames.extend_from_slice(new);
        }
    }
}

impl Progress {
    fn change(&self, f: impl FnOnce(&mut State)) {
        f(&mut lock(&self.state));
        self.changed.notify_waiters();
    }

    /// The pass starts reading a stream of this format.
    pub fn start(&self, format: Format, layer: &str) {
        self.change(|st| {
            st.partial.format = format;
            st.partial.layer = layer.to_string();
            st.streaming = Some(format);
        });
    }

    /// One more entry, in archive order.
    pub fn add(&self, e: TarEntry) {
        self.change(|st| st.partial.add(e));
    }

    /// Spans finished (their digests, in order) and restart points recorded by `points`.
    pub fn spans(&self, digests: &mut Vec<[u8; 32]>, points: Option<&dyn Restarts>) {
        self.change(|st| {
            if let Some(p) = points {
                p.restarts_into(&mut st.partial);
            }
            st.partial.span_digests.append(digests);
        });
    }

    /// What the pass published, taken to be finished into the full index.
    pub fn take_partial(&self) -> LayerIndex {
        std::mem::take(&mut lock(&self.state).partial)
    }

    /// The pass ended: the waiters get this result.
    pub fn finish(&self, result: FsResult<Arc<LayerIndex>>) {
        self.change(|st| {
            st.partial = LayerIndex::default();
            st.end = Some(result);
        });
    }

    /// Whether the pass has ended.
    pub fn ended(&self) -> bool {
        lock(&self.state).end.is_some()
    }

    /// Wait until `f` answers from the state. None when the pass has ended and `f` still has no
    /// answer. Bounded: each wake-up is a change the pass published, and the pass ends.
    pub async fn wait<T>(&self, mut f: impl FnMut(&State) -> Option<T>) -> Option<T> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = lock(&self.state);
                if let Some(t) = f(&st) {
                    return Some(t);
                }
                if st.end.is_some() {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// The finished index (or the pass's error).
    pub async fn done(&self) -> FsResult<Arc<LayerIndex>> {
        self.wait(|st| st.end.clone())
            .await
            .unwrap_or_else(|| Err(FsError::io("layer index: the pass ended without a result")))
    }
}

/// Ends a pass with an error if it is dropped before it published a result (a panic, or the
/// runtime shutting down), so that no waiter waits for ever.
pub struct FinishOnDrop(pub Arc<Progress>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        if !self.0.ended() {
            self.0
                .finish(Err(FsError::io("layer index: the indexing task stopped")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::entry::file_entry;

    #[tokio::test(flavor = "multi_thread")]
    async fn waiters_see_entries_as_they_come_and_the_end() {
        let p = Arc::new(Progress::default());
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait(|st| st.partial.by_path.get("b").copied()).await })
        };
        p.start(Format::Tar, "sha256:x");
        p.add(file_entry("a", 1));
        p.add(file_entry("b", 1));
        // "b" is the second entry ("a" is first; no implied parents).
        assert_eq!(waiter.await.unwrap(), Some(1));
        // A question the finished pass cannot answer: None, not a hang.
        let never = {
            let p = p.clone();
            tokio::spawn(async move { p.wait(|st| st.partial.by_path.get("zz").copied()).await })
        };
        let mut idx = p.take_partial();
        idx.finish();
        p.finish(Ok(Arc::new(idx)));
        assert_eq!(never.await.unwrap(), None);
        assert_eq!(p.done().await.unwrap().entries.len(), 2);
    }

    #[tokio::test]
    async fn a_dropped_pass_ends_with_an_error() {
        let p = Arc::new(Progress::default());
        drop(FinishOnDrop(p.clone()));
        assert_eq!(p.done().await.unwrap_err().errno, libc::EIO);
    }
}
