//! The control-plane half of an owner: its node in the topology arena
//! (parent device, child devices, what it owns). Its data-plane half is
//! [`OwnerCore`](crate::region::owner_core::OwnerCore).

use std::sync::Arc;

use crate::region::ids::{OwnerId, RegionId, SpaceId};
use crate::region::owner_core::{OwnerCore, OwnerLabel};

#[derive(Debug)]
pub(crate) struct OwnerNode {
    pub(crate) core: Arc<OwnerCore>,
    /// Read by the QEMU text printer (`-o` owner labels).
    #[cfg_attr(not(feature = "qemu-text"), allow(dead_code))]
    pub(crate) label: OwnerLabel,
    pub(crate) parent: Option<OwnerId>,
    pub(crate) children: Vec<OwnerId>,
    pub(crate) regions: Vec<RegionId>,
    pub(crate) spaces: Vec<SpaceId>,
}
