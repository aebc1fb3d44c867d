//! Fuzz entry points: one function per target, each feeding untrusted bytes to a regfs parser the
//! way the daemon does, then using what it got back. Shared by the cargo-fuzz targets
//! (fuzz/fuzz_targets/*.rs, nightly) and by tests/fuzz_regressions.rs (stable), which replays every
//! crash input found so far through the same functions.
//!
//! A function returns normally for any input the code handles (an `Err` is a fine answer); it
//! panics only when regfs panics, or when an oracle fails: data read back from a gzip checkpoint
//! or a zstd frame start differs from a full decompression, or a built index does not survive its
//! own `--cache-dir` round trip.

use std::io::{Cursor, Read};
use std::time::Instant;

use regfs::layer::{gzip, toc, zstd as zframes, Codec, LayerIndex, Merged};
use regfs::manifest;
use regfs::registry::auth::{parse_challenges, TokenResponse};
use regfs::registry::credentials;
use regfs::registry::http::next_link;
use reqwest::header::{HeaderMap, HeaderValue, LINK};
use reqwest::Url;

/// Most uncompressed bytes a decompression oracle looks at (inputs are small; bombs stop here).
const OUT_CAP: u64 = 8 << 20;
/// Bytes compared after each checkpoint or frame start.
const SPAN: u64 = 64 * 1024;
/// Checkpoints or frame starts tried per input.
const STARTS: usize = 16;

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Every target: its name (the fuzz_targets file and the corpus / regressions directory) and
/// its entry point.
pub const TARGETS: &[(&str, Target)] = &[
    ("manifest", manifest),
    ("www_authenticate", www_authenticate),
    ("link", link),
    ("credentials", credentials),
    ("tar_index", tar_index),
    ("gzip_index", gzip_index),
    ("zstd_frames", zstd_frames),
    ("estargz", estargz),
    ("zstd_chunked", zstd_chunked),
    ("toc_json", toc_json),
    ("index_bytes", index_bytes),
];

fn split_first(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((b, rest)) => (*b, rest),
        None => (0, data),
    }
}

/// The first line (a parameter) and the rest (the document).
fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&[], data),
    }
}

/// Use an index as the mount would: hardlinks resolved, merged into a tree, stored and reloaded.
fn exercise(idx: &LayerIndex) {
    let _ = idx.memory();
    for i in 0..idx.entries.len().min(4096) {
        let _ = idx.resolve(i);
    }
    let _ = Merged::build(&[idx, idx]);
    let back = LayerIndex::from_bytes(&idx.to_bytes()).expect("a built index reloads");
    assert_eq!(
        back.entries.len(),
        idx.entries.len(),
        "reloaded entry count"
    );
    assert_eq!(back.by_path, idx.by_path, "reloaded paths");
    for (at, _) in idx.checkpoints.iter().zip(0..STARTS) {
        let _ = gzip::nearest(&idx.checkpoints, at.out);
    }
    for (at, _) in idx.zstd_frames.iter().zip(0..STARTS) {
        let _ = zframes::nearest(&idx.zstd_frames, at.out);
    }
}

/// Manifests and indexes (`manifest::parse` under each Content-Type), and a config's diff_ids.
pub fn manifest(data: &[u8]) {
    const TYPES: &[&str] = &[
        manifest::OCI_MANIFEST,
        manifest::OCI_INDEX,
        manifest::DOCKER_MANIFEST,
        manifest::DOCKER_LIST,
        "",
        "application/json",
        "application/octet-stream; charset=binary",
        "text/html",
    ];
    let (sel, body) = split_first(data);
    let ct = TYPES[usize::from(sel) % TYPES.len()];
    if let Ok(parsed) = manifest::parse(ct, body) {
        let descs = match parsed {
            manifest::Parsed::Image { config, mut layers } => {
                layers.push(config);
                layers
            }
            manifest::Parsed::Index { manifests } => manifests,
        };
        for (i, d) in descs.iter().enumerate() {
            let _ = manifest::layer_file_name(i, descs.len(), d);
            let _ = manifest::layer_extension(&d.media_type);
            let _ = regfs::digest::is_sha256_digest(&d.digest);
            let _ = regfs::digest::digest_hex(&d.digest);
            if let Some(p) = &d.platform {
                let _ = p.dir_name();
            }
        }
    }
    let _ = manifest::media_type_of(body);
    let _ = manifest::sniff_media_type(body);
    // A config: the daemon reads `rootfs.diff_ids[i]` from it.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        for i in 0..4 {
            let _ = v["rootfs"]["diff_ids"][i].as_str();
        }
    }
}

/// `WWW-Authenticate` challenges, and the token endpoint's JSON answer.
pub fn www_authenticate(data: &[u8]) {
    let header = String::from_utf8_lossy(data);
    for c in parse_challenges(&header) {
        for p in ["realm", "service", "scope", "error"] {
            let _ = c.param(p);
        }
    }
    if let Ok(t) = serde_json::from_slice::<TokenResponse>(data) {
        let _ = t.into_token(Instant::now());
    }
}

/// `Link` headers (one value per line), resolved against a `_catalog` URL.
pub fn link(data: &[u8]) {
    let base = Url::parse("https://registry.example:5000/v2/_catalog?n=100").expect("url");
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            headers.append(LINK, v);
        }
    }
    let _ = next_link(&headers, &base);
}

/// docker `config.json` / containers `auth.json`: the first line is the host looked up.
pub fn credentials(data: &[u8]) {
    let (host, text) = split_line(data);
    let host = String::from_utf8_lossy(host);
    let host = if host.is_empty() {
        "registry.example:5000"
    } else {
        &host
    };
    let _ = credentials::lookup_text_no_helpers(text, host);
}

/// A plain tar layer, indexed both ways the daemon does (streamed, and by seeking).
pub fn tar_index(data: &[u8]) {
    if let Ok(idx) = LayerIndex::build(data) {
        exercise(&idx);
    }
    let mut archive = tar::Archive::new(Cursor::new(data));
    if let Ok(entries) = archive.entries_with_seek() {
        if let Ok(idx) = LayerIndex::from_entries(entries) {
            exercise(&idx);
        }
    }
}

/// Compare `got` (read from a restart point) with `full[out..]`. `complete`: the full pass
/// succeeded, so the restart must deliver as many bytes as it had.
fn same_as_full(full: &[u8], out: u64, got: &[u8], complete: bool, what: &str) {
    let want = full.get(out as usize..).unwrap_or(&[]);
    let want = &want[..want.len().min(SPAN as usize)];
    let n = got.len().min(want.len());
    assert!(got[..n] == want[..n], "{what} at {out}: different bytes");
    if complete {
        assert_eq!(got.len(), want.len(), "{what} at {out}: short read");
    }
}

/// A gzip layer: inflated once by the checkpointing `Indexer` (and its tar indexed), then read
/// again from each recorded checkpoint, which must give the same bytes.
pub fn gzip_index(data: &[u8]) {
    let (sel, data) = split_first(data);
    let spacing = 1u64 << (sel % 20);
    let Ok(mut ix) = gzip::Indexer::new(data, spacing) else {
        return;
    };
    let mut full = Vec::new();
    let complete =
        (&mut ix).take(OUT_CAP).read_to_end(&mut full).is_ok() && (full.len() as u64) < OUT_CAP;
    let checkpoints = std::mem::take(&mut ix.checkpoints);
    for cp in checkpoints.iter().take(STARTS) {
        let from = gzip::FromCheckpoint::<&[u8]>::source_offset(Some(cp)) as usize;
        assert!(from <= data.len(), "checkpoint past the input");
        let mut got = Vec::new();
        match gzip::FromCheckpoint::new(&data[from..], Some(cp)) {
            Ok(r) => {
                let ok = r.take(SPAN).read_to_end(&mut got).is_ok();
                same_as_full(&full, cp.out, &got, complete && ok, "gzip checkpoint");
                assert!(
                    ok || !complete,
                    "gzip checkpoint at {}: read failed",
                    cp.out
                );
            }
            Err(e) => assert!(!complete, "gzip checkpoint at {}: {e}", cp.out),
        }
    }
    if let Ok(mut idx) = LayerIndex::build(&full[..]) {
        idx.checkpoints = checkpoints;
        exercise(&idx);
    }
}

/// A zstd layer: decompressed once by the `FrameIndexer` (and its tar indexed), then again from
/// each recorded frame start, which must give the same bytes.
pub fn zstd_frames(data: &[u8]) {
    let (sel, data) = split_first(data);
    let spacing = 1u64 << (sel % 20);
    let mut ix = zframes::FrameIndexer::new(data, spacing);
    let mut full = Vec::new();
    let complete =
        (&mut ix).take(OUT_CAP).read_to_end(&mut full).is_ok() && (full.len() as u64) < OUT_CAP;
    let frames = std::mem::take(&mut ix.frames);
    for f in frames.iter().take(STARTS) {
        assert!(f.input as usize <= data.len(), "frame start past the input");
        let mut got = Vec::new();
        match zstd::stream::read::Decoder::new(&data[f.input as usize..]) {
            Ok(r) => {
                let ok = r.take(SPAN).read_to_end(&mut got).is_ok();
                same_as_full(&full, f.out, &got, complete && ok, "zstd frame");
                assert!(ok || !complete, "zstd frame at {}: read failed", f.out);
            }
            Err(e) => assert!(!complete, "zstd frame at {}: {e}", f.out),
        }
    }
    if let Ok(mut idx) = LayerIndex::build(&full[..]) {
        idx.zstd_frames = frames;
        exercise(&idx);
    }
}

/// Decompress (bounded) the chunks an index names, as reads would.
fn read_chunks(idx: &LayerIndex, data: &[u8]) {
    for chunks in idx.toc_chunks.values().take(STARTS) {
        for c in chunks.iter().take(4) {
            let (Ok(s), Ok(e)) = (usize::try_from(c.start), usize::try_from(c.end)) else {
                continue;
            };
            if let Some(raw) = data.get(s..e) {
                // The length a read would ask: the chunk's own size, bounded here.
                let len = usize::try_from(c.size).unwrap_or(0).min(1 << 20);
                let _ = toc::decompress_chunk(c.codec, raw, len);
            }
        }
    }
}

/// An eStargz layer: the footer, the TOC region it points to, the TOC, and the chunks. The
/// whole input is also tried as a TOC region, so the fuzzer need not forge a footer.
pub fn estargz(data: &[u8]) {
    let footer_len = toc::ESTARGZ_FOOTER as usize;
    if data.len() > footer_len {
        let body = data.len() - footer_len;
        if let Some(off) = toc::estargz_toc_offset(&data[body..]) {
            if let Some(region) = usize::try_from(off).ok().and_then(|o| data.get(o..body)) {
                if let Ok(json) = toc::estargz_toc_json(region) {
                    if let Ok(idx) = toc::index_from_toc(&json, Codec::Gzip, off) {
                        exercise(&idx);
                        read_chunks(&idx, data);
                    }
                }
            }
        }
    }
    if let Ok(json) = toc::estargz_toc_json(data) {
        if let Ok(idx) = toc::index_from_toc(&json, Codec::Gzip, data.len() as u64) {
            exercise(&idx);
        }
    }
}

/// A zstd:chunked layer: the position annotation (first line) or the footer, the TOC frame, the
/// TOC and the chunks. The rest of the input is also tried as the TOC frame itself.
pub fn zstd_chunked(data: &[u8]) {
    let (annotation, layer) = split_line(data);
    let annotation = std::str::from_utf8(annotation)
        .ok()
        .filter(|a| !a.is_empty());
    let footer_len = toc::ZSTD_CHUNKED_FOOTER as usize;
    let footer = (layer.len() > footer_len).then(|| &layer[layer.len() - footer_len..]);
    for (ann, foot) in [(annotation, None), (None, footer)] {
        let Some((off, len)) = toc::zstd_chunked_toc(ann, foot) else {
            continue;
        };
        let Some(end) = off.checked_add(len) else {
            continue;
        };
        let (Ok(s), Ok(e)) = (usize::try_from(off), usize::try_from(end)) else {
            continue;
        };
        let Some(frame) = layer.get(s..e) else {
            continue;
        };
        if let Ok(json) = toc::zstd_chunked_toc_json(frame) {
            if let Ok(idx) = toc::index_from_toc(&json, Codec::Zstd, off.saturating_sub(8)) {
                exercise(&idx);
                read_chunks(&idx, layer);
            }
        }
    }
    if let Ok(json) = toc::zstd_chunked_toc_json(layer) {
        if let Ok(idx) = toc::index_from_toc(&json, Codec::Zstd, layer.len() as u64) {
            exercise(&idx);
        }
    }
}

/// A TOC document alone (either codec, several `toc_end`s), and RFC 3339 times.
pub fn toc_json(data: &[u8]) {
    let (sel, json) = split_first(data);
    let codec = if sel & 1 == 0 {
        Codec::Gzip
    } else {
        Codec::Zstd
    };
    let toc_end = [0, 1, 4096, u64::MAX][usize::from(sel >> 1) % 4];
    if let Ok(idx) = toc::index_from_toc(json, codec, toc_end) {
        exercise(&idx);
    }
    if let Ok(s) = std::str::from_utf8(json) {
        let _ = toc::rfc3339_secs(s);
    }
}

/// A `--cache-dir` index file: loaded, used, and its gzip checkpoints primed over a short
/// deflate stream (a stored checkpoint is as untrusted as the file).
pub fn index_bytes(data: &[u8]) {
    let Some(idx) = LayerIndex::from_bytes(data) else {
        return;
    };
    exercise(&idx);
    let tail = [0x03u8, 0x00, 0x00, 0x00, 0x00, 0x00];
    for cp in idx.checkpoints.iter().take(STARTS) {
        let _ = gzip::FromCheckpoint::<&[u8]>::source_offset(Some(cp));
        if let Ok(r) = gzip::FromCheckpoint::new(&tail[..], Some(cp)) {
            let _ = r.take(SPAN).read_to_end(&mut Vec::new());
        }
    }
}
