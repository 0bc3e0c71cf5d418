//! Panic safety of the control plane (issue 14, items 3, 4, 6, 9 and 14):
//! code memtree runs on behalf of others — listeners, finalizers, the `Drop`
//! of device state — may panic or call back into the machine; memtree ends
//! every operation consistent and reports the panic to the caller (it is
//! re-raised once memtree is consistent, and recorded in the census).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use memtree::{
    lifecycle::diag, MemTxAttrs, MemTxResult, Memory, MemoryListener, MmioOps, ObjectKind,
    RegionId, Section, WeakMemory,
};

type Log = Arc<Mutex<Vec<String>>>;

/// Records `begin`, `commit` and the adds and deletes it sees; panics in
/// the first `region_add` when `panic_once` is set.
struct Listener {
    tag: &'static str,
    priority: u32,
    log: Log,
    panic_once: AtomicBool,
}

impl Listener {
    fn new(tag: &'static str, priority: u32, log: &Log, panic_once: bool) -> Arc<Listener> {
        Arc::new(Listener {
            tag,
            priority,
            log: log.clone(),
            panic_once: AtomicBool::new(panic_once),
        })
    }
    fn push(&self, s: String) {
        self.log.lock().unwrap().push(format!("{} {s}", self.tag));
    }
}

impl MemoryListener for Listener {
    fn priority(&self) -> u32 {
        self.priority
    }
    fn name(&self) -> &str {
        self.tag
    }
    fn begin(&self) {
        self.push("begin".into());
    }
    fn commit(&self) {
        self.push("commit".into());
    }
    fn region_add(&self, s: &Section<'_>) {
        self.push(format!("add {} {}", s.space_name, s.range.region().name()));
        if self.panic_once.swap(false, Ordering::SeqCst) {
            panic!("listener {} refuses {}", self.tag, s.range.region().name());
        }
    }
    fn region_del(&self, s: &Section<'_>) {
        self.push(format!("del {} {}", s.space_name, s.range.region().name()));
    }
}

fn names(memory: &Memory, space: memtree::SpaceId) -> Vec<String> {
    memory
        .address_space(space)
        .unwrap()
        .view()
        .ranges()
        .iter()
        .map(|r| r.region().name().to_owned())
        .collect()
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

/// Item 3: a listener that panics in `region_add` does not leave its own
/// or any later address space on the old view, every listener still gets
/// its callbacks and `commit`, and the panic reaches the caller.
#[test]
fn listener_panic_still_publishes_every_space_and_commits_every_listener() {
    let memory = Memory::new();
    let root_a = memory.new_container("root-a", 1 << 32, None).unwrap();
    let root_b = memory.new_container("root-b", 1 << 32, None).unwrap();
    let a = memory.new_address_space("a", root_a, None).unwrap();
    let b = memory.new_address_space("b", root_b, None).unwrap();
    let log: Log = Arc::default();
    let bad = Listener::new("bad", 0, &log, true);
    let late = Listener::new("late", 5, &log, false);
    let other = Listener::new("other", 0, &log, false);
    memory.register_listener(a, bad.clone()).unwrap();
    memory.register_listener(a, late.clone()).unwrap();
    memory.register_listener(b, other.clone()).unwrap();
    log.lock().unwrap().clear();

    let ram_a = memory.new_ram("ram-a", 0x1000, None).unwrap();
    let ram_b = memory.new_ram("ram-b", 0x1000, None).unwrap();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        memory.transaction(|m| {
            m.add_subregion(root_a, 0, ram_a).unwrap();
            m.add_subregion(root_b, 0, ram_b).unwrap();
        })
    }));
    let payload = outcome.expect_err("the listener's panic reaches the caller");
    assert_eq!(panic_message(&*payload), "listener bad refuses ram-a");

    assert_eq!(names(&memory, a), vec!["ram-a"], "space a is published");
    assert_eq!(names(&memory, b), vec!["ram-b"], "space b is published");
    let log = std::mem::take(&mut *log.lock().unwrap());
    assert_eq!(
        log,
        vec![
            "bad begin",
            "other begin",
            "late begin",
            "bad add a ram-a",
            "late add a ram-a",
            "other add b ram-b",
            "bad commit",
            "other commit",
            "late commit",
        ]
    );
    // The machine is usable and the next edit diffs against what was
    // published: no repeated add.
    memory.del_subregion(root_a, ram_a).unwrap();
    assert!(names(&memory, a).is_empty());
    let report = memory.teardown();
    assert!(report.survivors.is_empty(), "{report}");
    assert_eq!(report.panics.len(), 1, "{report}");
    assert!(
        report.panics[0].contains("listener \"bad\"") && report.panics[0].contains("region_add"),
        "{report}"
    );
}

/// Device state that calls read-only (and transactional) machine methods
/// from its `Drop`.
struct QueryingDevice {
    machine: WeakMemory,
    dropped: Arc<AtomicUsize>,
}

impl MmioOps for QueryingDevice {
    fn read(&self, _addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        Ok(0)
    }
    fn write(&self, _addr: u64, _data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        MemTxResult::OK
    }
    fn endianness(&self) -> memtree::Endian {
        memtree::Endian::Little
    }
}

impl Drop for QueryingDevice {
    fn drop(&mut self) {
        if let Some(m) = self.machine.upgrade() {
            let _ = m.region_count();
            let _ = m.address_spaces();
            let t = m.begin();
            t.commit();
        }
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

/// Item 4: the `Drop` of device state runs where the machine is usable:
/// during `unplug` and `destroy_region` it may query the machine and open a
/// transaction, and the unplug completes.
#[test]
fn device_drop_may_use_the_machine_during_unplug_and_destroy() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let dropped = Arc::new(AtomicUsize::new(0));
    let dev = memory.new_owner("dev", None).unwrap();
    let ram = memory.new_ram("dev.ram", 0x1000, Some(dev)).unwrap();
    let regs = memory
        .new_mmio(
            "dev.regs",
            0x100,
            Arc::new(QueryingDevice {
                machine: memory.downgrade(),
                dropped: dropped.clone(),
            }),
            Some(dev),
        )
        .unwrap();
    memory.add_subregion(system, 0x1000, ram).unwrap();
    // Unmapped: the unplug's removal from the topology drops the device.
    let _ = regs;
    memory.unplug(dev).unwrap();
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    assert!(names(&memory, sid).is_empty(), "the unplug completed");

    let lone = memory
        .new_mmio(
            "lone",
            0x100,
            Arc::new(QueryingDevice {
                machine: memory.downgrade(),
                dropped: dropped.clone(),
            }),
            None,
        )
        .unwrap();
    memory.destroy_region(lone).unwrap();
    assert_eq!(dropped.load(Ordering::SeqCst), 2);
    assert_eq!(memory.region_count(), 1);
    assert!(memory.teardown().is_clean());
}

/// Item 4, device callbacks memtree calls while creating a region (its
/// access sizes and byte order) may query the machine too.
#[test]
fn device_config_callbacks_may_query_the_machine() {
    struct Sizes(WeakMemory, Arc<AtomicUsize>);
    impl MmioOps for Sizes {
        fn read(&self, _a: u64, _s: u32, _t: MemTxAttrs) -> Result<u64, MemTxResult> {
            Ok(0)
        }
        fn write(&self, _a: u64, _d: u64, _s: u32, _t: MemTxAttrs) -> MemTxResult {
            MemTxResult::OK
        }
        fn endianness(&self) -> memtree::Endian {
            memtree::Endian::Little
        }
        fn impl_sizes(&self) -> memtree::AccessSizes {
            if let Some(m) = self.0.upgrade() {
                self.1.store(m.region_count(), Ordering::SeqCst);
            }
            memtree::AccessSizes::new(1, 4, false)
        }
    }
    let memory = Memory::new();
    let seen = Arc::new(AtomicUsize::new(usize::MAX));
    memory
        .new_mmio(
            "regs",
            0x10,
            Arc::new(Sizes(memory.downgrade(), seen.clone())),
            None,
        )
        .unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 0);
    assert!(memory.teardown().is_clean());
}

/// Item 6: when one finalizer of four panics, every finalizer still runs
/// exactly once, the panic reaches the caller of `unplug`, and the census
/// records which finalizer panicked (the leak report is not clean).
#[test]
fn every_finalizer_runs_once_when_one_panics() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    memory.new_address_space("memory", system, None).unwrap();
    let parent = memory.new_owner("parent", None).unwrap();
    let runs: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::default()).collect();
    let first = Arc::new(AtomicBool::new(true));
    let panicker = Arc::new(Mutex::new(String::new()));
    for (i, count) in runs.iter().enumerate() {
        let name = format!("child{i}");
        let child = memory.new_owner(&name, Some(parent)).unwrap();
        let ram = memory
            .new_ram(&format!("{name}.ram"), 0x1000, Some(child))
            .unwrap();
        memory
            .add_subregion(system, 0x1000 * i as u64, ram)
            .unwrap();
        let (count, first, who) = (count.clone(), first.clone(), panicker.clone());
        memory
            .set_finalizer(
                child,
                Box::new(move || {
                    count.fetch_add(1, Ordering::SeqCst);
                    if first.swap(false, Ordering::SeqCst) {
                        *who.lock().unwrap() = name.clone();
                        panic!("finalizer of {name} fails");
                    }
                }),
            )
            .unwrap();
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| memory.unplug(parent)));
    let payload = outcome.expect_err("the finalizer's panic reaches the caller");
    let who = panicker.lock().unwrap().clone();
    assert_eq!(
        panic_message(&*payload),
        format!("finalizer of {who} fails")
    );
    for (i, c) in runs.iter().enumerate() {
        assert_eq!(c.load(Ordering::SeqCst), 1, "finalizer of child{i}");
    }
    let leaks = diag::leak_report(memory.census());
    assert!(!leaks.is_clean(), "a panicked finalizer is not clean");
    assert!(
        leaks
            .panics
            .iter()
            .any(|p| p.contains(&format!("owner \"{who}\"")) && p.contains("fails")),
        "{leaks}"
    );
    assert_eq!(memory.region_count(), 1, "the unplug completed");
    let report = memory.teardown();
    assert!(report.survivors.is_empty(), "{report}");
    assert_eq!(report.panics.len(), 1, "{report}");
}

/// Item 14: the topology's census entry is finalized when the machine is
/// gone.
#[test]
fn topology_census_entry_is_finalized_after_the_machine_is_gone() {
    let memory = Memory::new();
    let census = memory.census().clone();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    memory.new_address_space("memory", system, None).unwrap();
    drop(memory);
    let topology_alive = census
        .live()
        .into_iter()
        .filter(|e| e.kind == ObjectKind::Topology)
        .count();
    assert_eq!(topology_alive, 0, "{:?}", census.live());
    assert!(census
        .finalized()
        .iter()
        .any(|f| f.kind == ObjectKind::Topology));
    assert!(census.double_finalized().is_empty());
}

/// A panicking `Drop` of device state during an unplug: the unplug
/// completes (view published, every other device finalized once) and the
/// panic reaches the caller.
#[test]
fn device_drop_panic_during_unplug_leaves_the_machine_consistent() {
    struct Bomb(Arc<AtomicUsize>);
    impl MmioOps for Bomb {
        fn read(&self, _a: u64, _s: u32, _t: MemTxAttrs) -> Result<u64, MemTxResult> {
            Ok(0)
        }
        fn write(&self, _a: u64, _d: u64, _s: u32, _t: MemTxAttrs) -> MemTxResult {
            MemTxResult::OK
        }
        fn endianness(&self) -> memtree::Endian {
            memtree::Endian::Little
        }
    }
    impl Drop for Bomb {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
            panic!("bomb");
        }
    }
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    let fins = Arc::new(AtomicUsize::new(0));
    let parent = memory.new_owner("parent", None).unwrap();
    let mut regions: Vec<RegionId> = Vec::new();
    for i in 0..3u64 {
        let d = memory.new_owner(&format!("d{i}"), Some(parent)).unwrap();
        let f = fins.clone();
        memory
            .set_finalizer(
                d,
                Box::new(move || {
                    f.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .unwrap();
        let r = memory
            .new_mmio(
                &format!("d{i}.regs"),
                0x100,
                Arc::new(Bomb(drops.clone())),
                Some(d),
            )
            .unwrap();
        memory.add_subregion(system, i * 0x1000, r).unwrap();
        regions.push(r);
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| memory.unplug(parent)));
    assert_eq!(panic_message(&*outcome.unwrap_err()), "bomb");
    assert_eq!(
        drops.load(Ordering::SeqCst),
        3,
        "every device state dropped"
    );
    assert_eq!(fins.load(Ordering::SeqCst), 3, "every finalizer ran");
    assert!(names(&memory, sid).is_empty());
    for r in regions {
        assert!(memory.region_info(r).is_err());
    }
    let report = memory.teardown();
    assert!(report.survivors.is_empty(), "{report}");
    assert_eq!(report.panics.len(), 3, "{report}");
}

/// A listener that panics in its first `region_del`.
struct PanicsInDel {
    log: Log,
    armed: AtomicBool,
}

impl MemoryListener for PanicsInDel {
    fn name(&self) -> &str {
        "del-panics"
    }
    fn region_del(&self, s: &Section<'_>) {
        self.log
            .lock()
            .unwrap()
            .push(format!("del {}", s.range.region().name()));
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("del refused");
        }
    }
    fn commit(&self) {
        self.log.lock().unwrap().push("commit".into());
    }
}

/// Unregistering replays every deletion and `commit` even when the
/// listener panics in the first `region_del` (a slot manager gives back
/// every slot), and the panic reaches the caller.
#[test]
fn unregister_replays_every_deletion_when_the_listener_panics() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    for i in 0..3u64 {
        let r = memory.new_ram(&format!("ram{i}"), 0x1000, None).unwrap();
        memory.add_subregion(system, i * 0x2000, r).unwrap();
    }
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let log: Log = Arc::default();
    let l = Arc::new(PanicsInDel {
        log: log.clone(),
        armed: AtomicBool::new(true),
    });
    let id = memory.register_listener(sid, l).unwrap();
    log.lock().unwrap().clear();
    let outcome = catch_unwind(AssertUnwindSafe(|| memory.unregister_listener(id)));
    assert_eq!(panic_message(&*outcome.unwrap_err()), "del refused");
    assert_eq!(
        *log.lock().unwrap(),
        vec!["del ram0", "del ram1", "del ram2", "commit"]
    );
    // It is unregistered: later commits do not reach it.
    memory.set_enabled(system, false).unwrap();
    assert_eq!(log.lock().unwrap().len(), 4);
    let report = memory.teardown();
    assert!(report.survivors.is_empty(), "{report}");
    assert_eq!(report.panics.len(), 1, "{report}");
}

/// Dirty logging: `log_global_start` that panics is handled like a refusal
/// (the listeners already started are stopped again, logging stays off)
/// and the panic reaches the caller.
#[test]
fn global_dirty_log_start_rolls_back_when_a_listener_panics() {
    struct Starter(Log, u32, bool);
    impl MemoryListener for Starter {
        fn priority(&self) -> u32 {
            self.1
        }
        fn log_global_start(&self) -> Result<(), String> {
            self.0.lock().unwrap().push(format!("start {}", self.1));
            if self.2 {
                panic!("cannot log");
            }
            Ok(())
        }
        fn log_global_stop(&self) {
            self.0.lock().unwrap().push(format!("stop {}", self.1));
        }
    }
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let log: Log = Arc::default();
    memory
        .register_listener(sid, Arc::new(Starter(log.clone(), 1, false)))
        .unwrap();
    memory
        .register_listener(sid, Arc::new(Starter(log.clone(), 2, true)))
        .unwrap();
    let outcome = catch_unwind(AssertUnwindSafe(|| memory.global_dirty_log_start()));
    assert_eq!(panic_message(&*outcome.unwrap_err()), "cannot log");
    assert_eq!(*log.lock().unwrap(), vec!["start 1", "start 2", "stop 1"]);
    assert!(!memory.global_dirty_log());
    assert_eq!(memory.teardown().panics.len(), 1);
}
