//! The write side of the core: `mkdir` of repositories and tags, `create`/`write`/`flush` of
//! uploads, blobs and manifests, `setattr`, `rmdir` of tags and `unlink` of blobs. See
//! docs/SEMANTICS.md.
//!
//! A writing handle owns a [`Writer`] behind a tokio mutex (held across the upload's awaits, never
//! together with a std mutex).
//!
//! When an upload completes (the rule of docs/SEMANTICS.md, "When an upload completes", learned
//! from mountpoint-s3): a `flush` commits only when it comes from the process that opened the
//! handle *and* at least one byte has been written; any other flush (the shell's close after
//! `dup2`, a forked child's exit, a close before any write) is deferred. `release` commits what is
//! still uncommitted. Commit happens once. Any failed write poisons the handle: the session is
//! cancelled, the entry disappears, and every later write, flush and release fails or does
//! nothing.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::handles::Handle;
use super::meta::Event;
use super::node::FileNode;
use super::node::{Area, Node, StagedKey};
use super::staging::{Settled, UnlinkRefused, WriteState};
use super::types::{Attr, EntryOut, Fh, Ino, Kind, Opened};
use super::{Fs, RESERVED};
use crate::digest::{is_sha256_hex, Digest};
use crate::error::{FsError, FsResult, RegistryError};
use crate::manifest::{parse, Parsed, DOCKER_MANIFEST, OCI_MANIFEST};
use crate::push::{BlobUpload, ManifestWrite};
use crate::registry::{is_valid_component, is_valid_repo_name, is_valid_tag};

/// What a writing handle is doing.
pub(crate) enum WriteKind {
    Blob(Box<BlobUpload>),
    Manifest(ManifestWrite),
}

pub(crate) struct Writer {
    kind: WriteKind,
    key: StagedKey,
    /// Thread-group id of the process that opened the handle (told by the adapter); None when
    /// unknown, and then every flush counts as the opener's.
    opener: Option<u32>,
    /// The commit's outcome, once committed.
    result: Option<FsResult<String>>,
    /// The first failed write (or a write after the commit): nothing more is accepted.
    poisoned: Option<FsError>,
}

impl Writer {
    /// Bytes accepted so far.
    fn written(&self) -> u64 {
        match &self.kind {
            WriteKind::Blob(up) => up.written(),
            WriteKind::Manifest(m) => m.buf.len() as u64,
        }
    }

    /// The error every call returns once the handle is poisoned.
    fn poison_error(&self) -> Option<FsError> {
        self.poisoned.as_ref().map(|e| {
            FsError::io(format!(
                "{}: an earlier write failed, nothing is pushed ({})",
                self.key.name, e.message
            ))
        })
    }
}

/// How long a reader waits for a commit under way (`open` of a file whose writer is closing). A
/// commit is bounded by the registry client: the PATCH in flight and the closing PUT each retry
/// within `--retry-budget` (default 30 s), then ask the upload status (one GET, at most
/// `--request-timeout`, 60 s) and make one last try of at most 60 s plus its bytes at 64 KiB/s
/// (`MIN_TRANSFER_RATE`: 188 s for an 8 MiB chunk); a failed commit adds the cancelling DELETE
/// (60 s). With the defaults a blob's commit ends within about 10.3 minutes; a manifest's
/// (mounts per missing blob, an index's children, then the PUT) has no such sum and may take
/// longer. Past 12 minutes the open is EBUSY (the commit goes on).
pub const COMMIT_WAIT: Duration = Duration::from_secs(720);

/// How long a reader waits for the `release` of a file that every writer has flushed but nobody
/// is committing yet. The kernel queues RELEASE before close() returns, but another process's
/// OPEN can overtake it (several FUSE threads; background requests queue behind readahead); it
/// arrives within milliseconds. 5 s covers a loaded machine; a writer that keeps its descriptor
/// open longer gets the reader EBUSY after that.
pub const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// `rmdir tags/<tag>` could not prove the tag is alone: refuse with EIO, never delete.
fn refuse_delete(repo: &str, tag: &str, why: &str) -> FsError {
    FsError::io(format!(
        "not deleting tag {repo}:{tag}: cannot tell whether another tag shares its manifest ({why})"
    ))
}

/// Does a flush from `closer` come from the process that opened the handle? Unknown on either
/// side counts as yes (the core's own callers and tests flush as the opener).
fn from_opener(opener: Option<u32>, closer: Option<u32>) -> bool {
    match (opener, closer) {
        (Some(o), Some(c)) => o == c,
        _ => true,
    }
}

impl Fs {
    /// Can something be written at this inode (for `access(W_OK)`)?
    pub fn writable(&self, ino: Ino) -> bool {
        let Ok(node) = self.inodes.node(ino) else {
            return false;
        };
        match &*node {
            n if n.accepts_entries() => true,
            Node::Staged(_) => true,
            Node::File(_) => self.manifest_target(ino).is_some() || self.blob_target(ino).is_some(),
            _ => false,
        }
    }

    /// A file that can be written (a tag's `manifest.json`, `blobs/sha256/<hex>`) shows the
    /// owner's write bit, so `default_permissions` (implied by `allow_other`) lets the mount's
    /// owner write it and nobody else.
    pub(super) fn owner_write(&self, a: &mut Attr) {
        if a.kind == Kind::File
            && a.perm & 0o200 == 0
            && (self.manifest_target(a.ino).is_some() || self.blob_target(a.ino).is_some())
        {
            a.perm |= 0o200;
        }
    }

    /// If `ino` is `tags/<tag>/manifest.json`, the (repo, tag) it belongs to.
    fn manifest_target(&self, ino: Ino) -> Option<(String, String)> {
        let (parent, name) = self.inodes.parent_of(ino)?;
        if name != "manifest.json" {
            return None;
        }
        match &*self.inodes.node(parent).ok()? {
            Node::Image {
                repo,
                tag: Some(tag),
                ..
            }
            | Node::PendingTag { repo, tag } => Some((repo.clone(), tag.clone())),
            _ => None,
        }
    }

    /// If `ino` is `blobs/sha256/<hex>`, its staged key.
    fn blob_target(&self, ino: Ino) -> Option<StagedKey> {
        let (parent, name) = self.inodes.parent_of(ino)?;
        match &*self.inodes.node(parent).ok()? {
            Node::BlobsAlgo { repo } if is_sha256_hex(&name) => Some(StagedKey {
                repo: repo.clone(),
                area: Area::Blobs,
                name,
            }),
            _ => None,
        }
    }

    pub async fn mkdir(&self, parent: Ino, name: &str) -> FsResult<EntryOut> {
        let pnode = self.inodes.node(parent)?;
        let node = match &*pnode {
            Node::Root | Node::Dir { .. } | Node::NsEscape { .. } => {
                self.mkdir_repo(&pnode, name).await?
            }
            Node::Tags { repo } => {
                if !is_valid_tag(name) {
                    return Err(FsError::invalid(format!(
                        "{name:?} is not a valid tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})"
                    )));
                }
                if self.find_child(&pnode, name).await?.is_some() {
                    return Err(FsError::exists(format!("tag {name} exists")));
                }
                self.staging.add_pending_tag(repo, name);
                Node::PendingTag {
                    repo: repo.clone(),
                    tag: name.to_string(),
                }
            }
            _ => return Err(FsError::read_only(format!("mkdir {name}: not here"))),
        };
        Ok(self.entry_for(parent, name, node))
    }

    async fn mkdir_repo(&self, pnode: &Node, name: &str) -> FsResult<Node> {
        if let Node::Dir { path } = pnode {
            if RESERVED.contains(&name) && self.meta.is_repo(path).await? {
                return Err(FsError::exists(format!("{name} is reserved")));
            }
        }
        if !is_valid_component(name) {
            return Err(FsError::invalid(format!(
                "{name:?} is not a valid repository name component ([a-z0-9] with . _ __ - separators)"
            )));
        }
        let path = match pnode {
            Node::Dir { path } | Node::NsEscape { path } => format!("{path}/{name}"),
            _ => name.to_string(),
        };
        if !is_valid_repo_name(&path) {
            return Err(FsError::invalid(format!(
                "{path:?} is not a valid repository name"
            )));
        }
        // A known repository or namespace exists already. (Without a catalog any name can
        // be walked as a namespace, so there only a repository counts.)
        let exists = if self.meta.catalog().await?.is_some() {
            self.find_child(pnode, name).await?.is_some()
        } else {
            self.meta.is_repo(&path).await?
        };
        if exists {
            return Err(FsError::exists(format!("{path} exists")));
        }
        self.meta.apply(Event::RepoCreated { repo: path.clone() });
        log::info!(
            "mkdir {path}: a new repository (it exists in the registry from its first push)"
        );
        Ok(Node::Dir { path })
    }

    pub async fn create(&self, parent: Ino, name: &str) -> FsResult<(EntryOut, Opened)> {
        let pnode = self.inodes.node(parent)?;
        let key = match &*pnode {
            Node::Uploads { repo } => StagedKey {
                repo: repo.clone(),
                area: Area::Uploads,
                name: name.to_string(),
            },
            Node::BlobsAlgo { repo } => {
                if !is_sha256_hex(name) {
                    return Err(FsError::invalid(format!(
                        "blobs/sha256/{name}: a blob's name is its sha256 (64 lowercase hex digits)"
                    )));
                }
                StagedKey {
                    repo: repo.clone(),
                    area: Area::Blobs,
                    name: name.to_string(),
                }
            }
            Node::Image {
                repo,
                tag: Some(tag),
                ..
            }
            | Node::PendingTag { repo, tag }
                if name == "manifest.json" =>
            {
                StagedKey {
                    repo: repo.clone(),
                    area: Area::Manifest { tag: tag.clone() },
                    name: name.to_string(),
                }
            }
            _ => return Err(FsError::read_only(format!("create {name}: not here"))),
        };
        let opened = self.start_writer(key.clone()).await?;
        Ok((self.entry_for(parent, name, Node::Staged(key)), opened))
    }

    /// Open an existing file for writing.
    pub(super) async fn open_write(&self, ino: Ino, node: &Node) -> FsResult<Opened> {
        let key = match node {
            Node::Staged(k) => k.clone(),
            Node::File(_) => match (self.manifest_target(ino), self.blob_target(ino)) {
                (Some((repo, tag)), _) => StagedKey {
                    repo,
                    area: Area::Manifest { tag },
                    name: "manifest.json".into(),
                },
                // Writing an existing blob: checked against its name, nothing sent.
                (None, Some(key)) => key,
                (None, None) => return Err(FsError::read_only("this file is read-only")),
            },
            n if n.is_dir() => return Err(FsError::is_dir("cannot write a directory")),
            _ => return Err(FsError::read_only("this file is read-only")),
        };
        self.start_writer(key).await
    }

    async fn start_writer(&self, key: StagedKey) -> FsResult<Opened> {
        let kind = match &key.area {
            Area::Uploads => WriteKind::Blob(Box::new(BlobUpload::new(
                self.reg.clone(),
                &key.repo,
                self.opts.upload_chunk_size,
                None,
                false,
            ))),
            Area::Blobs => {
                let digest = format!("sha256:{}", key.name);
                // Already there: check what is written against the name, send nothing.
                let exists = self.reg.blob_size(&key.repo, &digest).await.is_ok();
                WriteKind::Blob(Box::new(BlobUpload::new(
                    self.reg.clone(),
                    &key.repo,
                    self.opts.upload_chunk_size,
                    Some(digest),
                    exists,
                )))
            }
            Area::Manifest { tag } => WriteKind::Manifest(ManifestWrite {
                repo: key.repo.clone(),
                tag: tag.clone(),
                buf: Vec::new(),
            }),
        };
        self.staging.start(key.clone());
        let fh = self
            .handles
            .insert(Handle::Write(Arc::new(tokio::sync::Mutex::new(Writer {
                kind,
                key,
                opener: None,
                result: None,
                poisoned: None,
            }))));
        Ok(Opened {
            fh,
            keep_cache: false,
            direct_io: false,
            backing: None,
        })
    }

    /// A written file opened for reading: once its commit is done. A reader that comes while the
    /// commit is under way (or while the last writer is closing) waits for it, at most
    /// [`COMMIT_WAIT`] (and [`RELEASE_WAIT`] for a release to begin); a failed commit is EIO; a file
    /// still being written is EBUSY at once.
    pub(super) async fn committed_file(&self, k: &StagedKey) -> FsResult<FileNode> {
        match self.staging.settle(k, COMMIT_WAIT, RELEASE_WAIT).await {
            Settled::Committed => self.staged_file(k),
            Settled::Gone { waited: true } => Err(FsError::io(format!(
                "{}: its push failed while this open waited for it; nothing was committed",
                k.name
            ))),
            Settled::Gone { waited: false } => Err(FsError::not_found(format!(
                "{} is not listed any more",
                k.name
            ))),
            Settled::Busy(state) => Err(FsError::busy(
                log::Level::Debug,
                match state {
                    WriteState::Committing => format!(
                        "{}: its commit is still under way after {} s",
                        k.name,
                        COMMIT_WAIT.as_secs()
                    ),
                    _ => format!("{} is still being written", k.name),
                },
            )),
        }
    }

    /// Is `fh` a writing handle?
    pub fn is_writer(&self, fh: Fh) -> bool {
        self.handles.writer(fh).is_some()
    }

    /// Record the thread-group id of the process that opened `fh` (the adapter calls this before
    /// it answers the open, so no flush can come first).
    pub async fn set_opener(&self, fh: Fh, tgid: u32) {
        if let Some(w) = self.handles.writer(fh) {
            w.lock().await.opener = Some(tgid);
        }
    }

    pub async fn write(&self, fh: Fh, offset: u64, data: &[u8]) -> FsResult<u32> {
        let w = self.handles.writer(fh).ok_or_else(FsError::bad_handle)?;
        let mut w = w.lock().await;
        if let Some(e) = w.poison_error() {
            return Err(e);
        }
        if w.result.is_some() {
            // What was committed stays; this handle accepts nothing more.
            let e = FsError::io(format!(
                "{}: written after its upload completed (the writer's own close committed it)",
                w.key.name
            ));
            w.poisoned = Some(e.clone());
            return Err(e);
        }
        let r = match &mut w.kind {
            WriteKind::Blob(up) => up.write(offset, data).await.map_err(FsError::from),
            WriteKind::Manifest(m) => m.write(offset, data).map_err(FsError::from),
        };
        match r {
            Ok(n) => {
                let size = w.written();
                self.staging.set_size(&w.key, size);
                Ok(n)
            }
            Err(e) => {
                self.poison(&mut w, &e).await;
                Err(e)
            }
        }
    }

    /// A write failed: cancel the session, drop the entry, refuse everything from now on.
    async fn poison(&self, w: &mut Writer, e: &FsError) {
        if let WriteKind::Blob(up) = &mut w.kind {
            up.abort().await;
        }
        if let WriteKind::Manifest(m) = &mut w.kind {
            m.buf = Vec::new();
        }
        self.staging.remove(&w.key);
        log::error!(
            "write of {}/{:?}/{} failed, nothing will be pushed: {}",
            w.key.repo,
            w.key.area,
            w.key.name,
            e.message
        );
        w.poisoned = Some(e.clone());
    }

    /// `fsync`: chunks written so far are sent and acknowledged.
    pub async fn fsync(&self, fh: Fh) -> FsResult<()> {
        let Some(w) = self.handles.writer(fh) else {
            return Ok(());
        };
        let mut w = w.lock().await;
        if let Some(e) = w.poison_error() {
            return Err(e);
        }
        if w.result.is_some() {
            return Ok(());
        }
        match &mut w.kind {
            WriteKind::Blob(up) => match up.sync().await.map_err(FsError::from) {
                Ok(()) => Ok(()),
                Err(e) => {
                    self.poison(&mut w, &e).await;
                    Err(e)
                }
            },
            WriteKind::Manifest(_) => Ok(()),
        }
    }

    /// `flush` from the process that opened the handle: see [`Fs::flush_by`].
    pub async fn flush(&self, fh: Fh) -> FsResult<()> {
        self.flush_by(fh, None).await
    }

    /// `flush` (every `close()` of a descriptor), from the process with thread-group id `closer`
    /// (None: the opener). Commits when the closer opened the handle and something was written;
    /// otherwise the commit waits for a later flush or for `release`.
    pub async fn flush_by(&self, fh: Fh, closer: Option<u32>) -> FsResult<()> {
        let Some(w) = self.handles.writer(fh) else {
            return Ok(());
        };
        {
            let w = w.lock().await;
            if let Some(e) = w.poison_error() {
                return Err(e);
            }
            if let Some(r) = &w.result {
                return r.clone().map(|_| ());
            }
            if !from_opener(w.opener, closer) || w.written() == 0 {
                // Nothing more may come: a reader that opens it now waits for the commit.
                self.staging.set_state(&w.key, WriteState::Flushed);
                log::debug!(
                    "flush of {} by {closer:?} (opened by {:?}, {} bytes): commit deferred",
                    w.key.name,
                    w.opener,
                    w.written()
                );
                return Ok(());
            }
        }
        self.commit(&w).await
    }

    /// `release`: commit whatever was not committed (an empty file, or one whose opener never
    /// flushed after writing). Nobody hears the result but the log.
    pub(super) async fn release_writer(&self, fh: Fh, w: &tokio::sync::Mutex<Writer>) {
        let mut w = w.lock().await;
        if let Some(e) = w.poison_error() {
            log::debug!("release fh={}: {}", fh.0, e.message);
            return;
        }
        if let Err(e) = self.commit_locked(&mut w).await {
            log::log!(e.level, "release fh={}: {}", fh.0, e.message);
        }
    }

    /// Commit once; later calls return the first outcome.
    pub(super) async fn commit(&self, w: &tokio::sync::Mutex<Writer>) -> FsResult<()> {
        self.commit_locked(&mut *w.lock().await).await
    }

    async fn commit_locked(&self, w: &mut Writer) -> FsResult<()> {
        if let Some(e) = w.poison_error() {
            return Err(e);
        }
        if let Some(r) = &w.result {
            return r.clone().map(|_| ());
        }
        let key = w.key.clone();
        // A reader that opens the file from now on waits for the outcome.
        self.staging.set_state(&key, WriteState::Committing);
        let result = match &mut w.kind {
            WriteKind::Blob(up) => {
                let size = up.written();
                let r = up.finish().await.map_err(FsError::from);
                if let Ok(digest) = &r {
                    let digest = Digest::from(digest);
                    self.staging.committed(&key, digest.clone(), size);
                    self.meta.apply(Event::BlobCommitted {
                        repo: key.repo.clone(),
                        digest: digest.clone(),
                        size,
                    });
                    log::info!("pushed {}@{digest} ({size} bytes)", key.repo);
                }
                r
            }
            WriteKind::Manifest(m) => {
                let body = Bytes::from(std::mem::take(&mut m.buf));
                let size = body.len() as u64;
                let r = self
                    .push_manifest(&m.repo, &m.tag, body)
                    .await
                    .map_err(FsError::into_io);
                if let Ok(digest) = &r {
                    self.staging.committed(&key, Digest::from(digest), size);
                }
                r
            }
        };
        if let Err(e) = &result {
            // Nothing that claims to be complete stays behind.
            self.staging.remove(&key);
            log::error!(
                "push of {}/{:?}/{} failed: {}",
                key.repo,
                key.area,
                key.name,
                e.message
            );
        }
        w.result = Some(result.clone());
        result.map(|_| ())
    }

    /// `setattr`: only what `cp` needs on a file being written (truncate to 0, times, mode).
    pub async fn setattr(&self, ino: Ino, fh: Option<Fh>, size: Option<u64>) -> FsResult<EntryOut> {
        let node = self.inodes.node(ino)?;
        let writing = fh.is_some_and(|f| self.is_writer(f));
        let ok = writing
            || matches!(&*node, Node::Staged(_))
            || self.manifest_target(ino).is_some()
            || self.blob_target(ino).is_some();
        if !ok {
            return Err(FsError::read_only("setattr: read-only"));
        }
        match size {
            None | Some(0) => {}
            Some(n) => {
                return Err(FsError::invalid(format!(
                    "truncate to {n}: a file being pushed can only be written from the start"
                )))
            }
        }
        self.getattr(ino).await
    }

    /// `rmdir tags/<tag>`: delete a tag, never anything else.
    pub async fn rmdir(&self, parent: Ino, name: &str) -> FsResult<()> {
        let pnode = self.inodes.node(parent)?;
        let Node::Tags { repo } = &*pnode else {
            return Err(FsError::read_only(format!(
                "rmdir {name}: only tags can be removed"
            )));
        };
        let head = match self.reg.manifest_head(repo, name).await {
            Ok(h) => h,
            Err(RegistryError::NotFound(_)) => {
                return if self.staging.remove_pending_tag(repo, name) {
                    Ok(())
                } else {
                    Err(FsError::not_found(format!("tag {name}")))
                };
            }
            Err(e) => return Err(refuse_delete(repo, name, &format!("HEAD {name}: {e}"))),
        };
        // distribution deletes manifests, and with one every tag pointing at it (and an index
        // that is still tagged breaks when a child goes): refuse unless proven alone.
        let (sharing, indexes) = self.sharers(repo, name, &head.digest).await?;
        if !sharing.is_empty() || !indexes.is_empty() {
            let mut why = Vec::new();
            if !sharing.is_empty() {
                why.push(format!(
                    "tag(s) {} point to the same manifest",
                    sharing.join(", ")
                ));
            }
            if !indexes.is_empty() {
                why.push(format!(
                    "tag(s) {} point to an index that lists it",
                    indexes.join(", ")
                ));
            }
            return Err(FsError::busy(
                log::Level::Warn,
                format!(
                    "not deleting tag {repo}:{name} (manifest {}): {}, and the registry can only \
                     delete a manifest together with all its tags",
                    head.digest,
                    why.join("; ")
                ),
            ));
        }
        self.reg
            .delete_manifest(repo, &head.digest)
            .await
            .map_err(|e| FsError::from_delete(e, format!("{repo}:{name}")))?;
        self.meta.apply(Event::TagDeleted {
            repo: repo.clone(),
            tag: name.to_string(),
        });
        self.staging.remove_pending_tag(repo, name);
        log::info!("deleted tag {repo}:{name} ({})", head.digest);
        Ok(())
    }

    /// The other tags of `repo` pointing at `digest`, and those pointing at an index that lists
    /// it. Any failure to find out (tag list, a HEAD, an index GET) refuses the delete: EIO.
    async fn sharers(
        &self,
        repo: &str,
        name: &str,
        digest: &str,
    ) -> FsResult<(Vec<String>, Vec<String>)> {
        let tags = self
            .reg
            .tags(repo)
            .await
            .map_err(|e| refuse_delete(repo, name, &format!("listing the tags: {e}")))?;
        let (mut sharing, mut indexes) = (Vec::new(), Vec::new());
        for t in tags.iter().filter(|t| t.as_str() != name) {
            let h = match self.reg.manifest_head(repo, t).await {
                Ok(h) => h,
                // Gone since the listing: it shares nothing.
                Err(RegistryError::NotFound(_)) => continue,
                Err(e) => return Err(refuse_delete(repo, name, &format!("HEAD {t}: {e}"))),
            };
            if h.digest == digest {
                sharing.push(t.clone());
                continue;
            }
            if matches!(h.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST) {
                continue;
            }
            // An index (or a type the HEAD did not tell): read it and look for the digest.
            let children = self
                .reg
                .manifest(repo, &h.digest)
                .await
                .and_then(|m| parse(&m.media_type, &m.body))
                .map_err(|e| refuse_delete(repo, name, &format!("reading {t}: {e}")))?;
            if let Parsed::Index { manifests } = children {
                if manifests.iter().any(|d| d.digest == digest) {
                    indexes.push(t.clone());
                }
            }
        }
        Ok((sharing, indexes))
    }

    /// `unlink`: a blob by digest (where the registry allows it), or an `uploads/` entry (the
    /// listing only; the blob stays).
    pub async fn unlink(&self, parent: Ino, name: &str) -> FsResult<()> {
        let pnode = self.inodes.node(parent)?;
        match &*pnode {
            Node::BlobsAlgo { repo } if is_sha256_hex(name) => {
                let digest = Digest::from(format!("sha256:{name}"));
                self.reg
                    .delete_blob(repo, &digest)
                    .await
                    .map_err(|e| FsError::from_delete(e, format!("{repo}@{digest}")))?;
                self.meta.apply(Event::BlobDeleted {
                    repo: repo.clone(),
                    digest: digest.clone(),
                });
                self.blobs.evict(&digest);
                Ok(())
            }
            Node::Uploads { repo } => {
                let key = StagedKey {
                    repo: repo.clone(),
                    area: Area::Uploads,
                    name: name.to_string(),
                };
                match self.staging.unlink_upload(&key) {
                    Ok(()) => Ok(()),
                    Err(UnlinkRefused::BeingWritten) => Err(FsError::busy(
                        log::Level::Debug,
                        format!("{name} is being written"),
                    )),
                    Err(UnlinkRefused::Missing) => Err(FsError::not_found(name.to_string())),
                }
            }
            _ => Err(FsError::read_only(format!("unlink {name}: read-only"))),
        }
    }
}
