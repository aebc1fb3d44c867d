//! The write side of the core: `mkdir` of repositories and tags, `create`/`write`/`flush` of
//! uploads, blobs and manifests, `rmdir` of tags and `unlink` of blobs. See docs/SEMANTICS.md.
//!
//! A writing handle owns a [`Writer`] behind a tokio mutex (held across the upload's awaits, never
//! together with a std mutex). The commit happens at the first `flush` (so `close()` reports the
//! registry's verdict) or at `release`, once.

use std::sync::Arc;

use bytes::Bytes;

use super::{Area, EntryOut, Fs, Node, Opened, StagedInfo, StagedKey};
use crate::digest::{digest_hex, is_sha256_hex};
use crate::error::{FsError, FsResult, RegistryError};
use crate::fs::{Content, FileNode, ManifestEntry};
use crate::manifest::{self, Parsed};
use crate::push::{manifest_content_type, BlobUpload, ManifestWrite};
use crate::registry::{is_valid_component, is_valid_tag, ManifestHead};

/// How deep an index of indexes is followed when its children are copied.
const MAX_INDEX_DEPTH: usize = 4;
/// How many repositories are asked to lend a missing blob by cross-repository mount.
const MAX_MOUNT_SOURCES: usize = 20;

/// What a writing handle is doing.
pub(crate) enum WriteKind {
    Blob(Box<BlobUpload>),
    Manifest(ManifestWrite),
}

pub(crate) struct Writer {
    kind: WriteKind,
    key: StagedKey,
    /// The commit's outcome, once committed.
    result: Option<FsResult<String>>,
}

fn to_io(e: FsError) -> FsError {
    if e.errno == libc::EIO {
        e
    } else {
        FsError::io(e.message)
    }
}

impl Fs {
    /// The (parent, name) an inode was looked up under.
    fn parent_of(&self, ino: u64) -> Option<(u64, String)> {
        self.inodes
            .lock()
            .unwrap()
            .nodes
            .get(&ino)
            .and_then(|e| e.key.clone())
    }

    /// A repository made here (by mkdir or a push) that the registry may not list yet.
    pub(crate) fn created_here(&self, repo: &str) -> bool {
        self.known_repos.lock().unwrap().contains(repo)
    }

    /// Can something be written at this inode (for `access(W_OK)`)?
    pub fn writable(&self, ino: u64) -> bool {
        let Ok(node) = self.node(ino) else {
            return false;
        };
        match &*node {
            n if n.accepts_entries() => true,
            Node::Staged(_) => true,
            Node::File(_) => self.manifest_target(ino).is_some() || self.blob_target(ino).is_some(),
            _ => false,
        }
    }

    /// If `ino` is `tags/<tag>/manifest.json`, the (repo, tag) it belongs to.
    fn manifest_target(&self, ino: u64) -> Option<(String, String)> {
        let (parent, name) = self.parent_of(ino)?;
        if name != "manifest.json" {
            return None;
        }
        match &*self.node(parent).ok()? {
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
    fn blob_target(&self, ino: u64) -> Option<StagedKey> {
        let (parent, name) = self.parent_of(ino)?;
        match &*self.node(parent).ok()? {
            Node::BlobsAlgo { repo } if is_sha256_hex(&name) => Some(StagedKey {
                repo: repo.clone(),
                area: Area::Blobs,
                name,
            }),
            _ => None,
        }
    }

    pub async fn mkdir(&self, parent: u64, name: &str) -> FsResult<EntryOut> {
        let pnode = self.node(parent)?;
        let node = match &*pnode {
            Node::Root | Node::Dir { .. } | Node::NsEscape { .. } => {
                if let Node::Dir { path } = &*pnode {
                    if super::RESERVED.contains(&name) && self.is_repo(path).await? {
                        return Err(FsError::new(
                            libc::EEXIST,
                            log::Level::Debug,
                            format!("{name} is reserved"),
                        ));
                    }
                }
                if !is_valid_component(name) {
                    return Err(FsError::invalid(format!(
                        "{name:?} is not a valid repository name component ([a-z0-9] with . _ __ - separators)"
                    )));
                }
                let path = match &*pnode {
                    Node::Root => name.to_string(),
                    Node::Dir { path } | Node::NsEscape { path } => format!("{path}/{name}"),
                    _ => unreachable!(),
                };
                if !crate::registry::is_valid_repo_name(&path) {
                    return Err(FsError::invalid(format!(
                        "{path:?} is not a valid repository name"
                    )));
                }
                // A known repository or namespace exists already. (Without a catalog any name can
                // be walked as a namespace, so there only a repository counts.)
                let exists = if self.catalog().await?.is_some() {
                    self.find_child(&pnode, name).await?.is_some()
                } else {
                    self.is_repo(&path).await?
                };
                if exists {
                    return Err(FsError::new(
                        libc::EEXIST,
                        log::Level::Debug,
                        format!("{path} exists"),
                    ));
                }
                self.known_repos.lock().unwrap().insert(path.clone());
                log::info!("mkdir {path}: a new repository (it exists in the registry from its first push)");
                Node::Dir { path }
            }
            Node::Tags { repo } => {
                if !is_valid_tag(name) {
                    return Err(FsError::invalid(format!(
                        "{name:?} is not a valid tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})"
                    )));
                }
                if self.find_child(&pnode, name).await?.is_some() {
                    return Err(FsError::new(
                        libc::EEXIST,
                        log::Level::Debug,
                        format!("tag {name} exists"),
                    ));
                }
                self.pending_tags
                    .lock()
                    .unwrap()
                    .insert((repo.clone(), name.to_string()));
                Node::PendingTag {
                    repo: repo.clone(),
                    tag: name.to_string(),
                }
            }
            _ => return Err(FsError::read_only(format!("mkdir {name}: not here"))),
        };
        let mut t = self.inodes.lock().unwrap();
        let ino = t.child(parent, name, node.clone(), true);
        Ok(self.entry_out(ino, &node))
    }

    pub async fn create(&self, parent: u64, name: &str) -> FsResult<(EntryOut, Opened)> {
        let pnode = self.node(parent)?;
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
        let node = Node::Staged(key.clone());
        let opened = self.start_writer(key).await?;
        let out = {
            let mut t = self.inodes.lock().unwrap();
            let ino = t.child(parent, name, node.clone(), true);
            self.entry_out(ino, &node)
        };
        Ok((out, opened))
    }

    /// Open an existing file for writing.
    pub(super) async fn open_write(&self, ino: u64, node: &Node) -> FsResult<Opened> {
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
        self.staged
            .lock()
            .unwrap()
            .insert(key.clone(), StagedInfo::default());
        let fh = self
            .next_fh
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.writers.lock().unwrap().insert(
            fh,
            Arc::new(tokio::sync::Mutex::new(Writer {
                kind,
                key,
                result: None,
            })),
        );
        Ok(Opened {
            fh,
            keep_cache: false,
        })
    }

    fn writer(&self, fh: u64) -> Option<Arc<tokio::sync::Mutex<Writer>>> {
        self.writers.lock().unwrap().get(&fh).cloned()
    }

    /// Is `fh` a writing handle?
    pub fn is_writer(&self, fh: u64) -> bool {
        self.writers.lock().unwrap().contains_key(&fh)
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let w = self.writer(fh).ok_or_else(FsError::bad_handle)?;
        let mut w = w.lock().await;
        if w.result.is_some() {
            return Err(FsError::invalid("this handle has already been committed"));
        }
        let (n, size) = match &mut w.kind {
            WriteKind::Blob(up) => {
                let n = up.write(offset, data).await?;
                (n, up.written())
            }
            WriteKind::Manifest(m) => {
                let n = m.write(offset, data)?;
                (n, m.buf.len() as u64)
            }
        };
        if let Some(info) = self.staged.lock().unwrap().get_mut(&w.key) {
            info.size = size;
        }
        Ok(n)
    }

    /// `fsync`: chunks written so far are sent and acknowledged.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        let Some(w) = self.writer(fh) else {
            return Ok(());
        };
        let mut w = w.lock().await;
        if w.result.is_some() {
            return Ok(());
        }
        match &mut w.kind {
            WriteKind::Blob(up) => up.sync().await.map_err(FsError::from),
            WriteKind::Manifest(_) => Ok(()),
        }
    }

    /// `flush` (every `close`): commit a writing handle and report the registry's verdict.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        match self.writer(fh) {
            Some(w) => self.commit(&w).await,
            None => Ok(()),
        }
    }

    /// Commit once; later calls return the first outcome.
    pub(super) async fn commit(&self, w: &tokio::sync::Mutex<Writer>) -> FsResult<()> {
        let mut w = w.lock().await;
        if let Some(r) = &w.result {
            return r.clone().map(|_| ());
        }
        let key = w.key.clone();
        let result = match &mut w.kind {
            WriteKind::Blob(up) => {
                let size = up.written();
                let r = up.finish().await.map_err(FsError::from);
                match &r {
                    Ok(digest) => self.committed_blob(&key, digest, size),
                    Err(_) => {
                        // Nothing that claims to be complete stays behind.
                        self.staged.lock().unwrap().remove(&key);
                    }
                }
                r
            }
            WriteKind::Manifest(m) => {
                let body = Bytes::from(std::mem::take(&mut m.buf));
                let size = body.len() as u64;
                let r = self
                    .push_manifest(&m.repo, &m.tag, body)
                    .await
                    .map_err(to_io);
                match &r {
                    Ok(digest) => {
                        if let Some(i) = self.staged.lock().unwrap().get_mut(&key) {
                            i.digest = Some(digest.clone());
                            i.size = size;
                        }
                    }
                    Err(_) => {
                        self.staged.lock().unwrap().remove(&key);
                    }
                }
                r
            }
        };
        if let Err(e) = &result {
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

    fn committed_blob(&self, key: &StagedKey, digest: &str, size: u64) {
        if let Some(i) = self.staged.lock().unwrap().get_mut(key) {
            i.digest = Some(digest.to_string());
            i.size = size;
        }
        self.seen
            .lock()
            .unwrap()
            .entry(key.repo.clone())
            .or_default()
            .insert(
                digest_hex(digest).to_string(),
                FileNode {
                    repo: key.repo.clone(),
                    content: Content::Blob {
                        digest: digest.to_string(),
                    },
                    size,
                    media_type: None,
                },
            );
        self.known_repos.lock().unwrap().insert(key.repo.clone());
        log::info!("pushed {}@{digest} ({size} bytes)", key.repo);
    }

    /// `setattr`: only what `cp` needs on a file being written (truncate to 0, times, mode).
    pub async fn setattr(
        &self,
        ino: u64,
        fh: Option<u64>,
        size: Option<u64>,
    ) -> FsResult<EntryOut> {
        let node = self.node(ino)?;
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
    pub async fn rmdir(&self, parent: u64, name: &str) -> FsResult<()> {
        let pnode = self.node(parent)?;
        let Node::Tags { repo } = &*pnode else {
            return Err(FsError::read_only(format!(
                "rmdir {name}: only tags can be removed"
            )));
        };
        let pending_key = (repo.clone(), name.to_string());
        let head = match self.reg.manifest_head(repo, name).await {
            Ok(h) => h,
            Err(RegistryError::NotFound(_)) => {
                return if self.pending_tags.lock().unwrap().remove(&pending_key) {
                    Ok(())
                } else {
                    Err(FsError::not_found(format!("tag {name}")))
                };
            }
            Err(e) => return Err(FsError::from(e).context(format!("{repo}:{name}"))),
        };
        // distribution deletes manifests, and with one every tag pointing at it: refuse when
        // another tag shares the digest.
        let tags = self.reg.tags(repo).await.map_err(FsError::from)?;
        let mut sharing = Vec::new();
        for t in tags.iter().filter(|t| t.as_str() != name) {
            if let Ok(h) = self.reg.manifest_head(repo, t).await {
                if h.digest == head.digest {
                    sharing.push(t.clone());
                }
            }
        }
        if !sharing.is_empty() {
            return Err(FsError::new(
                libc::EBUSY,
                log::Level::Warn,
                format!(
                    "not deleting tag {repo}:{name}: tag(s) {} point to the same manifest {} and the \
                     registry can only delete a manifest together with all its tags",
                    sharing.join(", "),
                    head.digest
                ),
            ));
        }
        self.reg
            .delete_manifest(repo, &head.digest)
            .await
            .map_err(|e| delete_error(e, &format!("{repo}:{name}")))?;
        self.tag_targets.lock().unwrap().remove(&pending_key);
        self.tag_lists.lock().unwrap().remove(repo);
        self.pending_tags.lock().unwrap().remove(&pending_key);
        log::info!("deleted tag {repo}:{name} ({})", head.digest);
        Ok(())
    }

    /// `unlink`: a blob by digest (where the registry allows it), or an `uploads/` entry (the
    /// listing only; the blob stays).
    pub async fn unlink(&self, parent: u64, name: &str) -> FsResult<()> {
        let pnode = self.node(parent)?;
        match &*pnode {
            Node::BlobsAlgo { repo } if is_sha256_hex(name) => {
                let digest = format!("sha256:{name}");
                self.reg
                    .delete_blob(repo, &digest)
                    .await
                    .map_err(|e| delete_error(e, &format!("{repo}@{digest}")))?;
                if let Some(r) = self.seen.lock().unwrap().get_mut(repo) {
                    r.remove(name);
                }
                self.cache.evict_digest(&digest);
                Ok(())
            }
            Node::Uploads { repo } => {
                let key = StagedKey {
                    repo: repo.clone(),
                    area: Area::Uploads,
                    name: name.to_string(),
                };
                let mut staged = self.staged.lock().unwrap();
                match staged.get(&key) {
                    Some(i) if i.digest.is_some() => {
                        staged.remove(&key);
                        Ok(())
                    }
                    Some(_) => Err(FsError::new(
                        libc::EBUSY,
                        log::Level::Debug,
                        format!("{name} is being written"),
                    )),
                    None => Err(FsError::not_found(name.to_string())),
                }
            }
            _ => Err(FsError::read_only(format!("unlink {name}: read-only"))),
        }
    }

    /// Push a manifest under a tag: bring its blobs (and an index's children) into the
    /// repository first, by cross-repository mount where another repository has them.
    pub async fn push_manifest(&self, repo: &str, tag: &str, body: Bytes) -> FsResult<String> {
        let ct = manifest_content_type(&body)?;
        let parsed = manifest::parse(&ct, &body).map_err(FsError::from)?;
        self.ensure_references(repo, &parsed, 0).await?;
        let digest = self
            .reg
            .put_manifest(repo, tag, &ct, body.clone())
            .await
            .map_err(|e| FsError::io(format!("the registry refused manifest {repo}:{tag}: {e}")))?;
        let entry = ManifestEntry {
            blob: crate::registry::ManifestBlob {
                digest: digest.clone(),
                media_type: ct.clone(),
                body: body.clone(),
            },
            parsed,
        };
        self.note_manifest(repo, &entry);
        self.manifests.lock().unwrap().put(digest.clone(), entry);
        self.tag_targets.lock().unwrap().insert(
            (repo.to_string(), tag.to_string()),
            super::Timed {
                at: std::time::Instant::now(),
                value: ManifestHead {
                    digest: digest.clone(),
                    media_type: ct,
                    size: body.len() as u64,
                },
            },
        );
        self.tag_lists.lock().unwrap().remove(repo);
        *self.catalog.lock().unwrap() = None;
        self.known_repos.lock().unwrap().insert(repo.to_string());
        self.pending_tags
            .lock()
            .unwrap()
            .remove(&(repo.to_string(), tag.to_string()));
        self.invalidate_tag(repo, tag);
        log::info!("pushed manifest {repo}:{tag} ({digest})");
        Ok(digest)
    }

    /// Tell the kernel to forget `tags/<tag>` of `repo`, so the new manifest shows at once.
    fn invalidate_tag(&self, repo: &str, tag: &str) {
        let Some(inval) = self.invalidator.get() else {
            return;
        };
        let tags_ino = {
            let t = self.inodes.lock().unwrap();
            t.nodes
                .iter()
                .find(|(_, e)| matches!(&*e.node, Node::Tags { repo: r } if r == repo))
                .map(|(i, _)| *i)
        };
        if let Some(ino) = tags_ino {
            inval(ino, tag.to_string());
        }
    }

    /// Make every blob and child manifest `parsed` refers to present in `repo`.
    async fn ensure_references(&self, repo: &str, parsed: &Parsed, depth: usize) -> FsResult<()> {
        match parsed {
            Parsed::Image { config, layers } => {
                self.ensure_blob(repo, &config.digest, "config").await?;
                for (i, l) in layers.iter().enumerate() {
                    self.ensure_blob(repo, &l.digest, &format!("layer {i}"))
                        .await?;
                }
            }
            Parsed::Index { manifests } => {
                if depth >= MAX_INDEX_DEPTH {
                    return Err(FsError::io("index nesting is too deep"));
                }
                for m in manifests {
                    Box::pin(self.ensure_child_manifest(repo, &m.digest, depth)).await?;
                }
            }
        }
        Ok(())
    }

    /// Repositories that may hold `digest`, best first: those where regfs has seen it, then the
    /// catalog.
    async fn sources_for(&self, repo: &str, digest: &str) -> Vec<String> {
        let hex = digest_hex(digest);
        let mut out: Vec<String> = self
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(r, m)| r.as_str() != repo && m.contains_key(hex))
            .map(|(r, _)| r.clone())
            .collect();
        if out.is_empty() {
            if let Ok(Some(cat)) = self.catalog().await {
                out.extend(cat.iter().filter(|r| r.as_str() != repo).cloned());
            }
        }
        out.truncate(MAX_MOUNT_SOURCES);
        out
    }

    async fn ensure_blob(&self, repo: &str, digest: &str, what: &str) -> FsResult<()> {
        match self.reg.blob_size(repo, digest).await {
            Ok(_) => return Ok(()),
            Err(RegistryError::NotFound(_)) => {}
            Err(e) => {
                return Err(FsError::io(format!(
                    "checking {what} {digest} in {repo}: {e}"
                )))
            }
        }
        for from in self.sources_for(repo, digest).await {
            match self.reg.mount_blob(repo, digest, &from).await {
                Ok(true) => {
                    log::info!("mounted {what} {digest} from {from} into {repo}");
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => log::debug!("mount of {digest} from {from} failed: {e}"),
            }
        }
        Err(FsError::io(format!(
            "{what} {digest} is missing from {repo} and no repository regfs knows holds it \
             (push it first, e.g. cp FILE {repo}/blobs/sha256/{})",
            digest_hex(digest)
        )))
    }

    async fn ensure_child_manifest(&self, repo: &str, digest: &str, depth: usize) -> FsResult<()> {
        match self.reg.manifest_head(repo, digest).await {
            Ok(_) => return Ok(()),
            Err(RegistryError::NotFound(_)) => {}
            Err(e) => {
                return Err(FsError::io(format!(
                    "checking manifest {digest} in {repo}: {e}"
                )))
            }
        }
        for from in self.sources_for(repo, digest).await {
            let Ok(m) = self.reg.manifest(&from, digest).await else {
                continue;
            };
            let parsed = manifest::parse(&m.media_type, &m.body).map_err(FsError::from)?;
            self.ensure_references(repo, &parsed, depth + 1).await?;
            self.reg
                .put_manifest(repo, digest, &m.media_type, m.body.clone())
                .await
                .map_err(|e| {
                    FsError::io(format!("copying child manifest {digest} into {repo}: {e}"))
                })?;
            log::info!("copied child manifest {digest} from {from} into {repo}");
            return Ok(());
        }
        Err(FsError::io(format!(
            "child manifest {digest} is missing from {repo} and no repository regfs knows holds it"
        )))
    }
}

/// Deletes the registry refuses (405) are EPERM, with its message.
fn delete_error(e: RegistryError, what: &str) -> FsError {
    match e {
        RegistryError::Unsupported(m) => FsError::new(libc::EPERM, log::Level::Warn, m),
        e => FsError::from(e).context(what),
    }
}
