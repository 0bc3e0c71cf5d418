//! Input files and API callers control how deep the region tree is and how
//! long alias chains are: nothing they build may overflow the stack, and
//! what `lookup` prints about a chain grows at most linearly with it.
//!
//! Inputs are generated into a temporary directory; the stack tests run the
//! walks in a thread with a normal (2 MiB) stack, or run the CLI binary, so
//! that a stack overflow shows up as a failed test instead of a lucky pass
//! on a large main-thread stack.

use std::path::PathBuf;
use std::process::Command;

use memtree::inspect::lookup::explain;
use memtree::qemu_text::print::{print_flat, print_tree, FlatOptions, TreeOptions};
use memtree::{Memory, RegionKind};
use memtree_cli::machine_file::{load_str, LoadOptions};

const BIN: &str = env!("CARGO_BIN_EXE_memtree");

/// Levels of the chains and nestings below: well past the depth (about
/// 10,000) at which the recursive walks overflowed an 8 MiB stack.
const DEEP: usize = 20_000;

fn tmp(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memtree-input-bounds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let p = dir.join(name);
    std::fs::write(&p, contents).expect("write temp file");
    p
}

/// A machine file: `top` (mapped in `system`) -> a{n} -> ... -> a1 -> r0,
/// each alias showing all of the next one, plus a sibling so that rendering
/// starts at `system` and walks the whole chain.
fn toml_alias_chain(n: usize) -> String {
    let mut s = String::new();
    s.push_str("[[region]]\nname = \"system\"\nkind = \"container\"\nsize = \"2^64\"\n");
    s.push_str("[[region]]\nname = \"r0\"\nkind = \"ram\"\nsize = \"0x1000\"\n");
    for i in 1..=n {
        let target = if i == 1 {
            "r0".to_owned()
        } else {
            format!("a{}", i - 1)
        };
        s.push_str(&format!(
            "[[region]]\nname = \"a{i}\"\nkind = \"alias\"\ntarget = \"{target}\"\n"
        ));
    }
    s.push_str(&format!(
        "[[region]]\nname = \"top\"\nkind = \"alias\"\ntarget = \"a{n}\"\nparent = \"system\"\n"
    ));
    s.push_str("[[region]]\nname = \"other\"\nkind = \"mmio\"\nsize = \"0x1000\"\nparent = \"system\"\noffset = \"0x100000\"\n");
    s.push_str("[[address-space]]\nname = \"memory\"\nroot = \"system\"\n");
    s
}

/// The same chain as QEMU prints it: one `memory-region:` section per alias.
fn dump_alias_chain(n: usize) -> String {
    let mut s = String::from(
        "address-space: memory\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n",
    );
    s.push_str(&format!(
        "    0000000000000000-0000000000000fff (prio 0, ram): alias a{n} @a{} 0000000000000000-0000000000000fff\n",
        n - 1
    ));
    s.push_str("    0000000000100000-0000000000100fff (prio 0, i/o): other\n\n");
    for i in (1..n).rev() {
        let target = if i == 1 {
            "r0".to_owned()
        } else {
            format!("a{}", i - 1)
        };
        s.push_str(&format!(
            "memory-region: a{i}\n  0000000000000000-0000000000000fff (prio 0, ram): alias a{i} @{target} 0000000000000000-0000000000000fff\n\n"
        ));
    }
    s.push_str("memory-region: r0\n  0000000000000000-0000000000000fff (prio 0, ram): r0\n\n");
    s
}

/// The chain built through the API; returns the machine and its space.
fn api_alias_chain(n: usize) -> (Memory, memtree::SpaceId) {
    let m = Memory::new();
    let sys = m.new_container("system", 1 << 64, None).unwrap();
    let mut prev = m
        .new_model_region("r0", RegionKind::Ram, 0x1000, None)
        .unwrap();
    {
        let _t = m.begin();
        for i in 1..=n {
            prev = m
                .new_alias(&format!("a{i}"), prev, 0, 0x1000, None)
                .unwrap();
        }
        m.add_subregion(sys, 0, prev).unwrap();
        let other = m
            .new_model_region("other", RegionKind::Mmio, 0x1000, None)
            .unwrap();
        m.add_subregion(sys, 0x10_0000, other).unwrap();
    }
    let space = m.new_address_space("memory", sys, None).unwrap();
    (m, space)
}

/// Runs `f` on a thread with a normal 2 MiB stack.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .expect("spawn")
        .join()
        .expect("the walk panicked")
}

fn assert_exits_normally(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run memtree");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0 | 2)),
        "memtree {args:?} must answer (exit 0) or refuse (exit 2), got {:?}\nstderr: {stderr}",
        out.status
    );
    if out.status.code() == Some(2) {
        assert!(stderr.starts_with("memtree: "), "{stderr}");
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cli_lookup_on_a_deep_alias_chain_from_a_machine_file_does_not_overflow_the_stack() {
    let f = tmp("chain.toml", &toml_alias_chain(DEEP));
    let out = assert_exits_normally(&["lookup", f.to_str().unwrap(), "0x10"]);
    assert!(
        out.contains("served by \"r0\" (ram) at offset 0x10"),
        "{out}"
    );
}

#[test]
fn cli_lookup_and_tree_on_a_deep_alias_chain_from_a_qemu_dump_do_not_overflow_the_stack() {
    let f = tmp("chain.txt", &dump_alias_chain(DEEP));
    let out = assert_exits_normally(&["lookup", f.to_str().unwrap(), "0x10"]);
    assert!(
        out.contains("served by \"r0\" (ram) at offset 0x10"),
        "{out}"
    );
    let tree = assert_exits_normally(&["tree", f.to_str().unwrap()]);
    assert_eq!(tree, dump_alias_chain(DEEP), "the dump prints back as read");
    let flat = assert_exits_normally(&["flat", f.to_str().unwrap()]);
    assert!(
        flat.contains("  0000000000000000-0000000000000fff (prio 0, ram): r0\n"),
        "{flat}"
    );
}

#[test]
fn explain_render_and_print_of_a_deep_alias_chain_return_on_a_normal_stack() {
    let (verdict, tree_lines, flat) = on_small_stack(|| {
        let (m, space) = api_alias_chain(DEEP);
        let why = explain(&m, space, 0x10).unwrap();
        let v = why.verdict.expect("r0 serves the address");
        let mut tree = String::new();
        print_tree(&m, &mut tree, TreeOptions::default()).unwrap();
        let mut flat = String::new();
        print_flat(&m, &mut flat, FlatOptions::default()).unwrap();
        ((v.name, v.offset), tree.lines().count(), flat)
    });
    assert_eq!(verdict, ("r0".to_owned(), 0x10));
    // The space's block (header, system, the alias, other, blank), then one
    // section per alias target (header, line, blank).
    assert_eq!(tree_lines, 5 + 3 * DEEP);
    assert!(flat.contains("(prio 0, ram): r0\n"), "{flat}");
}

#[test]
fn explain_and_render_of_deep_nesting_return_on_a_normal_stack() {
    let verdict = on_small_stack(|| {
        let m = Memory::new();
        let root = m.new_container("c0", 1 << 64, None).unwrap();
        let mut prev = root;
        {
            let _t = m.begin();
            for i in 1..=DEEP {
                let c = m.new_container(&format!("c{i}"), 1 << 64, None).unwrap();
                m.add_subregion(prev, 0, c).unwrap();
                prev = c;
            }
            let ram = m
                .new_model_region("ram", RegionKind::Ram, 0x1000, None)
                .unwrap();
            m.add_subregion(prev, 0x2000, ram).unwrap();
            let other = m
                .new_model_region("other", RegionKind::Mmio, 0x1000, None)
                .unwrap();
            m.add_subregion(root, 0x10_0000, other).unwrap();
        }
        let space = m.new_address_space("memory", root, None).unwrap();
        let why = explain(&m, space, 0x2010).unwrap();
        let v = why.verdict.expect("ram serves the address");
        (v.name, v.offset, v.path.len())
    });
    assert_eq!(verdict, ("ram".to_owned(), 0x10, DEEP + 2));
}

#[test]
fn machine_file_with_a_deep_alias_chain_loads_and_renders_on_a_normal_stack() {
    let ranges = on_small_stack(|| {
        let m = load_str(&toml_alias_chain(DEEP), LoadOptions::default()).unwrap();
        let view = m.memory.address_space(m.spaces[0]).unwrap().view();
        view.ranges()
            .iter()
            .map(|r| (r.start(), r.region().name().to_owned()))
            .collect::<Vec<_>>()
    });
    assert_eq!(
        ranges,
        [(0, "r0".to_owned()), (0x10_0000, "other".to_owned())]
    );
}

/// What `lookup` prints about an alias chain: the default listing
/// summarises the chain (its size does not depend on the chain's length),
/// and even the complete listing (`--all`) grows linearly, not with the
/// square of the length (one line per level, not one level of indentation
/// and one path element more per level).
#[test]
fn lookup_output_on_an_alias_chain_is_summarised_and_grows_linearly() {
    let sizes = |n: usize| {
        let (m, space) = api_alias_chain(n);
        let why = explain(&m, space, 0x10).unwrap();
        assert_eq!(why.verdict.as_ref().unwrap().name, "r0");
        (format!("{why}").len(), format!("{why:#}").len())
    };
    let (short_1k, all_1k) = sizes(1_000);
    let (short_4k, all_4k) = sizes(4_000);
    assert!(
        short_4k <= short_1k + 64 && short_4k < 8 * 1024,
        "default listing: {short_1k} bytes for 1,000 levels, {short_4k} for 4,000"
    );
    // Linear growth gives a ratio of 4 (plus a digit more per name);
    // quadratic growth 16.
    assert!(
        all_4k < 5 * all_1k,
        "--all listing: {all_1k} bytes for 1,000 levels, {all_4k} for 4,000"
    );
}

/// `add_subregions` (what the loader and the importer map siblings with, in
/// one pass) leaves exactly the subregion order that one `add_subregion`
/// after the other leaves: priorities descending, newest first among
/// equals, newcomers before the equal-priority subregions already there.
#[test]
fn add_subregions_in_one_batch_orders_like_one_by_one() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..50 {
        let (one, batch) = (Memory::new(), Memory::new());
        let mut lists = Vec::new();
        for m in [&one, &batch] {
            let c = m.new_container("c", 1 << 64, None).unwrap();
            let mut regions = Vec::new();
            for i in 0..40 {
                regions.push(
                    m.new_model_region(&format!("r{i}"), RegionKind::Mmio, 0x10, None)
                        .unwrap(),
                );
            }
            lists.push((m, c, regions));
        }
        let picks: Vec<(u64, usize, i32)> = (0..40)
            .map(|i| (next() % 0x1000, i, (next() % 4) as i32 - 1))
            .collect();
        // A few already mapped, then the rest in one batch.
        let split = round % 10;
        for (m, c, regions) in &lists {
            for &(off, i, p) in &picks[..split] {
                m.add_subregion_overlap(*c, off, regions[i], p).unwrap();
            }
        }
        let (m1, c1, r1) = &lists[0];
        for &(off, i, p) in &picks[split..] {
            m1.add_subregion_overlap(*c1, off, r1[i], p).unwrap();
        }
        let (m2, c2, r2) = &lists[1];
        let batch_subs: Vec<(u64, memtree::RegionId, i32)> = picks[split..]
            .iter()
            .map(|&(off, i, p)| (off, r2[i], p))
            .collect();
        m2.add_subregions(*c2, &batch_subs).unwrap();
        let names = |m: &Memory, c| -> Vec<(String, u64, i32)> {
            m.region_info(c)
                .unwrap()
                .subregions
                .iter()
                .map(|&s| {
                    let i = m.region_info(s).unwrap();
                    (i.name, i.addr, i.priority)
                })
                .collect()
        };
        assert_eq!(names(m1, *c1), names(m2, *c2), "round {round}");
    }
}

/// A refused batch changes nothing and names the first entry refused.
#[test]
fn add_subregions_refuses_a_whole_batch_at_its_first_bad_entry() {
    let m = Memory::new();
    let c = m.new_container("c", 0x1000, None).unwrap();
    let inner = m.new_container("inner", 0x100, None).unwrap();
    let a = m
        .new_model_region("a", RegionKind::Mmio, 0x10, None)
        .unwrap();
    m.add_subregion(c, 0, inner).unwrap();
    // `c` under `inner` would loop; `a` twice is refused too, but later.
    let err = m
        .add_subregions(inner, &[(0, a, 0), (0x10, c, 0), (0x20, a, 0)])
        .unwrap_err();
    assert_eq!(err.0, 1, "{:?}", err.1);
    assert!(
        matches!(err.1, memtree::TopologyError::Loop { .. }),
        "{err:?}"
    );
    assert!(m.region_info(inner).unwrap().subregions.is_empty());
    assert_eq!(m.region_info(a).unwrap().container, None);
    let err = m
        .add_subregions(inner, &[(0, a, 0), (0x20, a, 0)])
        .unwrap_err();
    assert_eq!(err.0, 1);
}

/// A machine file may list a chain of aliases in any order (here each alias
/// before its target): the loader creates each one once, and a loop is
/// still named from the first alias leading into it.
#[test]
fn machine_file_alias_chain_in_reverse_order_loads_and_loops_are_named() {
    let n = 2_000;
    let mut s = String::from("[[region]]\nname = \"r0\"\nkind = \"ram\"\nsize = \"0x1000\"\n");
    for i in (1..=n).rev() {
        let target = if i == 1 {
            "r0".to_owned()
        } else {
            format!("a{}", i - 1)
        };
        s.push_str(&format!(
            "[[region]]\nname = \"a{i}\"\nkind = \"alias\"\ntarget = \"{target}\"\n"
        ));
    }
    let m = load_str(&s, LoadOptions::default()).unwrap();
    assert_eq!(m.regions.len(), n + 1);
    let info = m.memory.region_info(m.regions[&format!("a{n}")]).unwrap();
    assert_eq!(info.size, 0x1000);

    let looped = "[[region]]\nname = \"x\"\nkind = \"alias\"\ntarget = \"a\"\n\
                  [[region]]\nname = \"a\"\nkind = \"alias\"\ntarget = \"b\"\n\
                  [[region]]\nname = \"b\"\nkind = \"alias\"\ntarget = \"a\"\n";
    let e = load_str(looped, LoadOptions::default()).unwrap_err();
    assert_eq!(e.line, 4, "{e}");
    assert_eq!(e.message, "alias loop: x -> a -> b -> a");
}

/// Many alias targets with one name and identical sections (each a distinct
/// region: QEMU prints a target once per region) import one region per
/// section and print back exactly as read; the importer's candidate indexes
/// keep this linear.
#[test]
fn dump_with_many_identical_alias_target_sections_round_trips() {
    let n = 3_000;
    let mut dump = String::from(
        "address-space: memory\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n",
    );
    for i in 0..n as u64 {
        dump.push_str(&format!(
            "    {:016x}-{:016x} (prio 0, ram): alias a{i} @r 0000000000000000-0000000000000fff\n",
            i * 0x1000,
            i * 0x1000 + 0xfff
        ));
    }
    dump.push('\n');
    for _ in 0..n {
        dump.push_str("memory-region: r\n  0000000000000000-0000000000000fff (prio 0, ram): r\n\n");
    }
    let tree = memtree::qemu_text::parse::parse_tree(&dump).unwrap();
    let imported = memtree::qemu_text::import::import(&tree, None, None).unwrap();
    assert_eq!(imported.memory.region_count(), 2 * n + 1);
    let mut printed = String::new();
    print_tree(&imported.memory, &mut printed, TreeOptions::default()).unwrap();
    assert!(printed == dump, "the dump does not print back as read");
}
