//! Turning the control plane's tree into the data plane's views: rendering,
//! splicing unchanged views, and telling listeners what changed.
//!
//! * `flatten` (crate-private): renders an address space's root into a
//!   [`FlatView`](crate::FlatView) with QEMU's semantics (clipping, alias
//!   arithmetic, priorities, merge rule), incrementally where it can.
//! * [`listener`]: [`MemoryListener`](crate::MemoryListener), the diff of two
//!   views into add/del/nop callbacks in QEMU's order, ioeventfds, coalesced
//!   MMIO and dirty-log start/stop.
//!
//! Invariants: a render reads the tree and produces a complete, immutable
//! view; it never publishes a half-built one. Listener callbacks run other
//! people's code: each is caught and recorded, and the bookkeeping of what a
//! listener has been told stays exact when one panics.
//!
//! Layering: may use `view`, `access`, `dma`, `lifecycle`, `dirty`, `iommu`;
//! the tree it renders is passed in by `topology` (its back-edges to
//! `topology` are listed in ARCHITECTURE.md and checked by
//! `tests/layering.rs`).

pub(crate) mod flatten;
pub mod listener;
