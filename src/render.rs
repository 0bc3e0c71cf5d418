//! Rendering: region tree → flat view, with QEMU's exact semantics
//! (qemu-memory-semantics.md §2).
//!
//! [`render`] is a pure function of the topology: it takes no lock, does no
//! I/O and cannot fail (the topology's own invariants — no alias loops, no
//! containment cycles, sizes ≤ 2^64 — are checked when the tree is edited).
//!
//! Algorithm: the same depth-first walk as QEMU (`render_memory_region`):
//! higher-priority subregions render first and win; a terminating region then
//! fills the gaps its subregions left inside its clip. Unlike QEMU, which keeps
//! the view in a sorted array and shifts its tail on every insertion
//! (quadratic in the worst case), the covered set lives in an ordered map of
//! disjoint intervals, so filling the gaps of a clip costs O(k log n) for the
//! k intervals it touches. The result is then merged (§2.4) into a sorted
//! vector.
//!
//! Arithmetic is in `i128`, like QEMU's `Int128`, because alias offsets can
//! move the base below zero.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::flatview::{FlatRange, RangeAttrs, RegionType};
use crate::region::{RegionId, RegionKind, RegionNode, MAX_REGION_SIZE};
use crate::topology::Topology;

/// Propagated flags along a render path.
#[derive(Copy, Clone, Default, PartialEq, Eq, Debug)]
struct PathFlags {
    readonly: bool,
    nonvolatile: bool,
    unmergeable: bool,
}

/// One rendered piece before merging.
#[derive(Clone, Debug)]
struct Piece {
    end: i128,
    region: RegionId,
    offset: i128,
    flags: PathFlags,
}

/// The result of rendering one physical root.
pub(crate) struct Rendered {
    pub(crate) ranges: Vec<FlatRange>,
    pub(crate) reached: Vec<RegionId>,
}

struct Renderer<'t> {
    topo: &'t Topology,
    /// Disjoint covered intervals keyed by start.
    covered: BTreeMap<i128, Piece>,
    reached: Vec<RegionId>,
}

/// Renders the tree under `root` (a physical root, §2.5) into flat ranges.
pub(crate) fn render(topo: &Topology, root: RegionId) -> Rendered {
    let mut r = Renderer {
        topo,
        covered: BTreeMap::new(),
        reached: Vec::new(),
    };
    r.region(root, 0, (0, MAX_REGION_SIZE as i128), PathFlags::default());
    let Renderer {
        covered, reached, ..
    } = r;
    Rendered {
        ranges: simplify(topo, covered),
        reached,
    }
}

impl Renderer<'_> {
    fn region(&mut self, id: RegionId, base: i128, clip: (i128, i128), flags: PathFlags) {
        let Some(node) = self.topo.node(id) else {
            return;
        };
        self.reached.push(id);
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
        // 5. Aliases recurse into their target, shifted.
        if node.kind() == RegionKind::Alias {
            if let Some(target) = node.alias_target.and_then(|t| self.topo.node(t).map(|n| (t, n)))
            {
                let (tid, tnode) = target;
                let base = base - i128::from(tnode.addr) - i128::from(node.alias_offset);
                self.region(tid, base, clip, flags);
            }
            return;
        }
        // 6. Subregions, in priority order.
        for &sub in &node.subregions {
            self.region(sub, base, clip, flags);
        }
        // 7. Pure containers leave holes.
        if !node.terminates() {
            return;
        }
        // 8. Fill the gaps inside the clip.
        self.fill(id, base, clip, flags);
    }

    fn fill(&mut self, id: RegionId, base: i128, clip: (i128, i128), flags: PathFlags) {
        let (mut pos, end) = clip;
        let mut gaps = Vec::new();
        // The interval starting at or before `pos` may cover it.
        if let Some((_, p)) = self.covered.range(..=pos).next_back() {
            if p.end > pos {
                pos = p.end;
            }
        }
        if pos < end {
            for (&s, p) in self.covered.range(pos..end) {
                if s > pos {
                    gaps.push((pos, s));
                }
                pos = pos.max(p.end);
                if pos >= end {
                    break;
                }
            }
        }
        if pos < end {
            gaps.push((pos, end));
        }
        for (s, e) in gaps {
            self.covered.insert(
                s,
                Piece {
                    end: e,
                    region: id,
                    offset: s - base,
                    flags,
                },
            );
        }
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
        dirty_log_mask: node.dirty_log_mask,
        priority: node.priority,
        region_type: RegionType::of(node.kind(), node.readonly, node.romd_mode),
    }
}

/// QEMU's merge rule (§2.4), then conversion to `FlatRange`s.
fn simplify(topo: &Topology, covered: BTreeMap<i128, Piece>) -> Vec<FlatRange> {
    let mut merged: Vec<(i128, Piece)> = Vec::with_capacity(covered.len());
    for (start, piece) in covered {
        if let Some((pstart, prev)) = merged.last_mut() {
            let adjacent = prev.end == start;
            let same = prev.region == piece.region
                && prev.flags == piece.flags
                && prev.offset + (prev.end - *pstart) == piece.offset
                && !prev.flags.unmergeable
                && !piece.flags.unmergeable;
            if adjacent && same {
                prev.end = piece.end;
                continue;
            }
        }
        merged.push((start, piece));
    }
    merged
        .into_iter()
        .filter_map(|(start, piece)| {
            let node = topo.node(piece.region)?;
            let last = u64::try_from(piece.end - 1).ok()?;
            let start = u64::try_from(start).ok()?;
            // Offsets are non-negative for any range inside its region; a
            // negative one can only come from an alias pointing before its
            // target, which QEMU would also wrap.
            let offset = piece.offset as u64;
            Some(FlatRange::new(
                start,
                last,
                offset,
                Arc::clone(&node.core),
                attrs_for(node, piece.flags),
            ))
        })
        .collect()
}

/// QEMU's physical-root walk (§2.5): the region whose rendering an address
/// space rooted at `root` shares. `None` means the empty view.
pub(crate) fn physical_root(topo: &Topology, root: RegionId) -> Option<RegionId> {
    let mut id = root;
    loop {
        let node = topo.node(id)?;
        if !node.enabled {
            return None;
        }
        match node.kind() {
            RegionKind::Alias => {
                let Some(target) = node.alias_target else {
                    return Some(id);
                };
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
