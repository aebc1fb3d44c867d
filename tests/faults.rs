//! Fault tests on the real `docker-registry`: the registry stopped for about 2 s in the middle of
//! a large read and started again on the same storage and port; a fault proxy that cuts bodies
//! and answers 503 and 429; and "another host" (127.0.0.2) that `Link`, upload `Location` and
//! redirects point at, which must never receive the credentials; a link so slow that each
//! request outlasts the request timeout and the retry budget, reading and pushing. Reads are
//! checked against their digest; retries, resumes and foreign requests are counted, never timed.

mod common;

use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use regfs::digest::sha256_digest;
use regfs::registry::auth::Credentials;
use regfs::registry::http::{HttpOptions, HttpRegistry};
use regfs::registry::Registry;
use sha2::Digest as _;

/// Push a raw (uncompressed) layer of `len` pseudo-random bytes as repo:v1; its digest.
fn push_big(reg: &TestRegistry, repo: &str, len: usize) -> String {
    let data = pseudo_random(len, 11);
    let pushed = rt().block_on(push_image(
        &reg.client(),
        repo,
        Some("v1"),
        "amd64",
        &[Layer::raw(data, "application/vnd.oci.image.layer.v1.tar")],
    ));
    pushed.layers[0].0.clone()
}

/// A link to `reg` of about 800 KB/s per connection: 16 KiB in flight, 20 ms RTT.
fn slow_link(reg: &TestRegistry) -> DelayProxy {
    DelayProxy::start(
        reg.addr().parse().unwrap(),
        DelayOptions {
            rtt: Duration::from_millis(20),
            window: 16 << 10,
            handshake: false,
        },
    )
}

fn blob_path(m: &TestMount, repo: &str, digest: &str) -> std::path::PathBuf {
    m.p(&format!(
        "{repo}/blobs/sha256/{}",
        digest.trim_start_matches("sha256:")
    ))
}

#[test]
fn a_registry_restart_mid_read_does_not_fail_the_read() {
    let mut reg = TestRegistry::start();
    let digest = push_big(&reg, "big/restart", 64 << 20);
    let m = TestMount::new(
        &reg.addr(),
        &["--chunk-size", "1MiB", "--cache-size", "8MiB"],
    );
    let path = blob_path(&m, "big/restart", &digest);
    let (at_quarter, go_on) = (mpsc::channel(), mpsc::channel::<()>());
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::open(&path).unwrap();
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0usize;
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            done += n;
            if done == 16 << 20 {
                // A quarter in: let the test stop the registry, then read on while it is down.
                at_quarter.0.send(()).unwrap();
                go_on.1.recv().unwrap();
            }
        }
        format!("sha256:{}", hex::encode(h.finalize()))
    });
    at_quarter
        .1
        .recv_timeout(Duration::from_secs(60))
        .expect("the reader reached a quarter");
    reg.stop();
    go_on.0.send(()).unwrap();
    // Down for about 2 s while the reader asks for the next chunks.
    std::thread::sleep(Duration::from_secs(2));
    reg.start_again_on_same_port();
    let got = reader.join().unwrap();
    assert_eq!(got, digest, "the whole blob verifies");
    eprintln!("restart mid-read: {}", m.stats());
    assert!(
        m.stat("retries") >= 1,
        "the outage was retried: {}",
        m.log_text()
    );
    assert!(!m.log_text().contains("budget spent"), "{}", m.log_text());
}

#[test]
fn a_slow_link_streams_where_each_request_outlasts_the_timeout_and_the_budget() {
    // 800 KB/s per connection (16 KiB in flight, 20 ms RTT), a 2 s request timeout and a 1 s
    // retry budget: the engine's larger requests (2 to 8 MiB) cannot finish within the
    // timeout. Each is cut with bytes delivered, resumes where it stopped with a fresh budget,
    // and the read completes: a slow link is not a dead registry.
    let reg = TestRegistry::start();
    let digest = push_big(&reg, "slow/link", 12 << 20);
    let link = slow_link(&reg);
    let m = TestMount::new(
        &link.addr(),
        &["--request-timeout", "2s", "--retry-budget", "1s"],
    );
    let path = blob_path(&m, "slow/link", &digest);
    assert_eq!(sha256_file(&path), digest, "the whole blob verifies");
    assert!(
        m.stat("resumes") >= 1,
        "some request was cut and resumed: {}",
        m.stats()
    );
    assert!(!m.log_text().contains("budget spent"), "{}", m.log_text());
}

#[test]
fn a_slow_uplink_pushes_whole_chunks_that_outlast_the_request_timeout() {
    // The same slow link, pushing: each 4 MiB PATCH needs about 5 s, more than the 2 s request
    // timeout; an upload gets its bytes' time on top (MIN_TRANSFER_RATE), so every PATCH
    // finishes and the push commits.
    let reg = TestRegistry::start();
    let link = slow_link(&reg);
    let m = TestMount::new(
        &link.addr(),
        &[
            "--request-timeout",
            "2s",
            "--retry-budget",
            "1s",
            "--upload-chunk-size",
            "4MiB",
        ],
    );
    let data = pseudo_random(9 << 20, 12);
    std::fs::create_dir(m.p("slow")).unwrap();
    std::fs::write(m.p("slow/uploads/up.bin"), &data).unwrap();
    assert_eq!(
        xattr(&m.p("slow/uploads/up.bin"), "user.oci.digest").unwrap(),
        sha256_digest(&data).as_bytes()
    );
    assert_eq!(m.stat("upload_patches"), 2);
    assert_eq!(
        m.stat("upload_resumes"),
        0,
        "no PATCH was cut: {}",
        m.stats()
    );
}

#[test]
fn cut_bodies_503_and_429_are_absorbed() {
    let reg = TestRegistry::start();
    let digest = push_big(&reg, "big/flaky", 16 << 20);
    // Every 3rd request answered 503 or 429 in turn; every 2nd blob body cut after 100 KB.
    let proxy = FaultProxy::start(
        "127.0.0.1",
        reg.port,
        ProxyRules {
            fail_every: Some((3, vec![503, 429])),
            cut_every: Some((2, 100_000)),
            ..Default::default()
        },
    );
    let m = TestMount::new(&proxy.addr(), &["--chunk-size", "1MiB"]);
    assert_eq!(ls(&m.p("big/flaky/tags")), vec!["v1"]);
    assert_eq!(sha256_file(&blob_path(&m, "big/flaky", &digest)), digest);
    let (failed, cut) = (
        proxy.counts.failed.load(Ordering::SeqCst) as u64,
        proxy.counts.cut.load(Ordering::SeqCst) as u64,
    );
    assert!(
        failed >= 3 && cut >= 3,
        "faults were injected: {failed} failed, {cut} cut"
    );
    eprintln!("proxy: {failed} failed, {cut} cut; mount: {}", m.stats());
    assert_eq!(m.stat("retries"), failed, "each failed answer retried once");
    assert_eq!(m.stat("resumes"), cut, "each cut body resumed once");
    // The config (read for the tag's time) and the blob, each byte once.
    let manifest = rt()
        .block_on(reg.client().manifest("big/flaky", "v1"))
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.body).unwrap();
    let config = manifest["config"]["size"].as_u64().unwrap();
    assert_eq!(
        m.stat("blob_bytes"),
        (16 << 20) + config,
        "resumes ask only for what is missing"
    );
}

#[test]
fn links_locations_and_redirects_to_another_host_get_no_credentials() {
    let (user, pw) = ("alice", "s3cret-pw");
    let reg = TestRegistry::start_with(
        Auth::Basic {
            user: user.into(),
            password: pw.into(),
        },
        "",
    );
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    );
    // "Another host" forwards to the registry with a right of its own (like a presigned URL).
    let other = FaultProxy::start(
        "127.0.0.2",
        reg.port,
        ProxyRules {
            add_auth: Some(basic.clone()),
            ..Default::default()
        },
    );
    // The registry's front names that host in Link and Location, and redirects blob GETs there.
    let front = FaultProxy::start(
        "127.0.0.1",
        reg.port,
        ProxyRules {
            rewrite_to: Some(other.url()),
            redirect_blobs_to: Some(other.url()),
            link_tags: true,
            ..Default::default()
        },
    );
    let client = HttpRegistry::new(HttpOptions {
        base: reqwest::Url::parse(&front.url()).unwrap(),
        credentials: Some(Credentials {
            username: user.into(),
            password: pw.into(),
        }),
        ca_cert_pem: None,
        insecure: false,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(30),
        redirect_ttl: regfs::registry::http::REDIRECT_TTL,
    })
    .unwrap();
    let data = pseudo_random(300_000, 5);
    let digest = sha256_digest(&data);
    rt().block_on(async {
        // Upload: POST at the registry, PATCH and PUT at the Location (the other host).
        let mut s = client.upload_start("far/away").await.unwrap();
        client
            .upload_patch("far/away", &mut s, Bytes::copy_from_slice(&data[..100_000]))
            .await
            .unwrap();
        client
            .upload_finish("far/away", s, &digest, Bytes::copy_from_slice(&data[100_000..]))
            .await
            .unwrap();
        // Read back: redirected to the other host.
        let b = client.blob_range("far/away", &digest, 0, 299_999).await.unwrap();
        assert_eq!(sha256_digest(&b), digest);
        // Tags: the second page is on the other host.
        for t in ["a", "b", "c"] {
            let body = Bytes::from(format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{digest}","size":300000}},"layers":[],"annotations":{{"t":"{t}"}}}}"#
            ));
            client
                .put_manifest(
                    "far/away",
                    t,
                    "application/vnd.oci.image.manifest.v1+json",
                    body,
                )
                .await
                .unwrap();
        }
        assert_eq!(client.tags("far/away").await.unwrap(), vec!["a", "b", "c"]);
    });
    let seen = other.seen.lock().unwrap().clone();
    let kinds = |m: &str| seen.iter().filter(|r| r.method == m).count();
    assert_eq!(kinds("PATCH"), 1, "{seen:?}");
    assert_eq!(kinds("PUT"), 1, "{seen:?}");
    assert!(kinds("GET") == 2, "one blob GET, one tag page: {seen:?}");
    for r in &seen {
        assert!(
            !r.headers.contains_key("authorization"),
            "{} {} reached 127.0.0.2 with credentials",
            r.method,
            r.path
        );
    }
    assert_eq!(
        client.stats().snapshot().foreign_requests,
        seen.len() as u64
    );
    assert_eq!(front.counts.redirected.load(Ordering::SeqCst), 1);
    // The registry's own address did get the credentials.
    assert!(front
        .seen
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.headers.get("authorization") == Some(&basic)));
    // And what was pushed through the other host is whole.
    let direct = rt()
        .block_on(reg.client().blob_range("far/away", &digest, 0, 299_999))
        .unwrap();
    assert_eq!(sha256_digest(&direct), digest);
}

#[test]
fn a_failed_closing_put_is_retried_found_complete_or_refused() {
    let reg = TestRegistry::start();
    // The closing PUT of each repository's upload (the PATCHes before it pass): `retry`'s first
    // PUT is answered 503 by the proxy; `lost`'s first reaches the registry and its answer is
    // dropped; every PUT of `spent` is answered 503.
    let put = |path, act, times| Scripted::new("PUT", path, act, times);
    let script = vec![
        put("/v2/retry/blobs/uploads/", Act::Status(503), 1),
        put("/v2/lost/blobs/uploads/", Act::DropAnswer, 1),
        put("/v2/spent/blobs/uploads/", Act::Status(503), usize::MAX),
    ];
    let proxy = FaultProxy::start(
        "127.0.0.1",
        reg.port,
        ProxyRules {
            script: script.clone(),
            ..Default::default()
        },
    );
    let m = TestMount::new(
        &proxy.addr(),
        &["--upload-chunk-size", "1MiB", "--retry-budget", "2s"],
    );
    let data = pseudo_random((3 << 20) + 1000, 21);
    let digest = sha256_digest(&data);
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), &data).unwrap();
    // cp reports what close() says (a Rust File's drop would not).
    let cp = |dst: &str| {
        std::process::Command::new("cp")
            .arg(src.path())
            .arg(m.p(dst))
            .output()
            .unwrap()
    };
    let in_registry = |repo: &str| reg.curl("HEAD", &format!("/v2/{repo}/blobs/{digest}")).0 == 200;
    for (i, repo) in ["retry", "lost"].into_iter().enumerate() {
        std::fs::create_dir(m.p(repo)).unwrap();
        let before = m.stat("upload_resumes");
        let out = cp(&format!("{repo}/uploads/x"));
        assert!(out.status.success(), "{repo}: {out:?}\n{}", m.log_text());
        assert_eq!(script[i].hits(), 1, "{repo}: the fault was met");
        assert!(in_registry(repo), "{repo}: the registry has the blob");
        assert_eq!(m.stat("upload_resumes") - before, 1, "{repo}");
        let x = m.p(&format!("{repo}/uploads/x"));
        assert_eq!(xattr(&x, "user.oci.digest").unwrap(), digest.as_bytes());
        assert_eq!(sha256_file(&x), digest, "{repo}: reads back");
    }
    // Every closing PUT fails: the close gets EIO once the budget is spent, nothing is listed.
    std::fs::create_dir(m.p("spent")).unwrap();
    let out = cp("spent/uploads/x");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Input/output error"), "{stderr}");
    assert!(script[2].hits() >= 2, "retried: {} PUTs", script[2].hits());
    assert!(ls(&m.p("spent/uploads")).is_empty());
    assert!(!in_registry("spent"));
    assert!(m.log_text().contains("budget spent"), "{}", m.log_text());
}
