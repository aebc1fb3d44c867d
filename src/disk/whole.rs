//! Whole blobs on disk, for FUSE passthrough. When every block of a blob with a verified chunk
//! map is on disk, the writer assembles them into `blobs/<hex>.<size>`: each block checked
//! against its map entry, the whole stream hashed and compared with the blob digest, fsynced,
//! renamed into place, and only then its stat fingerprint (device, inode, size, mtime, ctime)
//! written beside it as `<name>.ok`. The block files are then removed (the blob is on disk once).
//!
//! The kernel reads a passthrough file without the daemon, so it cannot be checked per read:
//! `open` re-checks the fingerprint instead, and any change (a write, a truncate, a replaced
//! file) drops the file. Reads the daemon serves from a whole file are checked against the map.
//! Also here: the scan of the cache dir at open.

use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use bytes::Bytes;

use super::block::{self, Header, HEADER_LEN};
use super::evict::on_disk;
use super::files::{self, TMP_PREFIX};
use super::map::MapKey;
use super::{block_name, inc, whole_name, Inner};
use crate::sync::lock;

/// The fingerprint line of a whole file with metadata `m`.
fn fingerprint(hex: &str, m: &std::fs::Metadata) -> String {
    format!(
        "regfs-ok 1 {hex} {} {} {} {} {} {} {}\n",
        m.len(),
        m.dev(),
        m.ino(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    )
}

impl Inner {
    /// The whole file of a blob, opened, if its fingerprint still holds.
    pub(super) fn whole_file(&self, digest: &[u8; 32], blob_size: u64) -> Option<std::fs::File> {
        let hex = hex::encode(digest);
        let name = whole_name(&hex, blob_size);
        if !lock(&self.lru).contains(&name) {
            return None;
        }
        let f = files::open_nofollow(&self.path(&name)).ok()?;
        let m = f.metadata().ok()?;
        let ok = files::read_capped(&self.path(&format!("{name}.ok")), 256).ok()?;
        if m.len() != blob_size || ok != fingerprint(&hex, &m).as_bytes() {
            self.drop_damaged(&name, "changed since it was verified");
            return None;
        }
        lock(&self.lru).touch(&name);
        Some(f)
    }
}

/// Block `want` read out of the blob's whole file, if there is one and the piece hashes to the
/// map's `expected` sum (a piece that does not drops the whole file).
pub(super) fn read_piece(
    inner: &Inner,
    want: &Header,
    hex: &str,
    expected: [u8; 32],
) -> Option<Bytes> {
    let name = whole_name(hex, want.blob_size);
    if !lock(&inner.lru).contains(&name) {
        return None;
    }
    let f = files::open_nofollow(&inner.path(&name)).ok()?;
    let mut buf = vec![0u8; usize::try_from(want.len).ok()?];
    let at = want.index.checked_mul(want.block_size)?;
    if f.read_exact_at(&mut buf, at).is_err() || block::sha256(&buf) != expected {
        inner.drop_damaged(&name, "a block differs from the blob's chunk map");
        return None;
    }
    lock(&inner.lru).touch(&name);
    Some(Bytes::from(buf))
}

/// Assemble the whole file of a mapped blob whose blocks are all on disk (writer thread). Only
/// blobs whose whole file and blocks fit in the cap together are assembled, so the cap holds
/// during assembly too.
pub(super) fn maybe_assemble(inner: &Inner, mk: &MapKey, sums: &[[u8; 32]]) {
    let hex = hex::encode(mk.digest);
    let whole = whole_name(&hex, mk.blob_size);
    let names: Vec<String> = (0..sums.len() as u64)
        .map(|i| block_name(&hex, mk.blob_size, mk.block_size, i))
        .collect();
    {
        let l = lock(&inner.lru);
        if l.contains(&whole) || !names.iter().all(|n| l.contains(n)) {
            return;
        }
    }
    let bytes = on_disk(mk.blob_size);
    let blocks_bytes: u64 = (0..sums.len() as u64)
        .filter_map(|i| block::block_len(mk.blob_size, mk.block_size, i))
        .map(|len| on_disk(HEADER_LEN as u64 + len))
        .sum();
    if bytes.saturating_add(blocks_bytes) > inner.cap {
        return;
    }
    {
        let mut l = lock(&inner.lru);
        names.iter().for_each(|n| l.touch(n));
    }
    if !inner.make_room(bytes) {
        return;
    }
    match assemble(inner, mk, sums, &names, &hex) {
        Ok(true) => {
            let mut l = lock(&inner.lru);
            l.insert(whole, bytes);
            for n in &names {
                l.remove(n);
            }
            drop(l);
            for n in &names {
                files::remove(&inner.path(n));
            }
            let _ = std::fs::remove_dir(inner.path(&format!("blocks/{hex}")));
            inc(&inner.counters.blobs_assembled);
        }
        Ok(false) => {}
        Err(e) => log::warn!("disk cache: assembling sha256:{hex}: {e}"),
    }
}

/// Write the whole file and its fingerprint; false if a block was missing or wrong.
fn assemble(
    inner: &Inner,
    mk: &MapKey,
    sums: &[[u8; 32]],
    names: &[String],
    hex: &str,
) -> std::io::Result<bool> {
    let dest = inner.path(&whole_name(hex, mk.blob_size));
    let tmp = files::temp_in(&inner.dir.join("blobs"));
    let mut out = files::create_new(&tmp)?;
    let mut hasher = crate::digest::StreamingDigest::default();
    let mut good = true;
    for (i, name) in names.iter().enumerate() {
        let want = Header {
            digest: mk.digest,
            blob_size: mk.blob_size,
            block_size: mk.block_size,
            index: i as u64,
            len: block::block_len(mk.blob_size, mk.block_size, i as u64).unwrap_or(0),
            sha256: [0; 32],
        };
        let Ok(bytes) = files::read_capped(&inner.path(name), HEADER_LEN as u64 + want.len) else {
            good = false;
            break;
        };
        match block::decode(&bytes, &want) {
            Ok((data, sum)) if sum == sums[i] => {
                hasher.update(data);
                out.write_all(data)?;
            }
            _ => {
                inner.drop_damaged(name, "damaged while assembling");
                good = false;
                break;
            }
        }
    }
    if good && hasher.finish() != format!("sha256:{hex}") {
        log::error!("disk cache: the blocks of sha256:{hex} match its map but not its digest");
        good = false;
    }
    if !good {
        drop(out);
        files::remove(&tmp);
        return Ok(false);
    }
    out.sync_all()?;
    drop(out);
    if let Err(e) = std::fs::rename(&tmp, &dest) {
        files::remove(&tmp);
        return Err(e);
    }
    let m = std::fs::symlink_metadata(&dest)?;
    let ok = dest.with_file_name(format!("{hex}.{}.ok", mk.blob_size));
    files::write_atomic(&ok, &[fingerprint(hex, &m).as_bytes()], true)?;
    Ok(true)
}

/// What is in the cache dir at open: (name, bytes on disk, mtime), after removing temp files
/// left by a crash and whole files without a fingerprint. Unknown files are left alone.
pub(super) fn scan(dir: &Path) -> std::io::Result<Vec<(String, u64, std::time::SystemTime)>> {
    let mut out = Vec::new();
    for sub in ["maps", "blobs"] {
        for e in std::fs::read_dir(dir.join(sub))?.flatten() {
            let fname = e.file_name().to_string_lossy().into_owned();
            if fname.starts_with(TMP_PREFIX) {
                files::remove(&e.path());
            }
        }
    }
    for e in std::fs::read_dir(dir.join("blobs"))?.flatten() {
        let fname = e.file_name().to_string_lossy().into_owned();
        let Some((hex, rest)) = fname.split_once('.') else {
            continue;
        };
        if !crate::digest::is_sha256_hex(hex) {
            continue;
        }
        if let Some(size) = rest.strip_suffix(".ok") {
            if !dir.join("blobs").join(format!("{hex}.{size}")).exists() {
                files::remove(&e.path());
            }
            continue;
        }
        if rest.parse::<u64>().is_err() {
            continue;
        }
        if !dir.join("blobs").join(format!("{fname}.ok")).exists() {
            files::remove(&e.path());
            continue;
        }
        if let Ok(m) = e.metadata() {
            let t = m.modified().unwrap_or(std::time::UNIX_EPOCH);
            out.push((format!("blobs/{fname}"), on_disk(m.len()), t));
        }
    }
    for d in std::fs::read_dir(dir.join("blocks"))?.flatten() {
        let hex = d.file_name().to_string_lossy().into_owned();
        if !crate::digest::is_sha256_hex(&hex) || !d.path().is_dir() {
            continue;
        }
        for e in std::fs::read_dir(d.path())?.flatten() {
            let fname = e.file_name().to_string_lossy().into_owned();
            if fname.starts_with(TMP_PREFIX) {
                files::remove(&e.path());
                continue;
            }
            let ours =
                fname.split('.').count() == 3 && fname.split('.').all(|p| p.parse::<u64>().is_ok());
            if let (true, Ok(m)) = (ours, e.metadata()) {
                let t = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                out.push((format!("blocks/{hex}/{fname}"), on_disk(m.len()), t));
            }
        }
        let _ = std::fs::remove_dir(d.path());
    }
    Ok(out)
}
