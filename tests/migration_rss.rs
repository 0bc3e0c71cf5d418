//! The memory cost of a sparse import (adversarial review R7, R10), alone
//! in its own test binary: it measures the process's resident set, which
//! tests running in parallel would disturb.

use memtree::migration::{self, ReceiveConfig, SendConfig};
use memtree::{MemTxAttrs, Memory, SpaceId};

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A zero page costs nothing on the receiver, and one non-zero 4 KiB page
/// costs about one page, not a transparent huge page, whether the import
/// is moved in or copied: a 64 MiB source with one page written per 2 MiB
/// (32 pages) grows the receiver's RSS by far less than 8 MiB.
#[test]
#[cfg_attr(miri, ignore = "mmap, /proc")]
fn a_sparse_import_costs_its_non_zero_pages() {
    const BIG: u64 = 64 << 20;
    let mk = || -> (Memory, SpaceId) {
        let memory = Memory::new();
        let root = memory.new_container("system", 1 << 40, None).unwrap();
        let r = memory.new_ram("ram0", u128::from(BIG), None).unwrap();
        memory.add_subregion(root, 0, r).unwrap();
        let s = memory.new_address_space("memory", root, None).unwrap();
        (memory, s)
    };
    let (src, ss) = mk();
    let h = src.address_space(ss).unwrap();
    for i in 0..BIG / (2 << 20) {
        assert!(h.write(i * (2 << 20), &[1], A).is_ok());
    }
    let mut stream = Vec::new();
    migration::send(&src, ss, &mut stream, &SendConfig::default(), |_| {}).unwrap();
    drop(src);
    for move_pages in [true, false] {
        let (dst, ds) = mk();
        let before = rss_kib();
        let cfg = ReceiveConfig {
            move_pages,
            ..ReceiveConfig::default()
        };
        let st = migration::receive_with(&dst, ds, &stream[..], &cfg).unwrap();
        let grown = rss_kib().saturating_sub(before);
        assert_eq!(st.swapped, usize::from(move_pages));
        assert!(
            grown < 8 << 10,
            "receiving 32 non-zero pages (move {move_pages}) grew RSS by {grown} KiB"
        );
    }
}
