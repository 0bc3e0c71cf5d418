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
//! `PROPTEST_CASES` overrides the number of sequences (default 1,500; with
//! `MEMTREE_SOAK=1`, 50,000 longer sequences).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use memtree::cache::{MemoryRegionCache, SectionRef};
use memtree::dma::DmaDirection;
use memtree::{
    diag, AccessSizes, DmaMapping, Endianness, MemTxAttrs, MemTxResult, Memory, MmioOps,
    ObjectKind, OwnerId, RegionId, TopologyError,
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
        Ok(addr)
    }
    fn write(&self, _addr: u64, _data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        if self.0.finalized.load(Ordering::SeqCst) {
            self.0.late_calls.fetch_add(1, Ordering::SeqCst);
        }
        MemTxResult::OK
    }
    fn impl_sizes(&self) -> AccessSizes {
        AccessSizes::new(1, 8, true)
    }
    fn endianness(&self) -> Endianness {
        Endianness::Little
    }
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
}

fn region_addr(slot: u64) -> u64 {
    0x10_0000 + slot * 2 * PAGE
}

fn run(ops: &[Op]) {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    let census = memory.census().clone();
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
    };
    let mut maps: Vec<DmaMapping<'_>> = Vec::new();
    let mut sections: Vec<SectionRef> = Vec::new();
    let mut caches: Vec<MemoryRegionCache> = Vec::new();
    for op in ops {
        step(&mut st, op, &space, &mut maps, &mut sections, &mut caches);
        check(&st);
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(r) = reader {
        r.join().unwrap();
    }
    let Run { memory, model, .. } = st;
    let held = maps.iter().filter(|m| m.holds_reference()).count()
        + sections.len()
        + caches.iter().filter(|c| c.id().is_some()).count();
    let report = memory.teardown();
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
    assert!(leaks.is_clean(), "{leaks}");
    assert!(census.double_finalized().is_empty());
    for d in &model.devs {
        assert_eq!(d.probe.runs.load(Ordering::SeqCst), 1);
        assert_eq!(d.probe.late_calls.load(Ordering::SeqCst), 0);
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
            let r = m.unplug(d.id);
            if d.alive {
                r.unwrap();
                model.unplug(dev);
            } else {
                assert_eq!(r.unwrap_err(), TopologyError::NoSuchOwner(d.id));
            }
        }
        Op::Create { kind, owner } => {
            let Some(oid) = model.live_dev(owner) else {
                return;
            };
            let name = format!("r{}", model.regions.len());
            let r = match kind {
                Kind::Ram => m.new_ram(&name, PAGE, oid),
                Kind::Mmio => {
                    let probe = owner.map_or_else(
                        || Arc::new(Probe::default()),
                        |o| model.devs[o].probe.clone(),
                    );
                    m.new_mmio(&name, u128::from(PAGE), Arc::new(Regs(probe)), oid)
                }
                Kind::Container => m.new_container(&name, u128::from(2 * PAGE), oid),
            };
            if owner.is_some_and(|o| !model.devs[o].alive) {
                assert!(matches!(r, Err(TopologyError::NoSuchOwner(_))));
                return;
            }
            model.regions.push(MRegion {
                id: r.unwrap(),
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
            let res = m.destroy_region(x.id);
            if !x.alive {
                assert_eq!(res.unwrap_err(), TopologyError::NoSuchRegion(x.id));
                return;
            }
            let targeted = model
                .regions
                .iter()
                .any(|a| a.alive && a.alias && a.target == Some(r));
            if x.container.is_some() || targeted {
                assert!(matches!(res, Err(TopologyError::InUse { .. })), "{res:?}");
                return;
            }
            res.unwrap();
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
            let res = m.add_subregion(cid, offset, s.id);
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
            }
        }
        Op::Del { sub } => {
            let Some(s) = model.regions.get(sub) else {
                return;
            };
            let cid = match s.container {
                Some(Parent::Region(c)) => model.regions[c].id,
                _ => st.system,
            };
            let res = m.del_subregion(cid, s.id);
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
            }
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
                let _ = maps.remove(i).unmap(access);
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
                sections.remove(i);
            } else if i < caches.len() {
                caches.remove(i);
            }
        }
        Op::Access { slot } => {
            let mut b = [0u8; 8];
            let _ = space.read(region_addr(slot), &mut b, A);
            let _ = space.write(region_addr(slot) + 4, &b, A);
        }
    }
}

fn check(st: &Run) {
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

fn config() -> ProptestConfig {
    let default_cases = if cfg!(miri) {
        4
    } else if soak() {
        50_000
    } else {
        1_500
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

proptest! {
    #![proptest_config(config())]

    #[test]
    fn lifecycle_model_random_sequences_keep_invariants(
        ops in proptest::collection::vec(op(), 1..max_len())
    ) {
        run(&ops);
    }
}

/// A fixed sequence exercising every op once, so a regression shows up with
/// a readable case even before proptest shrinks.
#[test]
fn lifecycle_model_fixed_sequence() {
    run(&[
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
    ]);
}
