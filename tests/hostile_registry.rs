//! The hostile-registry tier: a scripted stub server plays a registry that sends oversized or
//! lying bodies, absurd headers, endless errors, and links, upload locations and redirects to
//! another host (127.0.0.2). Each test asserts the errno the filesystem would give (through
//! `FsError::from`), that the one line it would log names the problem and holds no secret, and
//! that the same client still works afterwards; the last does the same through a real mount.
//! Counts, never time.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{hangup, resp, stub, stub_client, stub_on, Req, ReqLog};
use regfs::error::{FsError, RegistryError};
use regfs::registry::auth::Credentials;
use regfs::registry::Registry;

const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aa","size":1},"layers":[]}"#;
const OCI: &str = "application/vnd.oci.image.manifest.v1+json";
const SECRET: &str = "hunter2-secret";

fn creds() -> Option<Credentials> {
    Some(Credentials {
        username: "u".into(),
        password: SECRET.into(),
    })
}

/// The errno and log line the filesystem would give for `e`; the line never holds the secret.
fn fs(e: RegistryError) -> (i32, String) {
    let f = FsError::from(e);
    assert!(!f.message.contains(SECRET), "secret in {:?}", f.message);
    assert!(
        f.message.len() < 1024,
        "a log line, not a body: {}",
        f.message.len()
    );
    (f.errno, f.message)
}

fn count(log: &ReqLog, pred: impl Fn(&Req) -> bool) -> usize {
    log.lock().unwrap().iter().filter(|r| pred(r)).count()
}

#[tokio::test]
async fn oversized_and_absurd_manifest_bodies_are_eio() {
    let (port, _) = stub(Arc::new(|r: &Req| match r.path.as_str() {
        // 5 MiB: over distribution's 4 MiB limit.
        "/v2/a/b/manifests/big" => resp(200, vec![b' '; 5 << 20]).h("Content-Type", OCI),
        // A Content-Length of 2^62 with a tiny body: refused before reading, nothing allocated.
        "/v2/a/b/manifests/claims" => resp(200, MANIFEST)
            .h("Content-Type", OCI)
            .h("Content-Length", "4611686018427387904"),
        // A Content-Length no integer holds: an error, not a panic.
        "/v2/a/b/manifests/nonsense" => resp(200, MANIFEST)
            .h("Content-Type", OCI)
            .h("Content-Length", "99999999999999999999999999"),
        "/v2/a/b/manifests/ok" => resp(200, MANIFEST).h("Content-Type", OCI),
        p => resp(404, format!("unexpected {p}")),
    }));
    let c = stub_client(port, None, Duration::ZERO);
    for tag in ["big", "claims"] {
        let (errno, line) = fs(c.manifest("a/b", tag).await.unwrap_err());
        assert_eq!(errno, libc::EIO, "{tag}");
        assert!(line.contains("4194304-byte cap"), "{tag}: {line}");
    }
    let (errno, _) = fs(c.manifest("a/b", "nonsense").await.unwrap_err());
    assert_eq!(errno, libc::EIO);
    assert_eq!(
        &c.manifest("a/b", "ok").await.unwrap().body[..],
        MANIFEST.as_bytes()
    );
}

#[tokio::test]
async fn token_error_and_list_bodies_have_caps() {
    let port_cell = Arc::new(Mutex::new(0u16));
    let pc = port_cell.clone();
    let (port, _) = stub(Arc::new(move |r: &Req| {
        let p = *pc.lock().unwrap();
        if r.path.starts_with("/token?") && r.path.contains("big") {
            return resp(200, format!(r#"{{"token":"{}"}}"#, "t".repeat(2 << 20)));
        }
        if r.path.starts_with("/token?") {
            return resp(200, r#"{"token":"T","expires_in":18446744073709551615}"#);
        }
        if r.path.starts_with("/v2/big/") && !r.headers.contains_key("authorization") {
            return resp(401, "").h(
                "WWW-Authenticate",
                &format!(
                    r#"Bearer realm="http://127.0.0.1:{p}/token",scope="repository:big:pull""#
                ),
            );
        }
        match r.path.as_str() {
            "/v2/e/b/manifests/v1" => resp(404, vec![b'x'; 32 << 20]),
            "/v2/l/b/tags/list?n=100" => {
                let mut body = br#"{"name":"l/b","tags":["#.to_vec();
                body.extend(std::iter::repeat_n(b"\"tag\",".as_slice(), 3 << 20).flatten());
                body.extend(br#""x"]}"#);
                resp(200, body)
            }
            "/v2/ok/tags/list?n=100" => resp(200, r#"{"name":"ok","tags":["v1"]}"#),
            p => resp(404, format!("unexpected {p}")),
        }
    }));
    *port_cell.lock().unwrap() = port;
    let c = stub_client(port, None, Duration::ZERO);
    // A 32 MiB error body: ENOENT, with a short line.
    let (errno, line) = fs(c.manifest("e/b", "v1").await.unwrap_err());
    assert_eq!(errno, libc::ENOENT, "{line}");
    // An 18 MiB tag page: over the 16 MiB list cap.
    let (errno, line) = fs(c.tags("l/b").await.unwrap_err());
    assert_eq!(errno, libc::EIO);
    assert!(line.contains("16777216-byte cap"), "{line}");
    // A 2 MiB token: over the 1 MiB token cap.
    let (errno, line) = fs(c.tags("big").await.unwrap_err());
    assert_eq!(errno, libc::EIO);
    assert!(line.contains("1048576-byte cap"), "{line}");
    assert_eq!(c.tags("ok").await.unwrap(), vec!["v1"]);
}

#[tokio::test]
async fn an_absurd_expires_in_does_not_panic() {
    let port_cell = Arc::new(Mutex::new(0u16));
    let pc = port_cell.clone();
    let (port, log) = stub(Arc::new(move |r: &Req| {
        let p = *pc.lock().unwrap();
        if r.path.starts_with("/token?") {
            return resp(200, r#"{"token":"T","expires_in":18446744073709551615}"#);
        }
        if r.headers.get("authorization").map(String::as_str) != Some("Bearer T") {
            return resp(401, "").h(
                "WWW-Authenticate",
                &format!(r#"Bearer realm="http://127.0.0.1:{p}/token""#),
            );
        }
        resp(200, r#"{"name":"a/b","tags":["v1"]}"#)
    }));
    *port_cell.lock().unwrap() = port;
    let c = stub_client(port, creds(), Duration::ZERO);
    for _ in 0..3 {
        assert_eq!(c.tags("a/b").await.unwrap(), vec!["v1"]);
    }
    assert_eq!(count(&log, |r| r.path.starts_with("/token")), 1);
}

#[tokio::test]
async fn links_locations_and_redirects_to_another_host_get_no_credentials() {
    // "Another host" is 127.0.0.2: it serves the second tag page, the upload, and the blob.
    let data = b"0123456789".to_vec();
    let blob_digest = regfs::digest::sha256_digest(&data);
    let d2 = data.clone();
    let (other, other_log) = stub_on(
        "127.0.0.2",
        Arc::new(move |r: &Req| match r.method.as_str() {
            "GET" if r.path.starts_with("/v2/a/b/tags/") => {
                resp(200, r#"{"name":"a/b","tags":["z"]}"#)
            }
            "GET" => resp(206, &d2[2..6]).h("Content-Range", "bytes 2-5/10"),
            "PATCH" => resp(202, "")
                .h("Range", "0-4")
                .h("Location", "/upload/u1?s=2"),
            "PUT" => resp(201, ""),
            _ => resp(404, ""),
        }),
    );
    let base2 = format!("http://127.0.0.2:{other}");
    let (port, log) = stub(Arc::new(move |r: &Req| {
        if !r.headers.contains_key("authorization") {
            return resp(401, "").h("WWW-Authenticate", r#"Basic realm="r""#);
        }
        match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/v2/a/b/tags/list?n=100") => resp(200, r#"{"name":"a/b","tags":["a"]}"#).h(
                "Link",
                &format!(r#"<{base2}/v2/a/b/tags/list?p=2>; rel="next""#),
            ),
            ("POST", _) => resp(202, "").h("Location", &format!("{base2}/upload/u1?s=1")),
            ("GET", p) if p.contains("/blobs/") => {
                resp(307, "").h("Location", &format!("{base2}/storage/x?sig=1"))
            }
            _ => resp(404, ""),
        }
    }));
    let c = stub_client(port, creds(), Duration::ZERO);
    assert_eq!(c.tags("a/b").await.unwrap(), vec!["a", "z"]);
    let mut s = c.upload_start("a/b").await.unwrap();
    c.upload_patch("a/b", &mut s, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    c.upload_finish("a/b", s, &blob_digest, Bytes::from_static(b"world"))
        .await
        .unwrap();
    assert_eq!(
        &c.blob_range("a/b", &blob_digest, 2, 5).await.unwrap()[..],
        b"2345"
    );
    let other_reqs = other_log.lock().unwrap().clone();
    assert_eq!(other_reqs.len(), 4, "{other_reqs:?}");
    for r in &other_reqs {
        assert!(
            !r.headers.contains_key("authorization"),
            "{} {} carried credentials",
            r.method,
            r.path
        );
    }
    assert_eq!(c.stats().snapshot().foreign_requests, 4);
    // The registry itself did get them.
    assert!(count(&log, |r| r.headers.contains_key("authorization")) >= 3);
}

#[tokio::test]
async fn token_realms_that_would_leak_are_refused() {
    let (port, log) = stub(Arc::new(|r: &Req| {
        if r.path.starts_with("/v2/ftp/") {
            return resp(401, "").h(
                "WWW-Authenticate",
                r#"Bearer realm="ftp://127.0.0.1/token""#,
            );
        }
        if r.path.starts_with("/token") {
            // A realm that redirects elsewhere is not followed.
            return resp(302, "").h("Location", "http://127.0.0.2:1/steal");
        }
        let p = r.headers.get("host").cloned().unwrap_or_default();
        resp(401, "").h(
            "WWW-Authenticate",
            &format!(r#"Bearer realm="http://{p}/token""#),
        )
    }));
    let c = stub_client(port, creds(), Duration::ZERO);
    let (errno, line) = fs(c.tags("ftp").await.unwrap_err());
    assert_eq!(errno, libc::EACCES);
    assert!(line.contains("realm"), "{line}");
    let (errno, line) = fs(c.tags("redir").await.unwrap_err());
    assert_eq!(errno, libc::EACCES);
    assert!(line.contains("redirects"), "{line}");
    assert_eq!(count(&log, |r| r.path.starts_with("/token")), 1);
}

#[tokio::test]
async fn endless_503_spends_the_budget_then_eio() {
    let (port, log) = stub(Arc::new(|r: &Req| match r.path.as_str() {
        "/v2/ok/tags/list?n=100" => resp(200, r#"{"name":"ok","tags":["v1"]}"#),
        _ => resp(503, "down for maintenance"),
    }));
    let c = stub_client(port, None, Duration::from_secs(1));
    let (errno, line) = fs(c.tags("down").await.unwrap_err());
    assert_eq!(errno, libc::EIO);
    assert!(line.contains("maintenance"), "{line}");
    let tries = count(&log, |r| r.path.starts_with("/v2/down/"));
    assert!(tries > 1, "retried within the budget ({tries} requests)");
    assert_eq!(c.stats().snapshot().retries, tries as u64 - 1);
    assert_eq!(c.tags("ok").await.unwrap(), vec!["v1"]);
}

#[tokio::test]
async fn a_retry_after_beyond_the_budget_fails_at_once_with_eagain() {
    let (port, log) = stub(Arc::new(|_r: &Req| {
        resp(429, "pull rate limit").h("Retry-After", "3600")
    }));
    let c = stub_client(port, None, Duration::from_secs(2));
    let (errno, line) = fs(c.tags("a/b").await.unwrap_err());
    assert_eq!(errno, libc::EAGAIN);
    assert!(line.contains("rate limit"), "{line}");
    assert_eq!(
        log.lock().unwrap().len(),
        1,
        "no wait that the budget cannot cover"
    );
}

#[tokio::test]
async fn dropped_connections_are_retried() {
    let n = Arc::new(AtomicUsize::new(0));
    let (port, log) = stub(Arc::new(move |_r: &Req| {
        if n.fetch_add(1, Ordering::SeqCst) < 2 {
            return hangup();
        }
        resp(200, r#"{"name":"a/b","tags":["v1"]}"#)
    }));
    let c = stub_client(port, None, Duration::from_secs(30));
    assert_eq!(c.tags("a/b").await.unwrap(), vec!["v1"]);
    assert_eq!(log.lock().unwrap().len(), 3);
    assert_eq!(c.stats().snapshot().retries, 2);
}

#[tokio::test]
async fn redirect_loops_end() {
    let (port, log) = stub(Arc::new(|r: &Req| {
        resp(307, "").h("Location", &r.path.clone())
    }));
    let c = stub_client(port, None, Duration::ZERO);
    let (errno, line) = fs(c.manifest("a/b", "v1").await.unwrap_err());
    assert_eq!(errno, libc::EIO);
    assert!(line.contains("redirects"), "{line}");
    assert_eq!(log.lock().unwrap().len(), 11);
}

#[tokio::test]
async fn an_absurd_chunk_minimum_fails_the_push_instead_of_holding_the_file() {
    // OCI-Chunk-Min-Length is a memory demand: 2^63 would have regfs hold the whole file. The
    // push fails with the reason, and the session is cancelled.
    let (port, log) = stub(Arc::new(|r: &Req| match r.method.as_str() {
        "POST" => resp(202, "")
            .h("Location", "/v2/a/b/blobs/uploads/u1")
            .h("OCI-Chunk-Min-Length", "9223372036854775807"),
        "DELETE" => resp(204, ""),
        _ => resp(400, ""),
    }));
    let c: Arc<dyn Registry> = Arc::new(stub_client(port, None, Duration::ZERO));
    let mut up = regfs::push::BlobUpload::new(c, "a/b", 64 << 10, None, false);
    let data = vec![7u8; 256 << 10];
    let mut failed = None;
    for (i, piece) in data.chunks(32 << 10).enumerate() {
        if let Err(e) = up.write((i * (32 << 10)) as u64, piece).await {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("a write fails");
    assert!(e.to_string().contains("OCI-Chunk-Min-Length"), "{e}");
    assert!(up.finish().await.is_err(), "the upload stays failed");
    assert_eq!(count(&log, |r| r.method == "DELETE"), 1);
    assert_eq!(count(&log, |r| r.method == "PATCH"), 0);
}

#[tokio::test]
async fn a_failed_patch_resumes_from_the_upload_status() {
    // The first PATCH delivers 3 of its 10 bytes, then the connection drops. The upload status
    // says `Range: 0-2`; the client sends bytes 3..=9 again, and only those.
    let patches = Arc::new(AtomicUsize::new(0));
    let (port, log) = stub(Arc::new(move |r: &Req| match r.method.as_str() {
        "POST" => resp(202, "").h("Location", "/v2/a/b/blobs/uploads/u1?s=0"),
        "PATCH" if patches.fetch_add(1, Ordering::SeqCst) == 0 => hangup(),
        "PATCH" => resp(202, "")
            .h("Range", "0-9")
            .h("Location", "/v2/a/b/blobs/uploads/u1?s=2"),
        "GET" => resp(204, "")
            .h("Range", "0-2")
            .h("Location", "/v2/a/b/blobs/uploads/u1?s=1"),
        _ => resp(404, ""),
    }));
    let c = stub_client(port, None, Duration::from_secs(30));
    let mut s = c.upload_start("a/b").await.unwrap();
    c.upload_patch("a/b", &mut s, Bytes::from_static(b"0123456789"))
        .await
        .unwrap();
    assert_eq!(s.offset, 10);
    assert!(s.location.ends_with("s=2"));
    let reqs = log.lock().unwrap().clone();
    let patches: Vec<_> = reqs.iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.len(), 2);
    assert_eq!(patches[1].headers["content-range"], "3-9");
    assert_eq!(patches[1].body, b"3456789");
    assert!(
        patches[1].path.ends_with("s=1"),
        "resumed at the status Location"
    );
    assert_eq!(c.stats().snapshot().upload_resumes, 1);
}

#[test]
fn a_mount_survives_an_oversized_manifest() {
    // Through a real mount: the oversized manifest is EIO with one log line naming the cap, and
    // the rest of the mount (another tag, the daemon) still works.
    let good = MANIFEST.as_bytes().to_vec();
    let good_digest = regfs::digest::sha256_digest(&good);
    let (port, _) = stub(Arc::new(move |r: &Req| {
        let path = r.path.as_str();
        match path {
            "/v2/" => resp(200, "{}"),
            "/v2/_catalog?n=100" => resp(200, r#"{"repositories":["a/b"]}"#),
            "/v2/a/b/tags/list?n=100" => resp(200, r#"{"name":"a/b","tags":["big","ok"]}"#),
            "/v2/a/b/manifests/big" => resp(200, vec![b' '; 5 << 20]).h("Content-Type", OCI),
            p if p == "/v2/a/b/manifests/ok" || p.ends_with(&good_digest) => {
                resp(200, good.clone())
                    .h("Content-Type", OCI)
                    .h("Docker-Content-Digest", &good_digest)
            }
            p => resp(404, format!("unexpected {p}")),
        }
    }));
    let m = common::TestMount::new(&format!("127.0.0.1:{port}"), &["--retry-budget", "0"]);
    let e = std::fs::read(m.p("a/b/tags/big/manifest.json")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let log = m.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("4194304-byte cap"))
        .count();
    assert_eq!(lines, 1, "one log line: {log}");
    let ok = std::fs::read(m.p("a/b/tags/ok/manifest.json"))
        .unwrap_or_else(|e| panic!("{e}: {}", m.log_text()));
    assert_eq!(ok, MANIFEST.as_bytes());
    // The listing goes on (it leaves out the tag it cannot describe).
    assert!(common::ls(&m.p("a/b/tags")).contains(&"ok".to_string()));
}
