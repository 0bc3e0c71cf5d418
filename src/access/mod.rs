//! Data plane: accesses through an address space.
//!
//! * [`attrs`]: transaction attributes and results
//!   ([`MemTxAttrs`](crate::MemTxAttrs), [`MemTxResult`](crate::MemTxResult)),
//!   [`MmioOps`](crate::MmioOps) (a device's callbacks and its access-size
//!   rules), endianness.
//! * [`dispatch`]: reads, writes, typed loads and stores with QEMU's
//!   splitting, endianness, unassigned, ROM and ROM-device rules.
//! * [`space`]: [`AddressSpace`](crate::AddressSpace), the cloneable handle
//!   the data plane holds, and [`SpaceId`](crate::SpaceId).
//! * [`ram`]: host RAM blocks and the race-free guest copies into them.
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
//! Layering: `attrs` and `ram` are leaves (only `dirty`); `dispatch` and
//! `space` use `view`, `dma`, `lifecycle`, `iommu`; back-edges are listed in
//! ARCHITECTURE.md (checked by `tests/layering.rs`).

pub mod attrs;
pub mod dispatch;
pub mod ram;
pub mod space;
