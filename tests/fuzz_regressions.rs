//! Fuzzing on stable: every crash input the fuzzers found (fuzz/regressions/<target>/) replayed
//! through the same entry points as the cargo-fuzz targets (fuzz/harness.rs), one named test per
//! crash; the seed corpus replayed too; and the seed generator scripts/fuzz.sh runs
//! (`write_seeds`, ignored: it writes files).

#[path = "../fuzz/harness.rs"]
mod harness;

mod common;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn target(name: &str) -> harness::Target {
    harness::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}

/// Replay one checked-in crash input.
fn replay(name: &str, file: &str) {
    let path = fuzz_dir().join("regressions").join(name).join(file);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    target(name)(&data);
}

// One test per crash input. `#[ignore = "crash: …"]` while the crash is not fixed; the fix removes
// the ignore. A crash that is fixed stays here, so it never comes back.

#[test]
fn token_expires_in_u64_max() {
    replay("www_authenticate", "expires_in_overflow");
}

#[test]
fn cached_checkpoint_bits_over_8() {
    replay("index_bytes", "checkpoint_bits_over_8");
}

#[test]
fn cached_checkpoint_input_0_with_bits() {
    replay("index_bytes", "checkpoint_input_0_with_bits");
}

/// Every checked-in regression input is named by a test below.
#[test]
fn every_regression_input_has_a_test() {
    let me = include_str!("fuzz_regressions.rs");
    let dir = fuzz_dir().join("regressions");
    let Ok(targets) = std::fs::read_dir(&dir) else {
        return;
    };
    for t in targets {
        let t = t.unwrap();
        for f in std::fs::read_dir(t.path()).unwrap() {
            let f = f.unwrap().file_name().into_string().unwrap();
            let name = t.file_name().into_string().unwrap();
            assert!(
                me.contains(&format!("replay(\"{name}\", \"{f}\")")),
                "fuzz/regressions/{name}/{f} has no test"
            );
        }
    }
}

/// The seeds (as generated) go through every target without a crash: the harness itself works
/// on stable, and each target accepts the inputs it is seeded with.
#[test]
fn seeds_pass_every_target() {
    for (name, seeds) in seeds() {
        let f = target(name);
        for (_, data) in seeds {
            f(&data);
        }
    }
}

/// Write the seed corpora into `$REGFS_FUZZ_CORPUS/<target>/` (scripts/fuzz.sh).
#[test]
#[ignore = "writes the fuzz corpus; run by scripts/fuzz.sh"]
fn write_seeds() {
    let root = std::env::var_os("REGFS_FUZZ_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| fuzz_dir().join("corpus"));
    for (name, seeds) in seeds() {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, data) in seeds {
            std::fs::write(dir.join(file), data).unwrap();
        }
    }
}

type Seeds = Vec<(&'static str, Vec<(String, Vec<u8>)>)>;

/// Seed inputs per target, built from the test images (tests/common/images.rs).
fn seeds() -> Seeds {
    use common::{estargz_of, gzip, make_tar, pseudo_random, zstd, zstd_chunked_of};
    let small = make_tar(&[
        ("etc/hostname", b"regfs\n"),
        ("usr/bin/tool", &pseudo_random(3000, 1)),
        ("./b/c.txt", b"normalised"),
    ]);
    let big = make_tar(&[
        ("data/random.bin", &pseudo_random(200_000, 2)),
        ("data/zeros.bin", &[0u8; 300_000]),
        ("etc/os-release", b"ID=regfs\n"),
    ]);
    let mut links = tar::Builder::new(Vec::new());
    for (path, kind, link) in [
        ("d", tar::EntryType::Directory, None),
        ("d/f", tar::EntryType::Regular, None),
        ("d/hard", tar::EntryType::Link, Some("d/f")),
        ("d/soft", tar::EntryType::Symlink, Some("../etc/passwd")),
        ("d/.wh.gone", tar::EntryType::Regular, None),
        ("d/.wh..wh..opq", tar::EntryType::Regular, None),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o755);
        h.set_mtime(0);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        links.append_data(&mut h, path, &[][..]).unwrap();
    }
    let links = links.into_inner().unwrap();
    let named = |v: Vec<Vec<u8>>| -> Vec<(String, Vec<u8>)> {
        v.into_iter()
            .enumerate()
            .map(|(i, d)| (format!("seed-{i}"), d))
            .collect()
    };
    let with = |sel: u8, d: &[u8]| -> Vec<u8> {
        let mut v = vec![sel];
        v.extend_from_slice(d);
        v
    };
    let estargz = estargz_of(&small);
    let chunked = zstd_chunked_of(&small);
    let position = chunked
        .annotations
        .iter()
        .find(|(k, _)| k.ends_with("manifest-position"))
        .map(|(_, v)| v.clone())
        .unwrap();
    let mut annotated = position.into_bytes();
    annotated.push(b'\n');
    annotated.extend(&chunked.data);
    let toc = br#"{"version":1,"entries":[{"name":"a","type":"dir","mode":493},{"name":"a/f","type":"reg","size":5,"offset":100,"modtime":"2023-11-14T22:13:20Z","digest":"sha256:00"},{"name":"a/h","type":"hardlink","linkName":"a/f"},{"name":"a/big","type":"reg","size":10,"offset":200,"chunkSize":4},{"name":"a/big","type":"chunk","offset":300,"chunkOffset":4,"chunkSize":6,"endOffset":350}]}"#;
    let image = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{}", "a".repeat(64)), "size": 123},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": format!("sha256:{}", "b".repeat(64)), "size": 4_611_686_018_427_387_904u64,
                    "annotations": {"containerd.io/snapshot/stargz/toc.digest": "sha256:00"}}],
    });
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{}", "c".repeat(64)), "size": 1,
                       "platform": {"os": "linux", "architecture": "arm/64", "variant": "v8"}}],
    });
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", "d".repeat(64))]}});
    let gz_index = LayerIndexSeed::gzip(&big);
    let zs_index = LayerIndexSeed::zstd(&big);
    vec![
        (
            "manifest",
            named(vec![
                with(0, &serde_json::to_vec(&image).unwrap()),
                with(1, &serde_json::to_vec(&index).unwrap()),
                with(4, &serde_json::to_vec(&config).unwrap()),
                with(5, br#"{"schemaVersion":1,"fsLayers":[]}"#),
            ]),
        ),
        (
            "www_authenticate",
            named(vec![
                br#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull,push""#.to_vec(),
                br#"Basic realm="x y", BEARER Realm=http://h/t, service=svc, error="invalid_token""#.to_vec(),
                br#"{"token":"abc","expires_in":300}"#.to_vec(),
            ]),
        ),
        (
            "link",
            named(vec![
                b"</v2/_catalog?last=b&n=100>; rel=\"next\"".to_vec(),
                b"<https://other.example/v2/x/tags/list?n=1>; rel=next, <a>; rel=\"prev\"\n<//h:1/p>;rel = \"next\"".to_vec(),
            ]),
        ),
        (
            "credentials",
            named(vec![
                br#"registry.example:5000
{"auths":{"registry.example:5000":{"auth":"dXNlcjpwYXNz"}}}"#.to_vec(),
                br#"index.docker.io
{"auths":{"https://index.docker.io/v1/":{"username":"u","password":"p"}},"credsStore":"desktop","credHelpers":{"x":"y"}}"#.to_vec(),
                br#"{"auths":{"registry.example:5000":{"auth":"dTpwAAA=","identitytoken":"t"}}}"#.to_vec(),
            ]),
        ),
        ("tar_index", named(vec![small.clone(), links.clone()])),
        (
            "gzip_index",
            named(vec![
                with(12, &gzip(&small)),
                with(15, &gzip(&big)),
                with(0, &[gzip(&links), gzip(&small)].concat()),
            ]),
        ),
        (
            "zstd_frames",
            named(vec![
                with(12, &zstd(&small)),
                with(15, &zstd(&big)),
                with(0, &[zstd(&links), zstd(&small)].concat()),
            ]),
        ),
        ("estargz", named(vec![estargz.data.clone()])),
        ("zstd_chunked", named(vec![annotated, chunked.data.clone()])),
        (
            "toc_json",
            named(vec![with(0, toc), with(1, toc), with(6, toc)]),
        ),
        ("index_bytes", named(vec![gz_index, zs_index, LayerIndexSeed::tar(&links)])),
    ]
}

/// `--cache-dir` index files of test layers.
struct LayerIndexSeed;

impl LayerIndexSeed {
    fn tar(tar: &[u8]) -> Vec<u8> {
        regfs::layer::LayerIndex::build(tar).unwrap().to_bytes()
    }
    fn gzip(tar: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let gz = common::gzip(tar);
        let mut ix = regfs::layer::gzip::Indexer::new(&gz[..], 64 * 1024).unwrap();
        let mut out = Vec::new();
        ix.read_to_end(&mut out).unwrap();
        let mut idx = regfs::layer::LayerIndex::build(&out[..]).unwrap();
        idx.checkpoints = std::mem::take(&mut ix.checkpoints);
        idx.checkpoints.truncate(2);
        idx.format = regfs::layer::Format::Gzip;
        idx.to_bytes()
    }
    fn zstd(tar: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let z = common::zstd(tar);
        let mut ix = regfs::layer::zstd::FrameIndexer::new(&z[..], 1);
        let mut out = Vec::new();
        ix.read_to_end(&mut out).unwrap();
        let mut idx = regfs::layer::LayerIndex::build(&out[..]).unwrap();
        idx.zstd_frames = std::mem::take(&mut ix.frames);
        idx.format = regfs::layer::Format::Zstd;
        idx.to_bytes()
    }
}
