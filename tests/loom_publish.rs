//! A loom model of the publish / read / reclaim protocol
//! ([`memtree::view::publish::ViewCell`], the algorithm arc-swap runs in
//! production: reader debts paid by the writer).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test --test loom_publish --release`
//!
//! Each view writes its payload (a loom `UnsafeCell`) when it is built and
//! poisons it when it is dropped; readers read the payload through their
//! guard. loom explores every interleaving (within its bounds) and reports a
//! data race if a reader could read a payload that is not fully built (no
//! happens-before from the build) or that is being dropped under it. The
//! drop counters check that every view is dropped exactly once (no double
//! free) and, at the end, that none leaked.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use memtree::view::publish::ViewCell;

const VIEWS: usize = 3;
const POISON: usize = 0xdead;

struct Tracker {
    payload: [UnsafeCell<usize>; VIEWS],
    drops: [AtomicUsize; VIEWS],
}

impl Tracker {
    fn new() -> Arc<Tracker> {
        Arc::new(Tracker {
            payload: std::array::from_fn(|_| UnsafeCell::new(0)),
            drops: std::array::from_fn(|_| AtomicUsize::new(0)),
        })
    }

    /// What a reader sees of view `id` while it holds it.
    fn read(&self, id: usize) -> usize {
        // SAFETY: a plain read; loom checks it against the build and the drop.
        self.payload[id].with(|p| unsafe { *p })
    }

    fn assert_all_dropped_once(&self, published: usize) {
        for (id, d) in self.drops.iter().enumerate().take(published) {
            assert_eq!(d.load(Ordering::SeqCst), 1, "view {id} dropped once");
        }
    }
}

struct View {
    id: usize,
    tracker: Arc<Tracker>,
}

impl View {
    fn new(id: usize, tracker: &Arc<Tracker>) -> View {
        // SAFETY: the view is being built; nobody else can see it yet.
        tracker.payload[id].with_mut(|p| unsafe { *p = 100 + id });
        View {
            id,
            tracker: tracker.clone(),
        }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        let prev = self.tracker.drops[self.id].fetch_add(1, Ordering::AcqRel);
        assert_eq!(prev, 0, "view {} freed twice", self.id);
        // SAFETY: a write; loom reports it if any reader could still read.
        self.tracker.payload[self.id].with_mut(|p| unsafe { *p = POISON });
    }
}

fn reader(cell: &ViewCell<View>, tracker: &Tracker, min: usize) -> usize {
    let g = cell.load();
    let id = g.id;
    assert!(id >= min, "a reader never goes back to an older view");
    assert_eq!(tracker.read(id), 100 + id, "a fully built, live view");
    thread::yield_now();
    assert_eq!(tracker.read(id), 100 + id, "still live while held");
    id
}

/// loom with a preemption bound of 3 (enough for every scenario here to
/// interleave each step of one thread between two steps of another) unless
/// `LOOM_MAX_PREEMPTIONS` says otherwise.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

/// Two readers, one writer publishing one new view.
#[test]
fn loom_two_readers_one_publish() {
    model(|| {
        let tracker = Tracker::new();
        let cell = Arc::new(ViewCell::new(View::new(0, &tracker), 2));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (cell, tracker) = (cell.clone(), tracker.clone());
                thread::spawn(move || reader(&cell, &tracker, 0))
            })
            .collect();
        cell.store(View::new(1, &tracker));
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(
            tracker.drops[0].load(Ordering::SeqCst),
            1,
            "old view reclaimed"
        );
        drop(cell);
        tracker.assert_all_dropped_once(2);
    });
}

/// One reader loading twice while the writer publishes twice: views only
/// move forward, each is freed once, after its reader.
#[test]
fn loom_one_reader_two_publishes() {
    model(|| {
        let tracker = Tracker::new();
        let cell = Arc::new(ViewCell::new(View::new(0, &tracker), 1));
        let r = {
            let (cell, tracker) = (cell.clone(), tracker.clone());
            thread::spawn(move || {
                let first = reader(&cell, &tracker, 0);
                reader(&cell, &tracker, first)
            })
        };
        cell.store(View::new(1, &tracker));
        cell.store(View::new(2, &tracker));
        r.join().unwrap();
        drop(cell);
        tracker.assert_all_dropped_once(3);
    });
}

/// Two guards held by the same reader thread at once (nested accesses, as in
/// a device callback that reads memory) across a publish.
#[test]
fn loom_nested_guards_across_a_publish() {
    model(|| {
        let tracker = Tracker::new();
        let cell = Arc::new(ViewCell::new(View::new(0, &tracker), 2));
        let r = {
            let (cell, tracker) = (cell.clone(), tracker.clone());
            thread::spawn(move || {
                let outer = cell.load();
                let inner = cell.load();
                assert!(inner.id >= outer.id);
                assert_eq!(tracker.read(outer.id), 100 + outer.id);
                drop(outer);
                assert_eq!(tracker.read(inner.id), 100 + inner.id);
            })
        };
        cell.store(View::new(1, &tracker));
        r.join().unwrap();
        drop(cell);
        tracker.assert_all_dropped_once(2);
    });
}

/// A cell with one debt slot, and one reader thread holding two guards at
/// once across a publish: the second load finds the only slot taken by the
/// first and must not wait for it (its own thread holds it).
#[test]
fn loom_two_guards_on_one_thread_from_a_cell_of_one_slot() {
    model(|| {
        let tracker = Tracker::new();
        let cell = Arc::new(ViewCell::new(View::new(0, &tracker), 1));
        let r = {
            let (cell, tracker) = (cell.clone(), tracker.clone());
            thread::spawn(move || {
                let outer = cell.load();
                let inner = cell.load();
                assert!(inner.id >= outer.id);
                assert_eq!(tracker.read(outer.id), 100 + outer.id);
                drop(outer);
                assert_eq!(tracker.read(inner.id), 100 + inner.id);
                drop(inner);
                reader(&cell, &tracker, 0)
            })
        };
        cell.store(View::new(1, &tracker));
        r.join().unwrap();
        drop(cell);
        tracker.assert_all_dropped_once(2);
    });
}
