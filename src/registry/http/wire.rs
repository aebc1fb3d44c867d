//! Small pieces of the wire format: argument checks before a request is built, header reading,
//! `Location` resolution, and loopback detection.

use reqwest::header::HeaderMap;
use reqwest::Url;

use crate::digest::is_sha256_digest;
use crate::error::{RegistryError, RegistryResult};

/// Is `host` (a name or an IP address, IPv6 with or without brackets) this machine?
pub fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub(super) fn check_repo(repo: &str) -> RegistryResult<()> {
    if crate::registry::is_valid_repo_name(repo) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!("repository name {repo:?}")))
    }
}

pub(super) fn check_reference(reference: &str) -> RegistryResult<()> {
    if crate::registry::is_valid_tag(reference) || is_sha256_digest(reference) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!("reference {reference:?}")))
    }
}

pub(super) fn check_digest(digest: &str) -> RegistryResult<()> {
    if is_sha256_digest(digest) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!("digest {digest:?}")))
    }
}

/// Headers of an upload request (PATCH, or the closing PUT) carrying bytes `start..=end` of
/// the blob: `Content-Range: START-END` without `bytes=`, as distribution 2.8 wants it.
pub(super) fn upload_headers(range: Option<(u64, u64)>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        reqwest::header::CONTENT_TYPE,
        reqwest::header::HeaderValue::from_static("application/octet-stream"),
    );
    if let Some((start, end)) = range {
        headers.insert(
            reqwest::header::CONTENT_RANGE,
            reqwest::header::HeaderValue::from_str(&format!("{start}-{end}")).expect("ascii"),
        );
    }
    headers
}

pub(super) fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

pub(super) fn content_type(h: &HeaderMap) -> String {
    header_str(h, "content-type")
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The `Location` of a response, resolved against the URL of the request it answers.
pub(super) fn resolve_location(h: &HeaderMap, base: &Url, what: &str) -> RegistryResult<Url> {
    let loc = header_str(h, "location")
        .ok_or_else(|| RegistryError::Protocol(format!("{what}: no Location")))?;
    base.join(loc)
        // Not echoed: a Location may carry a signature or an upload's state.
        .map_err(|e| {
            RegistryError::Protocol(format!(
                "{what}: a Location that is not a URL ({} bytes): {e}",
                loc.len()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        assert!(is_loopback_host("localhost"));
        assert!(is_loopback_host("127.0.0.5"));
        assert!(is_loopback_host("[::1]"));
        assert!(!is_loopback_host("10.0.0.1"));
    }
}
