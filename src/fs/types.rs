//! What the FUSE adapter sees of the core: inode and handle numbers, attributes, entries, and
//! the result of `open`. Plain data; nothing here knows about fuser.

use std::fmt;
use std::time::{Duration, SystemTime};

/// An inode number. Numbers come from a counter and are never reused within a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ino(pub u64);

/// The root directory's inode.
pub const ROOT_INO: Ino = Ino(1);

/// An open file handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fh(pub u64);

impl fmt::Display for Ino {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ino {}", self.0)
    }
}

impl fmt::Display for Fh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fh {}", self.0)
    }
}

/// File or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

/// Attributes the adapter turns into a stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub mtime: SystemTime,
    /// Owner from a tar header; None = the mounting user.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub rdev: u32,
}

/// A looked-up entry: attributes plus how long the kernel may cache them.
#[derive(Debug, Clone, Copy)]
pub struct EntryOut {
    pub attr: Attr,
    pub ttl: Duration,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: Ino,
    pub name: String,
    pub kind: Kind,
}

/// What `open` tells the adapter.
#[derive(Debug, Clone)]
pub struct Opened {
    pub fh: Fh,
    /// The content never changes: the kernel may keep its page cache across opens.
    pub keep_cache: bool,
    /// Content made at open whose size may differ from what getattr said (`.regfs/` files):
    /// the kernel reads to the end of what the handle holds, bypassing its page cache.
    pub direct_io: bool,
    /// A verified copy of the whole content on local disk: the kernel may read it directly
    /// (FUSE passthrough) instead of asking the daemon.
    pub backing: Option<std::sync::Arc<std::fs::File>>,
}
