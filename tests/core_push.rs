//! Core tier, write side: the push paths against the in-memory fake, including failures the real
//! registry cannot be made to produce on demand (injected by the failure-injecting wrapper).

use std::sync::Arc;

use regfs::digest::{digest_hex, sha256_digest};
use regfs::fs::{Fs, FsOptions, Ino, ROOT_INO};
use regfs::registry::fake::FakeRegistry;
use regfs::registry::faulty::{Fault, FaultError, FaultyRegistry, Op};
use regfs::registry::Registry;

const CHUNK: u64 = 64 * 1024;

fn setup() -> (Arc<FakeRegistry>, Fs) {
    let reg = Arc::new(FakeRegistry::new());
    let fs = Fs::new(
        reg.clone() as Arc<dyn Registry>,
        FsOptions {
            upload_chunk_size: CHUNK,
            ..FsOptions::default()
        },
    );
    (reg, fs)
}

/// Like [`setup`], with the core talking to the fake through a failure-injecting wrapper.
fn setup_faulty() -> (Arc<FakeRegistry>, Arc<FaultyRegistry>, Fs) {
    let reg = Arc::new(FakeRegistry::new());
    let faults = Arc::new(FaultyRegistry::new(reg.clone()));
    let fs = Fs::new(
        faults.clone() as Arc<dyn Registry>,
        FsOptions {
            upload_chunk_size: CHUNK,
            ..FsOptions::default()
        },
    );
    (reg, faults, fs)
}

async fn walk(fs: &Fs, path: &str) -> Result<Ino, i32> {
    let mut ino = ROOT_INO;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        ino = fs.lookup(ino, part).await.map_err(|e| e.errno)?.attr.ino;
    }
    Ok(ino)
}

/// create + write in 128 KiB pieces + flush + release, like cp. Returns flush's result.
async fn copy_in(fs: &Fs, dir: &str, name: &str, data: &[u8]) -> Result<(), i32> {
    let parent = walk(fs, dir).await?;
    let (_, h) = fs.create(parent, name).await.map_err(|e| e.errno)?;
    let mut off = 0;
    for piece in data.chunks(128 * 1024) {
        if let Err(e) = fs.write(h.fh, off, piece).await {
            fs.release(h.fh).await;
            return Err(e.errno);
        }
        off += piece.len() as u64;
    }
    let r = fs.flush(h.fh).await.map_err(|e| e.errno);
    fs.release(h.fh).await;
    r
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[tokio::test]
async fn upload_is_chunked_and_committed_at_flush() {
    let (reg, fs) = setup();
    fs.mkdir(ROOT_INO, "app").await.unwrap();
    let d = data(5 * CHUNK as usize + 10);
    copy_in(&fs, "app/uploads", "f.bin", &d).await.unwrap();
    let digest = sha256_digest(&d);
    assert!(reg.has_blob("app", &digest));
    let s = reg.stats().snapshot();
    assert_eq!(s.upload_patches, 5);
    assert_eq!(s.upload_bytes, d.len() as u64);
    assert_eq!(reg.open_uploads(), 0);
    let ino = walk(&fs, "app/uploads/f.bin").await.unwrap();
    assert_eq!(
        &fs.getxattr(ino, "user.oci.digest").await.unwrap()[..],
        digest.as_bytes()
    );
    assert_eq!(fs.getattr(ino).await.unwrap().attr.size, d.len() as u64);
    // Readable back by digest.
    let b = walk(&fs, &format!("app/blobs/sha256/{}", digest_hex(&digest)))
        .await
        .unwrap();
    let h = fs.open(b, false).await.unwrap();
    assert_eq!(&fs.read(h.fh, 0, 100).await.unwrap()[..], &d[..100]);
}

#[tokio::test]
async fn a_failed_chunk_fails_close_and_cancels_the_session() {
    let (reg, faults, fs) = setup_faulty();
    fs.mkdir(ROOT_INO, "app").await.unwrap();
    faults.inject(Op::UploadPatch, Fault::Error(FaultError::Server));
    let d = data(3 * CHUNK as usize);
    let e = copy_in(&fs, "app/uploads", "f.bin", &d).await.unwrap_err();
    assert_eq!(e, libc::EIO);
    assert!(!reg.has_blob("app", &sha256_digest(&d)));
    assert_eq!(reg.open_uploads(), 0, "the upload session was cancelled");
    assert!(reg.stats().snapshot().upload_cancels >= 1);
    // Nothing claims to be complete: the entry is gone.
    assert_eq!(
        walk(&fs, "app/uploads/f.bin").await.unwrap_err(),
        libc::ENOENT
    );
}

#[tokio::test]
async fn a_failed_commit_cancels_too() {
    let (reg, faults, fs) = setup_faulty();
    fs.mkdir(ROOT_INO, "app").await.unwrap();
    faults.inject(Op::UploadFinish, Fault::Error(FaultError::Unauthorized));
    let e = copy_in(&fs, "app/uploads", "f.bin", &data(100))
        .await
        .unwrap_err();
    assert_eq!(e, libc::EIO, "a failed push is EIO whatever the cause");
    assert_eq!(reg.open_uploads(), 0);
}

#[tokio::test]
async fn fsync_sends_chunks_and_reports_failures() {
    let (reg, faults, fs) = setup_faulty();
    fs.mkdir(ROOT_INO, "app").await.unwrap();
    let parent = walk(&fs, "app/uploads").await.unwrap();
    let (_, h) = fs.create(parent, "f").await.unwrap();
    fs.write(h.fh, 0, &data(2 * CHUNK as usize + 5))
        .await
        .unwrap();
    fs.fsync(h.fh).await.unwrap();
    assert_eq!(reg.stats().snapshot().upload_patches, 2);
    assert_eq!(reg.stats().snapshot().upload_bytes, 2 * CHUNK);
    faults.inject(Op::UploadPatch, Fault::Error(FaultError::Server));
    fs.write(h.fh, 2 * CHUNK + 5, &data(CHUNK as usize))
        .await
        .unwrap();
    assert_eq!(fs.fsync(h.fh).await.unwrap_err().errno, libc::EIO);
    assert_eq!(fs.flush(h.fh).await.unwrap_err().errno, libc::EIO);
    fs.release(h.fh).await;
    assert_eq!(reg.open_uploads(), 0);
}

#[tokio::test]
async fn writes_must_be_sequential() {
    let (_reg, fs) = setup();
    fs.mkdir(ROOT_INO, "app").await.unwrap();
    let parent = walk(&fs, "app/uploads").await.unwrap();
    let (_, h) = fs.create(parent, "f").await.unwrap();
    fs.write(h.fh, 0, b"abc").await.unwrap();
    assert_eq!(
        fs.write(h.fh, 10, b"x").await.unwrap_err().errno,
        libc::EINVAL
    );
    assert_eq!(
        fs.write(h.fh, 0, b"x").await.unwrap_err().errno,
        libc::EINVAL
    );
    fs.write(h.fh, 3, b"d").await.unwrap();
    fs.flush(h.fh).await.unwrap();
    fs.release(h.fh).await;
}

#[tokio::test]
async fn blob_by_digest_checks_its_name_and_skips_existing_blobs() {
    let (reg, fs) = setup();
    fs.mkdir(ROOT_INO, "app").await.unwrap();
    let d = data(1000);
    let wrong = digest_hex(&sha256_digest(b"other")).to_string();
    assert_eq!(
        copy_in(&fs, "app/blobs/sha256", &wrong, &d)
            .await
            .unwrap_err(),
        libc::EIO
    );
    assert!(!reg.has_blob("app", &sha256_digest(&d)));
    let right = digest_hex(&sha256_digest(&d)).to_string();
    copy_in(&fs, "app/blobs/sha256", &right, &d).await.unwrap();
    assert!(reg.has_blob("app", &sha256_digest(&d)));
    let sent = reg.stats().snapshot().upload_bytes;
    let starts = reg.stats().snapshot().upload_starts;
    // Present already: checked, nothing sent.
    let ino = walk(&fs, &format!("app/blobs/sha256/{right}"))
        .await
        .unwrap();
    let h = fs.open(ino, true).await.unwrap();
    fs.write(h.fh, 0, &d).await.unwrap();
    fs.flush(h.fh).await.unwrap();
    fs.release(h.fh).await;
    assert_eq!(reg.stats().snapshot().upload_bytes, sent);
    assert_eq!(reg.stats().snapshot().upload_starts, starts);
    assert_eq!(
        copy_in(&fs, "app/blobs/sha256", "nothex", &d)
            .await
            .unwrap_err(),
        libc::EINVAL
    );
}

fn image_manifest(config: &str, config_len: usize, layers: &[(&str, usize)]) -> String {
    let layers: Vec<_> = layers
        .iter()
        .map(|(d, n)| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n}))
        .collect();
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_len},
        "layers": layers,
    })
    .to_string()
}

#[tokio::test]
async fn manifests_mount_their_blobs_from_other_repositories() {
    let (reg, fs) = setup();
    let cfg = reg.add_blob("src/app", b"{}".to_vec());
    let layer = reg.add_blob("src/app", data(5000));
    let m = image_manifest(&cfg, 2, &[(&layer, 5000)]);
    reg.add_manifest("src/app", Some("v1"), m.clone());
    // Reading the source makes regfs see where the blobs live.
    walk(&fs, "src/app/tags/v1/layers").await.unwrap();
    fs.readdir(walk(&fs, "src/app/tags/v1/layers").await.unwrap())
        .await
        .unwrap();
    fs.mkdir(ROOT_INO, "dst").await.unwrap();
    fs.mkdir(walk(&fs, "dst/tags").await.unwrap(), "v1")
        .await
        .unwrap();
    copy_in(&fs, "dst/tags/v1", "manifest.json", m.as_bytes())
        .await
        .unwrap();
    assert_eq!(reg.tag_names("dst"), vec!["v1"]);
    let s = reg.stats().snapshot();
    assert_eq!(s.blob_mounts, 2);
    assert_eq!(s.upload_bytes, 0);
    // The new tag shows without waiting for a TTL.
    let names: Vec<String> = fs
        .readdir(walk(&fs, "dst/tags").await.unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec!["v1"]);
}

#[tokio::test]
async fn a_manifest_with_a_missing_blob_is_refused_before_the_put() {
    let (reg, faults, fs) = setup_faulty();
    fs.mkdir(ROOT_INO, "dst").await.unwrap();
    fs.mkdir(walk(&fs, "dst/tags").await.unwrap(), "v1")
        .await
        .unwrap();
    let ghost = sha256_digest(b"ghost");
    let m = image_manifest(&ghost, 5, &[]);
    assert_eq!(
        copy_in(&fs, "dst/tags/v1", "manifest.json", m.as_bytes())
            .await
            .unwrap_err(),
        libc::EIO
    );
    assert!(reg.tag_names("dst").is_empty());
    assert_eq!(reg.stats().snapshot().pushes, 0, "no PUT was attempted");
    // A registry that refuses the PUT fails the copy too.
    let cfg = reg.add_blob("dst", b"{}".to_vec());
    faults.inject(Op::PutManifest, Fault::Error(FaultError::Server));
    let m = image_manifest(&cfg, 2, &[]);
    assert_eq!(
        copy_in(&fs, "dst/tags/v1", "manifest.json", m.as_bytes())
            .await
            .unwrap_err(),
        libc::EIO
    );
    assert!(reg.tag_names("dst").is_empty());
    // Not JSON at all.
    assert_eq!(
        copy_in(&fs, "dst/tags/v1", "manifest.json", b"{nope")
            .await
            .unwrap_err(),
        libc::EIO
    );
}

#[tokio::test]
async fn tag_delete_never_takes_another_tag_along() {
    let (reg, fs) = setup();
    let cfg = reg.add_blob("r", b"{}".to_vec());
    let m = image_manifest(&cfg, 2, &[]);
    reg.add_manifest("r", Some("a"), m.clone());
    reg.add_manifest("r", Some("b"), m.clone());
    let other = image_manifest(&cfg, 2, &[(&cfg, 2)]);
    reg.add_manifest("r", Some("solo"), other);
    let tags = walk(&fs, "r/tags").await.unwrap();
    assert_eq!(fs.rmdir(tags, "a").await.unwrap_err().errno, libc::EBUSY);
    assert_eq!(reg.tag_names("r"), vec!["a", "b", "solo"]);
    fs.rmdir(tags, "solo").await.unwrap();
    assert_eq!(reg.tag_names("r"), vec!["a", "b"]);
    assert_eq!(
        fs.rmdir(tags, "nope").await.unwrap_err().errno,
        libc::ENOENT
    );
    // Everything else stays read-only.
    let tag = walk(&fs, "r/tags/a").await.unwrap();
    assert_eq!(
        fs.rmdir(tag, "layers").await.unwrap_err().errno,
        libc::EROFS
    );
    assert_eq!(
        fs.create(tag, "other.json").await.unwrap_err().errno,
        libc::EROFS
    );
    assert_eq!(
        fs.mkdir(tags, "Bad Tag").await.unwrap_err().errno,
        libc::EINVAL
    );
    assert_eq!(fs.mkdir(tags, "a").await.unwrap_err().errno, libc::EEXIST);
    assert_eq!(
        fs.mkdir(ROOT_INO, "UPPER").await.unwrap_err().errno,
        libc::EINVAL
    );
}
