//! Guides: how to use the crate for one kind of program, end to end. Documentation only.

#[cfg(feature = "vm-memory")]
#[doc = include_str!("vmm.md")]
pub mod vmm {}
