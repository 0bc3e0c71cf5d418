//! The data plane's shared objects: what a published view, a mapping or a
//! cache holds, and what the control plane hands down to them.
//!
//! * [`ids`]: [`RegionId`](crate::RegionId), [`OwnerId`](crate::OwnerId),
//!   [`SpaceId`](crate::SpaceId), the generation-checked ids of the
//!   topology's objects.
//! * [`region_core`]: [`RegionCore`](crate::RegionCore) (a region's
//!   immutable identity and backing, the data-plane half),
//!   [`RegionKind`](crate::RegionKind), `Backing`, and `RegionNode`, the
//!   control-plane half the topology stores and rendering reads (through
//!   `RegionGraph`, which the topology implements).
//! * [`owner_core`]: the data-plane half of an owner, `OwnerCore` (its liveness gate and finalizer),
//!   and [`OwnerLabel`](crate::OwnerLabel).
//! * [`attrs`]: the device interface: [`MmioOps`](crate::MmioOps), access
//!   sizes and endianness, [`MemTxAttrs`](crate::MemTxAttrs),
//!   [`MemTxResult`](crate::MemTxResult).
//!
//! Invariants: a `RegionCore` points only downwards (its backing, its
//! owner's core); dropping its last `Arc` is the region's finalization,
//! which releases backing, subregion cores and owner core in that order.
//! An `OwnerCore` holds no region.
//!
//! Layering: may use `host` and `lifecycle` only (checked by
//! `tests/layering.rs`). What an upper layer keeps in a region core is
//! type-erased here: an IOMMU region's device and hub (`IommuBacking`,
//! filled and read by `crate::access::iommu`).

pub mod attrs;
pub mod ids;
pub mod owner_core;
pub mod region_core;
