//! Memory on a real mount: the daemon's peak RSS (`VmHWM` of the regfs process) under access
//! patterns that used to grow it without bound. Asserts memory, never time.
//!
//! Every test mounts with `--cache-size 64MiB` and asserts `VmHWM <= 128 MiB` (cache size +
//! 64 MiB), the bound of issue 8 scope 5. The 1 GiB sizes are scaled down to 256 MiB so
//! each test takes seconds: the point is that data read or written is several times the cache,
//! and memory stays flat.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use regfs::digest::StreamingDigest;
use regfs::registry::{push_whole_blob, Registry};

const MIB: u64 = 1 << 20;

/// `--cache-size` of every mount here, and the bound on the daemon's peak RSS.
const CACHE: &str = "64MiB";
const BOUND: u64 = 128 * MIB;

/// Assert the daemon's peak RSS is within `BOUND`, naming the access pattern.
fn assert_bounded(m: &TestMount, what: &str) -> u64 {
    let hwm = vm_hwm(m.child.as_ref().unwrap().id());
    eprintln!("regfs VmHWM after {what}: {} MiB", hwm / MIB);
    assert!(
        hwm <= BOUND,
        "{what}: peak RSS (VmHWM) {} MiB > --cache-size 64 MiB + 64 MiB",
        hwm / MIB
    );
    hwm
}

/// Peak resident memory of process `pid`, in bytes.
fn vm_hwm(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/<pid>/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kib * 1024
}

/// `len` bytes that differ in every MiB (one random MiB, each copy stamped with its index), so
/// no two chunks are alike, made quickly.
fn big_blob(len: u64) -> Vec<u8> {
    let block = pseudo_random(MIB as usize, 77);
    let mut out = Vec::with_capacity(len as usize);
    for i in 0..len / MIB {
        let start = out.len();
        out.extend_from_slice(&block);
        out[start..start + 8].copy_from_slice(&i.to_le_bytes());
    }
    out
}

/// 64 threads of random 4 KiB - 1 MiB reads, each through its own handle, over a 256 MiB blob
/// (the issue says 1 GiB; scaled down) with `--cache-size 64MiB --chunk-size 1MiB`: peak RSS
/// stays under the cache size + 64 MiB. (Before the verifier copied its stash and gave up on
/// random access, each handle's stashed 4 KiB slices pinned whole chunks: 2 GB and climbing.)
#[test]
fn random_reads_on_a_large_blob_stay_within_the_cache_size() {
    let reg = TestRegistry::start();
    let client = Arc::new(reg.client());
    let data = Arc::new(big_blob(256 * MIB));
    let digest = rt().block_on(async {
        push_whole_blob(client.as_ref(), "mem/big", Bytes::from(data.to_vec()))
            .await
            .unwrap()
    });
    let m = TestMount::new(&reg.url(), &["--cache-size", CACHE, "--chunk-size", "1MiB"]);
    let path = m.p(&format!("mem/big/blobs/sha256/{}", &digest[7..]));
    let threads: Vec<_> = (0..64u64)
        .map(|t| {
            let (path, data) = (path.clone(), data.clone());
            std::thread::spawn(move || {
                let mut f = std::fs::File::open(&path).unwrap();
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                let mut next = || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                let mut buf = vec![0u8; MIB as usize];
                for _ in 0..6 {
                    let len = (4096 + next() % (MIB - 4096)) as usize;
                    let off = next() % (256 * MIB - len as u64);
                    f.seek(SeekFrom::Start(off)).unwrap();
                    f.read_exact(&mut buf[..len]).unwrap();
                    assert!(
                        buf[..len] == data[off as usize..off as usize + len],
                        "bytes at {off}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_bounded(&m, "64 threads of random reads");
}

/// Read `path` front to back in 1 MiB pieces; its sha256 digest ("sha256:...") and length.
fn sha256_streamed(path: &std::path::Path) -> (String, u64) {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = StreamingDigest::default();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let len = h.bytes;
    (h.finish(), len)
}

/// A sequential read, in 1 MiB pieces, of a 320 MiB blob (the issue says 1 GiB; scaled down,
/// still five times the cache) with `--cache-size 64MiB` and the default 1 MiB chunks: the
/// digest matches and peak RSS stays under the cache size + 64 MiB (read-ahead and the cache
/// evict behind the reader).
#[test]
fn a_sequential_read_of_a_large_blob_stays_within_the_cache_size() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let digest = rt().block_on(async {
        push_whole_blob(&client, "mem/seq", Bytes::from(big_blob(320 * MIB)))
            .await
            .unwrap()
    });
    let m = TestMount::new(&reg.url(), &["--cache-size", CACHE]);
    let path = m.p(&format!("mem/seq/blobs/sha256/{}", &digest[7..]));
    let (got, len) = sha256_streamed(&path);
    assert_eq!(len, 320 * MIB);
    assert_eq!(got, digest);
    assert_bounded(&m, "a sequential 320 MiB read");
    // Prefetched blocks took the block memory's slots, reused: never more slots touched than
    // there are (the cap plus a sixteenth), though five times the cache went through them.
    let slots = &m.control_stats()["cache"]["memory"]["slots"];
    let (count, touched) = (slots["count"].as_u64(), slots["touched"].as_u64());
    assert_eq!(count, Some(68), "{slots}");
    assert!(touched.is_some_and(|t| t > 0 && t <= 68), "{slots}");
}

/// Inflating a big file: a gzip layer whose one file is 256 MiB of a repeated 8 KiB pattern
/// (so the layer blob is about 1 MiB; the issue says 1 GiB, scaled down), read through
/// `rootfs/` with `--cache-size 64MiB` and the default 4 MiB chunks: the contents match and
/// peak RSS stays under the cache size + 64 MiB (inflated bytes are not kept whole).
#[test]
fn inflating_a_large_file_stays_within_the_cache_size() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let pattern = pseudo_random(8 << 10, 5);
    let mut big = Vec::with_capacity(256 * MIB as usize);
    while (big.len() as u64) < 256 * MIB {
        big.extend_from_slice(&pattern);
    }
    let want = regfs::digest::sha256_digest(&big);
    let layer = Layer::gzip(&make_tar(&[("big.bin", &big)]));
    drop(big);
    assert!(layer.data.len() < 16 << 20, "{}", layer.data.len());
    rt().block_on(push_image(
        &client,
        "mem/inflate",
        Some("v1"),
        "amd64",
        &[layer],
    ));
    let m = TestMount::new(&reg.url(), &["--cache-size", CACHE]);
    let (got, len) = sha256_streamed(&m.p("mem/inflate/tags/v1/rootfs/big.bin"));
    assert_eq!(len, 256 * MIB);
    assert_eq!(got, want);
    assert_bounded(&m, "inflating a 256 MiB file");
}

/// `ls -R`: walk `dir` recursively with `read_dir` + `symlink_metadata` (no symlink followed);
/// the number of entries seen.
fn walk(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = std::fs::symlink_metadata(e.path()).unwrap();
        n += 1;
        if md.is_dir() {
            n += walk(&e.path());
        }
    }
    n
}

/// `ls -R` over 150 repositories (one tiny image each) with `--cache-size 64MiB`: every
/// repository is listed and peak RSS stays under the cache size + 64 MiB.
#[test]
fn ls_r_over_150_repositories_stays_within_the_cache_size() {
    let reg = TestRegistry::start();
    let client = Arc::new(reg.client());
    rt().block_on(async {
        let tiny = make_tar(&[("etc/f", b"x"), ("bin/g", b"y")]);
        let base = push_image(
            client.as_ref(),
            "lsr/r000",
            Some("v1"),
            "amd64",
            &[Layer::gzip(&tiny)],
        )
        .await;
        let layer = gzip(&tiny);
        let mut tasks = Vec::new();
        for i in 1..150 {
            let c = client.clone();
            let (body, config, layer) = (base.manifest.clone(), base.config.clone(), layer.clone());
            tasks.push(tokio::spawn(async move {
                let repo = format!("lsr/r{i:03}");
                push_whole_blob(&*c, &repo, Bytes::from(config))
                    .await
                    .unwrap();
                push_whole_blob(&*c, &repo, Bytes::from(layer))
                    .await
                    .unwrap();
                c.put_manifest(
                    &repo,
                    "v1",
                    "application/vnd.oci.image.manifest.v1+json",
                    body.into(),
                )
                .await
                .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let m = TestMount::new(&reg.url(), &["--cache-size", CACHE]);
    let entries = walk(&m.p("lsr"));
    assert_eq!(ls(&m.p("lsr")).len(), 150);
    assert!(entries >= 150 * 5, "{entries} entries");
    for i in [0, 77, 149] {
        assert_eq!(
            std::fs::read(m.p(&format!("lsr/r{i:03}/tags/v1/rootfs/etc/f"))).unwrap(),
            b"x"
        );
    }
    // A second walk reuses or releases what the first made: no growth beyond the bound either.
    assert_eq!(walk(&m.p("lsr")), entries);
    assert_bounded(
        &m,
        &format!("ls -R twice over 150 repositories ({entries} entries)"),
    );
}

/// 4 concurrent uploads of 64 MiB each (256 MiB in all, four times the cache; the default
/// `--upload-chunk-size`), written in 1 MiB pieces to `<repo>/uploads/NAME`, with
/// `--cache-size 64MiB`: each blob is in the registry under its digest and peak RSS stays under
/// the cache size + 64 MiB.
#[test]
fn four_concurrent_uploads_stay_within_the_cache_size() {
    let reg = TestRegistry::start();
    let m = TestMount::new(&reg.url(), &["--cache-size", CACHE]);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let repo = format!("mem/up{t}");
            std::fs::create_dir_all(m.p(&repo)).unwrap();
            let path = m.p(&format!("{repo}/uploads/f{t}"));
            std::thread::spawn(move || {
                let mut f = std::fs::File::create(&path).unwrap();
                let mut h = StreamingDigest::default();
                for i in 0..64u64 {
                    let piece = pseudo_random(MIB as usize, t * 1000 + i + 1);
                    h.update(&piece);
                    f.write_all(&piece).unwrap();
                }
                f.sync_all().ok();
                drop(f);
                (repo, h.finish())
            })
        })
        .collect();
    let client = reg.client();
    for t in threads {
        let (repo, digest) = t.join().unwrap();
        assert_eq!(
            reg.curl("HEAD", &format!("/v2/{repo}/blobs/{digest}")).0,
            200,
            "{repo} {digest}"
        );
        let size = rt().block_on(client.blob_size(&repo, &digest)).unwrap();
        assert_eq!(size, 64 * MIB);
    }
    assert_bounded(&m, "4 concurrent 64 MiB uploads");
}
