//! A scripted HTTP stub server for client tests: each request goes to a handler closure that
//! answers it (status, headers, body; optionally cut short, or the connection dropped with no
//! answer), and every request is logged with its headers. One request per connection
//! (`Connection: close`), on 127.0.0.1 or any other loopback address, with a free port.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use regfs::registry::auth::Credentials;
use regfs::registry::http::{HttpOptions, HttpRegistry};

/// One request as the stub saw it (header names lowercased).
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

/// The stub's answer.
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Send only this many body bytes, then close (a truncated body).
    pub cut: Option<usize>,
    /// Close the connection without answering at all.
    pub hangup: bool,
}

pub fn resp(status: u16, body: impl Into<Vec<u8>>) -> Resp {
    Resp {
        status,
        headers: vec![],
        body: body.into(),
        cut: None,
        hangup: false,
    }
}

/// No answer: the connection is closed after the request is read.
pub fn hangup() -> Resp {
    Resp {
        hangup: true,
        ..resp(0, "")
    }
}

impl Resp {
    pub fn h(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn cut_after(mut self, n: usize) -> Self {
        self.cut = Some(n);
        self
    }
}

pub type Handler = Arc<dyn Fn(&Req) -> Resp + Send + Sync>;
pub type ReqLog = Arc<Mutex<Vec<Req>>>;

/// Serve `handler` on 127.0.0.1 with a free port; returns the port and the log of requests.
pub fn stub(handler: Handler) -> (u16, ReqLog) {
    stub_on("127.0.0.1", handler)
}

/// Serve `handler` on loopback address `ip` (e.g. 127.0.0.2, "another host") with a free port.
pub fn stub_on(ip: &str, handler: Handler) -> (u16, ReqLog) {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { break };
            let handler = handler.clone();
            let log = log2.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut first = String::new();
                if r.read_line(&mut first).unwrap_or(0) == 0 {
                    return;
                }
                let mut parts = first.split_whitespace();
                let method = parts.next().unwrap_or("").to_string();
                let path = parts.next().unwrap_or("").to_string();
                let mut headers = HashMap::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let len: usize = headers
                    .get("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; len.min(64 << 20)];
                let _ = r.read_exact(&mut body);
                let req = Req {
                    method,
                    path,
                    headers,
                    body,
                };
                log.lock().unwrap().push(req.clone());
                let out = handler(&req);
                if out.hangup {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    return;
                }
                let has_len = out
                    .headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
                let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", out.status);
                if !has_len {
                    head.push_str(&format!("Content-Length: {}\r\n", out.body.len()));
                }
                for (k, v) in &out.headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = s.write_all(head.as_bytes());
                if req.method != "HEAD" {
                    let n = out.cut.unwrap_or(out.body.len()).min(out.body.len());
                    let _ = s.write_all(&out.body[..n]);
                }
                let _ = s.flush();
            });
        }
    });
    (port, log)
}

/// A client of the stub on 127.0.0.1:`port`, with a retry budget.
pub fn stub_client(
    port: u16,
    credentials: Option<Credentials>,
    retry_budget: Duration,
) -> HttpRegistry {
    HttpRegistry::new(HttpOptions {
        base: reqwest::Url::parse(&format!("http://127.0.0.1:{port}")).unwrap(),
        credentials,
        ca_cert_pem: None,
        insecure: false,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        redirect_ttl: regfs::registry::http::REDIRECT_TTL,
    })
    .unwrap()
    .with_retry_budget(retry_budget)
}
