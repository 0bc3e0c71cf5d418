//! Model-based random test of the lifecycle (issue 4): random sequences of
//! create/destroy region, add/remove subregion, aliases, plug/unplug device
//! (with child devices), DMA map/unmap, caches, sections, dropped handles,
//! all while a reader thread keeps accessing the address space.
//!
//! After every step the real topology is compared with a small model (which
//! region ids are valid, which container each region is in, which edits are
//! refused and why). Invariants checked throughout and at the end:
//!
//! * nothing finalized is ever touched: device callbacks record any call that
//!   arrives after their owner's finalizer ran;
//! * each finalizer runs at most once, and exactly once after teardown;
//! * no census object is finalized twice;
//! * a teardown with mappings still out names them: every survivor is a
//!   mapping, the address-space handle the mappings borrow, or held through
//!   a mapping; once they are dropped nothing is left.
//!
//! * the published view equals a fresh render of the topology (a no-op
//!   edit that forces a re-render publishes the same ranges);
//! * a KVM-style bookkeeping listener (a map from range start to what
//!   `region_add` / `region_del` told it) equals the published view.
//!
//! The panic-injection variant (issue 14) also makes listeners, MMIO
//! callbacks, finalizers and the `Drop` of device state panic at random
//! points: each step may arm one one-shot fault. After each step a panic
//! reached the caller iff a fault fired, and every invariant above holds;
//! at the end the census recorded exactly the listener, finalizer and
//! device-drop panics that fired, and nothing else survived.
//!
//! `PROPTEST_CASES` overrides the number of sequences (default 800, 400
//! with panics; with `MEMTREE_SOAK=1`, 50,000 and 20,000 longer sequences).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};

use memtree::dma::cache::{MemoryRegionCache, SectionRef};
use memtree::host::mapping_info::DmaDirection;
use memtree::{
    lifecycle::diag, AccessSizes, DmaMapping, Endian, FlatView, MemTxAttrs, MemTxResult, Memory,
    MemoryListener, MmioOps, ObjectKind, OwnerId, RegionId, Section, TopologyError,
};
use proptest::prelude::*;

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;
const SLOTS: u64 = 16;
const PAGE: u64 = 0x1000;

#[derive(Default)]
struct Probe {
    runs: AtomicUsize,
    finalized: AtomicBool,
    late_calls: AtomicUsize,
}

struct Regs(Arc<Probe>);

impl MmioOps for Regs {
    fn read(&self, addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        if self.0.finalized.load(Ordering::SeqCst) {
            self.0.late_calls.fetch_add(1, Ordering::SeqCst);
        }
        maybe_panic(FaultKind::Mmio);
        Ok(addr)
    }
    fn write(&self, _addr: u64, _data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        if self.0.finalized.load(Ordering::SeqCst) {
            self.0.late_calls.fetch_add(1, Ordering::SeqCst);
        }
        maybe_panic(FaultKind::Mmio);
        MemTxResult::OK
    }
    fn impl_sizes(&self) -> AccessSizes {
        AccessSizes::new(1, 8, true)
    }
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

impl Drop for Regs {
    fn drop(&mut self) {
        maybe_panic(FaultKind::DeviceDrop);
    }
}

// ---- fault injection -------------------------------------------------------

/// Where an injected panic fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultKind {
    ListenerBegin,
    ListenerAdd,
    ListenerDel,
    ListenerCommit,
    Finalizer,
    DeviceDrop,
    /// An MMIO callback (armed only for accesses; bounce buffers are
    /// covered by `lifecycle_model_bounce_panics_*`).
    Mmio,
}

impl FaultKind {
    /// Whether memtree catches and records this panic in the census (MMIO
    /// callbacks run on the data plane and simply unwind to the accessor).
    fn recorded(self) -> bool {
        self != FaultKind::Mmio
    }
}

/// A one-shot fault: the `nth` (from 0) occurrence of `kind` during one
/// step panics.
#[derive(Clone, Copy, Debug)]
struct Fault {
    kind: FaultKind,
    nth: u8,
}

fn fault() -> impl Strategy<Value = Option<Fault>> {
    let kind = prop_oneof![
        Just(FaultKind::ListenerBegin),
        Just(FaultKind::ListenerAdd),
        Just(FaultKind::ListenerDel),
        Just(FaultKind::ListenerCommit),
        Just(FaultKind::Finalizer),
        Just(FaultKind::DeviceDrop),
        Just(FaultKind::Mmio),
    ];
    prop_oneof![
        1 => Just(None),
        2 => (kind, 0u8..3).prop_map(|(kind, nth)| Some(Fault { kind, nth })),
    ]
}

const INJECTED: &str = "injected panic";

thread_local! {
    /// The fault armed for the current step (only the test thread arms one:
    /// the reader thread never panics).
    static ARMED: Cell<Option<Fault>> = const { Cell::new(None) };
    /// Faults that fired on this thread during the current step.
    static FIRED: Cell<usize> = const { Cell::new(0) };
    /// Fired faults of kinds the census records, over the whole run.
    static RECORDED: Cell<usize> = const { Cell::new(0) };
    /// A call of the current step panicked (`guard` caught it).
    static STEP_PANICKED: Cell<bool> = const { Cell::new(false) };
}

fn maybe_panic(kind: FaultKind) {
    let fire = ARMED.with(|a| match a.get() {
        Some(f) if f.kind == kind && f.nth == 0 => {
            a.set(None);
            true
        }
        Some(f) if f.kind == kind => {
            a.set(Some(Fault {
                kind,
                nth: f.nth - 1,
            }));
            false
        }
        _ => false,
    });
    if fire {
        FIRED.with(|c| c.set(c.get() + 1));
        if kind.recorded() {
            RECORDED.with(|c| c.set(c.get() + 1));
        }
        std::panic::panic_any(format!("{INJECTED}: {kind:?}"));
    }
}

/// Keeps injected panics off stderr (every other panic still prints).
fn quiet_injected_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let injected = info
                .payload()
                .downcast_ref::<String>()
                .is_some_and(|s| s.starts_with(INJECTED));
            if !injected {
                default(info);
            }
        }));
    });
}

/// A listener that panics where a fault says.
struct Chaos(u32);

impl MemoryListener for Chaos {
    fn priority(&self) -> u32 {
        self.0
    }
    fn name(&self) -> &str {
        "chaos"
    }
    fn begin(&self) {
        maybe_panic(FaultKind::ListenerBegin);
    }
    fn commit(&self) {
        maybe_panic(FaultKind::ListenerCommit);
    }
    fn region_add(&self, _s: &Section<'_>) {
        maybe_panic(FaultKind::ListenerAdd);
    }
    fn region_del(&self, _s: &Section<'_>) {
        maybe_panic(FaultKind::ListenerDel);
    }
}

/// One published range, as the bookkeeping listener and the fresh-render
/// check compare it.
type RangeKey = (u64, u64, RegionId, u64, memtree::RangeAttrs);

fn key(r: &memtree::FlatRange) -> RangeKey {
    (
        r.start(),
        r.last(),
        r.region().id(),
        r.offset_in_region(),
        *r.attrs(),
    )
}

fn ranges(view: &FlatView) -> Vec<RangeKey> {
    view.ranges().iter().map(key).collect()
}

/// KVM-style slot bookkeeping: what `region_add` / `region_del` said is
/// mapped, by range start; anything inconsistent (an add over a live
/// entry, a del of something else) is an error.
#[derive(Default)]
struct Book {
    slots: Mutex<BTreeMap<u64, RangeKey>>,
    errors: Mutex<Vec<String>>,
}

impl MemoryListener for Book {
    fn priority(&self) -> u32 {
        10
    }
    fn name(&self) -> &str {
        "book"
    }
    fn region_add(&self, s: &Section<'_>) {
        let k = key(s.range);
        if let Some(old) = self.slots.lock().unwrap().insert(k.0, k) {
            self.errors
                .lock()
                .unwrap()
                .push(format!("add over live {old:?}"));
        }
    }
    fn region_del(&self, s: &Section<'_>) {
        let k = key(s.range);
        match self.slots.lock().unwrap().remove(&k.0) {
            Some(old) if old == k => {}
            other => self
                .errors
                .lock()
                .unwrap()
                .push(format!("del of {k:?} found {other:?}")),
        }
    }
}

/// Runs one memtree call; `None` if it panicked (then a fault must have
/// fired: checked after the step).
fn guard<T>(f: impl FnOnce() -> T) -> Option<T> {
    let r = catch_unwind(AssertUnwindSafe(f)).ok();
    if r.is_none() {
        STEP_PANICKED.with(|p| p.set(true));
    }
    r
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Ram,
    Mmio,
    Container,
}

#[derive(Clone, Debug)]
enum Op {
    Plug {
        parent: Option<usize>,
    },
    Unplug {
        dev: usize,
    },
    Create {
        kind: Kind,
        owner: Option<usize>,
    },
    Alias {
        target: usize,
        owner: Option<usize>,
    },
    Destroy {
        r: usize,
    },
    /// `container: None` = the system container.
    Add {
        container: Option<usize>,
        sub: usize,
        slot: u64,
    },
    Del {
        sub: usize,
    },
    Map {
        slot: u64,
        off: u64,
        len: u64,
        dir: u8,
    },
    Unmap {
        i: usize,
        access: u64,
    },
    Find {
        slot: u64,
    },
    Cache {
        slot: u64,
    },
    DropHandle {
        i: usize,
    },
    Access {
        slot: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let idx = 0usize..12;
    prop_oneof![
        2 => proptest::option::of(0usize..6).prop_map(|parent| Op::Plug { parent }),
        1 => (0usize..6).prop_map(|dev| Op::Unplug { dev }),
        4 => (prop_oneof![Just(Kind::Ram), Just(Kind::Mmio), Just(Kind::Container)],
              proptest::option::of(0usize..6))
            .prop_map(|(kind, owner)| Op::Create { kind, owner }),
        1 => (idx.clone(), proptest::option::of(0usize..6))
            .prop_map(|(target, owner)| Op::Alias { target, owner }),
        1 => idx.clone().prop_map(|r| Op::Destroy { r }),
        5 => (proptest::option::of(idx.clone()), idx.clone(), 0..SLOTS)
            .prop_map(|(container, sub, slot)| Op::Add { container, sub, slot }),
        2 => idx.clone().prop_map(|sub| Op::Del { sub }),
        3 => (0..SLOTS, 0..PAGE, 1..2 * PAGE, 0u8..3)
            .prop_map(|(slot, off, len, dir)| Op::Map { slot, off, len, dir }),
        2 => (0usize..8, 0..PAGE).prop_map(|(i, access)| Op::Unmap { i, access }),
        1 => (0..SLOTS).prop_map(|slot| Op::Find { slot }),
        1 => (0..SLOTS).prop_map(|slot| Op::Cache { slot }),
        1 => (0usize..4).prop_map(|i| Op::DropHandle { i }),
        2 => (0..SLOTS).prop_map(|slot| Op::Access { slot }),
    ]
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Parent {
    System,
    Region(usize),
}

struct MRegion {
    id: RegionId,
    owner: Option<usize>,
    alias: bool,
    /// Ownerless RAM: machine-lifetime memory, freed with the last
    /// address-space handle rather than at teardown.
    ownerless_ram: bool,
    alive: bool,
    container: Option<Parent>,
    target: Option<usize>,
}

struct MDev {
    id: OwnerId,
    parent: Option<usize>,
    alive: bool,
    probe: Arc<Probe>,
}

#[derive(Default)]
struct Model {
    regions: Vec<MRegion>,
    devs: Vec<MDev>,
}

impl Model {
    fn live_dev(&self, d: Option<usize>) -> Option<Option<OwnerId>> {
        match d {
            None => Some(None),
            Some(i) => self.devs.get(i).map(|d| Some(d.id)),
        }
    }

    /// Whether `parent` is reachable from `child` through subregion and
    /// alias-target links (what makes an add a loop).
    fn reaches(&self, from: usize, to: usize) -> bool {
        let mut stack = vec![from];
        let mut seen = vec![false; self.regions.len()];
        while let Some(r) = stack.pop() {
            if r == to {
                return true;
            }
            if std::mem::replace(&mut seen[r], true) {
                continue;
            }
            for (i, s) in self.regions.iter().enumerate() {
                if s.alive && s.container == Some(Parent::Region(r)) {
                    stack.push(i);
                }
            }
            if let Some(t) = self.regions[r].target {
                stack.push(t);
            }
        }
        false
    }

    fn unplug(&mut self, d: usize) {
        let mut dying = vec![d];
        let mut i = 0;
        while i < dying.len() {
            for (j, c) in self.devs.iter().enumerate() {
                if c.alive && c.parent == Some(dying[i]) && !dying.contains(&j) {
                    dying.push(j);
                }
            }
            i += 1;
        }
        for &x in &dying {
            self.devs[x].alive = false;
        }
        for r in self.regions.iter_mut() {
            if r.alive && r.owner.is_some_and(|o| dying.contains(&o)) {
                r.alive = false;
                r.container = None;
            }
        }
        self.detach_from_dead();
    }

    fn detach_from_dead(&mut self) {
        let dead: Vec<bool> = self.regions.iter().map(|r| !r.alive).collect();
        for r in self.regions.iter_mut() {
            if let Some(Parent::Region(c)) = r.container {
                if dead[c] {
                    r.container = None;
                }
            }
            if r.target.is_some_and(|t| dead[t]) {
                r.target = None;
            }
        }
    }
}

struct Run {
    memory: Memory,
    system: RegionId,
    model: Model,
    book: Arc<Book>,
}

fn region_addr(slot: u64) -> u64 {
    0x10_0000 + slot * 2 * PAGE
}

fn run(ops: &[(Op, Option<Fault>)]) {
    quiet_injected_panics();
    RECORDED.with(|c| c.set(0));
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    let census = memory.census().clone();
    let book = Arc::new(Book::default());
    memory.register_listener(sid, Arc::new(Chaos(0))).unwrap();
    memory.register_listener(sid, book.clone()).unwrap();
    memory.register_listener(sid, Arc::new(Chaos(20))).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = (!cfg!(miri)).then(|| {
        let space = space.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            let mut buf = [0u8; 16];
            while !stop.load(Ordering::Relaxed) {
                let addr = region_addr(i % SLOTS) + (i * 7) % PAGE;
                let _ = space.read(addr, &mut buf, A);
                let _ = space.write(addr, &buf[..4], A);
                i = i.wrapping_add(1);
                std::thread::yield_now();
            }
        })
    });
    let mut st = Run {
        memory,
        system,
        model: Model::default(),
        book,
    };
    let mut maps: Vec<DmaMapping<'_>> = Vec::new();
    let mut sections: Vec<SectionRef> = Vec::new();
    let mut caches: Vec<MemoryRegionCache> = Vec::new();
    for (op, fault) in ops {
        // MMIO faults only for accesses (see `FaultKind::Mmio`).
        let fault = fault.filter(|f| f.kind != FaultKind::Mmio || matches!(op, Op::Access { .. }));
        FIRED.with(|c| c.set(0));
        STEP_PANICKED.with(|p| p.set(false));
        ARMED.with(|a| a.set(fault));
        step(&mut st, op, &space, &mut maps, &mut sections, &mut caches);
        let panicked = STEP_PANICKED.with(Cell::get);
        ARMED.with(|a| a.set(None));
        let fired = FIRED.with(Cell::get);
        assert!(fired <= 1, "one-shot fault fired {fired} times");
        assert_eq!(
            panicked,
            fired > 0,
            "{op:?} with {fault:?}: a panic reaches the caller iff a fault fired"
        );
        check(&st, &space);
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(r) = reader {
        r.join().unwrap();
    }
    let recorded = RECORDED.with(Cell::get);
    let Run { memory, model, .. } = st;
    let held = maps.iter().filter(|m| m.holds_reference()).count()
        + sections.len()
        + caches.iter().filter(|c| c.id().is_some()).count();
    let report = memory.teardown();
    assert_eq!(report.panics.len(), recorded, "{report}");
    let mapping_survivors = report
        .survivors
        .iter()
        .filter(|(e, _)| e.kind == ObjectKind::Mapping)
        .count();
    assert_eq!(mapping_survivors, held, "{report}");
    let machine_lifetime: Vec<String> = model
        .regions
        .iter()
        .enumerate()
        .filter(|(_, r)| r.ownerless_ram)
        .map(|(i, _)| format!("r{i}"))
        .collect();
    for (e, chains) in &report.survivors {
        // Ownerless memory outlives the machine while the address-space
        // handle (held here by `space`) lives; it goes with the handle.
        let explained = e.kind == ObjectKind::Mapping
            || (e.kind == ObjectKind::AddressSpace && e.name == "memory")
            || (e.kind == ObjectKind::Backend && machine_lifetime.contains(&e.name))
            || chains.iter().all(|c| c.starts_with("held by mapping #"));
        assert!(explained, "unexplained survivor {e:?}:\n{report}");
    }
    drop(maps);
    drop(sections);
    drop(caches);
    drop(space);
    let leaks = diag::leak_report(&census);
    assert!(leaks.survivors.is_empty(), "{leaks}");
    assert_eq!(leaks.panics.len(), recorded, "{leaks}");
    assert!(census.double_finalized().is_empty());
    for d in &model.devs {
        assert_eq!(d.probe.runs.load(Ordering::SeqCst), 1);
        assert_eq!(d.probe.late_calls.load(Ordering::SeqCst), 0);
    }
}

/// Makes region, device and mapping indices name an existing one (modulo
/// the current count), so that most steps do something.
fn wrap_indices(op: &Op, regions: usize, devs: usize, maps: usize) -> Op {
    let w = |i: usize, n: usize| if n > 0 { i % n } else { i };
    let r = |i| w(i, regions);
    let d = |i| w(i, devs);
    match op.clone() {
        Op::Plug { parent } => Op::Plug {
            parent: parent.map(d),
        },
        Op::Unplug { dev } => Op::Unplug { dev: d(dev) },
        Op::Create { kind, owner } => Op::Create {
            kind,
            owner: owner.map(d),
        },
        Op::Alias { target, owner } => Op::Alias {
            target: r(target),
            owner: owner.map(d),
        },
        Op::Destroy { r: x } => Op::Destroy { r: r(x) },
        Op::Add {
            container,
            sub,
            slot,
        } => Op::Add {
            container: container.map(r),
            sub: r(sub),
            slot,
        },
        Op::Del { sub } => Op::Del { sub: r(sub) },
        Op::Unmap { i, access } => Op::Unmap {
            i: w(i, maps),
            access,
        },
        other => other,
    }
}

fn step<'a>(
    st: &mut Run,
    op: &Op,
    space: &'a memtree::AddressSpace,
    maps: &mut Vec<DmaMapping<'a>>,
    sections: &mut Vec<SectionRef>,
    caches: &mut Vec<MemoryRegionCache>,
) {
    let m = &st.memory;
    let model = &mut st.model;
    let op = &wrap_indices(op, model.regions.len(), model.devs.len(), maps.len());
    match *op {
        Op::Plug { parent } => {
            let parent = parent.filter(|&p| p < model.devs.len());
            let pid = parent.map(|p| model.devs[p].id);
            let name = format!("dev{}", model.devs.len());
            let r = m.new_owner(&name, pid);
            match parent {
                Some(p) if !model.devs[p].alive => {
                    assert!(matches!(r, Err(TopologyError::NoSuchOwner(_))));
                }
                _ => {
                    let id = r.unwrap();
                    let probe = Arc::new(Probe::default());
                    let p2 = probe.clone();
                    m.set_finalizer(
                        id,
                        Box::new(move || {
                            p2.runs.fetch_add(1, Ordering::SeqCst);
                            p2.finalized.store(true, Ordering::SeqCst);
                            maybe_panic(FaultKind::Finalizer);
                        }),
                    )
                    .unwrap();
                    model.devs.push(MDev {
                        id,
                        parent,
                        alive: true,
                        probe,
                    });
                }
            }
        }
        Op::Unplug { dev } => {
            let Some(d) = model.devs.get(dev) else { return };
            let r = guard(|| m.unplug(d.id));
            if d.alive {
                // `None`: a fault panicked after the unplug was done.
                if let Some(r) = r {
                    r.unwrap();
                }
                model.unplug(dev);
            } else {
                let r = r.expect("a refused unplug runs nobody's code");
                assert_eq!(r.unwrap_err(), TopologyError::NoSuchOwner(d.id));
            }
        }
        Op::Create { kind, owner } => {
            let Some(oid) = model.live_dev(owner) else {
                return;
            };
            let name = format!("r{}", model.regions.len());
            let probe = match (kind, owner) {
                (Kind::Mmio, Some(o)) => model.devs[o].probe.clone(),
                _ => Arc::new(Probe::default()),
            };
            // A refused MMIO region drops its device state: that may panic.
            let r = guard(|| match kind {
                Kind::Ram => m.new_ram(&name, u128::from(PAGE), oid),
                Kind::Mmio => m.new_mmio(&name, u128::from(PAGE), Arc::new(Regs(probe)), oid),
                Kind::Container => m.new_container(&name, u128::from(2 * PAGE), oid),
            });
            if owner.is_some_and(|o| !model.devs[o].alive) {
                assert!(r.is_none_or(|r| matches!(r, Err(TopologyError::NoSuchOwner(_)))));
                return;
            }
            let id = r.expect("creating a region runs nobody's code").unwrap();
            model.regions.push(MRegion {
                id,
                owner,
                alias: false,
                ownerless_ram: owner.is_none() && matches!(kind, Kind::Ram),
                alive: true,
                container: None,
                target: None,
            });
        }
        Op::Alias { target, owner } => {
            let Some(oid) = model.live_dev(owner) else {
                return;
            };
            let Some(t) = model.regions.get(target) else {
                return;
            };
            let r = m.new_alias("alias", t.id, 0, u128::from(PAGE), oid);
            if owner.is_some_and(|o| !model.devs[o].alive) {
                assert!(r.is_err());
                return;
            }
            if !t.alive {
                assert_eq!(r.unwrap_err(), TopologyError::NoSuchRegion(t.id));
                return;
            }
            model.regions.push(MRegion {
                id: r.unwrap(),
                owner,
                alias: true,
                ownerless_ram: false,
                alive: true,
                container: None,
                target: Some(target),
            });
        }
        Op::Destroy { r } => {
            let Some(x) = model.regions.get(r) else {
                return;
            };
            let res = guard(|| m.destroy_region(x.id));
            if !x.alive {
                let res = res.expect("a refusal runs nobody's code");
                assert_eq!(res.unwrap_err(), TopologyError::NoSuchRegion(x.id));
                return;
            }
            let targeted = model
                .regions
                .iter()
                .any(|a| a.alive && a.alias && a.target == Some(r));
            if x.container.is_some() || targeted {
                let res = res.expect("a refusal runs nobody's code");
                assert!(matches!(res, Err(TopologyError::InUse { .. })), "{res:?}");
                return;
            }
            if let Some(res) = res {
                res.unwrap();
            }
            model.regions[r].alive = false;
            model.detach_from_dead();
        }
        Op::Add {
            container,
            sub,
            slot,
        } => {
            let Some(s) = model.regions.get(sub) else {
                return;
            };
            let (cid, parent) = match container {
                None => (st.system, Parent::System),
                Some(c) => match model.regions.get(c) {
                    Some(x) => (x.id, Parent::Region(c)),
                    None => return,
                },
            };
            let offset = match parent {
                Parent::System => region_addr(slot),
                Parent::Region(_) => (slot % 2) * PAGE,
            };
            let res = guard(|| m.add_subregion(cid, offset, s.id));
            let panicked = res.is_none();
            let res = res.unwrap_or(Ok(()));
            let c_alive = match parent {
                Parent::System => true,
                Parent::Region(c) => model.regions[c].alive,
            };
            if !c_alive || !s.alive {
                assert!(
                    matches!(res, Err(TopologyError::NoSuchRegion(_))),
                    "{res:?}"
                );
            } else if matches!(parent, Parent::Region(c) if model.regions[c].alias) {
                assert!(
                    matches!(res, Err(TopologyError::AliasCannotContain(_))),
                    "{res:?}"
                );
            } else if s.container.is_some() {
                assert!(
                    matches!(res, Err(TopologyError::AlreadyInContainer { .. })),
                    "{res:?}"
                );
            } else if matches!(parent, Parent::Region(c) if model.reaches(sub, c)) {
                assert!(matches!(res, Err(TopologyError::Loop { .. })), "{res:?}");
            } else {
                res.unwrap();
                model.regions[sub].container = Some(parent);
                return;
            }
            assert!(!panicked, "a refused add panicked");
        }
        Op::Del { sub } => {
            let Some(s) = model.regions.get(sub) else {
                return;
            };
            let cid = match s.container {
                Some(Parent::Region(c)) => model.regions[c].id,
                _ => st.system,
            };
            let res = guard(|| m.del_subregion(cid, s.id));
            let panicked = res.is_none();
            let res = res.unwrap_or(Ok(()));
            if !s.alive {
                assert!(matches!(res, Err(TopologyError::NoSuchRegion(_))));
            } else if s.container.is_none() {
                assert!(
                    matches!(res, Err(TopologyError::NotASubregion { .. })),
                    "{res:?}"
                );
            } else {
                res.unwrap();
                model.regions[sub].container = None;
                return;
            }
            assert!(!panicked, "a refused del panicked");
        }
        Op::Map {
            slot,
            off,
            len,
            dir,
        } => {
            let dir = [
                DmaDirection::ToDevice,
                DmaDirection::FromDevice,
                DmaDirection::Bidirectional,
            ][dir as usize];
            if let Ok(mut mapping) = space.map(region_addr(slot) + off, len, dir, A) {
                assert!(!mapping.is_empty() && mapping.len() <= len);
                let mut b = [0u8; 1];
                mapping.read(0, &mut b).unwrap();
                if dir.writes() {
                    mapping.write(0, &[0x5a]).unwrap();
                }
                maps.push(mapping);
            }
        }
        Op::Unmap { i, access } => {
            if i < maps.len() {
                let m = maps.remove(i);
                let _ = guard(move || m.unmap(access));
            }
        }
        Op::Find { slot } => sections.extend(space.find(region_addr(slot), PAGE)),
        Op::Cache { slot } => {
            if let Ok(c) =
                MemoryRegionCache::new(space, region_addr(slot), 64, DmaDirection::Bidirectional)
            {
                let _ = c.store(0, [1u8, 2, 3, 4]);
                let _ = c.load::<8>(0);
                caches.push(c);
            }
        }
        Op::DropHandle { i } => {
            if i < sections.len() {
                let s = sections.remove(i);
                guard(move || drop(s));
            } else if i < caches.len() {
                let c = caches.remove(i);
                guard(move || drop(c));
            }
        }
        Op::Access { slot } => {
            let mut b = [0u8; 8];
            guard(|| space.read(region_addr(slot), &mut b, A));
            guard(|| space.write(region_addr(slot) + 4, &b, A));
        }
    }
}

fn check(st: &Run, space: &memtree::AddressSpace) {
    // The published view is a fresh render: forcing a re-render (a no-op
    // edit of the root) publishes the same ranges.
    let published = ranges(&space.view());
    st.memory.set_enabled(st.system, true).unwrap();
    assert_eq!(ranges(&space.view()), published, "published view is stale");
    // The bookkeeping listener saw exactly the published ranges.
    let book: Vec<RangeKey> = st.book.slots.lock().unwrap().values().copied().collect();
    assert_eq!(
        book, published,
        "listener bookkeeping differs from the view"
    );
    let errors = st.book.errors.lock().unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    drop(errors);
    for r in &st.model.regions {
        let info = st.memory.region_info(r.id);
        assert_eq!(info.is_ok(), r.alive, "region {:?} alive mismatch", r.id);
        if let Ok(info) = info {
            let expect = match r.container {
                None => None,
                Some(Parent::System) => Some(st.system),
                Some(Parent::Region(c)) => Some(st.model.regions[c].id),
            };
            assert_eq!(info.container, expect, "container of {}", info.name);
            if r.alias {
                let t = r.target.map(|t| st.model.regions[t].id);
                assert_eq!(info.alias_target, t, "alias target of {}", info.name);
            }
        }
    }
    for d in &st.model.devs {
        assert!(
            d.probe.runs.load(Ordering::SeqCst) <= 1,
            "finalizer ran twice"
        );
        assert_eq!(
            d.probe.late_calls.load(Ordering::SeqCst),
            0,
            "use after finalize"
        );
        if d.alive {
            assert_eq!(
                d.probe.runs.load(Ordering::SeqCst),
                0,
                "live device finalized"
            );
        }
    }
    assert!(st.memory.census().double_finalized().is_empty());
}

fn soak() -> bool {
    std::env::var("MEMTREE_SOAK").is_ok_and(|v| v == "1")
}

fn config(default_cases: u32, soak_cases: u32) -> ProptestConfig {
    let default_cases = if cfg!(miri) {
        4
    } else if soak() {
        soak_cases
    } else {
        default_cases
    };
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn max_len() -> usize {
    if soak() {
        200
    } else {
        40
    }
}

fn no_faults(ops: &[Op]) -> Vec<(Op, Option<Fault>)> {
    ops.iter().map(|op| (op.clone(), None)).collect()
}

proptest! {
    #![proptest_config(config(800, 50_000))]

    #[test]
    fn lifecycle_model_random_sequences_keep_invariants(
        ops in proptest::collection::vec(op(), 1..max_len())
    ) {
        run(&no_faults(&ops));
    }
}

proptest! {
    #![proptest_config(config(400, 20_000))]

    /// Issue 14: listeners, MMIO callbacks, finalizers and device `Drop`s
    /// panic at random points; every invariant still holds after each step
    /// and the panic reaches the caller.
    #[test]
    fn lifecycle_model_panics_at_random_points_keep_invariants(
        steps in proptest::collection::vec((op(), fault()), 1..max_len())
    ) {
        run(&steps);
    }
}

/// A fixed sequence exercising every op once, so a regression shows up with
/// a readable case even before proptest shrinks.
#[test]
fn lifecycle_model_fixed_sequence() {
    run(&no_faults(&[
        Op::Plug { parent: None },
        Op::Plug { parent: Some(0) },
        Op::Create {
            kind: Kind::Container,
            owner: Some(0),
        },
        Op::Create {
            kind: Kind::Ram,
            owner: Some(1),
        },
        Op::Create {
            kind: Kind::Mmio,
            owner: Some(1),
        },
        Op::Add {
            container: Some(0),
            sub: 1,
            slot: 0,
        },
        Op::Add {
            container: None,
            sub: 0,
            slot: 1,
        },
        Op::Add {
            container: None,
            sub: 2,
            slot: 3,
        },
        Op::Alias {
            target: 0,
            owner: None,
        },
        Op::Add {
            container: Some(0),
            sub: 3,
            slot: 1,
        },
        Op::Add {
            container: None,
            sub: 3,
            slot: 5,
        },
        Op::Map {
            slot: 1,
            off: 0,
            len: 0x100,
            dir: 2,
        },
        Op::Map {
            slot: 3,
            off: 0,
            len: 0x10,
            dir: 0,
        },
        Op::Find { slot: 3 },
        Op::Cache { slot: 1 },
        Op::Access { slot: 3 },
        Op::Unplug { dev: 0 },
        Op::Unmap { i: 0, access: 0x10 },
        Op::Destroy { r: 3 },
        Op::Del { sub: 3 },
        Op::Destroy { r: 3 },
        Op::DropHandle { i: 0 },
    ]));
}

/// One step of the bounce-buffer panic model. `fault` arms a one-shot
/// panic of that kind for the step: an MMIO callback (the prefill read of
/// a map, the write-back of an unmap or drop), or — when the step releases
/// the last reference to an unplugged device — its state's `Drop` or its
/// finalizer.
#[derive(Clone, Debug)]
enum BounceOp {
    /// Maps `len` bytes at `off` of device `dev`'s MMIO (a bounce buffer).
    Map {
        dev: usize,
        off: u64,
        len: u64,
        dir: u8,
        fault: Option<FaultKind>,
    },
    /// Unmaps mapping `i` with `access` bytes written.
    Unmap {
        i: usize,
        access: u64,
        fault: Option<FaultKind>,
    },
    /// Drops mapping `i` without unmapping (the drop writes back all of
    /// it).
    Drop { i: usize, fault: Option<FaultKind> },
    /// Unplugs device `dev` (its mappings keep it alive until they go).
    Unplug { dev: usize },
}

fn bounce_fault() -> impl Strategy<Value = Option<FaultKind>> {
    prop_oneof![
        2 => Just(None),
        2 => Just(Some(FaultKind::Mmio)),
        1 => Just(Some(FaultKind::DeviceDrop)),
        1 => Just(Some(FaultKind::Finalizer)),
    ]
}

fn bounce_op() -> impl Strategy<Value = BounceOp> {
    prop_oneof![
        4 => (0usize..2, 0..PAGE, 1u64..256, 0u8..3, bounce_fault()).prop_map(
            |(dev, off, len, dir, fault)| BounceOp::Map {
                dev,
                off,
                len,
                dir,
                fault
            }
        ),
        2 => (0usize..4, 0..256u64, bounce_fault())
            .prop_map(|(i, access, fault)| BounceOp::Unmap { i, access, fault }),
        2 => (0usize..4, bounce_fault()).prop_map(|(i, fault)| BounceOp::Drop { i, fault }),
        1 => (0usize..2).prop_map(|dev| BounceOp::Unplug { dev }),
    ]
}

/// Bounce accounting equals what the held mappings reserve, and every
/// mapping-table entry belongs to a held mapping.
fn check_bounce(space: &memtree::AddressSpace, maps: &[DmaMapping<'_>]) {
    let reserved: u64 = maps.iter().filter(|m| m.is_bounce()).map(|m| m.len()).sum();
    assert_eq!(space.bounce_in_use(), reserved, "bounce accounting");
    let recorded = maps.iter().filter(|m| m.holds_reference()).count();
    assert_eq!(
        space.outstanding_mappings().len(),
        recorded,
        "a mapping-table entry outlived its mapping"
    );
}

fn run_bounce(ops: &[BounceOp]) {
    quiet_injected_panics();
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let mut owners = Vec::new();
    for dev in 0..2 {
        let owner = memory.new_owner(&format!("dev{dev}"), None).unwrap();
        memory
            .set_finalizer(owner, Box::new(|| maybe_panic(FaultKind::Finalizer)))
            .unwrap();
        owners.push(Some(owner));
        let regs = memory
            .new_mmio(
                &format!("dev{dev}.regs"),
                u128::from(PAGE),
                Arc::new(Regs(Arc::default())),
                Some(owner),
            )
            .unwrap();
        memory
            .add_subregion(system, region_addr(dev), regs)
            .unwrap();
    }
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    space.set_max_bounce_buffer_size(1024);
    let mut maps: Vec<DmaMapping<'_>> = Vec::new();
    for op in ops {
        let fault = match *op {
            BounceOp::Map { fault, .. }
            | BounceOp::Unmap { fault, .. }
            | BounceOp::Drop { fault, .. } => fault,
            BounceOp::Unplug { .. } => None,
        };
        FIRED.with(|c| c.set(0));
        STEP_PANICKED.with(|p| p.set(false));
        ARMED.with(|a| a.set(fault.map(|kind| Fault { kind, nth: 0 })));
        match *op {
            BounceOp::Map {
                dev, off, len, dir, ..
            } => {
                let dir = [
                    DmaDirection::ToDevice,
                    DmaDirection::FromDevice,
                    DmaDirection::Bidirectional,
                ][dir as usize];
                if let Some(Ok(m)) = guard(|| space.map(region_addr(dev as u64) + off, len, dir, A))
                {
                    maps.push(m);
                }
            }
            BounceOp::Unmap { i, access, .. } => {
                if !maps.is_empty() {
                    let m = maps.remove(i % maps.len());
                    guard(move || m.unmap(access));
                }
            }
            BounceOp::Drop { i, .. } => {
                if !maps.is_empty() {
                    let m = maps.remove(i % maps.len());
                    guard(move || drop(m));
                }
            }
            BounceOp::Unplug { dev } => {
                if let Some(owner) = owners[dev].take() {
                    memory.unplug(owner).unwrap();
                }
            }
        }
        ARMED.with(|a| a.set(None));
        let (fired, panicked) = (FIRED.with(Cell::get), STEP_PANICKED.with(Cell::get));
        assert_eq!(
            panicked,
            fired > 0,
            "{op:?}: a panic reaches the caller iff one fired"
        );
        check_bounce(&space, &maps);
    }
    maps.clear();
    check_bounce(&space, &maps);
    assert_eq!(space.bounce_in_use(), 0);
    drop(maps);
    drop(space);
    let report = memory.teardown();
    assert!(report.survivors.is_empty(), "{report}");
}

/// Issue 14 (panic injection, DMA part): MMIO callbacks panic during a
/// bounce buffer's prefill (map) and write-back (unmap, drop); bounce
/// accounting returns to zero and no mapping-table entry stays live.
#[test]
fn lifecycle_model_bounce_panics_return_accounting_to_zero() {
    let mut runner = proptest::test_runner::TestRunner::new(config(300, 20_000));
    runner
        .run(
            &proptest::collection::vec(bounce_op(), 1..max_len()),
            |ops| {
                run_bounce(&ops);
                Ok(())
            },
        )
        .unwrap();
}
