//! IOMMU benchmarks (issue 10):
//!
//! * `iommu_read_u32`: a u32 read with no IOMMU, through memtree's IOMMU
//!   region with a warm IOTLB cache (the example page-table device), both
//!   through the shared `AddressSpace` handle and a per-caller
//!   `SpaceCursor` (`*_cursor`), and
//!   through vm-memory 0.18's `IommuMemory` whose `Iotlb` holds the same
//!   mapping.
//! * `iommu_switch`: switching N devices' DMA address spaces from bypass to
//!   translated and back, in one transaction and one device at a time.
//!
//! Run: `cargo bench --bench iommu -- --warm-up-time 1 --measurement-time 3`

#[path = "../examples/iommu_pagetable.rs"]
mod pagetable;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use memtree::access::iommu::{Iommu, IommuHub, IommuPerm, IotlbEntry, WeakAddressSpace};
use memtree::{Endian, MemTxAttrs, Memory, RegionId};
use vm_memory::iommu::{Error as VmError, IotlbIterator};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory, Iotlb, Permissions};

/// vm-memory's anchor: an `Iotlb` filled in advance, no misses.
#[derive(Debug)]
struct FilledIotlb(Iotlb);

impl vm_memory::Iommu for FilledIotlb {
    type IotlbGuard<'a> = &'a Iotlb;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<&Iotlb>, VmError> {
        Iotlb::lookup(&self.0, iova, length, access).map_err(|_| VmError::CannotResolve {
            iova_range: vm_memory::iommu::IovaRange { base: iova, length },
            reason: "not mapped".into(),
        })
    }
}

fn read_u32(c: &mut Criterion) {
    let s = pagetable::setup(12, 512);
    s.map(3, 0x20_0000, IommuPerm::ReadWrite);
    let a = MemTxAttrs::UNSPECIFIED;
    let _ = s
        .system
        .store::<u32>(0x20_0010, 0x1234_5678, Endian::Little, a);
    assert_eq!(s.dma.load::<u32>(0x3010, Endian::Little, a).0, 0x1234_5678);

    let mut g = c.benchmark_group("iommu_read_u32");
    g.bench_function("no_iommu", |b| {
        b.iter(|| {
            s.system
                .load::<u32>(black_box(0x20_0010), Endian::Little, a)
        })
    });
    g.bench_function("memtree_iommu_warm_iotlb", |b| {
        b.iter(|| s.dma.load::<u32>(black_box(0x3010), Endian::Little, a))
    });
    let mut sys_cursor = s.system.cursor();
    g.bench_function("no_iommu_cursor", |b| {
        b.iter(|| sys_cursor.load::<u32>(black_box(0x20_0010), Endian::Little, a))
    });
    let mut dma_cursor = s.dma.cursor();
    assert_eq!(
        dma_cursor.load::<u32>(0x3010, Endian::Little, a).0,
        0x1234_5678
    );
    g.bench_function("memtree_iommu_warm_iotlb_cursor", |b| {
        b.iter(|| dma_cursor.load::<u32>(black_box(0x3010), Endian::Little, a))
    });

    let backend: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    backend
        .write_obj(0x1234_5678u32, GuestAddress(0x20_0010))
        .unwrap();
    let mut tlb = Iotlb::new();
    tlb.set_mapping(
        GuestAddress(0x3000),
        GuestAddress(0x20_0000),
        0x1000,
        Permissions::ReadWrite,
    )
    .unwrap();
    let mem = IommuMemory::new(backend, FilledIotlb(tlb), true, ());
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x3010)).unwrap(),
        0x1234_5678
    );
    g.bench_function("vm_memory_iommu_memory", |b| {
        b.iter(|| mem.read_obj::<u32>(black_box(GuestAddress(0x3010))))
    });
    g.finish();
}

/// An identity IOMMU into `target`.
struct Identity(WeakAddressSpace);

impl Iommu for Identity {
    fn translate(&self, addr: u64, _access: IommuPerm, _idx: u32) -> IotlbEntry {
        IotlbEntry {
            target: self.0.upgrade(),
            iova: addr & !0xfff,
            translated_addr: addr & !0xfff,
            addr_mask: 0xfff,
            perm: IommuPerm::ReadWrite,
        }
    }
}

struct Devices {
    memory: Memory,
    /// (bypass alias, IOMMU region) per device.
    regions: Vec<(RegionId, RegionId)>,
}

fn devices(n: usize) -> Devices {
    let memory = Memory::new();
    let root = memory.new_container("memory", 1 << 64, None).unwrap();
    let ram = memory.new_ram("ram", 1 << 20, None).unwrap();
    memory.add_subregion(root, 0, ram).unwrap();
    let sys = memory
        .address_space(memory.new_address_space("memory", root, None).unwrap())
        .unwrap();
    let mut regions = Vec::new();
    memory.transaction(|m| {
        for i in 0..n {
            let dev_root = m.new_container(&format!("dev{i}"), 1 << 64, None).unwrap();
            let bypass = m
                .new_alias(&format!("dev{i}-nodmar"), root, 0, 1 << 64, None)
                .unwrap();
            let hub = IommuHub::new();
            let iommu = m
                .new_iommu(
                    &format!("dev{i}-dmar"),
                    1 << 64,
                    Arc::new(Identity(sys.downgrade())),
                    hub,
                    None,
                )
                .unwrap();
            m.add_subregion_overlap(dev_root, 0, bypass, 0).unwrap();
            m.add_subregion_overlap(dev_root, 0, iommu, 0).unwrap();
            m.set_enabled(iommu, false).unwrap();
            m.new_address_space(&format!("dev{i}"), dev_root, None)
                .unwrap();
            regions.push((bypass, iommu));
        }
    });
    Devices { memory, regions }
}

fn switch(c: &mut Criterion) {
    let mut g = c.benchmark_group("iommu_switch");
    for n in [64usize, 128, 256, 512] {
        let d = devices(n);
        let mut translated = false;
        g.bench_with_input(BenchmarkId::new("one_transaction", n), &n, |b, _| {
            b.iter(|| {
                translated = !translated;
                d.memory.transaction(|m| {
                    for (bypass, iommu) in &d.regions {
                        m.set_enabled(*bypass, !translated).unwrap();
                        m.set_enabled(*iommu, translated).unwrap();
                    }
                });
            })
        });
        g.bench_with_input(BenchmarkId::new("one_at_a_time", n), &n, |b, _| {
            b.iter(|| {
                translated = !translated;
                for (bypass, iommu) in &d.regions {
                    d.memory.transaction(|m| {
                        m.set_enabled(*bypass, !translated).unwrap();
                        m.set_enabled(*iommu, translated).unwrap();
                    });
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, read_u32, switch);
criterion_main!(benches);
