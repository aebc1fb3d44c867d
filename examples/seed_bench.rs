//! Seed a registry with the images `scripts/bench.sh` reads, and print what the script needs to
//! know about them as `key=value` lines (numbers and names only):
//!
//! - `--blob NAME=MIB`: `bench/NAME:v1`, one uncompressed layer of MIB MiB of pseudo-random bytes
//!   (prints `blob_NAME=DIGEST`);
//! - `--tags RxT`: R repositories `bench/tags00..` with T tags `t1..` each, every tag a distinct
//!   small image;
//! - `--estargz MIB`, `--zstd-chunked MIB`: `bench/estargz:v1`, `bench/zstdchunked:v1`, one layer
//!   of 32 KiB files (incompressible) with its TOC; prints the first file's path, the bytes of
//!   footer + TOC, and the compressed bytes of the first file;
//! - `--gzip-layer NAME=FILE`: `bench/NAME:v1` with FILE (a tar.gz) as its one layer.
//!
//! `cargo run --release --example seed_bench -- 127.0.0.1:5000 --blob seq=1024 --tags 10x4`

#[path = "../tests/common/images.rs"]
mod images;

use std::time::Duration;

use clap::Parser;
use images::*;
use regfs::digest::sha256_digest;
use regfs::registry::http::{HttpOptions, HttpRegistry};

/// Size of every file in the TOC layers: 2048 of them make 64 MiB, and their TOC is as large as
/// a real image's (~0.5 MB).
const TOC_FILE_BYTES: usize = 32 * 1024;

#[derive(Parser)]
#[command(about = "Seed a registry for scripts/bench.sh")]
struct Args {
    /// Registry, HOST:PORT (http).
    addr: String,
    /// NAME=MIB: an image bench/NAME:v1 with one uncompressed layer of MIB MiB.
    #[arg(long, value_name = "NAME=MIB")]
    blob: Vec<String>,
    /// RxT: R repositories of T tags each, every tag its own small image.
    #[arg(long, value_name = "RxT")]
    tags: Option<String>,
    /// An eStargz layer of this many MiB of 32 KiB files.
    #[arg(long, value_name = "MIB")]
    estargz: Option<usize>,
    /// A zstd:chunked layer of this many MiB of 32 KiB files.
    #[arg(long, value_name = "MIB")]
    zstd_chunked: Option<usize>,
    /// NAME=FILE: an image bench/NAME:v1 whose one layer is FILE, a tar.gz.
    #[arg(long, value_name = "NAME=FILE")]
    gzip_layer: Vec<String>,
}

fn split_pair(s: &str, sep: char) -> (&str, &str) {
    s.split_once(sep).unwrap_or_else(|| {
        eprintln!("expected two values around {sep:?}, got {s}");
        std::process::exit(2)
    })
}

fn number(s: &str) -> usize {
    s.parse().unwrap_or_else(|_| {
        eprintln!("not a number: {s}");
        std::process::exit(2)
    })
}

/// The tar of `mib` MiB of 32 KiB files `data/f0000..`, and the first file's contents.
fn toc_tar(mib: usize) -> (Vec<u8>, Vec<u8>) {
    let n = (mib << 20) / TOC_FILE_BYTES;
    let files: Vec<(String, Vec<u8>)> = (0..n.max(1))
        .map(|i| {
            (
                format!("data/f{i:05}"),
                pseudo_random(TOC_FILE_BYTES, 1000 + i as u64),
            )
        })
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    (make_tar(&refs), files[0].1.clone())
}

/// The decompressed tar's digest (the layer's diff_id).
fn gunzip_digest(gz: &[u8]) -> String {
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut tar)
        .expect("FILE must be a gzip stream");
    sha256_digest(&tar)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let reg = HttpRegistry::new(HttpOptions {
        base: reqwest::Url::parse(&format!("http://{}", args.addr)).expect("HOST:PORT"),
        credentials: None,
        ca_cert_pem: None,
        insecure: false,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(600),
        redirect_ttl: regfs::registry::http::REDIRECT_TTL,
    })
    .expect("client");
    let tar_type = "application/vnd.oci.image.layer.v1.tar";
    for b in &args.blob {
        let (name, mib) = split_pair(b, '=');
        let data = pseudo_random(number(mib) << 20, 7);
        let p = push_image(
            &reg,
            &format!("bench/{name}"),
            Some("v1"),
            "amd64",
            &[Layer::raw(data, tar_type)],
        )
        .await;
        println!("blob_{name}={}", p.layers[0].0);
    }
    if let Some(t) = &args.tags {
        let (repos, tags) = split_pair(t, 'x');
        for r in 0..number(repos) {
            for t in 1..=number(tags) {
                let body = format!("repository {r}, tag {t}\n");
                let tar = make_tar(&[("etc/tag", body.as_bytes())]);
                let repo = format!("bench/tags{r:02}");
                push_image(
                    &reg,
                    &repo,
                    Some(&format!("t{t}")),
                    "amd64",
                    &[Layer::tar(&tar)],
                )
                .await;
            }
        }
        println!("tags_repos={repos}");
        println!("tags_per_repo={tags}");
    }
    if let Some(mib) = args.estargz {
        let (tar, first) = toc_tar(mib);
        let layer = estargz_of(&tar);
        // The footer (51 bytes) names the TOC's offset in 16 hex digits at bytes 16..32.
        let footer = &layer.data[layer.data.len() - 51..];
        let hex = std::str::from_utf8(&footer[16..32]).expect("footer");
        let toc_at = usize::from_str_radix(hex, 16).expect("footer offset");
        let size = layer.data.len();
        push_image(&reg, "bench/estargz", Some("v1"), "amd64", &[layer]).await;
        println!("estargz_first=data/f00000");
        println!("estargz_layer_bytes={size}");
        println!("estargz_meta_bytes={}", size - toc_at);
        println!("estargz_file_bytes={}", gzip(&first).len());
    }
    if let Some(mib) = args.zstd_chunked {
        let (tar, first) = toc_tar(mib);
        let layer = zstd_chunked_of(&tar);
        // manifest-position is "offset:length:..." of the TOC frame's payload, after its
        // 8-byte skippable-frame header.
        let pos = &layer.annotations[0].1;
        let toc_at = number(pos.split(':').next().unwrap_or_default());
        let size = layer.data.len();
        push_image(&reg, "bench/zstdchunked", Some("v1"), "amd64", &[layer]).await;
        println!("zstdchunked_first=data/f00000");
        println!("zstdchunked_layer_bytes={size}");
        println!("zstdchunked_meta_bytes={}", size - (toc_at - 8));
        println!("zstdchunked_file_bytes={}", zstd(&first).len());
    }
    for g in &args.gzip_layer {
        let (name, file) = split_pair(g, '=');
        let data = std::fs::read(file).expect("read FILE");
        let diff_id = gunzip_digest(&data);
        let layer = Layer {
            data,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            diff_id,
            annotations: vec![],
        };
        let p = push_image(
            &reg,
            &format!("bench/{name}"),
            Some("v1"),
            "amd64",
            &[layer],
        )
        .await;
        println!("layer_{name}={}", p.layers[0].0);
    }
}
