//! Live migration (`page_pipe::migrate`): rounds while writers run, each stop condition,
//! cancellation at every phase on both ends, runs outside the receiver's memory, TLS with
//! wrong certificates, peers that die mid-round, and the receiver's memory equal to the
//! sender's.

use std::net::{TcpListener, TcpStream};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use memmap2::{MmapMut, MmapOptions};
use page_pipe::Source;
use page_pipe::image::{PageFlags, PagemapEntry};
use page_pipe::migrate::{
    CancelToken, CancelledBy, MemoryRegion, MigrateError, MigrateErrorKind, MigrateOptions,
    MigrateReport, Phase, ReceiveError, ReceiveErrorKind, ReceiveOptions, ReceiveReport, Sender,
    StopReason, receive,
};
use page_pipe::page_server::wire::{ImageId, Message, WireErrorKind};
use page_pipe::page_server::{Incoming, PageServerClient};
use page_pipe::track::{TrackOptions, TrackRegion, Tracker};
use page_pipe_tests::{alone, open_fds};

mod tls;

const BASE: u64 = 0x7e00_0000_0000;

fn ps() -> usize {
    page_pipe::page_size()
}

fn anon(pages: usize) -> MmapMut {
    MmapOptions::new()
        .len(pages * ps())
        .map_anon()
        .expect("map anonymous memory")
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// A source region written by threads through raw pointers, that can be paused.
struct Running {
    mem: MmapMut,
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    parked: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Running {
    /// `pages` pages filled with a pattern, and `writers` threads each writing a random
    /// page every `every` (spinning when zero).
    fn new(pages: usize, writers: usize, every: Duration) -> Self {
        let mut mem = anon(pages);
        for (i, b) in mem.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) ^ (i >> 12) as u8;
        }
        let mut r = Self {
            mem,
            stop: Arc::default(),
            pause: Arc::default(),
            parked: Arc::default(),
            writes: Arc::default(),
            threads: Vec::new(),
        };
        let base = r.mem.as_mut_ptr() as usize;
        for w in 0..writers {
            let (stop, pause, parked, writes) = (
                r.stop.clone(),
                r.pause.clone(),
                r.parked.clone(),
                r.writes.clone(),
            );
            r.threads.push(thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1);
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    if pause.load(Ordering::Acquire) {
                        parked.fetch_add(1, Ordering::AcqRel);
                        while pause.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
                            thread::sleep(Duration::from_micros(50));
                        }
                        parked.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = (x % pages as u64) as usize;
                    let off = page * ps() + ((x >> 40) as usize % (ps() / 8)) * 8;
                    n += 1;
                    // SAFETY: `off + 8` is within the mapping of `pages` pages, which
                    // outlives this thread (joined before the mapping is dropped); the
                    // memory is only ever written with volatile stores or read by the
                    // kernel and volatile copies while writers run.
                    unsafe { std::ptr::write_volatile((base + off) as *mut u64, n ^ x) };
                    writes.fetch_add(1, Ordering::Relaxed);
                    if !every.is_zero() {
                        thread::sleep(every);
                    }
                }
            }));
        }
        r
    }

    fn region(&self) -> TrackRegion {
        TrackRegion::new(BASE, self.mem.as_ptr(), self.mem.len())
    }

    fn source(&self) -> Source<'_> {
        // SAFETY: the mapping stays mapped while the source lives (it borrows `self`);
        // the writers write it only with volatile stores, and the crate reads it only
        // by the kernel or volatile copies.
        unsafe {
            Source::new().with_volatile(
                BASE,
                NonNull::new(self.mem.as_ptr().cast_mut()).unwrap(),
                self.mem.len(),
            )
        }
        .unwrap()
    }

    fn pause(&self) {
        self.pause.store(true, Ordering::Release);
        while self.parked.load(Ordering::Acquire) < self.threads.len() as u64 {
            thread::yield_now();
        }
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::Release);
    }

    /// Stops and joins the writers; the memory, still.
    fn finish(mut self) -> MmapMut {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        std::mem::replace(&mut self.mem, anon(1))
    }
}

fn tracker(r: &Running, test: &str) -> Option<Tracker> {
    match Tracker::start_async(&[r.region()], &TrackOptions::default()) {
        Ok(t) => Some(t),
        Err(e) => {
            println!("SKIPPED {test}: no asynchronous tracker here: {e}");
            None
        }
    }
}

/// A receiver on a loopback listener, on a thread: its address, and the join handle
/// giving back the region and the result.
type Received = thread::JoinHandle<(MemoryRegion, Result<ReceiveReport, ReceiveError>)>;

fn receiver(pages: usize, opts: ReceiveOptions) -> (std::net::SocketAddr, Received) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let mut dest = MemoryRegion::from_mmap(BASE, anon(pages)).unwrap();
        let conn = Incoming::from_tcp(l.accept().unwrap().0);
        let r = receive(conn, &mut dest, &opts);
        (dest, r)
    });
    (addr, h)
}

fn migrate(
    r: &Running,
    t: &mut Tracker,
    addr: std::net::SocketAddr,
    opts: &MigrateOptions,
) -> Result<MigrateReport, MigrateError> {
    let sender = Sender::connect(addr, opts.cancel.as_ref())?;
    sender.run(&r.source(), t, || r.pause(), || r.resume(), opts)
}

fn pages_differ(a: &[u8], b: &[u8]) -> usize {
    a.chunks(ps())
        .zip(b.chunks(ps()))
        .filter(|(x, y)| x != y)
        .count()
}

/// With writers running, the rounds converge, and at the final pause the receiver's
/// memory equals the sender's, page for page.
#[test]
fn rounds_converge_and_the_receiver_equals_the_sender() {
    let pages = 4096;
    let r = Running::new(pages, 2, Duration::from_micros(20));
    let Some(mut t) = tracker(&r, "rounds_converge_and_the_receiver_equals_the_sender") else {
        return;
    };
    let (addr, h) = receiver(pages, ReceiveOptions::default());
    thread::sleep(Duration::from_millis(20));
    let opts = MigrateOptions {
        downtime: Duration::from_millis(50),
        ..MigrateOptions::default()
    };
    let report = migrate(&r, &mut t, addr, &opts).unwrap();
    let (dest, got) = h.join().unwrap();
    let got = got.unwrap();
    // The source is still paused: its memory holds still.
    let differ = pages_differ(&r.mem, &dest.mmap().unwrap()[..]);
    assert_eq!(differ, 0, "{differ} pages differ; {report:?}");
    assert!(r.writes.load(Ordering::Relaxed) > 0);
    let last = report.rounds.last().unwrap();
    assert!(last.is_final);
    assert_eq!(report.rounds.len(), got.rounds.len());
    assert_eq!(
        report.rounds[0].pages, pages as u64,
        "round 1 sends everything"
    );
    assert_eq!(got.pages(), report.pages());
    for (i, round) in report.rounds.iter().enumerate() {
        assert_eq!(round.round, i as u32 + 1);
        assert_eq!(got.rounds[i].image, ImageId::pagemap(i as u64 + 1).unwrap());
    }
    drop(r.finish());
}

/// No writer: round 1 leaves nothing written, the pre-copy stops on the page threshold,
/// the final round is empty.
#[test]
fn an_idle_source_stops_on_the_page_threshold() {
    let r = Running::new(256, 0, Duration::ZERO);
    let Some(mut t) = tracker(&r, "an_idle_source_stops_on_the_page_threshold") else {
        return;
    };
    let (addr, h) = receiver(256, ReceiveOptions::default());
    let report = migrate(&r, &mut t, addr, &MigrateOptions::default()).unwrap();
    assert_eq!(report.stop, StopReason::FewPages { pages: 0 });
    assert_eq!(report.rounds.len(), 2);
    assert_eq!(report.rounds[1].pages, 0);
    let (dest, got) = h.join().unwrap();
    got.unwrap();
    assert!(dest.mmap().unwrap()[..] == r.mem[..]);
}

/// Pages left over each round but a generous downtime target: the estimate stops it.
#[test]
fn a_generous_downtime_target_stops_on_the_estimate() {
    let r = Running::new(1024, 1, Duration::ZERO);
    let Some(mut t) = tracker(&r, "a_generous_downtime_target_stops_on_the_estimate") else {
        return;
    };
    let (addr, h) = receiver(1024, ReceiveOptions::default());
    let opts = MigrateOptions {
        min_round_pages: 0,
        downtime: Duration::from_secs(60),
        ..MigrateOptions::default()
    };
    let report = migrate(&r, &mut t, addr, &opts).unwrap();
    let (dest, got) = h.join().unwrap();
    got.unwrap();
    assert!(
        matches!(report.stop, StopReason::Downtime { estimate } if estimate <= opts.downtime),
        "{report:?}"
    );
    assert_eq!(report.rounds.len(), 2, "{report:?}");
    assert_eq!(pages_differ(&r.mem, &dest.mmap().unwrap()[..]), 0);
    drop(r.finish());
}

/// With neither stop condition able to hold (a downtime target of zero, no threshold),
/// the pre-copy stops after the most rounds, and the final round makes the copy whole.
#[test]
fn a_source_that_never_converges_stops_after_max_rounds() {
    let r = Running::new(1024, 1, Duration::ZERO);
    let Some(mut t) = tracker(&r, "a_source_that_never_converges_stops_after_max_rounds") else {
        return;
    };
    let (addr, h) = receiver(1024, ReceiveOptions::default());
    let opts = MigrateOptions {
        min_round_pages: 0,
        downtime: Duration::ZERO,
        max_rounds: 3,
        ..MigrateOptions::default()
    };
    let report = migrate(&r, &mut t, addr, &opts).unwrap();
    let (dest, got) = h.join().unwrap();
    assert_eq!(got.unwrap().rounds.len(), 4);
    assert_eq!(report.stop, StopReason::MaxRounds, "{report:?}");
    assert_eq!(report.rounds.len(), 4);
    assert_eq!(pages_differ(&r.mem, &dest.mmap().unwrap()[..]), 0);
    drop(r.finish());
}

/// The bandwidth cap paces the pre-copy: 1 MiB at 4 MiB/s takes about a quarter second.
#[test]
fn the_bandwidth_cap_paces_the_rounds() {
    let pages = (1 << 20) / ps();
    let r = Running::new(pages, 0, Duration::ZERO);
    let Some(mut t) = tracker(&r, "the_bandwidth_cap_paces_the_rounds") else {
        return;
    };
    let (addr, h) = receiver(pages, ReceiveOptions::default());
    let opts = MigrateOptions {
        bandwidth: Some(4 << 20),
        ..MigrateOptions::default()
    };
    let report = migrate(&r, &mut t, addr, &opts).unwrap();
    h.join().unwrap().1.unwrap();
    let t1 = report.rounds[0].time;
    assert!(t1 >= Duration::from_millis(200), "{t1:?}");
    assert!(
        report.rounds[0].rate() <= 4.4 * (1 << 20) as f64,
        "{report:?}"
    );
}

/// A token cancelled before connecting stops the sender at once, with nothing sent.
#[test]
fn a_cancel_before_connecting_sends_nothing() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let token = CancelToken::new();
    token.cancel();
    let e = Sender::connect(l.local_addr().unwrap(), Some(&token)).unwrap_err();
    assert!(matches!(e.kind, MigrateErrorKind::Cancelled));
    assert_eq!(e.phase, Phase::Connect);
    l.set_nonblocking(true).unwrap();
    assert!(l.accept().is_err(), "nothing connected");
}

/// A cancel during a (slow, paced) round stops the sender between two entries: it sends
/// FORCE_CLOSE, the receiver reports the sender's cancel and claims no round whole.
#[test]
fn a_cancel_mid_round_ends_both_sides_cleanly() {
    let pages = (4 << 20) / ps();
    let r = Running::new(pages, 1, Duration::from_micros(100));
    let Some(mut t) = tracker(&r, "a_cancel_mid_round_ends_both_sides_cleanly") else {
        return;
    };
    let (addr, h) = receiver(pages, ReceiveOptions::default());
    let token = CancelToken::new();
    // 4 MiB at 2 MiB/s: round 1 alone would take two seconds.
    let opts = MigrateOptions {
        bandwidth: Some(2 << 20),
        cancel: Some(token.clone()),
        ..MigrateOptions::default()
    };
    let t2 = token.clone();
    let canceller = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        t2.cancel();
    });
    let started = Instant::now();
    let e = migrate(&r, &mut t, addr, &opts).unwrap_err();
    canceller.join().unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "stopped promptly"
    );
    assert!(matches!(e.kind, MigrateErrorKind::Cancelled), "{e:?}");
    assert_eq!(e.phase, Phase::Round(1));
    assert!(!r.pause.load(Ordering::Acquire), "never paused");
    let (_, got) = h.join().unwrap();
    let err = got.unwrap_err();
    assert!(
        matches!(
            err.kind,
            ReceiveErrorKind::Cancelled {
                by: CancelledBy::Sender,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.rounds, 0, "the round in progress is not claimed");
    drop(r.finish());
}

/// A cancel in the final round (here from the pause callback itself) still ends both
/// sides cleanly, and the source is resumed.
#[test]
fn a_cancel_in_the_final_round_resumes_the_source() {
    let r = Running::new(256, 1, Duration::from_micros(50));
    let Some(mut t) = tracker(&r, "a_cancel_in_the_final_round_resumes_the_source") else {
        return;
    };
    let (addr, h) = receiver(256, ReceiveOptions::default());
    let token = CancelToken::new();
    let opts = MigrateOptions {
        cancel: Some(token.clone()),
        ..MigrateOptions::default()
    };
    let resumed = AtomicBool::new(false);
    let sender = Sender::connect(addr, None).unwrap();
    let e = sender
        .run(
            &r.source(),
            &mut t,
            || {
                r.pause();
                token.cancel();
            },
            || {
                resumed.store(true, Ordering::Release);
                r.resume();
            },
            &opts,
        )
        .unwrap_err();
    assert!(matches!(e.kind, MigrateErrorKind::Cancelled), "{e:?}");
    assert!(matches!(e.phase, Phase::Final(_)), "{e:?}");
    assert!(resumed.load(Ordering::Acquire));
    let err = h.join().unwrap().1.unwrap_err();
    assert!(matches!(
        err.kind,
        ReceiveErrorKind::Cancelled {
            by: CancelledBy::Sender,
            ..
        }
    ));
    drop(r.finish());
}

/// Cancelling the receiver wakes it from its socket at once; the sender sees the
/// connection go and reports it, and nothing is left behind on either side.
#[test]
fn a_cancel_on_the_receiver_wakes_it_and_the_sender_fails_cleanly() {
    if !alone("a_cancel_on_the_receiver_wakes_it_and_the_sender_fails_cleanly") {
        return;
    }
    let pages = (4 << 20) / ps();
    let r = Running::new(pages, 0, Duration::ZERO);
    let Some(mut t) = tracker(&r, "a_cancel_on_the_receiver") else {
        return;
    };
    // The tracker and the source stay; what the migration made must go.
    let (t0, f0) = (threads(), open_fds());
    let token = CancelToken::new();
    let (addr, h) = receiver(
        pages,
        ReceiveOptions {
            cancel: Some(token.clone()),
            ..ReceiveOptions::default()
        },
    );
    let t2 = token.clone();
    let canceller = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        t2.cancel();
    });
    let opts = MigrateOptions {
        bandwidth: Some(8 << 20),
        ..MigrateOptions::default()
    };
    let e = migrate(&r, &mut t, addr, &opts).unwrap_err();
    assert!(
        matches!(
            e.kind,
            MigrateErrorKind::Send(_) | MigrateErrorKind::Stream(_)
        ),
        "{e:?}"
    );
    let err = h.join().unwrap().1.unwrap_err();
    canceller.join().unwrap();
    assert!(
        matches!(
            err.kind,
            ReceiveErrorKind::Cancelled {
                by: CancelledBy::Receiver,
                ..
            }
        ),
        "{err:?}"
    );
    drop(token);
    assert_eq!((threads(), open_fds()), (t0, f0));
}

/// Runs outside the destination are refused before any byte is written, naming the
/// first page outside; the memory is untouched.
#[test]
fn runs_outside_the_region_are_refused_before_writing() {
    let p = ps() as u64;
    for (vaddr, pages, outside) in [
        (BASE + 7 * p, 2, BASE + 8 * p), // the last page, and one past the end
        (BASE - p, 1, BASE - p),         // below the start
        (BASE + 100 * p, 1, BASE + 100 * p),
    ] {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let s = thread::spawn(move || {
            let mut c = PageServerClient::from_unix(a).unwrap();
            c.open(ImageId::pagemap(1).unwrap()).unwrap();
            let e = PagemapEntry {
                vaddr,
                pages,
                flags: PageFlags::PRESENT,
            };
            let _ = c.send_entry(e, &vec![0xaa; pages as usize * ps()]);
        });
        let mut dest = MemoryRegion::from_mmap(BASE, anon(8)).unwrap();
        let err = receive(
            Incoming::from_unix(b),
            &mut dest,
            &ReceiveOptions::default(),
        )
        .unwrap_err();
        s.join().unwrap();
        assert!(
            matches!(err.kind, ReceiveErrorKind::Outside { addr, .. } if addr == outside),
            "{err:?}"
        );
        assert!(err.kind.to_string().contains(&format!("{outside:#x}")));
        assert!(
            dest.mmap().unwrap().iter().all(|&b| b == 0),
            "nothing written"
        );
    }
}

/// Rounds whose ids do not ascend are refused: rounds apply in order.
#[test]
fn rounds_out_of_order_are_refused() {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let s = thread::spawn(move || {
        let mut c = PageServerClient::from_unix(a).unwrap();
        c.open(ImageId::pagemap(2).unwrap()).unwrap();
        let _ = c.open(ImageId::pagemap(1).unwrap());
    });
    let mut dest = MemoryRegion::from_mmap(BASE, anon(8)).unwrap();
    let err = receive(
        Incoming::from_unix(b),
        &mut dest,
        &ReceiveOptions::default(),
    )
    .unwrap_err();
    s.join().unwrap();
    assert!(
        matches!(err.kind, ReceiveErrorKind::RoundOrder { .. }),
        "{err:?}"
    );
}

/// A sender that dies in the middle of a round's pages: the receiver reports the cut
/// stream, claims no round, and leaves no thread or descriptor behind.
#[test]
fn a_sender_that_dies_mid_round_leaves_the_receiver_clean() {
    if !alone("a_sender_that_dies_mid_round_leaves_the_receiver_clean") {
        return;
    }
    let (t0, f0) = (threads(), open_fds());
    let (addr, h) = receiver(64, ReceiveOptions::default());
    {
        use std::io::{Read, Write};
        let image = ImageId::pagemap(1).unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&Message::Open2 { image }.encode()).unwrap();
        s.read_exact(&mut [0u8; 1]).unwrap();
        let e = PagemapEntry {
            vaddr: BASE,
            pages: 4,
            flags: PageFlags::PRESENT,
        };
        s.write_all(&Message::add_f(image, e).encode()).unwrap();
        // One page of the four, then the sender "dies": its socket closes.
        s.write_all(&vec![1u8; ps()]).unwrap();
    }
    let err = h.join().unwrap().1.unwrap_err();
    assert!(
        matches!(err.kind, ReceiveErrorKind::Wire(w) if matches!(w.kind, WireErrorKind::Truncated { .. })),
        "{err:?}"
    );
    assert_eq!(err.rounds, 0);
    assert_eq!((threads(), open_fds()), (t0, f0));
}

/// A receiver that dies in the middle of a round: the sender reports the failed round,
/// and nothing is left (threads, descriptors, the source not paused).
#[test]
fn a_receiver_that_dies_mid_round_leaves_the_sender_clean() {
    if !alone("a_receiver_that_dies_mid_round_leaves_the_sender_clean") {
        return;
    }
    let pages = (8 << 20) / ps();
    let (t0, f0) = (threads(), open_fds());
    let r = Running::new(pages, 1, Duration::from_micros(100));
    let Some(mut t) = tracker(&r, "a_receiver_that_dies_mid_round") else {
        return;
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dier = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 256 << 10];
        // Answer OPEN2, take some pages, then go.
        let mut head = [0u8; 32];
        std::io::Read::read_exact(&mut s, &mut head).unwrap();
        std::io::Write::write_all(&mut s, &[0]).unwrap();
        std::io::Read::read_exact(&mut s, &mut buf).unwrap();
    });
    let e = migrate(&r, &mut t, addr, &MigrateOptions::default()).unwrap_err();
    dier.join().unwrap();
    assert!(matches!(e.kind, MigrateErrorKind::Send(_)), "{e:?}");
    assert_eq!(e.phase, Phase::Round(1));
    assert!(!r.pause.load(Ordering::Acquire));
    drop(r.finish());
    drop(t);
    assert_eq!((threads(), open_fds()), (t0, f0));
}

/// Guest memory as the destination: runs in a gap between regions are refused.
#[test]
fn guest_memory_receives_and_refuses_runs_in_a_gap() {
    use page_pipe::vm::GuestWriter;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let p = ps() as u64;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 4 * ps()),
        (GuestAddress(8 * p), 4 * ps()),
    ])
    .unwrap();
    let send = |entries: Vec<PagemapEntry>| {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let s = thread::spawn(move || {
            let mut c = PageServerClient::from_unix(a).unwrap();
            c.open(ImageId::pagemap(1).unwrap()).unwrap();
            for e in entries {
                if c.send_entry(e, &vec![0x5a; e.pages as usize * ps()])
                    .is_err()
                {
                    return;
                }
            }
            let _ = c.close();
        });
        (s, b)
    };
    let e = |v: u64, n: u64| PagemapEntry {
        vaddr: v * p,
        pages: n,
        flags: PageFlags::PRESENT,
    };
    let (s, b) = send(vec![e(1, 2), e(8, 4)]);
    let mut w = GuestWriter::new(&mem).unwrap();
    let got = receive(Incoming::from_unix(b), &mut w, &ReceiveOptions::default()).unwrap();
    s.join().unwrap();
    assert_eq!(got.pages(), 6);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(11 * p + 5)).unwrap(), 0x5a);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 0);
    let (s, b) = send(vec![e(3, 2)]);
    let mut w = GuestWriter::new(&mem).unwrap();
    let err = receive(Incoming::from_unix(b), &mut w, &ReceiveOptions::default()).unwrap_err();
    s.join().unwrap();
    assert!(
        matches!(err.kind, ReceiveErrorKind::Outside { addr, .. } if addr == 4 * p),
        "{err:?}"
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(3 * p)).unwrap(),
        0,
        "nothing written"
    );
}

/// CRIU 4.2's own client stream (recorded: a process's dump, one image, entries from
/// 0x55ea... to 0x7ffe...) received into one sparse region covering them all: every
/// page lands where the images CRIU's server wrote from the same stream say.
#[test]
fn criu_s_stream_lands_where_criu_s_images_say() {
    use std::io::Write;
    let dir = page_pipe_tests::fixtures().join("criu-4.2-page-server-a");
    let stream = std::fs::read(dir.join("client-stream.bin")).unwrap();
    let image = page_pipe::image::Image::open_id(&dir, 12856).unwrap();
    let p = ps() as u64;
    let entries = image.entries().to_vec();
    let lo = entries.first().unwrap().vaddr & !(p - 1);
    let hi = entries.last().unwrap().end(ps()).unwrap();
    let len = (hi - lo) as usize;
    // Tens of TiB of address space, never touched but where pages land.
    let Ok(map) = MmapOptions::new().len(len).no_reserve_swap().map_anon() else {
        println!(
            "SKIPPED criu_s_stream_lands_where_criu_s_images_say: cannot map {len} bytes of address space"
        );
        return;
    };
    let mut region = MemoryRegion::from_mmap(lo, map).unwrap();
    let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let sender = thread::spawn(move || {
        let mut r = a.try_clone().unwrap();
        let reader = thread::spawn(move || {
            let mut back = Vec::new();
            let _ = std::io::Read::read_to_end(&mut r, &mut back);
            back
        });
        a.write_all(&stream).unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        reader.join().unwrap()
    });
    let got = receive(
        Incoming::from_unix(b),
        &mut region,
        &ReceiveOptions::default(),
    )
    .unwrap();
    let replies = sender.join().unwrap();
    assert_eq!(
        replies,
        std::fs::read(dir.join("server-replies.bin")).unwrap(),
        "the replies CRIU's server sent"
    );
    assert_eq!(got.rounds.len(), 1);
    let mem = region.mmap().unwrap();
    let mut want = Vec::new();
    for e in entries.iter().filter(|e| e.is_present()) {
        want.resize(e.pages as usize * ps(), 0);
        image.read(e.vaddr, &mut want).unwrap();
        let at = (e.vaddr - lo) as usize;
        assert!(mem[at..at + want.len()] == want[..], "entry {e}");
    }
    assert_eq!(
        got.pages(),
        entries
            .iter()
            .filter(|e| e.is_present())
            .map(|e| e.pages)
            .sum::<u64>()
    );
}
