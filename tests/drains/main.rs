//! One snapshot pipeline: the dump through pipes (capture, then splice) and the dump
//! straight from memory walk the same books, so for any plan they give the same entries,
//! in the same order, with the same bytes, and byte-identical images.

use page_pipe::image::ImageWriter;
use page_pipe::snapshot::{Drain, SnapshotOptions, Span, snapshot};
use page_pipe::{BufFlags, CallbackSink, HoleFlags, PagemapEntry, Source};
use page_pipe_tests::{TempDir, patterned, proptest_config};
use proptest::prelude::*;

const BASE: u64 = 0x7f00_0000_0000;

fn ps() -> u64 {
    page_pipe_sys::page_size().get() as u64
}

/// A plan from (gap, pages, kind) triples: kind 0 pages, 1 lazy pages, 2 a hole in the
/// parent, 3 a hole without flags.
fn plan(layout: &[(u64, u64, u8)]) -> (Vec<Span>, u64) {
    let mut spans = Vec::new();
    let mut next = 0u64;
    for &(gap, pages, kind) in layout {
        let addr = BASE + (next + gap) * ps();
        spans.push(match kind {
            0 | 1 => Span::Pages {
                addr,
                pages,
                flags: if kind == 1 {
                    BufFlags::LAZY
                } else {
                    BufFlags::empty()
                },
            },
            _ => Span::Hole {
                addr,
                pages,
                flags: if kind == 2 {
                    HoleFlags::PARENT
                } else {
                    HoleFlags::empty()
                },
            },
        });
        next += gap + pages;
    }
    (spans, next)
}

type Dumped = Vec<(PagemapEntry, Vec<u8>)>;

fn run(source: &Source<'_>, spans: &[Span], opts: &SnapshotOptions) -> Dumped {
    let mut out = Vec::new();
    let mut sink = CallbackSink::new(|e: &PagemapEntry, b: &[u8]| {
        out.push((*e, b.to_vec()));
        Ok(())
    });
    snapshot(source, spans.iter().copied(), &mut sink, opts).unwrap();
    drop(sink);
    out
}

proptest! {
    #![proptest_config(proptest_config(64, "drains"))]

    #[test]
    fn both_drains_give_the_same_entries_and_bytes(
        layout in proptest::collection::vec((0u64..3, 1u64..200, 0u8..4), 1..20),
        chunk_mode in any::<bool>(),
        lazy_pages in any::<bool>(),
        budget in 1usize..40,
        max_pipe_pages in proptest::option::of(1u64..64),
    ) {
        let (spans, span_pages) = plan(&layout);
        let mem = patterned(span_pages as usize, 31);
        let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
        let opts = |drain| SnapshotOptions {
            drain,
            chunk_mode,
            lazy_pages,
            // Single-pass mode stops at the budget; chunk mode drains and goes on.
            iov_budget: if chunk_mode { budget } else { 4096 },
            max_pipe_pages,
            ..SnapshotOptions::default()
        };
        let pipes = run(&source, &spans, &opts(Drain::Pipes));
        let memory = run(&source, &spans, &opts(Drain::Memory));
        prop_assert_eq!(pipes.len(), memory.len());
        for (i, (a, b)) in pipes.iter().zip(&memory).enumerate() {
            prop_assert_eq!(a.0, b.0, "entry {}", i);
            prop_assert!(a.1 == b.1, "bytes of entry {} ({}) differ", i, a.0);
        }
    }
}

/// The same for images, entries unjoined (as a page server writes them): the pagemap
/// and pages files are byte-identical.
#[test]
fn both_drains_write_identical_images() {
    let layout = [
        (0, 300, 0),
        (2, 17, 1),
        (0, 5, 2),
        (1, 700, 0),
        (0, 3, 3),
        (4, 64, 1),
        (0, 129, 0),
    ];
    let (spans, span_pages) = plan(&layout);
    let mem = patterned(span_pages as usize, 32);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let dir = TempDir::new("drains");
    let mut files = Vec::new();
    for (name, drain) in [("pipes", Drain::Pipes), ("memory", Drain::Memory)] {
        let d = dir.path().join(name);
        let mut w = ImageWriter::create(&d, 1)
            .unwrap()
            .with_joining(false)
            .with_sync(false);
        let opts = SnapshotOptions {
            drain,
            max_pipe_pages: Some(32),
            iov_budget: 16,
            ..SnapshotOptions::default()
        };
        let report = snapshot(&source, spans.iter().copied(), &mut w, &opts).unwrap();
        assert!(
            report.chunks > 1,
            "{name}: the plan should take several chunks"
        );
        w.finish().unwrap();
        files.push((
            std::fs::read(d.join("pagemap-1.img")).unwrap(),
            std::fs::read(d.join("pages-1.img")).unwrap(),
        ));
    }
    assert!(files[0].0 == files[1].0, "the pagemaps differ");
    assert!(files[0].1 == files[1].1, "the pages files differ");
}

/// Progress comes to the callback with the plan's pages as the total, never goes back,
/// ends with everything done, and is not called for every entry.
#[test]
fn progress_reaches_the_total_at_a_bounded_rate() {
    use std::sync::{Arc, Mutex};
    // Many single-page entries: far more entries than calls.
    let layout: Vec<(u64, u64, u8)> = (0..3000).map(|_| (1, 1, 0)).collect();
    let (spans, span_pages) = plan(&layout);
    let mem = patterned(span_pages as usize, 33);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    for drain in [Drain::Pipes, Drain::Memory] {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let opts = SnapshotOptions {
            drain,
            progress: Some(Arc::new(move |p: page_pipe::PagesDone| {
                log.lock().unwrap().push(p)
            })),
            ..SnapshotOptions::default()
        };
        let mut sink = CallbackSink::new(|_: &PagemapEntry, _: &[u8]| {
            std::thread::sleep(std::time::Duration::from_micros(20));
            Ok(())
        });
        snapshot(&source, spans.iter().copied(), &mut sink, &opts).unwrap();
        let seen = seen.lock().unwrap();
        assert!(!seen.is_empty());
        assert!(seen.iter().all(|p| p.total == 3000 && p.done <= p.total));
        assert!(seen.windows(2).all(|w| w[0].done <= w[1].done));
        assert_eq!(seen.last().unwrap().done, 3000, "{drain:?}");
        // 3000 entries of 20 us or more each take at least 60 ms; with a call at most
        // every 50 ms (and the last), far fewer calls than entries.
        assert!(seen.len() < 100, "{drain:?}: {} calls", seen.len());
    }
}

/// Restores and flattens report progress too: totals of the pages asked for (restore) or
/// in the image (flatten), never going back, ending at the total.
#[test]
fn restores_and_flattens_report_progress() {
    use page_pipe::image::{FlattenOptions, Image, RestoreOptions};
    use std::sync::{Arc, Mutex};
    let pages = 20_000u64;
    let mem = patterned(pages as usize, 34);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let dir = TempDir::new("progress");
    let img_dir = dir.path().join("img");
    let mut w = ImageWriter::create(&img_dir, 1).unwrap().with_sync(false);
    let plan = [Span::Pages {
        addr: BASE,
        pages,
        flags: BufFlags::empty(),
    }];
    snapshot(&source, plan, &mut w, &SnapshotOptions::default()).unwrap();
    w.finish().unwrap();
    let img = Image::open(&img_dir).unwrap();
    let check = |seen: &[page_pipe::PagesDone], total: u64| {
        assert!(!seen.is_empty());
        assert!(seen.iter().all(|p| p.total == total && p.done <= total));
        assert!(seen.windows(2).all(|w| w[0].done <= w[1].done));
        assert_eq!(seen.last().unwrap().done, total);
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let opts = RestoreOptions {
        progress: Some(Arc::new(move |p| log.lock().unwrap().push(p))),
        ..RestoreOptions::default()
    };
    let mut back = vec![0u8; mem.len()];
    img.restore(BASE, &mut back, &opts).unwrap();
    assert!(back == mem[..]);
    check(&seen.lock().unwrap(), pages);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let opts = FlattenOptions {
        sync: false,
        progress: Some(Arc::new(move |p| log.lock().unwrap().push(p))),
    };
    img.flatten(dir.path().join("flat"), &opts).unwrap();
    check(&seen.lock().unwrap(), pages);
}

/// `Drain::Auto` sends memory nobody else can write through pipes only where that pays
/// (a Unix socket, a pipe) and writes it from memory into files and TCP sockets (where
/// `splice` was measured slower than `write`); borrowed memory always goes from memory.
#[test]
fn auto_drain_picks_the_path_per_destination() {
    use page_pipe::CapturePath;
    use page_pipe::FdSink;
    use std::io::Read;
    let ps = ps() as usize;
    let pages = 64;
    let mut sealed = memmap2::MmapOptions::new()
        .len(pages * ps)
        .map_anon()
        .unwrap();
    sealed.copy_from_slice(&patterned(pages, 3)[..]);
    let sealed = sealed.make_read_only().unwrap();
    let lent = patterned(pages, 3);
    let spans = vec![Span::Pages {
        addr: BASE,
        pages: pages as u64,
        flags: BufFlags::empty(),
    }];
    let opts = SnapshotOptions::default();
    let via = |source: &Source<'_>, kind: &str| -> (CapturePath, Vec<u8>) {
        // Each destination is drained on another thread so a full socket cannot block.
        let (path, bytes) = match kind {
            "unix" => {
                let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
                let reader = std::thread::spawn(move || {
                    let mut v = Vec::new();
                    b.read_to_end(&mut v).unwrap();
                    v
                });
                let mut sink = FdSink::new(a);
                let r = snapshot(source, spans.clone(), &mut sink, &opts).unwrap();
                drop(sink);
                (r.path, reader.join().unwrap())
            }
            "pipe" => {
                let (mut r, w) = std::io::pipe().unwrap();
                let reader = std::thread::spawn(move || {
                    let mut v = Vec::new();
                    r.read_to_end(&mut v).unwrap();
                    v
                });
                let mut sink = FdSink::new(w);
                let r = snapshot(source, spans.clone(), &mut sink, &opts).unwrap();
                drop(sink);
                (r.path, reader.join().unwrap())
            }
            "tcp" => {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
                let (mut b, _) = l.accept().unwrap();
                let reader = std::thread::spawn(move || {
                    let mut v = Vec::new();
                    b.read_to_end(&mut v).unwrap();
                    v
                });
                let mut sink = FdSink::new(a);
                let r = snapshot(source, spans.clone(), &mut sink, &opts).unwrap();
                drop(sink);
                (r.path, reader.join().unwrap())
            }
            _ => {
                let dir = TempDir::new("auto-file");
                let p = dir.path().join("pages");
                let mut sink = FdSink::new(std::fs::File::create(&p).unwrap());
                let r = snapshot(source, spans.clone(), &mut sink, &opts).unwrap();
                drop(sink);
                (r.path, std::fs::read(&p).unwrap())
            }
        };
        (path, bytes)
    };
    let sealed_src = Source::new().with_mmap(BASE, sealed).unwrap();
    let lent_src = Source::new().with_slice(BASE, &lent[..]).unwrap();
    for (kind, through_pipes) in [
        ("pipe", true),
        ("unix", false),
        ("tcp", false),
        ("file", false),
    ] {
        let (path, bytes) = via(&sealed_src, kind);
        assert_eq!(
            path != CapturePath::Direct,
            through_pipes,
            "sealed memory into {kind}"
        );
        assert_eq!(bytes[..], lent[..], "sealed memory into {kind}: bytes");
        let (path, bytes) = via(&lent_src, kind);
        assert_eq!(path, CapturePath::Direct, "borrowed memory into {kind}");
        assert_eq!(bytes[..], lent[..], "borrowed memory into {kind}: bytes");
    }
}
