//! Faults on both ends: streams cut anywhere, short writes and slow peers, a peer that
//! stops, unknown commands, huge claims, out-of-order entries, a server that goes away
//! or never answers.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use page_pipe::image::{PageFlags, PagemapEntry};
use page_pipe::page_server::wire::{Command, Expected, Header, ImageId, Message, WireErrorKind};
use page_pipe::page_server::{
    ClientError, ClientOp, PageServer, PageServerClient, RuleError, ServerConfig, SessionErrorKind,
};
use page_pipe::snapshot::{SnapshotOptions, Span, snapshot};
use page_pipe::{BufFlags, DumpErrorKind, Source, page_size};
use page_pipe_tests::{TempDir, patterned};

use super::{assert_like_criu, config, criu_stream, fixture, names, read, replay, server, session};

/// Offsets spread over the stream (a fixed pseudo-random choice, so failures repeat),
/// with every boundary of the first messages and of `CLOSE`.
fn cut_offsets(len: usize) -> Vec<usize> {
    let mut v = vec![
        0,
        1,
        31,
        32,
        33,
        63,
        64,
        65,
        64 + 4096,
        len - 33,
        len - 32,
        len - 31,
        len - 1,
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..40 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push((x % len as u64) as usize);
    }
    v
}

/// A stream cut anywhere before the end of `CLOSE` is a typed error naming where it
/// ended, and commits nothing (no image, no temporary file).
#[test]
fn a_stream_cut_anywhere_commits_nothing() {
    let stream = criu_stream();
    for cut in cut_offsets(stream.len()) {
        let dir = TempDir::new("ps-cut");
        let srv = server(dir.path());
        let (r, _) = session(&srv, |c| replay(c, &stream[..cut], 1 << 16, Duration::ZERO));
        let e = r.expect_err("a cut session fails").kind;
        match &e {
            SessionErrorKind::NotClosed { offset } => assert_eq!(*offset, cut as u64),
            SessionErrorKind::Wire(w) => {
                assert!(
                    matches!(w.kind, WireErrorKind::Truncated { .. }),
                    "cut {cut}: {e}"
                );
                assert!(w.offset <= cut as u64, "cut {cut}: {e}");
            }
            other => panic!("cut {cut}: {other}"),
        }
        assert!(
            names(dir.path()).is_empty(),
            "cut {cut}: {:?}",
            names(dir.path())
        );
    }
}

/// A client that writes in small pieces, pausing now and then, gives the same images.
#[test]
fn short_writes_and_a_slow_peer_give_the_same_images() {
    let dir = TempDir::new("ps-slow");
    let srv = server(dir.path());
    let stream = criu_stream();
    let (r, replies) = session(&srv, |c| {
        let mut w = c.try_clone().unwrap();
        let reader = thread::spawn(move || {
            let mut back = Vec::new();
            let mut c = c;
            let _ = c.read_to_end(&mut back);
            back
        });
        let mut at = 0;
        let mut x = 12345u32;
        while at < stream.len() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let n = (1 + (x >> 8) as usize % 5000).min(stream.len() - at);
            w.write_all(&stream[at..at + n]).unwrap();
            at += n;
            if x.is_multiple_of(16) {
                thread::sleep(Duration::from_millis(2));
            }
        }
        w.shutdown(std::net::Shutdown::Write).unwrap();
        reader.join().unwrap()
    });
    r.unwrap();
    assert_eq!(replies, read(fixture("server-replies.bin")));
    assert_like_criu(dir.path());
}

/// A peer that stops sending is a timeout after the idle time, not a hang, and the
/// session commits nothing; so is a peer that drips bytes past the session timeout.
#[test]
fn a_peer_that_stops_sending_times_out() {
    let dir = TempDir::new("ps-idle");
    let srv = PageServer::bind(
        "127.0.0.1:0",
        ServerConfig {
            idle_timeout: Some(Duration::from_millis(300)),
            ..config(dir.path())
        },
    )
    .unwrap();
    let stream = criu_stream();
    let t = Instant::now();
    let (r, _) = session(&srv, |mut c| {
        c.write_all(&stream[..5000]).unwrap();
        // Hold the connection open, silent, until the server gives up.
        let mut b = Vec::new();
        let _ = c.read_to_end(&mut b);
    });
    let e = r.unwrap_err().kind;
    assert!(
        matches!(e, SessionErrorKind::Timeout { after, offset, .. } if after == Duration::from_millis(300) && offset == 5000),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(names(dir.path()).is_empty());

    let srv = PageServer::bind(
        "127.0.0.1:0",
        ServerConfig {
            idle_timeout: Some(Duration::from_secs(5)),
            session_timeout: Some(Duration::from_millis(400)),
            ..config(dir.path())
        },
    )
    .unwrap();
    let t = Instant::now();
    let (r, _) = session(&srv, |mut c| {
        for b in &stream[..100] {
            if c.write_all(&[*b]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    let e = r.unwrap_err().kind;
    assert!(
        matches!(e, SessionErrorKind::Timeout { after, .. } if after == Duration::from_millis(400)),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(names(dir.path()).is_empty());
}

fn header(cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> [u8; 32] {
    Header {
        cmd,
        pad: 0,
        nr_pages,
        vaddr,
        dst_id,
    }
    .to_bytes()
}

/// Unknown commands, a header claiming 2^40 pages, flags on `CLOSE`, an unknown image
/// type: each ends its session with a typed error at the message's offset, at once,
/// reading nothing more; the server goes on serving other connections.
#[test]
fn bad_messages_end_their_session_and_the_server_goes_on() {
    let dir = TempDir::new("ps-bad");
    let running = PageServer::bind("127.0.0.1:0", config(dir.path()))
        .unwrap()
        .spawn()
        .unwrap();
    let addr = running.local_addr().unwrap();
    let open = Message::Open2 {
        image: ImageId::pagemap(1).unwrap(),
    }
    .encode();
    let bad: [(&str, [u8; 32]); 4] = [
        ("unknown command", header(0x99, 0, 0, 0)),
        ("2^40 pages", header(4 << 16 | 6, 1 << 40, 0x1000, 0x101)),
        ("flags on CLOSE", header(4 << 16 | 0x1023, 0, 0, 0)),
        ("image type 3", header(4, 0, 0, 0x103)),
    ];
    for (what, h) in bad {
        let t = Instant::now();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(&open).unwrap();
        s.write_all(&h).unwrap();
        // Nothing after the header: a server that waited for the 2^40 pages would hang.
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        assert_eq!(back, [0], "{what}: only OPEN2 is answered");
        let out = running.next_outcome(Duration::from_secs(5)).unwrap();
        let e = out.result.unwrap_err().kind;
        let SessionErrorKind::Wire(w) = &e else {
            panic!("{what}: {e}")
        };
        assert_eq!(w.offset, 32, "{what}");
        let ok = match what {
            "unknown command" => matches!(w.kind, WireErrorKind::UnknownCommand { cmd: 0x99 }),
            "2^40 pages" => {
                matches!(w.kind, WireErrorKind::TooManyPages { pages, .. } if pages == 1 << 40)
            }
            "flags on CLOSE" => matches!(
                w.kind,
                WireErrorKind::FlagsNotAllowed {
                    command: Command::Close,
                    flags: 4
                }
            ),
            _ => matches!(w.kind, WireErrorKind::UnknownImageType { dst_id: 0x103 }),
        };
        assert!(ok, "{what}: {e}");
        assert!(t.elapsed() < Duration::from_secs(2), "{what}");
    }
    // A good session after the bad ones.
    let mut c = PageServerClient::connect(addr, 2).unwrap();
    let ps = page_size();
    c.send_entry(
        PagemapEntry {
            vaddr: 0x10 * ps as u64,
            pages: 1,
            flags: PageFlags::PRESENT,
        },
        &vec![5u8; ps],
    )
    .unwrap();
    c.close().unwrap();
    assert!(
        running
            .next_outcome(Duration::from_secs(5))
            .unwrap()
            .result
            .is_ok()
    );
    let stats = running.stop();
    assert_eq!(
        (stats.sessions, stats.ok, stats.failed, stats.refused),
        (5, 1, 4, 0)
    );
    assert_eq!(names(dir.path()), ["pagemap-2.img", "pages-65537.img"]);
}

/// Entries of one image that go back or overlap are refused with the entry and where
/// the one before ended; nothing is committed.
#[test]
fn out_of_order_and_overlapping_entries_are_refused() {
    let ps = page_size() as u64;
    let img = ImageId::pagemap(3).unwrap();
    for (second, prev_end) in [(0x1000 * ps, 0x2002 * ps), (0x2001 * ps, 0x2002 * ps)] {
        let dir = TempDir::new("ps-order");
        let srv = server(dir.path());
        let mut s = Message::Open2 { image: img }.to_vec();
        s.extend(
            Message::add_f(
                img,
                PagemapEntry {
                    vaddr: 0x2000 * ps,
                    pages: 2,
                    flags: PageFlags::PRESENT,
                },
            )
            .encode(),
        );
        s.extend(vec![1u8; 2 * ps as usize]);
        let bad = PagemapEntry {
            vaddr: second,
            pages: 1,
            flags: PageFlags::LAZY,
        };
        let at = s.len() as u64;
        s.extend(Message::add_f(img, bad).encode());
        s.extend(Message::Close.encode());
        let (r, _) = session(&srv, |c| replay(c, &s, 1 << 16, Duration::ZERO));
        let e = r.unwrap_err().kind;
        assert!(
            matches!(
                e,
                SessionErrorKind::Rules {
                    offset,
                    error: RuleError::OutOfOrder { entry, prev_end: p, .. }
                } if offset == at && entry == bad && p == prev_end
            ),
            "{e}"
        );
        assert!(names(dir.path()).is_empty());
    }
}

/// A server that goes away mid-dump: the client's send fails with a typed error (EPIPE
/// or a reset, never a signal), and the client refuses to go on out of step; through a
/// snapshot, the dump error carries the client's error.
#[test]
fn a_server_that_goes_away_is_a_typed_client_error() {
    let ps = page_size();
    let (a, mut b) = UnixStream::pair().unwrap();
    let peer = thread::spawn(move || {
        let mut h = [0u8; 32];
        b.read_exact(&mut h).unwrap();
        b.write_all(&[0]).unwrap();
        // Gone without reading anything more.
    });
    let mut c = PageServerClient::from_unix(a).unwrap();
    c.open(ImageId::pagemap(4).unwrap()).unwrap();
    peer.join().unwrap();
    let mem = patterned(64, 3);
    let base = 0x7f00_0000_0000u64;
    let source = Source::new().with_slice(base, &mem[..]).unwrap();
    let plan = [Span::Pages {
        addr: base,
        pages: 64,
        flags: BufFlags::empty(),
    }];
    let e = snapshot(&source, plan, &mut c, &SnapshotOptions::default()).unwrap_err();
    let page_pipe::snapshot::SnapshotError::Dump(d) = &e else {
        panic!("{e}")
    };
    let DumpErrorKind::Sink { error, .. } = &d.kind else {
        panic!("{d}")
    };
    let inner = error
        .get_ref()
        .and_then(|i| i.downcast_ref::<ClientError>())
        .expect("the client's error inside");
    match inner {
        ClientError::Io {
            op: ClientOp::SendPages { .. },
            error,
            ..
        } => assert!(
            matches!(
                error.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{error}"
        ),
        other => panic!("{other}"),
    }
    let again = c.send_entry(
        PagemapEntry {
            vaddr: 0,
            pages: 1,
            flags: PageFlags::PRESENT,
        },
        &vec![0u8; ps],
    );
    assert!(
        matches!(again, Err(ClientError::Broken { .. })),
        "{again:?}"
    );
    assert!(matches!(c.close(), Err(ClientError::Broken { .. })));
}

/// A server that never answers `OPEN2` makes the client time out; one that closes
/// instead of answering is `Closed`, naming the reply it waited for.
#[test]
fn a_server_that_does_not_answer_is_a_client_timeout() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut c = PageServerClient::from_unix(a).unwrap();
    c.set_timeout(Some(Duration::from_millis(200))).unwrap();
    let t = Instant::now();
    let e = c.open(ImageId::pagemap(1).unwrap()).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Timeout {
                op: ClientOp::Receive {
                    expected: Expected::Open2Reply
                },
                ..
            }
        ),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
    drop(b);

    let (a, mut b) = UnixStream::pair().unwrap();
    let peer = thread::spawn(move || {
        let mut h = [0u8; 32];
        b.read_exact(&mut h).unwrap();
    });
    let mut c = PageServerClient::from_unix(a).unwrap();
    let e = c.open(ImageId::pagemap(1).unwrap()).unwrap_err();
    peer.join().unwrap();
    assert!(
        matches!(
            e,
            ClientError::Closed {
                expected: Expected::Open2Reply,
                got: 0,
                ..
            }
        ),
        "{e}"
    );
}

/// After `CLOSE` the client must close: data instead is an error (the images are
/// committed by then, as the reply said).
#[test]
fn data_after_close_is_an_error() {
    let dir = TempDir::new("ps-after");
    let srv = server(dir.path());
    let mut s = Message::Open2 {
        image: ImageId::pagemap(8).unwrap(),
    }
    .to_vec();
    s.extend(Message::Close.encode());
    s.extend(Message::Close.encode());
    let (r, replies) = session(&srv, |c| replay(c, &s, 1 << 16, Duration::ZERO));
    assert_eq!(replies, [0, 0, 0, 0, 0]);
    let e = r.unwrap_err().kind;
    assert!(
        matches!(e, SessionErrorKind::DataAfterClose { offset: 64 }),
        "{e}"
    );
}
