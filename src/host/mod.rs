//! Host memory: what guest RAM is made of on the host, and what pins it.
//!
//! * [`ram`]: host RAM, [`RamBlock`](crate::RamBlock) (anonymous or memfd mappings)
//!   and the four race-free guest-memory functions every access uses.
//! * [`backend`]: [`MemoryBackend`](crate::MemoryBackend), the host memory
//!   behind RAM regions, parked in the mapping table while a mapping names
//!   it.
//! * [`mapping_table`]: the sharded table whose entries pin the memory a
//!   live mapping, cache or section points into; [`mapping_info`]: what it
//!   records and reports ([`DmaDirection`](crate::DmaDirection),
//!   `MappingKind`, `MappingInfo`).
//! * [`dirty_bitmap`]: dirty-log clients ([`DirtyClient`](crate::DirtyClient))
//!   and the per-block bitmaps writes mark.
//!
//! Invariants: guest memory is touched only through `ram`'s functions (byte
//! atomics, never a Rust reference into guest memory); host memory is freed
//! only when no table entry names it.
//!
//! Layering: may use `lifecycle` only (checked by `tests/layering.rs`).

pub mod backend;
pub mod dirty_bitmap;
pub mod mapping_info;
pub mod mapping_table;
pub mod ram;
