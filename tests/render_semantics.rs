//! Rendering rules of qemu-memory-semantics.md §2.3–§2.5, one test per rule,
//! through the public API only: build a small tree, publish it through an
//! address space, and read the flat view back.

use std::sync::Arc;

use memtree::{FlatView, Memory, RegionId, SpaceId, TopologyError, UnimplementedDevice};

const FULL: u128 = 1 << 64;

fn mmio(m: &Memory, name: &str, size: u128) -> RegionId {
    m.new_mmio(name, size, Arc::new(UnimplementedDevice), None)
        .unwrap()
}

fn container(m: &Memory, name: &str, size: u128) -> RegionId {
    m.new_container(name, size, None).unwrap()
}

/// One flat range, in a form that is easy to compare:
/// (start, last, region name, offset in region, readonly, nonvolatile).
type Row = (u64, u64, String, u64, bool, bool);

fn rows(view: &FlatView) -> Vec<Row> {
    view.ranges()
        .iter()
        .map(|r| {
            (
                r.start(),
                r.last(),
                r.region().name().to_owned(),
                r.offset_in_region(),
                r.attrs().readonly,
                r.attrs().nonvolatile,
            )
        })
        .collect()
}

fn row(start: u64, last: u64, name: &str, offset: u64) -> Row {
    (start, last, name.to_owned(), offset, false, false)
}

fn view_of(m: &Memory, space: SpaceId) -> Arc<FlatView> {
    m.address_space(space).unwrap().view()
}

fn rows_of(m: &Memory, space: SpaceId) -> Vec<Row> {
    rows(&view_of(m, space))
}

/// A machine with a 64 KiB root container "sys" and an address space on it.
fn machine() -> (Memory, RegionId, SpaceId) {
    let m = Memory::new();
    let sys = container(&m, "sys", 0x1_0000);
    let space = m.new_address_space("as", sys, None).unwrap();
    (m, sys, space)
}

// ---- §2.2 ordering ---------------------------------------------------------

#[test]
fn render_higher_priority_sibling_wins() {
    let (m, sys, space) = machine();
    let low = mmio(&m, "low", 0x1000);
    let high = mmio(&m, "high", 0x1000);
    // Added first but with higher priority: still wins.
    m.add_subregion_overlap(sys, 0x800, high, 1).unwrap();
    m.add_subregion_overlap(sys, 0, low, 0).unwrap();
    assert_eq!(
        rows_of(&m, space),
        vec![row(0, 0x7ff, "low", 0), row(0x800, 0x17ff, "high", 0)]
    );
}

#[test]
fn render_negative_priority_loses_to_default_priority() {
    let (m, sys, space) = machine();
    let background = mmio(&m, "background", 0x1_0000);
    let dev = mmio(&m, "dev", 0x100);
    m.add_subregion(sys, 0x200, dev).unwrap();
    m.add_subregion_overlap(sys, 0, background, -1).unwrap();
    assert_eq!(
        rows_of(&m, space),
        vec![
            row(0, 0x1ff, "background", 0),
            row(0x200, 0x2ff, "dev", 0),
            row(0x300, 0xffff, "background", 0x300),
        ]
    );
}

#[test]
fn render_newest_first_among_equal_priorities() {
    let (m, sys, space) = machine();
    let first = mmio(&m, "first", 0x1000);
    let second = mmio(&m, "second", 0x1000);
    m.add_subregion_overlap(sys, 0, first, 2).unwrap();
    m.add_subregion_overlap(sys, 0x800, second, 2).unwrap();
    // The most recently added of equal priorities renders first and wins.
    assert_eq!(
        rows_of(&m, space),
        vec![row(0, 0x7ff, "first", 0), row(0x800, 0x17ff, "second", 0)]
    );
}

#[test]
fn render_set_address_makes_region_newest() {
    let (m, sys, space) = machine();
    let a = mmio(&m, "a", 0x1000);
    let b = mmio(&m, "b", 0x1000);
    m.add_subregion(sys, 0, a).unwrap();
    m.add_subregion(sys, 0, b).unwrap();
    assert_eq!(rows_of(&m, space), vec![row(0, 0xfff, "b", 0)]);
    // Moving `a` to the address it already has re-adds it: now it is newest.
    m.set_address(a, 0).unwrap();
    assert_eq!(rows_of(&m, space), vec![row(0, 0xfff, "a", 0)]);
}

#[test]
fn render_priorities_compare_only_among_siblings() {
    let (m, sys, space) = machine();
    let inner = container(&m, "inner", 0x1000);
    let deep = mmio(&m, "deep", 0x1000);
    let sibling = mmio(&m, "sibling", 0x1000);
    m.add_subregion_overlap(inner, 0, deep, -100).unwrap();
    m.add_subregion_overlap(sys, 0, inner, 1).unwrap();
    m.add_subregion_overlap(sys, 0, sibling, 50).unwrap();
    // `deep`'s -100 is never compared with `sibling`'s 50; `inner` (1) loses.
    assert_eq!(rows_of(&m, space), vec![row(0, 0xfff, "sibling", 0)]);
    m.set_enabled(sibling, false).unwrap();
    assert_eq!(rows_of(&m, space), vec![row(0, 0xfff, "deep", 0)]);
}

// ---- §2.3 rendering ----------------------------------------------------------

#[test]
fn render_disabled_region_vanishes_without_obscuring_lower_siblings() {
    let (m, sys, space) = machine();
    let low = mmio(&m, "low", 0x2000);
    let high = mmio(&m, "high", 0x1000);
    m.add_subregion_overlap(sys, 0, low, 0).unwrap();
    m.add_subregion_overlap(sys, 0x1000, high, 5).unwrap();
    m.set_enabled(high, false).unwrap();
    assert_eq!(rows_of(&m, space), vec![row(0, 0x1fff, "low", 0)]);
    m.set_enabled(high, true).unwrap();
    assert_eq!(
        rows_of(&m, space),
        vec![row(0, 0xfff, "low", 0), row(0x1000, 0x1fff, "high", 0)]
    );
}

#[test]
fn render_disabled_container_hides_its_whole_subtree() {
    let (m, sys, space) = machine();
    let bus = container(&m, "bus", 0x4000);
    let dev = mmio(&m, "dev", 0x1000);
    m.add_subregion(bus, 0x1000, dev).unwrap();
    m.add_subregion(sys, 0x4000, bus).unwrap();
    assert_eq!(rows_of(&m, space), vec![row(0x5000, 0x5fff, "dev", 0)]);
    m.set_enabled(bus, false).unwrap();
    assert_eq!(rows_of(&m, space), vec![]);
}

#[test]
fn render_terminating_region_fills_the_holes_of_its_subregions() {
    let (m, sys, space) = machine();
    let pci = mmio(&m, "pci", 0x4000);
    let bar0 = mmio(&m, "bar0", 0x1000);
    let bar1 = mmio(&m, "bar1", 0x800);
    m.add_subregion(pci, 0x1000, bar0).unwrap();
    m.add_subregion(pci, 0x3000, bar1).unwrap();
    m.add_subregion(sys, 0x8000, pci).unwrap();
    // The subregions win; `pci` serves the gaps, split into ranges with
    // increasing offsets in `pci`.
    assert_eq!(
        rows_of(&m, space),
        vec![
            row(0x8000, 0x8fff, "pci", 0),
            row(0x9000, 0x9fff, "bar0", 0),
            row(0xa000, 0xafff, "pci", 0x2000),
            row(0xb000, 0xb7ff, "bar1", 0),
            row(0xb800, 0xbfff, "pci", 0x3800),
        ]
    );
}

#[test]
fn render_terminating_region_subregions_win_even_with_lower_priority() {
    let (m, sys, space) = machine();
    let parent = mmio(&m, "parent", 0x2000);
    let child = mmio(&m, "child", 0x1000);
    m.add_subregion_overlap(parent, 0, child, -7).unwrap();
    m.add_subregion(sys, 0, parent).unwrap();
    assert_eq!(
        rows_of(&m, space),
        vec![
            row(0, 0xfff, "child", 0),
            row(0x1000, 0x1fff, "parent", 0x1000)
        ]
    );
}

#[test]
fn render_lower_sibling_shows_through_holes_of_higher_container() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x4000, None).unwrap();
    let window = container(&m, "window", 0x4000);
    let dev = mmio(&m, "dev", 0x1000);
    m.add_subregion(window, 0x1000, dev).unwrap();
    m.add_subregion_overlap(sys, 0, window, 10).unwrap();
    m.add_subregion_overlap(sys, 0, ram, 0).unwrap();
    assert_eq!(
        rows_of(&m, space),
        vec![
            row(0, 0xfff, "ram", 0),
            row(0x1000, 0x1fff, "dev", 0),
            row(0x2000, 0x3fff, "ram", 0x2000),
        ]
    );
}

#[test]
fn render_lower_sibling_shows_through_holes_of_higher_alias() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x4000, None).unwrap();
    // An unmapped container with a hole, seen through an alias.
    let bus = container(&m, "bus", 0x4000);
    let dev = mmio(&m, "dev", 0x1000);
    m.add_subregion(bus, 0x3000, dev).unwrap();
    let alias = m.new_alias("bus-alias", bus, 0x2000, 0x2000, None).unwrap();
    m.add_subregion_overlap(sys, 0x2000, alias, 1).unwrap();
    m.add_subregion(sys, 0, ram).unwrap();
    assert_eq!(
        rows_of(&m, space),
        vec![row(0, 0x2fff, "ram", 0), row(0x3000, 0x3fff, "dev", 0),]
    );
}

#[test]
fn render_alias_applies_offset_and_cancels_target_address() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x4000, None).unwrap();
    // The target's own position in the tree is irrelevant to the alias.
    m.add_subregion(sys, 0x8000, ram).unwrap();
    let alias = m.new_alias("hi", ram, 0x1000, 0x2000, None).unwrap();
    m.add_subregion(sys, 0x2000, alias).unwrap();
    assert_eq!(
        rows_of(&m, space),
        vec![
            row(0x2000, 0x3fff, "ram", 0x1000),
            row(0x8000, 0xbfff, "ram", 0)
        ]
    );
    m.set_alias_offset(alias, 0x2000).unwrap();
    assert_eq!(rows_of(&m, space)[0], row(0x2000, 0x3fff, "ram", 0x2000));
    // Moving the target moves only its direct mapping.
    m.set_address(ram, 0xc000).unwrap();
    assert_eq!(
        rows_of(&m, space),
        vec![
            row(0x2000, 0x3fff, "ram", 0x2000),
            row(0xc000, 0xffff, "ram", 0)
        ]
    );
}

#[test]
fn render_alias_is_clipped_to_its_size_and_to_its_target() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x2000, None).unwrap();
    // 0x3000 bytes of alias starting 0x1000 into a 0x2000 target: only
    // 0x1000 bytes exist.
    let alias = m.new_alias("long", ram, 0x1000, 0x3000, None).unwrap();
    m.add_subregion(sys, 0x4000, alias).unwrap();
    assert_eq!(rows_of(&m, space), vec![row(0x4000, 0x4fff, "ram", 0x1000)]);
    m.set_size(alias, 0x800).unwrap();
    assert_eq!(rows_of(&m, space), vec![row(0x4000, 0x47ff, "ram", 0x1000)]);
}

#[test]
fn render_alias_of_alias_composes_offsets() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x4000, None).unwrap();
    let a1 = m.new_alias("a1", ram, 0x1000, 0x3000, None).unwrap();
    let a2 = m.new_alias("a2", a1, 0x800, 0x1000, None).unwrap();
    m.add_subregion(sys, 0x100, a2).unwrap();
    assert_eq!(rows_of(&m, space), vec![row(0x100, 0x10ff, "ram", 0x1800)]);
}

#[test]
fn render_clips_subregions_at_container_size() {
    let (m, sys, space) = machine();
    let small = container(&m, "small", 0x1000);
    let big = mmio(&m, "big", 0x4000);
    m.add_subregion(small, 0x800, big).unwrap();
    m.add_subregion(sys, 0x1000, small).unwrap();
    assert_eq!(rows_of(&m, space), vec![row(0x1800, 0x1fff, "big", 0)]);
    // And the root container clips what overhangs it.
    let tail = mmio(&m, "tail", 0x1000);
    m.add_subregion(sys, 0xf800, tail).unwrap();
    assert_eq!(rows_of(&m, space)[1], row(0xf800, 0xffff, "tail", 0));
}

#[test]
fn render_clips_at_two_to_the_sixty_four() {
    let m = Memory::new();
    let root = container(&m, "root", FULL);
    let top = mmio(&m, "top", 0x3000);
    m.add_subregion(root, u64::MAX - 0xfff, top).unwrap();
    let whole = mmio(&m, "whole", FULL);
    m.add_subregion_overlap(root, 0, whole, -1).unwrap();
    let space = m.new_address_space("as", root, None).unwrap();
    let view = view_of(&m, space);
    assert_eq!(
        rows(&view),
        vec![
            row(0, u64::MAX - 0x1000, "whole", 0),
            row(u64::MAX - 0xfff, u64::MAX, "top", 0),
        ]
    );
    assert_eq!(view.ranges()[1].len(), 0x1000);
    assert_eq!(view.lookup(u64::MAX).unwrap().region().name(), "top");
}

#[test]
fn render_full_size_region_covers_the_whole_space() {
    let m = Memory::new();
    let root = container(&m, "root", FULL);
    let whole = mmio(&m, "whole", FULL);
    m.add_subregion(root, 0, whole).unwrap();
    let other = container(&m, "other", FULL);
    m.add_subregion(other, 0, root).unwrap();
    let extra = mmio(&m, "extra", 0x10);
    m.add_subregion_overlap(other, 0x10, extra, -1).unwrap();
    let space = m.new_address_space("as", other, None).unwrap();
    let view = view_of(&m, space);
    assert_eq!(rows(&view), vec![row(0, u64::MAX, "whole", 0)]);
    assert_eq!(view.ranges()[0].len(), FULL);
}

#[test]
fn render_zero_size_region_produces_nothing_and_obscures_nothing() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x1000, None).unwrap();
    let empty = mmio(&m, "empty", 0);
    let empty_alias = m.new_alias("empty-alias", ram, 0, 0, None).unwrap();
    m.add_subregion(sys, 0, ram).unwrap();
    m.add_subregion_overlap(sys, 0x800, empty, 9).unwrap();
    m.add_subregion_overlap(sys, 0x400, empty_alias, 9).unwrap();
    assert_eq!(rows_of(&m, space), vec![row(0, 0xfff, "ram", 0)]);
}

#[test]
fn render_refuses_subregions_of_an_alias_so_they_never_render() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x1000, None).unwrap();
    let alias = m.new_alias("alias", ram, 0, 0x1000, None).unwrap();
    m.add_subregion(sys, 0, alias).unwrap();
    let dev = mmio(&m, "dev", 0x100);
    let before = view_of(&m, space);
    assert_eq!(
        m.add_subregion_overlap(alias, 0, dev, 10),
        Err(TopologyError::AliasCannotContain("alias".into()))
    );
    let after = view_of(&m, space);
    assert!(Arc::ptr_eq(&before, &after));
    assert_eq!(rows(&after), vec![row(0, 0xfff, "ram", 0)]);
}

#[test]
fn render_readonly_and_nonvolatile_propagate_through_aliases_and_containers() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x1000, None).unwrap();
    m.add_subregion(sys, 0, ram).unwrap();
    let ro = m.new_alias("ro", ram, 0, 0x1000, None).unwrap();
    m.set_readonly(ro, true).unwrap();
    m.add_subregion(sys, 0x1000, ro).unwrap();
    let nvbus = container(&m, "nvbus", 0x1000);
    m.set_nonvolatile(nvbus, true).unwrap();
    let nv = m.new_alias("nv", ram, 0, 0x1000, None).unwrap();
    m.add_subregion(nvbus, 0, nv).unwrap();
    m.add_subregion(sys, 0x2000, nvbus).unwrap();
    assert_eq!(
        rows_of(&m, space),
        vec![
            (0, 0xfff, "ram".into(), 0, false, false),
            (0x1000, 0x1fff, "ram".into(), 0, true, false),
            (0x2000, 0x2fff, "ram".into(), 0, false, true),
        ]
    );
    // The region's own readonly reaches every path, and OR-s with the others.
    m.set_readonly(ram, true).unwrap();
    let got = rows_of(&m, space);
    assert!(got.iter().all(|r| r.4), "{got:?}");
    assert!(got[2].5, "{got:?}");
}

// ---- §2.4 merge rule ---------------------------------------------------------

#[test]
fn render_merges_adjacent_contiguous_ranges_of_one_region() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x4000, None).unwrap();
    let lo = m.new_alias("lo", ram, 0, 0x2000, None).unwrap();
    let hi = m.new_alias("hi", ram, 0x2000, 0x2000, None).unwrap();
    m.add_subregion(sys, 0x1000, lo).unwrap();
    m.add_subregion(sys, 0x3000, hi).unwrap();
    assert_eq!(rows_of(&m, space), vec![row(0x1000, 0x4fff, "ram", 0)]);
}

#[test]
fn render_does_not_merge_non_contiguous_offsets() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x4000, None).unwrap();
    let lo = m.new_alias("lo", ram, 0, 0x2000, None).unwrap();
    let hi = m.new_alias("hi", ram, 0x2800, 0x1000, None).unwrap();
    m.add_subregion(sys, 0, lo).unwrap();
    m.add_subregion(sys, 0x2000, hi).unwrap();
    assert_eq!(
        rows_of(&m, space),
        vec![row(0, 0x1fff, "ram", 0), row(0x2000, 0x2fff, "ram", 0x2800)]
    );
}

#[test]
fn render_does_not_merge_ranges_with_different_flags() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x4000, None).unwrap();
    let lo = m.new_alias("lo", ram, 0, 0x2000, None).unwrap();
    let hi = m.new_alias("hi", ram, 0x2000, 0x2000, None).unwrap();
    m.set_readonly(hi, true).unwrap();
    m.add_subregion(sys, 0, lo).unwrap();
    m.add_subregion(sys, 0x2000, hi).unwrap();
    assert_eq!(
        rows_of(&m, space),
        vec![
            (0, 0x1fff, "ram".into(), 0, false, false),
            (0x2000, 0x3fff, "ram".into(), 0x2000, true, false),
        ]
    );
    m.set_readonly(hi, false).unwrap();
    m.set_nonvolatile(lo, true).unwrap();
    assert_eq!(rows_of(&m, space).len(), 2);
    m.set_nonvolatile(lo, false).unwrap();
    assert_eq!(rows_of(&m, space), vec![row(0, 0x3fff, "ram", 0)]);
}

#[test]
fn render_does_not_merge_unmergeable_ranges() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x4000, None).unwrap();
    let lo = m.new_alias("lo", ram, 0, 0x2000, None).unwrap();
    let hi = m.new_alias("hi", ram, 0x2000, 0x2000, None).unwrap();
    m.add_subregion(sys, 0, lo).unwrap();
    m.add_subregion(sys, 0x2000, hi).unwrap();
    m.set_unmergeable(hi, true).unwrap();
    let view = view_of(&m, space);
    assert_eq!(
        rows(&view),
        vec![row(0, 0x1fff, "ram", 0), row(0x2000, 0x3fff, "ram", 0x2000)]
    );
    assert!(!view.ranges()[0].attrs().unmergeable);
    assert!(view.ranges()[1].attrs().unmergeable);
    // Either side being unmergeable is enough.
    m.transaction(|t| {
        t.set_unmergeable(hi, false).unwrap();
        t.set_unmergeable(lo, true).unwrap();
    });
    assert_eq!(rows_of(&m, space).len(), 2);
    // The flag propagates from a container down to every range under it.
    m.transaction(|t| {
        t.set_unmergeable(lo, false).unwrap();
        t.set_unmergeable(sys, true).unwrap();
    });
    let view = view_of(&m, space);
    assert_eq!(view.ranges().len(), 2);
    assert!(view.ranges().iter().all(|r| r.attrs().unmergeable));
    m.set_unmergeable(sys, false).unwrap();
    assert_eq!(rows_of(&m, space), vec![row(0, 0x3fff, "ram", 0)]);
}

// ---- §2.5 sharing, physical root, empty view -----------------------------------

#[test]
fn render_two_spaces_with_one_root_share_one_view() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x1000, None).unwrap();
    let dev = mmio(&m, "dev", 0x1000);
    m.add_subregion(sys, 0, ram).unwrap();
    m.add_subregion(sys, 0x1000, dev).unwrap();
    let other = m.new_address_space("other", sys, None).unwrap();
    let (a, b) = (view_of(&m, space), view_of(&m, other));
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(a.root(), Some(sys));
    assert_eq!(a.root_name(), Some("sys"));
}

#[test]
fn render_space_through_full_size_alias_shares_the_target_view() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x1000, None).unwrap();
    let dev = mmio(&m, "dev", 0x1000);
    m.add_subregion(sys, 0, ram).unwrap();
    m.add_subregion(sys, 0x1000, dev).unwrap();
    // A bus-master-like space: a container whose only enabled child is a
    // full-size alias of the system container.
    let bm = container(&m, "bus master", FULL);
    let alias = m
        .new_alias("bus master alias", sys, 0, 0x1_0000, None)
        .unwrap();
    m.add_subregion(bm, 0, alias).unwrap();
    let off = mmio(&m, "off", 0x10);
    m.add_subregion(bm, 0x20000, off).unwrap();
    m.set_enabled(off, false).unwrap();
    let bm_space = m.new_address_space("bm", bm, None).unwrap();
    let (a, b) = (view_of(&m, space), view_of(&m, bm_space));
    assert!(Arc::ptr_eq(&a, &b), "{a:?} vs {b:?}");
    assert_eq!(b.root_name(), Some("sys"));
    // Enabling the second child breaks the sharing: the view now renders
    // from the bus-master container, with its own readonly etc. flags.
    m.set_enabled(off, true).unwrap();
    let b = view_of(&m, bm_space);
    assert!(!Arc::ptr_eq(&view_of(&m, space), &b));
    assert_eq!(b.root_name(), Some("bus master"));
    assert_eq!(b.ranges().len(), 3);
    // A partial alias (nonzero offset) is not walked through either.
    m.set_enabled(off, false).unwrap();
    m.set_alias_offset(alias, 0x1000).unwrap();
    let b = view_of(&m, bm_space);
    assert_eq!(b.root_name(), Some("bus master alias"));
    assert_eq!(rows(&b), vec![row(0, 0xfff, "dev", 0)]);
}

#[test]
fn render_physical_root_walk_ignores_flags_of_skipped_levels() {
    let (m, sys, _space) = machine();
    let ram = m.new_ram("ram", 0x1000, None).unwrap();
    let dev = mmio(&m, "dev", 0x1000);
    m.add_subregion(sys, 0, ram).unwrap();
    m.add_subregion(sys, 0x1000, dev).unwrap();
    let ro = m.new_alias("ro", sys, 0, 0x1_0000, None).unwrap();
    m.set_readonly(ro, true).unwrap();
    let space = m.new_address_space("ro-as", ro, None).unwrap();
    // QEMU quirk (§2.5 (1)): the alias is skipped, its readonly never applies.
    let view = view_of(&m, space);
    assert_eq!(view.root_name(), Some("sys"));
    assert_eq!(
        rows(&view),
        vec![row(0, 0xfff, "ram", 0), row(0x1000, 0x1fff, "dev", 0)]
    );
}

#[test]
fn render_physical_root_through_alias_keeps_target_address() {
    let m = Memory::new();
    let outer = container(&m, "outer", FULL);
    let sys = container(&m, "sys", 0x1_0000);
    let ram = m.new_ram("ram", 0x1000, None).unwrap();
    let dev = mmio(&m, "dev", 0x1000);
    m.add_subregion(sys, 0, ram).unwrap();
    m.add_subregion(sys, 0x2000, dev).unwrap();
    m.add_subregion(outer, 0x10_0000, sys).unwrap();
    let alias = m.new_alias("all", sys, 0, 0x1_0000, None).unwrap();
    let space = m.new_address_space("as", alias, None).unwrap();
    // QEMU quirk (§2.5 (2)): rendering starts at `sys` and adds its own
    // address, although rendering through the alias would cancel it.
    assert_eq!(
        rows_of(&m, space),
        vec![
            row(0x10_0000, 0x10_0fff, "ram", 0),
            row(0x10_2000, 0x10_2fff, "dev", 0)
        ]
    );
}

#[test]
fn render_root_is_shifted_by_its_own_address() {
    let m = Memory::new();
    let outer = container(&m, "outer", FULL);
    let sub = container(&m, "sub", 0x1_0000);
    let ram = m.new_ram("ram", 0x1000, None).unwrap();
    let dev = mmio(&m, "dev", 0x1000);
    m.add_subregion(sub, 0, ram).unwrap();
    m.add_subregion(sub, 0x4000, dev).unwrap();
    m.add_subregion(outer, 0x3000_0000, sub).unwrap();
    let space = m.new_address_space("sub", sub, None).unwrap();
    assert_eq!(
        rows_of(&m, space),
        vec![
            row(0x3000_0000, 0x3000_0fff, "ram", 0),
            row(0x3000_4000, 0x3000_4fff, "dev", 0),
        ]
    );
}

#[test]
fn render_disabled_root_gives_the_shared_empty_view() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x1000, None).unwrap();
    m.add_subregion(sys, 0, ram).unwrap();
    let lonely = container(&m, "lonely", 0x1000);
    let lonely_space = m.new_address_space("lonely", lonely, None).unwrap();
    m.set_enabled(sys, false).unwrap();
    let (a, b) = (view_of(&m, space), view_of(&m, lonely_space));
    assert!(a.ranges().is_empty());
    assert_eq!(a.root(), None);
    // A container with no enabled child is the empty view too, the same one.
    assert!(Arc::ptr_eq(&a, &b));
    assert!(a.lookup(0).is_none());
    m.set_enabled(sys, true).unwrap();
    assert_eq!(rows_of(&m, space), vec![row(0, 0xfff, "ram", 0)]);
}

#[test]
fn render_container_with_only_disabled_children_is_empty() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x1000, None).unwrap();
    let dev = mmio(&m, "dev", 0x1000);
    m.add_subregion(sys, 0, ram).unwrap();
    m.add_subregion(sys, 0x1000, dev).unwrap();
    m.transaction(|t| {
        t.set_enabled(ram, false).unwrap();
        t.set_enabled(dev, false).unwrap();
    });
    let view = view_of(&m, space);
    assert_eq!(view.root(), None);
    assert!(view.ranges().is_empty());
}

// ---- incremental re-render -----------------------------------------------------

#[test]
fn render_commit_rerenders_only_views_whose_regions_changed() {
    let m = Memory::new();
    let sys_a = container(&m, "a", 0x1_0000);
    let sys_b = container(&m, "b", 0x1_0000);
    let ram_a = m.new_ram("ram-a", 0x1000, None).unwrap();
    let dev_a = mmio(&m, "dev-a", 0x1000);
    let ram_b = m.new_ram("ram-b", 0x1000, None).unwrap();
    let dev_b = mmio(&m, "dev-b", 0x1000);
    m.add_subregion(sys_a, 0, ram_a).unwrap();
    m.add_subregion(sys_a, 0x1000, dev_a).unwrap();
    m.add_subregion(sys_b, 0, ram_b).unwrap();
    m.add_subregion(sys_b, 0x1000, dev_b).unwrap();
    let unmapped = mmio(&m, "unmapped", 0x1000);
    let space_a = m.new_address_space("a", sys_a, None).unwrap();
    let space_b = m.new_address_space("b", sys_b, None).unwrap();
    let (a0, b0) = (view_of(&m, space_a), view_of(&m, space_b));

    m.set_enabled(dev_a, false).unwrap();
    let (a1, b1) = (view_of(&m, space_a), view_of(&m, space_b));
    assert!(!Arc::ptr_eq(&a0, &a1), "the edited space is re-rendered");
    assert_eq!(rows(&a1), vec![row(0, 0xfff, "ram-a", 0)]);
    assert!(Arc::ptr_eq(&b0, &b1), "the unrelated space keeps its view");

    // An edit of a region no view reaches re-renders nothing.
    m.set_enabled(unmapped, false).unwrap();
    m.set_address(unmapped, 0x4000).unwrap();
    assert!(Arc::ptr_eq(&a1, &view_of(&m, space_a)));
    assert!(Arc::ptr_eq(&b1, &view_of(&m, space_b)));

    // An edit under `b` only re-renders `b`.
    m.set_readonly(ram_b, true).unwrap();
    assert!(Arc::ptr_eq(&a1, &view_of(&m, space_a)));
    assert!(rows_of(&m, space_b)[0].4);
}

#[test]
fn render_commit_rerenders_views_reaching_an_edited_alias_target() {
    let m = Memory::new();
    let sys = container(&m, "sys", 0x1_0000);
    let ram = m.new_ram("ram", 0x2000, None).unwrap();
    let holder = container(&m, "holder", 0x4000);
    m.add_subregion(holder, 0, ram).unwrap();
    let alias = m.new_alias("window", holder, 0, 0x4000, None).unwrap();
    m.add_subregion(sys, 0x8000, alias).unwrap();
    let dev = mmio(&m, "dev", 0x10);
    m.add_subregion(sys, 0, dev).unwrap();
    let space = m.new_address_space("as", sys, None).unwrap();
    let before = view_of(&m, space);
    assert_eq!(rows(&before)[1], row(0x8000, 0x9fff, "ram", 0));
    // `ram` is reached only through the alias; moving it must still show.
    m.set_address(ram, 0x1000).unwrap();
    let after = view_of(&m, space);
    assert!(!Arc::ptr_eq(&before, &after));
    assert_eq!(rows(&after)[1], row(0x9000, 0xafff, "ram", 0));
}

#[test]
fn render_commit_with_no_net_change_still_publishes_an_exact_view() {
    let (m, sys, space) = machine();
    let ram = m.new_ram("ram", 0x1000, None).unwrap();
    m.add_subregion(sys, 0, ram).unwrap();
    let before = rows_of(&m, space);
    m.transaction(|t| {
        t.set_enabled(ram, false).unwrap();
        t.set_enabled(ram, true).unwrap();
    });
    assert_eq!(rows_of(&m, space), before);
}
