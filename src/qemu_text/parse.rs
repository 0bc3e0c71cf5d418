//! Parser for QEMU 7.2 `info mtree` text dumps into a neutral syntax tree.
//!
//! Two entry points:
//!
//! * [`parse_tree`] for the tree views (`info mtree`, `info mtree -D`,
//!   `info mtree -o`): address-space groups and `memory-region:` blocks.
//! * [`parse_flat`] for the flat views (`info mtree -f`, `info mtree -f -o`):
//!   `FlatView #N` blocks.
//!
//! The parser never panics: every malformed input yields a [`ParseError`]
//! naming the 1-based line and what was wrong with it.
//!
//! # Format ambiguities and how they are resolved
//!
//! Region names are free text and may contain spaces, `@`, `:`, braces and
//! brackets, so the decorations QEMU appends after a name are peeled off from
//! the *right* of the line:
//!
//! * **Hidden disabled regions.** Plain `info mtree` (no `-D`) hides disabled
//!   regions but still prints their subregions at their original depth, so a
//!   child may sit two or more levels deeper than its printed parent (e.g.
//!   `acpi-evt` under `io` in x86 `pc` dumps), and a block's root itself may
//!   be hidden (`memory-region: smram` followed directly by level-2 lines).
//!   [`parse_tree`] accepts this and fills each hidden level with a
//!   [`TreeLine::placeholder`] (`line == 0`, `disabled == true`), so tree
//!   depth always equals printed depth; a placeholder may stand for several
//!   hidden siblings, which the text cannot tell apart. A header followed by
//!   no region line gets a placeholder root. [`parse_tree_strict`] rejects
//!   all of this ("indentation jumps from level 1 to level 3"), which is the
//!   right check for `-D` dumps where every region is printed.
//! * **Owner decorations** (`-o`): a trailing ` owner:{...}` / ` parent:{...}`
//!   is recognised by the *last* occurrence of ` owner:{` or ` parent:{` on a
//!   line ending in `}`; its content must then be one of `dev id=`,
//!   `dev path=`, `obj path=`, `obj type=` (otherwise an error). Owner and
//!   parent are accepted in either order, each at most once. A trailing
//!   ` orphan` is always taken as the orphan decoration, so a region whose
//!   name itself ends in ` orphan` cannot be represented.
//! * **` [disabled]`** is accepted either before or after owner decorations.
//! * **Aliases.** A tree line whose name part starts with `alias ` and
//!   contains ` @` is an alias and must end (before decorations) with
//!   ` TSTART-TEND` (16 hex digits each). The alias name is what lies between
//!   `alias ` and the *last* ` @`; the target name is the rest. So alias names
//!   may contain ` @`, but target names must not. A name starting with
//!   `alias ` but without any ` @` is taken as a plain region name.
//! * **Flat lines.** From the right: an optional trailing ` KVM` is the only
//!   recognised accelerator suffix (a region literally named `... KVM` in a
//!   non-KVM dump would lose that word), then owner decorations, then an
//!   optional ` @<16 hex digits>` offset. A trailing ` @` followed by hex
//!   digits of the wrong length is reported as an error (truncated offset).
//! * **`Root memory region: (none)`** maps to `root: None`; a region really
//!   named `(none)` is indistinguishable.
//! * **AS lines** in flat views: the AS name ends at the first `", root: `;
//!   an optional alias suffix starts at the last `, alias ` of the remainder.
//! * **Blank lines**: any number of empty (or whitespace-only) lines separate
//!   blocks; `\r\n` line endings and a missing final newline are accepted.

use std::fmt::Write as _;

/// Which printed type a region line shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TypeTag {
    /// `ram`
    Ram,
    /// `rom`
    Rom,
    /// `romd`
    Romd,
    /// `ramd`
    Ramd,
    /// `i/o`
    Io,
    /// `container`
    Container,
}

impl TypeTag {
    /// The spelling QEMU prints for this type.
    pub fn as_str(self) -> &'static str {
        match self {
            TypeTag::Ram => "ram",
            TypeTag::Rom => "rom",
            TypeTag::Romd => "romd",
            TypeTag::Ramd => "ramd",
            TypeTag::Io => "i/o",
            TypeTag::Container => "container",
        }
    }

    /// Inverse of [`TypeTag::as_str`].
    pub fn from_printed(s: &str) -> Option<TypeTag> {
        match s {
            "ram" => Some(TypeTag::Ram),
            "rom" => Some(TypeTag::Rom),
            "romd" => Some(TypeTag::Romd),
            "ramd" => Some(TypeTag::Ramd),
            "i/o" => Some(TypeTag::Io),
            "container" => Some(TypeTag::Container),
            _ => None,
        }
    }
}

/// One `{...}` owner reference as printed by `info mtree -o`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OwnerRef {
    /// `{dev id=ID}`
    DevId(String),
    /// `{dev path=P}`
    DevPath(String),
    /// `{obj path=P}`
    ObjPath(String),
    /// `{obj type=T}`
    ObjType(String),
}

/// The owner decoration of a line printed with `-o`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OwnerDecor {
    /// ` owner:{...}`, optionally followed by ` parent:{...}`.
    Owner {
        /// The owner.
        owner: OwnerRef,
        /// Its parent, when printed.
        parent: Option<OwnerRef>,
    },
    /// Only ` parent:{...}`.
    ParentOnly(OwnerRef),
    /// ` orphan`.
    Orphan,
}

/// The `@TARGET TSTART-TEND` part of an alias line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasTarget {
    /// The target region's name.
    pub target_name: String,
    /// Where the alias starts inside the target, as printed.
    pub target_start: u64,
    /// Inclusive, as printed.
    pub target_last: u64,
}

/// One region line of a tree view, with its subregion lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeLine {
    /// 1-based line number in the input.
    pub line: usize,
    /// As printed.
    pub start: u64,
    /// As printed (inclusive).
    pub last: u64,
    /// The region's priority.
    pub priority: i32,
    /// Printed with the `nv-` prefix.
    pub nonvolatile: bool,
    /// The region type tag (`ram`, `i/o`, ...).
    pub ty: TypeTag,
    /// The region's name.
    pub name: String,
    /// For an alias: its target part.
    pub alias: Option<AliasTarget>,
    /// Printed with ` [disabled]`.
    pub disabled: bool,
    /// Had a `[DETECTED OVERFLOW!] ` prefix.
    pub overflow: bool,
    /// The owner decoration (`-o` dumps).
    pub owner: Option<OwnerDecor>,
    /// The subregion lines, in printed order.
    pub children: Vec<TreeLine>,
}

/// One or more `address-space:` headers sharing a root region tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsGroup {
    /// Line of the first `address-space:` header.
    pub line: usize,
    /// The address spaces' names, in printed order.
    pub names: Vec<String>,
    /// Their shared root region tree.
    pub root: TreeLine,
}

/// A `memory-region: NAME` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionBlock {
    /// Line of the `memory-region:` header.
    pub line: usize,
    /// The region's name.
    pub name: String,
    /// Its tree.
    pub root: TreeLine,
}

/// A parsed tree view; groups and regions each in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TreeDump {
    /// The address-space groups.
    pub groups: Vec<AsGroup>,
    /// The `memory-region:` blocks (alias targets).
    pub regions: Vec<RegionBlock>,
}

/// One ` AS "NAME", root: ROOT[, alias TARGET]` line of a flat view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatAs {
    /// The address space's name.
    pub name: String,
    /// Its root region's name.
    pub root: String,
    /// The alias target printed after the root, if any.
    pub alias: Option<String>,
}

/// One range line of a flat view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLine {
    /// 1-based line number in the input.
    pub line: usize,
    /// As printed.
    pub start: u64,
    /// Inclusive, as printed.
    pub last: u64,
    /// The region's priority.
    pub priority: i32,
    /// Printed with the `nv-` prefix.
    pub nonvolatile: bool,
    /// The region type tag.
    pub ty: TypeTag,
    /// The region's name.
    pub name: String,
    /// Offset into the region (`@OFFSET`), 0 if not printed.
    pub offset: u64,
    /// The owner decoration (`-o` dumps).
    pub owner: Option<OwnerDecor>,
    /// Accelerator suffixes such as `KVM`.
    pub accel: Vec<String>,
}

/// One `FlatView #N` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatBlock {
    /// Line of the `FlatView #N` header.
    pub line: usize,
    /// The `N` of the header.
    pub number: u32,
    /// The address spaces that share the view.
    pub spaces: Vec<FlatAs>,
    /// `None` for `Root memory region: (none)`.
    pub root: Option<String>,
    /// Empty for `No rendered FlatView`.
    pub ranges: Vec<FlatLine>,
}

/// A parsed flat view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlatDump {
    /// The `FlatView` blocks, in file order.
    pub views: Vec<FlatBlock>,
}

/// A parse failure at a given 1-based line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// The 1-based line.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

/// Deepest tree nesting accepted (QEMU dumps stay far below this); bounds
/// recursion in `Drop`/`Clone`/`PartialEq` of the resulting tree.
pub const MAX_DEPTH: usize = 1000;

const OVERFLOW_PREFIX: &str = "[DETECTED OVERFLOW!] ";
const ACCELERATORS: &[&str] = &["KVM"];

fn err(line: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        line,
        message: message.into(),
    }
}

/// Quote (a bounded prefix of) some input text for an error message.
fn shown(s: &str) -> String {
    const MAX: usize = 40;
    let mut out = String::new();
    let mut chars = s.chars();
    let prefix: String = chars.by_ref().take(MAX).collect();
    let _ = write!(out, "{prefix:?}");
    if chars.next().is_some() {
        out.push_str("...");
    }
    out
}

/// Lines with 1-based numbers; a trailing `\r` is removed.
fn numbered_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split('\n').enumerate().map(|(i, l)| {
        let l = l.strip_suffix('\r').unwrap_or(l);
        (i.saturating_add(1), l)
    })
}

fn is_blank(l: &str) -> bool {
    l.trim().is_empty()
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn hex16(s: &str) -> Option<u64> {
    if s.len() == 16 && s.bytes().all(is_lower_hex) {
        u64::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

/// Read one 16-hex-digit token at the start of `s`.
fn take_hex16<'a>(s: &'a str, what: &str, line: usize) -> Result<(u64, &'a str), ParseError> {
    let tok_len = s.bytes().take_while(|b| b.is_ascii_alphanumeric()).count();
    let tok = s.get(..tok_len).unwrap_or("");
    let rest = s.get(tok_len..).unwrap_or("");
    match hex16(tok) {
        Some(v) => Ok((v, rest)),
        None => {
            let found = if tok.is_empty() { s } else { tok };
            Err(err(
                line,
                format!("expected 16 hex digits for {what}, found {}", shown(found)),
            ))
        }
    }
}

/// Common `START-END (prio P, [nv-]TYPE): ` head of tree and flat lines.
struct Head<'a> {
    start: u64,
    last: u64,
    priority: i32,
    nonvolatile: bool,
    ty: TypeTag,
    rest: &'a str,
}

fn parse_head(s: &str, line: usize) -> Result<Head<'_>, ParseError> {
    let (start, r) = take_hex16(s, "start address", line)?;
    let r = r.strip_prefix('-').ok_or_else(|| {
        err(
            line,
            format!("expected '-' after start address, found {}", shown(r)),
        )
    })?;
    let (last, r) = take_hex16(r, "end address", line)?;
    let r = r.strip_prefix(" (prio ").ok_or_else(|| {
        err(
            line,
            format!("expected \" (prio \" after end address, found {}", shown(r)),
        )
    })?;
    let plen = r
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'-')
        .count();
    let ptok = r.get(..plen).unwrap_or("");
    let r = r.get(plen..).unwrap_or("");
    let digits = ptok.strip_prefix('-').unwrap_or(ptok);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        let found = if ptok.is_empty() { r } else { ptok };
        return Err(err(
            line,
            format!("expected signed decimal priority, found {}", shown(found)),
        ));
    }
    let priority: i32 = ptok.parse().map_err(|_| {
        err(
            line,
            format!(
                "priority {} does not fit in a 32-bit signed integer",
                shown(ptok)
            ),
        )
    })?;
    let r = r.strip_prefix(", ").ok_or_else(|| {
        err(
            line,
            format!("expected \", \" after priority, found {}", shown(r)),
        )
    })?;
    let (ty_s, r) = r.split_once(')').ok_or_else(|| {
        err(
            line,
            format!("missing ')' after region type in {}", shown(r)),
        )
    })?;
    let (nonvolatile, ty_name) = match ty_s.strip_prefix("nv-") {
        Some(t) => (true, t),
        None => (false, ty_s),
    };
    let ty = TypeTag::from_printed(ty_name).ok_or_else(|| {
        err(
            line,
            format!(
                "unknown region type {} (expected ram, rom, romd, ramd, i/o or container, optionally with nv- prefix)",
                shown(ty_s)
            ),
        )
    })?;
    let rest = if r == ":" {
        ""
    } else {
        r.strip_prefix(": ").ok_or_else(|| {
            err(
                line,
                format!("expected \": \" after region type, found {}", shown(r)),
            )
        })?
    };
    Ok(Head {
        start,
        last,
        priority,
        nonvolatile,
        ty,
        rest,
    })
}

fn parse_owner_ref(inner: &str, line: usize) -> Result<OwnerRef, ParseError> {
    let bad = || {
        err(
            line,
            format!(
                "unrecognised owner reference {} (expected \"dev id=\", \"dev path=\", \"obj path=\" or \"obj type=\")",
                shown(inner)
            ),
        )
    };
    let (kind, attr) = inner.split_once(' ').ok_or_else(bad)?;
    let (key, value) = attr.split_once('=').ok_or_else(bad)?;
    let value = value.to_string();
    match (kind, key) {
        ("dev", "id") => Ok(OwnerRef::DevId(value)),
        ("dev", "path") => Ok(OwnerRef::DevPath(value)),
        ("obj", "path") => Ok(OwnerRef::ObjPath(value)),
        ("obj", "type") => Ok(OwnerRef::ObjType(value)),
        _ => Err(bad()),
    }
}

#[derive(Default)]
struct Decor {
    disabled: bool,
    owner: Option<OwnerRef>,
    parent: Option<OwnerRef>,
    orphan: bool,
}

impl Decor {
    fn owner_decor(self) -> Option<OwnerDecor> {
        match (self.owner, self.parent, self.orphan) {
            (Some(owner), parent, _) => Some(OwnerDecor::Owner { owner, parent }),
            (None, Some(p), _) => Some(OwnerDecor::ParentOnly(p)),
            (None, None, true) => Some(OwnerDecor::Orphan),
            (None, None, false) => None,
        }
    }
}

const OWNER_OPEN: &str = " owner:{";
const PARENT_OPEN: &str = " parent:{";

/// Peel ` [disabled]`, ` orphan`, ` owner:{..}`, ` parent:{..}` off the right.
fn peel_decorations(
    mut s: &str,
    allow_disabled: bool,
    line: usize,
) -> Result<(&str, Decor), ParseError> {
    let mut d = Decor::default();
    loop {
        if allow_disabled && !d.disabled {
            if let Some(r) = s.strip_suffix(" [disabled]") {
                d.disabled = true;
                s = r;
                continue;
            }
        }
        if !d.orphan {
            if let Some(r) = s.strip_suffix(" orphan") {
                d.orphan = true;
                s = r;
                continue;
            }
        }
        if s.ends_with('}') {
            let found = match (s.rfind(OWNER_OPEN), s.rfind(PARENT_OPEN)) {
                (Some(a), Some(b)) if a > b => Some((a, true)),
                (_, Some(b)) => Some((b, false)),
                (Some(a), None) => Some((a, true)),
                (None, None) => None,
            };
            if let Some((idx, is_owner)) = found {
                let head = s.get(..idx).unwrap_or("");
                let tail = s.get(idx..).unwrap_or("");
                let open = if is_owner { OWNER_OPEN } else { PARENT_OPEN };
                let inner = tail
                    .strip_prefix(open)
                    .and_then(|t| t.strip_suffix('}'))
                    .unwrap_or("");
                let r = parse_owner_ref(inner, line)?;
                let slot = if is_owner {
                    &mut d.owner
                } else {
                    &mut d.parent
                };
                if slot.is_some() {
                    let which = if is_owner { "owner" } else { "parent" };
                    return Err(err(line, format!("duplicate {which}:{{...}} decoration")));
                }
                *slot = Some(r);
                s = head;
                continue;
            }
        }
        break;
    }
    if d.orphan && (d.owner.is_some() || d.parent.is_some()) {
        return Err(err(
            line,
            "\"orphan\" combined with an owner:{...} or parent:{...} decoration",
        ));
    }
    Ok((s, d))
}

/// Split `BODY TSTART-TEND` into body and the range, if the range is there.
fn split_trailing_range(s: &str) -> Option<(&str, u64, u64)> {
    let cut = s.len().checked_sub(33)?;
    let range = s.get(cut..)?;
    let (a, b) = range.split_once('-')?;
    let (ts, tl) = (hex16(a)?, hex16(b)?);
    let body = s.get(..cut)?.strip_suffix(' ')?;
    Some((body, ts, tl))
}

fn parse_alias(body: &str, line: usize) -> Result<(String, AliasTarget), ParseError> {
    let (before, target_start, target_last) = split_trailing_range(body).ok_or_else(|| {
        let last_tok = body.rsplit(' ').next().unwrap_or(body);
        err(
            line,
            format!(
                "expected alias target range TSTART-TEND (16 hex digits each) at end of alias line, found {}",
                shown(last_tok)
            ),
        )
    })?;
    let at = before.rfind(" @").ok_or_else(|| {
        err(
            line,
            format!(
                "expected \" @TARGET\" in alias line, found {}",
                shown(before)
            ),
        )
    })?;
    let name = before.get(..at).unwrap_or("");
    let target = before.get(at.saturating_add(2)..).unwrap_or("");
    Ok((
        name.to_string(),
        AliasTarget {
            target_name: target.to_string(),
            target_start,
            target_last,
        },
    ))
}

/// Parse the text of a tree region line after its indentation.
fn parse_tree_line(s: &str, line: usize) -> Result<TreeLine, ParseError> {
    let (overflow, s) = match s.strip_prefix(OVERFLOW_PREFIX) {
        Some(r) => (true, r),
        None => (false, s),
    };
    let h = parse_head(s, line)?;
    let (body, decor) = peel_decorations(h.rest, true, line)?;
    let (name, alias) = match body.strip_prefix("alias ") {
        Some(ab) if ab.contains(" @") || ab.starts_with('@') => {
            let (n, t) = parse_alias(ab, line)?;
            (n, Some(t))
        }
        _ => (body.to_string(), None),
    };
    let disabled = decor.disabled;
    Ok(TreeLine {
        line,
        start: h.start,
        last: h.last,
        priority: h.priority,
        nonvolatile: h.nonvolatile,
        ty: h.ty,
        name,
        alias,
        disabled,
        overflow,
        owner: decor.owner_decor(),
        children: Vec::new(),
    })
}

impl TreeLine {
    /// A stand-in for a region that plain `info mtree` did not print
    /// (it hides disabled regions but still prints their subregions one
    /// level deeper). Marked by `line == 0` and `disabled == true`; the
    /// other fields are defaults (start/last 0, priority 0, `container`),
    /// and `name` is the block name for the root of a `memory-region:`
    /// block, empty otherwise. One placeholder may stand for several hidden
    /// sibling regions: the dump does not tell them apart.
    pub fn placeholder(name: String) -> TreeLine {
        TreeLine {
            line: 0,
            start: 0,
            last: 0,
            priority: 0,
            nonvolatile: false,
            ty: TypeTag::Container,
            name,
            alias: None,
            disabled: true,
            overflow: false,
            owner: None,
            children: Vec::new(),
        }
    }

    /// Whether this node is a [`TreeLine::placeholder`] for hidden regions.
    pub fn is_placeholder(&self) -> bool {
        self.line == 0
    }
}

enum BlockKind {
    Group(Vec<String>),
    Region(String),
}

struct TreeBlock {
    line: usize,
    kind: BlockKind,
    /// Open region lines, outermost first, with their indentation level.
    stack: Vec<(usize, TreeLine)>,
}

impl TreeBlock {
    fn new(line: usize, kind: BlockKind) -> Self {
        TreeBlock {
            line,
            kind,
            stack: Vec::new(),
        }
    }

    /// Close the innermost open line into its parent.
    fn pop_into_parent(&mut self) {
        if self.stack.len() > 1 {
            if let Some((_, child)) = self.stack.pop() {
                if let Some((_, parent)) = self.stack.last_mut() {
                    parent.children.push(child);
                }
            }
        }
    }

    /// The name a placeholder root gets: the region name of a
    /// `memory-region:` block, empty for an address-space group.
    fn root_name(&self) -> String {
        match &self.kind {
            BlockKind::Group(_) => String::new(),
            BlockKind::Region(name) => name.clone(),
        }
    }

    /// Push placeholders for the hidden levels `from..to`.
    fn push_placeholders(&mut self, from: usize, to: usize) {
        for l in from..to {
            let name = if l == 1 {
                self.root_name()
            } else {
                String::new()
            };
            self.stack.push((l, TreeLine::placeholder(name)));
        }
    }

    fn add_line(
        &mut self,
        level: usize,
        node: TreeLine,
        strict: bool,
        line: usize,
    ) -> Result<(), ParseError> {
        let (prev_level, root_line) = match (self.stack.last(), self.stack.first()) {
            (Some((l, _)), Some((_, root))) => (*l, root.line),
            _ => {
                if level != 1 {
                    if strict {
                        return Err(err(
                            line,
                            format!(
                                "first region line of a block must be at level 1 (2 spaces), found level {level}"
                            ),
                        ));
                    }
                    self.push_placeholders(1, level);
                }
                self.stack.push((level, node));
                return Ok(());
            }
        };
        if level == 1 {
            let at = if root_line == 0 {
                String::from("a hidden root already holds lines at deeper levels")
            } else {
                format!("the root is at line {root_line}")
            };
            return Err(err(
                line,
                format!("second root region at level 1 in one block ({at})"),
            ));
        }
        if level > prev_level.saturating_add(1) {
            if strict {
                return Err(err(
                    line,
                    format!("indentation jumps from level {prev_level} to level {level}"),
                ));
            }
            self.push_placeholders(prev_level.saturating_add(1), level);
        } else {
            while self.stack.len() > 1 && self.stack.last().is_some_and(|(l, _)| *l >= level) {
                self.pop_into_parent();
            }
        }
        self.stack.push((level, node));
        Ok(())
    }

    fn finish(mut self, strict: bool, dump: &mut TreeDump) -> Result<(), ParseError> {
        while self.stack.len() > 1 {
            self.pop_into_parent();
        }
        let root = match self.stack.pop() {
            Some((_, root)) => root,
            None if !strict => TreeLine::placeholder(self.root_name()),
            None => {
                let what = match &self.kind {
                    BlockKind::Group(_) => "address-space",
                    BlockKind::Region(_) => "memory-region",
                };
                return Err(err(
                    self.line,
                    format!("{what} header is not followed by any region line"),
                ));
            }
        };
        match self.kind {
            BlockKind::Group(names) => dump.groups.push(AsGroup {
                line: self.line,
                names,
                root,
            }),
            BlockKind::Region(name) => dump.regions.push(RegionBlock {
                line: self.line,
                name,
                root,
            }),
        }
        Ok(())
    }
}

/// Parse a tree view (`info mtree`, `-D`, `-o`).
///
/// Indentation may jump by more than one level, and a block may start below
/// level 1 or have no region line at all (plain `info mtree` hides disabled
/// regions but prints their subregions); every hidden level is filled with a
/// [`TreeLine::placeholder`]. Use [`parse_tree_strict`] to reject this.
pub fn parse_tree(text: &str) -> Result<TreeDump, ParseError> {
    parse_tree_impl(text, false)
}

/// Like [`parse_tree`] but indentation must grow by exactly one level at a
/// time (suitable for `info mtree -D` dumps, which print every region).
pub fn parse_tree_strict(text: &str) -> Result<TreeDump, ParseError> {
    parse_tree_impl(text, true)
}

fn parse_tree_impl(text: &str, strict: bool) -> Result<TreeDump, ParseError> {
    let mut dump = TreeDump::default();
    let mut block: Option<TreeBlock> = None;
    for (no, l) in numbered_lines(text) {
        if is_blank(l) {
            if let Some(b) = block.take() {
                b.finish(strict, &mut dump)?;
            }
            continue;
        }
        if let Some(name) = l.strip_prefix("address-space: ") {
            match &mut block {
                None => {
                    block = Some(TreeBlock::new(
                        no,
                        BlockKind::Group(vec![name.to_string()]),
                    ))
                }
                Some(b) => match (&mut b.kind, b.stack.is_empty()) {
                    (BlockKind::Group(names), true) => names.push(name.to_string()),
                    (BlockKind::Group(_), false) => {
                        return Err(err(
                            no,
                            "address-space header after region lines (expected an empty line between blocks)",
                        ))
                    }
                    (BlockKind::Region(_), _) => {
                        return Err(err(
                            no,
                            format!(
                                "address-space header inside the memory-region block of line {} (expected an empty line between blocks)",
                                b.line
                            ),
                        ))
                    }
                },
            }
            continue;
        }
        if let Some(name) = l.strip_prefix("memory-region: ") {
            if let Some(b) = &block {
                return Err(err(
                    no,
                    format!(
                        "memory-region header inside the block of line {} (expected an empty line between blocks)",
                        b.line
                    ),
                ));
            }
            block = Some(TreeBlock::new(no, BlockKind::Region(name.to_string())));
            continue;
        }
        let spaces = l.bytes().take_while(|b| *b == b' ').count();
        if spaces == 0 {
            let looks_like_region = l
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_hexdigit() || b == b'[');
            let msg = if looks_like_region {
                format!(
                    "region line is not indented (expected at least 2 spaces): {}",
                    shown(l)
                )
            } else {
                format!(
                    "unrecognised line (expected \"address-space: \", \"memory-region: \" or an indented region line): {}",
                    shown(l)
                )
            };
            return Err(err(no, msg));
        }
        let Some(b) = &mut block else {
            return Err(err(
                no,
                "region line outside any address-space or memory-region block",
            ));
        };
        if spaces % 2 != 0 {
            return Err(err(
                no,
                format!("indentation of {spaces} spaces is not a multiple of 2"),
            ));
        }
        let level = spaces / 2;
        if level > MAX_DEPTH {
            return Err(err(
                no,
                format!("nesting level {level} exceeds the maximum of {MAX_DEPTH}"),
            ));
        }
        let node = parse_tree_line(l.get(spaces..).unwrap_or(""), no)?;
        b.add_line(level, node, strict, no)?;
    }
    if let Some(b) = block.take() {
        b.finish(strict, &mut dump)?;
    }
    Ok(dump)
}

fn parse_flat_as(s: &str, line: usize) -> Result<FlatAs, ParseError> {
    let q = s.strip_prefix('"').ok_or_else(|| {
        err(
            line,
            format!(
                "expected '\"' to open the address-space name, found {}",
                shown(s)
            ),
        )
    })?;
    let (name, rest) = q.split_once("\", root: ").ok_or_else(|| {
        err(
            line,
            format!(
                "expected '\", root: ' after the address-space name in {}",
                shown(s)
            ),
        )
    })?;
    let (root, alias) = match rest.rfind(", alias ") {
        Some(i) => (
            rest.get(..i).unwrap_or(""),
            Some(rest.get(i.saturating_add(8)..).unwrap_or("").to_string()),
        ),
        None => (rest, None),
    };
    Ok(FlatAs {
        name: name.to_string(),
        root: root.to_string(),
        alias,
    })
}

fn parse_flat_line(s: &str, line: usize) -> Result<FlatLine, ParseError> {
    let h = parse_head(s, line)?;
    let mut rest = h.rest;
    let mut accel = Vec::new();
    for a in ACCELERATORS {
        if let Some(r) = rest.strip_suffix(a).and_then(|r| r.strip_suffix(' ')) {
            accel.push((*a).to_string());
            rest = r;
            break;
        }
    }
    let (body, decor) = peel_decorations(rest, false, line)?;
    let mut name = body;
    let mut offset = 0u64;
    if let Some(at) = body.rfind(" @") {
        let tok = body.get(at.saturating_add(2)..).unwrap_or("");
        if !tok.is_empty() && tok.bytes().all(|b| b.is_ascii_hexdigit()) {
            offset = hex16(tok).ok_or_else(|| {
                err(
                    line,
                    format!("expected 16 hex digits for offset, found {}", shown(tok)),
                )
            })?;
            name = body.get(..at).unwrap_or("");
        }
    }
    Ok(FlatLine {
        line,
        start: h.start,
        last: h.last,
        priority: h.priority,
        nonvolatile: h.nonvolatile,
        ty: h.ty,
        name: name.to_string(),
        offset,
        owner: decor.owner_decor(),
        accel,
    })
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum FlatPhase {
    /// After `FlatView #N`, reading AS lines until the root line.
    Spaces,
    /// After the root line: range lines (or `No rendered FlatView`).
    Ranges,
    /// After `No rendered FlatView`.
    NotRendered,
}

/// Parse a flat view (`info mtree -f`, `-f -o`).
pub fn parse_flat(text: &str) -> Result<FlatDump, ParseError> {
    let mut dump = FlatDump::default();
    let mut cur: Option<(FlatBlock, FlatPhase)> = None;
    for (no, l) in numbered_lines(text) {
        if is_blank(l) {
            if let Some((b, phase)) = cur.take() {
                if phase == FlatPhase::Spaces {
                    return Err(err(
                        b.line,
                        "FlatView block ends without a \" Root memory region: \" line",
                    ));
                }
                dump.views.push(b);
            }
            continue;
        }
        if let Some(num) = l.strip_prefix("FlatView #") {
            if let Some((b, _)) = &cur {
                return Err(err(
                    no,
                    format!(
                        "FlatView header inside the FlatView block of line {} (expected an empty line between blocks)",
                        b.line
                    ),
                ));
            }
            if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(
                    no,
                    format!("expected a decimal FlatView number, found {}", shown(num)),
                ));
            }
            let number: u32 = num.parse().map_err(|_| {
                err(
                    no,
                    format!("FlatView number {} does not fit in 32 bits", shown(num)),
                )
            })?;
            cur = Some((
                FlatBlock {
                    line: no,
                    number,
                    spaces: Vec::new(),
                    root: None,
                    ranges: Vec::new(),
                },
                FlatPhase::Spaces,
            ));
            continue;
        }
        let Some((b, phase)) = &mut cur else {
            return Err(err(
                no,
                format!(
                    "line outside any FlatView block (expected \"FlatView #N\"): {}",
                    shown(l)
                ),
            ));
        };
        if let Some(r) = l.strip_prefix(" AS ") {
            if *phase != FlatPhase::Spaces {
                return Err(err(no, "AS line after the \"Root memory region\" line"));
            }
            b.spaces.push(parse_flat_as(r, no)?);
        } else if let Some(r) = l.strip_prefix(" Root memory region: ") {
            if *phase != FlatPhase::Spaces {
                return Err(err(
                    no,
                    "second \"Root memory region\" line in one FlatView block",
                ));
            }
            b.root = if r == "(none)" {
                None
            } else {
                Some(r.to_string())
            };
            *phase = FlatPhase::Ranges;
        } else if l == "  No rendered FlatView" {
            if *phase != FlatPhase::Ranges || !b.ranges.is_empty() {
                return Err(err(
                    no,
                    "\"No rendered FlatView\" must directly follow the \"Root memory region\" line",
                ));
            }
            *phase = FlatPhase::NotRendered;
        } else if let Some(r) = l.strip_prefix("  ") {
            match *phase {
                FlatPhase::Spaces => {
                    return Err(err(no, "range line before the \"Root memory region\" line"))
                }
                FlatPhase::NotRendered => {
                    return Err(err(no, "range line after \"No rendered FlatView\""))
                }
                FlatPhase::Ranges => {}
            }
            if r.starts_with(' ') {
                return Err(err(
                    no,
                    "flat range line must be indented by exactly 2 spaces",
                ));
            }
            b.ranges.push(parse_flat_line(r, no)?);
        } else {
            return Err(err(
                no,
                format!("unrecognised line in FlatView block: {}", shown(l)),
            ));
        }
    }
    if let Some((b, phase)) = cur.take() {
        if phase == FlatPhase::Spaces {
            return Err(err(
                b.line,
                "FlatView block ends without a \" Root memory region: \" line",
            ));
        }
        dump.views.push(b);
    }
    Ok(dump)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    /// `tests/data/oracle` of the repository, or `MEMTREE_ORACLE`.
    fn oracle_dir() -> PathBuf {
        match std::env::var_os("MEMTREE_ORACLE") {
            Some(d) => PathBuf::from(d),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/oracle"),
        }
    }

    fn read(rel: &str) -> String {
        let p = oracle_dir().join(rel);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
    }

    fn tree(rel: &str) -> TreeDump {
        parse_tree(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    fn flat(rel: &str) -> FlatDump {
        parse_flat(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    fn find<'a>(t: &'a TreeLine, pred: &dyn Fn(&TreeLine) -> bool) -> Option<&'a TreeLine> {
        if pred(t) {
            return Some(t);
        }
        t.children.iter().find_map(|c| find(c, pred))
    }

    fn count(t: &TreeLine) -> usize {
        usize::from(!t.is_placeholder()) + t.children.iter().map(count).sum::<usize>()
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads oracle dumps from disk")]
    fn pc_disabled_groups_and_regions() {
        let d = tree("x86_64/pc.disabled.txt");
        let names: Vec<Vec<&str>> = d
            .groups
            .iter()
            .map(|g| g.names.iter().map(String::as_str).collect())
            .collect();
        assert_eq!(
            names,
            vec![
                vec!["piix3-ide"],
                vec!["PIIX3"],
                vec!["PIIX4_PM"],
                vec!["i440FX"],
                vec!["cpu-memory-0", "memory"],
                vec!["I/O"],
                vec!["cpu-smm-0"],
            ]
        );
        assert_eq!(d.groups[4].line, 17);
        assert_eq!(d.groups[0].root.name, "bus master container");
        assert_eq!(d.groups[0].root.ty, TypeTag::Io);
        assert_eq!(d.groups[0].root.last, u64::MAX);
        let regions: Vec<&str> = d.regions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(regions, ["system", "pc.ram", "pc.bios", "pci", "smram"]);
        assert_eq!(d.regions[0].line, 133);
        // -D dumps print every region, so strict parsing must agree.
        let strict = parse_tree_strict(&read("x86_64/pc.disabled.txt")).unwrap();
        assert_eq!(strict, d);
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads oracle dumps from disk")]
    fn alias_target_and_range() {
        let d = tree("x86_64/pc.disabled.txt");
        let sys = &d.groups[4].root;
        assert_eq!(sys.name, "system");
        let a = &sys.children[0];
        assert_eq!(a.line, 20);
        assert_eq!(a.name, "ram-below-4g");
        assert_eq!((a.start, a.last), (0, 0x7ff_ffff));
        assert_eq!(
            a.alias,
            Some(AliasTarget {
                target_name: "pc.ram".into(),
                target_start: 0,
                target_last: 0x7ff_ffff,
            })
        );
        let isa = find(sys, &|t| t.name == "isa-bios").unwrap();
        let t = isa.alias.as_ref().unwrap();
        assert_eq!(t.target_name, "pc.bios");
        assert_eq!((t.target_start, t.target_last), (0x20000, 0x3ffff));
        assert_eq!(isa.priority, 1);
        assert_eq!(isa.ty, TypeTag::Rom);
        let pci = find(sys, &|t| t.name == "pci").unwrap();
        assert_eq!(pci.priority, -1);
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads oracle dumps from disk")]
    fn disabled_flag() {
        let d = tree("x86_64/pc.disabled.txt");
        let smram = d.regions.iter().find(|r| r.name == "smram").unwrap();
        assert!(smram.root.disabled);
        assert_eq!(smram.root.line, 210);
        assert_eq!(smram.root.children.len(), 1);
        let low = &smram.root.children[0];
        assert!(!low.disabled);
        assert_eq!(low.name, "smram-low");
        assert_eq!(low.alias.as_ref().unwrap().target_name, "pc.ram");
        // Plain dumps never carry the flag.
        let plain = tree("x86_64/pc.mtree.txt");
        for g in &plain.groups {
            assert!(find(&g.root, &|t| t.disabled && !t.is_placeholder()).is_none());
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads oracle dumps from disk")]
    fn hidden_disabled_levels_in_plain_dump() {
        let text = read("x86_64/pc.mtree.txt");
        let d = parse_tree(&text).unwrap();
        let io = d.groups.iter().find(|g| g.names == ["I/O"]).unwrap();
        // acpi-evt is printed at level 3 directly under level-1 `io`
        // (its disabled parent is hidden): a placeholder fills level 2.
        assert_eq!(io.root.name, "io");
        let hidden = &io.root.children[0];
        assert!(hidden.is_placeholder() && hidden.disabled);
        let names: Vec<&str> = hidden.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["acpi-evt", "acpi-cnt", "acpi-tmr"]);
        assert_eq!(hidden.children[0].line, 41);
        assert_eq!(io.root.children[1].name, "dma-chan");
        // The disabled root of `memory-region: smram` is hidden too.
        let smram = d.regions.iter().find(|r| r.name == "smram").unwrap();
        assert!(smram.root.is_placeholder());
        assert_eq!(smram.root.name, "smram");
        assert_eq!(smram.root.children.len(), 1);
        assert_eq!(smram.root.children[0].name, "smram-low");
        let e = parse_tree_strict(&text).unwrap_err();
        assert_eq!(e.line, 41);
        assert_eq!(e.message, "indentation jumps from level 1 to level 3");
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads oracle dumps from disk")]
    fn owner_decorations() {
        let d = tree("x86_64/pc.owner.txt");
        let g = &d.groups[0];
        assert_eq!(g.names, ["piix3-ide"]);
        assert_eq!(g.root.name, "bus master container");
        assert_eq!(
            g.root.owner,
            Some(OwnerDecor::Owner {
                owner: OwnerRef::DevPath("/machine/unattached/device[17]".into()),
                parent: None,
            })
        );
        let mem = d
            .groups
            .iter()
            .find(|g| g.names.contains(&"memory".to_string()))
            .unwrap();
        assert_eq!(
            mem.root.owner,
            Some(OwnerDecor::ParentOnly(OwnerRef::ObjPath(
                "/machine/unattached".into()
            )))
        );
        let smram = find(&mem.root, &|t| t.name == "smram-region").unwrap();
        assert_eq!(smram.alias.as_ref().unwrap().target_name, "pci");
        assert_eq!(
            smram.owner,
            Some(OwnerDecor::Owner {
                owner: OwnerRef::DevPath("/machine/unattached/device[2]".into()),
                parent: None,
            })
        );
        let nv = tree("variants/pc-nvdimm.owner.txt");
        let a = nv
            .groups
            .iter()
            .find_map(|g| find(&g.root, &|t| t.name == "nvdimm-memory"))
            .unwrap();
        assert!(a.nonvolatile);
        assert_eq!(a.ty, TypeTag::Ram);
        assert_eq!(a.alias.as_ref().unwrap().target_name, "nv1");
        assert_eq!(
            a.owner,
            Some(OwnerDecor::Owner {
                owner: OwnerRef::DevId("nvdimm1".into()),
                parent: None,
            })
        );
    }

    #[test]
    fn synthetic_decorations_all_forms_and_orders() {
        let text = "memory-region: x y\n  0000000000000000-00000000000000ff (prio 0, container): a @b: {c} [d] owner:{obj type=t} parent:{dev id=i} [disabled]\n    0000000000000010-000000000000001f (prio 2, romd): alias q @r @s 0000000000000000-000000000000000f [disabled] orphan\n    [DETECTED OVERFLOW!] 0000000000000020-000000000000002f (prio -3, nv-ramd): z parent:{obj path=/p}\n";
        let d = parse_tree(text).unwrap();
        let r = &d.regions[0];
        assert_eq!(r.name, "x y");
        assert_eq!(r.root.name, "a @b: {c} [d]");
        assert!(r.root.disabled);
        assert_eq!(r.root.ty, TypeTag::Container);
        assert_eq!(
            r.root.owner,
            Some(OwnerDecor::Owner {
                owner: OwnerRef::ObjType("t".into()),
                parent: Some(OwnerRef::DevId("i".into())),
            })
        );
        let c0 = &r.root.children[0];
        assert_eq!(c0.name, "q @r");
        assert_eq!(c0.alias.as_ref().unwrap().target_name, "s");
        assert!(c0.disabled);
        assert_eq!(c0.owner, Some(OwnerDecor::Orphan));
        let c1 = &r.root.children[1];
        assert!(c1.overflow && c1.nonvolatile);
        assert_eq!(c1.ty, TypeTag::Ramd);
        assert_eq!(c1.priority, -3);
        assert_eq!(
            c1.owner,
            Some(OwnerDecor::ParentOnly(OwnerRef::ObjPath("/p".into())))
        );
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads oracle dumps from disk")]
    fn flat_offset_and_owner() {
        let d = flat("x86_64/pc.flat.txt");
        let v0 = &d.views[1];
        assert_eq!(v0.line, 9);
        assert_eq!(v0.spaces[0].name, "memory");
        let bios = v0.ranges.iter().find(|r| r.line == 15).unwrap();
        assert_eq!(bios.name, "pc.bios");
        assert_eq!(bios.offset, 0x20000);
        assert_eq!((bios.start, bios.last), (0xe0000, 0xfffff));
        assert!(bios.accel.is_empty());
        let o = flat("variants/pc-kvm.flat-owner.txt");
        let r = &o.views[0].ranges[2];
        assert_eq!(r.name, "pc.bios");
        assert_eq!(r.offset, 0x20000);
        assert_eq!(r.accel, ["KVM"]);
        assert_eq!(
            r.owner,
            Some(OwnerDecor::ParentOnly(OwnerRef::ObjPath(
                "/machine/unattached".into()
            )))
        );
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads oracle dumps from disk")]
    fn flat_kvm_suffix() {
        let d = flat("variants/pc-kvm.flat.txt");
        let v0 = &d.views[0];
        assert_eq!(v0.number, 0);
        let names: Vec<&str> = v0.spaces.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["memory", "cpu-memory-0"]);
        assert_eq!(v0.spaces[0].root, "system");
        assert_eq!(v0.root.as_deref(), Some("system"));
        let ram = &v0.ranges[0];
        assert_eq!(ram.name, "pc.ram");
        assert_eq!(ram.accel, ["KVM"]);
        assert_eq!(ram.offset, 0);
        let bios = &v0.ranges[2];
        assert_eq!((bios.name.as_str(), bios.offset), ("pc.bios", 0x20000));
        assert_eq!(bios.accel, ["KVM"]);
        let ioapic = &v0.ranges[4];
        assert_eq!(ioapic.name, "kvm-ioapic");
        assert!(ioapic.accel.is_empty());
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads oracle dumps from disk")]
    fn flat_none_root_not_rendered() {
        let d = flat("variants/q35-pcidevs.flat.txt");
        let v = d
            .views
            .iter()
            .find(|v| v.root.is_none())
            .expect("a (none) root");
        assert!(v.ranges.is_empty());
        assert!(!v.spaces.is_empty());
        assert!(v.spaces.iter().all(|s| s.root == "bus master container"));
        let text = "FlatView #3\n AS \"a\", root: r, alias t\n Root memory region: (none)\n  No rendered FlatView\n";
        let d = parse_flat(text).unwrap();
        assert_eq!(d.views[0].number, 3);
        assert_eq!(d.views[0].spaces[0].alias.as_deref(), Some("t"));
        assert_eq!(d.views[0].root, None);
    }

    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads oracle dumps from disk")]
    fn every_oracle_file_parses() {
        let mut files = Vec::new();
        walk(&oracle_dir(), &mut files);
        let (mut trees, mut flats) = (0, 0);
        for p in &files {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(p).unwrap();
            if name.ends_with(".flat.txt") || name.ends_with(".flat-owner.txt") {
                let d = parse_flat(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(!d.views.is_empty(), "{}", p.display());
                flats += 1;
            } else if name.ends_with(".mtree.txt")
                || name.ends_with(".disabled.txt")
                || name.ends_with(".owner.txt")
            {
                let d = parse_tree(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(!d.groups.is_empty(), "{}", p.display());
                // Every region line ends up in the tree exactly once.
                let lines = text.lines().filter(|l| l.starts_with("  ")).count();
                let nodes: usize = d.groups.iter().map(|g| count(&g.root)).sum::<usize>()
                    + d.regions.iter().map(|r| count(&r.root)).sum::<usize>();
                assert_eq!(lines, nodes, "{}", p.display());
                if name.ends_with(".disabled.txt") {
                    parse_tree_strict(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                }
                trees += 1;
            }
        }
        // 137 .mtree + 137 .disabled + 117 .owner; 137 .flat + 117 .flat-owner.
        assert!(
            trees >= 391 && flats >= 254,
            "only {trees} tree and {flats} flat dumps"
        );
    }

    fn tree_err(text: &str) -> ParseError {
        parse_tree(text).unwrap_err()
    }

    const GOOD: &str = "  0000000000000000-00000000000000ff (prio 0, ram): r\n";

    #[test]
    fn error_bad_hex() {
        let text = format!(
            "address-space: a\n{GOOD}    00000000000c0000-00000000000c0zzz (prio 0, ram): x\n"
        );
        let e = tree_err(&text);
        assert_eq!(e.line, 3);
        assert_eq!(
            e.message,
            "expected 16 hex digits for end address, found \"00000000000c0zzz\""
        );
        let e = tree_err(
            "address-space: a\n\n\naddress-space: b\n  00c0000-0000000000000000 (prio 0, ram): x\n",
        );
        assert_eq!(
            e.to_string(),
            "line 5: expected 16 hex digits for start address, found \"00c0000\""
        );
        let e =
            tree_err("address-space: a\n  00000000000000AB-0000000000000000 (prio 0, ram): x\n");
        assert_eq!(e.line, 2);
        let e = parse_flat("FlatView #0\n Root memory region: x\n  0000000000000000-0000000000000fff (prio 0, ram): x @00000000001\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 3: expected 16 hex digits for offset, found \"00000000001\""
        );
    }

    #[test]
    fn error_bad_indentation() {
        let text = format!(
            "address-space: a\n{GOOD}      0000000000000000-0000000000000001 (prio 0, ram): x\n"
        );
        let e = parse_tree_strict(&text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 3: indentation jumps from level 1 to level 3"
        );
        assert!(parse_tree(&text).is_ok());
        let e = tree_err(&format!(
            "address-space: a\n{GOOD}   0000000000000000-0000000000000001 (prio 0, ram): x\n"
        ));
        assert_eq!(
            e.to_string(),
            "line 3: indentation of 3 spaces is not a multiple of 2"
        );
        let text = "memory-region: a\n    0000000000000000-0000000000000001 (prio 0, ram): x\n";
        assert!(parse_tree(text).unwrap().regions[0].root.is_placeholder());
        let e = parse_tree_strict(text).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("must be at level 1"), "{e}");
        let e = tree_err(&format!("address-space: a\n{GOOD}{GOOD}"));
        assert_eq!(e.line, 3);
        assert!(e.message.contains("second root"), "{e}");
        let e = tree_err(GOOD);
        assert_eq!(
            e.to_string(),
            "line 1: region line outside any address-space or memory-region block"
        );
        let e = tree_err(&format!("address-space: a\n{}", GOOD.trim_start()));
        assert_eq!(e.line, 2);
        assert!(e.message.contains("not indented"), "{e}");
    }

    #[test]
    fn error_missing_prio() {
        let e = tree_err("address-space: a\n  0000000000000000-00000000000000ff (pri 0, ram): r\n");
        assert_eq!(e.line, 2);
        assert_eq!(
            e.message,
            "expected \" (prio \" after end address, found \" (pri 0, ram): r\""
        );
        let e = parse_flat("FlatView #1\n AS \"x\", root: y\n Root memory region: y\n  0000000000000000-00000000000000ff ram: r\n").unwrap_err();
        assert_eq!(e.line, 4);
        assert!(e.message.contains("(prio"), "{e}");
        let e = tree_err(
            "address-space: a\n  0000000000000000-00000000000000ff (prio 99999999999, ram): r\n",
        );
        assert_eq!(e.line, 2);
        assert!(e.message.contains("32-bit"), "{e}");
    }

    #[test]
    fn error_truncated_lines() {
        for (text, line) in [
            ("address-space: a\n  0000000000000000-00000000000000ff (prio 0, ram", 2),
            ("address-space: a\n  0000000000000000-00000000000000ff (prio 0,", 2),
            ("address-space: a\n  0000000000000000-000000", 2),
            ("address-space: a\n  0000000000000000-00000000000000ff (prio 0, ram): alias x @y 0000000000000000-00000", 2),
            ("address-space: a\r\n  0000000000000000-00000000000000ff (prio 0, ram): r owner:{dev pa", 0),
        ] {
            match parse_tree(text) {
                Err(e) => assert_eq!(e.line, line, "{text:?}: {e}"),
                Ok(d) => {
                    // A cut owner decoration without '}' is part of the name.
                    assert_eq!(line, 0, "{text:?} parsed");
                    assert_eq!(d.groups[0].root.name, "r owner:{dev pa");
                }
            }
        }
        for text in [
            "address-space: a\n",
            "address-space: a\n\n",
            "address-space: a",
        ] {
            let e = parse_tree_strict(text).unwrap_err();
            assert_eq!(
                e.to_string(),
                "line 1: address-space header is not followed by any region line"
            );
            assert!(parse_tree(text).unwrap().groups[0].root.is_placeholder());
        }
        let e = parse_tree(
            "address-space: a\n  0000000000000000-00000000000000ff (prio 0, ram): r owner:{dev}\n",
        )
        .unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("owner reference"), "{e}");
        let e = parse_flat("FlatView #0\n AS \"m\", root: s\n").unwrap_err();
        assert_eq!(e.line, 1);
        let e = parse_flat("FlatView #0\n AS \"m, root: s\n Root memory region: s\n").unwrap_err();
        assert_eq!(e.line, 2);
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads oracle dumps from disk")]
    fn empty_crlf_and_missing_newline() {
        assert_eq!(parse_tree("").unwrap(), TreeDump::default());
        assert_eq!(parse_flat("").unwrap(), FlatDump::default());
        assert_eq!(parse_tree("\n\n").unwrap(), TreeDump::default());
        let lf = read("x86_64/pc.disabled.txt");
        let crlf = lf.replace('\n', "\r\n");
        assert_eq!(parse_tree(&crlf).unwrap(), parse_tree(&lf).unwrap());
        assert_eq!(parse_tree(lf.trim_end()).unwrap(), parse_tree(&lf).unwrap());
        let lf = read("x86_64/pc.flat.txt");
        let crlf = lf.replace('\n', "\r\n");
        assert_eq!(parse_flat(&crlf).unwrap(), parse_flat(&lf).unwrap());
        assert_eq!(parse_flat(lf.trim_end()).unwrap(), parse_flat(&lf).unwrap());
    }

    #[test]
    fn type_tag_round_trip() {
        for t in [
            TypeTag::Ram,
            TypeTag::Rom,
            TypeTag::Romd,
            TypeTag::Ramd,
            TypeTag::Io,
            TypeTag::Container,
        ] {
            assert_eq!(TypeTag::from_printed(t.as_str()), Some(t));
        }
        assert_eq!(TypeTag::Io.as_str(), "i/o");
    }

    #[test]
    #[cfg_attr(miri, ignore = "a 1000-level parse is too slow under Miri")]
    fn deep_nesting_is_bounded() {
        let mut text = String::from("address-space: a\n");
        for level in 1..=MAX_DEPTH + 1 {
            text.push_str(&" ".repeat(level * 2));
            text.push_str("0000000000000000-0000000000000000 (prio 0, ram): x\n");
        }
        let e = parse_tree(&text).unwrap_err();
        assert_eq!(e.line, MAX_DEPTH + 2);
    }
}
