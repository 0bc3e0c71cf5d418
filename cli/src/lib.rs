//! # memtree-cli
//!
//! The `memtree` command and what only it needs: native TOML machine
//! descriptions ([`machine_file`]) and the built-in demo machine ([`demo`]).
//! The memory core is the `memtree` crate, which depends on none of this
//! crate's dependencies (clap, serde, toml).

#![warn(missing_debug_implementations)]

pub mod demo;
pub mod machine_file;
