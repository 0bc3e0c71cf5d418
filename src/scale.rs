//! A machine at QEMU's largest scale, for tests, benchmarks and
//! `memtree demo --scale`.
//!
//! [`Power8Config::qemu_largest`] is the POWER8-class topology of the
//! qemu-devel reports: 255 vCPU address spaces, 255 virtio-net-pci devices
//! behind 40 PCI bridges. Each device has its config space (mapped in an
//! ECAM-like window at realize), a BAR with an MSI-X table and PBA, a modern
//! virtio BAR (common, ISR, device and notify regions; the notify region gets
//! one ioeventfd per queue, 3 queues) and a bus-master address space (an
//! alias of system memory, disabled until bus mastering is turned on).
//!
//! [`build_power8`] builds it the way QEMU does: one commit per device
//! realize; then programs it the way firmware does (each BAR placed and
//! enabled, one commit each, then bus mastering on, one commit); then enables
//! every device's host notifiers in one transaction. PCI config cycles are
//! not emulated: "sizing, placing and enabling a BAR by config writes" is the
//! topology edit those writes cause (map the BAR at its address).
//!
//! Invariant: the layout is a pure function of the configuration, so
//! [`Power8Machine::expected_at`] can tell, without rendering, which region
//! serves any address of system memory (the brute-force reference of the
//! tests). A configuration whose layout would not fit (devices but no
//! bridge, more devices on a bridge than its window holds, more config
//! spaces than the config window holds, bridges past 2^64) is refused with
//! a [`ScaleError`] before anything is built.

use std::sync::Arc;

use crate::region::attrs::{MmioOps, UnimplementedDevice};
use crate::region::ids::{RegionId, SpaceId};
use crate::region::region_core::RegionKind;
use crate::render::listener::EventNotifier;
use crate::topology::error::TopologyError;
use crate::topology::memory::Machine;

/// Size of guest RAM (a model region: no host memory behind it).
pub const RAM_SIZE: u64 = 64 << 30;
/// Base of the config-space window in system memory.
pub const CONFIG_BASE: u64 = 0x3f_0000_0000;
/// Size of one device's config space.
pub const CONFIG_SIZE: u64 = 0x1000;
/// Size of the config-space window (one [`CONFIG_SIZE`] space per device).
pub const CONFIG_WINDOW: u64 = 1 << 28;
/// Base of the first bridge window in system memory (bridge `b` at
/// `BRIDGE_BASE + b * BRIDGE_WINDOW`).
pub const BRIDGE_BASE: u64 = 0x40_0000_0000;
/// Size of a bridge's memory window.
pub const BRIDGE_WINDOW: u64 = 0x1_0000_0000;
/// Size of the MSI-X BAR (table in the first half, PBA in the second).
pub const MSIX_BAR_SIZE: u64 = 0x1000;
/// Size of the virtio BAR (common, ISR, device, notify: 4 KiB each).
pub const VIRTIO_BAR_SIZE: u64 = 0x4000;
/// Stride of device BARs inside a bridge window.
pub const DEVICE_STRIDE: u64 = 0x10_0000;

/// Why [`build_power8`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    /// Devices but no bridge to put their BARs behind.
    #[error("{devices} devices need at least one bridge")]
    NoBridge {
        /// Devices asked for.
        devices: usize,
    },
    /// A bridge would hold more devices than its window has room for.
    #[error("{per_bridge} devices on one bridge do not fit its window (at most {max})")]
    BridgeFull {
        /// Devices on the fullest bridge.
        per_bridge: usize,
        /// `BRIDGE_WINDOW / DEVICE_STRIDE`.
        max: u64,
    },
    /// More config spaces than the config window holds.
    #[error("{devices} config spaces do not fit the config window (at most {max})")]
    ConfigWindowFull {
        /// Devices asked for.
        devices: usize,
        /// `CONFIG_WINDOW / CONFIG_SIZE`.
        max: u64,
    },
    /// Bridge windows would pass the end of the address space.
    #[error("{bridges} bridge windows do not fit below 2^64 (at most {max})")]
    TooManyBridges {
        /// Bridges asked for.
        bridges: usize,
        /// How many fit.
        max: u64,
    },
    /// A topology edit failed.
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

impl Power8Config {
    /// Checks that the layout fits (see [`ScaleError`]).
    ///
    /// # Errors
    ///
    /// Every [`ScaleError`] but [`ScaleError::Topology`].
    pub fn check(&self) -> Result<(), ScaleError> {
        let (devices, bridges) = (self.devices, self.bridges);
        if devices > 0 && bridges == 0 {
            return Err(ScaleError::NoBridge { devices });
        }
        let max = (u64::MAX - BRIDGE_BASE) / BRIDGE_WINDOW;
        if bridges as u64 > max {
            return Err(ScaleError::TooManyBridges { bridges, max });
        }
        let per_bridge = devices.div_ceil(bridges.max(1));
        let max = BRIDGE_WINDOW / DEVICE_STRIDE;
        if per_bridge as u64 > max {
            return Err(ScaleError::BridgeFull { per_bridge, max });
        }
        let max = CONFIG_WINDOW / CONFIG_SIZE;
        if devices as u64 > max {
            return Err(ScaleError::ConfigWindowFull { devices, max });
        }
        Ok(())
    }
}

/// Shape of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Power8Config {
    /// vCPU address spaces (all rooted at system memory).
    pub vcpus: usize,
    /// virtio-net-pci devices.
    pub devices: usize,
    /// PCI bridges (devices are spread over them round-robin).
    pub bridges: usize,
    /// Queues per device, one ioeventfd each.
    pub queues: usize,
}

impl Power8Config {
    /// The largest machine of the qemu-devel reports.
    pub fn qemu_largest() -> Power8Config {
        Power8Config {
            vcpus: 255,
            devices: 255,
            bridges: 40,
            queues: 3,
        }
    }
}

/// One device's regions.
#[derive(Clone, Debug)]
pub struct Power8Device {
    /// Config space.
    pub config: RegionId,
    /// MSI-X BAR (container of table and PBA).
    pub msix_bar: RegionId,
    /// Virtio BAR (container of common, ISR, device, notify).
    pub virtio_bar: RegionId,
    /// The notify region (ioeventfds).
    pub notify: RegionId,
    /// The bus-master alias of system memory.
    pub bus_master: RegionId,
    /// The bus-master address space.
    pub dma_space: SpaceId,
    /// Bridge index.
    pub bridge: usize,
    /// Index on its bridge.
    pub slot: u64,
}

/// The built machine.
#[derive(Debug)]
pub struct Power8Machine {
    /// Shape.
    pub config: Power8Config,
    /// System memory.
    pub system: RegionId,
    /// The system memory address space.
    pub memory_space: SpaceId,
    /// Bridge windows.
    pub bridges: Vec<RegionId>,
    /// Devices.
    pub devices: Vec<Power8Device>,
    /// Host notifiers (devices x queues), once enabled.
    pub notifiers: Vec<Arc<EventNotifier>>,
    /// Commits made by the build.
    pub commits: usize,
}

impl Power8Device {
    /// Where firmware places the MSI-X BAR.
    pub fn msix_addr(&self) -> u64 {
        BRIDGE_BASE + self.bridge as u64 * BRIDGE_WINDOW + self.slot * DEVICE_STRIDE
    }
    /// Where firmware places the virtio BAR.
    pub fn virtio_addr(&self) -> u64 {
        self.msix_addr() + DEVICE_STRIDE / 2
    }
}

/// Builds, programs and enables the notifiers of the machine (see the module
/// docs). Every step is committed as QEMU would.
///
/// # Errors
///
/// A configuration that does not fit ([`Power8Config::check`]), checked
/// before anything is built; [`ScaleError::Topology`] if an edit fails.
pub fn build_power8(m: &Machine, config: Power8Config) -> Result<Power8Machine, ScaleError> {
    config.check()?;
    let mut commits = 0usize;
    let ops: Arc<dyn MmioOps> = Arc::new(UnimplementedDevice);
    // The board: RAM, the config window and the bridges, one commit.
    let t = m.begin();
    let system = m.new_container("system", 1 << 64, None)?;
    let ram = m.new_model_region("ram", RegionKind::Ram, u128::from(RAM_SIZE), None)?;
    m.add_subregion(system, 0, ram)?;
    let cfg_window = m.new_container("pci-config", u128::from(CONFIG_WINDOW), None)?;
    m.add_subregion(system, CONFIG_BASE, cfg_window)?;
    let mut bridges = Vec::with_capacity(config.bridges);
    for b in 0..config.bridges {
        let w = m.new_container(&format!("bridge{b}"), u128::from(BRIDGE_WINDOW), None)?;
        m.add_subregion(system, BRIDGE_BASE + b as u64 * BRIDGE_WINDOW, w)?;
        bridges.push(w);
    }
    let memory_space = m.new_address_space("memory", system, None)?;
    for c in 0..config.vcpus {
        m.new_address_space(&format!("cpu-memory-{c}"), system, None)?;
    }
    t.commit();
    commits += 1;
    // Realize: one commit per device.
    let mut devices = Vec::with_capacity(config.devices);
    for d in 0..config.devices {
        let t = m.begin();
        let owner = m.new_owner(&format!("virtio-net-pci.{d}"), None)?;
        let o = Some(owner);
        let n = |s: &str| format!("virtio-net-pci.{d}.{s}");
        let config_r = m.new_mmio(&n("config"), u128::from(CONFIG_SIZE), ops.clone(), o)?;
        m.add_subregion(cfg_window, d as u64 * CONFIG_SIZE, config_r)?;
        let msix_bar = m.new_container(&n("msix"), u128::from(MSIX_BAR_SIZE), o)?;
        let table = m.new_mmio(&n("msix-table"), 0x800, ops.clone(), o)?;
        let pba = m.new_mmio(&n("msix-pba"), 0x800, ops.clone(), o)?;
        m.add_subregion(msix_bar, 0, table)?;
        m.add_subregion(msix_bar, 0x800, pba)?;
        let virtio_bar = m.new_container(&n("virtio-pci"), u128::from(VIRTIO_BAR_SIZE), o)?;
        let mut notify = None;
        for (i, part) in ["common", "isr", "device", "notify"].iter().enumerate() {
            let r = m.new_mmio(&n(part), 0x1000, ops.clone(), o)?;
            m.add_subregion(virtio_bar, i as u64 * 0x1000, r)?;
            notify = Some(r);
        }
        let bm_root = m.new_container(&n("bus-master-container"), 1 << 64, o)?;
        let bus_master = m.new_alias(&n("bus-master"), system, 0, 1 << 64, o)?;
        m.set_enabled(bus_master, false)?;
        m.add_subregion(bm_root, 0, bus_master)?;
        let dma_space = m.new_address_space(&n("bus-master-as"), bm_root, o)?;
        t.commit();
        commits += 1;
        devices.push(Power8Device {
            config: config_r,
            msix_bar,
            virtio_bar,
            notify: notify.expect("four parts"),
            bus_master,
            dma_space,
            bridge: d % config.bridges.max(1),
            slot: (d / config.bridges.max(1)) as u64,
        });
    }
    // Firmware: each BAR placed and enabled (one commit each), then bus
    // mastering on (one commit).
    for dev in &devices {
        let bridge = bridges[dev.bridge];
        let base = dev.msix_addr() - BRIDGE_BASE - dev.bridge as u64 * BRIDGE_WINDOW;
        m.add_subregion(bridge, base, dev.msix_bar)?;
        m.add_subregion(bridge, base + DEVICE_STRIDE / 2, dev.virtio_bar)?;
        m.set_enabled(dev.bus_master, true)?;
        commits += 3;
    }
    // Host notifiers: every queue of every device, one transaction.
    let mut notifiers = Vec::with_capacity(config.devices * config.queues);
    let t = m.begin();
    for (d, dev) in devices.iter().enumerate() {
        for q in 0..config.queues {
            let kick = EventNotifier::new(&format!("virtio-net-pci.{d}.q{q}"));
            m.add_eventfd(dev.notify, q as u64 * 4, 2, None, &kick)?;
            notifiers.push(kick);
        }
    }
    t.commit();
    commits += 1;
    Ok(Power8Machine {
        config,
        system,
        memory_space,
        bridges,
        devices,
        notifiers,
        commits,
    })
}

impl Power8Machine {
    /// The name of the region that serves `addr` of system memory, from the
    /// layout alone (no render): the brute-force reference.
    pub fn expected_at(&self, addr: u64) -> Option<String> {
        if addr < RAM_SIZE {
            return Some("ram".into());
        }
        let n = |d: usize, s: &str| Some(format!("virtio-net-pci.{d}.{s}"));
        if (CONFIG_BASE..CONFIG_BASE + (1 << 28)).contains(&addr) {
            let d = ((addr - CONFIG_BASE) / CONFIG_SIZE) as usize;
            return (d < self.devices.len()).then(|| n(d, "config")).flatten();
        }
        for (d, dev) in self.devices.iter().enumerate() {
            let m = dev.msix_addr();
            if (m..m + MSIX_BAR_SIZE).contains(&addr) {
                return n(
                    d,
                    if addr - m < 0x800 {
                        "msix-table"
                    } else {
                        "msix-pba"
                    },
                );
            }
            let v = dev.virtio_addr();
            if (v..v + VIRTIO_BAR_SIZE).contains(&addr) {
                let part = ["common", "isr", "device", "notify"][((addr - v) / 0x1000) as usize];
                return n(d, part);
            }
        }
        None
    }
}

/// `devices` vhost-user-net-like devices with `queues` queues each (a
/// notify region of 4 bytes per queue, mapped in system memory), for the
/// host-notifier benchmark. Returns the notify regions.
pub fn notifier_machine(
    m: &Machine,
    devices: usize,
    queues: usize,
) -> Result<Vec<RegionId>, TopologyError> {
    let ops: Arc<dyn MmioOps> = Arc::new(UnimplementedDevice);
    let t = m.begin();
    let system = m.new_container("system", 1 << 64, None)?;
    let ram = m.new_model_region("ram", RegionKind::Ram, 1 << 32, None)?;
    m.add_subregion(system, 0, ram)?;
    let mut out = Vec::with_capacity(devices);
    for d in 0..devices {
        let r = m.new_mmio(
            &format!("vhost-user-net.{d}.notify"),
            (queues as u128 * 4).next_power_of_two().max(0x1000),
            ops.clone(),
            None,
        )?;
        m.add_subregion(system, 0x1_0000_0000 + d as u64 * 0x10_0000, r)?;
        out.push(r);
    }
    m.new_address_space("memory", system, None)?;
    t.commit();
    Ok(out)
}

/// `memtree demo --scale`: builds the QEMU-largest machine, prints what it
/// cost, checks every view against a full render and tears it down. The
/// leak report of the teardown is returned (clean when nothing leaked).
pub fn run_demo(out: &mut impl std::fmt::Write) -> Result<crate::LeakReport, String> {
    let memory = crate::topology::memory::Memory::new();
    let config = Power8Config::qemu_largest();
    let start = std::time::Instant::now();
    let machine = build_power8(&memory, config).map_err(|e| e.to_string())?;
    let elapsed = start.elapsed();
    let view = memory
        .address_space(machine.memory_space)
        .map_err(|e| e.to_string())?
        .view();
    let w = |e: std::fmt::Error| e.to_string();
    writeln!(
        out,
        "memtree demo --scale: {} vCPU address spaces, {} virtio-net-pci devices behind {} bridges, {} queues each",
        config.vcpus, config.devices, config.bridges, config.queues
    )
    .map_err(w)?;
    writeln!(
        out,
        "  built, programmed and notifiers enabled in {:.1} ms: {} commits, {} regions, {} address spaces, {} flat ranges in system memory, {} host notifiers",
        elapsed.as_secs_f64() * 1e3,
        machine.commits,
        memory.region_count(),
        memory.address_spaces().len(),
        view.len(),
        machine.notifiers.len()
    )
    .map_err(w)?;
    memory.check_views_against_full_render()?;
    writeln!(out, "  every view equals a full render").map_err(w)?;
    drop(view);
    drop(machine);
    let leaks = memory.teardown();
    writeln!(
        out,
        "  teardown: {}",
        if leaks.is_clean() {
            "nothing leaked"
        } else {
            "LEAKS"
        }
    )
    .map_err(w)?;
    Ok(leaks)
}
