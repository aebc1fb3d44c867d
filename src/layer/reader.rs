//! Random access into layer blobs: [`Layers`] has each layer's index built once, in the
//! background ([`super::build`]), and answers from it while it is being built where the rule of
//! progressive indexing allows (a lookup found in a layer with every layer above it indexed; a
//! read of such a file from the spans already passed). It keeps indexes and merged root
//! filesystems in bounded LRUs, and reads a file's bytes: Range reads at its offset in a plain
//! tar, its own chunks in eStargz / zstd:chunked (exact ranges), and decompression from the
//! nearest checkpoint or frame in gzip and zstd layers. The uncompressed stream is cached in
//! chunk-sized spans ([`ChunkKey::Span`]).

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::OnceCell;

use super::build::Builder;
use super::merge::{hides, shown};
use super::progress::{FinishOnDrop, Progress};
use super::span::check_span;
use super::{gzip, toc, zstd as zframes, Format, FrameStart, LayerIndex, Merged, TarEntry};
use crate::blob::{gather, BlobCursor, BlobRef, Blobs};
use crate::cache::{ChunkCache, ChunkKey};
use crate::digest::Digest;
use crate::error::{FsError, FsResult};
use crate::manifest::Descriptor;
use crate::registry::Registry;
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

    pub(super) fn annotation(&self, key: &str) -> Option<&str> {
        self.toc_annotations
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn blob(&self, repo: &str) -> BlobRef {
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
    builder: Builder,
    /// Bytes of uncompressed stream per cached span (the chunk size).
    span: u64,
    /// Each layer's index, finished or being built.
    indexes: Mutex<lru::LruCache<Digest, Arc<Progress>>>,
    merged: Cells<MergedView>,
    /// (layer, config, position) pairs whose diff_id was checked against the shared index.
    bound: Mutex<lru::LruCache<(Digest, Digest, usize), ()>>,
}

pub(super) fn io_err(e: std::io::Error, what: &str) -> FsError {
    FsError::io(format!("{what}: {e}"))
}

/// What one layer says of a path, top to bottom (see [`Layers::find_early`]).
enum Step<T> {
    Found(T),
    /// Hidden by this layer, or its pass failed: the merged tree answers.
    AskTree,
    /// Not in this layer and not hidden by it: ask the layer below.
    Below,
}

impl Layers {
    pub fn new(
        blobs: Arc<Blobs>,
        reg: Arc<dyn Registry>,
        checkpoint_spacing: u64,
        cache_dir: Option<PathBuf>,
    ) -> Self {
        let n = std::num::NonZeroUsize::new(MAX_LAYER_INDEXES).expect("non-zero");
        Layers {
            span: blobs.chunk_size(),
            builder: Builder {
                span: blobs.chunk_size(),
                blobs,
                reg,
                checkpoint_spacing,
                cache_dir,
                passes: Arc::new(tokio::sync::Semaphore::new(super::build::MAX_PASSES)),
            },
            indexes: Mutex::new(lru::LruCache::new(n)),
            merged: Mutex::new(lru::LruCache::new(n)),
            bound: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(MAX_BOUND).expect("non-zero"),
            )),
        }
    }

    fn cache(&self) -> &Arc<ChunkCache> {
        self.builder.blobs.cache()
    }

    async fn bytes(&self, repo: &str, layer: &LayerRef, start: u64, end: u64) -> FsResult<Bytes> {
        self.builder.bytes(repo, layer, start, end).await
    }

    /// The progress of a layer's index; the first ask starts building it in the background
    /// (from `--cache-dir`, a TOC, or one pass over the blob), so that every lookup, read or
    /// listing after it shares that one pass.
    fn progress(&self, repo: &str, layer: &LayerRef) -> Arc<Progress> {
        let mut fresh = None;
        let p = lock(&self.indexes)
            .get_or_insert(layer.digest.clone(), || {
                let p = Arc::new(Progress::default());
                fresh = Some(p.clone());
                p
            })
            .clone();
        if let Some(p) = fresh {
            let (builder, repo, layer) = (self.builder.clone(), repo.to_string(), layer.clone());
            tokio::spawn(async move {
                let guard = FinishOnDrop(p);
                let r = builder.load_or_build_index(&repo, &layer, &guard.0).await;
                guard.0.finish(r);
            });
        }
        p
    }

    /// The index of a layer, built once (concurrent callers share the pass), and checked
    /// against the diff_id that this caller's image config names. A failed pass is forgotten,
    /// so that the next ask tries again.
    pub async fn index(&self, repo: &str, layer: &LayerRef) -> FsResult<Arc<LayerIndex>> {
        let p = self.progress(repo, layer);
        let idx = match p.done().await {
            Ok(idx) => idx,
            Err(e) => {
                let mut map = lock(&self.indexes);
                if map.peek(&layer.digest).is_some_and(|q| Arc::ptr_eq(q, &p)) {
                    map.pop(&layer.digest);
                }
                return Err(e);
            }
        };
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
        if let Some(want) = self.builder.diff_id(repo, layer).await? {
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
            // Every layer's index is asked for at once, the top one first (a lookup's answer
            // waits for the layers above it); the tree waits for all of them.
            for r in layers.iter().rev() {
                self.progress(repo, r);
            }
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

    /// The merged tree of `image`, if it is built already.
    pub fn merged_ready(&self, image: &Digest) -> Option<Arc<MergedView>> {
        lock(&self.merged).get(image).and_then(|c| c.get().cloned())
    }

    /// A path of the merged tree of `layers`, found before that tree is built (progressive
    /// indexing). Walking the layers from the top, the first that has `path` answers with
    /// `make(layer position, its index, entry index)` (called under the progress lock, with
    /// the layer's finished or partial index), provided every layer above it is fully indexed
    /// and none of them hides the path. Waits only for the layers above the one that answers.
    /// None when the merged tree must answer: the path is hidden or absent (ENOENT waits for
    /// the whole tree), a layer failed, or it is not a name the tree shows.
    pub async fn find_early<T>(
        &self,
        repo: &str,
        layers: &[LayerRef],
        path: &str,
        make: impl Fn(usize, &LayerIndex, usize) -> T,
    ) -> Option<T> {
        if !shown(path) {
            return None;
        }
        // Asked for from the top: the answer waits for the layers above it.
        let all: Vec<(usize, Arc<Progress>)> = layers
            .iter()
            .enumerate()
            .rev()
            .map(|(i, l)| (i, self.progress(repo, l)))
            .collect();
        for (i, p) in all {
            let step = p
                .wait(|st| match &st.end {
                    Some(Err(_)) => Some(Step::AskTree),
                    Some(Ok(idx)) => Some(match idx.by_path.get(path) {
                        Some(&ei) => Step::Found(make(i, idx, ei)),
                        None if hides(idx, path) => Step::AskTree,
                        None => Step::Below,
                    }),
                    None => st
                        .partial
                        .by_path
                        .get(path)
                        .map(|&ei| Step::Found(make(i, &st.partial, ei))),
                })
                .await?;
            match step {
                Step::Found(t) => return Some(t),
                Step::AskTree => return None,
                Step::Below => {}
            }
        }
        None
    }

    /// `path` in one layer's own tree: answered as soon as the pass has seen it; its absence
    /// (None) waits for the whole index.
    pub async fn find_in_layer<T>(
        &self,
        repo: &str,
        layer: &LayerRef,
        path: &str,
        make: impl Fn(&LayerIndex, usize) -> T,
    ) -> FsResult<Option<T>> {
        let p = self.progress(repo, layer);
        let early = p
            .wait(|st| match &st.end {
                Some(_) => Some(None),
                None => st
                    .partial
                    .by_path
                    .get(path)
                    .map(|&ei| Some(make(&st.partial, ei))),
            })
            .await
            .flatten();
        if early.is_some() {
            return Ok(early);
        }
        let idx = self.index(repo, layer).await?;
        Ok(idx.by_path.get(path).map(|&ei| make(&idx, ei)))
    }

    /// Bytes `offset..end` of entry `index` (`entry`) of a layer. A file found while the
    /// layer's pass runs is read from what the pass has passed (waiting for it to get there).
    pub async fn read(
        &self,
        repo: &str,
        layer: &LayerRef,
        index: usize,
        entry: &TarEntry,
        offset: u64,
        end: u64,
    ) -> FsResult<Bytes> {
        let p = self.progress(repo, layer);
        let streaming = p
            .wait(|st| match st.end {
                Some(_) => Some(None),
                None => st.streaming.map(Some),
            })
            .await
            .flatten();
        let format = match streaming {
            Some(format) => format,
            None => {
                let idx = self.index(repo, layer).await?;
                if let Some(chunks) = idx.toc_chunks.get(&index) {
                    return self
                        .read_toc_chunks(repo, layer, entry, chunks, offset, end)
                        .await;
                }
                idx.format.stream()
            }
        };
        let (Some(start), Some(stop)) = (
            entry.offset.checked_add(offset),
            entry.offset.checked_add(end),
        ) else {
            return Err(FsError::io(format!(
                "layer {repo}@{}: {} lies past any possible offset",
                layer.digest, entry.path
            )));
        };
        match format {
            Format::Gzip | Format::Zstd => {
                self.read_uncompressed(repo, layer, format, start, stop)
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
                    let raw = self.builder.exact(repo, layer, start, stop).await?;
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
            |index| async move {
                let key = ChunkKey::Span {
                    digest: layer.digest.clone(),
                    index,
                };
                if let Some(data) = self.cache().get(&key) {
                    return Ok(data);
                }
                // Waits for the pass to get past this span (it is then cached, usually).
                let idx = self.seek_index(repo, layer, index).await?;
                self.cache()
                    .get_or_fetch(key, move || self.seek_span(repo, layer, format, index, idx))
                    .await
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

    /// What seeking to span `want` needs: the finished index, or, while the pass runs and has
    /// passed that span, the restart points before it and the digests of the spans up to it
    /// (waiting for the pass to get there).
    async fn seek_index(
        &self,
        repo: &str,
        layer: &LayerRef,
        want: u64,
    ) -> FsResult<Arc<LayerIndex>> {
        let p = self.progress(repo, layer);
        let span = self.span;
        let partial = p
            .wait(|st| {
                if st.end.is_some() {
                    return Some(None);
                }
                let ps = &st.partial;
                let w = usize::try_from(want)
                    .ok()
                    .filter(|&w| w < ps.span_digests.len())?;
                let at = want.saturating_mul(span);
                Some(Some(Arc::new(LayerIndex {
                    format: ps.format,
                    checkpoints: gzip::nearest(&ps.checkpoints, at)
                        .cloned()
                        .into_iter()
                        .collect(),
                    zstd_frames: ps.zstd_frames.clone(),
                    span_digests: ps.span_digests[..=w].to_vec(),
                    span_size: span,
                    ..Default::default()
                })))
            })
            .await
            .flatten();
        match partial {
            Some(idx) => Ok(idx),
            None => self.index(repo, layer).await,
        }
    }

    /// Span `want` of a gzip or zstd layer, decompressed from the nearest gzip checkpoint or
    /// zstd frame start before it only (from `index`, see [`Self::seek_index`]).
    async fn seek_span(
        &self,
        repo: &str,
        layer: &LayerRef,
        format: Format,
        want: u64,
        index: Arc<LayerIndex>,
    ) -> FsResult<Bytes> {
        if format == Format::Zstd && index.zstd_frames.len() < 2 {
            // One frame: nothing to seek to; decompress from the start, caching spans.
            return self.unzstd_to(repo, layer, want, index).await;
        }
        let span = self.span;
        let start = want * span;
        let mut reader = self.builder.blobs.cursor(layer.blob(repo));
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
    async fn unzstd_to(
        &self,
        repo: &str,
        layer: &LayerRef,
        want: u64,
        idx: Arc<LayerIndex>,
    ) -> FsResult<Bytes> {
        let reader = self.builder.blobs.cursor(layer.blob(repo));
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
            layers: Layers::new(blobs.clone(), reg.clone(), 64 * 1024, None),
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
        let stored = Layers::new(
            first.blobs.clone(),
            first.reg.clone(),
            64 * 1024,
            Some(dir.path().into()),
        );
        stored.index("r", &l).await.unwrap();
        // Same registry and cache dir, twice the chunk (and span) size.
        let cache = Arc::new(ChunkCache::new(64 << 20));
        let blobs = Arc::new(Blobs::new(
            first.reg.clone(),
            cache,
            crate::blob::EngineConfig::plain(2 * CHUNK),
        ));
        let again = Setup {
            layers: Layers::new(
                blobs.clone(),
                first.reg.clone(),
                64 * 1024,
                Some(dir.path().into()),
            ),
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
