//! DMA: device access to guest memory outside the access path.
//!
//! * [`mapping`]: [`DmaMapping`](crate::DmaMapping), direct mappings of
//!   guest RAM and bounce buffers for everything else, map clients.
//! * [`mapping_table`]: the sharded table whose entries pin the memory a
//!   live mapping points into (what unplug and teardown wait for).
//! * [`cache`]: `MemoryRegionCache`, a cached translation of a guest range.
//! * [`backend`]: [`MemoryBackend`](crate::MemoryBackend), the host memory
//!   behind RAM regions.
//!
//! Invariants: memory a mapping points into is freed only after the mapping
//! is gone; a mapping outliving its device is reported, never dangling.
//!
//! Layering: may use `access` (attrs, ram, space), `view`, `lifecycle`,
//! `dirty`; back-edges are listed in ARCHITECTURE.md (checked by
//! `tests/layering.rs`).

pub mod backend;
pub mod cache;
pub mod mapping;
pub mod mapping_table;
