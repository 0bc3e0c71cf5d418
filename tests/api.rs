//! The public API's contracts for a device author: census entries reached
//! from ids, and what a teardown with live handles reports and keeps.

use memtree::{Memory, ObjectKey, ObjectKind, TopologyError};

#[test]
fn census_entry_is_reached_from_each_kind_of_id() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let nic = memory.new_owner("nic0", None).unwrap();
    let buffer = memory.new_ram("nic0-buffer", 0x1000, Some(nic)).unwrap();
    memory.add_subregion(system, 0, buffer).unwrap();
    let space = memory.new_address_space("memory", system, None).unwrap();

    let owner_entry = memory.census_entry(nic).unwrap();
    assert_eq!(
        (owner_entry.kind, owner_entry.name.as_str()),
        (ObjectKind::Owner, "nic0")
    );
    let region_entry = memory.census_entry(buffer).unwrap();
    assert_eq!(
        (region_entry.kind, region_entry.name.as_str()),
        (ObjectKind::Region, "nic0-buffer")
    );
    // The region holds its owner and its memory.
    assert!(region_entry.holds.contains(&owner_entry.key));
    let backend = memory.backend_census_key(buffer).unwrap().unwrap();
    assert!(region_entry.holds.contains(&backend));
    assert_eq!(
        memory.census().entry(backend).unwrap().kind,
        ObjectKind::Backend
    );
    assert_eq!(memory.backend_census_key(system).unwrap(), None);
    let space_entry = memory.census_entry(space).unwrap();
    assert_eq!(
        (space_entry.kind, space_entry.name.as_str()),
        (ObjectKind::AddressSpace, "memory")
    );
    assert_eq!(
        memory.census_key(space).unwrap(),
        memory.address_space(space).unwrap().census_key()
    );
    assert!(!memory.why_alive(buffer).unwrap().is_empty());

    // Stale ids are their NoSuch* error, not another object's entry.
    memory.unplug(nic).unwrap();
    assert_eq!(
        memory.census_entry(nic).unwrap_err(),
        TopologyError::NoSuchOwner(nic)
    );
    assert_eq!(
        memory.census_key(buffer).unwrap_err(),
        TopologyError::NoSuchRegion(buffer)
    );
    memory.destroy_address_space(space).unwrap();
    assert_eq!(
        memory.why_alive(space).unwrap_err(),
        TopologyError::NoSuchSpace(space)
    );
    assert!(!memory.census().is_live(region_entry.key));
    assert!(memory.teardown().is_clean());
}

/// A machine with RAM of every lifecycle shape: mapped, owned by a device,
/// never mapped, and two regions on one shared backend (one mapped). Returns
/// the census keys of the memory behind each, by region name.
fn machine_with_every_ram_shape() -> (Memory, memtree::SpaceId, Vec<(&'static str, ObjectKey)>) {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let dev = memory.new_owner("dev0", None).unwrap();
    let mapped = memory.new_ram("pc.ram", 0x1000, None).unwrap();
    memory.add_subregion(system, 0, mapped).unwrap();
    let owned = memory.new_ram("dev0-ram", 0x1000, Some(dev)).unwrap();
    let lonely = memory.new_ram("never-mapped", 0x1000, None).unwrap();
    let backend = memory
        .new_backend("shared", 0x2000, memtree::RamBacking::Anonymous)
        .unwrap();
    let shared_a = memory
        .new_ram_from_backend("shared-a", &backend, 0, 0x1000, None)
        .unwrap();
    let shared_b = memory
        .new_ram_from_backend("shared-b", &backend, 0x1000, 0x1000, Some(dev))
        .unwrap();
    memory.add_subregion(system, 0x10_0000, shared_b).unwrap();
    drop(backend);
    let space = memory.new_address_space("memory", system, None).unwrap();
    let mut keys = Vec::new();
    for (name, id) in [
        ("pc.ram", mapped),
        ("dev0-ram", owned),
        ("never-mapped", lonely),
        ("shared-a", shared_a),
    ] {
        keys.push((name, memory.backend_census_key(id).unwrap().unwrap()));
    }
    (memory, space, keys)
}

#[test]
fn teardown_report_names_the_outside_handle_and_frees_what_it_does_not_need() {
    let (memory, space, keys) = machine_with_every_ram_shape();
    let census = memory.census().clone();
    let handle = memory.address_space(space).unwrap();
    let space_key = handle.census_key();
    let report = memory.teardown();

    // Only the handle's own state survives: teardown published the empty
    // view into it, so no region or memory is needed by it.
    let survivors: Vec<_> = report.survivors.iter().map(|(e, _)| e.key).collect();
    assert_eq!(survivors, vec![space_key], "{report}");
    let (_, chains) = &report.survivors[0];
    assert_eq!(
        chains,
        &vec![
            "held by an AddressSpace handle outside memtree (from Memory::address_space for \"memory\", or a SpaceCursor of it)"
                .to_owned()
        ]
    );
    assert!(
        !report.to_string().contains("held by address-space"),
        "{report}"
    );
    for (name, key) in &keys {
        assert!(!census.is_live(*key), "memory of {name} survived teardown");
    }
    // The handle still works: every access is unassigned.
    let error = handle
        .try_load::<u32>(0, memtree::Endian::Little, memtree::MemTxAttrs::UNSPECIFIED)
        .unwrap_err();
    assert!(error.contains(memtree::MemTxResult::DECODE_ERROR));
    drop(handle);
    assert!(memtree::lifecycle::diag::leak_report(&census).is_clean());
}

#[test]
fn teardown_report_names_a_held_view_and_keeps_only_what_it_maps() {
    let (memory, space, keys) = machine_with_every_ram_shape();
    let census = memory.census().clone();
    let handle = memory.address_space(space).unwrap();
    let view = handle.view();
    drop(handle);
    let report = memory.teardown();

    let by_kind = |kind: ObjectKind| -> Vec<String> {
        report
            .survivors
            .iter()
            .filter(|(e, _)| e.kind == kind)
            .map(|(e, _)| e.name.clone())
            .collect()
    };
    // The view maps pc.ram and shared-b: those regions, their memory and
    // owner stay; dev0-ram, the never-mapped RAM and shared-a are freed.
    assert_eq!(by_kind(ObjectKind::FlatView).len(), 1, "{report}");
    let mut regions = by_kind(ObjectKind::Region);
    regions.sort();
    assert_eq!(regions, ["pc.ram", "shared-b"], "{report}");
    let mut backends = by_kind(ObjectKind::Backend);
    backends.sort();
    assert_eq!(backends, ["pc.ram", "shared"], "{report}");
    assert!(by_kind(ObjectKind::AddressSpace).is_empty(), "{report}");
    // shared-b is dev0's: a mapped region keeps its device (its callbacks
    // and state may run for an access through the view).
    assert_eq!(by_kind(ObjectKind::Owner), ["dev0"], "{report}");
    for (name, key) in &keys {
        // shared-a's memory is the backend shared-b maps.
        let needed = matches!(*name, "pc.ram" | "shared-a");
        assert_eq!(census.is_live(*key), needed, "memory of {name}");
    }
    let holder =
        "held by an Arc<FlatView> outside memtree (from AddressSpace::view() of \"memory\")";
    for (e, chains) in &report.survivors {
        assert!(!chains.is_empty());
        for c in chains {
            assert!(c.starts_with(holder), "{} {}: {c}", e.kind.as_str(), e.name);
        }
    }
    drop(view);
    assert!(memtree::lifecycle::diag::leak_report(&census).is_clean());
}

#[test]
fn region_sizes_are_u128_and_host_memory_of_2_pow_64_is_refused() {
    let memory = Memory::new();
    let whole = memory.new_container("whole", 1 << 64, None).unwrap();
    assert_eq!(memory.region_info(whole).unwrap().size, 1 << 64);
    assert!(matches!(
        memory.new_container("too-big", (1 << 64) + 1, None),
        Err(TopologyError::SizeTooLarge(_))
    ));
    // The same u128 size type for RAM: 2^64 bytes of host memory cannot
    // exist, which is an error, not a truncation to 0.
    for result in [
        memory.new_ram("ram", 1 << 64, None),
        memory.new_rom("rom", 1 << 64, None),
        memory.new_ram_device("ramd", 1 << 64, None),
    ] {
        assert!(
            matches!(result, Err(TopologyError::Allocation { .. })),
            "{result:?}"
        );
    }
    let ram = memory.new_ram("ram", 0x1000, None).unwrap();
    assert_eq!(memory.region_info(ram).unwrap().size, 0x1000);
}

#[test]
fn one_byte_order_type_native_means_the_target_for_devices_and_accesses() {
    use memtree::{Endian, MemTxAttrs, Memory, MmioOps};
    use std::sync::Arc;
    // A register holding 0x11223344, declared in the target's order.
    struct NativeReg;
    impl MmioOps for NativeReg {
        fn read(&self, _: u64, size: u32, _: MemTxAttrs) -> Result<u64, memtree::MemTxResult> {
            assert_eq!(size, 4);
            Ok(0x1122_3344)
        }
        fn write(&self, _: u64, _: u64, _: u32, _: MemTxAttrs) -> memtree::MemTxResult {
            memtree::MemTxResult::OK
        }
        fn impl_sizes(&self) -> memtree::AccessSizes {
            memtree::AccessSizes::new(4, 4, false)
        }
        fn endianness(&self) -> Endian {
            Endian::Native
        }
    }
    let a = MemTxAttrs::UNSPECIFIED;
    for target in [Endian::Little, Endian::Big] {
        assert_eq!(Endian::Native.resolve(target), target);
        assert_eq!(Endian::Little.resolve(target), Endian::Little);
        assert_eq!(Endian::Big.resolve(target), Endian::Big);
        let memory = Memory::with_target_endian(target);
        let root = memory.new_container("system", 1 << 32, None).unwrap();
        let dev = memory
            .new_mmio("reg", 4, Arc::new(NativeReg), None)
            .unwrap();
        memory.add_subregion(root, 0x1000, dev).unwrap();
        let ram = memory.new_ram("ram", 0x1000, None).unwrap();
        memory.add_subregion(root, 0, ram).unwrap();
        let space = memory.new_address_space("memory", root, None).unwrap();
        let bus = memory.address_space(space).unwrap();
        // The device's bytes in memory order follow the target.
        let mut bytes = [0u8; 4];
        bus.read(0x1000, &mut bytes, a).into_result().unwrap();
        let expect = match target {
            Endian::Big => [0x11, 0x22, 0x33, 0x44],
            _ => [0x44, 0x33, 0x22, 0x11],
        };
        assert_eq!(bytes, expect, "a Native device on a {target:?} target");
        // A Native access request is the target's order too.
        bus.store::<u32>(0, 0xaabb_ccdd, Endian::Native, a)
            .into_result()
            .unwrap();
        bus.read(0, &mut bytes, a).into_result().unwrap();
        let expect = match target {
            Endian::Big => [0xaa, 0xbb, 0xcc, 0xdd],
            _ => [0xdd, 0xcc, 0xbb, 0xaa],
        };
        assert_eq!(bytes, expect, "a Native store on a {target:?} target");
        assert_eq!(
            bus.try_load::<u32>(0x1000, Endian::Native, a),
            Ok(0x1122_3344)
        );
    }
}

/// Where no target is known, `Native` is the host's order on every path: a
/// device outside a machine declaring `Native`, and a `Native` request on a
/// bare view, are not byte-swapped against a host-order counterpart.
#[test]
fn native_without_a_target_is_the_host_order_on_every_path() {
    use memtree::{Endian, MemTxAttrs, MmioOps};
    use std::sync::Arc;
    struct Dev(Endian);
    impl MmioOps for Dev {
        fn read(&self, _: u64, _: u32, _: MemTxAttrs) -> Result<u64, memtree::MemTxResult> {
            Ok(0x1122_3344)
        }
        fn write(&self, _: u64, _: u64, _: u32, _: MemTxAttrs) -> memtree::MemTxResult {
            memtree::MemTxResult::OK
        }
        fn endianness(&self) -> Endian {
            self.0
        }
    }
    let a = MemTxAttrs::UNSPECIFIED;
    let (v, _) = memtree::region::attrs::dispatch_read(&Dev(Endian::Native), 0, 4, Endian::HOST, a);
    assert_eq!(
        v, 0x1122_3344,
        "a Native device outside a machine is host order"
    );
    let m = Memory::new();
    let root = m.new_container("root", 1 << 32, None).unwrap();
    let io = m
        .new_mmio("dev", 0x1000, Arc::new(Dev(Endian::HOST)), None)
        .unwrap();
    m.add_subregion(root, 0, io).unwrap();
    let s = m.new_address_space("as", root, None).unwrap();
    let view = m.address_space(s).unwrap().view();
    let (v, _) = view.load::<u32>(0, Endian::Native, a);
    assert_eq!(
        v, 0x1122_3344,
        "a Native request on a bare view is host order"
    );
}
