//! Rendering benchmark: PC-like machines of 100, 1k, 10k and 100k regions.
//!
//! The generator builds what a real machine looks like: a 2^64 system
//! container; guest RAM seen through a below-4G and an above-4G alias; PAM
//! stacks (for each 16 KiB segment of 0xc0000-0xfffff, four aliases of RAM or
//! the PCI space at priority 1, one enabled); a PCI space at priority -1 under
//! the whole system container, holding a tree of bridges (nested containers,
//! each with a priority -1 background MMIO region filling its window); and on
//! every bus, devices with MMIO BARs that have their own overlapping,
//! prioritised subregions, RAM BARs, and windows (aliases) of some of those
//! BARs mapped into low memory over RAM.
//!
//! Measured:
//! * `render/N`: the pure render of the system address space
//!   ([`Machine::render_for_bench`]: physical-root walk, render, merge; no
//!   publication).
//! * `commit/N`: a full commit that re-renders it: toggling one device's
//!   BAR, which the view reaches (render + listener diff + publish; one
//!   address space, no listener).
//!   Incremental: only the BAR's old and new extent is re-rendered and
//!   spliced into the previous view.
//! * `commit_full/N`: the same toggle with incremental rendering off (the
//!   whole view re-rendered): the anchor for `commit/N`.
//! * `commit_unrelated/N`: a commit of an edit no view reaches (an unmapped
//!   region): memtree keeps every cached view whose reached regions are
//!   clean, where QEMU would re-render every view.
//! * `commit_listener/N`: `commit/N` with a (no-op) listener on the space:
//!   adds the listener diff, which comes from the splice (the listener does
//!   not ask for `region_nop`, so unchanged ranges are not visited).
//! * `commit_log/N`: a dirty-log mask toggled on a frame buffer the view
//!   shows, with that listener: renders nothing, tells the listener
//!   `log_start` / `log_stop` for the frame buffer's ranges.
//! * `commit_listener_nops/N`: the same with a listener that asks for
//!   QEMU's `region_nop` for every unchanged range (a callback per range:
//!   what still grows with the map, for the listeners that want it).
//!
//! `cargo bench --bench render -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use memtree::{Memory, MmioOps, RegionId, RegionKind, SpaceId, UnimplementedDevice};

/// Deterministic xorshift, so every run benchmarks the same machines.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const GIB: u64 = 1 << 30;

pub struct Machine {
    pub memory: Memory,
    pub system: RegionId,
    pub space: SpaceId,
    /// A BAR the system view reaches.
    pub reached: RegionId,
    /// A region no view reaches.
    pub unreached: RegionId,
    /// A frame buffer the system view shows (sometimes through an alias
    /// too): what `commit_log/N` tracks.
    pub tracked: RegionId,
    pub regions: usize,
}

/// Builds a machine of about `n` regions (never fewer).
pub fn machine(n: usize) -> Machine {
    let memory = Memory::new();
    let m = &memory;
    let ops: Arc<dyn MmioOps> = Arc::new(UnimplementedDevice);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut count = 0usize;
    macro_rules! made {
        ($e:expr $(,)?) => {{
            let r: RegionId = $e;
            count += 1;
            r
        }};
    }
    let t = m.begin();
    let system = made!(m.new_container("system", 1 << 64, None).unwrap());
    let ram = made!(m
        .new_model_region("pc.ram", RegionKind::Ram, u128::from(8 * GIB), None)
        .unwrap(),);
    let below = made!(m
        .new_alias("ram-below-4g", ram, 0, u128::from(3 * GIB), None)
        .unwrap());
    let above = made!(m
        .new_alias("ram-above-4g", ram, 3 * GIB, u128::from(5 * GIB), None)
        .unwrap(),);
    m.add_subregion(system, 0, below).unwrap();
    m.add_subregion(system, 4 * GIB, above).unwrap();
    let pci = made!(m.new_container("pci", 1 << 64, None).unwrap());
    m.add_subregion_overlap(system, 0, pci, -1).unwrap();
    // PAM: 16 segments of 16 KiB, four aliases each, one enabled.
    for seg in 0..16u64 {
        let base = 0xc_0000 + seg * 0x4000;
        let on = rng.below(4);
        for (k, (name, target)) in [("ram", ram), ("pci", pci), ("rom", ram), ("wo", pci)]
            .into_iter()
            .enumerate()
        {
            let a = made!(m
                .new_alias(&format!("pam-{name}-{seg}"), target, base, 0x4000, None)
                .unwrap(),);
            m.add_subregion_overlap(system, base, a, 1).unwrap();
            if k as u64 != on {
                m.set_enabled(a, false).unwrap();
            }
            if name == "rom" {
                m.set_readonly(a, true).unwrap();
            }
        }
    }
    // Buses: trees of bridges under the PCI space. A top-level bridge has a
    // 256 MiB window in the 64-bit hole; each bridge has 16 slots of 1/16 of
    // its window: slots 0-7 for devices, 8-15 for child bridges (up to depth
    // 3, filled breadth-first). Each window has a priority -1 background
    // region that fills what the devices leave free.
    struct Bus {
        id: RegionId,
        depth: u32,
        window: u64,
        children: u64,
    }
    let mut open: std::collections::VecDeque<Bus> = Default::default();
    let mut bridges = 0usize;
    let mut next_top = 0x100_0000_0000u64;
    let mut reached = None;
    let mut tracked = None;
    let mut low_windows = 0u64;
    while count < n {
        bridges += 1;
        let (parent, at, window, depth) = match open.front_mut() {
            Some(p) => {
                let slot = 8 + p.children;
                p.children += 1;
                let out = (p.id, slot * (p.window / 16), p.window / 16, p.depth + 1);
                if p.children == 8 {
                    open.pop_front();
                }
                out
            }
            None => {
                let at = next_top;
                next_top += 0x1000_0000;
                (pci, at, 0x1000_0000, 1)
            }
        };
        let bridge = made!(m
            .new_container(&format!("bridge{bridges}"), u128::from(window), None)
            .unwrap());
        m.add_subregion(parent, at, bridge).unwrap();
        let background = made!(m
            .new_mmio(
                &format!("bridge{bridges}-unassigned"),
                u128::from(window),
                ops.clone(),
                None
            )
            .unwrap());
        m.add_subregion_overlap(bridge, 0, background, -1).unwrap();
        if depth < 3 {
            open.push_back(Bus {
                id: bridge,
                depth,
                window,
                children: 0,
            });
        }
        let slot = window / 16;
        for dev in 0..8u64 {
            if count >= n {
                break;
            }
            let name = format!("dev{bridges}.{dev}");
            let bar_at = dev * slot;
            let bar = made!(m
                .new_mmio(&format!("{name}-bar0"), 0x4000, ops.clone(), None)
                .unwrap());
            // Overlapping subregions with mixed priorities, like a
            // multi-function BAR (MSI-X table and PBA over the config area).
            for s in 0..rng.below(4) {
                let sub = made!(m
                    .new_mmio(
                        &format!("{name}-bar0.{s}"),
                        0x800 << rng.below(3),
                        ops.clone(),
                        None
                    )
                    .unwrap());
                let prio = rng.below(4) as i32 - 1;
                m.add_subregion_overlap(bar, rng.below(8) * 0x400, sub, prio)
                    .unwrap();
            }
            m.add_subregion(bridge, bar_at, bar).unwrap();
            reached.get_or_insert(bar);
            if rng.below(3) == 0 {
                let vram = made!(m
                    .new_model_region(&format!("{name}-vram"), RegionKind::Ram, 0x8000, None)
                    .unwrap());
                tracked.get_or_insert(vram);
                // Over the second half of the BAR, at a higher priority.
                m.add_subregion_overlap(bridge, bar_at + 0x2000, vram, 1)
                    .unwrap();
                // A legacy window of it in low memory, over RAM.
                if low_windows < 64 && rng.below(2) == 0 {
                    let w = made!(m
                        .new_alias(&format!("{name}-lowmem"), vram, 0, 0x4000, None)
                        .unwrap());
                    let at = 0xa_0000 + (low_windows * 0x4000) % 0x2_0000;
                    m.add_subregion_overlap(system, at, w, 2).unwrap();
                    low_windows += 1;
                }
            }
        }
    }
    let unreached = made!(m.new_mmio("unplugged", 0x1000, ops.clone(), None).unwrap());
    let space = m.new_address_space("memory", system, None).unwrap();
    t.commit();
    let regions = count;
    Machine {
        memory,
        system,
        space,
        reached: reached.unwrap_or(below),
        unreached,
        tracked: tracked.or(reached).unwrap_or(below),
        regions,
    }
}

fn bench(c: &mut Criterion) {
    let sizes = [100usize, 1_000, 10_000, 100_000];
    let machines: Vec<(usize, Machine)> = sizes.iter().map(|&n| (n, machine(n))).collect();
    for (n, mach) in &machines {
        let ranges = mach.memory.address_space(mach.space).unwrap().view().len();
        eprintln!(
            "machine {n}: {} regions, {ranges} flat ranges",
            mach.regions
        );
    }
    let mut g = c.benchmark_group("render");
    for (n, mach) in &machines {
        g.bench_with_input(BenchmarkId::from_parameter(n), mach, |b, mach| {
            b.iter(|| black_box(mach.memory.render_for_bench(black_box(mach.system))))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("commit");
    for (n, mach) in &machines {
        let mut on = true;
        g.bench_with_input(BenchmarkId::from_parameter(n), mach, |b, mach| {
            b.iter(|| {
                on = !on;
                mach.memory.set_enabled(mach.reached, on).unwrap();
            })
        });
    }
    g.finish();
    // The anchor: the same toggle with incremental rendering off (every
    // reached view rendered whole, as before incremental rendering).
    let mut g = c.benchmark_group("commit_full");
    for (n, mach) in &machines {
        mach.memory.set_incremental_render(false);
        let mut on = true;
        g.bench_with_input(BenchmarkId::from_parameter(n), mach, |b, mach| {
            b.iter(|| {
                on = !on;
                mach.memory.set_enabled(mach.reached, on).unwrap();
            })
        });
        mach.memory.set_incremental_render(true);
    }
    g.finish();
    let mut g = c.benchmark_group("commit_unrelated");
    for (n, mach) in &machines {
        let mut on = true;
        g.bench_with_input(BenchmarkId::from_parameter(n), mach, |b, mach| {
            b.iter(|| {
                on = !on;
                mach.memory.set_enabled(mach.unreached, on).unwrap();
            })
        });
    }
    g.finish();
    // The toggle with a listener on the space: the diff comes from the
    // splice (deletions and additions of the toggled extent). `Quiet` does
    // not ask for `region_nop`, so no unchanged range is visited; `Nops`
    // asks for QEMU's nop per unchanged range (the part that grows with
    // the map, for the listeners that want it).
    struct Quiet;
    impl memtree::MemoryListener for Quiet {}
    struct Nops;
    impl memtree::MemoryListener for Nops {
        fn wants_region_nop(&self) -> bool {
            true
        }
    }
    let listeners: [(&str, Arc<dyn memtree::MemoryListener>); 2] = [
        ("commit_listener", Arc::new(Quiet)),
        ("commit_listener_nops", Arc::new(Nops)),
    ];
    for (group, listener) in listeners.clone() {
        let mut g = c.benchmark_group(group);
        for (n, mach) in &machines {
            let id = mach
                .memory
                .register_listener(mach.space, listener.clone())
                .unwrap();
            let mut on = true;
            g.bench_with_input(BenchmarkId::from_parameter(n), mach, |b, mach| {
                b.iter(|| {
                    on = !on;
                    mach.memory.set_enabled(mach.reached, on).unwrap();
                })
            });
            mach.memory.unregister_listener(id).unwrap();
        }
        g.finish();
    }
    // A dirty-log mask toggled on a frame buffer, with the listener that
    // does not ask for nops: no render, no view published, `log_start` /
    // `log_stop` for the frame buffer's ranges only.
    let mut g = c.benchmark_group("commit_log");
    for (n, mach) in &machines {
        let id = mach
            .memory
            .register_listener(mach.space, listeners[0].1.clone())
            .unwrap();
        let mut on = false;
        g.bench_with_input(BenchmarkId::from_parameter(n), mach, |b, mach| {
            b.iter(|| {
                on = !on;
                mach.memory
                    .set_dirty_log_mask(mach.tracked, u8::from(on))
                    .unwrap();
            })
        });
        mach.memory.set_dirty_log_mask(mach.tracked, 0).unwrap();
        mach.memory.unregister_listener(id).unwrap();
    }
    g.finish();
}

/// Peak resident set of the process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The POWER8-class machine (`memtree::scale`): build (one commit per
/// realize), program (one commit per BAR and per bus-master enable) and
/// enable every notifier (one transaction), with incremental rendering and
/// with the full-render path as the anchor. Then 15 devices x 64 host
/// notifiers in one transaction and one per commit.
fn bench_scale(c: &mut Criterion) {
    use memtree::scale::{build_power8, notifier_machine, Power8Config};
    let before = peak_rss_mib();
    {
        let m = Memory::new();
        let t = std::time::Instant::now();
        let built = build_power8(&m, Power8Config::qemu_largest()).unwrap();
        eprintln!(
            "power8: {} commits, {} regions, {:?}; peak RSS {:?} MiB -> {:?} MiB",
            built.commits,
            m.region_count(),
            t.elapsed(),
            before,
            peak_rss_mib()
        );
    }
    let mut g = c.benchmark_group("scale");
    g.sample_size(10);
    for (name, incremental) in [("power8", true), ("power8_full", false)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let m = Memory::new();
                m.set_incremental_render(incremental);
                black_box(build_power8(&m, Power8Config::qemu_largest()).unwrap());
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("notifiers_15x64");
    for per_commit in [false, true] {
        let name = if per_commit {
            "per_commit"
        } else {
            "transaction"
        };
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let m = Memory::new();
                    let regions = notifier_machine(&m, 15, 64).unwrap();
                    (m, regions)
                },
                |(m, regions)| {
                    let mut kicks = Vec::with_capacity(15 * 64);
                    {
                        let t = (!per_commit).then(|| m.begin());
                        for &r in &regions {
                            for q in 0..64u64 {
                                let kick = memtree::EventNotifier::new("kick");
                                m.add_eventfd(r, q * 4, 2, None, &kick).unwrap();
                                kicks.push(kick);
                            }
                        }
                        if let Some(t) = t {
                            t.commit();
                        }
                    }
                    (m, kicks)
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench, bench_scale);
criterion_main!(benches);
