//! Command line and configuration. clap parses [`Cli`]; [`Config::try_from`] validates it into the
//! plain [`Config`] the rest of the program uses. Each default has its reason next to it, and
//! docs/CONFIGURATION.md mirrors this file.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use reqwest::Url;

/// Chunk cache size. 256 MiB holds 64 default chunks: enough for several sequential readers plus
/// their readahead, small enough for a laptop.
pub const DEFAULT_CACHE_SIZE: u64 = 256 << 20;
/// Range request size. 4 MiB keeps a cold 4 KiB read cheap (one request of 4 MiB, a few ms on a
/// LAN) while a sequential `cat` needs only 256 requests per GiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// How long tag and catalog listings (and a tag's current target) are trusted. Short, because tags
/// move; content addressed by digest is cached regardless of this.
pub const DEFAULT_METADATA_TTL: Duration = Duration::from_secs(30);
/// How long one HTTP request may take, so a dead registry becomes EIO instead of a hang.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// PATCH size of uploads. 8 MiB: above the 5 MiB minimum part size of S3-backed registries (ECR),
/// 128 requests per GiB, and a memory bound of about 16 MiB per upload (one chunk filling, one in
/// flight).
pub const DEFAULT_UPLOAD_CHUNK_SIZE: u64 = 8 << 20;
/// Uncompressed bytes between gzip checkpoints. 4 MiB: a read deep in a gzip layer inflates at
/// most 4 MiB it does not need, and the index costs 32 KiB per 4 MiB (under 1% of the layer).
pub const DEFAULT_CHECKPOINT_SPACING: u64 = 4 << 20;
/// Chunks fetched ahead of a sequential reader. Two keeps the network busy while the reader
/// consumes one chunk; a random reader never triggers it.
pub const DEFAULT_READAHEAD_CHUNKS: u64 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "regfs",
    version,
    about = "Mount an OCI/Docker container registry (Distribution API v2) as a lazy, writable directory tree",
    long_about = "Mount an OCI/Docker container registry (Distribution API v2) as a directory.\n\n\
        Repositories are directories; tags/<tag>/ holds manifest.json, config.json and layers/; \
        blobs/sha256/<hex> reads any blob by digest. Nothing is downloaded until it is read: reads \
        become HTTP Range requests into a bounded in-memory chunk cache, and content is verified \
        against its digest. Pushing is copying: cp FILE <repo>/uploads/, \
        mkdir <repo>/tags/<tag> and cp a manifest to <repo>/tags/<tag>/manifest.json.\n\n\
        Examples:\n  regfs localhost:5000 /mnt/reg\n  regfs -f --username me ghcr.io /mnt/ghcr\n  \
        fusermount3 -u /mnt/reg\n\n\
        Credentials: --username (password from REGFS_PASSWORD or stdin), else docker's config.json \
        (DOCKER_CONFIG, credHelpers, credsStore), else REGISTRY_AUTH_FILE / containers auth.json.\n\
        Logging: RUST_LOG=regfs=debug (default: warnings and errors)."
)]
pub struct Cli {
    /// Registry: host[:port] or http(s)://host[:port]. A bare host uses https, except loopback
    /// (localhost, 127.0.0.0/8, ::1), which uses http.
    pub registry: String,
    /// Directory to mount on.
    pub mountpoint: PathBuf,

    /// Stay in the foreground (default: return once the mount is live). SIGINT/SIGTERM unmount.
    #[arg(short, long, help_heading = "Mount")]
    pub foreground: bool,
    /// Mount options, comma separated: allow_other, allow_root, default_permissions,
    /// auto_unmount, fsname=NAME. allow_other is opt-in (and needs user_allow_other in
    /// /etc/fuse.conf for non-root users).
    #[arg(short = 'o', value_name = "OPTS", help_heading = "Mount")]
    pub options: Vec<String>,
    /// Platform whose config.json, layers/ and rootfs/ show at the tag level of a multi-arch
    /// image, as os/arch[/variant].
    #[arg(long, value_name = "OS/ARCH", help_heading = "Mount", default_value_t = default_platform())]
    pub platform: String,
    /// Where the background daemon writes its log (default: discarded). Foreground logs go to stderr.
    #[arg(long, value_name = "FILE", help_heading = "Mount")]
    pub log_file: Option<PathBuf>,

    /// In-memory chunk cache size, e.g. 256MiB, 1G, 1048576.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "256MiB",
        help_heading = "Cache"
    )]
    pub cache_size: String,
    /// Size of one Range request / cache chunk (64KiB to 64MiB).
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "4MiB",
        help_heading = "Cache"
    )]
    pub chunk_size: String,
    /// How long tag and catalog listings are cached, e.g. 30s, 5m, 0 (always ask).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "30s",
        help_heading = "Cache"
    )]
    pub metadata_ttl: String,
    /// Uncompressed bytes between checkpoints of a gzip layer's index (reads inflate from the
    /// nearest one); 64KiB to 1GiB.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "4MiB",
        help_heading = "Cache"
    )]
    pub checkpoint_spacing: String,
    /// Directory where layer indexes (tar entries, gzip checkpoints) persist across mounts,
    /// keyed by layer digest (created if missing; default: indexes live in memory only).
    #[arg(long, value_name = "DIR", help_heading = "Cache")]
    pub cache_dir: Option<PathBuf>,
    /// PATCH size when pushing (64KiB to 1GiB); raised to the registry's OCI-Chunk-Min-Length.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "8MiB",
        help_heading = "Push"
    )]
    pub upload_chunk_size: String,
    /// Chunks to prefetch ahead of a sequential reader (0 disables readahead).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_READAHEAD_CHUNKS, help_heading = "Cache")]
    pub readahead_chunks: u64,

    /// Extra CA certificate (PEM) to trust for the registry.
    #[arg(long, value_name = "FILE", help_heading = "Connection")]
    pub ca_cert: Option<PathBuf>,
    /// Do not verify the registry's TLS certificate.
    #[arg(long, help_heading = "Connection")]
    pub insecure: bool,
    /// Username; the password is read from REGFS_PASSWORD, else from stdin.
    #[arg(long, value_name = "USER", help_heading = "Connection")]
    pub username: Option<String>,
    /// Timeout for one HTTP request, e.g. 60s.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "60s",
        help_heading = "Connection"
    )]
    pub request_timeout: String,
}

/// This machine's platform in OCI terms.
pub fn default_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("linux/{arch}")
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub base_url: Url,
    /// `host[:port]`, the key for credential lookups.
    pub host: String,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub allow_other: bool,
    pub allow_root: bool,
    pub default_permissions: bool,
    pub auto_unmount: bool,
    pub fsname: String,
    pub platform: (String, String, Option<String>),
    pub log_file: Option<PathBuf>,
    pub cache_size: u64,
    pub chunk_size: u64,
    pub metadata_ttl: Duration,
    pub readahead_chunks: u64,
    pub upload_chunk_size: u64,
    pub checkpoint_spacing: u64,
    pub cache_dir: Option<PathBuf>,
    pub ca_cert: Option<PathBuf>,
    pub insecure: bool,
    pub username: Option<String>,
    pub request_timeout: Duration,
}

/// Parse `512MiB`, `4M`, `1G`, `65536`, `64k` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "bad size unit in {s:?} (use K, M, G, KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} too large"))
}

/// Parse `30s`, `5m`, `1h`, `250ms`, `0`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s, m, h)")),
    })
}

/// Turn the REGISTRY argument into a base URL. Loopback hosts default to http, others to https.
pub fn registry_url(reg: &str) -> Result<(Url, String), String> {
    let with_scheme = if reg.starts_with("http://") || reg.starts_with("https://") {
        reg.to_string()
    } else {
        let host = reg.split('/').next().unwrap_or(reg);
        let hostname = if let Some(rest) = host.strip_prefix('[') {
            rest.split(']').next().unwrap_or("")
        } else {
            host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
        };
        let loopback = crate::registry::http::is_loopback_host(hostname);
        format!("{}://{reg}", if loopback { "http" } else { "https" })
    };
    let url = Url::parse(&with_scheme).map_err(|e| format!("bad registry {reg:?}: {e}"))?;
    if url.path() != "/" && !url.path().is_empty() {
        return Err(format!(
            "registry {reg:?} must not have a path (give host[:port])"
        ));
    }
    let host = url
        .host_str()
        .ok_or_else(|| format!("registry {reg:?} has no host"))?;
    let host = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let mut base = url.clone();
    base.set_path("/");
    base.set_query(None);
    // Docker Hub answers the API on registry-1.docker.io; its credentials are stored under
    // index.docker.io (`https://index.docker.io/v1/`).
    if matches!(
        host.as_str(),
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    ) {
        base = Url::parse("https://registry-1.docker.io/").expect("valid URL");
        return Ok((base, "index.docker.io".to_string()));
    }
    Ok((base, host))
}

fn parse_platform(p: &str) -> Result<(String, String, Option<String>), String> {
    let parts: Vec<&str> = p.split('/').collect();
    match parts.as_slice() {
        [os, arch] if !os.is_empty() && !arch.is_empty() => {
            Ok((os.to_string(), arch.to_string(), None))
        }
        [os, arch, var] if !os.is_empty() && !arch.is_empty() => {
            Ok((os.to_string(), arch.to_string(), Some(var.to_string())))
        }
        _ => Err(format!("bad --platform {p:?} (use os/arch[/variant])")),
    }
}

impl TryFrom<Cli> for Config {
    type Error = String;

    fn try_from(cli: Cli) -> Result<Self, String> {
        let (base_url, host) = registry_url(&cli.registry)?;
        let cache_size = parse_size(&cli.cache_size).map_err(|e| format!("--cache-size: {e}"))?;
        let chunk_size = parse_size(&cli.chunk_size).map_err(|e| format!("--chunk-size: {e}"))?;
        if !(64 << 10..=64 << 20).contains(&chunk_size) {
            return Err("--chunk-size must be between 64KiB and 64MiB".into());
        }
        if cache_size < chunk_size {
            return Err("--cache-size must hold at least one chunk".into());
        }
        let upload_chunk_size =
            parse_size(&cli.upload_chunk_size).map_err(|e| format!("--upload-chunk-size: {e}"))?;
        if !(64 << 10..=1 << 30).contains(&upload_chunk_size) {
            return Err("--upload-chunk-size must be between 64KiB and 1GiB".into());
        }
        let checkpoint_spacing = parse_size(&cli.checkpoint_spacing)
            .map_err(|e| format!("--checkpoint-spacing: {e}"))?;
        if !(64 << 10..=1 << 30).contains(&checkpoint_spacing) {
            return Err("--checkpoint-spacing must be between 64KiB and 1GiB".into());
        }
        let metadata_ttl =
            parse_duration(&cli.metadata_ttl).map_err(|e| format!("--metadata-ttl: {e}"))?;
        let request_timeout =
            parse_duration(&cli.request_timeout).map_err(|e| format!("--request-timeout: {e}"))?;
        if request_timeout.is_zero() {
            return Err("--request-timeout must be more than 0".into());
        }
        let mut cfg = Config {
            base_url,
            fsname: format!("regfs:{host}"),
            host,
            mountpoint: cli.mountpoint,
            foreground: cli.foreground,
            allow_other: false,
            allow_root: false,
            default_permissions: false,
            auto_unmount: false,
            platform: parse_platform(&cli.platform)?,
            log_file: cli.log_file,
            cache_size,
            chunk_size,
            metadata_ttl,
            readahead_chunks: cli.readahead_chunks,
            upload_chunk_size,
            checkpoint_spacing,
            cache_dir: cli.cache_dir,
            ca_cert: cli.ca_cert,
            insecure: cli.insecure,
            username: cli.username,
            request_timeout,
        };
        for opt in cli.options.iter().flat_map(|o| o.split(',')) {
            match opt.trim() {
                "" => {}
                "allow_other" => cfg.allow_other = true,
                "allow_root" => cfg.allow_root = true,
                "default_permissions" => cfg.default_permissions = true,
                "auto_unmount" => cfg.auto_unmount = true,
                // Always nosuid/nodev; accept the user saying so.
                "nosuid" | "nodev" => {}
                o if o.starts_with("fsname=") => cfg.fsname = o["fsname=".len()..].to_string(),
                o => return Err(format!("unknown mount option -o {o}")),
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4M").unwrap(), 4 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert!(parse_size("12x").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("1d").is_err());
    }

    #[test]
    fn registry_urls() {
        let u = |s| registry_url(s).unwrap();
        assert_eq!(u("localhost:5000").0.as_str(), "http://localhost:5000/");
        assert_eq!(u("127.0.0.1:5000").0.as_str(), "http://127.0.0.1:5000/");
        assert_eq!(u("[::1]:5000").0.as_str(), "http://[::1]:5000/");
        assert_eq!(u("ghcr.io").0.as_str(), "https://ghcr.io/");
        assert_eq!(u("ghcr.io").1, "ghcr.io");
        assert_eq!(u("reg.example:443").0.as_str(), "https://reg.example/");
        assert_eq!(u("http://reg.example:8080").1, "reg.example:8080");
        assert!(registry_url("https://x/v2/foo").is_err());
        for hub in [
            "docker.io",
            "index.docker.io",
            "https://registry-1.docker.io",
        ] {
            let (url, key) = registry_url(hub).unwrap();
            assert_eq!(url.as_str(), "https://registry-1.docker.io/");
            assert_eq!(key, "index.docker.io");
        }
    }

    #[test]
    fn cli_validation() {
        let parse = |args: &[&str]| {
            let mut v = vec!["regfs"];
            v.extend_from_slice(args);
            Config::try_from(Cli::try_parse_from(v).unwrap())
        };
        let c = parse(&["localhost:5000", "/mnt", "-o", "allow_other,fsname=x"]).unwrap();
        assert!(c.allow_other);
        assert_eq!(c.fsname, "x");
        assert_eq!(c.chunk_size, DEFAULT_CHUNK_SIZE);
        assert_eq!(c.cache_size, DEFAULT_CACHE_SIZE);
        assert_eq!(c.metadata_ttl, DEFAULT_METADATA_TTL);
        assert_eq!(c.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert!(parse(&["localhost", "/mnt", "-o", "bogus"]).is_err());
        assert!(parse(&["localhost", "/mnt", "--chunk-size", "1k"]).is_err());
        assert!(parse(&[
            "localhost",
            "/mnt",
            "--cache-size",
            "1M",
            "--chunk-size",
            "4M"
        ])
        .is_err());
        assert_eq!(
            parse(&["localhost", "/mnt", "--platform", "linux/arm64/v8"])
                .unwrap()
                .platform
                .2
                .as_deref(),
            Some("v8")
        );
    }
}
