//! Which address spaces a commit can change, so that a commit that edits
//! one device's regions visits that device's address space, not all of
//! them (QEMU visits every address space at every commit; switching N
//! devices' DMA spaces one commit each is then quadratic in N).
//!
//! A space's published view is the view of its *physical root* (the
//! physical-root walk of `render`). Between commits the index remembers,
//! per space, the regions its last walk inspected and the physical root it
//! found, with the two reverse maps. A commit can change a space only if
//!
//! * a region its walk inspected changed, or the container of a changed
//!   region is one of them (a subregion's flags, position and size decide
//!   the walk of its container): its walk must be redone; or
//! * its physical root's view must be re-rendered: a view changes only if
//!   its render reached a changed region, and every edit notes the changed
//!   extent at every region whose render shows it (`Topology::affected`,
//!   carried up containers and through aliases), so the root is among the
//!   noted regions (or the change is outside everything that root renders,
//!   and its render is the same).
//!
//! # Invariants
//!
//! * The index is used only when it is complete (it knows every space, the
//!   view cache holds exactly the physical roots it lists) and the commit is
//!   one it can bound: incremental rendering on, no note overflow, every
//!   changed region noted, no space created or destroyed, no ioeventfd
//!   change, something changed. Any other commit visits every space and
//!   rebuilds the index: the index can only make a commit skip spaces whose
//!   visit would have changed nothing.

use std::collections::{HashMap, HashSet};

use crate::region::ids::RegionId;
use crate::region::ids::SpaceId;
use crate::topology::tree::Topology;

/// One space's last physical-root walk.
struct Walk {
    inspected: Vec<RegionId>,
    phys: Option<RegionId>,
}

/// See the [module docs](self).
#[derive(Default)]
pub(crate) struct SpaceIndex {
    walks: HashMap<SpaceId, Walk>,
    /// Spaces whose last walk inspected the region.
    inspected_by: HashMap<RegionId, HashSet<SpaceId>>,
    /// Spaces whose last walk found the physical root (`None`: the empty
    /// view).
    users: HashMap<Option<RegionId>, HashSet<SpaceId>>,
    /// Whether the index knows every space (set by a commit that visited
    /// them all).
    complete: bool,
}

impl SpaceIndex {
    /// The spaces a commit must visit, in creation order, or `None` if it
    /// must visit every space (see the module docs for when).
    ///
    /// `dirty`, `affected` and `incremental` are the commit's (taken from
    /// the topology: the changed regions, the noted extents, and whether
    /// incremental rendering is on with no note overflow).
    pub(crate) fn candidates(
        &self,
        topo: &Topology,
        dirty: &HashSet<RegionId>,
        affected: &HashMap<RegionId, Vec<(i128, i128)>>,
        incremental: bool,
        fds_changed: bool,
    ) -> Option<Vec<SpaceId>> {
        let bounded = self.complete
            && incremental
            && !fds_changed
            && !dirty.is_empty()
            && topo.destroyed_spaces.is_empty()
            && topo.spaces.len() == self.walks.len()
            && topo.views.len() == self.users.len()
            && dirty.iter().all(|d| affected.contains_key(d));
        if !bounded {
            return None;
        }
        let mut touched: HashSet<RegionId> = dirty.clone();
        for d in dirty {
            if let Some(c) = topo.node(*d).and_then(|n| n.container) {
                touched.insert(c);
            }
        }
        touched.extend(affected.keys().copied());
        let mut out: HashSet<SpaceId> = HashSet::new();
        for r in &touched {
            if let Some(s) = self.inspected_by.get(r) {
                out.extend(s.iter().copied());
            }
            if let Some(s) = self.users.get(&Some(*r)) {
                out.extend(s.iter().copied());
            }
        }
        let mut out: Vec<(u64, SpaceId)> = out
            .into_iter()
            .map(|s| {
                let seq = topo
                    .spaces
                    .get(s.index, s.generation)
                    .map_or(u64::MAX, |n| n.seq);
                (seq, s)
            })
            .collect();
        out.sort_unstable();
        Some(out.into_iter().map(|(_, s)| s).collect())
    }

    /// Forgets everything (before a commit that visits every space).
    pub(crate) fn reset(&mut self) {
        *self = SpaceIndex::default();
    }

    /// Before a commit changes the index: until [`SpaceIndex::set_complete`]
    /// it is not trusted (a panic in between leaves it so, and the next
    /// commit visits every space).
    pub(crate) fn begin_update(&mut self) {
        self.complete = false;
    }

    /// After a commit that visited every space it could change, with the
    /// view cache updated: the index is complete.
    pub(crate) fn set_complete(&mut self) {
        self.complete = true;
    }

    /// Records `space`'s walk; returns the physical root its previous walk
    /// found, if it had one recorded.
    pub(crate) fn record(
        &mut self,
        space: SpaceId,
        inspected: Vec<RegionId>,
        phys: Option<RegionId>,
    ) -> Option<Option<RegionId>> {
        let old = self.walks.remove(&space);
        if let Some(old) = &old {
            for r in &old.inspected {
                remove_from(&mut self.inspected_by, r, space);
            }
            remove_from(&mut self.users, &old.phys, space);
        }
        for r in &inspected {
            self.inspected_by.entry(*r).or_default().insert(space);
        }
        self.users.entry(phys).or_default().insert(space);
        self.walks.insert(space, Walk { inspected, phys });
        old.map(|w| w.phys)
    }

    /// Whether some space's last walk found `phys`.
    pub(crate) fn is_used(&self, phys: &Option<RegionId>) -> bool {
        self.users.contains_key(phys)
    }
}

fn remove_from<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, HashSet<SpaceId>>,
    key: &K,
    space: SpaceId,
) {
    if let Some(set) = map.get_mut(key) {
        set.remove(&space);
        if set.is_empty() {
            map.remove(key);
        }
    }
}
