//! `memtree::inspect::lookup::explain` on a machine described in TOML: clipping by a
//! container, equal-priority siblings, alias arithmetic and alias windows.
//! (Moved from the core's unit tests: it needs the CLI's machine files.)

use memtree::inspect::lookup::{explain, ClipKind, Fate, Obscured};
use memtree::Memory;
use memtree_cli::machine_file::{load_str, LoadOptions};

/// The verdict of `explain` is what the published flat view says, at
/// every boundary of every flat range of every address space (and just
/// outside each range).
fn assert_agrees_with_flat_view(mem: &Memory) -> usize {
    let mut checked = 0;
    for (id, name) in mem.address_spaces() {
        let view = mem.address_space(id).unwrap().view();
        let mut addrs = vec![0, u64::MAX];
        for r in view.ranges() {
            addrs.extend([r.start(), r.last()]);
            addrs.extend(r.start().checked_sub(1));
            addrs.extend(r.last().checked_add(1));
            addrs.push(r.start() + (r.last() - r.start()) / 2);
        }
        addrs.sort_unstable();
        addrs.dedup();
        for a in addrs {
            let why = explain(mem, id, a).unwrap();
            let expected = view
                .lookup(a)
                .map(|r| (r.region().id(), r.offset_in_region() + (a - r.start())));
            let got = why.verdict.as_ref().map(|v| (v.region, v.offset));
            assert_eq!(
                got, expected,
                "address space {name:?}, address {a:#x}:\n{why:#}"
            );
            let serving = why
                .candidates
                .iter()
                .filter(|c| c.fate == Fate::Serves)
                .count();
            assert_eq!(serving, usize::from(expected.is_some()), "{why:#}");
            checked += 1;
        }
    }
    checked
}

const SRC: &str = r#"
[[region]]
name = "root"
kind = "container"
size = "2^32"
[[region]]
name = "win"
kind = "container"
size = "0x1000"
parent = "root"
offset = "0x10000"
[[region]]
name = "big"
kind = "mmio"
size = "0x2000"
parent = "win"
[[region]]
name = "old"
kind = "mmio"
size = "0x100"
parent = "root"
[[region]]
name = "new"
kind = "mmio"
size = "0x100"
parent = "root"
[[region]]
name = "ram"
kind = "ram"
size = "0x1000"
[[region]]
name = "window"
kind = "alias"
target = "ram"
alias-offset = "0x800"
size = "0x100"
parent = "root"
offset = "0x20000"
[[address-space]]
name = "memory"
root = "root"
"#;

#[test]
fn lookup_explains_clipping_and_equal_priority_order() {
    let m = load_str(SRC, LoadOptions::default()).unwrap();
    let mem = &m.memory;
    let space = m.spaces[0];
    assert!(assert_agrees_with_flat_view(mem) > 0);
    // "big" pokes out of its 4 KiB container.
    let why = explain(mem, space, 0x11000).unwrap();
    assert_eq!(why.verdict, None);
    let big = why.candidates.iter().find(|c| c.name == "big").unwrap();
    assert!(
        matches!(&big.fate, Fate::Clipped { by, kind: ClipKind::Container, .. } if by == "win"),
        "{why:#}"
    );
    // Equal priority: the later-added "new" wins over "old".
    let why = explain(mem, space, 0x10).unwrap();
    assert_eq!(why.verdict.as_ref().unwrap().name, "new");
    let old = why.candidates.iter().find(|c| c.name == "old").unwrap();
    assert!(
        matches!(&old.fate, Fate::Obscured { why: Obscured::NewerSibling { sibling, .. }, .. } if sibling == "new"),
        "{why:#}"
    );
    // Alias arithmetic: offset inside the target.
    let why = explain(mem, space, 0x20010).unwrap();
    let v = why.verdict.unwrap();
    assert_eq!((v.name.as_str(), v.offset), ("ram", 0x810));
    // Outside the alias window the target is a clipped candidate.
    let why = explain(mem, space, 0x20000 - 0x800).unwrap();
    assert_eq!(why.verdict, None);
    assert!(why.candidates.iter().any(|c| c.name == "ram"
        && matches!(
            &c.fate,
            Fate::Clipped {
                kind: ClipKind::AliasWindow,
                ..
            }
        )));
}
