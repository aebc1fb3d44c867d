//! Layer formats: random access into the layer blobs of an image, as pure format code (no
//! registry, cache or filesystem here; callers hand in bytes or readers).
//!
//! - `entry`: one tar entry (`TarEntry`, `EntryKind`) and path normalisation; a leaf.
//! - `index`: `LayerIndex`, with its `Format` stored once and the records random access needs.
//! - `tar`: indexing a tar stream (also the decompressed stream of a gzip or zstd layer).
//! - `gzip`: checkpoints into gzip streams (zran); `zstd`: frame starts in zstd streams.
//! - `toc`: eStargz and zstd:chunked, indexed from their table of contents alone.
//! - `merge`: the merged root filesystem of an image.
//! - `store`: the `--cache-dir` index store.
//!
//! Dependencies run one way: `entry` <- `index` <- {`tar`, `gzip`, `zstd`, `toc`, `merge`,
//! `store`}. Errors are `std::io::Error`.

mod entry;
pub mod gzip;
mod index;
mod merge;
pub mod store;
mod tar;
pub mod toc;
pub mod zstd;

pub use entry::{normalise, EntryKind, TarEntry};
pub use index::{Checkpoint, Codec, Format, FrameStart, LayerIndex, TocChunk};
pub use merge::Merged;
