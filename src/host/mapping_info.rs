//! What the machine-wide table of mappings records and reports: the
//! direction, identity and kind of a DMA mapping, cache or section
//! (re-exported by `crate::dma::mapping`).

use std::fmt;

use crate::lifecycle::census::ObjectKey;

/// Which way data moves, seen from the device doing DMA.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum DmaDirection {
    /// The device reads guest memory (QEMU `is_write = false`): bounce
    /// buffers are prefilled, nothing is written back.
    ToDevice,
    /// The device writes guest memory (`is_write = true`): bounce buffers
    /// start zeroed and are written back at unmap.
    FromDevice,
    /// Both: prefilled and written back. Direct only where both directions
    /// are direct.
    Bidirectional,
}

impl DmaDirection {
    /// Whether the device reads guest memory through the mapping.
    pub fn reads(self) -> bool {
        matches!(self, DmaDirection::ToDevice | DmaDirection::Bidirectional)
    }

    /// Whether the device writes guest memory through the mapping.
    pub fn writes(self) -> bool {
        matches!(self, DmaDirection::FromDevice | DmaDirection::Bidirectional)
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DmaDirection::ToDevice => "to-device",
            DmaDirection::FromDevice => "from-device",
            DmaDirection::Bidirectional => "bidirectional",
        }
    }
}

/// Diagnostic identity of a recorded mapping, cache or section (unique per
/// machine, never reused): the number of the table shard that recorded it
/// (one per recording thread, see [`crate::host::mapping_table`]) and a sequence
/// number in that shard. Displayed as `shard.seq`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MappingId {
    shard: u32,
    seq: u64,
}

impl MappingId {
    pub(crate) fn new(shard: u32, seq: u64) -> MappingId {
        MappingId { shard, seq }
    }
}

impl fmt::Display for MappingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.shard, self.seq)
    }
}

// ---------------------------------------------------------------------------
// What the machine-wide table of mappings reports (crate::host::mapping_table)
// ---------------------------------------------------------------------------

/// What a recorded entry describes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MappingKind {
    /// A direct DMA mapping of RAM (holds the memory).
    DirectRam,
    /// A bounce-buffered DMA mapping (holds the region, so the device).
    Bounce,
    /// A [`crate::dma::cache::MemoryRegionCache`] of RAM (holds the memory).
    Cache,
    /// A [`crate::dma::cache::SectionRef`] from [`crate::AddressSpace::find`] (holds the
    /// region).
    Section,
    /// A `GuestRamRegion`, one region of the rust-vmm view of an address
    /// space's RAM (`AddressSpace::guest_memory`, feature `vm-memory`;
    /// holds the memory for as long as any clone of the view holds it).
    GuestMemory,
}

impl MappingKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MappingKind::DirectRam => "dma",
            MappingKind::Bounce => "bounce",
            MappingKind::Cache => "cache",
            MappingKind::Section => "section",
            MappingKind::GuestMemory => "vm-memory-region",
        }
    }
}

/// One recorded mapping, cache or section, as
/// [`crate::AddressSpace::outstanding_mappings`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingInfo {
    /// Diagnostic id.
    pub id: MappingId,
    /// What it is.
    pub kind: MappingKind,
    /// Its census key, once the census has registered it.
    pub census_key: Option<ObjectKey>,
    /// Human-readable label, e.g. `dma pci 0x1000+0x200 from-device`.
    pub label: String,
    /// The census key of what it holds (a backend or a region).
    pub holds: ObjectKey,
}
