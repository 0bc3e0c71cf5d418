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
