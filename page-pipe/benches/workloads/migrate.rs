//! Live migration rows of `examples/bench.rs` (`--migrate`): the receiver into fresh
//! memory against a `read_exact` loop into the same kind of memory, and a migration's
//! final pause and total time against stop-and-copy of the whole region, with one writer
//! dirtying a random page every 10 us. Everything over TCP loopback, in one process.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use page_pipe::Source;
use page_pipe::image::{PageFlags, PagemapEntry};
use page_pipe::migrate::{
    MemoryRegion, MigrateOptions, MigrateReport, ReceiveOptions, Sender, receive,
};
use page_pipe::page_server::wire::{ImageId, Message};
use page_pipe::page_server::{Incoming, PageServerClient};
use page_pipe::snapshot::{SnapshotOptions, snapshot};
use page_pipe::track::{TrackOptions, TrackRegion, Tracker};

use super::workloads::{Region, fresh};
use super::{TrackRow, fmt_time, print_track_rows};

/// The address the region has in the stream.
const BASE: u64 = 0x1_0000_0000;
/// Pages per entry of the recorded stream: what the client sends per pipe here.
const ENTRY_PAGES: u64 = 256;

fn tcp_pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

/// Sends the stream a client sends for the whole region (OPEN2, one ADD_F of
/// `ENTRY_PAGES` per run, CLOSE), the pages written from the region, and waits for the
/// replies.
fn send_stream(mut s: TcpStream, mem: &[u8], ps: usize) {
    let image = ImageId::pagemap(1).expect("id");
    s.write_all(&Message::Open2 { image }.encode())
        .expect("open2");
    s.read_exact(&mut [0u8; 1]).expect("open2 reply");
    for (i, chunk) in mem.chunks(ENTRY_PAGES as usize * ps).enumerate() {
        let e = PagemapEntry {
            vaddr: BASE + (i * ENTRY_PAGES as usize * ps) as u64,
            pages: (chunk.len() / ps) as u64,
            flags: PageFlags::PRESENT,
        };
        s.write_all(&Message::add_f(image, e).encode())
            .expect("header");
        s.write_all(chunk).expect("pages");
    }
    s.write_all(&Message::Close.encode()).expect("close");
    s.read_exact(&mut [0u8; 4]).expect("close reply");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
}

/// The baseline: what a hand-written receiver does, `read_exact` of each header and of
/// each run's pages into the destination.
fn read_exact_loop(mut s: TcpStream, dst: &mut [u8], ps: usize) {
    let mut h = [0u8; 32];
    loop {
        s.read_exact(&mut h).expect("header");
        let word = |i: usize| u64::from_ne_bytes(h[i..i + 8].try_into().expect("8"));
        match u32::from_ne_bytes(h[0..4].try_into().expect("4")) & 0xffff {
            4 => s.write_all(&[0]).expect("reply"),
            6 => {
                let off = (word(16) - BASE) as usize;
                let len = word(8) as usize * ps;
                s.read_exact(&mut dst[off..off + len]).expect("pages");
            }
            0x1023 => {
                s.write_all(&[0; 4]).expect("reply");
                return;
            }
            c => panic!("unexpected command {c:#x}"),
        }
    }
}

/// A writer dirtying a random page of `len` bytes at `addr` every 10 us until stopped;
/// paused while `pause` is set (acknowledged through `parked`).
fn writer(
    addr: usize,
    pages: u64,
    ps: usize,
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    parked: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        while !stop.load(Ordering::Acquire) {
            if pause.load(Ordering::Acquire) {
                parked.store(true, Ordering::Release);
                while pause.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
                    thread::sleep(Duration::from_micros(50));
                }
                parked.store(false, Ordering::Release);
                continue;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (addr + (x % pages) as usize * ps) as *mut u64;
            // SAFETY: a word of the bench's mapping, alive until the writer is joined;
            // written with a volatile store, read only by the kernel and volatile
            // copies while the writer runs.
            unsafe { at.write_volatile(x) };
            thread::sleep(Duration::from_micros(10));
        }
    })
}

pub fn rows(size: u64, runs: usize) -> Result<(), Box<dyn std::error::Error>> {
    let r = Region::new(size);
    let (ps, pages) = (r.ps, r.pages);
    let len = r.mem.len();
    println!(
        "migration: {} MiB ({pages} pages) over TCP loopback, into fresh memory, median of {runs} runs",
        len >> 20
    );
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let l = TcpListener::bind("127.0.0.1:0")?;

    // The receiver against a read_exact loop, alternating run by run.
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for run in 0..runs {
        for side in [run % 2, 1 - run % 2] {
            let (tx, rx) = tcp_pair(&l);
            let mut dst = fresh(len);
            let mem: &[u8] = &r.mem;
            let (t, dst) = thread::scope(|sc| {
                sc.spawn(|| send_stream(tx, mem, ps));
                let s = Instant::now();
                if side == 0 {
                    read_exact_loop(rx, &mut dst, ps);
                    (s.elapsed(), dst)
                } else {
                    let mut region = MemoryRegion::from_mmap(BASE, dst).expect("region");
                    let rep = receive(
                        Incoming::from_tcp(rx),
                        &mut region,
                        &ReceiveOptions::default(),
                    )
                    .expect("receive");
                    let t = s.elapsed();
                    assert_eq!(rep.pages(), pages);
                    (t, region.into_mmap().expect("owned"))
                }
            });
            assert!(dst[..] == r.mem[..], "the receiver got the region");
            if side == 0 { &mut base } else { &mut ours }.push(t);
        }
    }

    // Migration against stop-and-copy, one writer dirtying a random page every 10 us.
    let mut mem = fresh(len);
    mem.copy_from_slice(&r.mem);
    let addr = mem.as_mut_ptr() as usize;
    // SAFETY: `mem` stays mapped until after the sources are dropped (end of this
    // function); the writer writes it with volatile stores only, and the crate reads it
    // only by the kernel or volatile copies.
    let source = unsafe {
        Source::new().with_volatile(BASE, NonNull::new(addr as *mut u8).expect("mapped"), len)
    }?;
    let (stop, pause, parked) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let w = writer(addr, pages, ps, stop.clone(), pause.clone(), parked.clone());
    let pause_writer = || {
        pause.store(true, Ordering::Release);
        while !parked.load(Ordering::Acquire) {
            thread::yield_now();
        }
    };
    let resume_writer = || pause.store(false, Ordering::Release);
    let opts = MigrateOptions {
        downtime: Duration::from_millis(10),
        ..MigrateOptions::default()
    };
    let (mut stw, mut pauses, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    let mut reports: Vec<MigrateReport> = Vec::new();
    for run in 0..runs {
        for side in [run % 2, 1 - run % 2] {
            let (tx, rx) = tcp_pair(&l);
            let recv = thread::spawn(move || {
                let mut region = MemoryRegion::from_mmap(BASE, fresh(len)).expect("region");
                receive(
                    Incoming::from_tcp(rx),
                    &mut region,
                    &ReceiveOptions::default(),
                )
                .expect("receive");
            });
            if side == 0 {
                // Stop-and-copy: the writer paused for the whole copy.
                pause_writer();
                let s = Instant::now();
                let mut c = PageServerClient::from_tcp(tx)?;
                c.open(ImageId::pagemap(1).expect("id"))?;
                snapshot(&source, r_plan(pages), &mut c, &SnapshotOptions::default())?;
                c.close()?;
                stw.push(s.elapsed());
                resume_writer();
            } else {
                let mut t = Tracker::start_async(
                    &[TrackRegion::new(BASE, addr as *const u8, len)],
                    &TrackOptions::default(),
                )?;
                let sender = Sender::new(PageServerClient::from_tcp(tx)?);
                let rep = sender.run(&source, &mut t, pause_writer, resume_writer, &opts)?;
                resume_writer();
                pauses.push(rep.final_pause);
                totals.push(rep.total);
                reports.push(rep);
            }
            recv.join().expect("receiver");
        }
    }
    stop.store(true, Ordering::Release);
    w.join().expect("writer");
    drop(source);

    let mid = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (ours, base, stw, pause_t, total_t) = (
        mid(ours),
        mid(base),
        mid(stw),
        mid(pauses.clone()),
        mid(totals),
    );
    let rows = vec![
        TrackRow {
            what: "receiver into fresh memory".into(),
            ours,
            base_name: "read_exact loop into fresh memory".into(),
            base,
            goal: format!(">= 1.0x: {}", met(base >= ours)),
        },
        TrackRow {
            what: "migration: final pause, a writer every 10 us".into(),
            ours: pause_t,
            base_name: "stop-and-copy of the whole region".into(),
            base: stw,
            goal: format!("<= 1/20: {}", met(pause_t * 20 <= stw)),
        },
        TrackRow {
            what: "migration: total time".into(),
            ours: total_t,
            base_name: "stop-and-copy of the whole region".into(),
            base: stw,
            goal: "-".into(),
        },
    ];
    print_track_rows(&rows);
    println!(
        "receiver: {:.2} GiB/s, read_exact loop {:.2} GiB/s",
        len as f64 / ours.as_secs_f64() / (1u64 << 30) as f64,
        len as f64 / base.as_secs_f64() / (1u64 << 30) as f64
    );
    if let Some(rep) = reports.iter().find(|r| r.final_pause == pause_t) {
        println!("the median migration ({}), round by round:", rep.stop);
        for r in &rep.rounds {
            println!(
                "  round {}{}: {} pages, {:.1} MiB in {}, {} written meanwhile",
                r.round,
                if r.is_final { " (final, paused)" } else { "" },
                r.pages,
                r.bytes as f64 / (1 << 20) as f64,
                fmt_time(r.time),
                r.written_meanwhile
            );
        }
    }
    Ok(())
}

fn r_plan(pages: u64) -> [page_pipe::snapshot::Span; 1] {
    [page_pipe::snapshot::Span::Pages {
        addr: BASE,
        pages,
        flags: page_pipe::BufFlags::empty(),
    }]
}
