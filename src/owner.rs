//! Owners: the devices (or other objects) that own regions and address spaces.
//!
//! Like regions, an owner has a control-plane node in the topology arena
//! (`OwnerNode`: name, parent device, child devices, what it owns) and a
//! data-plane core ([`OwnerCore`]) that every region of the owner holds
//! strongly. The core carries the *liveness gate* checked before each MMIO
//! callback and the owner's finalizer.
//!
//! # Invariants
//!
//! * An `OwnerCore` holds no region, address space or topology reference, so a
//!   region → owner edge can never close a cycle.
//! * The owner finalizes (its `Drop` runs, then its finalizer callback) only
//!   after every `RegionCore` that names it is gone: each holds an `Arc` to it.
//! * Once [`OwnerCore::is_live`] returns false it never returns true again; no
//!   MMIO access that starts after that reaches the owner's callbacks.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::census::{Census, ObjectKey, ObjectKind};
use crate::region::RegionId;
use crate::space::SpaceId;

/// Identity of an owner in the topology arena (index + generation).
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl fmt::Debug for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerId({}v{})", self.index, self.generation)
    }
}

/// A finalizer: runs once, when the owner is finalized.
pub type Finalizer = Box<dyn FnOnce() + Send>;

/// The data-plane half of an owner.
pub struct OwnerCore {
    id: OwnerId,
    name: Box<str>,
    live: AtomicBool,
    finalizer: Mutex<Option<Finalizer>>,
    census: Arc<Census>,
    key: ObjectKey,
}

impl OwnerCore {
    pub(crate) fn new(id: OwnerId, name: &str, census: &Arc<Census>) -> OwnerCore {
        let key = census.register(ObjectKind::Owner, name, None);
        OwnerCore {
            id,
            name: name.into(),
            live: AtomicBool::new(true),
            finalizer: Mutex::new(None),
            census: census.clone(),
            key,
        }
    }

    /// The owner's id.
    pub fn id(&self) -> OwnerId {
        self.id
    }

    /// The owner's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the owner is still plugged in. Checked before every MMIO
    /// callback.
    #[inline]
    pub fn is_live(&self) -> bool {
        // Acquire pairs with the Release in `unplug`: an access that sees
        // `false` also sees the unplug's earlier writes.
        self.live.load(Ordering::Acquire)
    }

    pub(crate) fn unplug(&self) {
        self.live.store(false, Ordering::Release);
    }

    pub(crate) fn set_finalizer(&self, f: Finalizer) {
        *self.finalizer.lock() = Some(f);
    }

    /// The owner's census key.
    pub fn census_key(&self) -> ObjectKey {
        self.key
    }
}

impl fmt::Debug for OwnerCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnerCore")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("live", &self.is_live())
            .finish()
    }
}

impl Drop for OwnerCore {
    fn drop(&mut self) {
        self.census.finalize(self.key);
        if let Some(f) = self.finalizer.get_mut().take() {
            // Inside a machine edit the topology is borrowed: queue the
            // callback so that it runs once the edit has let go and may call
            // back into the machine.
            let f = DEFERRED.with(|d| match d.borrow_mut().as_mut() {
                Some(queue) => {
                    queue.push(f);
                    None
                }
                None => Some(f),
            });
            if let Some(f) = f {
                f();
            }
        }
    }
}

thread_local! {
    /// Finalizers of owners dropped on this thread while a
    /// [`DeferFinalizers`] scope is open (`None`: none is open).
    static DEFERRED: std::cell::RefCell<Option<Vec<Finalizer>>> =
        const { std::cell::RefCell::new(None) };
}

/// While alive, owner finalizers dropped on this thread are queued instead
/// of run; the outermost scope runs them, in drop order, when it ends.
///
/// The machine opens one around every edit and commit, *outside* its lock,
/// so a finalizer never runs while the topology is borrowed and can use the
/// machine like any other code.
pub(crate) struct DeferFinalizers {
    outermost: bool,
}

impl DeferFinalizers {
    pub(crate) fn enter() -> DeferFinalizers {
        let outermost = DEFERRED.with(|d| {
            let mut d = d.borrow_mut();
            let outermost = d.is_none();
            if outermost {
                *d = Some(Vec::new());
            }
            outermost
        });
        DeferFinalizers { outermost }
    }
}

impl Drop for DeferFinalizers {
    fn drop(&mut self) {
        if !self.outermost {
            return;
        }
        let queue = DEFERRED.with(|d| d.borrow_mut().take()).unwrap_or_default();
        for f in queue {
            f();
        }
    }
}

/// How `info mtree -o` names an owner (QEMU's QOM identity, kept verbatim for
/// imported machines).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerLabel {
    /// `dev id=ID`
    DevId(String),
    /// `dev path=PATH`
    DevPath(String),
    /// `obj path=PATH`
    ObjPath(String),
    /// `obj type=TYPE`
    ObjType(String),
}

/// The control-plane half of an owner.
#[derive(Debug)]
pub(crate) struct OwnerNode {
    pub(crate) core: Arc<OwnerCore>,
    pub(crate) label: OwnerLabel,
    pub(crate) parent: Option<OwnerId>,
    pub(crate) children: Vec<OwnerId>,
    pub(crate) regions: Vec<RegionId>,
    pub(crate) spaces: Vec<SpaceId>,
}
