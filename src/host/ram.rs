//! Host memory behind RAM and ROM regions.
//!
//! A [`RamBlock`] owns one host mapping of `size` bytes (the equivalent of a
//! QEMU `RAMBlock`'s `host` pointer). It is created zero-filled by
//! [`RamBlock::new`] and unmapped exactly once by `Drop`.
//!
//! # Invariants
//!
//! * `size > 0` and `size <= usize::MAX` (checked by [`RamBlock::new`]).
//! * The mapping starting at `ptr` is valid for reads and writes of `size`
//!   bytes from the moment `new` returns until `Drop` runs; it is never moved,
//!   resized or unmapped earlier.
//! * Every access is bounds-checked (`offset + len <= size`, computed without
//!   overflow) except the `*_unchecked` methods, whose callers must prove the
//!   range themselves (see each method's `# Safety` section).
//! * No Rust reference (`&[u8]`, `&mut [u8]`, `&T`) into guest memory is ever
//!   created. Guest RAM is written concurrently by several vCPU threads, DMA
//!   and possibly other processes (memfd backing) or the kernel (KVM), so a
//!   reference would assert immutability or uniqueness that does not hold.
//!   Every access is a copy through a raw pointer into or out of a caller
//!   buffer, and the memory is only ever touched for the duration of that copy.
//!
//! # How guest memory is accessed: per-byte relaxed atomics
//!
//! Guest memory is shared by nature: vCPU threads, DMA workers, back-ends in
//! other processes (memfd backing) and the kernel (KVM) read and write it
//! concurrently, and guests race on their own memory at will. A plain
//! (non-atomic) Rust copy that races with another access is a data race,
//! which is undefined behaviour in the Rust memory model whatever the
//! hardware does; volatile copies (what vm-memory uses) are no better in
//! that model. memtree therefore gives every access to guest memory the
//! semantics of **a sequence of relaxed atomic byte loads or stores**
//! (what the proposed `AtomicPerByte` of Rust RFC 3301 names): racing
//! accesses are never undefined behaviour; a racing reader may see any mix
//! of old and new bytes (a torn value, exactly what a guest sees on real
//! hardware and in QEMU), never a value no writer wrote to a byte. Only the
//! functions of this section touch guest memory ([`copy_from_guest`],
//! [`copy_to_guest`], [`load_guest`], [`store_guest`]); every other module
//! (dispatch, DMA mappings, caches, RAM devices) calls them.
//!
//! How the semantics are implemented:
//!
//! * **x86-64 (production):** inline assembly: for buffer copies, two
//!   overlapping `mov`s below 16 bytes, two overlapping 16-byte `movdqu`s
//!   below 32 bytes, and from 32 bytes on a loop of 32-byte `vmovdqu`s
//!   whose stores are aligned to 32 bytes (when the CPU has AVX, detected
//!   once at run time; without AVX, 16-byte `movdqu`s below 2 KiB and
//!   `rep movsb` from 2 KiB on); a single `mov` of 1, 2, 4 or 8 bytes for
//!   typed accesses. The
//!   compiler treats an `asm!` block as an opaque operation whose effect
//!   must be expressible in the abstract machine; on x86 every byte of a
//!   `mov`/`movdqu`/`vmovdqu`/`movs` is single-copy atomic, so the block's
//!   effect *is* a sequence of relaxed byte atomics, and no Rust-level data
//!   race exists. It is also fast: an L1-resident copy is bound by one
//!   store per cycle, so 32-byte stores aligned to 32 bytes beat both
//!   16-byte moves (2x more stores) and `rep movsb` (start-up cost, and
//!   slower when source and destination are misaligned to each other): a
//!   4 KiB copy takes about 35 ns where glibc's `memcpy` (`rep movsb` at
//!   that size) takes about 42 (Zen 4; `benches/dispatch.rs`, `ram_4k`).
//!   Short copies take a few moves, and a typed load is one `mov` as
//!   before.
//! * **Miri and other architectures:** literally one relaxed `AtomicU8`
//!   load or store per byte, so Miri checks the whole data plane's race
//!   freedom (`concurrency_dma_mappings_race_device_unplug` runs clean under
//!   Miri). Byte-sized atomics everywhere, never wider ones: guests mix
//!   access sizes on the same bytes, and mixed-size atomics are not defined
//!   either. This path is slower (no wide copies); an architecture that
//!   matters gets its own `asm!` path like x86-64.
//!
//! These accesses are not ordered with anything (relaxed): ordering between
//! guest memory and other state is established by whatever synchronises the
//! threads (the view publication, locks, the caller's own fences), as on
//! hardware. Callers that need single-copy atomicity wider than a byte
//! (emulated guest atomics) build it on [`RamBlock::host_addr`] themselves.
//!
//! # Backing
//!
//! * [`RamBacking::Anonymous`]: `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`.
//! * [`RamBacking::Memfd`]: a `memfd_create` file of `size` bytes mapped
//!   `MAP_SHARED | MAP_NORESERVE`, so the same memory can be mapped a second
//!   time (by this or another process, e.g. vhost-user) via [`RamBlock::fd`].
//!
//! Under Miri (`cfg(miri)`) `mmap` and `memfd_create` are unavailable: both
//! backings fall back to a zeroed, page-aligned heap allocation and
//! [`RamBlock::fd`] returns `None`.

use std::fmt;
use std::marker::PhantomData;
use std::os::fd::BorrowedFd;
#[cfg(not(miri))]
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;

/// How the host memory of a [`RamBlock`] is obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RamBacking {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`).
    Anonymous,
    /// A memfd mapped `MAP_SHARED`; the fd can be shared with another process
    /// or mapped a second time.
    Memfd,
}

/// Errors of [`RamBlock`] and [`RamSlice`] operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RamError {
    /// `offset + len` exceeds the size of the block (or overflows `u64`).
    #[error("access of {len:#x} bytes at offset {offset:#x} is outside RAM of size {size:#x}")]
    OutOfBounds {
        /// Start offset of the access.
        offset: u64,
        /// Length of the access in bytes.
        len: u64,
        /// Size of the block or slice.
        size: u64,
    },
    /// A RAM block must have a non-zero size.
    #[error("RAM block size must be non-zero")]
    ZeroSize,
    /// The size does not fit the host address space.
    #[error("RAM block size {size:#x} does not fit the host address space")]
    TooLarge {
        /// Requested size.
        size: u64,
    },
    /// Creating or sizing the memfd failed.
    #[error("cannot create memfd for RAM block: {0}")]
    Memfd(#[source] std::io::Error),
    /// Mapping the memory failed.
    #[error("cannot map RAM block: {0}")]
    Map(#[source] std::io::Error),
}

/// Checks `offset + len <= size` without overflow.
#[inline]
fn check_range(offset: u64, len: u64, size: u64) -> Result<(), RamError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(RamError::OutOfBounds { offset, len, size }),
    }
}

// ---------------------------------------------------------------------------
// The only code that touches guest memory (see "How guest memory is
// accessed" in the module docs).
// ---------------------------------------------------------------------------

/// Without AVX, copies of at least this many bytes use `rep movsb`, which
/// has a start-up cost of tens of cycles but then moves whole cache lines
/// (ERMSB/FSRM); shorter ones use 16-byte SSE moves. glibc's `memcpy`
/// switches to `rep movsb` at about the same size on FSRM machines.
#[cfg(all(target_arch = "x86_64", not(miri)))]
const REP_MOVSB_MIN: usize = 2048;

/// Copies of at least this many bytes use [`avx_copy`] when the CPU has
/// AVX: one 32-byte `vmovdqu` covers the head and one the tail, so every
/// length from 32 on is exact.
#[cfg(all(target_arch = "x86_64", not(miri)))]
const AVX_COPY_MIN: usize = 32;

/// Whether the CPU and the OS support AVX (256-bit registers saved by the
/// kernel). std detects the features once and caches them: after the first
/// call this is a load and a bit test, and a compile-time `true` when the
/// crate is built with AVX enabled.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline(always)]
fn has_avx() -> bool {
    std::arch::is_x86_feature_detected!("avx")
}

/// `N`-byte (1, 2, 4, 8 or 16) move from `src` to `dst` in one load and
/// one store instruction.
///
/// # Safety
///
/// `src` is readable and `dst` writable for `N` bytes.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline(always)]
unsafe fn asm_move<const N: usize>(src: *const u8, dst: *mut u8) {
    use std::arch::asm;
    // SAFETY: each arm reads exactly `N` bytes at `src` and writes them at
    // `dst` (per the contract), any alignment, touching no stack and no
    // flags.
    unsafe {
        match N {
            1 => asm!("movzx {t:e}, byte ptr [{s}]", "mov byte ptr [{d}], {t:l}",
                s = in(reg) src, d = in(reg) dst, t = out(reg) _,
                options(nostack, preserves_flags)),
            2 => asm!("movzx {t:e}, word ptr [{s}]", "mov word ptr [{d}], {t:x}",
                s = in(reg) src, d = in(reg) dst, t = out(reg) _,
                options(nostack, preserves_flags)),
            4 => asm!("mov {t:e}, dword ptr [{s}]", "mov dword ptr [{d}], {t:e}",
                s = in(reg) src, d = in(reg) dst, t = out(reg) _,
                options(nostack, preserves_flags)),
            8 => asm!("mov {t}, qword ptr [{s}]", "mov qword ptr [{d}], {t}",
                s = in(reg) src, d = in(reg) dst, t = out(reg) _,
                options(nostack, preserves_flags)),
            _ => asm!("movdqu {x}, xmmword ptr [{s}]", "movdqu xmmword ptr [{d}], {x}",
                s = in(reg) src, d = in(reg) dst, x = out(xmm_reg) _,
                options(nostack, preserves_flags)),
        }
    }
}

/// The x86-64 copy behind [`copy_from_guest`] and [`copy_to_guest`]: every
/// byte of `src` is loaded by a `mov`/`movdqu`/`vmovdqu`/`movs` and stored
/// at the same offset of `dst` (single-copy atomic per byte). From
/// [`AVX_COPY_MIN`] bytes on [`avx_copy`] when the CPU has AVX, otherwise
/// [`sse_copy`].
///
/// # Safety
///
/// `src` is readable and `dst` writable for `len` bytes; they do not
/// overlap.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline(always)]
unsafe fn asm_copy(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: both copies have this function's contract; `avx_copy` also
    // needs `len >= 32` and AVX, both checked here.
    unsafe {
        if len >= AVX_COPY_MIN && has_avx() {
            avx_copy(src, dst, len)
        } else {
            sse_copy(src, dst, len)
        }
    }
}

/// The copy for `len >= 32` on a CPU with AVX: the first and the last 32
/// bytes with one unaligned `vmovdqu` each, and everything between with
/// 32-byte `vmovdqu`s whose stores are aligned to 32 bytes (4 per loop
/// iteration, then single ones). Pieces overlap by up to 32 bytes; bytes in
/// an overlap are copied twice, which per-byte relaxed semantics allow (the
/// same source byte is loaded again and stored again at the same offset).
///
/// Measured on Zen 4 against `rep movsb` (what glibc's `memcpy` runs from
/// 2 KiB on) from 32 bytes to 4 MiB, page-aligned guest memory and a heap
/// buffer: as fast or faster at every size (4 KiB: 35 ns against 41–45),
/// and twice as fast as 16-byte moves. It also avoids a `rep movsb` cliff:
/// when the destination lies a few bytes after the source modulo 4 KiB,
/// `rep movsb` of 4 KiB takes over 1 µs there (`ram_sizes/*-skewed`), this
/// loop about 50 ns.
///
/// # Safety
///
/// As [`asm_copy`], and `len >= 32`, and the CPU supports AVX
/// ([`has_avx`]).
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline(always)]
unsafe fn avx_copy(src: *const u8, dst: *mut u8, len: usize) {
    debug_assert!(len >= 32);
    // SAFETY: with `len >= 32` every access stays inside `[0, len)` of both
    // ranges (readable at `src`, writable at `dst` per the contract):
    // - the head `[0, 32)` and the tail `[len - 32, len)`;
    // - then `adv = 32 - (dst % 32)` (1..=32, so `adv <= len`) is skipped,
    //   and with `rcx = len - adv` bytes left, the loops move 128 bytes
    //   while `rcx >= 128` and 32 bytes while `rcx > 32`, each inside what
    //   is left; the at most 32 bytes left after them lie inside the tail,
    //   which is stored last.
    // The block reads only `src`, writes only `dst`, uses no stack, and
    // declares every caller-saved register clobbered (`clobber_abi`), all
    // of xmm0-15/ymm0-15 included: it uses ymm0-5, rax and r8, and
    // `vzeroupper` (which clears the upper halves of ymm0-15, avoiding the
    // SSE/AVX transition penalty on Intel after this block) can destroy
    // nothing the compiler keeps. "sysv64" is the ABI whose clobber list
    // covers all sixteen vector registers on every x86-64 target.
    unsafe {
        std::arch::asm!(
            "vmovdqu ymm0, ymmword ptr [rsi]",
            "vmovdqu ymm1, ymmword ptr [rsi + rcx - 32]",
            "lea r8, [rdi + rcx - 32]",
            "vmovdqu ymmword ptr [rdi], ymm0",
            // rax = (dst % 32) - 32 = -adv
            "mov eax, edi",
            "and eax, 31",
            "sub rax, 32",
            "sub rsi, rax",
            "sub rdi, rax",
            "add rcx, rax",
            "cmp rcx, 128",
            "jb 3f",
            "2:",
            "vmovdqu ymm2, ymmword ptr [rsi]",
            "vmovdqu ymm3, ymmword ptr [rsi + 32]",
            "vmovdqu ymm4, ymmword ptr [rsi + 64]",
            "vmovdqu ymm5, ymmword ptr [rsi + 96]",
            "vmovdqa ymmword ptr [rdi], ymm2",
            "vmovdqa ymmword ptr [rdi + 32], ymm3",
            "vmovdqa ymmword ptr [rdi + 64], ymm4",
            "vmovdqa ymmword ptr [rdi + 96], ymm5",
            "add rsi, 128",
            "add rdi, 128",
            "sub rcx, 128",
            "cmp rcx, 128",
            "jae 2b",
            "3:",
            "cmp rcx, 32",
            "jbe 5f",
            "4:",
            "vmovdqu ymm2, ymmword ptr [rsi]",
            "vmovdqa ymmword ptr [rdi], ymm2",
            "add rsi, 32",
            "add rdi, 32",
            "sub rcx, 32",
            "cmp rcx, 32",
            "ja 4b",
            "5:",
            "vmovdqu ymmword ptr [r8], ymm1",
            "vzeroupper",
            inout("rsi") src => _,
            inout("rdi") dst => _,
            inout("rcx") len => _,
            clobber_abi("sysv64"),
            options(nostack)
        );
    }
}

/// The copy without AVX (and below 32 bytes): short copies use two
/// overlapping moves (the bytes in the overlap are copied twice, which
/// per-byte relaxed semantics allow: the same value is stored again),
/// longer ones 16-byte moves, long ones `rep movsb`.
///
/// # Safety
///
/// As [`asm_copy`].
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline(always)]
unsafe fn sse_copy(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: every move below stays inside `[0, len)` of both ranges (per
    // the contract readable at `src`, writable at `dst`): the offsets used
    // are `0`, `len - N` with `N <= len`, and `i` with `i + 16 <= len`.
    unsafe {
        if len >= REP_MOVSB_MIN {
            // `rep movsb` copies exactly `rcx` bytes from `rsi` to `rdi`,
            // forwards (the direction flag is clear on entry to an `asm!`
            // block, as Rust guarantees).
            std::arch::asm!(
                "rep movsb",
                inout("rcx") len => _,
                inout("rsi") src => _,
                inout("rdi") dst => _,
                options(nostack, preserves_flags)
            );
        } else if len >= 16 {
            let mut i = 0;
            while i + 16 <= len {
                asm_move::<16>(src.add(i), dst.add(i));
                i += 16;
            }
            if i < len {
                asm_move::<16>(src.add(len - 16), dst.add(len - 16));
            }
        } else if len >= 8 {
            asm_move::<8>(src, dst);
            asm_move::<8>(src.add(len - 8), dst.add(len - 8));
        } else if len >= 4 {
            asm_move::<4>(src, dst);
            asm_move::<4>(src.add(len - 4), dst.add(len - 4));
        } else if len >= 2 {
            asm_move::<2>(src, dst);
            asm_move::<2>(src.add(len - 2), dst.add(len - 2));
        } else if len == 1 {
            asm_move::<1>(src, dst);
        }
    }
}

/// Copies `len` bytes of guest memory at `src` into `dst`, with the
/// semantics of per-byte relaxed atomic loads (see the
/// [module docs](self#how-guest-memory-is-accessed-per-byte-relaxed-atomics)).
///
/// # Safety
///
/// `src` is valid for reads of `len` bytes of memory that is only ever
/// accessed through this section's functions, other atomics, other
/// processes or the kernel (never through Rust references or plain
/// copies); `dst` is valid for writes of `len` bytes and does not overlap
/// `src`; nothing else accesses `dst` during the call.
#[inline(always)]
pub unsafe fn copy_from_guest(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: the contract of `asm_copy` is this function's.
    unsafe {
        asm_copy(src, dst, len)
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    for i in 0..len {
        // SAFETY: `i < len`, so both bytes are inside the ranges the caller
        // vouches for; `AtomicU8` has alignment 1; the transient
        // `&AtomicU8` asserts only that the byte is dereferenceable, and
        // every concurrent access to it is atomic per the contract.
        unsafe {
            let b = std::sync::atomic::AtomicU8::from_ptr(src.add(i).cast_mut())
                .load(std::sync::atomic::Ordering::Relaxed);
            dst.add(i).write(b);
        }
    }
}

/// Copies `len` bytes from `src` into guest memory at `dst`, with the
/// semantics of per-byte relaxed atomic stores.
///
/// # Safety
///
/// As [`copy_from_guest`] with the roles swapped: `dst` is valid for writes
/// of `len` bytes of guest memory (only accessed atomically, by other
/// processes or by the kernel); `src` is valid for reads of `len` bytes,
/// does not overlap `dst`, and nothing writes it during the call.
#[inline(always)]
pub unsafe fn copy_to_guest(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: the contract of `asm_copy` is this function's.
    unsafe {
        asm_copy(src, dst, len)
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    for i in 0..len {
        // SAFETY: as in `copy_from_guest`, with the copy reversed.
        unsafe {
            let b = src.add(i).read();
            std::sync::atomic::AtomicU8::from_ptr(dst.add(i))
                .store(b, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Loads `N` bytes of guest memory at `src` (any alignment), in memory
/// order, with the semantics of per-byte relaxed atomic loads. For `N` of
/// 1, 2, 4 or 8 this is one `mov` on x86-64.
///
/// # Safety
///
/// `src` is valid for reads of `N` bytes of guest memory, as for
/// [`copy_from_guest`].
#[inline(always)]
pub unsafe fn load_guest<const N: usize>(src: *const u8) -> [u8; N] {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    if matches!(N, 1 | 2 | 4 | 8) {
        let v: u64;
        // SAFETY: `src` is readable for `N` bytes (the contract); each arm
        // reads exactly `N` bytes and zero-extends into a register; x86
        // allows any alignment.
        unsafe {
            match N {
                1 => {
                    std::arch::asm!("movzx {v:e}, byte ptr [{p}]", p = in(reg) src, v = out(reg) v,
                    options(nostack, readonly, preserves_flags))
                }
                2 => {
                    std::arch::asm!("movzx {v:e}, word ptr [{p}]", p = in(reg) src, v = out(reg) v,
                    options(nostack, readonly, preserves_flags))
                }
                4 => std::arch::asm!("mov {v:e}, dword ptr [{p}]", p = in(reg) src, v = out(reg) v,
                    options(nostack, readonly, preserves_flags)),
                _ => std::arch::asm!("mov {v}, qword ptr [{p}]", p = in(reg) src, v = out(reg) v,
                    options(nostack, readonly, preserves_flags)),
            }
        }
        let mut out = [0u8; N];
        // x86 is little endian: the first `N` bytes of `v` are memory order.
        out.copy_from_slice(&v.to_le_bytes()[..N]);
        return out;
    }
    let mut out = [0u8; N];
    // SAFETY: `src` per the contract; `out` is a local buffer.
    unsafe { copy_from_guest(src, out.as_mut_ptr(), N) };
    out
}

/// Stores `bytes` (in memory order) into guest memory at `dst` (any
/// alignment), with the semantics of per-byte relaxed atomic stores. For
/// `N` of 1, 2, 4 or 8 this is one `mov` on x86-64.
///
/// # Safety
///
/// `dst` is valid for writes of `N` bytes of guest memory, as for
/// [`copy_to_guest`].
#[inline(always)]
pub unsafe fn store_guest<const N: usize>(dst: *mut u8, bytes: [u8; N]) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    if matches!(N, 1 | 2 | 4 | 8) {
        let mut wide = [0u8; 8];
        wide[..N].copy_from_slice(&bytes);
        let v = u64::from_le_bytes(wide);
        // SAFETY: `dst` is writable for `N` bytes (the contract); each arm
        // writes exactly the low `N` bytes of `v`; any alignment.
        unsafe {
            match N {
                1 => std::arch::asm!("mov byte ptr [{p}], {v:l}", p = in(reg) dst, v = in(reg) v,
                    options(nostack, preserves_flags)),
                2 => std::arch::asm!("mov word ptr [{p}], {v:x}", p = in(reg) dst, v = in(reg) v,
                    options(nostack, preserves_flags)),
                4 => std::arch::asm!("mov dword ptr [{p}], {v:e}", p = in(reg) dst, v = in(reg) v,
                    options(nostack, preserves_flags)),
                _ => std::arch::asm!("mov qword ptr [{p}], {v}", p = in(reg) dst, v = in(reg) v,
                    options(nostack, preserves_flags)),
            }
        }
        return;
    }
    // SAFETY: `dst` per the contract; `bytes` is a local buffer.
    unsafe { copy_to_guest(bytes.as_ptr(), dst, N) };
}

#[cfg(test)]
thread_local! {
    /// Number of mappings released by `Drop` on this thread (test only).
    static RELEASED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Host memory of one RAM/ROM region.
///
/// See the [module documentation](self) for the invariants.
pub struct RamBlock {
    name: String,
    size: u64,
    backing: RamBacking,
    /// Start of the mapping; valid for `size` bytes until `Drop`.
    ptr: NonNull<u8>,
    #[cfg(not(miri))]
    fd: Option<OwnedFd>,
    /// Dirty bitmaps of this memory (`crate::host::dirty_bitmap`).
    dirty: std::sync::Arc<crate::host::dirty_bitmap::BlockDirty>,
}

// SAFETY: `RamBlock` owns its mapping exclusively (no other `RamBlock` refers
// to it) and all access goes through raw-pointer copies, so moving the owner
// to another thread is sound; `OwnedFd` and `String` are `Send`.
unsafe impl Send for RamBlock {}
// SAFETY: shared access only performs raw-pointer copies into/out of the
// mapping (never creates references into it), which are valid from any
// thread; concurrent guest-level races are documented in the module docs.
unsafe impl Sync for RamBlock {}

impl fmt::Debug for RamBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamBlock")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("backing", &self.backing)
            .field("host_addr", &self.ptr)
            .finish()
    }
}

#[cfg(miri)]
fn heap_layout(len: usize) -> Result<std::alloc::Layout, RamError> {
    std::alloc::Layout::from_size_align(len, 4096)
        .map_err(|_| RamError::TooLarge { size: len as u64 })
}

impl RamBlock {
    /// Allocates a zero-filled block of `size` bytes.
    ///
    /// `Anonymous` maps `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`;
    /// `Memfd` creates a memfd of `size` bytes and maps it
    /// `MAP_SHARED | MAP_NORESERVE`.
    pub fn new(name: &str, size: u64, backing: RamBacking) -> Result<RamBlock, RamError> {
        if size == 0 {
            return Err(RamError::ZeroSize);
        }
        let len = usize::try_from(size).map_err(|_| RamError::TooLarge { size })?;
        // Rust allocations and objects are limited to isize::MAX bytes;
        // keep every offset representable as a pointer offset.
        if len > isize::MAX as usize {
            return Err(RamError::TooLarge { size });
        }
        #[cfg(not(miri))]
        {
            let (ptr, fd) = Self::map(name, len, backing)?;
            Ok(RamBlock {
                name: name.to_owned(),
                size,
                backing,
                ptr,
                fd,
                dirty: std::sync::Arc::new(crate::host::dirty_bitmap::BlockDirty::new(size)),
            })
        }
        #[cfg(miri)]
        {
            let layout = heap_layout(len)?;
            // SAFETY: `layout` has a non-zero size (len > 0 checked above).
            let raw = unsafe { std::alloc::alloc_zeroed(layout) };
            let ptr = NonNull::new(raw).ok_or_else(|| {
                RamError::Map(std::io::Error::from(std::io::ErrorKind::OutOfMemory))
            })?;
            Ok(RamBlock {
                name: name.to_owned(),
                size,
                backing,
                ptr,
                dirty: std::sync::Arc::new(crate::host::dirty_bitmap::BlockDirty::new(size)),
            })
        }
    }

    #[cfg(not(miri))]
    fn map(
        name: &str,
        len: usize,
        backing: RamBacking,
    ) -> Result<(NonNull<u8>, Option<OwnedFd>), RamError> {
        use rustix::mm::{MapFlags, ProtFlags};
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        match backing {
            RamBacking::Anonymous => {
                // SAFETY: a fresh anonymous mapping with a null hint cannot
                // alias any existing memory.
                let raw = unsafe {
                    rustix::mm::mmap_anonymous(
                        std::ptr::null_mut(),
                        len,
                        prot,
                        MapFlags::PRIVATE | MapFlags::NORESERVE,
                    )
                }
                .map_err(|e| RamError::Map(e.into()))?;
                let ptr = NonNull::new(raw.cast::<u8>()).ok_or_else(|| {
                    RamError::Map(std::io::Error::other("mmap returned a null mapping"))
                })?;
                Ok((ptr, None))
            }
            RamBacking::Memfd => {
                // memfd names are informational, limited to 249 bytes and
                // must not contain NUL.
                let mut fd_name: String = name.chars().filter(|&c| c != '\0').collect();
                while fd_name.len() > 240 {
                    fd_name.pop();
                }
                let fd =
                    rustix::fs::memfd_create(fd_name.as_str(), rustix::fs::MemfdFlags::CLOEXEC)
                        .map_err(|e| RamError::Memfd(e.into()))?;
                rustix::fs::ftruncate(&fd, len as u64).map_err(|e| RamError::Memfd(e.into()))?;
                // SAFETY: a fresh shared mapping of a memfd we just created,
                // with a null hint; it cannot alias existing Rust memory.
                let raw = unsafe {
                    rustix::mm::mmap(
                        std::ptr::null_mut(),
                        len,
                        prot,
                        MapFlags::SHARED | MapFlags::NORESERVE,
                        fd.as_fd(),
                        0,
                    )
                }
                .map_err(|e| RamError::Map(e.into()))?;
                let ptr = NonNull::new(raw.cast::<u8>()).ok_or_else(|| {
                    RamError::Map(std::io::Error::other("mmap returned a null mapping"))
                })?;
                Ok((ptr, Some(fd)))
            }
        }
    }

    /// The dirty bitmaps of this memory.
    pub(crate) fn dirty_log(&self) -> &std::sync::Arc<crate::host::dirty_bitmap::BlockDirty> {
        &self.dirty
    }

    /// Name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes (always > 0).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How the memory is backed.
    pub fn backing(&self) -> RamBacking {
        self.backing
    }

    /// The memfd behind a [`RamBacking::Memfd`] block (`None` for anonymous
    /// memory, and always `None` under Miri). Mapping it `MAP_SHARED` at
    /// offset 0 gives a second view of the same memory.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        #[cfg(not(miri))]
        {
            self.fd.as_ref().map(|fd| fd.as_fd())
        }
        #[cfg(miri)]
        {
            None
        }
    }

    /// Host address of the first byte, e.g. for a KVM memory slot's
    /// `userspace_addr`.
    ///
    /// The pointer is valid for reads and writes of [`size`](Self::size)
    /// bytes until the block is dropped. Users must not create Rust
    /// references into the memory, nor plain copies (only this module's
    /// guest-memory functions, e.g. [`copy_from_guest`], or atomics), see
    /// the module documentation.
    pub fn host_addr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Copies `buf.len()` bytes starting at `offset` into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), RamError> {
        check_range(offset, buf.len() as u64, self.size)?;
        // SAFETY: range checked just above.
        unsafe { self.copy_to_unchecked(offset, buf) };
        Ok(())
    }

    /// Copies `buf` into the block starting at `offset`.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), RamError> {
        check_range(offset, buf.len() as u64, self.size)?;
        // SAFETY: range checked just above.
        unsafe { self.copy_from_unchecked(offset, buf) };
        Ok(())
    }

    /// Loads `N` bytes at `offset` (any alignment), in memory order; convert
    /// with e.g. `u32::from_le_bytes`.
    #[inline]
    pub fn load<const N: usize>(&self, offset: u64) -> Result<[u8; N], RamError> {
        check_range(offset, N as u64, self.size)?;
        // SAFETY: range checked just above.
        Ok(unsafe { self.load_unchecked::<N>(offset) })
    }

    /// Stores `N` bytes at `offset` (any alignment), in memory order.
    #[inline]
    pub fn store<const N: usize>(&self, offset: u64, bytes: [u8; N]) -> Result<(), RamError> {
        check_range(offset, N as u64, self.size)?;
        // SAFETY: range checked just above.
        unsafe { self.store_unchecked::<N>(offset, bytes) };
        Ok(())
    }

    /// Unchecked fast path of [`load`](Self::load), used by dispatch after it
    /// has proven the range is inside the block.
    ///
    /// # Safety
    ///
    /// `offset + N` must not overflow and must be `<= self.size()`.
    #[inline]
    pub unsafe fn load_unchecked<const N: usize>(&self, offset: u64) -> [u8; N] {
        debug_assert!(check_range(offset, N as u64, self.size).is_ok());
        // SAFETY: the caller guarantees `offset + N <= size <= isize::MAX`, so
        // the pointer stays inside the mapping, which is valid until Drop and
        // only ever accessed through this module's guest-memory functions.
        unsafe { load_guest::<N>(self.ptr.as_ptr().add(offset as usize)) }
    }

    /// Unchecked fast path of [`store`](Self::store).
    ///
    /// # Safety
    ///
    /// `offset + N` must not overflow and must be `<= self.size()`.
    #[inline]
    pub unsafe fn store_unchecked<const N: usize>(&self, offset: u64, bytes: [u8; N]) {
        debug_assert!(check_range(offset, N as u64, self.size).is_ok());
        // SAFETY: the caller guarantees `offset + N <= size`, so the pointer
        // stays inside the writable mapping, valid until Drop.
        unsafe { store_guest::<N>(self.ptr.as_ptr().add(offset as usize), bytes) }
    }

    /// Copies `dst.len()` bytes starting at `offset` into `dst`, unchecked.
    ///
    /// # Safety
    ///
    /// `offset + dst.len()` must not overflow and must be `<= self.size()`.
    /// (`dst` cannot overlap the block because no Rust reference into guest
    /// memory may exist, see the module documentation.)
    #[inline]
    pub unsafe fn copy_to_unchecked(&self, offset: u64, dst: &mut [u8]) {
        debug_assert!(check_range(offset, dst.len() as u64, self.size).is_ok());
        // SAFETY: the source range is inside the mapping per the caller's
        // contract; `dst` is a valid exclusive Rust buffer, which by the
        // module invariant never points into guest memory, so the ranges do
        // not overlap.
        unsafe {
            copy_from_guest(
                self.ptr.as_ptr().add(offset as usize),
                dst.as_mut_ptr(),
                dst.len(),
            )
        }
    }

    /// Copies `src` into the block starting at `offset`, unchecked.
    ///
    /// # Safety
    ///
    /// `offset + src.len()` must not overflow and must be `<= self.size()`.
    /// (`src` cannot overlap the block because no Rust reference into guest
    /// memory may exist, see the module documentation.)
    #[inline]
    pub unsafe fn copy_from_unchecked(&self, offset: u64, src: &[u8]) {
        debug_assert!(check_range(offset, src.len() as u64, self.size).is_ok());
        // SAFETY: the destination range is inside the writable mapping per
        // the caller's contract; `src` is a valid Rust buffer which never
        // points into guest memory, so the ranges do not overlap.
        unsafe {
            copy_to_guest(
                src.as_ptr(),
                self.ptr.as_ptr().add(offset as usize),
                src.len(),
            )
        }
    }

    /// A bounds-checked view of `len` bytes starting at `offset`, borrowing
    /// the block (so it cannot outlive the mapping).
    pub fn slice(&self, offset: u64, len: u64) -> Result<RamSlice<'_>, RamError> {
        check_range(offset, len, self.size)?;
        // SAFETY: `offset <= size`, so the result is inside the mapping or one
        // past its end, and non-null because the mapping start is non-null
        // and the offset does not wrap.
        let ptr = unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(offset as usize)) };
        Ok(RamSlice {
            ptr,
            len: len as usize,
            _block: PhantomData,
        })
    }
}

impl Drop for RamBlock {
    fn drop(&mut self) {
        #[cfg(not(miri))]
        {
            // SAFETY: `ptr`/`size` describe exactly the mapping created in
            // `new`, which is unmapped only here (Drop runs once); no
            // reference into it exists and `RamSlice`s borrow `self`, so none
            // is alive.
            let r = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.size as usize) };
            debug_assert!(r.is_ok(), "munmap failed: {r:?}");
            // The memfd (if any) is closed when `self.fd` drops.
        }
        #[cfg(miri)]
        {
            let layout = heap_layout(self.size as usize).expect("layout was valid in new()");
            // SAFETY: allocated in `new` with this same layout and freed only
            // here.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
        #[cfg(test)]
        RELEASED.with(|c| c.set(c.get() + 1));
    }
}

/// A bounds-checked window into a [`RamBlock`], e.g. held by a DMA mapping
/// guard. It borrows the block, so the memory stays mapped while it exists.
///
/// Like `RamBlock` it never hands out Rust references into guest memory: data
/// moves only by copy, and [`as_ptr`](Self::as_ptr) gives a raw pointer.
#[derive(Clone, Copy)]
pub struct RamSlice<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _block: PhantomData<&'a RamBlock>,
}

// SAFETY: a `RamSlice` is a shared borrow of a `Sync` `RamBlock` restricted to
// a sub-range; it performs the same raw-pointer copies.
unsafe impl Send for RamSlice<'_> {}
// SAFETY: as for `Send`; `&RamSlice` only allows raw-pointer copies.
unsafe impl Sync for RamSlice<'_> {}

impl fmt::Debug for RamSlice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamSlice")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

impl<'a> RamSlice<'a> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw pointer to the first byte; valid for `len()` bytes while the
    /// slice's borrow of the block lasts. Do not create references from it;
    /// access it with this module's guest-memory functions.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Copies `buf.len()` bytes at `offset` (relative to the window) into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), RamError> {
        check_range(offset, buf.len() as u64, self.len as u64)?;
        // SAFETY: the range is inside the window, which is inside the
        // mapping kept alive by the `'a` borrow; `buf` is a Rust buffer and
        // so does not overlap guest memory.
        unsafe {
            copy_from_guest(
                self.ptr.as_ptr().add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// Copies `buf` into the window at `offset`.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), RamError> {
        check_range(offset, buf.len() as u64, self.len as u64)?;
        // SAFETY: as in `read`, with the copy direction reversed; the mapping
        // is writable.
        unsafe {
            copy_to_guest(
                buf.as_ptr(),
                self.ptr.as_ptr().add(offset as usize),
                buf.len(),
            )
        };
        Ok(())
    }

    /// A narrower window of `len` bytes at `offset` within this one.
    pub fn subslice(&self, offset: u64, len: u64) -> Result<RamSlice<'a>, RamError> {
        check_range(offset, len, self.len as u64)?;
        // SAFETY: `offset <= self.len`, so the pointer stays inside (or one
        // past) the window and does not wrap to null.
        let ptr = unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(offset as usize)) };
        Ok(RamSlice {
            ptr,
            len: len as usize,
            _block: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(not(miri))]
    use std::ptr;

    fn backings() -> [RamBacking; 2] {
        [RamBacking::Anonymous, RamBacking::Memfd]
    }

    #[test]
    fn zero_filled_after_new() {
        for b in backings() {
            let ram = RamBlock::new("zero", 8192, b).unwrap();
            assert_eq!(ram.size(), 8192);
            assert_eq!(ram.name(), "zero");
            assert_eq!(ram.backing(), b);
            let mut buf = vec![0xaa; 8192];
            ram.read(0, &mut buf).unwrap();
            assert!(buf.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn write_read_round_trip() {
        for b in backings() {
            let ram = RamBlock::new("rt", 4096, b).unwrap();
            ram.write(100, b"hello guest").unwrap();
            let mut buf = [0u8; 11];
            ram.read(100, &mut buf).unwrap();
            assert_eq!(&buf, b"hello guest");

            // Unaligned typed accesses.
            ram.store(4093, [0xef, 0xbe, 0xad]).unwrap();
            ram.store(1, 0x1122_3344_5566_7788_u64.to_le_bytes())
                .unwrap();
            assert_eq!(
                u64::from_le_bytes(ram.load(1).unwrap()),
                0x1122_3344_5566_7788
            );
            assert_eq!(u32::from_le_bytes(ram.load(3).unwrap()), 0x3344_5566);
            assert_eq!(ram.load::<1>(8).unwrap(), [0x11]);
            assert_eq!(ram.load::<3>(4093).unwrap(), [0xef, 0xbe, 0xad]);

            // Last byte is reachable, empty accesses at the end are fine.
            ram.write(4095, &[7]).unwrap();
            assert_eq!(ram.load::<1>(4095).unwrap(), [7]);
            ram.write(4096, &[]).unwrap();
        }
    }

    #[test]
    fn out_of_bounds() {
        let ram = RamBlock::new("oob", 4096, RamBacking::Anonymous).unwrap();
        let oob = |r: Result<(), RamError>, o: u64, l: u64| match r {
            Err(RamError::OutOfBounds { offset, len, size }) => {
                assert_eq!((offset, len, size), (o, l, 4096));
            }
            other => panic!("expected OutOfBounds, got {other:?}"),
        };
        let mut buf = [0u8; 8];
        oob(ram.read(4089, &mut buf), 4089, 8);
        oob(ram.write(4096, &[1]), 4096, 1);
        oob(ram.write(u64::MAX, &[1]), u64::MAX, 1);
        oob(ram.read(u64::MAX - 3, &mut buf), u64::MAX - 3, 8);
        oob(ram.load::<4>(u64::MAX - 1).map(|_| ()), u64::MAX - 1, 4);
        oob(ram.store::<8>(4092, [0; 8]), 4092, 8);
        oob(ram.slice(4000, 97).map(|_| ()), 4000, 97);
        oob(ram.slice(1, u64::MAX).map(|_| ()), 1, u64::MAX);
        // Nothing was written by the failed accesses.
        let mut all = vec![0xffu8; 4096];
        ram.read(0, &mut all).unwrap();
        assert!(all.iter().all(|&x| x == 0));
    }

    #[test]
    fn zero_size() {
        for b in backings() {
            assert!(matches!(RamBlock::new("z", 0, b), Err(RamError::ZeroSize)));
        }
    }

    #[test]
    fn too_large() {
        assert!(matches!(
            RamBlock::new("big", u64::MAX, RamBacking::Anonymous),
            Err(RamError::TooLarge { .. })
        ));
    }

    #[test]
    fn unchecked_paths() {
        let ram = RamBlock::new("u", 64, RamBacking::Anonymous).unwrap();
        // SAFETY: all ranges below are inside the 64-byte block.
        unsafe {
            ram.store_unchecked(60, 0xa1b2_c3d4_u32.to_be_bytes());
            assert_eq!(u32::from_be_bytes(ram.load_unchecked(60)), 0xa1b2_c3d4);
            ram.copy_from_unchecked(0, &[1, 2, 3]);
            let mut buf = [0u8; 3];
            ram.copy_to_unchecked(0, &mut buf);
            assert_eq!(buf, [1, 2, 3]);
        }
    }

    #[test]
    fn slice_view() {
        let ram = RamBlock::new("s", 4096, RamBacking::Anonymous).unwrap();
        let s = ram.slice(1000, 16).unwrap();
        assert_eq!(s.len(), 16);
        assert!(!s.is_empty());
        assert_eq!(s.as_ptr() as usize, ram.host_addr() as usize + 1000);
        s.write(4, &[9, 8, 7]).unwrap();
        let mut buf = [0u8; 3];
        ram.read(1004, &mut buf).unwrap();
        assert_eq!(buf, [9, 8, 7]);
        ram.write(1015, &[42]).unwrap();
        let mut one = [0u8];
        s.read(15, &mut one).unwrap();
        assert_eq!(one, [42]);
        assert!(matches!(
            s.write(15, &[1, 2]),
            Err(RamError::OutOfBounds { size: 16, .. })
        ));
        assert!(matches!(
            s.read(u64::MAX, &mut one),
            Err(RamError::OutOfBounds { .. })
        ));
        let sub = s.subslice(4, 4).unwrap();
        sub.read(0, &mut buf).unwrap();
        assert_eq!(buf, [9, 8, 7]);
        assert!(s.subslice(10, 7).is_err());
        assert!(ram.slice(4096, 0).unwrap().is_empty());
    }

    #[test]
    fn concurrent_disjoint_writers() {
        let ram = RamBlock::new("mt", 4096, RamBacking::Anonymous).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let ram = &ram;
                s.spawn(move || {
                    for i in 0..16u64 {
                        ram.store(t * 1024 + i * 8, (t << 32 | i).to_le_bytes())
                            .unwrap();
                    }
                });
            }
        });
        for t in 0..4u64 {
            for i in 0..16u64 {
                let v = u64::from_le_bytes(ram.load(t * 1024 + i * 8).unwrap());
                assert_eq!(v, t << 32 | i);
            }
        }
    }

    #[test]
    fn guest_copies_of_every_length_copy_exactly_those_bytes() {
        // Small under Miri, where every byte copied is an atomic access.
        let size = if cfg!(miri) { 512 } else { 8192 };
        let ram = RamBlock::new("copies", size as u64, RamBacking::Anonymous).unwrap();
        let pattern: Vec<u8> = (0..size as u32).map(|i| (i * 7 + 3) as u8).collect();
        let lens: Vec<usize> = if cfg!(miri) {
            (0..20).chain([31, 32, 33, 255]).collect()
        } else {
            (0..=300)
                .chain([1023, 2047, 2048, 2049, 4095, 4096, 4097])
                .collect()
        };
        for &len in &lens {
            for off in [0usize, 1, 13] {
                // Into guest memory: exactly `len` bytes at `off + 100` change.
                ram.write(0, &vec![0xee; size]).unwrap();
                ram.write(off as u64 + 100, &pattern[..len]).unwrap();
                let mut all = vec![0u8; size];
                ram.read(0, &mut all).unwrap();
                let at = off + 100;
                assert!(all[..at].iter().all(|&b| b == 0xee), "len {len}");
                assert_eq!(&all[at..at + len], &pattern[..len], "len {len}");
                assert!(all[at + len..].iter().all(|&b| b == 0xee), "len {len}");
                // Out of guest memory: exactly `len` bytes of the buffer.
                let mut buf = vec![0x55u8; len + 32];
                ram.read(at as u64, &mut buf[off..off + len]).unwrap();
                assert!(buf[..off].iter().all(|&b| b == 0x55));
                assert_eq!(&buf[off..off + len], &pattern[..len], "len {len}");
                assert!(buf[off + len..].iter().all(|&b| b == 0x55));
            }
        }
        // Typed accesses of every width at odd offsets.
        ram.store(401, 0x1122_3344_5566_7788_u64.to_le_bytes())
            .unwrap();
        assert_eq!(
            ram.load::<8>(401).unwrap(),
            0x1122_3344_5566_7788_u64.to_le_bytes()
        );
        assert_eq!(ram.load::<4>(403).unwrap(), [0x66, 0x55, 0x44, 0x33]);
        assert_eq!(ram.load::<2>(407).unwrap(), [0x22, 0x11]);
        ram.store(402, [0xab, 0xcd]).unwrap();
        ram.store(404, [0xef]).unwrap();
        ram.store(405, [1, 2, 3]).unwrap();
        assert_eq!(
            ram.load::<8>(401).unwrap(),
            [0x88, 0xab, 0xcd, 0xef, 1, 2, 3, 0x11]
        );
    }

    /// A copy routine under test: its name, the copy into guest memory, the
    /// copy out of it, and the shortest length it accepts.
    type CopyRoutine = (
        &'static str,
        unsafe fn(*const u8, *mut u8, usize),
        unsafe fn(*const u8, *mut u8, usize),
        usize,
    );

    /// Every copy routine compiled for this target (the public pair, and
    /// natively each x86-64 strategy on its own, so a machine with AVX also
    /// checks the fallback).
    fn copy_routines() -> Vec<CopyRoutine> {
        #[allow(unused_mut)]
        let mut routines: Vec<CopyRoutine> = vec![("public", copy_to_guest, copy_from_guest, 0)];
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        {
            routines.push(("sse_copy", sse_copy, sse_copy, 0));
            if has_avx() {
                routines.push(("avx_copy", avx_copy, avx_copy, AVX_COPY_MIN));
            }
        }
        routines
    }

    /// Each copy routine against a byte-by-byte reference (guest memory
    /// read and written one byte at a time with `load::<1>`/`store::<1>`,
    /// which do not use the copy): every length 0..=300 and odd large
    /// ones, guest and buffer misaligned independently, both directions;
    /// exactly the bytes asked for change.
    #[test]
    fn guest_copy_matches_reference_for_every_length_and_alignment() {
        const GUARD: usize = 64;
        const BASE: usize = 4096;
        let (lens, guest_offs, buf_offs): (Vec<usize>, &[usize], &[usize]) = if cfg!(miri) {
            ((0..=70).chain([129]).collect(), &[0, 1, 31], &[0, 17])
        } else {
            (
                (0..=300)
                    .chain([
                        511, 1023, 2047, 2048, 2049, 4095, 4096, 4097, 8191, 12345, 65537,
                    ])
                    .collect(),
                &[0, 1, 7, 15, 16, 17, 31, 33, 4064],
                &[0, 1, 3, 16, 31],
            )
        };
        let max_len = *lens.iter().max().unwrap();
        let max_off = *guest_offs.iter().max().unwrap();
        let size = BASE + max_off + max_len + GUARD;
        let ram = RamBlock::new("copy-reference", size as u64, RamBacking::Anonymous).unwrap();
        // The reference: what guest memory holds, kept byte for byte.
        let mut shadow: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        for (i, &b) in shadow.iter().enumerate() {
            ram.store(i as u64, [b]).unwrap();
        }
        let mut case = 0u32;
        for (name, to_guest, from_guest, min_len) in copy_routines() {
            for &len in lens.iter().filter(|&&l| l >= min_len) {
                for &g_off in guest_offs {
                    for &b_off in buf_offs {
                        case = case.wrapping_add(1);
                        let at = BASE + g_off;
                        let what = format!("{name}: len {len}, guest +{g_off}, buffer +{b_off}");
                        // Out of guest memory: exactly `len` bytes of the buffer.
                        let mut buf = vec![0x55u8; b_off + len + GUARD];
                        // SAFETY: `[at, at + len)` is inside the block, and
                        // `buf[b_off..b_off + len]` inside the distinct buffer.
                        unsafe {
                            from_guest(ram.host_addr().add(at), buf.as_mut_ptr().add(b_off), len)
                        };
                        assert!(buf[..b_off].iter().all(|&b| b == 0x55), "{what}");
                        assert_eq!(&buf[b_off..b_off + len], &shadow[at..at + len], "{what}");
                        assert!(buf[b_off + len..].iter().all(|&b| b == 0x55), "{what}");
                        // Into guest memory: exactly `len` bytes at `at`.
                        let data: Vec<u8> = (0..b_off + len)
                            .map(|i| (i as u32).wrapping_mul(7).wrapping_add(case) as u8)
                            .collect();
                        // SAFETY: as above, in the other direction.
                        unsafe { to_guest(data.as_ptr().add(b_off), ram.host_addr().add(at), len) };
                        shadow[at..at + len].copy_from_slice(&data[b_off..]);
                        let window = at - GUARD..at + len + GUARD;
                        for (i, &want) in window.clone().zip(&shadow[window]) {
                            assert_eq!(
                                ram.load::<1>(i as u64).unwrap()[0],
                                want,
                                "{what}: byte {i}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Under Miri this is the check that guest-memory accesses are not Rust
    /// data races (plain copies were reported as one); natively it checks
    /// that racing copies of every width only ever produce bytes some
    /// writer wrote.
    #[test]
    fn racing_accesses_to_the_same_bytes_are_not_a_data_race() {
        let ram = RamBlock::new("race", 64, RamBacking::Anonymous).unwrap();
        let rounds = if cfg!(miri) { 8 } else { 2_000 };
        std::thread::scope(|s| {
            for t in 1..=2u8 {
                let ram = &ram;
                s.spawn(move || {
                    let mut buf = [0u8; 24];
                    for i in 0..rounds {
                        ram.write(3, &[t; 24]).unwrap();
                        ram.store(5, [t; 4]).unwrap();
                        ram.store(8, [t; 8]).unwrap();
                        ram.read(3, &mut buf).unwrap();
                        assert!(buf.iter().all(|&b| b <= 2), "{buf:?}");
                        let w = ram.load::<8>(8 + i % 4).unwrap();
                        assert!(w.iter().all(|&b| b <= 2), "{w:?}");
                        assert!(ram.load::<2>(7).unwrap().iter().all(|&b| b <= 2));
                        ram.slice(0, 64).unwrap().write(10, &[t; 3]).unwrap();
                        // Copies long enough for the wide (AVX) path.
                        let mut wide = [0u8; 45];
                        ram.write(1 + i % 7, &[t; 50]).unwrap();
                        ram.read(2, &mut wide).unwrap();
                        assert!(wide.iter().all(|&b| b <= 2), "{wide:?}");
                    }
                });
            }
        });
    }

    #[test]
    fn drop_releases_exactly_once() {
        let before = RELEASED.with(|c| c.get());
        {
            let a = RamBlock::new("d1", 4096, RamBacking::Anonymous).unwrap();
            let b = RamBlock::new("d2", 4096, RamBacking::Memfd).unwrap();
            let moved = a; // moving must not release
            assert_eq!(RELEASED.with(|c| c.get()), before);
            drop(moved);
            assert_eq!(RELEASED.with(|c| c.get()), before + 1);
            drop(b);
        }
        assert_eq!(RELEASED.with(|c| c.get()), before + 2);
        // Failed constructions release nothing.
        let _ = RamBlock::new("z", 0, RamBacking::Anonymous);
        assert_eq!(RELEASED.with(|c| c.get()), before + 2);
    }

    #[test]
    fn send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RamBlock>();
        assert_send_sync::<RamSlice<'static>>();
    }

    #[cfg(not(miri))]
    #[test]
    fn memfd_second_mapping_sees_writes() {
        use rustix::mm::{MapFlags, ProtFlags};
        let ram = RamBlock::new("shared", 8192, RamBacking::Memfd).unwrap();
        let fd = ram.fd().expect("memfd block has an fd");
        // SAFETY: fresh shared mapping of the block's memfd with a null hint.
        let second = unsafe {
            rustix::mm::mmap(
                ptr::null_mut(),
                8192,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }
        .unwrap()
        .cast::<u8>();
        assert_ne!(second, ram.host_addr());

        ram.store(4100, 0x0bad_cafe_u32.to_le_bytes()).unwrap();
        // SAFETY: 4100 + 4 <= 8192, inside the second mapping.
        let seen = unsafe { ptr::read_unaligned(second.add(4100).cast::<[u8; 4]>()) };
        assert_eq!(u32::from_le_bytes(seen), 0x0bad_cafe);

        // SAFETY: 17 < 8192, inside the second mapping.
        unsafe { ptr::write(second.add(17), 0x5a) };
        assert_eq!(ram.load::<1>(17).unwrap(), [0x5a]);

        // SAFETY: unmapping exactly the second mapping created above.
        unsafe { rustix::mm::munmap(second.cast(), 8192) }.unwrap();
        assert!(RamBlock::new("anon", 4096, RamBacking::Anonymous)
            .unwrap()
            .fd()
            .is_none());
    }
}
