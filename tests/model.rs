//! Model test of the filesystem core: seeded random sequences of operations (lookup, readdir,
//! getattr, open/read/release, forget, mkdir, create/write/flush/release, rmdir, unlink) on `Fs`
//! over the in-memory fake registry, each result compared with a small reference model of the
//! tree (names, kinds, sizes, bytes, errnos, inode liveness).
//!
//! A failure prints the seed and the operations run so far; replay one seed with
//! `MODEL_SEED=<n> cargo nextest run -E 'binary(model)'` (`MODEL_SEEDS` / `MODEL_OPS` scale the
//! run). Real bugs the model found are pinned as named regression tests at the end.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use regfs::digest::{digest_hex, sha256_digest};
use regfs::fs::{Fh, Fs, FsOptions, Ino, Kind, ROOT_INO};
use regfs::registry::fake::FakeRegistry;
use regfs::registry::Registry;

const SEEDS: u64 = 200;
const OPS: usize = 60;
const CHUNK: u64 = 512;
const UPLOAD_CHUNK: u64 = 1024;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const RAW: &str = "application/vnd.example.data.v1";
const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

// ------------------------------------------------------------------------------------ rng

/// splitmix64: tiny, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

fn bytes_of(len: usize, seed: u64) -> Bytes {
    let mut r = Rng(seed);
    (0..len).map(|_| r.next() as u8).collect::<Vec<_>>().into()
}

// ------------------------------------------------------------------------------- fixture

/// A tree as the model sees it: path -> None (directory) or Some(file bytes). "" is the root.
type Tree = BTreeMap<String, Option<Bytes>>;

struct Layer {
    digest: String,
    media_type: &'static str,
    blob: Bytes,
    /// The layer's own tree (None: not a tar layer, no tree).
    tree: Option<Tree>,
}

struct Image {
    digest: String,
    manifest: Bytes,
    config: Bytes,
    layers: Vec<Layer>,
    /// The merged tree (None: a layer has no tree, so the rootfs fails with EIO).
    rootfs: Option<Tree>,
}

/// Entries of a tar: (path, None = directory | Some(bytes)). Parents not listed are implied.
type TarSpec = Vec<(&'static str, Option<Bytes>)>;

fn tar_of(spec: &TarSpec) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in spec {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match data {
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            Some(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(d.len() as u64);
                b.append_data(&mut h, path, &d[..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn add_parents(t: &mut Tree, path: &str) {
    let mut p = path;
    while let Some(i) = p.rfind('/') {
        p = &p[..i];
        t.entry(p.to_string()).or_insert(None);
    }
}

fn tree_of(spec: &TarSpec) -> Tree {
    let mut t = Tree::new();
    t.insert(String::new(), None);
    for (path, data) in spec {
        let p = path.trim_end_matches('/').to_string();
        add_parents(&mut t, &p);
        t.insert(p, data.clone());
    }
    t
}

fn layer(spec: &TarSpec, media_type: &'static str) -> (Layer, String) {
    let tar = tar_of(spec);
    let diff_id = sha256_digest(&tar);
    let blob = Bytes::from(if media_type == TAR_GZ {
        gzip(&tar)
    } else {
        tar
    });
    let l = Layer {
        digest: sha256_digest(&blob),
        media_type,
        blob,
        tree: Some(tree_of(spec)),
    };
    (l, diff_id)
}

/// Apply layers bottom to top: whiteouts delete, a later entry replaces an earlier one.
fn merge(layers: &[&Tree]) -> Tree {
    let mut out = Tree::new();
    out.insert(String::new(), None);
    for t in layers {
        for (path, data) in t.iter() {
            let name = path.rsplit('/').next().unwrap();
            if let Some(hidden) = name.strip_prefix(".wh.") {
                let dir = &path[..path.len() - name.len()];
                let victim = format!("{dir}{hidden}");
                let under = format!("{victim}/");
                out.retain(|k, _| k != &victim && !k.starts_with(&under));
                continue;
            }
            if data.is_some() {
                let under = format!("{path}/");
                out.retain(|k, _| !k.starts_with(&under));
            }
            out.insert(path.clone(), data.clone());
        }
    }
    out
}

fn image(layers: Vec<(Layer, String)>) -> Image {
    let diff_ids: Vec<&String> = layers.iter().map(|(_, d)| d).collect();
    let config = Bytes::from(
        serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
        .to_string(),
    );
    let layers: Vec<Layer> = layers.into_iter().map(|(l, _)| l).collect();
    let manifest = Bytes::from(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(&config), "size": config.len()},
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": l.media_type, "digest": l.digest, "size": l.blob.len(),
            })).collect::<Vec<_>>(),
        })
        .to_string(),
    );
    let trees: Option<Vec<&Tree>> = layers.iter().map(|l| l.tree.as_ref()).collect();
    let rootfs = trees.map(|t| merge(&t));
    Image {
        digest: sha256_digest(&manifest),
        manifest,
        config,
        layers,
        rootfs,
    }
}

/// The registry's starting content, built once for every seed.
struct Fixture {
    images: Vec<Image>,
    /// repo -> [(tag, image)].
    repos: Vec<(&'static str, Vec<(&'static str, usize)>)>,
    /// A blob no manifest mentions: (repo, bytes).
    loose: (&'static str, Bytes),
}

fn fixture() -> Fixture {
    let l1: TarSpec = vec![
        ("etc/", None),
        ("etc/hostname", Some(Bytes::from_static(b"box\n"))),
        ("etc/os-release", Some(Bytes::from_static(b"NAME=one\n"))),
        ("bin/", None),
        ("bin/sh", Some(bytes_of(2000, 1))),
        ("usr/share/doc/readme", Some(bytes_of(700, 2))),
    ];
    let l2: TarSpec = vec![
        ("etc/", None),
        (
            "etc/os-release",
            Some(Bytes::from_static(b"NAME=two\nVERSION=2\n")),
        ),
        ("etc/.wh.hostname", Some(Bytes::new())),
        ("opt/", None),
        ("opt/big", Some(bytes_of(3000, 3))),
        ("opt/empty", Some(Bytes::new())),
    ];
    let l3: TarSpec = vec![
        ("data/", None),
        ("data/x.txt", Some(bytes_of(1500, 4))),
        ("data/y", Some(Bytes::from_static(b"y"))),
    ];
    let raw_blob = bytes_of(900, 5);
    let raw = Layer {
        digest: sha256_digest(&raw_blob),
        media_type: RAW,
        blob: raw_blob.clone(),
        tree: None,
    };
    let images = vec![
        image(vec![layer(&l1, TAR_GZ), layer(&l2, TAR_GZ)]),
        image(vec![layer(&l3, TAR)]),
        image(vec![layer(&l1, TAR_GZ), (raw, sha256_digest(&raw_blob))]),
    ];
    Fixture {
        images,
        repos: vec![
            ("alpha", vec![("v1", 0), ("latest", 0), ("v2", 1)]),
            ("alpha/sub", vec![("edge", 1)]),
            ("beta/app", vec![("1.0", 2), ("2.0", 0)]),
        ],
        loose: ("beta/app", bytes_of(777, 6)),
    }
}

fn seed_registry(fx: &Fixture, reg: &FakeRegistry) {
    for (repo, tags) in &fx.repos {
        for (tag, i) in tags {
            let img = &fx.images[*i];
            reg.add_blob(repo, img.config.clone());
            for l in &img.layers {
                reg.add_blob(repo, l.blob.clone());
            }
            reg.add_manifest(repo, Some(tag), img.manifest.clone());
        }
    }
    reg.add_blob(fx.loose.0, fx.loose.1.clone());
}

// ---------------------------------------------------------------------------------- model

#[derive(Clone, Debug)]
enum Upload {
    /// Being written by the writing handle in this slot.
    Writing(Vec<u8>),
    Done(Bytes),
}

#[derive(Clone, Default)]
struct RepoState {
    tags: BTreeMap<String, usize>,
    pending: BTreeSet<String>,
    uploads: BTreeMap<String, Upload>,
    /// Does the registry know the repository (seeded, or written to)?
    in_registry: bool,
    /// Blobs and manifests the registry holds in this repository, by hex.
    content: BTreeMap<String, Bytes>,
    /// Manifests deleted by rmdir: the core may still serve them from what it has seen.
    gone: BTreeMap<String, Bytes>,
}

/// A file's expected bytes, and whether reading it may fail with ENOENT instead (its digest was
/// deleted from the registry, and the core may or may not still have it).
#[derive(Clone)]
struct FileM {
    data: Bytes,
    /// ENOENT is accepted instead of the bytes (a deleted manifest the core may still have
    /// seen, or a known bug).
    enoent_ok: bool,
    /// Found under `blobs/sha256/`: its media type depends on how the core met it first, so
    /// its inode may change.
    by_digest: bool,
}

impl fmt::Debug for FileM {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "File({} bytes, {})",
            self.data.len(),
            &sha256_digest(&self.data)[7..19]
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TreeRef {
    Rootfs(usize),
    Layer(usize, usize),
}

/// What a path is, in the model.
#[derive(Clone, Debug)]
enum M {
    Root,
    Dir(String),
    NsEscape(String),
    Tags(String),
    Tag {
        repo: String,
        tag: String,
        image: Option<usize>,
    },
    Layers(usize),
    Tree(TreeRef, String),
    Blobs(String),
    BlobsAlgo(String),
    Uploads(String),
    Upload {
        repo: String,
        name: String,
    },
    /// `index.json` as readdir lists it (lookup gives its `File`).
    IndexJson(String),
    File(FileM),
}

impl M {
    fn is_dir(&self) -> bool {
        !matches!(self, M::Upload { .. } | M::IndexJson(_) | M::File(_))
    }
    /// Same identity => the core must keep the inode number (None: no check).
    fn ident(&self) -> Option<String> {
        match self {
            M::IndexJson(_) => None,
            M::File(f) if f.enoent_ok || f.by_digest => None,
            m => Some(format!("{m:?}")),
        }
    }
}

struct Model<'a> {
    fx: &'a Fixture,
    repos: BTreeMap<String, RepoState>,
}

const RESERVED: &[&str] = &["tags", "blobs", "uploads", "index.json", "oci-layout"];

fn valid_component(c: &str) -> bool {
    regfs::registry::is_valid_component(c)
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}/{name}")
    }
}

impl<'a> Model<'a> {
    fn new(fx: &'a Fixture) -> Self {
        let mut repos = BTreeMap::new();
        for (repo, tags) in &fx.repos {
            let r: &mut RepoState = repos.entry(repo.to_string()).or_default();
            r.in_registry = true;
            for (tag, i) in tags {
                let img = &fx.images[*i];
                r.tags.insert(tag.to_string(), *i);
                r.content
                    .insert(digest_hex(&img.digest).into(), img.manifest.clone());
                r.content.insert(
                    digest_hex(&sha256_digest(&img.config)).into(),
                    img.config.clone(),
                );
                for l in &img.layers {
                    r.content
                        .insert(digest_hex(&l.digest).into(), l.blob.clone());
                }
            }
        }
        let loose = repos.get_mut(fx.loose.0).unwrap();
        loose.content.insert(
            digest_hex(&sha256_digest(&fx.loose.1)).into(),
            fx.loose.1.clone(),
        );
        Model { fx, repos }
    }

    fn is_repo(&self, path: &str) -> bool {
        self.repos.contains_key(path)
    }

    /// The next components below `prefix` among known repositories.
    fn nested(&self, prefix: &str) -> BTreeSet<String> {
        self.repos
            .keys()
            .filter_map(|r| {
                if prefix.is_empty() {
                    Some(r.as_str())
                } else {
                    r.strip_prefix(prefix).and_then(|r| r.strip_prefix('/'))
                }
            })
            .filter_map(|rest| rest.split('/').next().filter(|f| !f.is_empty()))
            .map(str::to_string)
            .collect()
    }

    /// `index.json` of `repo`: every tag; an empty index for a repository made by mkdir that the
    /// registry does not know yet (once a bug, pinned as
    /// `index_json_of_a_new_repository_is_listed_but_missing`).
    fn index_json(&self, repo: &str) -> FileM {
        let r = &self.repos[repo];
        let manifests: Vec<serde_json::Value> = r
            .tags
            .iter()
            .map(|(t, i)| {
                let img = &self.fx.images[*i];
                serde_json::json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": img.digest,
                    "size": img.manifest.len() as u64,
                    "annotations": {"org.opencontainers.image.ref.name": t},
                })
            })
            .collect();
        let doc = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        });
        FileM {
            data: serde_json::to_vec_pretty(&doc).unwrap().into(),
            enoent_ok: false,
            by_digest: false,
        }
    }

    fn file(data: &Bytes) -> M {
        M::File(FileM {
            data: data.clone(),
            enoent_ok: false,
            by_digest: false,
        })
    }

    fn tree(&self, t: TreeRef) -> Option<&Tree> {
        match t {
            TreeRef::Rootfs(i) => self.fx.images[i].rootfs.as_ref(),
            TreeRef::Layer(i, l) => self.fx.images[i].layers[l].tree.as_ref(),
        }
    }

    fn layer_names(&self, i: usize, li: usize) -> (String, Option<String>) {
        let l = &self.fx.images[i].layers[li];
        let base = format!("{li:02}-{}", &digest_hex(&l.digest)[..12]);
        match l.media_type {
            TAR_GZ => (format!("{base}.tar.gz"), Some(base)),
            TAR => (format!("{base}.tar"), Some(base)),
            _ => (format!("{base}.blob"), None),
        }
    }

    /// A directory's listing: (name, node). Err(errno) when listing fails.
    fn children(&self, m: &M) -> Result<Vec<(String, M)>, i32> {
        let mut out = Vec::new();
        match m {
            M::Root => {
                for c in self.nested("") {
                    out.push((c.clone(), M::Dir(c)));
                }
            }
            M::Dir(path) => {
                let nested = self.nested(path);
                if self.is_repo(path) {
                    let r = || path.clone();
                    out.push(("index.json".into(), M::IndexJson(r())));
                    out.push(("tags".into(), M::Tags(r())));
                    out.push(("blobs".into(), M::Blobs(r())));
                    out.push(("uploads".into(), M::Uploads(r())));
                    out.push((
                        "oci-layout".into(),
                        Self::file(&Bytes::from_static(OCI_LAYOUT)),
                    ));
                    if nested.iter().any(|c| RESERVED.contains(&c.as_str())) {
                        out.push(("_ns".into(), M::NsEscape(path.clone())));
                    }
                    for c in nested {
                        if !RESERVED.contains(&c.as_str()) {
                            out.push((c.clone(), M::Dir(join(path, &c))));
                        }
                    }
                } else {
                    for c in nested {
                        out.push((c.clone(), M::Dir(join(path, &c))));
                    }
                }
            }
            M::NsEscape(path) => {
                for c in self.nested(path) {
                    out.push((c.clone(), M::Dir(join(path, &c))));
                }
            }
            M::Tags(repo) => {
                let r = &self.repos[repo];
                for (t, i) in &r.tags {
                    out.push((
                        t.clone(),
                        M::Tag {
                            repo: repo.clone(),
                            tag: t.clone(),
                            image: Some(*i),
                        },
                    ));
                }
                for t in r.pending.iter().filter(|t| !r.tags.contains_key(*t)) {
                    out.push((
                        t.clone(),
                        M::Tag {
                            repo: repo.clone(),
                            tag: t.clone(),
                            image: None,
                        },
                    ));
                }
            }
            M::Tag { image: None, .. } => {}
            M::Tag { image: Some(i), .. } => {
                let img = &self.fx.images[*i];
                out.push(("manifest.json".into(), Self::file(&img.manifest)));
                out.push(("config.json".into(), Self::file(&img.config)));
                out.push(("layers".into(), M::Layers(*i)));
                out.push(("rootfs".into(), M::Tree(TreeRef::Rootfs(*i), String::new())));
            }
            M::Layers(i) => {
                for (li, l) in self.fx.images[*i].layers.iter().enumerate() {
                    let (file, dir) = self.layer_names(*i, li);
                    out.push((file, Self::file(&l.blob)));
                    if let Some(d) = dir {
                        out.push((d, M::Tree(TreeRef::Layer(*i, li), String::new())));
                    }
                }
            }
            M::Tree(t, dir) => {
                let Some(tree) = self.tree(*t) else {
                    return Err(libc::EIO);
                };
                for (p, data) in tree {
                    if p.is_empty() {
                        continue;
                    }
                    let (parent, name) = match p.rfind('/') {
                        Some(i) => (&p[..i], &p[i + 1..]),
                        None => ("", p.as_str()),
                    };
                    if parent != dir {
                        continue;
                    }
                    // The merged view never shows whiteout markers.
                    if matches!(t, TreeRef::Rootfs(_)) && name.starts_with(".wh.") {
                        continue;
                    }
                    out.push((
                        name.to_string(),
                        match data {
                            None => M::Tree(*t, p.clone()),
                            Some(d) => Self::file(d),
                        },
                    ));
                }
            }
            M::Blobs(repo) => out.push(("sha256".into(), M::BlobsAlgo(repo.clone()))),
            M::BlobsAlgo(_) => unreachable!("history-dependent: checked as a subset"),
            M::Uploads(repo) => {
                for name in self.repos[repo].uploads.keys() {
                    out.push((
                        name.clone(),
                        M::Upload {
                            repo: repo.clone(),
                            name: name.clone(),
                        },
                    ));
                }
            }
            M::Upload { .. } | M::IndexJson(_) | M::File(_) => return Err(libc::ENOTDIR),
        }
        Ok(out)
    }

    /// Lookup of `name` in `m`: Ok(None) = ENOENT.
    fn find(&self, m: &M, name: &str) -> Result<Option<M>, i32> {
        match m {
            M::Root | M::Dir(_) | M::NsEscape(_) => {
                let path = match m {
                    M::Root => "",
                    M::Dir(p) | M::NsEscape(p) => p.as_str(),
                    _ => unreachable!(),
                };
                if let M::Dir(p) = m {
                    if self.is_repo(p) {
                        if name == "index.json" {
                            return Ok(Some(M::File(self.index_json(p))));
                        }
                        if let Some(c) = self
                            .children(m)?
                            .into_iter()
                            .find(|(n, _)| n == name && RESERVED.contains(&n.as_str()))
                        {
                            return Ok(Some(c.1));
                        }
                        if name == "_ns" {
                            return Ok(Some(M::NsEscape(p.clone())));
                        }
                    }
                }
                if !valid_component(name) {
                    return Ok(None);
                }
                let cand = join(path, name);
                let under = format!("{cand}/");
                let known = self
                    .repos
                    .keys()
                    .any(|r| r == &cand || r.starts_with(&under));
                Ok(known.then_some(M::Dir(cand)))
            }
            M::Tags(_) if !regfs::registry::is_valid_tag(name) => Ok(None),
            M::BlobsAlgo(repo) => {
                let r = &self.repos[repo];
                if let Some(d) = r.content.get(name) {
                    return Ok(Some(M::File(FileM {
                        data: d.clone(),
                        enoent_ok: false,
                        by_digest: true,
                    })));
                }
                Ok(r.gone.get(name).map(|d| {
                    M::File(FileM {
                        data: d.clone(),
                        enoent_ok: true,
                        by_digest: true,
                    })
                }))
            }
            M::Upload { .. } | M::IndexJson(_) | M::File(_) => Err(libc::ENOTDIR),
            _ => Ok(self
                .children(m)?
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, m)| m)),
        }
    }

    /// (kind, size) as lookup/getattr report it.
    fn attr(&self, m: &M) -> (Kind, u64) {
        match m {
            M::File(f) => (Kind::File, f.data.len() as u64),
            M::IndexJson(_) => (Kind::File, 0),
            M::Upload { repo, name } => (Kind::File, self.upload_size(repo, name)),
            _ => (Kind::Dir, 0),
        }
    }

    fn upload_size(&self, repo: &str, name: &str) -> u64 {
        match self.repos.get(repo).and_then(|r| r.uploads.get(name)) {
            Some(Upload::Writing(d)) => d.len() as u64,
            Some(Upload::Done(d)) => d.len() as u64,
            None => 0,
        }
    }

    /// Every hex the repository ever held (what `blobs/sha256/` may list).
    fn ever(&self, repo: &str) -> BTreeSet<String> {
        let r = &self.repos[repo];
        r.content.keys().chain(r.gone.keys()).cloned().collect()
    }
}

// -------------------------------------------------------------------------------- harness

#[derive(Clone, Debug)]
enum Op {
    Lookup(Vec<String>),
    Readdir(Vec<String>),
    /// Open a file for reading into the handle pool.
    Open(Vec<String>),
    /// Read from read handle `slot` (modulo the pool).
    Read {
        slot: usize,
        offset: u64,
        size: u32,
    },
    Release {
        slot: usize,
    },
    /// Open, read the whole file in pieces, release.
    Cat(Vec<String>, u32),
    Getattr {
        pick: usize,
    },
    Forget {
        pick: usize,
        n: u64,
    },
    Mkdir(Vec<String>, String),
    Rmdir(Vec<String>, String),
    Unlink(Vec<String>, String),
    Create(Vec<String>, String),
    Write {
        slot: usize,
        len: usize,
        skew: bool,
    },
    Flush {
        slot: usize,
    },
    WRelease {
        slot: usize,
    },
}

struct InoRec {
    lookups: u64,
    alive: bool,
    kind: Kind,
    /// None: size not checked on getattr (index.json).
    size: Option<u64>,
    upload: Option<(String, String)>,
    ident: Option<String>,
}

struct ReadHandle {
    fh: Fh,
    file: FileM,
}

struct WriteHandle {
    fh: Fh,
    repo: String,
    name: String,
    written: u64,
    /// Committed (by a flush after a write, or by release): later writes fail and poison.
    committed: bool,
    /// A write failed: every later write and flush fails, nothing is committed.
    poisoned: bool,
    seed: u64,
}

struct Harness<'a> {
    fs: Arc<Fs>,
    reg: Arc<FakeRegistry>,
    model: Model<'a>,
    inos: BTreeMap<Ino, InoRec>,
    by_name: HashMap<(Ino, String), Ino>,
    readers: Vec<ReadHandle>,
    writers: Vec<WriteHandle>,
    /// What the run exercised (printed at the end, to see the generator reaches things).
    counts: BTreeMap<&'static str, u64>,
}

type Check = Result<(), String>;

fn errno_name(e: i32) -> String {
    let n = match e {
        libc::ENOENT => "ENOENT",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EEXIST => "EEXIST",
        libc::EINVAL => "EINVAL",
        libc::EROFS => "EROFS",
        libc::EBUSY => "EBUSY",
        libc::EIO => "EIO",
        libc::ESTALE => "ESTALE",
        libc::EBADF => "EBADF",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

fn new_fs(reg: &Arc<FakeRegistry>) -> Arc<Fs> {
    Fs::new(
        reg.clone() as Arc<dyn Registry>,
        FsOptions {
            chunk_size: CHUNK,
            cache_size: 24 * CHUNK,
            metadata_ttl: Duration::from_secs(3600),
            upload_chunk_size: UPLOAD_CHUNK,
            ..FsOptions::default()
        },
    )
}

impl<'a> Harness<'a> {
    fn new(fx: &'a Fixture) -> Self {
        let reg = Arc::new(FakeRegistry::new());
        seed_registry(fx, &reg);
        let fs = new_fs(&reg);
        let mut inos = BTreeMap::new();
        inos.insert(
            ROOT_INO,
            InoRec {
                lookups: 1,
                alive: true,
                kind: Kind::Dir,
                size: Some(0),
                upload: None,
                ident: Some(format!("{:?}", M::Root)),
            },
        );
        Harness {
            fs,
            reg,
            model: Model::new(fx),
            inos,
            by_name: HashMap::new(),
            readers: Vec::new(),
            writers: Vec::new(),
            counts: BTreeMap::new(),
        }
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    /// Record an inode the core handed out for (parent, name); check it against what it handed
    /// out before.
    fn note_ino(&mut self, parent: Ino, name: &str, ino: Ino, m: &M, lookup: bool) -> Check {
        let ident = m.ident();
        if let Some(&prev) = self.by_name.get(&(parent, name.to_string())) {
            let rec = &self.inos[&prev];
            if rec.alive && ident.is_some() && rec.ident == ident && prev != ino {
                return Err(format!(
                    "{name} under inode {parent}: inode {ino}, but the same node had live inode {prev}"
                ));
            }
        }
        if let Some(rec) = self.inos.get(&ino) {
            if !rec.alive {
                return Err(format!("inode number {ino} reused after it was forgotten"));
            }
        }
        let (kind, size) = self.model.attr(m);
        let upload = match m {
            M::Upload { repo, name } => Some((repo.clone(), name.clone())),
            _ => None,
        };
        let size = match m {
            M::IndexJson(_) => None,
            M::File(_) if name == "index.json" => None,
            _ => Some(size),
        };
        let rec = self.inos.entry(ino).or_insert(InoRec {
            lookups: 0,
            alive: true,
            kind,
            size,
            upload: None,
            ident: None,
        });
        if lookup {
            rec.lookups += 1;
        }
        rec.kind = kind;
        rec.size = size;
        rec.upload = upload;
        rec.ident = ident;
        self.by_name.insert((parent, name.to_string()), ino);
        Ok(())
    }

    /// Walk `path` with lookups, checking every step. Ok(Some) = reached; Ok(None) = stopped by
    /// an expected error (already checked).
    async fn walk(&mut self, path: &[String]) -> Result<Option<(Ino, M)>, String> {
        let mut ino = ROOT_INO;
        let mut m = M::Root;
        for name in path {
            let want = if m.is_dir() {
                self.model.find(&m, name)
            } else {
                Err(libc::ENOTDIR)
            };
            let got = self.fs.lookup(ino, name).await;
            match (want, got) {
                (Err(w), Err(g)) if w == g.errno => return Ok(None),
                (Ok(None), Err(g)) if g.errno == libc::ENOENT => return Ok(None),
                (Ok(Some(M::File(f))), Err(g)) if f.enoent_ok && g.errno == libc::ENOENT => {
                    self.count("tolerated ENOENT");
                    return Ok(None);
                }
                (Ok(Some(next)), Ok(e)) => {
                    let (kind, size) = self.model.attr(&next);
                    if e.attr.kind != kind || e.attr.size != size {
                        return Err(format!(
                            "lookup {name}: got {:?} size {}, want {kind:?} size {size}",
                            e.attr.kind, e.attr.size
                        ));
                    }
                    self.note_ino(ino, name, e.attr.ino, &next, true)?;
                    ino = e.attr.ino;
                    m = next;
                }
                (w, g) => {
                    return Err(format!(
                        "lookup {name}: got {}, want {}",
                        match g {
                            Ok(e) => format!("Ok({:?} size {})", e.attr.kind, e.attr.size),
                            Err(e) => errno_name(e.errno),
                        },
                        match w {
                            Ok(Some(m)) => format!("Ok({m:?})"),
                            Ok(None) => "ENOENT".into(),
                            Err(e) => errno_name(e),
                        }
                    ))
                }
            }
        }
        self.count(if path.is_empty() {
            "walk to root"
        } else {
            "walk reached"
        });
        Ok(Some((ino, m)))
    }

    fn expect_err(what: &str, got: Result<(), i32>, want: Result<(), i32>) -> Check {
        if got == want {
            Ok(())
        } else {
            let s = |r: Result<(), i32>| match r {
                Ok(()) => "Ok".to_string(),
                Err(e) => errno_name(e),
            };
            Err(format!("{what}: got {}, want {}", s(got), s(want)))
        }
    }

    async fn run(&mut self, op: &Op) -> Check {
        match op {
            Op::Lookup(p) => {
                self.walk(p).await?;
                Ok(())
            }
            Op::Readdir(p) => {
                let Some((ino, m)) = self.walk(p).await? else {
                    return Ok(());
                };
                let got = self.fs.readdir(ino).await;
                if let M::BlobsAlgo(repo) = &m {
                    let got = got.map_err(|e| format!("readdir: {}", errno_name(e.errno)))?;
                    let ever = self.model.ever(repo);
                    for e in &got {
                        if !ever.contains(&e.name) || e.kind != Kind::File {
                            return Err(format!("blobs/sha256 lists {} it never held", e.name));
                        }
                    }
                    return Ok(());
                }
                let want = if m.is_dir() {
                    self.model.children(&m)
                } else {
                    Err(libc::ENOTDIR)
                };
                match (want, got) {
                    (Err(w), Err(g)) if w == g.errno => Ok(()),
                    (Ok(want), Ok(got)) => {
                        let mut gn: Vec<(String, Kind)> =
                            got.iter().map(|e| (e.name.clone(), e.kind)).collect();
                        let mut wn: Vec<(String, Kind)> = want
                            .iter()
                            .map(|(n, m)| (n.clone(), self.model.attr(m).0))
                            .collect();
                        gn.sort_by(|a, b| a.0.cmp(&b.0));
                        wn.sort_by(|a, b| a.0.cmp(&b.0));
                        if gn != wn {
                            return Err(format!("readdir: got {gn:?}, want {wn:?}"));
                        }
                        self.count("readdir ok");
                        for e in got {
                            let m = &want.iter().find(|(n, _)| *n == e.name).unwrap().1;
                            self.note_ino(ino, &e.name, e.ino, m, false)?;
                        }
                        Ok(())
                    }
                    (w, g) => Err(format!(
                        "readdir: got {}, want {}",
                        g.map(|v| format!("{} entries", v.len()))
                            .unwrap_or_else(|e| errno_name(e.errno)),
                        w.map(|v| format!("{} entries", v.len()))
                            .unwrap_or_else(errno_name)
                    )),
                }
            }
            Op::Open(p) => {
                if let Some(h) = self.open(p).await? {
                    self.readers.push(h);
                }
                Ok(())
            }
            Op::Read { slot, offset, size } => {
                if self.readers.is_empty() {
                    return Ok(());
                }
                let i = slot % self.readers.len();
                let (fh, file) = (self.readers[i].fh, self.readers[i].file.clone());
                self.read_check(fh, &file, *offset, *size).await
            }
            Op::Release { slot } => {
                if !self.readers.is_empty() {
                    let h = self.readers.remove(slot % self.readers.len());
                    self.fs.release(h.fh).await;
                }
                Ok(())
            }
            Op::Cat(p, piece) => {
                let Some(h) = self.open(p).await? else {
                    return Ok(());
                };
                let mut off = 0;
                let len = h.file.data.len() as u64;
                let mut r = Ok(());
                while r.is_ok() && off <= len {
                    r = self.read_check(h.fh, &h.file, off, *piece).await;
                    off += u64::from(*piece);
                }
                self.fs.release(h.fh).await;
                r
            }
            Op::Getattr { pick } => {
                if self.inos.is_empty() {
                    return Ok(());
                }
                let ino = *self.inos.keys().nth(pick % self.inos.len()).unwrap();
                let rec = &self.inos[&ino];
                let got = self.fs.getattr(ino).await;
                if !rec.alive {
                    self.count("getattr forgotten");
                    return match got {
                        Err(e) if e.errno == libc::ESTALE => Ok(()),
                        Err(e) => Err(format!(
                            "getattr of forgotten inode {ino}: {}",
                            errno_name(e.errno)
                        )),
                        Ok(_) => Err(format!("getattr of forgotten inode {ino} succeeded")),
                    };
                }
                if rec.size.is_none() {
                    return Ok(()); // index.json: made again from the registry.
                }
                let size = match &rec.upload {
                    Some((r, n)) => self.model.upload_size(r, n),
                    None => rec.size.unwrap(),
                };
                match got {
                    Ok(e)
                        if e.attr.kind == rec.kind && e.attr.size == size && e.attr.ino == ino =>
                    {
                        Ok(())
                    }
                    Ok(e) => Err(format!(
                        "getattr {ino}: got {:?} size {}, want {:?} size {size}",
                        e.attr.kind, e.attr.size, rec.kind
                    )),
                    Err(e) => Err(format!("getattr {ino}: {}", errno_name(e.errno))),
                }
            }
            Op::Forget { pick, n } => {
                let live: Vec<Ino> = self
                    .inos
                    .iter()
                    .filter(|(i, r)| r.alive && **i != ROOT_INO)
                    .map(|(i, _)| *i)
                    .collect();
                if live.is_empty() {
                    return Ok(());
                }
                let ino = live[pick % live.len()];
                let rec = self.inos.get_mut(&ino).unwrap();
                let n = 1 + n % rec.lookups.max(1);
                rec.lookups = rec.lookups.saturating_sub(n);
                if rec.lookups == 0 {
                    rec.alive = false;
                }
                self.fs.forget(ino, n);
                Ok(())
            }
            Op::Mkdir(p, name) => {
                let Some((ino, m)) = self.walk(p).await? else {
                    return Ok(());
                };
                let want = self.mkdir_model(&m, name);
                let got = self.fs.mkdir(ino, name).await;
                match (&want, got) {
                    (Ok(node), Ok(e)) => {
                        self.count("mkdir ok");
                        self.apply_mkdir(node);
                        let (k, s) = self.model.attr(node);
                        if e.attr.kind != k || e.attr.size != s {
                            return Err(format!("mkdir {name}: got {:?}", e.attr.kind));
                        }
                        self.note_ino(ino, name, e.attr.ino, node, true)
                    }
                    (_, g) => Self::expect_err(
                        &format!("mkdir {name}"),
                        g.map(|_| ()).map_err(|e| e.errno),
                        want.map(|_| ()),
                    ),
                }
            }
            Op::Rmdir(p, name) => {
                let Some((ino, m)) = self.walk(p).await? else {
                    return Ok(());
                };
                let want = self.rmdir_model(&m, name);
                let got = self.fs.rmdir(ino, name).await.map_err(|e| e.errno);
                if want.is_ok() {
                    self.count("rmdir ok");
                }
                Self::expect_err(&format!("rmdir {name}"), got, want)
            }
            Op::Unlink(p, name) => {
                let Some((ino, m)) = self.walk(p).await? else {
                    return Ok(());
                };
                let want = match &m {
                    M::Uploads(repo) => {
                        let r = self.model.repos.get_mut(repo).unwrap();
                        match r.uploads.get(name) {
                            Some(Upload::Done(_)) => {
                                r.uploads.remove(name);
                                Ok(())
                            }
                            Some(Upload::Writing(_)) => Err(libc::EBUSY),
                            None => Err(libc::ENOENT),
                        }
                    }
                    _ => Err(libc::EROFS),
                };
                let got = self.fs.unlink(ino, name).await.map_err(|e| e.errno);
                if want.is_ok() {
                    self.count("unlink ok");
                }
                Self::expect_err(&format!("unlink {name}"), got, want)
            }
            Op::Create(p, name) => {
                let Some((ino, m)) = self.walk(p).await? else {
                    return Ok(());
                };
                let want = match &m {
                    M::Uploads(repo) => match self.model.repos[repo].uploads.get(name) {
                        // One writer per name: the generator does not make a second one.
                        Some(Upload::Writing(_)) => return Ok(()),
                        _ => Ok(repo.clone()),
                    },
                    // Upload names are never sha256 hex.
                    M::BlobsAlgo(_) => Err(libc::EINVAL),
                    _ => Err(libc::EROFS),
                };
                let got = self.fs.create(ino, name).await;
                match (want, got) {
                    (Ok(repo), Ok((e, h))) => {
                        self.model
                            .repos
                            .get_mut(&repo)
                            .unwrap()
                            .uploads
                            .insert(name.clone(), Upload::Writing(Vec::new()));
                        let node = M::Upload {
                            repo: repo.clone(),
                            name: name.clone(),
                        };
                        if e.attr.kind != Kind::File || e.attr.size != 0 {
                            return Err(format!(
                                "create {name}: {:?} size {}",
                                e.attr.kind, e.attr.size
                            ));
                        }
                        self.note_ino(ino, name, e.attr.ino, &node, true)?;
                        self.count("create ok");
                        self.writers.push(WriteHandle {
                            fh: h.fh,
                            repo,
                            name: name.clone(),
                            written: 0,
                            committed: false,
                            poisoned: false,
                            seed: h.fh.0 * 7919 + ino.0,
                        });
                        Ok(())
                    }
                    (w, g) => Self::expect_err(
                        &format!("create {name}"),
                        g.map(|_| ()).map_err(|e| e.errno),
                        w.map(|_| ()),
                    ),
                }
            }
            Op::Write { slot, len, skew } => {
                if self.writers.is_empty() {
                    return Ok(());
                }
                let i = slot % self.writers.len();
                let w = &self.writers[i];
                let data = bytes_of(*len, w.seed + w.written);
                let offset = if *skew { w.written + 1 } else { w.written };
                let want = if w.poisoned || w.committed {
                    Err(libc::EIO)
                } else if *skew {
                    Err(libc::EINVAL)
                } else {
                    Ok(())
                };
                if want.is_err() {
                    self.poisoned(i);
                }
                let w = &self.writers[i];
                let got = self.fs.write(w.fh, offset, &data).await;
                match (&want, got) {
                    (Ok(()), Ok(n)) if n as usize == data.len() => {
                        let w = &mut self.writers[i];
                        w.written += data.len() as u64;
                        let r = self.model.repos.get_mut(&w.repo).unwrap();
                        match r.uploads.get_mut(&w.name) {
                            Some(Upload::Writing(buf)) => buf.extend_from_slice(&data),
                            other => return Err(format!("model: writing to {other:?}")),
                        }
                        Ok(())
                    }
                    (_, g) => Self::expect_err("write", g.map(|_| ()).map_err(|e| e.errno), want),
                }
            }
            Op::Flush { slot } => {
                if self.writers.is_empty() {
                    return Ok(());
                }
                let i = slot % self.writers.len();
                let got = self.fs.flush(self.writers[i].fh).await.map_err(|e| e.errno);
                let w = &self.writers[i];
                if w.poisoned {
                    return Self::expect_err("flush", got, Err(libc::EIO));
                }
                // The opener's flush commits once something was written; before, it waits.
                if w.written > 0 {
                    self.committed(i);
                }
                Self::expect_err("flush", got, Ok(()))
            }
            Op::WRelease { slot } => {
                if self.writers.is_empty() {
                    return Ok(());
                }
                let i = slot % self.writers.len();
                self.fs.release(self.writers[i].fh).await;
                self.committed(i);
                self.writers.remove(i);
                Ok(())
            }
        }
    }

    /// The model side of a failed write of writer `i`: an upload still being written disappears.
    fn poisoned(&mut self, i: usize) {
        let w = &mut self.writers[i];
        if w.poisoned {
            return;
        }
        w.poisoned = true;
        if !w.committed {
            let r = self.model.repos.get_mut(&w.repo).unwrap();
            if let Some(Upload::Writing(_)) = r.uploads.get(&w.name) {
                r.uploads.remove(&w.name);
            }
        }
    }

    /// The model side of a commit of writer `i` (once; never for a poisoned one).
    fn committed(&mut self, i: usize) {
        let w = &mut self.writers[i];
        if w.committed || w.poisoned {
            return;
        }
        w.committed = true;
        let r = self.model.repos.get_mut(&w.repo).unwrap();
        if let Some(Upload::Writing(buf)) = r.uploads.get(&w.name) {
            *self.counts.entry("commit").or_default() += 1;
            let data = Bytes::from(buf.clone());
            r.content
                .insert(digest_hex(&sha256_digest(&data)).into(), data.clone());
            r.in_registry = true;
            r.uploads.insert(w.name.clone(), Upload::Done(data));
        }
    }

    async fn open(&mut self, p: &[String]) -> Result<Option<ReadHandle>, String> {
        let Some((ino, m)) = self.walk(p).await? else {
            return Ok(None);
        };
        let want: Result<FileM, i32> = match &m {
            M::File(f) => Ok(f.clone()),
            M::Upload { repo, name } => match self.model.repos[repo].uploads.get(name) {
                Some(Upload::Done(d)) => Ok(FileM {
                    data: d.clone(),
                    enoent_ok: false,
                    by_digest: false,
                }),
                Some(Upload::Writing(_)) => Err(libc::EBUSY),
                // Forgotten by unlink: the old node is not staged any more.
                None => Err(libc::EBUSY),
            },
            M::IndexJson(r) => Ok(self.model.index_json(r)),
            _ => Err(libc::EISDIR),
        };
        let got = self.fs.open(ino, false).await;
        match (want, got) {
            (Ok(file), Ok(o)) => Ok(Some(ReadHandle { fh: o.fh, file })),
            (Ok(file), Err(e)) if file.enoent_ok && e.errno == libc::ENOENT => {
                self.count("tolerated ENOENT");
                Ok(None)
            }
            (w, g) => {
                if let Ok(o) = &g {
                    self.fs.release(o.fh).await;
                }
                Self::expect_err("open", g.map(|_| ()).map_err(|e| e.errno), w.map(|_| ()))
                    .map(|_| None)
            }
        }
    }

    async fn read_check(&mut self, fh: Fh, f: &FileM, offset: u64, size: u32) -> Check {
        let len = f.data.len() as u64;
        let (a, b) = (offset.min(len), (offset + u64::from(size)).min(len));
        let want = &f.data[a as usize..b as usize];
        match self.fs.read(fh, offset, size).await {
            Ok(got) if &got[..] == want => {
                self.count(if want.is_empty() {
                    "read empty"
                } else {
                    "read bytes"
                });
                Ok(())
            }
            Err(e) if f.enoent_ok && e.errno == libc::ENOENT => Ok(()),
            Ok(got) => Err(format!(
                "read {offset}+{size} of {f:?}: got {} bytes, want {} (bytes differ: {})",
                got.len(),
                want.len(),
                got.len() == want.len()
            )),
            Err(e) => Err(format!(
                "read {offset}+{size} of {f:?}: {}",
                errno_name(e.errno)
            )),
        }
    }

    fn mkdir_model(&self, m: &M, name: &str) -> Result<M, i32> {
        match m {
            M::Root | M::Dir(_) | M::NsEscape(_) => {
                if let M::Dir(p) = m {
                    if RESERVED.contains(&name) && self.model.is_repo(p) {
                        return Err(libc::EEXIST);
                    }
                }
                if !valid_component(name) {
                    return Err(libc::EINVAL);
                }
                let path = match m {
                    M::Root => name.to_string(),
                    M::Dir(p) | M::NsEscape(p) => join(p, name),
                    _ => unreachable!(),
                };
                // Anything lookup finds there (as a namespace or a repository) exists.
                if self.model.find(m, name)?.is_some() {
                    return Err(libc::EEXIST);
                }
                Ok(M::Dir(path))
            }
            M::Tags(repo) => {
                if !regfs::registry::is_valid_tag(name) {
                    return Err(libc::EINVAL);
                }
                let r = &self.model.repos[repo];
                if r.tags.contains_key(name) || r.pending.contains(name) {
                    return Err(libc::EEXIST);
                }
                Ok(M::Tag {
                    repo: repo.clone(),
                    tag: name.to_string(),
                    image: None,
                })
            }
            _ => Err(libc::EROFS),
        }
    }

    fn apply_mkdir(&mut self, node: &M) {
        match node {
            M::Dir(path) => {
                self.model.repos.entry(path.clone()).or_default();
            }
            M::Tag { repo, tag, .. } => {
                self.model
                    .repos
                    .get_mut(repo)
                    .unwrap()
                    .pending
                    .insert(tag.clone());
            }
            _ => unreachable!(),
        }
    }

    fn rmdir_model(&mut self, m: &M, name: &str) -> Result<(), i32> {
        let M::Tags(repo) = m else {
            return Err(libc::EROFS);
        };
        let fx = self.model.fx;
        let r = self.model.repos.get_mut(repo).unwrap();
        match r.tags.get(name).copied() {
            Some(i) => {
                if r.tags.iter().any(|(t, j)| t != name && *j == i) {
                    return Err(libc::EBUSY);
                }
                r.tags.remove(name);
                r.pending.remove(name);
                let hex = digest_hex(&fx.images[i].digest).to_string();
                if let Some(b) = r.content.remove(&hex) {
                    r.gone.insert(hex, b);
                }
                Ok(())
            }
            None if r.pending.remove(name) => Ok(()),
            None => Err(libc::ENOENT),
        }
    }

    /// End of a sequence: release every handle; no upload session stays open.
    async fn finish(&mut self) -> Check {
        while !self.writers.is_empty() {
            self.run(&Op::WRelease { slot: 0 }).await?;
        }
        while !self.readers.is_empty() {
            self.run(&Op::Release { slot: 0 }).await?;
        }
        if self.reg.open_uploads() != 0 {
            return Err(format!(
                "{} upload sessions left open",
                self.reg.open_uploads()
            ));
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------ generator

const BOGUS: &[&str] = &["nope", "Bad", "_x", "v9", "tags", "x.y", ".."];
const NEW_REPOS: &[&str] = &["gamma", "new", "tags", "sub", "Bad", "_x", "a.b", "beta"];
const NEW_TAGS: &[&str] = &["v3", "v1", "latest", "next", "bad tag", "-x", "edge"];
const RM_TAGS: &[&str] = &["v1", "v2", "latest", "1.0", "2.0", "edge", "v3", "next"];
const UPLOADS: &[&str] = &["f", "g.bin", "h"];

/// A random path through the model's current tree (each step a listed name, or now and then
/// a name that is not there).
fn random_path(rng: &mut Rng, model: &Model, max_depth: usize) -> Vec<String> {
    let mut path = Vec::new();
    let mut m = M::Root;
    for _ in 0..max_depth {
        if !path.is_empty() && rng.chance(15) {
            break;
        }
        let names: Vec<(String, M)> = match &m {
            M::BlobsAlgo(repo) => {
                let ever: Vec<String> = model.ever(repo).into_iter().collect();
                let mut v: Vec<(String, M)> = Vec::new();
                if !ever.is_empty() {
                    let hex = rng.pick(&ever).clone();
                    if let Ok(Some(n)) = model.find(&m, &hex) {
                        v.push((hex, n));
                    }
                }
                v
            }
            m if m.is_dir() => model.children(m).unwrap_or_default(),
            _ if rng.chance(85) => break,
            _ => Vec::new(),
        };
        if names.is_empty() || rng.chance(6) {
            let bogus = if matches!(m, M::BlobsAlgo(_)) && rng.chance(50) {
                "0".repeat(64)
            } else if matches!(m, M::Dir(_)) && rng.chance(30) {
                "_ns".to_string()
            } else {
                rng.pick(BOGUS).to_string()
            };
            path.push(bogus);
            break;
        }
        let (name, next) = rng.pick(&names).clone();
        path.push(name);
        m = next;
    }
    path
}

/// A path to a directory of the wanted kind, if the model has one.
fn path_to(rng: &mut Rng, model: &Model, want: fn(&M) -> bool) -> Option<Vec<String>> {
    let mut found = Vec::new();
    let mut stack = vec![(Vec::<String>::new(), M::Root)];
    while let Some((p, m)) = stack.pop() {
        if want(&m) {
            found.push(p.clone());
        }
        if p.len() < 3 && matches!(m, M::Root | M::Dir(_) | M::Tags(_)) {
            for (n, c) in model.children(&m).unwrap_or_default() {
                let mut q = p.clone();
                q.push(n);
                stack.push((q, c));
            }
        }
    }
    (!found.is_empty()).then(|| rng.pick(&found).clone())
}

fn gen_op(rng: &mut Rng, h: &Harness) -> Op {
    let model = &h.model;
    let slot = rng.below(8) as usize;
    match rng.below(100) {
        0..=14 => Op::Lookup(random_path(rng, model, 7)),
        15..=29 => Op::Readdir(random_path(rng, model, 7)),
        30..=36 => Op::Cat(
            random_path(rng, model, 8),
            *rng.pick(&[100, 512, 700, 4096]),
        ),
        37..=41 => Op::Open(random_path(rng, model, 8)),
        42..=49 => Op::Read {
            slot,
            offset: rng.below(3200),
            size: rng.below(1500) as u32,
        },
        50..=52 => Op::Release { slot },
        53..=57 => Op::Getattr {
            pick: rng.below(1000) as usize,
        },
        58..=62 => Op::Forget {
            pick: rng.below(1000) as usize,
            n: rng.below(3),
        },
        63..=67 => {
            let p = if rng.chance(50) {
                path_to(rng, model, |m| matches!(m, M::Tags(_)))
            } else {
                path_to(rng, model, |m| matches!(m, M::Root | M::Dir(_)))
            }
            .unwrap_or_default();
            let name = if p.last().is_some_and(|n| n == "tags") {
                rng.pick(NEW_TAGS)
            } else {
                rng.pick(NEW_REPOS)
            };
            if rng.chance(10) {
                return Op::Mkdir(random_path(rng, model, 5), name.to_string());
            }
            Op::Mkdir(p, name.to_string())
        }
        68..=71 => {
            let p = path_to(rng, model, |m| matches!(m, M::Tags(_))).unwrap_or_default();
            let name = if rng.chance(80) {
                rng.pick(RM_TAGS).to_string()
            } else {
                rng.pick(BOGUS).to_string()
            };
            if rng.chance(10) {
                return Op::Rmdir(random_path(rng, model, 3), name);
            }
            Op::Rmdir(p, name)
        }
        72..=75 => {
            let p = path_to(rng, model, |m| matches!(m, M::Uploads(_))).unwrap_or_default();
            let name = rng.pick(UPLOADS).to_string();
            if rng.chance(10) {
                return Op::Unlink(random_path(rng, model, 4), name);
            }
            Op::Unlink(p, name)
        }
        76..=81 => {
            let p = path_to(rng, model, |m| matches!(m, M::Uploads(_))).unwrap_or_default();
            let name = rng.pick(UPLOADS).to_string();
            if rng.chance(10) {
                return Op::Create(random_path(rng, model, 4), name);
            }
            Op::Create(p, name)
        }
        82..=92 => Op::Write {
            slot,
            len: *rng.pick(&[0, 1, 100, 1000, 1024, 2500]),
            skew: rng.chance(5),
        },
        93..=96 => Op::Flush { slot },
        _ => Op::WRelease { slot },
    }
}

// ---------------------------------------------------------------------------------- tests

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

async fn run_seed(
    fx: &Fixture,
    seed: u64,
    ops: usize,
    counts: &mut BTreeMap<&'static str, u64>,
) -> Result<usize, String> {
    let mut rng = Rng(seed);
    let mut h = Harness::new(fx);
    let mut log: Vec<Op> = Vec::new();
    for _ in 0..ops {
        let op = gen_op(&mut rng, &h);
        log.push(op.clone());
        if let Err(e) = h.run(&op).await {
            return Err(report(seed, &log, &e));
        }
    }
    if let Err(e) = h.finish().await {
        return Err(report(seed, &log, &format!("at the end: {e}")));
    }
    for (k, v) in h.counts {
        *counts.entry(k).or_default() += v;
    }
    Ok(log.len())
}

fn report(seed: u64, log: &[Op], e: &str) -> String {
    let mut s = format!(
        "seed {seed}: {e}\nreplay: MODEL_SEED={seed} cargo nextest run -E 'binary(model)'\nops:\n"
    );
    for (i, op) in log.iter().enumerate() {
        s.push_str(&format!("  {i:3}: {op:?}\n"));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sequences_match_the_model() {
    let fx = fixture();
    let ops = env_u64("MODEL_OPS").map_or(OPS, |n| n as usize);
    let seeds: Vec<u64> = match env_u64("MODEL_SEED") {
        Some(s) => vec![s],
        None => (0..env_u64("MODEL_SEEDS").unwrap_or(SEEDS)).collect(),
    };
    let mut total = 0;
    let mut counts = BTreeMap::new();
    for seed in seeds {
        match run_seed(&fx, seed, ops, &mut counts).await {
            Ok(n) => total += n,
            Err(report) => panic!("{report}"),
        }
    }
    eprintln!("model: {total} operations matched; {counts:?}");
}

// ------------------------------------------------------------------ regressions found by the model

/// Found by the model, now fixed (any seed that does `mkdir` of a repository and then looks up
/// its `index.json`, e.g. `Mkdir([], "gamma")`, `Lookup(["gamma", "index.json"])`): readdir of a
/// repository made by mkdir listed `index.json`, but lookup, getattr and open of it failed with
/// ENOENT, because the index is made from the registry's tag list and the registry does not know
/// the repository yet (`tags/` of the same repository handles that case and lists nothing).
/// `ls -l` shows the name with `?????????`. Expected: an empty OCI index, as for a repository
/// without tags.
#[tokio::test]
async fn index_json_of_a_new_repository_is_listed_but_missing() {
    let reg = Arc::new(FakeRegistry::new());
    seed_registry(&fixture(), &reg);
    let fs = new_fs(&reg);
    let repo = fs.mkdir(ROOT_INO, "gamma").await.unwrap().attr.ino;
    let names: Vec<String> = fs
        .readdir(repo)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&"index.json".to_string()), "{names:?}");
    let e = fs
        .lookup(repo, "index.json")
        .await
        .expect("a listed name can be looked up");
    let h = fs.open(e.attr.ino, false).await.unwrap();
    let body = fs.read(h.fh, 0, 4096).await.unwrap();
    fs.release(h.fh).await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["manifests"], serde_json::json!([]));
}

/// The same repository reads back as an empty index once something was pushed to it (the
/// registry knows it from then on): the model's expectation in the case the bug above does not
/// cover.
#[tokio::test]
async fn index_json_of_a_new_repository_after_an_upload_is_empty() {
    let reg = Arc::new(FakeRegistry::new());
    let fs = new_fs(&reg);
    let repo = fs.mkdir(ROOT_INO, "gamma").await.unwrap().attr.ino;
    let uploads = fs.lookup(repo, "uploads").await.unwrap().attr.ino;
    let (_, h) = fs.create(uploads, "f").await.unwrap();
    fs.write(h.fh, 0, b"hello").await.unwrap();
    fs.flush(h.fh).await.unwrap();
    fs.release(h.fh).await;
    let e = fs.lookup(repo, "index.json").await.unwrap();
    let h = fs.open(e.attr.ino, false).await.unwrap();
    let body = fs.read(h.fh, 0, 4096).await.unwrap();
    fs.release(h.fh).await;
    assert_eq!(body.len() as u64, e.attr.size);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["manifests"], serde_json::json!([]));
}
