//! IOMMU notifiers and replay: cropping, bad input, registration order and
//! unregistration (issue 10, review 5).

#[path = "../examples/iommu_pagetable.rs"]
mod pagetable;
#[path = "support/table_iommu.rs"]
mod table_iommu;

use std::sync::Arc;

use memtree::access::iommu::{
    Iommu, IommuError, IommuHub, IommuNotifier, IommuPerm, IotlbEntry, IotlbEvent, IotlbEventKind,
    NotifierFlags,
};
use memtree::Memory;
use pagetable::setup;
use parking_lot::Mutex;
use table_iommu::{recorder, table_setup, uncovered};

/// Rule (notifier cropping): an UNMAP of a 2 MiB page that overlaps a
/// notifier's range only in part must still tell the notifier about every
/// byte of the overlap (QEMU: the overlap, `iova = max(iova, start)`,
/// `addr_mask = min(end, last) - iova`), or the consumer's shadow mapping of
/// the rest of the overlap is never withdrawn.
#[test]
fn partial_overlap_unmap_reaches_the_whole_overlap() {
    let s = setup(21, 8); // 2 MiB pages
    let hub = s.device.hub().clone();
    let (log, f) = recorder();
    // A consumer interested in [4 KiB, 64 KiB): e.g. a VFIO section.
    hub.register_notifier(IommuNotifier {
        flags: NotifierFlags::UNMAP.union(NotifierFlags::DEVIOTLB_UNMAP),
        start: 0x1000,
        last: 0xffff,
        iommu_idx: 0,
        notify: f,
    })
    .unwrap();
    // The 2 MiB page 0 is unmapped.
    let ev = IotlbEvent {
        kind: IotlbEventKind::Unmap,
        entry: IotlbEntry::denied(0, 0x1f_ffff),
    };
    hub.notify(0, &ev).unwrap();
    let events = log.lock().clone();
    let holes = uncovered(&events, 0x1000, 0xffff);
    for e in &events {
        let (iova, mask) = (e.entry.iova, e.entry.addr_mask);
        assert!(
            e.entry.is_well_formed() && iova & mask == 0 && iova >= 0x1000 && iova | mask <= 0xffff,
            "a reported block is malformed or leaves the range: {events:?}"
        );
    }
    assert!(
        holes.is_empty(),
        "the notifier was told about {events:?}; never about {holes:x?} of its range"
    );
}

/// Rule (replay cropping): replay of a 2 MiB mapping that covers a
/// notifier's range in part must report the whole overlap.
#[test]
fn replay_of_a_large_page_covers_the_whole_overlap() {
    let s = setup(21, 8);
    s.map(0, 0x40_0000, IommuPerm::Read);
    let hub = s.device.hub().clone();
    let (log, f) = recorder();
    let n = IommuNotifier {
        flags: NotifierFlags::MAP,
        start: 0x1000,
        last: 0xffff,
        iommu_idx: 0,
        notify: f,
    };
    hub.replay(&n).unwrap();
    let events = log.lock().clone();
    let holes = uncovered(&events, 0x1000, 0xffff);
    for e in &events {
        let (iova, mask) = (e.entry.iova, e.entry.addr_mask);
        assert!(
            e.entry.is_well_formed() && iova & mask == 0 && iova >= 0x1000 && iova | mask <= 0xffff,
            "a reported block is malformed or leaves the range: {events:?}"
        );
    }
    assert!(
        holes.is_empty(),
        "replay reported {events:?}; never {holes:x?} though it is mapped"
    );
}

/// Rule (bad input is an error, never a panic): `IommuHub::replay` takes
/// any `IommuNotifier`; an inverted range must be refused with an error.
#[test]
fn replay_with_an_inverted_range_is_an_error_not_a_panic() {
    let s = setup(12, 8);
    let hub = s.device.hub().clone();
    let (_log, f) = recorder();
    let n = IommuNotifier {
        flags: NotifierFlags::MAP,
        start: 0x2000,
        last: 0x1000,
        iommu_idx: 0,
        notify: f,
    };
    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hub.replay(&n)));
    match got {
        Ok(r) => assert!(
            matches!(r, Err(IommuError::BadNotifier(_)) | Ok(0)),
            "{r:?}"
        ),
        Err(p) => panic!(
            "IommuHub::replay panicked on an inverted range: {:?}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or(p.downcast_ref::<&str>().copied())
        ),
    }
}

/// Rule (QEMU `memory_region_iommu_replay`): without a device walker, the
/// replay walks the IOMMU region (0 to its size) at the minimum page size.
/// A notifier over the whole address range of a 1 GiB IOMMU region (2^18
/// steps of 4 KiB) must be replayed, not refused as "too long".
#[test]
fn default_replay_is_bounded_by_the_region_size() {
    let (_memory, _sys, _dma, dev, hub) = table_setup(1 << 30);
    dev.map
        .lock()
        .insert(0x5000, (0xfff, 0x30_0000, IommuPerm::ReadWrite));
    let (log, f) = recorder();
    let n = IommuNotifier {
        flags: NotifierFlags::MAP,
        start: 0,
        last: u64::MAX,
        iommu_idx: 0,
        notify: f,
    };
    let r = hub.replay(&n);
    assert_eq!(r, Ok(1), "{r:?}");
    assert_eq!(log.lock().len(), 1);
}

/// Rule (QEMU `notify_flag_changed`): the device is told every change of
/// the flag union of a context, in order: each call's `old` is the
/// previous call's `new`, and the last `new` is the union of the
/// registered notifiers. Two registrations on two threads race here.
#[test]
fn concurrent_registrations_tell_the_device_a_consistent_union() {
    use std::sync::mpsc;
    struct Gate {
        log: Mutex<Vec<(NotifierFlags, NotifierFlags)>>,
        first: Mutex<Option<mpsc::Receiver<()>>>,
        entered: Mutex<Option<mpsc::Sender<()>>>,
    }
    impl Iommu for Gate {
        fn translate(&self, addr: u64, _a: IommuPerm, _i: u32) -> IotlbEntry {
            IotlbEntry::denied(addr, 0xfff)
        }
        fn notify_flag_changed(
            &self,
            old: NotifierFlags,
            new: NotifierFlags,
            _idx: u32,
        ) -> Result<(), String> {
            // The first call waits (as a slow device would) until the
            // other thread has registered.
            let wait = self.first.lock().take();
            if let Some(rx) = wait {
                if let Some(tx) = self.entered.lock().take() {
                    tx.send(()).unwrap();
                }
                let _ = rx.recv_timeout(std::time::Duration::from_secs(5));
            }
            self.log.lock().push((old, new));
            Ok(())
        }
    }
    let memory = Memory::new();
    let (go_tx, go_rx) = mpsc::channel();
    let (entered_tx, entered_rx) = mpsc::channel();
    let dev = Arc::new(Gate {
        log: Mutex::new(Vec::new()),
        first: Mutex::new(Some(go_rx)),
        entered: Mutex::new(Some(entered_tx)),
    });
    let hub = IommuHub::new();
    let _r = memory
        .new_iommu("gate", 1 << 32, dev.clone(), hub.clone(), None)
        .unwrap();
    let n = |flags| IommuNotifier {
        flags,
        start: 0,
        last: u64::MAX,
        iommu_idx: 0,
        notify: Arc::new(|_: &IotlbEvent| {}),
    };
    let h1 = hub.clone();
    let n1 = n(NotifierFlags::MAP);
    let t1 = std::thread::spawn(move || h1.register_notifier(n1).unwrap());
    entered_rx.recv().unwrap();
    // The second registration, while the device is still being told about
    // the first: it must wait for the first (serialised registrations). It
    // is given a moment to finish on its own (which it does when
    // registrations are not serialised), then the first one goes on.
    let (done_tx, done_rx) = mpsc::channel();
    let h2 = hub.clone();
    let n2 = n(NotifierFlags::UNMAP);
    let t2 = std::thread::spawn(move || {
        h2.register_notifier(n2).unwrap();
        let _ = done_tx.send(());
    });
    let _ = done_rx.recv_timeout(std::time::Duration::from_millis(200));
    go_tx.send(()).unwrap();
    t1.join().unwrap();
    t2.join().unwrap();
    let log = dev.log.lock().clone();
    let union = hub
        .notifiers()
        .iter()
        .fold(NotifierFlags::NONE, |a, (_, n)| a.union(n.flags));
    let mut prev = NotifierFlags::NONE;
    for &(old, new) in &log {
        assert_eq!(old, prev, "device told {log:?}");
        prev = new;
    }
    assert_eq!(
        prev, union,
        "device told {log:?}; registered union {union:?}"
    );
}

/// Rule (QEMU `memory_region_unregister_iommu_notifier`: once it returns,
/// the notifier is never called again): a notifier unregistered while an
/// event is being delivered to another notifier must not be called with
/// that event after `unregister_notifier` returned.
#[test]
fn unregistered_notifier_is_not_called_afterwards() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::mpsc;
    let s = setup(12, 8);
    let hub = s.device.hub().clone();
    let (in_first_tx, in_first_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(Some(release_rx));
    let in_first_tx = Mutex::new(Some(in_first_tx));
    hub.register_notifier(IommuNotifier {
        flags: NotifierFlags::UNMAP,
        start: 0,
        last: u64::MAX,
        iommu_idx: 0,
        notify: Arc::new(move |_: &IotlbEvent| {
            // A slow consumer (e.g. a VFIO unmap ioctl).
            if let Some(tx) = in_first_tx.lock().take() {
                tx.send(()).unwrap();
            }
            if let Some(rx) = release_rx.lock().take() {
                let _ = rx.recv_timeout(std::time::Duration::from_secs(5));
            }
        }),
    })
    .unwrap();
    let unregistered = Arc::new(AtomicBool::new(false));
    let late_calls = Arc::new(AtomicUsize::new(0));
    let (u, l) = (unregistered.clone(), late_calls.clone());
    let second = hub
        .register_notifier(IommuNotifier {
            flags: NotifierFlags::UNMAP,
            start: 0,
            last: u64::MAX,
            iommu_idx: 0,
            notify: Arc::new(move |_: &IotlbEvent| {
                if u.load(Ordering::SeqCst) {
                    l.fetch_add(1, Ordering::SeqCst);
                }
            }),
        })
        .unwrap();
    let h = hub.clone();
    let sender = std::thread::spawn(move || {
        h.notify(
            0,
            &IotlbEvent {
                kind: IotlbEventKind::Unmap,
                entry: IotlbEntry::denied(0x1000, 0xfff),
            },
        )
    });
    in_first_rx.recv().unwrap();
    assert!(hub.unregister_notifier(second));
    unregistered.store(true, Ordering::SeqCst);
    release_tx.send(()).unwrap();
    sender.join().unwrap().unwrap();
    assert_eq!(
        late_calls.load(Ordering::SeqCst),
        0,
        "a notifier was called after unregister_notifier returned"
    );
}

/// Rule (re-entrancy: "a notifier may register or unregister notifiers"):
/// a notifier that unregisters itself and registers another from inside
/// its callback neither deadlocks nor is called again afterwards.
#[test]
fn notifier_unregistering_itself_from_its_callback_does_not_deadlock() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let s = setup(12, 8);
        let hub = s.device.hub().clone();
        let calls = Arc::new(AtomicUsize::new(0));
        let me = Arc::new(Mutex::new(None));
        let (h, c, m) = (Arc::downgrade(&hub), calls.clone(), me.clone());
        let id = hub
            .register_notifier(IommuNotifier {
                flags: NotifierFlags::UNMAP,
                start: 0,
                last: u64::MAX,
                iommu_idx: 0,
                notify: Arc::new(move |_: &IotlbEvent| {
                    c.fetch_add(1, Ordering::SeqCst);
                    let hub = h.upgrade().unwrap();
                    if let Some(id) = m.lock().take() {
                        assert!(hub.unregister_notifier(id));
                        hub.register_notifier(IommuNotifier {
                            flags: NotifierFlags::MAP,
                            start: 0,
                            last: u64::MAX,
                            iommu_idx: 0,
                            notify: Arc::new(|_: &IotlbEvent| {}),
                        })
                        .unwrap();
                    }
                }),
            })
            .unwrap();
        *me.lock() = Some(id);
        let unmap = IotlbEvent {
            kind: IotlbEventKind::Unmap,
            entry: IotlbEntry::denied(0x1000, 0xfff),
        };
        hub.notify(0, &unmap).unwrap();
        hub.notify(0, &unmap).unwrap();
        tx.send((calls.load(Ordering::SeqCst), hub.notifiers().len()))
            .unwrap();
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("deadlock: a notifier unregistering itself");
    assert_eq!(got, (1, 1));
}

/// Rule (bad input is an error, never a deadlock): a device that registers
/// a notifier on its own hub from inside `notify_flag_changed` gets an
/// error for that registration; the outer one goes through.
#[test]
fn registration_from_inside_notify_flag_changed_is_an_error() {
    struct Nested {
        hub: Mutex<Option<Arc<IommuHub>>>,
        inner: Mutex<Option<Result<(), IommuError>>>,
    }
    impl Iommu for Nested {
        fn translate(&self, addr: u64, _a: IommuPerm, _i: u32) -> IotlbEntry {
            IotlbEntry::denied(addr, 0xfff)
        }
        fn notify_flag_changed(
            &self,
            _old: NotifierFlags,
            _new: NotifierFlags,
            _idx: u32,
        ) -> Result<(), String> {
            let hub = self.hub.lock().take();
            if let Some(hub) = hub {
                let r = hub.register_notifier(IommuNotifier {
                    flags: NotifierFlags::UNMAP,
                    start: 0,
                    last: u64::MAX,
                    iommu_idx: 0,
                    notify: Arc::new(|_: &IotlbEvent| {}),
                });
                *self.inner.lock() = Some(r.map(|_| ()));
            }
            Ok(())
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let memory = Memory::new();
        let dev = Arc::new(Nested {
            hub: Mutex::new(None),
            inner: Mutex::new(None),
        });
        let hub = IommuHub::new();
        let _r = memory
            .new_iommu("nested", 1 << 32, dev.clone(), hub.clone(), None)
            .unwrap();
        *dev.hub.lock() = Some(hub.clone());
        let outer = hub.register_notifier(IommuNotifier {
            flags: NotifierFlags::MAP,
            start: 0,
            last: u64::MAX,
            iommu_idx: 0,
            notify: Arc::new(|_: &IotlbEvent| {}),
        });
        let inner = dev.inner.lock().take();
        tx.send((outer.is_ok(), inner, hub.notifiers().len()))
            .unwrap();
    });
    let (outer, inner, count) = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("deadlock: a registration from inside notify_flag_changed");
    assert!(outer);
    assert!(
        matches!(inner, Some(Err(IommuError::BadNotifier(_)))),
        "{inner:?}"
    );
    assert_eq!(count, 1);
}

/// Rule (QEMU: once `memory_region_unregister_iommu_notifier` returns, the
/// notifier's code no longer runs): unregistering a notifier whose call is
/// running on another thread returns only after that call has returned, so
/// its owner may free the state the callback uses.
#[test]
fn unregister_waits_for_the_notifiers_running_call() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    let s = setup(12, 8);
    let hub = s.device.hub().clone();
    let (in_call_tx, in_call_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let in_call_tx = Mutex::new(Some(in_call_tx));
    let release_rx = Mutex::new(Some(release_rx));
    let call_returned = Arc::new(AtomicBool::new(false));
    let returned = call_returned.clone();
    let id = hub
        .register_notifier(IommuNotifier {
            flags: NotifierFlags::UNMAP,
            start: 0,
            last: u64::MAX,
            iommu_idx: 0,
            notify: Arc::new(move |_: &IotlbEvent| {
                if let Some(tx) = in_call_tx.lock().take() {
                    tx.send(()).unwrap();
                }
                if let Some(rx) = release_rx.lock().take() {
                    let _ = rx.recv_timeout(std::time::Duration::from_secs(5));
                }
                returned.store(true, Ordering::SeqCst);
            }),
        })
        .unwrap();
    let h = hub.clone();
    let sender = std::thread::spawn(move || {
        h.notify(
            0,
            &IotlbEvent {
                kind: IotlbEventKind::Unmap,
                entry: IotlbEntry::denied(0x1000, 0xfff),
            },
        )
    });
    in_call_rx.recv().unwrap();
    let h = hub.clone();
    let (unregistered_tx, unregistered_rx) = mpsc::channel();
    let unregister = std::thread::spawn(move || {
        let r = h.unregister_notifier(id);
        let _ = unregistered_tx.send(());
        r
    });
    // While the call runs, the unregistration must not return.
    let early = unregistered_rx
        .recv_timeout(std::time::Duration::from_millis(200))
        .is_ok();
    release_tx.send(()).unwrap();
    assert!(unregister.join().unwrap());
    sender.join().unwrap().unwrap();
    assert!(
        !early,
        "unregister_notifier returned while the notifier's call was still running"
    );
    assert!(call_returned.load(Ordering::SeqCst));
}
