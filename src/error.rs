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

/// An error as the filesystem reports it: an errno plus a log line.
#[derive(Debug, Clone)]
pub struct FsError {
    pub errno: i32,
    pub message: String,
    pub level: log::Level,
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub fn new(errno: i32, level: log::Level, message: impl Into<String>) -> Self {
        FsError {
            errno,
            message: message.into(),
            level,
        }
    }
    /// A name that does not exist: an ordinary lookup miss, logged at debug.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(libc::ENOENT, log::Level::Debug, message)
    }
    /// Writing where the tree is read-only.
    pub fn read_only(message: impl Into<String>) -> Self {
        Self::new(libc::EROFS, log::Level::Debug, message)
    }
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(libc::EIO, log::Level::Error, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(libc::EINVAL, log::Level::Warn, message)
    }
    pub fn not_dir(message: impl Into<String>) -> Self {
        Self::new(libc::ENOTDIR, log::Level::Debug, message)
    }
    pub fn is_dir(message: impl Into<String>) -> Self {
        Self::new(libc::EISDIR, log::Level::Debug, message)
    }
    pub fn no_attr() -> Self {
        Self::new(libc::ENODATA, log::Level::Trace, "no such xattr")
    }
    pub fn bad_handle() -> Self {
        Self::new(libc::EBADF, log::Level::Warn, "unknown file handle")
    }
    /// Prefix the message with context (the path or operation).
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
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
        let (errno, level) = match &e {
            RegistryError::NotFound(_) => (libc::ENOENT, Debug),
            RegistryError::Unauthorized(_) | RegistryError::Denied(_) => (libc::EACCES, Warn),
            RegistryError::TooManyRequests(_) => (libc::EAGAIN, Warn),
            RegistryError::Server { .. }
            | RegistryError::Transport(_)
            | RegistryError::DigestMismatch { .. }
            | RegistryError::Protocol(_)
            | RegistryError::Malformed(_) => (libc::EIO, Error),
            RegistryError::Unsupported(_) => (libc::EIO, Warn),
            RegistryError::Invalid(_) => (libc::EINVAL, Debug),
        };
        FsError::new(errno, level, e.to_string())
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
        let (errno, level) = match &e {
            PushError::OutOfOrder { .. } | PushError::NotJson(_) => (libc::EINVAL, Warn),
            // Whatever the cause, a failed push is an I/O error for the writer (close returns EIO).
            PushError::Registry { .. }
            | PushError::Task { .. }
            | PushError::DigestMismatch { .. } => (libc::EIO, Error),
            PushError::ManifestTooLarge => (libc::EFBIG, Warn),
        };
        FsError::new(errno, level, e.to_string())
    }
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
