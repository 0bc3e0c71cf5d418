//! From a topology id to its census entry: [`Machine::census_key`],
//! [`Machine::census_entry`] and [`Machine::why_alive`].
//!
//! The census names objects by [`ObjectKey`]; the topology by
//! [`RegionId`], [`OwnerId`] and [`SpaceId`]. A key is looked up from an id
//! while the id is live (the topology still has the object); the key itself
//! stays valid for as long as the object lives, also after unplug: take the
//! key while the device is plugged to explain later what keeps its memory
//! alive.

use crate::lifecycle::census::{CensusEntry, ObjectKey};
use crate::lifecycle::diag;
use crate::region::ids::OwnerId;
use crate::region::ids::RegionId;
use crate::region::ids::SpaceId;
use crate::topology::error::TopologyError;
use crate::topology::memory::Machine;

mod sealed {
    use super::*;

    /// How each id kind finds its census key; sealed so that only the
    /// topology's ids implement [`CensusId`](super::CensusId).
    pub trait Lookup: Copy {
        /// The object's census key, or the id's `NoSuch*` error when the id
        /// is stale.
        fn census_key_in(self, machine: &Machine) -> Result<ObjectKey, TopologyError>;
        /// The error for this id when it names no live object.
        fn stale(self) -> TopologyError;
    }

    impl Lookup for RegionId {
        fn census_key_in(self, machine: &Machine) -> Result<ObjectKey, TopologyError> {
            machine.read(|t| t.get(self).map(|n| n.core.census_key()))
        }
        fn stale(self) -> TopologyError {
            TopologyError::NoSuchRegion(self)
        }
    }

    impl Lookup for OwnerId {
        fn census_key_in(self, machine: &Machine) -> Result<ObjectKey, TopologyError> {
            machine.read(|t| t.owner(self).map(|n| n.core.census_key()))
        }
        fn stale(self) -> TopologyError {
            TopologyError::NoSuchOwner(self)
        }
    }

    impl Lookup for SpaceId {
        fn census_key_in(self, machine: &Machine) -> Result<ObjectKey, TopologyError> {
            machine.read(|t| t.space(self).map(|n| n.handle.census_key()))
        }
        fn stale(self) -> TopologyError {
            TopologyError::NoSuchSpace(self)
        }
    }
}

/// An id of a topology object that has a census entry: [`RegionId`] (the
/// region's shared core), [`OwnerId`] (the owner object) and [`SpaceId`]
/// (the address space's data-plane handle state). Sealed: implemented by
/// these three only.
pub trait CensusId: sealed::Lookup {}

impl CensusId for RegionId {}
impl CensusId for OwnerId {}
impl CensusId for SpaceId {}

impl Machine {
    /// The census key of a region, owner or address space (see the
    /// [module docs](crate::topology::census_ids)).
    ///
    /// ```
    /// use memtree::Memory;
    ///
    /// let memory = Memory::new();
    /// let nic = memory.new_owner("nic0", None).unwrap();
    /// let ram = memory.new_ram("nic0-buffer", 0x1000, Some(nic)).unwrap();
    /// let key = memory.census_key(ram).unwrap();
    /// assert_eq!(memory.census().entry(key).unwrap().name, "nic0-buffer");
    /// assert_eq!(memory.census_entry(nic).unwrap().name, "nic0");
    /// ```
    pub fn census_key<I: CensusId>(&self, id: I) -> Result<ObjectKey, TopologyError> {
        id.census_key_in(self)
    }

    /// The census entry of a region, owner or address space: its key, kind,
    /// name and what it holds. A stale id is its `NoSuch*` error.
    pub fn census_entry<I: CensusId>(&self, id: I) -> Result<CensusEntry, TopologyError> {
        let key = self.census_key(id)?;
        // Looked up after the topology lock is released (the census may
        // sync lazily registered objects): an object destroyed in between
        // is reported as the stale id it has become.
        self.census().entry(key).ok_or_else(|| id.stale())
    }

    /// The census key of the host memory (the [`MemoryBackend`](crate::MemoryBackend))
    /// behind a RAM, RAM-device or ROM-device region; `None` for other
    /// kinds. The memory can outlive the region: a DMA mapping pins the
    /// memory, not the region.
    pub fn backend_census_key(&self, id: RegionId) -> Result<Option<ObjectKey>, TopologyError> {
        use crate::region::region_core::Backing;
        self.read(|t| {
            t.get(id).map(|n| match n.core.backing() {
                Backing::Ram { block, .. }
                | Backing::RamDevice { block, .. }
                | Backing::RomDevice { block, .. } => Some(block.census_key()),
                _ => None,
            })
        })
    }

    /// What keeps a region, owner or address space alive, in plain words
    /// ([`diag::why_alive`] of its census key).
    pub fn why_alive<I: CensusId>(&self, id: I) -> Result<Vec<String>, TopologyError> {
        Ok(diag::why_alive(self.census(), self.census_key(id)?))
    }
}
