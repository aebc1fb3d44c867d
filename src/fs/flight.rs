//! Single flight for metadata loads: while one load of a key is on the wire, others asking for
//! the same key wait for its answer instead of sending the same request again.
//!
//! `ls tags/` in two shells, a listing and the walk-ahead that got there first (`fs::walk`),
//! or 64 readers of one repository's first manifest each cost one request, not one each. The
//! answer, an error included, goes to those already waiting and is not kept: what is cached is
//! the caller's business (`meta::TtlMap`, the manifest LRU). A load whose task goes away before
//! it answers hands the key to the next waiter, which loads it itself.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use crate::error::{FsError, FsResult};
use crate::sync::lock;

/// One load on the wire: its answer, set before waiters are let in (`None` if its task went
/// away first).
type Slot<V> = Arc<tokio::sync::Mutex<Option<FsResult<V>>>>;

/// Loads in flight by key.
pub(crate) struct Flights<K, V> {
    map: Mutex<HashMap<K, Slot<V>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
        }
    }
}

/// Takes a finished (or abandoned) load off the map, so the next ask starts a new one.
struct Landed<'a, K: Eq + Hash, V> {
    map: &'a Mutex<HashMap<K, Slot<V>>>,
    key: &'a K,
    slot: &'a Slot<V>,
}

impl<K: Eq + Hash, V> Drop for Landed<'_, K, V> {
    fn drop(&mut self) {
        let mut m = lock(self.map);
        if m.get(self.key).is_some_and(|s| Arc::ptr_eq(s, self.slot)) {
            m.remove(self.key);
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Flights<K, V> {
    /// `load`'s answer for `key`, or the answer of the load of `key` already on the wire.
    pub async fn run<F, Fut>(&self, key: K, load: F) -> FsResult<V>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = FsResult<V>>,
    {
        let mut load = Some(load);
        loop {
            let (slot, leader) = {
                let mut m = lock(&self.map);
                match m.get(&key) {
                    Some(s) => (s.clone(), None),
                    None => {
                        let s: Slot<V> = Arc::new(tokio::sync::Mutex::new(None));
                        // A new mutex is always free.
                        let Ok(guard) = s.clone().try_lock_owned() else {
                            return Err(FsError::io("a new metadata load's slot was taken"));
                        };
                        m.insert(key.clone(), s.clone());
                        (s, Some(guard))
                    }
                }
            };
            let Some(mut answer) = leader else {
                if let Some(r) = slot.lock().await.clone() {
                    return r;
                }
                // The leader's task went away without an answer: ask again (and maybe lead).
                continue;
            };
            // Dropped before `answer`: the key leaves the map before waiters are let in.
            let _landed = Landed {
                map: &self.map,
                key: &key,
                slot: &slot,
            };
            // Only a leader takes `load`, and a leader returns: this is always there.
            let Some(load) = load.take() else {
                return Err(FsError::io("a metadata load was asked twice"));
            };
            let r = load().await;
            *answer = Some(r.clone());
            return r;
        }
    }

    /// Let the next ask of `key` start a new load, whatever is on the wire now (its answer still
    /// reaches those already waiting for it): the thing it fetches has changed.
    pub fn forget(&self, key: &K) {
        lock(&self.map).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_asks_share_one_load_and_its_error() {
        let flights: Arc<Flights<u32, u32>> = Arc::default();
        let loads = Arc::new(AtomicUsize::new(0));
        let ask = |ok: bool| {
            let (f, n) = (flights.clone(), loads.clone());
            tokio::spawn(async move {
                f.run(1, || async move {
                    n.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if ok {
                        Ok(7)
                    } else {
                        Err(FsError::io("the registry said no"))
                    }
                })
                .await
            })
        };
        let all: Vec<_> = (0..8).map(|_| ask(true)).collect();
        for h in all {
            assert_eq!(h.await.unwrap().unwrap(), 7);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        // Nothing is kept: the next ask loads again, and its error reaches every waiter.
        let all: Vec<_> = (0..4).map(|_| ask(false)).collect();
        for h in all {
            assert!(h.await.unwrap().is_err());
        }
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        assert!(lock(&flights.map).is_empty());
    }

    #[tokio::test]
    async fn a_leader_that_goes_away_hands_the_key_on() {
        let flights: Arc<Flights<u32, u32>> = Arc::default();
        let f = flights.clone();
        let leader =
            tokio::spawn(async move { f.run(1, std::future::pending::<FsResult<u32>>).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let f = flights.clone();
        let waiter = tokio::spawn(async move { f.run(1, || async { Ok(9) }).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        assert_eq!(waiter.await.unwrap().unwrap(), 9);
        assert!(lock(&flights.map).is_empty());
    }
}
