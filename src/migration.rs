//! Live migration of a machine's RAM over any byte stream (a Unix socket,
//! a TCP connection): pre-copy rounds of dirty pages while the source keeps
//! running, a stop-and-copy round, and a verification of every region.
//!
//! # What moves
//!
//! The RAM of one address space: every distinct RAM region its view reaches
//! (not ROM devices, not RAM devices), in address order of first
//! appearance. A region is identified by its **idstr** (QEMU's RAMBlock
//! `idstr`, unique within the migrated layout): its name, or, when several
//! regions of the layout share a name (legal in QEMU and memtree), the name
//! followed by `#k`, `k` counting those regions in layout order from 0.
//! Pages are matched to regions by region, never by name. The header
//! carries every region's idstr, size and where it first appears (address
//! and offset in the region); the receiver checks all of them against its
//! own layout before it reads a page, so a machine built differently (other
//! sizes, other addresses, other order) is a clear
//! [`MigrationError::LayoutMismatch`], duplicate names included.
//!
//! # Sender ([`send`])
//!
//! 1. Header, then the sender starts global dirty tracking (the MIGRATION
//!    client, [`crate::host::dirty_bitmap`]; counted, so a user that started it before
//!    keeps it when the sender stops its own) and clears its bits.
//! 2. Round 1 sends every page.
//! 3. Each further round sends the pages dirtied since the previous one
//!    ([`crate::Machine::take_dirty_ram`]), while writers keep running.
//! 4. When a round finds at most [`SendConfig::stop_threshold_pages`]
//!    dirty pages (or after [`SendConfig::max_rounds`]), `pause(true)` stops
//!    the writers, the last dirty pages and the per-region content
//!    checksums are sent, and `pause(false)` is called: the downtime.
//!
//! The sender relies on two things it checks after every round's take of
//! dirty pages (the last one while paused): global tracking stayed on
//! without a gap since it started it (an unmatched
//! [`crate::Machine::global_dirty_log_stop`] by anyone means writes went
//! unseen: [`MigrationError::TrackingLost`]), and the RAM layout is the one
//! the header announced (a region plugged, unplugged, replaced or resized
//! would be left out or cut short: [`MigrationError::LayoutMismatch`], as
//! QEMU fails a migration whose RAM block was resized).
//!
//! Pages travel in runs of up to [`RUN_PAGES`] consecutive pages, read from
//! RAM with one copy and written to the stream with one large write; a page
//! of zeros travels as a flag (QEMU's zero page), a run of them as one
//! record. Every page's digest ([`page_digest`], a fast non-cryptographic
//! hash computed while the page is in cache) travels with it, and a
//! region's content checksum is the wrapping sum of its pages' digests
//! (mixed with their numbers), kept up to date as pages are sent: the
//! `DONE` record costs no pass over memory. [`checksums`] computes the same
//! value from memory, for an independent comparison.
//!
//! # What the checksums prove
//!
//! By default the `DONE` checksums are **transport integrity**: they are
//! computed from the digests of the pages *sent*, and the receiver
//! recomputes them from the pages it *received*, so they prove the stream
//! arrived whole and unaltered ([`MigrationError::ContentMismatch`]), not
//! that the source's memory at the stop equals the import. That second
//! property rests on dirty tracking, which the sender checks instead (see
//! above). [`SendConfig::verify_memory_at_stop`] makes them a memory check
//! too: the sender then computes them from its memory while paused (one
//! read pass over all RAM, added to the downtime), and a receiver whose
//! import differs from the paused source fails.
//!
//! Cancelling ([`SendConfig::cancel`]) is checked before every round and
//! every run, the stop-and-copy round's included (then the source is
//! resumed with `pause(false)` first): the sender writes a cancel record
//! (if it can), stops tracking and returns [`MigrationError::Cancelled`].
//! Any error on the sender stops tracking too. A receiver that stops
//! reading blocks the sender's writes, and a sender that stops writing
//! blocks [`receive`]'s reads: give the streams timeouts
//! (`set_write_timeout` / `set_read_timeout` on a socket) and a timed-out
//! read or write ends the migration with [`MigrationError::Io`], the
//! receiving machine unchanged and the source resumed.
//!
//! # Stream format (version 2, little-endian)
//!
//! * Header: magic `MTMIGRAT`, version `u32`, page size `u32`, region
//!   count `u32`, per region a `u16` idstr length, the idstr, a `u64` size,
//!   a `u64` address and a `u64` region offset where the region first
//!   appears; then the stream checksum.
//! * Records, each a tag byte: `DATA` (region `u32`, first page `u64`,
//!   count `u32`, one `u64` digest per page, then the pages' bytes),
//!   `ZERO` (region, first page, count), `ROUND` (round `u32`, pages in the
//!   round `u64`, then the stream checksum), `DONE` (one content checksum
//!   per region, then the stream checksum), `CANCEL`.
//! * The stream checksum covers every byte since the previous one except
//!   page contents, which their digests cover.
//!
//! # Receiver ([`receive`])
//!
//! Never a partial import: pages are streamed straight from the stream
//! into fresh RAM blocks prepared for them (anonymous and lazily backed: a
//! zero page costs nothing), each page checked against its digest as it
//! lands. The machine's RAM changes only after the `DONE` record arrived,
//! every stream checksum matched, every page of every region was received
//! and every region's content checksum equals the sender's. Then, inside
//! one transaction (no edit lands in between), the layout is read again
//! and must still be the one the stream was checked against (the same
//! regions over the same blocks, sizes and addresses), else
//! [`MigrationError::LayoutMismatch`] and nothing changes; and each
//! prepared block replaces its region's memory: in O(1) by moving its pages
//! over the region's (`mremap`, Linux, private anonymous RAM whose region
//! is host-page aligned in its block) when [`ReceiveConfig::move_pages`]
//! asks for it, otherwise by copying the pages
//! received with contents and zeroing the others in place (punched out of
//! a memfd or file, so they cost no memory; written with zeros elsewhere).
//! Each prepared block is freed once its region holds the import. The
//! import is
//! a write: every page of every region is marked dirty for the clients
//! tracking it (QEMU treats incoming RAM as dirty).
//!
//! Moving pages replaces the physical pages behind the region's host
//! addresses. Nothing in memtree holds them, but whoever took the address
//! out through a public `host_addr()` and pinned the pages in the kernel
//! (VFIO DMA maps, io_uring fixed buffers, RDMA registrations, `O_DIRECT`
//! in flight) keeps the old ones, and `mlock`/`madvise`/`mbind` set on the
//! destination are lost. Hence the move is opt-in, and the rule for
//! opting in: receive into a machine before any such pin or policy is set
//! up on its RAM (QEMU's incoming side likewise sets up its RAM before it
//! runs the guest). A truncated,
//! corrupted or mismatched stream (magic, version, page size, layout,
//! region or page out of range, unknown tag, checksum, digest) ends in a
//! precise [`MigrationError`] and leaves the machine as it was.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::host::backend::MemoryBackend;
use crate::host::dirty_bitmap::{DirtyClient, TARGET_PAGE_SIZE};
use crate::host::ram::{RamBacking, RamBlock};
use crate::region::ids::RegionId;
use crate::region::region_core::{Backing, RegionKind};
use crate::{Machine, SpaceId, TopologyError};

const MAGIC: &[u8; 8] = b"MTMIGRAT";
/// The stream format version this module writes and reads.
pub const VERSION: u32 = 2;
/// The most pages one `DATA` or `ZERO` record carries (1 MiB of 4 KiB
/// pages).
pub const RUN_PAGES: u64 = 256;
const TAG_DATA: u8 = 1;
const TAG_ZERO: u8 = 2;
const TAG_ROUND: u8 = 3;
const TAG_DONE: u8 = 4;
const TAG_CANCEL: u8 = 5;
const PAGE: usize = TARGET_PAGE_SIZE as usize;
const RUN_BYTES: usize = PAGE * RUN_PAGES as usize;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The stream failed.
    #[error("migration stream I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended early.
    #[error("migration stream truncated while reading {0}")]
    Truncated(&'static str),
    /// Not a memtree migration stream.
    #[error("not a memtree migration stream (bad magic)")]
    BadMagic,
    /// A stream version this build does not read.
    #[error("unsupported migration stream version {0} (this build reads {VERSION})")]
    UnsupportedVersion(u32),
    /// The sender's target page size differs.
    #[error("page size mismatch: stream has {theirs}, this machine uses {ours}")]
    PageSizeMismatch {
        /// This side's page size.
        ours: u32,
        /// The peer's page size.
        theirs: u32,
    },
    /// The sender's RAM layout differs from the receiver's.
    #[error("RAM layout mismatch: {0}")]
    LayoutMismatch(String),
    /// The stream is malformed or its checksum does not match.
    #[error("corrupted migration stream: {0}")]
    Corrupt(String),
    /// The received pages of a region do not add up to the checksum the
    /// sender sent in `DONE` (module docs, "What the checksums prove").
    #[error("region \"{0}\": the pages received do not match the sender's checksum")]
    ContentMismatch(String),
    /// Global dirty tracking was turned off while the sender relied on it
    /// (an unmatched [`crate::Machine::global_dirty_log_stop`]): writes may
    /// have gone unseen, so the stream cannot be trusted to hold the
    /// source's memory.
    #[error("global dirty tracking was stopped during the migration")]
    TrackingLost,
    /// The sender cancelled (or this side was cancelled).
    #[error("migration cancelled")]
    Cancelled,
    /// The machine refused an operation.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// Scratch memory could not be allocated.
    #[error("cannot allocate scratch memory: {0}")]
    Scratch(String),
}

type Result<T> = std::result::Result<T, MigrationError>;

/// One RAM region a migration moves.
#[derive(Debug, Clone)]
pub struct RamRegion {
    /// Its identity across machines (module docs, "What moves").
    pub idstr: String,
    /// The region's name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Address of the region's first appearance in the space.
    pub addr: u64,
    /// Region offset at that address.
    pub offset_in_region: u64,
    region: RegionId,
    backend: Arc<MemoryBackend>,
    /// Where the region starts in its block.
    offset: u64,
}

impl RamRegion {
    fn read(&self, at: u64, buf: &mut [u8]) {
        // In range: `at + len <= size` and the region lies in its backend.
        let _ = self.backend.block().read(self.offset + at, buf);
    }
    fn pages(&self) -> u64 {
        self.size.div_ceil(TARGET_PAGE_SIZE)
    }
    fn page_len(&self, page: u64) -> usize {
        (self.size - page * TARGET_PAGE_SIZE).min(TARGET_PAGE_SIZE) as usize
    }
    /// Bytes of pages `[first, first + count)`, the last one possibly short.
    fn run_len(&self, first: u64, count: u64) -> usize {
        let end = ((first + count) * TARGET_PAGE_SIZE).min(self.size);
        (end - first * TARGET_PAGE_SIZE) as usize
    }
}

/// The RAM regions of `space` a migration moves (module docs).
pub fn ram_layout(machine: &Machine, space: SpaceId) -> Result<Vec<RamRegion>> {
    let view = machine.address_space(space)?.view();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for r in view.iter() {
        let core = r.region();
        if core.kind() != RegionKind::Ram || !seen.insert(core.id()) {
            continue;
        }
        if let Backing::Ram { block, offset } = core.backing() {
            let size = machine.region_info(core.id())?.size;
            out.push(RamRegion {
                idstr: String::new(),
                name: core.name().to_owned(),
                size: u64::try_from(size).unwrap_or(u64::MAX),
                addr: r.start(),
                offset_in_region: r.offset_in_region(),
                region: core.id(),
                backend: block.clone(),
                offset: *offset,
            });
        }
    }
    let mut count: HashMap<String, usize> = HashMap::new();
    for r in &out {
        *count.entry(r.name.clone()).or_default() += 1;
    }
    let mut next: HashMap<String, usize> = HashMap::new();
    for r in &mut out {
        r.idstr = if count[&r.name] > 1 {
            let k = next.entry(r.name.clone()).or_default();
            *k += 1;
            format!("{}#{}", r.name, *k - 1)
        } else {
            r.name.clone()
        };
    }
    Ok(out)
}

/// Whether two layouts are the same memory: the same regions (by id) over
/// the same blocks at the same offsets, with the same sizes, addresses and
/// idstrs. A region replaced by another of the same name, size and address
/// is a different layout.
fn same_layout(a: &[RamRegion], b: &[RamRegion]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.region == y.region
                && Arc::ptr_eq(&x.backend, &y.backend)
                && x.offset == y.offset
                && x.size == y.size
                && x.addr == y.addr
                && x.offset_in_region == y.offset_in_region
                && x.idstr == y.idstr
        })
}

/// Fails unless `space`'s RAM layout is still `layout`.
fn check_layout(machine: &Machine, space: SpaceId, layout: &[RamRegion], when: &str) -> Result<()> {
    if same_layout(layout, &ram_layout(machine, space)?) {
        Ok(())
    } else {
        Err(MigrationError::LayoutMismatch(format!(
            "RAM changed {when} (a region plugged, unplugged, replaced or resized)"
        )))
    }
}

const K1: u64 = 0x9e37_79b9_7f4a_7c15;
const K2: u64 = 0xc2b2_ae3d_27d4_eb4f;

fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The digest of one page (or of the short last page of a region) and
/// whether it is all zeros: eight Fletcher-style lanes of 64-bit sums over
/// the page's words (a sum and a sum of sums per lane, so a changed,
/// swapped or moved word changes the digest), mixed at the end. Not
/// cryptographic; it runs at memory speed (the lanes vectorise).
pub fn page_digest(data: &[u8]) -> (u64, bool) {
    let mut a = [0u64; 8];
    let mut b = [0u64; 8];
    let mut any = 0u64;
    let mut lanes = |chunk: &[u8]| {
        for i in 0..8 {
            let mut w = [0u8; 8];
            w.copy_from_slice(&chunk[i * 8..i * 8 + 8]);
            let w = u64::from_le_bytes(w);
            any |= w;
            a[i] = a[i].wrapping_add(w);
            b[i] = b[i].wrapping_add(a[i]);
        }
    };
    let mut chunks = data.chunks_exact(64);
    for c in &mut chunks {
        lanes(c);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 64];
        last[..rest.len()].copy_from_slice(rest);
        lanes(&last);
    }
    let mut h = (data.len() as u64).wrapping_mul(K1);
    for i in 0..8 {
        h = (h ^ a[i]).wrapping_mul(K1).rotate_left(27);
        h = (h ^ b[i]).wrapping_mul(K2).rotate_left(31);
    }
    (fmix(h), any == 0)
}

/// A page's term in its region's content checksum.
fn page_term(page: u64, digest: u64) -> u64 {
    fmix(digest ^ page.wrapping_mul(K2).rotate_left(17))
}

/// A region's content checksum from the sum of its page terms.
fn finish_region(sum: u64, size: u64) -> u64 {
    fmix(sum ^ size.wrapping_mul(K1))
}

/// A 64-bit checksum of a byte stream (not cryptographic), for the
/// stream's record headers: four multiply-rotate lanes over 8-byte words.
#[derive(Clone, Debug)]
pub struct Checksum {
    lanes: [u64; 4],
    tail: Vec<u8>,
    len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum {
            lanes: [
                0x243f_6a88_85a3_08d3,
                0x1319_8a2e_0370_7344,
                0xa409_3822_299f_31d0,
                0x082e_fa98_ec4e_6c89,
            ],
            tail: Vec::new(),
            len: 0,
        }
    }
}

impl Checksum {
    /// Adds bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.tail.is_empty() {
            let need = 32 - self.tail.len();
            let n = need.min(data.len());
            self.tail.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.tail.len() < 32 {
                return;
            }
            let t = std::mem::take(&mut self.tail);
            self.block(&t);
        }
        let mut chunks = data.chunks_exact(32);
        for c in &mut chunks {
            self.block(c);
        }
        self.tail.extend_from_slice(chunks.remainder());
    }

    #[inline]
    fn block(&mut self, c: &[u8]) {
        for (i, lane) in self.lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().unwrap_or_default());
            *lane = (lane.rotate_left(29) ^ w).wrapping_mul(K1);
        }
    }

    /// The checksum of everything added.
    pub fn finish(&self) -> u64 {
        let mut h = self.len.wrapping_mul(K1);
        for &l in &self.lanes {
            h = (h.rotate_left(23) ^ l).wrapping_mul(K1);
        }
        for &b in &self.tail {
            h = (h.rotate_left(8) ^ u64::from(b)).wrapping_mul(K1);
        }
        h ^ (h >> 29)
    }
}

/// The content checksum of a region computed from its memory (what `DONE`
/// carries for the contents the sender sent).
pub fn region_checksum(r: &RamRegion) -> u64 {
    let mut buf = vec![0u8; RUN_BYTES];
    let mut sum = 0u64;
    let mut p = 0;
    while p < r.pages() {
        let n = RUN_PAGES.min(r.pages() - p);
        let len = r.run_len(p, n);
        r.read(p * TARGET_PAGE_SIZE, &mut buf[..len]);
        for (i, page) in buf[..len].chunks(PAGE).enumerate() {
            sum = sum.wrapping_add(page_term(p + i as u64, page_digest(page).0));
        }
        p += n;
    }
    finish_region(sum, r.size)
}

/// Sender settings.
#[derive(Debug, Clone)]
pub struct SendConfig {
    /// Stop and copy once a round finds at most this many dirty pages.
    pub stop_threshold_pages: u64,
    /// Stop and copy after this many rounds whatever the dirty set.
    pub max_rounds: u32,
    /// Set to cancel (checked before every round and every run of pages,
    /// the stop-and-copy round's included).
    pub cancel: Arc<AtomicBool>,
    /// Compute the `DONE` checksums from the source's memory while it is
    /// paused (one read pass over all RAM, added to the downtime) instead
    /// of from the pages sent: the receiver then checks its import against
    /// the paused source's memory, not only against the stream (module
    /// docs, "What the checksums prove").
    pub verify_memory_at_stop: bool,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            stop_threshold_pages: 512,
            max_rounds: 30,
            cancel: Arc::new(AtomicBool::new(false)),
            verify_memory_at_stop: false,
        }
    }
}

/// What a migration did.
#[derive(Debug, Clone, Default)]
pub struct MigrationStats {
    /// Rounds, the stop-and-copy round included.
    pub rounds: u32,
    /// Pages sent per round (contents and zero pages).
    pub pages_per_round: Vec<u64>,
    /// Pages sent with their contents.
    pub pages_sent: u64,
    /// Pages sent as zero flags.
    pub zero_pages: u64,
    /// Bytes written to the stream.
    pub bytes: u64,
    /// How long the writers were paused: from `pause(true)` to the `DONE`
    /// record flushed (the stop-and-copy round, verification record
    /// included).
    pub downtime: Duration,
    /// Whole migration.
    pub total: Duration,
    /// Per-region checksums the `DONE` record carried (idstr, checksum):
    /// of the pages sent, or of memory at the stop with
    /// [`SendConfig::verify_memory_at_stop`] (module docs, "What the
    /// checksums prove").
    pub checksums: Vec<(String, u64)>,
}

/// Counts and checksums what it writes.
struct Out<W: Write> {
    w: std::io::BufWriter<W>,
    sum: Checksum,
    bytes: u64,
}

impl<W: Write> Out<W> {
    /// Writes bytes the stream checksum covers.
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.sum.update(b);
        self.raw(b)
    }
    /// Writes page contents (covered by their digests).
    fn raw(&mut self, b: &[u8]) -> Result<()> {
        self.bytes += b.len() as u64;
        self.w.write_all(b)?;
        Ok(())
    }
    /// Writes the checksum of everything since the previous one.
    fn seal(&mut self) -> Result<()> {
        let s = std::mem::take(&mut self.sum).finish();
        self.raw(&s.to_le_bytes())
    }
}

/// The sender's use of global tracking (counted: other users keep theirs),
/// stopped when the sender ends, however it ends.
struct Tracking<'m> {
    machine: &'m Machine,
    /// [`Machine::global_dirty_log_epoch`] when the sender started it.
    epoch: Option<u64>,
}
impl Tracking<'_> {
    /// Fails if tracking was off at any time since the sender started it.
    fn check(&self) -> Result<()> {
        if self.machine.global_dirty_log_epoch() == self.epoch {
            Ok(())
        } else {
            Err(MigrationError::TrackingLost)
        }
    }
}
impl Drop for Tracking<'_> {
    fn drop(&mut self) {
        // Tracking turned off meanwhile took the sender's count with it
        // (all counts are gone when it turns off): stopping now would
        // take the count of whoever started it again since.
        if self.check().is_ok() {
            let _ = self.machine.global_dirty_log_stop();
        }
    }
}

/// The sender's state: the layout, each page's term in its region's
/// content checksum as last sent, and a run buffer.
struct Sender<'a, W: Write> {
    layout: &'a [RamRegion],
    out: Out<W>,
    terms: Vec<Vec<u64>>,
    sums: Vec<u64>,
    buf: Vec<u8>,
    digests: Vec<(u64, bool)>,
    stats: MigrationStats,
}

impl<W: Write> Sender<'_, W> {
    /// Sends pages `[first, first + count)` of region `ri` (`count` at
    /// most `RUN_PAGES`): one copy out of RAM, one digest pass over the
    /// copy while it is in cache, one record per stretch of zero or
    /// non-zero pages.
    fn run(&mut self, ri: usize, first: u64, count: u64) -> Result<()> {
        let r = &self.layout[ri];
        let len = r.run_len(first, count);
        r.read(first * TARGET_PAGE_SIZE, &mut self.buf[..len]);
        self.digests.clear();
        self.digests
            .extend(self.buf[..len].chunks(PAGE).map(page_digest));
        for (i, &(d, _)) in self.digests.iter().enumerate() {
            let p = first + i as u64;
            let t = page_term(p, d);
            let old = std::mem::replace(&mut self.terms[ri][p as usize], t);
            self.sums[ri] = self.sums[ri].wrapping_sub(old).wrapping_add(t);
        }
        let mut i = 0usize;
        while i < self.digests.len() {
            let zero = self.digests[i].1;
            let j = i + self.digests[i..].iter().take_while(|d| d.1 == zero).count();
            let mut head = [0u8; 17];
            head[0] = if zero { TAG_ZERO } else { TAG_DATA };
            head[1..5].copy_from_slice(&(ri as u32).to_le_bytes());
            head[5..13].copy_from_slice(&(first + i as u64).to_le_bytes());
            head[13..17].copy_from_slice(&((j - i) as u32).to_le_bytes());
            self.out.put(&head)?;
            if zero {
                self.stats.zero_pages += (j - i) as u64;
            } else {
                let mut ds = [0u8; 8 * RUN_PAGES as usize];
                for (k, d) in self.digests[i..j].iter().enumerate() {
                    ds[k * 8..k * 8 + 8].copy_from_slice(&d.0.to_le_bytes());
                }
                self.out.put(&ds[..(j - i) * 8])?;
                let (a, b) = (i * PAGE, (j * PAGE).min(len));
                self.out.raw(&self.buf[a..b])?;
                self.stats.pages_sent += (j - i) as u64;
            }
            i = j;
        }
        Ok(())
    }

    fn end_round(&mut self, round: u32, pages: u64) -> Result<()> {
        self.out.put(&[TAG_ROUND])?;
        self.out.put(&round.to_le_bytes())?;
        self.out.put(&pages.to_le_bytes())?;
        self.out.seal()
    }

    fn cancelled(&mut self) -> MigrationError {
        let _ = self.out.put(&[TAG_CANCEL]);
        let _ = self.out.w.flush();
        MigrationError::Cancelled
    }
}

/// Groups sorted, distinct pages into runs of consecutive pages of one
/// region, at most `RUN_PAGES` long.
fn runs(pages: &[(usize, u64)]) -> Vec<(usize, u64, u64)> {
    let mut out: Vec<(usize, u64, u64)> = Vec::new();
    for &(ri, p) in pages {
        match out.last_mut() {
            Some((r, first, n)) if *r == ri && *first + *n == p && *n < RUN_PAGES => *n += 1,
            _ => out.push((ri, p, 1)),
        }
    }
    out
}

/// Sends the RAM of `space` to `out` (module docs). `pause(true)` must stop
/// every writer of the machine's RAM and return once they stopped;
/// `pause(false)` ends the downtime (resume the writers, or keep the
/// source stopped for good, as a completed migration usually does).
pub fn send<W: Write>(
    machine: &Machine,
    space: SpaceId,
    out: W,
    cfg: &SendConfig,
    mut pause: impl FnMut(bool),
) -> Result<MigrationStats> {
    let start = Instant::now();
    let layout = ram_layout(machine, space)?;
    let mut s = Sender {
        layout: &layout,
        out: Out {
            w: std::io::BufWriter::with_capacity(256 << 10, out),
            sum: Checksum::default(),
            bytes: 0,
        },
        terms: layout
            .iter()
            .map(|r| vec![0u64; r.pages() as usize])
            .collect(),
        sums: vec![0; layout.len()],
        buf: vec![0u8; RUN_BYTES],
        digests: Vec::with_capacity(RUN_PAGES as usize),
        stats: MigrationStats::default(),
    };
    let o = &mut s.out;
    o.put(MAGIC)?;
    o.put(&VERSION.to_le_bytes())?;
    o.put(&(PAGE as u32).to_le_bytes())?;
    o.put(&(layout.len() as u32).to_le_bytes())?;
    for r in &layout {
        let id = r.idstr.as_bytes();
        let n = u16::try_from(id.len())
            .map_err(|_| MigrationError::LayoutMismatch(format!("name too long: {}", r.name)))?;
        o.put(&n.to_le_bytes())?;
        o.put(id)?;
        o.put(&r.size.to_le_bytes())?;
        o.put(&r.addr.to_le_bytes())?;
        o.put(&r.offset_in_region.to_le_bytes())?;
    }
    o.seal()?;

    machine.global_dirty_log_start()?;
    let tracking = Tracking {
        machine,
        epoch: machine.global_dirty_log_epoch(),
    };
    // Round 1 sends everything: earlier bits mean nothing.
    machine.take_dirty_ram(space, DirtyClient::MIGRATION)?;

    // Round 1.
    let mut n = 0u64;
    for (ri, r) in layout.iter().enumerate() {
        let mut p = 0;
        while p < r.pages() {
            if cfg.cancel.load(Ordering::Relaxed) {
                return Err(s.cancelled());
            }
            let c = RUN_PAGES.min(r.pages() - p);
            s.run(ri, p, c)?;
            p += c;
            n += c;
        }
    }
    s.stats.rounds = 1;
    s.stats.pages_per_round.push(n);
    s.end_round(1, n)?;

    let index: HashMap<RegionId, usize> = layout
        .iter()
        .enumerate()
        .map(|(i, r)| (r.region, i))
        .collect();
    loop {
        if cfg.cancel.load(Ordering::Relaxed) {
            return Err(s.cancelled());
        }
        let mut dirty = machine.take_dirty_ram(space, DirtyClient::MIGRATION)?;
        // After the take: what it returned was tracked without a gap, and
        // covers every region that is to be migrated.
        tracking.check()?;
        check_layout(machine, space, &layout, "during the migration")?;
        let count: u64 = dirty.iter().map(|d| d.dirty.count()).sum();
        let last = count <= cfg.stop_threshold_pages || s.stats.rounds >= cfg.max_rounds;
        let t0 = Instant::now();
        if last {
            pause(true);
            // Everything written up to the pause, merged; tracked without a
            // gap and over the same RAM up to the pause.
            let more = machine
                .take_dirty_ram(space, DirtyClient::MIGRATION)
                .map_err(MigrationError::from)
                .and_then(|more| {
                    tracking.check()?;
                    check_layout(machine, space, &layout, "during the migration")?;
                    Ok(more)
                });
            match more {
                Ok(more) => dirty.extend(more),
                Err(e) => {
                    pause(false);
                    return Err(e);
                }
            }
        }
        let mut pages: Vec<(usize, u64)> = Vec::new();
        for d in &dirty {
            // Matched by region, never by name; a region plugged during
            // the migration is not in the layout.
            let Some(&ri) = index.get(&d.region) else {
                continue;
            };
            let np = layout[ri].pages();
            pages.extend(
                d.dirty
                    .pages()
                    .map(|off| off / TARGET_PAGE_SIZE)
                    .filter(|&p| p < np)
                    .map(|p| (ri, p)),
            );
        }
        pages.sort_unstable();
        pages.dedup();
        let mut result = Ok(());
        for (ri, first, c) in runs(&pages) {
            if cfg.cancel.load(Ordering::Relaxed) {
                // A cancel in the stop-and-copy round (a receiver that
                // stalls keeps the source paused) resumes the source.
                if last {
                    pause(false);
                }
                return Err(s.cancelled());
            }
            if let Err(e) = s.run(ri, first, c) {
                result = Err(e);
                break;
            }
        }
        let sent = pages.len() as u64;
        s.stats.rounds += 1;
        s.stats.pages_per_round.push(sent);
        if !last {
            result?;
            let round = s.stats.rounds;
            s.end_round(round, sent)?;
            continue;
        }
        // Stop-and-copy: finish the round, the content checksums (kept up
        // to date as pages were sent), DONE, end of the downtime.
        let round = s.stats.rounds;
        let done = result.and_then(|()| {
            s.end_round(round, sent)?;
            s.out.put(&[TAG_DONE])?;
            for (ri, r) in layout.iter().enumerate() {
                let c = if cfg.verify_memory_at_stop {
                    region_checksum(r)
                } else {
                    finish_region(s.sums[ri], r.size)
                };
                s.stats.checksums.push((r.idstr.clone(), c));
                s.out.put(&c.to_le_bytes())?;
            }
            s.out.seal()?;
            s.out.w.flush()?;
            Ok(())
        });
        s.stats.downtime = t0.elapsed();
        pause(false);
        done?;
        break;
    }
    s.stats.bytes = s.out.bytes;
    s.stats.total = start.elapsed();
    Ok(s.stats)
}

/// Counts and checksums what it reads; end of stream is `Truncated`.
struct In<R: Read> {
    r: R,
    sum: Checksum,
}

impl<R: Read> In<R> {
    /// Reads bytes the stream checksum covers.
    fn get(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        self.raw(buf, what)?;
        self.sum.update(buf);
        Ok(())
    }
    /// Reads page contents (covered by their digests).
    fn raw(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        match self.r.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(MigrationError::Truncated(what))
            }
            Err(e) => Err(e.into()),
        }
    }
    fn u8(&mut self, what: &'static str) -> Result<u8> {
        let mut b = [0u8; 1];
        self.get(&mut b, what)?;
        Ok(b[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16> {
        let mut b = [0u8; 2];
        self.get(&mut b, what)?;
        Ok(u16::from_le_bytes(b))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32> {
        let mut b = [0u8; 4];
        self.get(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64> {
        let mut b = [0u8; 8];
        self.get(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Reads the sender's checksum of everything since the previous one.
    fn check_seal(&mut self, what: &'static str) -> Result<()> {
        let want = std::mem::take(&mut self.sum).finish();
        let mut b = [0u8; 8];
        self.raw(&mut b, what)?;
        if u64::from_le_bytes(b) != want {
            return Err(MigrationError::Corrupt(format!(
                "checksum mismatch in {what}"
            )));
        }
        Ok(())
    }
}

/// What a receiver did.
#[derive(Debug, Clone, Default)]
pub struct ReceiveStats {
    /// Rounds received.
    pub rounds: u32,
    /// Pages received (contents and zero flags).
    pub records: u64,
    /// Regions whose memory was replaced by moving the received pages in
    /// (O(1), [`ReceiveConfig::move_pages`]); the others were copied.
    pub swapped: usize,
    /// Per-region content checksums of the import (idstr, checksum), as
    /// verified against the sender's before the commit.
    pub checksums: Vec<(String, u64)>,
}

/// The memory a region's pages are received into, and what arrived.
struct Incoming {
    block: RamBlock,
    /// Pages received at least once.
    got: Vec<u64>,
    /// Pages whose last copy had contents (the others are zeros).
    data: Vec<u64>,
    terms: Vec<u64>,
    sum: u64,
}

fn bit(words: &[u64], p: u64) -> bool {
    words[(p / 64) as usize] & (1 << (p % 64)) != 0
}
fn set_bit(words: &mut [u64], p: u64, on: bool) {
    let w = &mut words[(p / 64) as usize];
    if on {
        *w |= 1 << (p % 64);
    } else {
        *w &= !(1 << (p % 64));
    }
}

impl Incoming {
    /// The prepared memory as a byte slice.
    fn bytes(&mut self, size: u64) -> &mut [u8] {
        // SAFETY: `block` was created by `receive` for this import and its
        // address never left this struct: no other thread, reference or
        // device can access it, so a unique slice over its `size` bytes
        // (the block is at least that large) aliases nothing. The `&mut
        // self` borrow bounds the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.block.host_addr(), size as usize) }
    }

    fn account(&mut self, page: u64, digest: u64, data: bool) {
        let t = page_term(page, digest);
        let old = std::mem::replace(&mut self.terms[page as usize], t);
        self.sum = self.sum.wrapping_sub(old).wrapping_add(t);
        set_bit(&mut self.got, page, true);
        set_bit(&mut self.data, page, data);
    }
}

/// Replaces region `r`'s memory with `inc`'s by moving its pages (module
/// docs); `false` when that is not possible here (the caller copies).
#[cfg(all(target_os = "linux", not(miri)))]
fn swap_in(r: &RamRegion, inc: &Incoming) -> bool {
    use rustix::mm::MremapFlags;
    let block = r.backend.block();
    let len = r.size as usize;
    // The host's page, not the target's: the kernel rounds the length up
    // to it, so a 4 KiB-multiple size on a 16 KiB or 64 KiB page host
    // would replace memory past the region's end.
    let page = rustix::param::page_size() as u64;
    if block.backing() != RamBacking::Anonymous
        || r.offset % page != 0
        || r.size % page != 0
        || r.size == 0
        || r.offset + r.size > block.size()
    {
        return false;
    }
    // SAFETY: the destination `[host_addr + offset, + size)` lies inside
    // the block's private anonymous mapping (checked above), which the
    // `Arc` in `r.backend` keeps mapped for the call; the source is the
    // whole of `inc.block`'s mapping, private to this import. memtree
    // never forms Rust references into guest RAM (every access copies
    // through raw pointers, and `inc.bytes` slices are gone by now), so
    // no reference observes the change. The kernel moves the pages under
    // its mmap lock: the destination stays mapped throughout and any
    // concurrent access (another thread, a KVM vCPU through its MMU
    // notifier) sees the old or the new page, never a hole.
    // `MREMAP_DONTUNMAP` leaves the source mapped (now empty), so
    // `inc.block`'s `Drop` unmaps its own range and nothing else. Pages a
    // caller pinned in the kernel through the public `host_addr()` stay
    // allocated to their pin (no use after free) but no longer back the
    // region: the module docs state the rule that avoids it.
    // Offset and length are multiples of the host page (checked above), so
    // exactly `[dst, dst + size)` is replaced and nothing after it: the
    // block's mapping starts on a host page (an mmap result).
    unsafe {
        let dst = block.host_addr().add(r.offset as usize);
        rustix::mm::mremap_fixed(
            inc.block.host_addr().cast(),
            len,
            len,
            MremapFlags::MAYMOVE | MremapFlags::DONTUNMAP,
            dst.cast(),
        )
        .is_ok()
    }
}

#[cfg(not(all(target_os = "linux", not(miri))))]
fn swap_in(_: &RamRegion, _: &Incoming) -> bool {
    false
}

/// Replaces region `r`'s memory with `inc`'s by copying: the pages
/// received with contents are copied, the zero pages are zeroed in place
/// (a memfd or file: the range is punched out, which frees its pages;
/// otherwise, or if the file refuses, written with zeros), so neither the
/// prepared block's zero pages nor the region's are touched needlessly.
fn copy_in(r: &RamRegion, inc: &mut Incoming) {
    let block = r.backend.block();
    let pages = r.pages();
    let mut zeros: Vec<u8> = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    let mut p = 0;
    while p < pages {
        let data = bit(&inc.data, p);
        let mut q = p + 1;
        while q < pages && q - p < RUN_PAGES && bit(&inc.data, q) == data {
            q += 1;
        }
        let at = (p * TARGET_PAGE_SIZE) as usize;
        let len = r.run_len(p, q - p);
        let dst = r.offset + at as u64;
        if data {
            // In range: the region lies in its block.
            let _ = block.write(dst, &inc.bytes(r.size)[at..at + len]);
        } else if !punch_zeros(block, dst, len as u64) {
            // Only the pages that are not zeros already are written:
            // reading a never-written page of private anonymous memory
            // maps the shared zero page and costs no memory.
            zeros.resize(RUN_BYTES, 0);
            current.resize(RUN_BYTES, 0);
            let _ = block.read(dst, &mut current[..len]);
            for (k, page) in current[..len].chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    let _ = block.write(dst + (k * PAGE) as u64, &zeros[..page.len()]);
                }
            }
        }
        p = q;
    }
}

/// Zeroes `[offset, offset + len)` of a file-backed block by punching it
/// out of the file (the block maps its file from offset 0); `false` when
/// the block has no file or the file refuses.
#[cfg(all(target_os = "linux", not(miri)))]
fn punch_zeros(block: &RamBlock, offset: u64, len: u64) -> bool {
    use rustix::fs::FallocateFlags;
    block.fd().is_some_and(|fd| {
        rustix::fs::fallocate(
            fd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .is_ok()
    })
}

#[cfg(not(all(target_os = "linux", not(miri))))]
fn punch_zeros(_: &RamBlock, _: u64, _: u64) -> bool {
    false
}

/// Receiver settings.
#[derive(Debug, Clone, Default)]
pub struct ReceiveConfig {
    /// Commit a region by moving the received pages over its memory where
    /// possible (O(1), module docs) instead of copying them. Opt-in: the
    /// move replaces the physical pages behind the region's host
    /// addresses, so it is only right for a machine whose RAM no kernel
    /// pin or memory policy refers to yet (module docs, "Receiver").
    pub move_pages: bool,
    /// Set to cancel (checked before every record): `receive` returns
    /// [`MigrationError::Cancelled`] and the machine is unchanged. A read
    /// blocked on a silent sender returns only with a read timeout on the
    /// stream (module docs).
    pub cancel: Arc<AtomicBool>,
}

/// Receives a stream written by [`send`] into the RAM of `space` (module
/// docs) with the default [`ReceiveConfig`] (copying, not moving, the
/// pages in): the machine's RAM changes only once the whole stream was
/// received and verified.
pub fn receive<R: Read>(machine: &Machine, space: SpaceId, input: R) -> Result<ReceiveStats> {
    receive_with(machine, space, input, &ReceiveConfig::default())
}

/// [`receive`] with settings.
pub fn receive_with<R: Read>(
    machine: &Machine,
    space: SpaceId,
    input: R,
    cfg: &ReceiveConfig,
) -> Result<ReceiveStats> {
    let layout = ram_layout(machine, space)?;
    let mut i = In {
        r: std::io::BufReader::with_capacity(256 << 10, input),
        sum: Checksum::default(),
    };
    let mut magic = [0u8; 8];
    i.get(&mut magic, "the magic")?;
    if &magic != MAGIC {
        return Err(MigrationError::BadMagic);
    }
    let version = i.u32("the version")?;
    if version != VERSION {
        return Err(MigrationError::UnsupportedVersion(version));
    }
    let page_size = i.u32("the page size")?;
    if page_size != PAGE as u32 {
        return Err(MigrationError::PageSizeMismatch {
            ours: PAGE as u32,
            theirs: page_size,
        });
    }
    let count = i.u32("the region count")?;
    if count > 1 << 16 {
        return Err(MigrationError::Corrupt(format!("{count} regions")));
    }
    let mut theirs = Vec::new();
    for _ in 0..count {
        let n = i.u16("a region idstr")?;
        let mut id = vec![0u8; usize::from(n)];
        i.get(&mut id, "a region idstr")?;
        let size = i.u64("a region size")?;
        let addr = i.u64("a region address")?;
        let off = i.u64("a region offset")?;
        theirs.push((String::from_utf8_lossy(&id).into_owned(), size, addr, off));
    }
    i.check_seal("the header")?;
    let ours: Vec<(String, u64, u64, u64)> = layout
        .iter()
        .map(|r| (r.idstr.clone(), r.size, r.addr, r.offset_in_region))
        .collect();
    if ours != theirs {
        let show = |v: &[(String, u64, u64, u64)]| -> String {
            v.iter()
                .map(|(n, s, a, o)| format!("\"{n}\" {s:#x} bytes at {a:#x} (+{o:#x})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(MigrationError::LayoutMismatch(format!(
            "stream has [{}], this machine has [{}]",
            show(&theirs),
            show(&ours)
        )));
    }

    // The prepared memory: fresh anonymous blocks (MAP_NORESERVE: only
    // pages received with contents cost memory).
    let mut incoming = Vec::new();
    for r in &layout {
        let block = RamBlock::new(
            &format!("migration-incoming:{}", r.idstr),
            r.size.max(1),
            RamBacking::Anonymous,
        )
        .map_err(|e| MigrationError::Scratch(e.to_string()))?;
        // No MADV_HUGEPAGE here: with THP in `madvise` mode each page
        // received would fault in a whole huge page, and the move would
        // carry that advice into the region for good.
        let words = r.pages().div_ceil(64) as usize;
        incoming.push(Incoming {
            block,
            got: vec![0; words],
            data: vec![0; words],
            terms: vec![0; r.pages() as usize],
            sum: 0,
        });
    }
    let zero_full = page_digest(&[0u8; PAGE]).0;
    let mut stats = ReceiveStats::default();
    let mut digests = vec![0u8; 8 * RUN_PAGES as usize];
    let mut in_round = 0u64;
    let sums = loop {
        if cfg.cancel.load(Ordering::Relaxed) {
            return Err(MigrationError::Cancelled);
        }
        let tag = i.u8("a record tag")?;
        match tag {
            TAG_DATA | TAG_ZERO => {
                let mut head = [0u8; 16];
                i.get(&mut head, "a page record")?;
                let ri = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
                let first = u64::from_le_bytes(head[4..12].try_into().unwrap_or_default());
                let n = u64::from(u32::from_le_bytes(
                    head[12..16].try_into().unwrap_or_default(),
                ));
                let Some(r) = layout.get(ri) else {
                    return Err(MigrationError::Corrupt(format!("region index {ri}")));
                };
                if n == 0 || n > RUN_PAGES || first >= r.pages() || r.pages() - first < n {
                    return Err(MigrationError::Corrupt(format!(
                        "pages {first}+{n} of region \"{}\" ({} pages)",
                        r.idstr,
                        r.pages()
                    )));
                }
                let inc = &mut incoming[ri];
                let base = (first * TARGET_PAGE_SIZE) as usize;
                let len = r.run_len(first, n);
                if tag == TAG_DATA {
                    let ds = &mut digests[..8 * n as usize];
                    i.get(ds, "page digests")?;
                    let bytes = &mut inc.bytes(r.size)[base..base + len];
                    i.raw(bytes, "page contents")?;
                    for k in 0..n {
                        let p = first + k;
                        let a = k as usize * PAGE;
                        let page = &bytes[a..(a + PAGE).min(len)];
                        let (d, _) = page_digest(page);
                        let at = k as usize * 8;
                        let want =
                            u64::from_le_bytes(ds[at..at + 8].try_into().unwrap_or_default());
                        if d != want {
                            return Err(MigrationError::Corrupt(format!(
                                "page {p} of region \"{}\" does not match its digest",
                                r.idstr
                            )));
                        }
                    }
                    for k in 0..n {
                        let want = u64::from_le_bytes(
                            ds[k as usize * 8..k as usize * 8 + 8]
                                .try_into()
                                .unwrap_or_default(),
                        );
                        inc.account(first + k, want, true);
                    }
                } else {
                    for p in first..first + n {
                        let plen = r.page_len(p);
                        if bit(&inc.data, p) {
                            // Contents from an earlier round: now zeros.
                            let a = (p * TARGET_PAGE_SIZE) as usize;
                            inc.bytes(r.size)[a..a + plen].fill(0);
                        }
                        let d = if plen == PAGE {
                            zero_full
                        } else {
                            page_digest(&vec![0u8; plen]).0
                        };
                        inc.account(p, d, false);
                    }
                }
                in_round += n;
                stats.records += n;
            }
            TAG_ROUND => {
                let round = i.u32("a round record")?;
                let n = i.u64("a round record")?;
                i.check_seal("a round")?;
                if n != in_round || round != stats.rounds + 1 {
                    return Err(MigrationError::Corrupt(format!(
                        "round {round} announces {n} pages, {in_round} received"
                    )));
                }
                stats.rounds = round;
                in_round = 0;
            }
            TAG_DONE => {
                let mut sums = Vec::new();
                for _ in &layout {
                    sums.push(i.u64("the final checksums")?);
                }
                i.check_seal("the final record")?;
                break sums;
            }
            TAG_CANCEL => return Err(MigrationError::Cancelled),
            t => {
                return Err(MigrationError::Corrupt(format!(
                    "unknown record tag {t:#x}"
                )))
            }
        }
    };
    if in_round != 0 {
        return Err(MigrationError::Corrupt("pages after the last round".into()));
    }
    // Every page received, and the received contents are the sender's.
    for (ri, r) in layout.iter().enumerate() {
        let inc = &incoming[ri];
        if let Some(p) = (0..r.pages()).find(|&p| !bit(&inc.got, p)) {
            return Err(MigrationError::Corrupt(format!(
                "page {p} of region \"{}\" was never sent",
                r.idstr
            )));
        }
        if finish_region(inc.sum, r.size) != sums[ri] {
            return Err(MigrationError::ContentMismatch(r.idstr.clone()));
        }
    }
    // Commit, inside one transaction: it holds the topology lock, so no
    // edit lands between the layout check and the last page written (the
    // layout read before the stream may be stale: a region replaced,
    // unplugged or resized meanwhile is not the memory prepared for).
    machine.transaction(|machine| -> Result<()> {
        check_layout(machine, space, &layout, "while the stream was received")?;
        let view = machine.address_space(space)?.view();
        // Nothing below can fail. Each prepared block is freed as soon as
        // its region holds the import: at most one region's worth of
        // received pages is held twice.
        for ((ri, r), mut inc) in layout.iter().enumerate().zip(incoming) {
            if cfg.move_pages && swap_in(r, &inc) {
                stats.swapped += 1;
            } else {
                copy_in(r, &mut inc);
            }
            drop(inc);
            // The import is a write like any other (QEMU treats incoming
            // RAM as dirty): the whole region, for every client tracking
            // it and every client tracking its block.
            let mask = view
                .ranges_of(r.region)
                .fold(0u8, |m, x| m | x.dirty_log_mask());
            let log = r.backend.block().dirty_log();
            log.mark(mask, r.offset, r.size);
            log.mark_live(r.offset, r.size);
            stats.checksums.push((r.idstr.clone(), sums[ri]));
        }
        Ok(())
    })?;
    Ok(stats)
}

/// Content checksums of every region of `space` (idstr, checksum),
/// computed from memory.
pub fn checksums(machine: &Machine, space: SpaceId) -> Result<Vec<(String, u64)>> {
    Ok(ram_layout(machine, space)?
        .iter()
        .map(|r| (r.idstr.clone(), region_checksum(r)))
        .collect())
}
