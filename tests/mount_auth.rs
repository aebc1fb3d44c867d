//! Real tier: authentication against a real registry (htpasswd Basic, and Bearer through
//! distribution's `silly` mode with a token server of the test's own), and secrets never logged.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use common::*;

const PASSWORD: &str = "s3cret-Pa55word";

fn seed(reg: &TestRegistry) -> Pushed {
    rt().block_on(push_image(
        &reg.client(),
        "priv/app",
        Some("v1"),
        "amd64",
        &[Layer::tar(&make_tar(&[("a", b"b")]))],
    ))
}

fn assert_no_secret(log: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!log.contains(s), "secret {s:?} leaked into the log:\n{log}");
    }
}

fn basic_registry() -> TestRegistry {
    TestRegistry::start_with(
        Auth::Basic {
            user: "alice".into(),
            password: PASSWORD.into(),
        },
        "",
    )
}

#[test]
fn basic_auth_with_username_flag() {
    let reg = basic_registry();
    let pushed = seed(&reg);
    let m = TestMount::with_env(
        &reg.addr(),
        &["--username", "alice"],
        &[("REGFS_PASSWORD", PASSWORD)],
    );
    assert_eq!(ls(&m.path()), vec![".regfs", "priv"]);
    assert_eq!(
        std::fs::read(m.p("priv/app/tags/v1/config.json")).unwrap(),
        pushed.config
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("alice:{PASSWORD}"));
    assert_no_secret(&m.log_text(), &[PASSWORD, &b64]);
}

#[test]
fn basic_auth_from_docker_config() {
    let reg = basic_registry();
    let pushed = seed(&reg);
    let cfg_dir = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("alice:{PASSWORD}"));
    std::fs::write(
        cfg_dir.path().join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr()),
    )
    .unwrap();
    let m = TestMount::with_env(
        &reg.addr(),
        &[],
        &[("DOCKER_CONFIG", cfg_dir.path().to_str().unwrap())],
    );
    assert_eq!(
        std::fs::read(m.p("priv/app/tags/v1/config.json")).unwrap(),
        pushed.config
    );
    assert_no_secret(&m.log_text(), &[PASSWORD, &auth]);
}

#[test]
fn basic_auth_from_registry_auth_file() {
    let reg = basic_registry();
    let pushed = seed(&reg);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("alice:{PASSWORD}"));
    std::fs::write(
        &file,
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr()),
    )
    .unwrap();
    let m = TestMount::with_env(
        &reg.addr(),
        &[],
        &[("REGISTRY_AUTH_FILE", file.to_str().unwrap())],
    );
    assert_eq!(
        std::fs::read(m.p("priv/app/tags/v1/config.json")).unwrap(),
        pushed.config
    );
}

#[test]
fn without_credentials_reads_are_eacces() {
    let reg = basic_registry();
    seed(&reg);
    let m = TestMount::new(&reg.addr(), &[]);
    // No catalog for anonymous users: the root is empty but the mount works.
    assert_eq!(ls(&m.path()), vec![".regfs"], "only the control dir");
    let e = std::fs::metadata(m.p("priv/app/tags/v1")).unwrap_err();
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    assert!(m.log_text().contains("unauthorized"), "{}", m.log_text());
}

#[test]
fn wrong_password_fails_the_mount_clearly() {
    let reg = basic_registry();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(regfs_bin())
        .args(["-f", "--username", "alice", &reg.addr()])
        .arg(dir.path())
        .env("REGFS_PASSWORD", "wrong-password-xyz")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unauthorized"), "{err}");
    assert_no_secret(&err, &["wrong-password-xyz"]);
    assert!(!is_mounted(dir.path()));
}

/// A token server for distribution's `silly` auth: answers every GET with a fixed token and
/// records the request lines (which carry the scope).
fn token_server(token: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { break };
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            seen2.lock().unwrap().push(first.trim().to_string());
            let body = format!(r#"{{"token":"{token}","expires_in":300}}"#);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, seen)
}

#[test]
fn bearer_token_flow() {
    let (tport, seen) = token_server("tok-SECRET-abc123");
    let reg = TestRegistry::start_with(
        Auth::Silly {
            realm: format!("http://127.0.0.1:{tport}/token"),
        },
        "",
    );
    let pushed = seed(&reg);
    let m = TestMount::new(&reg.addr(), &[]);
    assert_eq!(
        std::fs::read(m.p("priv/app/tags/v1/config.json")).unwrap(),
        pushed.config
    );
    let reqs = seen.lock().unwrap().clone();
    assert!(
        reqs.iter()
            .any(|r| r.contains("scope=repository%3Apriv%2Fapp%3Apull")),
        "{reqs:?}"
    );
    assert!(
        reqs.iter().all(|r| r.contains("service=test-registry")),
        "{reqs:?}"
    );
    // Tokens are cached per scope: reading more of the same repository fetches none.
    let before = m.stat("token_fetches");
    assert!(before >= 1);
    std::fs::read(m.p("priv/app/tags/v1/manifest.json")).unwrap();
    let layers = ls_files(&m.p("priv/app/tags/v1/layers"));
    std::fs::read(m.p("priv/app/tags/v1/layers").join(&layers[0])).unwrap();
    assert_eq!(m.stat("token_fetches"), before);
    assert_no_secret(&m.log_text(), &["tok-SECRET-abc123"]);
}

#[test]
fn tls_with_ca_cert_insecure_and_refusal() {
    let reg = TestRegistry::start_tls();
    let pushed = seed(&reg);
    let cert = reg.dir.path().join("cert.pem");
    let url = reg.url();
    assert!(url.starts_with("https://"));
    // Trusted through --ca-cert.
    let m = TestMount::new(&url, &["--ca-cert", cert.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(m.p("priv/app/tags/v1/config.json")).unwrap(),
        pushed.config
    );
    drop(m);
    // --insecure skips verification.
    let m = TestMount::new(&url, &["--insecure"]);
    assert_eq!(
        std::fs::read(m.p("priv/app/tags/v1/config.json")).unwrap(),
        pushed.config
    );
    drop(m);
    // Neither: the mount is refused with a reason, not a hang.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(regfs_bin())
        .args(["-f", &url])
        .arg(dir.path())
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot use registry") && err.to_lowercase().contains("certif"),
        "{err}"
    );
    assert!(!is_mounted(dir.path()));
}

#[test]
fn parallel_range_requests_over_tls_use_parallel_connections() {
    // Over TLS a registry offers h2, which would carry every parallel Range request in one TCP
    // connection (one window for all). regfs speaks HTTP/1.1: a cold read of a layer through a
    // 20 ms link has several connections open at once.
    let reg = TestRegistry::start_tls();
    let big = make_tar(&[("big.bin", &pseudo_random(24 << 20, 3))]);
    let pushed = rt().block_on(push_image(
        &reg.client(),
        "tls/big",
        Some("v1"),
        "amd64",
        &[Layer::tar(&big)],
    ));
    let link = DelayProxy::start(
        reg.addr().parse().unwrap(),
        DelayOptions {
            rtt: std::time::Duration::from_millis(20),
            ..DelayOptions::default()
        },
    );
    let cert = reg.dir.path().join("cert.pem");
    let m = TestMount::new(
        &format!("https://{}", link.addr()),
        &["--ca-cert", cert.to_str().unwrap()],
    );
    let name = ls_files(&m.p("tls/big/tags/v1/layers")).remove(0);
    assert_eq!(
        sha256_file(&m.p("tls/big/tags/v1/layers").join(name)),
        pushed.layers[0].0
    );
    // Requests in flight at once each had a connection of their own: h2 would have carried
    // them all in one.
    let connections = link
        .stats
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    let in_flight = m.stat("max_requests_in_flight");
    assert!(
        in_flight >= 2 && connections >= in_flight,
        "{connections} connections for {in_flight} requests in flight at once"
    );
}
