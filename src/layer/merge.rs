//! The merged root filesystem of an image: layers applied bottom to top, OCI whiteouts and
//! opaque directories honoured, eStargz bookkeeping files hidden.

use std::collections::{BTreeMap, HashMap};

use super::entry::{parent_of, EntryKind};
use super::index::LayerIndex;

/// Names a layer uses for whiteouts.
const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// eStargz bookkeeping files, hidden from the merged view.
const ESTARGZ_FILES: &[&str] = &[
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

/// The merged root filesystem: directory path ("" = root) -> child name ->
/// (layer index, entry index).
#[derive(Debug, Default)]
pub struct Merged {
    pub dirs: HashMap<String, BTreeMap<String, (usize, usize)>>,
}

fn remove_below(nodes: &mut BTreeMap<String, (usize, usize)>, dir: &str) {
    let prefix = format!("{dir}/");
    let doomed: Vec<String> = nodes
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, _)| k.clone())
        .collect();
    for k in doomed {
        nodes.remove(&k);
    }
}

/// Whether `path` can be shown in a merged tree at all: no component is a whiteout name and it
/// is not one of eStargz's bookkeeping files (both are hidden by [`Merged::build`]).
pub fn shown(path: &str) -> bool {
    !path.is_empty()
        && !path.split('/').any(|c| c.starts_with(WHITEOUT))
        && !ESTARGZ_FILES.contains(&path)
}

/// Whether `layer`, which has no entry at `path`, hides the entry `path` of the layers below
/// it, exactly as [`Merged::build`] applies a layer: a whiteout of `path` or of one of its
/// ancestors, an opaque marker in one of its ancestor directories (the root included), or a
/// non-directory at one of its ancestors. Costs one map lookup per path component.
pub fn hides(layer: &LayerIndex, path: &str) -> bool {
    let mut cur = path;
    loop {
        let (dir, name) = parent_of(cur);
        let join = |n: &str| {
            if dir.is_empty() {
                n.to_string()
            } else {
                format!("{dir}/{n}")
            }
        };
        if layer
            .by_path
            .contains_key(&join(&format!("{WHITEOUT}{name}")))
            || layer.by_path.contains_key(&join(OPAQUE))
        {
            return true;
        }
        if dir.is_empty() {
            return false;
        }
        if let Some(&i) = layer.by_path.get(dir) {
            if layer.entries[i].kind != EntryKind::Dir {
                return true;
            }
        }
        cur = dir;
    }
}

impl Merged {
    /// Apply `layers` bottom to top.
    pub fn build(layers: &[&LayerIndex]) -> Merged {
        // Path -> (layer index, entry index).
        let mut nodes: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (li, layer) in layers.iter().enumerate() {
            let mut live: Vec<(&String, &usize)> = layer.by_path.iter().collect();
            live.sort();
            // Opaque directories first, then whiteouts, then additions ("regardless of order").
            for (path, _) in &live {
                let (dir, name) = parent_of(path);
                if name == OPAQUE {
                    if dir.is_empty() {
                        nodes.clear();
                    } else {
                        remove_below(&mut nodes, dir);
                    }
                }
            }
            for (path, _) in &live {
                let (dir, name) = parent_of(path);
                if let Some(target) = name.strip_prefix(WHITEOUT) {
                    if name != OPAQUE && !target.is_empty() {
                        let victim = if dir.is_empty() {
                            target.to_string()
                        } else {
                            format!("{dir}/{target}")
                        };
                        nodes.remove(&victim);
                        remove_below(&mut nodes, &victim);
                    }
                }
            }
            for (path, &ei) in &live {
                let (_, name) = parent_of(path);
                if name.starts_with(WHITEOUT) {
                    continue;
                }
                let e = &layer.entries[ei];
                if let Some(&(pl, pe)) = nodes.get(path.as_str()) {
                    let was_dir = layers[pl].entries[pe].kind == EntryKind::Dir;
                    if was_dir && e.kind != EntryKind::Dir {
                        remove_below(&mut nodes, path);
                    }
                }
                // A file replaced by a directory's child: the parent becomes this layer's dir.
                let mut p = path.as_str();
                while let Some(i) = p.rfind('/') {
                    p = &p[..i];
                    if let Some(&(pl, pe)) = nodes.get(p) {
                        if layers[pl].entries[pe].kind != EntryKind::Dir {
                            if let Some(&pi) = layer.by_path.get(p) {
                                nodes.insert(p.to_string(), (li, pi));
                            }
                        }
                    }
                }
                nodes.insert((*path).clone(), (li, ei));
            }
        }
        for name in ESTARGZ_FILES {
            nodes.remove(*name);
        }
        let mut dirs: HashMap<String, BTreeMap<String, (usize, usize)>> = HashMap::new();
        dirs.insert(String::new(), BTreeMap::new());
        for (path, &(li, ei)) in &nodes {
            let (parent, name) = parent_of(path);
            dirs.entry(parent.to_string())
                .or_default()
                .insert(name.to_string(), (li, ei));
            if layers[li].entries[ei].kind == EntryKind::Dir {
                dirs.entry(path.clone()).or_default();
            }
        }
        Merged { dirs }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tar::tar_of;
    use super::*;

    use tar::EntryType::{Directory as D, Regular as F};

    /// Every path of the merged tree (what the removed `Merged.nodes` held), from `dirs`.
    fn nodes(m: &Merged) -> BTreeMap<String, (usize, usize)> {
        let mut all = BTreeMap::new();
        for (dir, children) in &m.dirs {
            for (name, &v) in children {
                let path = if dir.is_empty() {
                    name.clone()
                } else {
                    format!("{dir}/{name}")
                };
                all.insert(path, v);
            }
        }
        all
    }

    #[test]
    fn merges_with_whiteouts_and_opaque_dirs() {
        let l0 = tar_of(&[
            ("a/", D, b"", None),
            ("a/keep", F, b"1", None),
            ("a/gone", F, b"2", None),
            ("o/", D, b"", None),
            ("o/hidden", F, b"3", None),
            ("f", F, b"file", None),
            ("d/", D, b"", None),
            ("d/x", F, b"x", None),
        ]);
        let l1 = tar_of(&[
            ("a/.wh.gone", F, b"", None),
            ("o/.wh..wh..opq", F, b"", None),
            ("o/new", F, b"4", None),
            ("f/", D, b"", None),
            ("f/inside", F, b"5", None),
            ("d", F, b"now a file", None),
        ]);
        let (i0, i1) = (
            LayerIndex::build(&l0[..]).unwrap(),
            LayerIndex::build(&l1[..]).unwrap(),
        );
        let m = Merged::build(&[&i0, &i1]);
        let all = nodes(&m);
        let names: Vec<&String> = all.keys().collect();
        assert_eq!(
            names,
            vec!["a", "a/keep", "d", "f", "f/inside", "o", "o/new"]
        );
        assert!(!all.keys().any(|k| k.contains(".wh.")));
        assert_eq!(all["d"].0, 1);
        assert_eq!(m.dirs["o"].keys().collect::<Vec<_>>(), vec!["new"]);
    }

    /// `hides` agrees with `Merged::build` on every path of the lower layer: a path is in the
    /// merged tree from the lower layer exactly when the upper one neither has nor hides it.
    #[test]
    fn hides_agrees_with_the_merge() {
        let l0 = tar_of(&[
            ("a/keep", F, b"1", None),
            ("a/gone", F, b"2", None),
            ("a/sub/deep", F, b"2", None),
            ("w/x/y", F, b"2", None),
            ("o/hidden", F, b"3", None),
            ("o/sub/hidden", F, b"3", None),
            ("d/x", F, b"x", None),
            ("d/y/z", F, b"x", None),
            ("top", F, b"x", None),
            ("stargz.index.json", F, b"{}", None),
        ]);
        let l1 = tar_of(&[
            ("a/.wh.gone", F, b"", None),
            ("a/.wh.sub", F, b"", None),
            (".wh.w", F, b"", None),
            ("o/.wh..wh..opq", F, b"", None),
            ("d", F, b"now a file", None),
        ]);
        let (i0, i1) = (
            LayerIndex::build(&l0[..]).unwrap(),
            LayerIndex::build(&l1[..]).unwrap(),
        );
        let merged = nodes(&Merged::build(&[&i0, &i1]));
        for path in i0.by_path.keys() {
            let from_lower = merged.get(path).is_some_and(|&(l, _)| l == 0);
            let early = shown(path) && !i1.by_path.contains_key(path) && !hides(&i1, path);
            assert_eq!(early, from_lower, "{path}");
        }
        // An opaque root hides everything below.
        let l2 = tar_of(&[(".wh..wh..opq", F, b"", None)]);
        let i2 = LayerIndex::build(&l2[..]).unwrap();
        assert!(hides(&i2, "top") && hides(&i2, "a/keep"));
        assert!(!shown(".wh.x") && !shown("a/.wh.x/y") && !shown("stargz.index.json"));
        assert!(shown("a/stargz.index.json"));
    }

    #[test]
    fn hides_estargz_bookkeeping_and_whiteouts_at_the_root() {
        let l0 = tar_of(&[("gone", F, b"x", None), ("stays", F, b"y", None)]);
        let l1 = tar_of(&[
            (".wh.gone", F, b"", None),
            ("stargz.index.json", F, b"{}", None),
            (".prefetch.landmark", F, b"", None),
        ]);
        let (i0, i1) = (
            LayerIndex::build(&l0[..]).unwrap(),
            LayerIndex::build(&l1[..]).unwrap(),
        );
        let m = Merged::build(&[&i0, &i1]);
        assert_eq!(m.dirs[""].keys().collect::<Vec<_>>(), vec!["stays"]);
        assert_eq!(m.dirs.len(), 1);
    }
}
