//! rust-vmm interoperability: an address space's RAM as a vm-memory
//! `GuestMemory` that device crates can use directly, and that nothing
//! handed out can outlive.
#![cfg(all(feature = "vm-memory", unix))]

use std::sync::Arc;

use memtree::integrations::guest_memory::GuestRam;
use memtree::lifecycle::census::ObjectKind;
use memtree::region::attrs::MemTxAttrs;
use memtree::vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion,
};
use memtree::{lifecycle::diag, Memory, RamBacking, UnimplementedDevice};

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

/// The view has one region per run of writable RAM (an alias window
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

    let gm = space.guest_memory();
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
    space.write(0x2000, b"memtree", A).into_result().unwrap();
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
    // A volatile slice writes straight into memtree's RAM; one that would
    // run past the region is refused.
    let slice = gm.get_slice(GuestAddress(0x1_0000), 4).unwrap();
    slice.write_obj(0x1234_5678_u32, 0).unwrap();
    assert_eq!(
        space.load::<u32>(0x1_0000, memtree::Endian::Little, A).0,
        0x1234_5678
    );
    assert!(gm.get_slice(GuestAddress(0x1f_fffe), 4).is_err());
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
    space.write(0x8000_0010, &[7; 4], A).into_result().unwrap();

    let gm = space.guest_memory();
    let report = memory.unplug(dev).unwrap();
    assert_eq!(report.outstanding.len(), 1, "{report:?}");
    assert!(report.outstanding[0].contains("vm-memory-region memory 0x80000000+0x10000"));
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

/// Whether this process maps the memfd called `name` (`/proc/self/maps`
/// shows memfd mappings as `/memfd:NAME (deleted)`).
#[cfg(not(miri))]
fn memfd_mapped(name: &str) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let needle = format!("/memfd:{name} ");
    maps.lines().any(|l| l.contains(&needle))
}

/// The issue-8 crash: a clone of the vm-memory view (a clone of the
/// collection, and an `Arc` of it) outlives every memtree handle, the
/// device's unplug and the machine's teardown, still reads what was written
/// before, and holds the memory until the last clone drops; then, and only
/// then, the memory is freed (census finalization and the memfd mapping
/// leaving the process's address space). Runs under Miri too (without the
/// `/proc` check: Miri backs RAM with the heap).
#[test]
fn vm_memory_clone_outlives_unplug() {
    let name = format!("memtree-vm-memory-clone-{}", std::process::id());
    let size: u64 = if cfg!(miri) { 0x1_0000 } else { 0x20_0000 };
    let memory = Memory::new();
    let census = memory.census().clone();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let boot = memory.new_ram("boot.ram", 0x1000, None).unwrap();
    memory.add_subregion(system, 0, boot).unwrap();
    let dimm = memory.new_owner("dimm0", None).unwrap();
    let ram = memory
        .new_ram_with(&name, u128::from(size), Some(dimm), RamBacking::Memfd)
        .unwrap();
    memory.add_subregion(system, 0x1000_0000, ram).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    space
        .write(0x1000_0100, &0xfeed_f00d_u32.to_le_bytes(), A)
        .into_result()
        .unwrap();
    space
        .write(0x1000_0000 + size - 4, b"last", A)
        .into_result()
        .unwrap();

    let view = space.guest_memory();
    let collection_clone: GuestRam = (*view).clone();
    let arc_clone: Arc<GuestRam> = space.memory();
    assert!(Arc::ptr_eq(&view, &arc_clone), "one collection per view");
    let backend = census
        .live()
        .into_iter()
        .find(|e| e.kind == ObjectKind::Backend && e.name == name)
        .expect("the DIMM's memory is registered");
    #[cfg(not(miri))]
    assert!(memfd_mapped(&name));

    // Every memtree handle goes: the view, the address space, the device,
    // the machine.
    drop(view);
    drop(space);
    let unplug = memory.unplug(dimm).unwrap();
    assert!(
        unplug
            .outstanding
            .iter()
            .any(|o| o.contains("vm-memory-region memory 0x10000000")),
        "{unplug:?}"
    );
    // What survives teardown is the memory the clones map (the DIMM's and
    // the boot RAM) and the vm-memory regions' table entries, nothing else.
    let report = memory.teardown();
    let mut backends: Vec<_> = report
        .survivors
        .iter()
        .filter(|(e, _)| e.kind == ObjectKind::Backend)
        .map(|(e, _)| e.name.clone())
        .collect();
    backends.sort();
    assert_eq!(
        backends,
        vec!["boot.ram".to_owned(), name.clone()],
        "{report}"
    );
    assert!(
        report
            .survivors
            .iter()
            .all(|(e, _)| e.kind == ObjectKind::Backend
                || (e.kind == ObjectKind::Mapping
                    && e.name.starts_with("vm-memory-region memory "))),
        "{report}"
    );
    let why = census.explain(backend.key);
    assert!(
        !why.is_empty()
            && why
                .iter()
                .all(|w| w.starts_with("held by mapping #") && w.contains("vm-memory-region")),
        "the census names the vm-memory regions as the holders: {why:?}"
    );

    // Both clones still read the bytes written before, and write.
    for gm in [&collection_clone, &*arc_clone] {
        assert_eq!(
            gm.read_obj::<u32>(GuestAddress(0x1000_0100)).unwrap(),
            0xfeed_f00d
        );
        let mut last = [0u8; 4];
        gm.read_slice(&mut last, GuestAddress(0x1000_0000 + size - 4))
            .unwrap();
        assert_eq!(&last, b"last");
    }
    collection_clone
        .write_obj(7u8, GuestAddress(0x1000_0000))
        .unwrap();
    assert_eq!(
        arc_clone.read_obj::<u8>(GuestAddress(0x1000_0000)).unwrap(),
        7
    );

    // The memory goes with the last clone, not before.
    drop(arc_clone);
    assert!(census.is_live(backend.key), "a clone still holds it");
    #[cfg(not(miri))]
    assert!(memfd_mapped(&name), "a clone still maps it");
    assert_eq!(
        collection_clone
            .read_obj::<u32>(GuestAddress(0x1000_0100))
            .unwrap(),
        0xfeed_f00d
    );
    drop(collection_clone);
    assert!(
        !census.is_live(backend.key),
        "freed with the last clone: {:?}",
        diag::why_alive(&census, backend.key)
    );
    #[cfg(not(miri))]
    assert!(!memfd_mapped(&name), "unmapped with the last clone");
    let after = diag::leak_report(&census);
    assert!(after.is_clean(), "{after}");
}

/// A device written against vm-memory: it stores an `M: GuestAddressSpace`
/// and asks it for the memory on every request, as virtio-queue and
/// vhost-user-backend do.
struct VmMemoryDevice<M: GuestAddressSpace> {
    mem: M,
}

impl<M: GuestAddressSpace> VmMemoryDevice<M> {
    fn read_u32(&self, addr: u64) -> Option<u32> {
        self.mem.memory().read_obj(GuestAddress(addr)).ok()
    }
    fn write_u32(&self, addr: u64, value: u32) -> bool {
        self.mem
            .memory()
            .write_obj(value, GuestAddress(addr))
            .is_ok()
    }
}

/// A consumer created before a DIMM is plugged reads and writes it once it
/// is, and no longer sees it after its unplug; a `memory()` taken before the
/// unplug is a snapshot that still holds it. Between two commits `memory()`
/// returns the same cached collection.
#[test]
fn guest_address_space_sees_hotplug() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 40, None).unwrap();
    let boot = memory.new_ram("boot.ram", 0x10_0000, None).unwrap();
    memory.add_subregion(system, 0, boot).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    let device = VmMemoryDevice { mem: space.clone() };
    const DIMM: u64 = 0x1_0000_0000;
    assert_eq!(device.read_u32(DIMM), None, "nothing there yet");
    assert!(device.write_u32(0x100, 1));
    assert!(
        Arc::ptr_eq(&device.mem.memory(), &device.mem.memory()),
        "cached per view"
    );
    let before = device.mem.memory();

    let owner = memory.new_owner("dimm1", None).unwrap();
    let ram = memory.new_ram("dimm1.ram", 0x10_0000, Some(owner)).unwrap();
    memory.add_subregion(system, DIMM, ram).unwrap();
    space
        .write(DIMM + 0x40, &0xc0ff_ee00_u32.to_le_bytes(), A)
        .into_result()
        .unwrap();
    assert_eq!(device.read_u32(DIMM + 0x40), Some(0xc0ff_ee00));
    assert!(device.write_u32(DIMM + 0x80, 0x5555_aaaa));
    assert_eq!(
        space.load::<u32>(DIMM + 0x80, memtree::Endian::Little, A).0,
        0x5555_aaaa
    );
    assert_eq!(device.read_u32(0x100), Some(1), "boot RAM still there");
    assert!(!Arc::ptr_eq(&before, &device.mem.memory()), "a new view");
    assert_eq!(before.num_regions(), 1, "an old snapshot does not change");

    let held = device.mem.memory();
    memory.unplug(owner).unwrap();
    assert_eq!(device.read_u32(DIMM + 0x40), None, "unplugged");
    assert!(!device.write_u32(DIMM + 0x40, 0));
    assert_eq!(device.read_u32(0x100), Some(1));
    assert_eq!(
        held.read_obj::<u32>(GuestAddress(DIMM + 0x80)).unwrap(),
        0x5555_aaaa,
        "a snapshot taken before the unplug still holds the memory"
    );
    drop((held, before, device, space));
    assert!(memory.teardown().is_clean());
}

/// Issue 14 item 11: writable RAM that ends at 2^64 - 1 no longer makes the
/// whole view fail: its run is clipped by the last byte (vm-memory needs
/// `start + len` to fit a u64), everything else is unchanged, and a one-byte
/// run at the top is left out.
#[test]
fn guest_memory_clips_ram_ending_at_top_of_address_space() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1u128 << 64, None).unwrap();
    let low = memory.new_ram("low", 0x1000, None).unwrap();
    let top = memory.new_ram("top", 0x1000, None).unwrap();
    memory.add_subregion(system, 0, low).unwrap();
    memory.add_subregion(system, u64::MAX - 0xfff, top).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();

    let gm = space.guest_memory();
    let regions: Vec<(u64, u64)> = gm.iter().map(|r| (r.start_addr().0, r.len())).collect();
    assert_eq!(regions, vec![(0, 0x1000), (u64::MAX - 0xfff, 0xfff)]);
    assert_eq!(gm.last_addr(), GuestAddress(u64::MAX - 1));
    gm.write_obj(0xabcd_u16, GuestAddress(u64::MAX - 2))
        .unwrap();
    assert_eq!(
        space
            .load::<u16>(u64::MAX - 2, memtree::Endian::Little, A)
            .0,
        0xabcd
    );
    assert!(gm.read_obj::<u8>(GuestAddress(u64::MAX)).is_err());
    assert!(gm.read_obj::<u16>(GuestAddress(u64::MAX - 1)).is_err());
    gm.write_obj(3u8, GuestAddress(0xfff)).unwrap();
    drop(gm);

    // Only the top byte is RAM: nothing vm-memory can represent is left.
    let one = memory.new_ram("one", 1, None).unwrap();
    memory.del_subregion(system, top).unwrap();
    memory.add_subregion(system, u64::MAX, one).unwrap();
    let gm = space.guest_memory();
    let regions: Vec<(u64, u64)> = gm.iter().map(|r| (r.start_addr().0, r.len())).collect();
    assert_eq!(regions, vec![(0, 0x1000)]);
    assert_eq!(gm.read_obj::<u8>(GuestAddress(0xfff)).unwrap(), 3);
    drop((gm, space));
    assert!(memory.teardown().is_clean());
}

/// What a multi-threaded back-end needs (vhost-user-backend requires
/// `Send + Sync` memory), from the fields' own impls: memtree declares none
/// for these types.
#[test]
fn vm_memory_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<memtree::integrations::guest_memory::GuestRamRegion>();
    send_sync::<GuestRam>();
    send_sync::<Arc<GuestRam>>();
    send_sync::<memtree::AddressSpace>();
}

/// A back-end thread asks for the memory per request while the VMM plugs
/// and unplugs a DIMM: each `memory()` is a consistent snapshot (the DIMM
/// reads its pattern or is absent, boot RAM is always there), the thread
/// sees every plug and every unplug, and teardown is clean afterwards.
#[test]
fn guest_address_space_hotplug_while_a_thread_reads() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const DIMM: u64 = 0x1_0000_0000;
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 40, None).unwrap();
    let boot = memory.new_ram("boot.ram", 0x1000, None).unwrap();
    memory.add_subregion(system, 0, boot).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    space.write(0x10, &[9; 4], A).into_result().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Reads that found the DIMM, reads that found nothing there.
    let seen = Arc::new(AtomicU64::new(0));
    let absent = Arc::new(AtomicU64::new(0));
    let reader = {
        let (mem, stop, seen, absent) = (space.clone(), stop.clone(), seen.clone(), absent.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let snapshot = mem.memory();
                assert_eq!(
                    snapshot.read_obj::<u32>(GuestAddress(0x10)).unwrap(),
                    0x0909_0909
                );
                match snapshot.read_obj::<u32>(GuestAddress(DIMM + 0x20)) {
                    Ok(v) => {
                        assert_eq!(v, 0xa5a5_a5a5);
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        absent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::yield_now();
            }
        })
    };
    // Waits until the reader has made one more read of the given kind.
    let wait_for = |counter: &AtomicU64, reader: &std::thread::JoinHandle<()>| {
        let from = counter.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while counter.load(Ordering::Relaxed) <= from + 1 {
            assert!(!reader.is_finished(), "the reader failed");
            assert!(std::time::Instant::now() < deadline, "the reader is stuck");
            std::thread::yield_now();
        }
    };
    let rounds = if cfg!(miri) { 2 } else { 50 };
    for i in 0..rounds {
        let owner = memory.new_owner(&format!("dimm{i}"), None).unwrap();
        // Filled before it is plugged: a reader sees the pattern or nothing.
        let backend = memory
            .new_backend("dimm.ram", 0x1000, RamBacking::Anonymous)
            .unwrap();
        backend.write(0x20, &[0xa5; 4]).unwrap();
        let ram = memory
            .new_ram_from_backend("dimm.ram", &backend, 0, 0x1000, Some(owner))
            .unwrap();
        drop(backend);
        memory.add_subregion(system, DIMM, ram).unwrap();
        wait_for(&seen, &reader);
        memory.unplug(owner).unwrap();
        wait_for(&absent, &reader);
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    drop(space);
    assert!(memory.teardown().is_clean());
}

/// A vm-memory view nobody holds any more holds nothing: the unplug report
/// (made while the old flat view is still published) lists no
/// vm-memory region, and the table has no entry for it; one still held is
/// listed.
#[test]
fn guest_memory_dropped_view_is_not_reported_at_unplug() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let a = memory.new_owner("ivshmem-a", None).unwrap();
    let b = memory.new_owner("ivshmem-b", None).unwrap();
    let shm_a = memory.new_ram("a.bar2", 0x1_0000, Some(a)).unwrap();
    let shm_b = memory.new_ram("b.bar2", 0x1_0000, Some(b)).unwrap();
    memory.add_subregion(system, 0x8000_0000, shm_a).unwrap();
    memory.add_subregion(system, 0x9000_0000, shm_b).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    let gm = space.guest_memory();
    assert_eq!(space.outstanding_mappings().len(), 2, "one per region");
    drop(gm);
    assert!(space.outstanding_mappings().is_empty());
    let report = memory.unplug(a).unwrap();
    assert!(report.outstanding.is_empty(), "{report:?}");

    let held = space.memory();
    let report = memory.unplug(b).unwrap();
    assert_eq!(report.outstanding.len(), 1, "{report:?}");
    assert!(report.outstanding[0].contains("vm-memory-region memory 0x90000000+0x10000"));
    drop((held, space));
    assert!(memory.teardown().is_clean());
}

/// RAM at an address and of a size that are not page multiples is in the
/// view (memtree's regions need no alignment, unlike `MmapRegion`), with
/// its exact bounds.
#[test]
fn guest_memory_includes_unaligned_ram() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let ram = memory.new_ram("odd", 0x180, None).unwrap();
    memory.add_subregion(system, 0x1234, ram).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    let gm = space.guest_memory();
    let regions: Vec<(u64, u64)> = gm.iter().map(|r| (r.start_addr().0, r.len())).collect();
    assert_eq!(regions, vec![(0x1234, 0x180)]);
    gm.write_obj(0x0102_0304_u32, GuestAddress(0x1234 + 0x17c))
        .unwrap();
    let mut got = [0u8; 4];
    assert!(space.read(0x1234 + 0x17c, &mut got, A).is_ok());
    assert_eq!(u32::from_le_bytes(got), 0x0102_0304);
    assert!(gm.read_obj::<u32>(GuestAddress(0x1234 + 0x17d)).is_err());
    assert!(gm.read_obj::<u8>(GuestAddress(0x1233)).is_err());
    drop((gm, space));
    assert!(memory.teardown().is_clean());
}
