//! The request path of the HTTP client: building a request with auth, sending it, answering a
//! 401 challenge (Bearer token or Basic), following redirects, retrying idempotent requests within
//! a per-operation [`Budget`], reading bodies under caps, and turning error answers into
//! [`RegistryError`]s.
//!
//! Credentials stay home: `Authorization` is attached only to URLs on the registry's own
//! scheme://host:port (see [`same_origin`]); a `Link`, an upload `Location` or a redirect to any
//! other origin is requested without it. Token realms get the user's credentials, and a realm
//! over plain http is refused unless it is loopback or the registry itself was given as `http://`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::{Method, StatusCode, Url};

use super::wire::is_loopback_host;
use super::HttpRegistry;
use crate::error::{RegistryError, RegistryResult};
use crate::registry::auth::{parse_challenges, Scheme, TokenResponse};
use crate::registry::{RateLimit, RequestStats};

/// The longest single wait a `Retry-After` may impose; a longer one is cut to this (and the budget
/// still bounds the whole). 10 s: a registry that restarts or sheds load asks for seconds, while a
/// pull-rate limit asks for hours, which no FUSE caller should wait out.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// First backoff step; doubled on each retry up to [`MAX_BACKOFF`], with jitter.
const BASE_BACKOFF: Duration = Duration::from_millis(100);
/// Largest backoff step: a registry back after a restart is noticed within 2 s.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Redirect hops followed for one request (reqwest's own default).
const MAX_REDIRECTS: usize = 10;
/// Cap on an error body: enough for any JSON error list, and only its start is shown.
pub(super) const ERROR_BODY_CAP: usize = 64 << 10;
/// Cap on a token response: JWTs are a few KiB; 1 MiB leaves room for large claim sets.
pub(super) const TOKEN_BODY_CAP: usize = 1 << 20;

/// A per-operation retry budget: idempotent requests retry until it is spent.
pub(super) struct Budget {
    until: Instant,
    retries: u32,
}

impl Budget {
    pub(super) fn new(d: Duration) -> Self {
        Budget {
            // Saturate: an absurd budget means "retry for a very long time", never a panic.
            until: Instant::now()
                .checked_add(d)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 86400)),
            retries: 0,
        }
    }

    /// Wait before the next try, if the budget allows one. `hint` is a `Retry-After`. Returns
    /// false, without waiting, when the wait would overrun the budget.
    pub(super) async fn pause(&mut self, hint: Option<Duration>, why: &str, what: &str) -> bool {
        let step = BASE_BACKOFF
            .saturating_mul(1u32 << self.retries.min(16))
            .min(MAX_BACKOFF);
        // Equal jitter: half the step, plus a random part of the other half.
        let half = step / 2;
        let jitter = Duration::from_nanos(jitter_below(half.as_nanos() as u64 + 1));
        let wait = hint.map_or(half + jitter, |h| h.min(MAX_RETRY_AFTER).max(half));
        let now = Instant::now();
        // A `Retry-After` the budget cannot cover is not cut short and retried early: the
        // answer stands at once (the registry said when it would take another request).
        let left = self.until.saturating_duration_since(now);
        if now + wait >= self.until || hint.is_some_and(|h| h >= left) {
            if self.retries > 0 {
                log::warn!(
                    "{what}: {why}; retry budget spent after {} retries",
                    self.retries
                );
            }
            return false;
        }
        self.retries += 1;
        let level = if self.retries == 1 {
            log::Level::Warn
        } else {
            log::Level::Debug
        };
        log::log!(
            level,
            "{what}: {why}; retry {} in {} ms",
            self.retries,
            wait.as_millis()
        );
        tokio::time::sleep(wait).await;
        true
    }
}

/// A cheap random number below `n` (jitter only; not for anything secret).
fn jitter_below(n: u64) -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = Instant::now().elapsed().as_nanos() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    let mut x = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ seed;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % n.max(1)
}

/// Is this request safe to send twice?
pub(super) fn idempotent(m: &Method) -> bool {
    *m == Method::GET || *m == Method::HEAD
}

/// Is this status worth another try (of an idempotent request)?
fn transient(s: StatusCode) -> bool {
    s == StatusCode::TOO_MANY_REQUESTS
        || (s.is_server_error()
            && s != StatusCode::NOT_IMPLEMENTED
            && s != StatusCode::HTTP_VERSION_NOT_SUPPORTED)
}

/// Same scheme, host and port (default ports filled in)?
pub(super) fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Read a body, failing once it passes `cap` bytes (a `Content-Length` over the cap fails
/// before any byte is read). Nothing is preallocated from the header.
pub(super) async fn read_capped(
    resp: reqwest::Response,
    cap: usize,
    what: &str,
) -> RegistryResult<Bytes> {
    if resp.content_length().is_some_and(|l| l > cap as u64) {
        return Err(RegistryError::Protocol(format!(
            "{what}: body of {} bytes is over the {cap}-byte cap",
            resp.content_length().unwrap_or(0)
        )));
    }
    let mut buf = bytes::BytesMut::new();
    let mut stream = resp.bytes_stream();
    use futures_util::StreamExt;
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| transport(e, what))?;
        if buf.len() + piece.len() > cap {
            return Err(RegistryError::Protocol(format!(
                "{what}: body over the {cap}-byte cap"
            )));
        }
        buf.extend_from_slice(&piece);
    }
    Ok(buf.freeze())
}

/// The start of an error body (at most [`ERROR_BODY_CAP`] bytes; the rest is dropped, and a
/// body that fails to arrive is empty).
pub(super) async fn error_body(resp: reqwest::Response) -> Bytes {
    let mut buf = bytes::BytesMut::new();
    let mut stream = resp.bytes_stream();
    use futures_util::StreamExt;
    while let Some(Ok(piece)) = stream.next().await {
        let take = (ERROR_BODY_CAP - buf.len()).min(piece.len());
        buf.extend_from_slice(&piece[..take]);
        if buf.len() >= ERROR_BODY_CAP {
            break;
        }
    }
    buf.freeze()
}

/// What a request needs for auth: the token scope it belongs to.
pub(super) fn repo_scope(repo: &str, push: bool) -> String {
    if push {
        format!("repository:{repo}:pull,push")
    } else {
        format!("repository:{repo}:pull")
    }
}

/// Turn an error response into a [`RegistryError`], using the JSON error body when there is one.
pub(super) fn error_from(status: StatusCode, body: &[u8], what: &str) -> RegistryError {
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

pub(super) fn transport(e: reqwest::Error, what: &str) -> RegistryError {
    // reqwest errors name the URL, and a storage link's query is a credential (a presigned
    // signature), as is an upload Location's state: the URL goes, `what` says which request.
    // Headers are never in them.
    let e = e.without_url();
    let mut msg = format!("{what}: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    RegistryError::Transport(msg)
}

/// `Retry-After`, if present: delay-seconds or an HTTP-date (RFC 9110 §10.2.3), as a wait from
/// now (a date in the past is no wait; any size saturates, and [`Budget::pause`] caps it).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = super::date::parse_http_date(v)?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// What kind of 429 an answer is, for the log: Docker Hub's pull limit (its `ratelimit-*`
/// headers say nothing remains) or plain rate limiting.
fn too_many_kind(rl: Option<&RateLimit>) -> String {
    match rl {
        Some(r) if r.exhausted() => format!(
            "HTTP 429: pull rate limit reached (ratelimit-limit: {}, ratelimit-remaining: {})",
            r.limit.as_deref().unwrap_or("?"),
            r.remaining.as_deref().unwrap_or("?")
        ),
        _ => "HTTP 429: too many requests (plain rate limiting, no pull-limit headers)".into(),
    }
}

/// A request, rebuilt for each attempt (the body is `Bytes`, cheap to clone).
pub(super) struct Req {
    pub(super) method: Method,
    pub(super) url: Url,
    pub(super) headers: HeaderMap,
    pub(super) body: Option<Bytes>,
    pub(super) scope: String,
    pub(super) what: String,
}

impl HttpRegistry {
    fn auth_header(&self, scope: &str) -> Option<HeaderValue> {
        let scheme = crate::sync::lock(&self.scheme).clone();
        let value = match scheme {
            Scheme::None => return None,
            Scheme::Basic => self.credentials.as_ref()?.basic_header(),
            Scheme::Bearer { .. } => {
                let tokens = crate::sync::lock(&self.tokens);
                format!("Bearer {}", tokens.get(scope)?.value)
            }
        };
        let mut v = HeaderValue::from_str(&value).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    /// Keep the rate-limit headers of an answer from the registry's own origin (a CDN's
    /// headers say nothing about the registry's limits).
    fn note_rate_limit(&self, resp: &reqwest::Response, url: &Url) -> Option<RateLimit> {
        if !same_origin(url, &self.base) {
            return None;
        }
        let h = resp.headers();
        let r = RateLimit::from_headers(|n| h.get(n).and_then(|v| v.to_str().ok()))?;
        self.stats.saw_rate_limit(r.clone());
        Some(r)
    }

    pub(super) fn build(&self, req: &Req, url: &Url) -> reqwest::RequestBuilder {
        let mut b = self
            .client
            .request(req.method.clone(), url.clone())
            .headers(req.headers.clone());
        // A request with a body (a PATCH, a PUT) gets time for its bytes. A blob range does
        // not need it: a body cut by the timeout resumes from where it stopped, with a fresh
        // retry budget when its bytes came at MIN_PROGRESS_RATE or more (`blob_range_into`),
        // while a registry that answers nothing is given up on after `--request-timeout`.
        let bytes = req.body.as_ref().map_or(0, |body| body.len() as u64);
        if bytes > 0 {
            b = b.timeout(super::transfer_timeout(self.request_timeout, bytes));
        }
        // Credentials stay home: only the registry's own origin gets them.
        if same_origin(url, &self.base) {
            if let Some(auth) = self.auth_header(&req.scope) {
                b = b.header(AUTHORIZATION, auth);
            }
        } else {
            RequestStats::inc(&self.stats.foreign_requests);
        }
        if let Some(body) = &req.body {
            b = b.body(body.clone());
        }
        b
    }

    /// Send with auth, under a fresh retry budget.
    pub(super) async fn send(&self, req: &Req) -> RegistryResult<reqwest::Response> {
        let mut budget = Budget::new(self.retry_budget);
        self.send_in(req, &mut budget).await
    }

    /// Send with auth: on 401, answer the challenge and retry once; follow redirects (auth only
    /// to the registry's own origin); retry an idempotent request on transport errors, 5xx and
    /// 429 while `budget` lasts. A non-idempotent one waits out one 429 that names a
    /// `Retry-After` within the budget. Once the budget is spent, the last answer (or error) is
    /// returned.
    pub(super) async fn send_in(
        &self,
        req: &Req,
        budget: &mut Budget,
    ) -> RegistryResult<reqwest::Response> {
        let mut answered_challenge = false;
        let mut waited = false;
        let retrying = idempotent(&req.method);
        let mut url = req.url.clone();
        let mut hops = 0;
        if same_origin(&url, &self.base) {
            self.token_ahead(&req.scope).await;
        }
        loop {
            // Every request and its answer at trace level (RUST_LOG=regfs=trace), for timing a
            // workload's round trips; the path only, never headers.
            log::trace!("-> {} {}", req.method, url.path());
            // The token this try goes with: a challenge answered while it was on the wire by
            // another request's fetch is then not fetched again.
            let sent_token = self.token_value(&req.scope);
            let resp = match self.build(req, &url).send().await {
                Ok(r) => {
                    log::trace!("<- {} {}", r.status().as_u16(), url.path());
                    r
                }
                Err(e) => {
                    let err = transport(e, &req.what);
                    if retrying && budget.pause(None, &err.to_string(), &req.what).await {
                        RequestStats::inc(&self.stats.retries);
                        url = req.url.clone();
                        continue;
                    }
                    return Err(err);
                }
            };
            let status = resp.status();
            let rate_limit = self.note_rate_limit(&resp, &url);
            if status == StatusCode::TOO_MANY_REQUESTS {
                let kind = too_many_kind(rate_limit.as_ref());
                let pull_limit = rate_limit.as_ref().is_some_and(RateLimit::exhausted);
                RequestStats::inc(if pull_limit {
                    &self.stats.pull_limited
                } else {
                    &self.stats.rate_limited
                });
                // A pull limit lasts hours: waiting out a retry budget cannot help, unless the
                // registry names a time that fits it.
                let hint = retry_after(resp.headers());
                let may_wait = if retrying {
                    !(pull_limit && hint.is_none())
                } else {
                    // POST, PUT, DELETE: once, and only when the registry names the wait.
                    !waited && hint.is_some()
                };
                if may_wait && budget.pause(hint, &kind, &req.what).await {
                    waited = true;
                    RequestStats::inc(&self.stats.retries);
                    url = req.url.clone();
                    continue;
                }
                log::warn!("{}: {kind}; giving up", req.what);
                return Ok(resp);
            }
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                let Ok(next) = super::wire::resolve_location(resp.headers(), &url, &req.what)
                else {
                    return Ok(resp);
                };
                hops += 1;
                if hops > MAX_REDIRECTS {
                    return Err(RegistryError::Protocol(format!(
                        "{}: more than {MAX_REDIRECTS} redirects",
                        req.what
                    )));
                }
                if !same_origin(&next, &self.base) {
                    log::debug!(
                        "{}: redirected to {}, sent without credentials",
                        req.what,
                        next.host_str().unwrap_or("")
                    );
                }
                url = next;
                continue;
            }
            match status {
                StatusCode::UNAUTHORIZED
                    if !answered_challenge && same_origin(&url, &self.base) =>
                {
                    answered_challenge = true;
                    let challenges: Vec<_> = resp
                        .headers()
                        .get_all(reqwest::header::WWW_AUTHENTICATE)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .flat_map(parse_challenges)
                        .collect();
                    if !self
                        .answer_challenge(&challenges, &req.scope, sent_token, budget)
                        .await?
                    {
                        return Ok(resp);
                    }
                }
                s if retrying && transient(s) => {
                    let why = format!("HTTP {}", s.as_u16());
                    if !budget
                        .pause(retry_after(resp.headers()), &why, &req.what)
                        .await
                    {
                        return Ok(resp);
                    }
                    RequestStats::inc(&self.stats.retries);
                    url = req.url.clone();
                }
                _ => return Ok(resp),
            }
        }
    }

    /// GET (or HEAD) a whole body of at most `cap` bytes, under one budget: the request retries
    /// as [`Self::send_in`] does, and a body cut short is asked for again. Error answers come
    /// back with the start of their body (see [`error_body`]).
    pub(super) async fn fetch_capped(
        &self,
        req: &Req,
        cap: usize,
    ) -> RegistryResult<(StatusCode, HeaderMap, Bytes)> {
        let mut budget = Budget::new(self.retry_budget);
        loop {
            let resp = self.send_in(req, &mut budget).await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            if !status.is_success() {
                return Ok((status, headers, error_body(resp).await));
            }
            match read_capped(resp, cap, &req.what).await {
                Ok(body) => return Ok((status, headers, body)),
                Err(e @ RegistryError::Transport(_))
                    if idempotent(&req.method)
                        && budget.pause(None, &e.to_string(), &req.what).await =>
                {
                    RequestStats::inc(&self.stats.retries);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The Bearer token held for `scope` now, if any.
    fn token_value(&self, scope: &str) -> Option<String> {
        crate::sync::lock(&self.tokens)
            .get(scope)
            .map(|t| t.value.clone())
    }

    /// Wait for the right to fetch `scope`'s token: requests that need it at once (a listing
    /// resolving 8 tags, 4 parallel ranges of a cold read) share one fetch instead of sending
    /// one each. Held across the fetch; no std lock is held while it is awaited.
    async fn token_gate(&self, scope: &str) -> TokenGate<'_> {
        let gate = crate::sync::lock(&self.token_gates)
            .entry(scope.to_string())
            .or_default()
            .clone();
        let held = gate.clone().lock_owned().await;
        TokenGate {
            gates: &self.token_gates,
            scope: scope.to_string(),
            gate,
            held: Some(held),
        }
    }

    /// Handle a 401 challenge to a request that went with `sent` (the scope's token then).
    /// Returns whether a retry makes sense.
    async fn answer_challenge(
        &self,
        challenges: &[crate::registry::auth::Challenge],
        scope: &str,
        sent: Option<String>,
        budget: &mut Budget,
    ) -> RegistryResult<bool> {
        if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            let Some(realm) = c.param("realm") else {
                return Ok(false);
            };
            let service = c.param("service").map(str::to_string);
            *crate::sync::lock(&self.scheme) = Scheme::Bearer {
                realm: realm.to_string(),
                service: service.clone(),
            };
            // Prefer the scope the registry asked for; fall back to ours.
            let want = c.param("scope").unwrap_or(scope).to_string();
            let _gate = self.token_gate(scope).await;
            let now = self.token_value(scope);
            if now.is_some() && now != sent {
                // Another request fetched it while this one was on the wire or waiting.
                return Ok(true);
            }
            crate::sync::lock(&self.tokens).remove(scope);
            let token = self
                .fetch_token(realm, service.as_deref(), &want, budget)
                .await?;
            crate::sync::lock(&self.tokens).put(scope, token);
            return Ok(true);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let was_basic = matches!(*crate::sync::lock(&self.scheme), Scheme::Basic);
            if self.credentials.is_none() || was_basic {
                return Ok(false);
            }
            *crate::sync::lock(&self.scheme) = Scheme::Basic;
            return Ok(true);
        }
        Ok(false)
    }

    /// With Bearer auth learned from an earlier challenge, fetch the token of a scope that has
    /// none (a repository not asked for yet, or an expired token) before the request goes,
    /// instead of learning from a 401 that it is needed: one round trip less for each new
    /// repository. One try, outside the request's retry budget: a failure here is not the
    /// request's; it goes without, and the registry's challenge decides (and names the scope
    /// it wants, which wins).
    async fn token_ahead(&self, scope: &str) {
        if scope.is_empty() {
            return;
        }
        let (realm, service) = match &*crate::sync::lock(&self.scheme) {
            Scheme::Bearer { realm, service } => (realm.clone(), service.clone()),
            _ => return,
        };
        if self.token_value(scope).is_some() {
            return;
        }
        let _gate = self.token_gate(scope).await;
        if self.token_value(scope).is_some() {
            return; // fetched by the request this one waited for
        }
        let mut one_try = Budget::new(Duration::ZERO);
        match self
            .fetch_token(&realm, service.as_deref(), scope, &mut one_try)
            .await
        {
            Ok(token) => crate::sync::lock(&self.tokens).put(scope, token),
            Err(e) => log::debug!("token for {scope}, ahead of its request: {e}"),
        }
    }

    /// Fetch a token from `realm` (retried within `budget`, like any GET). The user's
    /// credentials go to the realm; a realm over plain http is refused unless it is loopback or
    /// the registry itself was given as `http://`.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        budget: &mut Budget,
    ) -> RegistryResult<crate::registry::auth::Token> {
        let mut url = Url::parse(realm)
            .map_err(|e| RegistryError::Protocol(format!("bad token realm {realm:?}: {e}")))?;
        let realm_host = url.host_str().unwrap_or("").to_string();
        match url.scheme() {
            "https" => {}
            "http" if self.base.scheme() == "http" || is_loopback_host(&realm_host) => {}
            other => {
                return Err(RegistryError::Denied(format!(
                    "token realm {other}://{realm_host} refused: a realm must be https (plain \
                     http only for loopback, or when the registry is given as http://)"
                )))
            }
        }
        url.set_fragment(None);
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scope.split(' ').filter(|s| !s.is_empty()) {
                q.append_pair("scope", s);
            }
        }
        let what = format!("token for {scope}");
        let body = loop {
            RequestStats::inc(&self.stats.token_fetches);
            let mut b = self.client.get(url.clone());
            if let Some(c) = &self.credentials {
                let mut v = HeaderValue::from_str(&c.basic_header()).map_err(|_| {
                    RegistryError::Invalid("credentials are not valid header text".into())
                })?;
                v.set_sensitive(true);
                b = b.header(AUTHORIZATION, v);
            }
            let resp = match b.send().await {
                Ok(r) => r,
                Err(e) => {
                    let err = transport(e, &what);
                    if budget.pause(None, &err.to_string(), &what).await {
                        RequestStats::inc(&self.stats.retries);
                        continue;
                    }
                    return Err(err);
                }
            };
            let status = resp.status();
            if transient(status) {
                let hint = retry_after(resp.headers());
                if budget
                    .pause(hint, &format!("HTTP {}", status.as_u16()), &what)
                    .await
                {
                    RequestStats::inc(&self.stats.retries);
                    continue;
                }
            }
            if status.is_redirection() {
                // Following a realm's redirect would carry the credentials elsewhere.
                return Err(RegistryError::Unauthorized(format!(
                    "{what}: the token realm redirects (HTTP {}); not followed",
                    status.as_u16()
                )));
            }
            if !status.is_success() {
                let body = error_body(resp).await;
                return Err(match error_from(status, &body, &what) {
                    RegistryError::NotFound(m) | RegistryError::Server { message: m, .. } => {
                        RegistryError::Unauthorized(m)
                    }
                    e => e,
                });
            }
            match read_capped(resp, TOKEN_BODY_CAP, &what).await {
                Ok(b) => break b,
                Err(e @ RegistryError::Transport(_))
                    if budget.pause(None, &e.to_string(), &what).await =>
                {
                    RequestStats::inc(&self.stats.retries);
                }
                Err(e) => return Err(e),
            }
        };
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| RegistryError::Malformed(format!("token response: {e}")))?;
        parsed
            .into_token(Instant::now())
            .ok_or_else(|| RegistryError::Protocol("token response without a token".into()))
    }
}

/// The right to fetch one scope's token ([`HttpRegistry::token_gate`]). Dropped, it lets the
/// next waiter in, and forgets the scope's gate when nobody else holds or awaits it.
pub(super) struct TokenGate<'a> {
    gates: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    scope: String,
    gate: Arc<tokio::sync::Mutex<()>>,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for TokenGate<'_> {
    fn drop(&mut self) {
        self.held.take();
        let mut gates = crate::sync::lock(self.gates);
        // The map's and ours: nobody waits (waiters clone it under this lock).
        if Arc::strong_count(&self.gate) == 2 {
            gates.remove(&self.scope);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(base: &str) -> HttpRegistry {
        HttpRegistry::new(super::super::HttpOptions {
            base: Url::parse(base).unwrap(),
            credentials: Some(crate::registry::auth::Credentials {
                username: "u".into(),
                password: "p".into(),
            }),
            ca_cert_pem: None,
            insecure: false,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            redirect_ttl: super::super::REDIRECT_TTL,
        })
        .unwrap()
    }

    #[test]
    fn progress_is_bytes_at_a_useful_rate() {
        use super::super::progressed;
        assert!(!progressed(0, Duration::ZERO));
        assert!(progressed(1, Duration::ZERO));
        assert!(progressed(8 << 10, Duration::from_secs(1)));
        assert!(!progressed(8 << 10, Duration::from_secs(2)), "4 KiB/s");
        assert!(!progressed(1, Duration::from_secs(59)), "a trickle");
    }

    #[test]
    fn uploads_get_time_for_their_bytes() {
        let base = Duration::from_secs(60);
        assert_eq!(super::super::transfer_timeout(base, 0), base);
        assert_eq!(
            super::super::transfer_timeout(base, 8 << 20),
            Duration::from_secs(60 + 128)
        );
        assert!(
            super::super::transfer_timeout(base, u64::MAX) > base,
            "saturates"
        );
    }

    #[tokio::test]
    async fn plain_http_realms_only_for_loopback_or_an_http_registry() {
        let mut b = Budget::new(Duration::ZERO);
        let https = registry("https://reg.example");
        let e = https
            .fetch_token("http://auth.example/token", None, "s", &mut b)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, RegistryError::Denied(m) if m.contains("realm")),
            "{e}"
        );
        assert_eq!(https.stats.token_fetches.load(Ordering::Relaxed), 0);
        // Loopback realms, and any realm of an http:// registry, are tried (and fail to connect
        // here: port 1 is closed).
        for (reg, realm) in [
            ("https://reg.example", "http://127.0.0.1:1/token"),
            ("http://reg.example", "http://auth.example:1/token"),
        ] {
            let r = registry(reg);
            let e = r.fetch_token(realm, None, "s", &mut b).await.unwrap_err();
            assert!(!matches!(e, RegistryError::Denied(_)), "{reg} {realm}: {e}");
            assert_eq!(r.stats.token_fetches.load(Ordering::Relaxed), 1);
        }
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        let u = |s| Url::parse(s).unwrap();
        assert!(same_origin(&u("https://h/v2/x"), &u("https://h:443/")));
        assert!(!same_origin(&u("http://h/v2/x"), &u("https://h/")));
        assert!(!same_origin(&u("https://h:8443/"), &u("https://h/")));
        assert!(!same_origin(&u("https://h.evil/"), &u("https://h/")));
        assert!(transient(StatusCode::SERVICE_UNAVAILABLE));
        assert!(transient(StatusCode::TOO_MANY_REQUESTS));
        assert!(!transient(StatusCode::NOT_IMPLEMENTED));
        assert!(!transient(StatusCode::NOT_FOUND));
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
}
