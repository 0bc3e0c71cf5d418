//! Live migration of a machine's RAM over any byte stream (a Unix socket,
//! a TCP connection): pre-copy rounds of dirty pages while the source keeps
//! running, a stop-and-copy round, and a verification of every region.
//!
//! # What moves
//!
//! The RAM of one address space: every distinct RAM region its view reaches
//! (not ROM devices, not RAM devices), in address order of first
//! appearance, identified by name and size. Both machines must have the
//! same layout; the receiver checks it before it reads a page.
//!
//! # Sender ([`send`])
//!
//! 1. Header (layout, page size), then global dirty tracking starts (the
//!    MIGRATION client, [`crate::dirty`]) and its bits are cleared.
//! 2. Round 1 sends every page (a page of zeros as a 13-byte record).
//! 3. Each further round sends the pages dirtied since the previous one
//!    ([`crate::Machine::take_dirty_ram`]), while writers keep running.
//! 4. When a round finds at most [`SendConfig::stop_threshold_pages`]
//!    dirty pages (or after [`SendConfig::max_rounds`]), `pause(true)` stops
//!    the writers, the last dirty pages and the per-region checksums are
//!    sent, and `pause(false)` resumes them: the downtime.
//!
//! Cancelling ([`SendConfig::cancel`]) is checked before every round and
//! every 1024 pages: the sender writes a cancel record (if it can), stops
//! tracking and returns [`MigrationError::Cancelled`]; the source never
//! stopped (it is only paused inside the final round, which is not
//! cancellable). Any error on the sender stops tracking too.
//!
//! # Stream format (version 1, little-endian)
//!
//! * Header: magic `MTMIGRAT`, version `u32`, page size `u32`, region
//!   count `u32`, per region a `u16` name length, the name, a `u64` size;
//!   then a checksum of the header.
//! * Records, each a tag byte: `PAGE` (region `u32`, page `u64`, the page's
//!   bytes), `ZERO` (region, page), `ROUND` (round `u32`, record count
//!   `u64`, checksum of every byte since the previous checksum), `DONE`
//!   (one content checksum per region, then the stream checksum),
//!   `CANCEL`.
//!
//! # Receiver ([`receive`])
//!
//! Never a partial import: pages are staged in scratch memory (fresh
//! anonymous RAM blocks, so only pages received cost memory) and the
//! machine's RAM is written only after the `DONE` record arrived, every
//! stream checksum matched, every page of every region was received and the
//! staged contents match the sender's per-region checksums. A truncated,
//! corrupted or mismatched stream (magic, version, page size, layout,
//! region or page out of range, unknown tag, checksum) ends in a precise
//! [`MigrationError`] and leaves the machine as it was.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::access::ram::{RamBacking, RamBlock};
use crate::dirty::{DirtyClient, TARGET_PAGE_SIZE};
use crate::dma::backend::MemoryBackend;
use crate::topology::region::{Backing, RegionKind};
use crate::{Machine, SpaceId, TopologyError};

const MAGIC: &[u8; 8] = b"MTMIGRAT";
/// The stream format version this module writes and reads.
pub const VERSION: u32 = 1;
const TAG_PAGE: u8 = 1;
const TAG_ZERO: u8 = 2;
const TAG_ROUND: u8 = 3;
const TAG_DONE: u8 = 4;
const TAG_CANCEL: u8 = 5;
const PAGE: usize = TARGET_PAGE_SIZE as usize;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
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
    PageSizeMismatch { ours: u32, theirs: u32 },
    /// The sender's RAM layout differs from the receiver's.
    #[error("RAM layout mismatch: {0}")]
    LayoutMismatch(String),
    /// The stream is malformed or its checksum does not match.
    #[error("corrupted migration stream: {0}")]
    Corrupt(String),
    /// The staged contents differ from what the sender had.
    #[error("region \"{0}\" does not match the sender's checksum after transfer")]
    ContentMismatch(String),
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
    /// The region's name (its identity across machines).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    backend: Arc<MemoryBackend>,
    offset: u64,
}

impl RamRegion {
    fn read(&self, at: u64, buf: &mut [u8]) {
        // In range: `at + len <= size` and the region lies in its backend.
        let _ = self.backend.block().read(self.offset + at, buf);
    }
    fn write(&self, at: u64, buf: &[u8]) {
        let _ = self.backend.block().write(self.offset + at, buf);
    }
    fn pages(&self) -> u64 {
        self.size.div_ceil(TARGET_PAGE_SIZE)
    }
    fn page_len(&self, page: u64) -> usize {
        (self.size - page * TARGET_PAGE_SIZE).min(TARGET_PAGE_SIZE) as usize
    }
}

/// The RAM regions of `space` a migration moves (module docs).
pub fn ram_layout(machine: &Machine, space: SpaceId) -> Result<Vec<RamRegion>> {
    let view = machine.address_space(space)?.view();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for r in view.ranges() {
        let core = r.region();
        if core.kind() != RegionKind::Ram || !seen.insert(core.id()) {
            continue;
        }
        if let Backing::Ram { block, offset } = core.backing() {
            let size = machine.region_info(core.id())?.size;
            out.push(RamRegion {
                name: core.name().to_owned(),
                size: u64::try_from(size).unwrap_or(u64::MAX),
                backend: block.clone(),
                offset: *offset,
            });
        }
    }
    Ok(out)
}

/// A 64-bit checksum (not cryptographic): four multiply-rotate lanes over
/// 8-byte words, fast enough to hash RAM at memory speed.
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
    const K: u64 = 0x9e37_79b9_7f4a_7c15;

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
            *lane = (lane.rotate_left(29) ^ w).wrapping_mul(Self::K);
        }
    }

    /// The checksum of everything added.
    pub fn finish(&self) -> u64 {
        let mut h = self.len.wrapping_mul(Self::K);
        for &l in &self.lanes {
            h = (h.rotate_left(23) ^ l).wrapping_mul(Self::K);
        }
        for &b in &self.tail {
            h = (h.rotate_left(8) ^ u64::from(b)).wrapping_mul(Self::K);
        }
        h ^ (h >> 29)
    }
}

/// The content checksum of `len` bytes read by `read(at, buf)`.
fn checksum_of(len: u64, mut read: impl FnMut(u64, &mut [u8])) -> u64 {
    let mut c = Checksum::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        read(at, &mut buf[..n]);
        c.update(&buf[..n]);
        at += n as u64;
    }
    c.finish()
}

/// The content checksum of a region (what `DONE` carries).
pub fn region_checksum(r: &RamRegion) -> u64 {
    checksum_of(r.size, |at, b| r.read(at, b))
}

/// Sender settings.
#[derive(Debug, Clone)]
pub struct SendConfig {
    /// Stop and copy once a round finds at most this many dirty pages.
    pub stop_threshold_pages: u64,
    /// Stop and copy after this many rounds whatever the dirty set.
    pub max_rounds: u32,
    /// Set to cancel (checked before every round and every 1024 pages).
    pub cancel: Arc<AtomicBool>,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            stop_threshold_pages: 512,
            max_rounds: 30,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// What a migration did.
#[derive(Debug, Clone, Default)]
pub struct MigrationStats {
    /// Rounds, the stop-and-copy round included.
    pub rounds: u32,
    /// Pages sent per round.
    pub pages_per_round: Vec<u64>,
    /// Pages sent with their contents.
    pub pages_sent: u64,
    /// Pages sent as zero records.
    pub zero_pages: u64,
    /// Bytes written to the stream.
    pub bytes: u64,
    /// How long the writers were paused (the stop-and-copy round,
    /// checksumming included).
    pub downtime: Duration,
    /// The part of the downtime spent checksumming every region.
    pub checksum_time: Duration,
    /// Whole migration.
    pub total: Duration,
    /// Per-region content checksums at the stop (name, checksum).
    pub checksums: Vec<(String, u64)>,
}

/// Counts and checksums what it writes.
struct Out<W: Write> {
    w: W,
    sum: Checksum,
    bytes: u64,
}

impl<W: Write> Out<W> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.sum.update(b);
        self.bytes += b.len() as u64;
        self.w.write_all(b)?;
        Ok(())
    }
    /// Writes the checksum of everything since the previous one.
    fn seal(&mut self) -> Result<()> {
        let s = std::mem::take(&mut self.sum).finish();
        self.bytes += 8;
        self.w.write_all(&s.to_le_bytes())?;
        Ok(())
    }
}

/// Stops global tracking when the sender ends, however it ends.
struct Tracking<'m>(&'m Machine);
impl Drop for Tracking<'_> {
    fn drop(&mut self) {
        let _ = self.0.global_dirty_log_stop();
    }
}

/// Sends the RAM of `space` to `out` (module docs). `pause(true)` must stop
/// every writer of the machine's RAM and return once they stopped;
/// `pause(false)` resumes them.
pub fn send<W: Write>(
    machine: &Machine,
    space: SpaceId,
    out: W,
    cfg: &SendConfig,
    mut pause: impl FnMut(bool),
) -> Result<MigrationStats> {
    let start = Instant::now();
    let layout = ram_layout(machine, space)?;
    let mut o = Out {
        w: std::io::BufWriter::with_capacity(1 << 20, out),
        sum: Checksum::default(),
        bytes: 0,
    };
    o.put(MAGIC)?;
    o.put(&VERSION.to_le_bytes())?;
    o.put(&(PAGE as u32).to_le_bytes())?;
    o.put(&(layout.len() as u32).to_le_bytes())?;
    for r in &layout {
        let name = r.name.as_bytes();
        let n = u16::try_from(name.len())
            .map_err(|_| MigrationError::LayoutMismatch(format!("name too long: {}", r.name)))?;
        o.put(&n.to_le_bytes())?;
        o.put(name)?;
        o.put(&r.size.to_le_bytes())?;
    }
    o.seal()?;

    machine.global_dirty_log_start()?;
    let _tracking = Tracking(machine);
    // Round 1 sends everything: earlier bits mean nothing.
    machine.take_dirty_ram(space, DirtyClient::MIGRATION)?;
    let mut stats = MigrationStats::default();
    // One record: tag, region, page number, contents.
    let mut rec = vec![0u8; 13 + PAGE];
    let mut records = 0u64;
    let cancelled = |o: &mut Out<std::io::BufWriter<W>>| -> MigrationError {
        let _ = o.put(&[TAG_CANCEL]);
        let _ = o.w.flush();
        MigrationError::Cancelled
    };
    let mut send_page = |o: &mut Out<std::io::BufWriter<W>>,
                         stats: &mut MigrationStats,
                         ri: usize,
                         p: u64|
     -> Result<()> {
        let r = &layout[ri];
        let len = r.page_len(p);
        let page = &mut rec[13..];
        page[len..].fill(0);
        r.read(p * TARGET_PAGE_SIZE, &mut page[..len]);
        let zero = page
            .chunks_exact(8)
            .all(|w| u64::from_ne_bytes(w.try_into().unwrap_or_default()) == 0);
        rec[0] = if zero { TAG_ZERO } else { TAG_PAGE };
        rec[1..5].copy_from_slice(&(ri as u32).to_le_bytes());
        rec[5..13].copy_from_slice(&p.to_le_bytes());
        if zero {
            stats.zero_pages += 1;
            o.put(&rec[..13])
        } else {
            stats.pages_sent += 1;
            o.put(&rec)
        }
    };
    let end_round = |o: &mut Out<std::io::BufWriter<W>>, round: u32, n: u64| -> Result<()> {
        o.put(&[TAG_ROUND])?;
        o.put(&round.to_le_bytes())?;
        o.put(&n.to_le_bytes())?;
        o.seal()
    };

    // Round 1.
    let mut n = 0u64;
    for (ri, r) in layout.iter().enumerate() {
        for p in 0..r.pages() {
            if n % 1024 == 0 && cfg.cancel.load(Ordering::Relaxed) {
                return Err(cancelled(&mut o));
            }
            send_page(&mut o, &mut stats, ri, p)?;
            n += 1;
        }
    }
    records += n;
    stats.rounds = 1;
    stats.pages_per_round.push(n);
    end_round(&mut o, 1, n)?;

    let index_of = |name: &str| layout.iter().position(|r| r.name == name);
    loop {
        if cfg.cancel.load(Ordering::Relaxed) {
            return Err(cancelled(&mut o));
        }
        let dirty = machine.take_dirty_ram(space, DirtyClient::MIGRATION)?;
        let count: u64 = dirty.iter().map(|d| d.dirty.count()).sum();
        let last = count <= cfg.stop_threshold_pages || stats.rounds >= cfg.max_rounds;
        let mut dirty = dirty;
        let t0 = Instant::now();
        if last {
            pause(true);
            // Everything written up to the pause, merged.
            let more = machine.take_dirty_ram(space, DirtyClient::MIGRATION);
            match more {
                Ok(more) => dirty.extend(more),
                Err(e) => {
                    pause(false);
                    return Err(e.into());
                }
            }
        }
        let mut sent = 0u64;
        let mut result = Ok(());
        let mut pages: Vec<(usize, u64)> = Vec::new();
        for d in &dirty {
            let Some(ri) = index_of(&d.name) else {
                continue; // a region plugged during migration: not in the layout
            };
            pages.extend(d.dirty.pages().map(|off| (ri, off / TARGET_PAGE_SIZE)));
        }
        pages.sort_unstable();
        pages.dedup();
        for &(ri, p) in &pages {
            if p >= layout[ri].pages() {
                continue;
            }
            if !last && sent % 1024 == 0 && cfg.cancel.load(Ordering::Relaxed) {
                return Err(cancelled(&mut o));
            }
            if let Err(e) = send_page(&mut o, &mut stats, ri, p) {
                result = Err(e);
                break;
            }
            sent += 1;
        }
        stats.rounds += 1;
        stats.pages_per_round.push(sent);
        records += sent;
        if !last {
            result?;
            end_round(&mut o, stats.rounds, sent)?;
            continue;
        }
        // Stop-and-copy: finish the round, checksums, DONE, resume.
        let done = result.and_then(|()| {
            end_round(&mut o, stats.rounds, sent)?;
            o.put(&[TAG_DONE])?;
            let t1 = Instant::now();
            for r in &layout {
                let c = region_checksum(r);
                stats.checksums.push((r.name.clone(), c));
                o.put(&c.to_le_bytes())?;
            }
            stats.checksum_time = t1.elapsed();
            o.seal()?;
            o.w.flush()?;
            Ok(())
        });
        stats.downtime = t0.elapsed();
        pause(false);
        done?;
        break;
    }
    let _ = records;
    stats.bytes = o.bytes;
    stats.total = start.elapsed();
    Ok(stats)
}

/// Counts and checksums what it reads; end of stream is `Truncated`.
struct In<R: Read> {
    r: R,
    sum: Checksum,
}

impl<R: Read> In<R> {
    fn get(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.sum.update(buf);
                Ok(())
            }
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
        match self.r.read_exact(&mut b) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(MigrationError::Truncated(what))
            }
            Err(e) => return Err(e.into()),
        }
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
    /// Page records received (contents and zero).
    pub records: u64,
    /// Per-region content checksums of the import (name, checksum), as
    /// verified against the sender's before the commit.
    pub checksums: Vec<(String, u64)>,
}

/// Receives a stream written by [`send`] into the RAM of `space` (module
/// docs): the machine's RAM is written only once the whole stream was
/// received and verified.
pub fn receive<R: Read>(machine: &Machine, space: SpaceId, input: R) -> Result<ReceiveStats> {
    let layout = ram_layout(machine, space)?;
    let mut i = In {
        r: std::io::BufReader::with_capacity(1 << 20, input),
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
    let mut theirs = Vec::new();
    for _ in 0..count.min(1 << 16) {
        let n = i.u16("a region name")?;
        let mut name = vec![0u8; usize::from(n)];
        i.get(&mut name, "a region name")?;
        let size = i.u64("a region size")?;
        theirs.push((String::from_utf8_lossy(&name).into_owned(), size));
    }
    if count > 1 << 16 {
        return Err(MigrationError::Corrupt(format!("{count} regions")));
    }
    i.check_seal("the header")?;
    let ours: Vec<(String, u64)> = layout.iter().map(|r| (r.name.clone(), r.size)).collect();
    if ours != theirs {
        return Err(MigrationError::LayoutMismatch(format!(
            "stream has {theirs:?}, this machine has {ours:?}"
        )));
    }

    // Scratch: fresh anonymous blocks (MAP_NORESERVE: only pages received
    // cost memory) and one "received" bit per page.
    let mut scratch = Vec::new();
    for r in &layout {
        let b = RamBlock::new(
            &format!("migration-scratch:{}", r.name),
            r.size.max(1),
            RamBacking::Anonymous,
        )
        .map_err(|e| MigrationError::Scratch(e.to_string()))?;
        scratch.push((b, vec![0u64; r.pages().div_ceil(64) as usize]));
    }
    let mut stats = ReceiveStats::default();
    let mut page = vec![0u8; PAGE];
    let zero = vec![0u8; PAGE];
    let mut in_round = 0u64;
    let sums = loop {
        let tag = i.u8("a record tag")?;
        match tag {
            TAG_PAGE | TAG_ZERO => {
                let mut head = [0u8; 12];
                i.get(&mut head, "a page record")?;
                let ri = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
                let p = u64::from_le_bytes(head[4..].try_into().unwrap_or_default());
                let Some(r) = layout.get(ri) else {
                    return Err(MigrationError::Corrupt(format!("region index {ri}")));
                };
                if p >= r.pages() {
                    return Err(MigrationError::Corrupt(format!(
                        "page {p} of region \"{}\" ({} pages)",
                        r.name,
                        r.pages()
                    )));
                }
                let data = if tag == TAG_PAGE {
                    i.get(&mut page, "page contents")?;
                    &page[..]
                } else {
                    &zero[..]
                };
                let (block, got) = &mut scratch[ri];
                let len = r.page_len(p);
                let _ = block.write(p * TARGET_PAGE_SIZE, &data[..len]);
                got[(p / 64) as usize] |= 1 << (p % 64);
                in_round += 1;
                stats.records += 1;
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
    // Every page received, and the staged contents are the sender's.
    for (ri, r) in layout.iter().enumerate() {
        let (block, got) = &scratch[ri];
        if let Some(p) = (0..r.pages()).find(|&p| got[(p / 64) as usize] & (1 << (p % 64)) == 0) {
            return Err(MigrationError::Corrupt(format!(
                "page {p} of region \"{}\" was never sent",
                r.name
            )));
        }
        let c = checksum_of(r.size, |at, b| {
            let _ = block.read(at, b);
        });
        if c != sums[ri] {
            return Err(MigrationError::ContentMismatch(r.name.clone()));
        }
    }
    // Commit.
    let mut buf = vec![0u8; 1 << 20];
    for (ri, r) in layout.iter().enumerate() {
        let block = &scratch[ri].0;
        let mut at = 0;
        while at < r.size {
            let n = (r.size - at).min(buf.len() as u64) as usize;
            let _ = block.read(at, &mut buf[..n]);
            r.write(at, &buf[..n]);
            at += n as u64;
        }
        // Verified above: the staged contents, now the machine's.
        stats.checksums.push((r.name.clone(), sums[ri]));
    }
    Ok(stats)
}

/// Content checksums of every region of `space` (name, checksum).
pub fn checksums(machine: &Machine, space: SpaceId) -> Result<Vec<(String, u64)>> {
    Ok(ram_layout(machine, space)?
        .iter()
        .map(|r| (r.name.clone(), region_checksum(r)))
        .collect())
}
