//! The registry as the filesystem core sees it: a trait with a real HTTP implementation
//! ([`http::HttpRegistry`]), and for tests an in-memory fake (`fake::FakeRegistry`) and a wrapper
//! that injects failures into any registry (`faulty::FaultyRegistry`). The test-only two are
//! compiled under `cfg(test)` or the `fake` feature, so they are not in the release binary.
//!
//! Every implementation counts the requests it serves in [`RequestStats`], so tests can assert
//! laziness ("reading 4 KiB made one Range request") instead of timing anything.

pub mod auth;
pub mod credentials;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
#[cfg(any(test, feature = "fake"))]
pub mod faulty;
pub mod http;
pub mod mirror;
mod stats;

pub use stats::{InFlight, RateLimit, RequestStats, StatsSnapshot};

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{RegistryError, RegistryResult};

/// A manifest as served: its exact bytes, digest and media type.
#[derive(Debug, Clone)]
pub struct ManifestBlob {
    pub digest: String,
    pub media_type: String,
    pub body: Bytes,
}

/// What a manifest HEAD tells: enough to describe a tag without downloading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestHead {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

/// The operations the filesystem needs from a registry.
/// Where [`Registry::blob_range_into`] hands each piece of a body; `Break` stops the body.
pub type Sink<'a> = dyn FnMut(Bytes) -> std::ops::ControlFlow<()> + Send + 'a;

#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Every repository name, all pages. `Err(NotFound|Unauthorized|Denied)` means the registry does
    /// not offer a catalog to us.
    async fn catalog(&self) -> RegistryResult<Vec<String>>;
    /// Every tag of `repo`, all pages, sorted.
    async fn tags(&self, repo: &str) -> RegistryResult<Vec<String>>;
    /// Every tag of `repo`, sorted, if they fit in the first page of `tags/list` (one request),
    /// else None: for guesses that must not walk 100,000 pages (walk-ahead). Registries
    /// without pages answer with [`Registry::tags`].
    async fn tags_if_few(&self, repo: &str) -> RegistryResult<Option<Vec<String>>> {
        self.tags(repo).await.map(Some)
    }
    /// GET a manifest by tag or digest, verified against its digest.
    async fn manifest(&self, repo: &str, reference: &str) -> RegistryResult<ManifestBlob>;
    /// HEAD a manifest by tag or digest.
    async fn manifest_head(&self, repo: &str, reference: &str) -> RegistryResult<ManifestHead>;
    /// HEAD a blob: its size.
    async fn blob_size(&self, repo: &str, digest: &str) -> RegistryResult<u64>;
    /// Bytes `start..=end` of a blob (a closed Range). The answer has exactly that many bytes, or
    /// is an error.
    async fn blob_range(
        &self,
        repo: &str,
        digest: &str,
        start: u64,
        end: u64,
    ) -> RegistryResult<Bytes>;
    /// Bytes `start..=end` of a blob, handed to `sink` in order as they arrive (so a reader can
    /// use the first bytes before the last ones came). Ok once exactly that many bytes were
    /// delivered, or as soon as `sink` says `Break` (it wants nothing more: the body is dropped
    /// unread). The default fetches the whole range with [`Registry::blob_range`] first.
    async fn blob_range_into(
        &self,
        repo: &str,
        digest: &str,
        start: u64,
        end: u64,
        sink: &mut Sink<'_>,
    ) -> RegistryResult<()> {
        let data = self.blob_range(repo, digest, start, end).await?;
        if Some(data.len() as u64) != end.checked_sub(start).map(|n| n + 1) {
            return Err(RegistryError::Protocol(format!(
                "{repo}@{digest}: asked for bytes {start}-{end}, got {} bytes",
                data.len()
            )));
        }
        let _ = sink(data);
        Ok(())
    }
    /// PUT a manifest under `reference` (tag or digest). Returns its digest.
    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> RegistryResult<String>;
    /// Open a blob upload session (POST). Nothing is sent yet.
    async fn upload_start(&self, repo: &str) -> RegistryResult<UploadSession>;
    /// Send the next chunk (PATCH with `Content-Range`). The registry's `Range` answer is checked,
    /// and the session moves to the `Location` it returned.
    async fn upload_patch(
        &self,
        repo: &str,
        session: &mut UploadSession,
        data: Bytes,
    ) -> RegistryResult<()>;
    /// Close the session (PUT `?digest=`), with `last` as the final bytes (may be empty).
    async fn upload_finish(
        &self,
        repo: &str,
        session: UploadSession,
        digest: &str,
        last: Bytes,
    ) -> RegistryResult<()>;
    /// Cancel a session (DELETE). Best effort: errors are logged, not returned.
    async fn upload_cancel(&self, repo: &str, session: UploadSession);
    /// Mount `digest` from repository `from` into `repo`. Ok(true) = mounted (201); Ok(false) =
    /// the registry could not (202; the session it opened is cancelled).
    async fn mount_blob(&self, repo: &str, digest: &str, from: &str) -> RegistryResult<bool>;
    /// DELETE a manifest by digest (distribution also removes every tag pointing at it).
    async fn delete_manifest(&self, repo: &str, digest: &str) -> RegistryResult<()>;
    /// DELETE a blob by digest.
    async fn delete_blob(&self, repo: &str, digest: &str) -> RegistryResult<()>;
    /// The request counters.
    fn stats(&self) -> &RequestStats;
    /// A copy of the counters; over several sources (mirrors), their sum.
    fn snapshot(&self) -> StatsSnapshot {
        self.stats().snapshot()
    }
    /// The rate-limit headers last seen (of the registry itself, over mirrors).
    fn rate_limit(&self) -> Option<RateLimit> {
        self.stats().last_rate_limit()
    }
    /// Per source (each mirror, then the registry) counters; empty without mirrors.
    fn sources(&self) -> Vec<mirror::SourceStats> {
        Vec::new()
    }
    /// How soon blob bodies start to arrive lately ([`stats::MinLatency`]); None before the
    /// first blob GET (or when the implementation cannot tell).
    fn blob_latency(&self) -> Option<std::time::Duration> {
        self.stats().blob_latency()
    }
}

/// An open blob upload: where the next request goes, and how much the registry has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSession {
    /// Absolute URL of the latest `Location` (for the fake: an opaque id).
    pub location: String,
    /// Bytes the registry has acknowledged.
    pub offset: u64,
    /// `OCI-Chunk-Min-Length`, when the registry sent one.
    pub min_chunk: Option<u64>,
}

/// Push a whole blob in one request pair (POST, then PUT `?digest=` with the bytes); returns its
/// digest. For seeding test registries and examples; counted as one push, as well as the upload
/// requests it makes.
pub async fn push_whole_blob(
    reg: &dyn Registry,
    repo: &str,
    data: Bytes,
) -> RegistryResult<String> {
    RequestStats::inc(&reg.stats().pushes);
    let digest = crate::digest::sha256_digest(&data);
    let session = reg.upload_start(repo).await?;
    reg.upload_finish(repo, session, &digest, data).await?;
    Ok(digest)
}

/// How a tag is resolved to its manifest digest (`--tag-resolution`).
///
/// A GET of the manifest by tag answers with the body and its digest (`Docker-Content-Digest`,
/// checked against the body; the body's sha256 when the header is missing) in one round trip, and
/// the tag's `manifest.json`, `config.json` and `layers/` need that body next anyway. A HEAD
/// answers the digest alone, so the body costs a second round trip. GET is therefore the better
/// choice everywhere except where a GET is billed: Docker Hub counts every manifest GET as a pull
/// against its rate limit (100 or 200 per 6 hours), and a HEAD not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TagResolution {
    /// GET, except HEAD first on hosts where a GET counts as a pull ([`get_counts_as_pull`]).
    #[default]
    Auto,
    /// Always HEAD first, then GET the manifest by digest when it is needed.
    Head,
    /// Always GET by tag: one round trip.
    Get,
}

impl std::str::FromStr for TagResolution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(TagResolution::Auto),
            "head" => Ok(TagResolution::Head),
            "get" => Ok(TagResolution::Get),
            other => Err(format!("{other:?}: expected auto, head or get")),
        }
    }
}

impl TagResolution {
    /// Does resolving a tag on `host` (the registry's host name, without port) GET the manifest
    /// by tag (true) or HEAD it first (false)?
    pub fn uses_get(self, host: &str) -> bool {
        match self {
            TagResolution::Get => true,
            TagResolution::Head => false,
            TagResolution::Auto => !get_counts_as_pull(host),
        }
    }
}

/// Does a manifest GET count as a pull on `host`? Docker Hub (`docker.io`, `index.docker.io`,
/// `registry-1.docker.io`: any `*.docker.io`) counts every GET against the pull rate limit, and
/// HEADs not at all. Other registries are not known to bill GETs.
pub fn get_counts_as_pull(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "docker.io" || host.ends_with(".docker.io")
}

/// Is `name` a valid repository name (distribution-spec grammar)? Checked before any request,
/// because some registries answer odd names with 500 instead of 404.
pub fn is_valid_repo_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.split('/').all(is_valid_component)
}

/// One path component of a repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn is_valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__", or one or more "-".
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Is `tag` a valid tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`?
pub fn is_valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_tags() {
        for ok in [
            "debian",
            "debian/min",
            "a.b",
            "a_b",
            "a__b",
            "a---b",
            "x1/y2/z3",
        ] {
            assert!(is_valid_repo_name(ok), "{ok}");
        }
        for bad in [
            "", "Debian", "a/", "/a", "a//b", "-a", "a.", "a..b", "a___b", "a.-b",
        ] {
            assert!(!is_valid_repo_name(bad), "{bad}");
        }
        assert!(is_valid_tag("bookworm"));
        assert!(is_valid_tag("_x.Y-1"));
        assert!(!is_valid_tag(".hidden"));
        assert!(!is_valid_tag(&"a".repeat(129)));
    }

    #[test]
    fn docker_hub_keeps_head_first_and_others_get() {
        for hub in [
            "registry-1.docker.io",
            "index.docker.io",
            "docker.io",
            "Registry-1.Docker.IO.",
        ] {
            assert!(get_counts_as_pull(hub), "{hub}");
            assert!(!TagResolution::Auto.uses_get(hub), "{hub}");
            assert!(TagResolution::Get.uses_get(hub), "an explicit get wins");
        }
        for other in [
            "127.0.0.1",
            "ghcr.io",
            "localhost",
            "notdocker.io",
            "quay.io",
        ] {
            assert!(!get_counts_as_pull(other), "{other}");
            assert!(TagResolution::Auto.uses_get(other), "{other}");
            assert!(
                !TagResolution::Head.uses_get(other),
                "an explicit head wins"
            );
        }
        assert_eq!("auto".parse(), Ok(TagResolution::Auto));
        assert_eq!("head".parse(), Ok(TagResolution::Head));
        assert_eq!("get".parse(), Ok(TagResolution::Get));
        assert!("GET".parse::<TagResolution>().is_err());
    }
}
