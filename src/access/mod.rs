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
//! # Byte order: one type
//!
//! [`Endian`](crate::Endian) (`Little`, `Big`, `Native`) is every byte
//! order: a device's ([`MmioOps::endianness`](crate::MmioOps::endianness)),
//! the target's ([`Memory::with_target_endian`](crate::Memory::with_target_endian))
//! and the one a typed access requests. `Native` is the target's order, as
//! QEMU's `DEVICE_NATIVE_ENDIAN` and its `ld*`/`st*` without suffix: a
//! device's `Native` is resolved when its region is created, an access's by
//! the address space or cursor that runs it
//! ([`Endian::resolve`](crate::Endian::resolve)). Where no target is known
//! (a bare [`FlatView`](crate::FlatView) access) `Native` is the host's order.
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
