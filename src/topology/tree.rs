//! The topology: the control plane's arena of regions, owners and address
//! spaces, and every edit of it.
//!
//! `Topology` is plain data behind the machine's writer lock
//! ([`crate::Machine`]); its methods validate each edit completely before
//! changing anything, so a refused edit leaves the topology untouched.
//!
//! # Invariants
//!
//! * Links between nodes are ids. The only `Arc`s stored here point from a
//!   node to its own data-plane core.
//! * Following subregion links and alias targets from any region never comes
//!   back to that region (checked by [`Topology::would_loop`] on every edit
//!   that adds a link).
//! * A region is in at most one container, and a mapped region's core is held
//!   by its container's core (see [`crate::region::region_core`]).
//! * `dirty` names every region changed since the last commit; a cached view
//!   none of whose reached regions is dirty is still exact.
//! * `affected` holds, per region, the intervals (in the coordinates of a
//!   render rooted at that region: its own, shifted by its address) where some edit since the last commit can have changed
//!   what renders: every edit that changes rendering notes the extent of the
//!   region it edits before and after the change, carried up through every
//!   container and every alias that shows it (`note_extent`). A view rooted
//!   at `p` differs from its last render only inside `affected[p]`, unless
//!   `affected_overflow` is set (then it is re-rendered whole).
//! * No code memtree does not own runs while the topology is borrowed:
//!   anything an edit releases that may hold device state (region nodes
//!   and cores, a refused region's backing, replaced finalizers) goes to
//!   `crate::lifecycle::deferral::defer_drop` and drops when the machine operation ends,
//!   and device configuration hooks are read before the borrow.
//! * `unplug` costs O(regions of the unplugged devices + regions of the
//!   machine) (the alias scan), not O(n x siblings): dying regions are
//!   unlinked from each surviving container in one pass.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::access::space::{AddressSpace, MachineData, SpaceNode};
use crate::lifecycle::census::{ObjectKey, ObjectKind};
use crate::lifecycle::deferral::{defer_drop, defer_drop_recorded};
use crate::region::attrs::OpsConfig;
use crate::region::ids::{OwnerId, RegionId, SpaceId};
use crate::region::owner_core::{OwnerCore, OwnerLabel};
use crate::region::region_core::{
    Backing, RegionCore, RegionGraph, RegionInfo, RegionKind, RegionNode,
};
use crate::render::flatten;
use crate::render::listener::Listeners;
use crate::topology::arena::Arena;
use crate::topology::error::TopologyError;
use crate::topology::owner::OwnerNode;
use crate::view::flatview::FlatView;

type Result<T> = std::result::Result<T, TopologyError>;

/// What `Topology::unplug` did, and what it had to cut.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnplugReport {
    /// Owners unplugged (the owner and its child devices), parents first.
    pub owners: Vec<String>,
    /// Regions removed from the topology.
    pub regions: Vec<String>,
    /// Address spaces destroyed.
    pub spaces: Vec<String>,
    /// Regions of *other* owners that were subregions of a removed container
    /// and are now unmapped.
    pub detached: Vec<String>,
    /// Aliases of other owners whose target was removed; they now render
    /// nothing.
    pub dangling_aliases: Vec<String>,
    /// Address spaces of other owners whose root was removed; they now show
    /// the empty view.
    pub orphaned_spaces: Vec<String>,
    /// DMA mappings, caches and sections still out that hold an unplugged
    /// region (the device stays alive until they are released) or the
    /// memory of one (the memory stays valid until they are released), e.g.
    /// `mapping #12 "bounce pci 0x0+0x4 to-device" holds region "e1000-mmio": ...`.
    pub outstanding: Vec<String>,
}

pub(crate) struct Topology {
    pub(crate) regions: Arena<RegionNode>,
    pub(crate) owners: Arena<OwnerNode>,
    pub(crate) spaces: Arena<SpaceNode>,
    next_space_seq: u64,
    pub(crate) dirty: HashSet<RegionId>,
    /// Intervals that edits since the last commit can have changed, per
    /// region, in the region's coordinates (see the module invariants).
    pub(crate) affected: HashMap<RegionId, Vec<(i128, i128)>>,
    /// An edit's extent could not be bounded cheaply (unplug, teardown, a
    /// walk over its budget): the next commit renders reached views whole.
    pub(crate) affected_overflow: bool,
    /// Aliases created with each target (possibly stale: users check that the
    /// alias still exists and still targets the key).
    alias_sources: HashMap<RegionId, Vec<RegionId>>,
    /// Commits splice re-rendered windows into the previous views (on by
    /// default; off renders every reached view whole, the reference path).
    pub(crate) incremental: bool,
    pub(crate) pending: bool,
    /// Last rendered view per physical root (`None` = the empty view).
    pub(crate) views: HashMap<Option<RegionId>, Arc<FlatView>>,
    pub(crate) listeners: Listeners,
    pub(crate) depth: u32,
    pub(crate) in_commit: bool,
    /// The machine has been torn down (teardown runs once).
    pub(crate) torn_down: bool,
    pub(crate) machine: Arc<MachineData>,
    /// This machine's tag, carried by every id it makes (`crate::region::ids`).
    pub(crate) tag: u32,
    pub(crate) census_key: ObjectKey,
    /// Spaces destroyed since the last commit: their handles get the empty
    /// view at commit, after their listeners saw every range deleted.
    pub(crate) destroyed_spaces: Vec<(SpaceId, Box<str>, AddressSpace)>,
}

impl Drop for Topology {
    /// The machine is gone: so is its topology's census entry. (Teardown
    /// emptied the topology already; what is left here holds no device
    /// state.)
    fn drop(&mut self) {
        self.machine.census.finalize(self.census_key);
    }
}

impl RegionGraph for Topology {
    fn node(&self, id: RegionId) -> Option<&RegionNode> {
        Topology::node(self, id)
    }
}

impl Topology {
    pub(crate) fn new(machine: Arc<MachineData>) -> Topology {
        let census_key = machine
            .census
            .register(ObjectKind::Topology, "topology", None);
        let tag = crate::region::ids::next_machine_tag();
        Topology {
            regions: Arena::default(),
            owners: Arena::default(),
            spaces: Arena::default(),
            next_space_seq: 0,
            dirty: HashSet::new(),
            affected: HashMap::new(),
            affected_overflow: false,
            alias_sources: HashMap::new(),
            incremental: true,
            pending: false,
            views: HashMap::new(),
            listeners: Listeners::for_machine(tag),
            depth: 0,
            in_commit: false,
            torn_down: false,
            machine,
            tag,
            census_key,
            destroyed_spaces: Vec::new(),
        }
    }

    // ---- lookups -------------------------------------------------------

    /// `ForeignId` unless `id_machine` is this machine's tag.
    pub(crate) fn check_tag(
        &self,
        kind: &'static str,
        id: &dyn std::fmt::Debug,
        id_machine: u32,
    ) -> Result<()> {
        if id_machine == self.tag {
            return Ok(());
        }
        Err(TopologyError::ForeignId {
            kind,
            id: format!("{id:?}"),
            id_machine,
            machine: self.tag,
        })
    }

    /// `None` for a stale id and for an id of another machine (which never
    /// reaches a slot of this arena).
    pub(crate) fn node(&self, id: RegionId) -> Option<&RegionNode> {
        if id.machine != self.tag {
            return None;
        }
        self.regions.get(id.index, id.generation)
    }

    pub(crate) fn node_mut(&mut self, id: RegionId) -> Result<&mut RegionNode> {
        self.check_tag("region", &id, id.machine)?;
        self.regions
            .get_mut(id.index, id.generation)
            .ok_or(TopologyError::NoSuchRegion(id))
    }

    pub(crate) fn get(&self, id: RegionId) -> Result<&RegionNode> {
        self.check_tag("region", &id, id.machine)?;
        self.node(id).ok_or(TopologyError::NoSuchRegion(id))
    }

    pub(crate) fn owner(&self, id: OwnerId) -> Result<&OwnerNode> {
        self.check_tag("owner", &id, id.machine)?;
        self.owners
            .get(id.index, id.generation)
            .ok_or(TopologyError::NoSuchOwner(id))
    }

    pub(crate) fn space(&self, id: SpaceId) -> Result<&SpaceNode> {
        self.check_tag("address space", &id, id.machine)?;
        self.spaces
            .get(id.index, id.generation)
            .ok_or(TopologyError::NoSuchSpace(id))
    }

    /// Address spaces in creation order.
    pub(crate) fn spaces_in_order(&self) -> Vec<(SpaceId, &SpaceNode)> {
        let mut v: Vec<(SpaceId, &SpaceNode)> = self
            .spaces
            .iter()
            .map(|((index, generation), n)| {
                (
                    SpaceId {
                        index,
                        generation,
                        machine: self.tag,
                    },
                    n,
                )
            })
            .collect();
        v.sort_by_key(|(_, n)| n.seq);
        v
    }

    /// Every live region id.
    pub(crate) fn region_ids(&self) -> Vec<RegionId> {
        self.regions
            .iter()
            .map(|((index, generation), _)| RegionId {
                index,
                generation,
                machine: self.tag,
            })
            .collect()
    }

    pub(crate) fn info(&self, id: RegionId) -> Result<RegionInfo> {
        let n = self.get(id)?;
        Ok(RegionInfo {
            id,
            name: n.name().to_owned(),
            kind: n.kind(),
            size: n.size,
            addr: n.addr,
            priority: n.priority,
            enabled: n.enabled,
            readonly: n.readonly,
            nonvolatile: n.nonvolatile,
            romd_mode: n.romd_mode,
            container: n.container,
            subregions: n.subregions.clone(),
            alias_target: n.alias_target,
            alias_offset: n.alias_offset,
            owner: n.owner,
        })
    }

    fn name_of(&self, id: RegionId) -> String {
        self.node(id)
            .map(|n| n.name().to_owned())
            .unwrap_or_else(|| format!("{id:?}"))
    }

    fn mark(&mut self, id: RegionId) {
        self.dirty.insert(id);
        self.pending = true;
    }

    /// Notes where `id` renders now: its extent `[0, size)` in its own
    /// coordinates, carried up through its container chain and through every
    /// alias that shows it, recorded at every region on the way (any of them
    /// may be the physical root of a view). Called before and after each
    /// edit that changes what `id` renders, so the union of what is noted
    /// covers every address whose rendering the edits changed.
    fn note_extent(&mut self, id: RegionId) {
        /// Regions visited per note before giving up on bounding it.
        const BUDGET: usize = 4096;
        let Some(n) = self.node(id) else { return };
        let mut stack: Vec<(RegionId, i128, i128)> = vec![(id, 0, n.size as i128)];
        let mut steps = 0usize;
        let (regions, sources) = (&self.regions, &self.alias_sources);
        let node = |r: RegionId| regions.get(r.index, r.generation);
        while let Some((x, lo, hi)) = stack.pop() {
            steps += 1;
            if steps > BUDGET {
                self.affected_overflow = true;
                return;
            }
            let Some(n) = node(x) else { continue };
            let (lo, hi) = (lo.max(0), hi.min(n.size as i128));
            if lo >= hi {
                continue;
            }
            // Recorded where a render rooted at `x` lays it out: shifted by
            // `x`'s own address (as it is now: notes before and after an
            // edit of the address cover both placements).
            let a = i128::from(n.addr);
            self.affected.entry(x).or_default().push((lo + a, hi + a));
            if let Some(c) = n.container {
                stack.push((c, lo + a, hi + a));
            }
            if let Some(aliases) = sources.get(&x) {
                for &a in aliases {
                    if let Some(an) = node(a).filter(|an| an.alias_target == Some(x)) {
                        let off = i128::from(an.alias_offset);
                        stack.push((a, lo - off, hi - off));
                    }
                }
            }
        }
    }

    // ---- owners --------------------------------------------------------

    pub(crate) fn new_owner(
        &mut self,
        name: &str,
        label: OwnerLabel,
        parent: Option<OwnerId>,
    ) -> Result<OwnerId> {
        if let Some(p) = parent {
            self.owner(p)?;
        }
        let (index, generation) = self.owners.next_id();
        let id = OwnerId {
            index,
            generation,
            machine: self.tag,
        };
        let core = Arc::new(OwnerCore::new(id, name, &self.machine.census));
        self.machine
            .census
            .add_edge(self.census_key, core.census_key());
        let inserted = self.owners.insert(OwnerNode {
            core,
            label,
            parent,
            children: Vec::new(),
            regions: Vec::new(),
            spaces: Vec::new(),
        });
        debug_assert_eq!(inserted, (index, generation));
        if let Some(p) = parent {
            if let Some(pn) = self.owners.get_mut(p.index, p.generation) {
                pn.children.push(id);
            }
        }
        Ok(id)
    }

    pub(crate) fn owner_core(&self, id: OwnerId) -> Result<Arc<OwnerCore>> {
        Ok(self.owner(id)?.core.clone())
    }

    // ---- regions -------------------------------------------------------

    /// Creates a region. `ops_config` is `RegionCore::ops_config_for` of
    /// `kind` and `backing`, computed by the caller before it borrowed the
    /// topology (it runs device code). On a refusal `backing` (which may
    /// hold device state) is dropped after the edit, not inside it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn create_region(
        &mut self,
        name: &str,
        kind: RegionKind,
        size: u128,
        backing: Backing,
        ops_config: OpsConfig,
        owner: Option<OwnerId>,
        alias: Option<(RegionId, u64)>,
    ) -> Result<RegionId> {
        let owner_core = match self.check_new_region(size, owner, alias) {
            Ok(core) => core,
            Err(e) => {
                let what = format!("the device state of refused region \"{name}\"");
                defer_drop_recorded(&self.machine.census, &what, backing);
                return Err(e);
            }
        };
        let (index, generation) = self.regions.next_id();
        let id = RegionId {
            index,
            generation,
            machine: self.tag,
        };
        let core = Arc::new(RegionCore::new(
            id,
            name,
            kind,
            backing,
            owner_core,
            &self.machine.census,
            ops_config,
        ));
        self.machine
            .census
            .add_edge(self.census_key, core.census_key());
        let readonly = false;
        let inserted = self.regions.insert(RegionNode {
            kind,
            core,
            size,
            addr: 0,
            priority: 0,
            enabled: true,
            readonly,
            nonvolatile: false,
            unmergeable: false,
            romd_mode: true,
            alias_target: alias.map(|a| a.0),
            alias_offset: alias.map_or(0, |a| a.1),
            container: None,
            subregions: Vec::new(),
            owner,
            mapped_via_alias: 0,
            dirty_log_mask: 0,
            dirty_log_users: [0; 8],
            qom_parent: None,
        });
        debug_assert_eq!(inserted, (index, generation));
        if let Some((target, _)) = alias {
            self.alias_sources.entry(target).or_default().push(id);
        }
        if let Some(o) = owner {
            if let Some(on) = self.owners.get_mut(o.index, o.generation) {
                on.regions.push(id);
            }
        }
        Ok(id)
    }

    /// Validates a new region; returns its owner's core.
    fn check_new_region(
        &self,
        size: u128,
        owner: Option<OwnerId>,
        alias: Option<(RegionId, u64)>,
    ) -> Result<Option<Arc<OwnerCore>>> {
        if size > crate::region::region_core::MAX_REGION_SIZE {
            return Err(TopologyError::SizeTooLarge(size));
        }
        let owner_core = match owner {
            Some(o) => Some(self.owner_core(o)?),
            None => None,
        };
        if let Some((target, _)) = alias {
            self.get(target)?;
        }
        Ok(owner_core)
    }

    /// Whether linking `child` under `parent` (as a subregion) would let the
    /// tree reach `parent` again from `child`.
    /// Iterative (no depth of nesting or alias chain can overflow the
    /// stack) and O(size of `child`'s subtree): a leaf costs no allocation.
    fn would_loop(&self, parent: RegionId, child: RegionId) -> bool {
        if let Some(n) = self.node(child) {
            if n.subregions.is_empty() && n.alias_target.is_none() {
                return child == parent;
            }
        }
        let mut stack = vec![child];
        let mut seen = HashSet::new();
        while let Some(id) = stack.pop() {
            if id == parent {
                return true;
            }
            if !seen.insert(id) {
                continue;
            }
            if let Some(n) = self.node(id) {
                stack.extend(n.subregions.iter().copied());
                stack.extend(n.alias_target);
            }
        }
        false
    }

    /// `add_subregion` for each `(offset, sub, priority)` of `subs` in order,
    /// in one pass: the container's list is rebuilt once (O(n + m log m) for
    /// n present and m new subregions) instead of one insertion each (O(n·m):
    /// QEMU's newest-first order puts every equal-priority newcomer at the
    /// front). Every entry is validated before anything changes; on error
    /// nothing is mapped and the error comes with the index of the first
    /// entry refused.
    pub(crate) fn add_subregions(
        &mut self,
        container: RegionId,
        subs: &[(u64, RegionId, i32)],
    ) -> std::result::Result<(), (usize, TopologyError)> {
        let c = self.get(container).map_err(|e| (0, e))?;
        if c.kind() == RegionKind::Alias {
            return Err((0, TopologyError::AliasCannotContain(c.name().to_owned())));
        }
        let mut batch: HashSet<RegionId> = HashSet::with_capacity(subs.len());
        for (i, &(_, sub, _)) in subs.iter().enumerate() {
            let s = self.get(sub).map_err(|e| (i, e))?;
            if let Some(existing) = s.container {
                return Err((
                    i,
                    TopologyError::AlreadyInContainer {
                        region: s.name().to_owned(),
                        container: self.name_of(existing),
                    },
                ));
            }
            if !batch.insert(sub) {
                return Err((
                    i,
                    TopologyError::AlreadyInContainer {
                        region: s.name().to_owned(),
                        container: c.name().to_owned(),
                    },
                ));
            }
            // Links of one batch all leave `container`, so none of them can
            // lead from another entry back to it: checking each against the
            // topology before the batch is checking it in sequence.
            if self.would_loop(container, sub) {
                return Err((
                    i,
                    TopologyError::Loop {
                        region: s.name().to_owned(),
                        container: c.name().to_owned(),
                    },
                ));
            }
        }
        let c_core = c.core.clone();
        let present: Vec<(RegionId, i32)> = c
            .subregions
            .iter()
            .map(|&o| (o, self.node(o).map_or(i32::MIN, |n| n.priority)))
            .collect();
        let sorted = present.windows(2).all(|w| w[0].1 >= w[1].1);
        for &(_, sub, _) in subs {
            self.note_extent(sub);
        }
        for &(offset, sub, priority) in subs {
            let Ok(s) = self.node_mut(sub) else { continue };
            s.container = Some(container);
            s.addr = offset;
            s.priority = priority;
            let (alias_target, s_core) = (s.alias_target, s.core.clone());
            if let Some(t) = alias_target {
                if let Ok(t) = self.node_mut(t) {
                    t.mapped_via_alias += 1;
                }
            }
            c_core.hold_subregion(&s_core);
            self.mark(sub);
        }
        let list = if sorted {
            // Sequential insertion puts each newcomer before the first
            // present subregion of lower or equal priority: priorities
            // descending, and among equals the newest first, then the ones
            // already present.
            let mut new: Vec<(usize, i32, RegionId)> = subs
                .iter()
                .enumerate()
                .map(|(i, &(_, sub, p))| (i, p, sub))
                .collect();
            new.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
            let mut list = Vec::with_capacity(present.len() + new.len());
            let mut old = present.iter().peekable();
            for (_, p, sub) in new {
                while let Some(&&(o, op)) = old.peek() {
                    if op > p {
                        list.push(o);
                        old.next();
                    } else {
                        break;
                    }
                }
                list.push(sub);
            }
            list.extend(old.map(|&(o, _)| o));
            list
        } else {
            // Not in priority order (never the case for lists built by
            // these edits): insert one by one, exactly as `add_subregion`.
            let mut list: Vec<RegionId> = present.iter().map(|&(o, _)| o).collect();
            for &(_, sub, priority) in subs {
                let pos = list
                    .iter()
                    .position(|&o| self.node(o).is_some_and(|n| n.priority <= priority))
                    .unwrap_or(list.len());
                list.insert(pos, sub);
            }
            list
        };
        if let Ok(c) = self.node_mut(container) {
            c.subregions = list;
        }
        for &(_, sub, _) in subs {
            self.note_extent(sub);
        }
        self.mark(container);
        Ok(())
    }

    pub(crate) fn add_subregion(
        &mut self,
        container: RegionId,
        offset: u64,
        sub: RegionId,
        priority: i32,
    ) -> Result<()> {
        let c = self.get(container)?;
        let s = self.get(sub)?;
        if c.kind() == RegionKind::Alias {
            return Err(TopologyError::AliasCannotContain(c.name().to_owned()));
        }
        if let Some(existing) = s.container {
            return Err(TopologyError::AlreadyInContainer {
                region: s.name().to_owned(),
                container: self.name_of(existing),
            });
        }
        if self.would_loop(container, sub) {
            return Err(TopologyError::Loop {
                region: s.name().to_owned(),
                container: c.name().to_owned(),
            });
        }
        let c_core = c.core.clone();
        let s_core = s.core.clone();
        let alias_target = s.alias_target;
        // Where it renders unmapped (a view rooted at it shows it at its old
        // address).
        self.note_extent(sub);
        {
            let s = self.node_mut(sub)?;
            s.container = Some(container);
            s.addr = offset;
            s.priority = priority;
        }
        if let Some(t) = alias_target {
            if let Ok(t) = self.node_mut(t) {
                t.mapped_via_alias += 1;
            }
        }
        // QEMU order: before the first sibling whose priority is <= ours.
        let pos = {
            let c = self.get(container)?;
            c.subregions
                .iter()
                .position(|&o| self.node(o).is_some_and(|n| n.priority <= priority))
                .unwrap_or(c.subregions.len())
        };
        self.node_mut(container)?.subregions.insert(pos, sub);
        c_core.hold_subregion(&s_core);
        self.note_extent(sub);
        self.mark(container);
        self.mark(sub);
        Ok(())
    }

    pub(crate) fn del_subregion(&mut self, container: RegionId, sub: RegionId) -> Result<()> {
        let c = self.get(container)?;
        let s = self.get(sub)?;
        if s.container != Some(container) {
            return Err(TopologyError::NotASubregion {
                region: s.name().to_owned(),
                container: c.name().to_owned(),
            });
        }
        let c_core = c.core.clone();
        let s_core = s.core.clone();
        let alias_target = s.alias_target;
        self.note_extent(sub);
        self.node_mut(container)?.subregions.retain(|&x| x != sub);
        self.node_mut(sub)?.container = None;
        if let Some(t) = alias_target {
            if let Ok(t) = self.node_mut(t) {
                t.mapped_via_alias = t.mapped_via_alias.saturating_sub(1);
            }
        }
        c_core.release_subregion(&s_core);
        self.mark(container);
        self.mark(sub);
        Ok(())
    }

    /// Unmaps several subregions of one container in one pass (they are
    /// all its subregions; checked by the caller).
    fn del_subregions(&mut self, container: RegionId, subs: &[RegionId]) -> Result<()> {
        let gone: HashSet<RegionId> = subs.iter().copied().collect();
        for &sub in subs {
            self.note_extent(sub);
        }
        let c_core = self.get(container)?.core.clone();
        self.node_mut(container)?
            .subregions
            .retain(|x| !gone.contains(x));
        let mut cores = Vec::with_capacity(subs.len());
        for &sub in subs {
            let s = self.node_mut(sub)?;
            s.container = None;
            let alias_target = s.alias_target;
            cores.push(s.core.clone());
            if let Some(t) = alias_target {
                if let Ok(t) = self.node_mut(t) {
                    t.mapped_via_alias = t.mapped_via_alias.saturating_sub(1);
                }
            }
            self.mark(sub);
        }
        c_core.release_subregions(&cores);
        self.mark(container);
        Ok(())
    }

    pub(crate) fn set_address(&mut self, sub: RegionId, addr: u64) -> Result<()> {
        let s = self.get(sub)?;
        match s.container {
            // QEMU re-adds the region, making it the newest of its priority.
            Some(c) => {
                let prio = s.priority;
                self.del_subregion(c, sub)?;
                self.add_subregion(c, addr, sub, prio)
            }
            None => self.update(sub, |n| n.addr = addr),
        }
    }

    /// Applies `f` to a region's node and marks it dirty.
    pub(crate) fn update(&mut self, id: RegionId, f: impl FnOnce(&mut RegionNode)) -> Result<()> {
        self.node_mut(id)?;
        self.note_extent(id);
        f(self.node_mut(id)?);
        self.note_extent(id);
        self.mark(id);
        Ok(())
    }

    pub(crate) fn set_size(&mut self, id: RegionId, size: u128) -> Result<()> {
        if size > crate::region::region_core::MAX_REGION_SIZE {
            return Err(TopologyError::SizeTooLarge(size));
        }
        let n = self.get(id)?;
        let fit = match n.core.backing() {
            Backing::Ram { block, offset } | Backing::RamDevice { block, offset } => {
                Some((*offset, block.size()))
            }
            Backing::RomDevice { block, .. } => Some((0, block.size())),
            _ => None,
        };
        if let Some((offset, backend_size)) = fit {
            if size > u128::from(backend_size - offset) {
                return Err(TopologyError::BackendTooSmall {
                    region: n.name().to_owned(),
                    offset,
                    size,
                    backend_size,
                });
            }
        }
        self.update(id, |n| n.size = size)
    }

    /// Destroys a region that is not mapped, not an address-space root and not
    /// an alias target. Its remaining subregions are unmapped first.
    pub(crate) fn destroy_region(&mut self, id: RegionId) -> Result<()> {
        let n = self.get(id)?;
        let name = n.name().to_owned();
        if let Some(c) = n.container {
            return Err(TopologyError::InUse {
                region: name,
                why: format!("it is still a subregion of \"{}\"", self.name_of(c)),
            });
        }
        if let Some((_, s)) = self
            .spaces_in_order()
            .into_iter()
            .find(|(_, s)| s.root == Some(id))
        {
            return Err(TopologyError::InUse {
                region: name,
                why: format!("it is the root of address space \"{}\"", s.name),
            });
        }
        if let Some((_, a)) = self
            .regions
            .iter()
            .find(|(_, a)| a.alias_target == Some(id))
        {
            return Err(TopologyError::InUse {
                region: name,
                why: format!("alias \"{}\" targets it", a.name()),
            });
        }
        for sub in n.subregions.clone() {
            self.del_subregion(id, sub)?;
        }
        self.remove_node(id);
        Ok(())
    }

    fn remove_node(&mut self, id: RegionId) {
        if let Some(Some(o)) = self.remove_node_keeping_owner_list(id) {
            if let Some(on) = self.owners.get_mut(o.index, o.generation) {
                on.regions.retain(|&r| r != id);
            }
        }
    }

    /// Removes a region's node but leaves its id in its owner's list (for
    /// unplug, which removes the owner too). The core (and with it possibly
    /// the device's state) is dropped after the edit, where the machine is
    /// usable, not here.
    /// Returns the region's owner, if the region existed.
    fn remove_node_keeping_owner_list(&mut self, id: RegionId) -> Option<Option<OwnerId>> {
        if id.machine != self.tag {
            return None;
        }
        let node = self.regions.remove(id.index, id.generation)?;
        self.alias_sources.remove(&id);
        if let Some(t) = node.alias_target {
            if let Some(list) = self.alias_sources.get_mut(&t) {
                list.retain(|&a| a != id);
            }
        }
        self.dirty.insert(id);
        self.pending = true;
        self.machine
            .census
            .remove_edge(self.census_key, node.core.census_key());
        let owner = node.owner;
        defer_drop(node);
        Some(owner)
    }

    // ---- address spaces ------------------------------------------------

    pub(crate) fn new_space(
        &mut self,
        name: &str,
        root: RegionId,
        owner: Option<OwnerId>,
    ) -> Result<SpaceId> {
        self.get(root)?;
        if let Some(o) = owner {
            self.owner(o)?;
        }
        let (index, generation) = self.spaces.next_id();
        let id = SpaceId {
            index,
            generation,
            machine: self.tag,
        };
        let handle = AddressSpace::new(name, id, &self.machine, self.machine.empty_view.clone());
        self.machine
            .census
            .add_edge(self.census_key, handle.census_key());
        self.next_space_seq += 1;
        let inserted = self.spaces.insert(SpaceNode {
            name: name.into(),
            root: Some(root),
            owner,
            handle,
            seq: self.next_space_seq,
        });
        debug_assert_eq!(inserted, (index, generation));
        if let Some(o) = owner {
            if let Some(on) = self.owners.get_mut(o.index, o.generation) {
                on.spaces.push(id);
            }
        }
        self.pending = true;
        Ok(id)
    }

    pub(crate) fn destroy_space(&mut self, id: SpaceId) -> Result<()> {
        self.check_tag("address space", &id, id.machine)?;
        let node = self
            .spaces
            .remove(id.index, id.generation)
            .ok_or(TopologyError::NoSuchSpace(id))?;
        if let Some(o) = node.owner {
            if let Some(on) = self.owners.get_mut(o.index, o.generation) {
                on.spaces.retain(|&s| s != id);
            }
        }
        self.machine
            .census
            .remove_edge(self.census_key, node.handle.census_key());
        self.destroyed_spaces.push((id, node.name, node.handle));
        self.pending = true;
        Ok(())
    }

    // ---- unplug ----------------------------------------------------------

    /// Unplugs an owner and its child devices: closes their liveness gates,
    /// destroys their address spaces and regions, and cuts links from the rest
    /// of the topology into them. Finalization follows when the last
    /// data-plane holder (a view being read, a DMA mapping) lets go.
    pub(crate) fn unplug(&mut self, owner: OwnerId) -> Result<UnplugReport> {
        self.owner(owner)?;
        // Many regions at once: the next commit renders reached views whole.
        self.affected_overflow = true;
        let mut report = UnplugReport::default();
        // Owners: the device and its descendants, parents first.
        let mut owners = vec![owner];
        let mut i = 0;
        while i < owners.len() {
            if let Ok(n) = self.owner(owners[i]) {
                owners.extend(n.children.iter().copied());
            }
            i += 1;
        }
        let owner_set: HashSet<OwnerId> = owners.iter().copied().collect();
        let mut regions: Vec<RegionId> = Vec::new();
        let mut spaces: Vec<SpaceId> = Vec::new();
        for &o in &owners {
            let n = self.owner(o)?;
            n.core.unplug();
            report.owners.push(n.core.name().to_owned());
            regions.extend(n.regions.iter().copied());
            spaces.extend(n.spaces.iter().copied());
        }
        // A cursor's copy of an IOTLB slot is re-checked only against its
        // hub's generation, and the views still map the region until the
        // commit: moving the generation on makes the next access miss and
        // find the owner dead (inside a transaction too).
        for &r in &regions {
            if let Some(hub) = self.get(r).ok().and_then(|n| n.core.iommu_hub()) {
                hub.invalidate_cache();
            }
        }
        let region_set: HashSet<RegionId> = regions.iter().copied().collect();
        for s in spaces {
            if let Ok(sn) = self.space(s) {
                report.spaces.push(sn.name.to_string());
            }
            self.destroy_space(s)?;
        }
        // Cut links from the surviving topology into the dying regions.
        let others: Vec<(SpaceId, Option<RegionId>, Box<str>)> = self
            .spaces_in_order()
            .into_iter()
            .map(|(id, n)| (id, n.root, n.name.clone()))
            .collect();
        for (sid, root, name) in others {
            if root.is_some_and(|r| region_set.contains(&r)) {
                if let Some(n) = self.spaces.get_mut(sid.index, sid.generation) {
                    n.root = None;
                }
                report.orphaned_spaces.push(name.to_string());
            }
        }
        let aliases: Vec<RegionId> = self
            .regions
            .iter()
            .filter(|(_, n)| n.alias_target.is_some_and(|t| region_set.contains(&t)))
            .map(|((index, generation), _)| RegionId {
                index,
                generation,
                machine: self.tag,
            })
            .filter(|id| !region_set.contains(id))
            .collect();
        for a in aliases {
            report.dangling_aliases.push(self.name_of(a));
            self.update(a, |n| n.alias_target = None)?;
        }
        // Unlink dying regions from surviving containers and surviving
        // subregions from dying containers: one pass per container, so an
        // unplug costs O(regions), not O(regions x siblings).
        let mut leaving: HashMap<RegionId, Vec<RegionId>> = HashMap::new();
        for &r in &regions {
            let n = self.get(r)?;
            if let Some(c) = n.container.filter(|c| !region_set.contains(c)) {
                leaving.entry(c).or_default().push(r);
            }
            for &sub in n.subregions.iter().filter(|s| !region_set.contains(s)) {
                report.detached.push(self.name_of(sub));
                leaving.entry(r).or_default().push(sub);
            }
        }
        for (container, subs) in leaving {
            self.del_subregions(container, &subs)?;
        }
        // Report what DMA mappings, caches and sections still hold of them.
        let mut pinned = HashMap::new();
        for &r in &regions {
            if let Some(n) = self.node(r) {
                pinned.insert(n.core.census_key(), format!("region \"{}\"", n.name()));
                if let Some(b) = crate::dma::mapping::ram_backend(&n.core) {
                    pinned.insert(b.census_key(), format!("memory \"{}\"", b.name()));
                }
            }
        }
        report.outstanding = self.machine.dma.pinning(&self.machine.census, &pinned);
        // Remove the regions. Links among them stay in their cores, so a
        // container's core keeps its subregions' cores until it finishes.
        for &r in &regions {
            report.regions.push(self.name_of(r));
            // The owners go below, with their region lists.
            self.remove_node_keeping_owner_list(r);
        }
        for &o in &owners {
            if let Some(n) = self.owners.remove(o.index, o.generation) {
                if let Some(p) = n.parent.filter(|p| !owner_set.contains(p)) {
                    if let Some(pn) = self.owners.get_mut(p.index, p.generation) {
                        pn.children.retain(|&c| c != o);
                    }
                }
                self.machine
                    .census
                    .remove_edge(self.census_key, n.core.census_key());
            }
        }
        self.pending = true;
        Ok(report)
    }

    /// Destroys everything: every owner, region and address space.
    pub(crate) fn clear(&mut self) {
        let roots: Vec<OwnerId> = self
            .owners
            .iter()
            .filter(|(_, n)| n.parent.is_none())
            .map(|((index, generation), _)| OwnerId {
                index,
                generation,
                machine: self.tag,
            })
            .collect();
        for o in roots {
            let _ = self.unplug(o);
        }
        let spaces: Vec<SpaceId> = self
            .spaces_in_order()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        for s in spaces {
            let _ = self.destroy_space(s);
        }
        // Removal order does not matter: a container's core keeps the cores of
        // its subregions, so finalization order is fixed by the cores.
        let ids = self.region_ids();
        for id in ids {
            self.remove_node(id);
        }
    }
}

// Lives here rather than in render/flatten.rs so that rendering does not
// depend on `Machine` (it is handed the `Topology`).
impl crate::topology::memory::Machine {
    /// Renders the tree under `root` exactly as a commit would (physical-root
    /// walk, render, merge) without publishing anything, and returns the
    /// number of flat ranges. For benchmarks only: the result is discarded.
    #[doc(hidden)]
    pub fn render_for_bench(&self, root: RegionId) -> usize {
        self.read(|topo| match flatten::physical_root(topo, root) {
            Some(p) => flatten::render(topo, p).ranges.len(),
            None => 0,
        })
    }
}
