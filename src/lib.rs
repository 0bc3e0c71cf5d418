//! # memtree
//!
//! QEMU's memory API — memory regions, address spaces, flat views, access
//! dispatch, DMA mapping, listeners — rebuilt in Rust, with an object
//! lifecycle that cannot leak or dangle when devices are plugged and
//! unplugged at run time.
//!
//! The crate is split into a **control plane** (the region tree, owners,
//! address spaces and transactions: [`Memory`], [`Machine`]; one writer at a
//! time) and a **data plane** (immutable [`FlatView`] snapshots published into
//! [`AddressSpace`] handles, read by many threads without locks). See
//! ARCHITECTURE.md for the map of the code and its invariants.
//!
//! ```
//! use memtree::Memory;
//!
//! let memory = Memory::new();
//! let system = memory.new_container("system", 1 << 64, None).unwrap();
//! let ram = memory.new_ram("pc.ram", 0x10_0000, None).unwrap();
//! memory.add_subregion(system, 0, ram).unwrap();
//! let space = memory.new_address_space("memory", system, None).unwrap();
//! let handle = memory.address_space(space).unwrap();
//! assert_eq!(handle.view().len(), 1);
//!
//! use memtree::{Endian, MemTxAttrs};
//! let attrs = MemTxAttrs::UNSPECIFIED;
//! assert!(handle.store::<u32>(0x1000, 0xdead_beef, Endian::Little, attrs).is_ok());
//! assert_eq!(handle.load::<u32>(0x1000, Endian::Little, attrs).0, 0xdead_beef);
//! ```

#![warn(missing_debug_implementations)]
#![deny(missing_docs)]

// From the bottom up (ARCHITECTURE.md, "Layering"; `tests/layering.rs`).
// Who holds what, foreign panics, deferred drops.
pub mod lifecycle;
// Host memory: RAM blocks, backends, the mapping table, dirty bitmaps.
pub mod host;
// The data plane's shared objects: ids, region and owner cores, device ops.
pub mod region;
// Data plane: the immutable published views.
pub mod view;
// Data plane: accesses through an address space, IOMMU translation.
pub mod access;
// DMA: mappings and caches.
pub mod dma;
// Rendering the tree into views and telling listeners what changed.
pub mod render;
// Control plane: the region tree and its edits, one writer at a time.
pub mod topology;
// Users of the whole core.
pub mod integrations;
pub mod migration;
#[cfg(feature = "qemu-text")]
pub mod qemu_text;
pub mod scale;
// Explaining and drawing a machine.
pub mod inspect;

/// The vm-memory crate memtree's [`integrations::guest_memory`] interop is built with
/// (feature `vm-memory`): name its types through this path so that they
/// are the same crate version as memtree's.
#[cfg(all(feature = "vm-memory", unix))]
pub use vm_memory;

pub use access::dispatch::Primitive;
pub use access::space::{AddressSpace, CurrentView};
pub use dma::mapping::{DmaDirection, DmaError, DmaMapping};
pub use host::backend::MemoryBackend;
pub use host::dirty_bitmap::{DirtyClient, TARGET_PAGE_SIZE};
pub use host::ram::{RamBacking, RamBlock};
pub use lifecycle::census::{Census, ObjectKey, ObjectKind};
pub use lifecycle::diag::LeakReport;
pub use region::attrs::{
    AccessKind, AccessSizes, Endian, MemTxAttrs, MemTxError, MemTxResult, MmioOps,
    UnimplementedDevice,
};
pub use region::ids::{OwnerId, RegionId, SpaceId};
pub use region::owner_core::OwnerLabel;
pub use region::region_core::{RegionCore, RegionInfo, RegionKind};
pub use render::listener::{EventNotifier, EventfdSection, ListenerId, MemoryListener, Section};
pub use topology::census_ids::CensusId;
pub use topology::dirty_log::DirtySnapshot;
pub use topology::error::TopologyError;
pub use topology::memory::{Machine, Memory, MemoryRef, Transaction, WeakMemory};
pub use topology::tree::UnplugReport;
pub use view::flatview::{FlatRange, FlatView, RangeAttrs, RegionType};
