//! The server against hostile peers beyond the faults table: a peer that stalls in the
//! middle of a large payload, stalled peers holding every session slot, ids at the
//! edges of `dst_id`, `GET`s for images that are not there, and a server that ran out
//! of file descriptors.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::thread;
use std::time::{Duration, Instant};

use page_pipe::image::{Image, PageFlags, PagemapEntry};
use page_pipe::page_server::wire::{Expected, Header, ImageId, Message};
use page_pipe::page_server::{
    PageServer, PageServerClient, RuleError, ServerConfig, SessionErrorKind, SessionOp,
};
use page_pipe::page_size;
use page_pipe_tests::{TempDir, alone, limit_open_files};

use super::{config, names, replay, server, session};

/// A peer that stops half way through a payload large enough to be spliced from the
/// socket times out after the idle time, at the offset it stopped, and commits nothing.
#[test]
fn a_peer_that_stalls_inside_a_spliced_payload_times_out() {
    let dir = TempDir::new("ps-stall-pages");
    let srv = PageServer::bind(
        "127.0.0.1:0",
        ServerConfig {
            idle_timeout: Some(Duration::from_millis(300)),
            ..config(dir.path())
        },
    )
    .unwrap();
    let ps = page_size();
    let img = ImageId::pagemap(5).unwrap();
    let entry = PagemapEntry {
        vaddr: 0x100 * ps as u64,
        pages: 256,
        flags: PageFlags::PRESENT,
    };
    let mut s = Message::Open2 { image: img }.to_vec();
    s.extend(Message::add_f(img, entry).encode());
    // 100 of its 256 pages: past what the receive buffer takes, into the splice path.
    s.extend(vec![3u8; 100 * ps]);
    let sent = s.len() as u64;
    let t = Instant::now();
    let (r, _) = session(&srv, |mut c| {
        c.write_all(&s).unwrap();
        let mut b = Vec::new();
        let _ = c.read_to_end(&mut b);
    });
    let e = r.unwrap_err().kind;
    assert!(
        matches!(
            e,
            SessionErrorKind::Timeout {
                offset,
                op: SessionOp::Receive {
                    expected: Expected::Pages { entry: got }
                },
                after,
            } if offset == sent && got == entry && after == Duration::from_millis(300)
        ),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
}

/// Peers that connect and say nothing hold every session slot only until the idle
/// timeout: a client queued behind them is served after it, and each stalled session
/// is counted as failed by timeout.
#[test]
fn stalled_peers_in_every_slot_only_delay_the_next_client() {
    let dir = TempDir::new("ps-slots");
    let idle = Duration::from_millis(300);
    let running = PageServer::bind(
        "127.0.0.1:0",
        ServerConfig {
            max_sessions: 2,
            idle_timeout: Some(idle),
            ..config(dir.path())
        },
    )
    .unwrap()
    .spawn()
    .unwrap();
    let addr = running.local_addr().unwrap();
    // Timed from before the stalled peers connect: their sessions' idle time starts
    // after that, so the next client cannot be answered sooner than `idle` from here.
    let t = Instant::now();
    let stalled: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let mut c = PageServerClient::connect(addr, 9).unwrap();
    let waited = t.elapsed();
    let ps = page_size();
    c.send_entry(
        PagemapEntry {
            vaddr: 0x10 * ps as u64,
            pages: 1,
            flags: PageFlags::PRESENT,
        },
        &vec![4u8; ps],
    )
    .unwrap();
    c.close().unwrap();
    // Its OPEN2 was answered only once a stalled session gave up.
    assert!(waited >= idle, "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    let mut timeouts = 0;
    for _ in 0..3 {
        let out = running.next_outcome(Duration::from_secs(5)).unwrap();
        match out.result {
            Ok(r) => assert_eq!(r.images.len(), 1),
            Err(e) => {
                assert!(
                    matches!(e.kind, SessionErrorKind::Timeout { offset: 0, .. }),
                    "{e}"
                );
                timeouts += 1;
            }
        }
    }
    assert_eq!(timeouts, 2);
    drop(stalled);
    let stats = running.stop();
    assert_eq!((stats.sessions, stats.ok, stats.failed), (3, 1, 2));
    assert_eq!(names(dir.path()), ["pagemap-9.img", "pages-65537.img"]);
}

/// Ids at the edges of `dst_id` (0 and 2^56 - 1) make plain numbered names; an old type
/// number for an image already opened is the same image, opened twice.
#[test]
fn ids_at_the_edges_name_files_by_number_and_aliases_are_one_image() {
    let dir = TempDir::new("ps-ids");
    let srv = server(dir.path());
    let ps = page_size();
    let mut s = Vec::new();
    for id in [0, ImageId::MAX_ID] {
        let img = ImageId::pagemap(id).unwrap();
        s.extend(Message::Open2 { image: img }.encode());
        let e = PagemapEntry {
            vaddr: 0x10 * ps as u64,
            pages: 1,
            flags: PageFlags::LAZY,
        };
        s.extend(Message::add_f(img, e).encode());
    }
    s.extend(Message::Close.encode());
    let (r, replies) = session(&srv, |c| replay(c, &s, 1 << 16, Duration::ZERO));
    assert_eq!(r.unwrap().images.len(), 2);
    assert_eq!(replies, [0, 0, 0, 0, 0, 0]);
    // Each with its (empty) pages file, as CRIU's server writes them.
    assert_eq!(
        names(dir.path()),
        [
            "pagemap-0.img",
            "pagemap-72057594037927935.img",
            "pages-65537.img",
            "pages-65538.img"
        ]
    );

    // OPEN2 of pagemap-3 as type 1, then as type 10 (CRIU before 3.3 sent that number).
    let dir = TempDir::new("ps-alias");
    let srv = server(dir.path());
    let img = ImageId::pagemap(3).unwrap();
    let mut s = Message::Open2 { image: img }.to_vec();
    let alias = Header {
        cmd: 4,
        pad: 0,
        nr_pages: 0,
        vaddr: 0,
        dst_id: 3 << 8 | 10,
    };
    s.extend(alias.to_bytes());
    s.extend(Message::Close.encode());
    let (r, replies) = session(&srv, |c| replay(c, &s, 1 << 16, Duration::ZERO));
    let e = r.unwrap_err().kind;
    assert!(
        matches!(e, SessionErrorKind::Rules { offset: 32, error: RuleError::Reopened { image } } if image == img),
        "{e}"
    );
    assert_eq!(replies, [0]);
    assert!(names(dir.path()).is_empty());
}

/// `GET` for an image the directory does not hold (any id, the largest included) ends
/// the session with an error naming the id and the offset; nothing is sent back.
#[test]
fn get_for_an_absent_image_is_an_error_naming_it() {
    let dir = TempDir::new("ps-get-absent");
    let srv = server(dir.path());
    let ps = page_size() as u64;
    for id in [1, u64::MAX] {
        let s = Message::Get {
            id,
            vaddr: 0x10 * ps,
            pages: 4,
        }
        .to_vec();
        let (r, replies) = session(&srv, |c| replay(c, &s, 1 << 16, Duration::ZERO));
        let e = r.unwrap_err();
        assert!(
            matches!(e.kind, SessionErrorKind::GetImage { offset: 0, id: i, .. } if i == id),
            "{e}"
        );
        assert!(e.kind.to_string().contains(&id.to_string()), "{e}");
        assert!(replies.is_empty());
    }
    assert!(names(dir.path()).is_empty());
}

/// CPU ticks (user + system) a thread has run, from its `stat` file opened before.
fn ticks(stat: &File) -> u64 {
    let mut b = vec![0u8; 1024];
    let n = stat.read_at(&mut b, 0).unwrap();
    let s = String::from_utf8_lossy(&b[..n]).into_owned();
    // Fields after the command name, which ends with the last ')': state is field 3,
    // utime 14 and stime 15.
    let rest: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split(' ').collect();
    rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap()
}

/// A server whose process has no file descriptor left cannot accept the connection
/// waiting for it: it waits for descriptors to come back instead of spinning on
/// `accept` (as many sessions each holding images open can cause), and serves the
/// connection once they do.
#[test]
fn a_server_out_of_descriptors_waits_instead_of_spinning() {
    if !alone("hostile::a_server_out_of_descriptors_waits_instead_of_spinning") {
        return;
    }
    limit_open_files(256);
    let dir = TempDir::new("ps-emfile");
    let running = PageServer::bind("127.0.0.1:0", config(dir.path()))
        .unwrap()
        .spawn()
        .unwrap();
    let addr = running.local_addr().unwrap();
    // The accept thread (once it has named itself), and its stat file, found while
    // descriptors are left.
    let t = Instant::now();
    let stat = loop {
        let found = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .find(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "page-server")
            })
            .map(|t| File::open(t.path().join("stat")).unwrap());
        if let Some(f) = found {
            break f;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no accept thread");
        thread::sleep(Duration::from_millis(10));
    };
    let sock = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::STREAM,
        None,
    )
    .unwrap();
    let mut filler = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => filler.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                break;
            }
        }
    }
    // Connecting takes no descriptor: the connection waits in the listener's queue.
    rustix::net::connect(&sock, &addr).unwrap();
    thread::sleep(Duration::from_millis(100));
    let before = ticks(&stat);
    thread::sleep(Duration::from_secs(1));
    let spent = ticks(&stat) - before;
    drop(filler);
    let mut c = PageServerClient::from_tcp(std::net::TcpStream::from(sock)).unwrap();
    c.open(ImageId::pagemap(1).unwrap()).unwrap();
    c.close().unwrap();
    let stats = running.stop();
    assert_eq!((stats.sessions, stats.ok), (1, 1));
    // A clock tick is 10 ms: a spinning thread runs for most of the 100 in that second.
    assert!(spent <= 10, "the accept thread ran {spent} ticks in 1 s");
    assert!(Image::open(dir.path()).is_ok());
}

/// Plays a hostile server: reads one header, then writes `reply` and closes.
fn answers(reply: Vec<u8>) -> (PageServerClient, thread::JoinHandle<()>) {
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let t = thread::spawn(move || {
        let mut h = [0u8; 32];
        if b.read_exact(&mut h).is_ok() {
            let _ = b.write_all(&reply);
        }
    });
    (PageServerClient::from_unix(a).unwrap(), t)
}

/// The client against a server that answers garbage: each wrong reply is a typed
/// error naming what it waited for, and the client refuses to go on out of step.
#[test]
fn the_client_refuses_garbage_replies() {
    use page_pipe::page_server::ClientError;
    use page_pipe::page_server::wire::WireErrorKind;
    let img = ImageId::pagemap(1).unwrap();
    let ps = page_size();
    let bad_reply = |e: &ClientError, want: Expected| matches!(e, ClientError::Reply { error: WireErrorKind::BadReply { expected, .. }, .. } if *expected == want);

    // OPEN2 answered with 7.
    let (mut c, t) = answers(vec![7]);
    let e = c.open(img).unwrap_err();
    t.join().unwrap();
    assert!(bad_reply(&e, Expected::Open2Reply), "{e}");
    assert!(matches!(c.close(), Err(ClientError::Broken { .. })));

    // PARENT answered with 2.
    let (mut c, t) = answers(2i32.to_ne_bytes().to_vec());
    let e = c.parent_has(img).unwrap_err();
    t.join().unwrap();
    assert!(bad_reply(&e, Expected::ParentReply), "{e}");

    // CLOSE answered with -1: refused, not success.
    let (c, t) = answers((-1i32).to_ne_bytes().to_vec());
    let e = c.close().unwrap_err();
    t.join().unwrap();
    assert!(matches!(e, ClientError::Refused { status: -1, .. }), "{e}");

    // CLOSE answered with two bytes, then the end: closed, naming the reply.
    let (c, t) = answers(vec![0, 0]);
    let e = c.close().unwrap_err();
    t.join().unwrap();
    assert!(
        matches!(
            e,
            ClientError::Closed {
                expected: Expected::CloseReply,
                got: 2,
                ..
            }
        ),
        "{e}"
    );

    // GET answered for another address, with more pages than asked, or cut short.
    let vaddr = 0x10 * ps as u64;
    let header = |vaddr: u64, pages: u64| page_pipe::page_server::wire::get_reply(1, vaddr, pages);
    for (what, reply) in [
        ("another address", header(vaddr + ps as u64, 1).to_vec()),
        ("more pages", header(vaddr, 5).to_vec()),
        ("no pages", header(vaddr, 0).to_vec()),
        ("cut", [&header(vaddr, 2)[..], &vec![1u8; ps + 10]].concat()),
    ] {
        let (mut c, t) = answers(reply);
        let mut buf = vec![0u8; 4 * ps];
        let e = c.get(1, vaddr, &mut buf).unwrap_err();
        t.join().unwrap();
        if what == "cut" {
            assert!(
                matches!(e, ClientError::Closed { expected: Expected::Pages { entry }, got, .. } if entry.pages == 2 && got == ps + 10),
                "{what}: {e}"
            );
        } else {
            assert!(bad_reply(&e, Expected::GetReply), "{what}: {e}");
        }
        assert!(
            e.to_string().contains("a Unix socket peer") || e.to_string().contains("unix"),
            "{what}: {e}"
        );
        assert!(
            matches!(c.get(1, vaddr, &mut buf), Err(ClientError::Broken { .. })),
            "{what}"
        );
    }
}

/// With [`Layout::Chain`](page_pipe::page_server::Layout::Chain), a directory already
/// numbered `u64::MAX` leaves no number for the next session: a typed error naming the
/// directory, no panic, and a running server keeps its session slot.
#[test]
fn a_chain_with_no_number_left_is_an_error_not_a_panic() {
    use page_pipe::page_server::Layout;
    let dir = TempDir::new("ps-chain-max");
    std::fs::create_dir(dir.path().join(u64::MAX.to_string())).unwrap();
    let cfg = ServerConfig {
        layout: Layout::Chain,
        max_sessions: 1,
        ..config(dir.path())
    };
    let s = Message::Open2 {
        image: ImageId::pagemap(1).unwrap(),
    }
    .to_vec();
    let srv = PageServer::bind("127.0.0.1:0", cfg.clone()).unwrap();
    let (r, replies) = session(&srv, |c| replay(c, &s, 1 << 16, Duration::ZERO));
    let e = r.unwrap_err();
    assert!(
        matches!(&e.kind, SessionErrorKind::ChainFull { dir: d } if d == dir.path()),
        "{e}"
    );
    assert!(replies.is_empty());
    // The same through a running server with one slot: the slot comes back.
    let running = PageServer::bind("127.0.0.1:0", cfg)
        .unwrap()
        .spawn()
        .unwrap();
    let addr = running.local_addr().unwrap();
    for _ in 0..2 {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(&s).unwrap();
        let out = running
            .next_outcome(Duration::from_secs(5))
            .expect("an outcome");
        assert!(out.result.is_err());
    }
    let stats = running.stop();
    assert_eq!((stats.sessions, stats.failed), (2, 2));
}

/// A session whose `CLOSE` fails commits none of its images: the reply is -1, and the
/// directory holds no image of it. Here the second image cannot be committed (a
/// directory sits at its pagemap's name); the first used to be committed before it.
#[test]
fn a_close_that_fails_commits_no_image_of_the_session() {
    let dir = TempDir::new("ps-close-fails");
    std::fs::create_dir(dir.path().join("pagemap-2.img")).unwrap();
    let srv = server(dir.path());
    let ps = page_size();
    let mut s = Vec::new();
    for id in [1, 2] {
        let img = ImageId::pagemap(id).unwrap();
        s.extend(Message::Open2 { image: img }.encode());
        let e = PagemapEntry {
            vaddr: 0x10 * ps as u64,
            pages: 1,
            flags: PageFlags::PRESENT,
        };
        s.extend(Message::add_f(img, e).encode());
        s.extend(vec![id as u8; ps]);
    }
    s.extend(Message::Close.encode());
    let (r, replies) = session(&srv, |c| replay(c, &s, 1 << 16, Duration::ZERO));
    let e = r.unwrap_err();
    assert!(matches!(e.kind, SessionErrorKind::Image { .. }), "{e}");
    assert_eq!(replies, [0, 0, 0xff, 0xff, 0xff, 0xff]);
    assert!(
        !dir.path().join("pagemap-1.img").exists(),
        "{:?}",
        names(dir.path())
    );
}

/// A server that answers `OPEN2` and then stops reading: the client's send of a large
/// entry times out naming the entry, instead of blocking for ever, and the client is
/// then out of step (broken).
#[test]
fn a_server_that_stops_reading_times_the_client_out() {
    use page_pipe::page_server::{ClientError, ClientOp};
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut c = PageServerClient::from_unix(a).unwrap();
    c.set_timeout(Some(Duration::from_millis(200))).unwrap();
    let peer = thread::spawn(move || {
        let mut h = [0u8; 32];
        b.read_exact(&mut h).unwrap();
        b.write_all(&[0]).unwrap();
        // Holds the socket open, reading nothing, until the client gives up.
        thread::sleep(Duration::from_secs(2));
    });
    c.open(ImageId::pagemap(1).unwrap()).unwrap();
    let ps = page_size();
    let pages = 16 << 20 >> ps.trailing_zeros();
    let e = PagemapEntry {
        vaddr: 0x100 * ps as u64,
        pages: pages as u64,
        flags: PageFlags::PRESENT,
    };
    let t = Instant::now();
    let err = c.send_entry(e, &vec![1u8; pages * ps]).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(
        matches!(err, ClientError::Timeout { op: ClientOp::SendPages { entry }, after, .. } if entry == e && after == Duration::from_millis(200)),
        "{err}"
    );
    assert!(matches!(
        c.send_entry(e, &vec![1u8; pages * ps]),
        Err(ClientError::Broken { .. })
    ));
    drop(c);
    peer.join().unwrap();
}
