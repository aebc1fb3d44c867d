//! Real tier: pushing by copying, through a real mount, checked with an independent client (curl).

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::*;
use regfs::digest::{digest_hex, sha256_digest};

fn cp(src: &std::path::Path, dst: &std::path::Path) -> std::process::Output {
    Command::new("cp").arg(src).arg(dst).output().unwrap()
}

/// The blob as the registry serves it to a plain HTTP GET.
fn registry_blob(reg: &TestRegistry, repo: &str, digest: &str) -> (u16, Vec<u8>) {
    reg.curl("GET", &format!("/v2/{repo}/blobs/{digest}"))
}

#[test]
fn uploads_of_every_size_are_verified_by_an_independent_client() {
    let reg = TestRegistry::start();
    let m = TestMount::new(&reg.addr(), &["--upload-chunk-size", "64KiB"]);
    std::fs::create_dir(m.p("myapp")).unwrap();
    let chunk = 64 * 1024;
    let work = tempfile::tempdir().unwrap();
    for (name, len) in [
        ("zero", 0usize),
        ("one", 1),
        ("chunk", chunk),
        ("chunk-plus-one", chunk + 1),
        ("many", 10 * chunk + 123),
    ] {
        let data = pseudo_random(len, len as u64 + 11);
        let src = work.path().join(name);
        std::fs::write(&src, &data).unwrap();
        let before = m.stat("upload_patches");
        let out = cp(&src, &m.p(&format!("myapp/uploads/{name}")));
        assert!(
            out.status.success(),
            "{name}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            m.log_text()
        );
        let digest = sha256_digest(&data);
        if len == 0 {
            // Nothing written: committed at release, which the kernel sends after close()
            // returned. Wait for it (bounded).
            let up = m.p(&format!("myapp/uploads/{name}"));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while xattr(&up, "user.oci.digest").is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{name} never completed"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let (code, body) = registry_blob(&reg, "myapp", &digest);
        assert_eq!(code, 200, "{name}");
        assert_eq!(sha256_digest(&body), digest, "{name}");
        // Listed, sized, named by digest, and readable back by digest.
        let up = m.p(&format!("myapp/uploads/{name}"));
        assert_eq!(std::fs::metadata(&up).unwrap().len(), len as u64, "{name}");
        assert_eq!(
            xattr(&up, "user.oci.digest").unwrap(),
            digest.as_bytes(),
            "{name}"
        );
        assert_eq!(
            std::fs::read(m.p(&format!("myapp/blobs/sha256/{}", digest_hex(&digest)))).unwrap(),
            data,
            "{name}"
        );
        let patches = m.stat("upload_patches") - before;
        if len > chunk {
            assert!(patches >= 1, "{name}: {patches} PATCHes");
        }
        if name == "many" {
            assert!(patches >= 10, "{name}: {patches} PATCHes");
        }
    }
    assert_eq!(
        ls(&m.p("myapp/uploads")),
        vec!["chunk", "chunk-plus-one", "many", "one", "zero"]
    );
    assert!(ls(&m.path()).contains(&"myapp".to_string()));
}

#[test]
fn a_large_upload_is_chunked_and_memory_stays_bounded() {
    let reg = TestRegistry::start();
    let m = TestMount::new(&reg.addr(), &[]);
    std::fs::create_dir(m.p("big")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("big.bin");
    let mut f = std::fs::File::create(&src).unwrap();
    let mut hasher = regfs::digest::StreamingDigest::default();
    for i in 0..128u64 {
        let piece = pseudo_random(4 << 20, i + 100);
        hasher.update(&piece);
        f.write_all(&piece).unwrap();
    }
    drop(f);
    let digest = hasher.finish(); // 512 MiB
    let out = cp(&src, &m.p("big/uploads/big.bin"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        m.stat("upload_patches") >= 60,
        "8 MiB chunks: {}",
        m.stat("upload_patches")
    );
    assert_eq!(reg.curl("HEAD", &format!("/v2/big/blobs/{digest}")).0, 200);
    assert_eq!(
        xattr(&m.p("big/uploads/big.bin"), "user.oci.digest").unwrap(),
        digest.as_bytes()
    );
    let pid = m.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        hwm_kb < 128 * 1024,
        "peak RSS {hwm_kb} KiB while copying 512 MiB"
    );
}

#[test]
fn blob_named_by_a_wrong_digest_is_refused() {
    let reg = TestRegistry::start();
    let m = TestMount::new(&reg.addr(), &["--upload-chunk-size", "64KiB"]);
    std::fs::create_dir(m.p("wrong")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let data = pseudo_random(200_000, 5);
    let src = work.path().join("f");
    std::fs::write(&src, &data).unwrap();
    let claimed = sha256_digest(b"something else");
    let out = cp(
        &src,
        &m.p(&format!("wrong/blobs/sha256/{}", digest_hex(&claimed))),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Input/output error"));
    assert_eq!(
        reg.curl("HEAD", &format!("/v2/wrong/blobs/{claimed}")).0,
        404
    );
    assert_eq!(
        reg.curl("HEAD", &format!("/v2/wrong/blobs/{}", sha256_digest(&data)))
            .0,
        404
    );
    assert!(m.log_text().contains("not to its name"), "{}", m.log_text());
    // The right name works, and a second copy of an existing blob sends nothing.
    let right = m.p(&format!(
        "wrong/blobs/sha256/{}",
        digest_hex(&sha256_digest(&data))
    ));
    assert!(cp(&src, &right).status.success());
    assert_eq!(
        reg.curl("HEAD", &format!("/v2/wrong/blobs/{}", sha256_digest(&data)))
            .0,
        200
    );
    let sent = m.stat("upload_bytes");
    let out = cp(&src, &right);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log_text()
            .lines()
            .filter(|l| !l.contains("DEBUG hyper") && !l.contains("reqwest"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        m.stat("upload_bytes"),
        sent,
        "an existing blob is not sent twice"
    );
}

#[test]
fn an_out_of_order_write_is_einval_and_poisons_the_file() {
    let reg = TestRegistry::start();
    let m = TestMount::new(&reg.addr(), &[]);
    std::fs::create_dir(m.p("ooo")).unwrap();
    let f = std::fs::File::create(m.p("ooo/uploads/x")).unwrap();
    f.write_at(b"hello", 0).unwrap();
    let e = f.write_at(b"world", 100).unwrap_err();
    assert_eq!(errno(&e), libc::EINVAL, "{e}");
    // From then on every write fails, and so does close; nothing is pushed or listed.
    let e = f.write_at(b"again", 5).unwrap_err();
    assert_eq!(errno(&e), libc::EIO, "{e}");
    // SAFETY: the descriptor is ours, closed once here (File's drop would ignore the error).
    let rc = unsafe { libc::close(std::os::fd::IntoRawFd::into_raw_fd(f)) };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EIO)
    );
    assert!(ls(&m.p("ooo/uploads")).is_empty());
    let (code, _) = reg.curl(
        "HEAD",
        &format!("/v2/ooo/blobs/{}", sha256_digest(b"hello")),
    );
    assert_eq!(code, 404);
}

#[test]
fn killing_the_registry_mid_copy_fails_cp_and_leaves_no_tag() {
    let mut reg = TestRegistry::start();
    let m = TestMount::new(
        &reg.addr(),
        // A short retry budget: the registry stays down, and only a spent budget fails.
        &[
            "--upload-chunk-size",
            "64KiB",
            "--request-timeout",
            "5s",
            "--retry-budget",
            "1s",
        ],
    );
    std::fs::create_dir(m.p("victim")).unwrap();
    std::fs::create_dir(m.p("victim/tags/v1")).unwrap();
    // A FIFO as the source, so the test decides when cp's input continues.
    let work = tempfile::tempdir().unwrap();
    let fifo = work.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let cp_child = Command::new("cp")
        .arg(&fifo)
        .arg(m.p("victim/uploads/layer.bin"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    w.write_all(&pseudo_random(1 << 20, 9)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while m.stat("upload_patches") < 2 {
        assert!(std::time::Instant::now() < deadline, "no PATCH seen");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    reg.stop();
    let _ = w.write_all(&pseudo_random(1 << 20, 10));
    drop(w);
    let out = cp_child.wait_with_output().unwrap();
    assert!(!out.status.success(), "cp must fail");
    // The uploads entry does not claim a complete blob.
    assert!(xattr(&m.p("victim/uploads/layer.bin"), "user.oci.digest").is_err());
    // A manifest push now fails too.
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let src = work.path().join("manifest.json");
    std::fs::write(&src, manifest).unwrap();
    assert!(!cp(&src, &m.p("victim/tags/v1/manifest.json"))
        .status
        .success());
    // Back up on the same storage: no tag, no blob.
    reg.restart();
    let (code, body) = reg.curl("GET", "/v2/victim/tags/list");
    let tags: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    assert!(
        code == 404 || tags["tags"].as_array().is_none_or(|t| t.is_empty()),
        "{code} {tags}"
    );
}

/// Seed staging/api:1.4 (two layers) and multi/arch:latest (an index).
fn seed_staging(reg: &TestRegistry) -> (Pushed, String) {
    let client = reg.client();
    rt().block_on(async {
        let a = push_image(
            &client,
            "staging/api",
            Some("1.4"),
            "amd64",
            &[
                Layer::gzip(&make_tar(&[("app/bin", &pseudo_random(3 << 20, 1))])),
                Layer::tar(&make_tar(&[("etc/conf", b"x=1\n")])),
            ],
        )
        .await;
        let amd = push_image(
            &client,
            "staging/multi",
            None,
            "amd64",
            &[Layer::tar(&make_tar(&[("a", b"1")]))],
        )
        .await;
        let arm = push_image(
            &client,
            "staging/multi",
            None,
            "arm64",
            &[Layer::tar(&make_tar(&[("b", b"2")]))],
        )
        .await;
        let (_, idx) = push_index(
            &client,
            "staging/multi",
            "latest",
            &[("linux/amd64", &amd), ("linux/arm64", &arm)],
        )
        .await;
        (a, idx)
    })
}

#[test]
fn promotion_mounts_blobs_instead_of_copying_them() {
    let reg = TestRegistry::start();
    let (api, idx) = seed_staging(&reg);
    let m = TestMount::new(&reg.addr(), &[]);
    std::fs::create_dir_all(m.p("prod/api/tags/1.4")).unwrap();
    let out = cp(
        &m.p("staging/api/tags/1.4/manifest.json"),
        &m.p("prod/api/tags/1.4/manifest.json"),
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log_text()
    );
    assert_eq!(m.stat("upload_bytes"), 0, "no layer bytes uploaded");
    assert!(
        m.stat("blob_mounts") >= 3,
        "config + 2 layers mounted: {}",
        m.stat("blob_mounts")
    );
    // The registry has it, under the same digest.
    let (code, body) = reg.curl("GET", "/v2/prod/api/manifests/1.4");
    assert_eq!(code, 200);
    assert_eq!(sha256_digest(&body), api.manifest_digest);
    // And the mount shows it at once, without waiting for a TTL.
    assert_eq!(ls(&m.p("prod/api/tags")), vec!["1.4"]);
    assert_eq!(
        std::fs::read(m.p("prod/api/tags/1.4/config.json")).unwrap(),
        api.config
    );
    assert_eq!(
        xattr(&m.p("prod/api/tags/1.4"), "user.oci.digest").unwrap(),
        api.manifest_digest.as_bytes()
    );
    assert!(ls(&m.path()).contains(&"prod".to_string()));

    // An index: its child manifests are copied by digest first.
    std::fs::create_dir_all(m.p("prod/multi/tags/latest")).unwrap();
    let out = cp(
        &m.p("staging/multi/tags/latest/manifest.json"),
        &m.p("prod/multi/tags/latest/manifest.json"),
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log_text()
    );
    let (code, body) = reg.curl("GET", "/v2/prod/multi/manifests/latest");
    assert_eq!(code, 200);
    assert_eq!(sha256_digest(&body), idx);
    assert_eq!(m.stat("upload_bytes"), 0);
}

#[test]
fn a_manifest_with_a_missing_blob_fails_clearly() {
    let reg = TestRegistry::start();
    seed_staging(&reg);
    let m = TestMount::new(&reg.addr(), &[]);
    std::fs::create_dir_all(m.p("prod/bad/tags/v1")).unwrap();
    let ghost = sha256_digest(b"nobody has this");
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{ghost}","size":15}},"layers":[]}}"#
    );
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("m.json");
    std::fs::write(&src, manifest).unwrap();
    let out = cp(&src, &m.p("prod/bad/tags/v1/manifest.json"));
    assert!(!out.status.success());
    let log = m.log_text();
    assert!(
        log.contains(&format!("config {ghost} is missing from prod/bad")),
        "{log}"
    );
    assert_eq!(reg.curl("HEAD", "/v2/prod/bad/manifests/v1").0, 404);
    // Malformed JSON fails too, and says so.
    std::fs::write(&src, b"{not json").unwrap();
    assert!(!cp(&src, &m.p("prod/bad/tags/v1/manifest.json"))
        .status
        .success());
    assert!(m.log_text().contains("not JSON"), "{}", m.log_text());
}

#[test]
fn retagging_and_tag_deletion() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let (a, b) = rt().block_on(async {
        let a = push_image(
            &client,
            "rt/app",
            Some("v1"),
            "amd64",
            &[Layer::tar(&make_tar(&[("a", b"1")]))],
        )
        .await;
        let b = push_image(
            &client,
            "rt/app",
            Some("v2"),
            "amd64",
            &[Layer::tar(&make_tar(&[("b", b"2")]))],
        )
        .await;
        (a, b)
    });
    let m = TestMount::new(&reg.addr(), &[]);
    // Re-tag: overwrite v2's manifest.json with v1's.
    let out = cp(
        &m.p("rt/app/tags/v1/manifest.json"),
        &m.p("rt/app/tags/v2/manifest.json"),
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log_text()
    );
    let (_, body) = reg.curl("GET", "/v2/rt/app/manifests/v2");
    assert_eq!(sha256_digest(&body), a.manifest_digest);
    assert_eq!(
        xattr(&m.p("rt/app/tags/v2"), "user.oci.digest").unwrap(),
        a.manifest_digest.as_bytes()
    );
    let _ = b;

    // v1 and v2 now share a digest: deleting one would delete both, so regfs refuses.
    let e = std::fs::remove_dir(m.p("rt/app/tags/v1")).unwrap_err();
    assert_eq!(errno(&e), libc::EBUSY, "{e}");
    assert!(
        m.log_text().contains("point to the same manifest"),
        "{}",
        m.log_text()
    );
    assert_eq!(reg.curl("HEAD", "/v2/rt/app/manifests/v1").0, 200);
    assert_eq!(reg.curl("HEAD", "/v2/rt/app/manifests/v2").0, 200);

    // A tag alone on its digest is deleted, and nothing else.
    std::fs::create_dir(m.p("rt/app/tags/solo")).unwrap();
    let solo = rt().block_on(push_image(
        &client,
        "rt/app",
        Some("solo"),
        "arm64",
        &[Layer::tar(&make_tar(&[("c", b"3")]))],
    ));
    std::fs::remove_dir(m.p("rt/app/tags/solo")).unwrap();
    assert_eq!(reg.curl("HEAD", "/v2/rt/app/manifests/solo").0, 404);
    assert_eq!(
        reg.curl(
            "HEAD",
            &format!("/v2/rt/app/manifests/{}", solo.manifest_digest)
        )
        .0,
        404
    );
    assert_eq!(reg.curl("HEAD", "/v2/rt/app/manifests/v1").0, 200);
    assert!(!ls(&m.p("rt/app/tags")).contains(&"solo".to_string()));
    // A pending (never pushed) tag is just forgotten.
    std::fs::create_dir(m.p("rt/app/tags/never")).unwrap();
    assert!(ls(&m.p("rt/app/tags")).contains(&"never".to_string()));
    std::fs::remove_dir(m.p("rt/app/tags/never")).unwrap();
    assert!(!ls(&m.p("rt/app/tags")).contains(&"never".to_string()));
}

#[test]
fn concurrent_uploads_and_reads() {
    let reg = TestRegistry::start();
    let (api, _) = seed_staging(&reg);
    let m = TestMount::new(&reg.addr(), &["--upload-chunk-size", "256KiB"]);
    let work = tempfile::tempdir().unwrap();
    let mut children = Vec::new();
    for i in 0..3 {
        let repo = format!("conc/r{i}");
        std::fs::create_dir_all(m.p(&repo)).unwrap();
        let src = work.path().join(format!("f{i}"));
        std::fs::write(&src, pseudo_random(6 << 20, i + 40)).unwrap();
        children.push((
            src.clone(),
            repo.clone(),
            Command::new("cp")
                .arg(&src)
                .arg(m.p(&format!("{repo}/uploads/f")))
                .spawn()
                .unwrap(),
        ));
    }
    // Reads stay responsive while the uploads run.
    for _ in 0..5 {
        assert_eq!(
            std::fs::read(m.p("staging/api/tags/1.4/config.json")).unwrap(),
            api.config
        );
        assert!(!ls(&m.p("staging")).is_empty());
    }
    for (src, repo, mut c) in children {
        assert!(c.wait().unwrap().success());
        let digest = sha256_digest(&std::fs::read(&src).unwrap());
        assert_eq!(
            reg.curl("HEAD", &format!("/v2/{repo}/blobs/{digest}")).0,
            200
        );
    }
}
