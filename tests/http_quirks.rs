//! The HTTP client against a scripted stub server, for registry behaviours distribution 2.8 does
//! not produce: a Range answered with 200, a wrong Content-Range, a truncated body, 429 with
//! Retry-After, relative opaque pagination links, Bearer challenges, a lying Docker-Content-Digest,
//! and a redirect to another host (which must not receive the credentials, and whose target is
//! remembered for the blob's next ranges, and forgotten when it fails); blob answers timed
//! for the request size. Also: the failure-injecting wrapper over the real client. The stub
//! server is `common::stub`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{resp, stub, stub_client, Req};

use regfs::digest::sha256_digest;
use regfs::error::RegistryError;
use regfs::registry::auth::Credentials;
use regfs::registry::faulty::{Fault, FaultError, FaultyRegistry, Op};
use regfs::registry::http::{HttpOptions, HttpRegistry, REMEMBERED_LINK_WAIT};
use regfs::registry::Registry;

fn client(port: u16, credentials: Option<Credentials>) -> HttpRegistry {
    stub_client(port, credentials, Duration::from_secs(30))
}

fn blob() -> Vec<u8> {
    (0..2048u32).map(|i| (i % 251) as u8).collect()
}

fn digest() -> String {
    sha256_digest(&blob())
}

/// A 206 with the bytes of [`blob`] that `r`'s `Range: bytes=A-B` asks for.
fn ranged(r: &Req) -> common::Resp {
    let range = r.headers.get("range").cloned().unwrap_or_default();
    let (s, e) = range.trim_start_matches("bytes=").split_once('-').unwrap();
    let (s, e): (usize, usize) = (s.parse().unwrap(), e.parse().unwrap());
    resp(206, &blob()[s..=e]).h("Content-Range", &format!("bytes {s}-{e}/2048"))
}

#[tokio::test]
async fn range_answered_with_200_is_sliced() {
    let (port, _) = stub(Arc::new(|_r: &Req| resp(200, blob())));
    let c = client(port, None);
    let b = c.blob_range("a/b", &digest(), 500, 1499).await.unwrap();
    assert_eq!(&b[..], &blob()[500..1500]);
}

#[tokio::test]
async fn blob_answers_are_timed_and_errors_are_not() {
    // A registry that takes 30 ms to answer a blob GET: the client's latency estimate (which
    // sizes the engine's requests) is at least that; an error answer adds no sample.
    let (port, _) = stub(Arc::new(|r: &Req| {
        if r.path.contains("missing") {
            return resp(404, r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#);
        }
        std::thread::sleep(Duration::from_millis(30));
        resp(206, &blob()[0..10]).h("Content-Range", "bytes 0-9/2048")
    }));
    let c = client(port, None);
    assert_eq!(c.blob_latency(), None, "nothing asked yet");
    let missing = sha256_digest(b"missing");
    assert!(c.blob_range("a/missing", &missing, 0, 9).await.is_err());
    assert_eq!(c.blob_latency(), None, "an error is not a blob answer");
    c.blob_range("a/b", &digest(), 0, 9).await.unwrap();
    let l = c.blob_latency().expect("timed");
    assert!(l >= Duration::from_millis(30), "{l:?}");
    assert!(
        l > regfs::config::NEAR_LATENCY,
        "30 ms away is far: 8 MiB requests, several in parallel"
    );
}

#[tokio::test]
async fn wrong_content_range_and_416_are_errors() {
    let (port, _) = stub(Arc::new(|r: &Req| {
        if r.headers.get("range").is_some_and(|v| v == "bytes=0-9") {
            resp(206, &blob()[100..110]).h("Content-Range", "bytes 100-109/2048")
        } else {
            resp(416, "bad range")
        }
    }));
    let c = client(port, None);
    assert!(matches!(
        c.blob_range("a/b", &digest(), 0, 9).await,
        Err(RegistryError::Protocol(_))
    ));
    assert!(matches!(
        c.blob_range("a/b", &digest(), 10, 19).await,
        Err(RegistryError::Protocol(_))
    ));
}

#[tokio::test]
async fn truncated_bodies_resume_from_where_they_stopped() {
    // Every answer stops after 400 bytes; each resumed request asks from the byte it stopped at.
    let (port, log) = stub(Arc::new(|r: &Req| ranged(r).cut_after(400)));
    let c = client(port, None);
    let b = c.blob_range("a/b", &digest(), 0, 999).await.unwrap();
    assert_eq!(&b[..], &blob()[..1000]);
    let ranges: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.headers["range"].clone())
        .collect();
    assert_eq!(ranges, ["bytes=0-999", "bytes=400-999", "bytes=800-999"]);
    assert_eq!(c.stats().snapshot().resumes, 2);
    assert_eq!(c.stats().snapshot().blob_bytes, 1000);
}

/// A registry on a slow link: each answer comes after `delay`, is 96 KiB of data sliced as
/// asked, and is cut after `cut` bytes (as a request timeout cuts a long request).
fn slow_registry(delay: Duration, cut: usize) -> (u16, Arc<Mutex<Vec<Req>>>, Vec<u8>) {
    let data: Vec<u8> = (0..96 << 10).map(|i| (i % 253) as u8).collect();
    let d = data.clone();
    let (port, log) = stub(Arc::new(move |r: &Req| {
        std::thread::sleep(delay);
        let range = r.headers.get("range").cloned().unwrap_or_default();
        let (s, e) = range.trim_start_matches("bytes=").split_once('-').unwrap();
        let (s, e): (usize, usize) = (s.parse().unwrap(), e.parse().unwrap());
        resp(206, &d[s..=e])
            .h("Content-Range", &format!("bytes {s}-{e}/{}", d.len()))
            .cut_after(cut)
    }));
    (port, log, data)
}

#[tokio::test]
async fn a_body_that_keeps_arriving_is_not_given_up_when_the_budget_runs_out() {
    // Each answer takes longer than the whole retry budget (200 ms) and brings 16 KiB (64 KiB/s,
    // above MIN_PROGRESS_RATE): each try renews the budget, 6 tries bring every byte.
    let (port, log, data) = slow_registry(Duration::from_millis(250), 16 << 10);
    let c = stub_client(port, None, Duration::from_millis(200));
    let got = c
        .blob_range("a/b", &sha256_digest(&data), 0, data.len() as u64 - 1)
        .await
        .unwrap();
    assert!(got[..] == data[..]);
    assert_eq!(log.lock().unwrap().len(), 6);
    assert_eq!(c.stats().snapshot().resumes, 5);
}

#[tokio::test]
async fn a_trickle_spends_the_budget_and_fails() {
    // 16 bytes per 250 ms try (64 B/s) is no progress: the budget is not renewed, and the read
    // fails instead of taking 6000 tries.
    let (port, log, data) = slow_registry(Duration::from_millis(250), 16);
    let c = stub_client(port, None, Duration::from_millis(200));
    let e = c
        .blob_range("a/b", &sha256_digest(&data), 0, data.len() as u64 - 1)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Transport(_)), "{e}");
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_lying_content_range_is_an_error_not_a_hang() {
    let (port, _) = stub(Arc::new(|_r: &Req| {
        resp(206, &blob()[0..1000])
            .h("Content-Range", "bytes 0-999/2048")
            .cut_after(400)
    }));
    let c = client(port, None);
    let e = c.blob_range("a/b", &digest(), 0, 999).await.unwrap_err();
    assert!(matches!(e, RegistryError::Protocol(_)), "{e}");
}

#[tokio::test]
async fn rate_limits_retry_within_the_budget_then_fail() {
    let n = Arc::new(Mutex::new(0));
    let n2 = n.clone();
    let (port, log) = stub(Arc::new(move |r: &Req| {
        if r.path.starts_with("/v2/slow/") {
            let mut k = n2.lock().unwrap();
            *k += 1;
            if *k == 1 {
                return resp(429, "slow down").h("Retry-After", "1");
            }
            return resp(200, r#"{"name":"slow","tags":["x"]}"#);
        }
        resp(429, "You have reached your pull rate limit")
    }));
    let c = stub_client(port, None, Duration::from_secs(2));
    assert_eq!(c.tags("slow").await.unwrap(), vec!["x"]);
    let e = c.tags("never").await.unwrap_err();
    assert!(
        matches!(&e, RegistryError::TooManyRequests(m) if m.contains("pull rate limit")),
        "{e}"
    );
    let never = log
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path.starts_with("/v2/never/"))
        .count();
    assert!(
        never > 1,
        "429 is retried within the budget ({never} requests)"
    );
}

#[tokio::test]
async fn relative_opaque_links_are_followed_and_null_tags_tolerated() {
    let (port, log) = stub(Arc::new(|r: &Req| match r.path.as_str() {
        "/v2/q/r/tags/list?n=100" => resp(200, r#"{"name":"q/r","tags":["b","a"]}"#).h(
            "Link",
            r#"</v2/q/r/tags/list?next_page=opaque1&n=100>; rel="next""#,
        ),
        "/v2/q/r/tags/list?next_page=opaque1&n=100" => {
            resp(200, r#"{"name":"q/r","tags":["c","a"]}"#)
                .h("Link", r#"<list?next_page=opaque2>; rel="next""#)
        }
        "/v2/q/r/tags/list?next_page=opaque2" => resp(200, r#"{"name":"q/r","tags":null}"#),
        p => resp(404, format!("unexpected {p}")),
    }));
    let c = client(port, None);
    assert_eq!(c.tags("q/r").await.unwrap(), vec!["a", "b", "c"]);
    assert_eq!(log.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_guess_at_the_tags_reads_one_page_only() {
    let (port, log) = stub(Arc::new(|r: &Req| match r.path.as_str() {
        "/v2/many/tags/list?n=100" => resp(200, r#"{"name":"many","tags":["b","a"]}"#)
            .h("Link", r#"</v2/many/tags/list?last=b&n=100>; rel="next""#),
        "/v2/few/tags/list?n=100" => resp(200, r#"{"name":"few","tags":["b","a"]}"#),
        p => resp(404, format!("unexpected {p}")),
    }));
    let c = client(port, None);
    assert_eq!(c.tags_if_few("many").await.unwrap(), None);
    assert_eq!(
        log.lock().unwrap().len(),
        1,
        "the next page is not asked for"
    );
    assert_eq!(
        c.tags_if_few("few").await.unwrap(),
        Some(vec!["a".to_string(), "b".to_string()])
    );
    assert_eq!(c.stats().snapshot().tag_pages, 2);
}

#[tokio::test]
async fn a_registry_that_refuses_the_page_size_is_asked_without_one() {
    let invalid = r#"{"errors":[{"code":"PAGINATION_NUMBER_INVALID","message":"invalid number of results requested"}]}"#;
    let (port, log) = stub(Arc::new(move |r: &Req| match r.path.as_str() {
        "/v2/x/tags/list?n=100" => resp(400, invalid),
        "/v2/x/tags/list" => resp(200, r#"{"name":"x","tags":["v2","v1"]}"#),
        p => resp(404, format!("unexpected {p}")),
    }));
    let c = client(port, None);
    assert_eq!(c.tags("x").await.unwrap(), ["v1", "v2"]);
    assert_eq!(log.lock().unwrap().len(), 2);
    // A guess (one page) gets the same retry: it is not a page of its own.
    assert_eq!(
        c.tags_if_few("x").await.unwrap(),
        Some(vec!["v1".to_string(), "v2".to_string()])
    );
    assert_eq!(log.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn bearer_challenge_fetches_a_token_once_per_scope() {
    let port_cell = Arc::new(Mutex::new(0u16));
    let pc = port_cell.clone();
    let (port, log) = stub(Arc::new(move |r: &Req| {
        if r.path.starts_with("/token") {
            return resp(200, r#"{"access_token":"T0KEN","expires_in":300}"#);
        }
        if r.headers.get("authorization").map(String::as_str) != Some("Bearer T0KEN") {
            let p = *pc.lock().unwrap();
            return resp(401, r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#).h(
                "WWW-Authenticate",
                &format!(r#"Bearer realm="http://127.0.0.1:{p}/token",service="stub",scope="repository:a/b:pull""#),
            );
        }
        resp(200, r#"{"name":"a/b","tags":["v1"]}"#)
    }));
    *port_cell.lock().unwrap() = port;
    let c = client(
        port,
        Some(Credentials {
            username: "u".into(),
            password: "p".into(),
        }),
    );
    assert_eq!(c.tags("a/b").await.unwrap(), vec!["v1"]);
    assert_eq!(c.tags("a/b").await.unwrap(), vec!["v1"]);
    let reqs = log.lock().unwrap().clone();
    let token_reqs: Vec<_> = reqs
        .iter()
        .filter(|r| r.path.starts_with("/token"))
        .collect();
    assert_eq!(token_reqs.len(), 1, "{reqs:?}");
    assert!(token_reqs[0]
        .path
        .contains("scope=repository%3Aa%2Fb%3Apull"));
    assert!(token_reqs[0].path.contains("service=stub"));
    // The token request carried the credentials (loopback realm), the registry got the token.
    assert!(token_reqs[0]
        .headers
        .get("authorization")
        .is_some_and(|a| a.starts_with("Basic ")));
    assert_eq!(c.stats().snapshot().token_fetches, 1);
}

/// A stub that wants a Bearer token per repository (`T-<scope>`, scope
/// `repository:<name>:pull`; `x/y` wants `pull,push`) and names that scope in its challenge;
/// its token endpoint answers after `delay`.
fn token_stub(delay: Duration) -> (u16, common::ReqLog) {
    let port_cell = Arc::new(Mutex::new(0u16));
    let pc = port_cell.clone();
    let (port, log) = stub(Arc::new(move |r: &Req| {
        if let Some(q) = r.path.strip_prefix("/token?") {
            std::thread::sleep(delay);
            let scope = q
                .split('&')
                .find_map(|kv| kv.strip_prefix("scope="))
                .unwrap_or("")
                .replace("%3A", ":")
                .replace("%2F", "/")
                .replace("%2C", ",");
            return resp(200, format!(r#"{{"token":"T-{scope}","expires_in":300}}"#));
        }
        let repo = r
            .path
            .trim_start_matches("/v2/")
            .split("/tags/")
            .next()
            .unwrap_or("");
        let wanted = if repo == "x/y" {
            format!("repository:{repo}:pull,push")
        } else {
            format!("repository:{repo}:pull")
        };
        if r.headers.get("authorization") != Some(&format!("Bearer T-{wanted}")) {
            let p = *pc.lock().unwrap();
            return resp(401, "").h(
                "WWW-Authenticate",
                &format!(
                    r#"Bearer realm="http://127.0.0.1:{p}/token",service="stub",scope="{wanted}""#
                ),
            );
        }
        resp(200, format!(r#"{{"name":"{repo}","tags":["v1"]}}"#))
    }));
    *port_cell.lock().unwrap() = port;
    (port, log)
}

#[tokio::test]
async fn concurrent_requests_share_one_token_fetch_per_scope() {
    // 16 requests at once to a registry never asked before: all 16 are challenged, and one
    // token fetch answers them all. Then 16 at once to another repository (Bearer now known, so
    // its token is fetched ahead): again one fetch. Before, each request fetched its own.
    // The token endpoint takes 100 ms, so the 16 pile up behind its first fetch.
    let (port, log) = token_stub(Duration::from_millis(100));
    let c = Arc::new(client(port, None));
    for repo in ["a/b", "c/d"] {
        let asks: Vec<_> = (0..16)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.tags(repo).await })
            })
            .collect();
        for a in asks {
            assert_eq!(a.await.unwrap().unwrap(), vec!["v1"]);
        }
    }
    let tokens: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path.starts_with("/token"))
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    assert_eq!(c.stats().snapshot().token_fetches, 2);
}

#[tokio::test]
async fn a_new_repositorys_token_is_fetched_before_its_first_request() {
    // Once the registry has said it wants Bearer tokens, the token of a repository not asked
    // for yet is fetched first: no 401 round trip per new repository. Tokens are per scope;
    // `x/y` wants a scope of its own, which its challenge names (and which then wins).
    let (port, log) = token_stub(Duration::ZERO);
    let c = client(port, None);
    let refused = |log: &Arc<Mutex<Vec<Req>>>| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|r| r.path.starts_with("/v2/"))
            .count()
    };
    assert_eq!(c.tags("a/b").await.unwrap(), vec!["v1"]);
    assert_eq!(
        refused(&log),
        2,
        "the first repository learns the scheme: a 401, then the token"
    );
    for repo in ["c/d", "e/f", "g/h"] {
        assert_eq!(c.tags(repo).await.unwrap(), vec!["v1"]);
    }
    assert_eq!(refused(&log), 5, "one request each, with its token");
    assert_eq!(c.stats().snapshot().token_fetches, 4);
    // A scope of its own: the token fetched ahead is refused, the challenge's scope wins.
    assert_eq!(c.tags("x/y").await.unwrap(), vec!["v1"]);
    assert_eq!(c.tags("x/y").await.unwrap(), vec!["v1"]);
    assert_eq!(refused(&log), 8);
    assert_eq!(c.stats().snapshot().token_fetches, 6);
}

#[tokio::test]
async fn lying_docker_content_digest_is_a_mismatch() {
    let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"sha256:aa","size":1},"layers":[]}"#;
    let (port, _) = stub(Arc::new(move |_r: &Req| {
        resp(200, body.to_vec())
            .h("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .h(
                "Docker-Content-Digest",
                &format!("sha256:{}", "0".repeat(64)),
            )
    }));
    let c = client(port, None);
    assert!(matches!(
        c.manifest("a/b", "v1").await,
        Err(RegistryError::DigestMismatch { .. })
    ));
    // Asked by digest, the body must hash to it.
    let wrong = format!("sha256:{}", "1".repeat(64));
    assert!(matches!(
        c.manifest("a/b", &wrong).await,
        Err(RegistryError::DigestMismatch { .. })
    ));
}

#[tokio::test]
async fn error_bodies_name_the_problem() {
    let (port, _) = stub(Arc::new(|_r: &Req| {
        resp(
            404,
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"v9"}}]}"#,
        )
    }));
    let c = client(port, None);
    let e = c.manifest("a/b", "v9").await.unwrap_err();
    assert!(
        matches!(&e, RegistryError::NotFound(m) if m.contains("MANIFEST_UNKNOWN: manifest unknown")),
        "{e}"
    );
}

#[tokio::test]
async fn redirects_to_another_host_drop_credentials_and_keep_range() {
    let (storage, storage_log) = stub(Arc::new(|r: &Req| {
        if r.headers.contains_key("authorization") {
            return resp(400, "Only one auth mechanism allowed");
        }
        let range = r.headers.get("range").cloned().unwrap_or_default();
        assert_eq!(range, "bytes=10-19");
        resp(206, &blob()[10..20]).h("Content-Range", "bytes 10-19/2048")
    }));
    let (port, _) = stub(Arc::new(move |r: &Req| {
        if !r.headers.contains_key("authorization") {
            return resp(401, "").h("WWW-Authenticate", r#"Basic realm="x""#);
        }
        resp(307, "").h(
            "Location",
            &format!("http://127.0.0.1:{storage}/data?sig=1"),
        )
    }));
    let c = client(
        port,
        Some(Credentials {
            username: "u".into(),
            password: "secret".into(),
        }),
    );
    let b = c.blob_range("a/b", &digest(), 10, 19).await.unwrap();
    assert_eq!(&b[..], &blob()[10..20]);
    assert!(storage_log
        .lock()
        .unwrap()
        .iter()
        .all(|r| !r.headers.contains_key("authorization")));
}

/// How storage behind a redirect treats the first link (`sig=1`) once the test says so.
#[derive(Clone, Copy)]
enum Expiry {
    /// 403, as an expired presigned link.
    Refused,
    /// The connection closed with no answer.
    HungUp,
    /// A success with the wrong bytes' Content-Range.
    WrongRange,
    /// No answer for longer than a remembered link is waited for.
    Stuck,
}

/// Storage behind a redirect: serves `bytes=A-B` of [`blob`] at any path; once `expired` is set,
/// the link `sig=1` fails as `how` says.
fn storage(expired: Arc<AtomicBool>, how: Expiry) -> (u16, Arc<Mutex<Vec<Req>>>) {
    stub(Arc::new(move |r: &Req| {
        if r.headers.contains_key("authorization") {
            return resp(400, "Only one auth mechanism allowed");
        }
        if expired.load(Ordering::SeqCst) && r.path.ends_with("sig=1") {
            return match how {
                Expiry::Refused => resp(403, "Request has expired"),
                Expiry::HungUp => common::hangup(),
                Expiry::WrongRange => {
                    resp(206, &blob()[0..10]).h("Content-Range", "bytes 0-9/2048")
                }
                Expiry::Stuck => {
                    std::thread::sleep(REMEMBERED_LINK_WAIT + Duration::from_secs(3));
                    common::hangup()
                }
            };
        }
        ranged(r)
    }))
}

/// A registry (Basic auth) that redirects every blob GET to `storage`, with a new `sig` each time.
fn redirecting_registry(storage: u16) -> (u16, Arc<Mutex<Vec<Req>>>) {
    let signed = Arc::new(AtomicU32::new(0));
    stub(Arc::new(move |r: &Req| {
        if !r.headers.contains_key("authorization") {
            return resp(401, "").h("WWW-Authenticate", r#"Basic realm="x""#);
        }
        let sig = signed.fetch_add(1, Ordering::SeqCst) + 1;
        resp(307, "").h(
            "Location",
            &format!("http://127.0.0.1:{storage}/data?sig={sig}"),
        )
    }))
}

/// Authorized blob GETs the registry answered.
fn blob_gets(log: &Arc<Mutex<Vec<Req>>>) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|r| r.path.contains("/blobs/") && r.headers.contains_key("authorization"))
        .count()
}

fn paths(log: &Arc<Mutex<Vec<Req>>>) -> Vec<String> {
    log.lock().unwrap().iter().map(|r| r.path.clone()).collect()
}

fn user() -> Option<Credentials> {
    Some(Credentials {
        username: "u".into(),
        password: "secret".into(),
    })
}

#[tokio::test]
async fn a_blobs_redirect_target_is_remembered_for_its_next_ranges() {
    // Docker Hub, GHCR and ECR redirect every blob GET to storage: asking the registry each
    // time costs a round trip per Range request. The second and third ranges go straight there.
    let (sport, slog) = storage(Arc::default(), Expiry::Refused);
    let (port, log) = redirecting_registry(sport);
    let c = client(port, user());
    for (a, b) in [(0, 9), (100, 199), (2000, 2047)] {
        let got = c.blob_range("a/b", &digest(), a, b).await.unwrap();
        assert_eq!(&got[..], &blob()[a as usize..=b as usize]);
    }
    assert_eq!(blob_gets(&log), 1, "the registry was asked once");
    assert_eq!(paths(&slog), vec!["/data?sig=1"; 3]);
    assert!(slog
        .lock()
        .unwrap()
        .iter()
        .all(|r| !r.headers.contains_key("authorization")));
    let s = c.stats().snapshot();
    assert_eq!(
        (s.blob_redirects, s.redirect_reuses, s.redirect_failures),
        (1, 2, 0)
    );
    // Another repository's blob of the same digest is its own registry path's to authorize.
    c.blob_range("c/d", &digest(), 0, 9).await.unwrap();
    assert_eq!(blob_gets(&log), 2);
}

#[tokio::test]
async fn a_failed_redirect_target_is_forgotten_and_the_registry_asked_again() {
    for how in [Expiry::Refused, Expiry::HungUp, Expiry::Stuck] {
        let expired = Arc::new(AtomicBool::new(false));
        let (sport, slog) = storage(expired.clone(), how);
        let (port, log) = redirecting_registry(sport);
        // No retry budget: the fallback to the registry is not a retry.
        let c = stub_client(port, user(), Duration::ZERO);
        c.blob_range("a/b", &digest(), 0, 9).await.unwrap();
        expired.store(true, Ordering::SeqCst);
        let got = c.blob_range("a/b", &digest(), 10, 19).await.unwrap();
        assert_eq!(&got[..], &blob()[10..20]);
        let got = c.blob_range("a/b", &digest(), 20, 29).await.unwrap();
        assert_eq!(&got[..], &blob()[20..30]);
        assert_eq!(
            blob_gets(&log),
            2,
            "asked again once, then sig=2 was remembered"
        );
        assert_eq!(
            paths(&slog),
            ["/data?sig=1", "/data?sig=1", "/data?sig=2", "/data?sig=2"]
        );
        let s = c.stats().snapshot();
        assert_eq!(
            (s.redirect_reuses, s.redirect_failures, s.retries),
            (2, 1, 0)
        );
    }
}

#[tokio::test]
async fn a_remembered_target_that_answers_wrongly_fails_that_read_only() {
    let expired = Arc::new(AtomicBool::new(false));
    let (sport, slog) = storage(expired.clone(), Expiry::WrongRange);
    let (port, log) = redirecting_registry(sport);
    let c = stub_client(port, user(), Duration::ZERO);
    c.blob_range("a/b", &digest(), 0, 9).await.unwrap();
    expired.store(true, Ordering::SeqCst);
    let e = c.blob_range("a/b", &digest(), 100, 109).await.unwrap_err();
    assert!(e.to_string().contains("Content-Range"), "{e}");
    // Forgotten: the next read asks the registry, and its new link works.
    let got = c.blob_range("a/b", &digest(), 100, 109).await.unwrap();
    assert_eq!(&got[..], &blob()[100..110]);
    assert_eq!(blob_gets(&log), 2);
    assert_eq!(paths(&slog), ["/data?sig=1", "/data?sig=1", "/data?sig=2"]);
}

#[tokio::test]
async fn a_storage_links_signature_never_reaches_an_error_message() {
    // A presigned link is a credential for its blob: a transport error on it (storage hangs
    // up) names the request, not the URL.
    let (storage, _) = stub(Arc::new(|_r: &Req| common::hangup()));
    let (port, _) = stub(Arc::new(move |_r: &Req| {
        resp(307, "").h(
            "Location",
            &format!("http://127.0.0.1:{storage}/data?X-Amz-Signature=SECRET123"),
        )
    }));
    let c = stub_client(port, None, Duration::ZERO);
    let e = c.blob_range("a/b", &digest(), 0, 9).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("a/b@sha256:"), "{msg}");
    assert!(
        !msg.contains("SECRET123") && !msg.contains("/data"),
        "{msg}"
    );
}

#[tokio::test]
async fn no_redirect_is_remembered_with_a_zero_ttl() {
    let (sport, _slog) = storage(Arc::default(), Expiry::Refused);
    let (port, log) = redirecting_registry(sport);
    let c = HttpRegistry::new(HttpOptions {
        base: reqwest::Url::parse(&format!("http://127.0.0.1:{port}")).unwrap(),
        credentials: user(),
        ca_cert_pem: None,
        insecure: false,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        redirect_ttl: Duration::ZERO,
    })
    .unwrap();
    for _ in 0..3 {
        c.blob_range("a/b", &digest(), 0, 9).await.unwrap();
    }
    assert_eq!(blob_gets(&log), 3);
    assert_eq!(c.stats().snapshot().redirect_reuses, 0);
}

#[tokio::test]
async fn out_of_order_patch_acknowledgements_are_errors() {
    // distribution 2.8 appends silently; a client must check the Range it answers with.
    let (port, _) = stub(Arc::new(|r: &Req| match r.method.as_str() {
        "POST" => resp(202, "").h("Location", "/v2/a/b/blobs/uploads/u1?_state=x"),
        "PATCH" => resp(202, "")
            .h("Location", "/v2/a/b/blobs/uploads/u1?_state=y")
            .h("Range", "0-4"),
        _ => resp(204, ""),
    }));
    let c = client(port, None);
    let mut s = c.upload_start("a/b").await.unwrap();
    assert!(s
        .location
        .starts_with(&format!("http://127.0.0.1:{port}/v2/a/b/blobs/uploads/u1")));
    c.upload_patch("a/b", &mut s, bytes::Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert!(
        s.location.ends_with("_state=y"),
        "the latest Location is used"
    );
    let e = c
        .upload_patch("a/b", &mut s, bytes::Bytes::from_static(b"world"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RegistryError::Protocol(m) if m.contains("acknowledged")),
        "{e}"
    );
}

#[tokio::test]
async fn faults_inject_into_the_http_client() {
    // The failure-injecting wrapper works over the real client, not only over the fake.
    let (port, log) = stub(Arc::new(|r: &Req| {
        let b = blob();
        match (r.method.as_str(), r.headers.get("range")) {
            ("GET", Some(range)) => {
                let (s, e) = range.trim_start_matches("bytes=").split_once('-').unwrap();
                let (s, e): (usize, usize) = (s.parse().unwrap(), e.parse().unwrap());
                resp(206, &b[s..=e]).h("Content-Range", &format!("bytes {s}-{e}/{}", b.len()))
            }
            ("POST", _) => resp(202, "").h("Location", "/v2/a/b/blobs/uploads/u1"),
            _ => resp(200, b),
        }
    }));
    let faults = FaultyRegistry::new(Arc::new(client(port, None)));
    let d = digest();
    let sent = |method: &str| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|r| r.method == method)
            .count()
    };
    // Nothing queued: the wrapper is transparent.
    let b = faults.blob_range("a/b", &d, 10, 19).await.unwrap();
    assert_eq!(&b[..], &blob()[10..20]);
    assert_eq!(sent("GET"), 1);
    // An injected error never reaches the server, but counts as a request.
    faults.inject(Op::BlobRange, Fault::Error(FaultError::TooManyRequests));
    let e = faults.blob_range("a/b", &d, 0, 9).await.unwrap_err();
    assert!(matches!(e, RegistryError::TooManyRequests(_)), "{e}");
    assert_eq!(sent("GET"), 1);
    assert_eq!(faults.stats().snapshot().blob_gets, 2);
    // Body faults spoil what the server sent.
    faults.inject(Op::BlobRange, Fault::Truncate);
    assert_eq!(faults.blob_range("a/b", &d, 0, 99).await.unwrap().len(), 50);
    faults.inject(Op::BlobRange, Fault::Corrupt);
    let b = faults.blob_range("a/b", &d, 0, 9).await.unwrap();
    assert_eq!(b.len(), 10);
    assert_ne!(&b[..], &blob()[..10]);
    faults.inject(Op::BlobRange, Fault::WholeBody);
    let b = faults.blob_range("a/b", &d, 0, 9).await.unwrap();
    assert_eq!(&b[..], &blob()[..]);
    assert_eq!(sent("HEAD"), 1, "the whole body needs the blob's size");
    // Write side: a PATCH that fails leaves the session where it was, and is not sent.
    let mut s = faults.upload_start("a/b").await.unwrap();
    faults.inject(Op::UploadPatch, Fault::Error(FaultError::Server));
    let e = faults
        .upload_patch("a/b", &mut s, bytes::Bytes::from_static(b"hello"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::Server { status: 500, .. }),
        "{e}"
    );
    assert_eq!(s.offset, 0);
    assert_eq!(sent("PATCH"), 0);
    assert_eq!(faults.stats().snapshot().upload_patches, 1);
    assert_eq!(faults.pending(), 0);
}
