//! DMA: mapping guest ranges for direct access, bounce buffers, map clients
//! (QEMU's `address_space_map` / `address_space_unmap`,
//! qemu-memory-semantics.md §5.1–§5.3, master semantics).
//!
//! [`AddressSpace::map`] returns a [`DmaMapping`], an RAII guard over a guest
//! range:
//!
//! * **Direct RAM.** If the range at `addr` is RAM that can be accessed
//!   directly in the mapping's direction (reads: RAM and ROM devices in romd
//!   mode; writes: RAM whose region is not itself readonly), the guard gives
//!   bounds-checked copies into and out of host memory. The mapping extends
//!   across following flat ranges as long as they are served by the same
//!   region, contiguously; its length may therefore be shorter than asked for
//!   (as QEMU's `*plen`).
//! * **Bounce buffer.** Anything else (MMIO, ROM devices in MMIO mode, RAM
//!   devices, ROM mapped for writing) is copied through a buffer reserved
//!   against the address space's bounce limit
//!   ([`DEFAULT_MAX_BOUNCE`] bytes by default,
//!   [`AddressSpace::set_max_bounce_buffer_size`]). A mapping for reading is
//!   prefilled through the view it was mapped from (with the caller's
//!   attributes); a mapping for writing is written back through the address
//!   space's current view when it is unmapped (with unspecified attributes,
//!   as QEMU does). When the limit is reached, `map` fails with
//!   [`DmaError::NoBounceSpace`]; [`AddressSpace::register_map_client`]
//!   registers a one-shot callback run when bounce space frees (§5.3).
//!
//! # What a mapping keeps alive
//!
//! Exactly what it needs, and nothing else:
//!
//! * Direct RAM of a region with an owner: the memory
//!   ([`Arc<MemoryBackend>`](MemoryBackend)) — not the region, not the
//!   device. The device can be unplugged while the mapping is out; its regions
//!   and the device itself are finalized at unplug (once no view holds them)
//!   and the memory stays valid until the mapping is dropped.
//! * Direct RAM of an ownerless region: nothing. Ownerless memory is
//!   machine-lifetime memory, freed only when the last handle to the machine's
//!   data goes; the mapping borrows the [`AddressSpace`] handle (lifetime
//!   `'a`), which is such a handle. Mapping and unmapping it costs no
//!   reference-count traffic and no bookkeeping at all.
//! * Bounce buffer: the region's core ([`RegionCore`]), and with it the
//!   device's state (its ops) and owner, until the mapping is dropped.
//!
//! # Diagnostics
//!
//! Mappings that hold something (owned RAM, bounce buffers), caches
//! ([`crate::cache::MemoryRegionCache`]) and sections
//! ([`crate::cache::SectionRef`]) are recorded in a machine-wide table,
//! cheaply (one uncontended lock, no allocation on the direct path). The
//! census registers them as [`ObjectKind::Mapping`] objects lazily, the first
//! time anybody asks the census anything, so `census.explain(backend)` says
//! `held by mapping #12 "dma pci 0x1000+0x200 from-device" -> backend ...`.
//! [`crate::Machine::unplug`] lists in its report every recorded mapping
//! that still holds one of the unplugged device's regions or memory.
//!
//! # Unmapping
//!
//! [`DmaMapping::unmap`] consumes the guard, so a mapping cannot be unmapped
//! twice:
//!
//! ```compile_fail,E0382
//! # use memtree::{Memory, MemTxAttrs, dma::DmaDirection};
//! # let memory = Memory::new();
//! # let root = memory.new_container("root", 1 << 32, None).unwrap();
//! # let ram = memory.new_ram("ram", 0x1000, None).unwrap();
//! # memory.add_subregion(root, 0, ram).unwrap();
//! # let id = memory.new_address_space("as", root, None).unwrap();
//! # let space = memory.address_space(id).unwrap();
//! let m = space.map(0, 16, DmaDirection::FromDevice, MemTxAttrs::UNSPECIFIED).unwrap();
//! m.unmap(16);
//! m.unmap(16); // error[E0382]: use of moved value: `m`
//! ```
//!
//! Dropping a guard is `unmap(len())`: a bounce buffer mapped for writing is
//! written back in full. Mapping ids ([`MappingId`]) are for diagnostics
//! only; there is no unmap-by-id.
//!
//! Dirty-memory tracking is not modelled, so unmapping RAM marks nothing
//! dirty (QEMU's `invalidate_and_set_dirty`).

use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::fmt;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::access::{MemTxAttrs, MemTxResult};
use crate::backend::MemoryBackend;
use crate::census::{Census, CensusSource, ObjectKey, ObjectKind};
use crate::dispatch::SpaceCursor;
use crate::flatview::{FlatRange, FlatView};
use crate::region::{Backing, RegionCore};
use crate::space::AddressSpace;

/// QEMU's default per-address-space bounce-buffer limit.
pub const DEFAULT_MAX_BOUNCE: u64 = 4096;

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

    fn as_str(self) -> &'static str {
        match self {
            DmaDirection::ToDevice => "to-device",
            DmaDirection::FromDevice => "from-device",
            DmaDirection::Bidirectional => "bidirectional",
        }
    }
}

/// Why a mapping, cache or access was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// A mapping of zero bytes was requested.
    #[error("cannot map zero bytes")]
    ZeroLength,
    /// `addr + len` is past the end of the 64-bit address space.
    #[error("range {addr:#x}+{len:#x} runs past the end of the address space")]
    OutOfRange {
        /// Requested start.
        addr: u64,
        /// Requested length.
        len: u64,
    },
    /// Nothing is mapped at `addr` in the address space.
    #[error("nothing is mapped at {addr:#x} in address space \"{space}\"")]
    Unassigned {
        /// The address space.
        space: String,
        /// The address.
        addr: u64,
    },
    /// The address space's bounce buffers are exhausted; register a map
    /// client to be told when space frees.
    #[error("bounce buffers of address space \"{space}\" are exhausted ({in_use:#x} of {limit:#x} bytes in use)")]
    NoBounceSpace {
        /// The address space.
        space: String,
        /// Bytes reserved by outstanding mappings.
        in_use: u64,
        /// The limit.
        limit: u64,
    },
    /// An access outside the mapping or cache.
    #[error(
        "access of {len:#x} bytes at offset {offset:#x} is outside the mapping of {size:#x} bytes"
    )]
    OutOfBounds {
        /// Offset of the access inside the mapping.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Length of the mapping.
        size: u64,
    },
    /// A write through a mapping made for [`DmaDirection::ToDevice`], or a
    /// read through a cache made for writing only.
    #[error("the mapping was made for {0:?}")]
    WrongDirection(DmaDirection),
    /// A cached access that goes through device callbacks failed.
    #[error("transaction failed: {0:?}")]
    Transaction(MemTxResult),
}

/// Diagnostic identity of a recorded mapping, cache or section (unique per
/// machine, never reused).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MappingId(pub u64);

/// Identity of a registered map client.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct MapClientId(u64);

type MapClient = Box<dyn FnOnce() + Send>;

// ---------------------------------------------------------------------------
// Bounce accounting and map clients (one per address space)
// ---------------------------------------------------------------------------

/// Bounce-buffer accounting and map clients of one address space.
pub(crate) struct BounceState {
    pub(crate) in_use: AtomicU64,
    pub(crate) limit: AtomicU64,
    clients: Mutex<Vec<(MapClientId, MapClient)>>,
    next_client: AtomicU64,
}

impl fmt::Debug for BounceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BounceState")
            .field("in_use", &self.in_use())
            .field("limit", &self.limit.load(Ordering::Relaxed))
            .field("clients", &self.clients.lock().len())
            .finish()
    }
}

impl BounceState {
    pub(crate) fn new(limit: u64) -> BounceState {
        BounceState {
            in_use: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
            clients: Mutex::new(Vec::new()),
            next_client: AtomicU64::new(1),
        }
    }

    /// Bytes currently reserved.
    pub(crate) fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Acquire)
    }

    /// Reserves up to `want` bytes; returns how many (0 = none free).
    fn reserve(&self, want: u64) -> u64 {
        let mut cur = self.in_use.load(Ordering::Acquire);
        loop {
            let limit = self.limit.load(Ordering::Acquire);
            let alloc = limit.saturating_sub(cur).min(want);
            if alloc == 0 {
                return 0;
            }
            match self.in_use.compare_exchange_weak(
                cur,
                cur + alloc,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return alloc,
                Err(now) => cur = now,
            }
        }
    }

    fn has_room(&self) -> bool {
        self.in_use() < self.limit.load(Ordering::Acquire)
    }

    /// Releases `n` bytes and tells every waiting client.
    fn release(&self, n: u64) {
        self.in_use.fetch_sub(n, Ordering::AcqRel);
        self.notify();
    }

    /// Runs (and removes) every registered client, outside the lock.
    fn notify(&self) {
        let fired = std::mem::take(&mut *self.clients.lock());
        for (_, f) in fired {
            f();
        }
    }
}

// ---------------------------------------------------------------------------
// The machine-wide table of recorded mappings
// ---------------------------------------------------------------------------

/// What a record describes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MappingKind {
    /// A direct DMA mapping of RAM (holds the memory).
    DirectRam,
    /// A bounce-buffered DMA mapping (holds the region, so the device).
    Bounce,
    /// A [`crate::cache::MemoryRegionCache`] of RAM (holds the memory).
    Cache,
    /// A [`crate::cache::SectionRef`] from [`AddressSpace::find`] (holds the
    /// region).
    Section,
}

impl MappingKind {
    fn as_str(self) -> &'static str {
        match self {
            MappingKind::DirectRam => "dma",
            MappingKind::Bounce => "bounce",
            MappingKind::Cache => "cache",
            MappingKind::Section => "section",
        }
    }
}

/// One recorded mapping, cache or section, as
/// [`AddressSpace::outstanding_mappings`] reports it.
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

#[derive(Clone, Debug)]
pub(crate) struct Record {
    id: u64,
    kind: MappingKind,
    /// Census key of the address-space handle it was made through (its name
    /// is looked up when the label is needed, so recording allocates
    /// nothing).
    space: ObjectKey,
    addr: u64,
    len: u64,
    dir: DmaDirection,
    holds: ObjectKey,
    census: Option<ObjectKey>,
}

struct Slot {
    generation: u32,
    record: Option<Record>,
}

#[derive(Default)]
struct Slots {
    slots: Vec<Slot>,
    free: Vec<u32>,
    next_id: u64,
}

/// A ticket for a recorded entry: slot + generation.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ticket {
    slot: u32,
    generation: u32,
    id: u64,
}

impl Ticket {
    pub(crate) fn id(self) -> MappingId {
        MappingId(self.id)
    }
}

/// A minimal lock for the table of recorded mappings: one atomic swap to
/// take it and a plain release store to give it back (a `Mutex` release is a
/// second locked instruction, which the map/unmap fast path pays twice).
/// Critical sections are a few instructions long on the fast path; a waiter
/// spins briefly, then yields its time slice, so a preempted holder cannot
/// make it burn a core.
struct TableLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through a `TableGuard`, and at most one
// guard exists at a time (the `locked` flag); `T: Send` moves between threads
// with it.
unsafe impl<T: Send> Sync for TableLock<T> {}
// SAFETY: owning the lock owns the value.
unsafe impl<T: Send> Send for TableLock<T> {}

impl<T: Default> Default for TableLock<T> {
    fn default() -> Self {
        TableLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(T::default()),
        }
    }
}

impl<T> TableLock<T> {
    #[inline]
    fn lock(&self) -> TableGuard<'_, T> {
        if self.locked.swap(true, Ordering::Acquire) {
            self.lock_contended();
        }
        TableGuard { lock: self }
    }

    #[cold]
    fn lock_contended(&self) {
        let mut spins = 0u32;
        loop {
            while self.locked.load(Ordering::Relaxed) {
                if spins < 64 {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            if !self.locked.swap(true, Ordering::Acquire) {
                return;
            }
        }
    }
}

struct TableGuard<'a, T> {
    lock: &'a TableLock<T>,
}

impl<T> std::ops::Deref for TableGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: this guard is the only one (the lock is held), so no
        // `&mut T` exists while the returned reference lives.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> std::ops::DerefMut for TableGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for TableGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// The table of recorded mappings of one machine. It holds no reference to
/// anything it describes (only census keys), so it cannot keep anything
/// alive; the census holds it (as its [`CensusSource`]) and it holds nothing.
#[derive(Default)]
pub(crate) struct DmaRegistry {
    inner: TableLock<Slots>,
}

impl fmt::Debug for DmaRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaRegistry")
            .field("outstanding", &self.len())
            .finish()
    }
}

impl DmaRegistry {
    pub(crate) fn new() -> DmaRegistry {
        DmaRegistry::default()
    }

    /// Records an entry (no allocation unless the table grows).
    pub(crate) fn insert(
        &self,
        kind: MappingKind,
        space: ObjectKey,
        addr: u64,
        len: u64,
        dir: DmaDirection,
        holds: ObjectKey,
    ) -> Ticket {
        let mut s = self.inner.lock();
        s.next_id += 1;
        let id = s.next_id;
        let record = Record {
            id,
            kind,
            space,
            addr,
            len,
            dir,
            holds,
            census: None,
        };
        let slot = match s.free.pop() {
            Some(i) => i,
            None => {
                s.slots.push(Slot {
                    generation: 0,
                    record: None,
                });
                (s.slots.len() - 1) as u32
            }
        };
        let e = &mut s.slots[slot as usize];
        e.generation = e.generation.wrapping_add(1);
        e.record = Some(record);
        Ticket {
            slot,
            generation: e.generation,
            id,
        }
    }

    /// Removes an entry and finalizes its census object if it had one.
    pub(crate) fn remove(&self, ticket: Ticket, census: &Census) {
        let key = {
            let mut s = self.inner.lock();
            let Some(e) = s.slots.get_mut(ticket.slot as usize) else {
                return;
            };
            if e.generation != ticket.generation {
                return;
            }
            let Some(r) = e.record.take() else { return };
            s.free.push(ticket.slot);
            r.census
        };
        if let Some(k) = key {
            census.finalize(k);
        }
    }

    /// Number of outstanding entries.
    pub(crate) fn len(&self) -> usize {
        self.inner
            .lock()
            .slots
            .iter()
            .filter(|s| s.record.is_some())
            .count()
    }

    fn label(r: &Record, names: &HashMap<ObjectKey, String>) -> String {
        let space = names.get(&r.space).map_or("?", String::as_str);
        format!(
            "{} {} {:#x}+{:#x} {}",
            r.kind.as_str(),
            space,
            r.addr,
            r.len,
            r.dir.as_str()
        )
    }

    fn space_names(census: &Census, records: &[Record]) -> HashMap<ObjectKey, String> {
        let mut names = HashMap::new();
        for r in records {
            if let std::collections::hash_map::Entry::Vacant(v) = names.entry(r.space) {
                if let Some(n) = census.name_of(r.space) {
                    v.insert(n);
                }
            }
        }
        names
    }

    /// Registers every unregistered entry in the census (lock order: this
    /// table, then the census; the census never calls out while locked).
    pub(crate) fn sync(&self, census: &Census) {
        let mut s = self.inner.lock();
        let pending: Vec<Record> = s
            .slots
            .iter()
            .filter_map(|e| e.record.as_ref())
            .filter(|r| r.census.is_none())
            .cloned()
            .collect();
        if pending.is_empty() {
            return;
        }
        let names = Self::space_names(census, &pending);
        for e in s.slots.iter_mut() {
            if let Some(r) = e.record.as_mut() {
                if r.census.is_none() {
                    let label = Self::label(r, &names);
                    r.census = Some(census.register(ObjectKind::Mapping, &label, Some(r.holds)));
                }
            }
        }
    }

    /// Registers one entry in the census (if not yet) and returns its key.
    pub(crate) fn census_key(&self, ticket: Ticket, census: &Census) -> Option<ObjectKey> {
        self.sync(census);
        let s = self.inner.lock();
        let e = s.slots.get(ticket.slot as usize)?;
        if e.generation != ticket.generation {
            return None;
        }
        e.record.as_ref().and_then(|r| r.census)
    }

    /// Every outstanding entry, registered in the census first.
    pub(crate) fn list(&self, census: &Census) -> Vec<MappingInfo> {
        self.sync(census);
        let records: Vec<Record> = self
            .inner
            .lock()
            .slots
            .iter()
            .filter_map(|e| e.record.clone())
            .collect();
        let names = Self::space_names(census, &records);
        let mut out: Vec<MappingInfo> = records
            .iter()
            .map(|r| MappingInfo {
                id: MappingId(r.id),
                kind: r.kind,
                census_key: r.census,
                label: Self::label(r, &names),
                holds: r.holds,
            })
            .collect();
        out.sort_by_key(|m| m.id);
        out
    }

    /// One line per outstanding entry holding one of `keys` (census key ->
    /// what it is, e.g. `region "e1000-mmio"`).
    pub(crate) fn pinning(
        &self,
        census: &Census,
        keys: &HashMap<ObjectKey, String>,
    ) -> Vec<String> {
        self.list(census)
            .into_iter()
            .filter_map(|m| {
                let what = keys.get(&m.holds)?;
                let key = m.census_key.map_or_else(String::new, |k| format!(" {k}"));
                let consequence = match m.kind {
                    MappingKind::DirectRam | MappingKind::Cache => {
                        "the memory stays valid until it is released"
                    }
                    MappingKind::Bounce | MappingKind::Section => {
                        "the region and its device stay alive until it is released"
                    }
                };
                Some(format!(
                    "mapping{key} \"{}\" holds {what}: {consequence}",
                    m.label
                ))
            })
            .collect()
    }
}

impl CensusSource for DmaRegistry {
    fn sync(&self, census: &Census) {
        DmaRegistry::sync(self, census);
    }
}

// ---------------------------------------------------------------------------
// Helpers shared with the cache
// ---------------------------------------------------------------------------

/// The memory behind a directly accessible range.
pub(crate) fn ram_backend(core: &RegionCore) -> Option<&Arc<MemoryBackend>> {
    match core.backing() {
        Backing::Ram { block, .. }
        | Backing::RamDevice { block, .. }
        | Backing::RomDevice { block, .. } => Some(block),
        _ => None,
    }
}

/// Whether the range can be accessed directly in direction `dir`.
pub(crate) fn is_direct(r: &FlatRange, dir: DmaDirection) -> bool {
    (!dir.reads() || r.is_direct_read()) && (!dir.writes() || r.is_direct_write())
}

/// Bytes from `addr` (inside `r`) to the end of `r`, capped at `want`.
pub(crate) fn avail_in(r: &FlatRange, addr: u64, want: u64) -> u64 {
    let rest = u128::from(r.last() - addr) + 1;
    u64::try_from(rest).unwrap_or(u64::MAX).min(want)
}

/// Length of the direct window at `addr` in `view` (range index `i`),
/// extended across following ranges served contiguously by the same region
/// and direct in `dir`, capped at `want`.
#[inline]
pub(crate) fn direct_extent(
    view: &FlatView,
    i: usize,
    addr: u64,
    want: u64,
    dir: DmaDirection,
) -> u64 {
    let ranges = view.ranges();
    let first = &ranges[i];
    let mut got = avail_in(first, addr, want);
    let mut cur = first;
    let mut j = i + 1;
    while got < want {
        let Some(next) = ranges.get(j) else { break };
        let contiguous = cur.last().checked_add(1) == Some(next.start())
            && Arc::ptr_eq(cur.region(), next.region())
            && u128::from(cur.offset_in_region()) + cur.len()
                == u128::from(next.offset_in_region())
            && is_direct(next, dir);
        if !contiguous {
            break;
        }
        got += avail_in(next, next.start(), want - got);
        cur = next;
        j += 1;
    }
    got
}

pub(crate) fn check_range(addr: u64, len: u64) -> Result<(), DmaError> {
    if len == 0 {
        return Err(DmaError::ZeroLength);
    }
    if addr.checked_add(len - 1).is_none() {
        return Err(DmaError::OutOfRange { addr, len });
    }
    Ok(())
}

#[inline]
pub(crate) fn check_bounds(offset: u64, len: usize, size: u64) -> Result<(), DmaError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DmaError::OutOfBounds {
            offset,
            len: len as u64,
            size,
        }),
    }
}

// ---------------------------------------------------------------------------
// The mapping guard
// ---------------------------------------------------------------------------

enum Target {
    /// Ownerless RAM: machine-lifetime memory, valid while the borrowed
    /// address-space handle (and so the machine's data) lives.
    Borrowed { host: NonNull<u8> },
    /// RAM of an owned region: the mapping holds the memory.
    Owned {
        host: NonNull<u8>,
        backend: Arc<MemoryBackend>,
        ticket: Ticket,
    },
    /// A bounce buffer: holds the region (and so the device).
    Bounce {
        buf: Box<[u8]>,
        region: Arc<RegionCore>,
        ticket: Ticket,
        prefill: MemTxResult,
    },
}

/// A DMA mapping of a guest range: an RAII guard over direct host memory or a
/// bounce buffer. See the [module docs](self).
///
/// Access is by bounds-checked copies ([`read`](Self::read),
/// [`write`](Self::write)); no Rust reference into guest memory is handed
/// out. Dropping the guard is [`unmap`](Self::unmap) with the full length.
pub struct DmaMapping<'a> {
    space: &'a AddressSpace,
    addr: u64,
    len: u64,
    dir: DmaDirection,
    /// `None` once unmapped (only inside `unmap`/`drop`).
    target: Option<Target>,
}

// SAFETY: the raw host pointers point into memory kept mapped either by the
// `Arc<MemoryBackend>` held alongside (owned RAM) or by the machine data the
// borrowed address space holds (ownerless RAM); `MemoryBackend` is
// `Send + Sync` and the guard only performs raw copies through them, like
// `RamBlock`'s own methods.
unsafe impl Send for DmaMapping<'_> {}
// SAFETY: as above; `&DmaMapping` only allows reads (raw copies out of
// memory that tolerates concurrent access, or reads of the owned bounce
// buffer, which is only written through `&mut self`).
unsafe impl Sync for DmaMapping<'_> {}

impl fmt::Debug for DmaMapping<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaMapping")
            .field("space", &self.space.name())
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &format_args!("{:#x}", self.len))
            .field("dir", &self.dir)
            .field("bounce", &self.is_bounce())
            .finish()
    }
}

impl AddressSpace {
    /// Maps up to `len` bytes at `addr` for DMA in direction `dir` (QEMU
    /// `address_space_map`). The mapping may be shorter than `len`
    /// ([`DmaMapping::len`]): a direct mapping ends where the region stops
    /// being contiguous, a bounce mapping at the end of the flat range or of
    /// the free bounce space.
    ///
    /// # Errors
    ///
    /// [`DmaError::ZeroLength`], [`DmaError::OutOfRange`] if `addr + len`
    /// passes 2^64, [`DmaError::Unassigned`] if nothing is mapped at `addr`
    /// (QEMU would bounce garbage), [`DmaError::NoBounceSpace`] if a bounce
    /// buffer is needed and none is free.
    ///
    /// # Examples
    ///
    /// ```
    /// use memtree::{Memory, MemTxAttrs, dma::DmaDirection};
    /// let memory = Memory::new();
    /// let root = memory.new_container("root", 1 << 32, None).unwrap();
    /// let ram = memory.new_ram("ram", 0x1000, None).unwrap();
    /// memory.add_subregion(root, 0, ram).unwrap();
    /// let id = memory.new_address_space("as", root, None).unwrap();
    /// let space = memory.address_space(id).unwrap();
    ///
    /// let mut m = space.map(0x10, 4, DmaDirection::FromDevice, MemTxAttrs::UNSPECIFIED).unwrap();
    /// m.write(0, b"dma!").unwrap();
    /// m.unmap(4);
    /// let mut buf = [0; 4];
    /// assert!(space.read(0x10, &mut buf, MemTxAttrs::UNSPECIFIED).is_ok());
    /// assert_eq!(&buf, b"dma!");
    /// ```
    pub fn map(
        &self,
        addr: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MemTxAttrs,
    ) -> Result<DmaMapping<'_>, DmaError> {
        check_range(addr, len)?;
        self.map_in(&self.view_guard(), addr, len, dir, attrs)
    }

    /// [`AddressSpace::map`] against `view` (the published view, loaded by
    /// the caller: through the shared handle or a [`SpaceCursor`]).
    #[inline]
    pub(crate) fn map_in(
        &self,
        view: &FlatView,
        addr: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MemTxAttrs,
    ) -> Result<DmaMapping<'_>, DmaError> {
        let Some(i) = view.lookup_index(addr) else {
            return Err(DmaError::Unassigned {
                space: self.name().to_owned(),
                addr,
            });
        };
        let r = &view.ranges()[i];
        if is_direct(r, dir) {
            let got = direct_extent(view, i, addr, len, dir);
            let Some(host) = NonNull::new(r.host_at(addr)) else {
                // A direct range always has a host address; be total anyway.
                return Err(DmaError::Unassigned {
                    space: self.name().to_owned(),
                    addr,
                });
            };
            let target = match (r.region().owner(), ram_backend(r.region())) {
                (Some(_), Some(backend)) => {
                    let ticket = self.shared.machine.dma.insert(
                        MappingKind::DirectRam,
                        self.census_key(),
                        addr,
                        got,
                        dir,
                        backend.census_key(),
                    );
                    Target::Owned {
                        host,
                        backend: backend.clone(),
                        ticket,
                    }
                }
                _ => {
                    debug_assert!(
                        self.is_machine_lifetime(r.region()),
                        "ownerless RAM must be machine-lifetime memory"
                    );
                    Target::Borrowed { host }
                }
            };
            return Ok(DmaMapping {
                space: self,
                addr,
                len: got,
                dir,
                target: Some(target),
            });
        }
        // Bounce buffer, clamped to the flat range at `addr` so that the
        // region it pins is the one whose bytes it holds.
        let want = avail_in(r, addr, len);
        let bounce = &self.shared.bounce;
        let got = bounce.reserve(want);
        if got == 0 {
            return Err(DmaError::NoBounceSpace {
                space: self.name().to_owned(),
                in_use: bounce.in_use(),
                limit: bounce.limit.load(Ordering::Acquire),
            });
        }
        let mut buf = vec![0u8; got as usize].into_boxed_slice();
        let region = r.region().clone();
        let prefill = if dir.reads() {
            view.read(addr, &mut buf, attrs)
        } else {
            MemTxResult::OK
        };
        let ticket = self.shared.machine.dma.insert(
            MappingKind::Bounce,
            self.census_key(),
            addr,
            got,
            dir,
            region.census_key(),
        );
        Ok(DmaMapping {
            space: self,
            addr,
            len: got,
            dir,
            target: Some(Target::Bounce {
                buf,
                region,
                ticket,
                prefill,
            }),
        })
    }

    fn is_machine_lifetime(&self, core: &RegionCore) -> bool {
        match ram_backend(core) {
            Some(b) => self
                .shared
                .machine
                .ownerless
                .lock()
                .iter()
                .any(|o| Arc::ptr_eq(o, b)),
            None => false,
        }
    }

    /// The bounce-buffer limit of this address space, in bytes.
    pub fn max_bounce_buffer_size(&self) -> u64 {
        self.shared.bounce.limit.load(Ordering::Acquire)
    }

    /// Sets the bounce-buffer limit (QEMU's PCI `x-max-bounce-buffer-size`).
    /// Outstanding mappings keep their buffers; raising the limit notifies
    /// map clients.
    pub fn set_max_bounce_buffer_size(&self, limit: u64) {
        self.shared.bounce.limit.store(limit, Ordering::Release);
        if self.shared.bounce.has_room() {
            self.shared.bounce.notify();
        }
    }

    /// Bytes of bounce buffer reserved by outstanding mappings.
    pub fn bounce_in_use(&self) -> u64 {
        self.shared.bounce.in_use()
    }

    /// Registers a one-shot callback run when bounce space frees (QEMU
    /// `address_space_register_map_client`). If space is free right now it
    /// runs at once, before this returns. The callback runs on the thread
    /// that frees the space, with no memtree lock held; it may map again.
    pub fn register_map_client(&self, f: impl FnOnce() + Send + 'static) -> MapClientId {
        let bounce = &self.shared.bounce;
        let id = MapClientId(bounce.next_client.fetch_add(1, Ordering::Relaxed));
        bounce.clients.lock().push((id, Box::new(f)));
        if bounce.has_room() {
            bounce.notify();
        }
        id
    }

    /// Removes a client that has not run yet; returns whether it was still
    /// registered.
    pub fn unregister_map_client(&self, id: MapClientId) -> bool {
        let mut clients = self.shared.bounce.clients.lock();
        match clients.iter().position(|(c, _)| *c == id) {
            Some(i) => {
                drop(clients.remove(i));
                true
            }
            None => false,
        }
    }

    /// Every outstanding recorded mapping, cache and section of the machine
    /// (not only of this address space), registered in the census.
    /// Ownerless-RAM mappings are not recorded (they hold nothing).
    pub fn outstanding_mappings(&self) -> Vec<MappingInfo> {
        let m = &self.shared.machine;
        m.dma.list(&m.census)
    }
}

impl SpaceCursor {
    /// [`AddressSpace::map`] through the cursor's cached view: the same
    /// mapping, without loading the published view through the shared
    /// handle (for a DMA worker that maps often).
    pub fn map(
        &mut self,
        addr: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MemTxAttrs,
    ) -> Result<DmaMapping<'_>, DmaError> {
        check_range(addr, len)?;
        let view = self.cache.load();
        self.space.map_in(view, addr, len, dir, attrs)
    }
}

impl<'a> DmaMapping<'a> {
    /// Guest address of the first byte.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length actually mapped (may be less than requested).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: mappings are at least one byte long.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The direction the mapping was made for.
    pub fn direction(&self) -> DmaDirection {
        self.dir
    }

    /// The address space the mapping was made through.
    pub fn space(&self) -> &'a AddressSpace {
        self.space
    }

    /// Whether the mapping goes through a bounce buffer.
    pub fn is_bounce(&self) -> bool {
        matches!(self.target, Some(Target::Bounce { .. }))
    }

    /// Whether the mapping holds a reference (owned RAM or bounce): false for
    /// ownerless RAM, which costs no reference counting.
    pub fn holds_reference(&self) -> bool {
        !matches!(self.target, Some(Target::Borrowed { .. }))
    }

    /// Result of the bounce prefill (`OK` for direct mappings and mappings
    /// for writing).
    pub fn prefill_result(&self) -> MemTxResult {
        match &self.target {
            Some(Target::Bounce { prefill, .. }) => *prefill,
            _ => MemTxResult::OK,
        }
    }

    /// The region a bounce mapping holds (`None` for direct RAM, which holds
    /// only memory).
    pub fn region(&self) -> Option<&Arc<RegionCore>> {
        match &self.target {
            Some(Target::Bounce { region, .. }) => Some(region),
            _ => None,
        }
    }

    /// The memory an owned direct mapping holds.
    pub fn backend(&self) -> Option<&Arc<MemoryBackend>> {
        match &self.target {
            Some(Target::Owned { backend, .. }) => Some(backend),
            _ => None,
        }
    }

    fn ticket(&self) -> Option<Ticket> {
        match &self.target {
            Some(Target::Owned { ticket, .. } | Target::Bounce { ticket, .. }) => Some(*ticket),
            _ => None,
        }
    }

    /// Diagnostic id (`None` for ownerless RAM, which is not recorded).
    pub fn id(&self) -> Option<MappingId> {
        self.ticket().map(Ticket::id)
    }

    /// The mapping's census key, registering it now if the census has not
    /// yet (`None` for ownerless RAM).
    pub fn census_key(&self) -> Option<ObjectKey> {
        let t = self.ticket()?;
        let m = &self.space.shared.machine;
        m.dma.census_key(t, &m.census)
    }

    /// Host address of the first byte: direct memory, or the bounce buffer.
    /// Valid for [`len`](Self::len) bytes while the guard lives; never create
    /// Rust references from it into guest memory (raw copies or atomics only,
    /// see [`crate::ram`]).
    pub fn as_ptr(&self) -> *const u8 {
        match &self.target {
            Some(Target::Borrowed { host } | Target::Owned { host, .. }) => host.as_ptr(),
            Some(Target::Bounce { buf, .. }) => buf.as_ptr(),
            None => ptr::null(),
        }
    }

    /// Copies `buf.len()` bytes at `offset` (relative to the mapping) into
    /// `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        check_bounds(offset, buf.len(), self.len)?;
        match &self.target {
            Some(Target::Borrowed { host } | Target::Owned { host, .. }) => {
                // SAFETY: `offset + buf.len() <= len`, and `len` bytes at
                // `host` lie in host memory that stays mapped while the guard
                // lives (held backend, or machine-lifetime memory kept by the
                // borrowed handle); `buf` is a Rust buffer, never guest
                // memory, so the ranges do not overlap.
                unsafe {
                    ptr::copy_nonoverlapping(
                        host.as_ptr().add(offset as usize),
                        buf.as_mut_ptr(),
                        buf.len(),
                    )
                }
            }
            Some(Target::Bounce { buf: b, .. }) => {
                let o = offset as usize;
                buf.copy_from_slice(&b[o..o + buf.len()]);
            }
            None => {}
        }
        Ok(())
    }

    /// Copies `buf` into the mapping at `offset`.
    ///
    /// # Errors
    ///
    /// [`DmaError::WrongDirection`] for a mapping made for
    /// [`DmaDirection::ToDevice`]; [`DmaError::OutOfBounds`].
    pub fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), DmaError> {
        if !self.dir.writes() {
            return Err(DmaError::WrongDirection(self.dir));
        }
        check_bounds(offset, buf.len(), self.len)?;
        match &mut self.target {
            Some(Target::Borrowed { host } | Target::Owned { host, .. }) => {
                // SAFETY: as in `read`, with the copy reversed; direct
                // mappings for writing are only made of writable RAM.
                unsafe {
                    ptr::copy_nonoverlapping(
                        buf.as_ptr(),
                        host.as_ptr().add(offset as usize),
                        buf.len(),
                    )
                }
            }
            Some(Target::Bounce { buf: b, .. }) => {
                let o = offset as usize;
                b[o..o + buf.len()].copy_from_slice(buf);
            }
            None => {}
        }
        Ok(())
    }

    /// Unmaps (QEMU `address_space_unmap`): a bounce buffer mapped for
    /// writing writes its first `access_len` bytes (capped at the length)
    /// back through the address space; then everything the mapping held is
    /// released and map clients are notified. Returns the result of the
    /// write-back (`OK` if there was none).
    pub fn unmap(mut self, access_len: u64) -> MemTxResult {
        self.release(access_len)
    }

    #[inline]
    fn release(&mut self, access_len: u64) -> MemTxResult {
        // The direct cases release in place: moving the whole target out
        // first costs more than the rest of an ownerless unmap.
        match &self.target {
            // Ownerless RAM holds nothing: releasing it twice is harmless.
            None | Some(Target::Borrowed { .. }) => MemTxResult::OK,
            Some(Target::Owned { ticket, .. }) => {
                let machine = &self.space.shared.machine;
                machine.dma.remove(*ticket, &machine.census);
                // Drops the backend (after the record, as before).
                self.target = None;
                MemTxResult::OK
            }
            Some(Target::Bounce { .. }) => self.release_bounce(access_len),
        }
    }

    fn release_bounce(&mut self, access_len: u64) -> MemTxResult {
        let Some(target) = self.target.take() else {
            return MemTxResult::OK;
        };
        let machine = &self.space.shared.machine;
        match target {
            Target::Borrowed { .. } | Target::Owned { .. } => MemTxResult::OK,
            Target::Bounce {
                buf,
                region,
                ticket,
                ..
            } => {
                let n = access_len.min(self.len) as usize;
                let r = if self.dir.writes() {
                    self.space
                        .write(self.addr, &buf[..n], MemTxAttrs::UNSPECIFIED)
                } else {
                    MemTxResult::OK
                };
                machine.dma.remove(ticket, &machine.census);
                drop(buf);
                drop(region);
                self.space.shared.bounce.release(self.len);
                r
            }
        }
    }
}

impl Drop for DmaMapping<'_> {
    fn drop(&mut self) {
        let len = self.len;
        self.release(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_cursor_map_behaves_like_the_shared_handle_map() {
        let memory = crate::Memory::new();
        let root = memory.new_container("root", 1 << 32, None).unwrap();
        let ram = memory.new_ram("ram", 0x1000, None).unwrap();
        memory.add_subregion(root, 0, ram).unwrap();
        let dev = memory.new_owner("dev", None).unwrap();
        let dev_ram = memory.new_ram("dev.ram", 0x1000, Some(dev)).unwrap();
        memory.add_subregion(root, 0x1_0000, dev_ram).unwrap();
        let id = memory.new_address_space("as", root, None).unwrap();
        let space = memory.address_space(id).unwrap();
        let mut cursor = space.cursor();
        let a = MemTxAttrs::UNSPECIFIED;
        {
            let mut m = cursor.map(0x10, 4, DmaDirection::FromDevice, a).unwrap();
            assert!(!m.holds_reference() && m.id().is_none());
            m.write(0, b"dma!").unwrap();
            assert!(m.unmap(4).is_ok());
        }
        let mut buf = [0u8; 4];
        assert!(space.read(0x10, &mut buf, a).is_ok());
        assert_eq!(&buf, b"dma!");
        let m = cursor
            .map(0x1_0ff0, 0x100, DmaDirection::ToDevice, a)
            .unwrap();
        assert_eq!(m.len(), 0x10, "clamped to the end of the region");
        let backend = m.backend().cloned().unwrap();
        assert_eq!(space.outstanding_mappings().len(), 1);
        drop(m);
        assert!(space.outstanding_mappings().is_empty());
        assert_eq!(Arc::strong_count(&backend), 2, "region + this test");
        assert_eq!(
            cursor
                .map(0x2_0000, 4, DmaDirection::ToDevice, a)
                .unwrap_err(),
            DmaError::Unassigned {
                space: "as".into(),
                addr: 0x2_0000
            }
        );
    }

    #[test]
    fn bounce_reserve_is_capped_by_the_limit() {
        let b = BounceState::new(100);
        assert_eq!(b.reserve(60), 60);
        assert_eq!(b.reserve(60), 40);
        assert_eq!(b.reserve(1), 0);
        b.release(60);
        assert_eq!(b.in_use(), 40);
    }

    #[test]
    fn registry_reuses_slots_with_new_generations() {
        let c = Census::new();
        let reg = DmaRegistry::new();
        let held = c.register(ObjectKind::Backend, "b", None);
        let t1 = reg.insert(
            MappingKind::DirectRam,
            held,
            0,
            1,
            DmaDirection::ToDevice,
            held,
        );
        reg.remove(t1, &c);
        let t2 = reg.insert(
            MappingKind::DirectRam,
            held,
            0,
            1,
            DmaDirection::ToDevice,
            held,
        );
        assert_eq!(t1.slot, t2.slot);
        assert_ne!(t1.generation, t2.generation);
        // A stale ticket removes nothing.
        reg.remove(t1, &c);
        assert_eq!(reg.len(), 1);
        reg.remove(t2, &c);
        assert_eq!(reg.len(), 0);
    }
}
