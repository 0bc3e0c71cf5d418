//! Dirty memory tracking (qemu-memory-semantics.md §7, `memtree::dirty`):
//! every write path marks exactly the pages it touched, for exactly the
//! clients tracking them; listeners see QEMU's log callbacks; bits belong
//! to memory, never to addresses.

use std::sync::{Arc, Mutex};

use memtree::dma::cache::MemoryRegionCache;
use memtree::host::mapping_info::DmaDirection;
use memtree::{
    DirtyClient, Endian, MemTxAttrs, Memory, MemoryListener, RegionId, Section, SpaceId,
    UnimplementedDevice, TARGET_PAGE_SIZE,
};

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;
const PAGE: u64 = TARGET_PAGE_SIZE;

struct Machine {
    memory: Memory,
    root: RegionId,
    ram: RegionId,
    space: SpaceId,
}

/// 64 KiB of RAM at 0x10000, a second RAM "vram" of 16 KiB at 0x40000 and
/// an MMIO region at 0x80000.
fn machine() -> (Machine, RegionId) {
    let memory = Memory::new();
    let root = memory.new_container("root", 1 << 32, None).unwrap();
    let ram = memory.new_ram("ram", 0x10000, None).unwrap();
    memory.add_subregion(root, 0x10000, ram).unwrap();
    let vram = memory.new_ram("vram", 0x4000, None).unwrap();
    memory.add_subregion(root, 0x40000, vram).unwrap();
    let mmio = memory
        .new_mmio("mmio", 0x1000, Arc::new(UnimplementedDevice), None)
        .unwrap();
    memory.add_subregion(root, 0x80000, mmio).unwrap();
    let space = memory.new_address_space("memory", root, None).unwrap();
    (
        Machine {
            memory,
            root,
            ram,
            space,
        },
        vram,
    )
}

fn dirty_pages(m: &Memory, r: RegionId, client: DirtyClient) -> Vec<u64> {
    let size = m.region_info(r).unwrap().size as u64;
    m.snapshot_and_clear_dirty(r, 0, size, client)
        .unwrap()
        .pages()
        .collect()
}

#[test]
fn buffer_write_across_a_page_boundary_marks_both_pages_and_only_them() {
    let (m, _) = machine();
    m.memory.set_log(m.ram, DirtyClient::VGA, true).unwrap();
    let h = m.memory.address_space(m.space).unwrap();
    assert!(h.write(0x10000 + 2 * PAGE - 2, &[1, 2, 3, 4], A).is_ok());
    assert_eq!(
        dirty_pages(&m.memory, m.ram, DirtyClient::VGA),
        vec![PAGE, 2 * PAGE]
    );
    // Cleared by the snapshot.
    assert_eq!(
        dirty_pages(&m.memory, m.ram, DirtyClient::VGA),
        Vec::<u64>::new()
    );
}

#[test]
fn typed_rmw_cursor_and_shared_handle_writes_mark_their_page() {
    let (m, _) = machine();
    m.memory.set_log(m.ram, DirtyClient::VGA, true).unwrap();
    let h = m.memory.address_space(m.space).unwrap();
    assert!(h
        .store::<u32>(0x10000 + 3 * PAGE + 8, 7, Endian::Little, A)
        .is_ok());
    assert!(h.rmw_u32(0x10000 + 5 * PAGE, A, |v| v + 1).1.is_ok());
    let mut c = h.cursor();
    assert!(c
        .store::<u64>(0x10000 + 7 * PAGE, 1, Endian::Big, A)
        .is_ok());
    assert!(c.write(0x10000 + 9 * PAGE + 100, &[1; 10], A).is_ok());
    // A typed store straddling a page boundary marks both pages.
    assert!(h
        .store::<u32>(0x10000 + 12 * PAGE - 2, 7, Endian::Little, A)
        .is_ok());
    let got = dirty_pages(&m.memory, m.ram, DirtyClient::VGA);
    assert_eq!(
        got,
        vec![3 * PAGE, 5 * PAGE, 7 * PAGE, 9 * PAGE, 11 * PAGE, 12 * PAGE]
    );
}

#[test]
fn reads_and_writes_to_holes_or_mmio_mark_nothing() {
    let (m, vram) = machine();
    m.memory.set_log(m.ram, DirtyClient::VGA, true).unwrap();
    m.memory.set_log(vram, DirtyClient::VGA, true).unwrap();
    let h = m.memory.address_space(m.space).unwrap();
    let _ = h.write(0x20_0000, &[1; 64], A); // hole
    let _ = h.write(0x80000, &[1; 4], A); // MMIO
    let _ = h.store::<u32>(0x80000, 1, Endian::Little, A);
    let mut buf = [0u8; 64];
    let _ = h.read(0x10000, &mut buf, A);
    assert!(dirty_pages(&m.memory, m.ram, DirtyClient::VGA).is_empty());
    assert!(dirty_pages(&m.memory, vram, DirtyClient::VGA).is_empty());
}

#[test]
fn vga_logging_of_one_region_does_not_mark_others_nor_other_clients() {
    let (m, vram) = machine();
    m.memory.set_log(vram, DirtyClient::VGA, true).unwrap();
    let h = m.memory.address_space(m.space).unwrap();
    assert!(h.write(0x10000, &[1; 16], A).is_ok());
    assert!(h.write(0x40000 + PAGE, &[1; 16], A).is_ok());
    assert!(!m
        .memory
        .get_dirty(m.ram, 0, 0x10000, DirtyClient::VGA)
        .unwrap());
    assert!(!m
        .memory
        .get_dirty(vram, 0, 0x4000, DirtyClient::CODE)
        .unwrap());
    assert!(!m
        .memory
        .get_dirty(vram, 0, 0x4000, DirtyClient::MIGRATION)
        .unwrap());
    assert!(m.memory.get_dirty(vram, PAGE, 1, DirtyClient::VGA).unwrap());
    assert!(!m.memory.get_dirty(vram, 0, PAGE, DirtyClient::VGA).unwrap());
    // A program-defined client is independent of VGA.
    let mine = DirtyClient::custom(5).unwrap();
    m.memory.set_log(vram, mine, true).unwrap();
    assert!(h.write(0x40000 + 3 * PAGE, &[1; 16], A).is_ok());
    assert_eq!(dirty_pages(&m.memory, vram, mine), vec![3 * PAGE]);
    assert_eq!(
        dirty_pages(&m.memory, vram, DirtyClient::VGA),
        vec![PAGE, 3 * PAGE]
    );
    assert!(DirtyClient::custom(2).is_none() && DirtyClient::custom(8).is_none());
}

#[test]
fn writes_before_tracking_starts_or_after_it_stops_are_not_marked() {
    let (m, _) = machine();
    let h = m.memory.address_space(m.space).unwrap();
    assert!(h.write(0x10000, &[1; 16], A).is_ok());
    m.memory.set_log(m.ram, DirtyClient::VGA, true).unwrap();
    assert!(!m
        .memory
        .get_dirty(m.ram, 0, 0x10000, DirtyClient::VGA)
        .unwrap());
    m.memory.set_log(m.ram, DirtyClient::VGA, false).unwrap();
    assert!(h.write(0x10000, &[1; 16], A).is_ok());
    assert!(!m
        .memory
        .get_dirty(m.ram, 0, 0x10000, DirtyClient::VGA)
        .unwrap());
    // MIGRATION is global only.
    assert!(m
        .memory
        .set_log(m.ram, DirtyClient::MIGRATION, true)
        .is_err());
}

#[test]
fn global_tracking_marks_every_ram_region_for_migration_while_on() {
    let (m, vram) = machine();
    let h = m.memory.address_space(m.space).unwrap();
    m.memory.global_dirty_log_start().unwrap();
    assert!(h
        .view()
        .ranges()
        .iter()
        .filter(|r| r.region().name() != "mmio")
        .all(|r| r.dirty_log_mask() == DirtyClient::MIGRATION.mask()));
    assert!(h.write(0x10000 + PAGE, &[1; 4], A).is_ok());
    assert!(h.write(0x40000, &[1; 4], A).is_ok());
    let taken = m
        .memory
        .take_dirty_ram(m.space, DirtyClient::MIGRATION)
        .unwrap();
    let got: Vec<(String, Vec<u64>)> = taken
        .iter()
        .map(|r| (r.name.clone(), r.dirty.pages().collect()))
        .collect();
    assert_eq!(
        got,
        vec![("ram".into(), vec![PAGE]), ("vram".into(), vec![0])]
    );
    // VGA did not see them.
    assert!(!m
        .memory
        .get_dirty(vram, 0, 0x4000, DirtyClient::VGA)
        .unwrap());
    m.memory.global_dirty_log_stop().unwrap();
    assert!(h.view().ranges().iter().all(|r| r.dirty_log_mask() == 0));
    assert!(h.write(0x10000 + 2 * PAGE, &[1; 4], A).is_ok());
    assert!(!m
        .memory
        .get_dirty(m.ram, 0, 0x10000, DirtyClient::MIGRATION)
        .unwrap());
}

#[test]
fn dma_unmap_marks_the_length_written_and_caches_mark_their_writes() {
    let (m, _) = machine();
    m.memory.global_dirty_log_start().unwrap();
    let h = m.memory.address_space(m.space).unwrap();
    // Mapping made before tracking of VGA starts: unmap still marks for it.
    let mut map = h
        .map(0x10000 + PAGE, 3 * PAGE, DmaDirection::FromDevice, A)
        .unwrap();
    m.memory.set_log(m.ram, DirtyClient::VGA, true).unwrap();
    map.write(0, &[9; 8]).unwrap();
    let _ = map.unmap(PAGE + 1);
    assert_eq!(
        dirty_pages(&m.memory, m.ram, DirtyClient::VGA),
        vec![PAGE, 2 * PAGE]
    );
    // A mapping for reading marks nothing.
    let r = h.map(0x10000, PAGE, DmaDirection::ToDevice, A).unwrap();
    drop(r);
    assert!(dirty_pages(&m.memory, m.ram, DirtyClient::VGA).is_empty());
    let cache =
        MemoryRegionCache::new(&h, 0x10000 + 4 * PAGE, 2 * PAGE, DmaDirection::FromDevice).unwrap();
    cache.write(PAGE + 5, &[1, 2]).unwrap();
    cache.store::<4>(0, [1; 4]).unwrap();
    assert_eq!(
        dirty_pages(&m.memory, m.ram, DirtyClient::VGA),
        vec![4 * PAGE, 5 * PAGE]
    );
    let mig = dirty_pages(&m.memory, m.ram, DirtyClient::MIGRATION);
    assert_eq!(mig, vec![PAGE, 2 * PAGE, 4 * PAGE, 5 * PAGE]);
}

#[test]
fn writes_through_the_vm_memory_view_mark_their_pages() {
    use memtree::vm_memory::{Bytes, GuestAddress};
    let (m, _) = machine();
    m.memory.set_log(m.ram, DirtyClient::VGA, true).unwrap();
    let h = m.memory.address_space(m.space).unwrap();
    let gm = h.guest_memory();
    gm.write_slice(&[1; 8], GuestAddress(0x10000 + 6 * PAGE - 4))
        .unwrap();
    gm.write_obj(5u32, GuestAddress(0x10000 + 10 * PAGE))
        .unwrap();
    let got = dirty_pages(&m.memory, m.ram, DirtyClient::VGA);
    assert_eq!(got, vec![5 * PAGE, 6 * PAGE, 10 * PAGE]);
    let mut b = [0u8; 8];
    gm.read_slice(&mut b, GuestAddress(0x10000)).unwrap();
    assert!(dirty_pages(&m.memory, m.ram, DirtyClient::VGA).is_empty());
}

type Log = Arc<Mutex<Vec<String>>>;

struct Recorder {
    log: Log,
    tag: &'static str,
    priority: u32,
}

impl Recorder {
    fn push(&self, s: String) {
        self.log.lock().unwrap().push(format!("{} {s}", self.tag));
    }
}

fn sec(s: &Section<'_>) -> String {
    format!("{:#x} {}", s.range.start(), s.range.region().name())
}

impl MemoryListener for Recorder {
    fn priority(&self) -> u32 {
        self.priority
    }
    // QEMU's contract, asked for: a nop for every unchanged range.
    fn wants_region_nop(&self) -> bool {
        true
    }
    fn region_nop(&self, s: &Section<'_>) {
        self.push(format!("nop {}", sec(s)));
    }
    fn log_start(&self, s: &Section<'_>, o: u8, n: u8) {
        self.push(format!("log_start {} {o}->{n}", sec(s)));
    }
    fn log_stop(&self, s: &Section<'_>, o: u8, n: u8) {
        self.push(format!("log_stop {} {o}->{n}", sec(s)));
    }
    fn log_global_start(&self) -> Result<(), String> {
        self.push("log_global_start".into());
        Ok(())
    }
    fn log_global_stop(&self) {
        self.push("log_global_stop".into());
    }
    fn log_sync(&self, s: &Section<'_>) {
        self.push(format!("log_sync {}", sec(s)));
    }
    fn log_clear(&self, s: &Section<'_>, offset: u64, len: u64) {
        self.push(format!("log_clear {} {offset:#x}+{len:#x}", sec(s)));
    }
}

#[test]
fn log_callbacks_come_in_qemus_order_with_qemus_ranges() {
    let (m, vram) = machine();
    let log: Log = Arc::default();
    for (tag, priority) in [("b", 10), ("a", 0)] {
        m.memory
            .register_listener(
                m.space,
                Arc::new(Recorder {
                    log: log.clone(),
                    tag,
                    priority,
                }),
            )
            .unwrap();
    }
    let take = || std::mem::take(&mut *log.lock().unwrap());
    // Global start: log_global_start forward, then the re-render's nops
    // and log_start(0 -> MIGRATION) for the RAM ranges, forward.
    m.memory.global_dirty_log_start().unwrap();
    assert_eq!(
        take(),
        [
            "a log_global_start",
            "b log_global_start",
            "a nop 0x10000 ram",
            "b nop 0x10000 ram",
            "a log_start 0x10000 ram 0->4",
            "b log_start 0x10000 ram 0->4",
            "a nop 0x40000 vram",
            "b nop 0x40000 vram",
            "a log_start 0x40000 vram 0->4",
            "b log_start 0x40000 vram 0->4",
            "a nop 0x80000 mmio",
            "b nop 0x80000 mmio",
        ]
    );
    // VGA on top: the mask grows to 5 for vram only.
    m.memory.set_log(vram, DirtyClient::VGA, true).unwrap();
    let got = take();
    assert!(
        got.contains(&"a log_start 0x40000 vram 4->5".to_owned()),
        "{got:?}"
    );
    assert!(
        !got.iter().any(|l| l.contains("log_start 0x10000")),
        "{got:?}"
    );
    // snapshot_and_clear: log_sync of the region's ranges on every
    // listener, then log_clear of the 64-page-rounded span.
    m.memory
        .snapshot_and_clear_dirty(vram, PAGE, 1, DirtyClient::VGA)
        .unwrap();
    assert_eq!(
        take(),
        [
            "a log_sync 0x40000 vram",
            "b log_sync 0x40000 vram",
            "a log_clear 0x40000 vram 0x0+0x4000",
            "b log_clear 0x40000 vram 0x0+0x4000",
        ]
    );
    // Global stop: the re-render's log_stop (reverse) first, then
    // log_global_stop (reverse).
    m.memory.global_dirty_log_stop().unwrap();
    let got = take();
    let i_stop = got
        .iter()
        .position(|l| l == "b log_stop 0x10000 ram 4->0")
        .expect("log_stop");
    assert_eq!(got[i_stop + 1], "a log_stop 0x10000 ram 4->0");
    assert!(
        got.contains(&"b log_stop 0x40000 vram 5->1".to_owned()),
        "{got:?}"
    );
    assert_eq!(
        &got[got.len() - 2..],
        ["b log_global_stop", "a log_global_stop"]
    );
    // dirty_log_sync: every listener, every logging range.
    m.memory.dirty_log_sync().unwrap();
    assert_eq!(
        take(),
        ["a log_sync 0x40000 vram", "b log_sync 0x40000 vram"]
    );
}

#[test]
fn a_region_unplugged_while_tracked_leaves_no_stale_bits_for_its_successor() {
    let memory = Memory::new();
    let root = memory.new_container("root", 1 << 32, None).unwrap();
    let owner = memory.new_owner("dimm", None).unwrap();
    let dimm = memory.new_ram("dimm", 0x8000, Some(owner)).unwrap();
    memory.add_subregion(root, 0x100000, dimm).unwrap();
    let space = memory.new_address_space("memory", root, None).unwrap();
    let h = memory.address_space(space).unwrap();
    memory.global_dirty_log_start().unwrap();
    memory.set_log(dimm, DirtyClient::VGA, true).unwrap();
    assert!(h.write(0x100000, &[1; 0x8000], A).is_ok());
    memory.unplug(owner).unwrap();
    assert!(memory.get_dirty(dimm, 0, 1, DirtyClient::VGA).is_err());
    // The successor at the same addresses starts clean for every client.
    let next = memory.new_ram("dimm2", 0x8000, None).unwrap();
    memory.add_subregion(root, 0x100000, next).unwrap();
    memory.set_log(next, DirtyClient::VGA, true).unwrap();
    for c in [DirtyClient::VGA, DirtyClient::MIGRATION] {
        assert!(!memory.get_dirty(next, 0, 0x8000, c).unwrap());
    }
    let taken = memory
        .take_dirty_ram(space, DirtyClient::MIGRATION)
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].dirty.count(), 0);
}

#[test]
fn a_region_moved_keeps_its_bits_and_a_resized_one_loses_those_past_its_end() {
    let (m, vram) = machine();
    m.memory.set_log(vram, DirtyClient::VGA, true).unwrap();
    let h = m.memory.address_space(m.space).unwrap();
    assert!(h.write(0x40000 + 3 * PAGE, &[1], A).is_ok());
    assert!(h.write(0x40000, &[1], A).is_ok());
    m.memory.set_address(vram, 0x60000).unwrap();
    // The bits followed the memory, and writes at the new place mark it.
    assert!(m
        .memory
        .get_dirty(vram, 3 * PAGE, 1, DirtyClient::VGA)
        .unwrap());
    assert!(h.write(0x60000 + PAGE, &[1], A).is_ok());
    let _ = h.write(0x40000 + 2 * PAGE, &[1], A); // now a hole
    assert!(!m
        .memory
        .get_dirty(vram, 2 * PAGE, 1, DirtyClient::VGA)
        .unwrap());
    // Shrink to 2 pages, grow back: page 3 does not come back dirty.
    m.memory.set_size(vram, 2 * PAGE as u128).unwrap();
    m.memory.set_size(vram, 4 * PAGE as u128).unwrap();
    assert_eq!(
        dirty_pages(&m.memory, vram, DirtyClient::VGA),
        vec![0, PAGE]
    );
    let _ = m.root;
}

#[test]
fn snapshot_rounds_to_64_pages_and_reads_back_by_range() {
    let memory = Memory::new();
    let root = memory.new_container("root", 1 << 32, None).unwrap();
    let ram = memory.new_ram("ram", u128::from(256 * PAGE), None).unwrap();
    memory.add_subregion(root, 0, ram).unwrap();
    let space = memory.new_address_space("memory", root, None).unwrap();
    let h = memory.address_space(space).unwrap();
    memory.set_log(ram, DirtyClient::VGA, true).unwrap();
    for p in [0u64, 63, 64, 100, 200] {
        assert!(h.write(p * PAGE, &[1], A).is_ok());
    }
    // Asking for page 70 takes pages 64..128 (QEMU's rounding).
    let s = memory
        .snapshot_and_clear_dirty(ram, 70 * PAGE, PAGE, DirtyClient::VGA)
        .unwrap();
    assert_eq!(s.pages().collect::<Vec<_>>(), vec![64 * PAGE, 100 * PAGE]);
    assert!(s.get_dirty(64 * PAGE, 1) && !s.get_dirty(65 * PAGE, 35 * PAGE));
    assert!(!s.get_dirty(0, PAGE), "outside the snapshot");
    assert!(memory.get_dirty(ram, 0, 1, DirtyClient::VGA).unwrap());
    assert!(memory
        .get_dirty(ram, 200 * PAGE, 1, DirtyClient::VGA)
        .unwrap());
    assert!(!memory
        .get_dirty(ram, 64 * PAGE, 64 * PAGE, DirtyClient::VGA)
        .unwrap());
}

/// QEMU's `memory_region_set_log` counts its users (`vga_logging_count`):
/// two display devices enable logging of the same frame buffer, one
/// disables it, and logging stays on for the other; only the 0 <-> 1
/// transitions re-render (one `log_start`, one `log_stop`). A disable with
/// no matching enable is an error, not a silent wrap. On an alias it
/// counts on the region the alias points to, as QEMU forwards it.
#[test]
fn set_log_counts_its_users_and_only_the_last_disable_stops_logging() {
    let (m, vram) = machine();
    let h = m.memory.address_space(m.space).unwrap();
    let log: Log = Arc::default();
    let recorder = Recorder {
        log: log.clone(),
        tag: "l",
        priority: 0,
    };
    m.memory
        .register_listener(m.space, Arc::new(recorder))
        .unwrap();
    log.lock().unwrap().clear();
    m.memory.set_log(vram, DirtyClient::VGA, true).unwrap();
    m.memory.set_log(vram, DirtyClient::VGA, true).unwrap();
    m.memory.set_log(vram, DirtyClient::VGA, false).unwrap();
    assert!(h.write(0x40000, &[1; 4], A).is_ok());
    assert_eq!(
        dirty_pages(&m.memory, vram, DirtyClient::VGA),
        vec![0],
        "one user still logs: the write is marked"
    );
    let starts = || {
        let log = log.lock().unwrap();
        (
            log.iter().filter(|e| e.starts_with("l log_start")).count(),
            log.iter().filter(|e| e.starts_with("l log_stop")).count(),
        )
    };
    assert_eq!(starts(), (1, 0), "{:?}", log.lock().unwrap());
    m.memory.set_log(vram, DirtyClient::VGA, false).unwrap();
    assert_eq!(starts(), (1, 1), "{:?}", log.lock().unwrap());
    assert!(h.write(0x40000, &[1; 4], A).is_ok());
    assert!(!m.memory.get_dirty(vram, 0, PAGE, DirtyClient::VGA).unwrap());
    // Unbalanced: no user left.
    assert!(m.memory.set_log(vram, DirtyClient::VGA, false).is_err());
    assert!(!m.memory.get_dirty(vram, 0, PAGE, DirtyClient::VGA).unwrap());
    // Through an alias: the count is the target's.
    let alias = m
        .memory
        .new_alias("vram-alias", vram, 0, 0x4000, None)
        .unwrap();
    m.memory.add_subregion(m.root, 0x90000, alias).unwrap();
    m.memory.set_log(alias, DirtyClient::VGA, true).unwrap();
    m.memory.set_log(vram, DirtyClient::VGA, true).unwrap();
    m.memory.set_log(alias, DirtyClient::VGA, false).unwrap();
    assert!(h.write(0x40000 + PAGE, &[1; 4], A).is_ok());
    assert!(m.memory.get_dirty(vram, PAGE, 1, DirtyClient::VGA).unwrap());
}

/// Every write path marks exactly the pages it touched, a write across a
/// page boundary both of them, one path at a time (each checked alone:
/// the snapshot clears between them): the shared handle
/// (`AddressSpace`: buffer, typed, rmw), the cursor (buffer, typed, rmw),
/// a published view directly, a `MemoryRegionCache` (buffer and typed),
/// a DMA mapping (written across the boundary, unmapped with that length)
/// and the vm-memory view.
#[test]
fn every_write_path_marks_both_pages_of_a_write_across_a_boundary() {
    use memtree::vm_memory::{Bytes, GuestAddress};
    let (m, _) = machine();
    m.memory.set_log(m.ram, DirtyClient::VGA, true).unwrap();
    let h = m.memory.address_space(m.space).unwrap();
    let mut c = h.cursor();
    let cache = MemoryRegionCache::new(&h, 0x10000, 0x10000, DmaDirection::FromDevice).unwrap();
    let gm = h.guest_memory();
    // The boundary between pages 4 and 5 of "ram" (space 0x10000 + 5 pages).
    let b = 0x10000 + 5 * PAGE;
    type Path<'a> = (&'a str, Box<dyn FnMut() -> bool + 'a>);
    let c = std::cell::RefCell::new(&mut c);
    let paths: Vec<Path<'_>> = vec![
        (
            "handle write",
            Box::new(|| h.write(b - 3, &[1; 6], A).is_ok()),
        ),
        (
            "handle store",
            Box::new(|| h.store::<u64>(b - 4, 7, Endian::Little, A).is_ok()),
        ),
        (
            "handle rmw",
            Box::new(|| h.rmw::<u32>(b - 2, Endian::Little, A, |v| v + 1).1.is_ok()),
        ),
        (
            "cursor write",
            Box::new(|| c.borrow_mut().write(b - 1, &[1; 2], A).is_ok()),
        ),
        (
            "cursor store",
            Box::new(|| {
                c.borrow_mut()
                    .store::<u16>(b - 1, 7, Endian::Big, A)
                    .is_ok()
            }),
        ),
        (
            "cursor rmw",
            Box::new(|| {
                c.borrow_mut()
                    .rmw::<u64>(b - 7, Endian::Little, A, |v| !v)
                    .1
                    .is_ok()
            }),
        ),
        (
            "view write",
            Box::new(|| h.view().write(b - 8, &[2; 9], A).is_ok()),
        ),
        (
            "cache write",
            Box::new(|| cache.write(5 * PAGE - 1, &[3; 2]).is_ok()),
        ),
        (
            "cache store",
            Box::new(|| cache.store::<4>(5 * PAGE - 2, [4; 4]).is_ok()),
        ),
        (
            "dma",
            Box::new(|| {
                let mut map = h
                    .map(b - 16, 2 * PAGE, DmaDirection::FromDevice, A)
                    .unwrap();
                let ok = map.write(0, &[5; 32]).is_ok();
                let _ = map.unmap(32);
                ok
            }),
        ),
        (
            "vm-memory",
            Box::new(|| gm.write_slice(&[6; 4], GuestAddress(b - 2)).is_ok()),
        ),
    ];
    for (what, mut write) in paths {
        assert!(write(), "{what}: the write failed");
        assert_eq!(
            dirty_pages(&m.memory, m.ram, DirtyClient::VGA),
            vec![4 * PAGE, 5 * PAGE],
            "{what}"
        );
    }
}

/// Writes that do not go through a flat range (DMA unmaps, region caches,
/// the vm-memory view) mark with the clients of *every* range over the
/// block (adversarial review R5): a logged frame buffer and plain RAM on
/// one backend, the frame buffer's DMA and cache writes are marked for VGA
/// whichever range was rendered last.
#[test]
fn writes_outside_a_range_mark_for_every_range_over_the_block() {
    let m = Memory::new();
    let root = m.new_container("system", 1 << 32, None).unwrap();
    let be = m
        .new_backend("be", 32 * PAGE, memtree::RamBacking::Anonymous)
        .unwrap();
    let vram = m
        .new_ram_from_backend("vram", &be, 0, u128::from(16 * PAGE), None)
        .unwrap();
    let ram = m
        .new_ram_from_backend("ram", &be, 16 * PAGE, u128::from(16 * PAGE), None)
        .unwrap();
    m.add_subregion(root, 0, vram).unwrap();
    m.add_subregion(root, 0x100000, ram).unwrap();
    let space = m.new_address_space("mem", root, None).unwrap();
    m.set_log(vram, DirtyClient::VGA, true).unwrap();
    let h = m.address_space(space).unwrap();
    assert!(h.write(0, &[1; 4], A).is_ok());
    assert!(m.get_dirty(vram, 0, PAGE, DirtyClient::VGA).unwrap());
    let mut map = h.map(PAGE, PAGE, DmaDirection::FromDevice, A).unwrap();
    map.write(0, &[9; 8]).unwrap();
    map.unmap(8).into_result().unwrap();
    let cache = MemoryRegionCache::new(&h, 2 * PAGE, PAGE, DmaDirection::FromDevice).unwrap();
    cache.write(0, &[1, 2]).unwrap();
    assert!(
        m.get_dirty(vram, PAGE, PAGE, DirtyClient::VGA).unwrap(),
        "DMA write into the VGA-logged region not marked"
    );
    assert!(
        m.get_dirty(vram, 2 * PAGE, PAGE, DirtyClient::VGA).unwrap(),
        "cache write into the VGA-logged region not marked"
    );
    // Logging stopped and every view over the block re-rendered: writes
    // outside a range no longer mark.
    m.set_log(vram, DirtyClient::VGA, false).unwrap();
    drop(cache);
    let _ = m.snapshot_and_clear_dirty(vram, 0, 16 * PAGE, DirtyClient::VGA);
    let cache = MemoryRegionCache::new(&h, 3 * PAGE, PAGE, DmaDirection::FromDevice).unwrap();
    cache.write(0, &[1, 2]).unwrap();
    assert!(!m.get_dirty(vram, 3 * PAGE, PAGE, DirtyClient::VGA).unwrap());
}
