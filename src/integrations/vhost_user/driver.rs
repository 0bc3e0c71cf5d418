//! The guest side: a virtio split-queue driver and a virtio-blk request
//! layer over guest memory, so that a test (or a VMM without a guest) can
//! drive a vhost-user back-end.
//!
//! The descriptor table, available ring and used ring are placed in guest
//! RAM and touched only through [`DriverMemory`] — for memtree, an
//! [`AddressSpace`]'s `read`/`write`, so every access goes through the
//! published flat view like a guest's would; nothing here holds a pointer
//! into guest memory. All fields are little-endian (virtio 1.0, feature
//! `VIRTIO_F_VERSION_1`). Notifications: the driver writes the kick eventfd
//! after publishing requests and waits on the call eventfd (with a timeout)
//! for completions.
//!
//! The driver trusts nothing the device writes: a used element naming a
//! descriptor that is not the head of an outstanding chain is an error
//! ([`DriverError::BadUsed`]), not a panic.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::access::space::AddressSpace;
use crate::region::attrs::MemTxAttrs;

use super::VringAddrs;

/// `VIRTQ_DESC_F_NEXT`.
const DESC_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE` (the device writes the buffer).
const DESC_WRITE: u16 = 2;

/// `VIRTIO_BLK_T_IN`: read from the disk.
pub const BLK_T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`: write to the disk.
pub const BLK_T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const BLK_T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_S_OK`.
pub const BLK_S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
pub const BLK_S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const BLK_S_UNSUPP: u8 = 2;
/// `VIRTIO_BLK_F_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Errors of the driver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// A guest-memory access failed (nothing there, or not RAM).
    #[error("guest memory access at {gpa:#x}+{len:#x} failed")]
    Memory {
        /// Address.
        gpa: u64,
        /// Length.
        len: usize,
    },
    /// Not enough free descriptors for the chain.
    #[error("queue full: {want} descriptors wanted, {free} free")]
    QueueFull {
        /// Descriptors wanted.
        want: usize,
        /// Descriptors free.
        free: usize,
    },
    /// No completion within the timeout.
    #[error("no completion within {0:?}")]
    Timeout(Duration),
    /// The device returned something that is not an outstanding chain.
    #[error("device returned used element {id} (len {len}), which is not an outstanding request")]
    BadUsed {
        /// The id it named.
        id: u32,
        /// The length it gave.
        len: u32,
    },
    /// An eventfd operation failed.
    #[error("eventfd: {0}")]
    EventFd(String),
    /// A caller's argument is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// Guest memory as the driver sees it.
pub trait DriverMemory {
    /// Reads `buf.len()` bytes at `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DriverError>;
    /// Writes `buf` at `gpa`.
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), DriverError>;
}

impl DriverMemory for AddressSpace {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DriverError> {
        if AddressSpace::read(self, gpa, buf, MemTxAttrs::UNSPECIFIED).is_ok() {
            Ok(())
        } else {
            Err(DriverError::Memory {
                gpa,
                len: buf.len(),
            })
        }
    }
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), DriverError> {
        if AddressSpace::write(self, gpa, buf, MemTxAttrs::UNSPECIFIED).is_ok() {
            Ok(())
        } else {
            Err(DriverError::Memory {
                gpa,
                len: buf.len(),
            })
        }
    }
}

impl<M: DriverMemory + ?Sized> DriverMemory for &M {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DriverError> {
        (**self).read(gpa, buf)
    }
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), DriverError> {
        (**self).write(gpa, buf)
    }
}

/// The split-queue layout at `base` for `size` descriptors: descriptor
/// table, available ring right after it, used ring at the next 4 KiB.
pub fn queue_layout(base: u64, size: u16) -> VringAddrs {
    let n = u64::from(size);
    let desc = base;
    let avail = desc + 16 * n;
    let used = (avail + 6 + 2 * n + 4095) & !4095;
    VringAddrs {
        size,
        desc,
        avail,
        used,
    }
}

/// Bytes a [`queue_layout`] occupies.
pub fn queue_bytes(size: u16) -> u64 {
    let l = queue_layout(0, size);
    l.used + 6 + 8 * u64::from(size)
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (else reads it).
    pub device_writes: bool,
}

/// A split virtqueue in guest memory.
pub struct SplitQueue<M: DriverMemory> {
    mem: M,
    addrs: VringAddrs,
    free: Vec<u16>,
    /// Outstanding chains by head: their descriptors.
    chains: HashMap<u16, Vec<u16>>,
    next_avail: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl<M: DriverMemory> std::fmt::Debug for SplitQueue<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitQueue")
            .field("addrs", &self.addrs)
            .field("outstanding", &self.chains.len())
            .finish()
    }
}

impl<M: DriverMemory> SplitQueue<M> {
    /// A queue at `addrs` (zeroed here), with fresh kick and call eventfds.
    pub fn new(mem: M, addrs: VringAddrs) -> Result<SplitQueue<M>, DriverError> {
        if !addrs.size.is_power_of_two() {
            return Err(DriverError::Invalid(format!(
                "queue size {} is not a power of two",
                addrs.size
            )));
        }
        let n = usize::from(addrs.size);
        mem.write(addrs.desc, &vec![0; 16 * n])?;
        mem.write(addrs.avail, &vec![0; 6 + 2 * n])?;
        mem.write(addrs.used, &vec![0; 6 + 8 * n])?;
        let efd = |flags| EventFd::new(flags).map_err(|e| DriverError::EventFd(e.to_string()));
        Ok(SplitQueue {
            mem,
            addrs,
            free: (0..addrs.size).rev().collect(),
            chains: HashMap::new(),
            next_avail: 0,
            last_used: 0,
            kick: efd(0)?,
            call: efd(EFD_NONBLOCK)?,
        })
    }

    /// The rings' addresses.
    pub fn addrs(&self) -> &VringAddrs {
        &self.addrs
    }

    /// The eventfd the driver writes to notify the device.
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The eventfd the device writes on completion.
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// The memory the queue lives in.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Outstanding chains.
    pub fn outstanding(&self) -> usize {
        self.chains.len()
    }

    /// Writes a chain into the descriptor table and makes it available
    /// (without notifying); returns its head.
    pub fn add(&mut self, bufs: &[Buffer]) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::Invalid("empty descriptor chain".into()));
        }
        if bufs.len() > self.free.len() {
            return Err(DriverError::QueueFull {
                want: bufs.len(),
                free: self.free.len(),
            });
        }
        let at = self.free.len() - bufs.len();
        let ids: Vec<u16> = self.free[at..].iter().rev().copied().collect();
        for (i, (b, &id)) in bufs.iter().zip(&ids).enumerate() {
            let next = ids.get(i + 1).copied();
            let mut flags = if b.device_writes { DESC_WRITE } else { 0 };
            if next.is_some() {
                flags |= DESC_NEXT;
            }
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&b.gpa.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
            self.mem.write(self.addrs.desc + 16 * u64::from(id), &d)?;
        }
        self.free.truncate(at);
        let head = ids[0];
        self.chains.insert(head, ids);
        let slot = u64::from(self.next_avail % self.addrs.size);
        self.mem
            .write(self.addrs.avail + 4 + 2 * slot, &head.to_le_bytes())?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // The ring entry (and the descriptors) before the index that
        // publishes them.
        fence(Ordering::SeqCst);
        self.mem
            .write(self.addrs.avail + 2, &self.next_avail.to_le_bytes())?;
        Ok(head)
    }

    /// Notifies the device.
    pub fn notify(&self) -> Result<(), DriverError> {
        fence(Ordering::SeqCst);
        self.kick
            .write(1)
            .map_err(|e| DriverError::EventFd(e.to_string()))
    }

    /// Takes one completion, if any: (head, bytes written by the device).
    pub fn poll_used(&mut self) -> Result<Option<(u16, u32)>, DriverError> {
        let mut idx = [0u8; 2];
        self.mem.read(self.addrs.used + 2, &mut idx)?;
        if u16::from_le_bytes(idx) == self.last_used {
            return Ok(None);
        }
        // The index before the element it publishes.
        fence(Ordering::SeqCst);
        let slot = u64::from(self.last_used % self.addrs.size);
        let mut elem = [0u8; 8];
        self.mem.read(self.addrs.used + 4 + 8 * slot, &mut elem)?;
        let id = u32::from_le_bytes([elem[0], elem[1], elem[2], elem[3]]);
        let len = u32::from_le_bytes([elem[4], elem[5], elem[6], elem[7]]);
        let chain = u16::try_from(id)
            .ok()
            .and_then(|h| self.chains.remove(&h).map(|c| (h, c)));
        let Some((head, descs)) = chain else {
            return Err(DriverError::BadUsed { id, len });
        };
        self.last_used = self.last_used.wrapping_add(1);
        self.free.extend(descs);
        Ok(Some((head, len)))
    }

    /// Waits (on the call eventfd) for one completion.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<(u16, u32), DriverError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.poll_used()? {
                return Ok(c);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout(timeout));
            }
            wait_readable(&self.call, left)?;
            // Clears the counter (EAGAIN when another wakeup took it).
            let _ = self.call.read();
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait_readable(fd: &EventFd, timeout: Duration) -> Result<(), DriverError> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the call; the fd is owned by `fd`.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(DriverError::EventFd(e.to_string()));
        }
    }
    Ok(())
}

/// A virtio-blk request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkRequest {
    /// Read `len` bytes at `sector` (512-byte units) into guest memory at `gpa`.
    Read {
        /// First sector.
        sector: u64,
        /// Destination buffer.
        gpa: u64,
        /// Length (a multiple of 512).
        len: u32,
    },
    /// Write `len` bytes from guest memory at `gpa` to `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// Source buffer.
        gpa: u64,
        /// Length (a multiple of 512).
        len: u32,
    },
    /// Flush the device's write cache.
    Flush,
}

/// A completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkCompletion {
    /// The tag [`VirtioBlk::submit`] returned.
    pub tag: u16,
    /// The status byte (`BLK_S_*`).
    pub status: u8,
}

/// virtio-blk requests on a [`SplitQueue`]. Each in-flight request uses a
/// 16-byte header and a status byte in a scratch area of guest memory
/// (`scratch`, [`VirtioBlk::scratch_bytes`] long).
pub struct VirtioBlk<M: DriverMemory> {
    queue: SplitQueue<M>,
    scratch: u64,
    /// Scratch slot of each outstanding head.
    slots: HashMap<u16, u16>,
    free_slots: Vec<u16>,
}

impl<M: DriverMemory> std::fmt::Debug for VirtioBlk<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("queue", &self.queue)
            .finish()
    }
}

impl<M: DriverMemory> VirtioBlk<M> {
    /// Scratch bytes needed for a queue of `size`.
    pub fn scratch_bytes(size: u16) -> u64 {
        17 * u64::from(size)
    }

    /// A block driver on `queue`, with its scratch area at `scratch`.
    pub fn new(queue: SplitQueue<M>, scratch: u64) -> VirtioBlk<M> {
        let size = queue.addrs().size;
        VirtioBlk {
            queue,
            scratch,
            slots: HashMap::new(),
            free_slots: (0..size).rev().collect(),
        }
    }

    /// The queue.
    pub fn queue(&self) -> &SplitQueue<M> {
        &self.queue
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    fn header_gpa(&self, slot: u16) -> u64 {
        self.scratch + 16 * u64::from(slot)
    }

    fn status_gpa(&self, slot: u16) -> u64 {
        self.scratch + 16 * u64::from(self.queue.addrs().size) + u64::from(slot)
    }

    /// Queues a request (without notifying); returns its tag.
    pub fn submit(&mut self, req: BlkRequest) -> Result<u16, DriverError> {
        let Some(slot) = self.free_slots.pop() else {
            return Err(DriverError::QueueFull { want: 1, free: 0 });
        };
        let (kind, sector, data) = match req {
            BlkRequest::Read { sector, gpa, len } => (BLK_T_IN, sector, Some((gpa, len, true))),
            BlkRequest::Write { sector, gpa, len } => (BLK_T_OUT, sector, Some((gpa, len, false))),
            BlkRequest::Flush => (BLK_T_FLUSH, 0, None),
        };
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        let result = (|| {
            self.queue.memory().write(self.header_gpa(slot), &hdr)?;
            // A status the device must overwrite.
            self.queue.memory().write(self.status_gpa(slot), &[0xff])?;
            let mut bufs = vec![Buffer {
                gpa: self.header_gpa(slot),
                len: 16,
                device_writes: false,
            }];
            if let Some((gpa, len, device_writes)) = data {
                bufs.push(Buffer {
                    gpa,
                    len,
                    device_writes,
                });
            }
            bufs.push(Buffer {
                gpa: self.status_gpa(slot),
                len: 1,
                device_writes: true,
            });
            self.queue.add(&bufs)
        })();
        match result {
            Ok(head) => {
                self.slots.insert(head, slot);
                Ok(head)
            }
            Err(e) => {
                self.free_slots.push(slot);
                Err(e)
            }
        }
    }

    /// Notifies the device of submitted requests.
    pub fn notify(&self) -> Result<(), DriverError> {
        self.queue.notify()
    }

    /// Waits for one completion.
    pub fn wait(&mut self, timeout: Duration) -> Result<BlkCompletion, DriverError> {
        let (head, _) = self.queue.wait_used(timeout)?;
        let Some(slot) = self.slots.remove(&head) else {
            return Err(DriverError::BadUsed {
                id: u32::from(head),
                len: 0,
            });
        };
        let mut status = [0u8];
        let read = self.queue.memory().read(self.status_gpa(slot), &mut status);
        self.free_slots.push(slot);
        read?;
        Ok(BlkCompletion {
            tag: head,
            status: status[0],
        })
    }

    /// Submits one request, notifies, and waits for it.
    pub fn run(&mut self, req: BlkRequest, timeout: Duration) -> Result<u8, DriverError> {
        let tag = self.submit(req)?;
        self.notify()?;
        loop {
            let c = self.wait(timeout)?;
            if c.tag == tag {
                return Ok(c.status);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Memory;

    fn space() -> (Memory, AddressSpace) {
        let memory = Memory::new();
        let system = memory.new_container("system", 1 << 32, None).unwrap();
        let ram = memory.new_ram("ram", 1 << 20, None).unwrap();
        memory.add_subregion(system, 0, ram).unwrap();
        let sid = memory.new_address_space("memory", system, None).unwrap();
        let space = memory.address_space(sid).unwrap();
        (memory, space)
    }

    fn device_completes(space: &AddressSpace, addrs: &VringAddrs, idx: u16, id: u32, len: u32) {
        let slot = u64::from((idx - 1) % addrs.size);
        let mut elem = id.to_le_bytes().to_vec();
        elem.extend_from_slice(&len.to_le_bytes());
        DriverMemory::write(space, addrs.used + 4 + 8 * slot, &elem).unwrap();
        DriverMemory::write(space, addrs.used + 2, &idx.to_le_bytes()).unwrap();
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "waits on an eventfd with poll(2), a foreign function Miri cannot run"
    )]
    fn driver_chains_descriptors_and_takes_completions() {
        let (_m, space) = space();
        let addrs = queue_layout(0x1000, 8);
        let mut q = SplitQueue::new(&space, addrs).unwrap();
        let bufs = [
            Buffer {
                gpa: 0x8000,
                len: 16,
                device_writes: false,
            },
            Buffer {
                gpa: 0x9000,
                len: 1,
                device_writes: true,
            },
        ];
        let head = q.add(&bufs).unwrap();
        assert_eq!(q.free_descriptors(), 6);
        // The descriptor table links the chain; the avail ring names it.
        let mut d = [0u8; 16];
        DriverMemory::read(&space, addrs.desc + 16 * u64::from(head), &mut d).unwrap();
        assert_eq!(u64::from_le_bytes(d[0..8].try_into().unwrap()), 0x8000);
        assert_eq!(u16::from_le_bytes([d[12], d[13]]), DESC_NEXT);
        let next = u16::from_le_bytes([d[14], d[15]]);
        DriverMemory::read(&space, addrs.desc + 16 * u64::from(next), &mut d).unwrap();
        assert_eq!(u16::from_le_bytes([d[12], d[13]]), DESC_WRITE);
        let mut a = [0u8; 6];
        DriverMemory::read(&space, addrs.avail, &mut a).unwrap();
        assert_eq!(u16::from_le_bytes([a[2], a[3]]), 1);
        assert_eq!(u16::from_le_bytes([a[4], a[5]]), head);
        assert_eq!(q.poll_used().unwrap(), None);
        device_completes(&space, &addrs, 1, u32::from(head), 1);
        assert_eq!(q.poll_used().unwrap(), Some((head, 1)));
        assert_eq!(q.free_descriptors(), 8);
        // Nothing more: a wait times out instead of hanging.
        assert_eq!(
            q.wait_used(Duration::from_millis(10)),
            Err(DriverError::Timeout(Duration::from_millis(10)))
        );
        // Too long a chain is refused.
        assert!(matches!(
            q.add(&[bufs[0]; 9]),
            Err(DriverError::QueueFull { .. })
        ));
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "waits on an eventfd with poll(2), a foreign function Miri cannot run"
    )]
    fn driver_rejects_a_used_element_that_is_not_outstanding() {
        let (_m, space) = space();
        let addrs = queue_layout(0x1000, 8);
        let mut q = SplitQueue::new(&space, addrs).unwrap();
        let head = q
            .add(&[Buffer {
                gpa: 0x8000,
                len: 16,
                device_writes: false,
            }])
            .unwrap();
        device_completes(&space, &addrs, 1, 99, 0);
        assert_eq!(q.poll_used(), Err(DriverError::BadUsed { id: 99, len: 0 }));
        // Completing the same head twice is refused too.
        device_completes(&space, &addrs, 1, u32::from(head), 0);
        assert_eq!(q.poll_used().unwrap(), Some((head, 0)));
        device_completes(&space, &addrs, 2, u32::from(head), 0);
        assert!(matches!(q.poll_used(), Err(DriverError::BadUsed { .. })));
    }
}
