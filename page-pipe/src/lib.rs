//! Zero-copy page capture on Linux.
#![deny(missing_docs, missing_debug_implementations)]
