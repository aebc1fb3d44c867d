//! Verified chunk maps: after a blob was checked against its digest in full, the sha256 of each of
//! its blocks, bound to the blob digest, its size and the block size, in one small file
//! (`maps/<hex>.<blob size>.<block size>.map`, 32 bytes per block: 32 KiB for 1 GiB in 1 MiB
//! blocks). A file that is torn, truncated or names another blob is ignored.

use std::path::{Path, PathBuf};

use super::block::sha256;

/// First bytes of a map file (the last byte is the format version).
const MAGIC: &[u8; 8] = b"RGFSMAP1";
/// Header: magic, digest (32), blob size, block size, count (8 each).
const HEAD: usize = 8 + 32 + 24;
/// Largest map accepted: 2^21 blocks (64 MiB of sums; a 128 GiB blob in 64 KiB blocks).
pub const MAX_BLOCKS: u64 = 1 << 21;

/// What a map is the map of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MapKey {
    pub digest: [u8; 32],
    pub blob_size: u64,
    pub block_size: u64,
}

impl MapKey {
    /// Blocks in the blob, or None if the map would be too large (or the sizes are nonsense).
    pub fn blocks(&self) -> Option<u64> {
        if self.block_size == 0 {
            return None;
        }
        let n = self.blob_size.div_ceil(self.block_size);
        (n <= MAX_BLOCKS).then_some(n)
    }

    pub fn path(&self, dir: &Path) -> PathBuf {
        dir.join(format!(
            "{}.{}.{}.map",
            hex::encode(self.digest),
            self.blob_size,
            self.block_size
        ))
    }
}

/// The file's bytes: header, the sums, then the sha256 of everything before it.
pub fn encode(key: &MapKey, sums: &[[u8; 32]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEAD + 32 * (sums.len() + 1));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&key.digest);
    for v in [key.blob_size, key.block_size, sums.len() as u64] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for s in sums {
        out.extend_from_slice(s);
    }
    let trailer = sha256(&out);
    out.extend_from_slice(&trailer);
    out
}

/// The sums of a map file for `key`, or None if the bytes are not exactly one.
pub fn decode(key: &MapKey, b: &[u8]) -> Option<Vec<[u8; 32]>> {
    let n = key.blocks()?;
    let want = HEAD as u64 + 32 * (n + 1);
    if b.len() as u64 != want || &b[..8] != MAGIC || b[8..40] != key.digest {
        return None;
    }
    let field = |at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(a)
    };
    if (field(40), field(48), field(56)) != (key.blob_size, key.block_size, n) {
        return None;
    }
    let (body, trailer) = b.split_at(b.len() - 32);
    if sha256(body) != trailer {
        return None;
    }
    Some(
        body[HEAD..]
            .chunks_exact(32)
            .map(|c| {
                let mut s = [0u8; 32];
                s.copy_from_slice(c);
                s
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let key = MapKey {
            digest: [1; 32],
            blob_size: 9,
            block_size: 4,
        };
        let sums = vec![[2; 32], [3; 32], [4; 32]];
        let f = encode(&key, &sums);
        assert_eq!(decode(&key, &f).unwrap(), sums);
        let mut bad = f.clone();
        bad[70] ^= 1;
        assert!(decode(&key, &bad).is_none());
        assert!(decode(&key, &f[..f.len() - 1]).is_none());
        let other = MapKey {
            block_size: 3,
            ..key.clone()
        };
        assert!(decode(&other, &f).is_none());
        // A map whose count disagrees with the sizes is refused before anything is read.
        assert!(decode(&key, &encode(&key, &sums[..2])).is_none());
        let huge = MapKey {
            blob_size: u64::MAX,
            block_size: 1,
            ..key
        };
        assert!(huge.blocks().is_none());
    }
}
