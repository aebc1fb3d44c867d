//! `LayerIndex`: every entry of one layer with its directory tree, the layer's `Format` (stored
//! once, so a reader never sniffs the blob again), and what the format needs for random access
//! (gzip checkpoints, zstd frame starts, TOC chunks). The record types live here so that the
//! index depends on no format module; `to_bytes`/`from_bytes` are the `--cache-dir` encoding.

use std::collections::{BTreeMap, HashMap};

use super::entry::{parent_of, EntryKind, TarEntry};

/// How a layer blob is laid out, decided once when it is indexed.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Format {
    /// An uncompressed tar: a file's bytes are read at its offset in the blob.
    #[default]
    Tar,
    /// A gzip stream: read by inflating from the nearest checkpoint (`checkpoints`).
    Gzip,
    /// A zstd stream: read from the nearest recorded frame start (`zstd_frames`).
    Zstd,
    /// eStargz (gzip with a TOC): files in `toc_chunks` are read chunk by chunk, others as `Gzip`.
    Estargz,
    /// zstd:chunked (zstd with a TOC): files in `toc_chunks` chunk by chunk, others as `Zstd`.
    ZstdChunked,
}

impl Format {
    /// The compression of a blob from its first bytes (magic numbers; media types can lie):
    /// `1f 8b` gzip, `28 b5 2f fd` zstd, else tar. Fewer than 4 bytes is a (tiny) tar.
    /// Only `Tar`, `Gzip` or `Zstd`: a TOC is found from the footer, not the head.
    pub fn sniff(first4: &[u8]) -> Format {
        match first4 {
            [_, _, _] | [_, _] | [_] | [] => Format::Tar,
            [0x1f, 0x8b, ..] => Format::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Format::Zstd,
            _ => Format::Tar,
        }
    }

    /// The format of the blob read as one stream: eStargz is gzip, zstd:chunked is zstd.
    pub fn stream(self) -> Format {
        match self {
            Format::Estargz => Format::Gzip,
            Format::ZstdChunked => Format::Zstd,
            f => f,
        }
    }

    /// Whether the layer has a TOC (its files' chunks are in `LayerIndex::toc_chunks`).
    pub fn has_toc(self) -> bool {
        matches!(self, Format::Estargz | Format::ZstdChunked)
    }
}

/// A place to restart inflating a gzip stream (see `super::gzip`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Offset in the uncompressed output.
    pub out: u64,
    /// Offset in the compressed input of the first byte not fully consumed.
    pub input: u64,
    /// Bits of the byte before `input` still to be used (0..=7).
    pub bits: u8,
    /// The 32 KiB of output before `out` (less at the very start).
    #[serde(with = "b64")]
    pub window: Vec<u8>,
}

/// Windows as base64 in the on-disk index.
mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

/// Where a zstd frame starts (see `super::zstd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrameStart {
    /// Offset in the uncompressed output.
    pub out: u64,
    /// Offset of the frame in the compressed stream.
    pub input: u64,
}

/// How a TOC chunk's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Codec {
    Gzip,
    Zstd,
}

/// One compressed piece of a file of a layer with a TOC (see `super::toc`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TocChunk {
    /// Offset of this piece in the file.
    pub file_offset: u64,
    /// Uncompressed length (0 = to the end of the file).
    pub size: u64,
    /// Compressed bytes `[start, end)` of the layer blob.
    pub start: u64,
    pub end: u64,
    pub codec: Codec,
    /// sha256 the decompressed chunk must have, when the TOC says (`chunkDigest`, or `digest`
    /// for a file stored as a single chunk).
    #[serde(default)]
    pub digest: Option<String>,
}

/// Every entry of one layer, with its directory tree.
#[derive(Debug, Default)]
pub struct LayerIndex {
    /// How the blob is laid out: which of the fields below a read uses.
    pub format: Format,
    pub entries: Vec<TarEntry>,
    /// Path -> entry index (the last entry for a path).
    pub by_path: HashMap<String, usize>,
    /// Directory path ("" = root) -> child name -> entry index.
    pub dirs: HashMap<String, BTreeMap<String, usize>>,
    /// Entry index -> number of names that refer to it (1 + hardlinks).
    pub nlink: HashMap<usize, u32>,
    /// gzip layers: where reads can restart inflating (see `super::gzip`).
    pub checkpoints: Vec<Checkpoint>,
    /// eStargz and zstd:chunked layers: entry index -> where its content chunks are
    /// (see `super::toc`). Files listed here are read chunk by chunk, never from a full pass.
    pub toc_chunks: HashMap<usize, Vec<TocChunk>>,
    /// zstd layers: recorded frame starts (see `super::zstd`).
    pub zstd_frames: Vec<FrameStart>,
    /// The layer digest this index was built from (the `--cache-dir` record checks it).
    pub layer: String,
    /// gzip and zstd layers: the sha256 of the whole uncompressed stream, computed by the
    /// indexing pass (which also checked it against the config's diff_id when one was named).
    /// None when the stream was not read whole (a plain tar read by seeking, a TOC layer).
    pub diff_id: Option<String>,
    /// gzip and zstd layers indexed by a full pass: sha256 of each uncompressed span (of
    /// `--chunk-size` bytes), recorded during the pass that the diff_id check covered. A span
    /// inflated again later (after eviction, from a checkpoint) must hash to its entry.
    pub span_digests: Vec<[u8; 32]>,
    /// The span size `span_digests` were recorded with.
    pub span_size: u64,
}

/// What `--cache-dir` keeps of an index; the rest is derived again on load.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    version: u32,
    format: Format,
    entries: Vec<TarEntry>,
    by_path: HashMap<String, usize>,
    checkpoints: Vec<Checkpoint>,
    #[serde(default)]
    toc_chunks: HashMap<usize, Vec<TocChunk>>,
    #[serde(default)]
    zstd_frames: Vec<FrameStart>,
    layer: String,
    diff_id: Option<String>,
    span_digests: Vec<[u8; 32]>,
    span_size: u64,
}

/// Version 2 added `format`; version 3 the record binding the index to what was checked
/// (`layer`, `diff_id`, `span_digests`). An index stored by an older version is rebuilt.
const STORED_VERSION: u32 = 3;

impl LayerIndex {
    /// Serialise for the on-disk cache.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&Stored {
            version: STORED_VERSION,
            format: self.format,
            entries: self.entries.clone(),
            by_path: self.by_path.clone(),
            checkpoints: self.checkpoints.clone(),
            toc_chunks: self.toc_chunks.clone(),
            zstd_frames: self.zstd_frames.clone(),
            layer: self.layer.clone(),
            diff_id: self.diff_id.clone(),
            span_digests: self.span_digests.clone(),
            span_size: self.span_size,
        })
        .expect("index serialises")
    }

    /// Load from the on-disk cache; None if it is not a valid index of this version.
    pub fn from_bytes(b: &[u8]) -> Option<LayerIndex> {
        let s: Stored = serde_json::from_slice(b).ok()?;
        if s.version != STORED_VERSION || s.by_path.values().any(|&i| i >= s.entries.len()) {
            return None;
        }
        // A checkpoint zlib could not be primed from (found by reading the code while writing
        // the fuzz targets; pinned in tests/fuzz_regressions.rs): at most 7 pending bits, which
        // need a byte before `input`, and a window of at most 32 KiB.
        if s.checkpoints
            .iter()
            .any(|c| c.bits > 7 || (c.bits > 0 && c.input == 0) || c.window.len() > 32 * 1024)
        {
            return None;
        }
        let mut idx = LayerIndex {
            format: s.format,
            entries: s.entries,
            by_path: s.by_path,
            checkpoints: s.checkpoints,
            toc_chunks: s.toc_chunks,
            zstd_frames: s.zstd_frames,
            layer: s.layer,
            diff_id: s.diff_id,
            span_digests: s.span_digests,
            span_size: s.span_size,
            ..Default::default()
        };
        idx.finish();
        Some(idx)
    }

    /// Approximate memory held by this index, in bytes.
    pub fn memory(&self) -> usize {
        let entries: usize = self
            .entries
            .iter()
            .map(|e| 96 + 2 * e.path.len() + e.link.as_ref().map_or(0, |l| l.len()))
            .sum();
        let checkpoints: usize = self.checkpoints.iter().map(|c| 40 + c.window.len()).sum();
        entries + checkpoints
    }

    /// Add an entry (builders call this in archive order, then `finish`).
    pub(crate) fn add(&mut self, e: TarEntry) {
        // Parents that the tar does not list are implied, as extraction would make them.
        let mut p = e.path.as_str();
        let mut missing = Vec::new();
        while let Some(i) = p.rfind('/') {
            p = &p[..i];
            if !self.by_path.contains_key(p) {
                missing.push(p.to_string());
            }
        }
        for dir in missing.into_iter().rev() {
            let i = self.entries.len();
            self.entries.push(TarEntry {
                path: dir.clone(),
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                size: 0,
                link: None,
                dev: (0, 0),
                xattrs: vec![],
                offset: 0,
            });
            self.by_path.insert(dir, i);
        }
        let i = self.entries.len();
        // A later entry replaces an earlier one of the same path (and a non-directory drops
        // what was below a directory of that name).
        if let Some(&old) = self.by_path.get(&e.path) {
            if self.entries[old].kind == EntryKind::Dir && e.kind != EntryKind::Dir {
                let prefix = format!("{}/", e.path);
                self.by_path.retain(|k, _| !k.starts_with(&prefix));
            }
        }
        self.by_path.insert(e.path.clone(), i);
        self.entries.push(e);
    }

    /// Derive `dirs` and `nlink` from `entries` and `by_path`.
    pub(crate) fn finish(&mut self) {
        self.dirs.insert(String::new(), BTreeMap::new());
        let mut paths: Vec<(&String, &usize)> = self.by_path.iter().collect();
        paths.sort();
        for (path, &i) in paths {
            let (parent, name) = parent_of(path);
            self.dirs
                .entry(parent.to_string())
                .or_default()
                .insert(name.to_string(), i);
            if self.entries[i].kind == EntryKind::Dir {
                self.dirs.entry(path.clone()).or_default();
            }
        }
        for i in self.by_path.values() {
            let e = &self.entries[*i];
            let target = if e.kind == EntryKind::Hardlink {
                e.link.as_ref().and_then(|t| self.by_path.get(t)).copied()
            } else {
                Some(*i)
            };
            if let Some(t) = target {
                *self.nlink.entry(t).or_insert(0) += 1;
            }
        }
    }

    /// The entry a name shows: a hardlink shows its target's entry.
    pub fn resolve(&self, i: usize) -> usize {
        let e = &self.entries[i];
        if e.kind == EntryKind::Hardlink {
            if let Some(&t) = e.link.as_ref().and_then(|t| self.by_path.get(t)) {
                if self.entries[t].kind != EntryKind::Hardlink {
                    return t;
                }
            }
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind, link: Option<&str>) -> TarEntry {
        TarEntry {
            path: path.to_string(),
            kind,
            mode: 0o644,
            uid: 1,
            gid: 2,
            mtime: 3,
            size: 4,
            link: link.map(str::to_string),
            dev: (0, 0),
            xattrs: vec![("user.x".to_string(), vec![0, 255])],
            offset: 512,
        }
    }

    fn sample(format: Format) -> LayerIndex {
        let mut idx = LayerIndex {
            format,
            ..Default::default()
        };
        idx.add(entry("etc/hosts", EntryKind::File, None));
        idx.add(entry("etc/alias", EntryKind::Hardlink, Some("etc/hosts")));
        idx.finish();
        idx.checkpoints.push(Checkpoint {
            out: 10,
            input: 5,
            bits: 3,
            window: vec![1, 2, 3],
        });
        idx.zstd_frames.push(FrameStart { out: 7, input: 9 });
        idx.toc_chunks.insert(
            idx.by_path["etc/hosts"],
            vec![TocChunk {
                file_offset: 0,
                size: 4,
                start: 100,
                end: 140,
                codec: Codec::Zstd,
                digest: Some("sha256:ab".to_string()),
            }],
        );
        idx
    }

    #[test]
    fn sniffs_magic_numbers() {
        assert_eq!(Format::sniff(&[0x1f, 0x8b, 8, 0]), Format::Gzip);
        assert_eq!(Format::sniff(&[0x28, 0xb5, 0x2f, 0xfd]), Format::Zstd);
        assert_eq!(Format::sniff(&[0x28, 0xb5, 0x2f, 0xfd, 0, 1]), Format::Zstd);
        assert_eq!(Format::sniff(b"etc/"), Format::Tar);
        assert_eq!(Format::sniff(&[0x28, 0xb5, 0x2f, 0xfe]), Format::Tar);
        // Shorter than 4 bytes: a (tiny) tar, whatever it starts with.
        assert_eq!(Format::sniff(&[0x1f, 0x8b, 8]), Format::Tar);
        assert_eq!(Format::sniff(&[]), Format::Tar);
    }

    #[test]
    fn format_names_its_stream_and_toc() {
        assert_eq!(Format::Estargz.stream(), Format::Gzip);
        assert_eq!(Format::ZstdChunked.stream(), Format::Zstd);
        assert_eq!(Format::Tar.stream(), Format::Tar);
        assert!(Format::Estargz.has_toc() && Format::ZstdChunked.has_toc());
        assert!(!Format::Gzip.has_toc() && !Format::Zstd.has_toc() && !Format::Tar.has_toc());
        assert_eq!(LayerIndex::default().format, Format::Tar);
    }

    #[test]
    fn stored_index_keeps_its_format_and_records() {
        for format in [
            Format::Tar,
            Format::Gzip,
            Format::Zstd,
            Format::Estargz,
            Format::ZstdChunked,
        ] {
            let idx = sample(format);
            let back = LayerIndex::from_bytes(&idx.to_bytes()).expect("loads");
            assert_eq!(back.format, format);
            assert_eq!(back.entries, idx.entries);
            assert_eq!(back.by_path, idx.by_path);
            assert_eq!(back.checkpoints, idx.checkpoints);
            assert_eq!(back.zstd_frames, idx.zstd_frames);
            assert_eq!(back.toc_chunks, idx.toc_chunks);
            // Derived again on load.
            assert_eq!(back.dirs, idx.dirs);
            assert_eq!(back.nlink, idx.nlink);
            assert_eq!(back.nlink[&back.by_path["etc/hosts"]], 2);
        }
    }

    #[test]
    fn old_or_garbage_stored_indexes_are_rejected() {
        let good = sample(Format::Gzip).to_bytes();
        let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
        // Version 1 had no format.
        v["version"] = 1.into();
        v.as_object_mut().unwrap().remove("format");
        assert!(LayerIndex::from_bytes(&serde_json::to_vec(&v).unwrap()).is_none());
        // The current layout under an old version number.
        let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
        v["version"] = 1.into();
        assert!(LayerIndex::from_bytes(&serde_json::to_vec(&v).unwrap()).is_none());
        // The current version without a format.
        let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
        v.as_object_mut().unwrap().remove("format");
        assert!(LayerIndex::from_bytes(&serde_json::to_vec(&v).unwrap()).is_none());
        // An unknown format.
        let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
        v["format"] = "Rar".into();
        assert!(LayerIndex::from_bytes(&serde_json::to_vec(&v).unwrap()).is_none());
        // A path pointing past the entries.
        let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
        v["by_path"]["etc/hosts"] = 99.into();
        assert!(LayerIndex::from_bytes(&serde_json::to_vec(&v).unwrap()).is_none());
        // Not an index at all.
        for junk in [
            &b""[..],
            b"{",
            b"null",
            b"[]",
            b"{\"version\":2}",
            &good[..good.len() / 2],
        ] {
            assert!(LayerIndex::from_bytes(junk).is_none());
        }
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let mut idx = LayerIndex::default();
        idx.add(entry("d/x", EntryKind::File, None));
        idx.add(entry("d", EntryKind::File, None));
        idx.finish();
        assert!(
            !idx.by_path.contains_key("d/x"),
            "a file replaces a directory's contents"
        );
        assert_eq!(idx.entries[idx.by_path["d"]].kind, EntryKind::File);
        assert_eq!(idx.dirs[""].keys().collect::<Vec<_>>(), vec!["d"]);
        assert!(!idx.dirs.contains_key("d"));
    }
}
