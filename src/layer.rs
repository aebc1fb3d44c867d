//! Layer contents: an index of a layer's tar entries (with each file's data offset in the
//! uncompressed stream), and the merged root filesystem of an image (layers applied bottom to top,
//! OCI whiteouts and opaque directories honoured).
//!
//! Parsing uses the `tar` crate (PAX and GNU long names, `raw_file_position` for data offsets).
//! Entry paths are normalised so nothing escapes the tree (`..`, absolute names); for duplicate
//! paths the last entry wins, as extraction does.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

/// What a tar entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A hard link to `link` (a normalised path in the same layer).
    Hardlink,
    Char,
    Block,
    Fifo,
}

/// One tar entry, as the index keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TarEntry {
    /// Normalised path without a leading `/`.
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub size: u64,
    /// Symlink target as stored, or hardlink target normalised.
    pub link: Option<String>,
    pub dev: (u32, u32),
    /// PAX `SCHILY.xattr.*` attributes.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Offset of the data in the uncompressed tar stream.
    pub offset: u64,
}

/// Every entry of one layer, with its directory tree.
#[derive(Debug, Default)]
pub struct LayerIndex {
    pub entries: Vec<TarEntry>,
    /// Path -> entry index (the last entry for a path).
    pub by_path: HashMap<String, usize>,
    /// Directory path ("" = root) -> child name -> entry index.
    pub dirs: HashMap<String, BTreeMap<String, usize>>,
    /// Entry index -> number of names that refer to it (1 + hardlinks).
    pub nlink: HashMap<usize, u32>,
    /// gzip layers: where reads can restart inflating (see `crate::zran`).
    pub checkpoints: Vec<crate::zran::Checkpoint>,
    /// eStargz and zstd:chunked layers: entry index -> where its content chunks are
    /// (see `crate::toc`). Files listed here are read chunk by chunk, never from a full pass.
    pub toc_chunks: HashMap<usize, Vec<crate::toc::TocChunk>>,
    /// zstd layers: recorded frame starts (see `crate::zstd_frames`).
    pub zstd_frames: Vec<crate::zstd_frames::FrameStart>,
}

/// Normalise a tar path: no leading `/`, no `.` or empty components, `..` never above the root.
pub fn normalise(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    let mut parts: Vec<&str> = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

fn parent_of(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

/// What `--cache-dir` keeps of an index; the rest is derived again on load.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    version: u32,
    entries: Vec<TarEntry>,
    by_path: HashMap<String, usize>,
    checkpoints: Vec<crate::zran::Checkpoint>,
    #[serde(default)]
    toc_chunks: HashMap<usize, Vec<crate::toc::TocChunk>>,
    #[serde(default)]
    zstd_frames: Vec<crate::zstd_frames::FrameStart>,
}

const STORED_VERSION: u32 = 1;

impl LayerIndex {
    /// Serialise for the on-disk cache.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&Stored {
            version: STORED_VERSION,
            entries: self.entries.clone(),
            by_path: self.by_path.clone(),
            checkpoints: self.checkpoints.clone(),
            toc_chunks: self.toc_chunks.clone(),
            zstd_frames: self.zstd_frames.clone(),
        })
        .expect("index serialises")
    }

    /// Load from the on-disk cache; None if it is not a valid index of this version.
    pub fn from_bytes(b: &[u8]) -> Option<LayerIndex> {
        let s: Stored = serde_json::from_slice(b).ok()?;
        if s.version != STORED_VERSION || s.by_path.values().any(|&i| i >= s.entries.len()) {
            return None;
        }
        let mut idx = LayerIndex {
            entries: s.entries,
            by_path: s.by_path,
            checkpoints: s.checkpoints,
            toc_chunks: s.toc_chunks,
            zstd_frames: s.zstd_frames,
            ..Default::default()
        };
        idx.finish();
        Some(idx)
    }

    /// Approximate memory held by this index, in bytes.
    pub fn memory(&self) -> usize {
        let entries: usize = self
            .entries
            .iter()
            .map(|e| 96 + 2 * e.path.len() + e.link.as_ref().map_or(0, |l| l.len()))
            .sum();
        let checkpoints: usize = self.checkpoints.iter().map(|c| 40 + c.window.len()).sum();
        entries + checkpoints
    }

    /// Read a whole uncompressed tar stream and index it. Errors on a corrupt header.
    pub fn build<R: Read>(r: R) -> std::io::Result<LayerIndex> {
        let mut archive = tar::Archive::new(r);
        Self::from_entries(archive.entries()?)
    }

    /// Index the entries of an archive (from `entries()` or `entries_with_seek()`).
    pub fn from_entries<R: Read>(entries: tar::Entries<'_, R>) -> std::io::Result<LayerIndex> {
        let mut idx = LayerIndex::default();
        for entry in entries {
            let mut entry = entry?;
            let path = normalise(&entry.path_bytes());
            let header = entry.header();
            let kind = match header.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
                tar::EntryType::Directory => EntryKind::Dir,
                tar::EntryType::Symlink => EntryKind::Symlink,
                tar::EntryType::Link => EntryKind::Hardlink,
                tar::EntryType::Char => EntryKind::Char,
                tar::EntryType::Block => EntryKind::Block,
                tar::EntryType::Fifo => EntryKind::Fifo,
                // PAX/GNU extension headers are consumed by the crate; anything else is skipped.
                _ => continue,
            };
            let mode = header.mode().unwrap_or(0o644) & 0o7777;
            let uid = header.uid().unwrap_or(0);
            let gid = header.gid().unwrap_or(0);
            let mtime = header.mtime().unwrap_or(0);
            let dev = (
                header.device_major().ok().flatten().unwrap_or(0),
                header.device_minor().ok().flatten().unwrap_or(0),
            );
            let size = if kind == EntryKind::File {
                entry.size()
            } else {
                0
            };
            let link = entry.link_name_bytes().map(|l| match kind {
                EntryKind::Hardlink => normalise(&l),
                _ => String::from_utf8_lossy(&l).into_owned(),
            });
            let offset = entry.raw_file_position();
            let mut xattrs = Vec::new();
            let (mut pax_uid, mut pax_gid) = (None, None);
            if let Ok(Some(exts)) = entry.pax_extensions() {
                for ext in exts.flatten() {
                    let Ok(key) = ext.key() else { continue };
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                    } else if key == "uid" {
                        pax_uid = ext.value().ok().and_then(|v| v.parse().ok());
                    } else if key == "gid" {
                        pax_gid = ext.value().ok().and_then(|v| v.parse().ok());
                    }
                }
            }
            if path.is_empty() {
                continue; // the root itself ("./")
            }
            idx.add(TarEntry {
                path,
                kind,
                mode,
                uid: pax_uid.unwrap_or(uid),
                gid: pax_gid.unwrap_or(gid),
                mtime,
                size,
                link,
                dev,
                xattrs,
                offset,
            });
        }
        idx.finish();
        Ok(idx)
    }

    pub(crate) fn add(&mut self, e: TarEntry) {
        // Parents that the tar does not list are implied, as extraction would make them.
        let mut p = e.path.as_str();
        let mut missing = Vec::new();
        while let Some(i) = p.rfind('/') {
            p = &p[..i];
            if !self.by_path.contains_key(p) {
                missing.push(p.to_string());
            }
        }
        for dir in missing.into_iter().rev() {
            let i = self.entries.len();
            self.entries.push(TarEntry {
                path: dir.clone(),
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                size: 0,
                link: None,
                dev: (0, 0),
                xattrs: vec![],
                offset: 0,
            });
            self.by_path.insert(dir, i);
        }
        let i = self.entries.len();
        // A later entry replaces an earlier one of the same path (and a non-directory drops
        // what was below a directory of that name).
        if let Some(&old) = self.by_path.get(&e.path) {
            if self.entries[old].kind == EntryKind::Dir && e.kind != EntryKind::Dir {
                let prefix = format!("{}/", e.path);
                self.by_path.retain(|k, _| !k.starts_with(&prefix));
            }
        }
        self.by_path.insert(e.path.clone(), i);
        self.entries.push(e);
    }

    pub(crate) fn finish(&mut self) {
        self.dirs.insert(String::new(), BTreeMap::new());
        let mut paths: Vec<(&String, &usize)> = self.by_path.iter().collect();
        paths.sort();
        for (path, &i) in paths {
            let (parent, name) = parent_of(path);
            self.dirs
                .entry(parent.to_string())
                .or_default()
                .insert(name.to_string(), i);
            if self.entries[i].kind == EntryKind::Dir {
                self.dirs.entry(path.clone()).or_default();
            }
        }
        for i in self.by_path.values() {
            let e = &self.entries[*i];
            let target = if e.kind == EntryKind::Hardlink {
                e.link.as_ref().and_then(|t| self.by_path.get(t)).copied()
            } else {
                Some(*i)
            };
            if let Some(t) = target {
                *self.nlink.entry(t).or_insert(0) += 1;
            }
        }
    }

    /// The entry a name shows: a hardlink shows its target's entry.
    pub fn resolve(&self, i: usize) -> usize {
        let e = &self.entries[i];
        if e.kind == EntryKind::Hardlink {
            if let Some(&t) = e.link.as_ref().and_then(|t| self.by_path.get(t)) {
                if self.entries[t].kind != EntryKind::Hardlink {
                    return t;
                }
            }
        }
        i
    }
}

/// Names a layer uses for whiteouts.
const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// eStargz bookkeeping files, hidden from the merged view.
const ESTARGZ_FILES: &[&str] = &[
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

/// The merged root filesystem: path -> (layer index, entry index).
#[derive(Debug, Default)]
pub struct Merged {
    pub nodes: BTreeMap<String, (usize, usize)>,
    pub dirs: HashMap<String, BTreeMap<String, (usize, usize)>>,
}

fn remove_below(nodes: &mut BTreeMap<String, (usize, usize)>, dir: &str) {
    let prefix = format!("{dir}/");
    let doomed: Vec<String> = nodes
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, _)| k.clone())
        .collect();
    for k in doomed {
        nodes.remove(&k);
    }
}

impl Merged {
    /// Apply `layers` bottom to top.
    pub fn build(layers: &[&LayerIndex]) -> Merged {
        let mut nodes: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (li, layer) in layers.iter().enumerate() {
            let mut live: Vec<(&String, &usize)> = layer.by_path.iter().collect();
            live.sort();
            // Opaque directories first, then whiteouts, then additions ("regardless of order").
            for (path, _) in &live {
                let (dir, name) = parent_of(path);
                if name == OPAQUE {
                    if dir.is_empty() {
                        nodes.clear();
                    } else {
                        remove_below(&mut nodes, dir);
                    }
                }
            }
            for (path, _) in &live {
                let (dir, name) = parent_of(path);
                if let Some(target) = name.strip_prefix(WHITEOUT) {
                    if name != OPAQUE && !target.is_empty() {
                        let victim = if dir.is_empty() {
                            target.to_string()
                        } else {
                            format!("{dir}/{target}")
                        };
                        nodes.remove(&victim);
                        remove_below(&mut nodes, &victim);
                    }
                }
            }
            for (path, &ei) in &live {
                let (_, name) = parent_of(path);
                if name.starts_with(WHITEOUT) {
                    continue;
                }
                let e = &layer.entries[ei];
                if let Some(&(pl, pe)) = nodes.get(path.as_str()) {
                    let was_dir = layers[pl].entries[pe].kind == EntryKind::Dir;
                    if was_dir && e.kind != EntryKind::Dir {
                        remove_below(&mut nodes, path);
                    }
                }
                // A file replaced by a directory's child: the parent becomes this layer's dir.
                let mut p = path.as_str();
                while let Some(i) = p.rfind('/') {
                    p = &p[..i];
                    if let Some(&(pl, pe)) = nodes.get(p) {
                        if layers[pl].entries[pe].kind != EntryKind::Dir {
                            if let Some(&pi) = layer.by_path.get(p) {
                                nodes.insert(p.to_string(), (li, pi));
                            }
                        }
                    }
                }
                nodes.insert((*path).clone(), (li, ei));
            }
        }
        for name in ESTARGZ_FILES {
            nodes.remove(*name);
        }
        let mut dirs: HashMap<String, BTreeMap<String, (usize, usize)>> = HashMap::new();
        dirs.insert(String::new(), BTreeMap::new());
        for (path, &(li, ei)) in &nodes {
            let (parent, name) = parent_of(path);
            dirs.entry(parent.to_string())
                .or_default()
                .insert(name.to_string(), (li, ei));
            if layers[li].entries[ei].kind == EntryKind::Dir {
                dirs.entry(path.clone()).or_default();
            }
        }
        Merged { nodes, dirs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, ty, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*ty);
            h.set_size(data.len() as u64);
            h.set_mode(if *ty == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            if path.contains("..") {
                // The builder refuses such names; write them raw, as a hostile layer would.
                let name = &mut h.as_old_mut().name;
                name[..path.len()].copy_from_slice(path.as_bytes());
            } else {
                h.set_path(path).unwrap();
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    use tar::EntryType::{Directory as D, Link as L, Regular as F, Symlink as S};

    #[test]
    fn normalises_paths() {
        assert_eq!(normalise(b"./a/b/"), "a/b");
        assert_eq!(normalise(b"/etc/../../x"), "x");
        assert_eq!(normalise(b"a//./b/../c"), "a/c");
        assert_eq!(normalise(b"../../.."), "");
    }

    #[test]
    fn indexes_offsets_links_and_duplicates() {
        let t = tar_of(&[
            ("etc/", D, b"", None),
            ("etc/hosts", F, b"old", None),
            ("etc/hosts", F, b"new!", None),
            ("bin/sh", F, b"#!", None),
            ("bin/ash", L, b"", Some("bin/sh")),
            ("lib", S, b"", Some("/usr/lib")),
            ("../evil", F, b"x", None),
        ]);
        let idx = LayerIndex::build(&t[..]).unwrap();
        let hosts = &idx.entries[idx.by_path["etc/hosts"]];
        assert_eq!(hosts.size, 4);
        assert_eq!(
            &t[hosts.offset as usize..hosts.offset as usize + 4],
            b"new!"
        );
        assert!(idx.by_path.contains_key("bin"), "implicit parent");
        assert!(idx.by_path.contains_key("evil"), "'..' cannot escape");
        let ash = idx.by_path["bin/ash"];
        let sh = idx.by_path["bin/sh"];
        assert_eq!(idx.resolve(ash), sh);
        assert_eq!(idx.nlink[&sh], 2);
        assert_eq!(
            idx.entries[idx.by_path["lib"]].link.as_deref(),
            Some("/usr/lib")
        );
        assert_eq!(
            idx.dirs[""].keys().collect::<Vec<_>>(),
            vec!["bin", "etc", "evil", "lib"]
        );
    }

    #[test]
    fn merges_with_whiteouts_and_opaque_dirs() {
        let l0 = tar_of(&[
            ("a/", D, b"", None),
            ("a/keep", F, b"1", None),
            ("a/gone", F, b"2", None),
            ("o/", D, b"", None),
            ("o/hidden", F, b"3", None),
            ("f", F, b"file", None),
            ("d/", D, b"", None),
            ("d/x", F, b"x", None),
        ]);
        let l1 = tar_of(&[
            ("a/.wh.gone", F, b"", None),
            ("o/.wh..wh..opq", F, b"", None),
            ("o/new", F, b"4", None),
            ("f/", D, b"", None),
            ("f/inside", F, b"5", None),
            ("d", F, b"now a file", None),
        ]);
        let (i0, i1) = (
            LayerIndex::build(&l0[..]).unwrap(),
            LayerIndex::build(&l1[..]).unwrap(),
        );
        let m = Merged::build(&[&i0, &i1]);
        let names: Vec<&String> = m.nodes.keys().collect();
        assert_eq!(
            names,
            vec!["a", "a/keep", "d", "f", "f/inside", "o", "o/new"]
        );
        assert!(!m.nodes.keys().any(|k| k.contains(".wh.")));
        assert_eq!(m.nodes["d"].0, 1);
        assert_eq!(m.dirs["o"].keys().collect::<Vec<_>>(), vec!["new"]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut seed = 7u64;
        for len in [0usize, 1, 100, 511, 512, 513, 1024, 4096] {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = LayerIndex::build(&data[..]);
        }
        // A valid archive cut short.
        let t = tar_of(&[("a", F, &[7u8; 3000], None)]);
        for cut in [100, 512, 1000, 2000] {
            assert!(LayerIndex::build(&t[..cut]).is_err(), "cut at {cut}");
        }
    }
}
