//! No-panic random driver for the public `Machine` API: random sequences of
//! edits with extreme arguments (sizes 0 and 2^64, addresses at the top of
//! the address space, stale ids) must return `Ok` or `Err`, never panic; the
//! printers, `explain` and guest accesses must work on whatever results.

use memtree::inspect::lookup::explain;
use memtree::qemu_text::print::{print_flat, print_tree, FlatOptions, TreeOptions};
use memtree::{MemTxAttrs, Memory, RegionId, RegionKind, SpaceId};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

const ADDRS: &[u64] = &[
    0,
    1,
    0xfff,
    0x1000,
    1 << 63,
    u64::MAX - 0xfff,
    u64::MAX - 1,
    u64::MAX,
];
const SIZES: &[u128] = &[
    0,
    1,
    0x1000,
    1 << 63,
    (1 << 64) - 1,
    1 << 64,
    (1 << 64) + 1,
    u128::MAX,
];
const KINDS: &[RegionKind] = &[
    RegionKind::Container,
    RegionKind::Ram,
    RegionKind::RomDevice,
    RegionKind::RamDevice,
    RegionKind::Mmio,
    RegionKind::Reservation,
    RegionKind::IoRoot,
];

fn run(seed: u64, steps: usize) {
    let mem = Memory::new();
    let mut rng = Rng(seed | 1);
    let mut regions: Vec<RegionId> = Vec::new();
    let mut spaces: Vec<SpaceId> = Vec::new();
    for step in 0..steps {
        let r = |rng: &mut Rng, regions: &[RegionId]| {
            if regions.is_empty() {
                None
            } else {
                Some(regions[(rng.next() % regions.len() as u64) as usize])
            }
        };
        match rng.next() % 16 {
            0 | 1 => {
                let size = rng.pick(SIZES);
                if let Ok(id) = mem.new_container(&format!("c{step}"), size, None) {
                    regions.push(id);
                }
            }
            2 => {
                let kind = rng.pick(KINDS);
                let size = rng.pick(SIZES);
                if let Ok(id) = mem.new_model_region(&format!("m{step}"), kind, size, None) {
                    regions.push(id);
                }
            }
            3 => {
                let size = rng.pick(&[1u64, 0x1000, 0x2000]);
                if let Ok(id) = mem.new_ram(&format!("r{step}"), u128::from(size), None) {
                    regions.push(id);
                }
            }
            4 => {
                if let Some(t) = r(&mut rng, &regions) {
                    let (off, size) = (rng.pick(ADDRS), rng.pick(SIZES));
                    if let Ok(id) = mem.new_alias(&format!("a{step}"), t, off, size, None) {
                        regions.push(id);
                    }
                }
            }
            5..=7 => {
                if let (Some(c), Some(s)) = (r(&mut rng, &regions), r(&mut rng, &regions)) {
                    let prio = rng.pick(&[i32::MIN, -1, 0, 1, i32::MAX]);
                    let _ = mem.add_subregion_overlap(c, rng.pick(ADDRS), s, prio);
                }
            }
            8 => {
                if let (Some(c), Some(s)) = (r(&mut rng, &regions), r(&mut rng, &regions)) {
                    let _ = mem.del_subregion(c, s);
                }
            }
            9 => {
                if let Some(x) = r(&mut rng, &regions) {
                    let _ = mem.set_address(x, rng.pick(ADDRS));
                    let _ = mem.set_alias_offset(x, rng.pick(ADDRS));
                }
            }
            10 => {
                if let Some(x) = r(&mut rng, &regions) {
                    let _ = mem.set_size(x, rng.pick(SIZES));
                }
            }
            11 => {
                if let Some(x) = r(&mut rng, &regions) {
                    let _ = mem.set_enabled(x, rng.next() % 2 == 0);
                    let _ = mem.set_readonly(x, rng.next() % 2 == 0);
                    let _ = mem.set_romd(x, rng.next() % 2 == 0);
                }
            }
            12 => {
                if let Some(x) = r(&mut rng, &regions) {
                    let _ = mem.destroy_region(x);
                }
            }
            13 => {
                if let Some(x) = r(&mut rng, &regions) {
                    if let Ok(s) = mem.new_address_space(&format!("as{step}"), x, None) {
                        spaces.push(s);
                    }
                }
            }
            14 => {
                if let Some(x) = r(&mut rng, &regions) {
                    let _ = mem.add_coalescing(x, rng.pick(ADDRS), rng.pick(SIZES));
                }
            }
            _ => {
                for &s in &spaces {
                    let Ok(h) = mem.address_space(s) else {
                        continue;
                    };
                    let addr = rng.pick(ADDRS);
                    let mut buf = [0u8; 16];
                    let _ = h.read(addr, &mut buf, MemTxAttrs::default());
                    let _ = h.write(addr, &buf, MemTxAttrs::default());
                    let _ = h.load::<u64>(addr, memtree::Endian::Little, MemTxAttrs::default());
                    let _ = explain(&mem, s, addr);
                }
                let mut out = String::new();
                print_tree(&mem, &mut out, TreeOptions::default()).unwrap();
                print_flat(&mem, &mut out, FlatOptions::default()).unwrap();
            }
        }
    }
    let _ = mem.teardown();
}

#[test]
fn machine_api_never_panics_on_extreme_arguments() {
    let seeds: u64 = if cfg!(miri) { 2 } else { 100 };
    for seed in 0..seeds {
        let r = std::panic::catch_unwind(|| run(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 200));
        assert!(r.is_ok(), "seed {seed} panicked");
    }
}

/// A device's finalizer (or the drop of its ops) may run inside an edit,
/// while the topology is being changed: calling back into the machine from
/// there must be refused or served, never panic.
#[test]
fn machine_finalizer_run_by_an_edit_can_use_the_machine() {
    let mem = Memory::new();
    let weak = mem.downgrade();
    let dev = mem.new_owner("dev", None).unwrap();
    // Never mapped: unplug drops its core (and so the owner) inside the edit.
    mem.new_container("lonely", 0x1000, Some(dev)).unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen2 = seen.clone();
    mem.set_finalizer(
        dev,
        Box::new(move || {
            let m = weak.upgrade().expect("machine alive during unplug");
            let found = m.find_region("lonely");
            let edit = m.new_container("from-finalizer", 0x10, None).map(|_| ());
            let t = m.begin();
            drop(t);
            *seen2.lock().unwrap() = Some((found.is_some(), edit.is_ok()));
        }),
    )
    .unwrap();
    mem.unplug(dev).unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        Some((false, true)),
        "the finalizer ran before unplug returned, saw the region gone and could edit"
    );
    assert!(mem.find_region("from-finalizer").is_some());
}
