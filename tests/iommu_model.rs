//! A model-based check of translated accesses: the reference keeps its own
//! copy of the target RAM (issue 10, review 5, finding 15).

#[path = "../examples/iommu_pagetable.rs"]
mod pagetable;

use memtree::access::iommu::IommuPerm;
use memtree::{Endian, MemTxAttrs};
use pagetable::setup;

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

/// Rule ("a denied or failed translation makes that piece a decode error
/// (reads return zeros)"; every byte of an access goes where its page's
/// translation sends it, and nowhere else): random buffer reads and writes
/// and typed loads and stores through a warm `SpaceCursor`, through a page
/// table that changes (with invalidation) between accesses, agree byte for
/// byte with a reference that translates each byte itself and keeps its own
/// model of the target RAM; after every access the target RAM equals the
/// model (a write that lands where no translation allows it is caught,
/// which comparing reads with live memory cannot see).
///
/// 24 seeds of 200 accesses by default; `MEMTREE_IOMMU_MODEL_SEEDS=n` runs
/// `n`.
#[test]
fn translated_accesses_change_only_what_the_translation_allows() {
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }
    const BASE: u64 = 0x40_0000;
    const SPAN: usize = 64 * 0x1000;
    let seeds: u64 = std::env::var("MEMTREE_IOMMU_MODEL_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    for seed in 1..=seeds {
        let mut rng = Rng((seed * 0x9e37_79b9) | 1);
        let s = setup(12, 16);
        let mut model: Vec<u8> = (0..SPAN as u32).map(|i| (i * 7 + 3) as u8).collect();
        s.system.write(BASE, &model, A).into_result().unwrap();
        let mut ptes = [(0u64, 0u8); 16];
        for (i, p) in ptes.iter_mut().enumerate() {
            *p = (rng.next() % 64, (rng.next() % 4) as u8);
            s.map(i as u64, BASE + p.0 * 0x1000, IommuPerm::from_bits(p.1));
        }
        let mut cur = s.dma.cursor();
        for _ in 0..200 {
            let gpa = |ptes: &[(u64, u8); 16], iova: u64, write: bool| -> Option<usize> {
                let idx = (iova >> 12) as usize;
                let (page, perm) = *ptes.get(idx)?;
                let need = if write {
                    IommuPerm::Write
                } else {
                    IommuPerm::Read
                };
                IommuPerm::from_bits(perm)
                    .allows(need)
                    .then(|| (page * 0x1000 + (iova & 0xfff)) as usize)
            };
            let addr = rng.next() % 0x11000;
            match rng.next() % 5 {
                0 => {
                    // Remap one entry and invalidate it.
                    let i = (rng.next() % 16) as usize;
                    ptes[i] = (rng.next() % 64, (rng.next() % 4) as u8);
                    s.map(
                        i as u64,
                        BASE + ptes[i].0 * 0x1000,
                        IommuPerm::from_bits(ptes[i].1),
                    );
                    // `map` wrote the PTE into table RAM, outside the model.
                }
                1 => {
                    let len = 1 + (rng.next() % 40) as usize;
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    let r = s.dma.write(addr, &data, A);
                    let mut ok = true;
                    for (i, b) in data.iter().enumerate() {
                        match gpa(&ptes, addr + i as u64, true) {
                            Some(g) => model[g] = *b,
                            None => ok = false,
                        }
                    }
                    assert_eq!(r.is_ok(), ok, "seed {seed}: write {addr:#x}+{len}");
                }
                2 => {
                    let len = 1 + (rng.next() % 40) as usize;
                    let mut buf = vec![0xeeu8; len];
                    let r = s.dma.read(addr, &mut buf, A);
                    let mut ok = true;
                    for (i, b) in buf.iter().enumerate() {
                        let want = match gpa(&ptes, addr + i as u64, false) {
                            Some(g) => model[g],
                            None => {
                                ok = false;
                                0
                            }
                        };
                        assert_eq!(*b, want, "seed {seed}: read {addr:#x}+{i}");
                    }
                    assert_eq!(r.is_ok(), ok, "seed {seed}: read {addr:#x}+{len}");
                }
                3 => {
                    let v = rng.next() as u32;
                    let r = cur.store::<u32>(addr, v, Endian::Little, A);
                    let gs: Vec<Option<usize>> =
                        (0..4).map(|i| gpa(&ptes, addr + i, true)).collect();
                    for (i, g) in gs.iter().enumerate() {
                        if let Some(g) = g {
                            model[*g] = v.to_le_bytes()[i];
                        }
                    }
                    assert_eq!(r.is_ok(), gs.iter().all(Option::is_some), "seed {seed}");
                }
                _ => {
                    let (v, r) = cur.load::<u32>(addr, Endian::Little, A);
                    let gs: Vec<Option<usize>> =
                        (0..4).map(|i| gpa(&ptes, addr + i, false)).collect();
                    let want: Vec<u8> = gs.iter().map(|g| g.map_or(0, |g| model[g])).collect();
                    assert_eq!(r.is_ok(), gs.iter().all(Option::is_some), "seed {seed}");
                    assert_eq!(
                        v.to_le_bytes().to_vec(),
                        want,
                        "seed {seed}: load {addr:#x}"
                    );
                }
            }
            // The whole target area equals the model: nothing landed where
            // no translation allowed it.
            let mut live = vec![0u8; SPAN];
            s.system.read(BASE, &mut live, A).into_result().unwrap();
            if live != model {
                let at = live.iter().zip(&model).position(|(a, b)| a != b).unwrap();
                panic!(
                    "seed {seed}: RAM differs from the model at {:#x}",
                    BASE + at as u64
                );
            }
        }
    }
}
