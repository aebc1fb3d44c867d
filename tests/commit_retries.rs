//! The closing PUT of an upload (`PUT <location>?digest=`) against a scripted stub: a PUT cut or
//! answered 5xx is retried within the retry budget after the registry's upload status says what
//! it holds (the rest goes again, nothing twice); a PUT whose answer was lost after the registry
//! committed is found complete by a HEAD of the blob; a session the registry dropped, or a spent
//! budget, is an error. Requests are counted, never timed.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use regfs::digest::sha256_digest;
use regfs::error::RegistryError;
use regfs::registry::http::HttpRegistry;
use regfs::registry::{Registry, UploadSession};

const BLOB: &[u8] = b"0123456789abcdefghij";

/// A session that has 10 bytes acknowledged at `/v2/a/b/blobs/uploads/u1?s=1`.
fn session(port: u16) -> UploadSession {
    UploadSession {
        location: format!("http://127.0.0.1:{port}/v2/a/b/blobs/uploads/u1?s=1"),
        offset: 10,
        min_chunk: None,
    }
}

/// Requests of `method` in the log.
fn sent(log: &ReqLog, method: &str) -> Vec<Req> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|r| r.method == method)
        .cloned()
        .collect()
}

/// Close [`session`] with the blob's last 10 bytes, by a client of the stub on `port`; the
/// client comes back for its counters.
async fn finish(port: u16, budget: Duration) -> Result<HttpRegistry, RegistryError> {
    let c = stub_client(port, None, budget);
    let last = Bytes::copy_from_slice(&BLOB[10..]);
    c.upload_finish("a/b", session(port), &sha256_digest(BLOB), last)
        .await
        .map(|()| c)
}

fn put_ok() -> Resp {
    resp(201, "").h("Docker-Content-Digest", &sha256_digest(BLOB))
}

#[tokio::test]
async fn a_put_answered_503_goes_again_after_the_upload_status() {
    let puts = Arc::new(AtomicUsize::new(0));
    let (port, log) = stub(Arc::new(move |r: &Req| match r.method.as_str() {
        "PUT" if puts.fetch_add(1, Ordering::SeqCst) == 0 => resp(503, ""),
        "PUT" => put_ok(),
        // Nothing of the failed PUT arrived: the registry still has 10 bytes.
        "GET" => resp(204, "")
            .h("Range", "0-9")
            .h("Location", "/v2/a/b/blobs/uploads/u1?s=2"),
        _ => resp(404, ""),
    }));
    let c = finish(port, Duration::from_secs(30)).await.unwrap();
    let puts = sent(&log, "PUT");
    assert_eq!(puts.len(), 2);
    assert_eq!(sent(&log, "GET").len(), 1, "one upload status");
    assert_eq!(puts[1].headers["content-range"], "10-19");
    assert_eq!(puts[1].body, &BLOB[10..]);
    assert!(puts[1].path.contains("s=2&digest="), "{}", puts[1].path);
    assert_eq!(c.stats().snapshot().upload_resumes, 1);
    assert_eq!(c.stats().snapshot().upload_bytes, 10, "counted once");
}

#[tokio::test]
async fn a_put_cut_mid_body_sends_only_what_the_registry_lacks() {
    let puts = Arc::new(AtomicUsize::new(0));
    let (port, log) = stub(Arc::new(move |r: &Req| match r.method.as_str() {
        "PUT" if puts.fetch_add(1, Ordering::SeqCst) == 0 => hangup(),
        "PUT" => put_ok(),
        // 4 bytes of the cut PUT arrived.
        "GET" => resp(204, "")
            .h("Range", "0-13")
            .h("Location", "/v2/a/b/blobs/uploads/u1?s=3"),
        _ => resp(404, ""),
    }));
    finish(port, Duration::from_secs(30)).await.unwrap();
    let puts = sent(&log, "PUT");
    assert_eq!(puts.len(), 2);
    assert_eq!(puts[1].headers["content-range"], "14-19");
    assert_eq!(puts[1].body, &BLOB[14..]);
    // Everything arrived before the cut: the second PUT closes with no body.
    let puts2 = Arc::new(AtomicUsize::new(0));
    let (port, log) = stub(Arc::new(move |r: &Req| match r.method.as_str() {
        "PUT" if puts2.fetch_add(1, Ordering::SeqCst) == 0 => hangup(),
        "PUT" => put_ok(),
        "GET" => resp(204, "").h("Range", "0-19"),
        _ => resp(404, ""),
    }));
    finish(port, Duration::from_secs(30)).await.unwrap();
    let puts = sent(&log, "PUT");
    assert_eq!(puts.len(), 2);
    assert!(puts[1].body.is_empty());
    assert!(!puts[1].headers.contains_key("content-range"));
    assert!(puts[1].path.contains("s=1&digest="), "the same Location");
}

#[tokio::test]
async fn a_lost_answer_is_found_complete_by_a_head_of_the_blob() {
    // The registry committed, then the connection dropped before its answer: the upload status
    // no longer knows the session, and the blob is there with the size written.
    let (port, log) = stub(Arc::new(|r: &Req| match r.method.as_str() {
        "PUT" => hangup(),
        "GET" => resp(404, r#"{"errors":[{"code":"BLOB_UPLOAD_UNKNOWN"}]}"#),
        "HEAD" => resp(200, "").h("Content-Length", "20"),
        _ => resp(404, ""),
    }));
    let c = finish(port, Duration::from_secs(30)).await.unwrap();
    assert_eq!(sent(&log, "PUT").len(), 1, "not sent again");
    assert_eq!(sent(&log, "HEAD").len(), 1);
    assert_eq!(c.stats().snapshot().upload_resumes, 1);
}

#[tokio::test]
async fn a_dropped_session_or_a_spent_budget_is_an_error() {
    // distribution 2.8 after a PUT cut mid-body: the Location's state is stale (404), and the
    // blob is not there. Nothing can be resumed; nothing is sent again.
    let (port, log) = stub(Arc::new(|r: &Req| match r.method.as_str() {
        "PUT" => hangup(),
        "GET" => resp(404, r#"{"errors":[{"code":"BLOB_UPLOAD_INVALID"}]}"#),
        _ => resp(404, ""),
    }));
    let e = finish(port, Duration::from_secs(30)).await.unwrap_err();
    assert!(
        matches!(&e, RegistryError::Protocol(m) if m.contains("cannot be resumed")),
        "{e}"
    );
    assert_eq!(sent(&log, "PUT").len(), 1);
    assert_eq!(sent(&log, "HEAD").len(), 1);

    // Every PUT answered 500: retried (each after an upload status) until the budget is spent.
    let (port, log) = stub(Arc::new(|r: &Req| match r.method.as_str() {
        "PUT" => resp(500, ""),
        "GET" => resp(204, "").h("Range", "0-9"),
        _ => resp(404, ""),
    }));
    let e = finish(port, Duration::from_millis(400)).await.unwrap_err();
    assert!(
        matches!(e, RegistryError::Server { status: 500, .. }),
        "{e}"
    );
    let (puts, gets) = (sent(&log, "PUT").len(), sent(&log, "GET").len());
    assert!(puts >= 2, "retried: {puts} PUTs");
    assert_eq!(gets, puts - 1, "each retry after an upload status");
    // A refusal (400, e.g. DIGEST_INVALID) is final: not retried.
    let (port, log) = stub(Arc::new(|_: &Req| {
        resp(400, r#"{"errors":[{"code":"DIGEST_INVALID"}]}"#)
    }));
    assert!(finish(port, Duration::from_secs(30)).await.is_err());
    assert_eq!(log.lock().unwrap().len(), 1);
}
