//! `Link` pagination of `_catalog` and `tags/list`. Each page is read under [`LIST_BODY_CAP`]; a
//! `Link` to another origin is followed without credentials (see `transport`).

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode, Url};

use super::transport::{error_from, Req};
use super::{HttpRegistry, LIST_BODY_CAP};
use crate::error::{RegistryError, RegistryResult};
use crate::registry::RequestStats;

/// Page size asked for in `_catalog` and `tags/list`. distribution refuses n above its
/// `catalog.maxentries` (default 1000) with 400, so stay well below; on that 400 we retry without n.
pub(super) const PAGE_SIZE: usize = 100;
/// Cycle protection for `Link` pagination.
const MAX_PAGES: usize = 100_000;

/// The `rel="next"` URL of a `Link` header, resolved against the URL it came with.
pub fn next_link(headers: &HeaderMap, request_url: &Url) -> Option<Url> {
    for value in headers.get_all(reqwest::header::LINK) {
        let v = value.to_str().ok()?;
        for part in v.split(',') {
            let part = part.trim();
            let Some(rest) = part.strip_prefix('<') else {
                continue;
            };
            let Some((target, params)) = rest.split_once('>') else {
                continue;
            };
            let is_next = params.split(';').any(|p| {
                let p = p.trim().replace(' ', "");
                p.eq_ignore_ascii_case("rel=\"next\"") || p.eq_ignore_ascii_case("rel=next")
            });
            if is_next {
                return request_url.join(target).ok();
            }
        }
    }
    None
}

impl HttpRegistry {
    /// GET a JSON list, following `Link` pages. `key` is the JSON field holding the names.
    pub(super) async fn paged_list(
        &self,
        first: Url,
        scope: &str,
        key: &str,
        is_catalog: bool,
    ) -> RegistryResult<Vec<String>> {
        self.pages(first, scope, key, is_catalog, MAX_PAGES)
            .await?
            .ok_or_else(|| {
                RegistryError::Protocol(format!("more than {MAX_PAGES} pages: pagination loop?"))
            })
    }

    /// The names of at most `max_pages` pages of a list (sorted, deduplicated), or None if
    /// there are more.
    pub(super) async fn pages(
        &self,
        first: Url,
        scope: &str,
        key: &str,
        is_catalog: bool,
        max_pages: usize,
    ) -> RegistryResult<Option<Vec<String>>> {
        let mut out = Vec::new();
        let mut url = first;
        let mut retried_without_n = false;
        let mut pages = 0;
        while pages < max_pages {
            pages += 1;
            RequestStats::inc(if is_catalog {
                &self.stats.catalog_pages
            } else {
                &self.stats.tag_pages
            });
            let what = format!("GET {}", url.path());
            let req = Req {
                method: Method::GET,
                url: url.clone(),
                headers: HeaderMap::new(),
                body: None,
                scope: scope.to_string(),
                what: what.clone(),
            };
            let (status, headers, body) = self.fetch_capped(&req, LIST_BODY_CAP).await?;
            let next = next_link(&headers, &url);
            if status == StatusCode::BAD_REQUEST
                && !retried_without_n
                && String::from_utf8_lossy(&body).contains("PAGINATION_NUMBER_INVALID")
            {
                // A retry without `n` is not a page of its own.
                retried_without_n = true;
                pages -= 1;
                let mut u = url.clone();
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .filter(|(k, _)| k != "n")
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                if pairs.is_empty() {
                    u.set_query(None);
                } else {
                    u.query_pairs_mut().clear().extend_pairs(pairs);
                }
                url = u;
                continue;
            }
            if !status.is_success() {
                return Err(error_from(status, &body, &what));
            }
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| RegistryError::Malformed(format!("{what} response: {e}")))?;
            match v.get(key) {
                Some(serde_json::Value::Array(items)) => {
                    out.extend(items.iter().filter_map(|i| i.as_str().map(str::to_string)))
                }
                // distribution 2.8 answers `"tags": null` once every tag is deleted.
                Some(serde_json::Value::Null) | None => {}
                Some(_) => {
                    return Err(RegistryError::Malformed(format!(
                        "{what} response: {key} is not a list"
                    )))
                }
            }
            match next {
                Some(n) => url = n,
                None => {
                    out.sort();
                    out.dedup();
                    return Ok(Some(out));
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn link_headers_resolve_relative() {
        let mut h = HeaderMap::new();
        h.insert(
            reqwest::header::LINK,
            HeaderValue::from_static("</v2/_catalog?last=test%2Frepo&n=1>; rel=\"next\""),
        );
        let base = Url::parse("http://127.0.0.1:5000/v2/_catalog?n=1").unwrap();
        assert_eq!(
            next_link(&h, &base).unwrap().as_str(),
            "http://127.0.0.1:5000/v2/_catalog?last=test%2Frepo&n=1"
        );
        let mut h2 = HeaderMap::new();
        h2.insert(
            reqwest::header::LINK,
            HeaderValue::from_static("<https://other/v2/x/tags/list?next_page=abc>; rel=prev, <list?next_page=zz&n=50>; rel=\"next\""),
        );
        let base = Url::parse("https://q.example/v2/coreos/etcd/tags/list?n=50").unwrap();
        assert_eq!(
            next_link(&h2, &base).unwrap().as_str(),
            "https://q.example/v2/coreos/etcd/tags/list?next_page=zz&n=50"
        );
        assert!(next_link(&HeaderMap::new(), &base).is_none());
    }
}
