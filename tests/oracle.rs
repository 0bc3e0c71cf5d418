//! The oracle test: every machine QEMU 7.2 dumped in tests/data/oracle is
//! imported, printed by memtree and compared with QEMU's own output, modulo
//! block order and FlatView numbering (QEMU prints its top-level blocks in
//! hash order).
//!
//! For each machine (x86_64/*, variants/*, aarch64/*, and every snapshot
//! `NN-*` of dynamic/*): `.disabled.txt` is imported together with
//! `.flat.txt` (and `.owner.txt` where present), then memtree's `info mtree
//! -D`, `info mtree`, `info mtree -f` (and `-o`, `-f -o`) are compared with
//! `.disabled.txt`, `.mtree.txt`, `.flat.txt` (and `.owner.txt`,
//! `.flat-owner.txt`). Any difference fails the test, with a diff of the
//! first differing blocks.
//!
//! The ` KVM` accelerator suffix of `-kvm` machines' flat lines depends on
//! the host, not on rendering; memtree has no accelerator, so the suffix is
//! stripped from QEMU's side before comparing.
//!
//! The same machines are also imported *without* the flat dump (terminates
//! bit by rule, no readonly aliases, heuristic address-space order) and the
//! number of identical flat views is reported: that measures the importer's
//! heuristics and does not fail the test.
//!
//! `MEMTREE_ORACLE=DIR` points at another copy of the dumps;
//! `MEMTREE_ORACLE_VERBOSE=1` prints what the importer learned from each
//! flat dump and the flat-view diffs of the import without it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use memtree::qemu_text::import::import;
use memtree::qemu_text::parse::{parse_flat, parse_tree, parse_tree_strict};
use memtree::qemu_text::print::{print_flat, print_tree, FlatOptions, TreeOptions};

fn oracle_dir() -> PathBuf {
    match std::env::var_os("MEMTREE_ORACLE") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/oracle"),
    }
}

/// One dumped machine: the path prefix of its files (`.../pc-default`).
fn machines(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in ["x86_64", "variants", "aarch64"] {
        out.extend(prefixes(&dir.join(sub)));
    }
    let mut scenarios: Vec<PathBuf> = fs::read_dir(dir.join("dynamic"))
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    scenarios.sort();
    for s in scenarios.into_iter().filter(|p| p.is_dir()) {
        out.extend(prefixes(&s));
    }
    out
}

fn prefixes(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| {
                let p = e.ok()?.path();
                let name = p
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".disabled.txt")?
                    .to_owned();
                Some(dir.join(name))
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn read(prefix: &Path, suffix: &str) -> Option<String> {
    let mut p = prefix.as_os_str().to_owned();
    p.push(suffix);
    fs::read_to_string(PathBuf::from(p)).ok()
}

/// Canonical blocks of an `info mtree` dump (the Rust twin of canon.py):
/// blocks split at empty lines, `FlatView #N` renumbered `#?`, sorted
/// (address-space groups before `memory-region:` sections before the rest).
fn canon_blocks(text: &str) -> Vec<String> {
    let blocks: Vec<&str> = text
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .collect();
    if blocks.first().is_some_and(|b| b.starts_with("FlatView #")) {
        let mut out: Vec<String> = blocks
            .iter()
            .map(|b| {
                let rest = b["FlatView #".len()..].trim_start_matches(|c: char| c.is_ascii_digit());
                format!("FlatView #?{rest}")
            })
            .collect();
        out.sort();
        return out;
    }
    let mut groups: Vec<String> = Vec::new();
    let mut regions: Vec<String> = Vec::new();
    let mut other: Vec<String> = Vec::new();
    for b in blocks {
        if b.starts_with("address-space:") {
            groups.push(b.to_owned());
        } else if b.starts_with("memory-region:") {
            regions.push(b.to_owned());
        } else {
            other.push(b.to_owned());
        }
    }
    groups.sort();
    regions.sort();
    groups.extend(regions);
    groups.extend(other);
    groups
}

/// QEMU's flat lines of `-kvm` machines end in ` KVM` (once per address
/// space the accelerator registered the range for): strip it.
fn strip_accel(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (body, nl) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        let mut b = body;
        while let Some(s) = b.strip_suffix(" KVM") {
            b = s;
        }
        out.push_str(b);
        out.push_str(nl);
    }
    out
}

/// A line diff (LCS) of two blocks, `-` QEMU, `+` memtree.
fn diff_lines(theirs: &str, ours: &str) -> String {
    let a: Vec<&str> = theirs.lines().collect();
    let b: Vec<&str> = ours.lines().collect();
    if a.len() * b.len() > 4_000_000 {
        return format!(
            "(blocks too large to diff: {} vs {} lines)\n",
            a.len(),
            b.len()
        );
    }
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        }
    }
    out
}

/// Compares canonical forms; returns (identical blocks, total QEMU blocks,
/// whether the files are identical, diff of up to `max_diffs` differing
/// blocks).
fn compare(theirs: &str, ours: &str, max_diffs: usize) -> (usize, usize, bool, String) {
    let t = canon_blocks(theirs);
    let o = canon_blocks(ours);
    let mut pool: BTreeMap<&str, usize> = BTreeMap::new();
    for b in &o {
        *pool.entry(b.as_str()).or_default() += 1;
    }
    let mut same = 0;
    let mut missing: Vec<&str> = Vec::new();
    for b in &t {
        match pool.get_mut(b.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                same += 1;
            }
            _ => missing.push(b),
        }
    }
    let mut extra: Vec<&str> = Vec::new();
    for (b, n) in pool {
        for _ in 0..n {
            extra.push(b);
        }
    }
    let mut text = String::new();
    for (k, m) in missing.iter().enumerate().take(max_diffs) {
        // Pair with the extra block sharing the most lines.
        let best = extra
            .iter()
            .max_by_key(|e| e.lines().filter(|l| m.lines().any(|x| x == *l)).count())
            .copied()
            .unwrap_or("");
        text.push_str(&format!("--- QEMU block {k} / +++ memtree\n"));
        text.push_str(&diff_lines(m, best));
    }
    if missing.is_empty() && !extra.is_empty() {
        for e in extra.iter().take(max_diffs) {
            text.push_str("+++ memtree block QEMU does not have\n");
            text.push_str(&diff_lines("", e));
        }
    }
    let identical = missing.is_empty() && extra.is_empty();
    (same, t.len(), identical, text)
}

#[derive(Default)]
struct Tally {
    identical: usize,
    files: usize,
    blocks_same: usize,
    blocks: usize,
}

impl Tally {
    fn add(&mut self, same: usize, total: usize, ok: bool) {
        self.files += 1;
        self.identical += usize::from(ok);
        self.blocks_same += same;
        self.blocks += total;
    }
    fn line(&self, what: &str) -> String {
        format!(
            "{what:<26} {:>4}/{:<4} files identical, {:>5}/{:<5} blocks identical\n",
            self.identical, self.files, self.blocks_same, self.blocks
        )
    }
}

#[test]
fn oracle_every_qemu_dump_round_trips_through_memtree() {
    let dir = oracle_dir();
    let all = machines(&dir);
    assert!(
        all.len() >= 100,
        "expected the QEMU 7.2 oracle dumps under {} (found {} machines); set MEMTREE_ORACLE",
        dir.display(),
        all.len()
    );
    let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    for prefix in &all {
        let name = prefix
            .strip_prefix(&dir)
            .unwrap_or(prefix)
            .display()
            .to_string();
        let disabled = read(prefix, ".disabled.txt").unwrap_or_default();
        let flat_txt = read(prefix, ".flat.txt").unwrap_or_default();
        let mtree_txt = read(prefix, ".mtree.txt").unwrap_or_default();
        let owner_txt = read(prefix, ".owner.txt");
        let flat_owner_txt = read(prefix, ".flat-owner.txt");
        let tree =
            parse_tree_strict(&disabled).unwrap_or_else(|e| panic!("{name}.disabled.txt: {e}"));
        let flat = parse_flat(&flat_txt).unwrap_or_else(|e| panic!("{name}.flat.txt: {e}"));
        let owners = owner_txt
            .as_deref()
            .map(|t| parse_tree(t).unwrap_or_else(|e| panic!("{name}.owner.txt: {e}")));

        let imported = match import(&tree, Some(&flat), owners.as_ref()) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{name}: import failed: {e}"));
                continue;
            }
        };
        if std::env::var_os("MEMTREE_ORACLE_VERBOSE").is_some() {
            for f in &imported.learned {
                println!("LEARNED {name}: {f}");
            }
        }
        let mem = &imported.memory;
        let mut checks: Vec<(&str, String, String)> = Vec::new();
        let mut s = String::new();
        print_tree(
            mem,
            &mut s,
            TreeOptions {
                disabled: true,
                owners: false,
            },
        )
        .unwrap();
        checks.push(("disabled (info mtree -D)", disabled.clone(), s));
        let mut s = String::new();
        print_tree(mem, &mut s, TreeOptions::default()).unwrap();
        checks.push(("mtree (info mtree)", mtree_txt, s));
        let mut s = String::new();
        print_flat(mem, &mut s, FlatOptions::default()).unwrap();
        checks.push(("flat (info mtree -f)", strip_accel(&flat_txt), s));
        if let Some(t) = owner_txt {
            let mut s = String::new();
            print_tree(
                mem,
                &mut s,
                TreeOptions {
                    disabled: false,
                    owners: true,
                },
            )
            .unwrap();
            checks.push(("owner (info mtree -o)", t, s));
        }
        if let Some(t) = flat_owner_txt {
            let mut s = String::new();
            print_flat(mem, &mut s, FlatOptions { owners: true }).unwrap();
            checks.push(("flat-owner (-f -o)", strip_accel(&t), s));
        }
        for (what, theirs, ours) in checks {
            let (same, total, ok, diff) = compare(&theirs, &ours, 3);
            tallies.entry(what).or_default().add(same, total, ok);
            if !ok {
                failures.push(format!("{name} [{what}]:\n{diff}"));
            }
        }

        // Heuristic quality: no flat dump.
        let guess = match import(&tree, None, owners.as_ref()) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{name}: import without flat dump failed: {e}"));
                continue;
            }
        };
        let mut s = String::new();
        print_flat(&guess.memory, &mut s, FlatOptions::default()).unwrap();
        let (same, total, ok, d) = compare(&strip_accel(&flat_txt), &s, 2);
        if std::env::var_os("MEMTREE_ORACLE_VERBOSE").is_some() && !ok {
            println!("NOFLAT {name}:\n{d}");
        }
        tallies
            .entry("flat without -f dump")
            .or_default()
            .add(same, total, ok);
    }
    let mut summary = format!("oracle: {} machines from {}\n", all.len(), dir.display());
    for (what, t) in &tallies {
        summary.push_str(&t.line(what));
    }
    println!("{summary}");
    if !failures.is_empty() {
        let shown: Vec<&String> = failures.iter().take(6).collect();
        panic!(
            "{summary}\n{} comparison(s) differ; the first ones:\n\n{}",
            failures.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
