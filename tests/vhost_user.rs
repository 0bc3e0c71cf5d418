//! memtree as a vhost-user front-end, against QEMU's own vhost-user-blk
//! back-end (`qemu-storage-daemon`) and against a fake back-end feeding bad
//! input. Tests needing the daemon are skipped (with a message) when it is
//! not installed, unless `CI` is set, in which case they fail.
#![cfg(all(feature = "vhost-user", target_os = "linux"))]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memtree::integrations::vhost_user::driver::{
    queue_bytes, queue_layout, BlkRequest, SplitQueue, VirtioBlk, BLK_S_IOERR, BLK_S_OK,
    VIRTIO_BLK_F_FLUSH, VIRTIO_F_VERSION_1,
};
use memtree::integrations::vhost_user::{
    FrontendEvent, FrontendOptions, VhostUserError, VhostUserFrontend,
};
use memtree::{AddressSpace, Memory, RamBacking};
use std::io::Write;

const QSD: &str = "/usr/bin/qemu-storage-daemon";
const IMAGE_SIZE: u64 = 64 << 20;
const BLOCK: u32 = 4096;
const TIMEOUT: Duration = Duration::from_secs(10);

// ---- harness ----------------------------------------------------------------

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "memtree-vhost-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running qemu-storage-daemon exporting a raw image; killed and reaped
/// on drop, however the test ends.
struct Daemon {
    child: Option<Child>,
    image: PathBuf,
    socket: PathBuf,
    _dir: TempDir,
}

impl Daemon {
    /// Starts the daemon on a fresh zeroed image, or `None` (skip) if the
    /// binary is absent and `CI` is not set.
    fn start(tag: &str, extra: &[&str]) -> Option<Daemon> {
        // `QEMU_STORAGE_DAEMON` overrides the path (e.g. to check the skip).
        let qsd = std::env::var("QEMU_STORAGE_DAEMON").unwrap_or_else(|_| QSD.to_owned());
        if !Path::new(&qsd).exists() {
            if std::env::var_os("CI").is_some() {
                panic!("{qsd} is missing on CI (install the qemu-utils package)");
            }
            eprintln!("skipped: {qsd} is not installed (Debian package qemu-utils)");
            return None;
        }
        let dir = TempDir::new(tag);
        let image = dir.0.join("disk.img");
        let socket = dir.0.join("vhost.sock");
        File::create(&image).unwrap().set_len(IMAGE_SIZE).unwrap();
        let mut args: Vec<String> = vec![
            "--blockdev".into(),
            format!("driver=file,node-name=file0,filename={}", image.display()),
        ];
        let mut node = "file0";
        if !extra.is_empty() {
            args.extend(extra.iter().map(|s| s.to_string()));
            node = "disk";
        }
        args.push("--export".into());
        args.push(format!(
            "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={},writable=on",
            socket.display()
        ));
        let child = Command::new(&qsd)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut d = Daemon {
            child: Some(child),
            image,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + TIMEOUT;
        while !d.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not create its socket"
            );
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("qemu-storage-daemon exited at start: {st}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(d)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Whether the daemon is still running.
    fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = File::open(&self.image).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut v = vec![0; len];
        f.read_exact(&mut v).unwrap();
        v
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// xorshift64*: deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const RAM_SIZE: u64 = 16 << 20;
const QUEUE_BASE: u64 = 0x1000;
const QUEUE_SIZE: u16 = 128;
const SCRATCH: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;

/// A machine with 16 MiB of memfd RAM at 0 (owned by "board"), a
/// front-end attached to the daemon and a virtio-blk driver on queue 0.
struct Rig {
    memory: Memory,
    space: AddressSpace,
    system: memtree::RegionId,
    fe: Arc<VhostUserFrontend>,
    listener: memtree::ListenerId,
    blk: VirtioBlk<AddressSpace>,
}

fn rig(d: &Daemon) -> Rig {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 40, None).unwrap();
    let board = memory.new_owner("board", None).unwrap();
    let ram = memory
        .new_ram_with(
            "pc.ram",
            u128::from(RAM_SIZE),
            Some(board),
            RamBacking::Memfd,
        )
        .unwrap();
    memory.add_subregion(system, 0, ram).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    let opts = FrontendOptions {
        virtio_features: VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH,
        timeout: Duration::from_secs(5),
        queues: 1,
    };
    let fe = VhostUserFrontend::connect(&memory, &d.socket, "qsd", opts).unwrap();
    let listener = memory.register_listener(sid, fe.clone()).unwrap();
    fe.check().unwrap();
    assert_eq!(fe.table().len(), 1, "{:?}", fe.table());
    let layout = queue_layout(QUEUE_BASE, QUEUE_SIZE);
    assert!(QUEUE_BASE + queue_bytes(QUEUE_SIZE) <= SCRATCH);
    let queue = SplitQueue::new(space.clone(), layout).unwrap();
    fe.setup_vring(0, &layout, queue.kick_fd(), queue.call_fd())
        .unwrap();
    let blk = VirtioBlk::new(queue, SCRATCH);
    Rig {
        memory,
        space,
        system,
        fe,
        listener,
        blk,
    }
}

fn write_guest(space: &AddressSpace, gpa: u64, data: &[u8]) {
    assert!(space
        .write(gpa, data, memtree::MemTxAttrs::UNSPECIFIED)
        .is_ok());
}

fn read_guest(space: &AddressSpace, gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    assert!(space
        .read(gpa, &mut v, memtree::MemTxAttrs::UNSPECIFIED)
        .is_ok());
    v
}

/// Detaches the front-end and tears the machine down; asserts a clean leak
/// report.
fn finish(rig: Rig) {
    let Rig {
        memory,
        space,
        fe,
        listener,
        blk,
        ..
    } = rig;
    drop(blk);
    drop(space);
    let _ = memory.unregister_listener(listener);
    drop(fe);
    let report = memory.teardown();
    assert!(report.is_clean(), "{report}");
}

// ---- tests --------------------------------------------------------------------

#[test]
fn vhost_user_blk_roundtrip() {
    let Some(d) = Daemon::start("roundtrip", &[]) else {
        return;
    };
    let mut rig = rig(&d);
    // The device configuration: capacity in 512-byte sectors.
    let cfg = rig.fe.get_config(0, 8).unwrap();
    let capacity = u64::from_le_bytes(cfg[..8].try_into().unwrap());
    assert_eq!(capacity, IMAGE_SIZE / 512);
    assert!(rig.fe.acked_features() & VIRTIO_BLK_F_FLUSH != 0);

    // 1,000 distinct random blocks.
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let nblocks = IMAGE_SIZE / u64::from(BLOCK);
    let mut order: Vec<u64> = (0..nblocks).collect();
    for i in (1..order.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let blocks: Vec<u64> = order[..1000].to_vec();
    let mut contents: Vec<Vec<u8>> = Vec::new();
    const BATCH: usize = 32;
    for chunk in blocks.chunks(BATCH) {
        for (i, &b) in chunk.iter().enumerate() {
            let mut data = vec![0u8; BLOCK as usize];
            rng.fill(&mut data);
            let gpa = DATA + (i as u64) * u64::from(BLOCK);
            write_guest(&rig.space, gpa, &data);
            rig.blk
                .submit(BlkRequest::Write {
                    sector: b * u64::from(BLOCK) / 512,
                    gpa,
                    len: BLOCK,
                })
                .unwrap();
            contents.push(data);
        }
        rig.blk.notify().unwrap();
        for _ in chunk {
            assert_eq!(rig.blk.wait(TIMEOUT).unwrap().status, BLK_S_OK);
        }
    }
    // Read back through the virtqueue.
    for (ci, chunk) in blocks.chunks(BATCH).enumerate() {
        for (i, &b) in chunk.iter().enumerate() {
            let gpa = DATA + (i as u64) * u64::from(BLOCK);
            write_guest(&rig.space, gpa, &[0u8; BLOCK as usize]);
            rig.blk
                .submit(BlkRequest::Read {
                    sector: b * u64::from(BLOCK) / 512,
                    gpa,
                    len: BLOCK,
                })
                .unwrap();
        }
        rig.blk.notify().unwrap();
        for _ in chunk {
            assert_eq!(rig.blk.wait(TIMEOUT).unwrap().status, BLK_S_OK);
        }
        for (i, _) in chunk.iter().enumerate() {
            let gpa = DATA + (i as u64) * u64::from(BLOCK);
            let got = read_guest(&rig.space, gpa, BLOCK as usize);
            assert!(
                got == contents[ci * BATCH + i],
                "block {} read back differs",
                ci * BATCH + i
            );
        }
    }
    assert_eq!(rig.blk.run(BlkRequest::Flush, TIMEOUT).unwrap(), BLK_S_OK);
    // The image file on disk holds exactly what the guest wrote.
    for (i, &b) in blocks.iter().enumerate() {
        let on_disk = d.image_bytes(b * u64::from(BLOCK), BLOCK as usize);
        assert!(on_disk == contents[i], "block {b} on disk differs");
    }
    rig.fe.check().unwrap();
    // Stopping the ring returns where the back-end stopped: after the
    // 1,000 writes, 1,000 reads and the flush.
    assert_eq!(rig.fe.stop_vring(0).unwrap(), 2001);
    finish(rig);
}

/// A throttled export (4 MiB/s), so that a request of a few MiB stays in
/// flight for a while.
const THROTTLE: &[&str] = &[
    "--object",
    r#"{"qom-type":"throttle-group","id":"tg0","limits":{"bps-total":4194304}}"#,
    "--blockdev",
    "driver=throttle,node-name=disk,throttle-group=tg0,file=file0",
];

const DIMM_GPA: u64 = 0x1_0000_0000;
const DIMM_SIZE: u64 = 4 << 20;

#[test]
fn vhost_user_hotplug_ram() {
    let Some(mut d) = Daemon::start("hotplug", THROTTLE) else {
        return;
    };
    let mut rig = rig(&d);
    let census = rig.memory.census().clone();
    // Plug a DIMM while the back-end runs: it enters the back-end's table.
    let dimm = rig.memory.new_owner("dimm0", None).unwrap();
    let dimm_ram = rig
        .memory
        .new_ram_with(
            "dimm0.ram",
            u128::from(DIMM_SIZE),
            Some(dimm),
            RamBacking::Memfd,
        )
        .unwrap();
    rig.memory
        .add_subregion(rig.system, DIMM_GPA, dimm_ram)
        .unwrap();
    rig.fe.check().unwrap();
    let table = rig.fe.table();
    assert_eq!(table.len(), 2, "{table:?}");
    let entry = table
        .iter()
        .find(|t| t.region == "dimm0.ram")
        .unwrap()
        .clone();
    assert_eq!((entry.gpa, entry.size), (DIMM_GPA, DIMM_SIZE));
    let mem_key = entry.memory;
    let why = census.explain(mem_key);
    assert!(
        why.iter()
            .any(|l| l.starts_with("held by vhost-user back-end") && l.contains("\"qsd\"")),
        "{why:?}"
    );

    // Request buffers in the DIMM: the back-end serves them.
    let mut rng = Rng(7);
    let mut data = vec![0u8; 8192];
    rng.fill(&mut data);
    write_guest(&rig.space, DIMM_GPA, &data);
    let st = rig
        .blk
        .run(
            BlkRequest::Write {
                sector: 0,
                gpa: DIMM_GPA,
                len: 8192,
            },
            TIMEOUT,
        )
        .unwrap();
    assert_eq!(st, BLK_S_OK);
    let st = rig
        .blk
        .run(
            BlkRequest::Read {
                sector: 0,
                gpa: DIMM_GPA + 0x10000,
                len: 8192,
            },
            TIMEOUT,
        )
        .unwrap();
    assert_eq!(st, BLK_S_OK);
    assert!(read_guest(&rig.space, DIMM_GPA + 0x10000, 8192) == data);

    // Watch the removal: between REM_MEM_REG and its acknowledgement the
    // memory is alive and the census says the back-end holds it.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let (seen, census) = (seen.clone(), census.clone());
        rig.fe
            .set_observer(Some(Arc::new(move |ev: &FrontendEvent| {
                let mut s = seen.lock().unwrap();
                match ev {
                    FrontendEvent::Removing(r) if r.memory == mem_key => {
                        s.push(format!("removing live={}", census.is_live(mem_key)));
                        for l in census.explain(mem_key) {
                            s.push(format!("  {l}"));
                        }
                    }
                    FrontendEvent::Removed { region, acked } if region.memory == mem_key => {
                        let held = census
                            .explain(mem_key)
                            .iter()
                            .any(|l| l.starts_with("held by vhost-user back-end"));
                        s.push(format!(
                            "removed acked={acked} live={} held-by-back-end={held}",
                            census.is_live(mem_key)
                        ));
                    }
                    _ => {}
                }
            })));
    }

    // Requests using the DIMM in flight (throttled: the later ones wait in
    // the back-end), then unplug.
    let mut tags = Vec::new();
    for i in 0..3u64 {
        tags.push(
            rig.blk
                .submit(BlkRequest::Write {
                    sector: 2048 + i * 2048,
                    gpa: DIMM_GPA + i * (1 << 20),
                    len: 1 << 20,
                })
                .unwrap(),
        );
    }
    rig.blk.notify().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let report = rig.memory.unplug(dimm).unwrap();
    assert_eq!(report.owners, vec!["dimm0".to_owned()]);
    // The acknowledgement came inside the unplug; the memory went after it.
    assert!(
        !census.is_live(mem_key),
        "DIMM memory still alive after unplug"
    );
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 3, "{seen:?}");
    assert_eq!(seen[0], "removing live=true", "{seen:?}");
    assert!(
        seen[1..seen.len() - 1]
            .iter()
            .any(|l| l.contains("held by vhost-user back-end") && l.contains("dimm0.ram")),
        "{seen:?}"
    );
    // At the acknowledgement the back-end's hold is still declared; it
    // goes right after.
    assert_eq!(
        seen.last().unwrap(),
        "removed acked=true live=true held-by-back-end=true",
        "{seen:?}"
    );
    assert_eq!(rig.fe.table().len(), 1);

    // The in-flight requests complete, or fail with an I/O error from the
    // back-end; neither process crashes.
    let mut statuses = Vec::new();
    for _ in &tags {
        let c = rig.blk.wait(TIMEOUT).unwrap();
        statuses.push(c.status);
    }
    eprintln!("in-flight requests over the unplugged DIMM ended with status {statuses:?}");
    assert!(
        statuses.iter().all(|&s| s == BLK_S_OK || s == BLK_S_IOERR),
        "{statuses:?}"
    );
    assert!(d.alive(), "qemu-storage-daemon died");
    rig.fe.check().unwrap();
    // The device still works on the remaining RAM.
    write_guest(&rig.space, DATA, &data);
    let st = rig
        .blk
        .run(
            BlkRequest::Write {
                sector: 16,
                gpa: DATA,
                len: 8192,
            },
            TIMEOUT,
        )
        .unwrap();
    assert_eq!(st, BLK_S_OK);
    assert!(d.image_bytes(16 * 512, 8192) == data);
    // The back-end really dropped the old DIMM: new RAM plugged at the same
    // address is what it serves now.
    let dimm2 = rig.memory.new_owner("dimm2", None).unwrap();
    let r2 = rig
        .memory
        .new_ram_with(
            "dimm2.ram",
            u128::from(DIMM_SIZE),
            Some(dimm2),
            RamBacking::Memfd,
        )
        .unwrap();
    rig.memory.add_subregion(rig.system, DIMM_GPA, r2).unwrap();
    rig.fe.check().unwrap();
    let mut fresh = vec![0u8; 8192];
    rng.fill(&mut fresh);
    write_guest(&rig.space, DIMM_GPA, &fresh);
    let st = rig
        .blk
        .run(
            BlkRequest::Write {
                sector: 32,
                gpa: DIMM_GPA,
                len: 8192,
            },
            TIMEOUT,
        )
        .unwrap();
    assert_eq!(st, BLK_S_OK);
    assert!(
        d.image_bytes(32 * 512, 8192) == fresh,
        "the back-end served stale memory"
    );
    finish(rig);
}

#[test]
fn vhost_user_backend_dies() {
    let Some(mut d) = Daemon::start("dies", THROTTLE) else {
        return;
    };
    let mut rig = rig(&d);
    let census = rig.memory.census().clone();
    let ram_key = rig.fe.table()[0].memory;
    assert!(rig.fe.census_key().is_some());
    // Requests in flight (the later ones throttled), then the back-end dies.
    for i in 0..3u64 {
        rig.blk
            .submit(BlkRequest::Write {
                sector: i * 2048,
                gpa: DATA + i * (1 << 20),
                len: 1 << 20,
            })
            .unwrap();
    }
    rig.blk.notify().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let pid = d.pid();
    d.kill();
    eprintln!("killed qemu-storage-daemon {pid}");
    // The driver does not hang: what completed before the kill is
    // returned, then a timeout.
    let mut outcome = Ok(());
    for _ in 0..3 {
        if let Err(e) = rig.blk.wait(Duration::from_millis(500)) {
            outcome = Err(e);
            break;
        }
    }
    assert!(
        outcome.is_err(),
        "every throttled request completed before the kill"
    );
    // The front-end reports the death and drops everything the back-end held.
    let err = rig.fe.check().unwrap_err();
    assert!(matches!(err, VhostUserError::Disconnected { .. }), "{err}");
    assert!(matches!(rig.fe.check(), Err(VhostUserError::Broken { .. })));
    assert!(rig.fe.table().is_empty());
    assert!(rig.fe.census_key().is_none());
    assert!(census
        .explain(ram_key)
        .iter()
        .all(|l| !l.contains("vhost-user")));
    // Later requests fail at once, memory edits do not hang.
    assert!(rig.fe.get_config(0, 8).is_err());
    let dimm = rig.memory.new_owner("dimm1", None).unwrap();
    let r = rig
        .memory
        .new_ram_with("dimm1.ram", 1 << 20, Some(dimm), RamBacking::Memfd)
        .unwrap();
    rig.memory.add_subregion(rig.system, DIMM_GPA, r).unwrap();
    rig.memory.unplug(dimm).unwrap();
    assert!(rig.fe.table().is_empty());
    finish(rig);
}

// ---- a fake back-end feeding bad input -----------------------------------------

const GET_FEATURES: u32 = 1;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_CONFIG: u32 = 24;
const GET_MAX_MEM_SLOTS: u32 = 36;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;
const SET_MEM_TABLE: u32 = 5;

/// What the fake back-end does with one request.
enum Act {
    /// What a correct back-end does.
    Normal,
    /// Sends these bytes instead.
    Raw(Vec<u8>),
    /// Acknowledges with this status.
    Ack(u64),
    /// Closes the socket.
    Close,
    /// Never answers (keeps the socket open until the front-end closes it).
    Silent,
}

fn header(req: u32, size: u32) -> Vec<u8> {
    let mut v = req.to_le_bytes().to_vec();
    v.extend_from_slice(&0x5u32.to_le_bytes()); // version 1, reply
    v.extend_from_slice(&size.to_le_bytes());
    v
}

fn reply_u64(req: u32, value: u64) -> Vec<u8> {
    let mut v = header(req, 8);
    v.extend_from_slice(&value.to_le_bytes());
    v
}

/// Runs a fake back-end on a socket pair; `policy` chooses what it does with
/// each request (by code). Returns the front-end's end and the requests the
/// fake has seen.
fn fake_backend(
    mut policy: impl FnMut(u32) -> Act + Send + 'static,
) -> (UnixStream, Arc<Mutex<Vec<u32>>>) {
    let (front, mut back) = UnixStream::pair().unwrap();
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || loop {
        let mut hdr = [0u8; 12];
        if back.read_exact(&mut hdr).is_err() {
            return;
        }
        let req = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        let mut body = vec![0u8; size];
        if back.read_exact(&mut body).is_err() {
            return;
        }
        log.lock().unwrap().push(req);
        let out = match policy(req) {
            Act::Normal => match req {
                // VERSION_1 | PROTOCOL_FEATURES
                GET_FEATURES => reply_u64(req, (1 << 32) | (1 << 30)),
                // REPLY_ACK | CONFIG | CONFIGURE_MEM_SLOTS
                GET_PROTOCOL_FEATURES => reply_u64(req, 0x8 | 0x200 | 0x8000),
                GET_MAX_MEM_SLOTS => reply_u64(req, 2),
                GET_CONFIG => {
                    let mut v = header(req, size as u32);
                    v.extend_from_slice(&body);
                    v
                }
                _ if flags & 0x8 != 0 => reply_u64(req, 0),
                _ => Vec::new(),
            },
            Act::Raw(bytes) => bytes,
            Act::Ack(v) => reply_u64(req, v),
            Act::Close => return,
            Act::Silent => {
                let mut sink = [0u8; 256];
                while matches!(back.read(&mut sink), Ok(n) if n > 0) {}
                return;
            }
        };
        if back.write_all(&out).is_err() {
            return;
        }
    });
    (front, seen)
}

fn quick() -> FrontendOptions {
    FrontendOptions {
        timeout: Duration::from_millis(300),
        ..FrontendOptions::default()
    }
}

#[test]
fn vhost_user_bad_backend_input_is_an_error() {
    let memory = Memory::new();
    let connect = |policy: Box<dyn FnMut(u32) -> Act + Send>| {
        let (sock, _) = fake_backend(policy);
        let started = Instant::now();
        let r = VhostUserFrontend::from_stream(&memory, sock, "fake", quick());
        assert!(started.elapsed() < Duration::from_secs(3), "hung");
        r.map(|_| ())
    };
    // A reply naming another request.
    let e = connect(Box::new(|req| match req {
        GET_FEATURES => Act::Raw(reply_u64(GET_PROTOCOL_FEATURES, 1 << 30)),
        _ => Act::Normal,
    }))
    .unwrap_err();
    assert!(
        matches!(e, VhostUserError::BadReply { ref request, .. } if request == "GET_FEATURES"),
        "{e}"
    );
    // A header with an invalid version / flags.
    let e = connect(Box::new(|req| match req {
        GET_FEATURES => {
            let mut v = reply_u64(req, 1 << 30);
            v[4] = 0xff;
            Act::Raw(v)
        }
        _ => Act::Normal,
    }))
    .unwrap_err();
    assert!(matches!(e, VhostUserError::BadReply { .. }), "{e}");
    // An unexpected message: a request (not a reply) where a reply belongs.
    let e = connect(Box::new(|req| match req {
        GET_PROTOCOL_FEATURES => {
            let mut v = reply_u64(ADD_MEM_REG, 0);
            v[4] = 0x1;
            Act::Raw(v)
        }
        _ => Act::Normal,
    }))
    .unwrap_err();
    assert!(matches!(e, VhostUserError::BadReply { .. }), "{e}");
    // A short read: half a reply, then the socket closes.
    let e = connect(Box::new(|req| match req {
        GET_FEATURES => Act::Raw(reply_u64(req, 1 << 30)[..7].to_vec()),
        GET_PROTOCOL_FEATURES => Act::Close,
        _ => Act::Normal,
    }))
    .unwrap_err();
    assert!(
        matches!(
            e,
            VhostUserError::Disconnected { .. } | VhostUserError::Timeout { .. }
        ),
        "{e}"
    );
    // A closed socket.
    let e = connect(Box::new(|_| Act::Close)).unwrap_err();
    assert!(matches!(e, VhostUserError::Disconnected { .. }), "{e}");
    // A back-end that never answers: a timeout, not a hang.
    let e = connect(Box::new(|req| match req {
        GET_FEATURES => Act::Silent,
        _ => Act::Normal,
    }))
    .unwrap_err();
    assert!(matches!(e, VhostUserError::Timeout { .. }), "{e}");
    // Missing protocol features are named.
    let e = connect(Box::new(|req| match req {
        GET_PROTOCOL_FEATURES => Act::Ack(0x8),
        _ => Act::Normal,
    }))
    .unwrap_err();
    assert!(e.to_string().contains("CONFIGURE_MEM_SLOTS"), "{e}");
    // A GET_CONFIG reply of the wrong size.
    let (sock, _) = fake_backend(|req| match req {
        GET_CONFIG => {
            let mut v = header(req, 12 + 4);
            v.extend_from_slice(&[0u8; 16]);
            Act::Raw(v)
        }
        _ => Act::Normal,
    });
    let fe = VhostUserFrontend::from_stream(&memory, sock, "fake", quick()).unwrap();
    // Bad arguments are refused before anything is sent.
    assert!(matches!(
        fe.get_config(0, u32::MAX),
        Err(VhostUserError::Invalid(_))
    ));
    assert!(matches!(
        fe.get_config(0, 0),
        Err(VhostUserError::Invalid(_))
    ));
    assert!(fe.is_connected());
    assert!(fe.get_config(0, 8).is_err());
    assert!(matches!(
        fe.get_config(0, 8),
        Err(VhostUserError::Broken { .. })
    ));
    drop(fe);
    assert!(memory.teardown().is_clean());
}

#[test]
fn vhost_user_table_errors_are_reported_never_silent() {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 40, None).unwrap();
    let ram = memory
        .new_ram_with("pc.ram", 1 << 20, None, RamBacking::Memfd)
        .unwrap();
    memory.add_subregion(system, 0, ram).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let refuse_adds = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let garbage_rem = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refuse_rems = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ra, gr, rr) = (
        refuse_adds.clone(),
        garbage_rem.clone(),
        refuse_rems.clone(),
    );
    let (sock, seen) = fake_backend(move |req| match req {
        ADD_MEM_REG if ra.load(Ordering::SeqCst) => Act::Ack(1),
        REM_MEM_REG if rr.load(Ordering::SeqCst) => Act::Ack(1),
        REM_MEM_REG if gr.load(Ordering::SeqCst) => Act::Raw(vec![0xde; 5]),
        _ => Act::Normal,
    });
    let fe = VhostUserFrontend::from_stream(&memory, sock, "fake", quick()).unwrap();
    assert_eq!(fe.max_mem_slots(), 2);
    let listener = memory.register_listener(sid, fe.clone()).unwrap();
    fe.check().unwrap();
    assert!(seen.lock().unwrap().contains(&SET_MEM_TABLE));
    assert_eq!(fe.table().len(), 1);

    // Anonymous RAM cannot be shared: an error naming the region.
    let anon = memory.new_ram("anon.ram", 1 << 20, None).unwrap();
    memory.add_subregion(system, 0x10_0000, anon).unwrap();
    let e = fe.check().unwrap_err();
    assert!(
        matches!(e, VhostUserError::NotShareable { ref region, .. } if region == "anon.ram"),
        "{e}"
    );
    // The second slot takes one more region; a third is over the limit.
    let d1 = memory.new_owner("d1", None).unwrap();
    let r1 = memory
        .new_ram_with("d1.ram", 1 << 20, Some(d1), RamBacking::Memfd)
        .unwrap();
    memory.add_subregion(system, 0x20_0000, r1).unwrap();
    fe.check().unwrap();
    let d2 = memory.new_owner("d2", None).unwrap();
    let r2 = memory
        .new_ram_with("d2.ram", 1 << 20, Some(d2), RamBacking::Memfd)
        .unwrap();
    memory.add_subregion(system, 0x30_0000, r2).unwrap();
    let e = fe.check().unwrap_err();
    assert!(
        matches!(e, VhostUserError::SlotsExhausted { max: 2, ref region, .. } if region == "d2.ram"),
        "{e}"
    );
    memory.unplug(d2).unwrap();
    fe.check().unwrap();
    // The back-end refuses an add: recorded, the table unchanged.
    memory.unplug(d1).unwrap();
    refuse_adds.store(true, Ordering::SeqCst);
    let d3 = memory.new_owner("d3", None).unwrap();
    let r3 = memory
        .new_ram_with("d3.ram", 1 << 20, Some(d3), RamBacking::Memfd)
        .unwrap();
    memory.add_subregion(system, 0x40_0000, r3).unwrap();
    let e = fe.check().unwrap_err();
    assert!(matches!(e, VhostUserError::Refused { .. }), "{e}");
    assert_eq!(fe.table().len(), 1);
    memory.unplug(d3).unwrap();
    refuse_adds.store(false, Ordering::SeqCst);
    // The back-end refuses a removal: it may still map the memory, so the
    // front-end keeps holding it (and the census says so) after the unplug.
    let d4 = memory.new_owner("d4", None).unwrap();
    let r4 = memory
        .new_ram_with("d4.ram", 1 << 20, Some(d4), RamBacking::Memfd)
        .unwrap();
    memory.add_subregion(system, 0x50_0000, r4).unwrap();
    fe.check().unwrap();
    let d4_key = fe
        .table()
        .iter()
        .find(|t| t.region == "d4.ram")
        .unwrap()
        .memory;
    refuse_rems.store(true, Ordering::SeqCst);
    memory.unplug(d4).unwrap();
    let e = fe.check().unwrap_err();
    assert!(
        matches!(e, VhostUserError::Refused { ref request, .. } if request.starts_with("REM_MEM_REG d4.ram")),
        "{e}"
    );
    assert_eq!(fe.stuck().len(), 1);
    let census = memory.census().clone();
    assert!(census.is_live(d4_key));
    let why = census.explain(d4_key);
    assert!(
        why.len() == 1
            && why[0].starts_with("held by vhost-user back-end")
            && why[0].contains("\"fake\""),
        "{why:?}"
    );
    refuse_rems.store(false, Ordering::SeqCst);
    // A garbage acknowledgement of a removal: the connection ends, every
    // hold is released, the commit does not hang.
    garbage_rem.store(true, Ordering::SeqCst);
    let started = Instant::now();
    memory.del_subregion(system, ram).unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    let e = fe.check().unwrap_err();
    assert!(
        matches!(
            e,
            VhostUserError::BadReply { .. }
                | VhostUserError::Disconnected { .. }
                | VhostUserError::Timeout { .. }
        ),
        "{e}"
    );
    assert!(fe.table().is_empty());
    assert!(fe.stuck().is_empty());
    assert!(fe.census_key().is_none());
    assert!(
        !census.is_live(d4_key),
        "refused memory not released with the connection"
    );
    memory.unregister_listener(listener).unwrap();
    drop(fe);
    let report = memory.teardown();
    assert!(report.is_clean(), "{report}");
}

#[test]
fn vhost_user_first_table_beyond_one_message_and_the_slot_limit() {
    // Ten RAM ranges at registration: eight go in SET_MEM_TABLE (one fd
    // each), the rest with ADD_MEM_REG, up to the back-end's nine slots;
    // the tenth is refused with an error naming it.
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 40, None).unwrap();
    for i in 0..10u64 {
        let r = memory
            .new_ram_with(&format!("ram{i}"), 1 << 16, None, RamBacking::Memfd)
            .unwrap();
        memory.add_subregion(system, i << 20, r).unwrap();
    }
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let (sock, seen) = fake_backend(|req| match req {
        GET_MAX_MEM_SLOTS => Act::Raw(reply_u64(req, 9)),
        _ => Act::Normal,
    });
    let fe = VhostUserFrontend::from_stream(&memory, sock, "fake", quick()).unwrap();
    let listener = memory.register_listener(sid, fe.clone()).unwrap();
    let e = fe.check().unwrap_err();
    assert!(
        matches!(e, VhostUserError::SlotsExhausted { max: 9, ref region, .. } if region == "ram9"),
        "{e}"
    );
    fe.check().unwrap();
    let table = fe.table();
    assert_eq!(table.len(), 9);
    assert_eq!(table[8].region, "ram8");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.iter().filter(|&&r| r == SET_MEM_TABLE).count(), 1);
    assert_eq!(seen.iter().filter(|&&r| r == ADD_MEM_REG).count(), 1);
    // Unregistering removes every entry (REM_MEM_REG each) and the census
    // entry goes with the last.
    memory.unregister_listener(listener).unwrap();
    assert!(fe.table().is_empty());
    assert!(fe.census_key().is_none());
    drop(fe);
    let report = memory.teardown();
    assert!(report.is_clean(), "{report}");
}

#[test]
fn vhost_user_silent_backend_does_not_hang_a_commit() {
    // The back-end stops answering at the first removal: the unplug (a
    // commit, writer lock held) returns after one timeout, the error comes
    // from the next front-end call, and nothing is left held.
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 40, None).unwrap();
    let ram = memory
        .new_ram_with("pc.ram", 1 << 20, None, RamBacking::Memfd)
        .unwrap();
    memory.add_subregion(system, 0, ram).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let (sock, _) = fake_backend(|req| match req {
        REM_MEM_REG => Act::Silent,
        _ => Act::Normal,
    });
    let fe = VhostUserFrontend::from_stream(&memory, sock, "mute", quick()).unwrap();
    memory.register_listener(sid, fe.clone()).unwrap();
    let dimm = memory.new_owner("dimm", None).unwrap();
    let r = memory
        .new_ram_with("dimm.ram", 1 << 20, Some(dimm), RamBacking::Memfd)
        .unwrap();
    memory.add_subregion(system, 1 << 30, r).unwrap();
    fe.check().unwrap();
    assert_eq!(fe.table().len(), 2);
    let started = Instant::now();
    memory.unplug(dimm).unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "unplug took {took:?}");
    let e = fe.check().unwrap_err();
    assert!(
        matches!(e, VhostUserError::Timeout { ref request, .. } if request.starts_with("REM_MEM_REG dimm.ram")),
        "{e}"
    );
    assert!(matches!(fe.check(), Err(VhostUserError::Broken { .. })));
    assert!(fe.table().is_empty());
    assert!(fe.census_key().is_none());
    drop(fe);
    let report = memory.teardown();
    assert!(report.is_clean(), "{report}");
}
