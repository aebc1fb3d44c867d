//! Content digests (`sha256:<hex>`): parsing, validation and computing.

use sha2::{Digest as _, Sha256};

use crate::error::{RegistryError, RegistryResult};

/// sha256 of `data`, as `sha256:<hex>`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Is `s` a well-formed sha256 digest (`sha256:` + 64 lowercase hex)?
pub fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(is_sha256_hex)
}

/// Is `s` 64 lowercase hex digits?
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The hex part of a digest (everything after the first `:`).
pub fn digest_hex(d: &str) -> &str {
    d.split_once(':').map(|(_, h)| h).unwrap_or(d)
}

/// Is `s` a digest by the OCI grammar: `algorithm ":" encoded`, the algorithm
/// `[a-z0-9]+([+._-][a-z0-9]+)*`, the encoded part `[a-zA-Z0-9=_-]+`, ASCII only (so slicing it
/// is safe), at most 256 bytes. (A malformed `sha256:` digest passes here and fails its
/// check when its bytes are read; paths need [`is_sha256_digest`].) Descriptors are
/// checked with this when a manifest is parsed, before a digest names a file or a cache entry.
pub fn is_valid_digest(s: &str) -> bool {
    let Some((algo, enc)) = s.split_once(':') else {
        return false;
    };
    let sep = |b: u8| matches!(b, b'+' | b'.' | b'_' | b'-');
    s.len() <= 256
        && !algo.is_empty()
        && !enc.is_empty()
        && algo
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || sep(b))
        && !sep(algo.as_bytes()[0])
        && !sep(algo.as_bytes()[algo.len() - 1])
        && enc
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'))
}

/// The first 12 characters of a digest's hex part, for names (`NN-<hex12>`); safe on any text.
pub fn short_hex(d: &str) -> String {
    digest_hex(d).chars().take(12).collect()
}

/// Check `data` against `expected`. Only sha256 can be checked; other algorithms are refused.
pub fn verify(expected: &str, data: &[u8]) -> RegistryResult<()> {
    if !expected.starts_with("sha256:") {
        return Err(RegistryError::Unsupported(format!(
            "digest algorithm of {expected}"
        )));
    }
    let actual = sha256_digest(data);
    if actual != expected {
        return Err(RegistryError::DigestMismatch {
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// A streaming sha256 that can be compared to a digest at the end.
#[derive(Clone, Default)]
pub struct StreamingDigest {
    hasher: Sha256,
    pub bytes: u64,
}

impl StreamingDigest {
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
    }
    pub fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.finalize()))
    }
}

/// A content digest (`algo:hex`) as the core passes it around: cheap to clone, compared and
/// hashed as its text. Made from registry answers as they are; [`Digest::is_sha256`] says whether
/// it can be verified.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(std::sync::Arc<str>);

impl Digest {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The hex part (everything after the first `:`).
    pub fn hex(&self) -> &str {
        digest_hex(&self.0)
    }
    /// `sha256:` digests are the ones regfs can check.
    pub fn is_sha256(&self) -> bool {
        self.0.starts_with("sha256:")
    }
    /// `sha256:<hex>` for 64 lowercase hex digits.
    pub fn sha256_of_hex(hex: &str) -> Option<Digest> {
        is_sha256_hex(hex).then(|| Digest::from(format!("sha256:{hex}")))
    }
}

impl From<&str> for Digest {
    fn from(s: &str) -> Self {
        Digest(std::sync::Arc::from(s))
    }
}

impl From<String> for Digest {
    fn from(s: String) -> Self {
        Digest(std::sync::Arc::from(s))
    }
}

impl From<&String> for Digest {
    fn from(s: &String) -> Self {
        Digest::from(s.as_str())
    }
}

impl std::ops::Deref for Digest {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Digest {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        let d = sha256_digest(b"");
        assert_eq!(
            d,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(is_sha256_digest(&d));
        assert!(!is_sha256_digest("sha256:E3B0"));
        assert!(!is_sha256_digest("md5:abc"));
        assert_eq!(digest_hex(&d).len(), 64);
        assert!(verify(&d, b"").is_ok());
        assert!(matches!(
            verify(&d, b"x"),
            Err(RegistryError::DigestMismatch { .. })
        ));
        let mut s = StreamingDigest::default();
        s.update(b"ab");
        s.update(b"c");
        assert_eq!(s.finish(), sha256_digest(b"abc"));
    }
}
