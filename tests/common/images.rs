//! Test images: tar layers (plain, gzip, zstd), configs, manifests and indexes, pushed with
//! regfs's own registry client. Shared by the tests and by `examples/seed.rs` (the demo).

#![allow(dead_code)]

use std::io::Write;

use bytes::Bytes;
use regfs::digest::sha256_digest;
use regfs::registry::{push_whole_blob, Registry};

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tar archive holding `files` (path, contents).
pub fn make_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// A layer to push: its bytes and media type, plus its uncompressed tar for diff_ids.
pub struct Layer {
    pub data: Vec<u8>,
    pub media_type: &'static str,
    pub diff_id: String,
    /// Descriptor annotations (eStargz TOC digest, zstd:chunked TOC position).
    pub annotations: Vec<(String, String)>,
}

impl Layer {
    pub fn gzip(tar: &[u8]) -> Self {
        Layer {
            data: gzip(tar),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            diff_id: sha256_digest(tar),
            annotations: vec![],
        }
    }
    pub fn zstd(tar: &[u8]) -> Self {
        Layer {
            data: zstd(tar),
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd",
            diff_id: sha256_digest(tar),
            annotations: vec![],
        }
    }
    pub fn tar(tar: &[u8]) -> Self {
        Layer {
            data: tar.to_vec(),
            media_type: "application/vnd.oci.image.layer.v1.tar",
            diff_id: sha256_digest(tar),
            annotations: vec![],
        }
    }
    /// An opaque blob layer with an arbitrary media type.
    pub fn raw(data: Vec<u8>, media_type: &'static str) -> Self {
        Layer {
            diff_id: sha256_digest(&data),
            data,
            media_type,
            annotations: vec![],
        }
    }
}

/// What a pushed image is made of, for assertions.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub layers: Vec<(String, u64, String)>, // digest, size, media type
}

/// Push an image (config + layers + manifest) under `tag` (or by digest only when None).
pub async fn push_image(
    reg: &dyn Registry,
    repo: &str,
    tag: Option<&str>,
    arch: &str,
    layers: &[Layer],
) -> Pushed {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    }))
    .unwrap();
    let config_digest = push_whole_blob(reg, repo, Bytes::from(config.clone()))
        .await
        .unwrap();
    let mut descs = Vec::new();
    let mut out_layers = Vec::new();
    for l in layers {
        let d = push_whole_blob(reg, repo, Bytes::from(l.data.clone()))
            .await
            .unwrap();
        let mut desc =
            serde_json::json!({"mediaType": l.media_type, "digest": d, "size": l.data.len()});
        if !l.annotations.is_empty() {
            let map: serde_json::Map<String, serde_json::Value> = l
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().into()))
                .collect();
            desc["annotations"] = map.into();
        }
        descs.push(desc);
        out_layers.push((d, l.data.len() as u64, l.media_type.to_string()));
    }
    let manifest = serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let reference = tag
        .map(str::to_string)
        .unwrap_or_else(|| sha256_digest(&manifest));
    let manifest_digest = reg
        .put_manifest(
            repo,
            &reference,
            "application/vnd.oci.image.manifest.v1+json",
            Bytes::from(manifest.clone()),
        )
        .await
        .unwrap();
    Pushed {
        manifest,
        manifest_digest,
        config,
        config_digest,
        layers: out_layers,
    }
}

/// Push an index of `children` (platform string "os/arch[/variant]", image) under `tag`.
pub async fn push_index(
    reg: &dyn Registry,
    repo: &str,
    tag: &str,
    children: &[(&str, &Pushed)],
) -> (Vec<u8>, String) {
    let manifests: Vec<_> = children
        .iter()
        .map(|(plat, p)| {
            let parts: Vec<&str> = plat.split('/').collect();
            let mut platform = serde_json::json!({"os": parts[0], "architecture": parts[1]});
            if parts.len() > 2 {
                platform["variant"] = parts[2].into();
            }
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": p.manifest_digest,
                "size": p.manifest.len(),
                "platform": platform,
            })
        })
        .collect();
    let body = serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))
    .unwrap();
    let d = reg
        .put_manifest(
            repo,
            tag,
            "application/vnd.oci.image.index.v1+json",
            Bytes::from(body.clone()),
        )
        .await
        .unwrap();
    (body, d)
}

/// A 512-byte ustar header for a regular file.
fn file_header(path: &str, len: usize) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).unwrap();
    h.set_size(len as u64);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn pad512(v: &mut Vec<u8>) {
    let rem = v.len() % 512;
    if rem != 0 {
        v.resize(v.len() + 512 - rem, 0);
    }
}

/// RFC 3339 UTC time of a Unix time.
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// TOC entries (eStargz / zstd:chunked schema) for every entry of `tar`, with `offsets[i]` the
/// compressed (offset, end) of entry i's content when it has any.
fn toc_entries(
    tar: &[u8],
    offsets: &std::collections::HashMap<u64, (usize, usize)>,
) -> Vec<serde_json::Value> {
    use base64::Engine as _;
    let mut out = Vec::new();
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let h = entry.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => "dir",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "hardlink",
            tar::EntryType::Char => "char",
            tar::EntryType::Block => "block",
            tar::EntryType::Fifo => "fifo",
            _ => "reg",
        };
        let mut e = serde_json::json!({
            "name": name, "type": kind, "size": entry.size(),
            "modtime": rfc3339(h.mtime().unwrap_or(0)), "mode": h.mode().unwrap_or(0),
            "uid": h.uid().unwrap_or(0), "gid": h.gid().unwrap_or(0),
        });
        if let Some(l) = entry.link_name_bytes() {
            e["linkName"] = String::from_utf8_lossy(&l).into_owned().into();
        }
        let mut xattrs = serde_json::Map::new();
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                if let Some(k) = ext.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) {
                    xattrs.insert(
                        k.to_string(),
                        base64::engine::general_purpose::STANDARD
                            .encode(ext.value_bytes())
                            .into(),
                    );
                }
            }
        }
        if !xattrs.is_empty() {
            e["xattrs"] = xattrs.into();
        }
        if let Some(&(off, end)) = offsets.get(&entry.raw_file_position()) {
            e["offset"] = off.into();
            e["endOffset"] = end.into();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            e["digest"] = sha256_digest(&data).into();
        }
        out.push(e);
    }
    out
}

/// Where the content of each non-empty regular file of `tar` is: (start, len).
fn contents(tar: &[u8]) -> Vec<(u64, u64)> {
    let mut archive = tar::Archive::new(tar);
    let mut v = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        if entry.header().entry_type().is_file() && entry.size() > 0 {
            v.push((entry.raw_file_position(), entry.size()));
        }
    }
    v
}

/// `tar` re-laid as a seekable layer: the byte stream is unchanged (same diff_id), but every
/// file's content is its own compressed unit (gzip member or zstd frame).
fn seekable(
    tar: &[u8],
    compress: fn(&[u8]) -> Vec<u8>,
) -> (Vec<u8>, std::collections::HashMap<u64, (usize, usize)>) {
    let mut out = Vec::new();
    let mut offsets = std::collections::HashMap::new();
    let mut pos = 0usize;
    for (start, len) in contents(tar) {
        let (start, len) = (start as usize, len as usize);
        if start > pos {
            out.extend(compress(&tar[pos..start]));
        }
        let off = out.len();
        out.extend(compress(&tar[start..start + len]));
        offsets.insert(start as u64, (off, out.len()));
        pos = start + len;
    }
    if pos < tar.len() {
        out.extend(compress(&tar[pos..]));
    }
    (out, offsets)
}

/// An eStargz layer holding exactly `tar` (plus the TOC entry and footer).
pub fn estargz_of(tar: &[u8]) -> Layer {
    estargz_lying_about(tar, None)
}

/// The same, but the TOC claims a wrong digest for the file `lie` (if any).
pub fn estargz_lying_about(tar: &[u8], lie: Option<&str>) -> Layer {
    // The TOC goes before the end-of-archive blocks.
    let end = tar.len() - 1024;
    let (mut out, offsets) = seekable(&tar[..end], gzip);
    let toc_offset = out.len();
    let mut entries = toc_entries(tar, &offsets);
    for e in entries.iter_mut().filter(|e| e["name"].as_str() == lie) {
        e["digest"] = sha256_digest(b"not this file").into();
    }
    let toc = serde_json::to_vec(&serde_json::json!({"version": 1, "entries": entries})).unwrap();
    let mut member = file_header("stargz.index.json", toc.len());
    member.extend(&toc);
    pad512(&mut member);
    member.extend([0u8; 1024]);
    out.extend(gzip(&member));
    let mut footer = vec![
        0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
    ];
    footer.extend(format!("{toc_offset:016x}STARGZ").as_bytes());
    footer.extend([1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    out.extend(footer);
    let mut stream = tar[..end].to_vec();
    stream.extend(&member);
    Layer {
        data: out,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        diff_id: sha256_digest(&stream),
        annotations: vec![(
            "containerd.io/snapshot/stargz/toc.digest".into(),
            sha256_digest(&toc),
        )],
    }
}

/// A zstd:chunked layer holding exactly `tar`.
pub fn zstd_chunked_of(tar: &[u8]) -> Layer {
    fn skippable(out: &mut Vec<u8>, payload: &[u8]) -> usize {
        out.extend([0x50, 0x2a, 0x4d, 0x18]);
        out.extend((payload.len() as u32).to_le_bytes());
        let at = out.len();
        out.extend(payload);
        at
    }
    let (mut out, offsets) = seekable(tar, zstd);
    let toc = serde_json::to_vec(
        &serde_json::json!({"version": 1, "entries": toc_entries(tar, &offsets)}),
    )
    .unwrap();
    let toc_z = zstd(&toc);
    let toc_at = skippable(&mut out, &toc_z);
    let split_z = zstd(b"");
    let split_at = skippable(&mut out, &split_z);
    let mut footer = Vec::new();
    for v in [
        toc_at as u64,
        toc_z.len() as u64,
        toc.len() as u64,
        1,
        split_at as u64,
        split_z.len() as u64,
        0,
    ] {
        footer.extend(v.to_le_bytes());
    }
    footer.extend(b"GNUlInUx");
    skippable(&mut out, &footer);
    Layer {
        data: out,
        media_type: "application/vnd.oci.image.layer.v1.tar+zstd",
        diff_id: sha256_digest(tar),
        annotations: vec![
            (
                "io.github.containers.zstd-chunked.manifest-position".into(),
                format!("{toc_at}:{}:{}:1", toc_z.len(), toc.len()),
            ),
            (
                "io.github.containers.zstd-chunked.manifest-checksum".into(),
                sha256_digest(&toc_z),
            ),
        ],
    }
}

/// The files both tiers build eStargz and zstd:chunked layers from: 16 files of 200,000
/// incompressible bytes under `usr/lib/` (see [`seekable_tar`]).
pub fn seekable_bulk() -> Vec<(String, Vec<u8>)> {
    (0..16)
        .map(|i| {
            (
                format!("usr/lib/blob{i:02}"),
                pseudo_random(200_000, i + 300),
            )
        })
        .collect()
}

/// A tar of `bulk`, then `etc/os-release` (`ID=seekable`), then `extra`.
pub fn seekable_tar(bulk: &[(String, Vec<u8>)], extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut files: Vec<(&str, &[u8])> = bulk
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    files.push(("etc/os-release", b"ID=seekable\n"));
    files.extend_from_slice(extra);
    make_tar(&files)
}
