//! No-panic property tests for the `info mtree` text parsers.
//!
//! Both parsers must return `Ok` or `Err` (never panic) on arbitrary text
//! and on real oracle dumps damaged by byte-level mutations.

use memtree::qemu_text::parse::{parse_flat, parse_tree, parse_tree_strict};
use proptest::prelude::*;
use std::sync::OnceLock;

/// The QEMU 7.2 dumps: `tests/data/oracle/` in the repository, or the
/// directory `MEMTREE_ORACLE` names (with a trailing `/`).
fn oracle_dir() -> String {
    match std::env::var("MEMTREE_ORACLE") {
        Ok(d) => format!("{}/", d.trim_end_matches('/')),
        Err(_) => concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/oracle/").to_owned(),
    }
}

/// A few oracle dumps covering every syntax feature (aliases, owners,
/// `[disabled]`, hidden levels, `@offset`, ` KVM`, `(none)` roots).
const SAMPLES: &[&str] = &[
    "x86_64/pc.mtree.txt",
    "x86_64/pc.disabled.txt",
    "x86_64/pc.owner.txt",
    "x86_64/pc.flat.txt",
    "variants/pc-kvm.flat-owner.txt",
    "variants/pc-nvdimm.owner.txt",
    "variants/q35-pcidevs.flat.txt",
    "aarch64/virt.disabled.txt",
];

fn sample_lines() -> &'static [Vec<String>] {
    static LINES: OnceLock<Vec<Vec<String>>> = OnceLock::new();
    LINES.get_or_init(|| {
        SAMPLES
            .iter()
            .map(|rel| {
                let path = format!("{}{rel}", oracle_dir());
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("reading {path}: {e}"));
                text.split('\n').map(str::to_string).collect()
            })
            .collect()
    })
}

fn check_no_panic(text: &str) {
    // The results do not matter, only that every call returns.
    let _ = parse_tree(text);
    let _ = parse_tree_strict(text);
    let _ = parse_flat(text);
}

/// One byte-level edit; positions are reduced modulo the current length.
#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize),
    Insert(usize, u8),
    Replace(usize, u8),
    /// Cut the line containing this byte position at that position.
    TruncateLine(usize),
    /// Add (`true`) or remove up to `n` leading spaces of line `idx`.
    Indent {
        line: usize,
        add: bool,
        n: usize,
    },
    DeleteLine(usize),
    DuplicateLine(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Bias inserted bytes towards characters that matter to the grammar.
    let byte = prop_oneof![
        3 => prop::sample::select(b" \n\r-@:{}[]()=,\"#0123456789abcdefABCDEF".to_vec()),
        1 => any::<u8>(),
    ];
    prop_oneof![
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), byte.clone()).prop_map(|(p, b)| Mutation::Insert(p, b)),
        (any::<usize>(), byte).prop_map(|(p, b)| Mutation::Replace(p, b)),
        any::<usize>().prop_map(Mutation::TruncateLine),
        (any::<usize>(), any::<bool>(), 1usize..4).prop_map(|(line, add, n)| Mutation::Indent {
            line,
            add,
            n
        }),
        any::<usize>().prop_map(Mutation::DeleteLine),
        any::<usize>().prop_map(Mutation::DuplicateLine),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match *m {
        Mutation::Delete(p) => {
            if len > 0 {
                bytes.remove(p % len);
            }
        }
        Mutation::Insert(p, b) => bytes.insert(p % (len + 1), b),
        Mutation::Replace(p, b) => {
            if len > 0 {
                bytes[p % len] = b;
            }
        }
        Mutation::TruncateLine(p) => {
            if len > 0 {
                let p = p % len;
                let end = bytes[p..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(len, |i| p + i);
                bytes.drain(p..end);
            }
        }
        Mutation::Indent { line, add, n } => {
            let mut lines: Vec<Vec<u8>> =
                bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
            let count = lines.len();
            let l = &mut lines[line % count];
            if add {
                for _ in 0..n {
                    l.insert(0, b' ');
                }
            } else {
                let spaces = l.iter().take_while(|&&b| b == b' ').count();
                l.drain(..n.min(spaces));
            }
            *bytes = lines.join(&b'\n');
        }
        Mutation::DeleteLine(i) | Mutation::DuplicateLine(i) => {
            let mut lines: Vec<Vec<u8>> =
                bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
            let i = i % lines.len();
            if matches!(m, Mutation::DeleteLine(_)) {
                lines.remove(i);
            } else {
                let copy = lines[i].clone();
                lines.insert(i, copy);
            }
            *bytes = lines.join(&b'\n');
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    /// (a) Arbitrary Unicode strings.
    #[test]
    fn arbitrary_strings_never_panic(text in any::<String>()) {
        check_no_panic(&text);
    }

    /// (a') Arbitrary strings over the grammar's own alphabet, which reach
    /// much deeper into the parsers than random Unicode.
    #[test]
    fn grammar_alphabet_strings_never_panic(
        text in "(address-space: |memory-region: |FlatView #| AS \"| Root memory region: |  |alias | @| owner:\\{| parent:\\{|dev id=|obj path=| orphan| \\[disabled\\]| KVM|\\(prio |, i/o\\): |[ 0-9a-f\\-\n@:{}()\\[\\]=,\"]){0,60}"
    ) {
        check_no_panic(&text);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    /// (b) Windows of real oracle dumps with random byte-level mutations.
    #[test]
    fn mutated_oracle_dumps_never_panic(
        file in any::<usize>(),
        start in any::<usize>(),
        len in 1usize..200,
        mutations in prop::collection::vec(mutation(), 0..10),
    ) {
        let files = sample_lines();
        let lines = &files[file % files.len()];
        let start = start % lines.len();
        let end = lines.len().min(start + len);
        let mut bytes = lines[start..end].join("\n").into_bytes();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let text = String::from_utf8_lossy(&bytes);
        check_no_panic(&text);
        // Also feed the damaged window with CRLF line endings.
        check_no_panic(&text.replace('\n', "\r\n"));
    }
}

#[test]
fn unmutated_samples_parse() {
    for (rel, lines) in SAMPLES.iter().zip(sample_lines()) {
        let text = lines.join("\n");
        let ok = if rel.contains(".flat") {
            parse_flat(&text).is_ok()
        } else {
            parse_tree(&text).is_ok()
        };
        assert!(ok, "{rel} should parse");
    }
}
