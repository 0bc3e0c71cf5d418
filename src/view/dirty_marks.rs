//! A flat range's dirty-log mask and the marking every write path calls
//! (see `crate::host::dirty_bitmap`).

use std::sync::atomic::Ordering;

use crate::host::dirty_bitmap::{DirtyClient, RangeDirty, TARGET_PAGE_BITS, TARGET_PAGE_SIZE};
use crate::region::region_core::{Backing, RegionKind};
use crate::view::flatview::FlatRange;

/// Gives each range of RAM its marking handle (QEMU's
/// `memory_region_get_dirty_log_mask` is then the region's own clients,
/// read at write time, plus MIGRATION when `global` tracking runs and the
/// region is RAM, fixed here) and allocates the MIGRATION bitmap. Called on
/// every freshly rendered range before its view is published.
pub(crate) fn attach(ranges: &mut [FlatRange], global: bool) {
    for r in ranges {
        let (block, offset) = match r.region.backing() {
            Backing::Ram { block, offset } => (block, *offset),
            _ => continue,
        };
        let global = if global && r.region.kind() == RegionKind::Ram {
            DirtyClient::MIGRATION.mask()
        } else {
            0
        };
        let log = block.block().dirty_log();
        if global != 0 {
            // Before the view is published (`mark` skips a client without
            // a bitmap); the handle counts MIGRATION into the block's
            // `live` mask while it lives.
            log.ensure(DirtyClient::MIGRATION.index());
        }
        r.dirty = Some(RangeDirty::new(log, global, offset + r.offset_in_region));
    }
}

impl FlatRange {
    /// The range's dirty-log mask now (QEMU's
    /// `memory_region_get_dirty_log_mask`): its region's own clients as of
    /// the last commit, plus MIGRATION if the range was rendered while
    /// global tracking ran. The own clients are read from the region, not
    /// fixed at render: a commit that changes only them publishes no new
    /// view, and every view showing the region (older ones included)
    /// reports, and marks for, the new mask from that commit on.
    #[inline]
    pub fn dirty_log_mask(&self) -> u8 {
        self.region.dirty_log_mask() | self.dirty.as_ref().map_or(0, |d| d.global)
    }

    /// The MIGRATION bit global tracking gave the range at render (0 if
    /// none): the part of [`FlatRange::dirty_log_mask`] a view fixes.
    pub(crate) fn global_log_mask(&self) -> u8 {
        self.dirty.as_ref().map_or(0, |d| d.global)
    }

    /// Marks `[addr, addr + len)` (address-space coordinates, inside the
    /// range) dirty for every client tracking the range; nothing when none
    /// does. What every write path calls after writing RAM.
    #[inline]
    pub fn mark_dirty(&self, addr: u64, len: u64) {
        if let Some(d) = &self.dirty {
            let mask = self.region.dirty_log_mask() | d.global;
            if mask == 0 || len == 0 {
                return;
            }
            let off = d.block_offset + (addr - self.start);
            let (first, last) = (off >> TARGET_PAGE_BITS, (off + len - 1) >> TARGET_PAGE_BITS);
            if mask.is_power_of_two() && first == last {
                // The common one-page write for one client: one word.
                if let Some(word) = d.log.word(mask.trailing_zeros() as u8, first) {
                    let bit = 1u64 << (first % 64);
                    if word.load(Ordering::Relaxed) & bit == 0 {
                        word.fetch_or(bit, Ordering::Relaxed);
                    }
                }
                return;
            }
            d.log.mark(mask, off, len);
        }
    }

    /// Marks the pages set in `bitmap` dirty for every client tracking the
    /// range: bit `i` (little-endian words, KVM's layout) is the page at
    /// `first + i * TARGET_PAGE_SIZE` (address-space coordinates), clipped
    /// to the range. What a listener's `log_sync` uses to merge an external
    /// log (KVM's).
    pub fn mark_dirty_bitmap(&self, first: u64, bitmap: &[u64]) {
        let Some(d) = &self.dirty else { return };
        let mask = self.dirty_log_mask();
        for (wi, &w) in bitmap.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = u64::from(w.trailing_zeros());
                w &= w - 1;
                let Some(a) = (wi as u64 * 64 + b)
                    .checked_mul(TARGET_PAGE_SIZE)
                    .and_then(|o| first.checked_add(o))
                else {
                    break;
                };
                let from = a.max(self.start);
                let to = a.saturating_add(TARGET_PAGE_SIZE - 1).min(self.last);
                if from <= to && a <= self.last {
                    d.log
                        .mark(mask, d.block_offset + (from - self.start), to - from + 1);
                }
            }
        }
    }
}
