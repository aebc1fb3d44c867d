//! Real tier: a real docker-registry on loopback, a real FUSE mount, checked with ordinary file
//! operations.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;

use common::*;
use regfs::digest::{digest_hex, sha256_digest};
use regfs::registry::{push_whole_blob, Registry};

#[test]
fn browse_image_tree() {
    let s = seeded();
    let m = TestMount::new(&s.reg.addr(), &[]);

    assert_eq!(ls(&m.path()), vec![".regfs", "debian", "multi"]);
    assert_eq!(ls(&m.p("debian")), vec!["min"]);
    assert_eq!(
        ls(&m.p("debian/min")),
        vec!["blobs", "index.json", "oci-layout", "tags", "uploads"]
    );
    assert_eq!(ls(&m.p("debian/min/tags")), vec!["bookworm"]);
    let tag = m.p("debian/min/tags/bookworm");
    assert_eq!(
        ls(&tag),
        vec!["config.json", "layers", "manifest.json", "rootfs"]
    );

    // manifest.json: byte for byte, sha256 == its digest, xattrs.
    let manifest = std::fs::read(tag.join("manifest.json")).unwrap();
    assert_eq!(manifest, s.min.manifest);
    assert_eq!(sha256_digest(&manifest), s.min.manifest_digest);
    assert_eq!(
        xattr(&tag.join("manifest.json"), "user.oci.digest").unwrap(),
        s.min.manifest_digest.as_bytes()
    );
    assert_eq!(
        xattr(&tag.join("manifest.json"), "user.oci.mediatype").unwrap(),
        b"application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        xattr(&tag, "user.oci.digest").unwrap(),
        s.min.manifest_digest.as_bytes()
    );

    // config.json
    assert_eq!(
        std::fs::read(tag.join("config.json")).unwrap(),
        s.min.config
    );
    assert_eq!(
        xattr(&tag.join("config.json"), "user.oci.digest").unwrap(),
        s.min.config_digest.as_bytes()
    );

    // layers: names, exact sizes, sha256 == digest, media types.
    let names = ls_files(&tag.join("layers"));
    let exts = ["tar.gz", "tar", "tar.zst"];
    assert_eq!(names.len(), 3);
    for (i, (digest, size, mt)) in s.min.layers.iter().enumerate() {
        let name = format!("{i:02}-{}.{}", &digest_hex(digest)[..12], exts[i]);
        assert_eq!(names[i], name);
        let p = tag.join("layers").join(&name);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), *size);
        assert_eq!(sha256_file(&p), *digest);
        assert_eq!(xattr(&p, "user.oci.mediatype").unwrap(), mt.as_bytes());
    }

    // blobs/sha256/<hex>: configs, layers and manifests by digest.
    for d in [
        &s.min.config_digest,
        &s.min.layers[0].0,
        &s.min.manifest_digest,
    ] {
        let p = m.p(&format!("debian/min/blobs/sha256/{}", digest_hex(d)));
        assert_eq!(sha256_file(&p), *d, "{d}");
    }
    let listed = ls(&m.p("debian/min/blobs/sha256"));
    assert!(listed.contains(&digest_hex(&s.min.config_digest).to_string()));

    // Read-only: EROFS; unknown names: ENOENT.
    let e = std::fs::write(m.p("debian/min/tags/bookworm/new"), b"x").unwrap_err();
    assert_eq!(errno(&e), libc::EROFS, "{e}");
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(tag.join("config.json"))
        .unwrap_err();
    assert_eq!(errno(&e), libc::EROFS, "{e}");
    let e = std::fs::create_dir(m.p("debian/min/tags/bookworm/layers/x")).unwrap_err();
    assert_eq!(errno(&e), libc::EROFS, "{e}");
    let e = std::fs::remove_file(tag.join("config.json")).unwrap_err();
    assert_eq!(errno(&e), libc::EROFS, "{e}");
    for missing in [
        "nope",
        "debian/nope",
        "debian/min/tags/nope",
        "debian/min/tags/bookworm/nope",
        "debian/min/blobs/sha256/0000000000000000000000000000000000000000000000000000000000000000",
        "debian/min/blobs/sha256/not-a-digest",
        "Invalid_Name",
    ] {
        let e = std::fs::metadata(m.p(missing)).unwrap_err();
        assert_eq!(errno(&e), libc::ENOENT, "{missing}: {e}");
    }
    // A file is not a directory.
    let e = std::fs::read_dir(tag.join("config.json")).unwrap_err();
    assert_eq!(errno(&e), libc::ENOTDIR, "{e}");
}

#[test]
fn multi_arch_index() {
    let s = seeded();
    let m = TestMount::new(&s.reg.addr(), &["--platform", "linux/arm64"]);
    let tag = m.p("multi/arch/tags/latest");
    assert_eq!(
        ls(&tag),
        vec![
            "config.json",
            "layers",
            "linux-amd64",
            "linux-arm64-v8",
            "manifest.json",
            "rootfs"
        ]
    );
    assert_eq!(
        xattr(&tag, "user.oci.digest").unwrap(),
        s.index_digest.as_bytes()
    );
    assert_eq!(
        xattr(&tag.join("manifest.json"), "user.oci.mediatype").unwrap(),
        b"application/vnd.oci.image.index.v1+json"
    );
    // The tag level shows the --platform entry.
    assert_eq!(
        std::fs::read(tag.join("config.json")).unwrap(),
        s.arm.config
    );
    // Each platform directory is a whole image.
    assert_eq!(
        std::fs::read(tag.join("linux-amd64/config.json")).unwrap(),
        s.amd.config
    );
    assert_eq!(
        std::fs::read(tag.join("linux-amd64/manifest.json")).unwrap(),
        s.amd.manifest
    );
    assert_eq!(
        xattr(&tag.join("linux-arm64-v8"), "user.oci.digest").unwrap(),
        s.arm.manifest_digest.as_bytes()
    );
    let layers = ls_files(&tag.join("linux-amd64/layers"));
    assert_eq!(layers.len(), 1);
    assert_eq!(
        sha256_file(&tag.join("linux-amd64/layers").join(&layers[0])),
        s.amd.layers[0].0
    );
}

#[test]
fn oci_layout_files() {
    let s = seeded();
    let m = TestMount::new(&s.reg.addr(), &[]);
    assert_eq!(
        std::fs::read(m.p("debian/min/oci-layout")).unwrap(),
        br#"{"imageLayoutVersion":"1.0.0"}"#
    );
    let raw = std::fs::read(m.p("debian/min/index.json")).unwrap();
    let idx: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_else(|e| {
        panic!(
            "{e}: {:?} {:?}\n{}",
            String::from_utf8_lossy(&raw),
            std::fs::metadata(m.p("debian/min/index.json")),
            m.log_text()
        )
    });
    let entries = idx["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["digest"], s.min.manifest_digest.as_str());
    assert_eq!(entries[0]["size"], s.min.manifest.len());
    assert_eq!(
        entries[0]["annotations"]["org.opencontainers.image.ref.name"],
        "bookworm"
    );
    // stat size equals the bytes read.
    let meta = std::fs::metadata(m.p("debian/min/index.json")).unwrap();
    assert_eq!(
        meta.len() as usize,
        std::fs::read(m.p("debian/min/index.json")).unwrap().len()
    );
}

#[test]
fn skopeo_reads_the_repo_as_an_oci_layout() {
    let s = seeded();
    let m = TestMount::new(&s.reg.addr(), &[]);
    let out = std::process::Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci:{}:bookworm", m.p("debian/min").display()))
        .output()
        .expect("skopeo must be installed");
    assert!(
        out.status.success(),
        "skopeo failed: {}\nregfs log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log_text()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["Digest"], s.min.manifest_digest.as_str());
    assert_eq!(v["Architecture"], "amd64");
    assert_eq!(v["Layers"].as_array().unwrap().len(), 3);
}

#[test]
fn sizes_and_reads_are_lazy() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let big = pseudo_random(8 << 20, 7);
    let pushed = rt().block_on(push_image(
        &client,
        "lazy/big",
        Some("v1"),
        "amd64",
        &[Layer::raw(
            big.clone(),
            "application/vnd.oci.image.layer.v1.tar",
        )],
    ));
    let m = TestMount::new(&reg.addr(), &["--chunk-size", "1MiB"]);
    let layers = m.p("lazy/big/tags/v1/layers");
    // ls -l: exact sizes, no blob GET.
    let names = ls_files(&layers);
    let layer = layers.join(&names[0]);
    assert_eq!(std::fs::metadata(&layer).unwrap().len(), big.len() as u64);
    assert_eq!(
        std::fs::metadata(m.p("lazy/big/tags/v1/config.json"))
            .unwrap()
            .len(),
        pushed.config.len() as u64
    );
    // The config is read for the tag's time; no layer is.
    let config = pushed.config.len() as u64;
    assert_eq!(m.stat("blob_gets"), 1, "listing fetches the config only");
    assert_eq!(m.stat("blob_bytes"), config);

    // 4 KiB in the middle of a cold multi-MiB blob: one Range request for one chunk.
    let mut f = std::fs::File::open(&layer).unwrap();
    f.seek(SeekFrom::Start(3 << 20)).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[..], &big[(3 << 20)..(3 << 20) + 4096]);
    assert_eq!(m.stat("blob_gets"), 2);
    assert_eq!(m.stat("blob_bytes"), (1 << 20) + config);

    // The same chunk through another name (another inode, no page cache): no new request.
    let by_digest = m.p(&format!(
        "lazy/big/blobs/sha256/{}",
        digest_hex(&pushed.layers[0].0)
    ));
    let mut g = std::fs::File::open(&by_digest).unwrap();
    g.seek(SeekFrom::Start((3 << 20) + 8192)).unwrap();
    g.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[..], &big[(3 << 20) + 8192..(3 << 20) + 8192 + 4096]);
    assert_eq!(
        m.stat("blob_gets"),
        2,
        "a cached chunk must not be fetched again"
    );

    // A full read verifies against the digest and fetches each chunk once, several chunks per
    // request.
    assert_eq!(sha256_file(&by_digest), pushed.layers[0].0);
    // (and the config, read for the tag's time)
    let bytes = m.stat("blob_bytes");
    assert!(
        (big.len() as u64..big.len() as u64 + 65536).contains(&bytes),
        "{bytes}"
    );
    assert!(
        m.stat("blob_gets") < 8 + 1,
        "{} requests",
        m.stat("blob_gets")
    );

    // A file asks for reads of a whole chunk (st_blksize), so `cat`'s reads, and the kernel's
    // readahead that follows them, start on chunk boundaries: each is a slice of one chunk,
    // never joined from two (a copy of every byte when the windows were off by 768 KiB).
    assert_eq!(std::fs::metadata(&layer).unwrap().blksize(), 1 << 20);
    let joined = || m.control_stats()["bytes"]["joined"].as_u64().unwrap();
    let before = joined();
    let out = std::process::Command::new("cat")
        .arg(&layer)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout == big, "cat reads the layer's bytes");
    assert_eq!(joined() - before, 0, "no read of cat's was joined");
}

#[test]
fn catalog_and_tags_paginate() {
    // maxentries 50 makes distribution page the catalog at 50 even though regfs asks for 100.
    let reg = TestRegistry::start_with(Auth::None, "catalog:\n  maxentries: 50\n");
    let client = std::sync::Arc::new(reg.client());
    let rt = rt();
    rt.block_on(async {
        let tiny = make_tar(&[("f", b"x")]);
        let base = push_image(
            client.as_ref(),
            "many/r000",
            Some("t000"),
            "amd64",
            &[Layer::tar(&tiny)],
        )
        .await;
        let mut tasks = Vec::new();
        for i in 1..120 {
            let c = client.clone();
            let body = base.manifest.clone();
            let config = base.config.clone();
            let tiny = tiny.clone();
            tasks.push(tokio::spawn(async move {
                let repo = format!("many/r{i:03}");
                push_whole_blob(&*c, &repo, bytes::Bytes::from(config))
                    .await
                    .unwrap();
                push_whole_blob(&*c, &repo, bytes::Bytes::from(tiny))
                    .await
                    .unwrap();
                c.put_manifest(
                    &repo,
                    "t000",
                    "application/vnd.oci.image.manifest.v1+json",
                    body.into(),
                )
                .await
                .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for i in 1..105 {
            client
                .put_manifest(
                    "many/r000",
                    &format!("t{i:03}"),
                    "application/vnd.oci.image.manifest.v1+json",
                    base.manifest.clone().into(),
                )
                .await
                .unwrap();
        }
    });
    let m = TestMount::new(&reg.addr(), &[]);
    let repos = ls(&m.p("many"));
    assert_eq!(repos.len(), 120);
    assert_eq!(repos[0], "r000");
    assert_eq!(repos[119], "r119");
    assert!(
        m.stat("catalog_pages") >= 3,
        "catalog should take several pages"
    );
    let tags = ls(&m.p("many/r000/tags"));
    assert_eq!(tags.len(), 105);
    assert_eq!(tags[104], "t104");
}

#[test]
fn corrupt_blob_gives_eio_and_is_not_cached() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let big = pseudo_random(3 << 20, 9);
    let pushed = rt().block_on(push_image(
        &client,
        "bad/blob",
        Some("v1"),
        "amd64",
        &[Layer::raw(
            big.clone(),
            "application/vnd.oci.image.layer.v1.tar",
        )],
    ));
    // Flip one byte of the config and the layer in the registry's storage.
    for d in [&pushed.config_digest, &pushed.layers[0].0] {
        let path = reg.blob_file(d);
        let mut data = std::fs::read(&path).unwrap();
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
        std::fs::write(&path, data).unwrap();
    }
    let m = TestMount::new(&reg.addr(), &["--chunk-size", "1MiB"]);
    // Single-chunk blob: verified before it is cached.
    let e = std::fs::read(m.p("bad/blob/tags/v1/config.json")).unwrap_err();
    assert_eq!(errno(&e), libc::EIO, "{e}");
    let e = std::fs::read(m.p("bad/blob/tags/v1/config.json")).unwrap_err();
    assert_eq!(
        errno(&e),
        libc::EIO,
        "bad bytes must not be served from cache"
    );
    // Multi-chunk blob: the full read fails at the end with EIO, and the chunks are dropped.
    let layers = ls_files(&m.p("bad/blob/tags/v1/layers"));
    let e = std::fs::read(m.p("bad/blob/tags/v1/layers").join(&layers[0]))
        .map(|v| v.len())
        .unwrap_err();
    assert_eq!(errno(&e), libc::EIO, "{e}");
    assert_eq!(m.stats()["cache_chunks"], 0);
    assert!(
        m.log_text().contains("content hashes to"),
        "{}",
        m.log_text()
    );
}

#[test]
fn registry_going_away_gives_eio_not_a_hang() {
    let mut reg = TestRegistry::start();
    let client = reg.client();
    rt().block_on(push_image(
        &client,
        "gone/soon",
        Some("v1"),
        "amd64",
        &[Layer::tar(&make_tar(&[("a", b"b")]))],
    ));
    // A short retry budget: the registry stays gone, and only a spent budget gives EIO.
    let m = TestMount::new(
        &reg.addr(),
        &["--request-timeout", "5s", "--retry-budget", "1s"],
    );
    assert_eq!(ls(&m.p("gone/soon/tags")), vec!["v1"]);
    let layer = ls_files(&m.p("gone/soon/tags/v1/layers")).remove(0);
    let addr = reg.addr();
    reg.stop();
    // Hold the freed port, closing every connection at once (as a host whose registry went
    // away): with many suites at once, another test's registry could otherwise be given this
    // port, and the read would be answered by it (one such run failed).
    if let Ok(hold) = std::net::TcpListener::bind(&addr) {
        std::thread::spawn(move || hold.incoming().for_each(drop));
    }
    // Not the config: that was read (and cached) for the tag's time.
    let e = std::fs::read(m.p(&format!("gone/soon/tags/v1/layers/{layer}"))).unwrap_err();
    assert_eq!(errno(&e), libc::EIO, "{e}");
    assert!(m.log_text().contains("transport error"), "{}", m.log_text());
}

#[test]
fn inode_numbers_are_stable() {
    let s = seeded();
    let m = TestMount::new(&s.reg.addr(), &[]);
    let a = std::fs::metadata(m.p("debian/min/tags/bookworm/config.json")).unwrap();
    let b = std::fs::metadata(m.p("debian/min/tags/bookworm/config.json")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.mode() & 0o777, 0o444);
    let d = std::fs::metadata(m.p("debian/min")).unwrap();
    assert!(d.is_dir());
    assert_eq!(
        d.mode() & 0o777,
        0o755,
        "repositories accept mkdir and uploads"
    );
    let l = std::fs::metadata(m.p("debian/min/tags/bookworm/layers")).unwrap();
    assert_eq!(l.mode() & 0o777, 0o555);
}

#[test]
fn a_redirected_blobs_later_ranges_go_straight_to_storage() {
    // Docker Hub, GHCR and ECR answer each blob GET with a redirect to storage. distribution's
    // redirect middleware does the same here: every blob GET and HEAD gets a 307 to a file
    // server (`common::storage`) over the registry's own storage directory. A cold read of a
    // layer makes several Range requests; only those sent before the first redirect came back
    // go through the registry.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sport = listener.local_addr().unwrap().port();
    let reg = TestRegistry::start_with(
        Auth::None,
        &format!(
            "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: http://127.0.0.1:{sport}/\n"
        ),
    );
    let slog = serve_storage(listener, reg.data_dir());
    let layer = make_tar(&[("big.bin", &pseudo_random(6 << 20, 7))]);
    let pushed = rt().block_on(push_image(
        &reg.client(),
        "far/away",
        Some("v1"),
        "amd64",
        &[Layer::tar(&layer)],
    ));
    let m = TestMount::new(&reg.addr(), &[]);
    let name = ls_files(&m.p("far/away/tags/v1/layers")).remove(0);
    let file = m.p(&format!("far/away/tags/v1/layers/{name}"));
    assert_eq!(sha256_file(&file), pushed.layers[0].0, "the layer's bytes");
    let layer_path = format!("/{}", {
        let f = reg.blob_file(&pushed.layers[0].0);
        f.strip_prefix(reg.data_dir())
            .unwrap()
            .display()
            .to_string()
    });
    let at_storage = slog
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.method == "GET" && r.path == layer_path)
        .count();
    assert!(
        at_storage >= 3,
        "the layer took {at_storage} Range requests"
    );
    assert!(slog.lock().unwrap().iter().all(|r| !r.authorization));
    // Every blob GET reached storage once: through a redirect (the config's, and the layer's
    // first requests, sent at once before any answer came) or straight from a remembered one.
    let storage_gets = slog
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.method == "GET")
        .count() as u64;
    let (redirects, reuses) = (m.stat("blob_redirects"), m.stat("redirect_reuses"));
    assert_eq!(redirects + reuses, storage_gets);
    assert!(
        reuses >= 1 && redirects - 1 < at_storage as u64,
        "{redirects} redirects, {reuses} reuses, {at_storage} layer requests"
    );
    assert_eq!(m.stat("redirect_failures"), 0);
}

#[test]
fn a_proxy_from_the_environment_carries_the_traffic_and_no_proxy_bypasses_it() {
    // Behind a corporate proxy: HTTP_PROXY (HTTPS_PROXY for https registries) is honoured, as
    // curl and docker do. The proxy here forwards bytes to the registry (which takes the
    // absolute-form requests a proxy is sent).
    let s = seeded();
    let proxy = DelayProxy::start(
        s.reg.addr().parse().unwrap(),
        DelayOptions {
            rtt: std::time::Duration::ZERO,
            ..DelayOptions::default()
        },
    );
    let via = format!("http://{}", proxy.addr());
    let m = TestMount::with_env(&s.reg.addr(), &[], &[("HTTP_PROXY", via.as_str())]);
    assert_eq!(
        std::fs::read(m.p("debian/min/tags/bookworm/config.json")).unwrap(),
        s.min.config
    );
    let carried = proxy
        .stats
        .bytes_down
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        carried > s.min.config.len() as u64,
        "{carried} bytes came through the proxy"
    );
    drop(m);
    // NO_PROXY names the registry: it is reached directly, and a dead proxy does not matter.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_proxy = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let m = TestMount::with_env(
        &s.reg.addr(),
        &[],
        &[
            ("HTTP_PROXY", dead_proxy.as_str()),
            ("NO_PROXY", "127.0.0.1"),
        ],
    );
    assert_eq!(
        std::fs::read(m.p("debian/min/tags/bookworm/config.json")).unwrap(),
        s.min.config
    );
}
