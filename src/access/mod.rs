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
//! # Byte order: two types, two meanings
//!
//! * [`Endianness`](crate::Endianness) (`Little`, `Big`) is a **fixed** byte
//!   order: a device's declared order ([`MmioOps::endianness`](crate::MmioOps::endianness)),
//!   a target's order ([`Memory::with_target_endian`](crate::Memory::with_target_endian)),
//!   the order a [`FlatView`](crate::FlatView) access is done in (a view does
//!   not know its guest). It has no "native" variant on purpose: QEMU's
//!   `DEVICE_NATIVE_ENDIAN` is resolved to the target's order by whoever
//!   builds the device, so a device's order is always known.
//! * [`Endian`](crate::Endian) (`Little`, `Big`, `Native`) is the order a
//!   guest access **requests** through an address space or cursor, where
//!   `Native` means that space's target order (QEMU's `ld*`/`st*` without
//!   suffix). [`Endian::resolve`](crate::Endian::resolve) turns it into an
//!   `Endianness`; every `Endianness` converts into the `Endian` of the same
//!   order.
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
