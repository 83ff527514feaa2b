//! Decodes arbitrary bytes as a pagemap image. Whatever it accepts must re-encode to an
//! image that decodes to the same entries, and need a pages file no larger than its
//! entries say; nothing may panic or allocate more than the input justifies (run with
//! `-malloc_limit_mb`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use page_pipe::image::Pagemap;

fuzz_target!(|data: &[u8]| {
    let Ok(pm) = Pagemap::decode(data, 4096) else {
        return;
    };
    // Each entry takes at least eight input bytes (a length word and two fields).
    assert!(pm.entries.len() * 8 <= data.len());
    let _ = pm.present_bytes(4096);
    if pm.entries.iter().all(|e| e.pages <= u64::from(u32::MAX)) {
        let again = Pagemap::decode(&pm.encode(), 4096).expect("our encoding decodes");
        assert_eq!(again, pm);
    }
});
