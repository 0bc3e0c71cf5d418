//! Rendering: region tree → flat view, with QEMU's exact semantics
//! (QEMU `system/memory.c`: `generate_memory_topology`).
//!
//! [`render`] is a pure function of the topology: it takes no lock, does no
//! I/O and cannot fail (the topology's own invariants — no alias loops, no
//! containment cycles, sizes ≤ 2^64 — are checked when the tree is edited).
//!
//! Algorithm: the same depth-first walk as QEMU (`render_memory_region`):
//! higher-priority subregions render first and win; a terminating region then
//! fills the gaps its subregions left inside its clip. The walk runs on an
//! explicit stack, not on the thread's: nesting depth and alias chains of any
//! length (the topology bounds neither) cost heap, never a stack overflow. Unlike QEMU, which keeps
//! the view in a sorted array and shifts its tail on every insertion
//! (quadratic in the worst case) and walks every range already inside a clip
//! to find its gaps, the covered addresses live in an ordered map of
//! *coalesced* intervals (adjacent covered intervals are joined), so filling
//! the gaps of a clip costs O((g + 1) log n) for the g gaps it fills, however
//! many ranges already lie inside it. The pieces themselves are appended to a
//! vector, sorted once at the end and merged by QEMU's merge rule
//! (`simplify`). A render is therefore
//! O(v + p log p) for v regions visited and p pieces produced.
//!
//! Arithmetic is in `i128`, like QEMU's `Int128`, because alias offsets can
//! move the base below zero.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::region::ids::RegionId;
use crate::region::region_core::{RegionGraph, RegionKind, RegionNode, MAX_REGION_SIZE};
use crate::view::flatview::{Edit, FlatRange, RangeAttrs, RegionType};

/// Propagated flags along a render path.
#[derive(Copy, Clone, Default, PartialEq, Eq, Debug)]
struct PathFlags {
    readonly: bool,
    nonvolatile: bool,
    unmergeable: bool,
}

/// One rendered piece before merging: `[start, last]` (inclusive, so a piece
/// can end at 2^64 - 1) served by `node` from `offset` on.
#[derive(Clone, Copy, Debug)]
struct Piece<'t> {
    start: u64,
    last: u64,
    offset: u64,
    node: &'t RegionNode,
    flags: PathFlags,
}

/// The result of rendering one physical root.
pub(crate) struct Rendered {
    pub(crate) ranges: Vec<FlatRange>,
    pub(crate) reached: Vec<RegionId>,
}

struct Renderer<'t> {
    topo: &'t dyn RegionGraph,
    /// Covered addresses: disjoint, non-adjacent intervals, start -> end
    /// (exclusive; an end can be 2^64).
    covered: BTreeMap<u64, u128>,
    /// Scratch space for `fill`.
    swallowed: Vec<u64>,
    /// The walk's explicit stack (the walk is iterative, so that no depth of
    /// nesting or of alias chains can overflow the thread's stack).
    tasks: Vec<Task<'t>>,
    /// What the view holds, in the order it was filled.
    pieces: Vec<Piece<'t>>,
    reached: Vec<RegionId>,
}

/// One pending step of the walk.
#[derive(Clone, Copy)]
enum Task<'t> {
    /// `render_memory_region` of `node` in a parent at `base`, within `clip`.
    Visit {
        node: &'t RegionNode,
        base: i128,
        clip: (i128, i128),
        flags: PathFlags,
    },
    /// Fill the gaps `node`'s subregions left (runs after all of them).
    Fill {
        node: &'t RegionNode,
        base: i128,
        clip: (i128, i128),
        flags: PathFlags,
    },
}

/// Renders the tree under `root` (a physical root: the region reached from
/// the space's root by following enabled aliases that map it whole) into
/// flat ranges.
pub(crate) fn render(topo: &dyn RegionGraph, root: RegionId) -> Rendered {
    render_clipped(topo, root, (0, MAX_REGION_SIZE as i128))
}

/// Renders only the addresses in `window` (`[start, end)`) of the tree under
/// `root`. Every address inside the window gets what a full render gives it
/// (the walk decides each address independently of the others); pieces are
/// cut at the window's edges.
fn render_clipped(topo: &dyn RegionGraph, root: RegionId, window: (i128, i128)) -> Rendered {
    let mut r = Renderer {
        topo,
        covered: BTreeMap::new(),
        swallowed: Vec::new(),
        tasks: Vec::new(),
        pieces: Vec::new(),
        reached: Vec::new(),
    };
    r.run(root, window);
    let Renderer {
        mut pieces,
        reached,
        ..
    } = r;
    // Pieces are disjoint, so their starts are distinct.
    pieces.sort_unstable_by_key(|p| p.start);
    Rendered {
        ranges: simplify(pieces),
        reached,
    }
}

impl<'t> Renderer<'t> {
    /// QEMU's recursive `render_memory_region`, as a loop over an explicit
    /// stack: a region's subregions are visited in priority order, each
    /// subtree completely before the next, and the region's own fill runs
    /// after all of them, exactly as the recursion orders them.
    fn run(&mut self, root: RegionId, clip: (i128, i128)) {
        let Some(node) = self.topo.node(root) else {
            return;
        };
        self.reached.push(root);
        self.tasks.push(Task::Visit {
            node,
            base: 0,
            clip,
            flags: PathFlags::default(),
        });
        while let Some(task) = self.tasks.pop() {
            match task {
                Task::Visit {
                    node,
                    base,
                    clip,
                    flags,
                } => self.visit(node, base, clip, flags),
                Task::Fill {
                    node,
                    base,
                    clip,
                    flags,
                } => self.fill(node, base, clip, flags),
            }
        }
    }

    /// One region: what `render_memory_region` does before recursing; the
    /// recursion and the fill are pushed as tasks.
    fn visit(&mut self, node: &'t RegionNode, base: i128, clip: (i128, i128), flags: PathFlags) {
        // 1. Disabled regions vanish with their subtree.
        if !node.enabled {
            return;
        }
        // 2. Position inside the parent.
        let base = base + i128::from(node.addr);
        // 3. Flags propagate down the path (through aliases too).
        let flags = PathFlags {
            readonly: flags.readonly || node.readonly,
            nonvolatile: flags.nonvolatile || node.nonvolatile,
            unmergeable: flags.unmergeable || node.unmergeable,
        };
        // 4. Clip to the region.
        let Some(clip) = intersect((base, base + node.size as i128), clip) else {
            return;
        };
        // 5. Aliases continue in their target, shifted.
        if node.kind() == RegionKind::Alias {
            if let Some((tid, tnode)) = node
                .alias_target
                .and_then(|t| self.topo.node(t).map(|n| (t, n)))
            {
                self.reached.push(tid);
                self.tasks.push(Task::Visit {
                    node: tnode,
                    base: base - i128::from(tnode.addr) - i128::from(node.alias_offset),
                    clip,
                    flags,
                });
            }
            return;
        }
        // 8. (after 6 and 7) Fill the gaps inside the clip, once every
        // subregion has rendered: pushed first, so it pops last.
        // 7. Pure containers leave holes.
        if node.terminates() {
            self.tasks.push(Task::Fill {
                node,
                base,
                clip,
                flags,
            });
        }
        // 6. Subregions, in priority order: pushed in reverse so that the
        // first pops first. Their nodes are looked up in one pass: the loads
        // are independent, so the CPU overlaps their cache misses.
        let mark = self.tasks.len();
        for &sub in &node.subregions {
            if let Some(n) = self.topo.node(sub) {
                self.reached.push(sub);
                // A subregion wholly outside the clip renders nothing (the
                // visit would find so); skipping it here saves the task. An
                // alias is positioned by its own node, like any region.
                let s = base + i128::from(n.addr);
                if s >= clip.1 || s + n.size as i128 <= clip.0 {
                    continue;
                }
                self.tasks.push(Task::Visit {
                    node: n,
                    base,
                    clip,
                    flags,
                });
            }
        }
        self.tasks[mark..].reverse();
    }

    /// Fills the uncovered parts of `clip` with `node`, then marks the whole
    /// clip covered.
    fn fill(&mut self, node: &'t RegionNode, base: i128, clip: (i128, i128), flags: PathFlags) {
        // The clip lies inside [0, 2^64) and inside the region, so positions
        // fit a u64, ends a u128, and offsets (position - base) a u64.
        let (start, end) = (clip.0 as u64, clip.1 as u128);
        let pieces = &mut self.pieces;
        let mut add = |s: u128, e: u128| {
            pieces.push(Piece {
                start: s as u64,
                last: (e - 1) as u64,
                offset: (s as i128 - base) as u64,
                node,
                flags,
            })
        };
        // The covered interval that contains `start` or ends right at it
        // joins the new coverage.
        let mut new_start = start;
        let mut pos = u128::from(start);
        if let Some((&s, &e)) = self.covered.range(..=start).next_back() {
            if e >= pos {
                new_start = s;
                pos = e;
            }
        }
        if pos >= end {
            return; // Already covered.
        }
        let mut new_end = end;
        // Covered intervals starting inside (pos, end] each close a gap; they
        // are replaced by one interval below.
        let mut swallowed = std::mem::take(&mut self.swallowed);
        let from = pos as u64; // pos < end <= 2^64
        let upto = u64::try_from(end).unwrap_or(u64::MAX);
        for (&s, &e) in self.covered.range(from..=upto) {
            if u128::from(s) > pos {
                add(pos, u128::from(s));
            }
            swallowed.push(s);
            pos = e;
            if e >= end {
                new_end = e;
                break;
            }
        }
        if pos < end {
            add(pos, end);
        }
        for s in swallowed.drain(..) {
            self.covered.remove(&s);
        }
        self.swallowed = swallowed;
        self.covered.insert(new_start, new_end);
    }
}

fn intersect(a: (i128, i128), b: (i128, i128)) -> Option<(i128, i128)> {
    // QEMU's `addrrange_intersects`: one contains the other's start. A
    // zero-size range contains nothing, so it never intersects.
    let contains = |r: (i128, i128), x: i128| r.0 <= x && x < r.1;
    if !(contains(a, b.0) || contains(b, a.0)) {
        return None;
    }
    Some((a.0.max(b.0), a.1.min(b.1)))
}

fn attrs_for(node: &RegionNode, flags: PathFlags) -> RangeAttrs {
    RangeAttrs {
        readonly: flags.readonly,
        nonvolatile: flags.nonvolatile,
        unmergeable: flags.unmergeable,
        romd_mode: node.romd_mode,
        region_readonly: node.readonly,
        priority: node.priority,
        region_type: RegionType::of(node.kind(), node.readonly, node.romd_mode),
    }
}

/// QEMU's merge rule (`flatview_simplify`: two adjacent ranges join when
/// they continue the same region at consecutive offsets with equal
/// attributes), then conversion to `FlatRange`s. `pieces` are
/// sorted and disjoint. (Within one render a region's dirty-log mask and
/// romd mode are the same for all its pieces, so comparing the region and
/// the path flags is QEMU's comparison; the mask is not even part of a
/// range's attributes: see `FlatRange::dirty_log_mask`.)
fn simplify(pieces: Vec<Piece<'_>>) -> Vec<FlatRange> {
    let mut out: Vec<FlatRange> = Vec::with_capacity(pieces.len());
    let mut iter = pieces.into_iter();
    let Some(mut acc) = iter.next() else {
        return out;
    };
    let emit = |out: &mut Vec<FlatRange>, p: Piece<'_>| {
        out.push(FlatRange::new(
            p.start,
            p.last,
            p.offset,
            Arc::clone(&p.node.core),
            attrs_for(p.node, p.flags),
        ))
    };
    for piece in iter {
        let mergeable = acc.last.checked_add(1) == Some(piece.start)
            && std::ptr::eq(acc.node, piece.node)
            && acc.flags == piece.flags
            && u128::from(acc.offset) + u128::from(acc.last - acc.start) + 1
                == u128::from(piece.offset)
            && !acc.flags.unmergeable
            && !piece.flags.unmergeable;
        if mergeable {
            acc.last = piece.last;
        } else {
            emit(&mut out, acc);
            acc = piece;
        }
    }
    emit(&mut out, acc);
    out
}

/// QEMU's physical-root walk (`memory_region_get_flatview_root`): the region whose rendering an address
/// space rooted at `root` shares. `None` means the empty view.
pub(crate) fn physical_root(topo: &dyn RegionGraph, root: RegionId) -> Option<RegionId> {
    physical_root_visiting(topo, root, |_| {})
}

/// [`physical_root`], calling `visit` on every region whose own state the
/// walk reads (the walk also reads the flags, position and size of the
/// subregions of each container it visits).
pub(crate) fn physical_root_visiting(
    topo: &dyn RegionGraph,
    root: RegionId,
    mut visit: impl FnMut(RegionId),
) -> Option<RegionId> {
    let mut id = root;
    loop {
        visit(id);
        let node = topo.node(id)?;
        if !node.enabled {
            return None;
        }
        match node.kind() {
            RegionKind::Alias => {
                let Some(target) = node.alias_target else {
                    return Some(id);
                };
                visit(target);
                let tnode = topo.node(target)?;
                if node.alias_offset == 0 && node.size >= tnode.size {
                    id = target;
                    continue;
                }
                return Some(id);
            }
            RegionKind::Container => {
                let mut enabled = node
                    .subregions
                    .iter()
                    .filter_map(|&s| topo.node(s).map(|n| (s, n)))
                    .filter(|(_, n)| n.enabled);
                let first = enabled.next();
                let more = enabled.next().is_some();
                match (first, more) {
                    (None, _) => return None,
                    (Some((sid, sub)), false) if sub.addr == 0 && sub.size <= node.size => {
                        id = sid;
                        continue;
                    }
                    _ => return Some(id),
                }
            }
            _ => return Some(id),
        }
    }
}

/// Re-renders the address windows `affected` (in `root`'s coordinates, from
/// the topology's change tracking) of `old`, the last render of `root`, and
/// returns the edits that turn `old` into the new rendering: each replaces
/// the old ranges of one window (by position) with the window's new ranges.
/// Ranges outside the windows are not touched, so the view built from the
/// edits ([`crate::flatview::FlatView::spliced`]) shares them with `old`.
/// Returns `None` when the splice cannot be sure to equal a full render (an
/// unmergeable range meets itself across a window edge: whether a full
/// render would have cut it there depends on pieces the splice did not see),
/// and the caller renders whole.
///
/// Each window is first widened to the edges of the old ranges it touches,
/// so that no old range is cut; new ranges that continue across a window
/// edge are joined there by QEMU's merge rule, which is all a full render
/// does (merging is decided pairwise on adjacent addresses): the old range
/// it joins then belongs to the edit too.
pub(crate) fn splice(
    topo: &dyn RegionGraph,
    root: RegionId,
    old: &crate::view::flatview::FlatView,
    affected: &[(i128, i128)],
) -> Option<Spliced> {
    let top = MAX_REGION_SIZE as i128;
    let mut windows: Vec<(i128, i128)> = affected
        .iter()
        .map(|&(s, e)| (s.max(0), e.min(top)))
        .filter(|(s, e)| s < e)
        .collect();
    windows.sort_unstable();
    // Widen to old range edges, then join overlapping or touching windows.
    let mut joined: Vec<(i128, i128)> = Vec::with_capacity(windows.len());
    for (s, e) in windows {
        let s = match old.lookup(s as u64) {
            Some(r) => i128::from(r.start),
            None => s,
        };
        let e = match old.lookup((e - 1) as u64) {
            Some(r) => i128::from(r.last) + 1,
            None => e,
        };
        match joined.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => joined.push((s, e)),
        }
    }
    let len = old.len();
    let mut edits: Vec<Edit> = Vec::with_capacity(joined.len());
    let mut reached: Vec<RegionId> = Vec::new();
    let mut same = true;
    // Old positions below this are consumed by an edit.
    let mut consumed = 0usize;
    for &(s, e) in &joined {
        let mut a = old.count_below(s as u64).max(consumed);
        let mut b = if e > u64::MAX as i128 {
            len
        } else {
            old.count_below(e as u64)
        }
        .max(a);
        let rendered = render_clipped(topo, root, (s, e));
        reached.extend(rendered.reached);
        let mut new = rendered.ranges;
        let mut merge_into_prev = false;
        if let Some(first) = new.first() {
            match edits.last_mut().filter(|p| p.old.end == a) {
                // The range before the window is the previous edit's last.
                Some(prev) => {
                    if let Some(last) = prev.new.last_mut() {
                        if last.continues_into(first) {
                            if last.attrs.unmergeable {
                                return None;
                            }
                            last.last = first.last;
                            new.remove(0);
                            merge_into_prev = true;
                        }
                    }
                }
                None => {
                    if let Some(before) = a.checked_sub(1).and_then(|i| old.range(i)) {
                        if before.continues_into(first) {
                            if before.attrs.unmergeable {
                                return None;
                            }
                            let mut joined = before.share();
                            joined.last = first.last;
                            new[0] = joined;
                            a -= 1;
                        }
                    }
                }
            }
        }
        // The old range right after the window may continue what the window
        // rendered last (or what the previous edit did, if this window
        // rendered nothing and joined it).
        if let Some(next) = old.range(b).filter(|r| i128::from(r.start) == e) {
            let last = if merge_into_prev && new.is_empty() {
                edits.last_mut().and_then(|p| p.new.last_mut())
            } else {
                new.last_mut()
            };
            if let Some(last) = last {
                if last.continues_into(next) {
                    if last.attrs.unmergeable {
                        return None;
                    }
                    last.last = next.last;
                    b += 1;
                }
            }
        }
        if merge_into_prev {
            let prev = edits.last_mut()?;
            prev.old.end = b;
            prev.new.extend(new);
        } else {
            edits.push(Edit { old: a..b, new });
        }
        consumed = b;
    }
    for e in &edits {
        let old_part: Vec<&FlatRange> = e.old.clone().filter_map(|i| old.range(i)).collect();
        same &= old_part.len() == e.new.len()
            && old_part.iter().zip(&e.new).all(|(x, y)| same_range(x, y));
    }
    Some(Spliced {
        edits,
        reached,
        same,
    })
}

/// A splice: the edits (sorted, disjoint old spans), the regions the window
/// renders reached, and whether the edits change nothing.
pub(crate) struct Spliced {
    pub(crate) edits: Vec<Edit>,
    pub(crate) reached: Vec<RegionId>,
    pub(crate) same: bool,
}

/// Whether two ranges are the same rendering (same span, region, offset,
/// attributes and the MIGRATION bit global tracking gave them; the
/// region's own dirty-log clients are not part of a rendering).
fn same_range(x: &FlatRange, y: &FlatRange) -> bool {
    x.start == y.start
        && x.last == y.last
        && x.offset_in_region == y.offset_in_region
        && Arc::ptr_eq(&x.region, &y.region)
        && x.attrs == y.attrs
        && x.global_log_mask() == y.global_log_mask()
}

/// Whether two range sequences are the same rendering.
pub(crate) fn same_ranges<'a>(
    a: impl IntoIterator<Item = &'a FlatRange>,
    b: impl IntoIterator<Item = &'a FlatRange>,
) -> bool {
    let (mut a, mut b) = (a.into_iter(), b.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) if same_range(x, y) => {}
            _ => return false,
        }
    }
}

/// `MEMTREE_CHECK_INCREMENTAL=1`: every spliced view is compared with a full
/// render and a difference panics (a test and debugging mode).
pub(crate) fn check_incremental() -> bool {
    static CHECK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHECK.get_or_init(|| {
        std::env::var_os("MEMTREE_CHECK_INCREMENTAL").is_some_and(|v| !v.is_empty() && v != "0")
    })
}
