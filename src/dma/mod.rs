//! DMA: device access to guest memory outside the access path.
//!
//! * [`mapping`]: [`DmaMapping`](crate::DmaMapping), direct mappings of
//!   guest RAM and bounce buffers for everything else, map clients.
//! * [`cache`]: `MemoryRegionCache`, a cached translation of a guest range.
//!
//! The table that pins mapped memory and the backends are host memory
//! (`crate::host`).
//!
//! Invariants: memory a mapping points into is freed only after the mapping
//! is gone; a mapping outliving its device is reported, never dangling.
//!
//! Layering: may use `access`, `view`, `region`, `host`, `lifecycle`
//! (checked by `tests/layering.rs`).

pub mod cache;
pub mod mapping;
