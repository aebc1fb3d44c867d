//! The command itself: help, version, flag validation, mountpoint checks, daemonizing, clean
//! unmount on signals and on fusermount3 -u.

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
        vec!["-o", "bogus"],
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

/// Wait (bounded) for the foreground regfs of `m` to exit.
fn wait_exit(m: &mut TestMount) -> std::process::ExitStatus {
    let child = m.child.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "regfs did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(m: &TestMount) {
    let pid = m.child.as_ref().unwrap().id() as i32;
    // SAFETY: signalling our own child by PID.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// Warnings and debug lines, so a warning would show.
const LOG_ALL: &[(&str, &str)] = &[("RUST_LOG", "warn,regfs=debug")];

#[test]
fn sigterm_unmounts_cleanly() {
    let s = seeded();
    let mut m = TestMount::new(&s.reg.addr(), &[]);
    // Whether the plain unmount works or meets a stat in flight (and detaches lazily), regfs
    // exits 0 with the mount gone.
    sigterm(&m);
    let status = wait_exit(&mut m);
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&m.path()));
}

/// A busy mount (here an open directory) cannot be unmounted plainly: SIGTERM detaches it lazily,
/// and regfs exits once the last user lets go.
#[test]
fn sigterm_detaches_a_busy_mount_lazily() {
    let s = seeded();
    let mut m = TestMount::with_env(&s.reg.addr(), &[], LOG_ALL);
    let busy = std::fs::File::open(m.p("debian")).unwrap();
    sigterm(&m);
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_mounted(&m.path()) {
        assert!(Instant::now() < deadline, "not detached:\n{}", m.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        m.log_text().contains("detaching it lazily"),
        "{}",
        m.log_text()
    );
    // Still serving the open directory.
    assert!(m.child.as_mut().unwrap().try_wait().unwrap().is_none());
    drop(busy);
    let status = wait_exit(&mut m);
    assert!(status.success(), "{status}\n{}", m.log_text());
}

#[test]
fn fusermount_u_of_a_foreground_mount_logs_no_warning() {
    let s = seeded();
    let mut m = TestMount::with_env(&s.reg.addr(), &[], LOG_ALL);
    assert_eq!(ls(&m.p("debian/min/tags")), vec!["bookworm"]);
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(m.path())
        .status()
        .unwrap();
    assert!(st.success());
    let status = wait_exit(&mut m);
    assert!(status.success(), "{status}");
    let log = m.log_text();
    assert!(
        log.contains("unmounted") && !log.contains(" WARN "),
        "{log}"
    );
}

#[test]
fn version_names_the_features() {
    let out = Command::new(regfs_bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        v.starts_with(&format!("regfs {}\n", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    assert!(v.contains("TLS backend: native-tls"), "{v}");
    assert!(v.contains("FUSE passthrough: "), "{v}");
}

/// Run regfs (daemon mode) on `dir`; returns its exit code and stderr.
fn mount_on(registry: &str, dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(regfs_bin())
        .arg(registry)
        .arg(dir)
        .args(args)
        .env("HOME", dir.parent().unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), err)
}

#[test]
fn nonempty_directories_and_mounts_are_refused_unless_nonempty() {
    let s = seeded();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("full");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("old"), b"x").unwrap();
    let (code, err) = mount_on(&s.reg.addr(), &dir, &[]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("is not empty") && err.contains("-o nonempty"),
        "{err}"
    );
    assert!(!is_mounted(&dir));

    // -o nonempty: mounted over the old entry, which comes back after unmounting.
    let (code, err) = mount_on(&s.reg.addr(), &dir, &["-o", "nonempty"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(ls(&dir), vec![".regfs", "debian", "multi"]);
    // On top of that mount: refused, naming what is mounted there.
    let (code, err) = mount_on(&s.reg.addr(), &dir, &[]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("is already a mount point (fuse.regfs"),
        "{err}"
    );
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(ls(&dir), vec!["old"]);
}

#[test]
fn a_dead_mount_is_named_as_such() {
    let s = seeded();
    let mut m = TestMount::new(&s.reg.addr(), &[]);
    // regfs stats its own mountpoint once after mounting (to find its readahead knob); killed
    // during that stat it would wait forever for its own answer. Let it finish first.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !m.log_text().contains("read_ahead_kb") {
        assert!(
            Instant::now() < deadline,
            "no readahead line:\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL leaves the mount behind with nobody serving it.
    m.child.as_mut().unwrap().kill().unwrap();
    m.child.as_mut().unwrap().wait().unwrap();
    let (code, err) = mount_on(&s.reg.addr(), &m.path(), &[]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("is a FUSE mount whose process has ended") && err.contains("fusermount3 -u"),
        "{err}"
    );
}
