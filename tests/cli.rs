//! The command itself: help, flag validation, daemonizing, clean unmount on signals.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn help_explains_every_flag() {
    let out = Command::new(regfs_bin()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--foreground",
        "--cache-size",
        "--chunk-size",
        "--metadata-ttl",
        "--ca-cert",
        "--insecure",
        "--username",
        "REGFS_PASSWORD",
        "-o <OPTS>",
        "allow_other",
        "--platform",
        "--request-timeout",
        "--readahead",
        "--upload-chunk-size",
        "--log-file",
        "RUST_LOG",
    ] {
        assert!(help.contains(flag), "help lacks {flag}:\n{help}");
    }
}

#[test]
fn bad_flags_exit_2_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["--chunk-size", "1k"],
        vec!["--cache-size", "lots"],
        vec!["-o", "suid"],
        vec!["--metadata-ttl", "1d"],
        vec!["--platform", "linux"],
    ] {
        let out = Command::new(regfs_bin())
            .args(&args)
            .arg("localhost:1")
            .arg(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("regfs: "),
            "{args:?}"
        );
    }
}

#[test]
fn unreachable_registry_fails_before_mounting() {
    // A port nobody listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(regfs_bin())
        .arg(format!("127.0.0.1:{port}"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot use registry"), "{err}");
    assert!(!is_mounted(dir.path()));
}

#[test]
fn daemon_returns_once_mounted() {
    let s = seeded();
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(regfs_bin())
        .arg(s.reg.addr())
        .arg(dir.path())
        .env("HOME", dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    // The mount is live as soon as the command returns.
    assert!(is_mounted(dir.path()));
    assert_eq!(ls(&dir.path().join("debian/min/tags")), vec!["bookworm"]);
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!is_mounted(dir.path()));
}

#[test]
fn sigterm_unmounts_cleanly() {
    let s = seeded();
    let mut m = TestMount::new(&s.reg.addr(), &[]);
    let child = m.child.as_mut().unwrap();
    // SAFETY: signalling our own child by PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "regfs did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&m.path()));
}
