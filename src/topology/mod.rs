//! Control plane: the region tree, owners, address spaces as the writer sees
//! them, and the edits and transactions that change them.
//!
//! * [`memory`]: [`Memory`](crate::Memory) / [`Machine`](crate::Machine),
//!   the one-writer handle, transactions, commit, teardown and its leak report.
//! * `tree` (crate-private): the topology itself (region, owner and space
//!   arenas) and every edit's bookkeeping, unplug.
//! * `owner` (crate-private): `OwnerNode`, the control-plane half of an
//!   owner (the data-plane halves of regions and owners are `crate::region`).
//! * [`dirty_log`]: dirty-log control (`Machine::set_log`, global start and
//!   stop, snapshots, `take_dirty_ram`).
//! * `arena`: generation-checked slot arenas behind the ids.
//! * [`error`]: the error of every edit, [`TopologyError`](crate::TopologyError).
//! * [`census_ids`]: from a region, owner or space id to its census entry.
//!
//! # Sizes
//!
//! A region's size is a `u128` everywhere the API states one (every
//! `Machine::new_*` region constructor, [`Machine::set_size`](crate::Machine::set_size),
//! [`RegionInfo::size`](crate::RegionInfo::size)), like QEMU's `Int128`:
//! a region may span the whole 64-bit address space, 2^64 bytes, which no
//! `u64` holds; more than 2^64 is [`TopologyError::SizeTooLarge`](crate::TopologyError::SizeTooLarge).
//! Host memory is smaller: a RAM, ROM, RAM-device or ROM-device region of
//! 2^64 bytes is refused with [`TopologyError::Allocation`](crate::TopologyError::Allocation),
//! and the sizes of host memory itself (a [`MemoryBackend`](crate::MemoryBackend),
//! offsets into it) and of guest accesses are `u64`.
//!
//! Invariants: one writer at a time (the `Memory` lock); an edit either
//! completes or leaves the tree as it was; ids are generation-checked, so a
//! stale id is an error, never another object. Nothing here is read by the
//! data plane directly: it reads the views [`crate::render`] publishes.
//!
//! Layering: the top of the core. It may use every other core folder
//! (`render`, `dma`, `access`, `view`, `region`, `host`, `lifecycle`); only
//! `inspect`, `qemu_text`, `integrations`, `migration` and `scale` build on
//! it (checked by `tests/layering.rs`).

pub(crate) mod arena;
pub mod census_ids;
pub mod dirty_log;
pub mod error;
pub mod memory;
pub(crate) mod owner;
pub(crate) mod space_index;
pub(crate) mod tree;
