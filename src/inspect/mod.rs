//! Explaining and drawing a machine, for people.
//!
//! * [`lookup`]: which region serves an address and why every other
//!   candidate lost (clipped, obscured, disabled), walking the tree the way
//!   rendering does.
//! * [`map_svg`]: an SVG memory map of an address space, to scale where
//!   small, with compressed holes.
//!
//! Invariants: read-only over a [`Machine`](crate::Machine); deep trees are
//! walked on explicit stacks (no recursion proportional to input).
//!
//! Layering: above `topology` (may use every core folder); nothing in the
//! core uses it.

pub mod lookup;
pub mod map_svg;
