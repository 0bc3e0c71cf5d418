//! A real guest on KVM (when `/dev/kvm` is usable; otherwise each test says
//! it was skipped): memory slots follow the address space through a memory
//! listener, and MMIO and port I/O exits are served by memtree devices.
#![cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]

use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use memtree::integrations::kvm::{dispatch_exit, ExitAction, KvmMemorySlots};
use memtree::region::attrs::{Endian, MemTxAttrs, MemTxResult, MmioOps};
use memtree::{DirtyClient, Memory, RamBacking};

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

/// A device that answers reads with `0x5a` and records writes.
#[derive(Default)]
struct Recorder {
    writes: Mutex<Vec<(u64, u64, u32)>>,
}

impl MmioOps for Recorder {
    fn read(&self, _addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        Ok(0x5a)
    }
    fn write(&self, addr: u64, data: u64, size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        self.writes.lock().unwrap().push((addr, data, size));
        MemTxResult::OK
    }
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

fn kvm_or_skip(test: &str) -> Option<(Kvm, Arc<VmFd>)> {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            println!("{test}: skipped, /dev/kvm is not usable here: {e}");
            return None;
        }
    };
    match kvm.create_vm() {
        Ok(vm) => Some((kvm, Arc::new(vm))),
        Err(e) => {
            println!("{test}: skipped, cannot create a KVM VM: {e}");
            None
        }
    }
}

/// A vCPU in real mode at `0:ip`.
fn real_mode_vcpu(vm: &VmFd, ip: u64) -> VcpuFd {
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = ip;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    vcpu
}

/// The guest (16-bit real mode, at 0x1000):
///
/// ```text
/// mov dx, 0x3f8
/// mov al, [0xd000]     ; MMIO read: exits, the device answers 0x5a
/// out dx, al           ; port I/O: exits, the port device records 0x5a
/// mov [0x8000], al     ; RAM write: no exit (memory slot)
/// mov byte [0xd004], 0x77 ; MMIO write: exits
/// mov al, [0xe010]     ; the device's own RAM (a second slot): 0x33
/// mov [0x8001], al
/// hlt
/// ```
const GUEST: &[u8] = &[
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xa0, 0x00, 0xd0, // mov al, [0xd000]
    0xee, // out dx, al
    0xa2, 0x00, 0x80, // mov [0x8000], al
    0xc6, 0x06, 0x04, 0xd0, 0x77, // mov byte [0xd004], 0x77
    0xa0, 0x10, 0xe0, // mov al, [0xe010]
    0xa2, 0x01, 0x80, // mov [0x8001], al
    0xf4, // hlt
];

/// The listener installs one slot per RAM range (none for MMIO), the guest
/// runs against memtree's devices and RAM, and unplugging a device removes
/// the slot of its RAM before the memory can go.
#[test]
fn kvm_guest_runs_on_memtree_slots_and_devices() {
    let Some((kvm, vm)) = kvm_or_skip("kvm_guest_runs_on_memtree_slots_and_devices") else {
        return;
    };
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let ram = memory.new_ram("pc.ram", 0xc000, None).unwrap();
    memory.add_subregion(system, 0, ram).unwrap();
    let regs = Arc::new(Recorder::default());
    let mmio = memory.new_mmio("regs", 0x1000, regs.clone(), None).unwrap();
    memory.add_subregion(system, 0xd000, mmio).unwrap();
    let gpu = memory.new_owner("gpu", None).unwrap();
    let vram_backend = memory
        .new_backend("vram", 0x1000, RamBacking::Anonymous)
        .unwrap();
    vram_backend.write(0x10, &[0x33]).unwrap();
    let vram = memory
        .new_ram_from_backend("vram", &vram_backend, 0, 0x1000, Some(gpu))
        .unwrap();
    drop(vram_backend);
    memory.add_subregion(system, 0xe000, vram).unwrap();
    let io_root = memory.new_io_root("io", 0x10000).unwrap();
    let uart = Arc::new(Recorder::default());
    let port = memory.new_mmio("uart", 8, uart.clone(), None).unwrap();
    memory.add_subregion(io_root, 0x3f8, port).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let iid = memory.new_address_space("I/O", io_root, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    let io_space = memory.address_space(iid).unwrap();
    space.write(0x1000, GUEST, A).into_result().unwrap();

    let slots = Arc::new(KvmMemorySlots::new(&kvm, vm.clone()));
    let lid = memory.register_listener(sid, slots.clone()).unwrap();
    let installed: Vec<(u64, u64, String)> = slots
        .slots()
        .into_iter()
        .map(|s| (s.guest_phys_addr, s.size, s.region))
        .collect();
    assert_eq!(
        installed,
        vec![
            (0, 0xc000, "pc.ram".into()),
            (0xe000, 0x1000, "vram".into())
        ],
        "one slot per RAM range, none for MMIO"
    );

    let mut vcpu = real_mode_vcpu(&vm, 0x1000);
    let (mut mem, mut io) = (space.cursor(), io_space.cursor());
    let mut exits = Vec::new();
    for _ in 0..64 {
        let exit = vcpu.run().expect("KVM_RUN");
        let action = dispatch_exit(exit, &mut mem, Some(&mut io));
        exits.push(action.clone());
        if action != ExitAction::Resume {
            break;
        }
    }
    assert_eq!(exits.last(), Some(&ExitAction::Halt), "{exits:?}");
    assert_eq!(
        exits.len(),
        4,
        "three exits (MMIO read, port write, MMIO write) and hlt: RAM needs none"
    );
    assert_eq!(*uart.writes.lock().unwrap(), vec![(0, 0x5a, 1)]);
    assert_eq!(*regs.writes.lock().unwrap(), vec![(4, 0x77, 1)]);
    let mut buf = [0u8; 2];
    assert!(space.read(0x8000, &mut buf, A).is_ok());
    assert_eq!(buf, [0x5a, 0x33], "guest RAM writes land in memtree's RAM");

    let report = memory.unplug(gpu).unwrap();
    assert!(report.outstanding.is_empty(), "{report:?}");
    let left: Vec<String> = slots.slots().into_iter().map(|s| s.region).collect();
    assert_eq!(
        left,
        vec!["pc.ram".to_string()],
        "the unplug removed the slot"
    );
    assert!(slots.errors().is_empty(), "{:?}", slots.errors());

    memory.unregister_listener(lid).unwrap();
    assert!(slots.slots().is_empty(), "unregistering deletes every slot");
    drop((space, io_space, mem, io));
    assert!(memory.teardown().is_clean());
}

/// Tearing the machine down deletes the slots of a listener still
/// registered, so the memory they held is freed and nothing leaks.
#[test]
fn kvm_teardown_deletes_slots_and_frees_their_memory() {
    let Some((kvm, vm)) = kvm_or_skip("kvm_teardown_deletes_slots_and_frees_their_memory") else {
        return;
    };
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let dev = memory.new_owner("nic", None).unwrap();
    let ram = memory.new_ram("nic.ram", 0x2000, Some(dev)).unwrap();
    memory.add_subregion(system, 0x10_0000, ram).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let slots = Arc::new(KvmMemorySlots::new(&kvm, vm));
    memory.register_listener(sid, slots.clone()).unwrap();
    assert_eq!(slots.slots().len(), 1);
    let report = memory.teardown();
    assert!(report.is_clean(), "{report}");
    assert!(slots.slots().is_empty());
}

/// Ranges that are not page aligned keep their aligned middle as a slot;
/// the head and tail are emulated through exits.
#[test]
fn kvm_slots_cover_only_whole_pages() {
    let Some((kvm, vm)) = kvm_or_skip("kvm_slots_cover_only_whole_pages") else {
        return;
    };
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let ram = memory.new_ram("ram", 0x4000, None).unwrap();
    // An alias that starts and ends mid-page.
    let alias = memory
        .new_alias("window", ram, 0x800, 0x2000, None)
        .unwrap();
    memory.add_subregion(system, 0x10_0800, alias).unwrap();
    let small = memory.new_ram("small", 0x800, None).unwrap();
    memory.add_subregion(system, 0x20_0000, small).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let slots = Arc::new(KvmMemorySlots::new(&kvm, vm));
    memory.register_listener(sid, slots.clone()).unwrap();
    let installed: Vec<(u64, u64)> = slots
        .slots()
        .into_iter()
        .map(|s| (s.guest_phys_addr, s.size))
        .collect();
    assert_eq!(
        installed,
        vec![(0x10_1000, 0x1000)],
        "only the whole page in the middle"
    );
    assert!(slots.errors().is_empty(), "{:?}", slots.errors());
}

/// A listener that panics in its first `region_add` (after KVM's, which runs
/// first at a lower priority).
struct PanicsOnce(std::sync::atomic::AtomicBool);

impl memtree::MemoryListener for PanicsOnce {
    fn priority(&self) -> u32 {
        20
    }
    fn region_add(&self, _section: &memtree::Section<'_>) {
        if self.0.swap(false, std::sync::atomic::Ordering::SeqCst) {
            panic!("listener refuses the range");
        }
    }
}

/// Installing a slot of our own over `gpa..gpa + 0x1000` succeeds only if no
/// other slot covers it any more; the probe slot is deleted again.
fn gpa_is_free_in_kvm(vm: &VmFd, gpa: u64) -> bool {
    let probe = memtree::RamBlock::new("probe", 0x1000, memtree::RamBacking::Anonymous).unwrap();
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 200,
        guest_phys_addr: gpa,
        memory_size: 0x1000,
        userspace_addr: probe.host_addr() as u64,
        flags: 0,
    };
    // SAFETY: `probe` stays allocated until the slot is deleted below.
    let free = unsafe { vm.set_user_memory_region(region) }.is_ok();
    if free {
        let delete = kvm_bindings::kvm_userspace_memory_region {
            memory_size: 0,
            userspace_addr: 0,
            ..region
        };
        // SAFETY: deleting the slot installed above.
        unsafe { vm.set_user_memory_region(delete) }.unwrap();
    }
    free
}

/// Issue 14, item 1: a second listener that panics in the commit that adds
/// a device's RAM does not leave KVM with a slot nobody deletes: the commit
/// still publishes the view, so the unplug's `region_del` deletes the slot
/// before the memory goes, and the panic reaches the caller.
#[test]
fn kvm_slot_is_deleted_with_its_memory_when_another_listener_panics() {
    let Some((kvm, vm)) =
        kvm_or_skip("kvm_slot_is_deleted_with_its_memory_when_another_listener_panics")
    else {
        return;
    };
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let slots = Arc::new(KvmMemorySlots::new(&kvm, vm.clone()));
    let lid = memory.register_listener(sid, slots.clone()).unwrap();
    memory
        .register_listener(
            sid,
            Arc::new(PanicsOnce(std::sync::atomic::AtomicBool::new(true))),
        )
        .unwrap();
    let dev = memory.new_owner("nic", None).unwrap();
    let ram = memory.new_ram("nic.ram", 0x1000, Some(dev)).unwrap();
    let added = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        memory.add_subregion(system, 0x10_0000, ram)
    }));
    assert!(added.is_err(), "the listener's panic reaches the caller");
    assert_eq!(slots.slots().len(), 1, "KVM got its slot");
    let view = memory.address_space(sid).unwrap().view();
    assert_eq!(view.ranges().len(), 1, "and the view was published");
    drop(view);
    memory.unplug(dev).unwrap();
    assert!(
        slots.slots().is_empty(),
        "the unplug deleted the slot: {:?}",
        slots.slots()
    );
    memory.unregister_listener(lid).unwrap();
    drop(slots);
    assert!(gpa_is_free_in_kvm(&vm, 0x10_0000), "no slot is left in KVM");
    let report = memory.teardown();
    assert!(report.survivors.is_empty(), "{report}");
}

/// Issue 14, item 1: dropping `KvmMemorySlots` deletes the KVM slots it
/// still holds before their memory can go.
#[test]
fn kvm_dropping_the_slot_listener_deletes_its_slots() {
    let Some((kvm, vm)) = kvm_or_skip("kvm_dropping_the_slot_listener_deletes_its_slots") else {
        return;
    };
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let ram = memory.new_ram("ram", 0x2000, None).unwrap();
    memory.add_subregion(system, 0x20_0000, ram).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    let slots = KvmMemorySlots::new(&kvm, vm.clone());
    // Drive the listener by hand, as a VMM that manages it itself would.
    let view = space.view();
    let section = memtree::Section {
        space: sid,
        space_name: "memory",
        range: &view.ranges()[0],
        view: &view,
        log_mask: 0,
    };
    memtree::MemoryListener::region_add(&slots, &section);
    assert_eq!(slots.slots().len(), 1);
    assert!(!gpa_is_free_in_kvm(&vm, 0x20_0000), "the slot is installed");
    drop(slots);
    assert!(
        gpa_is_free_in_kvm(&vm, 0x20_0000),
        "dropping the listener deleted its slot"
    );
    drop((view, space));
    assert!(memory.teardown().is_clean());
}

/// The guest of the dirty-log test (real mode, at 0x1000): writes one byte
/// at 0x2000, one at 0x5123 and a word across the 0x8000/0x9000 boundary.
const DIRTY_GUEST: &[u8] = &[
    0xc6, 0x06, 0x00, 0x20, 0x11, // mov byte [0x2000], 0x11
    0xc6, 0x06, 0x23, 0x51, 0x22, // mov byte [0x5123], 0x22
    0xc7, 0x06, 0xff, 0x8f, 0x44, 0x33, // mov word [0x8fff], 0x3344
    0xf4, // hlt
];

/// Global tracking sets `KVM_MEM_LOG_DIRTY_PAGES` on the RAM slot, and
/// `log_sync` (through `take_dirty_ram`) reports exactly the pages the guest
/// wrote, with no exit: KVM's log merged into memtree's MIGRATION bitmap.
#[test]
fn kvm_log_sync_reports_exactly_the_pages_the_guest_wrote() {
    let Some((kvm, vm)) = kvm_or_skip("kvm_log_sync_reports_exactly_the_pages_the_guest_wrote")
    else {
        return;
    };
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let ram = memory.new_ram("pc.ram", 0xc000, None).unwrap();
    memory.add_subregion(system, 0, ram).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    space.write(0x1000, DIRTY_GUEST, A).into_result().unwrap();
    let slots = Arc::new(KvmMemorySlots::new(&kvm, vm.clone()));
    let lid = memory.register_listener(sid, slots.clone()).unwrap();
    assert!(slots.logging_slots().is_empty(), "no client tracks yet");
    memory.global_dirty_log_start().unwrap();
    assert_eq!(slots.logging_slots().len(), 1, "{:?}", slots.errors());
    memory.set_log(ram, DirtyClient::VGA, true).unwrap();

    let mut vcpu = real_mode_vcpu(&vm, 0x1000);
    let mut mem = space.cursor();
    let mut exits = Vec::new();
    for _ in 0..16 {
        let action = dispatch_exit(vcpu.run().expect("KVM_RUN"), &mut mem, None);
        exits.push(action.clone());
        if action != ExitAction::Resume {
            break;
        }
    }
    assert_eq!(exits, vec![ExitAction::Halt], "RAM writes need no exit");
    let taken = memory.take_dirty_ram(sid, DirtyClient::MIGRATION).unwrap();
    let pages: Vec<u64> = taken[0].dirty.pages().collect();
    assert_eq!(pages, vec![0x2000, 0x5000, 0x8000, 0x9000]);
    // The same sync fed VGA; KVM's log was cleared by the fetch.
    let vga: Vec<u64> = memory
        .snapshot_and_clear_dirty(ram, 0, 0xc000, DirtyClient::VGA)
        .unwrap()
        .pages()
        .collect();
    assert_eq!(vga, vec![0x2000, 0x5000, 0x8000, 0x9000]);
    let again = memory.take_dirty_ram(sid, DirtyClient::MIGRATION).unwrap();
    assert_eq!(again[0].dirty.count(), 0);
    let mut b = [0u8; 2];
    assert!(space.read(0x8fff, &mut b, A).is_ok());
    assert_eq!(b, [0x44, 0x33]);

    memory.set_log(ram, DirtyClient::VGA, false).unwrap();
    memory.global_dirty_log_stop().unwrap();
    assert!(slots.logging_slots().is_empty(), "tracking stopped");
    memory.unregister_listener(lid).unwrap();
    drop((space, mem));
    assert!(memory.teardown().is_clean());
}
