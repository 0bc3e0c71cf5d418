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
//! assert_eq!(handle.view().ranges().len(), 1);
//!
//! use memtree::{Endian, MemTxAttrs};
//! let attrs = MemTxAttrs::UNSPECIFIED;
//! assert!(handle.store::<u32>(0x1000, 0xdead_beef, Endian::Little, attrs).is_ok());
//! assert_eq!(handle.load::<u32>(0x1000, Endian::Little, attrs).0, 0xdead_beef);
//! ```

#![warn(missing_debug_implementations)]

pub mod access;
mod arena;
pub mod backend;
pub mod cache;
pub mod census;
pub mod demo;
pub mod diag;
pub mod dirty;
pub mod dispatch;
pub mod dma;
pub mod error;
pub mod flatview;
#[cfg(all(feature = "vm-memory", unix))]
pub mod guest_memory;
pub mod iommu;
#[cfg(all(feature = "kvm", target_os = "linux"))]
pub mod kvm;
pub mod listener;
pub mod lookup;
pub mod machine_file;
pub mod map_svg;
pub mod mapping_table;
pub mod memory;
pub mod migration;
pub mod owner;
pub mod publish;
pub mod ram;
pub mod region;
mod render;
pub mod scale;
pub mod space;
mod space_index;
pub mod text;
mod topology;
#[cfg(all(feature = "vhost-user", target_os = "linux"))]
pub mod vhost_user;

/// The vm-memory crate memtree's [`guest_memory`] interop is built with
/// (feature `vm-memory`): name its types through this path so that they
/// are the same crate version as memtree's.
#[cfg(all(feature = "vm-memory", unix))]
pub use vm_memory;

pub use access::{
    AccessKind, AccessSizes, Endianness, MemTxAttrs, MemTxResult, MmioOps, UnimplementedDevice,
};
pub use backend::MemoryBackend;
pub use census::{Census, ObjectKey, ObjectKind};
pub use dirty::{DirtyClient, DirtySnapshot, TARGET_PAGE_SIZE};
pub use dispatch::{Endian, Primitive};
pub use dma::{DmaDirection, DmaError, DmaMapping};
pub use error::TopologyError;
pub use flatview::{FlatRange, FlatView, RangeAttrs, RegionType};
pub use listener::{EventNotifier, EventfdSection, ListenerId, MemoryListener, Section};
pub use memory::{LeakReport, Machine, Memory, MemoryRef, Transaction, WeakMemory};
pub use owner::{OwnerId, OwnerLabel};
pub use ram::{RamBacking, RamBlock};
pub use region::{RegionCore, RegionId, RegionInfo, RegionKind};
pub use space::{AddressSpace, SpaceId};
pub use topology::UnplugReport;
