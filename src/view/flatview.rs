//! Flat views: the immutable, rendered form of an address space.
//!
//! A [`FlatView`] is a sorted array of disjoint [`FlatRange`]s, each naming the
//! terminating region that serves it. It is built once by `crate::render::flatten`,
//! published into address spaces with an atomic pointer swap, and never
//! changed afterwards: vCPU threads read it without locks.
//!
//! # Invariants
//!
//! * Ranges are sorted by `start`, non-empty, disjoint, and inside
//!   `[0, 2^64)`; `last` is inclusive so a range can end at `u64::MAX`.
//! * Adjacent ranges that QEMU's merge rule would join are joined (§2.4).
//! * A range holds its region's [`RegionCore`] strongly; for directly
//!   readable RAM it also caches the host address of `start`, valid as long as
//!   the range (and so the core and its backend) is alive.

use std::sync::Arc;

use crate::lifecycle::census::{Census, ObjectKey, ObjectKind};
use crate::region::ids::RegionId;
use crate::region::region_core::{Backing, RegionCore, RegionKind};

/// The type QEMU prints for a region (`memory_region_type`, QEMU 7.2 rules).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum RegionType {
    /// `ram`
    Ram,
    /// `rom`: RAM that is readonly.
    Rom,
    /// `romd`: ROM device in romd mode.
    Romd,
    /// `ramd`: RAM device.
    Ramd,
    /// `i/o`: everything else.
    Io,
}

impl RegionType {
    /// The printed form.
    pub fn as_str(self) -> &'static str {
        match self {
            RegionType::Ram => "ram",
            RegionType::Rom => "rom",
            RegionType::Romd => "romd",
            RegionType::Ramd => "ramd",
            RegionType::Io => "i/o",
        }
    }

    /// QEMU 7.2 `memory_region_type` for a terminating or container region
    /// with these attributes.
    pub fn of(kind: RegionKind, readonly: bool, romd_mode: bool) -> RegionType {
        match kind {
            RegionKind::RamDevice => RegionType::Ramd,
            RegionKind::RomDevice if romd_mode => RegionType::Romd,
            RegionKind::Ram if readonly => RegionType::Rom,
            RegionKind::Ram => RegionType::Ram,
            _ => RegionType::Io,
        }
    }
}

/// Attributes of a flat range, propagated down the render path or copied from
/// the terminating region when the view was rendered.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RangeAttrs {
    /// Propagated readonly (the region's or any container/alias above it).
    pub readonly: bool,
    /// Propagated nonvolatile.
    pub nonvolatile: bool,
    /// Propagated unmergeable.
    pub unmergeable: bool,
    /// The region's romd mode at render time.
    pub romd_mode: bool,
    /// The terminating region's *own* readonly flag: QEMU 7.2 decides whether
    /// a write goes straight to RAM from this, not from the propagated flag.
    pub region_readonly: bool,
    /// Dirty-log clients at render time.
    pub dirty_log_mask: u8,
    /// The terminating region's priority field (what `info mtree -f` prints).
    pub priority: i32,
    /// The terminating region's own type (before readonly propagation).
    pub region_type: RegionType,
}

/// One contiguous piece of an address space served by one region.
pub struct FlatRange {
    pub(crate) start: u64,
    pub(crate) last: u64,
    pub(crate) offset_in_region: u64,
    pub(crate) region: Arc<RegionCore>,
    pub(crate) attrs: RangeAttrs,
    /// Host address of `start` when reads of this range go straight to host
    /// memory (RAM, or a ROM device in romd mode); null otherwise.
    pub(crate) host: *mut u8,
    /// How writes mark dirty pages: `None` while no client tracks the range
    /// (set at render by `crate::view::dirty_marks::attach`).
    pub(crate) dirty: Option<crate::host::dirty_bitmap::RangeDirty>,
}

// SAFETY: `host` points into the memory backend held (through `region`) by
// this range; the backend is `Send + Sync` and the pointer is only used for
// raw copies that tolerate concurrent access, like the backend's own methods.
unsafe impl Send for FlatRange {}
// SAFETY: as above; a `FlatRange` is immutable.
unsafe impl Sync for FlatRange {}

impl FlatRange {
    /// First address of the range.
    pub fn start(&self) -> u64 {
        self.start
    }
    /// Last address of the range (inclusive).
    pub fn last(&self) -> u64 {
        self.last
    }
    /// Length in bytes (up to 2^64).
    pub fn len(&self) -> u128 {
        u128::from(self.last - self.start) + 1
    }
    /// Never true: ranges are non-empty. Present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Offset of `start` inside the region.
    pub fn offset_in_region(&self) -> u64 {
        self.offset_in_region
    }
    /// The region that serves this range.
    pub fn region(&self) -> &Arc<RegionCore> {
        &self.region
    }
    /// Propagated attributes.
    pub fn attrs(&self) -> &RangeAttrs {
        &self.attrs
    }
    /// The type `info mtree -f` prints: `rom` if the range is readonly,
    /// otherwise the region's own type.
    pub fn printed_type(&self) -> RegionType {
        if self.attrs.readonly {
            RegionType::Rom
        } else {
            self.attrs.region_type
        }
    }
    /// Whether reads go straight to host memory.
    pub fn is_direct_read(&self) -> bool {
        !self.host.is_null()
    }
    /// QEMU 7.2: writes go straight to RAM iff the region is RAM (not a RAM
    /// device, not a ROM device) and not readonly *itself*.
    pub fn is_direct_write(&self) -> bool {
        !self.host.is_null() && self.region.kind() == RegionKind::Ram && !self.attrs.region_readonly
    }
    /// Host address of `addr` (which must lie in the range) for direct access.
    #[inline]
    pub(crate) fn host_at(&self, addr: u64) -> *mut u8 {
        // The offset is below the range length, which the backend covers.
        self.host.wrapping_add((addr - self.start) as usize)
    }
    /// Whether `addr` lies in the range.
    #[inline]
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr <= self.last
    }

    /// A copy sharing the region (and so the cached host address).
    pub(crate) fn share(&self) -> FlatRange {
        FlatRange {
            start: self.start,
            last: self.last,
            offset_in_region: self.offset_in_region,
            region: Arc::clone(&self.region),
            attrs: self.attrs,
            host: self.host,
            dirty: self.dirty.clone(),
        }
    }

    /// Whether `self` and `next` (which starts right after `self`) are the
    /// same rendered thing: same region, same attributes, contiguous offsets.
    /// QEMU's merge rule joins them unless they are unmergeable.
    pub(crate) fn continues_into(&self, next: &FlatRange) -> bool {
        self.last.checked_add(1) == Some(next.start)
            && Arc::ptr_eq(&self.region, &next.region)
            && self.attrs == next.attrs
            && u128::from(self.offset_in_region) + u128::from(self.last - self.start) + 1
                == u128::from(next.offset_in_region)
    }

    pub(crate) fn new(
        start: u64,
        last: u64,
        offset_in_region: u64,
        region: Arc<RegionCore>,
        attrs: RangeAttrs,
    ) -> FlatRange {
        let host = match region.backing() {
            Backing::Ram { block, offset } => block
                .host_addr()
                .wrapping_add((offset + offset_in_region) as usize),
            Backing::RomDevice { block, .. } if attrs.romd_mode => {
                block.host_addr().wrapping_add(offset_in_region as usize)
            }
            _ => std::ptr::null_mut(),
        };
        FlatRange {
            start,
            last,
            offset_in_region,
            region,
            attrs,
            host,
            dirty: None,
        }
    }
}

impl std::fmt::Debug for FlatRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:016x}-{:016x} {} @{:#x} {:?}",
            self.start,
            self.last,
            self.region.name(),
            self.offset_in_region,
            self.attrs
        )
    }
}

/// An immutable rendered view.
pub struct FlatView {
    pub(crate) root: Option<RegionId>,
    pub(crate) root_name: Option<Box<str>>,
    pub(crate) ranges: Vec<FlatRange>,
    /// Every region the render visited (a superset after a splice); the view
    /// must be re-rendered when one of them changes. Behind a lock only so
    /// that a commit whose re-render came out identical can keep publishing
    /// this view and still record what the new render reached (the control
    /// plane reads and writes it under the machine's lock; readers of the
    /// view never touch it).
    reached: std::sync::Mutex<Vec<RegionId>>,
    census: Option<(Arc<Census>, ObjectKey)>,
    /// Lookup accelerator over the packed `start` of every range (a bucket
    /// table, see [`crate::view::range_index::RangeIndex`]). Built once in `new`.
    starts: crate::view::range_index::RangeIndex,
    /// This view's writable RAM for vm-memory, built on first use by
    /// `AddressSpace::guest_memory` and dropped with the view. Opaque here
    /// (the view does not know the integration that fills it).
    #[cfg(all(feature = "vm-memory", unix))]
    pub(crate) guest_ram: std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>,
}

impl FlatView {
    pub(crate) fn new(
        root: Option<RegionId>,
        root_name: Option<&str>,
        ranges: Vec<FlatRange>,
        reached: Vec<RegionId>,
        census: Option<&Arc<Census>>,
    ) -> FlatView {
        let census = census.map(|c| {
            let mut held: Vec<ObjectKey> = ranges.iter().map(|r| r.region.census_key()).collect();
            held.sort_unstable();
            held.dedup();
            let name = root_name.unwrap_or("(empty)");
            (
                c.clone(),
                c.register_holding(ObjectKind::FlatView, name, held),
            )
        });
        let starts =
            crate::view::range_index::RangeIndex::new(ranges.iter().map(|r| r.start).collect());
        FlatView {
            root,
            root_name: root_name.map(Into::into),
            ranges,
            reached: std::sync::Mutex::new(reached),
            census,
            starts,
            #[cfg(all(feature = "vm-memory", unix))]
            guest_ram: std::sync::OnceLock::new(),
        }
    }

    /// The empty view: no ranges, every access unassigned.
    pub fn empty() -> FlatView {
        FlatView::new(None, None, Vec::new(), Vec::new(), None)
    }

    /// The physical root the view was rendered from (`None` = empty view).
    pub fn root(&self) -> Option<RegionId> {
        self.root
    }

    /// Name of the physical root, as `info mtree -f` prints it.
    pub fn root_name(&self) -> Option<&str> {
        self.root_name.as_deref()
    }

    /// The ranges, sorted by address.
    pub fn ranges(&self) -> &[FlatRange] {
        &self.ranges
    }

    /// The range containing `addr`, if any.
    #[inline]
    pub fn lookup(&self, addr: u64) -> Option<&FlatRange> {
        let r = self.ranges.get(self.last_start_at_or_below(addr)?)?;
        (addr <= r.last).then_some(r)
    }

    /// Index of the last range starting at or below `addr` (bucket table,
    /// then a binary search inside the bucket if it holds several ranges).
    #[inline]
    fn last_start_at_or_below(&self, addr: u64) -> Option<usize> {
        self.starts.last_start_at_or_below(addr)
    }

    /// Index of the range containing `addr`, if any.
    #[inline]
    pub fn lookup_index(&self, addr: u64) -> Option<usize> {
        let j = self.last_start_at_or_below(addr)?;
        (addr <= self.ranges.get(j)?.last).then_some(j)
    }

    /// Whether the render reached a region `changed` says yes to.
    pub(crate) fn reached_any(&self, changed: impl Fn(RegionId) -> bool) -> bool {
        let reached = self.reached.lock().unwrap_or_else(|e| e.into_inner());
        reached.iter().any(|&r| changed(r))
    }

    /// A copy of the reached list.
    pub(crate) fn reached(&self) -> Vec<RegionId> {
        self.reached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the reached list (after a re-render that came out identical).
    pub(crate) fn set_reached(&self, reached: Vec<RegionId>) {
        *self.reached.lock().unwrap_or_else(|e| e.into_inner()) = reached;
    }

    /// The census key of this view, if it is registered.
    pub fn census_key(&self) -> Option<ObjectKey> {
        self.census.as_ref().map(|(_, k)| *k)
    }
}

impl Drop for FlatView {
    fn drop(&mut self) {
        if let Some((census, key)) = &self.census {
            census.finalize(*key);
        }
    }
}

impl std::fmt::Debug for FlatView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlatView")
            .field("root", &self.root_name)
            .field("ranges", &self.ranges)
            .finish()
    }
}
