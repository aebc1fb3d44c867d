//! Object storage on loopback, for benchmarks: serves a registry's storage directory over HTTP
//! (GET, HEAD, `Range`, keep-alive), as S3 or a CDN serves the links that distribution's
//! `redirect` storage middleware hands out. See `tests/common/storage.rs`.
//!
//! `cargo run --release --example blob_storage -- --root DIR [--listen 127.0.0.1:0]` prints
//! `listening on 127.0.0.1:PORT`, then serves until killed.

#[path = "../tests/common/storage.rs"]
#[allow(dead_code)]
mod storage;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Serve the files under --root over HTTP with Range, as object storage")]
struct Args {
    /// The directory served (a registry's storage root: URL paths are paths under it).
    #[arg(long)]
    root: PathBuf,
    /// Address to listen on (port 0: a free port, printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

fn main() {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).expect("bind");
    println!("listening on {}", listener.local_addr().expect("address"));
    let _log = storage::serve_storage(listener, args.root);
    loop {
        std::thread::park();
    }
}
