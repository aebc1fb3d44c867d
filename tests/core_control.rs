//! Core tier: the control directory `.regfs/` (stats, config, version) and `user.regfs.cached`,
//! against the fake registry; the counters are checked against a known sequence of reads.

mod common;

use std::sync::Arc;

use common::walk_ok;

use regfs::digest::digest_hex;
use regfs::fs::{Fs, FsOptions, Ino, Kind, ROOT_INO};
use regfs::registry::fake::FakeRegistry;
use regfs::registry::Registry;

const CHUNK: u64 = 64 * 1024;

fn setup() -> (Arc<FakeRegistry>, Arc<Fs>) {
    let reg = Arc::new(FakeRegistry::new());
    let fs = Fs::new(
        reg.clone() as Arc<dyn Registry>,
        FsOptions {
            chunk_size: CHUNK,
            cache_size: 64 * CHUNK,
            effective_config: serde_json::json!({"registry": "http://127.0.0.1:1/", "cache_size": 64 * CHUNK}),
            ..FsOptions::default()
        },
    );
    (reg, fs)
}

/// Open, read to the end, return the bytes and whether the open asked for direct I/O.
async fn read_all(fs: &Fs, ino: Ino) -> (Vec<u8>, bool) {
    let h = fs.open(ino, false).await.unwrap();
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let b = fs.read(h.fh, out.len() as u64, 128 * 1024).await.unwrap();
        if b.is_empty() {
            break;
        }
        out.extend_from_slice(&b);
    }
    fs.release(h.fh).await;
    (out, h.direct_io)
}

async fn stats(fs: &Fs) -> serde_json::Value {
    let ino = walk_ok(fs, ".regfs/stats").await;
    serde_json::from_slice(&read_all(fs, ino).await.0).unwrap()
}

#[tokio::test]
async fn the_control_dir_is_listed_and_holds_three_files() {
    let (reg, fs) = setup();
    reg.add_manifest("app", Some("v1"), r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#);
    let root: Vec<_> = fs.readdir(ROOT_INO).await.unwrap();
    let names: Vec<&str> = root.iter().map(|e| e.name.as_str()).collect();
    assert!(
        names.contains(&".regfs") && names.contains(&"app"),
        "{names:?}"
    );
    let dir = fs.lookup(ROOT_INO, ".regfs").await.unwrap();
    assert_eq!(dir.attr.kind, Kind::Dir);
    assert_eq!(dir.attr.perm, 0o555);
    let mut files: Vec<String> = fs
        .readdir(dir.attr.ino)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    files.sort();
    assert_eq!(files, ["config", "stats", "version"]);
    // Never a repository: looking it up asks the registry nothing.
    assert_eq!(reg.stats().snapshot().tag_pages, 0);
    assert_eq!(
        fs.lookup(ROOT_INO, ".regfsx").await.unwrap_err().errno,
        libc::ENOENT
    );

    for (name, want) in [("version", None), ("config", Some("registry"))] {
        let e = fs.lookup(dir.attr.ino, name).await.unwrap();
        assert_eq!((e.attr.kind, e.attr.perm), (Kind::File, 0o444));
        assert!(e.ttl.is_zero(), "sizes change: the kernel must ask again");
        let (bytes, direct) = read_all(&fs, e.attr.ino).await;
        assert!(direct, "control files are read with direct I/O");
        assert_eq!(
            e.attr.size,
            bytes.len() as u64,
            "{name}: ls -l shows the size"
        );
        match want {
            None => assert_eq!(
                String::from_utf8(bytes).unwrap(),
                format!("regfs {}\n", env!("CARGO_PKG_VERSION"))
            ),
            Some(key) => {
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(v[key], "http://127.0.0.1:1/");
            }
        }
    }
    // Read-only, like the rest of the tree.
    let stats = walk_ok(&fs, ".regfs/stats").await;
    assert_eq!(fs.open(stats, true).await.unwrap_err().errno, libc::EROFS);
}

#[tokio::test]
async fn stats_count_a_known_sequence_of_reads() {
    let (reg, fs) = setup();
    let blob: Vec<u8> = (0..3 * CHUNK).map(|i| (i * 7 % 251) as u8).collect();
    let d = reg.add_blob("app", blob.clone());
    let path = format!("app/blobs/sha256/{}", digest_hex(&d));

    let s0 = stats(&fs).await;
    assert_eq!(s0["requests"]["blob_gets"], 0);
    assert_eq!(s0["cache"]["memory"]["misses"], 0);
    assert!(s0["cache"]["disk"].is_null());
    assert!(s0["rate_limit"].is_null());
    assert_eq!(s0["sources"], serde_json::json!([]));

    let ino = walk_ok(&fs, &path).await;
    let cached = || async {
        let v = fs.getxattr(ino, "user.regfs.cached").await.unwrap();
        String::from_utf8(v.to_vec())
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(cached().await, 0);
    assert!(fs
        .listxattr(ino)
        .await
        .unwrap()
        .contains(&"user.regfs.cached".to_string()));
    assert_eq!(read_all(&fs, ino).await.0, blob);
    assert_eq!(cached().await, 3 * CHUNK);
    let s1 = stats(&fs).await;
    // One Range request may carry several chunks.
    let gets = s1["requests"]["blob_gets"].as_u64().unwrap();
    assert!((1..=3).contains(&gets), "{gets} requests");
    assert_eq!(s1["bytes"]["fetched"], 3 * CHUNK);
    assert_eq!(s1["cache"]["memory"]["misses"], 3);
    assert_eq!(s1["cache"]["memory"]["bytes"], 3 * CHUNK);
    assert_eq!(s1["retries"], 0);

    // Read again: all hits, nothing fetched.
    assert_eq!(read_all(&fs, ino).await.0, blob);
    let s2 = stats(&fs).await;
    assert_eq!(s2["requests"]["blob_gets"], gets);
    assert_eq!(s2["cache"]["memory"]["misses"], 3);
    let hits = |s: &serde_json::Value| s["cache"]["memory"]["hits"].as_u64().unwrap();
    assert!(hits(&s2) >= hits(&s1) + 3, "{s1} {s2}");

    // The root's stats xattr keeps its shape.
    let x: serde_json::Value =
        serde_json::from_slice(&fs.getxattr(ROOT_INO, "user.regfs.stats").await.unwrap()).unwrap();
    assert_eq!(x["blob_gets"], gets);
    assert_eq!(x["cache_bytes"], 3 * CHUNK);
}

#[tokio::test]
async fn a_committed_upload_reports_what_the_cache_holds_of_it() {
    let (reg, fs) = setup();
    reg.add_blob("app", b"seed".to_vec());
    let uploads = walk_ok(&fs, "app/uploads").await;
    let (e, h) = fs.create(uploads, "f").await.unwrap();
    let data = vec![7u8; 1000];
    fs.write(h.fh, 0, &data).await.unwrap();
    fs.flush(h.fh).await.unwrap();
    fs.release(h.fh).await;
    let ino = e.attr.ino;
    let names = fs.listxattr(ino).await.unwrap();
    assert!(
        names.contains(&"user.regfs.cached".to_string()),
        "{names:?}"
    );
    let cached = || async {
        String::from_utf8(
            fs.getxattr(ino, "user.regfs.cached")
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap()
    };
    assert_eq!(cached().await, "0");
    assert_eq!(read_all(&fs, ino).await.0, data);
    assert_eq!(cached().await, "1000");
    // Not a blob: no such attribute.
    let version = walk_ok(&fs, ".regfs/version").await;
    assert_eq!(
        fs.getxattr(version, "user.regfs.cached")
            .await
            .unwrap_err()
            .errno,
        libc::ENODATA
    );
}
