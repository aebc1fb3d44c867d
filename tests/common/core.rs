//! The core tier's path walk: from the root of an [`Fs`] through `lookup`, component by
//! component, as the kernel does.

use regfs::fs::{Fs, Ino, ROOT_INO};

/// The inode at `path` (components separated by `/`), or the errno of the first lookup that
/// fails.
pub async fn walk(fs: &Fs, path: &str) -> Result<Ino, i32> {
    let mut ino = ROOT_INO;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        ino = fs.lookup(ino, part).await.map_err(|e| e.errno)?.attr.ino;
    }
    Ok(ino)
}

/// [`walk`] to a path that must exist.
pub async fn walk_ok(fs: &Fs, path: &str) -> Ino {
    walk(fs, path)
        .await
        .unwrap_or_else(|e| panic!("{path}: errno {e}"))
}
