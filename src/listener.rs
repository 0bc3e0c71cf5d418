//! Memory listeners: QEMU's `MemoryListener` (qemu-memory-semantics.md §6).
//!
//! A listener registered on an address space is told, at every commit that
//! changes that space's flat view, which ranges were removed, kept and added.
//! The diff is computed here, purely, from the old and new views.
//!
//! # Ordering (QEMU's)
//!
//! * `begin` and `commit` go to every registered listener (all address
//!   spaces) in ascending priority, once per commit that changed topology.
//! * `region_del`, `log_stop` go in *reverse* (descending) priority; `region_add`,
//!   `region_nop`, `log_start` forward. All deletions of a space come before
//!   its additions.
//! * Equal priorities keep registration order.
//! * A new listener is replayed the current view of its space: `begin`,
//!   `region_add` (+ `log_start`) for every range, `commit`.
//!
//! Listeners are called with the topology writer lock held (so the topology
//! cannot change under them) but with no borrow of the topology: a listener
//! that tries to change the topology from a callback gets
//! [`crate::TopologyError::ListenerReentry`], never a deadlock.

use std::sync::Arc;

use crate::flatview::{FlatRange, FlatView};
use crate::space::SpaceId;

/// Identity of a registered listener.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub(crate) u64);

/// What a listener callback is told about one range: QEMU's
/// `MemoryRegionSection`.
#[derive(Clone, Copy)]
pub struct Section<'a> {
    /// The address space.
    pub space: SpaceId,
    /// The address space's name.
    pub space_name: &'a str,
    /// The range (in address-space coordinates).
    pub range: &'a FlatRange,
    /// The view published in the space when the callback runs: during a
    /// commit's diff that is still the *old* view (QEMU's behaviour), so for
    /// `region_add` the range belongs to the view about to be published.
    pub view: &'a Arc<FlatView>,
}

impl std::fmt::Debug for Section<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{:?}", self.space_name, self.range)
    }
}

/// Callbacks; every one defaults to doing nothing. Implementations use
/// interior mutability: callbacks take `&self`.
#[allow(unused_variables)]
pub trait MemoryListener: Send + Sync {
    /// Ordering key: lower runs first for forward callbacks.
    fn priority(&self) -> u32 {
        0
    }
    /// A commit (or a replay) starts.
    fn begin(&self) {}
    /// A commit (or a replay) ends.
    fn commit(&self) {}
    /// A range appeared.
    fn region_add(&self, section: &Section<'_>) {}
    /// A range disappeared.
    fn region_del(&self, section: &Section<'_>) {}
    /// A range is unchanged.
    fn region_nop(&self, section: &Section<'_>) {}
    /// Dirty logging started for some clients of a range.
    fn log_start(&self, section: &Section<'_>, old_mask: u8, new_mask: u8) {}
    /// Dirty logging stopped for some clients of a range.
    fn log_stop(&self, section: &Section<'_>, old_mask: u8, new_mask: u8) {}
}

pub(crate) struct Registered {
    pub(crate) id: ListenerId,
    pub(crate) space: SpaceId,
    pub(crate) listener: Arc<dyn MemoryListener>,
    pub(crate) priority: u32,
}

/// The registry, in ascending priority (stable for equal priorities).
#[derive(Default)]
pub(crate) struct Listeners {
    pub(crate) list: Vec<Registered>,
    next: u64,
}

impl Listeners {
    pub(crate) fn insert(&mut self, space: SpaceId, listener: Arc<dyn MemoryListener>) -> ListenerId {
        self.next += 1;
        let id = ListenerId(self.next);
        let priority = listener.priority();
        let at = self.list.partition_point(|r| r.priority <= priority);
        self.list.insert(
            at,
            Registered {
                id,
                space,
                listener,
                priority,
            },
        );
        id
    }

    pub(crate) fn remove(&mut self, id: ListenerId) -> Option<Registered> {
        let i = self.list.iter().position(|r| r.id == id)?;
        Some(self.list.remove(i))
    }

    pub(crate) fn snapshot(&self) -> Vec<(SpaceId, Arc<dyn MemoryListener>)> {
        self.list.iter().map(|r| (r.space, r.listener.clone())).collect()
    }
}

/// QEMU's `flatrange_equal`: everything but the dirty-log mask.
fn same_range(a: &FlatRange, b: &FlatRange) -> bool {
    a.start == b.start
        && a.last == b.last
        && Arc::ptr_eq(&a.region, &b.region)
        && a.offset_in_region == b.offset_in_region
        && a.attrs.readonly == b.attrs.readonly
        && a.attrs.romd_mode == b.attrs.romd_mode
        && a.attrs.nonvolatile == b.attrs.nonvolatile
        && a.attrs.unmergeable == b.attrs.unmergeable
}

/// Runs QEMU's two diff passes for one address space, calling `listeners`
/// (already filtered to this space, ascending priority).
pub(crate) fn diff_and_notify(
    space: SpaceId,
    space_name: &str,
    old: &Arc<FlatView>,
    new: &Arc<FlatView>,
    listeners: &[Arc<dyn MemoryListener>],
) {
    if listeners.is_empty() {
        return;
    }
    // Pass 1: deletions, in reverse listener order.
    let (o, n) = (old.ranges(), new.ranges());
    let (mut i, mut j) = (0, 0);
    while i < o.len() || j < n.len() {
        match (o.get(i), n.get(j)) {
            (Some(a), Some(b)) if same_range(a, b) => {
                i += 1;
                j += 1;
            }
            (Some(a), b) if b.is_none_or(|b| a.start <= b.start) => {
                let s = Section {
                    space,
                    space_name,
                    range: a,
                    view: old,
                };
                for l in listeners.iter().rev() {
                    l.region_del(&s);
                }
                i += 1;
            }
            (_, Some(_)) => j += 1,
            (Some(_), None) | (None, None) => break,
        }
    }
    // Pass 2: nops and additions, forward.
    let (mut i, mut j) = (0, 0);
    while i < o.len() || j < n.len() {
        match (o.get(i), n.get(j)) {
            (Some(a), Some(b)) if same_range(a, b) => {
                let s = Section {
                    space,
                    space_name,
                    range: b,
                    view: old,
                };
                for l in listeners {
                    l.region_nop(&s);
                }
                let (om, nm) = (a.attrs.dirty_log_mask, b.attrs.dirty_log_mask);
                if nm & !om != 0 {
                    for l in listeners {
                        l.log_start(&s, om, nm);
                    }
                }
                if om & !nm != 0 {
                    for l in listeners.iter().rev() {
                        l.log_stop(&s, om, nm);
                    }
                }
                i += 1;
                j += 1;
            }
            (Some(a), b) if b.is_none_or(|b| a.start <= b.start) => i += 1,
            (_, Some(b)) => {
                let s = Section {
                    space,
                    space_name,
                    range: b,
                    view: old,
                };
                for l in listeners {
                    l.region_add(&s);
                }
                j += 1;
            }
            (Some(_), None) | (None, None) => break,
        }
    }
}

/// Replays `view` to one listener as additions (`adding`) or deletions.
pub(crate) fn replay(
    space: SpaceId,
    space_name: &str,
    view: &Arc<FlatView>,
    listener: &dyn MemoryListener,
    adding: bool,
) {
    listener.begin();
    for range in view.ranges() {
        let s = Section {
            space,
            space_name,
            range,
            view,
        };
        let mask = range.attrs.dirty_log_mask;
        if adding {
            listener.region_add(&s);
            if mask != 0 {
                listener.log_start(&s, 0, mask);
            }
        } else {
            if mask != 0 {
                listener.log_stop(&s, mask, 0);
            }
            listener.region_del(&s);
        }
    }
    listener.commit();
}
