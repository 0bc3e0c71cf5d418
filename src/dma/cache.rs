//! Cached access to one guest range (QEMU's `MemoryRegionCache`) and
//! region lookup that pins its result (QEMU's `memory_region_find`).
//!
//! # MemoryRegionCache
//!
//! [`MemoryRegionCache::new`] resolves `(address space, addr, len,
//! direction)` once. If the range is directly accessible RAM, the cache keeps
//! the host address and what keeps it valid, and every access is a bounds
//! check and a copy. Otherwise the cache keeps only the address space handle
//! and each access goes through it ([`AddressSpace::read`] /
//! [`AddressSpace::write`]).
//!
//! What the cache holds — deliberately *not* QEMU's FlatView reference:
//!
//! * RAM (of a region with an owner or without): the memory
//!   ([`MemoryBackend`]) only, like a direct DMA mapping. Unplugging the
//!   device (or destroying the ownerless region) finalizes it and its
//!   regions; the memory stays valid until the cache is dropped.
//! * Anything else: the address-space handle only. A cache never pins a
//!   device.
//!
//! Caches are typically stored in device state (virtio keeps one per ring).
//! A cache that held a flat view, or a region, would then form a cycle
//! *device state → cache → view → region → device ops* that no control-plane
//! action could break; holding only memory (which holds nothing) or an
//! address-space handle (whose published view the control plane replaces at
//! unplug and empties at teardown) makes that cycle impossible to write. The
//! price is QEMU's exact stale-view semantics for MMIO: a non-direct cache
//! re-resolves each access through the current view. A direct cache keeps
//! accessing the memory it resolved, even after the guest remaps the range,
//! exactly as QEMU's; [`MemoryRegionCache::refresh`] re-resolves.
//!
//! # find
//!
//! [`AddressSpace::find`] returns a [`SectionRef`] that holds the serving
//! region's core, so the region and its device stay alive (though possibly
//! unplugged) while the section is held. Sections and RAM caches are recorded
//! for diagnostics like DMA mappings ([`crate::dma::mapping`]).

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::access::space::{AddressSpace, MachineData};
use crate::dma::mapping::{
    avail_in, check_bounds, check_range, direct_extent, is_direct, ram_backend, DmaError,
};
use crate::host::backend::MemoryBackend;
use crate::host::mapping_info::{DmaDirection, MappingId, MappingKind};
use crate::host::mapping_table::{Entry, Ticket};
use crate::lifecycle::census::ObjectKey;
use crate::region::attrs::{MemTxAttrs, MemTxResult};
use crate::region::region_core::RegionCore;

struct Direct {
    host: NonNull<u8>,
    /// Offset of `host` in its memory, for dirty marking.
    block_offset: u64,
    /// The memory, which keeps `host` valid, and the cache's table entry.
    held: (Arc<MemoryBackend>, Ticket),
}

/// A resolved guest range for repeated access. See the
/// [module docs](self).
pub struct MemoryRegionCache {
    space: AddressSpace,
    addr: u64,
    requested: u64,
    len: u64,
    dir: DmaDirection,
    direct: Option<Direct>,
}

// SAFETY: `host` points into memory kept mapped by the held backend; the
// cache only performs guest-memory copies through it (`crate::host::ram`), like
// `RamBlock`'s own `&self` methods, which are `Send + Sync`.
unsafe impl Send for MemoryRegionCache {}
// SAFETY: as above: shared access performs only raw copies into and out of
// guest memory, whose concurrent use is documented in `crate::host::ram`.
unsafe impl Sync for MemoryRegionCache {}

impl fmt::Debug for MemoryRegionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegionCache")
            .field("space", &self.space.name())
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &format_args!("{:#x}", self.len))
            .field("dir", &self.dir)
            .field("direct", &self.direct.is_some())
            .finish()
    }
}

impl MemoryRegionCache {
    /// Resolves up to `len` bytes at `addr` (QEMU
    /// `address_space_cache_init`). The usable length ([`len`](Self::len))
    /// is limited to the flat range at `addr`, extended across following
    /// ranges of the same region for direct RAM.
    ///
    /// # Errors
    ///
    /// [`DmaError::ZeroLength`], [`DmaError::OutOfRange`],
    /// [`DmaError::Unassigned`] if nothing is mapped at `addr`.
    pub fn new(
        space: &AddressSpace,
        addr: u64,
        len: u64,
        dir: DmaDirection,
    ) -> Result<MemoryRegionCache, DmaError> {
        let mut c = MemoryRegionCache {
            space: space.clone(),
            addr,
            requested: len,
            len: 0,
            dir,
            direct: None,
        };
        c.resolve()?;
        Ok(c)
    }

    fn resolve(&mut self) -> Result<(), DmaError> {
        check_range(self.addr, self.requested)?;
        let view = self.space.view_guard();
        let Some(r) = view.lookup(self.addr) else {
            return Err(self.space.unassigned(self.addr));
        };
        if is_direct(r, self.dir) {
            // A direct range always has host memory; be total anyway.
            if let (Some(host), Some(b)) =
                (NonNull::new(r.host_at(self.addr)), ram_backend(r.region()))
            {
                let len = direct_extent(&view, r, self.addr, self.requested, self.dir);
                let ticket = self.space.shared.machine.dma.insert(&Entry {
                    kind: MappingKind::Cache,
                    dir: self.dir,
                    space: self.space.census_key(),
                    addr: self.addr,
                    len,
                    holds: b.census_key(),
                });
                let held = (b.clone(), ticket);
                self.len = len;
                let block_offset = host.as_ptr() as u64 - b.host_addr() as u64;
                self.direct = Some(Direct {
                    host,
                    block_offset,
                    held,
                });
                return Ok(());
            }
        }
        self.len = avail_in(r, self.addr, self.requested);
        self.direct = None;
        Ok(())
    }

    fn unresolve(&mut self) {
        if let Some(Direct {
            held: (backend, ticket),
            ..
        }) = self.direct.take()
        {
            let m = &self.space.shared.machine;
            m.dma.remove(ticket);
            drop(backend);
        }
    }

    /// Re-resolves the range against the address space's current view (what
    /// a device does when the guest moves its rings).
    pub fn refresh(&mut self) -> Result<(), DmaError> {
        self.unresolve();
        self.resolve()
    }

    /// Guest address of the first byte.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Usable length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: a cache covers at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether accesses go straight to host memory.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The memory a direct cache holds.
    pub fn backend(&self) -> Option<&Arc<MemoryBackend>> {
        self.direct.as_ref().map(|d| &d.held.0)
    }

    /// Diagnostic id (recorded only for direct caches, which hold memory).
    pub fn id(&self) -> Option<MappingId> {
        self.direct
            .as_ref()
            .map(|d| self.space.shared.machine.dma.id(d.held.1))
    }

    /// Copies `buf.len()` bytes at `offset` (relative to the cache) into
    /// `buf` (QEMU `address_space_read_cached`).
    ///
    /// # Errors
    ///
    /// [`DmaError::OutOfBounds`]; [`DmaError::Transaction`] if a non-direct
    /// access failed.
    #[inline]
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        check_bounds(offset, buf.len(), self.len)?;
        match &self.direct {
            Some(d) => {
                // SAFETY: `offset + buf.len() <= len`, and `len` bytes at
                // `host` are host memory kept mapped by the held backend;
                // `buf` is a Rust buffer, not
                // guest memory.
                unsafe {
                    crate::host::ram::copy_from_guest(
                        d.host.as_ptr().add(offset as usize),
                        buf.as_mut_ptr(),
                        buf.len(),
                    )
                };
                Ok(())
            }
            None => tx(self
                .space
                .read(self.addr + offset, buf, MemTxAttrs::UNSPECIFIED)),
        }
    }

    /// Copies `buf` into the range at `offset` (QEMU
    /// `address_space_write_cached`).
    ///
    /// # Errors
    ///
    /// [`DmaError::WrongDirection`] for a cache made for
    /// [`DmaDirection::ToDevice`]; [`DmaError::OutOfBounds`];
    /// [`DmaError::Transaction`].
    #[inline]
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), DmaError> {
        if !self.dir.writes() {
            return Err(DmaError::WrongDirection(self.dir));
        }
        check_bounds(offset, buf.len(), self.len)?;
        match &self.direct {
            Some(d) => {
                // SAFETY: as in `read`, copy reversed; a direct cache for
                // writing only resolves to writable RAM.
                unsafe {
                    crate::host::ram::copy_to_guest(
                        buf.as_ptr(),
                        d.host.as_ptr().add(offset as usize),
                        buf.len(),
                    )
                };
                d.mark_dirty(offset, buf.len() as u64);
                Ok(())
            }
            None => tx(self
                .space
                .write(self.addr + offset, buf, MemTxAttrs::UNSPECIFIED)),
        }
    }

    /// Loads `N` bytes at `offset`, in memory order.
    #[inline]
    pub fn load<const N: usize>(&self, offset: u64) -> Result<[u8; N], DmaError> {
        if let Some(d) = &self.direct {
            check_bounds(offset, N, self.len)?;
            // SAFETY: as in `read`: `offset + N <= len` bytes of kept host
            // memory.
            return Ok(unsafe {
                crate::host::ram::load_guest::<N>(d.host.as_ptr().add(offset as usize))
            });
        }
        let mut b = [0u8; N];
        self.read(offset, &mut b)?;
        Ok(b)
    }

    /// Stores `N` bytes at `offset`, in memory order.
    #[inline]
    pub fn store<const N: usize>(&self, offset: u64, bytes: [u8; N]) -> Result<(), DmaError> {
        if let (Some(d), true) = (&self.direct, self.dir.writes()) {
            check_bounds(offset, N, self.len)?;
            // SAFETY: as in `write`: `offset + N <= len` bytes of kept,
            // writable host memory.
            unsafe { crate::host::ram::store_guest(d.host.as_ptr().add(offset as usize), bytes) };
            d.mark_dirty(offset, N as u64);
            return Ok(());
        }
        self.write(offset, &bytes)
    }
}

impl Direct {
    /// Marks what a write through the cache touched, for the clients
    /// tracking the memory now (`crate::host::dirty_bitmap`).
    #[inline]
    fn mark_dirty(&self, offset: u64, len: u64) {
        self.held
            .0
            .block()
            .dirty_log()
            .mark_live(self.block_offset + offset, len);
    }
}

fn tx(r: MemTxResult) -> Result<(), DmaError> {
    if r.is_ok() {
        Ok(())
    } else {
        Err(DmaError::Transaction(r))
    }
}

impl Drop for MemoryRegionCache {
    fn drop(&mut self) {
        self.unresolve();
    }
}

/// A section of an address space, holding the region that serves it (QEMU's
/// `MemoryRegionSection` returned by `memory_region_find`, with the
/// reference the caller must drop — here, by dropping the value).
pub struct SectionRef {
    machine: Arc<MachineData>,
    region: Arc<RegionCore>,
    offset_within_region: u64,
    size: u64,
    offset_within_address_space: u64,
    ticket: Ticket,
}

impl fmt::Debug for SectionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SectionRef")
            .field("region", &self.region.name())
            .field(
                "offset_within_region",
                &format_args!("{:#x}", self.offset_within_region),
            )
            .field("size", &format_args!("{:#x}", self.size))
            .field(
                "offset_within_address_space",
                &format_args!("{:#x}", self.offset_within_address_space),
            )
            .finish()
    }
}

impl SectionRef {
    /// The region serving the section (held: alive while the section is).
    pub fn region(&self) -> &Arc<RegionCore> {
        &self.region
    }

    /// Offset of the section's first byte inside the region.
    pub fn offset_within_region(&self) -> u64 {
        self.offset_within_region
    }

    /// Size in bytes: the requested length clipped to the flat range.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Address of the section's first byte in the address space.
    pub fn offset_within_address_space(&self) -> u64 {
        self.offset_within_address_space
    }

    /// Diagnostic id.
    pub fn id(&self) -> MappingId {
        self.machine.dma.id(self.ticket)
    }

    /// The section's census key (registering it now if needed).
    pub fn census_key(&self) -> Option<ObjectKey> {
        self.machine
            .dma
            .census_key(self.ticket, &self.machine.census)
    }
}

impl Drop for SectionRef {
    fn drop(&mut self) {
        self.machine.dma.remove(self.ticket);
        // `region` drops after the entry is removed (the section's census
        // entry is finalized at the next census query).
    }
}

impl AddressSpace {
    /// The section serving `addr`, clipped to `len` bytes and to the flat
    /// range (QEMU `memory_region_find` on the address space's root). The
    /// section holds its region. `None` if `len` is 0, `addr + len` passes
    /// 2^64, or nothing is mapped at `addr`.
    pub fn find(&self, addr: u64, len: u64) -> Option<SectionRef> {
        check_range(addr, len).ok()?;
        let view = self.view_guard();
        let r = view.lookup(addr)?;
        let size = avail_in(r, addr, len);
        let region = r.region().clone();
        let offset_within_region = r.offset_in_region().wrapping_add(addr - r.start());
        drop(view);
        let machine = self.shared.machine.clone();
        let ticket = machine.dma.insert(&Entry {
            kind: MappingKind::Section,
            dir: DmaDirection::Bidirectional,
            space: self.census_key(),
            addr,
            len: size,
            holds: region.census_key(),
        });
        Some(SectionRef {
            machine,
            region,
            offset_within_region,
            size,
            offset_within_address_space: addr,
            ticket,
        })
    }
}
