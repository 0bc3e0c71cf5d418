//! `memtree`: QEMU's memory map, rebuilt, printed and explained.
//!
//! ```text
//! memtree demo                                   # the built-in PC-like machine, end to end
//! memtree flat   machine.toml [-o]               # flat views (info mtree -f)
//! memtree tree   machine.toml [-D] [-o]          # region tree (info mtree)
//! memtree lookup machine.toml [--as NAME] ADDR   # who serves ADDR, and why
//! memtree flat   --qemu-tree pc.disabled.txt [--qemu-flat pc.flat.txt] [--qemu-owners pc.owner.txt]
//! memtree diff   A B                             # compare the flat views of two machines
//! ```
//!
//! A machine is either a native TOML description (`*.toml`, see
//! `examples/`) or a QEMU `info mtree -D` dump (`--qemu-tree`, or any
//! positional file not ending in `.toml`). Malformed input of any kind is
//! reported as `memtree: FILE:LINE: what is wrong` with exit status 2.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use memtree::machine_file::{self, LoadOptions};
use memtree::text::import::{self, ImportError};
use memtree::text::parse::{self, ParseError};
use memtree::text::print::{self, FlatOptions, TreeOptions};
use memtree::{Memory, SpaceId};

#[derive(Parser, Debug)]
#[command(
    name = "memtree",
    version,
    about = "QEMU's memory API rebuilt in Rust: build, print and explain memory maps",
    long_about = "QEMU's memory API rebuilt in Rust: build, print and explain memory maps.\n\n\
A MACHINE is a native TOML description (FILE ending in .toml; see examples/) or a QEMU\n\
`info mtree -D` dump (--qemu-tree, or a FILE not ending in .toml). Malformed input is\n\
reported as `memtree: FILE:LINE: what is wrong` with exit status 2."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build the built-in PC-like machine, print it, access it, unplug a
    /// device and show that teardown leaks nothing.
    Demo {
        /// Build the POWER8-class machine of QEMU's largest reports instead
        /// (255 vCPUs, 255 virtio-net-pci behind 40 bridges) and time it.
        #[arg(long = "scale")]
        scale: bool,
    },
    /// Print the flat views (`info mtree -f` format).
    Flat {
        #[command(flatten)]
        machine: MachineArgs,
        /// Print owners (`info mtree -f -o`).
        #[arg(short = 'o', long = "owners")]
        owners: bool,
    },
    /// Print the region tree (`info mtree` format).
    Tree {
        #[command(flatten)]
        machine: MachineArgs,
        /// Also print disabled regions (`info mtree -D`).
        #[arg(short = 'D', long = "disabled")]
        disabled: bool,
        /// Print owners (`info mtree -o`).
        #[arg(short = 'o', long = "owners")]
        owners: bool,
    },
    /// Which region serves an address, at which offset, and why every other
    /// region covering it lost.
    Lookup {
        /// [FILE] ADDR: ADDR is hex with `0x` (or zero-padded as QEMU prints
        /// it, or containing a-f), otherwise decimal.
        #[arg(value_name = "[FILE] ADDR", num_args = 1..=2, required = true)]
        args: Vec<String>,
        /// QEMU `info mtree -D` dump to import (instead of FILE).
        #[arg(long = "qemu-tree", value_name = "T")]
        qemu_tree: Option<PathBuf>,
        /// QEMU `info mtree -f` dump of the same machine.
        #[arg(long = "qemu-flat", value_name = "F")]
        qemu_flat: Option<PathBuf>,
        /// QEMU `info mtree -o` dump of the same machine.
        #[arg(long = "qemu-owners", value_name = "O")]
        qemu_owners: Option<PathBuf>,
        /// The address space (default: "memory", else the first one).
        #[arg(long = "as", value_name = "NAME")]
        space: Option<String>,
        /// Also list candidates inside disabled or clipped regions.
        #[arg(long = "all")]
        all: bool,
    },
    /// Compare the flat views of two machines (exit 0 if equal, 1 if not).
    Diff {
        /// The first machine (.toml or QEMU `info mtree -D` dump).
        a: PathBuf,
        /// The second machine.
        b: PathBuf,
    },
    /// Print the census of live objects of a loaded machine (by kind).
    Census {
        #[command(flatten)]
        machine: MachineArgs,
    },
    /// Draw an address space as an SVG memory map, or with --diff A B what
    /// changed between two machines (hover a range for who serves it and
    /// what it obscures).
    Map {
        #[command(flatten)]
        machine: MachineArgs,
        /// Draw the built-in demo machine (instead of FILE).
        #[arg(long = "demo")]
        demo: bool,
        /// Compare two machines (.toml or QEMU `info mtree -D` dumps).
        #[arg(long = "diff", num_args = 2, value_names = ["A", "B"])]
        diff: Option<Vec<PathBuf>>,
        /// QEMU `info mtree -f` dumps of the two --diff machines.
        #[arg(long = "diff-flat", num_args = 2, value_names = ["FA", "FB"])]
        diff_flat: Option<Vec<PathBuf>>,
        /// The address space (default: "memory", else the first one).
        #[arg(long = "as", value_name = "NAME")]
        space: Option<String>,
        /// Write the SVG to FILE instead of stdout.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct MachineArgs {
    /// A machine file (.toml), or a QEMU `info mtree -D` dump.
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
    /// QEMU `info mtree -D` dump to import.
    #[arg(long = "qemu-tree", value_name = "T")]
    qemu_tree: Option<PathBuf>,
    /// QEMU `info mtree -f` dump of the same machine (teaches which i/o
    /// regions fill their holes).
    #[arg(long = "qemu-flat", value_name = "F")]
    qemu_flat: Option<PathBuf>,
    /// QEMU `info mtree -o` dump of the same machine (attaches owners).
    #[arg(long = "qemu-owners", value_name = "O")]
    qemu_owners: Option<PathBuf>,
}

/// A user-facing error: `memtree: WHERE: WHAT`, exit status 2.
#[derive(Debug)]
struct CliError {
    location: String,
    message: String,
}

impl CliError {
    fn at(path: &Path, line: Option<usize>, message: impl Into<String>) -> CliError {
        let location = match line {
            Some(l) => format!("{}:{l}", path.display()),
            None => path.display().to_string(),
        };
        CliError {
            location,
            message: message.into(),
        }
    }
    fn arg(name: &str, message: impl Into<String>) -> CliError {
        CliError {
            location: name.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "memtree: {}: {}", self.location, self.message)
    }
}

fn read(path: &Path) -> Result<String, CliError> {
    let bytes =
        std::fs::read(path).map_err(|e| CliError::at(path, None, format!("cannot read: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        let upto = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = upto.iter().filter(|&&b| b == b'\n').count() + 1;
        CliError::at(path, Some(line), "not valid UTF-8 text")
    })
}

fn parse_err(path: &Path, e: ParseError) -> CliError {
    CliError::at(path, Some(e.line), e.message)
}

/// Strips the "xxx dump line N: " prefix the importer puts on its messages.
fn strip_line_prefix(msg: &str) -> String {
    match msg
        .find(" line ")
        .and_then(|i| msg[i..].find(": ").map(|j| i + j + 2))
    {
        Some(k) if msg[..k].contains("dump line") => msg[k..].to_owned(),
        _ => msg.to_owned(),
    }
}

fn import_err(tree: &Path, flat: Option<&Path>, owners: Option<&Path>, e: ImportError) -> CliError {
    let msg = strip_line_prefix(&e.to_string());
    match e {
        ImportError::HiddenRegion { line }
        | ImportError::UnknownAliasTarget { line, .. }
        | ImportError::AliasLoop { line, .. }
        | ImportError::Model { line, .. } => CliError::at(tree, Some(line), msg),
        ImportError::UnknownSpace { line, .. } => {
            CliError::at(flat.unwrap_or(tree), Some(line), msg)
        }
        ImportError::OwnerMismatch { line, .. } => {
            CliError::at(owners.unwrap_or(tree), Some(line), msg)
        }
        #[allow(unreachable_patterns)]
        _ => CliError::at(tree, None, msg),
    }
}

fn is_toml(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
}

fn load_toml(path: &Path) -> Result<Memory, CliError> {
    let text = read(path)?;
    machine_file::load_str(&text, LoadOptions { allocate: false })
        .map(|m| m.memory)
        .map_err(|e| CliError::at(path, Some(e.line), e.message))
}

fn load_qemu(tree: &Path, flat: Option<&Path>, owners: Option<&Path>) -> Result<Memory, CliError> {
    let tree_dump = parse::parse_tree(&read(tree)?).map_err(|e| parse_err(tree, e))?;
    let flat_dump = match flat {
        Some(p) => Some(parse::parse_flat(&read(p)?).map_err(|e| parse_err(p, e))?),
        None => None,
    };
    let owner_dump = match owners {
        Some(p) => Some(parse::parse_tree(&read(p)?).map_err(|e| parse_err(p, e))?),
        None => None,
    };
    import::import(&tree_dump, flat_dump.as_ref(), owner_dump.as_ref())
        .map(|i| i.memory)
        .map_err(|e| import_err(tree, flat, owners, e))
}

fn load_any(path: &Path) -> Result<Memory, CliError> {
    if is_toml(path) {
        load_toml(path)
    } else {
        load_qemu(path, None, None)
    }
}

fn load(
    file: Option<&Path>,
    qemu_tree: Option<&Path>,
    qemu_flat: Option<&Path>,
    qemu_owners: Option<&Path>,
) -> Result<Memory, CliError> {
    match (file, qemu_tree) {
        (Some(_), Some(_)) => Err(CliError::arg(
            "usage",
            "give either a machine FILE or --qemu-tree, not both",
        )),
        (None, None) => Err(CliError::arg(
            "usage",
            "no machine: give a machine FILE (.toml) or --qemu-tree DUMP",
        )),
        (Some(f), None) if is_toml(f) => {
            if qemu_flat.is_some() || qemu_owners.is_some() {
                return Err(CliError::arg(
                    "usage",
                    "--qemu-flat and --qemu-owners only apply to QEMU dumps",
                ));
            }
            load_toml(f)
        }
        (Some(t), None) | (None, Some(t)) => load_qemu(t, qemu_flat, qemu_owners),
    }
}

fn load_machine(m: &MachineArgs) -> Result<Memory, CliError> {
    load(
        m.file.as_deref(),
        m.qemu_tree.as_deref(),
        m.qemu_flat.as_deref(),
        m.qemu_owners.as_deref(),
    )
}

/// Parses an address: `0x` hex, hex as QEMU prints it (zero-padded, or with
/// a-f digits), or decimal; `_` separators allowed.
fn parse_addr(text: &str) -> Result<u64, CliError> {
    let t: String = text.trim().chars().filter(|&c| c != '_').collect();
    let bad = || {
        CliError::arg(
            text,
            "bad address (expected hex like 0xfee00000 or 00000000fee00000, or decimal)",
        )
    };
    let lower = t.to_ascii_lowercase();
    let (digits, radix) = if let Some(h) = lower.strip_prefix("0x") {
        (h.to_owned(), 16)
    } else if lower.chars().any(|c| matches!(c, 'a'..='f'))
        || (lower.len() > 1 && lower.starts_with('0'))
    {
        (lower, 16)
    } else {
        (lower, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad());
    }
    u64::from_str_radix(&digits, radix)
        .map_err(|_| CliError::arg(text, "address does not fit 64 bits"))
}

fn pick_space(mem: &Memory, name: Option<&str>) -> Result<SpaceId, CliError> {
    let spaces = mem.address_spaces();
    let names = || {
        spaces
            .iter()
            .map(|(_, n)| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match name {
        Some(n) => spaces
            .iter()
            .find(|(_, s)| s == n)
            .map(|(id, _)| *id)
            .ok_or_else(|| {
                CliError::arg(
                    "--as",
                    format!(
                        "no address space named \"{n}\" (the machine has: {})",
                        names()
                    ),
                )
            }),
        None => spaces
            .iter()
            .find(|(_, s)| s == "memory")
            .or_else(|| spaces.first())
            .map(|(id, _)| *id)
            .ok_or_else(|| CliError::arg("lookup", "the machine has no address space")),
    }
}

/// Flat views keyed by address-space name: the printed range lines.
fn flat_lines(mem: &Memory) -> BTreeMap<String, Vec<String>> {
    let mut text = String::new();
    let _ = print::print_flat(mem, &mut text, FlatOptions { owners: false });
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for block in text.split("\n\n") {
        let mut spaces = Vec::new();
        let mut lines = Vec::new();
        for l in block.lines() {
            if let Some(rest) = l.strip_prefix(" AS \"") {
                if let Some(end) = rest.find("\", root: ") {
                    spaces.push(rest[..end].to_owned());
                }
            } else if l.starts_with("  ") {
                lines.push(l.trim_start().to_owned());
            }
        }
        for s in spaces {
            out.insert(s, lines.clone());
        }
    }
    out
}

fn emit(text: &str) {
    // A closed pipe (`memtree flat ... | head`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(text.as_bytes());
}

fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Demo { scale: true } => {
            let mut out = String::new();
            let result = memtree::scale::run_demo(&mut out);
            emit(&out);
            match result {
                Ok(leaks) if leaks.is_clean() => Ok(ExitCode::SUCCESS),
                Ok(_) => Ok(ExitCode::from(1)),
                Err(e) => Err(CliError::arg("demo", e)),
            }
        }
        Command::Demo { scale: false } => {
            let mut out = String::new();
            let result = memtree::demo::run(&mut out);
            emit(&out);
            match result {
                Ok(leaks) if leaks.is_clean() => Ok(ExitCode::SUCCESS),
                Ok(_) => Ok(ExitCode::from(1)),
                Err(e) => Err(CliError::arg("demo", e.to_string())),
            }
        }
        Command::Flat { machine, owners } => {
            let mem = load_machine(&machine)?;
            let mut out = String::new();
            let _ = print::print_flat(&mem, &mut out, FlatOptions { owners });
            emit(&out);
            Ok(ExitCode::SUCCESS)
        }
        Command::Tree {
            machine,
            disabled,
            owners,
        } => {
            let mem = load_machine(&machine)?;
            let mut out = String::new();
            let _ = print::print_tree(&mem, &mut out, TreeOptions { disabled, owners });
            emit(&out);
            Ok(ExitCode::SUCCESS)
        }
        Command::Lookup {
            args,
            qemu_tree,
            qemu_flat,
            qemu_owners,
            space,
            all,
        } => {
            let (file, addr) = match args.as_slice() {
                [addr] => (None, addr),
                [file, addr] => (Some(PathBuf::from(file)), addr),
                _ => return Err(CliError::arg("usage", "lookup takes [FILE] ADDR")),
            };
            let addr = parse_addr(addr)?;
            let mem = load(
                file.as_deref(),
                qemu_tree.as_deref(),
                qemu_flat.as_deref(),
                qemu_owners.as_deref(),
            )?;
            let id = pick_space(&mem, space.as_deref())?;
            let why = memtree::lookup::explain(&mem, id, addr)
                .map_err(|e| CliError::arg("lookup", e.to_string()))?;
            emit(&if all {
                format!("{why:#}")
            } else {
                format!("{why}")
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { a, b } => {
            let ma = load_any(&a)?;
            let mb = load_any(&b)?;
            let (fa, fb) = (flat_lines(&ma), flat_lines(&mb));
            let mut out = String::new();
            let mut differ = false;
            let names: std::collections::BTreeSet<&String> = fa.keys().chain(fb.keys()).collect();
            for n in names {
                let (la, lb) = (fa.get(n), fb.get(n));
                if la == lb {
                    continue;
                }
                differ = true;
                out.push_str(&format!("address space \"{n}\":\n"));
                let (la, lb) = match (la, lb) {
                    (Some(la), Some(lb)) => (la, lb),
                    (Some(_), None) => {
                        out.push_str(&format!("  only in {}\n", a.display()));
                        continue;
                    }
                    _ => {
                        out.push_str(&format!("  only in {}\n", b.display()));
                        continue;
                    }
                };
                // Hashed: two views of n ranges compare in O(n), not O(n²).
                let (sa, sb): (HashSet<&String>, HashSet<&String>) =
                    (la.iter().collect(), lb.iter().collect());
                for l in la.iter().filter(|l| !sb.contains(l)) {
                    out.push_str(&format!("- {l}\n"));
                }
                for l in lb.iter().filter(|l| !sa.contains(l)) {
                    out.push_str(&format!("+ {l}\n"));
                }
            }
            if !differ {
                out.push_str("the flat views are identical\n");
            }
            emit(&out);
            Ok(if differ {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Census { machine } => {
            let mem = load_machine(&machine)?;
            let mut out = String::new();
            for (kind, n) in mem.census().counts() {
                out.push_str(&format!("{:<14} {n}\n", kind.as_str()));
            }
            emit(&out);
            Ok(ExitCode::SUCCESS)
        }
        Command::Map {
            machine,
            demo,
            diff,
            diff_flat,
            space,
            output,
        } => run_map(machine, demo, diff, diff_flat, space, output),
    }
}

/// `memtree map`: one address space as SVG, or two side by side (`--diff`).
fn run_map(
    machine: MachineArgs,
    demo: bool,
    diff: Option<Vec<PathBuf>>,
    diff_flat: Option<Vec<PathBuf>>,
    space: Option<String>,
    output: Option<PathBuf>,
) -> Result<ExitCode, CliError> {
    use memtree::map_svg;
    let has_machine = machine.file.is_some() || machine.qemu_tree.is_some();
    let collect = |mem: &Memory| {
        let id = pick_space(mem, space.as_deref())?;
        map_svg::collect(mem, id).map_err(|e| CliError::arg("map", e.to_string()))
    };
    let svg = match (diff, demo) {
        (Some(_), true) => return Err(CliError::arg("usage", "give either --demo or --diff")),
        (Some(_), false) if has_machine || machine.qemu_flat.is_some() => {
            return Err(CliError::arg(
                "usage",
                "--diff takes both machines; use --diff-flat for their -f dumps",
            ))
        }
        (Some(pair), false) => {
            let flats = diff_flat.as_ref();
            let side = |i: usize| match flats {
                Some(f) => load(None, Some(&pair[i]), Some(&f[i]), None),
                None => load_any(&pair[i]),
            };
            let (ma, mb) = (side(0)?, side(1)?);
            let (a, b) = (collect(&ma)?, collect(&mb)?);
            let label = |p: &PathBuf| p.display().to_string();
            map_svg::render_diff(&a, &label(&pair[0]), &b, &label(&pair[1]))
        }
        (None, _) if diff_flat.is_some() => {
            return Err(CliError::arg("usage", "--diff-flat needs --diff A B"))
        }
        (None, true) if has_machine => {
            return Err(CliError::arg("usage", "give either --demo or a machine"))
        }
        (None, true) => {
            let d = memtree::demo::build().map_err(|e| CliError::arg("demo", e.to_string()))?;
            map_svg::render(&collect(&d.memory)?)
        }
        (None, false) => map_svg::render(&collect(&load_machine(&machine)?)?),
    };
    match output {
        Some(path) => std::fs::write(&path, svg)
            .map_err(|e| CliError::at(&path, None, format!("cannot write: {e}")))?,
        None => emit(&svg),
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}
