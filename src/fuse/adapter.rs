//! The FUSE adapter: converts fuser's calls into [`Fs`] calls and results into replies.
//!
//! Every operation that may touch the network runs in a tokio task that owns the reply, so a slow
//! read never blocks `ls` or another file, and the FUSE worker threads never wait on the network.
//! Errors are replied (and logged) in exactly one place: [`reply_error`]. Inode numbers and file
//! handles cross between fuser's types and the core's in four small functions ([`core_ino`],
//! [`core_fh`], [`kernel_ino`], [`kernel_fh`]) and nowhere else.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;

use crate::error::FsError;
use crate::fs::{Attr, DirEntry, Fh, Fs, Ino, Kind, Opened};

/// Data reads in flight at once; more wait for a permit (the kernel queues behind them). Each one
/// holds a task and its reply buffer: 64 keeps many parallel readers busy while bounding that
/// memory.
const MAX_CONCURRENT_READS: usize = 64;

/// Block size reported in statfs and in the stat of anything but a file: the page size, the
/// unit the kernel caches in. Files report the core's preferred I/O size
/// ([`Fs::preferred_io_size`]), so readers read whole cache blocks.
const BLOCK_SIZE: u32 = 4096;

/// Longest name reported by statfs, as on most Linux filesystems.
const NAME_MAX: u32 = 255;

/// The core's inode number for a kernel inode number.
fn core_ino(i: INodeNo) -> Ino {
    Ino(i.0)
}

/// The core's file handle for a kernel file handle.
fn core_fh(f: FileHandle) -> Fh {
    Fh(f.0)
}

/// The kernel's inode number for a core inode number.
pub(super) fn kernel_ino(i: Ino) -> INodeNo {
    INodeNo(i.0)
}

/// The kernel's file handle for a core file handle.
fn kernel_fh(f: Fh) -> FileHandle {
    FileHandle(f.0)
}

/// The fuser `Filesystem` over the core.
pub struct FuseAdapter {
    fs: Arc<Fs>,
    rt: Handle,
    uid: u32,
    gid: u32,
    /// Files' `st_blksize` ([`Fs::preferred_io_size`]).
    io: u32,
    reads: Arc<Semaphore>,
    /// Directory listings by directory handle, snapshotted at offset 0 (adapter-local handles).
    dir_handles: Arc<Mutex<HashMap<FileHandle, Arc<Vec<DirEntry>>>>>,
    next_dir_fh: AtomicU64,
    /// Backing files handed to the kernel (FUSE passthrough).
    passthrough: Arc<super::passthrough::Passthrough>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<Fs>, rt: Handle) -> Self {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FuseAdapter {
            io: fs.preferred_io_size(),
            fs,
            rt,
            uid,
            gid,
            reads: Arc::new(Semaphore::new(MAX_CONCURRENT_READS)),
            dir_handles: Arc::new(Mutex::new(HashMap::new())),
            next_dir_fh: AtomicU64::new(1),
            passthrough: Arc::default(),
        }
    }

    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F) {
        self.rt.spawn(f);
    }
}

/// Log an error at its own level, with the operation and inode, and return its errno.
fn reply_error(op: &str, ino: INodeNo, e: &FsError) -> Errno {
    log::log!(e.level, "{op} ino={ino}: {}", e.message);
    Errno::from_i32(e.errno)
}

/// The answer to any operation that would change the read-only parts of the tree.
fn erofs(op: &str, ino: INodeNo) -> Errno {
    reply_error(
        op,
        ino,
        &FsError::read_only(format!("{op}: read-only file system")),
    )
}

/// The core's attributes as a stat. Files without an owner of their own belong to the mounting
/// user; every timestamp is the one modification time. Files report `io` as their block size.
fn file_attr(a: &Attr, uid: u32, gid: u32, io: u32) -> FileAttr {
    FileAttr {
        ino: kernel_ino(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid.unwrap_or(uid),
        gid: a.gid.unwrap_or(gid),
        rdev: a.rdev,
        blksize: if a.kind == Kind::File { io } else { BLOCK_SIZE },
        flags: 0,
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
    }
}

/// Names the core can handle: valid UTF-8 (every name in a registry is).
fn os_name(name: &OsStr) -> Option<String> {
    name.to_str().map(str::to_string)
}

/// The thread-group id (the process) of the task that sent a request: FUSE headers carry the
/// thread id. Read from `/proc/<pid>/status` while the caller still waits for the answer; the raw
/// pid when that is not readable (then it is the process id anyway for single-threaded callers).
fn tgid(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(pid)
}

/// Whether an open asks to change the file: any access mode but read-only, or truncate/append.
fn wants_write(flags: OpenFlags) -> bool {
    !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY)
        || flags.0 & (libc::O_TRUNC | libc::O_APPEND) != 0
}

/// Content that never changes may stay in the kernel's page cache across opens.
fn fopen_flags(o: &Opened) -> FopenFlags {
    let mut f = FopenFlags::empty();
    if o.keep_cache {
        f |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if o.direct_io {
        f |= FopenFlags::FOPEN_DIRECT_IO;
    }
    f
}

/// The entries of directory `dir` from `offset` on: `.` and `..`, then the snapshot, each with the
/// offset of the entry after it (what the kernel passes back to continue).
fn dir_page(
    dir: INodeNo,
    snapshot: &[DirEntry],
    offset: u64,
) -> impl Iterator<Item = (INodeNo, u64, FileType, &str)> {
    let dots = [(dir, "."), (dir, "..")]
        .into_iter()
        .map(|(i, n)| (i, n, FileType::Directory));
    let entries = snapshot
        .iter()
        .map(|e| (kernel_ino(e.ino), e.name.as_str(), file_type(e.kind)));
    dots.chain(entries)
        .enumerate()
        .skip(offset as usize)
        .map(|(i, (ino, name, kind))| (ino, (i + 1) as u64, kind, name))
}

/// What to answer to getxattr/listxattr.
#[derive(Debug, PartialEq, Eq)]
enum XattrAnswer<'a> {
    /// The caller asked for the size (size 0).
    Size(u32),
    /// The value fits the caller's buffer.
    Data(&'a [u8]),
    /// It does not.
    TooSmall,
}

/// The size when asked for it, the value when it fits, ERANGE otherwise.
fn xattr_answer(size: u32, value: &[u8]) -> XattrAnswer<'_> {
    if size == 0 {
        XattrAnswer::Size(value.len() as u32)
    } else if value.len() <= size as usize {
        XattrAnswer::Data(value)
    } else {
        XattrAnswer::TooSmall
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, value: &[u8]) {
    match xattr_answer(size, value) {
        XattrAnswer::Size(n) => reply.size(n),
        XattrAnswer::Data(d) => reply.data(d),
        XattrAnswer::TooSmall => reply.error(Errno::from_i32(FsError::too_small().errno)),
    }
}

/// listxattr's format: every name followed by a NUL.
fn xattr_list(names: &[String]) -> Vec<u8> {
    let mut buf = Vec::new();
    for n in names {
        buf.extend_from_slice(n.as_bytes());
        buf.push(0);
    }
    buf
}

/// The kernel's readahead per file, in bytes, asked for at init (the mount's bdi readahead is
/// raised to match in `session`). 1 MiB is the most one FUSE request carries (256 pages, the
/// kernel's default `max_pages` limit), so a sequential reader's requests are 1 MiB each.
const KERNEL_READAHEAD: u32 = 1 << 20;

/// Background requests (readahead, async reads) the kernel keeps in flight. Its default of 12
/// holds a sequential reader to ~12 MiB of parallel 1 MiB reads; 64 lets several readers stream
/// at once while regfs fetches ahead of them. Each request costs the daemon only a task.
const MAX_BACKGROUND: u16 = 64;

/// Where the kernel starts treating the queue as congested: three quarters of
/// [`MAX_BACKGROUND`], the kernel's own ratio.
const CONGESTION_THRESHOLD: u16 = MAX_BACKGROUND / 4 * 3;

impl Filesystem for FuseAdapter {
    /// Set the kernel parameters on purpose (each constant says why). The largest read follows
    /// from them: fuser asks for `max_pages` = max(max_write, max_readahead) / page size, which
    /// the kernel caps at 256 pages (1 MiB).
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_readahead(KERNEL_READAHEAD) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(CONGESTION_THRESHOLD);
        self.passthrough
            .init(self.fs.passthrough_possible(), config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = os_name(name) else {
            return reply.error(Errno::from_i32(FsError::non_utf8_name(false).errno));
        };
        let (fs, uid, gid, io) = (self.fs.clone(), self.uid, self.gid, self.io);
        self.spawn(async move {
            match fs.lookup(core_ino(parent), &name).await {
                Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr, uid, gid, io), Generation(0)),
                Err(e) => reply.error(reply_error(&format!("lookup {name:?}"), parent, &e)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(core_ino(ino), nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let (fs, uid, gid, io) = (self.fs.clone(), self.uid, self.gid, self.io);
        self.spawn(async move {
            match fs.getattr(core_ino(ino)).await {
                Ok(e) => reply.attr(&e.ttl, &file_attr(&e.attr, uid, gid, io)),
                Err(e) => reply.error(reply_error("getattr", ino, &e)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (fs, uid, gid, io) = (self.fs.clone(), self.uid, self.gid, self.io);
        self.spawn(async move {
            match fs.setattr(core_ino(ino), fh.map(core_fh), size).await {
                Ok(e) => reply.attr(&e.ttl, &file_attr(&e.attr, uid, gid, io)),
                Err(e) => reply.error(reply_error("setattr", ino, &e)),
            }
        });
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(erofs("mknod", parent));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.readlink(core_ino(ino)).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(reply_error("readlink", ino, &e)),
            }
        });
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let Some(name) = os_name(name) else {
            return reply.error(Errno::from_i32(FsError::non_utf8_name(true).errno));
        };
        let (fs, uid, gid, io) = (self.fs.clone(), self.uid, self.gid, self.io);
        self.spawn(async move {
            match fs.mkdir(core_ino(parent), &name).await {
                Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr, uid, gid, io), Generation(0)),
                Err(e) => reply.error(reply_error(&format!("mkdir {name:?}"), parent, &e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(name) = os_name(name) else {
            return reply.error(Errno::from_i32(FsError::non_utf8_name(false).errno));
        };
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.unlink(core_ino(parent), &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(reply_error(&format!("unlink {name:?}"), parent, &e)),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(name) = os_name(name) else {
            return reply.error(Errno::from_i32(FsError::non_utf8_name(false).errno));
        };
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.rmdir(core_ino(parent), &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(reply_error(&format!("rmdir {name:?}"), parent, &e)),
            }
        });
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(erofs("symlink", parent));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(erofs("rename", parent));
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(erofs("link", ino));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = wants_write(flags);
        let opener = write.then(|| tgid(req.pid()));
        let (fs, pt) = (self.fs.clone(), self.passthrough.clone());
        self.spawn(async move {
            match fs.open(core_ino(ino), write).await {
                Ok(o) => {
                    if let Some(p) = opener {
                        fs.set_opener(o.fh, p).await;
                    }
                    pt.reply(
                        reply,
                        kernel_fh(o.fh),
                        fopen_flags(&o),
                        o.backing.as_deref(),
                    )
                }
                Err(e) => reply.error(reply_error("open", ino, &e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let (fs, reads) = (self.fs.clone(), self.reads.clone());
        self.spawn(async move {
            let _permit = reads.acquire_owned().await;
            match fs.read(core_fh(fh), offset, size).await {
                Ok(data) => {
                    fs.note_served(core_ino(ino), data.len());
                    reply.data(&data);
                    fs.recycle(data);
                }
                Err(e) => reply.error(reply_error(
                    &format!("read off={offset} len={size}"),
                    ino,
                    &e,
                )),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let fs = self.fs.clone();
        let data = data.to_vec();
        self.spawn(async move {
            match fs.write(core_fh(fh), offset, &data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(reply_error(
                    &format!("write off={offset} len={}", data.len()),
                    ino,
                    &e,
                )),
            }
        });
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        // Only a writer's flush needs to know who closes (a /proc read): reads skip it.
        let closer = fs.is_writer(core_fh(fh)).then(|| tgid(req.pid()));
        self.spawn(async move {
            match fs.flush_by(core_fh(fh), closer).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(reply_error("flush", ino, &e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.passthrough.release(fh);
        self.spawn(async move {
            fs.release(core_fh(fh)).await;
            reply.ok();
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.fsync(core_fh(fh)).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(reply_error("fsync", ino, &e)),
            }
        });
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fh = self.next_dir_fh.fetch_add(1, Ordering::Relaxed);
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (fs, handles) = (self.fs.clone(), self.dir_handles.clone());
        self.spawn(async move {
            // The listing is taken once, at offset 0, and paged from that snapshot.
            let snapshot = if offset == 0 {
                match fs.readdir(core_ino(ino)).await {
                    Ok(list) => {
                        let list = Arc::new(list);
                        crate::sync::lock(&handles).insert(fh, list.clone());
                        list
                    }
                    Err(e) => return reply.error(reply_error("readdir", ino, &e)),
                }
            } else {
                match crate::sync::lock(&handles).get(&fh) {
                    Some(l) => l.clone(),
                    None => return reply.error(Errno::from_i32(FsError::bad_handle().errno)),
                }
            };
            for (ino, next, kind, name) in dir_page(ino, &snapshot, offset) {
                if reply.add(ino, next, kind, name) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        crate::sync::lock(&self.dir_handles).remove(&fh);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, BLOCK_SIZE, NAME_MAX, BLOCK_SIZE);
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(erofs("setxattr", ino));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(name) = os_name(name) else {
            return reply.error(Errno::from_i32(FsError::no_attr().errno));
        };
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.getxattr(core_ino(ino), &name).await {
                Ok(v) => xattr_reply(reply, size, &v),
                Err(e) => reply.error(reply_error(&format!("getxattr {name}"), ino, &e)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.listxattr(core_ino(ino)).await {
                Ok(names) => xattr_reply(reply, size, &xattr_list(&names)),
                Err(e) => reply.error(reply_error("listxattr", ino, &e)),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(erofs("removexattr", ino));
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) && !self.fs.writable(core_ino(ino)) {
            reply.error(erofs("access(W_OK)", ino));
        } else {
            reply.ok();
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(name) = os_name(name) else {
            return reply.error(Errno::from_i32(FsError::non_utf8_name(true).errno));
        };
        let (fs, uid, gid, io) = (self.fs.clone(), self.uid, self.gid, self.io);
        let opener = tgid(req.pid());
        self.spawn(async move {
            match fs.create(core_ino(parent), &name).await {
                Ok((e, o)) => {
                    fs.set_opener(o.fh, opener).await;
                    reply.created(
                        &e.ttl,
                        &file_attr(&e.attr, uid, gid, io),
                        Generation(0),
                        kernel_fh(o.fh),
                        FopenFlags::empty(),
                    )
                }
                Err(e) => reply.error(reply_error(&format!("create {name:?}"), parent, &e)),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn attr(kind: Kind, size: u64) -> Attr {
        Attr {
            ino: Ino(42),
            kind,
            size,
            perm: 0o644,
            nlink: 1,
            mtime: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            uid: None,
            gid: None,
            rdev: 0,
        }
    }

    #[test]
    fn numbers_cross_unchanged() {
        assert_eq!(core_ino(kernel_ino(Ino(7))), Ino(7));
        assert_eq!(core_fh(kernel_fh(Fh(u64::MAX))), Fh(u64::MAX));
        assert_eq!(kernel_ino(Ino(1)), INodeNo::ROOT);
    }

    #[test]
    fn attr_becomes_a_stat() {
        let a = attr(Kind::File, 1025);
        let f = file_attr(&a, 1000, 100, 1 << 20);
        assert_eq!(f.ino, INodeNo(42));
        assert_eq!(f.size, 1025);
        // 512-byte blocks, rounded up.
        assert_eq!(f.blocks, 3);
        assert_eq!(f.kind, FileType::RegularFile);
        assert_eq!((f.perm, f.nlink, f.rdev, f.flags), (0o644, 1, 0, 0));
        // No owner of its own: the mounting user's.
        assert_eq!((f.uid, f.gid), (1000, 100));
        // A file asks for the core's I/O size, anything else for a page.
        assert_eq!(f.blksize, 1 << 20);
        assert_eq!(
            file_attr(&attr(Kind::Dir, 0), 0, 0, 1 << 20).blksize,
            BLOCK_SIZE
        );
        for t in [f.atime, f.mtime, f.ctime, f.crtime] {
            assert_eq!(t, a.mtime);
        }
        assert_eq!(file_attr(&attr(Kind::File, 0), 0, 0, 4096).blocks, 0);
        assert_eq!(file_attr(&attr(Kind::File, 512), 0, 0, 4096).blocks, 1);

        // An owner from a tar header wins.
        let owned = Attr {
            uid: Some(0),
            gid: Some(5),
            rdev: 0x0103,
            ..attr(Kind::CharDevice, 0)
        };
        let f = file_attr(&owned, 1000, 100, 4096);
        assert_eq!((f.uid, f.gid, f.rdev), (0, 5, 0x0103));
        assert_eq!(f.kind, FileType::CharDevice);
    }

    #[test]
    fn every_kind_has_its_file_type() {
        for (k, t) in [
            (Kind::Dir, FileType::Directory),
            (Kind::File, FileType::RegularFile),
            (Kind::Symlink, FileType::Symlink),
            (Kind::CharDevice, FileType::CharDevice),
            (Kind::BlockDevice, FileType::BlockDevice),
            (Kind::Fifo, FileType::NamedPipe),
        ] {
            assert_eq!(file_type(k), t, "{k:?}");
        }
    }

    #[test]
    fn errors_reply_with_their_errno() {
        let ino = kernel_ino(Ino(3));
        assert_eq!(
            reply_error("lookup", ino, &FsError::not_found("x")).code(),
            libc::ENOENT
        );
        assert_eq!(
            reply_error("read", ino, &FsError::io("x")).code(),
            libc::EIO
        );
        assert_eq!(
            reply_error("write", ino, &FsError::invalid("x")).code(),
            libc::EINVAL
        );
        assert_eq!(erofs("mknod", ino).code(), libc::EROFS);
    }

    #[test]
    fn a_thread_id_resolves_to_its_process() {
        let me = std::process::id();
        assert_eq!(tgid(me), me);
        // A live thread of this process: its own id, this process as its thread group.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() as u32 }).unwrap();
            let _ = done_rx.recv();
        });
        let live = rx.recv().unwrap();
        assert_ne!(live, me);
        assert_eq!(tgid(live), me);
        done_tx.send(()).unwrap();
        h.join().unwrap();
        // No such process: the raw number.
        assert_eq!(tgid(u32::MAX - 1), u32::MAX - 1);
    }

    #[test]
    fn write_intent_of_open_flags() {
        let w = |f: i32| wants_write(OpenFlags(f));
        assert!(!w(libc::O_RDONLY));
        assert!(!w(libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC));
        assert!(w(libc::O_WRONLY));
        assert!(w(libc::O_RDWR));
        assert!(w(libc::O_RDONLY | libc::O_TRUNC));
        assert!(w(libc::O_RDONLY | libc::O_APPEND));
    }

    #[test]
    fn only_immutable_content_keeps_the_page_cache() {
        let o = |keep_cache| Opened {
            fh: Fh(1),
            keep_cache,
            direct_io: false,
            backing: None,
        };
        assert_eq!(fopen_flags(&o(true)), FopenFlags::FOPEN_KEEP_CACHE);
        assert_eq!(fopen_flags(&o(false)), FopenFlags::empty());
    }

    #[test]
    fn directory_pages_resume_at_the_kernels_offset() {
        let snapshot = vec![
            DirEntry {
                ino: Ino(10),
                name: "tags".into(),
                kind: Kind::Dir,
            },
            DirEntry {
                ino: Ino(11),
                name: "manifest.json".into(),
                kind: Kind::File,
            },
        ];
        let dir = kernel_ino(Ino(5));
        let all: Vec<_> = dir_page(dir, &snapshot, 0).collect();
        assert_eq!(
            all,
            vec![
                (dir, 1, FileType::Directory, "."),
                (dir, 2, FileType::Directory, ".."),
                (INodeNo(10), 3, FileType::Directory, "tags"),
                (INodeNo(11), 4, FileType::RegularFile, "manifest.json"),
            ]
        );
        // Each entry's offset resumes right after it.
        for (i, e) in all.iter().enumerate() {
            let rest: Vec<_> = dir_page(dir, &snapshot, e.1).collect();
            assert_eq!(rest, all[i + 1..]);
        }
        assert_eq!(dir_page(dir, &[], 0).count(), 2);
        assert_eq!(dir_page(dir, &snapshot, 99).count(), 0);
    }

    #[test]
    fn xattr_answers() {
        assert_eq!(xattr_answer(0, b"abc"), XattrAnswer::Size(3));
        assert_eq!(xattr_answer(3, b"abc"), XattrAnswer::Data(b"abc"));
        assert_eq!(xattr_answer(64, b"abc"), XattrAnswer::Data(b"abc"));
        assert_eq!(xattr_answer(2, b"abc"), XattrAnswer::TooSmall);
        assert_eq!(xattr_answer(0, b""), XattrAnswer::Size(0));
        assert_eq!(
            xattr_list(&["user.a".into(), "user.bc".into()]),
            b"user.a\0user.bc\0"
        );
        assert!(xattr_list(&[]).is_empty());
    }
}
