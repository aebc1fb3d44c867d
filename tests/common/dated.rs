//! Images whose times are known (a config `created`, an `org.opencontainers.image.created`
//! annotation, both or neither), pushed through the `Registry` trait so the same builder seeds
//! the fake and a real registry; and a few helpers that drive the core (`Fs`) by path.

use std::time::SystemTime;

use bytes::Bytes;
use regfs::digest::sha256_digest;
use regfs::fs::{EntryOut, Fs, Ino, ROOT_INO};
use regfs::registry::{push_whole_blob, Registry};

use super::make_tar;

/// What [`push_dated`] pushed.
#[derive(Clone, Debug)]
pub struct Dated {
    pub manifest_digest: String,
    pub manifest_len: u64,
    pub config_digest: String,
    pub config_len: u64,
}

/// Push a one-layer image under `tag` (by digest when None). `created` goes into the config,
/// `annotation` into the manifest's annotations; `seed` makes the config (and so the image)
/// unique.
pub async fn push_dated(
    reg: &dyn Registry,
    repo: &str,
    tag: Option<&str>,
    created: Option<&str>,
    annotation: Option<&str>,
    seed: u64,
) -> Dated {
    let tar = make_tar(&[("etc/seed", seed.to_string().as_bytes())]);
    let mut config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"seed": seed.to_string()}},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&tar)]},
    });
    if let Some(c) = created {
        config["created"] = c.into();
    }
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = push_whole_blob(reg, repo, Bytes::from(config.clone()))
        .await
        .unwrap();
    let layer = push_whole_blob(reg, repo, Bytes::from(tar.clone()))
        .await
        .unwrap();
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer, "size": tar.len()}],
    });
    if let Some(a) = annotation {
        manifest["annotations"] = serde_json::json!({"org.opencontainers.image.created": a});
    }
    let body = serde_json::to_vec(&manifest).unwrap();
    let manifest_len = body.len() as u64;
    let reference = tag.map_or_else(|| sha256_digest(&body), str::to_string);
    let manifest_digest = reg
        .put_manifest(
            repo,
            &reference,
            "application/vnd.oci.image.manifest.v1+json",
            Bytes::from(body),
        )
        .await
        .unwrap();
    Dated {
        manifest_digest,
        manifest_len,
        config_digest,
        config_len: config.len() as u64,
    }
}

/// Look up `path` (components separated by `/`) from the root of the core: the last entry.
pub async fn lookup_path(fs: &Fs, path: &str) -> Result<EntryOut, i32> {
    let mut parent: Ino = ROOT_INO;
    let mut last = None;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        let e = fs.lookup(parent, part).await.map_err(|e| e.errno)?;
        parent = e.attr.ino;
        last = Some(e);
    }
    last.ok_or(libc::EINVAL)
}

/// The names `readdir` lists in `path`.
pub async fn list_path(fs: &Fs, path: &str) -> Vec<String> {
    let ino = match path {
        "" => ROOT_INO,
        p => lookup_path(fs, p).await.unwrap().attr.ino,
    };
    let entries = fs.readdir(ino).await.unwrap();
    entries.into_iter().map(|e| e.name).collect()
}

/// Seconds since the epoch.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}
