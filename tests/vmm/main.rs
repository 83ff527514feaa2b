//! End-to-end tests of guest memory (the `vm-memory` feature): written in the next commit.
