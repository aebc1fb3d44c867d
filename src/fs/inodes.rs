//! The inode table: `ino -> node` and `(parent, name) -> ino`, with lookup counts, behind its own
//! lock. Numbers come from a counter and are never reused; a node is dropped when the kernel
//! forgets its last lookup. Hard links of one tree share an inode.
//!
//! `readdir` makes inodes with no lookup counted, which the kernel never forgets (it never heard
//! of them as inodes). They wait in an LRU of [`MAX_UNREFERENCED`] and the oldest are dropped
//! beyond it, so listing ever more names does not grow memory. An inode with a lookup (and so any
//! open file: opening needs a lookup) is never in that LRU.
//!
//! # Lock order (the whole crate, written here once)
//!
//! Every lock below is a `std::sync::Mutex` unless it says otherwise. None is held across an
//! `.await`, and none is held while code that can panic on input runs.
//!
//! 1. A writing handle's `tokio::sync::Mutex<Writer>` (`fs::handles`) is the outermost lock: it is
//!    held across the upload's awaits, and while it is held any lock below may be taken briefly.
//!    Nothing else is held when it is taken.
//! 2. Leaf locks: each is taken alone, released before any other lock is taken, never nested:
//!    - `fs::inodes::Inodes::table` (this file; it holds the LRU of unreferenced inodes too, no
//!      lock of its own). `lookup`, `readdir`, `mkdir` and `create` work
//!      out a node's attributes (which may read `staging`) *before* they take it.
//!    - `fs::handles::Handles::table`; a read handle's own mutex is taken after the table is
//!      released.
//!    - `fs::meta::Meta`: the catalog, tag-list and tag-target TTL maps, the manifest LRU,
//!      `known_repos`, `seen`, `times` (each its own lock), and the `fs::flight` maps of loads
//!      on the wire (a load's answer slot is a `tokio::sync::Mutex` held by its leader across
//!      the load's awaits with no std lock; waiters await it with none). A load never asks
//!      another `Flights` (the catalog, tag list, tag target and manifest loads only ask the
//!      registry), so no two slots wait on each other.
//!    - `fs::walk::Walk::state` (where a walk over repositories stands).
//!    - `fs::staging::Staging`: `staged`, `pending_tags`, and the `changed` watch that wakes
//!      readers waiting for a commit (sent after `staged` is released; waited on with no lock).
//!    - `blob::Blobs`: `verified`, and `maps` (the chunk maps kept in memory); `BlockMemory`'s
//!      `free` (the free slots; a slot's last holder gives it back with no other lock held).
//!    - `layer::Layers`: `indexes`, `merged`, `bound` (LRUs of once-cells; the cells are awaited
//!      after the lock is released).
//!    - `cache::ChunkCache`: `inflight`, `lru`, `pool`, `joins` (each released before another is
//!      taken; evicted buffers are recycled into `pool` after `lru` is released; a join buffer
//!      goes back to `joins` when its last holder drops it), and each `Flight`'s
//!      `landing` (set, then waiters are woken with no lock held).
//!    - `layer`: each layer's `Progress` state (entries published by the index pass).
//!    - `disk::DiskCache`: `lru`, `maps` and the passthrough table (the writer thread never holds
//!      one while taking another, nor across file I/O).
//!    - `registry::mirror`: each mirror's `down_until`.
//!    - `fuse::adapter`: `dir_handles` (directory listings being paged).
//!    - `registry::http`: `scheme` (the auth scheme learned from the challenge), `tokens`
//!      (Bearer tokens per scope), `token_gates` (a `tokio::sync::Mutex` per scope held across
//!      its one token fetch, awaited with no std lock) and `redirects` (blob storage links); the request counters
//!      are atomics, the rate-limit headers and the blob latency (`RequestStats::rate_limit`,
//!      `blob_latency`) leaf mutexes.
//!    - In tests only: the fake's `repos`, `uploads` and `ranges`, the faulty wrapper's
//!      `faults` (a held request waits at its gate with no lock held).
//!
//! Not locks, but waited on the same way: the adapter's read `Semaphore` (a permit is held for
//! the whole read, no std lock with it), a chunk fetch in flight (`cache::Flight::wait`), a
//! handle's hashing task (its bounded channel and verdict), and a `tokio::sync::OnceCell` being
//! initialised (a layer index build, a merged tree): all awaited with no std lock held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use super::node::Node;
use super::types::{Ino, ROOT_INO};
use crate::digest::Digest;
use crate::error::{FsError, FsResult};

/// Inodes made by `readdir` and not looked up since, kept at most: a listing of a directory that
/// large still gets stable numbers for `ls -i` within the listing, while memory stays bounded (an
/// entry is a few hundred bytes with its name and node: some MiB at this count) whatever is listed.
pub const MAX_UNREFERENCED: usize = 16384;

struct InodeEntry {
    node: Arc<Node>,
    lookups: u64,
    /// Where it was made: (parent, name). None for the root.
    key: Option<(Ino, String)>,
}

/// Hard links of a tree share one inode: (tree id, layer digest, entry index).
type LinkKey = (Digest, Digest, usize);

fn link_key(node: &Node) -> Option<LinkKey> {
    match node {
        Node::TreeEntry(e) if e.nlink > 1 => {
            Some((e.view_id.clone(), e.layer.digest.clone(), e.index))
        }
        _ => None,
    }
}

struct InodeTable {
    nodes: HashMap<Ino, InodeEntry>,
    by_name: HashMap<(Ino, String), Ino>,
    shared: HashMap<LinkKey, Ino>,
    /// Inodes with no lookup (made by readdir), oldest first; bounded by `cap`.
    unreferenced: LruCache<Ino, ()>,
    cap: usize,
    next: u64,
}

impl InodeTable {
    fn new(cap: usize) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_INO,
            InodeEntry {
                node: Arc::new(Node::Root),
                lookups: 1,
                key: None,
            },
        );
        InodeTable {
            nodes,
            by_name: HashMap::new(),
            shared: HashMap::new(),
            unreferenced: LruCache::unbounded(),
            cap,
            next: ROOT_INO.0 + 1,
        }
    }

    /// Count a lookup of `ino` if `lookup`, else note it as listed (most recently).
    fn touch(&mut self, ino: Ino, lookup: bool) {
        let Some(e) = self.nodes.get_mut(&ino) else {
            return;
        };
        if lookup {
            e.lookups += 1;
            self.unreferenced.pop(&ino);
        } else if e.lookups == 0 {
            self.unreferenced.put(ino, ());
        }
    }

    /// Drop the oldest unreferenced inodes beyond the cap.
    fn trim(&mut self) {
        while self.unreferenced.len() > self.cap {
            let Some((ino, ())) = self.unreferenced.pop_lru() else {
                break;
            };
            if self.nodes.get(&ino).is_some_and(|e| e.lookups == 0) {
                self.remove(ino);
            }
        }
    }

    fn child(&mut self, parent: Ino, name: &str, node: Node, lookup: bool) -> Ino {
        let ino = self.child_inner(parent, name, node);
        self.touch(ino, lookup);
        self.trim();
        ino
    }

    /// The inode for `parent/name`; its lookup count is left to [`Self::touch`].
    fn child_inner(&mut self, parent: Ino, name: &str, node: Node) -> Ino {
        let key = (parent, name.to_string());
        if let Some(&ino) = self.by_name.get(&key) {
            if let Some(e) = self.nodes.get(&ino) {
                if *e.node == node {
                    return ino;
                }
                // The old node lives on for open handles until forgotten; it keeps its
                // (parent, name) as where it came from.
            }
        }
        let lk = link_key(&node);
        if let Some(&ino) = lk.as_ref().and_then(|k| self.shared.get(k)) {
            if self.nodes.contains_key(&ino) {
                self.by_name.insert(key, ino);
                return ino;
            }
        }
        let ino = Ino(self.next);
        self.next += 1;
        if let Some(k) = lk {
            self.shared.insert(k, ino);
        }
        self.nodes.insert(
            ino,
            InodeEntry {
                node: Arc::new(node),
                lookups: 0,
                key: Some(key.clone()),
            },
        );
        self.by_name.insert(key, ino);
        ino
    }

    fn forget(&mut self, ino: Ino, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let drop_it = match self.nodes.get_mut(&ino) {
            Some(e) => {
                e.lookups = e.lookups.saturating_sub(n);
                e.lookups == 0
            }
            None => false,
        };
        if drop_it {
            self.remove(ino);
        }
    }

    /// Drop `ino` and every name that leads to it.
    fn remove(&mut self, ino: Ino) {
        self.unreferenced.pop(&ino);
        if let Some(e) = self.nodes.remove(&ino) {
            if let Some(k) = e.key {
                if self.by_name.get(&k) == Some(&ino) {
                    self.by_name.remove(&k);
                }
            }
            if let Some(k) = link_key(&e.node) {
                if self.shared.get(&k) == Some(&ino) {
                    self.shared.remove(&k);
                }
            }
        }
    }
}

/// The inode table behind its lock.
pub(crate) struct Inodes {
    table: Mutex<InodeTable>,
}

impl Inodes {
    pub fn new() -> Self {
        Self::with_cap(MAX_UNREFERENCED)
    }

    /// A table keeping at most `cap` unreferenced inodes.
    fn with_cap(cap: usize) -> Self {
        Inodes {
            table: Mutex::new(InodeTable::new(cap)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InodeTable> {
        crate::sync::lock(&self.table)
    }

    /// The node of `ino`, or ESTALE.
    pub fn node(&self, ino: Ino) -> FsResult<Arc<Node>> {
        self.lock()
            .nodes
            .get(&ino)
            .map(|e| e.node.clone())
            .ok_or_else(|| FsError::stale(format!("inode {} is gone", ino.0)))
    }

    /// The inode for `parent/name` holding `node`, counting a lookup if `lookup`. The same node
    /// keeps its number; a different node under the same name (a moved tag) gets a new one.
    pub fn child(&self, parent: Ino, name: &str, node: Node, lookup: bool) -> Ino {
        self.lock().child(parent, name, node, lookup)
    }

    /// Inodes for a whole listing under one lock (no lookup counted).
    pub fn children(&self, parent: Ino, nodes: Vec<(String, Node)>) -> Vec<(Ino, String, Node)> {
        let mut t = self.lock();
        nodes
            .into_iter()
            .map(|(name, n)| {
                let ino = t.child(parent, &name, n.clone(), false);
                (ino, name, n)
            })
            .collect()
    }

    pub fn forget(&self, ino: Ino, n: u64) {
        self.lock().forget(ino, n);
    }

    /// The (parent, name) an inode was made under.
    pub fn parent_of(&self, ino: Ino) -> Option<(Ino, String)> {
        self.lock().nodes.get(&ino).and_then(|e| e.key.clone())
    }

    /// Some inode whose node matches `pred`.
    pub fn find(&self, pred: impl Fn(&Node) -> bool) -> Option<Ino> {
        self.lock()
            .nodes
            .iter()
            .find(|(_, e)| pred(&e.node))
            .map(|(i, _)| *i)
    }

    /// Inodes held (for tests and stats).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::node::{Content, FileNode};

    fn dir(p: &str) -> Node {
        Node::Dir { path: p.into() }
    }

    #[test]
    fn numbers_are_stable_and_never_reused() {
        let t = Inodes::new();
        let a = t.child(ROOT_INO, "a", dir("a"), true);
        assert_eq!(t.child(ROOT_INO, "a", dir("a"), true), a);
        assert_eq!(*t.node(a).unwrap(), dir("a"));
        assert_eq!(t.parent_of(a), Some((ROOT_INO, "a".into())));
        // Two lookups: one forget keeps it, the second drops it.
        t.forget(a, 1);
        assert!(t.node(a).is_ok());
        t.forget(a, 1);
        assert_eq!(t.node(a).unwrap_err().errno, libc::ESTALE);
        let again = t.child(ROOT_INO, "a", dir("a"), true);
        assert_ne!(again, a, "numbers are never reused");
    }

    #[test]
    fn root_is_never_forgotten_and_listings_count_no_lookup() {
        let t = Inodes::new();
        t.forget(ROOT_INO, 100);
        assert_eq!(*t.node(ROOT_INO).unwrap(), Node::Root);
        let listed = t.children(ROOT_INO, vec![("x".into(), dir("x"))]);
        let x = listed[0].0;
        // Listed but never looked up: a forget of 0 lookups drops it.
        t.forget(x, 0);
        assert!(t.node(x).is_err());
    }

    #[test]
    fn listed_inodes_are_bounded_and_looked_up_ones_stay() {
        let t = Inodes::with_cap(3);
        let looked = t.child(ROOT_INO, "kept", dir("kept"), true);
        let list = |names: &[&str]| -> Vec<Ino> {
            t.children(
                ROOT_INO,
                names.iter().map(|n| (n.to_string(), dir(n))).collect(),
            )
            .into_iter()
            .map(|(i, _, _)| i)
            .collect()
        };
        let first = list(&["a", "b", "c", "kept"]);
        assert_eq!(first[3], looked, "a listed name keeps its looked-up inode");
        assert_eq!(t.len(), 5);
        // Three more names: the three oldest listed ones go, the looked-up one never.
        let second = list(&["d", "e", "f"]);
        assert_eq!(t.len(), 5, "root + kept + 3 listed");
        for gone in &first[..3] {
            assert_eq!(t.node(*gone).unwrap_err().errno, libc::ESTALE);
        }
        assert!(t.node(looked).is_ok());
        // Listed again: a new number, never a reused one.
        let again = list(&["a"]);
        assert!(!first.contains(&again[0]) && !second.contains(&again[0]));
        assert!(again[0].0 > second[2].0);
        // That pushed out the oldest, "d".
        assert!(t.node(second[0]).is_err());
        assert!(t.node(second[1]).is_ok() && t.node(second[2]).is_ok());
        // Listing refreshes: "e" is listed again, so "f" (now older) goes next, not "e".
        list(&["e"]);
        list(&["g"]);
        assert!(t.node(second[2]).is_err());
        assert!(t.node(second[1]).is_ok());
        // A listed inode looked up later leaves the bound; forgotten, it is dropped as usual.
        let e = t.child(ROOT_INO, "e", dir("e"), true);
        assert_eq!(e, second[1]);
        list(&["i", "j", "k", "l"]);
        assert!(t.node(e).is_ok());
        assert!(t.node(looked).is_ok());
        t.forget(e, 1);
        assert!(t.node(e).is_err());
        assert!(t.lock().unreferenced.len() <= 3);
    }

    #[test]
    fn a_changed_node_under_a_name_gets_a_new_number() {
        let t = Inodes::new();
        let file = |d: &str| {
            Node::File(FileNode {
                repo: "r".into(),
                content: Content::Blob {
                    digest: Digest::from(d),
                },
                size: 1,
                media_type: None,
            })
        };
        let old = t.child(ROOT_INO, "f", file("sha256:1"), true);
        let new = t.child(ROOT_INO, "f", file("sha256:2"), true);
        assert_ne!(old, new);
        // The old node stays readable for open handles until forgotten.
        assert_eq!(*t.node(old).unwrap(), file("sha256:1"));
        t.forget(old, 1);
        assert!(t.node(old).is_err());
        assert!(t.node(new).is_ok());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn hard_links_of_one_tree_share_an_inode() {
        use crate::fs::node::TreeEntry;
        use crate::layer::LayerRef;
        use crate::layer::{EntryKind, TarEntry};
        let layer = LayerRef {
            digest: Digest::from("sha256:l"),
            size: 10,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            config: None,
            pos: 0,
            toc_annotations: vec![],
        };
        let entry = |path: &str, view: &str| {
            Node::TreeEntry(TreeEntry {
                repo: "r".into(),
                layer: layer.clone(),
                view_id: Digest::from(view),
                index: 3,
                entry: TarEntry {
                    path: path.into(),
                    kind: EntryKind::File,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    mtime: 0,
                    size: 1,
                    link: None,
                    dev: (0, 0),
                    xattrs: vec![],
                    offset: 0,
                },
                nlink: 2,
            })
        };
        let t = Inodes::new();
        let a = t.child(ROOT_INO, "a", entry("a", "sha256:img"), true);
        let b = t.child(ROOT_INO, "b", entry("a", "sha256:img"), true);
        assert_eq!(a, b, "two names of one entry: one inode");
        let other = t.child(ROOT_INO, "c", entry("a", "sha256:other"), true);
        assert_ne!(a, other, "the same entry in another tree is another inode");
        // Two lookups under two names: it lives until both are forgotten.
        t.forget(a, 1);
        assert!(t.node(a).is_ok());
        t.forget(a, 1);
        assert!(t.node(a).is_err());
        let again = t.child(ROOT_INO, "a", entry("a", "sha256:img"), true);
        assert_ne!(again, a);
    }
}
