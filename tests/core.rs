//! Core tier: the filesystem core against the in-memory fake registry. Fast, no kernel, no
//! network; covers the tree, laziness by request counts, and every fault the failure-injecting
//! wrapper can inject.

mod common;

use std::sync::Arc;

use common::walk;

use regfs::digest::{digest_hex, sha256_digest};
use regfs::fs::{Fs, FsOptions, Kind, ROOT_INO};
use regfs::registry::fake::FakeRegistry;
use regfs::registry::faulty::{Fault, FaultError, FaultyRegistry, Op};
use regfs::registry::Registry;

const KIB: u64 = 1024;

struct Img {
    manifest: String,
    config: Vec<u8>,
    config_digest: String,
    layer: Vec<u8>,
    layer_digest: String,
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
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

fn add_image(reg: &FakeRegistry, repo: &str, tag: &str, layer_len: usize) -> Img {
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let config_digest = reg.add_blob(repo, config.clone());
    let layer = pseudo_random(layer_len, layer_len as u64 + 3);
    let layer_digest = reg.add_blob(repo, layer.clone());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer.len()}],
    })
    .to_string();
    let d = reg.add_manifest(repo, Some(tag), manifest.clone());
    Img {
        manifest: d,
        config,
        config_digest,
        layer,
        layer_digest,
    }
}

fn setup(chunk: u64) -> (Arc<FakeRegistry>, Arc<Fs>) {
    setup_ttl(chunk, regfs::config::DEFAULT_METADATA_TTL)
}

fn setup_ttl(chunk: u64, ttl: std::time::Duration) -> (Arc<FakeRegistry>, Arc<Fs>) {
    let reg = Arc::new(FakeRegistry::new());
    let fs = Fs::new(
        reg.clone() as Arc<dyn Registry>,
        FsOptions {
            chunk_size: chunk,
            cache_size: 64 * chunk,
            metadata_ttl: ttl,
            ..FsOptions::default()
        },
    );
    (reg, fs)
}

/// Like [`setup_ttl`], with the core talking to the fake through a failure-injecting wrapper.
fn setup_faulty(
    chunk: u64,
    ttl: std::time::Duration,
) -> (Arc<FakeRegistry>, Arc<FaultyRegistry>, Arc<Fs>) {
    let reg = Arc::new(FakeRegistry::new());
    let faults = Arc::new(FaultyRegistry::new(reg.clone()));
    let fs = Fs::new(
        faults.clone() as Arc<dyn Registry>,
        FsOptions {
            chunk_size: chunk,
            cache_size: 64 * chunk,
            metadata_ttl: ttl,
            // Faults are counted per request: no readahead requests beside the reader's own.
            readahead: 0,
            ..FsOptions::default()
        },
    );
    (reg, faults, fs)
}

/// Walk a path from the root with lookups; returns the inode.
async fn read_all(fs: &Fs, path: &str) -> Result<Vec<u8>, i32> {
    let ino = walk(fs, path).await?;
    let size = fs.getattr(ino).await.unwrap().attr.size;
    let h = fs.open(ino, false).await.map_err(|e| e.errno)?;
    let mut out = Vec::new();
    let mut off = 0u64;
    let result = loop {
        match fs.read(h.fh, off, 128 * 1024).await {
            Ok(b) if b.is_empty() => break Ok(out),
            Ok(b) => {
                off += b.len() as u64;
                out.extend_from_slice(&b);
                if off >= size {
                    // One more read to see EOF, as cat does.
                    continue;
                }
            }
            Err(e) => break Err(e.errno),
        }
    };
    fs.release(h.fh).await;
    result
}

async fn names(fs: &Fs, path: &str) -> Vec<String> {
    let ino = walk(fs, path).await.unwrap();
    let mut v: Vec<String> = fs
        .readdir(ino)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    v.sort();
    v
}

/// The layer files of a `layers/` directory (not the per-layer trees beside them).
async fn layer_files(fs: &Fs, path: &str) -> Vec<String> {
    names(fs, path)
        .await
        .into_iter()
        .filter(|n| n.contains('.'))
        .collect()
}

/// Chunks held by the core's cache, from the `user.regfs.stats` xattr.
async fn cache_chunks(fs: &Fs) -> u64 {
    let v = fs.getxattr(ROOT_INO, "user.regfs.stats").await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&v).unwrap();
    v["cache_chunks"].as_u64().unwrap()
}

/// Bytes copied to join reads that spanned two chunks, from `.regfs/stats`.
async fn joined(fs: &Fs) -> u64 {
    let doc = read_all(fs, ".regfs/stats").await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&doc).unwrap();
    v["bytes"]["joined"].as_u64().unwrap()
}

fn gets(reg: &FakeRegistry) -> u64 {
    reg.stats().snapshot().blob_gets
}

#[tokio::test]
async fn tree_layout_and_contents() {
    let (reg, fs) = setup(64 * KIB);
    let img = add_image(&reg, "debian/min", "bookworm", 10_000);
    assert_eq!(names(&fs, "").await, vec![".regfs", "debian"]);
    assert_eq!(
        names(&fs, "debian/min").await,
        vec!["blobs", "index.json", "oci-layout", "tags", "uploads"]
    );
    assert_eq!(
        names(&fs, "debian/min/tags/bookworm").await,
        vec!["config.json", "layers", "manifest.json", "rootfs"]
    );
    let layers = layer_files(&fs, "debian/min/tags/bookworm/layers").await;
    assert_eq!(
        layers,
        vec![format!(
            "00-{}.tar.gz",
            &digest_hex(&img.layer_digest)[..12]
        )]
    );
    assert_eq!(
        read_all(&fs, "debian/min/tags/bookworm/config.json")
            .await
            .unwrap(),
        img.config
    );
    let layer = read_all(
        &fs,
        &format!("debian/min/tags/bookworm/layers/{}", layers[0]),
    )
    .await
    .unwrap();
    assert_eq!(layer, img.layer);
    let m = read_all(&fs, "debian/min/tags/bookworm/manifest.json")
        .await
        .unwrap();
    assert_eq!(sha256_digest(&m), img.manifest);
    // blobs by digest, and the listing of what has been seen.
    let hex = digest_hex(&img.config_digest).to_string();
    assert_eq!(
        read_all(&fs, &format!("debian/min/blobs/sha256/{hex}"))
            .await
            .unwrap(),
        img.config
    );
    assert!(names(&fs, "debian/min/blobs/sha256").await.contains(&hex));
    // xattrs
    let tag = walk(&fs, "debian/min/tags/bookworm").await.unwrap();
    assert_eq!(
        &fs.getxattr(tag, "user.oci.digest").await.unwrap()[..],
        img.manifest.as_bytes()
    );
    assert_eq!(
        fs.getxattr(tag, "user.nope").await.unwrap_err().errno,
        libc::ENODATA
    );
    // kinds
    let cfg = walk(&fs, "debian/min/tags/bookworm/config.json")
        .await
        .unwrap();
    assert_eq!(fs.getattr(cfg).await.unwrap().attr.kind, Kind::File);
    assert_eq!(fs.open(cfg, true).await.unwrap_err().errno, libc::EROFS);
}

#[tokio::test]
async fn missing_names_are_enoent() {
    let (reg, fs) = setup(64 * KIB);
    add_image(&reg, "a/b", "v1", 100);
    for p in [
        "nope",
        "a/nope",
        "a/b/tags/v2",
        "a/b/tags/..",
        "a/b/tags/v1/nope",
        "UPPER",
        "a/b/blobs/sha256/abc",
    ] {
        assert_eq!(walk(&fs, p).await.unwrap_err(), libc::ENOENT, "{p}");
    }
    assert_eq!(
        walk(&fs, "a/b/tags/v1/config.json/x").await.unwrap_err(),
        libc::ENOTDIR
    );
}

#[tokio::test]
async fn listing_fetches_no_blobs_and_reads_are_chunked() {
    let (reg, fs) = setup(64 * KIB);
    let img = add_image(&reg, "lazy/one", "v1", (640 * KIB) as usize);
    let layers = layer_files(&fs, "lazy/one/tags/v1/layers").await;
    let path = format!("lazy/one/tags/v1/layers/{}", layers[0]);
    let ino = walk(&fs, &path).await.unwrap();
    assert_eq!(
        fs.getattr(ino).await.unwrap().attr.size,
        img.layer.len() as u64
    );
    // The tag's config is read for the directory's time; sizes come from descriptors.
    let config = img.config.len() as u64;
    assert_eq!(
        gets(&reg),
        1,
        "only the config: sizes come from descriptors"
    );

    let h = fs.open(ino, false).await.unwrap();
    let b = fs.read(h.fh, 300 * KIB, 4096).await.unwrap();
    assert_eq!(&b[..], &img.layer[300 * 1024..300 * 1024 + 4096]);
    assert_eq!(gets(&reg), 2, "4 KiB = one Range request for one chunk");
    assert_eq!(reg.stats().snapshot().blob_bytes, 64 * KIB + config);
    assert_eq!(
        joined(&fs).await,
        0,
        "a read within one chunk is a slice of it"
    );
    fs.release(h.fh).await;
    // Another handle (no readahead history) reading the same chunk: no request.
    let h = fs.open(ino, false).await.unwrap();
    let b = fs.read(h.fh, 300 * KIB + 4096, 4096).await.unwrap();
    assert_eq!(&b[..], &img.layer[300 * 1024 + 4096..300 * 1024 + 8192]);
    assert_eq!(gets(&reg), 2, "a cached chunk makes no request");
    fs.release(h.fh).await;
    // A read spanning two chunks fetches only the missing one.
    let h = fs.open(ino, false).await.unwrap();
    let b = fs.read(h.fh, 320 * KIB - 10, 20).await.unwrap();
    assert_eq!(&b[..], &img.layer[320 * 1024 - 10..320 * 1024 + 10]);
    assert_eq!(gets(&reg), 3);
    assert_eq!(reg.stats().snapshot().blob_bytes, 2 * 64 * KIB + config);
    assert_eq!(
        joined(&fs).await,
        20,
        "the only copy: joining the two pieces"
    );
    fs.release(h.fh).await;
}

#[tokio::test]
async fn concurrent_readers_share_one_fetch() {
    let (reg, fs) = setup(64 * KIB);
    let img = add_image(&reg, "c/one", "v1", (256 * KIB) as usize);
    let layers = layer_files(&fs, "c/one/tags/v1/layers").await;
    let ino = walk(&fs, &format!("c/one/tags/v1/layers/{}", layers[0]))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let fs = fs.clone();
        tasks.push(tokio::spawn(async move {
            let h = fs.open(ino, false).await.unwrap();
            let b = fs.read(h.fh, 1000 + i, 100).await.unwrap();
            fs.release(h.fh).await;
            b
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let b = t.await.unwrap();
        assert_eq!(&b[..], &img.layer[1000 + i..1100 + i]);
    }
    assert_eq!(
        gets(&reg),
        2,
        "the config (for the tag's time) and one shared fetch"
    );
}

#[tokio::test]
async fn sequential_reads_prefetch_ahead() {
    let (reg, fs) = setup(64 * KIB);
    let img = add_image(&reg, "s/one", "v1", (1024 * KIB) as usize);
    let layers = layer_files(&fs, "s/one/tags/v1/layers").await;
    let data = read_all(&fs, &format!("s/one/tags/v1/layers/{}", layers[0]))
        .await
        .unwrap();
    assert_eq!(data, img.layer);
    // 16 chunks, each fetched exactly once even with readahead racing the reader, in fewer
    // requests than chunks (the window grows; requests carry several chunks); and the config,
    // read for the tag's time.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let bytes = reg.stats().snapshot().blob_bytes;
    assert!((1024 * KIB..1088 * KIB).contains(&bytes), "{bytes} bytes");
    assert!(gets(&reg) < 16 + 1, "{} requests", gets(&reg));
}

#[tokio::test]
async fn registry_errors_become_errnos() {
    let cases = [
        (FaultError::NotFound, libc::ENOENT),
        (FaultError::Unauthorized, libc::EACCES),
        (FaultError::TooManyRequests, libc::EAGAIN),
        (FaultError::Server, libc::EIO),
    ];
    for (fault, errno) in cases {
        // TTL 0 so the tag listing is asked again and meets the fault.
        let (reg, faults, fs) = setup_faulty(64 * KIB, std::time::Duration::ZERO);
        add_image(&reg, "e/one", "v1", 1000);
        // A one-chunk layer (the config is already cached: it was read for the tag's time).
        let layers = layer_files(&fs, "e/one/tags/v1/layers").await;
        let file = walk(&fs, &format!("e/one/tags/v1/layers/{}", layers[0]))
            .await
            .unwrap();
        faults.inject(Op::BlobRange, Fault::Error(fault.clone()));
        let h = fs.open(file, false).await.unwrap();
        assert_eq!(
            fs.read(h.fh, 0, 4096).await.unwrap_err().errno,
            errno,
            "{fault:?}"
        );
        // Nothing bad was cached: the next read works.
        assert!(fs.read(h.fh, 0, 4096).await.is_ok(), "{fault:?}");

        let tags = walk(&fs, "e/one/tags").await.unwrap();
        faults.inject(Op::Tags, Fault::Error(fault.clone()));
        let got = fs.readdir(tags).await.unwrap_err().errno;
        assert_eq!(got, errno, "tags {fault:?}");
    }
}

#[tokio::test]
async fn manifest_faults() {
    let (reg, fs) = setup(64 * KIB);
    add_image(&reg, "m/one", "v1", 100);
    reg.add_manifest("m/one", Some("broken"), "{this is not json");
    reg.add_manifest(
        "m/one",
        Some("weird"),
        r#"{"schemaVersion":2,"mediaType":"application/x-unknown","config":{}}"#,
    );
    // A tag that claims a digest its bytes do not have.
    reg.add_manifest_raw(
        "m/one",
        "liar",
        &format!("sha256:{}", "1".repeat(64)),
        "application/vnd.oci.image.manifest.v1+json",
        br#"{"schemaVersion":2}"#,
    );
    for tag in ["broken", "weird", "liar"] {
        // A tag resolved by GET meets a lying digest at once; the others when listed.
        let e = match walk(&fs, &format!("m/one/tags/{tag}")).await {
            Ok(dir) => fs.readdir(dir).await.unwrap_err(),
            Err(errno) => {
                assert_eq!((tag, errno), ("liar", libc::EIO));
                continue;
            }
        };
        assert_eq!(e.errno, libc::EIO, "{tag}: {}", e.message);
        assert!(!e.message.is_empty());
    }
    // The good tag is unaffected.
    assert!(read_all(&fs, "m/one/tags/v1/config.json").await.is_ok());
}

#[tokio::test]
async fn truncated_refused_and_corrupt_bodies_are_eio_and_not_cached() {
    for fault in [Fault::Truncate, Fault::WholeBody, Fault::Corrupt] {
        let (reg, faults, fs) = setup_faulty(64 * KIB, regfs::config::DEFAULT_METADATA_TTL);
        add_image(&reg, "t/one", "v1", (200 * KIB) as usize);
        // A one-chunk blob not read yet (the config was, for the tag's time).
        let small = reg.add_blob("t/one", pseudo_random(1000, 5));
        let cfg = walk(&fs, &format!("t/one/blobs/sha256/{}", &small[7..]))
            .await
            .unwrap();
        let layers = layer_files(&fs, "t/one/tags/v1/layers").await;
        let layer = walk(&fs, &format!("t/one/tags/v1/layers/{}", layers[0]))
            .await
            .unwrap();
        for ino in [cfg, layer] {
            if ino == cfg && fault == Fault::WholeBody {
                continue; // the whole of a one-chunk blob is the asked range
            }
            if ino == layer && fault == Fault::Corrupt {
                continue; // one chunk of many cannot be checked alone: see the next test
            }
            faults.inject(Op::BlobRange, fault.clone());
            let h = fs.open(ino, false).await.unwrap();
            let before = cache_chunks(&fs).await;
            let e = fs.read(h.fh, 0, 4096).await.unwrap_err();
            assert_eq!(e.errno, libc::EIO, "{fault:?}: {}", e.message);
            assert_eq!(
                cache_chunks(&fs).await,
                before,
                "{fault:?} cached bad bytes"
            );
            assert!(fs.read(h.fh, 0, 4096).await.is_ok());
            fs.release(h.fh).await;
        }
    }
}

#[tokio::test]
async fn multi_chunk_digest_mismatch_evicts() {
    let (reg, faults, fs) = setup_faulty(64 * KIB, regfs::config::DEFAULT_METADATA_TTL);
    add_image(&reg, "d/one", "v1", (200 * KIB) as usize);
    let layers = layer_files(&fs, "d/one/tags/v1/layers").await;
    let path = format!("d/one/tags/v1/layers/{}", layers[0]);
    // The config, read for the tag's time, is the one chunk cached so far.
    let before = cache_chunks(&fs).await;
    // Corrupt one chunk: it has the right length, so only the whole-blob digest can tell.
    faults.inject(Op::BlobRange, Fault::Corrupt);
    let e = read_all(&fs, &path).await.unwrap_err();
    assert_eq!(e, libc::EIO);
    assert!(
        cache_chunks(&fs).await == before,
        "chunks of a mismatching blob are dropped"
    );
    // A clean retry succeeds.
    assert!(read_all(&fs, &path).await.is_ok());
}

#[tokio::test]
async fn registry_without_catalog_still_mounts() {
    let (reg, fs) = setup(64 * KIB);
    reg.disable_catalog();
    let img = add_image(&reg, "library/ubuntu", "22.04", 100);
    assert_eq!(names(&fs, "").await, vec![".regfs"], "only the control dir");
    // Known repositories can be looked up by path.
    assert_eq!(
        read_all(&fs, "library/ubuntu/tags/22.04/config.json")
            .await
            .unwrap(),
        img.config
    );
    // ...and then show in listings.
    assert_eq!(names(&fs, "").await, vec![".regfs", "library"]);
    assert_eq!(names(&fs, "library").await, vec!["ubuntu"]);
}

#[tokio::test]
async fn catalog_errors_other_than_absence_are_eio() {
    let (reg, faults, fs) = setup_faulty(64 * KIB, regfs::config::DEFAULT_METADATA_TTL);
    add_image(&reg, "x/y", "v1", 100);
    faults.inject(Op::Catalog, Fault::Error(FaultError::Server));
    assert_eq!(fs.readdir(ROOT_INO).await.unwrap_err().errno, libc::EIO);
    assert_eq!(names(&fs, "").await, vec![".regfs", "x"]);
}

#[tokio::test]
async fn reserved_names_and_nested_repositories() {
    let (reg, fs) = setup(64 * KIB);
    add_image(&reg, "app", "v1", 100);
    add_image(&reg, "app/tags", "v2", 100);
    add_image(&reg, "app/sub", "v3", 100);
    let n = names(&fs, "app").await;
    assert_eq!(
        n,
        vec![
            "_ns",
            "blobs",
            "index.json",
            "oci-layout",
            "sub",
            "tags",
            "uploads"
        ]
    );
    // `tags` is the tag directory of app; the nested repo app/tags is reached through _ns.
    assert_eq!(names(&fs, "app/tags").await, vec!["v1"]);
    assert_eq!(names(&fs, "app/_ns/tags/tags").await, vec!["v2"]);
    assert_eq!(names(&fs, "app/sub/tags").await, vec!["v3"]);
}

#[tokio::test]
async fn moved_tags_get_new_inodes_after_ttl() {
    let reg = Arc::new(FakeRegistry::new());
    let fs = Fs::new(
        reg.clone() as Arc<dyn Registry>,
        FsOptions {
            metadata_ttl: std::time::Duration::ZERO,
            ..FsOptions::default()
        },
    );
    let a = add_image(&reg, "mv/one", "latest", 100);
    let d1 = walk(&fs, "mv/one/tags/latest").await.unwrap();
    let b = add_image(&reg, "mv/one", "latest", 200);
    assert_ne!(a.manifest, b.manifest);
    let d2 = walk(&fs, "mv/one/tags/latest").await.unwrap();
    assert_ne!(d1, d2, "a moved tag is a new directory");
    assert_eq!(
        read_all(&fs, "mv/one/tags/latest/layers/00-".to_string().as_str())
            .await
            .unwrap_err(),
        libc::ENOENT
    );
    let layers = layer_files(&fs, "mv/one/tags/latest/layers").await;
    assert!(layers[0].contains(&digest_hex(&b.layer_digest)[..12]));
}

#[tokio::test]
async fn stats_xattr_is_json() {
    let (reg, fs) = setup(64 * KIB);
    add_image(&reg, "s/x", "v1", 100);
    read_all(&fs, "s/x/tags/v1/config.json").await.unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&fs.getxattr(ROOT_INO, "user.regfs.stats").await.unwrap()).unwrap();
    assert_eq!(v["blob_gets"], 1);
    assert!(v["cache_bytes"].as_u64().unwrap() > 0);
}
