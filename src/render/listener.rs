//! Memory listeners: QEMU's `MemoryListener` (`include/exec/memory.h`,
//! `system/memory.c`), with ioeventfds and coalesced MMIO ranges.
//!
//! A listener registered on an address space is told, at every commit that
//! changes that space's flat view, which ranges were removed and added (and
//! kept, if it asks for nops), and which ranges' dirty-log masks changed.
//! The diff is computed here, purely, from the old and new views (or the
//! splice between them) and the commit's mask changes.
//!
//! # Ordering (QEMU's)
//!
//! * `begin` and `commit` go to every registered listener (all address
//!   spaces) in ascending priority, once per commit that changed topology.
//!   A commit that only changed ioeventfds calls neither; one that only
//!   changed dirty-log masks calls them on the listeners of the spaces
//!   that show a changed region, and only those.
//! * `region_nop` goes only to the listeners whose
//!   [`MemoryListener::wants_region_nop`] said yes (at registration), in
//!   its place in QEMU's order; the others never see unchanged ranges, and
//!   a commit's diff does not visit them when no listener of the space
//!   wants nops.
//! * A dirty-log mask change renders nothing: the commit publishes the
//!   region's new mask into its core (what flat ranges report and writes
//!   mark for), then every space that shows the region gets, per range of
//!   it (aliases included) in address order, what QEMU's diff of a kept
//!   range gives: the nop (to the listeners that want it) and
//!   `log_start` / `log_stop(old, new)`. QEMU's "old" mask is the one
//!   listeners were last told; it is carried by the commit
//!   (`LogChanges`), since every range, in old views too, reports the
//!   region's current mask (`FlatRange::dirty_log_mask`).
//! * Forward (ascending priority): `begin`, `commit`, `region_add`,
//!   `region_nop`, `log_start`, `coalesced_io_add`, `log_global_start`, and —
//!   QEMU's quirk, kept — `eventfd_del`.
//! * Reverse (descending priority): `region_del`, `log_stop`,
//!   `coalesced_io_del`, `log_global_stop`, and `eventfd_add`.
//! * Per address space (in creation order): all deletions (each preceded by
//!   its coalesced deletions), then nops / log changes / additions (each
//!   followed by its coalesced additions) in address order, then the
//!   ioeventfd symmetric difference.
//! * Equal priorities keep registration order.
//! * A new listener is replayed the current state of its space: `begin`,
//!   `log_global_start` if global dirty logging is on, then per range
//!   `region_add`, coalesced adds, `log_start(0 → mask)`; `eventfd_add` for
//!   every current ioeventfd; `commit`. Unregistering replays the reverse:
//!   per range `log_stop(mask → 0)`, coalesced dels, `region_del`;
//!   `eventfd_del` for every ioeventfd.
//! * `log_sync` / `log_clear` are not part of a commit: they run from
//!   [`crate::Machine::dirty_log_sync`], `snapshot_and_clear_dirty` and
//!   `take_dirty_ram`, per space (creation order), per logging range
//!   (address order), forward ([`crate::host::dirty_bitmap`]).
//! * Sections are in address-space coordinates, and carry the view published
//!   when the callback runs (during a commit's diff that is still the old view).
//!
//! Listeners are called with the topology writer lock held (so the topology
//! cannot change under them) but with no borrow of the topology: a listener
//! that tries to change the topology (or register or unregister a listener)
//! from a callback gets [`crate::TopologyError::ListenerReentry`], never a
//! deadlock; it may query the machine.
//!
//! # Panics
//!
//! Every callback is called on its own under `catch_unwind`. A listener
//! that panics is recorded in the census (which listener, which callback,
//! the message) and the sequence goes on: every other callback of that
//! listener and every other listener still runs, every view is published,
//! every listener gets `commit`. Once memtree is consistent the first panic
//! is re-raised to the caller of the machine method that made the commit
//! (see [`crate::topology::memory`], "Panics"). A listener that panicked has still
//! been told every later change, so one that keeps state (a KVM slot
//! manager) needs nothing more than its own callbacks to catch up.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::lifecycle::census::Census;
use crate::lifecycle::deferral::{catch, panic_message, raise};
use crate::region::ids::{RegionId, SpaceId};
use crate::view::flatview::{FlatRange, FlatView, SpliceSpans};

/// Identity of a registered listener.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub(crate) u64, pub(crate) u32);

/// QEMU's `MEMORY_LISTENER_PRIORITY_MIN`.
pub const PRIORITY_MIN: u32 = 0;
/// QEMU's `MEMORY_LISTENER_PRIORITY_ACCEL` (KVM, HVF, ...).
pub const PRIORITY_ACCEL: u32 = 10;
/// QEMU's `MEMORY_LISTENER_PRIORITY_DEV_BACKEND` (vhost, ...).
pub const PRIORITY_DEV_BACKEND: u32 = 10;

/// What a listener callback is told about one range: QEMU's
/// `MemoryRegionSection`.
#[derive(Clone, Copy)]
pub struct Section<'a> {
    /// The address space.
    pub space: SpaceId,
    /// The address space's name.
    pub space_name: &'a str,
    /// The range (in address-space coordinates).
    pub range: &'a FlatRange,
    /// The view published in the space when the callback runs: during a
    /// commit's diff that is still the *old* view (QEMU's behaviour), so for
    /// `region_add` the range belongs to the view about to be published.
    pub view: &'a Arc<FlatView>,
    /// The range's dirty-log mask as this callback reports it (QEMU's
    /// section mask): for `region_del`, the mask the range had before the
    /// commit (a commit may stop logging and unmap the range at once); for
    /// every other callback, the range's current mask
    /// ([`FlatRange::dirty_log_mask`]).
    pub log_mask: u8,
}

impl fmt::Debug for Section<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{:?}", self.space_name, self.range)
    }
}

/// A notification target for ioeventfds: QEMU's `EventNotifier`, reduced to
/// a counter. Identity is the allocation (two notifiers with the same name
/// are different notifiers).
pub struct EventNotifier {
    name: Box<str>,
    count: AtomicU64,
}

impl EventNotifier {
    /// A new notifier; `name` is for diagnostics only.
    pub fn new(name: &str) -> Arc<EventNotifier> {
        Arc::new(EventNotifier {
            name: name.into(),
            count: AtomicU64::new(0),
        })
    }

    /// The diagnostic name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Signals the notifier once.
    pub fn notify(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    /// Returns and clears the number of signals since the last `take`.
    pub fn take(&self) -> u64 {
        self.count.swap(0, Ordering::AcqRel)
    }
}

impl fmt::Debug for EventNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventNotifier({})", self.name)
    }
}

/// What `eventfd_add` / `eventfd_del` are told: one ioeventfd of a region,
/// placed in address-space coordinates (QEMU's section for these callbacks
/// carries only the address range; the region is given here as an id).
#[derive(Clone, Copy)]
pub struct EventfdSection<'a> {
    /// The address space.
    pub space: SpaceId,
    /// The address space's name.
    pub space_name: &'a str,
    /// The region the ioeventfd was added to.
    pub region: RegionId,
    /// First address, in address-space coordinates.
    pub addr: u64,
    /// Access size the ioeventfd matches; 0 matches any size.
    pub size: u64,
    /// The value a write must carry to match (already converted to the
    /// region's byte order), or `None` to match any value.
    pub data: Option<u64>,
    /// What to signal.
    pub notifier: &'a Arc<EventNotifier>,
    /// The view published in the space when the callback runs.
    pub view: &'a Arc<FlatView>,
}

impl fmt::Debug for EventfdSection<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{:#x}+{:#x} data={:?} {}",
            self.space_name,
            self.addr,
            self.size,
            self.data,
            self.notifier.name()
        )
    }
}

/// Callbacks; every one defaults to doing nothing. Implementations use
/// interior mutability: callbacks take `&self`.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use memtree::{Memory, MemoryListener, Section};
///
/// /// Records the guest ranges a hypervisor would map.
/// #[derive(Default)]
/// struct Slots(Mutex<Vec<(u64, u128)>>);
///
/// impl MemoryListener for Slots {
///     fn region_add(&self, section: &Section<'_>) {
///         let range = section.range;
///         self.0.lock().unwrap().push((range.start(), range.len()));
///     }
/// }
///
/// let memory = Memory::new();
/// let system = memory.new_container("system", 1 << 32, None).unwrap();
/// let space = memory.new_address_space("memory", system, None).unwrap();
/// let slots = Arc::new(Slots::default());
/// memory.register_listener(space, slots.clone()).unwrap();
/// let ram = memory.new_ram("ram", 0x1000, None).unwrap();
/// memory.add_subregion(system, 0x10_0000, ram).unwrap();
/// assert_eq!(*slots.0.lock().unwrap(), [(0x10_0000, 0x1000)]);
/// ```
#[allow(unused_variables)]
pub trait MemoryListener: Send + Sync {
    /// Ordering key: lower runs first for forward callbacks.
    fn priority(&self) -> u32 {
        PRIORITY_MIN
    }
    /// A name for diagnostics (QEMU's `MemoryListener::name`).
    fn name(&self) -> &str {
        "anonymous"
    }
    /// A commit (or a replay) starts.
    fn begin(&self) {}
    /// A commit (or a replay) ends.
    fn commit(&self) {}
    /// A range appeared.
    fn region_add(&self, section: &Section<'_>) {}
    /// A range disappeared.
    fn region_del(&self, section: &Section<'_>) {}
    /// A range is unchanged (its dirty-log mask may have changed): QEMU's
    /// `region_nop`, called for every unchanged range of every commit that
    /// touches the space, in address order among the other range
    /// callbacks. Called **only if [`MemoryListener::wants_region_nop`]
    /// returns true**: a listener that does not ask for nops is told what
    /// changed and nothing else, so a commit costs it what the commit
    /// changes, not the size of the map.
    fn region_nop(&self, section: &Section<'_>) {}
    /// Whether this listener wants [`MemoryListener::region_nop`] for every
    /// unchanged range (QEMU's contract, for a listener that rebuilds its
    /// state from scratch at each commit, as QEMU's dispatch tables do).
    /// Asked once, at registration. Default `false`: with no listener of a
    /// space wanting nops, a commit's diff skips every range it did not
    /// change.
    fn wants_region_nop(&self) -> bool {
        false
    }
    /// Dirty logging started for some clients of a range.
    fn log_start(&self, section: &Section<'_>, old_mask: u8, new_mask: u8) {}
    /// Dirty logging stopped for some clients of a range.
    fn log_stop(&self, section: &Section<'_>, old_mask: u8, new_mask: u8) {}
    /// Global dirty tracking is starting. An error makes
    /// [`crate::Machine::global_dirty_log_start`] roll back and fail.
    fn log_global_start(&self) -> Result<(), String> {
        Ok(())
    }
    /// Global dirty tracking stopped.
    fn log_global_stop(&self) {}
    /// Merge this range's external dirty log (KVM's) into memtree's bitmaps
    /// ([`FlatRange::mark_dirty_bitmap`]): called on every listener for
    /// every range with a nonzero mask by [`crate::Machine::dirty_log_sync`]
    /// and, for the ranges of one region, before
    /// [`crate::Machine::snapshot_and_clear_dirty`] reads.
    fn log_sync(&self, section: &Section<'_>) {}
    /// `[offset, offset + len)` of the range (range offsets) was cleared in
    /// memtree's bitmaps for some client: a listener keeping a remote
    /// bitmap may clear it too (QEMU's `log_clear`).
    fn log_clear(&self, section: &Section<'_>, offset: u64, len: u64) {}
    /// An ioeventfd became visible in the address space.
    fn eventfd_add(&self, section: &EventfdSection<'_>) {}
    /// An ioeventfd stopped being visible in the address space.
    fn eventfd_del(&self, section: &EventfdSection<'_>) {}
    /// `[addr, addr + len)` of the range is coalesced MMIO.
    fn coalesced_io_add(&self, section: &Section<'_>, addr: u64, len: u128) {}
    /// `[addr, addr + len)` of the range is no longer coalesced MMIO.
    fn coalesced_io_del(&self, section: &Section<'_>, addr: u64, len: u128) {}
}

pub(crate) struct Registered {
    pub(crate) id: ListenerId,
    pub(crate) space: SpaceId,
    pub(crate) listener: Arc<dyn MemoryListener>,
    pub(crate) priority: u32,
    /// [`MemoryListener::wants_region_nop`], asked at registration.
    pub(crate) wants_nop: bool,
}

/// An ioeventfd of a region (QEMU's `MemoryRegionIoeventfd`), in region
/// coordinates.
#[derive(Clone)]
pub(crate) struct IoEventFd {
    pub(crate) addr: u64,
    pub(crate) size: u64,
    pub(crate) data: Option<u64>,
    pub(crate) notifier: Arc<EventNotifier>,
}

impl IoEventFd {
    /// QEMU's `memory_region_ioeventfd_before` as a sort key: start, size,
    /// match flag, data (only when matching), notifier identity.
    fn key(&self) -> (u64, u64, bool, u64, usize) {
        fd_key(self.addr, self.size, self.data, &self.notifier)
    }

    /// QEMU's `memory_region_ioeventfd_equal`: equal starts, and either size
    /// zero (a wildcard) or everything else equal.
    pub(crate) fn matches(&self, other: &IoEventFd) -> bool {
        self.addr == other.addr
            && (self.size == 0
                || other.size == 0
                || (self.size == other.size
                    && self.data == other.data
                    && Arc::ptr_eq(&self.notifier, &other.notifier)))
    }
}

fn fd_key(
    addr: u64,
    size: u64,
    data: Option<u64>,
    n: &Arc<EventNotifier>,
) -> (u64, u64, bool, u64, usize) {
    (
        addr,
        size,
        data.is_some(),
        data.unwrap_or(0),
        Arc::as_ptr(n) as usize,
    )
}

/// An ioeventfd as seen in one address space.
#[derive(Clone)]
pub(crate) struct SpaceFd {
    addr: u64,
    size: u64,
    data: Option<u64>,
    notifier: Arc<EventNotifier>,
    region: RegionId,
}

impl SpaceFd {
    fn key(&self) -> (u64, u64, bool, u64, usize) {
        fd_key(self.addr, self.size, self.data, &self.notifier)
    }
}

/// One coalesced range of a region: offset and length in the region.
pub(crate) type Span = (u64, u128);

/// The registry (ascending priority, stable for equal priorities) and the
/// listener-visible per-region and per-space state.
#[derive(Default)]
pub(crate) struct Listeners {
    pub(crate) list: Vec<Registered>,
    next: u64,
    /// The machine's tag, carried by every `ListenerId` (see `crate::region::ids`).
    pub(crate) machine: u32,
    /// ioeventfds per region, sorted by [`IoEventFd::key`].
    pub(crate) region_fds: HashMap<RegionId, Vec<IoEventFd>>,
    /// The ioeventfds each address space showed at its last update, sorted.
    pub(crate) space_fds: HashMap<SpaceId, Vec<SpaceFd>>,
    /// Coalesced ranges per region, in insertion order.
    pub(crate) coalesced: HashMap<RegionId, Vec<Span>>,
    /// An ioeventfd was added or removed since the last commit.
    pub(crate) ioeventfd_pending: bool,
    /// The regions whose ioeventfds changed since the last commit.
    pub(crate) ioeventfd_regions: Vec<RegionId>,
    /// The regions whose own dirty-log mask was edited since the last
    /// commit (each once): the commit publishes their masks and tells the
    /// spaces showing them, with no render.
    pub(crate) log_regions: Vec<(RegionId, u8)>,
    /// Global dirty logging is on.
    pub(crate) global_dirty_log: bool,
    /// Users of global dirty logging (started and not yet stopped): it
    /// is on while this is nonzero.
    pub(crate) global_dirty_users: u64,
    /// How many times global dirty logging was turned off: a user that
    /// saw the same value twice knows tracking ran without a gap between.
    pub(crate) global_dirty_stops: u64,
}

impl Listeners {
    /// No listeners yet; ids made for the machine tagged `machine`.
    pub(crate) fn for_machine(machine: u32) -> Listeners {
        Listeners {
            machine,
            ..Listeners::default()
        }
    }

    /// Whether a commit has something to do besides rendering: ioeventfd
    /// or dirty-log mask changes.
    pub(crate) fn events_pending(&self) -> bool {
        self.ioeventfd_pending || !self.log_regions.is_empty()
    }

    /// Notes that `region`'s own dirty-log mask was edited; `told` is the
    /// mask listeners last heard (kept from the first edit of the commit).
    pub(crate) fn note_log_mask(&mut self, region: RegionId, told: u8) {
        if !self.log_regions.iter().any(|&(r, _)| r == region) {
            self.log_regions.push((region, told));
        }
    }

    /// Registers `listener` with its `priority` and whether it wants nops
    /// (asked by the caller before it borrowed the topology: it is the
    /// listener's code).
    pub(crate) fn insert(
        &mut self,
        space: SpaceId,
        listener: Arc<dyn MemoryListener>,
        priority: u32,
        wants_nop: bool,
    ) -> ListenerId {
        self.next += 1;
        let id = ListenerId(self.next, self.machine);
        let at = self.list.partition_point(|r| r.priority <= priority);
        self.list.insert(
            at,
            Registered {
                id,
                space,
                listener,
                priority,
                wants_nop,
            },
        );
        id
    }

    pub(crate) fn remove(&mut self, id: ListenerId) -> Option<Registered> {
        let i = self.list.iter().position(|r| r.id == id)?;
        Some(self.list.remove(i))
    }

    pub(crate) fn snapshot(&self) -> Vec<(SpaceId, Arc<dyn MemoryListener>)> {
        self.list
            .iter()
            .map(|r| (r.space, r.listener.clone()))
            .collect()
    }

    /// Listeners of one space, ascending priority.
    pub(crate) fn of_space(&self, space: SpaceId) -> Vec<Arc<dyn MemoryListener>> {
        self.list
            .iter()
            .filter(|r| r.space == space)
            .map(|r| r.listener.clone())
            .collect()
    }

    /// For each listener of [`Listeners::of_space`], whether it wants
    /// `region_nop`.
    pub(crate) fn nop_wishes_of(&self, space: SpaceId) -> Vec<bool> {
        self.list
            .iter()
            .filter(|r| r.space == space)
            .map(|r| r.wants_nop)
            .collect()
    }

    /// The listeners of the spaces `spaces` (sorted), ascending priority:
    /// who hears `begin` / `commit` of a commit that changed only those
    /// spaces' dirty-log masks.
    pub(crate) fn snapshot_of(
        &self,
        spaces: &[SpaceId],
    ) -> Vec<(SpaceId, Arc<dyn MemoryListener>)> {
        self.list
            .iter()
            .filter(|r| spaces.binary_search(&r.space).is_ok())
            .map(|r| (r.space, r.listener.clone()))
            .collect()
    }

    /// Forgets everything (machine teardown). Returns the listeners, for the
    /// caller to drop once the topology is no longer borrowed.
    pub(crate) fn clear(&mut self) -> Vec<Registered> {
        let list = std::mem::take(&mut self.list);
        self.region_fds.clear();
        self.space_fds.clear();
        self.coalesced.clear();
        self.ioeventfd_pending = false;
        self.ioeventfd_regions.clear();
        self.log_regions.clear();
        list
    }

    /// Adds an ioeventfd to a region, keeping QEMU's sort order (after equal
    /// entries).
    pub(crate) fn add_fd(&mut self, region: RegionId, fd: IoEventFd) {
        let list = self.region_fds.entry(region).or_default();
        let at = list.partition_point(|e| e.key() <= fd.key());
        list.insert(at, fd);
        self.ioeventfd_pending = true;
        if !self.ioeventfd_regions.contains(&region) {
            self.ioeventfd_regions.push(region);
        }
    }

    /// Removes the first matching ioeventfd; false if none matches.
    pub(crate) fn del_fd(&mut self, region: RegionId, fd: &IoEventFd) -> bool {
        let Some(list) = self.region_fds.get_mut(&region) else {
            return false;
        };
        let Some(i) = list.iter().position(|e| e.matches(fd)) else {
            return false;
        };
        list.remove(i);
        if list.is_empty() {
            self.region_fds.remove(&region);
        }
        self.ioeventfd_pending = true;
        if !self.ioeventfd_regions.contains(&region) {
            self.ioeventfd_regions.push(region);
        }
        true
    }

    /// Drops per-region state of regions that no longer exist and per-space
    /// state of spaces that no longer exist. Returns the listeners of
    /// spaces that are gone, for the caller to drop once the topology is no
    /// longer borrowed.
    pub(crate) fn prune(
        &mut self,
        region_alive: impl Fn(RegionId) -> bool,
        space_alive: impl Fn(SpaceId) -> bool,
    ) -> Vec<Registered> {
        self.region_fds.retain(|r, _| region_alive(*r));
        self.coalesced.retain(|r, _| region_alive(*r));
        self.space_fds.retain(|s, _| space_alive(*s));
        let (keep, gone) = std::mem::take(&mut self.list)
            .into_iter()
            .partition(|l| space_alive(l.space));
        self.list = keep;
        gone
    }

    /// Recomputes the ioeventfds `view` shows (QEMU's
    /// `address_space_update_ioeventfds`), stores them as the space's current
    /// set and returns the symmetric difference with the previous set, in
    /// merge order: `(true, fd)` to add, `(false, fd)` to delete.
    pub(crate) fn update_space_fds(
        &mut self,
        space: SpaceId,
        view: &FlatView,
    ) -> Vec<(bool, SpaceFd)> {
        let mut new: Vec<SpaceFd> = Vec::new();
        if !self.region_fds.is_empty() {
            for fr in view.iter() {
                if let Some(fds) = self.region_fds.get(&fr.region().id()) {
                    fds_in_range(fr, fds, &mut new);
                }
            }
            new.sort_by_key(SpaceFd::key);
        }
        self.replace_space_fds(space, new)
    }

    /// [`Listeners::update_space_fds`] when only the ioeventfds of
    /// `regions` changed and `view` is the one the space's set was computed
    /// from: the other regions' entries are kept, and only the ranges of
    /// `regions` are looked at ([`FlatView::ranges_of`]), so a commit that
    /// only adds or removes ioeventfds costs what they touch.
    pub(crate) fn update_space_fds_of(
        &mut self,
        space: SpaceId,
        view: &FlatView,
        regions: &[RegionId],
    ) -> Vec<(bool, SpaceFd)> {
        let mut new: Vec<SpaceFd> = self
            .space_fds
            .get(&space)
            .map(|o| {
                o.iter()
                    .filter(|f| !regions.contains(&f.region))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for r in regions {
            if let Some(fds) = self.region_fds.get(r) {
                for fr in view.ranges_of(*r) {
                    fds_in_range(fr, fds, &mut new);
                }
            }
        }
        new.sort_by_key(SpaceFd::key);
        self.replace_space_fds(space, new)
    }

    /// [`Listeners::update_space_fds`] for a view `new` spliced from `old`,
    /// the view the space's set was computed from, with no ioeventfd change:
    /// the entries of the old ranges of each span give way to those of its
    /// new ranges; the rest of the view is the same ranges.
    pub(crate) fn update_space_fds_spliced(
        &mut self,
        space: SpaceId,
        old: &FlatView,
        new: &FlatView,
        spans: &SpliceSpans,
    ) -> Vec<(bool, SpaceFd)> {
        if self.region_fds.is_empty() {
            return self.replace_space_fds(space, Vec::new());
        }
        let (mut gone, mut came) = (Vec::new(), Vec::new());
        for (o, n) in &spans.spans {
            for (view, part, out) in [(old, o, &mut gone), (new, n, &mut came)] {
                for fr in part.clone().filter_map(|i| view.range(i)) {
                    if let Some(fds) = self.region_fds.get(&fr.region().id()) {
                        fds_in_range(fr, fds, out);
                    }
                }
            }
        }
        gone.sort_by_key(SpaceFd::key);
        let mut next: Vec<SpaceFd> = Vec::new();
        let mut g = gone.iter().peekable();
        for f in self.space_fds.get(&space).map_or(&[][..], Vec::as_slice) {
            while g.next_if(|x| x.key() < f.key()).is_some() {}
            if g.next_if(|x| x.key() == f.key()).is_none() {
                next.push(f.clone());
            }
        }
        next.extend(came);
        next.sort_by_key(SpaceFd::key);
        self.replace_space_fds(space, next)
    }

    /// Stores `new` (sorted) as the space's set; the symmetric difference
    /// with the previous one.
    fn replace_space_fds(&mut self, space: SpaceId, new: Vec<SpaceFd>) -> Vec<(bool, SpaceFd)> {
        let old = match self.space_fds.get(&space) {
            Some(o) => o.as_slice(),
            None if new.is_empty() => return Vec::new(),
            None => &[],
        };
        let mut out = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            match (old.get(i), new.get(j)) {
                (Some(a), b) if !matches!(b, Some(b) if b.key() <= a.key()) => {
                    out.push((false, a.clone()));
                    i += 1;
                }
                (a, Some(b)) if !matches!(a, Some(a) if a.key() <= b.key()) => {
                    out.push((true, b.clone()));
                    j += 1;
                }
                _ => {
                    i += 1;
                    j += 1;
                }
            }
        }
        if new.is_empty() {
            self.space_fds.remove(&space);
        } else {
            self.space_fds.insert(space, new);
        }
        out
    }

    /// The space's current ioeventfds.
    pub(crate) fn fds_of(&self, space: SpaceId) -> Vec<SpaceFd> {
        self.space_fds.get(&space).cloned().unwrap_or_default()
    }
}

/// The ioeventfds of `fds` (the region of `fr`) that range `fr` shows,
/// appended to `out` in address-space coordinates.
fn fds_in_range(fr: &FlatRange, fds: &[IoEventFd], out: &mut Vec<SpaceFd>) {
    let delta = i128::from(fr.start()) - i128::from(fr.offset_in_region());
    let (rs, re) = (i128::from(fr.start()), i128::from(fr.last()) + 1);
    for fd in fds {
        let s = i128::from(fd.addr) + delta;
        let e = s + i128::from(fd.size);
        // QEMU's addrrange_intersects: either contains the other's start.
        let hit = (s <= rs && rs < e) || (rs <= s && s < re);
        let Ok(addr) = u64::try_from(s) else { continue };
        if hit {
            out.push(SpaceFd {
                addr,
                size: fd.size,
                data: fd.data,
                notifier: fd.notifier.clone(),
                region: fr.region().id(),
            });
        }
    }
}

/// Converts ioeventfd match data from the target's byte order to the
/// region's device byte order (a byte swap of the low `size` bytes when they
/// differ).
pub(crate) fn swap_data(data: u64, size: u64) -> u64 {
    match size {
        2 => u64::from((data as u16).swap_bytes()),
        4 => u64::from((data as u32).swap_bytes()),
        8 => data.swap_bytes(),
        _ => data,
    }
}

/// QEMU's `flatrange_equal`: everything but the dirty-log mask.
fn same_range(a: &FlatRange, b: &FlatRange) -> bool {
    a.start == b.start
        && a.last == b.last
        && Arc::ptr_eq(&a.region, &b.region)
        && a.offset_in_region == b.offset_in_region
        && a.attrs.readonly == b.attrs.readonly
        && a.attrs.romd_mode == b.attrs.romd_mode
        && a.attrs.nonvolatile == b.attrs.nonvolatile
        && a.attrs.unmergeable == b.attrs.unmergeable
}

/// The part of coalesced span `span` (region coordinates) that range `fr`
/// shows, in address-space coordinates: `(addr, len)`.
fn coalesced_in(fr: &FlatRange, span: Span) -> Option<(u64, u128)> {
    let delta = i128::from(fr.start) - i128::from(fr.offset_in_region);
    let s = i128::from(span.0) + delta;
    let e = s + span.1 as i128;
    let (rs, re) = (i128::from(fr.start), i128::from(fr.last) + 1);
    if !((s <= rs && rs < e) || (rs <= s && s < re)) {
        return None;
    }
    let (is, ie) = (s.max(rs), e.min(re));
    Some((u64::try_from(is).ok()?, u128::try_from(ie - is).ok()?))
}

/// Tells `listeners` (ascending priority) about the coalesced parts of `fr`:
/// additions forward, deletions in reverse (QEMU's
/// `flat_range_coalesced_io_{add,del}`).
pub(crate) fn notify_coalesced(
    catch: &Catch<'_>,
    s: &Section<'_>,
    spans: &[Span],
    listeners: &[Arc<dyn MemoryListener>],
    adding: bool,
) {
    for &span in spans {
        let Some((addr, len)) = coalesced_in(s.range, span) else {
            continue;
        };
        if adding {
            for l in listeners {
                catch.call(l, "coalesced_io_add", |l| l.coalesced_io_add(s, addr, len));
            }
        } else {
            for l in listeners.iter().rev() {
                catch.call(l, "coalesced_io_del", |l| l.coalesced_io_del(s, addr, len));
            }
        }
    }
}

/// Calls listener callbacks one at a time, catching a panic of each: the
/// panic is recorded in the census (which listener, which callback) and
/// kept for the caller of the machine operation (`crate::lifecycle::deferral::raise`),
/// and the caller of `call` carries on with the next callback, so every
/// listener still gets its whole sequence and memtree's views stay
/// consistent.
pub(crate) struct Catch<'a> {
    pub(crate) census: &'a Census,
}

impl Catch<'_> {
    pub(crate) fn call(
        &self,
        l: &Arc<dyn MemoryListener>,
        what: &'static str,
        f: impl FnOnce(&dyn MemoryListener),
    ) {
        if let Err(p) = catch(|| f(&**l)) {
            let name = catch(|| l.name().to_owned())
                .unwrap_or_else(|_| "(a listener whose name() panics)".to_owned());
            self.census.record_panic(format!(
                "listener \"{name}\" panicked in {what}: {}",
                panic_message(&p)
            ));
            raise(p);
        }
    }
}

/// The regions whose own dirty-log mask a commit changed, with the mask
/// listeners last heard (the new one is the region core's by then: the
/// commit publishes masks before any callback). Sorted by region.
#[derive(Default, Debug)]
pub(crate) struct LogChanges {
    pub(crate) old: Vec<(RegionId, u8)>,
}

impl LogChanges {
    pub(crate) fn is_empty(&self) -> bool {
        self.old.is_empty()
    }

    /// The old own mask of `region`, if the commit changed it.
    fn old_of(&self, region: RegionId) -> Option<u8> {
        if self.old.is_empty() {
            return None;
        }
        self.old
            .binary_search_by_key(&region, |&(r, _)| r)
            .ok()
            .map(|i| self.old[i].1)
    }

    fn contains(&self, fr: &FlatRange) -> bool {
        !self.old.is_empty() && self.old_of(fr.region.id()).is_some()
    }

    /// For a range kept from `a` (old view) to `b` (new view): the mask
    /// listeners were last told and the mask now, or `None` when they
    /// cannot differ. Reads nothing behind the ranges (their region cores)
    /// unless a mask changed: a walk over many shared ranges touches only
    /// the leaves' arrays.
    fn kept_masks(&self, a: &FlatRange, b: &FlatRange) -> Option<(u8, u8)> {
        let changed = if self.old.is_empty() {
            None
        } else {
            self.old_of(a.region.id())
        };
        if changed.is_none() && std::ptr::eq(a, b) {
            // A range shared by both views: nothing about it can differ
            // (and the walk does not even read it).
            return None;
        }
        let (ga, gb) = (a.global_log_mask(), b.global_log_mask());
        if changed.is_none() && ga == gb {
            return None;
        }
        let own = b.region.dirty_log_mask();
        Some((changed.unwrap_or(own) | ga, own | gb))
    }

    /// Positions (ascending) of the ranges of `view` whose region's mask
    /// changed. The incremental path (`walk == false`) looks only at the
    /// views whose reached set holds a changed region's slot, and there
    /// at that region's ranges (`FlatView::positions_of`); the reference
    /// path walks every range.
    pub(crate) fn positions_in(&self, view: &FlatView, walk: bool) -> Vec<usize> {
        if self.old.is_empty() {
            return Vec::new();
        }
        if walk {
            return view
                .iter()
                .enumerate()
                .filter(|(_, r)| self.contains(r))
                .map(|(i, _)| i)
                .collect();
        }
        let slots: Vec<u32> = self.old.iter().map(|(r, _)| r.index).collect();
        if !view.reached_any_slot(&slots) {
            return Vec::new();
        }
        let mut out: Vec<usize> = Vec::new();
        for (r, _) in &self.old {
            out.extend_from_slice(view.positions_of(*r));
        }
        out.sort_unstable();
        out
    }
}

/// What the diff needs to know about one address space.
pub(crate) struct SpaceCtx<'a> {
    pub(crate) space: SpaceId,
    pub(crate) name: &'a str,
    /// Listeners of this space, ascending priority.
    pub(crate) listeners: &'a [Arc<dyn MemoryListener>],
    /// For each of `listeners`, whether it wants `region_nop` (empty: none
    /// does).
    pub(crate) wants_nop: &'a [bool],
    /// Coalesced ranges per region (the topology's current state).
    pub(crate) coalesced: &'a HashMap<RegionId, Vec<Span>>,
    /// The dirty-log mask changes of the commit.
    pub(crate) log_changes: &'a LogChanges,
    /// How the callbacks are called.
    pub(crate) catch: &'a Catch<'a>,
}

impl SpaceCtx<'_> {
    fn spans(&self, fr: &FlatRange) -> &[Span] {
        self.coalesced
            .get(&fr.region.id())
            .map_or(&[], |v| v.as_slice())
    }

    /// Whether some listener of the space wants `region_nop`.
    fn any_nop(&self) -> bool {
        self.wants_nop.iter().any(|&w| w)
    }

    fn section<'v>(&'v self, range: &'v FlatRange, view: &'v Arc<FlatView>) -> Section<'v> {
        Section {
            space: self.space,
            space_name: self.name,
            range,
            view,
            log_mask: range.dirty_log_mask(),
        }
    }

    /// The section of a range the commit removes: with the mask it had
    /// before the commit.
    fn removed_section<'v>(&'v self, range: &'v FlatRange, view: &'v Arc<FlatView>) -> Section<'v> {
        let log_mask = self
            .log_changes
            .old_of(range.region.id())
            .map_or(range.dirty_log_mask(), |own| own | range.global_log_mask());
        Section {
            log_mask,
            ..self.section(range, view)
        }
    }

    /// `region_nop` to the listeners that want it.
    fn nop(&self, s: &Section<'_>) {
        for (l, _) in self
            .listeners
            .iter()
            .zip(self.wants_nop)
            .filter(|(_, &w)| w)
        {
            self.catch.call(l, "region_nop", |l| l.region_nop(s));
        }
    }

    /// QEMU's log-mask part of the addition pass for a range kept from
    /// mask `om` to mask `nm`: `log_start` forward, `log_stop` in reverse.
    fn log_change(&self, s: &Section<'_>, om: u8, nm: u8) {
        if nm & !om != 0 {
            for l in self.listeners {
                self.catch.call(l, "log_start", |l| l.log_start(s, om, nm));
            }
        }
        if om & !nm != 0 {
            for l in self.listeners.iter().rev() {
                self.catch.call(l, "log_stop", |l| l.log_stop(s, om, nm));
            }
        }
    }

    /// A range the commit keeps (the same in the old view `a` and the new
    /// `b`): QEMU's nop and log-mask change.
    fn kept(&self, a: &FlatRange, b: &FlatRange, old: &Arc<FlatView>) {
        let s = self.section(b, old);
        self.nop(&s);
        if let Some((om, nm)) = self.log_changes.kept_masks(a, b) {
            self.log_change(&s, om, nm);
        }
    }
}

/// Runs QEMU's two diff passes for one address space.
pub(crate) fn diff_and_notify(cx: &SpaceCtx<'_>, old: &Arc<FlatView>, new: &Arc<FlatView>) {
    if cx.listeners.is_empty() {
        return;
    }
    let o: Vec<&FlatRange> = old.iter().collect();
    let n: Vec<&FlatRange> = new.iter().collect();
    deletions(cx, old, &o, &n);
    nops_and_additions(cx, old, &o, &n);
}

/// The same callbacks as [`diff_and_notify`] for a view `new` spliced from
/// `old`: only the edited spans are compared; every range outside them is
/// the same range in both views, which the full diff would pair as a kept
/// range: a nop (for the listeners that want nops) and a log-mask change
/// when its region's mask changed. With no listener wanting nops and no
/// mask change those ranges are not even visited: the diff costs the spans.
pub(crate) fn diff_spliced_and_notify(
    cx: &SpaceCtx<'_>,
    old: &Arc<FlatView>,
    new: &Arc<FlatView>,
    spans: &SpliceSpans,
) {
    if cx.listeners.is_empty() {
        return;
    }
    fn part<'v>(v: &'v FlatView, r: &std::ops::Range<usize>) -> Vec<&'v FlatRange> {
        r.clone().filter_map(|i| v.range(i)).collect()
    }
    // Pass 1: the full diff deletes only inside the spans (outside them
    // both walks advance in step over equal ranges).
    for (o, n) in &spans.spans {
        deletions(cx, old, &part(old, o), &part(new, n));
    }
    // Pass 2, forward in address order: the shared ranges before each
    // span, then the span's own walk. A shared range is its own old range
    // (the same `FlatRange`, shared by both views).
    if cx.any_nop() {
        // Every shared range, walked in order through the leaves (with no
        // mask change, a nop is all a shared range can get).
        let masks = !cx.log_changes.is_empty();
        let shared = |b: &FlatRange| {
            if masks {
                cx.kept(b, b, old);
            } else {
                cx.nop(&cx.section(b, old));
            }
        };
        let mut ranges = new.iter();
        let mut pos = 0usize;
        for (o, n) in &spans.spans {
            while pos < n.start {
                let Some(b) = ranges.next() else { break };
                shared(b);
                pos += 1;
            }
            nops_and_additions(cx, old, &part(old, o), &part(new, n));
            for _ in n.clone() {
                ranges.next();
            }
            pos = n.end;
        }
        for b in ranges {
            shared(b);
        }
    } else {
        // Only the shared ranges whose mask changed (their positions in
        // `new`; none looked up when no mask changed); the others are not
        // visited.
        let mut logged = cx
            .log_changes
            .positions_in(new, false)
            .into_iter()
            .peekable();
        for (o, n) in &spans.spans {
            while let Some(p) = logged.next_if(|&p| p < n.start) {
                if let Some(b) = new.range(p) {
                    cx.kept(b, b, old);
                }
            }
            nops_and_additions(cx, old, &part(old, o), &part(new, n));
            while logged.next_if(|&p| p < n.end).is_some() {}
        }
        for b in logged.filter_map(|p| new.range(p)) {
            cx.kept(b, b, old);
        }
    }
}

/// A commit that left the space's view as it was but changed the own
/// dirty-log mask of regions it shows, at `positions` (ascending, from
/// [`LogChanges::positions_in`]): what the full diff of the view with
/// itself gives, the kept-range callbacks (nops to the listeners that want
/// them, for every range) with `log_start` / `log_stop` for those ranges.
pub(crate) fn notify_log_changes(cx: &SpaceCtx<'_>, view: &Arc<FlatView>, positions: &[usize]) {
    if cx.listeners.is_empty() || positions.is_empty() {
        return;
    }
    if cx.any_nop() {
        for r in view.iter() {
            cx.kept(r, r, view);
        }
    } else {
        for r in positions.iter().filter_map(|&p| view.range(p)) {
            cx.kept(r, r, view);
        }
    }
}

/// QEMU's first pass over `o` (old) and `n` (new, both sorted): deletions,
/// in reverse listener order.
fn deletions(cx: &SpaceCtx<'_>, old: &Arc<FlatView>, o: &[&FlatRange], n: &[&FlatRange]) {
    let listeners = cx.listeners;
    let (mut i, mut j) = (0, 0);
    while i < o.len() || j < n.len() {
        match (o.get(i).copied(), n.get(j).copied()) {
            (Some(a), Some(b)) if same_range(a, b) => {
                i += 1;
                j += 1;
            }
            (Some(a), b) if !matches!(b, Some(b) if b.start < a.start) => {
                let s = cx.removed_section(a, old);
                notify_coalesced(cx.catch, &s, cx.spans(a), listeners, false);
                for l in listeners.iter().rev() {
                    cx.catch.call(l, "region_del", |l| l.region_del(&s));
                }
                i += 1;
            }
            (_, Some(_)) => j += 1,
            (Some(_), None) | (None, None) => break,
        }
    }
}

/// QEMU's second pass: nops (with log-mask changes) and additions, forward.
fn nops_and_additions(cx: &SpaceCtx<'_>, old: &Arc<FlatView>, o: &[&FlatRange], n: &[&FlatRange]) {
    let listeners = cx.listeners;
    let (mut i, mut j) = (0, 0);
    while i < o.len() || j < n.len() {
        match (o.get(i).copied(), n.get(j).copied()) {
            (Some(a), Some(b)) if same_range(a, b) => {
                cx.kept(a, b, old);
                i += 1;
                j += 1;
            }
            (Some(a), b) if !matches!(b, Some(b) if b.start < a.start) => i += 1,
            (_, Some(b)) => {
                let s = cx.section(b, old);
                for l in listeners {
                    cx.catch.call(l, "region_add", |l| l.region_add(&s));
                }
                notify_coalesced(cx.catch, &s, cx.spans(b), listeners, true);
                j += 1;
            }
            (Some(_), None) | (None, None) => break,
        }
    }
}

/// Sends an ioeventfd difference: `eventfd_del` forward, `eventfd_add` in
/// reverse listener order (QEMU's order: removals run from the last
/// listener to the first, additions from the first to the last).
pub(crate) fn notify_fds(cx: &SpaceCtx<'_>, view: &Arc<FlatView>, changes: &[(bool, SpaceFd)]) {
    for (adding, fd) in changes {
        let s = fd_section(cx.space, cx.name, fd, view);
        if *adding {
            for l in cx.listeners.iter().rev() {
                cx.catch.call(l, "eventfd_add", |l| l.eventfd_add(&s));
            }
        } else {
            for l in cx.listeners {
                cx.catch.call(l, "eventfd_del", |l| l.eventfd_del(&s));
            }
        }
    }
}

fn fd_section<'a>(
    space: SpaceId,
    name: &'a str,
    fd: &'a SpaceFd,
    view: &'a Arc<FlatView>,
) -> EventfdSection<'a> {
    EventfdSection {
        space,
        space_name: name,
        region: fd.region,
        addr: fd.addr,
        size: fd.size,
        data: fd.data,
        notifier: &fd.notifier,
        view,
    }
}

/// Replays a space's state to one listener as additions (`adding`) or
/// deletions (QEMU's `listener_add_address_space` /
/// `listener_del_address_space`).
pub(crate) fn replay(
    cx: &SpaceCtx<'_>,
    view: &Arc<FlatView>,
    fds: &[SpaceFd],
    global_dirty_log: bool,
    listener: &Arc<dyn MemoryListener>,
    adding: bool,
) {
    let one = std::slice::from_ref(listener);
    let catch = cx.catch;
    catch.call(listener, "begin", |l| l.begin());
    if adding && global_dirty_log {
        // QEMU aborts when a listener refuses here; we carry on: the listener
        // was told, and its refusal has no one to go to.
        catch.call(listener, "log_global_start", |l| {
            let _ = l.log_global_start();
        });
    }
    for range in view.iter() {
        let mask = range.dirty_log_mask();
        let s = Section {
            space: cx.space,
            space_name: cx.name,
            range,
            view,
            log_mask: mask,
        };
        if adding {
            catch.call(listener, "region_add", |l| l.region_add(&s));
            notify_coalesced(catch, &s, cx.spans(range), one, true);
            if mask != 0 {
                catch.call(listener, "log_start", |l| l.log_start(&s, 0, mask));
            }
        } else {
            if mask != 0 {
                catch.call(listener, "log_stop", |l| l.log_stop(&s, mask, 0));
            }
            notify_coalesced(catch, &s, cx.spans(range), one, false);
            catch.call(listener, "region_del", |l| l.region_del(&s));
        }
    }
    for fd in fds {
        let s = fd_section(cx.space, cx.name, fd, view);
        if adding {
            catch.call(listener, "eventfd_add", |l| l.eventfd_add(&s));
        } else {
            catch.call(listener, "eventfd_del", |l| l.eventfd_del(&s));
        }
    }
    catch.call(listener, "commit", |l| l.commit());
}
