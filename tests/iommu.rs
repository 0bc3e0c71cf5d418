//! IOMMU regions (issue 10): each test names the rule it checks.

#[path = "../examples/iommu_pagetable.rs"]
mod pagetable;

use std::sync::Arc;

use memtree::access::iommu::{
    Iommu, IommuError, IommuHub, IommuNotifier, IommuPerm, IotlbEntry, IotlbEvent, IotlbEventKind,
    NotifierFlags, WeakAddressSpace,
};
use memtree::qemu_text::print::{print_tree, TreeOptions};
use memtree::{AddressSpace, Endian, MemTxAttrs, MemTxResult, Memory};
use pagetable::{setup, TABLE_BASE};
use parking_lot::Mutex;

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

/// An IOMMU adding a fixed offset to 4 KiB pages below `limit`, with
/// `perm`, into `target`; it can refuse notifier flags.
struct OffsetIommu {
    target: Mutex<Option<WeakAddressSpace>>,
    offset: u64,
    limit: u64,
    perm: IommuPerm,
    refuse: NotifierFlags,
    flag_log: Mutex<Vec<(NotifierFlags, NotifierFlags)>>,
    indexes: u32,
}

impl OffsetIommu {
    fn new(offset: u64, limit: u64, perm: IommuPerm) -> Arc<OffsetIommu> {
        Arc::new(OffsetIommu {
            target: Mutex::new(None),
            offset,
            limit,
            perm,
            refuse: NotifierFlags::NONE,
            flag_log: Mutex::new(Vec::new()),
            indexes: 2,
        })
    }
    fn set_target(&self, t: &AddressSpace) {
        *self.target.lock() = Some(t.downgrade());
    }
}

impl Iommu for OffsetIommu {
    fn translate(&self, addr: u64, _access: IommuPerm, idx: u32) -> IotlbEntry {
        let target = self.target.lock().as_ref().and_then(|t| t.upgrade());
        if addr >= self.limit || target.is_none() {
            return IotlbEntry::denied(addr, 0xfff);
        }
        IotlbEntry {
            target,
            iova: addr & !0xfff,
            // Index 1 is a second context translating 1 MiB further.
            translated_addr: (addr & !0xfff) + self.offset + u64::from(idx) * 0x10_0000,
            addr_mask: 0xfff,
            perm: self.perm,
        }
    }
    fn attrs_to_index(&self, attrs: MemTxAttrs) -> u32 {
        u32::from(attrs.secure)
    }
    fn num_indexes(&self) -> u32 {
        self.indexes
    }
    fn notify_flag_changed(
        &self,
        old: NotifierFlags,
        new: NotifierFlags,
        _idx: u32,
    ) -> Result<(), String> {
        if new.intersects(self.refuse) {
            return Err(format!("cannot serve flags {:#x}", new.0));
        }
        self.flag_log.lock().push((old, new));
        Ok(())
    }
}

/// System memory with 16 MiB of RAM; returns (memory, root, system AS).
fn system() -> (Memory, memtree::RegionId, AddressSpace) {
    let memory = Memory::new();
    let root = memory.new_container("memory", 1 << 64, None).unwrap();
    let ram = memory.new_ram("ram", 16 << 20, None).unwrap();
    memory.add_subregion(root, 0, ram).unwrap();
    let id = memory.new_address_space("memory", root, None).unwrap();
    let sys = memory.address_space(id).unwrap();
    (memory, root, sys)
}

/// An address space rooted at a fresh IOMMU region of `dev`.
fn iommu_space(
    memory: &Memory,
    name: &str,
    dev: Arc<OffsetIommu>,
) -> (AddressSpace, Arc<IommuHub>) {
    let hub = IommuHub::new();
    let r = memory
        .new_iommu(&format!("{name}-iommu"), 1 << 64, dev, hub.clone(), None)
        .unwrap();
    let id = memory.new_address_space(name, r, None).unwrap();
    (memory.address_space(id).unwrap(), hub)
}

fn recorder() -> (
    Arc<Mutex<Vec<IotlbEvent>>>,
    Arc<memtree::access::iommu::NotifyFn>,
) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    (
        log,
        Arc::new(move |e: &IotlbEvent| l.lock().push(e.clone())),
    )
}

/// Rule: an IOMMU region prints as QEMU 7.2 prints intel-iommu's per-device
/// layout (`info mtree -D`, type `i/o`, the disabled DMAR region included).
#[test]
fn print_matches_q35_intel_iommu_disabled_dump() {
    let dump = std::fs::read_to_string("tests/data/oracle/variants/q35-intel-iommu.disabled.txt")
        .expect("oracle dump");
    let want: String = dump.split("\n\n").next().unwrap().to_owned() + "\n";

    let (memory, root, _sys) = system();
    let nodmar = memory.new_container("vtd-nodmar", 1 << 64, None).unwrap();
    let sys_alias = memory
        .new_alias("vtd-sys-alias", root, 0, 1 << 64, None)
        .unwrap();
    memory
        .add_subregion_overlap(nodmar, 0, sys_alias, 0)
        .unwrap();
    let ir = memory.new_reservation("vtd-ir", 0x10_0000, None).unwrap();
    memory
        .add_subregion_overlap(nodmar, 0xfee0_0000, ir, 1)
        .unwrap();

    let dev_root = memory.new_container("vtd-01.0", 1 << 64, None).unwrap();
    let dev = OffsetIommu::new(0, 1 << 30, IommuPerm::ReadWrite);
    let hub = IommuHub::new();
    let dmar = memory
        .new_iommu("vtd-01.0-dmar", 1 << 64, dev, hub, None)
        .unwrap();
    let ir_alias = memory.new_alias("vtd-ir", ir, 0, 0x10_0000, None).unwrap();
    memory
        .add_subregion_overlap(dmar, 0xfee0_0000, ir_alias, 1)
        .unwrap();
    let no_ir = memory
        .new_reservation("vtd-no-ir", 0x10_0000, None)
        .unwrap();
    let nodmar_alias = memory
        .new_alias("vtd-nodmar", nodmar, 0, 1 << 64, None)
        .unwrap();
    memory.add_subregion_overlap(dev_root, 0, dmar, 0).unwrap();
    memory
        .add_subregion_overlap(dev_root, 0xfee0_0000, no_ir, 2)
        .unwrap();
    memory
        .add_subregion_overlap(dev_root, 0, nodmar_alias, 0)
        .unwrap();
    memory.set_enabled(dmar, false).unwrap();
    memory.set_enabled(no_ir, false).unwrap();
    let sys_id = memory.address_space(
        memory
            .new_address_space("vtd-root", dev_root, None)
            .unwrap(),
    );
    assert!(sys_id.is_ok());

    let mut out = String::new();
    print_tree(
        &memory,
        &mut out,
        TreeOptions {
            disabled: true,
            owners: false,
        },
    )
    .unwrap();
    let got = out
        .split("\n\n")
        .find(|b| b.starts_with("address-space: vtd-root"))
        .unwrap()
        .to_owned()
        + "\n";
    assert_eq!(got, want);

    // Switched to translated (the guest enabled DMAR), the IOMMU region
    // prints like MMIO, and accesses go through it.
    memory.transaction(|m| {
        m.set_enabled(dmar, true).unwrap();
        m.set_enabled(nodmar_alias, false).unwrap();
    });
    let mut out = String::new();
    print_tree(&memory, &mut out, TreeOptions::default()).unwrap();
    assert!(out.contains("  0000000000000000-ffffffffffffffff (prio 0, i/o): vtd-01.0-dmar\n"));
}

/// Rule: every permission — RW allows both, R only reads, W only writes,
/// None nothing; denied pieces are decode errors reading zeros.
#[test]
fn translation_obeys_every_permission() {
    let s = setup(12, 64);
    s.system
        .store::<u32>(0x20_0000, 0x1111_1111, Endian::Little, A)
        .into_result()
        .unwrap();
    s.system
        .store::<u32>(0x21_0000, 0x2222_2222, Endian::Little, A)
        .into_result()
        .unwrap();
    s.system
        .store::<u32>(0x22_0000, 0x3333_3333, Endian::Little, A)
        .into_result()
        .unwrap();
    s.system
        .store::<u32>(0x23_0000, 0x4444_4444, Endian::Little, A)
        .into_result()
        .unwrap();
    s.map(0, 0x20_0000, IommuPerm::ReadWrite);
    s.map(1, 0x21_0000, IommuPerm::Read);
    s.map(2, 0x22_0000, IommuPerm::Write);
    s.map(3, 0x23_0000, IommuPerm::None);
    let rd = |a| s.dma.load::<u32>(a, Endian::Little, A);
    assert_eq!(rd(0x0), (0x1111_1111, MemTxResult::OK));
    assert_eq!(rd(0x1000), (0x2222_2222, MemTxResult::OK));
    assert_eq!(rd(0x2000), (0, MemTxResult::DECODE_ERROR));
    assert_eq!(rd(0x3000), (0, MemTxResult::DECODE_ERROR));
    let wr = |a, v| s.dma.store::<u32>(a, v, Endian::Little, A);
    assert!(wr(0x0, 0xa).is_ok());
    assert_eq!(wr(0x1000, 0xb), MemTxResult::DECODE_ERROR);
    assert!(wr(0x2000, 0xc).is_ok());
    assert_eq!(wr(0x3000, 0xd), MemTxResult::DECODE_ERROR);
    let sys = |a| s.system.load::<u32>(a, Endian::Little, A).0;
    assert_eq!(sys(0x20_0000), 0xa);
    assert_eq!(sys(0x21_0000), 0x2222_2222);
    assert_eq!(sys(0x22_0000), 0xc);
    assert_eq!(sys(0x23_0000), 0x4444_4444);
    // Outside the table: denied, no panic.
    assert_eq!(rd(0x100_0000), (0, MemTxResult::DECODE_ERROR));
    assert_eq!(rd(u64::MAX - 3), (0, MemTxResult::DECODE_ERROR));
}

/// Rule: pages of 4 KiB, 2 MiB and 1 GiB translate the offset inside the
/// page; the entry reports the page mask.
#[test]
fn page_sizes_from_4k_to_1g() {
    for shift in [12u32, 16, 21, 30] {
        let s = setup(shift, 4);
        let page = 1u64 << shift;
        // IOVA page 1 -> output 0 (all pages output-aligned at 0).
        s.map(1, 0, IommuPerm::ReadWrite);
        let off = 0xabc8u64 & (page - 1);
        s.system
            .store::<u32>(off, 0x5a5a_0000 | shift, Endian::Little, A)
            .into_result()
            .unwrap();
        let (v, r) = s.dma.load::<u32>(page + off, Endian::Little, A);
        assert!(r.is_ok(), "shift {shift}");
        assert_eq!(v, 0x5a5a_0000 | shift);
        let e = s.device.translate(page + off, IommuPerm::Read, 0);
        assert_eq!(e.addr_mask, page - 1);
        assert_eq!(e.iova, page);
        // Page 0 is unmapped: the whole page is denied.
        assert_eq!(
            s.dma.load::<u32>(page - 4, Endian::Little, A).1,
            MemTxResult::DECODE_ERROR
        );
    }
}

/// Rule: accesses crossing a translation boundary are split there; each
/// piece goes to its own translation, a denied piece fails alone.
#[test]
fn accesses_split_at_translation_boundaries() {
    let s = setup(12, 16);
    s.map(1, 0x30_0000, IommuPerm::ReadWrite);
    s.map(2, 0x50_0000, IommuPerm::ReadWrite);
    let data: Vec<u8> = (0..32u8).collect();
    // 16 bytes before and 16 after the 0x2000 boundary.
    assert!(s.dma.write(0x1ff0, &data, A).is_ok());
    let mut back = [0u8; 16];
    s.system
        .read(0x30_0ff0, &mut back, A)
        .into_result()
        .unwrap();
    assert_eq!(&back[..], &data[..16]);
    s.system
        .read(0x50_0000, &mut back, A)
        .into_result()
        .unwrap();
    assert_eq!(&back[..], &data[16..]);
    let mut all = [0u8; 32];
    assert!(s.dma.read(0x1ff0, &mut all, A).is_ok());
    assert_eq!(&all[..], &data[..]);
    // A typed access straddling the boundary is split and reassembled.
    let (v, r) = s.dma.load::<u32>(0x1ffe, Endian::Little, A);
    assert!(r.is_ok());
    assert_eq!(v, u32::from_le_bytes([14, 15, 16, 17]));
    let (v, _) = s.dma.load::<u32>(0x1ffe, Endian::Big, A);
    assert_eq!(v, u32::from_be_bytes([14, 15, 16, 17]));
    assert!(s
        .dma
        .store::<u32>(0x1ffe, 0xa1b2_c3d4, Endian::Big, A)
        .is_ok());
    assert_eq!(s.system.load::<u16>(0x30_0ffe, Endian::Big, A).0, 0xa1b2);
    assert_eq!(s.system.load::<u16>(0x50_0000, Endian::Big, A).0, 0xc3d4);
    // Page 3 unmapped: the second piece fails, the first still lands.
    let mut buf = [0xffu8; 8];
    let r = s.dma.read(0x2ffc, &mut buf, A);
    assert_eq!(r, MemTxResult::DECODE_ERROR);
    assert_eq!(&buf[4..], &[0, 0, 0, 0]);
    assert_eq!(buf[0], s.system.load::<u8>(0x50_0ffc, Endian::Little, A).0);
}

/// Rule: chains — an IOMMU whose target contains another IOMMU translates
/// twice; a loop of IOMMUs is a decode error, not a hang or a crash.
#[test]
fn chain_of_two_iommus_and_a_loop() {
    let (memory, _root, sys) = system();
    let inner = OffsetIommu::new(0x10_0000, 1 << 32, IommuPerm::ReadWrite);
    inner.set_target(&sys);
    let (mid, _) = iommu_space(&memory, "mid", inner);
    let outer = OffsetIommu::new(0x1000, 1 << 32, IommuPerm::ReadWrite);
    outer.set_target(&mid);
    let (dev, _) = iommu_space(&memory, "dev", outer);
    assert!(dev.store::<u32>(0x40, 77, Endian::Little, A).is_ok());
    assert_eq!(sys.load::<u32>(0x10_1040, Endian::Little, A).0, 77);
    let mut b = [0u8; 4];
    assert!(dev.read(0x40, &mut b, A).is_ok());
    assert_eq!(u32::from_le_bytes(b), 77);

    // A loop: an IOMMU translating into its own address space.
    let looping = OffsetIommu::new(0, 1 << 32, IommuPerm::ReadWrite);
    let (lp, _) = iommu_space(&memory, "loop", looping.clone());
    looping.set_target(&lp);
    assert_eq!(
        lp.load::<u32>(0x40, Endian::Little, A).1,
        MemTxResult::DECODE_ERROR
    );
    assert_eq!(lp.read(0x40, &mut b, A), MemTxResult::DECODE_ERROR);
    // The loop (the device's weak handle aside) is broken at teardown.
    drop((lp, dev, mid, sys));
    let report = memory.teardown();
    assert!(report.is_clean(), "{report}");
}

/// Rule: attributes choose the translation context (attrs_to_index).
#[test]
fn attrs_choose_the_iommu_index() {
    let (memory, _root, sys) = system();
    let d = OffsetIommu::new(0x10_0000, 1 << 32, IommuPerm::ReadWrite);
    d.set_target(&sys);
    let (dev, _) = iommu_space(&memory, "dev", d);
    sys.store::<u32>(0x10_0000, 1, Endian::Little, A)
        .into_result()
        .unwrap();
    sys.store::<u32>(0x20_0000, 2, Endian::Little, A)
        .into_result()
        .unwrap();
    let secure = MemTxAttrs { secure: true, ..A };
    assert_eq!(dev.load::<u32>(0, Endian::Little, A).0, 1);
    assert_eq!(dev.load::<u32>(0, Endian::Little, secure).0, 2);
    // Cached per index: repeating the plain access still reads context 0.
    assert_eq!(dev.load::<u32>(0, Endian::Little, A).0, 1);
}

/// Rule: notifiers get only events of their flags and index, cropped to
/// their range; UNMAP events must carry no permissions.
#[test]
fn notifier_cropping_and_flags() {
    let s = setup(21, 8); // 2 MiB pages
    let hub = s.device.hub().clone();
    let (maps, f_maps) = recorder();
    let (unmaps, f_unmaps) = recorder();
    let (dev_iotlb, f_dev) = recorder();
    hub.register_notifier(IommuNotifier {
        flags: NotifierFlags::MAP,
        start: 0x20_1000,
        last: 0x20_1fff,
        iommu_idx: 0,
        notify: f_maps,
    })
    .unwrap();
    hub.register_notifier(IommuNotifier {
        flags: NotifierFlags::UNMAP,
        start: 0,
        last: u64::MAX,
        iommu_idx: 0,
        notify: f_unmaps,
    })
    .unwrap();
    hub.register_notifier(IommuNotifier {
        flags: NotifierFlags::DEVIOTLB_UNMAP,
        start: 0,
        last: u64::MAX,
        iommu_idx: 0,
        notify: f_dev,
    })
    .unwrap();
    s.map(1, 0x40_0000, IommuPerm::Read); // page 1 = 0x20_0000..0x3f_ffff
    s.map(3, 0x60_0000, IommuPerm::Read); // outside the MAP notifier's range
    let maps = maps.lock().clone();
    assert_eq!(maps.len(), 1, "{maps:?}");
    let e = &maps[0].entry;
    assert_eq!(maps[0].kind, IotlbEventKind::Map);
    assert_eq!((e.iova, e.addr_mask), (0x20_1000, 0xfff));
    assert_eq!(e.translated_addr, 0x40_1000);
    assert_eq!(unmaps.lock().len(), 2);
    assert!(unmaps
        .lock()
        .iter()
        .all(|e| e.kind == IotlbEventKind::Unmap));
    assert!(dev_iotlb.lock().is_empty());
    let dev_ev = IotlbEvent {
        kind: IotlbEventKind::DevIotlbUnmap,
        entry: IotlbEntry::denied(0, 0xfff),
    };
    assert_eq!(hub.notify(0, &dev_ev), Ok(1));
    assert_eq!(dev_iotlb.lock().len(), 1);
    // Another index: nobody listens there.
    assert_eq!(hub.notify(1, &dev_ev), Ok(0));
    let bad = IotlbEvent {
        kind: IotlbEventKind::Unmap,
        entry: IotlbEntry {
            perm: IommuPerm::Read,
            ..IotlbEntry::denied(0, 0xfff)
        },
    };
    assert_eq!(hub.notify(0, &bad), Err(IommuError::UnmapWithPermissions));
    // A panicking notifier is reported; the others still run.
    hub.register_notifier(IommuNotifier {
        flags: NotifierFlags::DEVIOTLB_UNMAP,
        start: 0,
        last: u64::MAX,
        iommu_idx: 0,
        notify: Arc::new(|_| panic!("notifier bug")),
    })
    .unwrap();
    assert!(matches!(
        hub.notify(0, &dev_ev),
        Err(IommuError::Panicked(_))
    ));
    assert_eq!(dev_iotlb.lock().len(), 2);
}

/// Rule: replay walks current mappings as MAP events, through the device's
/// walker or, without one, at the minimum page size.
#[test]
fn replay_walks_current_mappings() {
    let s = setup(12, 32);
    s.map(2, 0x30_0000, IommuPerm::Read);
    s.map(5, 0x31_0000, IommuPerm::ReadWrite);
    s.map(30, 0x32_0000, IommuPerm::Write);
    let (log, f) = recorder();
    let n = IommuNotifier {
        flags: NotifierFlags::MAP,
        start: 0,
        last: 0x5fff,
        iommu_idx: 0,
        notify: f,
    };
    assert_eq!(s.device.hub().replay(&n), Ok(2));
    let got: Vec<(u64, u64, IommuPerm)> = log
        .lock()
        .iter()
        .map(|e| (e.entry.iova, e.entry.translated_addr, e.entry.perm))
        .collect();
    assert_eq!(
        got,
        vec![
            (0x2000, 0x30_0000, IommuPerm::Read),
            (0x5000, 0x31_0000, IommuPerm::ReadWrite)
        ]
    );

    // Default walker (OffsetIommu has none): one entry per 4 KiB step.
    let (memory, _root, sys) = system();
    let d = OffsetIommu::new(0x1000, 0x4000, IommuPerm::Read);
    d.set_target(&sys);
    let (_dev, hub) = iommu_space(&memory, "dev", d);
    let (log, f) = recorder();
    let n = IommuNotifier {
        flags: NotifierFlags::MAP,
        start: 0,
        last: 0x7fff,
        iommu_idx: 0,
        notify: f,
    };
    assert_eq!(hub.replay(&n), Ok(4));
    assert_eq!(log.lock()[3].entry.iova, 0x3000);
    // The whole 2^64 space at 4 KiB: refused instead of walked for hours;
    // the page-table device's own walker serves it.
    let whole = IommuNotifier {
        last: u64::MAX,
        ..n.clone()
    };
    assert!(matches!(
        hub.replay(&whole),
        Err(IommuError::ReplayTooLong { steps }) if steps == 1 << 52
    ));
    let (log2, f2) = recorder();
    let whole_pt = IommuNotifier {
        notify: f2,
        ..whole
    };
    assert_eq!(s.device.hub().replay(&whole_pt), Ok(3));
    assert_eq!(log2.lock().len(), 3);
}

/// Rule: the IOMMU may refuse a notifier (notify_flag_changed); it is told
/// the flag union as it grows and shrinks; malformed notifiers are errors.
#[test]
fn notifier_refusal_and_flag_changes() {
    let (memory, _root, sys) = system();
    let d = Arc::new(OffsetIommu {
        refuse: NotifierFlags::MAP,
        ..Arc::try_unwrap(OffsetIommu::new(0, 1 << 20, IommuPerm::Read))
            .ok()
            .unwrap()
    });
    d.set_target(&sys);
    let (_dev, hub) = iommu_space(&memory, "dev", d.clone());
    let (_, f) = recorder();
    let n = |flags, idx| IommuNotifier {
        flags,
        start: 0,
        last: 0xffff,
        iommu_idx: idx,
        notify: f.clone(),
    };
    assert!(matches!(
        hub.register_notifier(n(NotifierFlags::IOTLB_EVENTS, 0)),
        Err(IommuError::Refused(_))
    ));
    assert!(hub.notifiers().is_empty());
    let id = hub.register_notifier(n(NotifierFlags::UNMAP, 0)).unwrap();
    assert!(matches!(
        hub.register_notifier(n(NotifierFlags::NONE, 0)),
        Err(IommuError::BadNotifier(_))
    ));
    assert!(matches!(
        hub.register_notifier(n(NotifierFlags::UNMAP, 9)),
        Err(IommuError::BadNotifier(_))
    ));
    assert!(hub.unregister_notifier(id));
    assert!(!hub.unregister_notifier(id));
    assert_eq!(
        *d.flag_log.lock(),
        vec![
            (NotifierFlags::NONE, NotifierFlags::UNMAP),
            (NotifierFlags::UNMAP, NotifierFlags::NONE)
        ]
    );
}

/// Rule: the IOTLB cache serves repeated translations without asking the
/// device, and an IOMMU notification invalidates it.
#[test]
fn iotlb_cache_is_invalidated_by_notifications() {
    let s = setup(12, 8);
    s.system
        .store::<u32>(0x30_0000, 1, Endian::Little, A)
        .into_result()
        .unwrap();
    s.system
        .store::<u32>(0x31_0000, 2, Endian::Little, A)
        .into_result()
        .unwrap();
    s.map(1, 0x30_0000, IommuPerm::Read);
    let hub = s.device.hub().clone();
    assert_eq!(s.dma.load::<u32>(0x1000, Endian::Little, A).0, 1);
    let misses = hub.cache_misses();
    for _ in 0..100 {
        assert_eq!(s.dma.load::<u32>(0x1000, Endian::Little, A).0, 1);
    }
    assert_eq!(
        hub.cache_misses(),
        misses,
        "warm IOTLB asks the device again"
    );
    // The guest changes the entry without invalidating: the cached
    // translation stays in use (the device's contract: notify after change).
    s.system
        .store::<u64>(TABLE_BASE + 8, 0x31_0000 | 1, Endian::Little, A)
        .into_result()
        .unwrap();
    assert_eq!(s.dma.load::<u32>(0x1000, Endian::Little, A).0, 1);
    // Invalidation register: UNMAP + MAP notifications drop the cache.
    s.system
        .store::<u64>(0xfee0_0000, 1, Endian::Little, A)
        .into_result()
        .unwrap();
    assert_eq!(s.dma.load::<u32>(0x1000, Endian::Little, A).0, 2);
}

/// Rule: invalidation is exact — an UNMAP notification between two
/// accesses through a warm IOTLB makes the second one fault (typed and
/// buffer, read and write), and the device is asked again.
#[test]
fn unmap_between_two_accesses_makes_the_second_fault() {
    let s = setup(12, 8);
    s.system
        .store::<u32>(0x30_0010, 7, Endian::Little, A)
        .into_result()
        .unwrap();
    s.map(2, 0x30_0000, IommuPerm::ReadWrite);
    let mut cur = s.dma.cursor();
    // Warm: every access kind hits the cache after the first.
    for _ in 0..3 {
        assert_eq!(
            s.dma.load::<u32>(0x2010, Endian::Little, A),
            (7, MemTxResult::OK)
        );
        assert_eq!(
            cur.load::<u32>(0x2010, Endian::Little, A),
            (7, MemTxResult::OK)
        );
        let mut b = [0u8; 4];
        assert!(s.dma.read(0x2010, &mut b, A).is_ok());
        assert_eq!(u32::from_le_bytes(b), 7);
        assert!(s.dma.store::<u32>(0x2014, 9, Endian::Little, A).is_ok());
        assert!(s.dma.write(0x2018, &[1, 2], A).is_ok());
    }
    let misses = s.device.hub().cache_misses();
    assert_eq!(s.dma.load::<u32>(0x2010, Endian::Little, A).0, 7);
    assert_eq!(s.device.hub().cache_misses(), misses, "not warm");
    // The guest clears the entry and invalidates it: UNMAP.
    s.map(2, 0, IommuPerm::None);
    assert_eq!(
        s.dma.load::<u32>(0x2010, Endian::Little, A),
        (0, MemTxResult::DECODE_ERROR)
    );
    assert_eq!(
        cur.load::<u32>(0x2010, Endian::Little, A),
        (0, MemTxResult::DECODE_ERROR)
    );
    let mut b = [0xffu8; 4];
    assert_eq!(s.dma.read(0x2010, &mut b, A), MemTxResult::DECODE_ERROR);
    assert_eq!(b, [0; 4]);
    assert_eq!(
        s.dma.store::<u32>(0x2014, 0xdead, Endian::Little, A),
        MemTxResult::DECODE_ERROR
    );
    assert_eq!(
        cur.store::<u32>(0x2014, 0xdead, Endian::Little, A),
        MemTxResult::DECODE_ERROR
    );
    assert_eq!(s.dma.write(0x2018, &[5, 5], A), MemTxResult::DECODE_ERROR);
    assert!(
        s.device.hub().cache_misses() > misses,
        "the device was not asked again"
    );
    // Nothing landed in the old page after the UNMAP.
    assert_eq!(s.system.load::<u32>(0x30_0014, Endian::Little, A).0, 9);
    assert_eq!(s.system.load::<u16>(0x30_0018, Endian::Little, A).0, 0x0201);
}

/// Rule: a warm IOTLB entry never serves RAM its target address space no
/// longer maps there: the translated address is looked up again when the
/// target's view changed (here an MMIO region now covers it).
#[test]
fn warm_entry_follows_a_change_of_the_target_view() {
    use memtree::{AccessSizes, Endian, MmioOps};
    struct Fixed;
    impl MmioOps for Fixed {
        fn read(&self, _a: u64, _s: u32, _at: MemTxAttrs) -> Result<u64, MemTxResult> {
            Ok(0x5a5a_5a5a)
        }
        fn write(&self, _a: u64, _d: u64, _s: u32, _at: MemTxAttrs) -> MemTxResult {
            MemTxResult::OK
        }
        fn valid_sizes(&self) -> AccessSizes {
            AccessSizes::new(1, 8, false)
        }
        fn impl_sizes(&self) -> AccessSizes {
            AccessSizes::new(1, 8, false)
        }
        fn endianness(&self) -> Endian {
            Endian::Little
        }
    }
    let s = setup(12, 8);
    s.system
        .store::<u32>(0x40_0000, 3, Endian::Little, A)
        .into_result()
        .unwrap();
    s.map(4, 0x40_0000, IommuPerm::ReadWrite);
    let mut cur = s.dma.cursor();
    assert_eq!(s.dma.load::<u32>(0x4000, Endian::Little, A).0, 3);
    assert_eq!(cur.load::<u32>(0x4000, Endian::Little, A).0, 3);
    let root = s.memory.find_region("memory").unwrap();
    let mmio = s
        .memory
        .new_mmio("overlay", 0x1000, Arc::new(Fixed), None)
        .unwrap();
    s.memory
        .add_subregion_overlap(root, 0x40_0000, mmio, 1)
        .unwrap();
    assert_eq!(s.dma.load::<u32>(0x4000, Endian::Little, A).0, 0x5a5a_5a5a);
    assert_eq!(cur.load::<u32>(0x4000, Endian::Little, A).0, 0x5a5a_5a5a);
    assert!(s.dma.store::<u32>(0x4000, 1, Endian::Little, A).is_ok());
    s.memory.del_subregion(root, mmio).unwrap();
    // The store went to the MMIO region, not to the RAM under it.
    assert_eq!(s.dma.load::<u32>(0x4000, Endian::Little, A).0, 3);
    assert_eq!(cur.load::<u32>(0x4000, Endian::Little, A).0, 3);
}

/// Rule: bypass switching — devices' DMA spaces switch between translated
/// and bypass (system memory) for many devices in one transaction.
#[test]
fn bypass_switching_many_devices_in_one_transaction() {
    let (memory, root, sys) = system();
    sys.store::<u32>(0x1000, 0xb1, Endian::Little, A)
        .into_result()
        .unwrap();
    sys.store::<u32>(0x2000, 0x7a, Endian::Little, A)
        .into_result()
        .unwrap();
    let mut devs = Vec::new();
    for i in 0..16 {
        let root_i = memory
            .new_container(&format!("dev{i}"), 1 << 64, None)
            .unwrap();
        let bypass = memory
            .new_alias(&format!("dev{i}-nodmar"), root, 0, 1 << 64, None)
            .unwrap();
        let d = OffsetIommu::new(0x1000, 1 << 32, IommuPerm::ReadWrite);
        d.set_target(&sys);
        let hub = IommuHub::new();
        let iommu = memory
            .new_iommu(&format!("dev{i}-dmar"), 1 << 64, d, hub, None)
            .unwrap();
        memory.add_subregion_overlap(root_i, 0, bypass, 0).unwrap();
        memory.add_subregion_overlap(root_i, 0, iommu, 0).unwrap();
        memory.set_enabled(iommu, false).unwrap();
        let id = memory
            .new_address_space(&format!("dev{i}"), root_i, None)
            .unwrap();
        devs.push((memory.address_space(id).unwrap(), bypass, iommu));
    }
    for (s, _, _) in &devs {
        assert_eq!(s.load::<u32>(0x1000, Endian::Little, A).0, 0xb1);
    }
    memory.transaction(|m| {
        for (_, bypass, iommu) in &devs {
            m.set_enabled(*bypass, false).unwrap();
            m.set_enabled(*iommu, true).unwrap();
        }
    });
    for (s, _, _) in &devs {
        assert_eq!(s.load::<u32>(0x1000, Endian::Little, A).0, 0x7a);
        assert!(memtree::access::iommu::is_translated(&s.view(), 0x1000));
    }
    memory.transaction(|m| {
        for (_, bypass, iommu) in &devs {
            m.set_enabled(*bypass, true).unwrap();
            m.set_enabled(*iommu, false).unwrap();
        }
    });
    assert_eq!(devs[3].0.load::<u32>(0x1000, Endian::Little, A).0, 0xb1);
}

/// Rule: a DMA mapping through an IOMMU whose translation lands in RAM maps
/// that RAM directly and keeps exactly what a direct mapping keeps, the
/// memory (not the IOMMU region or device). An UNMAP notification while it
/// is out does not revoke it: it stays valid until unmapped (its reads and
/// writes reach the page it was translated to), new accesses through the
/// IOMMU fault, and the census names the mapping as the memory's holder.
#[test]
fn dma_through_iommu_maps_ram_directly_and_outlives_an_unmap() {
    let s = setup(12, 8);
    s.map(1, 0x30_0000, IommuPerm::ReadWrite);
    s.system
        .store::<u32>(0x30_0010, 0xc0de, Endian::Little, A)
        .into_result()
        .unwrap();
    let mut m = s
        .dma
        .map(0x1010, 0x2000, memtree::DmaDirection::Bidirectional, A)
        .unwrap();
    assert!(!m.is_bounce(), "translated RAM was bounced");
    assert!(m.region().is_none(), "a direct mapping holds no region");
    // Clamped to the IOTLB page.
    assert_eq!(m.len(), 0x1000 - 0x10);
    let mut b = [0u8; 4];
    m.read(0, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0xc0de);
    let memory_key = m.memory_key().unwrap();
    let why = s.memory.census().explain(memory_key);
    assert!(
        why.iter()
            .any(|w| w.starts_with("held by mapping #") && w.contains("dma")),
        "{why:?}"
    );
    // The guest unmaps the page while the mapping is out.
    s.map(1, 0, IommuPerm::None);
    assert_eq!(
        s.dma.load::<u32>(0x1010, Endian::Little, A).1,
        MemTxResult::DECODE_ERROR
    );
    m.write(4, &0xfeedu32.to_le_bytes()).unwrap();
    s.system
        .store::<u32>(0x30_0010, 0xabcd, Endian::Little, A)
        .into_result()
        .unwrap();
    m.read(0, &mut b).unwrap();
    assert_eq!(
        u32::from_le_bytes(b),
        0xabcd,
        "the mapping still shows the page"
    );
    assert!(m.unmap(8).is_ok());
    assert_eq!(s.system.load::<u32>(0x30_0014, Endian::Little, A).0, 0xfeed);
    // Mapping again now is a bounce over a denied page.
    let d = s
        .dma
        .map(0x1010, 4, memtree::DmaDirection::ToDevice, A)
        .unwrap();
    assert!(d.is_bounce());
    assert_eq!(d.prefill_result(), MemTxResult::DECODE_ERROR);
    drop(d);
    // Contiguous RAM across two IOTLB pages that translate contiguously is
    // still one page per mapping (the translation may change per page).
    s.map(2, 0x40_0000, IommuPerm::Read);
    let r = s
        .dma
        .map(0x2000, 0x1000, memtree::DmaDirection::ToDevice, A)
        .unwrap();
    assert!(!r.is_bounce() && r.len() == 0x1000);
    drop(r);
    // A read-only page cannot be mapped directly for writing: bounce.
    let w = s
        .dma
        .map(0x2000, 4, memtree::DmaDirection::FromDevice, A)
        .unwrap();
    assert!(w.is_bounce());
    assert_eq!(w.unmap(4), MemTxResult::DECODE_ERROR);
}

/// Rule: a mapping through an IOMMU whose target is not RAM bounces (it
/// holds the IOMMU region); an UNMAP while it is out keeps its bytes and its
/// write-back is translated anew (denied and reported); unplugging the
/// IOMMU's device with mappings out frees the device while a direct mapping
/// still holds the memory, and teardown leaks nothing.
#[test]
fn unplug_and_unmap_while_mapped() {
    let s = setup(12, 8);
    // Page 1 -> the page of the invalidation register: MMIO (and a hole
    // past its 8 bytes).
    s.map(1, 0xfee0_0000, IommuPerm::ReadWrite);
    let m = s
        .dma
        .map(0x1000, 8, memtree::DmaDirection::ToDevice, A)
        .unwrap();
    assert!(m.is_bounce());
    assert!(m.region().is_some_and(|r| r.name() == "pt-iommu-dmar"));
    let mut b = [0u8; 8];
    m.read(0, &mut b).unwrap();
    assert_eq!(b, [0; 8]);
    s.map(1, 0, IommuPerm::None);
    m.read(0, &mut b).unwrap();
    assert_eq!(
        s.dma.load::<u32>(0x1010, Endian::Little, A).1,
        MemTxResult::DECODE_ERROR
    );
    let _ = m.unmap(0);

    // A device-bound (FromDevice) bounce mapping whose page is unmapped
    // while it is out: the write-back at unmap is translated anew, denied,
    // reported.
    s.map(1, 0xfee0_0000, IommuPerm::ReadWrite);
    let mut w = s
        .dma
        .map(0x1010, 4, memtree::DmaDirection::FromDevice, A)
        .unwrap();
    assert!(w.is_bounce());
    w.write(0, &0xbad0u32.to_le_bytes()).unwrap();
    s.map(1, 0, IommuPerm::None);
    assert_eq!(w.unmap(4), MemTxResult::DECODE_ERROR);

    // A direct mapping out across the unplug of the IOMMU's device.
    s.map(1, 0x30_0000, IommuPerm::ReadWrite);
    s.system
        .store::<u32>(0x30_0010, 0xc0de, Endian::Little, A)
        .into_result()
        .unwrap();
    assert!(s.dma.load::<u32>(0x1010, Endian::Little, A).1.is_ok());
    let dma2 = s.dma.clone();
    let mut direct = dma2
        .map(0x1010, 4, memtree::DmaDirection::Bidirectional, A)
        .unwrap();
    assert!(!direct.is_bounce());
    let report = s.memory.unplug(s.owner).unwrap();
    assert!(
        report.regions.iter().any(|r| r == "pt-iommu-dmar"),
        "{report:?}"
    );
    assert_eq!(
        s.dma.load::<u32>(0x1010, Endian::Little, A).1,
        MemTxResult::DECODE_ERROR
    );
    let weak_dev = Arc::downgrade(&s.device);
    let pagetable::Setup {
        memory,
        system,
        dma,
        device,
        ..
    } = s;
    drop(device);
    assert!(
        weak_dev.upgrade().is_none(),
        "the IOMMU device outlived its unplug while a direct mapping was out"
    );
    direct.write(0, &0x600du32.to_le_bytes()).unwrap();
    assert!(direct.unmap(4).is_ok());
    assert_eq!(system.load::<u32>(0x30_0010, Endian::Little, A).0, 0x600d);
    drop((system, dma, dma2));
    let report = memory.teardown();
    assert!(report.is_clean(), "{report}");
}

/// Rule: a commit visits only the address spaces it can change (bypass
/// switching of one device reaches that device's space alone), and every
/// space still publishes exactly what a full render gives: random edits,
/// alone or batched, on many spaces rooted at random regions (containers
/// switching between one and two enabled subregions, aliases covering
/// their target or not, out-of-bounds subregions), checked after each
/// commit against a full render of every space.
#[test]
fn commits_visit_only_changed_spaces_and_every_view_stays_exact() {
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn addr(&mut self) -> u64 {
            [0, 0, 0, 0x1000, 0x8000, 0x1_0000, 0x10_0000][self.below(7)]
        }
        fn size(&mut self) -> u128 {
            [0x1000u128, 0x8000, 0x1_0000, 0x10_0000][self.below(4)]
        }
    }
    let seeds: u64 = std::env::var("MEMTREE_SPACE_INDEX_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    for seed in 1..=seeds {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let m = Memory::new();
        let root = m.new_container("root", 1 << 64, None).unwrap();
        let mut regions = vec![root];
        let mut containers = vec![root];
        for i in 0..14 {
            let name = format!("r{i}");
            let id = match rng.below(4) {
                0 | 1 => {
                    let c = m.new_container(&name, rng.size(), None).unwrap();
                    containers.push(c);
                    c
                }
                2 => {
                    let t = regions[rng.below(regions.len())];
                    let off = if rng.below(2) == 0 { 0 } else { 0x1000 };
                    m.new_alias(&name, t, off, rng.size(), None).unwrap()
                }
                _ => m
                    .new_ram(&name, u128::from(rng.size() as u64), None)
                    .unwrap(),
            };
            regions.push(id);
        }
        for &r in &regions[1..] {
            let c = containers[rng.below(containers.len())];
            let _ = m.add_subregion_overlap(c, rng.addr(), r, rng.below(3) as i32 - 1);
        }
        for i in 0..10 {
            let r = regions[rng.below(regions.len())];
            m.new_address_space(&format!("as{i}"), r, None).unwrap();
        }
        for step in 0..60 {
            let batch = 1 + rng.below(3);
            let t = m.begin();
            for _ in 0..batch {
                let r = regions[1 + rng.below(regions.len() - 1)];
                let _ = match rng.below(6) {
                    0 => m.set_enabled(r, rng.below(2) == 0),
                    1 => m.set_address(r, rng.addr()),
                    2 => m.set_size(r, rng.size()),
                    3 => match m.region_info(r).unwrap().container {
                        Some(c) => m.del_subregion(c, r),
                        None => {
                            let c = containers[rng.below(containers.len())];
                            m.add_subregion_overlap(c, rng.addr(), r, rng.below(3) as i32 - 1)
                        }
                    },
                    4 => m.set_alias_offset(r, [0, 0x1000][rng.below(2)]),
                    _ => m.set_readonly(r, rng.below(2) == 0),
                };
            }
            t.commit();
            if let Err(e) = m.check_views_against_full_render() {
                panic!("seed {seed} step {step}: {e}");
            }
        }
    }
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Rule: random page tables and accesses agree with a reference
        /// translating byte by byte.
        #[test]
        fn random_tables_agree_with_bytewise_reference(
            ptes in proptest::collection::vec((0u64..64, 0u8..4), 16),
            accesses in proptest::collection::vec((0u64..0x11000, 1usize..40, any::<bool>()), 1..24),
        ) {
            let s = setup(12, 16);
            // Fill the RAM the pages map to with a pattern.
            let pattern: Vec<u8> = (0..0x40_000u32).map(|i| (i * 7 + 3) as u8).collect();
            s.system.write(0x40_0000, &pattern, A).into_result().unwrap();
            for (i, (page, perm)) in ptes.iter().enumerate() {
                s.map(i as u64, 0x40_0000 + page * 0x1000, IommuPerm::from_bits(*perm));
            }
            let reference = |iova: u64, write: bool| -> Option<u64> {
                let idx = iova >> 12;
                if idx >= 16 { return None; }
                let (page, perm) = ptes[idx as usize];
                let need = if write { IommuPerm::Write } else { IommuPerm::Read };
                IommuPerm::from_bits(perm).allows(need).then(|| 0x40_0000 + page * 0x1000 + (iova & 0xfff))
            };
            for (addr, len, write) in accesses {
                if write {
                    let data: Vec<u8> = (0..len).map(|i| (addr as usize + i) as u8 ^ 0x5a).collect();
                    let r = s.dma.write(addr, &data, A);
                    let mut all_ok = true;
                    for (i, byte) in data.iter().enumerate() {
                        match reference(addr + i as u64, true) {
                            Some(gpa) => prop_assert_eq!(s.system.load::<u8>(gpa, Endian::Little, A).0, *byte),
                            None => all_ok = false,
                        }
                    }
                    prop_assert_eq!(r.is_ok(), all_ok);
                } else {
                    let mut buf = vec![0xeeu8; len];
                    let r = s.dma.read(addr, &mut buf, A);
                    let mut all_ok = true;
                    for (i, byte) in buf.iter().enumerate() {
                        match reference(addr + i as u64, false) {
                            Some(gpa) => prop_assert_eq!(*byte, s.system.load::<u8>(gpa, Endian::Little, A).0),
                            None => { all_ok = false; prop_assert_eq!(*byte, 0); }
                        }
                    }
                    prop_assert_eq!(r.is_ok(), all_ok);
                }
            }
        }
    }
}

/// Rule (interop): a consumer on vm-memory 0.18's `IommuMemory` translates
/// through memtree's IOMMU; the IOMMU's UNMAP notifications invalidate the
/// consumer's IOTLB; denied pages are errors.
#[cfg(all(feature = "vm-memory", unix))]
#[test]
fn vm_memory_iommu_memory_translates_through_memtree() {
    use memtree::access::iommu::vm_memory_adapter::VmMemoryIommu;
    use memtree::vm_memory::{Bytes, GuestAddress, IommuMemory};
    let s = setup(12, 16);
    s.map(2, 0x30_0000, IommuPerm::ReadWrite);
    s.map(3, 0x32_0000, IommuPerm::Read);
    s.system
        .store::<u32>(0x30_0040, 0xabcd, Endian::Little, A)
        .into_result()
        .unwrap();
    s.system
        .store::<u32>(0x31_0040, 0x1234, Endian::Little, A)
        .into_result()
        .unwrap();
    let core = s.dma.view().lookup(0).unwrap().region().clone();
    let adapter = VmMemoryIommu::new(&core, 0, &s.system).unwrap();
    let ram = (*s.system.guest_memory()).clone();
    let mem = IommuMemory::new(ram, adapter, true, Default::default());
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2040)).unwrap(), 0xabcd);
    mem.write_obj(0x55u32, GuestAddress(0x2044)).unwrap();
    assert_eq!(s.system.load::<u32>(0x30_0044, Endian::Little, A).0, 0x55);
    // Read-only and unmapped pages.
    assert!(mem.write_obj(1u32, GuestAddress(0x3000)).is_err());
    assert!(mem.read_obj::<u32>(GuestAddress(0x5000)).is_err());
    // The guest remaps page 2: the UNMAP notification reaches vm-memory's
    // IOTLB, so the next read translates anew.
    s.map(2, 0x31_0000, IommuPerm::Read);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2040)).unwrap(), 0x1234);
    // The adapter's notifier goes away with it.
    assert_eq!(s.device.hub().notifiers().len(), 1);
    drop(mem);
    assert!(s.device.hub().notifiers().is_empty());
}

/// Rule (lifecycle: "unplugging the IOMMU's owner makes the region's
/// accesses decode errors at once"): inside a transaction, after the
/// unplug, a `SpaceCursor` with a warm IOTLB entry must fail like the
/// shared handle does, not keep serving the translated RAM.
#[test]
fn cursor_obeys_an_unplug_inside_a_transaction_like_the_shared_handle() {
    let s = setup(12, 8);
    s.system
        .store::<u32>(0x30_0010, 0x77, Endian::Little, A)
        .into_result()
        .unwrap();
    s.map(1, 0x30_0000, IommuPerm::ReadWrite);
    let mut cur = s.dma.cursor();
    for _ in 0..3 {
        assert_eq!(
            cur.load::<u32>(0x1010, Endian::Little, A),
            (0x77, MemTxResult::OK)
        );
    }
    let t = s.memory.begin();
    s.memory.unplug(s.owner).unwrap();
    let shared = s.dma.load::<u32>(0x1010, Endian::Little, A);
    let cursor = cur.load::<u32>(0x1010, Endian::Little, A);
    let cursor_store = cur.store::<u32>(0x1010, 0xdead, Endian::Little, A);
    t.commit();
    assert_eq!(shared, (0, MemTxResult::DECODE_ERROR));
    assert_eq!(
        (cursor, cursor_store),
        (shared, MemTxResult::DECODE_ERROR),
        "the cursor still translates through the unplugged IOMMU"
    );
}

/// An IOMMU translating 4 KiB pages with a fixed offset into a target set
/// later (possibly its own space: a loop), or with no target at all.
struct LoopIommu {
    target: Mutex<Option<WeakAddressSpace>>,
}

impl Iommu for LoopIommu {
    fn translate(&self, addr: u64, _a: IommuPerm, _i: u32) -> IotlbEntry {
        // With no target set, it still grants read/write (a device bug the
        // module docs promise to survive: a decode error, reads of zeros).
        IotlbEntry {
            target: self.target.lock().as_ref().and_then(|t| t.upgrade()),
            iova: addr & !0xfff,
            translated_addr: addr & !0xfff,
            addr_mask: 0xfff,
            perm: IommuPerm::ReadWrite,
        }
    }
}

fn loop_space(memory: &Memory, name: &str) -> (AddressSpace, Arc<LoopIommu>) {
    let dev = Arc::new(LoopIommu {
        target: Mutex::new(None),
    });
    let r = memory
        .new_iommu(name, 1 << 32, dev.clone(), IommuHub::new(), None)
        .unwrap();
    let space = memory
        .address_space(memory.new_address_space(name, r, None).unwrap())
        .unwrap();
    (space, dev)
}

/// Rule ("a denied or failed translation makes that piece a decode error
/// (QEMU's unassigned section: reads return zeros)"): a buffer read that
/// fails in an IOMMU loop, or through a translation with permissions but no
/// target, returns zeros like a read of a hole, never the caller's old
/// buffer contents.
#[test]
fn failed_translated_reads_return_zeros() {
    let memory = Memory::new();
    let root = memory.new_container("memory", 1 << 64, None).unwrap();
    let sys = memory
        .address_space(memory.new_address_space("memory", root, None).unwrap())
        .unwrap();
    // Control: a hole reads as zeros.
    let mut hole = [0xaau8; 8];
    assert_eq!(sys.read(0x40, &mut hole, A), MemTxResult::DECODE_ERROR);
    assert_eq!(hole, [0; 8]);

    let (no_target, _d1) = loop_space(&memory, "no-target");
    let mut b = [0xaau8; 8];
    let r = no_target.read(0x40, &mut b, A);
    assert_eq!(r, MemTxResult::DECODE_ERROR);
    let no_target_bytes = b;

    let (lp, d2) = loop_space(&memory, "loop");
    *d2.target.lock() = Some(lp.downgrade());
    let mut b = [0xaau8; 8];
    let r = lp.read(0x40, &mut b, A);
    assert_eq!(r, MemTxResult::DECODE_ERROR);
    assert_eq!(
        (no_target_bytes, b),
        ([0; 8], [0; 8]),
        "failed translated reads hand back the caller's buffer contents"
    );
}

/// A single-context [`OffsetIommu`] (warm windows exist only for those).
fn single_context(offset: u64, target: &AddressSpace) -> Arc<OffsetIommu> {
    let d = Arc::new(OffsetIommu {
        target: Mutex::new(None),
        offset,
        limit: u64::MAX,
        perm: IommuPerm::ReadWrite,
        refuse: NotifierFlags::NONE,
        flag_log: Mutex::new(Vec::new()),
        indexes: 1,
    });
    d.set_target(target);
    d
}

/// Rule: a warm IOTLB window (the hub slot's, keyed by the target view it
/// was resolved in, and a cursor's) never serves RAM its target no longer
/// maps there: RAM laid over the translated page, then removed again, is
/// seen at once by typed and buffer accesses, reads and writes, through
/// the shared handle and a cursor.
#[test]
fn warm_window_follows_ram_replaced_in_the_target() {
    let (memory, root, sys) = system();
    let dev = single_context(0x40_0000, &sys);
    let (dma, hub) = iommu_space(&memory, "dev", dev);
    sys.store::<u32>(0x40_0010, 3, Endian::Little, A)
        .into_result()
        .unwrap();
    let mut cur = dma.cursor();
    for _ in 0..3 {
        assert_eq!(dma.load::<u32>(0x10, Endian::Little, A).0, 3);
        assert_eq!(cur.load::<u32>(0x10, Endian::Little, A).0, 3);
    }
    let misses = hub.cache_misses();
    let overlay = memory.new_ram("overlay", 0x1000, None).unwrap();
    memory
        .add_subregion_overlap(root, 0x40_0000, overlay, 1)
        .unwrap();
    sys.store::<u32>(0x40_0010, 5, Endian::Little, A)
        .into_result()
        .unwrap();
    for _ in 0..3 {
        assert_eq!(dma.load::<u32>(0x10, Endian::Little, A).0, 5);
        assert_eq!(cur.load::<u32>(0x10, Endian::Little, A).0, 5);
        let mut b = [0u8; 4];
        assert!(dma.read(0x10, &mut b, A).is_ok());
        assert_eq!(u32::from_le_bytes(b), 5);
    }
    assert!(dma.store::<u32>(0x14, 6, Endian::Little, A).is_ok());
    assert!(cur.store::<u32>(0x18, 7, Endian::Little, A).is_ok());
    assert!(dma.write(0x1c, &[8], A).is_ok());
    // The translation itself never changed: the device was not asked again.
    assert_eq!(hub.cache_misses(), misses);
    memory.del_subregion(root, overlay).unwrap();
    memory.destroy_region(overlay).unwrap();
    for _ in 0..3 {
        assert_eq!(dma.load::<u32>(0x10, Endian::Little, A).0, 3);
        assert_eq!(cur.load::<u32>(0x10, Endian::Little, A).0, 3);
        assert_eq!(dma.load::<u32>(0x14, Endian::Little, A).0, 0);
        assert_eq!(cur.load::<u32>(0x18, Endian::Little, A).0, 0);
    }
}

/// Rule: a cursor's warm window belongs to the cursor view it was resolved
/// in: when its own view routes the address through another IOMMU, the
/// next access translates through that one.
#[test]
fn cursor_window_follows_a_change_of_its_own_view() {
    let (memory, _root, sys) = system();
    sys.store::<u32>(0x10_0010, 0xaaaa, Endian::Little, A)
        .into_result()
        .unwrap();
    sys.store::<u32>(0x20_0010, 0xbbbb, Endian::Little, A)
        .into_result()
        .unwrap();
    let dev_root = memory.new_container("dev", 1 << 64, None).unwrap();
    let first = memory
        .new_iommu(
            "first",
            1 << 64,
            single_context(0x10_0000, &sys),
            IommuHub::new(),
            None,
        )
        .unwrap();
    memory.add_subregion_overlap(dev_root, 0, first, 0).unwrap();
    let id = memory.new_address_space("dev", dev_root, None).unwrap();
    let dma = memory.address_space(id).unwrap();
    let mut cur = dma.cursor();
    for _ in 0..3 {
        assert_eq!(cur.load::<u32>(0x10, Endian::Little, A).0, 0xaaaa);
        assert_eq!(dma.load::<u32>(0x10, Endian::Little, A).0, 0xaaaa);
    }
    let second = memory
        .new_iommu(
            "second",
            1 << 64,
            single_context(0x20_0000, &sys),
            IommuHub::new(),
            None,
        )
        .unwrap();
    memory
        .add_subregion_overlap(dev_root, 0, second, 1)
        .unwrap();
    for _ in 0..3 {
        assert_eq!(cur.load::<u32>(0x10, Endian::Little, A).0, 0xbbbb);
        assert_eq!(dma.load::<u32>(0x10, Endian::Little, A).0, 0xbbbb);
    }
    memory.set_enabled(second, false).unwrap();
    assert_eq!(cur.load::<u32>(0x10, Endian::Little, A).0, 0xaaaa);
}
