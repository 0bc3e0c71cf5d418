//! The publish / read / reclaim protocol of the data plane, as a small,
//! self-contained cell that can be model-checked with loom.
//!
//! Production address spaces publish their flat views through
//! [`arc_swap::ArcSwap`] (see [`crate::access::space`]). arc-swap cannot run under
//! loom, so this module implements the *same algorithm* — readers publish a
//! "debt" in a slot instead of touching the reference count, the writer pays
//! the debts it finds on the value it retires — in [`ViewCell`], written
//! against `loom` atomics when built with `--cfg loom` and `std` atomics
//! otherwise. `tests/loom_publish.rs` checks it exhaustively (for small
//! thread counts): a reader always gets a fully built value, a value is
//! freed only after its last reader let go, and exactly once.
//!
//! What is modelled vs what runs: `ViewCell` is a faithful but simplified
//! model of arc-swap's fast path (fixed debt slots shared by all threads
//! instead of per-thread nodes) with a simpler fallback than arc-swap's
//! lock-free "helping": a reader that finds every slot busy takes a counted
//! reference under a small lock that the writer also takes around its swap
//! of `current` (see "Fallback" below). A reader never waits for another
//! reader to let go of a slot: a thread that holds every slot (nested
//! guards) and loads again still gets a value. Production dispatch runs
//! arc-swap itself, whose own test suite covers its implementation.
//!
//! # Protocol
//!
//! * A node holds the value and a reference count; the cell holds one
//!   reference to its current node.
//! * **Read**: claim a slot; load `current`; store the pointer into the slot
//!   (the debt); confirm with a read-modify-write of `current` that it is
//!   still the same. If so, the debt protects the node for the guard's life
//!   without touching the count. If not, retract the debt (CAS slot → null)
//!   and retry; if the retraction fails, the writer already paid the debt,
//!   so the reader owns a reference and uses that node.
//! * **Guard drop**: CAS the slot from the node back to null; if that fails
//!   the writer paid the debt, so drop the reference that was paid.
//! * **Fallback read** (every slot claimed): lock `fallback`, load
//!   `current`, increment its count, unlock; the guard owns that reference.
//!   Sound because the writer swaps `current` only under the same lock and
//!   drops the cell's reference to the old node only after the swap: while
//!   the lock is held, the node `current` names is kept alive by the cell's
//!   own reference. The lock is held for a load and an increment, never
//!   across user code, so neither side can wait long.
//! * **Publish**: swap `current` (under `fallback`); for every slot holding the old node,
//!   increment its count and CAS the slot to null (paying the debt; undo the
//!   increment if the reader had already left); then drop the cell's
//!   reference. The node is freed by whoever drops the last reference.
//!
//! Pointer provenance: a reader's first load of `current` may be stale, its
//! node freed and the address reused by a newer node (ABA). The protocol is
//! indifferent to that (a debt names an address, and the confirming CAS
//! proves the address is current), but the confirming CAS writes the
//! reader's pointer back into `current`, so the pointers stored in the cell
//! may carry the provenance of a freed allocation. Every node's provenance is
//! therefore exposed when it is created, and every dereference goes through
//! `live`, which takes the provenance of the node living at that address.
//!
//! Only read-modify-write operations are used where the protocol relies on
//! "the latest value" (debt publication, confirmation, publication), so
//! acquire/release orderings suffice: each RMW reads the latest value in the
//! location's modification order, and loom models exactly that.

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
#[cfg(loom)]
use loom::sync::Mutex;
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
#[cfg(not(loom))]
use std::sync::Mutex;

use std::fmt;
use std::ops::Deref;
use std::ptr;

struct Node<T> {
    refs: AtomicUsize,
    value: T,
}

/// A published value that readers load without locks and writers replace.
pub struct ViewCell<T> {
    current: AtomicPtr<Node<T>>,
    slots: Box<[AtomicPtr<Node<T>>]>,
    claimed: Box<[AtomicBool]>,
    /// Serialises fallback readers (every slot claimed) with the writer's
    /// swap of `current`.
    fallback: Mutex<()>,
}

// SAFETY: the cell hands out `&T` to several threads (needs `T: Sync`) and
// drops `T` on whichever thread releases the last reference (needs `T: Send`).
unsafe impl<T: Send + Sync> Send for ViewCell<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Sync for ViewCell<T> {}

impl<T> fmt::Debug for ViewCell<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ViewCell")
            .field("slots", &self.slots.len())
            .finish()
    }
}

fn new_node<T>(value: T) -> *mut Node<T> {
    let node = Box::into_raw(Box::new(Node {
        refs: AtomicUsize::new(1),
        value,
    }));
    let _ = node.expose_provenance();
    node
}

/// The node allocated at `node`'s address, with that allocation's (exposed)
/// provenance, whatever provenance `node` itself carries (see "Pointer
/// provenance" above).
#[inline]
fn live<T>(node: *mut Node<T>) -> *mut Node<T> {
    ptr::with_exposed_provenance_mut(node.addr())
}

/// Drops one reference to `node`, freeing it if it was the last.
///
/// # Safety
/// The caller owns one reference to `node`, a node made by `new_node`.
unsafe fn release<T>(node: *mut Node<T>) {
    // SAFETY: the caller's reference keeps the node alive until here.
    let prev = unsafe { (*live(node)).refs.fetch_sub(1, Ordering::AcqRel) };
    if prev == 1 {
        // SAFETY: that was the last reference: nobody else can reach the node
        // (it is no longer current, and no slot holds an unpaid debt on it).
        unsafe { free(node) };
    }
}

/// # Safety
/// `node` came from `new_node` and has no references left.
#[cfg(not(loom))]
unsafe fn free<T>(node: *mut Node<T>) {
    // SAFETY: per the contract, this is the only access left.
    drop(unsafe { Box::from_raw(live(node)) });
}

/// Under loom the value is dropped but the allocation is leaked, so that a
/// protocol bug is reported by loom (through the value's own checks) instead
/// of being undefined behaviour in the model checker.
///
/// # Safety
/// `node` came from `new_node` and has no references left.
#[cfg(loom)]
unsafe fn free<T>(node: *mut Node<T>) {
    // SAFETY: per the contract, this is the only access left; the value is
    // dropped exactly once and the memory is never freed.
    unsafe { ptr::drop_in_place(ptr::addr_of_mut!((*live(node)).value)) };
}

impl<T> ViewCell<T> {
    /// A cell publishing `value`, with `slots` debt slots (at least 1): up to
    /// that many guards can be held at once without touching reference
    /// counts; further readers take a counted reference under a short lock
    /// (never waiting for a slot to free).
    pub fn new(value: T, slots: usize) -> ViewCell<T> {
        let slots = slots.max(1);
        ViewCell {
            current: AtomicPtr::new(new_node(value)),
            slots: (0..slots)
                .map(|_| AtomicPtr::new(ptr::null_mut()))
                .collect(),
            claimed: (0..slots).map(|_| AtomicBool::new(false)).collect(),
            fallback: Mutex::new(()),
        }
    }

    /// Claims a free debt slot, if there is one.
    fn claim(&self) -> Option<usize> {
        self.claimed.iter().position(|c| {
            c.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        })
    }

    fn lock_fallback(&self) -> impl Drop + '_ {
        // Nothing panics while the lock is held, so it cannot be poisoned;
        // be total anyway.
        self.fallback
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Loads the current value for the guard's lifetime.
    pub fn load(&self) -> ViewGuard<'_, T> {
        let Some(slot) = self.claim() else {
            return self.load_counted();
        };
        let debt = &self.slots[slot];
        loop {
            let p = self.current.load(Ordering::Acquire);
            debt.swap(p, Ordering::AcqRel);
            // Confirm with an RMW: it reads the latest `current`.
            if self
                .current
                .compare_exchange(p, p, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return ViewGuard {
                    cell: self,
                    slot: Some(slot),
                    node: p,
                    owned: false,
                };
            }
            if debt
                .compare_exchange(p, ptr::null_mut(), Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                // The writer paid our debt: we own a reference to `p`.
                return ViewGuard {
                    cell: self,
                    slot: Some(slot),
                    node: p,
                    owned: true,
                };
            }
        }
    }

    /// The fallback read: a counted reference taken under `fallback`.
    #[cold]
    fn load_counted(&self) -> ViewGuard<'_, T> {
        let lock = self.lock_fallback();
        let p = self.current.load(Ordering::Acquire);
        // SAFETY: `current` changes only under `fallback`, which we hold, and
        // the writer drops the cell's reference to a node only after
        // swapping it out of `current`; so the cell's reference keeps `p`
        // alive until the lock is released, after our increment.
        unsafe { (*live(p)).refs.fetch_add(1, Ordering::AcqRel) };
        drop(lock);
        ViewGuard {
            cell: self,
            slot: None,
            node: p,
            owned: true,
        }
    }

    /// Publishes `value`; the previous value is freed once its last reader
    /// lets go (possibly now).
    pub fn store(&self, value: T) {
        let new = new_node(value);
        let lock = self.lock_fallback();
        let old = self.current.swap(new, Ordering::AcqRel);
        drop(lock);
        for debt in self.slots.iter() {
            if debt.load(Ordering::Acquire) == old {
                // SAFETY: the cell's reference to `old` is still held.
                unsafe { (*live(old)).refs.fetch_add(1, Ordering::AcqRel) };
                if debt
                    .compare_exchange(old, ptr::null_mut(), Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    // The reader left first; take the payment back. The
                    // cell's reference keeps the count above zero.
                    // SAFETY: as above.
                    unsafe { (*live(old)).refs.fetch_sub(1, Ordering::AcqRel) };
                }
            }
        }
        // SAFETY: the cell owned one reference to its previous node.
        unsafe { release(old) };
    }
}

impl<T> Drop for ViewCell<T> {
    fn drop(&mut self) {
        // No guard can exist (they borrow the cell).
        let cur = self.current.load(Ordering::Acquire);
        // SAFETY: the cell owns one reference to its current node.
        unsafe { release(cur) };
    }
}

/// A loaded value; derefs to `T`.
pub struct ViewGuard<'a, T> {
    cell: &'a ViewCell<T>,
    /// The debt slot this guard claimed (`None`: a fallback guard, which
    /// owns a counted reference).
    slot: Option<usize>,
    node: *mut Node<T>,
    /// Whether this guard owns a reference (the writer paid its debt).
    owned: bool,
}

impl<T> Deref for ViewGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the node is kept alive by this guard's debt (which a writer
        // converts into a reference before it could drop the node) or by the
        // reference this guard owns.
        unsafe { &(*live(self.node)).value }
    }
}

impl<T: fmt::Debug> fmt::Debug for ViewGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

impl<T> Drop for ViewGuard<'_, T> {
    fn drop(&mut self) {
        let paid = self.owned
            || self.slot.is_some_and(|slot| {
                self.cell.slots[slot]
                    .compare_exchange(
                        self.node,
                        ptr::null_mut(),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_err()
            });
        if paid {
            // SAFETY: this guard owns a reference: the one the writer paid,
            // or the fallback's own.
            unsafe { release(self.node) };
        }
        if let Some(slot) = self.slot {
            self.cell.claimed[slot].store(false, Ordering::Release);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize as StdUsize;
    use std::sync::Arc;

    struct Counted(u64, Arc<StdUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn publish_cell_frees_every_value_once_under_concurrent_readers() {
        let drops = Arc::new(StdUsize::new(0));
        let cell = ViewCell::new(Counted(0, drops.clone()), 4);
        const N: u64 = if cfg!(miri) { 200 } else { 20_000 };
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    let mut last = 0;
                    loop {
                        let g = cell.load();
                        assert!(g.0 >= last, "values only move forward");
                        last = g.0;
                        if last == N {
                            break;
                        }
                    }
                });
            }
            for i in 1..=N {
                cell.store(Counted(i, drops.clone()));
            }
        });
        assert_eq!(drops.load(Ordering::SeqCst), N as usize);
        drop(cell);
        assert_eq!(drops.load(Ordering::SeqCst), N as usize + 1);
    }

    #[test]
    fn view_cell_of_one_slot_serves_two_loads_on_one_thread() {
        let (tx, rx) = std::sync::mpsc::channel();
        // On a thread, so that a hang fails the test instead of blocking it.
        std::thread::spawn(move || {
            let drops = Arc::new(StdUsize::new(0));
            let cell = ViewCell::new(Counted(1, drops.clone()), 1);
            let outer = cell.load();
            let inner = cell.load();
            let nested = cell.load();
            assert_eq!((outer.0, inner.0, nested.0), (1, 1, 1));
            cell.store(Counted(2, drops.clone()));
            assert_eq!(drops.load(Ordering::SeqCst), 0, "held by the guards");
            drop((outer, nested));
            assert_eq!(drops.load(Ordering::SeqCst), 0, "held by one guard");
            assert_eq!(cell.load().0, 2);
            drop(inner);
            assert_eq!(drops.load(Ordering::SeqCst), 1, "freed by its last guard");
            drop(cell);
            tx.send(drops.load(Ordering::SeqCst)).unwrap();
        });
        let dropped = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a second load on the thread holding the only slot returns");
        assert_eq!(dropped, 2);
    }
}
