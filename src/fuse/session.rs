//! Running a mount: the checks made before forking, daemonizing, the tokio runtime, mounting with
//! the options the user chose, SIGINT/SIGTERM handling (a busy mount is detached lazily), kernel
//! cache invalidation, unmounting.
//!
//! Daemonizing follows mountpoint-s3: fork before any thread or tokio runtime exists; the parent
//! waits on a pipe until the child reports "mounted" or an error, so the command returns only once
//! the mount is live and its exit status tells the truth.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use fuser::{MountOption, SessionACL};
use tokio::runtime::{Handle, Runtime};
use tokio::signal::unix::Signal;

use super::adapter::{kernel_ino, FuseAdapter};
use crate::config::{Config, ConnectionConfig, CredentialsSource, MountConfig};
use crate::fs::Fs;
use crate::registry::auth::Credentials;
use crate::registry::http::{HttpOptions, HttpRegistry};

/// tokio worker threads. The work is network waits plus hashing and decompressing chunks; four
/// keep a few readers decompressing in parallel without taking over a small machine.
const IO_THREADS: usize = 4;

/// FUSE worker threads. They only hand each request to a tokio task and never wait on the
/// network, so two keep the kernel's queue drained.
const FUSE_THREADS: usize = 2;

/// Kernel readahead for the mount, in KiB. FUSE proposes 128 KiB, which caps a sequential reader at
/// one 128 KiB request in flight per readahead window; 1 MiB (the FUSE max_pages limit) cuts the
/// per-request overhead of a cold `cat` several times. Best effort: needs root (sysfs).
const READAHEAD_KB: u32 = 1024;

/// How long the runtime's remaining tasks get to finish after unmounting.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Mount and serve until unmounted. Exit status 1 (with the reason on stderr, or in the log of a
/// daemon) when anything fails; in the background, the command returns once the mount is live.
pub fn run(cfg: &Config) -> ExitCode {
    let startup = match Startup::prepare(cfg) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let mut status = StatusPipe(None);
    if !cfg.mount.foreground {
        match daemonize(&cfg.mount) {
            Ok(write_end) => status = StatusPipe(Some(write_end)),
            Err(e) => return fail(&e),
        }
    }
    init_logging(&startup.mountpoint);

    match serve(cfg, startup, &mut status) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            if !status.failed(&e) {
                eprintln!("regfs: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("regfs: {msg}");
    ExitCode::FAILURE
}

fn init_logging(mountpoint: &Path) {
    let inner = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .build();
    let max = inner.filter();
    let logger = Logger {
        inner,
        mountpoint: mountpoint.to_path_buf(),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(max);
    }
}

/// env_logger, less one false alarm: when its session ends, fuser unmounts again even if the
/// kernel already did (`fusermount3 -u`, `umount`), and warns that this second try failed. That
/// warning becomes a debug line when the mountpoint is no longer a regfs mount; when it still
/// is, the failure is real and stays a warning.
struct Logger {
    inner: env_logger::Logger,
    mountpoint: PathBuf,
}

impl Logger {
    fn is_redundant_unmount_warning(&self, r: &log::Record) -> bool {
        r.level() == log::Level::Warn
            && r.target().starts_with("fuser")
            && r.args().to_string().starts_with("Failed to umount")
            && super::mountpoint::mount_at(&self.mountpoint).is_none_or(|m| m.fstype != FSTYPE)
    }
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        self.inner.enabled(m)
    }

    fn log(&self, r: &log::Record) {
        if self.is_redundant_unmount_warning(r) {
            self.inner.log(
                &log::Record::builder()
                    .level(log::Level::Debug)
                    .target(r.target())
                    .args(format_args!(
                        "{} (the kernel had already unmounted)",
                        r.args()
                    ))
                    .build(),
            );
        } else {
            self.inner.log(r);
        }
    }

    fn flush(&self) {
        self.inner.flush()
    }
}

/// The filesystem type of a regfs mount in the mount table (`fuse.` + the subtype).
const FSTYPE: &str = "fuse.regfs";
/// The kernel option that names the subtype.
const SUBTYPE: &str = "subtype=regfs";

/// What is read before forking: everything that needs the terminal (a password on stdin) or
/// whose failure should reach the user directly.
struct Startup {
    credentials: Option<Credentials>,
    ca_cert_pem: Option<Vec<u8>>,
    /// The mountpoint's canonical path (as the mount table shows it).
    mountpoint: PathBuf,
}

impl Startup {
    fn prepare(cfg: &Config) -> Result<Startup, String> {
        let mountpoint = super::mountpoint::check(&cfg.mount.mountpoint, cfg.mount.nonempty)?;
        if let Some(d) = &cfg.cache.cache_dir {
            std::fs::create_dir_all(d).map_err(|e| format!("--cache-dir {}: {e}", d.display()))?;
        }
        let credentials = credentials(&cfg.connection)?;
        let ca_cert_pem = match &cfg.connection.ca_cert {
            Some(p) => {
                Some(std::fs::read(p).map_err(|e| format!("--ca-cert {}: {e}", p.display()))?)
            }
            None => None,
        };
        Ok(Startup {
            credentials,
            ca_cert_pem,
            mountpoint,
        })
    }
}

/// Credentials from --username (password from REGFS_PASSWORD or stdin), else the config files.
fn credentials(conn: &ConnectionConfig) -> Result<Option<Credentials>, String> {
    match &conn.credentials {
        CredentialsSource::Username(user) => {
            let password = match std::env::var("REGFS_PASSWORD") {
                Ok(p) => p,
                Err(_) => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .map_err(|e| format!("reading the password from stdin: {e}"))?;
                    s.trim_end_matches(['\n', '\r']).to_string()
                }
            };
            Ok(Some(Credentials {
                username: user.clone(),
                password,
            }))
        }
        CredentialsSource::ConfigFiles => Ok(crate::registry::credentials::lookup(&conn.host)),
    }
}

/// The daemon's report to the parent waiting in [`daemonize`]: "OK" once mounted, "ERR <reason>"
/// otherwise. Empty in the foreground, where nobody waits.
struct StatusPipe(Option<std::fs::File>);

impl StatusPipe {
    fn mounted(&mut self) {
        if let Some(mut p) = self.0.take() {
            let _ = p.write_all(b"OK");
        }
    }

    /// Report a failure; false if nobody was waiting to hear it.
    fn failed(&mut self, e: &str) -> bool {
        match self.0.take() {
            Some(mut p) => {
                let _ = p.write_all(format!("ERR {e}").as_bytes());
                true
            }
            None => false,
        }
    }
}

/// Fork. The parent waits for the child's verdict and exits; the child returns the pipe's
/// write end, detached from the terminal.
fn daemonize(mount: &MountConfig) -> Result<std::fs::File, String> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two fds into the array we own.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: no threads exist yet (no runtime, no logger), so fork is sound here.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the fds come from pipe() above and are owned by exactly one OwnedFd each.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if pid > 0 {
        drop(write_end);
        let mut msg = String::new();
        let _ = std::fs::File::from(read_end).read_to_string(&mut msg);
        if msg.starts_with("OK") {
            std::process::exit(0);
        }
        let msg = msg.strip_prefix("ERR ").unwrap_or(&msg);
        if msg.is_empty() {
            eprintln!("regfs: the daemon exited before mounting");
        } else {
            eprintln!("regfs: {msg}");
        }
        std::process::exit(1);
    }
    drop(read_end);
    // SAFETY: setsid has no preconditions; failure is harmless here.
    unsafe { libc::setsid() };
    redirect_stdio(mount)?;
    Ok(std::fs::File::from(write_end))
}

/// stdin and stdout to /dev/null; stderr (the log) to --log-file, else /dev/null.
fn redirect_stdio(mount: &MountConfig) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("/dev/null: {e}"))?;
    let log = match &mount.log_file {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| format!("--log-file {}: {e}", p.display()))?,
        None => null.try_clone().map_err(|e| e.to_string())?,
    };
    // SAFETY: dup2 onto the standard descriptors of this process.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(null.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
    }
    Ok(())
}

/// `-o allow_other` without `default_permissions` would let every local user push, re-tag and
/// delete with the mount owner's registry credentials (FUSE checks nothing by itself). So
/// allow_other implies default_permissions: the kernel then checks the modes regfs shows (writable
/// directories and files are the owner's alone: 0755 / 0644), and other users can read but not
/// write. Logged once at mount.
fn implies_default_permissions(m: &MountConfig) -> bool {
    m.allow_other && !m.default_permissions
}

/// The mount options: always nosuid and nodev, plus what the user asked for (default_permissions
/// whenever allow_other is given: [`implies_default_permissions`]).
///
/// The subtype goes as a kernel option, not as fuser's `Subtype`: fuser's own mount(2) (as root)
/// drops `Subtype`, and the mount table would say `fuse` instead of [`FSTYPE`]; fusermount3 (other
/// users) reads `subtype=` from either.
fn mount_options(m: &MountConfig) -> Vec<MountOption> {
    let mut opts = vec![
        MountOption::FSName(m.fsname.clone()),
        MountOption::CUSTOM(SUBTYPE.into()),
        MountOption::NoSuid,
        MountOption::NoDev,
    ];
    if m.default_permissions || implies_default_permissions(m) {
        opts.push(MountOption::DefaultPermissions);
    }
    if m.auto_unmount {
        opts.push(MountOption::AutoUnmount);
    }
    if m.read_only {
        opts.push(MountOption::RO);
    }
    if m.noexec {
        opts.push(MountOption::NoExec);
    }
    opts
}

/// Who besides the mounting user may use the mount (allow_other wins over allow_root).
fn session_acl(m: &MountConfig) -> SessionACL {
    if m.allow_other {
        SessionACL::All
    } else if m.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    }
}

fn fuse_config(m: &MountConfig) -> fuser::Config {
    let mut c = fuser::Config::default();
    c.mount_options = mount_options(m);
    c.acl = session_acl(m);
    c.n_threads = Some(FUSE_THREADS);
    c
}

/// Raise the kernel's readahead for the mount to [`READAHEAD_KB`], best effort.
fn raise_readahead(mountpoint: &Path) {
    // The device comes from the mount table, never from a stat through the mount: a stat is
    // served by this very process, and if it were killed meanwhile the thread would wait for
    // its own answer forever.
    let Some(entry) = super::mountpoint::mount_at(mountpoint) else {
        log::debug!(
            "could not raise readahead: {} not in the mount table",
            mountpoint.display()
        );
        return;
    };
    let (major, minor) = entry.device;
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&path, READAHEAD_KB.to_string()) {
        Ok(()) => log::debug!("{path} = {READAHEAD_KB}"),
        Err(e) => log::debug!("could not raise readahead ({path}): {e}"),
    }
}

/// Handlers for SIGINT and SIGTERM, installed before the mount is, so a signal that arrives the
/// moment the mount appears still unmounts cleanly instead of killing the process.
fn install_signal_handlers(rt: &Runtime) -> Result<(Signal, Signal), String> {
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })
    .map_err(|e| format!("installing signal handlers: {e}"))
}

/// On the first SIGINT or SIGTERM, unmount; the session then returns from `run`. A plain unmount
/// fails while anything uses the mount (an open file, a working directory, a `stat` in flight),
/// and fuser gives the mount up before trying: then the mount is detached lazily
/// ([`super::mountpoint::lazy_unmount`]) and the session ends once its last user lets go.
fn unmount_on_signal(
    rt: &Runtime,
    signals: (Signal, Signal),
    unmounter: fuser::SessionUnmounter,
    mountpoint: PathBuf,
) {
    let (mut int, mut term) = signals;
    let mut unmounter = unmounter;
    rt.spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        log::info!("signal received, unmounting");
        let done = tokio::task::spawn_blocking(move || {
            let Err(e) = unmounter.unmount() else {
                return;
            };
            log::warn!(
                "unmounting {}: {e}; detaching it lazily instead (it goes once nothing uses it)",
                mountpoint.display()
            );
            if let Err(e) = super::mountpoint::lazy_unmount(&mountpoint) {
                log::error!("{e}");
            }
        });
        let _ = done.await;
    });
}

/// After a push, the kernel must forget the tag's cached name so the new manifest shows at once.
/// Notifications go from their own thread: never from inside a request being answered.
fn install_invalidator(fs: &Fs, notifier: fuser::Notifier, rt: Handle) {
    fs.set_invalidator(Box::new(move |parent, name| {
        let n = notifier.clone();
        rt.spawn_blocking(move || {
            if let Err(e) = n.inval_entry(kernel_ino(parent), std::ffi::OsStr::new(&name)) {
                log::debug!("invalidating {name} in {parent}: {e}");
            }
        });
    }));
}

/// Start the runtime, check the registry answers, mount, tell a waiting parent, and serve until
/// unmounted.
fn serve(cfg: &Config, startup: Startup, status: &mut StatusPipe) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(IO_THREADS)
        .thread_name("regfs-io")
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let conn = &cfg.connection;
    let http = HttpOptions {
        base: conn.base_url.clone(),
        credentials: startup.credentials,
        ca_cert_pem: startup.ca_cert_pem,
        insecure: conn.insecure,
        connect_timeout: conn.connect_timeout(),
        request_timeout: conn.request_timeout,
        redirect_ttl: conn.redirect_ttl,
    };
    let reg = HttpRegistry::new(http.clone())
        .map_err(|e| e.to_string())?
        .with_retry_budget(conn.retry_budget);
    rt.block_on(reg.ping())
        .map_err(|e| format!("cannot use registry {}: {e}", conn.base_url))?;
    log::info!("registry {} answers", conn.base_url);
    let mut reg: Arc<dyn crate::registry::Registry> = Arc::new(reg);
    if !conn.mirrors.is_empty() {
        // ctl: pull-through mirrors in front of the registry (`--mirror`), each its own client.
        let mirrors = conn
            .mirrors
            .iter()
            .map(|(url, host)| crate::registry::mirror::http_mirror(url.clone(), host, &http))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        reg = Arc::new(crate::registry::mirror::MirrorRegistry::new(
            reg,
            mirrors,
            conn.mirror_tags,
        ));
    }

    // disk tier: opened after the fork (it starts a writer thread); a dir in use is refused.
    let disk = match (&cfg.cache.cache_dir, cfg.cache.cache_dir_size) {
        (Some(dir), cap) if cap > 0 => {
            Some(crate::disk::DiskCache::open(dir, cap).map_err(|e| format!("--cache-dir: {e}"))?)
        }
        _ => None,
    };
    let mut opts = crate::fs::FsOptions::from_config(cfg);
    opts.disk = disk.clone();
    let fs = Fs::new(reg, opts);
    let adapter = FuseAdapter::new(fs.clone(), rt.handle().clone());

    let signals = install_signal_handlers(&rt)?;
    if implies_default_permissions(&cfg.mount) {
        log::warn!(
            "-o allow_other: adding default_permissions, so other users cannot push or delete with \
             this mount's credentials (the kernel checks the modes shown)"
        );
    }
    let mountpoint = &cfg.mount.mountpoint;
    let mut session = fuser::Session::new(adapter, mountpoint, &fuse_config(&cfg.mount))
        .map_err(|e| format!("mounting on {}: {e}", mountpoint.display()))?;
    log::info!("mounted {} on {}", conn.base_url, mountpoint.display());
    // Off the session's thread; the canonical path is what the mount table lists.
    let mp = startup.mountpoint.clone();
    std::thread::Builder::new()
        .name("regfs-readahead".into())
        .spawn(move || raise_readahead(&mp))
        .map_err(|e| format!("spawning a thread: {e}"))?;

    install_invalidator(&fs, session.notifier(), rt.handle().clone());
    unmount_on_signal(
        &rt,
        signals,
        session.unmount_callable(),
        startup.mountpoint.clone(),
    );

    status.mounted();
    match session.run() {
        Ok(()) => {}
        // When the kernel tears a detached mount down, a FUSE thread still waiting for a request
        // may read ECONNABORTED instead of ENODEV (seen after a lazy unmount, under load). With
        // the mount gone from the mount table that is an unmount, not a failure; a connection
        // aborted under a mount that is still there (through /sys/fs/fuse/connections) is one.
        Err(e)
            if crate::error::is_connection_aborted(&e)
                && super::mountpoint::mount_at(&startup.mountpoint).is_none() =>
        {
            log::debug!("FUSE session: {e} after the mount was detached");
        }
        Err(e) => return Err(format!("FUSE session: {e}")),
    }
    log::info!("unmounted");
    if let Some(d) = &disk {
        d.flush(); // disk tier: blocks still queued reach the disk
    }
    rt.shutdown_timeout(SHUTDOWN_GRACE);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn mount(args: &[&str]) -> MountConfig {
        let mut v = vec!["regfs", "localhost:5000", "/mnt"];
        v.extend_from_slice(args);
        Config::try_from(crate::cli::Cli::try_parse_args(v).unwrap())
            .unwrap()
            .mount
    }

    #[test]
    fn default_mount_is_private_nosuid_nodev() {
        let m = mount(&[]);
        assert_eq!(
            mount_options(&m),
            vec![
                MountOption::FSName("localhost:5000".into()),
                MountOption::CUSTOM(SUBTYPE.into()),
                MountOption::NoSuid,
                MountOption::NoDev,
            ]
        );
        assert_eq!(session_acl(&m), SessionACL::Owner);
        let c = fuse_config(&m);
        assert_eq!(c.n_threads, Some(FUSE_THREADS));
        assert_eq!(c.mount_options, mount_options(&m));
    }

    #[test]
    fn user_options_reach_the_mount() {
        let m = mount(&["-o", "default_permissions,auto_unmount,fsname=mine,nosuid"]);
        assert_eq!(
            mount_options(&m),
            vec![
                MountOption::FSName("mine".into()),
                MountOption::CUSTOM(SUBTYPE.into()),
                MountOption::NoSuid,
                MountOption::NoDev,
                MountOption::DefaultPermissions,
                MountOption::AutoUnmount,
            ]
        );
    }

    #[test]
    fn ro_and_noexec_reach_the_mount() {
        let opts = mount_options(&mount(&["-o", "ro,noexec,_netdev,nofail,dev,suid"]));
        assert_eq!(
            opts,
            vec![
                MountOption::FSName("localhost:5000".into()),
                MountOption::CUSTOM(SUBTYPE.into()),
                MountOption::NoSuid,
                MountOption::NoDev,
                MountOption::RO,
                MountOption::NoExec,
            ]
        );
        assert!(!mount_options(&mount(&["-o", "ro,rw"])).contains(&MountOption::RO));
    }

    #[test]
    fn allow_other_implies_default_permissions() {
        let base = vec![
            MountOption::FSName("localhost:5000".into()),
            MountOption::CUSTOM(SUBTYPE.into()),
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::DefaultPermissions,
        ];
        for o in [
            "allow_other",
            "allow_other,default_permissions",
            "allow_root,allow_other",
        ] {
            let m = mount(&["-o", o]);
            assert_eq!(mount_options(&m), base, "-o {o}");
            assert_eq!(fuse_config(&m).mount_options, base, "-o {o}");
            assert_eq!(session_acl(&m), SessionACL::All, "-o {o}");
        }
        assert!(implies_default_permissions(&mount(&["-o", "allow_other"])));
        assert!(!implies_default_permissions(&mount(&[
            "-o",
            "allow_other,default_permissions"
        ])));
        // allow_root alone lets only root in, who passes any permission check anyway.
        let m = mount(&["-o", "allow_root"]);
        assert!(!mount_options(&m).contains(&MountOption::DefaultPermissions));
        assert!(!implies_default_permissions(&m));
    }

    #[test]
    fn allow_other_wins_over_allow_root() {
        assert_eq!(
            session_acl(&mount(&["-o", "allow_root"])),
            SessionACL::RootAndOwner
        );
        assert_eq!(session_acl(&mount(&["-o", "allow_other"])), SessionACL::All);
        assert_eq!(
            session_acl(&mount(&["-o", "allow_root,allow_other"])),
            SessionACL::All
        );
    }

    #[test]
    fn status_pipe_reports_once() {
        let (r, w) = std::io::pipe().unwrap();
        let mut s = StatusPipe(Some(std::fs::File::from(OwnedFd::from(w))));
        s.mounted();
        // Only the first report is sent; later ones find nobody waiting.
        assert!(!s.failed("late"));
        let mut msg = String::new();
        std::fs::File::from(OwnedFd::from(r))
            .read_to_string(&mut msg)
            .unwrap();
        assert_eq!(msg, "OK");

        let (r, w) = std::io::pipe().unwrap();
        let mut s = StatusPipe(Some(std::fs::File::from(OwnedFd::from(w))));
        assert!(s.failed("mounting on /x: denied"));
        let mut msg = String::new();
        std::fs::File::from(OwnedFd::from(r))
            .read_to_string(&mut msg)
            .unwrap();
        assert_eq!(msg, "ERR mounting on /x: denied");
        assert!(!StatusPipe(None).failed("x"));
    }
}
