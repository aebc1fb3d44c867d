//! The open-file table: one map from [`Fh`] to a [`Handle`], reading or writing. Handle numbers
//! come from a counter and are never reused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::node::Node;
use super::types::Fh;
use super::write::Writer;
use crate::blob::{HashFeed, Readahead};
use crate::error::{FsError, FsResult};
use crate::sync::lock;

/// A handle open for reading.
pub(crate) struct ReadHandle {
    pub node: Arc<Node>,
    /// Whole-blob verification, for blobs larger than a block (hashed by its own task).
    pub verifier: Option<HashFeed>,
    /// This reader's readahead window.
    pub ra: Readahead,
}

impl ReadHandle {
    pub fn new(node: Arc<Node>, verifier: Option<HashFeed>, ra: Readahead) -> Self {
        ReadHandle { node, verifier, ra }
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
            crate::blob::Readahead::new(1, 0),
        )))));
        assert!(t.reader(r).is_ok());
        assert!(t.writer(r).is_none());
        assert!(t.remove(r).is_some());
        assert_eq!(t.reader(r).err().map(|e| e.errno), Some(libc::EBADF));
        let r2 = t.insert(Handle::Read(Arc::new(Mutex::new(ReadHandle::new(
            Arc::new(Node::Root),
            None,
            crate::blob::Readahead::new(1, 0),
        )))));
        assert_ne!(r, r2);
        assert_eq!(t.len(), 1);
    }
}
