//! The table of outstanding mappings: every DMA mapping, cache and section
//! that holds something is recorded here, so that the census can say
//! `held by mapping #12 "dma pci 0x1000+0x200 from-device" -> backend ...`
//! and an unplug can report what still pins the device.
//!
//! Recording sits on the DMA fast path (map and unmap of a device's RAM),
//! whose whole budget is a few tens of nanoseconds, and on a VM one locked
//! instruction costs about ten. So recording and removing an entry use no
//! locked instruction and no lock: only plain loads and stores.
//!
//! # Design
//!
//! * **Shards, one writer each.** The table is split into `Shard`s. A
//!   thread *claims* a shard of a table the first time it records into it
//!   and keeps the claim in a thread-local until the thread exits (or until
//!   it has claimed `MAX_CLAIMS` other tables since). Only the claim holder
//!   turns free slots of a shard into entries. A thread with no usable
//!   thread-local (one that is exiting) claims a shard for one entry.
//! * **Slots.** A slot is free or live; its state word counts generations. An
//!   entry's holder (the mapping guard, on whatever thread it is dropped)
//!   frees its slot with one release store. Nobody else writes a slot.
//! * **Readers** (census sync, unplug reports, listings) copy live entries
//!   as from a seqlock: state, fields, acquire fence, state again; a copy is
//!   kept only if the state did not move.
//! * **Census entries are a view of the table.** `MappingTable::sync` (run
//!   by the census before it answers any query) registers an
//!   [`ObjectKind::Mapping`] census entry for every live table entry that
//!   has none and finalizes the census entry of every table entry that is
//!   gone. Removing a table entry therefore never touches the census; a
//!   mapping's finalization is logged at the next census query, not at
//!   unmap.
//!
//! # Entries that pin memory
//!
//! A direct DMA mapping of a device's RAM does not hold the memory's `Arc`
//! (two locked instructions, more than half the map+unmap budget): its
//! table entry *is* the pin, as a hazard pointer is. When the last `Arc` of
//! a [`MemoryBackend`](crate::host::backend::MemoryBackend) that has ever been
//! pinned goes, its drop hands the host memory ([`RamBlock`]) to
//! `MappingTable::retire_memory` instead of freeing it: the block is
//! parked in the table's `retired` list and freed (and its census entry
//! finalized) by whichever *sweep* first finds no live entry naming it.
//!
//! The race between a retiring drop and an unmap is a Dekker pattern:
//!
//! * unmap (`MappingTable::remove_pin`): free the slot; full barrier; if
//!   `retired_count` is non-zero, sweep;
//! * retire: park the block and raise `retired_count`; full barrier; sweep.
//!
//! Whatever the interleaving, one of the two sees the other's store, so the
//! last sweep to run sees every slot that pinned the block free and frees
//! it — exactly once, because sweeps run under the `retired` lock. No new
//! entry can name a retired block: making one requires a flat view that
//! holds the backend, and the backend's last `Arc` is gone.
//!
//! The unmap side runs on the fast path, so its barrier is only a compiler
//! fence and the retire side pays for both with
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which makes every running
//! thread of the process execute a full barrier (the asymmetric fence of
//! userspace RCU and of folly's hazard pointers). Where `membarrier` is not
//! available (other kernels, seccomp, Miri, loom) both sides use
//! `fence(SeqCst)`. Retiring happens at unplug or region destruction, never
//! per access, and only for memory that has ever been DMA-mapped.
//!
//! The handshake is for liveness only. Safety does not depend on it: a sweep
//! frees a block only after its acquire load saw every pin of the block
//! cleared, and each holder's accesses come before its clear.
//!
//! # Invariants
//!
//! * A free slot is written only by the holder of its shard's claim; a live
//!   slot only by the holder of its entry (to free it).
//! * A slot's fields are written only while it is free, after a release
//!   fence, and are published by a release store of the new (live) state;
//!   so a reader whose two state loads agree copied exactly that entry
//!   (`loom_tests` checks this).
//! * Shards are never removed before the table drops: a `Ticket` points
//!   into its shard for as long as the table lives, and every ticket is used
//!   through the table that made it.
//! * The table holds no reference to anything it describes (census keys
//!   only), so it cannot keep anything alive. A thread-local claim keeps its
//!   shard's memory (not the table) after the table is gone; such retired
//!   shards are dropped the next time that thread claims a shard.
//! * Entry ids are never reused within a table: a shard's number and a
//!   sequence number only that shard's claim holder advances.
//! * A shard grows only when a full pass finds every slot live, by half
//!   again, so its slots stay below 1.5 times the most entries ever live in
//!   it at once, plus one; a free slot anywhere is found by the next
//!   round-robin pass.
//! * Host memory of a retired backend is freed exactly once, by a sweep
//!   under the `retired` lock, after the sweep's acquire load saw each entry
//!   naming it cleared.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64 as StdAtomicU64, AtomicUsize};
use std::sync::{Arc, OnceLock};

#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::host::mapping_info::{DmaDirection, MappingId, MappingInfo, MappingKind};
use crate::host::ram::RamBlock;
use crate::lifecycle::census::{Census, CensusSource, ObjectKey, ObjectKind};

/// How many tables a thread keeps a claim on; claiming one more releases the
/// least recently claimed.
pub(crate) const MAX_CLAIMS: usize = 4;

/// Slots of a shard's first chunk; chunk `k` holds `FIRST_CHUNK << k`.
const FIRST_CHUNK: usize = 32;
/// Chunks per shard: `FIRST_CHUNK * (2^CHUNKS - 1)` slots, more entries
/// than a process can hold guards for (memory runs out first).
const CHUNKS: usize = 58;
/// Tries a reader makes to copy a slot that keeps changing under it.
const READ_TRIES: usize = 8;

/// Low bit of a slot's state: the slot holds an entry.
const LIVE: u64 = 1;

/// What one entry says (its id is the shard's number and `seq`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) kind: MappingKind,
    pub(crate) dir: DmaDirection,
    /// Census key of the address-space handle the entry was made through
    /// (its name is looked up when a label is needed, so recording
    /// allocates nothing).
    pub(crate) space: ObjectKey,
    pub(crate) addr: u64,
    pub(crate) len: u64,
    /// Census key of what the entry holds (a backend or a region).
    pub(crate) holds: ObjectKey,
}

fn kind_bits(kind: MappingKind) -> u64 {
    match kind {
        MappingKind::DirectRam => 0,
        MappingKind::Bounce => 1,
        MappingKind::Cache => 2,
        MappingKind::Section => 3,
        MappingKind::GuestMemory => 4,
    }
}

fn kind_from_bits(bits: u64) -> MappingKind {
    match bits & 7 {
        0 => MappingKind::DirectRam,
        1 => MappingKind::Bounce,
        2 => MappingKind::Cache,
        3 => MappingKind::Section,
        _ => MappingKind::GuestMemory,
    }
}

fn dir_bits(dir: DmaDirection) -> u64 {
    match dir {
        DmaDirection::ToDevice => 0,
        DmaDirection::FromDevice => 1,
        DmaDirection::Bidirectional => 2,
    }
}

fn dir_from_bits(bits: u64) -> DmaDirection {
    match bits & 3 {
        0 => DmaDirection::ToDevice,
        1 => DmaDirection::FromDevice,
        _ => DmaDirection::Bidirectional,
    }
}

// ---------------------------------------------------------------------------
// Slots: the protocol loom checks
// ---------------------------------------------------------------------------

/// One slot: a state word (`generation << 1 | LIVE`) and the entry's fields.
pub(crate) struct Slot {
    state: AtomicU64,
    seq: AtomicU64,
    /// `kind | dir << 3`.
    kind_dir: AtomicU64,
    space: AtomicU64,
    addr: AtomicU64,
    len: AtomicU64,
    holds: AtomicU64,
}

impl Slot {
    pub(crate) fn new() -> Slot {
        Slot {
            state: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            kind_dir: AtomicU64::new(0),
            space: AtomicU64::new(0),
            addr: AtomicU64::new(0),
            len: AtomicU64::new(0),
            holds: AtomicU64::new(0),
        }
    }

    /// Claim holder: if the slot is free, writes `entry` into it and
    /// publishes it live. Returns whether it did.
    #[inline]
    pub(crate) fn try_fill(&self, seq: u64, entry: &Entry) -> bool {
        // Acquire: pairs with the holder's release in `clear`, so the holder
        // is done with the slot before it is rewritten.
        let state = self.state.load(Ordering::Acquire);
        if state & LIVE != 0 {
            return false;
        }
        // A reader that copies any of the stores below must then see a state
        // other than the one it started from (the free state above, or a
        // later one): the fence orders them after everything this thread
        // has seen of the slot.
        fence(Ordering::Release);
        self.seq.store(seq, Ordering::Relaxed);
        self.kind_dir.store(
            kind_bits(entry.kind) | dir_bits(entry.dir) << 3,
            Ordering::Relaxed,
        );
        self.space.store(entry.space.raw(), Ordering::Relaxed);
        self.addr.store(entry.addr, Ordering::Relaxed);
        self.len.store(entry.len, Ordering::Relaxed);
        self.holds.store(entry.holds.raw(), Ordering::Relaxed);
        // Release: a reader that sees the new state sees the fields.
        self.state.store(state + 2 + LIVE, Ordering::Release);
        true
    }

    /// Entry holder: frees the slot.
    #[inline]
    pub(crate) fn clear(&self) {
        // Only the holder writes a live slot, so this is its own state.
        let state = self.state.load(Ordering::Relaxed);
        debug_assert!(state & LIVE != 0, "clearing a free slot");
        self.state.store(state & !LIVE, Ordering::Release);
    }

    /// Entry holder: the entry's sequence number.
    pub(crate) fn seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// Reader: a consistent copy of the live entry, or `None` if the slot
    /// is free (or changed under every one of a few tries: the entry seen
    /// first was removed meanwhile).
    pub(crate) fn read(&self) -> Option<(u64, Entry)> {
        for _ in 0..READ_TRIES {
            let before = self.state.load(Ordering::Acquire);
            if before & LIVE == 0 {
                return None;
            }
            let seq = self.seq.load(Ordering::Relaxed);
            let kind_dir = self.kind_dir.load(Ordering::Relaxed);
            let entry = Entry {
                kind: kind_from_bits(kind_dir),
                dir: dir_from_bits(kind_dir >> 3),
                space: ObjectKey::from_raw(self.space.load(Ordering::Relaxed)),
                addr: self.addr.load(Ordering::Relaxed),
                len: self.len.load(Ordering::Relaxed),
                holds: ObjectKey::from_raw(self.holds.load(Ordering::Relaxed)),
            };
            // Pairs with the writer's release fence: if a field came from a
            // later fill, the state load below sees that fill's free state
            // or a later one.
            fence(Ordering::Acquire);
            if self.state.load(Ordering::Relaxed) == before {
                return Some((seq, entry));
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------
// Shards
// ---------------------------------------------------------------------------

/// A part of the table with one writer at a time (its claim holder).
pub(crate) struct Shard {
    number: u32,
    claimed: AtomicBool,
    /// Set when the table drops (a thread-local claim may outlive it).
    retired: AtomicBool,
    /// Claim holder only: where the next free-slot probe starts.
    hint: AtomicUsize,
    /// Claim holder only: the next entry's sequence number.
    next_seq: StdAtomicU64,
    /// Slots in use so far (written by the claim holder, release).
    len: AtomicUsize,
    chunks: [OnceLock<Box<[Slot]>>; CHUNKS],
}

/// The chunk and offset of slot `i`.
fn locate(i: usize) -> (usize, usize) {
    let n = i / FIRST_CHUNK + 1;
    let chunk = (usize::BITS - 1 - n.leading_zeros()) as usize;
    (chunk, i - FIRST_CHUNK * ((1 << chunk) - 1))
}

impl Shard {
    fn new(number: u32) -> Shard {
        Shard {
            number,
            claimed: AtomicBool::new(true),
            retired: AtomicBool::new(false),
            hint: AtomicUsize::new(0),
            next_seq: StdAtomicU64::new(1),
            len: AtomicUsize::new(0),
            chunks: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// Slot `i` (`i < len`).
    #[inline]
    fn slot(&self, i: usize) -> &Slot {
        let (chunk, offset) = locate(i);
        &self.chunks[chunk]
            .get()
            .expect("slots below `len` are allocated")[offset]
    }

    /// Claim holder: records `entry`, returning its slot.
    #[inline]
    fn fill(&self, entry: &Entry) -> &Slot {
        // Plain load + store: only the claim holder writes these.
        let seq = self.next_seq.load(Ordering::Relaxed);
        self.next_seq.store(seq + 1, Ordering::Relaxed);
        // One pass round the slots in use, from where the last one ended
        // (round-robin, so a slot freed anywhere is found); grow only when
        // every slot is live.
        let len = self.len.load(Ordering::Relaxed);
        let mut i = self.hint.load(Ordering::Relaxed);
        for _ in 0..len {
            if i >= len {
                i = 0;
            }
            let slot = self.slot(i);
            if slot.try_fill(seq, entry) {
                self.hint.store(i + 1, Ordering::Relaxed);
                return slot;
            }
            i += 1;
        }
        self.grow(seq, entry)
    }

    /// Claim holder, every slot live: adds half as many slots again (so
    /// full passes are rare: the slots in use stay below 1.5 times the most
    /// entries ever live at once, plus one) and fills the first new one.
    #[cold]
    fn grow(&self, seq: u64, entry: &Entry) -> &Slot {
        let len = self.len.load(Ordering::Relaxed);
        let new_len = len + (len / 2).max(1);
        for chunk in locate(len).0..=locate(new_len - 1).0 {
            self.chunks[chunk].get_or_init(|| {
                (0..FIRST_CHUNK << chunk)
                    .map(|_| Slot::new())
                    .collect::<Vec<_>>()
                    .into_boxed_slice()
            });
        }
        let slot = self.slot(len);
        let filled = slot.try_fill(seq, entry);
        debug_assert!(filled, "a slot past `len` is free");
        // Release: a reader that sees the new length sees the chunks and the
        // slots' initial (free) state.
        self.len.store(new_len, Ordering::Release);
        self.hint.store(len + 1, Ordering::Relaxed);
        slot
    }

    /// Every live entry, with its sequence number.
    fn live(&self, out: &mut Vec<(MappingId, Entry)>) {
        let len = self.len.load(Ordering::Acquire);
        for i in 0..len {
            if let Some((seq, e)) = self.slot(i).read() {
                out.push((MappingId::new(self.number, seq), e));
            }
        }
    }

    fn release_claim(&self) {
        self.claimed.store(false, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------
// Thread-local claims
// ---------------------------------------------------------------------------

struct Claim {
    table: u64,
    shard: Arc<Shard>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.shard.release_claim();
    }
}

/// A thread's claims, most recently claimed first.
struct Claims(Vec<Claim>);

impl Drop for Claims {
    fn drop(&mut self) {
        // Before the claims (and maybe their shards) go.
        let _ = CURRENT.try_with(|c| c.set((0, std::ptr::null())));
    }
}

thread_local! {
    static CLAIMS: RefCell<Claims> = const { RefCell::new(Claims(Vec::new())) };
    /// `CLAIMS[0]` as (table id, shard address), for the fast path: a
    /// plain thread-local read, no borrow flag, no destructor check.
    /// Cleared before that claim can be dropped; table ids start at 1.
    static CURRENT: Cell<(u64, *const Shard)> = const { Cell::new((0, std::ptr::null())) };
}

/// Source of table ids (never reused in a process).
static NEXT_TABLE: StdAtomicU64 = StdAtomicU64::new(1);

// ---------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------

/// Where an entry lives: its shard and slot. Made only by
/// `MappingTable::insert` and used only through the same table.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ticket {
    shard: NonNull<Shard>,
    slot: NonNull<Slot>,
}

// SAFETY: a ticket is two addresses; they are dereferenced only through the
// table that made it (see `MappingTable::slot_of`), which keeps the shard and
// its slots alive and is itself `Sync`.
unsafe impl Send for Ticket {}
// SAFETY: as above; `&Ticket` allows nothing a copy does not.
unsafe impl Sync for Ticket {}

/// The machine-wide table of outstanding mappings. See the
/// [module docs](self).
pub(crate) struct MappingTable {
    id: u64,
    /// Every shard ever made, claimed or not (never shrinks).
    shards: Mutex<Vec<Arc<Shard>>>,
    /// Census entries registered for table entries (see `sync`).
    registered: Mutex<HashMap<MappingId, ObjectKey>>,
    /// Host memory whose backend is gone while entries may still pin it,
    /// with the backend's census key (see "Entries that pin memory").
    retired: Mutex<Vec<(ObjectKey, RamBlock)>>,
    /// `retired.len()`, read without the lock on the unmap path.
    retired_count: AtomicUsize,
    /// [`asymmetric()`], read once.
    asymmetric: bool,
}

// ---------------------------------------------------------------------------
// Barriers for the pin / retire handshake
// ---------------------------------------------------------------------------

/// Whether `membarrier(PRIVATE_EXPEDITED)` is registered for this process
/// (decided once, before the first table exists, never changed after).
static ASYMMETRIC: OnceLock<bool> = OnceLock::new();

fn asymmetric() -> bool {
    *ASYMMETRIC.get_or_init(|| {
        #[cfg(all(target_os = "linux", not(miri), not(loom)))]
        {
            use rustix::thread::{membarrier, membarrier_query, MembarrierCommand};
            let supported = membarrier_query();
            supported.contains_command(MembarrierCommand::PrivateExpedited)
                && supported.contains_command(MembarrierCommand::RegisterPrivateExpedited)
                && membarrier(MembarrierCommand::RegisterPrivateExpedited).is_ok()
        }
        #[cfg(not(all(target_os = "linux", not(miri), not(loom))))]
        {
            false
        }
    })
}

/// The unmap side's barrier: orders the slot's release before the load of
/// `retired_count`.
#[inline]
fn light_barrier(asymmetric: bool) {
    if asymmetric {
        // The retire side's membarrier supplies the hardware barrier.
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
    } else {
        fence(Ordering::SeqCst);
    }
}

/// The retire side's barrier: a full barrier on every running thread.
/// Returns false if it could not be made (`membarrier` refused after a
/// successful registration, which the kernel does not do).
fn heavy_barrier(asymmetric: bool) -> bool {
    #[cfg(all(target_os = "linux", not(miri), not(loom)))]
    if asymmetric {
        use rustix::thread::{membarrier, MembarrierCommand};
        return membarrier(MembarrierCommand::PrivateExpedited).is_ok();
    }
    let _ = asymmetric;
    fence(Ordering::SeqCst);
    true
}

impl fmt::Debug for MappingTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappingTable")
            .field("outstanding", &self.len())
            .field("retired", &self.retired_len())
            .finish()
    }
}

impl Default for MappingTable {
    fn default() -> Self {
        MappingTable::new()
    }
}

impl Drop for MappingTable {
    fn drop(&mut self) {
        for shard in self.shards.get_mut().iter() {
            shard.retired.store(true, Ordering::Release);
        }
    }
}

impl MappingTable {
    pub(crate) fn new() -> MappingTable {
        MappingTable {
            id: NEXT_TABLE.fetch_add(1, Ordering::Relaxed),
            shards: Mutex::new(Vec::new()),
            registered: Mutex::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            retired_count: AtomicUsize::new(0),
            asymmetric: asymmetric(),
        }
    }

    /// Records an entry: plain stores into this thread's shard, no lock, no
    /// allocation (unless the shard grows or this is the thread's first
    /// entry in this table).
    #[inline]
    pub(crate) fn insert(&self, entry: &Entry) -> Ticket {
        if let Ok((table, shard)) = CURRENT.try_with(Cell::get) {
            if table == self.id {
                // SAFETY: `CURRENT` names the shard of this thread's
                // `CLAIMS[0]`, whose `Arc` the thread holds until after it
                // has cleared `CURRENT` (`Claims::drop`, `insert_claiming`);
                // and holding the claim makes this thread the shard's only
                // writer of free slots.
                return Self::fill(unsafe { &*shard }, entry);
            }
        }
        self.insert_claiming(entry)
    }

    #[inline]
    fn fill(shard: &Shard, entry: &Entry) -> Ticket {
        let slot = shard.fill(entry);
        Ticket {
            shard: NonNull::from(shard),
            slot: NonNull::from(slot),
        }
    }

    /// `insert` for a thread whose most recent claim is on another table (or
    /// that has none).
    #[cold]
    fn insert_claiming(&self, entry: &Entry) -> Ticket {
        let claimed = CLAIMS.try_with(|claims| {
            let mut claims = claims.try_borrow_mut().ok()?;
            let _ = CURRENT.try_with(|c| c.set((0, std::ptr::null())));
            let claims = &mut claims.0;
            claims.retain(|c| !c.shard.retired.load(Ordering::Acquire));
            let claim = match claims.iter().position(|c| c.table == self.id) {
                Some(i) => claims.remove(i),
                None => Claim {
                    table: self.id,
                    shard: self.claim_shard(),
                },
            };
            claims.insert(0, claim);
            // Dropping the evicted claims releases their shards.
            claims.truncate(MAX_CLAIMS);
            let shard = &claims[0].shard;
            let _ = CURRENT.try_with(|c| c.set((self.id, Arc::as_ptr(shard))));
            Some(Self::fill(shard, entry))
        });
        match claimed {
            Ok(Some(ticket)) => ticket,
            _ => {
                // No thread-local (the thread is exiting): a claim for this
                // one entry.
                let shard = self.claim_shard();
                let ticket = Self::fill(&shard, entry);
                shard.release_claim();
                ticket
            }
        }
    }

    /// Claims a free shard, or makes one.
    fn claim_shard(&self) -> Arc<Shard> {
        let mut shards = self.shards.lock();
        for shard in shards.iter() {
            if shard
                .claimed
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return shard.clone();
            }
        }
        let number = u32::try_from(shards.len()).expect("fewer than 2^32 threads");
        let shard = Arc::new(Shard::new(number));
        shards.push(shard.clone());
        shard
    }

    /// The slot a ticket names.
    #[inline]
    fn slot_of(&self, ticket: Ticket) -> &Slot {
        // SAFETY: tickets are made only by this table's `insert`, from a
        // slot of a shard in `self.shards`; the table keeps every shard
        // until it drops, and a shard never frees or moves a slot before it
        // drops; `&self` proves the table (so the slot) is alive for the
        // returned borrow.
        unsafe { ticket.slot.as_ref() }
    }

    /// Removes an entry that holds what it names by reference (its holder
    /// calls this exactly once): one release store.
    #[inline]
    pub(crate) fn remove(&self, ticket: Ticket) {
        self.slot_of(ticket).clear();
    }

    /// Removes an entry that pins memory (see "Entries that pin memory"):
    /// one release store, a compiler fence and one load, unless some
    /// memory is retired.
    #[inline]
    pub(crate) fn remove_pin<'c>(&self, ticket: Ticket, census: impl FnOnce() -> &'c Census) {
        self.slot_of(ticket).clear();
        light_barrier(self.asymmetric);
        if self.retired_count.load(Ordering::Relaxed) != 0 {
            self.sweep(census());
        }
    }

    /// Called by a pinned backend's drop: frees `block` now if no entry
    /// pins it, or parks it until the last one is removed.
    pub(crate) fn retire_memory(&self, key: ObjectKey, block: RamBlock, census: &Census) {
        let mut retired = self.retired.lock();
        retired.push((key, block));
        self.retired_count.store(retired.len(), Ordering::Relaxed);
        // Sweeping is safe with or without the barrier: a block is freed
        // only after a sweep's acquire load saw each of its pins cleared.
        // The barrier is for liveness: without it an unmap racing this drop
        // might miss the count, and the block would stay parked until the
        // next sweep (another retire, or an unmap that sees the count).
        let _ = heavy_barrier(self.asymmetric);
        self.sweep_locked(&mut retired, census);
    }

    #[cold]
    fn sweep(&self, census: &Census) {
        let mut retired = self.retired.lock();
        self.sweep_locked(&mut retired, census);
    }

    /// Frees every retired block no live entry names.
    fn sweep_locked(&self, retired: &mut Vec<(ObjectKey, RamBlock)>, census: &Census) {
        if retired.is_empty() {
            return;
        }
        let pinned: HashSet<ObjectKey> = self.snapshot().iter().map(|(_, e)| e.holds).collect();
        let mut i = 0;
        while i < retired.len() {
            if pinned.contains(&retired[i].0) {
                i += 1;
            } else {
                let (key, block) = retired.swap_remove(i);
                drop(block);
                census.finalize(key);
            }
        }
        self.retired_count.store(retired.len(), Ordering::Relaxed);
    }

    /// Number of retired blocks still pinned.
    pub(crate) fn retired_len(&self) -> usize {
        self.retired.lock().len()
    }

    /// What a live entry holds (called by its holder).
    pub(crate) fn holds(&self, ticket: Ticket) -> ObjectKey {
        ObjectKey::from_raw(self.slot_of(ticket).holds.load(Ordering::Relaxed))
    }

    /// The id of a live entry (called by its holder).
    pub(crate) fn id(&self, ticket: Ticket) -> MappingId {
        // SAFETY: as in `slot_of`.
        let shard = unsafe { ticket.shard.as_ref() };
        MappingId::new(shard.number, self.slot_of(ticket).seq())
    }

    /// Every live entry.
    fn snapshot(&self) -> Vec<(MappingId, Entry)> {
        let shards: Vec<Arc<Shard>> = self.shards.lock().clone();
        let mut out = Vec::new();
        for shard in &shards {
            shard.live(&mut out);
        }
        out
    }

    /// Number of live entries.
    pub(crate) fn len(&self) -> usize {
        self.snapshot().len()
    }

    fn label(entry: &Entry, names: &HashMap<ObjectKey, String>) -> String {
        let space = names.get(&entry.space).map_or("?", String::as_str);
        format!(
            "{} {} {:#x}+{:#x} {}",
            entry.kind.as_str(),
            space,
            entry.addr,
            entry.len,
            entry.dir.as_str()
        )
    }

    fn space_names<'e>(
        census: &Census,
        entries: impl Iterator<Item = &'e Entry>,
    ) -> HashMap<ObjectKey, String> {
        let mut names = HashMap::new();
        for e in entries {
            if let std::collections::hash_map::Entry::Vacant(v) = names.entry(e.space) {
                if let Some(n) = census.name_of(e.space) {
                    v.insert(n);
                }
            }
        }
        names
    }

    /// Brings the census up to date: registers a census entry for every new
    /// table entry, finalizes the census entry of every table entry that is
    /// gone. Lock order: `registered`, then `shards`, then the census (a
    /// leaf). Returns the live entries with their census keys.
    fn sync_entries(&self, census: &Census) -> Vec<(MappingId, Entry, ObjectKey)> {
        let mut registered = self.registered.lock();
        let live = self.snapshot();
        let ids: HashSet<MappingId> = live.iter().map(|(id, _)| *id).collect();
        registered.retain(|id, key| {
            let keep = ids.contains(id);
            if !keep {
                census.finalize(*key);
            }
            keep
        });
        let new: Vec<&Entry> = live
            .iter()
            .filter(|(id, _)| !registered.contains_key(id))
            .map(|(_, e)| e)
            .collect();
        let names = Self::space_names(census, new.into_iter());
        live.into_iter()
            .map(|(id, e)| {
                let key = *registered.entry(id).or_insert_with(|| {
                    census.register(ObjectKind::Mapping, &Self::label(&e, &names), Some(e.holds))
                });
                (id, e, key)
            })
            .collect()
    }

    /// See [`CensusSource::sync`].
    pub(crate) fn sync(&self, census: &Census) {
        self.sync_entries(census);
    }

    /// The census key of a live entry (registering it now if needed).
    pub(crate) fn census_key(&self, ticket: Ticket, census: &Census) -> Option<ObjectKey> {
        let id = self.id(ticket);
        self.sync_entries(census)
            .into_iter()
            .find(|(i, _, _)| *i == id)
            .map(|(_, _, key)| key)
    }

    /// Every live entry, registered in the census first, oldest first per
    /// thread.
    pub(crate) fn list(&self, census: &Census) -> Vec<MappingInfo> {
        let entries = self.sync_entries(census);
        let names = Self::space_names(census, entries.iter().map(|(_, e, _)| e));
        let mut out: Vec<MappingInfo> = entries
            .into_iter()
            .map(|(id, e, key)| MappingInfo {
                id,
                kind: e.kind,
                census_key: Some(key),
                label: Self::label(&e, &names),
                holds: e.holds,
            })
            .collect();
        out.sort_by_key(|m| m.id);
        out
    }

    /// One line per live entry holding one of `keys` (census key -> what it
    /// is, e.g. `region "e1000-mmio"`).
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
                    MappingKind::DirectRam | MappingKind::Cache | MappingKind::GuestMemory => {
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

impl CensusSource for MappingTable {
    fn sync(&self, census: &Census) {
        MappingTable::sync(self, census);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn entry(census: &Census, addr: u64) -> Entry {
        let key = census.register(ObjectKind::Backend, "b", None);
        Entry {
            kind: MappingKind::DirectRam,
            dir: DmaDirection::ToDevice,
            space: key,
            addr,
            len: 1,
            holds: key,
        }
    }

    #[test]
    fn slots_are_located_in_doubling_chunks() {
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(31), (0, 31));
        assert_eq!(locate(32), (1, 0));
        assert_eq!(locate(95), (1, 63));
        assert_eq!(locate(96), (2, 0));
        let last = FIRST_CHUNK * ((1 << CHUNKS) - 1) - 1;
        assert_eq!(locate(last).0, CHUNKS - 1);
    }

    #[test]
    fn a_freed_slot_is_reused_under_a_new_id() {
        let c = Census::new();
        let table = MappingTable::new();
        let e = entry(&c, 0x10);
        let t1 = table.insert(&e);
        let id1 = table.id(t1);
        table.remove(t1);
        let t2 = table.insert(&e);
        assert_eq!(t1, t2, "the same slot");
        assert_ne!(table.id(t2), id1, "ids are never reused");
        assert_eq!(table.len(), 1);
        table.remove(t2);
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn many_outstanding_entries_grow_the_shard_and_read_back() {
        let c = Census::new();
        let table = MappingTable::new();
        let tickets: Vec<Ticket> = (0..1000).map(|i| table.insert(&entry(&c, i))).collect();
        let mut addrs: Vec<u64> = table.snapshot().iter().map(|(_, e)| e.addr).collect();
        addrs.sort_unstable();
        assert_eq!(addrs, (0..1000).collect::<Vec<_>>());
        for t in tickets.iter().step_by(2) {
            table.remove(*t);
        }
        assert_eq!(table.len(), 500);
        for t in tickets.iter().skip(1).step_by(2) {
            table.remove(*t);
        }
        assert_eq!(table.len(), 0);
    }

    /// Slots in use in this thread's current shard.
    fn current_shard_len() -> usize {
        let shard = CURRENT.with(Cell::get).1;
        assert!(!shard.is_null());
        // SAFETY: `CURRENT` names the shard of this thread's current claim,
        // which the thread-local `CLAIMS` keeps alive.
        unsafe { &*shard }.len.load(Ordering::Relaxed)
    }

    /// Long-lived entries (a device's ring caches) in front of a churn of
    /// short mappings: freed slots are found again, the shard does not grow.
    #[test]
    fn churn_behind_long_lived_entries_reuses_slots() {
        let c = Census::new();
        let table = MappingTable::new();
        let long_lived: Vec<Ticket> = (0..16).map(|i| table.insert(&entry(&c, i))).collect();
        let cycles = if cfg!(miri) { 200 } else { 100_000 };
        for i in 0..cycles {
            let t = table.insert(&entry(&c, 100 + i));
            table.remove_pin(t, || &c);
        }
        let len = current_shard_len();
        assert!(len <= 32, "{len} slots for at most 17 live entries");
        for t in long_lived {
            table.remove(t);
        }
        // Many live at once, then all freed: slots stay below 1.5x the peak.
        let peak: Vec<Ticket> = (0..1000).map(|i| table.insert(&entry(&c, i))).collect();
        for t in peak {
            table.remove(t);
        }
        let len = current_shard_len();
        assert!(len <= 1501, "{len} slots for a peak of 1000 live entries");
    }

    #[test]
    fn census_entries_follow_the_table() {
        let c = Arc::new(Census::new());
        let table = Arc::new(MappingTable::new());
        c.set_source(table.clone());
        let e = entry(&c, 0x40);
        let t = table.insert(&e);
        let key = table.census_key(t, &c).expect("registered on demand");
        assert!(c.is_live(key));
        assert_eq!(table.census_key(t, &c), Some(key), "registered once");
        table.remove(t);
        assert!(!c.is_live(key), "finalized at the next query");
        assert!(c.double_finalized().is_empty());
    }

    #[test]
    fn threads_record_into_their_own_shards_and_free_each_others_entries() {
        let c = Census::new();
        let table = Arc::new(MappingTable::new());
        let e = entry(&c, 7);
        let tickets: Vec<Ticket> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..50).map(|_| table.insert(&e)).collect::<Vec<_>>()))
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(table.len(), 200);
        let ids: HashSet<MappingId> = tickets.iter().map(|t| table.id(*t)).collect();
        assert_eq!(ids.len(), 200, "ids are unique across shards");
        // The spawned threads have exited and released their claims: a new
        // thread reuses a shard instead of making a fifth.
        std::thread::scope(|s| {
            s.spawn(|| table.remove(table.insert(&e)));
        });
        assert!(table.shards.lock().len() <= 4);
        // Entries are freed from another thread than the one that made them.
        for t in tickets {
            table.remove(t);
        }
        assert_eq!(table.len(), 0);
    }

    fn block() -> RamBlock {
        RamBlock::new("m", 4096, crate::host::ram::RamBacking::Anonymous).unwrap()
    }

    #[test]
    fn retired_memory_is_freed_by_the_unmap_of_its_last_pin() {
        let c = Census::new();
        let table = MappingTable::new();
        let mem = c.register(ObjectKind::Backend, "m", None);
        let pin = |addr| Entry {
            holds: mem,
            ..entry(&c, addr)
        };
        let (t1, t2) = (table.insert(&pin(0)), table.insert(&pin(8)));
        let other = table.insert(&entry(&c, 16));
        table.retire_memory(mem, block(), &c);
        assert_eq!(table.retired_len(), 1, "two entries still pin it");
        assert!(c.is_live(mem));
        table.remove_pin(t1, || &c);
        table.remove(other);
        assert_eq!(table.retired_len(), 1, "one entry still pins it");
        table.remove_pin(t2, || &c);
        assert_eq!(table.retired_len(), 0);
        assert!(!c.is_live(mem), "finalized when freed");
        assert!(c.double_finalized().is_empty());
    }

    #[test]
    fn retired_memory_nobody_pins_is_freed_at_once() {
        let c = Census::new();
        let table = MappingTable::new();
        let mem = c.register(ObjectKind::Backend, "m", None);
        let unrelated = table.insert(&entry(&c, 0));
        table.retire_memory(mem, block(), &c);
        assert_eq!(table.retired_len(), 0);
        assert!(!c.is_live(mem));
        table.remove_pin(unrelated, || &c);
    }

    /// Unmaps on one thread race the retirement on another: the memory is
    /// freed exactly once, after the last pin is gone, whichever side sees
    /// the other.
    #[test]
    fn retire_racing_unmaps_frees_once_after_the_last_pin() {
        let rounds = if cfg!(miri) { 4 } else { 200 };
        for round in 0..rounds {
            let c = Census::new();
            let table = MappingTable::new();
            let mem = c.register(ObjectKind::Backend, "m", None);
            let pins: Vec<Ticket> = (0..4)
                .map(|i| {
                    table.insert(&Entry {
                        holds: mem,
                        ..entry(&c, i)
                    })
                })
                .collect();
            std::thread::scope(|s| {
                s.spawn(|| {
                    for t in &pins {
                        table.remove_pin(*t, || &c);
                    }
                });
                s.spawn(|| table.retire_memory(mem, block(), &c));
            });
            assert_eq!(table.retired_len(), 0, "round {round}");
            assert!(!c.is_live(mem), "round {round}");
            assert!(c.double_finalized().is_empty(), "round {round}");
        }
    }

    #[test]
    fn a_thread_claiming_many_tables_keeps_a_bounded_set_of_claims() {
        let c = Census::new();
        let e = entry(&c, 1);
        let tables: Vec<MappingTable> = (0..10).map(|_| MappingTable::new()).collect();
        for t in &tables {
            t.remove(t.insert(&e));
        }
        CLAIMS.with(|claims| assert!(claims.borrow().0.len() <= MAX_CLAIMS));
        drop(tables);
        let table = MappingTable::new();
        table.remove(table.insert(&e));
        CLAIMS.with(|claims| {
            let claims = claims.borrow();
            assert!(claims
                .0
                .iter()
                .all(|c| !c.shard.retired.load(Ordering::Relaxed)));
        });
    }
}

/// `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_tests`
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    fn entry(v: u64) -> Entry {
        Entry {
            kind: MappingKind::Cache,
            dir: DmaDirection::FromDevice,
            space: ObjectKey::from_raw(v),
            addr: v,
            len: v,
            holds: ObjectKey::from_raw(v),
        }
    }

    /// A reader never copies a torn entry, and the claim holder never
    /// overwrites a live one, while the holder frees it and the claim
    /// holder refills it concurrently.
    #[test]
    fn slot_readers_see_whole_entries_only() {
        loom::model(|| {
            let slot = Arc::new(Slot::new());
            assert!(slot.try_fill(1, &entry(1)));
            assert!(!slot.try_fill(2, &entry(2)), "a live slot is not refilled");

            let holder = {
                let slot = slot.clone();
                thread::spawn(move || slot.clear())
            };
            let reader = {
                let slot = slot.clone();
                thread::spawn(move || {
                    if let Some((seq, e)) = slot.read() {
                        assert_eq!(e, entry(seq), "torn copy of entry {seq}");
                    }
                })
            };
            // The claim holder refills the slot as soon as the holder has
            // freed it.
            while !slot.try_fill(2, &entry(2)) {
                thread::yield_now();
            }
            holder.join().unwrap();
            reader.join().unwrap();
            assert_eq!(slot.read(), Some((2, entry(2))));
        });
    }

    /// The pin / retire handshake ("Entries that pin memory"), modelled with
    /// the real `Slot` and the fallback barriers (`fence(SeqCst)` on both
    /// sides; `membarrier` acts as that fence on every running thread). The
    /// holder reads the pinned memory, then unmaps; the retiring drop parks
    /// the memory and sweeps. The memory (a loom cell: loom reports a read
    /// racing the free) is freed exactly once, and never under the reader.
    #[test]
    fn pinned_memory_is_freed_once_after_the_last_unmap() {
        use loom::cell::UnsafeCell;
        use loom::sync::atomic::AtomicUsize;
        use loom::sync::Mutex;

        struct Model {
            slot: Slot,
            memory: UnsafeCell<u64>,
            /// Whether the block is parked (the `retired` list).
            retired: Mutex<bool>,
            retired_count: AtomicUsize,
            frees: AtomicUsize,
        }

        impl Model {
            /// Under the lock: free the parked block if no entry pins it.
            fn sweep_locked(&self, parked: &mut bool) {
                if *parked && self.slot.read().is_none() {
                    // SAFETY: loom checks this write against every read.
                    self.memory.with_mut(|m| unsafe { *m = 0xdead });
                    self.frees.fetch_add(1, Ordering::Relaxed);
                    *parked = false;
                    self.retired_count.store(0, Ordering::Relaxed);
                }
            }
        }

        loom::model(|| {
            let m = Arc::new(Model {
                slot: Slot::new(),
                memory: UnsafeCell::new(7),
                retired: Mutex::new(false),
                retired_count: AtomicUsize::new(0),
                frees: AtomicUsize::new(0),
            });
            assert!(m.slot.try_fill(1, &entry(1)));
            let holder = {
                let m = m.clone();
                thread::spawn(move || {
                    // SAFETY: loom checks this read against the free.
                    let v = m.memory.with(|p| unsafe { *p });
                    assert_eq!(v, 7, "pinned memory read after free");
                    // `remove_pin`.
                    m.slot.clear();
                    fence(Ordering::SeqCst);
                    if m.retired_count.load(Ordering::Relaxed) != 0 {
                        let mut parked = m.retired.lock().unwrap();
                        m.sweep_locked(&mut parked);
                    }
                })
            };
            // `retire_memory`.
            {
                let mut parked = m.retired.lock().unwrap();
                *parked = true;
                m.retired_count.store(1, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                m.sweep_locked(&mut parked);
            }
            holder.join().unwrap();
            assert_eq!(m.frees.load(Ordering::Relaxed), 1, "freed exactly once");
        });
    }
}
