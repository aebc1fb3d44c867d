//! The open-file table: one map from [`Fh`] to a [`Handle`], reading or writing. Handle numbers
//! come from a counter and are never reused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::node::Node;
use super::types::Fh;
use super::write::Writer;
use crate::blob::Verifier;
use crate::error::{FsError, FsResult};
use crate::sync::lock;

/// A handle open for reading.
pub(crate) struct ReadHandle {
    pub node: Arc<Node>,
    /// Whole-blob verification, for blobs larger than a chunk.
    pub verifier: Option<Verifier>,
    /// End of the previous read: a read starting here is sequential.
    pub last_end: u64,
}

impl ReadHandle {
    pub fn new(node: Arc<Node>, verifier: Option<Verifier>) -> Self {
        ReadHandle {
            node,
            verifier,
            last_end: 0,
        }
    }

    /// Note a read of `size` bytes at `offset`; true if it continues the previous one.
    pub fn advance(&mut self, offset: u64, size: u32) -> bool {
        let sequential = self.last_end == offset && offset > 0;
        self.last_end = offset.saturating_add(u64::from(size));
        sequential
    }
}

/// An open file.
#[derive(Clone)]
pub(crate) enum Handle {
    Read(Arc<Mutex<ReadHandle>>),
    /// The writer's tokio mutex is held across the upload's awaits (see `fs::inodes`).
    Write(Arc<tokio::sync::Mutex<Writer>>),
}

pub(crate) struct Handles {
    next: AtomicU64,
    table: Mutex<HashMap<Fh, Handle>>,
}

impl Handles {
    pub fn new() -> Self {
        Handles {
            next: AtomicU64::new(1),
            table: Mutex::new(HashMap::new()),
        }
    }

    pub fn insert(&self, h: Handle) -> Fh {
        let fh = Fh(self.next.fetch_add(1, Ordering::Relaxed));
        lock(&self.table).insert(fh, h);
        fh
    }

    pub fn remove(&self, fh: Fh) -> Option<Handle> {
        lock(&self.table).remove(&fh)
    }

    /// A reading handle, or EBADF (also for a writing one).
    pub fn reader(&self, fh: Fh) -> FsResult<Arc<Mutex<ReadHandle>>> {
        match lock(&self.table).get(&fh) {
            Some(Handle::Read(h)) => Ok(h.clone()),
            _ => Err(FsError::bad_handle()),
        }
    }

    /// A writing handle, if `fh` is one.
    pub fn writer(&self, fh: Fh) -> Option<Arc<tokio::sync::Mutex<Writer>>> {
        match lock(&self.table).get(&fh) {
            Some(Handle::Write(w)) => Some(w.clone()),
            _ => None,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.table).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_typed_and_never_reused() {
        let t = Handles::new();
        let r = t.insert(Handle::Read(Arc::new(Mutex::new(ReadHandle::new(
            Arc::new(Node::Root),
            None,
        )))));
        assert!(t.reader(r).is_ok());
        assert!(t.writer(r).is_none());
        assert!(t.remove(r).is_some());
        assert_eq!(t.reader(r).err().map(|e| e.errno), Some(libc::EBADF));
        let r2 = t.insert(Handle::Read(Arc::new(Mutex::new(ReadHandle::new(
            Arc::new(Node::Root),
            None,
        )))));
        assert_ne!(r, r2);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn sequential_detection() {
        let mut h = ReadHandle::new(Arc::new(Node::Root), None);
        assert!(!h.advance(0, 10), "the first read is not a continuation");
        assert!(h.advance(10, 10));
        assert!(!h.advance(50, 10));
        assert!(h.advance(60, 1));
        assert!(!h.advance(u64::MAX, 10), "no overflow");
    }
}
