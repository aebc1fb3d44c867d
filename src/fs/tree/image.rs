//! An image's directories: `tags/<tag>/` and platform directories (manifest.json, config.json,
//! layers/, rootfs/, and one directory per platform of an index), and `layers/`.

use std::collections::BTreeSet;

use crate::digest::Digest;
use crate::error::FsResult;
use crate::fs::node::{Content, FileNode, Node, TreeDir, View};
use crate::fs::Fs;
use crate::layer::LayerRef;
use crate::manifest::{self, Descriptor, Parsed};

impl Fs {
    pub(super) async fn image_children(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> FsResult<Vec<(String, Node)>> {
        let m = self.meta.manifest(repo, digest).await?;
        let mut out = vec![(
            "manifest.json".to_string(),
            Node::File(FileNode {
                repo: repo.to_string(),
                content: Content::Manifest {
                    digest: digest.clone(),
                },
                size: m.blob.body.len() as u64,
                media_type: Some(m.blob.media_type.clone()),
            }),
        )];
        if let Parsed::Index { manifests } = &m.parsed {
            for (name, d) in platform_dirs(manifests) {
                out.push((
                    name,
                    Node::Image {
                        repo: repo.to_string(),
                        tag: None,
                        digest: Digest::from(&d.digest),
                    },
                ));
            }
        }
        if let Some(view) = self.meta.image_view(repo, digest).await? {
            out.push((
                "config.json".into(),
                Node::File(FileNode {
                    repo: repo.to_string(),
                    content: Content::Blob {
                        digest: Digest::from(&view.config.digest),
                    },
                    size: view.config.size,
                    media_type: Some(view.config.media_type.clone()),
                }),
            ));
            out.push((
                "layers".into(),
                Node::Layers {
                    repo: repo.to_string(),
                    digest: view.digest.clone(),
                },
            ));
            out.push((
                "rootfs".into(),
                Node::TreeDir(TreeDir {
                    repo: repo.to_string(),
                    view: View::Rootfs { image: view.digest },
                    path: String::new(),
                    meta: None,
                }),
            ));
        }
        Ok(out)
    }

    /// `layers/`: one file per layer, and beside it the layer's own tree (tar layers only).
    pub(super) async fn layers_children(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> FsResult<Vec<(String, Node)>> {
        let m = self.meta.manifest(repo, digest).await?;
        let mut out = Vec::new();
        if let Parsed::Image { config, layers } = &m.parsed {
            for (i, l) in layers.iter().enumerate() {
                out.push((
                    manifest::layer_file_name(i, layers.len(), l),
                    Node::File(FileNode {
                        repo: repo.to_string(),
                        content: Content::Blob {
                            digest: Digest::from(&l.digest),
                        },
                        size: l.size,
                        media_type: Some(l.media_type.clone()),
                    }),
                ));
                if let Some(dir) = layer_tree_name(i, layers.len(), l) {
                    out.push((
                        dir,
                        Node::TreeDir(TreeDir {
                            repo: repo.to_string(),
                            view: View::Layer(LayerRef::new(l, Some(config), i)),
                            path: String::new(),
                            meta: None,
                        }),
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// `NN-<hex12>` for a layer whose tree can be shown (tar, tar.gz, tar.zst).
fn layer_tree_name(i: usize, count: usize, l: &Descriptor) -> Option<String> {
    let file = manifest::layer_file_name(i, count, l);
    let ext = manifest::layer_extension(&l.media_type);
    (ext != "blob").then(|| file[..file.len() - ext.len() - 1].to_string())
}

/// Platform directory names of an index, made unique.
fn platform_dirs(manifests: &[Descriptor]) -> Vec<(String, &Descriptor)> {
    let mut out: Vec<(String, &Descriptor)> = Vec::new();
    let mut used = BTreeSet::new();
    for d in manifests {
        let base = d
            .platform
            .as_ref()
            .map(|p| p.dir_name())
            .filter(|n| n != "-")
            .unwrap_or_else(|| "unknown-unknown".to_string());
        let name = if used.contains(&base) {
            format!("{base}-{}", crate::digest::short_hex(&d.digest))
        } else {
            base
        };
        used.insert(name.clone());
        out.push((name, d));
    }
    out
}
