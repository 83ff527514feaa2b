//! Feeds arbitrary bytes to the page server's message parser and session rules, as a
//! client's stream: `wire::Decoder` frame by frame, then `check_stream`. Nothing may
//! panic or allocate more than the input justifies (run with `-malloc_limit_mb`); every
//! frame decoded must lie within the input and re-encode to a header that decodes to the
//! same message; a stream accepted must be exactly its headers and payloads, with each
//! image's entries ascending and no more images than admitted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use page_pipe::page_server::check_stream;
use page_pipe::page_server::wire::{Decoder, HEADER_LEN, Limits, Message};

const LIMITS: Limits = Limits {
    page_size: 4096,
    max_payload_pages: 64,
};
const MAX_IMAGES: usize = 8;

fuzz_target!(|data: &[u8]| {
    let mut frames = 0u64;
    let mut end = 0u64;
    for f in Decoder::new(data, LIMITS) {
        let Ok(f) = f else {
            break;
        };
        assert_eq!(f.offset, end, "frames follow each other");
        end = f.offset + (HEADER_LEN + f.payload.len()) as u64;
        assert!(end <= data.len() as u64);
        assert_eq!(f.payload.len() as u64, f.message.payload_len(LIMITS.page_size));
        assert!(f.message.payload_pages() <= LIMITS.max_payload_pages);
        let again = Message::decode(&f.message.encode(), &LIMITS).expect("ours decodes");
        assert_eq!(again, f.message);
        frames += 1;
    }
    match check_stream(data, LIMITS, MAX_IMAGES) {
        Ok(sum) => {
            assert_eq!(sum.messages, frames, "a session is all of its frames");
            assert_eq!(
                sum.messages * HEADER_LEN as u64 + sum.payload_bytes,
                data.len() as u64
            );
            assert!(sum.images.len() <= MAX_IMAGES);
            for (_, entries) in &sum.images {
                for w in entries.windows(2) {
                    let prev_end = w[0].end(LIMITS.page_size).expect("checked");
                    assert!(w[1].vaddr >= prev_end, "entries ascend");
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
