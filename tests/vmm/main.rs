//! Guest memory (the `vm-memory` feature) end to end: snapshots and restores of random
//! region layouts with gaps against a model of the memory, pages in gaps refused before
//! anything is written, pages the image lacks (zeros, left alone in fresh memory, refused
//! when strict), plans from bitmaps and dirty logs against a per-page reference,
//! regions that break a rule, the CRIU fixture restored into guest memory, and the
//! receiving side (`GuestWriter`).

use std::collections::BTreeSet;
use std::io::Write;
use std::num::NonZeroUsize;
use std::path::Path;

use page_pipe::image::{Image, ImageError, ImageWriter, PageFlags, PagemapEntry};
use page_pipe::snapshot::{Drain, SnapshotOptions, Span, snapshot};
use page_pipe::vm::{self, Access, DirtySet, GuestRestoreOptions, GuestWriter, ImageOp, VmError};
use page_pipe::{BufFlags, DumpErrorKind, HoleFlags, Source};
use page_pipe_tests::{TempDir, alone, fill_pattern, fixtures, open_fds, proptest_config};
use proptest::prelude::*;
use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

fn ps() -> usize {
    page_pipe_sys::page_size().get()
}

/// Regions as `(guest address, bytes)`, in address order.
type Layout = Vec<(u64, usize)>;

/// 1 to 4 regions of 1 to 24 pages, with gaps of 0 (adjacent) to 5 pages between them.
fn layout() -> impl Strategy<Value = Layout> {
    (
        0u64..8,
        proptest::collection::vec((1usize..24, 0u64..6), 1..=4),
    )
        .prop_map(|(start, regions)| {
            let ps = ps() as u64;
            let mut at = start * ps;
            let mut out = Vec::new();
            for (pages, gap) in regions {
                out.push((at, pages * ps as usize));
                at += pages as u64 * ps + gap * ps;
            }
            out
        })
}

fn ranges(layout: &[(u64, usize)]) -> Vec<(GuestAddress, usize)> {
    layout.iter().map(|&(a, l)| (GuestAddress(a), l)).collect()
}

fn guest<B: NewBitmap>(layout: &[(u64, usize)]) -> GuestMemoryMmap<B> {
    GuestMemoryMmap::from_ranges(&ranges(layout)).expect("map the guest memory")
}

/// Writes a pattern into every region (through vm-memory, so bitmaps are marked).
fn fill<B: Bitmap>(mem: &GuestMemoryMmap<B>, layout: &[(u64, usize)], seed: u8) {
    for &(a, l) in layout {
        let mut buf = vec![0u8; l];
        fill_pattern(&mut buf, seed ^ (a >> 12) as u8);
        mem.write_slice(&buf, GuestAddress(a)).unwrap();
    }
}

/// The bytes of every region.
fn contents<B: Bitmap>(mem: &GuestMemoryMmap<B>, layout: &[(u64, usize)]) -> Vec<Vec<u8>> {
    layout
        .iter()
        .map(|&(a, l)| {
            let mut buf = vec![0u8; l];
            mem.read_slice(&mut buf, GuestAddress(a)).unwrap();
            buf
        })
        .collect()
}

fn write_image(dir: &Path, entries: &[(PagemapEntry, u8)]) {
    let mut w = ImageWriter::create(dir, 1).unwrap().with_sync(false);
    for &(e, fill) in entries {
        if e.is_present() {
            w.push_bytes(e, &vec![fill; e.pages as usize * ps()])
                .unwrap();
        } else {
            w.push(e).unwrap();
        }
    }
    w.finish().unwrap();
}

fn present(vaddr: u64, pages: u64) -> PagemapEntry {
    PagemapEntry {
        vaddr,
        pages,
        flags: PageFlags::PRESENT,
    }
}

proptest! {
    #![proptest_config(proptest_config(96, "vmm"))]

    /// A full snapshot, writes marked in the AtomicBitmaps, an incremental snapshot from
    /// them, and restores of both images into other guest memory: each equals the memory
    /// it was taken of (the model: the bytes read back before and after the writes).
    #[test]
    fn round_trips_over_random_layouts_with_gaps(
        layout in layout(),
        seed in any::<u8>(),
        writes in proptest::collection::vec((0usize..4, 0usize..24, 0usize..4096, 1usize..9000), 0..12),
        fresh in any::<bool>(),
        pipes in any::<bool>(),
        threads in 1usize..4,
    ) {
        let ps = ps();
        let dir = TempDir::new("vmm-round");
        let mem = guest::<AtomicBitmap>(&layout);
        fill(&mem, &layout, seed);
        DirtySet::new(&mem).unwrap().take_bitmaps(&mem).unwrap();
        let at_full = contents(&mem, &layout);
        let opts = SnapshotOptions {
            drain: if pipes { Drain::Pipes } else { Drain::Memory },
            max_pipe_pages: Some(4),
            ..SnapshotOptions::default()
        };
        let mut w = ImageWriter::create(dir.path().join("1"), 1).unwrap().with_sync(false);
        let source = Source::new().with_guest_memory(&mem).unwrap();
        snapshot(&source, vm::full_plan(&mem).unwrap(), &mut w, &opts).unwrap();
        w.finish().unwrap();
        drop(source);

        // Writes through vm-memory, each within one region; the pages they touch.
        let mut touched = BTreeSet::new();
        for (k, &(r, page, off, len)) in writes.iter().enumerate() {
            let (a, l) = layout[r % layout.len()];
            let start = (page * ps + off) % l;
            let len = len.min(l - start);
            mem.write_slice(&vec![0xa0 ^ k as u8; len], GuestAddress(a + start as u64)).unwrap();
            for p in start / ps..=(start + len - 1) / ps {
                touched.insert(a + (p * ps) as u64);
            }
        }
        let at_incremental = contents(&mem, &layout);
        let mut dirty = DirtySet::new(&mem).unwrap();
        dirty.take_bitmaps(&mem).unwrap();
        prop_assert_eq!(dirty.pages(), touched.len() as u64);
        for &g in &touched {
            prop_assert!(dirty.is_dirty(GuestAddress(g)));
        }
        let plan = dirty.plan(&Image::open(dir.path().join("1")).unwrap()).unwrap();
        let mut w = ImageWriter::create(dir.path().join("2"), 1).unwrap()
            .with_parent(dir.path().join("1")).unwrap().with_sync(false);
        let source = Source::new().with_guest_memory(&mem).unwrap();
        let report = snapshot(&source, plan, &mut w, &opts).unwrap();
        w.finish().unwrap();
        prop_assert_eq!(report.pages, touched.len() as u64);

        let ropts = GuestRestoreOptions {
            fresh,
            threads: NonZeroUsize::new(threads),
            ..GuestRestoreOptions::default()
        };
        // Into fresh memory (zeros), and into memory holding other bytes (not fresh).
        let back = guest::<()>(&layout);
        vm::restore(&Image::open(dir.path().join("2")).unwrap(), &back, &ropts).unwrap();
        prop_assert!(contents(&back, &layout) == at_incremental, "incremental restore differs");
        let back = guest::<()>(&layout);
        fill(&back, &layout, !seed);
        let not_fresh = GuestRestoreOptions { fresh: false, ..ropts };
        vm::restore(&Image::open(dir.path().join("1")).unwrap(), &back, &not_fresh).unwrap();
        prop_assert!(contents(&back, &layout) == at_full, "full restore differs");
    }

    /// Plans from bitmaps of any granularity, KVM dirty logs and a parent that holds some
    /// pages, against a per-page reference: dirty pages captured; clean ones `PARENT` where
    /// the parent holds them, captured where it does not; maximal runs within each region.
    #[test]
    fn bitmap_and_dirty_log_plans_match_a_reference(
        layout in layout(),
        shift in 0u32..6,
        writes in proptest::collection::vec((0usize..4, 0usize..(24 << 12), 1usize..12000), 0..8),
        logs in proptest::collection::vec(prop_oneof![Just(0u64), any::<u64>(), Just(!0u64)], 4),
        held in proptest::collection::vec(any::<bool>(), 4 * 24),
    ) {
        let ps = ps();
        // Bitmap pages from a quarter of a page to eight pages.
        let unit = (ps / 4) << shift;
        let regions: Vec<GuestRegionMmap<AtomicBitmap>> = layout.iter().map(|&(a, l)| {
            let bitmap = AtomicBitmap::new(l, NonZeroUsize::new(unit).unwrap());
            let m = MmapRegionBuilder::new_with_bitmap(l, bitmap)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .unwrap();
            GuestRegionMmap::new(m, GuestAddress(a)).unwrap()
        }).collect();
        let mem = GuestMemoryMmap::from_regions(regions).unwrap();

        let mut dirty_pages = BTreeSet::new();
        for &(r, start, len) in &writes {
            let (a, l) = layout[r % layout.len()];
            let start = start % l;
            let len = len.min(l - start);
            mem.write_slice(&vec![1; len], GuestAddress(a + start as u64)).unwrap();
            // The bitmap's units the write touches, then every page they overlap.
            let (u0, u1) = (start / unit, (start + len - 1) / unit + 1);
            let (b0, b1) = (u0 * unit, (u1 * unit).min(l));
            for p in b0 / ps..b1.div_ceil(ps) {
                dirty_pages.insert(a + (p * ps) as u64);
            }
        }
        let mut set = DirtySet::new(&mem).unwrap();
        set.take_bitmaps(&mem).unwrap();
        // One KVM log per region, of one word (more pages than 64 read as clean words).
        for (i, &(a, l)) in layout.iter().enumerate() {
            let pages = (l / ps) as u64;
            let mut log = vec![0u64; pages.div_ceil(64) as usize];
            log[0] = logs[i];
            set.add_dirty_log(GuestAddress(a), pages, &log).unwrap();
            for p in 0..pages.min(64) {
                if logs[i] >> p & 1 == 1 {
                    dirty_pages.insert(a + p * ps as u64);
                }
            }
        }
        prop_assert_eq!(set.pages(), dirty_pages.len() as u64);

        // A parent holding the pages `held` says it holds (an image of one-page entries).
        let dir = TempDir::new("vmm-plan");
        let mut held_pages = BTreeSet::new();
        let mut entries = Vec::new();
        for (i, &(a, l)) in layout.iter().enumerate() {
            for p in 0..l / ps {
                if held[(i * 24 + p) % held.len()] {
                    let g = a + (p * ps) as u64;
                    held_pages.insert(g);
                    entries.push((present(g, 1), 1));
                }
            }
        }
        write_image(dir.path(), &entries);
        let plan = set.plan(&Image::open(dir.path()).unwrap()).unwrap();

        let mut want = Vec::new();
        for &(a, l) in &layout {
            let mut runs: Vec<(u64, u64, bool)> = Vec::new();
            for p in 0..(l / ps) as u64 {
                let g = a + p * ps as u64;
                let capture = dirty_pages.contains(&g) || !held_pages.contains(&g);
                match runs.last_mut() {
                    Some(last) if last.2 == capture => last.1 += 1,
                    _ => runs.push((g, 1, capture)),
                }
            }
            want.extend(runs.into_iter().map(|(addr, pages, capture)| if capture {
                Span::Pages { addr, pages, flags: BufFlags::empty() }
            } else {
                Span::Hole { addr, pages, flags: HoleFlags::PARENT }
            }));
        }
        prop_assert_eq!(plan, want);
    }
}

/// Pages of an image in a gap between regions, or past all of them: refused with the
/// first such guest address, before a byte of the memory changes.
#[test]
fn pages_in_a_gap_are_refused_before_anything_is_written() {
    let ps = ps() as u64;
    let layout = vec![(0x10 * ps, 8 * ps as usize), (0x20 * ps, 8 * ps as usize)];
    let mem = guest::<()>(&layout);
    fill(&mem, &layout, 3);
    let before = contents(&mem, &layout);
    for (gap_entry, first_outside, pages) in [
        // Ends in the gap after the first region.
        (present(0x16 * ps, 4), 0x18 * ps, 2),
        // Wholly in the gap.
        (present(0x1c * ps, 1), 0x1c * ps, 1),
        // Below every region.
        (present(0x2 * ps, 1), 0x2 * ps, 1),
        // Past every region.
        (present(0x40 * ps, 3), 0x40 * ps, 3),
        // A lazy page in the gap is a page of the image too.
        (
            PagemapEntry {
                vaddr: 0x19 * ps,
                pages: 1,
                flags: PageFlags::LAZY,
            },
            0x19 * ps,
            1,
        ),
    ] {
        let dir = TempDir::new("vmm-gap");
        let mut entries = vec![(present(0x10 * ps, 2), 7), (gap_entry, 8)];
        entries.sort_by_key(|e| e.0.vaddr);
        write_image(dir.path(), &entries);
        let err = vm::restore(
            &Image::open(dir.path()).unwrap(),
            &mem,
            &GuestRestoreOptions::default(),
        )
        .unwrap_err();
        match err {
            VmError::OutsideMemory { addr, pages: n } => {
                assert_eq!((addr, n), (first_outside, pages), "{gap_entry}")
            }
            e => panic!("{gap_entry}: {e}"),
        }
        assert!(
            contents(&mem, &layout) == before,
            "{gap_entry}: memory changed"
        );
    }

    // The receiving side: an entry running into the gap is refused whole.
    let mut w = GuestWriter::new(&mem).unwrap();
    let e = present(0x17 * ps, 2);
    let err = w.write(e, &vec![9; 2 * ps as usize]).unwrap_err();
    assert!(
        matches!(err, VmError::OutsideMemory { addr, pages: 1 } if addr == 0x18 * ps),
        "{err}"
    );
    let (mut tx, mut rx) = std::os::unix::net::UnixStream::pair().unwrap();
    tx.write_all(&vec![9; 2 * ps as usize]).unwrap();
    let err = w.read_from(e, &mut rx).unwrap_err();
    assert!(matches!(err, VmError::OutsideMemory { .. }), "{err}");
    assert!(contents(&mem, &layout) == before, "memory changed");
    assert!(w.entries().is_empty());
    // Nothing was read from the stream either: the bytes are all still there.
    drop(tx);
    let mut left = Vec::new();
    std::io::Read::read_to_end(&mut rx, &mut left).unwrap();
    assert_eq!(left.len(), 2 * ps as usize);

    // Dirty logs and marks over a gap are refused, and mark nothing.
    let mut dirty = DirtySet::new(&mem).unwrap();
    let err = dirty
        .add_dirty_log(GuestAddress(0x10 * ps), 16, &[!0])
        .unwrap_err();
    assert!(
        matches!(err, VmError::OutsideMemory { addr, pages: 8 } if addr == 0x18 * ps),
        "{err}"
    );
    assert!(dirty.mark(GuestAddress(0x1f * ps), 2).is_err());
    assert_eq!(dirty.pages(), 0);
}

/// A region whose guest address or length is not whole pages, or whose mapping does not
/// allow the access, is refused by every entry point, naming the region.
#[test]
fn regions_that_break_a_rule_are_refused() {
    let ps = ps();
    let dir = TempDir::new("vmm-rules");
    write_image(dir.path(), &[(present(0, 1), 1)]);
    let image = Image::open(dir.path()).unwrap();
    let unaligned_addr = guest::<()>(&[(0x800, ps)]);
    let partial_page = guest::<()>(&[(0, ps + 512)]);
    for (mem, addr) in [(&unaligned_addr, 0x800), (&partial_page, 0)] {
        let is = |e: VmError| matches!(e, VmError::Unaligned { addr: a, .. } if a == addr);
        assert!(is(Source::new().with_guest_memory(mem).unwrap_err()));
        assert!(is(vm::full_plan(mem).unwrap_err()));
        assert!(is(DirtySet::new(mem).unwrap_err()));
        assert!(is(GuestWriter::new(mem).unwrap_err()));
        assert!(is(vm::restore(
            &image,
            mem,
            &GuestRestoreOptions::default()
        )
        .unwrap_err()));
    }

    // Mapped read-only: a source, not a restore; mapped without reading: neither.
    let mapped = |prot: i32| {
        let m = MmapRegionBuilder::<()>::new(2 * ps)
            .with_mmap_prot(prot)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE)
            .build()
            .unwrap();
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(m, GuestAddress(0)).unwrap()])
            .unwrap()
    };
    let read_only = mapped(libc::PROT_READ);
    assert!(Source::new().with_guest_memory(&read_only).is_ok());
    let err = vm::restore(&image, &read_only, &GuestRestoreOptions::default()).unwrap_err();
    assert!(matches!(
        err,
        VmError::Protection {
            addr: 0,
            needs: Access::Write
        }
    ));
    assert!(matches!(
        GuestWriter::new(&read_only).unwrap_err(),
        VmError::Protection { .. }
    ));
    let none = mapped(libc::PROT_NONE);
    assert!(matches!(
        Source::new().with_guest_memory(&none).unwrap_err(),
        VmError::Protection {
            needs: Access::Read,
            ..
        }
    ));
    // Plans need no access to the memory.
    assert_eq!(vm::full_plan(&none).unwrap().len(), 1);

    // A region overlapping one the source has already.
    let a = guest::<()>(&[(0, 4 * ps)]);
    let b = guest::<()>(&[(2 * ps as u64, 4 * ps)]);
    let err = Source::new()
        .with_guest_memory(&a)
        .unwrap()
        .with_guest_memory(&b)
        .unwrap_err();
    assert!(matches!(err, VmError::Source { addr, .. } if addr == 2 * ps as u64));

    // Bitmaps of another layout.
    let other = guest::<AtomicBitmap>(&[(0, 8 * ps)]);
    let mut set = DirtySet::new(&guest::<AtomicBitmap>(&[(0, 4 * ps)])).unwrap();
    assert!(matches!(
        set.take_bitmaps(&other).unwrap_err(),
        VmError::LayoutChanged { addr: 0 }
    ));
    assert!(matches!(
        set.add_dirty_log(GuestAddress(0), 4, &[]).unwrap_err(),
        VmError::ShortLog { .. }
    ));
}

/// The real CRIU 4.2 dump, restored into a guest memory laid out over its entries and
/// the regions its target describes, holds the target's pattern; a guest memory with
/// only those regions is refused, naming the first page of the image it lacks.
#[test]
fn the_criu_fixture_restores_into_guest_memory() {
    let ps = 4096u64;
    if page_pipe_sys::page_size().get() as u64 != ps {
        eprintln!(
            "SKIPPED the_criu_fixture_restores_into_guest_memory: the fixture has 4 KiB pages"
        );
        return;
    }
    let dir = fixtures().join("criu-4.2-a");
    let image = Image::open(&dir).unwrap();
    let target: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("target.json")).unwrap()).unwrap();
    let regions: Vec<(u64, u64, u64, u64)> = target["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let addr =
                u64::from_str_radix(r["addr"].as_str().unwrap().trim_start_matches("0x"), 16)
                    .unwrap();
            (
                addr,
                r["pages"].as_u64().unwrap(),
                r["stride"].as_u64().unwrap(),
                r["seed"].as_u64().unwrap(),
            )
        })
        .collect();
    // The entries and the target regions, joined where they touch or overlap.
    let mut spans: Vec<(u64, u64)> = image
        .entries()
        .iter()
        .map(|e| (e.vaddr, e.vaddr + e.pages * ps))
        .chain(regions.iter().map(|r| (r.0, r.0 + r.1 * ps)))
        .collect();
    spans.sort();
    let mut joined: Vec<(u64, u64)> = Vec::new();
    for (s, e) in spans {
        match joined.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => joined.push((s, e)),
        }
    }
    let layout: Layout = joined.iter().map(|&(s, e)| (s, (e - s) as usize)).collect();
    let mem = guest::<()>(&layout);
    let report = vm::restore(&image, &mem, &GuestRestoreOptions::default()).unwrap();
    assert_eq!(report.present, 413);
    for &(addr, pages, stride, seed) in &regions {
        let mut got = vec![0u8; (pages * ps) as usize];
        mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
        for p in 0..pages {
            let page = &got[(p * ps) as usize..][..ps as usize];
            if p % stride == 0 {
                assert!(
                    page.iter()
                        .enumerate()
                        .all(|(i, &b)| b == ((i as u64 * 7 + p * 13 + seed) & 0xff) as u8),
                    "page {p} of the region at {addr:#x} differs"
                );
            } else {
                assert!(
                    page.iter().all(|&b| b == 0),
                    "untouched page {p} is not zero"
                );
            }
        }
    }

    let only_regions: Layout = regions
        .iter()
        .map(|r| (r.0, (r.1 * ps) as usize))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let small = guest::<()>(&only_regions);
    let first = image.entries()[0];
    match vm::restore(&image, &small, &GuestRestoreOptions::default()) {
        Err(VmError::OutsideMemory { addr, pages }) => {
            assert_eq!((addr, pages), (first.vaddr, first.pages))
        }
        other => panic!("{other:?}"),
    }
}

/// A snapshot dumped into a `GuestWriter` copies one guest memory into another, by both
/// drains (from memory: volatile copies; through pipes: reads out of the pipe), and
/// records the entries whose pages are in the parent.
#[test]
fn a_snapshot_dumped_into_a_guest_writer_copies_the_memory() {
    let ps = ps() as u64;
    let layout = vec![
        (0x100 * ps, 40 * ps as usize),
        (0x200 * ps, 9 * ps as usize),
    ];
    let from = guest::<()>(&layout);
    fill(&from, &layout, 21);
    for drain in [Drain::Memory, Drain::Pipes] {
        let to = guest::<AtomicBitmap>(&layout);
        let mut w = GuestWriter::new(&to).unwrap();
        let opts = SnapshotOptions {
            drain,
            max_pipe_pages: Some(8),
            ..SnapshotOptions::default()
        };
        let source = Source::new().with_guest_memory(&from).unwrap();
        let mut plan = vm::full_plan(&from).unwrap();
        // The first region's first 4 pages: in the parent, not sent.
        plan[0] = Span::Pages {
            addr: 0x104 * ps,
            pages: 36,
            flags: BufFlags::empty(),
        };
        plan.insert(
            0,
            Span::Hole {
                addr: 0x100 * ps,
                pages: 4,
                flags: HoleFlags::PARENT,
            },
        );
        snapshot(&source, plan, &mut w, &opts).unwrap();
        let report = w.report();
        assert_eq!(
            (report.present_pages, report.parent_pages),
            (45, 4),
            "{drain:?}"
        );
        let mut want = contents(&from, &layout);
        want[0][..4 * ps as usize].fill(0);
        assert!(contents(&to, &layout) == want, "{drain:?}: copy differs");
        // The writes marked the receiving memory's bitmaps.
        let mut dirty = DirtySet::new(&to).unwrap();
        assert_eq!(dirty.take_bitmaps(&to).unwrap(), 45, "{drain:?}");
        assert_eq!(w.entries().len(), 3, "{drain:?}: {:?}", w.entries());
    }

    // A GuestWriter into memory that lacks a region: the dump fails on that entry with
    // the VmError inside.
    let small = guest::<()>(&layout[..1]);
    let mut w = GuestWriter::new(&small).unwrap();
    let source = Source::new().with_guest_memory(&from).unwrap();
    let err = snapshot(
        &source,
        vm::full_plan(&from).unwrap(),
        &mut w,
        &SnapshotOptions::default(),
    )
    .unwrap_err();
    let page_pipe::snapshot::SnapshotError::Dump(dump) = err else {
        panic!("{err}")
    };
    let DumpErrorKind::Sink { error, .. } = dump.kind else {
        panic!("{dump}")
    };
    let inner = error.get_ref().and_then(|e| e.downcast_ref::<VmError>());
    assert!(
        matches!(inner, Some(VmError::OutsideMemory { addr, .. }) if *addr == 0x200 * ps),
        "{error}"
    );
}

/// Entries read from a socket land in guest memory; a stream that ends early is a
/// `Stream` error naming the entry.
#[test]
fn entries_read_from_a_socket_land_in_guest_memory() {
    let ps = ps();
    let layout = vec![(0, 16 * ps), (0x10_0000, 16 * ps)];
    let mem = guest::<()>(&layout);
    let entries = [
        present(2 * ps as u64, 3),
        PagemapEntry {
            vaddr: 5 * ps as u64,
            pages: 2,
            flags: PageFlags::PARENT,
        },
        // Across the end of nothing: the whole second region.
        present(0x10_0000, 16),
    ];
    let mut bytes = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.is_present() {
            let mut b = vec![0u8; e.pages as usize * ps];
            fill_pattern(&mut b, i as u8);
            bytes.extend_from_slice(&b);
        }
    }
    let (mut tx, mut rx) = std::os::unix::net::UnixStream::pair().unwrap();
    let sent = bytes.clone();
    let sender = std::thread::spawn(move || tx.write_all(&sent));
    let mut w = GuestWriter::new(&mem).unwrap();
    for e in entries {
        w.read_from(e, &mut rx).unwrap();
    }
    sender.join().unwrap().unwrap();
    let mut got = vec![0u8; 3 * ps];
    mem.read_slice(&mut got, GuestAddress(2 * ps as u64))
        .unwrap();
    assert!(got == bytes[..3 * ps]);
    let mut got = vec![0u8; 16 * ps];
    mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    assert!(got == bytes[3 * ps..]);
    assert_eq!(w.report().parent_pages, 2);

    // Half an entry, then the end of the stream.
    let (mut tx, mut rx) = std::os::unix::net::UnixStream::pair().unwrap();
    tx.write_all(&vec![1; ps / 2]).unwrap();
    drop(tx);
    let e = present(0, 1);
    match w.read_from(e, &mut rx).unwrap_err() {
        VmError::Stream { entry, error } => {
            assert_eq!(entry, e);
            assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
        }
        other => panic!("{other}"),
    }
    // Bytes of the wrong length for an entry.
    assert!(matches!(
        w.write(e, &[0; 10]).unwrap_err(),
        VmError::Length { len: 10, .. }
    ));
}

/// The snapshot of guest memory is the snapshot of the same bytes held as a slice: the
/// same pagemap and the same pages file, by both drains.
#[test]
fn a_guest_memory_snapshot_equals_one_of_the_same_bytes_as_slices() {
    let ps = ps();
    let layout = vec![(0x40_0000, 33 * ps), (0x80_0000, 7 * ps)];
    let mem = guest::<()>(&layout);
    fill(&mem, &layout, 77);
    let copies: Vec<memmap2::MmapMut> = contents(&mem, &layout)
        .into_iter()
        .map(|bytes| {
            let mut m = memmap2::MmapOptions::new()
                .len(bytes.len())
                .map_anon()
                .unwrap();
            m.copy_from_slice(&bytes);
            m
        })
        .collect();
    for drain in [Drain::Memory, Drain::Pipes] {
        let dir = TempDir::new("vmm-same");
        let opts = SnapshotOptions {
            drain,
            max_pipe_pages: Some(4),
            ..SnapshotOptions::default()
        };
        let guest_source = Source::new().with_guest_memory(&mem).unwrap();
        let mut slices = Source::new();
        for (&(a, _), m) in layout.iter().zip(&copies) {
            slices = slices.with_slice(a, &m[..]).unwrap();
        }
        for (name, source) in [("guest", &guest_source), ("slices", &slices)] {
            let mut w = ImageWriter::create(dir.path().join(name), 1)
                .unwrap()
                .with_sync(false);
            snapshot(source, vm::full_plan(&mem).unwrap(), &mut w, &opts).unwrap();
            w.finish().unwrap();
        }
        for file in ["pagemap-1.img", "pages-1.img"] {
            let a = std::fs::read(dir.path().join("guest").join(file)).unwrap();
            let b = std::fs::read(dir.path().join("slices").join(file)).unwrap();
            assert!(a == b, "{drain:?}: {file} differs");
        }
    }
}

/// A pages file truncated after the image was opened: the restore stops with a short
/// read naming the file and the offset where it ended.
#[test]
fn a_pages_file_cut_while_open_is_a_short_read() {
    let ps = ps();
    let dir = TempDir::new("vmm-cut");
    write_image(dir.path(), &[(present(0, 4), 5)]);
    let image = Image::open(dir.path()).unwrap();
    let pages = dir.path().join("pages-1.img");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .unwrap()
        .set_len(2 * ps as u64 + 100)
        .unwrap();
    let mem = guest::<()>(&[(0, 4 * ps)]);
    match vm::restore(&image, &mem, &GuestRestoreOptions::default()).unwrap_err() {
        VmError::Image {
            op: ImageOp::Read,
            error: ImageError::ShortRead { path, offset },
        } => {
            assert_eq!(path, pages);
            assert_eq!(offset, 2 * ps as u64 + 100);
        }
        other => panic!("{other}"),
    }
}

/// A restore on several threads leaves no thread and no descriptor behind.
#[test]
fn a_restore_leaves_no_thread_or_descriptor() {
    if !alone("a_restore_leaves_no_thread_or_descriptor") {
        return;
    }
    let ps = ps();
    let dir = TempDir::new("vmm-alone");
    write_image(
        dir.path(),
        &[(present(0, 64), 5), (present(0x100_0000, 64), 6)],
    );
    let layout = vec![(0, 64 * ps), (0x100_0000, 64 * ps)];
    let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
    let (fds, tasks) = (open_fds(), threads());
    {
        let image = Image::open(dir.path()).unwrap();
        let mem = guest::<()>(&layout);
        let opts = GuestRestoreOptions {
            threads: NonZeroUsize::new(4),
            ..GuestRestoreOptions::default()
        };
        let report = vm::restore(&image, &mem, &opts).unwrap();
        assert_eq!(report.threads, 4);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x100_0000)).unwrap(), 6);
    }
    assert_eq!((open_fds(), threads()), (fds, tasks));
}

/// Pages of a region that the image does not hold (in no entry, or lazy only) are
/// written with zeros; with `fresh` they are left as they are; a strict restore refuses
/// them before anything is written.
#[test]
fn pages_the_image_lacks_are_zeros_or_left_alone_when_fresh() {
    let ps = ps();
    let layout = vec![(0, 8 * ps), (0x10_0000, 4 * ps)];
    let dir = TempDir::new("vmm-lacks");
    write_image(
        dir.path(),
        &[
            (present(ps as u64, 2), 5),
            (
                PagemapEntry {
                    vaddr: 4 * ps as u64,
                    pages: 1,
                    flags: PageFlags::LAZY,
                },
                0,
            ),
            (present(0x10_0000 + ps as u64, 1), 6),
        ],
    );
    let image = Image::open(dir.path()).unwrap();
    for fresh in [false, true] {
        let mem = guest::<()>(&layout);
        fill(&mem, &layout, 9);
        let before = contents(&mem, &layout);
        let opts = GuestRestoreOptions {
            fresh,
            ..GuestRestoreOptions::default()
        };
        let report = vm::restore(&image, &mem, &opts).unwrap();
        assert_eq!((report.present, report.zero, report.lazy), (3, 8, 1));
        let after = contents(&mem, &layout);
        let mut want = before.clone();
        for (r, page, byte) in [(0, 1, 5), (0, 2, 5), (1, 1, 6)] {
            want[r][page * ps..][..ps].fill(byte);
        }
        if !fresh {
            for (r, pages) in [(0, vec![0, 3, 4, 5, 6, 7]), (1, vec![0, 2, 3])] {
                for p in pages {
                    want[r][p * ps..][..ps].fill(0);
                }
            }
        }
        assert!(after == want, "fresh {fresh}: restored memory differs");
    }
    let mem = guest::<()>(&layout);
    fill(&mem, &layout, 9);
    let before = contents(&mem, &layout);
    let strict = GuestRestoreOptions {
        strict: true,
        ..GuestRestoreOptions::default()
    };
    match vm::restore(&image, &mem, &strict).unwrap_err() {
        VmError::Image {
            op: ImageOp::Plan,
            error: ImageError::NotInImage { vaddr: 0, .. },
        } => {}
        other => panic!("{other}"),
    }
    assert!(contents(&mem, &layout) == before, "a refused restore wrote");
}
