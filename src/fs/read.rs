//! The read side of the core: `open` for reading, `read` and `readlink`. Blob bytes come through
//! [`crate::blob::Blobs`] (verified there), image contents through
//! [`crate::layer::Layers`].

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::handles::{Handle, ReadHandle};
use super::node::{Content, FileNode, Node, StagedKey};
use super::types::{Fh, Ino, Opened};
use super::Fs;
use crate::blob::BlobRef;
use crate::error::{FsError, FsResult};
use crate::layer::EntryKind;
use crate::sync::lock;

/// The largest `st_blksize`: 1 MiB, the most one FUSE read carries. Larger would only make
/// readers allocate larger buffers.
const MAX_PREFERRED_IO: u64 = 1 << 20;

/// [`Fs::preferred_io_size`] for a block of `block` bytes (never below a page).
fn preferred_io(block: u64) -> u32 {
    let bs = block.max(1);
    let pow2 = bs & bs.wrapping_neg(); // the lowest set bit: a power of two dividing bs
    u32::try_from(pow2.min(MAX_PREFERRED_IO))
        .unwrap_or(4096)
        .max(4096)
}

impl Fs {
    pub async fn open(&self, ino: Ino, write: bool) -> FsResult<Opened> {
        let node = self.inodes.node(ino)?;
        if write {
            return self.open_write(ino, &node).await;
        }
        // ctl: control files are snapshots read with direct I/O (their size changes).
        let direct_io = matches!(&*node, Node::ControlFile(_));
        let node = match &*node {
            Node::IndexJson { .. } => Arc::new(self.materialize((*node).clone()).await?),
            Node::ControlFile(c) => Arc::new(Node::File(self.control_file(*c))),
            Node::Staged(k) => Arc::new(Node::File(self.committed_file(k).await?)),
            _ => node,
        };
        let mut backing = None;
        let (verifier, keep_cache) = match &*node {
            // Tree files are read through their layer; no whole-blob check per handle.
            Node::TreeEntry(_) => (None, false),
            Node::File(f) => {
                let verifier = match &f.content {
                    Content::Blob { digest } => self.blobs.verifier(&BlobRef {
                        repo: f.repo.clone(),
                        digest: digest.clone(),
                        size: f.size,
                    }),
                    _ => None,
                };
                // The kernel keeps pages across opens only for content already verified
                // against its digest; unverified pages are dropped at the next open.
                let keep_cache =
                    node.immutable() && f.digest().is_some_and(|d| self.blobs.is_verified(d));
                // A whole blob verified on disk: the kernel reads it without us.
                if let (Content::Blob { digest }, Some(disk)) = (&f.content, self.blobs.disk()) {
                    backing = disk.passthrough_file(digest, f.size).map(Arc::new);
                }
                // The kernel reads a backing file itself: nothing to hash here.
                let verifier = if backing.is_some() { None } else { verifier };
                (verifier, keep_cache)
            }
            _ => return Err(FsError::is_dir("open of a directory for reading data")),
        };
        let fh = self
            .handles
            .insert(Handle::Read(Arc::new(Mutex::new(ReadHandle::new(
                node,
                verifier,
                self.blobs.readahead(),
            )))));
        Ok(Opened {
            fh,
            keep_cache,
            direct_io,
            backing,
        })
    }

    /// Whether `open` may hand out backing files (the mount has a disk tier).
    pub fn passthrough_possible(&self) -> bool {
        self.blobs.disk().is_some()
    }

    /// A committed written file as a readable file.
    pub(super) fn staged_file(&self, k: &StagedKey) -> FsResult<FileNode> {
        let info = self.staging.info(k).unwrap_or_default();
        let digest = info.digest.ok_or_else(|| {
            FsError::busy(
                log::Level::Debug,
                format!("{} is still being written", k.name),
            )
        })?;
        Ok(FileNode {
            repo: k.repo.clone(),
            content: match k.area {
                super::node::Area::Manifest { .. } => Content::Manifest { digest },
                _ => Content::Blob { digest },
            },
            size: info.size,
            media_type: info.media_type,
        })
    }

    pub async fn read(&self, fh: Fh, offset: u64, size: u32) -> FsResult<Bytes> {
        let handle = self.handles.reader(fh)?;
        let node = lock(&handle).node.clone();
        let f = match &*node {
            Node::TreeEntry(t) => {
                if !matches!(t.entry.kind, EntryKind::File | EntryKind::Hardlink) {
                    return Err(FsError::invalid("not a regular file"));
                }
                let len = t.entry.size;
                if offset >= len || size == 0 {
                    return Ok(Bytes::new());
                }
                let end = offset.saturating_add(u64::from(size)).min(len);
                return self
                    .layers
                    .read(&t.repo, &t.layer, t.index, &t.entry, offset, end)
                    .await;
            }
            Node::File(f) => f,
            _ => return Err(FsError::is_dir("read of a directory")),
        };
        if offset >= f.size || size == 0 {
            return Ok(Bytes::new());
        }
        let end = offset.saturating_add(u64::from(size)).min(f.size);
        match &f.content {
            Content::Inline(b) => Ok(b.slice(offset as usize..end as usize)),
            Content::Manifest { digest } => {
                let m = self.meta.manifest(&f.repo, digest).await?;
                let body = &m.blob.body;
                Ok(body.slice((offset as usize).min(body.len())..(end as usize).min(body.len())))
            }
            Content::Blob { digest } => {
                let blob = BlobRef {
                    repo: f.repo.clone(),
                    digest: digest.clone(),
                    size: f.size,
                };
                let (failed, ahead) = {
                    let mut h = lock(&handle);
                    let failed = h
                        .verifier
                        .as_ref()
                        .and_then(|v| v.failed().map(str::to_string));
                    (failed, h.ra.on_read(offset, end, f.size))
                };
                if let Some(actual) = failed {
                    return Err(FsError::io(format!(
                        "{}@{digest}: content hashes to {actual}",
                        f.repo
                    )));
                }
                let ctx = || format!("reading {}@{digest}", f.repo);
                let (data, held_back) = self
                    .blobs
                    .read_ahead(&blob, offset, end, ahead)
                    .await
                    .map_err(|e| FsError::registry(e, ctx()))?;
                if let Some(at) = held_back {
                    lock(&handle).ra.held_back(at);
                }
                if self.blobs.single_chunk_verified(&blob) {
                    return Ok(data);
                }
                // Hashing happens on the handle's own task; only the read that completes the
                // blob waits for the verdict.
                let send = lock(&handle)
                    .verifier
                    .as_mut()
                    .and_then(|v| v.prepare(offset, &data));
                if let Some(send) = send {
                    let outcome = send.run().await;
                    self.blobs
                        .settle(&blob, outcome)
                        .map_err(|e| FsError::registry(e, ctx()))?;
                }
                Ok(data)
            }
        }
    }

    /// The I/O size files ask for (`st_blksize`): the largest power of two that divides the
    /// cache's block, at most [`MAX_PREFERRED_IO`]. `cat` and `cp` read in `st_blksize`
    /// units, and the kernel's readahead follows the first read's size: with the page size
    /// here, its windows settled 768 KiB past each block boundary, so every 1 MiB read of a
    /// sequential reader spanned two blocks and was copied to be joined (`bytes.joined` was
    /// all of `bytes.served`). Reads of this size start on block boundaries and are slices of
    /// one block each.
    pub fn preferred_io_size(&self) -> u32 {
        preferred_io(self.blobs.block_size())
    }

    /// Bytes the chunk cache holds now.
    pub fn cache_bytes(&self) -> u64 {
        self.blobs.cache().used_bytes()
    }

    /// Give a read's bytes back once the reply is sent: a buffer nobody else holds is reused
    /// by the next fetch (no page faults for fresh memory).
    pub fn recycle(&self, data: Bytes) {
        self.blobs.cache().recycle_one(data);
    }

    /// `readlink` of a symlink in a tree.
    pub async fn readlink(&self, ino: Ino) -> FsResult<Bytes> {
        match &*self.inodes.node(ino)? {
            Node::TreeEntry(t) if t.entry.kind == EntryKind::Symlink => {
                Ok(Bytes::from(t.entry.link.clone().unwrap_or_default()))
            }
            _ => Err(FsError::invalid("not a symlink")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::preferred_io;

    #[test]
    fn the_preferred_io_size_divides_the_block() {
        assert_eq!(preferred_io(1 << 20), 1 << 20);
        assert_eq!(preferred_io(64 << 10), 64 << 10);
        assert_eq!(preferred_io(4 << 20), 1 << 20, "at most one FUSE read");
        assert_eq!(
            preferred_io(3 << 19),
            1 << 19,
            "1.5 MiB: 512 KiB divides it"
        );
        assert_eq!(preferred_io(96 << 10), 32 << 10);
        assert_eq!(preferred_io(3), 4096, "never below a page");
        assert_eq!(preferred_io(0), 4096);
    }
}
