//! `FlatView::ranges_in` against a filter over `iter()` (issue 11: no path
//! copies a view's ranges; the window walk must equal a scan).

use memtree::Memory;

fn overlapping(view: &memtree::FlatView, start: u64, last: u64) -> Vec<(u64, u64)> {
    view.iter()
        .filter(|r| start <= last && r.start() <= last && r.last() >= start)
        .map(|r| (r.start(), r.last()))
        .collect()
}

/// Rule: `ranges_in(start, last)` is the ranges overlapping `[start, last]`
/// in address order (nothing when `start > last`), for views of one leaf
/// and of many, for bounds in ranges, in holes, before the first and past
/// the last range.
#[test]
fn ranges_in_equals_the_overlapping_ranges() {
    for n in [3u64, 70, 300, 5000] {
        let memory = Memory::new();
        let root = memory.new_container("root", 1 << 64, None).unwrap();
        let t = memory.begin();
        for i in 0..n {
            // RAM pages at 0x10000 + i * 0x3000 (holes between them).
            let r = memory.new_ram(&format!("r{i}"), 0x1000, None).unwrap();
            memory.add_subregion(root, 0x10000 + i * 0x3000, r).unwrap();
        }
        t.commit();
        let space = memory.new_address_space("s", root, None).unwrap();
        let view = memory.address_space(space).unwrap().view();
        assert_eq!(view.len() as u64, n);
        let end = 0x10000 + n * 0x3000;
        let mut probes = vec![0u64, 1, 0xffff, 0x10000, 0x10fff, 0x11000, 0x12fff, 0x13000];
        for k in [n / 2, n - 1, n.saturating_sub(2)] {
            let b = 0x10000 + k * 0x3000;
            probes.extend([b - 1, b, b + 0x800, b + 0xfff, b + 0x1000, b + 0x2fff]);
        }
        probes.extend([end - 1, end, end + 0x5000, u64::MAX - 1, u64::MAX]);
        for &s in &probes {
            for &l in &probes {
                let got: Vec<(u64, u64)> = view
                    .ranges_in(s, l)
                    .map(|r| (r.start(), r.last()))
                    .collect();
                assert_eq!(got, overlapping(&view, s, l), "n {n}: [{s:#x}, {l:#x}]");
            }
        }
    }
}
