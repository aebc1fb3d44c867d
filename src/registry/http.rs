//! The real registry client: Distribution API v2 over reqwest.
//!
//! One `send` path handles auth for every request: it attaches the cached token (or Basic
//! credentials), and on a 401 it reads the challenge, fetches a token for the challenged scope and
//! retries once. Blob reads are closed `Range` requests with `Accept-Encoding: identity`; a 200
//! answer with the whole body is tolerated, anything short of the asked length is an error.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, ACCEPT_ENCODING, AUTHORIZATION};
use reqwest::{Method, StatusCode, Url};

use super::auth::{parse_challenges, Credentials, Scheme, TokenCache, TokenResponse};
use super::{ManifestBlob, ManifestHead, Registry, RequestStats, UploadSession};
use crate::digest::{is_sha256_digest, sha256_digest, verify};
use crate::error::{RegistryError, RegistryResult};
use crate::manifest::{sniff_media_type, MANIFEST_ACCEPT};

/// Page size asked for in `_catalog` and `tags/list`. distribution refuses n above its
/// `catalog.maxentries` (default 1000) with 400, so stay well below; on that 400 we retry without n.
const PAGE_SIZE: usize = 100;
/// Cycle protection for `Link` pagination.
const MAX_PAGES: usize = 100_000;
/// How long a 429 may ask us to wait before we give up instead (the FUSE caller is waiting).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

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
}

/// A Distribution v2 client.
pub struct HttpRegistry {
    base: Url,
    client: reqwest::Client,
    credentials: Option<Credentials>,
    scheme: Mutex<Scheme>,
    tokens: Mutex<TokenCache>,
    stats: RequestStats,
}

impl std::fmt::Debug for HttpRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRegistry")
            .field("base", &self.base.as_str())
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// What a request needs for auth: the token scope it belongs to.
fn repo_scope(repo: &str, push: bool) -> String {
    if push {
        format!("repository:{repo}:pull,push")
    } else {
        format!("repository:{repo}:pull")
    }
}

/// Turn an error response into a [`RegistryError`], using the JSON error body when there is one.
fn error_from(status: StatusCode, body: &[u8], what: &str) -> RegistryError {
    #[derive(serde::Deserialize)]
    struct Errs {
        errors: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let detail = match serde_json::from_slice::<Errs>(body) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|i| {
                if i.message.is_empty() {
                    i.code.clone()
                } else {
                    format!("{}: {}", i.code, i.message)
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
            let text = text.trim();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("").to_string()
            } else {
                text.to_string()
            }
        }
    };
    let msg = format!("{what}: {detail}");
    match status.as_u16() {
        401 => RegistryError::Unauthorized(msg),
        403 => RegistryError::Denied(msg),
        404 => RegistryError::NotFound(msg),
        429 => RegistryError::TooManyRequests(msg),
        400 | 405 | 413 | 416 if what.starts_with("PUT") || what.starts_with("POST") => {
            RegistryError::Invalid(msg)
        }
        s => RegistryError::Server {
            status: s,
            message: msg,
        },
    }
}

fn transport(e: reqwest::Error, what: &str) -> RegistryError {
    // reqwest errors include the URL but never headers, so no credential can leak here.
    let mut msg = format!("{what}: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    RegistryError::Transport(msg)
}

/// The `rel="next"` URL of a `Link` header, resolved against the URL it came with.
pub fn next_link(headers: &HeaderMap, request_url: &Url) -> Option<Url> {
    for value in headers.get_all(reqwest::header::LINK) {
        let v = value.to_str().ok()?;
        for part in v.split(',') {
            let part = part.trim();
            let Some(rest) = part.strip_prefix('<') else {
                continue;
            };
            let Some((target, params)) = rest.split_once('>') else {
                continue;
            };
            let is_next = params.split(';').any(|p| {
                let p = p.trim().replace(' ', "");
                p.eq_ignore_ascii_case("rel=\"next\"") || p.eq_ignore_ascii_case("rel=next")
            });
            if is_next {
                return request_url.join(target).ok();
            }
        }
    }
    None
}

/// `Retry-After` in seconds, if present and small enough to wait for.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let d = Duration::from_secs(secs);
    (d <= MAX_RETRY_AFTER).then_some(d)
}

/// A request, rebuilt for each attempt (the body is `Bytes`, cheap to clone).
struct Req {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Bytes>,
    scope: String,
    what: String,
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
            // reqwest drops Authorization when a redirect changes host, port or scheme.
            .redirect(reqwest::redirect::Policy::limited(10))
            .pool_max_idle_per_host(16);
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
        Ok(HttpRegistry {
            base: opts.base,
            client,
            credentials: opts.credentials,
            scheme: Mutex::new(Scheme::None),
            tokens: Mutex::new(TokenCache::default()),
            stats: RequestStats::default(),
        })
    }

    fn url(&self, path: &str) -> Url {
        self.base.join(path).expect("registry paths are valid URLs")
    }

    /// `GET /v2/`: is this a registry, and can we talk to it?
    pub async fn ping(&self) -> RegistryResult<()> {
        let req = Req {
            method: Method::GET,
            url: self.url("/v2/"),
            headers: HeaderMap::new(),
            body: None,
            scope: String::new(),
            what: "GET /v2/".into(),
        };
        let resp = self.send(&req).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.bytes().await.unwrap_or_default();
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

    fn auth_header(&self, scope: &str) -> Option<HeaderValue> {
        let scheme = self.scheme.lock().unwrap().clone();
        let value = match scheme {
            Scheme::None => return None,
            Scheme::Basic => self.credentials.as_ref()?.basic_header(),
            Scheme::Bearer { .. } => {
                let tokens = self.tokens.lock().unwrap();
                format!("Bearer {}", tokens.get(scope)?.value)
            }
        };
        let mut v = HeaderValue::from_str(&value).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    fn build(&self, req: &Req) -> reqwest::RequestBuilder {
        let mut b = self
            .client
            .request(req.method.clone(), req.url.clone())
            .headers(req.headers.clone());
        if let Some(auth) = self.auth_header(&req.scope) {
            b = b.header(AUTHORIZATION, auth);
        }
        if let Some(body) = &req.body {
            b = b.body(body.clone());
        }
        b
    }

    /// Send with auth: on 401, answer the challenge and retry once; on a short 429, wait and retry once.
    async fn send(&self, req: &Req) -> RegistryResult<reqwest::Response> {
        let mut answered_challenge = false;
        let mut waited = false;
        loop {
            let resp = self
                .build(req)
                .send()
                .await
                .map_err(|e| transport(e, &req.what))?;
            match resp.status() {
                StatusCode::UNAUTHORIZED if !answered_challenge => {
                    answered_challenge = true;
                    let challenges: Vec<_> = resp
                        .headers()
                        .get_all(reqwest::header::WWW_AUTHENTICATE)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .flat_map(parse_challenges)
                        .collect();
                    if !self.answer_challenge(&challenges, &req.scope).await? {
                        return Ok(resp);
                    }
                }
                StatusCode::TOO_MANY_REQUESTS if !waited => match retry_after(resp.headers()) {
                    Some(d) => {
                        log::warn!("{}: rate limited, retrying in {}s", req.what, d.as_secs());
                        waited = true;
                        tokio::time::sleep(d).await;
                    }
                    None => return Ok(resp),
                },
                _ => return Ok(resp),
            }
        }
    }

    /// Handle a 401 challenge. Returns whether a retry makes sense.
    async fn answer_challenge(
        &self,
        challenges: &[super::auth::Challenge],
        scope: &str,
    ) -> RegistryResult<bool> {
        if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            let Some(realm) = c.param("realm") else {
                return Ok(false);
            };
            let service = c.param("service").map(str::to_string);
            *self.scheme.lock().unwrap() = Scheme::Bearer {
                realm: realm.to_string(),
                service: service.clone(),
            };
            // Prefer the scope the registry asked for; fall back to ours.
            let want = c.param("scope").unwrap_or(scope).to_string();
            self.tokens.lock().unwrap().remove(scope);
            let token = self.fetch_token(realm, service.as_deref(), &want).await?;
            self.tokens.lock().unwrap().put(scope, token);
            return Ok(true);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let was_basic = matches!(*self.scheme.lock().unwrap(), Scheme::Basic);
            if self.credentials.is_none() || was_basic {
                return Ok(false);
            }
            *self.scheme.lock().unwrap() = Scheme::Basic;
            return Ok(true);
        }
        Ok(false)
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> RegistryResult<super::auth::Token> {
        let mut url = Url::parse(realm)
            .map_err(|e| RegistryError::Protocol(format!("bad token realm {realm:?}: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scope.split(' ').filter(|s| !s.is_empty()) {
                q.append_pair("scope", s);
            }
        }
        RequestStats::inc(&self.stats.token_fetches);
        let mut b = self.client.get(url.clone());
        // Credentials go to the realm only when it is the registry's own host or https.
        if let Some(c) = &self.credentials {
            let same_host = url.host_str() == self.base.host_str();
            if url.scheme() == "https" || same_host || is_loopback(url.host_str()) {
                let mut v = HeaderValue::from_str(&c.basic_header()).map_err(|_| {
                    RegistryError::Invalid("credentials are not valid header text".into())
                })?;
                v.set_sensitive(true);
                b = b.header(AUTHORIZATION, v);
            } else {
                log::warn!(
                    "not sending credentials to plain-http token realm {}",
                    url.host_str().unwrap_or("")
                );
            }
        }
        let what = format!("token for {scope}");
        let resp = b.send().await.map_err(|e| transport(e, &what))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| transport(e, &what))?;
        if !status.is_success() {
            return Err(match error_from(status, &body, &what) {
                RegistryError::NotFound(m) | RegistryError::Server { message: m, .. } => {
                    RegistryError::Unauthorized(m)
                }
                e => e,
            });
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| RegistryError::Malformed(format!("token response: {e}")))?;
        parsed
            .into_token(Instant::now())
            .ok_or_else(|| RegistryError::Protocol("token response without a token".into()))
    }

    /// GET a JSON list, following `Link` pages. `key` is the JSON field holding the names.
    async fn paged_list(
        &self,
        first: Url,
        scope: &str,
        key: &str,
        is_catalog: bool,
    ) -> RegistryResult<Vec<String>> {
        let mut out = Vec::new();
        let mut url = first;
        let mut retried_without_n = false;
        for _ in 0..MAX_PAGES {
            RequestStats::inc(if is_catalog {
                &self.stats.catalog_pages
            } else {
                &self.stats.tag_pages
            });
            let what = format!("GET {}", url.path());
            let req = Req {
                method: Method::GET,
                url: url.clone(),
                headers: HeaderMap::new(),
                body: None,
                scope: scope.to_string(),
                what: what.clone(),
            };
            let resp = self.send(&req).await?;
            let status = resp.status();
            let next = next_link(resp.headers(), &url);
            let body = resp.bytes().await.map_err(|e| transport(e, &what))?;
            if status == StatusCode::BAD_REQUEST
                && !retried_without_n
                && String::from_utf8_lossy(&body).contains("PAGINATION_NUMBER_INVALID")
            {
                retried_without_n = true;
                let mut u = url.clone();
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .filter(|(k, _)| k != "n")
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
                url = u;
                continue;
            }
            if !status.is_success() {
                return Err(error_from(status, &body, &what));
            }
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| RegistryError::Malformed(format!("{what} response: {e}")))?;
            match v.get(key) {
                Some(serde_json::Value::Array(items)) => {
                    out.extend(items.iter().filter_map(|i| i.as_str().map(str::to_string)))
                }
                // distribution 2.8 answers `"tags": null` once every tag is deleted.
                Some(serde_json::Value::Null) | None => {}
                Some(_) => {
                    return Err(RegistryError::Malformed(format!(
                        "{what} response: {key} is not a list"
                    )))
                }
            }
            match next {
                Some(n) => url = n,
                None => {
                    out.sort();
                    out.dedup();
                    return Ok(out);
                }
            }
        }
        Err(RegistryError::Protocol(format!(
            "more than {MAX_PAGES} pages: pagination loop?"
        )))
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

fn is_loopback(host: Option<&str>) -> bool {
    match host {
        Some("localhost") => true,
        Some(h) => h
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

fn check_repo(repo: &str) -> RegistryResult<()> {
    if super::is_valid_repo_name(repo) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!("repository name {repo:?}")))
    }
}

fn check_reference(reference: &str) -> RegistryResult<()> {
    if super::is_valid_tag(reference) || is_sha256_digest(reference) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!("reference {reference:?}")))
    }
}

fn check_digest(digest: &str) -> RegistryResult<()> {
    if is_sha256_digest(digest) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!("digest {digest:?}")))
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn content_type(h: &HeaderMap) -> String {
    header_str(h, "content-type")
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

#[async_trait]
impl Registry for HttpRegistry {
    async fn catalog(&self) -> RegistryResult<Vec<String>> {
        let url = self.url(&format!("/v2/_catalog?n={PAGE_SIZE}"));
        self.paged_list(url, "registry:catalog:*", "repositories", true)
            .await
    }

    async fn tags(&self, repo: &str) -> RegistryResult<Vec<String>> {
        check_repo(repo)?;
        let url = self.url(&format!("/v2/{repo}/tags/list?n={PAGE_SIZE}"));
        self.paged_list(url, &repo_scope(repo, false), "tags", false)
            .await
    }

    async fn manifest(&self, repo: &str, reference: &str) -> RegistryResult<ManifestBlob> {
        RequestStats::inc(&self.stats.manifest_gets);
        let req = self.manifest_req(Method::GET, repo, reference)?;
        let resp = self.send(&req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(|e| transport(e, &req.what))?;
        if !status.is_success() {
            return Err(error_from(status, &body, &req.what));
        }
        if let Some(len) =
            header_str(&headers, "content-length").and_then(|l| l.parse::<usize>().ok())
        {
            if len != body.len() {
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
                Ok(ManifestHead {
                    digest: d.to_string(),
                    media_type,
                    size,
                })
            }
            // Not enough in the headers (ECR omits the digest): fall back to a GET.
            _ => {
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
        RequestStats::inc(&self.stats.blob_heads);
        let req = Req {
            method: Method::HEAD,
            url: self.url(&format!("/v2/{repo}/blobs/{digest}")),
            headers: HeaderMap::new(),
            body: None,
            scope: repo_scope(repo, false),
            what: format!("HEAD {repo}@{digest}"),
        };
        let resp = self.send(&req).await?;
        if !resp.status().is_success() {
            return Err(error_from(resp.status(), b"", &req.what));
        }
        header_str(resp.headers(), "content-length")
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| RegistryError::Protocol(format!("{}: no Content-Length", req.what)))
    }

    async fn blob_range(
        &self,
        repo: &str,
        digest: &str,
        start: u64,
        end: u64,
    ) -> RegistryResult<Bytes> {
        check_repo(repo)?;
        check_digest(digest)?;
        if end < start {
            return Err(RegistryError::Invalid(format!("range {start}-{end}")));
        }
        RequestStats::inc(&self.stats.blob_gets);
        let want = (end - start + 1) as usize;
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::RANGE,
            HeaderValue::from_str(&format!("bytes={start}-{end}")).expect("ascii"),
        );
        let req = Req {
            method: Method::GET,
            url: self.url(&format!("/v2/{repo}/blobs/{digest}")),
            headers,
            body: None,
            scope: repo_scope(repo, false),
            what: format!("GET {repo}@{digest} bytes {start}-{end}"),
        };
        let resp = self.send(&req).await?;
        let status = resp.status();
        let skip = match status {
            StatusCode::PARTIAL_CONTENT => {
                let cr = header_str(resp.headers(), "content-range").unwrap_or("");
                if !cr.starts_with(&format!("bytes {start}-")) {
                    return Err(RegistryError::Protocol(format!(
                        "{}: answered with Content-Range {cr:?}",
                        req.what
                    )));
                }
                0
            }
            StatusCode::OK => {
                // The registry ignored Range and sends the whole blob: skip to `start`.
                log::debug!("{}: Range ignored (200), skipping {start} bytes", req.what);
                start as usize
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(RegistryError::Protocol(format!(
                    "{}: range refused (416)",
                    req.what
                )));
            }
            s => {
                let body = resp.bytes().await.unwrap_or_default();
                return Err(error_from(s, &body, &req.what));
            }
        };
        let mut buf = BytesMut::with_capacity(want);
        let mut skipped = 0usize;
        let mut stream = resp.bytes_stream();
        while buf.len() < want {
            let Some(piece) = stream.next().await else {
                break;
            };
            let mut piece = piece.map_err(|e| transport(e, &req.what))?;
            if skipped < skip {
                let n = (skip - skipped).min(piece.len());
                skipped += n;
                piece = piece.slice(n..);
            }
            let take = (want - buf.len()).min(piece.len());
            buf.extend_from_slice(&piece[..take]);
        }
        // Dropping the stream here closes a 200 full-body answer early.
        if buf.len() != want {
            return Err(RegistryError::Protocol(format!(
                "{}: truncated body ({} of {want} bytes)",
                req.what,
                buf.len()
            )));
        }
        self.stats
            .blob_bytes
            .fetch_add(want as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(buf.freeze())
    }

    async fn push_blob(&self, repo: &str, data: Bytes) -> RegistryResult<String> {
        RequestStats::inc(&self.stats.pushes);
        let digest = sha256_digest(&data);
        let session = self.upload_start(repo).await?;
        self.upload_finish(repo, session, &digest, data).await?;
        Ok(digest)
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
            let body = resp.bytes().await.unwrap_or_default();
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
            let body = resp.bytes().await.unwrap_or_default();
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
        let start = session.offset;
        let end = start + data.len() as u64 - 1;
        let url = Url::parse(&session.location)
            .map_err(|e| RegistryError::Protocol(format!("upload location: {e}")))?;
        let mut headers = HeaderMap::new();
        // distribution 2.8 wants `START-END`, without `bytes=`.
        headers.insert(
            reqwest::header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("{start}-{end}")).expect("ascii"),
        );
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let len = data.len() as u64;
        let req = Req {
            method: Method::PATCH,
            url,
            headers,
            body: Some(data),
            scope: repo_scope(repo, true),
            what: format!("PATCH {repo} upload bytes {start}-{end}"),
        };
        let resp = self.send(&req).await?;
        let status = resp.status();
        // 202 per the spec; ECR answers 201.
        if status != StatusCode::ACCEPTED && status != StatusCode::CREATED {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(error_from(status, &body, &req.what));
        }
        // distribution 2.8 appends out-of-order data silently: the Range it reports is the truth.
        let range = header_str(resp.headers(), "range").unwrap_or("");
        let acked = range
            .trim_start_matches("bytes=")
            .split_once('-')
            .and_then(|(_, e)| e.parse::<u64>().ok());
        if acked != Some(end) {
            return Err(RegistryError::Protocol(format!(
                "{}: registry acknowledged {range:?}, expected 0-{end}",
                req.what
            )));
        }
        session.location = resolve_location(resp.headers(), &req.url, &req.what)?.to_string();
        session.offset = end + 1;
        RequestStats::add(&self.stats.upload_bytes, len);
        Ok(())
    }

    async fn upload_finish(
        &self,
        repo: &str,
        session: UploadSession,
        digest: &str,
        last: Bytes,
    ) -> RegistryResult<()> {
        let mut url = Url::parse(&session.location)
            .map_err(|e| RegistryError::Protocol(format!("upload location: {e}")))?;
        url.query_pairs_mut().append_pair("digest", digest);
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        if !last.is_empty() {
            let start = session.offset;
            let end = start + last.len() as u64 - 1;
            headers.insert(
                reqwest::header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("{start}-{end}")).expect("ascii"),
            );
        }
        let len = last.len() as u64;
        let req = Req {
            method: Method::PUT,
            url,
            headers,
            body: Some(last),
            scope: repo_scope(repo, true),
            what: format!("PUT {repo}@{digest}"),
        };
        let resp = self.send(&req).await?;
        if resp.status() != StatusCode::CREATED {
            let s = resp.status();
            let body = resp.bytes().await.unwrap_or_default();
            return Err(error_from(s, &body, &req.what));
        }
        if let Some(d) = header_str(resp.headers(), "docker-content-digest") {
            if d != digest {
                return Err(RegistryError::DigestMismatch {
                    expected: digest.to_string(),
                    actual: d.to_string(),
                });
            }
        }
        RequestStats::add(&self.stats.upload_bytes, len);
        Ok(())
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
                let body = resp.bytes().await.unwrap_or_default();
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
        let resp = self.send(&req).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.bytes().await.unwrap_or_default();
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

/// The `Location` of a response, resolved against the URL of the request it answers.
fn resolve_location(h: &HeaderMap, base: &Url, what: &str) -> RegistryResult<Url> {
    let loc = header_str(h, "location")
        .ok_or_else(|| RegistryError::Protocol(format!("{what}: no Location")))?;
    base.join(loc)
        .map_err(|e| RegistryError::Protocol(format!("{what}: bad Location {loc:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_resolve_relative() {
        let mut h = HeaderMap::new();
        h.insert(
            reqwest::header::LINK,
            HeaderValue::from_static("</v2/_catalog?last=test%2Frepo&n=1>; rel=\"next\""),
        );
        let base = Url::parse("http://127.0.0.1:5000/v2/_catalog?n=1").unwrap();
        assert_eq!(
            next_link(&h, &base).unwrap().as_str(),
            "http://127.0.0.1:5000/v2/_catalog?last=test%2Frepo&n=1"
        );
        let mut h2 = HeaderMap::new();
        h2.insert(
            reqwest::header::LINK,
            HeaderValue::from_static("<https://other/v2/x/tags/list?next_page=abc>; rel=prev, <list?next_page=zz&n=50>; rel=\"next\""),
        );
        let base = Url::parse("https://q.example/v2/coreos/etcd/tags/list?n=50").unwrap();
        assert_eq!(
            next_link(&h2, &base).unwrap().as_str(),
            "https://q.example/v2/coreos/etcd/tags/list?next_page=zz&n=50"
        );
        assert!(next_link(&HeaderMap::new(), &base).is_none());
    }

    #[test]
    fn error_bodies_become_messages() {
        let e = error_from(
            StatusCode::NOT_FOUND,
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":null}]}"#,
            "GET a:b",
        );
        assert!(
            matches!(&e, RegistryError::NotFound(m) if m.contains("MANIFEST_UNKNOWN: manifest unknown"))
        );
        let e = error_from(
            StatusCode::TOO_MANY_REQUESTS,
            b"You have reached your pull rate limit",
            "GET",
        );
        assert!(matches!(&e, RegistryError::TooManyRequests(m) if m.contains("pull rate limit")));
        let e = error_from(StatusCode::BAD_GATEWAY, b"", "GET");
        assert!(matches!(e, RegistryError::Server { status: 502, .. }));
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback(Some("localhost")));
        assert!(is_loopback(Some("127.0.0.5")));
        assert!(is_loopback(Some("[::1]")));
        assert!(!is_loopback(Some("10.0.0.1")));
    }
}
