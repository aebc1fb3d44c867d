//! Layers: random access into the layer blobs of an image. The format modules are pure format
//! code (no registry, cache or filesystem; callers hand in bytes or readers); `reader` puts them
//! over the one blob read path (`crate::blob`) and the chunk cache.
//!
//! - `entry`: one tar entry (`TarEntry`, `EntryKind`) and path normalisation; a leaf.
//! - `index`: `LayerIndex`, with its `Format` stored once and the records random access needs.
//! - `tar`: indexing a tar stream (also the decompressed stream of a gzip or zstd layer).
//! - `gzip`: checkpoints into gzip streams (zran); `zstd`: frame starts in zstd streams.
//! - `toc`: eStargz and zstd:chunked, indexed from their table of contents alone.
//! - `merge`: the merged root filesystem of an image.
//! - `store`: the `--cache-dir` index store.
//! - `span`: the uncompressed stream in spans, recorded and checked (`SpanTee`, `check_span`).
//! - `progress`: an index while its pass runs (entries, restart points, span digests so far).
//! - `build`: building an index (store, TOC by exact ranges, or one pass over the blob).
//! - `reader`: [`Layers`], indexes built once in the background, lookups answered early, and
//!   files read through the cache.
//!
//! Dependencies run one way: `entry` <- `index` <- {`tar`, `gzip`, `zstd`, `toc`, `merge`,
//! `store`} <- `progress` <- `span` <- `build` <- `reader` (which `build` uses only for
//! `LayerRef`). Format code returns `std::io::Error`; `reader` turns that into
//! `FsError` (errnos are chosen in `crate::error`).

mod build;
mod entry;
pub mod gzip;
mod index;
mod merge;
mod progress;
mod reader;
mod span;
pub mod store;
mod tar;
pub mod toc;
pub mod zstd;

pub use entry::{normalise, EntryKind, TarEntry};
pub use index::{Checkpoint, Codec, Format, FrameStart, LayerIndex, TocChunk};
pub use merge::Merged;
pub use reader::{LayerRef, Layers, MergedView};
