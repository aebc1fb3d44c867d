//! The `regfs` command: parse flags, find credentials, daemonize, mount, serve.
//!
//! Daemonizing follows mountpoint-s3: fork before any thread or tokio runtime exists; the parent
//! waits on a pipe until the child reports "mounted" or an error, so the command returns only once
//! the mount is live and its exit status tells the truth.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use regfs::config::{Cli, Config};
use regfs::fs::{Fs, FsOptions};
use regfs::fuse::FuseAdapter;
use regfs::registry::auth::Credentials;
use regfs::registry::http::{HttpOptions, HttpRegistry};

fn main() -> ExitCode {
    // Chunks are megabytes each: keep such buffers in their own mappings so freeing one returns
    // it to the system (glibc's adaptive threshold would otherwise move them into the heap,
    // where fragmentation keeps peak RSS far above the cache's byte cap).
    // SAFETY: mallopt only tunes the allocator; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    let cli = Cli::parse();
    let cfg = match Config::try_from(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("regfs: {e}");
            return ExitCode::from(2);
        }
    };
    match std::fs::metadata(&cfg.mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return fail(&format!("{} is not a directory", cfg.mountpoint.display())),
        Err(e) => return fail(&format!("mountpoint {}: {e}", cfg.mountpoint.display())),
    }
    if let Some(d) = &cfg.cache_dir {
        if let Err(e) = std::fs::create_dir_all(d) {
            return fail(&format!("--cache-dir {}: {e}", d.display()));
        }
    }
    let credentials = match credentials(&cfg) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let ca_cert_pem = match &cfg.ca_cert {
        Some(p) => match std::fs::read(p) {
            Ok(b) => Some(b),
            Err(e) => return fail(&format!("--ca-cert {}: {e}", p.display())),
        },
        None => None,
    };

    let mut status_pipe: Option<std::fs::File> = None;
    if !cfg.foreground {
        match daemonize(&cfg) {
            Ok(Some(write_end)) => status_pipe = Some(write_end),
            Ok(None) => unreachable!("the parent exits inside daemonize"),
            Err(e) => return fail(&e),
        }
    }
    init_logging();

    let result = run(&cfg, credentials, ca_cert_pem, &mut status_pipe);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            if let Some(mut p) = status_pipe.take() {
                let _ = p.write_all(format!("ERR {e}").as_bytes());
            } else {
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

fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
}

/// Credentials from --username (password from REGFS_PASSWORD or stdin), else the config files.
fn credentials(cfg: &Config) -> Result<Option<Credentials>, String> {
    if let Some(user) = &cfg.username {
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
        return Ok(Some(Credentials {
            username: user.clone(),
            password,
        }));
    }
    Ok(regfs::registry::credentials::lookup(&cfg.host))
}

/// Fork. The parent waits for the child's verdict and exits; the child returns the pipe's
/// write end, detached from the terminal.
fn daemonize(cfg: &Config) -> Result<Option<std::fs::File>, String> {
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
    redirect_stdio(cfg)?;
    Ok(Some(std::fs::File::from(write_end)))
}

fn redirect_stdio(cfg: &Config) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("/dev/null: {e}"))?;
    let log = match &cfg.log_file {
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

/// Kernel readahead for the mount, in KiB. FUSE proposes 128 KiB, which caps a sequential reader at
/// one 128 KiB request in flight per readahead window; 1 MiB (the FUSE max_pages limit) cuts the
/// per-request overhead of a cold `cat` several times. Best effort: needs root (sysfs).
const READAHEAD_KB: u32 = 1024;

fn raise_readahead(mountpoint: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&path, READAHEAD_KB.to_string()) {
        Ok(()) => log::debug!("{path} = {READAHEAD_KB}"),
        Err(e) => log::debug!("could not raise readahead ({path}): {e}"),
    }
}

fn run(
    cfg: &Config,
    credentials: Option<Credentials>,
    ca_cert_pem: Option<Vec<u8>>,
    status_pipe: &mut Option<std::fs::File>,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("regfs-io")
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let reg = HttpRegistry::new(HttpOptions {
        base: cfg.base_url.clone(),
        credentials,
        ca_cert_pem,
        insecure: cfg.insecure,
        connect_timeout: std::time::Duration::from_secs(10).min(cfg.request_timeout),
        request_timeout: cfg.request_timeout,
    })
    .map_err(|e| e.to_string())?;
    rt.block_on(reg.ping())
        .map_err(|e| format!("cannot use registry {}: {e}", cfg.base_url))?;
    log::info!("registry {} answers", cfg.base_url);

    let fs = Arc::new(Fs::new(
        Arc::new(reg),
        FsOptions {
            chunk_size: cfg.chunk_size,
            cache_size: cfg.cache_size,
            metadata_ttl: cfg.metadata_ttl,
            readahead_chunks: cfg.readahead_chunks,
            platform: cfg.platform.clone(),
            upload_chunk_size: cfg.upload_chunk_size,
            checkpoint_spacing: cfg.checkpoint_spacing,
            cache_dir: cfg.cache_dir.clone(),
        },
    ));
    let adapter = FuseAdapter::new(fs.clone(), rt.handle().clone());

    let mut opts = vec![
        fuser::MountOption::FSName(cfg.fsname.clone()),
        fuser::MountOption::Subtype("regfs".into()),
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
    ];
    if cfg.default_permissions {
        opts.push(fuser::MountOption::DefaultPermissions);
    }
    if cfg.auto_unmount {
        opts.push(fuser::MountOption::AutoUnmount);
    }
    let mut fuse_cfg = fuser::Config::default();
    fuse_cfg.mount_options = opts;
    fuse_cfg.acl = if cfg.allow_other {
        fuser::SessionACL::All
    } else if cfg.allow_root {
        fuser::SessionACL::RootAndOwner
    } else {
        fuser::SessionACL::Owner
    };
    fuse_cfg.n_threads = Some(2);

    // Handlers for SIGINT/SIGTERM are in place before the mount is, so a signal that arrives
    // the moment the mount appears still unmounts cleanly instead of killing the process.
    let signals = rt
        .block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    let mut session = fuser::Session::new(adapter, &cfg.mountpoint, &fuse_cfg)
        .map_err(|e| format!("mounting on {}: {e}", cfg.mountpoint.display()))?;
    log::info!("mounted {} on {}", cfg.base_url, cfg.mountpoint.display());
    // stat() of the mountpoint is served by this session, so ask from another thread.
    let mp = cfg.mountpoint.clone();
    std::thread::Builder::new()
        .name("regfs-readahead".into())
        .spawn(move || raise_readahead(&mp))
        .map_err(|e| format!("spawning a thread: {e}"))?;

    // After a push, the kernel must forget the tag's cached name so the new manifest shows at
    // once. Notifications go from their own thread: never from inside a request being answered.
    let notifier = session.notifier();
    let rt_handle = rt.handle().clone();
    fs.set_invalidator(Box::new(move |parent, name| {
        let n = notifier.clone();
        rt_handle.spawn_blocking(move || {
            if let Err(e) = n.inval_entry(fuser::INodeNo(parent.0), std::ffi::OsStr::new(&name)) {
                log::debug!("invalidating {name} in {parent}: {e}");
            }
        });
    }));

    let mut unmounter = session.unmount_callable();
    let (mut int, mut term) = signals;
    rt.spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        log::info!("signal received, unmounting");
        let _ = tokio::task::spawn_blocking(move || unmounter.unmount()).await;
    });

    if let Some(mut p) = status_pipe.take() {
        let _ = p.write_all(b"OK");
    }
    session.run().map_err(|e| format!("FUSE session: {e}"))?;
    log::info!("unmounted");
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
