//! Where page-pipe stands against what a user would otherwise write, measured side by
//! side in one run and printed as one table of ratios.
//!
//! ```text
//! cargo run --release -p page-pipe --example bench [-- --size 1G --runs 5]
//! ```
//!
//! Each figure is the median of `--runs` runs (default 5); a ratio is the baseline's time
//! over ours (above 1: ours is faster). Rows:
//! - capture: `add_pages` + `capture` (vmsplice into pipes) against a `memcpy` into a
//!   buffer (what a copying tool does) and a bare `vmsplice` loop into pipes of the
//!   largest size (the kernel's limit);
//! - dump to a file: a whole snapshot into an image directory against the loop
//!   Firecracker uses (`write_all` of each run from the mapping, seeking to its place);
//!   neither syncs (`ImageWriter::with_sync(false)`);
//! - Unix socket and loopback TCP, a reader thread draining: a snapshot into the socket
//!   against `write` from the mapping, of borrowed memory (`Source::with_slice`, what a
//!   VMM lends: its pages leave as copies) and of owned memory (an anonymous mapping
//!   handed to the source read-only: its pages may go by reference), the baseline
//!   writing from the same memory; ours and the baseline alternate run by run;
//! - CRIU's page-server protocol, over both sockets: our client (`PageServerClient`, a
//!   snapshot of borrowed and of owned memory) against `write` of the same messages
//!   (headers, and pages from the mapping) into a peer that drops the pages; our server
//!   receiving those messages and writing the image against our `ImageWriter` fed the
//!   same entries from the mapping in-process (neither syncs);
//! - restore into touched memory: `Image::read` into a mapping whose pages were touched
//!   before (their page faults out of the way) against a `pread` loop of 1 MiB calls;
//! - restore into fresh memory, as a VMM restores: the same, each run into a new
//!   anonymous mapping never touched, so the first touch of every page is in the time
//!   (mapping and unmapping are not); ours and the baseline alternate run by run;
//! - restore a chain into fresh memory: the full image and an incremental image of 10%
//!   of the pages (scattered, as a VMM's dirty pages are) restored through the chain,
//!   against a `pread` loop over the flattened pages file (what restoring a flattened
//!   chain costs);
//! - flatten: that chain flattened into a new image (not synced), against copying the
//!   chain's files with `copy_file_range` as `cp` does;
//! - restore by mapping: a new reservation, `Image::open` and `Image::map_into` of the
//!   full image, against one `mmap(MAP_PRIVATE)` of the raw memory file (Firecracker's
//!   file backend), as time to ready; then a write to every page (the first touch, which
//!   copies each page out of the page cache), as ready plus first touch;
//! - extra memory (peak RSS) of a capture against a copy.
//!
//! For each sink both drain paths are measured (pipes: capture then `splice`; memory:
//! straight from the mapping); the default (`Drain::Auto`) is the faster one.
//!
//! Then dirty tracking (alone with `--track`): a tracker's `take` of the region with 1% of
//! its pages written against `PAGEMAP_SCAN` called bare and against a `memcmp` of the
//! region with a copy; the cost of a first write to a protected page, measured from the
//! writing thread, in the synchronous fallback and asynchronously; and KVM-style dirty
//! logs turned into plans at 1% and 50%.
//!
//! Then live snapshots (alone with `--live`): the pause of a full live snapshot (start a
//! synchronous tracker, which protects the region, and begin the snapshot) against the
//! stop-the-world pause (the whole dump into a new image directory, not synced) and
//! against a `memcpy` of the region into fresh memory; the pause of an incremental live
//! snapshot (1% written); the live dump with one writer dirtying a random page every
//! 10 us against the same dump with no writer; the memory the saved copies took.
//! Then live migration (alone with `--migrate`), over TCP loopback: our receiver
//! (`migrate::receive` into a `MemoryRegion`) against a `read_exact` loop of the same
//! stream into the same kind of fresh memory, alternating run by run; and a migration
//! (`migrate::Sender`, an asynchronous tracker, a downtime target of 10 ms) of a region
//! that one writer dirties a random page of every 10 us, its final pause and total time
//! against stop-and-copy (the writer paused for a whole snapshot of the region into the
//! same receiver).
//! Then, built with `--features vm-memory` (alone with `--vm`), rust-vmm guest memory: a
//! `GuestMemoryMmap` of `--size` in two regions with a gap, snapshot into an image
//! directory (`Source::with_guest_memory`) against the same memory as slices
//! (`Source::with_slice`), and restored into a fresh `GuestMemoryMmap` (`vm::restore`)
//! against `Image::restore` into fresh mappings of the same sizes; ours and the baseline
//! alternate run by run. Two more rows measure the choices made: restoring through a
//! bounce buffer (`pread` into a buffer, then vm-memory's `write_slice`) instead of
//! reading straight into the `VolatileSlice`, and the cost of marking an `AtomicBitmap`.

#[path = "../benches/workloads/mod.rs"]
mod workloads;

#[path = "../benches/workloads/track.rs"]
mod track_workloads;

#[path = "bench_rows/lazy.rs"]
mod lazy_rows;
#[path = "../benches/workloads/migrate.rs"]
mod migrate_workloads;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use std::path::Path;

use memmap2::{MmapMut, MmapOptions};
use page_pipe::image::{FlattenOptions, Image, ImageWriter, MapOptions, PagemapEntry, flatten};
use page_pipe::snapshot::Drain;
use page_pipe::{BufFlags, PageFlags, PagePipe, PipePool};
use workloads::*;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn parse_size(s: &str) -> u64 {
    let (n, m) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>()
        .expect("--size takes a number with K, M or G")
        * m
}

/// The median of `runs` durations that `f` measures (so that it can leave setup out).
fn timed(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    let mut t: Vec<Duration> = (0..runs).map(|_| f()).collect();
    t.sort();
    t[t.len() / 2]
}

/// The medians of `runs` timings each of `base` and `ours`, measured alternately (which
/// goes first changes every run), so that a machine whose load drifts during the run
/// biases neither side. `f` returns the time it measured, so that it can leave setup out.
fn paired(
    runs: usize,
    mut base: impl FnMut() -> Duration,
    mut ours: impl FnMut() -> Duration,
) -> (Duration, Duration) {
    let (mut b, mut o) = (Vec::new(), Vec::new());
    for run in 0..runs {
        if run % 2 == 0 {
            b.push(base());
            o.push(ours());
        } else {
            o.push(ours());
            b.push(base());
        }
    }
    b.sort();
    o.sort();
    (b[b.len() / 2], o[o.len() / 2])
}

/// Times `f`.
fn time(f: impl FnOnce()) -> Duration {
    let s = Instant::now();
    f();
    s.elapsed()
}

/// The median of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    timed(runs, || {
        let s = Instant::now();
        f();
        s.elapsed()
    })
}

struct Table {
    bytes: u64,
    pages: u64,
    rows: Vec<[String; 5]>,
}

impl Table {
    fn cell(&self, d: Duration) -> String {
        format!(
            "{:6.2} GiB/s {:7.1} ns/page",
            self.bytes as f64 / d.as_secs_f64() / (1u64 << 30) as f64,
            d.as_nanos() as f64 / self.pages as f64
        )
    }

    fn row(&mut self, what: &str, ours: Duration, base_name: &str, base: Duration) {
        self.rows.push([
            what.to_string(),
            self.cell(ours),
            base_name.to_string(),
            self.cell(base),
            format!("{:5.2}x", base.as_secs_f64() / ours.as_secs_f64()),
        ]);
    }

    /// A row of times (for what takes microseconds, where a rate says little).
    fn row_time(&mut self, what: &str, ours: Duration, base_name: &str, base: Duration) {
        let ms = |d: Duration| format!("{:10.3} ms", d.as_secs_f64() * 1e3);
        self.rows.push([
            what.to_string(),
            ms(ours),
            base_name.to_string(),
            ms(base),
            format!("{:5.2}x", base.as_secs_f64() / ours.as_secs_f64()),
        ]);
    }

    fn print(&self) {
        let head = ["what", "ours", "baseline", "baseline time", "ratio"].map(String::from);
        let w: Vec<usize> = (0..5)
            .map(|c| {
                self.rows
                    .iter()
                    .chain([&head])
                    .map(|r| r[c].len())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for r in [&head].into_iter().chain(&self.rows) {
            println!(
                "{:<a$}  {:<b$}  {:<c$}  {:<d$}  {:>e$}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                a = w[0],
                b = w[1],
                c = w[2],
                d = w[3],
                e = w[4]
            );
        }
    }
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let size = parse_size(&arg("--size").unwrap_or_else(|| "1G".into()));
    let runs: usize = arg("--runs").map_or(5, |r| r.parse().expect("--runs takes a number"));
    if std::env::args().any(|a| a == "--track") {
        return tracking(size, runs);
    }
    if std::env::args().any(|a| a == "--live") {
        return live(size, runs);
    }
    if std::env::args().any(|a| a == "--migrate") {
        return migrate_workloads::rows(size, runs);
    }
    if std::env::args().any(|a| a == "--lazy") {
        return lazy_rows::rows(size, runs);
    }
    #[cfg(feature = "vm-memory")]
    if std::env::args().any(|a| a == "--vm") {
        return guest_memory::rows(size, runs);
    }
    let r = Region::new(size);
    let (bytes, pages) = (r.bytes(), r.pages);
    let probe = page_pipe_sys::probe_vmsplice()?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "{} MiB ({pages} pages of {} bytes); pipes of {} pages; {probe}; median of {runs} runs",
        bytes >> 20,
        r.ps,
        pipe_pages()
    );
    println!(
        "machine: {cpu}, {} cpus, Linux {}",
        std::thread::available_parallelism()?,
        kernel.trim()
    );
    let mut t = Table {
        bytes,
        pages,
        rows: Vec::new(),
    };
    let mut paths = Table {
        bytes,
        pages,
        rows: Vec::new(),
    };

    // Capture, with fresh pipes.
    let source = r.source();
    let mut copy = vec![0u8; r.mem.len()];
    let memcpy_t = median(runs, || memcpy(&r, &mut copy));
    let mut held = Vec::new();
    let bare = timed(runs, || {
        held.clear();
        let s = Instant::now();
        held = bare_vmsplice(&r);
        s.elapsed()
    });
    held.clear();
    let mut kept = None;
    let ours = timed(runs, || {
        kept = None;
        let s = Instant::now();
        kept = Some(capture(&r, &source, None));
        s.elapsed()
    });
    drop(kept);
    t.row(
        "capture, fresh pipes",
        ours,
        "memcpy into a buffer",
        memcpy_t,
    );
    t.row("capture, fresh pipes", ours, "bare vmsplice loop", bare);

    // Capture into pipes made before (a pool, for ours), emptied between runs.
    let pipes = make_pipes(&r);
    let bare = timed(runs, || {
        let s = Instant::now();
        bare_vmsplice_into(&r, &pipes);
        let d = s.elapsed();
        empty_pipes(&r, &pipes);
        d
    });
    drop(pipes);
    let pool = PipePool::new(1 << 16);
    discard(capture(&r, &source, Some(&pool)));
    let ours = timed(runs, || {
        let s = Instant::now();
        let c = capture(&r, &source, Some(&pool));
        let d = s.elapsed();
        discard(c);
        d
    });
    drop(pool);
    t.row(
        "capture, pooled pipes",
        ours,
        "memcpy into a buffer",
        memcpy_t,
    );
    t.row("capture, pooled pipes", ours, "bare vmsplice loop", bare);

    // Dump to a file.
    let dir = std::env::temp_dir().join(format!("page-pipe-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let img = dir.join("img");
    let fc = dir.join("firecracker.mem");
    let base_t = median(runs, || firecracker(&r, &fc));
    std::fs::remove_file(&fc)?;
    for (name, drain) in [
        ("pipes", Drain::Pipes),
        ("memory", Drain::Memory),
        ("default", Drain::Auto),
    ] {
        let d = median(runs, || dump_image(&r, &img, drain));
        if drain == Drain::Auto {
            t.row("dump to a file", d, "write_all loop (Firecracker)", base_t);
        } else {
            paths.row(
                &format!("file, {name}"),
                d,
                "write_all loop (Firecracker)",
                base_t,
            );
        }
    }

    // Sockets: memory a user lends (borrowed: its pages must leave as copies) and memory
    // nobody can write any more (owned: its pages may go by reference). Ours and the
    // baseline alternate run by run.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let kinds: [(&str, &dyn Fn() -> Pair); 2] = [
        ("Unix socket", &unix_pair),
        ("TCP loopback", &|| tcp_pair(&listener)),
    ];
    let owned = sealed_source(&r);
    for (name, pair) in kinds {
        for (mem, src) in [("borrowed memory", &source), ("owned memory", &owned)] {
            // The baseline writes from the very memory ours reads.
            let bytes = src.get(r.base(), r.pages).ok_or("one region")?;
            for (path, drain) in [
                ("pipes", Drain::Pipes),
                ("memory", Drain::Memory),
                ("default", Drain::Auto),
            ] {
                let (base_t, d) = paired(
                    runs,
                    || time(|| write_socket_from(bytes, pair())),
                    || time(|| source_to_socket(&r, src, pair(), drain)),
                );
                if drain == Drain::Auto {
                    t.row(
                        &format!("{name}, {mem}"),
                        d,
                        "write from the mapping",
                        base_t,
                    );
                } else {
                    paths.row(
                        &format!("{name}, {mem}, {path}"),
                        d,
                        "write from the mapping",
                        base_t,
                    );
                }
            }
        }
    }

    // CRIU's page-server protocol: our client against writing the same messages (headers
    // and pages from the mapping) by hand, into a peer that drops the pages; our server
    // writing the image against our ImageWriter fed the same entries in-process. Nothing
    // is synced on either side. Ours and the baseline alternate run by run.
    let img_ps = dir.join("ps");
    let img_base = dir.join("writer");
    for (name, tcp) in [("Unix socket", None), ("TCP loopback", Some(&listener))] {
        // The messages our client sends, which the baseline sends too.
        let (c, s) = conn_pair(tcp);
        let peer = sink_server(s);
        to_page_server(&r, &source, c);
        let framing = peer.join().map_err(|_| "the peer failed")?;
        for (mem, src) in [("borrowed", &source), ("owned", &owned)] {
            let bytes = src.get(r.base(), r.pages).ok_or("one region")?;
            let (base_t, ours) = paired(
                runs,
                || {
                    let (c, s) = conn_pair(tcp);
                    let peer = sink_server(s);
                    time(|| {
                        write_framing_from(&r, bytes, &framing, c);
                        assert!(peer.join().expect("peer") == framing);
                    })
                },
                || {
                    let (c, s) = conn_pair(tcp);
                    let peer = sink_server(s);
                    time(|| {
                        to_page_server(&r, src, c);
                        assert!(peer.join().expect("peer") == framing, "the same messages");
                    })
                },
            );
            t.row(
                &format!("page-server client, {name}, {mem} memory"),
                ours,
                "write of the same messages",
                base_t,
            );
        }
        let (base_t, ours) = paired(
            runs,
            || time(|| image_writer_from_mapping(&r, &framing, &img_base)),
            || time(|| page_server_receives(&r, &framing, &img_ps, tcp)),
        );
        t.row(
            &format!("page server writing images, {name}"),
            ours,
            "ImageWriter in-process",
            base_t,
        );
    }
    drop(owned);

    // Restore into memory already touched: no page faults, a different case from a
    // VMM's. The image's data is on disk first, as a VMM's snapshot is: writeback of
    // what was just written would take a CPU from the restore's threads.
    settle(&img)?;
    let pages_file = img.join("pages-1.img");
    let mut dst = touched(r.mem.len());
    let ours = median(runs, || restore(&img, r.base(), &mut dst[..]));
    assert!(dst[..] == r.mem[..], "restored memory differs");
    let base_t = median(runs, || pread(&pages_file, &mut dst[..]));
    t.row("restore into touched memory", ours, "pread loop", base_t);
    drop(dst);

    // Restore into fresh memory: a new mapping each run, not timed, nor its unmapping.
    let mut ours = Vec::new();
    let mut base = Vec::new();
    for run in 0..runs {
        let mut dst = fresh(r.mem.len());
        let s = Instant::now();
        restore(&img, r.base(), &mut dst[..]);
        ours.push(s.elapsed());
        if run == 0 {
            assert!(dst[..] == r.mem[..], "restored memory differs");
        }
        drop(dst);
        let mut dst = fresh(r.mem.len());
        let s = Instant::now();
        pread(&pages_file, &mut dst[..]);
        base.push(s.elapsed());
        drop(dst);
    }
    let mid = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let eager_fresh = mid(ours);
    t.row(
        "restore into fresh memory",
        eager_fresh,
        "pread loop",
        mid(base),
    );

    // A chain: the full image and an incremental one with 10% of the pages, and that
    // chain flattened (for the baseline's pages file).
    let incr = dir.join("incr");
    let expect = write_incremental(&r, &img, &incr);
    let flat = dir.join("flat");
    flatten(
        &incr,
        &flat,
        &FlattenOptions {
            sync: false,
            progress: None,
        },
    )?;
    settle(&incr)?;
    settle(&flat)?;
    let flat_pages = flat.join("pages-1.img");
    let mut ours = Vec::new();
    let mut base = Vec::new();
    for run in 0..runs {
        let mut dst = fresh(r.mem.len());
        let s = Instant::now();
        restore(&incr, r.base(), &mut dst[..]);
        ours.push(s.elapsed());
        if run == 0 {
            assert!(dst[..] == expect[..], "the chain restored wrong");
        }
        drop(dst);
        let mut dst = fresh(r.mem.len());
        let s = Instant::now();
        pread(&flat_pages, &mut dst[..]);
        base.push(s.elapsed());
        if run == 0 {
            assert!(dst[..] == expect[..], "the flattened chain differs");
        }
        drop(dst);
    }
    t.row(
        "restore a chain into fresh memory",
        mid(ours),
        "pread loop, flattened pages",
        mid(base),
    );
    drop(expect);

    // Flatten the chain against copying its files.
    let out = dir.join("out");
    let mut ours = Vec::new();
    let mut base = Vec::new();
    // Each run's output is synced (not timed) and removed, so that no run pays for the
    // writeback of another's.
    for _ in 0..runs {
        let s = Instant::now();
        flatten(
            &incr,
            &out,
            &FlattenOptions {
                sync: false,
                progress: None,
            },
        )?;
        ours.push(s.elapsed());
        settle(&out)?;
        std::fs::remove_dir_all(&out)?;
        let s = Instant::now();
        for d in [&img, &incr] {
            copy_dir(d, &out.join(d.file_name().expect("a name")))?;
        }
        base.push(s.elapsed());
        settle(&out)?;
        std::fs::remove_dir_all(&out)?;
    }
    t.row(
        "flatten",
        mid(ours),
        "copy_file_range of the chain's files",
        mid(base),
    );

    // Restore by mapping: time to ready, then a write to every page.
    let (mut ready, mut touch) = (Vec::new(), Vec::new());
    let (mut fc_ready, mut fc_touch) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let s = Instant::now();
        let mut mem = map_image(&img, r.base(), r.mem.len());
        ready.push(s.elapsed());
        if run == 0 {
            assert!(mem[..] == r.mem[..], "the mapped image differs");
        }
        let s = Instant::now();
        touch_pages(&mut mem, r.ps);
        touch.push(s.elapsed());
        drop(mem);
        let s = Instant::now();
        let mut mem = map_raw(&pages_file);
        fc_ready.push(s.elapsed());
        let s = Instant::now();
        touch_pages(&mut mem, r.ps);
        fc_touch.push(s.elapsed());
        drop(mem);
    }
    let (ready, touch) = (mid(ready), mid(touch));
    let (fc_ready, fc_touch) = (mid(fc_ready), mid(fc_touch));
    t.row_time(
        "restore by mapping (time to ready)",
        ready,
        "mmap(MAP_PRIVATE) of the raw file",
        fc_ready,
    );
    t.row(
        "restore by mapping, then first touch",
        ready + touch,
        "mmap(MAP_PRIVATE) of the raw file",
        fc_ready + fc_touch,
    );

    t.print();
    println!(
        "\nfirst touch (a write to every page) after mapping: {:.1} ms ours, {:.1} ms the raw file's; beside it the eager restore into fresh memory: {:.1} ms",
        touch.as_secs_f64() * 1e3,
        fc_touch.as_secs_f64() * 1e3,
        eager_fresh.as_secs_f64() * 1e3
    );
    println!("\ndrain paths (the default takes the faster):");
    paths.print();

    // Peak extra memory of a capture and of a copy.
    drop(copy);
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = rss_kib("VmRSS:");
    let mut pp = PagePipe::builder().iov_budget(pages as usize).build()?;
    pp.add_pages(r.base(), pages, BufFlags::empty())?;
    let captured = pp.capture(&source)?;
    let capture_peak = rss_kib("VmHWM:").saturating_sub(before);
    let pipes = captured.page_pipe().open_pipes() as u64;
    drop(captured);
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = rss_kib("VmRSS:");
    let mut copy = vec![0u8; r.mem.len()];
    memcpy(&r, &mut copy);
    let copy_peak = rss_kib("VmHWM:").saturating_sub(before);
    drop(copy);
    let ring = pipes * pipe_pages() as u64 * page_pipe_sys::PIPE_BUFFER_SIZE as u64 / 1024;
    let pct = |kib: u64| kib as f64 * 1024.0 / bytes as f64 * 100.0;
    println!(
        "\nextra memory: capture {capture_peak} KiB of RSS ({:.2}%) and {ring} KiB of pipe rings in the kernel ({:.2}%); copy {copy_peak} KiB ({:.1}%)",
        pct(capture_peak),
        pct(ring),
        pct(copy_peak),
    );
    std::fs::remove_dir_all(&dir)?;
    println!();
    tracking(size, runs)?;
    #[cfg(feature = "vm-memory")]
    {
        println!();
        guest_memory::rows(size, runs)?;
    }
    Ok(())
}

/// One row of the tracking table: ours against a baseline, and the goal if there is one.
struct TrackRow {
    what: String,
    ours: Duration,
    base_name: String,
    base: Duration,
    goal: String,
}

fn fmt_time(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else if us >= 1.0 {
        format!("{us:.1} us")
    } else {
        format!("{:.0} ns", us * 1000.0)
    }
}

fn print_track_rows(rows: &[TrackRow]) {
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.what.clone(),
                fmt_time(r.ours),
                r.base_name.clone(),
                if r.base.is_zero() {
                    "-".into()
                } else {
                    fmt_time(r.base)
                },
                if r.base.is_zero() {
                    "-".into()
                } else {
                    format!("{:.2}x", r.base.as_secs_f64() / r.ours.as_secs_f64())
                },
                r.goal.clone(),
            ]
        })
        .collect();
    let head = ["what", "ours", "baseline", "baseline time", "ratio", "goal"].map(String::from);
    let w: Vec<usize> = (0..6)
        .map(|c| {
            cells
                .iter()
                .chain([&head])
                .map(|r| r[c].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in [&head].into_iter().chain(&cells) {
        println!(
            "{:<a$}  {:>b$}  {:<c$}  {:>d$}  {:>e$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            a = w[0],
            b = w[1],
            c = w[2],
            d = w[3],
            e = w[4]
        );
    }
}

/// Dirty tracking: see the module docs.
fn tracking(size: u64, runs: usize) -> Result<(), Box<dyn std::error::Error>> {
    use page_pipe::track::{Avoid, TrackOptions, TrackRegion, Tracker, plan_from_dirty_log};
    use page_pipe_sys::{PageRegion, Pagemap};
    use track_workloads::{bare_scan, dirty_log, memcmp_pages, random_pages, write_pages};

    let mut r = Region::new(size);
    let (ps, pages, base) = (r.ps, r.pages, r.base());
    let idx = random_pages(pages, 0.01, 7);
    println!(
        "dirty tracking: {} MiB ({pages} pages), {} pages (1%) written at random between scans, median of {runs} runs",
        r.bytes() >> 20,
        idx.len()
    );
    let probe = page_pipe_sys::probe_userfaultfd().to_string();
    let how = probe.lines().last().unwrap_or_default();
    println!("{}", how.split_whitespace().collect::<Vec<_>>().join(" "));
    let mut rows = Vec::new();
    let met = |ok: bool| if ok { "met" } else { "NOT met" };

    match Tracker::start_async(
        &[TrackRegion::of(base, &r.mem[..])],
        &TrackOptions::default(),
    ) {
        Err(e) => println!("asynchronous tracking unavailable: {e}"),
        Ok(mut t) => {
            let mut round = 0u8;
            let mut written = 0;
            let take = timed(runs, || {
                round = round.wrapping_add(1);
                write_pages(&mut r.mem, ps, &idx, round);
                let s = Instant::now();
                let plan = t.take().expect("take");
                let d = s.elapsed();
                written = plan
                    .iter()
                    .map(|s| match s {
                        page_pipe::snapshot::Span::Pages { pages, .. } => *pages,
                        _ => 0,
                    })
                    .sum::<u64>();
                d
            });
            assert_eq!(
                written,
                idx.len() as u64,
                "the plan holds the written pages"
            );
            let pm = Pagemap::open_self()?;
            let mut out = vec![PageRegion::default(); 8192];
            let bare = timed(runs, || {
                round = round.wrapping_add(1);
                write_pages(&mut r.mem, ps, &idx, round);
                let s = Instant::now();
                std::hint::black_box(bare_scan(&pm, base as usize, r.mem.len(), &mut out));
                s.elapsed()
            });
            // The first write to a protected page: the kernel lifts the protection itself.
            let first_write = timed(runs, || {
                t.take().expect("take");
                let s = Instant::now();
                round = round.wrapping_add(1);
                write_pages(&mut r.mem, ps, &idx, round);
                s.elapsed() / idx.len().max(1) as u32
            });
            let again = timed(runs, || {
                let s = Instant::now();
                round = round.wrapping_add(1);
                write_pages(&mut r.mem, ps, &idx, round);
                s.elapsed() / idx.len().max(1) as u32
            });
            drop(t);
            let ratio = take.as_secs_f64() / bare.as_secs_f64();
            rows.push(TrackRow {
                what: "take(), async".into(),
                ours: take,
                base_name: "bare PAGEMAP_SCAN (WP_MATCHING)".into(),
                base: bare,
                goal: format!("<= 2x bare: {} ({ratio:.2}x bare)", met(ratio <= 2.0)),
            });
            let copy = r.mem.to_vec();
            let memcmp_t = timed(runs, || {
                round = round.wrapping_add(1);
                write_pages(&mut r.mem, ps, &idx, round);
                let s = Instant::now();
                std::hint::black_box(memcmp_pages(&r.mem, &copy, ps));
                s.elapsed()
            });
            drop(copy);
            rows.push(TrackRow {
                what: "take(), async".into(),
                ours: take,
                base_name: "memcmp with a copy".into(),
                base: memcmp_t,
                goal: String::new(),
            });
            rows.push(TrackRow {
                what: "first write to a page, async".into(),
                ours: first_write,
                base_name: "write to a page not protected".into(),
                base: again,
                goal: String::new(),
            });
        }
    }

    // The synchronous fallback: the cost of each first write, from the writing thread.
    let fault_pages = 4096.min(pages as usize);
    let sync_opts = TrackOptions {
        avoid: Avoid::WP_ASYNC,
        ..TrackOptions::default()
    };
    let region = [TrackRegion::of(base, &r.mem[..fault_pages * ps])];
    // SAFETY: the region is part of this program's own anonymous mapping: no heap, stack,
    // lock or kernel-maintained word lives in it; only this thread writes it, holding
    // nothing the handler thread needs, and no signal handler writes it.
    match unsafe { Tracker::start(&region, &sync_opts) } {
        Err(e) => println!("synchronous tracking unavailable: {e}"),
        Ok(mut t) => {
            let mut round = 0u8;
            let mut per_fault = Vec::with_capacity(runs * fault_pages);
            for _ in 0..runs {
                t.take().expect("take");
                round = round.wrapping_add(1);
                for p in 0..fault_pages {
                    let s = Instant::now();
                    let b = &mut r.mem[p * ps + 7];
                    *b = b.wrapping_add(round | 1);
                    per_fault.push(s.elapsed());
                }
            }
            per_fault.sort();
            let median = per_fault[per_fault.len() / 2];
            let p90 = per_fault[per_fault.len() * 9 / 10];
            let faults = t.faults();
            drop(t);
            let plain = timed(runs, || {
                let s = Instant::now();
                round = round.wrapping_add(1);
                write_pages(
                    &mut r.mem,
                    ps,
                    &(0..fault_pages as u64).collect::<Vec<_>>(),
                    round,
                );
                s.elapsed() / fault_pages as u32
            });
            rows.push(TrackRow {
                what: format!(
                    "first write to a page, sync fallback (p90 {})",
                    fmt_time(p90)
                ),
                ours: median,
                base_name: "write to a page not protected".into(),
                base: plain,
                goal: format!(
                    "{faults} faults served; 3.5 us same CPU, ~60 us across CPUs measured before"
                ),
            });
        }
    }

    // The synchronous fallback's take over the whole region, 1% written.
    let region = [TrackRegion::of(base, &r.mem[..])];
    // SAFETY: as for the fault measurement above: this program's own anonymous mapping,
    // written only by this thread.
    if let Ok(mut t) = unsafe { Tracker::start(&region, &sync_opts) } {
        let mut round = 0u8;
        let take = timed(runs, || {
            round = round.wrapping_add(1);
            write_pages(&mut r.mem, ps, &idx, round);
            let s = Instant::now();
            std::hint::black_box(t.take().expect("take"));
            s.elapsed()
        });
        rows.push(TrackRow {
            what: "take(), sync fallback".into(),
            ours: take,
            base_name: "bare PAGEMAP_SCAN (WP_MATCHING)".into(),
            base: rows.first().map_or(Duration::ZERO, |r| r.base),
            goal: "re-protects each run recorded (UFFDIO_WRITEPROTECT)".into(),
        });
    }

    // KVM-style dirty logs of the whole region into plans.
    for (percent, goal_us) in [(1.0, 50.0), (50.0, 1000.0)] {
        let idx = random_pages(pages, percent / 100.0, 3);
        let log = dirty_log(pages, &idx);
        let reps = 20;
        let d = timed(runs, || {
            let s = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(plan_from_dirty_log(&log, base, pages, ps).expect("plan"));
            }
            s.elapsed() / reps
        });
        let goal = goal_us * (pages as f64 / 262_144.0);
        rows.push(TrackRow {
            what: format!("dirty log -> plan, {percent}% dirty"),
            ours: d,
            base_name: String::new(),
            base: Duration::ZERO,
            goal: format!(
                "<= {}: {}",
                fmt_time(Duration::from_secs_f64(goal / 1e6)),
                met(d.as_secs_f64() * 1e6 <= goal)
            ),
        });
    }
    print_track_rows(&rows);
    Ok(())
}

/// Live snapshots: see the module docs.
fn live(size: u64, runs: usize) -> Result<(), Box<dyn std::error::Error>> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use page_pipe::image::ImageWriter;
    use page_pipe::snapshot::{SnapshotOptions, snapshot};
    use page_pipe::track::{Avoid, LiveKind, LiveOptions, TrackOptions, TrackRegion, Tracker};
    use track_workloads::{random_pages, write_pages};

    let mut r = Region::new(size);
    let (ps, pages, base) = (r.ps, r.pages, r.base());
    println!(
        "live snapshots: {} MiB ({pages} pages), live images not synced, median of {runs} runs",
        r.bytes() >> 20
    );
    let dir = std::env::temp_dir().join(format!("page-pipe-bench-live-{}", std::process::id()));
    let fresh_dir = |name: &str| {
        let d = dir.join(name);
        let _ = std::fs::remove_dir_all(&d);
        d
    };
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let topts = TrackOptions {
        avoid: Avoid::WP_ASYNC,
        ..TrackOptions::default()
    };
    let lopts = LiveOptions::default();

    // Stop-the-world: the whole dump into a new directory, memory frozen throughout,
    // with the image synced (the writer's default) and without.
    let stw_for = |sync: bool| {
        median(runs, || {
            let mut w = ImageWriter::create(fresh_dir("stw"), 1)
                .expect("create")
                .with_sync(sync);
            snapshot(&r.source(), r.plan(), &mut w, &SnapshotOptions::default()).expect("snapshot");
            w.finish().expect("finish");
        })
    };
    let stw = stw_for(true);
    let stw_nosync = stw_for(false);
    // A copy of the region into fresh memory (mapping it is not counted).
    let memcpy_t = timed(runs, || {
        let mut f = memmap2::MmapOptions::new()
            .len(r.mem.len())
            .map_anon()
            .expect("map");
        let s = Instant::now();
        f.copy_from_slice(&r.mem[..]);
        s.elapsed()
    });

    // The live snapshot's pause, its quiet dump, and the incremental pause.
    let base_mem = &r.mem;
    let mut quiet = Vec::new();
    let mut incr = Vec::new();
    let mut peak = 0u64;
    let pause = timed(runs, || {
        let s = Instant::now();
        // SAFETY: the region is the bench's own anonymous mapping, alive until the
        // tracker stops: no allocator heap, stack or lock lives in it; nothing writes it
        // while the tracker runs but this thread, between snapshots.
        let mut t = unsafe { Tracker::start(&[TrackRegion::of(base, &base_mem[..])], &topts) }
            .expect("synchronous tracking");
        // SAFETY: as above; the mapping outlives the dump.
        let live = unsafe { t.live(LiveKind::Full, &lopts) }.expect("live");
        let d = s.elapsed();
        let mut w = ImageWriter::create(fresh_dir("live"), 1)
            .expect("create")
            .with_sync(false);
        let rep = live.dump(&mut w).expect("dump");
        w.finish().expect("finish");
        quiet.push(rep.dump_time);
        peak = peak.max(rep.saved_peak_bytes);
        t.stop().expect("stop");
        d
    });
    let idx = random_pages(pages, 0.01, 11);
    for round in 0..runs {
        // SAFETY: as above.
        let mut t = unsafe { Tracker::start(&[TrackRegion::of(base, &r.mem[..])], &topts) }
            .expect("synchronous tracking");
        // This thread writes between snapshots; each first write waits for the handler.
        write_pages(&mut r.mem, ps, &idx, round as u8 + 1);
        // SAFETY: as above.
        let live = unsafe { t.live(LiveKind::Incremental, &lopts) }.expect("live");
        incr.push(live.pause());
        drop(live);
        t.stop().expect("stop");
    }
    incr.sort();
    let incr = incr[incr.len() / 2];
    quiet.sort();
    let quiet_t = quiet[quiet.len() / 2];

    // The live dump with one writer dirtying a random page every 10 us.
    let stop = Arc::new(AtomicBool::new(false));
    let mut busy = Vec::new();
    let mut saved = 0;
    for _ in 0..runs {
        // SAFETY: as above; the writer below writes the region through its address only.
        let mut t = unsafe { Tracker::start(&[TrackRegion::of(base, &r.mem[..])], &topts) }
            .expect("synchronous tracking");
        // SAFETY: as above.
        let live = unsafe { t.live(LiveKind::Full, &lopts) }.expect("live");
        stop.store(false, Ordering::Relaxed);
        let (st, addr, n) = (Arc::clone(&stop), r.mem.as_ptr() as usize, pages);
        let writer = std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while !st.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (addr + (x % n) as usize * ps) as *mut u64;
                // SAFETY: a word of the bench's mapping, alive until the writer is
                // joined; written with a volatile store, read only by the kernel and
                // volatile copies while the writer runs.
                unsafe { at.write_volatile(x) };
                std::thread::sleep(Duration::from_micros(10));
            }
        });
        let mut w = ImageWriter::create(fresh_dir("busy"), 1)
            .expect("create")
            .with_sync(false);
        let rep = live.dump(&mut w).expect("dump");
        w.finish().expect("finish");
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        busy.push(rep.dump_time);
        saved = saved.max(rep.saved_pages);
        peak = peak.max(rep.saved_peak_bytes);
        t.stop().expect("stop");
    }
    busy.sort();
    let busy_t = busy[busy.len() / 2];

    let rows = vec![
        TrackRow {
            what: "live snapshot pause".into(),
            ours: pause,
            base_name: "stop-the-world (the whole dump, synced)".into(),
            base: stw,
            goal: format!("<= 1/50: {}", met(pause * 50 <= stw)),
        },
        TrackRow {
            what: "live snapshot pause".into(),
            ours: pause,
            base_name: "stop-the-world, image not synced".into(),
            base: stw_nosync,
            goal: "-".into(),
        },
        TrackRow {
            what: "live snapshot pause".into(),
            ours: pause,
            base_name: "memcpy into fresh memory".into(),
            base: memcpy_t,
            goal: format!("<= 1/5: {}", met(pause * 5 <= memcpy_t)),
        },
        TrackRow {
            what: "live snapshot pause, incremental (1%)".into(),
            ours: incr,
            base_name: "stop-the-world (the whole dump)".into(),
            base: stw,
            goal: "-".into(),
        },
        TrackRow {
            what: "live dump, a writer every 10 us".into(),
            ours: busy_t,
            base_name: "the same dump, no writer".into(),
            base: quiet_t,
            goal: format!(
                ">= 0.8x: {}",
                met(quiet_t.as_secs_f64() >= 0.8 * busy_t.as_secs_f64())
            ),
        },
    ];
    print_track_rows(&rows);
    println!(
        "saved copies: at most {} KiB held ({:.3}% of the region), {saved} pages saved in the busiest dump",
        peak / 1024,
        peak as f64 * 100.0 / r.bytes() as f64
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// rust-vmm guest memory against the same memory as slices: see the module docs.
#[cfg(feature = "vm-memory")]
mod guest_memory {
    use std::error::Error;
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, Instant};

    use page_pipe::Source;
    use page_pipe::image::{Image, ImageWriter};
    use page_pipe::snapshot::{SnapshotOptions, snapshot};
    use page_pipe::vm::{self, GuestRestoreOptions};
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    use super::{Table, fresh};

    fn mid(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }

    pub fn rows(size: u64, runs: usize) -> Result<(), Box<dyn Error>> {
        let ps = page_pipe::page_size();
        let pages = (size / ps as u64).max(4);
        let low = (pages * 3 / 4) as usize * ps;
        let high = pages as usize * ps - low;
        let layout = [(GuestAddress(0), low), (GuestAddress(4 << 30), high)];
        println!(
            "guest memory: GuestMemoryMmap of {} MiB at 0x0 and {} MiB at 0x100000000, median of {runs} runs",
            low >> 20,
            high >> 20
        );
        let mem = GuestMemoryMmap::<()>::from_ranges(&layout)?;
        let mut buf = vec![0u8; 1 << 20];
        for &(base, len) in &layout {
            for off in (0..len).step_by(buf.len()) {
                let n = buf.len().min(len - off);
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = ((off + i) >> 12) as u8 ^ (i as u8).wrapping_mul(7);
                }
                mem.write_slice(&buf[..n], GuestAddress(base.0 + off as u64))?;
            }
        }
        // The baseline's view of the same memory: slices of the regions' mappings.
        let slices: Vec<(u64, &[u8])> = mem
            .iter()
            .map(|r| {
                // SAFETY: the mapping of `r` is `size()` bytes at `as_ptr()`, mapped while
                // `mem` lives (it outlives the slices); nothing writes it from here on.
                let s = unsafe { std::slice::from_raw_parts(r.as_ptr(), r.size()) };
                (r.start_addr().0, s)
            })
            .collect();
        let bytes = pages * ps as u64;
        let mut t = Table {
            bytes,
            pages,
            rows: Vec::new(),
        };
        let dir = std::env::temp_dir().join(format!("page-pipe-bench-vm-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let opts = SnapshotOptions::default();

        // Snapshot into an image directory, alternating.
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let s = Instant::now();
            let source = Source::new().with_guest_memory(&mem)?;
            let mut w = ImageWriter::create(dir.join("guest"), 1)?.with_sync(false);
            snapshot(&source, vm::full_plan(&mem)?, &mut w, &opts)?;
            w.finish()?;
            ours.push(s.elapsed());
            let s = Instant::now();
            let mut source = Source::new();
            for &(a, sl) in &slices {
                source = source.with_slice(a, sl)?;
            }
            let mut w = ImageWriter::create(dir.join("slices"), 1)?.with_sync(false);
            snapshot(&source, vm::full_plan(&mem)?, &mut w, &opts)?;
            w.finish()?;
            base.push(s.elapsed());
        }
        t.row(
            "snapshot of a GuestMemoryMmap to a file",
            mid(ours),
            "the same memory as slices",
            mid(base),
        );

        // Restores into fresh memory, alternating; mapping and unmapping not timed.
        let image = Image::open(dir.join("guest"))?;
        let check = |m: &GuestMemoryMmap<_>| -> Result<(), Box<dyn Error>> {
            let mut a = vec![0u8; 1 << 20];
            let mut b = vec![0u8; 1 << 20];
            for &(base, len) in &layout {
                for off in (0..len).step_by(a.len()) {
                    let n = a.len().min(len - off);
                    let at = GuestAddress(base.0 + off as u64);
                    mem.read_slice(&mut a[..n], at)?;
                    m.read_slice(&mut b[..n], at)?;
                    assert!(
                        a[..n] == b[..n],
                        "restored guest memory differs at {:#x}",
                        at.0
                    );
                }
            }
            Ok(())
        };
        let fresh_opts = GuestRestoreOptions {
            fresh: true,
            ..GuestRestoreOptions::default()
        };
        let one_thread = GuestRestoreOptions {
            threads: std::num::NonZeroUsize::new(1),
            ..fresh_opts
        };
        let (mut ours, mut base, mut bitmap, mut bounce, mut single) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let pages_file = image.pages_path().to_path_buf();
        for run in 0..runs {
            let m = GuestMemoryMmap::<()>::from_ranges(&layout)?;
            let s = Instant::now();
            vm::restore(&image, &m, &fresh_opts)?;
            ours.push(s.elapsed());
            if run == 0 {
                check(&m)?;
            }
            drop(m);

            let mut dsts: Vec<_> = layout.iter().map(|&(_, len)| fresh(len)).collect();
            let s = Instant::now();
            for (&(a, _), d) in layout.iter().zip(&mut dsts) {
                image.restore(a.0, &mut d[..], &Default::default())?;
            }
            base.push(s.elapsed());
            drop(dsts);

            let m = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&layout)?;
            let s = Instant::now();
            vm::restore(&image, &m, &fresh_opts)?;
            bitmap.push(s.elapsed());
            drop(m);

            let m = GuestMemoryMmap::<()>::from_ranges(&layout)?;
            let s = Instant::now();
            vm::restore(&image, &m, &one_thread)?;
            single.push(s.elapsed());
            drop(m);

            // The alternative to reading straight into guest memory: a bounce buffer.
            let m = GuestMemoryMmap::<()>::from_ranges(&layout)?;
            let f = std::fs::File::open(&pages_file)?;
            let s = Instant::now();
            let mut off = 0u64;
            for &(a, len) in &layout {
                for o in (0..len).step_by(buf.len()) {
                    let n = buf.len().min(len - o);
                    f.read_exact_at(&mut buf[..n], off)?;
                    m.write_slice(&buf[..n], GuestAddress(a.0 + o as u64))?;
                    off += n as u64;
                }
            }
            bounce.push(s.elapsed());
            if run == 0 {
                check(&m)?;
            }
        }
        let ours = mid(ours);
        t.row(
            "restore into a fresh GuestMemoryMmap",
            ours,
            "Image::restore into fresh mappings",
            mid(base),
        );
        t.row(
            "restore, GuestMemoryMmap<AtomicBitmap>",
            mid(bitmap),
            "the same without a bitmap (ours above)",
            ours,
        );
        t.row(
            "restore straight into VolatileSlices, 1 thread",
            mid(single),
            "a bounce buffer and write_slice, 1 thread",
            mid(bounce),
        );
        t.print();
        let goal = |row: usize| {
            let r = &t.rows[row][4];
            let ratio: f64 = r.trim().trim_end_matches('x').parse().unwrap_or(0.0);
            if ratio >= 0.9 { "met" } else { "NOT met" }
        };
        println!(
            "goal >= 0.90x the slice path: snapshot {}, restore {}",
            goal(0),
            goal(1)
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}

/// Whether page `i` changed for the incremental image: 10% of the pages, scattered.
fn dirty(i: u64) -> bool {
    let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    h.is_multiple_of(10)
}

/// Writes an incremental image of `r` over the full image `parent` into `dir`: the
/// dirty pages with new bytes, the others in the parent. Returns the memory it restores
/// to.
fn write_incremental(r: &Region, parent: &Path, dir: &Path) -> Vec<u8> {
    let mut w = ImageWriter::create(dir, 1)
        .expect("create the image")
        .with_sync(false)
        .with_parent(parent)
        .expect("the parent");
    let mut expect = r.mem.to_vec();
    let mut p = 0;
    while p < r.pages {
        let d = dirty(p);
        let n = (p..r.pages).take_while(|&q| dirty(q) == d).count() as u64;
        let e = PagemapEntry {
            vaddr: r.base() + p * r.ps as u64,
            pages: n,
            flags: if d {
                PageFlags::PRESENT
            } else {
                PageFlags::PARENT
            },
        };
        if d {
            let bytes = &mut expect[(p as usize * r.ps)..][..n as usize * r.ps];
            for (i, page) in bytes.chunks_exact_mut(r.ps).enumerate() {
                page.fill(!((p as usize + i) as u8));
            }
            w.push_bytes(e, bytes).expect("push");
        } else {
            w.push(e).expect("push");
        }
        p += n;
    }
    w.finish().expect("finish");
    expect
}

/// Syncs the regular files under `dir` (links not followed), so that their writeback is
/// over before what comes next is timed.
fn settle(dir: &Path) -> std::io::Result<()> {
    for ent in std::fs::read_dir(dir)? {
        let ent = ent?;
        let t = ent.file_type()?;
        if t.is_dir() {
            settle(&ent.path())?;
        } else if t.is_file() {
            std::fs::File::open(ent.path())?.sync_all()?;
        }
    }
    Ok(())
}

/// `cp -r` of an image directory as coreutils does it: each file copied with
/// `copy_file_range` (the `parent` link made again).
fn copy_dir(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for ent in std::fs::read_dir(src)? {
        let ent = ent?;
        let to = dst.join(ent.file_name());
        if ent.file_type()?.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(ent.path())?, to)?;
            continue;
        }
        let from = std::fs::File::open(ent.path())?;
        let out = std::fs::File::create(to)?;
        let mut left = from.metadata()?.len() as usize;
        while left > 0 {
            let n = rustix::fs::copy_file_range(&from, None, &out, None, left)?;
            if n == 0 {
                break;
            }
            left -= n;
        }
    }
    Ok(())
}

/// Ours: a new reservation, the image opened and mapped over it.
fn map_image(dir: &Path, base: u64, len: usize) -> MmapMut {
    let mut mem = fresh(len);
    let img = Image::open(dir).expect("open the image");
    // SAFETY:
    // - `mem` is this function's new mapping, and no reference into it is alive across
    //   the call;
    // - the bench does not change the image files while the mapping lives.
    unsafe { img.map_into(base, mem.as_mut_ptr(), len, &MapOptions::default()) }
        .expect("map the image");
    mem
}

/// Firecracker's file backend: one private mapping of the raw memory file.
fn map_raw(path: &Path) -> MmapMut {
    let f = std::fs::File::open(path).expect("open");
    // SAFETY: the bench does not change the file while the mapping lives.
    unsafe { MmapOptions::new().map_copy(&f) }.expect("map")
}

/// A write to every page: the first touch of memory just mapped (one fault a page, which
/// copies it out of the page cache).
fn touch_pages(mem: &mut [u8], ps: usize) {
    for page in mem.chunks_exact_mut(ps) {
        page[0] = 1;
    }
    std::hint::black_box(mem);
}
