//! Directory times: tag, platform and layer directories (`tags/<tag>/`, `<os>-<arch>/`,
//! `layers/`, `layers/NN-<hex12>/`, `rootfs/`) show when their image was made: the config's
//! `created`, else the manifest's `org.opencontainers.image.created` annotation, else the mount
//! time. Never the epoch.
//!
//! Both come from the network, so they are parsed strictly (RFC 3339 only, every field range
//! checked, no arithmetic that can overflow), and a time before 1970-01-02 counts as none:
//! reproducible builds write the epoch (or one second after it) as a placeholder, not as a time.
//! Times are content addressed (by manifest or config digest), so each is worked out once and
//! kept in `meta`; a fetch that fails leaves nothing recorded, and the mount time is shown until a
//! later lookup succeeds. Where a manifest GET counts as a pull (Docker Hub, HEAD resolution), no
//! manifest is fetched for a time: a tag directory shows the mount time until its manifest has
//! been read for its contents. Config blobs are fetched either way (blob GETs are not pulls).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::blob::BlobRef;
use crate::digest::Digest;
use crate::error::{FsError, FsResult};
use crate::fs::node::{Node, TreeDir, View};
use crate::fs::Fs;
use crate::manifest::Parsed;

/// The manifest annotation that says when the image was made.
pub(crate) const CREATED_ANNOTATION: &str = "org.opencontainers.image.created";
/// The largest config read for its time alone. Real configs are KiB (a long history makes
/// some hundreds of KiB); 4 MiB, distribution's manifest limit, is one default chunk and keeps
/// the listing's concurrent reads ([`super::repository::TAG_CONCURRENCY`] of them) to 32 MiB
/// even against a registry that serves huge configs. A larger config shows the annotation or
/// the mount time.
const CONFIG_TIME_CAP: u64 = 4 << 20;
/// Config media types that carry `created` (an empty one is read too: Docker schema 2 configs
/// are sometimes described without one). Other artifacts' configs are not fetched for a time.
const IMAGE_CONFIGS: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
    "",
];
/// Times before this (1970-01-02) are placeholders, not times.
const EARLIEST: u64 = 86_400;

#[derive(Deserialize)]
struct Annotated {
    #[serde(default)]
    annotations: Option<HashMap<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct Created {
    #[serde(default)]
    created: Option<serde_json::Value>,
}

/// The `org.opencontainers.image.created` annotation of a manifest body, if usable.
pub(crate) fn annotation_time(manifest: &[u8]) -> Option<SystemTime> {
    let a: Annotated = serde_json::from_slice(manifest).ok()?;
    parse_rfc3339(a.annotations?.get(CREATED_ANNOTATION)?.as_str()?)
}

/// The `created` field of an image config body, if usable.
pub(crate) fn config_time(config: &[u8]) -> Option<SystemTime> {
    let c: Created = serde_json::from_slice(config).ok()?;
    parse_rfc3339(c.created?.as_str()?)
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)` (RFC 3339; `t` and `z` accepted too, a
/// leap second read as :59, fraction digits past nanoseconds ignored). Anything else, an
/// impossible date, or a time before 1970-01-02 is None.
pub(crate) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    // A fraction longer than this is not a time anyone wrote.
    if b.len() < 20 || b.len() > 64 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let d = b.get(r)?;
        d.iter()
            .all(u8::is_ascii_digit)
            .then(|| d.iter().fold(0u32, |n, &c| n * 10 + u32::from(c - b'0')))
    };
    let at = |i: usize, set: &[u8]| b.get(i).is_some_and(|c| set.contains(c));
    if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt") && at(13, b":") && at(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0u32;
    if at(i, b".") {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 9 {
                nanos = nanos * 10 + u32::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..9 {
            nanos *= 10;
        }
    }
    let offset: i64 = if at(i, b"Zz") && b.len() == i + 1 {
        0
    } else if at(i, b"+-") && b.len() == i + 6 && at(i + 3, b":") {
        let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
        if oh > 23 || om > 59 {
            return None;
        }
        let o = i64::from(oh * 3600 + om * 60);
        if b[i] == b'-' {
            -o
        } else {
            o
        }
    } else {
        return None;
    };
    let secs = days_from_civil(i64::from(year), month, day) * 86_400
        + i64::from(hour * 3600 + minute * 60 + second.min(59))
        - offset;
    let secs = u64::try_from(secs).ok().filter(|&s| s >= EARLIEST)?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
/// Years are 0..=9999 here, so nothing overflows.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Fs {
    /// The time shown by a directory that shows an image (None for other nodes): what
    /// [`Fs::settle_time`] found, else the mount time. No network.
    pub(in crate::fs) fn dir_time(&self, node: &Node) -> Option<SystemTime> {
        let known = match node {
            Node::Image { digest, .. } | Node::Layers { digest, .. } => {
                self.meta.known_time(digest)
            }
            Node::TreeDir(d) if d.path.is_empty() => match &d.view {
                View::Rootfs { image } => self.meta.known_time(image),
                // A layer's tree knows its image's config, not its manifest.
                View::Layer(l) => l.config.as_ref().and_then(|(c, _)| self.meta.known_time(c)),
            },
            _ => return None,
        };
        Some(known.flatten().unwrap_or(self.mount_time))
    }

    /// Work out the time of the image a node shows, once, before its attributes are given
    /// (the manifest, and the config through the blob path: both are what the kernel asks for
    /// next, so they are ready when it does). A failure is logged and leaves the mount time.
    pub(super) async fn settle_time(&self, node: &Node) {
        let outcome = match node {
            Node::Image { repo, digest, .. } | Node::Layers { repo, digest } => {
                self.image_time(repo, digest).await
            }
            Node::TreeDir(TreeDir {
                repo, view, path, ..
            }) if path.is_empty() => match view {
                View::Rootfs { image } => self.image_time(repo, image).await,
                View::Layer(l) => match &l.config {
                    Some((digest, size)) => self.config_created(repo, digest, *size, "").await,
                    None => Ok(None),
                },
            },
            _ => Ok(None),
        };
        if let Err(e) = outcome {
            log::debug!("no image time yet, showing the mount time: {e}");
        }
    }

    /// The time of the image manifest (or index) `digest`: its config's `created` (for an
    /// index, the `--platform` entry's), else its annotation. Recorded once found. Where a
    /// manifest GET counts as a pull, only manifests already in memory are used: until they
    /// are, nothing is recorded and the mount time shows.
    async fn image_time(&self, repo: &str, digest: &Digest) -> FsResult<Option<SystemTime>> {
        if let Some(t) = self.meta.known_time(digest) {
            return Ok(t);
        }
        if !self.meta.manifest_gets_are_free() && !self.manifests_in_memory(repo, digest).await? {
            return Ok(None);
        }
        let m = self.meta.manifest(repo, digest).await?;
        let created = match self.meta.image_view(repo, digest).await? {
            Some(v) => {
                let c = Digest::from(&v.config.digest);
                self.config_created(repo, &c, v.config.size, &v.config.media_type)
                    .await?
            }
            None => None,
        };
        let t = created.or_else(|| annotation_time(&m.blob.body));
        self.meta.set_time(digest.clone(), t);
        Ok(t)
    }

    /// Are the manifests the time of `digest` needs (itself, and for an index the
    /// `--platform` entry) in memory? No request.
    async fn manifests_in_memory(&self, repo: &str, digest: &Digest) -> FsResult<bool> {
        if !self.meta.has_manifest(digest) {
            return Ok(false);
        }
        // In memory: this makes no request.
        let m = self.meta.manifest(repo, digest).await?;
        Ok(match &m.parsed {
            Parsed::Index { manifests } => self
                .meta
                .pick_platform(manifests)
                .is_none_or(|d| self.meta.has_manifest(&Digest::from(&d.digest))),
            Parsed::Image { .. } => true,
        })
    }

    /// A config's `created` (read through the blob path, so it is cached for `config.json` and
    /// for the layer indexes). Recorded once read, also when it has none.
    async fn config_created(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        media_type: &str,
    ) -> FsResult<Option<SystemTime>> {
        if let Some(t) = self.meta.known_time(digest) {
            return Ok(t);
        }
        let t = if size == 0 || size > CONFIG_TIME_CAP || !IMAGE_CONFIGS.contains(&media_type) {
            None
        } else {
            let blob = BlobRef {
                repo: repo.to_string(),
                digest: digest.clone(),
                size,
            };
            let body = self
                .blobs
                .read_whole(&blob, CONFIG_TIME_CAP)
                .await
                .map_err(|e| FsError::registry(e, format!("config {repo}@{digest}")))?;
            config_time(&body)
        };
        self.meta.set_time(digest.clone(), t);
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(t: Option<SystemTime>) -> Option<(u64, u32)> {
        t.map(|t| {
            let d = t.duration_since(UNIX_EPOCH).unwrap();
            (d.as_secs(), d.subsec_nanos())
        })
    }

    #[test]
    fn rfc3339_strict() {
        let p = |s: &str| secs(parse_rfc3339(s));
        assert_eq!(p("2023-10-10T12:34:56Z"), Some((1_696_941_296, 0)));
        assert_eq!(p("2023-10-10t12:34:56z"), Some((1_696_941_296, 0)));
        assert_eq!(
            p("2023-10-10T12:34:56.123456789Z"),
            Some((1_696_941_296, 123_456_789))
        );
        assert_eq!(
            p("2023-10-10T12:34:56.5Z"),
            Some((1_696_941_296, 500_000_000))
        );
        assert_eq!(
            p("2023-10-10T12:34:56.1234567891234Z"),
            Some((1_696_941_296, 123_456_789)),
            "digits past nanoseconds are dropped"
        );
        assert_eq!(p("2023-10-10T14:34:56+02:00"), Some((1_696_941_296, 0)));
        assert_eq!(p("2023-10-10T05:04:56-07:30"), Some((1_696_941_296, 0)));
        assert_eq!(p("2024-02-29T00:00:00Z"), Some((1_709_164_800, 0)));
        assert_eq!(p("2016-12-31T23:59:60Z"), Some((1_483_228_799, 0)));
        assert_eq!(p("9999-12-31T23:59:59Z"), Some((253_402_300_799, 0)));
        for bad in [
            "",
            "2023-10-10",
            "2023-10-10T12:34:56",
            "2023-10-10 12:34:56Z",
            "2023-13-10T12:34:56Z",
            "2023-00-10T12:34:56Z",
            "2023-02-29T12:34:56Z",
            "2023-04-31T12:34:56Z",
            "2023-10-10T24:00:00Z",
            "2023-10-10T12:60:00Z",
            "2023-10-10T12:34:61Z",
            "2023-10-10T12:34:56.Z",
            "2023-10-10T12:34:56+0200",
            "2023-10-10T12:34:56+24:00",
            "2023-10-10T12:34:56Zjunk",
            "+2023-10-10T12:34:56Z",
            "２023-10-10T12:34:56Z",
            "-001-10-10T12:34:56Z",
            "0001-01-01T00:00:00Z",
            "1970-01-01T00:00:00Z",
            "1970-01-01T00:00:01Z",
            "1970-01-02T00:00:00+00:01",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
        assert_eq!(p("1970-01-02T00:00:00Z"), Some((86_400, 0)));
        let long = format!("2023-10-10T12:34:56.{}Z", "1".repeat(100));
        assert_eq!(p(&long), None, "absurdly long");
    }

    #[test]
    fn times_from_documents() {
        let m = br#"{"annotations":{"org.opencontainers.image.created":"2021-01-01T00:00:00Z"}}"#;
        assert_eq!(secs(annotation_time(m)), Some((1_609_459_200, 0)));
        for bad in [
            &br#"{"annotations":{"org.opencontainers.image.created":12}}"#[..],
            br#"{"annotations":null}"#,
            br#"{"annotations":{"x":"2021-01-01T00:00:00Z"}}"#,
            br#"not json"#,
            br#"[]"#,
        ] {
            assert_eq!(annotation_time(bad), None);
        }
        let c = br#"{"architecture":"amd64","created":"2022-02-02T02:02:02.5Z","rootfs":{}}"#;
        assert_eq!(secs(config_time(c)), Some((1_643_767_322, 500_000_000)));
        assert_eq!(config_time(br#"{"created":null}"#), None);
        assert_eq!(
            config_time(br#"{"created":["2022-02-02T02:02:02Z"]}"#),
            None
        );
        assert_eq!(config_time(br#"{"created":"yesterday"}"#), None);
        assert_eq!(config_time(b"\xff"), None);
    }
}
