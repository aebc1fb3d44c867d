//! Where a blob's bytes were last found: the other-origin URL a registry redirected a blob GET to
//! (an S3, GCS or CDN link, as Docker Hub, GHCR, ECR and distribution's storage drivers send),
//! remembered per repository and digest for a short while, so the next Range request of that blob
//! goes straight there: one round trip instead of two (the registry's 307, then the storage's
//! answer). A remembered URL is used without credentials (it is another origin), only within
//! `--redirect-ttl` ([`REDIRECT_TTL`] by default), and forgotten at its first failure, after
//! which the registry is asked again. The bytes are verified as any others: a link that serves
//! something else is caught by the blob's digest.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;
use reqwest::Url;

/// How long a blob's redirect target is used without asking the registry again. 60 s:
/// presigned links live longer (distribution's S3, GCS and Azure drivers sign for 20 minutes,
/// CloudFront's middleware by default too), and stargz-snapshotter refreshes its blob URLs after
/// the same 60 s; short enough that access revoked at the registry stops being served by a link
/// within a minute. Each refresh costs one round trip per blob per minute of reading.
pub const REDIRECT_TTL: Duration = Duration::from_secs(60);

/// How long a remembered target may take to start its answer before the registry is asked
/// instead. 5 s: storage and CDNs answer within a round trip or two (well under a second from
/// anywhere), so a link that has not answered in 5 s is stuck, and asking the registry for a
/// fresh one costs far less than `--request-timeout` (60 s) of waiting.
pub const REMEMBERED_LINK_WAIT: Duration = Duration::from_secs(5);

/// Blobs whose redirect target is remembered at once (least recently used go first). 256
/// entries of at most [`URL_CAP`] bytes: at most 2 MiB, and far more blobs than one minute of
/// reading touches.
pub const REDIRECT_ENTRIES: usize = 256;

/// A redirect target longer than this is followed but not remembered (real presigned links are
/// well under 2 KiB; a hostile registry must not grow the table).
pub const URL_CAP: usize = 8 << 10;

/// Remembered redirect targets of blob GETs, by (repository, digest). A leaf lock: taken alone,
/// never across an `.await`.
pub struct Redirects {
    ttl: Duration,
    table: Mutex<LruCache<(String, String), (Url, Instant)>>,
}

impl Redirects {
    /// A table whose entries live `ttl` (zero: nothing is remembered).
    pub fn new(ttl: Duration) -> Self {
        Redirects {
            ttl,
            table: Mutex::new(LruCache::new(
                NonZeroUsize::new(REDIRECT_ENTRIES).expect("non-zero"),
            )),
        }
    }

    /// The blob's redirect target, if one was remembered within the TTL.
    pub fn get(&self, repo: &str, digest: &str) -> Option<Url> {
        self.get_at(repo, digest, Instant::now())
    }

    /// [`Self::get`] as of `now`.
    fn get_at(&self, repo: &str, digest: &str, now: Instant) -> Option<Url> {
        let mut t = crate::sync::lock(&self.table);
        let key = (repo.to_string(), digest.to_string());
        match t.get(&key) {
            Some((url, at)) if now.saturating_duration_since(*at) < self.ttl => Some(url.clone()),
            Some(_) => {
                t.pop(&key);
                None
            }
            None => None,
        }
    }

    /// Remember where the registry sent a GET of the blob.
    pub fn put(&self, repo: &str, digest: &str, url: &Url) {
        if self.ttl.is_zero() || url.as_str().len() > URL_CAP {
            return;
        }
        crate::sync::lock(&self.table).put(
            (repo.to_string(), digest.to_string()),
            (url.clone(), Instant::now()),
        );
    }

    /// Forget the blob's target (it failed: expired, refused, gone, unreachable, cut or wrong);
    /// whether there was one.
    pub fn forget(&self, repo: &str, digest: &str) -> bool {
        crate::sync::lock(&self.table)
            .pop(&(repo.to_string(), digest.to_string()))
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn targets_are_kept_per_repository_and_digest_within_the_ttl() {
        let r = Redirects::new(Duration::from_secs(60));
        r.put("a", "sha256:1", &url("http://cdn/x?sig=1"));
        assert_eq!(r.get("a", "sha256:1"), Some(url("http://cdn/x?sig=1")));
        // Another repository's copy of the same digest asks its own registry path.
        assert_eq!(r.get("b", "sha256:1"), None);
        assert!(r.forget("a", "sha256:1"));
        assert!(!r.forget("a", "sha256:1"));
        assert_eq!(r.get("a", "sha256:1"), None);
    }

    #[test]
    fn expired_long_or_disabled_targets_are_not_used() {
        let r = Redirects::new(Duration::from_secs(60));
        r.put("a", "d", &url("http://cdn/x"));
        let later = Instant::now() + Duration::from_secs(59);
        assert!(r.get_at("a", "d", later).is_some());
        let expired = Instant::now() + Duration::from_secs(60);
        assert_eq!(r.get_at("a", "d", expired), None);
        assert_eq!(r.get("a", "d"), None, "an expired target is dropped");
        let long = format!("http://cdn/{}", "x".repeat(URL_CAP));
        let r = Redirects::new(Duration::from_secs(60));
        r.put("a", "d", &url(&long));
        assert_eq!(r.get("a", "d"), None);
        let off = Redirects::new(Duration::ZERO);
        off.put("a", "d", &url("http://cdn/x"));
        assert_eq!(off.get("a", "d"), None);
    }

    #[test]
    fn the_table_is_bounded() {
        let r = Redirects::new(Duration::from_secs(60));
        for i in 0..REDIRECT_ENTRIES + 10 {
            r.put("a", &format!("d{i}"), &url("http://cdn/x"));
        }
        assert_eq!(crate::sync::lock(&r.table).len(), REDIRECT_ENTRIES);
        assert_eq!(r.get("a", "d0"), None);
        assert!(r.get("a", &format!("d{}", REDIRECT_ENTRIES + 9)).is_some());
    }
}
