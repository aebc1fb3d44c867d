//! Image contents in the tree: `tags/<tag>/rootfs/` (the merged filesystem) and
//! `layers/NN-<hex12>/` (one layer's tar as it is, whiteout markers included).
//!
//! A layer is indexed on first use (`crate::layer::LayerIndex`), once per digest, with concurrent
//! users sharing the pass. An uncompressed tar is indexed by reading headers only (file data is
//! skipped with seeks, so only the chunks holding headers are fetched) and its files are read with
//! Range requests at their offsets. A gzip or zstd layer is decompressed from its start; the
//! uncompressed stream is kept in the chunk cache in chunk-sized spans (key `<digest>#tar`), so
//! reads of files hit those spans, and an evicted span is made again by decompressing up to it.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::OnceCell;

use super::{
    fetch_chunk, fs_err_ctx, Attr, Fs, Kind, LayerRef, Meta, Node, TreeDir, TreeEntry, View,
};
use crate::cache::ChunkCache;
use crate::error::{FsError, FsResult, RegistryError};
use crate::layer::{Codec, EntryKind, LayerIndex, Merged, TarEntry, TocChunk};
use crate::manifest::{self, Descriptor, Parsed};
use crate::registry::Registry;

/// An image's merged tree with what it is made of.
pub(crate) struct MergedView {
    layers: Vec<LayerRef>,
    indexes: Vec<Arc<LayerIndex>>,
    merged: Merged,
}

/// How a layer's bytes are compressed (by magic number; media types can lie).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Tar,
    Gzip,
    Zstd,
}

/// `NN-<hex12>` for a layer whose tree can be shown (tar, tar.gz, tar.zst).
pub(super) fn layer_tree_name(i: usize, count: usize, l: &Descriptor) -> Option<String> {
    let file = manifest::layer_file_name(i, count, l);
    let ext = manifest::layer_extension(&l.media_type);
    (ext != "blob").then(|| file[..file.len() - ext.len() - 1].to_string())
}

pub(super) fn layer_ref(l: &Descriptor, image: &str, pos: usize) -> LayerRef {
    LayerRef {
        digest: l.digest.clone(),
        size: l.size,
        media_type: l.media_type.clone(),
        image: image.to_string(),
        pos,
        toc_annotations: l
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| {
                [
                    crate::layer::toc::ESTARGZ_TOC_DIGEST,
                    crate::layer::toc::ZSTD_MANIFEST_POSITION,
                    crate::layer::toc::ZSTD_MANIFEST_CHECKSUM,
                ]
                .contains(&k.as_str())
            })
            .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
            .collect(),
    }
}

fn annotation<'a>(layer: &'a LayerRef, key: &str) -> Option<&'a str> {
    layer
        .toc_annotations
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

pub(super) fn layer_root(repo: &str, l: &Descriptor, image: &str, pos: usize) -> Node {
    Node::TreeDir(TreeDir {
        repo: repo.to_string(),
        view: View::Layer(layer_ref(l, image, pos)),
        path: String::new(),
        meta: None,
    })
}

fn meta(e: &TarEntry) -> Meta {
    Meta {
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime: e.mtime,
    }
}

fn time(secs: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
}

/// Attributes of tree nodes (None for other nodes).
pub(super) fn tree_attr(ino: u64, node: &Node) -> Option<Attr> {
    match node {
        Node::TreeDir(d) => {
            let m = d.meta.unwrap_or(Meta {
                mode: 0o555,
                uid: 0,
                gid: 0,
                mtime: 0,
            });
            Some(Attr {
                ino,
                kind: Kind::Dir,
                size: 0,
                perm: (m.mode & 0o7777) as u16,
                nlink: 2,
                mtime: time(m.mtime),
                uid: d.meta.map(|m| m.uid as u32),
                gid: d.meta.map(|m| m.gid as u32),
                rdev: 0,
            })
        }
        Node::TreeEntry(t) => {
            let e = &t.entry;
            let (kind, size) = match e.kind {
                EntryKind::File | EntryKind::Hardlink | EntryKind::Dir => (Kind::File, e.size),
                EntryKind::Symlink => {
                    (Kind::Symlink, e.link.as_ref().map_or(0, |l| l.len() as u64))
                }
                EntryKind::Char => (Kind::CharDevice, 0),
                EntryKind::Block => (Kind::BlockDevice, 0),
                EntryKind::Fifo => (Kind::Fifo, 0),
            };
            Some(Attr {
                ino,
                kind,
                size,
                perm: (e.mode & 0o7777) as u16,
                nlink: t.nlink.max(1),
                mtime: time(e.mtime),
                uid: Some(e.uid as u32),
                gid: Some(e.gid as u32),
                rdev: (e.dev.0 << 8) | (e.dev.1 & 0xff) | ((e.dev.1 & !0xff) << 12),
            })
        }
        _ => None,
    }
}

/// A blocking `Read + Seek` over a blob, chunk by chunk through the cache. Runs on a blocking
/// thread and waits on the runtime for each chunk.
struct ChunkReader {
    rt: tokio::runtime::Handle,
    reg: Arc<dyn Registry>,
    cache: Arc<ChunkCache>,
    repo: String,
    digest: String,
    size: u64,
    chunk_size: u64,
    pos: u64,
    cur: Bytes,
    cur_start: u64,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let in_cur =
            self.pos >= self.cur_start && self.pos < self.cur_start + self.cur.len() as u64;
        if !in_cur {
            let idx = self.pos / self.chunk_size;
            let key = (Arc::<str>::from(self.digest.as_str()), idx);
            let (reg, repo, digest, cs, size) = (
                self.reg.clone(),
                self.repo.clone(),
                self.digest.clone(),
                self.chunk_size,
                self.size,
            );
            let cache = self.cache.clone();
            self.cur = self
                .rt
                .block_on(cache.get_or_fetch(key, || fetch_chunk(reg, repo, digest, idx, cs, size)))
                .map_err(std::io::Error::other)?;
            self.cur_start = idx * self.chunk_size;
        }
        let from = (self.pos - self.cur_start) as usize;
        let n = buf.len().min(self.cur.len() - from);
        buf[..n].copy_from_slice(&self.cur[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for ChunkReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
            SeekFrom::End(d) => self.size as i128 + d as i128,
        };
        if new < 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before start",
            ));
        }
        self.pos = new as u64;
        Ok(self.pos)
    }
}

/// Passes an uncompressed stream through, storing it in the cache in chunk-sized spans.
struct SpanTee<R> {
    inner: R,
    cache: Arc<ChunkCache>,
    key: Arc<str>,
    span: u64,
    buf: BytesMut,
    idx: u64,
    /// sha256 of the whole uncompressed stream (the layer's diff_id).
    hasher: crate::digest::StreamingDigest,
}

impl<R: Read> SpanTee<R> {
    fn new(inner: R, cache: Arc<ChunkCache>, key: Arc<str>, span: u64) -> Self {
        SpanTee {
            inner,
            cache,
            key,
            span,
            buf: BytesMut::new(),
            idx: 0,
            hasher: Default::default(),
        }
    }

    /// Index the stream, read it to its end, and check it against `diff_id`.
    /// Returns the index and the inner reader.
    fn index(mut self, diff_id: Option<String>) -> std::io::Result<(LayerIndex, R)> {
        let idx = LayerIndex::build(&mut self)?;
        std::io::copy(&mut self, &mut std::io::sink())?;
        let actual = self.hasher.finish();
        match diff_id {
            Some(want) if want != actual => Err(std::io::Error::other(format!(
                "uncompressed content hashes to {actual}, not to the config's diff_id {want}"
            ))),
            _ => Ok((idx, self.inner)),
        }
    }
}

impl<R: Read> SpanTee<R> {
    fn flush_span(&mut self) {
        if !self.buf.is_empty() {
            let data = std::mem::take(&mut self.buf).freeze();
            self.cache.insert((self.key.clone(), self.idx), data);
            self.idx += 1;
        }
    }
}

impl<R: Read> Read for SpanTee<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(out)?;
        self.hasher.update(&out[..n]);
        let mut rest = &out[..n];
        while !rest.is_empty() {
            let room = (self.span as usize) - self.buf.len();
            let take = room.min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() as u64 == self.span {
                self.flush_span();
            }
        }
        if n == 0 {
            self.flush_span();
        }
        Ok(n)
    }
}

fn span_key(digest: &str) -> Arc<str> {
    Arc::from(format!("{digest}#tar").as_str())
}

fn io_to_fs(e: std::io::Error, what: &str) -> FsError {
    FsError::io(format!("{what}: {e}"))
}

impl Fs {
    fn chunk_reader(&self, repo: &str, layer: &LayerRef) -> ChunkReader {
        ChunkReader {
            rt: tokio::runtime::Handle::current(),
            reg: self.reg.clone(),
            cache: self.cache.clone(),
            repo: repo.to_string(),
            digest: layer.digest.clone(),
            size: layer.size,
            chunk_size: self.opts.chunk_size,
            pos: 0,
            cur: Bytes::new(),
            cur_start: 0,
        }
    }

    async fn layer_format(&self, repo: &str, layer: &LayerRef) -> FsResult<Format> {
        if layer.size < 4 {
            return Ok(Format::Tar);
        }
        let head = self
            .read_blob(repo, &layer.digest, layer.size, 0, 4, false)
            .await?;
        Ok(match &head[..] {
            [0x1f, 0x8b, ..] => Format::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd] => Format::Zstd,
            _ => Format::Tar,
        })
    }

    /// The index of a layer, built once (concurrent callers share the pass).
    pub(super) async fn layer_index(
        &self,
        repo: &str,
        layer: &LayerRef,
    ) -> FsResult<Arc<LayerIndex>> {
        let cell = self
            .indexes
            .lock()
            .unwrap()
            .get_or_insert(layer.digest.clone(), || Arc::new(OnceCell::new()))
            .clone();
        cell.get_or_try_init(|| self.load_or_build_index(repo, layer))
            .await
            .cloned()
    }

    /// From `--cache-dir` when it holds this layer's index, else built (and stored there).
    async fn load_or_build_index(&self, repo: &str, layer: &LayerRef) -> FsResult<Arc<LayerIndex>> {
        let dir = self.opts.cache_dir.as_deref();
        if let Some(dir) = dir {
            if let Some(idx) = crate::layer::store::load(dir, &layer.digest).await {
                return Ok(Arc::new(idx));
            }
        }
        let idx = self.build_index(repo, layer).await?;
        if let Some(dir) = dir {
            crate::layer::store::store(dir, &layer.digest, &idx).await;
        }
        Ok(idx)
    }

    /// The index of an eStargz or zstd:chunked layer from its TOC alone, or None for other
    /// layers. Fetches only the footer and the TOC.
    async fn toc_index(
        &self,
        repo: &str,
        layer: &LayerRef,
        format: Format,
    ) -> FsResult<Option<LayerIndex>> {
        use crate::layer::toc;
        let what = format!("layer {repo}@{}", layer.digest);
        let bytes = |start: u64, end: u64| {
            self.read_blob(repo, &layer.digest, layer.size, start, end, false)
        };
        let (json, codec, toc_start, want_digest, digest_of_json) = match format {
            Format::Gzip if layer.size > toc::ESTARGZ_FOOTER => {
                let footer = bytes(layer.size - toc::ESTARGZ_FOOTER, layer.size).await?;
                let Some(off) = toc::estargz_toc_offset(&footer) else {
                    return Ok(None);
                };
                if off >= layer.size - toc::ESTARGZ_FOOTER {
                    return Err(FsError::io(format!(
                        "{what}: eStargz footer points past the TOC"
                    )));
                }
                let region = bytes(off, layer.size - toc::ESTARGZ_FOOTER).await?;
                let json = toc::estargz_toc_json(&region)
                    .map_err(|e| io_to_fs(e, &format!("{what}: eStargz TOC")))?;
                let want = annotation(layer, toc::ESTARGZ_TOC_DIGEST).map(str::to_string);
                (json, Codec::Gzip, off, want, true)
            }
            Format::Zstd => {
                let footer = if layer.size > toc::ZSTD_CHUNKED_FOOTER {
                    Some(bytes(layer.size - toc::ZSTD_CHUNKED_FOOTER, layer.size).await?)
                } else {
                    None
                };
                let Some((off, len)) = toc::zstd_chunked_toc(
                    annotation(layer, toc::ZSTD_MANIFEST_POSITION),
                    footer.as_deref(),
                ) else {
                    return Ok(None);
                };
                if len == 0 || off + len > layer.size {
                    return Err(FsError::io(format!(
                        "{what}: zstd:chunked TOC position is outside the layer"
                    )));
                }
                let frame = bytes(off, off + len).await?;
                // The checksum annotation is the digest of the compressed TOC.
                if let Some(want) = annotation(layer, toc::ZSTD_MANIFEST_CHECKSUM) {
                    if crate::digest::verify(want, &frame).is_err() {
                        return Err(FsError::io(format!(
                            "{what}: the zstd:chunked TOC does not match {want}"
                        )));
                    }
                }
                let json = toc::zstd_chunked_toc_json(&frame)
                    .map_err(|e| io_to_fs(e, &format!("{what}: zstd:chunked TOC")))?;
                (json, Codec::Zstd, off.saturating_sub(8), None, false)
            }
            _ => return Ok(None),
        };
        if let (Some(want), true) = (want_digest, digest_of_json) {
            if crate::digest::verify(&want, &json).is_err() {
                return Err(FsError::io(format!(
                    "{what}: the eStargz TOC does not match {want}"
                )));
            }
        }
        let idx = toc::index_from_toc(&json, codec, toc_start).map_err(|e| io_to_fs(e, &what))?;
        log::info!(
            "indexed {what} from its {} TOC alone: {} entries",
            if codec == Codec::Gzip {
                "eStargz"
            } else {
                "zstd:chunked"
            },
            idx.entries.len()
        );
        Ok(Some(idx))
    }

    async fn build_index(&self, repo: &str, layer: &LayerRef) -> FsResult<Arc<LayerIndex>> {
        let what = format!("layer {repo}@{}", layer.digest);
        let format = self.layer_format(repo, layer).await?;
        if let Some(idx) = self.toc_index(repo, layer, format).await? {
            return Ok(Arc::new(idx));
        }
        let diff_id = self.diff_id(repo, layer).await;
        let reader = self.chunk_reader(repo, layer);
        let (cache, key, span) = (
            self.cache.clone(),
            span_key(&layer.digest),
            self.opts.chunk_size,
        );
        let spacing = self.opts.checkpoint_spacing;
        let started = std::time::Instant::now();
        let index = tokio::task::spawn_blocking(move || -> std::io::Result<LayerIndex> {
            match format {
                Format::Tar => {
                    let mut archive = tar::Archive::new(reader);
                    LayerIndex::from_entries(archive.entries_with_seek()?)
                }
                Format::Gzip => {
                    let indexer = crate::layer::gzip::Indexer::new(reader, spacing)?;
                    let (mut idx, indexer) =
                        SpanTee::new(indexer, cache, key, span).index(diff_id)?;
                    idx.checkpoints = indexer.checkpoints;
                    idx.format = crate::layer::Format::Gzip;
                    Ok(idx)
                }
                Format::Zstd => {
                    let indexer = crate::layer::zstd::FrameIndexer::new(reader, spacing);
                    let (mut idx, indexer) =
                        SpanTee::new(indexer, cache, key, span).index(diff_id)?;
                    idx.zstd_frames = indexer.frames;
                    idx.format = crate::layer::Format::Zstd;
                    Ok(idx)
                }
            }
        })
        .await
        .map_err(|e| FsError::io(format!("{what}: indexing task failed: {e}")))?
        .map_err(|e| io_to_fs(e, &format!("{what}: cannot index ({format:?})")))?;
        log::info!(
            "indexed {what}: {} entries, {} checkpoints, about {} KiB of index memory, in {:?}",
            index.entries.len(),
            index.checkpoints.len(),
            index.memory() / 1024,
            started.elapsed()
        );
        Ok(Arc::new(index))
    }

    /// The config's diff_id for a layer, when the config can be read and names one.
    async fn diff_id(&self, repo: &str, layer: &LayerRef) -> Option<String> {
        let m = self.manifest(repo, &layer.image).await.ok()?;
        let Parsed::Image { config, .. } = &m.parsed else {
            return None;
        };
        if config.size == 0 {
            return None;
        }
        let body = self
            .read_blob(repo, &config.digest, config.size, 0, config.size, false)
            .await
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
        v["rootfs"]["diff_ids"][layer.pos]
            .as_str()
            .map(str::to_string)
    }

    /// The merged tree of the image manifest `image`.
    async fn merged_view(&self, repo: &str, image: &str) -> FsResult<Arc<MergedView>> {
        let cell = self
            .merged_views
            .lock()
            .unwrap()
            .get_or_insert(image.to_string(), || Arc::new(OnceCell::new()))
            .clone();
        cell.get_or_try_init(|| async {
            let m = self.manifest(repo, image).await?;
            let Parsed::Image { layers, .. } = &m.parsed else {
                return Err(FsError::io(format!("{image} is not an image manifest")));
            };
            let mut refs = Vec::new();
            let mut indexes = Vec::new();
            for (pos, l) in layers.iter().enumerate() {
                if manifest::layer_extension(&l.media_type) == "blob" {
                    return Err(FsError::new(
                        libc::EIO,
                        log::Level::Warn,
                        format!(
                            "rootfs of {repo}@{image}: layer {} has unsupported media type {}",
                            l.digest, l.media_type
                        ),
                    ));
                }
                let r = layer_ref(l, image, pos);
                indexes.push(self.layer_index(repo, &r).await?);
                refs.push(r);
            }
            let merged = Merged::build(&indexes.iter().map(|i| i.as_ref()).collect::<Vec<_>>());
            Ok(Arc::new(MergedView {
                layers: refs,
                indexes,
                merged,
            }))
        })
        .await
        .cloned()
    }

    fn tree_node(
        repo: &str,
        view: &View,
        layer: &LayerRef,
        idx: &LayerIndex,
        ei: usize,
        path: String,
    ) -> Node {
        let ri = idx.resolve(ei);
        let e = &idx.entries[ri];
        if e.kind == EntryKind::Dir && ri == ei {
            return Node::TreeDir(TreeDir {
                repo: repo.to_string(),
                view: view.clone(),
                path,
                meta: Some(meta(e)),
            });
        }
        let view_id = match view {
            View::Rootfs { image } => image.clone(),
            View::Layer(l) => l.digest.clone(),
        };
        Node::TreeEntry(TreeEntry {
            repo: repo.to_string(),
            layer: layer.clone(),
            view_id,
            index: ri,
            entry: e.clone(),
            nlink: idx.nlink.get(&ri).copied().unwrap_or(1),
        })
    }

    pub(super) async fn tree_children(&self, d: &TreeDir) -> FsResult<Vec<(String, Node)>> {
        let child_path = |name: &str| {
            if d.path.is_empty() {
                name.to_string()
            } else {
                format!("{}/{name}", d.path)
            }
        };
        let mut out = Vec::new();
        match &d.view {
            View::Layer(l) => {
                let idx = self.layer_index(&d.repo, l).await?;
                if let Some(children) = idx.dirs.get(&d.path) {
                    for (name, &ei) in children {
                        out.push((
                            name.clone(),
                            Self::tree_node(&d.repo, &d.view, l, &idx, ei, child_path(name)),
                        ));
                    }
                }
            }
            View::Rootfs { image } => {
                let mv = self.merged_view(&d.repo, image).await?;
                if let Some(children) = mv.merged.dirs.get(&d.path) {
                    for (name, &(li, ei)) in children {
                        out.push((
                            name.clone(),
                            Self::tree_node(
                                &d.repo,
                                &d.view,
                                &mv.layers[li],
                                &mv.indexes[li],
                                ei,
                                child_path(name),
                            ),
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    /// `readlink` of a symlink in a tree.
    pub async fn readlink(&self, ino: u64) -> FsResult<Bytes> {
        match &*self.node(ino)? {
            Node::TreeEntry(t) if t.entry.kind == EntryKind::Symlink => {
                Ok(Bytes::from(t.entry.link.clone().unwrap_or_default()))
            }
            _ => Err(FsError::invalid("not a symlink")),
        }
    }

    /// Bytes `offset..end` of a file in a tree.
    pub(super) async fn read_tree_entry(
        &self,
        t: &TreeEntry,
        offset: u64,
        size: u32,
    ) -> FsResult<Bytes> {
        if !matches!(t.entry.kind, EntryKind::File | EntryKind::Hardlink) {
            return Err(FsError::invalid("not a regular file"));
        }
        let len = t.entry.size;
        if offset >= len || size == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + u64::from(size)).min(len);
        let index = self.layer_index(&t.repo, &t.layer).await?;
        if let Some(chunks) = index.toc_chunks.get(&t.index) {
            return self.read_toc_chunks(t, chunks, offset, end).await;
        }
        let (start, stop) = (t.entry.offset + offset, t.entry.offset + end);
        match self.layer_format(&t.repo, &t.layer).await? {
            Format::Tar => {
                self.read_blob(&t.repo, &t.layer.digest, t.layer.size, start, stop, false)
                    .await
            }
            f => {
                self.read_uncompressed(&t.repo, &t.layer, f, start, stop)
                    .await
            }
        }
    }

    /// Bytes `offset..end` of a file of an eStargz or zstd:chunked layer, from its own chunks.
    async fn read_toc_chunks(
        &self,
        t: &TreeEntry,
        chunks: &[TocChunk],
        offset: u64,
        end: u64,
    ) -> FsResult<Bytes> {
        let key: Arc<str> = Arc::from(format!("{}#toc", t.layer.digest).as_str());
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for (i, c) in chunks.iter().enumerate() {
            let c_end = if c.size > 0 {
                c.file_offset + c.size
            } else {
                chunks.get(i + 1).map_or(t.entry.size, |n| n.file_offset)
            };
            if c_end <= offset || c.file_offset >= end {
                continue;
            }
            let (codec, want) = (c.codec, c.digest.clone());
            let len = (c_end - c.file_offset) as usize;
            let (start, stop) = (c.start, c.end);
            let data = self
                .cache
                .get_or_fetch((key.clone(), start), || async {
                    let raw = self
                        .read_blob(&t.repo, &t.layer.digest, t.layer.size, start, stop, false)
                        .await
                        .map_err(|e| RegistryError::Protocol(e.message))?;
                    let mut data = crate::layer::toc::decompress_chunk(codec, &raw)
                        .map_err(|e| RegistryError::Protocol(format!("chunk at {start}: {e}")))?;
                    // An eStargz member may go on past the chunk (tar padding, the next
                    // header): the chunk is its first `len` bytes.
                    if data.len() < len {
                        return Err(RegistryError::Protocol(format!(
                            "chunk at {start} holds {} of its {len} bytes",
                            data.len()
                        )));
                    }
                    data.truncate(len);
                    // Checked before it can be cached.
                    if let Some(d) = &want {
                        crate::digest::verify(d, &data)?;
                    }
                    Ok(Bytes::from(data))
                })
                .await
                .map_err(|e| {
                    fs_err_ctx(e, &format!("reading layer {}@{}", t.repo, t.layer.digest))
                })?;
            let from = offset.max(c.file_offset) - c.file_offset;
            let to = (end.min(c_end) - c.file_offset).min(data.len() as u64);
            if from < to {
                out.extend_from_slice(&data[from as usize..to as usize]);
            }
        }
        if out.len() as u64 != end - offset {
            return Err(FsError::io(format!(
                "{}: chunks of {} hold {} of the {} bytes asked",
                t.layer.digest,
                t.entry.path,
                out.len(),
                end - offset
            )));
        }
        Ok(out.freeze())
    }

    /// Bytes of a compressed layer's uncompressed stream, from cached spans or by decompressing.
    async fn read_uncompressed(
        &self,
        repo: &str,
        layer: &LayerRef,
        format: Format,
        start: u64,
        end: u64,
    ) -> FsResult<Bytes> {
        let span = self.opts.chunk_size;
        let key = span_key(&layer.digest);
        let mut out = BytesMut::with_capacity((end - start) as usize);
        for idx in start / span..=(end - 1) / span {
            let piece = self
                .cache
                .get_or_fetch((key.clone(), idx), || {
                    self.seek_span(repo, layer, format, idx)
                })
                .await
                .map_err(|e| fs_err_ctx(e, &format!("reading layer {repo}@{}", layer.digest)))?;
            let s0 = idx * span;
            let from = start.max(s0) - s0;
            let to = (end.min(s0 + piece.len() as u64)).saturating_sub(s0);
            if from >= to {
                return Err(FsError::io(format!(
                    "layer {}: uncompressed stream shorter than its index says",
                    layer.digest
                )));
            }
            out.extend_from_slice(&piece[from as usize..to as usize]);
        }
        Ok(out.freeze())
    }

    /// Span `want` of a gzip or zstd layer, decompressed from the nearest gzip checkpoint or
    /// zstd frame start before it only.
    async fn seek_span(
        &self,
        repo: &str,
        layer: &LayerRef,
        format: Format,
        want: u64,
    ) -> Result<Bytes, RegistryError> {
        let index = self
            .layer_index(repo, layer)
            .await
            .map_err(|e| RegistryError::Protocol(e.message))?;
        if format == Format::Zstd && index.zstd_frames.len() < 2 {
            // One frame: nothing to seek to; decompress from the start, caching spans.
            return self.unzstd_to(repo, layer, want).await;
        }
        let span = self.opts.chunk_size;
        let start = want * span;
        let mut reader = self.chunk_reader(repo, layer);
        let what = format!("{repo}@{}", layer.digest);
        tokio::task::spawn_blocking(move || -> Result<Bytes, RegistryError> {
            let io =
                |e: std::io::Error| RegistryError::Protocol(format!("decompressing {what}: {e}"));
            let (mut r, base): (Box<dyn Read>, u64) = if format == Format::Zstd {
                let f = crate::layer::zstd::nearest(&index.zstd_frames, start)
                    .unwrap_or(crate::layer::FrameStart { out: 0, input: 0 });
                reader.seek(SeekFrom::Start(f.input)).map_err(io)?;
                (
                    Box::new(zstd::stream::read::Decoder::new(reader).map_err(io)?),
                    f.out,
                )
            } else {
                let cp = crate::layer::gzip::nearest(&index.checkpoints, start);
                let from = crate::layer::gzip::FromCheckpoint::<ChunkReader>::source_offset(cp);
                reader.seek(SeekFrom::Start(from)).map_err(io)?;
                let r = crate::layer::gzip::FromCheckpoint::new(reader, cp).map_err(io)?;
                (Box::new(r), cp.map_or(0, |c| c.out))
            };
            let skip = start - base;
            std::io::copy(&mut (&mut r).take(skip), &mut std::io::sink()).map_err(io)?;
            let mut buf = Vec::with_capacity(span as usize);
            (&mut r).take(span).read_to_end(&mut buf).map_err(io)?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(|e| RegistryError::Protocol(format!("decompression task failed: {e}")))?
    }

    /// Decompress a single-frame zstd layer from its start up to span `want`, caching every
    /// span passed.
    async fn unzstd_to(
        &self,
        repo: &str,
        layer: &LayerRef,
        want: u64,
    ) -> Result<Bytes, RegistryError> {
        let reader = self.chunk_reader(repo, layer);
        let (cache, key, span) = (
            self.cache.clone(),
            span_key(&layer.digest),
            self.opts.chunk_size,
        );
        let what = format!("{repo}@{}", layer.digest);
        tokio::task::spawn_blocking(move || -> Result<Bytes, RegistryError> {
            let io =
                |e: std::io::Error| RegistryError::Protocol(format!("decompressing {what}: {e}"));
            let mut r = zstd::stream::read::Decoder::new(reader).map_err(io)?;
            let mut idx = 0u64;
            loop {
                let mut buf = vec![0u8; span as usize];
                let mut filled = 0;
                while filled < buf.len() {
                    let n = r.read(&mut buf[filled..]).map_err(io)?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                let data = Bytes::from(buf);
                if idx == want {
                    return Ok(data);
                }
                if filled == 0 {
                    return Err(RegistryError::Protocol(format!(
                        "decompressing {what}: stream ends before span {want}"
                    )));
                }
                cache.insert((key.clone(), idx), data);
                idx += 1;
            }
        })
        .await
        .map_err(|e| RegistryError::Protocol(format!("decompression task failed: {e}")))?
    }
}
