//! DMA map+unmap and cached-access costs.
//!
//! * `dma/map_unmap_owned_ram`: RAM of a device — the mapping records itself
//!   in the mapping table, whose entry pins the memory (target < 50 ns).
//! * `dma/map_unmap_ownerless_ram`: RAM without an owner — pinned by a
//!   table entry exactly like a device's RAM (ownerless memory is freed when
//!   its last user goes, so a mapping must keep it), no reference counting.
//! * `dma/map_unmap_{owned,ownerless}_ram_cursor`: the same through a
//!   `SpaceCursor` (no arc-swap load of the published view).
//! * `dma/map_unmap_bounce_mmio`: an 8-byte bounce buffer over MMIO, with
//!   prefill (one device callback).
//! * `dma/cache_read_u64`: an 8-byte read through a direct
//!   `MemoryRegionCache`.
//! * `dma/baseline_*`: one view load (`view_guard`), one `Arc` clone + drop
//!   (the reference an owned mapping would take if it held the memory by
//!   `Arc`: two locked instructions) and one 8-byte
//!   `AddressSpace::read` of RAM, to compare against on a loaded machine.
//!
//! Run: `cargo bench --bench dma -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use memtree::dma::cache::MemoryRegionCache;
use memtree::host::mapping_info::DmaDirection;
use memtree::{Endian, MemTxAttrs, MemTxResult, Memory, MmioOps};

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

struct Regs;

impl MmioOps for Regs {
    fn read(&self, addr: u64, _size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        Ok(addr)
    }
    fn write(&self, _addr: u64, _data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        MemTxResult::OK
    }
    fn endianness(&self) -> Endian {
        Endian::Little
    }
}

fn bench(c: &mut Criterion) {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 32, None).unwrap();
    let pc_ram = memory.new_ram("pc.ram", 1 << 20, None).unwrap();
    memory.add_subregion(system, 0, pc_ram).unwrap();
    let dev = memory.new_owner("nic", None).unwrap();
    let dev_ram = memory.new_ram("nic.ram", 1 << 16, Some(dev)).unwrap();
    memory.add_subregion(system, 0x1000_0000, dev_ram).unwrap();
    let mmio = memory
        .new_mmio("nic.mmio", 0x1000, Arc::new(Regs), Some(dev))
        .unwrap();
    memory.add_subregion(system, 0x2000_0000, mmio).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();

    let mut g = c.benchmark_group("dma");
    g.bench_function("map_unmap_owned_ram", |b| {
        b.iter(|| {
            let m = space
                .map(black_box(0x1000_0100), 512, DmaDirection::FromDevice, A)
                .unwrap();
            black_box(m.len());
            m.unmap(512)
        })
    });
    g.bench_function("map_unmap_ownerless_ram", |b| {
        b.iter(|| {
            let m = space
                .map(black_box(0x100), 512, DmaDirection::FromDevice, A)
                .unwrap();
            black_box(m.len());
            m.unmap(512)
        })
    });
    let mut cursor = space.cursor();
    g.bench_function("map_unmap_owned_ram_cursor", |b| {
        b.iter(|| {
            let m = cursor
                .map(black_box(0x1000_0100), 512, DmaDirection::FromDevice, A)
                .unwrap();
            black_box(m.len());
            m.unmap(512)
        })
    });
    g.bench_function("map_unmap_ownerless_ram_cursor", |b| {
        b.iter(|| {
            let m = cursor
                .map(black_box(0x100), 512, DmaDirection::FromDevice, A)
                .unwrap();
            black_box(m.len());
            m.unmap(512)
        })
    });
    g.bench_function("map_unmap_bounce_mmio", |b| {
        b.iter(|| {
            let m = space
                .map(black_box(0x2000_0000), 8, DmaDirection::ToDevice, A)
                .unwrap();
            black_box(m.len());
            m.unmap(8)
        })
    });
    let cache =
        MemoryRegionCache::new(&space, 0x1000_0000, 0x1000, DmaDirection::Bidirectional).unwrap();
    g.bench_function("cache_read_u64", |b| {
        b.iter(|| cache.load::<8>(black_box(0x80)).unwrap())
    });
    g.bench_function("baseline_view_guard", |b| {
        b.iter(|| black_box(space.view_guard().ranges().len()))
    });
    let shared = Arc::new(0u64);
    g.bench_function("baseline_arc_clone_drop", |b| {
        b.iter(|| drop(black_box(Arc::clone(black_box(&shared)))))
    });
    g.bench_function("baseline_read8_ownerless_ram", |b| {
        b.iter(|| {
            let mut buf = [0u8; 8];
            let _ = space.read(black_box(0x100), &mut buf, A);
            buf
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3))
        .sample_size(50);
    targets = bench
}
criterion_main!(benches);
