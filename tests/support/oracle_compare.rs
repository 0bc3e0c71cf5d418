//! Comparing memtree's prints with QEMU's dumps, modulo what QEMU leaves
//! to chance: top-level block order and FlatView numbering. Shared by the
//! tests that compare with tests/data/oracle.

#![allow(dead_code)]

use std::collections::BTreeMap;

/// Canonical blocks of an `info mtree` dump (the Rust twin of canon.py):
/// blocks split at empty lines, `FlatView #N` renumbered `#?`, sorted
/// (address-space groups before `memory-region:` sections before the rest).
pub fn canon_blocks(text: &str) -> Vec<String> {
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
pub fn strip_accel(text: &str) -> String {
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
pub fn diff_lines(theirs: &str, ours: &str) -> String {
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
pub fn compare(theirs: &str, ours: &str, max_diffs: usize) -> (usize, usize, bool, String) {
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
