//! Tests of the wire format.

use super::*;

fn limits() -> Limits {
    Limits {
        page_size: 4096,
        max_payload_pages: 64,
    }
}

fn raw(cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> [u8; 32] {
    Header {
        cmd,
        pad: 0,
        nr_pages,
        vaddr,
        dst_id,
    }
    .to_bytes()
}

#[test]
fn every_message_round_trips() {
    let img = ImageId::pagemap(12856).unwrap();
    let shm = ImageId::shmem(3).unwrap();
    let all = [
        Message::Add {
            image: img,
            vaddr: 0x1000,
            pages: 2,
        },
        Message::Hole {
            image: shm,
            vaddr: 0x4000,
            pages: 1 << 30,
        },
        Message::Open { image: img },
        Message::Open2 { image: shm },
        Message::Parent { image: img },
        Message::AddF {
            image: img,
            vaddr: 0x7000,
            pages: 64,
            flags: PageFlags::LAZY | PageFlags::PRESENT,
        },
        Message::AddF {
            image: img,
            vaddr: 0x7000,
            pages: 1 << 40,
            flags: PageFlags::LAZY,
        },
        Message::Get {
            id: 12856,
            vaddr: 0x9000,
            pages: 3,
        },
        Message::Close,
        Message::ForceClose,
    ];
    for m in all {
        assert_eq!(Message::decode(&m.encode(), &limits()), Ok(m), "{m:?}");
    }
}

#[test]
fn bad_headers_name_what_was_expected() {
    let l = limits();
    let d = |b: [u8; 32]| Message::decode(&b, &l).unwrap_err();
    assert_eq!(d(raw(8, 0, 0, 0)), WireErrorKind::UnknownCommand { cmd: 8 });
    assert_eq!(
        d(raw(1 << 16 | 0x1023, 0, 0, 0)),
        WireErrorKind::FlagsNotAllowed {
            command: Command::Close,
            flags: 1
        }
    );
    assert_eq!(
        d(raw(5 << 16 | 6, 1, 0, 0x101)),
        WireErrorKind::BadFlags { flags: 5 }
    );
    assert_eq!(d(raw(6, 1, 0, 0x101)), WireErrorKind::BadFlags { flags: 0 });
    assert_eq!(
        d(raw(4, 0, 0, 0x103)),
        WireErrorKind::UnknownImageType { dst_id: 0x103 }
    );
    assert_eq!(
        d(raw(4 << 16 | 6, 0, 0, 0x101)),
        WireErrorKind::NoPages {
            command: Command::AddF
        }
    );
    assert_eq!(
        d(raw(1, 1, 0x1001, 0x101)),
        WireErrorKind::Unaligned {
            command: Command::Add,
            vaddr: 0x1001
        }
    );
    assert!(matches!(
        d(raw(2, 2, u64::MAX - 4095, 0x101)),
        WireErrorKind::Overflow { .. }
    ));
    assert_eq!(
        d(raw(4 << 16 | 6, 65, 0, 0x101)),
        WireErrorKind::TooManyPages {
            command: Command::AddF,
            pages: 65,
            max: 64
        }
    );
    // Legacy type numbers name the same images.
    assert_eq!(
        Message::decode(&raw(3, 0, 0, 7 << 8 | 11), &l),
        Ok(Message::Open {
            image: ImageId::pagemap(7).unwrap()
        })
    );
    // The padding is not checked.
    let mut b = Message::Close.encode();
    b[4] = 0xff;
    assert_eq!(Message::decode(&b, &l), Ok(Message::Close));
}

#[test]
fn the_decoder_stops_at_a_cut_and_names_the_offset() {
    let img = ImageId::pagemap(1).unwrap();
    let mut s = Message::Open2 { image: img }.to_vec();
    s.extend(
        Message::AddF {
            image: img,
            vaddr: 0x1000,
            pages: 2,
            flags: PageFlags::PRESENT,
        }
        .encode(),
    );
    s.extend(vec![9u8; 8192]);
    s.extend(Message::Close.encode());
    let frames: Vec<_> = Decoder::new(&s, limits())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[1].payload.len(), 8192);
    assert_eq!(frames[2].offset, 64 + 8192);
    for cut in [1, 31, 33, 64 + 100, s.len() - 1] {
        let last = Decoder::new(&s[..cut], limits()).last().unwrap();
        let e = last.unwrap_err();
        assert!(
            matches!(e.kind, WireErrorKind::Truncated { .. }),
            "cut {cut}: {e}"
        );
        assert!(e.offset <= cut as u64);
    }
}
