//! The ids of the control plane's objects: regions, owners, address spaces.
//!
//! An id is `(index, generation)` into its machine's arena (see
//! `crate::topology::arena`): a stale id fails every lookup cleanly.

use std::fmt;

/// Identity of a region: an index into the topology arena plus a generation,
/// so a stale id (of a destroyed region) is detected instead of aliasing a new
/// region that reused the slot.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl fmt::Debug for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegionId({}v{})", self.index, self.generation)
    }
}

/// Identity of an owner in the topology arena (index + generation).
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl fmt::Debug for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerId({}v{})", self.index, self.generation)
    }
}

/// Identity of an address space in the topology (index + generation).
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpaceId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl fmt::Debug for SpaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpaceId({}v{})", self.index, self.generation)
    }
}
