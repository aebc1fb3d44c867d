//! Real tier: credentials never go to a mirror. The registry wants Basic auth (`--username`); a
//! mirror on another loopback address answers every request with a Basic challenge of its own.
//! regfs must read through the registry, and the mirror must never see an `Authorization`.

mod common;

use std::sync::Arc;

use common::*;
use regfs::digest::{digest_hex, sha256_digest};

const PASSWORD: &str = "mirror-must-not-see-this";

#[test]
fn a_mirror_never_gets_the_registrys_credentials() {
    let reg = TestRegistry::start_with(
        Auth::Basic {
            user: "alice".into(),
            password: PASSWORD.into(),
        },
        "",
    );
    let client = Arc::new(reg.client());
    let tar = make_tar(&[("f", &pseudo_random(100_000, 5))]);
    let img = rt().block_on(push_image(
        client.as_ref(),
        "priv/app",
        Some("v1"),
        "amd64",
        &[Layer::tar(&tar)],
    ));
    let (mport, mlog) = stub_on(
        "127.0.0.2",
        Arc::new(|_r: &Req| resp(401, "").h("WWW-Authenticate", "Basic realm=\"mirror\"")),
    );
    let m = TestMount::with_env(
        &reg.addr(),
        &[
            "--username",
            "alice",
            "--mirror",
            &format!("http://127.0.0.2:{mport}"),
        ],
        &[("REGFS_PASSWORD", PASSWORD)],
    );
    let (layer, _, _) = img.layers[0].clone();
    let data =
        std::fs::read(m.p(&format!("priv/app/blobs/sha256/{}", digest_hex(&layer)))).unwrap();
    assert_eq!(sha256_digest(&data), layer);
    let seen = mlog.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the mirror was asked first");
    for r in &seen {
        assert!(
            !r.headers.contains_key("authorization"),
            "{} {} carried credentials",
            r.method,
            r.path
        );
    }
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.p(".regfs/stats")).unwrap()).unwrap();
    assert_eq!(
        stats["sources"][0]["down"], true,
        "a 401 mirror is passed over"
    );
    assert!(!m.log_text().contains(PASSWORD));
}
