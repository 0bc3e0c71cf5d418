//! QEMU's access rules through an address space (qemu-memory-semantics.md
//! §4, §1.2–1.3), one test per rule, each naming the rule it checks.

use std::sync::{Arc, Mutex};

use memtree::region::attrs::{AccessKind, AccessSizes, Endian, MemTxAttrs, MemTxResult, MmioOps};
use memtree::region::region_core::Backing;
use memtree::{AddressSpace, Memory, RegionId};

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;
const OK: MemTxResult = MemTxResult::OK;
const DECODE: MemTxResult = MemTxResult::DECODE_ERROR;

type Call = (AccessKind, u64, u32, u64);

/// A device that records every callback. A read of `size` bytes at region
/// offset `a` returns the bytes `0x40 + a, 0x41 + a, ...` (mod 256) laid out
/// in the device's byte order, so a buffer read of the device yields the
/// bytes `0x40 + offset` whatever the piece sizes.
struct Dev {
    valid: AccessSizes,
    imp: AccessSizes,
    endian: Endian,
    reject: bool,
    fail_at: Option<u64>,
    calls: Mutex<Vec<Call>>,
}

impl Dev {
    fn new(endian: Endian) -> Dev {
        Dev {
            valid: AccessSizes::UNSET,
            imp: AccessSizes::UNSET,
            endian,
            reject: false,
            fail_at: None,
            calls: Mutex::new(Vec::new()),
        }
    }
    fn valid(mut self, min: u32, max: u32, unaligned: bool) -> Dev {
        self.valid = AccessSizes::new(min, max, unaligned);
        self
    }
    fn imp(mut self, min: u32, max: u32, unaligned: bool) -> Dev {
        self.imp = AccessSizes::new(min, max, unaligned);
        self
    }
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
    fn clear(&self) {
        self.calls.lock().unwrap().clear();
    }
    fn pattern(&self, addr: u64, size: u32) -> u64 {
        let bytes: Vec<u64> = (0..u64::from(size))
            .map(|k| (0x40 + addr.wrapping_add(k)) & 0xff)
            .collect();
        if self.endian.is_big() {
            bytes.iter().fold(0, |v, &b| v << 8 | b)
        } else {
            bytes.iter().rev().fold(0, |v, &b| v << 8 | b)
        }
    }
}

impl MmioOps for Dev {
    fn read(&self, addr: u64, size: u32, _: MemTxAttrs) -> Result<u64, MemTxResult> {
        let v = self.pattern(addr, size);
        self.calls
            .lock()
            .unwrap()
            .push((AccessKind::Read, addr, size, v));
        if self.fail_at == Some(addr) {
            return Err(MemTxResult::DEVICE_ERROR);
        }
        Ok(v)
    }
    fn write(&self, addr: u64, data: u64, size: u32, _: MemTxAttrs) -> MemTxResult {
        self.calls
            .lock()
            .unwrap()
            .push((AccessKind::Write, addr, size, data));
        if self.fail_at == Some(addr) {
            return MemTxResult::DEVICE_ERROR;
        }
        OK
    }
    fn accepts(&self, _: u64, _: u32, _: AccessKind, _: MemTxAttrs) -> bool {
        !self.reject
    }
    fn valid_sizes(&self) -> AccessSizes {
        self.valid
    }
    fn impl_sizes(&self) -> AccessSizes {
        self.imp
    }
    fn endianness(&self) -> Endian {
        self.endian
    }
}

use AccessKind::{Read as R, Write as W};
use Endian::{Big as BE, Little as LE};

/// A memory space: `system` container of 2^64 bytes.
struct Machine {
    memory: Memory,
    system: RegionId,
    space: AddressSpace,
}

fn machine_with(endian: Endian) -> Machine {
    let memory = Memory::with_target_endian(endian);
    let system = memory.new_container("system", 1 << 64, None).unwrap();
    let id = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(id).unwrap();
    Machine {
        memory,
        system,
        space,
    }
}

fn machine() -> Machine {
    machine_with(LE)
}

impl Machine {
    fn ram(&self, name: &str, addr: u64, size: u64) -> RegionId {
        let r = self.memory.new_ram(name, u128::from(size), None).unwrap();
        self.memory.add_subregion(self.system, addr, r).unwrap();
        r
    }
    fn mmio(&self, name: &str, addr: u64, size: u128, dev: &Arc<Dev>) -> RegionId {
        let r = self.memory.new_mmio(name, size, dev.clone(), None).unwrap();
        self.memory.add_subregion(self.system, addr, r).unwrap();
        r
    }
}

/// §4.2: a buffer access of length 0 returns OK and touches nothing.
#[test]
fn dispatch_zero_length_access_is_ok() {
    let m = machine();
    let dev = Arc::new(Dev::new(LE));
    m.mmio("dev", 0x1000, 0x100, &dev);
    assert_eq!(m.space.read(0x1000, &mut [], A), OK);
    assert_eq!(m.space.write(0x1000, &[], A), OK);
    assert_eq!(m.space.read(0xdead_0000, &mut [], A), OK);
    assert!(dev.calls().is_empty());
}

/// §4.5: a hole of the memory space is unassigned memory: reads give 0 and
/// DECODE_ERROR.
#[test]
fn dispatch_unassigned_read_in_memory_space_is_zero_with_decode_error() {
    let m = machine();
    m.ram("ram", 0, 0x1000);
    let mut buf = [0xaau8; 16];
    assert_eq!(m.space.read(0x10_0000, &mut buf, A), DECODE);
    assert_eq!(buf, [0; 16]);
    assert_eq!(m.space.load_u32(0x10_0000, A), (0, DECODE));
    assert_eq!(m.space.load_u64(u64::MAX - 7, A), (0, DECODE));
}

/// §4.5: a write to a hole of the memory space is dropped with DECODE_ERROR
/// (and does not land anywhere else).
#[test]
fn dispatch_unassigned_write_is_dropped_with_decode_error() {
    let m = machine();
    m.ram("ram", 0, 0x1000);
    assert_eq!(m.space.write(0x2000, &[1, 2, 3, 4], A), DECODE);
    assert_eq!(m.space.store_u16(0x2000, 7, A), DECODE);
    let mut buf = [0xffu8; 4];
    assert_eq!(m.space.read(0x2000, &mut buf, A), DECODE);
    assert_eq!(buf, [0; 4]);
}

/// §1.2/§4.5: the port-I/O root (`io`, a terminating I/O region with
/// `unassigned_io_ops`) fills its holes: reads all ones with OK, writes
/// ignored with OK; beyond its size the space is unassigned.
#[test]
fn dispatch_io_space_hole_reads_all_ones() {
    let memory = Memory::new();
    let io = memory.new_io_root("io", 0x10000).unwrap();
    let dev = Arc::new(Dev::new(LE));
    let port = memory.new_mmio("port", 4, dev.clone(), None).unwrap();
    memory.add_subregion(io, 0x60, port).unwrap();
    let id = memory.new_address_space("I/O", io, None).unwrap();
    let space = memory.address_space(id).unwrap();

    assert_eq!(space.load_u8(0x80, A), (0xff, OK));
    assert_eq!(space.load_u16(0x80, A), (0xffff, OK));
    assert_eq!(space.load_u32(0x80, A), (0xffff_ffff, OK));
    let mut buf = [0u8; 6];
    assert_eq!(space.read(0x5e, &mut buf, A), OK);
    assert_eq!(buf, [0xff, 0xff, 0x40, 0x41, 0x42, 0x43]);
    assert_eq!(space.write(0x70, &[1, 2], A), OK);
    assert_eq!(space.load_u8(0x10000, A), (0, DECODE));
}

/// §4.2: ROM (readonly RAM) writes take the MMIO path to unassigned ops:
/// dropped, DECODE_ERROR; reads come from memory.
#[test]
fn dispatch_rom_write_is_dropped_with_decode_error() {
    let m = machine();
    let ram = m.ram("flash", 0x1000, 0x1000);
    assert_eq!(m.space.write(0x1000, &[1, 2, 3, 4], A), OK);
    m.memory.set_readonly(ram, true).unwrap();
    assert_eq!(m.space.write(0x1000, &[9, 9, 9, 9], A), DECODE);
    assert_eq!(m.space.store_u32(0x1000, 0x0909_0909, A), DECODE);
    let mut buf = [0u8; 4];
    assert_eq!(m.space.read(0x1000, &mut buf, A), OK);
    assert_eq!(buf, [1, 2, 3, 4]);
}

/// §1.2/§4.2: a ROM device reads its memory directly in romd mode and calls
/// `ops.read` in MMIO mode; writes always go to `ops.write`.
#[test]
fn dispatch_rom_device_romd_mode_vs_mmio_mode() {
    let m = machine();
    let dev = Arc::new(Dev::new(LE));
    let rd = m
        .memory
        .new_rom_device("bios", 0x1000, dev.clone(), None)
        .unwrap();
    m.memory.add_subregion(m.system, 0x10000, rd).unwrap();
    // Fill the ROM device's memory through its backing.
    let view = m.space.view();
    let Backing::RomDevice { block, .. } = view.ranges()[0].region().backing() else {
        panic!("expected a ROM device");
    };
    block.write(0, &[0xde, 0xad, 0xbe, 0xef]).unwrap();

    // romd mode (the default): memory, no callback.
    let mut buf = [0u8; 4];
    assert_eq!(m.space.read(0x10000, &mut buf, A), OK);
    assert_eq!(buf, [0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(m.space.load_u32_le(0x10000, A), (0xefbe_adde, OK));
    assert!(dev.calls().is_empty());
    // Writes go to the callbacks, memory unchanged.
    assert_eq!(m.space.write(0x10000, &[1, 2], A), OK);
    assert_eq!(dev.calls(), vec![(W, 0, 2, 0x0201)]);
    assert_eq!(m.space.load_u16_le(0x10000, A), (0xadde, OK));

    // MMIO mode: reads go to the callbacks.
    dev.clear();
    m.memory.set_romd(rd, false).unwrap();
    assert_eq!(m.space.read(0x10000, &mut buf, A), OK);
    assert_eq!(buf, [0x40, 0x41, 0x42, 0x43]);
    assert_eq!(dev.calls(), vec![(R, 0, 4, 0x4342_4140)]);
}

/// §4.2 (QEMU 7.2): the direct-write decision looks at the terminating
/// region's own readonly flag, so RAM reached through a readonly alias is
/// still written by `address_space_write`, although the flat range is
/// readonly (printed `rom`).
#[test]
fn dispatch_readonly_alias_over_ram_still_writes_qemu_7_2() {
    let m = machine();
    let ram = m.memory.new_ram("ram", 0x1000, None).unwrap();
    let alias = m.memory.new_alias("ram-ro", ram, 0, 0x1000, None).unwrap();
    m.memory.set_readonly(alias, true).unwrap();
    m.memory.add_subregion(m.system, 0x4000, alias).unwrap();
    let view = m.space.view();
    assert!(
        view.ranges()[0].attrs().readonly,
        "the flat range is readonly"
    );
    assert_eq!(m.space.write(0x4010, &[5, 6, 7], A), OK);
    assert_eq!(m.space.store_u8(0x4013, 8, A), OK);
    let mut buf = [0u8; 4];
    assert_eq!(m.space.read(0x4010, &mut buf, A), OK);
    assert_eq!(buf, [5, 6, 7, 8]);
}

/// §4.2 step 4 (`memory_access_size`): MMIO pieces are at most `valid.max`
/// (4 if unset) and at most the natural alignment of the region offset, and
/// powers of two.
#[test]
fn dispatch_buffer_splits_by_valid_max_and_alignment() {
    let m = machine();
    let dev = Arc::new(Dev::new(LE));
    m.mmio("dev", 0x1000, 0x100, &dev);
    let mut buf = [0u8; 11];
    assert_eq!(m.space.read(0x1001, &mut buf, A), OK);
    let sizes: Vec<(u64, u32)> = dev.calls().iter().map(|c| (c.1, c.2)).collect();
    // valid.max unset = 4: 1 @1, 2 @2, 4 @4, 4 @8 = 11 bytes.
    assert_eq!(sizes, vec![(1, 1), (2, 2), (4, 4), (8, 4)]);
    let want: Vec<u8> = (0x41..0x4c).collect();
    assert_eq!(buf.to_vec(), want);

    let dev8 = Arc::new(Dev::new(LE).valid(1, 8, false).imp(1, 8, false));
    m.mmio("dev8", 0x2000, 0x100, &dev8);
    assert_eq!(m.space.write(0x2000, &[0u8; 15], A), OK);
    let sizes: Vec<(u64, u32)> = dev8.calls().iter().map(|c| (c.1, c.2)).collect();
    // valid.max 8: 8 @0, then 7 left: 4, 2, 1.
    assert_eq!(sizes, vec![(0, 8), (8, 4), (12, 2), (14, 1)]);

    // impl.unaligned lifts the alignment cap.
    let un = Arc::new(Dev::new(LE).valid(1, 8, true).imp(1, 8, true));
    m.mmio("un", 0x3000, 0x100, &un);
    assert_eq!(m.space.read(0x3003, &mut [0u8; 8], A), OK);
    let sizes: Vec<(u64, u32)> = un.calls().iter().map(|c| (c.1, c.2)).collect();
    assert_eq!(sizes, vec![(3, 8)]);
}

/// §4.4 (`access_with_adjusted_size`) through an address space: an access
/// wider than `impl.max` is split into `impl.max` callbacks, one narrower
/// than `impl.min` becomes one wider callback.
#[test]
fn dispatch_impl_min_max_adjustment_through_the_address_space() {
    let m = machine();
    let narrow = Arc::new(Dev::new(LE).valid(1, 8, false).imp(1, 2, false));
    m.mmio("narrow", 0x1000, 0x100, &narrow);
    assert_eq!(m.space.load_u64_le(0x1000, A), (0x4746_4544_4342_4140, OK));
    let calls: Vec<(u64, u32)> = narrow.calls().iter().map(|c| (c.1, c.2)).collect();
    assert_eq!(calls, vec![(0, 2), (2, 2), (4, 2), (6, 2)]);

    let wide = Arc::new(Dev::new(LE).imp(4, 4, false));
    m.mmio("wide", 0x2000, 0x100, &wide);
    assert_eq!(m.space.store_u8(0x2004, 0xab, A), OK);
    assert_eq!(wide.calls(), vec![(W, 4, 4, 0xab)]);
    assert_eq!(m.space.load_u8(0x2004, A), (0x44, OK));
}

/// §4.4: buffer accesses request host order, so the buffer holds the bytes
/// in the device's declared order, for little- and big-endian devices alike;
/// the values the callbacks see are the device-order numbers.
#[test]
fn dispatch_buffer_bytes_are_in_device_byte_order() {
    let m = machine();
    let le = Arc::new(Dev::new(LE));
    let be = Arc::new(Dev::new(BE));
    m.mmio("le", 0x1000, 0x10, &le);
    m.mmio("be", 0x2000, 0x10, &be);
    let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
    assert_eq!(m.space.read(0x1000, &mut a, A), OK);
    assert_eq!(m.space.read(0x2000, &mut b, A), OK);
    assert_eq!(a, [0x40, 0x41, 0x42, 0x43]);
    assert_eq!(b, [0x40, 0x41, 0x42, 0x43]);
    assert_eq!(m.space.write(0x1000, &[1, 2, 3, 4], A), OK);
    assert_eq!(m.space.write(0x2000, &[1, 2, 3, 4], A), OK);
    assert_eq!(le.calls()[1], (W, 0, 4, 0x0403_0201));
    assert_eq!(be.calls()[1], (W, 0, 4, 0x0102_0304));
}

/// §4.2 (ld/st variants) and §4.4 (endianness adjustment): typed loads and
/// stores in little, big and native (= target) byte order, on RAM and on
/// devices of either byte order.
#[test]
fn dispatch_typed_accesses_little_big_and_native_endian() {
    for target in [LE, BE] {
        let m = machine_with(target);
        m.ram("ram", 0, 0x1000);
        assert_eq!(m.space.write(0x10, &[0x11, 0x22, 0x33, 0x44], A), OK);
        assert_eq!(m.space.load_u32_le(0x10, A), (0x4433_2211, OK));
        assert_eq!(m.space.load_u32_be(0x10, A), (0x1122_3344, OK));
        let native = if target == LE {
            0x4433_2211
        } else {
            0x1122_3344
        };
        assert_eq!(m.space.load_u32(0x10, A), (native, OK));
        assert_eq!(m.space.load::<u32>(0x10, Endian::Native, A), (native, OK));
        assert_eq!(m.space.store_u16_be(0x20, 0xa1b2, A), OK);
        assert_eq!(m.space.store_u16_le(0x22, 0xa1b2, A), OK);
        assert_eq!(m.space.store_u16(0x24, 0xa1b2, A), OK);
        let mut buf = [0u8; 6];
        assert_eq!(m.space.read(0x20, &mut buf, A), OK);
        let n = if target == LE {
            [0xb2, 0xa1]
        } else {
            [0xa1, 0xb2]
        };
        assert_eq!(buf, [0xa1, 0xb2, 0xb2, 0xa1, n[0], n[1]]);
        assert_eq!(m.space.store_u64_be(0x30, 0x0102_0304_0506_0708, A), OK);
        assert_eq!(m.space.load_u64_le(0x30, A), (0x0807_0605_0403_0201, OK));

        let le = Arc::new(Dev::new(LE));
        let be = Arc::new(Dev::new(BE));
        m.mmio("le", 0x1000, 0x10, &le);
        m.mmio("be", 0x2000, 0x10, &be);
        // A device returns its value; the requested order swaps iff it
        // differs from the device's.
        assert_eq!(m.space.load_u32_le(0x1000, A), (0x4342_4140, OK));
        assert_eq!(m.space.load_u32_be(0x1000, A), (0x4041_4243, OK));
        assert_eq!(m.space.load_u32_be(0x2000, A), (0x4041_4243, OK));
        assert_eq!(m.space.load_u32_le(0x2000, A), (0x4342_4140, OK));
        assert_eq!(
            m.space.load_u16(0x1000, A).0,
            if target == LE { 0x4140 } else { 0x4041 }
        );
        assert_eq!(m.space.store_u32_be(0x2000, 0x1234_5678, A), OK);
        assert_eq!(m.space.store_u32_le(0x2004, 0x1234_5678, A), OK);
        let writes: Vec<u64> = be
            .calls()
            .iter()
            .filter(|c| c.0 == W)
            .map(|c| c.3)
            .collect();
        assert_eq!(writes, vec![0x1234_5678, 0x7856_3412]);
    }
}

/// §4.3 step 1: the `accepts` hook rejects the access before any callback:
/// reads give 0 and DECODE_ERROR, writes are dropped with DECODE_ERROR.
#[test]
fn dispatch_accepts_hook_rejects_access() {
    let m = machine();
    let mut d = Dev::new(LE);
    d.reject = true;
    let dev = Arc::new(d);
    m.mmio("dev", 0x1000, 0x100, &dev);
    let mut buf = [0xeeu8; 4];
    assert_eq!(m.space.read(0x1000, &mut buf, A), DECODE);
    assert_eq!(buf, [0; 4]);
    assert_eq!(m.space.store_u32(0x1000, 1, A), DECODE);
    assert!(dev.calls().is_empty());
}

/// §4.3 step 2: without `valid.unaligned`, an unaligned typed access (sent
/// as one dispatch, never split) is rejected with DECODE_ERROR; with it, the
/// device is called.
#[test]
fn dispatch_unaligned_typed_access_rejected_unless_valid_unaligned() {
    let m = machine();
    let strict = Arc::new(Dev::new(LE).valid(1, 8, false));
    let lax = Arc::new(Dev::new(LE).valid(1, 8, true).imp(1, 8, true));
    m.mmio("strict", 0x1000, 0x100, &strict);
    m.mmio("lax", 0x2000, 0x100, &lax);
    assert_eq!(m.space.load_u32(0x1002, A), (0, DECODE));
    assert_eq!(m.space.store_u16(0x1001, 5, A), DECODE);
    assert!(strict.calls().is_empty());
    assert_eq!(m.space.load_u32(0x2002, A), (0x4544_4342, OK));
    assert_eq!(lax.calls(), vec![(R, 2, 4, 0x4544_4342)]);
    // valid.min/max: a size outside the range is rejected too.
    let min4 = Arc::new(Dev::new(LE).valid(4, 4, false));
    m.mmio("min4", 0x3000, 0x100, &min4);
    assert_eq!(m.space.load_u16(0x3000, A), (0, DECODE));
    assert!(min4.calls().is_empty());
}

/// §4.1/§4.2: the results of the pieces of a split access are ORed, and the
/// loop never stops early: every piece is attempted.
#[test]
fn dispatch_results_are_ored_across_pieces() {
    let m = machine();
    let mut d = Dev::new(LE);
    d.fail_at = Some(4);
    let dev = Arc::new(d);
    m.mmio("dev", 0x1000, 0x10, &dev);
    // Pieces: dev 0..4 OK, dev 4..8 DEVICE_ERROR, dev 8..16 OK, hole 16..24.
    let mut buf = [0xffu8; 24];
    let r = m.space.read(0x1000, &mut buf, A);
    assert_eq!(r, MemTxResult::DEVICE_ERROR | DECODE);
    assert_eq!(dev.calls().len(), 4, "every piece was attempted");
    assert_eq!(&buf[4..8], &[0, 0, 0, 0], "the failed piece reads 0");
    assert_eq!(&buf[8..12], &[0x48, 0x49, 0x4a, 0x4b]);
    assert_eq!(&buf[16..], &[0; 8]);
    dev.clear();
    let r = m.space.write(0x1000, &[0u8; 16], A);
    assert_eq!(r, MemTxResult::DEVICE_ERROR);
    assert_eq!(dev.calls().len(), 4);
}

/// §4.2 (the `flatview_read/write` loop): a bulk access crosses region
/// boundaries — RAM, then MMIO, then a hole, then RAM — re-translating at
/// each boundary; RAM pieces are clamped to their range.
#[test]
fn dispatch_bulk_access_across_ram_mmio_and_hole() {
    let m = machine();
    m.ram("ram0", 0x0, 0x1000);
    let dev = Arc::new(Dev::new(LE));
    m.mmio("dev", 0x1000, 0x8, &dev);
    // hole 0x1008..0x1010
    m.ram("ram1", 0x1010, 0x1000);
    let data: Vec<u8> = (0..0x20u8).map(|b| 0x80 | b).collect();
    // Write 0x20 bytes from 0xff0: 16 RAM, 8 MMIO, 8 hole (dropped) ... +8 RAM.
    let mut src = data.clone();
    src.extend_from_slice(&[0x77; 8]);
    let r = m.space.write(0xff0, &src, A);
    assert_eq!(r, DECODE, "the hole piece reports a decode error");
    let writes: Vec<(u64, u32, u64)> = dev
        .calls()
        .iter()
        .filter(|c| c.0 == W)
        .map(|c| (c.1, c.2, c.3))
        .collect();
    assert_eq!(writes, vec![(0, 4, 0x9392_9190), (4, 4, 0x9796_9594)]);

    let mut buf = vec![0u8; 0x28];
    let r = m.space.read(0xff0, &mut buf, A);
    assert_eq!(r, DECODE);
    assert_eq!(&buf[..16], &data[..16], "RAM part");
    assert_eq!(
        &buf[16..24],
        &[0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47],
        "MMIO part"
    );
    assert_eq!(&buf[24..32], &[0; 8], "hole part");
    assert_eq!(&buf[32..], &[0x77; 8], "second RAM part");
}

/// §4.2 (QEMU: MMIO translations are not clamped): a buffer piece to a small
/// MMIO region may be wider than what is left of the region; the device sees
/// the whole piece.
#[test]
fn dispatch_mmio_piece_is_not_clamped_to_the_region_end() {
    let m = machine();
    let dev = Arc::new(Dev::new(LE));
    m.mmio("tiny", 0x1000, 2, &dev);
    m.ram("ram", 0x1002, 0x1000);
    let mut buf = [0u8; 4];
    assert_eq!(m.space.read(0x1000, &mut buf, A), OK);
    assert_eq!(dev.calls(), vec![(R, 0, 4, 0x4342_4140)]);
    assert_eq!(buf, [0x40, 0x41, 0x42, 0x43]);
}

/// §4.2 (`address_space_ld*/st*`): a typed access that straddles two regions
/// is not split: it goes as one dispatch of its full width to the first
/// region (even when the first region is RAM and the second MMIO).
#[test]
fn dispatch_typed_access_straddling_two_regions_goes_to_the_first() {
    let m = machine();
    let first = Arc::new(Dev::new(LE).valid(1, 8, true).imp(1, 8, true));
    let second = Arc::new(Dev::new(LE));
    m.mmio("first", 0x1000, 0x10, &first);
    m.mmio("second", 0x1010, 0x10, &second);
    assert_eq!(m.space.load_u64_le(0x100c, A), (0x5352_5150_4f4e_4d4c, OK));
    assert_eq!(first.calls(), vec![(R, 0xc, 8, 0x5352_5150_4f4e_4d4c)]);
    assert!(second.calls().is_empty());
    assert_eq!(m.space.store_u32_le(0x100e, 0xaabb_ccdd, A), OK);
    assert_eq!(first.calls()[1], (W, 0xe, 4, 0xaabb_ccdd));
    assert!(second.calls().is_empty());

    // RAM then MMIO: the access is not direct (it does not fit the RAM
    // range), so it is dispatched to the RAM region's ops, which are the
    // unassigned ones (QEMU: `ram` regions have `unassigned_mem_ops`).
    let dev = Arc::new(Dev::new(LE));
    m.ram("ram", 0x2000, 0x10);
    m.mmio("dev", 0x2010, 0x10, &dev);
    assert_eq!(m.space.load_u32(0x200e, A), (0, DECODE));
    assert!(dev.calls().is_empty());
    // The same bytes read as a buffer are split at the boundary.
    let mut buf = [0u8; 4];
    assert_eq!(m.space.read(0x200e, &mut buf, A), OK);
    assert_eq!(buf, [0, 0, 0x40, 0x41]);
}

/// §4.1/§4.2 (`flatview_access_allowed`): with `attrs.memory`, an access whose
/// first region is not RAM fails with ACCESS_ERROR without touching the
/// buffer or the device; RAM (and ROM) accesses are allowed; a later non-RAM
/// piece adds ACCESS_ERROR.
#[test]
fn dispatch_attrs_memory_on_non_ram_is_access_error() {
    let m = machine();
    let ram = m.ram("ram", 0, 0x1000);
    let dev = Arc::new(Dev::new(LE));
    m.mmio("dev", 0x1000, 0x100, &dev);
    let mem = MemTxAttrs {
        memory: true,
        ..MemTxAttrs::default()
    };
    let mut buf = [0xeeu8; 4];
    assert_eq!(
        m.space.read(0x1000, &mut buf, mem),
        MemTxResult::ACCESS_ERROR
    );
    assert_eq!(buf, [0xee; 4], "buffer untouched");
    assert_eq!(m.space.write(0x1000, &buf, mem), MemTxResult::ACCESS_ERROR);
    assert_eq!(
        m.space.load_u32(0x1000, mem),
        (0, MemTxResult::ACCESS_ERROR)
    );
    assert_eq!(m.space.store_u32(0x1000, 0, mem), MemTxResult::ACCESS_ERROR);
    assert!(dev.calls().is_empty());
    assert_eq!(
        m.space.read(0x5000, &mut buf, mem),
        MemTxResult::ACCESS_ERROR,
        "a hole is not RAM"
    );
    assert_eq!(m.space.write(0x10, &[1, 2, 3, 4], mem), OK);
    assert_eq!(m.space.load_u32_le(0x10, mem), (0x0403_0201, OK));
    // Across RAM into MMIO: the RAM piece is done, the MMIO piece refused.
    let mut wide = [0u8; 8];
    assert_eq!(m.space.write(0xffc, &[9, 9, 9, 9], A), OK);
    let r = m.space.read(0xffc, &mut wide, mem);
    assert_eq!(r, MemTxResult::ACCESS_ERROR);
    assert_eq!(&wide[..4], &[9, 9, 9, 9]);
    assert!(
        dev.calls().iter().all(|c| c.0 == W),
        "no MMIO read happened"
    );
    // ROM is RAM for this check: the read is allowed, the write decodes.
    m.memory.set_readonly(ram, true).unwrap();
    assert_eq!(m.space.load_u32_le(0x10, mem), (0x0403_0201, OK));
    assert_eq!(m.space.store_u32(0x10, 0, mem), DECODE);
}

/// Liveness gate (memtree; qemu-memory-semantics.md §9): once a device is
/// unplugged, its region behaves as unassigned memory for accesses still
/// running against a view that contains it: read 0 / DECODE_ERROR, writes
/// dropped, and no callback of the device runs.
#[test]
fn dispatch_unplugged_device_region_is_unassigned() {
    let m = machine();
    let owner = m.memory.new_owner("nic", None).unwrap();
    let dev = Arc::new(Dev::new(LE));
    let r = m
        .memory
        .new_mmio("nic-mmio", 0x100, dev.clone(), Some(owner))
        .unwrap();
    m.memory.add_subregion(m.system, 0x1000, r).unwrap();
    assert_eq!(m.space.load_u32(0x1000, A), (0x4342_4140, OK));
    dev.clear();

    // Inside a transaction the unplug is not published yet: the view still
    // maps the device, but its gate is closed.
    let t = m.memory.begin();
    m.memory.unplug(owner).unwrap();
    assert_eq!(m.space.view().ranges().len(), 1, "view not yet republished");
    let mut buf = [0xaau8; 8];
    assert_eq!(m.space.read(0x1000, &mut buf, A), DECODE);
    assert_eq!(buf, [0; 8]);
    assert_eq!(m.space.store_u32(0x1000, 1, A), DECODE);
    assert_eq!(m.space.load_u16(0x1000, A), (0, DECODE));
    t.commit();
    assert!(dev.calls().is_empty(), "no callback after unplug");
    assert_eq!(m.space.load_u32(0x1000, A), (0, DECODE));
    assert!(m.space.view().ranges().is_empty());
}

/// §1.2 (`ram_device_mem_ops`): RAM device memory is accessed with
/// exact-width host loads/stores in host byte order (1..8 bytes, unaligned
/// allowed), never by memcpy; pieces stop at the range end.
#[test]
fn dispatch_ram_device_uses_exact_width_accesses() {
    let m = machine();
    let rd = m.memory.new_ram_device("bar", 0x100, None).unwrap();
    m.memory.add_subregion(m.system, 0x1000, rd).unwrap();
    m.ram("ram", 0x1100, 0x100);
    let data: Vec<u8> = (1..=20).collect();
    assert_eq!(m.space.write(0x10f3, &data, A), OK);
    let mut buf = vec![0u8; 20];
    assert_eq!(m.space.read(0x10f3, &mut buf, A), OK);
    assert_eq!(buf, data);
    assert_eq!(m.space.load_u32_le(0x10f3, A), (0x0403_0201, OK));
    assert_eq!(m.space.store_u64_be(0x1001, 0x1122_3344_5566_7788, A), OK);
    assert_eq!(m.space.load_u64_le(0x1001, A), (0x8877_6655_4433_2211, OK));
    // A typed access straddling the device end is one dispatch to the device,
    // which cannot reach past its memory.
    assert_eq!(m.space.load_u32(0x10fe, A), (0, DECODE));
}

/// §4.2 (no atomic RMW in QEMU's memory API): `rmw` loads, applies the
/// function and stores against one view, returning the old value; on RAM and
/// on devices alike; the store is skipped when the load fails.
#[test]
fn dispatch_read_modify_write_loads_then_stores() {
    let m = machine();
    m.ram("ram", 0, 0x1000);
    assert_eq!(m.space.store_u32(0x40, 41, A), OK);
    assert_eq!(m.space.rmw_u32(0x40, A, |v| v + 1), (41, OK));
    assert_eq!(m.space.load_u32(0x40, A), (42, OK));
    let dev = Arc::new(Dev::new(LE));
    m.mmio("dev", 0x2000, 0x10, &dev);
    assert_eq!(
        m.space.rmw::<u16>(0x2000, Endian::Little, A, |v| v | 1),
        (0x4140, OK)
    );
    assert_eq!(dev.calls(), vec![(R, 0, 2, 0x4140), (W, 0, 2, 0x4141)]);
    assert_eq!(
        m.space
            .rmw_u32(0x9000, A, |_| panic!("the load failed: f must not run")),
        (0, DECODE)
    );
}

/// §4.2 (one view per access) for a caching cursor: it serves every access
/// from the view published when the access starts, reloading only when a
/// commit published a new one; the rules are the same as the handle's.
#[test]
fn dispatch_cursor_follows_commits_and_applies_the_same_rules() {
    let m = machine();
    let ram = m.ram("ram", 0, 0x1000);
    let mut cursor = m.space.cursor();
    assert_eq!(
        cursor.store::<u32>(0x10, 0xcafe_f00d, Endian::Little, A),
        OK
    );
    assert_eq!(m.space.load_u32_le(0x10, A), (0xcafe_f00d, OK));
    let view_before = cursor.view().clone();
    m.memory.set_address(ram, 0x4000).unwrap();
    assert_eq!(cursor.load::<u32>(0x10, Endian::Little, A), (0, DECODE));
    assert_eq!(
        cursor.load::<u32>(0x4010, Endian::Big, A),
        (0x0df0_feca, OK)
    );
    assert!(!Arc::ptr_eq(&view_before, cursor.view()));
    let mut buf = [0u8; 4];
    assert_eq!(cursor.read(0x4010, &mut buf, A), OK);
    assert_eq!(cursor.write(0x8000, &buf, A), DECODE);
    assert_eq!(
        cursor.rmw::<u32>(0x4010, Endian::Little, A, |v| v + 1),
        (0xcafe_f00d, OK)
    );
    assert_eq!(m.space.load_u32_le(0x4010, A), (0xcafe_f00e, OK));
}
