//! The shape of the source tree, checked so it stays the way docs/ARCHITECTURE.md describes it:
//! no import cycle between the crate's top-level modules, no source file over 800 lines of code
//! (unit tests not counted), `fs/mod.rs` a facade under 400, and errno values named only in
//! `src/error.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// A file's code: everything before its unit tests, without comment lines.
fn code(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let end = text.find("#[cfg(test)]\nmod ").unwrap_or(text.len());
    text[..end]
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(str::to_string)
        .collect()
}

fn files() -> Vec<(String, PathBuf)> {
    let mut all = Vec::new();
    sources(&src(), &mut all);
    all.into_iter()
        .map(|p| {
            let rel = p.strip_prefix(src()).unwrap().to_string_lossy().to_string();
            (rel, p)
        })
        .collect()
}

#[test]
fn no_file_is_too_long() {
    for (rel, p) in files() {
        let text = std::fs::read_to_string(&p).unwrap();
        let end = text.find("#[cfg(test)]\nmod ").unwrap_or(text.len());
        let lines = text[..end].lines().count();
        let limit = if rel == "fs/mod.rs" { 400 } else { 800 };
        assert!(
            lines <= limit,
            "{rel}: {lines} lines of code (limit {limit})"
        );
    }
}

#[test]
fn top_level_modules_have_no_import_cycle() {
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, p) in files() {
        let top = rel
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        for line in code(&p) {
            for (i, _) in line.match_indices("crate::") {
                let name: String = line[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    deps.entry(top.clone()).or_default().insert(name);
                }
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        n: &str,
        deps: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if let Some(i) = path.iter().position(|p| p == n) {
            panic!("import cycle: {} -> {n}", path[i..].join(" -> "));
        }
        if !done.insert(n.to_string()) {
            return;
        }
        path.push(n.to_string());
        for d in deps.get(n).into_iter().flatten() {
            visit(d, deps, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for n in deps.keys() {
        visit(n, &deps, &mut Vec::new(), &mut done);
    }
}

#[test]
fn errnos_are_chosen_only_in_error_rs() {
    for (rel, p) in files() {
        if rel == "error.rs" {
            continue;
        }
        for (n, line) in code(&p).iter().enumerate() {
            let named = line.contains("libc::E") || line.contains("Errno::E");
            assert!(
                !named,
                "{rel}:{}: errno chosen outside error.rs: {line}",
                n + 1
            );
        }
    }
}
