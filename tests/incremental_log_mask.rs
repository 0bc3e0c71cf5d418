//! Dirty-log mask changes render nothing (issue 11, "Events that render
//! nothing"): a commit whose only change is a region's dirty-log mask
//! publishes no new view, tells `log_start` / `log_stop` (with QEMU's
//! masks) for each flat range of that region, through aliases too, only to
//! the listeners of the address spaces that show it, and writes mark for
//! the new mask from that commit on. Later commits still equal a full
//! render and a full diff. And `region_nop` goes only to the listeners
//! that ask for it.

use std::sync::{Arc, Mutex};

use memtree::host::mapping_info::DmaDirection;
use memtree::{
    DirtyClient, MemTxAttrs, Memory, MemoryListener, RegionId, Section, SpaceId,
    UnimplementedDevice, TARGET_PAGE_SIZE,
};

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;
const PAGE: u64 = TARGET_PAGE_SIZE;

type Log = Arc<Mutex<Vec<String>>>;

/// Records callbacks; asks for `region_nop` when `nops` (its lines are then
/// tagged "n:").
struct Recorder {
    log: Log,
    nops: bool,
}

impl Recorder {
    fn push(&self, line: String) {
        let tag = if self.nops { "n:" } else { "" };
        self.log.lock().unwrap().push(format!("{tag}{line}"));
    }
}

fn sec(s: &Section<'_>) -> String {
    let r = s.range;
    format!(
        "{} {:x}-{:x} {}@{:x}",
        s.space_name,
        r.start(),
        r.last(),
        r.region().name(),
        r.offset_in_region()
    )
}

impl MemoryListener for Recorder {
    fn wants_region_nop(&self) -> bool {
        self.nops
    }
    fn begin(&self) {
        self.push("begin".into());
    }
    fn commit(&self) {
        self.push("commit".into());
    }
    fn region_add(&self, s: &Section<'_>) {
        self.push(format!("add {}", sec(s)));
    }
    fn region_del(&self, s: &Section<'_>) {
        self.push(format!("del {}", sec(s)));
    }
    fn region_nop(&self, s: &Section<'_>) {
        self.push(format!("nop {}", sec(s)));
    }
    fn log_start(&self, s: &Section<'_>, old: u8, new: u8) {
        self.push(format!(
            "log_start {} {old}->{new} (range says {})",
            sec(s),
            s.range.dirty_log_mask()
        ));
    }
    fn log_stop(&self, s: &Section<'_>, old: u8, new: u8) {
        self.push(format!(
            "log_stop {} {old}->{new} (range says {})",
            sec(s),
            s.range.dirty_log_mask()
        ));
    }
}

fn take(log: &Log) -> Vec<String> {
    std::mem::take(&mut *log.lock().unwrap())
}

struct Vga {
    memory: Memory,
    system: RegionId,
    vram: RegionId,
    /// A small region over the middle of vram (disabled at first).
    overlay: RegionId,
    mem: SpaceId,
    ports: SpaceId,
    /// Listener of `mem` that does not ask for nops, one that does, and the
    /// listener of `ports` (which never shows vram).
    quiet: Log,
    nops: Log,
    ports_log: Log,
}

/// RAM at 0, a 64 KiB frame buffer "vram" at 0x100000, shown a second time
/// through the alias "vga-lo" (its first 16 KiB) at 0xa0000, an MMIO
/// region at 0xfe000000; a port space that shows none of it.
fn vga(incremental: bool) -> Vga {
    let memory = Memory::new();
    memory.set_incremental_render(incremental);
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let ram = memory.new_ram("ram", 0x8_0000, None).unwrap();
    memory.add_subregion(system, 0, ram).unwrap();
    let vram = memory.new_ram("vram", 0x1_0000, None).unwrap();
    memory.add_subregion(system, 0x10_0000, vram).unwrap();
    let lo = memory.new_alias("vga-lo", vram, 0, 0x4000, None).unwrap();
    memory.add_subregion(system, 0xa_0000, lo).unwrap();
    let overlay = memory.new_ram("overlay", 0x1000, None).unwrap();
    memory
        .add_subregion_overlap(system, 0x10_4000, overlay, 1)
        .unwrap();
    memory.set_enabled(overlay, false).unwrap();
    let ops: Arc<dyn memtree::MmioOps> = Arc::new(UnimplementedDevice);
    let mmio = memory.new_mmio("mmio", 0x1000, ops.clone(), None).unwrap();
    memory.add_subregion(system, 0xfe00_0000, mmio).unwrap();
    let io = memory.new_container("io", 1 << 16, None).unwrap();
    let port = memory.new_mmio("port", 0x10, ops, None).unwrap();
    memory.add_subregion(io, 0x3c0, port).unwrap();
    let mem = memory.new_address_space("mem", system, None).unwrap();
    let ports = memory.new_address_space("ports", io, None).unwrap();
    let (quiet, nops, ports_log): (Log, Log, Log) = Default::default();
    memory
        .register_listener(
            mem,
            Arc::new(Recorder {
                log: quiet.clone(),
                nops: false,
            }),
        )
        .unwrap();
    memory
        .register_listener(
            mem,
            Arc::new(Recorder {
                log: nops.clone(),
                nops: true,
            }),
        )
        .unwrap();
    memory
        .register_listener(
            ports,
            Arc::new(Recorder {
                log: ports_log.clone(),
                nops: false,
            }),
        )
        .unwrap();
    for l in [&quiet, &nops, &ports_log] {
        take(l);
    }
    Vga {
        memory,
        system,
        vram,
        overlay,
        mem,
        ports,
        quiet,
        nops,
        ports_log,
    }
}

#[test]
fn log_mask_only_commit_publishes_no_view_and_tells_only_the_spaces_showing_the_region() {
    let v = vga(true);
    let before = (
        v.memory.address_space(v.mem).unwrap().view(),
        v.memory.address_space(v.ports).unwrap().view(),
    );
    v.memory.set_log(v.vram, DirtyClient::VGA, true).unwrap();
    let after = (
        v.memory.address_space(v.mem).unwrap().view(),
        v.memory.address_space(v.ports).unwrap().view(),
    );
    assert!(
        Arc::ptr_eq(&before.0, &after.0),
        "a log-mask change rendered a new view of mem"
    );
    assert!(Arc::ptr_eq(&before.1, &after.1));
    // Each range of vram, the one through the alias included, in address
    // order; the range already reports the new mask.
    assert_eq!(
        take(&v.quiet),
        [
            "begin",
            "log_start mem a0000-a3fff vram@0 0->1 (range says 1)",
            "log_start mem 100000-10ffff vram@0 0->1 (range says 1)",
            "commit",
        ]
    );
    // QEMU's full sequence for the listener that asked for nops.
    assert_eq!(
        take(&v.nops),
        [
            "n:begin",
            "n:nop mem 0-7ffff ram@0",
            "n:nop mem a0000-a3fff vram@0",
            "n:log_start mem a0000-a3fff vram@0 0->1 (range says 1)",
            "n:nop mem 100000-10ffff vram@0",
            "n:log_start mem 100000-10ffff vram@0 0->1 (range says 1)",
            "n:nop mem fe000000-fe000fff mmio@0",
            "n:commit",
        ]
    );
    assert!(take(&v.ports_log).is_empty(), "the port space heard it");
    // A second user of the client changes no mask: nothing at all.
    v.memory.set_log(v.vram, DirtyClient::VGA, true).unwrap();
    assert!(take(&v.quiet).is_empty());
    // Another client added, then both stopped in one transaction.
    v.memory.set_dirty_log_mask(v.vram, 0b11).unwrap();
    assert_eq!(
        take(&v.quiet),
        [
            "begin",
            "log_start mem a0000-a3fff vram@0 1->3 (range says 3)",
            "log_start mem 100000-10ffff vram@0 1->3 (range says 3)",
            "commit",
        ]
    );
    v.memory.set_dirty_log_mask(v.vram, 0).unwrap();
    assert_eq!(
        take(&v.quiet),
        [
            "begin",
            "log_stop mem a0000-a3fff vram@0 3->0 (range says 0)",
            "log_stop mem 100000-10ffff vram@0 3->0 (range says 0)",
            "commit",
        ]
    );
    let last = v.memory.address_space(v.mem).unwrap().view();
    assert!(Arc::ptr_eq(&before.0, &last), "a view was rendered");
    take(&v.nops);
    // A mask set and reset in one transaction tells nobody anything.
    v.memory.transaction(|m| {
        m.set_dirty_log_mask(v.vram, 4).unwrap();
        m.set_dirty_log_mask(v.vram, 0).unwrap();
    });
    assert!(take(&v.quiet).is_empty());
    assert!(take(&v.nops).is_empty());
    // set_log on the alias counts on the region it shows (QEMU forwards
    // it): every range of vram hears it, the direct one too.
    let lo = v.memory.find_region("vga-lo").unwrap();
    v.memory.set_log(lo, DirtyClient::CODE, true).unwrap();
    assert_eq!(
        take(&v.quiet),
        [
            "begin",
            "log_start mem a0000-a3fff vram@0 0->2 (range says 2)",
            "log_start mem 100000-10ffff vram@0 0->2 (range says 2)",
            "commit",
        ]
    );
    let last = v.memory.address_space(v.mem).unwrap().view();
    assert!(Arc::ptr_eq(&before.0, &last), "a view was rendered");
    v.memory.check_views_against_full_render().unwrap();
}

#[test]
fn writes_right_after_a_log_only_commit_mark_for_the_new_mask() {
    let v = vga(true);
    let h = v.memory.address_space(v.mem).unwrap();
    let mut cursor = h.cursor();
    // Made before tracking starts, written after: DMA marks at unmap for
    // the clients tracking the memory then.
    let mut map = h
        .map(0x10_0000 + 8 * PAGE, PAGE, DmaDirection::FromDevice, A)
        .unwrap();
    // A view held from before the commit (a vCPU in the middle of an
    // access) marks for the new mask too: it is the same view.
    let held = h.view();
    assert!(h.write(0x10_0000 + PAGE, &[1; 4], A).is_ok());
    v.memory.set_log(v.vram, DirtyClient::VGA, true).unwrap();
    let range = held.lookup(0x10_0000 + 4 * PAGE).unwrap();
    assert_eq!(range.dirty_log_mask(), DirtyClient::VGA.mask());
    range.mark_dirty(0x10_0000 + 4 * PAGE, 4);
    assert!(h.write(0x10_0000 + 3 * PAGE, &[1; 4], A).is_ok());
    // Through the alias: the same region, the same bits.
    assert!(h.write(0xa_0000 + 2 * PAGE, &[1; 4], A).is_ok());
    assert!(cursor.write(0x10_0000 + 5 * PAGE, &[1; 8], A).is_ok());
    map.write(0, &[7; 16]).unwrap();
    let _ = map.unmap(16);
    let size = 0x1_0000;
    let got: Vec<u64> = v
        .memory
        .snapshot_and_clear_dirty(v.vram, 0, size, DirtyClient::VGA)
        .unwrap()
        .pages()
        .collect();
    assert_eq!(got, vec![2 * PAGE, 3 * PAGE, 4 * PAGE, 5 * PAGE, 8 * PAGE]);
    // Stopped: writes after the commit mark nothing.
    v.memory.set_log(v.vram, DirtyClient::VGA, false).unwrap();
    assert!(h.write(0x10_0000 + 6 * PAGE, &[1; 4], A).is_ok());
    assert!(cursor.write(0x10_0000 + 7 * PAGE, &[1; 8], A).is_ok());
    assert!(!v
        .memory
        .get_dirty(v.vram, 0, size, DirtyClient::VGA)
        .unwrap());
}

/// Runs the same edits on an incremental machine and on the reference
/// (every reached view rendered whole, listeners told by a full diff) and
/// compares views and callbacks after each commit.
#[test]
fn commits_after_a_log_only_commit_equal_the_full_render_and_full_diff() {
    let (inc, full) = (vga(true), vga(false));
    type Step = (&'static str, Box<dyn Fn(&Vga)>);
    let steps: Vec<Step> = vec![
        (
            "log on",
            Box::new(|v: &Vga| v.memory.set_log(v.vram, DirtyClient::VGA, true).unwrap()),
        ),
        // Splits vram: fresh vram pieces beside ranges kept from before
        // the mask change must merge and compare as a full render does.
        (
            "overlay on",
            Box::new(|v: &Vga| v.memory.set_enabled(v.overlay, true).unwrap()),
        ),
        (
            "overlay off",
            Box::new(|v: &Vga| v.memory.set_enabled(v.overlay, false).unwrap()),
        ),
        // A mask change and a topology change in one commit: log_start for
        // the kept ranges, in address order with the diff of the rest.
        (
            "mixed",
            Box::new(|v: &Vga| {
                v.memory.transaction(|m| {
                    m.set_log(v.vram, DirtyClient::CODE, true).unwrap();
                    m.set_enabled(v.overlay, true).unwrap();
                })
            }),
        ),
        (
            "log off, overlay off",
            Box::new(|v: &Vga| {
                v.memory.transaction(|m| {
                    m.set_log(v.vram, DirtyClient::VGA, false).unwrap();
                    m.set_log(v.vram, DirtyClient::CODE, false).unwrap();
                    m.set_enabled(v.overlay, false).unwrap();
                })
            }),
        ),
        (
            "global start",
            Box::new(|v: &Vga| v.memory.global_dirty_log_start().unwrap()),
        ),
        (
            "log on while global",
            Box::new(|v: &Vga| v.memory.set_log(v.vram, DirtyClient::VGA, true).unwrap()),
        ),
        (
            "global stop",
            Box::new(|v: &Vga| v.memory.global_dirty_log_stop().unwrap()),
        ),
        (
            "move vram",
            Box::new(|v: &Vga| v.memory.set_address(v.vram, 0x20_0000).unwrap()),
        ),
    ];
    let dump = |v: &Vga| -> Vec<String> {
        let view = v.memory.address_space(v.mem).unwrap().view();
        view.iter()
            .map(|r| {
                format!(
                    "{:x}-{:x} {} {:?} mask {}",
                    r.start(),
                    r.last(),
                    r.region().name(),
                    r.attrs(),
                    r.dirty_log_mask()
                )
            })
            .collect()
    };
    for (what, step) in &steps {
        step(&inc);
        step(&full);
        inc.memory
            .check_views_against_full_render()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(dump(&inc), dump(&full), "{what}: views");
        for (a, b) in [
            (&inc.quiet, &full.quiet),
            (&inc.nops, &full.nops),
            (&inc.ports_log, &full.ports_log),
        ] {
            let (a, b) = (take(a), take(b));
            assert_eq!(a, b, "{what}: callbacks");
            // Told once: no range reports a change it was already told.
            let starts = a.iter().filter(|l| l.contains("log_start")).count();
            if *what == "overlay on" || *what == "overlay off" {
                assert_eq!(starts, 0, "{what}: {a:?}");
            }
        }
    }
    let _ = inc.system;
}

#[test]
fn region_nop_goes_only_to_listeners_that_ask_for_it() {
    let memory = Memory::new();
    let root = memory.new_container("system", 1 << 40, None).unwrap();
    let mut bars = Vec::new();
    let t = memory.begin();
    for i in 0..1000u64 {
        let bar = memory.new_ram(&format!("bar{i}"), 0x1000, None).unwrap();
        memory.add_subregion(root, i * 0x2000, bar).unwrap();
        bars.push(bar);
    }
    t.commit();
    let space = memory.new_address_space("mem", root, None).unwrap();
    let (quiet, nops): (Log, Log) = Default::default();
    for (log, want) in [(&quiet, false), (&nops, true)] {
        memory
            .register_listener(
                space,
                Arc::new(Recorder {
                    log: log.clone(),
                    nops: want,
                }),
            )
            .unwrap();
    }
    take(&quiet);
    take(&nops);
    memory.set_enabled(bars[500], false).unwrap();
    memory.set_enabled(bars[500], true).unwrap();
    assert_eq!(
        take(&quiet),
        [
            "begin",
            "del mem 3e8000-3e8fff bar500@0",
            "commit",
            "begin",
            "add mem 3e8000-3e8fff bar500@0",
            "commit"
        ]
    );
    let with_nops = take(&nops);
    assert_eq!(
        with_nops.iter().filter(|l| l.starts_with("n:nop")).count(),
        2 * 999
    );
}

/// Rule (QEMU's `memory_region_set_log` sets the region's mask at once and
/// the write path reads it at write time): a write made after
/// `set_log(on)` inside a transaction, before its commit, is marked.
#[test]
fn write_after_set_log_inside_a_transaction_is_marked() {
    let memory = Memory::new();
    let root = memory.new_container("root", 1 << 32, None).unwrap();
    let vram = memory.new_ram("vram", 0x4000, None).unwrap();
    memory.add_subregion(root, 0x40000, vram).unwrap();
    let space = memory.new_address_space("memory", root, None).unwrap();
    let h = memory.address_space(space).unwrap();
    let t = memory.begin();
    memory.set_log(vram, DirtyClient::VGA, true).unwrap();
    assert!(h.write(0x40000 + PAGE, &[1; 16], A).is_ok());
    t.commit();
    assert!(h.write(0x40000 + 2 * PAGE, &[1; 16], A).is_ok());
    let pages: Vec<u64> = memory
        .snapshot_and_clear_dirty(vram, 0, 0x4000, DirtyClient::VGA)
        .unwrap()
        .pages()
        .collect();
    assert_eq!(
        pages,
        vec![PAGE, 2 * PAGE],
        "the write between set_log and the commit was not marked"
    );
}

/// Records region_add / region_del / log_start / log_stop with the mask the
/// section reports.
#[derive(Default)]
struct MaskRecorder {
    log: std::sync::Mutex<Vec<String>>,
}

impl memtree::MemoryListener for MaskRecorder {
    fn region_add(&self, s: &memtree::Section<'_>) {
        self.log
            .lock()
            .unwrap()
            .push(format!("add {:#x} mask {}", s.range.start(), s.log_mask));
    }
    fn region_del(&self, s: &memtree::Section<'_>) {
        self.log
            .lock()
            .unwrap()
            .push(format!("del {:#x} mask {}", s.range.start(), s.log_mask));
    }
    fn log_start(&self, s: &memtree::Section<'_>, o: u8, n: u8) {
        self.log
            .lock()
            .unwrap()
            .push(format!("log_start {:#x} {o}->{n}", s.range.start()));
    }
    fn log_stop(&self, s: &memtree::Section<'_>, o: u8, n: u8) {
        self.log
            .lock()
            .unwrap()
            .push(format!("log_stop {:#x} {o}->{n}", s.range.start()));
    }
}

/// Rule (QEMU freezes the mask into the flat range at render): when one
/// commit changes a region's mask and unmaps it, `region_del`'s section
/// reports the mask the range had before the commit, the one listeners
/// were told.
#[test]
fn region_del_in_the_commit_that_changes_the_mask_reports_the_old_mask() {
    let memory = Memory::new();
    let root = memory.new_container("root", 1 << 32, None).unwrap();
    let vram = memory.new_ram("vram", 0x4000, None).unwrap();
    memory.add_subregion(root, 0x40000, vram).unwrap();
    let space = memory.new_address_space("memory", root, None).unwrap();
    let rec = std::sync::Arc::new(MaskRecorder::default());
    memory.register_listener(space, rec.clone()).unwrap();
    memory.set_log(vram, DirtyClient::VGA, true).unwrap();
    rec.log.lock().unwrap().clear();
    // Logging stops and the region goes in one commit.
    memory.transaction(|m| {
        m.set_log(vram, DirtyClient::VGA, false).unwrap();
        m.del_subregion(root, vram).unwrap();
    });
    let got1 = std::mem::take(&mut *rec.log.lock().unwrap());
    // Logging starts and the region comes back elsewhere... and goes again
    // in a commit that starts logging.
    memory.add_subregion(root, 0x80000, vram).unwrap();
    rec.log.lock().unwrap().clear();
    memory.transaction(|m| {
        m.set_log(vram, DirtyClient::VGA, true).unwrap();
        m.del_subregion(root, vram).unwrap();
    });
    let got2 = std::mem::take(&mut *rec.log.lock().unwrap());
    assert_eq!(
        (got1, got2),
        (
            vec!["del 0x40000 mask 1".to_owned()],
            vec!["del 0x80000 mask 0".to_owned()]
        )
    );
}
