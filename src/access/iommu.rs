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
//!   address space by index into the hub's append-only target table and,
//!   for the warm path, the window of the page one range of the target's
//!   view serves directly (range, bounds, host address), keyed by the
//!   sequence number the target published that view under. A hit uses the
//!   window only under a guard on the target view published under that
//!   number (checked on both sides of the guard load), so the cache never
//!   serves memory the target no longer maps, or has freed: a target view
//!   published since makes the next access resolve the window again.
//! * A [`SpaceCursor`](crate::access::dispatch::SpaceCursor) copies the last slot it used
//!   and caches its target's view cursor-style, with its own window in its
//!   own addresses, valid while its view, the hub's generation and the
//!   target's current view are those it was resolved with (checked at
//!   every access; the window holds both views).
//! * Chains are followed at most [`MAX_CHAIN_DEPTH`] IOMMUs deep; deeper (a
//!   loop of IOMMUs translating into each other) is a decode error.
//! * Device and notifier code (other people's code) runs with no lock of
//!   memtree held: a notifier may register or unregister notifiers and a
//!   device may notify from `translate`'s caller's thread.

use crate::lifecycle::census::Census;
use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{fence, AtomicPtr, AtomicU64, AtomicU8, Ordering};
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

/// `Slot::view_seq` when no window was resolved (odd: never the sequence
/// number of a published view).
const NO_VIEW: u64 = u64::MAX;

/// `Slot::meta` bit: reads of the window may go straight to host memory.
const DIRECT_READ: u64 = 1 << 48;
/// `Slot::meta` bit: writes of the window may go straight to host memory.
const DIRECT_WRITE: u64 = 1 << 49;

/// One slot of the IOTLB cache: plain data in atomics under a sequence
/// lock (`seq` odd while a writer fills it), so that a hit takes no lock,
/// touches no reference count and holds nothing: a slot only *names* its
/// target (an index into the hub's append-only target table) and, for the
/// warm path, the *window* of the translated page that one range of the
/// target's view serves directly, as that view's range, bounds and host
/// address, keyed by the sequence number the target published that view
/// under. A hit uses the window only while holding a guard on the target's
/// view published under that number: then the range, and the memory it
/// maps, are that guard's.
#[repr(align(128))]
struct Slot {
    seq: AtomicU64,
    /// The hub generation the translation was made under: the slot is valid
    /// only while it equals the hub's.
    generation: AtomicU64,
    /// First input address of the page.
    iova: AtomicU64,
    addr_mask: AtomicU64,
    translated: AtomicU64,
    /// `iommu_idx` (low 32 bits), permission bits (8), target index (8),
    /// [`DIRECT_READ`], [`DIRECT_WRITE`].
    meta: AtomicU64,
    /// The target's view sequence number (`SpaceShared::view_seq`) the
    /// window was resolved in, [`NO_VIEW`] if none.
    view_seq: AtomicU64,
    /// The target's shared state (that of the address space at index
    /// `target` of the hub's target table, which keeps it for the hub's
    /// life), so that a hit reaches it in one step.
    space: AtomicPtr<SpaceShared>,
    /// The range of that view serving the window (null if none).
    range: AtomicPtr<FlatRange>,
    /// The window, in input addresses (offsets in the IOMMU region): the
    /// part of the page whose translation the range serves.
    wlo: AtomicU64,
    whi: AtomicU64,
    /// Host address of `wlo`'s translation (null unless a direct flag is
    /// set).
    host: AtomicPtr<u8>,
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
            view_seq: AtomicU64::new(NO_VIEW),
            space: AtomicPtr::new(std::ptr::null_mut()),
            range: AtomicPtr::new(std::ptr::null_mut()),
            wlo: AtomicU64::new(0),
            whi: AtomicU64::new(0),
            host: AtomicPtr::new(std::ptr::null_mut()),
        }
    }
}

/// A consistent copy of a slot.
#[derive(Copy, Clone)]
struct Cached {
    /// The slot's `seq` when copied (even).
    slot_seq: u64,
    /// The target view sequence number its window was resolved in.
    view_seq: u64,
    generation: u64,
    iova: u64,
    addr_mask: u64,
    translated: u64,
    idx: u32,
    perm: IommuPerm,
    target: usize,
}

/// Where a translated page goes directly in one published view of its
/// target (see [`Slot`]); its pointers mean something only under a guard on
/// the view published under `view_seq`.
#[derive(Copy, Clone)]
struct Window {
    view_seq: u64,
    direct_read: bool,
    direct_write: bool,
    range: *const FlatRange,
    wlo: u64,
    whi: u64,
    host: *mut u8,
}

// SAFETY: a `Window` is plain data: its pointers are addresses that are
// dereferenced only under a guard on the view they point into (see
// `Window`), which any thread may hold (`FlatView` is `Send + Sync`).
unsafe impl Send for Window {}
// SAFETY: as above; nothing is reachable through a shared `Window`.
unsafe impl Sync for Window {}

impl Window {
    /// No window (nothing resolved).
    const NONE: Window = Window {
        view_seq: NO_VIEW,
        direct_read: false,
        direct_write: false,
        range: std::ptr::null(),
        wlo: 0,
        whi: 0,
        host: std::ptr::null_mut(),
    };

    /// Resolves the window of the page of `e` around the input address
    /// `addr` in `space`'s current view.
    fn resolve(space: &AddressSpace, e: &IotlbEntry, addr: u64) -> Window {
        let page_lo = e.translated_addr & !e.addr_mask;
        let iova = e.iova & !e.addr_mask;
        let ta = e.translate(addr);
        let perm = e.perm;
        let Some((view, view_seq)) = space.view_guard_seq() else {
            return Window::NONE;
        };
        let Some(tr) = view.lookup(ta) else {
            return Window {
                view_seq,
                ..Window::NONE
            };
        };
        let direct_read = perm.allows(IommuPerm::Read) && tr.is_direct_read();
        let direct_write = perm.allows(IommuPerm::Write) && tr.is_direct_write();
        let tlo = tr.start().max(page_lo);
        let thi = tr.last().min(page_lo | e.addr_mask);
        Window {
            view_seq,
            direct_read,
            direct_write,
            range: tr,
            wlo: iova + (tlo - page_lo),
            whi: iova + (thi - page_lo),
            host: if direct_read || direct_write {
                tr.host_at(tlo)
            } else {
                std::ptr::null_mut()
            },
        }
    }

    fn meta_bits(&self) -> u64 {
        (if self.direct_read { DIRECT_READ } else { 0 })
            | (if self.direct_write { DIRECT_WRITE } else { 0 })
    }
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
    /// The census key of the region the hub serves (the holder of the
    /// target spaces in `targets`), and its machine's census.
    region_key: OnceLock<(crate::lifecycle::census::ObjectKey, Arc<Census>)>,
    /// Set by the `new_iommu` that took the hub (see [`IommuHub::claim`]).
    claimed: std::sync::atomic::AtomicBool,
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
            region_key: OnceLock::new(),
            claimed: std::sync::atomic::AtomicBool::new(false),
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

    /// Claims the hub for a region being created; `false` if another
    /// region has it (or is being created with it). Atomic, so two racing
    /// `new_iommu` calls with one hub cannot both succeed.
    pub(crate) fn claim(&self) -> bool {
        self.claimed
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Gives a claim back (the region could not be created).
    pub(crate) fn release_claim(&self) {
        self.claimed.store(false, Ordering::Release);
    }

    pub(crate) fn attach(
        &self,
        device: Weak<dyn Iommu>,
        region_size: u128,
        region_key: (crate::lifecycle::census::ObjectKey, Arc<Census>),
    ) {
        // A second attach can only come from a racing `new_iommu` with the
        // same hub; the first region keeps the hub.
        if self.device.set(device).is_ok() {
            let _ = self.region_size.set(region_size);
            let _ = self.region_key.set(region_key);
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
        let generation = slot.generation.load(Ordering::Relaxed);
        let iova = slot.iova.load(Ordering::Relaxed);
        let addr_mask = slot.addr_mask.load(Ordering::Relaxed);
        let translated = slot.translated.load(Ordering::Relaxed);
        let meta = slot.meta.load(Ordering::Relaxed);
        let view_seq = slot.view_seq.load(Ordering::Relaxed);
        // Order the field loads before the re-check of `seq` (seqlock).
        fence(Ordering::Acquire);
        if slot.seq.load(Ordering::Relaxed) != seq {
            return None;
        }
        let c = Cached {
            slot_seq: seq,
            view_seq,
            generation,
            iova,
            addr_mask,
            translated,
            idx: meta as u32,
            perm: IommuPerm::from_bits((meta >> 32) as u8),
            target: ((meta >> 40) & 0xff) as usize,
        };
        (c.generation == self.generation.load(Ordering::Acquire) && c.idx == idx && c.covers(addr))
            .then_some(c)
    }

    /// The warm path's read of the slot of `addr`: its window, if the slot
    /// is live for context `idx`, its window contains `addr` and lets
    /// `access` go directly (reads only what a hit needs; the caller still
    /// checks the window's view).
    #[inline(always)]
    fn lookup_window(
        &self,
        addr: u64,
        idx: u32,
        access: IommuPerm,
    ) -> Option<(&SpaceShared, Window)> {
        let flags = match access {
            IommuPerm::Read => DIRECT_READ,
            IommuPerm::Write => DIRECT_WRITE,
            IommuPerm::ReadWrite => DIRECT_READ | DIRECT_WRITE,
            IommuPerm::None => return None,
        };
        let slot = &self.slots[slot_of(addr)];
        let seq = slot.seq.load(Ordering::Acquire);
        let generation = slot.generation.load(Ordering::Relaxed);
        let meta = slot.meta.load(Ordering::Relaxed);
        let view_seq = slot.view_seq.load(Ordering::Relaxed);
        let space = slot.space.load(Ordering::Relaxed);
        let range = slot.range.load(Ordering::Relaxed);
        let wlo = slot.wlo.load(Ordering::Relaxed);
        let whi = slot.whi.load(Ordering::Relaxed);
        let host = slot.host.load(Ordering::Relaxed);
        // Order the field loads before the re-check of `seq` (seqlock).
        fence(Ordering::Acquire);
        let hit = seq & 1 == 0
            && slot.seq.load(Ordering::Relaxed) == seq
            && generation == self.generation.load(Ordering::Acquire)
            && meta as u32 == idx
            && meta & flags == flags
            && addr.wrapping_sub(wlo) <= whi.wrapping_sub(wlo);
        if !hit {
            return None;
        }
        // SAFETY: a filled slot's `space` is the `shared` of the address
        // space at its index in `self.targets`, which is never replaced and
        // lives as long as `self` (this borrow); the seqlock check above
        // makes it the pointer stored with this window.
        let space = unsafe { &*space };
        Some((
            space,
            Window {
                view_seq,
                direct_read: meta & DIRECT_READ != 0,
                direct_write: meta & DIRECT_WRITE != 0,
                range,
                wlo,
                whi,
                host,
            },
        ))
    }

    /// The target address space of a cached translation.
    #[inline]
    fn target(&self, c: &Cached) -> Option<&AddressSpace> {
        self.targets.get(c.target)?.get()
    }

    /// The index of `space` in the target table, appending it if there is
    /// room.
    ///
    /// The table holds the space for the hub's life: the census records
    /// that the IOMMU region holds it, so a target space destroyed while
    /// the IOMMU lives is explained ("held by region ...") rather than
    /// blamed on user code. (A destroyed space shows the empty view, so
    /// what stays is its handle state, never its RAM.)
    fn target_index(&self, space: &AddressSpace) -> Option<usize> {
        // A space of another machine is never kept: its machine's teardown
        // must not find it held by this one (its translations are correct,
        // just not cached).
        match self.region_key.get() {
            Some((_, census)) if Arc::ptr_eq(census, &space.shared.machine.census) => {}
            _ => return None,
        }
        for (i, t) in self.targets.iter().enumerate() {
            let mut installed = false;
            let cur = t.get_or_init(|| {
                installed = true;
                space.clone()
            });
            if installed {
                if let Some((holder, census)) = self.region_key.get() {
                    census.add_edge(*holder, space.census_key());
                }
            }
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
        let w = Window::resolve(space, e, addr);
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
            u64::from(idx)
                | (u64::from(e.perm.bits()) << 32)
                | ((target as u64) << 40)
                | w.meta_bits(),
            Ordering::Relaxed,
        );
        s.space
            .store(Arc::as_ptr(&space.shared).cast_mut(), Ordering::Relaxed);
        Self::store_window(s, &w);
        s.seq.store(seq + 2, Ordering::Release);
    }

    /// Stores `w` into a slot whose sequence lock the caller holds.
    fn store_window(s: &Slot, w: &Window) {
        s.view_seq.store(w.view_seq, Ordering::Relaxed);
        s.range.store(w.range.cast_mut(), Ordering::Relaxed);
        s.wlo.store(w.wlo, Ordering::Relaxed);
        s.whi.store(w.whi, Ordering::Relaxed);
        s.host.store(w.host, Ordering::Relaxed);
    }

    /// [`IommuHub::refresh_window`] if the slot of `addr` holds a live
    /// translation for context `idx` whose window was resolved in a view
    /// its target has replaced since.
    #[inline(never)]
    fn refresh_stale_window(&self, addr: u64, idx: u32) {
        let Some(c) = self.lookup_cached(addr, idx) else {
            return;
        };
        let Some(space) = self.target(&c) else {
            return;
        };
        if space.shared.view_seq.load(Ordering::Acquire) != c.view_seq {
            self.refresh_window(addr, idx);
        }
    }

    /// The target `space` of the slot of `addr` has published a view since
    /// the slot's window was resolved: resolves it again in the current
    /// view and stores it, if the slot still holds a live translation for
    /// context `idx` and did not change meanwhile.
    #[inline(never)]
    fn refresh_window(&self, addr: u64, idx: u32) {
        let Some(c) = self.lookup_cached(addr, idx) else {
            return;
        };
        let Some(space) = self.target(&c) else {
            return;
        };
        let e = IotlbEntry {
            target: None,
            iova: c.iova,
            translated_addr: c.translated,
            addr_mask: c.addr_mask,
            perm: c.perm,
        };
        let w = Window::resolve(space, &e, addr);
        let s = &self.slots[slot_of(addr)];
        if s.seq
            .compare_exchange(
                c.slot_seq,
                c.slot_seq + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return;
        }
        // Order the odd `seq` before the field stores (seqlock writer).
        fence(Ordering::Release);
        let meta = s.meta.load(Ordering::Relaxed) & !(DIRECT_READ | DIRECT_WRITE);
        s.meta.store(meta | w.meta_bits(), Ordering::Relaxed);
        Self::store_window(s, &w);
        s.seq.store(c.slot_seq + 2, Ordering::Release);
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
    /// (The hub is also the backing's hot part: accesses reach its IOTLB
    /// cache one pointer from the region core.)
    pub(crate) fn into_backing(self) -> Backing {
        let hub = self.hub.clone();
        Backing::Iommu(IommuBacking::new(Arc::new(self), hub))
    }
}

/// The device and hub of an IOMMU region, `None` for other kinds.
#[inline]
fn iommu_parts(core: &RegionCore) -> Option<&IommuParts> {
    match core.backing() {
        Backing::Iommu(b) => b.parts(),
        _ => None,
    }
}

/// The hub of an IOMMU region (the backing's hot part), `None` for other
/// kinds.
#[inline(always)]
fn iommu_hub_hot(core: &RegionCore) -> Option<&IommuHub> {
    match core.backing() {
        Backing::Iommu(b) => b.hot(),
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
/// at `addr` (in the view) through the IOMMU range `r`, and its slot's
/// window was resolved in the target's *current* view and serves the
/// translated address directly for `access`, runs `f` on the target range,
/// the translated address, its host address and the bytes available from
/// it (bounded by the IOTLB page, the IOMMU range and the target range).
/// No device call, no lookup in the target view, no reference count: the
/// target view is held by a guard for `f`.
#[inline]
fn direct_hit<R>(
    r: &FlatRange,
    addr: u64,
    access: IommuPerm,
    attrs: MemTxAttrs,
    f: impl FnOnce(&FlatRange, u64, *mut u8, u64) -> R,
) -> Option<R> {
    let core = r.region();
    let hub = iommu_hub_hot(core)?;
    if !core.is_live() {
        return None;
    }
    let mr_addr = (addr - r.start()).wrapping_add(r.offset_in_region());
    let idx = if hub.single_index.load(Ordering::Relaxed) == 1 {
        0
    } else {
        let IommuParts { device, .. } = iommu_parts(core)?;
        hub.index_of_slow(device.as_ref(), attrs).ok()?
    };
    let Some((space, w)) = hub.lookup_window(mr_addr, idx, access) else {
        // A window resolved in an older target view may have become
        // direct since (RAM mapped where MMIO was).
        hub.refresh_stale_window(mr_addr, idx);
        return None;
    };
    let (view, view_seq) = space.view_guard_seq()?;
    if view_seq != w.view_seq {
        drop(view);
        hub.refresh_window(mr_addr, idx);
        return None;
    }
    let off = mr_addr - w.wlo;
    let len = (w.whi - mr_addr)
        .saturating_add(1)
        .min((r.last() - addr).saturating_add(1));
    // SAFETY: the window was resolved in the view `space` published under
    // `view_seq` (a slot names one target space for its life), which is the
    // view `view` holds (`view_guard_seq`): `w.range` points to a range of
    // it, alive while `view` is, and `w.host` is the host address of the
    // translation of `w.wlo` in that range, whose memory covers the
    // translations up to `w.whi`; `lookup_window` checked `w.wlo <= mr_addr
    // <= w.whi`.
    let tr = unsafe { &*w.range };
    let host = w.host.wrapping_add(off as usize);
    // The translated address, from the host address's place in the range
    // (read only by callers that use it: the slot keeps no extra field).
    let ta = tr.start() + (host as usize).wrapping_sub(tr.host as usize) as u64;
    let out = f(tr, ta, host, len);
    drop(view);
    Some(out)
}

/// A [`SpaceCursor`](crate::access::dispatch::SpaceCursor)'s own copy of the last IOTLB
/// entry it used, with a cursor-style cache of its target's view and, once
/// resolved, the *window* of its own addresses that go straight to one
/// range of that target view: a hit makes no arc-swap load, no lookup in
/// the target view and no device or hub-slot read (the cursor's views are
/// revalidated by one relaxed pointer comparison each, the entry by one
/// load of the hub's generation). Like the cursor's own view, the target
/// view it last used stays alive until the cursor's next access through
/// the entry, [`SpaceCursor::refresh`](crate::dispatch::SpaceCursor::refresh)
/// or its drop.
pub(crate) struct CursorIotlb {
    hub: Arc<IommuHub>,
    entry: Cached,
    target: arc_swap::Cache<crate::access::dispatch::ViewCellRef, Arc<FlatView>>,
    /// Where `entry` goes directly, resolved against the cursor's view and
    /// the target's view of the time; `None` until the first hit resolves
    /// it, and for a multi-context device.
    window: Option<CursorWindow>,
}

/// What a cursor's warm hit needs, valid while (checked at every access):
/// the cursor's view is `source`, the hub's generation is the entry's, and
/// the target's current view is `target`. Everything else follows: the
/// IOTLB page, the IOMMU range of `source` and the target range bound the
/// window, and views never change.
struct CursorWindow {
    /// The cursor view the window was computed in (held, so its address is
    /// not reused while compared).
    source: Arc<FlatView>,
    /// The target view `range` lies in (held: `range` stays valid, and the
    /// address is not reused while compared).
    target: Arc<FlatView>,
    /// The target range serving the window.
    range: std::ptr::NonNull<FlatRange>,
    /// First and last address (in the cursor's space) of the window.
    lo: u64,
    hi: u64,
    /// Translated address minus cursor address (wrapping), constant inside
    /// the window.
    delta: u64,
    /// Host address of `lo` (null unless `read` or `write`).
    host: *mut u8,
    /// Whether reads (writes) may go directly: the entry's permissions and
    /// the target range's direct access agree.
    read: bool,
    write: bool,
}

// SAFETY: `range` and `host` point into `target` (an `Arc<FlatView>` the
// window holds) and the memory its range maps; `FlatView` and `FlatRange`
// are `Send + Sync` and immutable, and guest memory is only touched by the
// race-free copies of `host::ram`, so the window may move to any thread.
unsafe impl Send for CursorWindow {}

impl CursorWindow {
    #[inline(always)]
    fn allows(&self, access: IommuPerm) -> bool {
        match access {
            IommuPerm::Read => self.read,
            IommuPerm::Write => self.write,
            IommuPerm::ReadWrite => self.read && self.write,
            IommuPerm::None => false,
        }
    }
}

/// [`direct_hit`] for a cursor: through the cursor's window when it is still
/// valid, else through the cursor's entry (same hub, context and page,
/// current hub generation) or a copy of the hub's cache (`None` if that
/// misses too: the caller's slow path fills it), resolving a new window.
#[inline(always)]
pub(crate) fn cursor_hit<R>(
    iotlb: &mut Option<CursorIotlb>,
    view: &Arc<FlatView>,
    r: &FlatRange,
    addr: u64,
    access: IommuPerm,
    attrs: MemTxAttrs,
    f: impl FnOnce(&FlatRange, u64, *mut u8, u64) -> R,
) -> Option<R> {
    // The same (current) cursor view as when the window was resolved: the
    // address lies in the same IOMMU range, so the region's kind and its
    // owner's liveness need no second look (an unplug publishes views
    // without the region, which the cursor sees first), and the window
    // exists only for a single-context device, which needs no index.
    if let Some(e) = iotlb.as_mut() {
        if let Some(w) = e.window.as_ref() {
            let off = addr.wrapping_sub(w.lo);
            if off <= w.hi - w.lo
                && Arc::ptr_eq(&w.source, view)
                && w.allows(access)
                && e.entry.generation == e.hub.generation.load(Ordering::Acquire)
                && Arc::ptr_eq(e.target.load(), &w.target)
            {
                // SAFETY: `w.range` points into `w.target`, which the window
                // holds (see `CursorWindow`).
                let tr = unsafe { w.range.as_ref() };
                return Some(f(
                    tr,
                    addr.wrapping_add(w.delta),
                    w.host.wrapping_add(off as usize),
                    (w.hi - w.lo - off).saturating_add(1),
                ));
            }
        }
    }
    cursor_resolve(iotlb, view, r, addr, access, attrs, f)
}

/// The rest of [`cursor_hit`]: revalidates or replaces the cursor's entry
/// and resolves its window in the current views.
#[inline(never)]
fn cursor_resolve<R>(
    iotlb: &mut Option<CursorIotlb>,
    view: &Arc<FlatView>,
    r: &FlatRange,
    addr: u64,
    access: IommuPerm,
    attrs: MemTxAttrs,
    f: impl FnOnce(&FlatRange, u64, *mut u8, u64) -> R,
) -> Option<R> {
    let core = r.region();
    let IommuParts { device, hub } = iommu_parts(core)?;
    if !core.is_live() {
        return None;
    }
    let mr_addr = (addr - r.start()).wrapping_add(r.offset_in_region());
    let idx = hub.index_of(device.as_ref(), attrs).ok()?;
    let generation = hub.generation.load(Ordering::Acquire);
    let valid = iotlb.as_ref().is_some_and(|e| {
        Arc::ptr_eq(&e.hub, hub)
            && e.entry.idx == idx
            && e.entry.covers(mr_addr)
            && e.entry.generation == generation
    });
    if !valid {
        let Some(c) = hub.lookup_cached(mr_addr, idx) else {
            // Nothing kept from an entry that no longer serves.
            *iotlb = None;
            return None;
        };
        match iotlb.as_mut() {
            // Same hub and target space: keep the target view cache (and
            // the window's views, compared again below).
            Some(e) if Arc::ptr_eq(&e.hub, hub) && e.entry.target == c.target => {
                e.entry = c;
                if let Some(w) = e.window.as_mut() {
                    // No hit through it until resolved again below.
                    (w.read, w.write) = (false, false);
                }
            }
            _ => {
                let t = hub.target(&c)?;
                *iotlb = Some(CursorIotlb {
                    hub: hub.clone(),
                    entry: c,
                    target: arc_swap::Cache::new(crate::access::dispatch::ViewCellRef::new(t)),
                    window: None,
                });
            }
        }
    }
    let e = iotlb.as_mut()?;
    let c = e.entry;
    if !c.perm.allows(access) {
        return None;
    }
    let target = e.target.load();
    let ta = c.translate(mr_addr);
    let tr = target.lookup(ta)?;
    let read = c.perm.allows(IommuPerm::Read) && tr.is_direct_read();
    let write = c.perm.allows(IommuPerm::Write) && tr.is_direct_write();
    if !read && !write {
        return None;
    }
    // The window: the cursor addresses around `addr` inside the IOTLB page,
    // the IOMMU range and the target range (the translation is linear
    // inside all three).
    let back = (mr_addr & c.addr_mask)
        .min(addr - r.start())
        .min(ta - tr.start());
    let fwd = (c.addr_mask - (mr_addr & c.addr_mask))
        .min(r.last() - addr)
        .min(tr.last() - ta);
    let host = tr.host_at(ta);
    // Keep the views the old window held when they are still the ones.
    let (source, target_view) = match e.window.take() {
        Some(old) => (
            if Arc::ptr_eq(&old.source, view) {
                old.source
            } else {
                view.clone()
            },
            if Arc::ptr_eq(&old.target, target) {
                old.target
            } else {
                target.clone()
            },
        ),
        None => (view.clone(), target.clone()),
    };
    let w = CursorWindow {
        range: std::ptr::NonNull::from(tr),
        source,
        target: target_view,
        lo: addr - back,
        hi: addr + fwd,
        delta: ta.wrapping_sub(addr),
        host: host.wrapping_sub(back as usize),
        read,
        write,
    };
    let allowed = w.allows(access);
    // A multi-context device needs its index from each access's attributes:
    // it gets no window (every access comes through here).
    if hub.single_index.load(Ordering::Relaxed) == 1 {
        e.window = Some(w);
    }
    allowed.then(|| f(tr, ta, host, fwd.saturating_add(1)))
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
    let hit = direct_hit(r, addr, IommuPerm::Read, attrs, |_, _, host, avail| {
        let len = (rest.len() as u64).min(avail) as usize;
        // SAFETY: `host` is the host address of a translated address with
        // `avail` bytes after it inside a range of the target view
        // `direct_hit` holds, whose host memory covers the range; `rest` is
        // a distinct Rust buffer.
        unsafe { crate::host::ram::copy_from_guest(host, rest.as_mut_ptr(), len) };
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
    let hit = direct_hit(r, addr, IommuPerm::Write, attrs, |tr, ta, host, avail| {
        let len = (rest.len() as u64).min(avail) as usize;
        // SAFETY: `host` is the host address of `ta`, with `avail` bytes
        // after it inside `tr`, a range of the target view `direct_hit`
        // holds, whose host memory covers the range; `rest` is a distinct
        // Rust buffer.
        unsafe { crate::host::ram::copy_to_guest(rest.as_ptr(), host, len) };
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
#[inline]
pub(crate) fn load<T: Primitive>(
    r: &FlatRange,
    addr: u64,
    order: Endian,
    attrs: MemTxAttrs,
) -> Option<(T, MemTxResult)> {
    let size = u64::from(T::SIZE);
    let hit = direct_hit(r, addr, IommuPerm::Read, attrs, |_, _, host, avail| {
        (avail >= size).then(|| {
            // SAFETY: `host` is the host address of a translated address
            // with `avail >= size` bytes after it inside a range of the
            // target view `direct_hit` holds, whose host memory covers it.
            let v = unsafe { T::load_from(host, order) };
            (v, MemTxResult::OK)
        })
    });
    if let Some(Some(done)) = hit {
        return Some(done);
    }
    load_translated(r, addr, order, attrs)
}

/// [`load`] past the warm path (kept out of line so the warm path stays
/// small).
#[inline(never)]
fn load_translated<T: Primitive>(
    r: &FlatRange,
    addr: u64,
    order: Endian,
    attrs: MemTxAttrs,
) -> Option<(T, MemTxResult)> {
    let size = u64::from(T::SIZE);
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
#[inline]
pub(crate) fn store<T: Primitive>(
    r: &FlatRange,
    addr: u64,
    value: T,
    order: Endian,
    attrs: MemTxAttrs,
) -> Option<MemTxResult> {
    let size = u64::from(T::SIZE);
    let hit = direct_hit(r, addr, IommuPerm::Write, attrs, |tr, ta, host, avail| {
        (avail >= size).then(|| {
            // SAFETY: `host` is the host address of `ta`, with `avail >=
            // size` bytes after it inside `tr`, a range of the target view
            // `direct_hit` holds, whose host memory covers it.
            unsafe { value.store_to(host, order) };
            tr.mark_dirty(ta, size);
            MemTxResult::OK
        })
    });
    if let Some(Some(done)) = hit {
        return Some(done);
    }
    store_translated(r, addr, value, order, attrs)
}

/// [`store`] past the warm path (kept out of line).
#[inline(never)]
fn store_translated<T: Primitive>(
    r: &FlatRange,
    addr: u64,
    value: T,
    order: Endian,
    attrs: MemTxAttrs,
) -> Option<MemTxResult> {
    let size = u64::from(T::SIZE);
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

#[cfg(test)]
mod tests {
    //! The warm paths' cached state against changes of the target (run
    //! under Miri: a hit that read RAM freed from the target view, or raced
    //! a publish, is reported there).

    use super::*;
    use crate::Memory;

    const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

    /// Identity translation into a target space, 4 KiB pages.
    struct Identity(WeakAddressSpace);

    impl Iommu for Identity {
        fn translate(&self, addr: u64, _access: IommuPerm, _idx: u32) -> IotlbEntry {
            IotlbEntry {
                target: self.0.upgrade(),
                iova: addr & !0xfff,
                translated_addr: addr & !0xfff,
                addr_mask: 0xfff,
                perm: IommuPerm::ReadWrite,
            }
        }
    }

    /// (memory, system root, system space, DMA space through an identity
    /// IOMMU into it, its hub).
    fn setup() -> (
        Memory,
        crate::RegionId,
        AddressSpace,
        AddressSpace,
        Arc<IommuHub>,
    ) {
        let memory = Memory::new();
        let root = memory.new_container("memory", 1 << 32, None).unwrap();
        let id = memory.new_address_space("memory", root, None).unwrap();
        let sys = memory.address_space(id).unwrap();
        let hub = IommuHub::new();
        let iommu = memory
            .new_iommu(
                "dmar",
                1 << 32,
                Arc::new(Identity(sys.downgrade())),
                hub.clone(),
                None,
            )
            .unwrap();
        let id = memory.new_address_space("dev", iommu, None).unwrap();
        let dma = memory.address_space(id).unwrap();
        (memory, root, sys, dma, hub)
    }

    /// Rule: the hub slot's window and a cursor's window never reach RAM
    /// that left the target's view (here destroyed, so freed): the next
    /// access after the change sees the RAM that replaced it.
    #[test]
    fn warm_windows_never_reach_ram_freed_from_the_target() {
        let (memory, root, sys, dma, _hub) = setup();
        let old = memory.new_ram("old", 0x1000, None).unwrap();
        memory.add_subregion(root, 0x1000, old).unwrap();
        sys.store::<u32>(0x1010, 1, Endian::Little, A)
            .into_result()
            .unwrap();
        let mut cur = dma.cursor();
        for _ in 0..2 {
            assert_eq!(dma.load::<u32>(0x1010, Endian::Little, A).0, 1);
            assert_eq!(cur.load::<u32>(0x1010, Endian::Little, A).0, 1);
        }
        memory.del_subregion(root, old).unwrap();
        memory.destroy_region(old).unwrap();
        assert_eq!(
            dma.load::<u32>(0x1010, Endian::Little, A),
            (0, MemTxResult::DECODE_ERROR)
        );
        assert_eq!(
            cur.load::<u32>(0x1010, Endian::Little, A),
            (0, MemTxResult::DECODE_ERROR)
        );
        let new = memory.new_ram("new", 0x1000, None).unwrap();
        memory.add_subregion(root, 0x1000, new).unwrap();
        sys.store::<u32>(0x1010, 2, Endian::Little, A)
            .into_result()
            .unwrap();
        for _ in 0..2 {
            assert_eq!(dma.load::<u32>(0x1010, Endian::Little, A).0, 2);
            assert_eq!(cur.load::<u32>(0x1010, Endian::Little, A).0, 2);
            assert!(dma.store::<u32>(0x1014, 3, Endian::Little, A).is_ok());
            assert!(cur.store::<u32>(0x1018, 4, Endian::Little, A).is_ok());
        }
        assert_eq!(sys.load::<u32>(0x1014, Endian::Little, A).0, 3);
        assert_eq!(sys.load::<u32>(0x1018, Endian::Little, A).0, 4);
    }

    /// Rule: warm hits racing target publishes and IOMMU invalidations on
    /// another thread read only RAM the target maps when they start (no
    /// data race, no freed memory: checked by Miri) and only values ever
    /// stored there.
    #[test]
    fn warm_hits_race_target_changes_and_invalidations() {
        let (memory, root, sys, dma, hub) = setup();
        let first = memory.new_ram("first", 0x1000, None).unwrap();
        memory.add_subregion(root, 0x1000, first).unwrap();
        sys.store::<u32>(0x1010, 1, Endian::Little, A)
            .into_result()
            .unwrap();
        let rounds = if cfg!(miri) { 3 } else { 50 };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (dma, stop) = (dma.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut cur = dma.cursor();
                let mut seen = 0u32;
                while !stop.load(Ordering::Relaxed) || seen < 4 {
                    for (v, r) in [
                        dma.load::<u32>(0x1010, Endian::Little, A),
                        cur.load::<u32>(0x1010, Endian::Little, A),
                    ] {
                        assert!(r.is_ok() && (1..=rounds + 1).contains(&v), "{v:#x} {r:?}");
                    }
                    seen += 1;
                }
            })
        };
        let mut current = first;
        for round in 0..rounds {
            // Filled while mapped elsewhere, then swapped in one commit.
            let next = memory
                .new_ram(&format!("ram{round}"), 0x1000, None)
                .unwrap();
            memory.add_subregion(root, 0x8000, next).unwrap();
            sys.store::<u32>(0x8010, round + 2, Endian::Little, A)
                .into_result()
                .unwrap();
            memory.transaction(|m| {
                m.del_subregion(root, next).unwrap();
                m.del_subregion(root, current).unwrap();
                m.add_subregion(root, 0x1000, next).unwrap();
            });
            memory.destroy_region(current).unwrap();
            if round % 2 == 0 {
                hub.invalidate_cache();
            }
            current = next;
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        assert_eq!(dma.load::<u32>(0x1010, Endian::Little, A).0, rounds + 1);
    }
}
