//! Where credentials come from: the command line, docker's `config.json` (with `credHelpers` and
//! `credsStore` through the `docker-credential-*` protocol) and containers' `auth.json`.
//!
//! Lookup order, first match wins:
//! 1. `--username` with `REGFS_PASSWORD` or stdin (handled by the caller);
//! 2. `DOCKER_AUTH_CONFIG` (the JSON of a config file);
//! 3. `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`;
//! 4. `REGISTRY_AUTH_FILE`, then `$XDG_RUNTIME_DIR/containers/auth.json`, then
//!    `${XDG_CONFIG_HOME:-~/.config}/containers/auth.json`.
//!
//! Within one file: `credHelpers[host]`, then `credsStore`, then `auths`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde::Deserialize;

use super::auth::Credentials;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    auths: std::collections::HashMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: std::collections::HashMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// Strip a scheme and path from a config key: `https://index.docker.io/v1/` -> `index.docker.io`.
fn key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// The config-file paths to try, in order, from the environment.
pub fn config_paths() -> Vec<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let home = env("HOME");
    let mut paths = Vec::new();
    match env("DOCKER_CONFIG") {
        Some(d) => paths.push(d.join("config.json")),
        None => {
            if let Some(h) = &home {
                paths.push(h.join(".docker/config.json"));
            }
        }
    }
    if let Some(f) = env("REGISTRY_AUTH_FILE") {
        paths.push(f);
    }
    if let Some(d) = env("XDG_RUNTIME_DIR") {
        paths.push(d.join("containers/auth.json"));
    }
    match env("XDG_CONFIG_HOME") {
        Some(d) => paths.push(d.join("containers/auth.json")),
        None => {
            if let Some(h) = &home {
                paths.push(h.join(".config/containers/auth.json"));
            }
        }
    }
    paths
}

/// Find credentials for `host` (`host[:port]`) in the standard places.
pub fn lookup(host: &str) -> Option<Credentials> {
    if let Ok(json) = std::env::var("DOCKER_AUTH_CONFIG") {
        if let Some(c) = serde_json::from_str(&json)
            .ok()
            .and_then(|f| lookup_in(&f, host, "DOCKER_AUTH_CONFIG"))
        {
            return Some(c);
        }
    }
    for p in config_paths() {
        if let Some(c) = lookup_file(&p, host) {
            return Some(c);
        }
    }
    None
}

/// Look `host` up in one config file.
pub fn lookup_file(path: &Path, host: &str) -> Option<Credentials> {
    let text = std::fs::read_to_string(path).ok()?;
    let file: ConfigFile = match serde_json::from_str(&text) {
        Ok(f) => f,
        Err(e) => {
            log::warn!("ignoring credentials file {}: {e}", path.display());
            return None;
        }
    };
    lookup_in(&file, host, &path.display().to_string())
}

/// Parse a config file's text and look `host` up in its `auths` only (helpers are never run).
/// The fuzzing entry point (fuzz/harness.rs); not part of the API.
#[doc(hidden)]
pub fn lookup_text_no_helpers(text: &[u8], host: &str) -> Option<Credentials> {
    let mut file: ConfigFile = serde_json::from_slice(text).ok()?;
    file.cred_helpers.clear();
    file.creds_store = None;
    lookup_in(&file, host, "fuzz input")
}

fn lookup_in(file: &ConfigFile, host: &str, source: &str) -> Option<Credentials> {
    if let Some(helper) = file.cred_helpers.get(host) {
        return run_helper(helper, host);
    }
    if let Some(store) = file.creds_store.as_deref().filter(|s| !s.is_empty()) {
        if let Some(c) = run_helper(store, host) {
            return Some(c);
        }
    }
    let entry = file.auths.get(host).or_else(|| {
        file.auths
            .iter()
            .find(|(k, _)| key_host(k) == host)
            .map(|(_, v)| v)
    })?;
    let creds = decode_entry(entry);
    if creds.is_some() {
        log::debug!("using credentials for {host} from {source}");
    }
    creds
}

fn decode_entry(e: &AuthEntry) -> Option<Credentials> {
    if let Some(auth) = e.auth.as_deref().filter(|a| !a.is_empty()) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (u, p) = s.split_once(':')?;
        return Some(Credentials {
            username: u.to_string(),
            password: p.trim_end_matches('\0').to_string(),
        });
    }
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        return Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        });
    }
    if e.identitytoken.is_some() {
        log::warn!(
            "identity tokens (OAuth refresh tokens) in credential files are not supported yet"
        );
    }
    None
}

/// Run `docker-credential-<suffix> get` with the server as stdin.
fn run_helper(suffix: &str, host: &str) -> Option<Credentials> {
    run_helper_program(&format!("docker-credential-{suffix}"), host)
}

/// Run a credential helper program (name on PATH, or a path) with `get`.
fn run_helper_program(prog: &str, host: &str) -> Option<Credentials> {
    #[derive(Deserialize)]
    struct HelperOut {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let mut child = match Command::new(prog)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            log::warn!("credential helper {prog} could not run: {e}");
            return None;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(host.as_bytes());
    }
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        log::debug!("credential helper {prog} has no credentials for {host}");
        return None;
    }
    let parsed: HelperOut = match serde_json::from_slice(&out.stdout) {
        Ok(p) => p,
        Err(e) => {
            log::warn!("credential helper {prog} answered with bad JSON: {e}");
            return None;
        }
    };
    if parsed.username == "<token>" {
        log::warn!(
            "credential helper {prog} returned an identity token, which is not supported yet"
        );
        return None;
    }
    log::debug!("using credentials for {host} from {prog}");
    Some(Credentials {
        username: parsed.username,
        password: parsed.secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_auths_by_host_and_url_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:pa:ss");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths":{{"https://reg.example:5000/v1/":{{"auth":"{auth}"}},
                "other":{{"username":"u","password":"p"}}}}}}"#
            ),
        )
        .unwrap();
        let c = lookup_file(&p, "reg.example:5000").unwrap();
        assert_eq!(c.username, "bob");
        assert_eq!(c.password, "pa:ss");
        assert_eq!(lookup_file(&p, "other").unwrap().password, "p");
        assert!(lookup_file(&p, "nope").is_none());
    }

    #[test]
    fn runs_credential_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("docker-credential-regfstest");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread host\n[ \"$host\" = h.example ] || { echo 'credentials not found in native keychain'; exit 1; }\necho '{\"ServerURL\":\"h.example\",\"Username\":\"hu\",\"Secret\":\"hs\"}'\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = ConfigFile {
            cred_helpers: [("h.example".to_string(), "regfstest".to_string())].into(),
            ..Default::default()
        };
        let prog = helper.to_str().unwrap();
        let c = run_helper_program(prog, "h.example").unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("hu", "hs"));
        assert!(run_helper_program(prog, "x.example").is_none());
        assert!(lookup_in(&file, "unknown.example", "t").is_none());
    }
}
