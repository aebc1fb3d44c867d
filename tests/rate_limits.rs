//! Docker Hub conventions against a stub HTTP server: a pull-limit 429 (its `ratelimit-*`
//! headers say nothing remains) is told from a plain 429, in the counters, the log and
//! `.regfs/stats`; the headers last seen are kept; an HTTP-date `Retry-After` is honoured within
//! the retry budget. Everything is asserted by counting requests, never by timing.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use regfs::error::RegistryError;
use regfs::registry::Registry;

const LIMIT: &str = "100;w=21600";

fn count(log: &ReqLog, prefix: &str) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|r| r.path.starts_with(prefix))
        .count()
}

/// Docker Hub's answers: a pull limit, a plain 429, and a success that reports the quota.
fn hub(r: &Req) -> Resp {
    let p = r.path.as_str();
    if p == "/v2/" {
        resp(200, "{}")
    } else if p.starts_with("/v2/_catalog") {
        resp(200, r#"{"repositories":["hub/img","plain/img","ok/img"]}"#)
    } else if p.starts_with("/v2/hub/") {
        resp(
            429,
            r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}"#,
        )
        .h("ratelimit-limit", LIMIT)
        .h("ratelimit-remaining", "0;w=21600")
        .h("docker-ratelimit-source", "192.0.2.7")
    } else if p.starts_with("/v2/plain/") {
        resp(429, "slow down")
    } else if p.starts_with("/v2/ok/img/tags/list") {
        resp(200, r#"{"name":"ok/img","tags":["v1"]}"#)
            .h("ratelimit-limit", LIMIT)
            .h("ratelimit-remaining", "76;w=21600")
    } else {
        resp(404, "")
    }
}

#[tokio::test]
async fn a_pull_limit_is_told_from_a_plain_429_and_not_retried() {
    let (port, log) = stub(Arc::new(hub));
    let c = stub_client(port, None, Duration::from_secs(1));

    assert_eq!(c.tags("ok/img").await.unwrap(), ["v1"]);
    let rl = c.rate_limit().expect("headers kept");
    assert_eq!(rl.limit.as_deref(), Some(LIMIT));
    assert_eq!(rl.remaining_count, Some(76));

    let e = c.tags("hub/img").await.unwrap_err();
    assert!(
        matches!(&e, RegistryError::TooManyRequests(m) if m.contains("pull rate limit")),
        "{e}"
    );
    assert_eq!(
        count(&log, "/v2/hub/"),
        1,
        "a pull limit lasts hours: no retry"
    );
    let rl = c.rate_limit().unwrap();
    assert!(rl.exhausted());
    assert_eq!(rl.source.as_deref(), Some("192.0.2.7"));

    assert!(matches!(
        c.tags("plain/img").await.unwrap_err(),
        RegistryError::TooManyRequests(_)
    ));
    let plain = count(&log, "/v2/plain/");
    assert!(
        plain > 1,
        "a plain 429 is retried within the budget ({plain})"
    );
    let s = c.stats().snapshot();
    assert_eq!((s.pull_limited, s.rate_limited), (1, plain as u64));
    // The last headers seen stay those of the pull limit (the plain 429 had none).
    assert!(c.rate_limit().unwrap().exhausted());
}

#[test]
fn the_log_and_stats_say_which_429_it_was() {
    let (port, _log) = stub(Arc::new(hub));
    let m = TestMount::new(&format!("127.0.0.1:{port}"), &["--retry-budget", "1s"]);
    let list = |p: &str| {
        std::fs::read_dir(m.p(p)).and_then(|d| d.collect::<Result<Vec<_>, _>>().map(|_| ()))
    };
    assert_eq!(errno(&list("hub/img/tags").unwrap_err()), libc::EAGAIN);
    assert_eq!(errno(&list("plain/img/tags").unwrap_err()), libc::EAGAIN);
    let log = m.log_text();
    assert!(
        log.contains("pull rate limit reached (ratelimit-limit: 100;w=21600, ratelimit-remaining: 0;w=21600)"),
        "{log}"
    );
    assert!(log.contains("plain rate limiting"), "{log}");
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.p(".regfs/stats")).unwrap()).unwrap();
    assert_eq!(stats["rate_limit"]["ratelimit-limit"], LIMIT);
    assert_eq!(stats["rate_limit"]["ratelimit-remaining"], "0;w=21600");
    assert_eq!(stats["rate_limited"]["pull_limit"], 1);
    assert!(stats["rate_limited"]["plain"].as_u64().unwrap() >= 1);
}

/// An HTTP-date `secs` seconds from now (IMF-fixdate), made by date(1).
fn http_date(from_now: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let out = std::process::Command::new("date")
        .env("LC_ALL", "C")
        .args(["-u", "-d", &format!("@{}", now + from_now)])
        .arg("+%a, %d %b %Y %H:%M:%S GMT")
        .output()
        .expect("date");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A stub that answers the first request of each repository with 503 and `Retry-After: <date>`,
/// then 200.
fn retry_after_date(date: String) -> (u16, ReqLog) {
    let n = Arc::new(AtomicUsize::new(0));
    stub(Arc::new(move |_r: &Req| {
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            return resp(503, "restarting").h("Retry-After", &date);
        }
        resp(200, r#"{"name":"a/b","tags":["v1"]}"#)
    }))
}

#[tokio::test]
async fn an_http_date_retry_after_is_honoured_within_the_budget() {
    // Soon (or already past): waited out, then retried once.
    for from_now in [1, -3600] {
        let (port, log) = retry_after_date(http_date(from_now));
        let c = stub_client(port, None, Duration::from_secs(10));
        assert_eq!(c.tags("a/b").await.unwrap(), ["v1"], "{from_now}");
        assert_eq!(log.lock().unwrap().len(), 2);
        assert_eq!(c.stats().snapshot().retries, 1);
    }
    // An hour away: beyond the budget, so the answer stands at once, without a wait.
    let (port, log) = retry_after_date(http_date(3600));
    let c = stub_client(port, None, Duration::from_secs(10));
    let e = c.tags("a/b").await.unwrap_err();
    assert!(
        matches!(e, RegistryError::Server { status: 503, .. }),
        "{e}"
    );
    assert_eq!(log.lock().unwrap().len(), 1);
    assert_eq!(c.stats().snapshot().retries, 0);
    // A date no parser knows is no hint: plain backoff, retried.
    let (port, log) = retry_after_date("next tuesday".into());
    let c = stub_client(port, None, Duration::from_secs(10));
    assert_eq!(c.tags("a/b").await.unwrap(), ["v1"]);
    assert_eq!(log.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_post_waits_out_one_429_only_when_told_how_long() {
    for (retry_after, want_requests, ok) in [(None, 1, false), (Some("1"), 2, true)] {
        let n = Arc::new(AtomicUsize::new(0));
        let (port, log) = stub(Arc::new(move |_r: &Req| {
            if n.fetch_add(1, Ordering::SeqCst) == 0 {
                let r = resp(429, "slow down");
                return match retry_after {
                    Some(s) => r.h("Retry-After", s),
                    None => r,
                };
            }
            resp(202, "").h("Location", "/v2/a/b/blobs/uploads/u1")
        }));
        let c = stub_client(port, None, Duration::from_secs(10));
        assert_eq!(c.upload_start("a/b").await.is_ok(), ok, "{retry_after:?}");
        assert_eq!(log.lock().unwrap().len(), want_requests, "{retry_after:?}");
        assert_eq!(c.stats().snapshot().rate_limited, 1);
    }
}
