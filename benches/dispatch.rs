//! Dispatch benchmarks (issue 3), each with its anchor measured in the same
//! run:
//!
//! * `ram_u32_random/{memtree,memtree-cursor,vm-memory}/N`: u32 read at
//!   random addresses through an address space of N RAM regions (through the
//!   shared handle, and through a caching `SpaceCursor`) vs vm-memory's
//!   `GuestMemoryMmap::read_obj::<u32>` over the same layout;
//! * `ram_4k/{read,write,memcpy}`: 4 KiB buffer accesses vs `copy_from_slice`;
//! * `ram_sizes/{read-cursor,write-cursor,memcpy-from-mapping,memcpy-to-mapping}/N`:
//!   buffer accesses of N bytes (64 B to 64 KiB, aligned and not) through a
//!   cursor vs `copy_nonoverlapping` between the same kinds of memory, and
//!   `{write-cursor,memcpy-to-mapping}-skewed/4096` with the destination 3
//!   bytes after the source modulo 4 KiB;
//! * `mmio_u32/{dispatch,dispatch-cursor,dispatch-cursor-nohook,callback}`:
//!   u32 read of a no-op device through the address space (shared handle,
//!   cursor, cursor with a device that declares no `accepts` hook) vs calling
//!   its `MmioOps::read` (through `dyn`) directly;
//! * `commit/toggle_one_of_1k`: a commit that enables/disables one region in a
//!   map of 1024 regions;
//! * `reader_during_commits/{idle,busy}`: a u32 RAM read while another thread
//!   commits continuously (busy) or not (idle); afterwards a timed pass prints
//!   the median / p99.9 / max of single accesses in both conditions.
//!
//! Run: `cargo bench --bench dispatch -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use memtree::region::attrs::{Endian, MemTxAttrs, MemTxResult, MmioOps};
use memtree::{AddressSpace, Memory, RegionId};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;
const REGION: u64 = 64 << 10;
const STRIDE: u64 = 128 << 10;

/// A xorshift generator: deterministic addresses without a dependency.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// `n` RAM regions of 64 KiB, one every 128 KiB from 1 MiB, and 4096 random
/// aligned u32 addresses inside them.
fn layout(n: u64) -> (Vec<(u64, u64)>, Vec<u64>) {
    let regions: Vec<(u64, u64)> = (0..n).map(|i| ((1 << 20) + i * STRIDE, REGION)).collect();
    let mut next = rng(0x9e37_79b9_7f4a_7c15 ^ n);
    let addrs = (0..4096)
        .map(|_| {
            let (start, size) = regions[(next() % n) as usize];
            start + (next() % (size / 4)) * 4
        })
        .collect();
    (regions, addrs)
}

fn memtree_space(regions: &[(u64, u64)]) -> (Memory, AddressSpace) {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 64, None).unwrap();
    let t = memory.begin();
    for (i, &(start, size)) in regions.iter().enumerate() {
        let r = memory
            .new_ram(&format!("ram{i}"), u128::from(size), None)
            .unwrap();
        memory.add_subregion(system, start, r).unwrap();
    }
    t.commit();
    let id = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(id).unwrap();
    (memory, space)
}

fn ram_u32_random(c: &mut Criterion) {
    let mut g = c.benchmark_group("ram_u32_random");
    for n in [4u64, 64, 1024] {
        let (regions, addrs) = layout(n);
        let (_memory, space) = memtree_space(&regions);
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|&(s, l)| (GuestAddress(s), l as usize))
            .collect();
        let vm = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        g.bench_with_input(BenchmarkId::new("memtree", n), &addrs, |b, addrs| {
            let mut i = 0usize;
            b.iter(|| {
                let a = addrs[i & 4095];
                i = i.wrapping_add(1);
                black_box(space.load_u32_le(black_box(a), A))
            })
        });
        let mut cursor = space.cursor();
        g.bench_with_input(BenchmarkId::new("memtree-cursor", n), &addrs, |b, addrs| {
            let mut i = 0usize;
            b.iter(|| {
                let a = addrs[i & 4095];
                i = i.wrapping_add(1);
                black_box(cursor.load::<u32>(black_box(a), Endian::Little, A))
            })
        });
        g.bench_with_input(BenchmarkId::new("vm-memory", n), &addrs, |b, addrs| {
            let mut i = 0usize;
            b.iter(|| {
                let a = addrs[i & 4095];
                i = i.wrapping_add(1);
                black_box(vm.read_obj::<u32>(GuestAddress(black_box(a))).unwrap())
            })
        });
    }
    g.finish();
}

fn ram_4k(c: &mut Criterion) {
    let (_memory, space) = memtree_space(&[(0, 1 << 20)]);
    let mut g = c.benchmark_group("ram_4k");
    let mut buf = vec![0x5au8; 4096];
    // Guest RAM in use: populated pages (reads of never-touched anonymous
    // memory hit the shared zero page, which is not what guests see).
    assert!(space.write(0, &vec![0x11u8; 1 << 20], A).is_ok());
    g.bench_function("read", |b| {
        b.iter(|| black_box(space.read(black_box(0x1000), &mut buf, A)))
    });
    g.bench_function("write", |b| {
        b.iter(|| black_box(space.write(black_box(0x1000), &buf, A)))
    });
    let mut cursor = space.cursor();
    g.bench_function("read-cursor", |b| {
        b.iter(|| black_box(cursor.read(black_box(0x1000), &mut buf, A)))
    });
    g.bench_function("write-cursor", |b| {
        b.iter(|| black_box(cursor.write(black_box(0x1000), &buf, A)))
    });
    let src = vec![0xa5u8; 4096];
    let mut dst = vec![0u8; 4096];
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        })
    });
    // The same copy between the same kinds of memory the access uses: an
    // anonymous host mapping (page-aligned, populated) and a heap buffer, with
    // the length unknown at compile time as it is for an access (a constant
    // 4096 lets the compiler inline a fixed-size copy no runtime-length
    // access can use).
    let block = memtree::RamBlock::new("anchor", 1 << 20, memtree::RamBacking::Anonymous)
        .expect("anchor mapping");
    assert!(block.write(0, &vec![0x11u8; 1 << 20]).is_ok());
    g.bench_function("memcpy-from-mapping", |b| {
        b.iter(|| {
            // SAFETY: the block maps 1 MiB, so [0x1000, 0x2000) is inside it,
            // and `buf` is a distinct 4 KiB heap buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    block.host_addr().add(black_box(0x1000)),
                    buf.as_mut_ptr(),
                    black_box(4096),
                )
            };
            black_box(&mut buf);
        })
    });
    g.bench_function("memcpy-to-mapping", |b| {
        b.iter(|| {
            // SAFETY: as above, in the other direction.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    buf.as_ptr(),
                    block.host_addr().add(black_box(0x1000)),
                    black_box(4096),
                )
            };
            black_box(&buf);
        })
    });
    g.finish();
}

/// Buffer accesses of other sizes than 4 KiB (a short descriptor, a small
/// and a full Ethernet frame at an odd address, a large DMA block), each
/// with its `copy_nonoverlapping` anchor between the same kinds of memory
/// (page-aligned anonymous mapping, heap buffer) at the same offset.
fn ram_sizes(c: &mut Criterion) {
    let (_memory, space) = memtree_space(&[(0, 1 << 20)]);
    assert!(space.write(0, &vec![0x11u8; 1 << 20], A).is_ok());
    let block = memtree::RamBlock::new("anchor", 1 << 20, memtree::RamBacking::Anonymous)
        .expect("anchor mapping");
    assert!(block.write(0, &vec![0x11u8; 1 << 20]).is_ok());
    let mut g = c.benchmark_group("ram_sizes");
    let mut cursor = space.cursor();
    for (addr, n) in [
        (0x1000u64, 64usize),
        (0x1000, 256),
        (0x1003, 1514),
        (0x1000, 65536),
    ] {
        let mut buf = vec![0x5au8; n];
        g.bench_function(BenchmarkId::new("read-cursor", n), |b| {
            b.iter(|| black_box(cursor.read(black_box(addr), &mut buf, A)))
        });
        g.bench_function(BenchmarkId::new("write-cursor", n), |b| {
            b.iter(|| black_box(cursor.write(black_box(addr), &buf, A)))
        });
        g.bench_function(BenchmarkId::new("memcpy-from-mapping", n), |b| {
            b.iter(|| {
                // SAFETY: `addr + n` is within the 1 MiB block, and `buf`
                // is a distinct heap buffer of `n` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        block.host_addr().add(black_box(addr as usize)),
                        buf.as_mut_ptr(),
                        black_box(n),
                    )
                };
                black_box(&mut buf);
            })
        });
        g.bench_function(BenchmarkId::new("memcpy-to-mapping", n), |b| {
            b.iter(|| {
                // SAFETY: as above, in the other direction.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        buf.as_ptr(),
                        block.host_addr().add(black_box(addr as usize)),
                        black_box(n),
                    )
                };
                black_box(&buf);
            })
        });
    }
    // 4 KiB where the destination lies 3 bytes after the source modulo the
    // page size (guest 0x1003, page-aligned buffer): `rep movsb` (which
    // glibc's `memcpy` uses at this size) falls off a cliff on some CPUs
    // for such pairs; the guest copy must not.
    let mut backing = vec![0x5au8; 2 * 4096];
    let skew = (4096 - backing.as_ptr() as usize % 4096) % 4096;
    let buf = &mut backing[skew..skew + 4096];
    let addr = 0x1003u64;
    g.bench_function(BenchmarkId::new("write-cursor-skewed", 4096), |b| {
        b.iter(|| black_box(cursor.write(black_box(addr), buf, A)))
    });
    g.bench_function(BenchmarkId::new("memcpy-to-mapping-skewed", 4096), |b| {
        b.iter(|| {
            // SAFETY: `addr + 4096` is within the 1 MiB block, and `buf` is
            // a distinct heap buffer of 4096 bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    buf.as_ptr(),
                    block.host_addr().add(black_box(addr as usize)),
                    black_box(4096),
                )
            };
            black_box(&buf);
        })
    });
    g.finish();
}

struct Noop;

impl MmioOps for Noop {
    fn read(&self, _: u64, _: u32, _: MemTxAttrs) -> Result<u64, MemTxResult> {
        Ok(0)
    }
    fn write(&self, _: u64, _: u64, _: u32, _: MemTxAttrs) -> MemTxResult {
        MemTxResult::OK
    }
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

/// The same device declaring that it has no `accepts` hook (QEMU's NULL
/// `valid.accepts`), so dispatch skips that call.
struct NoopNoHook;

impl MmioOps for NoopNoHook {
    fn read(&self, _: u64, _: u32, _: MemTxAttrs) -> Result<u64, MemTxResult> {
        Ok(0)
    }
    fn write(&self, _: u64, _: u64, _: u32, _: MemTxAttrs) -> MemTxResult {
        MemTxResult::OK
    }
    fn accepts_everything(&self) -> bool {
        true
    }
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

fn mmio_u32(c: &mut Criterion) {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 64, None).unwrap();
    let ops: Arc<dyn MmioOps> = Arc::new(Noop);
    let dev = memory.new_mmio("noop", 0x1000, ops.clone(), None).unwrap();
    memory.add_subregion(system, 0xfee0_0000, dev).unwrap();
    let nohook = memory
        .new_mmio("noop-nohook", 0x1000, Arc::new(NoopNoHook), None)
        .unwrap();
    memory.add_subregion(system, 0xfed0_0000, nohook).unwrap();
    let id = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(id).unwrap();
    let mut g = c.benchmark_group("mmio_u32");
    g.bench_function("dispatch", |b| {
        b.iter(|| black_box(space.load_u32_le(black_box(0xfee0_0010), A)))
    });
    let mut cursor = space.cursor();
    g.bench_function("dispatch-cursor", |b| {
        b.iter(|| black_box(cursor.load::<u32>(black_box(0xfee0_0010), Endian::Little, A)))
    });
    g.bench_function("dispatch-cursor-nohook", |b| {
        b.iter(|| black_box(cursor.load::<u32>(black_box(0xfed0_0010), Endian::Little, A)))
    });
    g.bench_function("callback", |b| {
        b.iter(|| black_box(black_box(&ops).read(black_box(0x10), 4, A)))
    });
    g.finish();
}

/// 1024 RAM regions and the id of one to toggle.
fn map_1k() -> (Memory, AddressSpace, RegionId) {
    let (regions, _) = layout(1024);
    let (memory, space) = memtree_space(&regions);
    let toggled = memory.find_region("ram512").unwrap();
    (memory, space, toggled)
}

fn commit(c: &mut Criterion) {
    let (memory, _space, toggled) = map_1k();
    let mut on = true;
    c.bench_function("commit/toggle_one_of_1k", |b| {
        b.iter(|| {
            on = !on;
            memory.set_enabled(toggled, on).unwrap();
        })
    });
}

/// Times `n` single reads and returns the sorted durations in nanoseconds.
fn timed_reads(space: &AddressSpace, addrs: &[u64], n: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let a = addrs[i & 4095];
        let t = Instant::now();
        let _ = black_box(space.load_u32_le(a, A));
        out.push(t.elapsed().as_nanos() as u64);
    }
    out.sort_unstable();
    out
}

fn reader_during_commits(c: &mut Criterion) {
    let (memory, space, toggled) = map_1k();
    let (_, addrs) = layout(1024);
    let mut g = c.benchmark_group("reader_during_commits");
    g.bench_function("idle", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(space.load_u32_le(addrs[i & 4095], A))
        })
    });
    let idle = timed_reads(&space, &addrs, 1_000_000);
    let stop = AtomicBool::new(false);
    let (busy, commits) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                memory.set_enabled(toggled, n % 2 == 1).unwrap();
                n += 1;
            }
            n
        });
        g.bench_function("busy", |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = i.wrapping_add(1);
                black_box(space.load_u32_le(addrs[i & 4095], A))
            })
        });
        let busy = timed_reads(&space, &addrs, 1_000_000);
        stop.store(true, Ordering::Relaxed);
        (busy, writer.join().unwrap())
    });
    g.finish();
    let pct = |v: &[u64], p: f64| v[((v.len() - 1) as f64 * p) as usize];
    for (name, v) in [("idle", &idle), ("busy", &busy)] {
        println!(
            "reader_during_commits/{name}: single-access latency incl. timer: median {} ns, p99.9 {} ns, p99.99 {} ns, max {} ns",
            pct(v, 0.5),
            pct(v, 0.999),
            pct(v, 0.9999),
            v[v.len() - 1]
        );
    }
    println!("reader_during_commits: {commits} commits ran on the writer thread");
}

criterion_group!(
    benches,
    ram_u32_random,
    ram_4k,
    ram_sizes,
    mmio_u32,
    commit,
    reader_during_commits
);
criterion_main!(benches);
