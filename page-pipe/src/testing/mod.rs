//! Test scaffolding, behind the `testing` cargo feature (off by default): the pure model
//! of the page pipe's rules, the checker that holds a real page pipe to it, and
//! [`FakePipes`], a pipe backend that keeps no file descriptors and fails chosen calls on
//! demand. The workspace's tests, fuzz targets and benches turn the feature on; a user of
//! the crate has no need of it.

mod fake;
mod model;
mod ops;
#[cfg(test)]
mod page_pipe_tests;

pub use fake::{FakeKernel, FakePipe, FakePipes};
pub use model::{Config, Model, ModelBuf, check_invariants, compare};
pub use ops::{Op, check_sequence, run_ops};
