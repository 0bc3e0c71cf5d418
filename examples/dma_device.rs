//! A device that does DMA: a memory-to-memory copy engine. The guest puts a
//! source address, a destination address and a length in its registers and
//! writes the doorbell; the device copies through its own bus-master
//! address space, the way a PCI device's DMA goes through `pci_dma_rw` in
//! QEMU.
//!
//! What it shows:
//! * a device holds an [`AddressSpace`] handle for its DMA. Its view holds
//!   the device's own region while the device is plugged; the unplug commit
//!   breaks that loop (see ARCHITECTURE.md, "Who holds whom");
//! * [`AddressSpace::map`] gives direct access to guest RAM (no copy, no
//!   reference-count traffic) and bounces for anything else; `unmap` with
//!   the length written marks the pages dirty for every client tracking
//!   them;
//! * a DMA that hits a hole gets an error the device turns into a status
//!   bit, never a panic.
//!
//! Run it: `cargo run --example dma_device`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memtree::{
    AccessSizes, AddressSpace, DmaDirection, Endian, MemTxAttrs, MemTxResult, Memory, MmioOps,
};

const REG_SRC: u64 = 0x00;
const REG_DST: u64 = 0x08;
const REG_LEN: u64 = 0x10;
const REG_DOORBELL: u64 = 0x18;
const REG_STATUS: u64 = 0x20; // 1 = done, 2 = DMA error

struct CopyEngine {
    dma: AddressSpace,
    src: AtomicU64,
    dst: AtomicU64,
    len: AtomicU64,
    status: AtomicU64,
}

impl CopyEngine {
    /// Copies `len` bytes from `src` to `dst` through the device's DMA
    /// address space, mapping both sides.
    fn run(&self) -> u64 {
        let (src, dst, len) = (
            self.src.load(Ordering::Relaxed),
            self.dst.load(Ordering::Relaxed),
            self.len.load(Ordering::Relaxed),
        );
        let a = MemTxAttrs::UNSPECIFIED;
        let from = match self.dma.map(src, len, DmaDirection::ToDevice, a) {
            Ok(m) if m.len() == len => m,
            _ => return 2,
        };
        let mut to = match self.dma.map(dst, len, DmaDirection::FromDevice, a) {
            Ok(m) if m.len() == len => m,
            _ => return 2,
        };
        let mut buf = vec![0u8; len as usize];
        if from.read(0, &mut buf).is_err() || to.write(0, &buf).is_err() {
            return 2;
        }
        drop(from);
        // Unmap with the number of bytes written: that is what is marked
        // dirty (and written back, had the mapping bounced).
        if !to.unmap(len).is_ok() {
            return 2;
        }
        1
    }
}

impl MmioOps for CopyEngine {
    fn read(&self, addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        match addr {
            REG_STATUS => Ok(self.status.load(Ordering::Relaxed)),
            _ => Err(MemTxResult::DECODE_ERROR),
        }
    }

    fn write(&self, addr: u64, data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        match addr {
            REG_SRC => self.src.store(data, Ordering::Relaxed),
            REG_DST => self.dst.store(data, Ordering::Relaxed),
            REG_LEN => self.len.store(data, Ordering::Relaxed),
            REG_DOORBELL => {
                let status = self.run();
                self.status.store(status, Ordering::Relaxed);
            }
            _ => return MemTxResult::DECODE_ERROR,
        }
        MemTxResult::OK
    }

    fn impl_sizes(&self) -> AccessSizes {
        AccessSizes::new(8, 8, false)
    }

    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

fn main() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let ram = memory.new_ram("ram", 0x10_0000, None).unwrap();
    memory.add_subregion(system, 0, ram).unwrap();
    let space = memory.new_address_space("memory", system, None).unwrap();
    let cpu = memory.address_space(space).unwrap();

    // The device: an owner, its bus-master address space (here an alias of
    // all of system memory, as a PCI device's is), and its registers.
    let owner = memory.new_owner("copy0", None).unwrap();
    let bm_root = memory
        .new_alias("copy0-bus-master", system, 0, 1 << 32, Some(owner))
        .unwrap();
    let bm_space = memory
        .new_address_space("copy0", bm_root, Some(owner))
        .unwrap();
    let engine = Arc::new(CopyEngine {
        dma: memory.address_space(bm_space).unwrap(),
        src: AtomicU64::new(0),
        dst: AtomicU64::new(0),
        len: AtomicU64::new(0),
        status: AtomicU64::new(0),
    });
    let regs = memory
        .new_mmio("copy0-regs", 0x100, engine, Some(owner))
        .unwrap();
    memory.add_subregion(system, 0xfe00_0000, regs).unwrap();

    // The guest fills a buffer and programs the engine.
    let a = MemTxAttrs::UNSPECIFIED;
    let message = b"hello from guest RAM, copied by DMA";
    assert!(cpu.write(0x1000, message, a).is_ok());
    let reg = |off: u64, v: u64| {
        cpu.store::<u64>(0xfe00_0000 + off, v, Endian::Little, a)
            .into_result()
            .expect("register store")
    };
    reg(REG_SRC, 0x1000);
    reg(REG_DST, 0x8_0000);
    reg(REG_LEN, message.len() as u64);
    reg(REG_DOORBELL, 1);
    let status = cpu
        .try_load::<u64>(0xfe00_0000 + REG_STATUS, Endian::Little, a)
        .expect("status reads");
    assert_eq!(status, 1);
    let mut copy = vec![0u8; message.len()];
    assert!(cpu.read(0x8_0000, &mut copy, a).is_ok());
    assert_eq!(&copy, message);
    println!(
        "copied {} bytes: {:?}",
        copy.len(),
        String::from_utf8_lossy(&copy)
    );

    // A DMA into a hole is an error the device reports in its status.
    reg(REG_DST, 0x4000_0000);
    reg(REG_DOORBELL, 1);
    let status = cpu
        .try_load::<u64>(0xfe00_0000 + REG_STATUS, Endian::Little, a)
        .expect("status reads");
    assert_eq!(status, 2);
    println!("DMA to an unmapped address: status {status} (error), no panic");

    // Unplug: the device's registers, its bus-master space and alias go;
    // its state (with its AddressSpace handle) is dropped; nothing leaks.
    let report = memory.unplug(owner).unwrap();
    println!(
        "unplugged {:?}: regions {:?}, spaces {:?}",
        report.owners, report.regions, report.spaces
    );
    drop(cpu);
    let leaks = memory.teardown();
    print!("{leaks}");
    assert!(leaks.is_clean());
}
