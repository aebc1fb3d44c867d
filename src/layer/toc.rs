//! Seekable layer formats with a table of contents: eStargz (gzip) and zstd:chunked (zstd).
//! Only the footer and the TOC are fetched to list a layer; a file's bytes come from its own
//! compressed chunks.
//!
//! - eStargz (containerd/stargz-snapshotter `docs/estargz.md`): a 51-byte footer, an empty gzip
//!   member whose extra field holds `%016xSTARGZ` (the TOC offset). The TOC is a gzip member
//!   holding a tar entry `stargz.index.json`. An entry's `offset` is the gzip member where its
//!   content (or chunk) starts; it ends where the next offset starts.
//! - zstd:chunked (containers/storage `pkg/chunked`): the TOC ("manifest") is a zstd frame inside
//!   a skippable frame, located by the layer annotation
//!   `io.github.containers.zstd-chunked.manifest-position` (`offset:length:uncompressed:1`) or the
//!   64-byte footer ending in `GNUlInUx`. An entry's content is `[offset, endOffset)`.

use std::io::Read;

use base64::Engine as _;
use serde::Deserialize;

use super::entry::{normalise, EntryKind, TarEntry};
use super::index::{Codec, Format, LayerIndex, TocChunk};

pub const ESTARGZ_FOOTER: u64 = 51;
pub const ZSTD_CHUNKED_FOOTER: u64 = 64;
pub const ESTARGZ_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
pub const ZSTD_MANIFEST_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
pub const ZSTD_MANIFEST_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
const ZSTD_CHUNKED_MAGIC: &[u8; 8] = b"GNUlInUx";

/// Where the TOC of an eStargz layer starts, from its 51-byte footer.
pub fn estargz_toc_offset(footer: &[u8]) -> Option<u64> {
    if footer.len() != ESTARGZ_FOOTER as usize || footer[..2] != [0x1f, 0x8b] || footer[3] & 4 == 0
    {
        return None;
    }
    let xlen = u16::from_le_bytes([footer[10], footer[11]]);
    if xlen != 26 || &footer[12..14] != b"SG" || u16::from_le_bytes([footer[14], footer[15]]) != 22
    {
        return None;
    }
    let payload = std::str::from_utf8(&footer[16..38]).ok()?;
    let hex = payload.strip_suffix("STARGZ")?;
    u64::from_str_radix(hex, 16).ok()
}

/// (offset, length) of the zstd:chunked TOC frame, from the annotation or the 64-byte footer.
pub fn zstd_chunked_toc(annotation: Option<&str>, footer: Option<&[u8]>) -> Option<(u64, u64)> {
    if let Some(a) = annotation {
        let parts: Vec<&str> = a.split(':').collect();
        if parts.len() == 4 {
            return Some((parts[0].parse().ok()?, parts[1].parse().ok()?));
        }
    }
    let f = footer?;
    if f.len() != ZSTD_CHUNKED_FOOTER as usize || &f[56..64] != ZSTD_CHUNKED_MAGIC {
        return None;
    }
    let u = |i: usize| u64::from_le_bytes(f[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Some((u(0), u(1)))
}

#[derive(Deserialize)]
struct Toc {
    #[serde(default)]
    entries: Vec<TocEntry>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct TocEntry {
    #[serde(default)]
    name: String,
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    modtime: Option<String>,
    #[serde(default)]
    link_name: String,
    #[serde(default)]
    mode: u64,
    #[serde(default)]
    uid: u64,
    #[serde(default)]
    gid: u64,
    #[serde(default)]
    dev_major: u32,
    #[serde(default)]
    dev_minor: u32,
    #[serde(default)]
    xattrs: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    end_offset: u64,
    #[serde(default)]
    chunk_offset: u64,
    #[serde(default)]
    chunk_size: u64,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    chunk_digest: Option<String>,
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2023-11-14T22:13:20Z`); 0 if unparsable.
pub fn rfc3339_secs(s: &str) -> u64 {
    let b = s.as_bytes();
    if b.len() < 19 {
        return 0;
    }
    let n = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<i64>().ok());
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(se)) =
        (n(0..4), n(5..7), n(8..10), n(11..13), n(14..16), n(17..19))
    else {
        return 0;
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    (days * 86400 + h * 3600 + mi * 60 + se).max(0) as u64
}

/// Build a layer index from a TOC document. `toc_end` is where the last content chunk ends
/// (the TOC's own offset), for formats whose chunks end where the next begins.
pub fn index_from_toc(json: &[u8], codec: Codec, toc_end: u64) -> std::io::Result<LayerIndex> {
    let toc: Toc = serde_json::from_slice(json)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("TOC: {e}")))?;
    // eStargz: a content chunk ends where the next one starts (the smallest start above it:
    // sorted once, then a binary search per chunk, so a TOC of n entries costs n log n).
    let mut starts: Vec<u64> = toc
        .entries
        .iter()
        .map(|e| e.offset)
        .filter(|&o| o > 0)
        .collect();
    starts.sort_unstable();
    starts.dedup();
    let next_start = |o: u64| {
        starts
            .get(starts.partition_point(|&s| s <= o))
            .copied()
            .unwrap_or(toc_end)
    };
    let mut idx = LayerIndex {
        format: match codec {
            Codec::Gzip => Format::Estargz,
            Codec::Zstd => Format::ZstdChunked,
        },
        ..Default::default()
    };
    let mut chunks: Vec<(String, TocChunk)> = Vec::new();
    for e in &toc.entries {
        let path = normalise(e.name.as_bytes());
        let has_data = e.offset > 0
            && (e.kind == "reg" || e.kind == "chunk")
            && (e.size > 0 || e.chunk_size > 0);
        if has_data {
            let end = if codec == Codec::Zstd && e.end_offset > 0 {
                e.end_offset
            } else {
                next_start(e.offset)
            };
            let whole_file = e.kind == "reg" && (e.chunk_size == 0 || e.chunk_size == e.size);
            let digest = e
                .chunk_digest
                .clone()
                .or_else(|| whole_file.then(|| e.digest.clone()).flatten())
                .filter(|d| d.starts_with("sha256:"));
            chunks.push((
                path.clone(),
                TocChunk {
                    file_offset: e.chunk_offset,
                    size: e.chunk_size,
                    start: e.offset,
                    end,
                    codec,
                    digest,
                },
            ));
        }
        let kind = match e.kind.as_str() {
            "dir" => EntryKind::Dir,
            "reg" => EntryKind::File,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "char" => EntryKind::Char,
            "block" => EntryKind::Block,
            "fifo" => EntryKind::Fifo,
            _ => continue, // "chunk" continues the previous file
        };
        if path.is_empty() {
            continue;
        }
        let xattrs = e
            .xattrs
            .iter()
            .map(|(k, v)| {
                let val = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .unwrap_or_else(|_| v.clone().into_bytes());
                (k.clone(), val)
            })
            .collect();
        idx.add(TarEntry {
            path,
            kind,
            mode: (e.mode & 0o7777) as u32,
            uid: e.uid,
            gid: e.gid,
            mtime: e.modtime.as_deref().map_or(0, rfc3339_secs),
            size: if kind == EntryKind::File { e.size } else { 0 },
            link: (!e.link_name.is_empty()).then(|| match kind {
                EntryKind::Hardlink => normalise(e.link_name.as_bytes()),
                _ => e.link_name.clone(),
            }),
            dev: (e.dev_major, e.dev_minor),
            xattrs,
            offset: 0,
        });
    }
    idx.finish();
    for (path, c) in chunks {
        if let Some(&i) = idx.by_path.get(&path) {
            idx.toc_chunks.entry(i).or_default().push(c);
        }
    }
    for list in idx.toc_chunks.values_mut() {
        list.sort_by_key(|c| c.file_offset);
    }
    // The TOC's own files are bookkeeping, not content.
    Ok(idx)
}

/// The largest TOC read (compressed, and again decompressed). A TOC lists every file of a layer
/// with its chunks: a few hundred bytes per file, so 64 MiB is a layer of some 100,000s of files,
/// above real images; a larger TOC is EIO rather than an allocation the descriptor dictates.
pub const MAX_TOC: u64 = 64 << 20;

/// The largest decompressed TOC chunk. eStargz cuts files into 4 MiB chunks by default and
/// zstd:chunked into much smaller ones; a chunk that claims more is EIO.
pub const MAX_TOC_CHUNK: u64 = 64 << 20;

/// Read `r` to its end, but at most `cap` bytes: more is an error (a bomb, or a lie).
fn read_capped<R: Read>(r: R, cap: u64, what: &str) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.take(cap.saturating_add(1)).read_to_end(&mut out)?;
    if out.len() as u64 > cap {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{what} is larger than {cap} bytes"),
        ));
    }
    Ok(out)
}

/// The TOC JSON from the TOC region of an eStargz layer (a gzip member holding a tar entry).
pub fn estargz_toc_json(region: &[u8]) -> std::io::Result<Vec<u8>> {
    let gz = flate2::read::GzDecoder::new(region);
    let mut archive = tar::Archive::new(gz);
    for entry in archive.entries()? {
        let entry = entry?;
        if normalise(&entry.path_bytes()) == "stargz.index.json" {
            return read_capped(entry, MAX_TOC, "the eStargz TOC");
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "eStargz TOC region holds no stargz.index.json",
    ))
}

/// The TOC JSON from the zstd:chunked TOC frame (skippable frame header included or not).
pub fn zstd_chunked_toc_json(frame: &[u8]) -> std::io::Result<Vec<u8>> {
    let body = if frame.len() >= 8 && frame[..4] == [0x50, 0x2a, 0x4d, 0x18] {
        &frame[8..]
    } else {
        frame
    };
    read_capped(
        zstd::stream::read::Decoder::new(body)?,
        MAX_TOC,
        "the zstd:chunked TOC",
    )
}

/// Decompress one content chunk that should hold `len` bytes. An eStargz member may go on past
/// the chunk (tar padding, the next header): up to 64 KiB more are read (so the member's CRC is
/// checked), and never more, whatever the compressed bytes inflate to.
pub fn decompress_chunk(codec: Codec, data: &[u8], len: usize) -> std::io::Result<Vec<u8>> {
    let limit = (len as u64).saturating_add(64 << 10);
    let mut out = Vec::new();
    match codec {
        Codec::Gzip => flate2::read::MultiGzDecoder::new(data)
            .take(limit)
            .read_to_end(&mut out)?,
        Codec::Zstd => zstd::stream::read::Decoder::new(data)?
            .take(limit)
            .read_to_end(&mut out)?,
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_footers_and_times() {
        let mut f = vec![
            0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
        ];
        f.extend_from_slice(format!("{:016x}STARGZ", 12345).as_bytes());
        f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f.len(), 51);
        assert_eq!(estargz_toc_offset(&f), Some(12345));
        f[12] = b'X';
        assert_eq!(estargz_toc_offset(&f), None);
        assert_eq!(zstd_chunked_toc(Some("100:20:55:1"), None), Some((100, 20)));
        let mut z = vec![0u8; 64];
        z[..8].copy_from_slice(&7u64.to_le_bytes());
        z[8..16].copy_from_slice(&9u64.to_le_bytes());
        z[56..].copy_from_slice(b"GNUlInUx");
        assert_eq!(zstd_chunked_toc(None, Some(&z)), Some((7, 9)));
        assert_eq!(rfc3339_secs("2023-11-14T22:13:20Z"), 1_700_000_000);
        assert_eq!(rfc3339_secs("1970-01-01T00:00:00Z"), 0);
        assert_eq!(rfc3339_secs("garbage"), 0);
    }

    #[test]
    fn toc_entries_become_an_index() {
        let json = br#"{"version":1,"entries":[
            {"name":"etc/","type":"dir","mode":493},
            {"name":"etc/big","type":"reg","size":10,"offset":100,"chunkSize":6,"mode":420},
            {"name":"etc/big","type":"chunk","offset":150,"chunkOffset":6,"chunkSize":4},
            {"name":"etc/link","type":"hardlink","linkName":"etc/big"},
            {"name":"x","type":"symlink","linkName":"/etc/big"}]}"#;
        let idx = index_from_toc(json, Codec::Gzip, 300).unwrap();
        let big = idx.by_path["etc/big"];
        let c = &idx.toc_chunks[&big];
        assert_eq!((c[0].start, c[0].end, c[0].size), (100, 150, 6));
        assert_eq!((c[1].start, c[1].end, c[1].file_offset), (150, 300, 6));
        assert_eq!(idx.nlink[&big], 2);
        assert!(index_from_toc(b"{nope", Codec::Gzip, 0).is_err());
    }

    /// A TOC of 100,000 files (a `node_modules` layer) parses in n log n: each chunk's end is a
    /// binary search, not a scan of every other entry (which would be 10^10 steps here).
    #[test]
    fn a_toc_of_100000_files_parses() {
        let n = 100_000u64;
        let entries: Vec<serde_json::Value> = (0..n)
            .map(|i| {
                serde_json::json!({"name": format!("m/f{i:06}"), "type": "reg", "size": 1,
                                   "offset": 100 + 10 * (n - i)})
            })
            .collect();
        let json = serde_json::to_vec(&serde_json::json!({ "entries": entries })).unwrap();
        let idx = index_from_toc(&json, Codec::Gzip, 100 + 10 * (n + 1)).unwrap();
        assert_eq!(idx.dirs["m"].len(), n as usize);
        // Listed in reverse offset order: each chunk still ends where the next one starts.
        let c = &idx.toc_chunks[&idx.by_path["m/f000001"]];
        assert_eq!((c[0].start, c[0].end), (100 + 10 * (n - 1), 100 + 10 * n));
        let last = &idx.toc_chunks[&idx.by_path["m/f000000"]];
        assert_eq!(last[0].end, 100 + 10 * (n + 1));
    }

    #[test]
    fn toc_index_records_its_format() {
        let json =
            br#"{"entries":[{"name":"f","type":"reg","size":3,"offset":10,"endOffset":20}]}"#;
        let e = index_from_toc(json, Codec::Gzip, 30).unwrap();
        assert_eq!(e.format, Format::Estargz);
        let z = index_from_toc(json, Codec::Zstd, 30).unwrap();
        assert_eq!(z.format, Format::ZstdChunked);
        // zstd:chunked chunks end at `endOffset`; eStargz ones where the next starts.
        assert_eq!(z.toc_chunks[&z.by_path["f"]][0].end, 20);
        assert_eq!(e.toc_chunks[&e.by_path["f"]][0].end, 30);
    }
}
