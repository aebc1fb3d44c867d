//! Object storage on loopback, for registries that redirect blob GETs: a small HTTP/1.1 file
//! server (GET and HEAD, one `Range: bytes=A-B`, keep-alive) over a directory, as S3 or a CDN
//! serves the links that distribution's `redirect` storage middleware hands out (the URL's path is
//! the blob's path under the registry's own storage root). Every request is logged. Used by the
//! real-tier tests and, through `examples/blob_storage.rs`, by `scripts/bench.sh`.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One request as the storage saw it.
#[derive(Debug, Clone)]
pub struct StorageReq {
    pub method: String,
    pub path: String,
    /// It carried an `Authorization` header (a credential sent where it must not go).
    pub authorization: bool,
}

pub type StorageLog = Arc<Mutex<Vec<StorageReq>>>;

/// Serve the files under `root` on `listener` until the process ends; returns the request log.
pub fn serve_storage(listener: TcpListener, root: PathBuf) -> StorageLog {
    let log: StorageLog = Arc::default();
    let log2 = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(s) = stream else { break };
            let (root, log) = (root.clone(), log2.clone());
            std::thread::spawn(move || {
                let _ = connection(s, &root, &log);
            });
        }
    });
    log
}

/// Answer requests on one connection until the client closes it.
fn connection(s: TcpStream, root: &Path, log: &StorageLog) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    loop {
        let mut first = String::new();
        if r.read_line(&mut first)? == 0 {
            return Ok(());
        }
        let mut parts = first.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let (mut range, mut authorization) = (None, false);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 || line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "range" => range = Some(v.trim().to_string()),
                    "authorization" => authorization = true,
                    _ => {}
                }
            }
        }
        let path = target.split('?').next().unwrap_or("").to_string();
        log.lock().unwrap().push(StorageReq {
            method: method.clone(),
            path: path.clone(),
            authorization,
        });
        answer(&mut w, root, &method, &path, range.as_deref())?;
    }
}

fn answer(
    w: &mut TcpStream,
    root: &Path,
    method: &str,
    path: &str,
    range: Option<&str>,
) -> std::io::Result<()> {
    let rel = Path::new(path.trim_start_matches('/'));
    let file = rel
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| std::fs::File::open(root.join(rel)))
        .and_then(Result::ok);
    let Some(mut file) = file else {
        return w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
    };
    let size = file.metadata()?.len();
    let span = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
    let (status, from, len, extra) = match span {
        Some((a, b)) if a < size && a <= b => {
            let b = b.min(size - 1);
            (
                "206 Partial Content",
                a,
                b - a + 1,
                format!("Content-Range: bytes {a}-{b}/{size}\r\n"),
            )
        }
        Some(_) => {
            let head = format!(
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{size}\r\nContent-Length: 0\r\n\r\n"
            );
            return w.write_all(head.as_bytes());
        }
        None => ("200 OK", 0, size, String::new()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\n{extra}\r\n"
    );
    w.write_all(head.as_bytes())?;
    if method != "HEAD" {
        file.seek(SeekFrom::Start(from))?;
        std::io::copy(&mut file.take(len), w)?;
    }
    w.flush()
}
