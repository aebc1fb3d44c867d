//! A WAN on loopback: a TCP proxy that delays each direction by RTT/2 and caps the bytes in its
//! delay line per direction and connection, which models a TCP window (netem is not available
//! in this kernel). One connection then carries at most `window / rtt` bytes per second: 80 MiB/s
//! at the default 4 MiB and 50 ms.
//!
//! Each accepted connection gets its own upstream connection. Per direction, a reader takes up to
//! 64 KiB at a time once the window has room for it and stamps it with "release at read time +
//! RTT/2"; a writer writes it at that instant; the bytes leave the window RTT/2 later still (when
//! the sender would see the ACK), so a byte holds the window for one RTT. End of stream becomes a
//! half-close RTT/2 later; a read or write error resets both sockets. Connecting costs nothing
//! unless [`DelayOptions::handshake`] is set: then a new connection waits one RTT first.
//!
//! Used by `examples/delay_proxy.rs` (the benchmark's proxy) and by the tests, through
//! [`DelayProxy::start`].

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

/// The largest single read: small enough that the delay line is smooth, large enough that the
/// per-chunk cost (a timer, a channel message) stays far below the bytes' cost.
const READ_BYTES: usize = 64 * 1024;

/// How the link behaves.
#[derive(Clone, Copy, Debug)]
pub struct DelayOptions {
    /// Round-trip time: each direction adds half of it.
    pub rtt: Duration,
    /// Bytes one direction of one connection may hold in its delay line (the TCP window).
    pub window: usize,
    /// Charge a new connection one RTT before its first byte moves, as a TCP handshake would
    /// (the real handshake with the proxy is local and free).
    pub handshake: bool,
}

impl Default for DelayOptions {
    /// 50 ms is a typical RTT to a public registry (Docker Hub, GHCR, ECR are 20-100 ms away);
    /// 4 MiB is Linux's default maximum send buffer (tcp_wmem), which bounds a sender's bytes
    /// in flight, so one stream tops out at 80 MiB/s, as a single download from far away does.
    fn default() -> Self {
        DelayOptions {
            rtt: Duration::from_millis(50),
            window: 4 << 20,
            handshake: false,
        }
    }
}

/// What the proxy carried, for tests and the benchmark's log.
#[derive(Debug, Default)]
pub struct DelayStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections open now, and the most ever open at once (a client's parallelism).
    pub open: AtomicU64,
    pub max_open: AtomicU64,
    /// Client to upstream.
    pub bytes_up: AtomicU64,
    /// Upstream to client.
    pub bytes_down: AtomicU64,
    /// The most bytes one direction of one connection ever held in its delay line.
    pub max_in_flight: AtomicU64,
    /// Connections that ended in an error (and were reset).
    pub resets: AtomicU64,
}

/// Accept connections on `listener` forever, forwarding each to `upstream` through the delay line.
pub async fn serve(
    listener: TcpListener,
    upstream: SocketAddr,
    opts: DelayOptions,
    stats: Arc<DelayStats>,
) {
    let opts = DelayOptions {
        // Whole permits of a semaphore, and a read must fit.
        window: opts.window.clamp(1, 1 << 30),
        ..opts
    };
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors, say: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            stats.connections.fetch_add(1, Ordering::Relaxed);
            let now_open = stats.open.fetch_add(1, Ordering::Relaxed) + 1;
            stats.max_open.fetch_max(now_open, Ordering::Relaxed);
            forward(client, upstream, opts, &stats).await;
            stats.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// One connection: through the delay line both ways until both ends are closed, or an error.
async fn forward(client: TcpStream, upstream: SocketAddr, opts: DelayOptions, stats: &DelayStats) {
    if opts.handshake {
        // The client's first bytes wait in its socket meanwhile, so they arrive 1.5 RTT
        // after its connect, as over a real link.
        tokio::time::sleep(opts.rtt).await;
    }
    let Ok(up) = TcpStream::connect(upstream).await else {
        // As a refused connection would: the client sees a reset.
        reset_on_close(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = up.into_split();
    let done = tokio::try_join!(
        pump(&mut cr, &mut uw, opts, stats, &stats.bytes_up),
        pump(&mut ur, &mut cw, opts, stats, &stats.bytes_down),
    );
    if done.is_err() {
        stats.resets.fetch_add(1, Ordering::Relaxed);
        // Whole sockets, so that dropping them does not send a FIN (a dropped write
        // half would) before the RST.
        for s in [cr.reunite(cw), ur.reunite(uw)].into_iter().flatten() {
            reset_on_close(&s);
        }
    }
}

/// Make the socket's close send a RST (SO_LINGER with a zero timeout).
pub fn reset_on_close(s: &impl std::os::fd::AsRawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// What travels through the delay line.
enum Item {
    Bytes(Vec<u8>),
    Eof,
    Error(std::io::Error),
}

/// One direction: read from `from`, write to `to` RTT/2 later, within the window. Returns once
/// the end of stream was passed on (as a half-close), or the first error.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    opts: DelayOptions,
    stats: &DelayStats,
    bytes: &AtomicU64,
) -> std::io::Result<()> {
    let half = opts.rtt / 2;
    let window = Arc::new(Semaphore::new(opts.window));
    let in_flight = AtomicU64::new(0);
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Item)>();
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(Instant, usize)>();
    let max_read = opts.window.min(READ_BYTES);

    let reader = async {
        loop {
            // Room for a full read first: the window bounds what is read, not only what is sent.
            let Ok(permit) = window.acquire_many(max_read as u32).await else {
                return;
            };
            permit.forget();
            let mut buf = vec![0; max_read];
            let r = from.read(&mut buf).await;
            let at = Instant::now() + half;
            let n = *r.as_ref().unwrap_or(&0);
            window.add_permits(max_read - n);
            let item = match r {
                Ok(0) => Item::Eof,
                Ok(n) => {
                    buf.truncate(n);
                    let now = in_flight.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                    stats.max_in_flight.fetch_max(now, Ordering::Relaxed);
                    Item::Bytes(buf)
                }
                Err(e) => Item::Error(e),
            };
            let last = !matches!(item, Item::Bytes(_));
            if tx.send((at, item)).is_err() || last {
                return;
            }
        }
    };
    let writer = async {
        while let Some((at, item)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            match item {
                Item::Bytes(b) => {
                    to.write_all(&b).await?;
                    bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                    // The sender learns of the delivery half an RTT later.
                    let _ = ack_tx.send((at + half, b.len()));
                }
                Item::Eof => {
                    to.shutdown().await?;
                    return Ok(());
                }
                Item::Error(e) => return Err(e),
            }
        }
        Ok(())
    };
    let acks = async {
        while let Some((at, n)) = ack_rx.recv().await {
            tokio::time::sleep_until(at).await;
            in_flight.fetch_sub(n as u64, Ordering::Relaxed);
            window.add_permits(n);
        }
    };
    // The writer ends the direction (at the half-close, or at the first error). The reader may
    // be parked on a full window or a read, and the acks only matter while it reads.
    tokio::select! {
        r = writer => r,
        _ = async { tokio::join!(reader, acks) } => Ok(()),
    }
}

/// A delay proxy on 127.0.0.1 with a free port, on its own thread and runtime (for sync tests).
pub struct DelayProxy {
    pub port: u16,
    pub stats: Arc<DelayStats>,
}

impl DelayProxy {
    pub fn start(upstream: SocketAddr, opts: DelayOptions) -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = std_listener.local_addr().expect("local addr").port();
        std_listener.set_nonblocking(true).expect("nonblocking");
        let stats = Arc::new(DelayStats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("delay-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("listener");
                    serve(listener, upstream, opts, st).await;
                });
            })
            .expect("thread");
        DelayProxy { port, stats }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}
