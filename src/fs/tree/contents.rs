//! Image contents in the tree: `tags/<tag>/rootfs/` (the merged filesystem) and
//! `layers/NN-<hex12>/` (one layer's tar as it is, whiteout markers included), as nodes made
//! from the layer indexes that [`crate::layer::Layers`] builds.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::digest::Digest;
use crate::error::{FsError, FsResult};
use crate::fs::node::{EntryMeta, Node, TreeDir, TreeEntry, View};
use crate::fs::types::{Attr, Ino, Kind};
use crate::fs::Fs;
use crate::layer::{EntryKind, LayerIndex, TarEntry};
use crate::layer::{LayerRef, MergedView};
use crate::manifest::{self, Parsed};

fn meta(e: &TarEntry) -> EntryMeta {
    EntryMeta {
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime: e.mtime,
    }
}

/// A tar mtime as a time. Tar headers carry any 64-bit value: GNU tar writes a pre-1970 time
/// in base-256 as a negative number, which the header parser hands over in two's complement.
/// Read as signed seconds; a time the system cannot hold becomes the epoch. Never panics.
pub(crate) fn time(secs: u64) -> SystemTime {
    let signed = secs as i64;
    let t = if signed >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(signed.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(signed.unsigned_abs()))
    };
    t.unwrap_or(UNIX_EPOCH)
}

/// Attributes of tree nodes (None for other nodes).
pub(crate) fn tree_attr(ino: Ino, node: &Node) -> Option<Attr> {
    match node {
        Node::TreeDir(d) => {
            let m = d.meta.unwrap_or(EntryMeta {
                mode: 0o555,
                uid: 0,
                gid: 0,
                mtime: 0,
            });
            Some(Attr {
                ino,
                kind: Kind::Dir,
                size: 0,
                perm: (m.mode & 0o7777) as u16,
                nlink: 2,
                mtime: time(m.mtime),
                uid: d.meta.map(|m| m.uid as u32),
                gid: d.meta.map(|m| m.gid as u32),
                rdev: 0,
            })
        }
        Node::TreeEntry(t) => {
            let e = &t.entry;
            let size = match e.kind {
                EntryKind::File | EntryKind::Hardlink | EntryKind::Dir => e.size,
                EntryKind::Symlink => e.link.as_ref().map_or(0, |l| l.len() as u64),
                EntryKind::Char | EntryKind::Block | EntryKind::Fifo => 0,
            };
            Some(Attr {
                ino,
                kind: node.kind(),
                size,
                perm: (e.mode & 0o7777) as u16,
                nlink: t.nlink.max(1),
                mtime: time(e.mtime),
                uid: Some(e.uid as u32),
                gid: Some(e.gid as u32),
                rdev: (e.dev.0 << 8) | (e.dev.1 & 0xff) | ((e.dev.1 & !0xff) << 12),
            })
        }
        _ => None,
    }
}

/// The path of `name` in the tree directory at `dir` ("" = the tree's root).
fn child_path(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn tree_node(
    repo: &str,
    view: &View,
    layer: &LayerRef,
    idx: &LayerIndex,
    ei: usize,
    path: String,
) -> Node {
    let ri = idx.resolve(ei);
    let e = &idx.entries[ri];
    if e.kind == EntryKind::Dir && ri == ei {
        return Node::TreeDir(TreeDir {
            repo: repo.to_string(),
            view: view.clone(),
            path,
            meta: Some(meta(e)),
        });
    }
    let view_id = match view {
        View::Rootfs { image } => image.clone(),
        View::Layer(l) => l.digest.clone(),
    };
    Node::TreeEntry(TreeEntry {
        repo: repo.to_string(),
        layer: layer.clone(),
        view_id,
        index: ri,
        entry: e.clone(),
        nlink: idx.nlink.get(&ri).copied().unwrap_or(1),
    })
}

impl Fs {
    /// The merged tree of the image manifest `image`.
    async fn merged_view(&self, repo: &str, image: &Digest) -> FsResult<Arc<MergedView>> {
        if let Some(mv) = self.layers.merged_ready(image) {
            return Ok(mv);
        }
        let refs = self.image_layers(repo, image).await?;
        self.layers.merged(repo, image, refs).await
    }

    /// The layers of the image manifest `image`, bottom first.
    async fn image_layers(&self, repo: &str, image: &Digest) -> FsResult<Vec<LayerRef>> {
        let m = self.meta.manifest(repo, image).await?;
        let Parsed::Image { config, layers } = &m.parsed else {
            return Err(FsError::io(format!("{image} is not an image manifest")));
        };
        let mut refs = Vec::new();
        for (pos, l) in layers.iter().enumerate() {
            if manifest::layer_extension(&l.media_type) == "blob" {
                return Err(FsError::bad_input(format!(
                    "rootfs of {repo}@{image}: layer {} has unsupported media type {}",
                    l.digest, l.media_type
                )));
            }
            refs.push(LayerRef::new(l, Some(config), pos));
        }
        Ok(refs)
    }

    /// One name in a tree directory: a map lookup, never the whole listing. Under `rootfs/`
    /// the name is answered early when the rule of progressive indexing allows (see
    /// docs/SEMANTICS.md); its absence waits for the merged tree.
    pub(super) async fn find_in_tree(&self, d: &TreeDir, name: &str) -> FsResult<Option<Node>> {
        let path = child_path(&d.path, name);
        match &d.view {
            View::Layer(l) => {
                let make =
                    |idx: &LayerIndex, ei| tree_node(&d.repo, &d.view, l, idx, ei, path.clone());
                self.layers.find_in_layer(&d.repo, l, &path, make).await
            }
            View::Rootfs { image } => {
                let mv = match self.layers.merged_ready(image) {
                    Some(mv) => mv,
                    None => {
                        let refs = self.image_layers(&d.repo, image).await?;
                        let make = |li: usize, idx: &LayerIndex, ei| {
                            tree_node(&d.repo, &d.view, &refs[li], idx, ei, path.clone())
                        };
                        if let Some(n) = self.layers.find_early(&d.repo, &refs, &path, make).await {
                            return Ok(Some(n));
                        }
                        self.layers.merged(&d.repo, image, refs).await?
                    }
                };
                Ok(mv
                    .merged
                    .dirs
                    .get(&d.path)
                    .and_then(|children| children.get(name))
                    .map(|&(li, ei)| {
                        tree_node(&d.repo, &d.view, &mv.layers[li], &mv.indexes[li], ei, path)
                    }))
            }
        }
    }

    pub(super) async fn tree_children(&self, d: &TreeDir) -> FsResult<Vec<(String, Node)>> {
        let child_path = |name: &str| child_path(&d.path, name);
        let mut out = Vec::new();
        match &d.view {
            View::Layer(l) => {
                let idx = self.layers.index(&d.repo, l).await?;
                if let Some(children) = idx.dirs.get(&d.path) {
                    for (name, &ei) in children {
                        out.push((
                            name.clone(),
                            tree_node(&d.repo, &d.view, l, &idx, ei, child_path(name)),
                        ));
                    }
                }
            }
            View::Rootfs { image } => {
                let mv = self.merged_view(&d.repo, image).await?;
                if let Some(children) = mv.merged.dirs.get(&d.path) {
                    for (name, &(li, ei)) in children {
                        out.push((
                            name.clone(),
                            tree_node(
                                &d.repo,
                                &d.view,
                                &mv.layers[li],
                                &mv.indexes[li],
                                ei,
                                child_path(name),
                            ),
                        ));
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_tar_mtime_is_a_time() {
        assert_eq!(time(0), UNIX_EPOCH);
        assert_eq!(
            time(4_102_444_800),
            UNIX_EPOCH + Duration::from_secs(4_102_444_800)
        );
        // GNU base-256 -1000 s (1969), as the header parser returns it.
        assert_eq!(
            time((-1000i64) as u64),
            UNIX_EPOCH - Duration::from_secs(1000)
        );
        for s in [u64::MAX, i64::MAX as u64, i64::MIN as u64, 1 << 63 | 1] {
            let _ = time(s); // no panic
        }
    }
}
