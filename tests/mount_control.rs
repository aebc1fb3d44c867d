//! Real tier: the control directory `MNT/.regfs/` on a real mount of a real registry. Its files
//! are parsed as JSON and their counters checked against a known sequence of reads; `ls` hides
//! the dot directory by itself, `ls -a` and `ls -l` show it with sizes right.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;
use regfs::digest::digest_hex;

const CHUNK: u64 = 64 * 1024;

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn ls(args: &[&str], dir: &std::path::Path) -> String {
    let out = Command::new("ls").args(args).arg(dir).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn control_files_show_the_counters_of_a_known_sequence_of_reads() {
    let s = seeded();
    let m = TestMount::new(
        &s.reg.addr(),
        &["--chunk-size", "64KiB", "--readahead", "0"],
    );
    assert!(!ls(&[], &m.path()).contains(".regfs"));
    assert!(ls(&["-a"], &m.path()).lines().any(|l| l == ".regfs"));
    let meta = std::fs::metadata(m.p(".regfs")).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o777, 0o555);
    assert_eq!(
        ls(&[], &m.p(".regfs"))
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["config", "stats", "version"]
    );
    // ls -l sizes are the sizes read (config and version do not change).
    for f in ["config", "version"] {
        let p = m.p(&format!(".regfs/{f}"));
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            std::fs::read(&p).unwrap().len() as u64,
            "{f}"
        );
    }
    let version = std::fs::read_to_string(m.p(".regfs/version")).unwrap();
    assert_eq!(version, format!("regfs {}\n", env!("CARGO_PKG_VERSION")));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.p(".regfs/config")).unwrap()).unwrap();
    assert_eq!(config["registry"], format!("{}/", s.reg.url()));
    assert_eq!(config["chunk_size"], CHUNK);
    assert_eq!(config["readahead"], 0);
    assert!(std::fs::write(m.p(".regfs/stats"), b"x").is_err());

    // One blob of several chunks, read whole, twice.
    let (digest, size, _) = s.min.layers[0].clone();
    let chunks = size.div_ceil(CHUNK);
    assert!(chunks >= 3, "{size}");
    let blob = m.p(&format!("debian/min/blobs/sha256/{}", digest_hex(&digest)));
    let cached = || -> u64 {
        String::from_utf8(xattr(&blob, "user.regfs.cached").unwrap())
            .unwrap()
            .parse()
            .unwrap()
    };
    let s0 = m.control_stats();
    assert_eq!(cached(), 0);
    let data = std::fs::read(&blob).unwrap();
    assert_eq!(data.len() as u64, size);
    let s1 = m.control_stats();
    let delta = |a: &serde_json::Value, b: &serde_json::Value, k: &[&str]| {
        let get = |v: &serde_json::Value| n(k.iter().fold(v, |v: &serde_json::Value, k| &v[*k]));
        get(b) - get(a)
    };
    assert_eq!(delta(&s0, &s1, &["bytes", "fetched"]), size);
    assert_eq!(delta(&s0, &s1, &["bytes", "served"]), size);
    // A Range request carries one chunk or several.
    let gets = delta(&s0, &s1, &["requests", "blob_gets"]);
    assert!(
        (1..=chunks).contains(&gets),
        "{gets} requests for {chunks} chunks"
    );
    assert_eq!(delta(&s0, &s1, &["cache", "memory", "misses"]), chunks);
    assert_eq!(n(&s1["retries"]), 0);
    assert_eq!(cached(), size);
    assert!(
        s1["rate_limit"].is_null(),
        "distribution sends no rate-limit headers"
    );
    assert!(s1["cache"]["disk"].is_null());
    // Reading the stats file is not counted as served.
    let s2 = m.control_stats();
    assert_eq!(delta(&s1, &s2, &["bytes", "served"]), 0);

    // Again: nothing fetched (the kernel's page cache or the chunk cache serves it).
    assert_eq!(std::fs::read(&blob).unwrap(), data);
    let s3 = m.control_stats();
    assert_eq!(delta(&s2, &s3, &["bytes", "fetched"]), 0);
    assert_eq!(delta(&s2, &s3, &["requests", "blob_gets"]), 0);
    // The stats xattr keeps its shape.
    assert_eq!(m.stat("blob_gets"), n(&s3["requests"]["blob_gets"]));
    eprintln!("{}", serde_json::to_string_pretty(&s3).unwrap());
}
