//! Request counters: [`RequestStats`] (atomics, bumped by registry implementations) and
//! [`StatsSnapshot`] (a plain copy, serialized as the `user.regfs.stats` xattr). Both are generated
//! from one list of field names, so they cannot drift apart. Beside the counters, the rate-limit
//! headers last seen ([`RateLimit`], Docker Hub's `ratelimit-limit` / `ratelimit-remaining`), and
//! how soon blob answers come ([`MinLatency`], which decides whether a registry is near).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

macro_rules! request_stats {
    ($($(#[$doc:meta])* $field:ident,)*) => {
        /// Counters of the requests a registry implementation has sent (or, for the fake, served).
        #[derive(Debug, Default)]
        pub struct RequestStats {
            $($(#[$doc])* pub $field: AtomicU64,)*
            /// The rate-limit headers of the last answer that carried any (not in the snapshot).
            pub rate_limit: Mutex<Option<RateLimit>>,
            /// How soon blob bodies start to arrive, lately (not in the snapshot).
            pub blob_latency: Mutex<MinLatency>,
        }

        /// A plain copy of [`RequestStats`], as JSON for the `user.regfs.stats` xattr.
        #[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $field: u64,)*
        }

        impl StatsSnapshot {
            /// Field by field sum (the totals over several registries, e.g. mirrors).
            pub fn add(&mut self, o: &StatsSnapshot) {
                $(self.$field = self.$field.saturating_add(o.$field);)*
            }
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
    /// Uploads whose failed PATCH or closing PUT was resumed from the registry's upload status
    /// (or whose closing PUT, its answer lost, was found complete by a HEAD of the blob).
    upload_resumes,
    /// Requests to another origin than the registry's (a `Link`, `Location` or redirect), sent
    /// without credentials.
    foreign_requests,
    /// Blob GETs the registry redirected to another origin (storage or a CDN).
    blob_redirects,
    /// Blob GETs sent straight to a redirect target remembered from an earlier GET of the blob.
    redirect_reuses,
    /// Storage links that failed and were forgotten: a remembered one before its answer began
    /// (an error status, refused, unreachable, no answer within 5 s), when the registry is asked
    /// again at once; or any link after its answer began (a body cut by an error, when the
    /// resumed try asks the registry; a wrong Content-Range, which fails the read).
    redirect_failures,
    /// 429 answers that carried Docker Hub's pull-limit headers with nothing remaining.
    pull_limited,
    /// Other 429 answers (plain rate limiting).
    rate_limited,
    /// Requests being answered now (a gauge: it goes down as answers arrive).
    requests_in_flight,
    /// The most requests that were in flight at once since the mount (or the fake) started.
    max_requests_in_flight,
}

/// Rate-limit headers as a registry sent them (Docker Hub: `ratelimit-limit: 100;w=21600`,
/// `ratelimit-remaining: 20;w=21600`, `docker-ratelimit-source`). Values are kept as sent, cut
/// to [`RATE_LIMIT_VALUE_CAP`] bytes; `remaining` is also parsed when it starts with a number.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RateLimit {
    #[serde(rename = "ratelimit-limit")]
    pub limit: Option<String>,
    #[serde(rename = "ratelimit-remaining")]
    pub remaining: Option<String>,
    /// The number before `;` of `remaining`, when there is one.
    pub remaining_count: Option<u64>,
    #[serde(rename = "docker-ratelimit-source")]
    pub source: Option<String>,
}

/// Longest header value kept: the real ones are a few bytes (`100;w=21600`), and a hostile
/// registry must not grow the stats file.
pub const RATE_LIMIT_VALUE_CAP: usize = 64;

impl RateLimit {
    /// From a header lookup (`get(name)` gives the value of that header); None when the answer
    /// carries neither limit header (no limit announced).
    pub fn from_headers<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<RateLimit> {
        let cut = |v: &str| {
            let mut end = v.len().min(RATE_LIMIT_VALUE_CAP);
            while !v.is_char_boundary(end) {
                end -= 1;
            }
            v[..end].trim().to_string()
        };
        let limit = get("ratelimit-limit").map(cut);
        let remaining = get("ratelimit-remaining").map(cut);
        if limit.is_none() && remaining.is_none() {
            return None;
        }
        let remaining_count = remaining
            .as_deref()
            .and_then(|r| r.split(';').next())
            .and_then(|n| n.trim().parse().ok());
        Some(RateLimit {
            limit,
            remaining,
            remaining_count,
            source: get("docker-ratelimit-source").map(cut),
        })
    }

    /// Docker Hub's pull limit reached: the headers say nothing remains.
    pub fn exhausted(&self) -> bool {
        self.remaining_count == Some(0)
    }
}

impl RequestStats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    /// Remember the rate-limit headers of the latest answer that had any.
    pub fn saw_rate_limit(&self, r: RateLimit) {
        *crate::sync::lock(&self.rate_limit) = Some(r);
    }
    /// The rate-limit headers last seen.
    pub fn last_rate_limit(&self) -> Option<RateLimit> {
        crate::sync::lock(&self.rate_limit).clone()
    }

    /// A blob GET's answer came `d` after it was sent (its headers; retries and redirects
    /// included, so a blob served from a far host looks far).
    pub fn saw_blob_latency(&self, d: std::time::Duration) {
        crate::sync::lock(&self.blob_latency).record(d);
    }
    /// How soon blob bodies start to arrive ([`MinLatency`]), or None before the first.
    pub fn blob_latency(&self) -> Option<std::time::Duration> {
        crate::sync::lock(&self.blob_latency).estimate()
    }

    /// Count one request in flight until the guard is dropped (and raise the maximum).
    pub fn in_flight(&self) -> InFlight<'_> {
        let now = self.requests_in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_requests_in_flight
            .fetch_max(now, Ordering::Relaxed);
        InFlight(self)
    }
}

/// Samples of [`MinLatency`] per window: a few seconds of a reader's requests.
const LATENCY_WINDOW: u32 = 16;
/// A [`MinLatency`] whose last sample is older than this knows nothing: the path may have
/// changed, and over mirrors a source not asked lately must not decide for the others.
const LATENCY_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// The least time from sending a blob GET to its answer's headers, over the last one or two
/// windows of [`LATENCY_WINDOW`] samples. The least, not an average: under load the registry
/// answers later, but the path is no longer, and a LAN registry must not look far because it
/// is busy (the idea of BBR's min RTT). Windows let it follow a path that changed.
#[derive(Debug, Default)]
pub struct MinLatency {
    current: Option<std::time::Duration>,
    samples: u32,
    previous: Option<std::time::Duration>,
    /// When the last sample came.
    last: Option<std::time::Instant>,
}

impl MinLatency {
    /// One answer's time to headers.
    pub fn record(&mut self, d: std::time::Duration) {
        self.record_at(d, std::time::Instant::now());
    }

    fn record_at(&mut self, d: std::time::Duration, now: std::time::Instant) {
        if self
            .last
            .is_some_and(|l| now.saturating_duration_since(l) > LATENCY_MAX_AGE)
        {
            *self = MinLatency::default(); // stale: start over
        }
        self.last = Some(now);
        self.current = Some(self.current.map_or(d, |c| c.min(d)));
        self.samples += 1;
        if self.samples >= LATENCY_WINDOW {
            self.previous = self.current.take();
            self.samples = 0;
        }
    }

    /// The estimate: the least of this window and the last (None before any sample, and once
    /// the last is older than [`LATENCY_MAX_AGE`]).
    pub fn estimate(&self) -> Option<std::time::Duration> {
        self.estimate_at(std::time::Instant::now())
    }

    fn estimate_at(&self, now: std::time::Instant) -> Option<std::time::Duration> {
        let last = self.last?;
        if now.saturating_duration_since(last) > LATENCY_MAX_AGE {
            return None;
        }
        match (self.current, self.previous) {
            (Some(c), Some(p)) => Some(c.min(p)),
            (c, p) => c.or(p),
        }
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
    fn latency_is_the_least_of_the_last_windows() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        let mut l = MinLatency::default();
        assert_eq!(l.estimate(), None);
        l.record(ms(9));
        l.record(ms(2));
        l.record(ms(40)); // a busy moment does not make the path longer
        assert_eq!(l.estimate(), Some(ms(2)));
        for _ in 3..LATENCY_WINDOW {
            l.record(ms(30));
        }
        assert_eq!(l.estimate(), Some(ms(2)), "the window just closed");
        // The path got longer: after one more whole window, the old minimum is gone.
        for _ in 0..LATENCY_WINDOW {
            l.record(ms(50));
        }
        assert_eq!(l.estimate(), Some(ms(50)));
        // Nothing asked for a while: nothing known (over mirrors, an idle source must not
        // decide for the others), until the next answer.
        let later = std::time::Instant::now() + LATENCY_MAX_AGE + ms(1);
        assert_eq!(l.estimate_at(later), None);
        l.record_at(ms(3), later);
        assert_eq!(l.estimate_at(later), Some(ms(3)), "a fresh start");
    }

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
            "blob_redirects",
            "redirect_reuses",
            "redirect_failures",
            "pull_limited",
            "rate_limited",
            "requests_in_flight",
            "max_requests_in_flight",
        ];
        let mut keys_sorted = keys.clone();
        keys_sorted.sort();
        want.sort();
        assert_eq!(keys_sorted, want);
        assert_eq!(v["blob_gets"], 1);
        assert_eq!(v["upload_bytes"], 7);
        let mut sum = s.snapshot();
        sum.add(&s.snapshot());
        assert_eq!((sum.blob_gets, sum.upload_bytes), (2, 14));
    }

    #[test]
    fn rate_limit_headers_parse_and_cap() {
        let h = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
        };
        assert_eq!(RateLimit::from_headers(h(&[("x", "1")])), None);
        let r = RateLimit::from_headers(h(&[
            ("ratelimit-limit", "100;w=21600"),
            ("ratelimit-remaining", "0;w=21600"),
            ("docker-ratelimit-source", "192.0.2.1"),
        ]))
        .unwrap();
        assert_eq!(r.limit.as_deref(), Some("100;w=21600"));
        assert_eq!(r.remaining_count, Some(0));
        assert!(r.exhausted());
        let r = RateLimit::from_headers(h(&[("ratelimit-remaining", "twenty")])).unwrap();
        assert!(!r.exhausted() && r.remaining_count.is_none());
        let long: &'static str = Box::leak("é".repeat(100).into_boxed_str());
        let pairs: &'static [(&str, &str)] = Box::leak(Box::new([("ratelimit-limit", long)]));
        let r = RateLimit::from_headers(h(pairs)).unwrap();
        assert!(r.limit.unwrap().len() <= RATE_LIMIT_VALUE_CAP);
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
