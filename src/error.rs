//! Errors, and the one place where they become errnos.
//!
//! The registry layer returns [`RegistryError`]; the filesystem core returns [`FsError`], which carries
//! the errno the kernel will see, a message for the log, and the level that message is logged at.
//! Every registry error is converted here and nowhere else.

use std::fmt;

/// What went wrong while talking to the registry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// 404 or an equivalent "unknown" error code.
    #[error("not found: {0}")]
    NotFound(String),
    /// 401 that survived the auth flow.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// 403 / DENIED.
    #[error("denied: {0}")]
    Denied(String),
    /// 429 / TOOMANYREQUESTS.
    #[error("rate limited: {0}")]
    TooManyRequests(String),
    /// 5xx, or an unexpected status.
    #[error("registry error (HTTP {status}): {message}")]
    Server { status: u16, message: String },
    /// Connection refused, reset, timed out, TLS failure...
    #[error("transport error: {0}")]
    Transport(String),
    /// Content did not hash to the digest it was asked by.
    #[error("digest mismatch for {expected}: got {actual}")]
    DigestMismatch { expected: String, actual: String },
    /// The registry answered, but not in a way the protocol allows (refused Range, truncated body...).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A manifest or other document that does not parse.
    #[error("malformed {0}")]
    Malformed(String),
    /// A media type, digest algorithm or feature regfs does not handle.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The caller asked for something invalid (bad name, bad digest).
    #[error("invalid: {0}")]
    Invalid(String),
}

pub type RegistryResult<T> = Result<T, RegistryError>;

/// What kind of failure a filesystem operation had. [`FsErrorKind::errno`] is the one table from
/// kinds to errnos; code elsewhere branches on kinds, never on errno values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsErrorKind {
    /// No such name (ENOENT).
    NotFound,
    /// The name exists already (EEXIST).
    Exists,
    /// In use: being written, or shared with something the user did not name (EBUSY).
    Busy,
    /// Writing where the tree is read-only (EROFS).
    ReadOnly,
    /// The registry refuses the operation itself, e.g. a delete answered 405 (EPERM).
    NotPermitted,
    /// Unauthorized or denied by the registry (EACCES).
    AccessDenied,
    /// Rate limited: try again later (EAGAIN).
    Again,
    /// Transport, server, protocol or verification failure (EIO).
    Io,
    /// A request that cannot be honoured as asked: bad name, out-of-order write (EINVAL).
    Invalid,
    /// Beyond a size regfs can handle (EFBIG).
    TooBig,
    /// A directory operation on a file (ENOTDIR).
    NotDir,
    /// A file operation on a directory (EISDIR).
    IsDir,
    /// No such extended attribute (ENODATA).
    NoAttr,
    /// An unknown file handle (EBADF).
    BadHandle,
    /// The caller's buffer is too small for the answer (ERANGE).
    TooSmall,
    /// An inode the core no longer knows (ESTALE).
    Stale,
}

impl FsErrorKind {
    /// The errno the kernel sees for this kind.
    pub fn errno(self) -> i32 {
        match self {
            FsErrorKind::NotFound => libc::ENOENT,
            FsErrorKind::Exists => libc::EEXIST,
            FsErrorKind::Busy => libc::EBUSY,
            FsErrorKind::ReadOnly => libc::EROFS,
            FsErrorKind::NotPermitted => libc::EPERM,
            FsErrorKind::AccessDenied => libc::EACCES,
            FsErrorKind::Again => libc::EAGAIN,
            FsErrorKind::Io => libc::EIO,
            FsErrorKind::Invalid => libc::EINVAL,
            FsErrorKind::TooBig => libc::EFBIG,
            FsErrorKind::NotDir => libc::ENOTDIR,
            FsErrorKind::IsDir => libc::EISDIR,
            FsErrorKind::NoAttr => libc::ENODATA,
            FsErrorKind::BadHandle => libc::EBADF,
            FsErrorKind::TooSmall => libc::ERANGE,
            FsErrorKind::Stale => libc::ESTALE,
        }
    }
}

/// An error as the filesystem reports it: a kind (and so an errno) plus a log line.
#[derive(Debug, Clone)]
pub struct FsError {
    pub kind: FsErrorKind,
    /// `kind.errno()`, kept for the adapter and for tests.
    pub errno: i32,
    pub message: String,
    pub level: log::Level,
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub fn new(kind: FsErrorKind, level: log::Level, message: impl Into<String>) -> Self {
        FsError {
            kind,
            errno: kind.errno(),
            message: message.into(),
            level,
        }
    }
    /// A name that does not exist: an ordinary lookup miss, logged at debug.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(FsErrorKind::NotFound, log::Level::Debug, message)
    }
    /// The name exists already (mkdir of a known repository or tag).
    pub fn exists(message: impl Into<String>) -> Self {
        Self::new(FsErrorKind::Exists, log::Level::Debug, message)
    }
    /// Busy, logged at `level` (debug for "still being written", warn for a refused delete).
    pub fn busy(level: log::Level, message: impl Into<String>) -> Self {
        Self::new(FsErrorKind::Busy, level, message)
    }
    /// Writing where the tree is read-only.
    pub fn read_only(message: impl Into<String>) -> Self {
        Self::new(FsErrorKind::ReadOnly, log::Level::Debug, message)
    }
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(FsErrorKind::Io, log::Level::Error, message)
    }
    /// An I/O error that is the input's fault, not regfs's or the network's (logged at warn).
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::new(FsErrorKind::Io, log::Level::Warn, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(FsErrorKind::Invalid, log::Level::Warn, message)
    }
    pub fn too_big(message: impl Into<String>) -> Self {
        Self::new(FsErrorKind::TooBig, log::Level::Warn, message)
    }
    pub fn not_dir(message: impl Into<String>) -> Self {
        Self::new(FsErrorKind::NotDir, log::Level::Debug, message)
    }
    pub fn is_dir(message: impl Into<String>) -> Self {
        Self::new(FsErrorKind::IsDir, log::Level::Debug, message)
    }
    pub fn no_attr() -> Self {
        Self::new(FsErrorKind::NoAttr, log::Level::Trace, "no such xattr")
    }
    pub fn bad_handle() -> Self {
        Self::new(
            FsErrorKind::BadHandle,
            log::Level::Warn,
            "unknown file handle",
        )
    }
    /// The buffer the caller gave is too small (xattr values and lists).
    pub fn too_small() -> Self {
        Self::new(FsErrorKind::TooSmall, log::Level::Trace, "buffer too small")
    }
    /// A name that is not UTF-8 cannot be in the tree: a lookup miss, an invalid name to create.
    pub fn non_utf8_name(creating: bool) -> Self {
        if creating {
            Self::invalid("names in regfs are UTF-8")
        } else {
            Self::not_found("names in regfs are UTF-8")
        }
    }
    pub fn stale(message: impl Into<String>) -> Self {
        Self::new(FsErrorKind::Stale, log::Level::Warn, message)
    }
    pub fn is_not_found(&self) -> bool {
        self.kind == FsErrorKind::NotFound
    }
    /// Prefix the message with context (the path or operation).
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }
    /// The same failure reported as EIO (a push whose cause was anything else fails with EIO at
    /// close).
    pub fn into_io(self) -> Self {
        if self.kind == FsErrorKind::Io {
            self
        } else {
            FsError::io(self.message)
        }
    }
    /// A registry error with context: `ctx: error`.
    pub fn registry(e: RegistryError, ctx: impl fmt::Display) -> Self {
        FsError::from(e).context(ctx)
    }
    /// A delete the registry refused (405) is EPERM with its message; anything else as usual.
    pub fn from_delete(e: RegistryError, what: impl fmt::Display) -> Self {
        match e {
            RegistryError::Unsupported(m) => {
                FsError::new(FsErrorKind::NotPermitted, log::Level::Warn, m)
            }
            e => FsError::registry(e, what),
        }
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (errno {})", self.message, self.errno)
    }
}

impl From<RegistryError> for FsError {
    fn from(e: RegistryError) -> Self {
        use log::Level::*;
        use FsErrorKind as K;
        let (kind, level) = match &e {
            RegistryError::NotFound(_) => (K::NotFound, Debug),
            RegistryError::Unauthorized(_) | RegistryError::Denied(_) => (K::AccessDenied, Warn),
            RegistryError::TooManyRequests(_) => (K::Again, Warn),
            RegistryError::Server { .. }
            | RegistryError::Transport(_)
            | RegistryError::DigestMismatch { .. }
            | RegistryError::Protocol(_)
            | RegistryError::Malformed(_) => (K::Io, Error),
            RegistryError::Unsupported(_) => (K::Io, Warn),
            RegistryError::Invalid(_) => (K::Invalid, Debug),
        };
        FsError::new(kind, level, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_errors_map_to_errnos() {
        let cases = [
            (RegistryError::NotFound("x".into()), libc::ENOENT),
            (RegistryError::Unauthorized("x".into()), libc::EACCES),
            (RegistryError::Denied("x".into()), libc::EACCES),
            (RegistryError::TooManyRequests("x".into()), libc::EAGAIN),
            (
                RegistryError::Server {
                    status: 500,
                    message: "x".into(),
                },
                libc::EIO,
            ),
            (RegistryError::Transport("x".into()), libc::EIO),
            (
                RegistryError::DigestMismatch {
                    expected: "a".into(),
                    actual: "b".into(),
                },
                libc::EIO,
            ),
            (RegistryError::Protocol("x".into()), libc::EIO),
            (RegistryError::Malformed("x".into()), libc::EIO),
            (RegistryError::Invalid("x".into()), libc::EINVAL),
        ];
        for (e, errno) in cases {
            assert_eq!(FsError::from(e.clone()).errno, errno, "{e}");
        }
    }
}

// ---- Push errors (src/push.rs) -------------------------------------------------------------------

/// What went wrong while pushing by writing (a blob upload or a manifest being written).
#[derive(Debug, Clone, thiserror::Error)]
pub enum PushError {
    /// A write that does not start where the previous one ended.
    #[error("writes must be sequential: write at {offset}, expected {expected}")]
    OutOfOrder { offset: u64, expected: u64 },
    /// The registry failed a request of the upload (POST, PATCH or PUT).
    #[error("push to {repo}: {source}")]
    Registry { repo: String, source: RegistryError },
    /// The task sending a chunk did not come back (it panicked or was cancelled).
    #[error("push to {repo}: upload task failed: {message}")]
    Task { repo: String, message: String },
    /// The bytes written do not hash to the digest the file is named by.
    #[error("push to {repo}: the content written hashes to {actual}, not to its name {expected}")]
    DigestMismatch {
        repo: String,
        expected: String,
        actual: String,
    },
    /// A manifest above [`crate::push::MAX_MANIFEST`].
    #[error("a manifest is at most 4 MiB")]
    ManifestTooLarge,
    /// A manifest body that is not JSON.
    #[error("manifest is not JSON: {0}")]
    NotJson(String),
}

pub type PushResult<T> = Result<T, PushError>;

impl From<PushError> for FsError {
    fn from(e: PushError) -> Self {
        use log::Level::*;
        use FsErrorKind as K;
        let (kind, level) = match &e {
            PushError::OutOfOrder { .. } | PushError::NotJson(_) => (K::Invalid, Warn),
            // Whatever the cause, a failed push is an I/O error for the writer (close returns EIO).
            PushError::Registry { .. }
            | PushError::Task { .. }
            | PushError::DigestMismatch { .. } => (K::Io, Error),
            PushError::ManifestTooLarge => (K::TooBig, Warn),
        };
        FsError::new(kind, level, e.to_string())
    }
}

/// Whether the FUSE session ended with the kernel's "connection aborted": what a FUSE thread
/// may read instead of ENODEV when the kernel tears a detached mount down.
pub fn is_connection_aborted(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ECONNABORTED)
}

#[cfg(test)]
mod push_error_tests {
    use super::*;

    #[test]
    fn push_errors_map_to_errnos() {
        let cases = [
            (
                PushError::OutOfOrder {
                    offset: 3,
                    expected: 0,
                },
                libc::EINVAL,
            ),
            (PushError::NotJson("x".into()), libc::EINVAL),
            (
                PushError::Registry {
                    repo: "r".into(),
                    source: RegistryError::Unauthorized("x".into()),
                },
                libc::EIO,
            ),
            (
                PushError::Task {
                    repo: "r".into(),
                    message: "x".into(),
                },
                libc::EIO,
            ),
            (
                PushError::DigestMismatch {
                    repo: "r".into(),
                    expected: "a".into(),
                    actual: "b".into(),
                },
                libc::EIO,
            ),
            (PushError::ManifestTooLarge, libc::EFBIG),
        ];
        for (e, errno) in cases {
            assert_eq!(FsError::from(e.clone()).errno, errno, "{e}");
        }
    }
}
// ---- end of push errors --------------------------------------------------------------------------
