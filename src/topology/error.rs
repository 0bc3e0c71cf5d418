//! Errors of the control plane.
//!
//! Every misuse of the topology API returns a [`TopologyError`]; none panics.
//! What stays a programming error (documented, checked by `debug_assert!`
//! only): none in the public API. Panicking inside a device callback or a
//! listener propagates to the caller like any Rust panic.

use crate::region::ids::{OwnerId, RegionId, SpaceId};

/// A topology operation that was refused. The topology is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// The region id is stale (destroyed) or was never valid.
    #[error("region {0:?} does not exist (destroyed, or its owner was unplugged)")]
    NoSuchRegion(RegionId),
    /// The owner id is stale or was never valid.
    #[error("owner {0:?} does not exist (already unplugged)")]
    NoSuchOwner(OwnerId),
    /// The address space id is stale or was never valid.
    #[error("address space {0:?} does not exist")]
    NoSuchSpace(SpaceId),
    /// The id was made by another machine (a `Memory` other than the one
    /// it was passed to). Checked before any lookup, so the call acts on
    /// nothing; a stale id of this machine is `NoSuch…` instead.
    #[error("{kind} id {id} belongs to another machine (machine #{id_machine}); this is machine #{machine}")]
    ForeignId {
        /// What the id names: "region", "owner", "address space" or "listener".
        kind: &'static str,
        /// The id, as `Debug` prints it.
        id: String,
        /// The tag of the machine that made the id.
        id_machine: u32,
        /// The tag of the machine it was passed to.
        machine: u32,
    },
    /// The region is already a subregion of some container.
    #[error("region \"{region}\" is already mapped in container \"{container}\"")]
    AlreadyInContainer {
        /// The region's name.
        region: String,
        /// The container it is mapped in.
        container: String,
    },
    /// Adding the subregion (or creating the alias) would make the region
    /// tree reach itself: a region inside itself, or an alias loop.
    #[error("adding \"{region}\" under \"{container}\" would create a loop (a region inside itself or an alias cycle)")]
    Loop {
        /// The region being added (or the alias being created).
        region: String,
        /// The container (or alias target) it would go under.
        container: String,
    },
    /// Subregions cannot be added to an alias.
    #[error("\"{0}\" is an alias: aliases cannot have subregions")]
    AliasCannotContain(String),
    /// The region is not a subregion of that container.
    #[error("\"{region}\" is not a subregion of \"{container}\"")]
    NotASubregion {
        /// The region's name.
        region: String,
        /// The container it is not in.
        container: String,
    },
    /// Sizes are limited to 2^64 bytes.
    #[error("size {0:#x} is larger than 2^64")]
    SizeTooLarge(u128),
    /// The operation needs a region of another kind.
    #[error("\"{region}\" is not {expected}")]
    WrongKind {
        /// The region's name.
        region: String,
        /// The kind the operation needs, e.g. "a RAM region".
        expected: &'static str,
    },
    /// The region cannot be destroyed while something in the topology still
    /// uses it.
    #[error("region \"{region}\" is still in use: {why}")]
    InUse {
        /// The region's name.
        region: String,
        /// What still uses it.
        why: String,
    },
    /// The region's range does not fit inside its memory backend (a RAM
    /// region mapping past the end of its backend, or resized beyond it).
    #[error("region \"{region}\": {offset:#x}+{size:#x} does not fit its memory backend of {backend_size:#x} bytes")]
    BackendTooSmall {
        /// The region's name.
        region: String,
        /// Where the region starts inside the backend.
        offset: u64,
        /// The region's size.
        size: u128,
        /// The backend's size.
        backend_size: u64,
    },
    /// The memory backend was allocated by another machine (a backend is
    /// only mapped by regions of the machine that allocated it).
    #[error("region \"{region}\": memory backend \"{backend}\" belongs to another machine")]
    ForeignBackend {
        /// The region's name.
        region: String,
        /// The backend's name.
        backend: String,
    },
    /// A listener callback tried to change the topology during a commit.
    #[error("a listener tried to change the topology from inside a commit")]
    ListenerReentry,
    /// Host memory could not be allocated.
    #[error("cannot allocate host memory for \"{region}\": {message}")]
    Allocation {
        /// The region's name.
        region: String,
        /// The host's error.
        message: String,
    },
    /// The owner is no longer plugged in.
    #[error("owner \"{0}\" has been unplugged")]
    OwnerUnplugged(String),
    /// `commit` without a matching `begin`.
    #[error("commit without a matching begin")]
    UnbalancedCommit,
    /// No ioeventfd of the region matches the one to delete.
    #[error("region \"{region}\" has no ioeventfd matching {what}")]
    NoSuchEventfd {
        /// The region's name.
        region: String,
        /// The ioeventfd asked for (address, size, match data).
        what: String,
    },
    /// ioeventfds match accesses of 0 (any), 1, 2, 4 or 8 bytes.
    #[error("ioeventfd size {size} on \"{region}\" is not 0, 1, 2, 4 or 8")]
    BadEventfdSize {
        /// The region's name.
        region: String,
        /// The refused size.
        size: u64,
    },
    /// A listener refused to start global dirty logging.
    #[error("listener \"{listener}\" refused to start global dirty logging: {message}")]
    ListenerRefused {
        /// The listener's name.
        listener: String,
        /// Its reason.
        message: String,
    },
}
