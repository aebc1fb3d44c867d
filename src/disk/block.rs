//! The on-disk block format: one file per cached block, a fixed header that names the block
//! (blob digest, blob size, block size, index) and carries the sha256 of its data, then the data.
//!
//! A file is only ever accepted whole: the header must name exactly the key asked for, the length
//! must be what the key implies, and the data must hash to the header's sha256. A torn write, a
//! file renamed under another name, a flipped bit or a truncated file all read back as "no such
//! block", never as wrong bytes.

use sha2::{Digest as _, Sha256};

/// First bytes of every block file (the last byte is the format version).
const MAGIC: &[u8; 8] = b"RGFSBLK1";

/// Header length: magic, blob digest (32), blob size, block size, index, data length (8 each),
/// data sha256 (32).
pub const HEADER_LEN: usize = 8 + 32 + 8 * 4 + 32;

/// What a block file says it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub digest: [u8; 32],
    pub blob_size: u64,
    pub block_size: u64,
    pub index: u64,
    pub len: u64,
    pub sha256: [u8; 32],
}

/// The sha256 of `data` as raw bytes.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// The raw 32 bytes of a `sha256:<64 hex>` digest, or None for anything else.
pub fn digest_bytes(digest: &str) -> Option<[u8; 32]> {
    if !crate::digest::is_sha256_digest(digest) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(crate::digest::digest_hex(digest), &mut out).ok()?;
    Some(out)
}

/// Length of block `index` of a blob of `blob_size` bytes cut in `block_size` pieces; None when
/// the index is past the end (or the sizes make no sense).
pub fn block_len(blob_size: u64, block_size: u64, index: u64) -> Option<u64> {
    let start = index.checked_mul(block_size)?;
    (block_size > 0 && start < blob_size).then(|| block_size.min(blob_size - start))
}

/// A block file's bytes: the header for `h`, then `data`.
pub fn encode(h: &Header, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&h.digest);
    for v in [h.blob_size, h.block_size, h.index, h.len] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&h.sha256);
    out.extend_from_slice(data);
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parse a header (None if the bytes are not one).
pub fn parse_header(b: &[u8]) -> Option<Header> {
    if b.len() < HEADER_LEN || &b[..8] != MAGIC {
        return None;
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&b[8..40]);
    let mut sha = [0u8; 32];
    sha.copy_from_slice(&b[72..104]);
    Some(Header {
        digest,
        blob_size: u64_at(b, 40),
        block_size: u64_at(b, 48),
        index: u64_at(b, 56),
        len: u64_at(b, 64),
        sha256: sha,
    })
}

/// Why a block file was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The header is missing, torn, or names another block.
    Header,
    /// The data does not hash to the header's sha256 (or has the wrong length).
    Checksum,
}

/// The data of a block file `file` that must hold exactly `want` (its `sha256` and `len` are
/// taken from the file and checked against the data).
pub fn decode<'a>(file: &'a [u8], want: &Header) -> Result<(&'a [u8], [u8; 32]), Refused> {
    let h = parse_header(file).ok_or(Refused::Header)?;
    if (h.digest, h.blob_size, h.block_size, h.index)
        != (want.digest, want.blob_size, want.block_size, want.index)
        || h.len != want.len
    {
        return Err(Refused::Header);
    }
    let data = &file[HEADER_LEN..];
    if data.len() as u64 != h.len {
        return Err(Refused::Checksum);
    }
    let sum = sha256(data);
    if sum != h.sha256 {
        return Err(Refused::Checksum);
    }
    Ok((data, sum))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(data: &[u8]) -> Header {
        Header {
            digest: [7; 32],
            blob_size: 10,
            block_size: 4,
            index: 2,
            len: data.len() as u64,
            sha256: sha256(data),
        }
    }

    #[test]
    fn round_trip_and_every_damage_is_refused() {
        let h = header(b"ab");
        let f = encode(&h, b"ab");
        assert_eq!(decode(&f, &h).unwrap().0, b"ab");
        // A flipped data byte, a truncated file, a torn header, another key.
        let mut bad = f.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(decode(&bad, &h), Err(Refused::Checksum));
        assert_eq!(decode(&f[..f.len() - 1], &h), Err(Refused::Checksum));
        assert_eq!(decode(&f[..20], &h), Err(Refused::Header));
        let other = Header {
            index: 1,
            ..h.clone()
        };
        assert_eq!(decode(&f, &other), Err(Refused::Header));
        let mut magic = f.clone();
        magic[0] = b'X';
        assert_eq!(decode(&magic, &h), Err(Refused::Header));
    }

    #[test]
    fn lengths_and_digests() {
        assert_eq!(block_len(10, 4, 0), Some(4));
        assert_eq!(block_len(10, 4, 2), Some(2));
        assert_eq!(block_len(10, 4, 3), None);
        assert_eq!(block_len(10, 0, 0), None);
        assert_eq!(block_len(u64::MAX, 4, u64::MAX), None);
        let d = crate::digest::sha256_digest(b"x");
        assert_eq!(digest_bytes(&d).unwrap(), sha256(b"x"));
        assert!(digest_bytes("sha512:00").is_none());
    }
}
