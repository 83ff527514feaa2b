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
//! - extra memory (peak RSS) of a capture against a copy.
//!
//! For each sink both drain paths are measured (pipes: capture then `splice`; memory:
//! straight from the mapping); the default (`Drain::Auto`) is the faster one.

#[path = "../benches/workloads/mod.rs"]
mod workloads;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use page_pipe::snapshot::Drain;
use page_pipe::{BufFlags, PagePipe, PipePool};
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
    // VMM's.
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
    t.row(
        "restore into fresh memory",
        mid(ours),
        "pread loop",
        mid(base),
    );

    t.print();
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
    Ok(())
}
