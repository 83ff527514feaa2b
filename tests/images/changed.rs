//! Pages files truncated or rewritten under an open image: typed errors or the new
//! bytes, never a crash, and nothing committed by a flatten that failed.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use page_pipe::image::{
    FlattenOptions, Image, ImageError, ImageWriter, PageFlags, PagemapEntry, RestoreOptions,
};
use page_pipe_tests::{TempDir, patterned};

use super::{BASE, ps};

/// A chain of two images over `pages` pages: the parent holds them all, the child every
/// 8th. Returns the child's directory and the bytes it restores to.
fn two_images(root: &std::path::Path, pages: usize) -> (std::path::PathBuf, Vec<u8>) {
    let base = patterned(pages, 60);
    let (d1, d2) = (root.join("1"), root.join("2"));
    let mut w = ImageWriter::create(&d1, 1).unwrap().with_sync(false);
    let e = |p: usize, n: usize, flags| PagemapEntry {
        vaddr: BASE + (p * ps()) as u64,
        pages: n as u64,
        flags,
    };
    w.push_bytes(e(0, pages, PageFlags::PRESENT), &base)
        .unwrap();
    w.finish().unwrap();
    let mut w = ImageWriter::create(&d2, 1)
        .unwrap()
        .with_sync(false)
        .with_parent(&d1)
        .unwrap();
    let mut want = base.to_vec();
    let new = patterned(1, 61);
    for p in 0..pages {
        if p % 8 == 0 {
            w.push_bytes(e(p, 1, PageFlags::PRESENT), &new).unwrap();
            want[p * ps()..][..ps()].copy_from_slice(&new);
        } else {
            w.push(e(p, 1, PageFlags::PARENT)).unwrap();
        }
    }
    w.finish().unwrap();
    (d2, want)
}

/// The parent's pages file cut in half after the chain was opened: the eager restore,
/// flatten and diff all stop with `ShortRead` naming it, and the failed flatten leaves
/// nothing in its directory.
#[test]
fn a_pages_file_truncated_while_open_is_a_short_read_everywhere() {
    let root = TempDir::new("truncated");
    let pages = 64;
    let (d2, want) = two_images(root.path(), pages);
    let img = Image::open(&d2).unwrap();
    let mut back = vec![0u8; pages * ps()];
    img.read(BASE, &mut back).unwrap();
    assert!(back == want);
    let parent_pages = img.parent().unwrap().pages_path().to_path_buf();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&parent_pages)
        .unwrap()
        .set_len((pages / 2 * ps()) as u64)
        .unwrap();
    let short =
        |e: &ImageError| matches!(e, ImageError::ShortRead { path, .. } if *path == parent_pages);
    for threads in [1, 2] {
        let opts = RestoreOptions {
            threads: NonZeroUsize::new(threads),
            ..RestoreOptions::default()
        };
        let err = img.restore(BASE, &mut back, &opts).unwrap_err();
        assert!(short(&err), "{threads} threads: {err:?}");
    }
    let flat = root.path().join("flat");
    let err = img
        .flatten(
            &flat,
            &FlattenOptions {
                sync: false,
                progress: None,
            },
        )
        .unwrap_err();
    assert!(short(&err), "{err:?}");
    let left: Vec<_> = std::fs::read_dir(&flat)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "a failed flatten left {left:?}");
    let err = img.diff(&img).unwrap_err();
    assert!(short(&err), "{err:?}");
}

/// A pages file truncated, grown back and rewritten over and over while restores run on
/// two threads: each restore ends with bytes or with `ShortRead` naming the file, never
/// a crash; once the file is whole again, the restore is right.
#[test]
fn a_pages_file_changing_during_restores_gives_bytes_or_a_short_read() {
    let root = TempDir::new("changing");
    let pages = 4096;
    let (d2, want) = two_images(root.path(), pages);
    let img = Image::open(&d2).unwrap();
    let parent_pages = img.parent().unwrap().pages_path().to_path_buf();
    let full = (pages * ps()) as u64;
    let original = std::fs::read(&parent_pages).unwrap();
    let stop = AtomicBool::new(false);
    let (mut ok, mut short) = (0, 0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&parent_pages)
                .unwrap();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.set_len(full / 3 * (round % 3)).unwrap();
                f.set_len(full).unwrap();
                use std::os::unix::fs::FileExt;
                f.write_all_at(&[round as u8; 4096], round * 4096 % full)
                    .unwrap();
                // Whole (if changed) for a while, so that some restores finish.
                std::thread::sleep(Duration::from_millis(5));
                round += 1;
            }
        });
        let opts = RestoreOptions {
            threads: NonZeroUsize::new(2),
            ..RestoreOptions::default()
        };
        let mut back = vec![0u8; pages * ps()];
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(500) {
            match img.restore(BASE, &mut back, &opts) {
                Ok(_) => ok += 1,
                Err(ImageError::ShortRead { path, offset }) => {
                    assert_eq!(path, parent_pages);
                    assert!(offset < full, "{offset}");
                    short += 1;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    eprintln!("{ok} restores gave bytes, {short} a ShortRead");
    assert!(ok + short > 0);
    std::fs::write(&parent_pages, &original).unwrap();
    let mut back = vec![0u8; pages * ps()];
    img.read(BASE, &mut back).unwrap();
    assert!(back == want, "the restore after the file was mended");
}
