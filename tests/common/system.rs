//! Mounting the way the system does: `scripts/install.sh` into a temporary prefix, regfs's
//! mount(8) helper in /sbin, and mounts made by `mount(8)` (daemons, not children of the test),
//! undone on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::is_mounted;

/// Where mount(8) looks for the helper of type fuse.regfs.
pub const MOUNT_HELPER: &str = "/sbin/mount.fuse.regfs";

/// The repository's scripts/ directory.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

/// Make sure /sbin/mount.fuse.regfs exists and honours REGFS_BINDIR. Never replaces a file that
/// is there (a real install, or a parallel test run that got there first): a hard link from a
/// private temporary file either creates it whole or fails because it exists.
pub fn ensure_mount_helper() {
    let path = Path::new(MOUNT_HELPER);
    if !path.exists() {
        use std::os::unix::fs::PermissionsExt;
        let text = std::fs::read(scripts_dir().join("mount.fuse.regfs")).unwrap();
        let dir = path.parent().unwrap();
        let tmp = tempfile::Builder::new()
            .prefix(".mount.fuse.regfs.")
            .tempfile_in(dir)
            .unwrap();
        std::fs::write(tmp.path(), text).unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let _ = std::fs::hard_link(tmp.path(), path);
    }
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.contains("REGFS_BINDIR"),
        "{MOUNT_HELPER} is not regfs's helper (scripts/mount.fuse.regfs)"
    );
}

/// A temporary install made by scripts/install.sh from the test binary (no build, no apt-get).
pub struct Install {
    pub dir: tempfile::TempDir,
}

impl Install {
    pub fn new() -> Self {
        let inst = Install {
            dir: tempfile::tempdir().unwrap(),
        };
        let out = inst.run();
        assert!(
            out.status.success(),
            "install.sh failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        inst
    }

    /// Run install.sh (again) into this prefix.
    pub fn run(&self) -> Output {
        Command::new("bash")
            .arg(scripts_dir().join("install.sh"))
            .env("PREFIX", self.prefix())
            .env("SBINDIR", self.dir.path().join("sbin"))
            .env("REGFS_BIN", super::regfs_bin())
            .env("NO_DEPS", "1")
            .env_remove("DESTDIR")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn prefix(&self) -> PathBuf {
        self.dir.path().join("prefix")
    }

    pub fn bindir(&self) -> PathBuf {
        self.prefix().join("bin")
    }
}

impl Default for Install {
    fn default() -> Self {
        Self::new()
    }
}

/// A mount made by mount(8): lazily unmounted on drop if a test left it mounted.
pub struct SystemMount {
    pub dir: tempfile::TempDir,
    /// The daemon's log (`-o log_file=`).
    pub log: PathBuf,
}

impl SystemMount {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("mnt")).unwrap();
        let log = dir.path().join("regfs.log");
        SystemMount { dir, log }
    }

    /// The mountpoint (`rel` below it).
    pub fn at(&self, rel: &str) -> PathBuf {
        let mnt = self.dir.path().join("mnt");
        if rel.is_empty() {
            mnt
        } else {
            mnt.join(rel)
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `mount -t fuse.regfs SOURCE MNT -o OPTS`.
    pub fn mount_t(&self, bindir: &Path, source: &str, opts: &str) -> Output {
        let mnt = self.at("");
        let mnt = mnt.to_str().unwrap();
        self.command(
            "mount",
            bindir,
            &["-t", "fuse.regfs", source, mnt, "-o", opts],
        )
    }

    /// `umount MNT`, then wait until the daemon is done; it must have logged no warning.
    pub fn umount(&self, bindir: &Path) {
        let out = self.command("umount", bindir, &[self.at("").to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        self.wait_unmounted();
        assert!(!self.log_text().contains(" WARN "), "{}", self.log_text());
    }

    /// Run mount(8) (or umount(8)) with `args`, with regfs taken from `bindir` and the
    /// developer's credential files kept out.
    pub fn command(&self, program: &str, bindir: &Path, args: &[&str]) -> Output {
        Command::new(program)
            .args(args)
            .env("REGFS_BINDIR", bindir)
            .env("RUST_LOG", "info")
            .env("DOCKER_CONFIG", self.dir.path())
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("DOCKER_AUTH_CONFIG")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("XDG_CONFIG_HOME")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Wait (bounded) until the daemon logged that it unmounted and is about to exit.
    pub fn wait_unmounted(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log_text().contains("unmounted") {
            assert!(
                Instant::now() < deadline,
                "regfs did not log its unmount:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!is_mounted(&self.at("")));
    }
}

impl Default for SystemMount {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for SystemMount {
    fn drop(&mut self) {
        if is_mounted(&self.at("")) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.at(""))
                .stderr(Stdio::null())
                .status();
        }
    }
}
