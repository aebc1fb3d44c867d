//! The request path of the HTTP client: building a request with auth, sending it, answering a
//! 401 challenge (Bearer token or Basic) and waiting out a short 429, and turning error answers
//! into [`RegistryError`]s.

use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::{Method, StatusCode, Url};

use super::wire::is_loopback_host;
use super::HttpRegistry;
use crate::error::{RegistryError, RegistryResult};
use crate::registry::auth::{parse_challenges, Scheme, TokenResponse};
use crate::registry::RequestStats;

/// How long a 429 may ask us to wait before we give up instead (the FUSE caller is waiting).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

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
    // reqwest errors include the URL but never headers, so no credential can leak here.
    let mut msg = format!("{what}: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    RegistryError::Transport(msg)
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
    pub(super) async fn send(&self, req: &Req) -> RegistryResult<reqwest::Response> {
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
        challenges: &[crate::registry::auth::Challenge],
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
    ) -> RegistryResult<crate::registry::auth::Token> {
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
            if url.scheme() == "https" || same_host || url.host_str().is_some_and(is_loopback_host)
            {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
