//! Lifecycle diagnostics: who holds what, and what survived.
//!
//! * [`census`]: [`Census`](crate::Census), every live object (regions,
//!   owners, views, mappings, backends, handles) and who holds it.
//! * `deferral` (crate-private): `catch`/`raise` around code memtree does
//!   not own, and the queue of drops and finalizers a machine operation
//!   runs when it ends.
//! * [`diag`]: census reports, holder chains, and
//!   [`LeakReport`](crate::LeakReport), what survived a teardown.
//!
//! Invariants: the census is a record, never an owner: registering or
//! dropping an entry never keeps an object alive.
//!
//! Layering: the bottom; uses no other folder of the crate (checked by
//! `tests/layering.rs`).

pub mod census;
pub(crate) mod deferral;
pub mod diag;
