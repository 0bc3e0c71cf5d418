//! A device author's first device: a small timer-like register block with an
//! owner and a finalizer, plugged into system memory, driven by guest
//! accesses, then unplugged.
//!
//! What it shows:
//! * a device is an **owner** ([`Machine::new_owner`]); its regions name it,
//!   so unplugging the owner removes every region it created;
//! * device state lives in the [`MmioOps`] implementation; the flat view
//!   holds it while the region is mapped, so an access that is running when
//!   the device is unplugged finishes against live state;
//! * the **finalizer** runs exactly once, after the last region of the
//!   owner is gone (here: right at unplug, because nothing else holds it);
//! * the census explains what is alive and the teardown report is clean.
//!
//! Run it: `cargo run --example mmio_device`.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use memtree::{AccessSizes, Endian, MemTxAttrs, MemTxResult, Memory, MmioOps};

/// Register offsets of the device.
const REG_ID: u64 = 0x0; // read-only: 0x4d54_0001
const REG_COUNTER: u64 = 0x4; // counts writes to REG_KICK
const REG_KICK: u64 = 0x8; // write-only: any value increments the counter
const REG_SCRATCH: u64 = 0xc; // read/write

/// The device state. Shared between the MMIO callbacks (`Arc` held by the
/// region) and the device model code.
#[derive(Default)]
struct Counter {
    counter: AtomicU32,
    scratch: AtomicU32,
}

impl MmioOps for Counter {
    fn read(&self, addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        match addr {
            REG_ID => Ok(0x4d54_0001),
            REG_COUNTER => Ok(u64::from(self.counter.load(Ordering::Relaxed))),
            REG_SCRATCH => Ok(u64::from(self.scratch.load(Ordering::Relaxed))),
            // A write-only register: the bus reports a decode error, as a
            // real device would.
            _ => Err(MemTxResult::DECODE_ERROR),
        }
    }

    fn write(&self, addr: u64, data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        match addr {
            REG_KICK => {
                self.counter.fetch_add(1, Ordering::Relaxed);
                MemTxResult::OK
            }
            REG_SCRATCH => {
                self.scratch.store(data as u32, Ordering::Relaxed);
                MemTxResult::OK
            }
            _ => MemTxResult::DECODE_ERROR,
        }
    }

    /// The device implements 32-bit accesses only; memtree splits or widens
    /// other sizes the way QEMU does.
    fn impl_sizes(&self) -> AccessSizes {
        AccessSizes::new(4, 4, false)
    }

    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

fn main() {
    let memory = Memory::new();
    let system = memory
        .new_container("system", 1 << 32, None)
        .expect("system container");
    let space = memory
        .new_address_space("memory", system, None)
        .expect("address space");
    let bus = memory.address_space(space).expect("handle");

    // Plug the device: an owner, a finalizer, one MMIO region mapped at
    // 0xfe00_0000.
    let owner = memory.new_owner("counter0", None).expect("owner");
    let finalized = Arc::new(AtomicBool::new(false));
    let f = finalized.clone();
    memory
        .set_finalizer(
            owner,
            Box::new(move || {
                // Device teardown goes here: free host resources, close files.
                f.store(true, Ordering::SeqCst);
            }),
        )
        .expect("finalizer");
    let state = Arc::new(Counter::default());
    let regs = memory
        .new_mmio("counter0-regs", 0x10, state.clone(), Some(owner))
        .expect("mmio region");
    memory
        .add_subregion(system, 0xfe00_0000, regs)
        .expect("map the registers");

    // The guest drives it.
    let a = MemTxAttrs::UNSPECIFIED;
    let id = bus
        .try_load::<u32>(0xfe00_0000 + REG_ID, Endian::Little, a)
        .expect("the id register reads");
    println!("device id register: {id:#x}");
    for _ in 0..3 {
        bus.store::<u32>(0xfe00_0000 + REG_KICK, 1, Endian::Little, a)
            .into_result()
            .expect("kick");
    }
    let count = bus
        .try_load::<u32>(0xfe00_0000 + REG_COUNTER, Endian::Little, a)
        .expect("the counter reads");
    assert_eq!(count, 3);
    // A 16-bit store is widened/split by memtree to the device's 4-byte
    // implementation size.
    bus.store::<u16>(0xfe00_0000 + REG_SCRATCH, 0xbeef, Endian::Little, a)
        .into_result()
        .expect("16-bit store");
    let scratch = bus
        .try_load::<u32>(0xfe00_0000 + REG_SCRATCH, Endian::Little, a)
        .expect("scratch reads");
    println!("counter after 3 kicks: {count}; scratch after a 16-bit store: {scratch:#x}");
    // Reading a write-only register is an access error, not a panic.
    let error = bus
        .try_load::<u32>(0xfe00_0000 + REG_KICK, Endian::Little, a)
        .expect_err("the kick register is write-only");
    println!("read of the write-only register: {error}");

    // What holds the device? The census answers, from the owner's id.
    let entry = memory.census_entry(owner).expect("the owner is plugged");
    println!("census entry of the device: {} {:?}", entry.key, entry.name);
    for line in memory.why_alive(owner).expect("the owner is plugged") {
        println!("counter0: {line}");
    }
    for line in memory.why_alive(regs).expect("the region is mapped") {
        println!("counter0-regs: {line}");
    }

    // Unplug: the region leaves the view in one commit, the finalizer runs.
    let report = memory.unplug(owner).expect("unplug");
    println!(
        "unplugged: owners {:?}, regions {:?}",
        report.owners, report.regions
    );
    assert!(report.outstanding.is_empty());
    assert!(finalized.load(Ordering::SeqCst), "finalizer ran at unplug");
    let error = bus
        .try_load::<u32>(0xfe00_0000 + REG_ID, Endian::Little, a)
        .expect_err("the registers are gone from the guest's view");
    assert!(error.contains(MemTxResult::DECODE_ERROR));
    // The owner id is stale now: asking the census through it is an error.
    assert!(memory.census_entry(owner).is_err());
    // The device model still has its state (it holds an Arc of it).
    assert_eq!(state.counter.load(Ordering::Relaxed), 3);

    drop(bus);
    let leaks = memory.teardown();
    print!("{leaks}");
    assert!(leaks.is_clean());
}
