//! A WAN on loopback, for benchmarks: a TCP proxy that adds a round-trip time and caps the bytes
//! in flight per connection and direction (a TCP window). See `tests/common/delay_proxy.rs`.
//!
//! `cargo run --release --example delay_proxy -- --upstream 127.0.0.1:5000 [--rtt-ms 50]
//! [--window 4MiB] [--handshake] [--listen 127.0.0.1:0]` prints `listening on 127.0.0.1:PORT`, then serves
//! until killed.

#[path = "../tests/common/delay_proxy.rs"]
mod delay_proxy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use delay_proxy::{serve, DelayOptions, DelayStats};

#[derive(Parser)]
#[command(about = "Forward TCP to --upstream with an added RTT and a per-connection window")]
struct Args {
    /// Where to forward connections, HOST:PORT.
    #[arg(long)]
    upstream: String,
    /// Address to listen on (port 0: a free port, printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Round-trip time in milliseconds; each direction adds half. 50 ms is a typical distance
    /// to a public registry.
    #[arg(long, default_value_t = 50)]
    rtt_ms: u64,
    /// Bytes one direction of one connection may have in flight, e.g. 4MiB, 256KiB, 65536
    /// (1 byte to 1 GiB). 4 MiB is Linux's default maximum TCP send buffer (tcp_wmem).
    #[arg(long, default_value = "4MiB", value_parser = parse_window)]
    window: usize,
    /// Charge each new connection one RTT before its first byte moves (a TCP handshake; off by
    /// default, as in the figures the issue started from).
    #[arg(long)]
    handshake: bool,
}

/// A window size in regfs's size syntax (4MiB, 256K, 65536), 1 byte to 1 GiB.
fn parse_window(s: &str) -> Result<usize, String> {
    match regfs::config::parse_size(s)? {
        v @ 1..=0x4000_0000 => Ok(v as usize),
        _ => Err(format!("{s}: the window must be 1 byte to 1 GiB")),
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let upstream = tokio::net::lookup_host(&args.upstream)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| {
            eprintln!("cannot resolve --upstream {}", args.upstream);
            std::process::exit(2);
        });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .unwrap_or_else(|e| {
            eprintln!("cannot listen on {}: {e}", args.listen);
            std::process::exit(2);
        });
    let local = listener.local_addr().expect("local address");
    // The benchmark script reads this line to learn the port.
    println!("listening on {local}");
    let opts = DelayOptions {
        rtt: Duration::from_millis(args.rtt_ms.min(60_000)),
        window: args.window,
        handshake: args.handshake,
    };
    serve(listener, upstream, opts, Arc::new(DelayStats::default())).await;
}
