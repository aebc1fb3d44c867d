//! Test images: tar layers (plain, gzip, zstd), configs, manifests and indexes, pushed with
//! regfs's own registry client. Shared by the tests and by `examples/seed.rs` (the demo).

#![allow(dead_code)]

use std::io::Write;

use bytes::Bytes;
use regfs::digest::sha256_digest;
use regfs::registry::Registry;

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
}

impl Layer {
    pub fn gzip(tar: &[u8]) -> Self {
        Layer {
            data: gzip(tar),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            diff_id: sha256_digest(tar),
        }
    }
    pub fn zstd(tar: &[u8]) -> Self {
        Layer {
            data: zstd(tar),
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd",
            diff_id: sha256_digest(tar),
        }
    }
    pub fn tar(tar: &[u8]) -> Self {
        Layer {
            data: tar.to_vec(),
            media_type: "application/vnd.oci.image.layer.v1.tar",
            diff_id: sha256_digest(tar),
        }
    }
    /// An opaque blob layer with an arbitrary media type.
    pub fn raw(data: Vec<u8>, media_type: &'static str) -> Self {
        Layer {
            diff_id: sha256_digest(&data),
            data,
            media_type,
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
    let config_digest = reg
        .push_blob(repo, Bytes::from(config.clone()))
        .await
        .unwrap();
    let mut descs = Vec::new();
    let mut out_layers = Vec::new();
    for l in layers {
        let d = reg
            .push_blob(repo, Bytes::from(l.data.clone()))
            .await
            .unwrap();
        descs.push(
            serde_json::json!({"mediaType": l.media_type, "digest": d, "size": l.data.len()}),
        );
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
