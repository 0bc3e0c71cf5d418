//! A small IOMMU device: a one-level page table in guest RAM, with an
//! invalidation register.
//!
//! * The page table lives at `table_base` in the target address space:
//!   `entries` little-endian u64 page-table entries, entry `i` translating
//!   the IOVA page `i` (of `1 << page_shift` bytes).
//! * An entry is `output_page_address | W << 1 | R << 0` (the output address
//!   aligned to the page size; bits below it other than R/W are ignored).
//! * Writing `i` to the 8-byte invalidation register (an MMIO region made by
//!   [`PageTableIommu::invalidation_ops`]) tells the device that entry `i`
//!   changed: it sends UNMAP for the page, then MAP if the new entry maps
//!   something. The guest must invalidate after every change.
//!
//! The tests (tests/iommu.rs) and benchmarks (benches/iommu.rs) include this
//! file; `cargo run --example iommu_pagetable` runs the walk-through in
//! `main`.

#![allow(dead_code)]

use std::sync::Arc;

use memtree::access::iommu::{
    Iommu, IommuHub, IommuPerm, IotlbEntry, IotlbEvent, IotlbEventKind, WeakAddressSpace,
};
use memtree::region::attrs::{AccessSizes, Endian, MemTxAttrs, MemTxResult, MmioOps};
use memtree::AddressSpace;

/// The page-table IOMMU; see the module docs.
#[derive(Debug)]
pub struct PageTableIommu {
    /// Where translations go and where the table lives (held weakly: the
    /// device never keeps an address space, and its views, alive).
    target: WeakAddressSpace,
    table_base: u64,
    entries: u64,
    page_shift: u32,
    hub: Arc<IommuHub>,
}

impl PageTableIommu {
    /// A device whose table of `entries` entries is at `table_base` in
    /// `target`, translating pages of `1 << page_shift` bytes.
    pub fn new(
        target: &AddressSpace,
        table_base: u64,
        entries: u64,
        page_shift: u32,
        hub: Arc<IommuHub>,
    ) -> Arc<PageTableIommu> {
        Arc::new(PageTableIommu {
            target: target.downgrade(),
            table_base,
            entries,
            page_shift,
            hub,
        })
    }

    /// The page size.
    pub fn page_size(&self) -> u64 {
        1 << self.page_shift
    }

    /// The hub this device notifies.
    pub fn hub(&self) -> &Arc<IommuHub> {
        &self.hub
    }

    fn entry(&self, index: u64) -> IotlbEntry {
        let mask = self.page_size() - 1;
        let iova = index << self.page_shift;
        let Some(target) = self.target.upgrade() else {
            return IotlbEntry::denied(iova, mask);
        };
        if index >= self.entries {
            return IotlbEntry::denied(iova, mask);
        }
        let (pte, r) = target.load::<u64>(
            self.table_base + index * 8,
            Endian::Little,
            MemTxAttrs::UNSPECIFIED,
        );
        if !r.is_ok() {
            return IotlbEntry::denied(iova, mask);
        }
        let perm = IommuPerm::from_bits((pte & 3) as u8);
        if perm == IommuPerm::None {
            return IotlbEntry::denied(iova, mask);
        }
        IotlbEntry {
            target: Some(target),
            iova,
            translated_addr: pte & !mask,
            addr_mask: mask,
            perm,
        }
    }

    /// Entry `index` changed: UNMAP the page, then MAP the new entry if it
    /// maps something (what a write to the invalidation register does).
    pub fn invalidate(&self, index: u64) {
        let mask = self.page_size() - 1;
        let iova = index.wrapping_shl(self.page_shift);
        let _ = self.hub.notify(
            0,
            &IotlbEvent {
                kind: IotlbEventKind::Unmap,
                entry: IotlbEntry::denied(iova, mask),
            },
        );
        let e = self.entry(index);
        if e.perm != IommuPerm::None {
            let _ = self.hub.notify(
                0,
                &IotlbEvent {
                    kind: IotlbEventKind::Map,
                    entry: e,
                },
            );
        }
    }

    /// MMIO ops of the 8-byte invalidation register.
    pub fn invalidation_ops(self: &Arc<Self>) -> Arc<dyn MmioOps> {
        Arc::new(InvalidationRegister(Arc::downgrade(self)))
    }
}

impl Iommu for PageTableIommu {
    fn translate(&self, addr: u64, _access: IommuPerm, _iommu_idx: u32) -> IotlbEntry {
        self.entry(addr >> self.page_shift)
    }

    fn min_page_size(&self) -> u64 {
        self.page_size()
    }

    fn replay(
        &self,
        _iommu_idx: u32,
        start: u64,
        last: u64,
        sink: &mut dyn FnMut(IotlbEntry),
    ) -> bool {
        // Walk the table itself: only its entries can map anything.
        let first = start >> self.page_shift;
        let end = (last >> self.page_shift).min(self.entries.saturating_sub(1));
        for i in first..=end {
            if i >= self.entries {
                break;
            }
            let e = self.entry(i);
            if e.perm != IommuPerm::None {
                sink(e);
            }
        }
        true
    }
}

/// The invalidation register (held weakly: the region holding these ops
/// must not keep the device alive through a cycle).
struct InvalidationRegister(std::sync::Weak<PageTableIommu>);

impl MmioOps for InvalidationRegister {
    fn read(&self, _addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        Ok(0)
    }

    fn write(&self, _addr: u64, data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        if let Some(dev) = self.0.upgrade() {
            dev.invalidate(data);
        }
        MemTxResult::OK
    }

    fn valid_sizes(&self) -> AccessSizes {
        AccessSizes::new(8, 8, false)
    }

    fn impl_sizes(&self) -> AccessSizes {
        AccessSizes::new(8, 8, false)
    }

    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

/// A machine with 16 MiB of RAM in "memory" (the system address space), a
/// device address space "dma" rooted at an IOMMU region translating into
/// "memory" with pages of `1 << page_shift` bytes, its table of `entries`
/// entries at 0x10_0000 and its invalidation register at 0xfee0_0000.
pub struct Setup {
    pub memory: memtree::Memory,
    pub system: AddressSpace,
    pub dma: AddressSpace,
    pub device: Arc<PageTableIommu>,
    pub iommu_region: memtree::RegionId,
    pub owner: memtree::OwnerId,
}

/// Where the example's page table lives.
pub const TABLE_BASE: u64 = 0x10_0000;

/// Builds [`Setup`].
pub fn setup(page_shift: u32, entries: u64) -> Setup {
    let memory = memtree::Memory::new();
    let root = memory.new_container("memory", 1 << 64, None).unwrap();
    let ram = memory.new_ram("ram", 16 << 20, None).unwrap();
    memory.add_subregion(root, 0, ram).unwrap();
    let sys_id = memory.new_address_space("memory", root, None).unwrap();
    let system = memory.address_space(sys_id).unwrap();

    let owner = memory.new_owner("pt-iommu", None).unwrap();
    let hub = IommuHub::new();
    let device = PageTableIommu::new(&system, TABLE_BASE, entries, page_shift, hub.clone());
    let iommu_region = memory
        .new_iommu("pt-iommu-dmar", 1 << 64, device.clone(), hub, Some(owner))
        .unwrap();
    let reg = memory
        .new_mmio("pt-iommu-inv", 8, device.invalidation_ops(), Some(owner))
        .unwrap();
    memory.add_subregion(root, 0xfee0_0000, reg).unwrap();
    let dma_root = memory.new_container("dma-root", 1 << 64, None).unwrap();
    memory.add_subregion(dma_root, 0, iommu_region).unwrap();
    let dma_id = memory.new_address_space("dma", dma_root, None).unwrap();
    let dma = memory.address_space(dma_id).unwrap();
    Setup {
        memory,
        system,
        dma,
        device,
        iommu_region,
        owner,
    }
}

impl Setup {
    /// Writes entry `index` (`output | perm bits`) and invalidates it
    /// through the register, as a guest would.
    pub fn map(&self, index: u64, output: u64, perm: IommuPerm) {
        let a = MemTxAttrs::UNSPECIFIED;
        let pte = output | u64::from(perm.bits());
        assert!(self
            .system
            .store::<u64>(TABLE_BASE + index * 8, pte, Endian::Little, a)
            .is_ok());
        assert!(self
            .system
            .store::<u64>(0xfee0_0000, index, Endian::Little, a)
            .is_ok());
    }
}

fn main() {
    let s = setup(12, 512);
    let a = MemTxAttrs::UNSPECIFIED;
    // IOVA page 3 -> guest physical 0x20_0000, read/write.
    s.map(3, 0x20_0000, IommuPerm::ReadWrite);
    assert!(s
        .dma
        .store::<u32>(0x3010, 0xfeed_f00d, Endian::Little, a)
        .is_ok());
    let (v, _) = s.system.load::<u32>(0x20_0010, Endian::Little, a);
    println!("DMA write at IOVA 0x3010 landed at GPA 0x200010: {v:#x}");
    let (_, r) = s.dma.load::<u32>(0x5000, Endian::Little, a);
    println!("DMA read at unmapped IOVA 0x5000: ok={}", r.is_ok());
}
