//! `memtree map`: the SVG is well-formed XML, its pieces agree with the
//! flat view (every range exactly once, in address order, holes exactly
//! where the view has none), heights are to scale where promised, aliases
//! are linked to their targets, tooltips name what a range obscures, and a
//! diff marks exactly the ranges whose `info mtree -f` lines differ.

use std::collections::BTreeSet;
use std::process::Command;

use memtree::inspect::map_svg::{self, SpaceMap};
use memtree::qemu_text::print::{self, FlatOptions};
use memtree::qemu_text::{import, parse};
use memtree::{Memory, SpaceId};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/oracle/");
const BIN: &str = env!("CARGO_BIN_EXE_memtree");

// ---- a minimal XML parser (checks well-formedness) ------------------------

#[derive(Debug)]
struct Element {
    name: String,
    attrs: Vec<(String, String)>,
    children: Vec<Node>,
}

#[derive(Debug)]
enum Node {
    Element(Element),
    Text(String),
}

impl Element {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every element below (and including) this one, in document order.
    fn walk<'a>(&'a self, out: &mut Vec<&'a Element>) {
        out.push(self);
        for c in &self.children {
            if let Node::Element(e) = c {
                e.walk(out);
            }
        }
    }

    fn text(&self) -> String {
        let mut s = String::new();
        for c in &self.children {
            match c {
                Node::Text(t) => s.push_str(t),
                Node::Element(e) => s.push_str(&e.text()),
            }
        }
        s
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    is_name_start(c) || c.is_ascii_digit() || c == '-' || c == '.'
}

fn legal_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{fffe}' && c != '\u{ffff}')
}

/// Decodes character data: `&` must start one of the five predefined
/// entities or a character reference; `<` may not appear.
fn decode(s: &str, in_attr: bool) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if !legal_xml_char(c) {
            return Err(format!("illegal character {c:?}"));
        }
        match c {
            '<' => return Err("raw '<' in character data".into()),
            '&' => {
                let end = rest.find(';').ok_or("unterminated entity")?;
                let ent = &rest[1..end];
                let ch = match ent {
                    "amp" => '&',
                    "lt" => '<',
                    "gt" => '>',
                    "quot" => '"',
                    "apos" => '\'',
                    _ if ent.starts_with("#x") => u32::from_str_radix(&ent[2..], 16)
                        .ok()
                        .and_then(char::from_u32)
                        .ok_or_else(|| format!("bad reference &{ent};"))?,
                    _ if ent.starts_with('#') => ent[1..]
                        .parse::<u32>()
                        .ok()
                        .and_then(char::from_u32)
                        .ok_or_else(|| format!("bad reference &{ent};"))?,
                    _ => return Err(format!("unknown entity &{ent};")),
                };
                if !legal_xml_char(ch) {
                    return Err(format!("reference to illegal character &{ent};"));
                }
                out.push(ch);
                rest = &rest[end + 1..];
            }
            _ => {
                // Attribute-value normalization: literal whitespace is a space.
                out.push(if in_attr && matches!(c, '\n' | '\t' | '\r') {
                    ' '
                } else {
                    c
                });
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    Ok(out)
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }
    fn err<T>(&self, m: impl Into<String>) -> Result<T, String> {
        let line = self.s[..self.pos].matches('\n').count() + 1;
        Err(format!("line {line}: {}", m.into()))
    }
    fn skip_ws(&mut self) {
        let t = self.rest();
        self.pos += t.len() - t.trim_start().len();
    }
    fn name(&mut self) -> Result<String, String> {
        let t = self.rest();
        let mut it = t.char_indices();
        match it.next() {
            Some((_, c)) if is_name_start(c) => {}
            _ => return self.err("expected a name"),
        }
        let end = it
            .find(|&(_, c)| !is_name_char(c))
            .map_or(t.len(), |(i, _)| i);
        self.pos += end;
        Ok(t[..end].to_owned())
    }
    fn element(&mut self) -> Result<Element, String> {
        if !self.rest().starts_with('<') {
            return self.err("expected '<'");
        }
        self.pos += 1;
        let name = self.name()?;
        let mut attrs: Vec<(String, String)> = Vec::new();
        loop {
            let before = self.pos;
            self.skip_ws();
            if self.rest().starts_with("/>") {
                self.pos += 2;
                return Ok(Element {
                    name,
                    attrs,
                    children: Vec::new(),
                });
            }
            if self.rest().starts_with('>') {
                self.pos += 1;
                break;
            }
            if self.pos == before {
                return self.err("expected whitespace before an attribute");
            }
            let an = self.name()?;
            self.skip_ws();
            if !self.rest().starts_with('=') {
                return self.err(format!("attribute {an} without '='"));
            }
            self.pos += 1;
            self.skip_ws();
            let q = match self.rest().chars().next() {
                Some(q @ ('"' | '\'')) => q,
                _ => return self.err("unquoted attribute value"),
            };
            self.pos += 1;
            let end = match self.rest().find(q) {
                Some(e) => e,
                None => return self.err("unterminated attribute value"),
            };
            let raw = &self.rest()[..end];
            let v = match decode(raw, true) {
                Ok(v) => v,
                Err(e) => return self.err(format!("attribute {an}: {e}")),
            };
            self.pos += end + 1;
            if attrs.iter().any(|(n, _)| *n == an) {
                return self.err(format!("duplicate attribute {an}"));
            }
            attrs.push((an, v));
        }
        let mut children = Vec::new();
        loop {
            let t = self.rest();
            if t.starts_with("</") {
                self.pos += 2;
                let close = self.name()?;
                if close != name {
                    return self.err(format!("</{close}> closes <{name}>"));
                }
                self.skip_ws();
                if !self.rest().starts_with('>') {
                    return self.err("expected '>'");
                }
                self.pos += 1;
                return Ok(Element {
                    name,
                    attrs,
                    children,
                });
            } else if t.starts_with("<!--") {
                let end = match t.find("-->") {
                    Some(e) => e,
                    None => return self.err("unterminated comment"),
                };
                self.pos += end + 3;
            } else if t.starts_with('<') {
                children.push(Node::Element(self.element()?));
            } else if t.is_empty() {
                return self.err(format!("<{name}> is never closed"));
            } else {
                let end = t.find('<').unwrap_or(t.len());
                match decode(&t[..end], false) {
                    Ok(text) => children.push(Node::Text(text)),
                    Err(e) => return self.err(e),
                }
                self.pos += end;
            }
        }
    }
}

/// Parses a whole document: an optional XML declaration, one root element,
/// nothing but whitespace after it.
fn parse_xml(s: &str) -> Result<Element, String> {
    let mut p = Parser { s, pos: 0 };
    if p.rest().starts_with("<?xml") {
        match p.rest().find("?>") {
            Some(e) => p.pos += e + 2,
            None => return p.err("unterminated declaration"),
        }
    }
    p.skip_ws();
    let root = p.element()?;
    p.skip_ws();
    if !p.rest().is_empty() {
        return p.err("content after the root element");
    }
    Ok(root)
}

#[test]
fn the_xml_checker_rejects_malformed_documents() {
    for bad in [
        "<a><b></a></b>",
        "<a x=\"1\" x=\"2\"/>",
        "<a>&foo;</a>",
        "<a>1 < 2</a>",
        "<a x=\"<\"/>",
        "<a>&#1;</a>",
        "<a>",
        "<a/><b/>",
        "<a x=1/>",
        "<a>\u{1}</a>",
    ] {
        assert!(parse_xml(bad).is_err(), "accepted {bad:?}");
    }
    let ok = parse_xml("<?xml version=\"1.0\"?>\n<a x='&lt;&#10;'>t&amp;<b/></a>\n").unwrap();
    assert_eq!(ok.attr("x"), Some("<\n"));
    assert_eq!(ok.text(), "t&");
}

// ---- machines ---------------------------------------------------------------

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A QEMU machine from its `-D` and `-f` dumps under tests/data/oracle.
fn qemu(tree: &str, flat: &str) -> Memory {
    let t = parse::parse_tree(&read(&format!("{DATA}{tree}"))).unwrap();
    let f = parse::parse_flat(&read(&format!("{DATA}{flat}"))).unwrap();
    import::import(&t, Some(&f), None).unwrap().memory
}

fn space(mem: &Memory, name: &str) -> SpaceId {
    mem.find_address_space(name)
        .unwrap_or_else(|| panic!("no address space {name}"))
}

fn hex(s: &str) -> u128 {
    u128::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("not hex: {s}"))
}

/// A drawn piece: kind, start, end (inclusive), region, column, diff mark,
/// scale kind, height.
#[derive(Debug, Clone)]
struct Piece {
    kind: String,
    start: u128,
    last: u128,
    region: Option<String>,
    column: Option<String>,
    diff: Option<String>,
    scale: String,
    height: f64,
}

fn pieces(root: &Element) -> Vec<Piece> {
    let mut all = Vec::new();
    root.walk(&mut all);
    all.into_iter()
        .filter(|e| e.name == "rect" && e.attr("data-kind").is_some())
        .map(|e| Piece {
            kind: e.attr("data-kind").unwrap().to_owned(),
            start: hex(e.attr("data-start").expect("data-start")),
            last: hex(e.attr("data-end").expect("data-end")),
            region: e.attr("data-region").map(str::to_owned),
            column: e.attr("data-column").map(str::to_owned),
            diff: e.attr("data-diff").map(str::to_owned),
            scale: e.attr("data-scale").expect("data-scale").to_owned(),
            height: e.attr("height").unwrap().parse().unwrap(),
        })
        .collect()
}

/// Checks that `pieces` tile `[0, extent)` in address order, that the
/// ranges are exactly the view's (addresses and region, each once) and that
/// holes are exactly the gaps between them (never two holes in a row).
fn assert_agrees_with_view(pieces: &[Piece], mem: &Memory, id: SpaceId, extent: u128) {
    let view = mem.address_space(id).unwrap().view();
    let ranges: Vec<(u128, u128, String)> = pieces
        .iter()
        .filter(|p| p.kind == "range")
        .map(|p| (p.start, p.last, p.region.clone().unwrap()))
        .collect();
    let expected: Vec<(u128, u128, String)> = view
        .ranges()
        .iter()
        .map(|r| {
            (
                u128::from(r.start()),
                u128::from(r.last()),
                r.region().name().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        ranges, expected,
        "the drawn ranges are the view's, in order"
    );
    let mut at = 0u128;
    let mut prev_hole = false;
    for p in pieces {
        assert_eq!(p.start, at, "pieces tile the space in order: {p:?}");
        assert!(p.last >= p.start);
        let hole = p.kind == "hole";
        assert!(hole || p.kind == "range", "unknown piece kind {p:?}");
        assert!(!(hole && prev_hole), "two holes in a row at {:#x}", p.start);
        if hole {
            assert!(
                view.lookup(p.start as u64).is_none() && view.lookup(p.last as u64).is_none(),
                "a hole where the view has a range: {p:?}"
            );
        }
        prev_hole = hole;
        at = p.last + 1;
    }
    assert_eq!(at, extent, "pieces reach the end of the address space");
}

fn render(mem: &Memory, id: SpaceId) -> (SpaceMap, String, Element) {
    let map = map_svg::collect(mem, id).unwrap();
    let svg = map_svg::render(&map);
    let root = parse_xml(&svg).unwrap_or_else(|e| panic!("malformed SVG: {e}\n{svg}"));
    assert_eq!(root.name, "svg");
    assert_eq!(root.attr("xmlns"), Some("http://www.w3.org/2000/svg"));
    (map, svg, root)
}

// ---- single maps ----------------------------------------------------------------

#[test]
fn map_of_every_demo_space_agrees_with_its_flat_view() {
    let d = memtree_cli::demo::build().unwrap();
    for (id, name) in d.memory.address_spaces() {
        let (_, _, root) = render(&d.memory, id);
        let extent = if name == "I/O" { 0x10000 } else { 1 << 64 };
        assert_agrees_with_view(&pieces(&root), &d.memory, id, extent);
    }
}

#[test]
fn map_of_a_qemu_pc_agrees_with_its_flat_views() {
    let mem = qemu("x86_64/pc.disabled.txt", "x86_64/pc.flat.txt");
    for (name, extent) in [("memory", 1u128 << 64), ("I/O", 0x10000)] {
        let id = space(&mem, name);
        let (_, _, root) = render(&mem, id);
        let p = pieces(&root);
        assert!(p.iter().filter(|p| p.kind == "range").count() > 5);
        assert_agrees_with_view(&p, &mem, id, extent);
    }
}

#[test]
fn map_of_the_empty_view_is_one_hole() {
    let mem = Memory::new();
    let c = mem
        .new_container("bus master container", 1 << 64, None)
        .unwrap();
    let id = mem.new_address_space("dma", c, None).unwrap();
    let (map, svg, root) = render(&mem, id);
    assert!(map.root.is_none());
    let p = pieces(&root);
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].kind.as_str(), p[0].start, p[0].last),
        ("hole", 0, u128::from(u64::MAX))
    );
    assert!(svg.contains("the empty view"));
}

#[test]
fn map_escapes_names_and_replaces_characters_xml_cannot_carry() {
    let mem = Memory::new();
    let sys = mem.new_container("sys<&>", 1 << 32, None).unwrap();
    let names = ["<script>&amp;\"x\"'", "a]]>b", "ctl\u{1}x", "t\tab\nnl"];
    for (i, n) in names.iter().enumerate() {
        let r = mem.new_ram(n, 0x1000, None).unwrap();
        mem.add_subregion(sys, 0x1000 * (2 * i as u64 + 1), r)
            .unwrap();
    }
    let target = mem.new_ram("tgt\"&", 0x1000, None).unwrap();
    mem.add_subregion(sys, 0x10_0000, target).unwrap();
    let alias = mem.new_alias("<alias>", target, 0, 0x1000, None).unwrap();
    mem.add_subregion(sys, 0x20_0000, alias).unwrap();
    let id = mem.new_address_space("as \"q\" & <x>", sys, None).unwrap();
    let (_, _, root) = render(&mem, id);
    let p = pieces(&root);
    let drawn: Vec<String> = p.iter().filter_map(|p| p.region.clone()).collect();
    assert_eq!(
        drawn,
        [
            "<script>&amp;\"x\"'",
            "a]]>b",
            "ctl\u{fffd}x",
            // Attribute-value normalization turns tab and newline into
            // spaces unless they are written as references, as they are.
            "t\tab\nnl",
            "tgt\"&",
            "tgt\"&",
        ]
    );
    assert_agrees_with_view(
        &p.iter()
            .map(|x| {
                let mut x = x.clone();
                if x.region.as_deref() == Some("ctl\u{fffd}x") {
                    x.region = Some("ctl\u{1}x".into());
                }
                x
            })
            .collect::<Vec<_>>(),
        &mem,
        id,
        1 << 32,
    );
}

#[test]
fn map_heights_grow_with_size_and_are_to_scale_in_the_linear_band() {
    let d = memtree_cli::demo::build().unwrap();
    let pc = qemu("x86_64/pc.disabled.txt", "x86_64/pc.flat.txt");
    let cases = [
        (&d.memory, d.system_as),
        (&pc, space(&pc, "memory")),
        (&pc, space(&pc, "I/O")),
    ];
    for (mem, id) in cases {
        let (_, svg, root) = render(mem, id);
        let p = pieces(&root);
        let size = |p: &Piece| (p.last - p.start + 1) as f64;
        // Monotonic: a bigger piece is never drawn shorter.
        for a in &p {
            for b in &p {
                if size(a) < size(b) {
                    assert!(a.height <= b.height + 0.05, "{a:?} taller than {b:?}");
                }
            }
        }
        // Linear pieces share one bytes-per-pixel scale (heights are
        // printed to 0.1 px).
        let linear: Vec<&Piece> = p.iter().filter(|p| p.scale == "linear").collect();
        assert!(linear.len() >= 2, "some pieces are to scale: {p:?}");
        let unit = size(linear[0]) / linear[0].height;
        for l in &linear {
            let expect = size(l) / unit;
            assert!(
                (l.height - expect).abs() <= 0.1 + expect * 1e-3,
                "{l:?} not to scale"
            );
        }
        // Everything else is enlarged or compressed, and compressed pieces
        // carry a break mark.
        let compressed = p.iter().filter(|p| p.scale == "compressed").count();
        assert!(compressed >= 1);
        assert!(svg.matches("class=\"brk\"").count() >= compressed);
        assert!(p
            .iter()
            .all(|p| ["linear", "enlarged", "compressed"].contains(&p.scale.as_str())));
    }
}

#[test]
fn map_shows_aliases_and_links_them_to_their_target() {
    let d = memtree_cli::demo::build().unwrap();
    let (map, _, root) = render(&d.memory, d.system_as);
    let mut all = Vec::new();
    root.walk(&mut all);
    let rect = all
        .iter()
        .find(|e| e.name == "rect" && e.attr("data-start") == Some("0x00000000000e0000"))
        .expect("the range at 0xe0000");
    assert_eq!(rect.attr("data-region"), Some("pc.bios"));
    assert_eq!(rect.attr("data-alias"), Some("pam-pci > isa-bios"));
    let r = map.ranges.iter().find(|r| r.start == 0xe0000).unwrap();
    assert_eq!(r.aliases.len(), 2);
    assert_eq!(
        (
            r.aliases[1].alias.as_str(),
            r.aliases[1].target.as_str(),
            r.aliases[1].target_offset
        ),
        ("isa-bios", "pc.bios", 0x20000)
    );
    assert_eq!(
        (
            r.aliases[0].alias.as_str(),
            r.aliases[0].target.as_str(),
            r.aliases[0].target_offset
        ),
        ("pam-pci", "pci", 0xe0000)
    );
    // The label says it, and an arrow goes to where pc.bios is mapped directly.
    let texts: Vec<String> = all
        .iter()
        .filter(|e| e.name == "text")
        .map(|e| e.text())
        .collect();
    assert!(texts
        .iter()
        .any(|t| t.contains("isa-bios \u{2192} pc.bios @0x20000")));
    let link = all
        .iter()
        .find(|e| e.name == "path" && e.attr("data-from") == Some("0x00000000000e0000"))
        .expect("a link from the alias-served range");
    assert_eq!(link.attr("data-to"), Some("0x00000000fffc0000"));
    assert_eq!(link.attr("data-region"), Some("pc.bios"));
    // pc.ram is only seen through aliases: its three ranges are joined.
    let ram_links = all
        .iter()
        .filter(|e| e.name == "path" && e.attr("data-region") == Some("pc.ram"))
        .count();
    assert_eq!(ram_links, 2);
    // A range not served through an alias has no alias mark.
    let hpet = all
        .iter()
        .find(|e| e.name == "rect" && e.attr("data-region") == Some("hpet"))
        .unwrap();
    assert_eq!(hpet.attr("data-alias"), None);
}

/// The `<title>` of the group holding the range rect starting at `start`.
fn tooltip(root: &Element, start: &str) -> String {
    fn find(e: &Element, start: &str) -> Option<String> {
        let holds = e.children.iter().any(|c| {
            matches!(c, Node::Element(r) if r.name == "rect" && r.attr("data-start") == Some(start))
        });
        if e.name == "g" && holds {
            return e.children.iter().find_map(|c| match c {
                Node::Element(t) if t.name == "title" => Some(t.text()),
                _ => None,
            });
        }
        e.children.iter().find_map(|c| match c {
            Node::Element(x) => find(x, start),
            Node::Text(_) => None,
        })
    }
    find(root, start).unwrap_or_else(|| panic!("no tooltip for {start}"))
}

#[test]
fn map_tooltips_name_the_serving_region_and_what_it_obscures_inside_the_range() {
    let d = memtree_cli::demo::build().unwrap();
    let (_, _, root) = render(&d.memory, d.system_as);
    // pc.ram serves 0-0xdffff through ram-below-4g; inside it, at 0xc0000,
    // it hides pc.rom (in the lower-priority pci container), which nothing
    // at the range's first address shows.
    let t = tooltip(&root, "0x0000000000000000");
    assert!(t.contains("served by \"pc.ram\" at offset 0x0"), "{t}");
    assert!(t.contains("path: system > ram-below-4g > pc.ram"), "{t}");
    let line = t
        .lines()
        .find(|l| l.trim_start().starts_with("pc.rom "))
        .unwrap_or_else(|| panic!("pc.rom not listed: {t}"));
    assert!(line.contains("obscured by \"pc.ram\""), "{line}");
    assert!(line.contains("0xc0000-0xdffff"), "{line}");
    // At 0xe0000 the disabled pam-ram alias is listed as inactive.
    let t = tooltip(&root, "0x00000000000e0000");
    let inactive = t.split("also covering, inactive:").nth(1).expect(&t);
    assert!(inactive.contains("pam-ram [alias"), "{t}");
    // A range alone at its addresses obscures nothing.
    let t = tooltip(&root, "0x00000000fed00000");
    assert!(t.contains("obscures nothing"), "{t}");
}

// ---- diffs ----------------------------------------------------------------------

/// The `info mtree -f` range lines of address space `name`.
fn flat_lines(mem: &Memory, name: &str) -> Vec<String> {
    let mut text = String::new();
    print::print_flat(mem, &mut text, FlatOptions { owners: false }).unwrap();
    for block in text.split("\n\n") {
        if block
            .lines()
            .any(|l| l.starts_with(&format!(" AS \"{name}\", root: ")))
        {
            return block
                .lines()
                .filter(|l| l.starts_with("  ") && !l.contains("No rendered FlatView"))
                .map(|l| l.trim().to_owned())
                .collect();
        }
    }
    panic!("no view of {name}");
}

fn span(line: &str) -> (u128, u128) {
    let (a, b) = line.split_once(' ').unwrap().0.split_once('-').unwrap();
    (hex(a), hex(b))
}

/// The snapshots of a dynamic oracle scenario, in order.
fn snapshots(scenario: &str) -> Vec<String> {
    let dir = format!("{DATA}dynamic/{scenario}");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            n.strip_suffix(".disabled.txt").map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

#[test]
fn map_diff_marks_exactly_the_ranges_whose_lines_differ() {
    let mut marks: BTreeSet<String> = BTreeSet::new();
    for scenario in ["q35-e1000-bar", "q35-pam", "pc-pam-smram"] {
        let snaps = snapshots(scenario);
        assert!(snaps.len() >= 2, "{scenario}: {snaps:?}");
        let dir = format!("dynamic/{scenario}/");
        let load = |s: &str| {
            qemu(
                &format!("{dir}{s}.disabled.txt"),
                &format!("{dir}{s}.flat.txt"),
            )
        };
        let mut pairs: Vec<(&String, &String)> = snaps.windows(2).map(|w| (&w[0], &w[1])).collect();
        pairs.push((&snaps[0], &snaps[snaps.len() - 1]));
        for (sa, sb) in pairs {
            let (ma, mb) = (load(sa), load(sb));
            for name in ["memory", "I/O"] {
                let (a, b) = (
                    map_svg::collect(&ma, space(&ma, name)).unwrap(),
                    map_svg::collect(&mb, space(&mb, name)).unwrap(),
                );
                let svg = map_svg::render_diff(&a, sa, &b, sb);
                let root = parse_xml(&svg).unwrap_or_else(|e| panic!("malformed SVG: {e}"));
                let p = pieces(&root);
                let (la, lb) = (flat_lines(&ma, name), flat_lines(&mb, name));
                for (col, mine, other, mem, gone) in [
                    ("a", &la, &lb, &ma, "removed"),
                    ("b", &lb, &la, &mb, "added"),
                ] {
                    let drawn: Vec<Piece> = p
                        .iter()
                        .filter(|x| x.column.as_deref() == Some(col))
                        .cloned()
                        .collect();
                    let extent = if name == "I/O" { 0x10000 } else { 1 << 64 };
                    assert_agrees_with_view(&drawn, mem, space(mem, name), extent);
                    let other_spans: BTreeSet<(u128, u128)> =
                        other.iter().map(|l| span(l)).collect();
                    let expected: Vec<(u128, &str)> = mine
                        .iter()
                        .filter(|l| !other.contains(l))
                        .map(|l| {
                            let s = span(l);
                            (
                                s.0,
                                if other_spans.contains(&s) {
                                    "changed"
                                } else {
                                    gone
                                },
                            )
                        })
                        .collect();
                    let got: Vec<(u128, &str)> = drawn
                        .iter()
                        .filter(|x| x.kind == "range" && x.diff.as_deref() != Some("same"))
                        .map(|x| (x.start, x.diff.as_deref().unwrap()))
                        .collect();
                    assert_eq!(
                        got, expected,
                        "{scenario}: {sa} vs {sb} ({name}), column {col}"
                    );
                    marks.extend(got.iter().map(|(_, m)| (*m).to_owned()));
                    assert!(drawn
                        .iter()
                        .filter(|x| x.kind == "range")
                        .all(|x| x.diff.is_some()));
                }
            }
        }
    }
    // The scenarios add and remove ranges (none serves the same addresses
    // differently: see the next test for that).
    assert_eq!(marks.into_iter().collect::<Vec<_>>(), ["added", "removed"]);
}

#[test]
fn map_diff_marks_same_addresses_served_differently_as_changed() {
    // Two machines: the same layout except that 0x2000-0x2fff is served by
    // another region, 0x4000-0x4fff at another offset of the same RAM, and
    // 0x6000-0x6fff only exists in the second.
    let build = |second: bool| {
        let mem = Memory::new();
        let sys = mem.new_container("system", 1 << 32, None).unwrap();
        let ram = mem.new_ram("ram", 0x10000, None).unwrap();
        let lo = mem.new_alias("lo", ram, 0, 0x1000, None).unwrap();
        mem.add_subregion(sys, 0, lo).unwrap();
        let dev = mem
            .new_ram(if second { "dev-b" } else { "dev-a" }, 0x1000, None)
            .unwrap();
        mem.add_subregion(sys, 0x2000, dev).unwrap();
        let win = mem
            .new_alias(
                "win",
                ram,
                if second { 0x8000 } else { 0x4000 },
                0x1000,
                None,
            )
            .unwrap();
        mem.add_subregion(sys, 0x4000, win).unwrap();
        if second {
            let extra = mem.new_ram("extra", 0x1000, None).unwrap();
            mem.add_subregion(sys, 0x6000, extra).unwrap();
        }
        let id = mem.new_address_space("memory", sys, None).unwrap();
        (mem, id)
    };
    let ((ma, ia), (mb, ib)) = (build(false), build(true));
    let a = map_svg::collect(&ma, ia).unwrap();
    let b = map_svg::collect(&mb, ib).unwrap();
    let root = parse_xml(&map_svg::render_diff(&a, "a", &b, "b")).unwrap();
    let marks: Vec<(String, u128, String, String)> = pieces(&root)
        .into_iter()
        .filter(|x| x.kind == "range")
        .map(|x| {
            (
                x.column.unwrap(),
                x.start,
                x.region.unwrap(),
                x.diff.unwrap(),
            )
        })
        .collect();
    let m = |c: &str, s: u128, r: &str, d: &str| (c.to_owned(), s, r.to_owned(), d.to_owned());
    assert_eq!(
        marks,
        [
            m("a", 0, "ram", "same"),
            m("a", 0x2000, "dev-a", "changed"),
            m("a", 0x4000, "ram", "changed"),
            m("b", 0, "ram", "same"),
            m("b", 0x2000, "dev-b", "changed"),
            m("b", 0x4000, "ram", "changed"),
            m("b", 0x6000, "extra", "added"),
        ]
    );
}

#[test]
fn map_diff_of_bar0_moved_marks_only_the_e1000_bar() {
    let dir = "dynamic/q35-e1000-bar/";
    let load = |s: &str| {
        qemu(
            &format!("{dir}{s}.disabled.txt"),
            &format!("{dir}{s}.flat.txt"),
        )
    };
    let (ma, mb) = (load("00-initial"), load("04-bar0-moved-to-fea00000"));
    let a = map_svg::collect(&ma, space(&ma, "memory")).unwrap();
    let b = map_svg::collect(&mb, space(&mb, "memory")).unwrap();
    let root = parse_xml(&map_svg::render_diff(&a, "before", &b, "after")).unwrap();
    let changed: Vec<(String, u128, String, String)> = pieces(&root)
        .into_iter()
        .filter(|x| x.kind == "range" && x.diff.as_deref() != Some("same"))
        .map(|x| {
            (
                x.column.unwrap(),
                x.start,
                x.region.unwrap(),
                x.diff.unwrap(),
            )
        })
        .collect();
    assert_eq!(
        changed,
        [(
            "b".to_owned(),
            0xfea0_0000,
            "e1000-mmio".to_owned(),
            "added".to_owned()
        )]
    );
}

// ---- the command line -----------------------------------------------------------

fn temp_file(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("memtree-map-svg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn cli_map_draws_the_demo_a_dump_and_a_diff() {
    let o = Command::new(BIN).args(["map", "--demo"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let svg = String::from_utf8(o.stdout).unwrap();
    parse_xml(&svg).unwrap();
    assert!(svg.contains("data-region=\"e1000-mmio\""));

    let out = temp_file("pc-io.svg");
    let o = Command::new(BIN)
        .args(["map", "--qemu-tree"])
        .arg(format!("{DATA}x86_64/pc.disabled.txt"))
        .arg("--qemu-flat")
        .arg(format!("{DATA}x86_64/pc.flat.txt"))
        .args(["--as", "I/O", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout.is_empty());
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.contains("address space &quot;I/O&quot;"));
    parse_xml(&svg).unwrap();

    let d = format!("{DATA}dynamic/q35-e1000-bar/");
    let o = Command::new(BIN)
        .args(["map", "--diff"])
        .arg(format!("{d}00-initial.disabled.txt"))
        .arg(format!("{d}04-bar0-moved-to-fea00000.disabled.txt"))
        .arg("--diff-flat")
        .arg(format!("{d}00-initial.flat.txt"))
        .arg(format!("{d}04-bar0-moved-to-fea00000.flat.txt"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let root = parse_xml(&String::from_utf8(o.stdout).unwrap()).unwrap();
    assert!(pieces(&root)
        .iter()
        .any(|x| x.diff.as_deref() == Some("added") && x.region.as_deref() == Some("e1000-mmio")));
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}

#[test]
fn cli_map_refuses_bad_arguments_with_exit_2() {
    let pc = format!("{DATA}x86_64/pc.disabled.txt");
    for args in [
        vec!["map", "--demo", "--as", "nope"],
        vec!["map", "--demo", pc.as_str()],
        vec!["map"],
        vec!["map", "--diff", pc.as_str(), pc.as_str(), "--demo"],
        vec!["map", "--diff-flat", pc.as_str(), pc.as_str(), "--demo"],
    ] {
        let o = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.starts_with("memtree: "), "{args:?}: {err}");
        assert!(o.stdout.is_empty());
    }
    let o = Command::new(BIN)
        .args(["map", "--demo", "-o", "/nonexistent-dir/x.svg"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent-dir/x.svg: cannot write"));
}
