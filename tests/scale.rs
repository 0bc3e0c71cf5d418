//! The POWER8-class machine of `memtree::scale`: built one commit per
//! realize, programmed one commit per BAR, notifiers in one transaction.
//! Every published view equals a full render, the incremental and the
//! full-render machines publish the same views, and the system-memory view
//! is checked against the layout (brute-force reference) at every range
//! boundary.

use memtree::scale::{build_power8, Power8Config};
use memtree::Memory;

fn boundary_check(config: Power8Config) {
    let memory = Memory::new();
    let machine = build_power8(&memory, config).unwrap();
    assert_eq!(machine.commits, 1 + 4 * config.devices + 1);
    memory.check_views_against_full_render().unwrap();
    let view = memory.address_space(machine.memory_space).unwrap().view();
    let mut probes = vec![0u64, u64::MAX];
    for r in view.ranges() {
        probes.extend([
            r.start(),
            r.last(),
            r.start().wrapping_sub(1),
            r.last().wrapping_add(1),
        ]);
    }
    for a in probes {
        let got = view.lookup(a).map(|r| r.region().name().to_owned());
        assert_eq!(got, machine.expected_at(a), "address {a:#x}");
    }
    // Every device's bus-master space shows system memory.
    for dev in &machine.devices {
        let v = memory.address_space(dev.dma_space).unwrap().view();
        assert_eq!(v.ranges().len(), view.ranges().len());
    }
    // The reference path builds the same views.
    let reference = Memory::new();
    reference.set_incremental_render(false);
    let ref_machine = build_power8(&reference, config).unwrap();
    let rv = reference
        .address_space(ref_machine.memory_space)
        .unwrap()
        .view();
    let key = |v: &memtree::FlatView| {
        v.ranges()
            .iter()
            .map(|r| {
                (
                    r.start(),
                    r.last(),
                    r.region().name().to_owned(),
                    r.offset_in_region(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(key(&view), key(&rv));
}

#[test]
fn scale_small_power8_renders_identically_and_matches_its_layout() {
    boundary_check(Power8Config {
        vcpus: 4,
        devices: 20,
        bridges: 3,
        queues: 3,
    });
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "about 20 s in a debug build: run with --release (or --ignored)"
)]
fn scale_qemu_largest_power8_renders_identically_and_matches_its_layout() {
    boundary_check(Power8Config::qemu_largest());
}
