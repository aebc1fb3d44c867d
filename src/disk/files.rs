//! File primitives of the disk cache: atomic writes (a new temp file beside the target, created
//! exclusively and without following symlinks, then renamed over it) and bounded reads that never
//! follow a symlink at the last component.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix of temp files; anything named so is left over from a crash and removed at open.
pub const TMP_PREFIX: &str = ".tmp.";

/// A fresh temp file name in `dir`.
pub fn temp_in(dir: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{TMP_PREFIX}{}.{n}", std::process::id()))
}

/// Create `p` exclusively (never through an existing file or symlink).
pub fn create_new(p: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
}

/// Write `parts` to a temp file beside `p`, optionally fsync it, and rename it over `p`.
pub fn write_atomic(p: &Path, parts: &[&[u8]], sync: bool) -> std::io::Result<()> {
    let dir = p.parent().unwrap_or(Path::new("."));
    let tmp = temp_in(dir);
    let res = (|| {
        let mut f = create_new(&tmp)?;
        for part in parts {
            f.write_all(part)?;
        }
        if sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, p)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Open `p` for reading without following a symlink.
pub fn open_nofollow(p: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
}

/// Read at most `cap` bytes of `p` (a longer file reads as `cap + 1` bytes, so callers can tell).
pub fn read_capped(p: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    let f = open_nofollow(p)?;
    let mut out = Vec::new();
    f.take(cap.saturating_add(1)).read_to_end(&mut out)?;
    Ok(out)
}

/// Remove `p`, ignoring "not there".
pub fn remove(p: &Path) {
    if let Err(e) = std::fs::remove_file(p) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("disk cache: removing {}: {e}", p.display());
        }
    }
}
