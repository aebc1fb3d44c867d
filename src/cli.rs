//! The command line: clap's definitions of every flag, grouped under help headings, and what is
//! generated from them (regfs(1), shell completions, the `-o` form of every flag).
//!
//! Flags arrive here as strings exactly as typed; [`crate::config`] parses and validates them
//! (`Config::try_from(cli)`). The defaults below are spelled as the user would type them; the
//! `DEFAULT_*` constants in `config` say why each value was chosen, and a unit test there checks
//! that the two agree. [`Cli::invocation`] is the entry point: it turns `-o name=value` items into
//! long flags ([`crate::mount_options::expand_args`]) before clap parses.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "regfs",
    version,
    long_version = long_version(),
    // The same flag twice (an fstab line plus `mount -o`): the last one wins, as in mount(8).
    args_override_self = true,
    about = "Mount an OCI/Docker container registry (Distribution API v2) as a lazy, writable directory tree",
    long_about = "Mount an OCI/Docker container registry (Distribution API v2) as a directory.\n\n\
        Repositories are directories; tags/<tag>/ holds manifest.json, config.json and layers/; \
        blobs/sha256/<hex> reads any blob by digest. Nothing is downloaded until it is read: reads \
        become HTTP Range requests into a bounded in-memory chunk cache, and content is verified \
        against its digest. Pushing is copying: cp FILE <repo>/uploads/, \
        mkdir <repo>/tags/<tag> and cp a manifest to <repo>/tags/<tag>/manifest.json.\n\n\
        Examples:\n  regfs localhost:5000 /mnt/reg\n  regfs -f --username me ghcr.io /mnt/ghcr\n  \
        mount -t fuse.regfs localhost:5000 /mnt/reg -o cache_size=512MiB,metadata_ttl=10s\n  \
        fusermount3 -u /mnt/reg    (or umount /mnt/reg as root)\n\n\
        Credentials: --username (password from REGFS_PASSWORD or stdin), else docker's config.json \
        (DOCKER_CONFIG, credHelpers, credsStore), else REGISTRY_AUTH_FILE / containers auth.json.\n\
        Logging: RUST_LOG=regfs=debug (default: warnings and errors).",
    after_long_help = MOUNT_HELP,
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
    /// auto_unmount, fsname=NAME, ro, noexec, nonempty; and every long flag as name=value (a
    /// switch as name), e.g. -o cache_size=512MiB,insecure. mount(8) and systemd options
    /// (_netdev, nofail, x-systemd.*...) are ignored. allow_other is opt-in (and needs
    /// user_allow_other in /etc/fuse.conf for non-root users).
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
    /// When tags/ of one repository after another is listed in catalog order (`ls */tags/*/`,
    /// a shell loop, find), list up to N of the next repositories' tags/ ahead so the walk finds
    /// them ready (4 at first, doubling as the walk uses them); 0 turns it off (so does
    /// --metadata-ttl 0). Each costs at most what listing its tags/ costs.
    #[arg(long, value_name = "N", default_value = "8", help_heading = "Cache")]
    pub walk_ahead: String,
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
    /// Timeout for one HTTP request, e.g. 60s. An upload (PATCH, PUT) also gets its bytes' time
    /// at 64 KiB/s; a blob read cut by it resumes where it stopped.
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
    /// How long a blob's storage link is reused: registries such as Docker Hub, GHCR and ECR
    /// redirect each blob GET to storage or a CDN; regfs sends that blob's next Range requests
    /// straight to the link (without credentials) for this long, saving a round trip each, and
    /// asks the registry again when it expires or fails. 0 = ask the registry every time.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "60s",
        help_heading = "Connection"
    )]
    pub redirect_ttl: String,
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

    /// Print regfs(1) or a shell completion script to stdout (used by scripts/install.sh).
    #[arg(long, value_name = "WHAT", hide = true, exclusive = true)]
    pub generate: Option<Artifact>,
}

/// What `--generate` prints.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Artifact {
    /// The man page, regfs(1), in roff.
    Man,
    Bash,
    Zsh,
    Fish,
}

/// What a command line asks for.
#[derive(Debug)]
pub enum Invocation {
    /// Mount (the usual case).
    Mount(Box<Cli>),
    /// Print a generated file (`--generate`), with no mount.
    Generate(Artifact),
}

/// The end of `--help`, and the MOUNT OPTIONS section of regfs(1): lines indented by two spaces
/// are paragraphs, by four are examples.
const MOUNT_HELP: &str = "Mount options and fstab:
  Every long flag above is also an -o option, with dashes or underscores: -o cache_size=512MiB,insecure. When a flag comes twice, the last one wins.
  mount(8) runs regfs through mount.fuse3 (package fuse3) with the options of its command line or of /etc/fstab, so regfs must be on root's PATH (scripts/install.sh puts it in /usr/local/bin):
    mount -t fuse.regfs localhost:5000 /mnt/reg -o cache_size=512MiB,metadata_ttl=10s
    localhost:5000  /mnt/reg  fuse.regfs  _netdev,nofail,cache_size=512MiB  0 0
    umount /mnt/reg
  _netdev, nofail, noauto, auto, user, users, defaults, x-systemd.*, comment=, dev, suid and the atime options are accepted and ignored; regfs always mounts nosuid,nodev. ro mounts read-only (writes fail with EROFS); noexec forbids running its files.
  A mountpoint that is not empty, or already a mount, is refused unless -o nonempty is given.
  systemd: an fstab line becomes a .mount unit; add x-systemd.automount to mount on first access. docs/SYSTEMD.md shows .mount and .automount units.";

/// [`MOUNT_HELP`] as a roff section.
fn mount_help_roff() -> String {
    let mut out = String::new();
    let mut lines = MOUNT_HELP.lines();
    if let Some(title) = lines.next() {
        out.push_str(&format!(
            ".SH \"{}\"\n",
            title.trim_end_matches(':').to_uppercase()
        ));
    }
    let mut in_example = false;
    for line in lines {
        let example = line.starts_with("    ");
        match (example, in_example) {
            (true, false) => out.push_str(".PP\n.nf\n"),
            (false, true) => out.push_str(".fi\n"),
            _ => {}
        }
        if !example {
            out.push_str(".PP\n");
        }
        in_example = example;
        // roff: a backslash is \e, a dash \-; a line must not start with a control character.
        let text = line.trim().replace('\\', "\\e").replace('-', "\\-");
        out.push_str("\\&");
        out.push_str(&text);
        out.push('\n');
    }
    if in_example {
        out.push_str(".fi\n");
    }
    out
}

impl Cli {
    /// Parse a command line (the program name first). `-o` items that name a long flag become
    /// that flag first. Errors are clap's (exit status 2 with `e.exit()`).
    pub fn invocation<I, T>(args: I) -> Result<Invocation, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let mut cmd = Cli::command();
        let args = args.into_iter().map(Into::into).collect();
        let args = crate::mount_options::expand_args(&cmd, args)
            .map_err(|e| cmd.error(clap::error::ErrorKind::ValueValidation, e))?;
        let matches = cmd.try_get_matches_from_mut(args)?;
        if let Some(what) = matches.get_one::<Artifact>("generate") {
            return Ok(Invocation::Generate(*what));
        }
        let cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))?;
        Ok(Invocation::Mount(Box::new(cli)))
    }

    /// [`Cli::invocation`] for a mount; `--generate` is an error here.
    pub fn try_parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        match Cli::invocation(args)? {
            Invocation::Mount(cli) => Ok(*cli),
            Invocation::Generate(_) => Err(Cli::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                "--generate does not mount",
            )),
        }
    }
}

/// Write regfs(1) or a completion script, generated from the clap definitions.
pub fn generate(what: Artifact, out: &mut dyn Write) -> std::io::Result<()> {
    use clap_complete::Shell;
    let mut cmd = Cli::command();
    let shell = match what {
        Artifact::Man => return man_page(cmd, out),
        Artifact::Bash => Shell::Bash,
        Artifact::Zsh => Shell::Zsh,
        Artifact::Fish => Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "regfs", out);
    Ok(())
}

/// regfs(1): clap_mangen's sections, with MOUNT OPTIONS AND FSTAB instead of clap's EXTRA, and
/// the plain version (the long one describes the machine that generated the page).
fn man_page(cmd: clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    let cmd = cmd
        .long_version(None::<&'static str>)
        .after_long_help(None::<&'static str>);
    let man = clap_mangen::Man::new(cmd);
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    out.write_all(mount_help_roff().as_bytes())?;
    man.render_version_section(out)
}

/// The first Linux release with FUSE passthrough (FOPEN_PASSTHROUGH, backing files).
const PASSTHROUGH_SINCE: (u32, u32) = (6, 9);

/// `--version`: the version, then what this build and this machine offer.
fn long_version() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        let passthrough = match kernel_release() {
            Some(rel) => {
                let has = parse_release(&rel).is_some_and(|v| v >= PASSTHROUGH_SINCE);
                let (major, minor) = PASSTHROUGH_SINCE;
                let verdict = if has { "available" } else { "not available" };
                format!("{verdict} on this kernel ({rel}; needs Linux {major}.{minor} or later)")
            }
            None => "unknown (uname failed)".into(),
        };
        format!(
            "{}\nTLS backend: native-tls (the system's OpenSSL)\nFUSE passthrough: {passthrough}\n\
             Test registries (fake feature): {}",
            env!("CARGO_PKG_VERSION"),
            if cfg!(feature = "fake") {
                "built in"
            } else {
                "not built in"
            },
        )
    })
}

/// `uname -r`.
fn kernel_release() -> Option<String> {
    // SAFETY: uname fills the zeroed struct we own; its fields are NUL-terminated.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    // SAFETY: release is a NUL-terminated C string inside `u`.
    let rel = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    Some(rel.to_string_lossy().into_owned())
}

/// `6.18.44-foo` -> (6, 18).
fn parse_release(rel: &str) -> Option<(u32, u32)> {
    let mut parts = rel.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_args(std::iter::once("regfs").chain(args.iter().copied()))
    }

    #[test]
    fn every_long_flag_is_an_o_option() {
        let c = parse(&[
            "localhost:5000",
            "/mnt",
            "-o",
            "cache_size=512MiB,metadata-ttl=10s,insecure,_netdev,allow_other",
            "-o",
            "readahead=0,foreground,mirror=m1:5000,mirror=m2:5000",
        ])
        .unwrap();
        assert_eq!(c.cache_size, "512MiB");
        assert_eq!(c.metadata_ttl, "10s");
        assert!(c.insecure && c.foreground);
        assert_eq!(c.readahead, "0");
        assert_eq!(
            c.mirror,
            ["m1:5000", "m2:5000"],
            "a repeatable flag keeps every -o"
        );
        assert_eq!(c.options, ["_netdev,allow_other"]);
        // Every visible long flag of the definitions is reachable (flags added later included).
        let cmd = Cli::command();
        for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            let Some(long) = a.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let item = if a.get_action().takes_values() {
                format!("{}=x", long.replace('-', "_"))
            } else {
                long.replace('-', "_")
            };
            let args = crate::mount_options::expand_args(
                &cmd,
                ["regfs", "r", "/m", "-o", &item]
                    .map(OsString::from)
                    .to_vec(),
            )
            .unwrap();
            assert!(
                args[3].to_string_lossy().starts_with(&format!("--{long}")),
                "{item}: {args:?}"
            );
        }
    }

    #[test]
    fn the_last_of_a_repeated_flag_wins() {
        // fstab's cache_size, then `mount -o cache_size=...` on the command line.
        let c = parse(&[
            "r",
            "/m",
            "-o",
            "cache_size=1G,ro",
            "--insecure",
            "-o",
            "cache_size=2G,insecure",
        ])
        .unwrap();
        assert_eq!(c.cache_size, "2G");
        assert_eq!(c.options, ["ro"]);
        assert!(parse(&["r", "/m", "-o", "cache_size"]).is_err());
    }

    #[test]
    fn generate_needs_no_mountpoint_and_mounts_nothing() {
        match Cli::invocation(["regfs", "--generate", "man"]).unwrap() {
            Invocation::Generate(a) => assert_eq!(a, Artifact::Man),
            other => panic!("{other:?}"),
        }
        assert!(Cli::invocation(["regfs", "--generate", "man", "r", "/m"]).is_err());
        assert!(Cli::invocation(["regfs", "--generate", "tcsh"]).is_err());
        assert!(parse(&["--generate", "bash"]).is_err());
        for what in [Artifact::Man, Artifact::Bash, Artifact::Zsh, Artifact::Fish] {
            let mut out = Vec::new();
            generate(what, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            let flag = if what == Artifact::Man {
                r"cache\-size"
            } else {
                "cache-size"
            };
            assert!(text.contains(flag), "{what:?}");
            if what == Artifact::Man {
                assert!(
                    !text.contains("generate"),
                    "the man page shows the hidden flag"
                );
                assert!(text.contains(".SH \"MOUNT OPTIONS AND FSTAB\""));
                assert!(text.contains(r"\&localhost:5000  /mnt/reg  fuse.regfs"));
            }
        }
    }

    #[test]
    fn version_names_tls_and_passthrough() {
        let v = long_version();
        assert!(v.starts_with(env!("CARGO_PKG_VERSION")));
        assert!(v.contains("TLS backend: native-tls"));
        assert!(v.contains("FUSE passthrough: "));
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_release("6.1.0-13-amd64"), Some((6, 1)));
        assert!(parse_release("6.1.0").unwrap() < PASSTHROUGH_SINCE);
        assert_eq!(parse_release("x"), None);
    }
}
