//! The benchmark's WAN on loopback (`tests/common/delay_proxy.rs`): bytes pass intact both ways,
//! a half-close and a reset reach the other side, the window caps the bytes in the delay line
//! and connections open at once are counted (counted, never timed), and a regfs mount of a real
//! registry through it reads the right bytes.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use regfs::digest::sha256_digest;

/// A small RTT and window keep the tests fast while every code path (waits on a full window,
/// acks) is taken many times over.
fn small_link() -> DelayOptions {
    DelayOptions {
        rtt: Duration::from_millis(4),
        window: 128 * 1024,
        handshake: false,
    }
}

/// A TCP server on a free port that runs `serve` on its first connection.
fn one_shot_server(
    serve: impl FnOnce(TcpStream) + Send + 'static,
) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        serve(s);
    });
    (addr, h)
}

#[test]
fn bytes_pass_intact_both_ways_and_half_close_propagates() {
    let up = pseudo_random(3 << 20, 1);
    let down = pseudo_random(5 << 20, 2);
    let down2 = down.clone();
    let (addr, server) = one_shot_server(move |mut s| {
        // Reading to the end proves the client's half-close came through.
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(sha256_digest(&got).as_bytes()).unwrap();
        s.write_all(&down2).unwrap();
    });
    let proxy = DelayProxy::start(addr, small_link());
    let mut c = TcpStream::connect(proxy.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(&up).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    server.join().unwrap();

    let digest = sha256_digest(&up);
    assert_eq!(&back[..digest.len()], digest.as_bytes());
    assert!(back[digest.len()..] == down[..], "the download differs");
    let st = &proxy.stats;
    assert_eq!(st.connections.load(Ordering::SeqCst), 1);
    assert_eq!(st.max_open.load(Ordering::SeqCst), 1);
    assert_eq!(st.bytes_up.load(Ordering::SeqCst), up.len() as u64);
    assert_eq!(
        st.bytes_down.load(Ordering::SeqCst),
        (digest.len() + down.len()) as u64
    );
    // The window was filled, and never overrun.
    let max = st.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= small_link().window as u64, "{max} bytes in flight");
    assert!(
        max >= (small_link().window / 2) as u64,
        "{max} bytes in flight"
    );
    assert_eq!(st.resets.load(Ordering::SeqCst), 0);
}

#[test]
fn a_reset_upstream_resets_the_client() {
    let (addr, server) = one_shot_server(|mut s| {
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"partial").unwrap();
        reset_on_close(&s);
    });
    let proxy = DelayProxy::start(addr, small_link());
    let mut c = TcpStream::connect(proxy.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(b"hello").unwrap();
    server.join().unwrap();
    let mut back = Vec::new();
    let err = c.read_to_end(&mut back).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert_eq!(proxy.stats.resets.load(Ordering::SeqCst), 1);
}

#[test]
fn connections_open_at_once_are_counted() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for _ in 0..3 {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            s.write_all(b"y").unwrap();
            conns.push(s); // held open until the test ends
        }
        conns
    });
    let proxy = DelayProxy::start(addr, small_link());
    let mut clients: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(proxy.addr()).unwrap())
        .collect();
    // Every client writes before any reads: the server may accept them in any order.
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c.write_all(b"x").unwrap();
    }
    for c in &mut clients {
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"y");
    }
    let st = &proxy.stats;
    assert_eq!(st.connections.load(Ordering::SeqCst), 3);
    assert_eq!(st.max_open.load(Ordering::SeqCst), 3);
    drop(clients);
    drop(server.join().unwrap());
}

#[test]
fn a_mount_through_the_proxy_reads_the_right_bytes() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let big = pseudo_random(6 << 20, 3);
    let tar = make_tar(&[("etc/os-release", b"ID=delayed\n"), ("opt/big", &big)]);
    let pushed = rt().block_on(push_image(
        &client,
        "wan/img",
        Some("v1"),
        "amd64",
        &[Layer::gzip(&tar)],
    ));
    let proxy = DelayProxy::start(
        reg.addr().parse().unwrap(),
        DelayOptions {
            rtt: Duration::from_millis(10),
            window: 1 << 20,
            handshake: true,
        },
    );
    let m = TestMount::new(&proxy.addr(), &[]);
    let tag = m.p("wan/img/tags/v1");
    let layer = tag.join("layers").join(&ls_files(&tag.join("layers"))[0]);
    assert_eq!(sha256_file(&layer), pushed.layers[0].0);
    assert_eq!(
        std::fs::read(tag.join("rootfs/etc/os-release")).unwrap(),
        b"ID=delayed\n"
    );
    assert!(std::fs::read(tag.join("rootfs/opt/big")).unwrap() == big);
    let st = &proxy.stats;
    assert!(st.connections.load(Ordering::SeqCst) >= 1);
    assert!(st.bytes_down.load(Ordering::SeqCst) >= pushed.layers[0].1);
    assert!(st.max_in_flight.load(Ordering::SeqCst) <= 1 << 20);
    assert_eq!(st.resets.load(Ordering::SeqCst), 0);
}
