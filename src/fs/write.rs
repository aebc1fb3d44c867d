//! The write side of the core: `mkdir` of repositories and tags, `create`/`write`/`flush` of
//! uploads, blobs and manifests, `setattr`, `rmdir` of tags and `unlink` of blobs. See
//! docs/SEMANTICS.md.
//!
//! A writing handle owns a [`Writer`] behind a tokio mutex (held across the upload's awaits, never
//! together with a std mutex). The commit happens at the first `flush` (so `close()` reports the
//! registry's verdict) or at `release`, once.

use std::sync::Arc;

use bytes::Bytes;

use super::handles::Handle;
use super::meta::Event;
use super::node::{Area, Node, StagedKey};
use super::staging::UnlinkRefused;
use super::types::{EntryOut, Fh, Ino, Opened};
use super::{Fs, RESERVED};
use crate::digest::{is_sha256_hex, Digest};
use crate::error::{FsError, FsResult, RegistryError};
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
    /// The commit's outcome, once committed.
    result: Option<FsResult<String>>,
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
                result: None,
            }))));
        Ok(Opened {
            fh,
            keep_cache: false,
        })
    }

    /// Is `fh` a writing handle?
    pub fn is_writer(&self, fh: Fh) -> bool {
        self.handles.writer(fh).is_some()
    }

    pub async fn write(&self, fh: Fh, offset: u64, data: &[u8]) -> FsResult<u32> {
        let w = self.handles.writer(fh).ok_or_else(FsError::bad_handle)?;
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
        self.staging.set_size(&w.key, size);
        Ok(n)
    }

    /// `fsync`: chunks written so far are sent and acknowledged.
    pub async fn fsync(&self, fh: Fh) -> FsResult<()> {
        let Some(w) = self.handles.writer(fh) else {
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
    pub async fn flush(&self, fh: Fh) -> FsResult<()> {
        match self.handles.writer(fh) {
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
            Err(e) => return Err(FsError::registry(e, format!("{repo}:{name}"))),
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
            return Err(FsError::busy(
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
            .map_err(|e| FsError::from_delete(e, format!("{repo}:{name}")))?;
        self.meta.apply(Event::TagDeleted {
            repo: repo.clone(),
            tag: name.to_string(),
        });
        self.staging.remove_pending_tag(repo, name);
        log::info!("deleted tag {repo}:{name} ({})", head.digest);
        Ok(())
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
