//! The POWER8-like scale generator refuses configurations it cannot build
//! (issue 11, review 5, finding 18).

use memtree::scale::{build_power8, Power8Config};
use memtree::Memory;

/// Rule (bad input is an error, never a panic): a configuration with
/// devices but no bridge must be refused with an error, not index out of
/// bounds.
#[test]
fn power8_with_devices_and_no_bridge_is_an_error_not_a_panic() {
    let memory = Memory::new();
    let config = Power8Config {
        vcpus: 1,
        devices: 2,
        bridges: 0,
        queues: 1,
    };
    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        build_power8(&memory, config).map(|m| m.devices.len())
    }));
    match got {
        Ok(r) => assert!(r.is_err(), "{config:?} built {r:?}"),
        Err(p) => panic!(
            "build_power8 panicked on {config:?}: {:?}",
            p.downcast_ref::<String>()
        ),
    }
}

/// Rule (the generator's machine is what it reports): a bridge holds at
/// most `BRIDGE_WINDOW / DEVICE_STRIDE` devices; more would put BARs
/// outside the bridge's window (clipped by it) while `msix_addr` still
/// reports them there, so the configuration is refused.
#[test]
fn power8_with_more_devices_than_a_bridge_window_holds_is_an_error() {
    use memtree::scale::{ScaleError, BRIDGE_WINDOW, DEVICE_STRIDE};
    let memory = Memory::new();
    let per_bridge = (BRIDGE_WINDOW / DEVICE_STRIDE) as usize;
    let config = Power8Config {
        vcpus: 1,
        devices: 2 * per_bridge + 1,
        bridges: 2,
        queues: 1,
    };
    let got = build_power8(&memory, config).map(|m| m.devices.len());
    assert!(
        matches!(got, Err(ScaleError::BridgeFull { .. })),
        "{config:?}: {got:?}"
    );
    let no_bridge = build_power8(
        &memory,
        Power8Config {
            bridges: 0,
            ..config
        },
    )
    .map(|m| m.devices.len());
    assert!(
        matches!(no_bridge, Err(ScaleError::NoBridge { .. })),
        "{no_bridge:?}"
    );
}
