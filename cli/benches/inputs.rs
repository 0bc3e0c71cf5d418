//! Inputs from users at 10k and 100k: the costs that used to grow
//! quadratically with the size of an input file or of a device (issue 14,
//! item 9). Each group runs at two sizes; the ratio of the two times is the
//! growth (10 for linear).
//!
//! * `tree_toml_alias_chain/N`: load a machine file whose region `top` is
//!   the head of a chain of N aliases (each showing all of the next), and
//!   print its tree (`memtree tree FILE`, as library calls: `load_str` then
//!   `print_tree`).
//! * `import_alias_blocks/N`: parse and import a QEMU dump with N aliases in
//!   the system tree, each targeting its own region printed in its own
//!   `memory-region:` block.
//! * `import_alias_chain/N`: parse and import a QEMU dump of an alias chain
//!   of N levels, one `memory-region:` block per alias.
//! * `import_siblings/N`: parse and import a QEMU dump of N sibling RAM
//!   regions in one container.
//! * `lookup_alias_chain/N`: `explain` an address served through an alias
//!   chain of N levels and format the answer (`memtree lookup`).
//! * `unplug_device/N`: unplug a device owning N mapped regions (the
//!   machine is rebuilt before each measured unplug).
//!
//! `cargo bench --bench inputs -- --warm-up-time 1 --measurement-time 3`

use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use memtree::inspect::lookup::explain;
use memtree::qemu_text::print::{print_tree, TreeOptions};
use memtree::qemu_text::{import, parse};
use memtree::{Memory, MmioOps, RegionKind, SpaceId, UnimplementedDevice};
use memtree_cli::machine_file::{load_str, LoadOptions};

const SIZES: [usize; 2] = [10_000, 100_000];

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
        let _ = write!(
            s,
            "[[region]]\nname = \"a{i}\"\nkind = \"alias\"\ntarget = \"{target}\"\n"
        );
    }
    let _ = write!(
        s,
        "[[region]]\nname = \"top\"\nkind = \"alias\"\ntarget = \"a{n}\"\nparent = \"system\"\n"
    );
    s.push_str("[[region]]\nname = \"other\"\nkind = \"mmio\"\nsize = \"0x1000\"\nparent = \"system\"\noffset = \"0x100000\"\n");
    s.push_str("[[address-space]]\nname = \"memory\"\nroot = \"system\"\n");
    s
}

fn dump_alias_blocks(n: usize) -> String {
    let mut s = String::from(
        "address-space: memory\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n",
    );
    for i in 0..n as u64 {
        let _ = writeln!(
            s,
            "    {:016x}-{:016x} (prio 0, ram): alias a{i} @r{i} 0000000000000000-0000000000000fff",
            i * 0x1000,
            i * 0x1000 + 0xfff
        );
    }
    s.push('\n');
    for i in 0..n {
        let _ = write!(
            s,
            "memory-region: r{i}\n  0000000000000000-0000000000000fff (prio 0, ram): r{i}\n\n"
        );
    }
    s
}

fn dump_alias_chain(n: usize) -> String {
    let mut s = String::from(
        "address-space: memory\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n",
    );
    let _ = writeln!(
        s,
        "    0000000000000000-0000000000000fff (prio 0, ram): alias a{n} @a{} 0000000000000000-0000000000000fff",
        n - 1
    );
    s.push_str("    0000000000100000-0000000000100fff (prio 0, i/o): other\n\n");
    for i in (1..n).rev() {
        let target = if i == 1 {
            "r0".to_owned()
        } else {
            format!("a{}", i - 1)
        };
        let _ = write!(
            s,
            "memory-region: a{i}\n  0000000000000000-0000000000000fff (prio 0, ram): alias a{i} @{target} 0000000000000000-0000000000000fff\n\n"
        );
    }
    s.push_str("memory-region: r0\n  0000000000000000-0000000000000fff (prio 0, ram): r0\n\n");
    s
}

fn dump_siblings(n: usize) -> String {
    let mut s = String::from(
        "address-space: memory\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n",
    );
    for i in 0..n as u64 {
        let _ = writeln!(
            s,
            "    {:016x}-{:016x} (prio 0, ram): r{i}",
            i * 0x1000,
            i * 0x1000 + 0xfff
        );
    }
    s.push('\n');
    s
}

fn api_alias_chain(n: usize) -> (Memory, SpaceId) {
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

/// A machine with a device owning `n` MMIO regions, all mapped.
fn device_with_regions(n: usize) -> (Memory, memtree::OwnerId) {
    let m = Memory::new();
    let sys = m.new_container("system", 1 << 64, None).unwrap();
    let dev = m.new_owner("dev", None).unwrap();
    let ops: Arc<dyn MmioOps> = Arc::new(UnimplementedDevice);
    {
        let _t = m.begin();
        let mut subs = Vec::with_capacity(n);
        for i in 0..n as u64 {
            let r = m
                .new_mmio(&format!("bar{i}"), 0x1000, ops.clone(), Some(dev))
                .unwrap();
            subs.push((i * 0x1000, r, 0));
        }
        m.add_subregions(sys, &subs).unwrap();
    }
    m.new_address_space("memory", sys, None).unwrap();
    (m, dev)
}

fn slow(c: &mut Criterion) {
    let mut g = c.benchmark_group("tree_toml_alias_chain");
    g.sample_size(10);
    for n in SIZES {
        let file = toml_alias_chain(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &file, |b, file| {
            b.iter(|| {
                let m = load_str(file, LoadOptions::default()).unwrap();
                let mut out = String::new();
                print_tree(&m.memory, &mut out, TreeOptions::default()).unwrap();
                black_box(out.len())
            })
        });
    }
    g.finish();

    for (group, make) in [
        (
            "import_alias_blocks",
            dump_alias_blocks as fn(usize) -> String,
        ),
        ("import_alias_chain", dump_alias_chain),
        ("import_siblings", dump_siblings),
    ] {
        let mut g = c.benchmark_group(group);
        g.sample_size(10);
        for n in SIZES {
            let text = make(n);
            g.bench_with_input(BenchmarkId::from_parameter(n), &text, |b, text| {
                b.iter(|| {
                    let tree = parse::parse_tree(text).unwrap();
                    let imported = import::import(&tree, None, None).unwrap();
                    black_box(imported.spaces.len())
                })
            });
        }
        g.finish();
    }

    let mut g = c.benchmark_group("lookup_alias_chain");
    g.sample_size(10);
    for n in SIZES {
        let (m, space) = api_alias_chain(n);
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let why = explain(&m, space, 0x10).unwrap();
                black_box(format!("{why}").len())
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("unplug_device");
    g.sample_size(10);
    for n in SIZES {
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_batched(
                || device_with_regions(n),
                |(m, dev)| {
                    let report = m.unplug(dev).unwrap();
                    black_box(report.regions.len());
                    m
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, slow);
criterion_main!(benches);
