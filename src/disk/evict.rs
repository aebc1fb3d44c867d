//! Least-recently-used order of what the disk cache holds, by bytes. Entries are files named by
//! their path relative to the cache dir (a block file, or a whole blob file); sizes are what the
//! file takes on disk (rounded up to 4 KiB allocation units), so the cap is a cap on real usage.

use std::collections::{BTreeMap, HashMap};

/// Filesystem allocation unit the sizes are rounded up to.
const UNIT: u64 = 4096;

/// What a file of `len` bytes takes on disk.
pub fn on_disk(len: u64) -> u64 {
    len.div_ceil(UNIT).saturating_mul(UNIT)
}

#[derive(Default)]
pub struct Lru {
    /// name -> (bytes, tick of last use)
    entries: HashMap<String, (u64, u64)>,
    /// tick -> name, oldest first.
    order: BTreeMap<u64, String>,
    used: u64,
    tick: u64,
}

impl Lru {
    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Add (or replace) `name` as the most recently used entry.
    pub fn insert(&mut self, name: String, bytes: u64) {
        self.remove(&name);
        self.tick += 1;
        self.order.insert(self.tick, name.clone());
        self.entries.insert(name, (bytes, self.tick));
        self.used = self.used.saturating_add(bytes);
    }

    /// Mark `name` used now.
    pub fn touch(&mut self, name: &str) {
        if let Some(&(bytes, _)) = self.entries.get(name) {
            self.insert(name.to_string(), bytes);
        }
    }

    /// Forget `name`; its bytes if it was there.
    pub fn remove(&mut self, name: &str) -> Option<u64> {
        let (bytes, tick) = self.entries.remove(name)?;
        self.order.remove(&tick);
        self.used = self.used.saturating_sub(bytes);
        Some(bytes)
    }

    /// Take out the least recently used entry.
    pub fn pop_oldest(&mut self) -> Option<(String, u64)> {
        let (_, name) = self.order.pop_first()?;
        let (bytes, _) = self.entries.remove(&name)?;
        self.used = self.used.saturating_sub(bytes);
        Some((name, bytes))
    }

    /// Names that start with `prefix`.
    pub fn with_prefix(&self, prefix: &str) -> Vec<String> {
        self.entries
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_first_by_bytes() {
        let mut l = Lru::default();
        l.insert("a".into(), 10);
        l.insert("b".into(), 20);
        l.insert("c".into(), 30);
        l.touch("a");
        assert_eq!(l.used(), 60);
        assert_eq!(l.pop_oldest(), Some(("b".into(), 20)));
        assert_eq!(l.remove("c"), Some(30));
        assert_eq!(l.used(), 10);
        l.insert("a".into(), 5);
        assert_eq!((l.used(), l.len()), (5, 1));
        assert_eq!(on_disk(1), 4096);
        assert_eq!(on_disk(4096), 4096);
        assert_eq!(on_disk(0), 0);
    }
}
