//! Holding up under limits and faults: an unprivileged user with few file descriptors,
//! sinks that fail part way, and failures injected at every call of the pipe backend.

use std::process::Command;
use std::sync::atomic::Ordering;

use page_pipe::image::{ImageError, ImageWriter};
use page_pipe::snapshot::{Drain, SnapshotError, SnapshotOptions, Span, snapshot};
use page_pipe::testing::{Config, FakeKernel, FakePipes, Op, check_sequence};
use page_pipe::{AddError, BufFlags, DumpErrorKind, FdSink, PagePipe, Source};
use page_pipe_tests::{
    AS_NOBODY, TempDir, Unprivileged, alone, assert_restores, limit_open_files, open_fds,
    patterned, snapshot_demo, unprivileged,
};

const BASE: u64 = 0x7f00_0000_0000;

fn ps() -> u64 {
    page_pipe_sys::page_size().get() as u64
}

/// As user nobody, with 64 file descriptors: the demo snapshots 512 MiB in chunk mode
/// with at most 8 pipes, restores it and verifies it.
#[test]
fn the_demo_runs_unprivileged_with_64_file_descriptors() {
    if std::env::var_os(AS_NOBODY).is_none() {
        snapshot_demo(); // build it while still root
    }
    match unprivileged("the_demo_runs_unprivileged_with_64_file_descriptors") {
        Unprivileged::RunBody => {}
        Unprivileged::Passed | Unprivileged::Skipped => return,
    }
    limit_open_files(64);
    let dir = TempDir::new("nobody-demo");
    let out = Command::new(snapshot_demo())
        .args(["--size", "512M", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("matches the region byte for byte"), "{text}");
    let rows = text
        .lines()
        .filter(|l| l.ends_with(" pipes)") && !l.starts_with("region"));
    for line in rows {
        let pipes: u64 = line
            .rsplit(", ")
            .next()
            .and_then(|s| s.strip_suffix(" pipes)"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no pipe count in {line:?}"));
        assert!(pipes <= 8, "{line}");
    }
}

/// As user nobody, a single-pass capture larger than `pipe-user-pages-soft` fails with
/// an error that names the limit and the way out; it does not crawl on tiny pipes.
#[test]
fn an_unbounded_capture_past_the_soft_limit_names_it() {
    match unprivileged("an_unbounded_capture_past_the_soft_limit_names_it") {
        Unprivileged::RunBody => {}
        Unprivileged::Passed | Unprivileged::Skipped => return,
    }
    let limits = page_pipe_sys::PipeLimits::read().unwrap();
    if limits.pipe_user_pages_soft == 0 {
        eprintln!("SKIPPED: pipe-user-pages-soft is 0 (no limit) here");
        return;
    }
    let pages = 4 * limits.pipe_user_pages_soft;
    limit_open_files(8192);
    let mut pp = PagePipe::builder().iov_budget(1 << 20).build().unwrap();
    let err = pp
        .add_pages(BASE, pages, BufFlags::empty())
        .expect_err("the soft limit must stop an unbounded capture");
    let msg = err.to_string();
    assert_eq!(pp.stats().pages, err.added(), "nothing accepted is lost");
    match err {
        AddError::PipeLimit {
            capacity,
            expected,
            added,
            ..
        } => {
            assert!(capacity < expected);
            // It stopped at the limit, not after crawling through tiny pipes.
            assert!(
                added <= limits.pipe_user_pages_soft + limits.max_grant_pages() as u64,
                "{added} pages went in"
            );
            // Pipes grow to the grant limit, so the soft limit holds this many of them
            // (and a few more that were still growing); crawling would make thousands.
            let grown = limits.pipe_user_pages_soft / limits.max_grant_pages() as u64;
            assert!(
                pp.stats().pipes_made <= grown + 8,
                "{} pipes made",
                pp.stats().pipes_made
            );
            assert!(
                msg.contains("pipe-user-pages-soft") && msg.contains("chunk mode"),
                "{msg}"
            );
        }
        e => panic!("expected PipeLimit, got {e}"),
    }
}

/// With 64 file descriptors, a single-pass capture runs out of them: `EMFILE`, with a
/// message naming the limit and chunk mode; chunk mode gets through.
#[test]
fn running_out_of_file_descriptors_is_an_error_and_chunk_mode_gets_through() {
    if !alone("running_out_of_file_descriptors_is_an_error_and_chunk_mode_gets_through") {
        return;
    }
    limit_open_files(64);
    let pages = 100_000u64;
    let mut pp = PagePipe::builder().iov_budget(1 << 20).build().unwrap();
    let err = pp.add_pages(BASE, pages, BufFlags::empty()).unwrap_err();
    let added = err.added();
    match &err {
        AddError::MakePipe { errno, addr, .. } => {
            assert_eq!(*errno, page_pipe_sys::Errno::MFILE);
            assert_eq!(*addr, BASE + added * ps());
        }
        e => panic!("expected EMFILE, got {e}"),
    }
    assert!(err.to_string().contains("RLIMIT_NOFILE"), "{err}");
    assert_eq!(pp.stats().pages, added, "nothing accepted is lost");
    drop(pp);

    let mem = patterned(pages as usize, 31);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let dir = TempDir::new("emfile-chunks");
    let mut w = ImageWriter::create(dir.path(), 1).unwrap();
    let plan = [Span::Pages {
        addr: BASE,
        pages,
        flags: BufFlags::empty(),
    }];
    let r = snapshot(&source, plan, &mut w, &SnapshotOptions::default()).unwrap();
    w.finish().unwrap();
    assert!(r.pipes_made <= 8);
    assert_restores(dir.path(), BASE, &mem[..]);
}

/// Asserts that a failed snapshot left no image in `dir`: no pagemap under any name, no
/// temporary file; an image that was there before, if any, is still whole.
fn nothing_committed(dir: &std::path::Path) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.is_empty(), "left behind: {names:?}");
}

/// Runs a snapshot of `pages` pages into a new image in `dir` that fails part way, then
/// asks the writer to finish: returns both errors.
fn failing_snapshot(
    dir: &std::path::Path,
    mem: &[u8],
    pages: u64,
    drain: Drain,
) -> (SnapshotError, ImageError) {
    let source = Source::new().with_slice(BASE, mem).unwrap();
    let mut w = ImageWriter::create(dir, 1).unwrap();
    // Runs with gaps, so that the image has many entries.
    let plan: Vec<Span> = (0..pages / 8)
        .map(|i| Span::Pages {
            addr: BASE + i * 8 * ps(),
            pages: 7,
            flags: BufFlags::empty(),
        })
        .collect();
    let opts = SnapshotOptions {
        drain,
        ..SnapshotOptions::default()
    };
    let err = snapshot(&source, plan, &mut w, &opts).unwrap_err();
    let finish = w.finish().expect_err("a failed writer must not finish");
    (err, finish)
}

/// The errno of the image error inside a failed snapshot, and the file it names.
fn image_errno(err: &SnapshotError) -> (Option<i32>, std::path::PathBuf) {
    let SnapshotError::Dump(e) = err else {
        panic!("{err}")
    };
    assert!(e.to_string().contains("pages written"), "{e}");
    let DumpErrorKind::Image(ie) = &e.kind else {
        panic!("{e}")
    };
    let ImageError::Io { path, error, .. } = ie.as_ref() else {
        panic!("{ie}")
    };
    (error.raw_os_error(), path.clone())
}

/// A full disk (`ENOSPC` on a small tmpfs): the error names the pages file and says how
/// far the dump got; `finish` refuses with the same error and nothing is committed.
#[test]
fn a_full_disk_commits_nothing() {
    let mount = TempDir::new("enospc");
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(mount.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED a_full_disk_commits_nothing: cannot mount a tmpfs here");
        return;
    }
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(mount.path());
    let pages = 4096u64; // 16 MiB into 4 MiB
    let mem = patterned(pages as usize, 32);
    for drain in [Drain::Pipes, Drain::Memory] {
        let dir = mount.path().join("img");
        let (err, finish) = failing_snapshot(&dir, &mem, pages, drain);
        let (errno, path) = image_errno(&err);
        assert_eq!(errno, Some(libc::ENOSPC), "{drain:?}: {err}");
        assert!(path.ends_with("pages-1.img"), "{}", path.display());
        let SnapshotError::Dump(e) = &err else {
            unreachable!()
        };
        assert!(e.done.present_pages > 0, "some pages went out first");
        let ImageError::Io { error, path, .. } = &finish else {
            panic!("{finish}")
        };
        assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "{finish}");
        assert!(path.ends_with("pages-1.img"), "{finish}");
        nothing_committed(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A file size limit (`EFBIG` under `RLIMIT_FSIZE`): likewise nothing committed.
#[test]
fn a_file_size_limit_commits_nothing() {
    if !alone("a_file_size_limit_commits_nothing") {
        return;
    }
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions; without it
    // the kernel kills the process at the limit instead of failing the write.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let pages = 2048u64;
    let mem = patterned(pages as usize, 33);
    let lim = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `lim` is a valid rlimit for the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) }, 0);
    for drain in [Drain::Pipes, Drain::Memory] {
        let dir = TempDir::new("efbig");
        let (err, finish) = failing_snapshot(dir.path(), &mem, pages, drain);
        assert_eq!(image_errno(&err).0, Some(libc::EFBIG), "{drain:?}: {err}");
        assert!(
            matches!(&finish, ImageError::Io { error, .. } if error.raw_os_error() == Some(libc::EFBIG)),
            "{drain:?}: {finish}"
        );
        nothing_committed(dir.path());
    }
}

/// A socket whose reader went away (`EPIPE`): the error names the entry; nothing is
/// leaked.
#[test]
fn a_closed_socket_is_epipe_with_progress() {
    if !alone("a_closed_socket_is_epipe_with_progress") {
        return;
    }
    let before = open_fds();
    let mem = patterned(64, 34);
    {
        let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
        let (rx, tx) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(rx);
        let mut sink = FdSink::new(tx);
        let plan = [Span::Pages {
            addr: BASE,
            pages: 64,
            flags: BufFlags::empty(),
        }];
        let err = snapshot(&source, plan, &mut sink, &SnapshotOptions::default()).unwrap_err();
        let SnapshotError::Dump(e) = err else {
            panic!("{err}")
        };
        let DumpErrorKind::Sink { entry, error } = &e.kind else {
            panic!("{e}")
        };
        assert_eq!(error.raw_os_error(), Some(libc::EPIPE));
        assert_eq!(entry.vaddr, BASE);
        assert_eq!(e.done.present_pages, 0);
    }
    assert_eq!(open_fds(), before);
}

/// A failure injected at each call of the fake backend in turn: the page pipe stays equal
/// to the model, and every fake pipe is closed when it is dropped.
#[test]
fn a_failure_at_every_backend_call_keeps_the_model() {
    let ops: Vec<Op> = (0..30)
        .flat_map(|i| {
            [
                Op::Pages {
                    gap: i % 3,
                    n: 7 + (i * 13) % 60,
                    lazy: i % 4 == 1,
                },
                Op::Holes {
                    gap: 0,
                    n: 1 + i % 3,
                    parent: true,
                },
            ]
        })
        .chain([Op::Release { nth: 1 }, Op::Reinit])
        .collect();
    // The sequence makes about 20 pipes and 60 resizes; past those, nothing fails.
    let calls = (0..24u64)
        .map(|k| (k, true))
        .chain((0..72).map(|k| (k, false)));
    for chunk in [false, true] {
        for (k, make) in calls.clone() {
            let mut cfg = Config {
                chunk,
                lazy_pages: true,
                budget: 64,
                ..Config::new(FakeKernel::new(4096))
            };
            if make {
                cfg.kernel.fail_make.insert(k);
            } else {
                cfg.kernel.fail_resize.insert(k);
            }
            let fake = FakePipes::new(cfg.kernel.clone());
            let open = fake.open_counter();
            check_sequence(&cfg, fake, &ops, BASE).unwrap_or_else(|e| {
                let what = if make { "make" } else { "resize" };
                panic!("chunk mode {chunk}, {what} call {k} failing: {e}")
            });
            assert_eq!(open.load(Ordering::Relaxed), 0);
        }
    }
}
