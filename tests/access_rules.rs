//! QEMU access rules (docs/qemu-memory-semantics.md §4.2–§4.5), one test per
//! rule, exercised through a recording fake device.

use std::sync::Mutex;

use memtree::region::attrs::*;
use proptest::prelude::*;

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

/// One device callback: (addr, size, data). For reads `data` is the value the
/// device returned.
type Call = (AccessKind, u64, u32, u64);

/// A fake device that logs every callback. Reads return bytes of a fixed
/// 16-byte pattern `0x10, 0x11, ..., 0x1f` laid out at addresses 0..16 in
/// the device's endianness, so the combined value reveals the combining order.
struct Fake {
    valid: AccessSizes,
    imp: AccessSizes,
    endian: Endian,
    reject: bool,
    /// Callback at this address fails with DEVICE_ERROR.
    fail_at: Option<u64>,
    calls: Mutex<Vec<Call>>,
    accepts_calls: Mutex<u32>,
}

impl Fake {
    fn new(endian: Endian) -> Fake {
        Fake {
            valid: AccessSizes::UNSET,
            imp: AccessSizes::UNSET,
            endian,
            reject: false,
            fail_at: None,
            calls: Mutex::new(Vec::new()),
            accepts_calls: Mutex::new(0),
        }
    }
    fn valid(mut self, min: u32, max: u32, unaligned: bool) -> Fake {
        self.valid = AccessSizes::new(min, max, unaligned);
        self
    }
    fn imp(mut self, min: u32, max: u32, unaligned: bool) -> Fake {
        self.imp = AccessSizes::new(min, max, unaligned);
        self
    }
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
    /// The value the pattern holds at `addr..addr+size` in device order.
    fn pattern(&self, addr: u64, size: u32) -> u64 {
        let bytes: Vec<u64> = (0..u64::from(size))
            .map(|k| 0x10 + (addr.wrapping_add(k) & 0xf))
            .collect();
        if self.endian.is_big() {
            bytes.iter().fold(0, |v, &b| v << 8 | b)
        } else {
            bytes.iter().rev().fold(0, |v, &b| v << 8 | b)
        }
    }
}

impl MmioOps for Fake {
    fn read(&self, addr: u64, size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
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
    fn write(&self, addr: u64, data: u64, size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        self.calls
            .lock()
            .unwrap()
            .push((AccessKind::Write, addr, size, data));
        if self.fail_at == Some(addr) {
            MemTxResult::DEVICE_ERROR
        } else {
            MemTxResult::OK
        }
    }
    fn accepts(&self, _addr: u64, _size: u32, _kind: AccessKind, _attrs: MemTxAttrs) -> bool {
        *self.accepts_calls.lock().unwrap() += 1;
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

/// §4.3 step 1: an `accepts` hook returning false rejects the access; §4.4: a
/// rejected read returns 0 with DECODE_ERROR, a rejected write is dropped with
/// DECODE_ERROR; the device callbacks are never called.
#[test]
fn rule_accepts_hook_rejection() {
    let mut dev = Fake::new(LE).valid(1, 8, true);
    dev.reject = true;
    assert!(!access_valid(&dev, 0, 4, R, A));
    assert_eq!(
        dispatch_read(&dev, 0, 4, LE, A),
        (0, MemTxResult::DECODE_ERROR)
    );
    assert_eq!(
        dispatch_write(&dev, 0, 0x1234, 4, LE, A),
        MemTxResult::DECODE_ERROR
    );
    assert!(dev.calls().is_empty());
    // The hook runs first: it is consulted even for an access that would also
    // fail the later checks.
    let before = *dev.accepts_calls.lock().unwrap();
    assert!(!access_valid(&dev, 1, 4, R, A));
    assert_eq!(*dev.accepts_calls.lock().unwrap(), before + 1);
}

/// §4.3 step 2: without `valid.unaligned`, an address that is not a multiple of
/// the size is rejected ("reason: unaligned"); with it, the access is valid.
#[test]
fn rule_unaligned_rejected_unless_valid_unaligned() {
    let dev = Fake::new(LE).valid(1, 8, false);
    assert!(!access_valid(&dev, 2, 4, R, A));
    assert!(!access_valid(&dev, 4, 8, W, A));
    assert!(access_valid(&dev, 4, 4, R, A));
    assert!(access_valid(&dev, 3, 1, R, A));
    assert_eq!(
        dispatch_read(&dev, 2, 4, LE, A),
        (0, MemTxResult::DECODE_ERROR)
    );
    assert!(dev.calls().is_empty());

    let dev = Fake::new(LE).valid(1, 8, true).imp(1, 8, true);
    assert!(access_valid(&dev, 2, 4, R, A));
    assert_eq!(
        dispatch_read(&dev, 2, 4, LE, A),
        (0x1514_1312, MemTxResult::OK)
    );
    // The unaligned check precedes the "max == 0 accepts all" shortcut.
    let dev = Fake::new(LE).valid(0, 0, false);
    assert!(!access_valid(&dev, 1, 2, R, A));
}

/// §4.3 step 3: `valid.max == 0` accepts every size, and `valid.min` is then
/// not checked.
#[test]
fn rule_valid_max_zero_accepts_every_size() {
    let dev = Fake::new(LE).valid(4, 0, false);
    for size in [1, 2, 4, 8] {
        assert!(access_valid(&dev, 0, size, R, A), "size {size}");
        assert!(access_valid(&dev, 0, size, W, A), "size {size}");
    }
}

/// §4.3 step 4: a size above `valid.max` or below `valid.min` is rejected.
#[test]
fn rule_size_outside_valid_min_max_rejected() {
    let dev = Fake::new(LE).valid(2, 4, false);
    assert!(!access_valid(&dev, 0, 1, R, A));
    assert!(access_valid(&dev, 0, 2, R, A));
    assert!(access_valid(&dev, 0, 4, W, A));
    assert!(!access_valid(&dev, 0, 8, W, A));
    assert_eq!(
        dispatch_read(&dev, 0, 8, LE, A),
        (0, MemTxResult::DECODE_ERROR)
    );
    assert_eq!(
        dispatch_write(&dev, 0, 1, 1, LE, A),
        MemTxResult::DECODE_ERROR
    );
    assert!(dev.calls().is_empty());
    // Sizes no MemOp can express are never valid.
    let any = Fake::new(LE).valid(0, 0, true);
    for size in [0, 3, 5, 16, u32::MAX] {
        assert!(!access_valid(&any, 0, size, R, A), "size {size}");
    }
}

/// §4.4 access_with_adjusted_size: an access wider than `impl.max` is split
/// into `impl.max` pieces at addr, addr+4, ...; on a little-endian device
/// piece i lands at shift i*8 (first piece = low half).
#[test]
fn rule_impl_max_splits_little_endian() {
    let dev = Fake::new(LE).valid(1, 8, false).imp(1, 4, false);
    let (v, r) = dispatch_read(&dev, 8, 8, LE, A);
    assert_eq!(r, MemTxResult::OK);
    assert_eq!(
        dev.calls(),
        vec![(R, 8, 4, 0x1b1a_1918), (R, 12, 4, 0x1f1e_1d1c)]
    );
    assert_eq!(v, 0x1f1e_1d1c_1b1a_1918);

    let dev = Fake::new(LE).valid(1, 8, false).imp(1, 4, false);
    assert_eq!(
        dispatch_write(&dev, 0, 0x1122_3344_5566_7788, 8, LE, A),
        MemTxResult::OK
    );
    assert_eq!(
        dev.calls(),
        vec![(W, 0, 4, 0x5566_7788), (W, 4, 4, 0x1122_3344)]
    );
}

/// §4.4 access_with_adjusted_size: on a big-endian device piece i lands at
/// shift (size - access_size - i)*8, so the first piece is the high half.
#[test]
fn rule_impl_max_splits_big_endian() {
    let dev = Fake::new(BE).valid(1, 8, false).imp(1, 4, false);
    let (v, r) = dispatch_read(&dev, 8, 8, BE, A);
    assert_eq!(r, MemTxResult::OK);
    assert_eq!(
        dev.calls(),
        vec![(R, 8, 4, 0x1819_1a1b), (R, 12, 4, 0x1c1d_1e1f)]
    );
    assert_eq!(v, 0x1819_1a1b_1c1d_1e1f);

    let dev = Fake::new(BE).valid(1, 8, false).imp(1, 4, false);
    assert_eq!(
        dispatch_write(&dev, 0, 0x1122_3344_5566_7788, 8, BE, A),
        MemTxResult::OK
    );
    assert_eq!(
        dev.calls(),
        vec![(W, 0, 4, 0x1122_3344), (W, 4, 4, 0x5566_7788)]
    );
    // Unset impl.max means 4: an 8-byte access still splits.
    let dev = Fake::new(BE).valid(1, 8, false);
    let _ = dispatch_read(&dev, 0, 8, BE, A);
    assert_eq!(dev.calls().len(), 2);
}

/// §4.4 consequence: a read narrower than `impl.min` issues one wider access
/// at the same address; the value is masked to the piece and then to the
/// access size (LE: low bytes; BE: negative shift selects the high bytes).
#[test]
fn rule_impl_min_widens_small_read() {
    let dev = Fake::new(LE).valid(1, 4, true).imp(4, 4, false);
    assert_eq!(dispatch_read(&dev, 5, 1, LE, A), (0x15, MemTxResult::OK));
    assert_eq!(dev.calls(), vec![(R, 5, 4, 0x1817_1615)]);

    let dev = Fake::new(BE).valid(1, 4, true).imp(4, 4, false);
    assert_eq!(dispatch_read(&dev, 5, 1, BE, A), (0x15, MemTxResult::OK));
    assert_eq!(dev.calls(), vec![(R, 5, 4, 0x1516_1718)]);
    // Two bytes on BE: shift (2-4-0)*8 = -16.
    let dev = Fake::new(BE).valid(1, 4, false).imp(4, 4, false);
    assert_eq!(dispatch_read(&dev, 2, 2, BE, A), (0x1213, MemTxResult::OK));
}

/// §4.4 consequence: a write narrower than `impl.min` becomes one wider write
/// whose other bytes are zero (zero-extended data; on BE the data sits in
/// the most significant bytes of the piece).
#[test]
fn rule_write_smaller_than_impl_min_zero_extended() {
    let dev = Fake::new(LE).valid(1, 4, false).imp(4, 4, false);
    assert_eq!(dispatch_write(&dev, 3, 0xab, 1, LE, A), MemTxResult::OK);
    assert_eq!(dev.calls(), vec![(W, 3, 4, 0xab)]);

    let dev = Fake::new(BE).valid(1, 4, false).imp(4, 4, false);
    assert_eq!(dispatch_write(&dev, 2, 0xabcd, 2, BE, A), MemTxResult::OK);
    assert_eq!(dev.calls(), vec![(W, 2, 4, 0xabcd_0000)]);

    // Bits of `data` above the access size are not sent.
    let dev = Fake::new(LE).valid(1, 8, false).imp(8, 8, false);
    let _ = dispatch_write(&dev, 0, 0xffff_ff12, 1, LE, A);
    assert_eq!(dev.calls(), vec![(W, 0, 8, 0x12)]);
}

/// §4.4 adjust_endianness: values are byte-swapped (bswap16/32/64) iff the
/// requested endianness differs from the device's; 1-byte values never.
#[test]
fn rule_endianness_swap_when_request_differs() {
    for (size, dev_val, swapped) in [
        (2u32, 0x1110u64, 0x1011u64),
        (4, 0x1312_1110, 0x1011_1213),
        (8, 0x1716_1514_1312_1110, 0x1011_1213_1415_1617),
    ] {
        let dev = Fake::new(LE).valid(1, 8, false).imp(1, 8, false);
        assert_eq!(dispatch_read(&dev, 0, size, LE, A).0, dev_val);
        assert_eq!(dispatch_read(&dev, 0, size, BE, A).0, swapped);
        let _ = dispatch_write(&dev, 0, swapped, size, BE, A);
        assert_eq!(dev.calls().last().unwrap().3, dev_val);
    }
    for endian in [LE, BE] {
        let dev = Fake::new(endian).valid(1, 8, false).imp(1, 8, false);
        assert_eq!(dispatch_read(&dev, 3, 1, LE, A).0, 0x13);
        assert_eq!(dispatch_read(&dev, 3, 1, BE, A).0, 0x13);
        let _ = dispatch_write(&dev, 3, 0x5a, 1, if endian == LE { BE } else { LE }, A);
        assert_eq!(dev.calls().last().unwrap().3, 0x5a);
    }
    // Same endianness: never swapped.
    let dev = Fake::new(BE).valid(1, 8, false).imp(1, 8, false);
    assert_eq!(dispatch_read(&dev, 0, 2, BE, A).0, 0x1011);
}

/// §4.2 step 4 memory_access_size: max is `valid.max`, or 4 when unset.
#[test]
fn rule_access_size_capped_by_valid_max() {
    let imp = AccessSizes::UNSET;
    assert_eq!(access_size(AccessSizes::new(1, 2, false), imp, 8, 0), 2);
    assert_eq!(access_size(AccessSizes::new(1, 8, false), imp, 8, 0), 8);
    assert_eq!(access_size(AccessSizes::UNSET, imp, 8, 0), 4);
    assert_eq!(access_size(AccessSizes::UNSET, imp, 3, 0), 2);
    assert_eq!(access_size(AccessSizes::UNSET, imp, 0, 0), 0);
}

/// §4.2 step 4: unless `impl.unaligned`, max is capped by the natural
/// alignment of the address (`addr & -addr`, when non-zero).
#[test]
fn rule_access_size_capped_by_alignment_unless_impl_unaligned() {
    let valid = AccessSizes::new(1, 8, false);
    let aligned = AccessSizes::new(1, 8, false);
    assert_eq!(access_size(valid, aligned, 8, 0x1001), 1);
    assert_eq!(access_size(valid, aligned, 8, 0x1002), 2);
    assert_eq!(access_size(valid, aligned, 8, 0x1004), 4);
    assert_eq!(access_size(valid, aligned, 8, 0x1008), 8);
    assert_eq!(access_size(valid, aligned, 8, 1 << 63), 8);
    let unaligned = AccessSizes::new(1, 8, true);
    assert_eq!(access_size(valid, unaligned, 8, 0x1001), 8);
    assert_eq!(access_size(valid, unaligned, 8, u64::MAX), 8);
}

/// §4.2 step 4: the piece is min(len, max) rounded down to a power of two.
#[test]
fn rule_access_size_rounds_down_to_power_of_two() {
    let valid = AccessSizes::new(1, 8, false);
    let imp = AccessSizes::new(1, 8, true);
    assert_eq!(access_size(valid, imp, 7, 0), 4);
    assert_eq!(access_size(valid, imp, 6, 0), 4);
    assert_eq!(access_size(valid, imp, 3, 0), 2);
    assert_eq!(access_size(valid, imp, 1, 0), 1);
    assert_eq!(access_size(valid, imp, u64::MAX, 0), 8);
    // A non-power-of-two valid.max is rounded too.
    assert_eq!(access_size(AccessSizes::new(1, 6, false), imp, 100, 0), 4);
}

/// §4.1/§4.4: results of the pieces of a split access are ORed; the failing
/// piece contributes DEVICE_ERROR (and value 0), the others still run.
#[test]
fn rule_split_results_are_ored() {
    let mut dev = Fake::new(LE).valid(1, 8, false).imp(1, 4, false);
    dev.fail_at = Some(4);
    let (v, r) = dispatch_read(&dev, 0, 8, LE, A);
    assert_eq!(r, MemTxResult::DEVICE_ERROR);
    assert_eq!(v, 0x1312_1110);
    assert_eq!(dev.calls().len(), 2);

    let mut dev = Fake::new(LE).valid(1, 8, false).imp(1, 2, false);
    dev.fail_at = Some(2);
    let r = dispatch_write(&dev, 0, u64::MAX, 8, LE, A);
    assert!(r.contains(MemTxResult::DEVICE_ERROR));
    assert!(!r.contains(MemTxResult::DECODE_ERROR));
    assert_eq!(dev.calls().len(), 4);
    assert_eq!(MemTxResult::DEVICE_ERROR | MemTxResult::DECODE_ERROR, {
        let mut x = MemTxResult::OK;
        x |= MemTxResult::DECODE_ERROR;
        x |= MemTxResult::DEVICE_ERROR;
        x
    });
}

/// §1.2/§4.5: unassigned memory accepts nothing: reads 0 + DECODE_ERROR,
/// writes dropped with DECODE_ERROR.
#[test]
fn rule_unassigned_ops() {
    let ops = UnassignedOps;
    for size in [1, 2, 4, 8] {
        assert!(!access_valid(&ops, 0, size, R, A));
        assert_eq!(
            dispatch_read(&ops, 0x1000, size, LE, A),
            (0, MemTxResult::DECODE_ERROR)
        );
        assert_eq!(
            dispatch_write(&ops, 0x1000, 5, size, BE, A),
            MemTxResult::DECODE_ERROR
        );
    }
}

/// §1.2/§4.5: the I/O-space root reads all ones truncated to the access
/// size with OK, and ignores writes with OK.
#[test]
fn rule_io_root_ops() {
    let ops = IoRootOps;
    assert_eq!(dispatch_read(&ops, 0x60, 1, LE, A), (0xff, MemTxResult::OK));
    assert_eq!(
        dispatch_read(&ops, 0x60, 2, LE, A),
        (0xffff, MemTxResult::OK)
    );
    assert_eq!(
        dispatch_read(&ops, 0x60, 2, BE, A),
        (0xffff, MemTxResult::OK)
    );
    assert_eq!(
        dispatch_read(&ops, 0x60, 4, LE, A),
        (0xffff_ffff, MemTxResult::OK)
    );
    // Split into two 4-byte pieces (impl unset), still all ones.
    assert_eq!(
        dispatch_read(&ops, 0x60, 8, BE, A),
        (u64::MAX, MemTxResult::OK)
    );
    assert_eq!(dispatch_write(&ops, 0x60, 0x12, 1, LE, A), MemTxResult::OK);
    // Unaligned port accesses are rejected (valid.unaligned unset).
    assert_eq!(
        dispatch_read(&ops, 0x61, 2, LE, A),
        (0, MemTxResult::DECODE_ERROR)
    );
}

fn sizes() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(2),
        Just(3),
        Just(4),
        Just(8),
        Just(16),
        any::<u32>()
    ]
}

proptest! {
    // No proptest-regressions file in the working tree.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]
    /// Edge cases (§4.4): any valid/impl configuration, size, address and
    /// endianness dispatches without panicking or overflowing, reads never
    /// return bits above the access size, and every callback width is 1..=8.
    #[test]
    #[cfg_attr(miri, ignore = "proptest: thousands of cases and file I/O")]
    fn rule_dispatch_is_total(
        vmin in sizes(), vmax in sizes(), vun in any::<bool>(),
        imin in sizes(), imax in sizes(), iun in any::<bool>(),
        big in any::<bool>(), req_big in any::<bool>(),
        addr in prop_oneof![Just(0u64), Just(u64::MAX), Just(u64::MAX - 3), any::<u64>()],
        size in sizes(), data in any::<u64>(), len in any::<u64>(),
    ) {
        let endian = if big { BE } else { LE };
        let req = if req_big { BE } else { LE };
        let dev = Fake::new(endian).valid(vmin, vmax, vun).imp(imin, imax, iun);
        let (v, _) = dispatch_read(&dev, addr, size, req, A);
        if (1..8).contains(&size) {
            prop_assert!(v >> (size * 8) == 0);
        }
        let _ = dispatch_write(&dev, addr, data, size, req, A);
        for (_, _, width, _) in dev.calls() {
            prop_assert!((1..=8).contains(&width));
        }
        let n = access_size(dev.valid, dev.imp, len, addr);
        prop_assert!(n == 0 || n.is_power_of_two());
        prop_assert!(u64::from(n) <= len);
    }
}

#[test]
fn memtx_result_displays_its_bits_and_converts_to_result() {
    use memtree::MemTxError;
    assert_eq!(MemTxResult::OK.to_string(), "ok");
    assert_eq!(MemTxResult::DECODE_ERROR.to_string(), "decode error");
    let both = MemTxResult::DEVICE_ERROR | MemTxResult::ACCESS_ERROR;
    assert_eq!(both.to_string(), "device error | access error");
    assert_eq!(MemTxResult::OK.into_result(), Ok(()));
    let error: MemTxError = both.into_result().unwrap_err();
    assert_eq!(error.to_string(), "device error | access error");
    assert!(error.contains(MemTxResult::ACCESS_ERROR));
    assert_eq!(MemTxResult::from(error), both);
    assert_eq!(MemTxResult::OK.with_value(5u8), Ok(5));
    assert_eq!(
        MemTxResult::DECODE_ERROR
            .with_value(5u8)
            .map_err(|e| e.bits()),
        Err(2)
    );
    let boxed: Box<dyn std::error::Error> = Box::new(error);
    assert_eq!(boxed.to_string(), "device error | access error");
}
