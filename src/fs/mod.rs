//! The filesystem core: the regfs tree (see `docs/SEMANTICS.md`) over a [`Registry`].
//!
//! [`Fs`] is a facade. Each part owns its state and its lock:
//! - [`inodes`]: the inode table (and the crate's lock order, written there once);
//! - [`handles`]: open files, reading or writing;
//! - [`meta`]: registry metadata with TTLs, updated by events when the mount writes;
//! - [`staging`]: files being written and tags made by mkdir;
//! - [`crate::blob::Blobs`]: blob bytes through the chunk cache, verified;
//! - [`crate::layer::Layers`]: layer indexes and image contents.
//!
//! `tree/` says what each directory holds; `read`, `write`, `promote` and `xattr` implement the
//! operations. Every operation is an async method returning a plain result or an [`FsError`].
//! Nothing here knows about fuser; `crate::fuse` adapts.

use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use crate::blob::Blobs;
use crate::cache::ChunkCache;
use crate::error::{FsError, FsResult};
use crate::layer::Layers;
use crate::registry::Registry;

mod flight;
mod handles;
mod inodes;
mod meta;
mod node;
mod promote;
mod read;
mod staging;
mod tree;
mod types;
mod walk;
mod write;
mod xattr;

pub use node::{
    Area, Content, ControlFile, EntryMeta, FileNode, Node, StagedKey, TreeDir, TreeEntry, View,
};
pub use staging::StagedInfo;
pub use tree::TAG_CONCURRENCY;
pub use types::{Attr, DirEntry, EntryOut, Fh, Ino, Kind, Opened, ROOT_INO};

/// Names inside a repository directory that belong to regfs, not to nested repositories.
pub const RESERVED: &[&str] = &["tags", "blobs", "uploads", "index.json", "oci-layout"];
/// Inside a repository directory, `_ns/` lists nested repositories and namespaces only, so a nested
/// repository whose name is reserved (`a/tags`) is still reachable as `a/_ns/tags`. A repository
/// name component can never start with `_`, so `_ns` cannot clash with one.
pub const NS_ESCAPE: &str = "_ns";
/// Kernel cache lifetime for content addressed by digest: it never changes.
const IMMUTABLE_TTL: Duration = Duration::from_secs(24 * 3600);

/// Options of the core.
#[derive(Debug, Clone)]
pub struct FsOptions {
    pub chunk_size: u64,
    pub cache_size: u64,
    pub metadata_ttl: Duration,
    /// Largest readahead window of one reader, in bytes (0: none).
    pub readahead: u64,
    /// (os, architecture, variant) chosen at the tag level of an index.
    pub platform: (String, String, Option<String>),
    /// PATCH size of uploads.
    pub upload_chunk_size: u64,
    /// Uncompressed bytes between gzip checkpoints.
    pub checkpoint_spacing: u64,
    /// Where layer indexes persist across mounts (keyed by layer digest).
    pub cache_dir: Option<std::path::PathBuf>,
    /// The effective configuration, without secrets, as `.regfs/config` shows it.
    pub effective_config: serde_json::Value,
    /// Resolve a tag with one GET (body and digest at once) instead of a HEAD first
    /// (`--tag-resolution`, decided for the registry's host by `TagResolution::uses_get`).
    pub resolve_tags_by_get: bool,
    /// The disk tier in the cache dir (opened by the caller: it locks the dir).
    pub disk: Option<Arc<crate::disk::DiskCache>>,
    /// Repositories listed ahead of a walk over `tags/` directories (0: none; `fs::walk`).
    pub walk_ahead: usize,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            chunk_size: crate::config::DEFAULT_CHUNK_SIZE,
            cache_size: crate::config::DEFAULT_CACHE_SIZE,
            metadata_ttl: crate::config::DEFAULT_METADATA_TTL,
            readahead: crate::config::DEFAULT_READAHEAD,
            platform: ("linux".into(), "amd64".into(), None),
            upload_chunk_size: crate::config::DEFAULT_UPLOAD_CHUNK_SIZE,
            checkpoint_spacing: crate::config::DEFAULT_CHECKPOINT_SPACING,
            cache_dir: None,
            effective_config: serde_json::Value::Null,
            // What `--tag-resolution auto` gives for any registry but Docker Hub.
            resolve_tags_by_get: true,
            disk: None,
            walk_ahead: crate::config::DEFAULT_WALK_AHEAD,
        }
    }
}

impl FsOptions {
    /// The core's options from the mount's configuration.
    pub fn from_config(c: &crate::config::Config) -> Self {
        FsOptions {
            chunk_size: c.cache.chunk_size,
            cache_size: c.cache.cache_size,
            metadata_ttl: c.cache.metadata_ttl,
            readahead: c.cache.readahead,
            platform: c.platform.clone(),
            upload_chunk_size: c.push.upload_chunk_size,
            checkpoint_spacing: c.cache.checkpoint_spacing,
            cache_dir: c.cache.cache_dir.clone(),
            effective_config: c.public_json(),
            resolve_tags_by_get: c
                .connection
                .tag_resolution
                .uses_get(c.connection.base_url.host_str().unwrap_or_default()),
            disk: None,
            walk_ahead: c.cache.walk_ahead,
        }
    }
}

/// Called with (parent inode, name) when a name's meaning changed under the kernel's cache.
pub type Invalidator = Box<dyn Fn(Ino, String) + Send + Sync>;

/// The filesystem core.
pub struct Fs {
    reg: Arc<dyn Registry>,
    opts: FsOptions,
    mount_time: SystemTime,
    inodes: inodes::Inodes,
    handles: handles::Handles,
    meta: meta::Meta,
    staging: staging::Staging,
    blobs: Arc<Blobs>,
    layers: Layers,
    /// Tells the kernel to forget a cached name (set by the FUSE adapter).
    invalidator: OnceLock<Invalidator>,
    /// What `.regfs/` shows that no other part keeps.
    control: tree::Control,
    /// Which repositories a walk over `tags/` directories has reached, and is listed ahead to.
    walk: walk::Walk,
    /// This core, for work it starts in the background (walk-ahead).
    me: Weak<Fs>,
}

impl Fs {
    /// The core, shared: work it starts in the background holds it too.
    pub fn new(reg: Arc<dyn Registry>, opts: FsOptions) -> Arc<Self> {
        let cache = Arc::new(ChunkCache::new(opts.cache_size));
        let blobs = Arc::new(
            Blobs::new(
                reg.clone(),
                cache,
                crate::blob::EngineConfig {
                    block_size: opts.chunk_size,
                    max_request: crate::config::MAX_REQUEST.max(opts.chunk_size),
                    max_request_near: crate::config::MAX_REQUEST_NEAR.max(opts.chunk_size),
                    near: crate::config::NEAR_LATENCY,
                    max_window: opts.readahead,
                    // Prefetched chunks land in the cache, so what is in flight ahead of readers
                    // is held to a quarter of it: readahead never evicts what readers still use.
                    prefetch_budget: (opts.cache_size / 4).max(opts.chunk_size),
                },
            )
            .with_disk(opts.disk.clone()),
        );
        Arc::new_cyclic(|me| Fs {
            control: tree::Control::new(opts.effective_config.clone()),
            walk: walk::Walk::new(opts.walk_ahead),
            me: me.clone(),
            meta: meta::Meta::new(reg.clone(), opts.metadata_ttl, opts.platform.clone())
                .resolving_tags_by_get(opts.resolve_tags_by_get),
            layers: Layers::new(
                blobs.clone(),
                reg.clone(),
                opts.checkpoint_spacing,
                opts.cache_dir.clone(),
            ),
            blobs,
            reg,
            opts,
            mount_time: SystemTime::now(),
            inodes: inodes::Inodes::new(),
            handles: handles::Handles::new(),
            staging: staging::Staging::default(),
            invalidator: OnceLock::new(),
        })
    }

    /// Install the hook that invalidates kernel name caches (once).
    pub fn set_invalidator(&self, f: Invalidator) {
        let _ = self.invalidator.set(f);
    }

    /// Attributes of a node (its inode number is filled in by the caller).
    fn attr_of(&self, ino: Ino, node: &Node) -> Attr {
        if let Some(mut a) = tree::tree_attr(ino, node) {
            // A tree's root is in no tar: it shows the image's time.
            if let Some(t) = self.dir_time(node) {
                a.mtime = t;
            }
            return a;
        }
        let (size, perm, nlink) = match node {
            Node::File(f) => (f.size, 0o444, 1),
            Node::IndexJson { .. } => (0, 0o444, 1),
            Node::ControlFile(c) => (self.control_bytes(*c).len() as u64, 0o444, 1),
            Node::Staged(k) => (self.staging.size(k), 0o644, 1),
            n if n.accepts_entries() => (0, 0o755, 2),
            _ => (0, 0o555, 2),
        };
        Attr {
            ino,
            kind: node.kind(),
            size,
            perm,
            nlink,
            mtime: self.dir_time(node).unwrap_or(self.mount_time),
            uid: None,
            gid: None,
            rdev: 0,
        }
    }

    fn entry_out(&self, ino: Ino, node: &Node) -> EntryOut {
        EntryOut {
            attr: self.attr_of(ino, node),
            ttl: if node.immutable() {
                IMMUTABLE_TTL
            } else if node.volatile() {
                // Changes with every write: let the kernel ask.
                Duration::ZERO
            } else {
                self.opts.metadata_ttl
            },
        }
    }

    /// Enter `parent/name` as `node` with one lookup counted. Attributes are worked out before
    /// the inode lock is taken (lock order: see `inodes`).
    fn entry_for(&self, parent: Ino, name: &str, node: Node) -> EntryOut {
        let mut out = self.entry_out(Ino(0), &node);
        out.attr.ino = self.inodes.child(parent, name, node, true);
        self.owner_write(&mut out.attr);
        out
    }

    pub async fn lookup(&self, parent: Ino, name: &str) -> FsResult<EntryOut> {
        let pnode = self.inodes.node(parent)?;
        if !pnode.is_dir() {
            return Err(FsError::not_dir(format!("lookup {name} in a file")));
        }
        let child = self
            .find_child(&pnode, name)
            .await?
            .ok_or_else(|| FsError::not_found(format!("{name}: no such entry")))?;
        Ok(self.entry_for(parent, name, child))
    }

    pub fn forget(&self, ino: Ino, n: u64) {
        self.inodes.forget(ino, n);
    }

    pub async fn getattr(&self, ino: Ino) -> FsResult<EntryOut> {
        let node = self.inodes.node(ino)?;
        let node = self.materialize((*node).clone()).await?;
        let mut out = self.entry_out(ino, &node);
        self.owner_write(&mut out.attr);
        Ok(out)
    }

    /// The whole listing of a directory (without `.` and `..`).
    pub async fn readdir(&self, ino: Ino) -> FsResult<Vec<DirEntry>> {
        let node = self.inodes.node(ino)?;
        let children = self.children(&node).await?;
        Ok(self
            .inodes
            .children(ino, children)
            .into_iter()
            .map(|(ino, name, n)| DirEntry {
                ino,
                name,
                kind: n.kind(),
            })
            .collect())
    }

    /// Close a handle. A writing handle not committed yet commits here; errors can only be
    /// logged at this point (`write::release_writer`).
    pub async fn release(&self, fh: Fh) {
        if let Some(handles::Handle::Write(w)) = self.handles.remove(fh) {
            self.release_writer(fh, &w).await;
        }
    }
}
