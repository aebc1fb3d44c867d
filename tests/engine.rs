//! Core tier: the read engine by counting. A cold random read fetches one chunk; a sequential
//! reader's requests grow (longer ones from a near registry); many readers of one blob share
//! its fetches and get the right bytes.
//! Default options (1 MiB chunks, 32 MiB readahead), the in-memory fake registry.

mod common;

use common::walk_ok;

use std::sync::Arc;

use regfs::digest::digest_hex;
use regfs::fs::{Fs, FsOptions, Ino};
use regfs::registry::fake::FakeRegistry;
use regfs::registry::Registry;

const MIB: u64 = 1 << 20;

fn blob(len: u64, seed: u64) -> Vec<u8> {
    common::pseudo_random(len as usize, seed)
}

/// A fake registry holding one blob of `len` bytes, and a core with default options.
fn setup(len: u64) -> (Arc<FakeRegistry>, Arc<Fs>, Vec<u8>, String) {
    setup_with(len, FsOptions::default())
}

/// [`setup`] with these options.
fn setup_with(len: u64, opts: FsOptions) -> (Arc<FakeRegistry>, Arc<Fs>, Vec<u8>, String) {
    let reg = Arc::new(FakeRegistry::new());
    let data = blob(len, len);
    let digest = reg.add_blob("e/one", data.clone());
    // A manifest makes the repository exist (the catalog lists repositories with manifests).
    let config = reg.add_blob(
        "e/one",
        br#"{"architecture":"amd64","os":"linux"}"#.to_vec(),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 37},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": len}],
    });
    reg.add_manifest("e/one", Some("v1"), manifest.to_string());
    let fs = Fs::new(reg.clone() as Arc<dyn Registry>, opts);
    let path = format!("e/one/blobs/sha256/{}", digest_hex(&digest));
    (reg, fs, data, path)
}

/// Read a handle front to back in `step`-byte reads, like `cat` through the kernel.
async fn read_through(fs: &Fs, ino: Ino, step: u32) -> Vec<u8> {
    let h = fs.open(ino, false).await.unwrap();
    let mut out = Vec::new();
    loop {
        let b = fs.read(h.fh, out.len() as u64, step).await.unwrap();
        if b.is_empty() {
            break;
        }
        out.extend_from_slice(&b);
    }
    fs.release(h.fh).await;
    out
}

#[tokio::test]
async fn a_cold_random_4k_read_fetches_one_chunk_at_most() {
    let (reg, fs, data, path) = setup(64 * MIB);
    let ino = walk_ok(&fs, &path).await;
    let h = fs.open(ino, false).await.unwrap();
    let off = 37 * MIB + 12345;
    let b = fs.read(h.fh, off, 4096).await.unwrap();
    assert_eq!(&b[..], &data[off as usize..off as usize + 4096]);
    let s = reg.stats().snapshot();
    assert_eq!(s.blob_gets, 1);
    assert!(s.blob_bytes <= MIB, "{} bytes fetched", s.blob_bytes);
    fs.release(h.fh).await;
}

/// The Range requests' sizes of one sequential read of a 96 MiB blob, front to back in 128 KiB
/// reads, from a registry whose blob answers lately came `latency` after they were asked (None:
/// nothing known yet). Checks the bytes, and that each byte was fetched once.
async fn sequential_request_sizes(latency: Option<std::time::Duration>) -> Vec<u64> {
    sequential_request_sizes_with(latency, FsOptions::default()).await
}

/// [`sequential_request_sizes`] with these options.
async fn sequential_request_sizes_with(
    latency: Option<std::time::Duration>,
    opts: FsOptions,
) -> Vec<u64> {
    let (reg, fs, data, path) = setup_with(96 * MIB, opts);
    if let Some(l) = latency {
        reg.stats().saw_blob_latency(l);
    }
    let ino = walk_ok(&fs, &path).await;
    assert!(read_through(&fs, ino, 128 * 1024).await == data);
    // Let prefetches that raced the last reads land before counting.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let sizes: Vec<u64> = reg.blob_ranges().iter().map(|&(s, e)| e - s + 1).collect();
    assert_eq!(
        sizes.iter().sum::<u64>(),
        96 * MIB,
        "each byte once: {sizes:?}"
    );
    sizes
}

#[tokio::test]
async fn a_sequential_readers_requests_grow_and_fetch_each_byte_once() {
    let sizes = sequential_request_sizes(None).await;
    assert!(
        sizes.iter().all(|&s| s <= regfs::config::MAX_REQUEST),
        "{sizes:?}"
    );
    // The window doubles: the first requests grow, and later ones are several chunks each.
    assert!(sizes[0] <= 2 * MIB, "{sizes:?}");
    assert!(sizes.iter().any(|&s| s >= 4 * MIB), "{sizes:?}");
    assert!(sizes.len() < 96, "fewer requests than chunks: {sizes:?}");
}

#[tokio::test]
async fn a_near_registry_is_asked_in_fewer_longer_requests() {
    // Blob answers came within a millisecond lately: a registry on loopback or a LAN.
    let near = sequential_request_sizes(Some(std::time::Duration::from_micros(800))).await;
    assert!(
        near.iter().all(|&s| s <= regfs::config::MAX_REQUEST_NEAR),
        "{near:?}"
    );
    assert!(
        near.iter().any(|&s| s > regfs::config::MAX_REQUEST),
        "longer than a far registry's requests: {near:?}"
    );
    // From a registry whose answers take 50 ms: at most 8 MiB, so several run in parallel.
    let far = sequential_request_sizes(Some(std::time::Duration::from_millis(50))).await;
    assert!(
        far.iter().all(|&s| s <= regfs::config::MAX_REQUEST),
        "{far:?}"
    );
    assert!(near.len() < far.len(), "{near:?} vs {far:?}");
}

#[tokio::test]
async fn with_a_disk_tier_a_near_registry_is_asked_in_requests_the_writer_has_room_for() {
    // Each prefetch waits for room in the disk writer's queue for all of its bytes: a 32 MiB
    // request waited for the whole queue to drain, and on a busy machine gave up and dropped
    // blocks. With a disk tier requests stay within a quarter of the queue, near or not.
    let dir = tempfile::tempdir().unwrap();
    let disk = regfs::disk::DiskCache::open(dir.path(), 1 << 30).unwrap();
    let opts = FsOptions {
        disk: Some(disk.clone()),
        ..FsOptions::default()
    };
    let near = Some(std::time::Duration::from_micros(800));
    let sizes = sequential_request_sizes_with(near, opts).await;
    assert!(
        sizes
            .iter()
            .all(|&s| s <= regfs::disk::MAX_REQUEST_WITH_DISK),
        "{sizes:?}"
    );
    assert!(
        sizes.contains(&regfs::disk::MAX_REQUEST_WITH_DISK),
        "{sizes:?}"
    );
    assert_eq!(disk.stats().blocks_dropped, 0);
}

#[tokio::test]
async fn sixty_four_readers_of_one_blob_share_its_fetches() {
    let (reg, fs, data, path) = setup(32 * MIB);
    let data = Arc::new(data);
    let ino = walk_ok(&fs, &path).await;
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let (fs, data) = (fs.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            // Different read sizes, so readers are at different places at once.
            let got = read_through(&fs, ino, 64 * 1024 * (1 + i % 4)).await;
            assert!(got == *data, "reader {i} got other bytes");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // The cache holds the whole blob (32 MiB of the default 256): every chunk came once.
    let s = reg.stats().snapshot();
    assert_eq!(s.blob_bytes, 32 * MIB, "{} requests", s.blob_gets);
    // And memory: what the cache holds never passes its cap.
    assert!(fs.cache_bytes() <= FsOptions::default().cache_size);
}
