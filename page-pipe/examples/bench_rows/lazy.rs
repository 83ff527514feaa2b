//! The lazy restore's rows (`--lazy`): a full sequential first-touch pass with prefetch
//! against the eager restore into fresh memory, and the fault service time measured from
//! the faulting thread, for the placements the `lazy` module docs discuss, against a
//! handler a user would write (one thread, sleeping, `pread` and `UFFDIO_COPY` of each
//! faulting page: Firecracker's example handler) and against serving faults between
//! prefetch steps from one thread.

use std::error::Error;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use page_pipe::image::{Image, RestoreOptions};
use page_pipe::lazy::{LazyOptions, LazyReport, LazyRestore, LazySource};
use page_pipe::snapshot::Drain;
use page_pipe_sys::{CopyMode, Errno, RegisterMode, Uffd, UffdEvent, UffdFeatures, UffdFlags};

use super::workloads::{Region, dump_image, fresh};
use super::{Table, paired};

/// Random first touches per fault-service measurement.
const TOUCHES: usize = 10_000;

/// A touch slower than this waited for its page (a page already in takes well under a
/// microsecond to touch, a fault round trip several).
const FAULTED: Duration = Duration::from_micros(1);

fn pin(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).expect("pin to a CPU");
}

/// Touches `TOUCHES` distinct random pages of `pages` pages at `base` one at a time,
/// each first touch timed; returns the times of those that waited for their page
/// (others were in already: brought by the prefetch, or with the run of an earlier
/// fault), sorted.
fn random_touches(base: usize, pages: u64, ps: usize) -> Vec<Duration> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut seen = vec![false; pages as usize];
    let mut times = Vec::with_capacity(TOUCHES);
    let mut n = 0;
    while n < TOUCHES.min(pages as usize) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = (x % pages) as usize;
        if std::mem::replace(&mut seen[p], true) {
            continue;
        }
        n += 1;
        let ptr = std::ptr::without_provenance::<u64>(base + p * ps);
        let t = Instant::now();
        // SAFETY: the page is in the mapping the caller restores into, which stays
        // mapped while the touches run; a read of a page not yet in waits for it.
        let v = unsafe { std::ptr::read_volatile(ptr) };
        let d = t.elapsed();
        // The region's pattern: each page starts with its number.
        assert_eq!(v, p as u64, "page {p} restored wrong");
        if d > FAULTED {
            times.push(d);
        }
    }
    times.sort();
    times
}

fn quantile(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * q) as usize]
}

fn us(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

/// A placement measured: the touches timed, and the restore's report.
struct Placement {
    times: Vec<Duration>,
    report: Option<LazyReport>,
    /// Faults a baseline handler served.
    faults: Option<u64>,
}

/// Our fault service: a lazy restore with `opts`, random touches from a thread pinned
/// to `toucher_cpu` if given.
fn ours(
    img: &Arc<Image>,
    base: u64,
    len: usize,
    opts: LazyOptions,
    toucher_cpu: Option<usize>,
) -> Result<(Vec<Duration>, LazyReport), Box<dyn Error>> {
    let mut dst = fresh(len);
    let ps = page_pipe::page_size();
    // SAFETY:
    // - `dst` is a fresh anonymous mapping of this function's, no reference into it
    //   alive; it stays mapped until the restore is stopped below;
    // - only the touching thread touches it, holding no lock (it reads and times);
    // - nothing makes system calls into it.
    let restore = unsafe {
        LazyRestore::start(
            LazySource::image(Arc::clone(img)),
            base,
            dst.as_mut_ptr(),
            len,
            &opts,
        )?
    };
    let host = dst.as_ptr() as usize;
    let pages = (len / ps) as u64;
    let times = std::thread::spawn(move || {
        if let Some(c) = toucher_cpu {
            pin(c);
        }
        random_touches(host, pages, ps)
    })
    .join()
    .map_err(|_| "the touching thread panicked")?;
    let report = restore.stop()?;
    drop(dst);
    Ok((times, report))
}

/// The baseline handlers: one thread per restore, reading each faulting page with
/// `pread` from the image's (single) pages file and copying it in; with `prefetch_step`
/// it also brings the rest in, in address order, that many pages at a time, reading the
/// queue between steps.
fn baseline(
    pages_file: &Path,
    len: usize,
    prefetch_step: Option<usize>,
    cpus: Option<(usize, usize)>,
) -> Result<(Vec<Duration>, u64), Box<dyn Error>> {
    let ps = page_pipe::page_size();
    let pages = len / ps;
    let file = std::fs::File::open(pages_file)?;
    let dst = fresh(len);
    let host = dst.as_ptr() as usize;
    let uffd = Uffd::open(UffdFlags::NONBLOCK)
        .or_else(|_| Uffd::open_dev(UffdFlags::NONBLOCK))
        .or_else(|_| Uffd::open(UffdFlags::NONBLOCK | UffdFlags::USER_MODE_ONLY))?;
    uffd.api(UffdFeatures::empty())?;
    uffd.register(host, len, RegisterMode::MISSING)?;
    let uffd = Arc::new(uffd);
    let stop = page_pipe_sys::pipe()?;
    let done = Arc::new(AtomicBool::new(false));
    let (u, d) = (Arc::clone(&uffd), Arc::clone(&done));
    let read = stop.read;
    let handler = std::thread::spawn(move || {
        if let Some((c, _)) = cpus {
            pin(c);
        }
        let step = prefetch_step.unwrap_or(0);
        let mut buf = vec![0u8; step.max(1) * ps];
        let mut events = Vec::new();
        let mut next = 0usize;
        let mut faults = 0u64;
        // Copies pages `p..p + n` from the file; pages already there are skipped.
        let fill = |p: usize, n: usize, buf: &mut [u8]| {
            let b = &mut buf[..n * ps];
            file.read_exact_at(b, (p * ps) as u64).expect("pread");
            let mut off = 0;
            while off < b.len() {
                // SAFETY: - the destination is the fresh mapping registered above, which
                //   outlives this thread (joined before it is dropped);
                // - `b[off..]` is this thread's buffer.
                let r = unsafe {
                    u.copy(
                        std::ptr::without_provenance_mut(host + p * ps + off),
                        b[off..].as_ptr(),
                        b.len() - off,
                        CopyMode::empty(),
                    )
                };
                match r {
                    Ok(n) => off += n as usize,
                    Err(e) if e.errno == Errno::EXIST => {
                        off += e.done as usize;
                        let _ = u.wake(host + p * ps + off, ps);
                        off += ps;
                    }
                    Err(e) if e.errno == Errno::AGAIN => off += e.done as usize,
                    // Unregistered: the touches are done.
                    Err(e) if e.errno == Errno::NOENT => return,
                    Err(e) => panic!("UFFDIO_COPY: {e}"),
                }
            }
        };
        loop {
            events.clear();
            match u.read_events(&mut events, 64) {
                Ok(_) => {
                    for ev in events.drain(..) {
                        if let UffdEvent::Pagefault { address, .. } = ev {
                            faults += 1;
                            fill((address as usize - host) / ps, 1, &mut buf);
                        }
                    }
                    continue;
                }
                Err(Errno::AGAIN) => {}
                Err(e) => panic!("read the userfaultfd: {e}"),
            }
            if step > 0 && next < pages && !d.load(Ordering::Acquire) {
                let n = step.min(pages - next);
                fill(next, n, &mut buf);
                next += n;
                continue;
            }
            if d.load(Ordering::Acquire) || !u.wait(&read).expect("poll") {
                return faults;
            }
        }
    });
    let times = std::thread::spawn(move || {
        if let Some((_, c)) = cpus {
            pin(c);
        }
        random_touches(host, pages as u64, ps)
    })
    .join()
    .map_err(|_| "the touching thread panicked")?;
    done.store(true, Ordering::Release);
    let _ = uffd.unregister(host, len);
    drop(stop.write);
    let faults = handler
        .join()
        .map_err(|_| "the baseline handler panicked")?;
    drop(dst);
    Ok((times, faults))
}

pub fn rows(size: u64, runs: usize) -> Result<(), Box<dyn Error>> {
    let r = Region::new(size);
    let (base, len, ps) = (r.base(), r.mem.len(), r.ps);
    let dir = std::env::temp_dir().join(format!("page-pipe-bench-lazy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dump_image(&r, &dir, Drain::Auto);
    super::settle(&dir)?;
    let img = Arc::new(Image::open(&dir)?);
    let pages_file = dir.join("pages-1.img");
    println!(
        "{} MiB ({} pages of {ps} bytes); median of {runs} runs; {} random first touches per \
         fault-service figure; machine: {} cpus, load average {}",
        len >> 20,
        r.pages,
        TOUCHES,
        std::thread::available_parallelism()?,
        loadavg()
    );

    // Is there a userfaultfd at all?
    let probe = ours(&img, base, 64 * ps, LazyOptions::default(), None);
    if let Err(e) = probe {
        println!("SKIPPED lazy restore rows: {e}");
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }

    // The full pass: restore started, every page touched in address order by this
    // thread, all in (wait returned); against the eager restore into fresh memory.
    let two = LazyOptions {
        prefetch_threads: 2,
        ..LazyOptions::default()
    };
    let mut reports = Vec::new();
    let mut reports2 = Vec::new();
    let pass = |opts: &LazyOptions, reports: &mut Vec<LazyReport>| {
        let mut dst = fresh(len);
        let s = Instant::now();
        // SAFETY: `dst` is a fresh mapping of this closure's, no reference into it
        // alive; only this thread touches it (reads, holding no lock), and it is
        // dropped after the restore has ended (`wait`).
        let restore = unsafe {
            LazyRestore::start(
                LazySource::image(Arc::clone(&img)),
                base,
                dst.as_mut_ptr(),
                len,
                opts,
            )
            .expect("start the lazy restore")
        };
        let mut sum = 0u64;
        for p in (0..len).step_by(ps) {
            sum = sum.wrapping_add(u64::from(dst[p]));
        }
        std::hint::black_box(sum);
        let report = restore.wait().expect("lazy restore");
        let t = s.elapsed();
        assert!(dst[..] == r.mem[..], "the lazy restore differs");
        reports.push(report);
        t
    };
    let (eager, lazy) = paired(
        runs,
        || {
            let mut dst = fresh(len);
            let s = Instant::now();
            img.restore(base, &mut dst[..], &RestoreOptions::default())
                .expect("eager restore");
            let t = s.elapsed();
            assert!(dst[..] == r.mem[..], "the eager restore differs");
            t
        },
        || pass(&LazyOptions::default(), &mut reports),
    );
    let (eager2, lazy2) = paired(
        runs,
        || {
            let mut dst = fresh(len);
            let s = Instant::now();
            img.restore(base, &mut dst[..], &RestoreOptions::default())
                .expect("eager restore");
            s.elapsed()
        },
        || pass(&two, &mut reports2),
    );
    let mut t = Table {
        bytes: len as u64,
        pages: r.pages,
        rows: Vec::new(),
    };
    t.row(
        "lazy restore, full sequential first-touch pass, prefetch on",
        lazy,
        "Image::restore into fresh memory",
        eager,
    );
    t.row(
        "the same, 2 prefetch threads",
        lazy2,
        "Image::restore into fresh memory",
        eager2,
    );
    t.print();
    if let Some(rep) = reports.last() {
        println!(
            "  last pass: {} faults ({} woken by the prefetch), {} pages by faults, {} by \
             prefetch, {} zero pages, all in after {:.1} ms",
            rep.faults,
            rep.woken,
            rep.fault_pages,
            rep.prefetch_pages,
            rep.zero_pages,
            rep.elapsed.as_secs_f64() * 1e3
        );
    }
    let ratio = eager.as_secs_f64() / lazy.as_secs_f64();
    println!(
        "  goal >= 0.50x the eager restore: {:.2}x, {}",
        ratio,
        if ratio >= 0.5 { "met" } else { "not met" }
    );

    // Fault service, from the faulting thread. Each placement once per run; the median
    // of the runs' medians.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let no_prefetch = LazyOptions {
        prefetch: false,
        ..LazyOptions::default()
    };
    type Case = (String, Box<dyn Fn() -> Result<Placement, Box<dyn Error>>>);
    let mut cases: Vec<Case> = Vec::new();
    let add = |cases: &mut Vec<Case>, what: &str, opts: LazyOptions, cpu: Option<usize>| {
        let img = Arc::clone(&img);
        let what = what.to_string();
        cases.push((
            what,
            Box::new(move || {
                let (times, report) = ours(&img, base, len, opts, cpu)?;
                Ok(Placement {
                    times,
                    report: Some(report),
                    faults: None,
                })
            }),
        ));
    };
    // Each design free to run where the scheduler puts it, then with the faulting thread
    // on CPU 1 and the handler on CPU 0 (where the scheduler puts them when the machine
    // is otherwise idle), or both on CPU 1.
    add(
        &mut cases,
        "ours, prefetch on (default), free",
        LazyOptions::default(),
        None,
    );
    add(
        &mut cases,
        "ours, prefetch on, fault_pages 1, free",
        LazyOptions {
            fault_pages: 1,
            ..LazyOptions::default()
        },
        None,
    );
    add(&mut cases, "ours, prefetch off, free", no_prefetch, None);
    add(
        &mut cases,
        "ours, prefetch off, spinning 200 us after each fault, free",
        LazyOptions {
            spin: Duration::from_micros(200),
            ..no_prefetch
        },
        None,
    );
    if cpus > 1 {
        add(
            &mut cases,
            "ours, prefetch on, toucher on CPU 1 (our threads free)",
            LazyOptions::default(),
            Some(1),
        );
        add(
            &mut cases,
            "ours, prefetch on, fault thread and toucher on CPU 1",
            LazyOptions {
                fault_cpu: Some(1),
                ..LazyOptions::default()
            },
            Some(1),
        );
        add(
            &mut cases,
            "ours, prefetch off, fault thread and toucher on CPU 1",
            LazyOptions {
                fault_cpu: Some(1),
                ..no_prefetch
            },
            Some(1),
        );
        add(
            &mut cases,
            "ours, prefetch off, fault thread on CPU 0, toucher on CPU 1",
            LazyOptions {
                fault_cpu: Some(0),
                ..no_prefetch
            },
            Some(1),
        );
    }
    let mut base_case = |what: &str, step: Option<usize>, pinned: Option<(usize, usize)>| {
        let pf = pages_file.clone();
        cases.push((
            what.to_string(),
            Box::new(move || {
                let (times, faults) = baseline(&pf, len, step, pinned)?;
                Ok(Placement {
                    times,
                    report: None,
                    faults: Some(faults),
                })
            }),
        ));
    };
    base_case(
        "baseline: one sleeping handler thread, pread + COPY per fault, free",
        None,
        None,
    );
    base_case(
        "baseline: one thread, faults between prefetch steps of 64 pages, free",
        Some(64),
        None,
    );
    if cpus > 1 {
        base_case(
            "baseline: one sleeping handler thread on CPU 0, toucher on CPU 1",
            None,
            Some((0, 1)),
        );
        base_case(
            "baseline: one thread with prefetch steps on CPU 0, toucher on CPU 1",
            Some(64),
            Some((0, 1)),
        );
    }

    println!(
        "\nfault service, measured from the faulting thread ({TOUCHES} random first \
         touches; the times of those that waited for their page):"
    );
    println!(
        "{:<72} {:>10} {:>10} {:>10} {:>8}",
        "placement", "median", "p90", "p99", "waited"
    );
    let mut medians = Vec::new();
    for (what, case) in &cases {
        let mut got: Vec<Placement> = Vec::new();
        for _ in 0..runs {
            got.push(case()?);
        }
        got.sort_by_key(|p| quantile(&p.times, 0.5));
        let mid = &got[got.len() / 2];
        let m = quantile(&mid.times, 0.5);
        println!(
            "{:<72} {:>10} {:>10} {:>10} {:>8}",
            what,
            us(m),
            us(quantile(&mid.times, 0.9)),
            us(quantile(&mid.times, 0.99)),
            mid.times.len()
        );
        if let Some(rep) = mid.report {
            println!(
                "  {} faults ({} woken), {} pages by faults, {} by prefetch",
                rep.faults, rep.woken, rep.fault_pages, rep.prefetch_pages,
            );
        }
        if let Some(f) = mid.faults {
            println!("  {f} faults");
        }
        medians.push((what.clone(), m));
    }
    let best = medians
        .iter()
        .filter(|(w, _)| w.starts_with("ours"))
        .map(|(_, m)| *m)
        .min()
        .unwrap_or_default();
    let default = medians.first().map(|(_, m)| *m).unwrap_or_default();
    // Ours where the faulting thread is kept off the CPU the baselines' handler runs on.
    let apart: Vec<String> = medians
        .iter()
        .filter(|(w, _)| w.contains("toucher on CPU 1") && !w.contains("and toucher"))
        .map(|(w, m)| format!("{}: {}", w, us(*m)))
        .collect();
    if !apart.is_empty() {
        println!("faulting thread on CPU 1: {}", apart.join("; "));
    }
    println!(
        "goal <= 10 us median with the fault thread placed well: default {}, best {}: {}",
        us(default),
        us(best),
        if best <= Duration::from_micros(10) {
            "met"
        } else {
            "not met"
        }
    );
    println!(
        "load average at the end: {} (threads free to move: the scheduler tends to bring \
         the faulting thread and the thread that wakes it onto one CPU)",
        loadavg()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The first three fields of `/proc/loadavg`: the figures above depend on whether the
/// other CPUs are idle.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
