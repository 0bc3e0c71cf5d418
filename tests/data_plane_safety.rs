//! What the data plane does when other people's code misbehaves
//! (issue 14): MMIO callbacks that panic under a bounce buffer, map clients
//! that re-register themselves, ownerless RAM created and destroyed in a loop.
//!
//! * `bounce_prefill_panic_releases_the_bounce_space`,
//!   `bounce_write_back_panic_releases_the_bounce_space_and_the_table_entry`:
//!   a device callback's panic reaches the caller; the address space's bounce
//!   accounting and the mapping table are as if the mapping never existed.
//! * `map_client_reregistering_itself_from_its_callback_is_deferred_not_recursive`:
//!   a client that registers itself again from its callback runs once per
//!   event, never recursively.
//! * `ownerless_ram_is_freed_when_its_last_user_goes`: ownerless memory that
//!   no view, mapping or cache uses any more is freed at once, not at
//!   teardown; a DMA mapping or cache of it keeps it valid until it goes.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use memtree::dma::cache::MemoryRegionCache;
use memtree::dma::mapping::DmaError;
use memtree::host::mapping_info::DmaDirection;
use memtree::region::attrs::{Endian, MemTxAttrs, MemTxResult, MmioOps};
use memtree::{AddressSpace, Memory, RamBacking, RegionId};

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

/// A device whose reads and writes panic while `panic_reads` /
/// `panic_writes` are set.
#[derive(Default)]
struct Panicky {
    panic_reads: AtomicBool,
    panic_writes: AtomicBool,
}

impl MmioOps for Panicky {
    fn read(&self, _: u64, _: u32, _: MemTxAttrs) -> Result<u64, MemTxResult> {
        if self.panic_reads.load(Ordering::SeqCst) {
            panic!("device read panics");
        }
        Ok(0x5a)
    }
    fn write(&self, _: u64, _: u64, _: u32, _: MemTxAttrs) -> MemTxResult {
        if self.panic_writes.load(Ordering::SeqCst) {
            panic!("device write panics");
        }
        MemTxResult::OK
    }
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

/// RAM at 0, the panicky device's MMIO at 0x1000 (0x100 bytes).
fn machine_with_panicky_device() -> (Memory, AddressSpace, Arc<Panicky>) {
    let memory = Memory::new();
    let root = memory.new_container("root", 1 << 32, None).unwrap();
    let ram = memory.new_ram("ram", 0x1000, None).unwrap();
    memory.add_subregion(root, 0, ram).unwrap();
    let dev = Arc::new(Panicky::default());
    let owner = memory.new_owner("dev", None).unwrap();
    let mmio = memory
        .new_mmio("dev.mmio", 0x100, dev.clone(), Some(owner))
        .unwrap();
    memory.add_subregion(root, 0x1000, mmio).unwrap();
    let id = memory.new_address_space("as", root, None).unwrap();
    let space = memory.address_space(id).unwrap();
    (memory, space, dev)
}

/// Checks that nothing of a failed bounce mapping is left: no bounce space
/// reserved, no table entry, and a full-size bounce mapping works again.
fn assert_bounce_space_is_free(space: &AddressSpace) {
    assert_eq!(space.bounce_in_use(), 0, "bounce space released");
    assert!(
        space.outstanding_mappings().is_empty(),
        "no mapping-table entry left: {:?}",
        space.outstanding_mappings()
    );
    let m = space
        .map(0x1000, 0x100, DmaDirection::ToDevice, A)
        .expect("a later bounce map gets space");
    assert_eq!(m.len(), 0x100);
    drop(m);
    assert_eq!(space.bounce_in_use(), 0);
}

#[test]
fn bounce_prefill_panic_releases_the_bounce_space() {
    let (_memory, space, dev) = machine_with_panicky_device();
    dev.panic_reads.store(true, Ordering::SeqCst);
    for dir in [DmaDirection::ToDevice, DmaDirection::Bidirectional] {
        let r = catch_unwind(AssertUnwindSafe(|| space.map(0x1000, 0x100, dir, A)));
        assert!(r.is_err(), "the callback's panic reaches the caller");
        assert_eq!(space.bounce_in_use(), 0, "bounce space released ({dir:?})");
    }
    dev.panic_reads.store(false, Ordering::SeqCst);
    assert_bounce_space_is_free(&space);
}

#[test]
fn bounce_write_back_panic_releases_the_bounce_space_and_the_table_entry() {
    let (_memory, space, dev) = machine_with_panicky_device();
    dev.panic_writes.store(true, Ordering::SeqCst);
    // Unmapped explicitly, and dropped.
    let mut m = space
        .map(0x1000, 0x100, DmaDirection::FromDevice, A)
        .unwrap();
    m.write(0, &[1; 0x100]).unwrap();
    assert_eq!(space.bounce_in_use(), 0x100);
    assert_eq!(space.outstanding_mappings().len(), 1);
    let r = catch_unwind(AssertUnwindSafe(|| m.unmap(0x100)));
    assert!(r.is_err(), "the callback's panic reaches the caller");
    assert_eq!(space.bounce_in_use(), 0);
    assert!(space.outstanding_mappings().is_empty());
    let m = space
        .map(0x1000, 0x100, DmaDirection::Bidirectional, A)
        .unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| drop(m)));
    assert!(r.is_err(), "the callback's panic reaches the caller");
    dev.panic_writes.store(false, Ordering::SeqCst);
    assert_bounce_space_is_free(&space);
}

/// Registers a client that counts its runs and registers itself again from
/// its callback, forever.
fn register_self_reregistering(space: &AddressSpace, runs: &Arc<AtomicUsize>) {
    let (again, runs2) = (space.clone(), runs.clone());
    space.register_map_client(move || {
        runs2.fetch_add(1, Ordering::SeqCst);
        register_self_reregistering(&again, &runs2);
    });
}

#[test]
fn map_client_reregistering_itself_from_its_callback_is_deferred_not_recursive() {
    let (_memory, space, _dev) = machine_with_panicky_device();
    let runs = Arc::new(AtomicUsize::new(0));
    // Bounce space is free: the client runs at once, and its re-registration
    // waits for the next time space frees (today: unbounded recursion).
    register_self_reregistering(&space, &runs);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Each release of bounce space runs it once more.
    for n in 2..5 {
        let m = space.map(0x1000, 0x10, DmaDirection::ToDevice, A).unwrap();
        drop(m);
        assert_eq!(runs.load(Ordering::SeqCst), n);
    }
    // A client that maps and unmaps from its callback (freeing space while
    // clients are being run) is bounded too.
    let inner = Arc::new(AtomicUsize::new(0));
    fn remap_and_reregister(space: &AddressSpace, runs: &Arc<AtomicUsize>) {
        let (again, runs2) = (space.clone(), runs.clone());
        space.register_map_client(move || {
            runs2.fetch_add(1, Ordering::SeqCst);
            let m = again
                .map(0x1000, 0x10, DmaDirection::ToDevice, A)
                .expect("space is free");
            drop(m);
            remap_and_reregister(&again, &runs2);
        });
    }
    remap_and_reregister(&space, &inner);
    assert_eq!(inner.load(Ordering::SeqCst), 1);
    assert_eq!(space.bounce_in_use(), 0);
}

#[test]
fn map_client_that_panics_keeps_the_other_clients() {
    let (_memory, space, _dev) = machine_with_panicky_device();
    // Fill the bounce space so that clients wait.
    let m = space.map(0x1000, 0x100, DmaDirection::ToDevice, A).unwrap();
    space.set_max_bounce_buffer_size(0x100);
    assert!(matches!(
        space.map(0x1000, 1, DmaDirection::ToDevice, A),
        Err(DmaError::NoBounceSpace { .. })
    ));
    let ran = Arc::new(AtomicUsize::new(0));
    space.register_map_client(|| panic!("client panics"));
    let ran2 = ran.clone();
    space.register_map_client(move || {
        ran2.fetch_add(1, Ordering::SeqCst);
    });
    let r = catch_unwind(AssertUnwindSafe(|| drop(m)));
    assert!(r.is_err(), "the client's panic reaches the caller");
    assert_eq!(space.bounce_in_use(), 0, "the space was released first");
    // The second client was not lost: it runs at the next event.
    space.set_max_bounce_buffer_size(0x200);
    assert_eq!(ran.load(Ordering::SeqCst), 1);
}

/// Adds 1 MiB of ownerless RAM over `backend` at 0x10_0000 under `root`.
fn plug_ownerless(
    memory: &Memory,
    root: RegionId,
    backend: &Arc<memtree::MemoryBackend>,
) -> RegionId {
    let r = memory
        .new_ram_from_backend("scratch", backend, 0, 1 << 20, None)
        .unwrap();
    memory.add_subregion(root, 0x10_0000, r).unwrap();
    r
}

fn unplug_ownerless(memory: &Memory, root: RegionId, r: RegionId) {
    memory.del_subregion(root, r).unwrap();
    memory.destroy_region(r).unwrap();
}

#[test]
fn ownerless_ram_is_freed_when_its_last_user_goes() {
    let memory = Memory::new();
    let root = memory.new_container("root", 1 << 32, None).unwrap();
    let id = memory.new_address_space("as", root, None).unwrap();
    let space = memory.address_space(id).unwrap();
    let census = memory.census().clone();
    let mut freed = 0;
    for round in 0..100u8 {
        let backend = memory
            .new_backend("scratch", 1 << 20, RamBacking::Anonymous)
            .unwrap();
        // The census finalizes a backend when its host memory is freed.
        let key = backend.census_key();
        let r = plug_ownerless(&memory, root, &backend);
        drop(backend);
        assert!(space.write(0x10_0000, &[round; 64], A).is_ok());
        // A DMA mapping (every third round) or a cache (every third + 1)
        // outlives the region; the memory stays valid until it goes.
        let mapping = (round % 3 == 0).then(|| {
            space
                .map(0x10_0000, 64, DmaDirection::Bidirectional, A)
                .unwrap()
        });
        let cache = (round % 3 == 1).then(|| {
            MemoryRegionCache::new(&space, 0x10_0000, 64, DmaDirection::Bidirectional).unwrap()
        });
        unplug_ownerless(&memory, root, r);
        let mut buf = [0u8; 64];
        if let Some(mut m) = mapping {
            assert!(census.is_live(key), "the mapping keeps the memory");
            m.read(0, &mut buf).unwrap();
            assert_eq!(buf, [round; 64]);
            m.write(0, &[!round; 64]).unwrap();
            m.read(0, &mut buf).unwrap();
            assert_eq!(buf, [!round; 64]);
            drop(m);
        }
        if let Some(c) = cache {
            assert!(census.is_live(key), "the cache keeps the memory");
            c.read(0, &mut buf).unwrap();
            assert_eq!(buf, [round; 64]);
            c.write(0, &[!round; 64]).unwrap();
            drop(c);
        }
        if !census.is_live(key) {
            freed += 1;
        }
    }
    assert_eq!(freed, 100, "every round's memory is freed once unused");
    assert!(space.outstanding_mappings().is_empty());
    drop(space);
    assert!(memory.teardown().is_clean());
}

/// A bounce mapping dropped while its thread already unwinds from the
/// caller's own panic still writes back; a device that panics in that
/// write-back must not abort the process (a panic during unwinding): its
/// panic is caught, recorded in the census, and everything is released.
#[test]
fn bounce_write_back_panic_while_unwinding_is_recorded_not_an_abort() {
    let (memory, space, dev) = machine_with_panicky_device();
    dev.panic_writes.store(true, Ordering::SeqCst);
    let caught = catch_unwind(AssertUnwindSafe(|| {
        let _mapping = space
            .map(0x1000, 8, DmaDirection::FromDevice, A)
            .expect("bounce map of the device's MMIO");
        panic!("the caller's own panic while it holds the mapping");
    }));
    let payload = caught.expect_err("the caller's panic reaches it");
    assert_eq!(
        payload.downcast_ref::<&str>(),
        Some(&"the caller's own panic while it holds the mapping"),
        "the caller gets its own panic, not the device's"
    );
    dev.panic_writes.store(false, Ordering::SeqCst);
    assert_bounce_space_is_free(&space);
    let panics = memory.census().panics();
    assert!(
        panics.iter().any(|p| p.contains("bounce write-back")),
        "the device's panic is recorded: {panics:?}"
    );
}

/// A map client waiting for bounce space is told when the space comes
/// back, also when the mapping that held it is dropped by an unwinding
/// panic (waiting for a later event could wait forever).
#[test]
fn map_client_runs_when_bounce_space_is_freed_by_an_unwinding_panic() {
    let (_memory, space, _dev) = machine_with_panicky_device();
    let fired = Arc::new(AtomicUsize::new(0));
    let caught = catch_unwind(AssertUnwindSafe(|| {
        let mapping = space
            .map(0x1000, 0x100, DmaDirection::ToDevice, A)
            .expect("bounce map of the device's MMIO");
        let f = fired.clone();
        space.register_map_client(move || {
            f.fetch_add(1, Ordering::SeqCst);
        });
        let _held = mapping;
        panic!("the caller's own panic");
    }));
    assert!(caught.is_err());
    assert_bounce_space_is_free(&space);
    assert_eq!(
        fired.load(Ordering::SeqCst),
        1,
        "the waiting client ran when the space was released"
    );
}
