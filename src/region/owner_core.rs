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
//! * A finalizer runs exactly once, whatever another finalizer or a
//!   device's `Drop` does: inside a machine operation it is queued (with
//!   the drops the topology deferred) and run when the operation ends,
//!   outside the topology borrow, each under `catch_unwind`; a panic is
//!   recorded in the census and re-raised to the caller once every queued
//!   finalizer and drop has run. Outside a machine operation (the last DMA
//!   mapping of an unplugged device goes) it runs on the spot and a panic
//!   unwinds to whoever dropped that last reference, after being recorded.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::lifecycle::census::{Census, ObjectKey, ObjectKind};
use crate::lifecycle::deferral::run_or_defer_finalizer;
use crate::region::ids::OwnerId;

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

    /// Installs `f`, returning the finalizer it replaces (whose drop the
    /// caller defers: it may hold device state).
    pub(crate) fn set_finalizer(&self, f: Finalizer) -> Option<Finalizer> {
        self.finalizer.lock().replace(f)
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
            // Inside a machine operation the topology may be borrowed: queue
            // the callback so that it runs once the operation has let go and
            // may call back into the machine.
            run_or_defer_finalizer(self.census.clone(), self.name.clone(), f);
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
