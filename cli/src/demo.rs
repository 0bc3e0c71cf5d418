//! The built-in demo machine: a small PC-like memory map, exercised end to
//! end (`memtree demo`).
//!
//! [`build`] creates the machine: real RAM split by aliases below and above
//! 4 GiB, a BIOS ROM seen twice (at the top of 4 GiB and, through the
//! `isa-bios` alias, below 1 MiB), a PCI container behind the RAM, PAM-style
//! aliases, MMIO devices with real callbacks (an HPET-like counter, a
//! 16550-like serial port in the I/O space, an IOAPIC and the MSI window), a
//! PCI network card (an owner with a BAR and a bus-master address space whose
//! alias starts disabled) and the port I/O space.
//!
//! [`run`] prints the tree and flat views, performs accesses through the
//! address spaces, explains one lookup, turns bus mastering on, hot-unplugs
//! the network card, and ends with the census and the leak report of the
//! teardown.

use std::fmt::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use memtree::qemu_text::print::{print_flat, print_tree, FlatOptions, TreeOptions};
use memtree::{
    AccessSizes, AddressSpace, Endian, LeakReport, MemTxAttrs, MemTxResult, Memory, MmioOps,
    OwnerId, RamBacking, RegionId, SpaceId, TopologyError,
};

const MIB: u64 = 1 << 20;
/// RAM of the demo machine.
pub const RAM_SIZE: u64 = 192 * MIB;
/// RAM mapped below 4 GiB (the rest goes above 4 GiB).
pub const RAM_BELOW_4G: u64 = 128 * MIB;
/// Base of the network card's MMIO BAR.
pub const NIC_BAR: u64 = 0xfebc_0000;
/// Base of the HPET-like counter.
pub const HPET_BASE: u64 = 0xfed0_0000;
/// Port of the serial-like device.
pub const SERIAL_PORT: u64 = 0x3f8;
/// The x86 reset vector's bytes the demo BIOS holds at its last 16 bytes.
pub const RESET_VECTOR: [u8; 5] = [0xea, 0x5b, 0xe0, 0x00, 0xf0];

/// A 16550-like serial port: transmit register at 0 collects bytes, line
/// status at 5 always says "transmitter empty".
#[derive(Debug, Default)]
pub struct SerialPort {
    output: Mutex<Vec<u8>>,
}

impl SerialPort {
    /// Bytes the guest transmitted so far.
    pub fn output(&self) -> Vec<u8> {
        self.output.lock().clone()
    }
}

impl MmioOps for SerialPort {
    fn read(&self, addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        Ok(match addr {
            5 => 0x60, // LSR: THR empty, transmitter empty
            _ => 0,
        })
    }
    fn write(&self, addr: u64, data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        if addr == 0 {
            self.output.lock().push(data as u8);
        }
        MemTxResult::OK
    }
    fn impl_sizes(&self) -> AccessSizes {
        AccessSizes::new(1, 1, false)
    }
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

/// An HPET-like timer block: capabilities at 0, a main counter at 0xf0 that
/// advances by one period (100 ns = 10^8 fs) every time it is read.
#[derive(Debug, Default)]
pub struct Hpet {
    counter: AtomicU64,
}

impl MmioOps for Hpet {
    fn read(&self, addr: u64, size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        let v = match addr & !7 {
            // vendor 0x8086, 3 timers, revision 1; period 10^8 fs.
            0 => 0x0098_9680_8086_a201u64,
            0xf0 => self.counter.fetch_add(1, Ordering::Relaxed) + 1,
            _ => 0,
        };
        let v = if addr & 4 != 0 { v >> 32 } else { v };
        Ok(if size >= 8 {
            v
        } else {
            v & ((1u64 << (size * 8)) - 1)
        })
    }
    fn write(&self, _addr: u64, _data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        MemTxResult::OK
    }
    fn valid_sizes(&self) -> AccessSizes {
        AccessSizes::new(4, 8, false)
    }
    fn impl_sizes(&self) -> AccessSizes {
        AccessSizes::new(4, 8, false)
    }
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

/// An e1000-like register file: 32 registers of 32 bits; STATUS (0x8) reads
/// "link up, full duplex".
#[derive(Debug)]
pub struct NicRegisters {
    regs: Mutex<[u32; 32]>,
}

impl Default for NicRegisters {
    fn default() -> Self {
        let mut regs = [0u32; 32];
        regs[2] = 0x8008_0783;
        NicRegisters {
            regs: Mutex::new(regs),
        }
    }
}

impl MmioOps for NicRegisters {
    fn read(&self, addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        let i = (addr / 4) as usize;
        Ok(self.regs.lock().get(i).copied().map_or(0, u64::from))
    }
    fn write(&self, addr: u64, data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        let i = (addr / 4) as usize;
        if let Some(r) = self.regs.lock().get_mut(i) {
            *r = data as u32;
        }
        MemTxResult::OK
    }
    fn valid_sizes(&self) -> AccessSizes {
        AccessSizes::new(4, 4, false)
    }
    fn impl_sizes(&self) -> AccessSizes {
        AccessSizes::new(4, 4, false)
    }
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

/// A device whose registers all read a constant.
#[derive(Debug)]
struct Constant(u64);

impl MmioOps for Constant {
    fn read(&self, _addr: u64, size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        Ok(if size >= 8 {
            self.0
        } else {
            self.0 & ((1u64 << (size * 8)) - 1)
        })
    }
    fn write(&self, _addr: u64, _data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        MemTxResult::OK
    }
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

/// The demo machine and handles to its interesting parts.
#[derive(Debug)]
pub struct DemoMachine {
    /// The memory system.
    pub memory: Memory,
    /// `memory` (system memory) address space.
    pub system_as: SpaceId,
    /// `I/O` address space.
    pub io_as: SpaceId,
    /// The network card's bus-master address space.
    pub nic_as: SpaceId,
    /// The network card (a PCI device owner).
    pub nic: OwnerId,
    /// The disabled alias that turns on the card's bus mastering.
    pub bus_master_alias: RegionId,
    /// The serial port's device state.
    pub serial: Arc<SerialPort>,
    /// Set when the network card is finalized.
    pub nic_finalized: Arc<AtomicBool>,
}

/// Builds the demo machine (one transaction).
pub fn build() -> Result<DemoMachine, TopologyError> {
    let memory = Memory::new();
    let serial = Arc::new(SerialPort::default());
    let nic_finalized = Arc::new(AtomicBool::new(false));
    let m: &memtree::Machine = &memory;
    let (system_as, io_as, nic_as, nic, bus_master_alias) = m.transaction(|m| {
        let system = m.new_container("system", 1 << 64, None)?;
        // RAM, shown through two aliases.
        let ram = m.new_ram_with("pc.ram", u128::from(RAM_SIZE), None, RamBacking::Anonymous)?;
        let below = m.new_alias("ram-below-4g", ram, 0, u128::from(RAM_BELOW_4G), None)?;
        m.add_subregion(system, 0, below)?;
        let above = m.new_alias(
            "ram-above-4g",
            ram,
            RAM_BELOW_4G,
            u128::from(RAM_SIZE - RAM_BELOW_4G),
            None,
        )?;
        m.add_subregion(system, 1 << 32, above)?;
        // The PCI address space, behind RAM.
        let pci = m.new_container("pci", 1 << 64, None)?;
        m.add_subregion_overlap(system, 0, pci, -1)?;
        let rom = m.new_rom("pc.rom", 0x20000, None)?;
        m.add_subregion_overlap(pci, 0xc0000, rom, 1)?;
        let bios_mem = m.new_backend("pc.bios", 0x40000, RamBacking::Anonymous)?;
        bios_mem
            .write(0x40000 - 16, &RESET_VECTOR)
            .map_err(|e| TopologyError::Allocation {
                region: "pc.bios".to_owned(),
                message: e.to_string(),
            })?;
        let bios = m.new_ram_from_backend("pc.bios", &bios_mem, 0, 0x40000, None)?;
        m.set_readonly(bios, true)?;
        m.add_subregion(pci, 0xfffc_0000, bios)?;
        let isa_bios = m.new_alias("isa-bios", bios, 0x20000, 0x20000, None)?;
        m.add_subregion_overlap(pci, 0xe0000, isa_bios, 1)?;
        // PAM: the chipset decides whether 0xe0000-0xfffff shows RAM or PCI.
        let pam_ram = m.new_alias("pam-ram", ram, 0xe0000, 0x20000, None)?;
        m.add_subregion_overlap(system, 0xe0000, pam_ram, 1)?;
        m.set_enabled(pam_ram, false)?;
        let pam_pci = m.new_alias("pam-pci", pci, 0xe0000, 0x20000, None)?;
        m.add_subregion_overlap(system, 0xe0000, pam_pci, 1)?;
        // Platform devices.
        let ioapic = m.new_mmio("ioapic", 0x1000, Arc::new(Constant(0x0017_0011)), None)?;
        m.add_subregion(system, 0xfec0_0000, ioapic)?;
        let hpet = m.new_mmio("hpet", 0x400, Arc::new(Hpet::default()), None)?;
        m.add_subregion(system, HPET_BASE, hpet)?;
        let msi = m.new_mmio("apic-msi", 0x10_0000, Arc::new(Constant(0)), None)?;
        m.add_subregion_overlap(system, 0xfee0_0000, msi, 4096)?;
        // Port I/O.
        let io = m.new_io_root("io", 0x10000)?;
        let ser = m.new_mmio("serial", 8, serial.clone(), None)?;
        m.add_subregion(io, SERIAL_PORT, ser)?;
        // A PCI network card: an owner with a BAR and a bus-master space.
        let nic = m.new_owner("e1000", None)?;
        let flag = nic_finalized.clone();
        m.set_finalizer(nic, Box::new(move || flag.store(true, Ordering::SeqCst)))?;
        let bar = m.new_mmio(
            "e1000-mmio",
            0x20000,
            Arc::new(NicRegisters::default()),
            Some(nic),
        )?;
        m.add_subregion_overlap(pci, NIC_BAR, bar, 1)?;
        let bm_root = m.new_container("bus master container", 1 << 64, Some(nic))?;
        let bm = m.new_alias("bus master", system, 0, 1 << 64, Some(nic))?;
        m.add_subregion(bm_root, 0, bm)?;
        m.set_enabled(bm, false)?;
        let system_as = m.new_address_space("memory", system, None)?;
        let io_as = m.new_address_space("I/O", io, None)?;
        let nic_as = m.new_address_space("e1000", bm_root, Some(nic))?;
        Ok::<_, TopologyError>((system_as, io_as, nic_as, nic, bm))
    })?;
    Ok(DemoMachine {
        memory,
        system_as,
        io_as,
        nic_as,
        nic,
        bus_master_alias,
        serial,
        nic_finalized,
    })
}

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The model refused an edit (a bug in the demo).
    #[error("{0}")]
    Model(#[from] TopologyError),
    /// Writing the output failed.
    #[error("cannot write output")]
    Output(#[from] fmt::Error),
    /// An access the demo expects to succeed failed (a bug in the demo).
    #[error("memory access failed: {0}")]
    Access(#[from] memtree::MemTxError),
}

fn status(r: MemTxResult) -> &'static str {
    if r.is_ok() {
        "OK"
    } else if r.contains(MemTxResult::DECODE_ERROR) {
        "DECODE_ERROR"
    } else if r.contains(MemTxResult::ACCESS_ERROR) {
        "ACCESS_ERROR"
    } else {
        "DEVICE_ERROR"
    }
}

fn served_by(space: &AddressSpace, addr: u64) -> String {
    match space.view().lookup(addr) {
        Some(r) => format!(
            "{} @{:#x}",
            r.region().name(),
            r.offset_in_region() + (addr - r.start())
        ),
        None => "unassigned".to_owned(),
    }
}

fn section(out: &mut impl Write, title: &str) -> fmt::Result {
    writeln!(out)?;
    writeln!(out, "== {title} ==")?;
    Ok(())
}

/// Runs the whole demo, writing a report to `out`; returns the leak report
/// of the final teardown.
pub fn run(out: &mut impl Write) -> Result<LeakReport, DemoError> {
    let d = build()?;
    let mem = &d.memory;
    writeln!(
        out,
        "memtree demo: a PC-like machine built with the memtree API"
    )?;
    writeln!(
        out,
        "  {} MiB of RAM (pc.ram; {} MiB mapped below 4 GiB, the rest at 4 GiB), a 256 KiB BIOS ROM,",
        RAM_SIZE / MIB,
        RAM_BELOW_4G / MIB
    )?;
    writeln!(
        out,
        "  a PCI container behind RAM, PAM aliases, IOAPIC/HPET/MSI devices, a serial port in I/O space,"
    )?;
    writeln!(
        out,
        "  and an e1000-like PCI card (owner \"e1000\") with a BAR and a bus-master address space."
    )?;

    section(
        out,
        "region tree (info mtree -D: disabled regions marked [disabled])",
    )?;
    print_tree(
        mem,
        out,
        TreeOptions {
            disabled: true,
            owners: false,
        },
    )?;
    section(
        out,
        "flat views (info mtree -f: what each address space really sees)",
    )?;
    print_flat(mem, out, FlatOptions { owners: false })?;

    section(out, "accesses through the address spaces")?;
    let sys = mem.address_space(d.system_as)?;
    let io = mem.address_space(d.io_as)?;
    let a = MemTxAttrs::UNSPECIFIED;
    let r = sys.store_u32(0x1000, 0xdead_beef, a);
    writeln!(
        out,
        "  memory: write u32 0xdeadbeef at 0x1000 -> {} ({})",
        status(r),
        served_by(&sys, 0x1000)
    )?;
    let (v, r) = sys.load_u32(0x1000, a);
    writeln!(out, "  memory: read  u32 at 0x1000 -> {v:#x} {}", status(r))?;
    let high = (1u64 << 32) + 0x10;
    let r = sys.store_u64(high, 0x0123_4567_89ab_cdef, a);
    writeln!(
        out,
        "  memory: write u64 at {high:#x} -> {} ({})",
        status(r),
        served_by(&sys, high)
    )?;
    let (v, r) = sys.load_u64(high, a);
    writeln!(
        out,
        "  memory: read  u64 at {high:#x} -> {v:#x} {}",
        status(r)
    )?;
    let mut top = [0u8; 5];
    let r = sys.read(0xffff_fff0, &mut top, a);
    writeln!(
        out,
        "  memory: read 5 bytes at 0xfffffff0 -> {top:02x?} {} ({})",
        status(r),
        served_by(&sys, 0xffff_fff0)
    )?;
    let mut low = [0u8; 5];
    let r = sys.read(0xffff0, &mut low, a);
    writeln!(
        out,
        "  memory: read 5 bytes at 0xffff0     -> {low:02x?} {} ({}: the same ROM bytes through the isa-bios alias)",
        status(r),
        served_by(&sys, 0xffff0)
    )?;
    let r = sys.store_u8(0xffff0, 0, a);
    writeln!(
        out,
        "  memory: write u8 at 0xffff0 -> {} (ROM ignores guest writes)",
        status(r)
    )?;
    let (caps, r) = sys.load_u64(HPET_BASE, a);
    writeln!(
        out,
        "  memory: read u64 at {HPET_BASE:#x} -> {caps:#x} {} (HPET capabilities)",
        status(r)
    )?;
    let (c1, _) = sys.load_u64(HPET_BASE + 0xf0, a);
    let (c2, _) = sys.load_u64(HPET_BASE + 0xf0, a);
    writeln!(
        out,
        "  memory: read HPET main counter twice -> {c1}, {c2} (a real device callback)"
    )?;
    let (v, r) = sys.load_u32(NIC_BAR + 8, a);
    writeln!(
        out,
        "  memory: read u32 at {:#x} -> {v:#x} {} ({}: e1000 STATUS)",
        NIC_BAR + 8,
        status(r),
        served_by(&sys, NIC_BAR + 8)
    )?;
    let (v, r) = sys.load_u32(0xe000_0000, a);
    writeln!(
        out,
        "  memory: read u32 at 0xe0000000 -> {v:#x} {} (nothing mapped there)",
        status(r)
    )?;
    for &b in b"hi!\n" {
        io.store_u8(SERIAL_PORT, b, a).into_result()?;
    }
    let (lsr, r) = io.load_u8(SERIAL_PORT + 5, a);
    writeln!(
        out,
        "  I/O:    wrote \"hi!\\n\" to port {SERIAL_PORT:#x}; serial captured {:?}; LSR = {lsr:#x} {}",
        String::from_utf8_lossy(&d.serial.output()),
        status(r)
    )?;
    let (v, r) = io.load_u16(0x1234, a);
    writeln!(
        out,
        "  I/O:    read u16 at port 0x1234 -> {v:#x} {} (I/O holes read all ones)",
        status(r)
    )?;

    section(
        out,
        "why? (memtree lookup 0xe0000: PAM decides between RAM and the BIOS)",
    )?;
    let why = memtree::inspect::lookup::explain(mem, d.system_as, 0xe0000)?;
    write!(out, "{why}")?;

    section(out, "bus mastering")?;
    let nic_as = mem.address_space(d.nic_as)?;
    let (v, r) = nic_as.load_u32(0x1000, a);
    writeln!(out, "  e1000 DMA read at 0x1000 with bus mastering off -> {v:#x} {} (its address space is empty)", status(r))?;
    mem.set_enabled(d.bus_master_alias, true)?;
    let (v, r) = nic_as.load_u32(0x1000, a);
    writeln!(
        out,
        "  enable alias \"bus master\"; DMA read at 0x1000 -> {v:#x} {} (it now shares the system flat view: {})",
        status(r),
        Arc::ptr_eq(&nic_as.view(), &sys.view())
    )?;
    drop(nic_as);

    section(out, "hot-unplug of the e1000")?;
    let report = mem.unplug(d.nic)?;
    writeln!(out, "  unplugged owners: {}", report.owners.join(", "))?;
    writeln!(out, "  removed regions:  {}", report.regions.join(", "))?;
    writeln!(out, "  removed spaces:   {}", report.spaces.join(", "))?;
    let (v, r) = sys.load_u32(NIC_BAR + 8, a);
    writeln!(
        out,
        "  memory: read u32 at {:#x} -> {v:#x} {} (the BAR is gone)",
        NIC_BAR + 8,
        status(r)
    )?;
    writeln!(
        out,
        "  e1000 finalizer ran: {}",
        d.nic_finalized.load(Ordering::SeqCst)
    )?;
    drop(sys);
    drop(io);

    section(out, "census of live objects")?;
    for (kind, n) in mem.census().counts() {
        writeln!(out, "  {:<14} {n}", kind.as_str())?;
    }

    section(out, "teardown")?;
    let DemoMachine { memory, .. } = d;
    let leaks = memory.teardown();
    write!(out, "{leaks}")?;
    Ok(leaks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_runs_and_nothing_survives_teardown() {
        let mut out = String::new();
        let leaks = run(&mut out).expect("demo runs");
        assert!(leaks.is_clean(), "{leaks}");
        assert!(out.contains("0xdeadbeef"), "{out}");
        assert!(out.contains("serial captured \"hi!\\n\""), "{out}");
        assert!(out.contains("e1000 finalizer ran: true"), "{out}");
    }
}
