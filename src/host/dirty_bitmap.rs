//! Dirty memory tracking: QEMU's dirty-log clients and bitmaps
//! (QEMU `system/physmem.c`, `include/exec/ram_addr.h`).
//!
//! # Clients
//!
//! A [`DirtyClient`] is one consumer of "which pages were written": VGA (a
//! display device watching its own frame buffer, [`crate::Machine::set_log`]),
//! CODE (a translator's code cache), MIGRATION (global tracking, started and
//! stopped with [`crate::Machine::global_dirty_log_start`] / `_stop`,
//! counted: on from the first user's start to the last user's stop), and up
//! to five clients a program defines ([`DirtyClient::custom`]). A flat
//! range's dirty-log mask is QEMU's `memory_region_get_dirty_log_mask`: the
//! region's own clients, plus MIGRATION while global tracking runs when the
//! region is RAM (all of memtree's RAM is migratable; RAM devices and ROM
//! devices are not). The region's own clients are published by the commit
//! into the region core and read at write time, so changing them renders
//! nothing (listeners get `log_start` / `log_stop` for the region's ranges
//! only, `crate::render::listener`); the MIGRATION part is given to each
//! range at render, and global start/stop re-renders every view.
//!
//! # Bitmaps
//!
//! Bits are kept per [`RamBlock`](crate::RamBlock) (QEMU's `ram_addr_t`
//! space), one bit per target page ([`TARGET_PAGE_SIZE`], 4 KiB), one
//! bitmap per client, allocated the first time a region over the block
//! gets that client (at commit) or a range of it is rendered with global
//! tracking, and freed with the block. So:
//!
//! * tracking costs little while no client tracks a range: a write loads
//!   the region's mask (a cache line the write path reads anyway) and
//!   pays one predictable branch;
//! * bitmap memory grows and shrinks with the RAM it covers (one bit per
//!   4 KiB page per client in use: 32 KiB per GiB; the zeroed allocation is
//!   lazily backed by the OS, so untouched bits cost no memory either);
//! * bits belong to memory, never to addresses. A region **moved** while
//!   tracked keeps its bits (the pages written are still the pages
//!   written); a region **unplugged** while tracked takes its bits with it
//!   (a new region at the same addresses has its own block and starts
//!   clean: never stale bits for memory that now belongs to another
//!   region); a region **resized** keeps the bits of the pages it still
//!   covers, and every page beyond its new end is cleared, so growing back
//!   does not resurrect old bits.
//!
//! # Who marks
//!
//! Every write that reaches RAM through memtree marks the pages it touched
//! for every client in the range's mask: dispatch (buffer, typed, rmw,
//! cursor, shared handle), DMA mappings (on unmap, the length written),
//! [`crate::dma::cache`] writes, the vm-memory view (see
//! [`crate::integrations::guest_memory`]), a migration's import and,
//! through `log_sync`, KVM's own log. The writes that do not go through a
//! flat range mark for the union of the clients of every tracked range
//! over their block.
//! Marking is a relaxed `fetch_or`, skipped when the bit is already set, so
//! a page written over and over costs one load after the first write.
//!
//! # Reading and clearing
//!
//! [`crate::Machine::get_dirty`] tests, [`crate::Machine::snapshot_and_clear_dirty`]
//! syncs, copies and clears (QEMU's `memory_region_snapshot_and_clear_dirty`:
//! the range is rounded outwards to 64 pages), and
//! [`crate::Machine::take_dirty_ram`] returns and clears the dirty pages of
//! every RAM region of an address space for one client (what a migration
//! round sends).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Target page size: the granularity of dirty tracking.
pub const TARGET_PAGE_SIZE: u64 = 1 << TARGET_PAGE_BITS;
/// Log2 of [`TARGET_PAGE_SIZE`].
pub const TARGET_PAGE_BITS: u32 = 12;
/// Number of clients a mask can name (a mask is a `u8`).
pub const MAX_CLIENTS: u8 = 8;

/// One consumer of dirty bits (a bit of the dirty-log mask).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct DirtyClient(pub(crate) u8);

impl DirtyClient {
    /// QEMU's `DIRTY_MEMORY_VGA`: a display device's own region.
    pub const VGA: DirtyClient = DirtyClient(0);
    /// QEMU's `DIRTY_MEMORY_CODE`: a translator's code cache.
    pub const CODE: DirtyClient = DirtyClient(1);
    /// QEMU's `DIRTY_MEMORY_MIGRATION`: global tracking.
    pub const MIGRATION: DirtyClient = DirtyClient(2);

    /// A program-defined client, `n` in `3..8`.
    pub fn custom(n: u8) -> Option<DirtyClient> {
        (3..MAX_CLIENTS).contains(&n).then_some(DirtyClient(n))
    }
    /// The client's index (its bit number in a mask).
    pub fn index(self) -> u8 {
        self.0
    }
    /// The client's bit in a dirty-log mask.
    pub fn mask(self) -> u8 {
        1 << self.0
    }
}

/// The dirty bitmaps of one RAM block, one per client, each allocated on
/// first use and freed with the block.
pub(crate) struct BlockDirty {
    pub(crate) pages: u64,
    /// The union of the own masks of the live regions over this block and
    /// of the MIGRATION bit of every range rendered with global tracking
    /// in every view still alive: what writes that do not go through a
    /// flat range (DMA mappings, caches, the vm-memory view) mark, so they
    /// follow tracking started after they were made (QEMU computes the
    /// mask from the region at write time). A client's bit is set while
    /// `range_users` counts a user for it. It may name a client a while
    /// longer (a region no longer mapped, a view not yet reclaimed): an
    /// extra mark is harmless, a missing one is not.
    pub(crate) live: std::sync::atomic::AtomicU8,
    /// Per client, how many users (live [`RangeDirty`] with global bits,
    /// live regions with own clients) over this block name it;
    /// `live` is recomputed under this lock on every change.
    range_users: parking_lot::Mutex<[u32; MAX_CLIENTS as usize]>,
    clients: [OnceLock<Box<[AtomicU64]>>; MAX_CLIENTS as usize],
    /// The first word of each client's bitmap once allocated (null
    /// before): the write path's one-load way to it. A bitmap, once in
    /// `clients`, is never moved or freed before the block's `BlockDirty`.
    first_words: [std::sync::atomic::AtomicPtr<AtomicU64>; MAX_CLIENTS as usize],
}

impl std::fmt::Debug for BlockDirty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used: Vec<usize> = (0..self.clients.len())
            .filter(|&i| self.clients[i].get().is_some())
            .collect();
        write!(f, "BlockDirty({} pages, clients {used:?})", self.pages)
    }
}

impl BlockDirty {
    pub(crate) fn new(size: u64) -> BlockDirty {
        BlockDirty {
            pages: size.div_ceil(TARGET_PAGE_SIZE),
            live: std::sync::atomic::AtomicU8::new(0),
            range_users: parking_lot::Mutex::new([0; MAX_CLIENTS as usize]),
            clients: Default::default(),
            first_words: Default::default(),
        }
    }

    fn words(&self) -> usize {
        self.pages.div_ceil(64) as usize
    }

    /// The client's bitmap, allocated if needed.
    pub(crate) fn ensure(&self, client: u8) -> &[AtomicU64] {
        let bits = self.clients[client as usize]
            .get_or_init(|| (0..self.words()).map(|_| AtomicU64::new(0)).collect());
        // Published after the bitmap is initialised (Release): a reader
        // that sees the pointer sees the zeroed words.
        self.first_words[client as usize].store(bits.as_ptr().cast_mut(), Ordering::Release);
        bits
    }

    /// The word holding page `page`'s bit for `client`, if the client's
    /// bitmap exists and the page is in the block.
    #[inline(always)]
    pub(crate) fn word(&self, client: u8, page: u64) -> Option<&AtomicU64> {
        let first = self
            .first_words
            .get(client as usize)?
            .load(Ordering::Acquire);
        if first.is_null() || page >= self.pages {
            return None;
        }
        // SAFETY: a non-null `first_words[client]` is the first word of
        // the bitmap in `clients[client]` (stored by `ensure` after the
        // `OnceLock` was set, never changed after), which has
        // `pages.div_ceil(64)` words and lives, unmoved, as long as `self`
        // (this borrow); `page < pages`, so word `page / 64` is in it.
        Some(unsafe { &*first.add((page / 64) as usize) })
    }

    pub(crate) fn bitmap(&self, client: u8) -> Option<&[AtomicU64]> {
        self.clients[client as usize].get().map(|b| &**b)
    }

    /// Marks `[offset, offset + len)` of the block for every client of
    /// `mask` (whose bitmaps exist: `attach` allocated them).
    #[inline]
    pub(crate) fn mark(&self, mask: u8, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> TARGET_PAGE_BITS;
        let last = (offset + len - 1) >> TARGET_PAGE_BITS;
        let mut m = mask;
        while m != 0 {
            let c = m.trailing_zeros() as u8;
            m &= m - 1;
            if let Some(bits) = self.bitmap(c) {
                set_bits(bits, first, last.min(self.pages.saturating_sub(1)));
            }
        }
    }

    /// Marks `[offset, offset + len)` for the clients currently tracking
    /// this memory (see `live`); one load and a branch when none does.
    #[inline]
    pub(crate) fn mark_live(&self, offset: u64, len: u64) {
        let mask = self.live.load(Ordering::Relaxed);
        if mask != 0 {
            self.mark(mask, offset, len);
        }
    }

    /// Whether any page of `[first, last]` is dirty for `client`.
    pub(crate) fn any(&self, client: u8, first: u64, last: u64) -> bool {
        let Some(bits) = self.bitmap(client) else {
            return false;
        };
        (first..=last.min(self.pages.saturating_sub(1)))
            .any(|p| bits[(p / 64) as usize].load(Ordering::Relaxed) & (1 << (p % 64)) != 0)
    }

    /// Copies and clears the bits of pages `[first, last]` (`first` a
    /// multiple of 64): word `i` of the result holds pages `first + 64 i ..`.
    pub(crate) fn take(&self, client: u8, first: u64, last: u64) -> Vec<u64> {
        let last = last.min(self.pages.saturating_sub(1));
        let mut out = Vec::new();
        let Some(bits) = self.bitmap(client) else {
            return out;
        };
        if first > last {
            return out;
        }
        let (w0, w1) = ((first / 64) as usize, (last / 64) as usize);
        out.reserve(w1 - w0 + 1);
        for (i, w) in bits[w0..=w1].iter().enumerate() {
            let keep = if w0 + i == w1 && last % 64 != 63 {
                !((1u64 << (last % 64 + 1)) - 1)
            } else {
                0
            };
            // Load first: an all-clean word (the common case) is not written.
            let v = if w.load(Ordering::Relaxed) & !keep != 0 {
                w.fetch_and(keep, Ordering::AcqRel) & !keep
            } else {
                0
            };
            out.push(v);
        }
        out
    }

    /// Clears every bit of pages `[first, ..)` for every client (a region
    /// shrank: the pages past its end are no longer its memory).
    pub(crate) fn clear_from(&self, first: u64) {
        for c in 0..MAX_CLIENTS {
            if self.bitmap(c).is_some() {
                let _ = self.take_unaligned(c, first, u64::MAX);
            }
        }
    }
}

#[inline]
fn set_bits(bits: &[AtomicU64], first: u64, last: u64) {
    if first > last {
        return;
    }
    let (w0, w1) = ((first / 64) as usize, (last / 64) as usize);
    for (i, word) in bits[w0..=w1].iter().enumerate() {
        let w = w0 + i;
        let lo = if w == w0 { first % 64 } else { 0 };
        let hi = if w == w1 { last % 64 } else { 63 };
        let m = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
        // A page written again costs one load, not a locked instruction.
        if word.load(Ordering::Relaxed) & m != m {
            word.fetch_or(m, Ordering::Relaxed);
        }
    }
}

/// What a flat range of RAM knows to mark its writes: the block's
/// bitmaps, where the range starts in the block, and the MIGRATION bit
/// global tracking gave it at render. The region's own clients are not
/// here: they are read from the region core at write time
/// (`RegionCore::dirty_log_mask`), so a mask change needs no new view.
/// Each one alive (clones included) counts `global` into the block's
/// `live` mask; each region counts its own clients.
#[derive(Debug)]
pub(crate) struct RangeDirty {
    pub(crate) log: Arc<BlockDirty>,
    /// MIGRATION when the range was rendered while global tracking ran
    /// (the region is RAM), else 0.
    pub(crate) global: u8,
    pub(crate) block_offset: u64,
}

impl RangeDirty {
    /// A range's handle; counts `global` into the block.
    pub(crate) fn new(log: &Arc<BlockDirty>, global: u8, block_offset: u64) -> RangeDirty {
        if global != 0 {
            log.count_range_users(global, true);
        }
        RangeDirty {
            log: log.clone(),
            global,
            block_offset,
        }
    }
}

impl Clone for RangeDirty {
    fn clone(&self) -> RangeDirty {
        RangeDirty::new(&self.log, self.global, self.block_offset)
    }
}

impl Drop for RangeDirty {
    fn drop(&mut self) {
        if self.global != 0 {
            self.log.count_range_users(self.global, false);
        }
    }
}

impl BlockDirty {
    /// One user of the clients of `mask` (a range rendered with global
    /// tracking, or a region with its own clients) appears (`add`) or
    /// goes; recomputes `live` from the counts.
    pub(crate) fn count_range_users(&self, mask: u8, add: bool) {
        let mut users = self.range_users.lock();
        let mut live = 0u8;
        for (c, n) in users.iter_mut().enumerate() {
            if mask & (1 << c) != 0 {
                *n = if add {
                    n.saturating_add(1)
                } else {
                    n.saturating_sub(1)
                };
            }
            if *n > 0 {
                live |= 1 << c;
            }
        }
        self.live.store(live, Ordering::Release);
    }
}

impl BlockDirty {
    /// Takes pages `[lo, hi]` (any alignment) and returns their numbers.
    pub(crate) fn take_unaligned(&self, client: u8, lo: u64, hi: u64) -> Vec<u64> {
        let Some(bits) = self.bitmap(client) else {
            return Vec::new();
        };
        let hi = hi.min(self.pages.saturating_sub(1));
        let mut out = Vec::new();
        let mut p = lo;
        while p <= hi {
            let w = (p / 64) as usize;
            let lo_b = p % 64;
            let hi_b = if hi / 64 == p / 64 { hi % 64 } else { 63 };
            let m = (u64::MAX >> (63 - hi_b)) & (u64::MAX << lo_b);
            if bits[w].load(Ordering::Relaxed) & m != 0 {
                let mut v = bits[w].fetch_and(!m, Ordering::AcqRel) & m;
                while v != 0 {
                    out.push(w as u64 * 64 + u64::from(v.trailing_zeros()));
                    v &= v - 1;
                }
            }
            p = (w as u64 + 1) * 64;
        }
        out
    }
}

/// The bitmap of the vm-memory view's regions ([`crate::integrations::guest_memory`]):
/// vm-memory calls `mark_dirty` for every write through a `VolatileSlice`
/// or `Bytes` method, and it marks the pages for the clients tracking the
/// memory at that moment.
#[cfg(all(feature = "vm-memory", unix))]
#[derive(Clone, Debug)]
pub struct RamDirtyBitmap {
    log: Arc<BlockDirty>,
    base: u64,
}

/// A [`RamDirtyBitmap`] from some offset on (vm-memory's bitmap slice).
#[cfg(all(feature = "vm-memory", unix))]
#[derive(Clone, Copy, Debug)]
pub struct RamDirtySlice<'a> {
    log: &'a BlockDirty,
    base: u64,
}

#[cfg(all(feature = "vm-memory", unix))]
mod vm_bitmap {
    use super::*;
    use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};

    impl RamDirtyBitmap {
        pub(crate) fn new(log: Arc<BlockDirty>, base: u64) -> RamDirtyBitmap {
            RamDirtyBitmap { log, base }
        }
        pub(crate) fn slice(&self) -> RamDirtySlice<'_> {
            RamDirtySlice {
                log: &self.log,
                base: self.base,
            }
        }
    }

    fn dirty_at(log: &BlockDirty, offset: u64) -> bool {
        let p = offset >> TARGET_PAGE_BITS;
        (0..MAX_CLIENTS).any(|c| log.any(c, p, p))
    }

    /// A bitmap that tracks nothing: for vm-memory APIs that want one for
    /// an address range that is not memtree RAM, such as the I/O virtual
    /// addresses of vm-memory's `IommuMemory` (writes there are marked when
    /// they reach RAM, by the RAM's own bitmap).
    impl Default for RamDirtyBitmap {
        fn default() -> RamDirtyBitmap {
            RamDirtyBitmap::new(Arc::new(BlockDirty::new(0)), 0)
        }
    }

    impl<'a> WithBitmapSlice<'a> for RamDirtyBitmap {
        type S = RamDirtySlice<'a>;
    }

    impl Bitmap for RamDirtyBitmap {
        fn mark_dirty(&self, offset: usize, len: usize) {
            self.slice().mark_dirty(offset, len)
        }
        fn dirty_at(&self, offset: usize) -> bool {
            dirty_at(&self.log, self.base + offset as u64)
        }
        fn slice_at(&self, offset: usize) -> RamDirtySlice<'_> {
            self.slice().slice_at(offset)
        }
    }

    impl<'b> WithBitmapSlice<'b> for RamDirtySlice<'_> {
        type S = Self;
    }

    impl BitmapSlice for RamDirtySlice<'_> {}

    impl Bitmap for RamDirtySlice<'_> {
        fn mark_dirty(&self, offset: usize, len: usize) {
            self.log.mark_live(self.base + offset as u64, len as u64);
        }
        fn dirty_at(&self, offset: usize) -> bool {
            dirty_at(self.log, self.base + offset as u64)
        }
        fn slice_at(&self, offset: usize) -> Self {
            RamDirtySlice {
                log: self.log,
                base: self.base + offset as u64,
            }
        }
    }
}
