//! The ids of the control plane's objects: regions, owners, address spaces.
//!
//! An id is `(index, generation)` into its machine's arena (see
//! `crate::topology::arena`), plus the tag of the machine that made it:
//! a stale id fails every lookup cleanly, and an id used with another
//! machine is refused ([`TopologyError::ForeignId`](crate::TopologyError::ForeignId))
//! before it reaches any slot. The tag is one `u32` compared on every
//! lookup; ids stay `Copy`, 12 bytes, `Hash` and `Ord`.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh machine tag (never 0, which `ListenerId`s of no machine carry).
/// Tags repeat only after 2^32 - 1 machines were created in one process.
pub(crate) fn next_machine_tag() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    loop {
        let tag = NEXT.fetch_add(1, Ordering::Relaxed);
        if tag != 0 {
            return tag;
        }
    }
}

/// Identity of a region: an index into the topology arena plus a generation,
/// so a stale id (of a destroyed region) is detected instead of aliasing a new
/// region that reused the slot.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
    /// The tag of the machine whose arena the id indexes.
    pub(crate) machine: u32,
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
    /// The tag of the machine whose arena the id indexes.
    pub(crate) machine: u32,
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
    /// The tag of the machine whose arena the id indexes.
    pub(crate) machine: u32,
}

impl fmt::Debug for SpaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpaceId({}v{})", self.index, self.generation)
    }
}
