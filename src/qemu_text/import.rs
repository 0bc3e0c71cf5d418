//! Importer: a QEMU 7.2 `info mtree -D` dump (optionally with the `-f` flat
//! dump and the `-o` owner dump of the same machine) rebuilt as a memtree
//! [`Memory`].
//!
//! The tree dump is a set of printed *occurrences* of regions. One region
//! object can be printed several times (an alias target appears inside an
//! address-space tree and again under `memory-region:`; a target of an alias
//! inside a `memory-region:` section is printed in both sections), and several
//! distinct regions can share a name (`bus master container`, `pam-pci`,
//! `pci_bridge_io`, ...). The importer works out which occurrences are the
//! same region with these rules:
//!
//! # Identity rules
//!
//! 1. Inside one address-space tree every line is a distinct region (a region
//!    has one container). Distinct `address-space:` groups have distinct
//!    roots (QEMU groups by root pointer), and distinct `memory-region:`
//!    sections have distinct regions (QEMU queues each target once).
//! 2. A section root (`memory-region:` root or address-space root) is the
//!    same region as an occurrence printed elsewhere iff both print the same
//!    subtree: same name, type, priority, `nv-`, size, position in the
//!    parent (a section root is printed at its own address), alias data,
//!    `[disabled]`, and recursively the same children. The first such
//!    occurrence in file order whose region is not already another section
//!    of the same kind is taken (`memory-region:` sections first, then
//!    address-space roots); the two subtrees are then identified line by
//!    line. Structurally identical candidates print, render and share flat
//!    views identically, so the choice among them is not observable.
//! 3. Alias targets. Every alias target is printed as a `memory-region:`
//!    section, and QEMU queues them in the order it first meets an alias to
//!    them while printing, which is file order. The importer replays that
//!    walk: an alias `@N` either targets an already queued section named `N`
//!    or the next section in file order (which must then be named `N`). When
//!    both are possible, the already queued target is preferred unless it
//!    already has an alias of the same name (PCI bridges: `pci_bridge_mem`
//!    and `pci_bridge_pref_mem` of one bridge target its own bus, the next
//!    bridge's aliases target the next bus). An alias never targets a region
//!    that contains it. If a dump does not follow the queue order (edited by
//!    hand), targets fall back to name matching. The result is then checked
//!    against everything else the dump says: the target is a section of
//!    that name, the printed window `@T start-last` fits in it, and no
//!    section reaches itself through the aliases printed inside it (QEMU
//!    cannot hold an alias cycle). When the walk's choice contradicts that,
//!    a bounded backtracking search (the walk's choice first, then the other
//!    fitting sections in file order) finds an assignment that does not; an
//!    alias whose fitting sections print differently is reported in
//!    [`Imported::guessed`] (the dump is truly ambiguous there), and a dump
//!    no assignment fits is refused naming the alias.
//! 4. Sizes are printed inclusively, so a zero-size region looks like a
//!    one-byte one. A one-byte alias at offset 0 of its container mapping
//!    offset 0 of its target (a closed PCI bridge window) is taken as size 0;
//!    every other one-byte line is one byte.
//! 5. Subregions with equal (address, priority) are printed in subregion-list
//!    order; they are added so that memtree's list has the same order. Among
//!    equal priorities at *different* addresses the list order is not
//!    printed; the importer assumes the printed order (lower address newer).
//!    With a flat dump the order is learned: where QEMU shows a region that
//!    memtree renders under an overlapping equal-priority sibling, the
//!    sibling holding QEMU's region is moved before it (newer, so it wins);
//!    a learned (winner, loser) pair is never reversed. Without a flat dump
//!    [`Imported::guessed`] lists every overlapping equal-priority pair at
//!    different addresses whose order was guessed.
//!
//! # Kinds ("terminates")
//!
//! `ram`/`rom`/`romd`/`ramd` give RAM (ROM = readonly RAM), ROM device (romd
//! mode) and RAM device. An `i/o` line is an alias, a pure container, or a
//! terminating region, and QEMU does not print which. Without a flat dump:
//! the root of the address space named `I/O` is an I/O root (terminating,
//! holes read all ones); any other `i/o` region with subregions is a
//! container, and a leaf `i/o` region terminates (MMIO). With a flat dump
//! the importer renders, compares each `FlatView` block with what memtree
//! renders for the same address spaces, and fixes the bit: an `i/o` region
//! named by a flat range that memtree does not produce (same priority,
//! reached by that view) terminates; an `i/o` region memtree renders where
//! the dump shows no range of that name is a container. This repeats until
//! the views agree (or nothing more can be learned). Every address space of
//! a `FlatView` block is compared with it, not only the first: QEMU groups
//! spaces by view, and every space whose root renders nothing (an enabled
//! container without an enabled subregion, e.g. a bus-master space aliasing
//! an empty "pci bus memory") shares the empty view "Root memory region:
//! (none)", so a leaf `i/o` region under such a space is learned to be an
//! empty container even where no range shows it. Without a flat dump
//! [`Imported::guessed`] lists the leaf `i/o` regions taken as MMIO.
//!
//! The flat dump is also used for two more facts the tree dump cannot show
//! (a deliberate, documented extension of "learn only the terminates bit"
//! without which the oracle cannot match): the **readonly** bit of aliases,
//! containers and I/O regions (a `rom` flat range over a region printed `ram`
//! or `i/o`: the deepest non-RAM region on the rendering path of that address
//! is made readonly, e.g. the `pam-rom` aliases of x86 PAM), and the
//! **creation order of address spaces** (the order of the `AS` lines inside
//! each `FlatView` block); it is used for ordering only. Without a flat dump
//! address spaces are created in this order: `memory`, `I/O`, names starting
//! with `cpu-` (by numeric suffix, then name), then the rest in file order.
//!
//! # Owners
//!
//! An owner dump (`info mtree -o`, which hides disabled regions) is matched
//! block by block: a block of the owner dump and a block of the tree dump
//! correspond when they have the same header and print the same visible
//! lines; each line's decoration is then attached to the region of the
//! corresponding line. One owner is created per distinct `{...}` label, and
//! the printed QOM parent is recorded verbatim
//! ([`crate::Machine::set_qom_parent`]).

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};

use crate::qemu_text::parse::{FlatDump, OwnerDecor, OwnerRef, TreeDump, TreeLine, TypeTag};
use crate::region::ids::{OwnerId, RegionId, SpaceId};
use crate::region::owner_core::OwnerLabel;
use crate::region::region_core::RegionKind;
use crate::topology::error::TopologyError;
use crate::topology::memory::{Machine, Memory};
use crate::topology::tree::Topology;
use crate::view::flatview::RegionType;

/// A machine rebuilt from QEMU dumps.
#[derive(Debug)]
pub struct Imported {
    /// The machine.
    pub memory: Memory,
    /// The address spaces, in creation order.
    pub spaces: Vec<SpaceId>,
    /// The region printed on each line of the tree dump (1-based line).
    pub regions: BTreeMap<usize, RegionId>,
    /// What the flat dump taught, one sentence per fact (empty without one).
    pub learned: Vec<String>,
    /// What was guessed because no flat dump was given, one sentence per
    /// guess (empty with one): which leaf `i/o` regions were taken as MMIO
    /// rather than empty containers, and which overlapping equal-priority
    /// siblings were given an order. Also (with or without a flat dump) the
    /// aliases whose target the dump leaves truly ambiguous: several
    /// different regions of the target's name fit everything it says.
    pub guessed: Vec<String>,
}

/// Why a dump could not be imported. Lines are 1-based lines of the dump
/// named in the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// A region line is missing: the dump is not an `info mtree -D` dump.
    #[error("tree dump line {line}: a region is hidden above this line (indentation skips a level); import needs an `info mtree -D` dump, which prints disabled regions")]
    HiddenRegion {
        /// The dump line (1-based).
        line: usize,
    },
    /// An alias whose target has no `memory-region:` section.
    #[error("tree dump line {line}: alias \"{alias}\" targets \"{target}\", but the dump has no `memory-region: {target}` section")]
    UnknownAliasTarget {
        /// The dump line (1-based).
        line: usize,
        /// The alias's name.
        alias: String,
        /// The target name it gives.
        target: String,
    },
    /// No assignment of same-named targets to aliases fits the dump.
    #[error("tree dump line {line}: alias \"{alias}\": no region named \"{target}\" fits as its target (every choice makes an alias contain itself or puts its window outside the target)")]
    NoConsistentAliasTarget {
        /// The dump line (1-based).
        line: usize,
        /// The alias's name.
        alias: String,
        /// The target name it gives.
        target: String,
    },
    /// Aliases that (through their targets) contain themselves.
    #[error("tree dump line {line}: alias \"{alias}\" is part of an alias cycle")]
    AliasLoop {
        /// The dump line (1-based).
        line: usize,
        /// An alias of the cycle.
        alias: String,
    },
    /// The model refused an edit implied by the dump.
    #[error("tree dump line {line}: cannot build region \"{region}\": {source}")]
    Model {
        /// The dump line (1-based).
        line: usize,
        /// The region being built.
        region: String,
        /// Why the model refused it.
        #[source]
        source: TopologyError,
    },
    /// The flat dump names an address space the tree dump does not have.
    #[error(
        "flat dump line {line}: address space \"{name}\" (root \"{root}\") is not in the tree dump"
    )]
    UnknownSpace {
        /// The dump line (1-based).
        line: usize,
        /// The address space's name.
        name: String,
        /// Its root region's name.
        root: String,
    },
    /// A block of the owner dump matches no block of the tree dump.
    #[error("owner dump line {line}: {message}")]
    OwnerMismatch {
        /// The dump line (1-based).
        line: usize,
        /// What does not match.
        message: String,
    },
}

/// Imports a parsed `info mtree -D` dump; see the module docs.
pub fn import(
    tree: &TreeDump,
    flat: Option<&FlatDump>,
    owners: Option<&TreeDump>,
) -> Result<Imported, ImportError> {
    let occs = Occurrences::new(tree)?;
    let classes = Classes::unify(&occs);
    // A queue-order walk that finds no target short of a cycle is not the
    // last word: the repair below searches every fitting assignment.
    let targets = match assign_alias_targets(&occs, &classes) {
        Ok(t) => t,
        Err(ImportError::AliasLoop { .. }) => HashMap::new(),
        Err(e) => return Err(e),
    };
    let (targets, ambiguous) = repair_alias_targets(&occs, &classes, targets)?;
    let mut plan = Plan::new(&occs, &classes, &targets, tree)?;
    if let Some(o) = owners {
        plan.attach_owners(&occs, &classes, o)?;
    }
    let order = match flat {
        Some(f) => plan.space_order_from(f)?,
        None => plan.heuristic_space_order(),
    };
    let mut learned = Vec::new();
    let mut built = plan.build(&order)?;
    if let Some(f) = flat {
        for _ in 0..16 {
            let fixes = plan.learn(&built, f)?;
            if fixes.is_empty() {
                break;
            }
            learned.extend(fixes);
            built = plan.build(&order)?;
        }
    }
    let regions = occs
        .list
        .iter()
        .enumerate()
        .map(|(i, o)| (o.line.line, built.ids[classes.of[i]]))
        .collect();
    let mut guessed = if flat.is_none() {
        plan.guesses()
    } else {
        Vec::new()
    };
    guessed.extend(ambiguous);
    Ok(Imported {
        memory: built.memory,
        spaces: built.spaces,
        regions,
        learned,
        guessed,
    })
}

// ---- occurrences --------------------------------------------------------------

struct Occ<'a> {
    line: &'a TreeLine,
    block: usize,
    parent: Option<usize>,
    children: Vec<usize>,
    /// Offset in the parent (for a section root: its printed start, which is
    /// its own address).
    addr: u64,
    size: u128,
    depth: usize,
    sig: u64,
}

struct BlockInfo<'a> {
    root: usize,
    /// `Some(names)` for an address-space group, `None` for `memory-region:`.
    spaces: Option<&'a [String]>,
    /// The `memory-region:` name.
    name: &'a str,
}

struct Occurrences<'a> {
    list: Vec<Occ<'a>>,
    blocks: Vec<BlockInfo<'a>>,
}

fn printed_size(line: &TreeLine, addr: u64) -> u128 {
    let len = u128::from(line.last.wrapping_sub(line.start)) + 1;
    match &line.alias {
        Some(a) if len == 1 && addr == 0 && a.target_start == 0 && a.target_last == 0 => 0,
        _ => len,
    }
}

impl<'a> Occurrences<'a> {
    fn new(tree: &'a TreeDump) -> Result<Self, ImportError> {
        let mut occs = Occurrences {
            list: Vec::new(),
            blocks: Vec::new(),
        };
        let roots = tree
            .groups
            .iter()
            .map(|g| (&g.root, Some(g.names.as_slice()), "", g.line))
            .chain(
                tree.regions
                    .iter()
                    .map(|r| (&r.root, None, r.name.as_str(), r.line)),
            );
        for (root, spaces, name, header) in roots {
            let block = occs.blocks.len();
            let idx = occs.add(root, block, None, header)?;
            occs.blocks.push(BlockInfo {
                root: idx,
                spaces,
                name,
            });
        }
        occs.compute_sigs();
        Ok(occs)
    }

    fn add(
        &mut self,
        root: &'a TreeLine,
        block: usize,
        parent: Option<usize>,
        header: usize,
    ) -> Result<usize, ImportError> {
        // Iterative pre-order so that indices follow file order.
        let mut first = None;
        let mut stack = vec![(root, parent)];
        while let Some((line, parent)) = stack.pop() {
            if line.is_placeholder() {
                let at = line.children.first().map_or(header, |c| c.line);
                return Err(ImportError::HiddenRegion { line: at });
            }
            let idx = self.list.len();
            let (addr, depth) = match parent {
                Some(p) => (
                    line.start.wrapping_sub(self.list[p].line.start),
                    self.list[p].depth + 1,
                ),
                None => (line.start, 1),
            };
            self.list.push(Occ {
                line,
                block,
                parent,
                children: Vec::new(),
                addr,
                size: printed_size(line, addr),
                depth,
                sig: 0,
            });
            if let Some(p) = parent {
                self.list[p].children.push(idx);
            }
            first.get_or_insert(idx);
            for c in line.children.iter().rev() {
                stack.push((c, Some(idx)));
            }
        }
        Ok(first.unwrap_or(0))
    }

    fn compute_sigs(&mut self) {
        // Children always have larger indices than their parent.
        for i in (0..self.list.len()).rev() {
            let o = &self.list[i];
            let mut h = DefaultHasher::new();
            own_key(o).hash(&mut h);
            for &c in &o.children {
                self.list[c].sig.hash(&mut h);
            }
            self.list[i].sig = h.finish();
        }
    }

    /// Same printed subtree (rule 2).
    fn same(&self, a: usize, b: usize) -> bool {
        let (x, y) = (&self.list[a], &self.list[b]);
        x.sig == y.sig
            && own_key(x) == own_key(y)
            && x.children.len() == y.children.len()
            && x.children
                .iter()
                .zip(&y.children)
                .all(|(&p, &q)| self.same(p, q))
    }

    /// Visible lines (as plain `info mtree` prints them) of a block:
    /// (depth, text without decorations, occurrence).
    fn visible(&self, block: usize) -> Vec<(usize, String, usize)> {
        let mut out = Vec::new();
        let mut stack = vec![self.blocks[block].root];
        while let Some(i) = stack.pop() {
            let o = &self.list[i];
            if !o.line.disabled {
                out.push((o.depth, line_key(o.line), i));
            }
            stack.extend(o.children.iter().rev());
        }
        out
    }
}

type OwnKey<'a> = (
    &'a str,
    TypeTag,
    i32,
    bool,
    u128,
    u64,
    bool,
    Option<(&'a str, u64)>,
);

fn own_key<'a>(o: &Occ<'a>) -> OwnKey<'a> {
    let l = o.line;
    (
        l.name.as_str(),
        l.ty,
        l.priority,
        l.nonvolatile,
        o.size,
        o.addr,
        l.disabled,
        l.alias
            .as_ref()
            .map(|a| (a.target_name.as_str(), a.target_start)),
    )
}

/// A printed line without its owner decoration, for matching owner dumps.
fn line_key(l: &TreeLine) -> String {
    let alias = l.alias.as_ref().map_or(String::new(), |a| {
        format!(
            " @{} {:x}-{:x}",
            a.target_name, a.target_start, a.target_last
        )
    });
    format!(
        "{:x}-{:x} {} {} {} {}{alias}",
        l.start,
        l.last,
        l.priority,
        l.nonvolatile,
        l.ty.as_str(),
        l.name
    )
}

// ---- identity ------------------------------------------------------------------

struct UnionFind {
    parent: Vec<usize>,
    /// Per class root: the address-space group and `memory-region:` section
    /// whose root is in the class.
    group: Vec<Option<usize>>,
    section: Vec<Option<usize>>,
    /// While a trial runs: the old value of every entry it wrote, so that a
    /// failed trial is undone in time proportional to its own work (a copy
    /// of the whole structure per trial would be quadratic).
    journal: Option<Vec<Undo>>,
}

enum Undo {
    Parent(usize, usize),
    Group(usize, Option<usize>),
    Section(usize, Option<usize>),
}

impl UnionFind {
    fn set_parent(&mut self, x: usize, v: usize) {
        if let Some(j) = &mut self.journal {
            j.push(Undo::Parent(x, self.parent[x]));
        }
        self.parent[x] = v;
    }

    fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            let grand = self.parent[self.parent[x]];
            self.set_parent(x, grand);
            x = grand;
        }
        x
    }

    /// Unions two classes unless that would identify two groups or two
    /// sections.
    fn union(&mut self, a: usize, b: usize) -> bool {
        let (a, b) = (self.find(a), self.find(b));
        if a == b {
            return true;
        }
        let clash = |x: Option<usize>, y: Option<usize>| x.is_some() && y.is_some() && x != y;
        if clash(self.group[a], self.group[b]) || clash(self.section[a], self.section[b]) {
            return false;
        }
        self.set_parent(b, a);
        if let Some(j) = &mut self.journal {
            j.push(Undo::Group(a, self.group[a]));
            j.push(Undo::Section(a, self.section[a]));
        }
        self.group[a] = self.group[a].or(self.group[b]);
        self.section[a] = self.section[a].or(self.section[b]);
        true
    }

    /// Runs `trial`; keeps what it did if it returns true, undoes it
    /// otherwise.
    fn attempt(&mut self, trial: impl FnOnce(&mut UnionFind) -> bool) -> bool {
        self.journal = Some(Vec::new());
        let ok = trial(self);
        let journal = self.journal.take().unwrap_or_default();
        if !ok {
            for undo in journal.into_iter().rev() {
                match undo {
                    Undo::Parent(x, v) => self.parent[x] = v,
                    Undo::Group(x, v) => self.group[x] = v,
                    Undo::Section(x, v) => self.section[x] = v,
                }
            }
        }
        ok
    }
}

struct Classes {
    /// Occurrence → dense class id.
    of: Vec<usize>,
    /// Class → its occurrences, in file order.
    members: Vec<Vec<usize>>,
}

impl Classes {
    fn unify(occs: &Occurrences<'_>) -> Classes {
        let n = occs.list.len();
        let mut uf = UnionFind {
            parent: (0..n).collect(),
            group: vec![None; n],
            section: vec![None; n],
            journal: None,
        };
        for (b, info) in occs.blocks.iter().enumerate() {
            if info.spaces.is_some() {
                uf.group[info.root] = Some(b);
            } else {
                uf.section[info.root] = Some(b);
            }
        }
        // Candidates by signature, in file order, for each kind of block
        // root: a section root is never matched with another section root,
        // nor a group root with another group root (rule 1), so those are
        // left out of the lists instead of skipped one by one (identical
        // sections would cost O(n²) otherwise).
        let mut for_sections: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut for_groups: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, o) in occs.list.iter().enumerate() {
            let group_root = o.parent.is_none() && occs.blocks[o.block].spaces.is_some();
            let section_root = o.parent.is_none() && !group_root;
            if !section_root {
                for_sections.entry(o.sig).or_default().push(i);
            }
            if !group_root {
                for_groups.entry(o.sig).or_default().push(i);
            }
        }
        // Per list, how many leading candidates are already taken by a
        // block of that kind: taken stays taken, so they are skipped once.
        let mut taken_before: HashMap<(u64, bool), usize> = HashMap::new();
        // Sections first, then address-space roots (rule 2).
        let sections = occs
            .blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| b.spaces.is_none());
        let groups = occs
            .blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| b.spaces.is_some());
        for (b, info) in sections.chain(groups) {
            let root = info.root;
            let is_section = info.spaces.is_none();
            let sig = occs.list[root].sig;
            let list = if is_section {
                &for_sections
            } else {
                &for_groups
            };
            let candidates = list.get(&sig).map_or(&[][..], Vec::as_slice);
            let taken = |uf: &mut UnionFind, c: usize| {
                let cr = uf.find(c);
                if is_section {
                    uf.section[cr].is_some()
                } else {
                    uf.group[cr].is_some()
                }
            };
            let skip = taken_before.entry((sig, is_section)).or_insert(0);
            while candidates.get(*skip).is_some_and(|&c| taken(&mut uf, c)) {
                *skip += 1;
            }
            for &c in &candidates[(*skip).min(candidates.len())..] {
                if occs.list[c].block == b || taken(&mut uf, c) || !occs.same(root, c) {
                    continue;
                }
                if uf.attempt(|trial| unify_subtrees(occs, trial, root, c)) {
                    break;
                }
            }
        }
        let mut dense: HashMap<usize, usize> = HashMap::new();
        let mut of = Vec::with_capacity(n);
        let mut members: Vec<Vec<usize>> = Vec::new();
        for i in 0..n {
            let r = uf.find(i);
            let next = dense.len();
            let c = *dense.entry(r).or_insert(next);
            if c == members.len() {
                members.push(Vec::new());
            }
            members[c].push(i);
            of.push(c);
        }
        Classes { of, members }
    }
}

fn unify_subtrees(occs: &Occurrences<'_>, uf: &mut UnionFind, a: usize, b: usize) -> bool {
    let mut stack = vec![(a, b)];
    while let Some((x, y)) = stack.pop() {
        if !uf.union(x, y) {
            return false;
        }
        stack.extend(
            occs.list[x]
                .children
                .iter()
                .copied()
                .zip(occs.list[y].children.iter().copied()),
        );
    }
    true
}

/// Alias class → target class (rule 3). If preferring already queued
/// targets leaves a section without any alias, the walk is redone taking the
/// next section whenever the queue order allows it.
fn assign_alias_targets(
    occs: &Occurrences<'_>,
    classes: &Classes,
) -> Result<HashMap<usize, usize>, ImportError> {
    let targets = assign_alias_targets_with(occs, classes, true)?;
    let targeted: HashSet<usize> = targets.values().copied().collect();
    let all_used = occs
        .blocks
        .iter()
        .filter(|b| b.spaces.is_none())
        .all(|b| targeted.contains(&classes.of[b.root]));
    if all_used {
        Ok(targets)
    } else {
        assign_alias_targets_with(occs, classes, false)
    }
}

fn assign_alias_targets_with(
    occs: &Occurrences<'_>,
    classes: &Classes,
    prefer_queued: bool,
) -> Result<HashMap<usize, usize>, ImportError> {
    let sections: Vec<(usize, &str)> = occs
        .blocks
        .iter()
        .filter(|b| b.spaces.is_none())
        .map(|b| (classes.of[b.root], b.name))
        .collect();
    // Container class of each class (first nested occurrence).
    let mut container: HashMap<usize, usize> = HashMap::new();
    for (i, o) in occs.list.iter().enumerate() {
        if let Some(p) = o.parent {
            container.entry(classes.of[i]).or_insert(classes.of[p]);
        }
    }
    let contains = |outer: usize, mut inner: usize| {
        let mut steps = 0;
        loop {
            if inner == outer {
                return true;
            }
            match container.get(&inner) {
                Some(&c) if steps <= occs.list.len() => {
                    inner = c;
                    steps += 1;
                }
                _ => return false,
            }
        }
    };
    // Sections by name: an alias only ever considers sections named like
    // its target (so many aliases cost time linear in the dump).
    let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, &(_, name)) in sections.iter().enumerate() {
        by_name.entry(name).or_default().push(i);
    }
    let mut targets: HashMap<usize, usize> = HashMap::new();
    let mut targeted: HashSet<usize> = HashSet::new();
    let mut alias_names: HashMap<usize, HashSet<&str>> = HashMap::new();
    // Indices into `sections` queued so far, by name, in queue order.
    let mut queued: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut not_fresh_before: HashMap<(&str, &str), usize> = HashMap::new();
    let mut next = 0;
    let mut in_order = true;
    // File order = QEMU's print order: groups, then sections in queue order.
    let mut walk: Vec<usize> = Vec::new();
    for b in &occs.blocks {
        let mut stack = vec![b.root];
        while let Some(i) = stack.pop() {
            walk.push(i);
            stack.extend(occs.list[i].children.iter().rev());
        }
    }
    for i in walk {
        let o = &occs.list[i];
        let Some(a) = &o.line.alias else { continue };
        let ac = classes.of[i];
        if targets.contains_key(&ac) {
            continue;
        }
        let tname = a.target_name.as_str();
        let aname = o.line.name.as_str();
        let usable = |s: usize| sections[s].1 == tname && !contains(sections[s].0, ac);
        let fresh = |s: usize, names: &HashMap<usize, HashSet<&str>>| {
            !names.get(&sections[s].0).is_some_and(|n| n.contains(aname))
        };
        let new_ok = in_order && next < sections.len() && usable(next);
        let queued_here: &[usize] = queued.get(tname).map_or(&[], Vec::as_slice);
        // Queued sections that already have an alias named `aname` stay
        // so: skip them once per (target, alias) name pair, not once per
        // alias (many same-named targets would cost O(n²) otherwise).
        let reuse_fresh = if prefer_queued || !new_ok {
            let cursor = not_fresh_before.entry((tname, aname)).or_insert(0);
            while queued_here
                .get(*cursor)
                .is_some_and(|&s| !fresh(s, &alias_names))
            {
                *cursor += 1;
            }
            queued_here[(*cursor).min(queued_here.len())..]
                .iter()
                .copied()
                .find(|&s| usable(s) && fresh(s, &alias_names))
        } else {
            None
        };
        let reuse_first = || queued_here.iter().copied().find(|&s| usable(s));
        let chosen = if in_order {
            match (new_ok, reuse_fresh) {
                (_, Some(s)) => Some(s),
                (true, None) => {
                    next += 1;
                    queued
                        .entry(sections[next - 1].1)
                        .or_default()
                        .push(next - 1);
                    Some(next - 1)
                }
                (false, None) => reuse_first(),
            }
        } else {
            None
        };
        let chosen = match chosen {
            Some(s) => s,
            None => {
                // Not in queue order: fall back to names.
                in_order = false;
                let any: Vec<usize> = by_name
                    .get(tname)
                    .map(|v| v.iter().copied().filter(|&s| usable(s)).collect())
                    .unwrap_or_default();
                match any
                    .iter()
                    .copied()
                    .find(|&s| !targeted.contains(&sections[s].0))
                    .or_else(|| any.iter().copied().find(|&s| fresh(s, &alias_names)))
                    .or_else(|| any.first().copied())
                {
                    Some(s) => s,
                    None if sections.iter().any(|s| s.1 == tname) => {
                        return Err(ImportError::AliasLoop {
                            line: o.line.line,
                            alias: aname.to_owned(),
                        })
                    }
                    None => {
                        return Err(ImportError::UnknownAliasTarget {
                            line: o.line.line,
                            alias: aname.to_owned(),
                            target: tname.to_owned(),
                        })
                    }
                }
            }
        };
        targets.insert(ac, sections[chosen].0);
        targeted.insert(sections[chosen].0);
        alias_names
            .entry(sections[chosen].0)
            .or_default()
            .insert(aname);
    }
    Ok(targets)
}

/// Checks the alias targets chosen by queue order against everything else
/// the dump says, and when they contradict it, searches for an assignment
/// that does not. Facts: an alias targets a `memory-region:` section of its
/// target's name; its printed window fits in the target (`@T start-last`
/// with `last` below the target's size); QEMU cannot contain an alias cycle,
/// so no section may reach itself through the aliases printed inside it.
/// The queue-order choice is kept whenever it is consistent (it is exact for
/// unedited dumps); otherwise a bounded backtracking search tries the queue
/// choice first, then the other fitting sections in file order. Returns the
/// targets and, when the search ran, a sentence per alias whose fitting
/// sections print differently (the dump is truly ambiguous there).
fn repair_alias_targets(
    occs: &Occurrences<'_>,
    classes: &Classes,
    targets: HashMap<usize, usize>,
) -> Result<(HashMap<usize, usize>, Vec<String>), ImportError> {
    struct AliasInfo<'a> {
        class: usize,
        line: &'a TreeLine,
        /// Classes of the roots of the blocks printing the alias.
        blocks: Vec<usize>,
        domain: Vec<usize>,
    }
    // Sections: class → (name, size, signature, line).
    let mut sections: Vec<(usize, &str, u128, u64, usize)> = Vec::new();
    for b in occs.blocks.iter().filter(|b| b.spaces.is_none()) {
        let o = &occs.list[b.root];
        sections.push((classes.of[b.root], b.name, o.size, o.sig, o.line.line));
    }
    let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, s) in sections.iter().enumerate() {
        by_name.entry(s.1).or_default().push(i);
    }
    // The container class of each class, to refuse a target containing its alias.
    let mut container: HashMap<usize, usize> = HashMap::new();
    for (i, o) in occs.list.iter().enumerate() {
        if let Some(p) = o.parent {
            container.entry(classes.of[i]).or_insert(classes.of[p]);
        }
    }
    let contains = |outer: usize, mut inner: usize| {
        for _ in 0..=occs.list.len() {
            if inner == outer {
                return true;
            }
            match container.get(&inner) {
                Some(&c) => inner = c,
                None => return false,
            }
        }
        false
    };
    let mut index: HashMap<usize, usize> = HashMap::new();
    let mut aliases: Vec<AliasInfo<'_>> = Vec::new();
    for (i, o) in occs.list.iter().enumerate() {
        if o.line.alias.is_none() {
            continue;
        }
        let c = classes.of[i];
        let block = classes.of[occs.blocks[o.block].root];
        let k = *index.entry(c).or_insert_with(|| {
            aliases.push(AliasInfo {
                class: c,
                line: o.line,
                blocks: Vec::new(),
                domain: Vec::new(),
            });
            aliases.len() - 1
        });
        if !aliases[k].blocks.contains(&block) {
            aliases[k].blocks.push(block);
        }
    }
    // Largest section of each name: whether any can hold a window.
    let mut largest: HashMap<&str, u128> = HashMap::new();
    for sec in &sections {
        let m = largest.entry(sec.1).or_insert(0);
        *m = (*m).max(sec.2);
    }
    let section_of: HashMap<usize, usize> = sections
        .iter()
        .enumerate()
        .map(|(i, sec)| (sec.0, i))
        .collect();
    // What the dump says of one (alias, target) pair.
    let fits = |a: &AliasInfo<'_>, t: usize| {
        let Some(x) = &a.line.alias else { return false };
        let Some(&si) = section_of.get(&t) else {
            return false;
        };
        let sec = &sections[si];
        let window_ok = u128::from(x.target_last) < sec.2
            || largest
                .get(sec.1)
                .is_none_or(|&m| u128::from(x.target_last) >= m);
        sec.1 == x.target_name && window_ok && !contains(t, a.class)
    };
    let consistent = |t: &HashMap<usize, usize>| {
        let mut edges: HashMap<usize, Vec<usize>> = HashMap::new();
        for a in &aliases {
            let Some(&target) = t.get(&a.class) else {
                return false;
            };
            if !fits(a, target) {
                return false;
            }
            for &b in &a.blocks {
                edges.entry(b).or_default().push(target);
            }
        }
        // Kahn: acyclic iff every node is removed.
        let mut indeg: HashMap<usize, usize> = HashMap::new();
        for (&n, outs) in &edges {
            indeg.entry(n).or_insert(0);
            for &o in outs {
                *indeg.entry(o).or_insert(0) += 1;
            }
        }
        let mut ready: Vec<usize> = indeg
            .iter()
            .filter(|(_, &d)| d == 0)
            .map(|(&n, _)| n)
            .collect();
        let mut removed = 0;
        while let Some(n) = ready.pop() {
            removed += 1;
            for &o in edges.get(&n).into_iter().flatten() {
                let d = indeg.get_mut(&o).expect("counted");
                *d -= 1;
                if *d == 0 {
                    ready.push(o);
                }
            }
        }
        removed == indeg.len()
    };
    if consistent(&targets) {
        return Ok((targets, Vec::new()));
    }
    // The search: each alias's fitting sections, the queue choice first.
    for info in aliases.iter_mut() {
        let c = info.class;
        let Some(a) = &info.line.alias else {
            continue;
        };
        {
            let named: &[usize] = by_name
                .get(a.target_name.as_str())
                .map_or(&[], Vec::as_slice);
            let usable: Vec<usize> = named
                .iter()
                .map(|&s| sections[s].0)
                .filter(|&t| !contains(t, c))
                .collect();
            let fits: Vec<usize> = named
                .iter()
                .filter(|&&s| {
                    u128::from(a.target_last) < sections[s].2 && usable.contains(&sections[s].0)
                })
                .map(|&s| sections[s].0)
                .collect();
            let mut domain = if fits.is_empty() { usable } else { fits };
            // The queue-order choice first.
            if let Some(&t) = targets.get(&c) {
                if let Some(p) = domain.iter().position(|&d| d == t) {
                    domain.remove(p);
                    domain.insert(0, t);
                }
            }
            info.domain = domain;
        }
    }
    // Section graph: block root → target, one edge per (alias, block).
    fn reaches(edges: &HashMap<usize, Vec<usize>>, from: usize, to: usize) -> bool {
        let mut seen = HashSet::new();
        let mut stack = vec![from];
        while let Some(n) = stack.pop() {
            if n == to {
                return true;
            }
            if seen.insert(n) {
                stack.extend(edges.get(&n).into_iter().flatten().copied());
            }
        }
        false
    }
    for a in &aliases {
        let t = a.line.alias.as_ref().map_or("", |x| x.target_name.as_str());
        if !by_name.contains_key(t) {
            return Err(ImportError::UnknownAliasTarget {
                line: a.line.line,
                alias: a.line.name.clone(),
                target: t.to_owned(),
            });
        }
    }
    // Iterative backtracking over the aliases in file order.
    const BUDGET: usize = 200_000;
    let mut edges: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut choice: Vec<usize> = vec![0; aliases.len()];
    let mut k = 0usize;
    let mut tries = 0usize;
    let mut deepest = 0usize;
    while k < aliases.len() {
        let a = &aliases[k];
        let mut placed = false;
        while choice[k] < a.domain.len() {
            tries += 1;
            let t = a.domain[choice[k]];
            if tries > BUDGET {
                break;
            }
            if a.blocks.iter().all(|&b| !reaches(&edges, t, b)) {
                for &b in &a.blocks {
                    edges.entry(b).or_default().push(t);
                }
                placed = true;
                break;
            }
            choice[k] += 1;
        }
        if placed {
            k += 1;
            deepest = deepest.max(k);
            continue;
        }
        if tries > BUDGET || k == 0 {
            let a = &aliases[deepest.min(aliases.len() - 1)];
            return Err(ImportError::NoConsistentAliasTarget {
                line: a.line.line,
                alias: a.line.name.clone(),
                target: a
                    .line
                    .alias
                    .as_ref()
                    .map_or(String::new(), |x| x.target_name.clone()),
            });
        }
        // Undo the previous alias's edges and try its next choice.
        choice[k] = 0;
        k -= 1;
        let prev = &aliases[k];
        let t = prev.domain[choice[k]];
        for &b in &prev.blocks {
            if let Some(v) = edges.get_mut(&b) {
                if let Some(p) = v.iter().rposition(|&x| x == t) {
                    v.remove(p);
                }
            }
        }
        choice[k] += 1;
    }
    let mut out = targets;
    let mut notes = Vec::new();
    let sig_of: HashMap<usize, (u64, usize)> = sections.iter().map(|s| (s.0, (s.3, s.4))).collect();
    for (a, &c) in aliases.iter().zip(&choice) {
        let chosen = a.domain[c];
        out.insert(a.class, chosen);
        let mut kinds: Vec<u64> = a
            .domain
            .iter()
            .filter_map(|d| sig_of.get(d).map(|x| x.0))
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        if kinds.len() > 1 {
            notes.push(format!(
                "alias \"{}\" (tree line {}): {} different regions named \"{}\" fit what the dump says; chose the one printed at line {} (the first that keeps every alias free of cycles)",
                a.line.name,
                a.line.line,
                kinds.len(),
                a.line.alias.as_ref().map_or("", |x| x.target_name.as_str()),
                sig_of.get(&chosen).map_or(0, |x| x.1)
            ));
        }
    }
    Ok((out, notes))
}

// ---- the plan ------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Container,
    Mmio,
    IoRoot,
    Ram,
    RamDevice,
    RomDevice,
    Alias,
}

struct Node {
    name: String,
    line: usize,
    kind: Kind,
    /// Printed `i/o` and not an alias: the terminates bit is a guess.
    io: bool,
    /// The terminates/readonly bit was learned from the flat dump.
    locked: bool,
    size: u128,
    addr: u64,
    priority: i32,
    enabled: bool,
    readonly: bool,
    nonvolatile: bool,
    mapped: bool,
    children: Vec<usize>,
    alias: Option<(usize, u64)>,
    owner: Option<OwnerLabel>,
    qom_parent: Option<Option<OwnerLabel>>,
}

struct Plan {
    nodes: Vec<Node>,
    /// (name, root class) per address space, in tree-dump order.
    spaces: Vec<(String, usize)>,
    /// (winner, loser) pairs of equal-priority siblings whose order was
    /// learned from the flat dump: never reversed again.
    ordered: HashSet<(usize, usize)>,
}

struct Built {
    memory: Memory,
    spaces: Vec<SpaceId>,
    /// Class → region.
    ids: Vec<RegionId>,
    /// `spaces[i]` is `plan.spaces[order[i]]`.
    order: Vec<usize>,
}

fn owner_label(r: &OwnerRef) -> OwnerLabel {
    match r {
        OwnerRef::DevId(s) => OwnerLabel::DevId(s.clone()),
        OwnerRef::DevPath(s) => OwnerLabel::DevPath(s.clone()),
        OwnerRef::ObjPath(s) => OwnerLabel::ObjPath(s.clone()),
        OwnerRef::ObjType(s) => OwnerLabel::ObjType(s.clone()),
    }
}

fn label_kind(l: &OwnerLabel) -> u8 {
    match l {
        OwnerLabel::DevId(_) => 0,
        OwnerLabel::DevPath(_) => 1,
        OwnerLabel::ObjPath(_) => 2,
        OwnerLabel::ObjType(_) => 3,
    }
}

fn label_text(l: &OwnerLabel) -> &str {
    match l {
        OwnerLabel::DevId(s)
        | OwnerLabel::DevPath(s)
        | OwnerLabel::ObjPath(s)
        | OwnerLabel::ObjType(s) => s,
    }
}

impl Plan {
    fn new(
        occs: &Occurrences<'_>,
        classes: &Classes,
        targets: &HashMap<usize, usize>,
        tree: &TreeDump,
    ) -> Result<Plan, ImportError> {
        let io_roots: HashSet<usize> = occs
            .blocks
            .iter()
            .filter(|b| b.spaces.is_some_and(|s| s.iter().any(|n| n == "I/O")))
            .map(|b| classes.of[b.root])
            .collect();
        let mut nodes = Vec::with_capacity(classes.members.len());
        for (c, members) in classes.members.iter().enumerate() {
            // The first nested occurrence gives the container, address and
            // priority; otherwise the region is unmapped.
            let nested = members
                .iter()
                .copied()
                .find(|&m| occs.list[m].parent.is_some());
            let rep = &occs.list[nested.unwrap_or(members[0])];
            let l = rep.line;
            let alias = match &l.alias {
                Some(a) => Some((
                    *targets
                        .get(&c)
                        .ok_or_else(|| ImportError::UnknownAliasTarget {
                            line: l.line,
                            alias: l.name.clone(),
                            target: a.target_name.clone(),
                        })?,
                    a.target_start,
                )),
                None => None,
            };
            let (kind, readonly) = match (l.ty, alias.is_some()) {
                (_, true) => (Kind::Alias, false),
                (TypeTag::Ram, _) => (Kind::Ram, false),
                (TypeTag::Rom, _) => (Kind::Ram, true),
                (TypeTag::Romd, _) => (Kind::RomDevice, false),
                (TypeTag::Ramd, _) => (Kind::RamDevice, false),
                (TypeTag::Container, _) => (Kind::Container, false),
                (TypeTag::Io, _) if io_roots.contains(&c) => (Kind::IoRoot, false),
                (TypeTag::Io, _) if !l.children.is_empty() => (Kind::Container, false),
                (TypeTag::Io, _) => (Kind::Mmio, false),
            };
            nodes.push(Node {
                name: l.name.clone(),
                line: l.line,
                kind,
                io: l.ty == TypeTag::Io && alias.is_none(),
                locked: false,
                size: rep.size,
                addr: rep.addr,
                priority: l.priority,
                enabled: !l.disabled,
                readonly,
                nonvolatile: l.nonvolatile,
                mapped: nested.is_some(),
                children: rep.children.iter().map(|&ch| classes.of[ch]).collect(),
                alias,
                owner: None,
                qom_parent: None,
            });
        }
        let mut spaces = Vec::new();
        for (g, b) in tree.groups.iter().zip(&occs.blocks) {
            for n in &g.names {
                spaces.push((n.clone(), classes.of[b.root]));
            }
        }
        Ok(Plan {
            nodes,
            spaces,
            ordered: HashSet::new(),
        })
    }

    fn attach_owners(
        &mut self,
        occs: &Occurrences<'_>,
        classes: &Classes,
        dump: &TreeDump,
    ) -> Result<(), ImportError> {
        let owner_occs = OwnerBlocks::new(dump);
        let mut used = vec![false; occs.blocks.len()];
        let visible: Vec<Vec<(usize, String, usize)>> =
            (0..occs.blocks.len()).map(|b| occs.visible(b)).collect();
        // Tree blocks by header, in file order: an owner block is only
        // compared with blocks of its own header (and the used ones at the
        // front of that list are skipped once), so many blocks cost linear
        // time.
        let mut by_header: HashMap<(bool, String), (usize, Vec<usize>)> = HashMap::new();
        for (b, info) in occs.blocks.iter().enumerate() {
            let key = match info.spaces {
                Some(names) => (true, names.join("\n")),
                None => (false, info.name.to_owned()),
            };
            by_header.entry(key).or_default().1.push(b);
        }
        for ob in &owner_occs.blocks {
            let key = match &ob.spaces {
                Some(names) => (true, names.join("\n")),
                None => (false, ob.name.clone()),
            };
            let found = by_header.get_mut(&key).and_then(|(skip, blocks)| {
                while blocks.get(*skip).is_some_and(|&b| used[b]) {
                    *skip += 1;
                }
                blocks[(*skip).min(blocks.len())..]
                    .iter()
                    .copied()
                    .find(|&b| {
                        !used[b]
                            && visible[b].len() == ob.lines.len()
                            && visible[b]
                                .iter()
                                .zip(&ob.lines)
                                .all(|(v, l)| v.0 == l.0 && v.1 == l.1)
                    })
            });
            let Some(b) = found else {
                return Err(ImportError::OwnerMismatch {
                    line: ob.line,
                    message: "this block prints lines that no block of the tree dump has (is it a dump of the same machine?)".into(),
                });
            };
            used[b] = true;
            for (v, l) in visible[b].iter().zip(&ob.lines) {
                let node = &mut self.nodes[classes.of[v.2]];
                if node.qom_parent.is_some() {
                    continue;
                }
                match &l.2 {
                    Some(OwnerDecor::Owner { owner, parent }) => {
                        node.owner = Some(owner_label(owner));
                        node.qom_parent = Some(parent.as_ref().map(owner_label));
                    }
                    Some(OwnerDecor::ParentOnly(p)) => {
                        node.qom_parent = Some(Some(owner_label(p)));
                    }
                    Some(OwnerDecor::Orphan) => node.qom_parent = Some(None),
                    None => {}
                }
            }
        }
        Ok(())
    }

    fn space_rank(name: &str) -> (u8, u64, String) {
        match name {
            "memory" => (0, 0, String::new()),
            "I/O" => (1, 0, String::new()),
            n if n.starts_with("cpu-") => {
                let digits: String = n
                    .chars()
                    .rev()
                    .take_while(char::is_ascii_digit)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                let prefix = &n[..n.len() - digits.len()];
                (2, digits.parse().unwrap_or(0), prefix.to_owned())
            }
            _ => (3, 0, String::new()),
        }
    }

    /// Indices into `self.spaces` in the heuristic creation order.
    fn heuristic_space_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.spaces.len()).collect();
        order.sort_by_key(|&i| Self::space_rank(&self.spaces[i].0));
        order
    }

    /// The heuristic order, corrected by the `AS` order of each flat block.
    fn space_order_from(&self, flat: &FlatDump) -> Result<Vec<usize>, ImportError> {
        let h = self.heuristic_space_order();
        let rank: HashMap<usize, usize> = h.iter().enumerate().map(|(r, &i)| (i, r)).collect();
        let n = self.spaces.len();
        let mut after: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut indeg = vec![0usize; n];
        // Spaces by (name, root name), in heuristic order: the k-th `AS`
        // line of a block with a given key is the k-th space of that key.
        let mut by_key: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
        for &i in &h {
            let (name, root) = &self.spaces[i];
            by_key
                .entry((name.as_str(), self.nodes[*root].name.as_str()))
                .or_default()
                .push(i);
        }
        for b in &flat.views {
            let mut taken: HashMap<(&str, &str), usize> = HashMap::new();
            let mut seq = Vec::new();
            for a in &b.spaces {
                let key = (a.name.as_str(), a.root.as_str());
                let k = taken.entry(key).or_insert(0);
                let found = by_key.get(&key).and_then(|v| v.get(*k)).copied();
                *k += 1;
                let Some(i) = found else {
                    return Err(ImportError::UnknownSpace {
                        line: b.line,
                        name: a.name.clone(),
                        root: a.root.clone(),
                    });
                };
                seq.push(i);
            }
            for w in seq.windows(2) {
                after[w[0]].push(w[1]);
                indeg[w[1]] += 1;
            }
        }
        // Kahn's algorithm, smallest heuristic rank first.
        let mut ready: std::collections::BTreeSet<(usize, usize)> = (0..n)
            .filter(|&i| indeg[i] == 0)
            .map(|i| (rank[&i], i))
            .collect();
        let mut out = Vec::with_capacity(n);
        let mut done = vec![false; n];
        while out.len() < n {
            let next = match ready.pop_first() {
                Some((_, i)) => i,
                // Contradictory constraints: take the best remaining.
                None => match h.iter().copied().find(|&i| !done[i]) {
                    Some(i) => i,
                    None => break,
                },
            };
            if done[next] {
                continue;
            }
            done[next] = true;
            out.push(next);
            for &j in &after[next] {
                indeg[j] = indeg[j].saturating_sub(1);
                if indeg[j] == 0 && !done[j] {
                    ready.insert((rank[&j], j));
                }
            }
        }
        Ok(out)
    }

    fn build(&self, order: &[usize]) -> Result<Built, ImportError> {
        let memory = Memory::new();
        let (ids, spaces) = {
            let m: &Machine = &memory;
            let t = m.begin();
            let r = self.build_in(m, order);
            t.commit();
            r?
        };
        Ok(Built {
            memory,
            spaces,
            ids,
            order: order.to_vec(),
        })
    }

    fn build_in(
        &self,
        m: &Machine,
        order: &[usize],
    ) -> Result<(Vec<RegionId>, Vec<SpaceId>), ImportError> {
        let model = |n: &Node| {
            let name = n.name.clone();
            let line = n.line;
            move |source| ImportError::Model {
                line,
                region: name,
                source,
            }
        };
        let mut owners: HashMap<(u8, String), OwnerId> = HashMap::new();
        let mut owner_of = |n: &Node| -> Result<Option<OwnerId>, ImportError> {
            let Some(l) = &n.owner else { return Ok(None) };
            let key = (label_kind(l), label_text(l).to_owned());
            if let Some(&o) = owners.get(&key) {
                return Ok(Some(o));
            }
            let o = m
                .new_owner_labeled(label_text(l), l.clone(), None)
                .map_err(model(n))?;
            owners.insert(key, o);
            Ok(Some(o))
        };
        let mut ids: Vec<Option<RegionId>> = vec![None; self.nodes.len()];
        for (c, n) in self.nodes.iter().enumerate() {
            let owner = owner_of(n)?;
            let id = match n.kind {
                Kind::Alias => continue,
                Kind::Container => m.new_container(&n.name, n.size, owner),
                Kind::IoRoot if owner.is_none() => m.new_io_root(&n.name, n.size),
                Kind::Mmio | Kind::IoRoot => {
                    m.new_model_region(&n.name, RegionKind::Mmio, n.size, owner)
                }
                Kind::Ram => m.new_model_region(&n.name, RegionKind::Ram, n.size, owner),
                Kind::RamDevice => {
                    m.new_model_region(&n.name, RegionKind::RamDevice, n.size, owner)
                }
                Kind::RomDevice => {
                    m.new_model_region(&n.name, RegionKind::RomDevice, n.size, owner)
                }
            }
            .map_err(model(n))?;
            ids[c] = Some(id);
        }
        // Aliases once their targets exist (targets may be aliases): each
        // alias not created yet first creates the chain of aliases below
        // it, on an explicit stack, so any order of chains costs linear time.
        for first in 0..self.nodes.len() {
            if ids[first].is_some() || self.nodes[first].alias.is_none() {
                continue;
            }
            let mut chain = vec![first];
            let mut on_chain: HashSet<usize> = HashSet::from([first]);
            while let Some(&c) = chain.last() {
                let n = &self.nodes[c];
                let Some((target, offset)) = n.alias else {
                    chain.pop();
                    continue;
                };
                match ids[target] {
                    Some(t) => {
                        let owner = owner_of(n)?;
                        let id = m
                            .new_alias(&n.name, t, offset, n.size, owner)
                            .map_err(model(n))?;
                        ids[c] = Some(id);
                        chain.pop();
                    }
                    None if on_chain.insert(target) => chain.push(target),
                    None => {
                        return Err(ImportError::AliasLoop {
                            line: self.nodes[first].line,
                            alias: self.nodes[first].name.clone(),
                        })
                    }
                }
            }
        }
        let ids: Vec<RegionId> = ids.into_iter().flatten().collect();
        for (c, n) in self.nodes.iter().enumerate() {
            // Added in reverse print order: equal priorities end up in
            // print order (newest first). In one batch: one by one costs
            // O(n²) for n equal-priority siblings.
            let batch: Vec<(u64, RegionId, i32)> = n
                .children
                .iter()
                .rev()
                .map(|&ch| (self.nodes[ch].addr, ids[ch], self.nodes[ch].priority))
                .collect();
            if !batch.is_empty() {
                m.add_subregions(ids[c], &batch).map_err(|(i, e)| {
                    let ch = n.children[n.children.len() - 1 - i];
                    model(&self.nodes[ch])(e)
                })?;
            }
            if !n.mapped && n.addr != 0 {
                m.set_address(ids[c], n.addr).map_err(model(n))?;
            }
            if !n.enabled {
                m.set_enabled(ids[c], false).map_err(model(n))?;
            }
            if n.readonly {
                m.set_readonly(ids[c], true).map_err(model(n))?;
            }
            if n.nonvolatile {
                m.set_nonvolatile(ids[c], true).map_err(model(n))?;
            }
            if let Some(p) = &n.qom_parent {
                m.set_qom_parent(ids[c], p.clone()).map_err(model(n))?;
            }
        }
        let mut spaces = Vec::with_capacity(order.len());
        for &i in order {
            let (name, root) = &self.spaces[i];
            let s = m
                .new_address_space(name, ids[*root], None)
                .map_err(model(&self.nodes[*root]))?;
            spaces.push(s);
        }
        Ok((ids, spaces))
    }

    /// Compares the flat dump with what `built` renders and fixes the plan;
    /// returns what was learned (empty when nothing changed).
    fn learn(&mut self, built: &Built, flat: &FlatDump) -> Result<Vec<String>, ImportError> {
        let class_of: HashMap<RegionId, usize> = built
            .ids
            .iter()
            .enumerate()
            .map(|(c, &id)| (id, c))
            .collect();
        let mut terminate: BTreeMap<usize, String> = BTreeMap::new();
        let mut contain: BTreeMap<usize, String> = BTreeMap::new();
        let mut readonly: BTreeMap<usize, String> = BTreeMap::new();
        let mut reorder: Vec<(usize, usize, usize, String)> = Vec::new();
        // Every address space of a block shares the block's view (QEMU
        // groups spaces by view: all spaces over empty roots share the empty
        // view "Root memory region: (none)"), so each distinct root of a
        // block is compared with it, not only the first.
        let mut space_positions: HashMap<(&str, &str), usize> = HashMap::new();
        for (pos, &i) in built.order.iter().enumerate() {
            space_positions
                .entry((
                    self.spaces[i].0.as_str(),
                    self.nodes[self.spaces[i].1].name.as_str(),
                ))
                .or_insert(pos);
        }
        let mut checks: Vec<(&crate::qemu_text::parse::FlatBlock, usize)> = Vec::new();
        for b in &flat.views {
            let mut roots_seen: HashSet<usize> = HashSet::new();
            for a in &b.spaces {
                let Some(&pos) = space_positions.get(&(a.name.as_str(), a.root.as_str())) else {
                    return Err(ImportError::UnknownSpace {
                        line: b.line,
                        name: a.name.clone(),
                        root: a.root.clone(),
                    });
                };
                if roots_seen.insert(self.spaces[built.order[pos]].1) {
                    checks.push((b, pos));
                }
            }
        }
        for (b, pos) in checks {
            let Ok(handle) = built.memory.address_space(built.spaces[pos]) else {
                continue;
            };
            let view = handle.view();
            let ours: HashSet<(u64, u64, &str, u64, RegionType, i32, bool)> = view
                .iter()
                .map(|r| {
                    (
                        r.start(),
                        r.last(),
                        r.region().name(),
                        r.offset_in_region(),
                        r.printed_type(),
                        r.attrs().priority,
                        r.attrs().nonvolatile,
                    )
                })
                .collect();
            let theirs: HashSet<(u64, u64, &str, u64, RegionType, i32, bool)> = b
                .ranges
                .iter()
                .map(|l| {
                    (
                        l.start,
                        l.last,
                        l.name.as_str(),
                        l.offset,
                        region_type(l.ty),
                        l.priority,
                        l.nonvolatile,
                    )
                })
                .collect();
            let reached: HashSet<usize> = view
                .reached()
                .iter()
                .filter_map(|id| class_of.get(id).copied())
                .collect();
            // The `i/o` containers reached, by (name, priority): what a
            // range QEMU shows and memtree does not can be explained by.
            let mut guessed_containers: HashMap<(&str, i32), Vec<usize>> = HashMap::new();
            for &c in &reached {
                let n = &self.nodes[c];
                if n.io && !n.locked && n.kind == Kind::Container {
                    guessed_containers
                        .entry((n.name.as_str(), n.priority))
                        .or_default()
                        .push(c);
                }
            }
            // The dump's ranges by name, sorted by start, with the running
            // maximum of their ends: "does the dump show a range of this
            // name overlapping [s, l]" in O(log n).
            let mut shown_by_name: HashMap<&str, (Vec<u64>, Vec<u64>)> = HashMap::new();
            {
                let mut by_name: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
                for l in &b.ranges {
                    by_name
                        .entry(l.name.as_str())
                        .or_default()
                        .push((l.start, l.last));
                }
                for (name, mut v) in by_name {
                    v.sort_unstable();
                    let starts = v.iter().map(|x| x.0).collect();
                    let max_last = v
                        .iter()
                        .scan(0u64, |m, x| {
                            *m = (*m).max(x.1);
                            Some(*m)
                        })
                        .collect();
                    shown_by_name.insert(name, (starts, max_last));
                }
            }
            let shown_overlapping = |name: &str, start: u64, last: u64| {
                shown_by_name.get(name).is_some_and(|(starts, max_last)| {
                    let upto = starts.partition_point(|&s| s <= last);
                    upto > 0 && max_last[upto - 1] >= start
                })
            };
            // Ranges QEMU shows that memtree does not: a container guessed
            // wrong terminates.
            for l in b.ranges.iter() {
                let key = (
                    l.start,
                    l.last,
                    l.name.as_str(),
                    l.offset,
                    region_type(l.ty),
                    l.priority,
                    l.nonvolatile,
                );
                if ours.contains(&key) {
                    continue;
                }
                for &c in guessed_containers
                    .get(&(l.name.as_str(), l.priority))
                    .into_iter()
                    .flatten()
                {
                    terminate.insert(c, format!("flat dump line {}", l.line));
                }
                // An equal-priority sibling that overlaps the winner here
                // and holds the region QEMU shows: it is newer (wins).
                let path = built
                    .memory
                    .read(|t| point_path_based(t, view.root(), l.start));
                if let Some(fix) = self.sibling_to_promote(&path, &class_of, l) {
                    reorder.push(fix);
                }
                // A readonly range over a region memtree renders writable.
                if l.ty == TypeTag::Rom {
                    // The ranges overlapping the line, found by lookup.
                    let writable = view.ranges_in(l.start, l.last).filter(|r| {
                        r.region().name() == l.name && r.printed_type() != RegionType::Rom
                    });
                    for r in writable {
                        {
                            let at = r.start().max(l.start);
                            let path: Vec<RegionId> = built
                                .memory
                                .read(|t| point_path_based(t, view.root(), at))
                                .into_iter()
                                .map(|(id, _)| id)
                                .collect();
                            if let Some(c) = path
                                .iter()
                                .rev()
                                .filter_map(|id| class_of.get(id).copied())
                                .find(|&c| {
                                    let n = &self.nodes[c];
                                    n.kind != Kind::Ram && !n.readonly
                                })
                            {
                                readonly.insert(c, format!("flat dump line {}", l.line));
                            }
                        }
                    }
                }
            }
            // Ranges memtree shows that QEMU does not: a region guessed to
            // terminate is a container.
            for r in view.iter() {
                let key = (
                    r.start(),
                    r.last(),
                    r.region().name(),
                    r.offset_in_region(),
                    r.printed_type(),
                    r.attrs().priority,
                    r.attrs().nonvolatile,
                );
                if theirs.contains(&key) {
                    continue;
                }
                let Some(&c) = class_of.get(&r.region().id()) else {
                    continue;
                };
                let n = &self.nodes[c];
                let shown = shown_overlapping(&n.name, r.start(), r.last());
                if n.io && !n.locked && matches!(n.kind, Kind::Mmio | Kind::IoRoot) && !shown {
                    contain.insert(c, format!("flat dump block at line {}", b.line));
                }
            }
        }
        let mut facts = Vec::new();
        for (parent, winner, loser, why) in reorder {
            if self.ordered.contains(&(loser, winner)) || !self.ordered.insert((winner, loser)) {
                continue;
            }
            let children = &mut self.nodes[parent].children;
            let (Some(w), Some(at)) = (
                children.iter().position(|&c| c == winner),
                children.iter().position(|&c| c == loser),
            ) else {
                continue;
            };
            if w < at {
                continue;
            }
            children.remove(w);
            children.insert(at, winner);
            facts.push(format!(
                "\"{}\" (tree line {}) is newer than its overlapping equal-priority sibling \"{}\" (tree line {}) and wins over it ({why})",
                self.nodes[winner].name, self.nodes[winner].line, self.nodes[loser].name, self.nodes[loser].line
            ));
        }
        for (c, why) in terminate {
            let n = &mut self.nodes[c];
            n.kind = Kind::Mmio;
            n.locked = true;
            facts.push(format!(
                "\"{}\" (tree line {}) fills the holes between its subregions ({why})",
                n.name, n.line
            ));
        }
        for (c, why) in contain {
            let n = &mut self.nodes[c];
            if n.locked {
                continue;
            }
            n.kind = Kind::Container;
            n.locked = true;
            facts.push(format!(
                "\"{}\" (tree line {}) is a pure container ({why})",
                n.name, n.line
            ));
        }
        for (c, why) in readonly {
            let n = &mut self.nodes[c];
            n.readonly = true;
            facts.push(format!(
                "\"{}\" (tree line {}) is readonly ({why})",
                n.name, n.line
            ));
        }
        Ok(facts)
    }
}

impl Plan {
    /// For a flat-dump range `l` memtree does not render: the container on
    /// the rendering path of `l.start` one of whose children (`winner`)
    /// holds a region named like `l`, overlaps the path's child (`loser`) at
    /// that address with the same priority, and comes after it in the list.
    /// Moving `winner` before `loser` is the fix (QEMU: newest first among
    /// equal priorities). Returns (container, winner, loser, why).
    fn sibling_to_promote(
        &self,
        path: &[(RegionId, i128)],
        class_of: &HashMap<RegionId, usize>,
        l: &crate::qemu_text::parse::FlatLine,
    ) -> Option<(usize, usize, usize, String)> {
        let last = class_of.get(&path.last()?.0).copied()?;
        if self.nodes[last].name == l.name {
            return None;
        }
        let at = i128::from(l.start);
        for k in (0..path.len().saturating_sub(1)).rev() {
            let (Some(&p), Some(&a)) = (class_of.get(&path[k].0), class_of.get(&path[k + 1].0))
            else {
                continue;
            };
            let parent = &self.nodes[p];
            if parent.kind == Kind::Alias {
                continue;
            }
            let Some(ai) = parent.children.iter().position(|&c| c == a) else {
                continue;
            };
            let base = path[k].1;
            let found = parent.children[ai + 1..].iter().copied().find(|&x| {
                let n = &self.nodes[x];
                let start = base + i128::from(n.addr);
                n.enabled
                    && n.priority == self.nodes[a].priority
                    && start <= at
                    && at < start + n.size as i128
                    && self.subtree_has_name(x, &l.name)
            });
            if let Some(x) = found {
                return Some((p, x, a, format!("flat dump line {}", l.line)));
            }
        }
        None
    }

    /// Whether `root` or a region below it (through aliases) is named `name`.
    /// Bounded: a huge subtree is searched up to a fixed number of regions.
    fn subtree_has_name(&self, root: usize, name: &str) -> bool {
        let mut seen: HashSet<usize> = HashSet::new();
        let mut stack = vec![root];
        while let Some(c) = stack.pop() {
            if !seen.insert(c) || seen.len() > 4096 {
                continue;
            }
            let n = &self.nodes[c];
            if n.name == name {
                return true;
            }
            stack.extend(n.children.iter().copied());
            if let Some((t, _)) = n.alias {
                stack.push(t);
            }
        }
        false
    }

    /// What an import without a flat dump guessed: leaf `i/o` regions taken
    /// as MMIO, and the order of overlapping equal-priority siblings at
    /// different addresses (the tree dump prints them by address; equal
    /// addresses are printed in list order and are not guesses).
    fn guesses(&self) -> Vec<String> {
        let mut out = Vec::new();
        for n in &self.nodes {
            if n.io && n.kind == Kind::Mmio && !n.locked && n.children.is_empty() {
                out.push(format!(
                    "\"{}\" (tree line {}): an `i/o` region without subregions, taken as MMIO (it may be an empty container)",
                    n.name, n.line
                ));
            }
        }
        for parent in &self.nodes {
            let mut kids: Vec<(i32, u64, u128, usize, usize)> = parent
                .children
                .iter()
                .enumerate()
                .filter(|&(_, &c)| self.nodes[c].enabled)
                .map(|(i, &c)| {
                    let n = &self.nodes[c];
                    (n.priority, n.addr, u128::from(n.addr) + n.size, i, c)
                })
                .collect();
            kids.sort_unstable();
            // Per priority, by address: a child starting below the running
            // maximum end overlaps the child that reached it.
            let mut reach: Option<(i32, u128, usize, usize)> = None;
            for &(prio, addr, end, i, c) in &kids {
                match reach {
                    Some((p, max_end, j, d))
                        if p == prio
                            && u128::from(addr) < max_end
                            && self.nodes[d].addr != addr =>
                    {
                        let w = if i < j { c } else { d };
                        out.push(format!(
                            "\"{}\" (tree line {}) and \"{}\" (tree line {}) overlap at equal priority {prio} in \"{}\": their order is guessed (\"{}\" taken as newer: it wins)",
                            self.nodes[d].name, self.nodes[d].line, self.nodes[c].name, self.nodes[c].line,
                            parent.name, self.nodes[w].name
                        ));
                    }
                    _ => {}
                }
                match reach {
                    Some((p, max_end, _, _)) if p == prio && max_end >= end => {}
                    _ => reach = Some((prio, end, i, c)),
                }
            }
        }
        out
    }
}

fn region_type(t: TypeTag) -> RegionType {
    match t {
        TypeTag::Ram => RegionType::Ram,
        TypeTag::Rom => RegionType::Rom,
        TypeTag::Romd => RegionType::Romd,
        TypeTag::Ramd => RegionType::Ramd,
        TypeTag::Io | TypeTag::Container => RegionType::Io,
    }
}

/// The regions rendering visits to reach the one serving `addr`, outermost
/// first (a point query of the render walk: first terminating hit wins).
/// Iterative, like render: no depth of nesting or alias chain can overflow
/// the stack.
fn point_path_based(topo: &Topology, root: Option<RegionId>, addr: u64) -> Vec<(RegionId, i128)> {
    enum Step {
        Enter(RegionId, i128),
        /// Every subregion of the region on top of the path missed:
        /// it serves the address if it terminates, otherwise it is left.
        Leave {
            terminates: bool,
        },
    }
    let addr = i128::from(addr);
    let mut path = Vec::new();
    let mut steps: Vec<Step> = root.map(|r| Step::Enter(r, 0)).into_iter().collect();
    while let Some(step) = steps.pop() {
        match step {
            Step::Enter(id, base) => {
                let Some(n) = topo.node(id) else { continue };
                if !n.enabled {
                    continue;
                }
                let base = base + i128::from(n.addr);
                if addr < base || addr >= base + n.size as i128 {
                    continue;
                }
                path.push((id, base));
                if n.kind() == RegionKind::Alias {
                    steps.push(Step::Leave { terminates: false });
                    if let Some(t) = n.alias_target.and_then(|t| topo.node(t).map(|tn| (t, tn))) {
                        let b = base - i128::from(t.1.addr) - i128::from(n.alias_offset);
                        steps.push(Step::Enter(t.0, b));
                    }
                    continue;
                }
                steps.push(Step::Leave {
                    terminates: n.terminates(),
                });
                for &s in n.subregions.iter().rev() {
                    steps.push(Step::Enter(s, base));
                }
            }
            Step::Leave { terminates: true } => return path,
            Step::Leave { terminates: false } => {
                path.pop();
            }
        }
    }
    path
}

// ---- owner dump ----------------------------------------------------------------

struct OwnerBlock {
    line: usize,
    spaces: Option<Vec<String>>,
    name: String,
    /// (depth, text without decorations, decoration) of each printed line.
    lines: Vec<(usize, String, Option<OwnerDecor>)>,
}

struct OwnerBlocks {
    blocks: Vec<OwnerBlock>,
}

impl OwnerBlocks {
    fn new(dump: &TreeDump) -> OwnerBlocks {
        let mut blocks = Vec::new();
        let all = dump
            .groups
            .iter()
            .map(|g| (g.line, Some(g.names.clone()), String::new(), &g.root))
            .chain(
                dump.regions
                    .iter()
                    .map(|r| (r.line, None, r.name.clone(), &r.root)),
            );
        for (line, spaces, name, root) in all {
            let mut lines = Vec::new();
            let mut stack = vec![(root, 1usize)];
            while let Some((l, depth)) = stack.pop() {
                if !l.is_placeholder() && !l.disabled {
                    lines.push((depth, line_key(l), l.owner.clone()));
                }
                for c in l.children.iter().rev() {
                    stack.push((c, depth + 1));
                }
            }
            blocks.push(OwnerBlock {
                line,
                spaces,
                name,
                lines,
            });
        }
        OwnerBlocks { blocks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu_text::parse::{parse_flat, parse_tree, parse_tree_strict};
    use crate::qemu_text::print::{print_flat, print_tree, FlatOptions, TreeOptions};

    const TREE: &str = "\
address-space: cpu-memory-0
address-space: memory
  0000000000000000-ffffffffffffffff (prio 0, i/o): system
    0000000000000000-000000000009ffff (prio 0, ram): alias ram-below-4g @pc.ram 0000000000000000-000000000009ffff
    0000000000000000-ffffffffffffffff (prio -1, i/o): pci
      00000000000e0000-00000000000fffff (prio 1, rom): alias isa-bios @pc.bios 0000000000020000-000000000003ffff
      00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
    00000000000c0000-00000000000c3fff (prio 1, ram): alias pam-rom @pc.ram 00000000000c0000-00000000000c3fff

address-space: I/O
  0000000000000000-000000000000ffff (prio 0, i/o): io
    0000000000000070-0000000000000071 (prio 0, i/o): rtc
      0000000000000070-0000000000000070 (prio 0, i/o): rtc-index

memory-region: pc.ram
  0000000000000000-00000000000fffff (prio 0, ram): pc.ram

memory-region: pc.bios
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios

";

    const FLAT: &str = "\
FlatView #0
 AS \"memory\", root: system
 AS \"cpu-memory-0\", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram
  00000000000c0000-00000000000c3fff (prio 0, rom): pc.ram @00000000000c0000
  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios

FlatView #1
 AS \"I/O\", root: io
 Root memory region: io
  0000000000000000-000000000000006f (prio 0, i/o): io
  0000000000000070-0000000000000070 (prio 0, i/o): rtc-index
  0000000000000071-0000000000000071 (prio 0, i/o): rtc @0000000000000001
  0000000000000072-000000000000ffff (prio 0, i/o): io @0000000000000072

";

    fn tree_of(m: &Memory, disabled: bool) -> String {
        let mut s = String::new();
        print_tree(
            m,
            &mut s,
            TreeOptions {
                disabled,
                owners: false,
            },
        )
        .unwrap();
        s
    }

    fn flat_of(m: &Memory) -> String {
        let mut s = String::new();
        print_flat(m, &mut s, FlatOptions::default()).unwrap();
        s
    }

    #[test]
    fn import_reprints_the_tree_dump_exactly() {
        let tree = parse_tree_strict(TREE).unwrap();
        let got = import(&tree, None, None).unwrap();
        // Groups are printed in address-space creation order: `memory`
        // first, then `I/O` — which is also this dump's order.
        assert_eq!(tree_of(&got.memory, true), TREE);
    }

    #[test]
    fn import_identifies_an_alias_target_printed_in_two_places() {
        let tree = parse_tree_strict(TREE).unwrap();
        let got = import(&tree, None, None).unwrap();
        // pc.bios inside `pci` (line 7) and its memory-region section (line 19).
        assert_eq!(got.regions[&7], got.regions[&19]);
        assert_ne!(got.regions[&4], got.regions[&16]); // alias vs its target
        assert_eq!(got.memory.region_count(), 10);
    }

    #[test]
    fn import_learns_terminates_and_readonly_bits_from_the_flat_dump() {
        let tree = parse_tree_strict(TREE).unwrap();
        let guessed = import(&tree, None, None).unwrap();
        assert_ne!(
            flat_of(&guessed.memory),
            FLAT,
            "rtc is guessed to be a container"
        );
        let flat = parse_flat(FLAT).unwrap();
        let got = import(&tree, Some(&flat), None).unwrap();
        assert_eq!(flat_of(&got.memory), FLAT);
        assert!(got
            .learned
            .iter()
            .any(|f| f.contains("\"rtc\"") && f.contains("fills the holes")));
        assert!(got
            .learned
            .iter()
            .any(|f| f.contains("\"pam-rom\"") && f.contains("readonly")));
    }

    #[test]
    fn import_takes_address_space_order_from_the_flat_dump() {
        let tree = parse_tree_strict(TREE).unwrap();
        let flat = parse_flat(&FLAT.replace(
            " AS \"memory\", root: system\n AS \"cpu-memory-0\", root: system\n",
            " AS \"cpu-memory-0\", root: system\n AS \"memory\", root: system\n",
        ))
        .unwrap();
        let got = import(&tree, Some(&flat), None).unwrap();
        let names: Vec<String> = got
            .memory
            .address_spaces()
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(pos("cpu-memory-0") < pos("memory"), "{names:?}");
    }

    #[test]
    fn import_attaches_owners_from_an_owner_dump() {
        let tree = parse_tree_strict(TREE).unwrap();
        let owners = parse_tree(
            &TREE
                .replace(
                    "): rtc\n",
                    "): rtc owner:{dev path=/machine/unattached/device[3]}\n",
                )
                .replace("): rtc-index\n", "): rtc-index orphan\n"),
        )
        .unwrap();
        let got = import(&tree, None, Some(&owners)).unwrap();
        let mut s = String::new();
        print_tree(
            &got.memory,
            &mut s,
            TreeOptions {
                disabled: false,
                owners: true,
            },
        )
        .unwrap();
        assert!(s.contains("): rtc owner:{dev path=/machine/unattached/device[3]}\n"));
        assert!(s.contains("): rtc-index orphan\n"));
        assert!(s.contains("): system parent:{obj path=/machine/unattached}\n"));
    }

    #[test]
    fn import_rejects_an_alias_whose_target_is_not_printed() {
        let tree = parse_tree_strict(&TREE.replace("@pc.bios", "@nowhere")).unwrap();
        let err = import(&tree, None, None).unwrap_err();
        assert!(
            matches!(&err, ImportError::UnknownAliasTarget { line: 6, target, .. } if target == "nowhere"),
            "{err}"
        );
    }

    #[test]
    fn import_rejects_a_dump_with_hidden_regions() {
        let text = "address-space: I/O\n  0000000000000000-000000000000ffff (prio 0, i/o): io\n      0000000000000000-0000000000000003 (prio 0, i/o): acpi-evt\n";
        let err = import(&parse_tree(text).unwrap(), None, None).unwrap_err();
        assert!(
            matches!(err, ImportError::HiddenRegion { line: 3 }),
            "{err}"
        );
    }

    #[test]
    fn import_rejects_a_flat_dump_of_another_machine() {
        let tree = parse_tree_strict(TREE).unwrap();
        let flat = parse_flat(&FLAT.replace("\"I/O\"", "\"io-space\"")).unwrap();
        let err = import(&tree, Some(&flat), None).unwrap_err();
        assert!(
            matches!(&err, ImportError::UnknownSpace { name, .. } if name == "io-space"),
            "{err}"
        );
    }

    #[test]
    fn import_pairs_same_named_alias_targets_in_queue_order() {
        // Two bridges: each one's pair of windows targets its own bus.
        let text = "\
address-space: memory
  0000000000000000-ffffffffffffffff (prio 0, i/o): system
    0000000000001000-0000000000001fff (prio 1, i/o): alias mem @bus 0000000000001000-0000000000001fff
    0000000000002000-0000000000002fff (prio 1, i/o): alias pref @bus 0000000000002000-0000000000002fff
    0000000000003000-0000000000003fff (prio 1, i/o): alias mem @bus 0000000000003000-0000000000003fff
    0000000000004000-0000000000004fff (prio 1, i/o): alias pref @bus 0000000000004000-0000000000004fff

memory-region: bus
  0000000000000000-ffffffffffffffff (prio 0, i/o): bus
    0000000000001000-0000000000001fff (prio 0, i/o): dev-a

memory-region: bus
  0000000000000000-ffffffffffffffff (prio 0, i/o): bus
    0000000000003000-0000000000003fff (prio 0, i/o): dev-b

";
        let got = import(&parse_tree_strict(text).unwrap(), None, None).unwrap();
        assert_eq!(tree_of(&got.memory, true), text);
        let target = |line: usize| {
            got.memory
                .region_info(got.regions[&line])
                .unwrap()
                .alias_target
                .unwrap()
        };
        assert_eq!(target(3), target(4));
        assert_eq!(target(5), target(6));
        assert_ne!(target(3), target(5));
    }
}
