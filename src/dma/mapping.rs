//! DMA: mapping guest ranges for direct access, bounce buffers, map clients
//! (QEMU's `address_space_map` / `address_space_unmap` in `system/physmem.c`,
//! as on QEMU's master branch).
//!
//! [`AddressSpace::map`] returns a [`DmaMapping`], an RAII guard over a guest
//! range:
//!
//! * **Direct RAM.** If the range at `addr` is RAM that can be accessed
//!   directly in the mapping's direction (reads: RAM and ROM devices in romd
//!   mode; writes: RAM whose region is not itself readonly), the guard gives
//!   bounds-checked copies into and out of host memory. The mapping extends
//!   across following flat ranges as long as they are served by the same
//!   region, contiguously; its length may therefore be shorter than asked for
//!   (as QEMU's `*plen`).
//! * **Through an IOMMU.** A range served by an IOMMU region is translated
//!   (the IOTLB cache, else the device) for the mapping's direction; if the
//!   translation allows it and lands in RAM of the target address space
//!   that is direct in that direction, the mapping is a direct mapping of
//!   that RAM, clamped to the IOTLB page, the IOMMU range and the target's
//!   contiguous RAM. It keeps what any direct mapping keeps, the memory
//!   (not the IOMMU region, not its device). An UNMAP notification while it
//!   is out does not revoke it: like a host pointer QEMU's
//!   `address_space_map` returns through an IOMMU, it stays valid until it
//!   is unmapped, reading and writing the page it was translated to (the
//!   census names it as that memory's holder meanwhile); new accesses
//!   through the IOMMU see the UNMAP at once. Denied translations, MMIO,
//!   holes and chains of IOMMUs bounce (below).
//! * **Bounce buffer.** Anything else (MMIO, ROM devices in MMIO mode, RAM
//!   devices, ROM mapped for writing) is copied through a buffer reserved
//!   against the address space's bounce limit
//!   ([`DEFAULT_MAX_BOUNCE`] bytes by default,
//!   [`AddressSpace::set_max_bounce_buffer_size`]). A mapping for reading is
//!   prefilled through the view it was mapped from (with the caller's
//!   attributes); a mapping for writing is written back through the address
//!   space's current view when it is unmapped (with unspecified attributes,
//!   as QEMU does). When the limit is reached, `map` fails with
//!   [`DmaError::NoBounceSpace`]; [`AddressSpace::register_map_client`]
//!   registers a one-shot callback run when bounce space frees.
//!
//! # Map clients
//!
//! A client runs once, on the thread that frees bounce space (an unmap, a
//! raised limit, or a registration while space is free), with no memtree
//! lock held. QEMU defers clients to a bottom half; memtree has no main
//! loop, so it defers only what would recurse: while a thread runs map
//! clients, anything that would run clients on that thread (a client that
//! registers a client, or maps and unmaps a bounce buffer) only leaves them
//! registered, and they run at the next such event outside a client. A
//! client that re-registers itself therefore runs once per event, never
//! recursively. A client that panics is gone (it was `FnOnce`); the panic
//! reaches the caller that freed the space, and the clients that had not
//! run yet stay registered for the next event.
//!
//! # Panics in device callbacks
//!
//! Prefilling a bounce buffer and writing it back call the device. If the
//! device panics, the panic reaches the caller of `map` / `unmap` (or the
//! drop of the mapping), and whatever the mapping had reserved is released
//! on the way out (drop guards): its bounce space, its mapping-table entry,
//! its region. A mapping dropped while its thread already unwinds from
//! another panic still writes back and still runs the waiting map clients,
//! each under `catch_unwind` (a second panic would abort the process): a
//! panic there is recorded in the census and the write-back reports
//! `ACCESS_ERROR`.
//!
//! # What a mapping keeps alive
//!
//! Exactly what it needs, and nothing else:
//!
//! * Direct RAM (of a region with an owner or without): the memory
//!   ([`MemoryBackend`]) — not the region, not the device. The device can be
//!   unplugged (or the ownerless region destroyed) while the mapping is out;
//!   its regions and the device itself are finalized at once (once no view
//!   holds them) and the memory stays valid until the mapping is dropped.
//!   The mapping pins the memory with its entry in the machine's mapping
//!   table rather than with an `Arc`, so map and unmap cost no locked
//!   instruction at all (see [`crate::host::mapping_table`], "Entries that pin
//!   memory"). Ownerless memory is not machine-lifetime memory: like a
//!   device's, it is freed when its last user (view, mapping, cache,
//!   snapshot, KVM slot) goes.
//! * Bounce buffer: the region's core ([`RegionCore`]), and with it the
//!   device's state (its ops) and owner, until the mapping is dropped.
//!
//! # Diagnostics
//!
//! Mappings (of RAM and bounce buffers), caches
//! ([`crate::dma::cache::MemoryRegionCache`]) and sections
//! ([`crate::dma::cache::SectionRef`]) are recorded in the machine's mapping table
//! ([`crate::host::mapping_table`]) with plain stores into the recording thread's
//! shard: no lock, no locked instruction, no allocation. The census
//! registers them as [`crate::lifecycle::census::ObjectKind::Mapping`] objects lazily,
//! whenever anybody asks the census anything, so `census.explain(backend)` says
//! `held by mapping #12 "dma pci 0x1000+0x200 from-device" -> backend ...`.
//! [`crate::Machine::unplug`] lists in its report every recorded mapping
//! that still holds one of the unplugged device's regions or memory.
//!
//! # Unmapping
//!
//! [`DmaMapping::unmap`] consumes the guard, so a mapping cannot be unmapped
//! twice:
//!
//! ```compile_fail,E0382
//! # use memtree::{DmaDirection, MemTxAttrs, Memory};
//! # let memory = Memory::new();
//! # let root = memory.new_container("root", 1 << 32, None).unwrap();
//! # let ram = memory.new_ram("ram", 0x1000, None).unwrap();
//! # memory.add_subregion(root, 0, ram).unwrap();
//! # let id = memory.new_address_space("as", root, None).unwrap();
//! # let space = memory.address_space(id).unwrap();
//! let m = space.map(0, 16, DmaDirection::FromDevice, MemTxAttrs::UNSPECIFIED).unwrap();
//! m.unmap(16);
//! m.unmap(16); // error[E0382]: use of moved value: `m`
//! ```
//!
//! Dropping a guard is `unmap(len())`: a bounce buffer mapped for writing is
//! written back in full. Mapping ids ([`MappingId`]) are for diagnostics
//! only; there is no unmap-by-id.
//!
//! Unmapping a direct mapping made for writing marks its first
//! `access_len` bytes dirty for the clients tracking the memory at that
//! moment (QEMU's `invalidate_and_set_dirty`, [`crate::host::dirty_bitmap`]); a bounce
//! buffer's write-back marks through dispatch.

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::access::bounce::Reservation;
use crate::access::dispatch::SpaceCursor;
use crate::access::space::AddressSpace;
use crate::host::backend::MemoryBackend;
use crate::host::mapping_table::{Entry, MappingTable, Ticket};
use crate::lifecycle::census::ObjectKey;
use crate::region::attrs::{MemTxAttrs, MemTxResult};
use crate::region::region_core::{Backing, RegionCore};
use crate::view::flatview::{FlatRange, FlatView};

pub use crate::access::bounce::{MapClientId, DEFAULT_MAX_BOUNCE};
pub use crate::host::mapping_info::{DmaDirection, MappingId, MappingInfo, MappingKind};

/// Why a mapping, cache or access was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DmaError {
    /// A mapping of zero bytes was requested.
    #[error("cannot map zero bytes")]
    ZeroLength,
    /// `addr + len` is past the end of the 64-bit address space.
    #[error("range {addr:#x}+{len:#x} runs past the end of the address space")]
    OutOfRange {
        /// Requested start.
        addr: u64,
        /// Requested length.
        len: u64,
    },
    /// Nothing is mapped at `addr` in the address space.
    #[error("nothing is mapped at {addr:#x} in address space \"{space}\"")]
    Unassigned {
        /// The address space.
        space: String,
        /// The address.
        addr: u64,
    },
    /// The address space's bounce buffers are exhausted; register a map
    /// client to be told when space frees.
    #[error("bounce buffers of address space \"{space}\" are exhausted ({in_use:#x} of {limit:#x} bytes in use)")]
    NoBounceSpace {
        /// The address space.
        space: String,
        /// Bytes reserved by outstanding mappings.
        in_use: u64,
        /// The limit.
        limit: u64,
    },
    /// An access outside the mapping or cache.
    #[error(
        "access of {len:#x} bytes at offset {offset:#x} is outside the mapping of {size:#x} bytes"
    )]
    OutOfBounds {
        /// Offset of the access inside the mapping.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Length of the mapping.
        size: u64,
    },
    /// A write through a mapping made for [`DmaDirection::ToDevice`], or a
    /// read through a cache made for writing only.
    #[error("the mapping was made for {0:?}")]
    WrongDirection(DmaDirection),
    /// A cached access that goes through device callbacks failed.
    #[error("transaction failed: {0:?}")]
    Transaction(MemTxResult),
}

// ---------------------------------------------------------------------------
// Helpers shared with the cache
// ---------------------------------------------------------------------------

/// The memory behind a directly accessible range, which a mapping or cache
/// of it keeps (whether the region has an owner or not).
#[inline]
pub(crate) fn ram_backend(core: &RegionCore) -> Option<&Arc<MemoryBackend>> {
    match core.backing() {
        Backing::Ram { block, .. }
        | Backing::RamDevice { block, .. }
        | Backing::RomDevice { block, .. } => Some(block),
        _ => None,
    }
}

/// Whether the range can be accessed directly in direction `dir`.
#[inline]
pub(crate) fn is_direct(r: &FlatRange, dir: DmaDirection) -> bool {
    (!dir.reads() || r.is_direct_read()) && (!dir.writes() || r.is_direct_write())
}

/// Bytes from `addr` (inside `r`) to the end of `r`, capped at `want`.
#[inline]
pub(crate) fn avail_in(r: &FlatRange, addr: u64, want: u64) -> u64 {
    let rest = u128::from(r.last() - addr) + 1;
    u64::try_from(rest).unwrap_or(u64::MAX).min(want)
}

/// Length of the direct window at `addr` in `view` (in range `first`),
/// extended across following ranges served contiguously by the same region
/// and direct in `dir`, capped at `want`.
#[inline]
pub(crate) fn direct_extent(
    view: &FlatView,
    first: &FlatRange,
    addr: u64,
    want: u64,
    dir: DmaDirection,
) -> u64 {
    let mut got = avail_in(first, addr, want);
    let mut cur = first;
    while got < want {
        // A contiguous successor starts right after `cur`.
        let Some(next) = cur.last().checked_add(1).and_then(|a| view.lookup(a)) else {
            break;
        };
        let contiguous = cur.last().checked_add(1) == Some(next.start())
            && Arc::ptr_eq(cur.region(), next.region())
            && u128::from(cur.offset_in_region()) + cur.len()
                == u128::from(next.offset_in_region())
            && is_direct(next, dir);
        if !contiguous {
            break;
        }
        got += avail_in(next, next.start(), want - got);
        cur = next;
    }
    got
}

#[inline]
pub(crate) fn check_range(addr: u64, len: u64) -> Result<(), DmaError> {
    if len == 0 {
        return Err(DmaError::ZeroLength);
    }
    if addr.checked_add(len - 1).is_none() {
        return Err(DmaError::OutOfRange { addr, len });
    }
    Ok(())
}

#[inline]
pub(crate) fn check_bounds(offset: u64, len: usize, size: u64) -> Result<(), DmaError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DmaError::OutOfBounds {
            offset,
            len: len as u64,
            size,
        }),
    }
}

// ---------------------------------------------------------------------------
// The mapping guard
// ---------------------------------------------------------------------------

/// What a mapping holds, besides its borrow of the address-space handle.
enum Hold<'a> {
    /// Nothing: a mapping already released (only inside `unmap`/`drop`).
    Nothing,
    /// RAM (of a region with or without an owner): the mapping's entry in
    /// `table` (the
    /// machine's, borrowed from the handle), which pins the memory (see
    /// [`crate::host::mapping_table`]). `table` is derivable from `space`; it is
    /// kept so that unmap does not chase three pointers to reach it.
    Memory {
        table: &'a MappingTable,
        ticket: Ticket,
        /// For a mapping that writes: the memory's dirty bitmaps and the
        /// mapping's offset in the memory, marked at unmap for the length
        /// written (`crate::host::dirty_bitmap`). Valid while the entry pins the memory.
        dirty: Option<(NonNull<crate::host::dirty_bitmap::BlockDirty>, u64)>,
    },
    /// A bounce buffer: the region (and so the device).
    Bounce(Box<BounceHold>),
}

struct BounceHold {
    buf: Box<[u8]>,
    region: Arc<RegionCore>,
    ticket: Ticket,
    prefill: MemTxResult,
}

/// A DMA mapping of a guest range: an RAII guard over direct host memory or a
/// bounce buffer. See the [module docs](self).
///
/// Access is by bounds-checked copies ([`read`](Self::read),
/// [`write`](Self::write)); no Rust reference into guest memory is handed
/// out. Dropping the guard is [`unmap`](Self::unmap) with the full length.
///
/// ```
/// use memtree::{DmaDirection, MemTxAttrs, Memory};
///
/// let memory = Memory::new();
/// let system = memory.new_container("system", 1 << 32, None).unwrap();
/// let ram = memory.new_ram("ram", 0x1_0000, None).unwrap();
/// memory.add_subregion(system, 0, ram).unwrap();
/// let id = memory.new_address_space("memory", system, None).unwrap();
/// let bus = memory.address_space(id).unwrap();
/// let a = MemTxAttrs::UNSPECIFIED;
///
/// // A device writes a buffer into guest RAM...
/// let mut dma = bus.map(0x2000, 16, DmaDirection::FromDevice, a).unwrap();
/// assert!(!dma.is_bounce(), "RAM is mapped directly");
/// dma.write(0, b"packet from NIC!").unwrap();
/// drop(dma); // unmap: the bytes are the guest's, dirty pages marked
///
/// let mut seen = [0u8; 16];
/// bus.read(0x2000, &mut seen, a).into_result().unwrap();
/// assert_eq!(&seen, b"packet from NIC!");
/// ```
pub struct DmaMapping<'a> {
    space: &'a AddressSpace,
    /// Host address of the first byte of a direct mapping (unused for a
    /// bounce buffer).
    host: NonNull<u8>,
    addr: u64,
    len: u64,
    dir: DmaDirection,
    /// [`Hold::Nothing`] once released (only inside `unmap`/`drop`).
    hold: Hold<'a>,
}

// SAFETY: the raw host pointer points into memory kept mapped by the
// mapping's entry in the machine's mapping table, which pins it (the memory
// is freed only after the entry is removed, see `crate::host::mapping_table`); the
// guard only performs guest-memory copies through it (`crate::host::ram`), like
// `RamBlock`'s own methods, which are `Send + Sync`.
unsafe impl Send for DmaMapping<'_> {}
// SAFETY: as above; `&DmaMapping` only allows reads (raw copies out of
// memory that tolerates concurrent access, or reads of the owned bounce
// buffer, which is only written through `&mut self`).
unsafe impl Sync for DmaMapping<'_> {}

impl fmt::Debug for DmaMapping<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaMapping")
            .field("space", &self.space.name())
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &format_args!("{:#x}", self.len))
            .field("dir", &self.dir)
            .field("bounce", &self.is_bounce())
            .finish()
    }
}

impl AddressSpace {
    /// Maps up to `len` bytes at `addr` for DMA in direction `dir` (QEMU
    /// `address_space_map`). The mapping may be shorter than `len`
    /// ([`DmaMapping::len`]): a direct mapping ends where the region stops
    /// being contiguous, a bounce mapping at the end of the flat range or of
    /// the free bounce space.
    ///
    /// # Errors
    ///
    /// [`DmaError::ZeroLength`], [`DmaError::OutOfRange`] if `addr + len`
    /// passes 2^64, [`DmaError::Unassigned`] if nothing is mapped at `addr`
    /// (QEMU would bounce garbage), [`DmaError::NoBounceSpace`] if a bounce
    /// buffer is needed and none is free.
    ///
    /// # Examples
    ///
    /// ```
    /// use memtree::{DmaDirection, MemTxAttrs, Memory};
    /// let memory = Memory::new();
    /// let root = memory.new_container("root", 1 << 32, None).unwrap();
    /// let ram = memory.new_ram("ram", 0x1000, None).unwrap();
    /// memory.add_subregion(root, 0, ram).unwrap();
    /// let id = memory.new_address_space("as", root, None).unwrap();
    /// let space = memory.address_space(id).unwrap();
    ///
    /// let mut m = space.map(0x10, 4, DmaDirection::FromDevice, MemTxAttrs::UNSPECIFIED).unwrap();
    /// m.write(0, b"dma!").unwrap();
    /// m.unmap(4);
    /// let mut buf = [0; 4];
    /// assert!(space.read(0x10, &mut buf, MemTxAttrs::UNSPECIFIED).is_ok());
    /// assert_eq!(&buf, b"dma!");
    /// ```
    #[inline(always)]
    pub fn map(
        &self,
        addr: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MemTxAttrs,
    ) -> Result<DmaMapping<'_>, DmaError> {
        check_range(addr, len)?;
        self.map_in(&self.view_guard(), addr, len, dir, attrs)
    }

    /// [`AddressSpace::map`] against `view` (the published view, loaded by
    /// the caller: through the shared handle or a [`SpaceCursor`]). The
    /// direct-RAM path is inlined into the caller; the rest is not.
    #[inline(always)]
    pub(crate) fn map_in(
        &self,
        view: &FlatView,
        addr: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MemTxAttrs,
    ) -> Result<DmaMapping<'_>, DmaError> {
        let Some(r) = view.lookup(addr) else {
            return Err(self.unassigned(addr));
        };
        if !is_direct(r, dir) {
            if let Some(m) = self.map_translated(r, addr, len, dir, attrs) {
                return m;
            }
            return self.map_bounce(view, r, addr, len, dir, attrs);
        }
        let got = direct_extent(view, r, addr, len, dir);
        self.map_direct(r, addr, addr, got, dir)
    }

    /// A direct mapping of `got` bytes of the direct range `r` at `at` (an
    /// address of `r`'s view), recorded as made at `addr` of this space.
    /// The caller holds `r`'s view, so the memory cannot be retired before
    /// the mapping's entry pins it.
    #[inline(always)]
    fn map_direct(
        &self,
        r: &FlatRange,
        at: u64,
        addr: u64,
        got: u64,
        dir: DmaDirection,
    ) -> Result<DmaMapping<'_>, DmaError> {
        let Some(host) = NonNull::new(r.host_at(at)) else {
            // A direct range always has a host address; be total anyway.
            return Err(self.unassigned(addr));
        };
        let hold = match ram_backend(r.region()) {
            Some(backend) => {
                // The view (borrowed for this call) holds the backend, so
                // it cannot be retired before the entry below pins it.
                backend.mark_pinned();
                let table = &*self.shared.machine.dma;
                let ticket = table.insert(&Entry {
                    kind: MappingKind::DirectRam,
                    dir,
                    space: self.census_key(),
                    addr,
                    len: got,
                    holds: backend.census_key(),
                });
                let dirty = dir.writes().then(|| {
                    let log = backend.block().dirty_log();
                    let at = host.as_ptr() as u64 - backend.host_addr() as u64;
                    (NonNull::from(&**log), at)
                });
                Hold::Memory {
                    table,
                    ticket,
                    dirty,
                }
            }
            // A direct range is always served by memory; be total anyway.
            None => return Err(self.unassigned(addr)),
        };
        Ok(DmaMapping {
            space: self,
            host,
            addr,
            len: got,
            dir,
            hold,
        })
    }

    /// Through an IOMMU range `r`: a direct mapping of the RAM the
    /// translation of `addr` lands in, when the translation allows `dir`
    /// and its target is directly accessible RAM (clamped to the IOTLB
    /// page, the IOMMU range and the target's contiguous RAM); `None` to
    /// bounce (not an IOMMU, denied, MMIO, a hole, a further IOMMU). The
    /// mapping keeps what any direct mapping keeps, the memory, and stays
    /// valid until it is unmapped, whatever the IOMMU notifies meanwhile
    /// (see the module docs).
    #[inline(never)]
    fn map_translated(
        &self,
        r: &FlatRange,
        addr: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MemTxAttrs,
    ) -> Option<Result<DmaMapping<'_>, DmaError>> {
        crate::access::iommu::with_direct_target(r, addr, dir, attrs, |view, j, ta, max| {
            let tr = view.range(j)?;
            if !is_direct(tr, dir) {
                return None;
            }
            let got = direct_extent(view, tr, ta, len.min(max), dir);
            Some(self.map_direct(tr, ta, addr, got, dir))
        })
        .flatten()
    }

    #[cold]
    pub(crate) fn unassigned(&self, addr: u64) -> DmaError {
        DmaError::Unassigned {
            space: self.name().to_owned(),
            addr,
        }
    }

    /// A bounce buffer over the flat range `r` at `addr`, clamped to that
    /// range so that the region it pins is the one whose bytes it holds.
    #[inline(never)]
    fn map_bounce(
        &self,
        view: &FlatView,
        r: &FlatRange,
        addr: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MemTxAttrs,
    ) -> Result<DmaMapping<'_>, DmaError> {
        let want = avail_in(r, addr, len);
        let bounce = &self.shared.bounce;
        let got = bounce.reserve(want);
        if got == 0 {
            return Err(DmaError::NoBounceSpace {
                space: self.name().to_owned(),
                in_use: bounce.in_use(),
                limit: bounce.limit.load(Ordering::Acquire),
            });
        }
        // Released if the prefill (a device callback) panics.
        let reservation = Reservation {
            state: bounce,
            len: got,
        };
        let mut buf = vec![0u8; got as usize].into_boxed_slice();
        let region = r.region().clone();
        let prefill = if dir.reads() {
            view.read(addr, &mut buf, attrs)
        } else {
            MemTxResult::OK
        };
        reservation.keep();
        let ticket = self.shared.machine.dma.insert(&Entry {
            kind: MappingKind::Bounce,
            dir,
            space: self.census_key(),
            addr,
            len: got,
            holds: region.census_key(),
        });
        Ok(DmaMapping {
            space: self,
            host: NonNull::dangling(),
            addr,
            len: got,
            dir,
            hold: Hold::Bounce(Box::new(BounceHold {
                buf,
                region,
                ticket,
                prefill,
            })),
        })
    }

    /// The bounce-buffer limit of this address space, in bytes.
    pub fn max_bounce_buffer_size(&self) -> u64 {
        self.shared.bounce.limit.load(Ordering::Acquire)
    }

    /// Sets the bounce-buffer limit (QEMU's PCI `x-max-bounce-buffer-size`).
    /// Outstanding mappings keep their buffers; raising the limit notifies
    /// map clients.
    pub fn set_max_bounce_buffer_size(&self, limit: u64) {
        self.shared.bounce.limit.store(limit, Ordering::Release);
        if self.shared.bounce.has_room() {
            self.shared.bounce.notify();
        }
    }

    /// Bytes of bounce buffer reserved by outstanding mappings.
    pub fn bounce_in_use(&self) -> u64 {
        self.shared.bounce.in_use()
    }

    /// Registers a one-shot callback run when bounce space frees (QEMU
    /// `address_space_register_map_client`). If space is free right now it
    /// runs at once, before this returns, unless this is called from a map
    /// client (then it waits for the next time space frees: see "Map
    /// clients" in the [module docs](self)). The callback runs on the thread
    /// that frees the space, with no memtree lock held; it may map again.
    pub fn register_map_client(&self, f: impl FnOnce() + Send + 'static) -> MapClientId {
        let bounce = &self.shared.bounce;
        let id = MapClientId(bounce.next_client.fetch_add(1, Ordering::Relaxed));
        bounce.clients.lock().push((id, Box::new(f)));
        if bounce.has_room() {
            bounce.notify();
        }
        id
    }

    /// Removes a client that has not run yet; returns whether it was still
    /// registered.
    pub fn unregister_map_client(&self, id: MapClientId) -> bool {
        let mut clients = self.shared.bounce.clients.lock();
        match clients.iter().position(|(c, _)| *c == id) {
            Some(i) => {
                drop(clients.remove(i));
                true
            }
            None => false,
        }
    }

    /// Every outstanding recorded mapping, cache and section of the machine
    /// (not only of this address space), registered in the census.
    pub fn outstanding_mappings(&self) -> Vec<MappingInfo> {
        let m = &self.shared.machine;
        m.dma.list(&m.census)
    }
}

impl SpaceCursor {
    /// [`AddressSpace::map`] through the cursor's cached view: the same
    /// mapping, without loading the published view through the shared
    /// handle (for a DMA worker that maps often).
    #[inline(always)]
    pub fn map(
        &mut self,
        addr: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MemTxAttrs,
    ) -> Result<DmaMapping<'_>, DmaError> {
        check_range(addr, len)?;
        let view = self.cache.load();
        self.space.map_in(view, addr, len, dir, attrs)
    }
}

impl<'a> DmaMapping<'a> {
    /// Guest address of the first byte.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length actually mapped (may be less than requested).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: mappings are at least one byte long.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The direction the mapping was made for.
    pub fn direction(&self) -> DmaDirection {
        self.dir
    }

    /// The address space the mapping was made through.
    pub fn space(&self) -> &'a AddressSpace {
        self.space
    }

    /// Whether the mapping goes through a bounce buffer.
    pub fn is_bounce(&self) -> bool {
        matches!(self.hold, Hold::Bounce(_))
    }

    /// Whether the mapping holds something: the memory (direct RAM, with or
    /// without an owner) or the region (bounce). True for every mapping that
    /// is out; no mapping is machine-lifetime any more.
    pub fn holds_reference(&self) -> bool {
        !matches!(self.hold, Hold::Nothing)
    }

    /// Result of the bounce prefill (`OK` for direct mappings and mappings
    /// for writing).
    pub fn prefill_result(&self) -> MemTxResult {
        match &self.hold {
            Hold::Bounce(b) => b.prefill,
            _ => MemTxResult::OK,
        }
    }

    /// The region a bounce mapping holds (`None` for direct RAM, which holds
    /// only memory).
    pub fn region(&self) -> Option<&Arc<RegionCore>> {
        match &self.hold {
            Hold::Bounce(b) => Some(&b.region),
            _ => None,
        }
    }

    /// The census key of the memory ([`MemoryBackend`]) a direct mapping
    /// pins (`None` for bounce buffers).
    pub fn memory_key(&self) -> Option<ObjectKey> {
        match &self.hold {
            Hold::Memory { table, ticket, .. } => Some(table.holds(*ticket)),
            _ => None,
        }
    }

    fn ticket(&self) -> Option<Ticket> {
        match &self.hold {
            Hold::Memory { ticket, .. } => Some(*ticket),
            Hold::Bounce(b) => Some(b.ticket),
            Hold::Nothing => None,
        }
    }

    /// Diagnostic id (always `Some` while the mapping is out).
    pub fn id(&self) -> Option<MappingId> {
        Some(self.space.shared.machine.dma.id(self.ticket()?))
    }

    /// The mapping's census key, registering it now if the census has not
    /// yet (always `Some` while the mapping is out).
    pub fn census_key(&self) -> Option<ObjectKey> {
        let t = self.ticket()?;
        let m = &self.space.shared.machine;
        m.dma.census_key(t, &m.census)
    }

    /// Host address of the first byte: direct memory, or the bounce buffer.
    /// Valid for [`len`](Self::len) bytes while the guard lives; never create
    /// Rust references from it into guest memory (the guest-memory
    /// functions of [`crate::host::ram`] or atomics only).
    pub fn as_ptr(&self) -> *const u8 {
        match &self.hold {
            Hold::Bounce(b) => b.buf.as_ptr(),
            _ => self.host.as_ptr(),
        }
    }

    /// Copies `buf.len()` bytes at `offset` (relative to the mapping) into
    /// `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        check_bounds(offset, buf.len(), self.len)?;
        match &self.hold {
            Hold::Bounce(b) => {
                let o = offset as usize;
                buf.copy_from_slice(&b.buf[o..o + buf.len()]);
            }
            Hold::Nothing | Hold::Memory { .. } => {
                // SAFETY: `offset + buf.len() <= len`, and `len` bytes at
                // `host` lie in host memory that stays mapped while the guard
                // lives (pinned by its table entry); `buf` is a Rust buffer,
                // never guest memory, so the ranges do not overlap.
                unsafe {
                    crate::host::ram::copy_from_guest(
                        self.host.as_ptr().add(offset as usize),
                        buf.as_mut_ptr(),
                        buf.len(),
                    )
                }
            }
        }
        Ok(())
    }

    /// Copies `buf` into the mapping at `offset`.
    ///
    /// # Errors
    ///
    /// [`DmaError::WrongDirection`] for a mapping made for
    /// [`DmaDirection::ToDevice`]; [`DmaError::OutOfBounds`].
    pub fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), DmaError> {
        if !self.dir.writes() {
            return Err(DmaError::WrongDirection(self.dir));
        }
        check_bounds(offset, buf.len(), self.len)?;
        match &mut self.hold {
            Hold::Bounce(b) => {
                let o = offset as usize;
                b.buf[o..o + buf.len()].copy_from_slice(buf);
            }
            Hold::Nothing | Hold::Memory { .. } => {
                // SAFETY: as in `read`, with the copy reversed; direct
                // mappings for writing are only made of writable RAM.
                unsafe {
                    crate::host::ram::copy_to_guest(
                        buf.as_ptr(),
                        self.host.as_ptr().add(offset as usize),
                        buf.len(),
                    )
                }
            }
        }
        Ok(())
    }

    /// Unmaps (QEMU `address_space_unmap`): a bounce buffer mapped for
    /// writing writes its first `access_len` bytes (capped at the length)
    /// back through the address space; then everything the mapping held is
    /// released and map clients are notified. Returns the result of the
    /// write-back (`OK` if there was none).
    #[inline]
    pub fn unmap(mut self, access_len: u64) -> MemTxResult {
        self.release(access_len)
    }

    #[inline(always)]
    fn release(&mut self, access_len: u64) -> MemTxResult {
        match std::mem::replace(&mut self.hold, Hold::Nothing) {
            // A released mapping holds nothing more.
            Hold::Nothing => MemTxResult::OK,
            Hold::Memory {
                table,
                ticket,
                dirty,
            } => {
                if let Some((log, at)) = dirty {
                    // SAFETY: the bitmaps belong to the memory's block,
                    // which the entry (removed just below) still pins.
                    unsafe { log.as_ref() }.mark_live(at, access_len.min(self.len));
                }
                table.remove_pin(ticket, || &self.space.shared.machine.census);
                MemTxResult::OK
            }
            Hold::Bounce(b) => self.release_bounce(*b, access_len),
        }
    }

    #[inline(never)]
    fn release_bounce(&mut self, hold: BounceHold, access_len: u64) -> MemTxResult {
        let BounceHold {
            buf,
            region,
            ticket,
            ..
        } = hold;
        // Runs after the write-back, also if it panics (a device callback).
        let _release = BounceRelease {
            space: self.space,
            ticket,
            region: Some(region),
            len: self.len,
        };
        let n = access_len.min(self.len) as usize;
        if !self.dir.writes() {
            return MemTxResult::OK;
        }
        let write_back = || {
            self.space
                .write(self.addr, &buf[..n], MemTxAttrs::UNSPECIFIED)
        };
        if !std::thread::panicking() {
            return write_back();
        }
        // The mapping is dropped by an unwinding panic: a device callback
        // that panicked now would abort the process. Its panic is caught,
        // recorded, and the write-back reported failed.
        match crate::lifecycle::deferral::catch(write_back) {
            Ok(result) => result,
            Err(p) => {
                self.space.shared.machine.census.record_panic(format!(
                    "a device panicked in a DMA bounce write-back at {:#x} while the thread was unwinding: {}",
                    self.addr,
                    crate::lifecycle::deferral::panic_message(&p)
                ));
                MemTxResult::ACCESS_ERROR
            }
        }
    }
}

/// What an unmapped bounce buffer gives back, in this order: its table
/// entry, its region, its bounce space (then map clients run).
struct BounceRelease<'a> {
    space: &'a AddressSpace,
    ticket: Ticket,
    region: Option<Arc<RegionCore>>,
    len: u64,
}

impl Drop for BounceRelease<'_> {
    fn drop(&mut self) {
        /// Gives the bounce space back even if dropping the region panics
        /// (the last reference to an unplugged device runs its state's
        /// `Drop`, which is other people's code).
        struct ReleaseSpace<'a>(&'a AddressSpace, u64);
        impl Drop for ReleaseSpace<'_> {
            fn drop(&mut self) {
                self.0.shared.bounce.release(self.1);
            }
        }
        self.space.shared.machine.dma.remove(self.ticket);
        let _space = ReleaseSpace(self.space, self.len);
        drop(self.region.take());
    }
}

impl Drop for DmaMapping<'_> {
    #[inline]
    fn drop(&mut self) {
        let len = self.len;
        // A drop has nobody to report a bounce write-back failure to:
        // `unmap` is the form that returns it.
        let _ = self.release(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::bounce::BounceState;

    #[test]
    fn dma_cursor_map_behaves_like_the_shared_handle_map() {
        let memory = crate::Memory::new();
        let root = memory.new_container("root", 1 << 32, None).unwrap();
        let ram = memory.new_ram("ram", 0x1000, None).unwrap();
        memory.add_subregion(root, 0, ram).unwrap();
        let dev = memory.new_owner("dev", None).unwrap();
        let backend = memory
            .new_backend("dev.ram", 0x1000, crate::RamBacking::Anonymous)
            .unwrap();
        let dev_ram = memory
            .new_ram_from_backend("dev.ram", &backend, 0, 0x1000, Some(dev))
            .unwrap();
        memory.add_subregion(root, 0x1_0000, dev_ram).unwrap();
        let id = memory.new_address_space("as", root, None).unwrap();
        let space = memory.address_space(id).unwrap();
        let mut cursor = space.cursor();
        let a = MemTxAttrs::UNSPECIFIED;
        {
            let mut m = cursor.map(0x10, 4, DmaDirection::FromDevice, a).unwrap();
            assert!(
                m.holds_reference() && m.id().is_some(),
                "ownerless RAM is pinned too"
            );
            m.write(0, b"dma!").unwrap();
            assert!(m.unmap(4).is_ok());
        }
        let mut buf = [0u8; 4];
        assert!(space.read(0x10, &mut buf, a).is_ok());
        assert_eq!(&buf, b"dma!");
        let m = cursor
            .map(0x1_0ff0, 0x100, DmaDirection::ToDevice, a)
            .unwrap();
        assert_eq!(m.len(), 0x10, "clamped to the end of the region");
        assert_eq!(m.memory_key(), Some(backend.census_key()));
        assert_eq!(
            Arc::strong_count(&backend),
            2,
            "region + this test: the mapping pins the memory without a reference"
        );
        assert_eq!(space.outstanding_mappings().len(), 1);
        drop(m);
        assert!(space.outstanding_mappings().is_empty());
        assert_eq!(
            cursor
                .map(0x2_0000, 4, DmaDirection::ToDevice, a)
                .unwrap_err(),
            DmaError::Unassigned {
                space: "as".into(),
                addr: 0x2_0000
            }
        );
    }

    #[test]
    fn bounce_reserve_is_capped_by_the_limit() {
        let b = BounceState::new(100);
        assert_eq!(b.reserve(60), 60);
        assert_eq!(b.reserve(60), 40);
        assert_eq!(b.reserve(1), 0);
        b.release(60);
        assert_eq!(b.in_use(), 40);
    }
}
