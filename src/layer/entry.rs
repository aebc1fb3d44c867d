//! One tar entry as an index keeps it (`TarEntry`, `EntryKind`), and the path normalisation
//! every format applies to entry names. A leaf: imports nothing from the other layer modules.

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

/// (parent directory, name) of a normalised path; the root's children have parent "".
pub(crate) fn parent_of(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

/// A regular file entry of `size` bytes at `path`, for tests.
#[cfg(test)]
pub(crate) fn file_entry(path: &str, size: u64) -> TarEntry {
    TarEntry {
        path: path.to_string(),
        kind: EntryKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 0,
        size,
        link: None,
        dev: (0, 0),
        xattrs: vec![],
        offset: 512,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_paths() {
        assert_eq!(normalise(b"./a/b/"), "a/b");
        assert_eq!(normalise(b"/etc/../../x"), "x");
        assert_eq!(normalise(b"a//./b/../c"), "a/c");
        assert_eq!(normalise(b"../../.."), "");
    }

    #[test]
    fn splits_parent_and_name() {
        assert_eq!(parent_of("a/b/c"), ("a/b", "c"));
        assert_eq!(parent_of("top"), ("", "top"));
    }
}
