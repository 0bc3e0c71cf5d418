//! Ids are tied to the machine that made them (issue 13): an id of one
//! `Memory` passed to another is refused with `TopologyError::ForeignId` by
//! every kind of call, and the other machine is left as it was; ids of the
//! right machine keep working, and a stale id of the right machine is still
//! reported as stale.

use std::sync::Arc;

use memtree::{DirtyClient, Memory, MemoryListener, OwnerId, RegionId, SpaceId, TopologyError};

/// A machine with an owner, a container, RAM under it, an alias of the RAM
/// and an address space on the container.
struct Fixture {
    memory: Memory,
    owner: OwnerId,
    root: RegionId,
    ram: RegionId,
    alias: RegionId,
    space: SpaceId,
}

fn fixture() -> Fixture {
    let memory = Memory::new();
    let owner = memory.new_owner("dev", None).unwrap();
    let root = memory.new_container("root", 1 << 32, None).unwrap();
    let ram = memory.new_ram("ram", 0x1000, Some(owner)).unwrap();
    memory.add_subregion(root, 0, ram).unwrap();
    let alias = memory.new_alias("alias", ram, 0, 0x1000, None).unwrap();
    let space = memory.new_address_space("as", root, None).unwrap();
    Fixture {
        memory,
        owner,
        root,
        ram,
        alias,
        space,
    }
}

/// What a machine looks like from outside: its tree, its views, its owners.
fn state(m: &Memory) -> String {
    let mut s = String::new();
    for name in ["root", "ram", "alias", "other"] {
        for id in m.find_regions(name) {
            s += &format!("{:?}\n", m.region_info(id).unwrap());
        }
    }
    for (id, name) in m.address_spaces() {
        let view = m.address_space(id).unwrap().view();
        s += &format!("{name}: {:?}\n", view.ranges().len());
        for r in view.ranges() {
            s += &format!("  {:#x}+{:#x} {}\n", r.start(), r.len(), r.region().name());
        }
    }
    s
}

fn assert_foreign<T: std::fmt::Debug>(r: Result<T, TopologyError>, kind: &str, call: &str) {
    match r {
        Err(TopologyError::ForeignId {
            kind: k,
            id_machine,
            machine,
            ..
        }) => {
            assert_eq!(k, kind, "{call}: wrong kind");
            assert_ne!(id_machine, machine, "{call}");
        }
        other => panic!("{call}: expected ForeignId({kind}), got {other:?}"),
    }
}

struct Quiet;
impl MemoryListener for Quiet {}

#[test]
fn foreign_region_id_is_refused_by_every_region_call_and_the_machine_is_untouched() {
    let a = fixture();
    let b = fixture();
    let before = state(&b.memory);
    let r = a.ram;
    let m = &b.memory;
    assert_foreign(
        m.add_subregion(b.root, 0x8000, r),
        "region",
        "add_subregion sub",
    );
    assert_foreign(
        m.add_subregion(r, 0, b.ram),
        "region",
        "add_subregion container",
    );
    assert_foreign(
        m.add_subregion_overlap(b.root, 0x8000, r, 1),
        "region",
        "add_subregion_overlap",
    );
    assert_foreign(
        m.add_subregions(b.root, &[(0x8000, r, 0)]).map_err(|e| e.1),
        "region",
        "add_subregions",
    );
    assert_foreign(m.del_subregion(b.root, r), "region", "del_subregion");
    assert_foreign(m.set_enabled(r, false), "region", "set_enabled");
    assert_foreign(m.set_address(r, 0x2000), "region", "set_address");
    assert_foreign(m.set_readonly(r, true), "region", "set_readonly");
    assert_foreign(m.set_nonvolatile(r, true), "region", "set_nonvolatile");
    assert_foreign(m.set_unmergeable(r, true), "region", "set_unmergeable");
    assert_foreign(m.set_size(r, 0x2000), "region", "set_size");
    assert_foreign(m.set_dirty_log_mask(r, 1), "region", "set_dirty_log_mask");
    assert_foreign(m.set_alias_offset(a.alias, 0), "region", "set_alias_offset");
    assert_foreign(m.set_log(r, DirtyClient::VGA, true), "region", "set_log");
    assert_foreign(m.region_info(r), "region", "region_info");
    assert_foreign(
        m.new_alias("a2", r, 0, 0x1000, None),
        "region",
        "new_alias target",
    );
    assert_foreign(
        m.new_address_space("as2", r, None),
        "region",
        "new_address_space root",
    );
    assert_foreign(m.add_coalescing(r, 0, 0x100), "region", "add_coalescing");
    assert_foreign(m.destroy_region(a.alias), "region", "destroy_region");
    assert_eq!(state(&b.memory), before, "the other machine changed");
    // The ids still work with their own machine.
    a.memory.set_enabled(r, false).unwrap();
    a.memory.destroy_region(a.alias).unwrap();
}

#[test]
fn foreign_owner_id_is_refused_by_every_owner_call_and_the_machine_is_untouched() {
    let a = fixture();
    let b = fixture();
    let before = state(&b.memory);
    let o = a.owner;
    let m = &b.memory;
    assert_foreign(m.unplug(o), "owner", "unplug");
    assert_foreign(
        m.set_finalizer(o, Box::new(|| {})),
        "owner",
        "set_finalizer",
    );
    assert_foreign(m.new_owner("child", Some(o)), "owner", "new_owner parent");
    assert_foreign(m.new_ram("r2", 0x1000, Some(o)), "owner", "new_ram owner");
    assert_foreign(
        m.new_container("c2", 0x1000, Some(o)),
        "owner",
        "new_container owner",
    );
    assert_foreign(
        m.new_address_space("as2", b.root, Some(o)),
        "owner",
        "new_address_space owner",
    );
    assert_eq!(state(&b.memory), before, "the other machine changed");
    // b's own owner (same slot number as a's) is still plugged in.
    assert!(b.memory.region_info(b.ram).is_ok());
    let report = a.memory.unplug(o).unwrap();
    assert!(a.memory.region_info(a.ram).is_err(), "{report:?}");
    assert!(b.memory.region_info(b.ram).is_ok());
}

#[test]
fn foreign_space_and_listener_ids_are_refused_and_the_machine_is_untouched() {
    let a = fixture();
    let b = fixture();
    let before = state(&b.memory);
    let m = &b.memory;
    assert_foreign(m.address_space(a.space), "address space", "address_space");
    assert_foreign(
        m.register_listener(a.space, Arc::new(Quiet)),
        "address space",
        "register_listener",
    );
    assert_foreign(
        m.destroy_address_space(a.space),
        "address space",
        "destroy_address_space",
    );
    let listener = a
        .memory
        .register_listener(a.space, Arc::new(Quiet))
        .unwrap();
    let own = m.register_listener(b.space, Arc::new(Quiet)).unwrap();
    assert_foreign(
        m.unregister_listener(listener),
        "listener",
        "unregister_listener",
    );
    assert_eq!(state(&b.memory), before, "the other machine changed");
    m.unregister_listener(own).unwrap();
    a.memory.unregister_listener(listener).unwrap();
    a.memory.destroy_address_space(a.space).unwrap();
    assert!(b.memory.address_space(b.space).is_ok());
}

#[test]
fn stale_ids_of_the_same_machine_are_reported_stale_not_foreign() {
    let a = fixture();
    let m = &a.memory;
    m.destroy_region(a.alias).unwrap();
    assert!(matches!(
        m.set_enabled(a.alias, false),
        Err(TopologyError::NoSuchRegion(id)) if id == a.alias
    ));
    m.destroy_address_space(a.space).unwrap();
    assert!(matches!(
        m.address_space(a.space),
        Err(TopologyError::NoSuchSpace(_))
    ));
    m.unplug(a.owner).unwrap();
    assert!(matches!(
        m.unplug(a.owner),
        Err(TopologyError::NoSuchOwner(_))
    ));
}

#[test]
fn foreign_id_error_names_the_kind_and_both_machines() {
    let a = fixture();
    let b = fixture();
    let e = b.memory.set_enabled(a.ram, false).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("region id"), "{text}");
    assert!(text.contains("another machine"), "{text}");
    // Same slot numbers in both machines: only the tag tells them apart.
    assert_eq!(format!("{:?}", a.ram), format!("{:?}", b.ram));
    assert_ne!(a.ram, b.ram);
}
