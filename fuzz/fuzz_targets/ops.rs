//! Decodes a page pipe configuration and a sequence of operations from the input, runs
//! them on a page pipe over the fake backend and on the pure model, and fails on the
//! first difference, broken invariant, or fake pipe left open.
#![no_main]

use libfuzzer_sys::fuzz_target;
use page_pipe::testing::{Config, FakePipes, Op, check_sequence};

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let cfg = Config::decode(&mut data);
    let mut ops = Vec::new();
    while let Some(op) = Op::decode(&mut data) {
        ops.push(op);
    }
    let fake = FakePipes::new(cfg.kernel.clone());
    let open = fake.open_counter();
    if let Err(e) = check_sequence(&cfg, fake, &ops, 0x7f00_0000_0000) {
        panic!("page pipe and model differ: {e}\nconfig {cfg:?}\nops {ops:?}");
    }
    assert_eq!(open.load(std::sync::atomic::Ordering::Relaxed), 0, "fake pipes left open");
});
