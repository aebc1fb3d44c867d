//! The command line: clap's definitions of every flag, grouped under help headings.
//!
//! Flags arrive here as strings exactly as typed; [`crate::config`] parses and validates them
//! (`Config::try_from(cli)`). The defaults below are spelled as the user would type them; the
//! `DEFAULT_*` constants in `config` say why each value was chosen, and a unit test there checks
//! that the two agree.

use std::path::PathBuf;

use clap::Parser;

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
    /// Cache unit (64KiB to 64MiB): a cold random read fetches one chunk; sequential readers
    /// fetch many chunks per Range request.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "1MiB",
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
    /// Directory where layer indexes (tar entries, gzip checkpoints), blob blocks, verified chunk
    /// maps and whole blobs persist across mounts, keyed by digest (created if missing; one mount
    /// per directory; default: everything lives in memory only).
    #[arg(long, value_name = "DIR", help_heading = "Cache")]
    pub cache_dir: Option<PathBuf>,
    /// Byte cap of the blob data kept in --cache-dir (least recently used goes first), e.g.
    /// 8GiB, 300MiB; 0 keeps only layer indexes there.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "8GiB",
        help_heading = "Cache"
    )]
    pub cache_dir_size: String,
    /// PATCH size when pushing (64KiB to 1GiB); raised to the registry's OCI-Chunk-Min-Length.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "8MiB",
        help_heading = "Push"
    )]
    pub upload_chunk_size: String,
    /// Largest readahead window of one sequential reader: it starts at one chunk and doubles
    /// while the reader goes forward, up to this (0 disables readahead). Random readers never
    /// trigger it.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "32MiB",
        help_heading = "Cache"
    )]
    pub readahead: String,

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
    /// How long one operation may keep retrying a flaky registry (connect errors, resets,
    /// timeouts, 5xx, 429) before it fails, e.g. 30s; 0 = no retries.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "30s",
        help_heading = "Connection"
    )]
    pub retry_budget: String,
    /// A pull-through cache registry (http(s)://host[:port], or host[:port] as for REGISTRY) to
    /// read blobs and manifests by digest from, before the registry; repeat for several, tried
    /// in order. A failing mirror is passed over for the next, then the registry itself. Each
    /// mirror gets only its own credentials (looked up by its host).
    #[arg(long, value_name = "URL", help_heading = "Connection")]
    pub mirror: Vec<String>,
    /// Resolve tags (tag lists, manifests by tag) at the mirrors too. Default: tags always
    /// resolve at the registry, so a mirror's stale copy of a moved tag is never seen.
    #[arg(long, help_heading = "Connection")]
    pub mirror_tags: bool,
    /// How a tag is resolved: get (one GET by tag brings the manifest and its digest), head
    /// (HEAD first; the manifest is fetched by digest when needed), or auto: get, except head on
    /// Docker Hub, where every manifest GET counts against the pull rate limit.
    #[arg(
        long,
        value_name = "MODE",
        default_value = "auto",
        value_parser = ["auto", "head", "get"],
        help_heading = "Connection"
    )]
    pub tag_resolution: String,
}

/// This machine's platform in OCI terms: the default for `--platform`, because the image that
/// shows at the tag level is most often the one this machine could run.
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
