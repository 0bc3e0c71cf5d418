//! MMIO device callbacks and QEMU's access rules.
//!
//! This module holds the pure, topology-free part of QEMU's dispatch path:
//!
//! * [`access_valid`] — `memory_region_access_valid`: is an access of this
//!   size at this address allowed by the device's `valid` constraints?
//! * [`access_size`] — `memory_access_size`: how many bytes the next piece of
//!   a buffer access (`address_space_rw`) takes.
//! * [`dispatch_read`] / [`dispatch_write`] — `memory_region_dispatch_*`
//!   without alias forwarding, ioeventfds and the re-entrancy guard: validity
//!   check, splitting/widening to the device's `impl` sizes
//!   (`access_with_adjusted_size`) and byte swapping.
//! * [`UnassignedOps`] and [`IoRootOps`] — the ops of unassigned memory and of
//!   the port-I/O root region.
//!
//! Access sizes handled are 1, 2, 4 and 8 bytes (the sizes a `MemOp` can
//! express with a `u64` value). Every function is total: no input panics or
//! overflows.

use std::ops::{BitOr, BitOrAssign};

/// Result of a memory transaction (`MemTxResult`); the bits of the pieces of
/// a split access are ORed together.
///
/// It is `#[must_use]`: a store to unmapped memory whose result is dropped
/// is a warning, as it is a silent bus error on real hardware. Convert it to
/// a [`Result`] with [`MemTxResult::into_result`] (or `?` after it) to
/// propagate failures; the error side, [`MemTxError`], is never "OK".
///
/// ```
/// use memtree::{MemTxAttrs, Memory};
///
/// let memory = Memory::new();
/// let root = memory.new_container("system", 1 << 32, None).unwrap();
/// let space = memory.new_address_space("memory", root, None).unwrap();
/// let handle = memory.address_space(space).unwrap();
/// // Nothing is mapped at 0x1000: the store is a decode error.
/// let result = handle.store_u32_le(0x1000, 1, MemTxAttrs::UNSPECIFIED);
/// assert_eq!(result.to_string(), "decode error");
/// let error = result.into_result().unwrap_err();
/// assert!(error.contains(memtree::MemTxResult::DECODE_ERROR));
/// ```
///
/// Ignoring it is refused under `#![deny(unused_must_use)]`:
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// use memtree::{MemTxAttrs, Memory};
///
/// let memory = Memory::new();
/// let root = memory.new_container("system", 1 << 32, None).unwrap();
/// let space = memory.new_address_space("memory", root, None).unwrap();
/// let handle = memory.address_space(space).unwrap();
/// handle.store_u32_le(0x1000, 1, MemTxAttrs::UNSPECIFIED);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
#[must_use = "a memory transaction can fail (unmapped address, device error): check it or call `into_result()`"]
pub struct MemTxResult(u8);

impl MemTxResult {
    /// Success (`MEMTX_OK`).
    pub const OK: MemTxResult = MemTxResult(0);
    /// The device reported an error (`MEMTX_ERROR`).
    pub const DEVICE_ERROR: MemTxResult = MemTxResult(1 << 0);
    /// Nothing there, or the access was rejected (`MEMTX_DECODE_ERROR`).
    pub const DECODE_ERROR: MemTxResult = MemTxResult(1 << 1);
    /// Access denied, e.g. `attrs.memory` on non-RAM (`MEMTX_ACCESS_ERROR`).
    pub const ACCESS_ERROR: MemTxResult = MemTxResult(1 << 2);

    /// Whether no error bit is set.
    pub fn is_ok(self) -> bool {
        self.0 == 0
    }

    /// Whether every bit of `other` is set in `self`.
    pub fn contains(self, other: MemTxResult) -> bool {
        self.0 & other.0 == other.0
    }

    /// The raw bits (`MEMTX_*` values).
    pub fn bits(self) -> u8 {
        self.0
    }

    /// `Ok(())` when no error bit is set, else the error bits as a
    /// [`MemTxError`].
    pub fn into_result(self) -> Result<(), MemTxError> {
        match std::num::NonZeroU8::new(self.0) {
            None => Ok(()),
            Some(bits) => Err(MemTxError(bits)),
        }
    }

    /// `Ok(value)` when no error bit is set, else the error bits: turns a
    /// load's `(value, result)` pair into a [`Result`].
    pub fn with_value<T>(self, value: T) -> Result<T, MemTxError> {
        self.into_result().map(|()| value)
    }
}

/// Names of the error bits, in bit order, for `Display`.
const ERROR_BIT_NAMES: [(u8, &str); 3] = [
    (1 << 0, "device error"),
    (1 << 1, "decode error"),
    (1 << 2, "access error"),
];

/// Writes the set bits of `bits` as `"decode error"` or, when several are
/// set, `"device error | decode error"`; unknown bits as hex.
fn fmt_bits(bits: u8, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    if bits == 0 {
        return f.write_str("ok");
    }
    let mut first = true;
    let mut rest = bits;
    for (bit, name) in ERROR_BIT_NAMES {
        if bits & bit != 0 {
            if !first {
                f.write_str(" | ")?;
            }
            f.write_str(name)?;
            first = false;
            rest &= !bit;
        }
    }
    if rest != 0 {
        if !first {
            f.write_str(" | ")?;
        }
        write!(f, "unknown error bits {rest:#x}")?;
    }
    Ok(())
}

impl std::fmt::Display for MemTxResult {
    /// `"ok"`, or the error bits set, e.g. `"decode error"` or
    /// `"device error | access error"`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fmt_bits(self.0, f)
    }
}

impl std::error::Error for MemTxResult {}

/// A failed memory transaction: a [`MemTxResult`] with at least one error
/// bit set (from [`MemTxResult::into_result`] and the `try_*` loads).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct MemTxError(std::num::NonZeroU8);

impl MemTxError {
    /// The transaction result this error carries (never [`MemTxResult::OK`]).
    pub fn result(self) -> MemTxResult {
        MemTxResult(self.0.get())
    }

    /// Whether every bit of `other` is set in this error.
    pub fn contains(self, other: MemTxResult) -> bool {
        self.result().contains(other)
    }

    /// The raw bits (`MEMTX_*` values), never 0.
    pub fn bits(self) -> u8 {
        self.0.get()
    }
}

impl std::fmt::Display for MemTxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fmt_bits(self.0.get(), f)
    }
}

impl std::error::Error for MemTxError {}

impl From<MemTxError> for MemTxResult {
    fn from(error: MemTxError) -> MemTxResult {
        error.result()
    }
}

impl BitOr for MemTxResult {
    type Output = MemTxResult;
    fn bitor(self, rhs: MemTxResult) -> MemTxResult {
        MemTxResult(self.0 | rhs.0)
    }
}

impl BitOrAssign for MemTxResult {
    fn bitor_assign(&mut self, rhs: MemTxResult) {
        self.0 |= rhs.0;
    }
}

/// Transaction attributes (`MemTxAttrs`), the subset memtree models.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemTxAttrs {
    /// Secure (TrustZone) access.
    pub secure: bool,
    /// User-mode (unprivileged) access.
    pub user: bool,
    /// Only "normal memory" may be accessed: a non-RAM target yields
    /// [`MemTxResult::ACCESS_ERROR`]. Enforced by dispatch, not here.
    pub memory: bool,
    /// PCI requester id of the bus master.
    pub requester_id: u16,
    /// No attributes were specified by the requester.
    pub unspecified: bool,
}

impl MemTxAttrs {
    /// `MEMTXATTRS_UNSPECIFIED`: only `unspecified` set.
    pub const UNSPECIFIED: MemTxAttrs = MemTxAttrs {
        secure: false,
        user: false,
        memory: false,
        requester_id: 0,
        unspecified: true,
    };
}

/// A byte order: of a device's registers ([`MmioOps::endianness`]), of the
/// target ([`Memory::with_target_endian`](crate::Memory::with_target_endian)),
/// or requested by a typed access. One type for one idea, QEMU's
/// `device_endian` and its `_le`/`_be`/native access variants:
///
/// * `Little` / `Big` are fixed orders;
/// * `Native` is the **target's** order (QEMU's `DEVICE_NATIVE_ENDIAN` and
///   the access variants without suffix). A device declaring `Native` is
///   resolved against the machine's target order when its region is created;
///   a typed access through an [`AddressSpace`](crate::AddressSpace) or a
///   [`SpaceCursor`](crate::access::dispatch::SpaceCursor) resolves it against
///   the space's target order ([`Endian::resolve`]). Where no target is known
///   (a bare [`FlatView`](crate::FlatView) access, [`dispatch_read`] on a
///   device outside a machine, a target declared `Native`), `Native` means the
///   host's order, [`Endian::HOST`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endian {
    /// Least significant byte at the lowest address (QEMU `_le`).
    Little,
    /// Most significant byte at the lowest address (QEMU `_be`).
    Big,
    /// The target's order (QEMU's native variants).
    Native,
}

impl Endian {
    /// The byte order of the host running memtree. Buffer accesses
    /// (`address_space_rw`) request host order, so the buffer holds the bytes
    /// in the device's declared order.
    #[cfg(target_endian = "little")]
    pub const HOST: Endian = Endian::Little;
    /// The byte order of the host running memtree. Buffer accesses
    /// (`address_space_rw`) request host order, so the buffer holds the bytes
    /// in the device's declared order.
    #[cfg(target_endian = "big")]
    pub const HOST: Endian = Endian::Big;

    /// The fixed order (`Little` or `Big`) this order means for a target of
    /// order `target`: `Native` becomes `target`, itself resolved to the
    /// host's order if it is `Native`.
    #[inline]
    pub const fn resolve(self, target: Endian) -> Endian {
        match self {
            Endian::Little => Endian::Little,
            Endian::Big => Endian::Big,
            Endian::Native => match target {
                Endian::Native => Endian::HOST,
                fixed => fixed,
            },
        }
    }

    /// Whether this order, with `Native` taken as the host's, is big endian.
    #[inline]
    pub const fn is_big(self) -> bool {
        matches!(self.resolve(Endian::HOST), Endian::Big)
    }
}

/// Direction of an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// Load from the device.
    Read,
    /// Store to the device.
    Write,
}

/// Access-size constraints, QEMU's `valid` and `impl` blocks.
///
/// A value of 0 means "unset", exactly as in a zero-initialised
/// `MemoryRegionOps`:
/// * `valid.max == 0`: every size is valid (`min` is then not checked);
/// * `impl.min == 0` means 1, `impl.max == 0` means 4.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AccessSizes {
    /// Minimum access size in bytes (0 = unset).
    pub min: u32,
    /// Maximum access size in bytes (0 = unset).
    pub max: u32,
    /// Whether accesses not naturally aligned to their size are allowed
    /// (`valid`) or supported by the callbacks (`impl`).
    pub unaligned: bool,
}

impl AccessSizes {
    /// All fields unset (QEMU's zero-initialised ops).
    pub const UNSET: AccessSizes = AccessSizes {
        min: 0,
        max: 0,
        unaligned: false,
    };

    /// Constructor for `const` contexts.
    pub const fn new(min: u32, max: u32, unaligned: bool) -> AccessSizes {
        AccessSizes {
            min,
            max,
            unaligned,
        }
    }
}

/// Callbacks of an MMIO / port-I/O device (QEMU's `MemoryRegionOps` plus
/// opaque).
///
/// `addr` is relative to the start of the region. `size` is the width of
/// this callback in bytes (the `impl` sizes decide which widths the
/// callbacks see). Values are plain numbers: the least significant `size*8`
/// bits are the data, interpreted in the device's
/// [`endianness`](Self::endianness) by the dispatch functions.
///
/// Defaults follow a zero-initialised `MemoryRegionOps`: no `accepts` hook
/// (always true), `valid` and `impl` unset ([`AccessSizes::UNSET`]).
///
/// # Requirement: fixed configuration
///
/// [`valid_sizes`](Self::valid_sizes), [`impl_sizes`](Self::impl_sizes) and
/// [`endianness`](Self::endianness) describe the device's *static*
/// configuration (QEMU's `MemoryRegionOps` is a `const` table): they must
/// return the same values for the whole life of the ops object. A region
/// reads them **once**, when it is created ([`OpsConfig::of`]), and the
/// access path uses that snapshot; values that change later are not seen.
/// [`accepts_everything`](Self::accepts_everything) is read at the same
/// time. [`accepts`](Self::accepts) (unless the device declared it has no
/// hook), [`read`](Self::read) and [`write`](Self::write) are called on every
/// access.
///
/// The configuration getters, and the ops object's `Drop`, may run while the
/// machine's topology is being edited (region creation; the edit that drops
/// the last reference to a region): they must not call back into the
/// [`Machine`](crate::Machine). Finalization work that needs the machine
/// belongs in the owner's finalizer ([`Machine::set_finalizer`](crate::Machine::set_finalizer)),
/// which runs after the edit has released the topology.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use memtree::{Endian, MemTxAttrs, MemTxResult, Memory, MmioOps};
///
/// /// One scratch register at offset 0 (4-byte accesses by default, see
/// /// `impl_sizes`); everything else is an error.
/// #[derive(Default)]
/// struct Scratch(AtomicU64);
///
/// impl MmioOps for Scratch {
///     fn read(&self, addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
///         match addr {
///             0 => Ok(self.0.load(Ordering::Relaxed)),
///             _ => Err(MemTxResult::DEVICE_ERROR),
///         }
///     }
///     fn write(&self, addr: u64, data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
///         if addr != 0 {
///             return MemTxResult::DEVICE_ERROR;
///         }
///         self.0.store(data, Ordering::Relaxed);
///         MemTxResult::OK
///     }
///     fn endianness(&self) -> Endian {
///         Endian::Little
///     }
/// }
///
/// let memory = Memory::new();
/// let system = memory.new_container("system", 1 << 32, None).unwrap();
/// let dev = memory.new_mmio("scratch", 0x100, Arc::new(Scratch::default()), None).unwrap();
/// memory.add_subregion(system, 0xfe00_0000, dev).unwrap();
/// let id = memory.new_address_space("memory", system, None).unwrap();
/// let bus = memory.address_space(id).unwrap();
/// let a = MemTxAttrs::UNSPECIFIED;
/// bus.store::<u32>(0xfe00_0000, 42, Endian::Little, a).into_result().unwrap();
/// assert_eq!(bus.try_load::<u32>(0xfe00_0000, Endian::Little, a), Ok(42));
/// let error = bus.try_load::<u32>(0xfe00_0008, Endian::Little, a).unwrap_err();
/// assert!(error.contains(MemTxResult::DEVICE_ERROR));
/// ```
pub trait MmioOps: Send + Sync + 'static {
    /// Read `size` bytes at `addr` (QEMU `read_with_attrs`).
    ///
    /// `Ok(value)` is a successful read (`MEMTX_OK`; only the low `size*8`
    /// bits are used). `Err(r)` is a failed read: the piece contributes value
    /// 0 and the bits of `r` to the result. (QEMU lets a failing
    /// `read_with_attrs` also return data; memtree's devices cannot.)
    fn read(&self, addr: u64, size: u32, attrs: MemTxAttrs) -> Result<u64, MemTxResult>;

    /// Write the low `size*8` bits of `data` at `addr` (QEMU
    /// `write_with_attrs`). Return [`MemTxResult::OK`] on success.
    fn write(&self, addr: u64, data: u64, size: u32, attrs: MemTxAttrs) -> MemTxResult;

    /// QEMU's `valid.accepts` hook; `false` rejects the access before any
    /// other check. Default: no hook (accept).
    fn accepts(&self, _addr: u64, _size: u32, _kind: AccessKind, _attrs: MemTxAttrs) -> bool {
        true
    }

    /// Part of the fixed configuration: `true` declares that the device has
    /// no `accepts` hook (QEMU's NULL `valid.accepts`), i.e. that
    /// [`accepts`](Self::accepts) returns `true` for every access, so the
    /// access path may skip calling it. Default: `false` (accepts is called
    /// on every access, which is always correct). Return `true` only if
    /// `accepts` is not overridden.
    fn accepts_everything(&self) -> bool {
        false
    }

    /// Guest-visible constraints (QEMU `valid`). Default: unset.
    fn valid_sizes(&self) -> AccessSizes {
        AccessSizes::UNSET
    }

    /// What the callbacks implement (QEMU `impl`); other sizes are
    /// synthesised by splitting or widening. Default: unset (1..4, aligned).
    fn impl_sizes(&self) -> AccessSizes {
        AccessSizes::UNSET
    }

    /// Device byte order. [`Endian::Native`] (QEMU's `DEVICE_NATIVE_ENDIAN`)
    /// is the machine's target order, resolved when the region is created.
    fn endianness(&self) -> Endian;
}

/// A device that reads as zero and ignores writes, like QEMU's
/// `unimplemented-device`: a placeholder for a block of registers nobody
/// models yet, so that guest accesses to it succeed instead of decoding as
/// unassigned. Little endian; accesses of 1 to 8 bytes at any alignment are
/// valid and reach it whole.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnimplementedDevice;

impl MmioOps for UnimplementedDevice {
    fn valid_sizes(&self) -> AccessSizes {
        AccessSizes::new(1, 8, true)
    }
    fn impl_sizes(&self) -> AccessSizes {
        AccessSizes::new(1, 8, true)
    }
    fn read(&self, _addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        Ok(0)
    }
    fn write(&self, _addr: u64, _data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        MemTxResult::OK
    }
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

/// A snapshot of an [`MmioOps`]' fixed configuration (its `valid` and `impl`
/// sizes and its byte order), taken once when a region is created so that
/// the access path makes no dynamic call for it, plus the access widths that
/// take the single-callback fast path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpsConfig {
    /// [`MmioOps::valid_sizes`].
    pub valid: AccessSizes,
    /// [`MmioOps::impl_sizes`].
    pub impl_: AccessSizes,
    /// [`MmioOps::endianness`].
    pub endianness: Endian,
    /// [`MmioOps::accepts_everything`]: `accepts` need not be called.
    pub accepts_everything: bool,
    /// Bit `size` (1, 2, 4 or 8) is set iff a naturally aligned access of
    /// `size` bytes passes the `valid` size limits and maps to exactly one
    /// callback of the same width (inside the `impl` limits).
    fast_sizes: u8,
}

impl OpsConfig {
    /// Reads the configuration of `ops` (four dynamic calls).
    pub fn of(ops: &dyn MmioOps) -> OpsConfig {
        let mut cfg = OpsConfig::new(ops.valid_sizes(), ops.impl_sizes(), ops.endianness());
        cfg.accepts_everything = ops.accepts_everything();
        cfg
    }

    /// The configuration with these values, for ops whose `accepts` hook
    /// must be called.
    pub const fn new(valid: AccessSizes, impl_: AccessSizes, endianness: Endian) -> OpsConfig {
        let (imin, imax) = impl_bounds(impl_);
        let mut fast_sizes = 0u8;
        let mut size = 1u32;
        while size <= 8 {
            let valid_ok = valid.max == 0 || (size <= valid.max && size >= valid.min);
            let single = size >= imin && size <= imax;
            if valid_ok && single {
                fast_sizes |= size as u8;
            }
            size *= 2;
        }
        OpsConfig {
            valid,
            impl_,
            endianness,
            accepts_everything: false,
            fast_sizes,
        }
    }

    /// Whether an access of `size` bytes at `addr` needs no validity check
    /// beyond `accepts` and is exactly one callback of width `size`.
    #[inline(always)]
    fn is_fast(&self, addr: u64, size: u32) -> bool {
        matches!(size, 1 | 2 | 4 | 8)
            && self.fast_sizes & (size as u8) != 0
            && addr & (u64::from(size) - 1) == 0
    }
}

/// The effective `impl` bounds: unset min is 1, unset max is 4; widths above
/// 8 cannot carry a u64 and are capped (memtree; QEMU only uses 1..8 here).
const fn impl_bounds(imp: AccessSizes) -> (u32, u32) {
    let min = if imp.min == 0 {
        1
    } else if imp.min < 8 {
        imp.min
    } else {
        8
    };
    let max = if imp.max == 0 {
        4
    } else if imp.max < 8 {
        imp.max
    } else {
        8
    };
    (min, max)
}

/// Whether `size` is an access width a `MemOp` with a `u64` value can carry.
fn is_memop_size(size: u32) -> bool {
    matches!(size, 1 | 2 | 4 | 8)
}

/// Mask of the low `bytes*8` bits (all ones for 8 or more bytes).
fn size_mask(bytes: u32) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (bytes * 8)) - 1
    }
}

/// `value << shift` for a possibly negative shift (negative = right shift);
/// shifts of 64 bits or more give 0.
fn shift_signed(value: u64, shift: i64) -> u64 {
    if shift >= 0 {
        u32::try_from(shift)
            .ok()
            .and_then(|s| value.checked_shl(s))
            .unwrap_or(0)
    } else {
        u32::try_from(shift.unsigned_abs())
            .ok()
            .and_then(|s| value.checked_shr(s))
            .unwrap_or(0)
    }
}

/// Byte swap of the low `size` bytes (QEMU `adjust_endianness`; 1 byte never
/// swaps).
fn bswap_sized(value: u64, size: u32) -> u64 {
    match size {
        2 => u64::from((value as u16).swap_bytes()),
        4 => u64::from((value as u32).swap_bytes()),
        8 => value.swap_bytes(),
        _ => value,
    }
}

/// QEMU `memory_region_access_valid` (`system/memory.c`).
///
/// In order:
/// 0. (memtree) a size other than 1, 2, 4 or 8 is rejected — QEMU's `MemOp`
///    cannot express it;
/// 1. the [`accepts`](MmioOps::accepts) hook returns false → reject;
/// 2. `!valid.unaligned` and `addr` not a multiple of `size` → reject;
/// 3. `valid.max == 0` → accept (all sizes valid, `min` not checked);
/// 4. `size` outside `valid.min..=valid.max` → reject.
pub fn access_valid(
    ops: &dyn MmioOps,
    addr: u64,
    size: u32,
    kind: AccessKind,
    attrs: MemTxAttrs,
) -> bool {
    access_valid_with(ops, &OpsConfig::of(ops), addr, size, kind, attrs)
}

/// [`access_valid`] with the ops' configuration already read.
fn access_valid_with(
    ops: &dyn MmioOps,
    cfg: &OpsConfig,
    addr: u64,
    size: u32,
    kind: AccessKind,
    attrs: MemTxAttrs,
) -> bool {
    if !is_memop_size(size) {
        return false;
    }
    if !cfg.accepts_everything && !ops.accepts(addr, size, kind, attrs) {
        return false;
    }
    let valid = cfg.valid;
    if !valid.unaligned && addr & (u64::from(size) - 1) != 0 {
        return false;
    }
    if valid.max == 0 {
        return true;
    }
    size <= valid.max && size >= valid.min
}

/// QEMU `memory_access_size` (`system/physmem.c`): the size of the next piece of a
/// buffer access of `len` remaining bytes at region offset `addr`.
///
/// max = `valid.max` (4 if unset); unless `impl_.unaligned`, max is capped by
/// the natural alignment of `addr` (`addr & -addr`, when non-zero); the result
/// is `min(len, max)` rounded down to a power of two. `len == 0` gives 0.
pub fn access_size(valid: AccessSizes, impl_: AccessSizes, len: u64, addr: u64) -> u32 {
    let mut max = u64::from(if valid.max == 0 { 4 } else { valid.max });
    if !impl_.unaligned {
        let align = addr & addr.wrapping_neg();
        if align != 0 && align < max {
            max = align;
        }
    }
    let l = len.min(max);
    if l == 0 {
        return 0;
    }
    // Power of two at or below l; l <= u32::MAX so this fits.
    (1u64 << (63 - l.leading_zeros())) as u32
}

/// `access_with_adjusted_size` (`system/memory.c`) for one direction. `value` is in the
/// device's significance order (already endian-adjusted for writes); for
/// reads the result is returned in `value`.
fn access_with_adjusted_size(
    ops: &dyn MmioOps,
    cfg: &OpsConfig,
    addr: u64,
    value: &mut u64,
    size: u32,
    kind: AccessKind,
    attrs: MemTxAttrs,
) -> MemTxResult {
    // Unset impl sizes default to 1..4; widths above 8 cannot carry a u64 and
    // are capped (memtree; QEMU only uses 1..8 here).
    let (min, max) = impl_bounds(cfg.impl_);
    let access = size.min(max).max(min);
    let mask = size_mask(access);
    let big = cfg.endianness.is_big();

    let mut result = MemTxResult::OK;
    let mut i = 0u32;
    while i < size {
        let shift: i64 = if big {
            (i64::from(size) - i64::from(access) - i64::from(i)) * 8
        } else {
            i64::from(i) * 8
        };
        let piece_addr = addr.wrapping_add(u64::from(i));
        match kind {
            AccessKind::Read => match ops.read(piece_addr, access, attrs) {
                Ok(tmp) => *value |= shift_signed(tmp & mask, shift),
                Err(r) => result |= r,
            },
            AccessKind::Write => {
                let tmp = shift_signed(*value, -shift) & mask;
                result |= ops.write(piece_addr, tmp, access, attrs);
            }
        }
        i += access;
    }
    result
}

/// QEMU `memory_region_dispatch_read` (`system/memory.c`) minus alias forwarding.
///
/// Returns `(value, result)`. An access rejected by [`access_valid`] returns
/// `(0, DECODE_ERROR)` without calling the device. Otherwise the device is
/// called in `impl`-sized pieces (split: several callbacks at `addr + i`;
/// widened: one callback at `addr`, value masked), the pieces' values are
/// combined in the device's byte order and their results ORed; finally the
/// value is byte-swapped iff `request` differs from the device endianness.
///
/// The value is truncated to `size` bytes (QEMU may leave bits of a widened
/// access above `size*8`; every QEMU caller discards them).
pub fn dispatch_read(
    ops: &dyn MmioOps,
    addr: u64,
    size: u32,
    request: Endian,
    attrs: MemTxAttrs,
) -> (u64, MemTxResult) {
    dispatch_read_with(ops, &OpsConfig::of(ops), addr, size, request, attrs)
}

/// [`dispatch_read`] with the ops' configuration already read (`cfg` must be
/// [`OpsConfig::of`] `ops`). The common case — a naturally aligned access
/// inside the `valid` limits that is one callback wide — makes exactly two
/// dynamic calls, `accepts` and `read` (one, `read`, if the device declared
/// [`MmioOps::accepts_everything`]).
#[inline]
pub fn dispatch_read_with(
    ops: &dyn MmioOps,
    cfg: &OpsConfig,
    addr: u64,
    size: u32,
    request: Endian,
    attrs: MemTxAttrs,
) -> (u64, MemTxResult) {
    if cfg.is_fast(addr, size) {
        // Same checks as the general path, in an order that cannot differ:
        // size, alignment and the valid limits are already known to pass.
        if !cfg.accepts_everything && !ops.accepts(addr, size, AccessKind::Read, attrs) {
            return (0, MemTxResult::DECODE_ERROR);
        }
        let (mut value, r) = match ops.read(addr, size, attrs) {
            Ok(v) => (v & size_mask(size), MemTxResult::OK),
            Err(r) => (0, r),
        };
        if request.is_big() != cfg.endianness.is_big() {
            value = bswap_sized(value, size);
        }
        return (value, r);
    }
    dispatch_read_general(ops, cfg, addr, size, request, attrs)
}

fn dispatch_read_general(
    ops: &dyn MmioOps,
    cfg: &OpsConfig,
    addr: u64,
    size: u32,
    request: Endian,
    attrs: MemTxAttrs,
) -> (u64, MemTxResult) {
    if !access_valid_with(ops, cfg, addr, size, AccessKind::Read, attrs) {
        return (0, MemTxResult::DECODE_ERROR);
    }
    let mut value = 0u64;
    let r = access_with_adjusted_size(ops, cfg, addr, &mut value, size, AccessKind::Read, attrs);
    value &= size_mask(size);
    if request.is_big() != cfg.endianness.is_big() {
        value = bswap_sized(value, size);
    }
    (value, r)
}

/// QEMU `memory_region_dispatch_write` (`system/memory.c`) minus alias forwarding and
/// ioeventfds.
///
/// An access rejected by [`access_valid`] is dropped and returns
/// `DECODE_ERROR`. Otherwise `data` (truncated to `size` bytes) is
/// byte-swapped iff `request` differs from the device endianness and sent in
/// `impl`-sized pieces; a write narrower than `impl.min` sends one wider,
/// zero-extended write. Results of the pieces are ORed.
pub fn dispatch_write(
    ops: &dyn MmioOps,
    addr: u64,
    data: u64,
    size: u32,
    request: Endian,
    attrs: MemTxAttrs,
) -> MemTxResult {
    dispatch_write_with(ops, &OpsConfig::of(ops), addr, data, size, request, attrs)
}

/// [`dispatch_write`] with the ops' configuration already read (`cfg` must
/// be [`OpsConfig::of`] `ops`); the common case makes exactly two dynamic
/// calls, `accepts` and `write` (see [`dispatch_read_with`]).
#[inline]
pub fn dispatch_write_with(
    ops: &dyn MmioOps,
    cfg: &OpsConfig,
    addr: u64,
    data: u64,
    size: u32,
    request: Endian,
    attrs: MemTxAttrs,
) -> MemTxResult {
    if cfg.is_fast(addr, size) {
        if !cfg.accepts_everything && !ops.accepts(addr, size, AccessKind::Write, attrs) {
            return MemTxResult::DECODE_ERROR;
        }
        let mut value = data & size_mask(size);
        if request.is_big() != cfg.endianness.is_big() {
            value = bswap_sized(value, size);
        }
        return ops.write(addr, value, size, attrs);
    }
    dispatch_write_general(ops, cfg, addr, data, size, request, attrs)
}

fn dispatch_write_general(
    ops: &dyn MmioOps,
    cfg: &OpsConfig,
    addr: u64,
    data: u64,
    size: u32,
    request: Endian,
    attrs: MemTxAttrs,
) -> MemTxResult {
    if !access_valid_with(ops, cfg, addr, size, AccessKind::Write, attrs) {
        return MemTxResult::DECODE_ERROR;
    }
    let mut value = data & size_mask(size);
    if request.is_big() != cfg.endianness.is_big() {
        value = bswap_sized(value, size);
    }
    access_with_adjusted_size(ops, cfg, addr, &mut value, size, AccessKind::Write, attrs)
}

/// QEMU's `unassigned_mem_ops`: the ops of memory-space holes, containers and
/// reservation regions. Its `accepts` hook rejects everything, so dispatch
/// reads 0 with `DECODE_ERROR` and drops writes with `DECODE_ERROR`. Called
/// directly, the callbacks behave the same way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnassignedOps;

impl MmioOps for UnassignedOps {
    fn read(&self, _addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        Err(MemTxResult::DECODE_ERROR)
    }

    fn write(&self, _addr: u64, _data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        MemTxResult::DECODE_ERROR
    }

    fn accepts(&self, _addr: u64, _size: u32, _kind: AccessKind, _attrs: MemTxAttrs) -> bool {
        false
    }

    /// Unobservable (every access is rejected); little endian.
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

/// QEMU's `unassigned_io_ops`: the ops of the port-I/O root region `"io"`.
/// Reads return all ones truncated to the access size, writes are ignored,
/// both `OK`. No `accepts` hook; `valid`/`impl` unset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoRootOps;

impl MmioOps for IoRootOps {
    fn read(&self, _addr: u64, size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        Ok(size_mask(size))
    }

    fn write(&self, _addr: u64, _data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        MemTxResult::OK
    }

    /// No `accepts` hook.
    fn accepts_everything(&self) -> bool {
        true
    }

    /// QEMU declares native endian; all-ones values are invariant under byte
    /// swapping, so the choice is unobservable. Little endian.
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unimplemented device answers every access, unlike unassigned
    /// memory (which decodes as an error).
    #[test]
    fn unimplemented_device_reads_zero_and_takes_writes() {
        let a = MemTxAttrs::UNSPECIFIED;
        for size in [1, 2, 4, 8] {
            assert_eq!(
                dispatch_read(&UnimplementedDevice, 0x13, size, Endian::Big, a),
                (0, MemTxResult::OK)
            );
            assert_eq!(
                dispatch_write(&UnimplementedDevice, 0x13, !0, size, Endian::Little, a),
                MemTxResult::OK
            );
        }
    }

    #[test]
    fn helpers() {
        assert_eq!(size_mask(1), 0xff);
        assert_eq!(size_mask(4), 0xffff_ffff);
        assert_eq!(size_mask(8), u64::MAX);
        assert_eq!(size_mask(100), u64::MAX);
        assert_eq!(shift_signed(0xff, 8), 0xff00);
        assert_eq!(shift_signed(0xff00, -8), 0xff);
        assert_eq!(shift_signed(1, 64), 0);
        assert_eq!(shift_signed(u64::MAX, -64), 0);
        assert_eq!(shift_signed(1, i64::MIN), 0);
        assert_eq!(shift_signed(1, i64::MAX), 0);
        assert_eq!(bswap_sized(0x1234, 2), 0x3412);
        assert_eq!(bswap_sized(0x12, 1), 0x12);
        assert_eq!(bswap_sized(0x1122_3344, 4), 0x4433_2211);
    }

    /// A device that records every callback and answers from its config.
    struct Probe {
        valid: AccessSizes,
        imp: AccessSizes,
        endian: Endian,
        accept: bool,
        log: std::sync::Mutex<Vec<(char, u64, u64, u32)>>,
    }

    impl MmioOps for Probe {
        fn read(&self, addr: u64, size: u32, _: MemTxAttrs) -> Result<u64, MemTxResult> {
            self.log.lock().unwrap().push(('r', addr, 0, size));
            if addr == 0x40 {
                return Err(MemTxResult::DEVICE_ERROR);
            }
            Ok(0x0102_0304_0506_0708u64.wrapping_mul(addr + 1))
        }
        fn write(&self, addr: u64, data: u64, size: u32, _: MemTxAttrs) -> MemTxResult {
            self.log.lock().unwrap().push(('w', addr, data, size));
            MemTxResult::OK
        }
        fn accepts(&self, addr: u64, size: u32, _: AccessKind, _: MemTxAttrs) -> bool {
            self.log.lock().unwrap().push(('a', addr, 0, size));
            self.accept
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

    #[test]
    #[cfg_attr(miri, ignore = "hundreds of thousands of cases: minutes under Miri")]
    fn dispatch_fast_path_is_indistinguishable_from_the_general_rules() {
        let sizes = [0u32, 1, 2, 4, 8, 16];
        let a = MemTxAttrs::UNSPECIFIED;
        let mut checked = 0;
        let mut combos = Vec::new();
        for &vmin in &sizes {
            for &vmax in &sizes {
                for &imin in &sizes {
                    for &imax in &sizes {
                        combos.push((vmin, vmax, imin, imax));
                    }
                }
            }
        }
        for (vmin, vmax, imin, imax) in combos {
            for (vu, iu, accept, endian) in [
                (false, false, true, Endian::Little),
                (true, false, true, Endian::Big),
                (false, true, false, Endian::Little),
                (true, true, true, Endian::Big),
            ] {
                let probe = Probe {
                    valid: AccessSizes::new(vmin, vmax, vu),
                    imp: AccessSizes::new(imin, imax, iu),
                    endian,
                    accept,
                    log: std::sync::Mutex::new(Vec::new()),
                };
                let cfg = OpsConfig::of(&probe);
                for size in [1u32, 2, 3, 4, 8, 16] {
                    for addr in [0u64, 1, 2, 4, 6, 8, 0x40] {
                        for req in [Endian::Little, Endian::Big] {
                            let fast = dispatch_read_with(&probe, &cfg, addr, size, req, a);
                            let fast_log = std::mem::take(&mut *probe.log.lock().unwrap());
                            let slow = dispatch_read_general(&probe, &cfg, addr, size, req, a);
                            let slow_log = std::mem::take(&mut *probe.log.lock().unwrap());
                            assert_eq!((fast, &fast_log), (slow, &slow_log));
                            let data = 0x1122_3344_5566_7788;
                            let fast = dispatch_write_with(&probe, &cfg, addr, data, size, req, a);
                            let fast_log = std::mem::take(&mut *probe.log.lock().unwrap());
                            let slow =
                                dispatch_write_general(&probe, &cfg, addr, data, size, req, a);
                            let slow_log = std::mem::take(&mut *probe.log.lock().unwrap());
                            assert_eq!((fast, &fast_log), (slow, &slow_log));
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 10_000);
    }

    #[test]
    fn dispatch_fast_path_calls_accepts_once_then_the_callback_once() {
        let probe = Probe {
            valid: AccessSizes::UNSET,
            imp: AccessSizes::UNSET,
            endian: Endian::Little,
            accept: true,
            log: std::sync::Mutex::new(Vec::new()),
        };
        let cfg = OpsConfig::of(&probe);
        let a = MemTxAttrs::UNSPECIFIED;
        assert!(dispatch_read_with(&probe, &cfg, 4, 4, Endian::Little, a)
            .1
            .is_ok());
        assert_eq!(
            *probe.log.lock().unwrap(),
            vec![('a', 4, 0, 4), ('r', 4, 0, 4)]
        );
    }

    #[test]
    fn dispatch_skips_accepts_only_for_ops_that_declare_no_hook() {
        struct NoHook;
        impl MmioOps for NoHook {
            fn read(&self, _: u64, _: u32, _: MemTxAttrs) -> Result<u64, MemTxResult> {
                Ok(0x1234)
            }
            fn write(&self, _: u64, _: u64, _: u32, _: MemTxAttrs) -> MemTxResult {
                MemTxResult::OK
            }
            fn accepts(&self, _: u64, _: u32, _: AccessKind, _: MemTxAttrs) -> bool {
                panic!("declared no accepts hook: must not be called")
            }
            fn accepts_everything(&self) -> bool {
                true
            }
            fn endianness(&self) -> Endian {
                Endian::Little
            }
        }
        let cfg = OpsConfig::of(&NoHook);
        assert!(cfg.accepts_everything);
        let a = MemTxAttrs::UNSPECIFIED;
        // Fast path (aligned 4) and general path (unaligned 2 of an 8-byte
        // access split into 4-byte callbacks) both skip it.
        assert_eq!(
            dispatch_read_with(&NoHook, &cfg, 8, 4, Endian::Little, a),
            (0x1234, MemTxResult::OK)
        );
        assert!(dispatch_write_with(&NoHook, &cfg, 8, 1, 8, Endian::Little, a).is_ok());
        assert!(!OpsConfig::of(&UnassignedOps).accepts_everything);
        assert!(OpsConfig::of(&IoRootOps).accepts_everything);
    }

    #[test]
    fn tx_result_bits() {
        let r = MemTxResult::DEVICE_ERROR | MemTxResult::DECODE_ERROR;
        assert!(!r.is_ok());
        assert!(r.contains(MemTxResult::DEVICE_ERROR));
        assert!(r.contains(MemTxResult::OK));
        assert!(!r.contains(MemTxResult::ACCESS_ERROR));
        assert_eq!(r.bits(), 3);
        assert_eq!(MemTxResult::default(), MemTxResult::OK);
        assert_eq!(MemTxResult::ACCESS_ERROR.bits(), 4);
        assert_eq!(
            MemTxAttrs::UNSPECIFIED,
            MemTxAttrs {
                unspecified: true,
                ..MemTxAttrs::default()
            }
        );
        assert!(!MemTxAttrs::default().unspecified);
    }
}
