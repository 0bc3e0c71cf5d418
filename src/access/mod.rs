//! Data plane: accesses through an address space.
//!
//! * [`dispatch`]: reads, writes, typed loads and stores with QEMU's
//!   splitting, endianness, unassigned, ROM and ROM-device rules.
//! * [`space`]: [`AddressSpace`](crate::AddressSpace), the cloneable handle
//!   the data plane holds, and the machine's immutable data.
//! * [`iommu`]: IOMMU regions, translation, IOTLB notifiers.
//! * [`bounce`]: bounce-buffer accounting and map clients of an address
//!   space (what DMA mappings reserve and wait for).
//!
//! Invariants: an access runs against one published view from start to end
//! and takes no lock; device callbacks may re-enter the control plane.
//!
//! Layering: may use `view`, `region`, `host`, `lifecycle` (checked by
//! `tests/layering.rs`).

pub mod bounce;
pub mod dispatch;
pub mod iommu;
pub mod space;
