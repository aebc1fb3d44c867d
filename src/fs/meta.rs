//! Registry metadata as the tree needs it, cached: the catalog, tag lists and tag targets (each
//! for `--metadata-ttl`), manifests by digest (forever: content addressed, LRU by count and
//! bytes), the times of images and configs (content addressed too), the repositories known to
//! exist, and the digests seen per repository (for `blobs/sha256/`).
//!
//! A tag is resolved with one GET by tag where that costs nothing extra (`--tag-resolution`): the
//! body that comes with the digest goes straight into the manifest cache, so the tag's files need
//! no further request. Elsewhere (Docker Hub) a HEAD resolves it and the body is fetched by
//! digest when it is needed.
//!
//! Writes through the mount change what is true before the TTLs run out; they reach this cache
//! as [`Event`]s, applied in one place.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::flight::Flights;
use super::node::{Content, FileNode};
use crate::digest::{is_sha256_hex, Digest};
use crate::error::{FsError, FsResult, RegistryError};
use crate::manifest::{self, Descriptor, Parsed};
use crate::registry::{ManifestBlob, ManifestHead, Registry};
use crate::sync::lock;

/// Manifests kept parsed in memory, by count: every tag of a few hundred repositories.
const MAX_MANIFESTS: usize = 4096;
/// ... and by bytes of their bodies. 32 MiB holds 4096 manifests of 8 KiB (real ones are
/// 1-10 KiB; an index of many platforms a few tens of KiB), while a registry that serves
/// 4 MiB manifests (distribution's limit) cannot make this cache hold more than half the
/// 64 MiB the memory bound allows above `--cache-size`.
const MAX_MANIFEST_BYTES: usize = 32 << 20;
/// Times kept (image manifests and configs by digest): a few dozen bytes each.
const MAX_TIMES: usize = 2 * MAX_MANIFESTS;

/// What a [`TtlMap`] holds.
struct Stored<K, V> {
    /// Entries, with the time each was stored.
    entries: HashMap<K, (Instant, V)>,
    /// Writes through the mount (events) so far, and the last one to change each key changed.
    changes: u64,
    changed: HashMap<K, u64>,
}

/// A map whose entries are fresh for a fixed time after they were stored; concurrent loads of
/// one key share one request.
pub(crate) struct TtlMap<K, V> {
    ttl: Duration,
    /// A load stores its answer only if no write through the mount changed its key since it
    /// started: an answer from before a push must not hide the push for a TTL. (`changed`
    /// grows by one entry per key ever written through the mount.)
    map: Mutex<Stored<K, V>>,
    /// Loads on the wire; None is a guess's answer that did not fetch the whole value.
    loading: Flights<K, Option<V>>,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlMap<K, V> {
    pub fn new(ttl: Duration) -> Self {
        TtlMap {
            ttl,
            map: Mutex::new(Stored {
                entries: HashMap::new(),
                changes: 0,
                changed: HashMap::new(),
            }),
            loading: Flights::default(),
        }
    }
    /// The count of changes so far: hand it to [`TtlMap::store_since`].
    pub fn changes(&self) -> u64 {
        lock(&self.map).changes
    }
    /// Store what a load that started at `changes` fetched, unless its key changed since.
    pub fn store_since(&self, k: K, v: V, changes: u64) {
        let mut m = lock(&self.map);
        if m.changed.get(&k).is_none_or(|c| *c <= changes) {
            m.entries.insert(k, (Instant::now(), v));
        }
    }
    /// The value, if stored less than the TTL ago.
    pub fn fresh(&self, k: &K) -> Option<V> {
        lock(&self.map)
            .entries
            .get(k)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, v)| v.clone())
    }
    /// A change made through the mount: `v` is now true. Loads on the wire do not store their
    /// (older) answers, and the next ask that is not answered by `v` starts a new load.
    pub fn insert(&self, k: K, v: V) {
        self.change(&k).entries.insert(k, (Instant::now(), v));
    }
    /// A change made through the mount: what is stored for `k` is no longer true.
    pub fn remove(&self, k: &K) {
        self.change(k).entries.remove(k);
    }
    /// Record a change of `k` made through the mount (loads on the wire are forgotten and will
    /// not store their answers); the map, locked, for the change itself.
    fn change(&self, k: &K) -> std::sync::MutexGuard<'_, Stored<K, V>> {
        self.loading.forget(k);
        let mut m = lock(&self.map);
        m.changes += 1;
        let now = m.changes;
        m.changed.insert(k.clone(), now);
        m
    }
    /// The fresh value, or `load`'s, stored. A failed load stores nothing. While one load of
    /// `k` is on the wire, other callers wait for its answer (`fs::flight`).
    pub async fn get_or_load<F, Fut>(&self, k: K, load: F) -> FsResult<V>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = FsResult<V>>,
    {
        let mut load = Some(load);
        // A load on the wire may be a guess's that does not fetch the whole value
        // ([`TtlMap::get_or_guess`]): after one, ask again (another guess is unlikely; after
        // two, load alone).
        for _ in 0..2 {
            let got = self
                .get_or_guess(k.clone(), || {
                    let load = load.take();
                    async move {
                        match load {
                            Some(f) => f().await.map(Some),
                            None => Err(FsError::io("a metadata load was asked twice")),
                        }
                    }
                })
                .await?;
            if let Some(v) = got {
                return Ok(v);
            }
        }
        match load.take() {
            Some(f) => {
                let since = self.changes();
                let v = f().await?;
                self.store_since(k, v.clone(), since);
                Ok(v)
            }
            None => Err(FsError::io("a metadata load was asked twice")),
        }
    }

    /// The fresh value, or what `load` makes of it: the value (stored), or None when it
    /// cannot be had cheaply (nothing stored). Shares loads on the wire with
    /// [`TtlMap::get_or_load`], whose whole value a guess gladly takes.
    pub async fn get_or_guess<F, Fut>(&self, k: K, load: F) -> FsResult<Option<V>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = FsResult<Option<V>>>,
    {
        if let Some(v) = self.fresh(&k) {
            return Ok(Some(v));
        }
        self.loading
            .run(k.clone(), || async {
                // Stored by a load that landed between the check above and this one.
                if let Some(v) = self.fresh(&k) {
                    return Ok(Some(v));
                }
                let since = self.changes();
                let v = load().await?;
                if let Some(v) = &v {
                    self.store_since(k.clone(), v.clone(), since);
                }
                Ok(v)
            })
            .await
    }
}

/// A manifest with its parsed form.
#[derive(Clone)]
pub(crate) struct ManifestEntry {
    pub blob: ManifestBlob,
    pub parsed: Parsed,
}

/// The image manifest shown at some level: its digest and config.
pub(crate) struct ImageView {
    pub digest: Digest,
    pub config: Descriptor,
}

/// Something written through the mount that the cached metadata must reflect at once.
pub(crate) enum Event {
    /// A repository was made by mkdir (it exists in the registry from its first push).
    RepoCreated { repo: String },
    /// A blob was committed by an upload.
    BlobCommitted {
        repo: String,
        digest: Digest,
        size: u64,
    },
    /// A blob was deleted.
    BlobDeleted { repo: String, digest: Digest },
    /// A manifest was pushed under a tag.
    ManifestPushed {
        repo: String,
        tag: String,
        entry: Box<ManifestEntry>,
    },
    /// A tag was deleted.
    TagDeleted { repo: String, tag: String },
}

/// The catalog as last fetched: `None` = the registry offers none to us.
type CatalogState = Option<Arc<Vec<String>>>;

/// Parsed manifests, least recently used first out, capped in count and in body bytes.
struct ManifestLru {
    lru: lru::LruCache<Digest, ManifestEntry>,
    bytes: usize,
}

impl ManifestLru {
    fn put(&mut self, digest: Digest, entry: ManifestEntry) {
        self.bytes += entry.blob.body.len();
        if let Some(old) = self.lru.put(digest, entry) {
            self.bytes -= old.blob.body.len();
        }
        // Always keep the newest one, whatever its size (it is at most 4 MiB).
        while self.bytes > MAX_MANIFEST_BYTES && self.lru.len() > 1 {
            match self.lru.pop_lru() {
                Some((_, old)) => self.bytes -= old.blob.body.len(),
                None => break,
            }
        }
    }
}

pub(crate) struct Meta {
    reg: Arc<dyn Registry>,
    /// (os, architecture, variant) chosen at the tag level of an index.
    platform: (String, String, Option<String>),
    catalog: TtlMap<(), CatalogState>,
    tag_lists: TtlMap<String, Arc<Vec<String>>>,
    tag_targets: TtlMap<(String, String), ManifestHead>,
    /// Resolve tags with a GET by tag (the body comes along) instead of a HEAD.
    tag_by_get: bool,
    manifests: Mutex<ManifestLru>,
    /// Manifests on the wire, by repository and digest (one request for concurrent asks; a
    /// repository that fails to serve a digest says nothing about another's).
    manifest_loads: Flights<(String, Digest), ManifestEntry>,
    /// Digest (of an image manifest, or of a config) -> its time, once known; a config without a
    /// usable `created` is None.
    times: Mutex<lru::LruCache<Digest, Option<SystemTime>>>,
    /// Repositories confirmed to exist by a lookup or made here (for registries without a
    /// catalog, and for repositories with nothing pushed yet).
    known_repos: Mutex<BTreeSet<String>>,
    /// Per repository: digest hex -> what it is, for `blobs/sha256/`.
    seen: Mutex<HashMap<String, BTreeMap<String, FileNode>>>,
}

impl Meta {
    pub fn new(
        reg: Arc<dyn Registry>,
        ttl: Duration,
        platform: (String, String, Option<String>),
    ) -> Self {
        Meta {
            reg,
            platform,
            catalog: TtlMap::new(ttl),
            tag_lists: TtlMap::new(ttl),
            tag_targets: TtlMap::new(ttl),
            tag_by_get: false,
            manifests: Mutex::new(ManifestLru {
                lru: lru::LruCache::new(
                    std::num::NonZeroUsize::new(MAX_MANIFESTS).expect("non-zero"),
                ),
                bytes: 0,
            }),
            manifest_loads: Flights::default(),
            times: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(MAX_TIMES).expect("non-zero"),
            )),
            known_repos: Mutex::new(BTreeSet::new()),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Resolve tags with one GET by tag (true) or a HEAD first (false, the default).
    pub fn resolving_tags_by_get(mut self, get: bool) -> Self {
        self.tag_by_get = get;
        self
    }

    /// The catalog, or None when the registry does not offer one to us.
    pub async fn catalog(&self) -> FsResult<CatalogState> {
        self.catalog
            .get_or_load((), || async {
                match self.reg.catalog().await {
                    Ok(list) => Ok(Some(Arc::new(list))),
                    Err(
                        e @ (RegistryError::NotFound(_)
                        | RegistryError::Unauthorized(_)
                        | RegistryError::Denied(_)
                        | RegistryError::Unsupported(_)),
                    ) => {
                        log::info!("no catalog, listing only repositories looked up by path: {e}");
                        Ok(None)
                    }
                    Err(e) => Err(FsError::registry(e, "listing repositories")),
                }
            })
            .await
    }

    /// The catalog if it is cached and fresh (no request).
    pub fn fresh_catalog(&self) -> Option<Arc<Vec<String>>> {
        self.catalog.fresh(&()).flatten()
    }

    /// Every repository name regfs knows: the catalog plus repositories found by lookup.
    pub async fn repo_names(&self) -> FsResult<Vec<String>> {
        let mut names: BTreeSet<String> = lock(&self.known_repos).clone();
        if let Some(cat) = self.catalog().await? {
            names.extend(cat.iter().cloned());
        }
        Ok(names.into_iter().collect())
    }

    /// The next path components below `prefix` ("" = the root) among known repositories.
    pub async fn nested_names(&self, prefix: &str) -> FsResult<Vec<String>> {
        let names = self.repo_names().await?;
        let mut out = BTreeSet::new();
        for n in &names {
            let rest = if prefix.is_empty() {
                Some(n.as_str())
            } else {
                n.strip_prefix(prefix).and_then(|r| r.strip_prefix('/'))
            };
            if let Some(first) = rest.and_then(|r| r.split('/').next()) {
                if !first.is_empty() {
                    out.insert(first.to_string());
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Is `repo`'s tag list cached and fresh? (No request.)
    pub fn has_tag_list(&self, repo: &str) -> bool {
        self.tag_lists.fresh(&repo.to_string()).is_some()
    }

    /// `repo`'s tags if they fit in one page of `tags/list` (one request, or none when they are
    /// cached), else None: what a guess may cost (walk-ahead). A whole list is cached as
    /// [`Meta::tag_list`] would.
    pub async fn few_tags(&self, repo: &str) -> FsResult<Option<Arc<Vec<String>>>> {
        self.tag_lists
            .get_or_guess(repo.to_string(), || async {
                self.reg
                    .tags_if_few(repo)
                    .await
                    .map(|t| t.map(Arc::new))
                    .map_err(|e| FsError::registry(e, format!("listing tags of {repo}")))
            })
            .await
    }

    pub async fn tag_list(&self, repo: &str) -> FsResult<Arc<Vec<String>>> {
        self.tag_lists
            .get_or_load(repo.to_string(), || async {
                self.reg
                    .tags(repo)
                    .await
                    .map(Arc::new)
                    .map_err(|e| FsError::registry(e, format!("listing tags of {repo}")))
            })
            .await
    }

    /// A repository made here (by mkdir or a push) or found by lookup.
    pub fn knows_repo(&self, repo: &str) -> bool {
        lock(&self.known_repos).contains(repo)
    }

    /// Is `path` a repository? Asks the registry (tags/list) when the catalog does not say.
    pub async fn is_repo(&self, path: &str) -> FsResult<bool> {
        if self.knows_repo(path) {
            return Ok(true);
        }
        if let Some(cat) = self.catalog().await? {
            if cat.iter().any(|r| r == path) {
                return Ok(true);
            }
            // A namespace the catalog knows is not also a repository (it would be listed):
            // no need to ask.
            let under = format!("{path}/");
            if cat.iter().any(|r| r.starts_with(&under)) {
                return Ok(false);
            }
        }
        match self.tag_list(path).await {
            Ok(_) => {
                lock(&self.known_repos).insert(path.to_string());
                Ok(true)
            }
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// What a tag points at now (cached for the metadata TTL). With GET resolution the
    /// manifest comes along and is cached by digest (when it parses: one that does not is
    /// asked for again, and fails, where it is used, as with HEAD resolution).
    pub async fn resolve_tag(&self, repo: &str, tag: &str) -> FsResult<ManifestHead> {
        self.tag_targets
            .get_or_load((repo.to_string(), tag.to_string()), || async {
                let ctx = |e| FsError::registry(e, format!("{repo}:{tag}"));
                if !self.tag_by_get {
                    return self.reg.manifest_head(repo, tag).await.map_err(ctx);
                }
                let blob = self.reg.manifest(repo, tag).await.map_err(ctx)?;
                let head = ManifestHead {
                    digest: blob.digest.clone(),
                    media_type: blob.media_type.clone(),
                    size: blob.body.len() as u64,
                };
                if let Ok(parsed) = manifest::parse(&blob.media_type, &blob.body) {
                    self.store_manifest(repo, ManifestEntry { blob, parsed });
                }
                Ok(head)
            })
            .await
    }

    /// Keep a manifest (its digest is the blob's, already verified) and note what it names.
    fn store_manifest(&self, repo: &str, entry: ManifestEntry) {
        self.note_manifest(repo, &entry);
        lock(&self.manifests).put(Digest::from(&entry.blob.digest), entry);
    }

    /// Are manifest GETs free here (tags are resolved by GET)? Where they are not (Docker Hub
    /// counts every manifest GET as a pull), nothing fetches a manifest only to show a time.
    pub fn manifest_gets_are_free(&self) -> bool {
        self.tag_by_get
    }

    /// Is the manifest `digest` in memory (showing it needs no request)?
    pub fn has_manifest(&self, digest: &Digest) -> bool {
        lock(&self.manifests).lru.contains(digest)
    }

    /// The time recorded for `digest` (an image manifest or a config), if known: Some(None)
    /// for a config known to carry no usable time.
    pub fn known_time(&self, digest: &Digest) -> Option<Option<SystemTime>> {
        lock(&self.times).get(digest).copied()
    }

    /// Record the time of `digest` (content addressed, so it never changes).
    pub fn set_time(&self, digest: Digest, time: Option<SystemTime>) {
        lock(&self.times).put(digest, time);
    }

    /// A manifest by digest, parsed (cached: it is content addressed).
    pub async fn manifest(&self, repo: &str, digest: &Digest) -> FsResult<ManifestEntry> {
        let in_memory = || lock(&self.manifests).lru.get(digest).cloned();
        if let Some(m) = in_memory() {
            return Ok(m);
        }
        self.manifest_loads
            .run((repo.to_string(), digest.clone()), || async {
                if let Some(m) = in_memory() {
                    return Ok(m);
                }
                let ctx = format!("manifest {repo}@{digest}");
                let blob = self
                    .reg
                    .manifest(repo, digest)
                    .await
                    .map_err(|e| FsError::registry(e, &ctx))?;
                let parsed = manifest::parse(&blob.media_type, &blob.body)
                    .map_err(|e| FsError::registry(e, &ctx))?;
                let entry = ManifestEntry { blob, parsed };
                self.note_manifest(repo, &entry);
                lock(&self.manifests).put(digest.clone(), entry.clone());
                Ok(entry)
            })
            .await
    }

    /// Remember the digests a manifest mentions, for `blobs/sha256/`.
    fn note_manifest(&self, repo: &str, m: &ManifestEntry) {
        let mut seen = lock(&self.seen);
        let r = seen.entry(repo.to_string()).or_default();
        r.insert(
            crate::digest::digest_hex(&m.blob.digest).to_string(),
            FileNode {
                repo: repo.to_string(),
                content: Content::Manifest {
                    digest: Digest::from(&m.blob.digest),
                },
                size: m.blob.body.len() as u64,
                media_type: Some(m.blob.media_type.clone()),
            },
        );
        let descs: Vec<&Descriptor> = match &m.parsed {
            Parsed::Image { config, layers } => std::iter::once(config).chain(layers).collect(),
            Parsed::Index { manifests } => manifests.iter().collect(),
        };
        let is_manifest = matches!(m.parsed, Parsed::Index { .. });
        for d in descs {
            let digest = Digest::from(&d.digest);
            if !digest.is_sha256() || !is_sha256_hex(digest.hex()) {
                continue;
            }
            r.entry(digest.hex().to_string())
                .or_insert_with(|| FileNode {
                    repo: repo.to_string(),
                    content: if is_manifest {
                        Content::Manifest {
                            digest: digest.clone(),
                        }
                    } else {
                        Content::Blob {
                            digest: digest.clone(),
                        }
                    },
                    size: d.size,
                    media_type: Some(d.media_type.clone()).filter(|m| !m.is_empty()),
                });
        }
    }

    /// The image manifest shown at the level of `digest`: itself, or for an index the entry for
    /// the configured platform (None if the index has no such entry).
    pub async fn image_view(&self, repo: &str, digest: &Digest) -> FsResult<Option<ImageView>> {
        let m = self.manifest(repo, digest).await?;
        match m.parsed {
            Parsed::Image { config, .. } => Ok(Some(ImageView {
                digest: digest.clone(),
                config,
            })),
            Parsed::Index { manifests } => {
                let Some(d) = self.pick_platform(&manifests) else {
                    return Ok(None);
                };
                let child_digest = Digest::from(&d.digest);
                let child = self.manifest(repo, &child_digest).await?;
                match child.parsed {
                    Parsed::Image { config, .. } => Ok(Some(ImageView {
                        digest: child_digest,
                        config,
                    })),
                    Parsed::Index { .. } => Ok(None),
                }
            }
        }
    }

    /// The index entry for the configured platform: an exact variant match, else the first
    /// entry of that os/architecture.
    pub fn pick_platform<'a>(&self, manifests: &'a [Descriptor]) -> Option<&'a Descriptor> {
        let (os, arch, variant) = &self.platform;
        let mut best = None;
        for d in manifests.iter().filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| &p.os == os && &p.architecture == arch)
        }) {
            let v = d.platform.as_ref().and_then(|p| p.variant.as_ref());
            if variant.is_some() && v == variant.as_ref() {
                return Some(d);
            }
            best = best.or(Some(d));
        }
        best
    }

    /// What `blobs/sha256/<hex>` of `repo` is, if seen.
    pub fn seen_blob(&self, repo: &str, hex: &str) -> Option<FileNode> {
        lock(&self.seen).get(repo).and_then(|r| r.get(hex)).cloned()
    }

    /// Every digest seen in `repo`, by hex.
    pub fn seen_blobs(&self, repo: &str) -> Vec<(String, FileNode)> {
        lock(&self.seen)
            .get(repo)
            .map(|r| r.iter().map(|(h, f)| (h.clone(), f.clone())).collect())
            .unwrap_or_default()
    }

    /// Remember what a looked-up digest is.
    pub fn remember_blob(&self, repo: &str, file: FileNode) {
        if let Some(d) = file.digest() {
            let hex = d.hex().to_string();
            lock(&self.seen)
                .entry(repo.to_string())
                .or_default()
                .insert(hex, file);
        }
    }

    /// Repositories other than `repo` where `hex` was seen.
    pub fn repos_holding(&self, repo: &str, hex: &str) -> Vec<String> {
        lock(&self.seen)
            .iter()
            .filter(|(r, m)| r.as_str() != repo && m.contains_key(hex))
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Bring the cached metadata up to date with a write made through the mount.
    pub fn apply(&self, event: Event) {
        match event {
            Event::RepoCreated { repo } => {
                lock(&self.known_repos).insert(repo);
            }
            Event::BlobCommitted { repo, digest, size } => {
                self.remember_blob(
                    &repo,
                    FileNode {
                        repo: repo.clone(),
                        content: Content::Blob { digest },
                        size,
                        media_type: None,
                    },
                );
                lock(&self.known_repos).insert(repo);
            }
            Event::BlobDeleted { repo, digest } => {
                if let Some(r) = lock(&self.seen).get_mut(&repo) {
                    r.remove(digest.hex());
                }
            }
            Event::ManifestPushed { repo, tag, entry } => {
                self.tag_targets.insert(
                    (repo.clone(), tag),
                    ManifestHead {
                        digest: entry.blob.digest.clone(),
                        media_type: entry.blob.media_type.clone(),
                        size: entry.blob.body.len() as u64,
                    },
                );
                self.store_manifest(&repo, *entry);
                self.tag_lists.remove(&repo);
                self.catalog.remove(&());
                lock(&self.known_repos).insert(repo);
            }
            Event::TagDeleted { repo, tag } => {
                self.tag_targets.remove(&(repo.clone(), tag));
                self.tag_lists.remove(&repo);
            }
        }
    }
}

/// A pushed manifest as the cache keeps it.
pub(crate) fn pushed_manifest(
    digest: String,
    media_type: String,
    body: Bytes,
    parsed: Parsed,
) -> Box<ManifestEntry> {
    Box::new(ManifestEntry {
        blob: ManifestBlob {
            digest,
            media_type,
            body,
        },
        parsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::fake::FakeRegistry;
    use std::sync::atomic::Ordering::Relaxed;

    fn image(reg: &FakeRegistry, repo: &str, tag: &str) -> String {
        let config = reg.add_blob(repo, &b"{}"[..]);
        let layer = reg.add_blob(repo, &b"layer"[..]);
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": [{"mediaType": manifest::OCI_LAYER_TAR, "digest": layer, "size": 5}],
        });
        reg.add_manifest(repo, Some(tag), serde_json::to_vec(&body).unwrap())
    }

    fn meta(ttl: Duration) -> (Arc<FakeRegistry>, Meta) {
        let reg = Arc::new(FakeRegistry::new());
        let m = Meta::new(reg.clone(), ttl, ("linux".into(), "amd64".into(), None));
        (reg, m)
    }

    #[tokio::test]
    async fn listings_are_cached_for_the_ttl_only() {
        let (reg, m) = meta(Duration::from_millis(0));
        image(&reg, "a", "v1");
        m.tag_list("a").await.unwrap();
        m.tag_list("a").await.unwrap();
        assert_eq!(
            reg.stats().tag_pages.load(Relaxed),
            2,
            "a zero TTL caches nothing"
        );

        let (reg, m) = meta(Duration::from_secs(3600));
        image(&reg, "a", "v1");
        for _ in 0..3 {
            m.tag_list("a").await.unwrap();
            m.resolve_tag("a", "v1").await.unwrap();
            m.catalog().await.unwrap();
        }
        assert_eq!(reg.stats().tag_pages.load(Relaxed), 1);
        assert_eq!(reg.stats().manifest_heads.load(Relaxed), 1);
        assert_eq!(reg.stats().catalog_pages.load(Relaxed), 1);
        // A failed load stores nothing: the next call asks again.
        assert!(m.tag_list("nope").await.unwrap_err().is_not_found());
        assert!(m.tag_list("nope").await.is_err());
        assert_eq!(reg.stats().tag_pages.load(Relaxed), 3);
    }

    #[tokio::test]
    async fn manifests_are_cached_and_their_digests_seen() {
        let (reg, m) = meta(Duration::from_secs(3600));
        let d = Digest::from(image(&reg, "a", "v1"));
        m.manifest("a", &d).await.unwrap();
        m.manifest("a", &d).await.unwrap();
        assert_eq!(reg.stats().manifest_gets.load(Relaxed), 1);
        // The manifest, its config and its layer are listed under blobs/sha256/.
        assert_eq!(m.seen_blobs("a").len(), 3);
        assert!(m.seen_blob("a", d.hex()).is_some());
        assert_eq!(m.repos_holding("b", d.hex()), ["a"]);
        assert!(m.repos_holding("a", d.hex()).is_empty());
        let view = m.image_view("a", &d).await.unwrap().unwrap();
        assert_eq!(view.digest, d);
    }

    /// An image pushed under `tag` of `repo`: its digest, and the event `fs::promote` sends.
    async fn pushed(reg: &FakeRegistry, repo: &str, tag: &str) -> (String, Event) {
        let d = image(reg, repo, tag);
        let body = reg.manifest(repo, &d).await.map(|b| b.body).unwrap();
        let event = Event::ManifestPushed {
            repo: repo.into(),
            tag: tag.into(),
            entry: pushed_manifest(
                d.clone(),
                manifest::OCI_MANIFEST.into(),
                body.clone(),
                manifest::parse(manifest::OCI_MANIFEST, &body).unwrap(),
            ),
        };
        (d, event)
    }

    #[tokio::test]
    async fn a_push_is_not_hidden_by_a_listing_that_was_on_the_wire_before_it() {
        use crate::registry::faulty::{Fault, FaultyRegistry, Gate, Op};
        let reg = Arc::new(FakeRegistry::new());
        let faulty = Arc::new(FaultyRegistry::new(reg.clone()));
        let m = Arc::new(Meta::new(
            faulty.clone(),
            Duration::from_secs(3600),
            ("linux".into(), "amd64".into(), None),
        ));
        image(&reg, "a", "v1");
        let gate = Gate::new();
        faulty.inject(Op::Tags, Fault::Hold(gate.clone()));
        let before = {
            let m = m.clone();
            tokio::spawn(async move { m.tag_list("a").await.unwrap() })
        };
        gate.arrived().await;
        // v2 is pushed through the mount while that listing waits.
        m.apply(pushed(&reg, "a", "v2").await.1);
        // A listing asked now does not join the one from before the push: it gets its own
        // answer while that one is still held.
        let after = tokio::time::timeout(Duration::from_secs(10), m.tag_list("a"))
            .await
            .expect("a listing after the push waited for one from before it")
            .unwrap();
        assert_eq!(*after, ["v1", "v2"]);
        // Another client tags v3; then the old listing lands (it sees v3 too). Its answer came
        // from a request sent before the push, so it is not stored over the newer one.
        image(&reg, "a", "v3");
        gate.open();
        assert_eq!(*before.await.unwrap(), ["v1", "v2", "v3"]);
        assert_eq!(*m.tag_list("a").await.unwrap(), ["v1", "v2"]);
        assert_eq!(reg.stats().tag_pages.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn a_write_stops_only_its_own_keys_older_load_from_being_stored() {
        let map: Arc<TtlMap<u32, u32>> = Arc::new(TtlMap::new(Duration::from_secs(3600)));
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let load = |k: u32, wait: tokio::sync::oneshot::Receiver<()>| {
            let map = map.clone();
            tokio::spawn(async move {
                map.get_or_load(k, || async move {
                    let _ = wait.await;
                    Ok(10 + k)
                })
                .await
            })
        };
        let (go2, wait2) = tokio::sync::oneshot::channel::<()>();
        let one = load(1, wait);
        let two = load(2, wait2);
        tokio::task::yield_now().await;
        map.remove(&2); // a write through the mount to key 2 only
        let _ = (go.send(()), go2.send(()));
        assert_eq!(
            (one.await.unwrap().unwrap(), two.await.unwrap().unwrap()),
            (11, 12)
        );
        assert_eq!(
            map.fresh(&1),
            Some(11),
            "key 1 was not written: its load is kept"
        );
        assert_eq!(map.fresh(&2), None, "key 2's load started before the write");
    }

    #[tokio::test]
    async fn a_listing_that_joins_a_guess_without_the_whole_answer_loads_it_itself() {
        let map: Arc<TtlMap<u32, u32>> = Arc::new(TtlMap::new(Duration::from_secs(3600)));
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let guess = {
            let map = map.clone();
            tokio::spawn(async move {
                map.get_or_guess(1, || async move {
                    let _ = wait.await;
                    Ok(None)
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        let loads = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let whole = {
            let (map, loads) = (map.clone(), loads.clone());
            tokio::spawn(async move {
                map.get_or_load(1, || async move {
                    loads.fetch_add(1, Relaxed);
                    Ok(7)
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(loads.load(Relaxed), 0, "it waits for the guess on the wire");
        let _ = go.send(());
        assert_eq!(guess.await.unwrap().unwrap(), None);
        assert_eq!(whole.await.unwrap().unwrap(), 7);
        assert_eq!(loads.load(Relaxed), 1);
        assert_eq!(map.fresh(&1), Some(7));
    }

    #[tokio::test]
    async fn one_repository_failing_a_digest_says_nothing_about_another() {
        let (reg, m) = meta(Duration::from_secs(3600));
        reg.yield_in_requests();
        let d = Digest::from(image(&reg, "b", "v1"));
        let (a, b) = tokio::join!(m.manifest("a", &d), m.manifest("b", &d));
        assert!(a.err().is_some_and(|e| e.is_not_found()));
        assert_eq!(b.unwrap().blob.digest, d.to_string());
    }

    #[tokio::test]
    async fn events_update_what_the_ttls_would_hide() {
        let (reg, m) = meta(Duration::from_secs(3600));
        let d1 = image(&reg, "a", "v1");
        assert_eq!(m.resolve_tag("a", "v1").await.unwrap().digest, d1);
        assert_eq!(*m.tag_list("a").await.unwrap(), ["v1"]);
        assert!(!m.knows_repo("new"));
        m.apply(Event::RepoCreated { repo: "new".into() });
        assert!(m.knows_repo("new"));
        assert!(m.repo_names().await.unwrap().contains(&"new".to_string()));

        // A manifest pushed under v2: the tag resolves without a request, the tag list and
        // the catalog are asked again.
        let (d2, push) = pushed(&reg, "a", "v2").await;
        let heads = reg.stats().manifest_heads.load(Relaxed);
        m.apply(push);
        assert_eq!(m.resolve_tag("a", "v2").await.unwrap().digest, d2);
        assert_eq!(reg.stats().manifest_heads.load(Relaxed), heads);
        assert_eq!(*m.tag_list("a").await.unwrap(), ["v1", "v2"]);

        m.apply(Event::BlobCommitted {
            repo: "b".into(),
            digest: Digest::from("sha256:".to_string() + &"a".repeat(64)),
            size: 7,
        });
        assert_eq!(m.seen_blob("b", &"a".repeat(64)).unwrap().size, 7);
        assert!(m.knows_repo("b"));
        m.apply(Event::BlobDeleted {
            repo: "b".into(),
            digest: Digest::from("sha256:".to_string() + &"a".repeat(64)),
        });
        assert!(m.seen_blob("b", &"a".repeat(64)).is_none());

        // A deleted tag is asked again.
        m.apply(Event::TagDeleted {
            repo: "a".into(),
            tag: "v1".into(),
        });
        m.resolve_tag("a", "v1").await.unwrap();
        assert_eq!(reg.stats().manifest_heads.load(Relaxed), heads + 1);
    }

    #[test]
    fn platform_choice() {
        let (_, m) = meta(Duration::ZERO);
        let d = |os: &str, arch: &str, v: Option<&str>| -> Descriptor {
            serde_json::from_value(serde_json::json!({
                "mediaType": manifest::OCI_MANIFEST, "digest": format!("sha256:{os}{arch}{v:?}"), "size": 1,
                "platform": {"os": os, "architecture": arch, "variant": v},
            }))
            .unwrap()
        };
        let list = [
            d("linux", "arm64", None),
            d("linux", "amd64", Some("v2")),
            d("linux", "amd64", Some("v3")),
        ];
        assert_eq!(m.pick_platform(&list).unwrap().digest, list[1].digest);
        let (_, m3) = (
            0,
            Meta::new(
                Arc::new(FakeRegistry::new()),
                Duration::ZERO,
                ("linux".into(), "amd64".into(), Some("v3".into())),
            ),
        );
        assert_eq!(m3.pick_platform(&list).unwrap().digest, list[2].digest);
        assert!(m.pick_platform(&list[..1]).is_none());
    }
}
