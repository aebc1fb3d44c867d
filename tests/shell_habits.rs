//! Real tier: the ways people write files from a shell, on a real mount of a real registry, each
//! checked with an independent client (curl): the registry serves the exact bytes under their
//! digest. See docs/SEMANTICS.md, "When an upload completes".

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use regfs::digest::{digest_hex, sha256_digest};

/// Run `prog args…` with the mount's paths at hand; returns its output.
fn run(prog: &str, args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(prog);
    c.args(args).current_dir(dir);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(what: &str, out: &Output, m: &TestMount) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        m.log_text()
    );
}

/// The registry serves exactly `data` under its digest, and the upload entry names it.
fn pushed(reg: &TestRegistry, m: &TestMount, repo: &str, upload: &str, data: &[u8]) {
    let digest = sha256_digest(data);
    let (code, body) = reg.curl("GET", &format!("/v2/{repo}/blobs/{digest}"));
    assert_eq!(code, 200, "{upload}: {digest}\n{}", m.log_text());
    assert_eq!(sha256_digest(&body), digest, "{upload}");
    assert_eq!(body, data, "{upload}");
    let up = m.p(&format!("{repo}/uploads/{upload}"));
    assert_eq!(
        xattr(&up, "user.oci.digest").unwrap(),
        digest.as_bytes(),
        "{upload}"
    );
    assert_eq!(std::fs::metadata(&up).unwrap().len(), data.len() as u64);
}

/// Wait (bounded) until `path` carries a digest: a commit at release lands just after close()
/// returned.
fn wait_for_digest(path: &Path) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(d) = xattr(path, "user.oci.digest") {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "{} never completed",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_shell_habit_pushes_exact_bytes() {
    let reg = TestRegistry::start();
    let m = TestMount::new(&reg.addr(), &["--upload-chunk-size", "1MiB"]);
    std::fs::create_dir(m.p("myapp")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let a = pseudo_random(1_500_000, 1);
    let b = pseudo_random(700_001, 2);
    std::fs::write(w.join("a"), &a).unwrap();
    std::fs::write(w.join("b"), &b).unwrap();
    let up = |name: &str| m.p(&format!("myapp/uploads/{name}"));
    let ups = |name: &str| up(name).to_string_lossy().into_owned();

    // cp
    ok(
        "cp",
        &run("cp", &[&w.join("a").to_string_lossy(), &ups("cp")], w, &[]),
        &m,
    );
    pushed(&reg, &m, "myapp", "cp", &a);

    // cat f > uploads/x (the shell closes its copy after dup2 before cat writes)
    for sh in ["sh", "bash"] {
        let name = format!("cat-{sh}");
        let cmd = format!("cat a > '{}'", ups(&name));
        ok(&name, &run(sh, &["-c", &cmd], w, &[]), &m);
        pushed(&reg, &m, "myapp", &name, &a);
    }

    // { cat a; cat b; } > uploads/x: two children write, the shell's restore closes last.
    let cmd = format!("{{ cat a; cat b; }} > '{}'", ups("group"));
    ok("group", &run("bash", &["-c", &cmd], w, &[]), &m);
    pushed(&reg, &m, "myapp", "group", &[a.clone(), b.clone()].concat());

    // tar -cf - dir > uploads/x.tar
    let dir = w.join("dir");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("one"), &a).unwrap();
    std::fs::write(dir.join("two"), b"two\n").unwrap();
    let cmd = format!("tar -cf - dir > '{}'", ups("x.tar"));
    ok("tar", &run("sh", &["-c", &cmd], w, &[]), &m);
    let digest = wait_for_digest(&up("x.tar"));
    let digest = String::from_utf8(digest).unwrap();
    let (code, body) = reg.curl("GET", &format!("/v2/myapp/blobs/{digest}"));
    assert_eq!(code, 200);
    assert_eq!(sha256_digest(&body), digest);
    std::fs::write(w.join("back.tar"), &body).unwrap();
    let list = run("tar", &["-tf", "back.tar"], w, &[]);
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("dir/one") && list.contains("dir/two"),
        "{list}"
    );
    assert_eq!(
        body,
        std::fs::read(up("x.tar")).unwrap_or_default().as_slice()
    );

    // dd
    let of = format!("of={}", ups("dd"));
    ok(
        "dd",
        &run("dd", &["if=a", &of, "bs=1M", "status=none"], w, &[]),
        &m,
    );
    pushed(&reg, &m, "myapp", "dd", &a);

    // Python open/write/close
    let py =
        "import sys\nwith open(sys.argv[1], 'wb') as f:\n    f.write(open('b', 'rb').read())\n";
    ok(
        "python",
        &run("python3", &["-c", py, &ups("py")], w, &[]),
        &m,
    );
    pushed(&reg, &m, "myapp", "py", &b);

    // : > uploads/empty: nothing written; committed at release, complete only then.
    let cmd = format!(": > '{}'", ups("empty"));
    ok("empty", &run("bash", &["-c", &cmd], w, &[]), &m);
    let empty = sha256_digest(b"");
    assert_eq!(wait_for_digest(&up("empty")), empty.as_bytes());
    assert_eq!(
        reg.curl("GET", &format!("/v2/myapp/blobs/{empty}")),
        (200, vec![])
    );

    // printf (a shell builtin) > tags/t/manifest.json
    let cfg = b"{\"architecture\":\"amd64\",\"os\":\"linux\"}".to_vec();
    std::fs::write(w.join("cfg"), &cfg).unwrap();
    ok("cfg", &run("cp", &["cfg", &ups("cfg")], w, &[]), &m);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256_digest(&cfg), "size": cfg.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha256_digest(&a), "size": a.len()}],
    })
    .to_string();
    std::fs::create_dir(m.p("myapp/tags/t")).unwrap();
    let target = m.p("myapp/tags/t/manifest.json");
    let cmd = format!("printf '%s' \"$M\" > '{}'", target.display());
    ok(
        "printf",
        &run("bash", &["-c", &cmd], w, &[("M", &manifest)]),
        &m,
    );
    let (code, body) = reg.curl("GET", "/v2/myapp/manifests/t");
    assert_eq!(code, 200, "{}", m.log_text());
    assert_eq!(body, manifest.as_bytes());
    assert_eq!(std::fs::read(&target).unwrap(), manifest.as_bytes());

    // Everything listed once, complete.
    assert_eq!(
        ls(&m.p("myapp/uploads")),
        ["cat-bash", "cat-sh", "cfg", "cp", "dd", "empty", "group", "py", "x.tar"]
    );
}

#[test]
fn failures_reach_close_and_poisoned_handles_push_nothing() {
    let reg = TestRegistry::start();
    let m = TestMount::new(&reg.addr(), &["--upload-chunk-size", "1MiB"]);
    std::fs::create_dir(m.p("myapp")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let a = pseudo_random(300_000, 3);
    std::fs::write(w.join("a"), &a).unwrap();

    // Content that does not hash to the name. bash runs `cat` in the process that opened the
    // file, so cat's own close of stdout reports the failure.
    let wrong = digest_hex(&sha256_digest(b"something else")).to_string();
    let dst = m.p(&format!("myapp/blobs/sha256/{wrong}"));
    let cmd = format!("cat a > '{}'", dst.display());
    let out = run("bash", &["-c", &cmd], w, &[]);
    assert!(!out.status.success(), "{}", m.log_text());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // dash opens the file itself and forks cat, so the commit comes at its own restoring close,
    // whose error the kernel drops (dup2): only the log says, and nothing is pushed or listed.
    let out = run("sh", &["-c", &cmd], w, &[]);
    let _ = out.status;
    assert_eq!(
        reg.curl("HEAD", &format!("/v2/myapp/blobs/{}", sha256_digest(&a)))
            .0,
        404
    );
    assert!(ls(&m.p("myapp/blobs/sha256")).is_empty());

    // An out-of-order write poisons: later writes and close fail, nothing is listed or pushed.
    let py = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
data = open('a', 'rb').read()
os.write(fd, data)
errs = []
for off in (len(data) + 10, len(data)):
    try:
        os.pwrite(fd, b'x', off)
        errs.append(0)
    except OSError as e:
        errs.append(e.errno)
try:
    os.close(fd)
    errs.append(0)
except OSError as e:
    errs.append(e.errno)
print(errs)
"#;
    let out = run(
        "python3",
        &["-c", py, &m.p("myapp/uploads/bad").to_string_lossy()],
        w,
        &[],
    );
    ok("python", &out, &m);
    let errs = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        errs,
        format!("[{}, {}, {}]", libc::EINVAL, libc::EIO, libc::EIO),
        "{}",
        m.log_text()
    );
    assert!(ls(&m.p("myapp/uploads")).is_empty());
    assert_eq!(
        reg.curl("HEAD", &format!("/v2/myapp/blobs/{}", sha256_digest(&a)))
            .0,
        404
    );
}

#[test]
fn allow_other_lets_other_users_read_but_not_write() {
    let reg = TestRegistry::start();
    let m = TestMount::new(&reg.addr(), &["-o", "allow_other"]);
    // Let another user reach the mountpoint inside the test's private temp dir.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(m.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(m.p("myapp")).unwrap();
    let as_nobody = |cmd: &str| {
        Command::new("runuser")
            .args(["-u", "nobody", "--", "sh", "-c", cmd])
            .output()
            .unwrap()
    };
    let up = m.p("myapp/uploads");
    let out = as_nobody(&format!("ls '{}'", up.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for cmd in [
        format!("echo x > '{}/y'", up.display()),
        format!("mkdir '{}'", m.p("other").display()),
        format!("mkdir '{}'", m.p("myapp/tags/t").display()),
    ] {
        let out = as_nobody(&cmd);
        assert!(!out.status.success(), "{cmd} succeeded as nobody");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(ls(&up).is_empty());
    assert!(m.log_text().contains("adding default_permissions"));
    // The owner still writes.
    std::fs::write(up.join("mine"), b"mine").unwrap();
    pushed(&reg, &m, "myapp", "mine", b"mine");
}

#[test]
fn reading_right_after_writing_sees_the_committed_blob() {
    // The commit of `: > x` comes at RELEASE, which close() does not wait for, so the next
    // command's open can come first; an open of a file whose commit is under way waits for it.
    let reg = TestRegistry::start();
    let m = TestMount::new(&reg.addr(), &["--upload-chunk-size", "1MiB"]);
    std::fs::create_dir(m.p("myapp")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let a = pseudo_random(1_200_000, 4);
    std::fs::write(w.join("a"), &a).unwrap();
    let up = m.p("myapp/uploads");
    let script = format!(
        "set -e; for i in $(seq 1 6); do \
           : > '{u}/e'$i; sha256sum < '{u}/e'$i; \
           touch '{u}/t'$i; cat '{u}/t'$i | sha256sum; \
           cat a > '{u}/x'$i; sha256sum < '{u}/x'$i; \
           {{ cat a; cat a; }} > '{u}/g'$i; sha256sum < '{u}/g'$i; \
         done",
        u = up.display()
    );
    let hex = |d: &[u8]| digest_hex(&sha256_digest(d)).to_string();
    let expected: String = [
        hex(b""),
        hex(b""),
        hex(&a),
        hex(&[a.clone(), a.clone()].concat()),
    ]
    .iter()
    .map(|h| format!("{h}  -\n"))
    .collect::<String>()
    .repeat(6);
    for sh in ["bash", "sh"] {
        let out = run(sh, &["-c", &script], w, &[]);
        ok(sh, &out, &m);
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected, "{sh}");
        for name in ls(&up) {
            std::fs::remove_file(up.join(name)).unwrap();
        }
    }
}
