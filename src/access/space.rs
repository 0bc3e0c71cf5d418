//! Address spaces.
//!
//! An address space has a control-plane node (`SpaceNode`: name, root
//! region, owner) and a data-plane handle ([`AddressSpace`]) that vCPU and DMA
//! threads clone and dispatch through. The handle holds the currently
//! published [`FlatView`] in an [`ArcSwap`]: readers load it without locks and
//! run their whole access against the view they loaded.
//!
//! # Invariants
//!
//! * Only the commit path (`Machine::commit`) stores a new view into a handle.
//! * A handle holds no reference to the control plane: dropping the machine
//!   while handles are still out publishes the empty view into every handle,
//!   after which a handle keeps nothing but itself and the machine's immutable
//!   data alive.
//! * Views are reclaimed when the last reader drops its guard (arc-swap's
//!   debt protocol): a reader never waits for the writer, and the writer never
//!   waits for readers.
//! * Each publish moves the handle's view sequence number from even to odd
//!   and back (+2): an even number read on both sides of a view load names
//!   the loaded view (what the IOTLB cache keys its target windows by).

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::lifecycle::census::{Census, ObjectKey, ObjectKind};
use crate::region::attrs::Endian;
use crate::region::ids::{OwnerId, RegionId, SpaceId};
use crate::view::flatview::FlatView;

/// Immutable machine-wide data the data plane needs.
pub(crate) struct MachineData {
    pub(crate) census: Arc<Census>,
    /// The guest's byte order: what "native endian" means for devices and
    /// typed accesses.
    pub(crate) target_endian: Endian,
    /// The shared empty view.
    pub(crate) empty_view: Arc<FlatView>,
    /// Outstanding DMA mappings, caches and sections (diagnostics; also the
    /// census's lazy source).
    pub(crate) dma: Arc<crate::host::mapping_table::MappingTable>,
}

pub(crate) struct SpaceShared {
    pub(crate) name: Box<str>,
    pub(crate) id: SpaceId,
    pub(crate) view: ArcSwap<FlatView>,
    /// Sequence number of the published view: even while `view` is
    /// stable, odd during a publish, +2 per publish, so an even number read
    /// on both sides of a load of `view` names that view
    /// ([`AddressSpace::view_guard_seq`]; the IOTLB cache keys what it
    /// resolved in a target view by it).
    pub(crate) view_seq: view_seq::AtomicU64,
    pub(crate) machine: Arc<MachineData>,
    pub(crate) census_key: ObjectKey,
    /// Bytes of bounce buffer in use by outstanding DMA mappings, and the
    /// limit (QEMU's per-AS `max_bounce_buffer_size`, default 4096).
    pub(crate) bounce: crate::access::bounce::BounceState,
}

impl SpaceShared {
    /// See [`AddressSpace::view_guard_seq`].
    #[inline(always)]
    pub(crate) fn view_guard_seq(&self) -> Option<(CurrentView, u64)> {
        view_seq::read(&self.view_seq, || CurrentView(self.view.load()))
    }
}

/// The sequence count around a space's view publish
/// (`SpaceShared::view_seq`), written once for the data plane and for its
/// loom model (`loom_tests` below; `--cfg loom` swaps in loom's atomics).
///
/// Writer (publishes of one space are serialised by the commit): `begin`
/// makes the count odd, the view is stored, `end` makes it even again, +2
/// in all. Reader: the count, then the view, then the count again; an even
/// count read on both sides names the view loaded (a view stored by a
/// publish makes the second read differ, and a count read after a publish
/// ended means the load saw that publish's view or a later one).
pub(crate) mod view_seq {
    #[cfg(loom)]
    pub(crate) use loom::sync::atomic::{fence, AtomicU64};
    use std::sync::atomic::Ordering;
    #[cfg(not(loom))]
    pub(crate) use std::sync::atomic::{fence, AtomicU64};

    /// Makes the count odd (waiting out a publish under way) and returns
    /// the even count it started from; the caller stores the view, then
    /// calls [`end`].
    pub(crate) fn begin(seq: &AtomicU64) -> u64 {
        let mut s = seq.load(Ordering::Relaxed);
        loop {
            if s & 1 != 0 {
                #[cfg(loom)]
                loom::thread::yield_now();
                #[cfg(not(loom))]
                std::hint::spin_loop();
                s = seq.load(Ordering::Relaxed);
                continue;
            }
            match seq.compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
        // The odd count is visible before the new view (release).
        fence(Ordering::Release);
        s
    }

    /// Ends the publish [`begin`] started at `s`: the view is stored.
    pub(crate) fn end(seq: &AtomicU64, s: u64) {
        seq.store(s + 2, Ordering::Release);
    }

    /// Loads the view with `load` and returns it with the even count it
    /// was published under, or `None` if a publish overlapped the load.
    #[inline(always)]
    pub(crate) fn read<T>(seq: &AtomicU64, load: impl FnOnce() -> T) -> Option<(T, u64)> {
        let before = seq.load(Ordering::Acquire);
        let view = load();
        // Order the view load before the second read (seqlock reader).
        fence(Ordering::Acquire);
        (before & 1 == 0 && seq.load(Ordering::Relaxed) == before).then_some((view, before))
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::view_seq;
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use loom::sync::Arc;

    /// Rule: a read that returns a count returns the view published under
    /// it (view `n` is stored by the `n`-th publish, under count `2n`),
    /// whatever the interleaving with publishes. The view pointer is a
    /// number stored with release and loaded with acquire, weaker than
    /// arc-swap's own orderings (its protocol is `tests/loom_publish.rs`).
    #[test]
    fn loom_view_seq_names_the_view_published_under_it() {
        loom::model(|| {
            let seq = Arc::new(view_seq::AtomicU64::new(0));
            let view = Arc::new(AtomicUsize::new(0));
            let writer = {
                let (seq, view) = (seq.clone(), view.clone());
                loom::thread::spawn(move || {
                    for v in 1..=2 {
                        let s = view_seq::begin(&seq);
                        view.swap(v, Ordering::AcqRel);
                        view_seq::end(&seq, s);
                    }
                })
            };
            for _ in 0..2 {
                if let Some((v, s)) = view_seq::read(&seq, || view.load(Ordering::Acquire)) {
                    assert_eq!(v as u64, s / 2, "view {v} returned under count {s}");
                }
            }
            writer.join().unwrap();
        });
    }
}

impl Drop for SpaceShared {
    fn drop(&mut self) {
        self.machine.census.finalize(self.census_key);
    }
}

/// The data-plane handle of an address space. Cheap to clone; `Send + Sync`.
///
/// ```
/// use memtree::{Endian, MemTxAttrs, Memory};
///
/// let memory = Memory::new();
/// let system = memory.new_container("system", 1 << 32, None).unwrap();
/// let ram = memory.new_ram("ram", 0x1000, None).unwrap();
/// memory.add_subregion(system, 0x4000, ram).unwrap();
/// let id = memory.new_address_space("memory", system, None).unwrap();
/// let bus = memory.address_space(id).unwrap();
/// let a = MemTxAttrs::UNSPECIFIED;
///
/// // Clones share the published view; any thread may access through them.
/// let worker = bus.clone();
/// std::thread::spawn(move || {
///     worker.store::<u32>(0x4010, 0x1234_5678, Endian::Little, a).into_result().unwrap();
/// })
/// .join()
/// .unwrap();
/// assert_eq!(bus.try_load::<u32>(0x4010, Endian::Little, a), Ok(0x1234_5678));
/// // Outside every region: a decode error, never a panic.
/// assert!(bus.try_load::<u32>(0x10, Endian::Little, a).is_err());
/// ```
#[derive(Clone)]
pub struct AddressSpace {
    pub(crate) shared: Arc<SpaceShared>,
}

impl AddressSpace {
    pub(crate) fn new(
        name: &str,
        id: SpaceId,
        machine: &Arc<MachineData>,
        view: Arc<FlatView>,
    ) -> AddressSpace {
        let census_key =
            machine
                .census
                .register_holding(ObjectKind::AddressSpace, name, view.census_key());
        AddressSpace {
            shared: Arc::new(SpaceShared {
                name: name.into(),
                id,
                view: ArcSwap::new(view),
                view_seq: view_seq::AtomicU64::new(0),
                machine: machine.clone(),
                census_key,
                bounce: crate::access::bounce::BounceState::with_census(
                    crate::access::bounce::DEFAULT_MAX_BOUNCE,
                    machine.census.clone(),
                ),
            }),
        }
    }

    /// The address space's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The address space's id in the topology.
    pub fn id(&self) -> SpaceId {
        self.shared.id
    }

    /// The currently published flat view, with a reference (for callers that
    /// keep it beyond one access; accesses use [`AddressSpace::view_guard`]).
    pub fn view(&self) -> Arc<FlatView> {
        self.shared.view.load_full()
    }

    /// The currently published flat view for the duration of one access,
    /// without touching its reference count in the common case.
    #[inline]
    pub fn view_guard(&self) -> CurrentView {
        CurrentView(self.shared.view.load())
    }

    /// The guest's byte order.
    pub fn target_endian(&self) -> Endian {
        self.shared.machine.target_endian
    }

    /// The current view and the sequence number it was published under,
    /// or `None` while a publish is under way (see `SpaceShared::view_seq`).
    #[inline(always)]
    pub(crate) fn view_guard_seq(&self) -> Option<(CurrentView, u64)> {
        self.shared.view_guard_seq()
    }

    pub(crate) fn publish(&self, view: Arc<FlatView>) {
        let census = &self.shared.machine.census;
        // Seqlock writer around the store (publishes of one space are
        // serialized by the commit; the CAS keeps the count exact anyway).
        let seq = &self.shared.view_seq;
        let s = view_seq::begin(seq);
        let old = self.shared.view.swap(view.clone());
        view_seq::end(seq, s);
        if let Some(k) = old.census_key() {
            census.remove_edge(self.shared.census_key, k);
        }
        if let Some(k) = view.census_key() {
            census.add_edge(self.shared.census_key, k);
        }
    }

    /// The census key of this handle's shared state.
    pub fn census_key(&self) -> ObjectKey {
        self.shared.census_key
    }
}

impl fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddressSpace")
            .field("name", &self.shared.name)
            .field("id", &self.shared.id)
            .finish()
    }
}

/// The control-plane half of an address space.
pub(crate) struct SpaceNode {
    pub(crate) name: Box<str>,
    pub(crate) root: Option<RegionId>,
    pub(crate) owner: Option<OwnerId>,
    pub(crate) handle: AddressSpace,
    /// Creation sequence number: QEMU's global address-space list order.
    pub(crate) seq: u64,
}

/// The flat view an address space published, borrowed for one access
/// ([`AddressSpace::view_guard`]): derefs to the [`FlatView`].
///
/// Loading it usually touches no reference count; hold it only for the
/// duration of an access (holding it pins that view's memory, and holding
/// more than a few at once on one thread makes further loads count
/// references). For a view to keep, use [`AddressSpace::view`] or [`CurrentView::to_arc`].
pub struct CurrentView(arc_swap::Guard<Arc<FlatView>>);

impl CurrentView {
    /// A counted reference to the same view, to keep past the access.
    pub fn to_arc(&self) -> Arc<FlatView> {
        Arc::clone(&self.0)
    }
}

impl std::ops::Deref for CurrentView {
    type Target = FlatView;
    fn deref(&self) -> &FlatView {
        &self.0
    }
}

impl fmt::Debug for CurrentView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CurrentView")
            .field(&self.0.root_name())
            .finish()
    }
}
