//! vhost-user costs, against `qemu-storage-daemon` (skipped with a message
//! when it is not installed).
//!
//! * `vhost_user_rtt/{memtree,vm_memory}_{read,write}_4k`: one 4 KiB
//!   virtio-blk request, submitted, kicked and waited for (call eventfd),
//!   through the same split-queue driver. `memtree`: guest RAM is a memtree
//!   address space (memfd RAM) and the memory table is kept by
//!   `VhostUserFrontend`; `vm_memory` (the anchor): guest RAM is a plain
//!   rust-vmm `GuestMemoryMmap` over a memfd, the table set once with the
//!   `vhost` crate directly. Same back-end, same image, same driver.
//!   Before them, the medians of 3000 interleaved pairs are printed (the
//!   fairest comparison on a loaded machine).
//! * `vhost_user_driver/{memtree,vm_memory}_request`: the driver's own
//!   guest-memory traffic for one request (chain, avail ring, used ring),
//!   with the bench writing the completion: all memtree can add.
//! * `vhost_user_table/{add,remove}_one/N`: plugging (`add_subregion`) or
//!   unplugging (`del_subregion`) one 64 KiB memfd RAM region while the
//!   back-end's table already holds N regions: the commit, the listener and
//!   the `ADD_MEM_REG` / `REM_MEM_REG` round trip with its acknowledgement.
//!
//! Run: `cargo bench --bench vhost_user -- --warm-up-time 1 --measurement-time 2`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use memtree::integrations::vhost_user::driver::{
    queue_layout, BlkRequest, Buffer, DriverError, DriverMemory, SplitQueue, VirtioBlk, BLK_S_OK,
    VIRTIO_BLK_F_FLUSH, VIRTIO_F_VERSION_1,
};
use memtree::integrations::vhost_user::{FrontendOptions, VhostUserFrontend};
use memtree::{AddressSpace, Memory, RamBacking};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend as _, VhostUserProtocolFeatures};
use vhost::{VhostBackend as _, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const QSD: &str = "/usr/bin/qemu-storage-daemon";
const RAM: u64 = 16 << 20;
const QUEUE: u64 = 0x1000;
const SCRATCH: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const T: Duration = Duration::from_secs(10);

struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    fn start() -> Option<Daemon> {
        if !Path::new(QSD).exists() {
            eprintln!("vhost_user bench skipped: {QSD} is not installed (package qemu-utils)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("memtree-vhost-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Two images, one export each (an export serves one front-end):
        // the memtree front-end and the anchor run side by side in the
        // same daemon.
        let mut cmd = Command::new(QSD);
        for i in 0..2 {
            let img = dir.join(format!("disk{i}.img"));
            File::create(&img).unwrap().set_len(64 << 20).unwrap();
            cmd.arg("--blockdev")
                .arg(format!("driver=file,node-name=disk{i},filename={}", img.display()))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e{i},node-name=disk{i},addr.type=unix,addr.path={},writable=on,num-queues=1",
                    dir.join(format!("sock{i}")).display()
                ));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let d = Daemon { child, dir };
        let deadline = Instant::now() + T;
        while !(d.socket(0).exists() && d.socket(1).exists()) {
            assert!(Instant::now() < deadline, "no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(d)
    }

    fn socket(&self, i: u32) -> PathBuf {
        self.dir.join(format!("sock{i}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The anchor's guest memory: a plain vm-memory `GuestMemoryMmap`.
struct Plain(GuestMemoryMmap);

impl DriverMemory for Plain {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DriverError> {
        self.0
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| DriverError::Memory {
                gpa,
                len: buf.len(),
            })
    }
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), DriverError> {
        self.0
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| DriverError::Memory {
                gpa,
                len: buf.len(),
            })
    }
}

fn memtree_rig(
    d: &Daemon,
) -> (
    Memory,
    Arc<VhostUserFrontend>,
    VirtioBlk<AddressSpace>,
    memtree::RegionId,
) {
    let memory = Memory::new();
    let system = memory.new_container("system", 1 << 40, None).unwrap();
    let ram = memory
        .new_ram_with("pc.ram", u128::from(RAM), None, RamBacking::Memfd)
        .unwrap();
    memory.add_subregion(system, 0, ram).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    let opts = FrontendOptions {
        virtio_features: VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH,
        ..FrontendOptions::default()
    };
    let fe = VhostUserFrontend::connect(&memory, &d.socket(0), "qsd", opts).unwrap();
    memory.register_listener(sid, fe.clone()).unwrap();
    fe.check().unwrap();
    let layout = queue_layout(QUEUE, 128);
    let q = SplitQueue::new(space, layout).unwrap();
    fe.setup_vring(0, &layout, q.kick_fd(), q.call_fd())
        .unwrap();
    (memory, fe, VirtioBlk::new(q, SCRATCH), system)
}

fn plain_rig(d: &Daemon) -> (Frontend, VirtioBlk<Plain>, File) {
    let fd = rustix::fs::memfd_create("anchor", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let file = File::from(fd);
    file.set_len(RAM).unwrap();
    let region = vm_memory::GuestRegionMmap::new(
        vm_memory::MmapRegion::from_file(
            vm_memory::FileOffset::new(file.try_clone().unwrap(), 0),
            RAM as usize,
        )
        .unwrap(),
        GuestAddress(0),
    )
    .unwrap();
    let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let mut fe = Frontend::connect(d.socket(1), 1).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let proto = fe.get_protocol_features().unwrap()
        & (VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::CONFIG);
    fe.set_protocol_features(proto).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_features((features & (VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH)) | (1 << 30))
        .unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: RAM,
        userspace_addr: host,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    }])
    .unwrap();
    let layout = queue_layout(QUEUE, 128);
    let q = SplitQueue::new(Plain(mem), layout).unwrap();
    fe.set_vring_num(0, 128).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 128,
            queue_size: 128,
            flags: 0,
            desc_table_addr: host + layout.desc,
            used_ring_addr: host + layout.used,
            avail_ring_addr: host + layout.avail,
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_kick(0, q.kick_fd()).unwrap();
    fe.set_vring_call(0, q.call_fd()).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    (fe, VirtioBlk::new(q, SCRATCH), file)
}

/// One request's guest-memory traffic on the driver side: a 3-descriptor
/// chain made available, the device's completion written to the used ring,
/// and the completion taken.
fn driver_round<M: DriverMemory>(q: &mut SplitQueue<M>) {
    let bufs = [
        Buffer {
            gpa: SCRATCH + 0x8000,
            len: 16,
            device_writes: false,
        },
        Buffer {
            gpa: DATA,
            len: 4096,
            device_writes: true,
        },
        Buffer {
            gpa: SCRATCH + 0x9000,
            len: 1,
            device_writes: true,
        },
    ];
    let head = q.add(&bufs).unwrap();
    // The device's side: used element, then used index.
    let used = q.addrs().used;
    let mut idx = [0u8; 2];
    q.memory().read(used + 2, &mut idx).unwrap();
    let i = u16::from_le_bytes(idx);
    let slot = u64::from(i % q.addrs().size);
    let mut elem = u32::from(head).to_le_bytes().to_vec();
    elem.extend_from_slice(&4097u32.to_le_bytes());
    q.memory().write(used + 4 + 8 * slot, &elem).unwrap();
    q.memory()
        .write(used + 2, &i.wrapping_add(1).to_le_bytes())
        .unwrap();
    assert_eq!(q.poll_used().unwrap(), Some((head, 4097)));
}

fn bench(c: &mut Criterion) {
    let Some(d) = Daemon::start() else {
        return;
    };
    let read = BlkRequest::Read {
        sector: 64,
        gpa: DATA,
        len: 4096,
    };
    let write = BlkRequest::Write {
        sector: 128,
        gpa: DATA,
        len: 4096,
    };
    // Both rigs live at once and each timed request is followed by an
    // untimed one of the other kind, so both see the same load on the
    // machine (the figures are compared with each other, not across runs).
    let (memory, fe, mut mt, system) = memtree_rig(&d);
    let (_plain_fe, mut vm, _file) = plain_rig(&d);
    // Medians of interleaved pairs: robust to a loaded machine.
    for (name, req) in [("read_4k", read), ("write_4k", write)] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..3000 {
            let t = Instant::now();
            assert_eq!(mt.run(req, T).unwrap(), BLK_S_OK);
            a.push(t.elapsed());
            let t = Instant::now();
            assert_eq!(vm.run(req, T).unwrap(), BLK_S_OK);
            b.push(t.elapsed());
        }
        a.sort();
        b.sort();
        let (ma, mb) = (a[a.len() / 2], b[b.len() / 2]);
        eprintln!(
            "vhost_user_rtt {name}: median of 3000 interleaved pairs: memtree {ma:?}, vm-memory {mb:?}, ratio {:.3}",
            ma.as_secs_f64() / mb.as_secs_f64()
        );
    }
    let mut g = c.benchmark_group("vhost_user_rtt");
    for (name, req) in [("read_4k", read), ("write_4k", write)] {
        g.bench_function(format!("memtree_{name}"), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    assert_eq!(mt.run(req, T).unwrap(), BLK_S_OK);
                    spent += t.elapsed();
                    assert_eq!(vm.run(req, T).unwrap(), BLK_S_OK);
                }
                spent
            })
        });
        g.bench_function(format!("vm_memory_{name}"), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    assert_eq!(mt.run(req, T).unwrap(), BLK_S_OK);
                    let t = Instant::now();
                    assert_eq!(vm.run(req, T).unwrap(), BLK_S_OK);
                    spent += t.elapsed();
                }
                spent
            })
        });
    }
    g.finish();

    // What the driver itself costs per request on each memory (no
    // back-end: the bench completes the request in the used ring itself),
    // i.e. everything memtree could add to a round trip.
    // Queues of their own (no device attached), in the same memories.
    let mut g = c.benchmark_group("vhost_user_driver");
    let spare = queue_layout(0x4000, 128);
    let mut q = SplitQueue::new(mt.queue().memory().clone(), spare).unwrap();
    g.bench_function("memtree_request", |b| b.iter(|| driver_round(&mut q)));
    let mut q = SplitQueue::new(vm.queue().memory(), spare).unwrap();
    g.bench_function("vm_memory_request", |b| b.iter(|| driver_round(&mut q)));
    g.finish();

    let mut g = c.benchmark_group("vhost_user_table");
    let max = fe.max_mem_slots();
    let mut plugged = 1u64; // pc.ram
    let probe = memory
        .new_ram_with("probe", 1 << 16, None, RamBacking::Memfd)
        .unwrap();
    let probe_at = 0x100_0000_0000u64 - (1 << 16);
    for n in [1u64, 16, 64] {
        if n + 1 > max {
            eprintln!("table size {n} skipped: the back-end has {max} slots");
            continue;
        }
        while plugged < n {
            let r = memory
                .new_ram_with(
                    &format!("filler{plugged}"),
                    1 << 16,
                    None,
                    RamBacking::Memfd,
                )
                .unwrap();
            memory
                .add_subregion(system, 0x10_0000_0000 + plugged * 0x100_0000, r)
                .unwrap();
            plugged += 1;
        }
        fe.check().unwrap();
        assert_eq!(fe.table().len() as u64, n);
        g.bench_with_input(BenchmarkId::new("add_one", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    memory.add_subregion(system, probe_at, probe).unwrap();
                    spent += t.elapsed();
                    memory.del_subregion(system, probe).unwrap();
                }
                spent
            })
        });
        g.bench_with_input(BenchmarkId::new("remove_one", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    memory.add_subregion(system, probe_at, probe).unwrap();
                    let t = Instant::now();
                    memory.del_subregion(system, probe).unwrap();
                    spent += t.elapsed();
                }
                spent
            })
        });
        fe.check().unwrap();
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = bench
}
criterion_main!(benches);
