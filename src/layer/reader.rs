//! Random access into layer blobs over the one blob read path: [`Layers`] builds each layer's
//! index once (from its TOC, by
//! reading tar headers, or by decompressing with checkpoints), keeps indexes and merged root
//! filesystems in bounded LRUs, and reads a file's bytes: Range reads at its offset in a plain
//! tar, its own chunks in eStargz / zstd:chunked, and decompression from the nearest checkpoint
//! or frame in gzip and zstd layers. The uncompressed stream is cached in chunk-sized spans
//! ([`ChunkKey::Span`]). Everything goes through [`Blobs`], the one blob read path.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::OnceCell;

use super::span::{check_span, SpanTee};
use super::{
    gzip, store, toc, zstd as zframes, Codec, Format, FrameStart, LayerIndex, Merged, TarEntry,
};
use crate::blob::{gather, BlobCursor, BlobRef, Blobs};
use crate::cache::{ChunkCache, ChunkKey};
use crate::digest::Digest;
use crate::error::{FsError, FsResult};
use crate::manifest::Descriptor;
use crate::sync::lock;

/// (layer, config) pairs remembered as checked: a few bytes each; past this a pair is checked
/// again (one config read, usually from the cache).
const MAX_BOUND: usize = 4096;

/// Layer indexes (and merged trees) kept in memory at once.
const MAX_LAYER_INDEXES: usize = 64;

/// The largest image config read whole (for its diff_ids). Real configs are a few KiB (a long
/// history makes them tens); 16 MiB is far above any real one and keeps a descriptor that claims
/// 2^62 bytes from allocating anything: such a layer's tree is EIO.
pub const MAX_CONFIG: u64 = 16 << 20;

/// A layer, as the trees need it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LayerRef {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    /// The image config (digest, size) and the layer's position in the image, to check the
    /// uncompressed stream against the config's diff_id.
    pub config: Option<(Digest, u64)>,
    pub pos: usize,
    /// The descriptor's annotations that locate or check a TOC (eStargz, zstd:chunked).
    pub toc_annotations: Vec<(String, String)>,
}

impl LayerRef {
    pub fn new(l: &Descriptor, config: Option<&Descriptor>, pos: usize) -> Self {
        LayerRef {
            digest: Digest::from(&l.digest),
            size: l.size,
            media_type: l.media_type.clone(),
            config: config.map(|c| (Digest::from(&c.digest), c.size)),
            pos,
            toc_annotations: l
                .annotations
                .iter()
                .flatten()
                .filter(|(k, _)| {
                    [
                        toc::ESTARGZ_TOC_DIGEST,
                        toc::ZSTD_MANIFEST_POSITION,
                        toc::ZSTD_MANIFEST_CHECKSUM,
                    ]
                    .contains(&k.as_str())
                })
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect(),
        }
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.toc_annotations
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn blob(&self, repo: &str) -> BlobRef {
        BlobRef {
            repo: repo.to_string(),
            digest: self.digest.clone(),
            size: self.size,
        }
    }
}

/// An image's merged tree with what it is made of.
pub struct MergedView {
    pub layers: Vec<LayerRef>,
    pub indexes: Vec<Arc<LayerIndex>>,
    pub merged: Merged,
}

type Cells<T> = Mutex<lru::LruCache<Digest, Arc<OnceCell<Arc<T>>>>>;

/// Layer indexes and merged trees, built once each, and reads of the files they describe.
pub struct Layers {
    blobs: Arc<Blobs>,
    /// Bytes of uncompressed stream per cached span (the chunk size).
    span: u64,
    /// Uncompressed bytes between gzip checkpoints.
    checkpoint_spacing: u64,
    /// Where indexes persist across mounts.
    cache_dir: Option<PathBuf>,
    indexes: Cells<LayerIndex>,
    merged: Cells<MergedView>,
    /// (layer, config, position) pairs whose diff_id was checked against the shared index.
    bound: Mutex<lru::LruCache<(Digest, Digest, usize), ()>>,
}

fn io_err(e: std::io::Error, what: &str) -> FsError {
    FsError::io(format!("{what}: {e}"))
}

impl Layers {
    pub fn new(blobs: Arc<Blobs>, checkpoint_spacing: u64, cache_dir: Option<PathBuf>) -> Self {
        let n = std::num::NonZeroUsize::new(MAX_LAYER_INDEXES).expect("non-zero");
        Layers {
            span: blobs.chunk_size(),
            blobs,
            checkpoint_spacing,
            cache_dir,
            indexes: Mutex::new(lru::LruCache::new(n)),
            merged: Mutex::new(lru::LruCache::new(n)),
            bound: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(MAX_BOUND).expect("non-zero"),
            )),
        }
    }

    fn cache(&self) -> &Arc<ChunkCache> {
        self.blobs.cache()
    }

    async fn bytes(&self, repo: &str, layer: &LayerRef, start: u64, end: u64) -> FsResult<Bytes> {
        self.blobs
            .read(&layer.blob(repo), start, end, None)
            .await
            .map_err(|e| FsError::registry(e, format!("reading layer {repo}@{}", layer.digest)))
    }

    /// How a layer's bytes are compressed, by magic number (media types can lie). Asked once,
    /// when the index is built; the index keeps it.
    async fn sniff(&self, repo: &str, layer: &LayerRef) -> FsResult<Format> {
        if layer.size < 4 {
            return Ok(Format::Tar);
        }
        let head = self.bytes(repo, layer, 0, 4).await?;
        Ok(Format::sniff(&head))
    }

    /// The index of a layer, built once (concurrent callers share the pass), and checked
    /// against the diff_id that this caller's image config names.
    pub async fn index(&self, repo: &str, layer: &LayerRef) -> FsResult<Arc<LayerIndex>> {
        let cell = lock(&self.indexes)
            .get_or_insert(layer.digest.clone(), || Arc::new(OnceCell::new()))
            .clone();
        let idx = cell
            .get_or_try_init(|| self.load_or_build_index(repo, layer))
            .await
            .cloned()?;
        self.check_binding(repo, layer, &idx).await?;
        Ok(idx)
    }

    /// An index is shared by every image with that layer digest, but each image's config names
    /// its own diff_id: a gzip or zstd stream must hash to the diff_id of every image that
    /// uses it, not only of the first. Checked once per (layer, config, position).
    async fn check_binding(&self, repo: &str, layer: &LayerRef, idx: &LayerIndex) -> FsResult<()> {
        let Some((config, _)) = &layer.config else {
            return Ok(());
        };
        let Some(actual) = idx.diff_id.as_deref() else {
            return Ok(()); // not read whole (tar by seeking, TOC): nothing to compare
        };
        let key = (layer.digest.clone(), config.clone(), layer.pos);
        if lock(&self.bound).contains(&key) {
            return Ok(());
        }
        if let Some(want) = self.diff_id(repo, layer).await? {
            if want != actual {
                return Err(FsError::bad_input(format!(
                    "layer {repo}@{}: its uncompressed content hashes to {actual}, not to the \
                     diff_id {want} that the image config {config} names",
                    layer.digest
                )));
            }
        }
        lock(&self.bound).put(key, ());
        Ok(())
    }

    /// From `--cache-dir` when it holds this layer's index, else built (and stored there).
    async fn load_or_build_index(&self, repo: &str, layer: &LayerRef) -> FsResult<Arc<LayerIndex>> {
        if let Some(dir) = &self.cache_dir {
            if let Some(idx) = store::load(dir, &layer.digest).await {
                // A stored full-pass index is used only if it was checked against the diff_id
                // the config names now (a stored index without one is rebuilt, and checked).
                let stream = matches!(idx.format, Format::Gzip | Format::Zstd);
                if stream && idx.span_size != self.span {
                    // Its span digests were recorded at another --chunk-size: rebuild.
                    log::info!(
                        "rebuilding the stored index of layer {}: it was made with {}-byte \
                         spans, this mount uses {}",
                        layer.digest,
                        idx.span_size,
                        self.span
                    );
                } else if !stream
                    || self
                        .diff_id(repo, layer)
                        .await?
                        .is_none_or(|want| idx.diff_id.as_deref() == Some(want.as_str()))
                {
                    return Ok(Arc::new(idx));
                } else {
                    log::warn!(
                        "ignoring the stored index of layer {}: it was not checked against the \
                         config's diff_id",
                        layer.digest
                    );
                }
            }
        }
        let idx = self.build_index(repo, layer).await?;
        if let Some(dir) = &self.cache_dir {
            store::store(dir, &layer.digest, &idx).await;
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
        let what = format!("layer {repo}@{}", layer.digest);
        let (json, codec, toc_start, want_digest, digest_of_json) = match format {
            Format::Gzip if layer.size > toc::ESTARGZ_FOOTER => {
                let footer = self
                    .bytes(repo, layer, layer.size - toc::ESTARGZ_FOOTER, layer.size)
                    .await?;
                let Some(off) = toc::estargz_toc_offset(&footer) else {
                    return Ok(None);
                };
                if off >= layer.size - toc::ESTARGZ_FOOTER {
                    return Err(FsError::io(format!(
                        "{what}: eStargz footer points past the TOC"
                    )));
                }
                if layer.size - toc::ESTARGZ_FOOTER - off > toc::MAX_TOC {
                    return Err(FsError::io(format!(
                        "{what}: eStargz TOC region is larger than {} bytes",
                        toc::MAX_TOC
                    )));
                }
                let region = self
                    .bytes(repo, layer, off, layer.size - toc::ESTARGZ_FOOTER)
                    .await?;
                let json = toc::estargz_toc_json(&region)
                    .map_err(|e| io_err(e, &format!("{what}: eStargz TOC")))?;
                let want = layer
                    .annotation(toc::ESTARGZ_TOC_DIGEST)
                    .map(str::to_string);
                (json, Codec::Gzip, off, want, true)
            }
            Format::Zstd => {
                let footer = if layer.size > toc::ZSTD_CHUNKED_FOOTER {
                    Some(
                        self.bytes(
                            repo,
                            layer,
                            layer.size - toc::ZSTD_CHUNKED_FOOTER,
                            layer.size,
                        )
                        .await?,
                    )
                } else {
                    None
                };
                let Some((off, len)) = toc::zstd_chunked_toc(
                    layer.annotation(toc::ZSTD_MANIFEST_POSITION),
                    footer.as_deref(),
                ) else {
                    return Ok(None);
                };
                if len == 0 || off.checked_add(len).is_none_or(|e| e > layer.size) {
                    return Err(FsError::io(format!(
                        "{what}: zstd:chunked TOC position is outside the layer"
                    )));
                }
                if len > toc::MAX_TOC {
                    return Err(FsError::io(format!(
                        "{what}: zstd:chunked TOC is larger than {} bytes",
                        toc::MAX_TOC
                    )));
                }
                let frame = self.bytes(repo, layer, off, off + len).await?;
                // The checksum annotation is the digest of the compressed TOC.
                if let Some(want) = layer.annotation(toc::ZSTD_MANIFEST_CHECKSUM) {
                    if crate::digest::verify(want, &frame).is_err() {
                        return Err(FsError::io(format!(
                            "{what}: the zstd:chunked TOC does not match {want}"
                        )));
                    }
                }
                let json = toc::zstd_chunked_toc_json(&frame)
                    .map_err(|e| io_err(e, &format!("{what}: zstd:chunked TOC")))?;
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
        let idx = toc::index_from_toc(&json, codec, toc_start).map_err(|e| io_err(e, &what))?;
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
        let format = self.sniff(repo, layer).await?;
        if let Some(idx) = self.toc_index(repo, layer, format).await? {
            return Ok(Arc::new(idx));
        }
        let diff_id = match format {
            Format::Gzip | Format::Zstd => self.diff_id(repo, layer).await?,
            _ => None,
        };
        let reader = self.blobs.cursor(layer.blob(repo));
        let tee = SpanTee::new(self.cache().clone(), layer.digest.clone(), self.span);
        let spacing = self.checkpoint_spacing;
        let layer_digest = layer.digest.clone();
        let started = std::time::Instant::now();
        let index = tokio::task::spawn_blocking(move || -> std::io::Result<LayerIndex> {
            match format {
                Format::Gzip => {
                    let indexer = gzip::Indexer::new(reader, spacing)?;
                    let (mut idx, indexer) = tee.index(indexer, diff_id)?;
                    idx.checkpoints = indexer.checkpoints;
                    idx.format = Format::Gzip;
                    Ok(idx)
                }
                Format::Zstd => {
                    let indexer = zframes::FrameIndexer::new(reader, spacing);
                    let (mut idx, indexer) = tee.index(indexer, diff_id)?;
                    idx.zstd_frames = indexer.frames;
                    idx.format = Format::Zstd;
                    Ok(idx)
                }
                // Tar, and anything else sniff never answers.
                _ => {
                    let mut archive = ::tar::Archive::new(reader);
                    let mut idx = LayerIndex::from_entries(archive.entries_with_seek()?)?;
                    idx.layer = layer_digest.to_string();
                    Ok(idx)
                }
            }
        })
        .await
        .map_err(|e| FsError::io(format!("{what}: indexing task failed: {e}")))?
        .map_err(|e| io_err(e, &format!("{what}: cannot index ({format:?})")))?;
        log::info!(
            "indexed {what}: {} entries, {} checkpoints, about {} KiB of index memory, in {:?}",
            index.entries.len(),
            index.checkpoints.len(),
            index.memory() / 1024,
            started.elapsed()
        );
        Ok(Arc::new(index))
    }

    /// The config's diff_id for a layer: None when there is no config or it names none. A
    /// config that cannot be read, is larger than [`MAX_CONFIG`], or is not JSON is an error
    /// (the layer's tree is EIO), never a silently skipped check.
    async fn diff_id(&self, repo: &str, layer: &LayerRef) -> FsResult<Option<String>> {
        let Some((digest, size)) = layer.config.clone() else {
            return Ok(None);
        };
        if size == 0 {
            return Ok(None);
        }
        let config = BlobRef {
            repo: repo.to_string(),
            digest,
            size,
        };
        let what = || format!("layer {repo}@{}: reading the image config", layer.digest);
        let body = self
            .blobs
            .read_whole(&config, MAX_CONFIG)
            .await
            .map_err(|e| FsError::registry(e, what()))?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| FsError::io(format!("{}: not JSON: {e}", what())))?;
        Ok(v["rootfs"]["diff_ids"][layer.pos]
            .as_str()
            .map(str::to_string))
    }

    /// The merged tree of the image manifest `image`, made of `layers` (built once).
    pub async fn merged(
        &self,
        repo: &str,
        image: &Digest,
        layers: Vec<LayerRef>,
    ) -> FsResult<Arc<MergedView>> {
        let cell = lock(&self.merged)
            .get_or_insert(image.clone(), || Arc::new(OnceCell::new()))
            .clone();
        cell.get_or_try_init(|| async {
            let mut indexes = Vec::new();
            for r in &layers {
                indexes.push(self.index(repo, r).await?);
            }
            let merged = Merged::build(&indexes.iter().map(|i| i.as_ref()).collect::<Vec<_>>());
            Ok(Arc::new(MergedView {
                layers,
                indexes,
                merged,
            }))
        })
        .await
        .cloned()
    }

    /// Bytes `offset..end` of entry `index` (`entry`) of a layer.
    pub async fn read(
        &self,
        repo: &str,
        layer: &LayerRef,
        index: usize,
        entry: &TarEntry,
        offset: u64,
        end: u64,
    ) -> FsResult<Bytes> {
        let idx = self.index(repo, layer).await?;
        if let Some(chunks) = idx.toc_chunks.get(&index) {
            return self
                .read_toc_chunks(repo, layer, entry, chunks, offset, end)
                .await;
        }
        let (Some(start), Some(stop)) = (
            entry.offset.checked_add(offset),
            entry.offset.checked_add(end),
        ) else {
            return Err(FsError::io(format!(
                "layer {repo}@{}: {} lies past any possible offset",
                layer.digest, entry.path
            )));
        };
        match idx.format.stream() {
            Format::Gzip | Format::Zstd => {
                self.read_uncompressed(repo, layer, idx.format.stream(), start, stop)
                    .await
            }
            _ => self.bytes(repo, layer, start, stop).await,
        }
    }

    /// Bytes `offset..end` of a file of an eStargz or zstd:chunked layer, from its own chunks.
    async fn read_toc_chunks(
        &self,
        repo: &str,
        layer: &LayerRef,
        entry: &TarEntry,
        chunks: &[super::TocChunk],
        offset: u64,
        end: u64,
    ) -> FsResult<Bytes> {
        let mut out = BytesMut::with_capacity((end.saturating_sub(offset) as usize).min(1 << 20));
        for (i, c) in chunks.iter().enumerate() {
            let c_end = if c.size > 0 {
                c.file_offset.saturating_add(c.size)
            } else {
                chunks.get(i + 1).map_or(entry.size, |n| n.file_offset)
            };
            if c_end <= offset || c.file_offset >= end {
                continue;
            }
            // The compressed range is bounded too: it is fetched whole (compressed data is at
            // most slightly larger than what it holds; 1 MiB of slack covers any codec's framing).
            let compressed = c.end.checked_sub(c.start);
            if c_end - c.file_offset > toc::MAX_TOC_CHUNK
                || compressed.is_none_or(|n| n > toc::MAX_TOC_CHUNK + (1 << 20))
            {
                return Err(FsError::io(format!(
                    "layer {}: {}: a TOC chunk of more than {} bytes, or ending before it starts",
                    layer.digest,
                    entry.path,
                    toc::MAX_TOC_CHUNK
                )));
            }
            let (codec, want) = (c.codec, c.digest.clone());
            let len = (c_end - c.file_offset) as usize;
            let (start, stop) = (c.start, c.end);
            let key = ChunkKey::TocChunk {
                digest: layer.digest.clone(),
                start,
                end: stop,
            };
            let data = self
                .cache()
                .get_or_fetch(key, || async {
                    let raw = self.bytes(repo, layer, start, stop).await?;
                    let mut data = toc::decompress_chunk(codec, &raw, len).map_err(|e| {
                        FsError::io(format!("layer {}: chunk at {start}: {e}", layer.digest))
                    })?;
                    // An eStargz member may go on past the chunk (tar padding, the next
                    // header): the chunk is its first `len` bytes.
                    if data.len() < len {
                        return Err(FsError::io(format!(
                            "layer {}: chunk at {start} holds {} of its {len} bytes",
                            layer.digest,
                            data.len()
                        )));
                    }
                    data.truncate(len);
                    // Checked before it can be cached.
                    if let Some(d) = &want {
                        crate::digest::verify(d, &data).map_err(|e| {
                            FsError::registry(e, format!("reading layer {repo}@{}", layer.digest))
                        })?;
                    }
                    Ok(Bytes::from(data))
                })
                .await?;
            let from = offset.max(c.file_offset) - c.file_offset;
            let to = (end.min(c_end) - c.file_offset).min(data.len() as u64);
            if from < to {
                out.extend_from_slice(&data[from as usize..to as usize]);
            }
        }
        if out.len() as u64 != end - offset {
            return Err(FsError::io(format!(
                "{}: chunks of {} hold {} of the {} bytes asked",
                layer.digest,
                entry.path,
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
        gather(
            start,
            end,
            self.span,
            |index| {
                let key = ChunkKey::Span {
                    digest: layer.digest.clone(),
                    index,
                };
                self.cache()
                    .get_or_fetch(key, move || self.seek_span(repo, layer, format, index))
            },
            |_| {
                FsError::io(format!(
                    "layer {}: uncompressed stream shorter than its index says",
                    layer.digest
                ))
            },
        )
        .await
    }

    /// Span `want` of a gzip or zstd layer, decompressed from the nearest gzip checkpoint or
    /// zstd frame start before it only.
    async fn seek_span(
        &self,
        repo: &str,
        layer: &LayerRef,
        format: Format,
        want: u64,
    ) -> FsResult<Bytes> {
        let index = self.index(repo, layer).await?;
        if format == Format::Zstd && index.zstd_frames.len() < 2 {
            // One frame: nothing to seek to; decompress from the start, caching spans.
            return self.unzstd_to(repo, layer, want).await;
        }
        let span = self.span;
        let start = want * span;
        let mut reader = self.blobs.cursor(layer.blob(repo));
        let what = format!("decompressing layer {repo}@{}", layer.digest);
        tokio::task::spawn_blocking(move || -> FsResult<Bytes> {
            let io = |e: std::io::Error| io_err(e, &what);
            let (mut r, base): (Box<dyn Read>, u64) = if format == Format::Zstd {
                let f = zframes::nearest(&index.zstd_frames, start)
                    .unwrap_or(FrameStart { out: 0, input: 0 });
                reader.seek(SeekFrom::Start(f.input)).map_err(io)?;
                (
                    Box::new(zstd::stream::read::Decoder::new(reader).map_err(io)?),
                    f.out,
                )
            } else {
                let cp = gzip::nearest(&index.checkpoints, start);
                let from = gzip::FromCheckpoint::<BlobCursor>::source_offset(cp);
                reader.seek(SeekFrom::Start(from)).map_err(io)?;
                let r = gzip::FromCheckpoint::new(reader, cp).map_err(io)?;
                (Box::new(r), cp.map_or(0, |c| c.out))
            };
            let skip = start.saturating_sub(base);
            std::io::copy(&mut (&mut r).take(skip), &mut std::io::sink()).map_err(io)?;
            let mut buf = Vec::new();
            (&mut r).take(span).read_to_end(&mut buf).map_err(io)?;
            // The gzip CRC covers whole members, not a span from a checkpoint: the span is
            // checked against the digest recorded in the verified indexing pass instead.
            check_span(&index, want, &buf).map_err(io)?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(|e| FsError::io(format!("decompression task failed: {e}")))?
    }

    /// Decompress a single-frame zstd layer from its start up to span `want`, caching every
    /// span passed.
    async fn unzstd_to(&self, repo: &str, layer: &LayerRef, want: u64) -> FsResult<Bytes> {
        let idx = self.index(repo, layer).await?;
        let reader = self.blobs.cursor(layer.blob(repo));
        let (cache, digest, span) = (self.cache().clone(), layer.digest.clone(), self.span);
        let what = format!("decompressing layer {repo}@{}", layer.digest);
        tokio::task::spawn_blocking(move || -> FsResult<Bytes> {
            let io = |e: std::io::Error| io_err(e, &what);
            let mut r = zstd::stream::read::Decoder::new(reader).map_err(io)?;
            let mut index = 0u64;
            loop {
                let mut buf = Vec::new();
                (&mut r).take(span).read_to_end(&mut buf).map_err(io)?;
                let filled = buf.len();
                check_span(&idx, index, &buf).map_err(io)?;
                let data = Bytes::from(buf);
                if index == want {
                    return Ok(data);
                }
                if filled == 0 {
                    return Err(FsError::io(format!(
                        "{what}: stream ends before span {want}"
                    )));
                }
                cache.insert(
                    ChunkKey::Span {
                        digest: digest.clone(),
                        index,
                    },
                    data,
                );
                index += 1;
            }
        })
        .await
        .map_err(|e| FsError::io(format!("decompression task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::fake::FakeRegistry;
    use crate::registry::Registry;
    use std::io::Write;
    use std::sync::atomic::Ordering::Relaxed;

    const CHUNK: u64 = 4096;

    fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = ::tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = ::tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            b.append_data(&mut h, path, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn files() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("etc/os-release", b"NAME=test\n".to_vec()),
            ("usr/big", noise(300_000, 5)),
            ("usr/tail", b"the end\n".to_vec()),
        ]
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    struct Setup {
        reg: Arc<FakeRegistry>,
        layers: Layers,
        blobs: Arc<Blobs>,
    }

    fn setup(cache_bytes: u64) -> Setup {
        let reg = Arc::new(FakeRegistry::new());
        let cache = Arc::new(ChunkCache::new(cache_bytes));
        let blobs = Arc::new(Blobs::new(
            reg.clone(),
            cache,
            crate::blob::EngineConfig::plain(CHUNK),
        ));
        Setup {
            layers: Layers::new(blobs.clone(), 64 * 1024, None),
            reg,
            blobs,
        }
    }

    /// A layer blob in the fake, and a config naming `diff_id` for it.
    fn layer(s: &Setup, blob: &[u8], media_type: &str, diff_id: &str) -> LayerRef {
        let digest = s.reg.add_blob("r", blob.to_vec());
        let config = serde_json::to_vec(&serde_json::json!({
            "rootfs": {"type": "layers", "diff_ids": [diff_id]}
        }))
        .unwrap();
        let config_len = config.len() as u64;
        let config_digest = s.reg.add_blob("r", config);
        LayerRef {
            digest: Digest::from(digest),
            size: blob.len() as u64,
            media_type: media_type.into(),
            config: Some((Digest::from(config_digest), config_len)),
            pos: 0,
            toc_annotations: vec![],
        }
    }

    async fn read_file(s: &Setup, l: &LayerRef, path: &str) -> FsResult<Vec<u8>> {
        let idx = s.layers.index("r", l).await?;
        let i = idx.by_path[path];
        let e = idx.entries[i].clone();
        let mut out = Vec::new();
        // Odd-sized reads, so spans and chunks are crossed at every offset.
        while (out.len() as u64) < e.size {
            let off = out.len() as u64;
            let end = (off + 10_007).min(e.size);
            out.extend_from_slice(&s.layers.read("r", l, i, &e, off, end).await?);
        }
        Ok(out)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn every_format_indexes_once_and_reads_back() {
        let tar = tar_of(&files());
        let diff_id = crate::digest::sha256_digest(&tar);
        let zst = ::zstd::encode_all(&tar[..], 3).unwrap();
        for (blob, mt, format) in [
            (tar.clone(), crate::manifest::OCI_LAYER_TAR, Format::Tar),
            (gzip(&tar), crate::manifest::OCI_LAYER_GZIP, Format::Gzip),
            (zst, crate::manifest::OCI_LAYER_ZSTD, Format::Zstd),
        ] {
            let s = setup(64 << 20);
            let l = layer(&s, &blob, mt, &diff_id);
            let idx = s.layers.index("r", &l).await.unwrap();
            assert_eq!(idx.format, format, "{mt}");
            let gets = s.reg.stats().blob_gets.load(Relaxed);
            assert!(Arc::ptr_eq(&idx, &s.layers.index("r", &l).await.unwrap()));
            assert_eq!(s.reg.stats().blob_gets.load(Relaxed), gets, "built once");
            for (path, data) in files() {
                assert_eq!(read_file(&s, &l, path).await.unwrap(), data, "{mt} {path}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn evicted_spans_are_inflated_again_from_a_checkpoint() {
        let tar = tar_of(&files());
        let diff_id = crate::digest::sha256_digest(&tar);
        // A cache of a few chunks: spans made while indexing are gone by the time of the read.
        let s = setup(4 * CHUNK);
        let l = layer(&s, &gzip(&tar), crate::manifest::OCI_LAYER_GZIP, &diff_id);
        assert_eq!(read_file(&s, &l, "usr/tail").await.unwrap(), b"the end\n");
        assert_eq!(
            read_file(&s, &l, "usr/big").await.unwrap(),
            noise(300_000, 5)
        );
        assert!(s.blobs.cache().used_bytes() <= 4 * CHUNK);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_wrong_diff_id_fails_the_index_with_eio() {
        let tar = tar_of(&files());
        let s = setup(64 << 20);
        let wrong = crate::digest::sha256_digest(b"something else");
        let l = layer(&s, &gzip(&tar), crate::manifest::OCI_LAYER_GZIP, &wrong);
        let e = s.layers.index("r", &l).await.unwrap_err();
        assert_eq!(e.errno, libc::EIO);
        assert!(e.message.contains("diff_id"), "{}", e.message);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_truncated_layer_fails_with_eio_and_merges_nothing() {
        let tar = tar_of(&files());
        let gz = gzip(&tar);
        let s = setup(64 << 20);
        let cut = &gz[..gz.len() / 2];
        let l = layer(&s, cut, crate::manifest::OCI_LAYER_GZIP, "");
        assert_eq!(s.layers.index("r", &l).await.unwrap_err().errno, libc::EIO);
        let image = Digest::from("sha256:image");
        let e = s.layers.merged("r", &image, vec![l]).await.err().unwrap();
        assert_eq!(e.errno, libc::EIO);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn merged_views_apply_later_layers() {
        let lower = tar_of(&[("a", b"old".to_vec()), ("b", b"keep".to_vec())]);
        let upper = tar_of(&[("a", b"new".to_vec()), (".wh.b", vec![])]);
        let s = setup(64 << 20);
        let mut l0 = layer(&s, &lower, crate::manifest::OCI_LAYER_TAR, "");
        let mut l1 = layer(&s, &upper, crate::manifest::OCI_LAYER_TAR, "");
        l0.config = None;
        l1.config = None;
        l1.pos = 1;
        let image = Digest::from("sha256:image");
        let mv = s.layers.merged("r", &image, vec![l0, l1]).await.unwrap();
        let root = &mv.merged.dirs[""];
        assert!(root.contains_key("a") && !root.contains_key("b"));
        let (li, ei) = root["a"];
        assert_eq!(li, 1);
        let e = mv.indexes[li].entries[ei].clone();
        let got = s
            .layers
            .read("r", &mv.layers[li], ei, &e, 0, e.size)
            .await
            .unwrap();
        assert_eq!(&got[..], b"new");
    }

    /// A `--cache-dir` index made with one `--chunk-size` is rebuilt, not misread, by a mount
    /// with another (its span digests were recorded per span of the old size).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_stored_index_from_another_chunk_size_is_rebuilt() {
        let tar = tar_of(&files());
        let diff_id = crate::digest::sha256_digest(&tar);
        let dir = tempfile::tempdir().unwrap();
        let first = setup(64 << 20);
        let l = layer(
            &first,
            &gzip(&tar),
            crate::manifest::OCI_LAYER_GZIP,
            &diff_id,
        );
        let stored = Layers::new(first.blobs.clone(), 64 * 1024, Some(dir.path().into()));
        stored.index("r", &l).await.unwrap();
        // Same registry and cache dir, twice the chunk (and span) size.
        let cache = Arc::new(ChunkCache::new(64 << 20));
        let blobs = Arc::new(Blobs::new(
            first.reg.clone(),
            cache,
            crate::blob::EngineConfig::plain(2 * CHUNK),
        ));
        let again = Setup {
            layers: Layers::new(blobs.clone(), 64 * 1024, Some(dir.path().into())),
            reg: first.reg.clone(),
            blobs,
        };
        for (path, data) in files() {
            assert_eq!(read_file(&again, &l, path).await.unwrap(), data, "{path}");
        }
    }

    /// Two images share a gzip layer; the second one's config names another diff_id. The index
    /// is shared, but each image is checked against its own config: the second gets EIO, the
    /// first keeps working.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_shared_layer_is_checked_against_each_images_diff_id() {
        let tar = tar_of(&files());
        let right = crate::digest::sha256_digest(&tar);
        let wrong = crate::digest::sha256_digest(b"another stream");
        let s = setup(64 << 20);
        let gz = gzip(&tar);
        let good = layer(&s, &gz, crate::manifest::OCI_LAYER_GZIP, &right);
        let bad = layer(&s, &gz, crate::manifest::OCI_LAYER_GZIP, &wrong);
        assert_eq!(good.digest, bad.digest);
        assert!(s.layers.index("r", &good).await.is_ok());
        let e = s.layers.index("r", &bad).await.err().unwrap();
        assert_eq!(e.errno, libc::EIO);
        assert!(e.message.contains(&wrong), "{}", e.message);
        assert_eq!(
            read_file(&s, &good, "etc/os-release").await.unwrap(),
            b"NAME=test\n"
        );
        // Checked once per config: the good image asks for its config no more.
        let gets = s.reg.stats().blob_gets.load(Relaxed);
        s.layers.index("r", &good).await.unwrap();
        assert_eq!(s.reg.stats().blob_gets.load(Relaxed), gets);
    }
}
