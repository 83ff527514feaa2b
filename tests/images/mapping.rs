//! Restoring by mapping: random chains map to the bytes the model says, chains map as
//! layers, and the mapping count is checked before anything is mapped.

use memmap2::{MmapMut, MmapOptions};
use page_pipe::image::{
    Image, ImageError, ImageWriter, MAP_COUNT_RESERVE, MapOptions, Page, PageFlags, PagemapEntry,
    RestoreOptions, SegmentKind, max_map_count,
};
use page_pipe_tests::TempDir;
use proptest::prelude::*;

use super::restore_chains::{chain, content, model, resolve, write_chain};
use super::{BASE, ps};

fn at(p: usize) -> u64 {
    BASE + (p * ps()) as u64
}

/// `pages` pages of fresh anonymous memory filled with `byte`.
fn memory(pages: usize, byte: u8) -> MmapMut {
    let mut m = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
    m.fill(byte);
    m
}

/// Maps `img` from `vaddr` over `mem`.
fn map(
    img: &Image,
    vaddr: u64,
    mem: &mut MmapMut,
    opts: &MapOptions,
) -> Result<page_pipe::image::MapReport, ImageError> {
    // SAFETY:
    // - `mem` is this test's own mapping; no reference into it is alive across the call
    //   (it is read again only through `mem` afterwards);
    // - the image files are this test's, and nothing changes them while `mem` lives.
    unsafe { img.map_into(vaddr, mem.as_mut_ptr(), mem.len(), opts) }
}

proptest! {
    #![proptest_config(page_pipe_tests::proptest_config(48, "images"))]

    /// A random chain mapped over memory holds what the model says, page for page: the
    /// chain's pages, and holes kept or zeroed as asked; one mapping per mapped segment of
    /// the plan; a strict map refuses what a strict restore refuses, touching nothing.
    #[test]
    fn random_chains_map_to_the_bytes_the_model_says(c in chain(), zero_holes in any::<bool>()) {
        let root = TempDir::new("map-prop");
        let dirs = write_chain(root.path(), &c);
        let img = Image::open(dirs.last().unwrap()).unwrap();
        let pages = c.levels[0].len() + 1;
        let (expect, report, refused) = model(&c, 0, pages);
        let mut mem = memory(pages, 0x77);
        let opts = MapOptions { zero_holes, ..MapOptions::default() };
        let r = map(&img, at(0), &mut mem, &opts).unwrap();
        prop_assert_eq!(r.report, report);
        let plan = img.plan(at(0), (pages * ps()) as u64, &RestoreOptions::default()).unwrap();
        let mapped = plan.segments.iter().filter(|s| zero_holes || matches!(s.kind, SegmentKind::Pages { .. })).count();
        prop_assert_eq!(r.mappings, mapped);
        for p in 0..pages {
            let got = &mem[p * ps()..][..ps()];
            let want = &expect[p * ps()..][..ps()];
            match resolve(&c, p).0 {
                Page::Data { .. } => prop_assert!(got == want, "page {}", p),
                _ if zero_holes => prop_assert!(got.iter().all(|&b| b == 0), "hole {} not zeroed", p),
                _ => prop_assert!(got.iter().all(|&b| b == 0x77), "hole {} changed", p),
            }
        }
        // Writes go to the memory, never to the files.
        mem.fill(0x11);
        let mut back = vec![0u8; pages * ps()];
        img.read(at(0), &mut back).unwrap();
        prop_assert!(back == expect, "a write reached a pages file");

        let mut fresh = memory(pages, 0x55);
        let strict = MapOptions { strict: true, ..opts };
        match (map(&img, at(0), &mut fresh, &strict), refused) {
            (Ok(_), None) => {}
            (Err(ImageError::NotInImage { vaddr, lazy, .. }), Some((p, l))) => {
                prop_assert_eq!((vaddr, lazy), (at(p), l));
                prop_assert!(fresh.iter().all(|&b| b == 0x55), "a refused map touched memory");
            }
            (r, want) => prop_assert!(false, "strict: {:?}, model refuses {:?}", r, want),
        }
    }
}

/// A chain of three images maps as layers: each page from the nearest image that holds
/// it, parents' runs mapped from the parents' files, one mapping per run contiguous in
/// memory and in one file.
#[test]
fn a_chain_maps_with_its_parents() {
    let root = TempDir::new("map-layers");
    let dirs: Vec<_> = (0..3).map(|l| root.path().join(l.to_string())).collect();
    let e = |p: usize, pages: u64, flags| PagemapEntry {
        vaddr: at(p),
        pages,
        flags,
    };
    let bytes = |l: usize, pages: std::ops::Range<usize>| -> Vec<u8> {
        pages.flat_map(|p| content(l, p)).collect()
    };
    // Level 0: pages 0..8. Level 1: 2..4 new, rest in 0. Level 2: 5 new, rest in 1.
    let mut w = ImageWriter::create(&dirs[0], 1).unwrap().with_sync(false);
    w.push_bytes(e(0, 8, PageFlags::PRESENT), &bytes(0, 0..8))
        .unwrap();
    w.finish().unwrap();
    let mut w = ImageWriter::create(&dirs[1], 1)
        .unwrap()
        .with_sync(false)
        .with_parent(&dirs[0])
        .unwrap();
    w.push(e(0, 2, PageFlags::PARENT)).unwrap();
    w.push_bytes(e(2, 2, PageFlags::PRESENT), &bytes(1, 2..4))
        .unwrap();
    w.push(e(4, 4, PageFlags::PARENT)).unwrap();
    w.finish().unwrap();
    let mut w = ImageWriter::create(&dirs[2], 1)
        .unwrap()
        .with_sync(false)
        .with_parent(&dirs[1])
        .unwrap();
    w.push(e(0, 5, PageFlags::PARENT)).unwrap();
    w.push_bytes(e(5, 1, PageFlags::PRESENT), &bytes(2, 5..6))
        .unwrap();
    w.push(e(6, 2, PageFlags::PARENT)).unwrap();
    w.finish().unwrap();

    let img = Image::open(&dirs[2]).unwrap();
    let mut mem = memory(8, 0x77);
    let r = map(&img, at(0), &mut mem, &MapOptions::default()).unwrap();
    // Runs: 0..2 from 0, 2..4 from 1, 4..5 from 0, 5 from 2, 6..8 from 0.
    assert_eq!(r.mappings, 5);
    assert_eq!((r.report.present, r.report.from_parents), (1, 7));
    let want = [
        bytes(0, 0..2),
        bytes(1, 2..4),
        bytes(0, 4..5),
        bytes(2, 5..6),
        bytes(0, 6..8),
    ]
    .concat();
    assert!(mem[..] == want[..]);
    // A range that starts and ends inside runs.
    let mut part = memory(3, 0);
    let r = map(&img, at(3), &mut part, &MapOptions::default()).unwrap();
    assert_eq!(r.mappings, 3);
    assert!(part[..] == want[3 * ps()..6 * ps()]);
}

/// A plan that needs more mappings than allowed is refused before anything is mapped,
/// saying how many it needs and advising to flatten or restore eagerly.
#[test]
fn too_many_mappings_are_refused_before_anything_is_mapped() {
    let root = TempDir::new("map-limit");
    let mut w = ImageWriter::create(root.path(), 1)
        .unwrap()
        .with_sync(false);
    // Pages 0, 2, 4, 6: four mappings, three holes kept between them, two ends.
    for p in [0, 2, 4, 6] {
        w.push_bytes(
            PagemapEntry {
                vaddr: at(p),
                pages: 1,
                flags: PageFlags::PRESENT,
            },
            &content(0, p),
        )
        .unwrap();
    }
    w.finish().unwrap();
    let img = Image::open(root.path()).unwrap();
    let mut mem = memory(7, 0x77);
    let tight = MapOptions {
        max_mappings: Some(8),
        ..MapOptions::default()
    };
    let err = map(&img, at(0), &mut mem, &tight).unwrap_err();
    match &err {
        ImageError::TooManyMappings {
            needed: 9,
            available: 8,
            limit: 8,
        } => {}
        e => panic!("{e:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("flatten") && text.contains("eagerly"),
        "{text}"
    );
    assert!(mem.iter().all(|&b| b == 0x77), "something was mapped");
    let enough = MapOptions {
        max_mappings: Some(9),
        ..MapOptions::default()
    };
    let r = map(&img, at(0), &mut mem, &enough).unwrap();
    assert_eq!(r.mappings, 4);
}

/// With the kernel's own limit: an image of scattered lazy pages, their holes zeroed,
/// needs two mappings a page, and one more than `vm.max_map_count` allows is refused,
/// naming the limit read from `/proc/sys/vm/max_map_count`.
#[test]
fn the_real_map_count_limit_is_read_and_respected() {
    let text = std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap();
    let limit: usize = text.trim().parse().unwrap();
    assert_eq!(max_map_count().unwrap(), limit);
    if limit > 1 << 20 {
        eprintln!(
            "SKIPPED the_real_map_count_limit_is_read_and_respected: vm.max_map_count is {limit}, too many entries to write in a test"
        );
        return;
    }
    // Lazy pages with a hole after each: with the holes zeroed, each is two segments.
    let entries = limit / 2 + 1;
    let root = TempDir::new("map-real-limit");
    let mut w = ImageWriter::create(root.path(), 1)
        .unwrap()
        .with_sync(false);
    for i in 0..entries {
        w.push(PagemapEntry {
            vaddr: at(2 * i),
            pages: 1,
            flags: PageFlags::LAZY,
        })
        .unwrap();
    }
    w.finish().unwrap();
    let img = Image::open(root.path()).unwrap();
    // Address space only: none of it is touched.
    let mut mem = MmapOptions::new()
        .len(2 * entries * ps())
        .map_anon()
        .unwrap();
    mem[0] = 0x77;
    let opts = MapOptions {
        zero_holes: true,
        ..MapOptions::default()
    };
    match map(&img, at(0), &mut mem, &opts).unwrap_err() {
        ImageError::TooManyMappings {
            needed,
            available,
            limit: l,
        } => {
            assert_eq!(l, limit);
            // A lazy segment and a zero one per entry, and two ends.
            assert_eq!(needed, 2 * entries + 2);
            assert!(available <= limit - MAP_COUNT_RESERVE, "{available}");
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(mem[0], 0x77, "something was mapped");
    // Left as they are, the holes need no mapping at all.
    let r = map(&img, at(0), &mut mem, &MapOptions::default()).unwrap();
    assert_eq!((r.mappings, r.report.lazy as usize), (0, entries));
}

/// Destination memory that is not page-aligned, a range that is not whole pages, and a
/// pages file truncated before the call are errors, and nothing is mapped.
#[test]
fn bad_destinations_and_short_files_map_nothing() {
    let root = TempDir::new("map-bad");
    let mut w = ImageWriter::create(root.path(), 1)
        .unwrap()
        .with_sync(false);
    w.push_bytes(
        PagemapEntry {
            vaddr: at(0),
            pages: 2,
            flags: PageFlags::PRESENT,
        },
        &[content(0, 0), content(0, 1)].concat(),
    )
    .unwrap();
    w.finish().unwrap();
    let img = Image::open(root.path()).unwrap();
    let mut mem = memory(3, 0x77);
    let opts = MapOptions::default();
    // SAFETY: as in `map`: `mem` is ours and the files are unchanged; the call is
    // refused before it maps anything.
    let err = unsafe { img.map_into(at(0), mem.as_mut_ptr().add(1), ps(), &opts) }.unwrap_err();
    assert!(
        matches!(err, ImageError::BadDestination { len, .. } if len == ps()),
        "{err:?}"
    );
    // SAFETY: as above.
    let err = unsafe { img.map_into(at(0), mem.as_mut_ptr(), ps() + 1, &opts) }.unwrap_err();
    assert!(matches!(err, ImageError::BadRange { .. }), "{err:?}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(img.pages_path())
        .unwrap()
        .set_len(ps() as u64)
        .unwrap();
    let err = map(&img, at(0), &mut mem, &opts).unwrap_err();
    match &err {
        ImageError::ShortRead { path, offset } => {
            assert_eq!(path, img.pages_path());
            assert_eq!(*offset, ps() as u64);
        }
        e => panic!("{e:?}"),
    }
    assert!(mem.iter().all(|&b| b == 0x77), "something was mapped");
}
