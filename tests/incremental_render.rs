//! Incremental rendering against the reference: random topologies and random
//! sequences of edits are applied to two machines, one that splices
//! re-rendered windows into its previous views (the default) and one that
//! renders every reached view whole (`set_incremental_render(false)`). After
//! every commit both must publish the same views, equal to a full render of
//! the final topology, and their listeners must have seen the same callbacks.
//!
//! `INCREMENTAL_RENDER_SEEDS=n` runs n random machines (default 150).

use std::sync::{Arc, Mutex};

use memtree::{
    DirtyClient, EventNotifier, EventfdSection, Memory, MemoryListener, RegionId, Section,
    UnimplementedDevice,
};

type Log = Arc<Mutex<Vec<String>>>;

/// Records every callback into a log; `nops` says whether it asks for
/// `region_nop` (QEMU's contract) and tags its lines ("n:" if it does).
struct Recorder(Log, bool);

impl Recorder {
    fn quiet(log: Log) -> Recorder {
        Recorder(log, false)
    }
    fn with_nops(log: Log) -> Recorder {
        Recorder(log, true)
    }
    fn push(&self, line: String) {
        let tag = if self.1 { "n:" } else { "" };
        self.0.lock().unwrap().push(format!("{tag}{line}"));
    }
}

fn sec(s: &Section<'_>) -> String {
    let r = s.range;
    format!(
        "{} {:x}-{:x} {}@{:x} {:?} mask {}",
        s.space_name,
        r.start(),
        r.last(),
        r.region().name(),
        r.offset_in_region(),
        r.attrs(),
        r.dirty_log_mask()
    )
}

impl MemoryListener for Recorder {
    fn wants_region_nop(&self) -> bool {
        self.1
    }
    fn begin(&self) {
        self.push("begin".into());
    }
    fn commit(&self) {
        self.push("commit".into());
    }
    fn region_add(&self, s: &Section<'_>) {
        self.push(format!("add {}", sec(s)));
    }
    fn region_del(&self, s: &Section<'_>) {
        self.push(format!("del {}", sec(s)));
    }
    fn region_nop(&self, s: &Section<'_>) {
        self.push(format!("nop {}", sec(s)));
    }
    fn log_start(&self, s: &Section<'_>, old: u8, new: u8) {
        self.push(format!("log_start {} {old}->{new}", sec(s)));
    }
    fn eventfd_add(&self, s: &EventfdSection<'_>) {
        self.push(format!("eventfd_add {} {:x}", s.space_name, s.addr));
    }
    fn eventfd_del(&self, s: &EventfdSection<'_>) {
        self.push(format!("eventfd_del {} {:x}", s.space_name, s.addr));
    }
    fn log_stop(&self, s: &Section<'_>, old: u8, new: u8) {
        self.push(format!("log_stop {} {old}->{new}", sec(s)));
    }
}

/// xorshift64*: deterministic per seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    /// Addresses on a 1 KiB grid in a 64 KiB window (so regions overlap
    /// and abut often), sometimes anywhere.
    fn addr(&mut self) -> u64 {
        if self.chance(5) {
            self.next() & !0x3ff
        } else {
            (self.next() % 64) << 10
        }
    }
    fn size(&mut self) -> u64 {
        ((self.next() % 16) + 1) << 10
    }
}

/// One machine: its regions (by index, the same on both machines), the
/// containers among them and its listener log.
struct World {
    memory: Memory,
    regions: Vec<RegionId>,
    containers: Vec<usize>,
    aliases: Vec<usize>,
    log: Log,
    kicks: Vec<Arc<EventNotifier>>,
}

#[derive(Clone, Debug)]
enum Op {
    Add {
        container: usize,
        sub: usize,
        addr: u64,
        priority: i32,
    },
    Del(usize),
    Move(usize, u64),
    Enabled(usize, bool),
    Readonly(usize, bool),
    Unmergeable(usize, bool),
    Nonvolatile(usize, bool),
    Size(usize, u64),
    AliasOffset(usize, u64),
    LogMask(usize, u8),
    /// `set_log` of a per-region client (counted, through aliases).
    SetLog(usize, u8, bool),
    /// Global dirty tracking started or stopped (re-renders every view).
    Global(bool),
    /// Adds (or deletes) ioeventfd `n` at `offset` of a region.
    Eventfd {
        r: usize,
        offset: u64,
        n: usize,
        add: bool,
    },
}

/// `kicks` are shared by both machines: QEMU orders ioeventfds at one
/// address by notifier identity, so the two machines' callbacks compare
/// equal only with the same notifiers.
fn build(seed: u64, incremental: bool, kicks: &[Arc<EventNotifier>]) -> World {
    let mut rng = Rng(seed | 1);
    let memory = Memory::new();
    memory.set_incremental_render(incremental);
    let root = memory.new_container("root", 1 << 64, None).unwrap();
    let mut regions = vec![root];
    let mut containers = vec![0];
    let mut aliases = Vec::new();
    let n = 4 + rng.below(14);
    for i in 1..=n {
        let name = format!("r{i}");
        let id = match rng.below(5) {
            0 => {
                containers.push(i);
                memory
                    .new_container(&name, u128::from(rng.size()) * 4, None)
                    .unwrap()
            }
            1 if i > 1 => {
                aliases.push(i);
                let target = regions[1 + rng.below(i - 1)];
                memory
                    .new_alias(
                        &name,
                        target,
                        (rng.next() % 8) << 10,
                        u128::from(rng.size()),
                        None,
                    )
                    .unwrap()
            }
            2 => {
                // RAM that may hold subregions (a terminating container).
                containers.push(i);
                memory.new_ram(&name, u128::from(rng.size()), None).unwrap()
            }
            _ => memory.new_ram(&name, u128::from(rng.size()), None).unwrap(),
        };
        regions.push(id);
    }
    // Map most regions somewhere (loops are refused; that is fine).
    for i in 1..regions.len() {
        if rng.chance(85) {
            let c = containers[rng.below(containers.len())];
            let _ = memory.add_subregion_overlap(
                regions[c],
                rng.addr(),
                regions[i],
                rng.below(3) as i32 - 1,
            );
        }
    }
    let log: Log = Arc::default();
    let space = memory.new_address_space("root-as", root, None).unwrap();
    // On each space a listener that asks for nops and one that does not
    // (their callbacks differ only by the nops).
    memory
        .register_listener(space, Arc::new(Recorder::with_nops(log.clone())))
        .unwrap();
    memory
        .register_listener(space, Arc::new(Recorder::quiet(log.clone())))
        .unwrap();
    // A second space rooted somewhere inside (often its own physical root).
    let inner = regions[1 + rng.below(regions.len() - 1)];
    let s2 = memory.new_address_space("inner-as", inner, None).unwrap();
    memory
        .register_listener(s2, Arc::new(Recorder::with_nops(log.clone())))
        .unwrap();
    memory
        .register_listener(s2, Arc::new(Recorder::quiet(log.clone())))
        .unwrap();
    World {
        memory,
        regions,
        containers,
        aliases,
        log,
        kicks: kicks.to_vec(),
    }
}

fn random_op(rng: &mut Rng, w: &World) -> Op {
    let n = w.regions.len();
    let r = 1 + rng.below(n - 1);
    match rng.below(15) {
        13 => Op::SetLog(r, rng.below(2) as u8, rng.chance(60)),
        14 => Op::Global(rng.chance(50)),
        11 | 12 => Op::Eventfd {
            r,
            offset: (rng.next() % 8) << 10,
            n: rng.below(3),
            add: rng.chance(60),
        },
        0 | 1 => Op::Add {
            container: w.containers[rng.below(w.containers.len())],
            sub: r,
            addr: rng.addr(),
            priority: rng.below(3) as i32 - 1,
        },
        2 => Op::Del(r),
        3 | 4 => Op::Move(r, rng.addr()),
        5 | 6 => Op::Enabled(r, rng.chance(50)),
        7 => match rng.below(3) {
            0 => Op::Readonly(r, rng.chance(50)),
            1 => Op::Unmergeable(r, rng.chance(50)),
            _ => Op::Nonvolatile(r, rng.chance(50)),
        },
        8 => Op::Size(r, rng.size()),
        9 if !w.aliases.is_empty() => Op::AliasOffset(
            w.aliases[rng.below(w.aliases.len())],
            (rng.next() % 8) << 10,
        ),
        _ => Op::LogMask(r, (rng.next() % 4) as u8),
    }
}

/// Applies `op`; the outcome (refused or not) is returned so both machines
/// can be checked to agree on it.
fn apply(w: &World, op: &Op) -> bool {
    let m = &w.memory;
    let id = |i: usize| w.regions[i];
    match *op {
        Op::Add {
            container,
            sub,
            addr,
            priority,
        } => m
            .add_subregion_overlap(id(container), addr, id(sub), priority)
            .is_ok(),
        Op::Del(r) => match m.region_info(id(r)).unwrap().container {
            Some(c) => m.del_subregion(c, id(r)).is_ok(),
            None => false,
        },
        Op::Move(r, a) => m.set_address(id(r), a).is_ok(),
        Op::Enabled(r, on) => m.set_enabled(id(r), on).is_ok(),
        Op::Readonly(r, on) => m.set_readonly(id(r), on).is_ok(),
        Op::Unmergeable(r, on) => m.set_unmergeable(id(r), on).is_ok(),
        Op::Nonvolatile(r, on) => m.set_nonvolatile(id(r), on).is_ok(),
        Op::Size(r, s) => m.set_size(id(r), u128::from(s)).is_ok(),
        Op::AliasOffset(r, o) => m.set_alias_offset(id(r), o).is_ok(),
        Op::LogMask(r, mask) => m.set_dirty_log_mask(id(r), mask).is_ok(),
        Op::SetLog(r, client, on) => {
            let client = [DirtyClient::VGA, DirtyClient::CODE][usize::from(client)];
            m.set_log(id(r), client, on).is_ok()
        }
        Op::Global(true) => m.global_dirty_log_start().is_ok(),
        Op::Global(false) => m.global_dirty_log_stop().is_ok(),
        Op::Eventfd { r, offset, n, add } => {
            let kick = &w.kicks[n];
            if add {
                m.add_eventfd(id(r), offset, 4, None, kick).is_ok()
            } else {
                m.del_eventfd(id(r), offset, 4, None, kick).is_ok()
            }
        }
    }
}

fn views(w: &World) -> Vec<String> {
    w.memory
        .address_spaces()
        .into_iter()
        .flat_map(|(id, name)| {
            let view = w.memory.address_space(id).unwrap().view();
            view.iter()
                .map(|r| {
                    format!(
                        "{name} {:x}-{:x} {}@{:x} {:?} mask {}",
                        r.start(),
                        r.last(),
                        r.region().name(),
                        r.offset_in_region(),
                        r.attrs(),
                        r.dirty_log_mask()
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn run_seed(seed: u64) {
    let kicks: Vec<Arc<EventNotifier>> = (0..3)
        .map(|q| EventNotifier::new(&format!("kick{q}")))
        .collect();
    let inc = build(seed, true, &kicks);
    let full = build(seed, false, &kicks);
    assert_eq!(views(&inc), views(&full), "seed {seed}: initial views");
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut history: Vec<Op> = Vec::new();
    for step in 0..40 {
        let max = if rng.chance(30) { 6 } else { 1 };
        let batch = 1 + rng.below(max);
        let ops: Vec<Op> = (0..batch).map(|_| random_op(&mut rng, &inc)).collect();
        let run = |w: &World| {
            let t = w.memory.begin();
            let outcomes: Vec<bool> = ops.iter().map(|op| apply(w, op)).collect();
            t.commit();
            outcomes
        };
        let (a, b) = (run(&inc), run(&full));
        history.extend(ops.iter().cloned());
        assert_eq!(a, b, "seed {seed} step {step}: outcomes differ");
        let ctx = || format!("seed {seed} step {step}, ops so far {history:?}");
        assert_eq!(views(&inc), views(&full), "views differ: {}", ctx());
        if let Err(e) = inc.memory.check_views_against_full_render() {
            panic!("{}: {e}", ctx());
        }
        let (la, lb) = (
            std::mem::take(&mut *inc.log.lock().unwrap()),
            std::mem::take(&mut *full.log.lock().unwrap()),
        );
        assert_eq!(la, lb, "listener callbacks differ: {}", ctx());
    }
}

#[test]
fn incremental_render_equals_full_render_and_full_diff() {
    let seeds = std::env::var("INCREMENTAL_RENDER_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150u64);
    for seed in 1..=seeds {
        run_seed(seed);
    }
}

/// One BAR toggled in a map of many: the incremental path must re-render
/// (and report) only that BAR, and the reference path agrees.
#[test]
fn incremental_render_bar_toggle_reports_only_the_bar() {
    let memory = Memory::new();
    let root = memory.new_container("system", 1 << 64, None).unwrap();
    let mut bars = Vec::new();
    for i in 0..256u64 {
        let bar = memory.new_ram(&format!("bar{i}"), 0x1000, None).unwrap();
        memory.add_subregion(root, i * 0x2000, bar).unwrap();
        bars.push(bar);
    }
    let (log, quiet): (Log, Log) = (Arc::default(), Arc::default());
    let space = memory.new_address_space("mem", root, None).unwrap();
    memory
        .register_listener(space, Arc::new(Recorder::with_nops(log.clone())))
        .unwrap();
    memory
        .register_listener(space, Arc::new(Recorder::quiet(quiet.clone())))
        .unwrap();
    log.lock().unwrap().clear();
    quiet.lock().unwrap().clear();
    memory.set_enabled(bars[100], false).unwrap();
    memory.check_views_against_full_render().unwrap();
    let lines = std::mem::take(&mut *log.lock().unwrap());
    let dels: Vec<&String> = lines.iter().filter(|l| l.starts_with("n:del ")).collect();
    assert_eq!(dels.len(), 1, "{dels:?}");
    assert!(dels[0].contains("bar100"), "{dels:?}");
    // The listener that asked for QEMU's nops gets one per unchanged range;
    // the one that did not hears the change and nothing else.
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("n:nop ")).count(),
        255
    );
    let quiet_lines = std::mem::take(&mut *quiet.lock().unwrap());
    assert_eq!(quiet_lines.len(), 3, "{quiet_lines:?}");
    assert_eq!(quiet_lines[0], "begin");
    assert!(
        quiet_lines[1].starts_with("del mem c8000-c8fff bar100@0"),
        "{quiet_lines:?}"
    );
    assert_eq!(quiet_lines[2], "commit");
    memory.set_enabled(bars[100], true).unwrap();
    memory.check_views_against_full_render().unwrap();
    let view = memory.address_space(space).unwrap().view();
    assert_eq!(view.ranges().len(), 256);
}

/// An edit that changes only ioeventfds renders nothing: every published
/// view stays the same object, no listener hears begin/commit or a range
/// callback, and only the listener of the space that shows the region hears
/// the eventfd.
#[test]
fn incremental_render_eventfd_only_commit_renders_nothing() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 64, None).unwrap();
    let io = memory.new_container("io", 1 << 16, None).unwrap();
    let ops: Arc<dyn memtree::MmioOps> = Arc::new(UnimplementedDevice);
    let notify = memory
        .new_mmio("notify", 0x1000, ops.clone(), None)
        .unwrap();
    let port = memory.new_mmio("port", 0x10, ops, None).unwrap();
    memory.add_subregion(system, 0xfe00_0000, notify).unwrap();
    memory.add_subregion(io, 0x100, port).unwrap();
    let (mem_log, io_log): (Log, Log) = (Arc::default(), Arc::default());
    let mem_as = memory.new_address_space("mem", system, None).unwrap();
    let io_as = memory.new_address_space("ports", io, None).unwrap();
    memory
        .register_listener(mem_as, Arc::new(Recorder::quiet(mem_log.clone())))
        .unwrap();
    memory
        .register_listener(io_as, Arc::new(Recorder::quiet(io_log.clone())))
        .unwrap();
    mem_log.lock().unwrap().clear();
    io_log.lock().unwrap().clear();
    let before = (
        memory.address_space(mem_as).unwrap().view(),
        memory.address_space(io_as).unwrap().view(),
    );
    let kicks: Vec<Arc<EventNotifier>> = (0..3)
        .map(|q| EventNotifier::new(&format!("queue{q}")))
        .collect();
    let t = memory.begin();
    for (q, kick) in kicks.iter().enumerate() {
        memory
            .add_eventfd(notify, q as u64 * 4, 2, None, kick)
            .unwrap();
    }
    t.commit();
    let after = (
        memory.address_space(mem_as).unwrap().view(),
        memory.address_space(io_as).unwrap().view(),
    );
    assert!(
        Arc::ptr_eq(&before.0, &after.0),
        "the memory view was re-rendered"
    );
    assert!(
        Arc::ptr_eq(&before.1, &after.1),
        "the port view was re-rendered"
    );
    assert_eq!(
        *mem_log.lock().unwrap(),
        [
            "eventfd_add mem fe000000",
            "eventfd_add mem fe000004",
            "eventfd_add mem fe000008"
        ]
        .map(String::from),
    );
    assert!(
        io_log.lock().unwrap().is_empty(),
        "{:?}",
        io_log.lock().unwrap()
    );
}

/// A map large enough for views of many leaves and several groups (the
/// chunked representation's multi-level paths): random batches of edits
/// spread over the whole map, every commit compared with a full render,
/// with the reference machine's listener log, and every lookup path of
/// the published view checked against a scan of its ranges.
#[test]
fn incremental_render_large_map_splices_equal_full_render() {
    const N: u64 = 3000;
    let worlds: Vec<(Memory, Vec<RegionId>, Log, memtree::SpaceId)> = [true, false]
        .into_iter()
        .map(|incremental| {
            let memory = Memory::new();
            memory.set_incremental_render(incremental);
            let root = memory.new_container("system", 1 << 40, None).unwrap();
            let t = memory.begin();
            let mut regions = Vec::new();
            for i in 0..N {
                let r = memory.new_ram(&format!("r{i}"), 0x1000, None).unwrap();
                // Every third slot left empty, so ranges do not all merge.
                memory
                    .add_subregion_overlap(root, i * 0x1800, r, (i % 3) as i32)
                    .unwrap();
                regions.push(r);
            }
            t.commit();
            let space = memory.new_address_space("mem", root, None).unwrap();
            let log: Log = Arc::default();
            memory
                .register_listener(space, Arc::new(Recorder::with_nops(log.clone())))
                .unwrap();
            memory
                .register_listener(space, Arc::new(Recorder::quiet(log.clone())))
                .unwrap();
            log.lock().unwrap().clear();
            (memory, regions, log, space)
        })
        .collect();
    let mut rng = Rng(0x5eed);
    let first = worlds[0].0.address_space(worlds[0].3).unwrap().view();
    let leaves = first.shared_leaves_with(&first).1;
    assert!(
        leaves > 64,
        "the map must span several groups: {leaves} leaves"
    );
    for step in 0..120 {
        let max = if rng.chance(20) { 40 } else { 3 };
        let batch = 1 + rng.below(max);
        let ops: Vec<(usize, u64, u64)> = (0..batch)
            .map(|_| (rng.below(N as usize), rng.next() % 6, rng.next()))
            .collect();
        for (memory, regions, ..) in &worlds {
            let t = memory.begin();
            for &(r, what, x) in &ops {
                let id = regions[r];
                let _ = match what {
                    0 => memory.set_enabled(id, x % 2 == 0),
                    1 => memory.set_address(id, (x % (N * 0x1800)) & !0x7ff),
                    2 => memory.set_readonly(id, x % 2 == 0),
                    3 => memory.set_size(id, u128::from((x % 4 + 1) * 0x800)),
                    // A run of neighbours at once: leaves shrink and grow.
                    _ => (r..(r + 10 + (x % 60) as usize).min(N as usize))
                        .try_for_each(|j| memory.set_enabled(regions[j], x % 2 == 0)),
                };
            }
            t.commit();
        }
        let ctx = format!("step {step} ops {ops:?}");
        worlds[0]
            .0
            .check_views_against_full_render()
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let (la, lb) = (
            std::mem::take(&mut *worlds[0].2.lock().unwrap()),
            std::mem::take(&mut *worlds[1].2.lock().unwrap()),
        );
        assert!(la == lb, "{ctx}: listener callbacks differ");
        let view = worlds[0].0.address_space(worlds[0].3).unwrap().view();
        let all: Vec<&memtree::FlatRange> = view.iter().collect();
        assert_eq!(all.len(), view.len());
        for _ in 0..200 {
            let a = rng.next() % (N * 0x1800 + 0x1000);
            let expect = all.iter().position(|r| r.contains(a));
            assert_eq!(view.lookup_index(a), expect, "{ctx}: index at {a:#x}");
            let got = view.lookup(a).map(|r| r as *const _);
            assert_eq!(got, expect.map(|i| all[i] as *const _), "{ctx}: {a:#x}");
            if let Some(i) = expect {
                assert!(std::ptr::eq(view.range(i).unwrap(), all[i]));
            }
        }
    }
    // One more toggle of one region: its leaf (and at most a neighbour) is
    // rebuilt, every other leaf is shared with the view before.
    let (memory, regions, _, space) = &worlds[0];
    let before = memory.address_space(*space).unwrap().view();
    let on = memory.region_info(regions[1500]).unwrap().enabled;
    memory.set_enabled(regions[1500], !on).unwrap();
    let after = memory.address_space(*space).unwrap().view();
    let (shared, total) = after.shared_leaves_with(&before);
    assert!(total > 8, "{total} leaves");
    assert!(
        shared + 3 >= total,
        "a toggle rebuilt {} of {total} leaves",
        total - shared
    );
    let (shared, total) = after.shared_table_pages_with(&before);
    assert!(
        total > 4 && shared + 2 >= total,
        "a toggle rebuilt {} of {total} lookup table pages",
        total - shared
    );
    drop(first);
}

/// The census entries of a view of many leaves are its parts (groups and
/// leaves, shared like them): a splice registers only the parts it built,
/// so the number of view entries stays put across toggles; a region is
/// explained through the view's parts; teardown leaves nothing behind.
#[test]
fn incremental_render_large_view_census_follows_the_shared_parts() {
    let memory = Memory::new();
    let root = memory.new_container("system", 1 << 40, None).unwrap();
    let ops: Arc<dyn memtree::MmioOps> = Arc::new(UnimplementedDevice);
    let t = memory.begin();
    let mut regions = Vec::new();
    for i in 0..3000u64 {
        let r = memory
            .new_mmio(&format!("dev{i}"), 0x1000, ops.clone(), None)
            .unwrap();
        memory.add_subregion(root, i * 0x2000, r).unwrap();
        regions.push(r);
    }
    t.commit();
    let space = memory.new_address_space("mem", root, None).unwrap();
    let views = |m: &Memory| m.census().counts()[&memtree::ObjectKind::FlatView];
    let before = views(&memory);
    let view = memory.address_space(space).unwrap().view();
    assert!(
        view.shared_leaves_with(&view).1 > 64,
        "several groups expected"
    );
    for k in 0..20 {
        memory.set_enabled(regions[1234], k % 2 == 1).unwrap();
    }
    drop(view);
    let after = views(&memory);
    assert!(
        after <= before + 4,
        "view entries grew from {before} to {after} over 20 toggles"
    );
    let view = memory.address_space(space).unwrap().view();
    let key = view.lookup(1234 * 0x2000).unwrap().region().census_key();
    let why = memtree::lifecycle::diag::why_alive(memory.census(), key);
    assert!(
        why.iter()
            .any(|c| c.contains("flat view of system ranges") && c.contains("region dev1234")),
        "{why:?}"
    );
    drop(view);
    let report = memory.teardown();
    assert!(report.is_clean(), "{report}");
}
