//! Real tier, the way a system mounts: scripts/install.sh into a temporary prefix, then
//! `mount -t fuse.regfs` and `mount -T <fstab> DIR` (mount(8) -> /sbin/mount.fuse.regfs ->
//! mount.fuse3 -> regfs), reads, and `umount`.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;

#[test]
fn install_sh_installs_everything_and_is_idempotent() {
    let inst = Install::new();
    let files = |inst: &Install| -> Vec<(String, Vec<u8>, u32)> {
        let mut v = Vec::new();
        let mut stack = vec![inst.dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let meta = e.metadata().unwrap();
                if meta.is_dir() {
                    stack.push(e.path());
                } else {
                    let rel = e.path().strip_prefix(inst.dir.path()).unwrap().to_owned();
                    let mode = meta.permissions().mode() & 0o777;
                    v.push((
                        rel.display().to_string(),
                        std::fs::read(e.path()).unwrap(),
                        mode,
                    ));
                }
            }
        }
        v.sort();
        v
    };
    let first = files(&inst);
    let names: Vec<(&str, u32)> = first.iter().map(|(n, _, m)| (n.as_str(), *m)).collect();
    assert_eq!(
        names,
        [
            ("prefix/bin/regfs", 0o755),
            ("prefix/share/bash-completion/completions/regfs", 0o644),
            ("prefix/share/fish/vendor_completions.d/regfs.fish", 0o644),
            ("prefix/share/man/man1/regfs.1", 0o644),
            ("prefix/share/zsh/site-functions/_regfs", 0o644),
            ("sbin/mount.fuse.regfs", 0o755),
        ]
    );
    let text = |name: &str| {
        let (_, bytes, _) = first.iter().find(|(n, _, _)| n == name).unwrap();
        String::from_utf8_lossy(bytes).into_owned()
    };
    let man = text("prefix/share/man/man1/regfs.1");
    assert!(man.contains(".TH regfs 1"), "{man}");
    assert!(man.contains(r"\-\-cache\-size") && man.contains("MOUNT OPTIONS AND FSTAB"));
    assert!(text("prefix/share/bash-completion/completions/regfs").contains("--cache-size"));
    assert!(text("prefix/share/zsh/site-functions/_regfs").contains("#compdef regfs"));
    assert!(text("prefix/share/fish/vendor_completions.d/regfs.fish").contains("cache-size"));
    let helper = text("sbin/mount.fuse.regfs");
    let bindir = format!("REGFS_BINDIR_DEFAULT={}\n", inst.bindir().display());
    assert!(helper.contains(&bindir), "{helper}");
    // Again: same files, same bytes.
    assert!(inst.run().status.success());
    assert_eq!(files(&inst), first);
}

#[test]
fn mount_t_fuse_regfs_reads_and_umounts() {
    ensure_mount_helper();
    let s = seeded();
    let inst = Install::new();
    let m = SystemMount::new();
    let opts = format!(
        "cache_size=512MiB,metadata_ttl=10s,log_file={}",
        m.log.display()
    );
    let out = m.mount_t(&inst.bindir(), &s.reg.addr(), &opts);
    assert!(out.status.success(), "{out:?}\n{}", m.log_text());
    // mount(8) returned: the mount is live, under its fstab name and type.
    let entry = regfs::fuse::mountpoint::mount_at(&m.at("")).expect("mounted");
    assert_eq!(
        (entry.fstype.as_str(), entry.source),
        ("fuse.regfs", s.reg.addr())
    );
    assert_eq!(ls(&m.at("debian/min/tags")), ["bookworm"]);
    let tag = m.at("debian/min/tags/bookworm");
    assert_eq!(
        std::fs::read(tag.join("manifest.json")).unwrap(),
        s.min.manifest
    );
    assert_eq!(
        std::fs::read(tag.join("rootfs/etc/os-release")).unwrap(),
        b"PRETTY_NAME=\"regfs test\"\n"
    );
    m.umount(&inst.bindir());

    // A bad value stops mount(8) with regfs's message.
    let out = m.mount_t(&inst.bindir(), &s.reg.addr(), "cache_size=lots");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cache-size: bad size \"lots\""), "{err}");
    assert!(!is_mounted(&m.at("")));
}

#[test]
fn fstab_line_mounts_read_only_and_umounts() {
    ensure_mount_helper();
    let s = seeded();
    let inst = Install::new();
    let m = SystemMount::new();
    let mnt = m.at("");
    let fstab = m.dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# regfs test\n{} {} fuse.regfs _netdev,nofail,x-systemd.automount,\
             x-systemd.idle-timeout=60,cache_size=512MiB,ro,log_file={} 0 0\n",
            s.reg.addr(),
            mnt.display(),
            m.log.display()
        ),
    )
    .unwrap();
    let fstab = fstab.to_str().unwrap();
    let out = m.command(
        "mount",
        &inst.bindir(),
        &["-T", fstab, mnt.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}\n{}", m.log_text());
    assert!(is_mounted(&mnt));
    assert_eq!(
        std::fs::read(m.at("debian/min/tags/bookworm/rootfs/etc/os-release")).unwrap(),
        b"PRETTY_NAME=\"regfs test\"\n"
    );
    // ro: the kernel refuses writes.
    let e = std::fs::create_dir(m.at("debian/min/tags/newtag")).unwrap_err();
    assert_eq!(errno(&e), libc::EROFS, "{e}");
    // mount -a sees the line as mounted already (same source and target) and leaves it.
    let out = m.command("mount", &inst.bindir(), &["-T", fstab, "-a"]);
    assert!(out.status.success(), "{out:?}");
    m.umount(&inst.bindir());
}
