//! `page-pipe`: look into, check and take apart memory images that page-pipe (or CRIU)
//! wrote.
//!
//! ```text
//! page-pipe inspect DIR [--json] [--base ADDR]
//! page-pipe extract DIR --vaddr ADDR --pages N --out FILE [--strict]
//! page-pipe verify DIR
//! page-pipe flatten SRC DST [--no-sync]
//! page-pipe diff A B
//! page-pipe page-server --dir DIR [--addr ADDR] [--port PORT | --unix PATH] [--once] [--chain]
//! page-pipe receive --out FILE --base ADDR --size SIZE [--addr ADDR] (--port PORT | --unix PATH)
//! ```
//!
//! Exit status: 0 when the command did what it was asked; 1 when `verify` found a broken
//! image, when `diff` found the images differ, or when `page-server --once` or `receive`
//! served a session that failed; 2 for a usage error or an error that stopped the command. Errors are one line
//! on stderr. Progress bars are drawn on stderr when it is a terminal, never otherwise.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use page_pipe::image::{Image, ImageError, ReadReport, RestoreOptions, SegmentKind};
use page_pipe::{PageFlags, PagemapEntry};

const AFTER_HELP: &str = "Exit status: 0 success; 1 verify found a broken image, diff found differences, or a \
     page-server --once or receive session failed; 2 usage error or failure.";

#[derive(Debug, Parser)]
#[command(
    name = "page-pipe",
    version,
    about = "Inspect, extract and verify CRIU-compatible memory images (pagemap-*.img and pages-*.img)",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show an image's entries in CRIU's debug notation, with totals; or as JSON.
    ///
    /// Each entry is PAGE:COUNT, the page number counted from the base in hex, with :P for
    /// pages in the parent image, :L for lazy pages, :L- for lazy pages not in this image.
    Inspect {
        /// The image directory (holding one `pagemap-<id>.img`).
        dir: PathBuf,
        /// Print one JSON object: {"magic": "PAGEMAP", "entries": [...]} with the fields
        /// `crit decode` uses (the head first, then vaddr, nr_pages, flags per entry),
        /// and a summary.
        #[arg(long)]
        json: bool,
        /// The address page numbers count from (hex; default: the first entry's).
        #[arg(long, value_parser = parse_hex)]
        base: Option<u64>,
    },
    /// Write pages of an image (through its parent chain) to a file.
    Extract {
        /// The image directory.
        dir: PathBuf,
        /// The first page's address (hex, page-aligned).
        #[arg(long, value_parser = parse_hex)]
        vaddr: u64,
        /// How many pages.
        #[arg(long)]
        pages: u64,
        /// The file to write (created or truncated).
        #[arg(long)]
        out: PathBuf,
        /// Refuse pages the image does not hold instead of writing zeros for them.
        #[arg(long)]
        strict: bool,
    },
    /// Check an image chain end to end: every file, every entry, every page read back,
    /// every page in a parent found there.
    Verify {
        /// The image directory.
        dir: PathBuf,
    },
    /// Write an image chain as one full image (streamed; committed atomically).
    Flatten {
        /// The image directory (the top of the chain).
        src: PathBuf,
        /// The directory for the flattened image.
        dst: PathBuf,
        /// Do not sync the new image before committing it.
        #[arg(long)]
        no_sync: bool,
    },
    /// Print the pages two images hold differently; exit 0 when they hold the same
    /// pages, 1 when they differ, 2 on error (as diff(1)).
    Diff {
        /// The first image directory.
        a: PathBuf,
        /// The second image directory.
        b: PathBuf,
    },
    /// Run a page server, as `criu page-server` is run: it writes the images that
    /// `criu dump --page-server` or page-pipe clients send, and serves pages back (GET).
    /// CRIU's protocol has no authentication: keep it on loopback or a private network.
    PageServer {
        /// The directory to write images into.
        #[arg(long)]
        dir: PathBuf,
        /// The address to listen on (TCP).
        #[arg(long, default_value = "127.0.0.1")]
        addr: String,
        /// The TCP port (0: any free port).
        #[arg(long, conflicts_with = "unix")]
        port: Option<u16>,
        /// A Unix socket path to listen on instead of TCP.
        #[arg(long)]
        unix: Option<PathBuf>,
        /// Serve one session, then exit: status 0 only if it ended cleanly.
        #[arg(long)]
        once: bool,
        /// Session n writes into DIR/<n> with `parent` -> <n-1> (iterative dumps).
        #[arg(long)]
        chain: bool,
    },
    /// Receive one migration (a page-server stream of rounds, from page-pipe's
    /// `migrate::Sender` or a page-server client) into a raw memory file: the byte at
    /// offset N is the sender's memory at BASE + N, pages never sent are zeros (holes in
    /// the file). The file appears, whole, only when the sender closed the stream;
    /// exit 1 if the session failed.
    Receive {
        /// The memory file to write (refused if it exists).
        #[arg(long)]
        out: PathBuf,
        /// The sender's address of the file's first byte (hex, page-aligned).
        #[arg(long, value_parser = parse_hex)]
        base: u64,
        /// The memory's size (bytes, or with a K, M or G suffix; whole pages).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// The address to listen on (TCP).
        #[arg(long, default_value = "127.0.0.1")]
        addr: String,
        /// The TCP port (0: any free port; the one taken is printed).
        #[arg(long, conflicts_with = "unix")]
        port: Option<u16>,
        /// A Unix socket path to listen on instead of TCP.
        #[arg(long)]
        unix: Option<PathBuf>,
    },
}

/// What stopped a command: the message, the exit status, and whether it was only the
/// reader of stdout going away (`| head`), which is not an error.
struct Fail {
    msg: String,
    code: u8,
    reader_gone: bool,
}

impl Fail {
    fn error(e: &(dyn std::error::Error + 'static)) -> Self {
        // The commands write to stdout through `?` on a bare `io::Error`; every other
        // error reaches here as a type of its own (a session that met EPIPE included).
        let reader_gone = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
        Self {
            msg: chain(e),
            code: 2,
            reader_gone,
        }
    }
}

impl<E: std::error::Error + 'static> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail::error(&e)
    }
}

/// An error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?}: not a size (bytes, or a number with K, M or G)"))
}

fn parse_hex(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|e| format!("{s:?}: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Inspect { dir, json, base } => inspect(&dir, json, base),
        Cmd::Extract {
            dir,
            vaddr,
            pages,
            out,
            strict,
        } => extract(&dir, vaddr, pages, &out, strict),
        Cmd::Verify { dir } => verify(&dir),
        Cmd::Flatten { src, dst, no_sync } => flatten(&src, &dst, !no_sync),
        Cmd::Diff { a, b } => diff(&a, &b),
        Cmd::PageServer {
            dir,
            addr,
            port,
            unix,
            once,
            chain,
        } => page_server(dir, &addr, port, unix, once, chain),
        Cmd::Receive {
            out,
            base,
            size,
            addr,
            port,
            unix,
        } => receive(&out, base, size, &addr, port, unix),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`| head`) is not an error.
        Err(f) if f.reader_gone => ExitCode::SUCCESS,
        // A verdict already printed (diff found differences).
        Err(f) if f.msg.is_empty() => ExitCode::from(f.code),
        Err(f) => {
            eprintln!("page-pipe: {}", f.msg);
            ExitCode::from(f.code)
        }
    }
}

/// A progress bar on stderr when it is a terminal; hidden otherwise.
fn bar(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} pages ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
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

/// CRIU's names of entry flags, as `crit decode` prints them.
fn flag_names(flags: PageFlags) -> String {
    let names: Vec<&str> = [
        (PageFlags::PARENT, "PE_PARENT"),
        (PageFlags::LAZY, "PE_LAZY"),
        (PageFlags::PRESENT, "PE_PRESENT"),
    ]
    .iter()
    .filter(|(f, _)| flags.contains(*f))
    .map(|(_, n)| *n)
    .collect();
    names.join(" | ")
}

struct Totals {
    present: u64,
    parent: u64,
    lazy: u64,
}

fn totals(entries: &[PagemapEntry]) -> Totals {
    let sum = |f: &dyn Fn(&PagemapEntry) -> bool| -> u64 {
        entries.iter().filter(|e| f(e)).map(|e| e.pages).sum()
    };
    Totals {
        present: sum(&|e| e.is_present()),
        parent: sum(&|e| e.flags.contains(PageFlags::PARENT)),
        lazy: sum(&|e| e.flags == PageFlags::LAZY),
    }
}

fn inspect(dir: &Path, json: bool, base: Option<u64>) -> Result<(), Fail> {
    let img = Image::open(dir)?;
    let entries = img.entries();
    let ps = img.page_size();
    let t = totals(entries);
    let mut out = std::io::stdout().lock();
    if json {
        let mut list = vec![serde_json::json!({ "pages_id": img.pagemap().pages_id })];
        list.extend(entries.iter().map(|e| {
            serde_json::json!({
                "vaddr": format!("{:#x}", e.vaddr),
                "nr_pages": e.pages,
                "flags": flag_names(e.flags),
            })
        }));
        let doc = serde_json::json!({
            "magic": "PAGEMAP",
            "entries": list,
            "summary": {
                "pagemap": img.pagemap_path().display().to_string(),
                "pages": img.pages_path().display().to_string(),
                "page_size": ps,
                "chain": img.depth(),
                "entries": entries.len(),
                "present_pages": t.present,
                "parent_pages": t.parent,
                "lazy_pages": t.lazy,
            },
        });
        serde_json::to_writer_pretty(&mut out, &doc).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    let base = base.unwrap_or_else(|| entries.first().map_or(0, |e| e.vaddr));
    writeln!(
        out,
        "{}: {} entries, pages {}, chain of {} image{}",
        img.pagemap_path().display(),
        entries.len(),
        img.pages_path().display(),
        img.depth(),
        if img.depth() == 1 { "" } else { "s" }
    )?;
    writeln!(out, "page numbers from {base:#x}, pages of {ps} bytes:")?;
    let text = page_pipe::notation(entries, base, ps).to_string();
    // Lines of at most about 96 characters, broken after a comma.
    let mut line = String::new();
    for item in text.split(',') {
        if !line.is_empty() && line.len() + item.len() + 1 > 96 {
            writeln!(out, "{line},")?;
            line.clear();
        } else if !line.is_empty() {
            line.push(',');
        }
        line.push_str(item);
    }
    if !line.is_empty() {
        writeln!(out, "{line}")?;
    }
    writeln!(
        out,
        "totals: {} entries; {} present pages ({}), {} in the parent, {} lazy only",
        entries.len(),
        t.present,
        human(t.present * ps as u64),
        t.parent,
        t.lazy,
    )?;
    Ok(())
}

fn extract(dir: &Path, vaddr: u64, pages: u64, out: &Path, strict: bool) -> Result<(), Fail> {
    let img = Image::open(dir)?;
    let ps = img.page_size() as u64;
    let range = page_pipe::PageRange::new(vaddr, pages, ps as usize)?;
    if range.is_empty() {
        return Err(Fail {
            msg: "--pages must be above 0".into(),
            code: 2,
            reader_gone: false,
        });
    }
    // Creating the output truncates it: never one of the files it reads from.
    if let Some(file) = image_file(&img, out) {
        return Err(Fail {
            msg: format!(
                "{}: is {} of the image; extract would truncate what it reads",
                out.display(),
                file.display()
            ),
            code: 2,
            reader_gone: false,
        });
    }
    let mut file = std::fs::File::create(out).map_err(|e| Fail {
        msg: format!("{}: {e}", out.display()),
        code: 2,
        reader_gone: false,
    })?;
    // Read in pieces, so that a large request needs little memory.
    let piece = 1024u64;
    let mut buf = vec![0u8; (piece.min(pages) * ps) as usize];
    let mut total = ReadReport::default();
    let opts = RestoreOptions {
        strict,
        ..RestoreOptions::default()
    };
    let progress = bar(pages, "extract");
    let mut at = 0;
    while at < pages {
        let n = piece.min(pages - at);
        let chunk = &mut buf[..(n * ps) as usize];
        let r = img.restore(vaddr + at * ps, chunk, &opts)?;
        file.write_all(chunk).map_err(|e| Fail {
            msg: format!("{}: {e}", out.display()),
            code: 2,
            // `--out /dev/stdout | head`, as for stdout itself.
            reader_gone: e.kind() == std::io::ErrorKind::BrokenPipe,
        })?;
        total.present += r.present;
        total.from_parents += r.from_parents;
        total.zero += r.zero;
        total.lazy += r.lazy;
        at += n;
        progress.set_position(at);
    }
    progress.finish_and_clear();
    writeln!(
        std::io::stdout(),
        "{}: {pages} pages from {vaddr:#x}: {} from this image, {} from parents, {} zero (in no entry), {} lazy (not in the image, written as zeros)",
        out.display(),
        total.present,
        total.from_parents,
        total.zero,
        total.lazy
    )?;
    Ok(())
}

/// The file of `img`'s chain (pagemap or pages) that `path` is, through links too.
fn image_file(img: &Image, path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let out = std::fs::metadata(path).ok()?;
    (0..img.depth())
        .filter_map(|d| img.ancestor(d))
        .flat_map(|i| [i.pagemap_path(), i.pages_path()])
        .find(|f| std::fs::metadata(f).is_ok_and(|m| m.dev() == out.dev() && m.ino() == out.ino()))
        .map(Path::to_path_buf)
}

/// A problem `verify` found: exit status 1.
fn broken(e: &ImageError) -> Fail {
    Fail {
        msg: format!("verify: {}", chain(e)),
        code: 1,
        reader_gone: false,
    }
}

fn verify(dir: &Path) -> Result<(), Fail> {
    // Opening checks the chain's structure: formats, entry order, pages file sizes,
    // parent links and loops.
    let top = Image::open(dir).map_err(|e| match &e {
        ImageError::Io { error, .. }
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            Fail::error(&e)
        }
        _ => broken(&e),
    })?;
    let levels: Vec<&Image> = (0..top.depth()).filter_map(|d| top.ancestor(d)).collect();
    let ps = top.page_size() as u64;
    let all_present: u64 = levels.iter().map(|i| totals(i.entries()).present).sum();
    let progress = bar(all_present, "verify");
    let mut buf = vec![0u8; (1024 * ps) as usize];
    let mut checked = 0u64;
    for img in &levels {
        let t = totals(img.entries());
        for e in img.entries() {
            if e.is_present() {
                // Read every page of the entry back from this image's own pages file.
                let mut at = 0;
                while at < e.pages {
                    let n = (buf.len() as u64 / ps).min(e.pages - at);
                    let chunk = &mut buf[..(n * ps) as usize];
                    let r = img
                        .restore(e.vaddr + at * ps, chunk, &RestoreOptions::default())
                        .map_err(|e| broken(&e))?;
                    if r.present != n {
                        return Err(Fail {
                            msg: format!(
                                "verify: {}: entry {e}: {} of {n} pages came from this image",
                                img.pagemap_path().display(),
                                r.present
                            ),
                            code: 1,
                            reader_gone: false,
                        });
                    }
                    at += n;
                    checked += n;
                    progress.set_position(checked);
                }
            } else if e.flags.contains(PageFlags::PARENT) {
                // Every page in the parent must be found there (or further up).
                let plan = img
                    .plan(e.vaddr, e.pages * ps, &RestoreOptions::default())
                    .map_err(|e| broken(&e))?;
                if let Some(s) = plan
                    .segments
                    .iter()
                    .find(|s| !matches!(s.kind, SegmentKind::Pages { depth, .. } if depth > 0))
                {
                    return Err(Fail {
                        msg: format!(
                            "verify: {}: entry {e}: page {:#x} is not in a parent",
                            img.pagemap_path().display(),
                            s.vaddr
                        ),
                        code: 1,
                        reader_gone: false,
                    });
                }
            }
        }
        progress.suspend(|| {
            writeln!(
                std::io::stdout(),
                "{}: {} entries; {} present pages read back, {} in the parent found there, {} lazy only",
                img.pagemap_path().display(),
                img.entries().len(),
                t.present,
                t.parent,
                t.lazy
            )
        })?;
    }
    progress.finish_and_clear();
    writeln!(
        std::io::stdout(),
        "verify: ok: a chain of {} image{}, {checked} pages ({}) read back",
        levels.len(),
        if levels.len() == 1 { "" } else { "s" },
        human(checked * ps)
    )?;
    Ok(())
}

/// A progress callback that draws on `bar`.
fn progress_to(bar: &ProgressBar) -> page_pipe::ProgressFn {
    let bar = bar.clone();
    std::sync::Arc::new(move |p: page_pipe::PagesDone| {
        bar.set_length(p.total);
        bar.set_position(p.done);
    })
}

fn flatten(src: &Path, dst: &Path, sync: bool) -> Result<(), Fail> {
    let img = Image::open(src)?;
    let progress = bar(0, "flatten");
    let opts = page_pipe::image::FlattenOptions {
        sync,
        progress: Some(progress_to(&progress)),
    };
    let t = std::time::Instant::now();
    let s = img.flatten(dst, &opts)?;
    progress.finish_and_clear();
    writeln!(
        std::io::stdout(),
        "{} (chain of {}) flattened into {}: {} entries, {} present pages ({}), {} lazy only, in {:.1} ms",
        src.display(),
        img.depth(),
        dst.display(),
        s.entries,
        s.present_pages,
        human(s.present_pages * img.page_size() as u64),
        s.lazy_pages,
        t.elapsed().as_secs_f64() * 1e3
    )?;
    Ok(())
}

fn diff(a: &Path, b: &Path) -> Result<(), Fail> {
    let (ia, ib) = (Image::open(a)?, Image::open(b)?);
    let spans = ia.diff(&ib)?;
    let mut out = std::io::stdout().lock();
    let mut pages = 0;
    for s in &spans {
        let what = match s.kind {
            page_pipe::image::DiffKind::OnlyInA => format!("only in {}", a.display()),
            page_pipe::image::DiffKind::OnlyInB => format!("only in {}", b.display()),
            page_pipe::image::DiffKind::Bytes => "bytes differ".to_string(),
            page_pipe::image::DiffKind::Lazy => "lazy in one image, bytes in the other".into(),
        };
        writeln!(out, "{:#x} +{} pages: {what}", s.vaddr, s.pages)?;
        pages += s.pages;
    }
    if spans.is_empty() {
        writeln!(
            out,
            "{} and {} hold the same pages",
            a.display(),
            b.display()
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{} and {} differ in {pages} pages ({} spans)",
        a.display(),
        b.display(),
        spans.len()
    )?;
    Err(Fail {
        msg: String::new(),
        code: 1,
        reader_gone: false,
    })
}

fn page_server(
    dir: PathBuf,
    addr: &str,
    port: Option<u16>,
    unix: Option<PathBuf>,
    once: bool,
    layered: bool,
) -> Result<(), Fail> {
    use page_pipe::page_server::{Layout, PageServer, ServerConfig};
    let config = ServerConfig {
        layout: if layered { Layout::Chain } else { Layout::Flat },
        ..ServerConfig::new(&dir)
    };
    let server = match (&unix, port) {
        (Some(path), _) => PageServer::bind_unix(path, config)?,
        (None, Some(port)) => PageServer::bind((addr, port), config)?,
        (None, None) => {
            return Err(Fail {
                msg: "page-server needs --port or --unix".into(),
                code: 2,
                reader_gone: false,
            });
        }
    };
    let at = match (server.local_addr(), server.unix_path()) {
        (Some(a), _) => a.to_string(),
        (None, Some(p)) => format!("unix:{}", p.display()),
        (None, None) => "?".into(),
    };
    // A closed stdout does not stop the server (println! would panic).
    let _ = writeln!(
        std::io::stdout(),
        "page-server: listening on {at}, images in {}",
        dir.display()
    );
    let show = |r: &page_pipe::page_server::SessionReport| {
        let images: Vec<String> = r
            .images
            .iter()
            .map(|i| format!("{} in {}", i.image, i.dir.display()))
            .collect();
        let _ = writeln!(
            std::io::stdout(),
            "page-server: session with {} committed {}",
            r.peer,
            images.join(", ")
        );
    };
    if once {
        let incoming = server.accept()?;
        return match server.serve(incoming) {
            Ok(r) => {
                show(&r);
                Ok(())
            }
            Err(e) => Err(Fail {
                msg: chain(&e),
                code: 1,
                reader_gone: false,
            }),
        };
    }
    let running = server.spawn()?;
    loop {
        if let Some(out) = running.next_outcome(std::time::Duration::from_secs(3600)) {
            match out.result {
                Ok(r) => show(&r),
                Err(e) => eprintln!("page-server: {}", chain(&e)),
            }
        }
    }
}

/// `receive`: one migration into a raw memory file, committed under its name only once
/// the sender closed the stream.
fn receive(
    out: &Path,
    base: u64,
    size: u64,
    addr: &str,
    port: Option<u16>,
    unix: Option<PathBuf>,
) -> Result<(), Fail> {
    use page_pipe::migrate::{MemoryRegion, ReceiveOptions, receive};
    use page_pipe::page_server::Incoming;
    let usage = |msg: String| Fail {
        msg,
        code: 2,
        reader_gone: false,
    };
    let ps = page_pipe::page_size() as u64;
    if !size.is_multiple_of(ps) || size == 0 {
        return Err(usage(format!(
            "--size {size}: not a whole number of {ps}-byte pages"
        )));
    }
    let len = usize::try_from(size).map_err(|_| usage(format!("--size {size}: too large")))?;
    if out.symlink_metadata().is_ok() {
        return Err(usage(format!("{}: exists; not overwritten", out.display())));
    }
    let map = memmap2::MmapOptions::new()
        .len(len)
        .map_anon()
        .map_err(|e| usage(format!("cannot map {size} bytes of memory: {e}")))?;
    let mut region = MemoryRegion::from_mmap(base, map)?;
    // Listen, and take one connection.
    let incoming = match (&unix, port) {
        (Some(path), _) => {
            let l = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| usage(format!("{}: cannot listen: {e}", path.display())))?;
            let _ = writeln!(
                std::io::stdout(),
                "receive: listening on unix:{}",
                path.display()
            );
            let accepted = l.accept();
            let _ = std::fs::remove_file(path);
            let (s, _) = accepted.map_err(|e| usage(format!("{}: accept: {e}", path.display())))?;
            Incoming::from_unix(s)
        }
        (None, Some(port)) => {
            let l = std::net::TcpListener::bind((addr, port))
                .map_err(|e| usage(format!("{addr}:{port}: cannot listen: {e}")))?;
            let at = l.local_addr()?;
            let _ = writeln!(std::io::stdout(), "receive: listening on {at}");
            let (s, _) = l
                .accept()
                .map_err(|e| usage(format!("{at}: accept: {e}")))?;
            Incoming::from_tcp(s)
        }
        (None, None) => return Err(usage("receive needs --port or --unix".into())),
    };
    let _ = std::io::stdout().flush();
    let report = receive(incoming, &mut region, &ReceiveOptions::default()).map_err(|e| Fail {
        msg: chain(&e),
        code: 1,
        reader_gone: false,
    })?;
    for r in &report.rounds {
        let _ = writeln!(
            std::io::stdout(),
            "receive: round {}: {} pages ({}), {} named as already here",
            r.image,
            r.pages,
            human(r.pages * ps),
            r.parent_pages
        );
    }
    let map = region.into_mmap().expect("the region owns its mapping");
    write_memory_file(out, &map).map_err(|e| Fail {
        msg: format!("{}: {}", out.display(), chain(&e)),
        code: 2,
        reader_gone: false,
    })?;
    // A closed stdout does not undo a migration received whole.
    let _ = writeln!(
        std::io::stdout(),
        "receive: {} pages from {} in {} rounds into {} ({} bytes from {base:#x})",
        report.pages(),
        report.peer,
        report.rounds.len(),
        out.display(),
        size
    );
    Ok(())
}

/// Writes `mem` as the file `out`, leaving pages of zeros as holes: under a temporary
/// name in the same directory, synced, then renamed, so `out` is whole or absent.
fn write_memory_file(out: &Path, mem: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let ps = page_pipe::page_size();
    let name = out
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let tmp = out.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_len(mem.len() as u64)?;
        let mut at = 0;
        while at < mem.len() {
            // The next run of pages that are not all zeros.
            let zero = |p: usize| mem[p..p + ps].iter().all(|&b| b == 0);
            if zero(at) {
                at += ps;
                continue;
            }
            let mut end = at + ps;
            while end < mem.len() && end - at < (1 << 20) && !zero(end) {
                end += ps;
            }
            f.write_all_at(&mem[at..end], at as u64)?;
            at = end;
        }
        f.sync_all()?;
        // `out` appeared meanwhile: do not replace it.
        std::fs::hard_link(&tmp, out)?;
        std::fs::remove_file(&tmp)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
