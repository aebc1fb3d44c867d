//! Test harness for the real tier: a real `docker-registry` (CNCF distribution 2.8) on 127.0.0.1 with
//! a free port, its own config and storage in a fresh temp dir; image builders; and a real regfs
//! mount of it, unmounted on drop. Nothing here uses a fixed port or a fixed path.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use regfs::digest::sha256_digest;
use regfs::registry::auth::Credentials;
use regfs::registry::http::{HttpOptions, HttpRegistry};
use regfs::registry::Registry;

/// How the test registry authenticates.
#[derive(Clone, Debug)]
pub enum Auth {
    None,
    /// htpasswd with one user.
    Basic {
        user: String,
        password: String,
    },
    /// distribution's `silly` mode: a Bearer challenge pointing at `realm`, any token accepted.
    Silly {
        realm: String,
    },
}

/// A running `docker-registry` child process.
pub struct TestRegistry {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
    pub auth: Auth,
}

impl TestRegistry {
    pub fn start() -> Self {
        Self::start_with(Auth::None, "")
    }

    /// Start with an auth mode and extra top-level YAML.
    pub fn start_with(auth: Auth, extra_yaml: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let auth_yaml = match &auth {
            Auth::None => String::new(),
            Auth::Basic { user, password } => {
                let hash = bcrypt::hash(password, 4).unwrap();
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
                    htpasswd.display()
                )
            }
            Auth::Silly { realm } => {
                format!("auth:\n  silly:\n    realm: {realm}\n    service: test-registry\n")
            }
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:0\n  secret: regfs-test-secret\n{auth_yaml}{extra_yaml}",
            data.display()
        );
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, config).unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker-registry must be installed (apt-get install docker-registry)");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(i) = line.find("listening on 127.0.0.1:") {
                        let rest = &line[i + "listening on 127.0.0.1:".len()..];
                        let port: String =
                            rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                        let _ = tx.send(port.parse::<u16>().unwrap());
                        sent = true;
                    }
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("docker-registry did not report its port");
        TestRegistry {
            dir,
            port,
            child,
            auth,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The registry's on-disk file for a blob (filesystem storage driver layout).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.data_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// A client of regfs's own, for seeding.
    pub fn client(&self) -> HttpRegistry {
        let credentials = match &self.auth {
            Auth::Basic { user, password } => Some(Credentials {
                username: user.clone(),
                password: password.clone(),
            }),
            _ => None,
        };
        HttpRegistry::new(HttpOptions {
            base: reqwest::Url::parse(&self.url()).unwrap(),
            credentials,
            ca_cert_pem: None,
            insecure: false,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
        })
        .unwrap()
    }

    /// Stop the registry (by its PID only).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tokio runtime for seeding from sync tests.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tar archive holding `files` (path, contents).
pub fn make_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// A layer to push: its bytes and media type, plus its uncompressed tar for diff_ids.
pub struct Layer {
    pub data: Vec<u8>,
    pub media_type: &'static str,
    pub diff_id: String,
}

impl Layer {
    pub fn gzip(tar: &[u8]) -> Self {
        Layer {
            data: gzip(tar),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            diff_id: sha256_digest(tar),
        }
    }
    pub fn zstd(tar: &[u8]) -> Self {
        Layer {
            data: zstd(tar),
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd",
            diff_id: sha256_digest(tar),
        }
    }
    pub fn tar(tar: &[u8]) -> Self {
        Layer {
            data: tar.to_vec(),
            media_type: "application/vnd.oci.image.layer.v1.tar",
            diff_id: sha256_digest(tar),
        }
    }
    /// An opaque blob layer with an arbitrary media type.
    pub fn raw(data: Vec<u8>, media_type: &'static str) -> Self {
        Layer {
            diff_id: sha256_digest(&data),
            data,
            media_type,
        }
    }
}

/// What a pushed image is made of, for assertions.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub layers: Vec<(String, u64, String)>, // digest, size, media type
}

/// Push an image (config + layers + manifest) under `tag` (or by digest only when None).
pub async fn push_image(
    reg: &dyn Registry,
    repo: &str,
    tag: Option<&str>,
    arch: &str,
    layers: &[Layer],
) -> Pushed {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    }))
    .unwrap();
    let config_digest = reg
        .push_blob(repo, Bytes::from(config.clone()))
        .await
        .unwrap();
    let mut descs = Vec::new();
    let mut out_layers = Vec::new();
    for l in layers {
        let d = reg
            .push_blob(repo, Bytes::from(l.data.clone()))
            .await
            .unwrap();
        descs.push(
            serde_json::json!({"mediaType": l.media_type, "digest": d, "size": l.data.len()}),
        );
        out_layers.push((d, l.data.len() as u64, l.media_type.to_string()));
    }
    let manifest = serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let reference = tag
        .map(str::to_string)
        .unwrap_or_else(|| sha256_digest(&manifest));
    let manifest_digest = reg
        .put_manifest(
            repo,
            &reference,
            "application/vnd.oci.image.manifest.v1+json",
            Bytes::from(manifest.clone()),
        )
        .await
        .unwrap();
    Pushed {
        manifest,
        manifest_digest,
        config,
        config_digest,
        layers: out_layers,
    }
}

/// Push an index of `children` (platform string "os/arch[/variant]", image) under `tag`.
pub async fn push_index(
    reg: &dyn Registry,
    repo: &str,
    tag: &str,
    children: &[(&str, &Pushed)],
) -> (Vec<u8>, String) {
    let manifests: Vec<_> = children
        .iter()
        .map(|(plat, p)| {
            let parts: Vec<&str> = plat.split('/').collect();
            let mut platform = serde_json::json!({"os": parts[0], "architecture": parts[1]});
            if parts.len() > 2 {
                platform["variant"] = parts[2].into();
            }
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": p.manifest_digest,
                "size": p.manifest.len(),
                "platform": platform,
            })
        })
        .collect();
    let body = serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))
    .unwrap();
    let d = reg
        .put_manifest(
            repo,
            tag,
            "application/vnd.oci.image.index.v1+json",
            Bytes::from(body.clone()),
        )
        .await
        .unwrap();
    (body, d)
}

/// A live regfs mount of a registry, in the foreground as a child process. Unmounted on drop.
pub struct TestMount {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub log: PathBuf,
}

pub fn regfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_regfs")
}

/// Is `path` a mount point right now (per /proc/self/mountinfo)?
pub fn is_mounted(path: &Path) -> bool {
    let p = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*p))
}

impl TestMount {
    /// Mount `registry` with extra flags; stderr goes to a log file in the temp dir.
    pub fn new(registry: &str, args: &[&str]) -> Self {
        Self::with_env(registry, args, &[])
    }

    pub fn with_env(registry: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let log = dir.path().join("regfs.log");
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(regfs_bin());
        cmd.arg("-f")
            .arg(registry)
            .arg(&mnt)
            .args(args)
            .env("RUST_LOG", "regfs=debug")
            // Keep the developer's own credential files out of the tests.
            .env("HOME", dir.path())
            .env_remove("DOCKER_CONFIG")
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("DOCKER_AUTH_CONFIG")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("XDG_CONFIG_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&mnt) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "regfs exited with {status} before mounting:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "regfs did not mount in time");
            std::thread::sleep(Duration::from_millis(20));
        }
        TestMount {
            dir,
            child: Some(child),
            log,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.path().join(rel)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The request counters, read through the root's `user.regfs.stats` xattr.
    pub fn stats(&self) -> serde_json::Value {
        let v = xattr(&self.path(), "user.regfs.stats").expect("stats xattr");
        serde_json::from_slice(&v).unwrap()
    }

    pub fn stat(&self, key: &str) -> u64 {
        self.stats()[key].as_u64().unwrap()
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let mnt = self.path();
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&mnt)
            .stderr(Stdio::null())
            .status();
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    let _ = Command::new("fusermount3").arg("-uz").arg(&mnt).status();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Read an extended attribute with getxattr(2).
pub fn xattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// Names in a directory, sorted.
pub fn ls(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(path)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", path.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The errno of an io::Error.
pub fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

pub fn sha256_file(path: &Path) -> String {
    sha256_digest(&std::fs::read(path).unwrap())
}

/// Shared seeded registry for tests that only read.
pub struct Seeded {
    pub reg: TestRegistry,
    pub min: Pushed,
    pub arm: Pushed,
    pub amd: Pushed,
    pub index_digest: String,
}

/// A registry with debian/min:bookworm (gzip, tar and zstd layers) and multi/arch:latest (an index).
pub fn seeded() -> Seeded {
    let reg = TestRegistry::start();
    let client = Arc::new(reg.client());
    let rt = rt();
    let (min, amd, arm, index_digest) = rt.block_on(async {
        let t1 = make_tar(&[
            ("etc/os-release", b"PRETTY_NAME=\"regfs test\"\n"),
            ("bin/sh", &pseudo_random(300_000, 1)),
        ]);
        let t2 = make_tar(&[("usr/share/doc/readme", b"hello\n")]);
        let t3 = make_tar(&[("opt/data.bin", &pseudo_random(200_000, 2))]);
        let min = push_image(
            client.as_ref(),
            "debian/min",
            Some("bookworm"),
            "amd64",
            &[Layer::gzip(&t1), Layer::tar(&t2), Layer::zstd(&t3)],
        )
        .await;
        let amd = push_image(
            client.as_ref(),
            "multi/arch",
            None,
            "amd64",
            &[Layer::gzip(&t2)],
        )
        .await;
        let arm = push_image(
            client.as_ref(),
            "multi/arch",
            None,
            "arm64",
            &[Layer::gzip(&t3)],
        )
        .await;
        let (_, idx) = push_index(
            client.as_ref(),
            "multi/arch",
            "latest",
            &[("linux/amd64", &amd), ("linux/arm64/v8", &arm)],
        )
        .await;
        (min, amd, arm, idx)
    });
    Seeded {
        reg,
        min,
        arm,
        amd,
        index_digest,
    }
}
