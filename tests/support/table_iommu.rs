//! A test IOMMU whose mappings are a table the test sets, and helpers for
//! the IOMMU tests (included with `#[path]`).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use memtree::access::iommu::{
    Iommu, IommuHub, IommuPerm, IotlbEntry, IotlbEvent, WeakAddressSpace,
};
use memtree::{AddressSpace, Memory};
use parking_lot::Mutex;

/// An IOMMU whose mappings are a table set by the test:
/// page iova -> (addr_mask, translated, perm), into `target`.
pub struct TableIommu {
    pub target: Mutex<Option<WeakAddressSpace>>,
    pub map: Mutex<BTreeMap<u64, (u64, u64, IommuPerm)>>,
    pub min_page: u64,
    /// If set, the next translation, once computed, signals the first
    /// channel and waits on the second before returning (a slow page walk).
    pub pause: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
}

impl TableIommu {
    pub fn new() -> Arc<TableIommu> {
        Arc::new(TableIommu {
            target: Mutex::new(None),
            map: Mutex::new(BTreeMap::new()),
            min_page: 0x1000,
            pause: Mutex::new(None),
        })
    }
}

impl TableIommu {
    fn lookup(&self, addr: u64) -> IotlbEntry {
        let target = self.target.lock().as_ref().and_then(|t| t.upgrade());
        let map = self.map.lock();
        if let Some((&iova, &(mask, out, perm))) = map.range(..=addr).next_back() {
            if addr & !mask == iova && target.is_some() {
                return IotlbEntry {
                    target,
                    iova,
                    translated_addr: out,
                    addr_mask: mask,
                    perm,
                };
            }
        }
        IotlbEntry::denied(addr, 0xfff)
    }
}

impl Iommu for TableIommu {
    fn translate(&self, addr: u64, _access: IommuPerm, _idx: u32) -> IotlbEntry {
        let e = self.lookup(addr);
        let pause = self.pause.lock().take();
        if let Some((computed, go)) = pause {
            computed.send(()).unwrap();
            go.recv().unwrap();
        }
        e
    }
    fn min_page_size(&self) -> u64 {
        self.min_page
    }
}

/// 16 MiB of RAM in "memory"; an address space "dma" rooted at an IOMMU
/// region of `size` bytes translated by a `TableIommu` into "memory".
pub fn table_setup(
    size: u128,
) -> (
    Memory,
    AddressSpace,
    AddressSpace,
    Arc<TableIommu>,
    Arc<IommuHub>,
) {
    let memory = Memory::new();
    let root = memory.new_container("memory", 1 << 64, None).unwrap();
    let ram = memory.new_ram("ram", 16 << 20, None).unwrap();
    memory.add_subregion(root, 0, ram).unwrap();
    let sys = memory
        .address_space(memory.new_address_space("memory", root, None).unwrap())
        .unwrap();
    let dev = TableIommu::new();
    *dev.target.lock() = Some(sys.downgrade());
    let hub = IommuHub::new();
    let r = memory
        .new_iommu("table-iommu", size, dev.clone(), hub.clone(), None)
        .unwrap();
    let dma = memory
        .address_space(memory.new_address_space("dma", r, None).unwrap())
        .unwrap();
    (memory, sys, dma, dev, hub)
}

pub fn recorder() -> (
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

/// Bytes of `[start, last]` not covered by the union of the events' pages.
pub fn uncovered(events: &[IotlbEvent], start: u64, last: u64) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = events
        .iter()
        .map(|e| {
            let s = e.entry.iova & !e.entry.addr_mask;
            (s, s | e.entry.addr_mask)
        })
        .collect();
    spans.sort();
    let mut holes = Vec::new();
    let mut next = start;
    for (s, l) in spans {
        if s > next {
            holes.push((next, s - 1));
        }
        if l >= next {
            match l.checked_add(1) {
                Some(n) => next = n,
                None => return holes,
            }
        }
    }
    if next <= last {
        holes.push((next, last));
    }
    holes
}
