//! IOMMU memory regions: translation, IOTLB notifiers and the IOTLB cache
//! (QEMU `IOMMUMemoryRegion`, `address_space_translate_iommu`).
//!
//! An IOMMU region ([`RegionKind::Iommu`](crate::RegionKind::Iommu)) is a terminating region whose
//! accesses are not served by the region itself: every access is first
//! translated by the device implementing [`Iommu`] into an [`IotlbEntry`]
//! (target address space, translated address, page mask, permissions), then
//! carried out in the target address space — which may contain another
//! IOMMU region (a chain). A buffer access is split at translation
//! boundaries; a denied or failed translation makes that piece a decode
//! error (QEMU's unassigned section: reads return zeros), never a panic.
//!
//! Rendering, `info mtree` and flat views treat an IOMMU region like MMIO
//! (QEMU prints its type as `i/o`).
//!
//! # The notifier hub
//!
//! Each IOMMU region has an [`IommuHub`], created by the device's author
//! before the region and shared between the region and the device: the
//! device sends its IOTLB events through [`IommuHub::notify`]; consumers
//! (VFIO- or vhost-style shadow mappings) register [`IommuNotifier`]s for a
//! range, an index and a set of [`NotifierFlags`]. The hub holds the device
//! only weakly, so a device holding its hub makes no reference cycle.
//!
//! # Invariants
//!
//! * An event reaches a notifier only if the notifier's index matches, its
//!   flags include the event's kind and the event's range overlaps the
//!   notifier's range. An entry inside the range is passed unchanged; one
//!   that overlaps it in part is passed as the whole overlap, split into
//!   aligned power-of-two blocks, one call per block (QEMU passes one entry
//!   with `addr_mask = min(end, last) - iova`, which need not be a power of
//!   two minus one; memtree keeps every entry well formed instead). Replay
//!   crops the same way.
//! * Registrations and unregistrations of one hub are serialised, so the
//!   device is told every change of a context's flag union in order (each
//!   call's `old` is the previous call's `new`).
//! * Once [`IommuHub::unregister_notifier`] returns, the notifier is never
//!   called again — except when unregistering from inside a notifier
//!   callback (of any hub) on the same thread: then no new call starts, but
//!   a call already running on another thread may still finish (waiting for
//!   it there could deadlock with a thread doing the same).
//! * Every event invalidates the hub's IOTLB cache before any notifier runs,
//!   and a translation that raced with an event is not cached (the cache
//!   carries a generation), so the cache never serves a translation the
//!   device has since withdrawn — provided the device notifies (or calls
//!   [`IommuHub::invalidate_cache`]) after changing or removing a mapping.
//! * A cached translation holds no reference: its slot names the target
//!   address space by index into the hub's append-only target table and
//!   the range of the target's view that served it by index. A hit uses
//!   that range only if the target's *current* view (held by a guard for
//!   the access) has it containing the translated address, directly
//!   accessible: a target view that changed since is searched again, so
//!   the cache never serves memory the target no longer maps there.
//! * A [`SpaceCursor`](crate::access::dispatch::SpaceCursor) copies the last slot it used
//!   and caches its target's view cursor-style (revalidated by one relaxed
//!   pointer comparison per access, like its own view); the copy is
//!   re-checked against the hub's generation at every access.
//! * Chains are followed at most [`MAX_CHAIN_DEPTH`] IOMMUs deep; deeper (a
//!   loop of IOMMUs translating into each other) is a decode error.
//! * Device and notifier code (other people's code) runs with no lock of
//!   memtree held: a notifier may register or unregister notifiers and a
//!   device may notify from `translate`'s caller's thread.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{fence, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

use crate::access::dispatch::Primitive;
use crate::access::space::{AddressSpace, SpaceShared};
use crate::region::attrs::{Endian, MemTxAttrs, MemTxResult};
use crate::region::region_core::{Backing, IommuBacking, RegionCore};
use crate::view::flatview::{FlatRange, FlatView};

/// Permissions of a translation, or the access asked for (QEMU
/// `IOMMUAccessFlags`: NONE 0, RO 1, WO 2, RW 3).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum IommuPerm {
    /// No access (an unmapped page; or, asked for, "report the full
    /// permissions").
    None,
    /// Read only.
    Read,
    /// Write only.
    Write,
    /// Read and write.
    ReadWrite,
}

impl IommuPerm {
    /// The QEMU bit encoding.
    pub fn bits(self) -> u8 {
        match self {
            IommuPerm::None => 0,
            IommuPerm::Read => 1,
            IommuPerm::Write => 2,
            IommuPerm::ReadWrite => 3,
        }
    }

    /// From the QEMU bit encoding (higher bits ignored).
    pub fn from_bits(bits: u8) -> IommuPerm {
        match bits & 3 {
            0 => IommuPerm::None,
            1 => IommuPerm::Read,
            2 => IommuPerm::Write,
            _ => IommuPerm::ReadWrite,
        }
    }

    /// Whether these permissions allow every access in `access`.
    pub fn allows(self, access: IommuPerm) -> bool {
        self.bits() & access.bits() == access.bits()
    }
}

/// One translation (QEMU `IOMMUTLBEntry`): the page of `addr_mask + 1`
/// bytes at `iova` maps to `translated_addr` in `target`.
#[derive(Clone)]
pub struct IotlbEntry {
    /// Where translated accesses go; `None` for an entry without
    /// permissions (nothing mapped).
    pub target: Option<AddressSpace>,
    /// First input address of the page (aligned to `addr_mask + 1`).
    pub iova: u64,
    /// Output address of the page's first byte.
    pub translated_addr: u64,
    /// Page size minus one (`0xfff` for 4 KiB): a power of two minus one.
    pub addr_mask: u64,
    /// What the page allows.
    pub perm: IommuPerm,
}

impl IotlbEntry {
    /// An entry denying everything for the page of `addr_mask + 1` bytes
    /// around `addr` (use `0xfff` when unsure).
    pub fn denied(addr: u64, addr_mask: u64) -> IotlbEntry {
        IotlbEntry {
            target: None,
            iova: addr & !addr_mask,
            translated_addr: 0,
            addr_mask,
            perm: IommuPerm::None,
        }
    }

    /// Whether `addr` lies in this entry's page.
    pub fn covers(&self, addr: u64) -> bool {
        addr & !self.addr_mask == self.iova & !self.addr_mask
    }

    /// The output address of `addr` (which must lie in the page).
    pub fn translate(&self, addr: u64) -> u64 {
        (self.translated_addr & !self.addr_mask) | (addr & self.addr_mask)
    }

    /// Bytes from `addr` to the end of the page (saturating at 2^64 - 1).
    pub fn remaining(&self, addr: u64) -> u64 {
        (self.addr_mask - (addr & self.addr_mask)).saturating_add(1)
    }

    /// Whether the entry is well formed: the mask is a power of two minus
    /// one. Malformed entries from a device are treated as denied.
    pub fn is_well_formed(&self) -> bool {
        self.addr_mask.wrapping_add(1) & self.addr_mask == 0
    }
}

impl fmt::Debug for IotlbEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IotlbEntry")
            .field("target", &self.target.as_ref().map(|t| t.name().to_owned()))
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("translated", &format_args!("{:#x}", self.translated_addr))
            .field("mask", &format_args!("{:#x}", self.addr_mask))
            .field("perm", &self.perm)
            .finish()
    }
}

impl PartialEq for IotlbEntry {
    fn eq(&self, o: &IotlbEntry) -> bool {
        let same_target = match (&self.target, &o.target) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(&a.shared, &b.shared),
            _ => false,
        };
        same_target
            && self.iova == o.iova
            && self.translated_addr == o.translated_addr
            && self.addr_mask == o.addr_mask
            && self.perm == o.perm
    }
}

/// Which events a notifier wants (QEMU `IOMMUNotifierFlag`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct NotifierFlags(pub u8);

impl NotifierFlags {
    /// No events.
    pub const NONE: NotifierFlags = NotifierFlags(0);
    /// Unmap events (`IOMMU_NOTIFIER_UNMAP`).
    pub const UNMAP: NotifierFlags = NotifierFlags(1);
    /// Map events (`IOMMU_NOTIFIER_MAP`).
    pub const MAP: NotifierFlags = NotifierFlags(2);
    /// Device-IOTLB unmap events (`IOMMU_NOTIFIER_DEVIOTLB_UNMAP`).
    pub const DEVIOTLB_UNMAP: NotifierFlags = NotifierFlags(4);
    /// Map and unmap (`IOMMU_NOTIFIER_IOTLB_EVENTS`).
    pub const IOTLB_EVENTS: NotifierFlags = NotifierFlags(3);

    /// Whether every flag of `o` is set here.
    pub fn contains(self, o: NotifierFlags) -> bool {
        self.0 & o.0 == o.0
    }
    /// Whether any flag of `o` is set here.
    pub fn intersects(self, o: NotifierFlags) -> bool {
        self.0 & o.0 != 0
    }
    /// The union.
    pub fn union(self, o: NotifierFlags) -> NotifierFlags {
        NotifierFlags(self.0 | o.0)
    }
}

/// The kind of an IOTLB event (QEMU `IOMMUNotifierFlag` of the event).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum IotlbEventKind {
    /// A page was mapped.
    Map,
    /// A page was unmapped (the entry's permissions must be `None`).
    Unmap,
    /// A device-IOTLB page was invalidated.
    DevIotlbUnmap,
}

impl IotlbEventKind {
    /// The notifier flag this event needs.
    pub fn flag(self) -> NotifierFlags {
        match self {
            IotlbEventKind::Map => NotifierFlags::MAP,
            IotlbEventKind::Unmap => NotifierFlags::UNMAP,
            IotlbEventKind::DevIotlbUnmap => NotifierFlags::DEVIOTLB_UNMAP,
        }
    }
}

/// An IOTLB event (QEMU `IOMMUTLBEvent`).
#[derive(Clone, Debug, PartialEq)]
pub struct IotlbEvent {
    /// What happened.
    pub kind: IotlbEventKind,
    /// The page(s) it happened to.
    pub entry: IotlbEntry,
}

/// Why an event was not delivered or a notifier not registered.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IommuError {
    /// The IOMMU refused the notifier (`notify_flag_changed` failed).
    Refused(String),
    /// A notifier with no flags, an empty or inverted range, or an index the
    /// IOMMU does not have.
    BadNotifier(String),
    /// An UNMAP or device-IOTLB UNMAP event whose entry has permissions.
    UnmapWithPermissions,
    /// The IOMMU device is gone (its region was finalized).
    DeviceGone,
    /// A notifier or device callback panicked; the message says which.
    Panicked(String),
    /// The default replay walk would take more than [`MAX_REPLAY_STEPS`]
    /// translations (the range is too large for the device's minimum page
    /// size): implement [`Iommu::replay`], or replay a smaller range.
    ReplayTooLong {
        /// Translations the walk would need.
        steps: u128,
    },
}

/// The most translations the default replay walk makes (2^24): beyond, it
/// refuses instead of running for hours (QEMU's walk of a 2^64 region at
/// 4 KiB never ends).
pub const MAX_REPLAY_STEPS: u128 = 1 << 24;

impl fmt::Display for IommuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IommuError::Refused(m) => write!(f, "the IOMMU refused the notifier: {m}"),
            IommuError::BadNotifier(m) => write!(f, "invalid IOMMU notifier: {m}"),
            IommuError::UnmapWithPermissions => {
                f.write_str("an UNMAP event must carry no permissions")
            }
            IommuError::DeviceGone => f.write_str("the IOMMU device is gone"),
            IommuError::Panicked(m) => write!(f, "IOMMU callback panicked: {m}"),
            IommuError::ReplayTooLong { steps } => write!(
                f,
                "the default replay walk would take {steps} translations (limit {MAX_REPLAY_STEPS})"
            ),
        }
    }
}

impl std::error::Error for IommuError {}

/// A device that translates (QEMU `IOMMUMemoryRegionClass`).
///
/// `translate` must be total: return [`IotlbEntry::denied`] for an address
/// it cannot translate. Asked with `IommuPerm::None` it must report the
/// page's full permissions (used by replay). A device changing or removing
/// a mapping must then notify its hub (or call
/// [`IommuHub::invalidate_cache`]), or cached translations stay in use.
pub trait Iommu: Send + Sync + 'static {
    /// Translates `addr` (an offset in the IOMMU region) for `access` in
    /// translation context `iommu_idx`.
    fn translate(&self, addr: u64, access: IommuPerm, iommu_idx: u32) -> IotlbEntry;

    /// The translation context of an access (QEMU `attrs_to_index`);
    /// default 0.
    fn attrs_to_index(&self, _attrs: MemTxAttrs) -> u32 {
        0
    }

    /// How many contexts there are (QEMU `num_indexes`); default 1.
    fn num_indexes(&self) -> u32 {
        1
    }

    /// The smallest page the IOMMU maps (QEMU `get_min_page_size`); default
    /// 4 KiB. The default replay walks at this step.
    fn min_page_size(&self) -> u64 {
        0x1000
    }

    /// The union of the flags of the notifiers of context `iommu_idx`
    /// changes from `old` to `new` (QEMU `notify_flag_changed`). An error
    /// refuses the notifier being registered.
    fn notify_flag_changed(
        &self,
        _old: NotifierFlags,
        _new: NotifierFlags,
        _iommu_idx: u32,
    ) -> Result<(), String> {
        Ok(())
    }

    /// Walks every current mapping of context `iommu_idx` inside
    /// `[start, last]` into `sink` (QEMU's class `replay`). Return `false`
    /// (the default) to let memtree walk by translating every
    /// [`Iommu::min_page_size`] step.
    fn replay(
        &self,
        _iommu_idx: u32,
        _start: u64,
        _last: u64,
        _sink: &mut dyn FnMut(IotlbEntry),
    ) -> bool {
        false
    }
}

/// A notifier callback (QEMU `IOMMUNotify`).
pub type NotifyFn = dyn Fn(&IotlbEvent) + Send + Sync;

/// Identity of a registered notifier.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct NotifierId(u64);

/// A notifier registration (QEMU `IOMMUNotifier`): `[start, last]`
/// inclusive, like QEMU's `end`.
///
/// An event whose page lies partly outside `[start, last]` reaches the
/// callback as the overlap split into aligned power-of-two blocks, one call
/// per block, each a well-formed entry (`iova` aligned to `addr_mask + 1`).
/// QEMU sends one entry with the possibly non-power-of-two mask
/// `min(end, last) - iova`; both cover the same bytes.
#[derive(Clone)]
pub struct IommuNotifier {
    /// Events wanted.
    pub flags: NotifierFlags,
    /// First address of interest.
    pub start: u64,
    /// Last address of interest (inclusive).
    pub last: u64,
    /// Translation context.
    pub iommu_idx: u32,
    /// The callback.
    pub notify: Arc<NotifyFn>,
}

impl fmt::Debug for IommuNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IommuNotifier")
            .field("flags", &self.flags)
            .field("start", &format_args!("{:#x}", self.start))
            .field("last", &format_args!("{:#x}", self.last))
            .field("iommu_idx", &self.iommu_idx)
            .finish()
    }
}

/// Number of slots of the direct-mapped IOTLB cache.
const CACHE_SLOTS: usize = 64;

/// Most distinct target address spaces one hub's cache names (a slot names
/// its target by index into [`IommuHub::targets`]).
const MAX_TARGETS: usize = 4;

/// `Slot::hint` when the translated page has no directly accessible range
/// to remember (MMIO, a hole, another IOMMU).
const NO_HINT: u64 = u64::MAX;

/// One slot of the IOTLB cache: plain data in atomics under a sequence
/// lock (`seq` odd while a writer fills it), so that a hit takes no lock,
/// touches no reference count and holds nothing: a slot only *names* its
/// target (an index into the hub's append-only target table) and the range
/// of the target's view that served the page last (`hint`), which a hit
/// re-checks against the target's current view.
struct Slot {
    seq: AtomicU64,
    /// The hub generation the translation was made under: the slot is valid
    /// only while it equals the hub's.
    generation: AtomicU64,
    /// First input address of the page.
    iova: AtomicU64,
    addr_mask: AtomicU64,
    translated: AtomicU64,
    /// `iommu_idx` (low 32 bits), permission bits (8), target index (8).
    meta: AtomicU64,
    /// Index, in the target's view, of the range that served the page's
    /// translated address when the slot was filled ([`NO_HINT`] if it was
    /// not directly accessible RAM).
    hint: AtomicU64,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            seq: AtomicU64::new(0),
            // Never equal to a hub generation before a fill.
            generation: AtomicU64::new(u64::MAX),
            iova: AtomicU64::new(0),
            addr_mask: AtomicU64::new(0),
            translated: AtomicU64::new(0),
            meta: AtomicU64::new(0),
            hint: AtomicU64::new(NO_HINT),
        }
    }
}

/// A consistent copy of a slot.
#[derive(Copy, Clone)]
struct Cached {
    generation: u64,
    iova: u64,
    addr_mask: u64,
    translated: u64,
    idx: u32,
    perm: IommuPerm,
    target: usize,
    hint: u64,
}

impl Cached {
    #[inline]
    fn covers(&self, addr: u64) -> bool {
        addr & !self.addr_mask == self.iova
    }
    #[inline]
    fn translate(&self, addr: u64) -> u64 {
        (self.translated & !self.addr_mask) | (addr & self.addr_mask)
    }
    #[inline]
    fn remaining(&self, addr: u64) -> u64 {
        (self.addr_mask - (addr & self.addr_mask)).saturating_add(1)
    }
}

#[inline]
fn slot_of(addr: u64) -> usize {
    ((addr >> 12) as usize) % CACHE_SLOTS
}

/// The notifier list and IOTLB cache of one IOMMU region; see the
/// [module docs](self).
pub struct IommuHub {
    device: OnceLock<Weak<dyn Iommu>>,
    /// The region's size, set with the device (bounds the default replay).
    region_size: OnceLock<u128>,
    notifiers: Mutex<Vec<(NotifierId, IommuNotifier, Arc<DeliveryGate>)>>,
    /// Held across a (un)registration's flag computation, the device's
    /// `notify_flag_changed` and the list update, so that the device hears
    /// flag changes in order; separate from `notifiers` so that delivery is
    /// not blocked. Its value is set while the device is being told (a
    /// registration from inside `notify_flag_changed` is refused).
    registration: parking_lot::ReentrantMutex<Cell<bool>>,
    next_id: AtomicU64,
    /// The IOTLB cache (see [`Slot`]).
    slots: [Slot; CACHE_SLOTS],
    /// The address spaces cached translations land in, appended on first
    /// use and kept for the hub's life (a slot names one by index, so a hit
    /// needs no reference count). At most [`MAX_TARGETS`]; translations
    /// into further spaces are not cached.
    targets: [OnceLock<AddressSpace>; MAX_TARGETS],
    /// Bumped by every invalidation: a slot filled under an older
    /// generation is dead, and a translation that raced an invalidation is
    /// stored under the old one (so never served).
    generation: AtomicU64,
    /// Whether the device has a single translation context (1), several
    /// (2), or it was not asked yet (0): with one, `attrs_to_index` is not
    /// called (its answer must be 0).
    single_index: AtomicU8,
    misses: AtomicU64,
}

impl fmt::Debug for IommuHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IommuHub")
            .field("notifiers", &self.notifiers.lock().len())
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .finish()
    }
}

impl IommuHub {
    /// A hub for one IOMMU region, to be passed to
    /// [`crate::Machine::new_iommu`] and kept by the device to notify.
    pub fn new() -> Arc<IommuHub> {
        Arc::new(IommuHub {
            device: OnceLock::new(),
            region_size: OnceLock::new(),
            notifiers: Mutex::new(Vec::new()),
            registration: parking_lot::ReentrantMutex::new(Cell::new(false)),
            next_id: AtomicU64::new(1),
            slots: std::array::from_fn(|_| Slot::new()),
            targets: std::array::from_fn(|_| OnceLock::new()),
            generation: AtomicU64::new(0),
            single_index: AtomicU8::new(0),
            misses: AtomicU64::new(0),
        })
    }

    pub(crate) fn is_attached(&self) -> bool {
        self.device.get().is_some()
    }

    pub(crate) fn attach(&self, device: Weak<dyn Iommu>, region_size: u128) {
        // A second attach can only come from a racing `new_iommu` with the
        // same hub; the first region keeps the hub.
        if self.device.set(device).is_ok() {
            let _ = self.region_size.set(region_size);
        }
    }

    fn device(&self) -> Result<Arc<dyn Iommu>, IommuError> {
        self.device
            .get()
            .and_then(Weak::upgrade)
            .ok_or(IommuError::DeviceGone)
    }

    fn flags_of(
        list: &[(NotifierId, IommuNotifier, Arc<DeliveryGate>)],
        idx: u32,
    ) -> NotifierFlags {
        list.iter()
            .filter(|(_, n, _)| n.iommu_idx == idx)
            .fold(NotifierFlags::NONE, |a, (_, n, _)| a.union(n.flags))
    }

    /// Checks `notifier`'s flags, range and index (for registration and
    /// replay).
    fn check_notifier(
        &self,
        device: &dyn Iommu,
        notifier: &IommuNotifier,
    ) -> Result<(), IommuError> {
        if notifier.flags.0 & 7 == 0 || notifier.flags.0 & !7 != 0 {
            return Err(IommuError::BadNotifier(format!(
                "flags {:#x}",
                notifier.flags.0
            )));
        }
        if notifier.start > notifier.last {
            return Err(IommuError::BadNotifier(format!(
                "range {:#x}..={:#x} is inverted",
                notifier.start, notifier.last
            )));
        }
        let idx = notifier.iommu_idx;
        let n = catch_dev(|| device.num_indexes())?;
        if idx >= n {
            return Err(IommuError::BadNotifier(format!(
                "index {idx} (the IOMMU has {n})"
            )));
        }
        Ok(())
    }

    /// Registers `notifier` (QEMU `memory_region_register_iommu_notifier`).
    /// The device is told the new flag union first and may refuse.
    ///
    /// # Errors
    ///
    /// [`IommuError::BadNotifier`] (also for a registration from inside
    /// the device's `notify_flag_changed`), [`IommuError::Refused`],
    /// [`IommuError::DeviceGone`], [`IommuError::Panicked`].
    pub fn register_notifier(&self, notifier: IommuNotifier) -> Result<NotifierId, IommuError> {
        let device = self.device()?;
        self.check_notifier(&*device, &notifier)?;
        let idx = notifier.iommu_idx;
        let telling = self.registration.lock();
        if telling.get() {
            return Err(IommuError::BadNotifier(
                "registered from inside the device's notify_flag_changed".to_owned(),
            ));
        }
        let old = Self::flags_of(&self.notifiers.lock(), idx);
        let new = old.union(notifier.flags);
        if new != old {
            telling.set(true);
            let told = catch_dev(|| device.notify_flag_changed(old, new, idx));
            telling.set(false);
            told?.map_err(IommuError::Refused)?;
        }
        let id = NotifierId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let gate = Arc::new(DeliveryGate::default());
        self.notifiers.lock().push((id, notifier, gate));
        Ok(id)
    }

    /// Unregisters a notifier; tells the device when the flag union shrinks.
    /// Returns whether it was registered. Once it returns, the notifier is
    /// not called again: it waits for calls in flight on other threads,
    /// unless called from inside a notifier callback (see the
    /// [module docs](self)).
    pub fn unregister_notifier(&self, id: NotifierId) -> bool {
        let telling = self.registration.lock();
        let (idx, old, new, gate) = {
            let mut list = self.notifiers.lock();
            let Some(i) = list.iter().position(|(i, _, _)| *i == id) else {
                return false;
            };
            let idx = list[i].1.iommu_idx;
            let old = Self::flags_of(&list, idx);
            let (_, _, gate) = list.remove(i);
            (idx, old, Self::flags_of(&list, idx), gate)
        };
        gate.close();
        if old != new {
            if let Ok(device) = self.device() {
                // Shrinking cannot be refused; a panic is the device's bug and
                // must not undo the unregistration.
                let was = telling.replace(true);
                let _ = catch_dev(|| device.notify_flag_changed(old, new, idx));
                telling.set(was);
            }
        }
        // Wait with no lock held: a call in flight may (un)register.
        drop(telling);
        if DELIVERING.with(Cell::get) == 0 {
            gate.wait_idle();
        }
        true
    }

    /// The registered notifiers (for diagnostics).
    pub fn notifiers(&self) -> Vec<(NotifierId, IommuNotifier)> {
        self.notifiers
            .lock()
            .iter()
            .map(|(id, n, _)| (*id, n.clone()))
            .collect()
    }

    /// Drops every cached translation.
    pub fn invalidate_cache(&self) {
        // Every slot names the generation it was filled under: moving on
        // kills them all at once.
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// How many translations missed the cache so far (diagnostics, tests).
    pub fn cache_misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Sends `event` for context `iommu_idx` to every matching notifier
    /// (QEMU `memory_region_notify_iommu`), cropped to each notifier's
    /// range, after invalidating the IOTLB cache. Returns how many
    /// notifiers were called.
    ///
    /// # Errors
    ///
    /// [`IommuError::UnmapWithPermissions`] (nothing delivered, the cache is
    /// still invalidated); [`IommuError::Panicked`] if a notifier panicked
    /// (the others were still called).
    pub fn notify(&self, iommu_idx: u32, event: &IotlbEvent) -> Result<usize, IommuError> {
        self.invalidate_cache();
        if event.kind != IotlbEventKind::Map && event.entry.perm != IommuPerm::None {
            return Err(IommuError::UnmapWithPermissions);
        }
        let matching: Vec<(IommuNotifier, Arc<DeliveryGate>)> = self
            .notifiers
            .lock()
            .iter()
            .filter(|(_, n, _)| n.iommu_idx == iommu_idx && n.flags.contains(event.kind.flag()))
            .map(|(_, n, g)| (n.clone(), g.clone()))
            .collect();
        let mut called = 0;
        let mut panic = None;
        for (n, gate) in &matching {
            let blocks = crop(&event.entry, n.start, n.last);
            // Unregistered since the list was copied: not called.
            if blocks.is_empty() || !gate.enter() {
                continue;
            }
            called += 1;
            DELIVERING.with(|d| d.set(d.get() + 1));
            for entry in blocks {
                let ev = IotlbEvent {
                    kind: event.kind,
                    entry,
                };
                if let Err(p) = crate::lifecycle::deferral::catch(|| (n.notify)(&ev)) {
                    panic.get_or_insert(crate::lifecycle::deferral::panic_message(&p));
                }
            }
            DELIVERING.with(|d| d.set(d.get() - 1));
            gate.leave();
        }
        match panic {
            Some(m) => Err(IommuError::Panicked(m)),
            None => Ok(called),
        }
    }

    /// Walks the current mappings of `notifier`'s context and range into it
    /// as MAP events (QEMU `memory_region_iommu_replay`): through the
    /// device's own walker if it has one, else by translating every
    /// [`Iommu::min_page_size`] step (skipping whole pages when an entry is
    /// larger). The default walk costs one translation per step: devices
    /// with large sparse spaces should implement [`Iommu::replay`].
    ///
    /// # Errors
    ///
    /// [`IommuError::BadNotifier`] (as [`IommuHub::register_notifier`]),
    /// [`IommuError::DeviceGone`], [`IommuError::Panicked`],
    /// [`IommuError::ReplayTooLong`].
    pub fn replay(&self, notifier: &IommuNotifier) -> Result<usize, IommuError> {
        let device = self.device()?;
        self.check_notifier(&*device, notifier)?;
        let mut count = 0usize;
        let (start, idx) = (notifier.start, notifier.iommu_idx);
        // Only the region's addresses are walked (QEMU walks 0..size).
        let size = self.region_size.get().copied().unwrap_or(0);
        let Some(region_last) = size.checked_sub(1) else {
            return Ok(0);
        };
        let last = u64::try_from(region_last).map_or(notifier.last, |l| l.min(notifier.last));
        if start > last {
            return Ok(0);
        }
        let mut sink = |e: IotlbEntry| {
            if e.perm == IommuPerm::None || !e.is_well_formed() {
                return;
            }
            for c in crop(&e, start, last) {
                count += 1;
                (notifier.notify)(&IotlbEvent {
                    kind: IotlbEventKind::Map,
                    entry: c,
                });
            }
        };
        let step = catch_dev(|| device.min_page_size())?
            .max(1)
            .checked_next_power_of_two()
            .unwrap_or(1 << 63);
        let steps = (u128::from(last) - u128::from(start & !(step - 1))) / u128::from(step) + 1;
        let walked = crate::lifecycle::deferral::catch(std::panic::AssertUnwindSafe(|| {
            if device.replay(idx, start, last, &mut sink) {
                return Ok(());
            }
            if steps > MAX_REPLAY_STEPS {
                return Err(IommuError::ReplayTooLong { steps });
            }
            let mut addr = start & !(step - 1);
            loop {
                let e = device.translate(addr, IommuPerm::None, idx);
                let page = if e.is_well_formed() && e.covers(addr) {
                    (e.addr_mask | (step - 1)).saturating_add(1)
                } else {
                    step
                };
                let next = (addr & !(page - 1)).checked_add(page);
                sink(e);
                match next {
                    Some(n) if n <= last && n > addr => addr = n,
                    _ => break,
                }
            }
            Ok(())
        }));
        match walked {
            Ok(Ok(())) => Ok(count),
            Ok(Err(e)) => Err(e),
            Err(p) => Err(IommuError::Panicked(
                crate::lifecycle::deferral::panic_message(&p),
            )),
        }
    }

    /// The cached translation of `addr` for context `idx`, if a live slot
    /// holds one (a consistent copy of the slot, validated against the
    /// hub's generation).
    #[inline]
    fn lookup_cached(&self, addr: u64, idx: u32) -> Option<Cached> {
        let slot = &self.slots[slot_of(addr)];
        let seq = slot.seq.load(Ordering::Acquire);
        if seq & 1 != 0 {
            return None;
        }
        let c = Cached {
            generation: slot.generation.load(Ordering::Relaxed),
            iova: slot.iova.load(Ordering::Relaxed),
            addr_mask: slot.addr_mask.load(Ordering::Relaxed),
            translated: slot.translated.load(Ordering::Relaxed),
            idx: 0,
            perm: IommuPerm::None,
            target: 0,
            hint: slot.hint.load(Ordering::Relaxed),
        };
        let meta = slot.meta.load(Ordering::Relaxed);
        // Order the field loads before the re-check of `seq` (seqlock).
        fence(Ordering::Acquire);
        if slot.seq.load(Ordering::Relaxed) != seq {
            return None;
        }
        let c = Cached {
            idx: meta as u32,
            perm: IommuPerm::from_bits((meta >> 32) as u8),
            target: ((meta >> 40) & 0xff) as usize,
            ..c
        };
        (c.generation == self.generation.load(Ordering::Acquire) && c.idx == idx && c.covers(addr))
            .then_some(c)
    }

    /// The target address space of a cached translation.
    #[inline]
    fn target(&self, c: &Cached) -> Option<&AddressSpace> {
        self.targets.get(c.target)?.get()
    }

    /// The index of `space` in the target table, appending it if there is
    /// room.
    fn target_index(&self, space: &AddressSpace) -> Option<usize> {
        for (i, t) in self.targets.iter().enumerate() {
            let cur = t.get_or_init(|| space.clone());
            if Arc::ptr_eq(&cur.shared, &space.shared) {
                return Some(i);
            }
        }
        None
    }

    /// The translation context of an access with `attrs`.
    #[inline(always)]
    fn index_of(&self, device: &dyn Iommu, attrs: MemTxAttrs) -> Result<u32, IommuError> {
        if self.single_index.load(Ordering::Relaxed) == 1 {
            return Ok(0);
        }
        self.index_of_slow(device, attrs)
    }

    #[inline(never)]
    fn index_of_slow(&self, device: &dyn Iommu, attrs: MemTxAttrs) -> Result<u32, IommuError> {
        match self.single_index.load(Ordering::Relaxed) {
            1 => Ok(0),
            2 => catch_dev(|| device.attrs_to_index(attrs)),
            _ => {
                let n = catch_dev(|| device.num_indexes())?;
                self.single_index
                    .store(if n == 1 { 1 } else { 2 }, Ordering::Relaxed);
                if n == 1 {
                    Ok(0)
                } else {
                    catch_dev(|| device.attrs_to_index(attrs))
                }
            }
        }
    }

    /// Runs `f` on the translation of `addr`, from the cache when it holds
    /// one (QEMU: the IOMMU's own IOTLB).
    #[inline]
    pub(crate) fn with_translation<R>(
        &self,
        device: &dyn Iommu,
        addr: u64,
        access: IommuPerm,
        idx: u32,
        f: impl FnOnce(&IotlbEntry) -> R,
    ) -> R {
        if let Some(c) = self.lookup_cached(addr, idx) {
            if c.perm.allows(access) {
                if let Some(t) = self.target(&c) {
                    return f(&IotlbEntry {
                        target: Some(t.clone()),
                        iova: c.iova,
                        translated_addr: c.translated,
                        addr_mask: c.addr_mask,
                        perm: c.perm,
                    });
                }
            }
        }
        f(&self.translate_miss(device, addr, access, idx))
    }

    #[inline(never)]
    fn translate_miss(
        &self,
        device: &dyn Iommu,
        addr: u64,
        access: IommuPerm,
        idx: u32,
    ) -> IotlbEntry {
        self.misses.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation.load(Ordering::Acquire);
        let e = match crate::lifecycle::deferral::catch(std::panic::AssertUnwindSafe(|| {
            device.translate(addr, access, idx)
        })) {
            Ok(e) if e.is_well_formed() && e.covers(addr) => e,
            // A panicking or malformed translation denies this page.
            _ => return IotlbEntry::denied(addr, 0xfff),
        };
        if let (Some(t), false) = (&e.target, e.perm == IommuPerm::None) {
            if let Some(ti) = self.target_index(t) {
                self.fill(slot_of(addr), generation, idx, ti, &e, t, addr);
            }
        }
        e
    }

    /// Stores `e` (made under `generation`) in slot `slot`, unless another
    /// writer holds the slot (then the translation is simply not cached).
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        slot: usize,
        generation: u64,
        idx: u32,
        target: usize,
        e: &IotlbEntry,
        space: &AddressSpace,
        addr: u64,
    ) {
        // The range of the target's current view serving the translated
        // address, if a hit may go straight to its memory.
        let ta = e.translate(addr);
        let hint = {
            let view = space.view_guard();
            view.lookup_index(ta)
                .filter(|&i| {
                    view.range(i)
                        .is_some_and(|r| r.is_direct_read() || r.is_direct_write())
                })
                .map_or(NO_HINT, |i| i as u64)
        };
        let s = &self.slots[slot];
        let seq = s.seq.load(Ordering::Relaxed);
        if seq & 1 != 0
            || s.seq
                .compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // Order the odd `seq` before the field stores (seqlock writer).
        fence(Ordering::Release);
        s.generation.store(generation, Ordering::Relaxed);
        s.iova.store(e.iova & !e.addr_mask, Ordering::Relaxed);
        s.addr_mask.store(e.addr_mask, Ordering::Relaxed);
        s.translated.store(e.translated_addr, Ordering::Relaxed);
        s.meta.store(
            u64::from(idx) | (u64::from(e.perm.bits()) << 32) | ((target as u64) << 40),
            Ordering::Relaxed,
        );
        s.hint.store(hint, Ordering::Relaxed);
        s.seq.store(seq + 2, Ordering::Release);
    }
}

fn catch_dev<R>(f: impl FnOnce() -> R) -> Result<R, IommuError> {
    crate::lifecycle::deferral::catch(std::panic::AssertUnwindSafe(f))
        .map_err(|p| IommuError::Panicked(crate::lifecycle::deferral::panic_message(&p)))
}

/// `entry` restricted to `[start, last]`: nothing if they do not overlap,
/// the entry itself if it lies inside, else the whole overlap split into
/// aligned power-of-two blocks (each the largest that starts where the
/// previous one ended and ends inside the overlap), so that every entry a
/// notifier sees is well formed. At most 128 blocks.
fn crop(entry: &IotlbEntry, start: u64, last: u64) -> Vec<IotlbEntry> {
    let e_start = entry.iova & !entry.addr_mask;
    let e_last = e_start | entry.addr_mask;
    if e_last < start || e_start > last {
        return Vec::new();
    }
    if e_start >= start && e_last <= last {
        return vec![entry.clone()];
    }
    let (mut lo, hi) = (e_start.max(start), e_last.min(last));
    let mut blocks = Vec::new();
    loop {
        let mut mask = match lo {
            0 => u64::MAX,
            _ => (1u64 << lo.trailing_zeros()) - 1,
        };
        while lo | mask > hi {
            mask >>= 1;
        }
        blocks.push(IotlbEntry {
            target: entry.target.clone(),
            iova: lo,
            translated_addr: entry.translate(lo),
            addr_mask: mask,
            perm: entry.perm,
        });
        match (lo | mask).checked_add(1) {
            Some(next) if next <= hi => lo = next,
            _ => return blocks,
        }
    }
}

thread_local! {
    /// How many notifier calls are running on this thread (of any hub): an
    /// unregistration from inside one does not wait for other threads.
    static DELIVERING: Cell<u32> = const { Cell::new(0) };
}

/// Whether a registered notifier may still be called (`open`), and how
/// many calls to it are running (`in_flight`): unregistering closes it and
/// waits until none runs.
struct DeliveryGate {
    /// (open, in_flight)
    state: Mutex<(bool, usize)>,
    idle: parking_lot::Condvar,
}

impl Default for DeliveryGate {
    fn default() -> DeliveryGate {
        DeliveryGate {
            state: Mutex::new((true, 0)),
            idle: parking_lot::Condvar::new(),
        }
    }
}

impl DeliveryGate {
    /// Starts a call if the notifier is still registered.
    fn enter(&self) -> bool {
        let mut st = self.state.lock();
        if st.0 {
            st.1 += 1;
        }
        st.0
    }

    fn leave(&self) {
        let mut st = self.state.lock();
        st.1 -= 1;
        if st.1 == 0 {
            self.idle.notify_all();
        }
    }

    /// No call starts after this.
    fn close(&self) {
        self.state.lock().0 = false;
    }

    /// Waits until no call runs.
    fn wait_idle(&self) {
        let mut st = self.state.lock();
        while st.1 != 0 {
            self.idle.wait(&mut st);
        }
    }
}

/// A weak handle to an address space, for IOMMU devices that name their
/// target address space without keeping it (and its view) alive.
#[derive(Clone, Debug)]
pub struct WeakAddressSpace(Weak<SpaceShared>);

impl WeakAddressSpace {
    /// The address space, if it still exists.
    pub fn upgrade(&self) -> Option<AddressSpace> {
        self.0.upgrade().map(|shared| AddressSpace { shared })
    }
}

impl fmt::Debug for SpaceShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl AddressSpace {
    /// A weak handle (see [`WeakAddressSpace`]).
    pub fn downgrade(&self) -> WeakAddressSpace {
        WeakAddressSpace(Arc::downgrade(&self.shared))
    }
}

/// What an IOMMU region's [`IommuBacking`] holds (the only type this
/// module puts there).
pub(crate) struct IommuParts {
    pub(crate) device: Arc<dyn Iommu>,
    pub(crate) hub: Arc<IommuHub>,
}

impl IommuParts {
    /// The backing of an IOMMU region.
    pub(crate) fn into_backing(self) -> Backing {
        Backing::Iommu(IommuBacking(Arc::new(self)))
    }
}

/// The device and hub of an IOMMU region, `None` for other kinds.
#[inline]
fn iommu_parts(core: &RegionCore) -> Option<&IommuParts> {
    match core.backing() {
        Backing::Iommu(b) => b.0.downcast_ref(),
        _ => None,
    }
}

impl RegionCore {
    /// The notifier hub of an IOMMU region, `None` for other kinds.
    pub fn iommu_hub(&self) -> Option<&Arc<IommuHub>> {
        iommu_parts(self).map(|p| &p.hub)
    }

    /// The device of an IOMMU region, `None` for other kinds.
    pub fn iommu_device(&self) -> Option<&Arc<dyn Iommu>> {
        iommu_parts(self).map(|p| &p.device)
    }
}

/// Maximum number of IOMMUs one access goes through.
pub const MAX_CHAIN_DEPTH: u32 = 8;

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f` one IOMMU deeper, or returns `None` past [`MAX_CHAIN_DEPTH`].
fn deeper<R>(f: impl FnOnce() -> R) -> Option<R> {
    let d = DEPTH.with(Cell::get);
    if d >= MAX_CHAIN_DEPTH {
        return None;
    }
    struct Reset(u32);
    impl Drop for Reset {
        fn drop(&mut self) {
            DEPTH.with(|c| c.set(self.0));
        }
    }
    DEPTH.with(|c| c.set(d + 1));
    let _reset = Reset(d);
    Some(f())
}

/// Runs `f` on the translation of the access at `addr` (in the view)
/// served by the IOMMU range `r` and the offset in the IOMMU region, or
/// returns `None` if the range's region is not an IOMMU.
#[inline]
fn with_translation_at<R>(
    r: &FlatRange,
    addr: u64,
    access: IommuPerm,
    attrs: MemTxAttrs,
    f: impl FnOnce(&IotlbEntry, u64) -> R,
) -> Option<R> {
    let core = r.region();
    let IommuParts { device, hub } = iommu_parts(core)?;
    let mr_addr = (addr - r.start()).wrapping_add(r.offset_in_region());
    if !core.is_live() {
        return Some(f(&IotlbEntry::denied(mr_addr, 0xfff), mr_addr));
    }
    let idx = match hub.index_of(device.as_ref(), attrs) {
        Ok(i) => i,
        Err(_) => return Some(f(&IotlbEntry::denied(mr_addr, 0xfff), mr_addr)),
    };
    Some(hub.with_translation(device.as_ref(), mr_addr, access, idx, |e| f(e, mr_addr)))
}

/// The warm path: if the IOTLB cache holds the translation of the access
/// at `addr` (in the view) through the IOMMU range `r`, and the range of
/// the target's *current* view it remembers still serves the translated
/// address directly for `access`, runs `f` on that range, the translated
/// address and the bytes available from it (bounded by the IOTLB page, the
/// IOMMU range and the target range). No device call, no second lookup,
/// no reference count: the target view is held by a guard for `f`.
#[inline]
fn direct_hit<R>(
    r: &FlatRange,
    addr: u64,
    access: IommuPerm,
    attrs: MemTxAttrs,
    f: impl FnOnce(&FlatRange, u64, u64) -> R,
) -> Option<R> {
    let core = r.region();
    let IommuParts { device, hub } = iommu_parts(core)?;
    if !core.is_live() {
        return None;
    }
    let mr_addr = (addr - r.start()).wrapping_add(r.offset_in_region());
    let idx = hub.index_of(device.as_ref(), attrs).ok()?;
    let c = hub.lookup_cached(mr_addr, idx)?;
    if !c.perm.allows(access) || c.hint == NO_HINT {
        return None;
    }
    let view = hub.target(&c)?.view_guard();
    hit_in_target(&c, &view, r, addr, mr_addr, access, f)
}

/// The end of a warm hit, shared by the shared-handle and cursor paths: the
/// range `c` remembers in the target's current `view` is re-checked (it
/// serves the translated address iff it contains it, ranges being
/// disjoint, so a target view changed since the fill falls back to the slow
/// path), then `f` runs on it with the length that stays inside the IOTLB
/// page, the IOMMU range `r` and the target range.
#[inline(always)]
fn hit_in_target<R>(
    c: &Cached,
    view: &FlatView,
    r: &FlatRange,
    addr: u64,
    mr_addr: u64,
    access: IommuPerm,
    f: impl FnOnce(&FlatRange, u64, u64) -> R,
) -> Option<R> {
    let tr = view.range(usize::try_from(c.hint).ok()?)?;
    let ta = c.translate(mr_addr);
    let direct = match access {
        IommuPerm::Write => tr.is_direct_write(),
        _ => tr.is_direct_read(),
    };
    if !tr.contains(ta) || !direct {
        return None;
    }
    let len = c
        .remaining(mr_addr)
        .min((r.last() - addr).saturating_add(1))
        .min((tr.last() - ta).saturating_add(1));
    Some(f(tr, ta, len))
}

/// A [`SpaceCursor`](crate::access::dispatch::SpaceCursor)'s own copy of the last IOTLB
/// entry it used, with a cursor-style cache of its target's view: a hit
/// makes no arc-swap load at all (the cursor's views are revalidated by one
/// relaxed pointer comparison each). Like the cursor's own view, the
/// target view it last used stays alive until the cursor's next access
/// through the entry, [`SpaceCursor::refresh`](crate::dispatch::SpaceCursor::refresh)
/// or its drop.
pub(crate) struct CursorIotlb {
    hub: Arc<IommuHub>,
    entry: Cached,
    target: arc_swap::Cache<crate::access::dispatch::ViewCellRef, Arc<FlatView>>,
    /// The cursor's view when the entry was last validated through its
    /// IOMMU range (held, so its address cannot be reused while compared)
    /// and the address of that range in it.
    source: Option<(Arc<FlatView>, usize)>,
}

/// [`direct_hit`] for a cursor: through the cursor's entry when it is still
/// valid (same hub, context and page, current hub generation), else copied
/// from the hub's cache (`None` if that misses too: the caller's slow path
/// fills it).
#[inline]
pub(crate) fn cursor_hit<R>(
    iotlb: &mut Option<CursorIotlb>,
    view: &Arc<FlatView>,
    r: &FlatRange,
    addr: u64,
    access: IommuPerm,
    attrs: MemTxAttrs,
    f: impl FnOnce(&FlatRange, u64, u64) -> R,
) -> Option<R> {
    // The same IOMMU range of the same (current) view as last time: the
    // region's kind and its owner's liveness need no second look (an
    // unplug publishes views without the region, which the cursor sees
    // first), and a single-context device needs no index.
    if let Some(e) = iotlb.as_mut() {
        let same = e
            .source
            .as_ref()
            .is_some_and(|(v, at)| Arc::ptr_eq(v, view) && *at == r as *const FlatRange as usize);
        if same && e.hub.single_index.load(Ordering::Relaxed) == 1 {
            let mr_addr = (addr - r.start()).wrapping_add(r.offset_in_region());
            let c = e.entry;
            if c.idx == 0
                && c.covers(mr_addr)
                && c.generation == e.hub.generation.load(Ordering::Acquire)
            {
                return cursor_use(e, r, addr, mr_addr, access, f);
            }
        }
    }
    let core = r.region();
    let IommuParts { device, hub } = iommu_parts(core)?;
    if !core.is_live() {
        return None;
    }
    let mr_addr = (addr - r.start()).wrapping_add(r.offset_in_region());
    let idx = hub.index_of(device.as_ref(), attrs).ok()?;
    let valid = iotlb.as_ref().is_some_and(|e| {
        Arc::ptr_eq(&e.hub, hub)
            && e.entry.idx == idx
            && e.entry.covers(mr_addr)
            && e.entry.generation == hub.generation.load(Ordering::Acquire)
    });
    if !valid {
        *iotlb = None;
        let c = hub.lookup_cached(mr_addr, idx)?;
        let t = hub.target(&c)?;
        *iotlb = Some(CursorIotlb {
            hub: hub.clone(),
            entry: c,
            target: arc_swap::Cache::new(crate::access::dispatch::ViewCellRef::new(t)),
            source: None,
        });
    }
    let e = iotlb.as_mut()?;
    let at = r as *const FlatRange as usize;
    if !e
        .source
        .as_ref()
        .is_some_and(|(v, a)| Arc::ptr_eq(v, view) && *a == at)
    {
        e.source = Some((view.clone(), at));
    }
    cursor_use(e, r, addr, mr_addr, access, f)
}

/// The rest of [`cursor_hit`] once the entry is valid.
#[inline]
fn cursor_use<R>(
    e: &mut CursorIotlb,
    r: &FlatRange,
    addr: u64,
    mr_addr: u64,
    access: IommuPerm,
    f: impl FnOnce(&FlatRange, u64, u64) -> R,
) -> Option<R> {
    let c = e.entry;
    if !c.perm.allows(access) || c.hint == NO_HINT {
        return None;
    }
    let view = e.target.load();
    hit_in_target(&c, view, r, addr, mr_addr, access, f)
}

/// For a DMA mapping at `addr` (in the view) through the IOMMU range `r`:
/// translates for `dir` and, when allowed, runs `f` on the target's current
/// view (held for the call), the index of its range containing the
/// translated address, that address, and the most bytes the translation
/// covers from there (IOTLB page and IOMMU range). `None` if `r` is not an
/// IOMMU range, the translation is denied, or nothing serves the
/// translated address.
pub(crate) fn with_direct_target<R>(
    r: &FlatRange,
    addr: u64,
    dir: crate::host::mapping_info::DmaDirection,
    attrs: MemTxAttrs,
    f: impl FnOnce(&FlatView, usize, u64, u64) -> R,
) -> Option<R> {
    let access = match (dir.reads(), dir.writes()) {
        (true, true) => IommuPerm::ReadWrite,
        (true, false) => IommuPerm::Read,
        _ => IommuPerm::Write,
    };
    with_translation_at(r, addr, access, attrs, |e, mr_addr| {
        let t = e.target.as_ref().filter(|_| e.perm.allows(access))?;
        let ta = e.translate(mr_addr);
        let max = e
            .remaining(mr_addr)
            .min((r.last() - addr).saturating_add(1));
        let view = t.view_guard();
        let j = view.lookup_index(ta)?;
        Some(f(&view, j, ta, max))
    })
    .flatten()
}

/// One piece of a buffer read at `addr` through the IOMMU range `r`:
/// returns its length and result, or `None` if `r` is not an IOMMU range.
pub(crate) fn read_piece(
    r: &FlatRange,
    addr: u64,
    rest: &mut [u8],
    attrs: MemTxAttrs,
) -> Option<(usize, MemTxResult)> {
    let hit = direct_hit(r, addr, IommuPerm::Read, attrs, |tr, ta, avail| {
        let len = (rest.len() as u64).min(avail) as usize;
        // SAFETY: `ta..ta + len` lies inside `tr`, a range of the target
        // view `direct_hit` holds, whose host memory covers the range;
        // `rest` is a distinct Rust buffer.
        unsafe { crate::host::ram::copy_from_guest(tr.host_at(ta), rest.as_mut_ptr(), len) };
        (len, MemTxResult::OK)
    });
    if hit.is_some() {
        return hit;
    }
    with_translation_at(r, addr, IommuPerm::Read, attrs, |e, mr_addr| {
        read_translated(r, addr, rest, attrs, e, mr_addr)
    })
}

fn read_translated(
    r: &FlatRange,
    addr: u64,
    rest: &mut [u8],
    attrs: MemTxAttrs,
    e: &IotlbEntry,
    mr_addr: u64,
) -> (usize, MemTxResult) {
    let avail = (r.last() - addr).saturating_add(1);
    let len = (rest.len() as u64).min(avail).min(e.remaining(mr_addr)) as usize;
    let piece = &mut rest[..len];
    let done = match (&e.target, e.perm.allows(IommuPerm::Read)) {
        (Some(t), true) => deeper(|| t.view_guard().read(e.translate(mr_addr), piece, attrs)),
        _ => None,
    };
    // A read not carried out (denied, no target, chain too deep) reads
    // zeros, like a hole; one carried out filled its own failed bytes.
    let res = done.unwrap_or_else(|| {
        piece.fill(0);
        MemTxResult::DECODE_ERROR
    });
    (len, res)
}

/// One piece of a buffer write through the IOMMU range `r` (see
/// [`read_piece`]).
pub(crate) fn write_piece(
    r: &FlatRange,
    addr: u64,
    rest: &[u8],
    attrs: MemTxAttrs,
) -> Option<(usize, MemTxResult)> {
    let hit = direct_hit(r, addr, IommuPerm::Write, attrs, |tr, ta, avail| {
        let len = (rest.len() as u64).min(avail) as usize;
        // SAFETY: `ta..ta + len` lies inside `tr`, a range of the target
        // view `direct_hit` holds, whose host memory covers the range;
        // `rest` is a distinct Rust buffer.
        unsafe { crate::host::ram::copy_to_guest(rest.as_ptr(), tr.host_at(ta), len) };
        tr.mark_dirty(ta, len as u64);
        (len, MemTxResult::OK)
    });
    if hit.is_some() {
        return hit;
    }
    with_translation_at(r, addr, IommuPerm::Write, attrs, |e, mr_addr| {
        let avail = (r.last() - addr).saturating_add(1);
        let len = (rest.len() as u64).min(avail).min(e.remaining(mr_addr)) as usize;
        let res = match (&e.target, e.perm.allows(IommuPerm::Write)) {
            (Some(t), true) => deeper(|| {
                t.view_guard()
                    .write(e.translate(mr_addr), &rest[..len], attrs)
            })
            .unwrap_or(MemTxResult::DECODE_ERROR),
            _ => MemTxResult::DECODE_ERROR,
        };
        (len, res)
    })
}

/// A typed load through the IOMMU range `r`, or `None` if `r` is not an
/// IOMMU range. An access crossing a translation boundary is split into
/// its pieces and reassembled in `order`.
pub(crate) fn load<T: Primitive>(
    r: &FlatRange,
    addr: u64,
    order: Endian,
    attrs: MemTxAttrs,
) -> Option<(T, MemTxResult)> {
    let size = u64::from(T::SIZE);
    let hit = direct_hit(r, addr, IommuPerm::Read, attrs, |tr, ta, avail| {
        (avail >= size).then(|| {
            // SAFETY: `size` bytes from `ta` lie inside `tr`, a range of
            // the target view `direct_hit` holds, whose host memory covers
            // it.
            let v = unsafe { T::load_from(tr.host_at(ta), order) };
            (v, MemTxResult::OK)
        })
    });
    if let Some(Some(done)) = hit {
        return Some(done);
    }
    let whole = with_translation_at(r, addr, IommuPerm::Read, attrs, |e, mr_addr| {
        if e.remaining(mr_addr) < size || (r.last() - addr) < size - 1 {
            return None;
        }
        Some(match (&e.target, e.perm.allows(IommuPerm::Read)) {
            (Some(t), true) => {
                deeper(|| t.view_guard().load::<T>(e.translate(mr_addr), order, attrs))
                    .unwrap_or((T::from_u64(0), MemTxResult::DECODE_ERROR))
            }
            _ => (T::from_u64(0), MemTxResult::DECODE_ERROR),
        })
    })?;
    if whole.is_some() {
        return whole;
    }
    let mut buf = [0u8; 8];
    let buf = &mut buf[..T::SIZE as usize];
    // Bytes past the end of the IOMMU range are not served by it: they are
    // a decode error (QEMU would hand the whole access to the first
    // piece's target).
    let inside = ((r.last() - addr).saturating_add(1)).min(size) as usize;
    let mut res = if inside < buf.len() {
        MemTxResult::DECODE_ERROR
    } else {
        MemTxResult::OK
    };
    let mut done = 0usize;
    while done < inside {
        let (l, x) = read_piece(
            r,
            addr.wrapping_add(done as u64),
            &mut buf[done..inside],
            attrs,
        )?;
        res |= x;
        done += l;
    }
    Some((T::from_u64(assemble(buf, order)), res))
}

/// A typed store through the IOMMU range `r` (see [`load`]).
pub(crate) fn store<T: Primitive>(
    r: &FlatRange,
    addr: u64,
    value: T,
    order: Endian,
    attrs: MemTxAttrs,
) -> Option<MemTxResult> {
    let size = u64::from(T::SIZE);
    let hit = direct_hit(r, addr, IommuPerm::Write, attrs, |tr, ta, avail| {
        (avail >= size).then(|| {
            // SAFETY: `size` bytes from `ta` lie inside `tr`, a range of
            // the target view `direct_hit` holds, whose host memory covers
            // it.
            unsafe { value.store_to(tr.host_at(ta), order) };
            tr.mark_dirty(ta, size);
            MemTxResult::OK
        })
    });
    if let Some(Some(done)) = hit {
        return Some(done);
    }
    let whole = with_translation_at(r, addr, IommuPerm::Write, attrs, |e, mr_addr| {
        if e.remaining(mr_addr) < size || (r.last() - addr) < size - 1 {
            return None;
        }
        Some(match (&e.target, e.perm.allows(IommuPerm::Write)) {
            (Some(t), true) => deeper(|| {
                t.view_guard()
                    .store(e.translate(mr_addr), value, order, attrs)
            })
            .unwrap_or(MemTxResult::DECODE_ERROR),
            _ => MemTxResult::DECODE_ERROR,
        })
    })?;
    if whole.is_some() {
        return whole;
    }
    let bytes = disassemble(value.to_u64(), T::SIZE as usize, order);
    let inside = ((r.last() - addr).saturating_add(1)).min(size) as usize;
    let mut res = if inside < bytes.len() {
        MemTxResult::DECODE_ERROR
    } else {
        MemTxResult::OK
    };
    let mut done = 0usize;
    while done < inside {
        let (l, x) = write_piece(
            r,
            addr.wrapping_add(done as u64),
            &bytes[done..inside],
            attrs,
        )?;
        res |= x;
        done += l;
    }
    Some(res)
}

fn assemble(buf: &[u8], order: Endian) -> u64 {
    let mut v = 0u64;
    match order.resolve(Endian::HOST) {
        Endian::Big => {
            for b in buf {
                v = (v << 8) | u64::from(*b);
            }
        }
        _ => {
            for b in buf.iter().rev() {
                v = (v << 8) | u64::from(*b);
            }
        }
    }
    v
}

fn disassemble(v: u64, n: usize, order: Endian) -> Vec<u8> {
    let le = v.to_le_bytes();
    let mut out = le[..n].to_vec();
    if order.is_big() {
        out.reverse();
    }
    out
}

/// Whether `view` serves `addr` through an IOMMU region (diagnostics).
pub fn is_translated(view: &FlatView, addr: u64) -> bool {
    view.lookup(addr)
        .is_some_and(|r| matches!(r.region().backing(), Backing::Iommu { .. }))
}

/// An adapter from a memtree IOMMU region to vm-memory 0.18's
/// [`vm_memory::Iommu`] (feature `vm-memory`), so that a consumer built on
/// vm-memory's `IommuMemory` (a vhost-user back-end) translates through
/// memtree's device.
///
/// The adapter keeps its own vm-memory [`vm_memory::Iotlb`]: a miss or an
/// access failure asks the memtree device, page by page, and fills the
/// IOTLB; an UNMAP (or device-IOTLB UNMAP) notification of the hub
/// invalidates the page in it (the adapter registers a notifier for that,
/// unregistered when the adapter is dropped). Only translations into
/// `backend_space` (the address space whose RAM `IommuMemory`'s backend
/// holds, e.g. made by `crate::integrations::guest_memory`) are accepted.
///
/// Like the hub's own cache, the IOTLB is tied to the hub's generation:
/// when it has moved (any event, [`IommuHub::invalidate_cache`], the
/// unplug of the region's owner) the whole IOTLB is dropped before the
/// next lookup, and a translation made under an older generation is not
/// stored (so an UNMAP racing a fill is not lost). The adapter holds the
/// device weakly and asks it nothing once the region's owner is unplugged.
/// A page ending at 2^64 is cached without its last byte (vm-memory
/// computes `start + length`); that byte is not reachable through the
/// adapter.
#[cfg(all(feature = "vm-memory", unix))]
pub mod vm_memory_adapter {
    use super::*;
    use vm_memory::iommu::{Error as VmError, IotlbIterator, IovaRange};
    use vm_memory::{GuestAddress, Iotlb, Permissions};

    /// See the [module docs](self).
    pub struct VmMemoryIommu {
        device: Weak<dyn Iommu>,
        /// The region's owner (none: the region cannot be unplugged).
        owner: Option<Weak<crate::region::owner_core::OwnerCore>>,
        hub: Arc<IommuHub>,
        /// The hub generation the IOTLB's entries were made under.
        generation: AtomicU64,
        iommu_idx: u32,
        backend_space: WeakAddressSpace,
        iotlb: Arc<parking_lot::RwLock<Iotlb>>,
        notifier: NotifierId,
    }

    impl fmt::Debug for VmMemoryIommu {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("VmMemoryIommu")
                .field("iommu_idx", &self.iommu_idx)
                .finish()
        }
    }

    impl VmMemoryIommu {
        /// An adapter for the IOMMU region `region` (context `iommu_idx`)
        /// whose translations land in `backend_space`.
        ///
        /// # Errors
        ///
        /// [`IommuError::BadNotifier`] if `region` is not an IOMMU region;
        /// the errors of [`IommuHub::register_notifier`].
        pub fn new(
            region: &RegionCore,
            iommu_idx: u32,
            backend_space: &AddressSpace,
        ) -> Result<VmMemoryIommu, IommuError> {
            let (Some(device), Some(hub)) = (region.iommu_device(), region.iommu_hub()) else {
                return Err(IommuError::BadNotifier(format!(
                    "\"{}\" is not an IOMMU region",
                    region.name()
                )));
            };
            let iotlb = Arc::new(parking_lot::RwLock::new(Iotlb::new()));
            let tlb = Arc::downgrade(&iotlb);
            let notifier = hub.register_notifier(IommuNotifier {
                flags: NotifierFlags::UNMAP.union(NotifierFlags::DEVIOTLB_UNMAP),
                start: 0,
                last: u64::MAX,
                iommu_idx,
                notify: Arc::new(move |ev: &IotlbEvent| {
                    if let Some(tlb) = tlb.upgrade() {
                        let iova = ev.entry.iova & !ev.entry.addr_mask;
                        // vm-memory computes `iova + len`: a block reaching
                        // 2^64 is dropped with everything else.
                        let len = ev.entry.addr_mask.checked_add(1).filter(|len| {
                            iova.checked_add(*len).is_some() && usize::try_from(*len).is_ok()
                        });
                        match len {
                            Some(len) => tlb
                                .write()
                                .invalidate_mapping(GuestAddress(iova), len as usize),
                            None => tlb.write().invalidate_all(),
                        }
                    }
                }),
            })?;
            Ok(VmMemoryIommu {
                device: Arc::downgrade(device),
                owner: region.owner().map(Arc::downgrade),
                hub: hub.clone(),
                generation: AtomicU64::new(hub.generation.load(Ordering::Acquire)),
                iommu_idx,
                backend_space: backend_space.downgrade(),
                iotlb,
                notifier,
            })
        }

        /// The hub's generation, after dropping the whole IOTLB if it
        /// moved since the IOTLB was filled.
        fn sync_generation(&self) -> u64 {
            let now = self.hub.generation.load(Ordering::Acquire);
            if self.generation.load(Ordering::Acquire) == now {
                return now;
            }
            let mut tlb = self.iotlb.write();
            let now = self.hub.generation.load(Ordering::Acquire);
            tlb.invalidate_all();
            self.generation.store(now, Ordering::Release);
            now
        }

        /// Whether the region's owner is still plugged.
        fn is_live(&self) -> bool {
            self.owner
                .as_ref()
                .is_none_or(|o| o.upgrade().is_some_and(|o| o.is_live()))
        }

        /// Asks the device for every page of `[base, base + length)` and
        /// fills the IOTLB with translations made under hub generation
        /// `generation`: [`Fill::Denied`] if a page is denied or lands
        /// elsewhere (or the device is gone), [`Fill::Raced`] if the
        /// generation moved (nothing more is stored).
        fn fill(
            &self,
            base: u64,
            length: usize,
            access: IommuPerm,
            generation: u64,
        ) -> Result<(), Fill> {
            let Some(end) = base.checked_add(length as u64) else {
                return Err(Fill::Denied);
            };
            let device = match self.device.upgrade() {
                Some(d) if self.is_live() => d,
                _ => {
                    self.iotlb.write().invalidate_all();
                    return Err(Fill::Denied);
                }
            };
            let expected = self.backend_space.0.as_ptr();
            let mut addr = base;
            while addr < end {
                let e = match catch_dev(|| device.translate(addr, access, self.iommu_idx)) {
                    Ok(e) if e.is_well_formed() && e.covers(addr) => e,
                    _ => return Err(Fill::Denied),
                };
                let lands_in_backend = e
                    .target
                    .as_ref()
                    .is_some_and(|t| std::ptr::eq(Arc::as_ptr(&t.shared), expected));
                if !e.perm.allows(access) || !lands_in_backend {
                    return Err(Fill::Denied);
                }
                let page = e.iova & !e.addr_mask;
                // vm-memory computes `page + len`: a page ending at 2^64
                // loses its last byte (a one-byte page there is not cached).
                let len = match page | e.addr_mask {
                    u64::MAX => e.addr_mask,
                    _ => e.addr_mask + 1,
                };
                let Ok(len) = usize::try_from(len) else {
                    return Err(Fill::Denied);
                };
                if len == 0 {
                    return Err(Fill::Denied);
                }
                let perm = match e.perm {
                    IommuPerm::None => Permissions::No,
                    IommuPerm::Read => Permissions::Read,
                    IommuPerm::Write => Permissions::Write,
                    IommuPerm::ReadWrite => Permissions::ReadWrite,
                };
                {
                    // Checked under the write lock, which the UNMAP notifier
                    // also takes: an event either moved the generation
                    // before (not stored) or invalidates after.
                    let mut tlb = self.iotlb.write();
                    if self.hub.generation.load(Ordering::Acquire) != generation
                        || self.generation.load(Ordering::Acquire) != generation
                    {
                        return Err(Fill::Raced);
                    }
                    if tlb
                        .set_mapping(
                            GuestAddress(page),
                            GuestAddress(e.translated_addr & !e.addr_mask),
                            len,
                            perm,
                        )
                        .is_err()
                    {
                        return Err(Fill::Denied);
                    }
                }
                match (page | e.addr_mask).checked_add(1) {
                    Some(n) => addr = n,
                    None => break,
                }
            }
            Ok(())
        }
    }

    /// Why [`VmMemoryIommu::fill`] stored nothing more.
    enum Fill {
        /// A page is denied, lands outside the back-end, or the device is
        /// gone.
        Denied,
        /// The hub's generation moved during the fill.
        Raced,
    }

    /// How many lookups one translation tries before giving up when every
    /// fill races an invalidation.
    const TRANSLATE_ROUNDS: usize = 4;

    impl Drop for VmMemoryIommu {
        fn drop(&mut self) {
            self.hub.unregister_notifier(self.notifier);
        }
    }

    impl vm_memory::Iommu for VmMemoryIommu {
        type IotlbGuard<'a> = parking_lot::RwLockReadGuard<'a, Iotlb>;

        fn translate(
            &self,
            iova: GuestAddress,
            length: usize,
            access: Permissions,
        ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, VmError> {
            let want = match access {
                Permissions::No => IommuPerm::None,
                Permissions::Read => IommuPerm::Read,
                Permissions::Write => IommuPerm::Write,
                Permissions::ReadWrite => IommuPerm::ReadWrite,
            };
            // A lookup, then (after filling) another: a notification racing
            // a fill makes the fill store nothing and the next round
            // retries; after the last round the caller sees an error instead
            // of a withdrawn mapping.
            for round in 0..TRANSLATE_ROUNDS {
                let generation = self.sync_generation();
                let fails = match Iotlb::lookup(self.iotlb.read(), iova, length, access) {
                    Ok(it) => return Ok(it),
                    Err(f) => f,
                };
                if round + 1 == TRANSLATE_ROUNDS {
                    break;
                }
                for r in fails.misses.iter().chain(fails.access_fails.iter()) {
                    match self.fill(r.base.0, r.length, want, generation) {
                        Ok(()) => {}
                        Err(Fill::Raced) => break,
                        Err(Fill::Denied) => {
                            return Err(VmError::CannotResolve {
                                iova_range: IovaRange {
                                    base: r.base,
                                    length: r.length,
                                },
                                reason: "the memtree IOMMU denies this access".into(),
                            })
                        }
                    }
                }
            }
            Err(VmError::CannotResolve {
                iova_range: IovaRange { base: iova, length },
                reason: "the mapping changed during translation".into(),
            })
        }
    }
}
