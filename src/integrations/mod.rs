//! Integrations with the rust-vmm ecosystem, each behind a feature.
//!
//! * `kvm` (feature `kvm`, Linux): KVM memory slots driven by a listener,
//!   vCPU MMIO and port exits dispatched through memtree.
//! * `guest_memory` (feature `vm-memory`, unix): an address space's RAM as a
//!   vm-memory `GuestMemoryMmap`.
//! * `vhost_user` (feature `vhost-user`, Linux): a vhost-user front-end and
//!   a virtio-blk split-queue driver.
//!
//! Invariants: an integration holds memory only through the same pins as
//! any other user (mappings, views), so the census explains it and unplug
//! waits for it.
//!
//! Layering: the top; may use every core folder, and no core folder uses
//! it (the vm-memory cache of a view is an opaque slot of the view;
//! checked by `tests/layering.rs`).

#[cfg(all(feature = "vm-memory", unix))]
pub mod guest_memory;
#[cfg(all(feature = "kvm", target_os = "linux"))]
pub mod kvm;
#[cfg(all(feature = "vhost-user", target_os = "linux"))]
pub mod vhost_user;
