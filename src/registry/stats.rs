//! Request counters: [`RequestStats`] (atomics, bumped by registry implementations) and
//! [`StatsSnapshot`] (a plain copy, serialized as the `user.regfs.stats` xattr). Both are generated
//! from one list of field names, so they cannot drift apart.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

macro_rules! request_stats {
    ($($(#[$doc:meta])* $field:ident,)*) => {
        /// Counters of the requests a registry implementation has sent (or, for the fake, served).
        #[derive(Debug, Default)]
        pub struct RequestStats {
            $($(#[$doc])* pub $field: AtomicU64,)*
        }

        /// A plain copy of [`RequestStats`], as JSON for the `user.regfs.stats` xattr.
        #[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $field: u64,)*
        }

        impl RequestStats {
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot {
                    $($field: self.$field.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

// The JSON field names of the stats xattr are these names, in this order.
request_stats! {
    catalog_pages,
    tag_pages,
    manifest_gets,
    manifest_heads,
    blob_heads,
    blob_gets,
    blob_bytes,
    token_fetches,
    pushes,
    upload_starts,
    upload_patches,
    upload_bytes,
    upload_cancels,
    blob_mounts,
    deletes,
    /// Requests sent again after a transport error, a 5xx or a 429 (within the retry budget).
    retries,
    /// Blob reads whose body was cut, resumed with a Range from the byte where it stopped.
    resumes,
    /// Uploads whose failed PATCH was resumed from the registry's upload status.
    upload_resumes,
    /// Requests to another origin than the registry's (a `Link`, `Location` or redirect), sent
    /// without credentials.
    foreign_requests,
    /// Requests being answered now (a gauge: it goes down as answers arrive).
    requests_in_flight,
    /// The most requests that were in flight at once since the mount (or the fake) started.
    max_requests_in_flight,
}

impl RequestStats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Count one request in flight until the guard is dropped (and raise the maximum).
    pub fn in_flight(&self) -> InFlight<'_> {
        let now = self.requests_in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_requests_in_flight
            .fetch_max(now, Ordering::Relaxed);
        InFlight(self)
    }
}

/// One request in flight (see [`RequestStats::in_flight`]).
pub struct InFlight<'a>(&'a RequestStats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_json_has_every_counter_by_name() {
        let s = RequestStats::default();
        RequestStats::inc(&s.blob_gets);
        RequestStats::add(&s.upload_bytes, 7);
        let v = serde_json::to_value(s.snapshot()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut want = vec![
            "catalog_pages",
            "tag_pages",
            "manifest_gets",
            "manifest_heads",
            "blob_heads",
            "blob_gets",
            "blob_bytes",
            "token_fetches",
            "pushes",
            "upload_starts",
            "upload_patches",
            "upload_bytes",
            "upload_cancels",
            "blob_mounts",
            "deletes",
            "retries",
            "resumes",
            "upload_resumes",
            "foreign_requests",
            "requests_in_flight",
            "max_requests_in_flight",
        ];
        let mut keys_sorted = keys.clone();
        keys_sorted.sort();
        want.sort();
        assert_eq!(keys_sorted, want);
        assert_eq!(v["blob_gets"], 1);
        assert_eq!(v["upload_bytes"], 7);
    }

    #[test]
    fn in_flight_counts_overlap_and_keeps_the_maximum() {
        let s = RequestStats::default();
        {
            let _a = s.in_flight();
            let _b = s.in_flight();
            assert_eq!(s.snapshot().requests_in_flight, 2);
        }
        let _c = s.in_flight();
        let snap = s.snapshot();
        assert_eq!(
            (snap.requests_in_flight, snap.max_requests_in_flight),
            (1, 2)
        );
    }
}
