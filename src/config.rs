//! Configuration as data: [`Config::try_from`] parses and validates the flags of a [`Cli`] into a
//! typed config with one part per component (connection, mount, cache, push). Validation lives
//! here and nowhere else. Each default has its reason next to it, and docs/CONFIGURATION.md
//! mirrors this file.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;

use crate::cli::Cli;

/// Chunk cache size. 256 MiB holds the full readahead windows of several sequential readers
/// (32 MiB each) plus the blocks random readers touch, small enough for a laptop.
pub const DEFAULT_CACHE_SIZE: u64 = 256 << 20;
/// The cache unit (a "chunk" or block). 1 MiB: a cold random 4 KiB read fetches one 1 MiB
/// request (a few ms on a LAN, one RTT plus ~13 ms at 80 MiB/s across a WAN), and the cache
/// holds 1024 entries per GiB. Request size is separate: sequential readers ask for many chunks
/// at once (up to [`MAX_REQUEST`]).
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// The largest single Range request of a sequential reader. 8 MiB: at 50 ms RTT a connection
/// with a 4 MiB window moves ~80 MiB/s, so one request is ~150 ms of work and a 32 MiB window
/// keeps four connections busy; a request lost to a reset costs little to redo.
pub const MAX_REQUEST: u64 = 8 << 20;
/// The largest single Range request to a near registry (blob answers within [`NEAR_LATENCY`]):
/// 32 MiB, a whole default readahead window in one request. Near, parallel requests gain
/// nothing (one connection moves more than a reader uses), while each request costs the
/// registry: distribution's filesystem driver spends about 4 ms of CPU per request, and on
/// loopback 32 MiB requests cut its CPU per GiB read from 1.5 s to 0.95–1.2 s and raised a cold
/// sequential read from 540 to 575–726 MiB/s (a 2-core machine serving both).
pub const MAX_REQUEST_NEAR: u64 = 32 << 20;
/// A registry whose blob GETs are answered (headers) within this, at least lately, is near
/// ([`MAX_REQUEST_NEAR`]). 10 ms: loopback and a LAN answer in well under 1 ms plus the
/// registry's own work, which is 4 to 10 ms of CPU per request for distribution and waits for
/// a core when the machine is busy (a cold read on this 2-core machine, registry, regfs and
/// `cat` all busy: least 2 ms, median 13 ms; with 5 ms, 4 in 10 windows of 16 requests had none
/// within it, and the read fell back to far requests, 126 instead of 65 per GiB, which cost the
/// registry more CPU still). A registry across a WAN, or a cloud registry's blob redirect,
/// takes 20 ms and more. Near means quick to answer, not fast to stream: a LAN pull-through
/// cache answers at once but streams a blob it does not hold at its upstream's speed, through
/// one request instead of four (a request still moves at least 32 MiB per `--request-timeout`
/// before it is cut and resumed). An estimate ages out after a minute without blob GETs.
pub const NEAR_LATENCY: Duration = Duration::from_millis(10);
/// `--cache-dir-size`: byte cap of the blob blocks kept in `--cache-dir`. 8 GiB keeps the layers
/// of several ordinary images (most are 0.1 to 2 GiB compressed) or one large ML image across
/// mounts, while staying a small share of a developer's disk; eviction is LRU, so a smaller disk
/// just means more refetching. 0 keeps only layer indexes there.
pub const DEFAULT_CACHE_DIR_SIZE: u64 = 8 << 30;
/// How long tag and catalog listings (and a tag's current target) are trusted. Short, because tags
/// move; content addressed by digest is cached regardless of this.
pub const DEFAULT_METADATA_TTL: Duration = Duration::from_secs(30);
/// `--walk-ahead`: repositories listed ahead of a walk over `tags/` directories in catalog order.
/// At 50 ms per round trip, each repository costs three dependent round trips (its tag list, its
/// tags' manifests, their configs for the directories' times) and a shell spends milliseconds on
/// one already listed, so a walk waits on the registry unless several repositories are under
/// way. Up to 8 ahead (`fs::walk`: 4 at first, doubling as the walk uses them) keeps ahead of a
/// shell loop after its first two repositories (the bench's 10 × 4 tags at 50 ms: 1.8 to 1.9 s
/// without, 0.8 s with), while a walk that stops at once has cost 4 repositories' listings.
pub const DEFAULT_WALK_AHEAD: usize = 8;
/// At most this many repositories ahead (a listing resolves every tag of each).
pub const MAX_WALK_AHEAD: usize = 64;
/// How long one HTTP request may take, so a dead registry becomes EIO instead of a hang.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// PATCH size of uploads. 8 MiB: above the 5 MiB minimum part size of S3-backed registries (ECR),
/// 128 requests per GiB, and a memory bound of about 16 MiB per upload (one chunk filling, one in
/// flight).
pub const DEFAULT_UPLOAD_CHUNK_SIZE: u64 = 8 << 20;
/// Uncompressed bytes between gzip checkpoints. 4 MiB: a read deep in a gzip layer inflates at
/// most 4 MiB it does not need, and the index costs 32 KiB per 4 MiB (under 1% of the layer).
pub const DEFAULT_CHECKPOINT_SPACING: u64 = 4 << 20;
/// The largest readahead window of one sequential reader. 32 MiB is the bandwidth-delay product
/// of ~640 MiB/s at 50 ms RTT (so a far registry streams at link speed over several parallel
/// requests) and an eighth of the default cache, where prefetched chunks are counted.
pub const DEFAULT_READAHEAD: u64 = 32 << 20;
/// `--retry-budget`: defined with its reason next to the client that spends it (the registry
/// module may not depend on this one).
pub use crate::registry::http::DEFAULT_RETRY_BUDGET;
/// `--redirect-ttl`: defined with its reason next to the table that keeps the targets.
pub use crate::registry::http::REDIRECT_TTL;
/// How long connecting to the registry may take (capped by the request timeout). 10 s is far
/// beyond any healthy connect, even across continents, yet a wrong address fails quickly.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// (os, architecture, variant), as in `linux/arm64/v8`.
pub type Platform = (String, String, Option<String>);

/// Validated configuration, one part per component.
#[derive(Debug, Clone)]
pub struct Config {
    pub connection: ConnectionConfig,
    pub mount: MountConfig,
    pub cache: CacheConfig,
    pub push: PushConfig,
    /// The platform whose config.json, layers/ and rootfs/ show at the tag level of an index.
    pub platform: Platform,
}

/// How to reach the registry and prove who we are.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// `http(s)://host[:port]/`, where the API answers.
    pub base_url: Url,
    /// `host[:port]`, the key for credential lookups (`index.docker.io` for Docker Hub).
    pub host: String,
    pub credentials: CredentialsSource,
    /// Extra PEM root certificate to trust.
    pub ca_cert: Option<PathBuf>,
    /// Skip TLS certificate verification.
    pub insecure: bool,
    /// Limit for one HTTP request.
    pub request_timeout: Duration,
    /// How long one operation may keep retrying (`--retry-budget`).
    pub retry_budget: Duration,
    /// How long a blob's redirect target is reused (`--redirect-ttl`).
    pub redirect_ttl: Duration,
    /// Pull-through mirrors, tried in order before the registry: (base URL, `host[:port]` for
    /// their own credential lookup).
    pub mirrors: Vec<(Url, String)>,
    /// Tags resolve at the mirrors too (`--mirror-tags`).
    pub mirror_tags: bool,
    /// How tags are resolved (`--tag-resolution`; see [`crate::registry::TagResolution`]).
    pub tag_resolution: crate::registry::TagResolution,
}

impl ConnectionConfig {
    /// Limit for connecting: [`CONNECT_TIMEOUT`], but never more than a whole request may take.
    pub fn connect_timeout(&self) -> Duration {
        CONNECT_TIMEOUT.min(self.request_timeout)
    }
}

/// Where the credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialsSource {
    /// `--username`: the password comes from REGFS_PASSWORD, else from stdin.
    Username(String),
    /// docker's config.json (and helpers), else containers' auth.json, looked up by host.
    ConfigFiles,
}

/// Where and how to mount, and how the process runs.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub mountpoint: PathBuf,
    /// Stay attached instead of daemonizing.
    pub foreground: bool,
    /// Where the daemon logs (default: discarded).
    pub log_file: Option<PathBuf>,
    /// The source name shown in /proc/mounts: the REGISTRY argument as given (an fstab line's
    /// source, so mount(8) and findmnt match the two), unless `-o fsname=` says otherwise.
    pub fsname: String,
    /// `-o allow_other`: every user may use the mount.
    pub allow_other: bool,
    /// `-o allow_root`: root may use the mount too.
    pub allow_root: bool,
    /// `-o default_permissions`: the kernel checks modes.
    pub default_permissions: bool,
    /// `-o auto_unmount`: unmount when the process dies.
    pub auto_unmount: bool,
    /// `-o ro`: mount read-only (the kernel answers EROFS to every write).
    pub read_only: bool,
    /// `-o noexec`: no file of the mount may be executed.
    pub noexec: bool,
    /// `-o nonempty`: mount over a non-empty directory or an existing mount.
    pub nonempty: bool,
}

/// The chunk cache, readahead, layer indexes and metadata TTLs.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Byte cap of the in-memory chunk cache.
    pub cache_size: u64,
    /// Size of one Range request and one cache entry.
    pub chunk_size: u64,
    /// Chunks fetched ahead of a sequential reader.
    /// Largest readahead window of one reader, in bytes (0: none).
    pub readahead: u64,
    /// Uncompressed bytes between gzip checkpoints.
    pub checkpoint_spacing: u64,
    /// Where layer indexes, blob blocks, chunk maps and whole blobs persist across mounts.
    pub cache_dir: Option<PathBuf>,
    /// Byte cap of the blob blocks and whole blobs in `cache_dir` (0: none kept).
    pub cache_dir_size: u64,
    /// How long tag and catalog listings are trusted.
    pub metadata_ttl: Duration,
    /// Repositories listed ahead of a walk over `tags/` directories (0: none).
    pub walk_ahead: usize,
}

/// Uploads.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// PATCH size (raised to the registry's OCI-Chunk-Min-Length).
    pub upload_chunk_size: u64,
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
    // A password in the URL is refused, and the message never repeats it (nor the user name).
    let shown = match reg.rsplit_once('@') {
        Some((_, host)) => format!("<credentials>@{host}"),
        None => reg.to_string(),
    };
    let url = Url::parse(&with_scheme).map_err(|e| format!("bad registry {shown:?}: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "registry {shown:?}: credentials in the URL are refused (they would show in process \
             lists and logs); use --username with REGFS_PASSWORD, or docker login"
        ));
    }
    let reg = shown.as_str();
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

fn parse_platform(p: &str) -> Result<Platform, String> {
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

/// Check that a size lies in `range`, naming the flag and the limits otherwise.
fn size_in(
    flag: &str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
    limits: &str,
) -> Result<u64, String> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(format!("{flag} must be between {limits}"))
    }
}

fn parse_flag<T>(flag: &str, v: &str, parse: fn(&str) -> Result<T, String>) -> Result<T, String> {
    parse(v).map_err(|e| format!("{flag}: {e}"))
}

impl TryFrom<Cli> for Config {
    type Error = String;

    fn try_from(cli: Cli) -> Result<Self, String> {
        let (base_url, host) = registry_url(&cli.registry)?;
        let cache_size = parse_flag("--cache-size", &cli.cache_size, parse_size)?;
        let chunk_size = parse_flag("--chunk-size", &cli.chunk_size, parse_size)?;
        let chunk_size = size_in(
            "--chunk-size",
            chunk_size,
            64 << 10..=64 << 20,
            "64KiB and 64MiB",
        )?;
        if cache_size < chunk_size {
            return Err("--cache-size must hold at least one chunk".into());
        }
        let readahead = parse_flag("--readahead", &cli.readahead, parse_size)?;
        let readahead = size_in("--readahead", readahead, 0..=1 << 30, "0 and 1GiB")?;
        let cache_dir_size = parse_flag("--cache-dir-size", &cli.cache_dir_size, parse_size)?;
        let upload_chunk_size =
            parse_flag("--upload-chunk-size", &cli.upload_chunk_size, parse_size)?;
        let upload_chunk_size = size_in(
            "--upload-chunk-size",
            upload_chunk_size,
            64 << 10..=1 << 30,
            "64KiB and 1GiB",
        )?;
        let checkpoint_spacing =
            parse_flag("--checkpoint-spacing", &cli.checkpoint_spacing, parse_size)?;
        let checkpoint_spacing = size_in(
            "--checkpoint-spacing",
            checkpoint_spacing,
            64 << 10..=1 << 30,
            "64KiB and 1GiB",
        )?;
        let metadata_ttl = parse_flag("--metadata-ttl", &cli.metadata_ttl, parse_duration)?;
        let walk_ahead = parse_flag("--walk-ahead", &cli.walk_ahead, |s| {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= MAX_WALK_AHEAD)
                .ok_or_else(|| {
                    format!("{s:?} is not a number of repositories from 0 to {MAX_WALK_AHEAD}")
                })
        })?;
        let request_timeout =
            parse_flag("--request-timeout", &cli.request_timeout, parse_duration)?;
        if request_timeout.is_zero() {
            return Err("--request-timeout must be more than 0".into());
        }
        let retry_budget = parse_flag("--retry-budget", &cli.retry_budget, parse_duration)?;
        let redirect_ttl = parse_flag("--redirect-ttl", &cli.redirect_ttl, parse_duration)?;
        let platform = parse_platform(&cli.platform)?;
        let mount = mount_config(&cli)?;
        let mirrors = cli
            .mirror
            .iter()
            .map(|m| registry_url(m).map_err(|e| format!("--mirror: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            connection: ConnectionConfig {
                base_url,
                host,
                credentials: match cli.username {
                    Some(u) => CredentialsSource::Username(u),
                    None => CredentialsSource::ConfigFiles,
                },
                ca_cert: cli.ca_cert,
                insecure: cli.insecure,
                request_timeout,
                retry_budget,
                redirect_ttl,
                mirrors,
                mirror_tags: cli.mirror_tags,
                tag_resolution: parse_flag("--tag-resolution", &cli.tag_resolution, |s| s.parse())?,
            },
            mount,
            cache: CacheConfig {
                cache_size,
                chunk_size,
                readahead,
                checkpoint_spacing,
                cache_dir: cli.cache_dir,
                cache_dir_size,
                metadata_ttl,
                walk_ahead,
            },
            push: PushConfig { upload_chunk_size },
            platform,
        })
    }
}

/// A duration as a flag would take it: `30s`, `250ms`.
fn show_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl Config {
    /// The effective configuration as JSON, for `.regfs/config`. No secrets: credentials show
    /// only where they come from (a user name, or the config files), never a password or token.
    pub fn public_json(&self) -> serde_json::Value {
        let c = &self.connection;
        let (os, arch, variant) = &self.platform;
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        serde_json::json!({
            "registry": c.base_url.as_str(),
            "credentials": match &c.credentials {
                CredentialsSource::Username(u) => format!("--username {u}"),
                CredentialsSource::ConfigFiles => "config files".to_string(),
            },
            "mirrors": c.mirrors.iter().map(|(u, _)| u.as_str()).collect::<Vec<_>>(),
            "mirror_tags": c.mirror_tags,
            "ca_cert": path(&c.ca_cert),
            "insecure": c.insecure,
            "request_timeout": show_duration(c.request_timeout),
            "retry_budget": show_duration(c.retry_budget),
            "redirect_ttl": show_duration(c.redirect_ttl),
            "tag_resolution": match c.tag_resolution {
                crate::registry::TagResolution::Auto => "auto",
                crate::registry::TagResolution::Head => "head",
                crate::registry::TagResolution::Get => "get",
            },
            "mountpoint": self.mount.mountpoint.display().to_string(),
            "fsname": self.mount.fsname,
            "allow_other": self.mount.allow_other,
            "allow_root": self.mount.allow_root,
            "default_permissions": self.mount.default_permissions,
            "auto_unmount": self.mount.auto_unmount,
            "cache_size": self.cache.cache_size,
            "chunk_size": self.cache.chunk_size,
            "readahead": self.cache.readahead,
            "checkpoint_spacing": self.cache.checkpoint_spacing,
            "cache_dir": path(&self.cache.cache_dir),
            "cache_dir_size": self.cache.cache_dir_size,
            "metadata_ttl": show_duration(self.cache.metadata_ttl),
            // In effect: without a metadata TTL no catalog is cached to walk.
            "walk_ahead": if self.cache.metadata_ttl.is_zero() {
                0
            } else {
                self.cache.walk_ahead
            },
            "upload_chunk_size": self.push.upload_chunk_size,
            "platform": match variant {
                Some(v) => format!("{os}/{arch}/{v}"),
                None => format!("{os}/{arch}"),
            },
        })
    }
}

/// The mount part: the mountpoint, the process mode and the `-o` mount options (the `-o` items
/// that name flags became flags before clap parsed: [`crate::mount_options`]).
fn mount_config(cli: &Cli) -> Result<MountConfig, String> {
    use crate::mount_options::{parse_mount_option, split_items, MountOpt};
    let mut m = MountConfig {
        mountpoint: cli.mountpoint.clone(),
        foreground: cli.foreground,
        log_file: cli.log_file.clone(),
        fsname: default_fsname(&cli.registry),
        allow_other: false,
        allow_root: false,
        default_permissions: false,
        auto_unmount: false,
        read_only: false,
        noexec: false,
        nonempty: false,
    };
    for opt in cli.options.iter().flat_map(|o| split_items(o)) {
        match parse_mount_option(opt)? {
            MountOpt::AllowOther => m.allow_other = true,
            MountOpt::AllowRoot => m.allow_root = true,
            MountOpt::DefaultPermissions => m.default_permissions = true,
            MountOpt::AutoUnmount => m.auto_unmount = true,
            MountOpt::FsName(name) => m.fsname = name,
            MountOpt::ReadOnly(ro) => m.read_only = ro,
            MountOpt::NoExec(noexec) => m.noexec = noexec,
            MountOpt::NonEmpty => m.nonempty = true,
            MountOpt::Ignored(_) => {}
        }
    }
    Ok(m)
}

/// The REGISTRY argument as the mount's source name, with the characters the kernel's option
/// string cannot carry (commas, whitespace) replaced.
fn default_fsname(registry: &str) -> String {
    registry
        .trim()
        .chars()
        .map(|c| {
            if c == ',' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
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
        for with_pw in [
            "https://u:hunter2@reg.example",
            "u:hunter2@reg.example:5000",
        ] {
            let e = registry_url(with_pw).unwrap_err();
            assert!(e.contains("refused") && !e.contains("hunter2"), "{e}");
        }
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

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut v = vec!["regfs"];
        v.extend_from_slice(args);
        Config::try_from(Cli::try_parse_args(v).unwrap())
    }

    #[test]
    fn cli_validation() {
        let c = parse(&["localhost:5000", "/mnt", "-o", "allow_other,fsname=x"]).unwrap();
        assert!(c.mount.allow_other);
        assert_eq!(c.mount.fsname, "x");
        assert_eq!(c.cache.chunk_size, DEFAULT_CHUNK_SIZE);
        assert_eq!(c.cache.cache_size, DEFAULT_CACHE_SIZE);
        assert_eq!(c.cache.metadata_ttl, DEFAULT_METADATA_TTL);
        assert_eq!(c.connection.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(c.connection.retry_budget, DEFAULT_RETRY_BUDGET);
        let c = parse(&["localhost:5000", "/mnt", "--retry-budget", "0"]).unwrap();
        assert!(c.connection.retry_budget.is_zero());
        assert!(parse(&["localhost", "/mnt", "--retry-budget", "soon"]).is_err());
        assert_eq!(c.connection.redirect_ttl, REDIRECT_TTL);
        let c = parse(&["localhost:5000", "/mnt", "--redirect-ttl", "0"]).unwrap();
        assert!(c.connection.redirect_ttl.is_zero());
        assert!(parse(&["localhost", "/mnt", "--redirect-ttl", "a minute"]).is_err());
        assert_eq!(c.cache.walk_ahead, DEFAULT_WALK_AHEAD);
        let c = parse(&["localhost:5000", "/mnt", "-o", "walk_ahead=0"]).unwrap();
        assert_eq!(c.cache.walk_ahead, 0);
        assert_eq!(crate::fs::FsOptions::from_config(&c).walk_ahead, 0);
        assert_eq!(c.public_json()["walk_ahead"], 0);
        let c = parse(&["localhost:5000", "/mnt", "--metadata-ttl", "0"]).unwrap();
        assert_eq!(c.public_json()["walk_ahead"], 0, "the value in effect");
        let c = parse(&["localhost:5000", "/mnt", "--walk-ahead", "64"]).unwrap();
        assert_eq!(c.cache.walk_ahead, MAX_WALK_AHEAD);
        for bad in ["65", "1.5", "many"] {
            let e = parse(&["localhost", "/mnt", "--walk-ahead", bad]).unwrap_err();
            assert!(e.starts_with("--walk-ahead: "), "{e}");
        }
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

    /// The defaults clap shows in --help are the `DEFAULT_*` constants whose comments explain them.
    #[test]
    fn cli_defaults_are_the_documented_constants() {
        let c = parse(&["ghcr.io", "/mnt"]).unwrap();
        assert_eq!(c.cache.cache_size, DEFAULT_CACHE_SIZE);
        assert_eq!(c.cache.chunk_size, DEFAULT_CHUNK_SIZE);
        assert_eq!(c.cache.metadata_ttl, DEFAULT_METADATA_TTL);
        assert_eq!(c.cache.readahead, DEFAULT_READAHEAD);
        assert_eq!(c.cache.checkpoint_spacing, DEFAULT_CHECKPOINT_SPACING);
        assert_eq!(c.cache.cache_dir, None);
        assert_eq!(c.cache.cache_dir_size, DEFAULT_CACHE_DIR_SIZE);
        assert_eq!(c.push.upload_chunk_size, DEFAULT_UPLOAD_CHUNK_SIZE);
        assert_eq!(c.connection.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(c.connection.connect_timeout(), CONNECT_TIMEOUT);
        assert_eq!(c.connection.retry_budget, DEFAULT_RETRY_BUDGET);
        assert_eq!(c.connection.credentials, CredentialsSource::ConfigFiles);
        assert!(!c.connection.insecure);
        assert_eq!(c.mount.fsname, "ghcr.io");
        assert!(!c.mount.foreground);
        assert!(!(c.mount.allow_other || c.mount.allow_root));
        assert!(!(c.mount.default_permissions || c.mount.auto_unmount));
        assert!(!(c.mount.read_only || c.mount.noexec || c.mount.nonempty));
        let p = crate::cli::default_platform();
        assert_eq!(parse_platform(&p).unwrap(), c.platform);
    }

    #[test]
    fn every_flag_lands_in_its_component() {
        let c = parse(&[
            "https://reg.example:8443",
            "/mnt/x",
            "-f",
            "-o",
            "allow_root,nosuid",
            "-o",
            "default_permissions,auto_unmount,nodev",
            "--log-file",
            "/tmp/l",
            "--cache-size",
            "1G",
            "--chunk-size",
            "64KiB",
            "--metadata-ttl",
            "0",
            "--readahead",
            "0",
            "--checkpoint-spacing",
            "1GiB",
            "--cache-dir",
            "/tmp/c",
            "--cache-dir-size",
            "300MiB",
            "--upload-chunk-size",
            "64k",
            "--ca-cert",
            "/tmp/ca.pem",
            "--insecure",
            "--username",
            "me",
            "--request-timeout",
            "5s",
        ])
        .unwrap();
        assert_eq!(c.connection.base_url.as_str(), "https://reg.example:8443/");
        assert_eq!(c.connection.host, "reg.example:8443");
        assert_eq!(
            c.connection.credentials,
            CredentialsSource::Username("me".into())
        );
        assert_eq!(c.connection.ca_cert, Some(PathBuf::from("/tmp/ca.pem")));
        assert!(c.connection.insecure);
        assert_eq!(c.connection.request_timeout, Duration::from_secs(5));
        // The connect limit never exceeds the whole request's.
        assert_eq!(c.connection.connect_timeout(), Duration::from_secs(5));
        assert_eq!(c.mount.mountpoint, PathBuf::from("/mnt/x"));
        assert!(c.mount.foreground);
        assert_eq!(c.mount.log_file, Some(PathBuf::from("/tmp/l")));
        assert_eq!(c.mount.fsname, "https://reg.example:8443");
        assert!(!c.mount.allow_other);
        assert!(c.mount.allow_root && c.mount.default_permissions && c.mount.auto_unmount);
        assert_eq!(c.cache.cache_size, 1 << 30);
        assert_eq!(c.cache.chunk_size, 64 << 10);
        assert_eq!(c.cache.metadata_ttl, Duration::ZERO);
        assert_eq!(c.cache.readahead, 0);
        assert_eq!(c.cache.checkpoint_spacing, 1 << 30);
        assert_eq!(c.cache.cache_dir, Some(PathBuf::from("/tmp/c")));
        assert_eq!(c.cache.cache_dir_size, 300 << 20);
        assert_eq!(c.push.upload_chunk_size, 64 << 10);

        let o = crate::fs::FsOptions::from_config(&c);
        assert_eq!(
            (o.cache_size, o.chunk_size, o.readahead),
            (1 << 30, 64 << 10, 0)
        );
        assert_eq!(o.metadata_ttl, Duration::ZERO);
        assert_eq!(
            (o.checkpoint_spacing, o.upload_chunk_size),
            (1 << 30, 64 << 10)
        );
        assert_eq!(o.cache_dir, Some(PathBuf::from("/tmp/c")));
        assert_eq!(o.platform, c.platform);
    }

    /// What mount(8) hands regfs for an fstab line (mount.fuse3 adds `dev,suid` and `rw`).
    #[test]
    fn fstab_options_land_in_the_config() {
        let c = parse(&[
            "localhost:5000",
            "/mnt/reg",
            "-o",
            "rw,_netdev,nofail,x-systemd.automount,cache_size=512MiB,metadata_ttl=10s,dev,suid",
        ])
        .unwrap();
        assert_eq!(c.cache.cache_size, 512 << 20);
        assert_eq!(c.cache.metadata_ttl, Duration::from_secs(10));
        assert!(!(c.mount.read_only || c.mount.noexec || c.mount.nonempty));
        assert_eq!(c.mount.fsname, "localhost:5000");
        let c = parse(&[
            "r:1",
            "/m",
            "-o",
            "ro,noexec,nonempty,allow-other",
            "-o",
            "rw",
        ])
        .unwrap();
        assert!(!c.mount.read_only, "the last of ro/rw wins");
        assert!(c.mount.noexec && c.mount.nonempty && c.mount.allow_other);
        assert!(parse(&["r:1", "/m", "-o", "ro"]).unwrap().mount.read_only);
        assert!(parse(&["r:1", "/m", "-o", "chunk_size=1k"])
            .unwrap_err()
            .starts_with("--chunk-size"));
        assert_eq!(default_fsname(" a,b c "), "a_b_c");
    }

    #[test]
    fn mirrors_parse_in_order_and_the_shown_config_has_no_secret() {
        let c = parse(&[
            "localhost:5000",
            "/mnt",
            "--mirror",
            "mirror.example:5000",
            "--mirror",
            "http://127.0.0.2:6000",
            "--mirror-tags",
            "--username",
            "me",
        ])
        .unwrap();
        let m: Vec<_> = c
            .connection
            .mirrors
            .iter()
            .map(|(u, h)| (u.as_str(), h.as_str()))
            .collect();
        assert_eq!(
            m,
            [
                ("https://mirror.example:5000/", "mirror.example:5000"),
                ("http://127.0.0.2:6000/", "127.0.0.2:6000")
            ]
        );
        assert!(c.connection.mirror_tags);
        let e = parse(&["localhost", "/mnt", "--mirror", "https://u:pw@m.example"]).unwrap_err();
        assert!(e.starts_with("--mirror: ") && !e.contains("pw"), "{e}");
        let j = c.public_json();
        assert_eq!(j["mirrors"][1], "http://127.0.0.2:6000/");
        assert_eq!(j["credentials"], "--username me");
        assert_eq!(j["metadata_ttl"], "30s");
        assert_eq!(j["chunk_size"], DEFAULT_CHUNK_SIZE);
        assert!(
            !parse(&["localhost", "/mnt"])
                .unwrap()
                .connection
                .mirror_tags
        );
    }

    #[test]
    fn out_of_range_values_name_their_flag() {
        let err = |args: &[&str]| {
            let mut v = vec!["localhost", "/mnt"];
            v.extend_from_slice(args);
            parse(&v).unwrap_err()
        };
        assert_eq!(
            err(&["--chunk-size", "128MiB"]),
            "--chunk-size must be between 64KiB and 64MiB"
        );
        assert_eq!(
            err(&["--upload-chunk-size", "2G"]),
            "--upload-chunk-size must be between 64KiB and 1GiB"
        );
        assert_eq!(
            err(&["--checkpoint-spacing", "4k"]),
            "--checkpoint-spacing must be between 64KiB and 1GiB"
        );
        assert_eq!(
            err(&["--request-timeout", "0"]),
            "--request-timeout must be more than 0"
        );
        assert!(err(&["--cache-size", "lots"]).starts_with("--cache-size: "));
        assert!(err(&["--cache-dir-size", "lots"]).starts_with("--cache-dir-size: "));
        assert!(err(&["--metadata-ttl", "1d"]).starts_with("--metadata-ttl: "));
        assert_eq!(err(&["-o", "bogus"]), "unknown mount option -o bogus");
        assert!(err(&["--platform", "linux"]).starts_with("bad --platform"));
        assert!(parse(&["localhost/v2", "/mnt"]).is_err());
    }
}
