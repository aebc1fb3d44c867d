//! Building a layer's index ([`Builder`]): loaded from `--cache-dir`, made from the TOC of an
//! eStargz or zstd:chunked layer (footer and TOC fetched by exact ranges), or by one pass over
//! the blob read in order through a [`crate::blob::BlobCursor`] (tar headers, or the gzip/zstd
//! stream inflated with checkpoints while its spans are teed into the cache and hashed). The
//! pass publishes what it sees to the layer's [`Progress`] as it goes.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use super::progress::Progress;
use super::reader::{io_err, LayerRef, MAX_CONFIG};
use super::span::SpanTee;
use super::{gzip, store, toc, zstd as zframes, Codec, Format, LayerIndex};
use crate::blob::{BlobRef, Blobs};
use crate::error::{FsError, FsResult};
use crate::registry::Registry;

/// The largest exact range read at once (a footer, a TOC, one TOC chunk): the TOC and chunk
/// caps, plus the 1 MiB of framing slack a compressed chunk may have over what it holds.
const MAX_EXACT: u64 = toc::MAX_TOC + (1 << 20);

/// Indexing passes over layer streams that run at once. A pass inflates on one core, and holds a
/// span being filled plus the chunk it reads (2 x `--chunk-size`): two keep a 2-core machine busy
/// (a lookup in an image waits for the layers above its answer, which start first) and keep an
/// image of 50 layers from holding 100 chunks at once, within the memory bound.
pub(super) const MAX_PASSES: usize = 2;

/// What building an index needs; cheap to clone into the background task that builds it.
#[derive(Clone)]
pub(super) struct Builder {
    pub blobs: Arc<Blobs>,
    /// Exact ranges (footer, TOC, TOC chunks) go to the registry as they are asked: the chunk
    /// cache's granularity would fetch a whole chunk around each.
    pub reg: Arc<dyn Registry>,
    /// Bytes of uncompressed stream per cached span (the chunk size).
    pub span: u64,
    /// Uncompressed bytes between gzip checkpoints.
    pub checkpoint_spacing: u64,
    /// Where indexes persist across mounts.
    pub cache_dir: Option<PathBuf>,
    /// Turns for passes over layer streams ([`MAX_PASSES`]).
    pub passes: Arc<tokio::sync::Semaphore>,
}

impl Builder {
    /// Bytes `start..end` of a layer by one Range request of exactly that size (not through the
    /// chunk cache: callers cache what they make of them). Bounded by [`MAX_EXACT`].
    pub(super) async fn exact(
        &self,
        repo: &str,
        layer: &LayerRef,
        start: u64,
        end: u64,
    ) -> FsResult<Bytes> {
        let what = || format!("reading layer {repo}@{}", layer.digest);
        if start >= end || end > layer.size || end - start > MAX_EXACT {
            return Err(FsError::io(format!(
                "{}: bytes {start}..{end} of a {}-byte layer cannot be read",
                what(),
                layer.size
            )));
        }
        let data = self
            .reg
            .blob_range(repo, layer.digest.as_str(), start, end - 1)
            .await
            .map_err(|e| FsError::registry(e, what()))?;
        if data.len() as u64 != end - start {
            return Err(FsError::io(format!(
                "{}: asked for {} bytes at {start}, got {}",
                what(),
                end - start,
                data.len()
            )));
        }
        Ok(data)
    }

    pub(super) async fn bytes(
        &self,
        repo: &str,
        layer: &LayerRef,
        start: u64,
        end: u64,
    ) -> FsResult<Bytes> {
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
        let head = self.exact(repo, layer, 0, 4).await?;
        Ok(Format::sniff(&head))
    }

    /// The last bytes of a layer, where a TOC footer would be: 64 bytes hold both eStargz's
    /// 51-byte footer and zstd:chunked's 64-byte one. None for a layer too small for either.
    async fn tail(&self, repo: &str, layer: &LayerRef) -> FsResult<Option<Bytes>> {
        if layer.size <= toc::ESTARGZ_FOOTER {
            return Ok(None);
        }
        let len = toc::ZSTD_CHUNKED_FOOTER.min(layer.size);
        Ok(Some(
            self.exact(repo, layer, layer.size - len, layer.size)
                .await?,
        ))
    }

    /// From `--cache-dir` when it holds this layer's index, else built (and stored there).
    pub(super) async fn load_or_build_index(
        &self,
        repo: &str,
        layer: &LayerRef,
        progress: &Arc<Progress>,
    ) -> FsResult<Arc<LayerIndex>> {
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
        let idx = self.build_index(repo, layer, progress).await?;
        if let Some(dir) = &self.cache_dir {
            store::store(dir, &layer.digest, &idx).await;
        }
        Ok(idx)
    }

    /// The index of an eStargz or zstd:chunked layer from its TOC alone, or None for other
    /// layers. `tail` is the layer's [`Self::tail`]; fetches only the TOC.
    async fn toc_index(
        &self,
        repo: &str,
        layer: &LayerRef,
        format: Format,
        tail: Option<&[u8]>,
    ) -> FsResult<Option<LayerIndex>> {
        let what = format!("layer {repo}@{}", layer.digest);
        let footer_of =
            |len: u64| tail.and_then(|t| t.get(t.len().checked_sub(usize::try_from(len).ok()?)?..));
        let (json, codec, toc_start, want_digest, digest_of_json) = match format {
            Format::Gzip if layer.size > toc::ESTARGZ_FOOTER => {
                let Some(off) = footer_of(toc::ESTARGZ_FOOTER).and_then(toc::estargz_toc_offset)
                else {
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
                    .exact(repo, layer, off, layer.size - toc::ESTARGZ_FOOTER)
                    .await?;
                let json = toc::estargz_toc_json(&region)
                    .map_err(|e| io_err(e, &format!("{what}: eStargz TOC")))?;
                let want = layer
                    .annotation(toc::ESTARGZ_TOC_DIGEST)
                    .map(str::to_string);
                (json, Codec::Gzip, off, want, true)
            }
            Format::Zstd => {
                let footer = footer_of(toc::ZSTD_CHUNKED_FOOTER)
                    .filter(|f| f.len() as u64 == toc::ZSTD_CHUNKED_FOOTER);
                let Some((off, len)) =
                    toc::zstd_chunked_toc(layer.annotation(toc::ZSTD_MANIFEST_POSITION), footer)
                else {
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
                let frame = self.exact(repo, layer, off, off + len).await?;
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

    async fn build_index(
        &self,
        repo: &str,
        layer: &LayerRef,
        progress: &Arc<Progress>,
    ) -> FsResult<Arc<LayerIndex>> {
        let what = format!("layer {repo}@{}", layer.digest);
        // At most MAX_PASSES passes at once (each holds a span being filled and the chunk it
        // reads); the others wait their turn, in the order they asked (the semaphore is fair,
        // and an image's layers ask top first).
        let _turn = self
            .passes
            .acquire()
            .await
            .map_err(|_| FsError::io(format!("{what}: indexing stopped")))?;
        // One round trip before the stream starts, not three: the head (the format), the tail
        // (a TOC footer) and the config (the diff_id the stream is checked against) at once.
        let (format, tail, diff_id) = tokio::join!(
            self.sniff(repo, layer),
            self.tail(repo, layer),
            self.diff_id(repo, layer)
        );
        let format = format?;
        if let Some(idx) = self
            .toc_index(repo, layer, format, tail?.as_deref())
            .await?
        {
            return Ok(Arc::new(idx));
        }
        let diff_id = match format {
            Format::Gzip | Format::Zstd => diff_id?,
            _ => None,
        };

        let reader = self.blobs.stream_cursor(layer.blob(repo));
        let tee = SpanTee::new(
            self.blobs.cache().clone(),
            layer.digest.clone(),
            self.span,
            progress.clone(),
        );
        let spacing = self.checkpoint_spacing;
        let (blobs, blob) = (self.blobs.clone(), layer.blob(repo));
        // From here on, entries are published as the pass sees them.
        progress.start(format.stream(), layer.digest.as_str());
        let progress = progress.clone();
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
                // Tar, and anything else sniff never answers. The pass reads the whole blob (no
                // seeking over file data) and hashes it: a plain tar's files are read straight
                // from blob blocks later, and only a blob proven whole gives the chunk map that
                // checks each of those blocks (memory, and the disk tier).
                _ => {
                    let mut hashing = HashingReader {
                        inner: reader,
                        hasher: crate::blob::StreamHasher::new(blobs.chunk_size()),
                    };
                    {
                        let mut archive = ::tar::Archive::new(&mut hashing);
                        LayerIndex::scan(archive.entries()?, |e| progress.add(e))?;
                    }
                    std::io::copy(&mut hashing, &mut std::io::sink())?;
                    let (got, sums) = hashing.hasher.finish();
                    if blob.digest.is_sha256() {
                        if got != blob.digest.as_str() {
                            blobs.evict(&blob.digest);
                            return Err(std::io::Error::other(format!(
                                "the layer's content hashes to {got}, not its digest"
                            )));
                        }
                        blobs.record_map(&blob.digest, blob.size, sums);
                    }
                    let mut idx = progress.take_partial();
                    idx.finish();
                    idx.format = Format::Tar;
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
    pub(super) async fn diff_id(&self, repo: &str, layer: &LayerRef) -> FsResult<Option<String>> {
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
}

/// A reader that hashes what passes through it (the plain tar pass).
struct HashingReader<R> {
    inner: R,
    hasher: crate::blob::StreamHasher,
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
