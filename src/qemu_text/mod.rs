//! Text formats: QEMU's `info mtree` family, parsed and printed.
//!
//! Pure: no I/O, no locks of its own. The printer writes into any
//! `fmt::Write`; the parser returns a syntax tree or a [`parse::ParseError`]
//! naming the line.

pub mod import;
pub mod parse;
pub mod print;
