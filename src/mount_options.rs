//! `-o` mount options, the way mount(8), fstab and systemd hand regfs its settings.
//!
//! `mount -t fuse.regfs SRC DIR -o cache_size=512MiB,nofail` ends up (through mount.fuse3) as
//! `regfs SRC DIR -o cache_size=512MiB,nofail`. Two kinds of items arrive in one list:
//!
//! - **Flags.** Every long flag of the clap definitions is also an `-o` item: `name=value` for a
//!   flag that takes a value, `name` for a switch; dashes and underscores are the same.
//!   [`expand_args`] rewrites them into long flags before clap parses, reading the names from the
//!   `clap::Command` itself, so a flag added later works as `-o` with no edit here.
//! - **Mount options**, everything else, parsed by [`parse_mount_option`]: the FUSE options regfs
//!   passes to the kernel (allow_other, ro, fsname=...), and the options that belong to mount(8)
//!   and systemd (`_netdev`, `nofail`, `x-systemd.*`...), accepted and ignored.
//!
//! A comma inside a value is written `\,`.

use std::ffi::{OsStr, OsString};

use clap::{ArgAction, Command};

/// What one mount option (an `-o` item that names no flag) asks of the mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOpt {
    /// `allow_other`: every user may use the mount.
    AllowOther,
    /// `allow_root`: root may use the mount too.
    AllowRoot,
    /// `default_permissions`: the kernel checks the modes shown.
    DefaultPermissions,
    /// `auto_unmount`: unmount when the process dies.
    AutoUnmount,
    /// `fsname=NAME`: the source shown in /proc/mounts.
    FsName(String),
    /// `ro` (true) or `rw` (false).
    ReadOnly(bool),
    /// `noexec` (true) or `exec` (false).
    NoExec(bool),
    /// `nonempty`: mount over a non-empty directory or an existing mount.
    NonEmpty,
    /// Accepted and ignored; the text says why.
    Ignored(&'static str),
}

/// Options for mount(8) and systemd, never for the filesystem. mount.fuse3 drops some itself
/// (`_netdev`, `nofail`, `user`, `users`, `auto`, `noauto`); run directly, regfs drops them too.
const FOR_MOUNT: &[&str] = &[
    "_netdev", "nofail", "noauto", "auto", "user", "users", "nouser", "owner", "group", "defaults",
];
const FOR_MOUNT_PREFIXES: &[&str] = &["x-", "X-", "comment="];
/// regfs keeps no access times to update.
const ATIME: &[&str] = &[
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "diratime",
];

/// Parse one mount option (not a flag: [`expand_args`] took those out).
pub fn parse_mount_option(item: &str) -> Result<MountOpt, String> {
    let raw = item.trim();
    if FOR_MOUNT.contains(&raw) || FOR_MOUNT_PREFIXES.iter().any(|p| raw.starts_with(p)) {
        return Ok(MountOpt::Ignored("an option for mount(8) or systemd"));
    }
    let (name, value) = match raw.split_once('=') {
        Some((n, v)) => (n.replace('-', "_"), Some(unescape(v))),
        None => (raw.replace('-', "_"), None),
    };
    Ok(match (name.as_str(), value) {
        ("allow_other", None) => MountOpt::AllowOther,
        ("allow_root", None) => MountOpt::AllowRoot,
        ("default_permissions", None) => MountOpt::DefaultPermissions,
        ("auto_unmount", None) => MountOpt::AutoUnmount,
        ("nonempty", None) => MountOpt::NonEmpty,
        ("ro", None) => MountOpt::ReadOnly(true),
        ("rw", None) => MountOpt::ReadOnly(false),
        ("noexec", None) => MountOpt::NoExec(true),
        ("exec", None) => MountOpt::NoExec(false),
        ("fsname", Some(v)) if !v.is_empty() => MountOpt::FsName(v),
        // Always on. mount.fuse3 adds `dev,suid` to every mount whose options do not say
        // nodev/nosuid, so those are accepted too; regfs still mounts nodev,nosuid.
        ("nosuid" | "nodev" | "suid" | "dev", None) => {
            MountOpt::Ignored("regfs always mounts nosuid,nodev")
        }
        (n, None) if ATIME.contains(&n) => MountOpt::Ignored("regfs keeps no access times"),
        _ => return Err(format!("unknown mount option -o {raw}")),
    })
}

/// Split an `-o` list at commas, except escaped ones (`\,`). Items keep their escapes.
pub fn split_items(list: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in list.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            ',' if !escaped => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => escaped = false,
        }
    }
    items.push(&list[start..]);
    items.retain(|s| !s.trim().is_empty());
    items
}

/// `a\,b` -> `a,b`; a backslash escapes only a comma or another backslash.
fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && matches!(chars.peek(), Some(',') | Some('\\')) {
            out.extend(chars.next());
        } else {
            out.push(c);
        }
    }
    out
}

/// The long flag an `-o` item names, if any: its long name and whether it takes a value.
fn flag_named<'c>(cmd: &'c Command, name: &str) -> Option<(&'c str, bool)> {
    let wanted = name.replace('_', "-");
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set() && !a.is_positional())
        .filter(|a| {
            !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
        })
        .find_map(|a| {
            let long = a.get_long()?;
            let aliases = a.get_all_aliases().unwrap_or_default();
            (long == wanted || aliases.contains(&wanted.as_str()))
                .then(|| (long, a.get_action().takes_values()))
        })
}

/// One `-o` item: the long flag it becomes (none for `switch=false`), or None if it names no flag.
fn item_to_flag(cmd: &Command, item: &str) -> Result<Option<Vec<OsString>>, String> {
    let item = item.trim();
    let (name, value) = match item.split_once('=') {
        Some((n, v)) => (n, Some(unescape(v))),
        None => (item, None),
    };
    let Some((long, takes_value)) = flag_named(cmd, name) else {
        return Ok(None);
    };
    let flag = match (takes_value, value) {
        (true, Some(v)) => Some(format!("--{long}={v}")),
        (true, None) => return Err(format!("-o {name} needs a value: -o {name}=VALUE")),
        (false, None) => Some(format!("--{long}")),
        (false, Some(v)) => match v.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Some(format!("--{long}")),
            "false" | "no" | "off" | "0" => None,
            _ => return Err(format!("-o {name} is a switch: give -o {name}, not {item}")),
        },
    };
    Ok(Some(flag.into_iter().map(OsString::from).collect()))
}

/// The long flags of `cmd` that take a value (their next argument is not an option list).
fn takes_value(cmd: &Command, arg: &str) -> bool {
    let Some(long) = arg.strip_prefix("--") else {
        return false;
    };
    !long.contains('=') && flag_named(cmd, long).is_some_and(|(_, v)| v)
}

/// Rewrite the command line so that every `-o` item naming a long flag of `cmd` becomes that
/// flag (`-o cache_size=1G,ro` -> `--cache-size=1G -o ro`). Other items stay in `-o`, in order.
/// Arguments after `--` and values of flags are left alone.
pub fn expand_args(cmd: &Command, args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    out.extend(it.next()); // the program name
    while let Some(arg) = it.next() {
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        let list = if s == "-o" {
            match it.next() {
                Some(v) => v,
                None => {
                    out.push(arg); // clap reports the missing value
                    continue;
                }
            }
        } else if let Some(v) = s.strip_prefix("-o").filter(|_| !s.starts_with("--")) {
            OsString::from(v.strip_prefix('=').unwrap_or(v)) // -oLIST or -o=LIST, as clap reads them
        } else if s == "--" {
            out.push(arg);
            out.extend(it.by_ref());
            break;
        } else {
            let skip_next = takes_value(cmd, s);
            out.push(arg);
            if skip_next {
                out.extend(it.next());
            }
            continue;
        };
        out.extend(expand_list(cmd, &list)?);
    }
    Ok(out)
}

/// One `-o` list: the flags it names, then `-o REST` with the mount options, if any.
fn expand_list(cmd: &Command, list: &OsStr) -> Result<Vec<OsString>, String> {
    let Some(list) = list.to_str() else {
        // Not UTF-8: no flag name can match; the mount-option parser reports it.
        return Ok(vec!["-o".into(), list.to_owned()]);
    };
    let mut out = Vec::new();
    let mut rest = Vec::new();
    for item in split_items(list) {
        match item_to_flag(cmd, item)? {
            Some(flags) => out.extend(flags),
            None => rest.push(item),
        }
    }
    if !rest.is_empty() {
        out.push("-o".into());
        out.push(rest.join(",").into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn cmd() -> Command {
        Command::new("t")
            .arg(Arg::new("registry"))
            .arg(Arg::new("mountpoint"))
            .arg(Arg::new("options").short('o').action(ArgAction::Append))
            .arg(Arg::new("cache_size").long("cache-size"))
            .arg(Arg::new("mirror").long("mirror").action(ArgAction::Append))
            .arg(
                Arg::new("insecure")
                    .long("insecure")
                    .action(ArgAction::SetTrue),
            )
            .arg(Arg::new("log_file").long("log-file"))
            .arg(Arg::new("secret").long("secret").hide(true))
    }

    fn expand(args: &[&str]) -> Result<Vec<String>, String> {
        let mut v = vec!["t".to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        let out = expand_args(&cmd(), v.into_iter().map(OsString::from).collect())?;
        Ok(out[1..]
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect())
    }

    #[test]
    fn flags_named_in_o_become_long_flags() {
        assert_eq!(
            expand(&["r", "/m", "-o", "cache_size=512MiB,allow_other,insecure"]).unwrap(),
            [
                "r",
                "/m",
                "--cache-size=512MiB",
                "--insecure",
                "-o",
                "allow_other"
            ]
        );
        // Dashes or underscores; attached -oLIST; repeated flags stay repeated.
        assert_eq!(
            expand(&["-ocache-size=1G,mirror=a,mirror=b", "r", "/m"]).unwrap(),
            ["--cache-size=1G", "--mirror=a", "--mirror=b", "r", "/m"]
        );
        assert_eq!(
            expand(&["-o=insecure,ro"]).unwrap(),
            ["--insecure", "-o", "ro"]
        );
        // Switches: name, name=true, name=false (dropped).
        assert_eq!(expand(&["-o", "insecure=yes"]).unwrap(), ["--insecure"]);
        assert!(expand(&["-o", "insecure=false"]).unwrap().is_empty());
        // Mount options only: the list stays as it was.
        assert_eq!(
            expand(&["-o", "ro,_netdev,x-systemd.automount"]).unwrap(),
            ["-o", "ro,_netdev,x-systemd.automount"]
        );
        // An escaped comma belongs to the value.
        assert_eq!(
            expand(&["-o", r"mirror=a\,b,ro"]).unwrap(),
            ["--mirror=a,b", "-o", "ro"]
        );
    }

    #[test]
    fn values_and_arguments_after_dashdash_are_left_alone() {
        assert_eq!(
            expand(&["--log-file", "-o", "r", "--", "-o", "cache_size=1"]).unwrap(),
            ["--log-file", "-o", "r", "--", "-o", "cache_size=1"]
        );
        assert_eq!(
            expand(&["--log-file=x", "-o", "insecure"]).unwrap(),
            ["--log-file=x", "--insecure"]
        );
        // Hidden flags, help and version are not reachable through -o.
        assert_eq!(expand(&["-o", "secret=1"]).unwrap(), ["-o", "secret=1"]);
        assert_eq!(expand(&["-o", "help"]).unwrap(), ["-o", "help"]);
        assert_eq!(expand(&["-o"]).unwrap(), ["-o"]);
    }

    #[test]
    fn misused_flags_are_explained() {
        assert_eq!(
            expand(&["-o", "cache_size"]).unwrap_err(),
            "-o cache_size needs a value: -o cache_size=VALUE"
        );
        assert_eq!(
            expand(&["-o", "insecure=maybe"]).unwrap_err(),
            "-o insecure is a switch: give -o insecure, not insecure=maybe"
        );
    }

    #[test]
    fn mount_options() {
        use MountOpt::*;
        let p = |s| parse_mount_option(s).unwrap();
        assert_eq!(p("allow_other"), AllowOther);
        assert_eq!(p("allow-root"), AllowRoot);
        assert_eq!(p("default_permissions"), DefaultPermissions);
        assert_eq!(p("auto_unmount"), AutoUnmount);
        assert_eq!(p("ro"), ReadOnly(true));
        assert_eq!(p("rw"), ReadOnly(false));
        assert_eq!(p("noexec"), NoExec(true));
        assert_eq!(p("exec"), NoExec(false));
        assert_eq!(p("nonempty"), NonEmpty);
        assert_eq!(p(r"fsname=a\,b"), FsName("a,b".into()));
        for ignored in [
            "_netdev",
            "nofail",
            "noauto",
            "auto",
            "user",
            "users",
            "defaults",
            "x-systemd.automount",
            "x-systemd.idle-timeout=60",
            "X-mount.mkdir",
            "comment=systemd.automount",
            "suid",
            "dev",
            "nosuid",
            "nodev",
            "noatime",
        ] {
            assert!(matches!(p(ignored), Ignored(_)), "{ignored}");
        }
        for bad in [
            "bogus",
            "fsname=",
            "ro=1",
            "allow_other=yes",
            "max_read=4096",
        ] {
            assert_eq!(
                parse_mount_option(bad).unwrap_err(),
                format!("unknown mount option -o {bad}")
            );
        }
    }

    #[test]
    fn lists_split_at_unescaped_commas() {
        assert_eq!(split_items("a,b=c,,d"), ["a", "b=c", "d"]);
        assert_eq!(split_items(r"a=x\,y,b"), [r"a=x\,y", "b"]);
        assert!(split_items("").is_empty());
        assert_eq!(unescape(r"x\,y\\z\n"), r"x,y\z\n");
    }
}
