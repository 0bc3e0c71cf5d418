//! The census: a registry of every live lifecycle object and of the strong
//! references between them, so that any survivor can be explained.
//!
//! A web of `Arc`s cannot say who holds it. memtree therefore declares every
//! strong reference it creates between lifecycle objects as an *edge* in the
//! census at the moment the holder is created, and removes the holder's node
//! (with its edges) when the holder is finalized. Explaining an object is then
//! a reverse walk from it to a *root*: an object nobody in the census holds
//! (the machine topology, an address-space handle, a DMA mapping held by a
//! device, a handle held by user code).
//!
//! # Invariants
//!
//! * The census holds no reference to any object it describes (only keys and
//!   names), so it cannot keep anything alive.
//! * `register` and `finalize` are called exactly once per object, from the
//!   object's constructor and `Drop`; a second `finalize` of a key is recorded
//!   as a violation (`double_finalized`), which tests assert to be empty.
//! * Every panic of code memtree ran on someone's behalf is recorded
//!   (`record_panic`) and never forgotten: a census that saw one never
//!   reports clean again.
//! * The finalization log is in the order `Drop`s ran, which is what the
//!   teardown-order tests inspect.
//!
//! # Locking
//!
//! One `parking_lot::Mutex` around the whole registry. It is a leaf lock:
//! nothing is called while it is held.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};

use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

/// Identifies a census entry. Keys are never reused.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(u64);

impl ObjectKey {
    /// The key as a number (for tables that store keys in atomics).
    pub(crate) fn raw(self) -> u64 {
        self.0
    }

    /// A key from [`raw`](Self::raw).
    pub(crate) fn from_raw(raw: u64) -> ObjectKey {
        ObjectKey(raw)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What kind of object a census entry describes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// The machine's topology (the control plane): holds every region, owner
    /// and address space that has not been destroyed.
    Topology,
    /// A device or other owner object.
    Owner,
    /// A memory region.
    Region,
    /// Host memory behind RAM regions.
    Backend,
    /// A rendered flat view.
    FlatView,
    /// An address space's data-plane handle state.
    AddressSpace,
    /// A DMA mapping, cache or region section handed out to a caller.
    Mapping,
    /// A vhost-user back-end (another process) holding the memory in its
    /// memory table, until it acknowledges the removal.
    VhostUser,
}

impl ObjectKind {
    /// Lower-case name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Topology => "topology",
            ObjectKind::Owner => "owner",
            ObjectKind::Region => "region",
            ObjectKind::Backend => "backend",
            ObjectKind::FlatView => "flatview",
            ObjectKind::AddressSpace => "address-space",
            ObjectKind::Mapping => "mapping",
            ObjectKind::VhostUser => "vhost-user back-end",
        }
    }
}

/// One live object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CensusEntry {
    /// The object's key (unique for the census's lifetime).
    pub key: ObjectKey,
    /// What kind of object it is.
    pub kind: ObjectKind,
    /// Its name (not unique).
    pub name: String,
    /// Objects this one holds strongly.
    pub holds: BTreeSet<ObjectKey>,
}

/// A finalization event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finalized {
    /// The finalized object's key.
    pub key: ObjectKey,
    /// What kind of object it was.
    pub kind: ObjectKind,
    /// Its name.
    pub name: String,
}

#[derive(Default)]
struct Registry {
    next: u64,
    live: BTreeMap<ObjectKey, CensusEntry>,
    log: Vec<Finalized>,
    double_finalized: Vec<ObjectKey>,
    panics: Vec<String>,
    keep_log: bool,
}

/// The registry. One per machine ([`crate::Memory`]); shared by `Arc` with
/// every object that registers in it.
///
/// ```
/// use memtree::{DmaDirection, MemTxAttrs, Memory, ObjectKind};
///
/// let memory = Memory::new();
/// let system = memory.new_container("system", 1 << 32, None).unwrap();
/// let nic = memory.new_owner("nic0", None).unwrap();
/// let buffer = memory.new_ram("nic0-buffer", 0x1000, Some(nic)).unwrap();
/// memory.add_subregion(system, 0, buffer).unwrap();
/// let id = memory.new_address_space("memory", system, None).unwrap();
/// let bus = memory.address_space(id).unwrap();
///
/// // The memory behind the buffer, by id: no search by name.
/// let key = memory.backend_census_key(buffer).unwrap().unwrap();
/// let census = memory.census().clone();
/// assert_eq!(census.entry(key).unwrap().kind, ObjectKind::Backend);
///
/// // A mapping outlives the unplug; the census says who holds the memory.
/// let dma = bus.map(0, 64, DmaDirection::ToDevice, MemTxAttrs::UNSPECIFIED).unwrap();
/// memory.unplug(nic).unwrap();
/// assert!(census.explain(key)[0].starts_with("held by mapping"));
/// drop(dma);
/// assert!(!census.is_live(key));
/// ```
pub struct Census {
    inner: Mutex<Registry>,
    /// Objects registered lazily (DMA mappings, see [`crate::dma::mapping`]): synced
    /// into the registry before every query.
    source: OnceLock<Arc<dyn CensusSource>>,
}

/// A source of objects the census registers lazily: recording them must be
/// cheaper than a census registration (DMA mappings on the fast path), so
/// the census asks the source to register whatever it has not yet before it
/// answers any query ([`Census::is_live`], [`Census::live`],
/// [`Census::counts`], [`Census::holder_chains`], [`Census::explain`],
/// [`Census::to_dot`]). The source must not be held by anything it
/// describes, and must call only `register*` and `finalize` from `sync`.
pub trait CensusSource: Send + Sync {
    /// Registers every object not yet registered.
    fn sync(&self, census: &Census);
}

impl fmt::Debug for Census {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Census")
            .field("counts", &self.counts())
            .finish()
    }
}

impl Default for Census {
    fn default() -> Self {
        Census::new()
    }
}

impl Census {
    /// An empty census that records finalization events.
    pub fn new() -> Census {
        Census {
            inner: Mutex::new(Registry {
                keep_log: true,
                ..Registry::default()
            }),
            source: OnceLock::new(),
        }
    }

    /// Registers a new object that holds `holds` (if any).
    pub fn register(&self, kind: ObjectKind, name: &str, holds: Option<ObjectKey>) -> ObjectKey {
        self.register_holding(kind, name, holds)
    }

    /// Registers a new object holding every key in `holds`.
    pub fn register_holding(
        &self,
        kind: ObjectKind,
        name: &str,
        holds: impl IntoIterator<Item = ObjectKey>,
    ) -> ObjectKey {
        let mut reg = self.inner.lock();
        reg.next += 1;
        let key = ObjectKey(reg.next);
        reg.live.insert(
            key,
            CensusEntry {
                key,
                kind,
                name: name.to_owned(),
                holds: holds.into_iter().collect(),
            },
        );
        key
    }

    /// Declares that `holder` now also holds `held`.
    pub fn add_edge(&self, holder: ObjectKey, held: ObjectKey) {
        if let Some(e) = self.inner.lock().live.get_mut(&holder) {
            e.holds.insert(held);
        }
    }

    /// Declares that `holder` no longer holds `held`.
    pub fn remove_edge(&self, holder: ObjectKey, held: ObjectKey) {
        if let Some(e) = self.inner.lock().live.get_mut(&holder) {
            e.holds.remove(&held);
        }
    }

    /// Records that `key` has been finalized and drops its edges.
    pub fn finalize(&self, key: ObjectKey) {
        let mut reg = self.inner.lock();
        match reg.live.remove(&key) {
            Some(e) => {
                if reg.keep_log {
                    reg.log.push(Finalized {
                        key,
                        kind: e.kind,
                        name: e.name,
                    });
                }
            }
            None => reg.double_finalized.push(key),
        }
    }

    /// Records that code memtree ran on someone's behalf (a listener, a
    /// finalizer, the `Drop` of device state) panicked: `what` says which
    /// and with what message. The panic itself is re-raised to the caller
    /// of the machine method that ran the code (see
    /// [`crate::topology::memory`], "Panics"); this record is what stays, and it makes
    /// every later leak report unclean.
    pub fn record_panic(&self, what: String) {
        self.inner.lock().panics.push(what);
    }

    /// Every panic recorded by [`Census::record_panic`], oldest first.
    pub fn panics(&self) -> Vec<String> {
        self.inner.lock().panics.clone()
    }

    /// Installs the lazily registered source (once; later calls are
    /// ignored).
    pub fn set_source(&self, source: Arc<dyn CensusSource>) {
        let _ = self.source.set(source);
    }

    fn sync(&self) {
        if let Some(s) = self.source.get() {
            s.sync(self);
        }
    }

    /// The name of a live object (does not sync the lazy source).
    pub fn name_of(&self, key: ObjectKey) -> Option<String> {
        self.inner.lock().live.get(&key).map(|e| e.name.clone())
    }

    /// The entry of a live object, `None` once it is finalized.
    pub fn entry(&self, key: ObjectKey) -> Option<CensusEntry> {
        self.sync();
        self.inner.lock().live.get(&key).cloned()
    }

    /// Whether `key` is still alive.
    pub fn is_live(&self, key: ObjectKey) -> bool {
        self.sync();
        self.inner.lock().live.contains_key(&key)
    }

    /// Every live object, in creation order.
    pub fn live(&self) -> Vec<CensusEntry> {
        self.sync();
        self.inner.lock().live.values().cloned().collect()
    }

    /// Number of live objects of each kind.
    pub fn counts(&self) -> BTreeMap<ObjectKind, usize> {
        self.sync();
        let mut out = BTreeMap::new();
        for e in self.inner.lock().live.values() {
            *out.entry(e.kind).or_insert(0) += 1;
        }
        out
    }

    /// The finalization log so far, oldest first.
    pub fn finalized(&self) -> Vec<Finalized> {
        self.inner.lock().log.clone()
    }

    /// Keys finalized more than once (must always be empty).
    pub fn double_finalized(&self) -> Vec<ObjectKey> {
        self.inner.lock().double_finalized.clone()
    }

    /// Stops recording the finalization log (long soak tests), clearing it.
    pub fn set_keep_log(&self, keep: bool) {
        let mut reg = self.inner.lock();
        reg.keep_log = keep;
        if !keep {
            reg.log.clear();
        }
    }

    /// The chains of holders that keep `key` alive: each chain starts at a
    /// root holder and ends at `key`. Empty if `key` is not live. Chains are
    /// found by a breadth-first reverse walk; at most `limit` chains.
    pub fn holder_chains(&self, key: ObjectKey, limit: usize) -> Vec<Vec<CensusEntry>> {
        self.sync();
        let reg = self.inner.lock();
        if !reg.live.contains_key(&key) {
            return Vec::new();
        }
        // Reverse edges, restricted to live objects.
        let mut held_by: BTreeMap<ObjectKey, Vec<ObjectKey>> = BTreeMap::new();
        for e in reg.live.values() {
            for h in &e.holds {
                if reg.live.contains_key(h) {
                    held_by.entry(*h).or_default().push(e.key);
                }
            }
        }
        let mut chains = Vec::new();
        // Depth-first search with a path; paths never repeat a node.
        let mut stack: Vec<Vec<ObjectKey>> = vec![vec![key]];
        while let Some(path) = stack.pop() {
            if chains.len() >= limit {
                break;
            }
            let Some(&head) = path.last() else { continue };
            let holders = held_by.get(&head).map(Vec::as_slice).unwrap_or(&[]);
            let fresh: Vec<ObjectKey> = holders
                .iter()
                .copied()
                .filter(|h| !path.contains(h))
                .collect();
            if fresh.is_empty() {
                let chain = path
                    .iter()
                    .rev()
                    .filter_map(|k| reg.live.get(k).cloned())
                    .collect();
                chains.push(chain);
                continue;
            }
            for h in fresh.into_iter().rev() {
                let mut p = path.clone();
                p.push(h);
                stack.push(p);
            }
        }
        chains
    }

    /// One line per chain: `held by mapping #3 "dma" -> region #7 "e1000-mmio" -> owner #2 "e1000"`.
    pub fn explain(&self, key: ObjectKey) -> Vec<String> {
        self.holder_chains(key, 16)
            .into_iter()
            .map(|chain| {
                let mut s = String::from("held by ");
                for (i, e) in chain.iter().enumerate() {
                    if i > 0 {
                        s.push_str(" -> ");
                    }
                    let _ = write!(s, "{} {} \"{}\"", e.kind.as_str(), e.key, e.name);
                }
                s
            })
            .collect()
    }

    /// A Graphviz DOT rendering of the live objects and their strong edges.
    pub fn to_dot(&self) -> String {
        self.sync();
        let reg = self.inner.lock();
        let mut s = String::from(
            "digraph memtree {\n  rankdir=LR;\n  node [shape=box, fontname=monospace];\n",
        );
        for e in reg.live.values() {
            let shape = match e.kind {
                ObjectKind::Topology => "doubleoctagon",
                ObjectKind::Owner => "component",
                ObjectKind::Region => "box",
                ObjectKind::Backend => "cylinder",
                ObjectKind::FlatView => "folder",
                ObjectKind::AddressSpace => "house",
                ObjectKind::Mapping => "cds",
                ObjectKind::VhostUser => "hexagon",
            };
            let _ = writeln!(
                s,
                "  n{} [label=\"{} {}\\n{}\", shape={}];",
                e.key.0,
                e.kind.as_str(),
                e.key,
                dot_escape(&e.name),
                shape
            );
        }
        for e in reg.live.values() {
            for h in &e.holds {
                if reg.live.contains_key(h) {
                    let _ = writeln!(s, "  n{} -> n{};", e.key.0, h.0);
                }
            }
        }
        s.push_str("}\n");
        s
    }
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn census_explains_a_chain_from_its_root() {
        let c = Census::new();
        let owner = c.register(ObjectKind::Owner, "e1000", None);
        let region = c.register(ObjectKind::Region, "e1000-mmio", Some(owner));
        let _mapping = c.register(ObjectKind::Mapping, "dma 3", Some(region));
        let lines = c.explain(owner);
        assert_eq!(
            lines,
            vec![format!(
                "held by mapping #3 \"dma 3\" -> region #2 \"e1000-mmio\" -> owner #1 \"e1000\""
            )]
        );
    }

    #[test]
    fn census_records_finalization_once() {
        let c = Census::new();
        let k = c.register(ObjectKind::Region, "r", None);
        c.finalize(k);
        c.finalize(k);
        assert_eq!(c.finalized().len(), 1);
        assert_eq!(c.double_finalized(), vec![k]);
        assert!(!c.is_live(k));
    }
}
