//! Flat views: the immutable, rendered form of an address space.
//!
//! A [`FlatView`] is a sorted sequence of disjoint [`FlatRange`]s, each naming
//! the terminating region that serves it. It is built by `crate::render` (a
//! full render, or a splice of re-rendered windows into the previous view
//! that shares every chunk of ranges it did not change: see [`FlatView`],
//! "Representation"), published into address spaces with an atomic pointer
//! swap, and never changed afterwards: vCPU threads read it without locks.
//!
//! # Invariants
//!
//! * Ranges are sorted by `start`, non-empty, disjoint, and inside
//!   `[0, 2^64)`; `last` is inclusive so a range can end at `u64::MAX`.
//! * Adjacent ranges that QEMU's merge rule would join are joined (same
//!   region at consecutive offsets, equal attributes: `flatview_simplify`).
//! * A range holds its region's [`RegionCore`] strongly; for directly
//!   readable RAM it also caches the host address of `start`, valid as long as
//!   the range (and so the core and its backend) is alive.

use std::sync::Arc;

use crate::lifecycle::census::{Census, ObjectKey, ObjectKind};
use crate::region::ids::RegionId;
use crate::region::region_core::{Backing, RegionCore, RegionKind};

/// The type QEMU prints for a region (`memory_region_type`, QEMU 7.2 rules).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum RegionType {
    /// `ram`
    Ram,
    /// `rom`: RAM that is readonly.
    Rom,
    /// `romd`: ROM device in romd mode.
    Romd,
    /// `ramd`: RAM device.
    Ramd,
    /// `i/o`: everything else.
    Io,
}

impl RegionType {
    /// The printed form.
    pub fn as_str(self) -> &'static str {
        match self {
            RegionType::Ram => "ram",
            RegionType::Rom => "rom",
            RegionType::Romd => "romd",
            RegionType::Ramd => "ramd",
            RegionType::Io => "i/o",
        }
    }

    /// QEMU 7.2 `memory_region_type` for a terminating or container region
    /// with these attributes.
    pub fn of(kind: RegionKind, readonly: bool, romd_mode: bool) -> RegionType {
        match kind {
            RegionKind::RamDevice => RegionType::Ramd,
            RegionKind::RomDevice if romd_mode => RegionType::Romd,
            RegionKind::Ram if readonly => RegionType::Rom,
            RegionKind::Ram => RegionType::Ram,
            _ => RegionType::Io,
        }
    }
}

/// Attributes of a flat range, propagated down the render path or copied from
/// the terminating region when the view was rendered.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RangeAttrs {
    /// Propagated readonly (the region's or any container/alias above it).
    pub readonly: bool,
    /// Propagated nonvolatile.
    pub nonvolatile: bool,
    /// Propagated unmergeable.
    pub unmergeable: bool,
    /// The region's romd mode at render time.
    pub romd_mode: bool,
    /// The terminating region's *own* readonly flag: QEMU 7.2 decides whether
    /// a write goes straight to RAM from this, not from the propagated flag.
    pub region_readonly: bool,
    /// The terminating region's priority field (what `info mtree -f` prints).
    pub priority: i32,
    /// The terminating region's own type (before readonly propagation).
    pub region_type: RegionType,
}

/// One contiguous piece of an address space served by one region.
pub struct FlatRange {
    pub(crate) start: u64,
    pub(crate) last: u64,
    pub(crate) offset_in_region: u64,
    pub(crate) region: Arc<RegionCore>,
    pub(crate) attrs: RangeAttrs,
    /// Host address of `start` when reads of this range go straight to host
    /// memory (RAM, or a ROM device in romd mode); null otherwise.
    pub(crate) host: *mut u8,
    /// How writes mark dirty pages: set at render for every range of RAM
    /// by `crate::view::dirty_marks::attach` (`None` for other ranges);
    /// whether a write marks is decided at write time from the region's
    /// mask ([`FlatRange::dirty_log_mask`]).
    pub(crate) dirty: Option<crate::host::dirty_bitmap::RangeDirty>,
}

// SAFETY: `host` points into the memory backend held (through `region`) by
// this range; the backend is `Send + Sync` and the pointer is only used for
// raw copies that tolerate concurrent access, like the backend's own methods.
unsafe impl Send for FlatRange {}
// SAFETY: as above; a `FlatRange` is immutable.
unsafe impl Sync for FlatRange {}

impl FlatRange {
    /// First address of the range.
    pub fn start(&self) -> u64 {
        self.start
    }
    /// Last address of the range (inclusive).
    pub fn last(&self) -> u64 {
        self.last
    }
    /// Length in bytes (up to 2^64).
    pub fn len(&self) -> u128 {
        u128::from(self.last - self.start) + 1
    }
    /// Never true: ranges are non-empty. Present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Offset of `start` inside the region.
    pub fn offset_in_region(&self) -> u64 {
        self.offset_in_region
    }
    /// The region that serves this range.
    pub fn region(&self) -> &Arc<RegionCore> {
        &self.region
    }
    /// Propagated attributes.
    pub fn attrs(&self) -> &RangeAttrs {
        &self.attrs
    }
    /// The type `info mtree -f` prints: `rom` if the range is readonly,
    /// otherwise the region's own type.
    pub fn printed_type(&self) -> RegionType {
        if self.attrs.readonly {
            RegionType::Rom
        } else {
            self.attrs.region_type
        }
    }
    /// Whether reads go straight to host memory.
    pub fn is_direct_read(&self) -> bool {
        !self.host.is_null()
    }
    /// QEMU 7.2: writes go straight to RAM iff the region is RAM (not a RAM
    /// device, not a ROM device) and not readonly *itself*.
    pub fn is_direct_write(&self) -> bool {
        !self.host.is_null() && self.region.kind() == RegionKind::Ram && !self.attrs.region_readonly
    }
    /// Host address of `addr` (which must lie in the range) for direct access.
    #[inline]
    pub(crate) fn host_at(&self, addr: u64) -> *mut u8 {
        // The offset is below the range length, which the backend covers.
        self.host.wrapping_add((addr - self.start) as usize)
    }
    /// Whether `addr` lies in the range.
    #[inline]
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr <= self.last
    }

    /// A copy sharing the region (and so the cached host address).
    pub(crate) fn share(&self) -> FlatRange {
        FlatRange {
            start: self.start,
            last: self.last,
            offset_in_region: self.offset_in_region,
            region: Arc::clone(&self.region),
            attrs: self.attrs,
            host: self.host,
            dirty: self.dirty.clone(),
        }
    }

    /// Whether `self` and `next` (which starts right after `self`) are the
    /// same rendered thing: same region, same attributes, contiguous offsets.
    /// QEMU's merge rule joins them unless they are unmergeable.
    pub(crate) fn continues_into(&self, next: &FlatRange) -> bool {
        self.last.checked_add(1) == Some(next.start)
            && Arc::ptr_eq(&self.region, &next.region)
            && self.attrs == next.attrs
            && u128::from(self.offset_in_region) + u128::from(self.last - self.start) + 1
                == u128::from(next.offset_in_region)
    }

    pub(crate) fn new(
        start: u64,
        last: u64,
        offset_in_region: u64,
        region: Arc<RegionCore>,
        attrs: RangeAttrs,
    ) -> FlatRange {
        let host = match region.backing() {
            Backing::Ram { block, offset } => block
                .host_addr()
                .wrapping_add((offset + offset_in_region) as usize),
            Backing::RomDevice { block, .. } if attrs.romd_mode => {
                block.host_addr().wrapping_add(offset_in_region as usize)
            }
            _ => std::ptr::null_mut(),
        };
        FlatRange {
            start,
            last,
            offset_in_region,
            region,
            attrs,
            host,
            dirty: None,
        }
    }
}

impl std::fmt::Debug for FlatRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:016x}-{:016x} {} @{:#x} {:?}",
            self.start,
            self.last,
            self.region.name(),
            self.offset_in_region,
            self.attrs
        )
    }
}

/// Ranges a leaf is cut to when ranges are packed into leaves.
const LEAF_TARGET: usize = 32;
/// A leaf never holds more ranges than this.
const LEAF_MAX: usize = 64;
/// A splice leaves no leaf smaller than this inside the view (it takes in
/// the next leaf's ranges instead); only the view's last leaf may be.
const LEAF_MIN: usize = 16;
/// Leaves per group, same rules as for ranges per leaf.
const GROUP_TARGET: usize = 32;
const GROUP_MAX: usize = 64;
const GROUP_MIN: usize = 16;

/// A chunk of consecutive ranges (at most [`LEAF_MAX`]) with its own lookup
/// index. Immutable once built and shared by every view whose splice did
/// not touch it.
pub(crate) struct Leaf {
    ranges: Box<[FlatRange]>,
    index: crate::view::range_index::RangeIndex,
    /// The leaf's census entry (holding its regions), registered when a
    /// view of more than one leaf first holds it.
    census: CensusCell,
}

/// A census entry registered on demand and finalized on drop.
#[derive(Default)]
struct CensusCell(std::sync::OnceLock<(Arc<Census>, ObjectKey)>);

impl CensusCell {
    fn key(&self, census: &Arc<Census>, register: impl FnOnce() -> ObjectKey) -> ObjectKey {
        self.0.get_or_init(|| (census.clone(), register())).1
    }
}

impl Drop for CensusCell {
    fn drop(&mut self) {
        if let Some((census, key)) = self.0.get() {
            census.finalize(*key);
        }
    }
}

/// Name of the census entry of a part of a view of `root`.
fn part_name(root: &str, first: Option<&FlatRange>, last: Option<&FlatRange>) -> String {
    format!(
        "{root} ranges {:#x}-{:#x}",
        first.map_or(0, |r| r.start),
        last.map_or(0, |r| r.last)
    )
}

impl Leaf {
    fn new(ranges: Vec<FlatRange>) -> Arc<Leaf> {
        let index =
            crate::view::range_index::RangeIndex::new(ranges.iter().map(|r| r.start).collect());
        Arc::new(Leaf {
            ranges: ranges.into_boxed_slice(),
            index,
            census: CensusCell::default(),
        })
    }

    fn census_key(&self, census: &Arc<Census>, root: &str) -> ObjectKey {
        self.census.key(census, || {
            let mut held: Vec<ObjectKey> =
                self.ranges.iter().map(|r| r.region.census_key()).collect();
            held.sort_unstable();
            held.dedup();
            let name = part_name(root, self.ranges.first(), self.ranges.last());
            census.register_holding(ObjectKind::FlatView, &name, held)
        })
    }

    fn first_start(&self) -> u64 {
        self.ranges.first().map_or(0, |r| r.start)
    }

    #[inline]
    fn lookup(&self, addr: u64) -> Option<(usize, &FlatRange)> {
        let i = self.index.last_start_at_or_below(addr)?;
        let r = self.ranges.get(i)?;
        (addr <= r.last).then_some((i, r))
    }
}

/// Consecutive leaves (at most [`GROUP_MAX`]) with an index over their first
/// starts and the running count of ranges. Shared like leaves.
pub(crate) struct Group {
    leaves: Box<[Arc<Leaf>]>,
    /// `ends[i]`: ranges in `leaves[..=i]`.
    ends: Box<[usize]>,
    index: crate::view::range_index::RangeIndex,
    /// The group's census entry (holding its leaves' entries), registered
    /// when a view of more than one group first holds it.
    census: CensusCell,
}

impl Group {
    fn new(leaves: Vec<Arc<Leaf>>) -> Arc<Group> {
        let index = crate::view::range_index::RangeIndex::new(
            leaves.iter().map(|l| l.first_start()).collect(),
        );
        let mut n = 0;
        let ends = leaves
            .iter()
            .map(|l| {
                n += l.ranges.len();
                n
            })
            .collect();
        Arc::new(Group {
            leaves: leaves.into_boxed_slice(),
            ends,
            index,
            census: CensusCell::default(),
        })
    }

    /// Census keys of the leaves (registering those not yet registered).
    fn leaf_keys(&self, census: &Arc<Census>, root: &str) -> Vec<ObjectKey> {
        self.leaves
            .iter()
            .map(|l| l.census_key(census, root))
            .collect()
    }

    fn census_key(&self, census: &Arc<Census>, root: &str) -> ObjectKey {
        self.census.key(census, || {
            let held = self.leaf_keys(census, root);
            let first = self.leaves.first().and_then(|l| l.ranges.first());
            let last = self.leaves.last().and_then(|l| l.ranges.last());
            census.register_holding(ObjectKind::FlatView, &part_name(root, first, last), held)
        })
    }

    fn len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    fn first_start(&self) -> u64 {
        self.leaves.first().map_or(0, |l| l.first_start())
    }

    /// Index of the leaf that may hold `addr`.
    #[inline]
    fn leaf_at(&self, addr: u64) -> Option<usize> {
        if self.leaves.len() == 1 {
            return Some(0);
        }
        self.index.last_start_at_or_below(addr)
    }

    fn leaf_base(&self, li: usize) -> usize {
        li.checked_sub(1).map_or(0, |p| self.ends[p])
    }
}

/// One replaced stretch of a view: the ranges at old positions `old` give
/// way to `new` (a splice's result, see `crate::render::splice`).
pub(crate) struct Edit {
    pub(crate) old: std::ops::Range<usize>,
    pub(crate) new: Vec<FlatRange>,
}

/// Where each edit of a splice sits in the old and in the new view (the
/// ranges outside these spans are the same `Arc`-shared ranges in both, in
/// the same order): what the listener diff of a spliced view walks.
#[derive(Clone, Debug, Default)]
pub(crate) struct SpliceSpans {
    pub(crate) spans: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
}

/// Packs ranges into leaves and leaves into groups, taking already built
/// leaves and groups whole where the size rules allow (see
/// [`FlatView::spliced`]).
#[derive(Default)]
struct Builder {
    groups: Vec<Arc<Group>>,
    leaves: Vec<Arc<Leaf>>,
    pending: Vec<FlatRange>,
}

impl Builder {
    fn push_range(&mut self, r: FlatRange) {
        self.pending.push(r);
        if self.pending.len() >= LEAF_MAX {
            // Keep a remainder, so that what follows can join it.
            let rest = self.pending.split_off(LEAF_TARGET);
            let full = std::mem::replace(&mut self.pending, rest);
            self.push_built_leaf(Leaf::new(full));
        }
    }

    /// Turns the pending ranges into leaves (all of them, however few).
    fn flush_pending(&mut self) {
        let mut p = std::mem::take(&mut self.pending);
        while p.len() > LEAF_MAX {
            let rest = p.split_off(LEAF_TARGET);
            self.push_built_leaf(Leaf::new(p));
            p = rest;
        }
        if !p.is_empty() {
            self.push_built_leaf(Leaf::new(p));
        }
    }

    fn push_built_leaf(&mut self, l: Arc<Leaf>) {
        self.leaves.push(l);
        if self.leaves.len() >= GROUP_MAX {
            let rest = self.leaves.split_off(GROUP_TARGET);
            let full = std::mem::replace(&mut self.leaves, rest);
            self.groups.push(Group::new(full));
        }
    }

    /// An unchanged leaf: shared, unless pending ranges are too few to make
    /// a leaf of their own, in which case its ranges join them.
    fn push_leaf(&mut self, l: &Arc<Leaf>) {
        if !self.pending.is_empty() {
            if self.pending.len() < LEAF_MIN {
                for r in l.ranges.iter() {
                    self.push_range(r.share());
                }
                self.flush_pending();
                return;
            }
            self.flush_pending();
        }
        self.push_built_leaf(l.clone());
    }

    fn flush_leaves(&mut self) {
        let mut ls = std::mem::take(&mut self.leaves);
        while ls.len() > GROUP_MAX {
            let rest = ls.split_off(GROUP_TARGET);
            self.groups.push(Group::new(ls));
            ls = rest;
        }
        if !ls.is_empty() {
            self.groups.push(Group::new(ls));
        }
    }

    /// An unchanged group: shared, unless the builder holds a partial group
    /// too small to stand alone, which then takes the group's leaves.
    fn push_group(&mut self, g: &Arc<Group>) {
        if self.pending.is_empty() && self.leaves.is_empty() {
            self.groups.push(g.clone());
            return;
        }
        let mut leaves = g.leaves.iter();
        if !self.pending.is_empty() {
            match leaves.next() {
                Some(l) => self.push_leaf(l),
                None => self.flush_pending(),
            }
        }
        if self.leaves.len() < GROUP_MIN {
            for l in leaves {
                self.push_built_leaf(l.clone());
            }
            self.flush_leaves();
        } else {
            self.flush_leaves();
            let rest: Vec<Arc<Leaf>> = leaves.cloned().collect();
            if rest.len() == g.leaves.len() {
                self.groups.push(g.clone());
            } else if !rest.is_empty() {
                self.groups.push(Group::new(rest));
            }
        }
    }

    fn finish(mut self) -> Tree {
        self.flush_pending();
        self.flush_leaves();
        Tree::new(self.groups)
    }
}

/// Log2 of the entries in one page of the direct lookup table.
const PAGE_BITS: u32 = 8;
const PAGE: usize = 1 << PAGE_BITS;
/// Entry flag: another range starts inside the bucket (take the levels).
const MORE: usize = 1;

/// A view's direct lookup table: the span from the first range's start to
/// the last one's is cut into `nb` buckets of `2^shift` bytes (about four
/// per range, at most [`crate::view::range_index::RangeIndex`]'s budget); entry `b`
/// is [`MORE`] when a range starts inside the bucket (after its first
/// address; for the last bucket, anywhere after it), else the address of
/// the range containing the bucket's first address, or 0 if none (then the
/// whole bucket is a hole). An address in a bucket without [`MORE`] is
/// answered by one entry and at most one range; the others descend the
/// tree's levels.
///
/// The table is cut into pages of [`PAGE`] entries behind `Arc`s: a splice
/// rebuilds only the pages over the extent of a range of a leaf it replaced
/// (see `replaced_spans`) and shares the rest.
///
/// **Invariant:** every nonzero entry points (flag masked) at a range
/// inside a leaf that the view holding the table holds, so it is valid as
/// long as the view.
struct Accel {
    base: u64,
    shift: u32,
    nb: u64,
    /// Ranges when the geometry was chosen (a splice that doubles or
    /// halves them rebuilds the table).
    sized_for: usize,
    pages: Box<[Arc<[usize]>]>,
    /// The entries of page 0 (`pages[0]`'s data, held by `pages`): a view
    /// of at most one page is looked up without loading the page pointer.
    page0: *const usize,
}

// SAFETY: the entries are addresses of `FlatRange`s (which are `Send +
// Sync`) held by the same view, `page0` the data of a page the table holds;
// the table is immutable.
unsafe impl Send for Accel {}
// SAFETY: as above.
unsafe impl Sync for Accel {}

impl Accel {
    fn empty() -> Accel {
        Accel {
            base: 0,
            shift: 0,
            nb: 0,
            sized_for: 0,
            pages: Box::new([]),
            page0: std::ptr::null(),
        }
    }

    fn with_pages(mut self, pages: Box<[Arc<[usize]>]>) -> Accel {
        self.page0 = pages.first().map_or(std::ptr::null(), |p| p.as_ptr());
        self.pages = pages;
        self
    }

    /// A table for `tree`, every page built.
    fn build(tree: &Tree) -> Accel {
        let n = tree.len();
        let (Some(first), Some(last)) = (tree.iter_from(0).next(), tree.last_range()) else {
            return Accel::empty();
        };
        let (base, top) = (first.start, last.start);
        let budget = (u64::try_from(n).unwrap_or(u64::MAX).saturating_mul(4))
            .next_power_of_two()
            .clamp(16, 1 << 14);
        let span = top - base;
        let mut shift = 0u32;
        while shift < 63 && (span >> shift) >= budget {
            shift += 1;
        }
        let a = Accel {
            base,
            shift,
            nb: (span >> shift) + 1,
            sized_for: n,
            pages: Box::new([]),
            page0: std::ptr::null(),
        };
        let pages = (0..a.page_count()).map(|p| a.build_page(tree, p)).collect();
        a.with_pages(pages)
    }

    fn page_count(&self) -> usize {
        (self.nb as usize).div_ceil(PAGE)
    }

    fn bucket_start(&self, b: u64) -> u64 {
        self.base + (b << self.shift)
    }

    /// The bucket of `addr` (clamped to the table).
    fn bucket(&self, addr: u64) -> u64 {
        addr.checked_sub(self.base)
            .map_or(0, |off| (off >> self.shift).min(self.nb - 1))
    }

    /// The entries of page `p`, from `tree`.
    fn build_page(&self, tree: &Tree, p: usize) -> Arc<[usize]> {
        let b0 = (p * PAGE) as u64;
        let b1 = (b0 + PAGE as u64).min(self.nb);
        let at = tree.count_at_or_below(self.bucket_start(b0));
        let mut cur: Option<&FlatRange> = at.checked_sub(1).and_then(|i| tree.get(i));
        let mut next = tree.iter_from(at).peekable();
        let mut out = Vec::with_capacity((b1 - b0) as usize);
        for b in b0..b1 {
            let bs = self.bucket_start(b);
            // Step over the ranges starting up to the bucket; where many do
            // (a dense stretch), jump through the tree instead, so a page
            // costs its buckets, not the ranges under it.
            let mut steps = 0;
            while let Some(r) = next.next_if(|r| r.start <= bs) {
                cur = Some(r);
                steps += 1;
                if steps == 8 {
                    if next.peek().is_some_and(|r| r.start <= bs) {
                        let at = tree.count_at_or_below(bs);
                        cur = at.checked_sub(1).and_then(|i| tree.get(i));
                        next = tree.iter_from(at).peekable();
                    }
                    break;
                }
            }
            let be = if b + 1 == self.nb {
                u64::MAX
            } else {
                self.bucket_start(b + 1) - 1
            };
            let more = next.peek().is_some_and(|r| r.start <= be);
            // A range that ends before the bucket is not named: the bucket
            // (or its first part, when `MORE`) is a hole.
            out.push(match cur {
                _ if more => MORE,
                Some(r) if r.last >= bs => r as *const FlatRange as usize,
                _ => 0,
            });
        }
        out.into()
    }

    /// `old`'s table made right for `tree` (spliced from `old`'s tree),
    /// rebuilding the pages that cover the address intervals `dirty`
    /// (inclusive), or the whole table when the geometry no longer fits.
    fn patch(old: &Accel, tree: &Tree, dirty: &[(u64, u64)]) -> Accel {
        let n = tree.len();
        let first = tree.iter_from(0).next().map(|r| r.start);
        if old.nb == 0
            || first != Some(old.base)
            || n > old.sized_for.saturating_mul(2)
            || n < old.sized_for / 2
        {
            return Accel::build(tree);
        }
        let mut pages = old.pages.to_vec();
        let mut rebuilt = vec![false; pages.len()];
        for &(lo, hi) in dirty {
            let (p0, p1) = (
                (old.bucket(lo) >> PAGE_BITS) as usize,
                (old.bucket(hi) >> PAGE_BITS) as usize,
            );
            for p in p0..=p1 {
                if !rebuilt[p] {
                    rebuilt[p] = true;
                    pages[p] = old.build_page(tree, p);
                }
            }
        }
        Accel {
            base: old.base,
            shift: old.shift,
            nb: old.nb,
            sized_for: old.sized_for,
            pages: Box::new([]),
            page0: std::ptr::null(),
        }
        .with_pages(pages.into_boxed_slice())
    }

    /// `Some(answer)`, or `None` when the bucket of `addr` holds several
    /// starts and the tree must be descended.
    #[inline]
    fn lookup(&self, addr: u64) -> Option<Option<&FlatRange>> {
        let Some(off) = addr.checked_sub(self.base) else {
            return Some(None);
        };
        let last = self.nb.checked_sub(1)?;
        let b = (off >> self.shift).min(last) as usize;
        let e = if b < PAGE {
            // SAFETY: `page0` is the data of `pages[0]`, which `self` holds
            // and never changes; page 0 has `min(nb, PAGE)` entries and
            // `b < min(nb, PAGE)` (`b <= nb - 1`).
            unsafe { *self.page0.add(b) }
        } else {
            *self.pages.get(b >> PAGE_BITS)?.get(b & (PAGE - 1))?
        };
        if e & MORE != 0 {
            return None;
        }
        if e == 0 {
            return Some(None);
        }
        // SAFETY: a nonzero entry is the address of a range in a leaf this
        // table's view holds (type invariant), and a leaf's ranges never
        // move or change while it lives; `&self` borrows the view.
        let r = unsafe { &*(e as *const FlatRange) };
        Some((addr <= r.last).then_some(r))
    }
}

/// The address intervals (inclusive) where the direct table of `new`,
/// spliced from `old`, can differ from `old`'s: the extent of every range of
/// a leaf that only one of the two trees holds. An entry names the range
/// containing its bucket's first address, so it changes only if that range
/// is replaced or moved to another leaf, if a range starting in the bucket
/// appears or goes, or if the bucket stops or starts being a hole: each
/// case puts a range of a replaced leaf over the bucket.
fn replaced_spans(old: &Tree, new: &Tree) -> Vec<(u64, u64)> {
    use std::collections::HashSet;
    let groups = |t: &Tree| -> HashSet<*const Group> { t.groups.iter().map(Arc::as_ptr).collect() };
    let (old_groups, new_groups) = (groups(old), groups(new));
    // Leaves of the groups only one tree holds (a group both hold has the
    // same leaves in both).
    fn leaves<'t>(t: &'t Tree, other: &HashSet<*const Group>) -> Vec<&'t Arc<Leaf>> {
        t.groups
            .iter()
            .filter(|g| !other.contains(&Arc::as_ptr(g)))
            .flat_map(|g| g.leaves.iter())
            .collect()
    }
    let (old_leaves, new_leaves) = (leaves(old, &new_groups), leaves(new, &old_groups));
    let ptrs =
        |ls: &[&Arc<Leaf>]| -> HashSet<*const Leaf> { ls.iter().map(|l| Arc::as_ptr(l)).collect() };
    let (in_old, in_new) = (ptrs(&old_leaves), ptrs(&new_leaves));
    let mut out = Vec::new();
    for (ls, other) in [(&old_leaves, &in_new), (&new_leaves, &in_old)] {
        for l in ls.iter().filter(|l| !other.contains(&Arc::as_ptr(l))) {
            out.extend(l.ranges.iter().map(|r| (r.start, r.last)));
        }
    }
    out
}

/// The top level of a view: its groups, the running count of ranges and an
/// index over the groups' first starts.
struct Tree {
    groups: Box<[Arc<Group>]>,
    /// `ends[i]`: ranges in `groups[..=i]`.
    ends: Box<[usize]>,
    index: crate::view::range_index::RangeIndex,
    /// The only leaf, when the view has exactly one (the common small
    /// view): lookups skip the upper levels.
    single: Option<Arc<Leaf>>,
}

impl Tree {
    fn new(groups: Vec<Arc<Group>>) -> Tree {
        let index = crate::view::range_index::RangeIndex::new(
            groups.iter().map(|g| g.first_start()).collect(),
        );
        let mut n = 0;
        let ends = groups
            .iter()
            .map(|g| {
                n += g.len();
                n
            })
            .collect();
        let single = match groups.as_slice() {
            [g] if g.leaves.len() == 1 => Some(g.leaves[0].clone()),
            _ => None,
        };
        Tree {
            groups: groups.into_boxed_slice(),
            ends,
            index,
            single,
        }
    }

    fn from_ranges(ranges: Vec<FlatRange>) -> Tree {
        let mut b = Builder::default();
        for r in ranges {
            b.push_range(r);
        }
        b.finish()
    }

    fn len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    fn last_range(&self) -> Option<&FlatRange> {
        self.groups.last()?.leaves.last()?.ranges.last()
    }

    fn group_base(&self, gi: usize) -> usize {
        gi.checked_sub(1).map_or(0, |p| self.ends[p])
    }

    /// Group, leaf, position of `addr`'s range in the leaf, and the range.
    #[inline]
    fn locate(&self, addr: u64) -> Option<(usize, usize, usize, &FlatRange)> {
        let gi = if self.groups.len() == 1 {
            0
        } else {
            self.index.last_start_at_or_below(addr)?
        };
        let g = self.groups.get(gi)?;
        let li = g.leaf_at(addr)?;
        let (ri, r) = g.leaves.get(li)?.lookup(addr)?;
        Some((gi, li, ri, r))
    }

    /// The range at position `i`.
    fn get(&self, i: usize) -> Option<&FlatRange> {
        let (gi, li, ri) = self.leaf_of(i)?;
        self.groups[gi].leaves[li].ranges.get(ri)
    }

    /// The ranges from position `i` on.
    fn iter_from(&self, i: usize) -> impl Iterator<Item = &FlatRange> + '_ {
        let (gi, li, ri) = self.leaf_of(i).unwrap_or((self.groups.len(), 0, 0));
        self.groups
            .get(gi..)
            .unwrap_or(&[])
            .iter()
            .enumerate()
            .flat_map(move |(k, g)| g.leaves.get(if k == 0 { li } else { 0 }..).unwrap_or(&[]))
            .enumerate()
            .flat_map(move |(k, l)| l.ranges.get(if k == 0 { ri } else { 0 }..).unwrap_or(&[]))
    }

    /// Number of ranges starting at or below `a`.
    fn count_at_or_below(&self, a: u64) -> usize {
        let gi = if self.groups.len() == 1 {
            Some(0)
        } else {
            self.index.last_start_at_or_below(a)
        };
        let Some(gi) = gi else { return 0 };
        let g = &self.groups[gi];
        let Some(li) = g.leaf_at(a) else {
            return self.group_base(gi);
        };
        let leaf = &g.leaves[li];
        let Some(ri) = leaf.index.last_start_at_or_below(a) else {
            return self.group_base(gi) + g.leaf_base(li);
        };
        self.group_base(gi) + g.leaf_base(li) + ri + 1
    }

    fn leaf_of(&self, i: usize) -> Option<(usize, usize, usize)> {
        let gi = self.ends.partition_point(|&e| e <= i);
        let g = self.groups.get(gi)?;
        let k = i - self.group_base(gi);
        let li = g.ends.partition_point(|&e| e <= k);
        g.leaves.get(li)?;
        Some((gi, li, k - g.leaf_base(li)))
    }
}

/// The regions a view's renders reached: a bitmap of their arena slots (what
/// the commit tests against the changed regions, in time proportional to
/// the change) and their ids, one per slot (the first reached), as a short
/// chain of lists that a splice extends by one link without copying the
/// others. Testing by slot, not by id, can only err towards re-rendering.
struct Reached {
    bits: Vec<u64>,
    ids: Option<Arc<ReachedLink>>,
    count: usize,
}

struct ReachedLink {
    ids: Box<[RegionId]>,
    next: Option<Arc<ReachedLink>>,
    depth: usize,
}

/// Links a chain may have before a splice flattens it (bounds both the walk
/// of [`FlatView::reached`] and the recursion of the chain's `Drop`).
const REACHED_DEPTH: usize = 32;

impl Reached {
    fn new(ids: Vec<RegionId>) -> Reached {
        let mut r = Reached {
            bits: Vec::new(),
            ids: None,
            count: 0,
        };
        r.extend(ids);
        r
    }

    /// Adds the ids whose slots are not in the set yet (so the list grows
    /// with the regions reached, not with the number of splices).
    fn extend(&mut self, mut ids: Vec<RegionId>) {
        ids.retain(|id| {
            let w = id.index as usize / 64;
            if w >= self.bits.len() {
                self.bits.resize(w + 1, 0);
            }
            let bit = 1 << (id.index % 64);
            let new = self.bits[w] & bit == 0;
            self.bits[w] |= bit;
            new
        });
        if ids.is_empty() {
            return;
        }
        self.count += ids.len();
        let depth = self.ids.as_ref().map_or(0, |l| l.depth + 1);
        let (ids, next, depth) = if depth >= REACHED_DEPTH {
            let mut all = self.to_vec();
            all.extend(ids);
            (all, None, 0)
        } else {
            (ids, self.ids.take(), depth)
        };
        self.ids = Some(Arc::new(ReachedLink {
            ids: ids.into_boxed_slice(),
            next,
            depth,
        }));
    }

    fn to_vec(&self) -> Vec<RegionId> {
        let mut out = Vec::with_capacity(self.count);
        let mut link = self.ids.as_deref();
        while let Some(l) = link {
            out.extend_from_slice(&l.ids);
            link = l.next.as_deref();
        }
        out
    }

    fn share(&self) -> Reached {
        Reached {
            bits: self.bits.clone(),
            ids: self.ids.clone(),
            count: self.count,
        }
    }

    fn any_slot(&self, slots: &[u32]) -> bool {
        slots.iter().any(|&i| {
            self.bits
                .get(i as usize / 64)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        })
    }

    fn any_in(&self, set: &SlotSet) -> bool {
        if set.bits.is_empty() {
            self.any_slot(&set.slots)
        } else {
            self.bits.iter().zip(&set.bits).any(|(a, b)| a & b != 0)
        }
    }
}

/// A set of arena slots (a commit's changed regions) to test views'
/// reached sets against ([`FlatView::reached_any_in`]): slot by slot when
/// there are few, word by word against a bitmap when there are many, so a
/// commit that changes many regions and visits many views stays linear in
/// both (switching 512 devices in one transaction tests 512 views against
/// 1,024 changed regions).
pub(crate) struct SlotSet {
    slots: Vec<u32>,
    /// Empty when `slots` is short enough to test one by one.
    bits: Vec<u64>,
}

impl SlotSet {
    /// Above this many slots, views are tested word by word.
    const BY_WORD: usize = 64;

    pub(crate) fn new(slots: Vec<u32>) -> SlotSet {
        let mut bits = Vec::new();
        if slots.len() > Self::BY_WORD {
            for &i in &slots {
                let w = i as usize / 64;
                if w >= bits.len() {
                    bits.resize(w + 1, 0);
                }
                bits[w] |= 1u64 << (i % 64);
            }
        }
        SlotSet { slots, bits }
    }
}

/// An immutable rendered view.
///
/// # Representation
///
/// The ranges live in a persistent three-level tree: a view holds groups of
/// at most 64 leaves, each leaf at most 64 ranges, every level behind an
/// `Arc` with its own bucket index and running range counts. A splice
/// (`FlatView::spliced`) builds new leaves only for the ranges it changes
/// (plus at most one neighbouring leaf or group it takes in to keep sizes
/// up), a new group for each group they sit in, and a new top level; every
/// other leaf and group is the old view's, shared. So a commit that changes
/// k ranges of a view of n costs O(k + 64 + n / 2048) `Arc` copies, not
/// O(n).
///
/// Invariants, besides those of the module:
/// * leaves and groups are never empty (an empty view has no group);
/// * every leaf holds at most 64 ranges, every group at most 64 leaves; a
///   leaf or group built by a splice holds at least 16 unless it is the
///   view's last or nothing was left to join;
/// * a leaf's and a group's index and running counts describe exactly its
///   contents (both are built with it and it never changes);
/// * the direct lookup table (paged, pages shared between spliced views)
///   names only ranges of this view's own leaves, and every page equals what
///   a fresh build of it from this view gives.
///
/// [`FlatView::lookup`] reads one table entry and at most one range when
/// the address's bucket holds no range start, and descends the levels
/// otherwise; positions ([`FlatView::lookup_index`], [`FlatView::range`])
/// are global, counted through the running counts. [`FlatView::ranges`] is
/// the one O(n) accessor (a contiguous copy made on first use for views of
/// more than one leaf), kept for API compatibility: no path of memtree's
/// (commit, dirty sync, migration, printing, inspection) calls it; they
/// use [`FlatView::iter`], [`FlatView::ranges_in`] and positions.
pub struct FlatView {
    pub(crate) root: Option<RegionId>,
    pub(crate) root_name: Option<Box<str>>,
    tree: Tree,
    /// The direct lookup table over `tree`.
    accel: Accel,
    /// Every region the render visited (a superset after a splice); the view
    /// must be re-rendered when one of them changes. Behind a lock only so
    /// that a commit whose re-render came out identical can keep publishing
    /// this view and still record what the new render reached (the control
    /// plane reads and writes it under the machine's lock; readers of the
    /// view never touch it).
    reached: std::sync::Mutex<Reached>,
    census: Option<(Arc<Census>, ObjectKey)>,
    /// Positions of each region's ranges, built on first use by
    /// [`FlatView::ranges_of`] (ioeventfd and coalesced-MMIO changes).
    by_region: std::sync::OnceLock<std::collections::HashMap<RegionId, Vec<usize>>>,
    /// The contiguous copy [`FlatView::ranges`] hands out (views of more
    /// than one leaf), made on first use.
    flat: std::sync::OnceLock<Box<[FlatRange]>>,
    /// This view's writable RAM for vm-memory, built on first use by
    /// `AddressSpace::guest_memory` and dropped with the view. Opaque here
    /// (the view does not know the integration that fills it).
    #[cfg(all(feature = "vm-memory", unix))]
    pub(crate) guest_ram: std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>,
}

impl FlatView {
    pub(crate) fn new(
        root: Option<RegionId>,
        root_name: Option<&str>,
        ranges: Vec<FlatRange>,
        reached: Vec<RegionId>,
        census: Option<&Arc<Census>>,
    ) -> FlatView {
        let tree = Tree::from_ranges(ranges);
        let accel = Accel::build(&tree);
        FlatView::with_tree(root, root_name, tree, accel, Reached::new(reached), census)
    }

    fn with_tree(
        root: Option<RegionId>,
        root_name: Option<&str>,
        tree: Tree,
        accel: Accel,
        reached: Reached,
        census: Option<&Arc<Census>>,
    ) -> FlatView {
        let mut view = FlatView {
            root,
            root_name: root_name.map(Into::into),
            tree,
            accel,
            reached: std::sync::Mutex::new(reached),
            census: None,
            by_region: std::sync::OnceLock::new(),
            flat: std::sync::OnceLock::new(),
            #[cfg(all(feature = "vm-memory", unix))]
            guest_ram: std::sync::OnceLock::new(),
        };
        // The census entry: a view of one leaf holds its regions, as it
        // always did; a bigger view holds its groups (or, with one group,
        // its leaves), each registered once when first held and shared
        // like the group or leaf itself, so a splice registers only what
        // it built.
        view.census = census.map(|c| {
            let name = root_name.unwrap_or("(empty)");
            let held: Vec<ObjectKey> = match &*view.tree.groups {
                [] => Vec::new(),
                [g] if g.leaves.len() == 1 => {
                    let mut held: Vec<ObjectKey> =
                        view.iter().map(|r| r.region.census_key()).collect();
                    held.sort_unstable();
                    held.dedup();
                    held
                }
                [g] => g.leaf_keys(c, name),
                groups => groups.iter().map(|g| g.census_key(c, name)).collect(),
            };
            (
                c.clone(),
                c.register_holding(ObjectKind::FlatView, name, held),
            )
        });
        view
    }

    /// `old` with `edits` applied (sorted, disjoint old spans; see
    /// [`Edit`]), sharing every leaf and group no edit touches; its reached
    /// list is `old`'s plus `reached` (what the windows' renders reached).
    /// Also returns where each edit sits in both views.
    pub(crate) fn spliced(
        old: &FlatView,
        root_name: Option<&str>,
        edits: Vec<Edit>,
        reached: Vec<RegionId>,
        census: Option<&Arc<Census>>,
    ) -> (FlatView, SpliceSpans) {
        let len = old.len();
        let t = &old.tree;
        // Which leaves the edits touch: every leaf holding a replaced range,
        // and the leaf at (or, at the end, before) an insertion point.
        let mut touched: Vec<(usize, usize)> = Vec::new();
        for e in &edits {
            let last = e.old.end.max(e.old.start + 1).min(len);
            let first = e.old.start.min(len.saturating_sub(1));
            if len == 0 {
                break;
            }
            let (Some(a), Some(b)) = (t.leaf_of(first), t.leaf_of(last - 1)) else {
                continue;
            };
            let (mut g, mut l) = (a.0, a.1);
            loop {
                if touched.last() != Some(&(g, l)) {
                    touched.push((g, l));
                }
                if (g, l) >= (b.0, b.1) {
                    break;
                }
                l += 1;
                if l == t.groups[g].leaves.len() {
                    g += 1;
                    l = 0;
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        let mut spans = SpliceSpans::default();
        let mut b = Builder::default();
        let mut edits = edits.into_iter().peekable();
        let mut skip_to = 0usize;
        let mut out_len = 0usize;
        let mut current: Option<(std::ops::Range<usize>, usize)> = None;
        let mut emit = |b: &mut Builder, e: Edit, out_len: &mut usize| {
            let n = e.new.len();
            spans.spans.push((e.old.clone(), *out_len..*out_len + n));
            for r in e.new {
                b.push_range(r);
            }
            *out_len += n;
            e.old.end
        };
        let _ = &mut current;
        let mut ti = 0usize;
        for (gi, g) in t.groups.iter().enumerate() {
            if touched.get(ti).is_none_or(|&(tg, _)| tg != gi) {
                b.push_group(g);
                out_len += g.len();
                continue;
            }
            let gbase = t.group_base(gi);
            for (li, leaf) in g.leaves.iter().enumerate() {
                if touched.get(ti) != Some(&(gi, li)) {
                    b.push_leaf(leaf);
                    out_len += leaf.ranges.len();
                    continue;
                }
                ti += 1;
                let lbase = gbase + g.leaf_base(li);
                for (k, r) in leaf.ranges.iter().enumerate() {
                    let p = lbase + k;
                    while let Some(e) = edits.next_if(|e| e.old.start == p) {
                        skip_to = emit(&mut b, e, &mut out_len);
                    }
                    if p < skip_to {
                        continue;
                    }
                    b.push_range(r.share());
                    out_len += 1;
                }
            }
        }
        for e in edits {
            emit(&mut b, e, &mut out_len);
        }
        let mut all_reached = old.lock_reached().share();
        all_reached.extend(reached);
        let tree = b.finish();
        let accel = Accel::patch(&old.accel, &tree, &replaced_spans(&old.tree, &tree));
        let view = FlatView::with_tree(old.root, root_name, tree, accel, all_reached, census);
        debug_assert_eq!(view.len(), out_len);
        (view, spans)
    }

    /// The empty view: no ranges, every access unassigned.
    pub fn empty() -> FlatView {
        FlatView::new(None, None, Vec::new(), Vec::new(), None)
    }

    /// The physical root the view was rendered from (`None` = empty view).
    pub fn root(&self) -> Option<RegionId> {
        self.root
    }

    /// Name of the physical root, as `info mtree -f` prints it.
    pub fn root_name(&self) -> Option<&str> {
        self.root_name.as_deref()
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether the view has no range.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ranges in address order, without copying.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &FlatRange> + Clone + '_ {
        self.tree
            .groups
            .iter()
            .flat_map(|g| g.leaves.iter())
            .flat_map(|l| l.ranges.iter())
    }

    /// The ranges overlapping `[start, last]` (inclusive), in address
    /// order (nothing when `start > last`): a lookup (O(log n)) then what
    /// it returns. No copy.
    pub fn ranges_in(&self, start: u64, last: u64) -> impl Iterator<Item = &FlatRange> + '_ {
        // An inverted window holds nothing: start the walk past the end.
        let from = if start > last {
            self.len()
        } else {
            self.lookup_index(start)
                .unwrap_or_else(|| self.count_below(start))
        };
        self.tree
            .iter_from(from)
            .take_while(move |r| r.start <= last)
    }

    /// The ranges, sorted by address, as one slice: for API compatibility
    /// and tests. **Costs O(n) time and memory on the first call for a
    /// view of more than one leaf** (more than 64 ranges): it makes a
    /// contiguous copy of every range (kept with the view until it drops,
    /// each copy holding its region like the original). Nothing in memtree
    /// calls it; use [`FlatView::iter`], [`FlatView::ranges_in`],
    /// [`FlatView::range`], [`FlatView::len`] or [`FlatView::lookup`],
    /// which never copy.
    pub fn ranges(&self) -> &[FlatRange] {
        if let Some(l) = &self.tree.single {
            return &l.ranges;
        }
        if self.tree.groups.is_empty() {
            return &[];
        }
        self.flat
            .get_or_init(|| self.iter().map(FlatRange::share).collect())
    }

    /// The ranges `region` serves, in address order. The first call makes
    /// an index of the whole view (O(n), kept with the view); later calls
    /// cost what they return.
    pub(crate) fn ranges_of(&self, region: RegionId) -> impl Iterator<Item = &FlatRange> + '_ {
        self.positions_of(region)
            .iter()
            .filter_map(|&i| self.range(i))
    }

    /// The positions (ascending) of the ranges `region` serves; the index
    /// behind [`FlatView::ranges_of`].
    pub(crate) fn positions_of(&self, region: RegionId) -> &[usize] {
        let index = self.by_region.get_or_init(|| {
            let mut m: std::collections::HashMap<RegionId, Vec<usize>> = Default::default();
            for (i, r) in self.iter().enumerate() {
                m.entry(r.region.id()).or_default().push(i);
            }
            m
        });
        index.get(&region).map_or(&[][..], Vec::as_slice)
    }

    /// The range at position `i` (address order).
    pub fn range(&self, i: usize) -> Option<&FlatRange> {
        if let Some(l) = &self.tree.single {
            return l.ranges.get(i);
        }
        self.tree.get(i)
    }

    /// The range containing `addr`, if any.
    #[inline]
    pub fn lookup(&self, addr: u64) -> Option<&FlatRange> {
        match self.accel.lookup(addr) {
            Some(answer) => answer,
            None => self.lookup_in_tree(addr),
        }
    }

    /// [`FlatView::lookup`] through the levels.
    #[inline(never)]
    fn lookup_in_tree(&self, addr: u64) -> Option<&FlatRange> {
        if let Some(l) = &self.tree.single {
            return l.lookup(addr).map(|(_, r)| r);
        }
        self.tree.locate(addr).map(|(.., r)| r)
    }

    /// Index of the range containing `addr`, if any.
    #[inline]
    pub fn lookup_index(&self, addr: u64) -> Option<usize> {
        if let Some(l) = &self.tree.single {
            return l.lookup(addr).map(|(i, _)| i);
        }
        let (gi, li, ri, _) = self.tree.locate(addr)?;
        Some(self.tree.group_base(gi) + self.tree.groups[gi].leaf_base(li) + ri)
    }

    /// Number of ranges starting below `addr`.
    pub(crate) fn count_below(&self, addr: u64) -> usize {
        addr.checked_sub(1)
            .map_or(0, |a| self.tree.count_at_or_below(a))
    }

    fn lock_reached(&self) -> std::sync::MutexGuard<'_, Reached> {
        self.reached.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the renders reached a region in one of these arena slots.
    pub(crate) fn reached_any_in(&self, set: &SlotSet) -> bool {
        self.lock_reached().any_in(set)
    }

    /// Whether the renders of this view reached a region in one of `slots`.
    pub(crate) fn reached_any_slot(&self, slots: &[u32]) -> bool {
        self.lock_reached().any_slot(slots)
    }

    /// The regions the renders of this view reached (a superset after
    /// splices), one per arena slot: a region in a slot an earlier, since
    /// destroyed region of a spliced-from view was reached in is not listed
    /// (the re-render test is by slot, so it still sees it).
    pub(crate) fn reached(&self) -> Vec<RegionId> {
        self.lock_reached().to_vec()
    }

    /// Length of [`FlatView::reached`].
    pub(crate) fn reached_count(&self) -> usize {
        self.lock_reached().count
    }

    /// Replaces the reached list (after a full re-render that came out
    /// identical).
    pub(crate) fn set_reached(&self, reached: Vec<RegionId>) {
        *self.lock_reached() = Reached::new(reached);
    }

    /// Adds to the reached list (after a splice that came out identical).
    pub(crate) fn extend_reached(&self, reached: Vec<RegionId>) {
        self.lock_reached().extend(reached);
    }

    /// The census key of this view, if it is registered.
    pub fn census_key(&self) -> Option<ObjectKey> {
        self.census.as_ref().map(|(_, k)| *k)
    }

    /// Pages of the direct lookup table this view shares with `other` (for
    /// tests of the splice's sharing): `(shared pages, pages of self)`.
    #[doc(hidden)]
    pub fn shared_table_pages_with(&self, other: &FlatView) -> (usize, usize) {
        let theirs: std::collections::HashSet<*const [usize]> =
            other.accel.pages.iter().map(Arc::as_ptr).collect();
        let shared = self
            .accel
            .pages
            .iter()
            .filter(|p| theirs.contains(&Arc::as_ptr(p)))
            .count();
        (shared, self.accel.pages.len())
    }

    /// Leaves and groups this view shares with `other` (for tests of the
    /// splice's sharing): `(shared leaves, leaves of self)`.
    #[doc(hidden)]
    pub fn shared_leaves_with(&self, other: &FlatView) -> (usize, usize) {
        let theirs: std::collections::HashSet<*const Leaf> = other
            .tree
            .groups
            .iter()
            .flat_map(|g| g.leaves.iter())
            .map(Arc::as_ptr)
            .collect();
        let mine: Vec<*const Leaf> = self
            .tree
            .groups
            .iter()
            .flat_map(|g| g.leaves.iter())
            .map(Arc::as_ptr)
            .collect();
        (
            mine.iter().filter(|l| theirs.contains(l)).count(),
            mine.len(),
        )
    }
}

impl Drop for FlatView {
    fn drop(&mut self) {
        if let Some((census, key)) = &self.census {
            census.finalize(*key);
        }
    }
}

impl std::fmt::Debug for FlatView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlatView")
            .field("root", &self.root_name)
            .field("ranges", &self.iter().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*, deterministic.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    fn attrs() -> RangeAttrs {
        RangeAttrs {
            readonly: false,
            nonvolatile: false,
            unmergeable: false,
            romd_mode: false,
            region_readonly: false,
            priority: 0,
            region_type: RegionType::Io,
        }
    }

    /// Range number `key` of the model: `[key * 16, key * 16 + 15]`.
    fn range(core: &Arc<RegionCore>, key: u64) -> FlatRange {
        FlatRange::new(key * 16, key * 16 + 15, 0, core.clone(), attrs())
    }

    fn check(view: &FlatView, keys: &[u64], rng: &mut Rng) {
        assert_eq!(view.len(), keys.len());
        // Every page of the direct table is what a fresh build of it gives.
        let a = &view.accel;
        assert_eq!(a.pages.len(), a.page_count());
        for (p, page) in a.pages.iter().enumerate() {
            assert_eq!(&**page, &*a.build_page(&view.tree, p), "page {p}");
        }
        let starts: Vec<u64> = view.iter().map(|r| r.start).collect();
        let expect: Vec<u64> = keys.iter().map(|k| k * 16).collect();
        assert_eq!(starts, expect);
        for g in view.tree.groups.iter() {
            assert!(!g.leaves.is_empty() && g.leaves.len() <= GROUP_MAX);
            for l in g.leaves.iter() {
                assert!(!l.ranges.is_empty() && l.ranges.len() <= LEAF_MAX);
            }
        }
        for _ in 0..64 {
            let i = rng.below(keys.len() as u64 + 1) as usize;
            assert_eq!(view.range(i).map(|r| r.start), expect.get(i).copied());
            let a = match expect.get(i) {
                Some(&s) => s + rng.below(24),
                None => rng.next() >> 8,
            };
            let want = expect
                .partition_point(|&s| s <= a)
                .checked_sub(1)
                .filter(|&j| a <= expect[j] + 15);
            assert_eq!(view.lookup_index(a), want, "{a:#x}");
            assert_eq!(view.lookup(a).map(|r| r.start), want.map(|j| expect[j]));
            assert_eq!(view.count_below(a), expect.partition_point(|&s| s < a));
            // The ranges overlapping a window, by lookup, are those a scan
            // finds.
            let last = a.saturating_add(rng.below(16 * 100));
            let got: Vec<u64> = view.ranges_in(a, last).map(|r| r.start).collect();
            let scan: Vec<u64> = expect
                .iter()
                .copied()
                .filter(|&s| s <= last && a <= s + 15)
                .collect();
            assert_eq!(got, scan, "[{a:#x}, {last:#x}]");
        }
    }

    /// Random edits (insertions, deletions, replacements, long and short,
    /// several per splice) applied to a chunked view and to a sorted list of
    /// keys: same ranges, sizes within bounds, lookups and positions right,
    /// spans where the edits are, and untouched leaves shared.
    #[test]
    fn flatview_splice_matches_a_vector_model() {
        let memory = crate::Memory::new();
        let ops: Arc<dyn crate::region::attrs::MmioOps> =
            Arc::new(crate::region::attrs::UnimplementedDevice);
        let id = memory.new_mmio("dev", 16, ops, None).unwrap();
        let core = memory.read(|t| t.node(id).unwrap().core.clone());
        let mut rng = Rng(0x1234_5678);
        let (rounds, n0) = if cfg!(miri) { (6, 300) } else { (300, 5000) };
        let mut keys: Vec<u64> = (0..n0).map(|i| i << 24).collect();
        let mut view = FlatView::new(
            None,
            None,
            keys.iter().map(|&k| range(&core, k)).collect(),
            Vec::new(),
            None,
        );
        check(&view, &keys, &mut rng);
        for _ in 0..rounds {
            // Sorted, disjoint old spans; each new list fits between the
            // neighbours of its span.
            let mut edits = Vec::new();
            let mut model: Vec<u64> = Vec::new();
            let mut pos = 0usize;
            let n = keys.len();
            for _ in 0..1 + rng.below(4) {
                let a = pos + rng.below((n - pos) as u64 / 2 + 1) as usize;
                let len = match rng.below(4) {
                    0 => 0,
                    1 => rng.below(3) as usize,
                    2 => rng.below(80) as usize,
                    _ => rng.below(1200) as usize,
                };
                let b = (a + len).min(n);
                let lo = if a == 0 { 0 } else { keys[a - 1] + 1 };
                let hi = keys.get(b).copied().unwrap_or(1 << 58);
                let count = match rng.below(4) {
                    0 => 0,
                    1 => rng.below(4),
                    2 => rng.below(80),
                    _ => rng.below(1200),
                }
                .min(hi - lo);
                let mut new_keys: Vec<u64> = (0..count).map(|_| lo + rng.below(hi - lo)).collect();
                new_keys.sort_unstable();
                new_keys.dedup();
                model.extend_from_slice(&keys[pos..a]);
                model.extend_from_slice(&new_keys);
                edits.push(Edit {
                    old: a..b,
                    new: new_keys.iter().map(|&k| range(&core, k)).collect(),
                });
                pos = b;
                if pos >= n {
                    break;
                }
            }
            model.extend_from_slice(&keys[pos..]);
            let spans_expected: Vec<std::ops::Range<usize>> =
                edits.iter().map(|e| e.old.clone()).collect();
            let (next, spans) = FlatView::spliced(&view, None, edits, Vec::new(), None);
            check(&next, &model, &mut rng);
            let olds: Vec<_> = spans.spans.iter().map(|(o, _)| o.clone()).collect();
            assert_eq!(olds, spans_expected);
            // Outside the spans both views hold the same range objects'
            // contents in the same order.
            let mut i = 0;
            let mut j = 0;
            for (o, nw) in &spans.spans {
                assert_eq!(o.start - i, nw.start - j);
                i = o.end;
                j = nw.end;
            }
            assert_eq!(n - i, next.len() - j);
            let (shared, total) = next.shared_leaves_with(&view);
            let touched: usize = spans
                .spans
                .iter()
                .map(|(_, nw)| nw.len() / LEAF_TARGET + 4)
                .sum();
            assert!(
                shared + touched >= total,
                "{shared} of {total} leaves shared, {touched} allowed to change"
            );
            view = next;
            keys = model;
            if keys.is_empty() {
                keys = vec![7];
                view = FlatView::new(None, None, vec![range(&core, 7)], Vec::new(), None);
            }
        }
    }
}
