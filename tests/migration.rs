//! Live migration of RAM (`memtree::migration`): between two processes over
//! a Unix socket while writers run, and a receiver fed broken streams.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use memtree::migration::{self, MigrationError, SendConfig};
use memtree::{Endian, MemTxAttrs, Memory, SpaceId};

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;
const MIB: u64 = 1 << 20;
const CHILD_ENV: &str = "MEMTREE_MIGRATION_CHILD_SOCKET";

/// The machine both sides build: `total` bytes of RAM in four regions
/// (plus an MMIO-free hole between them), region `i` at `i * 1 GiB`.
fn machine(total: u64) -> (Memory, SpaceId) {
    let memory = Memory::new();
    let root = memory.new_container("system", 1 << 40, None).unwrap();
    for i in 0..4u64 {
        let r = memory
            .new_ram(&format!("ram{i}"), u128::from(total / 4), None)
            .unwrap();
        memory.add_subregion(root, i << 30, r).unwrap();
    }
    let space = memory.new_address_space("memory", root, None).unwrap();
    (memory, space)
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Not a test of its own: the receiving process of
/// `migrate_two_processes` (runs only when that test spawns it).
#[test]
fn migration_child_receiver() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let total: u64 = std::env::var("MEMTREE_MIGRATION_BYTES")
        .unwrap()
        .parse()
        .unwrap();
    let (memory, space) = machine(total);
    let stream = UnixStream::connect(path).unwrap();
    let stats = migration::receive(&memory, space, stream).expect("receive");
    println!("RECEIVED rounds={} records={}", stats.rounds, stats.records);
    for (name, sum) in migration::checksums(&memory, space).unwrap() {
        println!("CHECKSUM {name} {sum:016x}");
    }
}

#[test]
fn migrate_two_processes() {
    let total: u64 = std::env::var("MEMTREE_MIGRATION_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        // 1 GiB in an optimised build (`cargo test --release`); a debug
        // build copies and checksums about 50x slower, so it moves 64 MiB
        // (and its writers write 10x slower) to stay within seconds.
        .unwrap_or(if cfg!(debug_assertions) {
            64 << 20
        } else {
            1 << 30
        });
    let pause_between_writes = if cfg!(debug_assertions) { 10 } else { 1 };
    let dir = std::env::temp_dir().join(format!("memtree-migrate-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let sock = dir.join("sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "migration_child_receiver",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &sock)
        .env("MEMTREE_MIGRATION_BYTES", total.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (stream, _) = listener.accept().unwrap();

    let (memory, space) = machine(total);
    let h = memory.address_space(space).unwrap();
    // Some contents before the migration starts: one word every 64 KiB.
    for i in 0..4u64 {
        for off in (0..total / 4).step_by(64 * 1024) {
            assert!(h
                .store::<u64>((i << 30) + off, off ^ i, Endian::Little, A)
                .is_ok());
        }
    }
    // Two writers dirty random pages until told to stop; `gate` pauses them.
    let gate = Arc::new(RwLock::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let (h, gate, stop, writes) = (h.clone(), gate.clone(), stop.clone(), writes.clone());
            std::thread::spawn(move || {
                let mut s = 0x9e37_79b9_7f4a_7c15 ^ (t + 1);
                while !stop.load(Ordering::Relaxed) {
                    let _g = gate.read().unwrap();
                    for _ in 0..16 {
                        let r = xorshift(&mut s) % 4;
                        let off = xorshift(&mut s) % (total / 4 - 8);
                        assert!(h
                            .store::<u64>((r << 30) + off, s, Endian::Little, A)
                            .is_ok());
                    }
                    writes.fetch_add(16, Ordering::Relaxed);
                    drop(_g);
                    // About 16k random writes per second per writer
                    // (1.6k in a debug build).
                    std::thread::sleep(std::time::Duration::from_millis(pause_between_writes));
                }
            })
        })
        .collect();

    let mut paused = None;
    let cfg = SendConfig {
        stop_threshold_pages: 256,
        max_rounds: 10,
        ..SendConfig::default()
    };
    // The source stays stopped once the migration completed (as QEMU's
    // does): `pause(false)` ends the downtime but the writers stay paused
    // until the sender's memory was checksummed at the stop.
    let stats = migration::send(&memory, space, &stream, &cfg, |on| {
        if on {
            paused = Some(gate.write().unwrap());
        }
    })
    .expect("send");
    drop(stream);
    let t = std::time::Instant::now();
    let at_stop = migration::checksums(&memory, space).unwrap();
    let verify = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    drop(paused);
    for w in writers {
        w.join().unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "receiver failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let theirs: Vec<(String, u64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("CHECKSUM "))
        .map(|l| {
            let (n, c) = l.split_once(' ').unwrap();
            (n.to_owned(), u64::from_str_radix(c, 16).unwrap())
        })
        .collect();
    println!(
        "migrate_two_processes: {} MiB in 4 regions, {} writes during the migration; \
         rounds {} (pages per round {:?}), pages sent {} + {} zero pages, {} MiB on the \
         wire, downtime {:?}, total {:?}; independent checksum of the sender's memory \
         at the stop (after the downtime) {:?}",
        total / MIB,
        writes.load(Ordering::Relaxed),
        stats.rounds,
        stats.pages_per_round,
        stats.pages_sent,
        stats.zero_pages,
        stats.bytes / MIB,
        stats.downtime,
        stats.total,
        verify
    );
    assert!(
        stats.rounds >= 2,
        "at least one pre-copy round and the stop"
    );
    assert_eq!(theirs.len(), 4, "{text}");
    assert_eq!(theirs, at_stop, "receiver equals sender at the stop");
    assert_eq!(
        stats.checksums, at_stop,
        "what was sent is the sender's memory at the stop"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A complete stream of a small machine with some contents.
fn small_stream() -> (Vec<u8>, Vec<(String, u64)>) {
    let (memory, space) = machine(4 * 64 * 1024);
    let h = memory.address_space(space).unwrap();
    for i in 0..4u64 {
        assert!(h.write(i << 30, &[i as u8 + 1; 5000], A).is_ok());
    }
    let mut out = Vec::new();
    let stats = migration::send(&memory, space, &mut out, &SendConfig::default(), |_| {}).unwrap();
    (out, stats.checksums)
}

/// The receiver's contents, to check it was left as it was.
fn fresh_receiver() -> (Memory, SpaceId, Vec<(String, u64)>) {
    let (memory, space) = machine(4 * 64 * 1024);
    let h = memory.address_space(space).unwrap();
    assert!(h.write(0x10, b"receiver's own data", A).is_ok());
    let before = migration::checksums(&memory, space).unwrap();
    (memory, space, before)
}

#[test]
fn receiver_rejects_truncated_and_corrupted_streams_and_keeps_its_memory() {
    let (stream, sums) = small_stream();
    // The complete stream imports.
    let (memory, space, _) = fresh_receiver();
    migration::receive(&memory, space, &stream[..]).unwrap();
    assert_eq!(migration::checksums(&memory, space).unwrap(), sums);

    let (memory, space, before) = fresh_receiver();
    let check = |r: Result<migration::ReceiveStats, MigrationError>| -> String {
        let e = r.expect_err("a broken stream must fail");
        assert_eq!(migration::checksums(&memory, space).unwrap(), before);
        e.to_string()
    };
    // Truncated anywhere: in the header, a record, the end.
    for cut in [
        0,
        5,
        20,
        stream.len() / 3,
        stream.len() / 2,
        stream.len() - 1,
    ] {
        let e = check(migration::receive(&memory, space, &stream[..cut]));
        assert!(e.contains("truncated"), "cut {cut}: {e}");
    }
    // Every byte position class corrupted: header, page data, records, end.
    let mut rng = 0x1234_5678u64;
    for _ in 0..200 {
        let at = (xorshift(&mut rng) % stream.len() as u64) as usize;
        let mut bad = stream.clone();
        bad[at] ^= 1 << (xorshift(&mut rng) % 8);
        let e = check(migration::receive(&memory, space, &bad[..]));
        assert!(
            e.contains("corrupt")
                || e.contains("magic")
                || e.contains("version")
                || e.contains("page size")
                || e.contains("layout")
                || e.contains("truncated")
                || e.contains("checksum"),
            "flip at {at}: {e}"
        );
    }
    // Specific mismatches.
    let mut bad = stream.clone();
    bad[0] = b'X';
    assert!(check(migration::receive(&memory, space, &bad[..])).contains("magic"));
    let mut bad = stream.clone();
    bad[8..12].copy_from_slice(&9u32.to_le_bytes());
    assert!(check(migration::receive(&memory, space, &bad[..])).contains("version 9"));
    let mut bad = stream.clone();
    bad[12..16].copy_from_slice(&8192u32.to_le_bytes());
    assert!(check(migration::receive(&memory, space, &bad[..])).contains("page size mismatch"));
    // A different layout on the receiving side.
    let (other, other_space) = machine(4 * 128 * 1024);
    let e = migration::receive(&other, other_space, &stream[..]).unwrap_err();
    assert!(matches!(e, MigrationError::LayoutMismatch(_)), "{e}");
    // Garbage.
    assert!(check(migration::receive(&memory, space, &[0u8; 4096][..])).contains("magic"));
}

#[test]
fn a_cancelled_sender_stops_tracking_and_the_receiver_reports_it() {
    let (memory, space) = machine(4 * 64 * 1024);
    let cfg = SendConfig::default();
    cfg.cancel.store(true, Ordering::Relaxed);
    let mut out = Vec::new();
    let e =
        migration::send(&memory, space, &mut out, &cfg, |_| panic!("never paused")).unwrap_err();
    assert!(matches!(e, MigrationError::Cancelled));
    assert!(
        !memory.global_dirty_log(),
        "tracking stopped with the sender"
    );
    let (r, rs, before) = fresh_receiver();
    let e = migration::receive(&r, rs, &out[..]).unwrap_err();
    assert!(matches!(e, MigrationError::Cancelled), "{e}");
    assert_eq!(migration::checksums(&r, rs).unwrap(), before);
    // The source still runs and can be migrated afterwards.
    let h = memory.address_space(space).unwrap();
    assert!(h.write(0, b"still running", A).is_ok());
    let mut out = Vec::new();
    migration::send(&memory, space, &mut out, &SendConfig::default(), |_| {}).unwrap();
    migration::receive(&r, rs, &out[..]).unwrap();
}

/// Regions are matched by identity, never by name: two RAM regions both
/// named "ram" (legal in QEMU and memtree) each arrive in their own
/// region, including a page dirtied in the last round; and a receiver
/// whose layout differs (sizes swapped, or a region elsewhere) is a clear
/// layout error that leaves it as it was.
#[test]
fn regions_with_the_same_name_each_migrate_into_their_own() {
    let build = |first: u64, second: u64, second_at: u64| {
        let memory = Memory::new();
        let root = memory.new_container("system", 1 << 40, None).unwrap();
        let a = memory.new_ram("ram", u128::from(first), None).unwrap();
        memory.add_subregion(root, 0, a).unwrap();
        let b = memory.new_ram("ram", u128::from(second), None).unwrap();
        memory.add_subregion(root, second_at, b).unwrap();
        let space = memory.new_address_space("memory", root, None).unwrap();
        (memory, space)
    };
    let (memory, space) = build(128 * 1024, 64 * 1024, 1 << 20);
    let h = memory.address_space(space).unwrap();
    assert!(h.write(0, &[0xaa; 128 * 1024], A).is_ok());
    assert!(h.write(1 << 20, &[0xbb; 64 * 1024], A).is_ok());
    let mut out = Vec::new();
    let stats = migration::send(&memory, space, &mut out, &SendConfig::default(), |on| {
        if on {
            // A write that lands just before the writers stop: it travels
            // in the stop-and-copy round, as a page of the second "ram".
            assert!(h.write((1 << 20) + 2 * 4096, &[0xcc; 16], A).is_ok());
        }
    })
    .unwrap();
    assert!(stats.rounds >= 2);
    // Receivers: anonymous RAM (its memory is replaced by moving the
    // received pages in), and the same layout on memory that cannot be
    // moved (a memfd, and a region at an unaligned offset of a shared
    // backend), which is copied.
    let (rx, rx_space) = build(128 * 1024, 64 * 1024, 1 << 20);
    let copied = {
        let memory = Memory::new();
        let root = memory.new_container("system", 1 << 40, None).unwrap();
        let a = memory
            .new_ram_with("ram", 128 * 1024, None, memtree::RamBacking::Memfd)
            .unwrap();
        memory.add_subregion(root, 0, a).unwrap();
        let backend = memory
            .new_backend("shared", 68 * 1024, memtree::RamBacking::Anonymous)
            .unwrap();
        let b = memory
            .new_ram_from_backend("ram", &backend, 2048, 64 * 1024, None)
            .unwrap();
        memory.add_subregion(root, 1 << 20, b).unwrap();
        let space = memory.new_address_space("memory", root, None).unwrap();
        (memory, space)
    };
    for ((rx, rx_space), moved) in [((&rx, rx_space), 2), ((&copied.0, copied.1), 0)] {
        let got = migration::receive(rx, rx_space, &out[..]).unwrap();
        if cfg!(target_os = "linux") {
            assert_eq!(got.swapped, moved);
        }
        let rh = rx.address_space(rx_space).unwrap();
        for (addr, len) in [(0u64, 128 * 1024usize), (1 << 20, 64 * 1024)] {
            let (mut want, mut got) = (vec![0u8; len], vec![0u8; len]);
            assert!(h.read(addr, &mut want, A).is_ok());
            assert!(rh.read(addr, &mut got, A).is_ok());
            assert!(want == got, "region at {addr:#x} differs after migration");
        }
        assert_eq!(
            migration::checksums(rx, rx_space).unwrap(),
            migration::checksums(&memory, space).unwrap()
        );
        // The received memory is the region's memory: writes land in it.
        assert!(rh.write(5, b"after", A).is_ok());
        let mut b = [0u8; 5];
        assert!(rh.read(5, &mut b, A).is_ok());
        assert_eq!(&b, b"after");
    }
    // Different layouts with the same names: refused before any page.
    for (first, second, at) in [
        (64 * 1024, 128 * 1024, 1 << 20),
        (128 * 1024, 64 * 1024, 2 << 20),
    ] {
        let (other, other_space) = build(first, second, at);
        let before = migration::checksums(&other, other_space).unwrap();
        let e = migration::receive(&other, other_space, &out[..]).unwrap_err();
        assert!(matches!(e, MigrationError::LayoutMismatch(_)), "{e}");
        assert_eq!(migration::checksums(&other, other_space).unwrap(), before);
    }
}

/// The sending side can be cancelled at any round: in the middle of round
/// 1, and between round 1 and the next pre-copy round (while writers keep
/// dirtying pages). Either way the sender returns `Cancelled` and stops
/// tracking, the source keeps running, and the receiver reports the
/// cancellation and keeps its memory.
#[test]
fn a_sender_cancelled_mid_migration_leaves_both_sides_running() {
    /// The stream: sets `cancel` once `after` bytes went through, and
    /// dirties a source page on every write, as a running guest would.
    struct Wire<'a> {
        out: Vec<u8>,
        after: usize,
        cancel: Arc<AtomicBool>,
        source: &'a memtree::AddressSpace,
    }
    impl std::io::Write for Wire<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.out.extend_from_slice(b);
            let at = (self.out.len() as u64 * 4096) % MIB;
            assert!(self.source.write(at, &[7; 8], A).is_ok());
            if self.out.len() >= self.after {
                self.cancel.store(true, Ordering::Relaxed);
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    for after in [MIB as usize, 4 * MIB as usize] {
        let (memory, space) = machine(4 * MIB);
        let h = memory.address_space(space).unwrap();
        for i in 0..4u64 {
            assert!(h.write(i << 30, &[i as u8 + 1; MIB as usize], A).is_ok());
        }
        let cfg = SendConfig {
            stop_threshold_pages: 0,
            ..SendConfig::default()
        };
        let mut wire = Wire {
            out: Vec::new(),
            after,
            cancel: cfg.cancel.clone(),
            source: &h,
        };
        let e = migration::send(&memory, space, &mut wire, &cfg, |_| panic!("never paused"))
            .unwrap_err();
        assert!(matches!(e, MigrationError::Cancelled), "{e}");
        assert!(!memory.global_dirty_log(), "tracking stopped");
        assert!(h.write(0, b"still running", A).is_ok());
        let (r, rs, before) = fresh_receiver_of(4 * MIB);
        let e = migration::receive(&r, rs, &wire.out[..]).unwrap_err();
        assert!(matches!(e, MigrationError::Cancelled), "after {after}: {e}");
        assert_eq!(migration::checksums(&r, rs).unwrap(), before);
    }
}

fn fresh_receiver_of(total: u64) -> (Memory, SpaceId, Vec<(String, u64)>) {
    let (memory, space) = machine(total);
    let h = memory.address_space(space).unwrap();
    assert!(h.write(0x10, b"receiver's own data", A).is_ok());
    let before = migration::checksums(&memory, space).unwrap();
    (memory, space, before)
}
