//! Property test: memtree's flat views agree with a brute-force reference.
//!
//! Random region trees (containers, RAM and MMIO leaves that may themselves
//! hold subregions, aliases of aliases, signed and equal priorities, disabled,
//! readonly, nonvolatile and unmergeable regions, sizes up to 2^64, regions at
//! the top of the address space) are built through the public API, then
//! edited (toggle, move, resize, re-offset, add, remove; alone or batched in
//! transactions). After every commit each address space's view is compared
//! with a reference that is written here independently of `src/render.rs`:
//! it keeps its own copy of the tree (with its own sibling order: descending
//! priority, newest first), finds the physical root (§2.5) and answers, for
//! one address at a time, which region serves it by walking the tree exactly
//! as §2.3 describes (priority order, first terminating hit wins, alias
//! translation, clipping, OR-ed flags).
//!
//! Probe addresses are every region edge (±1) on every rendered path, every
//! view boundary (±1) and random addresses, so between two consecutive
//! probes both sides are linear: the comparison is exhaustive unless a tree
//! has more paths than the probe budget.
//!
//! Default: 1000 cases (a few seconds in debug). More with
//! `PROPTEST_CASES=20000 cargo test --release --test render_model`.

use std::collections::BTreeSet;
use std::sync::Arc;

use memtree::{
    FlatView, Memory, RegionId, RegionKind, SpaceId, TopologyError, UnimplementedDevice,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const FULL: u128 = 1 << 64;

// ---- the reference model -----------------------------------------------------

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Kind {
    Container,
    Ram,
    Mmio,
    Alias { target: usize, offset: u64 },
}

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
struct Flags {
    readonly: bool,
    nonvolatile: bool,
    unmergeable: bool,
}

impl Flags {
    fn or(self, o: Flags) -> Flags {
        Flags {
            readonly: self.readonly || o.readonly,
            nonvolatile: self.nonvolatile || o.nonvolatile,
            unmergeable: self.unmergeable || o.unmergeable,
        }
    }
}

#[derive(Clone, Debug)]
struct Node {
    id: RegionId,
    kind: Kind,
    size: u128,
    addr: u64,
    priority: i32,
    enabled: bool,
    flags: Flags,
    parent: Option<usize>,
    /// When the region was last added to its container (re-adds count).
    added: u64,
}

/// Who serves an address: (region, offset in region, propagated flags).
type Hit = (RegionId, i128, Flags);

#[derive(Default)]
struct Model {
    nodes: Vec<Node>,
    clock: u64,
}

impl Model {
    /// Subregions in rendering order: higher priority first, then the most
    /// recently added first.
    fn children(&self, r: usize) -> Vec<usize> {
        let mut c: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| self.nodes[j].parent == Some(r))
            .collect();
        c.sort_by_key(|&j| {
            (
                std::cmp::Reverse(self.nodes[j].priority),
                std::cmp::Reverse(self.nodes[j].added),
            )
        });
        c
    }

    fn terminates(&self, r: usize) -> bool {
        matches!(self.nodes[r].kind, Kind::Ram | Kind::Mmio)
    }

    /// The region serving `a` when `r` is rendered with `base` (its parent's
    /// absolute position) and the flags of the path above it.
    fn serve(&self, r: usize, base: i128, a: i128, flags: Flags) -> Option<Hit> {
        let n = &self.nodes[r];
        if !n.enabled {
            return None;
        }
        let base = base + i128::from(n.addr);
        let flags = flags.or(n.flags);
        if a < base || a >= base + n.size as i128 {
            return None;
        }
        if let Kind::Alias { target, offset } = n.kind {
            let t = &self.nodes[target];
            return self.serve(
                target,
                base - i128::from(t.addr) - i128::from(offset),
                a,
                flags,
            );
        }
        for c in self.children(r) {
            if let Some(hit) = self.serve(c, base, a, flags) {
                return Some(hit);
            }
        }
        self.terminates(r).then_some((n.id, a - base, flags))
    }

    /// The region an address space rooted at `root` renders from (`None`:
    /// the empty view).
    fn physical_root(&self, mut r: usize) -> Option<usize> {
        loop {
            let n = &self.nodes[r];
            if !n.enabled {
                return None;
            }
            match n.kind {
                Kind::Alias { target, offset } => {
                    if offset == 0 && n.size >= self.nodes[target].size {
                        r = target;
                        continue;
                    }
                    return Some(r);
                }
                Kind::Container => {
                    let on: Vec<usize> = self
                        .children(r)
                        .into_iter()
                        .filter(|&c| self.nodes[c].enabled)
                        .collect();
                    match on[..] {
                        [] => return None,
                        [only] if self.nodes[only].addr == 0 && self.nodes[only].size <= n.size => {
                            r = only;
                            continue;
                        }
                        _ => return Some(r),
                    }
                }
                Kind::Ram | Kind::Mmio => return Some(r),
            }
        }
    }

    /// Every edge (start and end) of every region on every rendered path
    /// under `r`, up to `budget` visits.
    fn edges(
        &self,
        r: usize,
        base: i128,
        clip: (i128, i128),
        out: &mut Vec<i128>,
        budget: &mut u32,
    ) {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let n = &self.nodes[r];
        if !n.enabled {
            return;
        }
        let base = base + i128::from(n.addr);
        let (s, e) = (base, base + n.size as i128);
        out.push(s);
        out.push(e);
        let clip = (clip.0.max(s), clip.1.min(e));
        if clip.0 >= clip.1 {
            return;
        }
        if let Kind::Alias { target, offset } = n.kind {
            let t = &self.nodes[target];
            let b = base - i128::from(t.addr) - i128::from(offset);
            self.edges(target, b, clip, out, budget);
            return;
        }
        for c in self.children(r) {
            self.edges(c, base, clip, out, budget);
        }
    }

    /// Whether following subregions and alias targets from `from` reaches
    /// `to`.
    fn reaches(&self, from: usize, to: usize) -> bool {
        let mut stack = vec![from];
        let mut seen = vec![false; self.nodes.len()];
        while let Some(x) = stack.pop() {
            if x == to {
                return true;
            }
            if std::mem::replace(&mut seen[x], true) {
                continue;
            }
            stack.extend(self.children(x));
            if let Kind::Alias { target, .. } = self.nodes[x].kind {
                stack.push(target);
            }
        }
        false
    }
}

// ---- generated cases -------------------------------------------------------------

#[derive(Clone, Debug)]
struct Spec {
    /// 0 container, 1 RAM, 2 MMIO, 3 alias, 4 "twin": an alias continuing
    /// the previous alias (same target, next offset, mapped right after it)
    /// to exercise the merge rule.
    kind: u8,
    size: u128,
    target: usize,
    offset: u64,
    /// Initial readonly / nonvolatile / unmergeable.
    flags: (bool, bool, bool),
}

#[derive(Copy, Clone, Debug)]
enum Flag {
    Enabled,
    Readonly,
    Nonvolatile,
    Unmergeable,
}

#[derive(Clone, Debug)]
enum Op {
    Add {
        container: usize,
        sub: usize,
        addr: u64,
        priority: i32,
    },
    Del {
        sub: usize,
        container: usize,
    },
    Toggle {
        region: usize,
        flag: Flag,
    },
    Move {
        region: usize,
        addr: u64,
    },
    Resize {
        region: usize,
        size: u128,
    },
    AliasOffset {
        region: usize,
        offset: u64,
    },
}

#[derive(Clone, Debug)]
struct Batch {
    transaction: bool,
    ops: Vec<Op>,
}

#[derive(Clone, Debug)]
struct Case {
    root_size: u128,
    specs: Vec<Spec>,
    /// How region i+1 is first mapped: (container selector, addr, priority).
    mapping: Vec<(usize, u64, i32)>,
    /// Roots of the extra address spaces (selectors).
    extra_spaces: Vec<usize>,
    batches: Vec<Batch>,
    probes: Vec<u64>,
    /// Two adjacent aliases continuing each other in the root, on top of
    /// everything, so that the merge rule is exercised often.
    pair: Option<Pair>,
}

#[derive(Clone, Debug)]
struct Pair {
    target: usize,
    offset: u64,
    sizes: (u64, u64),
    addr: u64,
    flags: [(bool, bool, bool); 2],
}

fn pair() -> impl Strategy<Value = Option<Pair>> {
    let small = || prop::sample::select(vec![0x800u64, 0x1000, 0x2000]);
    let flags = || {
        prop::sample::select(vec![
            (false, false, false),
            (true, false, false),
            (false, true, false),
            (false, false, true),
        ])
    };
    prop::option::weighted(
        0.5,
        (
            any::<usize>(),
            prop::sample::select(vec![0u64, 0x800]),
            (small(), small()),
            address(),
            [flags(), flags()],
        )
            .prop_map(|(target, offset, sizes, addr, flags)| Pair {
                target,
                offset,
                sizes,
                addr,
                flags,
            }),
    )
}

fn size() -> impl Strategy<Value = u128> {
    prop_oneof![
        4 => prop::sample::select(vec![0x800u128, 0x1000, 0x2000, 0x3000, 0x8000, 0x1_0000]),
        1 => Just(0u128),
        2 => Just(FULL),
        1 => prop::sample::select(vec![1u128 << 63, FULL - 0x1000, FULL - 1]),
        1 => 1u128..0x2_0000,
        1 => any::<u64>().prop_map(u128::from),
    ]
}

fn address() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (0u64..16).prop_map(|k| k * 0x800),
        2 => (1u64..8).prop_map(|k| u64::MAX - k * 0x800 + 1),
        1 => Just(1u64 << 63),
        1 => 0u64..0x2_0000,
        1 => any::<u64>(),
    ]
}

fn priority() -> impl Strategy<Value = i32> {
    prop_oneof![
        6 => -2i32..=2,
        1 => Just(i32::MIN),
        1 => Just(i32::MAX),
    ]
}

fn alias_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(0u64),
        3 => (0u64..8).prop_map(|k| k * 0x800),
        1 => any::<u64>(),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::sample::select(vec![0u8, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4]),
        size(),
        any::<usize>(),
        alias_offset(),
        prop::sample::select(vec![0u8, 0, 0, 0, 0, 1, 2, 4]),
    )
        .prop_map(|(kind, size, target, offset, f)| Spec {
            kind,
            size,
            target,
            offset,
            flags: (f & 1 != 0, f & 2 != 0, f & 4 != 0),
        })
}

fn flag() -> impl Strategy<Value = Flag> {
    prop_oneof![
        4 => Just(Flag::Enabled),
        2 => Just(Flag::Readonly),
        1 => Just(Flag::Nonvolatile),
        1 => Just(Flag::Unmergeable),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let r = any::<usize>();
    prop_oneof![
        2 => (r, r, address(), priority()).prop_map(|(container, sub, addr, priority)| {
            Op::Add { container, sub, addr, priority }
        }),
        1 => (r, r).prop_map(|(sub, container)| Op::Del { sub, container }),
        4 => (r, flag()).prop_map(|(region, flag)| Op::Toggle { region, flag }),
        2 => (r, address()).prop_map(|(region, addr)| Op::Move { region, addr }),
        2 => (r, size()).prop_map(|(region, size)| Op::Resize { region, size }),
        1 => (r, alias_offset()).prop_map(|(region, offset)| Op::AliasOffset { region, offset }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..14).prop_flat_map(|n| {
        (
            prop_oneof![Just(FULL), Just(0x1_0000u128), size()],
            prop::collection::vec(spec(), n),
            prop::collection::vec((any::<usize>(), address(), priority()), n),
            prop::collection::vec(any::<usize>(), 0..3),
            prop::collection::vec(
                (any::<bool>(), prop::collection::vec(op(), 1..5))
                    .prop_map(|(transaction, ops)| Batch { transaction, ops }),
                0..6,
            ),
            prop::collection::vec(any::<u64>(), 4),
            pair(),
        )
            .prop_map(
                |(root_size, specs, mapping, extra_spaces, batches, probes, pair)| Case {
                    root_size,
                    specs,
                    mapping,
                    extra_spaces,
                    batches,
                    probes,
                    pair,
                },
            )
    })
}

// ---- driving memtree and the model together -----------------------------------

struct World {
    /// Shared so that a transaction can stay open while the world is edited.
    memory: Arc<Memory>,
    model: Model,
    /// (space, root index in the model).
    spaces: Vec<(SpaceId, usize)>,
}

impl World {
    fn build(case: &Case) -> Result<World, TestCaseError> {
        let memory = Memory::new();
        let mut model = Model::default();
        let root = memory.new_container("r0", case.root_size, None).unwrap();
        model
            .nodes
            .push(node(root, Kind::Container, case.root_size));
        for (i, s) in case.specs.iter().enumerate() {
            let name = format!("r{}", i + 1);
            let prev = model.nodes.last().unwrap();
            let twin = match (s.kind, prev.kind) {
                (4, Kind::Alias { target, offset }) => u64::try_from(prev.size)
                    .ok()
                    .and_then(|sz| offset.checked_add(sz))
                    .map(|next| (target, next)),
                _ => None,
            };
            let (id, kind) = match s.kind {
                _ if twin.is_some() => {
                    let (target, offset) = twin.unwrap();
                    let tid = model.nodes[target].id;
                    (
                        memory.new_alias(&name, tid, offset, s.size, None),
                        Kind::Alias { target, offset },
                    )
                }
                0 => (memory.new_container(&name, s.size, None), Kind::Container),
                1 => (
                    memory.new_model_region(&name, RegionKind::Ram, s.size, None),
                    Kind::Ram,
                ),
                2 => (
                    memory.new_mmio(&name, s.size, Arc::new(UnimplementedDevice), None),
                    Kind::Mmio,
                ),
                _ => {
                    let target = s.target % model.nodes.len();
                    let tid = model.nodes[target].id;
                    (
                        memory.new_alias(&name, tid, s.offset, s.size, None),
                        Kind::Alias {
                            target,
                            offset: s.offset,
                        },
                    )
                }
            };
            let id = id.unwrap();
            let (readonly, nonvolatile, unmergeable) = s.flags;
            memory.set_readonly(id, readonly).unwrap();
            memory.set_nonvolatile(id, nonvolatile).unwrap();
            memory.set_unmergeable(id, unmergeable).unwrap();
            let mut n = node(id, kind, s.size);
            n.flags = Flags {
                readonly,
                nonvolatile,
                unmergeable,
            };
            model.nodes.push(n);
        }
        let mut world = World {
            memory: Arc::new(memory),
            model,
            spaces: Vec::new(),
        };
        for (i, &(c, addr, priority)) in case.mapping.iter().enumerate() {
            let prev = &world.model.nodes[i];
            let after_prev = u64::try_from(prev.size)
                .ok()
                .and_then(|sz| prev.addr.checked_add(sz));
            match (case.specs[i].kind, prev.parent, after_prev) {
                (4, Some(pc), Some(next)) => world.add(pc, i + 1, next, prev.priority)?,
                _ => world.add(c % world.model.nodes.len(), i + 1, addr, priority)?,
            }
        }
        if let Some(p) = &case.pair {
            world.add_pair(p)?;
        }
        let mut roots = vec![0];
        roots.extend(
            case.extra_spaces
                .iter()
                .map(|r| r % world.model.nodes.len()),
        );
        for (k, r) in roots.into_iter().enumerate() {
            let id = world.model.nodes[r].id;
            let s = world
                .memory
                .new_address_space(&format!("as{k}"), id, None)
                .unwrap();
            world.spaces.push((s, r));
        }
        Ok(world)
    }

    fn add_pair(&mut self, p: &Pair) -> Result<(), TestCaseError> {
        let leaves: Vec<usize> = (0..self.model.nodes.len())
            .filter(|&r| self.model.terminates(r))
            .collect();
        let Some(&target) = leaves.get(p.target % leaves.len().max(1)) else {
            return Ok(());
        };
        let tid = self.model.nodes[target].id;
        let mut offset = p.offset;
        let mut addr = p.addr;
        for (k, size) in [p.sizes.0, p.sizes.1].into_iter().enumerate() {
            let name = format!("pair{k}");
            let id = self
                .memory
                .new_alias(&name, tid, offset, u128::from(size), None)
                .unwrap();
            let (readonly, nonvolatile, unmergeable) = p.flags[k];
            self.memory.set_readonly(id, readonly).unwrap();
            self.memory.set_nonvolatile(id, nonvolatile).unwrap();
            self.memory.set_unmergeable(id, unmergeable).unwrap();
            let mut n = node(id, Kind::Alias { target, offset }, u128::from(size));
            n.flags = Flags {
                readonly,
                nonvolatile,
                unmergeable,
            };
            self.model.nodes.push(n);
            self.add(0, self.model.nodes.len() - 1, addr, i32::MAX)?;
            offset = offset.wrapping_add(size);
            addr = addr.wrapping_add(size);
        }
        Ok(())
    }

    fn pick(&self, sel: usize) -> usize {
        sel % self.model.nodes.len()
    }

    /// `add_subregion_overlap` on both sides; memtree must refuse exactly
    /// what QEMU would assert on or what would loop.
    fn add(&mut self, c: usize, s: usize, addr: u64, priority: i32) -> Result<(), TestCaseError> {
        let (cid, sid) = (self.model.nodes[c].id, self.model.nodes[s].id);
        let got = self.memory.add_subregion_overlap(cid, addr, sid, priority);
        let m = &self.model;
        if matches!(m.nodes[c].kind, Kind::Alias { .. }) {
            prop_assert!(
                matches!(got, Err(TopologyError::AliasCannotContain(_))),
                "subregion of an alias accepted: {got:?}"
            );
        } else if m.nodes[s].parent.is_some() {
            prop_assert!(
                matches!(got, Err(TopologyError::AlreadyInContainer { .. })),
                "region mapped twice: {got:?}"
            );
        } else if m.reaches(s, c) {
            prop_assert!(
                matches!(got, Err(TopologyError::Loop { .. })),
                "loop accepted: {got:?}"
            );
        } else {
            prop_assert!(got.is_ok(), "valid add refused: {got:?}");
            self.model.clock += 1;
            let n = &mut self.model.nodes[s];
            n.parent = Some(c);
            n.addr = addr;
            n.priority = priority;
            n.added = self.model.clock;
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Add {
                container,
                sub,
                addr,
                priority,
            } => {
                let (c, s) = (self.pick(container), self.pick(sub));
                self.add(c, s, addr, priority)?;
            }
            Op::Del { sub, container } => {
                let s = self.pick(sub);
                let c = self.model.nodes[s].parent.unwrap_or(self.pick(container));
                let got = self
                    .memory
                    .del_subregion(self.model.nodes[c].id, self.model.nodes[s].id);
                if self.model.nodes[s].parent == Some(c) {
                    prop_assert!(got.is_ok(), "{got:?}");
                    self.model.nodes[s].parent = None;
                } else {
                    prop_assert!(
                        matches!(got, Err(TopologyError::NotASubregion { .. })),
                        "{got:?}"
                    );
                }
            }
            Op::Toggle { region, flag } => {
                let r = self.pick(region);
                let (id, n) = (self.model.nodes[r].id, &mut self.model.nodes[r]);
                let m = &self.memory;
                match flag {
                    Flag::Enabled => {
                        n.enabled = !n.enabled;
                        m.set_enabled(id, n.enabled).unwrap();
                    }
                    Flag::Readonly => {
                        n.flags.readonly = !n.flags.readonly;
                        m.set_readonly(id, n.flags.readonly).unwrap();
                    }
                    Flag::Nonvolatile => {
                        n.flags.nonvolatile = !n.flags.nonvolatile;
                        m.set_nonvolatile(id, n.flags.nonvolatile).unwrap();
                    }
                    Flag::Unmergeable => {
                        n.flags.unmergeable = !n.flags.unmergeable;
                        m.set_unmergeable(id, n.flags.unmergeable).unwrap();
                    }
                }
            }
            Op::Move { region, addr } => {
                let r = self.pick(region);
                self.memory
                    .set_address(self.model.nodes[r].id, addr)
                    .unwrap();
                self.model.nodes[r].addr = addr;
                if self.model.nodes[r].parent.is_some() {
                    // Re-added: now the newest of its priority.
                    self.model.clock += 1;
                    self.model.nodes[r].added = self.model.clock;
                }
            }
            Op::Resize { region, size } => {
                let r = self.pick(region);
                self.memory.set_size(self.model.nodes[r].id, size).unwrap();
                self.model.nodes[r].size = size;
            }
            Op::AliasOffset { region, offset } => {
                let r = self.pick(region);
                let got = self.memory.set_alias_offset(self.model.nodes[r].id, offset);
                match &mut self.model.nodes[r].kind {
                    Kind::Alias { offset: o, .. } => {
                        prop_assert!(got.is_ok(), "{got:?}");
                        *o = offset;
                    }
                    _ => prop_assert!(
                        matches!(got, Err(TopologyError::WrongKind { .. })),
                        "{got:?}"
                    ),
                }
            }
        }
        Ok(())
    }

    /// Compares every address space's published view with the reference.
    fn check(&self, random: &[u64]) -> Result<(), TestCaseError> {
        let mut shared: Vec<(Option<usize>, Arc<FlatView>)> = Vec::new();
        for &(space, root) in &self.spaces {
            let view = self.memory.address_space(space).unwrap().view();
            let phys = self.model.physical_root(root);
            prop_assert_eq!(view.root(), phys.map(|p| self.model.nodes[p].id));
            // One view per physical root.
            for (p, v) in &shared {
                prop_assert_eq!(*p == phys, Arc::ptr_eq(v, &view), "sharing for {:?}", phys);
            }
            shared.push((phys, view.clone()));
            check_structure(&view)?;
            let Some(phys) = phys else {
                prop_assert!(view.ranges().is_empty());
                continue;
            };
            for a in self.probes(phys, &view, random) {
                let want = self.model.serve(phys, 0, i128::from(a), Flags::default());
                let got = view.lookup(a).map(|r| {
                    let at = r.attrs();
                    (
                        r.region().id(),
                        i128::from(r.offset_in_region()) + i128::from(a - r.start()),
                        Flags {
                            readonly: at.readonly,
                            nonvolatile: at.nonvolatile,
                            unmergeable: at.unmergeable,
                        },
                    )
                });
                prop_assert_eq!(got, want, "address {:#x} in {:?}", a, view);
            }
        }
        Ok(())
    }

    fn probes(&self, phys: usize, view: &FlatView, random: &[u64]) -> BTreeSet<u64> {
        let mut edges = Vec::new();
        let mut budget = 2000;
        self.model
            .edges(phys, 0, (0, FULL as i128), &mut edges, &mut budget);
        for r in view.ranges() {
            edges.push(i128::from(r.start()));
            edges.push(i128::from(r.last()) + 1);
        }
        let mut out: BTreeSet<u64> = random.iter().copied().collect();
        for e in edges {
            for p in [e - 1, e, e + 1] {
                if let Ok(p) = u64::try_from(p) {
                    out.insert(p);
                }
            }
        }
        out
    }
}

fn node(id: RegionId, kind: Kind, size: u128) -> Node {
    Node {
        id,
        kind,
        size,
        addr: 0,
        priority: 0,
        enabled: true,
        flags: Flags::default(),
        parent: None,
        added: 0,
    }
}

/// Sorted, disjoint, non-empty, and merged as far as §2.4 allows.
fn check_structure(view: &FlatView) -> Result<(), TestCaseError> {
    let ranges = view.ranges();
    for r in ranges {
        prop_assert!(r.start() <= r.last(), "empty range {:?}", r);
    }
    for w in ranges.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        prop_assert!(
            a.last() < b.start(),
            "unsorted or overlapping: {:?} {:?}",
            a,
            b
        );
        let mergeable = a.last() + 1 == b.start()
            && Arc::ptr_eq(a.region(), b.region())
            && u128::from(a.offset_in_region()) + a.len() == u128::from(b.offset_in_region())
            && a.attrs() == b.attrs()
            && !a.attrs().unmergeable
            && !b.attrs().unmergeable;
        prop_assert!(!mergeable, "not merged: {:?} {:?}", a, b);
    }
    Ok(())
}

fn run(case: &Case) -> Result<(), TestCaseError> {
    let mut world = World::build(case)?;
    world.check(&case.probes)?;
    for batch in &case.batches {
        if batch.transaction {
            let memory = world.memory.clone();
            let t = memory.begin();
            for op in &batch.ops {
                world.apply(op)?;
            }
            t.commit();
            world.check(&case.probes)?;
        } else {
            for op in &batch.ops {
                world.apply(op)?;
                world.check(&case.probes)?;
            }
        }
    }
    Ok(())
}

#[test]
fn render_model_matches_brute_force_reference() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&case(), |c| run(&c))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A loop through an alias is refused and leaves the views untouched.
#[test]
fn render_model_alias_loop_is_refused() {
    let memory = Memory::new();
    let sys = memory.new_container("sys", FULL, None).unwrap();
    let bus = memory.new_container("bus", 0x1000, None).unwrap();
    memory.add_subregion(sys, 0, bus).unwrap();
    let alias = memory.new_alias("back", sys, 0, 0x1000, None).unwrap();
    let space = memory.new_address_space("as", sys, None).unwrap();
    let before = memory.address_space(space).unwrap().view();
    let got = memory.add_subregion(bus, 0, alias);
    assert!(matches!(got, Err(TopologyError::Loop { .. })), "{got:?}");
    assert_eq!(
        memory.add_subregion(bus, 0, sys).unwrap_err(),
        TopologyError::Loop {
            region: "sys".into(),
            container: "bus".into()
        }
    );
    assert!(Arc::ptr_eq(
        &before,
        &memory.address_space(space).unwrap().view()
    ));
    assert!(memory.region_info(bus).unwrap().subregions.is_empty());
}
