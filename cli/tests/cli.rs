//! The `memtree` binary, run as a user runs it: on QEMU 7.2 oracle dumps, on
//! the example machine files, and on malformed input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_memtree");
/// The QEMU 7.2 dumps: `tests/data/oracle/` in the repository, or the
/// directory `MEMTREE_ORACLE` names (with a trailing `/`).
fn oracle_dir() -> String {
    match std::env::var("MEMTREE_ORACLE") {
        Ok(d) => format!("{}/", d.trim_end_matches('/')),
        Err(_) => concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/oracle/").to_owned(),
    }
}
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run memtree")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn oracle(machine: &str, suffix: &str) -> String {
    format!("{}{machine}.{suffix}", oracle_dir())
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// QEMU prints top-level blocks in hash order: sort them and renumber
/// `FlatView #N` (what tests/data/oracle/canon.py does).
fn canon(text: &str) -> Vec<String> {
    let mut blocks: Vec<String> = text
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let b = b.trim_start_matches('\n');
            match b.strip_prefix("FlatView #") {
                Some(rest) => {
                    let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
                    format!("FlatView #?{rest}")
                }
                None => b.to_owned(),
            }
        })
        .collect();
    blocks.sort();
    blocks
}

fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstderr: {}",
        o.status.code(),
        stderr(o)
    );
}

/// Exit status 2 and a `memtree: FILE:LINE: ...` message naming `file`.
fn assert_malformed(o: &Output, file: &str) -> usize {
    assert_eq!(o.status.code(), Some(2), "stderr: {}", stderr(o));
    let err = stderr(o);
    let prefix = format!("memtree: {file}:");
    let rest = err
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("expected {prefix:?}, got {err:?}"));
    let line: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    assert!(
        !line.is_empty() && rest[line.len()..].starts_with(": "),
        "no LINE in {err:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
    line.parse().unwrap()
}

fn tmp(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memtree-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

const MACHINES: &[&str] = &[
    "x86_64/pc",
    "x86_64/q35",
    "x86_64/isapc",
    "aarch64/virt",
    "variants/pc-pcidevs",
    "dynamic/q35-e1000-bar/02-mem-enabled",
];

fn existing(machine: &str) -> bool {
    Path::new(&oracle(machine, "disabled.txt")).exists()
}

#[test]
fn cli_flat_of_imported_qemu_dumps_equals_qemu_flat_view() {
    let mut checked = 0;
    for m in MACHINES.iter().filter(|m| existing(m)) {
        let (t, f) = (oracle(m, "disabled.txt"), oracle(m, "flat.txt"));
        let o = run(&["flat", "--qemu-tree", &t, "--qemu-flat", &f]);
        assert_ok(&o);
        assert_eq!(canon(&stdout(&o)), canon(&read(&f)), "{m}");
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} oracle machines found");
}

#[test]
fn cli_flat_with_owners_equals_qemu_flat_owner_view() {
    let m = "x86_64/pc";
    let (t, f, ow) = (
        oracle(m, "disabled.txt"),
        oracle(m, "flat.txt"),
        oracle(m, "owner.txt"),
    );
    let o = run(&[
        "flat",
        "--qemu-tree",
        &t,
        "--qemu-flat",
        &f,
        "--qemu-owners",
        &ow,
        "-o",
    ]);
    assert_ok(&o);
    assert_eq!(
        canon(&stdout(&o)),
        canon(&read(&oracle(m, "flat-owner.txt")))
    );
}

#[test]
fn cli_tree_equals_qemu_tree_views_with_and_without_disabled() {
    for m in ["x86_64/pc", "x86_64/q35"] {
        let (t, f) = (oracle(m, "disabled.txt"), oracle(m, "flat.txt"));
        let o = run(&["tree", "--qemu-tree", &t, "--qemu-flat", &f, "-D"]);
        assert_ok(&o);
        assert_eq!(canon(&stdout(&o)), canon(&read(&t)), "{m} -D");
        let o = run(&["tree", "--qemu-tree", &t, "--qemu-flat", &f]);
        assert_ok(&o);
        assert_eq!(
            canon(&stdout(&o)),
            canon(&read(&oracle(m, "mtree.txt"))),
            "{m}"
        );
    }
}

#[test]
fn cli_lookup_names_the_msi_window_of_pc() {
    let t = oracle("x86_64/pc", "disabled.txt");
    let f = oracle("x86_64/pc", "flat.txt");
    for addr in ["0xfee00000", "0x00000000fee00000", "4276092928"] {
        let o = run(&["lookup", "--qemu-tree", &t, "--qemu-flat", &f, addr]);
        assert_ok(&o);
        let out = stdout(&o);
        assert!(
            out.contains("served by \"apic-msi\" (i/o) at offset 0x0")
                || out.contains("served by \"apic-msi\" (mmio) at offset 0x0"),
            "{addr}: {out}"
        );
    }
}

#[test]
fn cli_lookup_in_pam_area_explains_which_alias_wins_and_why_others_lost() {
    let t = oracle("x86_64/pc", "disabled.txt");
    let o = run(&["lookup", "--qemu-tree", &t, "0xc0000"]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.contains("served by \"pc.rom\""), "{out}");
    assert!(out.contains("system > pam-pci > pci > pc.rom"), "{out}");
    // The three other PAM aliases at 0xc0000 are disabled.
    assert!(out.matches("lost: disabled").count() >= 3, "{out}");
    // RAM below 4G covers the address but loses on priority.
    assert!(
        out.contains("because in \"system\" its branch \"pam-pci\" has priority 1 > 0"),
        "{out}"
    );
    // --all also lists what sits inside the disabled aliases.
    let all = stdout(&run(&["lookup", "--qemu-tree", &t, "--all", "0xc0000"]));
    assert!(
        all.contains("inside \"pam-ram\", which is disabled"),
        "{all}"
    );
}

#[test]
fn cli_lookup_in_io_space_and_offsets() {
    let t = oracle("x86_64/pc", "disabled.txt");
    let f = oracle("x86_64/pc", "flat.txt");
    let o = run(&[
        "lookup",
        "--qemu-tree",
        &t,
        "--qemu-flat",
        &f,
        "--as",
        "I/O",
        "0x71",
    ]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.contains("served by \"rtc\""), "{out}");
    assert!(out.contains("at offset 0x1"), "{out}");
}

#[test]
fn cli_machine_files_render_and_explain() {
    let pc = format!("{EXAMPLES}pc-like.toml");
    let o = run(&["flat", &pc]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(
        out.contains("00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000"),
        "{out}"
    );
    assert!(out.contains(" AS \"e1000\", root: bus master container\n Root memory region: (none)"));
    let o = run(&["tree", &pc, "-D"]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("alias pam-ram @pc.ram 00000000000e0000-00000000000fffff [disabled]")
    );
    let o = run(&["lookup", &pc, "0xfee00000"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("served by \"apic-msi\""));
    let o = run(&["lookup", &pc, "--as", "I/O", "0x3fd"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("served by \"serial\" (mmio) at offset 0x5"));
    let kinds = format!("{EXAMPLES}all-kinds.toml");
    let o = run(&["lookup", &kinds, "0x70001000"]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.contains("unassigned"), "{out}");
    assert!(out.contains("the container \"mmio-window\""), "{out}");
}

#[test]
fn cli_every_example_machine_file_loads() {
    let mut n = 0;
    for e in std::fs::read_dir(EXAMPLES).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "toml") {
            let s = p.to_str().unwrap();
            for cmd in [&["flat", s][..], &["tree", s, "-D"], &["lookup", s, "0"]] {
                let o = run(cmd);
                assert_ok(&o);
                assert!(!stdout(&o).is_empty());
            }
            n += 1;
        }
    }
    assert!(n >= 2, "only {n} examples");
}

#[test]
fn cli_diff_reports_changed_ranges() {
    let t = oracle("x86_64/pc", "disabled.txt");
    let o = run(&["diff", &t, &t]);
    assert_ok(&o);
    assert!(stdout(&o).contains("identical"));
    let a = format!("{EXAMPLES}pc-like.toml");
    let o = run(&["diff", &t, &a]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("- 0000000000100000-0000000007ffffff (prio 0, ram): pc.ram @0000000000100000"),
        "{out}"
    );
    assert!(
        out.contains("+ 0000000000100000-00000000bfffffff (prio 0, ram): pc.ram @0000000000100000"),
        "{out}"
    );
    let memory = out
        .split("address space \"memory\":")
        .nth(1)
        .and_then(|rest| rest.split("address space ").next())
        .expect("a section for \"memory\"");
    assert!(
        !memory.contains("ioapic"),
        "identical lines are not reported: {memory}"
    );
}

#[test]
fn cli_truncated_dump_is_reported_with_file_and_line() {
    let full = read(&oracle("x86_64/pc", "disabled.txt"));
    let p = tmp("truncated.txt", &full[..3000]);
    let s = p.to_str().unwrap();
    let line = assert_malformed(&run(&["flat", "--qemu-tree", s]), s);
    assert_eq!(line, full[..3000].lines().count());
}

#[test]
fn cli_bad_hex_in_dump_is_reported_with_its_line() {
    let full = read(&oracle("x86_64/pc", "disabled.txt"));
    let bad: Vec<String> = full
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 19 {
                l.replacen("00000000000", "0000000000z", 1)
            } else {
                l.to_owned()
            }
        })
        .collect();
    let p = tmp("badhex.txt", &bad.join("\n"));
    let s = p.to_str().unwrap();
    assert_eq!(assert_malformed(&run(&["tree", "--qemu-tree", s]), s), 20);
    // The flat dump is checked too.
    let flat = read(&oracle("x86_64/pc", "flat.txt")).replacen("(prio 0, ram)", "(prio x, ram)", 1);
    let pf = tmp("badflat.txt", &flat);
    let sf = pf.to_str().unwrap();
    let t = oracle("x86_64/pc", "disabled.txt");
    assert_malformed(&run(&["flat", "--qemu-tree", &t, "--qemu-flat", sf]), sf);
}

#[test]
fn cli_dump_without_disabled_regions_is_refused_with_a_line() {
    let t = oracle("x86_64/pc", "mtree.txt");
    assert_malformed(&run(&["flat", "--qemu-tree", &t]), &t);
}

#[test]
fn cli_bad_toml_is_reported_with_file_and_line() {
    let p = tmp(
        "bad.toml",
        "[[region]]\nname = \"a\"\nkind = \"container\"\nsize = 16\n[[region]\n",
    );
    let s = p.to_str().unwrap();
    assert_eq!(assert_malformed(&run(&["flat", s]), s), 5);
}

#[test]
fn cli_unknown_alias_target_is_reported_at_its_line() {
    let p = tmp(
        "alias.toml",
        "[[region]]\nname = \"a\"\nkind = \"container\"\nsize = 16\n\n[[region]]\nname = \"b\"\nkind = \"alias\"\ntarget = \"nope\"\n",
    );
    let s = p.to_str().unwrap();
    let o = run(&["tree", s]);
    assert_eq!(assert_malformed(&o, s), 9);
    assert!(stderr(&o).contains("unknown alias target \"nope\""));
}

#[test]
fn cli_topology_errors_map_to_the_line_of_the_offending_entry() {
    let cases = [
        // A region inside itself (through its parent).
        ("loop.toml", "[[region]]\nname=\"a\"\nkind=\"container\"\nsize=16\nparent=\"b\"\n[[region]]\nname=\"b\"\nkind=\"container\"\nsize=16\nparent=\"a\"\n", 10, "loop"),
        ("dup.toml", "[[region]]\nname=\"a\"\nkind=\"container\"\nsize=16\n[[region]]\nname=\"a\"\nkind=\"mmio\"\nsize=16\n", 6, "duplicate"),
        ("big.toml", "[[region]]\nname=\"a\"\nkind=\"container\"\nsize=\"0x1_0000_0000_0000_0001\"\n", 4, "too big"),
        ("aliasloop.toml", "[[region]]\nname=\"a\"\nkind=\"alias\"\ntarget=\"b\"\n[[region]]\nname=\"b\"\nkind=\"alias\"\ntarget=\"a\"\n", 4, "alias loop"),
        ("parent.toml", "[[region]]\nname=\"a\"\nkind=\"mmio\"\nsize=4\nparent=\"nowhere\"\n", 5, "unknown parent"),
        ("kind.toml", "[[region]]\nname=\"a\"\nkind=\"flash\"\nsize=4\n", 3, "unknown region kind"),
    ];
    for (name, text, line, what) in cases {
        let p = tmp(name, text);
        let s = p.to_str().unwrap();
        let o = run(&["flat", s]);
        assert_eq!(assert_malformed(&o, s), line, "{name}: {}", stderr(&o));
        assert!(stderr(&o).contains(what), "{name}: {}", stderr(&o));
    }
}

#[test]
fn cli_bad_arguments_exit_2_without_panicking() {
    let pc = format!("{EXAMPLES}pc-like.toml");
    for args in [
        &["lookup", &pc, "--as", "nope", "0"][..],
        &["lookup", &pc, "0xzz"],
        &["lookup", &pc, "0x1_0000_0000_0000_0000"],
        &["flat", "/nonexistent/machine.toml"],
        &["flat"],
        &["frobnicate"],
        &["tree", &pc, "--qemu-tree", &pc],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).starts_with("memtree: ") || stderr(&o).starts_with("error: "),
            "{args:?}: {}",
            stderr(&o)
        );
        assert!(!stderr(&o).contains("panicked"));
    }
}

#[test]
fn cli_demo_runs_and_reports_that_nothing_survived() {
    let o = run(&["demo"]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(
        out.contains("leak report: nothing survived teardown"),
        "{out}"
    );
    assert!(out.contains("== census of live objects =="), "{out}");
    assert!(out.contains("FlatView #0"), "{out}");
    assert!(out.contains("0xdeadbeef OK"), "{out}");
}

// ---- issue 12: what a new user trips over ----------------------------------------

const GUESS_WARNING: &str = "imported without its `info mtree -f` dump";

#[test]
fn cli_flat_lookup_and_diff_without_flat_dump_say_what_was_guessed() {
    let t = oracle("x86_64/pc", "disabled.txt");
    let f = oracle("x86_64/pc", "flat.txt");
    for args in [
        &["flat", &t][..],
        &["lookup", &t, "0xfee00000"],
        &["diff", &t, &t],
    ] {
        let o = run(args);
        assert_ok(&o);
        let err = stderr(&o);
        assert!(err.contains(GUESS_WARNING), "{args:?}: {err}");
        assert!(err.contains("taken as MMIO"), "{args:?}: {err}");
        assert!(err.contains("equal-priority siblings"), "{args:?}: {err}");
        assert!(err.contains("-flat FILE"), "{args:?}: {err}");
    }
    // With the -f dump (each side of a diff has its own) nothing is guessed.
    for args in [
        &["flat", &t, "--qemu-flat", &f][..],
        &["lookup", &t, "--qemu-flat", &f, "0xfee00000"],
        &["diff", &t, &t, "--a-flat", &f, "--b-flat", &f],
    ] {
        let o = run(args);
        assert_ok(&o);
        assert!(
            !stderr(&o).contains(GUESS_WARNING),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    // Machine files are not guesses.
    let pc = format!("{EXAMPLES}pc-like.toml");
    assert!(stderr(&run(&["flat", &pc])).is_empty());
}

#[test]
fn cli_diff_takes_flat_and_owner_dumps_for_each_side() {
    let t = oracle("x86_64/pc", "disabled.txt");
    let f = oracle("x86_64/pc", "flat.txt");
    let ow = oracle("x86_64/pc", "owner.txt");
    let o = run(&["diff", &t, &t, "--a-flat", &f, "--b-flat", &f]);
    assert_ok(&o);
    assert!(stdout(&o).contains("identical"));
    let o = run(&[
        "diff",
        &t,
        &t,
        "--a-flat",
        &f,
        "--b-flat",
        &f,
        "--a-owners",
        &ow,
        "--b-owners",
        &ow,
    ]);
    assert_ok(&o);
    // A -f dump is checked against its own side: a wrong one is FILE:LINE.
    let q = oracle("x86_64/q35", "flat.txt");
    let o = run(&["diff", &t, &t, "--a-flat", &f, "--b-flat", &q]);
    assert_malformed(&o, &q);
}

#[test]
fn cli_empty_blank_and_dev_null_exit_2_at_file_line() {
    let empty = tmp("empty.txt", "");
    let blank = tmp("blank.txt", "\n   \n\t\n");
    let empty_toml = tmp("empty.toml", "");
    for p in [
        empty.to_str().unwrap(),
        blank.to_str().unwrap(),
        empty_toml.to_str().unwrap(),
        "/dev/null",
    ] {
        for cmd in ["flat", "tree", "census"] {
            let o = run(&[cmd, p]);
            assert_malformed(&o, p);
            assert!(stdout(&o).is_empty(), "{cmd} {p}");
            let err = stderr(&o);
            assert!(
                err.contains("empty file") || err.contains("blank file"),
                "{err}"
            );
        }
    }
    let t = oracle("x86_64/pc", "disabled.txt");
    assert_malformed(&run(&["flat", &t, "--qemu-flat", "/dev/null"]), "/dev/null");
}

#[test]
fn cli_flat_dump_given_as_the_tree_says_pass_it_as_qemu_flat() {
    let f = oracle("x86_64/pc", "flat.txt");
    let o = run(&["tree", &f]);
    assert_eq!(assert_malformed(&o, &f), 1);
    assert!(
        stderr(&o).contains("this is an `info mtree -f` dump; pass it as --qemu-flat"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn cli_tree_owners_without_owner_dump_prints_no_invented_owners() {
    let t = oracle("x86_64/pc", "disabled.txt");
    let ow = oracle("x86_64/pc", "owner.txt");
    let o = run(&["tree", "-o", &t]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(
        !out.contains("owner:{") && !out.contains("parent:{"),
        "{out}"
    );
    assert!(stderr(&o).contains("owners are unknown"), "{}", stderr(&o));
    // With the owner dump they are printed as QEMU printed them.
    let o = run(&["tree", "-o", &t, "--qemu-owners", &ow]);
    assert_ok(&o);
    assert_eq!(canon(&stdout(&o)), canon(&read(&ow)));
}

#[test]
fn cli_lookup_numbers_follow_qemus_monitor_and_take_several_queries() {
    let t = oracle("x86_64/pc", "disabled.txt");
    let f = oracle("x86_64/pc", "flat.txt");
    // Bare digits are decimal: 1000 is 0x3e8.
    let o = run(&["lookup", &t, "--qemu-flat", &f, "1000"]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("address 0x00000000000003e8"),
        "{}",
        stdout(&o)
    );
    // Hex digits without 0x are refused, with the fix in the message.
    let o = run(&["lookup", &t, "ff"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("0xff"), "{}", stderr(&o));
    // Several addresses and ranges in one call.
    let o = run(&[
        "lookup",
        &t,
        "--qemu-flat",
        &f,
        "0xfee00000",
        "0xc0000",
        "0xa0000-0xbffff",
        "0xfffc0000+0x40000",
    ]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.contains("served by \"apic-msi\""), "{out}");
    assert!(out.contains("served by \"pc.rom\""), "{out}");
    assert!(
        out.contains("range 0x00000000000a0000-0x00000000000bffff"),
        "{out}"
    );
    assert!(
        out.contains("0000000000000000-00000000000bffff (prio 0, ram): pc.ram @0x0"),
        "{out}"
    );
    assert!(
        out.contains("range 0x00000000fffc0000-0x00000000ffffffff"),
        "{out}"
    );
    assert!(out.contains("): pc.bios"), "{out}");
    // Bad ranges are usage errors.
    for bad in ["0x10-0x1", "0x10+0", "0xffffffffffffffff+2"] {
        assert_eq!(run(&["lookup", &t, bad]).status.code(), Some(2), "{bad}");
    }
    // --help says how numbers are read.
    let help = stdout(&run(&["lookup", "--help"]));
    assert!(help.contains("bare digits are decimal"), "{help}");
}

fn json_of(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

#[test]
fn cli_json_on_tree_flat_lookup_diff_and_census_is_versioned() {
    let t = oracle("x86_64/pc", "disabled.txt");
    let f = oracle("x86_64/pc", "flat.txt");
    let o = run(&["tree", &t, "--qemu-flat", &f, "-D", "--json"]);
    assert_ok(&o);
    let v = json_of(&o);
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["command"], "tree");
    let memory = v["address_spaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["names"].as_array().unwrap().iter().any(|n| n == "memory"))
        .expect("memory");
    assert_eq!(memory["root"]["name"], "system");
    assert_eq!(memory["root"]["last"], "0xffffffffffffffff");
    assert!(v["memory_regions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "pc.ram"));

    let o = run(&["flat", &t, "--qemu-flat", &f, "--json", "--as", "I/O"]);
    assert_ok(&o);
    let v = json_of(&o);
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["guessed"], false);
    let views = v["views"].as_array().unwrap();
    assert_eq!(views.len(), 1);
    assert_eq!(views[0]["address_spaces"][0], "I/O");
    assert!(views[0]["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "rtc-index" && r["start"] == "0x70"));

    let o = run(&[
        "lookup",
        &t,
        "--qemu-flat",
        &f,
        "--json",
        "0xfee00000",
        "0x70-0x71",
    ]);
    assert_ok(&o);
    let v = json_of(&o);
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["results"][0]["served_by"]["name"], "apic-msi");
    assert_eq!(v["results"][0]["served_by"]["offset"], "0x0");
    assert_eq!(v["results"][1]["query"], "range");

    let q = oracle("x86_64/q35", "disabled.txt");
    let o = run(&["diff", &t, &q, "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v = json_of(&o);
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["identical"], false);
    assert!(!v["address_spaces"].as_array().unwrap().is_empty());

    let o = run(&["census", &format!("{EXAMPLES}pc-like.toml"), "--json"]);
    assert_ok(&o);
    let v = json_of(&o);
    assert_eq!(v["schema_version"], 1);
    assert!(v["counts"]["region"].as_u64().unwrap() > 0);
}

#[test]
fn cli_census_dot_draws_the_region_graph() {
    let t = oracle("x86_64/pc", "disabled.txt");
    let o = run(&["census", &t, "--dot"]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.starts_with("digraph memtree {"), "{out}");
    assert!(out.trim_end().ends_with('}'));
    assert!(out.contains("[style=dashed, label=\"alias\"]"));
    assert!(out.contains("[shape=ellipse, label=\"I/O\"]"), "{out}");
    // Every edge names declared nodes.
    let nodes: std::collections::HashSet<&str> = out
        .lines()
        .filter(|l| l.contains(" [") && !l.contains("->"))
        .map(|l| l.trim().split(' ').next().unwrap())
        .collect();
    for l in out.lines().filter(|l| l.contains("->")) {
        let mut it = l.trim().split(' ');
        let (a, _, b) = (
            it.next().unwrap(),
            it.next(),
            it.next().unwrap().trim_end_matches(';'),
        );
        assert!(nodes.contains(a) && nodes.contains(b), "{l}");
    }
}

#[test]
fn cli_tree_and_flat_take_as() {
    let t = oracle("x86_64/pc", "disabled.txt");
    let f = oracle("x86_64/pc", "flat.txt");
    let o = run(&["tree", &t, "--qemu-flat", &f, "--as", "I/O"]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.starts_with("address-space: I/O\n"), "{out}");
    assert!(
        !out.contains("address-space: memory") && !out.contains("memory-region:"),
        "{out}"
    );
    let o = run(&["flat", &t, "--qemu-flat", &f, "--as", "memory"]);
    assert_ok(&o);
    let out = stdout(&o);
    assert_eq!(out.matches("FlatView #").count(), 1, "{out}");
    assert!(out.contains(" AS \"memory\", root: system"));
    let o = run(&["flat", &t, "--as", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no address space named \"nope\""));
}

#[test]
fn cli_completions_for_bash_zsh_and_fish() {
    for (shell, marker) in [
        ("bash", "_memtree"),
        ("zsh", "#compdef memtree"),
        ("fish", "complete -c memtree"),
    ] {
        let o = run(&["completions", shell]);
        assert_ok(&o);
        let out = stdout(&o);
        assert!(out.contains(marker), "{shell}: {out}");
        assert!(out.contains("lookup"), "{shell}");
    }
    assert_eq!(run(&["completions", "tcsh"]).status.code(), Some(2));
}

/// Candidate lines of a lookup listing: (indentation, line).
fn candidate_lines(out: &str) -> Vec<(usize, &str)> {
    out.lines()
        .skip_while(|l| !l.starts_with("candidates covering"))
        .skip(1)
        .filter(|l| {
            l.starts_with("  ")
                && !l.trim_start().starts_with("->")
                && !l.trim_start().starts_with("...")
        })
        .map(|l| (l.len() - l.trim_start().len(), l))
        .collect()
}

#[test]
fn cli_lookup_listing_puts_candidates_under_their_lines_and_counts_the_rest() {
    let t = oracle("x86_64/pc", "disabled.txt");
    let f = oracle("x86_64/pc", "flat.txt");
    for addr in ["0xc0000", "0xa0000", "0xe0000", "0xfee00000"] {
        let short = stdout(&run(&["lookup", &t, "--qemu-flat", &f, addr]));
        let all = stdout(&run(&["lookup", &t, "--qemu-flat", &f, "--all", addr]));
        let shown = candidate_lines(&short);
        // Each line is at most one level below the line above it: a
        // candidate whose parents are hidden is not printed under an
        // unrelated line.
        for w in shown.windows(2) {
            assert!(
                w[1].0 <= w[0].0 + 2,
                "{addr}: {:?} under {:?}\n{short}",
                w[1].1,
                w[0].1
            );
        }
        // The footer counts exactly the candidates not printed.
        let footer: usize = short
            .lines()
            .find_map(|l| {
                l.strip_prefix('(')
                    .and_then(|r| r.split(' ').next()?.parse().ok())
            })
            .unwrap_or(0);
        assert_eq!(
            shown.len() + footer,
            candidate_lines(&all).len(),
            "{addr}\n{short}"
        );
    }
}
