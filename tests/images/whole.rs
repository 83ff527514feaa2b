//! Images are memory: kept private and whole (DESIGN 7.5). Each test here failed on the
//! writer and reader of 02ab1d2.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use page_pipe::image::{Image, ImageError, ImageWriter, PageFlags, PagemapEntry};
use page_pipe_tests::{TempDir, alone, assert_restores, patterned};

use super::{BASE, ps};

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn present(pages: u64) -> PagemapEntry {
    PagemapEntry {
        vaddr: BASE,
        pages,
        flags: PageFlags::PRESENT,
    }
}

/// Writes a full image of `mem` (at `BASE`) into `dir`.
fn write_full(dir: &Path, mem: &[u8]) {
    let mut w = ImageWriter::create(dir, 1).unwrap();
    w.push_bytes(present((mem.len() / ps()) as u64), mem)
        .unwrap();
    w.finish().unwrap();
}

#[test]
fn a_symlink_at_an_image_name_is_replaced_not_followed() {
    let root = TempDir::new("planted");
    let dir = root.path().join("img");
    std::fs::create_dir(&dir).unwrap();
    let victim = root.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let nowhere = root.path().join("made-through-a-dangling-link");
    std::os::unix::fs::symlink(&victim, dir.join("pages-1.img")).unwrap();
    std::os::unix::fs::symlink(&nowhere, dir.join("pagemap-1.img")).unwrap();
    let mem = patterned(8, 40);
    write_full(&dir, &mem);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(
        std::fs::symlink_metadata(&nowhere).is_err(),
        "the writer created a file through a dangling link"
    );
    for name in ["pages-1.img", "pagemap-1.img"] {
        let m = std::fs::symlink_metadata(dir.join(name)).unwrap();
        assert!(m.is_file(), "{name} is still a link");
    }
    assert_restores(&dir, BASE, &mem);
}

#[test]
fn image_files_are_0600_and_new_directories_0700() {
    if !alone("whole::image_files_are_0600_and_new_directories_0700") {
        return;
    }
    // A common umask, which leaves group and others their read bits.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let root = TempDir::new("modes");
    let dir = root.path().join("a").join("b");
    let mut w = ImageWriter::create(&dir, 1).unwrap();
    let mem = patterned(2, 41);
    w.push_bytes(present(2), &mem).unwrap();
    w.push(PagemapEntry {
        vaddr: BASE + 2 * ps() as u64,
        pages: 1,
        flags: PageFlags::LAZY,
    })
    .unwrap();
    w.finish().unwrap();
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&root.path().join("a")), 0o700);
    assert_eq!(mode(&dir), 0o700);
    for name in ["pages-1.img", "pagemap-1.img"] {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
    }
}

#[test]
fn a_full_image_never_inherits_an_old_parent_link() {
    let root = TempDir::new("stale-parent");
    let (d1, d2, d3) = (
        root.path().join("1"),
        root.path().join("2"),
        root.path().join("3"),
    );
    let mem = patterned(4, 42);
    write_full(&d1, &mem);
    write_full(&d3, &mem);
    let mut w = ImageWriter::create(&d2, 1)
        .unwrap()
        .with_parent(&d1)
        .unwrap();
    w.push(PagemapEntry {
        vaddr: BASE,
        pages: 4,
        flags: PageFlags::PARENT,
    })
    .unwrap();
    w.finish().unwrap();
    assert_eq!(Image::open(&d2).unwrap().depth(), 2);
    // An incremental image on another parent replaces the link.
    let mut w = ImageWriter::create(&d2, 1)
        .unwrap()
        .with_parent(&d3)
        .unwrap();
    w.push(PagemapEntry {
        vaddr: BASE,
        pages: 4,
        flags: PageFlags::PARENT,
    })
    .unwrap();
    w.finish().unwrap();
    assert_eq!(
        std::fs::read_link(d2.join("parent")).unwrap(),
        Path::new("../3")
    );
    // A full image in the same directory removes it.
    let other = patterned(4, 43);
    write_full(&d2, &other);
    assert!(
        std::fs::symlink_metadata(d2.join("parent")).is_err(),
        "the full image kept the old parent link"
    );
    let img = Image::open(&d2).unwrap();
    assert_eq!(img.depth(), 1);
    assert_restores(&d2, BASE, &other);
}

#[test]
fn nothing_appears_before_finish_and_a_dropped_writer_leaves_nothing() {
    let root = TempDir::new("dropped");
    let dir = root.path().join("img");
    let mem = patterned(16, 44);
    let mut w = ImageWriter::create(&dir, 1).unwrap();
    w.push_bytes(present(16), &mem).unwrap();
    assert!(
        std::fs::symlink_metadata(dir.join("pagemap-1.img")).is_err(),
        "the pagemap is under its name before finish"
    );
    drop(w);
    assert_eq!(names(&dir), Vec::<String>::new());
}

#[test]
fn an_image_being_replaced_stays_whole_until_the_commit() {
    let root = TempDir::new("replace");
    let dir = root.path().join("img");
    let old = patterned(16, 45);
    write_full(&dir, &old);
    let new = patterned(16, 46);
    // A writer over the old image, dropped: the old image is untouched.
    let mut w = ImageWriter::create(&dir, 1).unwrap();
    w.push_bytes(present(16), &new).unwrap();
    assert_restores(&dir, BASE, &old);
    drop(w);
    assert_restores(&dir, BASE, &old);
    assert_eq!(names(&dir), ["pagemap-1.img", "pages-1.img"]);
    // An image open while the directory is rewritten keeps reading its own files.
    let img = Image::open(&dir).unwrap();
    write_full(&dir, &new);
    let mut back = vec![0u8; old.len()];
    img.read(BASE, &mut back).unwrap();
    assert!(back == old[..], "the open image changed under its reader");
    assert_restores(&dir, BASE, &new);
    assert_eq!(names(&dir), ["pagemap-1.img", "pages-1.img"]);
}

/// `EFBIG` under `RLIMIT_FSIZE` part way through the pages: later calls and `finish`
/// return that first error, and nothing is committed.
#[test]
fn a_failed_writer_refuses_to_finish_with_its_first_error() {
    if !alone("whole::a_failed_writer_refuses_to_finish_with_its_first_error") {
        return;
    }
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions; without it
    // the kernel kills the process at the limit instead of failing the write.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let lim = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `lim` is a valid rlimit for the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) }, 0);
    let root = TempDir::new("efbig-writer");
    let dir = root.path().join("img");
    let pages = (2 << 20) / ps();
    let mem = patterned(pages, 47);
    let mut w = ImageWriter::create(&dir, 1).unwrap();
    let errno = |e: &ImageError| match e {
        ImageError::Io { error, path, .. } => {
            assert!(path.ends_with("pages-1.img"), "{e}");
            error.raw_os_error()
        }
        e => panic!("{e}"),
    };
    let half = pages / 2;
    let first = w
        .push_bytes(present(half as u64), &mem[..half * ps()])
        .and_then(|()| {
            let e = PagemapEntry {
                vaddr: BASE + (half * ps()) as u64,
                ..present((pages - half) as u64)
            };
            w.push_bytes(e, &mem[half * ps()..])
        })
        .unwrap_err();
    assert_eq!(errno(&first), Some(libc::EFBIG), "{first}");
    let later = w
        .push(PagemapEntry {
            vaddr: BASE + 4 * (pages * ps()) as u64,
            pages: 1,
            flags: PageFlags::PARENT,
        })
        .unwrap_err();
    assert_eq!(later.to_string(), first.to_string());
    let finish = w.finish().unwrap_err();
    assert_eq!(errno(&finish), Some(libc::EFBIG), "{finish}");
    assert_eq!(finish.to_string(), first.to_string());
    assert_eq!(names(&dir), Vec::<String>::new());
}

/// An entry refused (out of order) also fails the writer: an image missing entries its
/// writer was given is not committed.
#[test]
fn a_refused_entry_fails_the_writer() {
    let root = TempDir::new("order");
    let dir = root.path().join("img");
    let mem = patterned(4, 48);
    let mut w = ImageWriter::create(&dir, 1).unwrap();
    w.push_bytes(present(4), &mem).unwrap();
    let err = w.push_bytes(present(4), &mem).unwrap_err();
    assert!(matches!(err, ImageError::Order { .. }), "{err}");
    let finish = w.finish().unwrap_err();
    assert!(matches!(finish, ImageError::Order { .. }), "{finish}");
    assert_eq!(names(&dir), Vec::<String>::new());
}

/// The pages file of an open image truncated, then rewritten, by another handle: reads
/// return an error naming the file and offset, then the new bytes. (The mapping reader
/// of 02ab1d2 died of `SIGBUS` here, so this runs in a process of its own.)
#[test]
fn a_pages_file_truncated_while_open_is_an_error_not_a_crash() {
    if !alone("whole::a_pages_file_truncated_while_open_is_an_error_not_a_crash") {
        return;
    }
    let root = TempDir::new("truncated");
    let dir = root.path().join("img");
    let mem = patterned(64, 49);
    write_full(&dir, &mem);
    let img = Image::open(&dir).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("pages-1.img"))
        .unwrap();
    f.set_len(16 * ps() as u64).unwrap();
    let mut back = vec![0u8; mem.len()];
    let err = img.read(BASE, &mut back).unwrap_err();
    match &err {
        ImageError::ShortRead { path, offset } => {
            assert!(path.ends_with("pages-1.img"), "{err}");
            assert_eq!(*offset, 16 * ps() as u64, "{err}");
        }
        e => panic!("{e}"),
    }
    assert!(err.to_string().contains("pages-1.img"), "{err}");
    let mut page = vec![0u8; ps()];
    assert!(matches!(
        img.read_page(BASE + 20 * ps() as u64, &mut page),
        Err(ImageError::ShortRead { .. })
    ));
    // Rewritten: the new bytes.
    f.write_all_at(&vec![0xab; 16 * ps()], 0).unwrap();
    img.read(BASE, &mut back[..16 * ps()]).unwrap();
    assert!(back[..16 * ps()].iter().all(|&b| b == 0xab));
}

/// One directory holds the images of several processes (the writer's docs say so, as
/// CRIU's directories do): writing `pagemap-2.img` must not replace the pages file that
/// `pagemap-1.img` reads, or image 1 silently reads image 2's bytes.
#[test]
fn a_second_image_in_a_directory_leaves_the_first_whole() {
    let root = TempDir::new("two-ids");
    let dir = root.path().join("img");
    let first = patterned(4, 50);
    write_full(&dir, &first);
    let second = patterned(4, 51);
    let r = ImageWriter::create(&dir, 2).and_then(|mut w| {
        w.push_bytes(present(4), &second)?;
        w.finish()
    });
    let mut back = vec![0u8; first.len()];
    Image::open_id(&dir, 1)
        .unwrap()
        .read(BASE, &mut back)
        .unwrap();
    assert!(
        back == first[..],
        "image 1 reads other bytes after image 2 was written ({r:?})"
    );
    if r.is_ok() {
        let mut back = vec![0u8; second.len()];
        Image::open_id(&dir, 2)
            .unwrap()
            .read(BASE, &mut back)
            .unwrap();
        assert!(back == second[..], "image 2 reads other bytes");
    }
}

/// A reader opening an image while another process commits a new one over it gets the
/// old image or the new one, never the old pagemap with the new pages file. The two
/// images here hold their pages at different addresses but the same number of them, so
/// the pages file's size cannot tell them apart.
#[test]
fn an_image_opened_during_a_commit_is_never_torn() {
    let root = TempDir::new("torn");
    let dir = root.path().join("img");
    let ps = ps();
    let layouts = [(BASE, 0xa1u8), (BASE + 8 * ps as u64, 0xb2u8)];
    let write = |(vaddr, byte): (u64, u8)| {
        let mut w = ImageWriter::create(&dir, 1).unwrap().with_sync(false);
        let e = PagemapEntry {
            vaddr,
            pages: 2,
            flags: PageFlags::PRESENT,
        };
        w.push_bytes(e, &vec![byte; 2 * ps]).unwrap();
        w.finish().unwrap();
    };
    write(layouts[0]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut opened, mut torn) = (0u64, 0u64);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                write(layouts[i % 2]);
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
        });
        let start = std::time::Instant::now();
        let mut back = vec![0u8; 2 * ps];
        while start.elapsed() < std::time::Duration::from_secs(2) {
            // Between the commits' steps there may be no image at all: that is allowed.
            let Ok(img) = Image::open(&dir) else { continue };
            let e = img.entries()[0];
            if img.read(e.vaddr, &mut back).is_err() {
                continue;
            }
            opened += 1;
            let want = layouts.iter().find(|l| l.0 == e.vaddr).unwrap().1;
            if back.iter().any(|&b| b != want) {
                torn += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert!(opened > 0, "no image could be opened while commits ran");
    assert_eq!(
        torn, 0,
        "{torn} of {opened} opens paired a pagemap with another pages file"
    );
}

/// A directory (not a link) planted at `parent`: the writer cannot replace or remove it,
/// and must find out before it takes the old image apart, so that a failed `finish`
/// leaves the old image whole.
#[test]
fn a_planted_parent_directory_fails_the_commit_before_the_old_image_goes() {
    let root = TempDir::new("planted-parent");
    let dir = root.path().join("img");
    let old = patterned(4, 52);
    write_full(&dir, &old);
    std::fs::create_dir(dir.join("parent")).unwrap();
    std::fs::write(dir.join("parent").join("keep"), b"x").unwrap();
    let files = |d: &Path| ["pagemap-1.img", "pages-1.img"].map(|n| std::fs::read(d.join(n)).ok());
    let before = files(&dir);
    let new = patterned(4, 53);
    let parent_dir = root.path().join("base");
    write_full(&parent_dir, &new);
    for incremental in [false, true] {
        let mut w = ImageWriter::create(&dir, 1).unwrap();
        if incremental {
            w = w.with_parent(&parent_dir).unwrap();
        }
        w.push_bytes(present(4), &new).unwrap();
        match w.finish() {
            // (The reader follows the planted directory as the parent, so the images are
            // compared by their files.)
            Ok(_) => assert!(
                files(&dir) == files(&parent_dir),
                "incremental {incremental}"
            ),
            Err(e) => assert!(files(&dir) == before, "incremental {incremental}: {e}"),
        }
    }
}
