//! The IOMMU's target address spaces and the census (issue 10, lifecycle:
//! "the census explains what survives").

#[path = "support/table_iommu.rs"]
mod table_iommu;

use memtree::access::iommu::{IommuHub, IommuPerm};
use memtree::{Endian, MemTxAttrs, Memory};
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
