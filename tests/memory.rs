//! Memory on a real mount: the daemon's peak RSS (`VmHWM` of the regfs process) under access
//! patterns that used to grow it without bound. Asserts memory, never time.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use regfs::registry::push_whole_blob;

const MIB: u64 = 1 << 20;

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

/// 16 threads of random 4 KiB - 1 MiB reads, each through its own handle, over a 256 MiB blob
/// with `--cache-size 64MiB`: peak RSS stays under the cache size + 64 MiB. (Before the
/// verifier copied its stash and gave up on random access, each handle's stashed 4 KiB slices
/// pinned whole chunks: 2 GB and climbing.)
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
    let m = TestMount::new(
        &reg.url(),
        &["--cache-size", "64MiB", "--chunk-size", "1MiB"],
    );
    let path = m.p(&format!("mem/big/blobs/sha256/{}", &digest[7..]));
    let pid = m.child.as_ref().unwrap().id();
    let threads: Vec<_> = (0..16u64)
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
                for _ in 0..12 {
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
    let hwm = vm_hwm(pid);
    eprintln!(
        "regfs VmHWM after 16 threads of random reads: {} MiB",
        hwm / MIB
    );
    assert!(
        hwm <= 128 * MIB,
        "peak RSS {} MiB > --cache-size 64 MiB + 64 MiB",
        hwm / MIB
    );
}
