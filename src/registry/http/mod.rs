//! The real registry client: Distribution API v2 over reqwest.
//!
//! One `send` path handles auth for every request: it attaches the cached token (or Basic
//! credentials) to the registry's own origin only, and on a 401 it reads the challenge, fetches a
//! token for the challenged scope and retries once. Idempotent requests retry transient failures
//! within a per-operation budget (`--retry-budget`). Blob reads are closed `Range` requests with
//! `Accept-Encoding: identity`; a 200 answer with the whole body is tolerated, and a body cut
//! short is resumed with a `Range` from the byte where it stopped. A failed PATCH resumes from the
//! registry's upload status. Every body is read under a cap.
//!
//! This file holds the client and its [`Registry`] implementation; the request path (auth, retries,
//! error bodies) is in `transport`, `Link` pagination in `paging`, and argument checks and header
//! reading in `wire`, and the redirect targets of blob GETs, remembered briefly, in `redirects`.

mod date;
mod paging;
mod redirects;
mod resume;
mod transport;
mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, ACCEPT_ENCODING};
use reqwest::{Method, StatusCode, Url};

use super::auth::{Credentials, Scheme, TokenCache};
use super::{ManifestBlob, ManifestHead, Registry, RequestStats, UploadSession};
use crate::digest::{is_sha256_digest, sha256_digest, verify};
use crate::error::{RegistryError, RegistryResult};
use crate::manifest::{sniff_media_type, MANIFEST_ACCEPT};
pub use paging::next_link;
use paging::PAGE_SIZE;
use redirects::Redirects;
pub use redirects::{REDIRECT_ENTRIES, REDIRECT_TTL, REMEMBERED_LINK_WAIT};
use transport::{error_body, error_from, repo_scope, Budget, Req};
pub use wire::is_loopback_host;
use wire::{check_digest, check_reference, check_repo, content_type, header_str, resolve_location};

/// Options for building an [`HttpRegistry`].
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// `http://host:port` or `https://host:port`, without a path.
    pub base: Url,
    pub credentials: Option<Credentials>,
    /// Extra root certificate (PEM) to trust.
    pub ca_cert_pem: Option<Vec<u8>>,
    /// Skip TLS verification.
    pub insecure: bool,
    /// Timeout for connecting.
    pub connect_timeout: Duration,
    /// Timeout for one whole request (headers and body).
    pub request_timeout: Duration,
    /// How long a blob's redirect target is used before the registry is asked again
    /// (`--redirect-ttl`; [`REDIRECT_TTL`] by default; zero: every blob GET asks the registry).
    pub redirect_ttl: Duration,
}

/// How long one operation (a chunk read, a manifest GET, a PATCH) may keep retrying a flaky
/// registry. 30 s: a registry restart or a load balancer shuffling takes seconds, and a FUSE
/// caller blocked longer than half a minute is better told EIO than kept waiting; it is also
/// below the 60 s request timeout, so a dead registry is reported before a hung one would be.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(30);
/// Cap on a manifest or index body: distribution's own limit (4 MiB).
pub const MANIFEST_BODY_CAP: usize = 4 << 20;
/// Cap on one page of `_catalog` or `tags/list`. We ask for 100 names a page, but a registry may
/// ignore `n` and send every tag at once: 16 MiB holds about 100,000 long tags.
pub const LIST_BODY_CAP: usize = 16 << 20;

/// A Distribution v2 client.
pub struct HttpRegistry {
    base: Url,
    client: reqwest::Client,
    credentials: Option<Credentials>,
    scheme: Mutex<Scheme>,
    tokens: Mutex<TokenCache>,
    /// One token fetch per scope at a time (see `transport::TokenGate`).
    token_gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    stats: RequestStats,
    retry_budget: Duration,
    /// Where blob GETs were redirected lately (see `redirects`).
    redirects: Redirects,
    /// `--request-timeout`: the limit of a request without a body to speak of (see
    /// [`transfer_timeout`]).
    request_timeout: Duration,
}

/// The slowest upload regfs waits for: a request that sends N bytes (a PATCH, a closing PUT)
/// may take `--request-timeout` plus N at this rate. 64 KiB/s (512 kbit/s, below most uplinks):
/// an 8 MiB PATCH gets 60 + 128 s, so a slow uplink finishes its PATCHes instead of having each
/// cut at 60 s (and the push fail), while a registry that stops reading is still given up on.
pub const MIN_TRANSFER_RATE: u64 = 64 << 10;

/// The slowest blob read that counts as progress: a try whose bytes came at this rate or more
/// before it failed renews the retry budget. 8 KiB/s (64 kbit/s): four parallel requests on a
/// 256 kbit/s link still stream, while a registry that trickles a few bytes per try, or stalls
/// between them, spends its budget and the read fails (EIO) instead of lasting for days.
pub const MIN_PROGRESS_RATE: u64 = 8 << 10;

/// Did a try that moved `bytes` in `took` make progress (see [`MIN_PROGRESS_RATE`])?
pub fn progressed(bytes: u64, took: Duration) -> bool {
    bytes > 0 && bytes as f64 >= MIN_PROGRESS_RATE as f64 * took.as_secs_f64()
}

/// The whole-request limit for a request that sends `bytes` (see [`MIN_TRANSFER_RATE`]).
pub fn transfer_timeout(base: Duration, bytes: u64) -> Duration {
    base.saturating_add(Duration::from_secs(bytes / MIN_TRANSFER_RATE))
}

impl std::fmt::Debug for HttpRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRegistry")
            .field("base", &self.base.as_str())
            .field("credentials", &self.credentials)
            .finish()
    }
}

impl HttpRegistry {
    pub fn new(opts: HttpOptions) -> RegistryResult<Self> {
        let mut default_headers = HeaderMap::new();
        // Registries may gzip a blob on request, which breaks sizes, ranges and digests.
        default_headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        let mut b = reqwest::Client::builder()
            .default_headers(default_headers)
            .user_agent(concat!("regfs/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(opts.connect_timeout)
            .timeout(opts.request_timeout)
            // Redirects are followed by `send`, which attaches credentials only to the
            // registry's own scheme://host:port.
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(16)
            // HTTP/1.1 only, never h2 (the crate is built without it): over TLS, h2 (which
            // Docker Hub, GHCR and CDNs offer) would carry every parallel Range request in one
            // TCP connection, so the engine's parallel requests would share one window and its
            // flow control. Measured at 50 ms
            // RTT (4 MiB per-connection window, docker-registry over TLS): a cold 256 MiB read
            // took 4.34 s over h2 (59 MiB/s, slower than curl's one stream, 3.42 s) and 1.75 s
            // over HTTP/1.1 (147 MiB/s); `ls tags/*/` of 10 x 4 tags 1.98 s over h2, 1.89 s here.
            .http1_only();
        if let Some(pem) = &opts.ca_cert_pem {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| RegistryError::Invalid(format!("--ca-cert: {e}")))?;
            b = b.add_root_certificate(cert);
        }
        if opts.insecure {
            b = b.danger_accept_invalid_certs(true);
        }
        let client = b
            .build()
            .map_err(|e| RegistryError::Transport(format!("building HTTP client: {e}")))?;
        // A password in the registry URL is refused by the CLI; never send or log one anyway.
        let mut base = opts.base;
        let _ = base.set_username("");
        let _ = base.set_password(None);
        Ok(HttpRegistry {
            base,
            client,
            credentials: opts.credentials,
            scheme: Mutex::new(Scheme::None),
            tokens: Mutex::new(TokenCache::default()),
            token_gates: Mutex::new(HashMap::new()),
            stats: RequestStats::default(),
            // Until `with_retry_budget` says otherwise; the reason is at the constant.
            retry_budget: DEFAULT_RETRY_BUDGET,
            redirects: Redirects::new(opts.redirect_ttl),
            request_timeout: opts.request_timeout,
        })
    }

    /// Set how long one operation may keep retrying (`--retry-budget`); zero means one try.
    pub fn with_retry_budget(mut self, budget: Duration) -> Self {
        self.retry_budget = budget;
        self
    }

    fn url(&self, path: &str) -> Url {
        self.base.join(path).expect("registry paths are valid URLs")
    }

    /// `GET /v2/`: is this a registry, and can we talk to it? Tried once, without retries.
    pub async fn ping(&self) -> RegistryResult<()> {
        let req = Req {
            method: Method::GET,
            url: self.url("/v2/"),
            headers: HeaderMap::new(),
            body: None,
            scope: String::new(),
            what: "GET /v2/".into(),
        };
        // One try: a wrong address, port or certificate at mount time fails at once instead of
        // after the retry budget.
        let resp = self.send_in(&req, &mut Budget::new(Duration::ZERO)).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = error_body(resp).await;
        if status == StatusCode::UNAUTHORIZED && self.credentials.is_none() {
            // Anonymous access may still work per repository (Docker Hub, GHCR).
            log::info!(
                "{}: the registry asks for credentials; continuing anonymously",
                self.base
            );
            return Ok(());
        }
        if status == StatusCode::NOT_FOUND {
            return Err(RegistryError::Unsupported(format!(
                "{} does not serve the Distribution API (GET /v2/ gave 404)",
                self.base
            )));
        }
        Err(error_from(status, &body, "GET /v2/"))
    }

    fn manifest_req(&self, method: Method, repo: &str, reference: &str) -> RegistryResult<Req> {
        check_repo(repo)?;
        check_reference(reference)?;
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_str(&MANIFEST_ACCEPT.join(", ")).expect("static media types"),
        );
        Ok(Req {
            what: format!("{method} {repo}:{reference}"),
            method,
            url: self.url(&format!("/v2/{repo}/manifests/{reference}")),
            headers,
            body: None,
            scope: repo_scope(repo, false),
        })
    }
}

#[async_trait]
impl Registry for HttpRegistry {
    async fn catalog(&self) -> RegistryResult<Vec<String>> {
        let _in_flight = self.stats.in_flight();
        let url = self.url(&format!("/v2/_catalog?n={PAGE_SIZE}"));
        self.paged_list(url, "registry:catalog:*", "repositories", true)
            .await
    }

    async fn tags(&self, repo: &str) -> RegistryResult<Vec<String>> {
        check_repo(repo)?;
        let _in_flight = self.stats.in_flight();
        let url = self.url(&format!("/v2/{repo}/tags/list?n={PAGE_SIZE}"));
        self.paged_list(url, &repo_scope(repo, false), "tags", false)
            .await
    }

    async fn tags_if_few(&self, repo: &str) -> RegistryResult<Option<Vec<String>>> {
        check_repo(repo)?;
        let _in_flight = self.stats.in_flight();
        let url = self.url(&format!("/v2/{repo}/tags/list?n={PAGE_SIZE}"));
        self.pages(url, &repo_scope(repo, false), "tags", false, 1)
            .await
    }

    async fn manifest(&self, repo: &str, reference: &str) -> RegistryResult<ManifestBlob> {
        RequestStats::inc(&self.stats.manifest_gets);
        let _in_flight = self.stats.in_flight();
        let req = self.manifest_req(Method::GET, repo, reference)?;
        let (status, headers, body) = self.fetch_capped(&req, MANIFEST_BODY_CAP).await?;
        if !status.is_success() {
            return Err(error_from(status, &body, &req.what));
        }
        if let Some(len) =
            header_str(&headers, "content-length").and_then(|l| l.parse::<u64>().ok())
        {
            if len != body.len() as u64 {
                return Err(RegistryError::Protocol(format!(
                    "{}: truncated body ({} of {len} bytes)",
                    req.what,
                    body.len()
                )));
            }
        }
        let digest = if is_sha256_digest(reference) {
            verify(reference, &body)?;
            reference.to_string()
        } else {
            let actual = sha256_digest(&body);
            if let Some(claimed) = header_str(&headers, "docker-content-digest") {
                if claimed.starts_with("sha256:") && claimed != actual {
                    return Err(RegistryError::DigestMismatch {
                        expected: claimed.to_string(),
                        actual,
                    });
                }
            }
            actual
        };
        let mut media_type = content_type(&headers);
        if !MANIFEST_ACCEPT.contains(&media_type.as_str()) {
            media_type = sniff_media_type(&body);
        }
        Ok(ManifestBlob {
            digest,
            media_type,
            body,
        })
    }

    async fn manifest_head(&self, repo: &str, reference: &str) -> RegistryResult<ManifestHead> {
        RequestStats::inc(&self.stats.manifest_heads);
        let req = self.manifest_req(Method::HEAD, repo, reference)?;
        let head = {
            let _in_flight = self.stats.in_flight();
            let resp = self.send(&req).await?;
            let status = resp.status();
            if !status.is_success() {
                return Err(error_from(status, b"", &req.what));
            }
            let h = resp.headers();
            let digest = header_str(h, "docker-content-digest").filter(|d| is_sha256_digest(d));
            let size = header_str(h, "content-length").and_then(|l| l.parse::<u64>().ok());
            let media_type = content_type(h);
            match (digest, size) {
                (Some(d), Some(size)) if MANIFEST_ACCEPT.contains(&media_type.as_str()) => {
                    Some(ManifestHead {
                        digest: d.to_string(),
                        media_type,
                        size,
                    })
                }
                _ => None,
            }
        };
        match head {
            Some(h) => Ok(h),
            // Not enough in the headers (ECR omits the digest): fall back to a GET.
            None => {
                let m = self.manifest(repo, reference).await?;
                Ok(ManifestHead {
                    digest: m.digest,
                    media_type: m.media_type,
                    size: m.body.len() as u64,
                })
            }
        }
    }

    async fn blob_size(&self, repo: &str, digest: &str) -> RegistryResult<u64> {
        check_repo(repo)?;
        check_digest(digest)?;
        let _in_flight = self.stats.in_flight();
        self.blob_head(repo, digest, &mut Budget::new(self.retry_budget))
            .await
    }

    async fn blob_range(
        &self,
        repo: &str,
        digest: &str,
        start: u64,
        end: u64,
    ) -> RegistryResult<Bytes> {
        // Sizes can come from a descriptor: the buffer grows with what arrives (capped up
        // front at 64 MiB), not from the asked size alone.
        let want = end.saturating_sub(start).saturating_add(1);
        let mut buf = BytesMut::with_capacity(want.min(64 << 20) as usize);
        self.blob_range_into(repo, digest, start, end, &mut |piece: Bytes| {
            buf.extend_from_slice(&piece);
            std::ops::ControlFlow::Continue(())
        })
        .await?;
        Ok(buf.freeze())
    }

    async fn blob_range_into(
        &self,
        repo: &str,
        digest: &str,
        start: u64,
        end: u64,
        sink: &mut super::Sink<'_>,
    ) -> RegistryResult<()> {
        check_repo(repo)?;
        check_digest(digest)?;
        if end < start {
            return Err(RegistryError::Invalid(format!("range {start}-{end}")));
        }
        RequestStats::inc(&self.stats.blob_gets);
        let _in_flight = self.stats.in_flight();
        let want = end - start + 1;
        let what = format!("GET {repo}@{digest} bytes {start}-{end}");
        let mut budget = Budget::new(self.retry_budget);
        // What arrived was delivered; a cut body is resumed from the byte where it stopped.
        let mut got = 0u64;
        loop {
            let from = start + got;
            let began = std::time::Instant::now();
            let r = self
                .blob_range_once(repo, digest, from, end, &mut got, sink, &mut budget)
                .await;
            if progressed(start + got - from, began.elapsed()) {
                // Bytes kept coming before this try failed: the budget is for a registry that
                // makes no progress. A slow link streams one request for longer than the
                // budget (or the request timeout cuts it), and that is no reason to give up.
                budget = Budget::new(self.retry_budget);
            }
            if r.is_err() && self.redirects.forget(repo, digest) {
                // A storage link that failed after its answer began: a resumed try (after a
                // body cut by an error) asks the registry; a wrong Content-Range fails the read.
                RequestStats::inc(&self.stats.redirect_failures);
            }
            match r {
                // The sink wants nothing more (its blocks failed a check): stop here.
                Ok(std::ops::ControlFlow::Break(())) => break,
                Ok(_) if got == want => break,
                Ok(_) => {
                    let why = format!("body cut after {got} of {want} bytes");
                    if !budget.pause(None, &why, &what).await {
                        return Err(RegistryError::Protocol(format!(
                            "{what}: truncated body ({got} of {want} bytes)"
                        )));
                    }
                }
                Err(e @ RegistryError::Transport(_)) => {
                    if !budget.pause(None, &e.to_string(), &what).await {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
            RequestStats::inc(&self.stats.resumes);
        }
        Ok(())
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> RegistryResult<String> {
        check_repo(repo)?;
        check_reference(reference)?;
        RequestStats::inc(&self.stats.pushes);
        let digest = sha256_digest(&body);
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_str(media_type)
                .map_err(|_| RegistryError::Invalid(format!("media type {media_type:?}")))?,
        );
        let req = Req {
            method: Method::PUT,
            url: self.url(&format!("/v2/{repo}/manifests/{reference}")),
            headers,
            body: Some(body),
            scope: repo_scope(repo, true),
            what: format!("PUT {repo}:{reference}"),
        };
        let resp = self.send(&req).await?;
        if resp.status() != StatusCode::CREATED {
            let s = resp.status();
            let body = error_body(resp).await;
            return Err(error_from(s, &body, &req.what));
        }
        Ok(digest)
    }

    async fn upload_start(&self, repo: &str) -> RegistryResult<UploadSession> {
        check_repo(repo)?;
        RequestStats::inc(&self.stats.upload_starts);
        let req = Req {
            method: Method::POST,
            url: self.url(&format!("/v2/{repo}/blobs/uploads/")),
            headers: HeaderMap::new(),
            body: Some(Bytes::new()),
            scope: repo_scope(repo, true),
            what: format!("POST {repo} upload"),
        };
        let resp = self.send(&req).await?;
        if resp.status() != StatusCode::ACCEPTED {
            let s = resp.status();
            let body = error_body(resp).await;
            return Err(error_from(s, &body, &req.what));
        }
        let location = resolve_location(resp.headers(), &req.url, &req.what)?;
        let min_chunk =
            header_str(resp.headers(), "oci-chunk-min-length").and_then(|v| v.parse().ok());
        Ok(UploadSession {
            location: location.to_string(),
            offset: 0,
            min_chunk,
        })
    }

    async fn upload_patch(
        &self,
        repo: &str,
        session: &mut UploadSession,
        data: Bytes,
    ) -> RegistryResult<()> {
        if data.is_empty() {
            return Ok(());
        }
        RequestStats::inc(&self.stats.upload_patches);
        let first = session.offset;
        let end = first + data.len() as u64 - 1;
        let mut budget = Budget::new(self.retry_budget);
        loop {
            // Send what the registry does not have yet: all of `data`, or after a failed PATCH
            // the suffix past the offset its upload status reported.
            let start = session.offset;
            let suffix = data.slice((start - first) as usize..);
            let outcome = self.patch_once(repo, session, start, end, suffix).await;
            let err = match outcome {
                Ok(()) => return Ok(()),
                Err(e @ (RegistryError::Transport(_) | RegistryError::Server { .. })) => e,
                Err(e) => return Err(e),
            };
            let what = format!("PATCH {repo} upload bytes {start}-{end}");
            if !budget.pause(None, &err.to_string(), &what).await {
                return Err(err);
            }
            // Ask the registry how much it has, and go on from there.
            let have = self.upload_status(repo, session, &mut budget).await?;
            if have < first || have > end + 1 {
                return Err(RegistryError::Protocol(format!(
                    "{what}: after a failed PATCH the registry has {have} bytes, outside \
                     {first}..={}",
                    end + 1
                )));
            }
            RequestStats::inc(&self.stats.upload_resumes);
            session.offset = have;
            if have == end + 1 {
                return Ok(());
            }
        }
    }

    async fn upload_finish(
        &self,
        repo: &str,
        session: UploadSession,
        digest: &str,
        last: Bytes,
    ) -> RegistryResult<()> {
        self.finish_resumable(repo, session, digest, last).await
    }

    async fn upload_cancel(&self, repo: &str, session: UploadSession) {
        RequestStats::inc(&self.stats.upload_cancels);
        let Ok(url) = Url::parse(&session.location) else {
            return;
        };
        let req = Req {
            method: Method::DELETE,
            url,
            headers: HeaderMap::new(),
            body: None,
            scope: repo_scope(repo, true),
            what: format!("DELETE {repo} upload"),
        };
        match self.send(&req).await {
            Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {}
            Ok(r) => log::warn!("{}: cancelling gave HTTP {}", req.what, r.status()),
            Err(e) => log::warn!("{}: {e}", req.what),
        }
    }

    async fn mount_blob(&self, repo: &str, digest: &str, from: &str) -> RegistryResult<bool> {
        check_repo(repo)?;
        check_repo(from)?;
        check_digest(digest)?;
        RequestStats::inc(&self.stats.blob_mounts);
        let mut url = self.url(&format!("/v2/{repo}/blobs/uploads/"));
        url.query_pairs_mut()
            .append_pair("mount", digest)
            .append_pair("from", from);
        let req = Req {
            method: Method::POST,
            url,
            headers: HeaderMap::new(),
            body: Some(Bytes::new()),
            scope: format!("{} repository:{from}:pull", repo_scope(repo, true)),
            what: format!("mount {digest} from {from} into {repo}"),
        };
        let resp = self.send(&req).await?;
        match resp.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                // Not mounted: the registry opened an ordinary upload instead. Close it.
                if let Ok(loc) = resolve_location(resp.headers(), &req.url, &req.what) {
                    self.upload_cancel(
                        repo,
                        UploadSession {
                            location: loc.to_string(),
                            offset: 0,
                            min_chunk: None,
                        },
                    )
                    .await;
                }
                Ok(false)
            }
            s => {
                let body = error_body(resp).await;
                Err(error_from(s, &body, &req.what))
            }
        }
    }

    async fn delete_manifest(&self, repo: &str, digest: &str) -> RegistryResult<()> {
        self.delete(repo, &format!("manifests/{digest}"), digest)
            .await
    }

    async fn delete_blob(&self, repo: &str, digest: &str) -> RegistryResult<()> {
        self.delete(repo, &format!("blobs/{digest}"), digest).await
    }

    fn stats(&self) -> &RequestStats {
        &self.stats
    }
}

impl HttpRegistry {
    async fn delete(&self, repo: &str, what_path: &str, digest: &str) -> RegistryResult<()> {
        check_repo(repo)?;
        check_digest(digest)?;
        RequestStats::inc(&self.stats.deletes);
        let req = Req {
            method: Method::DELETE,
            url: self.url(&format!("/v2/{repo}/{what_path}")),
            headers: HeaderMap::new(),
            body: None,
            scope: format!("repository:{repo}:delete"),
            what: format!("DELETE {repo}/{what_path}"),
        };
        // One try: a wrong address, port or certificate at mount time fails at once instead of
        // after the retry budget.
        let resp = self.send_in(&req, &mut Budget::new(Duration::ZERO)).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = error_body(resp).await;
        Err(match status.as_u16() {
            405 => RegistryError::Unsupported(format!(
                "{}: the registry does not allow deletes ({})",
                req.what,
                String::from_utf8_lossy(&body).trim()
            )),
            _ => error_from(status, &body, &req.what),
        })
    }
}
