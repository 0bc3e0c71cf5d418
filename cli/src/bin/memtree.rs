//! `memtree`: QEMU's memory map, rebuilt, printed and explained.
//!
//! ```text
//! memtree demo                                   # the built-in PC-like machine, end to end
//! memtree flat   machine.toml [-o]               # flat views (info mtree -f)
//! memtree tree   machine.toml [-D] [-o]          # region tree (info mtree)
//! memtree lookup machine.toml [--as NAME] ADDR|START-LAST|START+SIZE ...  # who serves ADDR, and why
//! memtree flat   --qemu-tree pc.disabled.txt [--qemu-flat pc.flat.txt] [--qemu-owners pc.owner.txt]
//! memtree diff   A B [--a-flat FA] [--b-flat FB] # compare the flat views of two machines
//! memtree census machine.toml [--dot]            # live objects by kind (or the region graph)
//! memtree completions bash|zsh|fish              # shell completions
//! ```
//!
//! `--json` on `tree`, `flat`, `lookup`, `diff` and `census` prints one JSON
//! document whose schema (versioned by its `schema_version` field) is
//! docs/json-schema.md. A QEMU dump imported without its `-f` dump is
//! rendered from guesses; `flat`, `lookup` and `diff` then say on stderr
//! what was guessed and how to give the `-f` dump.
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

use clap::{Args, CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};

use memtree::qemu_text::import::{self, ImportError};
use memtree::qemu_text::parse::{self, ParseError};
use memtree::qemu_text::print::{self, FlatOptions, TreeOptions};
use memtree::{Memory, SpaceId};
use memtree_cli::machine_file::{self, LoadOptions};

#[derive(Parser, Debug)]
#[command(
    name = "memtree",
    version,
    about = "QEMU's memory API rebuilt in Rust: build, print and explain memory maps",
    long_about = "QEMU's memory API rebuilt in Rust: build, print and explain memory maps.\n\n\
A MACHINE is a native TOML description (FILE ending in .toml; see examples/) or a QEMU\n\
`info mtree -D` dump (--qemu-tree, or a FILE not ending in .toml). Malformed input is\n\
reported as `memtree: FILE:LINE: what is wrong` with exit status 2.\n\n\
A QEMU dump imported without its `info mtree -f` dump (--qemu-flat) is rendered from guesses\n\
(which i/o leaves are MMIO, the order of overlapping equal-priority siblings, the creation\n\
order of address spaces): flat, lookup and diff say so on stderr.\n\n\
--json prints a versioned JSON document (schema: docs/json-schema.md)."
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
        /// Print only the view of this address space.
        #[arg(long = "as", value_name = "NAME")]
        space: Option<String>,
        /// Print JSON (docs/json-schema.md).
        #[arg(long = "json")]
        json: bool,
    },
    /// Print the region tree (`info mtree` format).
    Tree {
        #[command(flatten)]
        machine: MachineArgs,
        /// Also print disabled regions (`info mtree -D`).
        #[arg(short = 'D', long = "disabled")]
        disabled: bool,
        /// Print owners (`info mtree -o`). For a QEMU dump only with
        /// --qemu-owners: owners are never invented.
        #[arg(short = 'o', long = "owners")]
        owners: bool,
        /// Print only the block of this address space.
        #[arg(long = "as", value_name = "NAME")]
        space: Option<String>,
        /// Print JSON (docs/json-schema.md).
        #[arg(long = "json")]
        json: bool,
    },
    /// Which region serves an address, at which offset, and why every other
    /// region covering it lost.
    Lookup {
        /// [FILE] ADDR...: each ADDR is an address, START-LAST or
        /// START+SIZE. Numbers follow QEMU's monitor: `0x` prefix for hex,
        /// bare digits are decimal (`1000` is 0x3e8). FILE is omitted with
        /// --qemu-tree.
        #[arg(value_name = "[FILE] ADDR", num_args = 1.., required = true)]
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
        /// Print JSON (docs/json-schema.md).
        #[arg(long = "json")]
        json: bool,
    },
    /// Compare the flat views of two machines (exit 0 if equal, 1 if not).
    Diff {
        /// The first machine (.toml or QEMU `info mtree -D` dump).
        a: PathBuf,
        /// The second machine.
        b: PathBuf,
        /// QEMU `info mtree -f` dump of A.
        #[arg(long = "a-flat", value_name = "FA")]
        a_flat: Option<PathBuf>,
        /// QEMU `info mtree -f` dump of B.
        #[arg(long = "b-flat", value_name = "FB")]
        b_flat: Option<PathBuf>,
        /// QEMU `info mtree -o` dump of A.
        #[arg(long = "a-owners", value_name = "OA")]
        a_owners: Option<PathBuf>,
        /// QEMU `info mtree -o` dump of B.
        #[arg(long = "b-owners", value_name = "OB")]
        b_owners: Option<PathBuf>,
        /// Print JSON (docs/json-schema.md).
        #[arg(long = "json")]
        json: bool,
    },
    /// Print the census of live objects of a loaded machine (by kind).
    Census {
        #[command(flatten)]
        machine: MachineArgs,
        /// Print the region graph in Graphviz DOT instead (address spaces,
        /// containment edges, dashed alias edges; census in the label).
        #[arg(long = "dot")]
        dot: bool,
        /// Print JSON (docs/json-schema.md).
        #[arg(long = "json")]
        json: bool,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
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

/// A loaded machine and what is known about how it was loaded.
struct Loaded {
    memory: Memory,
    /// The file it came from (for messages).
    source: PathBuf,
    /// A QEMU dump imported without a flat dump: what was guessed.
    guessed: Option<Vec<String>>,
    /// Owners are known (a machine file, or a QEMU dump with an owner dump).
    owners_known: bool,
}

impl Loaded {
    /// On stderr: what was guessed for a QEMU dump imported without its
    /// `-f` dump, and how to give it (`flag` names the option).
    fn warn_guessed(&self, flag: &str) {
        let Some(guessed) = &self.guessed else { return };
        let leaves: Vec<&String> = guessed
            .iter()
            .filter(|g| g.contains("taken as MMIO"))
            .collect();
        let orders: Vec<&String> = guessed
            .iter()
            .filter(|g| g.contains("order is guessed"))
            .collect();
        let mut msg = format!(
            "memtree: warning: {}: imported without its `info mtree -f` dump, so the flat views are guessed and may differ from QEMU's:\n",
            self.source.display()
        );
        msg.push_str(&format!(
            "  - {} `i/o` region(s) without subregions taken as MMIO (each may be an empty container)\n",
            leaves.len()
        ));
        msg.push_str(&format!(
            "  - the order of {} pair(s) of overlapping equal-priority siblings (which one wins)\n",
            orders.len()
        ));
        for o in orders.iter().take(3) {
            msg.push_str(&format!("      {o}\n"));
        }
        msg.push_str("  - the creation order of address spaces\n");
        msg.push_str(&format!(
            "  give the output of `info mtree -f` of the same machine with {flag} FILE\n"
        ));
        let _ = std::io::stderr().write_all(msg.as_bytes());
    }
}

/// Reads a file that must hold something: empty and blank files (and
/// /dev/null) are malformed input, not an empty machine.
fn read_nonempty(path: &Path, what: &str) -> Result<String, CliError> {
    let text = read(path)?;
    if text.trim().is_empty() {
        let line = text.lines().count().max(1);
        let kind = if text.is_empty() { "empty" } else { "blank" };
        return Err(CliError::at(
            path,
            Some(line),
            format!("{kind} file: expected {what}"),
        ));
    }
    Ok(text)
}

fn load_toml(path: &Path) -> Result<Loaded, CliError> {
    let text = read_nonempty(path, "a machine description (see examples/)")?;
    machine_file::load_str(&text, LoadOptions { allocate: false })
        .map(|m| Loaded {
            memory: m.memory,
            source: path.to_owned(),
            guessed: None,
            owners_known: true,
        })
        .map_err(|e| CliError::at(path, Some(e.line), e.message))
}

fn load_qemu(tree: &Path, flat: Option<&Path>, owners: Option<&Path>) -> Result<Loaded, CliError> {
    let tree_text = read_nonempty(tree, "an `info mtree -D` dump")?;
    if let Some((i, _)) = tree_text
        .lines()
        .enumerate()
        .find(|(_, l)| !l.trim().is_empty())
        .filter(|(_, l)| l.starts_with("FlatView #"))
    {
        return Err(CliError::at(
            tree,
            Some(i + 1),
            "this is an `info mtree -f` dump; pass it as --qemu-flat (the machine itself is the `info mtree -D` dump)",
        ));
    }
    let tree_dump = parse::parse_tree(&tree_text).map_err(|e| parse_err(tree, e))?;
    let flat_dump = match flat {
        Some(p) => Some(
            parse::parse_flat(&read_nonempty(p, "an `info mtree -f` dump")?)
                .map_err(|e| parse_err(p, e))?,
        ),
        None => None,
    };
    let owner_dump = match owners {
        Some(p) => Some(
            parse::parse_tree(&read_nonempty(p, "an `info mtree -o` dump")?)
                .map_err(|e| parse_err(p, e))?,
        ),
        None => None,
    };
    import::import(&tree_dump, flat_dump.as_ref(), owner_dump.as_ref())
        .inspect(|i| {
            // Truly ambiguous alias targets are said whatever the command.
            for g in i
                .guessed
                .iter()
                .filter(|g| g.contains("different regions named"))
            {
                eprintln!("memtree: warning: {}: {g}", tree.display());
            }
        })
        .map(|i| Loaded {
            memory: i.memory,
            source: tree.to_owned(),
            guessed: flat.is_none().then_some(i.guessed),
            owners_known: owners.is_some(),
        })
        .map_err(|e| import_err(tree, flat, owners, e))
}

fn load(
    file: Option<&Path>,
    qemu_tree: Option<&Path>,
    qemu_flat: Option<&Path>,
    qemu_owners: Option<&Path>,
) -> Result<Loaded, CliError> {
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

fn load_machine(m: &MachineArgs) -> Result<Loaded, CliError> {
    load(
        m.file.as_deref(),
        m.qemu_tree.as_deref(),
        m.qemu_flat.as_deref(),
        m.qemu_owners.as_deref(),
    )
}

/// Parses a number as QEMU's monitor does: `0x` hex, otherwise decimal;
/// `_` separators allowed.
fn parse_addr(text: &str) -> Result<u64, CliError> {
    let t: String = text.trim().chars().filter(|&c| c != '_').collect();
    let lower = t.to_ascii_lowercase();
    let (digits, radix) = match lower.strip_prefix("0x") {
        Some(h) => (h.to_owned(), 16),
        None => (lower, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        let hint =
            if radix == 10 && digits.chars().all(|c| c.is_ascii_hexdigit()) && !digits.is_empty() {
                " (hex needs the 0x prefix, as in QEMU's monitor: 0x".to_owned() + &digits + ")"
            } else {
                String::new()
            };
        return Err(CliError::arg(
            text,
            format!("bad address{hint}; expected 0x-prefixed hex like 0xfee00000, or decimal"),
        ));
    }
    u64::from_str_radix(&digits, radix)
        .map_err(|_| CliError::arg(text, "address does not fit 64 bits"))
}

/// What `lookup` is asked about: one address, or a range (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Query {
    Addr(u64),
    Range(u64, u64),
}

/// `ADDR`, `START-LAST` (inclusive) or `START+SIZE`.
fn parse_query(text: &str) -> Result<Query, CliError> {
    if let Some((a, b)) = text.split_once('-') {
        let (s, l) = (parse_addr(a)?, parse_addr(b)?);
        if l < s {
            return Err(CliError::arg(text, "range ends before it starts"));
        }
        return Ok(Query::Range(s, l));
    }
    if let Some((a, b)) = text.split_once('+') {
        let (s, n) = (parse_addr(a)?, parse_addr(b)?);
        if n == 0 {
            return Err(CliError::arg(text, "empty range (size 0)"));
        }
        let l = s
            .checked_add(n - 1)
            .ok_or_else(|| CliError::arg(text, "range goes past 2^64"))?;
        return Ok(Query::Range(s, l));
    }
    parse_addr(text).map(Query::Addr)
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

/// The JSON schema version printed as `schema_version` (docs/json-schema.md).
const SCHEMA_VERSION: u32 = 1;

fn hex(v: u64) -> Value {
    Value::String(format!("0x{v:x}"))
}

fn type_name(t: parse::TypeTag) -> &'static str {
    match t {
        parse::TypeTag::Ram => "ram",
        parse::TypeTag::Rom => "rom",
        parse::TypeTag::Romd => "romd",
        parse::TypeTag::Ramd => "ramd",
        parse::TypeTag::Io => "i/o",
        parse::TypeTag::Container => "container",
    }
}

fn owner_ref_json(r: &parse::OwnerRef) -> Value {
    let (kind, name) = match r {
        parse::OwnerRef::DevId(s) => ("dev id", s),
        parse::OwnerRef::DevPath(s) => ("dev path", s),
        parse::OwnerRef::ObjPath(s) => ("obj path", s),
        parse::OwnerRef::ObjType(s) => ("obj type", s),
    };
    json!({ "kind": kind, "name": name })
}

fn owner_json(d: &Option<parse::OwnerDecor>) -> Value {
    match d {
        None => Value::Null,
        Some(parse::OwnerDecor::Owner { owner, parent }) => json!({
            "owner": owner_ref_json(owner),
            "parent": parent.as_ref().map(owner_ref_json),
        }),
        Some(parse::OwnerDecor::ParentOnly(p)) => {
            json!({ "owner": null, "parent": owner_ref_json(p) })
        }
        Some(parse::OwnerDecor::Orphan) => json!({ "owner": null, "parent": null }),
    }
}

/// A tree line and its subtree, iteratively (no nesting depth overflows).
fn tree_json(root: &parse::TreeLine, owners: bool) -> Value {
    fn node(l: &parse::TreeLine, owners: bool) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("name".into(), json!(l.name));
        m.insert("type".into(), json!(type_name(l.ty)));
        m.insert("start".into(), hex(l.start));
        m.insert("last".into(), hex(l.last));
        m.insert("priority".into(), json!(l.priority));
        m.insert("enabled".into(), json!(!l.disabled));
        m.insert("nonvolatile".into(), json!(l.nonvolatile));
        m.insert(
            "alias".into(),
            l.alias.as_ref().map_or(Value::Null, |a| {
                json!({ "target": a.target_name, "start": hex(a.target_start), "last": hex(a.target_last) })
            }),
        );
        if owners {
            m.insert("owner".into(), owner_json(&l.owner));
        }
        m
    }
    // Post-order on an explicit stack: children are built before parents.
    let mut stack: Vec<(&parse::TreeLine, bool)> = vec![(root, false)];
    let mut done: Vec<Value> = Vec::new();
    while let Some((l, expanded)) = stack.pop() {
        if expanded {
            let kids = done.split_off(done.len() - l.children.len());
            let mut m = node(l, owners);
            m.insert("children".into(), Value::Array(kids));
            done.push(Value::Object(m));
        } else {
            stack.push((l, true));
            for c in l.children.iter().rev() {
                stack.push((c, false));
            }
        }
    }
    done.pop().unwrap_or(Value::Null)
}

fn flat_line_json(l: &parse::FlatLine, owners: bool) -> Value {
    let mut v = json!({
        "start": hex(l.start),
        "last": hex(l.last),
        "priority": l.priority,
        "type": type_name(l.ty),
        "name": l.name,
        "offset": hex(l.offset),
        "nonvolatile": l.nonvolatile,
    });
    if owners {
        v["owner"] = owner_json(&l.owner);
    }
    v
}

fn print_json(v: &Value) {
    let mut text = serde_json::to_string_pretty(v).unwrap_or_default();
    text.push('\n');
    emit(&text);
}

/// The top-level blocks of a dump (separated by empty lines) that belong to
/// address space `name`: its `address-space:` group, or its `FlatView`.
fn blocks_of_space(text: &str, name: &str) -> String {
    let tree_header = format!("address-space: {name}");
    let flat_header = format!(" AS \"{name}\", root: ");
    let mut out = String::new();
    for block in text.split("\n\n") {
        if block
            .lines()
            .any(|l| l == tree_header || l.starts_with(&flat_header))
        {
            out.push_str(block.trim_start_matches('\n'));
            out.push_str("\n\n");
        }
    }
    out
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
            let result = memtree_cli::demo::run(&mut out);
            emit(&out);
            match result {
                Ok(leaks) if leaks.is_clean() => Ok(ExitCode::SUCCESS),
                Ok(_) => Ok(ExitCode::from(1)),
                Err(e) => Err(CliError::arg("demo", e.to_string())),
            }
        }
        Command::Flat {
            machine,
            owners,
            space,
            json,
        } => {
            let loaded = load_machine(&machine)?;
            loaded.warn_guessed("--qemu-flat");
            let owners = owners && known_owners(&loaded, "flat");
            if let Some(n) = &space {
                pick_space(&loaded.memory, Some(n))?;
            }
            let mut out = String::new();
            let _ = print::print_flat(&loaded.memory, &mut out, FlatOptions { owners });
            if let Some(n) = &space {
                out = blocks_of_space(&out, n);
            }
            if json {
                let dump = parse::parse_flat(&out)
                    .map_err(|e| CliError::arg("flat", format!("internal: {e}")))?;
                let views: Vec<Value> = dump
                    .views
                    .iter()
                    .map(|b| {
                        json!({
                            "address_spaces": b.spaces.iter().map(|a| a.name.clone()).collect::<Vec<_>>(),
                            "root": b.root,
                            "ranges": b.ranges.iter().map(|l| flat_line_json(l, owners)).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                print_json(&json!({
                    "schema_version": SCHEMA_VERSION,
                    "command": "flat",
                    "guessed": loaded.guessed.is_some(),
                    "views": views,
                }));
            } else {
                emit(&out);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Tree {
            machine,
            disabled,
            owners,
            space,
            json,
        } => {
            let loaded = load_machine(&machine)?;
            let owners = owners && known_owners(&loaded, "tree");
            if let Some(n) = &space {
                pick_space(&loaded.memory, Some(n))?;
            }
            let mut out = String::new();
            let _ = print::print_tree(&loaded.memory, &mut out, TreeOptions { disabled, owners });
            if let Some(n) = &space {
                out = blocks_of_space(&out, n);
            }
            if json {
                let dump = parse::parse_tree(&out)
                    .map_err(|e| CliError::arg("tree", format!("internal: {e}")))?;
                print_json(&json!({
                    "schema_version": SCHEMA_VERSION,
                    "command": "tree",
                    "address_spaces": dump.groups.iter().map(|g| json!({
                        "names": g.names,
                        "root": tree_json(&g.root, owners),
                    })).collect::<Vec<_>>(),
                    "memory_regions": dump.regions.iter().map(|r| json!({
                        "name": r.name,
                        "root": tree_json(&r.root, owners),
                    })).collect::<Vec<_>>(),
                }));
            } else {
                emit(&out);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Lookup {
            args,
            qemu_tree,
            qemu_flat,
            qemu_owners,
            space,
            all,
            json,
        } => {
            let (file, queries) = match (&qemu_tree, args.as_slice()) {
                (Some(_), qs) => (None, qs),
                (None, [file, qs @ ..]) if !qs.is_empty() => (Some(PathBuf::from(file)), qs),
                _ => {
                    return Err(CliError::arg(
                        "usage",
                        "lookup takes FILE ADDR... (or --qemu-tree T ADDR...)",
                    ))
                }
            };
            let queries = queries
                .iter()
                .map(|q| parse_query(q))
                .collect::<Result<Vec<_>, _>>()?;
            let loaded = load(
                file.as_deref(),
                qemu_tree.as_deref(),
                qemu_flat.as_deref(),
                qemu_owners.as_deref(),
            )?;
            loaded.warn_guessed("--qemu-flat");
            let mem = &loaded.memory;
            let id = pick_space(mem, space.as_deref())?;
            let space_name = mem
                .address_spaces()
                .into_iter()
                .find(|(s, _)| *s == id)
                .map(|(_, n)| n)
                .unwrap_or_default();
            let mut text = String::new();
            let mut results = Vec::new();
            for q in queries {
                match q {
                    Query::Addr(addr) => {
                        let why = memtree::inspect::lookup::explain(mem, id, addr)
                            .map_err(|e| CliError::arg("lookup", e.to_string()))?;
                        if json {
                            results.push(json!({
                                "query": "address",
                                "address": hex(addr),
                                "served_by": why.verdict.as_ref().map(|v| json!({
                                    "name": v.name,
                                    "kind": format!("{:?}", v.kind).to_lowercase(),
                                    "offset": hex(v.offset),
                                    "readonly": v.readonly,
                                    "path": v.path,
                                })),
                                "candidates": why.candidates.iter().map(|c| json!({
                                    "name": c.name,
                                    "kind": format!("{:?}", c.kind).to_lowercase(),
                                    "priority": c.priority,
                                    "depth": c.depth,
                                    "via_alias": c.via_alias,
                                })).collect::<Vec<_>>(),
                            }));
                        } else {
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(&if all {
                                format!("{why:#}")
                            } else {
                                format!("{why}")
                            });
                        }
                    }
                    Query::Range(start, last) => {
                        let mut flat = String::new();
                        let _ = print::print_flat(mem, &mut flat, FlatOptions { owners: false });
                        let dump = parse::parse_flat(&blocks_of_space(&flat, &space_name))
                            .map_err(|e| CliError::arg("lookup", format!("internal: {e}")))?;
                        let lines: Vec<&parse::FlatLine> = dump
                            .views
                            .iter()
                            .flat_map(|b| &b.ranges)
                            .filter(|l| l.start <= last && l.last >= start)
                            .collect();
                        if json {
                            results.push(json!({
                                "query": "range",
                                "start": hex(start),
                                "last": hex(last),
                                "ranges": lines.iter().map(|l| flat_line_json(l, false)).collect::<Vec<_>>(),
                            }));
                        } else {
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(&format!(
                                "range 0x{start:016x}-0x{last:016x} in address space \"{space_name}\": {} flat range(s)\n",
                                lines.len()
                            ));
                            for l in &lines {
                                text.push_str(&format!(
                                    "  {:016x}-{:016x} (prio {}, {}): {} @0x{:x}\n",
                                    l.start,
                                    l.last,
                                    l.priority,
                                    type_name(l.ty),
                                    l.name,
                                    l.offset
                                ));
                            }
                        }
                    }
                }
            }
            if json {
                print_json(&json!({
                    "schema_version": SCHEMA_VERSION,
                    "command": "lookup",
                    "address_space": space_name,
                    "guessed": loaded.guessed.is_some(),
                    "results": results,
                }));
            } else {
                emit(&text);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff {
            a,
            b,
            a_flat,
            b_flat,
            a_owners,
            b_owners,
            json,
        } => {
            let la = load(Some(&a), None, a_flat.as_deref(), a_owners.as_deref())?;
            let lb = load(Some(&b), None, b_flat.as_deref(), b_owners.as_deref())?;
            la.warn_guessed("--a-flat");
            lb.warn_guessed("--b-flat");
            let (fa, fb) = (flat_lines(&la.memory), flat_lines(&lb.memory));
            let mut out = String::new();
            let mut spaces_json = Vec::new();
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
                        spaces_json
                            .push(json!({ "name": n, "only_in": "a", "removed": [], "added": [] }));
                        continue;
                    }
                    _ => {
                        out.push_str(&format!("  only in {}\n", b.display()));
                        spaces_json
                            .push(json!({ "name": n, "only_in": "b", "removed": [], "added": [] }));
                        continue;
                    }
                };
                // Hashed: two views of n ranges compare in O(n), not O(n²).
                let (sa, sb): (HashSet<&String>, HashSet<&String>) =
                    (la.iter().collect(), lb.iter().collect());
                let removed: Vec<&String> = la.iter().filter(|l| !sb.contains(l)).collect();
                let added: Vec<&String> = lb.iter().filter(|l| !sa.contains(l)).collect();
                for l in &removed {
                    out.push_str(&format!("- {l}\n"));
                }
                for l in &added {
                    out.push_str(&format!("+ {l}\n"));
                }
                spaces_json.push(
                    json!({ "name": n, "only_in": null, "removed": removed, "added": added }),
                );
            }
            if !differ {
                out.push_str("the flat views are identical\n");
            }
            if json {
                print_json(&json!({
                    "schema_version": SCHEMA_VERSION,
                    "command": "diff",
                    "a": a.display().to_string(),
                    "b": b.display().to_string(),
                    "identical": !differ,
                    "address_spaces": spaces_json,
                }));
            } else {
                emit(&out);
            }
            Ok(if differ {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Census { machine, dot, json } => {
            let loaded = load_machine(&machine)?;
            let counts = loaded.memory.census().counts();
            if dot && json {
                return Err(CliError::arg("usage", "give either --dot or --json"));
            }
            if json {
                let map: serde_json::Map<String, Value> = counts
                    .iter()
                    .map(|(k, n)| (k.as_str().to_owned(), json!(n)))
                    .collect();
                print_json(&json!({
                    "schema_version": SCHEMA_VERSION,
                    "command": "census",
                    "counts": map,
                }));
            } else if dot {
                emit(&census_dot(&loaded.memory, &counts)?);
            } else {
                let mut out = String::new();
                for (kind, n) in counts {
                    out.push_str(&format!("{:<14} {n}\n", kind.as_str()));
                }
                emit(&out);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "memtree", &mut out);
            let _ = std::io::stdout().write_all(&out);
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

/// Whether owners may be printed; for a QEMU dump without an owner dump
/// they are unknown, and printing them would invent them: say so instead.
fn known_owners(loaded: &Loaded, cmd: &str) -> bool {
    if !loaded.owners_known {
        eprintln!(
            "memtree: warning: {}: owners are unknown without the `info mtree -o` dump (--qemu-owners FILE); `{cmd} -o` prints none",
            loaded.source.display()
        );
    }
    loaded.owners_known
}

fn dot_quote(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// The region graph as Graphviz DOT: one node per printed region line
/// (`info mtree -D`), containment edges, dashed edges from an alias to its
/// target's `memory-region:` section, the census in the graph label.
fn census_dot(
    mem: &Memory,
    counts: &BTreeMap<memtree::lifecycle::census::ObjectKind, usize>,
) -> Result<String, CliError> {
    let mut text = String::new();
    let _ = print::print_tree(
        mem,
        &mut text,
        TreeOptions {
            disabled: true,
            owners: false,
        },
    );
    let dump =
        parse::parse_tree(&text).map_err(|e| CliError::arg("census", format!("internal: {e}")))?;
    let label = counts
        .iter()
        .map(|(k, n)| format!("{} {n}", k.as_str()))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = format!(
        "digraph memtree {{\n  label={};\n  node [shape=box];\n",
        dot_quote(&label)
    );
    let mut section_node: BTreeMap<&str, String> = BTreeMap::new();
    for (i, r) in dump.regions.iter().enumerate() {
        section_node
            .entry(r.name.as_str())
            .or_insert(format!("m{i}_0"));
    }
    let mut aliases: Vec<(String, String)> = Vec::new();
    let mut emit_tree = |prefix: String, root: &parse::TreeLine, out: &mut String| {
        let mut next = 0usize;
        let mut stack: Vec<(&parse::TreeLine, Option<String>)> = vec![(root, None)];
        while let Some((l, parent)) = stack.pop() {
            let id = format!("{prefix}_{next}");
            next += 1;
            let style = if l.disabled { ", style=dashed" } else { "" };
            out.push_str(&format!(
                "  {id} [label={}{style}];\n",
                dot_quote(&format!(
                    "{}\n{} prio {}\n0x{:x}-0x{:x}",
                    l.name,
                    type_name(l.ty),
                    l.priority,
                    l.start,
                    l.last
                ))
            ));
            if let Some(p) = parent {
                out.push_str(&format!("  {p} -> {id};\n"));
            }
            if let Some(a) = &l.alias {
                aliases.push((id.clone(), a.target_name.clone()));
            }
            for c in l.children.iter().rev() {
                stack.push((c, Some(id.clone())));
            }
        }
    };
    for (i, g) in dump.groups.iter().enumerate() {
        let sid = format!("s{i}");
        out.push_str(&format!(
            "  {sid} [shape=ellipse, label={}];\n  {sid} -> s{i}r_0;\n",
            dot_quote(&g.names.join("\n"))
        ));
        emit_tree(format!("s{i}r"), &g.root, &mut out);
    }
    for (i, r) in dump.regions.iter().enumerate() {
        emit_tree(format!("m{i}"), &r.root, &mut out);
    }
    for (from, target) in aliases {
        if let Some(to) = section_node.get(target.as_str()) {
            out.push_str(&format!(
                "  {from} -> {to} [style=dashed, label=\"alias\"];\n"
            ));
        }
    }
    out.push_str("}\n");
    Ok(out)
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
    use memtree::inspect::map_svg;
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
                None => load(Some(&pair[i]), None, None, None),
            };
            let (ma, mb) = (side(0)?.memory, side(1)?.memory);
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
            let d = memtree_cli::demo::build().map_err(|e| CliError::arg("demo", e.to_string()))?;
            map_svg::render(&collect(&d.memory)?)
        }
        (None, false) => map_svg::render(&collect(&load_machine(&machine)?.memory)?),
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
