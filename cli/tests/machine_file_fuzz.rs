//! The TOML machine-file loader never panics, whatever it is given: random
//! text, mutated example files, and random (often inconsistent) machine
//! descriptions. Whenever it accepts a machine, the machine renders and its
//! lookups agree with the rendered flat views.

use memtree::inspect::lookup::explain;
use memtree_cli::machine_file::{load_str, LoadOptions};
use proptest::prelude::*;

const EXAMPLES: &[&str] = &[
    include_str!("../examples/minimal.toml"),
    include_str!("../examples/pc-like.toml"),
    include_str!("../examples/all-kinds.toml"),
];

/// Snippets that exercise the loader's own checks when spliced in.
const SNIPPETS: &[&str] = &[
    "[[region]]\n",
    "[[device]]\n",
    "[[address-space]]\n",
    "name = \"x\"\n",
    "kind = \"alias\"\n",
    "kind = \"ram\"\n",
    "kind = \"io-root\"\n",
    "target = \"system\"\n",
    "target = \"x\"\n",
    "parent = \"x\"\n",
    "parent = \"system\"\n",
    "size = \"2^64\"\n",
    "size = \"2^65\"\n",
    "size = -1\n",
    "size = \"0x1_0000_0000_0000_0000\"\n",
    "size = \"9999999999999999999999999999999999999999\"\n",
    "offset = \"0xffff_ffff_ffff_ffff\"\n",
    "priority = 99999999999\n",
    "enabled = false\n",
    "ops = { read = \"0xff\", valid = { min = 3 } }\n",
    "alias-offset = \"2^64\"\n",
    "root = \"x\"\n",
    "owner = \"nobody\"\n",
    "\"",
    "=",
    "]",
    "\u{0}",
    "é",
];

/// Every error names a line inside the file (or just past its end).
fn check(src: &str) {
    match load_str(src, LoadOptions::default()) {
        Ok(m) => {
            for &space in &m.spaces {
                let view = m.memory.address_space(space).unwrap().view();
                let probes = view
                    .ranges()
                    .iter()
                    .take(4)
                    .flat_map(|r| [r.start(), r.last()])
                    .chain([0, u64::MAX]);
                for a in probes {
                    let why = explain(&m.memory, space, a).unwrap();
                    let expected = view
                        .lookup(a)
                        .map(|r| (r.region().id(), r.offset_in_region() + (a - r.start())));
                    assert_eq!(why.verdict.map(|v| (v.region, v.offset)), expected);
                }
            }
        }
        Err(e) => {
            let lines = src.lines().count().max(1);
            assert!(
                e.line >= 1 && e.line <= lines + 1,
                "line {} of {lines}: {e}",
                e.line
            );
            assert!(!e.message.is_empty());
        }
    }
}

fn mutated() -> impl Strategy<Value = String> {
    (
        0..EXAMPLES.len(),
        prop::collection::vec(
            (
                0usize..4,
                any::<prop::sample::Index>(),
                0..SNIPPETS.len(),
                0usize..40,
            ),
            1..6,
        ),
    )
        .prop_map(|(ex, edits)| {
            let mut s: Vec<char> = EXAMPLES[ex].chars().collect();
            for (op, at, snip, len) in edits {
                let i = at.index(s.len() + 1);
                match op {
                    0 => {
                        let end = (i + len).min(s.len());
                        s.drain(i..end);
                    }
                    1 => {
                        let ins: Vec<char> = SNIPPETS[snip].chars().collect();
                        s.splice(i..i, ins);
                    }
                    2 => s.truncate(i),
                    _ => {
                        // Duplicate a stretch (duplicate names, entries).
                        let end = (i + len * 8).min(s.len());
                        let dup: Vec<char> = s[i..end].to_vec();
                        s.splice(i..i, dup);
                    }
                }
            }
            s.into_iter().collect()
        })
}

#[derive(Debug, Clone)]
struct Entry {
    kind: usize,
    size: usize,
    parent: Option<usize>,
    target: usize,
    offset: u64,
    priority: i32,
    enabled: bool,
}

const KINDS: &[&str] = &[
    "container",
    "ram",
    "rom",
    "rom-device",
    "ram-device",
    "mmio",
    "reservation",
    "io-root",
    "alias",
];
const SIZES: &[&str] = &[
    "0",
    "1",
    "0x1000",
    "\"64K\"",
    "\"2^64\"",
    "\"2^63\"",
    "\"0x8000_0000\"",
    "\"1 MiB\"",
];

fn machine() -> impl Strategy<Value = String> {
    let entry = (
        0..KINDS.len(),
        0..SIZES.len(),
        prop::option::of(0usize..12),
        0usize..12,
        prop_oneof![Just(0u64), 0u64..0x10000, Just(u64::MAX), Just(1 << 63)],
        -2i32..3,
        prop::bool::weighted(0.85),
    )
        .prop_map(
            |(kind, size, parent, target, offset, priority, enabled)| Entry {
                kind,
                size,
                parent,
                target,
                offset,
                priority,
                enabled,
            },
        );
    (prop::collection::vec(entry, 1..12), 0usize..12).prop_map(|(entries, root)| {
        let mut s = String::new();
        for (i, e) in entries.iter().enumerate() {
            s.push_str(&format!(
                "[[region]]\nname = \"r{i}\"\nkind = \"{}\"\nsize = {}\nenabled = {}\n",
                KINDS[e.kind], SIZES[e.size], e.enabled
            ));
            if KINDS[e.kind] == "alias" {
                s.push_str(&format!("target = \"r{}\"\n", e.target));
            }
            if let Some(p) = e.parent {
                s.push_str(&format!(
                    "parent = \"r{p}\"\noffset = \"{:#x}\"\npriority = {}\n",
                    e.offset, e.priority
                ));
            }
        }
        s.push_str(&format!(
            "[[address-space]]\nname = \"memory\"\nroot = \"r{root}\"\n"
        ));
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn machine_file_loader_never_panics_on_arbitrary_text(src in "(?s).{0,400}") {
        check(&src);
    }

    #[test]
    fn machine_file_loader_never_panics_on_mutated_examples(src in mutated()) {
        check(&src);
    }

    #[test]
    fn machine_file_loader_never_panics_on_random_machines(src in machine()) {
        check(&src);
    }
}

#[test]
fn machine_file_examples_load_with_real_memory() {
    for ex in EXAMPLES {
        let m = load_str(ex, LoadOptions { allocate: true }).expect("example loads");
        assert!(!m.spaces.is_empty());
        let leaks = m.memory.teardown();
        assert!(leaks.is_clean(), "{leaks}");
    }
}
