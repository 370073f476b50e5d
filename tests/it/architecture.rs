//! The shape of `src/`, checked from its text: `src/lib.rs`'s map names every module it
//! declares, and no two modules import each other through a cycle (a module and its own
//! ancestors or descendants do not count: a parent declaring its children and a child using
//! `super::` is the idiom, not a cycle).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_map_in_lib_rs_names_every_module() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let map: String = lib
        .lines()
        .filter(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("pub(crate) mod "))
                .or_else(|| l.strip_prefix("mod "))?;
            rest.strip_suffix(';')
        })
        .collect();
    assert!(declared.len() > 10, "{declared:?}");
    for m in declared {
        assert!(
            map.contains(&format!("[`{m}`]")) || map.contains(&format!("`{m}`")),
            "src/lib.rs declares `{m}` but its map does not mention it"
        );
    }
}

/// Module path (`tls::store`) of every file under `src/` (not `main.rs`).
fn modules() -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src()).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|l| l == "mod") {
                parts.pop();
            }
            if parts == ["main"] || parts == ["lib"] {
                continue;
            }
            out.insert(parts.join("::"), p);
        }
    }
    out
}

/// The modules `text` (the file of module `this`) refers to with `crate::a::b…`,
/// `super::…` (`super::super::…`) and `self::…`, each resolved to the longest module path
/// that exists. Paths inside `a::{b, c::d}` groups count too.
fn references(this: &str, text: &str, modules: &BTreeMap<String, PathBuf>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let this: Vec<&str> = this.split("::").collect();
    let mut add = |base: &[&str], path: &str| {
        let mut segments: Vec<&str> = base.to_vec();
        segments.extend(path.split("::").map(str::trim).filter(|s| !s.is_empty()));
        for n in (1..=segments.len()).rev() {
            let candidate = segments[..n].join("::");
            if modules.contains_key(&candidate) {
                out.insert(candidate);
                break;
            }
        }
    };
    for (i, _) in text
        .match_indices("crate::")
        .chain(text.match_indices("super::"))
        .chain(text.match_indices("self::"))
    {
        // Only where a path starts (not `foo::super::`, not `mycrate::`).
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut rest = &text[i..];
        let base: Vec<&str> = if let Some(r) = rest.strip_prefix("crate::") {
            rest = r;
            Vec::new()
        } else if rest.starts_with("self::") {
            rest = &rest["self::".len()..];
            this.clone()
        } else {
            // The file's module is `this`; each `super` goes one level up.
            let mut up = 0;
            while let Some(r) = rest.strip_prefix("super::") {
                rest = r;
                up += 1;
            }
            this[..this.len().saturating_sub(up)].to_vec()
        };
        let path: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        add(&base, &path);
        // `use …::{a, b::c}` groups.
        let after = &rest[path.len()..];
        if let Some(inner) = after.strip_prefix('{') {
            let group: String = inner.chars().take_while(|c| *c != '}').collect();
            for item in group.split(',') {
                let mut full = path.clone();
                full.push_str(item.trim().split(" as ").next().unwrap_or_default());
                add(&base, &full);
            }
        }
    }
    out
}

fn related(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"))
}

#[test]
fn no_import_cycle_between_modules() {
    let modules = modules();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, path) in &modules {
        let text = std::fs::read_to_string(path).unwrap();
        let targets = references(m, &text, &modules)
            .into_iter()
            .filter(|t| !related(m, t))
            .collect();
        edges.insert(m.clone(), targets);
    }
    // Depth-first search for a back edge; reports the cycle it closes.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_owned(), 1);
        stack.push(m.to_owned());
        for t in edges.get(m).into_iter().flatten() {
            match state.get(t).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|s| s == t).unwrap();
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(t.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(t, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in edges.keys() {
        if state.get(m).copied().unwrap_or(0) == 0
            && let Some(cycle) = visit(m, &edges, &mut state, &mut Vec::new())
        {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
    // The metrics registry is a leaf.
    assert!(
        edges["metrics"].is_empty(),
        "metrics imports {:?}",
        edges["metrics"]
    );
}
