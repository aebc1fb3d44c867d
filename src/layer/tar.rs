//! Indexing an uncompressed tar stream (`LayerIndex::build`, `LayerIndex::from_entries`).
//!
//! Parsing uses the `tar` crate (PAX and GNU long names, `raw_file_position` for data offsets).
//! Entry paths are normalised so nothing escapes the tree (`..`, absolute names); for duplicate
//! paths the last entry wins, as extraction does. A compressed layer is indexed the same way,
//! over a decompressing reader (`super::gzip::Indexer`, `super::zstd::FrameIndexer`).

use std::io::Read;

use super::entry::{normalise, EntryKind, TarEntry};
use super::index::LayerIndex;

impl LayerIndex {
    /// Read a whole uncompressed tar stream and index it. Errors on a corrupt header.
    pub fn build<R: Read>(r: R) -> std::io::Result<LayerIndex> {
        let mut archive = tar::Archive::new(r);
        Self::from_entries(archive.entries()?)
    }

    /// Index the entries of an archive (from `entries()` or `entries_with_seek()`).
    pub fn from_entries<R: Read>(entries: tar::Entries<'_, R>) -> std::io::Result<LayerIndex> {
        let mut idx = LayerIndex::default();
        Self::scan(entries, |e| idx.add(e))?;
        idx.finish();
        Ok(idx)
    }

    /// Hand each entry of an archive to `add`, in archive order, as soon as its header is read
    /// (a progressive index publishes them while the rest of the stream is still coming).
    pub fn scan<R: Read>(
        entries: tar::Entries<'_, R>,
        mut add: impl FnMut(TarEntry),
    ) -> std::io::Result<()> {
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
            add(TarEntry {
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
        Ok(())
    }
}

/// A tar of `(path, type, data, link)` entries, for tests.
#[cfg(test)]
pub(super) fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;

    use tar::EntryType::{Directory as D, Link as L, Regular as F, Symlink as S};

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

    #[test]
    fn a_tar_index_is_format_tar_and_survives_the_store() {
        let t = tar_of(&[("d/", D, b"", None), ("d/f", F, b"data", None)]);
        let idx = LayerIndex::build(&t[..]).unwrap();
        assert_eq!(idx.format, crate::layer::Format::Tar);
        let back = LayerIndex::from_bytes(&idx.to_bytes()).unwrap();
        assert_eq!(back.format, crate::layer::Format::Tar);
        let f = &back.entries[back.by_path["d/f"]];
        assert_eq!(&t[f.offset as usize..f.offset as usize + 4], b"data");
    }
}
