//! Bad images, as a table: each case breaks a valid image one way, and both the library
//! and the `snapshot inspect`/`extract` commands must answer within a second with an
//! error naming the file (and the entry, where there is one), never a panic or a hang,
//! with memory bounded by the input. Special files (FIFOs, devices, sockets,
//! directories) and symbolic links where image files belong are among the ways.

mod hostile;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use page_pipe::image::{
    FileKind, FormatError, Image, ImageError, MAX_PAGEMAP_BYTES, PageFlags, Pagemap, PagemapEntry,
};
use page_pipe_tests::{TempDir, snapshot_demo};

/// Counts the bytes allocated and the peak, to bound what decoding allocates.
struct Counting;
static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to `System` unchanged; the counters are only
// statistics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = NOW.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: the caller's obligations for `alloc` are passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        NOW.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's obligations for `dealloc` are passed on.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const PS: u64 = 4096;

fn e(vaddr: u64, pages: u64, flags: PageFlags) -> PagemapEntry {
    PagemapEntry {
        vaddr,
        pages,
        flags,
    }
}

/// A valid image: present, lazy-only and present entries; the last entry has pages, so
/// that any cut of the pagemap leaves the pages file too long.
fn good_entries() -> Vec<PagemapEntry> {
    vec![
        e(0x10000, 2, PageFlags::PRESENT),
        e(0x20000, 1, PageFlags::LAZY),
        e(0x30000, 3, PageFlags::LAZY | PageFlags::PRESENT),
    ]
}

fn write_image(dir: &Path, pages_id: u32, entries: Vec<PagemapEntry>) {
    std::fs::create_dir_all(dir).unwrap();
    let pm = Pagemap { pages_id, entries };
    std::fs::write(dir.join("pagemap-1.img"), pm.encode()).unwrap();
    let bytes = pm.present_bytes(PS as usize).unwrap();
    let pages: Vec<u8> = (0..bytes).map(|i| (i / PS) as u8).collect();
    std::fs::write(dir.join(format!("pages-{pages_id}.img")), pages).unwrap();
}

/// Appends one raw message (length word, then body).
fn message(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// An entry message with the fields given (tag, value).
fn entry_body(fields: &[(u8, u64)]) -> Vec<u8> {
    let mut b = Vec::new();
    for &(tag, v) in fields {
        b.push(tag << 3);
        varint(v, &mut b);
    }
    b
}

/// The head and magics of a pagemap, followed by `entries` raw entry bodies.
fn raw_pagemap(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0x5456_4319u32.to_le_bytes());
    out.extend_from_slice(&0x5608_4025u32.to_le_bytes());
    message(&mut out, &[0x08, 1]);
    for body in entries {
        message(&mut out, body);
    }
    out
}

type Check = fn(&ImageError) -> bool;

/// Makes a FIFO at `path`, replacing what is there.
fn fifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

/// Replaces `path` with a symbolic link to `target`.
fn link(path: &Path, target: &Path) {
    let _ = std::fs::remove_file(path);
    std::os::unix::fs::symlink(target, path).unwrap();
}

/// Moves the file at `path` aside (`<path>.real`) and links `path` to it: the bytes are
/// good, only the link is wrong.
fn link_aside(path: &Path) {
    let real = path.with_extension("img.real");
    std::fs::rename(path, &real).unwrap();
    std::os::unix::fs::symlink(&real, path).unwrap();
}

fn not_regular(e: &ImageError, want: FileKind) -> bool {
    matches!(e, ImageError::NotRegular { kind, .. } if *kind == want)
}

/// How long an open or a command may take on a bad image: no read waits or runs away.
const QUICK: Duration = Duration::from_secs(1);

/// Runs `f` on a thread of its own, giving up after 10 seconds (a hang fails the test
/// instead of hanging it); returns its result and how long it took.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> (T, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(v) => (v, start.elapsed()),
        Err(_) => panic!("{what}: no answer in 10 s"),
    }
}

/// Runs `cmd`, killing it after 10 seconds; returns its output and how long it took.
fn run_bounded(cmd: &mut Command) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?}: no answer in 10 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = start.elapsed();
    (child.wait_with_output().unwrap(), elapsed)
}

fn format_error(err: &ImageError) -> Option<(&FormatError, Option<usize>)> {
    match err {
        ImageError::Format { at, .. } => Some((&at.error, at.entry)),
        _ => None,
    }
}

struct Case {
    name: &'static str,
    /// Breaks the image in `dir` (which holds a good one).
    breaks: fn(&Path),
    /// The file the error must name.
    file: &'static str,
    check: Check,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "wrong image magic",
            breaks: |d| {
                let mut b = std::fs::read(d.join("pagemap-1.img")).unwrap();
                b[0] ^= 0xff;
                std::fs::write(d.join("pagemap-1.img"), b).unwrap();
            },
            file: "pagemap-1.img",
            check: |e| {
                matches!(
                    format_error(e),
                    Some((FormatError::BadImageMagic { .. }, None))
                )
            },
        },
        Case {
            name: "wrong pagemap magic",
            breaks: |d| {
                let mut b = std::fs::read(d.join("pagemap-1.img")).unwrap();
                b[5] ^= 0xff;
                std::fs::write(d.join("pagemap-1.img"), b).unwrap();
            },
            file: "pagemap-1.img",
            check: |e| {
                matches!(
                    format_error(e),
                    Some((FormatError::BadPagemapMagic { .. }, None))
                )
            },
        },
        Case {
            name: "an entry length past the end",
            breaks: |d| {
                let mut b = raw_pagemap(&[entry_body(&[(1, 0x10000), (2, 1)])]);
                b.extend_from_slice(&u32::MAX.to_le_bytes());
                b.extend_from_slice(&[8, 1, 2, 3]);
                std::fs::write(d.join("pagemap-1.img"), b).unwrap();
            },
            file: "pagemap-1.img",
            check: |e| {
                matches!(
                    format_error(e),
                    Some((FormatError::Truncated { .. }, Some(1)))
                )
            },
        },
        Case {
            name: "a page count that overflows",
            breaks: |d| {
                let b = raw_pagemap(&[entry_body(&[
                    (1, 0x10000),
                    (2, 0),
                    (4, 4),
                    (5, u64::MAX / 2),
                ])]);
                std::fs::write(d.join("pagemap-1.img"), b).unwrap();
            },
            file: "pagemap-1.img",
            check: |e| matches!(format_error(e), Some((FormatError::Overflow, Some(0)))),
        },
        Case {
            name: "entries out of order",
            breaks: |d| {
                let b = raw_pagemap(&[
                    entry_body(&[(1, 0x30000), (2, 1)]),
                    entry_body(&[(1, 0x10000), (2, 1)]),
                ]);
                std::fs::write(d.join("pagemap-1.img"), b).unwrap();
            },
            file: "pagemap-1.img",
            check: |e| {
                matches!(
                    format_error(e),
                    Some((FormatError::OutOfOrder { .. }, Some(1)))
                )
            },
        },
        Case {
            name: "overlapping entries",
            breaks: |d| {
                write_image(
                    d,
                    1,
                    vec![
                        e(0x10000, 4, PageFlags::PRESENT),
                        e(0x12000, 1, PageFlags::PRESENT),
                    ],
                )
            },
            file: "pagemap-1.img",
            check: |e| {
                matches!(
                    format_error(e),
                    Some((FormatError::OutOfOrder { prev_end: 0x14000 }, Some(1)))
                )
            },
        },
        Case {
            name: "an unaligned entry",
            breaks: |d| {
                let b = raw_pagemap(&[entry_body(&[(1, 0x10010), (2, 1)])]);
                std::fs::write(d.join("pagemap-1.img"), b).unwrap();
            },
            file: "pagemap-1.img",
            check: |e| matches!(format_error(e), Some((FormatError::Unaligned, Some(0)))),
        },
        Case {
            name: "an entry of no pages",
            breaks: |d| {
                let b = raw_pagemap(&[entry_body(&[(1, 0x10000), (2, 0)])]);
                std::fs::write(d.join("pagemap-1.img"), b).unwrap();
            },
            file: "pagemap-1.img",
            check: |e| matches!(format_error(e), Some((FormatError::NoPages, Some(0)))),
        },
        Case {
            name: "flags that mean nothing",
            breaks: |d| {
                let b = raw_pagemap(&[entry_body(&[(1, 0x10000), (2, 1), (4, 5)])]);
                std::fs::write(d.join("pagemap-1.img"), b).unwrap();
            },
            file: "pagemap-1.img",
            check: |e| {
                matches!(
                    format_error(e),
                    Some((FormatError::BadFlags { flags: 5 }, Some(0)))
                )
            },
        },
        Case {
            name: "a missing required field",
            breaks: |d| {
                let b = raw_pagemap(&[entry_body(&[(2, 1)])]);
                std::fs::write(d.join("pagemap-1.img"), b).unwrap();
            },
            file: "pagemap-1.img",
            check: |e| {
                matches!(
                    format_error(e),
                    Some((FormatError::MissingField { field: "vaddr" }, Some(0)))
                )
            },
        },
        Case {
            name: "a missing pages file",
            breaks: |d| std::fs::remove_file(d.join("pages-1.img")).unwrap(),
            file: "pages-1.img",
            check: |e| matches!(e, ImageError::Io { .. }),
        },
        Case {
            name: "a pages file shorter than the entries need",
            breaks: |d| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("pages-1.img"))
                    .unwrap();
                f.set_len(4 * PS + 100).unwrap();
            },
            file: "pages-1.img",
            check: |e| matches!(e, ImageError::PagesSize { needed, actual, .. } if *needed == 5 * PS && *actual == 4 * PS + 100),
        },
        Case {
            name: "a pages_id that names no file",
            breaks: |d| {
                let pm = Pagemap {
                    pages_id: 9,
                    entries: good_entries(),
                };
                std::fs::write(d.join("pagemap-1.img"), pm.encode()).unwrap();
            },
            file: "pages-9.img",
            check: |e| matches!(e, ImageError::Io { .. }),
        },
        Case {
            name: "a missing parent",
            breaks: |d| {
                write_image(
                    d,
                    1,
                    vec![
                        e(0x10000, 1, PageFlags::PRESENT),
                        e(0x20000, 2, PageFlags::PARENT),
                    ],
                )
            },
            file: "pagemap-1.img",
            check: |e| matches!(e, ImageError::MissingParent { entry, .. } if entry.vaddr == 0x20000),
        },
        Case {
            name: "a parent that is missing its directory",
            breaks: |d| {
                write_image(d, 1, vec![e(0x20000, 2, PageFlags::PARENT)]);
                std::os::unix::fs::symlink("/nonexistent/parent", d.join("parent")).unwrap();
            },
            file: "pagemap-1.img",
            check: |e| matches!(e, ImageError::MissingParent { link: Some(_), .. }),
        },
        Case {
            name: "a parent chain that loops",
            breaks: |d| {
                write_image(d, 1, vec![e(0x20000, 2, PageFlags::PARENT)]);
                std::os::unix::fs::symlink(".", d.join("parent")).unwrap();
            },
            file: "",
            check: |e| matches!(e, ImageError::ParentLoop { .. }),
        },
        Case {
            name: "a pagemap that is a FIFO",
            breaks: |d| fifo(&d.join("pagemap-1.img")),
            file: "pagemap-1.img",
            check: |e| not_regular(e, FileKind::Fifo),
        },
        Case {
            name: "a pagemap that is a link to /dev/zero",
            breaks: |d| link(&d.join("pagemap-1.img"), Path::new("/dev/zero")),
            file: "pagemap-1.img",
            check: |e| matches!(e, ImageError::Symlink { .. }),
        },
        Case {
            name: "a pagemap that is a link to a good pagemap",
            breaks: |d| link_aside(&d.join("pagemap-1.img")),
            file: "pagemap-1.img",
            check: |e| matches!(e, ImageError::Symlink { .. }),
        },
        Case {
            name: "a pagemap that is a directory",
            breaks: |d| {
                std::fs::remove_file(d.join("pagemap-1.img")).unwrap();
                std::fs::create_dir(d.join("pagemap-1.img")).unwrap();
            },
            file: "pagemap-1.img",
            check: |e| not_regular(e, FileKind::Directory),
        },
        Case {
            name: "a pagemap that is a socket",
            breaks: |d| {
                std::fs::remove_file(d.join("pagemap-1.img")).unwrap();
                drop(std::os::unix::net::UnixListener::bind(d.join("pagemap-1.img")).unwrap());
            },
            file: "pagemap-1.img",
            check: |e| not_regular(e, FileKind::Socket),
        },
        Case {
            name: "a sparse 16 GiB pagemap",
            breaks: |d| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("pagemap-1.img"))
                    .unwrap();
                f.set_len(16 << 30).unwrap();
            },
            file: "pagemap-1.img",
            check: |e| matches!(e, ImageError::TooLarge { size, .. } if *size == 16 << 30),
        },
        Case {
            name: "a pagemap one byte over the cap",
            breaks: |d| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("pagemap-1.img"))
                    .unwrap();
                f.set_len(MAX_PAGEMAP_BYTES + 1).unwrap();
            },
            file: "pagemap-1.img",
            check: |e| matches!(e, ImageError::TooLarge { .. }),
        },
        Case {
            name: "a pages file that is a link to a good pages file",
            breaks: |d| link_aside(&d.join("pages-1.img")),
            file: "pages-1.img",
            check: |e| matches!(e, ImageError::Symlink { .. }),
        },
        Case {
            name: "a pages file that is a link to /dev/zero",
            breaks: |d| link(&d.join("pages-1.img"), Path::new("/dev/zero")),
            file: "pages-1.img",
            check: |e| matches!(e, ImageError::Symlink { .. }),
        },
        Case {
            name: "a pages file that is a FIFO",
            breaks: |d| fifo(&d.join("pages-1.img")),
            file: "pages-1.img",
            check: |e| not_regular(e, FileKind::Fifo),
        },
        Case {
            name: "a parent link to a FIFO",
            breaks: |d| {
                write_image(d, 1, vec![e(0x20000, 2, PageFlags::PARENT)]);
                fifo(&d.join("fifo"));
                std::os::unix::fs::symlink("fifo", d.join("parent")).unwrap();
            },
            file: "pagemap-1.img",
            check: |e| matches!(e, ImageError::MissingParent { link: Some(_), .. }),
        },
    ]
}

#[test]
fn every_bad_image_is_a_typed_error_naming_the_file() {
    for case in cases() {
        let dir = TempDir::new("bad");
        write_image(dir.path(), 1, good_entries());
        (case.breaks)(dir.path());
        let path = dir.path().to_path_buf();
        let (r, took) = bounded(case.name, move || Image::open(path).map(|_| ()));
        let err = match r {
            Ok(()) => panic!("{}: opened", case.name),
            Err(e) => e,
        };
        assert!(took < QUICK, "{}: took {took:?}", case.name);
        let msg = err.to_string();
        assert!((case.check)(&err), "{}: {err:?}", case.name);
        assert!(msg.contains(case.file), "{}: {msg}", case.name);
        if let Some((_, Some(i))) = format_error(&err) {
            assert!(msg.contains(&format!("entry {i}")), "{}: {msg}", case.name);
        }
        assert!(!msg.contains('\n'), "{}: {msg}", case.name);
    }
}

#[test]
fn the_commands_answer_bad_images_with_one_line() {
    let demo = snapshot_demo();
    for case in cases() {
        let dir = TempDir::new("bad-cli");
        write_image(dir.path(), 1, good_entries());
        (case.breaks)(dir.path());
        let d = dir.path().to_str().unwrap();
        for args in [
            vec!["inspect", d],
            vec![
                "extract",
                d,
                "--vaddr",
                "10000",
                "--pages",
                "2",
                "--out",
                "/dev/null",
            ],
        ] {
            let (out, took) = run_bounded(Command::new(&demo).args(&args));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(took < QUICK, "{}: {args:?} took {took:?}", case.name);
            assert_eq!(out.status.code(), Some(1), "{}: {args:?}: {err}", case.name);
            assert_eq!(err.lines().count(), 1, "{}: {err}", case.name);
            assert!(err.contains(case.file), "{}: {err}", case.name);
            assert!(!err.contains("panicked"), "{}: {err}", case.name);
        }
    }
}

#[test]
fn a_pagemap_cut_at_any_byte_is_refused() {
    let dir = TempDir::new("cut");
    write_image(dir.path(), 1, good_entries());
    let full = std::fs::read(dir.path().join("pagemap-1.img")).unwrap();
    assert!(Image::open(dir.path()).is_ok());
    for len in 0..full.len() {
        std::fs::write(dir.path().join("pagemap-1.img"), &full[..len]).unwrap();
        let err = Image::open(dir.path()).expect_err(&format!("cut at {len} opened"));
        assert!(
            matches!(
                err,
                ImageError::Format { .. } | ImageError::PagesSize { .. }
            ),
            "cut at {len}: {err}"
        );
    }
}

#[test]
fn decoding_allocates_no_more_than_the_input_justifies() {
    // A length word that claims 4 GiB, entries that claim 2^60 pages: none of it is
    // allocated.
    let mut b = raw_pagemap(&[entry_body(&[(1, 0x10000), (2, 0), (4, 2), (5, 1 << 40)])]);
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    let before = NOW.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let _ = Pagemap::decode(&b, 4096);
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert!(peak < 4096, "decoding {} bytes allocated {peak}", b.len());
    // Many small entries: memory grows with the input, not faster.
    let entries: Vec<Vec<u8>> = (0..10_000u64)
        .map(|i| entry_body(&[(1, 0x10000 + i * 0x2000), (2, 1)]))
        .collect();
    let b = raw_pagemap(&entries);
    let before = NOW.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let pm = Pagemap::decode(&b, 4096).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert_eq!(pm.entries.len(), 10_000);
    assert!(
        peak <= 8 * b.len(),
        "decoding {} bytes allocated {peak}",
        b.len()
    );
}
