//! rust-vmm interoperability: an address space's RAM as a vm-memory
//! [`GuestMemory`](vm_memory::GuestMemory), for device crates written
//! against vm-memory (virtio-queue, vhost-user back-ends, virtio device
//! crates). Behind the default `vm-memory` feature; memtree re-exports the
//! vm-memory it is built with as [`crate::vm_memory`], so a consumer names
//! the same crate version.
//!
//! * [`AddressSpace::guest_memory`] gives the RAM of the currently published
//!   flat view as an `Arc<`[`GuestRam`]`>`: a vm-memory
//!   [`GuestRegionCollection`] of [`GuestRamRegion`]s, memtree's own region
//!   type.
//! * [`AddressSpace`] implements vm-memory's [`GuestAddressSpace`]: a device
//!   crate that stores an `M: GuestAddressSpace` and calls `memory()` per
//!   request (the way it uses `GuestMemoryAtomic`) always sees the RAM of the
//!   view published at that moment, so a DIMM plugged later is visible and
//!   one unplugged is gone.
//!
//! # What is in the view
//!
//! One region per run of ranges that are writable RAM (reads and writes go
//! straight to host memory), merged across adjacent ranges of the same
//! memory as a DMA mapping is. MMIO, ROM, ROM devices and RAM devices are
//! left out (vm-memory would bypass their access rules); an address in a
//! left-out range is an invalid guest address to vm-memory. Ranges need no
//! particular alignment.
//!
//! **The top byte.** vm-memory and its consumers compute a region's end as
//! `start + len`, which must fit a `u64` (vm-memory's own `GuestRegionMmap`
//! refuses anything else). A run that ends at `2^64 - 1` is therefore
//! clipped by its last byte: the byte at guest address `2^64 - 1` is not
//! accessible through vm-memory (memtree's own accesses reach it), and a
//! one-byte run there is left out.
//!
//! # Dirty tracking
//!
//! A region's vm-memory bitmap (`GuestMemoryRegion::B`) is
//! [`crate::host::dirty_bitmap::RamDirtyBitmap`]: every write vm-memory makes through a
//! `VolatileSlice` or a `Bytes` method marks the pages it touched for the
//! clients tracking that memory at the moment of the write (tracking
//! started or stopped after the collection was handed out included). A
//! consumer that writes through a raw host pointer (`get_host_address`)
//! bypasses vm-memory's bitmap, as with any vm-memory backend, and must
//! mark with `bitmap().mark_dirty` itself.
//!
//! # Lifetime: nothing handed out can dangle
//!
//! A [`GuestRamRegion`] holds the memory it maps (`Arc<MemoryBackend>`), so
//! every vm-memory object that can reach guest memory keeps it mapped: the
//! collection (`GuestRegionCollection` holds its regions by `Arc`, and its
//! `Clone` clones those `Arc`s), each `Arc<GuestRam>`, each region `Arc`, and
//! each `VolatileSlice` (which borrows the region). A device may be unplugged
//! and the machine torn down while a back-end still uses a clone: the memory
//! stays valid until the last clone of the last region naming it is dropped,
//! and is freed then. Only the memory is held, never a region core, device
//! or view.
//!
//! Each region records an entry in the machine's mapping table for as long
//! as it lives, so the census explains the memory it holds: `held by mapping
//! #N "vm-memory-region memory 0x80000000+0x10000 bidirectional"` (kind,
//! address space it was handed out through, guest range), and an unplug
//! report lists it among the outstanding mappings. Regions exist only while
//! someone outside memtree holds them (see below), so such an entry always
//! means a holder outside memtree.
//!
//! # Cost and caching
//!
//! What a view's RAM is (its runs: memory, offset, guest range, memfd) is a
//! function of the view, so it is computed once per published view, on
//! first use, and cached in the view (`FlatView::guest_ram`, dropped with
//! the view; it holds the memory only as the view's ranges already do). The
//! collection handed out is cached *weakly*: while anyone holds it, every
//! [`AddressSpace::guest_memory`] / `memory()` call returns the same one (a
//! view load, a lock and an `Arc` upgrade); once its last holder drops it,
//! its regions and their table entries go, and the next call wraps the
//! cached runs in fresh regions (one allocation per region plus one, and
//! one table entry per region; no system call). Holding the view does not
//! hold the collection, so a collection nobody holds is never reported as a
//! holder.
//!
//! # Invariants
//!
//! * A run's `offset + len` lies within its backend's host memory and
//!   `start + len <= u64::MAX`; the runs of a view are sorted and disjoint
//!   (they come from disjoint flat ranges), so the regions of a collection
//!   are.
//! * A region holds its run (so the backend's `Arc`) and its table entry
//!   from construction to drop; the entry is removed before the `Arc` is
//!   released, so a sweep that frees retired memory never sees the memory
//!   named by a live entry of a dropped region.
//! * No type here has an `unsafe impl Send`/`Sync`: a region is `Send +
//!   Sync` because each of its fields is, whatever clones exist.

use std::fs::File;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use vm_memory::bitmap::BS;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryError, GuestMemoryRegion,
    GuestMemoryRegionBytes, GuestMemoryResult, GuestRegionCollection, GuestUsize,
    MemoryRegionAddress, VolatileSlice,
};

use crate::access::space::AddressSpace;
use crate::dma::mapping::{direct_extent, is_direct, ram_backend};
use crate::host::backend::MemoryBackend;
use crate::host::mapping_info::{DmaDirection, MappingKind};
use crate::host::mapping_table::{Entry, MappingTable, Ticket};
use crate::view::flatview::FlatView;

/// The writable RAM of one flat view, as a vm-memory collection. Cloning it
/// clones `Arc`s of its regions, each of which holds its memory.
pub type GuestRam = GuestRegionCollection<GuestRamRegion>;

/// A run of writable RAM as a view has it: `len` bytes of `backend` from
/// `offset`, at guest address `start`. Built once per view.
struct RamRun {
    backend: Arc<MemoryBackend>,
    /// Offset of the run's first byte inside the backend.
    offset: u64,
    start: GuestAddress,
    /// Non-zero; `offset + len <= backend.size()`, `start + len <= u64::MAX`.
    len: u64,
    /// A second descriptor of the backend's memfd (memfd-backed RAM only),
    /// so that consumers can share the memory with another process.
    file_offset: Option<FileOffset>,
}

/// What a flat view caches for vm-memory (`FlatView::guest_ram`).
pub(crate) struct GuestRamCache {
    /// The view's runs, built on first use.
    runs: Vec<Arc<RamRun>>,
    /// The collection last handed out, while anyone holds it.
    handed_out: Mutex<Weak<GuestRam>>,
}

/// One vm-memory region: a run of a view's RAM. Holds the memory (see the
/// [module docs](self)) and the mapping-table entry that says so.
pub struct GuestRamRegion {
    run: Arc<RamRun>,
    table: Arc<MappingTable>,
    /// This region's entry in `table`, removed by `Drop`.
    ticket: Ticket,
    /// Marks what vm-memory writes (`crate::host::dirty_bitmap`).
    dirty: crate::host::dirty_bitmap::RamDirtyBitmap,
}

impl GuestRamRegion {
    /// The memory this region maps (and holds).
    pub fn backend(&self) -> &Arc<MemoryBackend> {
        &self.run.backend
    }

    /// Offset of the region's first byte inside [`Self::backend`].
    pub fn backend_offset(&self) -> u64 {
        self.run.offset
    }

    /// `len` bytes from `offset` inside the region, if they are in it.
    fn check(&self, offset: MemoryRegionAddress, len: usize) -> GuestMemoryResult<()> {
        match offset.raw_value().checked_add(len as u64) {
            Some(end) if end <= self.run.len => Ok(()),
            _ => Err(GuestMemoryError::InvalidBackendAddress),
        }
    }

    /// Host address of `offset` inside the region; `offset <= len`.
    fn host(&self, offset: MemoryRegionAddress) -> *mut u8 {
        // In bounds of the backend's mapping (module invariants), so the
        // cast and the offset do not wrap.
        self.run
            .backend
            .host_addr()
            .wrapping_add((self.run.offset + offset.raw_value()) as usize)
    }
}

impl Drop for GuestRamRegion {
    fn drop(&mut self) {
        // The entry first, then (with the fields) the memory it names.
        self.table.remove(self.ticket);
    }
}

impl std::fmt::Debug for GuestRamRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRamRegion")
            .field("start", &format_args!("{:#x}", self.run.start.0))
            .field("len", &format_args!("{:#x}", self.run.len))
            .field("backend", &self.run.backend.name())
            .field("offset", &format_args!("{:#x}", self.run.offset))
            .finish()
    }
}

impl GuestMemoryRegion for GuestRamRegion {
    type B = crate::host::dirty_bitmap::RamDirtyBitmap;

    fn len(&self) -> GuestUsize {
        self.run.len
    }

    fn start_addr(&self) -> GuestAddress {
        self.run.start
    }

    fn bitmap(&self) -> BS<'_, Self::B> {
        self.dirty.slice()
    }

    fn get_host_address(&self, addr: MemoryRegionAddress) -> GuestMemoryResult<*mut u8> {
        if addr.raw_value() >= self.run.len {
            return Err(GuestMemoryError::InvalidBackendAddress);
        }
        Ok(self.host(addr))
    }

    fn file_offset(&self) -> Option<&FileOffset> {
        self.run.file_offset.as_ref()
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> GuestMemoryResult<VolatileSlice<'_, BS<'_, Self::B>>> {
        self.check(offset, count)?;
        // SAFETY: `offset..offset + count` lies in the region (checked
        // above), so in the backend's host mapping (module invariants).
        // That mapping stays valid while `self.run.backend` is held, and the
        // slice borrows `self`, which holds it for the slice's whole life,
        // whichever clone of the collection or `Arc` the region was reached
        // through. memtree never creates Rust references into guest memory:
        // its own accesses, like the slice's, are raw-pointer copies (the
        // concurrency rules of those copies are `crate::host::ram`'s).
        // The bitmap slice marks the pages vm-memory writes through it.
        Ok(unsafe {
            VolatileSlice::with_bitmap(
                self.host(offset),
                count,
                vm_memory::bitmap::Bitmap::slice_at(&self.dirty, offset.raw_value() as usize),
                None,
            )
        })
    }
}

impl GuestMemoryRegionBytes for GuestRamRegion {}

impl AddressSpace {
    /// The RAM of the currently published view as a vm-memory collection
    /// (see [`crate::integrations::guest_memory`]). While any holder of the collection
    /// returned for this view is left, the same collection is returned;
    /// every `Arc` and every clone of it keeps the memory it maps alive.
    pub fn guest_memory(&self) -> Arc<GuestRam> {
        let view = self.view_guard();
        let slot = view.guest_ram.get_or_init(|| {
            Box::new(GuestRamCache {
                runs: ram_runs(&view),
                handed_out: Mutex::new(Weak::new()),
            })
        });
        // Only this function fills the slot, always with a `GuestRamCache`;
        // were it ever something else, an uncached collection is still right.
        let Some(cache) = slot.downcast_ref::<GuestRamCache>() else {
            return Arc::new(self.regions_of(&ram_runs(&view)));
        };
        let mut handed_out = cache.handed_out.lock();
        if let Some(ram) = handed_out.upgrade() {
            return ram;
        }
        let ram = Arc::new(self.regions_of(&cache.runs));
        *handed_out = Arc::downgrade(&ram);
        ram
    }

    /// A collection of fresh regions over `runs`, each with its table entry.
    fn regions_of(&self, runs: &[Arc<RamRun>]) -> GuestRam {
        if runs.is_empty() {
            return GuestRam::new();
        }
        let table = &self.shared.machine.dma;
        let regions = runs
            .iter()
            .map(|run| {
                Arc::new(GuestRamRegion {
                    ticket: table.insert(&Entry {
                        kind: MappingKind::GuestMemory,
                        dir: DmaDirection::Bidirectional,
                        space: self.census_key(),
                        addr: run.start.0,
                        len: run.len,
                        holds: run.backend.census_key(),
                    }),
                    table: table.clone(),
                    dirty: crate::host::dirty_bitmap::RamDirtyBitmap::new(
                        run.backend.block().dirty_log().clone(),
                        run.offset,
                    ),
                    run: run.clone(),
                })
            })
            .collect();
        // Sorted and disjoint by construction (flat ranges are), so
        // vm-memory's checks pass; an empty collection (every address
        // invalid) rather than a partial one if they ever did not.
        GuestRam::from_arc_regions(regions).unwrap_or_default()
    }
}

/// The runs of writable RAM of `view`, sorted and disjoint.
fn ram_runs(view: &FlatView) -> Vec<Arc<RamRun>> {
    let ranges: Vec<&crate::view::flatview::FlatRange> = view.iter().collect();
    let mut runs = Vec::new();
    let mut i = 0;
    while i < ranges.len() {
        let range = ranges[i];
        if !is_direct(range, DmaDirection::Bidirectional) {
            i += 1;
            continue;
        }
        // The run: this range extended across the following ranges of the
        // same memory, as a DMA mapping is.
        let start = range.start();
        let extent = direct_extent(view, range, start, u64::MAX, DmaDirection::Bidirectional);
        let last = start.saturating_add(extent - 1);
        while i < ranges.len() && ranges[i].last() <= last {
            i += 1;
        }
        // vm-memory needs `start + len` to fit (module docs, "The top
        // byte").
        let len = extent.min(u64::MAX - start);
        if len == 0 {
            continue;
        }
        let Some(backend) = ram_backend(range.region()) else {
            continue;
        };
        let base = backend.host_addr().addr();
        let Some(offset) = range.host_at(start).addr().checked_sub(base) else {
            continue;
        };
        let offset = offset as u64;
        // A flat range never extends past its backend, so this holds;
        // checked because the regions' safety rests on it.
        if offset
            .checked_add(len)
            .is_none_or(|end| end > backend.size())
        {
            continue;
        }
        runs.push(Arc::new(RamRun {
            file_offset: backend
                .fd()
                .and_then(|fd| fd.try_clone_to_owned().ok())
                .map(|fd| FileOffset::new(File::from(fd), offset)),
            backend: backend.clone(),
            offset,
            start: GuestAddress(start),
            len,
        }));
    }
    runs
}

/// vm-memory's view of an address space that changes at run time: each
/// `memory()` is the RAM of the view published at that moment (see
/// [`AddressSpace::guest_memory`]), as `GuestMemoryAtomic::memory()` is
/// for a `GuestMemoryAtomic` its VMM updates.
impl GuestAddressSpace for AddressSpace {
    type M = GuestRam;
    type T = Arc<GuestRam>;

    fn memory(&self) -> Arc<GuestRam> {
        self.guest_memory()
    }
}
