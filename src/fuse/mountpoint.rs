//! The mountpoint: the checks made before mounting on it (a directory, not a dead FUSE mount, not
//! already a mount, empty unless `-o nonempty`), the mount table (/proc/self/mountinfo), and the
//! lazy unmount used when a plain one finds the mount busy.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// One line of /proc/self/mountinfo, the fields regfs looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The device (major, minor) of the mount's st_dev: what /sys/class/bdi/MAJOR:MINOR is
    /// named after, known without a stat through the mount (which a FUSE daemon must not do to
    /// its own mount: killed meanwhile, it would wait forever for its own answer).
    pub device: (u32, u32),
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Parse /proc/self/mountinfo text (proc(5)): field 5 is the mount point; after the " - "
/// separator come the filesystem type and the source. Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let (major, minor) = fields.get(2)?.split_once(':')?;
            let mount_point = fields.get(4)?;
            let mut after = after.split(' ');
            Some(MountEntry {
                device: (major.parse().ok()?, minor.parse().ok()?),
                mount_point: PathBuf::from(unescape_octal(mount_point)),
                fstype: after.next()?.to_string(),
                source: unescape_octal(after.next().unwrap_or("")),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\040`, `\011`, `\012`, `\134`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| {
            b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount at `path` (the last one mounted there), if `path` is a mount point.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

/// Check the mountpoint before mounting; returns its canonical path. Refuses a path that is not
/// a directory, a dead FUSE mount (its process ended), and unless `nonempty`, a directory that
/// is already a mount point or holds entries.
pub fn check(mp: &Path, nonempty: bool) -> Result<PathBuf, String> {
    let shown = mp.display();
    let dead = |e: &std::io::Error| {
        format!(
            "{shown} is a FUSE mount whose process has ended ({e}); unmount it first: \
             fusermount3 -u {shown}"
        )
    };
    let failed = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotConnected {
            dead(&e)
        } else {
            format!("mountpoint {shown}: {e}")
        }
    };
    if !std::fs::metadata(mp).map_err(failed)?.is_dir() {
        return Err(format!("{shown} is not a directory"));
    }
    let canonical = mp.canonicalize().map_err(failed)?;
    if nonempty {
        return Ok(canonical);
    }
    // Listing asks the filesystem itself: a dead FUSE mount may still answer stat from the
    // kernel's attribute cache, never a listing.
    let has_entries = std::fs::read_dir(&canonical)
        .map_err(failed)?
        .next()
        .is_some();
    if let Some(m) = mount_at(&canonical) {
        return Err(format!(
            "{shown} is already a mount point ({} {}); unmount it first, or give -o nonempty \
             to mount over it",
            m.fstype, m.source
        ));
    }
    if has_entries {
        return Err(format!(
            "{shown} is not empty; mount on an empty directory, or give -o nonempty to hide its \
             contents while mounted"
        ));
    }
    Ok(canonical)
}

/// Detach the mount now and let it go once nothing uses it: `fusermount3 -u -z` (it works for
/// root and, through its setuid bit, for the user who mounted).
pub fn lazy_unmount(mp: &Path) -> Result<(), String> {
    let out = Command::new("fusermount3")
        .args(["-u", "-z", "--"])
        .arg(mp)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running fusermount3: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "fusermount3 -u -z {}: {}",
            mp.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
98 22 0:52 / /tmp/a\\040b rw,nosuid,nodev - fuse.regfs localhost:5000 rw,user_id=0
99 22 0:53 / /x rw shared:7 master:2 - tmpfs tmp\\134fs rw
garbage
";
        let v = parse_mountinfo(text);
        assert_eq!(v.len(), 3);
        assert_eq!(v[1].mount_point, PathBuf::from("/tmp/a b"));
        assert_eq!(v[1].fstype, "fuse.regfs");
        assert_eq!(v[1].source, "localhost:5000");
        assert_eq!(v[1].device, (0, 52));
        assert_eq!(v[2].source, "tmp\\fs");
        assert_eq!(unescape_octal("\\012\\11\\999"), "\n\\11\\999");
    }

    #[test]
    fn mountpoint_checks() {
        let d = tempfile::tempdir().unwrap();
        let canonical = d.path().canonicalize().unwrap();
        assert_eq!(check(d.path(), false).unwrap(), canonical);
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let e = check(d.path(), false).unwrap_err();
        assert!(
            e.contains("is not empty") && e.contains("-o nonempty"),
            "{e}"
        );
        assert_eq!(check(d.path(), true).unwrap(), canonical);
        let e = check(&d.path().join("f"), true).unwrap_err();
        assert!(e.ends_with("is not a directory"), "{e}");
        let e = check(&d.path().join("missing"), true).unwrap_err();
        assert!(e.starts_with("mountpoint "), "{e}");
        // The root directory is always a mount point.
        let e = check(Path::new("/"), false).unwrap_err();
        assert!(e.contains("is already a mount point"), "{e}");
        assert!(mount_at(Path::new("/")).is_some());
    }
}
