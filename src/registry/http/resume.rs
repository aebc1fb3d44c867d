//! The pieces of the HTTP client that pick up after a failure: one Range GET of a blob that appends
//! to what already arrived (so `blob_range` can resume a cut body from the byte where it stopped),
//! one PATCH, and the upload status (`GET` on the upload URL, `Range: 0-N`) that a failed PATCH
//! resumes from.

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};

use super::transport::{error_body, error_from, idempotent, repo_scope, transport, Budget, Req};
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

impl HttpRegistry {
    /// One GET of bytes `from..=end` of a blob, handed to `sink` piece by piece as they arrive
    /// (`got` counts them). Ok when the body ended (maybe short: the caller resumes); a
    /// transport error mid-body keeps what came.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn blob_range_once(
        &self,
        repo: &str,
        digest: &str,
        from: u64,
        end: u64,
        got: &mut u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
        budget: &mut Budget,
    ) -> RegistryResult<()> {
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
        let resp = self.send_in(&req, budget).await?;
        let status = resp.status();
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
                sink(piece.slice(..take));
            }
        }
        // Dropping the stream here closes a 200 full-body answer early.
        Ok(())
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
        let url = Url::parse(&session.location)
            .map_err(|e| RegistryError::Protocol(format!("upload location: {e}")))?;
        let headers = super::wire::upload_headers(Some((start, end)));
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
}
