//! Diagnostics on top of the [census](crate::lifecycle::census): what is alive, why,
//! and what leaked.
//!
//! * [`report`] — counts by kind and a listing of every live object with what
//!   it holds ([`CensusReport`], printable).
//! * [`explain`] — the census's holder chains for one object, with keys and
//!   names; [`why_alive`] — the same chains in plain words:
//!   `held by mapping #3 -> region e1000-mmio -> e1000`.
//! * [`leak_report`] — every live object except the topology itself, each
//!   with its chains (the same [`LeakReport`] that
//!   [`crate::Memory::teardown`] returns, but without tearing anything down:
//!   call it after you think everything is gone).
//! * [`to_dot`] / [`holders_to_dot`] — Graphviz DOT of the whole reference
//!   graph (roots drawn bold) or of just the holders of one object.
//!
//! DMA mappings, caches and sections appear as [`ObjectKind::Mapping`]
//! objects (registered lazily by [`crate::dma::mapping`]); every function here sees
//! them because every census query syncs them first.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};

use crate::lifecycle::census::{Census, CensusEntry, ObjectKey, ObjectKind};

/// Objects still alive after teardown, each with the chains of holders that
/// keep it alive.
#[derive(Clone, Debug, Default)]
pub struct LeakReport {
    /// Survivors and their explanations.
    pub survivors: Vec<(CensusEntry, Vec<String>)>,
    /// Panics of other people's code memtree ran (listeners, finalizers,
    /// the `Drop` of device state) over the machine's life, as the census
    /// recorded them: which code, and the message.
    pub panics: Vec<String>,
}

impl LeakReport {
    /// True when nothing survived and nothing panicked.
    pub fn is_clean(&self) -> bool {
        self.survivors.is_empty() && self.panics.is_empty()
    }
}

impl fmt::Display for LeakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.panics {
            writeln!(f, "panic: {p}")?;
        }
        if self.survivors.is_empty() {
            return writeln!(f, "leak report: nothing survived teardown");
        }
        writeln!(
            f,
            "leak report: {} object(s) survived teardown",
            self.survivors.len()
        )?;
        for (e, chains) in &self.survivors {
            writeln!(f, "  {} {} \"{}\"", e.kind.as_str(), e.key, e.name)?;
            for c in chains {
                writeln!(f, "    {c}")?;
            }
            if chains
                .iter()
                .all(|c| !c.contains(" -> ") && !c.contains("outside memtree"))
            {
                writeln!(
                    f,
                    "    (a root: held by a handle outside memtree, e.g. a mapping or address-space handle)"
                )?;
            }
        }
        Ok(())
    }
}

/// Live objects: counts by kind and the full listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CensusReport {
    /// Number of live objects of each kind.
    pub counts: BTreeMap<ObjectKind, usize>,
    /// Every live object, in creation order.
    pub entries: Vec<CensusEntry>,
}

impl CensusReport {
    /// Total number of live objects.
    pub fn total(&self) -> usize {
        self.entries.len()
    }

    /// Number of live objects of `kind`.
    pub fn count(&self, kind: ObjectKind) -> usize {
        self.counts.get(&kind).copied().unwrap_or(0)
    }
}

impl fmt::Display for CensusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "census: {} live object(s)", self.total())?;
        let parts: Vec<String> = self
            .counts
            .iter()
            .map(|(k, n)| format!("{} {n}", k.as_str()))
            .collect();
        if !parts.is_empty() {
            write!(f, " ({})", parts.join(", "))?;
        }
        writeln!(f)?;
        for e in &self.entries {
            write!(f, "  {} {} \"{}\"", e.kind.as_str(), e.key, e.name)?;
            if !e.holds.is_empty() {
                let held: Vec<String> = e.holds.iter().map(ToString::to_string).collect();
                write!(f, " holds {}", held.join(", "))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Counts and listing of the live objects.
pub fn report(census: &Census) -> CensusReport {
    let entries = census.live();
    let mut counts = BTreeMap::new();
    for e in &entries {
        *counts.entry(e.kind).or_insert(0) += 1;
    }
    CensusReport { counts, entries }
}

/// The chains of holders keeping `key` alive, one line each, with keys and
/// names (see [`Census::explain`]). Empty if `key` is not alive.
pub fn explain(census: &Census, key: ObjectKey) -> Vec<String> {
    census.explain(key)
}

fn word(e: &CensusEntry) -> String {
    match e.kind {
        ObjectKind::Topology => "the machine topology".to_owned(),
        ObjectKind::Owner => e.name.clone(),
        ObjectKind::Region => format!("region {}", e.name),
        ObjectKind::Backend => format!("memory {}", e.name),
        ObjectKind::FlatView => format!("flat view of {}", e.name),
        ObjectKind::AddressSpace => format!("address space {}", e.name),
        ObjectKind::Mapping => format!("mapping {}", e.key),
        ObjectKind::VhostUser => format!("vhost-user back-end {}", e.name),
    }
}

/// The chains keeping `key` alive in plain words, root first:
/// `held by mapping #3 -> region e1000-mmio -> e1000`. A root that nothing
/// in the census holds is held by user code (a handle, a guard); a chain of
/// one element says so.
pub fn why_alive(census: &Census, key: ObjectKey) -> Vec<String> {
    census
        .holder_chains(key, 16)
        .into_iter()
        .map(|chain| {
            if chain.len() == 1 {
                return format!("{} is held directly by user code", word(&chain[0]));
            }
            let words: Vec<String> = chain.iter().map(word).collect();
            format!("held by {}", words.join(" -> "))
        })
        .collect()
}

/// Every live object except the topology, with its holder chains, and
/// every panic the census recorded. Clean when nothing but the topology is
/// alive and nothing panicked.
///
/// A chain whose root is an address space's handle state or a flat view
/// starts with the holder outside memtree that keeps that root (an
/// `AddressSpace` handle, an `Arc<FlatView>`), never with the survivor
/// itself.
pub fn leak_report(census: &Census) -> LeakReport {
    leak_report_naming(census, &BTreeMap::new())
}

/// [`leak_report`], naming the address spaces that published each view
/// (`view_spaces`: view key → space names), as teardown knows them.
pub(crate) fn leak_report_naming(
    census: &Census,
    view_spaces: &BTreeMap<ObjectKey, Vec<String>>,
) -> LeakReport {
    let survivors = census
        .live()
        .into_iter()
        .filter(|e| e.kind != ObjectKind::Topology)
        .map(|e| {
            let chains = census
                .holder_chains(e.key, 16)
                .iter()
                .map(|chain| leak_chain(chain, view_spaces))
                .collect();
            (e, chains)
        })
        .collect();
    LeakReport {
        survivors,
        panics: census.panics(),
    }
}

/// The holder outside memtree of a root the census cannot see past: user
/// code holds address-space handles and views, memtree never does once the
/// machine is gone.
fn outside_holder(
    root: &CensusEntry,
    view_spaces: &BTreeMap<ObjectKey, Vec<String>>,
) -> Option<String> {
    match root.kind {
        ObjectKind::AddressSpace => Some(format!(
            "an AddressSpace handle outside memtree (from Memory::address_space for \"{}\", or a SpaceCursor of it)",
            root.name
        )),
        ObjectKind::FlatView => Some(match view_spaces.get(&root.key) {
            Some(spaces) if !spaces.is_empty() => {
                let names: Vec<String> = spaces.iter().map(|n| format!("\"{n}\"")).collect();
                format!(
                    "an Arc<FlatView> outside memtree (from AddressSpace::view() of {})",
                    names.join(" or ")
                )
            }
            _ => "an Arc<FlatView> outside memtree (from AddressSpace::view(), a SpaceCursor or CurrentView::to_arc)".to_owned(),
        }),
        _ => None,
    }
}

/// One chain in the leak report's words: `held by <root holder> -> ... ->
/// survivor`, with the outside holder first when the root has one; a
/// survivor that is itself such a root is `held by <outside holder>`.
fn leak_chain(chain: &[CensusEntry], view_spaces: &BTreeMap<ObjectKey, Vec<String>>) -> String {
    let mut s = String::from("held by ");
    let outside = chain
        .first()
        .and_then(|root| outside_holder(root, view_spaces));
    let shown = match &outside {
        Some(holder) => {
            s.push_str(holder);
            if chain.len() == 1 {
                return s;
            }
            s.push_str(" -> ");
            chain
        }
        None => chain,
    };
    for (i, e) in shown.iter().enumerate() {
        if i > 0 {
            s.push_str(" -> ");
        }
        let _ = write!(s, "{} {} \"{}\"", e.kind.as_str(), e.key, e.name);
    }
    s
}

fn shape(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Topology => "doubleoctagon",
        ObjectKind::Owner => "component",
        ObjectKind::Region => "box",
        ObjectKind::Backend => "cylinder",
        ObjectKind::FlatView => "folder",
        ObjectKind::AddressSpace => "house",
        ObjectKind::Mapping => "cds",
        ObjectKind::VhostUser => "hexagon",
    }
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn render_dot(entries: &[CensusEntry], focus: Option<ObjectKey>) -> String {
    let present: BTreeSet<ObjectKey> = entries.iter().map(|e| e.key).collect();
    let held: BTreeSet<ObjectKey> = entries
        .iter()
        .flat_map(|e| e.holds.iter().copied())
        .filter(|k| present.contains(k))
        .collect();
    let mut s =
        String::from("digraph memtree {\n  rankdir=LR;\n  node [shape=box, fontname=monospace];\n");
    for e in entries {
        let mut style = Vec::new();
        if !held.contains(&e.key) {
            style.push("bold");
        }
        if Some(e.key) == focus {
            style.push("filled");
        }
        let _ = writeln!(
            s,
            "  n{} [label=\"{} {}\\n{}\", shape={}{}];",
            e.key.to_string().trim_start_matches('#'),
            e.kind.as_str(),
            e.key,
            dot_escape(&e.name),
            shape(e.kind),
            if style.is_empty() {
                String::new()
            } else {
                format!(", style=\"{}\"", style.join(","))
            }
        );
    }
    for e in entries {
        for h in e.holds.iter().filter(|h| present.contains(h)) {
            let _ = writeln!(
                s,
                "  n{} -> n{};",
                e.key.to_string().trim_start_matches('#'),
                h.to_string().trim_start_matches('#')
            );
        }
    }
    s.push_str("}\n");
    s
}

/// Graphviz DOT of every live object and the strong references between
/// them; objects nothing in the census holds (roots: the topology, handles
/// and guards held by user code) are drawn bold.
pub fn to_dot(census: &Census) -> String {
    render_dot(&census.live(), None)
}

/// Graphviz DOT of `key` and every object on a chain of holders keeping it
/// alive (`key` filled). Just the graph header if `key` is not alive.
pub fn holders_to_dot(census: &Census, key: ObjectKey) -> String {
    let on_chain: BTreeSet<ObjectKey> = census
        .holder_chains(key, 256)
        .into_iter()
        .flatten()
        .map(|e| e.key)
        .collect();
    let entries: Vec<CensusEntry> = census
        .live()
        .into_iter()
        .filter(|e| on_chain.contains(&e.key))
        .map(|mut e| {
            e.holds.retain(|h| on_chain.contains(h));
            e
        })
        .collect();
    render_dot(&entries, Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diag_why_alive_names_the_chain_in_words() {
        let c = Census::new();
        let owner = c.register(ObjectKind::Owner, "e1000", None);
        let region = c.register(ObjectKind::Region, "e1000-mmio", Some(owner));
        let m = c.register(
            ObjectKind::Mapping,
            "bounce pci 0x0+0x4 to-device",
            Some(region),
        );
        assert_eq!(
            why_alive(&c, owner),
            vec![format!("held by mapping {m} -> region e1000-mmio -> e1000")]
        );
        assert_eq!(
            why_alive(&c, m),
            vec![format!("mapping {m} is held directly by user code")]
        );
    }

    #[test]
    fn diag_report_counts_by_kind() {
        let c = Census::new();
        let o = c.register(ObjectKind::Owner, "dev", None);
        c.register(ObjectKind::Region, "a", Some(o));
        c.register(ObjectKind::Region, "b", Some(o));
        let r = report(&c);
        assert_eq!(r.count(ObjectKind::Region), 2);
        assert_eq!(r.count(ObjectKind::Owner), 1);
        assert_eq!(r.total(), 3);
        let text = r.to_string();
        assert!(
            text.starts_with("census: 3 live object(s) (owner 1, region 2)"),
            "{text}"
        );
    }

    #[test]
    fn diag_dot_marks_roots_and_focuses_on_holders() {
        let c = Census::new();
        let o = c.register(ObjectKind::Owner, "dev", None);
        let r = c.register(ObjectKind::Region, "r \"q\"", Some(o));
        let _other = c.register(ObjectKind::Region, "unrelated", None);
        let dot = to_dot(&c);
        assert!(dot.contains("n2 -> n1;"), "{dot}");
        assert!(dot.contains("r \\\"q\\\""), "{dot}");
        assert!(dot.contains("style=\"bold\""), "{dot}");
        let focus = holders_to_dot(&c, o);
        assert!(focus.contains("n2 -> n1;"), "{focus}");
        assert!(!focus.contains("unrelated"), "{focus}");
        assert!(focus.contains(&format!("n{}", r.to_string().trim_start_matches('#'))));
    }
}
