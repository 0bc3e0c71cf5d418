//! rust-vmm interoperability: an address space's RAM as a
//! [`vm_memory::GuestMemoryMmap`], for device crates written against
//! vm-memory's `GuestMemory` (virtio-queue, vhost-user back-ends, ...).
//! Behind the default `vm-memory` feature.
//!
//! [`AddressSpace::guest_memory`] takes a [`GuestMemorySnapshot`] of the
//! published flat view: one vm-memory region per range that is writable
//! RAM (reads and writes straight to host memory), merged across adjacent
//! ranges of the same memory. MMIO, ROM, ROM devices and RAM devices are
//! left out (vm-memory would bypass their access rules), and so are ranges
//! whose host address is not page aligned (vm-memory requires it). An
//! address in a left-out range is an invalid guest address to vm-memory.
//!
//! # Lifetime
//!
//! A snapshot is what it says: the RAM of one view. It holds the memory of
//! every region in it (`Arc<MemoryBackend>`) and nothing else, so a device
//! may be unplugged while a back-end still uses a snapshot: the memory stays
//! valid until the snapshot is dropped. Each held memory is recorded in the
//! machine's mapping table, so the census explains it (`held by mapping
//! #N "guest-memory memory 0x0+0x8000000 bidirectional"`). Take a new
//! snapshot after the topology changes (a listener's `commit` is the place).

use std::ops::Deref;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::backend::MemoryBackend;
use crate::dma::{direct_extent, is_direct, ram_backend, DmaDirection, MappingKind};
use crate::mapping_table::{Entry, MappingTable, Ticket};
use crate::space::AddressSpace;

/// Page size vm-memory regions must be aligned to.
const PAGE: u64 = 4096;

/// Why a snapshot could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GuestMemoryError {
    /// vm-memory refused a region (overlap, size, ...).
    #[error("vm-memory refused region {start:#x}+{len:#x}: {message}")]
    Region {
        /// Guest address of the region.
        start: u64,
        /// Its length.
        len: u64,
        /// vm-memory's error.
        message: String,
    },
}

/// The RAM of one flat view as a vm-memory `GuestMemoryMmap`. Derefs to it.
/// See the [module docs](self).
pub struct GuestMemorySnapshot {
    memory: GuestMemoryMmap,
    /// The memory of every region, each with its table entry.
    held: Vec<(Arc<MemoryBackend>, Ticket)>,
    table: Arc<MappingTable>,
}

impl std::fmt::Debug for GuestMemorySnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemorySnapshot")
            .field("regions", &self.held.len())
            .finish()
    }
}

// SAFETY: the vm-memory regions point into host memory of the backends held
// alongside (`held`), which stay mapped until the snapshot drops; the
// backends are `Send + Sync`, and vm-memory accesses guest memory with
// volatile copies that tolerate concurrent use.
unsafe impl Send for GuestMemorySnapshot {}
// SAFETY: as above.
unsafe impl Sync for GuestMemorySnapshot {}

impl Deref for GuestMemorySnapshot {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

impl Drop for GuestMemorySnapshot {
    fn drop(&mut self) {
        // The vm-memory regions go first (they only borrow the memory), then
        // each table entry, then the memory it named.
        self.memory = GuestMemoryMmap::default();
        for (backend, ticket) in self.held.drain(..) {
            self.table.remove(ticket);
            drop(backend);
        }
    }
}

impl AddressSpace {
    /// A vm-memory view of this address space's RAM (see
    /// [`crate::guest_memory`]).
    ///
    /// # Errors
    ///
    /// [`GuestMemoryError::Region`] if vm-memory refuses a region (it does
    /// not for regions memtree produces; kept total).
    pub fn guest_memory(&self) -> Result<GuestMemorySnapshot, GuestMemoryError> {
        let view = self.view_guard();
        // Runs of writable RAM: (range index, length), each extended across
        // the following ranges of the same region, as a DMA mapping is.
        let mut runs: Vec<(usize, u64)> = Vec::new();
        let ranges = view.ranges();
        let mut i = 0;
        while i < ranges.len() {
            let r = &ranges[i];
            if !is_direct(r, DmaDirection::Bidirectional) {
                i += 1;
                continue;
            }
            let len = direct_extent(&view, i, r.start(), u64::MAX, DmaDirection::Bidirectional);
            runs.push((i, len));
            let last = r.start().saturating_add(len - 1);
            while i < ranges.len() && ranges[i].last() <= last {
                i += 1;
            }
        }
        let table = self.shared.machine.dma.clone();
        let mut snapshot = GuestMemorySnapshot {
            memory: GuestMemoryMmap::default(),
            held: Vec::new(),
            table,
        };
        let mut regions = Vec::new();
        for (i, len) in runs {
            let range = &ranges[i];
            let (start, host) = (range.start(), range.host_at(range.start()));
            let Some(backend) = ram_backend(range.region()) else {
                continue;
            };
            if host as u64 % PAGE != 0 || start % PAGE != 0 {
                continue;
            }
            let Ok(size) = usize::try_from(len) else {
                continue;
            };
            // What `crate::ram` mapped the memory with.
            let flags = match backend.backing() {
                crate::RamBacking::Anonymous => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                crate::RamBacking::Memfd => libc::MAP_SHARED,
            } | libc::MAP_NORESERVE;
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            // SAFETY: `host..host + size` lies inside the host
            // mapping of `backend` (a flat range never extends past its
            // backend), which the snapshot holds until after the vm-memory
            // regions are dropped (`GuestMemorySnapshot::drop`); the region
            // is built as not owning the mapping, so vm-memory never unmaps
            // it.
            let mmap = unsafe { MmapRegion::build_raw(host, size, prot, flags) };
            let refused = |message: String| GuestMemoryError::Region {
                start,
                len,
                message,
            };
            let mmap = mmap.map_err(|e| refused(e.to_string()))?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(start))
                .map_err(|e| refused(e.to_string()))?;
            let ticket = snapshot.table.insert(&Entry {
                kind: MappingKind::GuestMemory,
                dir: DmaDirection::Bidirectional,
                space: self.census_key(),
                addr: start,
                len,
                holds: backend.census_key(),
            });
            snapshot.held.push((backend.clone(), ticket));
            regions.push(region);
        }
        if !regions.is_empty() {
            snapshot.memory =
                GuestMemoryMmap::from_regions(regions).map_err(|e| GuestMemoryError::Region {
                    start: 0,
                    len: 0,
                    message: e.to_string(),
                })?;
        }
        Ok(snapshot)
    }
}
