//! Memory regions: the nodes of the region tree.
//!
//! A region lives in two halves, one per plane:
//!
//! * `RegionNode` is the control-plane half, stored in the topology arena
//!   (`crate::topology::tree::Topology`). It holds everything that changes at run
//!   time — position, priority, flags, container and subregion links — and is
//!   only ever touched by the single topology writer.
//! * [`RegionCore`] is the data-plane half, behind an `Arc`. It holds what an
//!   access needs and never changes: the name, the backing (RAM block, device
//!   ops) and a strong reference to the owner's [`OwnerCore`]. Flat views,
//!   DMA mappings and caches hold `Arc<RegionCore>`; the arena holds one too.
//!
//! # Invariants
//!
//! * Control-plane links (container, subregions, alias target, owner) are ids,
//!   never `Arc`s, so the topology cannot hold a reference cycle.
//! * A `RegionCore` points only *downwards*: to its backing and to its owner's
//!   core. Neither of those can point back to a `RegionCore` (owner cores hold
//!   no regions; device ops hold at most ids and weak handles), so the strong
//!   graph of data-plane objects is acyclic except through published flat
//!   views, which the control plane replaces at every commit and clears at
//!   teardown (see ARCHITECTURE.md, "Who holds whom").
//! * Dropping the last `Arc<RegionCore>` *is* the region's finalization: its
//!   `Drop` runs once, records the event in the census, then releases the
//!   backing and finally the owner (so a region always finishes before its
//!   owner). A panic of the device state's `Drop` is caught, recorded in
//!   the census and re-raised only after the subregions and the owner were
//!   released too.
//! * The topology never drops a `RegionCore` (or anything else holding
//!   device state) while it is borrowed: it hands them to
//!   `crate::lifecycle::deferral::defer_drop`, so a device's `Drop` runs where the machine
//!   is usable.

use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::host::backend::MemoryBackend;
use crate::lifecycle::census::{Census, ObjectKey, ObjectKind};
use crate::lifecycle::deferral::{catch, panic_message, raise};
use crate::region::attrs::{IoRootOps, MmioOps, OpsConfig, UnassignedOps};
use crate::region::ids::{OwnerId, RegionId};
use crate::region::owner_core::OwnerCore;

/// The largest region size: 2^64 bytes, the whole address space.
pub const MAX_REGION_SIZE: u128 = 1 << 64;

/// What kind of region this is. Mirrors QEMU's constructors
/// (`memory_region_init_*`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum RegionKind {
    /// Pure container: never rendered itself, only its subregions are.
    Container,
    /// RAM backed by host memory (QEMU `ram`). ROM is RAM with `readonly`.
    Ram,
    /// RAM that maps device memory (QEMU `ram_device`): accessed with
    /// exact-width loads and stores, never by memcpy.
    RamDevice,
    /// ROM device: reads from RAM in romd mode, callbacks otherwise; writes
    /// always go to the callbacks.
    RomDevice,
    /// MMIO / port I/O region with device callbacks.
    Mmio,
    /// A terminating region without callbacks: every access is rejected
    /// (QEMU's `memory_region_init_io` with NULL ops).
    Reservation,
    /// The port I/O space root: a terminating region whose holes read all
    /// ones (QEMU's `io` region with `unassigned_io_ops`).
    IoRoot,
    /// An alias of (part of) another region.
    Alias,
    /// An IOMMU region: a terminating region whose accesses are translated
    /// by a device into another address space (see `crate::access::iommu`).
    Iommu,
}

impl RegionKind {
    /// Whether the region claims the addresses it covers that its subregions
    /// leave free (QEMU's `terminates`).
    pub fn terminates(self) -> bool {
        !matches!(self, RegionKind::Container | RegionKind::Alias)
    }
}

/// What an access reaches through a region: the data-plane backing.
pub enum Backing {
    /// Nothing to access (containers, aliases).
    None,
    /// Host memory; `offset` is where the region starts inside the block.
    Ram {
        /// The host memory.
        block: Arc<MemoryBackend>,
        /// Where the region starts inside `block`.
        offset: u64,
    },
    /// Device memory accessed by exact-width host loads and stores.
    RamDevice {
        /// The device memory.
        block: Arc<MemoryBackend>,
        /// Where the region starts inside `block`.
        offset: u64,
    },
    /// ROM device: RAM for reads in romd mode, ops for everything else.
    RomDevice {
        /// The ROM's host memory (read directly in romd mode).
        block: Arc<MemoryBackend>,
        /// The device's callbacks.
        ops: Arc<dyn MmioOps>,
    },
    /// Device callbacks.
    Mmio(Arc<dyn MmioOps>),
    /// An IOMMU: the translating device and its notifier hub (opaque at
    /// this layer, see [`IommuBacking`]).
    Iommu(IommuBacking),
}

/// An IOMMU region's translating device and notifier hub. Their types are
/// the access path's (`crate::access::iommu`: a translation names its
/// target `AddressSpace`), a layer above the region core, so the core holds
/// them type-erased; `access::iommu` alone fills it and reads it back
/// ([`RegionCore::iommu_device`], [`RegionCore::iommu_hub`]).
///
/// It remembers the concrete types' `TypeId`s next to the pointers, so
/// that reading them back on the access path is one comparison of
/// constants, not a virtual `type_id` call; and it holds one part a second
/// time (`hot`: what every access reads, the notifier hub with its IOTLB
/// cache) so that it is one pointer away from the region core.
#[derive(Clone)]
pub struct IommuBacking {
    /// Invariant: the pointee's concrete type is the one `parts_type` names
    /// (both are set together by [`IommuBacking::new`] and never changed).
    parts: Arc<dyn std::any::Any + Send + Sync>,
    parts_type: std::any::TypeId,
    /// Invariant: as `parts`, with `hot_type`. Read through `hot_ptr`;
    /// held for it.
    _hot: Arc<dyn std::any::Any + Send + Sync>,
    hot_type: std::any::TypeId,
    /// `_hot`'s data pointer, read without the vtable (where a `dyn`
    /// pointee's offset in its `Arc` comes from).
    hot_ptr: std::ptr::NonNull<()>,
}

// SAFETY: `hot_ptr` points to `_hot`'s pointee, which is `Send + Sync` and
// kept alive by `_hot`; the other fields are `Send + Sync`.
unsafe impl Send for IommuBacking {}
// SAFETY: as above.
unsafe impl Sync for IommuBacking {}

impl IommuBacking {
    /// Type-erases `parts` and `hot` (a part of them, for the hot path).
    pub(crate) fn new<T, H>(parts: Arc<T>, hot: Arc<H>) -> IommuBacking
    where
        T: std::any::Any + Send + Sync,
        H: std::any::Any + Send + Sync,
    {
        IommuBacking {
            parts,
            parts_type: std::any::TypeId::of::<T>(),
            hot_ptr: std::ptr::NonNull::from(&*hot).cast(),
            _hot: hot,
            hot_type: std::any::TypeId::of::<H>(),
        }
    }

    /// The parts, if they are a `T`.
    #[inline]
    pub(crate) fn parts<T: std::any::Any>(&self) -> Option<&T> {
        if self.parts_type != std::any::TypeId::of::<T>() {
            return None;
        }
        // SAFETY: `parts_type` is the `TypeId` of the concrete type behind
        // `parts` (the struct's invariant: both private, set together from
        // the same `T` in `new`), so the data pointer points to a live `T`,
        // borrowed for as long as `self` holds the `Arc`.
        Some(unsafe { &*Arc::as_ptr(&self.parts).cast::<T>() })
    }

    /// The hot part, if it is an `H`.
    #[inline]
    pub(crate) fn hot<H: std::any::Any>(&self) -> Option<&H> {
        if self.hot_type != std::any::TypeId::of::<H>() {
            return None;
        }
        // SAFETY: `hot_ptr` is the data pointer of `_hot`, whose concrete
        // type `hot_type` names (set together from the same `H` in `new`,
        // private, never changed): it points to a live `H`, borrowed for as
        // long as `self` holds `_hot`.
        Some(unsafe { self.hot_ptr.cast::<H>().as_ref() })
    }
}

impl fmt::Debug for IommuBacking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IommuBacking")
    }
}

impl fmt::Debug for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backing::None => f.write_str("None"),
            Backing::Ram { block, offset } => write!(f, "Ram({}+{offset:#x})", block.name()),
            Backing::RamDevice { block, offset } => {
                write!(f, "RamDevice({}+{offset:#x})", block.name())
            }
            Backing::RomDevice { block, .. } => write!(f, "RomDevice({})", block.name()),
            Backing::Mmio(_) => f.write_str("Mmio"),
            Backing::Iommu { .. } => f.write_str("Iommu"),
        }
    }
}

/// The data-plane half of a region. Immutable after creation; see the
/// module docs for what holds it and what it holds.
pub struct RegionCore {
    id: RegionId,
    name: Box<str>,
    kind: RegionKind,
    /// The region's own dirty-log clients as of the last commit (the
    /// topology's `RegionNode::dirty_log_mask` is the edited, uncommitted
    /// one): what every flat range of the region reports and what writes
    /// through it mark, read at write time, so a mask change reaches the
    /// data plane with no new view (`crate::view::dirty_marks`). Written
    /// only by the commit.
    dirty_log_mask: std::sync::atomic::AtomicU8,
    backing: Backing,
    /// Subregions this region holds while they are mapped in it: a container
    /// finishes before the subregions it still holds. Written only by the
    /// topology writer; never read on the access path.
    subregions: Mutex<Vec<Arc<RegionCore>>>,
    owner: Option<Arc<OwnerCore>>,
    census: Arc<Census>,
    census_key: ObjectKey,
    /// The configuration of [`RegionCore::ops`], read once at creation
    /// (ops configuration is fixed per region, see [`MmioOps`]).
    ops_config: OpsConfig,
}

impl RegionCore {
    pub(crate) fn new(
        id: RegionId,
        name: &str,
        kind: RegionKind,
        backing: Backing,
        owner: Option<Arc<OwnerCore>>,
        census: &Arc<Census>,
        ops_config: OpsConfig,
    ) -> RegionCore {
        let backend_key = match &backing {
            Backing::Ram { block, .. }
            | Backing::RamDevice { block, .. }
            | Backing::RomDevice { block, .. } => Some(block.census_key()),
            _ => None,
        };
        let census_key = census.register_holding(
            ObjectKind::Region,
            name,
            owner
                .as_ref()
                .map(|o| o.census_key())
                .into_iter()
                .chain(backend_key),
        );
        RegionCore {
            id,
            name: name.into(),
            kind,
            dirty_log_mask: std::sync::atomic::AtomicU8::new(0),
            backing,
            subregions: Mutex::new(Vec::new()),
            owner,
            census: census.clone(),
            census_key,
            ops_config,
        }
    }

    /// The configuration [`RegionCore::ops`] will have for a region of
    /// `kind` with `backing`. This calls the device's configuration hooks
    /// (other people's code), so the machine calls it before it borrows the
    /// topology.
    pub(crate) fn ops_config_for(kind: RegionKind, backing: &Backing) -> OpsConfig {
        OpsConfig::of(Self::ops_of(kind, backing))
    }

    /// The configuration of [`RegionCore::ops`], as read when the region was
    /// created.
    #[inline]
    pub fn ops_config(&self) -> &OpsConfig {
        &self.ops_config
    }

    /// The region's id in the topology (may be stale once the region has
    /// been destroyed while this core is still held).
    pub fn id(&self) -> RegionId {
        self.id
    }

    /// The region's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The region's kind.
    pub fn kind(&self) -> RegionKind {
        self.kind
    }

    /// The region's own dirty-log clients as of the last commit (no
    /// MIGRATION from global tracking: see `FlatRange::dirty_log_mask`).
    #[inline]
    pub fn dirty_log_mask(&self) -> u8 {
        self.dirty_log_mask
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The commit publishes a new mask: for RAM, the clients' bitmaps are
    /// allocated and the block's `live` mask counts the region's clients
    /// (this region is one user per client it names, until the mask
    /// changes again or the core drops) *before* the mask is stored, so a
    /// write that sees a client finds its bitmap. Returns the old mask.
    pub(crate) fn publish_dirty_log_mask(&self, mask: u8) -> u8 {
        let old = self.dirty_log_mask();
        if old == mask {
            return old;
        }
        if let Backing::Ram { block, .. } = &self.backing {
            let log = block.block().dirty_log();
            let mut m = mask;
            while m != 0 {
                log.ensure(m.trailing_zeros() as u8);
                m &= m - 1;
            }
            log.count_range_users(mask, true);
            log.count_range_users(old, false);
        }
        self.dirty_log_mask
            .store(mask, std::sync::atomic::Ordering::Release);
        old
    }

    /// What accesses reach.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// The owner's core, if the region has an owner.
    pub fn owner(&self) -> Option<&Arc<OwnerCore>> {
        self.owner.as_ref()
    }

    /// The owner's id, if any.
    pub fn owner_id(&self) -> Option<OwnerId> {
        self.owner.as_ref().map(|o| o.id())
    }

    /// Whether accesses may still reach this region's device: false once the
    /// owner has been unplugged.
    #[inline]
    pub fn is_live(&self) -> bool {
        self.owner.as_ref().is_none_or(|o| o.is_live())
    }

    /// The ops to call for an access that does not go to RAM directly.
    pub fn ops(&self) -> &dyn MmioOps {
        Self::ops_of(self.kind, &self.backing)
    }

    fn ops_of(kind: RegionKind, backing: &Backing) -> &dyn MmioOps {
        static UNASSIGNED: UnassignedOps = UnassignedOps;
        static IO_ROOT: IoRootOps = IoRootOps;
        match backing {
            Backing::Mmio(ops) | Backing::RomDevice { ops, .. } => ops.as_ref(),
            _ if kind == RegionKind::IoRoot => &IO_ROOT,
            _ => &UNASSIGNED,
        }
    }

    pub(crate) fn hold_subregion(&self, sub: &Arc<RegionCore>) {
        self.subregions.lock().push(sub.clone());
        self.census.add_edge(self.census_key, sub.census_key);
    }

    pub(crate) fn release_subregion(&self, sub: &Arc<RegionCore>) {
        let mut subs = self.subregions.lock();
        if let Some(i) = subs.iter().position(|s| Arc::ptr_eq(s, sub)) {
            subs.swap_remove(i);
        }
        self.census.remove_edge(self.census_key, sub.census_key);
    }

    /// Releases several subregions in one pass over the held list.
    pub(crate) fn release_subregions(&self, subs: &[Arc<RegionCore>]) {
        let gone: std::collections::HashSet<usize> =
            subs.iter().map(|s| Arc::as_ptr(s) as usize).collect();
        let mut released = Vec::with_capacity(subs.len());
        {
            let mut held = self.subregions.lock();
            let mut i = 0;
            while i < held.len() {
                if gone.contains(&(Arc::as_ptr(&held[i]) as usize)) {
                    released.push(held.swap_remove(i));
                } else {
                    i += 1;
                }
            }
        }
        for sub in &released {
            self.census.remove_edge(self.census_key, sub.census_key);
        }
        // The topology still holds each of them: none is the last reference.
        drop(released);
    }

    /// The census key of this region (for diagnostics).
    pub fn census_key(&self) -> ObjectKey {
        self.census_key
    }
}

impl fmt::Debug for RegionCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionCore")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("backing", &self.backing)
            .finish()
    }
}

impl Drop for RegionCore {
    fn drop(&mut self) {
        // The region stops counting its clients into its block's `live`
        // mask (see `publish_dirty_log_mask`).
        let mask = self.dirty_log_mask();
        if let (Backing::Ram { block, .. }, true) = (&self.backing, mask != 0) {
            block.block().dirty_log().count_range_users(mask, false);
        }
        // Finalization: record it first, then release in a fixed order:
        // backing, then the subregions still held (so a container finishes
        // before them), then the owner (so it finishes after us). The
        // backing may hold device state whose `Drop` panics: that is
        // recorded and raised after everything else was released, so one
        // device's panic never skips another's drop or finalizer (and never
        // becomes a panic during unwinding, which would abort).
        self.census.finalize(self.census_key);
        let backing = std::mem::replace(&mut self.backing, Backing::None);
        let name = &self.name;
        let mut first = None;
        if let Err(p) = catch(move || drop(backing)) {
            self.census.record_panic(format!(
                "drop of the device state of region \"{name}\" panicked: {}",
                panic_message(&p)
            ));
            first = Some(p);
        }
        // Subregions and the owner record their own panics.
        for sub in std::mem::take(self.subregions.get_mut()) {
            if let Err(p) = catch(move || drop(sub)) {
                first.get_or_insert(p);
            }
        }
        if let Some(owner) = self.owner.take() {
            if let Err(p) = catch(move || drop(owner)) {
                first.get_or_insert(p);
            }
        }
        if let Some(p) = first {
            raise(p);
        }
    }
}

/// The control-plane half of a region, owned by the topology arena.
#[derive(Debug)]
pub(crate) struct RegionNode {
    pub(crate) core: Arc<RegionCore>,
    /// Copy of `core.kind`, so that rendering the tree does not have to load
    /// every region's core.
    pub(crate) kind: RegionKind,
    pub(crate) size: u128,
    pub(crate) addr: u64,
    pub(crate) priority: i32,
    pub(crate) enabled: bool,
    pub(crate) readonly: bool,
    pub(crate) nonvolatile: bool,
    pub(crate) unmergeable: bool,
    pub(crate) romd_mode: bool,
    pub(crate) alias_target: Option<RegionId>,
    pub(crate) alias_offset: u64,
    pub(crate) container: Option<RegionId>,
    /// Subregions in QEMU's order: descending priority, newest first among
    /// equal priorities. Rendering visits them in this order.
    pub(crate) subregions: Vec<RegionId>,
    pub(crate) owner: Option<OwnerId>,
    /// Number of *mapped* aliases (aliases with a container) targeting this
    /// region, for `is_mapped`.
    pub(crate) mapped_via_alias: u32,
    /// Dirty-log clients (bit 0 = VGA) as edited; the commit publishes it
    /// to `RegionCore::dirty_log_mask` (never a render input).
    pub(crate) dirty_log_mask: u8,
    /// Users of each client's logging counted by `Machine::set_log`
    /// (QEMU's `vga_logging_count`, for every per-region client).
    pub(crate) dirty_log_users: [u32; 8],
    /// The QOM parent `info mtree -o` prints, when recorded from a QEMU dump
    /// (`Some(None)`: print none). `None`: derived from the owner (see
    /// `text::print`).
    pub(crate) qom_parent: Option<Option<crate::region::owner_core::OwnerLabel>>,
}

/// What rendering reads of the control plane: the region nodes by id
/// (implemented by the topology; `crate::render` takes it as `&dyn`).
pub(crate) trait RegionGraph {
    /// The node of `id`, `None` for a stale id.
    fn node(&self, id: RegionId) -> Option<&RegionNode>;
}

impl RegionNode {
    pub(crate) fn kind(&self) -> RegionKind {
        self.kind
    }
    pub(crate) fn name(&self) -> &str {
        &self.core.name
    }
    pub(crate) fn terminates(&self) -> bool {
        self.kind.terminates()
    }
}

/// A read-only snapshot of a region's control-plane attributes, as returned by
/// [`crate::Machine::region_info`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region.
    pub id: RegionId,
    /// Its name (not unique).
    pub name: String,
    /// What it is.
    pub kind: RegionKind,
    /// Its size in bytes (up to 2^64).
    pub size: u128,
    /// Its offset inside its container (0 when not mapped).
    pub addr: u64,
    /// Its priority among its container's subregions.
    pub priority: i32,
    /// Whether it takes part in rendering.
    pub enabled: bool,
    /// Whether guest writes are refused (ROM).
    pub readonly: bool,
    /// Whether its contents survive power loss (reported, not enforced).
    pub nonvolatile: bool,
    /// For a ROM device: whether reads go straight to its memory.
    pub romd_mode: bool,
    /// The container it is mapped in, if any.
    pub container: Option<RegionId>,
    /// Its subregions, in priority order.
    pub subregions: Vec<RegionId>,
    /// For an alias: the region it shows.
    pub alias_target: Option<RegionId>,
    /// For an alias: where in the target it starts.
    pub alias_offset: u64,
    /// Its owner, if any.
    pub owner: Option<OwnerId>,
}
