//! The pieces of the HTTP client that pick up after a failure: one Range GET of a blob that appends
//! to what already arrived (so `blob_range` can resume a cut body from the byte where it stopped),
//! one PATCH, the upload status (`GET` on the upload URL, `Range: 0-N`) that a failed PATCH or
//! closing PUT resumes from, and the closing PUT retried from that status (or found complete by a
//! HEAD of the blob when its answer was lost).

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};

use super::transport::{
    error_body, error_from, idempotent, repo_scope, same_origin, transport, Budget, Req,
};
use super::wire::{header_str, resolve_location};
use super::HttpRegistry;
use crate::error::{RegistryError, RegistryResult};
use crate::registry::{RequestStats, UploadSession};

/// The end N of a `Range: 0-N` (or `bytes=0-N`) header.
fn range_end(range: &str) -> Option<u64> {
    range
        .trim()
        .trim_start_matches("bytes=")
        .split_once('-')
        .and_then(|(_, e)| e.trim().parse::<u64>().ok())
}

/// A request of an upload at the session's latest Location: a PATCH, or the closing PUT (with
/// `?digest=`), carrying `body` as the blob's bytes from the session's offset on (no
/// `Content-Range` when there are none).
fn upload_req(
    repo: &str,
    session: &UploadSession,
    method: Method,
    digest: Option<&str>,
    body: Bytes,
    what: String,
) -> RegistryResult<Req> {
    let mut url = Url::parse(&session.location)
        .map_err(|e| RegistryError::Protocol(format!("upload location: {e}")))?;
    if let Some(d) = digest {
        url.query_pairs_mut().append_pair("digest", d);
    }
    let start = session.offset;
    let range = (!body.is_empty()).then(|| (start, start + body.len() as u64 - 1));
    Ok(Req {
        method,
        url,
        headers: super::wire::upload_headers(range),
        body: Some(body),
        scope: repo_scope(repo, true),
        what,
    })
}

impl HttpRegistry {
    /// One GET of bytes `from..=end` of a blob, handed to `sink` piece by piece as they arrive
    /// (`got` counts them). Ok when the body ended (maybe short: the caller resumes), or
    /// `Break` when the sink wanted no more; a transport error mid-body keeps what came.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn blob_range_once(
        &self,
        repo: &str,
        digest: &str,
        from: u64,
        end: u64,
        got: &mut u64,
        sink: &mut crate::registry::Sink<'_>,
        budget: &mut Budget,
    ) -> RegistryResult<std::ops::ControlFlow<()>> {
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::RANGE,
            HeaderValue::from_str(&format!("bytes={from}-{end}")).expect("ascii"),
        );
        let req = Req {
            method: Method::GET,
            url: self.url(&format!("/v2/{repo}/blobs/{digest}")),
            headers,
            body: None,
            scope: repo_scope(repo, false),
            what: format!("GET {repo}@{digest} bytes {from}-{end}"),
        };
        let want = end - from + 1;
        let target = *got + want;
        let mut sent = std::time::Instant::now();
        let resp = match self.via_remembered_redirect(repo, digest, &req).await {
            Some(resp) => resp,
            None => {
                // Timed from here: a failed remembered link's time is not the registry's.
                sent = std::time::Instant::now();
                let resp = self.send_in(&req, budget).await?;
                if resp.status().is_success() && !same_origin(resp.url(), &self.base) {
                    RequestStats::inc(&self.stats.blob_redirects);
                    self.redirects.put(repo, digest, resp.url());
                }
                resp
            }
        };
        let status = resp.status();
        if status.is_success() {
            self.stats.saw_blob_latency(sent.elapsed());
        }
        let skip = match status {
            StatusCode::PARTIAL_CONTENT => {
                let cr = header_str(resp.headers(), "content-range").unwrap_or("");
                if !cr.starts_with(&format!("bytes {from}-")) {
                    return Err(RegistryError::Protocol(format!(
                        "{}: answered with Content-Range {cr:?}",
                        req.what
                    )));
                }
                0
            }
            StatusCode::OK => {
                // The registry ignored Range and sends the whole blob: skip to `from`.
                log::debug!("{}: Range ignored (200), skipping {from} bytes", req.what);
                from
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(RegistryError::Protocol(format!(
                    "{}: range refused (416)",
                    req.what
                )));
            }
            s => {
                let body = error_body(resp).await;
                return Err(error_from(s, &body, &req.what));
            }
        };
        let mut skipped = 0u64;
        let mut stream = resp.bytes_stream();
        while *got < target {
            let Some(piece) = stream.next().await else {
                break;
            };
            let mut piece = piece.map_err(|e| transport(e, &req.what))?;
            if skipped < skip {
                let n = (skip - skipped).min(piece.len() as u64) as usize;
                skipped += n as u64;
                piece = piece.slice(n..);
            }
            let take = (target - *got).min(piece.len() as u64) as usize;
            if take > 0 {
                *got += take as u64;
                // Counted as they arrive: a reader may have its block before the body ends.
                RequestStats::add(&self.stats.blob_bytes, take as u64);
                if sink(piece.slice(..take)).is_break() {
                    // Dropping the stream closes the connection mid-body.
                    return Ok(std::ops::ControlFlow::Break(()));
                }
            }
        }
        // Dropping the stream here closes a 200 full-body answer early.
        Ok(std::ops::ControlFlow::Continue(()))
    }

    /// A blob GET sent straight to where the registry redirected the last GET of this blob,
    /// within `--redirect-ttl`: its answer when it is a success. None when nothing is
    /// remembered, or when the target failed (an error answer, a refused or reset connection):
    /// then it is forgotten and the caller asks the registry, at once and within its own budget.
    async fn via_remembered_redirect(
        &self,
        repo: &str,
        digest: &str,
        req: &Req,
    ) -> Option<reqwest::Response> {
        let url = self.redirects.get(repo, digest)?;
        RequestStats::inc(&self.stats.redirect_reuses);
        log::trace!("-> {} {} (a remembered redirect)", req.method, url.path());
        let answer =
            tokio::time::timeout(super::REMEMBERED_LINK_WAIT, self.build(req, &url).send()).await;
        let why = match answer {
            Ok(Ok(resp)) if resp.status().is_success() => {
                log::trace!("<- {} {}", resp.status().as_u16(), url.path());
                return Some(resp);
            }
            Ok(Ok(resp)) => format!("HTTP {}", resp.status().as_u16()),
            Ok(Err(e)) => transport(e, &req.what).to_string(),
            Err(_) => format!(
                "no answer within {} s",
                super::REMEMBERED_LINK_WAIT.as_secs()
            ),
        };
        log::debug!(
            "{}: the remembered redirect target failed ({why}); asking the registry again",
            req.what
        );
        if self.redirects.forget(repo, digest) {
            RequestStats::inc(&self.stats.redirect_failures);
        }
        None
    }

    /// One PATCH of bytes `start..=end`; on success the session moves past `end`.
    pub(super) async fn patch_once(
        &self,
        repo: &str,
        session: &mut UploadSession,
        start: u64,
        end: u64,
        data: Bytes,
    ) -> RegistryResult<()> {
        debug_assert_eq!(start, session.offset);
        let len = data.len() as u64;
        let what = format!("PATCH {repo} upload bytes {start}-{end}");
        let req = upload_req(repo, session, Method::PATCH, None, data, what)?;
        let resp = self.send(&req).await?;
        let status = resp.status();
        // 202 per the spec; ECR answers 201.
        if status != StatusCode::ACCEPTED && status != StatusCode::CREATED {
            let body = error_body(resp).await;
            return Err(error_from(status, &body, &req.what));
        }
        // distribution 2.8 appends out-of-order data silently: the Range it reports is the truth.
        let range = header_str(resp.headers(), "range").unwrap_or("");
        if range_end(range) != Some(end) {
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

    /// `GET` on the upload URL: how many bytes the registry holds (its `Range: 0-N` gives N+1).
    /// The session moves to the `Location` it returns, if any.
    pub(super) async fn upload_status(
        &self,
        repo: &str,
        session: &mut UploadSession,
        budget: &mut Budget,
    ) -> RegistryResult<u64> {
        let url = Url::parse(&session.location)
            .map_err(|e| RegistryError::Protocol(format!("upload location: {e}")))?;
        let req = Req {
            method: Method::GET,
            url,
            headers: HeaderMap::new(),
            body: None,
            scope: repo_scope(repo, true),
            what: format!("GET {repo} upload status"),
        };
        debug_assert!(idempotent(&req.method));
        let resp = self.send_in(&req, budget).await?;
        let status = resp.status();
        if !status.is_success() {
            let body = error_body(resp).await;
            return Err(error_from(status, &body, &req.what));
        }
        let range = header_str(resp.headers(), "range").unwrap_or("");
        // distribution reports `0-0` for both 0 and 1 bytes; the session offset tells them apart
        // (0 bytes only while nothing was acknowledged).
        let have = match range_end(range) {
            Some(0) if session.offset == 0 => 0,
            Some(n) => n.saturating_add(1),
            None if range.is_empty() => 0,
            None => {
                return Err(RegistryError::Protocol(format!(
                    "{}: upload status Range {range:?}",
                    req.what
                )))
            }
        };
        if let Ok(loc) = resolve_location(resp.headers(), &req.url, &req.what) {
            session.location = loc.to_string();
        }
        Ok(have)
    }

    /// `HEAD` of a blob within `budget`: its size (`Content-Length`).
    pub(super) async fn blob_head(
        &self,
        repo: &str,
        digest: &str,
        budget: &mut Budget,
    ) -> RegistryResult<u64> {
        RequestStats::inc(&self.stats.blob_heads);
        let req = Req {
            method: Method::HEAD,
            url: self.url(&format!("/v2/{repo}/blobs/{digest}")),
            headers: HeaderMap::new(),
            body: None,
            scope: repo_scope(repo, false),
            what: format!("HEAD {repo}@{digest}"),
        };
        let resp = self.send_in(&req, budget).await?;
        if !resp.status().is_success() {
            return Err(error_from(resp.status(), b"", &req.what));
        }
        header_str(resp.headers(), "content-length")
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| RegistryError::Protocol(format!("{}: no Content-Length", req.what)))
    }

    /// One closing PUT `?digest=` at the session's Location, with `last` as the bytes from the
    /// session's offset on (no `Content-Range` when there are none).
    async fn put_once(
        &self,
        repo: &str,
        session: &UploadSession,
        digest: &str,
        last: Bytes,
        budget: &mut Budget,
    ) -> RegistryResult<()> {
        let len = last.len() as u64;
        let what = format!("PUT {repo}@{digest}");
        let req = upload_req(repo, session, Method::PUT, Some(digest), last, what)?;
        let resp = self.send_in(&req, budget).await?;
        if resp.status() != StatusCode::CREATED {
            let s = resp.status();
            let body = error_body(resp).await;
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

    /// The closing PUT, with `last` as the final bytes. A PUT cut, or answered 5xx or 429, is
    /// tried again within the retry budget after asking the registry where the upload stands:
    /// its upload status gives the bytes it holds (the PUT goes again with the rest), and an
    /// upload it no longer knows was either committed by the PUT whose answer was lost (a HEAD
    /// of the blob finds it, with the size written: done) or lost (an error).
    pub(super) async fn finish_resumable(
        &self,
        repo: &str,
        mut session: UploadSession,
        digest: &str,
        last: Bytes,
    ) -> RegistryResult<()> {
        let first = session.offset;
        let total = first.saturating_add(last.len() as u64);
        let what = format!("PUT {repo}@{digest}");
        let mut budget = Budget::new(self.retry_budget);
        loop {
            let suffix = last.slice((session.offset - first) as usize..);
            let outcome = self
                .put_once(repo, &session, digest, suffix, &mut budget)
                .await;
            let err = match outcome {
                Ok(()) => return Ok(()),
                Err(
                    e @ (RegistryError::Transport(_)
                    | RegistryError::Server { .. }
                    | RegistryError::TooManyRequests(_)),
                ) => e,
                Err(e) => return Err(e),
            };
            if !budget.pause(None, &err.to_string(), &what).await {
                return Err(err);
            }
            match self.upload_status(repo, &mut session, &mut budget).await {
                Ok(have) if (first..=total).contains(&have) => session.offset = have,
                Ok(have) => {
                    return Err(RegistryError::Protocol(format!(
                        "{what}: after a failed PUT the registry has {have} bytes, outside \
                         {first}..={total}"
                    )))
                }
                Err(RegistryError::NotFound(_)) => {
                    // The session is closed: by our PUT (its answer lost), or for good.
                    return match self.blob_head(repo, digest, &mut budget).await {
                        Ok(size) if size == total => {
                            RequestStats::inc(&self.stats.upload_resumes);
                            log::info!(
                                "{what}: its answer was lost, but the registry has the blob"
                            );
                            Ok(())
                        }
                        Ok(size) => Err(RegistryError::Protocol(format!(
                            "{what}: the registry has the blob with {size} bytes, not {total}"
                        ))),
                        Err(RegistryError::NotFound(_)) => Err(RegistryError::Protocol(format!(
                            "{what}: the registry dropped the upload after a failed PUT ({err}); \
                             it cannot be resumed"
                        ))),
                        Err(e) => Err(e),
                    };
                }
                Err(e) => return Err(e),
            }
            RequestStats::inc(&self.stats.upload_resumes);
        }
    }
}
