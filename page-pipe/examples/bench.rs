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
//!   against `write` from the mapping;
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

#[path = "../benches/workloads/mod.rs"]
mod workloads;

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

    // Sockets.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let kinds: [(&str, &dyn Fn() -> Pair); 2] = [
        ("Unix socket", &unix_pair),
        ("TCP loopback", &|| tcp_pair(&listener)),
    ];
    for (name, pair) in kinds {
        let base_t = median(runs, || write_socket(&r, pair()));
        for (path, drain) in [
            ("pipes", Drain::Pipes),
            ("memory", Drain::Memory),
            ("default", Drain::Auto),
        ] {
            let d = median(runs, || to_socket(&r, pair(), drain));
            if drain == Drain::Auto {
                t.row(name, d, "write from the mapping", base_t);
            } else {
                paths.row(
                    &format!("{name}, {path}"),
                    d,
                    "write from the mapping",
                    base_t,
                );
            }
        }
    }

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
    flatten(&incr, &flat, &FlattenOptions { sync: false })?;
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
        flatten(&incr, &out, &FlattenOptions { sync: false })?;
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
    Ok(())
}

/// Whether page `i` changed for the incremental image: 10% of the pages, scattered.
fn dirty(i: u64) -> bool {
    let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    h % 10 == 0
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
