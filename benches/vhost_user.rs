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
use memtree::vhost_user::driver::{
    queue_layout, BlkRequest, DriverError, DriverMemory, SplitQueue, VirtioBlk, BLK_S_OK,
    VIRTIO_BLK_F_FLUSH, VIRTIO_F_VERSION_1,
};
use memtree::vhost_user::{FrontendOptions, VhostUserFrontend};
use memtree::{AddressSpace, Memory, RamBacking};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend as _, VhostUserProtocolFeatures};
use vhost::{VhostBackend as _, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

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
        let img = dir.join("disk.img");
        File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let sock = dir.join("sock");
        let child = Command::new(QSD)
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=disk,filename={}", img.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues=1",
                sock.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + T;
        while !sock.exists() {
            assert!(Instant::now() < deadline, "no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Daemon { child, dir })
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("sock")
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
        .new_ram_with("pc.ram", RAM, None, RamBacking::Memfd)
        .unwrap();
    memory.add_subregion(system, 0, ram).unwrap();
    let sid = memory.new_address_space("memory", system, None).unwrap();
    let space = memory.address_space(sid).unwrap();
    let opts = FrontendOptions {
        virtio_features: VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH,
        ..FrontendOptions::default()
    };
    let fe = VhostUserFrontend::connect(&memory, &d.socket(), "qsd", opts).unwrap();
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
    let mut fe = Frontend::connect(d.socket(), 1).unwrap();
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
    let mut g = c.benchmark_group("vhost_user_rtt");
    {
        let (_memory, _fe, mut blk, _) = memtree_rig(&d);
        g.bench_function("memtree_read_4k", |b| {
            b.iter(|| assert_eq!(blk.run(read, T).unwrap(), BLK_S_OK))
        });
        g.bench_function("memtree_write_4k", |b| {
            b.iter(|| assert_eq!(blk.run(write, T).unwrap(), BLK_S_OK))
        });
    }
    {
        let (_fe, mut blk, _file) = plain_rig(&d);
        g.bench_function("vm_memory_read_4k", |b| {
            b.iter(|| assert_eq!(blk.run(read, T).unwrap(), BLK_S_OK))
        });
        g.bench_function("vm_memory_write_4k", |b| {
            b.iter(|| assert_eq!(blk.run(write, T).unwrap(), BLK_S_OK))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("vhost_user_table");
    let (memory, fe, _blk, system) = memtree_rig(&d);
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
