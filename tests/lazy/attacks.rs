//! Attacks on the lazy restore's promises, each test named for the promise it checks;
//! each failed before the fix committed with it, but for the ones that say they held.

use super::*;

/// `wait_timeout` with a timeout no `Instant` can hold waits as long as it takes (it
/// panicked adding the timeout to now).
#[test]
fn wait_timeout_for_ever_does_not_panic() {
    if !have_uffd("wait_timeout_for_ever_does_not_panic") {
        return;
    }
    let root = TempDir::new("lazy-wait-max");
    let all = full_image(root.path(), 16);
    let mut mem = fresh(16);
    let source = LazySource::image(Image::open(root.path()).unwrap());
    let r = start(source, BASE, &mut mem, &LazyOptions::default()).unwrap();
    assert!(
        r.wait_timeout(Duration::MAX),
        "the prefetch ends the restore"
    );
    assert!(r.wait_timeout(Duration::ZERO), "ended, so no wait at all");
    check_report(&r.wait().unwrap(), 16);
    assert!(mem[..] == all[..]);
}
