//! `page-pipe-sys` against the running kernel: sizing math, limits, and the transfer
//! wrappers' looping and partial progress.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;

use page_pipe_sys::{
    Errno, GiftSupport, Partial, PipeLimits, SpliceFlags, Stopped, VmspliceMode, page_size, pipe,
    pipe_capacity, pipe_max_size_pages, probe_vmsplice, set_pipe_capacity, splice_exact, tee_exact,
    vmsplice_all, write_exact,
};
use page_pipe_tests::{
    AlignedPages, Unprivileged, alone, fill_pattern, limit_open_files, open_fds, unprivileged,
};

fn ps() -> usize {
    page_size().get()
}

fn read_all(fd: impl AsFd, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut off = 0;
    while off < len {
        let n = rustix::io::read(&fd, &mut out[off..]).expect("read pipe");
        assert!(n > 0, "pipe ran dry after {off} of {len} bytes");
        off += n;
    }
    out
}

#[test]
fn pipe_max_size_is_819_pages_at_4k() {
    assert_eq!(pipe_max_size_pages(4096), 819);
    if ps() == 4096 {
        assert_eq!(pipe_max_size_pages(ps()), 819);
    }
}

#[test]
fn limits_agree_with_proc_and_rlimit() {
    let l = PipeLimits::read().unwrap();
    let proc = |f: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/sys/fs/{f}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(l.pipe_max_size as u64, proc("pipe-max-size"));
    assert_eq!(l.pipe_user_pages_soft, proc("pipe-user-pages-soft"));
    assert_eq!(l.pipe_user_pages_hard, proc("pipe-user-pages-hard"));
    assert_eq!(l.page_size.get(), rustix::param::page_size());
    let rl = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    assert_eq!(l.nofile_soft, rl.current);
    assert_eq!(*PipeLimits::get().unwrap(), l);
}

#[test]
fn new_pipe_has_default_capacity_and_close_on_exec() {
    let p = pipe().unwrap();
    let l = PipeLimits::get().unwrap();
    let cap = pipe_capacity(&p.read).unwrap();
    // A fresh pipe has 16 slots, unless pipe-max-size is smaller.
    let expect = (page_pipe_sys::PIPE_DEF_BUFFERS * ps()).min(l.pipe_max_size.max(ps()));
    assert_eq!(cap, expect);
    let flags = rustix::io::fcntl_getfd(&p.write).unwrap();
    assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
}

#[test]
fn set_capacity_grants_what_the_sizing_math_predicts() {
    let l = PipeLimits::get().unwrap();
    let most = l.max_grant_pages().min(4096);
    let p = pipe().unwrap();
    let mut current = pipe_capacity(&p.read).unwrap() / ps();
    // Every request from 1 page up to the grant limit, growing and shrinking.
    let mut requests: Vec<usize> = (1..=most.min(70)).collect();
    requests.extend([most / 2 + 1, most - 1, most, 3, most]);
    for pages in requests {
        let predicted = l.predict_set_size(current, pages);
        let got = set_pipe_capacity(&p.write, pages * ps()).map(|b| b / ps());
        assert_eq!(got, predicted, "request {pages} pages from {current}");
        let now = pipe_capacity(&p.read).unwrap() / ps();
        assert_eq!(now, got.unwrap(), "capacity read back after {pages}");
        assert!(now.is_power_of_two() && now >= pages);
        current = now;
    }
}

#[test]
fn growth_above_pipe_max_size_is_eperm_unless_exempt() {
    let l = PipeLimits::get().unwrap();
    if l.exempt_from_max_size() {
        eprintln!("SKIPPED: this process has CAP_SYS_RESOURCE, pipe-max-size does not apply");
        return;
    }
    let p = pipe().unwrap();
    let above = l.max_grant_pages() + 1;
    assert_eq!(
        set_pipe_capacity(&p.write, above * ps()),
        Err(Errno::PERM),
        "{above} pages is above pipe-max-size"
    );
    // The refusal leaves the pipe as it was.
    let fresh = pipe_capacity(&pipe().unwrap().read).unwrap();
    assert_eq!(pipe_capacity(&p.read).unwrap(), fresh);
    // CRIU's cap (819 pages at 4 KiB) rounds to 1024 pages: refused above a 1 MiB
    // pipe-max-size, granted at 4 MiB; the prediction knows which.
    let criu_cap = pipe_max_size_pages(ps());
    let got = set_pipe_capacity(&p.write, criu_cap * ps()).map(|b| b / ps());
    assert_eq!(got, l.predict_set_size(fresh / ps(), criu_cap));
    let now = pipe_capacity(&p.read).unwrap();
    match got {
        Ok(pages) => assert_eq!(now, pages * ps()),
        Err(_) => assert_eq!(now, fresh, "a refusal leaves the pipe as it was"),
    }
}

#[test]
fn vmsplice_batches_past_uio_maxiov_and_loops_on_short_transfers() {
    // 3000 iovecs of 100 bytes: three batches, and more slots than the pipe holds, so
    // the blocking calls return short while a reader drains the other end.
    let mut data = vec![0u8; 3000 * 128];
    fill_pattern(&mut data, 3);
    let slices: Vec<&[u8]> = data.chunks(128).map(|c| &c[..100]).collect();
    let expect: Vec<u8> = slices.concat();
    let p = pipe().unwrap();
    let reader = std::thread::spawn({
        let len = expect.len();
        let fd = p.read;
        move || read_all(fd, len)
    });
    // SAFETY: `p.write` is a pipe's write end; no GIFT.
    let moved = unsafe { vmsplice_all(&p.write, &slices, SpliceFlags::empty()) }.unwrap();
    assert_eq!(moved, expect.len());
    let got = reader.join().unwrap();
    assert!(got == expect, "pipe contents differ from the iovecs");
}

#[test]
fn vmsplice_reports_partial_progress_on_a_full_nonblocking_pipe_and_resumes() {
    let mut mem = AlignedPages::new(64);
    fill_pattern(mem.bytes_mut(), 9);
    let p = pipe().unwrap();
    let cap = pipe_capacity(&p.read).unwrap();
    let pages: Vec<&[u8]> = mem.bytes().chunks(ps()).collect();
    // SAFETY: `p.write` is a pipe's write end; no GIFT.
    let err = unsafe { vmsplice_all(&p.write, &pages, SpliceFlags::NONBLOCK) }.unwrap_err();
    assert_eq!(
        err,
        Partial {
            done: cap,
            stopped: Stopped::Errno(Errno::AGAIN)
        }
    );
    // Drain and resume from where it stopped: the bytes come out in order.
    let mut got = read_all(&p.read, cap);
    let mut done = cap;
    while done < mem.bytes().len() {
        let rest: Vec<&[u8]> = mem.bytes()[done..].chunks(ps()).collect();
        // SAFETY: as above.
        let step = match unsafe { vmsplice_all(&p.write, &rest, SpliceFlags::NONBLOCK) } {
            Ok(n) => n,
            Err(Partial {
                done,
                stopped: Stopped::Errno(Errno::AGAIN),
            }) => done,
            Err(e) => panic!("{e}"),
        };
        got.extend(read_all(&p.read, step));
        done += step;
    }
    assert!(got == mem.bytes(), "resumed transfer differs from memory");
}

#[test]
fn vmsplice_aliases_memory_as_the_probe_says() {
    let probe = probe_vmsplice().unwrap();
    let mut mem = AlignedPages::new(4);
    mem.bytes_mut().fill(1);
    let p = pipe().unwrap();
    let pages: Vec<&[u8]> = mem.bytes().chunks(ps()).collect();
    // SAFETY: `p.write` is a pipe's write end; no GIFT, so the memory may change.
    let r = unsafe { vmsplice_all(&p.write, &pages, SpliceFlags::NONBLOCK) };
    if let VmspliceMode::Refused(e) = probe.mode {
        assert_eq!(r.unwrap_err().errno(), Some(e));
        eprintln!("SKIPPED aliasing: vmsplice refused here ({e})");
        return;
    }
    assert_eq!(r.unwrap(), 4 * ps());
    mem.bytes_mut()[ps()..2 * ps()].fill(2);
    let got = read_all(&p.read, 4 * ps());
    let second_page = got[ps()];
    match probe.mode {
        VmspliceMode::ZeroCopy => assert_eq!(second_page, 2, "the pipe references the page"),
        VmspliceMode::Copies => assert_eq!(second_page, 1, "the pipe holds a copy"),
        VmspliceMode::Refused(_) => unreachable!(),
    }
    assert!(got[..ps()].iter().all(|&b| b == 1));
}

#[test]
fn contents_survive_an_unmap_after_vmsplice() {
    let mut map = memmap2::MmapOptions::new()
        .len(8 * ps())
        .map_anon()
        .unwrap();
    fill_pattern(&mut map, 5);
    let expect = map.to_vec();
    let p = pipe().unwrap();
    // SAFETY: `p.write` is a pipe's write end; the map is page-aligned whole pages and is
    // not modified (it is unmapped) while its pages sit in the pipe.
    let r = unsafe {
        vmsplice_all(
            &p.write,
            &[&map[..]],
            SpliceFlags::GIFT | SpliceFlags::NONBLOCK,
        )
    };
    let r = match r {
        Err(e) if e.errno() == Some(Errno::OPNOTSUPP) => {
            // SAFETY: as above, without GIFT.
            unsafe { vmsplice_all(&p.write, &[&map[..]], SpliceFlags::NONBLOCK) }
        }
        r => r,
    };
    if let Err(e) = r {
        eprintln!("SKIPPED unmap: vmsplice refused here ({e})");
        return;
    }
    drop(map);
    assert!(read_all(&p.read, expect.len()) == expect);
}

#[test]
fn probe_answers_consistently() {
    let a = probe_vmsplice().unwrap();
    let b = probe_vmsplice().unwrap();
    assert_eq!(a, b);
    let text = a.to_string();
    assert!(text.starts_with("vmsplice: "), "{text}");
    // A refused vmsplice refuses the gift too, with the same errno; an accepted gift
    // means vmsplice itself works.
    match (a.mode, a.gift) {
        (VmspliceMode::Refused(e), g) => assert_eq!(g, GiftSupport::Refused(e)),
        (_, GiftSupport::Accepted) => {}
        (_, GiftSupport::Refused(e)) => {
            assert_ne!(e, Errno::PERM, "EPERM would refuse vmsplice itself")
        }
    }
    // The text says what the probe found about the gift, not just that it looked.
    let gift_text = match a.gift {
        GiftSupport::Accepted => ", SPLICE_F_GIFT accepted".to_string(),
        GiftSupport::Refused(e) => format!(", SPLICE_F_GIFT refused ({e})"),
    };
    assert!(text.ends_with(&gift_text), "{text}");
}

#[test]
fn splice_exact_moves_exact_bytes_to_a_file_at_an_offset() {
    let mut mem = AlignedPages::new(10);
    fill_pattern(mem.bytes_mut(), 1);
    let p = pipe().unwrap();
    write_exact(&p.write, mem.bytes()).unwrap();
    let mut file = tempfile_in_tmp();
    let mut off = 3u64;
    splice_exact(
        &p.read,
        None,
        &file,
        Some(&mut off),
        mem.bytes().len(),
        SpliceFlags::empty(),
    )
    .unwrap();
    assert_eq!(off, 3 + mem.bytes().len() as u64);
    let mut got = Vec::new();
    file.seek(SeekFrom::Start(3)).unwrap();
    file.read_to_end(&mut got).unwrap();
    assert!(got == mem.bytes());
}

#[test]
fn splice_exact_reports_how_far_it_got_when_the_source_runs_dry() {
    let p = pipe().unwrap();
    let q = pipe().unwrap();
    write_exact(&p.write, &[7u8; 1000]).unwrap();
    drop(p.write);
    let err = splice_exact(&p.read, None, &q.write, None, 5000, SpliceFlags::empty()).unwrap_err();
    assert_eq!(
        err,
        Partial {
            done: 1000,
            stopped: Stopped::EndOfData
        }
    );
    assert_eq!(read_all(&q.read, 1000), vec![7u8; 1000]);
}

#[test]
fn splice_exact_reports_epipe_from_a_closed_reader() {
    let p = pipe().unwrap();
    let q = pipe().unwrap();
    write_exact(&p.write, &[1u8; 100]).unwrap();
    drop(q.read);
    let err = splice_exact(&p.read, None, &q.write, None, 100, SpliceFlags::empty()).unwrap_err();
    assert_eq!(err.errno(), Some(Errno::PIPE));
    assert_eq!(err.done, 0);
}

#[test]
fn tee_duplicates_without_consuming_and_reports_a_short_tee() {
    let p = pipe().unwrap();
    let q = pipe().unwrap();
    let mut data = vec![0u8; 8 * ps()];
    fill_pattern(&mut data, 4);
    write_exact(&p.write, &data).unwrap();
    tee_exact(&p.read, &q.write, data.len(), SpliceFlags::empty()).unwrap();
    assert!(read_all(&q.read, data.len()) == data);
    // The source still holds everything.
    tee_exact(&p.read, &q.write, 2 * ps(), SpliceFlags::empty()).unwrap();
    assert!(read_all(&q.read, 2 * ps()) == data[..2 * ps()]);
    // A destination with room for less than asked: a short tee, reported with its count.
    let small = pipe().unwrap();
    set_pipe_capacity(&small.write, ps()).unwrap();
    let err = tee_exact(&p.read, &small.write, data.len(), SpliceFlags::NONBLOCK).unwrap_err();
    assert!(err.done < data.len());
    assert_eq!(err.errno(), Some(Errno::AGAIN));
    assert!(read_all(&p.read, data.len()) == data);
}

#[test]
fn wrappers_leak_no_file_descriptors() {
    if !alone("wrappers_leak_no_file_descriptors") {
        return;
    }
    let before = open_fds();
    for _ in 0..100 {
        let p = pipe().unwrap();
        set_pipe_capacity(&p.write, 2 * ps()).unwrap();
        let _ = probe_vmsplice().unwrap();
    }
    assert_eq!(open_fds(), before);
}

/// As user nobody: pipe-max-size applies, the per-user soft limit shrinks new pipes to
/// two pages and refuses growth, the sizing math predicts both, and a low
/// `RLIMIT_NOFILE` makes `pipe` fail with `EMFILE`.
#[test]
fn unprivileged_user_meets_the_pipe_limits() {
    match unprivileged("unprivileged_user_meets_the_pipe_limits") {
        Unprivileged::RunBody => {}
        Unprivileged::Passed | Unprivileged::Skipped => return,
    }
    let l = PipeLimits::read().unwrap();
    assert!(!l.exempt_from_max_size() && !l.exempt_from_user_pages());
    let p = pipe().unwrap();
    let above = l.max_grant_pages() + 1;
    assert_eq!(set_pipe_capacity(&p.write, above * ps()), Err(Errno::PERM));
    drop(p);

    if l.pipe_user_pages_soft > 0 {
        // Each default pipe accounts 16 slots; make enough to pass the soft limit.
        let needed = (l.pipe_user_pages_soft as usize) / page_pipe_sys::PIPE_DEF_BUFFERS + 2;
        limit_open_files((2 * needed + 64) as u64);
        let mut pipes = Vec::new();
        for _ in 0..needed {
            pipes.push(pipe().unwrap());
        }
        let last = pipes.last().unwrap();
        let cap = pipe_capacity(&last.read).unwrap() / ps();
        assert_eq!(
            cap,
            page_pipe_sys::PIPE_MIN_DEF_BUFFERS,
            "past the soft limit"
        );
        assert_eq!(
            set_pipe_capacity(&last.write, 4 * ps()),
            Err(Errno::PERM),
            "growth past the soft limit"
        );
        drop(pipes);
    }

    limit_open_files(16);
    let mut pipes = Vec::new();
    let err = loop {
        match pipe() {
            Ok(p) => pipes.push(p),
            Err(e) => break e,
        }
        assert!(
            pipes.len() < 16,
            "RLIMIT_NOFILE 16 allows fewer than 16 pipes"
        );
    };
    assert_eq!(err, Errno::MFILE);
}

fn tempfile_in_tmp() -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "page-pipe-sys-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}
