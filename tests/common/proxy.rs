//! A small HTTP fault proxy for the real-registry fault tests: it listens on a loopback address
//! with a free port and forwards each request (one per connection) to a `docker-registry` on
//! 127.0.0.1, and by its [`ProxyRules`] can answer every k-th request with an error status, cut
//! every k-th blob body after n bytes, redirect blob GETs, point `Location` and `Link` at another
//! host, add a `Link` to tag lists, or add credentials of its own (playing a storage host
//! with a presigned right). It logs every request with its headers and counts what it did.
//! Also: restarting a [`TestRegistry`] on the port it had.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{spawn_registry, TestRegistry};

/// What the proxy does to the traffic. The default forwards everything untouched.
#[derive(Default, Clone)]
pub struct ProxyRules {
    /// (k, statuses): every k-th request is answered with the next of `statuses` in turn.
    pub fail_every: Option<(usize, Vec<u16>)>,
    /// (k, n): the body of every k-th blob GET is cut after n bytes.
    pub cut_every: Option<(usize, usize)>,
    /// Blob GETs are answered `307` to this base URL, same path.
    pub redirect_blobs_to: Option<String>,
    /// `Location` and `Link` targets are moved to this base URL (another host).
    pub rewrite_to: Option<String>,
    /// Tag lists get a `Link` to a next page: the same list at `rewrite_to` (distribution 2.8
    /// does not paginate tags itself).
    pub link_tags: bool,
    /// An `Authorization` value added to forwarded requests that carry none.
    pub add_auth: Option<String>,
    /// Scripted faults for chosen requests (`super::script`), tried before the rules above.
    pub script: Vec<Arc<super::Scripted>>,
    /// Every blob GET body gets its middle byte flipped (a corrupting source).
    pub flip_blob_bytes: bool,
}

/// One request as the proxy saw it (header names lowercased).
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
}

/// What the proxy did.
#[derive(Default)]
pub struct ProxyCounts {
    pub requests: AtomicUsize,
    pub failed: AtomicUsize,
    pub cut: AtomicUsize,
    pub blob_gets: AtomicUsize,
    pub redirected: AtomicUsize,
    pub flipped: AtomicUsize,
}

pub struct FaultProxy {
    pub ip: String,
    pub port: u16,
    /// The registry port requests go to (127.0.0.1).
    pub upstream: Arc<AtomicU16>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub counts: Arc<ProxyCounts>,
}

impl FaultProxy {
    pub fn start(ip: &str, upstream: u16, rules: ProxyRules) -> Self {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = FaultProxy {
            ip: ip.to_string(),
            port,
            upstream: Arc::new(AtomicU16::new(upstream)),
            seen: Arc::default(),
            counts: Arc::default(),
        };
        let (up, seen, counts) = (
            proxy.upstream.clone(),
            proxy.seen.clone(),
            proxy.counts.clone(),
        );
        let rules = Arc::new(rules);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(s) = stream else { break };
                let (up, seen, counts, rules) =
                    (up.clone(), seen.clone(), counts.clone(), rules.clone());
                std::thread::spawn(move || {
                    let _ = serve(s, up.load(Ordering::SeqCst), &rules, &seen, &counts);
                });
            }
        });
        proxy
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }
}

fn read_head(r: &mut impl BufRead) -> std::io::Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" || line == "\n" {
            return Ok(lines);
        }
        lines.push(line.trim_end().to_string());
    }
}

fn header_map(lines: &[String]) -> HashMap<String, String> {
    lines
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

fn serve(
    client: TcpStream,
    upstream: u16,
    rules: &ProxyRules,
    seen: &Mutex<Vec<Seen>>,
    counts: &ProxyCounts,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut cr = BufReader::new(client.try_clone()?);
    let mut out = client;
    let head = read_head(&mut cr)?;
    let first = head.first().cloned().unwrap_or_default();
    let mut parts = first.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let headers = header_map(&head[1..]);
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    cr.read_exact(&mut body)?;
    seen.lock().unwrap().push(Seen {
        method: method.clone(),
        path: path.clone(),
        headers: headers.clone(),
    });
    let n = counts.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let answer = |out: &mut TcpStream, status: u16, extra: &str| {
        let _ = write!(
            out,
            "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n{extra}\r\n"
        );
        let _ = out.shutdown(Shutdown::Both);
    };
    let act = super::script::pick(&rules.script, &method, &path);
    if let Some(super::Act::Status(status)) = act {
        answer(&mut out, status, "");
        return Ok(());
    }
    if let Some((k, statuses)) = &rules.fail_every {
        if n.is_multiple_of(*k) {
            let j = counts.failed.fetch_add(1, Ordering::SeqCst);
            answer(&mut out, statuses[j % statuses.len()], "Retry-After: 0\r\n");
            return Ok(());
        }
    }
    let blob_get = method == "GET" && path.contains("/blobs/sha256:");
    if blob_get {
        if let Some(base) = &rules.redirect_blobs_to {
            counts.redirected.fetch_add(1, Ordering::SeqCst);
            answer(&mut out, 307, &format!("Location: {base}{path}\r\n"));
            return Ok(());
        }
    }
    // The registry is down: drop the connection, as a refused one would fail.
    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
        let _ = out.shutdown(Shutdown::Both);
        return Ok(());
    };
    let mut uw = up.try_clone()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    for l in &head[1..] {
        if !l.to_ascii_lowercase().starts_with("connection:") {
            req.push_str(l);
            req.push_str("\r\n");
        }
    }
    if let Some(auth) = &rules.add_auth {
        if !headers.contains_key("authorization") {
            req.push_str(&format!("Authorization: {auth}\r\n"));
        }
    }
    req.push_str("Connection: close\r\n\r\n");
    uw.write_all(req.as_bytes())?;
    uw.write_all(&body)?;
    let mut ur = BufReader::new(up);
    let rhead = read_head(&mut ur)?;
    if act == Some(super::Act::DropAnswer) {
        let _ = out.shutdown(Shutdown::Both);
        return Ok(());
    }
    let mut resp = String::new();
    for (i, l) in rhead.iter().enumerate() {
        let lower = l.to_ascii_lowercase();
        if i > 0 && lower.starts_with("connection:") {
            continue;
        }
        match (&rules.rewrite_to, lower.split_once(':').map(|(k, _)| k)) {
            (Some(base), Some("location")) => {
                let v = l.split_once(':').unwrap().1.trim();
                let path = match v.find("/v2/") {
                    Some(i) => &v[i..],
                    None => v,
                };
                resp.push_str(&format!("Location: {base}{path}\r\n"));
            }
            (Some(base), Some("link")) => {
                let v = l.split_once(':').unwrap().1.trim();
                resp.push_str(&format!(
                    "Link: {}\r\n",
                    v.replacen("</", &format!("<{base}/"), 1)
                ));
            }
            _ => {
                resp.push_str(l);
                resp.push_str("\r\n");
            }
        }
    }
    if let (true, Some(base)) = (rules.link_tags, &rules.rewrite_to) {
        if path.contains("/tags/list") {
            resp.push_str(&format!("Link: <{base}{path}&page=2>; rel=\"next\"\r\n"));
        }
    }
    resp.push_str("Connection: close\r\n\r\n");
    out.write_all(resp.as_bytes())?;
    let ok = rhead
        .first()
        .is_some_and(|l| l.contains(" 200") || l.contains(" 206"));
    let cut = if blob_get && ok && method == "GET" {
        let b = counts.blob_gets.fetch_add(1, Ordering::SeqCst) + 1;
        let body_len: usize = header_map(&rhead[1..])
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        // Only a body longer than the limit is cut (and counted).
        rules
            .cut_every
            .filter(|&(k, n)| b.is_multiple_of(k) && body_len > n)
            .map(|(_, n)| n)
    } else {
        None
    };
    match cut {
        None if blob_get && ok && rules.flip_blob_bytes => {
            let mut body = Vec::new();
            ur.read_to_end(&mut body)?;
            let mid = body.len() / 2;
            if let Some(b) = body.get_mut(mid) {
                *b ^= 0x5a;
                counts.flipped.fetch_add(1, Ordering::SeqCst);
            }
            out.write_all(&body)?;
        }
        Some(limit) => {
            counts.cut.fetch_add(1, Ordering::SeqCst);
            std::io::copy(&mut (&mut ur).take(limit as u64), &mut out)?;
        }
        None => {
            std::io::copy(&mut ur, &mut out)?;
        }
    }
    let _ = out.shutdown(Shutdown::Both);
    Ok(())
}

impl TestRegistry {
    /// Start the stopped registry again on the same storage and the same port (so a client's
    /// address stays valid). Panics if the port was taken meanwhile.
    pub fn start_again_on_same_port(&mut self) {
        let cfg = std::fs::read_to_string(self.dir.path().join("config.yml")).unwrap();
        let cfg = cfg.replace(
            "addr: 127.0.0.1:0",
            &format!("addr: 127.0.0.1:{}", self.port),
        );
        let path = self.dir.path().join("config-same-port.yml");
        std::fs::write(&path, cfg).unwrap();
        let (child, port) = spawn_registry(&path);
        assert_eq!(port, self.port);
        self.child = child;
    }
}
