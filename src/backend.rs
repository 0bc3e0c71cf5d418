//! Memory backends: host memory that RAM, ROM and ROM-device regions expose.
//!
//! A [`MemoryBackend`] wraps a [`RamBlock`] and registers it in the machine's
//! census. It is shared by `Arc`: by the regions that map it (one, or several
//! for an ivshmem-like shared backend) and by DMA mappings of its memory. A
//! DMA mapping of RAM holds the backend and nothing else, so a device can be
//! unplugged while another device still reads the memory it mapped.
//!
//! # Invariants
//!
//! * The host mapping is valid from construction until the backend's `Drop`,
//!   which unmaps it exactly once and records the finalization in the census.
//! * A backend holds no reference to any region or owner.

use std::ops::Deref;
use std::sync::Arc;

use crate::census::{Census, ObjectKey, ObjectKind};
use crate::ram::{RamBacking, RamBlock, RamError};

/// Host memory registered in a machine's census.
pub struct MemoryBackend {
    block: RamBlock,
    census: Arc<Census>,
    key: ObjectKey,
}

impl MemoryBackend {
    /// Allocates `size` bytes of zeroed host memory.
    pub fn new(
        census: &Arc<Census>,
        name: &str,
        size: u64,
        backing: RamBacking,
    ) -> Result<MemoryBackend, RamError> {
        let block = RamBlock::new(name, size, backing)?;
        let key = census.register(ObjectKind::Backend, name, None);
        Ok(MemoryBackend {
            block,
            census: census.clone(),
            key,
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
        self.census.finalize(self.key);
    }
}
