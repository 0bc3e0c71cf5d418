//! Lifecycle: owners, hot-plug and unplug, DMA mappings, caches, sections and
//! diagnostics (issue 4). Each numbered test of the issue is one test here,
//! named `lifecycle_<behaviour>`; the extra DMA/cache/diagnostics tests
//! follow.
//!
//! Probes: every device gets a [`Probe`] shared by its MMIO ops and its
//! owner finalizer. The finalizer counts its runs and marks the probe
//! finalized; every callback that runs after that is recorded as a
//! use-after-finalize violation. The census's finalization log gives the
//! order in which regions, memory and owners were finalized.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use memtree::host::mapping_info::DmaDirection;
use memtree::lifecycle::census::Finalized;
use memtree::{
    lifecycle::diag, AccessSizes, DmaError, Endian, MemTxAttrs, MemTxResult, Memory, MmioOps,
    ObjectKind, OwnerId, RamBacking, RegionId, SpaceId, TopologyError, WeakMemory,
};

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/// Shared between a device's ops and its owner finalizer.
#[derive(Default)]
struct Probe {
    finalizer_runs: AtomicUsize,
    finalized: AtomicBool,
    callbacks: AtomicUsize,
    used_after_finalize: AtomicUsize,
    events: Mutex<Vec<&'static str>>,
}

impl Probe {
    fn touch(&self) {
        self.callbacks.fetch_add(1, Ordering::SeqCst);
        if self.finalized.load(Ordering::SeqCst) {
            self.used_after_finalize.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn runs(&self) -> usize {
        self.finalizer_runs.load(Ordering::SeqCst)
    }
    fn event(&self, e: &'static str) {
        self.events.lock().unwrap().push(e);
    }
}

/// A device register file: reads return `0xd0d0_0000 | addr`, writes are
/// counted.
struct Regs {
    probe: Arc<Probe>,
}

impl MmioOps for Regs {
    fn read(&self, addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        self.probe.touch();
        Ok(0xd0d0_0000 | addr)
    }
    fn write(&self, _addr: u64, _data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        self.probe.touch();
        MemTxResult::OK
    }
    fn impl_sizes(&self) -> AccessSizes {
        AccessSizes::new(1, 4, false)
    }
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

/// A machine with a 4 GiB system container and its address space.
fn machine() -> (Memory, RegionId, SpaceId) {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let space = memory.new_address_space("memory", system, None).unwrap();
    (memory, system, space)
}

/// Plugs a device with a probe wired to its finalizer.
fn device(memory: &Memory, name: &str, parent: Option<OwnerId>) -> (OwnerId, Arc<Probe>) {
    let owner = memory.new_owner(name, parent).unwrap();
    let probe = Arc::new(Probe::default());
    let p = probe.clone();
    memory
        .set_finalizer(
            owner,
            Box::new(move || {
                p.finalizer_runs.fetch_add(1, Ordering::SeqCst);
                p.finalized.store(true, Ordering::SeqCst);
                p.event("finalized");
            }),
        )
        .unwrap();
    (owner, probe)
}

fn finalized(memory: &Memory) -> Vec<Finalized> {
    memory.census().finalized()
}

/// Position of the finalization of the object `kind` named `name`.
fn pos(log: &[Finalized], kind: ObjectKind, name: &str) -> usize {
    let hits: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, f)| f.kind == kind && f.name == name)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{kind:?} {name:?} finalized {} times: {log:#?}",
        hits.len()
    );
    hits[0]
}

fn live_named(memory: &Memory, name: &str) -> Vec<String> {
    memory
        .census()
        .live()
        .into_iter()
        .filter(|e| e.name == name)
        .map(|e| format!("{} {}", e.kind.as_str(), e.name))
        .collect()
}

fn assert_no_double_finalize(memory: &Memory) {
    assert!(memory.census().double_finalized().is_empty());
}

fn teardown_clean(memory: Memory) {
    let census = memory.census().clone();
    let report = memory.teardown();
    assert!(report.is_clean(), "{report}");
    assert!(census.double_finalized().is_empty());
}

// ---------------------------------------------------------------------------
// Issue 4, tests 1-10
// ---------------------------------------------------------------------------

/// 1. A container and its subregion with the same owner: after unplug the
///    owner, both regions and their memory are gone; the container finishes
///    before the subregion it held, both before the owner, the memory with
///    its region.
#[test]
fn lifecycle_same_owner_container_and_subregion_reclaimed_on_unplug() {
    let (memory, system, _) = machine();
    let (dev, probe) = device(&memory, "dev", None);
    let c = memory.new_container("dev-c", 0x2000, Some(dev)).unwrap();
    let r = memory.new_ram("dev-ram", 0x1000, Some(dev)).unwrap();
    memory.add_subregion(c, 0x1000, r).unwrap();
    memory.add_subregion(system, 0x10_0000, c).unwrap();

    let report = memory.unplug(dev).unwrap();
    assert_eq!(report.owners, vec!["dev"]);
    assert!(report.outstanding.is_empty(), "{report:?}");

    let log = finalized(&memory);
    let c_at = pos(&log, ObjectKind::Region, "dev-c");
    let r_at = pos(&log, ObjectKind::Region, "dev-ram");
    let mem_at = pos(&log, ObjectKind::Backend, "dev-ram");
    let owner_at = pos(&log, ObjectKind::Owner, "dev");
    assert!(c_at < r_at, "container before the subregion it held");
    assert!(
        r_at < owner_at && c_at < owner_at,
        "regions before their owner"
    );
    assert!(mem_at < owner_at);
    assert_eq!(probe.runs(), 1);
    for name in ["dev", "dev-c", "dev-ram"] {
        assert!(live_named(&memory, name).is_empty(), "{name} survived");
    }
    assert_no_double_finalize(&memory);
    teardown_clean(memory);
}

/// 2. An address space whose root region belongs to the device that owns the
///    address space is reclaimed at unplug, even while user code still holds
///    the address space's handle (which then shows the empty view).
#[test]
fn lifecycle_address_space_rooted_in_own_region_reclaimed_on_unplug() {
    let (memory, _, _) = machine();
    let (dev, probe) = device(&memory, "iommu", None);
    let root = memory
        .new_container("iommu-root", 1 << 32, Some(dev))
        .unwrap();
    let ram = memory.new_ram("iommu-ram", 0x1000, Some(dev)).unwrap();
    memory.add_subregion(root, 0, ram).unwrap();
    let sid = memory
        .new_address_space("iommu-as", root, Some(dev))
        .unwrap();
    let handle = memory.address_space(sid).unwrap();
    assert_eq!(handle.view().ranges().len(), 1);

    let report = memory.unplug(dev).unwrap();
    assert_eq!(report.spaces, vec!["iommu-as"]);
    assert_eq!(
        probe.runs(),
        1,
        "owner finalized although its AS handle is held"
    );
    assert!(handle.view().ranges().is_empty());
    assert!(live_named(&memory, "iommu-root").is_empty());
    assert!(live_named(&memory, "iommu-ram").is_empty());
    assert_eq!(
        memory.address_space(sid).unwrap_err(),
        TopologyError::NoSuchSpace(sid)
    );
    drop(handle);
    assert!(live_named(&memory, "iommu-as").is_empty());
    assert_no_double_finalize(&memory);
    teardown_clean(memory);
}

/// 3a. A device DMA-maps its own RAM: reclaimed after unmap. Unplugged while
///     the mapping is out: the device and its regions finalize at unplug,
///     the memory stays valid until unmap, and the unplug report names the
///     mapping.
#[test]
fn lifecycle_self_dma_of_own_ram_defined_and_reported() {
    let (memory, system, sid) = machine();
    let space = memory.address_space(sid).unwrap();

    // Mapped and unmapped before unplug: everything reclaimed.
    let (dev, probe) = device(&memory, "nic", None);
    let ram = memory.new_ram("nic-ram", 0x1000, Some(dev)).unwrap();
    memory.add_subregion(system, 0x2000, ram).unwrap();
    let mut m = space
        .map(0x2000, 0x100, DmaDirection::FromDevice, A)
        .unwrap();
    m.write(0, b"ring").unwrap();
    assert_eq!(m.unmap(4), MemTxResult::OK);
    assert!(memory.unplug(dev).unwrap().outstanding.is_empty());
    assert_eq!(probe.runs(), 1);
    assert!(live_named(&memory, "nic-ram").is_empty());

    // Unplugged while mapped.
    let (dev, probe) = device(&memory, "nic2", None);
    let ram = memory.new_ram("nic2-ram", 0x1000, Some(dev)).unwrap();
    memory.add_subregion(system, 0x2000, ram).unwrap();
    let mut m = space
        .map(0x2000, 0x100, DmaDirection::Bidirectional, A)
        .unwrap();
    assert!(!m.is_bounce() && m.holds_reference());
    m.write(0, b"live").unwrap();
    let report = memory.unplug(dev).unwrap();
    assert_eq!(report.outstanding.len(), 1, "{report:?}");
    let line = &report.outstanding[0];
    assert!(
        line.contains("dma memory 0x2000+0x100") && line.contains("memory \"nic2-ram\""),
        "{line}"
    );
    assert_eq!(probe.runs(), 1, "device finalized at unplug");
    assert!(live_named(&memory, "nic2").is_empty());
    assert_eq!(live_named(&memory, "nic2-ram"), vec!["backend nic2-ram"]);
    // The memory is still valid: read what was written, write more.
    let mut buf = [0u8; 4];
    m.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"live");
    m.write(4, b"more").unwrap();
    // The leak report (without teardown) explains the survivor by the mapping.
    let leaks = diag::leak_report(memory.census());
    let backend = leaks
        .survivors
        .iter()
        .find(|(e, _)| e.kind == ObjectKind::Backend)
        .expect("memory survives while mapped");
    assert!(backend.1.iter().any(|c| c.contains("mapping #")), "{leaks}");
    drop(m);
    let log = finalized(&memory);
    assert!(pos(&log, ObjectKind::Owner, "nic2") < pos(&log, ObjectKind::Backend, "nic2-ram"));
    assert!(live_named(&memory, "nic2-ram").is_empty());
    assert_no_double_finalize(&memory);
    drop(space);
    teardown_clean(memory);
}

/// 3b. A device DMA-maps its own MMIO (a bounce buffer): the mapping pins
///     the region and so the device until unmap; unplugging meanwhile is
///     reported, and the device's callbacks are never reached after unplug.
#[test]
fn lifecycle_self_dma_of_own_mmio_pins_device_until_unmap() {
    let (memory, system, sid) = machine();
    let space = memory.address_space(sid).unwrap();
    let (dev, probe) = device(&memory, "e1000", None);
    let mmio = memory
        .new_mmio(
            "e1000-mmio",
            0x100,
            Arc::new(Regs {
                probe: probe.clone(),
            }),
            Some(dev),
        )
        .unwrap();
    memory.add_subregion(system, 0x3000, mmio).unwrap();

    let m = space.map(0x3000, 8, DmaDirection::ToDevice, A).unwrap();
    assert!(m.is_bounce());
    assert_eq!(m.prefill_result(), MemTxResult::OK);
    let mut buf = [0u8; 4];
    m.read(0, &mut buf).unwrap();
    assert_eq!(u32::from_le_bytes(buf), 0xd0d0_0000);

    let report = memory.unplug(dev).unwrap();
    assert_eq!(report.outstanding.len(), 1, "{report:?}");
    assert!(
        report.outstanding[0].contains("region \"e1000-mmio\""),
        "{report:?}"
    );
    assert_eq!(probe.runs(), 0, "the bounce mapping pins the device");
    let owner_key = memory
        .census()
        .live()
        .into_iter()
        .find(|e| e.kind == ObjectKind::Owner && e.name == "e1000")
        .unwrap()
        .key;
    let words = diag::why_alive(memory.census(), owner_key);
    let mkey = m.census_key().unwrap();
    assert_eq!(
        words,
        vec![format!(
            "held by mapping {mkey} -> region e1000-mmio -> e1000"
        )]
    );
    let calls = probe.callbacks.load(Ordering::SeqCst);
    assert_eq!(m.unmap(8), MemTxResult::OK);
    assert_eq!(probe.runs(), 1);
    assert_eq!(probe.callbacks.load(Ordering::SeqCst), calls);
    assert_eq!(probe.used_after_finalize.load(Ordering::SeqCst), 0);
    let log = finalized(&memory);
    assert!(pos(&log, ObjectKind::Region, "e1000-mmio") < pos(&log, ObjectKind::Owner, "e1000"));
    assert_eq!(space.bounce_in_use(), 0);
    assert_no_double_finalize(&memory);
    drop(space);
    teardown_clean(memory);
}

/// 4. Device A has container C_A and child device B; B's region R_B is
///    mapped into C_A. Unplugging A reclaims A, B, R_B and C_A.
#[test]
fn lifecycle_parent_unplug_reclaims_child_device_mapped_into_parent() {
    let (memory, system, _) = machine();
    let (a, pa) = device(&memory, "A", None);
    let (b, pb) = device(&memory, "B", Some(a));
    let c_a = memory.new_container("C_A", 0x10000, Some(a)).unwrap();
    let r_b = memory.new_ram("R_B", 0x1000, Some(b)).unwrap();
    memory.add_subregion(c_a, 0x1000, r_b).unwrap();
    memory.add_subregion(system, 0x20_0000, c_a).unwrap();

    let report = memory.unplug(a).unwrap();
    assert_eq!(report.owners, vec!["A", "B"]);
    assert_eq!((pa.runs(), pb.runs()), (1, 1));
    let log = finalized(&memory);
    assert!(pos(&log, ObjectKind::Region, "C_A") < pos(&log, ObjectKind::Region, "R_B"));
    assert!(pos(&log, ObjectKind::Region, "C_A") < pos(&log, ObjectKind::Owner, "A"));
    assert!(pos(&log, ObjectKind::Region, "R_B") < pos(&log, ObjectKind::Owner, "B"));
    pos(&log, ObjectKind::Backend, "R_B");
    assert_eq!(memory.unplug(b).unwrap_err(), TopologyError::NoSuchOwner(b));
    assert_no_double_finalize(&memory);
    teardown_clean(memory);
}

/// 5. Device X holds a DMA mapping into device Y's RAM; Y is unplugged. The
///    mapped memory stays valid and readable until X unmaps. In this model
///    Y's regions and Y itself are finalized *at unplug* (regions first,
///    each finalizer once), because a RAM mapping holds only the memory; the
///    memory is finalized when X unmaps.
#[test]
fn lifecycle_dma_into_unplugged_device_ram_keeps_only_memory() {
    let (memory, system, sid) = machine();
    let x_space = memory.address_space(sid).unwrap();
    let (_x, px) = device(&memory, "X", None);
    let (y, py) = device(&memory, "Y", None);
    let y_ram = memory.new_ram("Y-ram", 0x2000, Some(y)).unwrap();
    let y_regs = memory
        .new_mmio(
            "Y-regs",
            0x10,
            Arc::new(Regs { probe: py.clone() }),
            Some(y),
        )
        .unwrap();
    memory.add_subregion(system, 0x8000, y_ram).unwrap();
    memory.add_subregion(system, 0xa000, y_regs).unwrap();
    x_space
        .write(0x8000, &[0xab; 0x2000], A)
        .into_result()
        .unwrap();

    let m = x_space
        .map(0x8000, 0x2000, DmaDirection::ToDevice, A)
        .unwrap();
    assert_eq!(m.len(), 0x2000);
    let report = memory.unplug(y).unwrap();
    assert!(
        report
            .outstanding
            .iter()
            .any(|l| l.contains("memory \"Y-ram\"")),
        "{report:?}"
    );
    assert_eq!(py.runs(), 1);
    let log = finalized(&memory);
    let owner_at = pos(&log, ObjectKind::Owner, "Y");
    assert!(pos(&log, ObjectKind::Region, "Y-ram") < owner_at);
    assert!(pos(&log, ObjectKind::Region, "Y-regs") < owner_at);
    assert!(!log
        .iter()
        .any(|f| f.kind == ObjectKind::Backend && f.name == "Y-ram"));

    let mut buf = vec![0u8; 0x2000];
    m.read(0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0xab),
        "mapped memory still readable"
    );
    drop(m);
    let log = finalized(&memory);
    assert!(pos(&log, ObjectKind::Backend, "Y-ram") > owner_at);
    assert_eq!((px.runs(), py.runs()), (0, 1));
    assert_no_double_finalize(&memory);
    drop(x_space);
    teardown_clean(memory);
}

fn rss_bytes() -> Option<u64> {
    if cfg!(miri) {
        return None; // no /proc under Miri's isolation
    }
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// 6. A device creates, maps, unmaps and destroys a RAM region 10,000
///    times: live objects and process memory return to the baseline.
#[test]
fn lifecycle_create_map_destroy_loop_returns_to_baseline() {
    let (memory, system, sid) = machine();
    let space = memory.address_space(sid).unwrap();
    let (dev, _probe) = device(&memory, "gpu", None);
    memory.census().set_keep_log(false);
    let cycle = |i: u32| {
        let r = memory.new_ram("blob", 0x4000, Some(dev)).unwrap();
        memory.add_subregion(system, 0x100_0000, r).unwrap();
        // Touch the memory so a leaked block would show in RSS.
        let mut m = space
            .map(0x100_0000, 0x4000, DmaDirection::FromDevice, A)
            .unwrap();
        m.write(0, &[i as u8; 0x4000]).unwrap();
        drop(m);
        memory.del_subregion(system, r).unwrap();
        memory.destroy_region(r).unwrap();
    };
    let iterations = if cfg!(miri) { 20 } else { 10_000 };
    for i in 0..(iterations / 100).max(2) {
        cycle(i);
    }
    let counts = memory.census().counts();
    let rss = rss_bytes();
    for i in 0..iterations {
        cycle(i);
    }
    assert_eq!(memory.census().counts(), counts);
    if let (Some(before), Some(after)) = (rss, rss_bytes()) {
        // 10,000 leaked 16 KiB blocks would be 160 MiB.
        assert!(
            after < before + (16 << 20),
            "RSS grew from {before} to {after}"
        );
    }
    assert_eq!(
        memory.region_count(),
        1,
        "only the system container is left"
    );
    assert_no_double_finalize(&memory);
    drop(space);
    teardown_clean(memory);
}

/// 7. Two devices share one memory backend (ivshmem-like); unplugging one
///    leaves the other reading and writing it; five plug/unplug cycles leak
///    nothing.
#[test]
fn lifecycle_shared_backend_survives_unplug_of_one_user() {
    let (memory, system, sid) = machine();
    let space = memory.address_space(sid).unwrap();
    let backing = if cfg!(miri) {
        RamBacking::Anonymous
    } else {
        RamBacking::Memfd
    };
    let shm = memory.new_backend("shm", 0x1000, backing).unwrap();
    let (p, pp) = device(&memory, "ivshmem-0", None);
    let pr = memory
        .new_ram_from_backend("ivshmem-0.bar", &shm, 0, 0x1000, Some(p))
        .unwrap();
    memory.add_subregion(system, 0x40_0000, pr).unwrap();
    for round in 0..5u8 {
        let (q, pq) = device(&memory, "ivshmem-1", None);
        let qr = memory
            .new_ram_from_backend("ivshmem-1.bar", &shm, 0, 0x1000, Some(q))
            .unwrap();
        memory.add_subregion(system, 0x50_0000, qr).unwrap();
        assert!(space.write(0x50_0010, &[round; 4], A).is_ok());
        let mut buf = [0u8; 4];
        assert!(space.read(0x40_0010, &mut buf, A).is_ok());
        assert_eq!(buf, [round; 4], "written by one, read by the other");
        let report = memory.unplug(q).unwrap();
        assert!(report.outstanding.is_empty());
        assert_eq!(pq.runs(), 1);
        assert!(space.write(0x40_0020, &[round + 1; 4], A).is_ok());
        assert!(space.read(0x40_0020, &mut buf, A).is_ok());
        assert_eq!(buf, [round + 1; 4], "the survivor keeps using the memory");
        assert_eq!(live_named(&memory, "shm"), vec!["backend shm"]);
    }
    drop(shm);
    memory.unplug(p).unwrap();
    assert_eq!(pp.runs(), 1);
    let log = finalized(&memory);
    assert!(pos(&log, ObjectKind::Region, "ivshmem-0.bar") < pos(&log, ObjectKind::Backend, "shm"));
    assert_no_double_finalize(&memory);
    drop(space);
    teardown_clean(memory);
}

/// A device whose read callback parks until told to go on.
struct Parking {
    probe: Arc<Probe>,
    entered: Mutex<Option<mpsc::Sender<()>>>,
    go: Mutex<mpsc::Receiver<()>>,
}

impl MmioOps for Parking {
    fn read(&self, _addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        self.probe.touch();
        self.probe.event("callback start");
        if let Some(tx) = self.entered.lock().unwrap().take() {
            tx.send(()).unwrap();
            self.go.lock().unwrap().recv().unwrap();
        }
        // The device state is still valid here: not yet finalized.
        assert!(!self.probe.finalized.load(Ordering::SeqCst));
        self.probe.event("callback end");
        Ok(0x5a)
    }
    fn write(&self, _addr: u64, _data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        self.probe.touch();
        MemTxResult::OK
    }
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

/// 8. One thread is inside an MMIO callback while another unplugs the
///    device: the callback finishes against a live device, no access that
///    starts after unplug returns reaches it (not even through a view taken
///    before), and the device is finalized after the last access ends.
#[test]
fn lifecycle_unplug_during_callback_finalizes_after_last_access() {
    let (memory, system, sid) = machine();
    let space = memory.address_space(sid).unwrap();
    let (dev, probe) = device(&memory, "slow", None);
    let (entered_tx, entered_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    let ops = Arc::new(Parking {
        probe: probe.clone(),
        entered: Mutex::new(Some(entered_tx)),
        go: Mutex::new(go_rx),
    });
    let mmio = memory.new_mmio("slow-mmio", 0x10, ops, Some(dev)).unwrap();
    memory.add_subregion(system, 0x1000, mmio).unwrap();

    let reader = {
        let space = space.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            let r = space.read(0x1000, &mut b, A);
            (r, b[0])
        })
    };
    entered_rx.recv().unwrap();
    let old_view = space.view();
    memory.unplug(dev).unwrap();
    assert_eq!(probe.runs(), 0, "not finalized while a callback runs");
    let calls = probe.callbacks.load(Ordering::SeqCst);
    let mut b = [0u8; 1];
    assert_eq!(space.read(0x1000, &mut b, A), MemTxResult::DECODE_ERROR);
    assert_eq!(old_view.read(0x1000, &mut b, A), MemTxResult::DECODE_ERROR);
    assert_eq!(
        probe.callbacks.load(Ordering::SeqCst),
        calls,
        "no new access reached it"
    );
    drop(old_view);
    go_tx.send(()).unwrap();
    let (r, v) = reader.join().unwrap();
    assert_eq!((r, v), (MemTxResult::OK, 0x5a));
    assert_eq!(probe.runs(), 1);
    assert_eq!(
        *probe.events.lock().unwrap(),
        vec!["callback start", "callback end", "finalized"]
    );
    assert_eq!(probe.used_after_finalize.load(Ordering::SeqCst), 0);
    assert_no_double_finalize(&memory);
    drop(space);
    teardown_clean(memory);
}

/// A device that unplugs itself when its register 0 is written.
struct Ejectable {
    memory: WeakMemory,
    me: OnceLock<OwnerId>,
    probe: Arc<Probe>,
    outcome: Mutex<Option<Result<Vec<String>, TopologyError>>>,
}

impl MmioOps for Ejectable {
    fn read(&self, _addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        self.probe.touch();
        Ok(0)
    }
    fn write(&self, _addr: u64, _data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        self.probe.touch();
        let (Some(m), Some(&me)) = (self.memory.upgrade(), self.me.get()) else {
            return MemTxResult::DEVICE_ERROR;
        };
        let r = m.unplug(me).map(|r| r.owners);
        *self.outcome.lock().unwrap() = Some(r);
        // Still inside the callback: the device has not been finalized.
        assert!(!self.probe.finalized.load(Ordering::SeqCst));
        self.probe.event("callback end");
        MemTxResult::OK
    }
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

/// 9. A device that unplugs itself from inside its own callback: the unplug
///    succeeds, the callback finishes, the device is finalized once the
///    access returns.
#[test]
fn lifecycle_device_unplugs_itself_from_its_callback() {
    let (memory, system, sid) = machine();
    let space = memory.address_space(sid).unwrap();
    let (dev, probe) = device(&memory, "hotplug-self", None);
    let ops = Arc::new(Ejectable {
        memory: memory.downgrade(),
        me: OnceLock::new(),
        probe: probe.clone(),
        outcome: Mutex::new(None),
    });
    ops.me.set(dev).unwrap();
    let mmio = memory
        .new_mmio("eject", 0x4, ops.clone(), Some(dev))
        .unwrap();
    memory.add_subregion(system, 0x7000, mmio).unwrap();

    assert_eq!(space.write(0x7000, &[1], A), MemTxResult::OK);
    assert_eq!(
        *ops.outcome.lock().unwrap(),
        Some(Ok(vec!["hotplug-self".to_owned()]))
    );
    assert_eq!(probe.runs(), 1);
    assert_eq!(
        *probe.events.lock().unwrap(),
        vec!["callback end", "finalized"]
    );
    assert_eq!(
        memory.region_info(mmio).unwrap_err(),
        TopologyError::NoSuchRegion(mmio)
    );
    let mut b = [0u8; 1];
    assert_eq!(space.read(0x7000, &mut b, A), MemTxResult::DECODE_ERROR);
    assert_no_double_finalize(&memory);
    drop(ops);
    drop(space);
    teardown_clean(memory);
}

/// 10. Misuse returns errors: a region in two containers, a region inside
///     itself, alias loops, stale ids after the owner is gone, bad DMA
///     requests. (Unmapping twice does not compile: see the `compile_fail`
///     example in `memtree::dma::mapping`.)
#[test]
fn lifecycle_misuse_returns_errors() {
    let (memory, system, sid) = machine();
    let space = memory.address_space(sid).unwrap();
    let c1 = memory.new_container("c1", 0x10000, None).unwrap();
    let c2 = memory.new_container("c2", 0x10000, None).unwrap();
    let r = memory.new_ram("r", 0x1000, None).unwrap();
    memory.add_subregion(c1, 0, r).unwrap();
    assert!(matches!(
        memory.add_subregion(c2, 0, r),
        Err(TopologyError::AlreadyInContainer { .. })
    ));
    assert!(matches!(
        memory.add_subregion(c1, 0, c1),
        Err(TopologyError::Loop { .. })
    ));
    memory.add_subregion(c2, 0, c1).unwrap();
    assert!(matches!(
        memory.add_subregion(c1, 0, c2),
        Err(TopologyError::Loop { .. })
    ));
    let alias = memory.new_alias("a", c1, 0, 0x1000, None).unwrap();
    assert!(matches!(
        memory.add_subregion(c1, 0x2000, alias),
        Err(TopologyError::Loop { .. })
    ));
    assert!(matches!(
        memory.add_subregion(alias, 0, r),
        Err(TopologyError::AliasCannotContain(_))
    ));
    assert!(matches!(
        memory.destroy_region(r),
        Err(TopologyError::InUse { .. })
    ));

    let (dev, _p) = device(&memory, "gone", None);
    let dr = memory.new_ram("gone-ram", 0x1000, Some(dev)).unwrap();
    memory.unplug(dev).unwrap();
    assert_eq!(
        memory.region_info(dr).unwrap_err(),
        TopologyError::NoSuchRegion(dr)
    );
    assert_eq!(
        memory.add_subregion(system, 0, dr).unwrap_err(),
        TopologyError::NoSuchRegion(dr)
    );
    assert_eq!(
        memory.destroy_region(dr).unwrap_err(),
        TopologyError::NoSuchRegion(dr)
    );
    assert_eq!(
        memory.set_enabled(dr, false).unwrap_err(),
        TopologyError::NoSuchRegion(dr)
    );
    assert_eq!(
        memory.unplug(dev).unwrap_err(),
        TopologyError::NoSuchOwner(dev)
    );
    assert!(memory.new_ram("late", 0x1000, Some(dev)).is_err());

    // Memory allocated by another machine is refused: its drop would not
    // consult this machine's mapping table.
    let other = Memory::new();
    let foreign = other
        .new_backend("elsewhere", 0x1000, RamBacking::Anonymous)
        .unwrap();
    assert_eq!(
        memory
            .new_ram_from_backend("borrowed", &foreign, 0, 0x1000, None)
            .unwrap_err(),
        TopologyError::ForeignBackend {
            region: "borrowed".into(),
            backend: "elsewhere".into()
        }
    );
    drop(foreign);
    assert!(other.teardown().is_clean());

    memory.add_subregion(system, 0, c2).unwrap();
    let d = DmaDirection::ToDevice;
    assert_eq!(space.map(0, 0, d, A).unwrap_err(), DmaError::ZeroLength);
    assert_eq!(
        space.map(u64::MAX, 2, d, A).unwrap_err(),
        DmaError::OutOfRange {
            addr: u64::MAX,
            len: 2
        }
    );
    assert!(matches!(
        space.map(0x9000_0000, 1, d, A),
        Err(DmaError::Unassigned { .. })
    ));
    let mut m = space.map(0, 0x10, d, A).unwrap();
    assert_eq!(m.write(0, &[1]).unwrap_err(), DmaError::WrongDirection(d));
    let mut buf = [0u8; 4];
    assert_eq!(
        m.read(0xe, &mut buf).unwrap_err(),
        DmaError::OutOfBounds {
            offset: 0xe,
            len: 4,
            size: 0x10
        }
    );
    assert!(m.read(u64::MAX, &mut buf).is_err());
    drop(m);
    assert_no_double_finalize(&memory);
    drop(space);
    teardown_clean(memory);
}

// ---------------------------------------------------------------------------
// DMA details: extension, bounce limits, map clients, reference counting
// ---------------------------------------------------------------------------

/// Mapping RAM never touches the backend's reference count. RAM with or
/// without an owner records one table entry, which pins the memory (it is
/// explained by the census and listed as outstanding).
#[test]
fn dma_ram_mappings_cost_no_reference_count() {
    let (memory, system, sid) = machine();
    let space = memory.address_space(sid).unwrap();
    let b = memory
        .new_backend("pc.ram", 0x10000, RamBacking::Anonymous)
        .unwrap();
    let r = memory
        .new_ram_from_backend("pc.ram", &b, 0, 0x10000, None)
        .unwrap();
    memory.add_subregion(system, 0, r).unwrap();
    let before = Arc::strong_count(&b);
    let m = space
        .map(0x100, 0x100, DmaDirection::Bidirectional, A)
        .unwrap();
    assert_eq!(Arc::strong_count(&b), before);
    assert!(m.holds_reference() && m.id().is_some());
    assert_eq!(m.memory_key(), Some(b.census_key()));
    assert_eq!(space.outstanding_mappings().len(), 1);
    drop(m);
    assert!(space.outstanding_mappings().is_empty());
    assert_eq!(Arc::strong_count(&b), before);

    let (dev, _p) = device(&memory, "dev", None);
    let ob = memory
        .new_backend("dev.ram", 0x1000, RamBacking::Anonymous)
        .unwrap();
    let or = memory
        .new_ram_from_backend("dev.ram", &ob, 0, 0x1000, Some(dev))
        .unwrap();
    memory.add_subregion(system, 0x10_0000, or).unwrap();
    let before = Arc::strong_count(&ob);
    let m = space
        .map(0x10_0000, 0x10, DmaDirection::ToDevice, A)
        .unwrap();
    assert_eq!(Arc::strong_count(&ob), before);
    assert_eq!(m.memory_key(), Some(ob.census_key()));
    let out = space.outstanding_mappings();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].label, "dma memory 0x100000+0x10 to-device");
    assert_eq!(out[0].holds, ob.census_key());
    drop(m);
    assert_eq!(Arc::strong_count(&ob), before);
    assert!(space.outstanding_mappings().is_empty());
    drop((b, ob, space));
    teardown_clean(memory);
}

/// A direct mapping extends across flat ranges of the same region that are
/// contiguous, and stops where the region changes.
#[test]
fn dma_direct_mapping_extends_across_ranges_of_one_region() {
    let (memory, system, sid) = machine();
    let space = memory.address_space(sid).unwrap();
    let ram = memory.new_ram("ram", 0x4000, None).unwrap();
    memory.add_subregion(system, 0, ram).unwrap();
    // A readonly alias of the same RAM over its middle page splits the view
    // into three ranges of the same region with contiguous offsets.
    let ro = memory.new_alias("ro", ram, 0x1000, 0x1000, None).unwrap();
    memory.set_readonly(ro, true).unwrap();
    memory.add_subregion_overlap(system, 0x1000, ro, 1).unwrap();
    assert_eq!(space.view().ranges().len(), 3);
    let m = space.map(0, 0x4000, DmaDirection::ToDevice, A).unwrap();
    assert_eq!(m.len(), 0x4000, "reads are direct everywhere");
    drop(m);
    // Another region after the RAM ends the mapping.
    let other = memory.new_ram("other", 0x1000, None).unwrap();
    memory.add_subregion(system, 0x4000, other).unwrap();
    let m = space
        .map(0x3000, 0x2000, DmaDirection::ToDevice, A)
        .unwrap();
    assert_eq!(m.len(), 0x1000);
    drop(m);
    drop(space);
    teardown_clean(memory);
}

/// Bounce buffers: per-address-space limit, partial reservation, write-back
/// of `access_len` bytes at unmap, one-shot map clients told when space
/// frees.
#[test]
fn dma_bounce_limit_and_map_clients() {
    let (memory, system, sid) = machine();
    let space = memory.address_space(sid).unwrap();
    let (dev, probe) = device(&memory, "mmio-dev", None);
    let mmio = memory
        .new_mmio(
            "big-mmio",
            0x4000,
            Arc::new(Regs {
                probe: probe.clone(),
            }),
            Some(dev),
        )
        .unwrap();
    memory.add_subregion(system, 0x1_0000, mmio).unwrap();
    assert_eq!(space.max_bounce_buffer_size(), 4096);

    let m1 = space
        .map(0x1_0000, 0x3000, DmaDirection::FromDevice, A)
        .unwrap();
    assert_eq!(m1.len(), 4096, "clamped to the free bounce space");
    let err = space
        .map(0x1_0000, 4, DmaDirection::ToDevice, A)
        .unwrap_err();
    assert!(
        matches!(
            err,
            DmaError::NoBounceSpace {
                in_use: 4096,
                limit: 4096,
                ..
            }
        ),
        "{err}"
    );

    let fired = Arc::new(AtomicUsize::new(0));
    let f = fired.clone();
    let client = space.register_map_client(move || {
        f.fetch_add(1, Ordering::SeqCst);
    });
    assert_eq!(fired.load(Ordering::SeqCst), 0);
    let writes = probe.callbacks.load(Ordering::SeqCst);
    // Write back only 8 bytes: the device sees 8 bytes of writes (4-byte
    // implementation size: two callbacks).
    assert_eq!(m1.unmap(8), MemTxResult::OK);
    assert_eq!(probe.callbacks.load(Ordering::SeqCst), writes + 2);
    assert_eq!(
        fired.load(Ordering::SeqCst),
        1,
        "told once when space freed"
    );
    assert!(!space.unregister_map_client(client), "one-shot");
    let m2 = space.map(0x1_0000, 4, DmaDirection::ToDevice, A).unwrap();
    drop(m2);
    assert_eq!(fired.load(Ordering::SeqCst), 1);

    // With room, a client runs at once; an unregistered one never runs.
    space.register_map_client({
        let f = fired.clone();
        move || {
            f.fetch_add(10, Ordering::SeqCst);
        }
    });
    assert_eq!(fired.load(Ordering::SeqCst), 11);
    space.set_max_bounce_buffer_size(8);
    let m3 = space.map(0x1_0000, 8, DmaDirection::ToDevice, A).unwrap();
    let id = space.register_map_client(|| panic!("unregistered client ran"));
    assert!(space.unregister_map_client(id));
    drop(m3);
    assert_eq!(space.bounce_in_use(), 0);
    drop(space);
    teardown_clean(memory);
}

/// ROM mapped for writing bounces (writes cannot go straight to ROM) and the
/// write-back is dropped; ROM mapped for reading is direct.
#[test]
fn dma_rom_is_direct_for_reads_and_bounced_for_writes() {
    let (memory, system, sid) = machine();
    let space = memory.address_space(sid).unwrap();
    let rom = memory.new_rom("bios", 0x1000, None).unwrap();
    memory.add_subregion(system, 0xf000, rom).unwrap();
    assert!(!space
        .map(0xf000, 0x10, DmaDirection::ToDevice, A)
        .unwrap()
        .is_bounce());
    let mut m = space
        .map(0xf000, 0x10, DmaDirection::FromDevice, A)
        .unwrap();
    assert!(m.is_bounce());
    m.write(0, &[0xff; 0x10]).unwrap();
    assert_eq!(m.unmap(0x10), MemTxResult::DECODE_ERROR);
    let mut b = [1u8; 0x10];
    assert!(space.read(0xf000, &mut b, A).is_ok());
    assert_eq!(b, [0; 0x10], "ROM unchanged");
    drop(space);
    teardown_clean(memory);
}

// ---------------------------------------------------------------------------
// Caches and sections
// ---------------------------------------------------------------------------

/// A cache of a device's RAM holds only the memory: the device finalizes at
/// unplug, the cache keeps working until dropped; refresh re-resolves.
#[test]
fn cache_of_owned_ram_holds_memory_not_device() {
    use memtree::dma::cache::MemoryRegionCache;
    let (memory, system, sid) = machine();
    let space = memory.address_space(sid).unwrap();
    let (dev, probe) = device(&memory, "virtio", None);
    let ram = memory.new_ram("virtio-ring", 0x1000, Some(dev)).unwrap();
    memory.add_subregion(system, 0x6000, ram).unwrap();
    let cache = MemoryRegionCache::new(&space, 0x6000, 0x100, DmaDirection::Bidirectional).unwrap();
    assert!(cache.is_direct());
    assert_eq!(cache.len(), 0x100);
    cache.store(0x10, 0xdead_beef_u32.to_le_bytes()).unwrap();
    let mut b = [0u8; 4];
    assert!(space.read(0x6010, &mut b, A).is_ok());
    assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
    assert!(cache.read(0xfe, &mut b).is_err());

    let report = memory.unplug(dev).unwrap();
    assert!(
        report
            .outstanding
            .iter()
            .any(|l| l.contains("cache memory 0x6000+0x100")),
        "{report:?}"
    );
    assert_eq!(probe.runs(), 1);
    assert_eq!(
        u32::from_le_bytes(cache.load::<4>(0x10).unwrap()),
        0xdead_beef
    );
    drop(cache);
    assert!(live_named(&memory, "virtio-ring").is_empty());

    // Non-direct caches go through the address space and never pin.
    let (dev2, probe2) = device(&memory, "regs", None);
    let mmio = memory
        .new_mmio(
            "regs-mmio",
            0x10,
            Arc::new(Regs {
                probe: probe2.clone(),
            }),
            Some(dev2),
        )
        .unwrap();
    memory.add_subregion(system, 0x7000, mmio).unwrap();
    let mut cache = MemoryRegionCache::new(&space, 0x7000, 0x10, DmaDirection::ToDevice).unwrap();
    assert!(!cache.is_direct());
    assert_eq!(u32::from_le_bytes(cache.load::<4>(4).unwrap()), 0xd0d0_0004);
    assert_eq!(
        cache.store(0, [0; 4]).unwrap_err(),
        DmaError::WrongDirection(DmaDirection::ToDevice)
    );
    memory.unplug(dev2).unwrap();
    assert_eq!(
        probe2.runs(),
        1,
        "a non-direct cache does not pin the device"
    );
    assert!(matches!(cache.load::<4>(4), Err(DmaError::Transaction(_))));
    assert!(matches!(cache.refresh(), Err(DmaError::Unassigned { .. })));
    drop((cache, space));
    teardown_clean(memory);
}

/// `find` returns a section that keeps its region (and device) alive.
#[test]
fn find_section_keeps_region_alive() {
    let (memory, system, sid) = machine();
    let space = memory.address_space(sid).unwrap();
    let (dev, probe) = device(&memory, "uart", None);
    let mmio = memory
        .new_mmio(
            "uart-mmio",
            0x100,
            Arc::new(Regs {
                probe: probe.clone(),
            }),
            Some(dev),
        )
        .unwrap();
    memory.add_subregion(system, 0x3f8, mmio).unwrap();
    let s = space.find(0x3fa, 0x1000).unwrap();
    assert_eq!(s.region().name(), "uart-mmio");
    assert_eq!(s.offset_within_region(), 2);
    assert_eq!(s.offset_within_address_space(), 0x3fa);
    assert_eq!(s.size(), 0xfe);
    assert!(space.find(0x3fa, 0).is_none());
    assert!(space.find(0x9000_0000, 1).is_none());
    let report = memory.unplug(dev).unwrap();
    assert!(
        report.outstanding[0].contains("section memory 0x3fa+0xfe"),
        "{report:?}"
    );
    assert_eq!(probe.runs(), 0);
    assert!(!s.region().is_live(), "held but unplugged");
    drop(s);
    assert_eq!(probe.runs(), 1);
    drop(space);
    teardown_clean(memory);
}

// ---------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------

/// A mapping still out at teardown is named in the leak report, and the
/// memory it holds is explained by it; the DOT export shows the edge.
#[test]
fn diag_leak_report_names_outstanding_mapping() {
    let (memory, system, sid) = machine();
    let space = memory.address_space(sid).unwrap();
    let (dev, _p) = device(&memory, "nvme", None);
    let ram = memory.new_ram("nvme-cmb", 0x1000, Some(dev)).unwrap();
    memory.add_subregion(system, 0x9000, ram).unwrap();
    let m = space.map(0x9000, 0x200, DmaDirection::ToDevice, A).unwrap();
    let mkey = m.census_key().unwrap();
    let census = memory.census().clone();
    let report = diag::report(&census);
    assert_eq!(report.count(ObjectKind::Mapping), 1);
    assert!(
        report
            .to_string()
            .contains("\"dma memory 0x9000+0x200 to-device\""),
        "{report}"
    );
    let dot = diag::to_dot(&census);
    let backend_key = m.memory_key().unwrap();
    let edge = format!(
        "n{} -> n{};",
        mkey.to_string().trim_start_matches('#'),
        backend_key.to_string().trim_start_matches('#')
    );
    assert!(dot.contains(&edge), "{dot}");

    let leaks = memory.teardown();
    assert!(!leaks.is_clean());
    let text = leaks.to_string();
    assert!(
        text.contains(&format!(
            "held by mapping {mkey} \"dma memory 0x9000+0x200 to-device\" -> backend"
        )),
        "{text}"
    );
    assert_eq!(
        diag::why_alive(&census, backend_key),
        vec![format!("held by mapping {mkey} -> memory nvme-cmb")]
    );
    drop(m);
    drop(space);
    assert!(
        diag::leak_report(&census).is_clean(),
        "{}",
        diag::leak_report(&census)
    );
    assert!(census.double_finalized().is_empty());
}
