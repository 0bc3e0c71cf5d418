//! Hot-unplug of a device while another device still has a DMA mapping of
//! its memory out, the case QEMU's lifetime rules never settled.
//!
//! A NIC-like device owns a RAM buffer (its packet memory) and a register
//! block. A second device (a "DMA engine") maps the NIC's buffer and is in
//! the middle of reading it when the NIC is unplugged.
//!
//! What it shows:
//! * unplug removes the NIC's regions from every view in one commit and runs
//!   its finalizer; the [`UnplugReport`](memtree::UnplugReport) lists the
//!   mapping still out;
//! * the mapping keeps exactly what it needs: the NIC's **memory** stays
//!   valid and readable until the mapping is dropped; the NIC device
//!   itself (owner, regions, state) does not wait;
//! * the census explains who holds the surviving memory
//!   (`held by mapping #N -> memory nic0-buffer`), and the memory is freed
//!   by the unmap of the last mapping;
//! * teardown afterwards is clean.
//!
//! Run it: `cargo run --example hot_unplug`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use memtree::{DmaDirection, MemTxAttrs, Memory, ObjectKind, UnimplementedDevice};

fn main() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let space = memory.new_address_space("memory", system, None).unwrap();
    let bus = memory.address_space(space).unwrap();
    let a = MemTxAttrs::UNSPECIFIED;

    // Plug the NIC: 64 KiB of packet memory and a register block.
    let nic = memory.new_owner("nic0", None).unwrap();
    let finalized = Arc::new(AtomicBool::new(false));
    let f = finalized.clone();
    memory
        .set_finalizer(nic, Box::new(move || f.store(true, Ordering::SeqCst)))
        .unwrap();
    let buffer = memory.new_ram("nic0-buffer", 0x1_0000, Some(nic)).unwrap();
    let regs = memory
        .new_mmio(
            "nic0-regs",
            0x1000,
            Arc::new(UnimplementedDevice),
            Some(nic),
        )
        .unwrap();
    memory.add_subregion(system, 0xc000_0000, buffer).unwrap();
    memory.add_subregion(system, 0xc001_0000, regs).unwrap();
    // The census key of the buffer's memory, taken while the NIC is
    // plugged, stays valid for as long as that memory lives (the region id
    // goes stale at unplug).
    let buffer_key = memory
        .backend_census_key(buffer)
        .unwrap()
        .expect("a RAM region has host memory");

    // A packet arrives in the NIC's buffer.
    let packet: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();
    assert!(bus.write(0xc000_0000, &packet, a).is_ok());

    // Another device maps the buffer to read the packet (direct, no copy).
    let mapping = bus
        .map(0xc000_0000, packet.len() as u64, DmaDirection::ToDevice, a)
        .unwrap();
    assert!(!mapping.is_bounce(), "RAM is mapped directly");

    // The NIC is hot-unplugged while the mapping is out.
    let report = memory.unplug(nic).unwrap();
    println!(
        "unplugged {:?}, regions {:?}",
        report.owners, report.regions
    );
    for line in &report.outstanding {
        println!("  still out: {line}");
    }
    assert!(!report.outstanding.is_empty());
    assert!(
        finalized.load(Ordering::SeqCst),
        "the NIC finalized at unplug"
    );

    // The guest no longer sees the NIC...
    let mut probe = [0u8; 4];
    assert!(!bus.read(0xc000_0000, &mut probe, a).is_ok());
    // ...but the mapping still reads the packet: its memory is alive.
    let mut copy = vec![0u8; packet.len()];
    mapping.read(0, &mut copy).unwrap();
    assert_eq!(copy, packet);
    println!(
        "mapping still reads the {}-byte packet after unplug",
        copy.len()
    );

    // Why is that memory alive? The census says, from the key taken above.
    let survivor = memory
        .census()
        .entry(buffer_key)
        .expect("the buffer's memory is alive while mapped");
    assert_eq!(survivor.kind, ObjectKind::Backend);
    for line in memory.census().explain(buffer_key) {
        println!("  memory nic0-buffer: {line}");
    }
    assert!(
        memory.census_entry(buffer).is_err(),
        "the id is stale after unplug"
    );

    // Unmap: the last pin goes, the memory is freed.
    drop(mapping);
    assert!(!memory.census().is_live(buffer_key));
    println!("mapping dropped: memory nic0-buffer freed");

    drop(bus);
    let leaks = memory.teardown();
    print!("{leaks}");
    assert!(leaks.is_clean());
}
