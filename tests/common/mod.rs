//! Test harness for the real tier: a real `docker-registry` (CNCF distribution 2.8) on 127.0.0.1 with
//! a free port, its own config and storage in a fresh temp dir; image builders; and a real regfs
//! mount of it, unmounted on drop. Nothing here uses a fixed port or a fixed path.

#![allow(dead_code)]

mod core;
#[allow(unused_imports)]
pub use core::*;
mod delay_proxy;
#[allow(unused_imports)]
pub use delay_proxy::*;
mod gate;
#[allow(unused_imports)]
pub use gate::*;
mod images;
pub use images::*;
mod dated;
#[allow(unused_imports)]
pub use dated::*;
mod proxy;
#[allow(unused_imports)]
pub use proxy::*;
mod storage;
#[allow(unused_imports)]
pub use storage::*;
mod stub;
#[allow(unused_imports)]
pub use stub::*;
mod script;
#[allow(unused_imports)]
pub use script::*;
mod system;
#[allow(unused_imports)]
pub use system::*;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use regfs::digest::sha256_digest;
use regfs::registry::auth::Credentials;
use regfs::registry::http::{HttpOptions, HttpRegistry};

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
    /// The self-signed certificate (PEM) when serving https.
    pub tls_cert: Option<Vec<u8>>,
}

/// Start `docker-registry serve CONFIG`; returns the child and the port it listens on.
fn spawn_registry(cfg_path: &Path) -> (Child, u16) {
    let mut child = Command::new("docker-registry")
        .arg("serve")
        .arg(cfg_path)
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
                    let port: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                    let _ = tx.send(port.parse::<u16>().unwrap());
                    sent = true;
                }
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("docker-registry did not report its port");
    (child, port)
}

impl TestRegistry {
    pub fn start() -> Self {
        Self::start_with(Auth::None, "")
    }

    /// Start with an auth mode and extra top-level YAML.
    pub fn start_with(auth: Auth, extra_yaml: &str) -> Self {
        Self::start_full(auth, extra_yaml, false)
    }

    /// Serve https with a fresh self-signed certificate for 127.0.0.1 (made with openssl).
    pub fn start_tls() -> Self {
        Self::start_full(Auth::None, "", true)
    }

    fn start_full(auth: Auth, extra_yaml: &str, tls: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut http_tls, mut tls_cert) = (String::new(), None);
        if tls {
            let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            let st = Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=127.0.0.1",
                ])
                .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .output()
                .expect("openssl must be installed");
            assert!(
                st.status.success(),
                "openssl: {}",
                String::from_utf8_lossy(&st.stderr)
            );
            http_tls = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
            tls_cert = Some(std::fs::read(&cert).unwrap());
        }
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
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:0\n  secret: regfs-test-secret\n{http_tls}{auth_yaml}{extra_yaml}",
            data.display()
        );
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, config).unwrap();
        let (child, port) = spawn_registry(&cfg_path);
        TestRegistry {
            dir,
            port,
            child,
            auth,
            tls_cert,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
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
            ca_cert_pem: self.tls_cert.clone(),
            insecure: false,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            redirect_ttl: regfs::registry::http::REDIRECT_TTL,
        })
        .unwrap()
    }

    /// Stop the registry (by its PID only).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start again on the same storage (on a new port).
    pub fn restart(&mut self) {
        self.stop();
        let (child, port) = spawn_registry(&self.dir.path().join("config.yml"));
        self.child = child;
        self.port = port;
    }

    /// `curl` a registry path; returns (HTTP status, body).
    pub fn curl(&self, method: &str, path: &str) -> (u16, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let body = dir.path().join("body");
        // curl -X HEAD would wait for a body: HEAD is -I.
        let method_args: Vec<&str> = if method == "HEAD" {
            vec!["-I"]
        } else {
            vec!["-X", method]
        };
        let out = Command::new("curl")
            .arg("-s")
            .args(&method_args)
            .arg("-o")
            .arg(&body)
            .args(["-w", "%{http_code}"])
            .args(["-H", "Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json"])
            .args(["--max-time", "30"])
            .arg(format!("{}{path}", self.url()))
            .output()
            .expect("curl");
        let code = String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0);
        (code, std::fs::read(&body).unwrap_or_default())
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
            // Nor a developer's proxy: the registries are on loopback (a test sets its own).
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
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

    /// The control file `.regfs/stats`, as JSON.
    pub fn control_stats(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.p(".regfs/stats")).unwrap()).unwrap()
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

/// The regular files in a directory, sorted (in `layers/`: the layer files, not their trees).
pub fn ls_files(path: &Path) -> Vec<String> {
    ls(path)
        .into_iter()
        .filter(|n| std::fs::symlink_metadata(path.join(n)).is_ok_and(|m| m.is_file()))
        .collect()
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
