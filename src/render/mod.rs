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
//! Layering: may use `dma`, `access`, `view`, `region`, `host`,
//! `lifecycle`; the tree it renders is handed in by `topology` as a
//! `&dyn RegionGraph` (region nodes by id), so it never names `topology`
//! (checked by `tests/layering.rs`).

pub(crate) mod flatten;
pub mod listener;
