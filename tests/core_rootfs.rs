//! Core tier, image contents: progressive indexing (a lookup answered before the layer's last
//! bytes were fetched, whiteouts and opaque directories of upper layers still obeyed, ENOENT and
//! readdir waiting for the whole index), a directory of 100,000 entries, and the exact ranges a
//! first read of an eStargz or zstd:chunked layer fetches. Against the fake registry, behind a
//! gate that holds back a layer's tail and records every range served.

mod common;

use common::walk;

use std::sync::Arc;
use std::time::Duration;

use common::{
    estargz_of, make_tar, pseudo_random, push_image, seekable_bulk, seekable_tar, zstd_chunked_of,
    GatedRegistry, Layer,
};
use regfs::fs::{Fs, FsOptions, Ino};
use regfs::registry::fake::FakeRegistry;
use regfs::registry::Registry;

const KIB: u64 = 1024;
const CHUNK: u64 = 64 * KIB;

/// A bound on waits that must end (a hang fails the test instead of stalling it); never a
/// measure of speed.
const BOUND: Duration = Duration::from_secs(30);

fn setup(chunk: u64) -> (Arc<FakeRegistry>, Arc<GatedRegistry>, Arc<Fs>) {
    setup_with(FsOptions {
        chunk_size: chunk,
        cache_size: 256 * CHUNK,
        ..FsOptions::default()
    })
}

fn setup_with(opts: FsOptions) -> (Arc<FakeRegistry>, Arc<GatedRegistry>, Arc<Fs>) {
    let fake = Arc::new(FakeRegistry::new());
    let gate = Arc::new(GatedRegistry::new(fake.clone()));
    let fs = Fs::new(gate.clone() as Arc<dyn Registry>, opts);
    (fake, gate, fs)
}

async fn read_all(fs: &Fs, path: &str) -> Result<Vec<u8>, i32> {
    let ino = walk(fs, path).await?;
    let size = fs.getattr(ino).await.map_err(|e| e.errno)?.attr.size;
    let h = fs.open(ino, false).await.map_err(|e| e.errno)?;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        match fs.read(h.fh, out.len() as u64, 128 * 1024).await {
            Ok(b) if b.is_empty() => break,
            Ok(b) => out.extend_from_slice(&b),
            Err(e) => {
                fs.release(h.fh).await;
                return Err(e.errno);
            }
        }
    }
    fs.release(h.fh).await;
    Ok(out)
}

async fn names(fs: &Fs, path: &str) -> Result<Vec<String>, i32> {
    let ino = walk(fs, path).await?;
    let mut v: Vec<String> = fs
        .readdir(ino)
        .await
        .map_err(|e| e.errno)?
        .into_iter()
        .map(|e| e.name)
        .collect();
    v.sort();
    Ok(v)
}

/// Run `f` on the filesystem in a task of its own (so that it can be seen to wait).
fn spawn<T: Send + 'static, F>(
    fs: &Arc<Fs>,
    f: impl FnOnce(Arc<Fs>) -> F + Send + 'static,
) -> tokio::task::JoinHandle<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
{
    let fs = fs.clone();
    tokio::spawn(async move { f(fs).await })
}

const ROOT: &str = "r/img/tags/t/rootfs";

/// The lower layer: small files first, then 2 MiB of noise, then one last file.
fn lower_tar() -> Vec<u8> {
    let big = pseudo_random(2 << 20, 7);
    make_tar(&[
        ("etc/early", b"early bird\n"),
        ("etc/gone", b"whited out above\n"),
        ("o/hidden", b"under an opaque dir above\n"),
        ("usr/big", &big),
        ("zz/late", b"the last entry\n"),
    ])
}

fn upper_tar() -> Vec<u8> {
    make_tar(&[
        ("etc/.wh.gone", b""),
        ("o/.wh..wh..opq", b""),
        ("o/new", b"upper\n"),
        ("top", b"upper file\n"),
    ])
}

/// gzip and zstd: with the lower layer's tail held back, an early file is looked up, stat'ed
/// and read while fewer than all of the layer's bytes have been fetched; names the upper layer
/// whites out (or hides under an opaque directory), names found nowhere yet, and listings wait
/// for the whole index, and are right once it is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_early_file_answers_before_its_layer_is_fetched_and_whiteouts_still_hide() {
    for (kind, make) in [
        ("gzip", Layer::gzip as fn(&[u8]) -> Layer),
        ("zstd", Layer::zstd),
    ] {
        let (fake, gate, fs) = setup(CHUNK);
        let (lower, upper) = (make(&lower_tar()), make(&upper_tar()));
        let lower_size = lower.data.len() as u64;
        assert!(lower_size > 2 << 20, "{kind}: noise does not compress");
        let pushed = push_image(fake.as_ref(), "r/img", Some("t"), "amd64", &[lower, upper]).await;
        let lower_digest = pushed.layers[0].0.clone();
        gate.close(&lower_digest, 4 * CHUNK, lower_size - 64);

        // Asked first, answered last: each needs the lower layer whole.
        let gone = spawn(&fs, |fs| async move {
            walk(&fs, &format!("{ROOT}/etc/gone")).await
        });
        let hidden = spawn(&fs, |fs| async move {
            walk(&fs, &format!("{ROOT}/o/hidden")).await
        });
        let absent = spawn(&fs, |fs| async move {
            walk(&fs, &format!("{ROOT}/etc/nothing")).await
        });
        let listing = spawn(
            &fs,
            |fs| async move { names(&fs, &format!("{ROOT}/etc")).await },
        );

        // The early file: found, stat'ed and read with the lower layer's tail still held back.
        let early = tokio::time::timeout(BOUND, read_all(&fs, &format!("{ROOT}/etc/early")))
            .await
            .unwrap_or_else(|_| panic!("{kind}: the early file waited for the whole layer"));
        assert_eq!(early.unwrap(), b"early bird\n", "{kind}");
        // The upper layer's own files are there too.
        assert_eq!(
            read_all(&fs, &format!("{ROOT}/o/new")).await.unwrap(),
            b"upper\n"
        );
        let fetched = gate.bytes_of(&lower_digest);
        assert!(
            fetched < lower_size / 2,
            "{kind}: fetched {fetched} of the layer's {lower_size} bytes before answering"
        );
        for (what, h) in [
            ("whiteout", &gone),
            ("opaque", &hidden),
            ("absent", &absent),
        ] {
            assert!(!h.is_finished(), "{kind}: the {what} lookup answered early");
        }
        assert!(!listing.is_finished(), "{kind}: readdir answered early");

        gate.open();
        let wait = |h: tokio::task::JoinHandle<Result<Ino, i32>>| async move {
            tokio::time::timeout(BOUND, h).await.unwrap().unwrap()
        };
        assert_eq!(wait(gone).await, Err(libc::ENOENT), "{kind}: whiteout");
        assert_eq!(wait(hidden).await, Err(libc::ENOENT), "{kind}: opaque dir");
        assert_eq!(wait(absent).await, Err(libc::ENOENT), "{kind}: absent");
        assert_eq!(
            tokio::time::timeout(BOUND, listing).await.unwrap().unwrap(),
            Ok(vec!["early".to_string()]),
            "{kind}"
        );
        assert_eq!(
            names(&fs, &format!("{ROOT}/o")).await.unwrap(),
            vec!["new"],
            "{kind}"
        );
        assert_eq!(
            read_all(&fs, &format!("{ROOT}/zz/late")).await.unwrap(),
            b"the last entry\n"
        );
        assert_eq!(
            read_all(&fs, &format!("{ROOT}/usr/big")).await.unwrap(),
            pseudo_random(2 << 20, 7),
            "{kind}"
        );
    }
}

/// While a layer's pass is held back past 2 MiB, a file early in it whose spans the small cache
/// has already evicted is read back from the restart points the pass has recorded so far (gzip
/// checkpoints; zstd from its start), checked against the span digests recorded so far.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_early_file_evicted_during_the_pass_is_inflated_from_the_partial_index() {
    let early = pseudo_random(1 << 20, 11);
    let t = make_tar(&[
        ("usr/early", &early),
        ("usr/more", &pseudo_random(2 << 20, 12)),
        ("usr/late", b"late\n"),
    ]);
    for (kind, layer) in [("gzip", Layer::gzip(&t)), ("zstd", Layer::zstd(&t))] {
        // A cache of 8 chunks: the first MiB's spans are gone by the time the pass waits.
        let (fake, gate, fs) = setup_with(FsOptions {
            chunk_size: CHUNK,
            cache_size: 8 * CHUNK,
            checkpoint_spacing: CHUNK,
            ..FsOptions::default()
        });
        let size = layer.data.len() as u64;
        let pushed = push_image(fake.as_ref(), "r/img", Some("t"), "amd64", &[layer]).await;
        gate.close(&pushed.layers[0].0, 2 << 20, size - 64);
        let got = tokio::time::timeout(BOUND, read_all(&fs, &format!("{ROOT}/usr/early")))
            .await
            .unwrap_or_else(|_| panic!("{kind}: the early file waited for the whole layer"));
        assert!(got.unwrap() == early, "{kind}: the early file's bytes");
        // Nothing past the gate was fetched (it is still closed): every range served ends
        // before 2 MiB, or is the 64-byte tail (a TOC footer probe). Bytes before the gate may
        // be fetched more than once: this tiny cache evicts spans and chunks the re-inflation
        // reads again (a single-frame zstd stream restarts from its start each time).
        let layer = &pushed.layers[0].0;
        for (d, start, end) in gate.served() {
            assert!(
                &d != layer || end <= 2 << 20 || start >= size - 64,
                "{kind}: bytes {start}..{end} of {size} were fetched past the closed gate"
            );
        }
        gate.open();
        assert_eq!(
            tokio::time::timeout(BOUND, read_all(&fs, &format!("{ROOT}/usr/late")))
                .await
                .unwrap()
                .unwrap(),
            b"late\n"
        );
    }
}

/// A file of a lower layer is not answered while a layer above it is still being indexed (the
/// upper layer could white it out), even when its own layer is indexed already.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lower_file_waits_for_the_layers_above() {
    let (fake, gate, fs) = setup(CHUNK);
    let lower = Layer::gzip(&make_tar(&[("etc/low", b"low\n")]));
    let upper_tar = make_tar(&[("a", &pseudo_random(1 << 20, 9)), ("b", b"late\n")]);
    let upper = Layer::gzip(&upper_tar);
    let pushed = push_image(fake.as_ref(), "r/img", Some("t"), "amd64", &[lower, upper]).await;
    gate.close(&pushed.layers[1].0, 4 * CHUNK, pushed.layers[1].1 - 64);
    let low = spawn(&fs, |fs| async move {
        read_all(&fs, &format!("{ROOT}/etc/low")).await
    });
    // The upper layer's early file answers; the lower one waits.
    tokio::time::timeout(BOUND, walk(&fs, &format!("{ROOT}/a")))
        .await
        .unwrap()
        .unwrap();
    assert!(
        !low.is_finished(),
        "a lower file answered before the upper layer was indexed"
    );
    gate.open();
    let got = tokio::time::timeout(BOUND, low).await.unwrap().unwrap();
    assert_eq!(got.unwrap(), b"low\n");
}

/// A directory of 100,000 entries lists and stats in time linear in its size: every lookup is
/// one map lookup (a lookup that built the whole listing to find one name would make this
/// 10^10 steps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_of_100000_entries_lists_and_stats() {
    let n = 100_000usize;
    let names_in: Vec<String> = (0..n).map(|i| format!("m/f{i:06}")).collect();
    let files: Vec<(&str, &[u8])> = names_in.iter().map(|p| (p.as_str(), &b""[..])).collect();
    let (fake, _gate, fs) = setup(1 << 20);
    let t = make_tar(&files);
    push_image(
        fake.as_ref(),
        "r/img",
        Some("t"),
        "amd64",
        &[Layer::tar(&t)],
    )
    .await;
    let dir = walk(&fs, &format!("{ROOT}/m")).await.unwrap();
    let listed = fs.readdir(dir).await.unwrap();
    assert_eq!(listed.len(), n);
    for i in 0..n {
        let name = format!("f{i:06}");
        let e = fs.lookup(dir, &name).await.unwrap();
        assert_eq!(e.attr.size, 0, "{name}");
    }
    assert_eq!(
        fs.lookup(dir, "f100000").await.unwrap_err().errno,
        libc::ENOENT
    );
}

/// The first file of an eStargz or zstd:chunked layer fetches exactly: the head (4 bytes, the
/// format) and the tail (64 bytes, a footer) at once, then the TOC, then that file's own chunk:
/// far less than footer + TOC + chunk + 256 KiB, whatever the chunk size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toc_formats_fetch_exactly_footer_toc_and_the_files_chunks() {
    let bulk = seekable_bulk();
    let t = seekable_tar(&bulk, &[]);
    for (kind, layer) in [
        ("estargz", estargz_of(&t)),
        ("zstdchunked", zstd_chunked_of(&t)),
    ] {
        // The default 4 MiB chunk: a chunk-aligned read would fetch the whole 3 MiB layer.
        let (fake, gate, fs) = setup(4 << 20);
        let data = layer.data.clone();
        let size = data.len() as u64;
        let pushed = push_image(fake.as_ref(), "r/img", Some("t"), "amd64", &[layer]).await;
        let digest = pushed.layers[0].0.clone();
        let toc_start = if kind == "estargz" {
            regfs::layer::toc::estargz_toc_offset(&data[data.len() - 51..]).unwrap()
        } else {
            regfs::layer::toc::zstd_chunked_toc(None, Some(&data[data.len() - 64..]))
                .unwrap()
                .0
        };
        assert_eq!(
            read_all(&fs, &format!("{ROOT}/etc/os-release"))
                .await
                .unwrap(),
            b"ID=seekable\n",
            "{kind}"
        );
        let ranges = gate.ranges_of(&digest);
        // Head, (footer,) TOC, the file's chunk: each small, and nothing else.
        assert!(ranges.contains(&(0, 4)), "{kind}: {ranges:?}");
        let toc_len = size - toc_start;
        let mut rest: Vec<&(u64, u64)> = ranges.iter().filter(|r| **r != (0, 4)).collect();
        // The tail: 64 bytes hold either footer (eStargz 51, zstd:chunked 64).
        assert!(ranges.contains(&(size - 64, size)), "{kind}: {ranges:?}");
        rest.retain(|r| **r != (size - 64, size));
        if kind == "estargz" {
            assert!(
                ranges.contains(&(toc_start, size - 51)),
                "{kind}: {ranges:?}"
            );
            rest.retain(|r| **r != (toc_start, size - 51));
        } else {
            assert!(
                ranges.iter().any(|&(s, e)| s >= toc_start - 8 && e <= size),
                "{kind}: {ranges:?}"
            );
            rest.retain(|r| r.0 < toc_start);
        }
        assert_eq!(rest.len(), 1, "{kind}: one chunk for the file: {ranges:?}");
        assert!(rest[0].1 - rest[0].0 < KIB, "{kind}: {ranges:?}");
        let fetched = gate.bytes_of(&digest);
        assert!(
            fetched <= toc_len + 64 + 4 + KIB,
            "{kind}: fetched {fetched} bytes of a {size}-byte layer, TOC {toc_len}"
        );
        // Every other file reads back right, each from its own chunks.
        for (p, d) in &bulk {
            assert_eq!(
                &read_all(&fs, &format!("{ROOT}/{p}")).await.unwrap(),
                d,
                "{kind} {p}"
            );
        }
    }
}

/// An index pass reads its layer whole from the start, so its readahead window starts at the
/// full `--readahead`: after the format sniff and the footer, the rest of the layer comes in one
/// request (at most `MAX_REQUEST`), not in requests that double from one chunk, a round trip
/// each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_index_pass_asks_for_its_whole_window_at_once() {
    let (fake, gate, fs) = setup_with(FsOptions {
        chunk_size: CHUNK,
        cache_size: 1024 * CHUNK, // 64 MiB: a 16 MiB prefetch budget
        ..FsOptions::default()
    });
    let layer = Layer::gzip(&lower_tar());
    let size = layer.data.len() as u64;
    assert!(size > 32 * CHUNK, "noise does not compress");
    let pushed = push_image(fake.as_ref(), "r/img", Some("t"), "amd64", &[layer]).await;
    let digest = pushed.layers[0].0.clone();
    gate.reset();
    assert_eq!(
        names(&fs, &format!("{ROOT}/zz")).await.unwrap(),
        ["late"],
        "indexed whole"
    );
    let served = gate.ranges_of(&digest);
    let largest = served.iter().map(|(s, e)| e - s).max().unwrap_or(0);
    assert!(
        served.len() <= 4,
        "the pass's requests grew a round trip at a time: {served:?}"
    );
    assert!(
        largest >= size - 4 * CHUNK,
        "no request asked for the rest of the layer: {served:?}"
    );
}
