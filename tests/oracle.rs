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

#[path = "support/oracle_compare.rs"]
mod oracle_compare;
use oracle_compare::{compare, strip_accel};
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
