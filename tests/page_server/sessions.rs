//! Round trips (client -> server -> image), parents and holes, `GET`, the legacy
//! commands, several clients at once, and stopping.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use memmap2::MmapOptions;
use page_pipe::image::{Image, PageFlags, PagemapEntry};
use page_pipe::page_server::wire::{ImageId, Message};
use page_pipe::page_server::{
    ClientError, Layout, PageServer, PageServerClient, ServerConfig, SessionErrorKind,
};
use page_pipe::snapshot::{SnapshotOptions, Span, snapshot, spans_from};
use page_pipe::{BufFlags, HoleFlags, Source, page_size};
use page_pipe_tests::{TempDir, Unprivileged, alone, assert_restores, fill_pattern, patterned};

use super::{config, criu_stream, fixture, names, read, replay, server, session};

/// Whether page `i` changes between snapshots.
fn dirty(i: u64) -> bool {
    i % 7 == 3 || (40..45).contains(&i)
}

/// A full dump of 200 pages (a lazy stretch in the middle) and an incremental one on top
/// (the changed pages, the rest as holes), each a session of its own into a server with
/// `Layout::Chain`; the second image, read through the chain, is the memory.
fn round_trip(
    connect: &dyn Fn(u64) -> PageServerClient,
    running: page_pipe::page_server::RunningServer,
    dir: &Path,
) {
    let ps = page_size();
    let base = 0x7f10_0000_0000u64;
    let mut mem = patterned(200, 9);
    let plan = [
        Span::Pages {
            addr: base,
            pages: 100,
            flags: BufFlags::empty(),
        },
        Span::Pages {
            addr: base + 100 * ps as u64,
            pages: 50,
            flags: BufFlags::LAZY,
        },
        Span::Pages {
            addr: base + 150 * ps as u64,
            pages: 50,
            flags: BufFlags::empty(),
        },
    ];
    {
        let source = Source::new().with_slice(base, &mem[..]).unwrap();
        let mut c = connect(1);
        assert!(!c.has_parent(), "the first session has no parent");
        snapshot(&source, plan, &mut c, &SnapshotOptions::default()).unwrap();
        let sent = c.close().unwrap();
        assert_eq!(sent.present_pages, 200);
    }
    let first = running.next_outcome(Duration::from_secs(10)).unwrap();
    let r = first.result.unwrap();
    assert_eq!(r.images[0].dir, dir.join("1"));
    assert_restores(&dir.join("1"), base, &mem);

    for (i, page) in mem.chunks_exact_mut(ps).enumerate() {
        if dirty(i as u64) {
            fill_pattern(page, 77);
        }
    }
    {
        let source = Source::new().with_slice(base, &mem[..]).unwrap();
        let mut c = connect(1);
        assert!(
            c.has_parent(),
            "the second session's parent holds pagemap-1"
        );
        let plan = spans_from(base, 200, ps, dirty, BufFlags::empty(), HoleFlags::PARENT);
        snapshot(&source, plan, &mut c, &SnapshotOptions::default()).unwrap();
        let sent = c.close().unwrap();
        assert_eq!(
            sent.present_pages,
            (0..200).filter(|&i| dirty(i)).count() as u64
        );
        assert_eq!(sent.parent_pages + sent.present_pages, 200);
    }
    let second = running.next_outcome(Duration::from_secs(10)).unwrap();
    second.result.unwrap();
    let img = Image::open(dir.join("2")).unwrap();
    assert_eq!(img.depth(), 2);
    assert_restores(&dir.join("2"), base, &mem);
    let stats = running.stop();
    assert_eq!(stats.sessions, 2);
}

fn chain_config(dir: &Path) -> ServerConfig {
    ServerConfig {
        layout: Layout::Chain,
        ..config(dir)
    }
}

#[test]
fn a_dump_round_trips_over_tcp() {
    let dir = TempDir::new("ps-rt-tcp");
    let running = PageServer::bind("127.0.0.1:0", chain_config(dir.path()))
        .unwrap()
        .spawn()
        .unwrap();
    let addr = running.local_addr().unwrap();
    round_trip(
        &|id| PageServerClient::connect(addr, id).unwrap(),
        running,
        dir.path(),
    );
}

#[test]
fn a_dump_round_trips_over_a_unix_socket() {
    let dir = TempDir::new("ps-rt-unix");
    let sock = dir.path().join("ps.sock");
    let running = PageServer::bind_unix(&sock, chain_config(&dir.path().join("img")))
        .unwrap()
        .spawn()
        .unwrap();
    assert_eq!(running.unix_path(), Some(sock.as_path()));
    round_trip(
        &|id| PageServerClient::connect_unix(&sock, id).unwrap(),
        running,
        &dir.path().join("img"),
    );
    assert!(!sock.exists(), "the socket goes with the server");
}

/// As user nobody (smaller pipes, no privileges): the same round trip over a socket
/// pair, through the pipes and the server's splice path.
#[test]
fn a_dump_round_trips_unprivileged() {
    match page_pipe_tests::unprivileged("sessions::a_dump_round_trips_unprivileged") {
        Unprivileged::RunBody => {}
        Unprivileged::Passed | Unprivileged::Skipped => return,
    }
    let dir = TempDir::new("ps-rt-nobody");
    let srv = server(dir.path());
    let ps = page_size();
    let base = 0x7f20_0000_0000u64;
    // Owned anonymous memory: it may go by reference, so the dump goes through pipes.
    let mut m = MmapOptions::new().len(512 * ps).map_anon().unwrap();
    fill_pattern(&mut m, 4);
    let want = m.to_vec();
    let source = Source::new()
        .with_mmap(base, m.make_read_only().unwrap())
        .unwrap();
    let (r, report) = session(&srv, |a| {
        let mut c = PageServerClient::from_unix(a).unwrap();
        c.open(ImageId::pagemap(5).unwrap()).unwrap();
        let plan = [Span::Pages {
            addr: base,
            pages: 512,
            flags: BufFlags::empty(),
        }];
        // Through pipes: sealed pages go into the socket by reference.
        let opts = SnapshotOptions {
            drain: page_pipe::snapshot::Drain::Pipes,
            ..SnapshotOptions::default()
        };
        let r = snapshot(&source, plan, &mut c, &opts).unwrap();
        c.close().unwrap();
        r
    });
    r.unwrap();
    assert_eq!(report.path, page_pipe::CapturePath::VmspliceGift);
    assert_restores(dir.path(), base, &want);
}

/// Pages of borrowed memory reach the server as the capture saw them, though the memory
/// changes before the server reads: they went as copies.
#[test]
fn borrowed_memory_reaches_the_server_as_captured() {
    let ps = page_size();
    let base = 0x7f30_0000_0000u64;
    let mut mem = patterned(4, 6);
    let before = mem.to_vec();
    let (a, mut b) = UnixStream::pair().unwrap();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let peer = thread::spawn(move || {
        let mut h = [0u8; 32];
        b.read_exact(&mut h).unwrap();
        b.write_all(&[0]).unwrap();
        go_rx.recv().unwrap();
        let mut h = [0u8; 32];
        b.read_exact(&mut h).unwrap();
        let mut pages = vec![0u8; 4 * ps];
        b.read_exact(&mut pages).unwrap();
        pages
    });
    let mut c = PageServerClient::from_unix(a).unwrap();
    c.open(ImageId::pagemap(6).unwrap()).unwrap();
    {
        let source = Source::new().with_slice(base, &mem[..]).unwrap();
        let mut pp = page_pipe::PagePipe::builder()
            .iov_budget(4)
            .build()
            .unwrap();
        pp.add_pages(base, 4, BufFlags::empty()).unwrap();
        let mut captured = pp.capture(&source).unwrap();
        captured.dump(&mut c).unwrap();
    }
    mem.fill(0xee);
    go_tx.send(()).unwrap();
    assert!(peer.join().unwrap() == before, "the server got later bytes");
}

/// Copies the recorded session's images into `dir`.
fn criu_images(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["pagemap-12856.img", "pages-65537.img"] {
        std::fs::copy(fixture(f), dir.join(f)).unwrap();
    }
}

/// With a `parent` link to CRIU's images, the server answers `OPEN2` with 1 and
/// `PARENT` with 1 for the image the parent holds (0 for others), writes the recorded
/// session as before, keeps the link, and checks holes against the parent.
#[test]
fn a_parent_is_answered_and_holes_are_checked() {
    let top = TempDir::new("ps-parent");
    criu_images(&top.path().join("prev"));
    let dir = top.path().join("cur");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink("../prev", dir.join("parent")).unwrap();
    let srv = server(&dir);
    let pid = ImageId::pagemap(12856).unwrap();
    let other = ImageId::pagemap(99).unwrap();

    // PARENT queries, then the recorded session.
    let mut s = Message::Parent { image: pid }.to_vec();
    s.extend(Message::Parent { image: other }.encode());
    s.extend(criu_stream());
    let (r, replies) = session(&srv, |c| replay(c, &s, 1 << 20, Duration::ZERO));
    r.unwrap();
    assert_eq!(replies, [1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
    assert!(read(dir.join("pages-65537.img")) == read(fixture("pages-65537.img")));
    assert!(read(dir.join("pagemap-12856.img")) == read(fixture("pagemap-12856.img")));
    assert_eq!(
        std::fs::read_link(dir.join("parent")).unwrap(),
        Path::new("../prev")
    );

    // Holes: one the parent covers is written; one it does not is refused; an image the
    // parent lacks takes none.
    let parent = Image::open(top.path().join("prev")).unwrap();
    let e0 = parent.entries()[0];
    let ps = page_size() as u64;
    let cases = [
        (pid, e0.vaddr, e0.pages, None),
        (pid, e0.vaddr + e0.pages * ps, 1, Some("not in parent")),
        (other, e0.vaddr, 1, Some("without parent")),
    ];
    for (image, vaddr, pages, fails) in cases {
        let hole = PagemapEntry {
            vaddr,
            pages,
            flags: PageFlags::PARENT,
        };
        let mut s = Message::Open2 { image }.to_vec();
        s.extend(Message::add_f(image, hole).encode());
        s.extend(Message::Close.encode());
        let before = names(&dir);
        let (r, _) = session(&srv, |c| replay(c, &s, 1 << 20, Duration::ZERO));
        match fails {
            None => {
                r.unwrap();
                let img = Image::open_id(&dir, 12856).unwrap();
                assert_eq!(img.entries(), [hole]);
                assert_eq!(img.depth(), 2);
            }
            Some("not in parent") => {
                let e = r.unwrap_err().kind;
                assert!(
                    matches!(e, SessionErrorKind::HoleNotInParent { vaddr: v, .. } if v == vaddr),
                    "{e}"
                );
                assert_eq!(names(&dir), before);
            }
            Some(_) => {
                let e = r.unwrap_err().kind;
                assert!(
                    matches!(e, SessionErrorKind::HoleWithoutParent { .. }),
                    "{e}"
                );
                assert_eq!(names(&dir), before);
            }
        }
    }
}

/// The legacy commands (`OPEN`, `ADD`, `HOLE`) and a message naming an image that was
/// not opened write what their `ADD_F` forms write.
#[test]
fn legacy_commands_are_accepted() {
    let top = TempDir::new("ps-legacy");
    let dir = top.path();
    let srv = PageServer::bind("127.0.0.1:0", chain_config(dir)).unwrap();
    let ps = page_size();
    let img = ImageId::pagemap(3).unwrap();
    let shm = ImageId::shmem(3).unwrap();
    let v = |p: u64| 0x5000 * ps as u64 + p * ps as u64;
    let mut first = Message::Open { image: img }.to_vec();
    first.extend(
        Message::Add {
            image: img,
            vaddr: v(0),
            pages: 4,
        }
        .encode(),
    );
    first.extend(vec![1u8; 4 * ps]);
    // IO without open: the shared memory image opens itself.
    first.extend(
        Message::Add {
            image: shm,
            vaddr: 0,
            pages: 1,
        }
        .encode(),
    );
    first.extend(vec![2u8; ps]);
    first.extend(Message::Close.encode());
    let (r, replies) = session(&srv, |c| replay(c, &first, 1 << 20, Duration::ZERO));
    let r = r.unwrap();
    assert_eq!(replies, [0, 0, 0, 0], "OPEN and ADD take no reply");
    assert_eq!(
        r.images
            .iter()
            .map(|i| (i.image, i.pages_id))
            .collect::<Vec<_>>(),
        [(img, 65537), (shm, 65538)]
    );
    assert_eq!(
        names(&dir.join("1")),
        [
            "pagemap-3.img",
            "pagemap-shmem-3.img",
            "pages-65537.img",
            "pages-65538.img"
        ]
    );

    let mut second = Message::Open { image: img }.to_vec();
    second.extend(
        Message::Hole {
            image: img,
            vaddr: v(0),
            pages: 2,
        }
        .encode(),
    );
    second.extend(
        Message::Add {
            image: img,
            vaddr: v(2),
            pages: 2,
        }
        .encode(),
    );
    second.extend(vec![3u8; 2 * ps]);
    second.extend(Message::Close.encode());
    let (r, _) = session(&srv, |c| replay(c, &second, 1 << 20, Duration::ZERO));
    r.unwrap();
    let img2 = Image::open_id(dir.join("2"), 3).unwrap();
    assert_eq!(
        img2.entries(),
        [
            PagemapEntry {
                vaddr: v(0),
                pages: 2,
                flags: PageFlags::PARENT
            },
            PagemapEntry {
                vaddr: v(2),
                pages: 2,
                flags: PageFlags::PRESENT
            }
        ]
    );
    let mut back = vec![0u8; 4 * ps];
    img2.read(v(0), &mut back).unwrap();
    assert!(back[..2 * ps].iter().all(|&b| b == 1));
    assert!(back[2 * ps..].iter().all(|&b| b == 3));
}

/// `GET` answers with an `ADD_F | PRESENT` header and the pages the images hold from the
/// address on, clamped to the run they hold; for a page they lack the session ends
/// without a reply, as CRIU's does.
#[test]
fn get_serves_what_the_images_hold() {
    let top = TempDir::new("ps-get");
    criu_images(top.path());
    let running = PageServer::bind("127.0.0.1:0", config(top.path()))
        .unwrap()
        .spawn()
        .unwrap();
    let addr = running.local_addr().unwrap();
    let img = Image::open(top.path()).unwrap();
    let ps = page_size();
    // The dense region's entry: 66 pages.
    let dense = *img.entries().iter().find(|e| e.pages == 66).unwrap();
    let mut want = vec![0u8; 66 * ps];
    img.read(dense.vaddr, &mut want).unwrap();

    let mut c = PageServerClient::connect_tcp(addr).unwrap();
    let mut buf = vec![0u8; 10 * ps];
    assert_eq!(
        c.get(12856, dense.vaddr + 3 * ps as u64, &mut buf).unwrap(),
        10
    );
    assert!(buf[..] == want[3 * ps..13 * ps]);
    // More than the run holds: clamped to its end.
    let mut buf = vec![0u8; 100 * ps];
    assert_eq!(
        c.get(12856, dense.vaddr + 60 * ps as u64, &mut buf)
            .unwrap(),
        6
    );
    assert!(buf[..6 * ps] == want[60 * ps..]);
    // A page in no entry: the session ends.
    let hole = dense.vaddr + 66 * ps as u64;
    assert!(img.entries().iter().all(|e| e.vaddr != hole));
    let e = c.get(12856, hole, &mut buf[..ps]).unwrap_err();
    assert!(matches!(e, ClientError::Closed { .. }), "{e}");
    let out = running.next_outcome(Duration::from_secs(5)).unwrap();
    let e = out.result.unwrap_err().kind;
    assert!(
        matches!(e, SessionErrorKind::GetMissing { id: 12856, vaddr, .. } if vaddr == hole),
        "{e}"
    );
    // Pages of a parent come through the chain; a GET session may end with CLOSE.
    let child = top.path().join("child");
    let mut w = page_pipe::image::ImageWriter::create(&child, 12856)
        .unwrap()
        .with_parent(top.path())
        .unwrap();
    w.push(PagemapEntry {
        flags: PageFlags::PARENT,
        ..dense
    })
    .unwrap();
    w.finish().unwrap();
    let srv = server(&child);
    let (r, got) = session(&srv, |a| {
        let mut c = PageServerClient::from_unix(a).unwrap();
        let mut buf = vec![0u8; 66 * ps];
        let n = c.get(12856, dense.vaddr, &mut buf).unwrap();
        c.close().unwrap();
        (n, buf)
    });
    assert_eq!(r.unwrap().pages_served, 66);
    assert_eq!(got.0, 66);
    assert!(got.1 == want);
    running.stop();
}

/// Several clients at once, more than the server serves at a time: every dump lands,
/// each in its own image with its own pages file.
#[test]
fn several_clients_at_once() {
    let dir = TempDir::new("ps-many");
    let running = PageServer::bind(
        "127.0.0.1:0",
        ServerConfig {
            max_sessions: 3,
            ..config(dir.path())
        },
    )
    .unwrap()
    .spawn()
    .unwrap();
    let addr = running.local_addr().unwrap();
    let base = 0x7f40_0000_0000u64;
    let clients: Vec<_> = (1..=8u64)
        .map(|id| {
            thread::spawn(move || {
                let mem = patterned(64, id as u8);
                let source = Source::new().with_slice(base, &mem[..]).unwrap();
                let mut c = PageServerClient::connect(addr, id).unwrap();
                let plan = [Span::Pages {
                    addr: base,
                    pages: 64,
                    flags: BufFlags::empty(),
                }];
                snapshot(&source, plan, &mut c, &SnapshotOptions::default()).unwrap();
                c.close().unwrap();
                mem.to_vec()
            })
        })
        .collect();
    let mems: Vec<Vec<u8>> = clients.into_iter().map(|t| t.join().unwrap()).collect();
    let mut ids = Vec::new();
    for _ in 0..8 {
        let out = running.next_outcome(Duration::from_secs(10)).unwrap();
        let r = out.result.unwrap();
        ids.push(r.images[0].pages_id);
    }
    ids.sort_unstable();
    assert_eq!(
        ids,
        (65537..65545).collect::<Vec<u32>>(),
        "one pages file each"
    );
    for (i, mem) in mems.iter().enumerate() {
        let img = Image::open_id(dir.path(), i as u64 + 1).unwrap();
        let mut back = vec![0u8; mem.len()];
        img.read(base, &mut back).unwrap();
        assert!(back == *mem, "image {}", i + 1);
    }
    let stats = running.stop();
    assert_eq!((stats.sessions, stats.ok, stats.refused), (8, 8, 0));
}

/// Two sessions writing the same image into the same directory at once: the second is
/// refused; the first is not disturbed.
#[test]
fn the_same_image_from_two_sessions_is_refused() {
    let dir = TempDir::new("ps-busy");
    let srv = server(dir.path());
    let image = ImageId::pagemap(5).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    thread::scope(|s| {
        let first = s.spawn(|| srv.serve(page_pipe::page_server::Incoming::from_unix(b)));
        let mut c = PageServerClient::from_unix(a).unwrap();
        c.open(image).unwrap();
        let s2 = Message::Open2 { image }.to_vec();
        let (r, replies) = session(&srv, |c| replay(c, &s2, 64, Duration::ZERO));
        assert!(replies.is_empty());
        let e = r.unwrap_err().kind;
        assert!(
            matches!(e, SessionErrorKind::Busy { offset: 0, image: i } if i == image),
            "{e}"
        );
        c.close().unwrap();
        first.join().unwrap().unwrap();
    });
    assert_eq!(names(dir.path()), ["pagemap-5.img", "pages-65537.img"]);
    // A later session replacing it keeps its pages id.
    let (r, _) = session(&srv, |a| {
        let mut c = PageServerClient::from_unix(a).unwrap();
        c.open(image).unwrap();
        c.close().unwrap();
    });
    assert_eq!(r.unwrap().images[0].pages_id, 65537);
    assert_eq!(names(dir.path()), ["pagemap-5.img", "pages-65537.img"]);
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Stopping a server with sessions in the middle of a dump ends them (they commit
/// nothing) and joins every thread; no thread and no descriptor is left.
#[test]
fn stop_ends_live_sessions_and_joins_every_thread() {
    if !alone("sessions::stop_ends_live_sessions_and_joins_every_thread") {
        return;
    }
    let dir = TempDir::new("ps-stop");
    let (t0, fds0) = (threads(), page_pipe_tests::open_fds());
    let running = PageServer::bind("127.0.0.1:0", config(dir.path()))
        .unwrap()
        .spawn()
        .unwrap();
    let addr = running.local_addr().unwrap();
    let mut clients = Vec::new();
    for id in 0..3 {
        let mut c = PageServerClient::connect(addr, id).unwrap();
        let ps = page_size();
        c.send_entry(
            PagemapEntry {
                vaddr: 0,
                pages: 1,
                flags: PageFlags::PRESENT,
            },
            &vec![1u8; ps],
        )
        .unwrap();
        clients.push(c);
    }
    let t = Instant::now();
    let stats = running.stop();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!((stats.sessions, stats.ok, stats.failed), (3, 0, 3));
    drop(clients);
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    assert_eq!(threads(), t0);
    assert_eq!(page_pipe_tests::open_fds(), fds0);
}
