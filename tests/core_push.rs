//! Core tier, write side: the push paths against the in-memory fake, including failures the real
//! registry cannot be made to produce on demand (injected by the failure-injecting wrapper).

mod common;

use std::sync::Arc;

use common::walk;

use regfs::digest::{digest_hex, sha256_digest};
use regfs::fs::{Fs, FsOptions, Ino, ROOT_INO};
use regfs::registry::fake::FakeRegistry;
use regfs::registry::faulty::{Fault, FaultError, FaultyRegistry, Gate, Op};
use regfs::registry::Registry;

const CHUNK: u64 = 64 * 1024;

fn setup() -> (Arc<FakeRegistry>, Arc<Fs>) {
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
fn setup_faulty() -> (Arc<FakeRegistry>, Arc<FaultyRegistry>, Arc<Fs>) {
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
    // A multi-chunk upload whose closing PUT fails (the client's retry budget spent): the
    // PATCHes went, yet nothing is listed and the registry has no blob.
    faults.inject(Op::UploadFinish, Fault::Error(FaultError::Server));
    let d = data(3 * CHUNK as usize + 5);
    let e = copy_in(&fs, "app/uploads", "g.bin", &d).await.unwrap_err();
    assert_eq!(e, libc::EIO);
    assert_eq!(reg.stats().snapshot().upload_patches, 3);
    assert!(names(&fs, "app/uploads").await.is_empty(), "nothing listed");
    assert!(!reg.has_blob("app", &sha256_digest(&d)));
    assert_eq!(reg.open_uploads(), 0, "the session was cancelled");
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

/// Let spawned tasks run up to their next wait (a `#[tokio::test]` runtime has one thread).
async fn let_run() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// `open` for reading, in a task of its own.
fn open_read(fs: &Arc<Fs>, ino: Ino) -> tokio::task::JoinHandle<Result<u64, i32>> {
    let fs = fs.clone();
    tokio::spawn(async move {
        fs.open(ino, false)
            .await
            .map(|o| o.fh.0)
            .map_err(|e| e.errno)
    })
}

#[tokio::test]
async fn a_reader_waits_for_the_commit_under_way() {
    let (reg, faults, fs) = setup_faulty();
    fs.mkdir(ROOT_INO, "app").await.unwrap();
    let parent = walk(&fs, "app/uploads").await.unwrap();
    let d = data(3 * CHUNK as usize + 7);
    let digest = sha256_digest(&d);
    // `cat a > uploads/x; sha256sum uploads/x` from two processes: the writer's close is still
    // committing (held at the closing PUT) when the reader opens.
    let gate = Gate::new();
    faults.inject_for(Op::UploadFinish, &digest, Fault::Hold(gate.clone()));
    let (_, h) = fs.create(parent, "x").await.unwrap();
    fs.write(h.fh, 0, &d).await.unwrap();
    let closing = tokio::spawn({
        let fs = fs.clone();
        async move { fs.flush(h.fh).await }
    });
    gate.arrived().await;
    let x = walk(&fs, "app/uploads/x").await.unwrap();
    let reader = open_read(&fs, x);
    let_run().await;
    assert!(!reader.is_finished(), "the open waits for the commit");
    assert!(!reg.has_blob("app", &digest));
    gate.open();
    closing.await.unwrap().unwrap();
    let fh = regfs::fs::Fh(reader.await.unwrap().unwrap());
    let got = fs.read(fh, 0, d.len() as u32).await.unwrap();
    assert_eq!(sha256_digest(&got), digest, "the committed blob");
    fs.release(fh).await;
    fs.release(h.fh).await;

    // A commit that fails while the reader waits: EIO, and nothing is listed.
    let small = data(100);
    let gate = Gate::new();
    let small_digest = sha256_digest(&small);
    faults.inject_for(Op::BlobHead, &small_digest, Fault::Hold(gate.clone()));
    faults.inject_for(
        Op::UploadFinish,
        &small_digest,
        Fault::Error(FaultError::Server),
    );
    let (_, h) = fs.create(parent, "y").await.unwrap();
    fs.write(h.fh, 0, &small).await.unwrap();
    let closing = tokio::spawn({
        let fs = fs.clone();
        async move { fs.flush(h.fh).await.map_err(|e| e.errno) }
    });
    gate.arrived().await;
    let reader = open_read(&fs, walk(&fs, "app/uploads/y").await.unwrap());
    let_run().await;
    assert!(!reader.is_finished());
    gate.open();
    assert_eq!(closing.await.unwrap().unwrap_err(), libc::EIO);
    assert_eq!(reader.await.unwrap().unwrap_err(), libc::EIO);
    fs.release(h.fh).await;
    assert_eq!(names(&fs, "app/uploads").await, ["x"]);
}

#[tokio::test]
async fn a_reader_waits_for_a_commit_at_release_but_not_for_a_writer() {
    let (_reg, faults, fs) = setup_faulty();
    fs.mkdir(ROOT_INO, "app").await.unwrap();
    let parent = walk(&fs, "app/uploads").await.unwrap();
    // `: > uploads/e; sha256sum uploads/e`: the shell's close is deferred (nothing written), the
    // commit comes at RELEASE, which the reader's open may overtake.
    let empty = sha256_digest(b"");
    let gate = Gate::new();
    faults.inject_for(Op::BlobHead, &empty, Fault::Hold(gate.clone()));
    let (_, h) = fs.create(parent, "e").await.unwrap();
    fs.set_opener(h.fh, 7).await;
    fs.flush_by(h.fh, Some(7)).await.unwrap();
    let reader = open_read(&fs, walk(&fs, "app/uploads/e").await.unwrap());
    let_run().await;
    assert!(!reader.is_finished(), "the open waits for the release");
    let releasing = tokio::spawn({
        let fs = fs.clone();
        async move { fs.release(h.fh).await }
    });
    gate.arrived().await;
    let_run().await;
    assert!(!reader.is_finished(), "and for the commit it starts");
    gate.open();
    releasing.await.unwrap();
    let fh = regfs::fs::Fh(reader.await.unwrap().unwrap());
    assert!(fs.read(fh, 0, 10).await.unwrap().is_empty());
    fs.release(fh).await;

    // Still being written (no flush since the last write): EBUSY at once.
    let (_, h) = fs.create(parent, "w").await.unwrap();
    fs.write(h.fh, 0, b"partial").await.unwrap();
    let w = walk(&fs, "app/uploads/w").await.unwrap();
    assert_eq!(fs.open(w, false).await.unwrap_err().errno, libc::EBUSY);
    fs.release(h.fh).await;
}

/// Names listed in a directory.
async fn names(fs: &Fs, dir: &str) -> Vec<String> {
    let ino = walk(fs, dir).await.unwrap();
    fs.readdir(ino)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect()
}

#[tokio::test]
async fn an_out_of_order_write_poisons_the_handle() {
    let (reg, fs) = setup();
    fs.mkdir(ROOT_INO, "app").await.unwrap();
    let parent = walk(&fs, "app/uploads").await.unwrap();
    let (_, h) = fs.create(parent, "f").await.unwrap();
    // More than a chunk: a session is open when the bad write comes.
    let d = data(CHUNK as usize + 100);
    fs.write(h.fh, 0, &d).await.unwrap();
    assert_eq!(
        fs.write(h.fh, 10, b"x").await.unwrap_err().errno,
        libc::EINVAL
    );
    // Poisoned: the right offset fails too, and so does close.
    let end = d.len() as u64;
    assert_eq!(
        fs.write(h.fh, end, b"d").await.unwrap_err().errno,
        libc::EIO
    );
    assert_eq!(fs.flush(h.fh).await.unwrap_err().errno, libc::EIO);
    assert_eq!(fs.fsync(h.fh).await.unwrap_err().errno, libc::EIO);
    fs.release(h.fh).await;
    assert!(!reg.has_blob("app", &sha256_digest(&d)));
    assert!(!reg.has_blob("app", &sha256_digest(&d[..CHUNK as usize])));
    assert_eq!(reg.open_uploads(), 0, "the session was cancelled");
    assert!(reg.stats().snapshot().upload_cancels >= 1);
    assert!(names(&fs, "app/uploads").await.is_empty(), "nothing listed");
    assert_eq!(walk(&fs, "app/uploads/f").await.unwrap_err(), libc::ENOENT);
}

#[tokio::test]
async fn a_failed_chunk_poisons_before_close() {
    let (reg, faults, fs) = setup_faulty();
    fs.mkdir(ROOT_INO, "app").await.unwrap();
    let parent = walk(&fs, "app/uploads").await.unwrap();
    let (_, h) = fs.create(parent, "f").await.unwrap();
    faults.inject(Op::UploadPatch, Fault::Error(FaultError::Server));
    let d = data(4 * CHUNK as usize);
    // The first PATCH fails in the background; a later write sees it.
    let mut failed_at = None;
    for (i, piece) in d.chunks(CHUNK as usize).enumerate() {
        if let Err(e) = fs.write(h.fh, i as u64 * CHUNK, piece).await {
            failed_at = Some((i, e.errno));
            break;
        }
    }
    let (i, errno) = failed_at.expect("a write fails");
    assert_eq!(errno, libc::EIO);
    assert!(names(&fs, "app/uploads").await.is_empty());
    let next = (i as u64 + 1) * CHUNK;
    assert_eq!(
        fs.write(h.fh, next, b"x").await.unwrap_err().errno,
        libc::EIO
    );
    assert_eq!(fs.flush(h.fh).await.unwrap_err().errno, libc::EIO);
    fs.release(h.fh).await;
    assert_eq!(reg.open_uploads(), 0);
    assert!(names(&fs, "app/uploads").await.is_empty());
}

#[tokio::test]
async fn a_too_large_manifest_poisons_and_tags_nothing() {
    let (reg, fs) = setup();
    let cfg = reg.add_blob("r", b"{}".to_vec());
    let m = image_manifest(&cfg, 2, &[]);
    let tags = walk(&fs, "r/tags").await.unwrap();
    let t = fs.mkdir(tags, "big").await.unwrap().attr.ino;
    let (_, h) = fs.create(t, "manifest.json").await.unwrap();
    fs.write(h.fh, 0, m.as_bytes()).await.unwrap();
    let pad = vec![b' '; 4 << 20];
    let off = m.len() as u64;
    assert_eq!(
        fs.write(h.fh, off, &pad).await.unwrap_err().errno,
        libc::EFBIG
    );
    // A valid manifest was written before the failure: still nothing is pushed.
    assert_eq!(fs.flush(h.fh).await.unwrap_err().errno, libc::EIO);
    fs.release(h.fh).await;
    assert!(reg.tag_names("r").is_empty());
    assert_eq!(reg.stats().snapshot().pushes, 0);
}

#[tokio::test]
async fn flush_commits_only_for_the_opener_after_a_write() {
    let (reg, fs) = setup();
    fs.mkdir(ROOT_INO, "app").await.unwrap();
    let parent = walk(&fs, "app/uploads").await.unwrap();
    // `{ cat a; cat b; } > uploads/x`: the shell (100) opens, closes its copy after dup2 before
    // anything is written, two children write and exit, the shell's restore closes last.
    let (_, h) = fs.create(parent, "x").await.unwrap();
    fs.set_opener(h.fh, 100).await;
    fs.flush_by(h.fh, Some(100)).await.unwrap();
    fs.write(h.fh, 0, b"first ").await.unwrap();
    fs.flush_by(h.fh, Some(201)).await.unwrap();
    fs.write(h.fh, 6, b"second").await.unwrap();
    fs.flush_by(h.fh, Some(202)).await.unwrap();
    assert_eq!(reg.stats().snapshot().upload_starts, 0, "nothing sent yet");
    let x = walk(&fs, "app/uploads/x").await.unwrap();
    assert!(
        fs.getxattr(x, "user.oci.digest").await.is_err(),
        "not complete yet"
    );
    fs.flush_by(h.fh, Some(100)).await.unwrap();
    let digest = sha256_digest(b"first second");
    assert!(reg.has_blob("app", &digest));
    assert_eq!(
        &fs.getxattr(x, "user.oci.digest").await.unwrap()[..],
        digest.as_bytes()
    );
    // A write after the commit fails and poisons: close reports it; what was pushed stays.
    assert_eq!(fs.write(h.fh, 12, b"!").await.unwrap_err().errno, libc::EIO);
    assert_eq!(
        fs.flush_by(h.fh, Some(100)).await.unwrap_err().errno,
        libc::EIO
    );
    fs.release(h.fh).await;
    assert!(reg.has_blob("app", &digest));
    assert_eq!(reg.stats().snapshot().upload_starts, 1);

    // Written and closed by another process only: committed at release.
    let (_, h) = fs.create(parent, "y").await.unwrap();
    fs.set_opener(h.fh, 100).await;
    fs.write(h.fh, 0, b"from a child").await.unwrap();
    fs.flush_by(h.fh, Some(300)).await.unwrap();
    assert!(!reg.has_blob("app", &sha256_digest(b"from a child")));
    fs.release(h.fh).await;
    assert!(reg.has_blob("app", &sha256_digest(b"from a child")));
}

#[tokio::test]
async fn an_empty_file_is_committed_at_release_and_never_listed_complete_before() {
    let (reg, fs) = setup();
    fs.mkdir(ROOT_INO, "app").await.unwrap();
    let parent = walk(&fs, "app/uploads").await.unwrap();
    let (_, h) = fs.create(parent, "empty").await.unwrap();
    fs.set_opener(h.fh, 7).await;
    fs.flush_by(h.fh, Some(7)).await.unwrap();
    fs.flush_by(h.fh, Some(7)).await.unwrap();
    let empty = sha256_digest(b"");
    assert!(!reg.has_blob("app", &empty));
    let ino = walk(&fs, "app/uploads/empty").await.unwrap();
    assert!(fs.getxattr(ino, "user.oci.digest").await.is_err());
    fs.release(h.fh).await;
    assert!(reg.has_blob("app", &empty));
    assert_eq!(
        &fs.getxattr(ino, "user.oci.digest").await.unwrap()[..],
        empty.as_bytes()
    );
    assert_eq!(names(&fs, "app/uploads").await, ["empty"]);
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

#[tokio::test]
async fn tag_delete_refuses_when_any_head_fails_and_sends_no_delete() {
    let (reg, faults, fs) = setup_faulty();
    let cfg = reg.add_blob("r", b"{}".to_vec());
    reg.add_manifest("r", Some("a"), image_manifest(&cfg, 2, &[]));
    reg.add_manifest("r", Some("b"), image_manifest(&cfg, 2, &[(&cfg, 2)]));
    let tags = walk(&fs, "r/tags").await.unwrap();
    for failing in ["b", "a"] {
        // Another tag's HEAD fails (then the tag's own): cannot prove "alone", so no delete.
        faults.inject_for(Op::ManifestHead, failing, Fault::Error(FaultError::Server));
        assert_eq!(fs.rmdir(tags, "a").await.unwrap_err().errno, libc::EIO);
        assert_eq!(
            faults.pending(),
            0,
            "the HEAD of {failing} was sent and failed"
        );
        assert_eq!(reg.stats().snapshot().deletes, 0);
        assert_eq!(reg.tag_names("r"), ["a", "b"]);
    }
    // A failing tag list refuses too.
    faults.inject(Op::Tags, Fault::Error(FaultError::Server));
    assert_eq!(fs.rmdir(tags, "a").await.unwrap_err().errno, libc::EIO);
    assert_eq!(reg.stats().snapshot().deletes, 0);
    // All HEADs answer: a lone tag goes.
    fs.rmdir(tags, "a").await.unwrap();
    assert_eq!(reg.tag_names("r"), ["b"]);
}

#[tokio::test]
async fn tag_delete_refuses_a_manifest_a_tagged_index_lists() {
    let (reg, fs) = setup();
    let cfg = reg.add_blob("r", b"{}".to_vec());
    let child = reg.add_manifest("r", Some("amd64"), image_manifest(&cfg, 2, &[]));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": child, "size": image_manifest(&cfg, 2, &[]).len(),
                       "platform": {"os": "linux", "architecture": "amd64"}}],
    })
    .to_string();
    reg.add_manifest("r", Some("latest"), index);
    let tags = walk(&fs, "r/tags").await.unwrap();
    assert_eq!(
        fs.rmdir(tags, "amd64").await.unwrap_err().errno,
        libc::EBUSY
    );
    assert_eq!(reg.stats().snapshot().deletes, 0);
    // The index itself may go: its children stay.
    fs.rmdir(tags, "latest").await.unwrap();
    assert_eq!(reg.tag_names("r"), ["amd64"]);
    // Untagged now: the child can go too.
    fs.rmdir(tags, "amd64").await.unwrap();
    assert!(reg.tag_names("r").is_empty());
}

#[tokio::test]
async fn writable_files_show_the_owners_write_bit() {
    let (reg, fs) = setup();
    let cfg = reg.add_blob("r", b"{}".to_vec());
    reg.add_manifest("r", Some("a"), image_manifest(&cfg, 2, &[]));
    let perm = |ino| {
        let fs = &fs;
        async move { fs.getattr(ino).await.unwrap().attr.perm }
    };
    let m = walk(&fs, "r/tags/a/manifest.json").await.unwrap();
    assert_eq!(perm(m).await, 0o644);
    let blob = walk(&fs, &format!("r/blobs/sha256/{}", digest_hex(&cfg)))
        .await
        .unwrap();
    assert_eq!(perm(blob).await, 0o644);
    let c = walk(&fs, "r/tags/a/config.json").await.unwrap();
    assert_eq!(perm(c).await, 0o444, "read-only files stay read-only");
    let lookup = fs.lookup(walk(&fs, "r/tags/a").await.unwrap(), "manifest.json");
    assert_eq!(lookup.await.unwrap().attr.perm, 0o644);
}
