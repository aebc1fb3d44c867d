//! Real tier: the disk tier in `--cache-dir` (a real registry, real mounts). Cross-mount reuse
//! with 0 bytes fetched and the kernel reading through passthrough, the cap, damaged files
//! refetched, chunk maps against a corrupting proxy, a second mount refused, and kill -9
//! during a fill. Everything is checked by counting requests, bytes and reads, never by time.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use regfs::digest::digest_hex;

const MIB: u64 = 1 << 20;

/// A registry holding one raw blob of `len` bytes in `disk/blob:v1`; (registry, data, digest).
fn registry_with_blob(len: usize, seed: u64) -> (TestRegistry, Vec<u8>, String) {
    let reg = TestRegistry::start();
    let data = pseudo_random(len, seed);
    let pushed = rt().block_on(push_image(
        &reg.client(),
        "disk/blob",
        Some("v1"),
        "amd64",
        &[Layer::raw(
            data.clone(),
            "application/vnd.oci.image.layer.v1.tar",
        )],
    ));
    let digest = pushed.layers[0].0.clone();
    (reg, data, digest)
}

fn blob_path(m: &TestMount, digest: &str) -> PathBuf {
    m.p(&format!("disk/blob/blobs/sha256/{}", digest_hex(digest)))
}

fn mount(addr: &str, cache: &Path, cap: &str) -> TestMount {
    let dir = cache.to_str().unwrap();
    TestMount::new(
        addr,
        &[
            "--chunk-size",
            "1MiB",
            "--cache-dir",
            dir,
            "--cache-dir-size",
            cap,
        ],
    )
}

/// Bytes of the files under `dir` (recursively).
fn du(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let m = e.metadata().unwrap();
        n += if m.is_dir() { du(&e.path()) } else { m.len() };
    }
    n
}

/// Every regular file under `dir` whose path contains `part`.
fn files_under(dir: &Path, part: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p, part));
        } else if p.to_string_lossy().contains(part) && !p.to_string_lossy().ends_with(".ok") {
            out.push(p);
        }
    }
    out
}

/// Flip one byte in the middle of `p` (keeping its length).
fn flip_middle(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let i = b.len() / 2 + 7;
    b[i] ^= 0xff;
    std::fs::write(p, b).unwrap();
}

fn read_at(p: &Path, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(p)?;
    f.seek(SeekFrom::Start(off))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

#[test]
fn a_new_mount_rereads_a_cached_blob_with_no_bytes_fetched_through_passthrough() {
    let (reg, data, digest) = registry_with_blob(8 << 20, 11);
    let cache = tempfile::tempdir().unwrap();
    {
        let m = mount(&reg.addr(), cache.path(), "64MiB");
        assert_eq!(sha256_file(&blob_path(&m, &digest)), digest);
        assert_eq!(m.stat("blob_bytes"), data.len() as u64);
    }
    let m = mount(&reg.addr(), cache.path(), "64MiB");
    assert_eq!(sha256_file(&blob_path(&m, &digest)), digest);
    let s = m.stats();
    assert_eq!(s["blob_bytes"], 0, "{s}");
    assert_eq!(s["disk_passthrough_opens"], 1, "{s}");
    // The kernel read the cached file itself: the daemon served no block of it.
    assert_eq!(s["disk_hits"], 0, "{s}");
    assert_eq!(s["disk_misses"], 0, "{s}");
    // `.regfs/stats` shows the same counters under cache.disk.
    let doc = m.control_stats();
    assert_eq!(doc["cache"]["disk"]["passthrough_opens"], 1, "{doc}");
    assert!(doc["cache"]["disk"]["bytes"].as_u64().unwrap() >= data.len() as u64);

    // A second mount on the same cache dir is refused with a clear error.
    let mnt = tempfile::tempdir().unwrap();
    let out = Command::new(regfs_bin())
        .args(["-f", &reg.addr()])
        .arg(mnt.path())
        .arg("--cache-dir")
        .arg(cache.path())
        .env("HOME", mnt.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another regfs mount"), "{err}");
}

#[test]
fn the_cap_holds_within_5_percent() {
    let (reg, data, digest) = registry_with_blob(48 << 20, 12);
    let cache = tempfile::tempdir().unwrap();
    let cap = 16 * MIB;
    {
        let m = mount(&reg.addr(), cache.path(), "16MiB");
        assert_eq!(sha256_file(&blob_path(&m, &digest)), digest);
        assert!(m.stat("disk_evictions") > 0);
        assert!(m.stat("disk_bytes") <= cap);
    }
    let used = du(&cache.path().join("blocks")) + du(&cache.path().join("blobs"));
    assert!(
        used <= cap + cap / 20,
        "{used} bytes on disk for a {cap} cap"
    );
    // The newest blocks are there: the tail of the blob reads with nothing fetched.
    let m = mount(&reg.addr(), cache.path(), "16MiB");
    let tail = read_at(&blob_path(&m, &digest), (40 << 20) + 5, 4096).unwrap();
    assert_eq!(tail, data[(40 << 20) + 5..(40 << 20) + 5 + 4096]);
    assert_eq!(m.stat("blob_bytes"), 0);
    assert!(m.stat("disk_hits") >= 1);
}

#[test]
fn damaged_block_files_and_whole_files_are_refetched() {
    let (reg, data, digest) = registry_with_blob(8 << 20, 13);
    let cache = tempfile::tempdir().unwrap();
    {
        // Part of the blob: blocks on disk, nothing assembled yet.
        let m = mount(&reg.addr(), cache.path(), "64MiB");
        let got = read_at(&blob_path(&m, &digest), 0, 3 << 20).unwrap();
        assert_eq!(got, data[..3 << 20]);
    }
    let blocks = files_under(&cache.path().join("blocks"), "");
    assert!(blocks.len() >= 3, "{blocks:?}");
    blocks.iter().for_each(|p| flip_middle(p));
    {
        let m = mount(&reg.addr(), cache.path(), "64MiB");
        assert_eq!(sha256_file(&blob_path(&m, &digest)), digest);
        let s = m.stats();
        assert!(s["disk_checksum_failures"].as_u64().unwrap() >= 3, "{s}");
        assert_eq!(
            s["blob_bytes"],
            data.len() as u64,
            "every damaged block refetched: {s}"
        );
    }
    // Now the blob is whole on disk. Damage it: the next mount neither passes it to the kernel
    // nor serves it, and reads the right bytes from the registry.
    let whole = files_under(&cache.path().join("blobs"), digest_hex(&digest));
    assert_eq!(whole.len(), 1, "{whole:?}");
    flip_middle(&whole[0]);
    let m = mount(&reg.addr(), cache.path(), "64MiB");
    assert_eq!(sha256_file(&blob_path(&m, &digest)), digest);
    let s = m.stats();
    assert_eq!(s["disk_passthrough_opens"], 0, "{s}");
    assert_eq!(s["disk_checksum_failures"], 1, "{s}");
    assert_eq!(s["blob_bytes"], data.len() as u64, "{s}");
}

#[test]
fn chunk_maps_turn_a_corrupting_registry_into_eio_never_wrong_bytes() {
    let (reg, data, digest) = registry_with_blob(12 << 20, 14);
    let cache = tempfile::tempdir().unwrap();
    {
        // A full read through the clean registry verifies the blob and records its map; a
        // 4 MiB cap keeps only the last few blocks.
        let m = mount(&reg.addr(), cache.path(), "4MiB");
        assert_eq!(sha256_file(&blob_path(&m, &digest)), digest);
    }
    let proxy = FaultProxy::start(
        "127.0.0.1",
        reg.port,
        ProxyRules {
            flip_blob_bytes: true,
            ..Default::default()
        },
    );
    let m = mount(&proxy.addr(), cache.path(), "4MiB");
    let p = blob_path(&m, &digest);
    let (mut eio, mut right) = (0usize, 0usize);
    for i in [5u64, 0, 9, 2, 11, 7, 1] {
        let off = i * MIB + 1000;
        match read_at(&p, off, 4096) {
            Ok(b) => {
                assert_eq!(b, data[off as usize..off as usize + 4096], "block {i}");
                right += 1;
            }
            Err(e) => {
                assert_eq!(errno(&e), libc::EIO, "block {i}: {e}");
                eio += 1;
            }
        }
    }
    let s = m.stats();
    assert!(
        eio >= 4,
        "evicted blocks fetched corrupt must fail: {eio} EIO, {right} right, {s}"
    );
    assert!(right >= 1, "cached blocks still read: {s}");
    assert!(
        s["disk_map_mismatches"].as_u64().unwrap() >= eio as u64,
        "{s}"
    );
    assert!(
        proxy
            .counts
            .flipped
            .load(std::sync::atomic::Ordering::SeqCst)
            >= eio
    );
}

#[test]
fn kill_9_during_a_fill_leaves_nothing_that_reads_back_wrong() {
    let (reg, data, digest) = registry_with_blob(32 << 20, 15);
    let cache = tempfile::tempdir().unwrap();
    {
        let mut m = mount(&reg.addr(), cache.path(), "64MiB");
        let p = blob_path(&m, &digest);
        let reader = std::thread::spawn(move || {
            let _ = std::fs::read(p);
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while m.stat("disk_blocks_written") < 4 {
            assert!(Instant::now() < deadline, "no block written");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut child = m.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(m.path())
            .status();
        reader.join().unwrap();
    }
    let m = mount(&reg.addr(), cache.path(), "64MiB");
    assert_eq!(std::fs::read(blob_path(&m, &digest)).unwrap(), data);
    assert_eq!(m.stat("disk_checksum_failures"), 0);
}
