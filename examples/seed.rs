//! Seed a registry with sample images for the demo: `cargo run --example seed -- 127.0.0.1:5000`.
//!
//! - debian/min:bookworm: a three-layer image (gzip, plain tar and zstd layers)
//! - multi/arch:latest: an OCI index with linux/amd64 and linux/arm64/v8 images
//! - apps/big:v1: one 64 MiB layer, to show lazy reads

#[path = "../tests/common/images.rs"]
mod images;

use std::time::Duration;

use images::*;
use regfs::registry::http::{HttpOptions, HttpRegistry};

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).expect("usage: seed HOST:PORT");
    let reg = HttpRegistry::new(HttpOptions {
        base: reqwest::Url::parse(&format!("http://{addr}")).expect("HOST:PORT"),
        credentials: None,
        ca_cert_pem: None,
        insecure: false,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(120),
        redirect_ttl: regfs::registry::http::REDIRECT_TTL,
    })
    .expect("client");
    let os_release = b"PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm, regfs sample)\"\nID=debian\n";
    let base = make_tar(&[
        ("etc/os-release", os_release),
        ("bin/busybox", &pseudo_random(900_000, 1)),
    ]);
    let docs = make_tar(&[("usr/share/doc/README", b"hello from layer 1\n")]);
    let data = make_tar(&[("opt/data.bin", &pseudo_random(400_000, 2))]);
    let min = push_image(
        &reg,
        "debian/min",
        Some("bookworm"),
        "amd64",
        &[Layer::gzip(&base), Layer::tar(&docs), Layer::zstd(&data)],
    )
    .await;
    println!("pushed debian/min:bookworm  {}", min.manifest_digest);
    let amd = push_image(&reg, "multi/arch", None, "amd64", &[Layer::gzip(&docs)]).await;
    let arm = push_image(&reg, "multi/arch", None, "arm64", &[Layer::gzip(&data)]).await;
    let (_, idx) = push_index(
        &reg,
        "multi/arch",
        "latest",
        &[("linux/amd64", &amd), ("linux/arm64/v8", &arm)],
    )
    .await;
    println!("pushed multi/arch:latest     {idx}");
    let big = push_image(
        &reg,
        "apps/big",
        Some("v1"),
        "amd64",
        &[Layer::raw(
            pseudo_random(64 << 20, 3),
            "application/vnd.oci.image.layer.v1.tar",
        )],
    )
    .await;
    println!("pushed apps/big:v1           {}", big.manifest_digest);
}
