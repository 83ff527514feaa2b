//! A lazy restore from a page server: snapshots a region into an image directory, starts
//! this crate's page server on it (a thread, on a Unix socket or loopback TCP), and
//! restores the region lazily into fresh memory over the socket (`GET`, as CRIU's
//! lazy-pages daemon asks), while threads touch random pages of it; then checks every
//! byte and prints a line starting `verify:`. Exits 0 when the restored memory matches
//! (or, printing `SKIPPED`, when this process may have no userfaultfd).
//!
//! ```text
//! cargo run --release -p page-pipe --example lazy_remote [-- --size 256M --tcp --threads 2 --no-prefetch]
//! ```
//!
//! The pagemap says which pages the server holds (on another host it would be copied
//! over, as CRIU copies its images; here the demo reads it from the directory the server
//! serves); every page comes over the socket.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::MmapOptions;
use page_pipe::image::{Image, ImageWriter};
use page_pipe::lazy::{LazyError, LazyOptions, LazyRestore, LazySource, runs_held};
use page_pipe::page_server::{PageServer, PageServerClient, ServerConfig};
use page_pipe::snapshot::{SnapshotOptions, Span, snapshot};
use page_pipe::{BufFlags, Source};

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            let mut msg = e.to_string();
            let mut cause = e.source();
            while let Some(c) = cause {
                msg = format!("{msg}: {c}");
                cause = c.source();
            }
            eprintln!("lazy_remote: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn size(v: &str) -> Result<u64, String> {
    let (n, m) = match v.chars().last() {
        Some('K' | 'k') => (&v[..v.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&v[..v.len() - 1], 1 << 20),
        Some('G' | 'g') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    n.parse::<u64>()
        .map(|n| n * m)
        .map_err(|_| format!("bad size {v:?}"))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// The byte at `i` of page `p` of the region.
fn pattern(p: usize, i: usize) -> u8 {
    (i as u64 * 7 + p as u64 * 13 + 5) as u8
}

fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let ps = page_pipe::page_size();
    let bytes = size(&arg("--size").unwrap_or_else(|| "256M".into()))?;
    let pages = (bytes as usize).div_ceil(ps).max(1);
    let tcp = std::env::args().any(|a| a == "--tcp");
    let prefetch = !std::env::args().any(|a| a == "--no-prefetch");
    let threads: usize = arg("--threads").map_or(Ok(2), |t| t.parse())?;

    // The region and its snapshot, on the "server host".
    let mut region = MmapOptions::new().len(pages * ps).map_anon()?;
    for (p, page) in region.chunks_exact_mut(ps).enumerate() {
        for (i, b) in page.iter_mut().enumerate() {
            *b = pattern(p, i);
        }
    }
    let base = 0x7f00_0000_0000u64;
    let tmp = std::env::temp_dir().join(format!("page-pipe-lazy-remote-{}", std::process::id()));
    let dir = tmp.join("images");
    let source = Source::new().with_slice(base, &region[..])?;
    let mut w = ImageWriter::create(&dir, 1)?.with_sync(false);
    let plan = [Span::Pages {
        addr: base,
        pages: pages as u64,
        flags: BufFlags::empty(),
    }];
    snapshot(&source, plan, &mut w, &SnapshotOptions::default())?;
    w.finish()?;
    let layout = Image::open(&dir)?;
    let held = runs_held(&layout)?;

    // The page server, in a thread of this process.
    let config = ServerConfig::new(&dir);
    let sock = tmp.join("ps.sock");
    let (server, client) = if tcp {
        let s = PageServer::bind("127.0.0.1:0", config)?.spawn()?;
        let addr = s.local_addr().ok_or("no address")?;
        (s, PageServerClient::connect_tcp(addr)?)
    } else {
        let s = PageServer::bind_unix(&sock, config)?.spawn()?;
        (s, PageServerClient::connect_unix_only(&sock)?)
    };
    println!(
        "page server on {}: {} pages of image {} in {} runs",
        client.peer(),
        pages,
        layout.id(),
        held.len()
    );

    // The restore, on the "restoring host".
    let mut mem = MmapOptions::new().len(pages * ps).map_anon()?;
    let opts = LazyOptions {
        prefetch,
        ..LazyOptions::default()
    };
    let t = Instant::now();
    // SAFETY:
    // - `mem` is this example's own fresh anonymous mapping, no reference into it alive
    //   across the call; it stays mapped until the restore has ended (`wait` below);
    // - the threads that touch it only read it and hold no lock; no system call reads or
    //   writes it, and the example does not fork.
    let restore = unsafe {
        LazyRestore::start(
            LazySource::page_server(client, layout.id(), held),
            base,
            mem.as_mut_ptr(),
            mem.len(),
            &opts,
        )
    };
    let restore = match restore {
        Ok(r) => r,
        Err(e @ (LazyError::Open { .. } | LazyError::Privilege { .. })) => {
            println!("SKIPPED: no userfaultfd here: {e}");
            server.stop();
            let _ = std::fs::remove_dir_all(&tmp);
            return Ok(true);
        }
        Err(e) => return Err(e.into()),
    };
    let ready = t.elapsed();

    // Threads touch random pages, timing each first touch, as a program that runs at
    // once would; then one pass over everything (with prefetch off, that brings in the
    // rest).
    let host = mem.as_ptr() as usize;
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let touchers: Vec<_> = (0..threads)
        .map(|k| {
            let times = Arc::clone(&times);
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ k as u64;
                let mut mine = Vec::new();
                for _ in 0..2000.min(pages) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let p = (x % pages as u64) as usize;
                    let t = Instant::now();
                    // SAFETY: the page is in `mem`, mapped until the touchers are joined;
                    // a read of a page not yet in waits for it.
                    let b = unsafe { std::ptr::read_volatile((host + p * ps + 1) as *const u8) };
                    mine.push(t.elapsed());
                    assert_eq!(b, pattern(p, 1), "page {p}");
                }
                times.lock().unwrap_or_else(|e| e.into_inner()).extend(mine);
            })
        })
        .collect();
    for t in touchers {
        t.join().map_err(|_| "a touching thread panicked")?;
    }
    let sum = mem.iter().step_by(ps).fold(0u64, |a, &b| a + u64::from(b));
    std::hint::black_box(sum);
    let report = restore.wait()?;
    let total = t.elapsed();

    let mut times = std::mem::take(&mut *times.lock().unwrap_or_else(|e| e.into_inner()));
    times.sort();
    let waited: Vec<_> = times
        .iter()
        .filter(|d| **d > Duration::from_micros(1))
        .collect();
    let q = |v: &[&Duration], f: f64| {
        v.get(((v.len().max(1) - 1) as f64 * f) as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    println!(
        "lazy restore: usable after {}; {} random first touches on {threads} threads, {} waited \
         for their page (median {:.1} us, p90 {:.1} us)",
        ms(ready),
        times.len(),
        waited.len(),
        q(&waited, 0.5),
        q(&waited, 0.9),
    );
    println!(
        "all in after {} ({:.2} GiB/s): {} faults, {} pages by faults, {} by prefetch, {} zero \
         pages; {} restore to verified",
        ms(report.elapsed),
        (pages * ps) as f64 / report.elapsed.as_secs_f64() / (1u64 << 30) as f64,
        report.faults,
        report.fault_pages,
        report.prefetch_pages,
        report.zero_pages,
        ms(total),
    );
    let same = mem[..] == region[..];
    let stats = server.stop();
    let _ = std::fs::remove_dir_all(&tmp);
    println!("page server: {stats:?}");
    if !same {
        eprintln!("lazy_remote: the restored memory differs from the region");
        return Ok(false);
    }
    println!(
        "verify: {} MiB restored lazily from the page server over {} matches the region byte \
         for byte",
        (pages * ps) >> 20,
        if tcp { "TCP" } else { "a Unix socket" }
    );
    Ok(true)
}
