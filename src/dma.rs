//! DMA: mapping guest ranges for direct access, bounce buffers, map clients.
//!
//! (Grown by the lifecycle work; this file starts with the per-address-space
//! bounce accounting that [`crate::space`] embeds.)

use std::sync::atomic::{AtomicU64, Ordering};

/// QEMU's default per-address-space bounce-buffer limit.
pub const DEFAULT_MAX_BOUNCE: u64 = 4096;

/// Bounce-buffer accounting of one address space.
#[derive(Debug)]
pub(crate) struct BounceState {
    pub(crate) in_use: AtomicU64,
    pub(crate) limit: AtomicU64,
}

impl BounceState {
    pub(crate) fn new(limit: u64) -> BounceState {
        BounceState {
            in_use: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
        }
    }

    /// Bytes currently reserved.
    #[allow(dead_code)]
    pub(crate) fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Acquire)
    }
}
