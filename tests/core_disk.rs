//! Core tier: the disk tier under the core, against the in-memory fake behind FaultyRegistry.
//! A blob verified once gets a chunk map; later random reads of evicted blocks that come back
//! corrupt are EIO, in this mount and in a new one on the same disk tier; blocks on disk are
//! served without a request.

mod common;

use std::sync::Arc;

use common::walk_ok;

use regfs::digest::digest_hex;
use regfs::disk::DiskCache;
use regfs::fs::{Fs, FsOptions};
use regfs::registry::fake::FakeRegistry;
use regfs::registry::faulty::{Fault, FaultyRegistry, Op};
use regfs::registry::Registry;

const BLOCK: u64 = 64 << 10;

fn mount(reg: &Arc<FaultyRegistry>, disk: &Arc<DiskCache>) -> Arc<Fs> {
    Fs::new(
        reg.clone() as Arc<dyn Registry>,
        FsOptions {
            chunk_size: BLOCK,
            cache_size: 64 * BLOCK,
            readahead: 0,
            disk: Some(disk.clone()),
            ..FsOptions::default()
        },
    )
}

/// Read `len` bytes at `off` through a fresh handle.
async fn read_at(fs: &Fs, path: &str, off: u64, len: u32) -> Result<Vec<u8>, i32> {
    let h = fs.open(walk_ok(fs, path).await, false).await.unwrap();
    let r = fs.read(h.fh, off, len).await;
    fs.release(h.fh).await;
    r.map(|b| b.to_vec()).map_err(|e| e.errno)
}

fn blob_gets(reg: &FakeRegistry) -> u64 {
    reg.stats().snapshot().blob_gets
}

#[tokio::test]
async fn chunk_maps_make_corrupt_blocks_eio_in_this_mount_and_the_next() {
    let fake = Arc::new(FakeRegistry::new());
    let data: Vec<u8> = (0..8 * BLOCK as usize)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let digest = fake.add_blob("d/one", data.clone());
    let config = fake.add_blob("d/one", b"{}".to_vec());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": data.len()}],
    });
    fake.add_manifest("d/one", Some("v1"), manifest.to_string());
    let faults = Arc::new(FaultyRegistry::new(fake.clone()));
    let dir = tempfile::tempdir().unwrap();
    // Room for three blocks: most of the blob is evicted from disk after a full read.
    let disk = DiskCache::open(dir.path(), 3 * (BLOCK + 4096)).unwrap();
    let path = format!("d/one/blobs/sha256/{}", digest_hex(&digest));

    let fs = mount(&faults, &disk);
    let mut off = 0;
    let h = fs.open(walk_ok(&fs, &path).await, false).await.unwrap();
    while off < data.len() as u64 {
        let b = fs.read(h.fh, off, BLOCK as u32).await.unwrap();
        assert_eq!(b[..], data[off as usize..off as usize + b.len()]);
        off += b.len() as u64;
    }
    fs.release(h.fh).await;
    disk.flush();
    assert!(disk.stats().evictions >= 4);

    // This mount: its memory cache still holds the blob, so drop it through a new mount that
    // shares the disk tier, as a remount would.
    drop(fs);
    let fs = mount(&faults, &disk);
    let gets = blob_gets(&fake);
    // The last block is on disk: served with no request, even with a corruption queued.
    faults.inject(Op::BlobRange, Fault::Corrupt);
    let last = 7 * BLOCK + 100;
    let got = read_at(&fs, &path, last, 4096).await.unwrap();
    assert_eq!(got[..], data[last as usize..last as usize + 4096]);
    assert_eq!(blob_gets(&fake), gets);
    // Block 1 was evicted: fetched, corrupt, refused by its map.
    let e = read_at(&fs, &path, BLOCK + 100, 4096).await.unwrap_err();
    assert_eq!(e, libc::EIO);
    assert_eq!(disk.stats().map_mismatches, 1);
    // Nothing bad was cached: a clean fetch reads right.
    let got = read_at(&fs, &path, BLOCK + 100, 4096).await.unwrap();
    assert_eq!(got[..], data[BLOCK as usize + 100..BLOCK as usize + 4196]);
}
