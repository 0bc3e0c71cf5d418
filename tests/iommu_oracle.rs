//! IOMMU regions print as QEMU 7.2 prints them (issue 10): the q35 machines
//! with intel-iommu (three variants), amd-iommu and virtio-iommu are rebuilt
//! with *real* IOMMU regions through the API, and every print (`info mtree`,
//! `-D`, `-f`, `-o`, `-f -o`) must equal QEMU's dump of that machine, modulo
//! block order and FlatView numbering.
//!
//! A tree dump cannot tell an IOMMU region from MMIO, so each machine is
//! first imported from its dump (which makes the IOMMU regions MMIO) and
//! then every IOMMU region is swapped, in one transaction, for an IOMMU
//! region of the same name, size, owner, place, priority, state and
//! subregions, keeping the order of equal-priority siblings. What is printed
//! afterwards is printed from IOMMU regions.

#[path = "support/oracle_compare.rs"]
mod oracle_compare;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memtree::access::iommu::{Iommu, IommuHub, IommuPerm, IotlbEntry, WeakAddressSpace};
use memtree::qemu_text::import::import;
use memtree::qemu_text::parse::{parse_flat, parse_tree, parse_tree_strict};
use memtree::qemu_text::print::{print_flat, print_tree, FlatOptions, TreeOptions};
use memtree::{Endian, Machine, MemTxAttrs, MemTxResult, Memory, RegionId, RegionKind};
use oracle_compare::{compare, strip_accel};
use parking_lot::Mutex;

/// An IOMMU translating every 4 KiB page to itself in its target, counting
/// its translations.
struct IdentityIommu {
    target: Mutex<Option<WeakAddressSpace>>,
    translations: AtomicU64,
}

impl Iommu for IdentityIommu {
    fn translate(&self, addr: u64, _access: IommuPerm, _idx: u32) -> IotlbEntry {
        self.translations.fetch_add(1, Ordering::Relaxed);
        match self.target.lock().as_ref().and_then(|t| t.upgrade()) {
            Some(t) => IotlbEntry {
                target: Some(t),
                iova: addr & !0xfff,
                translated_addr: addr & !0xfff,
                addr_mask: 0xfff,
                perm: IommuPerm::ReadWrite,
            },
            None => IotlbEntry::denied(addr, 0xfff),
        }
    }
}

fn read(name: &str, suffix: &str) -> Option<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/oracle/variants")
        .join(format!("{name}{suffix}"));
    std::fs::read_to_string(p).ok()
}

/// Removes every subregion of `container` and maps `order` into it again,
/// each at its old address and priority (`order` in printed order, with
/// replacements already substituted), so that equal-priority siblings keep
/// their order: a region added later goes before its equal-priority
/// siblings, so adding in reverse printed order restores the printed order.
fn remap_children(m: &Machine, container: RegionId, order: &[(RegionId, u64, i32)]) {
    for sub in m.region_info(container).unwrap().subregions {
        m.del_subregion(container, sub).unwrap();
    }
    for &(sub, addr, prio) in order.iter().rev() {
        m.add_subregion_overlap(container, addr, sub, prio).unwrap();
    }
}

/// Swaps every region `is_iommu` picks for a real IOMMU region (one
/// transaction); returns the new regions and their devices.
fn swap_in_iommus(
    memory: &Memory,
    is_iommu: impl Fn(&str) -> bool,
) -> Vec<(RegionId, Arc<IdentityIommu>)> {
    let mut picked: Vec<RegionId> = Vec::new();
    let mut stack: Vec<RegionId> = memory
        .address_spaces()
        .into_iter()
        .filter_map(|(id, _)| memory.address_space_root(id).unwrap())
        .collect();
    let mut seen = std::collections::HashSet::new();
    while let Some(r) = stack.pop() {
        if !seen.insert(r) {
            continue;
        }
        let info = memory.region_info(r).unwrap();
        if info.kind != RegionKind::Alias && info.container.is_some() && is_iommu(&info.name) {
            picked.push(r);
        }
        stack.extend(info.subregions.iter().copied());
        stack.extend(info.alias_target);
    }
    picked.sort_by_key(|r| memory.region_info(*r).unwrap().name);
    memory.transaction(|m| {
        let mut out = Vec::new();
        for old in picked {
            let info = m.region_info(old).unwrap();
            let dev = Arc::new(IdentityIommu {
                target: Mutex::new(None),
                translations: AtomicU64::new(0),
            });
            let new = m
                .new_iommu(
                    &info.name,
                    info.size,
                    dev.clone(),
                    IommuHub::new(),
                    info.owner,
                )
                .unwrap();
            // Its subregions move over in their order.
            let kids: Vec<(RegionId, u64, i32)> = info
                .subregions
                .iter()
                .map(|&k| {
                    let i = m.region_info(k).unwrap();
                    (k, i.addr, i.priority)
                })
                .collect();
            for &(k, _, _) in &kids {
                m.del_subregion(old, k).unwrap();
            }
            remap_children(m, new, &kids);
            // It takes the old region's place among its siblings.
            let parent = info.container.unwrap();
            let siblings: Vec<(RegionId, u64, i32)> = m
                .region_info(parent)
                .unwrap()
                .subregions
                .iter()
                .map(|&s| {
                    let i = m.region_info(s).unwrap();
                    (if s == old { new } else { s }, i.addr, i.priority)
                })
                .collect();
            remap_children(m, parent, &siblings);
            m.set_enabled(new, info.enabled).unwrap();
            m.destroy_region(old).unwrap();
            assert_eq!(m.region_info(new).unwrap().kind, RegionKind::Iommu);
            out.push((new, dev));
        }
        out
    })
}

/// Every print of `name` (imported, IOMMU regions swapped in) against its
/// QEMU dumps; returns the swapped-in regions.
fn assert_prints_match(
    name: &str,
    is_iommu: impl Fn(&str) -> bool,
) -> (Memory, Vec<(RegionId, Arc<IdentityIommu>)>) {
    let disabled = read(name, ".disabled.txt").expect("oracle dump");
    let flat_txt = read(name, ".flat.txt").expect("flat dump");
    let tree = parse_tree_strict(&disabled).unwrap();
    let flat = parse_flat(&flat_txt).unwrap();
    let owner_txt = read(name, ".owner.txt");
    let owners = owner_txt.as_deref().map(|t| parse_tree(t).unwrap());
    let memory = import(&tree, Some(&flat), owners.as_ref())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .memory;
    let swapped = swap_in_iommus(&memory, is_iommu);

    let mut checks = vec![
        (
            "-D",
            disabled.clone(),
            TreeOptions {
                disabled: true,
                owners: false,
            },
        ),
        (
            "tree",
            read(name, ".mtree.txt").unwrap(),
            TreeOptions::default(),
        ),
    ];
    if let Some(t) = owner_txt {
        checks.push((
            "-o",
            t,
            TreeOptions {
                disabled: false,
                owners: true,
            },
        ));
    }
    for (what, theirs, opts) in checks {
        let mut ours = String::new();
        print_tree(&memory, &mut ours, opts).unwrap();
        let (_, _, ok, diff) = compare(&theirs, &ours, 3);
        assert!(ok, "{name} [{what}] differs from QEMU:\n{diff}");
    }
    for (what, suffix, owners) in [
        ("-f", ".flat.txt", false),
        ("-f -o", ".flat-owner.txt", true),
    ] {
        let Some(theirs) = read(name, suffix) else {
            continue;
        };
        let mut ours = String::new();
        print_flat(&memory, &mut ours, FlatOptions { owners }).unwrap();
        let (_, _, ok, diff) = compare(&strip_accel(&theirs), &ours, 3);
        assert!(ok, "{name} [{what}] differs from QEMU:\n{diff}");
    }
    (memory, swapped)
}

/// Rule: intel-iommu's per-device `vtd-XX.X-dmar` regions, made real IOMMU
/// regions, print exactly as QEMU 7.2 prints them in every dump; enabling
/// one (the guest turning DMAR on) sends that device's DMA through it.
#[test]
fn q35_intel_iommu_with_real_iommu_regions_prints_as_qemu() {
    for name in [
        "q35-intel-iommu",
        "q35-intel-iommu-plain",
        "q35-intel-iommu-intremap",
    ] {
        let (memory, swapped) = assert_prints_match(name, |n| n.ends_with("-dmar"));
        // One per PCI function: every dmar name the dump prints.
        let dump = read(name, ".disabled.txt").unwrap();
        let names: std::collections::BTreeSet<&str> = dump
            .lines()
            .filter_map(|l| l.split("): ").nth(1))
            .map(|n| n.trim_end_matches(" [disabled]"))
            .filter(|n| n.ends_with("-dmar"))
            .collect();
        assert!(names.len() >= 4, "{name}: {names:?}");
        assert_eq!(swapped.len(), names.len(), "{name}: {names:?}");
        if name != "q35-intel-iommu" {
            continue;
        }
        // The guest enables DMAR for device 01.0: its address space now
        // translates through the (identity) IOMMU into system memory.
        let sys = memory
            .address_space(memory.find_address_space("memory").unwrap())
            .unwrap();
        let dmar = memory.find_region("vtd-01.0-dmar").unwrap();
        let (_, dev) = swapped.iter().find(|(r, _)| *r == dmar).unwrap();
        *dev.target.lock() = Some(sys.downgrade());
        let nodmar = memory
            .region_info(memory.find_region("vtd-01.0").unwrap())
            .unwrap()
            .subregions
            .into_iter()
            .find(|r| memory.region_info(*r).unwrap().name == "vtd-nodmar")
            .unwrap();
        memory.transaction(|m| {
            m.set_enabled(dmar, true).unwrap();
            m.set_enabled(nodmar, false).unwrap();
        });
        let space = memory
            .address_spaces()
            .into_iter()
            .find(|(id, _)| {
                let root = memory.address_space_root(*id).unwrap().unwrap();
                memory.region_info(root).unwrap().name == "vtd-01.0"
            })
            .map(|(id, _)| memory.address_space(id).unwrap())
            .unwrap();
        // Imported RAM is a model without memory: give system memory some.
        let root = memory.address_space_root(memory.find_address_space("memory").unwrap());
        let ram = memory.new_ram("test-ram", 1 << 20, None).unwrap();
        memory
            .add_subregion_overlap(root.unwrap().unwrap(), 1 << 40, ram, 10)
            .unwrap();
        let a = MemTxAttrs::UNSPECIFIED;
        assert!(sys
            .store::<u32>((1 << 40) + 0x10, 0xfeed_f00d, Endian::Little, a)
            .is_ok());
        assert_eq!(
            space.load::<u32>((1 << 40) + 0x10, Endian::Little, a),
            (0xfeed_f00d, MemTxResult::OK)
        );
        assert!(dev.translations.load(Ordering::Relaxed) >= 1);
        let mut out = String::new();
        print_tree(&memory, &mut out, TreeOptions::default()).unwrap();
        assert!(
            out.contains("    0000000000000000-ffffffffffffffff (prio 0, i/o): vtd-01.0-dmar\n")
        );
    }
}

/// Rule: amd-iommu's `amd_iommu` regions, made real IOMMU regions, print
/// exactly as QEMU 7.2 prints them.
#[test]
fn q35_amd_iommu_with_real_iommu_regions_prints_as_qemu() {
    let (_, swapped) = assert_prints_match("q35-amd-iommu", |n| n == "amd_iommu");
    assert!(!swapped.is_empty());
}

/// Rule: virtio-iommu's `virtio-iommu-memory-region-B-D` regions (the ones
/// inside the same-named per-device roots), made real IOMMU regions, print
/// exactly as QEMU 7.2 prints them.
#[test]
fn q35_virtio_iommu_with_real_iommu_regions_prints_as_qemu() {
    let (_, swapped) = assert_prints_match("q35-virtio-iommu", |n| {
        n.starts_with("virtio-iommu-memory-region-")
    });
    assert!(!swapped.is_empty());
}
