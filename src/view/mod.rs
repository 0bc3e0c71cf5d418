//! Data plane: the immutable snapshot an address space publishes.
//!
//! * [`flatview`]: [`FlatView`](crate::FlatView) and
//!   [`FlatRange`](crate::FlatRange), the sorted, non-overlapping ranges of
//!   one address space with their regions' shared cores.
//! * `range_index` (crate-private): the lookup index over a view's ranges.
//! * `dirty_marks` (crate-private): a range's dirty-log mask, set at
//!   render, and the marking every write path calls.
//! * [`publish`]: the publish / read / reclaim protocol as a small cell that
//!   loom model-checks (production publishes through arc-swap).
//!
//! Invariants: a published view is never mutated; it keeps alive exactly
//! the region cores (and through them the memory) it shows; readers take no
//! lock.
//!
//! Layering: may use `region`, `host`, `lifecycle` for the types a view
//! carries. Integrations that cache per-view data (vm-memory) fill an
//! opaque slot of the view; the view never names them (checked by
//! `tests/layering.rs`).

pub(crate) mod dirty_marks;
pub mod flatview;
pub mod publish;
pub(crate) mod range_index;
