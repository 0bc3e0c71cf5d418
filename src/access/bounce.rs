//! Bounce-buffer accounting and map clients of one address space (what
//! `crate::dma::mapping` reserves and waits for; held by every
//! [`AddressSpace`](crate::AddressSpace)).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::lifecycle::census::Census;

/// QEMU's default per-address-space bounce-buffer limit.
pub const DEFAULT_MAX_BOUNCE: u64 = 4096;

/// Identity of a registered map client.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct MapClientId(pub(crate) u64);

pub(crate) type MapClient = Box<dyn FnOnce() + Send>;

// ---------------------------------------------------------------------------
// Bounce accounting and map clients (one per address space)
// ---------------------------------------------------------------------------

/// Bounce-buffer accounting and map clients of one address space.
pub(crate) struct BounceState {
    pub(crate) in_use: AtomicU64,
    pub(crate) limit: AtomicU64,
    pub(crate) clients: Mutex<Vec<(MapClientId, MapClient)>>,
    pub(crate) next_client: AtomicU64,
    /// Where a map client's panic caught while the thread was already
    /// unwinding is recorded (it cannot be re-raised).
    census: Option<Arc<Census>>,
}

impl fmt::Debug for BounceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BounceState")
            .field("in_use", &self.in_use())
            .field("limit", &self.limit.load(Ordering::Relaxed))
            .field("clients", &self.clients.lock().len())
            .finish()
    }
}

impl BounceState {
    pub(crate) fn new(limit: u64) -> BounceState {
        BounceState {
            in_use: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
            clients: Mutex::new(Vec::new()),
            next_client: AtomicU64::new(1),
            census: None,
        }
    }

    /// A bounce state whose clients' panics while unwinding are recorded in
    /// `census`.
    pub(crate) fn with_census(limit: u64, census: Arc<Census>) -> BounceState {
        BounceState {
            census: Some(census),
            ..BounceState::new(limit)
        }
    }

    /// Bytes currently reserved.
    pub(crate) fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Acquire)
    }

    /// Reserves up to `want` bytes; returns how many (0 = none free).
    pub(crate) fn reserve(&self, want: u64) -> u64 {
        let mut cur = self.in_use.load(Ordering::Acquire);
        loop {
            let limit = self.limit.load(Ordering::Acquire);
            let alloc = limit.saturating_sub(cur).min(want);
            if alloc == 0 {
                return 0;
            }
            match self.in_use.compare_exchange_weak(
                cur,
                cur + alloc,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return alloc,
                Err(now) => cur = now,
            }
        }
    }

    pub(crate) fn has_room(&self) -> bool {
        self.in_use() < self.limit.load(Ordering::Acquire)
    }

    /// Releases `n` bytes and tells every waiting client (also while the
    /// thread unwinds from a panic: a client waiting for space must not
    /// wait for an event that may never come).
    pub(crate) fn release(&self, n: u64) {
        self.in_use.fetch_sub(n, Ordering::AcqRel);
        self.notify();
    }

    /// Runs (and removes) every registered client, outside the lock; does
    /// nothing on a thread already running map clients (the clients stay
    /// registered for the next event: see "Map clients" in the module
    /// docs).
    pub(crate) fn notify(&self) {
        if RUNNING_MAP_CLIENTS.get() > 0 {
            return;
        }
        let fired = std::mem::take(&mut *self.clients.lock());
        if fired.is_empty() {
            return;
        }
        let mut run = ClientRun {
            state: self,
            pending: fired.into_iter(),
        };
        RUNNING_MAP_CLIENTS.set(RUNNING_MAP_CLIENTS.get() + 1);
        for (_, f) in run.pending.by_ref() {
            if std::thread::panicking() {
                // A second panic now would abort the process: catch it and
                // record it (the caller already gets the first one).
                if let Err(p) = crate::lifecycle::deferral::catch(f) {
                    if let Some(census) = &self.census {
                        census.record_panic(format!(
                            "a DMA map client panicked while the thread was unwinding: {}",
                            crate::lifecycle::deferral::panic_message(&p)
                        ));
                    }
                }
            } else {
                f();
            }
        }
    }
}

thread_local! {
    /// How many `notify` calls are running map clients on this thread (0 or
    /// 1: a nested `notify` returns at once).
    static RUNNING_MAP_CLIENTS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The clients one `notify` took and has not run yet. Dropped when the run
/// ends, normally or by a client's panic: clients left over go back to the
/// front of the list, in order, and the thread is no longer running clients.
struct ClientRun<'a> {
    pub(crate) state: &'a BounceState,
    pending: std::vec::IntoIter<(MapClientId, MapClient)>,
}

impl Drop for ClientRun<'_> {
    fn drop(&mut self) {
        RUNNING_MAP_CLIENTS.set(RUNNING_MAP_CLIENTS.get() - 1);
        if !self.pending.as_slice().is_empty() {
            let mut clients = self.state.clients.lock();
            let later = std::mem::take(&mut *clients);
            clients.extend(self.pending.by_ref());
            clients.extend(later);
        }
    }
}

/// Bounce space reserved by a mapping under construction: released on drop
/// unless [`kept`](Self::keep) (a prefill that panics releases it).
pub(crate) struct Reservation<'a> {
    pub(crate) state: &'a BounceState,
    pub(crate) len: u64,
}

impl Reservation<'_> {
    /// The mapping now owns the space.
    pub(crate) fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.state.release(self.len);
    }
}
