//! Lifecycle diagnostics: who holds what, and what survived.
//!
//! * [`census`]: [`Census`](crate::Census), every live object (regions,
//!   owners, views, mappings, backends, handles) and who holds it.
//! * [`diag`]: deferred finalizers and panics recorded during edits, and
//!   the data behind the leak report of a teardown.
//!
//! Invariants: the census is a record, never an owner: registering or
//! dropping an entry never keeps an object alive.
//!
//! Layering: near the bottom; may use `dma` and `topology` only through the
//! back-edges listed in ARCHITECTURE.md (checked by `tests/layering.rs`).

pub mod census;
pub mod diag;
