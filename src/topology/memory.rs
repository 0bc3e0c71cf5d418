//! The machine's memory system: the control-plane entry point.
//!
//! [`Memory`] is the one strong handle to a machine's memory system, held by
//! whoever builds the machine. It is deliberately not `Clone`: devices get a
//! [`WeakMemory`], whose [`WeakMemory::upgrade`] returns a [`MemoryRef`] that
//! borrows the weak handle, so device state (which must be `'static`) cannot
//! store a strong reference to the machine. That is what makes
//! "device → machine → region → device" cycles impossible to write by
//! accident. (Deliberately leaking a `WeakMemory` to get a
//! `MemoryRef<'static>` defeats this; even then teardown of the `Memory`
//! clears the topology, which breaks the cycle.)
//!
//! Every edit goes through [`Machine`] (which both handles dereference to). An
//! edit outside a transaction is its own transaction; [`Machine::begin`] opens
//! a nested one, and only the outermost commit renders and publishes.
//!
//! # Locking
//!
//! One re-entrant writer lock per machine guards the topology. It is held for
//! the whole of a transaction (so writers are serialised and a transaction's
//! edits are atomic to other writers) and re-entered by the same thread, so a
//! device callback that runs inside a transaction on the writer's own thread
//! can still edit. Readers (dispatch, DMA) never take it. Listener callbacks
//! run with the lock held but the topology not borrowed; an edit from a
//! listener is refused with [`TopologyError::ListenerReentry`].
//!
//! # Other people's code: where it runs
//!
//! memtree runs code it does not control: listener callbacks, owner
//! finalizers, and the `Drop` of device state (an `MmioOps`, a finalizer
//! closure, a listener) when memtree lets go of the last reference. None of
//! it ever runs while the topology is borrowed:
//!
//! * listener callbacks run during a commit with the writer lock held but
//!   the topology not borrowed (they may query the machine; an edit is
//!   refused with [`TopologyError::ListenerReentry`]);
//! * whatever an edit releases (region cores and with them device state,
//!   replaced finalizers, unregistered listeners, replaced views) is
//!   queued and dropped when the operation ends, after the writer lock is
//!   released; finalizers of owners finalized on the way run then too, in
//!   drop order. Both may use the machine like any other code, edits
//!   included;
//! * device configuration hooks (`MmioOps::impl_sizes`, `valid_sizes`,
//!   `endianness`, `accepts_everything`) are read once, before the edit
//!   that creates the region borrows the topology, and a listener's
//!   `priority` before it is registered.
//!
//! The machine's read-only queries ([`Machine::region_count`],
//! [`Machine::address_spaces`], ...) and [`Machine::begin`] are therefore
//! usable from all of these.
//!
//! # Panics
//!
//! Any of that code may panic. memtree catches each call on its own, keeps
//! going, and reports the panic once it is consistent again:
//!
//! * a listener that panics in a callback gets the rest of its sequence,
//!   every other listener gets its whole sequence, every address space's
//!   view is published, every listener gets `commit`;
//! * a finalizer or a device's `Drop` that panics does not stop the
//!   others: every finalizer runs exactly once and every queued drop
//!   happens, whatever another one does;
//! * each such panic is recorded in the census ([`Census::panics`], which
//!   leak reports include: a machine that saw one never reports clean);
//! * then the first panic is re-raised (`resume_unwind`, with the original
//!   payload) from the machine method that ran the code: an edit
//!   (`add_subregion`, `unplug`, `destroy_region`, ...), the outermost
//!   [`Transaction::commit`] or [`Machine::transaction`],
//!   `register_listener`, `unregister_listener`, the coalescing and
//!   dirty-log methods. By then the operation is complete (its return value
//!   is lost) and the machine is consistent and usable: the caller may
//!   catch the panic and go on. If the thread is already unwinding (a
//!   [`Transaction`] dropped by a panic commits), the panic is only
//!   recorded. [`Memory::teardown`] never unwinds: it returns the panics in
//!   [`LeakReport::panics`]; dropping a [`Memory`] re-raises like an edit.
//!
//! Panics of device callbacks during guest accesses and DMA run on the
//! data plane, outside any of this, and unwind to the accessor.
//!
//! Misuse that is a programming error, not a recoverable condition: a
//! panic payload whose own `Drop` panics (Rust aborts), and code running
//! with `panic = "abort"` (nothing can be caught).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::{Arc, Weak};

use parking_lot::{ReentrantMutex, ReentrantMutexGuard};

use crate::access::space::{AddressSpace, MachineData};
use crate::host::backend::MemoryBackend;
use crate::host::ram::RamBacking;
use crate::lifecycle::census::Census;
use crate::lifecycle::deferral::{defer_drop, defer_drop_recorded, Deferral, Payload};
use crate::lifecycle::diag::LeakReport;
use crate::region::attrs::{Endian, MmioOps};
use crate::region::ids::{OwnerId, RegionId, SpaceId};
use crate::region::owner_core::{Finalizer, OwnerLabel};
use crate::region::region_core::{Backing, RegionCore, RegionInfo, RegionKind};
use crate::render::flatten as render;
use crate::render::listener::{
    self, EventNotifier, IoEventFd, ListenerId, MemoryListener, SpaceCtx,
};
use crate::topology::error::TopologyError;
use crate::topology::tree::{Topology, UnplugReport};
use crate::view::flatview::{FlatView, SpliceSpans};

type Result<T> = std::result::Result<T, TopologyError>;

/// The memory system shared by [`Memory`], [`MemoryRef`] and transactions.
///
/// Every edit is a method of `Machine`; [`Memory`] and [`MemoryRef`]
/// dereference to it. Edits inside a [`Transaction`] publish together:
///
/// ```
/// use memtree::Memory;
///
/// let memory = Memory::new();
/// let system = memory.new_container("system", 1 << 32, None).unwrap();
/// let space = memory.new_address_space("memory", system, None).unwrap();
/// let low = memory.new_ram("low", 0x1000, None).unwrap();
/// let high = memory.new_ram("high", 0x1000, None).unwrap();
/// {
///     let tx = memory.begin();
///     tx.add_subregion(system, 0, low).unwrap();
///     tx.add_subregion(system, 0x8000, high).unwrap();
///     tx.commit(); // one render, one publication
/// }
/// let view = memory.address_space(space).unwrap().view();
/// assert_eq!(view.len(), 2);
/// assert_eq!(memory.region_info(high).unwrap().addr, 0x8000);
/// ```
pub struct Machine {
    pub(crate) control: ReentrantMutex<RefCell<Topology>>,
    data: Arc<MachineData>,
    /// Which spaces a commit can change (`crate::topology::space_index`); locked
    /// only inside the commit, under `control`.
    spaces_index: parking_lot::Mutex<crate::topology::space_index::SpaceIndex>,
}

/// The owning handle of a machine's memory system. Not `Clone`: see the
/// module docs. Dropping it tears the machine down.
///
/// ```
/// use memtree::{MemTxAttrs, Memory};
///
/// // Build: a system container with 1 MiB of RAM, and its address space.
/// let memory = Memory::new();
/// let system = memory.new_container("system", 1 << 64, None).unwrap();
/// let ram = memory.new_ram("pc.ram", 0x10_0000, None).unwrap();
/// memory.add_subregion(system, 0, ram).unwrap();
/// let space = memory.new_address_space("memory", system, None).unwrap();
///
/// // Access through the data-plane handle.
/// let bus = memory.address_space(space).unwrap();
/// bus.write(0x100, b"hi", MemTxAttrs::UNSPECIFIED).into_result().unwrap();
/// drop(bus);
///
/// // Tear down: nothing may survive.
/// assert!(memory.teardown().is_clean());
/// ```
pub struct Memory {
    machine: Arc<Machine>,
}

/// A weak handle for devices: does not keep the machine alive.
#[derive(Clone)]
pub struct WeakMemory(Weak<Machine>);

/// A temporary strong handle, borrowed from a [`WeakMemory`].
pub struct MemoryRef<'a> {
    machine: Arc<Machine>,
    _borrow: PhantomData<&'a WeakMemory>,
}

impl WeakMemory {
    /// The machine, if it has not been torn down.
    pub fn upgrade(&self) -> Option<MemoryRef<'_>> {
        self.0.upgrade().map(|machine| MemoryRef {
            machine,
            _borrow: PhantomData,
        })
    }
}

impl fmt::Debug for WeakMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WeakMemory")
    }
}

impl fmt::Debug for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Machine")
            .field("regions", &self.region_count())
            .field("target_endian", &self.data.target_endian)
            .finish()
    }
}

impl fmt::Debug for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.machine.fmt(f)
    }
}

impl fmt::Debug for MemoryRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.machine.fmt(f)
    }
}

impl fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Transaction")
    }
}

impl Deref for MemoryRef<'_> {
    type Target = Machine;
    fn deref(&self) -> &Machine {
        &self.machine
    }
}

impl Deref for Memory {
    type Target = Machine;
    fn deref(&self) -> &Machine {
        &self.machine
    }
}

impl Default for Memory {
    fn default() -> Self {
        Memory::new()
    }
}

impl Memory {
    /// A new, empty memory system for a little-endian guest.
    pub fn new() -> Memory {
        Memory::with_target_endian(Endian::Little)
    }

    /// A new, empty memory system for a guest of the given byte order
    /// (`Little` or `Big`; `Native` here means the host's).
    pub fn with_target_endian(target_endian: Endian) -> Memory {
        let target_endian = target_endian.resolve(Endian::HOST);
        let census = Arc::new(Census::new());
        let dma = Arc::new(crate::host::mapping_table::MappingTable::new());
        census.set_source(dma.clone());
        let data = Arc::new(MachineData {
            census: census.clone(),
            target_endian,
            empty_view: Arc::new(FlatView::empty()),
            dma,
        });
        let topo = Topology::new(data.clone());
        Memory {
            machine: Arc::new(Machine {
                control: ReentrantMutex::new(RefCell::new(topo)),
                data,
                spaces_index: Default::default(),
            }),
        }
    }

    /// A weak handle for device state.
    pub fn downgrade(&self) -> WeakMemory {
        WeakMemory(Arc::downgrade(&self.machine))
    }

    /// Tears the machine down and reports every object still alive
    /// afterwards, with the chain of holders that keeps it.
    ///
    /// Teardown never unwinds: a listener, finalizer or device `Drop` that
    /// panics during it is recorded in the report's
    /// [`LeakReport::panics`] (so the report is not clean).
    pub fn teardown(self) -> LeakReport {
        self.machine.teardown().0
    }
}

impl Drop for Memory {
    /// Tears the machine down (unless [`Memory::teardown`] did). The first
    /// panic of other people's code during teardown is re-raised once the
    /// teardown is complete, unless the thread is already unwinding (it is
    /// in the census either way).
    fn drop(&mut self) {
        if let (_, Some(p)) = self.machine.teardown() {
            if !std::thread::panicking() {
                std::panic::resume_unwind(p);
            }
        }
    }
}

/// A transaction: edits made while it is open are published together when
/// the outermost transaction commits (on [`Transaction::commit`] or drop).
pub struct Transaction<'m> {
    machine: &'m Machine,
    _lock: ReentrantMutexGuard<'m, RefCell<Topology>>,
    done: bool,
}

impl Transaction<'_> {
    /// Commits (publishes if this is the outermost transaction).
    ///
    /// # Panics
    ///
    /// Re-raises the first panic of a listener, finalizer or device `Drop`
    /// that the commit ran, after the commit is complete (see the
    /// [module docs](self), "Panics"). Dropping an uncommitted transaction
    /// commits too; it re-raises likewise unless the thread is already
    /// unwinding.
    pub fn commit(mut self) {
        self.done = true;
        self.machine.end_transaction();
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.machine.end_transaction();
        }
    }
}

impl Deref for Transaction<'_> {
    type Target = Machine;
    fn deref(&self) -> &Machine {
        self.machine
    }
}

impl Machine {
    // ---- plumbing ----------------------------------------------------------

    /// Runs `f` on the topology as one edit: refused during a listener
    /// callback; committed at once if no transaction is open. What the edit
    /// releases drops, and finalizers run, when it ends; then the first
    /// panic of other people's code is re-raised (module docs, "Panics").
    /// `f` itself must run no code memtree does not own.
    pub(crate) fn edit<T>(&self, f: impl FnOnce(&mut Topology) -> Result<T>) -> Result<T> {
        // Declared before the lock guard: deferred drops and owner
        // finalizers run after it, then a caught panic is re-raised.
        let _defer = Deferral::enter();
        let guard = self.control.lock();
        let out = {
            let mut topo = guard
                .try_borrow_mut()
                .map_err(|_| TopologyError::ListenerReentry)?;
            if topo.in_commit {
                return Err(TopologyError::ListenerReentry);
            }
            f(&mut topo)?
        };
        let commit_now = {
            let topo = guard.borrow();
            topo.depth == 0 && (topo.pending || topo.listeners.events_pending())
        };
        if commit_now {
            self.commit_locked(&guard);
        }
        Ok(out)
    }

    /// Drops a listener the machine let go of once the operation ends
    /// (recording a panic of its `Drop`).
    fn defer_listener_drop(&self, l: Arc<dyn MemoryListener>) {
        defer_drop_recorded(&self.data.census, "a listener", l);
    }

    /// Reads the topology under the writer lock.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Topology) -> T) -> T {
        let guard = self.control.lock();
        let topo = guard.borrow();
        f(&topo)
    }

    /// Opens a (nested) transaction. Usable from listener callbacks,
    /// finalizers and the `Drop` of device state (see the
    /// [module docs](self)).
    pub fn begin(&self) -> Transaction<'_> {
        let lock = self.control.lock();
        lock.borrow_mut().depth += 1;
        Transaction {
            machine: self,
            _lock: lock,
            done: false,
        }
    }

    /// Runs `f` inside one transaction.
    ///
    /// # Panics
    ///
    /// As [`Transaction::commit`]; a panic of `f` itself commits what `f`
    /// did and goes on unwinding.
    pub fn transaction<T>(&self, f: impl FnOnce(&Machine) -> T) -> T {
        let t = self.begin();
        let out = f(self);
        t.commit();
        out
    }

    fn end_transaction(&self) {
        let _defer = Deferral::enter();
        let guard = self.control.lock();
        let commit_now = {
            let mut topo = guard.borrow_mut();
            topo.depth = topo.depth.saturating_sub(1);
            topo.depth == 0 && (topo.pending || topo.listeners.events_pending())
        };
        if commit_now {
            self.commit_locked(&guard);
        }
    }

    /// The outermost commit (QEMU's `memory_region_transaction_commit` at
    /// depth 0): when the topology changed, render what changed, then
    /// `begin` on every listener, per address space (creation order) the
    /// diff, the publication and the ioeventfd update, then `commit` on every
    /// listener. When only ioeventfds changed, just the ioeventfd updates;
    /// when dirty-log masks changed, their publication into the region
    /// cores, then `log_start` / `log_stop` for the spaces that show them
    /// (no render; `begin` / `commit` only for those spaces' listeners when
    /// nothing else changed).
    fn commit_locked(&self, guard: &ReentrantMutexGuard<'_, RefCell<Topology>>) {
        struct Step {
            id: SpaceId,
            name: Box<str>,
            handle: AddressSpace,
            old: Arc<FlatView>,
            /// The view to publish, if it changed.
            new: Option<Arc<FlatView>>,
            /// Where `new` differs from `old`, when it was spliced from it.
            delta: Option<Arc<SpliceSpans>>,
            fds: Vec<(bool, listener::SpaceFd)>,
            /// With no new view: where the ranges whose region's dirty-log
            /// mask changed sit in `old`.
            logged: Vec<usize>,
            listeners: Vec<Arc<dyn MemoryListener>>,
            wants_nop: Vec<bool>,
        }
        let scope = CallbackScope::enter(guard);
        let (steps, listeners, coalesced, full, log_changes) = {
            let mut topo = guard.borrow_mut();
            let full = topo.pending;
            let fds_changed = std::mem::take(&mut topo.listeners.ioeventfd_pending);
            let fd_regions = std::mem::take(&mut topo.listeners.ioeventfd_regions);
            // Dirty-log masks are published to the region cores first (the
            // data plane marks for them from here on); they render nothing.
            let log_regions = std::mem::take(&mut topo.listeners.log_regions);
            let log_changes = crate::topology::dirty_log::publish_masks(&topo, &log_regions);
            topo.pending = false;
            let dirty = std::mem::take(&mut topo.dirty);
            let affected = std::mem::take(&mut topo.affected);
            let incremental = topo.incremental && !std::mem::take(&mut topo.affected_overflow);
            // The changed regions' arena slots as a bitmap: a cached view is
            // re-rendered iff it reached one of them. Testing by slot (not by
            // generation) can only err towards re-rendering.
            let dirty_slots =
                crate::view::flatview::SlotSet::new(dirty.iter().map(|d| d.index).collect());
            let mut fresh: HashMap<Option<RegionId>, Arc<FlatView>> = HashMap::new();
            // Spliced views: the view each was spliced from and where the
            // edits sit, for a listener diff of the edits alone.
            let mut deltas: HashMap<Option<RegionId>, (Arc<FlatView>, Arc<SpliceSpans>)> =
                HashMap::new();
            let mut steps = Vec::new();
            // A commit the space index can bound visits only the spaces it
            // can change; any other visits every space and rebuilds the
            // index.
            let mut index = self.spaces_index.lock();
            // (Mask changes can reach any space showing the region: every
            // space is visited, as for an edit the index cannot bound.)
            let candidates = if full && log_changes.is_empty() {
                index.candidates(&topo, &dirty, &affected, incremental, fds_changed)
            } else {
                None
            };
            let targeted = candidates.is_some();
            if full && !targeted {
                index.reset();
            }
            if full {
                index.begin_update();
            }
            let spaces: Vec<(SpaceId, Box<str>, Option<RegionId>, AddressSpace)> = match candidates
            {
                Some(c) => c
                    .into_iter()
                    .filter_map(|id| {
                        let n = topo.spaces.get(id.index, id.generation)?;
                        Some((id, n.name.clone(), n.root, n.handle.clone()))
                    })
                    .collect(),
                None => topo
                    .spaces_in_order()
                    .into_iter()
                    .map(|(id, n)| (id, n.name.clone(), n.root, n.handle.clone()))
                    .collect(),
            };
            let mut released: Vec<Option<RegionId>> = Vec::new();
            for (id, name, root, handle) in spaces {
                let old = handle.view();
                let new = if full {
                    let mut inspected = Vec::new();
                    let phys = root.and_then(|r| {
                        render::physical_root_visiting(&*topo, r, |x| inspected.push(x))
                    });
                    if let Some(was) = index.record(id, inspected, phys) {
                        if was != phys {
                            released.push(was);
                        }
                    }
                    let view = match fresh.get(&phys) {
                        Some(v) => v.clone(),
                        None => {
                            let v = match phys {
                                None => self.data.empty_view.clone(),
                                Some(p) => match topo.views.get(&phys) {
                                    Some(v) if !v.reached_any_in(&dirty_slots) => v.clone(),
                                    cached => {
                                        // A view that reached a changed region
                                        // but has no window noted is rendered
                                        // whole (never just reused).
                                        let windows = affected
                                            .get(&p)
                                            .map(Vec::as_slice)
                                            .filter(|_| incremental);
                                        let (v, delta) = self.rerender(&topo, p, cached, windows);
                                        if let (Some(d), Some(old)) = (delta, cached) {
                                            deltas.insert(phys, (old.clone(), Arc::new(d)));
                                        }
                                        v
                                    }
                                },
                            };
                            fresh.insert(phys, v.clone());
                            v
                        }
                    };
                    (!Arc::ptr_eq(&old, &view)).then_some(view)
                } else {
                    None
                };
                // The splice's spans serve the listener diff when this space
                // published the view the splice started from.
                let delta = new.as_ref().and_then(|_| {
                    let phys = root.and_then(|r| render::physical_root(&*topo, r));
                    deltas
                        .get(&phys)
                        .filter(|(from, _)| Arc::ptr_eq(from, &old))
                        .map(|(_, d)| d.clone())
                });
                let fds = match (&new, &delta) {
                    (Some(view), Some(d)) if !fds_changed => {
                        topo.listeners.update_space_fds_spliced(id, &old, view, d)
                    }
                    (Some(view), _) => topo.listeners.update_space_fds(id, view),
                    // Only ioeventfds changed: only their regions' ranges
                    // are looked at.
                    // (The reference path recomputes them from the whole view.)
                    (None, _) if fds_changed && topo.incremental => {
                        topo.listeners.update_space_fds_of(id, &old, &fd_regions)
                    }
                    (None, _) if fds_changed => topo.listeners.update_space_fds(id, &old),
                    (None, _) => Vec::new(),
                };
                let listeners = topo.listeners.of_space(id);
                let wants_nop = topo.listeners.nop_wishes_of(id);
                // A space whose view stays tells the mask changes of the
                // ranges it shows (a new view's diff tells its own).
                let logged = if new.is_none() && !listeners.is_empty() {
                    log_changes.positions_in(&old, !topo.incremental)
                } else {
                    Vec::new()
                };
                steps.push(Step {
                    id,
                    name,
                    handle,
                    old,
                    new,
                    delta,
                    fds,
                    logged,
                    listeners,
                    wants_nop,
                });
            }
            for (id, name, handle) in std::mem::take(&mut topo.destroyed_spaces) {
                let old = handle.view();
                let empty = self.data.empty_view.clone();
                let fds = topo.listeners.update_space_fds(id, &empty);
                let listeners = topo.listeners.of_space(id);
                let wants_nop = topo.listeners.nop_wishes_of(id);
                steps.push(Step {
                    id,
                    name,
                    handle,
                    old,
                    new: Some(empty),
                    delta: None,
                    fds,
                    logged: Vec::new(),
                    listeners,
                    wants_nop,
                });
            }
            // The views replaced in the cache may hold the last reference
            // to a region core: they drop after the commit, not here.
            let mut old_views: Vec<Arc<FlatView>> = Vec::new();
            if full && targeted {
                // Only the visited spaces' roots change in the cache.
                for (phys, v) in fresh {
                    old_views.extend(topo.views.insert(phys, v));
                }
                for p in released {
                    if !index.is_used(&p) {
                        old_views.extend(topo.views.remove(&p));
                    }
                }
                index.set_complete();
            } else if full {
                old_views.extend(std::mem::replace(&mut topo.views, fresh).into_values());
                index.set_complete();
            }
            drop(index);
            defer_drop(old_views);
            // `begin` / `commit` go to every listener of a commit that
            // changed topology, and only to the listeners of the spaces
            // that show a changed mask in a commit that changed nothing else.
            let all = if full {
                topo.listeners.snapshot()
            } else {
                let mut touched: Vec<SpaceId> = steps
                    .iter()
                    .filter(|s| !s.logged.is_empty())
                    .map(|s| s.id)
                    .collect();
                touched.sort_unstable();
                topo.listeners.snapshot_of(&touched)
            };
            (
                steps,
                all,
                topo.listeners.coalesced.clone(),
                full,
                log_changes,
            )
        };
        // Listeners run with the lock held but the topology not borrowed,
        // each callback under `catch`: a panic is recorded and kept for the
        // caller, and the commit goes on, so every space is published and
        // every listener gets its whole sequence and `commit`.
        let catch = listener::Catch {
            census: &self.data.census,
        };
        for (_, l) in &listeners {
            catch.call(l, "begin", |l| l.begin());
        }
        for step in &steps {
            let cx = SpaceCtx {
                space: step.id,
                name: &step.name,
                listeners: &step.listeners,
                wants_nop: &step.wants_nop,
                coalesced: &coalesced,
                log_changes: &log_changes,
                catch: &catch,
            };
            if let Some(new) = &step.new {
                match &step.delta {
                    Some(d) => listener::diff_spliced_and_notify(&cx, &step.old, new, d),
                    None => listener::diff_and_notify(&cx, &step.old, new),
                }
                step.handle.publish(new.clone());
            } else {
                listener::notify_log_changes(&cx, &step.old, &step.logged);
            }
            if !step.fds.is_empty() {
                let view = step.handle.view();
                listener::notify_fds(&cx, &view, &step.fds);
            }
        }
        for (_, l) in &listeners {
            catch.call(l, "commit", |l| l.commit());
        }
        drop(scope);
        // Old views (and the listener snapshots) drop when the operation
        // ends, where a device's `Drop` may use the machine (or when their
        // last reader lets go).
        defer_drop(steps);
        defer_drop(listeners);
        if full {
            // Forget state of regions and spaces that are gone (listeners
            // of a destroyed space saw every range deleted above).
            let mut topo = guard.borrow_mut();
            let t = &mut *topo;
            let (regions, spaces) = (&t.regions, &t.spaces);
            let gone = t.listeners.prune(
                |r| regions.get(r.index, r.generation).is_some(),
                |s| spaces.get(s.index, s.generation).is_some(),
            );
            drop(topo);
            for reg in gone {
                self.defer_listener_drop(reg.listener);
            }
        }
    }

    /// A new view of physical root `p`: `old` (the last one) with the
    /// `windows` the edits can have changed re-rendered and spliced in, or a
    /// full render when there is no old view or the splice refuses. With a
    /// splice, also where the new view differs from `old`.
    fn rerender(
        &self,
        topo: &Topology,
        p: RegionId,
        old: Option<&Arc<FlatView>>,
        windows: Option<&[(i128, i128)]>,
    ) -> (Arc<FlatView>, Option<SpliceSpans>) {
        let root_name = topo.node(p).map(|n| n.name().to_owned());
        // While global dirty tracking runs, every RAM range's log mask
        // carries MIGRATION, which the render itself does not compute
        // (`dirty::attach` adds it): splicing fresh pieces next to attached
        // ones would merge differently from a full render, so render whole.
        let global = topo.listeners.global_dirty_log;
        let windows = windows.filter(|_| !global);
        let spliced = match (old, windows) {
            (Some(old), Some(w)) => render::splice(topo, p, old, w).map(|s| (old, s)),
            _ => None,
        };
        // The reached list of a spliced view is a superset (the old one plus
        // the windows'): when it has grown well past the topology, a full
        // render trims it.
        let spliced = spliced.filter(|(old, s)| {
            old.reached_count() + s.reached.len() <= 2 * topo.regions.len() + 64
        });
        if let Some((old, mut s)) = spliced {
            // A splice identical to the last view keeps the last view: nothing
            // is published and listeners hear nothing for this space.
            if s.same {
                old.extend_reached(s.reached);
                return (old.clone(), None);
            }
            // How writes to each new range mark dirty pages (the ranges a
            // splice keeps from the old view are attached already).
            for e in &mut s.edits {
                crate::view::dirty_marks::attach(&mut e.new, global);
            }
            let (view, spans) = FlatView::spliced(
                old,
                root_name.as_deref(),
                s.edits,
                s.reached,
                Some(&self.data.census),
            );
            if render::check_incremental() {
                let full = render::render(topo, p);
                assert!(
                    render::same_ranges(view.iter(), &full.ranges),
                    "incremental render of {root_name:?} differs from a full render:\nspliced {view:#?}\nfull {:#?}",
                    full.ranges
                );
            }
            return (Arc::new(view), Some(spans));
        }
        let mut r = render::render(topo, p);
        crate::view::dirty_marks::attach(&mut r.ranges, global);
        // A render identical to the last one keeps the last view (its
        // reached list is refreshed).
        if let Some(old) = old.filter(|o| render::same_ranges(o.iter(), &r.ranges)) {
            old.set_reached(r.reached);
            return (old.clone(), None);
        }
        let view = FlatView::new(
            Some(p),
            root_name.as_deref(),
            r.ranges,
            r.reached,
            Some(&self.data.census),
        );
        (Arc::new(view), None)
    }

    /// Turns incremental rendering off (`false`: every view a commit reaches
    /// is rendered whole, the reference path) or back on. For tests and
    /// benchmarks that compare the two.
    #[doc(hidden)]
    pub fn set_incremental_render(&self, on: bool) {
        let guard = self.control.lock();
        guard.borrow_mut().incremental = on;
    }

    /// Renders every address space whole and compares the result with the
    /// view it has published; the first difference, if any, as an error
    /// message. For tests of incremental rendering.
    #[doc(hidden)]
    pub fn check_views_against_full_render(&self) -> std::result::Result<(), String> {
        self.read(|topo| {
            for (_, space) in topo.spaces_in_order() {
                let view = space.handle.view();
                let phys = space.root.and_then(|r| render::physical_root(topo, r));
                let mut full = match phys {
                    Some(p) => render::render(topo, p).ranges,
                    None => Vec::new(),
                };
                crate::view::dirty_marks::attach(&mut full, topo.listeners.global_dirty_log);
                if !render::same_ranges(view.iter(), &full) {
                    return Err(format!(
                        "space {}: published {:#?}\nfull render {:#?}",
                        space.name, view, full
                    ));
                }
            }
            Ok(())
        })
    }

    /// Tears the machine down; returns the leak report and the first panic
    /// of other people's code it caught (also in the report's `panics`).
    /// A second teardown does nothing.
    fn teardown(&self) -> (LeakReport, Option<Payload>) {
        let defer = Deferral::enter();
        let guard = self.control.lock();
        let mut view_spaces = std::collections::BTreeMap::new();
        {
            let mut topo = guard.borrow_mut();
            if std::mem::replace(&mut topo.torn_down, true) {
                return (LeakReport::default(), None);
            }
            // Which spaces published each view, for the leak report to
            // name who a surviving view came from.
            for (_, space) in topo.spaces_in_order() {
                if let Some(key) = space.handle.view().census_key() {
                    view_spaces
                        .entry(key)
                        .or_insert_with(Vec::new)
                        .push(space.name.to_string());
                }
            }
            topo.clear();
            topo.depth = 0;
        }
        // Listeners see every range deleted (a KVM slot listener gives the
        // memory back), then go.
        self.commit_locked(&guard);
        {
            let mut topo = guard.borrow_mut();
            let listeners = topo.listeners.clear();
            let views = std::mem::take(&mut topo.views);
            self.data
                .census
                .remove_edge(topo.census_key, topo.census_key);
            drop(topo);
            for reg in listeners {
                self.defer_listener_drop(reg.listener);
            }
            defer_drop(views);
        }
        drop(guard);
        let panic = defer.finish();
        (
            crate::lifecycle::diag::leak_report_naming(&self.data.census, &view_spaces),
            panic,
        )
    }

    // ---- owners -------------------------------------------------------------

    /// Plugs in a new owner (device) named `name`, optionally a child of
    /// `parent` (unplugging the parent unplugs it too).
    pub fn new_owner(&self, name: &str, parent: Option<OwnerId>) -> Result<OwnerId> {
        self.new_owner_labeled(name, OwnerLabel::DevId(name.to_owned()), parent)
    }

    /// Like [`Machine::new_owner`], with the QOM-style label `info mtree -o`
    /// prints.
    pub fn new_owner_labeled(
        &self,
        name: &str,
        label: OwnerLabel,
        parent: Option<OwnerId>,
    ) -> Result<OwnerId> {
        self.edit(|t| t.new_owner(name, label, parent))
    }

    /// Sets the function run once when the owner is finalized.
    /// A finalizer it replaces is dropped (not run).
    pub fn set_finalizer(&self, owner: OwnerId, f: Finalizer) -> Result<()> {
        // `f` and a replaced finalizer may hold device state: neither drops
        // while the topology is borrowed.
        let mut f = Some(f);
        self.edit(|t| {
            let core = &t.owner(owner)?.core;
            if let Some(old) = f.take().and_then(|f| core.set_finalizer(f)) {
                defer_drop_recorded(&t.machine.census, "a replaced finalizer", old);
            }
            Ok(())
        })
    }

    /// Unplugs an owner and its child devices. See [`UnplugReport`].
    ///
    /// The devices' state drops and their finalizers run before this
    /// returns (unless DMA mappings still hold them), where they may use
    /// the machine. Every finalizer runs once even if another panics; the
    /// first panic is re-raised once the unplug is complete (module docs,
    /// "Panics").
    pub fn unplug(&self, owner: OwnerId) -> Result<UnplugReport> {
        self.edit(|t| t.unplug(owner))
    }

    // ---- regions -------------------------------------------------------------

    fn create(
        &self,
        name: &str,
        kind: RegionKind,
        size: u128,
        backing: Backing,
        owner: Option<OwnerId>,
        alias: Option<(RegionId, u64)>,
    ) -> Result<RegionId> {
        let mut config = RegionCore::ops_config_for(kind, &backing);
        config.endianness = config.endianness.resolve(self.target_endian());
        self.edit(|t| t.create_region(name, kind, size, backing, config, owner, alias))
    }

    fn backend(&self, name: &str, size: u64, backing: RamBacking) -> Result<Arc<MemoryBackend>> {
        MemoryBackend::new(&self.data.census, &self.data.dma, name, size, backing)
            .map(Arc::new)
            .map_err(|e| TopologyError::Allocation {
                region: name.to_owned(),
                message: e.to_string(),
            })
    }

    /// Allocates a memory backend that regions (possibly of several owners)
    /// can map with [`Machine::new_ram_from_backend`].
    pub fn new_backend(
        &self,
        name: &str,
        size: u64,
        backing: RamBacking,
    ) -> Result<Arc<MemoryBackend>> {
        self.backend(name, size, backing)
    }

    /// A pure container.
    pub fn new_container(
        &self,
        name: &str,
        size: u128,
        owner: Option<OwnerId>,
    ) -> Result<RegionId> {
        self.create(
            name,
            RegionKind::Container,
            size,
            Backing::None,
            owner,
            None,
        )
    }

    /// RAM backed by fresh anonymous host memory.
    pub fn new_ram(&self, name: &str, size: u128, owner: Option<OwnerId>) -> Result<RegionId> {
        self.new_ram_with(name, size, owner, RamBacking::Anonymous)
    }

    /// RAM backed by fresh host memory of the given kind (memfd can be shared).
    pub fn new_ram_with(
        &self,
        name: &str,
        size: u128,
        owner: Option<OwnerId>,
        backing: RamBacking,
    ) -> Result<RegionId> {
        let block = self.backend(name, host_size(name, size)?, backing)?;
        self.new_ram_from_backend(name, &block, 0, size, owner)
    }

    /// RAM mapping `size` bytes of `backend` starting at `offset`.
    pub fn new_ram_from_backend(
        &self,
        name: &str,
        backend: &Arc<MemoryBackend>,
        offset: u64,
        size: u128,
        owner: Option<OwnerId>,
    ) -> Result<RegionId> {
        let size = host_size(name, size)?;
        if !backend.is_of(&self.data.dma) {
            return Err(TopologyError::ForeignBackend {
                region: name.to_owned(),
                backend: backend.name().to_owned(),
            });
        }
        check_backend_range(name, backend, offset, size)?;
        let backing = Backing::Ram {
            block: backend.clone(),
            offset,
        };
        let mut config = RegionCore::ops_config_for(RegionKind::Ram, &backing);
        config.endianness = config.endianness.resolve(self.target_endian());
        self.edit(|t| {
            t.create_region(
                name,
                RegionKind::Ram,
                u128::from(size),
                backing,
                config,
                owner,
                None,
            )
        })
    }

    /// ROM: RAM that guest writes cannot change.
    pub fn new_rom(&self, name: &str, size: u128, owner: Option<OwnerId>) -> Result<RegionId> {
        let id = self.new_ram(name, size, owner)?;
        self.set_readonly(id, true)?;
        Ok(id)
    }

    /// RAM device memory (exact-width accesses, never memcpy).
    pub fn new_ram_device(
        &self,
        name: &str,
        size: u128,
        owner: Option<OwnerId>,
    ) -> Result<RegionId> {
        let size = host_size(name, size)?;
        let block = self.backend(name, size, RamBacking::Anonymous)?;
        let backing = Backing::RamDevice { block, offset: 0 };
        let mut config = RegionCore::ops_config_for(RegionKind::RamDevice, &backing);
        config.endianness = config.endianness.resolve(self.target_endian());
        self.edit(|t| {
            t.create_region(
                name,
                RegionKind::RamDevice,
                u128::from(size),
                backing,
                config,
                owner,
                None,
            )
        })
    }

    /// ROM device: reads from memory in romd mode (the default), callbacks
    /// otherwise; writes always reach `ops`.
    pub fn new_rom_device(
        &self,
        name: &str,
        size: u128,
        ops: Arc<dyn MmioOps>,
        owner: Option<OwnerId>,
    ) -> Result<RegionId> {
        let size = host_size(name, size)?;
        let block = self.backend(name, size, RamBacking::Anonymous)?;
        let backing = Backing::RomDevice { block, ops };
        let mut config = RegionCore::ops_config_for(RegionKind::RomDevice, &backing);
        config.endianness = config.endianness.resolve(self.target_endian());
        self.edit(|t| {
            t.create_region(
                name,
                RegionKind::RomDevice,
                u128::from(size),
                backing,
                config,
                owner,
                None,
            )
        })
    }

    /// MMIO (or port I/O) with device callbacks.
    pub fn new_mmio(
        &self,
        name: &str,
        size: u128,
        ops: Arc<dyn MmioOps>,
        owner: Option<OwnerId>,
    ) -> Result<RegionId> {
        self.create(
            name,
            RegionKind::Mmio,
            size,
            Backing::Mmio(ops),
            owner,
            None,
        )
    }

    /// An IOMMU region of `size` bytes translated by `device`, whose
    /// notifiers live in `hub` (see `crate::access::iommu`). Renders and prints like
    /// MMIO (QEMU `memory_region_init_iommu`).
    ///
    /// # Errors
    ///
    /// The errors of region creation; [`TopologyError::InUse`] if `hub`
    /// already serves another IOMMU region.
    pub fn new_iommu(
        &self,
        name: &str,
        size: u128,
        device: Arc<dyn crate::access::iommu::Iommu>,
        hub: Arc<crate::access::iommu::IommuHub>,
        owner: Option<OwnerId>,
    ) -> Result<RegionId> {
        if !hub.claim() {
            return Err(TopologyError::InUse {
                region: name.to_owned(),
                why: "its IOMMU hub already serves another region".to_owned(),
            });
        }
        let weak = Arc::downgrade(&device);
        let created = self.create(
            name,
            RegionKind::Iommu,
            size,
            crate::access::iommu::IommuParts {
                device,
                hub: hub.clone(),
            }
            .into_backing(),
            owner,
            None,
        );
        let id = match created {
            Ok(id) => id,
            Err(e) => {
                hub.release_claim();
                return Err(e);
            }
        };
        let region_key = self.read(|t| t.get(id).map(|n| n.core.census_key()))?;
        hub.attach(weak, size, (region_key, self.census().clone()));
        Ok(id)
    }

    /// A reservation: claims its range, rejects every access.
    pub fn new_reservation(
        &self,
        name: &str,
        size: u128,
        owner: Option<OwnerId>,
    ) -> Result<RegionId> {
        self.create(
            name,
            RegionKind::Reservation,
            size,
            Backing::None,
            owner,
            None,
        )
    }

    /// The root of a port I/O space: holes read all ones.
    pub fn new_io_root(&self, name: &str, size: u128) -> Result<RegionId> {
        self.create(name, RegionKind::IoRoot, size, Backing::None, None, None)
    }

    /// An alias of `size` bytes of `target` starting at `offset`.
    pub fn new_alias(
        &self,
        name: &str,
        target: RegionId,
        offset: u64,
        size: u128,
        owner: Option<OwnerId>,
    ) -> Result<RegionId> {
        self.create(
            name,
            RegionKind::Alias,
            size,
            Backing::None,
            owner,
            Some((target, offset)),
        )
    }

    /// A model-only region with no host memory or callbacks (used by the
    /// importer for RAM/ROM of imported machines): accesses are unassigned.
    pub fn new_model_region(
        &self,
        name: &str,
        kind: RegionKind,
        size: u128,
        owner: Option<OwnerId>,
    ) -> Result<RegionId> {
        self.create(name, kind, size, Backing::None, owner, None)
    }

    /// Destroys a region that nothing in the topology uses any more.
    pub fn destroy_region(&self, id: RegionId) -> Result<()> {
        self.edit(|t| t.destroy_region(id))
    }

    // ---- tree edits --------------------------------------------------------

    /// Maps `sub` at `offset` in `container` with priority 0.
    pub fn add_subregion(&self, container: RegionId, offset: u64, sub: RegionId) -> Result<()> {
        self.add_subregion_overlap(container, offset, sub, 0)
    }

    /// Maps `sub` at `offset` in `container` with `priority`.
    pub fn add_subregion_overlap(
        &self,
        container: RegionId,
        offset: u64,
        sub: RegionId,
        priority: i32,
    ) -> Result<()> {
        self.edit(|t| t.add_subregion(container, offset, sub, priority))
    }

    /// Maps each `(offset, sub, priority)` of `subs` into `container`,
    /// with exactly the result of [`Machine::add_subregion_overlap`] for
    /// each in order, but in time linear in the container's subregions (one
    /// by one, every equal-priority newcomer is inserted at the front). All
    /// entries are checked first: on error nothing is mapped, and the error
    /// comes with the index in `subs` of the first entry refused.
    pub fn add_subregions(
        &self,
        container: RegionId,
        subs: &[(u64, RegionId, i32)],
    ) -> std::result::Result<(), (usize, TopologyError)> {
        self.edit(|t| Ok(t.add_subregions(container, subs)))
            .unwrap_or_else(|e| Err((0, e)))
    }

    /// Unmaps `sub` from `container`.
    pub fn del_subregion(&self, container: RegionId, sub: RegionId) -> Result<()> {
        self.edit(|t| t.del_subregion(container, sub))
    }

    /// Moves a region inside its container (re-adding it: it becomes the
    /// newest among equal priorities, as in QEMU).
    pub fn set_address(&self, id: RegionId, addr: u64) -> Result<()> {
        self.edit(|t| t.set_address(id, addr))
    }

    /// Changes an alias's offset into its target.
    pub fn set_alias_offset(&self, id: RegionId, offset: u64) -> Result<()> {
        self.edit(|t| {
            if t.get(id)?.kind() != RegionKind::Alias {
                return Err(wrong_kind(t, id, "an alias"));
            }
            t.update(id, |n| n.alias_offset = offset)
        })
    }

    /// Enables or disables a region (disabled regions vanish with their
    /// subtree).
    pub fn set_enabled(&self, id: RegionId, enabled: bool) -> Result<()> {
        self.edit(|t| t.update(id, |n| n.enabled = enabled))
    }

    /// Marks a region readonly (RAM becomes ROM).
    pub fn set_readonly(&self, id: RegionId, readonly: bool) -> Result<()> {
        self.edit(|t| t.update(id, |n| n.readonly = readonly))
    }

    /// Marks a region nonvolatile.
    pub fn set_nonvolatile(&self, id: RegionId, nonvolatile: bool) -> Result<()> {
        self.edit(|t| t.update(id, |n| n.nonvolatile = nonvolatile))
    }

    /// Marks a region unmergeable (its flat ranges are never merged).
    pub fn set_unmergeable(&self, id: RegionId, unmergeable: bool) -> Result<()> {
        self.edit(|t| t.update(id, |n| n.unmergeable = unmergeable))
    }

    /// Switches a ROM device between romd mode (reads from memory) and MMIO
    /// mode (reads through callbacks).
    pub fn set_romd(&self, id: RegionId, romd: bool) -> Result<()> {
        self.edit(|t| {
            if t.get(id)?.kind() != RegionKind::RomDevice {
                return Err(wrong_kind(t, id, "a ROM device"));
            }
            t.update(id, |n| n.romd_mode = romd)
        })
    }

    /// Resizes a region. RAM cannot grow past its backend.
    pub fn set_size(&self, id: RegionId, size: u128) -> Result<()> {
        self.edit(|t| t.set_size(id, size))?;
        crate::topology::dirty_log::after_resize(self, id, size);
        Ok(())
    }

    /// Sets the region's own dirty-log client mask (bit `i` = client `i`,
    /// [`crate::DirtyClient`]); see also [`Machine::set_log`].
    pub fn set_dirty_log_mask(&self, id: RegionId, mask: u8) -> Result<()> {
        self.edit(|t| crate::topology::dirty_log::edit_mask(t, id, mask))
    }

    /// Records the QOM parent `info mtree -o` prints for a region (`None`:
    /// print none), overriding the rule derived from its owner. Used by the
    /// dump importer to keep exactly what QEMU printed.
    pub fn set_qom_parent(&self, id: RegionId, parent: Option<OwnerLabel>) -> Result<()> {
        self.edit(|t| t.update(id, |n| n.qom_parent = Some(parent)))
    }

    // ---- address spaces ------------------------------------------------------

    /// Creates an address space rooted at `root`.
    pub fn new_address_space(
        &self,
        name: &str,
        root: RegionId,
        owner: Option<OwnerId>,
    ) -> Result<SpaceId> {
        self.edit(|t| t.new_space(name, root, owner))
    }

    /// Destroys an address space: its listeners see every range deleted and
    /// outstanding handles see the empty view.
    pub fn destroy_address_space(&self, id: SpaceId) -> Result<()> {
        self.edit(|t| t.destroy_space(id))
    }

    /// The data-plane handle of an address space.
    pub fn address_space(&self, id: SpaceId) -> Result<AddressSpace> {
        self.read(|t| t.space(id).map(|s| s.handle.clone()))
    }

    /// The root region of an address space (QEMU's `as->root`); `None`
    /// once that region was destroyed (the space then shows nothing).
    pub fn address_space_root(&self, id: SpaceId) -> Result<Option<RegionId>> {
        self.read(|t| t.space(id).map(|s| s.root))
    }

    /// Every address space, in creation order: (id, name).
    pub fn address_spaces(&self) -> Vec<(SpaceId, String)> {
        self.read(|t| {
            t.spaces_in_order()
                .into_iter()
                .map(|(id, n)| (id, n.name.to_string()))
                .collect()
        })
    }

    /// The first address space with this name.
    pub fn find_address_space(&self, name: &str) -> Option<SpaceId> {
        self.address_spaces()
            .into_iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| id)
    }

    // ---- listeners -----------------------------------------------------------

    /// Registers a listener on an address space and replays the space's
    /// current state to it (QEMU `listener_add_address_space`): `begin`, per range `region_add`, coalesced
    /// adds and `log_start`, then `eventfd_add` for every ioeventfd, `commit`.
    /// A panic of the listener is re-raised after the whole replay (the
    /// listener stays registered: module docs, "Panics").
    pub fn register_listener(
        &self,
        space: SpaceId,
        l: Arc<dyn MemoryListener>,
    ) -> Result<ListenerId> {
        // The listener's own code, asked before the topology is borrowed
        // (a panic here is the caller's: nothing is registered yet).
        let priority = l.priority();
        let wants_nop = l.wants_region_nop();
        let _defer = Deferral::enter();
        let guard = self.control.lock();
        let (id, name, view, fds, coalesced, global) = {
            let mut topo = guard
                .try_borrow_mut()
                .map_err(|_| TopologyError::ListenerReentry)?;
            if topo.in_commit {
                return Err(TopologyError::ListenerReentry);
            }
            let s = topo.space(space)?;
            let (name, view) = (s.name.clone(), s.handle.view());
            let id = topo.listeners.insert(space, l.clone(), priority, wants_nop);
            let fds = topo.listeners.fds_of(space);
            let global = topo.listeners.global_dirty_log;
            let coalesced = topo.listeners.coalesced.clone();
            (id, name, view, fds, coalesced, global)
        };
        let _scope = CallbackScope::enter(&guard);
        let catch = listener::Catch {
            census: &self.data.census,
        };
        let cx = SpaceCtx {
            space,
            name: &name,
            listeners: &[],
            wants_nop: &[],
            coalesced: &coalesced,
            log_changes: &listener::LogChanges::default(),
            catch: &catch,
        };
        listener::replay(&cx, &view, &fds, global, &l, true);
        Ok(id)
    }

    /// Unregisters a listener, replaying its space's state as deletions:
    /// per range `log_stop`, coalesced dels and `region_del`, then
    /// `eventfd_del` for every ioeventfd. Unknown ids (already unregistered,
    /// or of a destroyed space) are ignored; an id of another machine is
    /// [`TopologyError::ForeignId`].
    pub fn unregister_listener(&self, id: ListenerId) -> Result<()> {
        let _defer = Deferral::enter();
        let guard = self.control.lock();
        let (reg, name, view, fds, coalesced) = {
            let mut topo = guard
                .try_borrow_mut()
                .map_err(|_| TopologyError::ListenerReentry)?;
            if topo.in_commit {
                return Err(TopologyError::ListenerReentry);
            }
            topo.check_tag("listener", &id, id.1)?;
            let Some(reg) = topo.listeners.remove(id) else {
                return Ok(());
            };
            let (name, view) = match topo.space(reg.space) {
                Ok(s) => (s.name.clone(), s.handle.view()),
                Err(_) => {
                    drop(topo);
                    self.defer_listener_drop(reg.listener);
                    return Ok(());
                }
            };
            let fds = topo.listeners.fds_of(reg.space);
            (reg, name, view, fds, topo.listeners.coalesced.clone())
        };
        let scope = CallbackScope::enter(&guard);
        let catch = listener::Catch {
            census: &self.data.census,
        };
        let cx = SpaceCtx {
            space: reg.space,
            name: &name,
            listeners: &[],
            wants_nop: &[],
            coalesced: &coalesced,
            log_changes: &listener::LogChanges::default(),
            catch: &catch,
        };
        listener::replay(&cx, &view, &fds, false, &reg.listener, false);
        drop(scope);
        self.defer_listener_drop(reg.listener);
        Ok(())
    }

    // ---- ioeventfds and coalesced MMIO --------------------------------------

    /// Adds an ioeventfd to a region (QEMU's `memory_region_add_eventfd`):
    /// a guest write of `size` bytes (0 = any size) at `addr` in the region,
    /// carrying `data` (`None` = any value; given in the target's byte order
    /// and converted to the device's), signals `notifier` instead of reaching
    /// the device. Listeners see it (`eventfd_add`) at the next commit, in
    /// every address space where the region is visible at that address.
    pub fn add_eventfd(
        &self,
        region: RegionId,
        addr: u64,
        size: u64,
        data: Option<u64>,
        notifier: &Arc<EventNotifier>,
    ) -> Result<()> {
        let target = self.data.target_endian;
        self.edit(|t| {
            let fd = eventfd_for(t, region, addr, size, data, notifier, target)?;
            t.listeners.add_fd(region, fd);
            Ok(())
        })
    }

    /// Removes an ioeventfd added by [`Machine::add_eventfd`] (same
    /// arguments; a size of 0 on either side matches any entry at `addr`).
    /// Fails with [`TopologyError::NoSuchEventfd`] when none matches.
    pub fn del_eventfd(
        &self,
        region: RegionId,
        addr: u64,
        size: u64,
        data: Option<u64>,
        notifier: &Arc<EventNotifier>,
    ) -> Result<()> {
        let target = self.data.target_endian;
        self.edit(|t| {
            let fd = eventfd_for(t, region, addr, size, data, notifier, target)?;
            if t.listeners.del_fd(region, &fd) {
                Ok(())
            } else {
                Err(TopologyError::NoSuchEventfd {
                    region: t.get(region)?.name().to_owned(),
                    what: format!(
                        "{addr:#x}+{size:#x} data {data:?} notifier \"{}\"",
                        notifier.name()
                    ),
                })
            }
        })
    }

    /// Marks `[offset, offset + size)` of a region as coalesced MMIO (QEMU's
    /// `memory_region_add_coalescing`). Listeners are told at once (not at
    /// the next commit): `coalesced_io_add` for the part each flat range of
    /// the region shows, in every address space.
    pub fn add_coalescing(&self, region: RegionId, offset: u64, size: u128) -> Result<()> {
        let span = (offset, size);
        let targets = self.coalescing_edit(region, |spans| {
            spans.push(span);
            vec![span]
        })?;
        self.notify_coalescing(region, &targets, true);
        Ok(())
    }

    /// Makes the whole region coalesced MMIO: [`Machine::clear_coalescing`]
    /// then [`Machine::add_coalescing`] of the whole region.
    pub fn set_coalescing(&self, region: RegionId) -> Result<()> {
        self.clear_coalescing(region)?;
        let size = self.region_info(region)?.size;
        self.add_coalescing(region, 0, size)
    }

    /// Removes every coalesced range of a region, telling listeners
    /// (`coalesced_io_del`, range by range) at once.
    pub fn clear_coalescing(&self, region: RegionId) -> Result<()> {
        let targets = self.coalescing_edit(region, std::mem::take)?;
        self.notify_coalescing(region, &targets, false);
        Ok(())
    }

    fn coalescing_edit(
        &self,
        region: RegionId,
        f: impl FnOnce(&mut Vec<listener::Span>) -> Vec<listener::Span>,
    ) -> Result<Vec<listener::Span>> {
        let guard = self.control.lock();
        let mut topo = guard
            .try_borrow_mut()
            .map_err(|_| TopologyError::ListenerReentry)?;
        if topo.in_commit {
            return Err(TopologyError::ListenerReentry);
        }
        topo.get(region)?;
        let spans = topo.listeners.coalesced.entry(region).or_default();
        let out = f(spans);
        if spans.is_empty() {
            topo.listeners.coalesced.remove(&region);
        }
        Ok(out)
    }

    fn notify_coalescing(&self, region: RegionId, spans: &[listener::Span], adding: bool) {
        if spans.is_empty() {
            return;
        }
        let _defer = Deferral::enter();
        let guard = self.control.lock();
        type Target = (
            SpaceId,
            Box<str>,
            Arc<FlatView>,
            Vec<Arc<dyn MemoryListener>>,
        );
        let spaces: Vec<Target> = {
            let topo = guard.borrow();
            topo.spaces_in_order()
                .into_iter()
                .map(|(id, n)| {
                    let listeners = topo.listeners.of_space(id);
                    (id, n.name.clone(), n.handle.view(), listeners)
                })
                .filter(|(.., l)| !l.is_empty())
                .collect()
        };
        let _scope = CallbackScope::enter(&guard);
        let catch = listener::Catch {
            census: &self.data.census,
        };
        for span in spans {
            for (id, name, view, listeners) in &spaces {
                for range in view.ranges_of(region) {
                    let s = listener::Section {
                        space: *id,
                        space_name: name,
                        range,
                        view,
                        log_mask: range.dirty_log_mask(),
                    };
                    listener::notify_coalesced(
                        &catch,
                        &s,
                        std::slice::from_ref(span),
                        listeners,
                        adding,
                    );
                }
            }
        }
    }

    // ---- global dirty logging ------------------------------------------------

    /// Starts global dirty tracking for one more user. Counted like QEMU's
    /// `global_dirty_tracking` reasons: the first user's start turns it on
    /// (`log_global_start` on every listener in ascending priority; if one
    /// refuses, the ones already started get `log_global_stop` in reverse
    /// and the start fails and counts no user), then every view is
    /// re-rendered so that RAM ranges carry the MIGRATION bit (`log_start`
    /// on listeners, [`crate::host::dirty_bitmap`]); a later user's start only counts.
    /// Every successful start must be matched by one
    /// [`Machine::global_dirty_log_stop`].
    pub fn global_dirty_log_start(&self) -> Result<()> {
        let _defer = Deferral::enter();
        let guard = self.control.lock();
        let listeners = {
            let topo = guard
                .try_borrow()
                .map_err(|_| TopologyError::ListenerReentry)?;
            if topo.in_commit {
                return Err(TopologyError::ListenerReentry);
            }
            if topo.listeners.global_dirty_log {
                drop(topo);
                let mut topo = guard.borrow_mut();
                topo.listeners.global_dirty_users += 1;
                return Ok(());
            }
            topo.listeners.snapshot()
        };
        let scope = CallbackScope::enter(&guard);
        let catch = listener::Catch {
            census: &self.data.census,
        };
        for (i, (_, l)) in listeners.iter().enumerate() {
            // A listener that panics here is treated as one that refused
            // (and the panic is re-raised after the roll-back).
            let mut outcome = Err(String::new());
            catch.call(l, "log_global_start", |l| outcome = l.log_global_start());
            if let Err(message) = outcome {
                for (_, done) in listeners[..i].iter().rev() {
                    catch.call(done, "log_global_stop", |l| l.log_global_stop());
                }
                let mut name = String::new();
                catch.call(l, "name", |l| name = l.name().to_owned());
                return Err(TopologyError::ListenerRefused {
                    listener: name,
                    message,
                });
            }
        }
        drop(scope);
        {
            let mut topo = guard.borrow_mut();
            topo.listeners.global_dirty_log = true;
            topo.listeners.global_dirty_users = 1;
        }
        // QEMU: the MIGRATION bit enters the masks by a re-render.
        self.rerender_all(&guard);
        Ok(())
    }

    /// One user of global dirty tracking stops. The last user's stop turns
    /// it off: every view is re-rendered without the MIGRATION bit
    /// (`log_stop`), then `log_global_stop` on every listener in descending
    /// priority. Stopping when no user started is a no-op.
    pub fn global_dirty_log_stop(&self) -> Result<()> {
        let _defer = Deferral::enter();
        let guard = self.control.lock();
        let listeners = {
            let mut topo = guard
                .try_borrow_mut()
                .map_err(|_| TopologyError::ListenerReentry)?;
            if topo.in_commit {
                return Err(TopologyError::ListenerReentry);
            }
            if !topo.listeners.global_dirty_log {
                return Ok(());
            }
            topo.listeners.global_dirty_users = topo.listeners.global_dirty_users.saturating_sub(1);
            if topo.listeners.global_dirty_users > 0 {
                return Ok(());
            }
            topo.listeners.global_dirty_log = false;
            topo.listeners.global_dirty_stops += 1;
            topo.listeners.snapshot()
        };
        // QEMU: re-render (log_stop of MIGRATION) before log_global_stop.
        self.rerender_all(&guard);
        let _scope = CallbackScope::enter(&guard);
        let catch = listener::Catch {
            census: &self.data.census,
        };
        for (_, l) in listeners.iter().rev() {
            catch.call(l, "log_global_stop", |l| l.log_global_stop());
        }
        Ok(())
    }

    /// Re-renders every view (the dirty-log masks depend on global
    /// tracking), then commits unless a transaction is open.
    fn rerender_all(&self, guard: &ReentrantMutexGuard<'_, RefCell<Topology>>) {
        let commit_now = {
            let mut topo = guard.borrow_mut();
            let views = std::mem::take(&mut topo.views);
            defer_drop(views);
            topo.pending = true;
            topo.depth == 0
        };
        if commit_now {
            self.commit_locked(guard);
        }
    }

    /// Calls `f` on every listener, for every range of every address space
    /// whose dirty-log mask is nonzero (and which `region` serves, if
    /// given), with callbacks guarded as during a commit. For
    /// `crate::host::dirty_bitmap`'s sync and clear.
    pub(crate) fn each_logging_section(
        &self,
        region: Option<RegionId>,
        what: &'static str,
        f: impl Fn(&dyn MemoryListener, &listener::Section<'_>),
    ) -> Result<()> {
        let _defer = Deferral::enter();
        let guard = self.control.lock();
        let spaces = {
            let topo = guard
                .try_borrow()
                .map_err(|_| TopologyError::ListenerReentry)?;
            if topo.in_commit {
                return Err(TopologyError::ListenerReentry);
            }
            let mut v = Vec::new();
            for (id, n) in topo.spaces_in_order() {
                let ls = topo.listeners.of_space(id);
                if !ls.is_empty() {
                    v.push((id, n.name.clone(), n.handle.view(), ls));
                }
            }
            v
        };
        let _scope = CallbackScope::enter(&guard);
        let catch = listener::Catch {
            census: &self.data.census,
        };
        for (id, name, view, ls) in &spaces {
            // One region's sync looks only at its ranges (no walk of the
            // view, no copy); a global sync walks the view in place.
            let ranges: Box<dyn Iterator<Item = &crate::view::flatview::FlatRange>> = match region {
                Some(r) if !view.reached_any_slot(&[r.index]) => continue,
                Some(r) => Box::new(view.ranges_of(r)),
                None => Box::new(view.iter()),
            };
            for range in ranges {
                if range.dirty_log_mask() == 0 {
                    continue;
                }
                let s = listener::Section {
                    space: *id,
                    space_name: name,
                    range,
                    view,
                    log_mask: range.dirty_log_mask(),
                };
                for l in ls {
                    catch.call(l, what, |l| f(l, &s));
                }
            }
        }
        Ok(())
    }

    /// Whether global dirty tracking is on.
    pub fn global_dirty_log(&self) -> bool {
        self.read(|t| t.listeners.global_dirty_log)
    }

    /// While global dirty tracking is on, how many times it was turned off
    /// before (`None` while it is off): two equal values mean it ran
    /// without a gap in between, so no write went unmarked.
    pub fn global_dirty_log_epoch(&self) -> Option<u64> {
        self.read(|t| {
            t.listeners
                .global_dirty_log
                .then_some(t.listeners.global_dirty_stops)
        })
    }

    // ---- queries ---------------------------------------------------------------

    /// A snapshot of a region's attributes.
    pub fn region_info(&self, id: RegionId) -> Result<RegionInfo> {
        self.read(|t| t.info(id))
    }

    /// The first region (in arena order) with this name.
    pub fn find_region(&self, name: &str) -> Option<RegionId> {
        self.read(|t| {
            t.regions
                .iter()
                .find(|(_, n)| n.name() == name)
                .map(|((index, generation), _)| RegionId {
                    index,
                    generation,
                    machine: t.tag,
                })
        })
    }

    /// Every region with this name, in arena order (QEMU allows duplicate
    /// names: e.g. one `pam-pci` alias per PAM segment and mode).
    pub fn find_regions(&self, name: &str) -> Vec<RegionId> {
        self.read(|t| {
            t.regions
                .iter()
                .filter(|(_, n)| n.name() == name)
                .map(|((index, generation), _)| RegionId {
                    index,
                    generation,
                    machine: t.tag,
                })
                .collect()
        })
    }

    /// The census of live objects.
    pub fn census(&self) -> &Arc<Census> {
        &self.data.census
    }

    /// The guest's byte order.
    pub fn target_endian(&self) -> Endian {
        self.data.target_endian
    }

    /// Number of regions in the topology.
    pub fn region_count(&self) -> usize {
        self.read(|t| t.regions.len())
    }
}

/// A region size as a host memory size: region sizes are `u128` (a
/// container can span 2^64 bytes), host memory stops below 2^64.
fn host_size(name: &str, size: u128) -> Result<u64> {
    u64::try_from(size).map_err(|_| TopologyError::Allocation {
        region: name.to_owned(),
        message: format!("{size:#x} bytes of host memory cannot exist (RAM is smaller than 2^64)"),
    })
}

fn wrong_kind(t: &Topology, id: RegionId, expected: &'static str) -> TopologyError {
    TopologyError::WrongKind {
        region: t.node(id).map(|n| n.name().to_owned()).unwrap_or_default(),
        expected,
    }
}

fn check_backend_range(name: &str, backend: &MemoryBackend, offset: u64, size: u64) -> Result<()> {
    match offset.checked_add(size) {
        Some(end) if end <= backend.size() && size > 0 => Ok(()),
        _ => Err(TopologyError::BackendTooSmall {
            region: name.to_owned(),
            offset,
            size: u128::from(size),
            backend_size: backend.size(),
        }),
    }
}

/// Marks the topology as "listeners are being called" for as long as it
/// lives, so that an edit from a callback is refused with
/// [`TopologyError::ListenerReentry`]; restores the previous state on drop
/// (also when a listener panics).
struct CallbackScope<'g> {
    cell: &'g RefCell<Topology>,
    was: bool,
}

impl<'g> CallbackScope<'g> {
    fn enter(cell: &'g RefCell<Topology>) -> CallbackScope<'g> {
        let mut t = cell.borrow_mut();
        let was = std::mem::replace(&mut t.in_commit, true);
        CallbackScope { cell, was }
    }
}

impl Drop for CallbackScope<'_> {
    fn drop(&mut self) {
        if let Ok(mut t) = self.cell.try_borrow_mut() {
            t.in_commit = self.was;
        }
    }
}

/// Validates and builds an ioeventfd entry (QEMU converts the match data to
/// the device's byte order when the size is nonzero).
fn eventfd_for(
    t: &Topology,
    region: RegionId,
    addr: u64,
    size: u64,
    data: Option<u64>,
    notifier: &Arc<EventNotifier>,
    target: Endian,
) -> Result<IoEventFd> {
    let node = t.get(region)?;
    if !matches!(size, 0 | 1 | 2 | 4 | 8) {
        return Err(TopologyError::BadEventfdSize {
            region: node.name().to_owned(),
            size,
        });
    }
    // The byte order read when the region was created: calling the device
    // here would run its code with the topology borrowed.
    let device_endian = match node.core.backing() {
        Backing::Mmio(_) | Backing::RomDevice { .. } => node.core.ops_config().endianness,
        _ => target,
    };
    let data = match data {
        Some(d) if size != 0 && device_endian != target => Some(listener::swap_data(d, size)),
        other => other,
    };
    Ok(IoEventFd {
        addr,
        size,
        data,
        notifier: notifier.clone(),
    })
}
