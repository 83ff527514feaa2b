//! Guides: how to use the crate for one kind of program, end to end. Documentation only.
//!
//! - [`criu`]: for CRIU users: how the images, the page pipe and the page-server protocol
//!   here match CRIU's, and where the crate is stricter.
//! - `vmm` (with the `vm-memory` feature): for VMM authors on rust-vmm: snapshots of guest
//!   memory, incremental and live, migration, and the ways to restore.

#[doc = include_str!("criu.md")]
pub mod criu {}

#[cfg(feature = "vm-memory")]
#[doc = include_str!("vmm.md")]
pub mod vmm {}
