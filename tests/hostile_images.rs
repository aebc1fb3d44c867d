//! Hostile images, core tier over the fake registry: odd tar headers, descriptors that lie about
//! sizes, configs that claim 2^62 bytes, diff_id mismatches, symlinks pointing out of the image,
//! and a gzip bomb. Every case asserts the errno, that the core still serves other paths
//! afterwards, and that nothing bad stays cached.

mod common;

use common::walk;

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use regfs::digest::sha256_digest;
use regfs::fs::{Fs, FsOptions, Kind, ROOT_INO};
use regfs::registry::fake::FakeRegistry;
use regfs::registry::Registry;

const KIB: u64 = 1024;
const CHUNK: u64 = 4 * KIB;
const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const EIO: i32 = libc::EIO;

fn setup() -> (Arc<FakeRegistry>, Arc<Fs>) {
    let reg = Arc::new(FakeRegistry::new());
    let fs = Fs::new(
        reg.clone() as Arc<dyn Registry>,
        FsOptions {
            chunk_size: CHUNK,
            cache_size: 256 * CHUNK,
            ..FsOptions::default()
        },
    );
    (reg, fs)
}

async fn names(fs: &Fs, path: &str) -> Result<Vec<String>, i32> {
    let ino = walk(fs, path).await?;
    let mut v: Vec<String> = fs
        .readdir(ino)
        .await
        .map_err(|e| e.errno)?
        .into_iter()
        .map(|e| e.name)
        .filter(|n| n != "." && n != "..")
        .collect();
    v.sort();
    Ok(v)
}

async fn read_all(fs: &Fs, path: &str) -> Result<Vec<u8>, i32> {
    let ino = walk(fs, path).await?;
    let h = fs.open(ino, false).await.map_err(|e| e.errno)?;
    let mut out = Vec::new();
    let result = loop {
        match fs.read(h.fh, out.len() as u64, 128 * 1024).await {
            Ok(b) if b.is_empty() => break Ok(out),
            Ok(b) => out.extend_from_slice(&b),
            Err(e) => break Err(e.errno),
        }
    };
    fs.release(h.fh).await;
    result
}

async fn stats(fs: &Fs) -> serde_json::Value {
    let v = fs.getxattr(ROOT_INO, "user.regfs.stats").await.unwrap();
    serde_json::from_slice(&v).unwrap()
}

/// An image of `layers` (bytes, media type, size the descriptor claims) with a config naming
/// `diff_ids`, whose config descriptor claims `config_size` (None: the truth).
fn image(
    reg: &FakeRegistry,
    repo: &str,
    tag: &str,
    layers: &[(Vec<u8>, &str, Option<u64>)],
    diff_ids: &[String],
    config_size: Option<u64>,
) {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = reg.add_blob(repo, config.clone());
    let descs: Vec<_> = layers
        .iter()
        .map(|(data, mt, size)| {
            let d = reg.add_blob(repo, data.clone());
            serde_json::json!({"mediaType": mt, "digest": d, "size": size.unwrap_or(data.len() as u64)})
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": config_size.unwrap_or(config.len() as u64)},
        "layers": descs,
    }))
    .unwrap();
    reg.add_manifest(repo, Some(tag), manifest);
}

/// A gzip layer of `tar` with the right diff_id, as `image` takes it.
fn gz_layer(tar: &[u8]) -> ((Vec<u8>, &'static str, Option<u64>), String) {
    ((common::gzip(tar), GZ, None), sha256_digest(tar))
}

/// A tar header with raw GNU base-256 mtime `secs` (as GNU tar writes times before 1970).
fn header_with_mtime(path: &str, secs: i64, data: &[u8]) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    let field = &mut h.as_old_mut().mtime;
    field.copy_from_slice(&i128::from(secs).to_be_bytes()[4..]);
    field[0] |= 0x80; // base-256 marker (already set for a negative number)
    h.set_cksum();
    h
}

/// A tar with files carrying hostile metadata: mtimes before 1970 (base-256), 0, 2100 and
/// the largest base-256 values; uid/gid past 2^32; every mode bit.
fn odd_headers_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, secs) in [
        ("etc/pre1970", -86_400 * 365),
        ("etc/zero", 0),
        ("etc/y2100", 4_102_444_800),
        ("etc/min", i64::MIN),
        ("etc/max", i64::MAX),
    ] {
        let h = header_with_mtime(name, secs, b"x");
        b.append(&h, &b"x"[..]).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_path("etc/ids").unwrap();
    h.set_size(1);
    h.set_mode(0o7777);
    h.set_uid(u64::MAX >> 1);
    h.set_gid(1 << 40);
    h.set_cksum();
    b.append(&h, &b"y"[..]).unwrap();
    b.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_tar_mtime_uid_or_mode_lists_without_panic() {
    let (reg, fs) = setup();
    let (l, d) = gz_layer(&odd_headers_tar());
    image(&reg, "odd", "v1", &[l], &[d], None);
    let list = names(&fs, "odd/tags/v1/rootfs/etc").await.unwrap();
    assert_eq!(list, ["ids", "max", "min", "pre1970", "y2100", "zero"]);
    for n in &list {
        let ino = walk(&fs, &format!("odd/tags/v1/rootfs/etc/{n}"))
            .await
            .unwrap();
        let a = fs.getattr(ino).await.unwrap().attr;
        assert_eq!(a.kind, Kind::File);
        match n.as_str() {
            "pre1970" => assert_eq!(a.mtime, UNIX_EPOCH - Duration::from_secs(86_400 * 365)),
            "zero" => assert_eq!(a.mtime, UNIX_EPOCH),
            "y2100" => assert_eq!(a.mtime, UNIX_EPOCH + Duration::from_secs(4_102_444_800)),
            "ids" => assert_eq!(a.perm, 0o7777),
            _ => {}
        }
    }
    assert_eq!(
        read_all(&fs, "odd/tags/v1/rootfs/etc/pre1970")
            .await
            .unwrap(),
        b"x"
    );
    // The layer's own tree shows the same entries.
    let layers = names(&fs, "odd/tags/v1/layers").await.unwrap();
    let dir = layers.iter().find(|n| !n.contains('.')).unwrap();
    assert_eq!(
        names(&fs, &format!("odd/tags/v1/layers/{dir}/etc"))
            .await
            .unwrap()
            .len(),
        6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_claiming_2_pow_62_bytes_is_eio_not_an_abort() {
    let (reg, fs) = setup();
    let tar = common::make_tar(&[("etc/hello", b"hi\n")]);
    let (l, d) = gz_layer(&tar);
    image(
        &reg,
        "huge",
        "v1",
        std::slice::from_ref(&l),
        std::slice::from_ref(&d),
        Some(1 << 62),
    );
    image(&reg, "huge", "ok", &[l], &[d], None);
    assert_eq!(names(&fs, "huge/tags/v1/rootfs").await, Err(EIO));
    // config.json itself: its size is what the descriptor says, and a read is EIO.
    let ino = walk(&fs, "huge/tags/v1/config.json").await.unwrap();
    assert_eq!(fs.getattr(ino).await.unwrap().attr.size, 1 << 62);
    assert_eq!(read_all(&fs, "huge/tags/v1/config.json").await, Err(EIO));
    // The same layer in an honest image still works.
    assert_eq!(
        read_all(&fs, "huge/tags/ok/rootfs/etc/hello")
            .await
            .unwrap(),
        b"hi\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descriptor_size_that_disagrees_with_the_blob_is_eio_and_poisons_nothing() {
    let (reg, fs) = setup();
    let blob = common::pseudo_random(10 * CHUNK as usize + 123, 9);
    let len = blob.len() as u64;
    let raw = "application/octet-stream";
    image(&reg, "sz", "right", &[(blob.clone(), raw, None)], &[], None);
    image(
        &reg,
        "sz",
        "short",
        &[(blob.clone(), raw, Some(len - 100))],
        &[],
        None,
    );
    image(
        &reg,
        "sz",
        "long",
        &[(blob.clone(), raw, Some(len + CHUNK))],
        &[],
        None,
    );
    let file = |tag: &str| {
        let d = sha256_digest(&blob);
        format!("sz/tags/{tag}/layers/00-{}.blob", &d[7..19])
    };
    // The liars first: no success with short data, and nothing that the honest image reads.
    assert_eq!(read_all(&fs, &file("short")).await, Err(EIO));
    assert_eq!(read_all(&fs, &file("long")).await, Err(EIO));
    assert_eq!(read_all(&fs, &file("right")).await.unwrap(), blob);
    // And the other way round: the honest image's cached chunks do not make a liar succeed.
    assert_eq!(read_all(&fs, &file("short")).await, Err(EIO));
    assert_eq!(read_all(&fs, &file("right")).await.unwrap(), blob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diff_id_mismatch_is_eio_and_leaves_no_span_cached() {
    let (reg, fs) = setup();
    let big = common::pseudo_random(40 * CHUNK as usize, 3);
    let tar = common::make_tar(&[("data/big", &big), ("data/small", b"s")]);
    let (l, _) = gz_layer(&tar);
    image(
        &reg,
        "bad",
        "v1",
        &[l],
        &[format!("sha256:{}", "0".repeat(64))],
        None,
    );
    let good_tar = common::make_tar(&[("ok", b"fine")]);
    let (gl, gd) = gz_layer(&good_tar);
    image(&reg, "bad", "good", &[gl], &[gd], None);
    let before = stats(&fs).await["cache_chunks"].as_u64().unwrap();
    assert_eq!(names(&fs, "bad/tags/v1/rootfs").await, Err(EIO));
    let after = stats(&fs).await["cache_chunks"].as_u64().unwrap();
    // Only the config's chunk may remain: the 40+ spans the pass made were evicted.
    assert!(after <= before + 1, "{before} -> {after} chunks cached");
    // Asked again: still EIO (the failed index is not kept, and no span slips through).
    assert_eq!(names(&fs, "bad/tags/v1/rootfs/data").await, Err(EIO));
    assert_eq!(
        read_all(&fs, "bad/tags/good/rootfs/ok").await.unwrap(),
        b"fine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_are_only_read_never_resolved_on_the_host() {
    let (reg, fs) = setup();
    let mut b = tar::Builder::new(Vec::new());
    for (name, target) in [
        ("etc/link", "/etc/passwd"),
        ("up", "../../../../../../etc"),
        ("root", "/"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, name, target).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let (l, d) = gz_layer(&tar);
    image(&reg, "links", "v1", &[l], &[d], None);
    let ino = walk(&fs, "links/tags/v1/rootfs/etc/link").await.unwrap();
    assert_eq!(fs.getattr(ino).await.unwrap().attr.kind, Kind::Symlink);
    assert_eq!(&fs.readlink(ino).await.unwrap()[..], b"/etc/passwd");
    let up = walk(&fs, "links/tags/v1/rootfs/up").await.unwrap();
    assert_eq!(
        &fs.readlink(up).await.unwrap()[..],
        b"../../../../../../etc"
    );
    // Walking through a symlink inside the core never reaches the host's files.
    for p in [
        "links/tags/v1/rootfs/up/passwd",
        "links/tags/v1/rootfs/root/etc",
    ] {
        assert!(walk(&fs, p).await.is_err(), "{p}");
    }
    // Reading a symlink as a file is refused, not followed.
    assert!(read_all(&fs, "links/tags/v1/rootfs/etc/link")
        .await
        .is_err());
    assert_eq!(
        names(&fs, "links/tags/v1/rootfs").await.unwrap(),
        ["etc", "root", "up"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_reads_right_with_a_bounded_cache() {
    let (reg, fs) = setup();
    let zeros = vec![0u8; 8 << 20];
    let tar = common::make_tar(&[("bomb", &zeros), ("after", b"still here")]);
    let (l, d) = gz_layer(&tar);
    assert!(
        l.0.len() * 100 < zeros.len(),
        "{} bytes compressed",
        l.0.len()
    );
    image(&reg, "bomb", "v1", &[l], &[d], None);
    let got = read_all(&fs, "bomb/tags/v1/rootfs/bomb").await.unwrap();
    assert!(got.len() == zeros.len() && got.iter().all(|&b| b == 0));
    let s = stats(&fs).await;
    assert!(s["cache_bytes"].as_u64().unwrap() <= 256 * CHUNK, "{s}");
    assert_eq!(
        read_all(&fs, "bomb/tags/v1/rootfs/after").await.unwrap(),
        b"still here"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_digests_in_a_manifest_are_eio_not_a_panic() {
    let (reg, fs) = setup();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:ab","size":2}},
            "layers":[{{"mediaType":"{GZ}","digest":"sha256:ééééééééééééééé","size":3}}]}}"#
    );
    reg.add_manifest("dig", Some("v1"), manifest.into_bytes());
    let tar = common::make_tar(&[("f", b"1")]);
    let (l, d) = gz_layer(&tar);
    image(&reg, "dig", "ok", &[l], &[d], None);
    assert_eq!(names(&fs, "dig/tags/v1/layers").await, Err(EIO));
    assert_eq!(read_all(&fs, "dig/tags/ok/rootfs/f").await.unwrap(), b"1");
}

/// Real mount: `ls -l rootfs/etc/` over a pre-1970 (GNU base-256) mtime used to panic while the
/// inode lock was held and take the whole mount down. Now it lists, and the mount keeps working.
#[test]
fn real_mount_lists_a_pre_1970_mtime_and_keeps_working() {
    use std::os::unix::fs::MetadataExt;
    let reg = common::TestRegistry::start();
    let client = reg.client();
    common::rt().block_on(async {
        let tar = odd_headers_tar();
        common::push_image(
            &client,
            "hostile/odd",
            Some("v1"),
            "amd64",
            &[common::Layer::gzip(&tar)],
        )
        .await;
    });
    let m = common::TestMount::new(&reg.url(), &[]);
    let etc = m.p("hostile/odd/tags/v1/rootfs/etc");
    let mut seen = Vec::new();
    for e in std::fs::read_dir(&etc).unwrap() {
        let e = e.unwrap();
        let md = std::fs::symlink_metadata(e.path()).unwrap();
        seen.push((e.file_name().into_string().unwrap(), md.mtime()));
    }
    seen.sort();
    assert_eq!(seen.len(), 6);
    assert!(
        seen.contains(&("pre1970".to_string(), -86_400 * 365)),
        "{seen:?}"
    );
    assert_eq!(
        std::fs::read(etc.join("pre1970")).unwrap(),
        b"x",
        "the mount still reads after listing"
    );
    assert!(common::ls(&m.path()).contains(&"hostile".to_string()));
    assert!(m.child.as_ref().is_some());
}

/// A plain tar layer: the index pass reads the whole blob, checks it against its digest and
/// records its chunk map, so a file's bytes fetched later (its chunks evicted meanwhile) from a
/// registry that now corrupts them are EIO, never wrong bytes; and a blob that does not hash to
/// its digest has no tree at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_tar_layer_is_checked_whole_and_its_later_chunks_against_the_map() {
    use regfs::registry::faulty::{Fault, FaultyRegistry, Op};
    // A core over a registry that can turn bad, caching `chunks` chunks, without readahead.
    let setup = |chunks: u64| {
        let reg = Arc::new(FakeRegistry::new());
        let faulty = Arc::new(FaultyRegistry::new(reg.clone()));
        let options = FsOptions {
            chunk_size: CHUNK,
            cache_size: chunks * CHUNK,
            readahead: 0,
            ..FsOptions::default()
        };
        let fs = Fs::new(faulty.clone() as Arc<dyn Registry>, options);
        (reg, faulty, fs)
    };
    let (reg, faulty, fs) = setup(64); // the 160-chunk file cannot stay cached
    let big = common::pseudo_random(160 * CHUNK as usize, 5);
    let tar = common::make_tar(&[("data/big", &big), ("data/small", b"s")]);
    const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    image(
        &reg,
        "plain",
        "v1",
        &[(tar.clone(), TAR, None)],
        &[sha256_digest(&tar)],
        None,
    );
    assert_eq!(
        names(&fs, "plain/tags/v1/rootfs/data").await.unwrap(),
        ["big", "small"]
    );
    assert_eq!(
        read_all(&fs, "plain/tags/v1/rootfs/data/big")
            .await
            .unwrap(),
        big
    );
    // The registry turns bad: every chunk it serves from now on is flipped.
    for _ in 0..400 {
        faulty.inject(Op::BlobRange, Fault::Corrupt);
    }
    assert_eq!(
        read_all(&fs, "plain/tags/v1/rootfs/data/big").await,
        Err(EIO)
    );

    // A plain tar blob that does not hash to its digest: the layer is EIO, other images work.
    let (reg, faulty, fs) = setup(256);
    image(
        &reg,
        "plain",
        "v1",
        &[(tar.clone(), TAR, None)],
        &[sha256_digest(&tar)],
        None,
    );
    let good = common::make_tar(&[("ok", b"fine")]);
    image(
        &reg,
        "plain",
        "good",
        &[(good.clone(), TAR, None)],
        &[sha256_digest(&good)],
        None,
    );
    // The config is fetched clean first; then every range of the layer blob comes flipped.
    walk(&fs, "plain/tags/v1").await.unwrap();
    walk(&fs, "plain/tags/good").await.unwrap();
    for _ in 0..400 {
        faulty.inject_for(Op::BlobRange, &sha256_digest(&tar), Fault::Corrupt);
    }
    assert_eq!(names(&fs, "plain/tags/v1/rootfs").await, Err(EIO));
    assert_eq!(
        read_all(&fs, "plain/tags/good/rootfs/ok").await.unwrap(),
        b"fine"
    );
}
