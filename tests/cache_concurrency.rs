//! Concurrency test of the chunk cache: many tokio tasks on a multi-thread runtime read the same
//! chunks through `ChunkCache::get_or_fetch`, with fetches that sleep and fail on a
//! deterministic subset of attempts. Checks single-flight (never two fetches of one chunk in
//! flight, one successful fetch per chunk while nothing is evicted), no lost wake-ups (every task
//! finishes; the timeout is a hang guard, not a timing assertion), that a failed fetch fails its
//! waiters once (they do not queue up to retry it), that nothing is cached after a failure, and that the
//! byte cap holds throughout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use regfs::cache::{ChunkCache, ChunkKey};
use regfs::digest::Digest;
use regfs::error::{RegistryError, RegistryResult};

/// The one place a cache key is made: chunk `idx` of test blob `blob`.
fn key(blob: usize, idx: u64) -> ChunkKey {
    ChunkKey::Blob {
        digest: Digest::from(format!("sha256:{blob:064x}")),
        size: 0,
        index: idx,
    }
}

/// Hang guard for a whole scenario.
const GUARD: Duration = Duration::from_secs(60);

/// The bytes of chunk (blob, idx): 64..=263 bytes, different for every chunk.
fn chunk_data(blob: usize, idx: u64) -> Bytes {
    let len = 64 + (blob * 7 + idx as usize * 13) % 200;
    (0..len)
        .map(|i| (i as u64 ^ (blob as u64 * 31 + idx * 17)) as u8)
        .collect::<Vec<_>>()
        .into()
}

/// Which attempts of a chunk's fetch fail.
#[derive(Clone, Copy)]
enum Failing {
    Never,
    /// Attempts 0..n fail (counted over all tasks), later ones succeed.
    First(u64),
    Always,
}

/// Per-chunk bookkeeping of the fetch closures.
#[derive(Default)]
struct Probe {
    attempts: AtomicU64,
    successes: AtomicU64,
    in_flight: AtomicUsize,
    /// Most fetches of this chunk seen in flight at once.
    max_in_flight: AtomicUsize,
}

struct Bench {
    cache: Arc<ChunkCache>,
    probes: HashMap<(usize, u64), Probe>,
    failing: HashMap<(usize, u64), Failing>,
    /// How long a fetch sleeps, by attempt: a few milliseconds so that fetches overlap.
    sleep_ms: u64,
}

impl Bench {
    fn new(capacity: u64, chunks: &[(usize, u64, Failing)], sleep_ms: u64) -> Arc<Self> {
        Arc::new(Bench {
            cache: Arc::new(ChunkCache::new(capacity)),
            probes: chunks
                .iter()
                .map(|&(b, i, _)| ((b, i), Probe::default()))
                .collect(),
            failing: chunks.iter().map(|&(b, i, f)| ((b, i), f)).collect(),
            sleep_ms,
        })
    }

    /// One read of chunk (blob, idx). Returns the result and whether this call's own fetch
    /// closure ran and failed.
    async fn read(self: &Arc<Self>, blob: usize, idx: u64) -> (RegistryResult<Bytes>, bool) {
        let own_failed = Arc::new(AtomicBool::new(false));
        let (me, flag) = (self.clone(), own_failed.clone());
        let r = self
            .cache
            .get_or_fetch(key(blob, idx), || async move {
                let p = &me.probes[&(blob, idx)];
                let attempt = p.attempts.fetch_add(1, Ordering::SeqCst);
                let now = p.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                p.max_in_flight.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(me.sleep_ms + attempt % 3)).await;
                p.in_flight.fetch_sub(1, Ordering::SeqCst);
                let fail = match me.failing[&(blob, idx)] {
                    Failing::Never => false,
                    Failing::First(n) => attempt < n,
                    Failing::Always => true,
                };
                if fail {
                    flag.store(true, Ordering::SeqCst);
                    return Err(RegistryError::Server {
                        status: 503,
                        message: format!("injected: attempt {attempt} of chunk {blob}/{idx}"),
                    });
                }
                p.successes.fetch_add(1, Ordering::SeqCst);
                Ok(chunk_data(blob, idx))
            })
            .await;
        (r, own_failed.load(Ordering::SeqCst))
    }

    fn assert_single_flight(&self) {
        for ((b, i), p) in &self.probes {
            assert!(
                p.max_in_flight.load(Ordering::SeqCst) <= 1,
                "chunk {b}/{i}: {} fetches in flight at once",
                p.max_in_flight.load(Ordering::SeqCst)
            );
        }
    }
}

/// A task's private order over `chunks` (a rotation and a stride, so tasks collide in
/// different orders).
fn order(chunks: &[(usize, u64)], task: usize) -> Vec<(usize, u64)> {
    let n = chunks.len();
    let stride = [1, 3, 5, 7]
        .into_iter()
        .find(|s| !n.is_multiple_of(*s))
        .unwrap_or(1);
    (0..n).map(|i| chunks[(task + i * stride) % n]).collect()
}

async fn guarded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: tasks did not finish (a lost wake-up?)"))
}

fn grid(
    blobs: usize,
    chunks: u64,
    failing: impl Fn(usize, u64) -> Failing,
) -> Vec<(usize, u64, Failing)> {
    (0..blobs)
        .flat_map(|b| (0..chunks).map(move |i| (b, i)))
        .map(|(b, i)| (b, i, failing(b, i)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_readers_share_one_fetch_per_chunk() {
    let chunks = grid(6, 5, |_, _| Failing::Never);
    let bench = Bench::new(1 << 20, &chunks, 2);
    let ids: Vec<(usize, u64)> = chunks.iter().map(|&(b, i, _)| (b, i)).collect();
    let mut tasks = Vec::new();
    for t in 0..48 {
        let (bench, mine) = (bench.clone(), order(&ids, t));
        tasks.push(tokio::spawn(async move {
            for _round in 0..2 {
                for &(b, i) in &mine {
                    let (r, _) = bench.read(b, i).await;
                    assert_eq!(
                        r.expect("no fetch fails"),
                        chunk_data(b, i),
                        "chunk {b}/{i}"
                    );
                }
            }
        }));
    }
    guarded("readers", async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
    bench.assert_single_flight();
    let mut bytes = 0;
    for (&(b, i), p) in &bench.probes {
        // Exactly one fetch per chunk (a reader racing the end of a fetch used to fetch again:
        // `a_reader_racing_the_end_of_a_fetch_does_not_fetch_again`).
        let n = p.successes.load(Ordering::SeqCst);
        assert_eq!(n, 1, "chunk {b}/{i}: {n} fetches with nothing evicted");
        bytes += chunk_data(b, i).len() as u64;
    }
    assert_eq!(bench.cache.len(), ids.len());
    assert_eq!(bench.cache.used_bytes(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_fail_their_waiters_once_and_cache_nothing() {
    // Blob 0 never fetches; blob 1 fails its first two attempts; blob 2 its first; blob 3 never
    // fails.
    let chunks = grid(4, 4, |b, _| match b {
        0 => Failing::Always,
        1 => Failing::First(2),
        2 => Failing::First(1),
        _ => Failing::Never,
    });
    let bench = Bench::new(1 << 20, &chunks, 3);
    let ids: Vec<(usize, u64)> = chunks.iter().map(|&(b, i, _)| (b, i)).collect();
    let errors = Arc::new(Mutex::new(HashMap::<(usize, u64), u64>::new()));
    let mut tasks = Vec::new();
    for t in 0..32 {
        let (bench, mine, errors) = (bench.clone(), order(&ids, t), errors.clone());
        tasks.push(tokio::spawn(async move {
            for &(b, i) in &mine {
                // Each try is a new reader, so it joins a newer fetch than the one that failed
                // it: 3 tries outlast the failures of any chunk that can succeed.
                let mut ok = false;
                for _try in 0..3 {
                    let (r, own_failed) = bench.read(b, i).await;
                    match r {
                        Ok(data) => {
                            assert!(!own_failed, "chunk {b}/{i}: Ok although its fetch failed");
                            assert_eq!(data, chunk_data(b, i), "chunk {b}/{i}");
                            ok = true;
                            break;
                        }
                        Err(e) => {
                            // A waiter gets the error of the fetch it waited on, not a retry.
                            assert!(e.to_string().contains(&format!("chunk {b}/{i}")), "{e}");
                            *errors.lock().unwrap().entry((b, i)).or_default() += 1;
                        }
                    }
                }
                assert_eq!(ok, b != 0, "chunk {b}/{i}: success after 3 tries");
            }
        }));
    }
    guarded("readers", async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
    bench.assert_single_flight();
    let errors = errors.lock().unwrap();
    let mut bytes = 0;
    for (&(b, i), p) in &bench.probes {
        let (attempts, successes) = (
            p.attempts.load(Ordering::SeqCst),
            p.successes.load(Ordering::SeqCst),
        );
        let errs = errors.get(&(b, i)).copied().unwrap_or(0);
        match b {
            0 => {
                assert_eq!(successes, 0);
                assert!(attempts >= 1 && attempts <= errs, "chunk {b}/{i}");
                assert!(
                    bench.cache.get(&key(b, i)).is_none(),
                    "chunk {b}/{i}: cached after failing"
                );
            }
            _ => {
                let fails = [0, 2, 1, 0][b];
                assert_eq!(
                    attempts,
                    fails + 1,
                    "chunk {b}/{i}: failed fetches, then one"
                );
                assert!(
                    errs >= fails,
                    "chunk {b}/{i}: each failed fetch reached a reader"
                );
                assert_eq!(successes, 1, "chunk {b}/{i}: {successes} fetches");
                assert_eq!(bench.cache.get(&key(b, i)).unwrap(), chunk_data(b, i));
                bytes += chunk_data(b, i).len() as u64;
            }
        }
    }
    assert_eq!(
        bench.cache.len(),
        12,
        "only the chunks that were fetched are cached"
    );
    assert_eq!(bench.cache.used_bytes(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_of_a_failed_fetch_all_fail_with_it() {
    // One chunk; its first attempt fails after a while, with readers waiting on it.
    let bench = Bench::new(1 << 20, &[(0, 0, Failing::First(1))], 30);
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let bench = bench.clone();
        tasks.push(tokio::spawn(async move { bench.read(0, 0).await }));
    }
    let results = guarded("waiters", async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
    .await;
    let failed: Vec<_> = results.iter().filter(|(r, _)| r.is_err()).collect();
    assert!(!failed.is_empty(), "the first fetch failed somebody");
    assert_eq!(
        failed.iter().filter(|(_, own)| *own).count(),
        1,
        "one fetch failed, and it ran once"
    );
    for (r, _) in &results {
        match r {
            Ok(d) => assert_eq!(*d, chunk_data(0, 0)),
            Err(e) => assert!(e.to_string().contains("attempt 0 "), "{e}"),
        }
    }
    let p = &bench.probes[&(0, 0)];
    let oks = results.len() - failed.len();
    // Waiters of the failure did not retry it one by one: at most one more fetch, made by the
    // readers that came after the failure.
    assert_eq!(
        p.attempts.load(Ordering::SeqCst),
        1 + u64::from(oks > 0),
        "one failure, shared; then at most one fresh fetch"
    );
    bench.assert_single_flight();
    assert_eq!(bench.cache.len(), usize::from(oks > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn always_failing_chunks_leave_the_cache_empty() {
    let chunks = grid(3, 3, |_, _| Failing::Always);
    let bench = Bench::new(1 << 20, &chunks, 1);
    let ids: Vec<(usize, u64)> = chunks.iter().map(|&(b, i, _)| (b, i)).collect();
    let mut tasks = Vec::new();
    for t in 0..24 {
        let (bench, mine) = (bench.clone(), order(&ids, t));
        tasks.push(tokio::spawn(async move {
            for &(b, i) in &mine {
                let (r, _) = bench.read(b, i).await;
                assert!(r.is_err(), "chunk {b}/{i}");
            }
        }));
    }
    guarded("readers", async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
    bench.assert_single_flight();
    for &(b, i) in &ids {
        // Every read failed, own fetch or shared: between 1 and 24 fetches per chunk, none
        // overlapping.
        let n = bench.probes[&(b, i)].attempts.load(Ordering::SeqCst);
        assert!((1..=24).contains(&n), "chunk {b}/{i}: {n} fetches");
    }
    assert!(bench.cache.is_empty());
    assert_eq!(bench.cache.used_bytes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_byte_cap_holds_under_concurrent_eviction() {
    // 40 chunks of 64..263 bytes through a cache of about 8 of them, with some failures.
    let chunks = grid(8, 5, |b, i| {
        if (b + i as usize).is_multiple_of(7) {
            Failing::First(1)
        } else {
            Failing::Never
        }
    });
    let cap = 1500;
    let bench = Bench::new(cap, &chunks, 1);
    let ids: Vec<(usize, u64)> = chunks.iter().map(|&(b, i, _)| (b, i)).collect();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (bench, done) = (bench.clone(), done.clone());
        tokio::spawn(async move {
            let mut max = 0;
            while !done.load(Ordering::SeqCst) {
                max = max.max(bench.cache.used_bytes());
                tokio::task::yield_now().await;
            }
            max
        })
    };
    let mut tasks = Vec::new();
    for t in 0..32 {
        let (bench, mine) = (bench.clone(), order(&ids, t));
        tasks.push(tokio::spawn(async move {
            for &(b, i) in &mine {
                for _try in 0..2 {
                    let (r, _) = bench.read(b, i).await;
                    match r {
                        Ok(d) => {
                            assert_eq!(d, chunk_data(b, i), "chunk {b}/{i}");
                            break;
                        }
                        // The one failing fetch of this chunk, own or waited on.
                        Err(e) => assert!(e.to_string().contains("attempt 0 "), "{e}"),
                    }
                }
            }
        }));
    }
    guarded("readers", async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
    done.store(true, Ordering::SeqCst);
    let max = guarded("watcher", watcher).await.unwrap();
    assert!(
        max <= cap,
        "the cache held {max} bytes, over its cap of {cap}"
    );
    assert!(bench.cache.used_bytes() <= cap);
    bench.assert_single_flight();
    // What is cached adds up, and is the right data.
    let mut bytes = 0;
    for &(b, i) in &ids {
        if let Some(d) = bench.cache.get(&key(b, i)) {
            assert_eq!(d, chunk_data(b, i));
            bytes += d.len() as u64;
        }
    }
    assert_eq!(bench.cache.used_bytes(), bytes);
    assert!(!bench.cache.is_empty());
}

/// Found by `many_readers_share_one_fetch_per_chunk` (about 1 run in 8 saw a chunk fetched twice
/// with nothing evicted). `get_or_fetch` checks the LRU, then takes the in-flight cell. A reader
/// that misses the LRU just before a fetch of the same chunk inserts it, and takes the in-flight
/// lock just after that fetch retired its cell, makes a new cell and fetches the chunk again:
/// a second registry request for a chunk that is already cached. Never two at once, and the
/// data is right, so only the single-flight promise of the module doc is broken. (A fix:
/// look in the LRU again once the in-flight lock is held.) The loop makes the window likely:
/// a fetch that yields once, 8 readers, 20,000 rounds (about 2 s; it saw 8 to 22 doubles).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_racing_the_end_of_a_fetch_does_not_fetch_again() {
    let rounds = 20_000;
    let mut doubled = 0;
    guarded("rounds", async {
        for _ in 0..rounds {
            let cache = Arc::new(ChunkCache::new(1 << 20));
            let fetches = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let (cache, fetches) = (cache.clone(), fetches.clone());
                tasks.push(tokio::spawn(async move {
                    cache
                        .get_or_fetch(key(0, 0), || async move {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            RegistryResult::Ok(chunk_data(0, 0))
                        })
                        .await
                        .unwrap()
                }));
            }
            for t in tasks {
                assert_eq!(t.await.unwrap(), chunk_data(0, 0));
            }
            if fetches.load(Ordering::SeqCst) > 1 {
                doubled += 1;
            }
        }
    })
    .await;
    assert_eq!(
        doubled, 0,
        "{doubled} of {rounds} rounds fetched the chunk twice"
    );
}
