//! rust-vmm interoperability: an address space's RAM as a vm-memory
//! `GuestMemoryMmap` that device crates can use directly.
#![cfg(all(feature = "vm-memory", unix))]

use std::sync::Arc;

use memtree::access::MemTxAttrs;
use memtree::census::ObjectKind;
use memtree::{diag, Memory, UnimplementedDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

/// The snapshot has one region per run of writable RAM (an alias window
/// of the same RAM contiguous with it merges; MMIO and ROM are left out);
/// vm-memory reads and writes land in memtree's RAM and the other way
/// round; an MMIO address is invalid to vm-memory.
#[test]
fn guest_memory_snapshot_maps_writable_ram_only() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let ram = memory.new_ram("pc.ram", 0x20_0000, None).unwrap();
    let low = memory
        .new_alias("ram-below-1m", ram, 0, 0x10_0000, None)
        .unwrap();
    let high = memory
        .new_alias("ram-above-1m", ram, 0x10_0000, 0x10_0000, None)
        .unwrap();
    memory.add_subregion(system, 0, low).unwrap();
    memory.add_subregion(system, 0x10_0000, high).unwrap();
    let mmio = memory
        .new_mmio("regs", 0x1000, Arc::new(UnimplementedDevice), None)
        .unwrap();
    memory.add_subregion(system, 0x4000_0000, mmio).unwrap();
    let rom = memory.new_rom("bios", 0x1_0000, None).unwrap();
    memory.add_subregion(system, 0xfff0_0000, rom).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();

    let gm = space.guest_memory().unwrap();
    let regions: Vec<(u64, u64)> = gm.iter().map(|r| (r.start_addr().0, r.len())).collect();
    assert_eq!(
        regions,
        vec![(0, 0x20_0000)],
        "two contiguous aliases of one RAM merge"
    );

    gm.write_obj(0xdead_beef_u32, GuestAddress(0x10_0ffe))
        .unwrap();
    let mut buf = [0u8; 4];
    assert!(space.read(0x10_0ffe, &mut buf, A).is_ok());
    assert_eq!(
        u32::from_le_bytes(buf),
        0xdead_beef,
        "across the alias seam"
    );
    space.write(0x2000, b"memtree", A);
    let mut got = [0u8; 7];
    gm.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
    assert_eq!(&got, b"memtree");
    assert!(
        gm.read_obj::<u32>(GuestAddress(0x4000_0000)).is_err(),
        "MMIO"
    );
    assert!(
        gm.read_obj::<u32>(GuestAddress(0xfff0_0000)).is_err(),
        "ROM"
    );
    drop(gm);
    drop(space);
    assert!(memory.teardown().is_clean());
}

/// A snapshot holds the memory of a device's RAM, not the device: after
/// unplug the back-end still reads and writes it, the census says why the
/// memory is alive, and dropping the snapshot frees it.
#[test]
fn guest_memory_snapshot_keeps_unplugged_device_memory_until_dropped() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let dev = memory.new_owner("ivshmem", None).unwrap();
    let shm = memory.new_ram("ivshmem.bar2", 0x1_0000, Some(dev)).unwrap();
    memory.add_subregion(system, 0x8000_0000, shm).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    space.write(0x8000_0010, &[7; 4], A);

    let gm = space.guest_memory().unwrap();
    let report = memory.unplug(dev).unwrap();
    assert_eq!(report.outstanding.len(), 1, "{report:?}");
    assert!(report.outstanding[0].contains("guest-memory memory 0x80000000+0x10000"));
    assert_eq!(
        gm.read_obj::<u32>(GuestAddress(0x8000_0010)).unwrap(),
        0x0707_0707
    );
    gm.write_obj(1u8, GuestAddress(0x8000_0000)).unwrap();

    let census = memory.census().clone();
    let backend = census
        .live()
        .into_iter()
        .find(|e| e.kind == ObjectKind::Backend && e.name == "ivshmem.bar2")
        .expect("the memory outlives its device");
    let why = diag::why_alive(&census, backend.key);
    assert!(
        why.len() == 1 && why[0].starts_with("held by mapping #"),
        "{why:?}"
    );
    assert!(!census
        .live()
        .iter()
        .any(|e| e.kind == ObjectKind::Owner && e.name == "ivshmem"));
    drop(gm);
    assert!(!census.is_live(backend.key), "freed with the snapshot");
    drop(space);
    assert!(memory.teardown().is_clean());
}
