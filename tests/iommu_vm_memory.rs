//! The vm-memory `Iommu` adapter: exact invalidation, no panic at the top of
//! the IOVA space, no stale fill, unplug (issue 10, review 5).

#![cfg(all(feature = "vm-memory", unix))]

#[path = "../examples/iommu_pagetable.rs"]
mod pagetable;
#[path = "support/table_iommu.rs"]
mod table_iommu;

use std::sync::Arc;

use memtree::access::iommu::{IommuPerm, IotlbEntry, IotlbEvent, IotlbEventKind};
use memtree::{Endian, MemTxAttrs, MemTxResult};
use pagetable::{setup, TABLE_BASE};
use table_iommu::table_setup;

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

/// Rule (IOTLB cache invalidation, interop): the vm-memory adapter's own
/// IOTLB must not serve a translation after the device withdrew it and
/// invalidated the hub's cache with `IommuHub::invalidate_cache` (which
/// the `Iommu` trait documents as enough): memtree's own accesses see the
/// new mapping, the adapter keeps the old one.
#[test]
fn vm_memory_adapter_obeys_invalidate_cache() {
    use memtree::access::iommu::vm_memory_adapter::VmMemoryIommu;
    use memtree::vm_memory::{Bytes, GuestAddress, IommuMemory};
    let s = setup(12, 16);
    s.system
        .store::<u32>(0x30_0040, 0xaaaa, Endian::Little, A)
        .into_result()
        .unwrap();
    s.system
        .store::<u32>(0x31_0040, 0xbbbb, Endian::Little, A)
        .into_result()
        .unwrap();
    s.map(2, 0x30_0000, IommuPerm::ReadWrite);
    let core = s.dma.view().lookup(0).unwrap().region().clone();
    let adapter = VmMemoryIommu::new(&core, 0, &s.system).unwrap();
    let mem = IommuMemory::new(
        (*s.system.guest_memory()).clone(),
        adapter,
        true,
        Default::default(),
    );
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2040)).unwrap(), 0xaaaa);
    // The device's page table changes and the device invalidates its hub's
    // cache (no event).
    s.system
        .store::<u64>(TABLE_BASE + 2 * 8, 0x31_0000 | 3, Endian::Little, A)
        .into_result()
        .unwrap();
    s.device.hub().invalidate_cache();
    assert_eq!(s.dma.load::<u32>(0x2040, Endian::Little, A).0, 0xbbbb);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x2040)).unwrap(),
        0xbbbb,
        "the adapter serves a translation the device invalidated"
    );
}

/// Rule (interop, no panic, exact invalidation): an UNMAP covering the
/// upper half of the IOVA space (a power-of-two block as intel-iommu sends
/// for a range invalidation) must invalidate the adapter's IOTLB there; it
/// must not panic in the adapter's notifier (which leaves the IOTLB stale).
#[test]
fn vm_memory_adapter_high_unmap_neither_panics_nor_goes_stale() {
    use memtree::access::iommu::vm_memory_adapter::VmMemoryIommu;
    use memtree::vm_memory::{Bytes, GuestAddress, IommuMemory};
    let (_memory, sys, dma, dev, hub) = table_setup(1 << 64);
    sys.store::<u32>(0x30_0040, 0x1234, Endian::Little, A)
        .into_result()
        .unwrap();
    let high = 0x8000_0000_0000_1000u64;
    dev.map
        .lock()
        .insert(high, (0xfff, 0x30_0000, IommuPerm::ReadWrite));
    let core = dma.view().lookup(0).unwrap().region().clone();
    let adapter = VmMemoryIommu::new(&core, 0, &sys).unwrap();
    let mem = IommuMemory::new(
        (*sys.guest_memory()).clone(),
        adapter,
        true,
        Default::default(),
    );
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(high + 0x40)).unwrap(),
        0x1234
    );
    // The device withdraws everything above 2^63 and says so.
    dev.map.lock().clear();
    let r = hub.notify(
        0,
        &IotlbEvent {
            kind: IotlbEventKind::Unmap,
            entry: IotlbEntry::denied(1 << 63, (1 << 63) - 1),
        },
    );
    assert_eq!(
        dma.load::<u32>(high + 0x40, Endian::Little, A).1,
        MemTxResult::DECODE_ERROR
    );
    let stale = mem.read_obj::<u32>(GuestAddress(high + 0x40));
    assert!(
        r.is_ok() && stale.is_err(),
        "notify: {r:?}; the adapter still reads the withdrawn page: {stale:?}"
    );
}

/// Rule (interop, no panic): a 1 GiB page at the top of the IOVA space is
/// a valid translation; reading its first bytes through vm-memory's
/// `IommuMemory` must work (or fail with an error), never panic.
#[test]
fn vm_memory_adapter_top_page_does_not_panic() {
    use memtree::access::iommu::vm_memory_adapter::VmMemoryIommu;
    use memtree::vm_memory::{Bytes, GuestAddress, IommuMemory};
    let (_memory, sys, dma, dev, _hub) = table_setup(1 << 64);
    sys.store::<u32>(0x40, 0x4321, Endian::Little, A)
        .into_result()
        .unwrap();
    let top = 0u64.wrapping_sub(1 << 30);
    dev.map
        .lock()
        .insert(top, ((1 << 30) - 1, 0, IommuPerm::ReadWrite));
    // memtree itself translates it.
    assert_eq!(
        dma.load::<u32>(top + 0x40, Endian::Little, A),
        (0x4321, MemTxResult::OK)
    );
    let core = dma.view().lookup(0).unwrap().region().clone();
    let adapter = VmMemoryIommu::new(&core, 0, &sys).unwrap();
    let mem = IommuMemory::new(
        (*sys.guest_memory()).clone(),
        adapter,
        true,
        Default::default(),
    );
    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        mem.read_obj::<u32>(GuestAddress(top + 0x40))
    }));
    match got {
        Ok(v) => assert_eq!(v.unwrap(), 0x4321),
        Err(p) => panic!(
            "IommuMemory::read_obj through the adapter panicked: {:?}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or(p.downcast_ref::<&str>().copied())
        ),
    }
}

/// Rule (IOTLB invalidation is exact, interop): an UNMAP notification that
/// arrives while the adapter is filling its IOTLB from a translation made
/// before the UNMAP must not leave the withdrawn page in the IOTLB (memtree's
/// own cache guards this with its generation; the adapter does not).
#[test]
fn vm_memory_adapter_unmap_racing_a_fill_is_not_lost() {
    use memtree::access::iommu::vm_memory_adapter::VmMemoryIommu;
    use memtree::vm_memory::{Bytes, GuestAddress, IommuMemory};
    use std::sync::mpsc;
    let (_memory, sys, dma, dev, hub) = table_setup(1 << 64);
    sys.store::<u32>(0x30_0040, 0x5151, Endian::Little, A)
        .into_result()
        .unwrap();
    dev.map
        .lock()
        .insert(0x2000, (0xfff, 0x30_0000, IommuPerm::ReadWrite));
    let core = dma.view().lookup(0).unwrap().region().clone();
    let adapter = VmMemoryIommu::new(&core, 0, &sys).unwrap();
    let mem = Arc::new(IommuMemory::new(
        (*sys.guest_memory()).clone(),
        adapter,
        true,
        Default::default(),
    ));
    let (computed_tx, computed_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    *dev.pause.lock() = Some((computed_tx, go_rx));
    let m = mem.clone();
    // A back-end thread misses and asks the device.
    let reader = std::thread::spawn(move || m.read_obj::<u32>(GuestAddress(0x2040)));
    computed_rx.recv().unwrap();
    // Meanwhile the guest unmaps the page and the device notifies.
    dev.map.lock().clear();
    hub.notify(
        0,
        &IotlbEvent {
            kind: IotlbEventKind::Unmap,
            entry: IotlbEntry::denied(0x2000, 0xfff),
        },
    )
    .unwrap();
    go_tx.send(()).unwrap();
    // The racing read may see the old page (it started before the UNMAP).
    let _ = reader.join().unwrap();
    assert_eq!(
        dma.load::<u32>(0x2040, Endian::Little, A).1,
        MemTxResult::DECODE_ERROR
    );
    // A read that starts after the UNMAP must not.
    let after = mem.read_obj::<u32>(GuestAddress(0x2040));
    assert!(
        after.is_err(),
        "the adapter serves a page unmapped before this read started: {after:?}"
    );
}

/// Rule (lifecycle: no access that starts after an unplug reaches the
/// unplugged device; the device is freed at unplug once nothing holds its
/// region): a vm-memory consumer translating through the adapter must see
/// the unplug like memtree's own accesses do.
#[test]
fn vm_memory_adapter_stops_translating_after_unplug() {
    use memtree::access::iommu::vm_memory_adapter::VmMemoryIommu;
    use memtree::vm_memory::{Bytes, GuestAddress, IommuMemory};
    let s = setup(12, 16);
    s.system
        .store::<u32>(0x30_0040, 0x9999, Endian::Little, A)
        .into_result()
        .unwrap();
    s.map(2, 0x30_0000, IommuPerm::ReadWrite);
    s.map(3, 0x30_0000, IommuPerm::ReadWrite);
    let core = s.dma.view().lookup(0).unwrap().region().clone();
    let adapter = VmMemoryIommu::new(&core, 0, &s.system).unwrap();
    drop(core);
    let mem = IommuMemory::new(
        (*s.system.guest_memory()).clone(),
        adapter,
        true,
        Default::default(),
    );
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2040)).unwrap(), 0x9999);
    s.memory.unplug(s.owner).unwrap();
    assert_eq!(
        s.dma.load::<u32>(0x3040, Endian::Little, A).1,
        MemTxResult::DECODE_ERROR
    );
    let weak_dev = Arc::downgrade(&s.device);
    let pagetable::Setup { device, .. } = s;
    drop(device);
    let alive = weak_dev.upgrade().is_some();
    let page3 = mem.read_obj::<u32>(GuestAddress(0x3040));
    assert!(
        page3.is_err() && !alive,
        "after the unplug the adapter still translates a fresh page through \
         the device ({page3:?}); device still alive: {alive}"
    );
}

/// Rule (lifecycle: "unplugging the IOMMU's owner makes the region's
/// accesses decode errors at once"): while something else still holds the
/// device, a vm-memory consumer gets errors after the unplug, both for a
/// page it had cached and for a fresh one.
#[test]
fn vm_memory_adapter_refuses_cached_and_fresh_pages_after_unplug() {
    use memtree::access::iommu::vm_memory_adapter::VmMemoryIommu;
    use memtree::vm_memory::{Bytes, GuestAddress, IommuMemory};
    let s = setup(12, 16);
    s.system
        .store::<u32>(0x30_0040, 0x9999, Endian::Little, A)
        .into_result()
        .unwrap();
    s.map(2, 0x30_0000, IommuPerm::ReadWrite);
    s.map(3, 0x30_0000, IommuPerm::ReadWrite);
    let core = s.dma.view().lookup(0).unwrap().region().clone();
    let adapter = VmMemoryIommu::new(&core, 0, &s.system).unwrap();
    drop(core);
    let mem = IommuMemory::new(
        (*s.system.guest_memory()).clone(),
        adapter,
        true,
        Default::default(),
    );
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2040)).unwrap(), 0x9999);
    s.memory.unplug(s.owner).unwrap();
    // `s.device` still holds the device.
    let cached = mem.read_obj::<u32>(GuestAddress(0x2040));
    let fresh = mem.read_obj::<u32>(GuestAddress(0x3040));
    assert!(
        cached.is_err() && fresh.is_err(),
        "after the unplug: cached page {cached:?}, fresh page {fresh:?}"
    );
}
