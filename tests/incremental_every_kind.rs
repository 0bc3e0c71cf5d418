//! Incremental rendering against the full render with every region kind
//! and every lifecycle edit (issue 11): ROM devices and romd, MMIO, RAM
//! devices, IOMMU regions, owners unplugged, regions created and destroyed,
//! address spaces created and destroyed mid-run, and global dirty logging
//! (against a machine that renders whole, in lock step).
//! `MEMTREE_INCREMENTAL_KIND_SEEDS=n` runs more seeds (default 200).

use std::sync::Arc;

use memtree::access::iommu::{Iommu, IommuHub, IommuPerm, IotlbEntry};
use memtree::{Memory, MmioOps, RegionId, SpaceId, UnimplementedDevice};

#[derive(Clone)]
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
    fn addr(&mut self) -> u64 {
        (self.next() % 64) << 10
    }
    fn size(&mut self) -> u64 {
        ((self.next() % 16) + 1) << 10
    }
}

struct Deny;
impl Iommu for Deny {
    fn translate(&self, addr: u64, _a: IommuPerm, _i: u32) -> IotlbEntry {
        IotlbEntry::denied(addr, 0xfff)
    }
}

struct World {
    regions: Vec<RegionId>,
    containers: Vec<RegionId>,
    owners: Vec<memtree::OwnerId>,
    spaces: Vec<SpaceId>,
    n: usize,
}

fn new_region(m: &Memory, rng: &mut Rng, w: &mut World) {
    let ops: Arc<dyn MmioOps> = Arc::new(UnimplementedDevice);
    w.n += 1;
    let name = format!("r{}", w.n);
    let owner =
        (!w.owners.is_empty() && rng.chance(30)).then(|| w.owners[rng.below(w.owners.len())]);
    let size = u128::from(rng.size());
    let r = match rng.below(8) {
        0 => m.new_container(&name, size * 4, owner),
        1 if !w.regions.is_empty() => {
            let t = w.regions[rng.below(w.regions.len())];
            m.new_alias(&name, t, (rng.next() % 8) << 10, size, owner)
        }
        2 => m.new_rom_device(&name, size, ops, owner),
        3 => m.new_mmio(&name, size, ops, owner),
        4 => m.new_ram_device(&name, size, owner),
        5 => m.new_iommu(&name, size, Arc::new(Deny), IommuHub::new(), owner),
        6 => m.new_rom(&name, size, owner),
        _ => m.new_ram(&name, size, owner),
    };
    let Ok(r) = r else { return };
    if m.region_info(r).map(|i| i.kind) == Ok(memtree::RegionKind::Container) {
        w.containers.push(r);
    }
    w.regions.push(r);
    if rng.chance(85) && !w.containers.is_empty() {
        let c = w.containers[rng.below(w.containers.len())];
        let _ = m.add_subregion_overlap(c, rng.addr(), r, rng.below(3) as i32 - 1);
    }
}

fn op(m: &Memory, rng: &mut Rng, w: &mut World, global: bool) {
    if w.regions.is_empty() {
        new_region(m, rng, w);
        return;
    }
    let r = w.regions[rng.below(w.regions.len())];
    let _ = match rng.below(18) {
        0 | 1 => {
            new_region(m, rng, w);
            Ok(())
        }
        2 => {
            let c = w.containers[rng.below(w.containers.len())];
            m.add_subregion_overlap(c, rng.addr(), r, rng.below(3) as i32 - 1)
        }
        3 => match m.region_info(r).ok().and_then(|i| i.container) {
            Some(c) => m.del_subregion(c, r),
            None => m.destroy_region(r),
        },
        4 => m.set_address(r, rng.addr()),
        5 => m.set_enabled(r, rng.chance(50)),
        6 => m.set_readonly(r, rng.chance(50)),
        7 => m.set_romd(r, rng.chance(50)),
        8 => m.set_size(r, u128::from(rng.size())),
        9 => m.set_alias_offset(r, (rng.next() % 8) << 10),
        10 => m.set_dirty_log_mask(r, (rng.next() % 4) as u8),
        11 if global => {
            if m.global_dirty_log() {
                m.global_dirty_log_stop()
            } else {
                m.global_dirty_log_start()
            }
        }
        12 => {
            let o = m.new_owner(&format!("o{}", w.owners.len()), None);
            if let Ok(o) = o {
                w.owners.push(o);
            }
            Ok(())
        }
        13 if !w.owners.is_empty() => {
            let i = rng.below(w.owners.len());
            let o = w.owners.remove(i);
            m.unplug(o).map(|_| ())
        }
        14 => {
            let s = m.new_address_space(&format!("as{}", w.spaces.len()), r, None);
            if let Ok(s) = s {
                w.spaces.push(s);
            }
            Ok(())
        }
        15 if w.spaces.len() > 1 => {
            let i = 1 + rng.below(w.spaces.len() - 1);
            let s = w.spaces.remove(i);
            m.destroy_address_space(s)
        }
        16 => m.set_unmergeable(r, rng.chance(50)),
        _ => m.set_nonvolatile(r, rng.chance(50)),
    };
}

fn run(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let m = Memory::new();
    let root = m.new_container("root", 1 << 64, None).unwrap();
    let sp = m.new_address_space("root-as", root, None).unwrap();
    let mut w = World {
        regions: Vec::new(),
        containers: vec![root],
        owners: Vec::new(),
        spaces: vec![sp],
        n: 0,
    };
    for _ in 0..8 {
        new_region(&m, &mut rng, &mut w);
    }
    for step in 0..40 {
        let batch = if rng.chance(30) { 1 + rng.below(6) } else { 1 };
        let t = m.begin();
        for _ in 0..batch {
            op(&m, &mut rng, &mut w, false);
        }
        t.commit();
        if let Err(e) = m.check_views_against_full_render() {
            panic!("seed {seed} step {step}: {e}");
        }
    }
}

/// Rule: after every commit of random edits over every region kind and
/// lifecycle edit, each published view equals a full render.
#[test]
fn incremental_views_equal_full_render_with_every_region_kind_and_lifecycle_edit() {
    let seeds = std::env::var("MEMTREE_INCREMENTAL_KIND_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200u64);
    for seed in 1..=seeds {
        run(seed);
    }
}

fn views(m: &Memory) -> Vec<String> {
    m.address_spaces()
        .into_iter()
        .flat_map(|(id, name)| {
            let v = m.address_space(id).unwrap().view();
            v.iter()
                .map(|r| {
                    format!(
                        "{name} {:x}-{:x} {}@{:x} {:?} log {:#x}",
                        r.start(),
                        r.last(),
                        r.region().name(),
                        r.offset_in_region(),
                        r.attrs(),
                        r.dirty_log_mask()
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn lockstep(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mk = |inc: bool| {
        let m = Memory::new();
        m.set_incremental_render(inc);
        let root = m.new_container("root", 1 << 64, None).unwrap();
        let sp = m.new_address_space("root-as", root, None).unwrap();
        let w = World {
            regions: Vec::new(),
            containers: vec![root],
            owners: Vec::new(),
            spaces: vec![sp],
            n: 0,
        };
        (m, w)
    };
    let (ma, mut wa) = mk(true);
    let (mb, mut wb) = mk(false);
    for _ in 0..8 {
        let mut r2 = rng.clone();
        new_region(&ma, &mut rng, &mut wa);
        new_region(&mb, &mut r2, &mut wb);
    }
    for step in 0..40 {
        let batch = if rng.chance(30) { 1 + rng.below(6) } else { 1 };
        let mut r2 = rng.clone();
        {
            let t = ma.begin();
            for _ in 0..batch {
                op(&ma, &mut rng, &mut wa, true);
            }
            t.commit();
        }
        {
            let t = mb.begin();
            for _ in 0..batch {
                op(&mb, &mut r2, &mut wb, true);
            }
            t.commit();
        }
        assert_eq!(views(&ma), views(&mb), "seed {seed} step {step}");
    }
}

/// Rule: with global dirty logging started and stopped among the edits, an
/// incremental machine publishes the same views as one that renders whole.
#[test]
fn incremental_views_equal_a_whole_rendering_machine_under_global_dirty_logging() {
    let seeds = std::env::var("MEMTREE_INCREMENTAL_KIND_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200u64);
    for seed in 1..=seeds {
        lockstep(seed);
    }
}

/// Rule (the test oracle reports no difference where there is none):
/// `Memory::check_views_against_full_render` accepts a correct view while
/// global dirty logging (migration tracking) is on.
#[test]
fn full_render_check_holds_under_global_dirty_logging() {
    let m = Memory::new();
    let root = m.new_container("root", 1 << 64, None).unwrap();
    let ram = m.new_ram("ram", 0x1000, None).unwrap();
    m.add_subregion(root, 0, ram).unwrap();
    let reference = Memory::new();
    reference.set_incremental_render(false);
    let rroot = reference.new_container("root", 1 << 64, None).unwrap();
    let rram = reference.new_ram("ram", 0x1000, None).unwrap();
    reference.add_subregion(rroot, 0, rram).unwrap();
    for mm in [&m, &reference] {
        let root = mm.find_region("root").unwrap();
        mm.new_address_space("as", root, None).unwrap();
        mm.global_dirty_log_start().unwrap();
    }
    // Both machines publish the same view (incremental = reference)...
    assert_eq!(views(&m), views(&reference));
    // ...which the checker must accept.
    assert_eq!(m.check_views_against_full_render(), Ok(()));
}
