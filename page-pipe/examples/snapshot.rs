//! The page-pipe demo: a full snapshot of a region, an incremental one on top, a restore
//! through the chain, checked byte for byte.
//!
//! ```text
//! cargo run --release --example snapshot [-- --size 256M --dirty 10 --dir ./snapshots]
//! cargo run --release --example snapshot -- inspect ./snapshots/2
//! cargo run --release --example snapshot -- extract ./snapshots/2 --vaddr 7f0000000000 --pages 4 --out pages.bin
//! cargo run --release --example snapshot -- --to 127.0.0.1:4000   # to a page server
//! cargo run --release --example snapshot -- flatten ./snapshots/2 ./snapshots/flat
//! cargo run --release --example snapshot -- diff ./snapshots/2 ./snapshots/flat
//! ```
//!
//! Options of the demo: `--size SIZE` (K, M or G; default 256M), `--dirty PERCENT` of pages
//! changed between the snapshots (default 10), `--dir DIR` (default `./snapshots`),
//! `--single-pass` (no chunk mode), `--copy` (capture with write(2), not vmsplice),
//! `--drain pipes|memory|auto` (default `pipes`, to show the capture: the library's
//! default, `auto`, writes image files straight from memory, which measured as fast),
//! `--tracker auto|sync|off` (how the incremental snapshot learns which pages changed:
//! a `Tracker`, asynchronous where the kernel allows, or forced synchronous; `off` uses
//! the dirtying pattern, as the demo does anyway where tracking is unavailable).
//! `--to HOST:PORT` (send both snapshots to a page server, each a session of its own,
//! instead of writing them here: run `page_server --dir DIR --port PORT --chain` so that
//! the second lands as an incremental image on the first; a server without the parent
//! gets the second in full).
//! `--restore eager|map|lazy` (how the demo restores: read into fresh memory, the
//! default; map the pages files over it; or lazily with userfaultfd, the memory usable
//! at once and each page brought in on first touch or by the prefetch).
//!
//! `flatten SRC DST` writes the chain in SRC as one full image in DST; `diff A B` prints
//! the pages two images hold differently and exits as diff(1) does: 0 when they hold the
//! same pages, 1 when they differ, 2 on error.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use memmap2::MmapOptions;
use page_pipe::image::{
    DiffKind, FlattenOptions, Image, ImageSummary, ImageWriter, MapOptions, PageFlags,
    PagemapEntry, ReadReport,
};
use page_pipe::page_server::PageServerClient;
use page_pipe::snapshot::{Drain, SnapshotOptions, SnapshotReport, Span, snapshot, spans_from};
use page_pipe::track::{Avoid, Method, TrackOptions, TrackRegion, Tracker};
use page_pipe::{BufFlags, CaptureMode, HoleFlags, Source};

/// An error for the one line the demo prints before it exits.
struct Fail(String);

impl<E: std::error::Error> From<E> for Fail {
    /// The error and its causes, on one line.
    fn from(e: E) -> Self {
        let mut msg = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            msg = format!("{msg}: {c}");
            cause = c.source();
        }
        Fail(msg)
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail<T>(msg: impl Into<String>) -> Result<T, Fail> {
    Err(Fail(msg.into()))
}

const USAGE: &str =
    "usage: snapshot [--size SIZE] [--dirty PERCENT] [--dir DIR] [--single-pass] [--copy]
                [--drain pipes|memory|auto] [--restore eager|map|lazy] [--tracker auto|sync|off]
                [--to HOST:PORT]
       snapshot --live [--size SIZE] [--dir DIR] [--writers N] [--interval-us US]
       snapshot inspect DIR
       snapshot extract DIR --vaddr ADDR --pages N --out FILE
       snapshot flatten SRC DST
       snapshot diff A B";

#[path = "demo/live.rs"]
mod live;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        _ if args.iter().any(|a| a == "--live") => live::run(&args),
        Some("inspect") => inspect(&args[1..]),
        Some("extract") => extract(&args[1..]),
        Some("flatten") => flatten(&args[1..]),
        Some("diff") => return diff(&args[1..]),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => demo(&args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`| head`) is not an error.
        Err(Fail(e)) if e.contains("Broken pipe") => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapshot: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Options as `--name value` pairs and flags; anything else is an error.
struct Args<'a> {
    rest: &'a [String],
}

impl<'a> Args<'a> {
    fn value(&mut self, name: &str) -> Result<Option<&'a str>, Fail> {
        let Some(i) = self.rest.iter().position(|a| a == name) else {
            return Ok(None);
        };
        match self.rest.get(i + 1) {
            Some(v) => Ok(Some(v.as_str())),
            None => fail(format!("{name} needs a value (see --help)")),
        }
    }

    fn flag(&self, name: &str) -> bool {
        self.rest.iter().any(|a| a == name)
    }

    fn check(
        &self,
        known_values: &[&str],
        known_flags: &[&str],
        positional: usize,
    ) -> Result<(), Fail> {
        let mut i = positional;
        while i < self.rest.len() {
            let a = self.rest[i].as_str();
            if known_values.contains(&a) {
                i += 2;
            } else if known_flags.contains(&a) {
                i += 1;
            } else {
                return fail(format!("unknown argument {a:?} (see --help)"));
            }
        }
        Ok(())
    }
}

fn parse_size(s: &str) -> Result<u64, Fail> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .map_or_else(
            || fail(format!("bad size {s:?} (a number with K, M or G)")),
            Ok,
        )
}

fn parse_hex(s: &str) -> Result<u64, Fail> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_or_else(|_| fail(format!("bad address {s:?} (hex)")), Ok)
}

/// A cheap pattern: each 8-byte word names its page, its place and the round.
fn fill_page(page: &mut [u8], index: u64, round: u64) {
    for (w, chunk) in page.chunks_exact_mut(8).enumerate() {
        let v = (index << 20 | w as u64) ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        chunk.copy_from_slice(&v.to_le_bytes());
    }
}

/// Whether page `i` changes between the snapshots, for `percent` of the pages.
fn dirty(i: u64, percent: f64) -> bool {
    let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    ((h % 10_000) as f64) < percent * 100.0
}

fn demo(args: &[String]) -> Result<(), Fail> {
    let mut a = Args { rest: args };
    a.check(
        &[
            "--size",
            "--dirty",
            "--dir",
            "--drain",
            "--tracker",
            "--to",
            "--restore",
        ],
        &["--single-pass", "--copy"],
        0,
    )?;
    let track = match a.value("--tracker")?.unwrap_or("auto") {
        "auto" => Some(Avoid::empty()),
        "sync" => Some(Avoid::WP_ASYNC),
        "off" => None,
        other => return fail(format!("--tracker takes auto, sync or off, not {other:?}")),
    };
    let drain = match a.value("--drain")?.unwrap_or("pipes") {
        "pipes" => Drain::Pipes,
        "memory" => Drain::Memory,
        "auto" => Drain::Auto,
        other => {
            return fail(format!(
                "--drain takes pipes, memory or auto, not {other:?}"
            ));
        }
    };
    let how = Restore::parse(a.value("--restore")?)?;
    let size = parse_size(a.value("--size")?.unwrap_or("256M"))?;
    let percent: f64 = match a.value("--dirty")?.unwrap_or("10").parse() {
        Ok(p) if (0.0..=100.0).contains(&p) => p,
        _ => return fail("--dirty takes a percentage from 0 to 100"),
    };
    let dir = PathBuf::from(a.value("--dir")?.unwrap_or("./snapshots"));
    let to = a.value("--to")?;
    let opts = SnapshotOptions {
        drain,
        chunk_mode: !a.flag("--single-pass"),
        capture: if a.flag("--copy") {
            CaptureMode::Copy
        } else {
            CaptureMode::Auto
        },
        ..SnapshotOptions::default()
    };
    let ps = page_pipe_sys::page_size().get();
    let pages = size.div_ceil(ps as u64);
    let len = usize::try_from(pages * ps as u64).map_err(|_| Fail("size too large".into()))?;

    let mut mem = MmapOptions::new()
        .len(len)
        .map_anon()
        .map_err(|e| Fail(format!("cannot map {len} bytes: {e}")))?;
    for (i, page) in mem.chunks_exact_mut(ps).enumerate() {
        fill_page(page, i as u64, 1);
    }
    let base = mem.as_ptr() as u64;
    let (d1, d2) = (dir.join("1"), dir.join("2"));
    for d in [&d1, &d2].into_iter().filter(|_| to.is_none()) {
        match std::fs::remove_dir_all(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return fail(format!("{}: cannot clear: {e}", d.display())),
        }
    }

    println!(
        "region: {} pages ({}) at {base:#x}; {}{}; {percent}% of pages change between snapshots",
        pages,
        human(len as u64),
        if opts.chunk_mode {
            "chunk mode (at most 8 pipes)"
        } else {
            "single pass"
        },
        if opts.capture == CaptureMode::Copy {
            ", copying capture"
        } else {
            ""
        },
    );

    // Snapshot 1: everything.
    let full = {
        let source = Source::new().with_slice(base, &mem[..])?;
        let plan = [Span::Pages {
            addr: base,
            pages,
            flags: BufFlags::empty(),
        }];
        if let Some(addr) = to {
            to_server(addr, &source, plan.to_vec(), pages, &opts)?
        } else {
            let mut w = ImageWriter::create(&d1, 1)?;
            let r = snapshot(&source, plan, &mut w, &opts)?;
            (r, w.finish()?)
        }
    };

    // Track writes from here on, so that the incremental snapshot learns what changed
    // from the kernel, not from the dirtying pattern.
    let mut tracker = match track {
        None => Err("--tracker off".to_string()),
        Some(avoid) => {
            let opts = TrackOptions {
                avoid,
                ..TrackOptions::default()
            };
            let region = [TrackRegion::of(base, &mem[..])];
            // SAFETY: `mem` is the demo's own anonymous mapping: no heap, stack, lock or
            // word the kernel maintains lives in it; only this thread writes it, holding
            // nothing the handler thread needs, and no signal handler writes it.
            unsafe { Tracker::start(&region, &opts) }.map_err(|e| e.to_string())
        }
    };

    // Change some pages, then snapshot 2: the changed pages, the rest in the parent.
    let mut changed = 0u64;
    for (i, page) in mem.chunks_exact_mut(ps).enumerate() {
        if dirty(i as u64, percent) {
            fill_page(page, i as u64, 2);
            changed += 1;
        }
    }
    let plan: Vec<Span> = match &mut tracker {
        Ok(t) => {
            let plan = t.take()?;
            // The tracker's set against what the demo dirtied: all of it, and with
            // asynchronous tracking exactly that.
            let mut found = vec![false; pages as usize];
            for s in &plan {
                if let Span::Pages { addr, pages: n, .. } = *s {
                    let first = (addr - base) / ps as u64;
                    found[first as usize..(first + n) as usize].fill(true);
                }
            }
            let exact = t.info().method == Method::Async;
            for (i, &f) in found.iter().enumerate() {
                let d = dirty(i as u64, percent);
                if d && !f {
                    return fail(format!("the tracker missed dirtied page {i}"));
                }
                if exact && f && !d {
                    return fail(format!("the tracker reported page {i}, never dirtied"));
                }
            }
            let n = found.iter().filter(|&&f| f).count();
            println!("dirty set: {n} pages from {}", t.info().method);
            plan
        }
        Err(why) => {
            println!("dirty set: {changed} pages from the dirtying pattern (no tracker: {why})");
            spans_from(
                base,
                pages,
                ps,
                |i| dirty(i, percent),
                BufFlags::empty(),
                HoleFlags::PARENT,
            )
            .collect()
        }
    };
    let incr = {
        let source = Source::new().with_slice(base, &mem[..])?;
        if let Some(addr) = to {
            to_server(addr, &source, plan, pages, &opts)?
        } else {
            let mut w = ImageWriter::create(&d2, 1)?.with_parent(&d1)?;
            let r = snapshot(&source, plan, &mut w, &opts)?;
            (r, w.finish()?)
        }
    };
    drop(tracker);
    if let Some(addr) = to {
        for (name, (r, s)) in [("full", &full), ("incremental", &incr)] {
            println!(
                "{name:<12} sent to {addr}: {} entries, {} pages ({}), {} in the parent, in {}",
                s.entries,
                s.present_pages,
                human(s.present_pages * ps as u64),
                s.parent_pages,
                ms(r.add_time + r.capture_time + r.dump_time),
            );
        }
        return Ok(());
    }

    // Restore snapshot 2 through the chain into a fresh mapping and compare.
    let mut fresh = MmapOptions::new()
        .len(len)
        .map_anon()
        .map_err(|e| Fail(format!("cannot map {len} bytes: {e}")))?;
    let t = Instant::now();
    let (img, report) = how.restore(&d2, base, &mut fresh)?;
    let restore = t.elapsed();
    let same = fresh[..] == mem[..];

    let row = |name: &str, dir: &Path, r: &SnapshotReport, bytes: u64| {
        let busy = r.capture_time + r.dump_time;
        println!(
            "{name:<12} {:>9} {:>9} {:>10} {:>9} {:>9} {:>10}  {}  ({}, {} chunks, {} pipes)",
            r.pages,
            r.hole_pages,
            human(bytes),
            ms(r.capture_time),
            ms(r.dump_time),
            rate(r.pages * ps as u64, busy),
            r.path,
            dir.display(),
            r.chunks,
            r.pipes_made,
        );
    };
    println!(
        "\n{:<12} {:>9} {:>9} {:>10} {:>9} {:>9} {:>10}  path",
        "snapshot", "pages", "holes", "bytes", "capture", "dump", "rate"
    );
    let img_bytes = |d: &Path| -> u64 {
        ["pagemap-1.img", "pages-1.img"]
            .iter()
            .filter_map(|f| std::fs::metadata(d.join(f)).ok())
            .map(|m| m.len())
            .sum()
    };
    row("full", &d1, &full.0, img_bytes(&d1));
    row("incremental", &d2, &incr.0, img_bytes(&d2));
    println!(
        "{:<12} {:>9} {:>9} {:>10} {:>9} {:>9} {:>10}  through {} images: {} pages from 2, {} from 1",
        "restore",
        report.present + report.from_parents,
        "",
        human(len as u64),
        ms(restore),
        "",
        rate(len as u64, restore),
        img.depth(),
        report.present,
        report.from_parents,
    );
    println!(
        "\nincremental image: {} entries; {changed} pages changed, {} captured, {} in the parent",
        incr.1.entries, incr.1.present_pages, incr.1.parent_pages
    );
    if !same {
        return fail("restored memory differs from the region");
    }
    println!(
        "verify: restored {} ({how}) matches the region byte for byte",
        human(len as u64)
    );
    Ok(())
}

/// Sends a snapshot to the page server at `addr` as `pagemap-1.img`, in a session of its
/// own. A plan with holes needs the server to hold the parent image; when it does not,
/// all `pages` pages from the plan's start go.
fn to_server(
    addr: &str,
    source: &Source<'_>,
    plan: Vec<Span>,
    pages: u64,
    opts: &SnapshotOptions,
) -> Result<(SnapshotReport, ImageSummary), Fail> {
    let mut client = PageServerClient::connect(addr, 1)?;
    let has_holes = plan.iter().any(|s| matches!(s, Span::Hole { .. }));
    let plan = match plan.first() {
        Some(Span::Pages { addr, .. } | Span::Hole { addr, .. })
            if has_holes && !client.has_parent() =>
        {
            vec![Span::Pages {
                addr: *addr,
                pages,
                flags: BufFlags::empty(),
            }]
        }
        _ => plan,
    };
    let r = snapshot(source, plan, &mut client, opts)?;
    let sent = client.close()?;
    let summary = ImageSummary {
        entries: sent.entries,
        present_pages: sent.present_pages,
        parent_pages: sent.parent_pages,
        lazy_pages: sent.lazy_pages,
        pagemap_bytes: 0,
    };
    Ok((r, summary))
}

/// How the demo restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restore {
    /// `Image::restore`: read the pages into the fresh memory.
    Eager,
    /// `Image::map_into`: map the pages files over the fresh memory.
    Map,
    /// `LazyRestore`: userfaultfd fills each page on first touch, a thread the rest.
    Lazy,
}

impl Restore {
    fn parse(v: Option<&str>) -> Result<Self, Fail> {
        match v.unwrap_or("eager") {
            "eager" => Ok(Restore::Eager),
            "map" => Ok(Restore::Map),
            "lazy" => Ok(Restore::Lazy),
            other => fail(format!("--restore takes eager, map or lazy, not {other:?}")),
        }
    }

    /// Restores the image in `dir` from `base` into `mem`.
    fn restore(
        self,
        dir: &Path,
        base: u64,
        mem: &mut memmap2::MmapMut,
    ) -> Result<(Image, ReadReport), Fail> {
        let img = Image::open(dir)?;
        let report = match self {
            Restore::Eager => img.read(base, &mut mem[..])?,
            Restore::Map => {
                let opts = MapOptions {
                    zero_holes: true,
                    ..MapOptions::default()
                };
                // SAFETY:
                // - `mem` is the demo's own fresh mapping, and no reference into it is
                //   alive across the call (it is read afterwards through `mem`);
                // - the demo does not change the image files while `mem` is mapped (it
                //   removes them only when it starts again).
                unsafe { img.map_into(base, mem.as_mut_ptr(), mem.len(), &opts)? }.report
            }
            Restore::Lazy => {
                use page_pipe::lazy::{LazyOptions, LazyRestore, LazySource};
                let report = img
                    .plan(base, mem.len() as u64, &Default::default())?
                    .report;
                let t = Instant::now();
                // SAFETY:
                // - `mem` is the demo's own fresh anonymous mapping, no reference into it
                //   alive across the call; it stays mapped until `wait` below returned;
                // - only this thread touches it, reading, holding no lock; no system call
                //   reads or writes it, and the demo does not fork.
                let lazy = unsafe {
                    LazyRestore::start(
                        LazySource::image(img),
                        base,
                        mem.as_mut_ptr(),
                        mem.len(),
                        &LazyOptions::default(),
                    )?
                };
                let ready = t.elapsed();
                // The first touch of every page, while the prefetch runs.
                let ps = page_pipe::page_size();
                let sum = mem.iter().step_by(ps).fold(0u64, |a, &b| a + u64::from(b));
                std::hint::black_box(sum);
                let touched = t.elapsed();
                let info = lazy.info();
                let r = lazy.wait()?;
                println!(
                    "lazy restore: memory usable after {}; first touch of every page done after \
                     {} ({} faults, {} on pages the prefetch had just brought); all in after {}: \
                     {} pages by faults, {} by prefetch, {} zero pages{}",
                    ms(ready),
                    ms(touched),
                    r.faults,
                    r.woken,
                    ms(r.elapsed),
                    r.fault_pages,
                    r.prefetch_pages,
                    r.zero_pages,
                    if info.user_mode_only {
                        " (user-mode-only userfaultfd)"
                    } else {
                        ""
                    }
                );
                if !r.complete {
                    return fail("the lazy restore did not bring every page in");
                }
                return Ok((Image::open(dir)?, report));
            }
        };
        Ok((img, report))
    }
}

impl fmt::Display for Restore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Restore::Eager => "eager",
            Restore::Map => "by mapping",
            Restore::Lazy => "lazily, with userfaultfd",
        })
    }
}

fn flatten(args: &[String]) -> Result<(), Fail> {
    let a = Args { rest: args };
    a.check(&[], &[], 2)?;
    let (Some(src), Some(dst)) = (args.first(), args.get(1)) else {
        return fail("flatten needs a source and a target directory (see --help)");
    };
    let t = Instant::now();
    let img = Image::open(src)?;
    let s = img.flatten(dst, &FlattenOptions::default())?;
    let took = t.elapsed();
    println!(
        "{src} (chain of {} image{}) flattened into {dst}: {} entries, {} present pages ({}), {} lazy only, in {}",
        img.depth(),
        if img.depth() == 1 { "" } else { "s" },
        s.entries,
        s.present_pages,
        human(s.present_pages * img.page_size() as u64),
        s.lazy_pages,
        ms(took),
    );
    Ok(())
}

/// `diff A B`: exit status 0 when the images hold the same pages, 1 when they differ,
/// 2 on error (as diff(1)).
fn diff(args: &[String]) -> ExitCode {
    let run = || -> Result<bool, Fail> {
        let a = Args { rest: args };
        a.check(&[], &[], 2)?;
        let (Some(da), Some(db)) = (args.first(), args.get(1)) else {
            return fail("diff needs two image directories (see --help)");
        };
        let (ia, ib) = (Image::open(da)?, Image::open(db)?);
        let spans = ia.diff(&ib)?;
        let mut out = std::io::stdout().lock();
        let mut pages = 0;
        for s in &spans {
            let what = match s.kind {
                DiffKind::OnlyInA => format!("only in {da}"),
                DiffKind::OnlyInB => format!("only in {db}"),
                DiffKind::Bytes => "bytes differ".to_string(),
                DiffKind::Lazy => "lazy in one image, bytes in the other".to_string(),
            };
            writeln!(out, "{:#x} +{} pages: {what}", s.vaddr, s.pages)?;
            pages += s.pages;
        }
        if spans.is_empty() {
            writeln!(out, "{da} and {db} hold the same pages")?;
        } else {
            writeln!(
                out,
                "{da} and {db} differ in {pages} pages ({} spans)",
                spans.len()
            )?;
        }
        Ok(!spans.is_empty())
    };
    match run() {
        Ok(false) => ExitCode::SUCCESS,
        Ok(true) => ExitCode::from(1),
        Err(Fail(e)) if e.contains("Broken pipe") => ExitCode::from(1),
        Err(e) => {
            eprintln!("snapshot: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn inspect(args: &[String]) -> Result<(), Fail> {
    let a = Args { rest: args };
    a.check(&[], &[], 1)?;
    let Some(dir) = args.first() else {
        return fail("inspect needs a directory (see --help)");
    };
    let img = Image::open(dir)?;
    let entries = img.entries();
    let base = entries.first().map_or(0, |e| e.vaddr);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: {} entries, pages {}, chain of {} image{}",
        img.pagemap_path().display(),
        entries.len(),
        img.pages_path().display(),
        img.depth(),
        if img.depth() == 1 { "" } else { "s" }
    )?;
    writeln!(
        out,
        "page numbers from {base:#x}, pages of {} bytes:",
        img.page_size()
    )?;
    let mut line = String::new();
    for (i, e) in entries.iter().enumerate() {
        let item = notation(e, base, img.page_size());
        if !line.is_empty() && line.len() + item.len() > 96 {
            writeln!(out, "{line}")?;
            line.clear();
        }
        line.push_str(&item);
        if i + 1 < entries.len() {
            line.push(',');
        }
    }
    if !line.is_empty() {
        writeln!(out, "{line}")?;
    }
    let count = |f: &dyn Fn(&PagemapEntry) -> bool| -> u64 {
        entries.iter().filter(|e| f(e)).map(|e| e.pages).sum()
    };
    let present = count(&|e| e.is_present());
    writeln!(
        out,
        "totals: {} entries; {present} present pages ({}), {} in the parent, {} lazy only",
        entries.len(),
        human(present * img.page_size() as u64),
        count(&|e| e.flags.contains(PageFlags::PARENT)),
        count(&|e| e.flags == PageFlags::LAZY),
    )?;
    Ok(())
}

/// One entry in the seed's notation: page number from `base` (hex) and count, `:P` in
/// the parent, `:L` lazy (`:L-` lazy and not in the pages file).
fn notation(e: &PagemapEntry, base: u64, page_size: usize) -> String {
    let page = e.vaddr.wrapping_sub(base) / page_size as u64;
    let tag = if e.flags.contains(PageFlags::PARENT) {
        ":P"
    } else if e.flags == PageFlags::LAZY {
        ":L-"
    } else if e.flags.contains(PageFlags::LAZY) {
        ":L"
    } else {
        ""
    };
    format!("{page:02X}:{}{tag}", e.pages)
}

fn extract(args: &[String]) -> Result<(), Fail> {
    let mut a = Args { rest: args };
    a.check(&["--vaddr", "--pages", "--out"], &[], 1)?;
    let Some(dir) = args.first().filter(|d| !d.starts_with("--")) else {
        return fail("extract needs a directory (see --help)");
    };
    let vaddr = parse_hex(
        a.value("--vaddr")?
            .ok_or(Fail("--vaddr is needed (see --help)".into()))?,
    )?;
    let pages: u64 = match a.value("--pages")?.map(str::parse) {
        Some(Ok(n)) if n > 0 => n,
        _ => return fail("--pages takes a number above 0 (see --help)"),
    };
    let out = a
        .value("--out")?
        .ok_or(Fail("--out is needed (see --help)".into()))?;
    let img = Image::open(dir)?;
    let ps = img.page_size() as u64;
    if vaddr % ps != 0 {
        return fail(format!("--vaddr {vaddr:#x} is not page-aligned"));
    }
    if pages
        .checked_mul(ps)
        .and_then(|l| vaddr.checked_add(l))
        .is_none()
    {
        return fail(format!(
            "{pages} pages from {vaddr:#x} pass the end of the address space"
        ));
    }
    let mut file = std::fs::File::create(out).map_err(|e| Fail(format!("{out}: {e}")))?;
    // Read in pieces, so that a large request needs little memory.
    let piece = 256u64;
    let mut buf = vec![0u8; (piece * ps) as usize];
    let mut total = page_pipe::image::ReadReport::default();
    let mut at = 0;
    while at < pages {
        let n = piece.min(pages - at);
        let chunk = &mut buf[..(n * ps) as usize];
        let r = img.read(vaddr + at * ps, chunk)?;
        file.write_all(chunk)
            .map_err(|e| Fail(format!("{out}: {e}")))?;
        total.present += r.present;
        total.from_parents += r.from_parents;
        total.zero += r.zero;
        total.lazy += r.lazy;
        at += n;
    }
    println!(
        "{out}: {pages} pages from {vaddr:#x}: {} from this image, {} from parents, {} zero (in no entry), {} lazy (not in the image, written as zeros)",
        total.present, total.from_parents, total.zero, total.lazy
    );
    Ok(())
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn rate(bytes: u64, d: Duration) -> String {
    let s = d.as_secs_f64();
    if s <= 0.0 {
        return "-".into();
    }
    format!("{:.2} GiB/s", bytes as f64 / s / (1u64 << 30) as f64)
}
