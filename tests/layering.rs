//! The folder layering of `src/` that ARCHITECTURE.md describes, enforced.
//!
//! Every `crate::…` path in the library's code (tests modules and comments
//! left out) is mapped to the top-level folder (or single-file module) it
//! names, root re-exports such as `crate::Machine` included. An edge between
//! two folders must go downwards in [`LAYERS`], or be one of the
//! [`KNOWN_BACK_EDGES`]: the import circles left to break, listed so that
//! none can be added silently. The list is exact: when a circle is broken,
//! the test asks for its entry to be removed, so it only shrinks.
//!
//! Reads only files of this repository (`src/`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// From the bottom up; a folder may use the folders of lower layers.
/// Folders in one layer do not use each other unless listed in
/// [`SAME_LAYER`].
const LAYERS: &[&[&str]] = &[
    // Records of who holds what, foreign panics, deferred drops; nothing
    // below them.
    &["lifecycle"],
    // Host memory: RAM blocks, backends, the mapping table, dirty bitmaps.
    &["host"],
    // The data plane's shared objects: ids, region and owner cores, device
    // ops and transaction attributes.
    &["region"],
    // The immutable published views.
    &["view"],
    // The access path: dispatch, the AddressSpace handle, IOMMU translation.
    &["access"],
    // DMA mappings and caches.
    &["dma"],
    // Rendering views from the tree, listener diffs.
    &["render"],
    // Control plane: the tree, its edits, transactions, dirty-log control.
    &["topology"],
    // Users of the whole core.
    &["qemu_text", "migration", "scale", "integrations"],
    &["inspect"],
];

/// Same-layer edges that are allowed.
const SAME_LAYER: &[(&str, &str)] = &[];

/// Upward edges that exist today: the import circles still to break. Each is
/// (from, to, why). Empty since issue 13's layout step: keep it so.
const KNOWN_BACK_EDGES: &[(&str, &str, &str)] = &[];

fn layer_of(folder: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&folder))
        .unwrap_or_else(|| panic!("src/{folder} is in no layer of tests/layering.rs"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level folder (or single-file module) a path under src/ is in.
fn folder_of(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_str()
        .unwrap();
    first.trim_end_matches(".rs").to_owned()
}

/// The library's code without `#[cfg(test)]` modules and comments.
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(") && t.contains("test") && !t.contains("not(test") {
            if let Some(next) = lines.peek() {
                if next.trim_start().starts_with("mod ") {
                    // Skip to the end of the module: its closing brace at the
                    // indentation of its `mod` line.
                    let indent = next.len() - next.trim_start().len();
                    let close = format!("{}}}", " ".repeat(indent));
                    for l in lines.by_ref() {
                        if l == close {
                            break;
                        }
                    }
                    continue;
                }
            }
        }
        if t.starts_with("//") {
            continue;
        }
        let line = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        code.push_str(line);
        code.push('\n');
    }
    code
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The first path segments after every `crate::` (each name of a
/// `crate::{…}` group too).
fn crate_paths(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        if i > 0 && code[..i].ends_with(|c: char| is_ident(c) || c == '$') {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            let mut word = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if depth == 1 && is_ident(c) {
                    word.push(c);
                    continue;
                }
                if item_start && !word.is_empty() {
                    names.push(std::mem::take(&mut word));
                    item_start = false;
                }
                word.clear();
                if depth == 1 && c == ',' {
                    item_start = true;
                }
            }
            if item_start && !word.is_empty() {
                names.push(word);
            }
        } else {
            let name: String = rest.chars().take_while(|&c| is_ident(c)).collect();
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names
}

/// Root re-exports (`pub use folder::…::{A, B};` in lib.rs): name -> folder.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let code = code_of(lib);
    for stmt in code.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let folder: String = rest.chars().take_while(|&c| is_ident(c)).collect();
        let names = match rest.find('{') {
            Some(i) => rest[i + 1..].trim_end_matches('}').to_owned(),
            None => rest.rsplit("::").next().unwrap().to_owned(),
        };
        for name in names.split(',') {
            let name = name.trim();
            if !name.is_empty() {
                map.insert(name.to_owned(), folder.clone());
            }
        }
    }
    map
}

#[test]
fn layering_of_src_folders_follows_architecture_md() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let reexports = root_reexports(&lib);
    let folders: BTreeSet<String> = files
        .iter()
        .map(|f| folder_of(f.strip_prefix(&src).unwrap()))
        .filter(|f| f != "lib")
        .collect();
    for f in &folders {
        layer_of(f);
    }

    let mut edges: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let from = folder_of(rel);
        if from == "lib" {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for name in crate_paths(&code) {
            let to = if folders.contains(&name) {
                name
            } else if let Some(folder) = reexports.get(&name) {
                folder.clone()
            } else {
                continue; // `vm_memory` and other re-exported crates
            };
            if to != from {
                edges
                    .entry((from.clone(), to))
                    .or_default()
                    .insert(rel.display().to_string());
            }
        }
    }

    let mut errors = Vec::new();
    let mut back_edges_seen = BTreeSet::new();
    for ((from, to), files) in &edges {
        let (lf, lt) = (layer_of(from), layer_of(to));
        let allowed = lt < lf || SAME_LAYER.contains(&(from.as_str(), to.as_str()));
        if allowed {
            continue;
        }
        if KNOWN_BACK_EDGES
            .iter()
            .any(|(f, t, _)| f == from && t == to)
        {
            back_edges_seen.insert((from.clone(), to.clone()));
            continue;
        }
        errors.push(format!(
            "src/{from} uses src/{to}, which is not below it in the layering ({files:?})"
        ));
    }
    for (from, to, why) in KNOWN_BACK_EDGES {
        if !back_edges_seen.contains(&(from.to_string(), to.to_string())) {
            errors.push(format!(
                "the back-edge {from} -> {to} ({why}) is gone: remove it from KNOWN_BACK_EDGES"
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "layering violations:\n{}",
        errors.join("\n")
    );
}

#[test]
fn layering_parser_sees_grouped_and_reexported_paths() {
    let code = code_of(
        "use crate::{Machine, dirty::X, access::{a, b}};\n\
         // crate::render in a comment\n\
         fn f() { crate::topology::owner::catch(); }\n\
         #[cfg(test)]\nmod tests {\n    use crate::inspect;\n}\n",
    );
    assert_eq!(
        crate_paths(&code),
        ["Machine", "dirty", "access", "topology"].map(String::from)
    );
    let map = root_reexports("pub use topology::memory::{Machine, Memory};\npub use dirty::X;\n");
    assert_eq!(map["Machine"], "topology");
    assert_eq!(map["X"], "dirty");
}
