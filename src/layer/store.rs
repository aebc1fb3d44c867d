//! The `--cache-dir` index store: one `<hex>.index.json` per layer digest, so a remount does
//! not index its layers again. Written whole (temp file, then rename), so a crash never leaves
//! half an index; an unreadable or older-version file is ignored (and the layer re-indexed).

use std::path::{Path, PathBuf};

use super::index::LayerIndex;

/// Where the index of layer `digest` is kept in `dir`.
pub fn index_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join(format!("{}.index.json", crate::digest::digest_hex(digest)))
}

/// The stored index of layer `digest`, if `dir` holds a valid one of this version.
pub async fn load(dir: &Path, digest: &str) -> Option<LayerIndex> {
    let p = index_path(dir, digest);
    let bytes = tokio::fs::read(&p).await.ok()?;
    match LayerIndex::from_bytes(&bytes) {
        Some(idx) => {
            log::info!("loaded the index of layer {digest} from {}", p.display());
            Some(idx)
        }
        None => {
            log::warn!("ignoring unreadable index {}", p.display());
            None
        }
    }
}

/// Store the index of layer `digest` in `dir`. A failure is logged (warning), not returned:
/// the store is an optimisation.
pub async fn store(dir: &Path, digest: &str, idx: &LayerIndex) {
    let p = index_path(dir, digest);
    // Write a temp file and rename it, so a crash never leaves half an index.
    let tmp = p.with_extension(format!("tmp.{}", std::process::id()));
    let bytes = idx.to_bytes();
    let stored = async {
        tokio::fs::write(&tmp, &bytes).await?;
        tokio::fs::rename(&tmp, &p).await
    };
    if let Err(e) = stored.await {
        log::warn!("could not store the index in {}: {e}", p.display());
        let _ = tokio::fs::remove_file(&tmp).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{EntryKind, Format, TarEntry};

    const DIGEST: &str = "sha256:0123abcd";

    fn sample() -> LayerIndex {
        let mut idx = LayerIndex {
            format: Format::Zstd,
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
            index_path(Path::new("/c"), DIGEST),
            Path::new("/c/0123abcd.index.json")
        );
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
        assert_eq!(names, vec!["0123abcd.index.json"]);
    }

    #[tokio::test]
    async fn unreadable_index_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(index_path(dir.path(), DIGEST), b"{\"version\":1}").unwrap();
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
}
