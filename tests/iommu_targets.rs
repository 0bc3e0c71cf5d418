//! The IOMMU's target address spaces and the census (issue 10, lifecycle:
//! "the census explains what survives").

#[path = "support/table_iommu.rs"]
mod table_iommu;

use std::sync::{Arc, Barrier};

use memtree::access::iommu::{Iommu, IommuHub, IommuPerm, IotlbEntry, WeakAddressSpace};
use memtree::{AddressSpace, Endian, MemTxAttrs, Memory};
use parking_lot::Mutex;
use table_iommu::TableIommu;

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

/// Rule: an address space an IOMMU translated into, destroyed while the
/// IOMMU lives, is kept by the IOMMU's translation cache, and the census
/// says so ("held by" the IOMMU region), instead of blaming user code; it
/// shows the empty view (its RAM is not kept), and it is freed with the
/// IOMMU region.
#[test]
fn destroyed_target_space_is_explained_by_the_iommu_region() {
    let memory = Memory::new();
    let root = memory.new_container("memory", 1 << 64, None).unwrap();
    let ram = memory.new_ram("ram", 1 << 20, None).unwrap();
    memory.add_subregion(root, 0, ram).unwrap();
    memory.new_address_space("memory", root, None).unwrap();
    // A second-stage space the IOMMU translates into, over the same RAM.
    let stage2_root = memory.new_container("stage2-root", 1 << 64, None).unwrap();
    let alias = memory
        .new_alias("stage2-ram", ram, 0, 1 << 20, None)
        .unwrap();
    memory.add_subregion(stage2_root, 0, alias).unwrap();
    let stage2_id = memory
        .new_address_space("stage2", stage2_root, None)
        .unwrap();
    let stage2 = memory.address_space(stage2_id).unwrap();
    let dev = TableIommu::new();
    *dev.target.lock() = Some(stage2.downgrade());
    dev.map
        .lock()
        .insert(0x1000, (0xfff, 0x2000, IommuPerm::ReadWrite));
    let owner = memory.new_owner("viommu", None).unwrap();
    let r = memory
        .new_iommu(
            "viommu-dmar",
            1 << 64,
            dev.clone(),
            IommuHub::new(),
            Some(owner),
        )
        .unwrap();
    let dma = memory
        .address_space(memory.new_address_space("dma", r, None).unwrap())
        .unwrap();
    assert!(dma.store::<u32>(0x1010, 5, Endian::Little, A).is_ok());
    let key = stage2.census_key();
    drop(stage2);
    memory.destroy_address_space(stage2_id).unwrap();

    let census = memory.census().clone();
    assert!(census.is_live(key), "the IOMMU's cache keeps the space");
    let why = memtree::lifecycle::diag::why_alive(&census, key);
    assert!(
        why.iter().any(|w| w.contains("viommu-dmar")),
        "explained as {why:?}"
    );
    assert!(
        !why.iter().any(|w| w.contains("user code")),
        "blamed on user code: {why:?}"
    );
    // Accesses no longer reach the destroyed space's RAM.
    assert!(!dma.load::<u32>(0x1010, Endian::Little, A).1.is_ok());

    // Unplugging the IOMMU frees the space with it.
    drop(dma);
    memory.unplug(owner).unwrap();
    drop(dev);
    assert!(!census.is_live(key), "{:?}", census.explain(key));
}

/// Identity-mapping IOMMU into `target`, single context.
struct Ident {
    target: Mutex<Option<WeakAddressSpace>>,
}

impl Iommu for Ident {
    fn translate(&self, addr: u64, _a: IommuPerm, _i: u32) -> IotlbEntry {
        IotlbEntry {
            target: self.target.lock().as_ref().and_then(|t| t.upgrade()),
            iova: addr & !0xfff,
            translated_addr: addr & !0xfff,
            addr_mask: 0xfff,
            perm: IommuPerm::ReadWrite,
        }
    }
}

/// A machine with 1 page of RAM holding `value` at 0x10; returns it and its
/// system space.
fn machine(value: u32) -> (Memory, AddressSpace) {
    let memory = Memory::new();
    let root = memory.new_container("memory", 1 << 64, None).unwrap();
    let ram = memory.new_ram("ram", 0x1000, None).unwrap();
    memory.add_subregion(root, 0, ram).unwrap();
    let sys = memory
        .address_space(memory.new_address_space("memory", root, None).unwrap())
        .unwrap();
    sys.store::<u32>(0x10, value, Endian::Little, A)
        .into_result()
        .unwrap();
    (memory, sys)
}

/// Rule (`new_iommu`: "`TopologyError::InUse` if `hub` already serves
/// another IOMMU region"): two `new_iommu` calls racing with the same hub
/// never both succeed (else the two regions would share one IOTLB cache
/// while their devices translate into different spaces, and an access
/// through one region would read the RAM the other's device mapped).
#[test]
fn racing_new_iommu_with_one_hub_never_both_succeed() {
    for attempt in 0..2000 {
        let (m1, sys1) = machine(0x1111_1111);
        let (m2, sys2) = machine(0x2222_2222);
        let hub = IommuHub::new();
        let d1 = Arc::new(Ident {
            target: Mutex::new(Some(sys1.downgrade())),
        });
        let d2 = Arc::new(Ident {
            target: Mutex::new(Some(sys2.downgrade())),
        });
        let barrier = Barrier::new(2);
        let (r1, r2) = std::thread::scope(|sc| {
            let t = sc.spawn(|| {
                barrier.wait();
                m2.new_iommu("iommu2", 1 << 32, d2.clone(), hub.clone(), None)
            });
            barrier.wait();
            let r1 = m1.new_iommu("iommu1", 1 << 32, d1.clone(), hub.clone(), None);
            (r1, t.join().unwrap())
        });
        let (Ok(r1), Ok(r2)) = (r1, r2) else {
            continue;
        };
        // Both succeeded: show what sharing the hub does.
        let dma1 = m1
            .address_space(m1.new_address_space("dma1", r1, None).unwrap())
            .unwrap();
        let dma2 = m2
            .address_space(m2.new_address_space("dma2", r2, None).unwrap())
            .unwrap();
        let v2 = dma2.load::<u32>(0x10, Endian::Little, A).0;
        let v1 = dma1.load::<u32>(0x10, Endian::Little, A).0;
        panic!(
            "attempt {attempt}: both new_iommu calls succeeded with one hub; \
             dma1 reads {v1:#x} (its device maps 0x11111111), dma2 {v2:#x}"
        );
    }
}

/// Rule: a machine whose address space is the target of an IOMMU in
/// *another* machine tears down clean once the user dropped every handle:
/// a translation through that IOMMU is not cached in a way that keeps the
/// space.
#[test]
fn a_target_space_in_another_machine_does_not_survive_its_teardown_unexplained() {
    let report_with = |access: bool| {
        let (mb, sys_b) = machine(0x3333_3333);
        let ma = Memory::new();
        let dev = Arc::new(Ident {
            target: Mutex::new(Some(sys_b.downgrade())),
        });
        let r = ma
            .new_iommu("iommu", 1 << 32, dev.clone(), IommuHub::new(), None)
            .unwrap();
        let dma = ma
            .address_space(ma.new_address_space("dma", r, None).unwrap())
            .unwrap();
        if access {
            assert_eq!(dma.load::<u32>(0x10, Endian::Little, A).0, 0x3333_3333);
        }
        drop(sys_b);
        let report = mb.teardown();
        drop((dma, ma, dev));
        report
    };
    let control = report_with(false);
    assert!(control.is_clean(), "control: {control}");
    let report = report_with(true);
    assert!(
        report.is_clean(),
        "one translation through another machine's IOMMU keeps this machine's space:\n{report}"
    );
}
