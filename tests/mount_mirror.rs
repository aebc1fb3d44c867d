//! Real tier: `--mirror` with a second Debian `docker-registry` configured as a pull-through cache
//! (`proxy: remoteurl:`) of the first, both on loopback. regfs talks to the registry through a
//! counting proxy, so what it asks the registry itself is counted apart from what the mirror
//! fetches upstream. The mirror is killed mid-read; the read goes on against the registry.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use common::*;
use regfs::digest::{digest_hex, sha256_digest};

const MIB: usize = 1 << 20;

struct Fleet {
    up: TestRegistry,
    mirror: TestRegistry,
    proxy: FaultProxy,
    image: Pushed,
}

/// A registry with `fleet/app:v1` (one 8 MiB uncompressed layer), a pull-through mirror of it,
/// and a counting proxy in front of the registry.
fn fleet() -> Fleet {
    let up = TestRegistry::start();
    let client = Arc::new(up.client());
    let tar = make_tar(&[("data.bin", &pseudo_random(8 * MIB - 4096, 11))]);
    let image = rt().block_on(push_image(
        client.as_ref(),
        "fleet/app",
        Some("v1"),
        "amd64",
        &[Layer::tar(&tar)],
    ));
    let mirror =
        TestRegistry::start_with(Auth::None, &format!("proxy:\n  remoteurl: {}\n", up.url()));
    let proxy = FaultProxy::start("127.0.0.1", up.port, ProxyRules::default());
    Fleet {
        up,
        mirror,
        proxy,
        image,
    }
}

fn stats(m: &TestMount) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(m.p(".regfs/stats")).unwrap()).unwrap()
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn reads_come_from_the_mirror_and_go_on_against_the_registry_when_it_dies() {
    let mut f = fleet();
    let (layer, size, _) = f.image.layers[0].clone();
    let m = TestMount::new(
        &f.proxy.addr(),
        &[
            "--mirror",
            &f.mirror.url(),
            "--chunk-size",
            "256KiB",
            "--readahead",
            "0",
        ],
    );
    let path = m.p(&format!("fleet/app/blobs/sha256/{}", digest_hex(&layer)));
    let mut file = std::fs::File::open(&path).unwrap();
    let mut data = vec![0u8; 2 * MIB];
    file.read_exact(&mut data).unwrap();
    let before = stats(&m);
    let direct_before = f
        .proxy
        .counts
        .blob_gets
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        direct_before, 0,
        "no blob byte from the registry while the mirror serves"
    );
    let mirror0 = &before["sources"][0];
    assert_eq!(mirror0["name"], format!("{}/", f.mirror.url()));
    assert!(n(&mirror0["requests"]["blob_gets"]) >= 1, "{before}");
    assert!(
        n(&mirror0["requests"]["blob_bytes"]) >= 2 * MIB as u64,
        "{before}"
    );
    assert_eq!(n(&mirror0["failures"]), 0);

    // Kill the mirror mid-read; the rest comes from the registry itself.
    f.mirror.stop();
    let mut rest = Vec::new();
    file.read_to_end(&mut rest).unwrap();
    data.extend_from_slice(&rest);
    assert_eq!(data.len() as u64, size);
    assert_eq!(sha256_digest(&data), layer, "every byte right");

    let after = stats(&m);
    let mirror = &after["sources"][0];
    let registry = &after["sources"][1];
    assert_eq!(registry["name"], "registry");
    let direct = f
        .proxy
        .counts
        .blob_gets
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(direct >= 1, "the registry served the rest");
    assert_eq!(n(&registry["requests"]["blob_gets"]), direct as u64);
    // A dead mirror costs one failed request per cooldown, not one per read.
    let failures = n(&mirror["failures"]);
    assert!((1..=4).contains(&failures), "{after}");
    assert!(n(&mirror["skipped"]) >= 1, "{after}");
    assert_eq!(mirror["down"], true);
    // Tags resolved at the registry, never at the mirror.
    assert_eq!(n(&mirror["requests"]["manifest_heads"]), 0);
    assert_eq!(n(&mirror["requests"]["tag_pages"]), 0);
    // The totals are the sum over the sources.
    assert_eq!(
        n(&after["requests"]["blob_gets"]),
        n(&mirror["requests"]["blob_gets"]) + n(&registry["requests"]["blob_gets"])
    );
    eprintln!(
        "mirror test: mirror blob GETs {} (answered {}, failed {}, skipped {}), registry blob \
         GETs {direct}, bytes fetched {}",
        mirror["requests"]["blob_gets"],
        mirror["answered"],
        failures,
        mirror["skipped"],
        after["bytes"]["fetched"]
    );

    // A second reader after the kill goes straight to the registry (the mirror is passed over).
    let mut again = std::fs::File::open(&path).unwrap();
    again.seek(SeekFrom::Start(0)).unwrap();
    let mut head = vec![0u8; 4096];
    again.read_exact(&mut head).unwrap();
    assert_eq!(head, data[..4096]);
    let _ = &f.up;
}

#[test]
fn tags_resolve_at_the_mirror_only_with_mirror_tags() {
    let f = fleet();
    for (flag, at_mirror) in [(None, false), (Some("--mirror-tags"), true)] {
        let mut args = vec!["--mirror".to_string(), f.mirror.url()];
        args.extend(flag.map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let m = TestMount::new(&f.proxy.addr(), &args);
        let manifest = std::fs::read(m.p("fleet/app/tags/v1/manifest.json")).unwrap();
        assert_eq!(sha256_digest(&manifest), f.image.manifest_digest);
        let s = stats(&m);
        let (mirror, registry) = (&s["sources"][0]["requests"], &s["sources"][1]["requests"]);
        // A tag resolves with one manifest GET by tag (`--tag-resolution auto` off Docker
        // Hub), which brings the manifest too: every manifest request here is a tag's.
        let tag_reqs = |r: &serde_json::Value| {
            n(&r["manifest_heads"]) + n(&r["tag_pages"]) + n(&r["manifest_gets"])
        };
        assert_eq!(tag_reqs(mirror) > 0, at_mirror, "{flag:?}: {s}");
        assert_eq!(tag_reqs(registry) == 0, at_mirror, "{flag:?}: {s}");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(m.p(".regfs/config")).unwrap()).unwrap();
        assert_eq!(config["mirrors"][0], format!("{}/", f.mirror.url()));
        assert_eq!(config["mirror_tags"], at_mirror);
    }
}
