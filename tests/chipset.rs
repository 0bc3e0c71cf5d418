//! The PAM/SMRAM chipset example against QEMU 7.2: the qtest transcripts of
//! tests/data/oracle/dynamic/{pc-pam-smram,q35-pam} are replayed into the
//! model, attached to the machine imported from the scenario's initial dump,
//! and after every `### snapshot NN-label` memtree's `info mtree -f` and
//! `info mtree -D` must equal QEMU's dumps of that step (modulo block order
//! and FlatView numbering, which QEMU prints in hash order). The transcript's
//! replies to configuration reads must equal the model's.

// The example is a program too; the test uses only part of its API.
#[allow(dead_code)]
#[path = "../examples/chipset.rs"]
mod chipset;

use std::fs;
use std::path::{Path, PathBuf};

use chipset::{Chipset, Kind};
use memtree::qemu_text::import::import;
use memtree::qemu_text::parse::{parse_flat, parse_tree};
use memtree::qemu_text::print::{print_flat, print_tree, FlatOptions, TreeOptions};
use memtree::Machine;

fn scenario_dir(name: &str) -> PathBuf {
    let base = match std::env::var_os("MEMTREE_ORACLE") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/oracle"),
    };
    base.join("dynamic").join(name)
}

fn read(dir: &Path, file: &str) -> String {
    fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("cannot read oracle file {}: {e}", dir.join(file).display()))
}

/// Canonical form of a dump: blocks (separated by empty lines) sorted, with
/// `FlatView #N` renumbered `#?` (what the oracle's canon.py does).
fn canon(text: &str) -> Vec<String> {
    let mut blocks: Vec<String> = text
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| match b.strip_prefix("FlatView #") {
            Some(rest) => {
                let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
                format!("FlatView #?{rest}")
            }
            None => b.trim_end_matches('\n').to_owned(),
        })
        .collect();
    blocks.sort();
    blocks
}

/// Panics with the first differing block when the dumps differ.
fn assert_same(what: &str, ours: &str, qemu: &str) {
    let (o, q) = (canon(ours), canon(qemu));
    if o == q {
        return;
    }
    let only_ours: Vec<&String> = o.iter().filter(|b| !q.contains(b)).collect();
    let only_qemu: Vec<&String> = q.iter().filter(|b| !o.contains(b)).collect();
    panic!(
        "{what}: memtree differs from QEMU\n--- memtree only ({}):\n{}\n--- QEMU only ({}):\n{}",
        only_ours.len(),
        only_ours.first().map_or("", |s| s.as_str()),
        only_qemu.len(),
        only_qemu.first().map_or("", |s| s.as_str()),
    );
}

fn flat(m: &Machine) -> String {
    let mut s = String::new();
    print_flat(m, &mut s, FlatOptions { owners: false }).unwrap();
    s
}

fn tree(m: &Machine) -> String {
    let mut s = String::new();
    print_tree(
        m,
        &mut s,
        TreeOptions {
            disabled: true,
            owners: false,
        },
    )
    .unwrap();
    s
}

/// Replays a scenario; returns the snapshot labels checked.
fn replay(name: &str, kind: Kind) -> Vec<String> {
    let dir = scenario_dir(name);
    let tree0 = parse_tree(&read(&dir, "00-initial.disabled.txt")).unwrap();
    let flat0 = parse_flat(&read(&dir, "00-initial.flat.txt")).unwrap();
    let imported = import(&tree0, Some(&flat0), None).unwrap();
    let memory = imported.memory;
    let mut model = Chipset::attach(&memory, kind).unwrap();

    let transcript = read(&dir, "transcript.txt");
    let mut checked = Vec::new();
    let mut expect_reply: Option<String> = None;
    for (n, line) in transcript.lines().enumerate() {
        let at = format!("{name} transcript line {}", n + 1);
        if let Some(cmd) = line.strip_prefix("> ") {
            expect_reply = model
                .qtest(&memory, cmd)
                .unwrap_or_else(|e| panic!("{at}: {e}"));
        } else if let Some(reply) = line.strip_prefix("< ") {
            if let Some(ours) = expect_reply.take() {
                assert_eq!(ours, reply, "{at}: reply to a configuration read");
            }
        } else if let Some(label) = line.strip_prefix("### snapshot ") {
            let label = label.trim();
            let what = format!("{name} {label}");
            assert_same(
                &format!("{what} flat view"),
                &flat(&memory),
                &read(&dir, &format!("{label}.flat.txt")),
            );
            assert_same(
                &format!("{what} tree (-D)"),
                &tree(&memory),
                &read(&dir, &format!("{label}.disabled.txt")),
            );
            checked.push(label.to_owned());
        }
    }
    checked
}

#[test]
fn chipset_i440fx_pam_and_smram_match_qemu_at_every_snapshot() {
    let checked = replay("pc-pam-smram", Kind::I440fx);
    assert_eq!(
        checked,
        [
            "00-initial",
            "01-pam-all-ram-rw",
            "02-pam-all-readonly",
            "03-pam-mixed",
            "04-smram-open",
            "05-smram-closed"
        ]
    );
}

#[test]
fn chipset_q35_pam_matches_qemu_at_every_snapshot() {
    let checked = replay("q35-pam", Kind::Q35);
    assert_eq!(
        checked,
        [
            "00-initial",
            "01-pam-all-ram-rw",
            "02-pam-all-readonly",
            "03-pam-mixed",
            "04-pam-all-pci"
        ]
    );
}

/// The model on a map it built itself: register semantics the transcripts
/// do not exercise.
mod built {
    use super::chipset::{pam_layout, Chipset};
    use std::sync::Arc;

    use memtree::{AddressSpace, Memory, RegionId, UnimplementedDevice};

    struct Pc {
        memory: Memory,
        chipset: Chipset,
        memory_as: AddressSpace,
        smm_as: AddressSpace,
    }

    fn pc() -> Pc {
        let memory = Memory::new();
        let system = memory.new_container("system", 1 << 64, None).unwrap();
        let ram = memory.new_ram("pc.ram", 0x20_0000, None).unwrap();
        let below = memory
            .new_alias("ram-below-4g", ram, 0, 0x20_0000, None)
            .unwrap();
        memory.add_subregion(system, 0, below).unwrap();
        let pci = memory.new_container("pci", 1 << 64, None).unwrap();
        memory.add_subregion_overlap(system, 0, pci, -1).unwrap();
        let rom = memory.new_rom("pc.rom", 0x20000, None).unwrap();
        memory.add_subregion_overlap(pci, 0xc0000, rom, 1).unwrap();
        let vga = memory
            .new_mmio("vga-lowmem", 0x20000, Arc::new(UnimplementedDevice), None)
            .unwrap();
        memory.add_subregion(pci, 0xa0000, vga).unwrap();
        let smm = memory.new_container("memory", 1 << 64, None).unwrap();
        let all = memory
            .new_alias("memory", system, 0, 1 << 64, None)
            .unwrap();
        memory.add_subregion(smm, 0, all).unwrap();
        let m = memory.new_address_space("memory", system, None).unwrap();
        let s = memory.new_address_space("cpu-smm-0", smm, None).unwrap();
        let chipset = Chipset::build(&memory, system, ram, pci, smm).unwrap();
        Pc {
            memory_as: memory.address_space(m).unwrap(),
            smm_as: memory.address_space(s).unwrap(),
            memory,
            chipset,
        }
    }

    /// (region name, readonly) serving `addr`, if any.
    fn at(space: &AddressSpace, addr: u64) -> Option<(String, bool)> {
        let view = space.view();
        let r = view.lookup(addr)?;
        Some((r.region().name().to_owned(), r.attrs().readonly))
    }

    #[test]
    fn chipset_pam_modes_select_pci_rom_and_ram() {
        let mut pc = pc();
        assert_eq!(pam_layout().len(), 13);
        let pci_rom = Some(("pc.rom".to_owned(), true));
        assert_eq!(at(&pc.memory_as, 0xc0000), pci_rom, "reset: PCI");
        // PAM1 low nibble = segment 0xc0000, high nibble = 0xc4000.
        pc.chipset.config_write(&pc.memory, 0x5a, &[0x31]).unwrap();
        assert_eq!(at(&pc.memory_as, 0xc0000), Some(("pc.ram".into(), true)));
        assert_eq!(at(&pc.memory_as, 0xc4000), Some(("pc.ram".into(), false)));
        // Mode 2 maps RAM read/write (QEMU's choice).
        pc.chipset.config_write(&pc.memory, 0x5a, &[0x02]).unwrap();
        assert_eq!(at(&pc.memory_as, 0xc0000), Some(("pc.ram".into(), false)));
        assert_eq!(at(&pc.memory_as, 0xc4000), pci_rom);
        // Exactly one alias per segment is enabled, whatever the mode.
        for seg in pc.chipset.pam() {
            let on: Vec<RegionId> = seg
                .aliases
                .iter()
                .copied()
                .filter(|&a| pc.memory.region_info(a).unwrap().enabled)
                .collect();
            assert_eq!(on, [seg.aliases[usize::from(seg.mode)]]);
        }
    }

    #[test]
    fn chipset_pam_register_bits_outside_the_mask_are_ignored() {
        let mut pc = pc();
        // PAM0's low nibble is reserved; bits 2-3 and 6-7 of every PAM
        // register are reserved.
        pc.chipset.config_write(&pc.memory, 0x59, &[0xff]).unwrap();
        assert_eq!(pc.chipset.config(0x59), 0x30);
        assert_eq!(at(&pc.memory_as, 0xf0000), Some(("pc.ram".into(), false)));
    }

    #[test]
    fn chipset_smram_open_closed_and_locked() {
        let mut pc = pc();
        let vga = 0xa0000;
        let pci_vga = Some(("vga-lowmem".to_owned(), false));
        let ram = Some(("pc.ram".to_owned(), false));
        // Reset: closed, SMRAM disabled: everyone sees the PCI VGA window.
        assert_eq!(at(&pc.memory_as, vga), pci_vga);
        assert_eq!(at(&pc.smm_as, vga), pci_vga);
        // G_SMRAME: SMM sees RAM there, normal accesses do not.
        pc.chipset.config_write(&pc.memory, 0x72, &[0x0a]).unwrap();
        assert_eq!(at(&pc.smm_as, vga), ram);
        assert_eq!(at(&pc.memory_as, vga), pci_vga);
        // D_OPEN: everyone sees RAM.
        pc.chipset.config_write(&pc.memory, 0x72, &[0x4a]).unwrap();
        assert_eq!(at(&pc.memory_as, vga), ram);
        // D_LCK closes it and makes D_OPEN and G_SMRAME read-only.
        pc.chipset.config_write(&pc.memory, 0x72, &[0x5a]).unwrap();
        assert_eq!(pc.chipset.config(0x72), 0x1a);
        assert_eq!(at(&pc.memory_as, vga), pci_vga);
        pc.chipset.config_write(&pc.memory, 0x72, &[0x42]).unwrap();
        assert_eq!(pc.chipset.config(0x72), 0x1a, "locked");
        assert_eq!(at(&pc.memory_as, vga), pci_vga);
        assert_eq!(at(&pc.smm_as, vga), ram);
    }

    #[test]
    fn chipset_config_ports_decode_bus_device_function() {
        let mut pc = pc();
        let m = &pc.memory;
        // Function 1 of device 0 is not the host bridge: ignored.
        pc.chipset.qtest(m, "outl 0xcf8 0x80000158").unwrap();
        pc.chipset.qtest(m, "outb 0xcfd 0x30").unwrap();
        assert_eq!(pc.chipset.config(0x59), 0);
        // Disabled address (bit 31 clear): ignored.
        pc.chipset.qtest(m, "outl 0xcf8 0x00000058").unwrap();
        pc.chipset.qtest(m, "outb 0xcfd 0x30").unwrap();
        assert_eq!(pc.chipset.config(0x59), 0);
        pc.chipset.qtest(m, "outl 0xcf8 0x80000058").unwrap();
        pc.chipset.qtest(m, "outw 0xcfe 0x3311").unwrap();
        assert_eq!(
            (pc.chipset.config(0x5a), pc.chipset.config(0x5b)),
            (0x11, 0x33)
        );
        let reply = pc.chipset.qtest(m, "inl 0xcfc").unwrap();
        assert_eq!(reply.as_deref(), Some("OK 0x33110000"));
        assert!(pc.chipset.qtest(m, "outb nonsense 1").is_err());
    }
}
