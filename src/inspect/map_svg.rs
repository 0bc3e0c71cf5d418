//! Memory maps as SVG pictures (`memtree map`).
//!
//! [`collect`] gathers what a picture of one address space needs: its flat
//! view (every range with its serving region, type, priority and offset),
//! the alias hops through which each range is reached, and, from
//! [`crate::inspect::lookup::explain`], the regions each range obscures. [`render`]
//! draws one [`SpaceMap`]; [`render_diff`] draws two side by side on one
//! address axis with the ranges that differ highlighted. Both are pure
//! functions from data to a `String`.
//!
//! # What the picture promises
//!
//! * Every flat range is drawn exactly once, in address order, as a `<rect>`
//!   carrying `data-kind="range"`, `data-start`, `data-end` (inclusive, like
//!   `info mtree -f`) and `data-region`; every gap of the view up to the end
//!   of its root region is drawn as a `data-kind="hole"` rect. Together they
//!   tile the address space without overlap.
//! * Heights are to scale (`data-scale="linear"`, one pixel for the same
//!   number of bytes everywhere) within a band of sizes chosen to hold as many
//!   pieces as possible; smaller pieces are drawn at the minimum readable
//!   height (`enlarged`); larger ones, typically holes and big RAM, are
//!   compressed (`compressed`) and cut by a zigzag break with their real size
//!   in the label.
//! * In a diff, a range of one side whose `info mtree -f` line (addresses,
//!   priority, type, region, offset) is not in the other side's view is
//!   marked `data-diff="removed"`/`"added"`, or `"changed"` when the other
//!   side has a range with the same addresses; every other range is `same`.
//! * All text is XML-escaped; characters XML 1.0 cannot carry become U+FFFD.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use crate::inspect::lookup::{self, Candidate, Fate};
use crate::region::ids::{RegionId, SpaceId};
use crate::region::region_core::RegionKind;
use crate::topology::error::TopologyError;
use crate::topology::memory::Machine;
use crate::topology::tree::Topology;
use crate::view::flatview::RegionType;

/// Most region visits spent finding where candidates change inside ranges.
const BOUNDARY_BUDGET: usize = 50_000;
/// Most addresses explained per range (its start and the boundaries of the
/// regions inside it); beyond that the obscured list is marked incomplete.
const MAX_PROBES_PER_RANGE: usize = 48;
/// Most such extra addresses explained for a whole view (each `explain`
/// walks the tree): bounds the cost on machines with many ranges.
const MAX_EXTRA_PROBES: usize = 4096;
/// Most lines of a list shown in a tooltip.
const MAX_TOOLTIP_ITEMS: usize = 16;

/// One alias the render walk went through to reach a range's region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AliasHop {
    /// The alias region.
    pub alias: String,
    /// Its target.
    pub target: String,
    /// Offset in the target of the range's first address.
    pub target_offset: u64,
}

/// One range of a flat view with what the picture shows about it.
#[derive(Clone, Debug)]
pub struct MapRange {
    /// First address.
    pub start: u64,
    /// Last address (inclusive).
    pub last: u64,
    /// The serving region's name.
    pub region: String,
    /// The serving region (links ranges served by the same region).
    pub region_id: RegionId,
    /// The serving region's kind.
    pub kind: RegionKind,
    /// The type `info mtree -f` prints.
    pub printed_type: RegionType,
    /// Propagated nonvolatile flag (`nv-` in `info mtree -f`).
    pub nonvolatile: bool,
    /// The serving region's priority.
    pub priority: i32,
    /// Offset of `start` in the region.
    pub offset: u64,
    /// Region names from the physical root to the serving region.
    pub path: Vec<String>,
    /// Aliases on that path, outermost first.
    pub aliases: Vec<AliasHop>,
    /// Regions covering part of the range that lost to the serving region,
    /// each with the reason (one line each).
    pub obscures: Vec<String>,
    /// Disabled or clipped regions covering part of the range.
    pub inactive: Vec<String>,
    /// Whether `obscures`/`inactive` may miss candidates (budgets hit).
    pub incomplete: bool,
}

impl MapRange {
    /// The range's identity in a diff: what its `info mtree -f` line says.
    fn key(&self) -> (u64, u64, i32, bool, &'static str, &str, u64) {
        (
            self.start,
            self.last,
            self.priority,
            self.nonvolatile,
            self.printed_type.as_str(),
            &self.region,
            self.offset,
        )
    }

    /// The colour class of the range.
    fn class(&self) -> &'static str {
        match (self.printed_type, self.kind) {
            (RegionType::Ram, _) => "t-ram",
            (RegionType::Rom, _) => "t-rom",
            (RegionType::Romd, _) => "t-romd",
            (RegionType::Ramd, _) => "t-ramd",
            (RegionType::Io, RegionKind::IoRoot) => "t-ioroot",
            (RegionType::Io, RegionKind::Reservation) => "t-resv",
            (RegionType::Io, RegionKind::RomDevice) => "t-romdev",
            (RegionType::Io, _) => "t-mmio",
        }
    }

    fn type_label(&self) -> String {
        let nv = if self.nonvolatile { "nv-" } else { "" };
        let what = match (self.printed_type, self.kind) {
            (RegionType::Io, RegionKind::IoRoot) => "i/o, port space fill",
            (RegionType::Io, RegionKind::Reservation) => "i/o, reservation",
            (RegionType::Io, RegionKind::RomDevice) => "i/o, rom device",
            (t, _) => t.as_str(),
        };
        format!("{nv}{what}")
    }

    fn via_text(&self) -> String {
        self.aliases
            .iter()
            .map(|h| format!("{} \u{2192} {} @{:#x}", h.alias, h.target, h.target_offset))
            .collect::<Vec<_>>()
            .join(" \u{203a} ")
    }
}

/// What a picture of one address space shows.
#[derive(Clone, Debug)]
pub struct SpaceMap {
    /// The address space's name.
    pub space: String,
    /// The region rendering starts from (`None`: the empty view).
    pub root: Option<String>,
    /// End (exclusive) of the address space: the size of the region
    /// rendering starts from (of the address space's root for the empty
    /// view), at least the end of the last range.
    pub extent: u128,
    /// The flat view's ranges, in address order.
    pub ranges: Vec<MapRange>,
}

/// Gathers the picture data of address space `space`: its published flat
/// view, and for each range the path, aliases and obscured candidates that
/// [`lookup::explain`] reports at the range's start and at every boundary of
/// a region inside it.
pub fn collect(machine: &Machine, space: SpaceId) -> Result<SpaceMap, TopologyError> {
    let (name, view, extent, bounds, bounds_complete) = machine.read(|topo| {
        let s = topo.space(space)?;
        let view = s.handle.view();
        let root_size = |id: Option<RegionId>| id.and_then(|r| topo.node(r)).map(|n| n.size);
        let extent = root_size(view.root())
            .or_else(|| root_size(s.root))
            .unwrap_or(1 << 64);
        let (bounds, complete) = match view.root() {
            Some(r) => region_boundaries(topo, r),
            None => (BTreeSet::new(), true),
        };
        Ok::<_, TopologyError>((s.name.to_string(), view, extent, bounds, complete))
    })?;
    let mut ranges = Vec::with_capacity(view.len());
    let mut extra_probes = 0usize;
    for r in view.iter() {
        let a = r.attrs();
        let mut m = MapRange {
            start: r.start(),
            last: r.last(),
            region: r.region().name().to_owned(),
            region_id: r.region().id(),
            kind: r.region().kind(),
            printed_type: r.printed_type(),
            nonvolatile: a.nonvolatile,
            priority: a.priority,
            offset: r.offset_in_region(),
            path: Vec::new(),
            aliases: Vec::new(),
            obscures: Vec::new(),
            inactive: Vec::new(),
            incomplete: !bounds_complete,
        };
        let mut probes: Vec<u64> = vec![r.start()];
        // Empty for a one-byte range (a reversed range would panic).
        let inside = (r.last() > r.start())
            .then(|| bounds.range(u128::from(r.start()) + 1..=u128::from(r.last())))
            .into_iter()
            .flatten();
        for &b in inside {
            if probes.len() == MAX_PROBES_PER_RANGE || extra_probes == MAX_EXTRA_PROBES {
                m.incomplete = true;
                break;
            }
            // In range: b <= last <= u64::MAX.
            probes.push(b as u64);
            extra_probes += 1;
        }
        let mut seen: BTreeSet<(RegionId, String)> = BTreeSet::new();
        for (i, &addr) in probes.iter().enumerate() {
            let e = lookup::explain(machine, space, addr)?;
            m.incomplete |= e.truncated;
            if i == 0 {
                match &e.verdict {
                    Some(v) if v.region == m.region_id => {
                        m.path = v.path.clone();
                        m.aliases = alias_hops(&e.candidates);
                    }
                    // The view and the tree disagree: only possible if the
                    // topology changed between the two reads.
                    _ => m.incomplete = true,
                }
            }
            for c in &e.candidates {
                let list = match &c.fate {
                    Fate::Obscured { .. } => &mut m.obscures,
                    _ if !c.is_live() && c.is_notable() => &mut m.inactive,
                    _ => continue,
                };
                let line = candidate_line(c);
                if seen.insert((c.region, line.clone())) {
                    list.push(line);
                }
            }
        }
        ranges.push(m);
    }
    let end = ranges.last().map_or(0, |r| u128::from(r.last) + 1);
    Ok(SpaceMap {
        space: name,
        root: view.root_name().map(str::to_owned),
        extent: extent.max(end),
        ranges,
    })
}

/// Every address at which some region reachable from `root` starts or ends
/// (in address-space coordinates, as render places them), and whether the
/// walk finished within [`BOUNDARY_BUDGET`].
fn region_boundaries(topo: &Topology, root: RegionId) -> (BTreeSet<u128>, bool) {
    let mut out = BTreeSet::new();
    let mut stack: Vec<(RegionId, i128)> = vec![(root, 0)];
    let mut visits = 0usize;
    let clamp = |v: i128| v.clamp(0, 1 << 64) as u128;
    while let Some((id, base)) = stack.pop() {
        if visits == BOUNDARY_BUDGET {
            return (out, false);
        }
        visits += 1;
        let Some(node) = topo.node(id) else { continue };
        let start = base + i128::from(node.addr);
        out.insert(clamp(start));
        out.insert(clamp(start + node.size as i128));
        if node.kind() == RegionKind::Alias {
            if let Some(t) = node.alias_target {
                let tnode_addr = topo.node(t).map_or(0, |n| n.addr);
                let tbase = start - i128::from(node.alias_offset) - i128::from(tnode_addr);
                stack.push((t, tbase));
            }
        } else {
            stack.extend(node.subregions.iter().map(|&s| (s, start)));
        }
    }
    (out, true)
}

/// The aliases on the winner's path, outermost first, with the offset in
/// each target. The path is recovered from the rendering-order candidate
/// list: a candidate's parent is the nearest earlier candidate one level up
/// (the walk is depth-first and every region on the winner's path covers
/// the address).
fn alias_hops(cands: &[Candidate]) -> Vec<AliasHop> {
    let Some(mut i) = cands.iter().position(|c| c.fate == Fate::Serves) else {
        return Vec::new();
    };
    let mut chain = vec![i];
    while cands[i].depth > 0 {
        let want = cands[i].depth - 1;
        match cands[..i].iter().rposition(|c| c.depth == want) {
            Some(p) => {
                chain.push(p);
                i = p;
            }
            None => break,
        }
    }
    chain.reverse();
    chain
        .windows(2)
        .filter(|w| cands[w[0]].kind == RegionKind::Alias)
        .map(|w| AliasHop {
            alias: cands[w[0]].name.clone(),
            target: cands[w[1]].name.clone(),
            target_offset: u64::try_from(cands[w[1]].offset).unwrap_or(0),
        })
        .collect()
}

fn candidate_line(c: &Candidate) -> String {
    use crate::inspect::lookup::{hex, kind_word};
    format!(
        "{} [{} prio {}] {}-{}: {}",
        c.name,
        kind_word(c.kind, c.readonly),
        c.priority,
        hex(c.range.0),
        hex(c.range.1 - 1),
        c.fate
    )
}

// ---- diff ---------------------------------------------------------------

/// How a range of one side of a diff relates to the other side.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The other side has the identical range.
    Same,
    /// Only in the second machine.
    Added,
    /// Only in the first machine.
    Removed,
    /// The other side has a range with the same addresses but a different
    /// region, type, priority or offset.
    Changed,
}

impl Change {
    fn as_str(self) -> &'static str {
        match self {
            Change::Same => "same",
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Changed => "changed",
        }
    }
}

/// The change marks of the ranges of `a` and of `b`, index for index.
pub fn diff_marks(a: &SpaceMap, b: &SpaceMap) -> (Vec<Change>, Vec<Change>) {
    let mark = |this: &SpaceMap, other: &SpaceMap, gone: Change| {
        let keys: BTreeSet<_> = other.ranges.iter().map(MapRange::key).collect();
        let spans: BTreeSet<(u64, u64)> = other.ranges.iter().map(|r| (r.start, r.last)).collect();
        this.ranges
            .iter()
            .map(|r| {
                if keys.contains(&r.key()) {
                    Change::Same
                } else if spans.contains(&(r.start, r.last)) {
                    Change::Changed
                } else {
                    gone
                }
            })
            .collect::<Vec<_>>()
    };
    (mark(a, b, Change::Removed), mark(b, a, Change::Added))
}

// ---- layout -------------------------------------------------------------

const FONT: &str = "DejaVu Sans Mono, Menlo, Consolas, monospace";
/// Width of one character of the 12 px monospace font.
const CHAR_W: f64 = 7.3;
const LINE_H: f64 = 14.0;
const PAD_H: f64 = 8.0;
/// Ratio between the largest and the smallest size drawn to scale.
const LINEAR_RATIO: f64 = 4.0;
/// A compressed piece is as tall as the tallest piece drawn to scale plus
/// this many pixels per doubling beyond it, at most `COMPRESSED_EXTRA`
/// more: bigger than anything to scale, yet short.
const COMPRESSED_STEP: f64 = 3.0;
const COMPRESSED_EXTRA: f64 = 48.0;
/// Colours of the alias links, one per linked region in turn.
const LINK_COLOURS: [&str; 5] = ["#8a5cc7", "#c0587e", "#2f8f9d", "#b7791f", "#4a6fd1"];
const ADDR_RIGHT: f64 = 150.0;
const BAR_X: f64 = 172.0;

/// How a piece's height relates to its size.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum ScaleKind {
    Linear,
    Enlarged,
    Compressed,
}

impl ScaleKind {
    fn as_str(self) -> &'static str {
        match self {
            ScaleKind::Linear => "linear",
            ScaleKind::Enlarged => "enlarged",
            ScaleKind::Compressed => "compressed",
        }
    }
}

/// Bytes per pixel for sizes in the linear band.
struct Scale {
    bytes_per_px: f64,
    min_h: f64,
}

impl Scale {
    /// The band `[min_h, min_h * LINEAR_RATIO]` pixels placed over the sizes
    /// so that it holds as many of them as possible, the larger band on a
    /// tie (enlarging small pieces distorts less than compressing big ones).
    fn choose(sizes: &[u128], min_h: f64) -> Scale {
        let logs: Vec<f64> = sizes.iter().map(|&s| (s.max(1) as f64).log2()).collect();
        let width = LINEAR_RATIO.log2();
        let mut best = (0usize, 0.0f64);
        for &l in &logs {
            let n = logs
                .iter()
                .filter(|&&x| x >= l - 1e-9 && x <= l + width + 1e-9)
                .count();
            if n > best.0 || (n == best.0 && l > best.1) {
                best = (n, l);
            }
        }
        Scale {
            bytes_per_px: best.1.exp2() / min_h,
            min_h,
        }
    }

    fn height(&self, size: u128) -> (f64, ScaleKind) {
        let px = size as f64 / self.bytes_per_px;
        let max = self.min_h * LINEAR_RATIO;
        if px < self.min_h * (1.0 - 1e-9) {
            (self.min_h, ScaleKind::Enlarged)
        } else if px <= max * (1.0 + 1e-9) {
            (px, ScaleKind::Linear)
        } else {
            let extra = (COMPRESSED_STEP * (px / max).log2()).min(COMPRESSED_EXTRA);
            (max + 8.0 + extra, ScaleKind::Compressed)
        }
    }
}

/// One piece of a column: a range or a hole, `[lo, hi)`.
struct Piece<'a> {
    lo: u128,
    hi: u128,
    range: Option<(&'a MapRange, Change)>,
}

fn pieces<'a>(map: &'a SpaceMap, extent: u128, marks: Option<&[Change]>) -> Vec<Piece<'a>> {
    let mut out = Vec::new();
    let mut at = 0u128;
    for (i, r) in map.ranges.iter().enumerate() {
        let (lo, hi) = (u128::from(r.start), u128::from(r.last) + 1);
        if lo > at {
            out.push(Piece {
                lo: at,
                hi: lo,
                range: None,
            });
        }
        let change = marks
            .and_then(|m| m.get(i).copied())
            .unwrap_or(Change::Same);
        out.push(Piece {
            lo,
            hi,
            range: Some((r, change)),
        });
        at = hi;
    }
    if at < extent {
        out.push(Piece {
            lo: at,
            hi: extent,
            range: None,
        });
    }
    out
}

/// The vertical axis: the union of the columns' boundaries, each interval
/// with its height and scale kind.
struct Axis {
    bounds: Vec<u128>,
    ys: Vec<f64>,
    kinds: Vec<ScaleKind>,
    scale: Scale,
}

impl Axis {
    fn new(columns: &[&[Piece<'_>]], extent: u128, min_h: f64, top: f64) -> Axis {
        let mut set: BTreeSet<u128> = BTreeSet::new();
        set.insert(0);
        set.insert(extent);
        for col in columns {
            for p in col.iter() {
                set.insert(p.lo);
                set.insert(p.hi);
            }
        }
        let bounds: Vec<u128> = set.into_iter().collect();
        let sizes: Vec<u128> = bounds.windows(2).map(|w| w[1] - w[0]).collect();
        // The band is placed over the ranges: holes are what gets
        // compressed (unless the view has no range at all).
        let range_sizes: Vec<u128> = columns
            .iter()
            .flat_map(|c| c.iter())
            .filter(|p| p.range.is_some())
            .map(|p| p.hi - p.lo)
            .collect();
        let scale = Scale::choose(
            if range_sizes.is_empty() {
                &sizes
            } else {
                &range_sizes
            },
            min_h,
        );
        let mut ys = vec![top];
        let mut kinds = Vec::new();
        for &s in &sizes {
            let (h, k) = scale.height(s);
            ys.push(ys.last().copied().unwrap_or(top) + h);
            kinds.push(k);
        }
        Axis {
            bounds,
            ys,
            kinds,
            scale,
        }
    }

    fn index(&self, addr: u128) -> usize {
        self.bounds.binary_search(&addr).unwrap_or_else(|i| i)
    }

    fn y(&self, addr: u128) -> f64 {
        self.ys[self.index(addr).min(self.ys.len() - 1)]
    }

    fn bottom(&self) -> f64 {
        self.ys.last().copied().unwrap_or(0.0)
    }

    /// The scale kind of `[lo, hi)`: compressed if any of its intervals is,
    /// else enlarged if any is, else linear.
    fn kind(&self, lo: u128, hi: u128) -> ScaleKind {
        let ks = &self.kinds[self.index(lo)..self.index(hi)];
        if ks.contains(&ScaleKind::Compressed) {
            ScaleKind::Compressed
        } else if ks.len() == 1 {
            ks[0]
        } else {
            ScaleKind::Linear
        }
    }

    /// Mid-points of the compressed intervals inside `[lo, hi)`.
    fn breaks(&self, lo: u128, hi: u128) -> Vec<f64> {
        (self.index(lo)..self.index(hi))
            .filter(|&i| self.kinds[i] == ScaleKind::Compressed)
            .map(|i| (self.ys[i] + self.ys[i + 1]) / 2.0)
            .collect()
    }
}

// ---- text helpers ---------------------------------------------------------

/// Escapes text for XML content and attribute values; characters XML 1.0
/// cannot carry become U+FFFD.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\t' => out.push_str("&#9;"),
            '\r' => out.push_str("&#13;"),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// Cuts `s` to at most `max` characters, ending with an ellipsis if cut.
fn fit(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('\u{2026}');
    t
}

/// Cuts `s` from the left (for file paths).
fn fit_left(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        return s.to_owned();
    }
    let mut t = String::from('\u{2026}');
    t.extend(s.chars().skip(n - max.saturating_sub(1)));
    t
}

/// A size in bytes, in the largest binary unit it reaches.
pub fn human_size(size: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && size >= 1u128 << (10 * (unit + 1)) {
        unit += 1;
    }
    let div = 1u128 << (10 * unit);
    if size % div == 0 {
        format!("{} {}", size / div, UNITS[unit])
    } else {
        let v = size as f64 / div as f64;
        let s = format!("{v:.1}");
        format!("~{} {}", s.trim_end_matches(".0"), UNITS[unit])
    }
}

fn addr_label(a: u128, wide: bool) -> String {
    if wide {
        format!("0x{a:016x}")
    } else {
        format!("0x{a:08x}")
    }
}

fn f(v: f64) -> String {
    format!("{v:.1}")
}

/// A zigzag band across `[x, x + w]` centred on `y`: the break mark of a
/// compressed piece.
fn break_mark(out: &mut String, x: f64, w: f64, y: f64) {
    let teeth = ((w / 10.0).ceil() as usize).max(2);
    let step = w / teeth as f64;
    let mut top = Vec::new();
    let mut bot = Vec::new();
    for i in 0..=teeth {
        let dy = if i % 2 == 0 { -3.0 } else { 3.0 };
        let xi = x + step * i as f64;
        top.push(format!("{},{}", f(xi), f(y - 4.0 + dy)));
        bot.push(format!("{},{}", f(xi), f(y + 4.0 + dy)));
    }
    bot.reverse();
    let _ = writeln!(
        out,
        "<polygon class=\"brk\" points=\"{} {}\"/>",
        top.join(" "),
        bot.join(" ")
    );
}

const STYLE: &str = "\
text { font-family: FONTS; font-size: 12px; fill: #1d1d1f; }
.title { font-size: 17px; font-weight: bold; }
.sub { font-size: 12px; fill: #444; }
.addr { font-size: 11px; fill: #333; }
.name { font-weight: bold; }
.detail { font-size: 11px; fill: #303030; }
.via { font-size: 11px; fill: #5b2a91; }
.holetext { font-size: 11px; fill: #666; font-style: italic; }
.badge { font-size: 10px; font-weight: bold; fill: #fff; }
.tick { stroke: #888; stroke-width: 1; }
rect.body { stroke: #3c3c3c; stroke-width: 1; }
g.seg:hover rect.body { stroke: #000; stroke-width: 2.5; }
.t-ram { fill: #9fdc9f; }
.t-rom { fill: #f7cf7e; }
.t-romd { fill: #f0b3e2; }
.t-ramd { fill: #8fdcd6; }
.t-mmio { fill: #a9c8f5; }
.t-resv { fill: #c9ced6; }
.t-ioroot { fill: #e4ecf8; }
.t-romdev { fill: #d9c3f0; }
.hole { fill: url(#hatch); }
.aliasstrip { fill: #8a5cc7; stroke: none; }
.brk { fill: #ffffff; stroke: #555; stroke-width: 1; }
.link { fill: none; stroke-width: 1.6; }
.link:hover { stroke-width: 3; }
.same { opacity: 0.45; }
.mark-removed { fill: none; stroke: #d0302f; stroke-width: 3; }
.mark-added { fill: none; stroke: #1d9a3a; stroke-width: 3; }
.mark-changed { fill: none; stroke: #e08a00; stroke-width: 3; }
.b-removed { fill: #d0302f; }
.b-added { fill: #1d9a3a; }
.b-changed { fill: #e08a00; }
";

fn header(out: &mut String, width: f64, height: f64, title: &str) {
    let mut markers = String::new();
    for (i, c) in LINK_COLOURS.iter().enumerate() {
        let _ = writeln!(
            markers,
            "<marker id=\"arrow{i}\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"{c}\"/></marker>"
        );
    }
    let _ = writeln!(
        out,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n\
<title>{t}</title>\n<style>\n{s}</style>\n<defs>\n\
<pattern id=\"hatch\" width=\"8\" height=\"8\" patternUnits=\"userSpaceOnUse\" patternTransform=\"rotate(45)\">\
<rect width=\"8\" height=\"8\" fill=\"#f6f6f6\"/><line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"8\" stroke=\"#d2d2d2\" stroke-width=\"3\"/></pattern>\n\
{m}</defs>\n\
<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#ffffff\"/>",
        w = f(width),
        h = f(height),
        t = xml_escape(title),
        s = STYLE.replace("FONTS", FONT),
        m = markers,
    );
}

/// The legend: colour swatches, then the scale in words. Returns the y
/// below it.
fn legend(out: &mut String, y: f64, scale: &Scale, width: f64) -> f64 {
    let items: [(&str, &str); 10] = [
        ("t-ram", "ram"),
        ("t-rom", "rom"),
        ("t-romd", "romd"),
        ("t-ramd", "ramd"),
        ("t-mmio", "i/o (mmio)"),
        ("t-romdev", "rom device"),
        ("t-resv", "reservation"),
        ("t-ioroot", "port fill"),
        ("hole", "unassigned"),
        ("aliasstrip", "via alias"),
    ];
    let per_row = ((width - 20.0) / 150.0).floor().max(1.0) as usize;
    let mut yy = y;
    for (i, (class, label)) in items.iter().enumerate() {
        let col = i % per_row;
        if i > 0 && col == 0 {
            yy += 20.0;
        }
        let x = 12.0 + 150.0 * col as f64;
        let _ = writeln!(
            out,
            "<rect class=\"{class}\" x=\"{}\" y=\"{}\" width=\"22\" height=\"13\" stroke=\"#3c3c3c\" stroke-width=\"0.8\"/>\
<text x=\"{}\" y=\"{}\">{}</text>",
            f(x),
            f(yy),
            f(x + 28.0),
            f(yy + 11.0),
            xml_escape(label)
        );
    }
    yy += 22.0;
    let lo = scale.bytes_per_px * scale.min_h;
    let hi = lo * LINEAR_RATIO;
    let _ = writeln!(
        out,
        "<text class=\"sub\" x=\"12\" y=\"{}\">Heights to scale for pieces of {} to {} ({} per pixel); smaller pieces at the minimum height;</text>\n\
<text class=\"sub\" x=\"12\" y=\"{}\">larger ones compressed and cut by a zigzag break (real size in the label). Hover a piece for the full story.</text>",
        f(yy + 10.0),
        xml_escape(&human_size(lo.round() as u128)),
        xml_escape(&human_size(hi.round() as u128)),
        xml_escape(&human_size(scale.bytes_per_px.round().max(1.0) as u128)),
        f(yy + 26.0),
    );
    yy + 40.0
}

/// The tooltip text of a range.
fn range_tooltip(r: &MapRange, change: Option<(Change, &str)>) -> String {
    let mut t = String::new();
    let size = u128::from(r.last - r.start) + 1;
    let _ = writeln!(t, "{} ({}, prio {})", r.region, r.type_label(), r.priority);
    let _ = writeln!(
        t,
        "0x{:016x}-0x{:016x} ({}, {size:#x} bytes)",
        r.start,
        r.last,
        human_size(size)
    );
    if let Some((c, side)) = change {
        let what = match c {
            Change::Same => "unchanged",
            Change::Added => "added: not in the other machine's view",
            Change::Removed => "removed: not in the other machine's view",
            Change::Changed => "changed: the other machine serves these addresses differently",
        };
        let _ = writeln!(t, "{side}: {what}");
    }
    let _ = writeln!(t, "served by \"{}\" at offset {:#x}", r.region, r.offset);
    if !r.path.is_empty() {
        let _ = writeln!(t, "path: {}", r.path.join(" > "));
    }
    for h in &r.aliases {
        let _ = writeln!(
            t,
            "through alias \"{}\" -> \"{}\" at offset {:#x}",
            h.alias, h.target, h.target_offset
        );
    }
    let list = |t: &mut String, title: &str, items: &[String]| {
        if items.is_empty() {
            return;
        }
        let _ = writeln!(t, "{title}:");
        for i in items.iter().take(MAX_TOOLTIP_ITEMS) {
            let _ = writeln!(t, "  {i}");
        }
        if items.len() > MAX_TOOLTIP_ITEMS {
            let _ = writeln!(t, "  ... and {} more", items.len() - MAX_TOOLTIP_ITEMS);
        }
    };
    if r.obscures.is_empty() {
        let _ = writeln!(t, "obscures nothing");
    }
    list(&mut t, "obscures", &r.obscures);
    list(&mut t, "also covering, inactive", &r.inactive);
    if r.incomplete {
        let _ = writeln!(t, "(lists may be incomplete: search budget reached)");
    }
    t.trim_end().to_owned()
}

/// Draws one piece of a column into `out`.
#[allow(clippy::too_many_arguments)]
fn draw_piece(
    out: &mut String,
    p: &Piece<'_>,
    axis: &Axis,
    x: f64,
    w: f64,
    column: Option<(&str, &str)>,
    show_via: bool,
) {
    let (y0, y1) = (axis.y(p.lo), axis.y(p.hi));
    let h = y1 - y0;
    let kind = axis.kind(p.lo, p.hi);
    let size = p.hi - p.lo;
    let max_chars = ((w - 26.0) / CHAR_W).floor().max(4.0) as usize;
    let col_attr = column.map_or_else(String::new, |(c, _)| format!(" data-column=\"{c}\""));
    match p.range {
        Some((r, change)) => {
            let same = column.is_some() && change == Change::Same;
            let _ = writeln!(
                out,
                "<g class=\"seg{}\">\n<title>{}</title>",
                if same { " same" } else { "" },
                xml_escape(&range_tooltip(r, column.map(|(_, side)| (change, side))))
            );
            let mut attrs = format!(
                " data-kind=\"range\" data-start=\"0x{:016x}\" data-end=\"0x{:016x}\" data-region=\"{}\" data-type=\"{}\" data-prio=\"{}\" data-offset=\"{:#x}\" data-scale=\"{}\"{col_attr}",
                r.start,
                r.last,
                xml_escape(&r.region),
                xml_escape(r.printed_type.as_str()),
                r.priority,
                r.offset,
                kind.as_str(),
            );
            if column.is_some() {
                let _ = write!(attrs, " data-diff=\"{}\"", change.as_str());
            }
            if !r.aliases.is_empty() {
                let via: Vec<&str> = r.aliases.iter().map(|h| h.alias.as_str()).collect();
                let _ = write!(attrs, " data-alias=\"{}\"", xml_escape(&via.join(" > ")));
            }
            let _ = writeln!(
                out,
                "<rect class=\"body {}\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\"{attrs}/>",
                r.class(),
                f(x),
                f(y0),
                f(w),
                f(h)
            );
            if !r.aliases.is_empty() {
                let _ = writeln!(
                    out,
                    "<rect class=\"aliasstrip\" x=\"{}\" y=\"{}\" width=\"7\" height=\"{}\"/>",
                    f(x + 0.5),
                    f(y0 + 0.5),
                    f(h - 1.0)
                );
            }
            for yb in axis.breaks(p.lo, p.hi) {
                break_mark(out, x, w, yb.max(y0 + axis.scale.min_h + 6.0).min(y1 - 6.0));
            }
            let tx = x + 13.0;
            let name = format!("{} ({})", r.region, r.type_label());
            let mut detail = format!(
                "{:#x}-{:#x} \u{b7} {}",
                r.start,
                r.last,
                human_size(u128::from(r.last - r.start) + 1)
            );
            if kind == ScaleKind::Compressed {
                detail.push_str(" \u{b7} compressed");
            }
            let _ = write!(detail, " \u{b7} prio {}", r.priority);
            if r.offset != 0 {
                let _ = write!(detail, " \u{b7} @{:#x}", r.offset);
            }
            let badge = if r.obscures.is_empty() { 0.0 } else { 60.0 };
            let mark_w = if column.is_some() && change != Change::Same {
                22.0
            } else {
                0.0
            };
            let name_chars = ((w - 26.0 - badge - mark_w) / CHAR_W).floor().max(4.0) as usize;
            let _ = writeln!(
                out,
                "<text class=\"name\" x=\"{}\" y=\"{}\">{}</text>\n<text class=\"detail\" x=\"{}\" y=\"{}\">{}</text>",
                f(tx),
                f(y0 + PAD_H + 10.0),
                xml_escape(&fit(&name, name_chars)),
                f(tx),
                f(y0 + PAD_H + 10.0 + LINE_H),
                xml_escape(&fit(&detail, max_chars + 1)),
            );
            if show_via && !r.aliases.is_empty() {
                let _ = writeln!(
                    out,
                    "<text class=\"via\" x=\"{}\" y=\"{}\">{}</text>",
                    f(tx),
                    f(y0 + PAD_H + 10.0 + 2.0 * LINE_H),
                    xml_escape(&fit(&format!("via {}", r.via_text()), max_chars + 1))
                );
            }
            if !r.obscures.is_empty() {
                // A badge: how many regions this range hides (details on hover).
                let text = format!("hides {}", r.obscures.len());
                let bw = 10.0 + 6.2 * text.len() as f64;
                let bx = x + w - bw - 4.0 - mark_w;
                let _ = writeln!(
                    out,
                    "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"14\" rx=\"7\" fill=\"#555\"/>\
<text class=\"badge\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{text}</text>",
                    f(bx),
                    f(y0 + 5.0),
                    f(bw),
                    f(bx + bw / 2.0),
                    f(y0 + 15.5),
                );
            }
            if column.is_some() && change != Change::Same {
                let c = change.as_str();
                let sym = match change {
                    Change::Added => "+",
                    Change::Removed => "\u{2212}",
                    _ => "~",
                };
                let _ = writeln!(
                    out,
                    "<rect class=\"mark-{c}\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\"/>\
<circle class=\"b-{c}\" cx=\"{}\" cy=\"{}\" r=\"8\"/>\
<text class=\"badge\" x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"13\">{sym}</text>",
                    f(x + 1.5),
                    f(y0 + 1.5),
                    f(w - 3.0),
                    f(h - 3.0),
                    f(x + w - 13.0),
                    f(y0 + 12.0),
                    f(x + w - 13.0),
                    f(y0 + 16.5),
                );
            }
            out.push_str("</g>\n");
        }
        None => {
            let tip = format!(
                "unassigned: 0x{:016x}-0x{:016x} ({}, {size:#x} bytes)\nno region serves these addresses",
                p.lo,
                p.hi - 1,
                human_size(size)
            );
            let _ = writeln!(
                out,
                "<g class=\"seg\">\n<title>{}</title>\n<rect class=\"body hole\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" data-kind=\"hole\" data-start=\"0x{:016x}\" data-end=\"0x{:016x}\" data-scale=\"{}\"{col_attr}/>",
                xml_escape(&tip),
                f(x),
                f(y0),
                f(w),
                f(h),
                p.lo,
                p.hi - 1,
                kind.as_str()
            );
            for yb in axis.breaks(p.lo, p.hi) {
                break_mark(out, x, w, yb.max(y0 + axis.scale.min_h + 6.0).min(y1 - 6.0));
            }
            let mut text = format!(
                "unassigned {:#x}-{:#x} \u{b7} {}",
                p.lo,
                p.hi - 1,
                human_size(size)
            );
            if kind == ScaleKind::Compressed {
                text.push_str(" \u{b7} compressed");
            }
            let _ = writeln!(
                out,
                "<text class=\"holetext\" x=\"{}\" y=\"{}\">{}</text>\n</g>",
                f(x + 13.0),
                f(y0 + PAD_H + 10.0 + if h >= 2.0 * LINE_H + PAD_H { 0.0 } else { -2.0 }),
                xml_escape(&fit(&text, max_chars + 1))
            );
        }
    }
}

/// The address axis: a tick and the address at every boundary, the last
/// address at the bottom, and break marks on compressed intervals.
fn draw_axis(out: &mut String, axis: &Axis, bar_x: f64, wide: bool) {
    out.push_str("<g class=\"axis\">\n");
    let n = axis.bounds.len();
    for (i, &b) in axis.bounds.iter().enumerate() {
        let y = axis.ys[i];
        if i + 1 == n {
            let _ = writeln!(
                out,
                "<line class=\"tick\" x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\"/>\
<text class=\"addr\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
                f(ADDR_RIGHT + 4.0),
                f(y),
                f(bar_x),
                f(y),
                f(ADDR_RIGHT),
                f(y + 14.0),
                xml_escape(&format!("{} end", addr_label(b - 1, wide)))
            );
        } else {
            let _ = writeln!(
                out,
                "<line class=\"tick\" x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\"/>\
<text class=\"addr\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
                f(ADDR_RIGHT + 4.0),
                f(y),
                f(bar_x),
                f(y),
                f(ADDR_RIGHT),
                f(y + 4.0),
                addr_label(b, wide)
            );
        }
    }
    for i in 0..n.saturating_sub(1) {
        if axis.kinds[i] == ScaleKind::Compressed {
            let ym = (axis.ys[i] + axis.ys[i + 1]) / 2.0;
            let _ = writeln!(
                out,
                "<text class=\"addr\" x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#888\">\u{2248} {}</text>",
                f(ADDR_RIGHT),
                f(ym + 4.0),
                xml_escape(&human_size(axis.bounds[i + 1] - axis.bounds[i]))
            );
        }
    }
    out.push_str("</g>\n");
}

/// Links between ranges served by the same region when at least one of
/// them is reached through an alias: an arrow from each alias-served range
/// to the range where the region is mapped directly, or arcs joining them
/// to the first one when the region is only seen through aliases.
fn draw_links(out: &mut String, map: &SpaceMap, axis: &Axis, right: f64) -> f64 {
    let mut groups: HashMap<RegionId, Vec<usize>> = HashMap::new();
    let mut order: Vec<RegionId> = Vec::new();
    for (i, r) in map.ranges.iter().enumerate() {
        let g = groups.entry(r.region_id).or_default();
        if g.is_empty() {
            order.push(r.region_id);
        }
        g.push(i);
    }
    // Lanes: groups whose vertical spans overlap get different lanes.
    let mut lanes: Vec<f64> = Vec::new();
    let mut max_x = right;
    let mut drawn = 0usize;
    out.push_str("<g class=\"links\">\n");
    for id in order {
        let members = &groups[&id];
        if members.len() < 2 || members.iter().all(|&i| map.ranges[i].aliases.is_empty()) {
            continue;
        }
        let mid = |i: usize| {
            let r = &map.ranges[i];
            let (y0, y1) = (axis.y(u128::from(r.start)), axis.y(u128::from(r.last) + 1));
            (y0 + 19.0).min((y0 + y1) / 2.0)
        };
        let direct = members
            .iter()
            .copied()
            .find(|&i| map.ranges[i].aliases.is_empty());
        let anchor = direct.unwrap_or(members[0]);
        let ys: Vec<f64> = members.iter().map(|&i| mid(i)).collect();
        let (top, bottom) = ys
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
        let lane = match lanes.iter().position(|&end| end < top - 4.0) {
            Some(l) => {
                lanes[l] = bottom;
                l
            }
            None => {
                lanes.push(bottom);
                lanes.len() - 1
            }
        };
        let colour_index = drawn % LINK_COLOURS.len();
        let colour = LINK_COLOURS[colour_index];
        drawn += 1;
        let lx = right + 14.0 + 26.0 * lane as f64;
        max_x = max_x.max(lx + 18.0);
        let ar = &map.ranges[anchor];
        let ya = mid(anchor);
        let region = &ar.region;
        let _ = writeln!(
            out,
            "<text class=\"addr\" x=\"{}\" y=\"{}\" fill=\"{colour}\" text-anchor=\"middle\" transform=\"rotate(90 {} {})\">{}</text>",
            f(lx + 4.0),
            f((top + bottom) / 2.0),
            f(lx + 4.0),
            f((top + bottom) / 2.0),
            xml_escape(&fit(region, ((bottom - top - 10.0) / 6.7).max(3.0) as usize))
        );
        for &i in members.iter().filter(|&&i| i != anchor) {
            let r = &map.ranges[i];
            let y = mid(i);
            let title = if direct.is_some() {
                format!(
                    "{} (via {}) is \"{}\" at offset {:#x}, which is mapped directly at {:#x}",
                    fmt_range(r),
                    r.via_text(),
                    r.region,
                    r.offset,
                    ar.start
                )
            } else {
                format!(
                    "{} and {} are both \"{}\" (offsets {:#x} and {:#x}), seen through aliases",
                    fmt_range(r),
                    fmt_range(ar),
                    r.region,
                    r.offset,
                    ar.offset
                )
            };
            let marker = if direct.is_some() {
                format!(" marker-end=\"url(#arrow{colour_index})\"")
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "<path class=\"link\" stroke=\"{colour}\" d=\"M{},{} H{} V{} H{}\"{marker} data-from=\"0x{:016x}\" data-to=\"0x{:016x}\" data-region=\"{}\"><title>{}</title></path>",
                f(right),
                f(y),
                f(lx),
                f(ya),
                f(right + 1.0),
                r.start,
                ar.start,
                xml_escape(&r.region),
                xml_escape(&title)
            );
            let _ = writeln!(
                out,
                "<circle cx=\"{}\" cy=\"{}\" r=\"3\" fill=\"{colour}\"/>",
                f(right),
                f(y)
            );
        }
    }
    out.push_str("</g>\n");
    max_x
}

fn fmt_range(r: &MapRange) -> String {
    format!("{:#x}-{:#x}", r.start, r.last)
}

/// Minimum piece height: room for the label lines the picture shows.
fn min_height(maps: &[&SpaceMap], show_via: bool) -> f64 {
    let via = show_via
        && maps
            .iter()
            .any(|m| m.ranges.iter().any(|r| !r.aliases.is_empty()));
    PAD_H + LINE_H * if via { 3.0 } else { 2.0 } + 4.0
}

/// Draws one address space as an SVG memory map.
pub fn render(map: &SpaceMap) -> String {
    let wide = map.extent > 1 << 32;
    let bar_w = 520.0;
    let pieces = pieces(map, map.extent, None);
    let min_h = min_height(&[map], true);
    // The header height depends on the legend: lay it out first.
    let mut head = String::new();
    let title = format!("memtree map: address space \"{}\"", map.space);
    let holes = pieces.iter().filter(|p| p.range.is_none()).count();
    let width_guess = 980.0;
    let _ = writeln!(
        head,
        "<text class=\"title\" x=\"12\" y=\"26\">{}</text>\n<text class=\"sub\" x=\"12\" y=\"46\">{}</text>",
        xml_escape(&title),
        xml_escape(&format!(
            "root: {} \u{b7} {} ranges, {} holes \u{b7} {}",
            map.root.as_deref().unwrap_or("(none): the empty view"),
            map.ranges.len(),
            holes,
            human_size(map.extent)
        ))
    );
    let probe = Axis::new(&[&pieces], map.extent, min_h, 0.0);
    let top = legend(&mut head, 62.0, &probe.scale, width_guess) + 10.0;
    let axis = Axis::new(&[&pieces], map.extent, min_h, top);
    let mut body = String::new();
    draw_axis(&mut body, &axis, BAR_X, wide);
    for p in &pieces {
        draw_piece(&mut body, p, &axis, BAR_X, bar_w, None, true);
    }
    let right = draw_links(&mut body, map, &axis, BAR_X + bar_w);
    let width = (right + 30.0).max(width_guess);
    let height = axis.bottom() + 30.0;
    let mut out = String::new();
    header(&mut out, width, height, &title);
    out.push_str(&head);
    out.push_str(&body);
    out.push_str("</svg>\n");
    out
}

/// Draws two address spaces (two machines, or two snapshots of one) side
/// by side on one address axis, the ranges that differ highlighted.
pub fn render_diff(a: &SpaceMap, a_label: &str, b: &SpaceMap, b_label: &str) -> String {
    let extent = a.extent.max(b.extent);
    let wide = extent > 1 << 32;
    let (ma, mb) = diff_marks(a, b);
    let pa = pieces(a, extent, Some(&ma));
    let pb = pieces(b, extent, Some(&mb));
    let bar_w = 400.0;
    let gap = 28.0;
    let bx = BAR_X + bar_w + gap;
    let width = bx + bar_w + 20.0;
    let min_h = min_height(&[a, b], false);
    let count = |m: &[Change], c: Change| m.iter().filter(|&&x| x == c).count();
    let title = if a.space == b.space {
        format!("memtree map --diff: address space \"{}\"", a.space)
    } else {
        format!(
            "memtree map --diff: address spaces \"{}\" and \"{}\"",
            a.space, b.space
        )
    };
    let mut head = String::new();
    let summary = if ma.iter().chain(&mb).all(|&c| c == Change::Same) {
        "the flat views are identical".to_owned()
    } else {
        format!(
            "left only: {} \u{b7} right only: {} \u{b7} changed: {} \u{b7} same: {}",
            count(&ma, Change::Removed),
            count(&mb, Change::Added),
            count(&ma, Change::Changed),
            count(&ma, Change::Same),
        )
    };
    let _ = writeln!(
        head,
        "<text class=\"title\" x=\"12\" y=\"26\">{}</text>\n<text class=\"sub\" x=\"12\" y=\"46\">{}</text>",
        xml_escape(&title),
        xml_escape(&summary)
    );
    // Change legend.
    let marks = [
        ("removed", "\u{2212}", "only in the left machine"),
        ("added", "+", "only in the right machine"),
        ("changed", "~", "same addresses, served differently"),
    ];
    for (i, (c, sym, text)) in marks.iter().enumerate() {
        let x = 12.0 + 270.0 * i as f64;
        let _ = writeln!(
            head,
            "<circle class=\"b-{c}\" cx=\"{}\" cy=\"63\" r=\"8\"/><text class=\"badge\" x=\"{}\" y=\"67.5\" text-anchor=\"middle\" font-size=\"13\">{sym}</text><text x=\"{}\" y=\"67\">{}</text>",
            f(x + 8.0),
            f(x + 8.0),
            f(x + 22.0),
            xml_escape(text)
        );
    }
    let probe = Axis::new(&[&pa, &pb], extent, min_h, 0.0);
    let ly = legend(&mut head, 82.0, &probe.scale, width);
    let heading_y = ly + 6.0;
    let chars = ((bar_w - 4.0) / CHAR_W) as usize;
    let _ = writeln!(
        head,
        "<text class=\"name\" x=\"{}\" y=\"{}\">{}</text>\n<text class=\"name\" x=\"{}\" y=\"{}\">{}</text>",
        f(BAR_X),
        f(heading_y),
        xml_escape(&fit_left(&format!("left: {a_label}"), chars)),
        f(bx),
        f(heading_y),
        xml_escape(&fit_left(&format!("right: {b_label}"), chars)),
    );
    let top = heading_y + 12.0;
    let axis = Axis::new(&[&pa, &pb], extent, min_h, top);
    let mut body = String::new();
    draw_axis(&mut body, &axis, BAR_X, wide);
    for p in &pa {
        draw_piece(
            &mut body,
            p,
            &axis,
            BAR_X,
            bar_w,
            Some(("a", "left")),
            false,
        );
    }
    for p in &pb {
        draw_piece(&mut body, p, &axis, bx, bar_w, Some(("b", "right")), false);
    }
    let height = axis.bottom() + 30.0;
    let mut out = String::new();
    header(&mut out, width, height, &title);
    out.push_str(&head);
    out.push_str(&body);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_control_characters() {
        assert_eq!(
            xml_escape("a<b>&\"c'\n\u{1}"),
            "a&lt;b&gt;&amp;&quot;c&apos;&#10;\u{fffd}"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(1), "1 B");
        assert_eq!(human_size(0x400), "1 KiB");
        assert_eq!(human_size(0x20000), "128 KiB");
        assert_eq!(human_size(1 << 64), "16 EiB");
        assert_eq!(human_size(0xf6c0_0000), "~3.9 GiB");
    }

    #[test]
    fn scale_band_holds_the_most_sizes() {
        let sizes = [0x1000, 0x2000, 0x4000, 0x400, 1 << 40];
        let s = Scale::choose(&sizes, 30.0);
        assert_eq!(s.height(0x1000).1, ScaleKind::Linear);
        assert_eq!(s.height(0x4000).1, ScaleKind::Linear);
        assert_eq!(s.height(1 << 40).1, ScaleKind::Compressed);
        let (h1, _) = s.height(0x1000);
        let (h4, _) = s.height(0x4000);
        assert!((h4 / h1 - 4.0).abs() < 1e-9);
    }
}
