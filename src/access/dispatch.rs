//! Guest accesses: QEMU's `address_space_read/write` and `ld*/st*` over the
//! data plane (QEMU `system/physmem.c`).
//!
//! Every access loads the address space's published [`FlatView`] **once**
//! ([`AddressSpace::view_guard`]: an arc-swap load, no reference-count
//! traffic in the common case) and runs entirely against that view, so an
//! access sees either the topology before a commit or the one after it, never
//! a mix; the writer never waits for readers and readers never wait for the
//! writer. The same functions are available on a [`FlatView`] a caller holds
//! ([`FlatView::read`], [`FlatView::load`], ...).
//!
//! # Per-vCPU cursors ([`AddressSpace::cursor`])
//!
//! A [`SpaceCursor`] is a caller-owned (`&mut self`) handle that caches the
//! view it last used, like QEMU's per-vCPU `CPUAddressSpace` dispatch cache:
//! each access checks with one relaxed load whether the published view is
//! still the cached one and reloads it (with a reference) only when it
//! changed. Same rules, same "one view per access" guarantee, no arc-swap
//! debt traffic on the fast path. The price: a cursor keeps the view it last
//! used (and so that view's regions and owners) alive until its next access
//! or until it is dropped — drop or [`SpaceCursor::refresh`] idle cursors,
//! as QEMU's RCU needs vCPUs to pass quiescent states.
//!
//! # Buffer accesses ([`AddressSpace::read`], [`AddressSpace::write`])
//!
//! QEMU's `flatview_read/write` loop, one *piece* at a time:
//!
//! * **Direct RAM** (reads: RAM and ROM devices in romd mode; writes: RAM
//!   whose region is not itself readonly): one copy, clamped to the end of the
//!   flat range.
//! * **Everything else** goes through the region's [`MmioOps`]: the piece size
//!   is [`access::access_size`] of the remaining length at the region-relative
//!   address (not clamped to the range end, as in QEMU: a wide piece may spill
//!   past a small MMIO region), and the piece is dispatched with
//!   [`access::dispatch_read`]/[`access::dispatch_write`] in **host** byte
//!   order, so the buffer holds the bytes in the device's declared order
//!   (QEMU passes `size_memop(l)` without an endianness flag, i.e. host order).
//! * Holes of the view are unassigned memory: reads give 0 and
//!   [`MemTxResult::DECODE_ERROR`], writes are dropped with `DECODE_ERROR`.
//!   The port-I/O root ([`crate::RegionKind::IoRoot`]) is a terminating region,
//!   so its holes are flat ranges served by its own ops: reads all ones, `OK`.
//! * ROM (RAM whose region is readonly) takes the ops path on writes; its ops
//!   are the unassigned ones, so the write is dropped with `DECODE_ERROR`.
//! * **QEMU 7.2: RAM reached through a readonly alias or container is still
//!   written.** The direct-write decision looks at the terminating region's
//!   *own* readonly flag ([`FlatRange::is_direct_write`]), not at the range's
//!   propagated one that listeners and `info mtree -f` see.
//! * RAM devices are accessed with exact-width host loads and stores of 1, 2,
//!   4 or 8 bytes in host order (QEMU's `ram_device_mem_ops`), never by a
//!   copy. memtree clamps their pieces to the range end and bounds-checks them
//!   against the backing memory (QEMU does not; an access past the end would
//!   touch host memory outside the device).
//! * Results of the pieces are ORed; the loop never stops early on an error.
//! * `attrs.memory` (restrict to normal memory): if the first piece's region
//!   is not RAM (kinds `Ram` and `RamDevice`; ROM counts, ROM devices and
//!   holes do not) the access returns `ACCESS_ERROR` without touching the
//!   buffer; if a later piece's region is not RAM, that piece ORs in
//!   `ACCESS_ERROR` and the access ends there (QEMU's per-step check, which
//!   skips the rest of an unclamped non-RAM translation).
//! * **Unplugged devices.** Before every callback the region's owner's
//!   liveness gate ([`crate::RegionCore::is_live`]) is checked; the region of
//!   an unplugged owner behaves as unassigned memory (read 0 /
//!   `DECODE_ERROR`, writes dropped). This matters for an access still running
//!   against a view published before the unplug (or a view a caller holds):
//!   no callback of an unplugged device ever starts. Direct RAM copies are
//!   not gated: the memory itself stays alive as long as any view holds it.
//!
//! # Typed accesses ([`AddressSpace::load`], [`AddressSpace::store`], ...)
//!
//! QEMU's `address_space_ld*/st*`: the range at `addr` is looked up once; if
//! it is direct RAM and covers the whole access, a host load or store in the
//! requested byte order; otherwise the whole access is sent as **one**
//! dispatch of its full width, in the requested byte order, to the region at
//! `addr` — typed accesses never split across regions. `attrs.memory` is
//! applied to typed accesses too (memtree applies it uniformly).
//!
//! # Read-modify-write ([`AddressSpace::rmw`])
//!
//! A load followed by a store against the same view. It is **not atomic**
//! against other vCPUs or DMA: QEMU's memory API has no atomic
//! read-modify-write either (TCG builds atomics on host pointers itself).

use std::ops::Deref;
use std::sync::Arc;

use arc_swap::{ArcSwap, Cache};

use crate::access::space::{AddressSpace, SpaceShared};
use crate::host::ram;
use crate::region::attrs::{
    self as access, AccessSizes, Endian, MemTxAttrs, MemTxError, MemTxResult, MmioOps, OpsConfig,
    UnassignedOps,
};
use crate::region::region_core::{Backing, RegionKind};
use crate::view::flatview::{FlatRange, FlatView};

mod sealed {
    pub trait Sealed {}
}

/// The unsigned integers a typed access can carry: `u8`, `u16`, `u32`, `u64`.
pub trait Primitive: sealed::Sealed + Copy + Send + Sync + 'static {
    /// Width in bytes.
    const SIZE: u32;
    /// Truncates a dispatch value.
    fn from_u64(v: u64) -> Self;
    /// Zero-extends.
    fn to_u64(self) -> u64;
    /// Reads `Self::SIZE` bytes at `p` as a value stored in byte order `e`.
    ///
    /// # Safety
    /// `p` must be valid for a read of `Self::SIZE` bytes (any alignment) of
    /// guest memory, as for [`ram::load_guest`].
    unsafe fn load_from(p: *const u8, e: Endian) -> Self;
    /// Writes the value at `p` in byte order `e`.
    ///
    /// # Safety
    /// `p` must be valid for a write of `Self::SIZE` bytes (any alignment) of
    /// guest memory, as for [`ram::store_guest`].
    unsafe fn store_to(self, p: *mut u8, e: Endian);
}

macro_rules! primitive {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Primitive for $t {
            const SIZE: u32 = std::mem::size_of::<$t>() as u32;
            #[inline]
            fn from_u64(v: u64) -> Self {
                v as $t
            }
            #[inline]
            fn to_u64(self) -> u64 {
                u64::from(self)
            }
            #[inline]
            unsafe fn load_from(p: *const u8, e: Endian) -> Self {
                // SAFETY: the caller guarantees `p` is readable guest
                // memory for `size_of::<Self>()` bytes; any alignment.
                let raw = unsafe { ram::load_guest::<{ std::mem::size_of::<$t>() }>(p) };
                match e {
                    Endian::Little => <$t>::from_le_bytes(raw),
                    Endian::Big => <$t>::from_be_bytes(raw),
                    // Resolved by the caller when a target is known.
                    Endian::Native => <$t>::from_ne_bytes(raw),
                }
            }
            #[inline]
            unsafe fn store_to(self, p: *mut u8, e: Endian) {
                let raw = match e {
                    Endian::Little => self.to_le_bytes(),
                    Endian::Big => self.to_be_bytes(),
                    Endian::Native => self.to_ne_bytes(),
                };
                // SAFETY: the caller guarantees `p` is writable guest
                // memory for `size_of::<Self>()` bytes; any alignment.
                unsafe { ram::store_guest(p, raw) }
            }
        }
    )*};
}
primitive!(u8, u16, u32, u64);

/// Whether QEMU's `memory_region_is_ram` holds for the region serving a
/// piece (holes are the unassigned region: not RAM).
#[inline]
fn is_ram(range: Option<&FlatRange>) -> bool {
    range.is_some_and(|r| matches!(r.region().kind(), RegionKind::Ram | RegionKind::RamDevice))
}

/// Bytes from `addr` to the end of `r` (saturating: a range may be 2^64 long).
#[inline]
fn avail(r: &FlatRange, addr: u64) -> u64 {
    (r.last() - addr).saturating_add(1)
}

/// QEMU's `ram_device_mem_ops`: exact-width host loads and stores in host
/// byte order, 1..8 bytes, unaligned allowed. Bounds-checked against the
/// device memory behind the region (memtree; QEMU does not check).
struct RamDeviceOps {
    /// Host address of region offset 0.
    base: *mut u8,
    /// Bytes of device memory from `base` on.
    len: u64,
}

// SAFETY: `RamDeviceOps` is a short-lived value on the stack of the access
// that built it; `base` points into a backend kept alive by the flat range
// that access is using, and is only used for bounds-checked raw accesses.
unsafe impl Send for RamDeviceOps {}
// SAFETY: as above; the value is immutable.
unsafe impl Sync for RamDeviceOps {}

impl RamDeviceOps {
    const SIZES: AccessSizes = AccessSizes::new(1, 8, true);
    const CONFIG: OpsConfig = OpsConfig::new(Self::SIZES, Self::SIZES, Endian::HOST);

    fn at(&self, addr: u64, size: u32) -> Option<*mut u8> {
        let end = addr.checked_add(u64::from(size))?;
        (end <= self.len).then(|| self.base.wrapping_add(addr as usize))
    }
}

impl MmioOps for RamDeviceOps {
    fn read(&self, addr: u64, size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        let p = self.at(addr, size).ok_or(MemTxResult::DECODE_ERROR)?;
        let e = Endian::HOST;
        // SAFETY: `at` checked that `size` bytes at `p` lie inside the device
        // memory, which the flat range of this access keeps mapped.
        unsafe {
            Ok(match size {
                1 => u64::from(u8::load_from(p, e)),
                2 => u64::from(u16::load_from(p, e)),
                4 => u64::from(u32::load_from(p, e)),
                8 => u64::load_from(p, e),
                _ => return Err(MemTxResult::DECODE_ERROR),
            })
        }
    }

    fn write(&self, addr: u64, data: u64, size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        let Some(p) = self.at(addr, size) else {
            return MemTxResult::DECODE_ERROR;
        };
        let e = Endian::HOST;
        // SAFETY: `at` checked that `size` bytes at `p` lie inside the device
        // memory, which the flat range of this access keeps mapped.
        unsafe {
            match size {
                1 => (data as u8).store_to(p, e),
                2 => (data as u16).store_to(p, e),
                4 => (data as u32).store_to(p, e),
                8 => data.store_to(p, e),
                _ => return MemTxResult::DECODE_ERROR,
            }
        }
        MemTxResult::OK
    }

    fn valid_sizes(&self) -> AccessSizes {
        Self::SIZES
    }

    fn impl_sizes(&self) -> AccessSizes {
        Self::SIZES
    }

    fn endianness(&self) -> Endian {
        Endian::HOST
    }
}

/// What a non-direct piece is dispatched to, with the ops' configuration.
enum Target<'a> {
    Ops(&'a dyn MmioOps, &'a OpsConfig),
    RamDevice(RamDeviceOps),
}

impl Target<'_> {
    #[inline]
    fn ops(&self) -> (&dyn MmioOps, &OpsConfig) {
        match self {
            Target::Ops(o, c) => (*o, c),
            Target::RamDevice(o) => (o, &RamDeviceOps::CONFIG),
        }
    }
}

static UNASSIGNED: UnassignedOps = UnassignedOps;
static UNASSIGNED_CONFIG: OpsConfig =
    OpsConfig::new(AccessSizes::UNSET, AccessSizes::UNSET, Endian::Little);

/// The ops and region-relative address serving a non-direct access at
/// `addr`, plus a cap on the piece length (RAM devices only).
#[inline]
fn target(range: Option<&FlatRange>, addr: u64) -> (Target<'_>, u64, u64) {
    let Some(r) = range else {
        // A hole: QEMU's unassigned section, region offset = address.
        return (Target::Ops(&UNASSIGNED, &UNASSIGNED_CONFIG), addr, u64::MAX);
    };
    let mr_addr = (addr - r.start()).wrapping_add(r.offset_in_region());
    let core = r.region();
    if !core.is_live() {
        // The owner was unplugged: the region is unassigned memory now.
        return (
            Target::Ops(&UNASSIGNED, &UNASSIGNED_CONFIG),
            mr_addr,
            u64::MAX,
        );
    }
    match core.backing() {
        Backing::RamDevice { block, offset } => {
            let base = block.host_addr().wrapping_add(*offset as usize);
            let len = block.size().saturating_sub(*offset);
            (
                Target::RamDevice(RamDeviceOps { base, len }),
                mr_addr,
                avail(r, addr),
            )
        }
        _ => (
            Target::Ops(core.ops(), core.ops_config()),
            mr_addr,
            u64::MAX,
        ),
    }
}

/// Loads `l` (1, 2, 4 or 8) bytes of `buf` as a host-order value
/// (QEMU `ldn_he_p`).
fn ldn_he(buf: &[u8], l: usize) -> u64 {
    match l {
        1 => u64::from(buf[0]),
        2 => u64::from(u16::from_ne_bytes([buf[0], buf[1]])),
        4 => u64::from(u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]])),
        _ => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[..8]);
            u64::from_ne_bytes(b)
        }
    }
}

/// Stores `v` as `l` (1, 2, 4 or 8) host-order bytes into `buf`
/// (QEMU `stn_he_p`).
fn stn_he(buf: &mut [u8], l: usize, v: u64) {
    match l {
        1 => buf[0] = v as u8,
        2 => buf[..2].copy_from_slice(&(v as u16).to_ne_bytes()),
        4 => buf[..4].copy_from_slice(&(v as u32).to_ne_bytes()),
        _ => buf[..8].copy_from_slice(&v.to_ne_bytes()),
    }
}

/// One non-direct piece of a buffer read; returns its length (>= 1).
fn read_piece(
    range: Option<&FlatRange>,
    addr: u64,
    rest: &mut [u8],
    attrs: MemTxAttrs,
) -> (usize, MemTxResult) {
    if let Some(done) = range.and_then(|r| crate::access::iommu::read_piece(r, addr, rest, attrs)) {
        return done;
    }
    let (t, mr_addr, cap) = target(range, addr);
    let (ops, cfg) = t.ops();
    let len = (rest.len() as u64).min(cap);
    let l = access::access_size(cfg.valid, cfg.impl_, len, mr_addr);
    let (v, r) = access::dispatch_read_with(ops, cfg, mr_addr, l, Endian::HOST, attrs);
    let l = l as usize;
    stn_he(rest, l, v);
    (l, r)
}

/// One non-direct piece of a buffer write; returns its length (>= 1).
fn write_piece(
    range: Option<&FlatRange>,
    addr: u64,
    rest: &[u8],
    attrs: MemTxAttrs,
) -> (usize, MemTxResult) {
    if let Some(done) = range.and_then(|r| crate::access::iommu::write_piece(r, addr, rest, attrs))
    {
        return done;
    }
    let (t, mr_addr, cap) = target(range, addr);
    let (ops, cfg) = t.ops();
    let len = (rest.len() as u64).min(cap);
    let l = access::access_size(cfg.valid, cfg.impl_, len, mr_addr);
    let v = ldn_he(rest, l as usize);
    let r = access::dispatch_write_with(ops, cfg, mr_addr, v, l, Endian::HOST, attrs);
    (l as usize, r)
}

impl FlatView {
    /// Reads `buf.len()` bytes at `addr` through this view (QEMU
    /// `flatview_read`); see the [module docs](crate::access::dispatch) for the rules.
    pub fn read(&self, addr: u64, buf: &mut [u8], attrs: MemTxAttrs) -> MemTxResult {
        if buf.is_empty() {
            return MemTxResult::OK;
        }
        let mut range = self.lookup(addr);
        if attrs.memory && !is_ram(range) {
            return MemTxResult::ACCESS_ERROR;
        }
        let mut result = MemTxResult::OK;
        let mut addr = addr;
        let mut done = 0usize;
        loop {
            let rest = &mut buf[done..];
            let l = match range {
                Some(r) if r.is_direct_read() => {
                    let l = (rest.len() as u64).min(avail(r, addr)) as usize;
                    // SAFETY: `addr..addr+l` lies inside the range, whose host
                    // memory (kept mapped by the range's region core) covers
                    // the whole range; `rest` is a distinct Rust buffer.
                    unsafe { ram::copy_from_guest(r.host_at(addr), rest.as_mut_ptr(), l) };
                    l
                }
                _ => {
                    let (l, r) = read_piece(range, addr, rest, attrs);
                    result |= r;
                    l
                }
            };
            done += l;
            if done == buf.len() {
                return result;
            }
            addr = addr.wrapping_add(l as u64);
            range = self.lookup(addr);
            if attrs.memory && !is_ram(range) {
                return result | MemTxResult::ACCESS_ERROR;
            }
        }
    }

    /// Writes `buf` at `addr` through this view (QEMU `flatview_write`); see
    /// the [module docs](crate::access::dispatch) for the rules.
    pub fn write(&self, addr: u64, buf: &[u8], attrs: MemTxAttrs) -> MemTxResult {
        if buf.is_empty() {
            return MemTxResult::OK;
        }
        let mut range = self.lookup(addr);
        if attrs.memory && !is_ram(range) {
            return MemTxResult::ACCESS_ERROR;
        }
        let mut result = MemTxResult::OK;
        let mut addr = addr;
        let mut done = 0usize;
        loop {
            let rest = &buf[done..];
            let l = match range {
                Some(r) if r.is_direct_write() => {
                    let l = (rest.len() as u64).min(avail(r, addr)) as usize;
                    // SAFETY: `addr..addr+l` lies inside the range, whose host
                    // memory (kept mapped by the range's region core) covers
                    // the whole range; `rest` is a distinct Rust buffer.
                    unsafe { ram::copy_to_guest(rest.as_ptr(), r.host_at(addr), l) };
                    r.mark_dirty(addr, l as u64);
                    l
                }
                _ => {
                    let (l, r) = write_piece(range, addr, rest, attrs);
                    result |= r;
                    l
                }
            };
            done += l;
            if done == buf.len() {
                return result;
            }
            addr = addr.wrapping_add(l as u64);
            range = self.lookup(addr);
            if attrs.memory && !is_ram(range) {
                return result | MemTxResult::ACCESS_ERROR;
            }
        }
    }

    /// Typed load of `T` at `addr` in byte order `order` (QEMU
    /// `address_space_ld*`): never split; see the
    /// [module docs](crate::access::dispatch).
    #[inline]
    pub fn load<T: Primitive>(
        &self,
        addr: u64,
        order: Endian,
        attrs: MemTxAttrs,
    ) -> (T, MemTxResult) {
        let range = self.lookup(addr);
        if let Some(r) = range {
            if r.is_direct_read() && avail(r, addr) >= u64::from(T::SIZE) && !attrs.memory {
                // SAFETY: the range covers `T::SIZE` bytes from `addr`, and
                // its host memory stays mapped while the range is alive.
                return (
                    unsafe { T::load_from(r.host_at(addr), order) },
                    MemTxResult::OK,
                );
            }
        }
        load_slow(range, addr, order, attrs)
    }

    /// [`FlatView::load`] as a [`Result`]: the value, or the error bits.
    #[inline]
    pub fn try_load<T: Primitive>(
        &self,
        addr: u64,
        order: Endian,
        attrs: MemTxAttrs,
    ) -> Result<T, MemTxError> {
        let (value, result) = self.load(addr, order, attrs);
        result.with_value(value)
    }

    /// Typed store of `value` at `addr` in byte order `order` (QEMU
    /// `address_space_st*`): never split; see the
    /// [module docs](crate::access::dispatch).
    #[inline]
    pub fn store<T: Primitive>(
        &self,
        addr: u64,
        value: T,
        order: Endian,
        attrs: MemTxAttrs,
    ) -> MemTxResult {
        let range = self.lookup(addr);
        if let Some(r) = range {
            if r.is_direct_write() && avail(r, addr) >= u64::from(T::SIZE) && !attrs.memory {
                // SAFETY: the range covers `T::SIZE` bytes from `addr`, and
                // its host memory stays mapped while the range is alive.
                unsafe { value.store_to(r.host_at(addr), order) };
                r.mark_dirty(addr, u64::from(T::SIZE));
                return MemTxResult::OK;
            }
        }
        store_slow(range, addr, value, order, attrs)
    }

    /// Read-modify-write of a `T` at `addr`: loads, applies `f`, stores the
    /// result, all against this view. Returns the old value. The store is
    /// skipped if the load failed. **Not atomic** against other accesses.
    pub fn rmw<T: Primitive>(
        &self,
        addr: u64,
        order: Endian,
        attrs: MemTxAttrs,
        f: impl FnOnce(T) -> T,
    ) -> (T, MemTxResult) {
        let (old, r) = self.load::<T>(addr, order, attrs);
        if !r.is_ok() {
            return (old, r);
        }
        (old, self.store(addr, f(old), order, attrs))
    }
}

/// Everything but direct RAM (MMIO is a normal path: not `#[cold]`).
#[inline(never)]
fn load_slow<T: Primitive>(
    range: Option<&FlatRange>,
    addr: u64,
    order: Endian,
    attrs: MemTxAttrs,
) -> (T, MemTxResult) {
    if attrs.memory && !is_ram(range) {
        return (T::from_u64(0), MemTxResult::ACCESS_ERROR);
    }
    if let Some(r) = range {
        if r.is_direct_read() && avail(r, addr) >= u64::from(T::SIZE) {
            // SAFETY: the range covers `T::SIZE` bytes from `addr`, and its
            // host memory stays mapped while the range is alive.
            return (
                unsafe { T::load_from(r.host_at(addr), order) },
                MemTxResult::OK,
            );
        }
    }
    if let Some(done) = range.and_then(|r| crate::access::iommu::load::<T>(r, addr, order, attrs)) {
        return done;
    }
    let (t, mr_addr, _) = target(range, addr);
    let (ops, cfg) = t.ops();
    let (v, res) = access::dispatch_read_with(ops, cfg, mr_addr, T::SIZE, order, attrs);
    (T::from_u64(v), res)
}

#[inline(never)]
fn store_slow<T: Primitive>(
    range: Option<&FlatRange>,
    addr: u64,
    value: T,
    order: Endian,
    attrs: MemTxAttrs,
) -> MemTxResult {
    if attrs.memory && !is_ram(range) {
        return MemTxResult::ACCESS_ERROR;
    }
    if let Some(r) = range {
        if r.is_direct_write() && avail(r, addr) >= u64::from(T::SIZE) {
            // SAFETY: the range covers `T::SIZE` bytes from `addr`, and its
            // host memory stays mapped while the range is alive.
            unsafe { value.store_to(r.host_at(addr), order) };
            r.mark_dirty(addr, u64::from(T::SIZE));
            return MemTxResult::OK;
        }
    }
    if let Some(done) =
        range.and_then(|r| crate::access::iommu::store::<T>(r, addr, value, order, attrs))
    {
        return done;
    }
    let (t, mr_addr, _) = target(range, addr);
    let (ops, cfg) = t.ops();
    access::dispatch_write_with(ops, cfg, mr_addr, value.to_u64(), T::SIZE, order, attrs)
}

macro_rules! typed_accessors {
    ($( $t:ty: $load:ident $load_le:ident $load_be:ident $try_load:ident $try_load_le:ident $try_load_be:ident $store:ident $store_le:ident $store_be:ident; )*) => {
        impl AddressSpace {$(
            #[doc = concat!("Native-endian `", stringify!($t), "` load (QEMU `address_space_ld*`).")]
            #[inline]
            pub fn $load(&self, addr: u64, attrs: MemTxAttrs) -> ($t, MemTxResult) {
                self.load::<$t>(addr, Endian::Native, attrs)
            }
            #[doc = concat!("Little-endian `", stringify!($t), "` load.")]
            #[inline]
            pub fn $load_le(&self, addr: u64, attrs: MemTxAttrs) -> ($t, MemTxResult) {
                self.load::<$t>(addr, Endian::Little, attrs)
            }
            #[doc = concat!("Big-endian `", stringify!($t), "` load.")]
            #[inline]
            pub fn $load_be(&self, addr: u64, attrs: MemTxAttrs) -> ($t, MemTxResult) {
                self.load::<$t>(addr, Endian::Big, attrs)
            }
            #[doc = concat!("Native-endian `", stringify!($t), "` load as a [`Result`] (see [`AddressSpace::try_load`]).")]
            #[inline]
            pub fn $try_load(&self, addr: u64, attrs: MemTxAttrs) -> Result<$t, MemTxError> {
                self.try_load::<$t>(addr, Endian::Native, attrs)
            }
            #[doc = concat!("Little-endian `", stringify!($t), "` load as a [`Result`].")]
            #[inline]
            pub fn $try_load_le(&self, addr: u64, attrs: MemTxAttrs) -> Result<$t, MemTxError> {
                self.try_load::<$t>(addr, Endian::Little, attrs)
            }
            #[doc = concat!("Big-endian `", stringify!($t), "` load as a [`Result`].")]
            #[inline]
            pub fn $try_load_be(&self, addr: u64, attrs: MemTxAttrs) -> Result<$t, MemTxError> {
                self.try_load::<$t>(addr, Endian::Big, attrs)
            }
            #[doc = concat!("Native-endian `", stringify!($t), "` store (QEMU `address_space_st*`).")]
            #[inline]
            pub fn $store(&self, addr: u64, value: $t, attrs: MemTxAttrs) -> MemTxResult {
                self.store::<$t>(addr, value, Endian::Native, attrs)
            }
            #[doc = concat!("Little-endian `", stringify!($t), "` store.")]
            #[inline]
            pub fn $store_le(&self, addr: u64, value: $t, attrs: MemTxAttrs) -> MemTxResult {
                self.store::<$t>(addr, value, Endian::Little, attrs)
            }
            #[doc = concat!("Big-endian `", stringify!($t), "` store.")]
            #[inline]
            pub fn $store_be(&self, addr: u64, value: $t, attrs: MemTxAttrs) -> MemTxResult {
                self.store::<$t>(addr, value, Endian::Big, attrs)
            }
        )*}
    };
}

typed_accessors! {
    u8: load_u8 load_u8_le load_u8_be try_load_u8 try_load_u8_le try_load_u8_be store_u8 store_u8_le store_u8_be;
    u16: load_u16 load_u16_le load_u16_be try_load_u16 try_load_u16_le try_load_u16_be store_u16 store_u16_le store_u16_be;
    u32: load_u32 load_u32_le load_u32_be try_load_u32 try_load_u32_le try_load_u32_be store_u32 store_u32_le store_u32_be;
    u64: load_u64 load_u64_le load_u64_be try_load_u64 try_load_u64_le try_load_u64_be store_u64 store_u64_le store_u64_be;
}

impl AddressSpace {
    /// Reads `buf.len()` bytes at `addr` (QEMU `address_space_read_full`).
    /// Length 0 returns `OK` without looking at the view. The whole access
    /// runs against the view published when it started.
    #[inline]
    pub fn read(&self, addr: u64, buf: &mut [u8], attrs: MemTxAttrs) -> MemTxResult {
        if buf.is_empty() {
            return MemTxResult::OK;
        }
        self.view_guard().read(addr, buf, attrs)
    }

    /// Writes `buf` at `addr` (QEMU `address_space_write`). Length 0 returns
    /// `OK`. The whole access runs against the view published when it
    /// started.
    #[inline]
    pub fn write(&self, addr: u64, buf: &[u8], attrs: MemTxAttrs) -> MemTxResult {
        if buf.is_empty() {
            return MemTxResult::OK;
        }
        self.view_guard().write(addr, buf, attrs)
    }

    /// Typed load in the given byte order ([`Endian::Native`] = the guest's).
    #[inline]
    pub fn load<T: Primitive>(
        &self,
        addr: u64,
        order: Endian,
        attrs: MemTxAttrs,
    ) -> (T, MemTxResult) {
        let order = order.resolve(self.target_endian());
        self.view_guard().load(addr, order, attrs)
    }

    /// [`AddressSpace::load`] as a [`Result`]: the value, or the error bits
    /// (an unmapped address is a [`MemTxResult::DECODE_ERROR`]).
    ///
    /// ```
    /// use memtree::{Endian, MemTxAttrs, MemTxResult, Memory};
    ///
    /// let memory = Memory::new();
    /// let root = memory.new_container("system", 1 << 32, None).unwrap();
    /// let ram = memory.new_ram("ram", 0x1000, None).unwrap();
    /// memory.add_subregion(root, 0, ram).unwrap();
    /// let space = memory.new_address_space("memory", root, None).unwrap();
    /// let handle = memory.address_space(space).unwrap();
    /// let attrs = MemTxAttrs::UNSPECIFIED;
    /// handle.store::<u32>(0x10, 7, Endian::Little, attrs).into_result().unwrap();
    /// assert_eq!(handle.try_load::<u32>(0x10, Endian::Little, attrs), Ok(7));
    /// let error = handle.try_load::<u32>(0x2000, Endian::Little, attrs).unwrap_err();
    /// assert!(error.contains(MemTxResult::DECODE_ERROR));
    /// ```
    #[inline]
    pub fn try_load<T: Primitive>(
        &self,
        addr: u64,
        order: Endian,
        attrs: MemTxAttrs,
    ) -> Result<T, MemTxError> {
        let (value, result) = self.load(addr, order, attrs);
        result.with_value(value)
    }

    /// Typed store in the given byte order ([`Endian::Native`] = the guest's).
    #[inline]
    pub fn store<T: Primitive>(
        &self,
        addr: u64,
        value: T,
        order: Endian,
        attrs: MemTxAttrs,
    ) -> MemTxResult {
        let order = order.resolve(self.target_endian());
        self.view_guard().store(addr, value, order, attrs)
    }

    /// Read-modify-write of a `T` at `addr` against one view: returns the old
    /// value; the store is skipped if the load failed. **Not atomic** against
    /// other vCPUs or DMA (QEMU's memory API has no atomic RMW either).
    pub fn rmw<T: Primitive>(
        &self,
        addr: u64,
        order: Endian,
        attrs: MemTxAttrs,
        f: impl FnOnce(T) -> T,
    ) -> (T, MemTxResult) {
        let order = order.resolve(self.target_endian());
        self.view_guard().rmw(addr, order, attrs, f)
    }

    /// Native-endian 32-bit read-modify-write (see [`AddressSpace::rmw`]).
    pub fn rmw_u32(
        &self,
        addr: u64,
        attrs: MemTxAttrs,
        f: impl FnOnce(u32) -> u32,
    ) -> (u32, MemTxResult) {
        self.rmw(addr, Endian::Native, attrs, f)
    }
}

/// The published-view cell of an address space, for [`Cache`].
#[derive(Clone)]
pub(crate) struct ViewCellRef(Arc<SpaceShared>);

impl ViewCellRef {
    pub(crate) fn new(space: &AddressSpace) -> ViewCellRef {
        ViewCellRef(space.shared.clone())
    }
}

impl Deref for ViewCellRef {
    type Target = ArcSwap<FlatView>;
    fn deref(&self) -> &ArcSwap<FlatView> {
        &self.0.view
    }
}

/// A caller-owned access handle that caches its address space's current
/// view between accesses (see the [module docs](crate::access::dispatch)). `Send`,
/// not shared: one per vCPU or DMA worker.
///
/// ```
/// use memtree::{Endian, MemTxAttrs, Memory};
///
/// let memory = Memory::new();
/// let system = memory.new_container("system", 1 << 32, None).unwrap();
/// let ram = memory.new_ram("ram", 0x1000, None).unwrap();
/// memory.add_subregion(system, 0, ram).unwrap();
/// let id = memory.new_address_space("memory", system, None).unwrap();
/// let mut vcpu = memory.address_space(id).unwrap().cursor();
/// let a = MemTxAttrs::UNSPECIFIED;
/// for i in 0..4u64 {
///     vcpu.store::<u64>(i * 8, i, Endian::Native, a).into_result().unwrap();
/// }
/// assert_eq!(vcpu.try_load::<u64>(24, Endian::Native, a), Ok(3));
/// ```
pub struct SpaceCursor {
    pub(crate) cache: Cache<ViewCellRef, Arc<FlatView>>,
    /// The handle (DMA mappings made through the cursor borrow it).
    pub(crate) space: AddressSpace,
    target_endian: Endian,
    /// The last IOTLB entry typed accesses used (see `crate::iommu`).
    iotlb: Option<crate::access::iommu::CursorIotlb>,
}

impl std::fmt::Debug for SpaceCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpaceCursor")
            .field("space", &self.cache.arc_swap().load().root_name())
            .finish()
    }
}

impl AddressSpace {
    /// A cursor over this address space for one thread's accesses.
    pub fn cursor(&self) -> SpaceCursor {
        SpaceCursor {
            cache: Cache::new(ViewCellRef(self.shared.clone())),
            space: self.clone(),
            target_endian: self.target_endian(),
            iotlb: None,
        }
    }
}

impl SpaceCursor {
    /// The current view (revalidated), for one access.
    #[inline]
    pub fn view(&mut self) -> &Arc<FlatView> {
        self.cache.load()
    }

    /// Drops the cached view if a newer one was published (an idle vCPU's
    /// quiescent point): afterwards the cursor holds only the current view.
    pub fn refresh(&mut self) {
        self.cache.load();
        self.iotlb = None;
    }

    /// [`AddressSpace::read`] through the cached view.
    #[inline]
    pub fn read(&mut self, addr: u64, buf: &mut [u8], attrs: MemTxAttrs) -> MemTxResult {
        if buf.is_empty() {
            return MemTxResult::OK;
        }
        self.view().read(addr, buf, attrs)
    }

    /// [`AddressSpace::write`] through the cached view.
    #[inline]
    pub fn write(&mut self, addr: u64, buf: &[u8], attrs: MemTxAttrs) -> MemTxResult {
        if buf.is_empty() {
            return MemTxResult::OK;
        }
        self.view().write(addr, buf, attrs)
    }

    /// [`AddressSpace::load`] through the cached view.
    #[inline]
    pub fn load<T: Primitive>(
        &mut self,
        addr: u64,
        order: Endian,
        attrs: MemTxAttrs,
    ) -> (T, MemTxResult) {
        let order = order.resolve(self.target_endian);
        let view = self.cache.load();
        let range = view.lookup(addr);
        if let Some(r) = range {
            if r.is_direct_read() && avail(r, addr) >= u64::from(T::SIZE) && !attrs.memory {
                // SAFETY: the range covers `T::SIZE` bytes from `addr`, and
                // its host memory stays mapped while the range is alive.
                return (
                    unsafe { T::load_from(r.host_at(addr), order) },
                    MemTxResult::OK,
                );
            }
            let size = u64::from(T::SIZE);
            // An IOMMU range is not RAM: `attrs.memory` takes the slow path.
            let hit = (!attrs.memory).then(|| {
                crate::access::iommu::cursor_hit(
                    &mut self.iotlb,
                    view,
                    r,
                    addr,
                    crate::access::iommu::IommuPerm::Read,
                    attrs,
                    |_, _, host, avail| {
                        (avail >= size).then(|| {
                            // SAFETY: `host` has `avail >= size` bytes of a
                            // range of the target view the cursor holds.
                            let v = unsafe { T::load_from(host, order) };
                            (v, MemTxResult::OK)
                        })
                    },
                )
            });
            if let Some(Some(Some(done))) = hit {
                return done;
            }
        }
        load_slow(range, addr, order, attrs)
    }

    /// [`SpaceCursor::load`] as a [`Result`]: the value, or the error bits.
    #[inline]
    pub fn try_load<T: Primitive>(
        &mut self,
        addr: u64,
        order: Endian,
        attrs: MemTxAttrs,
    ) -> Result<T, MemTxError> {
        let (value, result) = self.load(addr, order, attrs);
        result.with_value(value)
    }

    /// [`AddressSpace::store`] through the cached view.
    #[inline]
    pub fn store<T: Primitive>(
        &mut self,
        addr: u64,
        value: T,
        order: Endian,
        attrs: MemTxAttrs,
    ) -> MemTxResult {
        let order = order.resolve(self.target_endian);
        let view = self.cache.load();
        let range = view.lookup(addr);
        if let Some(r) = range {
            if r.is_direct_write() && avail(r, addr) >= u64::from(T::SIZE) && !attrs.memory {
                // SAFETY: the range covers `T::SIZE` bytes from `addr`, and
                // its host memory stays mapped while the range is alive.
                unsafe { value.store_to(r.host_at(addr), order) };
                r.mark_dirty(addr, u64::from(T::SIZE));
                return MemTxResult::OK;
            }
            let size = u64::from(T::SIZE);
            // An IOMMU range is not RAM: `attrs.memory` takes the slow path.
            let hit = (!attrs.memory).then(|| {
                crate::access::iommu::cursor_hit(
                    &mut self.iotlb,
                    view,
                    r,
                    addr,
                    crate::access::iommu::IommuPerm::Write,
                    attrs,
                    |tr, ta, host, avail| {
                        (avail >= size).then(|| {
                            // SAFETY: `host` (the host address of `ta`) has
                            // `avail >= size` bytes of `tr`, a range of the
                            // target view the cursor holds.
                            unsafe { value.store_to(host, order) };
                            tr.mark_dirty(ta, size);
                            MemTxResult::OK
                        })
                    },
                )
            });
            if let Some(Some(Some(done))) = hit {
                return done;
            }
        }
        store_slow(range, addr, value, order, attrs)
    }

    /// [`AddressSpace::rmw`] through the cached view (not atomic).
    pub fn rmw<T: Primitive>(
        &mut self,
        addr: u64,
        order: Endian,
        attrs: MemTxAttrs,
        f: impl FnOnce(T) -> T,
    ) -> (T, MemTxResult) {
        let order = order.resolve(self.target_endian);
        self.view().rmw(addr, order, attrs, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_order_helpers_round_trip() {
        let mut b = [0u8; 8];
        for l in [1usize, 2, 4, 8] {
            let v = 0x1122_3344_5566_7788u64 & if l == 8 { u64::MAX } else { (1 << (l * 8)) - 1 };
            stn_he(&mut b, l, v);
            assert_eq!(ldn_he(&b, l), v);
        }
    }

    #[test]
    fn ram_device_ops_reject_out_of_bounds() {
        let mut mem = [0u8; 8];
        let ops = RamDeviceOps {
            base: mem.as_mut_ptr(),
            len: 8,
        };
        assert!(ops
            .write(4, 0xdead_beef, 4, MemTxAttrs::UNSPECIFIED)
            .is_ok());
        assert_eq!(ops.read(4, 4, MemTxAttrs::UNSPECIFIED), Ok(0xdead_beef));
        assert_eq!(
            ops.read(6, 4, MemTxAttrs::UNSPECIFIED),
            Err(MemTxResult::DECODE_ERROR)
        );
        assert_eq!(
            ops.write(u64::MAX, 1, 2, MemTxAttrs::UNSPECIFIED),
            MemTxResult::DECODE_ERROR
        );
        assert_eq!(
            ops.read(0, 3, MemTxAttrs::UNSPECIFIED),
            Err(MemTxResult::DECODE_ERROR)
        );
    }
}
