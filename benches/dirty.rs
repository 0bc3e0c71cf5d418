//! Dirty tracking costs and migration throughput (`memtree::dirty`,
//! `memtree::migration`).
//!
//! ```text
//! cargo bench --bench dirty -- --warm-up-time 1 --measurement-time 2
//! ```
//!
//! * `dirty_write/{u32,4k}/{none,tracking,stopped}`: a u32 store and a 4 KiB
//!   write through a cursor to RAM no client ever tracked, RAM tracked by
//!   VGA, and RAM whose tracking was started and stopped again.
//! * `dirty_write_interleaved` (printed): the same writes in batches that
//!   alternate between tracking off and on over one block, medians of 301
//!   batches per mode, and the marking of a 4 KiB write alone against a
//!   4 KiB copy alone: the per-write difference that criterion's
//!   mode-after-mode groups lose in noise.
//! * `dirty_bitmap_4g/{sync,snapshot_and_clear,take_dirty_ram}`: the bitmap
//!   of 4 GiB of anonymous RAM that is never touched (16 dirty pages set
//!   per iteration).
//! * `migration_1g` (printed, not a criterion group: one run takes
//!   seconds): 1 GiB of idle RAM (no writers) over a Unix socket pair to a
//!   receiver thread, once untouched (zero pages) and three times with
//!   contents in every page (median), against `memcpy` of the same 1 GiB
//!   in the same run. Set `MEMTREE_BENCH_MIGRATION=0` to skip.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use memtree::migration::{self, SendConfig};
use memtree::{AddressSpace, DirtyClient, Endian, MemTxAttrs, Memory, RegionId, SpaceId};

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

fn one_ram(size: u64) -> (Memory, RegionId, SpaceId, AddressSpace) {
    let memory = Memory::new();
    let root = memory.new_container("system", 1 << 40, None).unwrap();
    let ram = memory.new_ram("ram", u128::from(size), None).unwrap();
    memory.add_subregion(root, 0, ram).unwrap();
    let space = memory.new_address_space("memory", root, None).unwrap();
    let h = memory.address_space(space).unwrap();
    (memory, ram, space, h)
}

fn dirty_write(c: &mut Criterion) {
    let mut g = c.benchmark_group("dirty_write");
    // One machine and one RAM block for all three modes, in this order
    // (no client ever, VGA tracking, tracking stopped again), so the
    // modes differ only in tracking: a fresh block per mode made host
    // page placement (TLB reach) differ by up to 2x between modes.
    let (memory, ram, _, h) = one_ram(16 << 20);
    let mut cur = h.cursor();
    let buf = vec![0x5au8; 4096];
    for mode in ["none", "tracking", "stopped"] {
        match mode {
            "tracking" => memory.set_log(ram, DirtyClient::VGA, true).unwrap(),
            "stopped" => memory.set_log(ram, DirtyClient::VGA, false).unwrap(),
            _ => {}
        }
        let mut addr = 0u64;
        g.bench_function(format!("u32/{mode}"), |b| {
            b.iter(|| {
                // Walk the pages so a tracked store sets fresh bits too.
                addr = (addr + 4096 + 4) & ((16 << 20) - 1);
                black_box(cur.store::<u32>(black_box(addr), 7, Endian::Little, A))
            })
        });
        let mut addr = 0u64;
        g.bench_function(format!("4k/{mode}"), |b| {
            b.iter(|| {
                addr = (addr + 4096) & ((16 << 20) - 1);
                black_box(cur.write(black_box(addr), &buf, A))
            })
        });
    }
    drop(cur);
    drop(h);
    drop(memory);
    g.finish();
}

/// The tracking cost without criterion's mode-after-mode order: batches of
/// writes through one cursor over one 16 MiB block (2048 writes, one per
/// page), cycling between tracking off, on with the bits cleared before
/// the batch (every write sets a fresh bit: the worst case) and on with
/// the bits already set, 301 batches per mode, the median ns per write
/// reported. Then the marking of a 4 KiB write alone
/// (`FlatRange::mark_dirty` on clean bits) against a 4 KiB copy alone.
fn dirty_write_interleaved(_: &mut Criterion) {
    const SIZE: u64 = 16 << 20;
    const BATCH: u64 = 2048;
    const ROUNDS: usize = 301;
    let (memory, ram, _, h) = one_ram(SIZE);
    let mut cur = h.cursor();
    let buf = vec![0x5au8; 4096];
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let clear = || {
        let _ = memory.snapshot_and_clear_dirty(ram, 0, SIZE, DirtyClient::VGA);
    };
    let mut report = Vec::new();
    let mut tracking = false;
    for (what, len) in [("u32", 4usize), ("4k", 4096)] {
        // Modes: 0 off, 1 on with clean bits (every write sets one), 2 on
        // with the bits already set (a page written again since the last
        // clear: the common case).
        let mut times = [Vec::new(), Vec::new(), Vec::new()];
        let mut addr = 0u64;
        for round in 0..3 * ROUNDS {
            let mode = round % 3;
            let on = mode != 0;
            if on != tracking {
                memory.set_log(ram, DirtyClient::VGA, on).unwrap();
                tracking = on;
            }
            if mode == 1 {
                clear();
            }
            let t = Instant::now();
            for _ in 0..BATCH {
                addr = (addr + 4096 + if len == 4 { 4 } else { 0 }) & (SIZE - 1);
                if len == 4 {
                    let _ = black_box(cur.store::<u32>(black_box(addr), 7, Endian::Little, A));
                } else {
                    let _ = black_box(cur.write(black_box(addr), &buf, A));
                }
            }
            times[mode].push(t.elapsed().as_nanos() as f64 / BATCH as f64);
        }
        let off = median(&mut times[0]);
        let clean = median(&mut times[1]);
        let set = median(&mut times[2]);
        report.push(format!(
            "{what}: off {off:.2} ns, on (fresh bits) {clean:.2} ns ({:+.2} ns, {:+.1} %), \
             on (bits set) {set:.2} ns ({:+.2} ns, {:+.1} %)",
            clean - off,
            (clean / off - 1.0) * 100.0,
            set - off,
            (set / off - 1.0) * 100.0
        ));
    }
    // Marking alone against the copy alone, interleaved the same way.
    if !tracking {
        memory.set_log(ram, DirtyClient::VGA, true).unwrap();
    }
    let view = h.view();
    let range = view
        .ranges()
        .iter()
        .find(|r| r.region().name() == "ram")
        .expect("the RAM range");
    let mut copy_dst = vec![0u8; SIZE as usize];
    let (mut mark, mut copy) = (Vec::new(), Vec::new());
    let mut addr = 0u64;
    for _ in 0..ROUNDS {
        clear();
        let t = Instant::now();
        for _ in 0..BATCH {
            addr = (addr + 4096) & (SIZE - 1);
            range.mark_dirty(black_box(addr), 4096);
        }
        mark.push(t.elapsed().as_nanos() as f64 / BATCH as f64);
        let t = Instant::now();
        for _ in 0..BATCH {
            addr = (addr + 4096) & (SIZE - 1);
            let a = black_box(addr) as usize;
            copy_dst[a..a + 4096].copy_from_slice(&buf);
        }
        black_box(&copy_dst);
        copy.push(t.elapsed().as_nanos() as f64 / BATCH as f64);
    }
    let (mark, copy) = (median(&mut mark), median(&mut copy));
    report.push(format!(
        "marking a 4 KiB write alone {mark:.2} ns vs a 4 KiB copy alone {copy:.2} ns ({:.1} %)",
        mark / copy * 100.0
    ));
    println!("dirty_write_interleaved: {}", report.join("; "));
}

fn dirty_bitmap_4g(c: &mut Criterion) {
    let mut g = c.benchmark_group("dirty_bitmap_4g");
    let (memory, ram, space, h) = one_ram(4 << 30);
    memory.set_log(ram, DirtyClient::VGA, true).unwrap();
    memory.global_dirty_log_start().unwrap();
    let dirty16 = |h: &AddressSpace| {
        for i in 0..16u64 {
            let _ = h.store::<u8>(i * (256 << 20), 1, Endian::Little, A);
        }
    };
    g.bench_function("sync", |b| b.iter(|| memory.dirty_log_sync().unwrap()));
    g.bench_function("snapshot_and_clear", |b| {
        b.iter(|| {
            dirty16(&h);
            black_box(
                memory
                    .snapshot_and_clear_dirty(ram, 0, 4 << 30, DirtyClient::VGA)
                    .unwrap(),
            )
        })
    });
    g.bench_function("take_dirty_ram", |b| {
        b.iter(|| {
            dirty16(&h);
            black_box(
                memory
                    .take_dirty_ram(space, DirtyClient::MIGRATION)
                    .unwrap(),
            )
        })
    });
    g.finish();
}

/// One migration of `space` over a Unix socket pair to a fresh receiving
/// machine on another thread: (wall time, sender stats, regions moved in).
fn migrate_over_socket(
    memory: &Memory,
    space: SpaceId,
    size: u64,
) -> (std::time::Duration, migration::MigrationStats, usize) {
    let (rx_memory, _, rx_space, _) = one_ram(size);
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let t = Instant::now();
    let receiver = std::thread::spawn(move || {
        let cfg = migration::ReceiveConfig {
            move_pages: true,
            ..Default::default()
        };
        let got = migration::receive_with(&rx_memory, rx_space, b, &cfg).unwrap();
        (got.swapped, rx_memory)
    });
    let stats = migration::send(memory, space, &a, &SendConfig::default(), |_| {}).unwrap();
    drop(a);
    let (swapped, rx_memory) = receiver.join().unwrap();
    let took = t.elapsed();
    drop(rx_memory);
    (took, stats, swapped)
}

fn migration_1g(_: &mut Criterion) {
    if std::env::var("MEMTREE_BENCH_MIGRATION").as_deref() == Ok("0") {
        return;
    }
    const SIZE: u64 = 1 << 30;
    let gbs = |d: std::time::Duration| SIZE as f64 / d.as_secs_f64() / 1e9;
    // Untouched RAM: every page travels as a zero flag.
    let (memory, _, space, h) = one_ram(SIZE);
    let (zero_run, zstats, _) = migrate_over_socket(&memory, space, SIZE);
    // RAM with contents in every page (no zero page to skip): three runs,
    // the median reported (the first also pays for the host's first touch
    // of the receiver's memory).
    for p in (0..SIZE).step_by(4096) {
        let _ = h.store::<u64>(p, p | 1, Endian::Little, A);
    }
    let mut runs: Vec<_> = (0..3)
        .map(|_| migrate_over_socket(&memory, space, SIZE))
        .collect();
    let all: Vec<_> = runs.iter().map(|r| r.0).collect();
    runs.sort_by_key(|r| r.0);
    let (mig, stats, swapped) = runs.swap_remove(1);
    drop(h);
    drop(memory);
    // memcpy of the same 1 GiB (both buffers touched first, as RAM is).
    let src = vec![1u8; SIZE as usize];
    let mut dst = vec![2u8; SIZE as usize];
    let t = Instant::now();
    dst.copy_from_slice(&src);
    black_box(&dst);
    let copy = t.elapsed();
    println!(
        "migration_1g: untouched RAM {:?} ({} MiB on the wire, {} zero pages)",
        zero_run,
        zstats.bytes >> 20,
        zstats.zero_pages
    );
    println!(
        "migration_1g: contents in every page: runs {all:?}; median {:?} ({:.2} GB/s, {} \
         rounds, {} MiB on the wire, downtime {:?}, {} region(s) moved in); memcpy {:?} \
         ({:.2} GB/s); ratio {:.1}x (untouched RAM {:.1}x)",
        mig,
        gbs(mig),
        stats.rounds,
        stats.bytes >> 20,
        stats.downtime,
        swapped,
        copy,
        gbs(copy),
        mig.as_secs_f64() / copy.as_secs_f64(),
        zero_run.as_secs_f64() / copy.as_secs_f64()
    );
}

criterion_group!(
    benches,
    dirty_write,
    dirty_write_interleaved,
    dirty_bitmap_4g,
    migration_1g
);
criterion_main!(benches);
