//! A lazy-pages server: captures a region with every page lazy, writes the image (lazy
//! entries, no pages), then serves pages over a Unix socket to a client thread that asks
//! for random pages and checks every byte. Prints the pages served and the latency per
//! request; exits 0 when every check passed.
//!
//! ```text
//! cargo run --release -p page-pipe --example lazy_server [-- --size 64M --requests 5000]
//! ```
//!
//! Protocol: the client sends a request of 16 bytes (address, pages; little-endian u64),
//! the server answers with 8 bytes (pages served) and then the pages themselves, spliced
//! from the destination pipe into the socket. A request for 0 pages ends the session.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use memmap2::MmapOptions;
use page_pipe::image::ImageWriter;
use page_pipe::{BufFlags, PagePipe, ServeDest, Source};

/// The byte at `i` of page `p`: what the client expects.
fn pattern(p: u64, i: usize) -> u8 {
    (i as u64 * 7 + p * 13 + 5) as u8
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("lazy_server: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn arg(name: &str, default: u64) -> Result<u64, String> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => {
            let v = args.get(i + 1).ok_or(format!("{name} needs a value"))?;
            let (num, mult) = match v.strip_suffix(['M', 'm']) {
                Some(n) => (n, 1 << 20),
                None => (v.as_str(), 1),
            };
            num.parse::<u64>()
                .map(|n| n * mult)
                .map_err(|_| format!("bad value {v:?} for {name}"))
        }
    }
}

fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let ps = page_pipe_sys::page_size().get();
    let size = arg("--size", 64 << 20)?;
    let requests = arg("--requests", 5000)?;
    let pages = (size as usize).div_ceil(ps) as u64;
    let mut mem = MmapOptions::new().len(pages as usize * ps).map_anon()?;
    for (p, page) in mem.chunks_exact_mut(ps).enumerate() {
        for (i, b) in page.iter_mut().enumerate() {
            *b = pattern(p as u64, i);
        }
    }
    let base = mem.as_ptr() as u64;

    // Capture every page as lazy: with lazy pages on, the dump writes lazy entries and
    // leaves the pages in their pipes for the server.
    let source = Source::new().with_slice(base, &mem[..])?;
    // One run per buf: a pipe holds at most 256 pages here.
    let mut pp = PagePipe::builder()
        .iov_budget(pages as usize)
        .lazy_pages(true)
        .build()?;
    pp.add_pages(base, pages, BufFlags::LAZY)?;
    let t = Instant::now();
    let mut captured = pp.capture(&source)?;
    let capture = t.elapsed();
    let dir = std::env::temp_dir().join(format!("page-pipe-lazy-{}", std::process::id()));
    let mut image = ImageWriter::create(&dir, 1)?;
    let dumped = captured.dump(&mut image)?;
    image.finish()?;
    let _ = std::fs::remove_dir_all(&dir);
    let mut dest = ServeDest::for_captured(&captured)?;
    println!(
        "captured {pages} pages in {} pipes in {:.1} ms ({}); image holds {} lazy pages, no page data",
        captured.page_pipe().open_pipes(),
        capture.as_secs_f64() * 1e3,
        captured.report().path,
        dumped.lazy_kept,
    );

    let (mut server, client) = UnixStream::pair()?;
    let client = std::thread::spawn(move || client_loop(client, base, pages, requests, ps));

    let mut served_pages = 0u64;
    let mut released = 0u64;
    let mut latencies = Vec::with_capacity(requests as usize);
    let mut req = [0u8; 16];
    loop {
        server.read_exact(&mut req)?;
        let t = Instant::now();
        let addr = u64::from_le_bytes(req[..8].try_into()?);
        let n = u64::from_le_bytes(req[8..].try_into()?);
        if n == 0 {
            break;
        }
        let mut served = captured.serve(&mut dest, addr, n, BufFlags::LAZY)?;
        server.write_all(&served.pages().to_le_bytes())?;
        served.splice_into(&server)?;
        served_pages += served.pages();
        if served.buf_done()
            && let Some(id) = served.buf()
        {
            drop(served);
            captured.release_buf(id)?;
            released += 1;
        }
        latencies.push(t.elapsed());
    }
    let (checked, bad, round_trips) = client.join().map_err(|_| "the client panicked")??;

    latencies.sort();
    let pct = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    let mean = latencies.iter().sum::<Duration>() / latencies.len().max(1) as u32;
    println!(
        "served {served_pages} pages in {} requests; {released} bufs served in full and released; {} pipes open",
        latencies.len(),
        captured.page_pipe().open_pipes()
    );
    println!(
        "server latency per request: mean {:.1} us, p50 {:.1} us, p99 {:.1} us; client round trip mean {:.1} us",
        us(mean),
        us(pct(0.5)),
        us(pct(0.99)),
        us(round_trips)
    );
    println!("client checked {checked} pages: {bad} wrong");
    Ok(bad == 0 && checked == served_pages)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Asks for random runs of pages it does not have yet (as a faulting process would) and
/// checks each byte; returns (pages checked, pages wrong, mean round trip).
fn client_loop(
    mut sock: UnixStream,
    base: u64,
    pages: u64,
    requests: u64,
    ps: usize,
) -> std::io::Result<(u64, u64, Duration)> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 64 * ps];
    let (mut checked, mut bad) = (0, 0);
    let mut total = Duration::ZERO;
    let mut have = vec![false; pages as usize];
    let mut asked = 0;
    for _ in 0..requests {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let Some(page) = (0..pages)
            .map(|k| (x + k) % pages)
            .find(|&p| !have[p as usize])
        else {
            break;
        };
        let want = 1 + (x >> 32) % 16;
        let n = (page..pages.min(page + want))
            .take_while(|&p| !have[p as usize])
            .count() as u64;
        asked += 1;
        let t = Instant::now();
        sock.write_all(&(base + page * ps as u64).to_le_bytes())?;
        sock.write_all(&n.to_le_bytes())?;
        let mut head = [0u8; 8];
        sock.read_exact(&mut head)?;
        let got = u64::from_le_bytes(head);
        let data = &mut buf[..got as usize * ps];
        sock.read_exact(data)?;
        total += t.elapsed();
        // Pages from `page` on, clamped at the end of the run (its buf).
        if got == 0 || got > n {
            bad += 1;
        }
        for (k, p) in data.chunks_exact(ps).enumerate() {
            let pno = page + k as u64;
            have[pno as usize] = true;
            if p.iter().enumerate().any(|(i, &b)| b != pattern(pno, i)) {
                bad += 1;
            }
            checked += 1;
        }
    }
    sock.write_all(&[0u8; 16])?;
    Ok((checked, bad, total / asked.max(1) as u32))
}
