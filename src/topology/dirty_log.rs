//! Dirty-log control: `Machine::set_log`, global start/stop, reading and
//! clearing dirty pages (the bitmaps and their rules are
//! `crate::host::dirty_bitmap`).

use std::sync::Arc;

use crate::host::dirty_bitmap::{DirtyClient, TARGET_PAGE_BITS, TARGET_PAGE_SIZE};
use crate::region::ids::RegionId;
use crate::region::region_core::Backing;

/// The result of [`crate::Machine::snapshot_and_clear_dirty`] (QEMU's
/// `DirtyBitmapSnapshot`): the dirty pages of a region range at the time of
/// the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySnapshot {
    /// Region offset of the first page the snapshot covers (a multiple of
    /// 64 pages).
    start: u64,
    /// One bit per page from `start`.
    words: Vec<u64>,
}

impl DirtySnapshot {
    /// QEMU's `memory_region_snapshot_get_dirty`: whether any page of
    /// `[offset, offset + len)` (region offsets) was dirty.
    pub fn get_dirty(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let first = offset / TARGET_PAGE_SIZE;
        let last = (offset + len - 1) / TARGET_PAGE_SIZE;
        (first..=last).any(|p| self.page(p))
    }

    fn page(&self, p: u64) -> bool {
        let Some(i) = p.checked_sub(self.start / TARGET_PAGE_SIZE) else {
            return false;
        };
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Region offsets of the dirty pages, ascending.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        let base = self.start;
        self.words.iter().enumerate().flat_map(move |(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = u64::from(w.trailing_zeros());
                w &= w - 1;
                Some(base + (wi as u64 * 64 + b) * TARGET_PAGE_SIZE)
            })
        })
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// The RAM of a region as tracking sees it: its block and where the region
/// starts in it.
pub(crate) fn region_block(
    core: &crate::region::region_core::RegionCore,
) -> Option<(&Arc<crate::host::backend::MemoryBackend>, u64)> {
    match core.backing() {
        Backing::Ram { block, offset } => Some((block, *offset)),
        _ => None,
    }
}

/// Tests a region range (region offsets) for a client.
pub(crate) fn region_get_dirty(
    core: &crate::region::region_core::RegionCore,
    offset: u64,
    len: u64,
    client: DirtyClient,
) -> bool {
    let Some((block, base)) = region_block(core) else {
        return false;
    };
    if len == 0 {
        return false;
    }
    let a = base + offset;
    block.block().dirty_log().any(
        client.0,
        a >> TARGET_PAGE_BITS,
        (a + len - 1) >> TARGET_PAGE_BITS,
    )
}

/// Copies and clears a region range (region offsets, rounded outwards to
/// 64 pages as QEMU does) for a client.
pub(crate) fn region_take(
    core: &crate::region::region_core::RegionCore,
    size: u64,
    offset: u64,
    len: u64,
    client: DirtyClient,
) -> DirtySnapshot {
    let empty = DirtySnapshot {
        start: 0,
        words: Vec::new(),
    };
    let Some((block, base)) = region_block(core) else {
        return empty;
    };
    let end = offset.saturating_add(len).min(size);
    if len == 0 || offset >= end {
        return empty;
    }
    // Round outwards to 64 pages of the *region*; the block offset of the
    // region need not be 64-page aligned, so take bit by bit where it is not.
    let first_page = (offset / TARGET_PAGE_SIZE) & !63;
    let last_page = ((end - 1) / TARGET_PAGE_SIZE) | 63;
    let last_page = last_page.min((size - 1) / TARGET_PAGE_SIZE);
    let log = block.block().dirty_log();
    let base_page = base / TARGET_PAGE_SIZE;
    let n = (last_page - first_page + 1).div_ceil(64) as usize;
    let mut words = vec![0u64; n];
    if base_page % 64 == 0 {
        let got = log.take(client.0, base_page + first_page, base_page + last_page);
        for (i, w) in got.into_iter().enumerate() {
            words[i] = w;
        }
    } else {
        // Unaligned block offset: take the enclosing words and shift.
        let lo = base_page + first_page;
        let hi = base_page + last_page;
        let got = log.take_unaligned(client.0, lo, hi);
        for p in got {
            let i = p - lo;
            words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }
    DirtySnapshot {
        start: first_page * TARGET_PAGE_SIZE,
        words,
    }
}

/// One RAM region of an address space with the dirty pages
/// [`crate::Machine::take_dirty_ram`] took from it.
#[derive(Debug, Clone)]
pub struct RegionDirtyPages {
    /// The region.
    pub region: RegionId,
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its dirty pages.
    pub dirty: DirtySnapshot,
}

type Result<T> = std::result::Result<T, crate::TopologyError>;

impl crate::Machine {
    /// The core and size of a RAM region, or why not.
    fn ram_region(
        &self,
        id: RegionId,
    ) -> Result<(Arc<crate::region::region_core::RegionCore>, u64)> {
        self.read(|t| {
            let n = t.get(id)?;
            if region_block(&n.core).is_none() {
                return Err(crate::TopologyError::WrongKind {
                    region: n.name().to_owned(),
                    expected: "RAM",
                });
            }
            Ok((n.core.clone(), u64::try_from(n.size).unwrap_or(u64::MAX)))
        })
    }

    /// QEMU's `memory_region_set_log`: a user of `client` starts (`on`) or
    /// stops tracking `region`. Counted like QEMU's `vga_logging_count`:
    /// the client's bit in the region's mask is set by the first user and
    /// cleared by the last one, and only those transitions reach listeners
    /// (`log_start` / `log_stop` at the commit, for each range of the
    /// region in each space that shows it; nothing is rendered: flat
    /// ranges read their region's mask, and writes mark for the new mask
    /// from the commit on); two display devices
    /// watching one frame buffer each call it once, and one stopping leaves
    /// logging on for the other. On an alias it counts on the region the
    /// alias points to (QEMU forwards it). Any client but MIGRATION, which
    /// is global ([`crate::Machine::global_dirty_log_start`]). Stopping a
    /// client no user started is an error (QEMU's counter would wrap).
    /// [`crate::Machine::set_dirty_log_mask`] sets the mask directly and
    /// does not touch the counts.
    pub fn set_log(&self, region: RegionId, client: DirtyClient, on: bool) -> Result<()> {
        if client == DirtyClient::MIGRATION {
            let name = self.region_info(region)?.name;
            return Err(crate::TopologyError::WrongKind {
                region: name,
                expected: "tracked by a per-region client (MIGRATION is global)",
            });
        }
        self.edit(|t| {
            // Follow aliases. A chain ends: an alias's target exists before
            // the alias and never changes, so there is no cycle.
            let mut target = region;
            while let Some(next) = t.get(target)?.alias_target {
                target = next;
            }
            let bit = client.mask();
            let n = t.node_mut(target)?;
            let users = &mut n.dirty_log_users[usize::from(client.0)];
            let now = match (on, *users) {
                (true, u) => u.checked_add(1),
                (false, 0) => None,
                (false, u) => Some(u - 1),
            };
            let Some(now) = now else {
                return Err(crate::TopologyError::WrongKind {
                    region: n.name().to_owned(),
                    expected: if on {
                        "fewer than 2^32 users of a dirty-log client"
                    } else {
                        "logged by this client (set_log(false) without a matching set_log(true))"
                    },
                });
            };
            *users = now;
            let mask = n.dirty_log_mask;
            let new = if now > 0 { mask | bit } else { mask & !bit };
            if new != mask {
                edit_mask(t, target, new)?;
            }
            Ok(())
        })
    }

    /// Whether any page of `[offset, offset + len)` of RAM region `region`
    /// is dirty for `client` (no sync: see [`crate::Machine::dirty_log_sync`]).
    pub fn get_dirty(
        &self,
        region: RegionId,
        offset: u64,
        len: u64,
        client: DirtyClient,
    ) -> Result<bool> {
        let (core, _) = self.ram_region(region)?;
        Ok(region_get_dirty(&core, offset, len, client))
    }

    /// QEMU's `memory_global_dirty_log_sync`: every listener's `log_sync`
    /// for every range with a nonzero mask (KVM merges its log here).
    pub fn dirty_log_sync(&self) -> Result<()> {
        self.each_logging_section(None, "log_sync", |l, s| l.log_sync(s))
    }

    /// QEMU's `memory_region_snapshot_and_clear_dirty`: syncs the region's
    /// ranges (`log_sync`), atomically copies and clears `client`'s bits of
    /// `[offset, offset + len)` rounded outwards to 64 pages, then tells
    /// listeners (`log_clear`) for every range of the region that overlaps.
    pub fn snapshot_and_clear_dirty(
        &self,
        region: RegionId,
        offset: u64,
        len: u64,
        client: DirtyClient,
    ) -> Result<DirtySnapshot> {
        let (core, size) = self.ram_region(region)?;
        self.each_logging_section(Some(region), "log_sync", |l, s| l.log_sync(s))?;
        let snap = region_take(&core, size, offset, len, client);
        if snap.words.is_empty() {
            return Ok(snap);
        }
        let (lo, hi) = (
            snap.start,
            snap.start + snap.words.len() as u64 * 64 * TARGET_PAGE_SIZE,
        );
        self.each_logging_section(Some(region), "log_clear", |l, s| {
            let r = s.range;
            let (a, b) = (r.offset_in_region(), r.offset_in_region() as u128 + r.len());
            let from = a.max(lo);
            let to = (b.min(u128::from(hi))) as u64;
            if from < to {
                l.log_clear(s, from - a, to - from);
            }
        })?;
        Ok(snap)
    }

    /// The migration-oriented pass over an address space's RAM: syncs
    /// (`log_sync`), then for every RAM region the space's view reaches
    /// (in address order of first appearance, each once), takes and clears
    /// `client`'s dirty pages of the whole region.
    pub fn take_dirty_ram(
        &self,
        space: crate::SpaceId,
        client: DirtyClient,
    ) -> Result<Vec<RegionDirtyPages>> {
        self.dirty_log_sync()?;
        let view = self.address_space(space)?.view();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for r in view.iter() {
            let core = r.region();
            if r.attrs().region_type != crate::RegionType::Ram || region_block(core).is_none() {
                continue;
            }
            if !seen.insert(core.id()) {
                continue;
            }
            let (core, size) = self.ram_region(core.id())?;
            out.push(RegionDirtyPages {
                region: core.id(),
                name: core.name().to_owned(),
                size,
                dirty: region_take(&core, size, 0, size, client),
            });
        }
        Ok(out)
    }
}

/// Edits `region`'s own dirty-log mask. Not a render input (a flat range
/// reads its region's mask, `FlatRange::dirty_log_mask`): nothing is
/// marked for re-render; the commit publishes the mask and tells the
/// spaces that show the region ([`publish_masks`]).
pub(crate) fn edit_mask(
    t: &mut crate::topology::tree::Topology,
    region: RegionId,
    mask: u8,
) -> Result<()> {
    let n = t.node_mut(region)?;
    if n.dirty_log_mask != mask {
        n.dirty_log_mask = mask;
        // Until the commit, the core's mask is what listeners last heard.
        let told = n.core.dirty_log_mask();
        // Clients added are marked for at once, as QEMU's write path reads
        // the region's mask at write time: a write between this edit and
        // the commit is marked. (Removals wait for the commit: an extra
        // mark is harmless.)
        let added = mask & !told;
        if added != 0 {
            n.core.publish_dirty_log_mask(told | added);
        }
        t.listeners.note_log_mask(region, told);
    }
    Ok(())
}

/// At commit: publishes the edited masks of `regions` (those still alive)
/// to their region cores, where writes and flat ranges read them, and
/// returns the ones that changed with the mask listeners last heard.
/// Called before any listener callback, so a write from `log_start` on is
/// marked for the new clients.
pub(crate) fn publish_masks(
    t: &crate::topology::tree::Topology,
    regions: &[(RegionId, u8)],
) -> crate::render::listener::LogChanges {
    let mut old: Vec<(RegionId, u8)> = regions
        .iter()
        .filter_map(|&(r, told)| {
            let n = t.get(r).ok()?;
            n.core.publish_dirty_log_mask(n.dirty_log_mask);
            (told != n.dirty_log_mask).then_some((r, told))
        })
        .collect();
    old.sort_unstable_by_key(|&(r, _)| r);
    crate::render::listener::LogChanges { old }
}

/// After a RAM region was resized: the pages of its block past the new end
/// lose their bits (module docs, "Bitmaps").
pub(crate) fn after_resize(machine: &crate::Machine, region: RegionId, size: u128) {
    if let Ok((core, _)) = machine.ram_region(region) {
        if let Some((block, base)) = region_block(&core) {
            let end = u128::from(base) + size;
            let first = end.div_ceil(u128::from(TARGET_PAGE_SIZE));
            if let Ok(first) = u64::try_from(first) {
                block.block().dirty_log().clear_from(first);
            }
        }
    }
}
