//! The crate's modules import each other without a loop: a module may use the ones below it
//! (codec → errors → negotiation → the IKE SA's shared parts → the two handshakes → the
//! endpoint), never one that uses it back. Read from the sources: every `crate::`, `super::`
//! and `self::` path outside `#[cfg(test)]` code and comments, resolved to the longest module
//! (file) it names. A module and its own submodules are one room: what a parent takes from
//! its children (a re-export, a helper) is not an edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`sa::rekey`; the crate root is "") → its source, tests and comments cut.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let mut p = prefix.to_vec();
                if name != "mod" && name != "lib" {
                    p.push(name);
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                let code: String = code
                    .lines()
                    .map(|l| l.split("//").next().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n");
                out.insert(p.join("::"), code);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &[], &mut out);
    out
}

/// The paths a `crate::`/`super::`/`self::` reference names, made absolute: one per item of a
/// `{...}` group.
fn references(module: &str, code: &str) -> Vec<String> {
    let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    for (base, prefix) in [
        ("crate::", String::new()),
        ("super::", parent.to_owned()),
        ("self::", module.to_owned()),
    ] {
        for (at, _) in code.match_indices(base) {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let rest = &code[at + base.len()..];
            let path: String = rest.chars().take_while(|c| ident(*c)).collect();
            let path = path.trim_end_matches(':').to_owned();
            let join = |p: &str| {
                [prefix.as_str(), p]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join("::")
            };
            let after = &rest[path.len()..];
            let group = after.trim_start_matches(':').strip_prefix('{');
            match group {
                Some(g) if after.starts_with("::{") || after.starts_with('{') => {
                    for item in g.split('}').next().unwrap_or_default().split(',') {
                        let item = item.trim().split([' ', ':']).next().unwrap_or_default();
                        if !item.is_empty() {
                            let p = if path.is_empty() {
                                item.to_owned()
                            } else {
                                format!("{path}::{item}")
                            };
                            out.push(join(&p));
                        }
                    }
                }
                _ => out.push(join(&path)),
            }
        }
    }
    out
}

#[test]
fn modules_import_each_other_without_a_loop() {
    let modules = modules();
    let resolve = |path: &str| -> Option<String> {
        let segs: Vec<&str> = path.split("::").collect();
        (1..=segs.len())
            .rev()
            .map(|n| segs[..n].join("::"))
            .find(|c| modules.contains_key(c))
    };
    let edges: BTreeMap<&str, BTreeSet<String>> = modules
        .iter()
        .map(|(m, code)| {
            let to = references(m, code)
                .iter()
                .filter_map(|p| resolve(p))
                .filter(|t| t != m && !t.is_empty() && !t.starts_with(&format!("{m}::")))
                .collect();
            (m.as_str(), to)
        })
        .collect();
    assert!(
        edges["responder"].contains("sa") && edges["initiator"].contains("sa"),
        "the graph was read: {edges:?}"
    );
    let mut loops = Vec::new();
    for (from, tos) in &edges {
        for to in tos {
            // Is there a way back from `to` to `from`?
            let mut seen = BTreeSet::new();
            let mut stack = vec![vec![from.to_string(), to.clone()]];
            while let Some(path) = stack.pop() {
                let last = path.last().unwrap().clone();
                if last == *from {
                    loops.push(path.join(" -> "));
                    break;
                }
                if !seen.insert(last.clone()) {
                    continue;
                }
                for next in edges.get(last.as_str()).into_iter().flatten() {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push(p);
                }
            }
        }
    }
    assert!(loops.is_empty(), "import loops:\n{}", loops.join("\n"));
}
