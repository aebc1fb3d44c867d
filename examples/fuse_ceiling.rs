//! The FUSE ceiling of this machine, for benchmarks: a read-only mount with one file, `blob`,
//! whose bytes come from memory, served with regfs's kernel parameters (1 MiB reads, the same
//! readahead, background queue and FUSE threads). What `cat blob` reaches here is the most any
//! FUSE daemon can reach on this machine; `--hash` and `--copy` add, per reply, the work regfs
//! cannot skip (every byte through sha256) or a user-space copy, so the bench can say what a
//! figure costs. `scripts/bench.sh` runs it for the `ceiling` notes of the `seq` row.
//!
//! `cargo run --release --example fuse_ceiling -- MOUNTPOINT [--size 1GiB] [--hash] [--copy]`
//! mounts, prints `mounted`, and serves until unmounted (`fusermount3 -u MOUNTPOINT`).

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use clap::Parser;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, Request,
};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(about = "Mount one in-memory file with regfs's FUSE parameters, to measure the ceiling")]
struct Args {
    /// Where to mount (an empty directory).
    mountpoint: PathBuf,
    /// The file's size, e.g. 1GiB, 256MiB.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Hash every byte served with sha256 (regfs verifies every byte it fetches).
    #[arg(long)]
    hash: bool,
    /// Copy every reply into a fresh buffer first (one user-space copy per byte).
    #[arg(long)]
    copy: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = n.parse().map_err(|_| format!("not a size: {s}"))?;
    let mul = match unit {
        "" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(format!("unknown unit in {s} (KiB, MiB, GiB)")),
    };
    n.checked_mul(mul).ok_or_else(|| format!("too large: {s}"))
}

/// 1 MiB of varied bytes; the file repeats it.
const PATTERN: usize = 1 << 20;

struct Ceiling {
    size: u64,
    hash: bool,
    copy: bool,
    pattern: Vec<u8>,
    sha: Mutex<Sha256>,
}

const ROOT: u64 = 1;
const BLOB: u64 = 2;

impl Ceiling {
    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o555, 0, 2)
        } else {
            (FileType::RegularFile, 0o444, self.size, 1)
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 1 << 20, // as regfs's files: cat reads 1 MiB at a time
            flags: 0,
        }
    }
}

const TTL: Duration = Duration::from_secs(60);

impl Filesystem for Ceiling {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // As regfs's adapter: 1 MiB readahead (and so 1 MiB reads), 64 background requests.
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == ROOT && name == "blob" {
            reply.entry(&TTL, &self.attr(BLOB), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino.0 {
            ROOT | BLOB => reply.attr(&TTL, &self.attr(ino.0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let end = offset.saturating_add(u64::from(size)).min(self.size);
        let len = usize::try_from(end.saturating_sub(offset)).unwrap_or(0);
        // A read never spans more than the pattern (1 MiB max reads), so one slice of two
        // patterns back to back covers it.
        let at = usize::try_from(offset % PATTERN as u64).unwrap_or(0);
        let bytes = &self.pattern[at..at + len];
        if self.hash {
            self.sha.lock().unwrap().update(bytes);
        }
        if self.copy {
            let copy = std::hint::black_box(bytes.to_vec());
            reply.data(&copy);
        } else {
            reply.data(bytes);
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (BLOB, FileType::RegularFile, "blob"),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let mut pattern: Vec<u8> = (0..2 * PATTERN).map(|i| (i * 7 + i / 4096) as u8).collect();
    pattern.shrink_to_fit();
    let fs = Ceiling {
        size: args.size,
        hash: args.hash,
        copy: args.copy,
        pattern,
        sha: Mutex::new(Sha256::new()),
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("fuse-ceiling".into()),
        fuser::MountOption::RO,
        fuser::MountOption::AutoUnmount,
    ];
    config.acl = fuser::SessionACL::RootAndOwner;
    config.n_threads = Some(2); // as regfs (FUSE_THREADS)
    let session = fuser::Session::new(fs, &args.mountpoint, &config)
        .map_err(|e| format!("mounting on {}: {e}", args.mountpoint.display()))?;
    println!("mounted");
    session.run().map_err(|e| format!("FUSE session: {e}"))
}
