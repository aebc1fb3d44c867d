//! The FUSE adapter: converts fuser's calls into [`Fs`] calls and results into replies.
//!
//! Every operation that may touch the network runs in a tokio task that owns the reply, so a slow
//! read never blocks `ls` or another file, and the FUSE worker threads never wait on the network.
//! Errors are replied (and logged) in exactly one place: [`reply_error`].

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
use crate::fs::{Attr, DirEntry, Fs, Kind};

/// Data reads in flight at once; more wait for a permit (the kernel queues behind them).
const MAX_CONCURRENT_READS: usize = 64;

/// The fuser `Filesystem` over the core.
pub struct FuseAdapter {
    fs: Arc<Fs>,
    rt: Handle,
    uid: u32,
    gid: u32,
    reads: Arc<Semaphore>,
    dir_handles: Arc<Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>>,
    next_dir_fh: AtomicU64,
}

impl FuseAdapter {
    pub fn new(fs: Arc<Fs>, rt: Handle) -> Self {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FuseAdapter {
            fs,
            rt,
            uid,
            gid,
            reads: Arc::new(Semaphore::new(MAX_CONCURRENT_READS)),
            dir_handles: Arc::new(Mutex::new(HashMap::new())),
            next_dir_fh: AtomicU64::new(1),
        }
    }

    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F) {
        self.rt.spawn(f);
    }
}

/// Log an error at its own level, with the operation and inode, and return its errno.
fn reply_error(op: &str, ino: u64, e: &FsError) -> Errno {
    log::log!(e.level, "{op} ino={ino}: {}", e.message);
    Errno::from_i32(e.errno)
}

fn erofs(op: &str, ino: u64) -> Errno {
    reply_error(
        op,
        ino,
        &FsError::read_only(format!("{op}: read-only file system")),
    )
}

fn file_attr(a: &Attr, uid: u32, gid: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
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
        blksize: 4096,
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

fn os_name(name: &OsStr) -> Option<String> {
    name.to_str().map(str::to_string)
}

impl Filesystem for FuseAdapter {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = os_name(name) else {
            return reply.error(Errno::ENOENT);
        };
        let (fs, uid, gid) = (self.fs.clone(), self.uid, self.gid);
        self.spawn(async move {
            match fs.lookup(parent.0, &name).await {
                Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr, uid, gid), Generation(0)),
                Err(e) => reply.error(reply_error(&format!("lookup {name:?}"), parent.0, &e)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let (fs, uid, gid) = (self.fs.clone(), self.uid, self.gid);
        self.spawn(async move {
            match fs.getattr(ino.0).await {
                Ok(e) => reply.attr(&e.ttl, &file_attr(&e.attr, uid, gid)),
                Err(e) => reply.error(reply_error("getattr", ino.0, &e)),
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
        let (fs, uid, gid) = (self.fs.clone(), self.uid, self.gid);
        self.spawn(async move {
            match fs.setattr(ino.0, fh.map(|f| f.0), size).await {
                Ok(e) => reply.attr(&e.ttl, &file_attr(&e.attr, uid, gid)),
                Err(e) => reply.error(reply_error("setattr", ino.0, &e)),
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
        reply.error(erofs("mknod", parent.0));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.readlink(ino.0).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(reply_error("readlink", ino.0, &e)),
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
            return reply.error(Errno::EINVAL);
        };
        let (fs, uid, gid) = (self.fs.clone(), self.uid, self.gid);
        self.spawn(async move {
            match fs.mkdir(parent.0, &name).await {
                Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr, uid, gid), Generation(0)),
                Err(e) => reply.error(reply_error(&format!("mkdir {name:?}"), parent.0, &e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(name) = os_name(name) else {
            return reply.error(Errno::ENOENT);
        };
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.unlink(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(reply_error(&format!("unlink {name:?}"), parent.0, &e)),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(name) = os_name(name) else {
            return reply.error(Errno::ENOENT);
        };
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.rmdir(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(reply_error(&format!("rmdir {name:?}"), parent.0, &e)),
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
        reply.error(erofs("symlink", parent.0));
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
        reply.error(erofs("rename", parent.0));
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(erofs("link", ino.0));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY)
            || flags.0 & (libc::O_TRUNC | libc::O_APPEND) != 0;
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.open(ino.0, write).await {
                Ok(o) => {
                    let f = if o.keep_cache {
                        FopenFlags::FOPEN_KEEP_CACHE
                    } else {
                        FopenFlags::empty()
                    };
                    reply.opened(FileHandle(o.fh), f)
                }
                Err(e) => reply.error(reply_error("open", ino.0, &e)),
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
            match fs.read(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(reply_error(
                    &format!("read off={offset} len={size}"),
                    ino.0,
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
            match fs.write(fh.0, offset, &data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(reply_error(
                    &format!("write off={offset} len={}", data.len()),
                    ino.0,
                    &e,
                )),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.flush(fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(reply_error("flush", ino.0, &e)),
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
        self.spawn(async move {
            fs.release(fh.0).await;
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
            match fs.fsync(fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(reply_error("fsync", ino.0, &e)),
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
                match fs.readdir(ino.0).await {
                    Ok(list) => {
                        let list = Arc::new(list);
                        handles.lock().unwrap().insert(fh.0, list.clone());
                        list
                    }
                    Err(e) => return reply.error(reply_error("readdir", ino.0, &e)),
                }
            } else {
                match handles.lock().unwrap().get(&fh.0) {
                    Some(l) => l.clone(),
                    None => return reply.error(Errno::EBADF),
                }
            };
            let dots = [
                (ino.0, ".", FileType::Directory),
                (ino.0, "..", FileType::Directory),
            ];
            let all = dots
                .iter()
                .map(|&(i, n, k)| (i, n, k))
                .chain(snapshot.iter().map(|e| {
                    let k = file_type(e.kind);
                    (e.ino, e.name.as_str(), k)
                }));
            for (i, (ino, name, kind)) in all.enumerate().skip(offset as usize) {
                if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
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
        self.dir_handles.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
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
        reply.error(erofs("setxattr", ino.0));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(name) = os_name(name) else {
            return reply.error(Errno::from_i32(libc::ENODATA));
        };
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.getxattr(ino.0, &name).await {
                Ok(v) => xattr_reply(reply, size, &v),
                Err(e) => reply.error(reply_error(&format!("getxattr {name}"), ino.0, &e)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.listxattr(ino.0).await {
                Ok(names) => {
                    let mut buf = Vec::new();
                    for n in names {
                        buf.extend_from_slice(n.as_bytes());
                        buf.push(0);
                    }
                    xattr_reply(reply, size, &buf)
                }
                Err(e) => reply.error(reply_error("listxattr", ino.0, &e)),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(erofs("removexattr", ino.0));
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) && !self.fs.writable(ino.0) {
            reply.error(erofs("access(W_OK)", ino.0));
        } else {
            reply.ok();
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(name) = os_name(name) else {
            return reply.error(Errno::EINVAL);
        };
        let (fs, uid, gid) = (self.fs.clone(), self.uid, self.gid);
        self.spawn(async move {
            match fs.create(parent.0, &name).await {
                Ok((e, o)) => reply.created(
                    &e.ttl,
                    &file_attr(&e.attr, uid, gid),
                    Generation(0),
                    FileHandle(o.fh),
                    FopenFlags::empty(),
                ),
                Err(e) => reply.error(reply_error(&format!("create {name:?}"), parent.0, &e)),
            }
        });
    }
}

/// Answer an xattr request: the size when asked for it, the value when it fits, ERANGE otherwise.
fn xattr_reply(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() <= size as usize {
        reply.data(value);
    } else {
        reply.error(Errno::from_i32(libc::ERANGE));
    }
}
