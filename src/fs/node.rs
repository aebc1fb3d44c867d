//! What an inode is: [`Node`] and its payloads. A node is immutable identity (a repository, a
//! digest, a path inside an image); what expires (a tag's current target, a listing) lives in
//! `meta`, and what is being written lives in `staging`.

use bytes::Bytes;

use crate::digest::Digest;
use crate::layer::LayerRef;
use crate::layer::TarEntry;

use super::types::Kind;

/// Where a file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A blob, read in chunks through the cache.
    Blob { digest: Digest },
    /// A manifest, read whole by digest.
    Manifest { digest: Digest },
    /// Bytes regfs made (index.json, oci-layout).
    Inline(Bytes),
}

/// A file of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileNode {
    pub repo: String,
    pub content: Content,
    pub size: u64,
    pub media_type: Option<String>,
}

impl FileNode {
    pub fn digest(&self) -> Option<&Digest> {
        match &self.content {
            Content::Blob { digest } | Content::Manifest { digest } => Some(digest),
            Content::Inline(_) => None,
        }
    }
}

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Root,
    /// A namespace, a repository, or both: `path` is the repository-name prefix.
    Dir {
        path: String,
    },
    /// `<repo>/_ns/`: the nested names of `path` only.
    NsEscape {
        path: String,
    },
    Tags {
        repo: String,
    },
    /// A manifest shown as a directory: `tags/<tag>/` (tag is Some) or a platform directory.
    Image {
        repo: String,
        tag: Option<String>,
        digest: Digest,
    },
    /// `layers/` of the image manifest `digest` (already platform-resolved).
    Layers {
        repo: String,
        digest: Digest,
    },
    Blobs {
        repo: String,
    },
    BlobsAlgo {
        repo: String,
    },
    Uploads {
        repo: String,
    },
    /// `index.json` as listed by readdir; made into a `File` (its bytes and size) when looked up
    /// or opened, so a plain `ls` of a repository does not resolve every tag.
    IndexJson {
        repo: String,
    },
    /// `tags/<tag>/` made by mkdir, before its manifest is pushed.
    PendingTag {
        repo: String,
        tag: String,
    },
    /// A file being (or having been) written: `uploads/NAME`, `blobs/sha256/<hex>` or a tag's
    /// `manifest.json`. Its size and digest live in the staging table.
    Staged(StagedKey),
    /// A directory of an image's `rootfs/` or of a layer's own tree (`layers/NN-<hex12>/`).
    TreeDir(TreeDir),
    /// A non-directory entry of those trees.
    TreeEntry(TreeEntry),
    File(FileNode),
    /// `MNT/.regfs/`, the control directory (`tree/control.rs`).
    Control,
    /// A file of `.regfs/`: its bytes are made at open (and at getattr, for its size).
    ControlFile(ControlFile),
}

/// The files of the control directory `MNT/.regfs/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlFile {
    /// JSON: request and byte counters, cache hits, retries, rate-limit headers.
    Stats,
    /// JSON: the effective configuration, without secrets.
    Config,
    /// The version.
    Version,
}

/// Which tree a node belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// `rootfs/` of the image manifest with this digest.
    Rootfs { image: Digest },
    /// One layer's own tree.
    Layer(LayerRef),
}

/// Ownership, mode and time from a tar header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeDir {
    pub repo: String,
    pub view: View,
    /// Path inside the tree ("" = its root).
    pub path: String,
    /// None for the tree's root (not in any tar).
    pub meta: Option<EntryMeta>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    pub repo: String,
    /// The layer whose bytes hold the entry.
    pub layer: LayerRef,
    /// Identifies the tree (image or layer digest), so hard links share an inode within it.
    pub view_id: Digest,
    /// The entry's index in its layer (hard links resolved to their target).
    pub index: usize,
    pub entry: TarEntry,
    pub nlink: u32,
}

/// Where a written file lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Area {
    Uploads,
    Blobs,
    Manifest { tag: String },
}

/// Identity of a written file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StagedKey {
    pub repo: String,
    pub area: Area,
    pub name: String,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        !matches!(
            self,
            Node::File(_)
                | Node::IndexJson { .. }
                | Node::Staged(_)
                | Node::TreeEntry(_)
                | Node::ControlFile(_)
        )
    }

    /// A directory where something can be created (mkdir, an upload, a manifest).
    pub fn accepts_entries(&self) -> bool {
        matches!(
            self,
            Node::Root
                | Node::Dir { .. }
                | Node::NsEscape { .. }
                | Node::Tags { .. }
                | Node::Image { tag: Some(_), .. }
                | Node::PendingTag { .. }
                | Node::Uploads { .. }
                | Node::BlobsAlgo { .. }
        )
    }

    /// Can the kernel cache this node's entry and attributes for long?
    pub fn immutable(&self) -> bool {
        match self {
            Node::Image { tag: Some(_), .. } => false,
            Node::Image { tag: None, .. } | Node::Layers { .. } => true,
            Node::File(f) => !matches!(f.content, Content::Inline(_)),
            Node::TreeDir(_) | Node::TreeEntry(_) => true,
            _ => false,
        }
    }

    /// Changes with every write: the kernel must ask again each time.
    pub fn volatile(&self) -> bool {
        matches!(
            self,
            Node::Staged(_) | Node::PendingTag { .. } | Node::ControlFile(_)
        )
    }

    /// The file type, as a listing shows it.
    pub fn kind(&self) -> Kind {
        use crate::layer::EntryKind;
        match self {
            Node::TreeEntry(t) => match t.entry.kind {
                EntryKind::File | EntryKind::Hardlink | EntryKind::Dir => Kind::File,
                EntryKind::Symlink => Kind::Symlink,
                EntryKind::Char => Kind::CharDevice,
                EntryKind::Block => Kind::BlockDevice,
                EntryKind::Fifo => Kind::Fifo,
            },
            n if n.is_dir() => Kind::Dir,
            _ => Kind::File,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_cacheability() {
        let blob = Node::File(FileNode {
            repo: "r".into(),
            content: Content::Blob {
                digest: Digest::from("sha256:00"),
            },
            size: 1,
            media_type: None,
        });
        assert_eq!(blob.kind(), Kind::File);
        assert!(blob.immutable());
        let inline = Node::File(FileNode {
            repo: "r".into(),
            content: Content::Inline(Bytes::from_static(b"x")),
            size: 1,
            media_type: None,
        });
        assert!(!inline.immutable());
        let tag = Node::Image {
            repo: "r".into(),
            tag: Some("t".into()),
            digest: Digest::from("sha256:00"),
        };
        assert!(tag.is_dir() && tag.accepts_entries() && !tag.immutable());
        assert!(Node::Tags { repo: "r".into() }.accepts_entries());
        assert!(!Node::Blobs { repo: "r".into() }.accepts_entries());
        let staged = Node::Staged(StagedKey {
            repo: "r".into(),
            area: Area::Uploads,
            name: "x".into(),
        });
        assert!(!staged.is_dir() && staged.volatile());
    }
}
