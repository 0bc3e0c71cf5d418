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
        let cfg = migration::ReceiveConfig {
            move_pages: true,
            ..Default::default()
        };
        let got = migration::receive_with(rx, rx_space, &out[..], &cfg).unwrap();
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

/// What happens to the machines while a migration runs: layout edits on
/// either side, global tracking shared with other users, and the
/// receiver's own dirty-log clients (adversarial review R1-R6).
mod during_migration {
    use std::io::{Read, Write};

    use memtree::migration::{self, MigrationError, SendConfig};
    use memtree::{DirtyClient, MemTxAttrs, Memory, SpaceId};

    const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;
    const SIZE: u64 = 256 * 1024;

    fn machine() -> (Memory, SpaceId) {
        let memory = Memory::new();
        let root = memory.new_container("system", 1 << 40, None).unwrap();
        let r = memory.new_ram("ram0", u128::from(SIZE), None).unwrap();
        memory.add_subregion(root, 0, r).unwrap();
        let space = memory.new_address_space("memory", root, None).unwrap();
        (memory, space)
    }

    fn stream_of(memory: &Memory, space: SpaceId) -> (Vec<u8>, Vec<(String, u64)>) {
        let mut out = Vec::new();
        let s = migration::send(memory, space, &mut out, &SendConfig::default(), |_| {}).unwrap();
        (out, s.checksums)
    }

    /// Calls `f` once after `at` bytes were read.
    struct ReadHook<'a, R> {
        inner: R,
        n: usize,
        at: usize,
        f: Option<Box<dyn FnOnce() + 'a>>,
    }
    impl<R: Read> Read for ReadHook<'_, R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.n >= self.at {
                if let Some(f) = self.f.take() {
                    f();
                }
            }
            let k = buf.len().min(4096);
            let got = self.inner.read(&mut buf[..k])?;
            self.n += got;
            Ok(got)
        }
    }

    /// Runs `f` once after `at` bytes were written.
    struct WriteHook<'a, W> {
        inner: W,
        n: usize,
        at: usize,
        f: Option<Box<dyn FnOnce() + 'a>>,
    }
    impl<W: Write> Write for WriteHook<'_, W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let got = self.inner.write(buf)?;
            self.n += got;
            if self.n >= self.at {
                if let Some(f) = self.f.take() {
                    f();
                }
            }
            Ok(got)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }

    /// R1: the import is a write to RAM like any other: a display (VGA)
    /// watching the region learns its memory changed.
    #[test]
    fn receive_marks_the_import_dirty_for_region_clients() {
        let (src, ss) = machine();
        let h = src.address_space(ss).unwrap();
        assert!(h.write(0x1000, &[0xaa; 4096], A).is_ok());
        let (stream, _) = stream_of(&src, ss);

        let (dst, ds) = machine();
        let r = dst.find_region("ram0").unwrap();
        dst.set_log(r, DirtyClient::VGA, true).unwrap();
        let _ = dst
            .snapshot_and_clear_dirty(r, 0, SIZE, DirtyClient::VGA)
            .unwrap();
        migration::receive(&dst, ds, &stream[..]).unwrap();
        assert!(
            dst.get_dirty(r, 0x1000, 4096, DirtyClient::VGA).unwrap(),
            "page 1 changed by the import but is not dirty for VGA"
        );
    }

    /// R1: a machine that receives while it is itself globally tracked
    /// (chained migration, dirty-rate sampling) reports the import.
    #[test]
    fn receive_marks_the_import_dirty_for_global_tracking() {
        let (src, ss) = machine();
        let h = src.address_space(ss).unwrap();
        assert!(h.write(0x1000, &[0xaa; 4096], A).is_ok());
        let (stream, _) = stream_of(&src, ss);
        let (dst, ds) = machine();
        dst.global_dirty_log_start().unwrap();
        let _ = dst.take_dirty_ram(ds, DirtyClient::MIGRATION).unwrap();
        migration::receive(&dst, ds, &stream[..]).unwrap();
        let d = dst.take_dirty_ram(ds, DirtyClient::MIGRATION).unwrap();
        let n: u64 = d.iter().map(|r| r.dirty.count()).sum();
        assert_eq!(n, SIZE / 4096, "every imported page is dirty for MIGRATION");
    }

    /// R2: a region replaced while the stream is read (same name, size and
    /// address) is not the region the import was prepared for: `receive`
    /// fails rather than report a verified import the RAM does not hold.
    #[test]
    fn receive_fails_when_a_region_is_replaced_mid_stream() {
        let (src, ss) = machine();
        let h = src.address_space(ss).unwrap();
        assert!(h.write(0x1000, &[0xaa; 4096], A).is_ok());
        let (stream, sums) = stream_of(&src, ss);

        let (dst, ds) = machine();
        let root = dst.find_region("system").unwrap();
        let old = dst.find_region("ram0").unwrap();
        let d = &dst;
        let input = ReadHook {
            inner: &stream[..],
            n: 0,
            at: 100,
            f: Some(Box::new(move || {
                d.del_subregion(root, old).unwrap();
                let new = d.new_ram("ram0", u128::from(SIZE), None).unwrap();
                d.add_subregion(root, 0, new).unwrap();
            })),
        };
        let res = migration::receive(&dst, ds, input);
        assert!(
            matches!(res, Err(MigrationError::LayoutMismatch(_))),
            "{res:?}"
        );
        assert_ne!(migration::checksums(&dst, ds).unwrap(), sums);
    }

    /// R2: a region shrunk while the stream is read: the commit must not
    /// write the old, larger size over what follows it in its block.
    #[test]
    fn receive_fails_when_a_region_shrinks_mid_stream() {
        let (src, ss) = machine();
        let h = src.address_space(ss).unwrap();
        assert!(h.write(0, &[0xaa; SIZE as usize], A).is_ok());
        let (stream, _) = stream_of(&src, ss);

        let (dst, ds) = machine();
        let r = dst.find_region("ram0").unwrap();
        let d = &dst;
        let input = ReadHook {
            inner: &stream[..],
            n: 0,
            at: 100,
            f: Some(Box::new(move || {
                d.set_size(r, u128::from(SIZE / 2)).unwrap();
            })),
        };
        let res = migration::receive(&dst, ds, input);
        assert!(
            matches!(res, Err(MigrationError::LayoutMismatch(_))),
            "{res:?}"
        );
        let mut b = [0u8; 16];
        let hd = dst.address_space(ds).unwrap();
        assert!(hd.read(0, &mut b, A).is_ok());
        assert_eq!(b, [0; 16], "the machine's RAM changed");
    }

    /// R3a: global tracking is counted: a user that started it before the
    /// migration still has it when `send` returns.
    #[test]
    fn send_leaves_global_tracking_another_user_started() {
        let (src, ss) = machine();
        src.global_dirty_log_start().unwrap(); // another user
        let _ = stream_of(&src, ss);
        assert!(
            src.global_dirty_log(),
            "send stopped global tracking that another user started"
        );
        src.global_dirty_log_stop().unwrap();
        assert!(!src.global_dirty_log());
    }

    /// R3b: tracking stopped by anyone during the migration means writes
    /// went unseen: `send` fails instead of letting the receiver accept a
    /// stale import.
    #[test]
    fn send_fails_when_tracking_is_lost_mid_migration() {
        let (src, ss) = machine();
        let h = src.address_space(ss).unwrap();
        assert!(h.write(0, &[0x55; SIZE as usize], A).is_ok());
        let s = &src;
        let mut out = WriteHook {
            inner: Vec::new(),
            n: 0,
            at: 64,
            f: Some(Box::new(move || {
                s.global_dirty_log_stop().unwrap(); // an unmatched stop
                assert!(h.write(0x2000, b"late write", A).is_ok());
            })),
        };
        let res = migration::send(&src, ss, &mut out, &SendConfig::default(), |_| {});
        assert!(matches!(res, Err(MigrationError::TrackingLost)), "{res:?}");
        let (dst, ds) = machine();
        assert!(
            migration::receive(&dst, ds, &out.inner[..]).is_err(),
            "the receiver accepted a stream its sender failed"
        );
    }

    /// R3b (optional verification): with `verify_memory_at_stop`, the
    /// `DONE` checksums are computed from the paused source's memory, so a
    /// page whose last write the stream missed fails the import.
    #[test]
    fn memory_checksum_at_stop_matches_a_clean_import() {
        let (src, ss) = machine();
        let h = src.address_space(ss).unwrap();
        assert!(h.write(0x3000, &[7; 9000], A).is_ok());
        let mut out = Vec::new();
        let cfg = SendConfig {
            verify_memory_at_stop: true,
            ..SendConfig::default()
        };
        let st = migration::send(&src, ss, &mut out, &cfg, |_| {}).unwrap();
        assert_eq!(st.checksums, migration::checksums(&src, ss).unwrap());
        let (dst, ds) = machine();
        migration::receive(&dst, ds, &out[..]).unwrap();
        assert_eq!(
            migration::checksums(&dst, ds).unwrap(),
            migration::checksums(&src, ss).unwrap()
        );
    }

    /// R6: RAM plugged or resized while `send` runs is not silently left
    /// behind: the migration fails (QEMU's `ram_mig_ram_block_resized`).
    #[test]
    fn send_fails_when_ram_is_plugged_or_resized_mid_migration() {
        let memory = Memory::new();
        let root = memory.new_container("system", 1 << 40, None).unwrap();
        let be = memory
            .new_backend("be", 2 * SIZE, memtree::RamBacking::Anonymous)
            .unwrap();
        let r = memory
            .new_ram_from_backend("ram0", &be, 0, u128::from(SIZE), None)
            .unwrap();
        memory.add_subregion(root, 0, r).unwrap();
        let ss = memory.new_address_space("memory", root, None).unwrap();
        let h = memory.address_space(ss).unwrap();
        assert!(h.write(0, &[0x55; SIZE as usize], A).is_ok());
        for plug in [false, true] {
            let m = &memory;
            let mut out = WriteHook {
                inner: Vec::new(),
                n: 0,
                at: 64,
                f: Some(Box::new(move || {
                    if plug {
                        let dimm = m.new_ram("dimm", u128::from(SIZE), None).unwrap();
                        m.add_subregion(root, 1 << 30, dimm).unwrap();
                    } else {
                        m.set_size(r, u128::from(2 * SIZE)).unwrap();
                    }
                })),
            };
            let res = migration::send(&memory, ss, &mut out, &SendConfig::default(), |_| {});
            assert!(
                matches!(res, Err(MigrationError::LayoutMismatch(_))),
                "plug {plug}: {res:?}"
            );
            assert!(!memory.global_dirty_log());
        }
    }

    /// R4: a cancel during the stop-and-copy round (a receiver stalling
    /// while the source is paused) is honoured: the source is resumed and
    /// the sender returns `Cancelled`.
    #[test]
    fn cancel_in_the_stop_and_copy_round_resumes_the_source() {
        let (src, ss) = machine();
        let h = src.address_space(ss).unwrap();
        let cfg = SendConfig::default();
        let cancel = cfg.cancel.clone();
        let mut pauses = Vec::new();
        let mut out = Vec::new();
        let res = migration::send(&src, ss, &mut out, &cfg, |on| {
            pauses.push(on);
            if on {
                // The last write before the writers stopped, then the cancel.
                assert!(h.write(0x4000, b"last", A).is_ok());
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
        assert!(matches!(res, Err(MigrationError::Cancelled)), "{res:?}");
        assert_eq!(pauses, [true, false]);
        assert!(!src.global_dirty_log());
        let (dst, ds) = machine();
        assert!(matches!(
            migration::receive(&dst, ds, &out[..]),
            Err(MigrationError::Cancelled)
        ));
    }

    /// R10: the copy path (memfd RAM, what vhost-user back-ends map)
    /// copies the pages received with contents and zeroes the rest without
    /// populating them: a sparse import into a 16 MiB memfd costs its
    /// non-zero pages, and stale contents of the receiver's are gone.
    #[test]
    #[cfg_attr(miri, ignore = "memfd, fallocate")]
    fn a_sparse_copy_into_memfd_ram_populates_only_its_non_zero_pages() {
        use std::os::unix::fs::MetadataExt;
        const BIG: u64 = 16 << 20;
        let mk = || {
            let memory = Memory::new();
            let root = memory.new_container("system", 1 << 40, None).unwrap();
            let be = memory
                .new_backend("be", BIG, memtree::RamBacking::Memfd)
                .unwrap();
            let r = memory
                .new_ram_from_backend("ram0", &be, 0, u128::from(BIG), None)
                .unwrap();
            memory.add_subregion(root, 0, r).unwrap();
            let s = memory.new_address_space("memory", root, None).unwrap();
            (memory, s, be)
        };
        let (src, ss, _) = mk();
        let h = src.address_space(ss).unwrap();
        for i in 0..8u64 {
            assert!(h.write(i << 20, &[i as u8 + 1; 100], A).is_ok());
        }
        let (stream, _) = stream_of(&src, ss);
        let (dst, ds, be) = mk();
        let hd = dst.address_space(ds).unwrap();
        // Stale contents where the source has zeros.
        assert!(hd.write(0x80_0000, &[0xee; 3 * 4096], A).is_ok());
        let st = migration::receive(&dst, ds, &stream[..]).unwrap();
        assert_eq!(st.swapped, 0);
        // Measured before anything reads the memory (reading a hole of a
        // memfd allocates it).
        let fd = be.block().fd().unwrap().try_clone_to_owned().unwrap();
        let allocated = std::fs::File::from(fd).metadata().unwrap().blocks() * 512;
        assert!(
            allocated <= 64 * 4096,
            "8 non-zero pages received, {allocated} bytes of the memfd populated"
        );
        assert_eq!(
            migration::checksums(&dst, ds).unwrap(),
            migration::checksums(&src, ss).unwrap()
        );
    }

    /// R4: a receiver can be cancelled: it stops before the next record
    /// and leaves the machine as it was.
    #[test]
    fn a_cancelled_receive_leaves_the_machine_unchanged() {
        let (src, ss) = machine();
        let h = src.address_space(ss).unwrap();
        assert!(h.write(0, &[3; 8192], A).is_ok());
        let (stream, _) = stream_of(&src, ss);
        let (dst, ds) = machine();
        let cfg = migration::ReceiveConfig::default();
        let cancel = cfg.cancel.clone();
        let input = ReadHook {
            inner: &stream[..],
            n: 0,
            at: 100,
            f: Some(Box::new(move || {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed)
            })),
        };
        let res = migration::receive_with(&dst, ds, input, &cfg);
        assert!(matches!(res, Err(MigrationError::Cancelled)), "{res:?}");
        let mut b = [0u8; 8];
        assert!(dst.address_space(ds).unwrap().read(0, &mut b, A).is_ok());
        assert_eq!(b, [0; 8]);
    }

    /// R4: a stalled sender does not block `receive` for ever when the
    /// stream has a read timeout: the receive fails with the I/O error.
    #[test]
    fn receive_fails_on_a_stalled_sender_with_a_read_timeout() {
        let (src, ss) = machine();
        let (stream, _) = stream_of(&src, ss);
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        a.write_all(&stream[..stream.len() / 2]).unwrap();
        let t = std::thread::spawn(move || {
            let (dst, ds) = machine();
            migration::receive(&dst, ds, b)
        });
        let started = std::time::Instant::now();
        while !t.is_finished() && started.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let done = t.is_finished();
        drop(a);
        let res = t.join().unwrap();
        assert!(done, "receive still blocked 5 s after the sender stalled");
        assert!(matches!(res, Err(MigrationError::Io(_))), "{res:?}");
    }
}
