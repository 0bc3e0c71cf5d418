//! The importer on small hand-written dumps that show what an `info mtree`
//! dump cannot say by itself: which of two overlapping equal-priority
//! siblings wins (learned from the `-f` dump, guessed without it) and
//! whether a leaf `i/o` region is MMIO or an empty container (learned from
//! the `-f` dump's grouping of address spaces into the shared empty view).

use memtree::qemu_text::import::import;
use memtree::qemu_text::parse::{parse_flat, parse_tree};
use memtree::qemu_text::print::{print_flat, FlatOptions};

/// Top-level blocks sorted, `FlatView #N` renumbered (QEMU prints its
/// blocks in hash order).
fn canon(text: &str) -> Vec<String> {
    let mut blocks: Vec<String> = text
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let b = b.trim_matches('\n');
            match b.strip_prefix("FlatView #") {
                Some(rest) => format!(
                    "FlatView #?{}",
                    rest.trim_start_matches(|c: char| c.is_ascii_digit())
                ),
                None => b.to_owned(),
            }
        })
        .collect();
    blocks.sort();
    blocks
}

/// Imports `tree` (with `flat` when `learn`) and prints memtree's flat views.
fn flat_of(tree: &str, flat: &str, learn: bool) -> (String, memtree::qemu_text::import::Imported) {
    let t = parse_tree(tree).unwrap();
    let f = parse_flat(flat).unwrap();
    let imported = import(&t, learn.then_some(&f), None).unwrap();
    let mut out = String::new();
    print_flat(&imported.memory, &mut out, FlatOptions { owners: false }).unwrap();
    (out, imported)
}

// ---- empty containers vs MMIO ---------------------------------------------------

/// Shape 1: an address space over an `i/o` region with no subregions (an
/// interrupt controller's space), sharing the empty view with another space
/// whose root is plainly empty.
const EMPTY_ROOT_TREE: &str = "\
address-space: memory
  0000000000000000-00000000ffffffff (prio 0, i/o): system
    0000000000000000-0000000000000fff (prio 0, ram): ram
    0000000000100000-0000000000100fff (prio 0, ram): ram-hi
    0000000000100000-0000000000100fff (prio 0, ram): ram-hi

address-space: dma
  0000000000000000-00000000ffffffff (prio 0, i/o): dma-root
    0000000000000000-00000000ffffffff (prio 0, i/o): dma-window [disabled]

address-space: intc
  0000000000000000-0000000000000fff (prio 0, i/o): intc-space

";

const EMPTY_ROOT_FLAT: &str = "\
FlatView #0
 AS \"memory\", root: system
 Root memory region: system
  0000000000000000-0000000000000fff (prio 0, ram): ram
  0000000000100000-0000000000100fff (prio 0, ram): ram-hi

FlatView #1
 AS \"dma\", root: dma-root
 AS \"intc\", root: intc-space
 Root memory region: (none)
  No rendered FlatView

";

#[test]
fn import_empty_io_root_in_the_shared_empty_view_is_a_container() {
    let (out, imported) = flat_of(EMPTY_ROOT_TREE, EMPTY_ROOT_FLAT, true);
    assert_eq!(canon(&out), canon(EMPTY_ROOT_FLAT), "{out}");
    assert!(
        imported
            .learned
            .iter()
            .any(|f| f.contains("\"intc-space\"") && f.contains("pure container")),
        "{:?}",
        imported.learned
    );
    // Without the flat dump the leaf is a guess (MMIO), and memtree says so.
    let (out, imported) = flat_of(EMPTY_ROOT_TREE, EMPTY_ROOT_FLAT, false);
    assert!(out.contains("intc-space"), "{out}");
    assert!(
        imported
            .guessed
            .iter()
            .any(|g| g.contains("\"intc-space\"") && g.contains("MMIO")),
        "{:?}",
        imported.guessed
    );
}

/// Shape 2: a PCI host bridge's bus-master space: a container whose only
/// subregion is an alias of the whole of an empty "pci bus memory".
const EMPTY_BUS_TREE: &str = "\
address-space: memory
  0000000000000000-00000000ffffffff (prio 0, i/o): system
    0000000000000000-0000000000000fff (prio 0, ram): ram
    0000000000100000-0000000000100fff (prio 0, ram): ram-hi
    0000000000100000-0000000000100fff (prio 0, ram): ram-hi

address-space: dma
  0000000000000000-00000000ffffffff (prio 0, i/o): dma-root
    0000000000000000-00000000ffffffff (prio 0, i/o): dma-window [disabled]

address-space: pci-host
  0000000000000000-ffffffffffffffff (prio 0, i/o): bus master container
    0000000000000000-ffffffffffffffff (prio 0, i/o): alias bus master @pci bus memory 0000000000000000-ffffffffffffffff

memory-region: pci bus memory
  0000000000000000-ffffffffffffffff (prio 0, i/o): pci bus memory

";

const EMPTY_BUS_FLAT: &str = "\
FlatView #0
 AS \"memory\", root: system
 Root memory region: system
  0000000000000000-0000000000000fff (prio 0, ram): ram
  0000000000100000-0000000000100fff (prio 0, ram): ram-hi

FlatView #1
 AS \"dma\", root: dma-root
 AS \"pci-host\", root: bus master container
 Root memory region: (none)
  No rendered FlatView

";

#[test]
fn import_bus_master_space_over_an_empty_bus_is_in_the_empty_view() {
    let (out, imported) = flat_of(EMPTY_BUS_TREE, EMPTY_BUS_FLAT, true);
    assert_eq!(canon(&out), canon(EMPTY_BUS_FLAT), "{out}");
    assert!(
        imported
            .learned
            .iter()
            .any(|f| f.contains("\"pci bus memory\"") && f.contains("pure container")),
        "{:?}",
        imported.learned
    );
}

// ---- sibling order ------------------------------------------------------------------

/// Two overlapping siblings of equal priority at different addresses: the
/// tree dump prints them by address, QEMU's list order (newest first) is not
/// printed. Here the later-added `unimp` window (printed first) loses to the
/// `uart` in QEMU's flat view.
const ORDER_TREE: &str = "\
address-space: memory
  0000000000000000-00000000ffffffff (prio 0, i/o): system
    0000000000001000-0000000000001fff (prio 0, i/o): unimp
    0000000000001800-00000000000018ff (prio 0, i/o): uart

";

const ORDER_FLAT_UART_WINS: &str = "\
FlatView #0
 AS \"memory\", root: system
 Root memory region: system
  0000000000001000-00000000000017ff (prio 0, i/o): unimp
  0000000000001800-00000000000018ff (prio 0, i/o): uart
  0000000000001900-0000000000001fff (prio 0, i/o): unimp @0000000000000900

";

const ORDER_FLAT_UNIMP_WINS: &str = "\
FlatView #0
 AS \"memory\", root: system
 Root memory region: system
  0000000000001000-0000000000001fff (prio 0, i/o): unimp

";

#[test]
fn import_learns_the_order_of_overlapping_equal_priority_siblings() {
    for flat in [ORDER_FLAT_UART_WINS, ORDER_FLAT_UNIMP_WINS] {
        let (out, imported) = flat_of(ORDER_TREE, flat, true);
        assert_eq!(canon(&out), canon(flat), "{out}");
        assert!(
            imported.guessed.is_empty(),
            "with the -f dump nothing is guessed: {:?}",
            imported.guessed
        );
    }
}

#[test]
fn import_without_flat_dump_says_the_sibling_order_is_guessed() {
    let (_, imported) = flat_of(ORDER_TREE, ORDER_FLAT_UART_WINS, false);
    assert!(
        imported
            .guessed
            .iter()
            .any(|g| g.contains("\"unimp\"") && g.contains("\"uart\"") && g.contains("order")),
        "{:?}",
        imported.guessed
    );
}

// ---- non-unique names ---------------------------------------------------------------

/// Two regions named "mac.io" (a 4 KiB one holding an alias to "via", a
/// 16-byte leaf) and a "via" holding an alias to "mac.io". The sections are
/// not in queue order (as after editing), so targets are matched by name:
/// the first free "mac.io" for the `memory` alias makes "via" -> "mac.io" ->
/// "via" a cycle QEMU cannot have. The sizes and the absence of cycles
/// decide: `io` targets the 4 KiB one, `via-io` the 16-byte one.
const SAME_NAME_TREE: &str = "\
address-space: memory
  0000000000000000-00000000ffffffff (prio 0, i/o): system
    0000000000001000-0000000000001fff (prio 0, i/o): alias io @mac.io 0000000000000000-0000000000000fff

memory-region: via
  0000000000000000-00000000000000ff (prio 0, i/o): via
    0000000000000000-000000000000000f (prio 0, i/o): alias via-io @mac.io 0000000000000000-000000000000000f

memory-region: mac.io
  0000000000000000-000000000000000f (prio 0, i/o): mac.io

memory-region: mac.io
  0000000000000000-0000000000000fff (prio 0, i/o): mac.io
    0000000000000100-00000000000001ff (prio 0, i/o): alias via-win @via 0000000000000000-00000000000000ff

";

const SAME_NAME_FLAT: &str = "\
FlatView #0
 AS \"memory\", root: system
 Root memory region: system
  0000000000001000-00000000000010ff (prio 0, i/o): mac.io
  0000000000001100-000000000000110f (prio 0, i/o): mac.io
  0000000000001110-00000000000011ff (prio 0, i/o): via @0000000000000010
  0000000000001200-0000000000001fff (prio 0, i/o): mac.io @0000000000000200

";

#[test]
fn import_same_named_alias_targets_are_chosen_without_a_false_cycle() {
    let (out, imported) = flat_of(SAME_NAME_TREE, SAME_NAME_FLAT, true);
    assert_eq!(canon(&out), canon(SAME_NAME_FLAT), "{out}");
    // Sizes decide here (the 16-byte "mac.io" cannot hold `io`'s 4 KiB
    // window), but both "mac.io" fit `via-io`'s window: said, not hidden.
    assert!(
        imported
            .guessed
            .iter()
            .any(|g| g.contains("\"via-io\"") && g.contains("2 different regions named \"mac.io\"")),
        "{:?}",
        imported.guessed
    );
}

/// Only a cycle is impossible: when no choice avoids one, the error names
/// the alias and says why, instead of claiming a cycle QEMU cannot have.
#[test]
fn import_reports_when_no_same_named_target_fits() {
    let tree = "\
address-space: memory
  0000000000000000-00000000ffffffff (prio 0, i/o): system
    0000000000001000-0000000000001fff (prio 0, i/o): alias io @a 0000000000000000-0000000000000fff

memory-region: b
  0000000000000000-0000000000000fff (prio 0, i/o): b
    0000000000000000-0000000000000fff (prio 0, i/o): alias to-a @a 0000000000000000-0000000000000fff

memory-region: a
  0000000000000000-0000000000000fff (prio 0, i/o): a
    0000000000000000-0000000000000fff (prio 0, i/o): alias to-b @b 0000000000000000-0000000000000fff

";
    let err = import(&parse_tree(tree).unwrap(), None, None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("fits as its target") || msg.contains("cycle"),
        "{msg}"
    );
}
