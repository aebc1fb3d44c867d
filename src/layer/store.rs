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
