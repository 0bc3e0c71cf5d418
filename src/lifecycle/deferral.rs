//! Foreign panics and deferred drops: `catch` and `raise` around code memtree
//! does not own, and the queue of drops and finalizers a machine operation
//! runs when it ends (see `crate::region::owner_core` for the invariants).

use std::any::Any;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use crate::lifecycle::census::Census;

/// An owner's finalizer (`crate::region::owner_core::Finalizer`).
type Finalizer = Box<dyn FnOnce() + Send>;

/// Runs an owner's finalizer: queued when a machine operation is running
/// on this thread (it runs when the operation ends), at once otherwise.
pub(crate) fn run_or_defer_finalizer(census: Arc<Census>, owner: Box<str>, f: Finalizer) {
    let pending = PendingFinalizer { census, owner, f };
    if let Some(Deferred::Finalizer(p)) = defer(Deferred::Finalizer(pending)) {
        p.run();
    }
}

/// A panic payload, as `catch_unwind` returns it.
pub(crate) type Payload = Box<dyn Any + Send + 'static>;

/// Runs `f`, catching a panic. memtree calls other people's code (listeners,
/// finalizers, the `Drop` of device state) only through this (or inside a
/// `Drop` that does), at points where memtree's own state is consistent:
/// what the callee may observe half-done is its own state, never memtree's,
/// which is why asserting unwind safety is sound.
pub(crate) fn catch<R>(f: impl FnOnce() -> R) -> Result<R, Payload> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
}

/// The message of a panic payload (`&str` or `String`), or a placeholder.
pub(crate) fn panic_message(p: &Payload) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic payload that is not a string)".to_owned()
    }
}

/// Reports a caught panic to the caller of the machine operation under way:
/// inside a [`Deferral`] scope it is kept (the first one wins) and re-raised
/// when the outermost scope ends, after memtree is consistent again;
/// outside any scope it is re-raised at once, unless the thread is already
/// unwinding (then it is dropped: the caller already gets a panic, and the
/// census recorded this one).
pub(crate) fn raise(p: Payload) {
    // During thread-local destruction no scope can be open.
    let mut p = Some(p);
    let _ = DEFERRED.try_with(|d| {
        if let Some(pending) = d.borrow_mut().as_mut() {
            if let Some(p) = p.take() {
                pending.panic.get_or_insert(p);
            }
        }
    });
    if let Some(p) = p {
        if !std::thread::panicking() {
            std::panic::resume_unwind(p);
        }
    }
}

/// Drops `value` where the machine is usable: inside a [`Deferral`] scope
/// the drop is queued and runs when the outermost scope ends (outside the
/// topology borrow and the writer lock); outside one it runs at once. For
/// anything that may hold device state (region cores, finalizers,
/// listeners, flat views) and would otherwise drop inside a topology edit.
pub(crate) fn defer_drop<T: 'static>(value: T) {
    if let Some(Deferred::Drop(_, v)) = defer(Deferred::Drop(None, Box::new(value))) {
        drop(v);
    }
}

/// Like [`defer_drop`], for values whose `Drop` is other people's code that
/// memtree does not guard itself (listeners, finalizers never run): a panic
/// is recorded in `census` as a panic of `what` and raised.
pub(crate) fn defer_drop_recorded<T: 'static>(census: &Arc<Census>, what: &str, value: T) {
    let item = Deferred::Drop(Some((census.clone(), what.to_owned())), Box::new(value));
    if let Some(Deferred::Drop(_, v)) = defer(item) {
        if let Err(p) = catch(move || drop(v)) {
            census.record_panic(format!("drop of {what} panicked: {}", panic_message(&p)));
            raise(p);
        }
    }
}

/// Queues `item` in the open scope, or hands it back when none is open.
fn defer(item: Deferred) -> Option<Deferred> {
    // During thread-local destruction no scope can be open.
    let mut item = Some(item);
    let _ = DEFERRED.try_with(|d| {
        if let Some(pending) = d.borrow_mut().as_mut() {
            match item.take() {
                Some(Deferred::Drop(c, v)) => pending.drops.push_back((c, v)),
                Some(Deferred::Finalizer(f)) => pending.finalizers.push_back(f),
                None => {}
            }
        }
    });
    item
}

/// A finalizer due to run, with what its panic report needs.
struct PendingFinalizer {
    census: Arc<Census>,
    owner: Box<str>,
    f: Finalizer,
}

impl PendingFinalizer {
    /// Runs the finalizer; a panic is recorded in the census and raised.
    fn run(self) {
        let PendingFinalizer { census, owner, f } = self;
        if let Err(p) = catch(f) {
            census.record_panic(format!(
                "finalizer of owner \"{owner}\" panicked: {}",
                panic_message(&p)
            ));
            raise(p);
        }
    }
}

/// Where a panic of a deferred drop is recorded: the census, and what the
/// value is.
type Recorder = (Arc<Census>, String);

enum Deferred {
    Drop(Option<Recorder>, Box<dyn Any>),
    Finalizer(PendingFinalizer),
}

#[derive(Default)]
struct Pending {
    /// Values to drop, each with where to record a panic of its drop.
    drops: VecDeque<(Option<Recorder>, Box<dyn Any>)>,
    finalizers: VecDeque<PendingFinalizer>,
    panic: Option<Payload>,
}

thread_local! {
    /// What this thread's open [`Deferral`] scope has queued (`None`: no
    /// scope is open).
    static DEFERRED: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

/// While alive, owner finalizers and [`defer_drop`]ped values on this
/// thread are queued instead of run, and panics caught from other people's
/// code are kept instead of raised. The outermost scope, when it ends, drops
/// the queued values and runs the finalizers (in queue order, drops first,
/// until both queues are empty: a drop may finalize an owner), each exactly
/// once whatever another one does; then it re-raises the first panic (unless
/// the thread is already unwinding).
///
/// The machine opens one around every operation that can run other
/// people's code, *outside* its lock, so a finalizer or a device's `Drop`
/// never runs while the topology is borrowed and can use the machine like
/// any other code.
pub(crate) struct Deferral {
    outermost: bool,
    finished: bool,
}

impl Deferral {
    pub(crate) fn enter() -> Deferral {
        let outermost = DEFERRED.with(|d| {
            let mut d = d.borrow_mut();
            let outermost = d.is_none();
            if outermost {
                *d = Some(Pending::default());
            }
            outermost
        });
        Deferral {
            outermost,
            finished: false,
        }
    }

    /// Ends the scope like its drop, but returns the first panic instead of
    /// re-raising it (`None` from an inner scope: the outermost one owns
    /// the panics).
    pub(crate) fn finish(mut self) -> Option<Payload> {
        self.finished = true;
        self.drain()
    }

    fn drain(&mut self) -> Option<Payload> {
        if !self.outermost {
            return None;
        }
        loop {
            let next = DEFERRED.with(|d| {
                let mut d = d.borrow_mut();
                let pending = d.as_mut()?;
                match pending.drops.pop_front() {
                    Some((c, v)) => Some(Deferred::Drop(c, v)),
                    None => pending.finalizers.pop_front().map(Deferred::Finalizer),
                }
            });
            match next {
                None => break,
                // A region core's drop records and raises (keeps) its own
                // panic; one that escapes a drop is recorded here if the
                // value came with a census, and kept.
                Some(Deferred::Drop(recorder, v)) => {
                    if let Err(p) = catch(move || drop(v)) {
                        if let Some((census, what)) = recorder {
                            census.record_panic(format!(
                                "drop of {what} panicked: {}",
                                panic_message(&p)
                            ));
                        }
                        raise(p);
                    }
                }
                Some(Deferred::Finalizer(f)) => f.run(),
            }
        }
        DEFERRED
            .with(|d| d.borrow_mut().take())
            .and_then(|p| p.panic)
    }
}

impl Drop for Deferral {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(p) = self.drain() {
            if !std::thread::panicking() {
                std::panic::resume_unwind(p);
            }
        }
    }
}
