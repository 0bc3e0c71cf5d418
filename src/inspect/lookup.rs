//! Why an address lands where it does: a one-address replay of rendering.
//!
//! [`explain`] walks the region tree of an address space exactly as
//! `crate::render::flatten` does (same physical root, same order, same base and clip
//! arithmetic, same "first rendered wins" rule), but for one address. It
//! records every region whose own range covers the address, in rendering
//! order, and what became of it:
//!
//! * the one region that serves the address (the verdict, which always agrees
//!   with the published flat view),
//! * containers and aliases the walk passed through,
//! * regions that lost: disabled, inside a disabled region, outside their
//!   container's range or an alias window (clipped), or obscured by a region
//!   rendered earlier (higher priority, a newer sibling of equal priority, or
//!   one of the region's own subregions).
//!
//! To name clipped and disabled candidates the walk also descends, without
//! affecting the verdict, into subtrees that rendering would skip; that extra
//! walk is bounded by [`SHADOW_BUDGET`] visits.
//!
//! Pure: it reads the topology under the writer lock and changes nothing.

use std::collections::HashMap;
use std::fmt;

use crate::region::ids::{RegionId, SpaceId};
use crate::region::region_core::RegionKind;
use crate::render::flatten as render;
use crate::topology::error::TopologyError;
use crate::topology::memory::Machine;
use crate::topology::tree::Topology;

/// Most visits spent on subtrees rendering would skip (clipped or disabled):
/// bounds the cost on machines with many aliases into large trees.
pub const SHADOW_BUDGET: usize = 100_000;

/// Why a region cannot serve addresses outside a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClipKind {
    /// The region lies (partly) outside its container, which ends earlier.
    Container,
    /// The region is reached through an alias whose window does not cover
    /// the address.
    AliasWindow,
}

/// Why a region that covers the address does not serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Obscured {
    /// A sibling with a higher priority rendered first and covers the address.
    HigherPriority {
        /// The container both are subregions of.
        container: String,
        /// The sibling whose subtree won.
        sibling: String,
        /// The sibling's priority.
        sibling_priority: i32,
        /// This candidate's priority (of its branch in that container).
        own_priority: i32,
    },
    /// A sibling of equal priority, added later (newest first among equals,
    /// as in QEMU), rendered first and covers the address.
    NewerSibling {
        /// The container both are subregions of.
        container: String,
        /// The sibling whose subtree won.
        sibling: String,
        /// The common priority.
        priority: i32,
    },
    /// One of the region's own subregions covers the address: a region only
    /// fills the holes its subregions leave.
    OwnSubregion {
        /// The subregion (of this region) whose subtree won.
        subregion: String,
    },
}

/// What became of one candidate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// This region serves the address.
    Serves,
    /// A pure container: never serves addresses itself, only through its
    /// subregions.
    PassesThrough,
    /// An alias: the walk continues in its target.
    Redirects {
        /// The alias target.
        target: String,
    },
    /// The region is disabled: it and its subtree vanish.
    Disabled,
    /// An enclosing region (container or alias) on the path is disabled.
    UnderDisabled {
        /// The disabled region.
        ancestor: String,
    },
    /// The region covers the address but an enclosing range does not.
    Clipped {
        /// The container or alias whose range excludes the address.
        by: String,
        /// Container size or alias window.
        kind: ClipKind,
        /// That range, `[start, end)` in address-space coordinates.
        window: (i128, i128),
    },
    /// A region rendered earlier already covers the address.
    Obscured {
        /// The region that serves the address.
        winner: String,
        /// Why the winner rendered first.
        why: Obscured,
    },
}

/// One region whose own range covers the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The region.
    pub region: RegionId,
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: RegionKind,
    /// Its own readonly flag (readonly RAM is ROM).
    pub readonly: bool,
    /// Its priority in its container.
    pub priority: i32,
    /// Depth in the walk (the physical root is 0; an alias target is one
    /// level below its alias).
    pub depth: usize,
    /// The alias through which the walk reached this region, if it is an
    /// alias target.
    pub via_alias: Option<String>,
    /// This visit of the region in [`Explanation::visits`]; the regions the
    /// walk went through to reach it are [`Explanation::path`]. (Not a list
    /// per candidate: on a chain of n levels that would be n² names.)
    visit: usize,
    /// The region's range, `[start, end)`, in address-space coordinates.
    pub range: (i128, i128),
    /// Offset of the address inside the region.
    pub offset: i128,
    /// What became of it.
    pub fate: Fate,
    /// Whether this candidate is the topmost of a subtree that rendering
    /// skips (disabled or clipped) — the one worth showing; the others are
    /// inside it.
    pub shadow_top: bool,
}

impl Candidate {
    /// Whether rendering actually visited this region at this address (it was
    /// not disabled, under a disabled region, or clipped).
    pub fn is_live(&self) -> bool {
        !matches!(
            self.fate,
            Fate::Disabled | Fate::UnderDisabled { .. } | Fate::Clipped { .. }
        )
    }

    /// Whether the short listing shows this candidate: everything rendering
    /// visits, disabled regions themselves, and clipped regions that would
    /// otherwise serve addresses (not the containers and aliases around
    /// them, nor anything inside a disabled region).
    pub fn is_notable(&self) -> bool {
        match &self.fate {
            Fate::Disabled => true,
            Fate::UnderDisabled { .. } => false,
            Fate::Clipped { .. } => self.kind.terminates(),
            _ => true,
        }
    }
}

/// The region that serves the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The terminating region.
    pub region: RegionId,
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: RegionKind,
    /// Offset of the address inside it.
    pub offset: u64,
    /// Readonly (its own flag or one propagated from a container or alias on
    /// the path).
    pub readonly: bool,
    /// The region's own readonly flag.
    pub own_readonly: bool,
    /// The path of region names from the physical root to it (aliases
    /// included).
    pub path: Vec<String>,
}

/// The full answer of [`explain`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// The address space.
    pub space: String,
    /// Its root region (`None` if the root was removed).
    pub root: Option<String>,
    /// The region rendering starts from (the physical root: the space's root
    /// with enabled whole-region aliases followed); `None` means
    /// the empty view.
    pub physical_root: Option<String>,
    /// How the physical root was found from the root, one step a line.
    pub root_steps: Vec<String>,
    /// The address.
    pub addr: u64,
    /// Candidates in rendering order.
    pub candidates: Vec<Candidate>,
    /// Who serves the address; `None` means unassigned.
    pub verdict: Option<Verdict>,
    /// Whether the shadow walk ran out of budget (some clipped or disabled
    /// candidates may be missing; the verdict is still exact).
    pub truncated: bool,
    /// Every region visit of the walk, each naming the visit it came from:
    /// the paths of all candidates in space linear in the walk.
    visits: Vec<Visit>,
}

impl Explanation {
    /// The regions the walk went through to reach `candidate`, from the
    /// physical root down (aliases included; empty for the physical root).
    pub fn path(&self, candidate: &Candidate) -> Vec<&str> {
        let mut path = Vec::with_capacity(candidate.depth);
        let mut cur = self.visits.get(candidate.visit).and_then(|v| v.parent);
        while let Some(v) = cur.and_then(|i| self.visits.get(i)) {
            path.push(v.name.as_str());
            cur = v.parent;
        }
        path.reverse();
        path
    }

    /// [`Explanation::path`] condensed for display: at most
    /// `PATH_HEAD + PATH_TAIL` names, the middle replaced by a count.
    fn short_path(&self, candidate: &Candidate) -> String {
        let Some(parent) = self.visits.get(candidate.visit).and_then(|v| v.parent) else {
            return String::new();
        };
        let len = self.visits[parent].depth + 1;
        if len <= PATH_HEAD + PATH_TAIL + 1 {
            let mut names = Vec::with_capacity(len);
            let mut cur = Some(parent);
            while let Some(v) = cur.and_then(|i| self.visits.get(i)) {
                names.push(v.name.as_str());
                cur = v.parent;
            }
            names.reverse();
            return names.join(" > ");
        }
        let head: Vec<&str> = self.visits[parent]
            .head
            .iter()
            .flatten()
            .map(|&i| self.visits[i].name.as_str())
            .collect();
        let mut tail = Vec::with_capacity(PATH_TAIL);
        let mut cur = Some(parent);
        while tail.len() < PATH_TAIL {
            let Some(v) = cur.and_then(|i| self.visits.get(i)) else {
                break;
            };
            tail.push(v.name.as_str());
            cur = v.parent;
        }
        tail.reverse();
        format!(
            "{} > ... {} more ... > {}",
            head.join(" > "),
            len - head.len() - tail.len(),
            tail.join(" > ")
        )
    }
}

/// Names shown at the start and at the end of a condensed path.
const PATH_HEAD: usize = 3;
const PATH_TAIL: usize = 4;

/// Deepest indentation of the listing; deeper candidates say their depth.
const MAX_INDENT: usize = 24;

/// Pass-through levels (containers and aliases one inside the next) the
/// short listing shows at each end of a longer run; the rest is counted.
const RUN_SHOWN: usize = 2;

/// Explains which region of address space `space` serves `addr` and why the
/// other regions covering it do not.
pub fn explain(machine: &Machine, space: SpaceId, addr: u64) -> Result<Explanation, TopologyError> {
    machine.read(|topo| {
        let s = topo.space(space)?;
        let root_name = s
            .root
            .and_then(|r| topo.node(r))
            .map(|n| n.name().to_owned());
        let root_steps = s.root.map(|r| root_walk(topo, r)).unwrap_or_default();
        let phys = s.root.and_then(|r| render::physical_root(topo, r));
        let mut w = Walker {
            topo,
            addr: i128::from(addr),
            visits: Vec::new(),
            candidates: Vec::new(),
            winner: None,
            obscured: Vec::new(),
            shadow_visits: 0,
            truncated: false,
            tasks: Vec::new(),
        };
        if let Some(p) = phys {
            w.run(p);
        }
        let verdict = w.winner.map(|(visit, readonly)| w.verdict(visit, readonly));
        w.explain_obscured();
        Ok(Explanation {
            space: s.name.to_string(),
            root: root_name,
            physical_root: phys.and_then(|p| topo.node(p)).map(|n| n.name().to_owned()),
            root_steps,
            addr,
            candidates: w.candidates,
            verdict,
            truncated: w.truncated,
            visits: w.visits,
        })
    })
}

/// The steps of the physical-root walk, in words.
fn root_walk(topo: &Topology, root: RegionId) -> Vec<String> {
    let mut steps = Vec::new();
    let mut id = root;
    // Exactly the steps of `render::physical_root`, which ends because
    // alias and subregion links never loop (checked at edit time); the bound
    // only guards against a corrupted topology.
    for _ in 0..=topo.regions.len() {
        let Some(node) = topo.node(id) else {
            steps.push("the region was removed: the view is empty".to_owned());
            break;
        };
        if !node.enabled {
            steps.push(format!(
                "\"{}\" is disabled: the view is empty",
                node.name()
            ));
            break;
        }
        let next = match node.kind() {
            RegionKind::Alias => match node.alias_target.and_then(|t| topo.node(t).map(|n| (t, n)))
            {
                Some((t, tn)) if node.alias_offset == 0 && node.size >= tn.size => {
                    steps.push(format!(
                        "\"{}\" is an alias of all of \"{}\": the view is that of \"{}\"",
                        node.name(),
                        tn.name(),
                        tn.name()
                    ));
                    Some(t)
                }
                _ => None,
            },
            RegionKind::Container => {
                let enabled: Vec<(RegionId, &crate::region::region_core::RegionNode)> = node
                    .subregions
                    .iter()
                    .filter_map(|&s| topo.node(s).map(|n| (s, n)))
                    .filter(|(_, n)| n.enabled)
                    .collect();
                match enabled.as_slice() {
                    [] => {
                        steps.push(format!(
                            "\"{}\" is a container with no enabled subregion: the view is empty",
                            node.name()
                        ));
                        break;
                    }
                    [(sid, sub)] if sub.addr == 0 && sub.size <= node.size => {
                        steps.push(format!(
                            "\"{}\" is a container whose only enabled subregion \"{}\" sits at 0: the view is that of \"{}\"",
                            node.name(),
                            sub.name(),
                            sub.name()
                        ));
                        Some(*sid)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        match next {
            Some(n) => id = n,
            None => {
                steps.push(format!("rendering starts at \"{}\"", node.name()));
                break;
            }
        }
    }
    steps
}

/// Walk context: what the path above a visit looks like.
#[derive(Clone, Default)]
struct Ctx {
    parent: Option<usize>,
    depth: usize,
    via_alias: Option<String>,
    readonly: bool,
    /// Set once the path leaves what rendering visits at this address.
    shadow: Option<Shadow>,
    /// Whether a candidate was already recorded in the current shadow
    /// subtree.
    shadow_reported: bool,
}

#[derive(Clone)]
enum Shadow {
    Disabled(String),
    Clipped {
        by: String,
        kind: ClipKind,
        window: (i128, i128),
    },
}

/// One region visit of the walk.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Visit {
    region: RegionId,
    parent: Option<usize>,
    name: String,
    depth: usize,
    /// The visits at depths 0..PATH_HEAD on the path to this one (itself
    /// included), for condensed paths.
    head: [Option<usize>; PATH_HEAD],
}

/// One pending step of the walk (which runs on an explicit stack, so that
/// no nesting depth or alias chain can overflow the thread's stack).
enum Task {
    /// Visit a region whose parent sits at `base`.
    Enter { id: RegionId, base: i128, ctx: Ctx },
    /// After the subregions of a terminating visit: fill the address if no
    /// earlier region did.
    Fill {
        visit: usize,
        candidate: Option<usize>,
        readonly: bool,
    },
}

struct Walker<'t> {
    topo: &'t Topology,
    addr: i128,
    visits: Vec<Visit>,
    candidates: Vec<Candidate>,
    /// The visit that filled the address, and the propagated readonly flag.
    winner: Option<(usize, bool)>,
    /// Obscured candidates and their visits, reasons filled in afterwards.
    obscured: Vec<(usize, usize)>,
    shadow_visits: usize,
    truncated: bool,
    tasks: Vec<Task>,
}

impl Walker<'_> {
    /// The walk of `render`, in the same order: subregions in priority
    /// order, each subtree completely before the next, a region's own fill
    /// after all of its subregions.
    fn run(&mut self, root: RegionId) {
        self.tasks.push(Task::Enter {
            id: root,
            base: 0,
            ctx: Ctx::default(),
        });
        while let Some(task) = self.tasks.pop() {
            match task {
                Task::Enter { id, base, ctx } => self.enter(id, base, ctx),
                Task::Fill {
                    visit,
                    candidate,
                    readonly,
                } => self.fill(visit, candidate, readonly),
            }
        }
    }

    fn enter(&mut self, id: RegionId, base: i128, ctx: Ctx) {
        let Some(node) = self.topo.node(id) else {
            return;
        };
        if ctx.shadow.is_some() {
            if self.shadow_visits >= SHADOW_BUDGET {
                self.truncated = true;
                return;
            }
            self.shadow_visits += 1;
        }
        let visit = self.visits.len();
        let mut head = ctx
            .parent
            .map_or([None; PATH_HEAD], |p| self.visits[p].head);
        if let Some(h) = head.get_mut(ctx.depth) {
            *h = Some(visit);
        }
        self.visits.push(Visit {
            region: id,
            parent: ctx.parent,
            name: node.name().to_owned(),
            depth: ctx.depth,
            head,
        });
        // Same arithmetic as render: position, flags, own range.
        let base = base + i128::from(node.addr);
        let readonly = ctx.readonly || node.readonly;
        let range = (base, base + node.size as i128);
        let covers = range.0 <= self.addr && self.addr < range.1;
        let mut shadow = ctx.shadow.clone();
        let mut candidate = None;
        if covers {
            let fate = match &shadow {
                Some(Shadow::Disabled(a)) => Fate::UnderDisabled {
                    ancestor: a.clone(),
                },
                Some(Shadow::Clipped { by, kind, window }) => Fate::Clipped {
                    by: by.clone(),
                    kind: kind.clone(),
                    window: *window,
                },
                None if !node.enabled => Fate::Disabled,
                None => match node.kind() {
                    RegionKind::Alias => Fate::Redirects {
                        target: node
                            .alias_target
                            .and_then(|t| self.topo.node(t))
                            .map(|n| n.name().to_owned())
                            .unwrap_or_else(|| "(removed)".to_owned()),
                    },
                    RegionKind::Container => Fate::PassesThrough,
                    // Decided after the subregions have rendered.
                    _ => Fate::Serves,
                },
            };
            candidate = Some(self.candidates.len());
            let shadow_top = match &ctx.shadow {
                Some(_) => !ctx.shadow_reported,
                None => !node.enabled,
            };
            self.candidates.push(Candidate {
                region: id,
                name: node.name().to_owned(),
                kind: node.kind(),
                readonly: node.readonly,
                priority: node.priority,
                depth: ctx.depth,
                via_alias: ctx.via_alias.clone(),
                visit,
                range,
                offset: self.addr - base,
                fate,
                shadow_top,
            });
        }
        let shadow_reported =
            ctx.shadow_reported || (candidate.is_some() && (ctx.shadow.is_some() || !node.enabled));
        if shadow.is_none() && !node.enabled {
            shadow = Some(Shadow::Disabled(node.name().to_owned()));
        }
        if shadow.is_none() && !covers {
            shadow = Some(Shadow::Clipped {
                by: node.name().to_owned(),
                kind: if node.kind() == RegionKind::Alias {
                    ClipKind::AliasWindow
                } else {
                    ClipKind::Container
                },
                window: range,
            });
        }
        let child_ctx = |via_alias: Option<String>| Ctx {
            parent: Some(visit),
            depth: ctx.depth + 1,
            via_alias,
            readonly,
            shadow: shadow.clone(),
            shadow_reported,
        };
        if node.kind() == RegionKind::Alias {
            if let Some((tid, tnode)) = node
                .alias_target
                .and_then(|t| self.topo.node(t).map(|n| (t, n)))
            {
                self.tasks.push(Task::Enter {
                    id: tid,
                    base: base - i128::from(tnode.addr) - i128::from(node.alias_offset),
                    ctx: child_ctx(Some(node.name().to_owned())),
                });
            }
            return;
        }
        // The fill runs after every subregion: pushed first, it pops last.
        if node.terminates() && shadow.is_none() && covers {
            self.tasks.push(Task::Fill {
                visit,
                candidate,
                readonly,
            });
        }
        // Subregions in reverse, so that the first pops first.
        for &sub in node.subregions.iter().rev() {
            self.tasks.push(Task::Enter {
                id: sub,
                base,
                ctx: child_ctx(None),
            });
        }
    }

    /// Fill: the address is the visit's unless something rendered earlier
    /// has it.
    fn fill(&mut self, visit: usize, candidate: Option<usize>, readonly: bool) {
        if self.winner.is_none() {
            self.winner = Some((visit, readonly));
        } else if let Some(c) = candidate {
            // Placeholder; `explain_obscured` fills in the reason.
            self.candidates[c].fate = Fate::Obscured {
                winner: String::new(),
                why: Obscured::OwnSubregion {
                    subregion: String::new(),
                },
            };
            self.obscured.push((c, visit));
        }
    }
}

impl Walker<'_> {
    /// Visit indices from the root visit down to `v`.
    fn path(&self, v: usize) -> Vec<usize> {
        let mut p = vec![v];
        let mut cur = v;
        while let Some(parent) = self.visits[cur].parent {
            p.push(parent);
            cur = parent;
        }
        p.reverse();
        p
    }

    fn priority_of(&self, v: usize) -> i32 {
        self.topo
            .node(self.visits[v].region)
            .map_or(0, |n| n.priority)
    }

    fn verdict(&self, visit: usize, readonly: bool) -> Verdict {
        let region = self.visits[visit].region;
        let cand = self
            .candidates
            .iter()
            .rev()
            .find(|c| c.region == region && c.fate == Fate::Serves);
        let (kind, offset, own_readonly) = cand.map_or((RegionKind::Reservation, 0, false), |c| {
            (c.kind, c.offset, c.readonly)
        });
        Verdict {
            region,
            name: self.visits[visit].name.clone(),
            kind,
            // In range: the address lies inside the region, which is at most
            // 2^64 long.
            offset: u64::try_from(offset).unwrap_or(u64::MAX),
            readonly,
            own_readonly,
            path: self
                .path(visit)
                .into_iter()
                .map(|v| self.visits[v].name.clone())
                .collect(),
        }
    }

    /// Where the path to `v` leaves the winner's path: (position in the
    /// winner's path of the last common visit, the visit just below it on
    /// `v`'s side). Every visit walked is remembered, so all losers together
    /// cost time linear in the walk, however deep they are.
    fn divergence(
        &self,
        v: usize,
        on_winner_path: &HashMap<usize, usize>,
        memo: &mut HashMap<usize, (usize, usize)>,
    ) -> Option<(usize, usize)> {
        let mut walked = Vec::new();
        let mut cur = v;
        let found = loop {
            if let Some(&k) = on_winner_path.get(&cur) {
                break walked.last().map(|&below| (k, below));
            }
            if let Some(&known) = memo.get(&cur) {
                break Some(known);
            }
            walked.push(cur);
            match self.visits[cur].parent {
                Some(p) => cur = p,
                None => break None,
            }
        };
        if let Some(known) = found {
            for w in walked {
                memo.insert(w, known);
            }
        }
        found
    }

    fn explain_obscured(&mut self) {
        let Some((winner, _)) = self.winner else {
            return;
        };
        if self.obscured.is_empty() {
            return;
        }
        let wpath = self.path(winner);
        let on_winner_path: HashMap<usize, usize> =
            wpath.iter().enumerate().map(|(k, &v)| (v, k)).collect();
        let mut memo = HashMap::new();
        let wname = self.visits[winner].name.clone();
        for (c, lv) in std::mem::take(&mut self.obscured) {
            let why = if let Some(&k) = on_winner_path.get(&lv) {
                // The loser is an ancestor of the winner.
                Obscured::OwnSubregion {
                    subregion: wpath
                        .get(k + 1)
                        .map_or_else(String::new, |&v| self.visits[v].name.clone()),
                }
            } else {
                let Some((k, cl)) = self.divergence(lv, &on_winner_path, &mut memo) else {
                    continue;
                };
                let container = self.visits[wpath[k]].name.clone();
                let cw = wpath.get(k + 1).copied();
                let sibling = cw.map_or_else(String::new, |v| self.visits[v].name.clone());
                let sp = cw.map_or(0, |v| self.priority_of(v));
                let lp = self.priority_of(cl);
                if sp > lp {
                    Obscured::HigherPriority {
                        container,
                        sibling,
                        sibling_priority: sp,
                        own_priority: lp,
                    }
                } else {
                    Obscured::NewerSibling {
                        container,
                        sibling,
                        priority: sp,
                    }
                }
            };
            self.candidates[c].fate = Fate::Obscured {
                winner: wname.clone(),
                why,
            };
        }
    }
}

/// A signed value in hex, as the listings print it.
pub(crate) fn hex(v: i128) -> String {
    if v < 0 {
        format!("-{:#x}", v.unsigned_abs())
    } else {
        format!("{v:#x}")
    }
}

/// A region kind in one word (a readonly RAM region is `rom`).
pub(crate) fn kind_word(k: RegionKind, readonly: bool) -> &'static str {
    match k {
        RegionKind::Container => "container",
        RegionKind::Ram if readonly => "rom",
        RegionKind::Ram => "ram",
        RegionKind::RamDevice => "ram-device",
        RegionKind::RomDevice => "rom-device",
        RegionKind::Mmio => "mmio",
        RegionKind::Reservation => "reservation",
        RegionKind::IoRoot => "io-root",
        RegionKind::Alias => "alias",
        RegionKind::Iommu => "iommu",
    }
}

impl fmt::Display for Fate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fate::Serves => f.write_str("SERVES the address"),
            Fate::PassesThrough => {
                f.write_str("container: serves nothing itself, only through its subregions")
            }
            Fate::Redirects { target } => write!(f, "alias: the walk continues in \"{target}\""),
            Fate::Disabled => f.write_str("lost: disabled (it and its whole subtree vanish)"),
            Fate::UnderDisabled { ancestor } => {
                write!(f, "lost: inside \"{ancestor}\", which is disabled")
            }
            Fate::Clipped { by, kind, window } => {
                let what = match kind {
                    ClipKind::Container => "container",
                    ClipKind::AliasWindow => "alias window",
                };
                write!(
                    f,
                    "lost: clipped, the {what} \"{by}\" [{}-{}] does not cover the address",
                    hex(window.0),
                    hex(window.1 - 1)
                )
            }
            Fate::Obscured { winner, why } => {
                write!(f, "lost: obscured by \"{winner}\", ")?;
                match why {
                    Obscured::HigherPriority {
                        container,
                        sibling,
                        sibling_priority,
                        own_priority,
                    } => write!(
                        f,
                        "because in \"{container}\" its branch \"{sibling}\" has priority {sibling_priority} > {own_priority} and renders first"
                    ),
                    Obscured::NewerSibling {
                        container,
                        sibling,
                        priority,
                    } => write!(
                        f,
                        "because in \"{container}\" its branch \"{sibling}\" has the same priority {priority} and was added later (newest renders first)"
                    ),
                    Obscured::OwnSubregion { subregion } => write!(
                        f,
                        "its own subregion \"{subregion}\" covers the address (a region only fills the holes its subregions leave)"
                    ),
                }
            }
        }
    }
}

/// `path` condensed: the first `PATH_HEAD` and last `PATH_TAIL` names.
fn short_names(path: &[String]) -> String {
    if path.len() <= PATH_HEAD + PATH_TAIL + 1 {
        return path.join(" > ");
    }
    format!(
        "{} > ... {} more ... > {}",
        path[..PATH_HEAD].join(" > "),
        path.len() - PATH_HEAD - PATH_TAIL,
        path[path.len() - PATH_TAIL..].join(" > ")
    )
}

impl Explanation {
    /// Whether candidate `i` only passes the walk on (a container or an
    /// alias) to the next candidate, which is directly inside it: a link of
    /// a chain the short listing condenses.
    fn links_to_next(&self, i: usize) -> bool {
        let (Some(c), Some(next)) = (self.candidates.get(i), self.candidates.get(i + 1)) else {
            return false;
        };
        matches!(c.fate, Fate::PassesThrough | Fate::Redirects { .. })
            && self.visits.get(next.visit).and_then(|v| v.parent) == Some(c.visit)
    }

    /// The indentation level of `c` in the condensed listing: one below its
    /// nearest *printed* ancestor (0 without one), so a candidate whose
    /// parents are hidden is not printed under an unrelated line; `printed`
    /// maps the visits of candidates printed so far to their levels.
    fn printed_level(&self, c: &Candidate, printed: &HashMap<usize, usize>) -> usize {
        let mut v = self.visits.get(c.visit).and_then(|v| v.parent);
        while let Some(p) = v {
            if let Some(&l) = printed.get(&p) {
                return l + 1;
            }
            v = self.visits.get(p).and_then(|x| x.parent);
        }
        0
    }

    /// Writes `c` at indentation `level` (its depth with `--all`, see
    /// [`Self::printed_level`] otherwise).
    fn write_candidate(
        &self,
        f: &mut fmt::Formatter<'_>,
        c: &Candidate,
        all: bool,
        level: usize,
    ) -> fmt::Result {
        let (indent, deep) = if level > MAX_INDENT {
            ("  ".repeat(MAX_INDENT + 1), format!("[depth {}] ", c.depth))
        } else {
            ("  ".repeat(level + 1), String::new())
        };
        let via = if !c.is_live() && !all {
            format!(" (via {})", self.short_path(c))
        } else {
            c.via_alias
                .as_ref()
                .map(|a| format!(" (target of alias \"{a}\")"))
                .unwrap_or_default()
        };
        writeln!(
            f,
            "{indent}{deep}{} [{} prio {}] {}-{} @{}{via}",
            c.name,
            kind_word(c.kind, c.readonly),
            c.priority,
            hex(c.range.0),
            hex(c.range.1 - 1),
            hex(c.offset),
        )?;
        let same = match &c.fate {
            Fate::Obscured { winner, .. } if *winner == c.name => {
                " (the same region, reached earlier through another path)"
            }
            _ => "",
        };
        writeln!(f, "{indent}  -> {}{same}", c.fate)
    }
}

impl fmt::Display for Explanation {
    /// `{}` shows the live candidates and the topmost disabled or clipped
    /// ones, and condenses long chains (of root steps, of containers and
    /// aliases one inside the next, of path names) to their ends and a
    /// count, so that its size does not grow with the depth of the machine;
    /// `{:#}` shows every candidate and every step, one line each
    /// (indentation stops growing at depth 24).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all = f.alternate();
        writeln!(
            f,
            "address {:#018x} in address space \"{}\" (root: {})",
            self.addr,
            self.space,
            self.root.as_deref().unwrap_or("(none)")
        )?;
        let steps = self.root_steps.len();
        for (i, s) in self.root_steps.iter().enumerate() {
            if !all && steps > 2 * RUN_SHOWN + 1 && i >= RUN_SHOWN && i < steps - RUN_SHOWN {
                if i == RUN_SHOWN {
                    writeln!(
                        f,
                        "  ... {} more steps of the same kind (--all lists them)",
                        steps - 2 * RUN_SHOWN
                    )?;
                }
                continue;
            }
            writeln!(f, "  {s}")?;
        }
        match &self.verdict {
            Some(v) => writeln!(
                f,
                "served by \"{}\" ({}{}) at offset {:#x}\n  path: {}",
                v.name,
                kind_word(v.kind, v.own_readonly),
                if v.readonly && !v.own_readonly {
                    ", readonly through its path"
                } else {
                    ""
                },
                v.offset,
                if all {
                    v.path.join(" > ")
                } else {
                    short_names(&v.path)
                }
            )?,
            None => writeln!(f, "unassigned: no region serves this address")?,
        }
        if self.candidates.is_empty() {
            return writeln!(f, "no region covers this address");
        }
        writeln!(f, "candidates covering the address, in rendering order:")?;
        let mut hidden = 0usize;
        let mut i = 0;
        let mut printed: HashMap<usize, usize> = HashMap::new();
        let mut write = |f: &mut fmt::Formatter<'_>, c: &Candidate| -> Result<usize, fmt::Error> {
            let level = if all {
                c.depth
            } else {
                self.printed_level(c, &printed)
            };
            printed.insert(c.visit, level);
            self.write_candidate(f, c, all, level)?;
            Ok(level)
        };
        while i < self.candidates.len() {
            let c = &self.candidates[i];
            if !all && !c.is_notable() {
                hidden += 1;
                i += 1;
                continue;
            }
            if !all && self.links_to_next(i) {
                // A chain: candidates i..=end, each directly inside the one
                // before; show its ends and count the middle.
                let mut end = i;
                while self.links_to_next(end) {
                    end += 1;
                }
                let len = end - i + 1;
                if len > 2 * RUN_SHOWN + 1 {
                    let mut level = 0;
                    for c in &self.candidates[i..i + RUN_SHOWN] {
                        level = write(f, c)?;
                    }
                    let depth = (level + 1).min(MAX_INDENT);
                    writeln!(
                        f,
                        "{}... {} more levels, each a container or an alias directly inside the one above (--all lists them)",
                        "  ".repeat(depth + 1),
                        len - 2 * RUN_SHOWN
                    )?;
                    for c in &self.candidates[end + 1 - RUN_SHOWN..=end] {
                        write(f, c)?;
                    }
                    i = end + 1;
                    continue;
                }
            }
            write(f, c)?;
            i += 1;
        }
        if hidden > 0 {
            writeln!(
                f,
                "({hidden} more candidate(s) inside disabled or clipped regions; --all shows them)"
            )?;
        }
        if self.truncated {
            writeln!(
                f,
                "(stopped listing clipped and disabled candidates after {SHADOW_BUDGET} visits)"
            )?;
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "qemu-text"))]
mod tests {
    use super::*;
    use crate::qemu_text::{import, parse};
    use crate::topology::memory::Memory;

    /// `tests/data/oracle/` of the repository, or `MEMTREE_ORACLE` (with a `/`).
    fn oracle_dir() -> String {
        match std::env::var("MEMTREE_ORACLE") {
            Ok(d) => format!("{}/", d.trim_end_matches('/')),
            Err(_) => concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/oracle/").to_owned(),
        }
    }

    fn oracle(machine: &str) -> Memory {
        let dir = oracle_dir();
        let tree =
            std::fs::read_to_string(format!("{dir}{machine}.disabled.txt")).expect("tree dump");
        let flat = std::fs::read_to_string(format!("{dir}{machine}.flat.txt")).expect("flat dump");
        let tree = parse::parse_tree(&tree).expect("parse tree");
        let flat = parse::parse_flat(&flat).expect("parse flat");
        import::import(&tree, Some(&flat), None)
            .expect("import")
            .memory
    }

    /// The verdict of `explain` is what the published flat view says, at
    /// every boundary of every flat range of every address space (and just
    /// outside each range).
    fn assert_agrees_with_flat_view(mem: &Memory) -> usize {
        let mut checked = 0;
        for (id, name) in mem.address_spaces() {
            let view = mem.address_space(id).unwrap().view();
            let mut addrs = vec![0, u64::MAX];
            for r in view.iter() {
                addrs.extend([r.start(), r.last()]);
                addrs.extend(r.start().checked_sub(1));
                addrs.extend(r.last().checked_add(1));
                addrs.push(r.start() + (r.last() - r.start()) / 2);
            }
            addrs.sort_unstable();
            addrs.dedup();
            for a in addrs {
                let why = explain(mem, id, a).unwrap();
                let expected = view
                    .lookup(a)
                    .map(|r| (r.region().id(), r.offset_in_region() + (a - r.start())));
                let got = why.verdict.as_ref().map(|v| (v.region, v.offset));
                assert_eq!(
                    got, expected,
                    "address space {name:?}, address {a:#x}:\n{why:#}"
                );
                let serving = why
                    .candidates
                    .iter()
                    .filter(|c| c.fate == Fate::Serves)
                    .count();
                assert_eq!(serving, usize::from(expected.is_some()), "{why:#}");
                checked += 1;
            }
        }
        checked
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads oracle dumps from disk")]
    fn lookup_agrees_with_flat_view_at_every_range_boundary_of_oracle_machines() {
        let machines = [
            "x86_64/pc",
            "x86_64/q35",
            "x86_64/isapc",
            "x86_64/microvm",
            "aarch64/virt",
            "variants/pc-pcidevs",
            "variants/q35-pcidevs",
            "dynamic/q35-pam/03-pam-mixed",
            "dynamic/q35-pam/01-pam-all-ram-rw",
        ];
        let dir = oracle_dir();
        // Plus every snapshot of every dynamic scenario.
        let mut all: Vec<String> = machines.iter().map(|m| m.to_string()).collect();
        for scenario in std::fs::read_dir(format!("{dir}dynamic"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in std::fs::read_dir(scenario.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = f.file_name().to_string_lossy().into_owned();
                if let Some(stem) = name.strip_suffix(".disabled.txt") {
                    let s = scenario.file_name().to_string_lossy().into_owned();
                    all.push(format!("dynamic/{s}/{stem}"));
                }
            }
        }
        let mut total = 0;
        let mut checked_machines = 0;
        for m in &all {
            if !std::path::Path::new(&format!("{dir}{m}.disabled.txt")).exists() {
                continue;
            }
            total += assert_agrees_with_flat_view(&oracle(m));
            checked_machines += 1;
        }
        assert!(
            checked_machines >= 8,
            "only {checked_machines} machines found"
        );
        assert!(total > 1000, "only {total} addresses checked");
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads oracle dumps from disk")]
    fn lookup_pam_area_of_pc_names_the_winning_alias_and_why_ram_lost() {
        let mem = oracle("x86_64/pc");
        let space = mem.find_address_space("memory").unwrap();
        let why = explain(&mem, space, 0xc0000).unwrap();
        let v = why.verdict.as_ref().unwrap();
        assert_eq!((v.name.as_str(), v.offset), ("pc.rom", 0));
        assert!(v.path.iter().any(|p| p == "pam-pci"), "{why}");
        let ram = why
            .candidates
            .iter()
            .find(|c| c.name == "pc.ram" && c.via_alias.as_deref() == Some("ram-below-4g"))
            .expect("pc.ram through ram-below-4g is a candidate");
        assert_eq!(why.path(ram), ["system", "ram-below-4g"]);
        assert_eq!(
            ram.fate,
            Fate::Obscured {
                winner: "pc.rom".into(),
                why: Obscured::HigherPriority {
                    container: "system".into(),
                    sibling: "pam-pci".into(),
                    sibling_priority: 1,
                    own_priority: 0,
                }
            }
        );
        assert!(why
            .candidates
            .iter()
            .any(|c| c.name == "pam-ram" && c.fate == Fate::Disabled));
        assert!(why.candidates.iter().any(|c| c.name == "pc.ram"
            && c.fate
                == Fate::UnderDisabled {
                    ancestor: "pam-ram".into()
                }));
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads oracle dumps from disk")]
    fn lookup_io_root_loses_to_its_own_subregion() {
        let mem = oracle("x86_64/pc");
        let space = mem.find_address_space("I/O").unwrap();
        let why = explain(&mem, space, 0x70).unwrap();
        assert_eq!(why.verdict.as_ref().unwrap().name, "rtc-index");
        let io = why.candidates.iter().find(|c| c.name == "io").unwrap();
        assert!(
            matches!(&io.fate, Fate::Obscured { why: Obscured::OwnSubregion { subregion }, .. } if subregion == "rtc"),
            "{why:#}"
        );
    }
}
