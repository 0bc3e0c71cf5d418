//! A flat range's dirty-log mask and the marking every write path calls
//! (see `crate::host::dirty_bitmap`).

use std::sync::atomic::Ordering;

use crate::host::dirty_bitmap::{DirtyClient, RangeDirty, TARGET_PAGE_BITS, TARGET_PAGE_SIZE};
use crate::region::region_core::{Backing, RegionKind};
use crate::view::flatview::FlatRange;

/// Sets each range's effective dirty-log mask (QEMU's
/// `memory_region_get_dirty_log_mask`) and, for RAM with a nonzero mask,
/// its marking handle; allocates the clients' bitmaps. Called on every
/// freshly rendered view before it is published.
pub(crate) fn attach(ranges: &mut [FlatRange], global: bool) {
    for r in ranges {
        let (block, offset) = match r.region.backing() {
            Backing::Ram { block, offset } => (block, *offset),
            _ => continue,
        };
        let mut mask = r.attrs.dirty_log_mask;
        if global && r.region.kind() == RegionKind::Ram {
            mask |= DirtyClient::MIGRATION.mask();
        }
        r.attrs.dirty_log_mask = mask;
        let log = block.block().dirty_log();
        let mut m = mask;
        while m != 0 {
            log.ensure(m.trailing_zeros() as u8);
            m &= m - 1;
        }
        if mask == 0 {
            continue;
        }
        // After the bitmaps exist (`mark` skips a client without one), and
        // before the view is published: the new `RangeDirty` counts its
        // clients into the block's `live` mask (dropping it uncounts).
        log.count_range_users(mask, true);
        let single = (mask.count_ones() == 1)
            .then(|| log.bitmap(mask.trailing_zeros() as u8))
            .flatten()
            .and_then(|b| std::ptr::NonNull::new(b.as_ptr().cast_mut()));
        r.dirty = Some(RangeDirty {
            log: log.clone(),
            mask,
            block_offset: offset + r.offset_in_region,
            single,
            pages: log.pages,
        });
    }
}

impl FlatRange {
    /// Marks `[addr, addr + len)` (address-space coordinates, inside the
    /// range) dirty for every client tracking the range; nothing when none
    /// does. What every write path calls after writing RAM.
    #[inline]
    pub fn mark_dirty(&self, addr: u64, len: u64) {
        if let Some(d) = &self.dirty {
            if len == 0 {
                return;
            }
            let off = d.block_offset + (addr - self.start);
            let (first, last) = (off >> TARGET_PAGE_BITS, (off + len - 1) >> TARGET_PAGE_BITS);
            if let (Some(words), true) = (d.single, first == last && first < d.pages) {
                // SAFETY: `words` is the first word of a bitmap of
                // `d.log.pages.div_ceil(64)` words kept alive and in place
                // by `d.log` (see `RangeDirty::single`), and
                // `first < d.pages == d.log.pages` (a block's page count
                // never changes), so word `first / 64` is in it.
                let word = unsafe { &*words.as_ptr().add((first / 64) as usize) };
                let bit = 1u64 << (first % 64);
                if word.load(Ordering::Relaxed) & bit == 0 {
                    word.fetch_or(bit, Ordering::Relaxed);
                }
                return;
            }
            d.log.mark(d.mask, off, len);
        }
    }

    /// Marks the pages set in `bitmap` dirty for every client tracking the
    /// range: bit `i` (little-endian words, KVM's layout) is the page at
    /// `first + i * TARGET_PAGE_SIZE` (address-space coordinates), clipped
    /// to the range. What a listener's `log_sync` uses to merge an external
    /// log (KVM's).
    pub fn mark_dirty_bitmap(&self, first: u64, bitmap: &[u64]) {
        let Some(d) = &self.dirty else { return };
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
                        .mark(d.mask, d.block_offset + (from - self.start), to - from + 1);
                }
            }
        }
    }
}
