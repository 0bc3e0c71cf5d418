//! KVM: memory slots kept in step with an address space by a memory
//! listener, and vCPU exits dispatched through memtree (QEMU's
//! `kvm_memory_listener` and the MMIO / port I/O exit path of
//! `kvm_cpu_exec`). Linux only, behind the default `kvm` feature.
//!
//! [`KvmMemorySlots`] is a [`MemoryListener`] at
//! [`PRIORITY_ACCEL`]. For every flat range
//! that reads straight from host memory (RAM, ROM, ROM devices in romd mode)
//! it installs a KVM user memory slot; everything else stays unmapped in KVM,
//! so the guest's accesses to it exit to the VMM, which hands them to
//! [`dispatch_exit`] and from there to the address space. A range whose
//! writes are not direct (ROM, readonly aliases, ROM devices) becomes a
//! readonly slot, so guest writes exit too and are dispatched like any
//! other (and dropped by ROM); if the host lacks `KVM_CAP_READONLY_MEM`
//! such ranges get no slot at all and every access exits.
//!
//! KVM slots must be page aligned. As QEMU does, a range is trimmed to the
//! host pages it covers entirely; the unaligned head and tail get no slot
//! and are emulated through exits.
//!
//! # Lifetime
//!
//! KVM reads and writes a slot's host memory until the slot is deleted, so
//! each slot holds the memory backend it maps (`Arc<MemoryBackend>`) and
//! drops it only after `KVM_SET_USER_MEMORY_REGION` has deleted the slot.
//! Slots are deleted in `region_del`, which a commit runs before it
//! publishes the view without the range: unplugging a device removes its
//! slots before its memory can go. Unregistering the listener deletes every
//! slot (the listener API replays `region_del`). Dropping the listener
//! deletes every slot it still holds before it releases their memory, so no
//! path (a panic of another listener, a listener driven by hand) leaves KVM
//! a slot over freed memory.
//!
//! # Errors
//!
//! Listener callbacks cannot fail the commit. A slot that KVM refuses (no
//! free slot number, overlapping slot, host error) is not installed, so the
//! guest's accesses to that range exit and are emulated — correct, only
//! slow — and the error is kept: [`KvmMemorySlots::errors`].

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VmFd};
use parking_lot::Mutex;

use crate::access::dispatch::SpaceCursor;
use crate::dma::mapping::ram_backend;
use crate::host::backend::MemoryBackend;
use crate::region::attrs::MemTxAttrs;
use crate::render::listener::{MemoryListener, Section, PRIORITY_ACCEL};
use crate::view::flatview::FlatRange;

/// Host page size KVM slots are aligned to.
const PAGE: u64 = 4096;

/// One installed KVM memory slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// KVM slot number.
    pub slot: u32,
    /// First guest-physical address.
    pub guest_phys_addr: u64,
    /// Size in bytes (a multiple of the page size).
    pub size: u64,
    /// Readonly slot (guest writes exit).
    pub readonly: bool,
    /// Name of the region that serves it.
    pub region: String,
}

struct Installed {
    info: SlotInfo,
    /// Host address KVM maps (for re-setting the slot's flags).
    host: u64,
    /// `KVM_MEM_LOG_DIRTY_PAGES` is set: some client tracks the range.
    logging: bool,
    /// Keeps the host memory KVM uses mapped until the slot is deleted.
    _memory: Arc<MemoryBackend>,
}

#[derive(Default)]
struct Slots {
    /// By guest-physical start of the *flat range* (what `region_del` names).
    by_range: BTreeMap<u64, Installed>,
    free: Vec<u32>,
    next: u32,
    errors: Vec<String>,
    /// Slots KVM refused to delete: their memory stays mapped for good.
    stuck: Vec<Installed>,
}

/// KVM memory slots for one address space (see the [module docs](self)).
pub struct KvmMemorySlots {
    vm: Arc<VmFd>,
    max_slots: u32,
    readonly_mem: bool,
    slots: Mutex<Slots>,
}

impl std::fmt::Debug for KvmMemorySlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmMemorySlots")
            .field("slots", &self.slots())
            .finish()
    }
}

impl KvmMemorySlots {
    /// A listener installing slots into `vm` (made by `kvm`, asked for the
    /// slot limit and readonly-memory support).
    pub fn new(kvm: &Kvm, vm: Arc<VmFd>) -> KvmMemorySlots {
        KvmMemorySlots {
            vm,
            max_slots: u32::try_from(kvm.get_nr_memslots()).unwrap_or(u32::MAX),
            readonly_mem: kvm.check_extension(Cap::ReadonlyMem),
            slots: Mutex::new(Slots::default()),
        }
    }

    /// The installed slots, in guest-physical order.
    pub fn slots(&self) -> Vec<SlotInfo> {
        let mut v: Vec<SlotInfo> = self
            .slots
            .lock()
            .by_range
            .values()
            .map(|i| i.info.clone())
            .collect();
        v.sort_by_key(|s| s.guest_phys_addr);
        v
    }

    /// Slots KVM refused, as messages (the ranges are emulated instead).
    pub fn errors(&self) -> Vec<String> {
        self.slots.lock().errors.clone()
    }

    /// The slot a range gets, if any: (guest address, size, host address,
    /// readonly).
    fn plan(&self, r: &FlatRange) -> Option<(u64, u64, u64, bool)> {
        if !r.is_direct_read() {
            return None;
        }
        let readonly = !r.is_direct_write();
        if readonly && !self.readonly_mem {
            return None;
        }
        let start = r.start().checked_add(PAGE - 1)? & !(PAGE - 1);
        let end = (u128::from(r.last()) + 1) & !u128::from(PAGE - 1);
        if u128::from(start) >= end {
            return None;
        }
        let size = u64::try_from(end - u128::from(start)).ok()?;
        let host = r.host_at(start) as u64;
        if host % PAGE != 0 {
            // The backend offset is not page aligned: emulate instead.
            return None;
        }
        Some((start, size, host, readonly))
    }

    fn set(
        &self,
        slot: u32,
        guest: u64,
        size: u64,
        host: u64,
        readonly: bool,
        logging: bool,
    ) -> Result<(), String> {
        let mut flags = if readonly { KVM_MEM_READONLY } else { 0 };
        if logging {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest,
            memory_size: size,
            userspace_addr: host,
            flags,
        };
        // SAFETY: for a non-zero size, `host..host + size` is host memory of
        // a backend the installed slot keeps (`Installed::_memory`) until
        // this same call deletes the slot with size 0; KVM accesses it only
        // as guest memory, which memtree already treats as shared with
        // other writers (raw copies only, see `crate::host::ram`).
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| e.to_string())
    }
}

impl KvmMemorySlots {
    /// Re-sets the range's slot with `KVM_MEM_LOG_DIRTY_PAGES` on or off
    /// (QEMU's `kvm_slot_update_flags`).
    fn set_logging(&self, section: &Section<'_>, on: bool) {
        let mut s = self.slots.lock();
        let Some(i) = s.by_range.get(&section.range.start()) else {
            return;
        };
        if i.info.readonly || i.logging == on {
            return;
        }
        let (slot, gpa, size, host) = (i.info.slot, i.info.guest_phys_addr, i.info.size, i.host);
        match self.set(slot, gpa, size, host, false, on) {
            Ok(()) => {
                if let Some(i) = s.by_range.get_mut(&section.range.start()) {
                    i.logging = on;
                }
            }
            Err(e) => s.errors.push(format!(
                "KVM refused dirty logging {on} on slot {slot}: {e}"
            )),
        }
    }

    /// Slot numbers with `KVM_MEM_LOG_DIRTY_PAGES` set.
    pub fn logging_slots(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .slots
            .lock()
            .by_range
            .values()
            .filter(|i| i.logging)
            .map(|i| i.info.slot)
            .collect();
        v.sort_unstable();
        v
    }
}

impl MemoryListener for KvmMemorySlots {
    fn priority(&self) -> u32 {
        PRIORITY_ACCEL
    }

    fn name(&self) -> &str {
        "kvm-memory-slots"
    }

    fn region_add(&self, section: &Section<'_>) {
        let r = section.range;
        let Some((guest, size, host, readonly)) = self.plan(r) else {
            return;
        };
        let Some(memory) = ram_backend(r.region()).cloned() else {
            return;
        };
        let mut s = self.slots.lock();
        let slot = match s.free.pop() {
            Some(n) => n,
            None if s.next < self.max_slots => {
                s.next += 1;
                s.next - 1
            }
            None => {
                s.errors.push(format!(
                    "no free KVM slot for {:#x}+{size:#x} ({})",
                    guest,
                    r.region().name()
                ));
                return;
            }
        };
        // Only guest writes dirty pages: a readonly slot needs no log.
        let logging = !readonly && r.dirty_log_mask() != 0;
        match self.set(slot, guest, size, host, readonly, logging) {
            Ok(()) => {
                let info = SlotInfo {
                    slot,
                    guest_phys_addr: guest,
                    size,
                    readonly,
                    region: r.region().name().to_owned(),
                };
                s.by_range.insert(
                    r.start(),
                    Installed {
                        info,
                        host,
                        logging,
                        _memory: memory,
                    },
                );
            }
            Err(e) => {
                s.free.push(slot);
                s.errors.push(format!(
                    "KVM refused slot {slot} {guest:#x}+{size:#x} ({}): {e}",
                    r.region().name()
                ));
            }
        }
    }

    fn log_start(&self, section: &Section<'_>, old_mask: u8, new_mask: u8) {
        if old_mask == 0 && new_mask != 0 {
            self.set_logging(section, true);
        }
    }

    fn log_stop(&self, section: &Section<'_>, old_mask: u8, new_mask: u8) {
        if old_mask != 0 && new_mask == 0 {
            self.set_logging(section, false);
        }
    }

    /// `KVM_GET_DIRTY_LOG` of the range's slot (which also clears KVM's
    /// log), merged into memtree's bitmaps for the range's clients.
    fn log_sync(&self, section: &Section<'_>) {
        let mut s = self.slots.lock();
        let Some(i) = s.by_range.get(&section.range.start()) else {
            return;
        };
        if !i.logging {
            return;
        }
        let (slot, gpa, size) = (i.info.slot, i.info.guest_phys_addr, i.info.size);
        match self.vm.get_dirty_log(slot, size as usize) {
            Ok(bitmap) => section.range.mark_dirty_bitmap(gpa, &bitmap),
            Err(e) => s
                .errors
                .push(format!("KVM_GET_DIRTY_LOG of slot {slot} failed: {e}")),
        }
    }

    fn region_del(&self, section: &Section<'_>) {
        let mut s = self.slots.lock();
        let Some(installed) = s.by_range.remove(&section.range.start()) else {
            return;
        };
        let info = &installed.info;
        match self.set(info.slot, info.guest_phys_addr, 0, 0, false, false) {
            Ok(()) => {
                s.free.push(info.slot);
                // `installed` (and with it the memory) drops after this.
            }
            Err(e) => {
                // KVM still maps the memory: keep it (and the slot number)
                // rather than free memory the guest can reach.
                s.errors
                    .push(format!("KVM refused to delete slot {}: {e}", info.slot));
                s.stuck.push(installed);
            }
        }
    }
}

impl Drop for KvmMemorySlots {
    /// Deletes every slot still installed before the memory it maps can go
    /// (a listener dropped without unregistration or teardown, e.g. one a
    /// VMM drives by hand, or after a path that skipped `region_del`). A
    /// slot KVM refuses to delete (and every slot already stuck) keeps its
    /// memory mapped for good: the backend is leaked, never freed under the
    /// guest.
    fn drop(&mut self) {
        let s = self.slots.get_mut();
        let installed = std::mem::take(&mut s.by_range);
        let stuck = std::mem::take(&mut s.stuck);
        for (_, slot) in installed {
            let info = &slot.info;
            if self
                .set(info.slot, info.guest_phys_addr, 0, 0, false, false)
                .is_err()
            {
                std::mem::forget(slot);
            }
            // Otherwise the slot is gone from KVM: its memory may go now.
        }
        for slot in stuck {
            std::mem::forget(slot);
        }
    }
}

/// What the vCPU loop should do after [`dispatch_exit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// The exit was an access memtree served: run the vCPU again.
    Resume,
    /// The guest halted (`hlt`).
    Halt,
    /// The guest shut down (triple fault, reset).
    Shutdown,
    /// An exit memtree does not handle, described.
    Unhandled(String),
}

/// Serves a vCPU exit: MMIO reads and writes through `memory`, port I/O
/// through `io` (exits of port I/O with no `io` space read all-ones and
/// drop writes, as unassigned I/O does). Accesses use unspecified
/// attributes, as QEMU does for KVM exits.
pub fn dispatch_exit(
    exit: VcpuExit<'_>,
    memory: &mut SpaceCursor,
    io: Option<&mut SpaceCursor>,
) -> ExitAction {
    let a = MemTxAttrs::UNSPECIFIED;
    // A vCPU has no bus error to receive on these exits: a failed access
    // (nothing mapped, device error) leaves `data` as the bus filled it, as
    // QEMU's KVM exit path ignores the transaction result.
    match exit {
        VcpuExit::MmioRead(addr, data) => {
            let _ = memory.read(addr, data, a);
            ExitAction::Resume
        }
        VcpuExit::MmioWrite(addr, data) => {
            let _ = memory.write(addr, data, a);
            ExitAction::Resume
        }
        VcpuExit::IoIn(port, data) => {
            match io {
                Some(io) => {
                    let _ = io.read(u64::from(port), data, a);
                }
                None => data.fill(0xff),
            }
            ExitAction::Resume
        }
        VcpuExit::IoOut(port, data) => {
            if let Some(io) = io {
                let _ = io.write(u64::from(port), data, a);
            }
            ExitAction::Resume
        }
        VcpuExit::Hlt => ExitAction::Halt,
        VcpuExit::Shutdown => ExitAction::Shutdown,
        other => ExitAction::Unhandled(format!("{other:?}")),
    }
}
