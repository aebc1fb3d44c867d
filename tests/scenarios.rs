//! The same scenario bodies against the in-memory fake and against the real `docker-registry`
//! (through regfs's HTTP client), and with faults injected by `FaultyRegistry` over either one.
//! Each scenario seeds an empty registry through the `Registry` trait, then drives the core.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use common::*;
use regfs::digest::sha256_digest;
use regfs::fs::{Fs, FsOptions};
use regfs::registry::fake::FakeRegistry;
use regfs::registry::faulty::{Fault, FaultError, FaultyRegistry, Op};
use regfs::registry::Registry;

const CHUNK: u64 = 64 * 1024;

fn core(reg: Arc<dyn Registry>) -> Arc<Fs> {
    Fs::new(
        reg,
        FsOptions {
            chunk_size: CHUNK,
            upload_chunk_size: CHUNK,
            readahead: 0,
            ..FsOptions::default()
        },
    )
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

async fn read_all(fs: &Fs, path: &str) -> Result<Vec<u8>, i32> {
    let ino = walk(fs, path).await?;
    let h = fs.open(ino, false).await.map_err(|e| e.errno)?;
    let mut out = Vec::new();
    let r = loop {
        match fs.read(h.fh, out.len() as u64, 128 * 1024).await {
            Ok(b) if b.is_empty() => break Ok(out),
            Ok(b) => out.extend_from_slice(&b),
            Err(e) => break Err(e.errno),
        }
    };
    fs.release(h.fh).await;
    r
}

/// An image with a gzip layer (a small file and a 200 KB one) and a plain tar layer.
async fn seed(reg: &dyn Registry) -> Pushed {
    let t1 = make_tar(&[
        ("etc/hello", b"hello from a scenario\n"),
        ("opt/big.bin", &pseudo_random(200_000, 7)),
    ]);
    let t2 = make_tar(&[("usr/share/readme", b"second layer\n")]);
    push_image(
        reg,
        "app/web",
        Some("v1"),
        "amd64",
        &[Layer::gzip(&t1), Layer::tar(&t2)],
    )
    .await
}

/// Listing, exact sizes without downloads, byte-exact reads, image contents.
async fn tree_and_reads(reg: Arc<dyn Registry>) {
    let img = seed(reg.as_ref()).await;
    let fs = core(reg.clone());
    assert_eq!(names(&fs, "").await, [".regfs", "app"]);
    assert!(names(&fs, "app/web").await.contains(&"tags".to_string()));
    assert_eq!(names(&fs, "app/web/tags").await, ["v1"]);
    let gets = reg.stats().blob_gets.load(Relaxed);
    let layers = names(&fs, "app/web/tags/v1/layers").await;
    assert_eq!(
        layers.len(),
        4,
        "two layer files and their trees: {layers:?}"
    );
    for name in layers.iter().filter(|n| n.contains('.')) {
        let ino = walk(&fs, &format!("app/web/tags/v1/layers/{name}"))
            .await
            .unwrap();
        let size = fs.getattr(ino).await.unwrap().attr.size;
        assert!(img.layers.iter().any(|(_, s, _)| *s == size));
    }
    assert_eq!(
        reg.stats().blob_gets.load(Relaxed),
        gets,
        "listing and stat fetch no blob"
    );
    assert_eq!(
        read_all(&fs, "app/web/tags/v1/manifest.json")
            .await
            .unwrap(),
        img.manifest
    );
    assert_eq!(
        read_all(&fs, "app/web/tags/v1/config.json").await.unwrap(),
        img.config
    );
    for name in layers.iter().filter(|n| n.contains('.')) {
        let data = read_all(&fs, &format!("app/web/tags/v1/layers/{name}"))
            .await
            .unwrap();
        assert!(img
            .layers
            .iter()
            .any(|(d, _, _)| *d == sha256_digest(&data)));
    }
    assert_eq!(
        read_all(&fs, "app/web/tags/v1/rootfs/etc/hello")
            .await
            .unwrap(),
        b"hello from a scenario\n"
    );
    assert_eq!(
        read_all(&fs, "app/web/tags/v1/rootfs/opt/big.bin")
            .await
            .unwrap(),
        pseudo_random(200_000, 7)
    );
    assert_eq!(
        read_all(&fs, "app/web/tags/v1/rootfs/usr/share/readme")
            .await
            .unwrap(),
        b"second layer\n"
    );
    assert_eq!(
        walk(&fs, "app/web/tags/v2").await.unwrap_err(),
        libc::ENOENT
    );
}

/// An upload through `uploads/`, read back by digest, then a manifest pushed under a new tag.
async fn push_and_tag(reg: Arc<dyn Registry>) {
    let img = seed(reg.as_ref()).await;
    let fs = core(reg.clone());
    let uploads = walk(&fs, "app/web/uploads").await.unwrap();
    let (_, h) = fs.create(uploads, "data.bin").await.unwrap();
    let data = pseudo_random(3 * CHUNK as usize + 5, 11);
    for (i, piece) in data.chunks(40_000).enumerate() {
        fs.write(h.fh, (i * 40_000) as u64, piece).await.unwrap();
    }
    fs.flush(h.fh).await.unwrap();
    fs.release(h.fh).await;
    let digest = sha256_digest(&data);
    assert_eq!(
        reg.blob_size("app/web", &digest).await.unwrap(),
        data.len() as u64
    );
    let hex = digest.strip_prefix("sha256:").unwrap();
    assert_eq!(
        read_all(&fs, &format!("app/web/blobs/sha256/{hex}"))
            .await
            .unwrap(),
        data
    );

    let tags = walk(&fs, "app/web/tags").await.unwrap();
    let v2 = fs.mkdir(tags, "v2").await.unwrap().attr.ino;
    let (_, h) = fs.create(v2, "manifest.json").await.unwrap();
    fs.write(h.fh, 0, &img.manifest).await.unwrap();
    fs.flush(h.fh).await.unwrap();
    fs.release(h.fh).await;
    assert_eq!(
        reg.manifest_head("app/web", "v2").await.unwrap().digest,
        img.manifest_digest
    );
    assert_eq!(names(&fs, "app/web/tags").await, ["v1", "v2"]);
}

/// Injected failures become errnos, nothing bad is cached, and a retry succeeds.
async fn faults(reg: Arc<dyn Registry>) {
    let img = seed(reg.as_ref()).await;
    let faulty = Arc::new(FaultyRegistry::new(reg.clone()));
    let fs = core(faulty.clone());
    let layer = names(&fs, "app/web/tags/v1/layers")
        .await
        .into_iter()
        .find(|n| n.ends_with(".tar.gz"))
        .unwrap();
    let path = format!("app/web/tags/v1/layers/{layer}");
    for fault in [
        Fault::Error(FaultError::Server),
        Fault::Truncate,
        Fault::Corrupt,
    ] {
        // A fresh core each time: what one failed read left cached is what is checked.
        let fs = core(faulty.clone());
        // Resolve the path first: the tag's lookup reads the config (for its time) through
        // the same blob path, and the fault is meant for the layer.
        walk(&fs, &path).await.unwrap();
        faulty.inject(Op::BlobRange, fault.clone());
        assert_eq!(
            read_all(&fs, &path).await.unwrap_err(),
            libc::EIO,
            "{fault:?}"
        );
        // Whole chunks that streamed in before a cut are the registry's right bytes; nothing
        // bad stayed: a clean read of the same core gives the blob its digest names.
        let data = read_all(&fs, &path)
            .await
            .unwrap_or_else(|e| panic!("{fault:?}: a clean read after it failed: {e}"));
        assert_eq!(
            sha256_digest(&data),
            img.layers[0].0,
            "{fault:?} cached bad bytes"
        );
    }
    let data = read_all(&fs, &path).await.unwrap();
    assert_eq!(sha256_digest(&data), img.layers[0].0);
    // Metadata faults, on a new core with nothing cached.
    let fs = core(faulty.clone());
    faulty.inject(Op::Manifest, Fault::Error(FaultError::Unauthorized));
    assert_eq!(
        walk(&fs, "app/web/tags/v1").await.unwrap_err(),
        libc::EACCES
    );
    faulty.inject(Op::Tags, Fault::Error(FaultError::TooManyRequests));
    let tags = walk(&fs, "app/web/tags").await.unwrap();
    assert_eq!(fs.readdir(tags).await.unwrap_err().errno, libc::EAGAIN);
    assert_eq!(faulty.pending(), 0);
}

fn on_fake(
    scenario: impl FnOnce(Arc<dyn Registry>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>,
) {
    rt().block_on(scenario(Arc::new(FakeRegistry::new())));
}

fn on_real(
    scenario: impl FnOnce(Arc<dyn Registry>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>,
) {
    let registry = TestRegistry::start();
    rt().block_on(scenario(Arc::new(registry.client())));
}

macro_rules! both {
    ($name:ident, $fake:ident, $real:ident) => {
        #[test]
        fn $fake() {
            on_fake(|r| Box::pin($name(r)));
        }
        #[test]
        fn $real() {
            on_real(|r| Box::pin($name(r)));
        }
    };
}

both!(tree_and_reads, fake_tree_and_reads, real_tree_and_reads);
both!(push_and_tag, fake_push_and_tag, real_push_and_tag);
both!(faults, fake_faults, real_faults);
