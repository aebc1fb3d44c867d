//! The filesystem core: the regfs tree (see `docs/SEMANTICS.md`) over a [`Registry`].
//!
//! Every operation is an async method returning a plain result ([`EntryOut`], bytes, names) or an
//! [`FsError`]. Nothing here knows about fuser; `fuse.rs` adapts. That keeps the whole tree testable
//! against the in-memory fake registry.
//!
//! Lock order: `inodes` → `handles` (a handle's own mutex is taken after both are released). No
//! std mutex is held across an `.await`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};

use crate::cache::ChunkCache;
use crate::digest::{digest_hex, is_sha256_hex, StreamingDigest};
use crate::error::{FsError, FsResult, RegistryError, RegistryResult};
use crate::manifest::{self, Descriptor, Parsed};
use crate::registry::{is_valid_component, is_valid_tag, ManifestBlob, ManifestHead, Registry};

mod contents;
mod write;

/// The root inode number.
pub const ROOT_INO: u64 = 1;
/// Names inside a repository directory that belong to regfs, not to nested repositories.
pub const RESERVED: &[&str] = &["tags", "blobs", "uploads", "index.json", "oci-layout"];
/// Inside a repository directory, `_ns/` lists nested repositories and namespaces only, so a nested
/// repository whose name is reserved (`a/tags`) is still reachable as `a/_ns/tags`. A repository
/// name component can never start with `_`, so `_ns` cannot clash with one.
pub const NS_ESCAPE: &str = "_ns";
/// Kernel cache lifetime for content addressed by digest: it never changes.
const IMMUTABLE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Out-of-order read data kept per handle while waiting for the gap, for digest verification.
const MAX_PENDING_VERIFY: usize = 32 << 20;
/// Layer indexes (and merged trees) kept in memory at once.
const MAX_LAYER_INDEXES: usize = 64;
const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Options of the core.
#[derive(Debug, Clone)]
pub struct FsOptions {
    pub chunk_size: u64,
    pub cache_size: u64,
    pub metadata_ttl: Duration,
    pub readahead_chunks: u64,
    /// (os, architecture, variant) chosen at the tag level of an index.
    pub platform: (String, String, Option<String>),
    /// PATCH size of uploads.
    pub upload_chunk_size: u64,
    /// Uncompressed bytes between gzip checkpoints.
    pub checkpoint_spacing: u64,
    /// Where layer indexes persist across mounts (keyed by layer digest).
    pub cache_dir: Option<std::path::PathBuf>,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            chunk_size: crate::config::DEFAULT_CHUNK_SIZE,
            cache_size: crate::config::DEFAULT_CACHE_SIZE,
            metadata_ttl: crate::config::DEFAULT_METADATA_TTL,
            readahead_chunks: crate::config::DEFAULT_READAHEAD_CHUNKS,
            platform: ("linux".into(), "amd64".into(), None),
            upload_chunk_size: crate::config::DEFAULT_UPLOAD_CHUNK_SIZE,
            checkpoint_spacing: crate::config::DEFAULT_CHECKPOINT_SPACING,
            cache_dir: None,
        }
    }
}

/// Where a file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A blob, read in chunks through the cache.
    Blob { digest: String },
    /// A manifest, read whole by digest.
    Manifest { digest: String },
    /// Bytes regfs made (index.json, oci-layout).
    Inline(Bytes),
}

/// A file of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileNode {
    pub repo: String,
    pub content: Content,
    pub size: u64,
    pub media_type: Option<String>,
}

impl FileNode {
    fn digest(&self) -> Option<&str> {
        match &self.content {
            Content::Blob { digest } | Content::Manifest { digest } => Some(digest),
            Content::Inline(_) => None,
        }
    }
}

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Root,
    /// A namespace, a repository, or both: `path` is the repository-name prefix.
    Dir {
        path: String,
    },
    /// `<repo>/_ns/`: the nested names of `path` only.
    NsEscape {
        path: String,
    },
    Tags {
        repo: String,
    },
    /// A manifest shown as a directory: `tags/<tag>/` (tag is Some) or a platform directory.
    Image {
        repo: String,
        tag: Option<String>,
        digest: String,
    },
    /// `layers/` of the image manifest `digest` (already platform-resolved).
    Layers {
        repo: String,
        digest: String,
    },
    Blobs {
        repo: String,
    },
    BlobsAlgo {
        repo: String,
    },
    Uploads {
        repo: String,
    },
    /// `index.json` as listed by readdir; made into a `File` (its bytes and size) when looked up
    /// or opened, so a plain `ls` of a repository does not resolve every tag.
    IndexJson {
        repo: String,
    },
    /// `tags/<tag>/` made by mkdir, before its manifest is pushed.
    PendingTag {
        repo: String,
        tag: String,
    },
    /// A file being (or having been) written: `uploads/NAME`, `blobs/sha256/<hex>` or a tag's
    /// `manifest.json`. Its size and digest live in the staged table.
    Staged(StagedKey),
    /// A directory of an image's `rootfs/` or of a layer's own tree (`layers/NN-<hex12>/`).
    TreeDir(TreeDir),
    /// A non-directory entry of those trees.
    TreeEntry(TreeEntry),
    File(FileNode),
}

/// A layer, as the trees need it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LayerRef {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    /// The image manifest and position it was reached through, to check its diff_id.
    pub image: String,
    pub pos: usize,
    /// The descriptor's annotations that locate or check a TOC (eStargz, zstd:chunked).
    pub toc_annotations: Vec<(String, String)>,
}

/// Which tree a node belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// `rootfs/` of the image manifest with this digest.
    Rootfs { image: String },
    /// One layer's own tree.
    Layer(LayerRef),
}

/// Ownership, mode and time from a tar header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeDir {
    pub repo: String,
    pub view: View,
    /// Path inside the tree ("" = its root).
    pub path: String,
    /// None for the tree's root (not in any tar).
    pub meta: Option<Meta>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    pub repo: String,
    /// The layer whose bytes hold the entry.
    pub layer: LayerRef,
    /// Identifies the tree (image or layer digest), so hard links share an inode within it.
    pub view_id: String,
    /// The entry's index in its layer (hard links resolved to their target).
    pub index: usize,
    pub entry: crate::layer::TarEntry,
    pub nlink: u32,
}

/// Where a written file lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Area {
    Uploads,
    Blobs,
    Manifest { tag: String },
}

/// Identity of a written file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StagedKey {
    pub repo: String,
    pub area: Area,
    pub name: String,
}

/// What is known of a written file.
#[derive(Debug, Clone, Default)]
pub struct StagedInfo {
    /// Bytes written so far (the final size once committed).
    pub size: u64,
    /// Set once the registry accepted it.
    pub digest: Option<String>,
    pub media_type: Option<String>,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        !matches!(
            self,
            Node::File(_) | Node::IndexJson { .. } | Node::Staged(_) | Node::TreeEntry(_)
        )
    }
    /// A directory where something can be created (mkdir, an upload, a manifest).
    pub fn accepts_entries(&self) -> bool {
        matches!(
            self,
            Node::Root
                | Node::Dir { .. }
                | Node::NsEscape { .. }
                | Node::Tags { .. }
                | Node::Image { tag: Some(_), .. }
                | Node::PendingTag { .. }
                | Node::Uploads { .. }
                | Node::BlobsAlgo { .. }
        )
    }
    /// Can the kernel cache this node's entry and attributes for long?
    fn immutable(&self) -> bool {
        match self {
            Node::Image { tag: Some(_), .. } => false,
            Node::Image { tag: None, .. } | Node::Layers { .. } => true,
            Node::File(f) => !matches!(f.content, Content::Inline(_)),
            Node::TreeDir(_) | Node::TreeEntry(_) => true,
            _ => false,
        }
    }
}

/// File or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

/// Attributes the adapter turns into a stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub mtime: SystemTime,
    /// Owner from a tar header; None = the mounting user.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub rdev: u32,
}

/// A looked-up entry: attributes plus how long the kernel may cache them.
#[derive(Debug, Clone, Copy)]
pub struct EntryOut {
    pub attr: Attr,
    pub ttl: Duration,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub name: String,
    pub kind: Kind,
}

/// What `open` tells the adapter.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub fh: u64,
    /// The content never changes: the kernel may keep its page cache across opens.
    pub keep_cache: bool,
}

struct InodeEntry {
    node: Arc<Node>,
    lookups: u64,
    key: Option<(u64, String)>,
}

/// `ino -> node` and `(parent, name) -> ino`. Numbers come from a counter and are never reused.
struct InodeTable {
    nodes: HashMap<u64, InodeEntry>,
    by_name: HashMap<(u64, String), u64>,
    /// Hard links of a tree share one inode: (tree id, layer digest, entry index) -> ino.
    shared: HashMap<(String, String, usize), u64>,
    next: u64,
}

fn link_key(node: &Node) -> Option<(String, String, usize)> {
    match node {
        Node::TreeEntry(e) if e.nlink > 1 => {
            Some((e.view_id.clone(), e.layer.digest.clone(), e.index))
        }
        _ => None,
    }
}

impl InodeTable {
    fn new() -> Self {
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
            next: ROOT_INO + 1,
        }
    }

    /// The inode for `parent/name` holding `node`. The same node keeps its number; a different
    /// node under the same name (a moved tag) gets a new one.
    fn child(&mut self, parent: u64, name: &str, node: Node, lookup: bool) -> u64 {
        let key = (parent, name.to_string());
        if let Some(&ino) = self.by_name.get(&key) {
            if let Some(e) = self.nodes.get_mut(&ino) {
                if *e.node == node {
                    if lookup {
                        e.lookups += 1;
                    }
                    return ino;
                }
                // The old node lives on for open handles until forgotten; it keeps its
                // (parent, name) as where it came from.
            }
        }
        let lk = link_key(&node);
        if let Some(&ino) = lk.as_ref().and_then(|k| self.shared.get(k)) {
            if let Some(e) = self.nodes.get_mut(&ino) {
                if lookup {
                    e.lookups += 1;
                }
                self.by_name.insert(key, ino);
                return ino;
            }
        }
        let ino = self.next;
        self.next += 1;
        if let Some(k) = lk {
            self.shared.insert(k, ino);
        }
        self.nodes.insert(
            ino,
            InodeEntry {
                node: Arc::new(node),
                lookups: u64::from(lookup),
                key: Some(key.clone()),
            },
        );
        self.by_name.insert(key, ino);
        ino
    }

    fn forget(&mut self, ino: u64, n: u64) {
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
            if let Some(e) = self.nodes.remove(&ino) {
                if let Some(k) = e.key {
                    if self.by_name.get(&k) == Some(&ino) {
                        self.by_name.remove(&k);
                    }
                }
                if let Some(k) = link_key(&e.node) {
                    self.shared.remove(&k);
                }
            }
        }
    }
}

/// Digest verification of a blob read by one handle from start to end.
struct Verifier {
    digest: String,
    size: u64,
    hasher: StreamingDigest,
    pending: BTreeMap<u64, Bytes>,
    pending_bytes: usize,
    /// Gave up (data too far out of order) or already finished.
    done: bool,
    /// The blob failed verification: every later read through this handle fails too, so a
    /// kernel retry of a failed readahead cannot slip the bad bytes through.
    failed: Option<String>,
}

impl Verifier {
    /// Feed data read at `offset`. Returns Ok(true) when this completed a successful check, and
    /// Err(actual digest) on a mismatch once the end is reached.
    fn feed(&mut self, offset: u64, data: &Bytes) -> Result<bool, String> {
        if self.done {
            return Ok(false);
        }
        let next = self.hasher.bytes;
        let end = offset + data.len() as u64;
        if offset > next {
            if self.pending_bytes + data.len() > MAX_PENDING_VERIFY {
                self.done = true;
                self.pending.clear();
                return Ok(false);
            }
            self.pending_bytes += data.len();
            self.pending.insert(offset, data.clone());
            return Ok(false);
        }
        if end > next {
            self.hasher.update(&data[(next - offset) as usize..]);
        }
        // Drain stashed pieces that are now contiguous.
        while let Some((&off, _)) = self.pending.first_key_value() {
            let next = self.hasher.bytes;
            if off > next {
                break;
            }
            let (_, piece) = self.pending.pop_first().expect("non-empty");
            self.pending_bytes -= piece.len();
            let pend = off + piece.len() as u64;
            if pend > next {
                self.hasher.update(&piece[(next - off) as usize..]);
            }
        }
        if self.hasher.bytes >= self.size {
            self.done = true;
            let actual = std::mem::take(&mut self.hasher).finish();
            if actual != self.digest {
                return Err(actual);
            }
            return Ok(true);
        }
        Ok(false)
    }
}

struct Handle {
    node: Arc<Node>,
    verifier: Option<Verifier>,
    /// End of the previous read: a read starting here is sequential.
    last_end: u64,
}

/// Cached listing with its fetch time.
pub(crate) struct Timed<T> {
    at: Instant,
    value: T,
}

/// The catalog as last fetched: `None` = the registry offers none to us.
type CatalogState = Option<Arc<Vec<String>>>;

/// A manifest with its parsed form.
#[derive(Clone)]
pub(crate) struct ManifestEntry {
    blob: ManifestBlob,
    parsed: Parsed,
}

/// The filesystem core.
pub struct Fs {
    reg: Arc<dyn Registry>,
    cache: Arc<ChunkCache>,
    opts: FsOptions,
    mount_time: SystemTime,
    inodes: Mutex<InodeTable>,
    handles: Mutex<HashMap<u64, Arc<Mutex<Handle>>>>,
    next_fh: AtomicU64,
    /// Manifests by digest: content addressed, so never stale. Bounded by count.
    manifests: Mutex<lru::LruCache<String, ManifestEntry>>,
    /// `None` = the registry offers no catalog to us.
    catalog: Mutex<Option<Timed<CatalogState>>>,
    tag_lists: Mutex<HashMap<String, Timed<Arc<Vec<String>>>>>,
    tag_targets: Mutex<HashMap<(String, String), Timed<ManifestHead>>>,
    /// Repositories confirmed to exist by a lookup (for registries without a catalog).
    known_repos: Mutex<BTreeSet<String>>,
    /// Per repository: digests seen so far -> what they are, for `blobs/sha256/`.
    seen: Mutex<HashMap<String, BTreeMap<String, FileNode>>>,
    /// Blob digests whose whole content has been checked.
    verified: Mutex<std::collections::HashSet<String>>,
    /// Files written through the mount.
    staged: Mutex<HashMap<StagedKey, StagedInfo>>,
    /// Tags made by mkdir whose manifest is not pushed yet.
    pending_tags: Mutex<BTreeSet<(String, String)>>,
    /// Open writing handles.
    writers: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<write::Writer>>>>,
    /// Tells the kernel to forget a cached name (set by the FUSE adapter).
    invalidator: std::sync::OnceLock<Invalidator>,
    /// Layer indexes by layer digest (bounded by count), built once each.
    indexes:
        Mutex<lru::LruCache<String, Arc<tokio::sync::OnceCell<Arc<crate::layer::LayerIndex>>>>>,
    /// Merged root filesystems by image manifest digest.
    merged_views:
        Mutex<lru::LruCache<String, Arc<tokio::sync::OnceCell<Arc<contents::MergedView>>>>>,
}

/// Called with (parent inode, name) when a name's meaning changed under the kernel's cache.
pub type Invalidator = Box<dyn Fn(u64, String) + Send + Sync>;

fn fs_err_ctx(e: RegistryError, ctx: &str) -> FsError {
    FsError::from(e).context(ctx)
}

impl Fs {
    pub fn new(reg: Arc<dyn Registry>, opts: FsOptions) -> Self {
        Fs {
            reg,
            cache: Arc::new(ChunkCache::new(opts.cache_size)),
            opts,
            mount_time: SystemTime::now(),
            inodes: Mutex::new(InodeTable::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            manifests: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(4096).expect("non-zero"),
            )),
            catalog: Mutex::new(None),
            tag_lists: Mutex::new(HashMap::new()),
            tag_targets: Mutex::new(HashMap::new()),
            known_repos: Mutex::new(BTreeSet::new()),
            seen: Mutex::new(HashMap::new()),
            verified: Mutex::new(std::collections::HashSet::new()),
            staged: Mutex::new(HashMap::new()),
            pending_tags: Mutex::new(BTreeSet::new()),
            writers: Mutex::new(HashMap::new()),
            invalidator: std::sync::OnceLock::new(),
            indexes: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(MAX_LAYER_INDEXES).expect("non-zero"),
            )),
            merged_views: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(MAX_LAYER_INDEXES).expect("non-zero"),
            )),
        }
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    /// Install the hook that invalidates kernel name caches (once).
    pub fn set_invalidator(&self, f: Invalidator) {
        let _ = self.invalidator.set(f);
    }

    fn fresh<T>(&self, t: &Timed<T>) -> bool {
        t.at.elapsed() < self.opts.metadata_ttl
    }

    fn node(&self, ino: u64) -> FsResult<Arc<Node>> {
        self.inodes
            .lock()
            .unwrap()
            .nodes
            .get(&ino)
            .map(|e| e.node.clone())
            .ok_or_else(|| {
                FsError::new(
                    libc::ESTALE,
                    log::Level::Warn,
                    format!("inode {ino} is gone"),
                )
            })
    }

    fn attr_of(&self, ino: u64, node: &Node) -> Attr {
        if let Some(a) = contents::tree_attr(ino, node) {
            return a;
        }
        let (kind, size, perm, nlink) = match node {
            Node::File(f) => (Kind::File, f.size, 0o444, 1),
            Node::IndexJson { .. } => (Kind::File, 0, 0o444, 1),
            Node::Staged(k) => {
                let size = self.staged.lock().unwrap().get(k).map_or(0, |i| i.size);
                (Kind::File, size, 0o644, 1)
            }
            n if n.accepts_entries() => (Kind::Dir, 0, 0o755, 2),
            _ => (Kind::Dir, 0, 0o555, 2),
        };
        Attr {
            ino,
            kind,
            size,
            perm,
            nlink,
            mtime: self.mount_time,
            uid: None,
            gid: None,
            rdev: 0,
        }
    }

    fn entry_out(&self, ino: u64, node: &Node) -> EntryOut {
        EntryOut {
            attr: self.attr_of(ino, node),
            ttl: if node.immutable() {
                IMMUTABLE_TTL
            } else if matches!(node, Node::Staged(_) | Node::PendingTag { .. }) {
                // Changes with every write: let the kernel ask.
                Duration::ZERO
            } else {
                self.opts.metadata_ttl
            },
        }
    }

    // ---------------------------------------------------------------- registry data, cached

    /// The catalog, or None when the registry does not offer one to us.
    async fn catalog(&self) -> FsResult<Option<Arc<Vec<String>>>> {
        if let Some(t) = self.catalog.lock().unwrap().as_ref() {
            if self.fresh(t) {
                return Ok(t.value.clone());
            }
        }
        let value = match self.reg.catalog().await {
            Ok(list) => Some(Arc::new(list)),
            Err(
                e @ (RegistryError::NotFound(_)
                | RegistryError::Unauthorized(_)
                | RegistryError::Denied(_)
                | RegistryError::Unsupported(_)),
            ) => {
                log::info!("no catalog, listing only repositories looked up by path: {e}");
                None
            }
            Err(e) => return Err(fs_err_ctx(e, "listing repositories")),
        };
        *self.catalog.lock().unwrap() = Some(Timed {
            at: Instant::now(),
            value: value.clone(),
        });
        Ok(value)
    }

    /// Every repository name regfs knows: the catalog plus repositories found by lookup.
    async fn repo_names(&self) -> FsResult<Vec<String>> {
        let mut names: BTreeSet<String> = self.known_repos.lock().unwrap().clone();
        if let Some(cat) = self.catalog().await? {
            names.extend(cat.iter().cloned());
        }
        Ok(names.into_iter().collect())
    }

    async fn tag_list(&self, repo: &str) -> FsResult<Arc<Vec<String>>> {
        if let Some(t) = self.tag_lists.lock().unwrap().get(repo) {
            if self.fresh(t) {
                return Ok(t.value.clone());
            }
        }
        let tags = Arc::new(
            self.reg
                .tags(repo)
                .await
                .map_err(|e| fs_err_ctx(e, &format!("listing tags of {repo}")))?,
        );
        self.tag_lists.lock().unwrap().insert(
            repo.to_string(),
            Timed {
                at: Instant::now(),
                value: tags.clone(),
            },
        );
        Ok(tags)
    }

    /// Is `path` a repository? Asks the registry (tags/list) when the catalog does not say.
    async fn is_repo(&self, path: &str) -> FsResult<bool> {
        if self.known_repos.lock().unwrap().contains(path) {
            return Ok(true);
        }
        if let Some(cat) = self.catalog().await? {
            if cat.iter().any(|r| r == path) {
                return Ok(true);
            }
            // A namespace the catalog knows is not also a repository (it would be listed):
            // no need to ask.
            let under = format!("{path}/");
            if cat.iter().any(|r| r.starts_with(&under)) {
                return Ok(false);
            }
        }
        match self.tag_list(path).await {
            Ok(_) => {
                self.known_repos.lock().unwrap().insert(path.to_string());
                Ok(true)
            }
            Err(e) if e.errno == libc::ENOENT => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// What a tag points at now (cached for the metadata TTL).
    async fn resolve_tag(&self, repo: &str, tag: &str) -> FsResult<ManifestHead> {
        let key = (repo.to_string(), tag.to_string());
        if let Some(t) = self.tag_targets.lock().unwrap().get(&key) {
            if self.fresh(t) {
                return Ok(t.value.clone());
            }
        }
        let head = self
            .reg
            .manifest_head(repo, tag)
            .await
            .map_err(|e| fs_err_ctx(e, &format!("{repo}:{tag}")))?;
        self.tag_targets.lock().unwrap().insert(
            key,
            Timed {
                at: Instant::now(),
                value: head.clone(),
            },
        );
        Ok(head)
    }

    /// A manifest by digest, parsed (cached forever: it is content addressed).
    async fn manifest(&self, repo: &str, digest: &str) -> FsResult<ManifestEntry> {
        if let Some(m) = self.manifests.lock().unwrap().get(digest) {
            return Ok(m.clone());
        }
        let ctx = format!("manifest {repo}@{digest}");
        let blob = self
            .reg
            .manifest(repo, digest)
            .await
            .map_err(|e| fs_err_ctx(e, &ctx))?;
        let parsed =
            manifest::parse(&blob.media_type, &blob.body).map_err(|e| fs_err_ctx(e, &ctx))?;
        let entry = ManifestEntry { blob, parsed };
        self.note_manifest(repo, &entry);
        self.manifests
            .lock()
            .unwrap()
            .put(digest.to_string(), entry.clone());
        Ok(entry)
    }

    /// Remember the digests a manifest mentions, for `blobs/sha256/`.
    fn note_manifest(&self, repo: &str, m: &ManifestEntry) {
        let mut seen = self.seen.lock().unwrap();
        let r = seen.entry(repo.to_string()).or_default();
        r.insert(
            digest_hex(&m.blob.digest).to_string(),
            FileNode {
                repo: repo.to_string(),
                content: Content::Manifest {
                    digest: m.blob.digest.clone(),
                },
                size: m.blob.body.len() as u64,
                media_type: Some(m.blob.media_type.clone()),
            },
        );
        let descs: Vec<&Descriptor> = match &m.parsed {
            Parsed::Image { config, layers } => std::iter::once(config).chain(layers).collect(),
            Parsed::Index { manifests } => manifests.iter().collect(),
        };
        for d in descs {
            if !d.digest.starts_with("sha256:") || !is_sha256_hex(digest_hex(&d.digest)) {
                continue;
            }
            let is_manifest = matches!(m.parsed, Parsed::Index { .. });
            r.entry(digest_hex(&d.digest).to_string())
                .or_insert_with(|| FileNode {
                    repo: repo.to_string(),
                    content: if is_manifest {
                        Content::Manifest {
                            digest: d.digest.clone(),
                        }
                    } else {
                        Content::Blob {
                            digest: d.digest.clone(),
                        }
                    },
                    size: d.size,
                    media_type: Some(d.media_type.clone()).filter(|m| !m.is_empty()),
                });
        }
    }

    /// The image manifest shown at the level of `digest`: itself, or for an index the entry for
    /// the configured platform (None if the index has no such entry).
    async fn image_view(
        &self,
        repo: &str,
        digest: &str,
    ) -> FsResult<Option<(String, Descriptor, Vec<Descriptor>)>> {
        let m = self.manifest(repo, digest).await?;
        match m.parsed {
            Parsed::Image { config, layers } => Ok(Some((digest.to_string(), config, layers))),
            Parsed::Index { manifests } => {
                let Some(d) = self.pick_platform(&manifests) else {
                    return Ok(None);
                };
                let child = self.manifest(repo, &d.digest).await?;
                match child.parsed {
                    Parsed::Image { config, layers } => {
                        Ok(Some((d.digest.clone(), config, layers)))
                    }
                    Parsed::Index { .. } => Ok(None),
                }
            }
        }
    }

    fn pick_platform<'a>(&self, manifests: &'a [Descriptor]) -> Option<&'a Descriptor> {
        let (os, arch, variant) = &self.opts.platform;
        let matching = manifests.iter().filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| &p.os == os && &p.architecture == arch)
        });
        let mut best = None;
        for d in matching {
            let v = d.platform.as_ref().and_then(|p| p.variant.clone());
            match variant {
                Some(want) if v.as_ref() == Some(want) => return Some(d),
                Some(_) => {}
                None => {}
            }
            if best.is_none() {
                best = Some(d);
            }
        }
        best
    }

    /// Platform directory names of an index, made unique.
    fn platform_dirs(manifests: &[Descriptor]) -> Vec<(String, &Descriptor)> {
        let mut out: Vec<(String, &Descriptor)> = Vec::new();
        let mut used = BTreeSet::new();
        for d in manifests {
            let base = d
                .platform
                .as_ref()
                .map(|p| p.dir_name())
                .filter(|n| n != "-")
                .unwrap_or_else(|| "unknown-unknown".to_string());
            let name = if used.contains(&base) {
                let hex = digest_hex(&d.digest);
                format!("{base}-{}", &hex[..hex.len().min(12)])
            } else {
                base
            };
            used.insert(name.clone());
            out.push((name, d));
        }
        out
    }

    /// The children of a directory node, as (name, node).
    async fn children(&self, node: &Node) -> FsResult<Vec<(String, Node)>> {
        let mut out = Vec::new();
        match node {
            Node::Root => {
                for c in self.nested_names("").await? {
                    out.push((c.clone(), Node::Dir { path: c }));
                }
            }
            Node::Dir { path } => {
                let nested = self.nested_names(path).await?;
                if self.is_repo(path).await? {
                    for (name, n) in self.repo_children(path) {
                        out.push((name, n));
                    }
                    if nested.iter().any(|c| RESERVED.contains(&c.as_str())) {
                        out.push((NS_ESCAPE.into(), Node::NsEscape { path: path.clone() }));
                    }
                    for c in nested {
                        if !RESERVED.contains(&c.as_str()) {
                            out.push((
                                c.clone(),
                                Node::Dir {
                                    path: format!("{path}/{c}"),
                                },
                            ));
                        }
                    }
                } else {
                    for c in nested {
                        out.push((
                            c.clone(),
                            Node::Dir {
                                path: format!("{path}/{c}"),
                            },
                        ));
                    }
                }
            }
            Node::NsEscape { path } => {
                for c in self.nested_names(path).await? {
                    out.push((
                        c.clone(),
                        Node::Dir {
                            path: format!("{path}/{c}"),
                        },
                    ));
                }
            }
            Node::Tags { repo } => {
                let tags = match self.tag_list(repo).await {
                    Ok(t) => t,
                    // A repository made by mkdir has no tags in the registry yet.
                    Err(e) if e.errno == libc::ENOENT && self.created_here(repo) => {
                        Arc::new(vec![])
                    }
                    Err(e) => return Err(e),
                };
                for t in tags.iter() {
                    if let Ok(n) = self.tag_node(repo, t).await {
                        out.push((t.clone(), n));
                    }
                }
                let pending: Vec<String> = self
                    .pending_tags
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(r, t)| r == repo && !tags.contains(t))
                    .map(|(_, t)| t.clone())
                    .collect();
                for t in pending {
                    out.push((
                        t.clone(),
                        Node::PendingTag {
                            repo: repo.clone(),
                            tag: t,
                        },
                    ));
                }
            }
            Node::PendingTag { repo, tag } => {
                // Once its manifest is pushed, a pending tag shows the image.
                if let Ok(Node::Image { digest, .. }) = self.tag_node(repo, tag).await {
                    out = self.image_children(repo, &digest).await?;
                }
            }
            Node::Image { repo, digest, .. } => {
                out = self.image_children(repo, digest).await?;
            }
            Node::Layers { repo, digest } => {
                let m = self.manifest(repo, digest).await?;
                if let Parsed::Image { layers, .. } = &m.parsed {
                    for (i, l) in layers.iter().enumerate() {
                        out.push((
                            manifest::layer_file_name(i, layers.len(), l),
                            Node::File(FileNode {
                                repo: repo.clone(),
                                content: Content::Blob {
                                    digest: l.digest.clone(),
                                },
                                size: l.size,
                                media_type: Some(l.media_type.clone()),
                            }),
                        ));
                        // The layer's own tree, beside its file (tar layers only).
                        if let Some(dir) = contents::layer_tree_name(i, layers.len(), l) {
                            out.push((dir, contents::layer_root(repo, l, digest, i)));
                        }
                    }
                }
            }
            Node::Blobs { repo } => {
                out.push(("sha256".into(), Node::BlobsAlgo { repo: repo.clone() }))
            }
            Node::BlobsAlgo { repo } => {
                if let Some(r) = self.seen.lock().unwrap().get(repo) {
                    for (hex, f) in r {
                        out.push((hex.clone(), Node::File(f.clone())));
                    }
                }
            }
            Node::Uploads { repo } => {
                let staged = self.staged.lock().unwrap();
                for k in staged.keys() {
                    if &k.repo == repo && k.area == Area::Uploads {
                        out.push((k.name.clone(), Node::Staged(k.clone())));
                    }
                }
                out.sort_by(|a, b| a.0.cmp(&b.0));
            }
            Node::TreeDir(d) => out = self.tree_children(d).await?,
            Node::File(_) | Node::IndexJson { .. } | Node::Staged(_) | Node::TreeEntry(_) => {
                return Err(FsError::not_dir("not a directory"))
            }
        }
        Ok(out)
    }

    /// The fixed children of a repository directory (index.json is made on lookup).
    fn repo_children(&self, repo: &str) -> Vec<(String, Node)> {
        let r = || repo.to_string();
        vec![
            ("index.json".into(), Node::IndexJson { repo: r() }),
            ("tags".into(), Node::Tags { repo: r() }),
            ("blobs".into(), Node::Blobs { repo: r() }),
            ("uploads".into(), Node::Uploads { repo: r() }),
            (
                "oci-layout".into(),
                Node::File(FileNode {
                    repo: r(),
                    content: Content::Inline(Bytes::from_static(OCI_LAYOUT)),
                    size: OCI_LAYOUT.len() as u64,
                    media_type: None,
                }),
            ),
        ]
    }

    /// The next path components below `prefix` ("" = the root) among known repositories.
    async fn nested_names(&self, prefix: &str) -> FsResult<Vec<String>> {
        let names = self.repo_names().await?;
        let mut out = BTreeSet::new();
        for n in &names {
            let rest = if prefix.is_empty() {
                Some(n.as_str())
            } else {
                n.strip_prefix(prefix).and_then(|r| r.strip_prefix('/'))
            };
            if let Some(rest) = rest {
                if let Some(first) = rest.split('/').next().filter(|f| !f.is_empty()) {
                    out.insert(first.to_string());
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    async fn tag_node(&self, repo: &str, tag: &str) -> FsResult<Node> {
        let head = self.resolve_tag(repo, tag).await?;
        Ok(Node::Image {
            repo: repo.to_string(),
            tag: Some(tag.to_string()),
            digest: head.digest,
        })
    }

    async fn image_children(&self, repo: &str, digest: &str) -> FsResult<Vec<(String, Node)>> {
        let m = self.manifest(repo, digest).await?;
        let mut out = vec![(
            "manifest.json".to_string(),
            Node::File(FileNode {
                repo: repo.to_string(),
                content: Content::Manifest {
                    digest: digest.to_string(),
                },
                size: m.blob.body.len() as u64,
                media_type: Some(m.blob.media_type.clone()),
            }),
        )];
        if let Parsed::Index { manifests } = &m.parsed {
            for (name, d) in Self::platform_dirs(manifests) {
                out.push((
                    name,
                    Node::Image {
                        repo: repo.to_string(),
                        tag: None,
                        digest: d.digest.clone(),
                    },
                ));
            }
        }
        if let Some((image_digest, config, _)) = self.image_view(repo, digest).await? {
            out.push((
                "config.json".into(),
                Node::File(FileNode {
                    repo: repo.to_string(),
                    content: Content::Blob {
                        digest: config.digest.clone(),
                    },
                    size: config.size,
                    media_type: Some(config.media_type.clone()),
                }),
            ));
            out.push((
                "layers".into(),
                Node::Layers {
                    repo: repo.to_string(),
                    digest: image_digest.clone(),
                },
            ));
            out.push((
                "rootfs".into(),
                Node::TreeDir(TreeDir {
                    repo: repo.to_string(),
                    view: View::Rootfs {
                        image: image_digest,
                    },
                    path: String::new(),
                    meta: None,
                }),
            ));
        }
        Ok(out)
    }

    /// A node as it is served: `IndexJson` becomes its `File`; everything else is itself.
    async fn materialize(&self, node: Node) -> FsResult<Node> {
        match node {
            Node::IndexJson { repo } => {
                let body = self.index_json(&repo).await?;
                Ok(Node::File(FileNode {
                    repo,
                    size: body.len() as u64,
                    content: Content::Inline(body),
                    media_type: Some(manifest::OCI_INDEX.into()),
                }))
            }
            n => Ok(n),
        }
    }

    /// `index.json` of a repository: every tag as a descriptor with its ref name.
    async fn index_json(&self, repo: &str) -> FsResult<Bytes> {
        let tags = self.tag_list(repo).await?;
        let mut manifests = Vec::new();
        for t in tags.iter() {
            match self.resolve_tag(repo, t).await {
                Ok(h) => manifests.push(serde_json::json!({
                    "mediaType": h.media_type,
                    "digest": h.digest,
                    "size": h.size,
                    "annotations": {"org.opencontainers.image.ref.name": t},
                })),
                // A tag deleted between the listing and the HEAD is simply left out.
                Err(e) if e.errno == libc::ENOENT => {}
                Err(e) => return Err(e),
            }
        }
        let doc = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_INDEX,
            "manifests": manifests,
        });
        Ok(Bytes::from(
            serde_json::to_vec_pretty(&doc).expect("json serializes"),
        ))
    }

    /// Find one child by name without listing the whole directory where that is cheaper.
    async fn find_child(&self, node: &Node, name: &str) -> FsResult<Option<Node>> {
        let ns_dir = |path: &str| {
            if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}/{name}")
            }
        };
        match node {
            Node::Root | Node::NsEscape { .. } | Node::Dir { .. } => {
                let path = match node {
                    Node::Root => "",
                    Node::Dir { path } | Node::NsEscape { path } => path.as_str(),
                    _ => unreachable!(),
                };
                if let Node::Dir { path } = node {
                    if self.is_repo(path).await? {
                        if let Some((_, n)) = self
                            .repo_children(path)
                            .into_iter()
                            .find(|(n, _)| n == name)
                        {
                            return Ok(Some(self.materialize(n).await?));
                        }
                        if name == NS_ESCAPE {
                            return Ok(Some(Node::NsEscape { path: path.clone() }));
                        }
                    }
                }
                if !is_valid_component(name) {
                    return Ok(None);
                }
                let candidate = ns_dir(path);
                let catalog = self.catalog().await?;
                let known = self.repo_names().await?;
                let under = format!("{candidate}/");
                if known
                    .iter()
                    .any(|r| r == &candidate || r.starts_with(&under))
                {
                    return Ok(Some(Node::Dir { path: candidate }));
                }
                if self.is_repo(&candidate).await? {
                    return Ok(Some(Node::Dir { path: candidate }));
                }
                // Without a catalog a namespace cannot be told from nothing: let the user walk it.
                if catalog.is_none() {
                    return Ok(Some(Node::Dir { path: candidate }));
                }
                Ok(None)
            }
            Node::Tags { repo } => {
                if !is_valid_tag(name) {
                    return Ok(None);
                }
                match self.tag_node(repo, name).await {
                    Ok(n) => Ok(Some(n)),
                    Err(e) if e.errno == libc::ENOENT => {
                        let key = (repo.clone(), name.to_string());
                        Ok(self.pending_tags.lock().unwrap().contains(&key).then(|| {
                            Node::PendingTag {
                                repo: repo.clone(),
                                tag: name.to_string(),
                            }
                        }))
                    }
                    Err(e) => Err(e),
                }
            }
            Node::Uploads { repo } => {
                let key = StagedKey {
                    repo: repo.clone(),
                    area: Area::Uploads,
                    name: name.to_string(),
                };
                Ok(self
                    .staged
                    .lock()
                    .unwrap()
                    .contains_key(&key)
                    .then_some(Node::Staged(key)))
            }
            Node::BlobsAlgo { repo } => {
                if !is_sha256_hex(name) {
                    return Ok(None);
                }
                let key = StagedKey {
                    repo: repo.clone(),
                    area: Area::Blobs,
                    name: name.to_string(),
                };
                if self
                    .staged
                    .lock()
                    .unwrap()
                    .get(&key)
                    .is_some_and(|i| i.digest.is_none())
                {
                    return Ok(Some(Node::Staged(key)));
                }
                if let Some(f) = self
                    .seen
                    .lock()
                    .unwrap()
                    .get(repo)
                    .and_then(|r| r.get(name))
                {
                    return Ok(Some(Node::File(f.clone())));
                }
                let digest = format!("sha256:{name}");
                let file = match self.reg.blob_size(repo, &digest).await {
                    Ok(size) => FileNode {
                        repo: repo.clone(),
                        content: Content::Blob { digest },
                        size,
                        media_type: None,
                    },
                    Err(RegistryError::NotFound(_)) => {
                        match self.reg.manifest_head(repo, &digest).await {
                            Ok(h) => FileNode {
                                repo: repo.clone(),
                                content: Content::Manifest { digest },
                                size: h.size,
                                media_type: Some(h.media_type),
                            },
                            Err(RegistryError::NotFound(_)) => return Ok(None),
                            Err(e) => return Err(fs_err_ctx(e, &format!("{repo}@{digest}"))),
                        }
                    }
                    Err(e) => return Err(fs_err_ctx(e, &format!("{repo}@{digest}"))),
                };
                self.seen
                    .lock()
                    .unwrap()
                    .entry(repo.clone())
                    .or_default()
                    .insert(name.to_string(), file.clone());
                Ok(Some(Node::File(file)))
            }
            _ => Ok(self
                .children(node)
                .await?
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, n)| n)),
        }
    }

    // ---------------------------------------------------------------- operations

    pub async fn lookup(&self, parent: u64, name: &str) -> FsResult<EntryOut> {
        let pnode = self.node(parent)?;
        if !pnode.is_dir() {
            return Err(FsError::not_dir(format!("lookup {name} in a file")));
        }
        let child = self
            .find_child(&pnode, name)
            .await?
            .ok_or_else(|| FsError::not_found(format!("{name}: no such entry")))?;
        let out = {
            let mut t = self.inodes.lock().unwrap();
            let ino = t.child(parent, name, child.clone(), true);
            self.entry_out(ino, &child)
        };
        Ok(out)
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.lock().unwrap().forget(ino, n);
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<EntryOut> {
        let node = self.node(ino)?;
        let node = self.materialize((*node).clone()).await?;
        Ok(self.entry_out(ino, &node))
    }

    /// The whole listing of a directory (without `.` and `..`).
    pub async fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let node = self.node(ino)?;
        let children = self.children(&node).await?;
        let mut t = self.inodes.lock().unwrap();
        Ok(children
            .into_iter()
            .map(|(name, n)| {
                let kind = self.attr_of(0, &n).kind;
                let ino = t.child(ino, &name, n, false);
                DirEntry { ino, name, kind }
            })
            .collect())
    }

    pub async fn open(&self, ino: u64, write: bool) -> FsResult<Opened> {
        let node = self.node(ino)?;
        if write {
            return self.open_write(ino, &node).await;
        }
        let node = match &*node {
            Node::IndexJson { .. } => Arc::new(self.materialize((*node).clone()).await?),
            Node::Staged(k) => Arc::new(Node::File(self.staged_file(k)?)),
            _ => node,
        };
        let (verifier, keep_cache) = match &*node {
            // Tree files are read through their layer; no whole-blob check per handle.
            Node::TreeEntry(_) => (None, false),
            Node::File(f) => {
                let verifier = match &f.content {
                    Content::Blob { digest }
                        if f.size > self.opts.chunk_size && digest.starts_with("sha256:") =>
                    {
                        Some(Verifier {
                            digest: digest.clone(),
                            size: f.size,
                            hasher: StreamingDigest::default(),
                            pending: BTreeMap::new(),
                            pending_bytes: 0,
                            done: false,
                            failed: None,
                        })
                    }
                    _ => None,
                };
                // The kernel keeps pages across opens only for content already verified
                // against its digest; unverified pages are dropped at the next open.
                let keep_cache = node.immutable()
                    && f.digest()
                        .is_some_and(|d| self.verified.lock().unwrap().contains(d));
                (verifier, keep_cache)
            }
            _ => return Err(FsError::is_dir("open of a directory for reading data")),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(
            fh,
            Arc::new(Mutex::new(Handle {
                node: node.clone(),
                verifier,
                last_end: 0,
            })),
        );
        Ok(Opened { fh, keep_cache })
    }

    /// Close a handle. A writing handle that was not flushed commits here; errors can only be
    /// logged at this point.
    pub async fn release(&self, fh: u64) {
        self.handles.lock().unwrap().remove(&fh);
        let writer = self.writers.lock().unwrap().remove(&fh);
        if let Some(w) = writer {
            if let Err(e) = self.commit(&w).await {
                log::log!(e.level, "release fh={fh}: {}", e.message);
            }
        }
    }

    /// A committed written file as a readable file.
    fn staged_file(&self, k: &StagedKey) -> FsResult<FileNode> {
        let info = self
            .staged
            .lock()
            .unwrap()
            .get(k)
            .cloned()
            .unwrap_or_default();
        let digest = info.digest.ok_or_else(|| {
            FsError::new(
                libc::EBUSY,
                log::Level::Debug,
                format!("{} is still being written", k.name),
            )
        })?;
        Ok(FileNode {
            repo: k.repo.clone(),
            content: match k.area {
                Area::Manifest { .. } => Content::Manifest { digest },
                _ => Content::Blob { digest },
            },
            size: info.size,
            media_type: info.media_type,
        })
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let handle = self
            .handles
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or_else(FsError::bad_handle)?;
        let (node, sequential) = {
            let mut h = handle.lock().unwrap();
            let seq = h.last_end == offset && offset > 0;
            h.last_end = offset + u64::from(size);
            (h.node.clone(), seq)
        };
        if let Node::TreeEntry(t) = &*node {
            return self.read_tree_entry(t, offset, size).await;
        }
        let Node::File(f) = &*node else {
            return Err(FsError::is_dir("read of a directory"));
        };
        if offset >= f.size || size == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + u64::from(size)).min(f.size);
        match &f.content {
            Content::Inline(b) => Ok(b.slice(offset as usize..end as usize)),
            Content::Manifest { digest } => {
                let m = self.manifest(&f.repo, digest).await?;
                let body = &m.blob.body;
                Ok(body.slice((offset as usize).min(body.len())..(end as usize).min(body.len())))
            }
            Content::Blob { digest } => {
                if let Some(actual) = handle
                    .lock()
                    .unwrap()
                    .verifier
                    .as_ref()
                    .and_then(|v| v.failed.clone())
                {
                    return Err(FsError::io(format!(
                        "{}@{digest}: content hashes to {actual}",
                        f.repo
                    )));
                }
                let data = self
                    .read_blob(&f.repo, digest, f.size, offset, end, sequential)
                    .await?;
                if f.size <= self.opts.chunk_size {
                    // One chunk: fetch_chunk verified it before caching.
                    self.verified.lock().unwrap().insert(digest.clone());
                    return Ok(data);
                }
                let mut h = handle.lock().unwrap();
                if let Some(v) = h.verifier.as_mut() {
                    match v.feed(offset, &data) {
                        Err(actual) => {
                            v.failed = Some(actual.clone());
                            drop(h);
                            self.cache.evict_digest(digest);
                            return Err(FsError::io(format!(
                                "{}@{digest}: content hashes to {actual}; cached chunks dropped",
                                f.repo
                            )));
                        }
                        Ok(true) => {
                            drop(h);
                            self.verified.lock().unwrap().insert(digest.clone());
                        }
                        Ok(false) => {}
                    }
                }
                Ok(data)
            }
        }
    }

    /// Bytes `offset..end` of a blob, through the chunk cache.
    async fn read_blob(
        &self,
        repo: &str,
        digest: &str,
        blob_size: u64,
        offset: u64,
        end: u64,
        sequential: bool,
    ) -> FsResult<Bytes> {
        let cs = self.opts.chunk_size;
        let first = offset / cs;
        let last = (end - 1) / cs;
        let key_digest: Arc<str> = Arc::from(digest);
        if sequential && self.opts.readahead_chunks > 0 && last >= 1 {
            let total = blob_size.div_ceil(cs);
            for idx in (last + 1)..(last + 1 + self.opts.readahead_chunks).min(total) {
                let key = (key_digest.clone(), idx);
                if self.cache.get(&key).is_some() {
                    continue;
                }
                let (reg, cache, repo, d, size) = (
                    self.reg.clone(),
                    self.cache.clone(),
                    repo.to_string(),
                    digest.to_string(),
                    blob_size,
                );
                tokio::spawn(async move {
                    let _ = cache
                        .get_or_fetch(key, || fetch_chunk(reg, repo, d, idx, cs, size))
                        .await;
                });
            }
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for idx in first..=last {
            let chunk = self
                .cache
                .get_or_fetch((key_digest.clone(), idx), || {
                    fetch_chunk(
                        self.reg.clone(),
                        repo.to_string(),
                        digest.to_string(),
                        idx,
                        cs,
                        blob_size,
                    )
                })
                .await
                .map_err(|e| fs_err_ctx(e, &format!("reading {}@{digest}", repo)))?;
            let cstart = idx * cs;
            let from = offset.max(cstart) - cstart;
            let to = end.min(cstart + chunk.len() as u64) - cstart;
            if idx == first && idx == last {
                return Ok(chunk.slice(from as usize..to as usize));
            }
            out.extend_from_slice(&chunk[from as usize..to as usize]);
        }
        Ok(out.freeze())
    }

    /// Extended attribute names of a node.
    pub async fn listxattr(&self, ino: u64) -> FsResult<Vec<String>> {
        let node = self.node(ino)?;
        Ok(match &*node {
            Node::Root => vec!["user.regfs.stats".into()],
            Node::Image { .. } => vec!["user.oci.digest".into()],
            Node::TreeEntry(t) => t
                .entry
                .xattrs
                .iter()
                .filter(|(k, _)| k.starts_with("user."))
                .map(|(k, _)| k.clone())
                .collect(),
            Node::Staged(k) => match self.staged.lock().unwrap().get(k) {
                Some(StagedInfo {
                    digest: Some(_), ..
                }) => vec!["user.oci.digest".into()],
                _ => vec![],
            },
            Node::File(f) if f.digest().is_some() => {
                let mut v = vec!["user.oci.digest".to_string()];
                if f.media_type.is_some() {
                    v.push("user.oci.mediatype".into());
                }
                v
            }
            _ => vec![],
        })
    }

    pub async fn getxattr(&self, ino: u64, name: &str) -> FsResult<Bytes> {
        let node = self.node(ino)?;
        let v = match (&*node, name) {
            (Node::Root, "user.regfs.stats") => {
                let mut v = serde_json::to_value(self.reg.stats().snapshot()).expect("json");
                v["cache_bytes"] = self.cache.used_bytes().into();
                v["cache_chunks"] = self.cache.len().into();
                v.to_string()
            }
            (Node::Image { digest, .. }, "user.oci.digest") => digest.clone(),
            (Node::TreeEntry(t), n) if n.starts_with("user.") => {
                return t
                    .entry
                    .xattrs
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| Bytes::from(v.clone()))
                    .ok_or_else(FsError::no_attr)
            }
            (Node::PendingTag { repo, tag }, "user.oci.digest") => {
                match self.resolve_tag(repo, tag).await {
                    Ok(h) => h.digest,
                    Err(_) => return Err(FsError::no_attr()),
                }
            }
            (Node::Staged(k), "user.oci.digest") => self
                .staged
                .lock()
                .unwrap()
                .get(k)
                .and_then(|i| i.digest.clone())
                .ok_or_else(FsError::no_attr)?,
            (Node::File(f), "user.oci.digest") => {
                f.digest().ok_or_else(FsError::no_attr)?.to_string()
            }
            (Node::File(f), "user.oci.mediatype") if f.digest().is_some() => {
                f.media_type.clone().ok_or_else(FsError::no_attr)?
            }
            _ => return Err(FsError::no_attr()),
        };
        Ok(Bytes::from(v))
    }
}

/// Fetch chunk `idx` of a blob with one closed Range request. A blob that fits in one chunk is
/// verified against its digest before it can be cached.
async fn fetch_chunk(
    reg: Arc<dyn Registry>,
    repo: String,
    digest: String,
    idx: u64,
    chunk_size: u64,
    blob_size: u64,
) -> RegistryResult<Bytes> {
    let start = idx * chunk_size;
    let end = (start + chunk_size).min(blob_size) - 1;
    let data = reg.blob_range(&repo, &digest, start, end).await?;
    if data.len() as u64 != end - start + 1 {
        return Err(RegistryError::Protocol(format!(
            "{repo}@{digest}: asked for bytes {start}-{end}, got {} bytes",
            data.len()
        )));
    }
    if start == 0 && end + 1 == blob_size && digest.starts_with("sha256:") {
        crate::digest::verify(&digest, &data)?;
    }
    Ok(data)
}
