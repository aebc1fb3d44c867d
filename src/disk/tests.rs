//! Unit tests of the disk tier: round trips, damage, the cap, maps, assembly, the lock.

use super::*;

fn blob(len: usize, seed: u8) -> (Digest, Vec<u8>) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    (Digest::from(crate::digest::sha256_digest(&data)), data)
}

fn key(d: &Digest, size: usize, bs: u64, index: u64) -> BlockKey {
    BlockKey {
        digest: d.clone(),
        blob_size: size as u64,
        block_size: bs,
        index,
    }
}

fn piece(data: &[u8], bs: u64, i: u64) -> Bytes {
    let s = (i * bs) as usize;
    Bytes::copy_from_slice(&data[s..(s + bs as usize).min(data.len())])
}

fn sums(data: &[u8], bs: u64) -> Vec<[u8; 32]> {
    data.chunks(bs as usize).map(block::sha256).collect()
}

#[test]
fn blocks_round_trip_across_opens_and_damage_reads_as_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let (d, data) = blob(10_000, 1);
    let bs = 4096;
    {
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        for i in 0..3 {
            c.put(&key(&d, data.len(), bs, i), piece(&data, bs, i));
        }
        c.flush();
        assert_eq!(
            c.get(&key(&d, data.len(), bs, 2)).unwrap(),
            piece(&data, bs, 2)
        );
        // Another block size never mixes.
        assert!(c.get(&key(&d, data.len(), 8192, 0)).is_none());
    }
    let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(
        c.get(&key(&d, data.len(), bs, 0)).unwrap(),
        piece(&data, bs, 0)
    );
    // Flip a data byte of block 1: dropped, counted, a miss.
    let p = dir
        .path()
        .join(block_name(d.hex(), data.len() as u64, bs, 1));
    let mut f = std::fs::read(&p).unwrap();
    *f.last_mut().unwrap() ^= 1;
    std::fs::write(&p, f).unwrap();
    assert!(c.get(&key(&d, data.len(), bs, 1)).is_none());
    assert!(!p.exists());
    let s = c.stats();
    assert_eq!((s.hits, s.misses, s.checksum_failures), (1, 1, 1));
    // A block of the wrong length is never stored.
    c.put(&key(&d, data.len(), bs, 1), Bytes::from_static(b"short"));
    c.flush();
    assert!(c.get(&key(&d, data.len(), bs, 1)).is_none());
}

#[test]
fn a_second_open_of_the_same_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = DiskCache::open(dir.path(), 1 << 20).unwrap();
    let e = DiskCache::open(dir.path(), 1 << 20).unwrap_err();
    assert!(
        e.to_string().contains("in use by another regfs mount"),
        "{e}"
    );
    drop(a);
    DiskCache::open(dir.path(), 1 << 20).unwrap();
}

#[test]
fn the_cap_holds_and_least_recently_used_goes_first() {
    let dir = tempfile::tempdir().unwrap();
    let bs = 64 << 10;
    let (d, data) = blob(2 << 20, 2);
    let cap = 10 * on_disk(HEADER_LEN as u64 + bs);
    let c = DiskCache::open(dir.path(), cap).unwrap();
    let k = |i| key(&d, data.len(), bs, i);
    for i in 0..5 {
        c.put(&k(i), piece(&data, bs, i));
    }
    c.flush();
    assert!(c.get(&k(0)).is_some()); // 0 is now the most recent
    for i in 5..32 {
        c.put(&k(i), piece(&data, bs, i));
        c.flush();
    }
    let s = c.stats();
    assert!(s.bytes <= cap, "{} > {cap}", s.bytes);
    assert_eq!(s.entries, 10);
    assert!(s.evictions >= 22);
    assert!(c.get(&k(1)).is_none(), "old blocks went first");
    assert!(c.get(&k(31)).is_some());
    // A smaller cap at the next open trims at once.
    drop(c);
    let c = DiskCache::open(dir.path(), cap / 2).unwrap();
    assert!(c.stats().bytes <= cap / 2);
}

#[test]
fn maps_check_blocks_and_survive_eviction_and_remount() {
    let dir = tempfile::tempdir().unwrap();
    let bs = 4096;
    let (d, data) = blob(10_000, 3);
    {
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let k = key(&d, data.len(), bs, 1);
        assert_eq!(c.check(&k, &piece(&data, bs, 1)), MapCheck::Unmapped);
        // A bad block stored before the map exists is dropped when the map arrives.
        c.put(&k, Bytes::from(vec![9u8; 4096]));
        c.flush();
        c.record_map(&d, data.len() as u64, bs, sums(&data, bs));
        c.flush();
        assert!(c.get(&k).is_none());
        assert_eq!(c.check(&k, &piece(&data, bs, 1)), MapCheck::Match);
        assert_eq!(c.check(&k, &[9u8; 4096]), MapCheck::Mismatch);
        // A wrong block is never stored once the map exists.
        c.put(&k, Bytes::from(vec![9u8; 4096]));
        c.flush();
        assert!(c.get(&k).is_none());
        // A map with the wrong number of blocks is ignored.
        c.record_map(&d, data.len() as u64, 1000, sums(&data, bs));
        assert_eq!(
            c.check(&key(&d, data.len(), 1000, 0), &data[..1000]),
            MapCheck::Unmapped
        );
    }
    let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
    let k = key(&d, data.len(), bs, 2);
    assert_eq!(c.check(&k, &piece(&data, bs, 2)), MapCheck::Match);
    let mut bad = piece(&data, bs, 2).to_vec();
    bad[0] ^= 1;
    assert_eq!(c.check(&k, &bad), MapCheck::Mismatch);
    assert_eq!(c.stats().map_mismatches, 1);
}

#[test]
fn a_complete_mapped_blob_is_assembled_for_passthrough() {
    let dir = tempfile::tempdir().unwrap();
    let bs = 4096;
    let (d, data) = blob(10_000, 4);
    let size = data.len() as u64;
    let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
    c.record_map(&d, size, bs, sums(&data, bs));
    for i in 0..3 {
        assert!(c.passthrough_file(&d, size).is_none());
        c.put(&key(&d, data.len(), bs, i), piece(&data, bs, i));
        c.flush();
    }
    let s = c.stats();
    assert_eq!((s.blobs_assembled, s.entries), (1, 1));
    let mut f = c.passthrough_file(&d, size).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut got).unwrap();
    assert_eq!(got, data);
    // Reads the daemon serves come from the whole file, checked against the map.
    assert_eq!(
        c.get(&key(&d, data.len(), bs, 2)).unwrap(),
        piece(&data, bs, 2)
    );
    drop(c);
    // Next open: still there. Then someone writes into it: the fingerprint no longer holds.
    let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
    assert!(c.passthrough_file(&d, size).is_some());
    let p = dir.path().join(whole_name(d.hex(), size));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all_at(b"X", 5)
        .unwrap();
    assert!(c.passthrough_file(&d, size).is_none());
    assert!(!p.exists());
    assert_eq!(c.stats().checksum_failures, 1);
}

#[test]
fn leftovers_of_a_crash_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    drop(DiskCache::open(dir.path(), 1 << 20).unwrap());
    let (d, _) = blob(10, 5);
    let bdir = dir.path().join("blocks").join(d.hex());
    std::fs::create_dir_all(&bdir).unwrap();
    let tmp = bdir.join(".tmp.1.2");
    std::fs::write(&tmp, b"half").unwrap();
    let unverified = dir.path().join(whole_name(d.hex(), 10));
    std::fs::write(&unverified, b"0123456789").unwrap();
    let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
    assert!(!tmp.exists() && !unverified.exists());
    assert_eq!(c.stats().entries, 0);
}

use std::os::unix::fs::FileExt;

#[tokio::test]
async fn room_held_for_a_prefetch_is_used_by_its_blocks_and_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(DiskCache::open(dir.path(), 1 << 30).unwrap());
    let (d, data) = blob(8192, 3);
    let bs = 4096;
    // A prefetch holds the whole queue: another put finds it full and is dropped...
    let mut room = c
        .wait_for_room(QUEUE_BYTES, std::time::Duration::ZERO)
        .await;
    c.put(&key(&d, data.len(), bs, 0), piece(&data, bs, 0));
    assert_eq!(c.stats().blocks_dropped, 1);
    // ...while the prefetch's own block goes in, on its room.
    c.put_within(
        &key(&d, data.len(), bs, 1),
        piece(&data, bs, 1),
        Some(&mut room),
        c.epoch(),
    );
    assert_eq!(c.stats().blocks_dropped, 1);
    // A full queue cannot be waited out: the room is empty, counted, not a hang.
    // (More than the one block the writer may have drained meanwhile.)
    let none = c
        .wait_for_room(bs as usize + 1, std::time::Duration::from_millis(10))
        .await;
    assert_eq!(none.held, 0);
    assert_eq!(c.stats().room_waits_expired, 1);
    // A waiter is woken when room comes back (here: the prefetch's unused room).
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move {
            c.wait_for_room(QUEUE_BYTES / 2, std::time::Duration::from_secs(3600))
                .await
                .held
        })
    };
    tokio::task::yield_now().await;
    drop(room); // the unused room goes back
    assert_eq!(waiter.await.unwrap(), QUEUE_BYTES / 2);
    c.flush();
    assert_eq!(c.inner.queued_bytes.load(Ordering::SeqCst), 0);
    assert!(c.get(&key(&d, data.len(), bs, 1)).is_some());
    assert!(c.get(&key(&d, data.len(), bs, 0)).is_none());
}

#[test]
fn a_block_fetched_before_a_forget_is_not_stored_after_it() {
    // A fetch reads the epoch, checks its blob was not found bad, and puts; a verdict that
    // came between the check and the put has its forget done first by the writer, so the block
    // must not land after it.
    let dir = tempfile::tempdir().unwrap();
    let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
    let (d, data) = blob(8192, 3);
    let bs = 4096;
    let before = c.epoch();
    c.forget(&d);
    c.put_within(
        &key(&d, data.len(), bs, 0),
        piece(&data, bs, 0),
        None,
        before,
    );
    // A block fetched after the forget goes in.
    c.put_within(
        &key(&d, data.len(), bs, 1),
        piece(&data, bs, 1),
        None,
        c.epoch(),
    );
    c.flush();
    assert!(c.get(&key(&d, data.len(), bs, 0)).is_none());
    assert!(c.get(&key(&d, data.len(), bs, 1)).is_some());
    assert_eq!(c.stats().blocks_dropped, 1);
}
