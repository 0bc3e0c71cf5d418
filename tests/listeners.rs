//! Memory listeners (qemu-memory-semantics.md §6): the exact callback
//! sequence QEMU 7.2 produces for each kind of topology change, with
//! ioeventfds and coalesced MMIO.

use std::sync::{Arc, Mutex};

use memtree::{
    Endian, EventNotifier, EventfdSection, MemTxAttrs, MemTxResult, Memory, MemoryListener,
    MmioOps, RegionId, Section, SpaceId, TopologyError,
};

type Log = Arc<Mutex<Vec<String>>>;

/// Records every callback as one line: `<tag> <callback> <space> <range>
/// <region> <type>` (the tag is left out when it is empty).
struct Recorder {
    tag: &'static str,
    priority: u32,
    log: Log,
    refuse_global: bool,
}

impl Recorder {
    fn push(&self, line: String) {
        let line = if self.tag.is_empty() {
            line
        } else {
            format!("{} {line}", self.tag)
        };
        self.log.lock().unwrap().push(line);
    }
}

fn sec(s: &Section<'_>) -> String {
    format!(
        "{} {:#x}-{:#x} {} {}",
        s.space_name,
        s.range.start(),
        s.range.last(),
        s.range.region().name(),
        s.range.printed_type().as_str()
    )
}

fn fd(s: &EventfdSection<'_>) -> String {
    let data = s.data.map_or("any".to_owned(), |d| format!("{d:#x}"));
    format!(
        "{} {:#x}/{} {} {}",
        s.space_name,
        s.addr,
        s.size,
        data,
        s.notifier.name()
    )
}

impl MemoryListener for Recorder {
    fn priority(&self) -> u32 {
        self.priority
    }
    fn name(&self) -> &str {
        self.tag
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
    // QEMU's contract, asked for: a nop for every unchanged range.
    fn wants_region_nop(&self) -> bool {
        true
    }
    fn region_nop(&self, s: &Section<'_>) {
        self.push(format!("nop {}", sec(s)));
    }
    fn log_start(&self, s: &Section<'_>, old: u8, new: u8) {
        self.push(format!("log_start {} {old}->{new}", sec(s)));
    }
    fn log_stop(&self, s: &Section<'_>, old: u8, new: u8) {
        self.push(format!("log_stop {} {old}->{new}", sec(s)));
    }
    fn log_global_start(&self) -> Result<(), String> {
        self.push("log_global_start".into());
        if self.refuse_global {
            Err("not supported".into())
        } else {
            Ok(())
        }
    }
    fn log_global_stop(&self) {
        self.push("log_global_stop".into());
    }
    fn eventfd_add(&self, s: &EventfdSection<'_>) {
        self.push(format!("eventfd_add {}", fd(s)));
    }
    fn eventfd_del(&self, s: &EventfdSection<'_>) {
        self.push(format!("eventfd_del {}", fd(s)));
    }
    fn coalesced_io_add(&self, s: &Section<'_>, addr: u64, len: u128) {
        self.push(format!("coalesced_add {} {addr:#x}+{len:#x}", s.space_name));
    }
    fn coalesced_io_del(&self, s: &Section<'_>, addr: u64, len: u128) {
        self.push(format!("coalesced_del {} {addr:#x}+{len:#x}", s.space_name));
    }
}

fn recorder(tag: &'static str, priority: u32, log: &Log) -> Arc<Recorder> {
    Arc::new(Recorder {
        tag,
        priority,
        log: log.clone(),
        refuse_global: false,
    })
}

fn take(log: &Log) -> Vec<String> {
    std::mem::take(&mut *log.lock().unwrap())
}

/// A device that does nothing, in a chosen byte order.
struct Dev(Endian);

impl MmioOps for Dev {
    fn read(&self, _addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        Ok(0)
    }
    fn write(&self, _addr: u64, _data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        MemTxResult::OK
    }
    fn endianness(&self) -> Endian {
        self.0
    }
}

/// A machine with an empty 2^64 container "system" as address space
/// "memory", and a listener (no tag) already registered on it.
struct Fixture {
    memory: Memory,
    system: RegionId,
    space: SpaceId,
    log: Log,
}

fn fixture() -> Fixture {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 64, None).unwrap();
    let space = memory.new_address_space("memory", system, None).unwrap();
    let log = Log::default();
    memory
        .register_listener(space, recorder("", 0, &log))
        .unwrap();
    assert_eq!(take(&log), ["begin", "commit"], "replay of an empty view");
    Fixture {
        memory,
        system,
        space,
        log,
    }
}

#[test]
fn listeners_add_region_reports_one_add_inside_begin_commit() {
    let f = fixture();
    let ram = f.memory.new_ram("ram0", 0x1000, None).unwrap();
    assert!(
        take(&f.log).is_empty(),
        "an unmapped region changes no view"
    );
    f.memory.add_subregion(f.system, 0x1000, ram).unwrap();
    assert_eq!(
        take(&f.log),
        ["begin", "add memory 0x1000-0x1fff ram0 ram", "commit"]
    );
}

#[test]
fn listeners_move_is_del_then_add() {
    let f = fixture();
    let ram = f.memory.new_ram("ram0", 0x1000, None).unwrap();
    f.memory.add_subregion(f.system, 0x1000, ram).unwrap();
    take(&f.log);
    f.memory.set_address(ram, 0x4000).unwrap();
    assert_eq!(
        take(&f.log),
        [
            "begin",
            "del memory 0x1000-0x1fff ram0 ram",
            "add memory 0x4000-0x4fff ram0 ram",
            "commit"
        ]
    );
}

#[test]
fn listeners_remove_is_del_and_untouched_ranges_get_nop() {
    let f = fixture();
    let a = f.memory.new_ram("a", 0x1000, None).unwrap();
    let b = f.memory.new_ram("b", 0x1000, None).unwrap();
    f.memory.add_subregion(f.system, 0x0, a).unwrap();
    f.memory.add_subregion(f.system, 0x8000, b).unwrap();
    take(&f.log);
    f.memory.del_subregion(f.system, b).unwrap();
    assert_eq!(
        take(&f.log),
        [
            "begin",
            "del memory 0x8000-0x8fff b ram",
            "nop memory 0x0-0xfff a ram",
            "commit"
        ]
    );
}

#[test]
fn listeners_disable_and_enable_are_del_and_add() {
    let f = fixture();
    let ram = f.memory.new_ram("ram0", 0x1000, None).unwrap();
    f.memory.add_subregion(f.system, 0, ram).unwrap();
    take(&f.log);
    f.memory.set_enabled(ram, false).unwrap();
    assert_eq!(
        take(&f.log),
        ["begin", "del memory 0x0-0xfff ram0 ram", "commit"]
    );
    f.memory.set_enabled(ram, true).unwrap();
    assert_eq!(
        take(&f.log),
        ["begin", "add memory 0x0-0xfff ram0 ram", "commit"]
    );
}

#[test]
fn listeners_readonly_change_is_del_then_add() {
    let f = fixture();
    let ram = f.memory.new_ram("ram0", 0x1000, None).unwrap();
    f.memory.add_subregion(f.system, 0, ram).unwrap();
    take(&f.log);
    f.memory.set_readonly(ram, true).unwrap();
    assert_eq!(
        take(&f.log),
        [
            "begin",
            "del memory 0x0-0xfff ram0 ram",
            "add memory 0x0-0xfff ram0 rom",
            "commit"
        ]
    );
}

#[test]
fn listeners_dirty_log_mask_change_is_nop_with_log_start_or_stop() {
    let f = fixture();
    let ram = f.memory.new_ram("vram", 0x1000, None).unwrap();
    f.memory.add_subregion(f.system, 0, ram).unwrap();
    take(&f.log);
    f.memory.set_dirty_log_mask(ram, 1).unwrap();
    assert_eq!(
        take(&f.log),
        [
            "begin",
            "nop memory 0x0-0xfff vram ram",
            "log_start memory 0x0-0xfff vram ram 0->1",
            "commit"
        ]
    );
    f.memory.set_dirty_log_mask(ram, 0).unwrap();
    assert_eq!(
        take(&f.log),
        [
            "begin",
            "nop memory 0x0-0xfff vram ram",
            "log_stop memory 0x0-0xfff vram ram 1->0",
            "commit"
        ]
    );
}

#[test]
fn listeners_priorities_order_del_reverse_add_forward_begin_commit_forward() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 64, None).unwrap();
    let space = memory.new_address_space("memory", system, None).unwrap();
    let log = Log::default();
    // Registered high first: the registry orders by priority, not by time.
    memory
        .register_listener(space, recorder("hi", 10, &log))
        .unwrap();
    memory
        .register_listener(space, recorder("lo", 0, &log))
        .unwrap();
    let ram = memory.new_ram("ram0", 0x1000, None).unwrap();
    memory.add_subregion(system, 0, ram).unwrap();
    take(&log);
    memory.set_address(ram, 0x1000).unwrap();
    assert_eq!(
        take(&log),
        [
            "lo begin",
            "hi begin",
            "hi del memory 0x0-0xfff ram0 ram",
            "lo del memory 0x0-0xfff ram0 ram",
            "lo add memory 0x1000-0x1fff ram0 ram",
            "hi add memory 0x1000-0x1fff ram0 ram",
            "lo commit",
            "hi commit"
        ]
    );
}

#[test]
fn listeners_equal_priorities_keep_registration_order() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 64, None).unwrap();
    let space = memory.new_address_space("memory", system, None).unwrap();
    let log = Log::default();
    memory
        .register_listener(space, recorder("first", 5, &log))
        .unwrap();
    memory
        .register_listener(space, recorder("second", 5, &log))
        .unwrap();
    take(&log);
    let ram = memory.new_ram("ram0", 0x1000, None).unwrap();
    memory.add_subregion(system, 0, ram).unwrap();
    memory.del_subregion(system, ram).unwrap();
    assert_eq!(
        take(&log),
        [
            "first begin",
            "second begin",
            "first add memory 0x0-0xfff ram0 ram",
            "second add memory 0x0-0xfff ram0 ram",
            "first commit",
            "second commit",
            "first begin",
            "second begin",
            "second del memory 0x0-0xfff ram0 ram",
            "first del memory 0x0-0xfff ram0 ram",
            "first commit",
            "second commit"
        ]
    );
}

#[test]
fn listeners_begin_commit_go_to_every_space_but_diffs_only_to_their_own() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 64, None).unwrap();
    let io = memory.new_container("io", 0x10000, None).unwrap();
    let mem_space = memory.new_address_space("memory", system, None).unwrap();
    let io_space = memory.new_address_space("I/O", io, None).unwrap();
    let log = Log::default();
    memory
        .register_listener(mem_space, recorder("m", 0, &log))
        .unwrap();
    memory
        .register_listener(io_space, recorder("i", 1, &log))
        .unwrap();
    take(&log);
    let port = memory
        .new_mmio("port", 4, Arc::new(Dev(Endian::Little)), None)
        .unwrap();
    memory.add_subregion(io, 0x60, port).unwrap();
    assert_eq!(
        take(&log),
        [
            "m begin",
            "i begin",
            "i add I/O 0x60-0x63 port i/o",
            "m commit",
            "i commit"
        ]
    );
}

#[test]
fn listeners_begin_commit_only_when_topology_changed() {
    let f = fixture();
    let ram = f.memory.new_ram("ram0", 0x1000, None).unwrap();
    f.memory.add_subregion(f.system, 0, ram).unwrap();
    take(&f.log);
    // An empty transaction, and queries, publish nothing.
    f.memory.transaction(|_| {});
    let _ = f.memory.region_info(ram).unwrap();
    assert!(take(&f.log).is_empty());
    // A nested transaction renders once, at the outermost commit.
    f.memory.transaction(|m| {
        m.set_address(ram, 0x2000).unwrap();
        m.transaction(|m| m.set_address(ram, 0x3000).unwrap());
        m.set_address(ram, 0x4000).unwrap();
    });
    assert_eq!(
        take(&f.log),
        [
            "begin",
            "del memory 0x0-0xfff ram0 ram",
            "add memory 0x4000-0x4fff ram0 ram",
            "commit"
        ]
    );
}

#[test]
fn listeners_registration_replays_current_state() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 64, None).unwrap();
    let space = memory.new_address_space("memory", system, None).unwrap();
    let vram = memory.new_ram("vram", 0x1000, None).unwrap();
    let dev = memory
        .new_mmio("dev", 0x100, Arc::new(Dev(Endian::Little)), None)
        .unwrap();
    memory.add_subregion(system, 0, vram).unwrap();
    memory.add_subregion(system, 0x1000, dev).unwrap();
    memory.set_dirty_log_mask(vram, 1).unwrap();
    memory.add_coalescing(dev, 0x10, 0x20).unwrap();
    let kick = EventNotifier::new("kick");
    memory.add_eventfd(dev, 0x40, 4, Some(7), &kick).unwrap();
    let log = Log::default();
    memory
        .register_listener(space, recorder("", 0, &log))
        .unwrap();
    assert_eq!(
        take(&log),
        [
            "begin",
            "add memory 0x0-0xfff vram ram",
            "log_start memory 0x0-0xfff vram ram 0->1",
            "add memory 0x1000-0x10ff dev i/o",
            "coalesced_add memory 0x1010+0x20",
            "eventfd_add memory 0x1040/4 0x7 kick",
            "commit"
        ]
    );
}

#[test]
fn listeners_registration_replays_global_dirty_log() {
    let f = fixture();
    f.memory.global_dirty_log_start().unwrap();
    // QEMU re-renders after log_global_start (the MIGRATION bit enters the
    // masks): begin .. commit.
    let got = take(&f.log);
    assert_eq!(got[..2], ["log_global_start", "begin"]);
    assert_eq!(got.last().map(String::as_str), Some("commit"));
    let log = Log::default();
    f.memory
        .register_listener(f.space, recorder("late", 0, &log))
        .unwrap();
    assert_eq!(
        take(&log),
        ["late begin", "late log_global_start", "late commit"]
    );
}

#[test]
fn listeners_unregister_replays_deletions() {
    let f = fixture();
    let vram = f.memory.new_ram("vram", 0x1000, None).unwrap();
    let dev = f
        .memory
        .new_mmio("dev", 0x100, Arc::new(Dev(Endian::Little)), None)
        .unwrap();
    f.memory.add_subregion(f.system, 0, vram).unwrap();
    f.memory.add_subregion(f.system, 0x1000, dev).unwrap();
    f.memory.set_dirty_log_mask(vram, 1).unwrap();
    f.memory.set_coalescing(dev).unwrap();
    let kick = EventNotifier::new("kick");
    f.memory.add_eventfd(dev, 0x40, 0, None, &kick).unwrap();
    let log = Log::default();
    let id = f
        .memory
        .register_listener(f.space, recorder("x", 0, &log))
        .unwrap();
    take(&log);
    f.memory.unregister_listener(id).unwrap();
    assert_eq!(
        take(&log),
        [
            "x begin",
            "x log_stop memory 0x0-0xfff vram ram 1->0",
            "x del memory 0x0-0xfff vram ram",
            "x coalesced_del memory 0x1000+0x100",
            "x del memory 0x1000-0x10ff dev i/o",
            "x eventfd_del memory 0x1040/0 any kick",
            "x commit"
        ]
    );
    // Gone: later changes do not reach it, a second unregister is harmless.
    f.memory.set_enabled(vram, false).unwrap();
    assert!(take(&log).is_empty());
    f.memory.unregister_listener(id).unwrap();
    assert!(take(&log).is_empty());
}

#[test]
fn listeners_ioeventfd_add_reverse_del_forward_without_begin_commit() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 64, None).unwrap();
    let space = memory.new_address_space("memory", system, None).unwrap();
    let dev = memory
        .new_mmio("dev", 0x100, Arc::new(Dev(Endian::Little)), None)
        .unwrap();
    memory.add_subregion(system, 0x1000, dev).unwrap();
    let log = Log::default();
    memory
        .register_listener(space, recorder("lo", 0, &log))
        .unwrap();
    memory
        .register_listener(space, recorder("hi", 10, &log))
        .unwrap();
    take(&log);
    let kick = EventNotifier::new("kick");
    memory
        .add_eventfd(dev, 0x8, 4, Some(0x1234), &kick)
        .unwrap();
    assert_eq!(
        take(&log),
        [
            "hi eventfd_add memory 0x1008/4 0x1234 kick",
            "lo eventfd_add memory 0x1008/4 0x1234 kick"
        ],
        "ioeventfd-only commits call no begin/commit; eventfd_add goes in reverse"
    );
    memory
        .del_eventfd(dev, 0x8, 4, Some(0x1234), &kick)
        .unwrap();
    assert_eq!(
        take(&log),
        [
            "lo eventfd_del memory 0x1008/4 0x1234 kick",
            "hi eventfd_del memory 0x1008/4 0x1234 kick"
        ],
        "eventfd_del goes forward"
    );
}

#[test]
fn listeners_ioeventfd_follows_its_region_and_diffs_symmetrically() {
    let f = fixture();
    let dev = f
        .memory
        .new_mmio("dev", 0x100, Arc::new(Dev(Endian::Little)), None)
        .unwrap();
    f.memory.add_subregion(f.system, 0x1000, dev).unwrap();
    take(&f.log);
    let (a, b) = (EventNotifier::new("a"), EventNotifier::new("b"));
    f.memory.transaction(|m| {
        m.add_eventfd(dev, 0x10, 2, None, &a).unwrap();
        m.add_eventfd(dev, 0x20, 2, None, &b).unwrap();
    });
    assert_eq!(
        take(&f.log),
        [
            "eventfd_add memory 0x1010/2 any a",
            "eventfd_add memory 0x1020/2 any b"
        ]
    );
    // Moving the region moves its ioeventfds, after the range diff and
    // inside the same begin/commit; the set difference is in address order.
    f.memory.set_address(dev, 0x0).unwrap();
    assert_eq!(
        take(&f.log),
        [
            "begin",
            "del memory 0x1000-0x10ff dev i/o",
            "add memory 0x0-0xff dev i/o",
            "eventfd_add memory 0x10/2 any a",
            "eventfd_add memory 0x20/2 any b",
            "eventfd_del memory 0x1010/2 any a",
            "eventfd_del memory 0x1020/2 any b",
            "commit"
        ]
    );
    // An ioeventfd outside what the address space shows is not reported.
    let c = EventNotifier::new("c");
    f.memory.add_eventfd(dev, 0x200, 1, None, &c).unwrap();
    assert!(take(&f.log).is_empty());
}

#[test]
fn listeners_ioeventfd_data_is_converted_to_device_byte_order() {
    let f = fixture();
    let dev = f
        .memory
        .new_mmio("be", 0x100, Arc::new(Dev(Endian::Big)), None)
        .unwrap();
    f.memory.add_subregion(f.system, 0, dev).unwrap();
    take(&f.log);
    let n = EventNotifier::new("n");
    f.memory
        .add_eventfd(dev, 0, 4, Some(0x1122_3344), &n)
        .unwrap();
    assert_eq!(take(&f.log), ["eventfd_add memory 0x0/4 0x44332211 n"]);
    // Deleting with the same (target-order) value finds it.
    f.memory
        .del_eventfd(dev, 0, 4, Some(0x1122_3344), &n)
        .unwrap();
    assert_eq!(take(&f.log), ["eventfd_del memory 0x0/4 0x44332211 n"]);
}

#[test]
fn listeners_ioeventfd_del_of_absent_entry_is_an_error() {
    let f = fixture();
    let dev = f
        .memory
        .new_mmio("dev", 0x100, Arc::new(Dev(Endian::Little)), None)
        .unwrap();
    let (a, other) = (EventNotifier::new("a"), EventNotifier::new("other"));
    f.memory.add_eventfd(dev, 0x10, 4, Some(1), &a).unwrap();
    let err = f
        .memory
        .del_eventfd(dev, 0x10, 4, Some(1), &other)
        .unwrap_err();
    assert!(matches!(err, TopologyError::NoSuchEventfd { .. }), "{err}");
    let err = f.memory.del_eventfd(dev, 0x10, 4, Some(2), &a).unwrap_err();
    assert!(matches!(err, TopologyError::NoSuchEventfd { .. }), "{err}");
    let err = f.memory.add_eventfd(dev, 0x10, 3, None, &a).unwrap_err();
    assert!(
        matches!(err, TopologyError::BadEventfdSize { size: 3, .. }),
        "{err}"
    );
    // Size 0 is QEMU's wildcard: it matches the entry at that address.
    f.memory.del_eventfd(dev, 0x10, 0, None, &other).unwrap();
    let err = f.memory.del_eventfd(dev, 0x10, 0, None, &a).unwrap_err();
    assert!(matches!(err, TopologyError::NoSuchEventfd { .. }), "{err}");
}

#[test]
fn listeners_coalesced_ranges_are_sent_immediately_and_follow_the_diff() {
    let f = fixture();
    let dev = f
        .memory
        .new_mmio("dev", 0x100, Arc::new(Dev(Endian::Little)), None)
        .unwrap();
    f.memory.add_subregion(f.system, 0x1000, dev).unwrap();
    take(&f.log);
    f.memory.add_coalescing(dev, 0x80, 0x100).unwrap();
    assert_eq!(
        take(&f.log),
        ["coalesced_add memory 0x1080+0x80"],
        "immediately, clipped to what the range shows"
    );
    f.memory.set_address(dev, 0x2000).unwrap();
    assert_eq!(
        take(&f.log),
        [
            "begin",
            "coalesced_del memory 0x1080+0x80",
            "del memory 0x1000-0x10ff dev i/o",
            "add memory 0x2000-0x20ff dev i/o",
            "coalesced_add memory 0x2080+0x80",
            "commit"
        ]
    );
    f.memory.add_coalescing(dev, 0x0, 0x10).unwrap();
    f.memory.clear_coalescing(dev).unwrap();
    assert_eq!(
        take(&f.log),
        [
            "coalesced_add memory 0x2000+0x10",
            "coalesced_del memory 0x2080+0x80",
            "coalesced_del memory 0x2000+0x10"
        ]
    );
    f.memory.clear_coalescing(dev).unwrap();
    assert!(take(&f.log).is_empty());
}

#[test]
fn listeners_coalesced_del_goes_in_reverse_priority() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 64, None).unwrap();
    let space = memory.new_address_space("memory", system, None).unwrap();
    let dev = memory
        .new_mmio("dev", 0x100, Arc::new(Dev(Endian::Little)), None)
        .unwrap();
    memory.add_subregion(system, 0, dev).unwrap();
    let log = Log::default();
    memory
        .register_listener(space, recorder("lo", 0, &log))
        .unwrap();
    memory
        .register_listener(space, recorder("hi", 10, &log))
        .unwrap();
    take(&log);
    memory.set_coalescing(dev).unwrap();
    memory.clear_coalescing(dev).unwrap();
    assert_eq!(
        take(&log),
        [
            "lo coalesced_add memory 0x0+0x100",
            "hi coalesced_add memory 0x0+0x100",
            "hi coalesced_del memory 0x0+0x100",
            "lo coalesced_del memory 0x0+0x100"
        ]
    );
}

#[test]
fn listeners_destroyed_space_sees_every_range_deleted() {
    let f = fixture();
    let ram = f.memory.new_ram("ram0", 0x1000, None).unwrap();
    let dev = f
        .memory
        .new_mmio("dev", 0x100, Arc::new(Dev(Endian::Little)), None)
        .unwrap();
    f.memory.add_subregion(f.system, 0, ram).unwrap();
    f.memory.add_subregion(f.system, 0x1000, dev).unwrap();
    let n = EventNotifier::new("n");
    f.memory.add_eventfd(dev, 0, 0, None, &n).unwrap();
    take(&f.log);
    f.memory.destroy_address_space(f.space).unwrap();
    assert_eq!(
        take(&f.log),
        [
            "begin",
            "del memory 0x0-0xfff ram0 ram",
            "del memory 0x1000-0x10ff dev i/o",
            "eventfd_del memory 0x1000/0 any n",
            "commit"
        ]
    );
    // The space's listeners are gone with it.
    f.memory.set_enabled(ram, false).unwrap();
    assert!(take(&f.log).is_empty());
}

#[test]
fn listeners_global_dirty_log_start_forward_stop_reverse_with_rollback() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 64, None).unwrap();
    let space = memory.new_address_space("memory", system, None).unwrap();
    let log = Log::default();
    memory
        .register_listener(space, recorder("a", 0, &log))
        .unwrap();
    memory
        .register_listener(space, recorder("b", 5, &log))
        .unwrap();
    take(&log);
    memory.global_dirty_log_start().unwrap();
    // A second user only counts; its stop leaves tracking on.
    memory.global_dirty_log_start().unwrap();
    memory.global_dirty_log_stop().unwrap();
    assert!(memory.global_dirty_log());
    memory.global_dirty_log_stop().unwrap();
    assert_eq!(
        take(&log),
        [
            "a log_global_start",
            "b log_global_start",
            // QEMU's re-render after starting ...
            "a begin",
            "b begin",
            "a commit",
            "b commit",
            // ... and before stopping.
            "a begin",
            "b begin",
            "a commit",
            "b commit",
            "b log_global_stop",
            "a log_global_stop"
        ]
    );
    let refuser = Arc::new(Recorder {
        tag: "c",
        priority: 7,
        log: log.clone(),
        refuse_global: true,
    });
    memory.register_listener(space, refuser).unwrap();
    take(&log);
    let err = memory.global_dirty_log_start().unwrap_err();
    assert!(
        matches!(err, TopologyError::ListenerRefused { .. }),
        "{err}"
    );
    assert!(!memory.global_dirty_log());
    assert_eq!(
        take(&log),
        [
            "a log_global_start",
            "b log_global_start",
            "c log_global_start",
            "b log_global_stop",
            "a log_global_stop"
        ]
    );
}

/// A listener that tries to edit the topology from its callbacks.
struct Meddler {
    memory: memtree::WeakMemory,
    victim: RegionId,
    space: SpaceId,
    errors: Mutex<Vec<TopologyError>>,
}

impl Meddler {
    fn meddle(&self) {
        let Some(m) = self.memory.upgrade() else {
            return;
        };
        let mut errors = self.errors.lock().unwrap();
        errors.extend(m.set_enabled(self.victim, false).err());
        errors.extend(m.add_coalescing(self.victim, 0, 1).err());
        errors.extend(m.global_dirty_log_start().err());
        errors.extend(
            m.register_listener(
                self.space,
                Arc::new(Recorder {
                    tag: "inner",
                    priority: 0,
                    log: Log::default(),
                    refuse_global: false,
                }),
            )
            .err(),
        );
    }
}

impl MemoryListener for Meddler {
    fn region_add(&self, _s: &Section<'_>) {
        self.meddle();
    }
    fn commit(&self) {
        self.meddle();
    }
}

#[test]
fn listeners_edit_from_callback_is_listener_reentry_not_deadlock() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 64, None).unwrap();
    let space = memory.new_address_space("memory", system, None).unwrap();
    let ram = memory.new_ram("ram0", 0x1000, None).unwrap();
    memory.add_subregion(system, 0, ram).unwrap();
    let meddler = Arc::new(Meddler {
        memory: memory.downgrade(),
        victim: ram,
        space,
        errors: Mutex::new(Vec::new()),
    });
    // During the registration replay (region_add + commit)...
    memory.register_listener(space, meddler.clone()).unwrap();
    // ... and during a commit.
    memory.set_address(ram, 0x1000).unwrap();
    let errors = std::mem::take(&mut *meddler.errors.lock().unwrap());
    assert_eq!(errors.len(), 16, "{errors:?}");
    assert!(errors.iter().all(|e| *e == TopologyError::ListenerReentry));
    // Nothing the meddler tried took effect, and the machine still works.
    let info = memory.region_info(ram).unwrap();
    assert!(info.enabled);
    assert_eq!(info.addr, 0x1000);
    assert!(!memory.global_dirty_log());
    memory.set_address(ram, 0x2000).unwrap();
    let view = memory.address_space(space).unwrap().view();
    assert_eq!(view.ranges()[0].start(), 0x2000);
}

#[test]
fn listeners_sections_carry_the_old_view_during_a_diff() {
    struct ViewCheck(Mutex<Vec<bool>>);
    impl MemoryListener for ViewCheck {
        fn region_add(&self, s: &Section<'_>) {
            // The range being added is not yet in the published view.
            let published = s.view.ranges().iter().any(|r| r.start() == s.range.start());
            self.0.lock().unwrap().push(published);
        }
    }
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 64, None).unwrap();
    let space = memory.new_address_space("memory", system, None).unwrap();
    let check = Arc::new(ViewCheck(Mutex::new(Vec::new())));
    memory.register_listener(space, check.clone()).unwrap();
    let ram = memory.new_ram("ram0", 0x1000, None).unwrap();
    memory.add_subregion(system, 0x5000, ram).unwrap();
    assert_eq!(*check.0.lock().unwrap(), [false]);
}
