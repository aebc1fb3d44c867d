//! Real tier: image contents. Images with edge cases (whiteouts across three layers, an opaque
//! directory, file<->directory replacement, symlinks, hard links, PAX long names and xattrs, an
//! empty file, an empty layer, a file larger than a chunk) are built as tar, gzip and zstd, pushed,
//! and `rootfs/` is compared field by field with `umoci unpack` of the same image.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;
use regfs::digest::sha256_digest;

fn header(ty: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(ty);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// Append an entry; long names and xattrs go through PAX headers.
fn add(
    b: &mut tar::Builder<Vec<u8>>,
    path: &str,
    ty: tar::EntryType,
    data: &[u8],
    link: Option<&str>,
    (mode, uid, gid): (u32, u64, u64),
    xattrs: &[(&str, &[u8])],
) {
    if !xattrs.is_empty() {
        let pax: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
    }
    let mut h = header(ty, data.len() as u64, mode);
    h.set_uid(uid);
    h.set_gid(gid);
    match link {
        Some(l) => {
            b.append_link(&mut h, path, l).unwrap();
        }
        None => {
            b.append_data(&mut h, path, data).unwrap();
        }
    }
}

use tar::EntryType::{Directory as D, Link as L, Regular as F, Symlink as S};

fn layers() -> Vec<Vec<u8>> {
    let long = format!(
        "deep/{}/file-with-a-very-long-name-{}.txt",
        "d".repeat(80),
        "x".repeat(60)
    );
    let mut b0 = tar::Builder::new(Vec::new());
    add(&mut b0, "etc/", D, b"", None, (0o755, 0, 0), &[]);
    add(
        &mut b0,
        "etc/os-release",
        F,
        b"ID=layer0\n",
        None,
        (0o644, 0, 0),
        &[],
    );
    add(
        &mut b0,
        "etc/passwd",
        F,
        b"root:x:0:0::/root:/bin/sh\n",
        None,
        (0o600, 0, 0),
        &[],
    );
    add(
        &mut b0,
        "etc/hard",
        L,
        b"",
        Some("etc/passwd"),
        (0o600, 0, 0),
        &[],
    );
    add(&mut b0, "opq/", D, b"", None, (0o750, 0, 0), &[]);
    add(&mut b0, "opq/old1", F, b"old", None, (0o644, 0, 0), &[]);
    add(&mut b0, "opq/sub/", D, b"", None, (0o755, 0, 0), &[]);
    add(
        &mut b0,
        "opq/sub/old2",
        F,
        b"old2",
        None,
        (0o644, 0, 0),
        &[],
    );
    add(&mut b0, "gone/", D, b"", None, (0o755, 0, 0), &[]);
    add(&mut b0, "gone/x", F, b"x", None, (0o644, 0, 0), &[]);
    add(
        &mut b0,
        "swap1",
        F,
        b"file that becomes a dir",
        None,
        (0o644, 0, 0),
        &[],
    );
    add(&mut b0, "swap2/", D, b"", None, (0o755, 0, 0), &[]);
    add(
        &mut b0,
        "swap2/inner",
        F,
        b"inner",
        None,
        (0o644, 0, 0),
        &[],
    );
    add(
        &mut b0,
        "lnabs",
        S,
        b"",
        Some("/etc/os-release"),
        (0o777, 0, 0),
        &[],
    );
    add(
        &mut b0,
        "lnrel",
        S,
        b"",
        Some("etc/passwd"),
        (0o777, 0, 0),
        &[],
    );
    add(&mut b0, "empty", F, b"", None, (0o644, 0, 0), &[]);
    add(&mut b0, "owned", F, b"mine", None, (0o640, 1000, 1001), &[]);
    add(
        &mut b0,
        "tagged",
        F,
        b"xattrs",
        None,
        (0o644, 0, 0),
        &[("user.regfs", b"hello")],
    );
    add(&mut b0, &long, F, b"long name", None, (0o644, 0, 0), &[]);
    add(
        &mut b0,
        "big.bin",
        F,
        &pseudo_random(3 << 20, 77),
        None,
        (0o644, 0, 0),
        &[],
    );
    let mut b1 = tar::Builder::new(Vec::new());
    add(&mut b1, ".wh.gone", F, b"", None, (0o644, 0, 0), &[]);
    add(&mut b1, "opq/", D, b"", None, (0o750, 0, 0), &[]);
    add(
        &mut b1,
        "opq/.wh..wh..opq",
        F,
        b"",
        None,
        (0o644, 0, 0),
        &[],
    );
    add(&mut b1, "opq/new", F, b"new", None, (0o644, 0, 0), &[]);
    add(&mut b1, "swap1/", D, b"", None, (0o755, 0, 0), &[]);
    add(
        &mut b1,
        "swap1/child",
        F,
        b"child",
        None,
        (0o644, 0, 0),
        &[],
    );
    add(
        &mut b1,
        "swap2",
        F,
        b"dir that became a file",
        None,
        (0o644, 0, 0),
        &[],
    );
    add(
        &mut b1,
        "etc/os-release",
        F,
        b"ID=layer1\n",
        None,
        (0o644, 0, 0),
        &[],
    );
    let mut b2 = tar::Builder::new(Vec::new());
    add(&mut b2, ".wh.lnrel", F, b"", None, (0o644, 0, 0), &[]);
    let b3 = tar::Builder::new(Vec::new()); // an empty layer
    vec![
        b0.into_inner().unwrap(),
        b1.into_inner().unwrap(),
        b2.into_inner().unwrap(),
        b3.into_inner().unwrap(),
    ]
}

#[derive(Debug, PartialEq)]
struct Meta {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    link: Option<String>,
    sha: Option<String>,
}

fn walk(root: &Path) -> BTreeMap<String, Meta> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                stack.push(p.clone());
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else {
                "file"
            };
            out.insert(
                rel,
                Meta {
                    kind,
                    mode: m.permissions().mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    size: if kind == "file" { m.len() } else { 0 },
                    link: ft.is_symlink().then(|| {
                        std::fs::read_link(&p)
                            .unwrap()
                            .to_string_lossy()
                            .into_owned()
                    }),
                    sha: (kind == "file").then(|| sha256_digest(&std::fs::read(&p).unwrap())),
                },
            );
        }
    }
    out
}

/// `umoci unpack` of repo:tag, copied out of the registry with skopeo. Returns the rootfs path.
fn umoci_rootfs(reg: &TestRegistry, repo: &str, tag: &str, work: &Path) -> std::path::PathBuf {
    let layout = work.join("layout");
    let st = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", "--insecure-policy"])
        .arg(format!("docker://{}/{repo}:{tag}", reg.addr()))
        .arg(format!("oci:{}:{tag}", layout.display()))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let bundle = work.join("bundle");
    let st = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(&bundle)
        .output()
        .expect("umoci must be installed");
    assert!(
        st.status.success(),
        "umoci: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    bundle.join("rootfs")
}

#[test]
fn rootfs_matches_umoci_for_tar_gzip_and_zstd() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let tars = layers();
    let rt = rt();
    for (tag, make) in [
        ("gzip", Layer::gzip as fn(&[u8]) -> Layer),
        ("tar", Layer::tar),
        ("zstd", Layer::zstd),
        ("estargz", estargz_of),
        ("zstdchunked", zstd_chunked_of),
    ] {
        let ls: Vec<Layer> = tars.iter().map(|t| make(t)).collect();
        rt.block_on(push_image(&client, "edge/img", Some(tag), "amd64", &ls));
    }
    let work = tempfile::tempdir().unwrap();
    let reference = walk(&umoci_rootfs(&reg, "edge/img", "gzip", work.path()));
    assert!(
        reference.contains_key("opq/new") && !reference.contains_key("gone"),
        "{reference:?}"
    );

    let m = TestMount::new(&reg.addr(), &["--chunk-size", "1MiB"]);
    for tag in ["gzip", "tar", "zstd", "estargz", "zstdchunked"] {
        let root = m.p(&format!("edge/img/tags/{tag}/rootfs"));
        let ours = walk(&root);
        let a: Vec<&String> = reference.keys().collect();
        let b: Vec<&String> = ours.keys().collect();
        assert_eq!(a, b, "{tag}: paths differ");
        for (path, want) in &reference {
            assert_eq!(&ours[path], want, "{tag}: {path}");
        }
        // Hard links share an inode and count their names.
        let p = std::fs::metadata(root.join("etc/passwd")).unwrap();
        let h = std::fs::metadata(root.join("etc/hard")).unwrap();
        assert_eq!(p.ino(), h.ino(), "{tag}");
        assert_eq!(p.nlink(), 2, "{tag}");
        assert_eq!(
            xattr(&root.join("tagged"), "user.regfs").unwrap(),
            b"hello",
            "{tag}"
        );
        // The per-layer trees show the markers.
        let layers_dir = m.p(&format!("edge/img/tags/{tag}/layers"));
        let l1 = ls(&layers_dir)
            .into_iter()
            .find(|n| n.starts_with("01-") && !n.contains('.'))
            .unwrap();
        assert!(
            ls(&layers_dir.join(&l1)).contains(&".wh.gone".to_string()),
            "{tag}"
        );
        assert!(
            ls(&layers_dir.join(&l1).join("opq")).contains(&".wh..wh..opq".to_string()),
            "{tag}"
        );
    }
    assert!(m.log_text().contains("indexed layer"), "{}", m.log_text());
    assert!(
        m.log_text().contains("eStargz TOC alone"),
        "{}",
        m.log_text()
    );
    assert!(
        m.log_text().contains("zstd:chunked TOC alone"),
        "{}",
        m.log_text()
    );
    // umoci reads the eStargz image too (it is a valid tar.gz): the same tree, plus the TOC file
    // that rootfs/ hides.
    let work2 = tempfile::tempdir().unwrap();
    let mut theirs = walk(&umoci_rootfs(&reg, "edge/img", "estargz", work2.path()));
    assert!(theirs.remove("stargz.index.json").is_some());
    assert_eq!(theirs, reference);
}

#[test]
fn a_plain_tar_layer_is_read_once_checked_and_then_served_from_range_reads() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let blobs: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("blob{i}"), pseudo_random(1 << 20, i)))
        .collect();
    let t = tar_of(&blobs, ("etc/os-release", b"ID=plain\n"));
    rt().block_on(push_image(
        &client,
        "plain/img",
        Some("v1"),
        "amd64",
        &[Layer::tar(&t)],
    ));
    let m = TestMount::new(&reg.addr(), &["--chunk-size", "64KiB"]);
    assert_eq!(
        std::fs::read(m.p("plain/img/tags/v1/rootfs/etc/os-release")).unwrap(),
        b"ID=plain\n"
    );
    // The index pass reads the layer once, whole, to check it against its digest (and record
    // its chunk map): the layer's bytes and the config, each once.
    let layer = t.len() as u64;
    let fetched = m.stat("blob_bytes");
    assert!(
        (layer..layer + (64 << 10)).contains(&fetched),
        "fetched {fetched} bytes of a {layer}-byte layer"
    );
    // A file is then its own range of the blob: cached here, so nothing more is fetched.
    assert_eq!(
        sha256_digest(&std::fs::read(m.p("plain/img/tags/v1/rootfs/blob3")).unwrap()),
        sha256_digest(&pseudo_random(1 << 20, 3))
    );
    assert_eq!(m.stat("blob_bytes"), fetched);
}

#[test]
fn a_corrupt_layer_gives_eio_and_the_rest_of_the_mount_works() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let mut bad = gzip(&make_tar(&[("a", &pseudo_random(100_000, 1))]));
    bad.truncate(bad.len() / 2); // a truncated gzip stream
    rt().block_on(async {
        push_image(
            &client,
            "bad/img",
            Some("v1"),
            "amd64",
            &[Layer::raw(
                bad,
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )],
        )
        .await;
        push_image(
            &client,
            "good/img",
            Some("v1"),
            "amd64",
            &[Layer::tar(&make_tar(&[("ok", b"fine")]))],
        )
        .await;
    });
    rt().block_on(async {
        // A layer whose TOC lies about one file's digest.
        let t = make_tar(&[("ok", b"fine"), ("lied", b"real bytes")]);
        push_image(
            &client,
            "tocliar/img",
            Some("v1"),
            "amd64",
            &[estargz_lying_about(&t, Some("lied"))],
        )
        .await;
        // A layer of a media type regfs cannot open.
        push_image(
            &client,
            "odd/img",
            Some("v1"),
            "amd64",
            &[Layer::raw(b"opaque".to_vec(), "application/x-something")],
        )
        .await;
    });
    let m = TestMount::new(&reg.addr(), &[]);
    let ok = std::fs::read(m.p("tocliar/img/tags/v1/rootfs/ok"));
    assert!(ok.is_ok(), "{ok:?}\n{}", m.log_text());
    let e = std::fs::read(m.p("tocliar/img/tags/v1/rootfs/lied")).unwrap_err();
    assert_eq!(errno(&e), libc::EIO, "{e}");
    let e = std::fs::read_dir(m.p("odd/img/tags/v1/rootfs"))
        .and_then(|d| d.collect::<Result<Vec<_>, _>>())
        .unwrap_err();
    assert_eq!(errno(&e), libc::EIO, "{e}");
    assert!(
        m.log_text().contains("unsupported media type"),
        "{}",
        m.log_text()
    );
    let e = std::fs::read_dir(m.p("bad/img/tags/v1/rootfs"))
        .and_then(|d| d.collect::<Result<Vec<_>, _>>())
        .unwrap_err();
    assert_eq!(errno(&e), libc::EIO, "{e}");
    assert!(m.log_text().contains("cannot index"), "{}", m.log_text());
    assert_eq!(
        std::fs::read(m.p("good/img/tags/v1/rootfs/ok")).unwrap(),
        b"fine"
    );
    // Layer files themselves still read.
    let layers = ls_files(&m.p("bad/img/tags/v1/layers"));
    assert!(std::fs::read(m.p("bad/img/tags/v1/layers").join(&layers[0])).is_ok());
}

/// A tar of `files` followed by one more small file.
fn tar_of(files: &[(String, Vec<u8>)], last: (&str, &[u8])) -> Vec<u8> {
    let mut all: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    all.push(last);
    make_tar(&all)
}

/// Compressible text, different for each seed.
fn text(len: usize, seed: u64) -> Vec<u8> {
    use std::io::Write;
    let mut v = Vec::with_capacity(len + 32);
    let mut i = seed;
    while v.len() < len {
        write!(v, "{} {} ", i % 1009, i.wrapping_mul(2654435761) % 9973).unwrap();
        i += 1;
    }
    v.truncate(len);
    v
}

#[test]
fn a_small_file_deep_in_a_compressed_layer_decompresses_from_a_checkpoint() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let files: Vec<(String, Vec<u8>)> = (0..24)
        .map(|i| (format!("f{i:02}"), text(1 << 20, i * 1000)))
        .collect();
    let t = tar_of(&files, ("deep/target", b"found me\n"));
    // A multi-frame zstd stream: one frame per MiB of tar, as seekable zstd writers make.
    let multi_frame: Vec<u8> = t.chunks(1 << 20).flat_map(zstd).collect();
    let zst = Layer {
        data: multi_frame,
        media_type: "application/vnd.oci.image.layer.v1.tar+zstd",
        diff_id: sha256_digest(&t),
        annotations: vec![],
    };
    for (tag, layer) in [("gzip", Layer::gzip(&t)), ("zstd", zst)] {
        let compressed = layer.data.len() as u64;
        rt().block_on(push_image(
            &client,
            "deep/img",
            Some(tag),
            "amd64",
            &[layer],
        ));
        let m = TestMount::new(
            &reg.addr(),
            &[
                "--chunk-size",
                "256KiB",
                "--cache-size",
                "1MiB",
                "--checkpoint-spacing",
                "1MiB",
            ],
        );
        let root = m.p(&format!("deep/img/tags/{tag}/rootfs"));
        // The first look indexes the layer (one pass over it) and records checkpoints.
        assert_eq!(ls(&root).len(), 25, "{tag}");
        let before = m.stat("blob_bytes");
        assert_eq!(
            std::fs::read(root.join("deep/target")).unwrap(),
            b"found me\n",
            "{tag}"
        );
        let fetched = m.stat("blob_bytes") - before;
        // At most one checkpoint span (1 MiB of output, less compressed) plus chunk rounding,
        // out of a layer of several MiB: not a decompression from the start.
        assert!(
            fetched <= (1 << 20) + 2 * (256 << 10),
            "{tag}: fetched {fetched} bytes of a {compressed}-byte layer"
        );
        assert!(
            fetched < compressed / 2,
            "{tag}: fetched {fetched} of {compressed}"
        );
        // Files anywhere read correctly from their checkpoints.
        for i in [0u64, 7, 23] {
            assert_eq!(
                std::fs::read(root.join(format!("f{i:02}"))).unwrap(),
                text(1 << 20, i * 1000),
                "{tag} f{i:02}"
            );
        }
    }
}

#[test]
fn cache_dir_keeps_indexes_across_mounts() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("f{i}"), text(1 << 20, i)))
        .collect();
    let layer = Layer::gzip(&tar_of(&files, ("etc/os-release", b"ID=cached\n")));
    let compressed = layer.data.len() as u64;
    rt().block_on(push_image(
        &client,
        "cached/img",
        Some("v1"),
        "amd64",
        &[layer],
    ));
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let args = [
        "--cache-dir",
        dir,
        "--checkpoint-spacing",
        "1MiB",
        "--chunk-size",
        "256KiB",
    ];
    {
        let m = TestMount::new(&reg.addr(), &args);
        assert_eq!(
            std::fs::read(m.p("cached/img/tags/v1/rootfs/etc/os-release")).unwrap(),
            b"ID=cached\n"
        );
        // A listing waits for the whole index, which is stored before it is published (the
        // file alone may be answered early, before the pass ends and stores the index).
        assert!(ls(&m.p("cached/img/tags/v1/rootfs")).contains(&"etc".to_string()));
        assert!(
            m.stat("blob_bytes") >= compressed,
            "the first mount reads the whole layer once"
        );
    }
    let indexes = std::fs::read_dir(cache.path())
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().ends_with(".index.json")
        })
        .count();
    assert_eq!(indexes, 1);
    let m = TestMount::new(&reg.addr(), &args);
    assert_eq!(
        std::fs::read(m.p("cached/img/tags/v1/rootfs/etc/os-release")).unwrap(),
        b"ID=cached\n"
    );
    let fetched = m.stat("blob_bytes");
    assert!(
        fetched < compressed / 2,
        "second mount fetched {fetched} of {compressed} bytes"
    );
    assert!(
        m.log_text().contains("loaded the index"),
        "{}",
        m.log_text()
    );
}

#[test]
fn estargz_and_zstd_chunked_read_only_footer_toc_and_the_file() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let bulk = seekable_bulk();
    let t = seekable_tar(&bulk, &[("etc/empty", b"")]);
    rt().block_on(async {
        push_image(
            &client,
            "seek/img",
            Some("estargz"),
            "amd64",
            &[estargz_of(&t)],
        )
        .await;
        push_image(
            &client,
            "seek/img",
            Some("zstdchunked"),
            "amd64",
            &[zstd_chunked_of(&t)],
        )
        .await;
    });
    for tag in ["estargz", "zstdchunked"] {
        let m = TestMount::new(&reg.addr(), &["--chunk-size", "64KiB"]);
        let layers = m.p(&format!("seek/img/tags/{tag}/layers"));
        let layer_size = std::fs::metadata(layers.join(&ls_files(&layers)[0]))
            .unwrap()
            .len();
        assert_eq!(
            std::fs::read(m.p(&format!("seek/img/tags/{tag}/rootfs/etc/os-release"))).unwrap(),
            b"ID=seekable\n",
            "{tag}\n{}",
            m.log_text()
        );
        // Footer, TOC and one small file: a few 64 KiB chunks of a 3+ MiB layer.
        let fetched = m.stat("blob_bytes");
        assert!(
            fetched <= 4 * 65536,
            "{tag}: fetched {fetched} of {layer_size} bytes"
        );
        assert!(
            m.log_text().contains("TOC alone"),
            "{tag}: {}",
            m.log_text()
        );
        // Every file reads back right, and the bookkeeping entries stay hidden.
        for (p, d) in &bulk {
            assert_eq!(
                &std::fs::read(m.p(&format!("seek/img/tags/{tag}/rootfs/{p}"))).unwrap(),
                d,
                "{tag} {p}"
            );
        }
        assert_eq!(
            std::fs::read(m.p(&format!("seek/img/tags/{tag}/rootfs/etc/empty"))).unwrap(),
            b""
        );
        assert_eq!(
            ls(&m.p(&format!("seek/img/tags/{tag}/rootfs"))),
            vec!["etc", "usr"],
            "{tag}"
        );
    }
}
