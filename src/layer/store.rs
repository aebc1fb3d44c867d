//! The `--cache-dir` index store: one `<hex>.index.json` per layer digest, so a remount does
//! not index its layers again. Written whole (temp file, then rename), so a crash never leaves
//! half an index; an unreadable or older-version file is ignored (and the layer re-indexed).

use std::path::{Path, PathBuf};

use super::index::LayerIndex;

/// Where the index of layer `digest` is kept in `dir`: None unless the digest is a well-formed
/// `sha256:` + 64 lowercase hex (nothing else from a registry becomes part of a path).
pub fn index_path(dir: &Path, digest: &str) -> Option<PathBuf> {
    crate::digest::is_sha256_digest(digest)
        .then(|| dir.join(format!("{}.index.json", crate::digest::digest_hex(digest))))
}

/// Open `p` for reading without following a symlink at its last component.
fn read_nofollow(p: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)?;
    let mut out = Vec::new();
    // An index is a few MiB for the largest layers; a file past 256 MiB is not one.
    f.by_ref().take(256 << 20).read_to_end(&mut out)?;
    Ok(out)
}

/// The stored index of layer `digest`, if `dir` holds a valid one of this version that records
/// this very layer digest (the record binds the file to what was checked when it was built).
pub async fn load(dir: &Path, digest: &str) -> Option<LayerIndex> {
    let p = index_path(dir, digest)?;
    let bytes = {
        let p = p.clone();
        tokio::task::spawn_blocking(move || read_nofollow(&p))
            .await
            .ok()?
            .ok()?
    };
    match LayerIndex::from_bytes(&bytes) {
        Some(idx) if idx.layer == digest => {
            log::info!("loaded the index of layer {digest} from {}", p.display());
            Some(idx)
        }
        Some(idx) => {
            log::warn!(
                "ignoring index {}: it records layer {:?}, not {digest}",
                p.display(),
                idx.layer
            );
            None
        }
        None => {
            log::warn!("ignoring unreadable index {}", p.display());
            None
        }
    }
}

/// Write `bytes` to a new temp file beside `p` (created exclusively, so an existing file or
/// symlink there is never written through), then rename it over `p`.
fn write_new(p: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = p.with_extension(format!("tmp.{}.{n}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, p)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Store the index of layer `digest` in `dir`. A failure is logged (warning), not returned:
/// the store is an optimisation. Written whole (temp file, then rename), so a crash never
/// leaves half an index.
pub async fn store(dir: &Path, digest: &str, idx: &LayerIndex) {
    let Some(p) = index_path(dir, digest) else {
        log::warn!("not storing the index of {digest:?}: not a sha256 digest");
        return;
    };
    let bytes = idx.to_bytes();
    let target = p.clone();
    let stored = tokio::task::spawn_blocking(move || write_new(&target, &bytes)).await;
    match stored {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::warn!("could not store the index in {}: {e}", p.display()),
        Err(e) => log::warn!("could not store the index in {}: {e}", p.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{EntryKind, Format, TarEntry};

    const DIGEST: &str = "sha256:0123abcd0123abcd0123abcd0123abcd0123abcd0123abcd0123abcd0123abcd";
    const HEX: &str = "0123abcd0123abcd0123abcd0123abcd0123abcd0123abcd0123abcd0123abcd";

    fn sample() -> LayerIndex {
        let mut idx = LayerIndex {
            format: Format::Zstd,
            layer: DIGEST.to_string(),
            ..Default::default()
        };
        idx.add(TarEntry {
            path: "a/b".to_string(),
            kind: EntryKind::File,
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 1,
            link: None,
            dev: (0, 0),
            xattrs: vec![],
            offset: 512,
        });
        idx.finish();
        idx
    }

    #[test]
    fn path_is_the_digest_hex() {
        assert_eq!(
            index_path(Path::new("/c"), DIGEST).unwrap(),
            Path::new(&format!("/c/{HEX}.index.json"))
        );
        for bad in ["sha256:../../x", "sha256:0123", "md5:abcd", "", "sha256:ÄÄ"] {
            assert!(index_path(Path::new("/c"), bad).is_none(), "{bad}");
        }
    }

    #[tokio::test]
    async fn stores_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            load(dir.path(), DIGEST).await.is_none(),
            "nothing stored yet"
        );
        store(dir.path(), DIGEST, &sample()).await;
        let back = load(dir.path(), DIGEST).await.expect("stored");
        assert_eq!(back.format, Format::Zstd);
        assert_eq!(back.entries, sample().entries);
        // Only the index itself is left (the temp file was renamed).
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from(format!("{HEX}.index.json"))]
        );
    }

    #[tokio::test]
    async fn unreadable_index_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(index_path(dir.path(), DIGEST).unwrap(), b"{\"version\":1}").unwrap();
        assert!(load(dir.path(), DIGEST).await.is_none());
        // Storing again replaces it.
        store(dir.path(), DIGEST, &sample()).await;
        assert!(load(dir.path(), DIGEST).await.is_some());
    }

    #[tokio::test]
    async fn a_failed_store_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir");
        store(&missing, DIGEST, &sample()).await; // logs a warning
        assert!(!missing.exists());
        assert!(load(&missing, DIGEST).await.is_none());
    }

    #[tokio::test]
    async fn an_index_of_another_layer_is_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let mut other = sample();
        other.layer = format!("sha256:{}", "f".repeat(64));
        std::fs::write(index_path(dir.path(), DIGEST).unwrap(), other.to_bytes()).unwrap();
        assert!(load(dir.path(), DIGEST).await.is_none());
    }

    #[tokio::test]
    async fn symlinks_in_the_cache_dir_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        let original = sample().to_bytes();
        std::fs::write(&elsewhere, &original).unwrap();
        let p = index_path(dir.path(), DIGEST).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &p).unwrap();
        assert!(
            load(dir.path(), DIGEST).await.is_none(),
            "not read through a symlink"
        );
        // A symlink where the temp file would go is not written through either: the store
        // replaces the index's name, and the file it pointed to is untouched.
        store(dir.path(), DIGEST, &sample()).await;
        assert!(!std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&elsewhere).unwrap(), original);
        assert!(load(dir.path(), DIGEST).await.is_some());
    }
}
