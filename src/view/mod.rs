//! Data plane: the immutable snapshot an address space publishes.
//!
//! * [`flatview`]: [`FlatView`](crate::FlatView) and
//!   [`FlatRange`](crate::FlatRange), the sorted, non-overlapping ranges of
//!   one address space with their regions' shared cores.
//! * `range_index` (crate-private): the lookup index over a view's ranges.
//! * [`publish`]: the publish / read / reclaim protocol as a small cell that
//!   loom model-checks (production publishes through arc-swap).
//!
//! Invariants: a published view is never mutated; it keeps alive exactly
//! the region cores (and through them the memory) it shows; readers take no
//! lock.
//!
//! Layering: may use `access`, `dma`, `lifecycle`, `dirty` for the types a
//! view carries; never `topology` or `render` except the back-edges listed
//! in ARCHITECTURE.md (checked by `tests/layering.rs`).

pub mod flatview;
pub mod publish;
pub(crate) mod range_index;
