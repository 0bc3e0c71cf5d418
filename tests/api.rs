//! The public API's contracts for a device author: census entries reached
//! from ids, and what a teardown with live handles reports and keeps.

use memtree::{Memory, ObjectKind, TopologyError};

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
