//! What is being written through the mount: files under `uploads/`, `blobs/sha256/` and
//! `tags/<tag>/manifest.json` with their size so far and, once committed, their digest; and the
//! tags made by mkdir whose manifest is not pushed yet. Memory only (documented in SEMANTICS).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use super::node::{Area, StagedKey};
use crate::digest::Digest;
use crate::sync::lock;

/// What is known of a written file.
#[derive(Debug, Clone, Default)]
pub struct StagedInfo {
    /// Bytes written so far (the final size once committed).
    pub size: u64,
    /// Set once the registry accepted it.
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
}

/// Why an `uploads/` entry could not be removed.
pub(crate) enum UnlinkRefused {
    Missing,
    BeingWritten,
}

#[derive(Default)]
pub(crate) struct Staging {
    staged: Mutex<HashMap<StagedKey, StagedInfo>>,
    pending_tags: Mutex<BTreeSet<(String, String)>>,
}

impl Staging {
    /// A write starts: the file is listed with size 0 and no digest.
    pub fn start(&self, key: StagedKey) {
        lock(&self.staged).insert(key, StagedInfo::default());
    }

    pub fn info(&self, key: &StagedKey) -> Option<StagedInfo> {
        lock(&self.staged).get(key).cloned()
    }

    pub fn size(&self, key: &StagedKey) -> u64 {
        lock(&self.staged).get(key).map_or(0, |i| i.size)
    }

    pub fn set_size(&self, key: &StagedKey, size: u64) {
        if let Some(i) = lock(&self.staged).get_mut(key) {
            i.size = size;
        }
    }

    /// The registry accepted it.
    pub fn committed(&self, key: &StagedKey, digest: Digest, size: u64) {
        if let Some(i) = lock(&self.staged).get_mut(key) {
            i.digest = Some(digest);
            i.size = size;
        }
    }

    /// A failed write: nothing that claims to be complete stays behind.
    pub fn remove(&self, key: &StagedKey) {
        lock(&self.staged).remove(key);
    }

    pub fn contains(&self, key: &StagedKey) -> bool {
        lock(&self.staged).contains_key(key)
    }

    /// Listed and still being written (no digest yet).
    pub fn is_writing(&self, key: &StagedKey) -> bool {
        lock(&self.staged)
            .get(key)
            .is_some_and(|i| i.digest.is_none())
    }

    /// Names under `uploads/` of `repo`, sorted.
    pub fn uploads(&self, repo: &str) -> Vec<StagedKey> {
        let mut out: Vec<StagedKey> = lock(&self.staged)
            .keys()
            .filter(|k| k.repo == repo && k.area == Area::Uploads)
            .cloned()
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// `rm uploads/NAME`: drops the listing of a committed upload (the blob stays).
    pub fn unlink_upload(&self, key: &StagedKey) -> Result<(), UnlinkRefused> {
        let mut staged = lock(&self.staged);
        match staged.get(key) {
            Some(i) if i.digest.is_some() => {
                staged.remove(key);
                Ok(())
            }
            Some(_) => Err(UnlinkRefused::BeingWritten),
            None => Err(UnlinkRefused::Missing),
        }
    }

    pub fn add_pending_tag(&self, repo: &str, tag: &str) {
        lock(&self.pending_tags).insert((repo.to_string(), tag.to_string()));
    }

    /// Was it pending (and so is now removed)?
    pub fn remove_pending_tag(&self, repo: &str, tag: &str) -> bool {
        lock(&self.pending_tags).remove(&(repo.to_string(), tag.to_string()))
    }

    pub fn has_pending_tag(&self, repo: &str, tag: &str) -> bool {
        lock(&self.pending_tags).contains(&(repo.to_string(), tag.to_string()))
    }

    /// Pending tags of `repo` that `except` does not list.
    pub fn pending_tags(&self, repo: &str, except: &[String]) -> Vec<String> {
        lock(&self.pending_tags)
            .iter()
            .filter(|(r, t)| r == repo && !except.contains(t))
            .map(|(_, t)| t.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(name: &str) -> StagedKey {
        StagedKey {
            repo: "r".into(),
            area: Area::Uploads,
            name: name.into(),
        }
    }

    #[test]
    fn an_upload_is_listed_while_written_and_removable_once_committed() {
        let s = Staging::default();
        s.start(up("b"));
        s.start(up("a"));
        s.set_size(&up("a"), 10);
        assert!(s.is_writing(&up("a")));
        assert_eq!(s.size(&up("a")), 10);
        assert!(matches!(
            s.unlink_upload(&up("a")),
            Err(UnlinkRefused::BeingWritten)
        ));
        s.committed(&up("a"), Digest::from("sha256:aa"), 12);
        assert!(!s.is_writing(&up("a")));
        assert_eq!(s.info(&up("a")).unwrap().size, 12);
        let names: Vec<_> = s.uploads("r").into_iter().map(|k| k.name).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(s.unlink_upload(&up("a")).is_ok());
        assert!(matches!(
            s.unlink_upload(&up("a")),
            Err(UnlinkRefused::Missing)
        ));
        s.remove(&up("b"));
        assert!(s.uploads("r").is_empty());
    }

    #[test]
    fn pending_tags() {
        let s = Staging::default();
        s.add_pending_tag("r", "v1");
        s.add_pending_tag("r", "v2");
        s.add_pending_tag("q", "v1");
        assert!(s.has_pending_tag("r", "v1"));
        assert_eq!(s.pending_tags("r", &["v2".into()]), ["v1"]);
        assert!(s.remove_pending_tag("r", "v1"));
        assert!(!s.remove_pending_tag("r", "v1"));
    }
}
