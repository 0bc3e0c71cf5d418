//! Native machine description files (TOML).
//!
//! A machine file lists devices (owners), regions and address spaces; the
//! loader builds them into a fresh [`Memory`] in one transaction. See
//! `examples/minimal.toml` and `examples/pc-like.toml` for annotated
//! examples. The schema:
//!
//! ```toml
//! endian = "little"            # target byte order: "little" (default) or "big"
//!
//! [[device]]                   # an owner object; regions and spaces may name it
//! name = "pci-bus"
//! [[device]]
//! name = "e1000"
//! parent = "pci-bus"           # optional; must be declared earlier; unplugging
//!                              # the parent unplugs the child too
//! label = "dev id=net0"        # optional: how `info mtree -o` names it
//!                              # ("dev id=..", "dev path=..", "obj path=..", "obj type=..")
//!
//! [[region]]
//! name = "system"              # unique
//! kind = "container"           # container | ram | rom | rom-device | ram-device |
//!                              # mmio | reservation | io-root | alias
//! size = "2^64"                # integer, or a string: "0x1000", "1_0000", "2^64",
//!                              # "64K", "128 MiB", "4G" (binary units); at most 2^64
//!
//! [[region]]
//! name = "pc.ram"
//! kind = "ram"
//! size = "128M"
//! shared = false               # ram: memfd (shareable) instead of anonymous memory
//!
//! [[region]]
//! name = "ram-below-4g"
//! kind = "alias"
//! target = "pc.ram"            # alias: the region it shows (declared anywhere)
//! alias-offset = 0             # alias: where the window starts in the target
//! size = "128M"                # alias: default = target size - alias-offset
//! parent = "system"            # map it in this container ...
//! offset = 0                   # ... at this address (default 0) ...
//! priority = 0                 # ... with this priority (default 0)
//!
//! [[region]]
//! name = "serial"
//! kind = "mmio"
//! size = 8
//! owner = "e1000"              # optional owner device
//! enabled = true               # optional flags (defaults shown)
//! readonly = false
//! nonvolatile = false
//! unmergeable = false
//! ops = { read = "0xff", endian = "little", valid = { min = 1, max = 4 }, impl = { min = 1, max = 1, unaligned = false } }
//!                              # mmio / rom-device: a built-in dummy device; every
//!                              # read callback returns the low bytes of `read`
//!                              # (default 0), writes are accepted and ignored
//! # rom-device also takes `romd = true|false` (romd mode, default true).
//!
//! [[address-space]]
//! name = "memory"
//! root = "system"
//! owner = "e1000"              # optional
//! ```
//!
//! Subregions are added in file order, so among siblings of equal priority
//! the one written *later* renders first (QEMU: newest first). Names are
//! resolved after the whole file is read: an alias may name a target, and a
//! region a container, declared further down.
//!
//! Every error names the 1-based line of the offending entry or field and
//! what is wrong. The loader never panics, whatever the input.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use memtree::region::region_core::MAX_REGION_SIZE;
use memtree::{
    AccessSizes, Endian, Machine, MemTxAttrs, MemTxResult, Memory, MmioOps, OwnerId, OwnerLabel,
    RamBacking, RegionId, RegionKind, SpaceId, TopologyError,
};

/// How to build the machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Give RAM, ROM, RAM-device and ROM-device regions real host memory.
    /// Without it they are model-only (render and print exactly the same,
    /// but accesses to them are unassigned), so a file can describe a
    /// machine with terabytes of RAM.
    pub allocate: bool,
}

/// A loaded machine.
#[derive(Debug)]
pub struct LoadedMachine {
    /// The memory system.
    pub memory: Memory,
    /// The address spaces, in file order.
    pub spaces: Vec<SpaceId>,
    /// Every region by name.
    pub regions: BTreeMap<String, RegionId>,
    /// Every device by name.
    pub owners: BTreeMap<String, OwnerId>,
}

/// A malformed machine file: the 1-based line and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct LoadError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    endian: Option<Spanned<String>>,
    #[serde(default)]
    device: Vec<DeviceEntry>,
    #[serde(default)]
    region: Vec<RegionEntry>,
    #[serde(default, rename = "address-space")]
    address_space: Vec<SpaceEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceEntry {
    name: Spanned<String>,
    parent: Option<Spanned<String>>,
    label: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RegionEntry {
    name: Spanned<String>,
    kind: Spanned<String>,
    size: Option<Spanned<Num>>,
    parent: Option<Spanned<String>>,
    offset: Option<Spanned<Num>>,
    priority: Option<Spanned<i64>>,
    enabled: Option<bool>,
    readonly: Option<bool>,
    nonvolatile: Option<bool>,
    unmergeable: Option<bool>,
    romd: Option<Spanned<bool>>,
    shared: Option<Spanned<bool>>,
    owner: Option<Spanned<String>>,
    target: Option<Spanned<String>>,
    alias_offset: Option<Spanned<Num>>,
    ops: Option<Spanned<OpsEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpsEntry {
    read: Option<Spanned<Num>>,
    endian: Option<Spanned<String>>,
    valid: Option<Spanned<SizesEntry>>,
    #[serde(rename = "impl")]
    impl_: Option<Spanned<SizesEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SizesEntry {
    #[serde(default)]
    min: u32,
    #[serde(default)]
    max: u32,
    #[serde(default)]
    unaligned: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpaceEntry {
    name: Spanned<String>,
    root: Spanned<String>,
    owner: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
enum Num {
    Int(i64),
    Str(String),
}

/// Line numbers from byte offsets.
struct Lines<'a> {
    src: &'a str,
}

impl Lines<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        let end = span.start.min(self.src.len());
        // Byte offsets from toml are on char boundaries; count bytes anyway.
        self.src.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }
    fn err<T>(&self, span: Range<usize>, message: impl Into<String>) -> Result<T, LoadError> {
        Err(LoadError {
            line: self.line(span),
            message: message.into(),
        })
    }
}

/// Parses a number as the file format allows: decimal, `0x` hex, `0o`
/// octal, `0b` binary, `_` separators, `2^N`, and K/M/G/T/P/E suffixes
/// (binary units, optional `iB`/`B`, optional space).
pub fn parse_number(text: &str) -> Result<u128, String> {
    let t: String = text.trim().chars().filter(|&c| c != '_').collect();
    if t.is_empty() {
        return Err("empty number".to_owned());
    }
    if let Some(exp) = t.strip_prefix("2^") {
        let e: u32 = exp
            .trim()
            .parse()
            .map_err(|_| format!("bad exponent in {text:?}"))?;
        if e > 64 {
            return Err(format!("{text:?} is larger than 2^64"));
        }
        return Ok(1u128 << e);
    }
    let lower = t.to_ascii_lowercase();
    let (digits, radix) = if let Some(h) = lower.strip_prefix("0x") {
        (h.to_owned(), 16)
    } else if let Some(o) = lower.strip_prefix("0o") {
        (o.to_owned(), 8)
    } else if let Some(b) = lower.strip_prefix("0b") {
        (b.to_owned(), 2)
    } else {
        (lower, 10)
    };
    let (digits, shift) = if radix == 10 {
        let d = digits.trim_end_matches("ib").trim_end_matches('b');
        let units = [
            ('k', 10u32),
            ('m', 20),
            ('g', 30),
            ('t', 40),
            ('p', 50),
            ('e', 60),
        ];
        match units.iter().find(|(u, _)| d.ends_with(*u)) {
            Some((_, s)) if d != digits => (d[..d.len() - 1].trim_end().to_owned(), *s),
            Some((_, s)) => (d[..d.len() - 1].trim_end().to_owned(), *s),
            None if d != digits => return Err(format!("bad number {text:?}")),
            None => (digits, 0),
        }
    } else {
        (digits, 0)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(format!(
            "bad number {text:?} (expected e.g. 4096, \"0x1000\", \"4K\", \"2^64\")"
        ));
    }
    let v = u128::from_str_radix(&digits, radix).map_err(|_| format!("{text:?} is too large"))?;
    let v = v
        .checked_mul(1u128 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    Ok(v)
}

impl Lines<'_> {
    fn num(&self, n: &Spanned<Num>, what: &str, max: u128) -> Result<u128, LoadError> {
        let v = match n.get_ref() {
            Num::Int(i) => u128::try_from(*i).map_err(|_| format!("{what} cannot be negative")),
            Num::Str(s) => parse_number(s),
        };
        match v {
            Ok(v) if v <= max => Ok(v),
            Ok(v) => self.err(
                n.span(),
                format!("{what} {v:#x} is too big (the largest is {max:#x})"),
            ),
            Err(e) => self.err(n.span(), format!("{what}: {e}")),
        }
    }
}

fn parse_endian(l: &Lines<'_>, s: &Spanned<String>, target: Endian) -> Result<Endian, LoadError> {
    match s.get_ref().as_str() {
        "little" => Ok(Endian::Little),
        "big" => Ok(Endian::Big),
        "native" => Ok(target),
        other => l.err(
            s.span(),
            format!("unknown endianness {other:?} (expected \"little\", \"big\" or \"native\")"),
        ),
    }
}

fn parse_label(l: &Lines<'_>, s: &Spanned<String>) -> Result<OwnerLabel, LoadError> {
    let t = s.get_ref();
    let label = if let Some(v) = t.strip_prefix("dev id=") {
        OwnerLabel::DevId(v.to_owned())
    } else if let Some(v) = t.strip_prefix("dev path=") {
        OwnerLabel::DevPath(v.to_owned())
    } else if let Some(v) = t.strip_prefix("obj path=") {
        OwnerLabel::ObjPath(v.to_owned())
    } else if let Some(v) = t.strip_prefix("obj type=") {
        OwnerLabel::ObjType(v.to_owned())
    } else {
        return l.err(
            s.span(),
            format!("bad label {t:?} (expected \"dev id=..\", \"dev path=..\", \"obj path=..\" or \"obj type=..\")"),
        );
    };
    Ok(label)
}

/// The built-in dummy device of machine files.
#[derive(Debug)]
pub struct ConstOps {
    /// What every read callback returns (low bytes).
    pub value: u64,
    /// Device byte order.
    pub endian: Endian,
    /// QEMU `valid`.
    pub valid: AccessSizes,
    /// QEMU `impl`.
    pub impl_: AccessSizes,
}

impl MmioOps for ConstOps {
    fn read(&self, _addr: u64, size: u32, _attrs: MemTxAttrs) -> Result<u64, MemTxResult> {
        Ok(match size {
            0..=7 => self.value & ((1u64 << (size * 8)) - 1),
            _ => self.value,
        })
    }
    fn write(&self, _addr: u64, _data: u64, _size: u32, _attrs: MemTxAttrs) -> MemTxResult {
        MemTxResult::OK
    }
    fn valid_sizes(&self) -> AccessSizes {
        self.valid
    }
    fn impl_sizes(&self) -> AccessSizes {
        self.impl_
    }
    fn endianness(&self) -> Endian {
        self.endian
    }
}

const KINDS: &str =
    "container, ram, rom, rom-device, ram-device, mmio, reservation, io-root, alias";

fn parse_kind(l: &Lines<'_>, s: &Spanned<String>) -> Result<(RegionKind, bool), LoadError> {
    Ok(match s.get_ref().as_str() {
        "container" => (RegionKind::Container, false),
        "ram" => (RegionKind::Ram, false),
        "rom" => (RegionKind::Ram, true),
        "rom-device" => (RegionKind::RomDevice, false),
        "ram-device" => (RegionKind::RamDevice, false),
        "mmio" => (RegionKind::Mmio, false),
        "reservation" => (RegionKind::Reservation, false),
        "io-root" => (RegionKind::IoRoot, false),
        "alias" => (RegionKind::Alias, false),
        other => {
            return l.err(
                s.span(),
                format!("unknown region kind {other:?} (expected one of: {KINDS})"),
            )
        }
    })
}

/// Loads a machine description from TOML text.
pub fn load_str(src: &str, opts: LoadOptions) -> Result<LoadedMachine, LoadError> {
    let l = Lines { src };
    let doc: Doc = toml::from_str(src).map_err(|e| {
        let message = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        LoadError {
            line: e.span().map_or(1, |s| l.line(s)),
            message: if message.is_empty() {
                "invalid TOML (unexpected character)".to_owned()
            } else {
                format!("invalid TOML: {message}")
            },
        }
    })?;
    let target_endian = match &doc.endian {
        Some(e) => match e.get_ref().as_str() {
            "little" => Endian::Little,
            "big" => Endian::Big,
            other => {
                return l.err(
                    e.span(),
                    format!("unknown endianness {other:?} (expected \"little\" or \"big\")"),
                )
            }
        },
        None => Endian::Little,
    };
    let memory = Memory::with_target_endian(target_endian);
    let built = memory.transaction(|m| build(m, &l, &doc, opts, target_endian));
    let (spaces, regions, owners) = built?;
    Ok(LoadedMachine {
        memory,
        spaces,
        regions,
        owners,
    })
}

type Built = (
    Vec<SpaceId>,
    BTreeMap<String, RegionId>,
    BTreeMap<String, OwnerId>,
);

fn topo_err<T>(l: &Lines<'_>, span: Range<usize>, e: TopologyError) -> Result<T, LoadError> {
    l.err(span, e.to_string())
}

fn build(
    m: &Machine,
    l: &Lines<'_>,
    doc: &Doc,
    opts: LoadOptions,
    target_endian: Endian,
) -> Result<Built, LoadError> {
    // Devices, in file order; a parent must come first.
    let mut owners: BTreeMap<String, OwnerId> = BTreeMap::new();
    for d in &doc.device {
        let name = d.name.get_ref();
        if owners.contains_key(name) {
            return l.err(d.name.span(), format!("duplicate device name {name:?}"));
        }
        let parent = match &d.parent {
            Some(p) => match owners.get(p.get_ref()) {
                Some(&o) => Some(o),
                None => {
                    let later = doc.device.iter().any(|x| x.name.get_ref() == p.get_ref());
                    return l.err(
                        p.span(),
                        if later {
                            format!(
                                "device parent {:?} must be declared before {name:?}",
                                p.get_ref()
                            )
                        } else {
                            format!("unknown device {:?}", p.get_ref())
                        },
                    );
                }
            },
            None => None,
        };
        let label = match &d.label {
            Some(s) => parse_label(l, s)?,
            None => OwnerLabel::DevId(name.clone()),
        };
        let id = m
            .new_owner_labeled(name, label, parent)
            .or_else(|e| topo_err(l, d.name.span(), e))?;
        owners.insert(name.clone(), id);
    }
    let owner_of = |o: &Option<Spanned<String>>| -> Result<Option<OwnerId>, LoadError> {
        match o {
            Some(s) => match owners.get(s.get_ref()) {
                Some(&id) => Ok(Some(id)),
                None => l.err(s.span(), format!("unknown device {:?}", s.get_ref())),
            },
            None => Ok(None),
        }
    };

    // Validate region entries.
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut kinds = Vec::with_capacity(doc.region.len());
    for (i, r) in doc.region.iter().enumerate() {
        let name = r.name.get_ref();
        if index.insert(name.as_str(), i).is_some() {
            return l.err(r.name.span(), format!("duplicate region name {name:?}"));
        }
        let (kind, rom) = parse_kind(l, &r.kind)?;
        let kind_name = r.kind.get_ref();
        let wrong = |field: &str, span: Range<usize>| -> Result<(), LoadError> {
            l.err(
                span,
                format!("`{field}` does not apply to a region of kind {kind_name:?}"),
            )
        };
        if kind != RegionKind::Alias {
            if let Some(t) = &r.target {
                wrong("target", t.span())?;
            }
            if let Some(t) = &r.alias_offset {
                wrong("alias-offset", t.span())?;
            }
            if r.size.is_none() {
                return l.err(r.name.span(), format!("region {name:?} needs a `size`"));
            }
        } else if r.target.is_none() {
            return l.err(r.name.span(), format!("alias {name:?} needs a `target`"));
        }
        if let Some(o) = &r.ops {
            if !matches!(kind, RegionKind::Mmio | RegionKind::RomDevice) {
                wrong("ops", o.span())?;
            }
        }
        if let Some(x) = &r.romd {
            if kind != RegionKind::RomDevice {
                wrong("romd", x.span())?;
            }
        }
        if let Some(x) = &r.shared {
            if kind != RegionKind::Ram {
                wrong("shared", x.span())?;
            }
        }
        kinds.push((kind, rom));
    }

    // Create regions: everything but aliases first, then aliases as their
    // targets appear.
    // By name; hashed while building (a file has one lookup per reference).
    let mut regions: HashMap<String, RegionId> = HashMap::new();
    let mut sizes: HashMap<String, u128> = HashMap::new();
    for (r, &(kind, rom)) in doc.region.iter().zip(&kinds) {
        if kind == RegionKind::Alias {
            continue;
        }
        let name = r.name.get_ref();
        let Some(size_field) = &r.size else {
            return l.err(r.name.span(), format!("region {name:?} needs a `size`"));
        };
        let backed = matches!(
            kind,
            RegionKind::Ram | RegionKind::RamDevice | RegionKind::RomDevice
        );
        let max = if backed && opts.allocate {
            u128::from(u64::MAX)
        } else {
            MAX_REGION_SIZE
        };
        let size = l.num(size_field, "size", max)?;
        let owner = owner_of(&r.owner)?;
        let ops = || -> Result<Arc<dyn MmioOps>, LoadError> {
            Ok(Arc::new(make_ops(l, r, target_endian)?))
        };
        let span = r.name.span();
        let created = if backed && opts.allocate {
            if size == 0 {
                return l.err(
                    size_field.span(),
                    format!("{name:?}: RAM size must not be zero"),
                );
            }
            match kind {
                RegionKind::Ram => {
                    let backing = if r.shared.as_ref().is_some_and(|s| *s.get_ref()) {
                        RamBacking::Memfd
                    } else {
                        RamBacking::Anonymous
                    };
                    m.new_ram_with(name, size, owner, backing)
                }
                RegionKind::RamDevice => m.new_ram_device(name, size, owner),
                _ => m.new_rom_device(name, size, ops()?, owner),
            }
        } else {
            match kind {
                RegionKind::Container => m.new_container(name, size, owner),
                RegionKind::Mmio => m.new_mmio(name, size, ops()?, owner),
                RegionKind::Reservation => m.new_reservation(name, size, owner),
                _ => {
                    if kind == RegionKind::RomDevice || r.ops.is_some() {
                        make_ops(l, r, target_endian)?;
                    }
                    m.new_model_region(name, kind, size, owner)
                }
            }
        };
        let id = created.or_else(|e| topo_err(l, span, e))?;
        if rom {
            m.set_readonly(id, true)
                .or_else(|e| topo_err(l, r.kind.span(), e))?;
        }
        regions.insert(name.clone(), id);
        sizes.insert(name.clone(), size);
    }
    // Aliases in file order, each after its target: an alias whose target
    // is an alias not created yet first creates that one (and so on down
    // the chain, on an explicit stack). Each alias is created once, so this
    // is linear in the file however its chains are ordered.
    let create_alias = |r: &RegionEntry,
                        target: RegionId,
                        regions: &mut HashMap<String, RegionId>,
                        sizes: &mut HashMap<String, u128>|
     -> Result<(), LoadError> {
        let Some(t) = &r.target else { return Ok(()) };
        let name = r.name.get_ref();
        let tsize = sizes.get(t.get_ref()).copied().unwrap_or(0);
        let off = match &r.alias_offset {
            Some(o) => l.num(o, "alias-offset", u128::from(u64::MAX))?,
            None => 0,
        };
        let size = match &r.size {
            Some(s) => l.num(s, "size", MAX_REGION_SIZE)?,
            None => match tsize.checked_sub(off) {
                Some(s) => s,
                None => {
                    return l.err(
                        r.alias_offset.as_ref().map_or(r.name.span(), |o| o.span()),
                        format!(
                            "alias-offset {off:#x} is past the end of {:?} ({tsize:#x} bytes)",
                            t.get_ref()
                        ),
                    )
                }
            },
        };
        let owner = owner_of(&r.owner)?;
        let id = m
            .new_alias(name, target, off as u64, size, owner)
            .or_else(|e| topo_err(l, r.name.span(), e))?;
        regions.insert(name.clone(), id);
        sizes.insert(name.clone(), size);
        Ok(())
    };
    let aliases = doc
        .region
        .iter()
        .zip(&kinds)
        .filter(|(_, k)| k.0 == RegionKind::Alias)
        .map(|(r, _)| r);
    for first in aliases {
        if regions.contains_key(first.name.get_ref()) {
            continue;
        }
        // The chain from `first` down to the first target that exists.
        let mut chain: Vec<&RegionEntry> = vec![first];
        let mut on_chain: HashMap<&str, ()> = HashMap::new();
        on_chain.insert(first.name.get_ref().as_str(), ());
        while let Some(&r) = chain.last() {
            let Some(t) = &r.target else {
                chain.pop();
                continue;
            };
            if let Some(&target) = regions.get(t.get_ref()) {
                create_alias(r, target, &mut regions, &mut sizes)?;
                chain.pop();
                continue;
            }
            let Some(&next) = index.get(t.get_ref().as_str()) else {
                return l.err(t.span(), format!("unknown alias target {:?}", t.get_ref()));
            };
            let next = &doc.region[next];
            if on_chain.insert(next.name.get_ref().as_str(), ()).is_some() {
                // `first` leads into a loop: name it from `first` on.
                let mut names = vec![first.name.get_ref().clone()];
                let mut seen: HashMap<&str, ()> = HashMap::new();
                seen.insert(first.name.get_ref().as_str(), ());
                let mut cur = first;
                while let Some(t) = &cur.target {
                    let t = t.get_ref();
                    names.push(t.clone());
                    if seen.insert(t.as_str(), ()).is_some() {
                        break;
                    }
                    match index.get(t.as_str()).map(|&i| &doc.region[i]) {
                        Some(next) => cur = next,
                        None => break,
                    }
                }
                let span = first
                    .target
                    .as_ref()
                    .map_or(first.name.span(), |t| t.span());
                return l.err(span, format!("alias loop: {}", names.join(" -> ")));
            }
            chain.push(next);
        }
    }

    // Flags.
    for r in &doc.region {
        let Some(&id) = regions.get(r.name.get_ref()) else {
            continue;
        };
        let span = r.name.span();
        let set = |res: Result<(), TopologyError>| res.or_else(|e| topo_err(l, span.clone(), e));
        if let Some(v) = r.enabled {
            set(m.set_enabled(id, v))?;
        }
        if let Some(v) = r.readonly {
            set(m.set_readonly(id, v))?;
        }
        if let Some(v) = r.nonvolatile {
            set(m.set_nonvolatile(id, v))?;
        }
        if let Some(v) = r.unmergeable {
            set(m.set_unmergeable(id, v))?;
        }
        if let Some(v) = &r.romd {
            set(m.set_romd(id, *v.get_ref()))?;
        }
    }

    // Subregions, in file order. Consecutive entries with the same parent
    // are mapped in one batch (one by one, n equal-priority siblings cost
    // O(n²): each newcomer goes to the front of the list).
    let mut batch: Vec<(u64, RegionId, i32)> = Vec::new();
    let mut batch_entries: Vec<&RegionEntry> = Vec::new();
    let mut batch_parent: Option<RegionId> = None;
    let flush = |parent: Option<RegionId>,
                 batch: &mut Vec<(u64, RegionId, i32)>,
                 entries: &mut Vec<&RegionEntry>|
     -> Result<(), LoadError> {
        if let Some(container) = parent {
            if let Err((i, e)) = m.add_subregions(container, batch) {
                let span = entries
                    .get(i)
                    .and_then(|r| r.parent.as_ref())
                    .map_or(0..0, |p| p.span());
                return topo_err(l, span, e);
            }
        }
        batch.clear();
        entries.clear();
        Ok(())
    };
    // What one entry asks for: `None` if it maps nothing.
    let link = |r: &RegionEntry| -> Result<Option<(RegionId, RegionId, u64, i32)>, LoadError> {
        let Some(&id) = regions.get(r.name.get_ref()) else {
            return Ok(None);
        };
        let Some(p) = &r.parent else {
            if let Some(o) = &r.offset {
                return l.err(o.span(), "`offset` needs a `parent` container");
            }
            if let Some(o) = &r.priority {
                return l.err(o.span(), "`priority` needs a `parent` container");
            }
            return Ok(None);
        };
        let Some(&container) = regions.get(p.get_ref()) else {
            return l.err(p.span(), format!("unknown parent region {:?}", p.get_ref()));
        };
        let offset = match &r.offset {
            Some(o) => l.num(o, "offset", u128::from(u64::MAX))? as u64,
            None => 0,
        };
        let priority = match &r.priority {
            Some(pr) => match i32::try_from(*pr.get_ref()) {
                Ok(v) => v,
                Err(_) => {
                    return l.err(
                        pr.span(),
                        format!("priority {} does not fit 32 bits", pr.get_ref()),
                    )
                }
            },
            None => 0,
        };
        Ok(Some((container, id, offset, priority)))
    };
    for r in &doc.region {
        let (container, id, offset, priority) = match link(r) {
            Ok(Some(x)) => x,
            Ok(None) => continue,
            Err(e) => {
                // The entries before this one come first, as one by one.
                flush(batch_parent, &mut batch, &mut batch_entries)?;
                return Err(e);
            }
        };
        if batch_parent != Some(container) {
            flush(batch_parent, &mut batch, &mut batch_entries)?;
            batch_parent = Some(container);
        }
        batch.push((offset, id, priority));
        batch_entries.push(r);
    }
    flush(batch_parent, &mut batch, &mut batch_entries)?;

    // Address spaces.
    let mut spaces = Vec::new();
    let mut space_names: HashMap<&str, ()> = HashMap::new();
    for s in &doc.address_space {
        let name = s.name.get_ref();
        if space_names.insert(name.as_str(), ()).is_some() {
            return l.err(
                s.name.span(),
                format!("duplicate address space name {name:?}"),
            );
        }
        let Some(&root) = regions.get(s.root.get_ref()) else {
            return l.err(
                s.root.span(),
                format!("unknown root region {:?}", s.root.get_ref()),
            );
        };
        let owner = owner_of(&s.owner)?;
        let id = m
            .new_address_space(name, root, owner)
            .or_else(|e| topo_err(l, s.name.span(), e))?;
        spaces.push(id);
    }
    Ok((spaces, regions.into_iter().collect(), owners))
}

fn make_ops(l: &Lines<'_>, r: &RegionEntry, target: Endian) -> Result<ConstOps, LoadError> {
    let mut ops = ConstOps {
        value: 0,
        endian: target,
        valid: AccessSizes::UNSET,
        impl_: AccessSizes::UNSET,
    };
    let Some(o) = &r.ops else { return Ok(ops) };
    let o = o.get_ref();
    if let Some(v) = &o.read {
        ops.value = l.num(v, "read value", u128::from(u64::MAX))? as u64;
    }
    if let Some(e) = &o.endian {
        ops.endian = parse_endian(l, e, target)?;
    }
    let sizes = |s: &Spanned<SizesEntry>, what: &str| -> Result<AccessSizes, LoadError> {
        let v = s.get_ref();
        let ok = |x: u32| matches!(x, 0 | 1 | 2 | 4 | 8);
        if !ok(v.min) || !ok(v.max) || (v.max != 0 && v.min > v.max) {
            return l.err(
                s.span(),
                format!("{what} sizes must be 1, 2, 4 or 8 (0 = unset) with min <= max; got min {} max {}", v.min, v.max),
            );
        }
        Ok(AccessSizes::new(v.min, v.max, v.unaligned))
    };
    if let Some(v) = &o.valid {
        ops.valid = sizes(v, "valid")?;
    }
    if let Some(v) = &o.impl_ {
        ops.impl_ = sizes(v, "impl")?;
    }
    Ok(ops)
}

impl fmt::Display for LoadOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.allocate {
            "allocate"
        } else {
            "model-only"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_file_numbers_accept_every_documented_spelling() {
        assert_eq!(parse_number("4096"), Ok(4096));
        assert_eq!(parse_number("0x1000"), Ok(0x1000));
        assert_eq!(parse_number("0x1_0000_0000_0000_0000"), Ok(1u128 << 64));
        assert_eq!(parse_number("2^64"), Ok(1u128 << 64));
        assert_eq!(parse_number("64K"), Ok(64 << 10));
        assert_eq!(parse_number("128 MiB"), Ok(128 << 20));
        assert_eq!(parse_number("4G"), Ok(4 << 30));
        assert!(parse_number("0xzz").is_err());
        assert!(parse_number("2^65").is_err());
        assert!(parse_number("").is_err());
        assert!(parse_number("12Q").is_err());
    }

    #[test]
    fn machine_file_errors_name_the_line_of_the_offending_field() {
        let src = "[[region]]\nname = \"a\"\nkind = \"alias\"\ntarget = \"nope\"\n";
        let e = load_str(src, LoadOptions::default()).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("unknown alias target"), "{e}");
    }
}
