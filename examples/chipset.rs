//! A small model of the x86 host bridges' PAM and SMRAM registers (i440FX and
//! Q35), built only from memtree aliases, priorities and enables — the way
//! QEMU's `hw/pci-host/pam.c`, `i440fx.c` and `q35.c` do it.
//!
//! # PAM (Programmable Attribute Map)
//!
//! Thirteen segments of legacy memory below 1 MiB: the 64 KiB BIOS segment
//! at `0xf0000` and twelve 16 KiB segments covering `0xc0000-0xeffff`. Each
//! segment has four aliases mapped over it in system memory at priority 1,
//! exactly one of them enabled:
//!
//! | mode (2 bits) | meaning         | enabled alias                  |
//! |---------------|-----------------|--------------------------------|
//! | 0             | DRAM disabled   | `pam-pci` @ PCI memory         |
//! | 1             | read only       | `pam-rom` @ RAM, readonly      |
//! | 2             | write only      | `pam-pci` @ RAM (QEMU maps RAM read/write) |
//! | 3             | read/write      | `pam-ram` @ RAM                |
//!
//! The registers hold two segments per byte: `PAM0` (i440FX `0x59`, Q35
//! `0x90`) has the BIOS segment in its high nibble; `PAM1..PAM6` hold
//! segments `2n-1` (low nibble) and `2n` (high nibble), from `0xc0000` up.
//!
//! # SMRAM
//!
//! * i440FX, register `0x72`: `smram-region` (an alias of PCI memory over the
//!   VGA window `0xa0000-0xbffff`) is enabled unless `D_OPEN` (bit 6); the
//!   `smram` container (seen only by the SMM address space) is enabled iff
//!   `G_SMRAME` (bit 3).
//! * Q35, registers `0x9d` (SMRAM) and `0x9e` (ESMRAMC): the same plus
//!   `H_SMRAME` (ESMRAMC bit 7), which moves open/SMM-visible SMRAM from the
//!   low window to `0xfeda0000` (`smram-open-high`, `smram-high`), and TSEG
//!   (`T_EN`, bit 0; size 1/2/8 MiB or 16 MiB from bits 1-2):
//!   `tseg-blackhole` and `tseg-window` are resized and moved below the top
//!   of low RAM.
//! * `D_LCK` (bit 4) locks the register: `D_OPEN` is cleared and only
//!   `D_CLS` stays writable (the datasheet's rule; QEMU's Q35 implements it,
//!   its i440FX does not; this model applies it to both).
//!
//! The model drives an existing topology: [`Chipset::attach`] finds the
//! aliases by name, target and address (for example in a machine imported
//! from a QEMU `info mtree -D` dump), [`Chipset::build`] creates them the way
//! QEMU does. Guest accesses arrive as PCI configuration mechanism #1 port
//! writes ([`Chipset::io_write`]), or as qtest transcript lines
//! ([`Chipset::qtest`]).

use std::fmt;

use memtree::{Machine, RegionId, RegionKind, TopologyError};

/// Which host bridge.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// PCI and memory controller of the `pc` machine.
    I440fx,
    /// MCH of the `q35` machine.
    Q35,
}

impl Kind {
    fn pam0(self) -> usize {
        match self {
            Kind::I440fx => 0x59,
            Kind::Q35 => 0x90,
        }
    }
    fn smram(self) -> usize {
        match self {
            Kind::I440fx => 0x72,
            Kind::Q35 => 0x9d,
        }
    }
}

/// Why the model could not be attached or driven.
#[derive(Debug)]
pub enum ChipsetError {
    /// A region the model drives is not in the topology.
    Missing(String),
    /// The topology refused an edit.
    Topology(TopologyError),
    /// A qtest line could not be understood.
    BadLine(String),
}

impl fmt::Display for ChipsetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChipsetError::Missing(what) => write!(f, "the topology has no {what}"),
            ChipsetError::Topology(e) => write!(f, "topology edit refused: {e}"),
            ChipsetError::BadLine(l) => write!(f, "cannot parse qtest line \"{l}\""),
        }
    }
}

impl std::error::Error for ChipsetError {}

impl From<TopologyError> for ChipsetError {
    fn from(e: TopologyError) -> Self {
        ChipsetError::Topology(e)
    }
}

type Result<T> = std::result::Result<T, ChipsetError>;

/// One PAM segment: its four aliases, indexed by mode.
#[derive(Clone, Debug)]
pub struct PamSegment {
    /// First address.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// `[pam-pci @pci, pam-rom, pam-pci @ram, pam-ram]`.
    pub aliases: [RegionId; 4],
    /// The mode whose alias is enabled.
    pub mode: u8,
}

/// The thirteen segments, BIOS segment first.
pub fn pam_layout() -> Vec<(u64, u64)> {
    let mut v = vec![(0xf0000, 0x10000)];
    v.extend((0..12).map(|i| (0xc0000 + i * 0x4000, 0x4000)));
    v
}

const SMRAM_G_SMRAME: u8 = 0x08;
const SMRAM_D_LCK: u8 = 0x10;
const SMRAM_D_CLS: u8 = 0x20;
const SMRAM_D_OPEN: u8 = 0x40;
const ESMRAMC_T_EN: u8 = 0x01;
const ESMRAMC_TSEG_SZ: u8 = 0x06;
const ESMRAMC_H_SMRAME: u8 = 0x80;
/// Q35's `ext-tseg-mbytes` default.
const EXT_TSEG_MBYTES: u64 = 16;

/// The SMRAM regions of a host bridge.
#[derive(Clone, Debug)]
pub struct SmramRegions {
    /// `smram-region`: PCI memory over the VGA window, hidden when open.
    pub smram_region: RegionId,
    /// `smram`: the container only the SMM address space sees.
    pub smram: RegionId,
    /// Q35 only: `smram-low`, `smram-high`, `smram-open-high`,
    /// `tseg-blackhole`, `tseg-window`.
    pub q35: Option<Q35Smram>,
}

/// The extra SMRAM regions of Q35.
#[derive(Clone, Debug)]
pub struct Q35Smram {
    pub low: RegionId,
    pub high: RegionId,
    pub open_high: RegionId,
    pub tseg_blackhole: RegionId,
    pub tseg_window: RegionId,
    /// Top of RAM below 4 GiB (where TSEG ends).
    pub below_4g: u64,
}

/// A host bridge's PAM and SMRAM registers and the regions they drive.
#[derive(Debug)]
pub struct Chipset {
    kind: Kind,
    config: [u8; 256],
    wmask: [u8; 256],
    config_address: u32,
    pam: Vec<PamSegment>,
    smram: SmramRegions,
}

/// `system`: the container at the root of the `memory` address space.
fn system_container(m: &Machine) -> Result<RegionId> {
    m.find_regions("system")
        .into_iter()
        .find(|&r| {
            m.region_info(r)
                .is_ok_and(|i| i.kind == RegionKind::Container && i.container.is_none())
        })
        .ok_or_else(|| ChipsetError::Missing("container \"system\"".into()))
}

/// The region named `name` mapped in `container` at `addr` (any address
/// when `None`) whose alias target, if `target` is given, is named `target`.
fn find(
    m: &Machine,
    name: &str,
    container: Option<RegionId>,
    addr: Option<u64>,
    target: Option<&str>,
) -> Result<RegionId> {
    for r in m.find_regions(name) {
        let Ok(i) = m.region_info(r) else { continue };
        if container.is_some_and(|c| i.container != Some(c)) || addr.is_some_and(|a| i.addr != a) {
            continue;
        }
        if let Some(t) = target {
            let tname = i
                .alias_target
                .and_then(|t| m.region_info(t).ok())
                .map(|t| t.name);
            if tname.as_deref() != Some(t) {
                continue;
            }
        }
        return Ok(r);
    }
    Err(ChipsetError::Missing(format!(
        "region \"{name}\"{}{}",
        addr.map(|a| format!(" at {a:#x}")).unwrap_or_default(),
        target
            .map(|t| format!(" aliasing \"{t}\""))
            .unwrap_or_default()
    )))
}

impl Chipset {
    /// Attaches the model to a topology that already has QEMU's regions (e.g.
    /// one imported from a dump of a freshly started machine), with every
    /// register at its reset value. The `pam-rom` aliases are made readonly
    /// (what `pam.c` does; a dump with all of them disabled cannot show it).
    pub fn attach(m: &Machine, kind: Kind) -> Result<Chipset> {
        let system = system_container(m)?;
        let mut pam = Vec::new();
        for (start, size) in pam_layout() {
            let at = Some(start);
            let s = Some(system);
            let aliases = [
                find(m, "pam-pci", s, at, Some("pci"))?,
                find(m, "pam-rom", s, at, Some("pc.ram"))?,
                find(m, "pam-pci", s, at, Some("pc.ram"))?,
                find(m, "pam-ram", s, at, Some("pc.ram"))?,
            ];
            m.set_readonly(aliases[1], true)?;
            let mode = (0..4u8)
                .find(|&i| {
                    m.region_info(aliases[usize::from(i)])
                        .is_ok_and(|i| i.enabled)
                })
                .unwrap_or(0);
            pam.push(PamSegment {
                start,
                size,
                aliases,
                mode,
            });
        }
        let smram_region = find(m, "smram-region", Some(system), Some(0xa0000), Some("pci"))?;
        let smram = m
            .find_regions("smram")
            .into_iter()
            .find(|&r| {
                m.region_info(r)
                    .is_ok_and(|i| i.kind == RegionKind::Container)
            })
            .ok_or_else(|| ChipsetError::Missing("container \"smram\"".into()))?;
        let q35 = match kind {
            Kind::I440fx => None,
            Kind::Q35 => {
                let below = find(m, "ram-below-4g", Some(system), Some(0), Some("pc.ram"))?;
                Some(Q35Smram {
                    low: find(m, "smram-low", Some(smram), None, Some("pc.ram"))?,
                    high: find(m, "smram-high", Some(smram), None, Some("pc.ram"))?,
                    open_high: find(m, "smram-open-high", Some(system), None, Some("pc.ram"))?,
                    tseg_blackhole: find(m, "tseg-blackhole", Some(system), None, None)?,
                    tseg_window: find(m, "tseg-window", Some(smram), None, Some("pc.ram"))?,
                    below_4g: m.region_info(below)?.size as u64,
                })
            }
        };
        Ok(Chipset::new(
            kind,
            pam,
            SmramRegions {
                smram_region,
                smram,
                q35,
            },
        ))
    }

    /// Creates i440FX-style PAM and SMRAM regions from scratch (as QEMU's
    /// `init_pam` and `i440fx_init` do) over `ram` and `pci`, in `system`;
    /// `smm_root` is the container of the SMM address space, which gets the
    /// `smram` container at priority 1. Registers are at reset values.
    pub fn build(
        m: &Machine,
        system: RegionId,
        ram: RegionId,
        pci: RegionId,
        smm_root: RegionId,
    ) -> Result<Chipset> {
        let t = m.begin();
        let mut pam = Vec::new();
        for (start, size) in pam_layout() {
            let sz = u128::from(size);
            let pci_alias = m.new_alias("pam-pci", pci, start, sz, None)?;
            let rom = m.new_alias("pam-rom", ram, start, sz, None)?;
            m.set_readonly(rom, true)?;
            let wo = m.new_alias("pam-pci", ram, start, sz, None)?;
            let rw = m.new_alias("pam-ram", ram, start, sz, None)?;
            let aliases = [pci_alias, rom, wo, rw];
            for &a in &aliases {
                m.set_enabled(a, false)?;
                m.add_subregion_overlap(system, start, a, 1)?;
            }
            m.set_enabled(aliases[0], true)?;
            pam.push(PamSegment {
                start,
                size,
                aliases,
                mode: 0,
            });
        }
        let smram_region = m.new_alias("smram-region", pci, 0xa0000, 0x20000, None)?;
        m.add_subregion_overlap(system, 0xa0000, smram_region, 1)?;
        let smram = m.new_container("smram", 1 << 32, None)?;
        m.set_enabled(smram, false)?;
        let low = m.new_alias("smram-low", ram, 0xa0000, 0x20000, None)?;
        m.add_subregion(smram, 0xa0000, low)?;
        let smram_alias = m.new_alias("smram", smram, 0, 1 << 32, None)?;
        m.add_subregion_overlap(smm_root, 0, smram_alias, 1)?;
        t.commit();
        Ok(Chipset::new(
            Kind::I440fx,
            pam,
            SmramRegions {
                smram_region,
                smram,
                q35: None,
            },
        ))
    }

    fn new(kind: Kind, pam: Vec<PamSegment>, smram: SmramRegions) -> Chipset {
        let mut config = [0u8; 256];
        let mut wmask = [0u8; 256];
        wmask[kind.pam0()..kind.pam0() + 7].fill(0x33);
        wmask[kind.pam0()] = 0x30;
        config[kind.smram()] = 0x02;
        wmask[kind.smram()] = SMRAM_D_OPEN | SMRAM_D_CLS | SMRAM_D_LCK | SMRAM_G_SMRAME;
        if kind == Kind::Q35 {
            config[kind.smram() + 1] = 0x38;
            wmask[kind.smram() + 1] = ESMRAMC_H_SMRAME | ESMRAMC_TSEG_SZ | ESMRAMC_T_EN;
        }
        let mut chipset = Chipset {
            kind,
            config,
            wmask,
            config_address: 0,
            pam,
            smram,
        };
        // Registers hold the mode each segment shows.
        for (i, seg) in chipset.pam.iter().enumerate() {
            let (reg, shift) = pam_reg(kind, i);
            chipset.config[reg] |= seg.mode << shift;
        }
        chipset
    }

    /// The host bridge kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The PAM segments.
    pub fn pam(&self) -> &[PamSegment] {
        &self.pam
    }

    /// A configuration register byte.
    pub fn config(&self, reg: usize) -> u8 {
        self.config[reg & 0xff]
    }

    /// Writes `bytes` to configuration space from `reg` on, as the guest
    /// would (through the write mask), and updates the memory map in one
    /// transaction if a PAM or SMRAM register changed.
    pub fn config_write(&mut self, m: &Machine, reg: usize, bytes: &[u8]) -> Result<()> {
        let mut touched = false;
        for (i, &b) in bytes.iter().enumerate() {
            let r = (reg + i) & 0xff;
            let mask = self.wmask[r];
            self.config[r] = (self.config[r] & !mask) | (b & mask);
            let pam = (self.kind.pam0()..self.kind.pam0() + 7).contains(&r);
            let smram =
                r == self.kind.smram() || (self.kind == Kind::Q35 && r == self.kind.smram() + 1);
            touched |= pam || smram;
        }
        if touched {
            self.update(m)?;
        }
        Ok(())
    }

    /// Applies the registers to the memory map (QEMU's
    /// `i440fx_update_memory_mappings` / `mch_update_pam` + `mch_update_smram`).
    fn update(&mut self, m: &Machine) -> Result<()> {
        let smram_reg = self.kind.smram();
        if self.config[smram_reg] & SMRAM_D_LCK != 0 {
            self.config[smram_reg] &= !SMRAM_D_OPEN;
            self.wmask[smram_reg] = SMRAM_D_CLS;
            if self.kind == Kind::Q35 {
                self.wmask[smram_reg + 1] = 0;
            }
        }
        let t = m.begin();
        for i in 0..self.pam.len() {
            let (reg, shift) = pam_reg(self.kind, i);
            let mode = (self.config[reg] >> shift) & 3;
            let seg = &mut self.pam[i];
            if seg.mode != mode {
                m.set_enabled(seg.aliases[usize::from(seg.mode)], false)?;
                m.set_enabled(seg.aliases[usize::from(mode)], true)?;
                seg.mode = mode;
            }
        }
        let smram = self.config[smram_reg];
        let open = smram & SMRAM_D_OPEN != 0;
        let enabled = smram & SMRAM_G_SMRAME != 0;
        let s = &self.smram;
        match &s.q35 {
            None => {
                m.set_enabled(s.smram_region, !open)?;
                m.set_enabled(s.smram, enabled)?;
            }
            Some(q) => {
                let esmramc = self.config[smram_reg + 1];
                let high = esmramc & ESMRAMC_H_SMRAME != 0;
                // Open: the low window shows RAM unless SMRAM moved high,
                // where it is then visible to everyone.
                m.set_enabled(s.smram_region, !open || high)?;
                m.set_enabled(q.open_high, open && high)?;
                m.set_enabled(q.low, enabled && !high)?;
                m.set_enabled(q.high, enabled && high)?;
                let tseg = if esmramc & ESMRAMC_T_EN == 0 {
                    0
                } else {
                    match (esmramc & ESMRAMC_TSEG_SZ) >> 1 {
                        0 => 1 << 20,
                        1 => 2 << 20,
                        2 => 8 << 20,
                        _ => EXT_TSEG_MBYTES << 20,
                    }
                };
                let at = q.below_4g.saturating_sub(tseg);
                m.set_enabled(q.tseg_blackhole, tseg != 0)?;
                m.set_size(q.tseg_blackhole, u128::from(tseg))?;
                m.set_address(q.tseg_blackhole, at)?;
                m.set_enabled(q.tseg_window, tseg != 0)?;
                m.set_size(q.tseg_window, u128::from(tseg))?;
                m.set_address(q.tseg_window, at)?;
                m.set_alias_offset(q.tseg_window, at)?;
            }
        }
        t.commit();
        Ok(())
    }

    /// A port write: `0xcf8` (4 bytes) latches a configuration address,
    /// `0xcfc-0xcff` write configuration data of bus 0, device 0, function 0
    /// (other functions are ignored).
    pub fn io_write(&mut self, m: &Machine, port: u16, size: u32, value: u64) -> Result<()> {
        match port {
            0xcf8 if size == 4 => self.config_address = value as u32,
            0xcfc..=0xcff => {
                if let Some(reg) = self.selected(port) {
                    let bytes = value.to_le_bytes();
                    self.config_write(m, reg, &bytes[..size.min(4) as usize])?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A port read, as [`Chipset::io_write`] decodes ports; `None` for a
    /// port or function the model does not implement.
    pub fn io_read(&self, port: u16, size: u32) -> Option<u64> {
        match port {
            0xcf8 if size == 4 => Some(u64::from(self.config_address)),
            0xcfc..=0xcff => {
                let reg = self.selected(port)?;
                Some((0..size.min(4) as usize).fold(0u64, |v, i| {
                    v | u64::from(self.config[(reg + i) & 0xff]) << (8 * i)
                }))
            }
            _ => None,
        }
    }

    /// The register addressed by a data-port access, if the latched address
    /// is enabled and selects this host bridge (bus 0, device 0, function 0).
    fn selected(&self, port: u16) -> Option<usize> {
        let a = self.config_address;
        let enabled = a & 0x8000_0000 != 0;
        let bdf = (a >> 8) & 0xffff;
        (enabled && bdf == 0).then(|| (a & 0xfc) as usize + usize::from(port - 0xcfc))
    }

    /// Runs one command line of a qtest transcript (without the leading
    /// `> `): `outb/outw/outl PORT VALUE` and `inb/inw/inl PORT`. Returns
    /// qtest's reply for reads the model implements (`OK 0x004a`: at least
    /// four hex digits, as QEMU 7.2 prints), `Ok(None)` for everything else
    /// (memory accesses and unknown commands are not the model's business).
    pub fn qtest(&mut self, m: &Machine, line: &str) -> Result<Option<String>> {
        let bad = || ChipsetError::BadLine(line.to_owned());
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |s: &str| -> Result<u64> {
            let s = s.strip_prefix("0x").ok_or_else(bad)?;
            u64::from_str_radix(s, 16).map_err(|_| bad())
        };
        let size = |c: &str| match c.as_bytes().last() {
            Some(b'b') => 1,
            Some(b'w') => 2,
            _ => 4,
        };
        match words.as_slice() {
            [cmd @ ("outb" | "outw" | "outl"), port, value] => {
                let port = u16::try_from(num(port)?).map_err(|_| bad())?;
                self.io_write(m, port, size(cmd), num(value)?)?;
                Ok(None)
            }
            [cmd @ ("inb" | "inw" | "inl"), port] => {
                let port = u16::try_from(num(port)?).map_err(|_| bad())?;
                Ok(self
                    .io_read(port, size(cmd))
                    .map(|v| format!("OK {v:#06x}")))
            }
            _ => Ok(None),
        }
    }
}

/// The register and bit shift of PAM segment `i` (0 = BIOS segment).
fn pam_reg(kind: Kind, i: usize) -> (usize, u32) {
    let reg = kind.pam0() + i.div_ceil(2);
    // Segment 0 and even segments use the high nibble.
    let shift = if i % 2 == 1 { 0 } else { 4 };
    (reg, shift)
}

/// A demonstration: a tiny PC memory map built from scratch, its BIOS
/// shadowing sequence (copy to RAM with segments write-only, then lock them
/// read-only), and SMRAM opened and closed, printing the flat view.
#[allow(dead_code)]
fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    use memtree::qemu_text::print::{print_flat, FlatOptions};
    use memtree::Memory;

    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 64, None)?;
    let ram = memory.new_ram("pc.ram", 0x20_0000, None)?;
    let below = memory.new_alias("ram-below-4g", ram, 0, 0x20_0000, None)?;
    memory.add_subregion(system, 0, below)?;
    let pci = memory.new_container("pci", 1 << 64, None)?;
    memory.add_subregion_overlap(system, 0, pci, -1)?;
    let bios = memory.new_rom("pc.bios", 0x20000, None)?;
    let isa_bios = memory.new_alias("isa-bios", bios, 0, 0x20000, None)?;
    memory.add_subregion_overlap(pci, 0xe0000, isa_bios, 1)?;
    let smm = memory.new_container("memory", 1 << 64, None)?;
    let system_alias = memory.new_alias("memory", system, 0, 1 << 64, None)?;
    memory.add_subregion(smm, 0, system_alias)?;
    memory.new_address_space("memory", system, None)?;
    memory.new_address_space("cpu-smm-0", smm, None)?;

    let mut chipset = Chipset::build(&memory, system, ram, pci, smm)?;
    let show = |title: &str| -> std::result::Result<(), Box<dyn std::error::Error>> {
        let mut out = String::new();
        print_flat(&memory, &mut out, FlatOptions::default())?;
        println!("### {title}\n{out}");
        Ok(())
    };
    show("reset: PAM routes 0xc0000-0xfffff to PCI")?;
    // Firmware shadowing: segments "write-only" while copying (QEMU maps
    // RAM read/write for this mode), then read-only RAM.
    chipset.config_write(
        &memory,
        Kind::I440fx.pam0(),
        &[0x20, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22],
    )?;
    show("PAM mode 2: RAM, read/write as in QEMU")?;
    chipset.config_write(
        &memory,
        Kind::I440fx.pam0(),
        &[0x10, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11],
    )?;
    show("PAM read-only: shadowed BIOS")?;
    chipset.config_write(&memory, Kind::I440fx.smram(), &[0x4a])?;
    show("SMRAM open: VGA window shows RAM")?;
    chipset.config_write(&memory, Kind::I440fx.smram(), &[0x1a])?;
    show("SMRAM closed and locked: only SMM sees it")?;
    chipset.config_write(&memory, Kind::I440fx.smram(), &[0x4a])?;
    assert_eq!(
        chipset.config(Kind::I440fx.smram()) & SMRAM_D_OPEN,
        0,
        "locked"
    );
    println!(
        "SMRAM register after an attempt to reopen it: {:#04x}",
        chipset.config(0x72)
    );
    Ok(())
}
