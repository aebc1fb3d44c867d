//! Metadata in parallel (issue 9) and real directory times (issue 11, scope 6), by counting
//! requests: listing `tags/` resolves tags concurrently within a bound, a tag resolves in one
//! request where a GET costs nothing extra (HEAD first on Docker Hub), what the kernel asks for
//! next is already fetched, and tag, platform and layer directories show the config's `created`,
//! the manifest's annotation, or the mount time. On the fake, and on a real `docker-registry`
//! (through the core and through a real mount).

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Parser;
use common::*;
use regfs::cli::Cli;
use regfs::config::Config;
use regfs::fs::{Fs, FsOptions, TAG_CONCURRENCY};
use regfs::registry::fake::FakeRegistry;
use regfs::registry::faulty::{Fault, FaultError, FaultyRegistry, Op};
use regfs::registry::{Registry, StatsSnapshot, TagResolution};

/// 2020-01-01T00:00:00Z.
const JAN_2020: u64 = 1_577_836_800;

fn core(reg: Arc<dyn Registry>, by_get: bool) -> Arc<Fs> {
    Fs::new(
        reg,
        FsOptions {
            resolve_tags_by_get: by_get,
            ..FsOptions::default()
        },
    )
}

fn snap(reg: &dyn Registry) -> StatsSnapshot {
    reg.stats().snapshot()
}

/// Requests of every kind that reach the registry when reading, in one number.
fn reads(s: &StatsSnapshot) -> u64 {
    s.catalog_pages + s.tag_pages + s.manifest_gets + s.manifest_heads + s.blob_heads + s.blob_gets
}

/// 20 tags `t00`..`t19` in `lots`, each its own image made on 2020-01-(i+1).
async fn twenty_tags(reg: &dyn Registry) {
    for i in 0..20u64 {
        let created = format!("2020-01-{:02}T00:00:00Z", i + 1);
        push_dated(
            reg,
            "lots",
            Some(&format!("t{i:02}")),
            Some(&created),
            None,
            i,
        )
        .await;
    }
}

/// Everything the kernel asks after listing `tags/`: each tag's entry, manifest.json,
/// config.json (both read whole), layers/ and its listing. Returns each tag's mtime.
async fn visit_every_tag(fs: &Fs) -> Vec<u64> {
    let mut times = Vec::new();
    for i in 0..20 {
        let tag = format!("lots/tags/t{i:02}");
        times.push(unix(lookup_path(fs, &tag).await.unwrap().attr.mtime));
        for file in ["manifest.json", "config.json"] {
            let e = lookup_path(fs, &format!("{tag}/{file}")).await.unwrap();
            let h = fs.open(e.attr.ino, false).await.unwrap();
            let got = fs.read(h.fh, 0, e.attr.size as u32).await.unwrap();
            assert_eq!(got.len() as u64, e.attr.size, "{tag}/{file}");
            fs.release(h.fh).await;
        }
        assert_eq!(list_path(fs, &format!("{tag}/layers")).await.len(), 2);
    }
    times
}

fn expected_times() -> Vec<u64> {
    (0..20).map(|i| JAN_2020 + i * 86_400).collect()
}

#[tokio::test]
async fn listing_twenty_tags_overlaps_requests_and_prefetches_what_comes_next() {
    for by_get in [true, false] {
        let mount_time = SystemTime::now();
        let reg = Arc::new(FakeRegistry::new());
        reg.yield_in_requests();
        twenty_tags(&*reg).await;
        let fs = core(reg.clone(), by_get);
        assert_eq!(list_path(&fs, "lots/tags").await.len(), 20);
        let s = snap(&*reg);
        assert!(
            s.max_requests_in_flight > 1,
            "get={by_get}: tags resolved one at a time: {s:?}"
        );
        assert!(
            s.max_requests_in_flight <= TAG_CONCURRENCY as u64,
            "get={by_get}: more than the bound in flight: {s:?}"
        );
        assert_eq!(s.tag_pages, 1);
        if !by_get {
            // Where a manifest GET is a pull (Docker Hub): one HEAD per tag, and no GET, no
            // config for a time. Tags show the mount time until their manifest is read for
            // their contents; the contents cost what they always did (a GET each).
            assert_eq!((s.manifest_gets, s.manifest_heads, s.blob_gets), (0, 20, 0));
            let times = visit_every_tag(&fs).await;
            assert!(times.iter().all(|&t| t >= unix(mount_time)), "{times:?}");
            let after = snap(&*reg);
            assert_eq!((after.manifest_gets, after.manifest_heads), (20, 20));
            continue;
        }
        // One GET per tag: the body came with the digest.
        assert_eq!((s.manifest_gets, s.manifest_heads), (20, 0), "{s:?}");
        assert_eq!(s.blob_gets, 20, "one config per tag, for its time: {s:?}");
        // What the kernel asks next (`ls -l tags/`, `ls tags/*/`, reading the documents) is
        // answered from memory.
        assert_eq!(visit_every_tag(&fs).await, expected_times());
        assert_eq!(reads(&snap(&*reg)), reads(&s), "lookups were not free");
    }
}

#[tokio::test]
async fn one_tag_resolves_in_one_request_and_its_files_are_ready() {
    let reg = Arc::new(FakeRegistry::new());
    twenty_tags(&*reg).await;
    let fs = core(reg.clone(), true);
    lookup_path(&fs, "lots/tags").await.unwrap();
    let before = snap(&*reg);
    let e = lookup_path(&fs, "lots/tags/t07").await.unwrap();
    assert_eq!(unix(e.attr.mtime), JAN_2020 + 7 * 86_400);
    let s = snap(&*reg);
    assert_eq!(s.manifest_gets - before.manifest_gets, 1, "one GET");
    assert_eq!(s.manifest_heads, before.manifest_heads, "no HEAD");
    assert_eq!(
        s.blob_gets - before.blob_gets,
        1,
        "the config, fetched once"
    );
    // manifest.json, config.json, layers/ and rootfs/ cost nothing more.
    for f in ["manifest.json", "config.json", "layers", "rootfs"] {
        lookup_path(&fs, &format!("lots/tags/t07/{f}"))
            .await
            .unwrap();
    }
    list_path(&fs, "lots/tags/t07/layers").await;
    assert_eq!(reads(&snap(&*reg)), reads(&s));
}

#[tokio::test]
async fn where_a_get_is_a_pull_no_manifest_is_fetched_for_a_time() {
    let reg = Arc::new(FakeRegistry::new());
    twenty_tags(&*reg).await;
    let t0 = SystemTime::now();
    let fs = core(reg.clone(), false);
    lookup_path(&fs, "lots/tags").await.unwrap();
    let before = snap(&*reg);
    let e = lookup_path(&fs, "lots/tags/t07").await.unwrap();
    assert!(unix(e.attr.mtime) >= unix(t0), "the mount time, for now");
    let s = snap(&*reg);
    assert_eq!(s.manifest_heads - before.manifest_heads, 1, "one HEAD");
    assert_eq!(
        (s.manifest_gets, s.blob_gets),
        (before.manifest_gets, before.blob_gets),
        "no GET"
    );
    // Reading the tag's contents fetches the manifest (as it always did: that is the pull the
    // user asked for); from then on the tag shows its time (its config is a blob: not a pull).
    lookup_path(&fs, "lots/tags/t07/manifest.json")
        .await
        .unwrap();
    assert_eq!(snap(&*reg).manifest_gets - before.manifest_gets, 1);
    let e = lookup_path(&fs, "lots/tags/t07").await.unwrap();
    assert_eq!(unix(e.attr.mtime), JAN_2020 + 7 * 86_400);
    let s = snap(&*reg);
    assert_eq!(s.manifest_gets - before.manifest_gets, 1, "no second GET");
    assert_eq!(s.blob_gets - before.blob_gets, 1, "the config");
}

#[tokio::test]
async fn directory_times_come_from_config_annotation_or_mount_time() {
    let reg = Arc::new(FakeRegistry::new());
    let r = &*reg as &dyn Registry;
    let ann = Some("2019-03-04T05:06:07+01:00");
    push_dated(
        r,
        "t/img",
        Some("both"),
        Some("2021-06-01T12:00:00Z"),
        ann,
        1,
    )
    .await;
    push_dated(r, "t/img", Some("ann"), None, ann, 2).await;
    push_dated(r, "t/img", Some("none"), None, None, 3).await;
    // Placeholders and hostile strings are no time.
    push_dated(
        r,
        "t/img",
        Some("epoch"),
        Some("1970-01-01T00:00:01Z"),
        None,
        4,
    )
    .await;
    let bad = Some("2021-02-30T00:00:00Z");
    push_dated(r, "t/img", Some("bad"), bad, Some("tomorrow"), 5).await;
    push_dated(
        r,
        "t/img",
        Some("far"),
        Some("99999-01-01T00:00:00Z"),
        None,
        6,
    )
    .await;
    // An index: its own annotation loses to the platform image's config.
    let child = push_dated(r, "t/img", None, Some("2022-02-02T02:02:02Z"), None, 7).await;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "annotations": {"org.opencontainers.image.created": "2018-01-01T00:00:00Z"},
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": child.manifest_digest, "size": child.manifest_len,
                       "platform": {"os": "linux", "architecture": "amd64"}}],
    });
    reg.add_manifest("t/img", Some("multi"), serde_json::to_vec(&index).unwrap());

    let t0 = SystemTime::now();
    let fs = core(reg.clone(), true);
    let t1 = SystemTime::now();
    let mtime = |p: String| {
        let fs = &fs;
        async move { unix(lookup_path(fs, &p).await.unwrap().attr.mtime) }
    };
    assert_eq!(mtime("t/img/tags/both".into()).await, 1_622_548_800);
    assert_eq!(mtime("t/img/tags/ann".into()).await, 1_551_672_367);
    for tag in ["none", "epoch", "bad", "far"] {
        let t = mtime(format!("t/img/tags/{tag}")).await;
        assert!((unix(t0)..=unix(t1)).contains(&t), "{tag}: {t}");
    }
    let c = 1_643_767_322;
    let layers = list_path(&fs, "t/img/tags/multi/layers").await;
    let tree = layers.iter().find(|n| !n.contains('.')).unwrap();
    for p in [
        "tags/multi".to_string(),
        "tags/multi/linux-amd64".into(),
        "tags/multi/layers".into(),
        "tags/multi/rootfs".into(),
        format!("tags/multi/layers/{tree}"),
        "tags/multi/linux-amd64/layers".into(),
    ] {
        assert_eq!(mtime(format!("t/img/{p}")).await, c, "{p}");
    }
    // getattr agrees with lookup.
    let e = lookup_path(&fs, "t/img/tags/both").await.unwrap();
    assert_eq!(
        unix(fs.getattr(e.attr.ino).await.unwrap().attr.mtime),
        1_622_548_800
    );
}

#[tokio::test]
async fn index_json_resolves_tags_concurrently_without_configs() {
    let reg = Arc::new(FakeRegistry::new());
    reg.yield_in_requests();
    twenty_tags(&*reg).await;
    let fs = core(reg.clone(), false);
    let e = lookup_path(&fs, "lots/index.json").await.unwrap();
    let s = snap(&*reg);
    assert!(s.max_requests_in_flight > 1, "{s:?}");
    assert!(s.max_requests_in_flight <= TAG_CONCURRENCY as u64, "{s:?}");
    assert_eq!(
        (s.manifest_heads, s.manifest_gets, s.blob_gets),
        (20, 0, 0),
        "{s:?}"
    );
    let h = fs.open(e.attr.ino, false).await.unwrap();
    let body = fs.read(h.fh, 0, e.attr.size as u32).await.unwrap();
    let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let names: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
        })
        .collect();
    let want: Vec<String> = (0..20).map(|i| format!("t{i:02}")).collect();
    assert_eq!(names, want, "in tag order");
}

#[tokio::test]
async fn a_time_that_cannot_be_fetched_shows_the_mount_time_until_a_later_lookup() {
    let fake = Arc::new(FakeRegistry::new());
    push_dated(
        &*fake,
        "f/img",
        Some("v1"),
        Some("2021-06-01T12:00:00Z"),
        None,
        1,
    )
    .await;
    let faults = Arc::new(FaultyRegistry::new(fake.clone()));
    let t0 = SystemTime::now();
    let fs = core(faults.clone(), true);
    let t1 = SystemTime::now();
    lookup_path(&fs, "f/img/tags").await.unwrap();
    faults.inject(Op::BlobRange, Fault::Error(FaultError::Server));
    let e = lookup_path(&fs, "f/img/tags/v1").await.unwrap();
    let t = unix(e.attr.mtime);
    assert!((unix(t0)..=unix(t1)).contains(&t), "the lookup works: {t}");
    assert_eq!(unix(fs.getattr(e.attr.ino).await.unwrap().attr.mtime), t);
    let e = lookup_path(&fs, "f/img/tags/v1").await.unwrap();
    assert_eq!(unix(e.attr.mtime), 1_622_548_800, "asked again, and found");
}

#[test]
fn docker_hub_resolves_head_first_unless_told_otherwise() {
    let get = |args: &[&str]| {
        let mut v = vec!["regfs"];
        v.extend_from_slice(args);
        let c = Config::try_from(Cli::try_parse_from(v).unwrap()).unwrap();
        FsOptions::from_config(&c).resolve_tags_by_get
    };
    assert!(!get(&["docker.io", "/mnt"]));
    assert!(!get(&["registry-1.docker.io", "/mnt"]));
    assert!(get(&["--tag-resolution", "get", "docker.io", "/mnt"]));
    assert!(get(&["localhost:5000", "/mnt"]));
    assert!(get(&["ghcr.io", "/mnt"]));
    assert!(!get(&["--tag-resolution", "head", "ghcr.io", "/mnt"]));
    assert!(Cli::try_parse_from(["regfs", "--tag-resolution", "both", "r", "/m"]).is_err());
}

#[test]
fn real_registry_tag_resolves_in_one_request_and_listing_overlaps() {
    let reg = TestRegistry::start();
    let client: Arc<dyn Registry> = Arc::new(reg.client());
    let rt = rt();
    rt.block_on(async {
        twenty_tags(&*client).await;
        // What `--tag-resolution auto` does for this registry.
        let fs = core(client.clone(), TagResolution::Auto.uses_get("127.0.0.1"));
        lookup_path(&fs, "lots/tags").await.unwrap();
        let before = snap(&*client);
        let e = lookup_path(&fs, "lots/tags/t03").await.unwrap();
        assert_eq!(unix(e.attr.mtime), JAN_2020 + 3 * 86_400);
        let s = snap(&*client);
        let manifest_requests =
            (s.manifest_gets + s.manifest_heads) - (before.manifest_gets + before.manifest_heads);
        assert_eq!(manifest_requests, 1, "one round trip resolves a tag: {s:?}");
        assert_eq!(
            s.blob_gets - before.blob_gets,
            1,
            "and the config is fetched"
        );

        assert_eq!(list_path(&fs, "lots/tags").await.len(), 20);
        let s = snap(&*client);
        assert!(s.max_requests_in_flight > 1, "{s:?}");
        // Bounded: 8 tags at once, each a manifest GET then its config. A config's request
        // counts as in flight until its body has ended, which is just after its reader woke
        // with the bytes (the engine streams), so a tag may overlap the one before by a hair.
        assert!(
            s.max_requests_in_flight <= 2 * TAG_CONCURRENCY as u64,
            "{s:?}"
        );
        assert_eq!(s.manifest_heads, 0);
        assert_eq!(visit_every_tag(&fs).await, expected_times());
        assert_eq!(
            reads(&snap(&*client)),
            reads(&s),
            "lookups after the listing are free"
        );
    });
}

#[test]
fn real_mount_shows_directory_times() {
    let reg = TestRegistry::start();
    let client = reg.client();
    rt().block_on(async {
        let ann = Some("2019-03-04T05:06:07Z");
        push_dated(
            &client,
            "m/img",
            Some("cfg"),
            Some("2021-06-01T12:00:00Z"),
            ann,
            1,
        )
        .await;
        push_dated(&client, "m/img", Some("ann"), None, ann, 2).await;
        push_dated(&client, "m/img", Some("none"), None, None, 3).await;
    });
    let t0 = SystemTime::now() - Duration::from_secs(1);
    let m = TestMount::new(&reg.addr(), &[]);
    let mtime = |p: &str| unix(std::fs::metadata(m.p(p)).unwrap().modified().unwrap());
    // `ls -l tags/`: a listing, then one stat per tag.
    assert_eq!(ls(&m.p("m/img/tags")), vec!["ann", "cfg", "none"]);
    let after_listing = m.stat("blob_gets");
    assert_eq!(
        after_listing, 3,
        "one config per tag, fetched by the listing"
    );
    assert_eq!(mtime("m/img/tags/cfg"), 1_622_548_800);
    assert_eq!(mtime("m/img/tags/ann"), 1_551_675_967);
    let none = mtime("m/img/tags/none");
    assert!(
        none >= unix(t0) && none <= unix(SystemTime::now()),
        "{none}"
    );
    assert_eq!(mtime("m/img/tags/cfg/layers"), 1_622_548_800);
    assert_eq!(mtime("m/img/tags/cfg/rootfs"), 1_622_548_800);
    assert_eq!(
        m.stat("blob_gets"),
        after_listing,
        "stats after the listing are free"
    );
    assert_eq!(
        m.stat("manifest_heads"),
        0,
        "127.0.0.1 resolves tags by GET"
    );
    assert_eq!(m.stat("manifest_gets"), 3, "one GET per tag, nothing more");
}

/// `n` repositories `walkNN`, 3 tags each, every image made on 2020-01-01.
async fn walk_repos(reg: &dyn Registry, n: u64) {
    for r in 0..n {
        for t in 0..3 {
            let tag = format!("t{t}");
            let repo = format!("walk{r:02}");
            let created = Some("2020-01-01T00:00:00Z");
            push_dated(reg, &repo, Some(&tag), created, None, r * 3 + t).await;
        }
    }
}

/// (queued, finished, dropped) repositories listed ahead of a walk, from `.regfs/stats`.
async fn walk_ahead(fs: &Fs) -> (u64, u64, u64) {
    let e = lookup_path(fs, ".regfs/stats").await.unwrap();
    let h = fs.open(e.attr.ino, false).await.unwrap();
    let body = fs.read(h.fh, 0, 1 << 20).await.unwrap();
    fs.release(h.fh).await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let n = |k: &str| v["walk_ahead"][k].as_u64().unwrap();
    (n("queued"), n("finished"), n("dropped"))
}

/// Wait (bounded) until every repository queued to be listed ahead is done with; their count.
async fn walked_ahead(fs: &Fs) -> u64 {
    for _ in 0..1000 {
        let (queued, finished, _) = walk_ahead(fs).await;
        if finished == queued {
            return queued;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("walk-ahead never finished: {:?}", walk_ahead(fs).await);
}

/// `ls walkNN/tags/*/`: the listing, then each tag's entry; every tag's time is the image's.
async fn ls_tags(fs: &Fs, r: u64) {
    let tags = list_path(fs, &format!("walk{r:02}/tags")).await;
    assert_eq!(tags, ["t0", "t1", "t2"]);
    for t in tags {
        let e = lookup_path(fs, &format!("walk{r:02}/tags/{t}"))
            .await
            .unwrap();
        assert_eq!(unix(e.attr.mtime), JAN_2020);
    }
}

/// One repository's listing: its tag list, a GET per tag, a config per tag.
const LISTING: u64 = 1 + 3 + 3;

#[tokio::test]
async fn a_walk_over_repositories_finds_the_next_ones_listed_ahead() {
    let reg = Arc::new(FakeRegistry::new());
    reg.yield_in_requests();
    walk_repos(&*reg, 12).await;
    let fs = core(reg.clone(), true);
    list_path(&fs, "").await;
    let base = reads(&snap(&*reg));
    let asked = || reads(&snap(&*reg)) - base;

    // One listing is no walk: nothing is asked about any other repository.
    ls_tags(&fs, 5).await;
    assert_eq!(walk_ahead(&fs).await.0, 0);
    assert_eq!(asked(), LISTING);

    // Two in catalog order are: the next four (WALK_START) are listed ahead, but walk05, fresh.
    ls_tags(&fs, 0).await;
    ls_tags(&fs, 1).await;
    assert_eq!(walked_ahead(&fs).await, 3);
    assert_eq!(asked(), 6 * LISTING);
    // The walk reaches them, so the window doubles to --walk-ahead (8), then goes on one
    // repository per step to the catalog's end.
    ls_tags(&fs, 2).await;
    assert_eq!(walked_ahead(&fs).await, 8);
    ls_tags(&fs, 3).await;
    assert_eq!(walked_ahead(&fs).await, 9);
    assert_eq!(asked(), 12 * LISTING, "every repository listed, once");
    for r in 4..12 {
        ls_tags(&fs, r).await;
    }
    assert_eq!(
        asked(),
        12 * LISTING,
        "the rest of the walk asked for nothing"
    );
    assert_eq!(walk_ahead(&fs).await, (9, 9, 0));

    // A jump back starts a new walk: nothing is queued.
    ls_tags(&fs, 0).await;
    assert_eq!(walk_ahead(&fs).await.0, 9);
}

#[tokio::test]
async fn walk_ahead_is_bounded_and_can_be_turned_off() {
    // Off: a walk lists only what it is asked to.
    let reg = Arc::new(FakeRegistry::new());
    walk_repos(&*reg, 4).await;
    let off = Fs::new(
        reg.clone(),
        FsOptions {
            walk_ahead: 0,
            ..FsOptions::default()
        },
    );
    for r in 0..4 {
        ls_tags(&off, r).await;
    }
    assert_eq!(walk_ahead(&off).await.0, 0);
    assert_eq!(snap(&*reg).tag_pages, 4);
    // So with `--metadata-ttl 0`: nothing listed ahead would be fresh when the walk got there.
    let uncached = Fs::new(
        reg.clone(),
        FsOptions {
            metadata_ttl: Duration::ZERO,
            ..FsOptions::default()
        },
    );
    for r in 0..4 {
        ls_tags(&uncached, r).await;
    }
    assert_eq!(walk_ahead(&uncached).await.0, 0);
    assert_eq!(snap(&*reg).tag_pages, 8);

    // A repository with more than 64 tags gets only its tag list fetched ahead.
    let reg = Arc::new(FakeRegistry::new());
    walk_repos(&*reg, 2).await;
    for t in 0..65 {
        push_dated(
            &*reg,
            "walk02",
            Some(&format!("m{t:02}")),
            None,
            None,
            100 + t,
        )
        .await;
    }
    let fs = core(reg.clone(), true);
    ls_tags(&fs, 0).await;
    ls_tags(&fs, 1).await;
    assert_eq!(walked_ahead(&fs).await, 1);
    let s = snap(&*reg);
    assert_eq!((s.tag_pages, s.manifest_gets), (3, 6), "{s:?}");

    // Every repository listed ahead together resolves at most 8 tags at once (what one
    // listing holds), beside the walker's own listing (8) and 4 tag lists.
    let reg = Arc::new(FakeRegistry::new());
    reg.yield_in_requests();
    for r in 0..12u64 {
        for t in 0..12 {
            let repo = format!("wide{r:02}");
            push_dated(
                &*reg,
                &repo,
                Some(&format!("t{t:02}")),
                None,
                None,
                r * 12 + t,
            )
            .await;
        }
    }
    let fs = core(reg.clone(), true);
    for r in 0..4 {
        list_path(&fs, &format!("wide{r:02}/tags")).await;
    }
    // wide02 to wide05 (wide02 and wide03 listed by the walk too: those listings shared the
    // requests), then wide06 to wide10, then wide11.
    assert_eq!(walked_ahead(&fs).await, 10);
    let s = snap(&*reg);
    assert_eq!(s.tag_pages, 12, "{s:?}");
    assert_eq!(s.manifest_gets, 12 * 12, "{s:?}");
    assert!(
        s.max_requests_in_flight <= (2 * TAG_CONCURRENCY + 4) as u64,
        "{s:?}"
    );
}

#[tokio::test]
async fn a_walk_that_ends_drops_what_it_had_queued() {
    let fake = Arc::new(FakeRegistry::new());
    walk_repos(&*fake, 16).await;
    let reg = Arc::new(FaultyRegistry::new(fake.clone()));
    let fs = core(reg.clone(), true);
    ls_tags(&fs, 0).await;
    // The four listed ahead first (walk02..walk05) hang on their tag lists, taking every turn.
    let gate = regfs::registry::faulty::Gate::new();
    for r in 2..6 {
        reg.inject_for(Op::Tags, &format!("walk{r:02}"), Fault::Hold(gate.clone()));
    }
    ls_tags(&fs, 1).await;
    gate.arrived().await;
    while reg.pending() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await; // all four are at the gate
    }
    // The walker reaches walk02 (its listing waits for the held one): the window doubles and
    // walk06..walk10 are queued behind the four.
    let walker = {
        let fs = fs.clone();
        tokio::spawn(async move { ls_tags(&fs, 2).await })
    };
    while walk_ahead(&fs).await.0 < 9 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A jump ends that walk: what it still had queued is dropped, never asked for.
    ls_tags(&fs, 14).await;
    gate.open();
    walker.await.unwrap();
    assert_eq!(walked_ahead(&fs).await, 9);
    assert_eq!(walk_ahead(&fs).await, (9, 9, 5));
    // Tag lists: walk00, walk01, walk02..05 (the walker's walk02 joined the held one), walk14.
    // The four that were running stop at their tag lists: their walk has ended, so they
    // resolve nothing; walk02's tags are the walker's own.
    let s = snap(&*fake);
    assert_eq!((s.tag_pages, s.manifest_gets), (7, 12), "{s:?}");
}

#[tokio::test]
async fn a_walk_stays_in_its_namespace() {
    let reg = Arc::new(FakeRegistry::new());
    let repos = [
        "team/a",
        "team/a/cache",
        "team/b",
        "team/c",
        "team/d",
        "zzz",
    ];
    for (i, repo) in repos.iter().enumerate() {
        push_dated(&*reg, repo, Some("t0"), None, None, i as u64).await;
    }
    let fs = core(reg.clone(), true);
    list_path(&fs, "team/a/tags").await;
    list_path(&fs, "team/b/tags").await;
    assert_eq!(walked_ahead(&fs).await, 2);
    let s = snap(&*reg);
    // team/c and team/d: not team/a/cache (between a and b in the catalog), nor zzz.
    assert_eq!(s.tag_pages, 4, "{s:?}");
    let before = reads(&s);
    list_path(&fs, "team/c/tags").await;
    list_path(&fs, "team/d/tags").await;
    assert_eq!(reads(&snap(&*reg)), before);
}

#[tokio::test]
async fn concurrent_listings_of_one_repository_share_their_requests() {
    let reg = Arc::new(FakeRegistry::new());
    reg.yield_in_requests();
    walk_repos(&*reg, 1).await;
    let fs = core(reg.clone(), false);
    lookup_path(&fs, "walk00/tags").await.unwrap();
    let before = snap(&*reg);
    let (a, b) = tokio::join!(list_path(&fs, "walk00/tags"), list_path(&fs, "walk00/tags"));
    assert_eq!(a, b);
    // HEAD resolution; then both read every manifest by digest, concurrently.
    let read = |t: &'static str| {
        let fs = fs.clone();
        async move {
            let e = lookup_path(&fs, &format!("walk00/tags/{t}/manifest.json"))
                .await
                .unwrap();
            let h = fs.open(e.attr.ino, false).await.unwrap();
            fs.read(h.fh, 0, e.attr.size as u32).await.unwrap()
        }
    };
    let (x, y) = tokio::join!(read("t1"), read("t1"));
    assert_eq!(x, y);
    let s = snap(&*reg);
    assert_eq!(
        (
            s.tag_pages - before.tag_pages,
            s.manifest_heads - before.manifest_heads,
            s.manifest_gets - before.manifest_gets,
        ),
        (1, 3, 1),
        "{s:?}"
    );
}

#[test]
fn a_shell_loop_over_repositories_on_a_real_mount_finds_them_listed_ahead() {
    let reg = TestRegistry::start();
    let client = reg.client();
    rt().block_on(walk_repos(&client, 6));
    let m = TestMount::new(&reg.addr(), &[]);
    // `for r in ...; do ls MNT/walk$r/tags/*/; done`, one repository at a time.
    let ls_tags = |r: u64| {
        let dirs = m.p(&format!("walk{r:02}/tags"));
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ls -d {}/*/ && ls {}/*/",
                dirs.display(),
                dirs.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let listed = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            listed.contains("/t2/") && listed.contains("manifest.json"),
            "{listed}"
        );
    };
    // Until every repository queued to be listed ahead is done with.
    let walked = || {
        for _ in 0..1000 {
            let w = &m.control_stats()["walk_ahead"];
            if w["queued"] == w["finished"] {
                return w["queued"].as_u64().unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("walk-ahead never finished: {}", m.control_stats());
    };
    let counts =
        || ["tag_pages", "manifest_gets", "manifest_heads", "blob_gets"].map(|k| m.stat(k));
    ls_tags(0);
    ls_tags(1);
    assert_eq!(walked(), 4);
    let before = counts();
    assert_eq!(
        before,
        [6, 18, 0, 18],
        "walk02 to walk05 listed ahead, by GET"
    );
    for r in 2..6 {
        ls_tags(r);
    }
    assert_eq!(counts(), before, "the rest of the walk asked for nothing");
}
