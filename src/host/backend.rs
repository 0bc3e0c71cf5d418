//! Memory backends: host memory that RAM, ROM and ROM-device regions expose.
//!
//! A [`MemoryBackend`] wraps a [`RamBlock`] and registers it in the machine's
//! census. It is shared by `Arc`: by the regions that map it (one, or several
//! for an ivshmem-like shared backend) and by caches of its memory.
//!
//! A direct DMA mapping of a device's RAM does not hold the `Arc`: it pins
//! the memory with its entry in the machine's mapping table
//! ([`crate::host::mapping_table`], "Entries that pin memory"), which costs no
//! locked instruction. So when the last `Arc` goes, a backend that has ever
//! been pinned hands its block to the table, which frees it (and finalizes
//! the backend in the census) once no entry pins it. A device can therefore
//! be unplugged while another device still reads the memory it mapped.
//!
//! # Invariants
//!
//! * The host mapping is valid from construction until no `Arc` and no
//!   pinning table entry is left; it is unmapped exactly once, and the
//!   backend is finalized in the census when it is.
//! * A backend holds no reference to any region or owner; it holds its
//!   machine's mapping table, which holds nothing it describes.
//! * A backend is only mapped by regions of the machine whose table it
//!   holds ([`crate::Machine::new_ram_from_backend`] refuses others), so
//!   every entry that pins it is in the table its drop consults.

use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::host::mapping_table::MappingTable;
use crate::host::ram::{RamBacking, RamBlock, RamError};
use crate::lifecycle::census::{Census, ObjectKey, ObjectKind};

/// Host memory registered in a machine's census.
pub struct MemoryBackend {
    /// Taken out only by `Drop`.
    block: ManuallyDrop<RamBlock>,
    census: Arc<Census>,
    key: ObjectKey,
    /// The machine's mapping table, whose entries may pin this memory.
    table: Arc<MappingTable>,
    /// Set (once) by the first DMA mapping that pins this memory, so that
    /// memory never mapped is freed without the retire handshake.
    pinned: AtomicBool,
}

impl MemoryBackend {
    /// Allocates `size` bytes of zeroed host memory for the machine whose
    /// census and mapping table these are.
    pub(crate) fn new(
        census: &Arc<Census>,
        table: &Arc<MappingTable>,
        name: &str,
        size: u64,
        backing: RamBacking,
    ) -> Result<MemoryBackend, RamError> {
        let block = RamBlock::new(name, size, backing)?;
        let key = census.register(ObjectKind::Backend, name, None);
        Ok(MemoryBackend {
            block: ManuallyDrop::new(block),
            census: census.clone(),
            key,
            table: table.clone(),
            pinned: AtomicBool::new(false),
        })
    }

    /// The backend's census key.
    pub fn census_key(&self) -> ObjectKey {
        self.key
    }

    /// The underlying block.
    pub fn block(&self) -> &RamBlock {
        &self.block
    }

    /// Whether this backend belongs to the machine whose table is `table`.
    pub(crate) fn is_of(&self, table: &Arc<MappingTable>) -> bool {
        Arc::ptr_eq(&self.table, table)
    }

    /// Notes that a table entry is about to pin this memory. Must be called
    /// before the entry is recorded, while a flat view holds the backend.
    #[inline]
    pub(crate) fn mark_pinned(&self) {
        // Read first: after the first mapping this is a shared read, not a
        // write that bounces the cache line between DMA threads.
        if !self.pinned.load(Ordering::Relaxed) {
            self.pinned.store(true, Ordering::Relaxed);
        }
    }
}

impl Deref for MemoryBackend {
    type Target = RamBlock;
    fn deref(&self) -> &RamBlock {
        &self.block
    }
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("name", &self.block.name())
            .field("size", &self.block.size())
            .finish()
    }
}

impl Drop for MemoryBackend {
    fn drop(&mut self) {
        // SAFETY: `drop` runs once and `self.block` is not used after this.
        let block = unsafe { ManuallyDrop::take(&mut self.block) };
        // The mapper's `mark_pinned` happened before it released the view
        // that kept this backend alive, and this drop comes after that
        // release (the `Arc` count's acquire), so a backend ever pinned is
        // seen as such here.
        if self.pinned.load(Ordering::Relaxed) {
            self.table.retire_memory(self.key, block, &self.census);
        } else {
            drop(block);
            self.census.finalize(self.key);
        }
    }
}
