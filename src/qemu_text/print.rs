//! Printer for QEMU 7.2's `info mtree` family: the tree view (`info mtree`,
//! `-D`, `-o`) and the flat view (`info mtree -f`, `-o`).
//!
//! Pure: [`print_tree`] and [`print_flat`] read the topology under the
//! machine's writer lock (no edit, no render) and write into any
//! [`fmt::Write`]. Every *block* is byte-identical to what QEMU 7.2 prints
//! for the same machine (`mtree_info` in QEMU's `system/memory.c`).
//!
//! # Block order (deterministic; QEMU uses hash order)
//!
//! QEMU prints its top-level blocks in `GHashTable` iteration order, which
//! changes from run to run. memtree prints them in this documented order:
//!
//! * **Tree view.** Address-space groups (address spaces sharing one root
//!   region) in the order of the *creation* of each group's first address
//!   space; inside a group, the `address-space:` lines sorted by name
//!   (byte-wise, like QEMU's `strcmp`). Then the `memory-region:` sections
//!   of alias targets in queue order, exactly as QEMU: a target is queued
//!   (once per region) the first time an alias to it is met while printing,
//!   disabled aliases included, and targets met inside a `memory-region:`
//!   section are appended and printed too.
//! * **Flat view.** One `FlatView #N` block per distinct published view
//!   (`Arc::ptr_eq`, which is QEMU's grouping by `FlatView` pointer because
//!   memtree shares views exactly when QEMU does: same physical root), in the
//!   order of the creation of each view's first address space, numbered from
//!   0 in that order; inside a block, address spaces in creation order.
//!
//! # Details reproduced
//!
//! * Inclusive ends with QEMU's 64-bit arithmetic: a zero-size region prints
//!   as one byte; `[DETECTED OVERFLOW!] ` when the end or start wraps. As in
//!   QEMU 7.2 this prefix is printed *before* the indentation and even when
//!   the (disabled) line itself is hidden.
//! * Children sorted by (address ascending, priority descending), ties in
//!   subregion-list order (newest first). Disabled regions are printed only
//!   with `-D` (suffix ` [disabled]`) but their subregions always are.
//! * Types by the QEMU 7.2 rules (no `container` type); an alias prints its
//!   target's type; in flat views a readonly range prints `rom`.
//! * Owners (`-o`): ` owner:{...}` from the owner's [`OwnerLabel`], then
//!   ` parent:{...}`: for regions imported from a QEMU dump exactly the
//!   recorded QOM parent ([`crate::Machine::set_qom_parent`]); otherwise
//!   derived like QEMU derives it for named regions: the owner is the QOM
//!   parent (nothing printed), an owner-less region hangs under
//!   `/machine/unattached`; ` orphan` when neither exists (unnamed regions).
//! * Accelerator suffixes (` KVM`) are never printed: memtree has no
//!   accelerator.

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write};
use std::sync::Arc;

use crate::region::ids::RegionId;
use crate::region::owner_core::OwnerLabel;
use crate::region::region_core::{RegionKind, RegionNode};
use crate::topology::memory::Machine;
use crate::topology::tree::Topology;
use crate::view::flatview::{FlatView, RegionType};

/// Options of the tree view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeOptions {
    /// `-D`: also print disabled regions.
    pub disabled: bool,
    /// `-o`: print owners.
    pub owners: bool,
}

/// Options of the flat view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlatOptions {
    /// `-o`: print owners.
    pub owners: bool,
}

/// `info mtree [-D] [-o]`.
pub fn print_tree(machine: &Machine, out: &mut impl Write, opts: TreeOptions) -> fmt::Result {
    let text = machine.read(|topo| {
        let mut s = String::new();
        tree(topo, &mut s, opts).map(|()| s)
    })?;
    out.write_str(&text)
}

/// `info mtree -f [-o]`.
pub fn print_flat(machine: &Machine, out: &mut impl Write, opts: FlatOptions) -> fmt::Result {
    let text = machine.read(|topo| {
        let mut s = String::new();
        flat(topo, &mut s, opts).map(|()| s)
    })?;
    out.write_str(&text)
}

/// QEMU's `MR_SIZE`: size − 1 in 64-bit arithmetic, 0 for an empty region.
fn mr_size(size: u128) -> u64 {
    if size == 0 {
        0
    } else {
        (size - 1) as u64
    }
}

/// The printed types of regions (for an alias: of its target, through the
/// whole alias chain), each chain followed once: printing a chain of n
/// aliases (one line and one `memory-region:` section each) costs O(n), not
/// O(n²).
#[derive(Default)]
struct Types {
    known: HashMap<RegionId, RegionType>,
    chain: Vec<RegionId>,
}

impl Types {
    fn of(&mut self, topo: &Topology, id: RegionId) -> RegionType {
        if let Some(&t) = self.known.get(&id) {
            return t;
        }
        let mut cur = id;
        // Alias chains are loop-free (checked at edit time); the bound only
        // guards against a corrupted topology.
        let mut ty = RegionType::Io;
        for _ in 0..=topo.regions.len() {
            if let Some(&t) = self.known.get(&cur) {
                ty = t;
                break;
            }
            let Some(n) = topo.node(cur) else {
                break;
            };
            self.chain.push(cur);
            match (n.kind(), n.alias_target) {
                (RegionKind::Alias, Some(t)) => cur = t,
                _ => {
                    ty = RegionType::of(n.kind(), n.readonly, n.romd_mode);
                    break;
                }
            }
        }
        for r in self.chain.drain(..) {
            self.known.insert(r, ty);
        }
        ty
    }
}

fn label(l: &OwnerLabel) -> String {
    match l {
        OwnerLabel::DevId(s) => format!("{{dev id={s}}}"),
        OwnerLabel::DevPath(s) => format!("{{dev path={s}}}"),
        OwnerLabel::ObjPath(s) => format!("{{obj path={s}}}"),
        OwnerLabel::ObjType(s) => format!("{{obj type={s}}}"),
    }
}

/// The ` owner:{..}` / ` parent:{..}` / ` orphan` decoration of a region.
fn owner_decor(topo: &Topology, node: &RegionNode) -> String {
    let owner = node
        .owner
        .and_then(|o| topo.owner(o).ok())
        .map(|o| o.label.clone());
    let parent = match &node.qom_parent {
        Some(recorded) => recorded.clone(),
        // Derived: a named region is a QOM child of its owner, or of
        // /machine/unattached when it has none.
        None if owner.is_some() || node.name().is_empty() => None,
        None => Some(OwnerLabel::ObjPath("/machine/unattached".into())),
    };
    let mut s = String::new();
    if let Some(o) = &owner {
        s.push_str(" owner:");
        s.push_str(&label(o));
    }
    if let Some(p) = parent.filter(|p| Some(p) != owner.as_ref()) {
        s.push_str(" parent:");
        s.push_str(&label(&p));
    }
    if s.is_empty() {
        s.push_str(" orphan");
    }
    s
}

fn tree(topo: &Topology, out: &mut String, opts: TreeOptions) -> fmt::Result {
    // Group address spaces by root region, in order of first creation.
    let mut groups: Vec<(RegionId, Vec<String>)> = Vec::new();
    let mut index: HashMap<RegionId, usize> = HashMap::new();
    for (_, s) in topo.spaces_in_order() {
        let Some(root) = s.root else { continue };
        let i = *index.entry(root).or_insert_with(|| {
            groups.push((root, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(s.name.to_string());
    }
    let mut queue = AliasQueue::default();
    for (root, mut names) in groups {
        names.sort();
        for n in &names {
            writeln!(out, "address-space: {n}")?;
        }
        region_lines(topo, out, root, 1, 0, &mut queue, opts)?;
        out.push('\n');
    }
    let mut i = 0;
    while let Some(&target) = queue.order.get(i) {
        i += 1;
        let name = topo.node(target).map_or("", |n| n.name());
        writeln!(out, "memory-region: {name}")?;
        region_lines(topo, out, target, 1, 0, &mut queue, opts)?;
        out.push('\n');
    }
    Ok(())
}

/// Alias targets to print as `memory-region:` sections, each once (and the
/// printed types of the regions met so far).
#[derive(Default)]
struct AliasQueue {
    order: Vec<RegionId>,
    seen: HashSet<RegionId>,
    types: Types,
}

/// One region line and, recursively, its subregions (QEMU's
/// `mtree_print_mr`). Iterative so that deep trees cannot overflow the stack.
fn region_lines(
    topo: &Topology,
    out: &mut String,
    root: RegionId,
    level: usize,
    base: u64,
    queue: &mut AliasQueue,
    opts: TreeOptions,
) -> fmt::Result {
    let mut stack = vec![(root, level, base)];
    while let Some((id, level, base)) = stack.pop() {
        let Some(node) = topo.node(id) else { continue };
        let start = base.wrapping_add(node.addr);
        let end = start.wrapping_add(mr_size(node.size));
        if start < base || end < start {
            out.push_str("[DETECTED OVERFLOW!] ");
        }
        let alias = match (node.kind(), node.alias_target) {
            (RegionKind::Alias, t) => Some(t),
            _ => None,
        };
        if let Some(Some(t)) = alias {
            if queue.seen.insert(t) {
                queue.order.push(t);
            }
        }
        if node.enabled || opts.disabled {
            for _ in 0..level {
                out.push_str("  ");
            }
            let nv = if node.nonvolatile { "nv-" } else { "" };
            write!(
                out,
                "{start:016x}-{end:016x} (prio {}, {nv}{}): ",
                node.priority,
                queue.types.of(topo, id).as_str()
            )?;
            match alias {
                Some(target) => {
                    let tname = target.and_then(|t| topo.node(t)).map_or("", |t| t.name());
                    let tstart = node.alias_offset;
                    let tend = tstart.wrapping_add(mr_size(node.size));
                    write!(
                        out,
                        "alias {} @{tname} {tstart:016x}-{tend:016x}",
                        node.name()
                    )?;
                }
                None => out.push_str(node.name()),
            }
            if !node.enabled {
                out.push_str(" [disabled]");
            }
            if opts.owners {
                out.push_str(&owner_decor(topo, node));
            }
            out.push('\n');
        }
        // Children: stable sort by (addr asc, priority desc); pushed in
        // reverse so that they pop in print order.
        let mut subs: Vec<(RegionId, &RegionNode)> = node
            .subregions
            .iter()
            .filter_map(|&s| topo.node(s).map(|n| (s, n)))
            .collect();
        subs.sort_by(|a, b| {
            a.1.addr
                .cmp(&b.1.addr)
                .then(b.1.priority.cmp(&a.1.priority))
        });
        for (s, _) in subs.into_iter().rev() {
            stack.push((s, level + 1, start));
        }
    }
    Ok(())
}

fn flat(topo: &Topology, out: &mut String, opts: FlatOptions) -> fmt::Result {
    // Group address spaces by published view, in order of first creation.
    // (view, [(address-space name, root)]) per distinct view.
    type Group = (Arc<FlatView>, Vec<(String, RegionId)>);
    let mut groups: Vec<Group> = Vec::new();
    for (_, s) in topo.spaces_in_order() {
        let Some(root) = s.root else { continue };
        let view = s.handle.view();
        let entry = (s.name.to_string(), root);
        match groups.iter_mut().find(|(v, _)| Arc::ptr_eq(v, &view)) {
            Some((_, members)) => members.push(entry),
            None => groups.push((view, vec![entry])),
        }
    }
    for (n, (view, members)) in groups.iter().enumerate() {
        writeln!(out, "FlatView #{n}")?;
        for (name, root) in members {
            let root_node = topo.node(*root);
            write!(
                out,
                " AS \"{name}\", root: {}",
                root_node.map_or("", |r| r.name())
            )?;
            if let Some(r) = root_node.filter(|r| r.kind() == RegionKind::Alias) {
                let target = r.alias_target.and_then(|t| topo.node(t));
                write!(out, ", alias {}", target.map_or("", |t| t.name()))?;
            }
            out.push('\n');
        }
        match view.root_name() {
            Some(r) => writeln!(out, " Root memory region: {r}")?,
            None => out.push_str(" Root memory region: (none)\n"),
        }
        if view.is_empty() {
            out.push_str("  No rendered FlatView\n\n");
            continue;
        }
        for r in view.iter() {
            let a = r.attrs();
            let nv = if a.nonvolatile { "nv-" } else { "" };
            write!(
                out,
                "  {:016x}-{:016x} (prio {}, {nv}{}): {}",
                r.start(),
                r.last(),
                a.priority,
                r.printed_type().as_str(),
                r.region().name()
            )?;
            if r.offset_in_region() != 0 {
                write!(out, " @{:016x}", r.offset_in_region())?;
            }
            if opts.owners {
                match topo.node(r.region().id()) {
                    Some(node) => out.push_str(&owner_decor(topo, node)),
                    None => out.push_str(" orphan"),
                }
            }
            out.push('\n');
        }
        out.push('\n');
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Memory;

    fn tree_text(m: &Memory, disabled: bool, owners: bool) -> String {
        let mut s = String::new();
        print_tree(m, &mut s, TreeOptions { disabled, owners }).unwrap();
        s
    }

    fn flat_text(m: &Memory, owners: bool) -> String {
        let mut s = String::new();
        print_flat(m, &mut s, FlatOptions { owners }).unwrap();
        s
    }

    #[test]
    fn print_tree_groups_spaces_sharing_a_root_with_sorted_names() {
        let m = Memory::new();
        let sys = m.new_container("system", 1 << 64, None).unwrap();
        m.new_address_space("memory", sys, None).unwrap();
        m.new_address_space("cpu-memory-0", sys, None).unwrap();
        assert_eq!(
            tree_text(&m, false, false),
            "address-space: cpu-memory-0\naddress-space: memory\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n\n"
        );
    }

    #[test]
    fn print_tree_hides_disabled_regions_but_not_their_subregions() {
        let m = Memory::new();
        let io = m.new_io_root("io", 0x10000).unwrap();
        let pm = m.new_container("piix4-pm", 0x40, None).unwrap();
        let evt = m
            .new_model_region("acpi-evt", RegionKind::Mmio, 4, None)
            .unwrap();
        m.add_subregion(pm, 0, evt).unwrap();
        m.add_subregion(io, 0x600, pm).unwrap();
        m.set_enabled(pm, false).unwrap();
        m.new_address_space("I/O", io, None).unwrap();
        let head = "address-space: I/O\n  0000000000000000-000000000000ffff (prio 0, i/o): io\n";
        let child = "      0000000000000600-0000000000000603 (prio 0, i/o): acpi-evt\n\n";
        assert_eq!(tree_text(&m, false, false), format!("{head}{child}"));
        assert_eq!(
            tree_text(&m, true, false),
            format!("{head}    0000000000000600-000000000000063f (prio 0, i/o): piix4-pm [disabled]\n{child}")
        );
    }

    #[test]
    fn print_tree_queues_each_alias_target_once_even_through_disabled_aliases() {
        let m = Memory::new();
        let sys = m.new_container("system", 1 << 64, None).unwrap();
        let ram = m
            .new_model_region("pc.ram", RegionKind::Ram, 0x8000, None)
            .unwrap();
        let lo = m.new_alias("ram-lo", ram, 0, 0x4000, None).unwrap();
        let hi = m.new_alias("ram-hi", ram, 0x4000, 0x4000, None).unwrap();
        m.add_subregion(sys, 0, lo).unwrap();
        m.add_subregion_overlap(sys, 0x10000, hi, 1).unwrap();
        m.set_enabled(hi, false).unwrap();
        m.new_address_space("memory", sys, None).unwrap();
        assert_eq!(
            tree_text(&m, false, false),
            "address-space: memory\n\
             \x20 0000000000000000-ffffffffffffffff (prio 0, i/o): system\n\
             \x20   0000000000000000-0000000000003fff (prio 0, ram): alias ram-lo @pc.ram 0000000000000000-0000000000003fff\n\
             \n\
             memory-region: pc.ram\n\
             \x20 0000000000000000-0000000000007fff (prio 0, ram): pc.ram\n\n"
        );
    }

    #[test]
    fn print_tree_orders_children_by_address_then_descending_priority() {
        let m = Memory::new();
        let sys = m.new_container("system", 0x1000, None).unwrap();
        for (name, addr, prio) in [("c", 0x100, 0), ("a", 0, 0), ("b", 0, 5), ("d", 0, 0)] {
            let r = m
                .new_model_region(name, RegionKind::Mmio, 0x10, None)
                .unwrap();
            m.add_subregion_overlap(sys, addr, r, prio).unwrap();
        }
        m.new_address_space("memory", sys, None).unwrap();
        let names: Vec<String> = tree_text(&m, false, false)
            .lines()
            .skip(2)
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.rsplit(": ").next().map(str::to_owned))
            .collect();
        // Equal (address, priority): newest first, as in the subregion list.
        assert_eq!(names, ["b", "d", "a", "c"]);
    }

    #[test]
    fn print_tree_prints_zero_size_as_one_byte_and_marks_overflow_before_indent() {
        let m = Memory::new();
        let sys = m.new_container("system", 1 << 64, None).unwrap();
        let empty = m.new_container("empty", 0, None).unwrap();
        let huge = m.new_container("huge", 1 << 64, None).unwrap();
        m.add_subregion(sys, 0x10, empty).unwrap();
        m.add_subregion(sys, 0x20, huge).unwrap();
        m.new_address_space("memory", sys, None).unwrap();
        let text = tree_text(&m, false, false);
        assert!(text.contains("\n    0000000000000010-0000000000000010 (prio 0, i/o): empty\n"));
        assert!(text.contains(
            "\n[DETECTED OVERFLOW!]     0000000000000020-000000000000001f (prio 0, i/o): huge\n"
        ));
    }

    #[test]
    fn print_flat_shares_views_and_prints_the_empty_view() {
        let m = Memory::new();
        let sys = m.new_container("system", 1 << 64, None).unwrap();
        let rom = m
            .new_model_region("pc.bios", RegionKind::Ram, 0x20000, None)
            .unwrap();
        m.set_readonly(rom, true).unwrap();
        m.add_subregion(sys, 0xe0000, rom).unwrap();
        let bm = m
            .new_container("bus master container", 1 << 64, None)
            .unwrap();
        let a = m.new_alias("bus master", sys, 0, 1 << 64, None).unwrap();
        m.add_subregion(bm, 0, a).unwrap();
        let bm2 = m
            .new_container("bus master container", 1 << 64, None)
            .unwrap();
        let a2 = m.new_alias("bus master", sys, 0, 1 << 64, None).unwrap();
        m.add_subregion(bm2, 0, a2).unwrap();
        m.set_enabled(a2, false).unwrap();
        m.new_address_space("memory", sys, None).unwrap();
        m.new_address_space("e1000", bm, None).unwrap();
        m.new_address_space("ide", bm2, None).unwrap();
        assert_eq!(
            flat_text(&m, false),
            "FlatView #0\n AS \"memory\", root: system\n AS \"e1000\", root: bus master container\n Root memory region: system\n  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios\n\n\
             FlatView #1\n AS \"ide\", root: bus master container\n Root memory region: (none)\n  No rendered FlatView\n\n"
        );
    }

    #[test]
    fn print_flat_shows_offsets_readonly_aliases_and_alias_roots() {
        let m = Memory::new();
        let ram = m
            .new_model_region("pc.ram", RegionKind::Ram, 0x100000, None)
            .unwrap();
        let sys = m.new_container("system", 1 << 64, None).unwrap();
        let lo = m.new_alias("ram-lo", ram, 0, 0x100000, None).unwrap();
        let shadow = m.new_alias("pam-rom", ram, 0xc0000, 0x4000, None).unwrap();
        m.set_readonly(shadow, true).unwrap();
        m.add_subregion(sys, 0, lo).unwrap();
        m.add_subregion_overlap(sys, 0xc0000, shadow, 1).unwrap();
        let root = m.new_alias("whole", sys, 0, 0x1000, None).unwrap();
        m.new_address_space("memory", sys, None).unwrap();
        m.new_address_space("window", root, None).unwrap();
        let text = flat_text(&m, false);
        assert!(text.contains(
            "  00000000000c0000-00000000000c3fff (prio 0, rom): pc.ram @00000000000c0000\n  00000000000c4000-00000000000fffff (prio 0, ram): pc.ram @00000000000c4000\n"
        ));
        assert!(text
            .contains(" AS \"window\", root: whole, alias system\n Root memory region: whole\n"));
    }

    #[test]
    fn print_owners_derives_qom_parents_unless_recorded() {
        let m = Memory::new();
        let dev = m
            .new_owner_labeled("e1000", OwnerLabel::DevId("net0".into()), None)
            .unwrap();
        let sys = m.new_container("system", 1 << 64, None).unwrap();
        let bar = m
            .new_model_region("e1000-mmio", RegionKind::Mmio, 0x20000, Some(dev))
            .unwrap();
        let odd = m
            .new_model_region("odd", RegionKind::Mmio, 0x10, None)
            .unwrap();
        m.add_subregion(sys, 0xfeb80000, bar).unwrap();
        m.add_subregion(sys, 0x1000, odd).unwrap();
        m.set_qom_parent(odd, None).unwrap();
        m.new_address_space("memory", sys, None).unwrap();
        let text = tree_text(&m, false, true);
        assert!(text.contains("): system parent:{obj path=/machine/unattached}\n"));
        assert!(text.contains("): e1000-mmio owner:{dev id=net0}\n"));
        assert!(text.contains("): odd orphan\n"));
        assert!(flat_text(&m, true).contains("): e1000-mmio owner:{dev id=net0}\n"));
    }
}
