//! Capture, dump and restore end to end: real memory through real pipes into CRIU
//! images, checked byte for byte, against `crit`, and against a real CRIU 4.2 dump.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use page_pipe::image::{Image, ImageError, ImageWriter, Page, PageFlags, Pagemap, PagemapEntry};
use page_pipe::snapshot::{Drain, SnapshotOptions, Span, snapshot, spans_from};
use page_pipe::{
    BufFlags, CallbackSink, CaptureError, CaptureMode, CapturePath, DumpErrorKind, FdSink,
    HoleFlags, PagePipe, Source,
};
use page_pipe_tests::{TempDir, alone, assert_restores, crit, fixtures, open_fds, patterned};

mod changed;
mod flatten;
mod mapping;
mod restore_chains;
mod whole;

fn ps() -> usize {
    page_pipe_sys::page_size().get()
}

/// The largest pipe this process may have, in pages.
fn max_grant_pages() -> u64 {
    page_pipe_sys::PipeLimits::get().unwrap().max_grant_pages() as u64
}

const BASE: u64 = 0x7f00_0000_0000;

/// The pipe size the tests pin, in pages: small enough for any machine's
/// `pipe-max-size`, so that chunking does not depend on it.
const PIPE_PAGES: u64 = 64;

/// Snapshots through pipes (capture, then dump), whatever the sink prefers, with pipes
/// of at most [`PIPE_PAGES`] pages.
fn pipes() -> SnapshotOptions {
    SnapshotOptions {
        drain: Drain::Pipes,
        max_pipe_pages: Some(PIPE_PAGES),
        ..SnapshotOptions::default()
    }
}

/// A plan over `pages` pages: runs of captured pages of varying lengths, lazy runs, and
/// holes in the parent, all decided by the page index.
fn mixed_plan(pages: u64, lazy: bool) -> Vec<Span> {
    let mut plan = Vec::new();
    let mut i = 0;
    while i < pages {
        let n = (1 + (i * 7919) % 97).min(pages - i);
        let addr = BASE + i * ps() as u64;
        plan.push(match (i / 7) % 5 {
            0..=2 => Span::Pages {
                addr,
                pages: n,
                flags: BufFlags::empty(),
            },
            3 if lazy => Span::Pages {
                addr,
                pages: n,
                flags: BufFlags::LAZY,
            },
            _ => Span::Hole {
                addr,
                pages: n,
                flags: HoleFlags::PARENT,
            },
        });
        i += n;
    }
    plan
}

fn read_files(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(dir.join("pagemap-1.img")).unwrap(),
        std::fs::read(dir.join("pages-1.img")).unwrap(),
    )
}

#[test]
fn a_full_snapshot_restores_byte_for_byte() {
    let mem = patterned(3000, 1);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let dir = TempDir::new("full");
    let mut w = ImageWriter::create(dir.path(), 1).unwrap();
    let plan = [Span::Pages {
        addr: BASE,
        pages: 3000,
        flags: BufFlags::empty(),
    }];
    let report = snapshot(&source, plan, &mut w, &pipes()).unwrap();
    let summary = w.finish().unwrap();
    assert_eq!(report.pages, 3000);
    // Chunk mode holds 8 pipes of (at most) PIPE_PAGES pages.
    let per_chunk = 8 * PIPE_PAGES.min(max_grant_pages());
    assert_eq!(report.chunks, 3000u64.div_ceil(per_chunk));
    assert_eq!(
        summary.entries, 1,
        "one contiguous entry, whatever the chunks"
    );
    assert_eq!(summary.present_pages, 3000);
    let img = Image::open(dir.path()).unwrap();
    assert_eq!(
        img.entries(),
        &[PagemapEntry {
            vaddr: BASE,
            pages: 3000,
            flags: PageFlags::PRESENT
        }]
    );
    let mut back = vec![0u8; mem.len()];
    let r = img.read(BASE, &mut back).unwrap();
    assert_eq!((r.present, r.zero), (3000, 0));
    assert!(back == mem[..]);
    // Pages around the image read as zeros, and are reported as such.
    let mut edge = vec![1u8; 2 * ps()];
    let r = img.read(BASE - ps() as u64, &mut edge).unwrap();
    assert_eq!((r.present, r.zero), (1, 1));
    assert!(edge[..ps()].iter().all(|&b| b == 0));
}

#[test]
fn chunked_and_single_pass_images_are_identical() {
    let pages = 5000;
    let mem = patterned(pages as usize, 2);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let plan = mixed_plan(pages, true);
    let mut images = Vec::new();
    let ways = [
        (false, 1 << 16, Drain::Pipes),
        (true, 1 << 16, Drain::Pipes),
        (true, 7, Drain::Pipes),
        (true, 1 << 16, Drain::Memory),
    ];
    for (chunk, budget, drain) in ways {
        let dir = TempDir::new("chunks");
        let mut w = ImageWriter::create(dir.path(), 1).unwrap();
        let opts = SnapshotOptions {
            chunk_mode: chunk,
            iov_budget: budget,
            drain,
            ..SnapshotOptions::default()
        };
        let report = snapshot(&source, plan.clone(), &mut w, &opts).unwrap();
        w.finish().unwrap();
        if drain == Drain::Memory {
            assert_eq!((report.path, report.pipes_made), (CapturePath::Direct, 0));
        } else if chunk {
            assert!(
                report.pipes_made <= 8,
                "chunk mode made {} pipes",
                report.pipes_made
            );
            assert!(report.chunks > 1);
        }
        images.push(read_files(dir.path()));
    }
    assert!(
        images[0] == images[3],
        "the image written from memory differs"
    );
    assert!(
        images[0] == images[1],
        "chunked image differs from single pass"
    );
    assert!(
        images[0] == images[2],
        "chunks cut by the iov budget differ"
    );
}

#[test]
fn incremental_snapshots_restore_through_the_parent_chain() {
    let pages = 2048usize;
    let mut mem = patterned(pages, 3);
    let root = TempDir::new("chain");
    let (d1, d2, d3) = (
        root.path().join("1"),
        root.path().join("2"),
        root.path().join("3"),
    );
    let full = |mem: &[u8], dir: &Path| {
        let source = Source::new().with_slice(BASE, mem).unwrap();
        let mut w = ImageWriter::create(dir, 1).unwrap();
        let plan = [Span::Pages {
            addr: BASE,
            pages: pages as u64,
            flags: BufFlags::empty(),
        }];
        snapshot(&source, plan, &mut w, &SnapshotOptions::default()).unwrap();
        w.finish().unwrap();
    };
    let incremental = |mem: &[u8], dir: &Path, parent: &Path, dirty: &dyn Fn(u64) -> bool| {
        let source = Source::new().with_slice(BASE, mem).unwrap();
        let mut w = ImageWriter::create(dir, 1)
            .unwrap()
            .with_parent(parent)
            .unwrap();
        let plan = spans_from(
            BASE,
            pages as u64,
            ps(),
            dirty,
            BufFlags::empty(),
            HoleFlags::PARENT,
        );
        snapshot(&source, plan, &mut w, &SnapshotOptions::default()).unwrap();
        w.finish().unwrap()
    };
    full(&mem, &d1);
    let dirty2 = |i: u64| i.is_multiple_of(5) || (300..340).contains(&i);
    for i in 0..pages as u64 {
        if dirty2(i) {
            mem[i as usize * ps()..][..ps()].fill(i as u8 ^ 0x5a);
        }
    }
    let s2 = incremental(&mem, &d2, &d1, &dirty2);
    assert_eq!(
        s2.present_pages,
        (0..pages as u64).filter(|&i| dirty2(i)).count() as u64
    );
    let dirty3 = |i: u64| i % 7 == 1;
    for i in 0..pages as u64 {
        if dirty3(i) {
            mem[i as usize * ps()..][..ps()].fill(0xee);
        }
    }
    incremental(&mem, &d3, &d2, &dirty3);
    assert_eq!(
        std::fs::read_link(d3.join("parent")).unwrap(),
        Path::new("../2"),
        "sibling directories are linked relatively"
    );
    let img = Image::open(&d3).unwrap();
    assert_eq!(img.depth(), 3);
    let mut back = vec![0u8; mem.len()];
    let r = img.read(BASE, &mut back).unwrap();
    assert!(back == mem[..], "restored memory differs");
    assert_eq!(r.present + r.from_parents, pages as u64);
    // One page from each level of the chain.
    let at = |i: u64| BASE + i * ps() as u64;
    assert!(matches!(
        img.page(at(1)).unwrap(),
        Page::Data { depth: 0, .. }
    ));
    assert!(matches!(
        img.page(at(5)).unwrap(),
        Page::Data { depth: 1, .. }
    ));
    assert!(matches!(
        img.page(at(2)).unwrap(),
        Page::Data { depth: 2, .. }
    ));
    assert_eq!(img.page(at(pages as u64)).unwrap(), Page::Zero);
}

#[test]
fn lazy_pages_stay_in_their_pipes_and_are_marked_lazy() {
    let mem = patterned(64, 4);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let mut pp = PagePipe::builder()
        .iov_budget(16)
        .lazy_pages(true)
        .build()
        .unwrap();
    let at = |i: u64| BASE + i * ps() as u64;
    pp.add_pages(at(0), 8, BufFlags::empty()).unwrap();
    pp.add_pages(at(8), 8, BufFlags::LAZY).unwrap();
    pp.add_holes(at(16), 4, HoleFlags::PARENT).unwrap();
    pp.add_pages(at(20), 4, BufFlags::empty()).unwrap();
    let mut captured = pp.capture(&source).unwrap();
    let mut sink = CallbackSink::new({
        let mut seen = Vec::new();
        move |e: &PagemapEntry, pages: &[u8]| {
            seen.push((*e, pages.len()));
            assert_eq!(
                pages.len() as u64,
                if e.is_present() { e.pages * 4096 } else { 0 }
            );
            Ok(())
        }
    });
    let report = captured.dump(&mut sink).unwrap();
    assert_eq!(report.present_pages, 12);
    assert_eq!(report.lazy_kept, 8);
    assert_eq!(report.parent_pages, 4);
    // The lazy pages are still in their pipe.
    let lazy = captured
        .page_pipe()
        .bufs()
        .find(|b| b.flags == BufFlags::LAZY)
        .unwrap();
    assert_eq!(lazy.pipe_off, 0);
    // Dumping twice is refused.
    let err = captured.dump(&mut sink).unwrap_err();
    assert!(matches!(err.kind, DumpErrorKind::AlreadyDumped));
}

#[test]
fn lazy_bufs_are_present_too_when_lazy_pages_are_off() {
    let mem = patterned(16, 5);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let dir = TempDir::new("lazyoff");
    let mut w = ImageWriter::create(dir.path(), 1).unwrap();
    let plan = [
        Span::Pages {
            addr: BASE,
            pages: 4,
            flags: BufFlags::empty(),
        },
        Span::Pages {
            addr: BASE + 4 * ps() as u64,
            pages: 4,
            flags: BufFlags::LAZY,
        },
    ];
    snapshot(&source, plan, &mut w, &SnapshotOptions::default()).unwrap();
    w.finish().unwrap();
    let img = Image::open(dir.path()).unwrap();
    let flags: Vec<_> = img.entries().iter().map(|e| e.flags).collect();
    assert_eq!(
        flags,
        vec![PageFlags::PRESENT, PageFlags::LAZY | PageFlags::PRESENT]
    );
    let mut back = vec![0u8; 8 * ps()];
    img.read(BASE, &mut back).unwrap();
    assert!(back == mem[..8 * ps()]);
}

#[test]
fn copying_capture_writes_the_same_image() {
    let mem = patterned(700, 6);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let plan = mixed_plan(700, false);
    let mut images = Vec::new();
    for mode in [CaptureMode::Auto, CaptureMode::Copy] {
        let dir = TempDir::new("copy");
        let mut w = ImageWriter::create(dir.path(), 1).unwrap();
        let opts = SnapshotOptions {
            capture: mode,
            drain: Drain::Pipes,
            ..SnapshotOptions::default()
        };
        let r = snapshot(&source, plan.clone(), &mut w, &opts).unwrap();
        w.finish().unwrap();
        if mode == CaptureMode::Copy {
            assert_eq!(r.path, CapturePath::Copy);
        }
        images.push(read_files(dir.path()));
    }
    assert!(images[0] == images[1]);
}

#[test]
fn an_owned_mapping_can_be_unmapped_before_the_dump() {
    let ps = ps();
    let mut m = memmap2::MmapOptions::new().len(32 * ps).map_anon().unwrap();
    page_pipe_tests::fill_pattern(&mut m, 7);
    let expect = m.to_vec();
    let source = Source::new()
        .with_mmap(BASE, m.make_read_only().unwrap())
        .unwrap();
    let mut pp = PagePipe::builder().iov_budget(4).build().unwrap();
    pp.add_pages(BASE, 32, BufFlags::empty()).unwrap();
    let mut captured = pp.capture(&source).unwrap();
    drop(source); // unmaps the memory; the pipes keep the pages
    let mut got = Vec::new();
    let mut sink = CallbackSink::new(|_: &PagemapEntry, pages: &[u8]| {
        got.extend_from_slice(pages);
        Ok(())
    });
    captured.dump(&mut sink).unwrap();
    drop(sink);
    assert!(got == expect);
}

#[test]
fn memory_can_be_captured_under_other_addresses() {
    // Two regions mapped apart in memory, captured as adjacent guest-physical pages.
    let a = patterned(4, 8);
    let b = patterned(4, 9);
    let gpa = 0x1_0000_0000u64;
    let source = Source::new()
        .with_slice(gpa, &a[..])
        .unwrap()
        .with_slice(gpa + 4 * ps() as u64, &b[..])
        .unwrap();
    let mut pp = PagePipe::builder().iov_budget(4).build().unwrap();
    pp.add_pages(gpa + 2 * ps() as u64, 4, BufFlags::empty())
        .unwrap();
    let mut captured = pp.capture(&source).unwrap();
    let mut got = Vec::new();
    let mut sink = CallbackSink::new(|e: &PagemapEntry, pages: &[u8]| {
        assert_eq!(e.vaddr, gpa + 2 * 4096);
        got.extend_from_slice(pages);
        Ok(())
    });
    captured.dump(&mut sink).unwrap();
    drop(sink);
    assert!(got[..2 * ps()] == a[2 * ps()..] && got[2 * ps()..] == b[..2 * ps()]);
}

#[test]
fn a_page_outside_the_source_is_refused_before_any_syscall() {
    let mem = patterned(4, 1);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let mut pp = PagePipe::builder().iov_budget(4).build().unwrap();
    pp.add_pages(BASE + 2 * ps() as u64, 4, BufFlags::empty())
        .unwrap();
    let err = pp.capture(&source).unwrap_err();
    assert_eq!(
        err,
        CaptureError::NotCovered {
            addr: BASE + 4 * ps() as u64
        }
    );
    assert!(
        err.to_string()
            .contains(&format!("{:#x}", BASE + 4 * ps() as u64))
    );
}

#[test]
fn pages_of_a_released_buf_are_skipped_in_a_shared_pipe() {
    let mem = patterned(16, 10);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let at = |i: u64| BASE + i * ps() as u64;
    let mut pp = PagePipe::builder().iov_budget(8).build().unwrap();
    pp.add_pages(at(0), 3, BufFlags::empty()).unwrap();
    pp.add_pages(at(3), 3, BufFlags::LAZY).unwrap();
    pp.add_pages(at(6), 3, BufFlags::empty()).unwrap();
    let ids: Vec<_> = pp.bufs().map(|b| b.id).collect();
    pp.release_buf(ids[1]).unwrap();
    let mut captured = pp.capture(&source).unwrap();
    let mut got = Vec::new();
    let mut sink = CallbackSink::new(|e: &PagemapEntry, pages: &[u8]| {
        got.push((e.vaddr, pages.to_vec()));
        Ok(())
    });
    captured.dump(&mut sink).unwrap();
    drop(sink);
    assert_eq!(got.len(), 2);
    assert!(got[0].1 == mem[..3 * ps()]);
    assert_eq!(got[1].0, at(6));
    assert!(got[1].1 == mem[6 * ps()..9 * ps()]);
}

#[test]
fn pages_go_to_a_unix_socket_with_a_reader_draining_it() {
    let pages = 2000usize;
    let mem = patterned(pages, 11);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let (mut rx, tx) = std::os::unix::net::UnixStream::pair().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        rx.read_to_end(&mut all).unwrap();
        all
    });
    let mut sink = FdSink::new(tx);
    let plan = mixed_plan(pages as u64, false);
    snapshot(
        &source,
        plan.clone(),
        &mut sink,
        &SnapshotOptions::default(),
    )
    .unwrap();
    let (tx, entries) = sink.into_parts();
    drop(tx);
    let got = reader.join().unwrap();
    let mut expect = Vec::new();
    for e in entries.iter().filter(|e| e.is_present()) {
        let off = (e.vaddr - BASE) as usize;
        expect.extend_from_slice(&mem[off..off + e.pages as usize * ps()]);
    }
    assert_eq!(got.len(), expect.len());
    assert!(got == expect);
}

#[test]
fn captures_and_dumps_leak_no_file_descriptors() {
    if !alone("captures_and_dumps_leak_no_file_descriptors") {
        return;
    }
    let before = open_fds();
    let mem = patterned(3000, 12);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    for chunk in [false, true] {
        let dir = TempDir::new("fds");
        let mut w = ImageWriter::create(dir.path(), 1).unwrap();
        let opts = SnapshotOptions {
            chunk_mode: chunk,
            ..SnapshotOptions::default()
        };
        let plan = mixed_plan(3000, true)
            .into_iter()
            .filter(|s| matches!(s, Span::Pages { .. }));
        snapshot(&source, plan, &mut w, &opts).unwrap();
        w.finish().unwrap();
        Image::open(dir.path()).unwrap();
    }
    assert_eq!(open_fds(), before);
}

/// `crit` decodes every image we write, with the right entries and page counts.
#[test]
fn crit_decodes_our_images() {
    let Some(crit) = crit("crit_decodes_our_images") else {
        return;
    };
    let mem = patterned(1500, 13);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let root = TempDir::new("crit");
    let d1 = root.path().join("1");
    let mut w = ImageWriter::create(&d1, 1).unwrap();
    let opts = SnapshotOptions {
        lazy_pages: true,
        ..SnapshotOptions::default()
    };
    let plan = mixed_plan(1500, true)
        .into_iter()
        .filter(|s| !matches!(s, Span::Hole { .. }))
        .collect::<Vec<_>>();
    // Lazy pages need single-pass mode to stay in their pipes; chunk mode drops them.
    let opts = SnapshotOptions {
        chunk_mode: false,
        ..opts
    };
    snapshot(&source, plan, &mut w, &opts).unwrap();
    w.finish().unwrap();
    let d2 = root.path().join("2");
    let mut w = ImageWriter::create(&d2, 1)
        .unwrap()
        .with_parent(&d1)
        .unwrap();
    snapshot(
        &source,
        mixed_plan(1500, false),
        &mut w,
        &SnapshotOptions::default(),
    )
    .unwrap();
    w.finish().unwrap();
    for dir in [&d1, &d2] {
        let ours = Image::open(dir).unwrap();
        let out = Command::new(&crit)
            .args(["decode", "-i"])
            .arg(dir.join("pagemap-1.img"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["magic"], "PAGEMAP");
        let entries = json["entries"].as_array().unwrap();
        assert_eq!(entries[0]["pages_id"], 1);
        assert_eq!(entries.len() - 1, ours.entries().len());
        for (j, e) in entries[1..].iter().zip(ours.entries()) {
            assert_eq!(j["vaddr"].as_u64(), Some(e.vaddr));
            // Old crit knows field 2 as nr_pages, new crit field 5; we write both.
            assert_eq!(j["nr_pages"].as_u64(), Some(e.pages), "{j}");
            assert_eq!(j["flags"].as_u64(), Some(u64::from(e.flags.bits())), "{j}");
        }
        assert!(ours.entries().iter().any(|e| e.flags == PageFlags::LAZY) || dir == &d2);
    }
}

/// Images made by `crit encode` (old-style, page count in field 2 only) read back right.
#[test]
fn images_encoded_by_crit_read_back() {
    let Some(crit) = crit("images_encoded_by_crit_read_back") else {
        return;
    };
    let dir = TempDir::new("critenc");
    let json = serde_json::json!({
        "magic": "PAGEMAP",
        "entries": [
            {"pages_id": 1},
            {"vaddr": 0x10000, "nr_pages": 2, "flags": 4},
            {"vaddr": 0x14000, "nr_pages": 1, "flags": 6},
            {"vaddr": 0x20000, "nr_pages": 3, "flags": 2},
        ]
    });
    let input = dir.path().join("in.json");
    std::fs::write(&input, json.to_string()).unwrap();
    let out = Command::new(&crit)
        .args(["encode", "-i"])
        .arg(&input)
        .arg("-o")
        .arg(dir.path().join("pagemap-7.img"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pages: Vec<u8> = (0..3 * ps()).map(|i| (i / ps()) as u8 + 1).collect();
    std::fs::write(dir.path().join("pages-1.img"), &pages).unwrap();
    let img = Image::open(dir.path()).unwrap();
    assert_eq!(
        img.entries(),
        &[
            PagemapEntry {
                vaddr: 0x10000,
                pages: 2,
                flags: PageFlags::PRESENT
            },
            PagemapEntry {
                vaddr: 0x14000,
                pages: 1,
                flags: PageFlags::LAZY | PageFlags::PRESENT
            },
            PagemapEntry {
                vaddr: 0x20000,
                pages: 3,
                flags: PageFlags::LAZY
            },
        ]
    );
    let mut page = vec![0u8; ps()];
    img.read(0x14000, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 3));
    assert_eq!(img.page(0x20000).unwrap(), Page::Lazy);
}

/// The real CRIU 4.2 dump restores to exactly the bytes its target describes.
#[test]
fn the_criu_fixture_restores_to_its_pattern() {
    let dir = fixtures().join("criu-4.2-a");
    let img = Image::open(&dir).unwrap();
    // Opening checked that the pages file holds exactly the present pages.
    let present: u64 = img
        .entries()
        .iter()
        .filter(|e| e.is_present())
        .map(|e| e.pages)
        .sum();
    let pages_len = std::fs::metadata(dir.join("pages-1.img")).unwrap().len();
    assert_eq!(
        present * 4096,
        pages_len,
        "every present page is accounted for"
    );
    assert!(
        img.entries()
            .iter()
            .all(|e| e.flags == PageFlags::PRESENT
                || e.flags == PageFlags::LAZY | PageFlags::PRESENT)
    );
    let target: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("target.json")).unwrap()).unwrap();
    for region in target["regions"].as_array().unwrap() {
        let addr = u64::from_str_radix(
            region["addr"].as_str().unwrap().trim_start_matches("0x"),
            16,
        )
        .unwrap();
        let pages = region["pages"].as_u64().unwrap();
        let stride = region["stride"].as_u64().unwrap();
        let seed = region["seed"].as_u64().unwrap();
        let mut got = vec![0u8; pages as usize * 4096];
        let report = img.read(addr, &mut got).unwrap();
        assert_eq!(report.present, pages.div_ceil(stride), "{region}");
        for p in 0..pages {
            let page = &got[p as usize * 4096..][..4096];
            if p % stride == 0 {
                let ok = page
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == ((i as u64 * 7 + p * 13 + seed) & 0xff) as u8);
                assert!(ok, "{} page {p} differs", region["name"]);
            } else {
                assert!(
                    page.iter().all(|&b| b == 0),
                    "untouched page {p} is not zero"
                );
            }
        }
    }
}

#[test]
fn our_encoder_reproduces_the_fixture_entries() {
    let dir = fixtures().join("criu-4.2-a");
    let bytes = std::fs::read(dir.join("pagemap-16426.img")).unwrap();
    let pm = Pagemap::decode(&bytes, 4096).unwrap();
    // Re-encoded, it decodes to the same entries (with both count fields written).
    assert_eq!(Pagemap::decode(&pm.encode(), 4096).unwrap(), pm);
    assert_eq!(pm.pages_id, 1);
}

#[test]
fn a_missing_or_looping_parent_is_an_error() {
    let root = TempDir::new("parents");
    let a = root.path().join("a");
    let b = root.path().join("b");
    for (dir, other) in [(&a, &b), (&b, &a)] {
        let mut w = ImageWriter::create(dir, 1).unwrap();
        w.push(PagemapEntry {
            vaddr: 0x1000,
            pages: 1,
            flags: PageFlags::PARENT,
        })
        .unwrap();
        w.finish().unwrap();
        std::fs::create_dir_all(other).unwrap();
    }
    match Image::open(&a).unwrap_err() {
        ImageError::MissingParent {
            entry, link: None, ..
        } => assert_eq!(entry.vaddr, 0x1000),
        e => panic!("{e}"),
    }
    std::os::unix::fs::symlink("../b", a.join("parent")).unwrap();
    std::os::unix::fs::symlink("../a", b.join("parent")).unwrap();
    let err = Image::open(&a).unwrap_err();
    assert!(matches!(err, ImageError::ParentLoop { .. }), "{err}");
    std::fs::remove_file(b.join("parent")).unwrap();
    std::os::unix::fs::symlink("../gone", b.join("parent")).unwrap();
    let err = Image::open(&a).unwrap_err();
    assert!(matches!(err, ImageError::MissingParent { .. }), "{err}");
    assert!(err.to_string().contains("pagemap-1.img"), "{err}");
}

/// Memory unmapped before the capture: `vmsplice` reports `EFAULT`, the error names the
/// first page that could not be captured, and nothing reaches a sink.
#[test]
fn unmapped_memory_is_efault_naming_the_page() {
    let good = patterned(4, 14);
    let gone = memmap2::MmapOptions::new()
        .len(4 * ps())
        .map_anon()
        .unwrap();
    let ptr = std::ptr::NonNull::new(gone.as_ptr().cast_mut()).unwrap();
    let gpa = 0x2_0000_0000u64;
    // SAFETY: this test breaks the contract on purpose, unmapping the memory below, to
    // check that the kernel's EFAULT comes back as an error. The vmsplice path makes no
    // reference to the memory, and vmsplice is allowed here (the test checks it is).
    let source = unsafe {
        Source::new()
            .with_slice(gpa, &good[..])
            .unwrap()
            .with_raw(gpa + 4 * ps() as u64, ptr, 4 * ps())
            .unwrap()
    };
    drop(gone);
    if let page_pipe_sys::VmspliceMode::Refused(e) = page_pipe_sys::probe_vmsplice().unwrap().mode {
        eprintln!("SKIPPED unmapped_memory_is_efault_naming_the_page: vmsplice refused here ({e})");
        return;
    }
    let mut pp = PagePipe::builder().iov_budget(4).build().unwrap();
    pp.add_pages(gpa, 8, BufFlags::empty()).unwrap();
    let err = pp.capture(&source).unwrap_err();
    assert_eq!(
        err,
        CaptureError::Kernel {
            addr: gpa + 4 * ps() as u64,
            errno: page_pipe_sys::Errno::FAULT,
            captured: 4
        }
    );
    assert!(err.to_string().contains("0x200004000"), "{err}");
}

/// Installs a seccomp filter on this thread that makes `vmsplice` fail with `EPERM`, as
/// container profiles do.
fn refuse_vmsplice() {
    const AUDIT_ARCH: u32 = if cfg!(target_arch = "x86_64") {
        0xC000_003E
    } else if cfg!(target_arch = "aarch64") {
        0xC000_00B7
    } else {
        0
    };
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let mut filter = [
        stmt(load, 4), // seccomp_data.arch
        jump(AUDIT_ARCH, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(load, 0), // seccomp_data.nr
        jump(libc::SYS_vmsplice as u32, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(r, 0, "PR_SET_NO_NEW_PRIVS");
    // SAFETY: `prog` points at `filter`, a valid BPF program that outlives the call; the
    // kernel copies it.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        )
    };
    assert_eq!(r, 0, "PR_SET_SECCOMP");
}

/// Under a seccomp filter that refuses `vmsplice`, the probe says so and the capture
/// copies, leaving the same bytes in the image.
#[test]
fn a_seccomp_refusal_of_vmsplice_falls_back_to_copying() {
    if !alone("a_seccomp_refusal_of_vmsplice_falls_back_to_copying") {
        return;
    }
    let mem = patterned(600, 15);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    refuse_vmsplice();
    let probe = page_pipe_sys::probe_vmsplice().unwrap();
    assert_eq!(
        probe.mode,
        page_pipe_sys::VmspliceMode::Refused(page_pipe_sys::Errno::PERM)
    );
    let dir = TempDir::new("seccomp");
    let mut w = ImageWriter::create(dir.path(), 1).unwrap();
    let plan = [Span::Pages {
        addr: BASE,
        pages: 600,
        flags: BufFlags::empty(),
    }];
    let r = snapshot(&source, plan, &mut w, &pipes()).unwrap();
    w.finish().unwrap();
    assert_eq!(r.path, CapturePath::Copy);
    assert_restores(dir.path(), BASE, &mem[..]);
}

/// A captured page pipe moves to another thread to be dumped, still borrowing its memory.
#[test]
fn a_captured_page_pipe_is_dumped_by_another_thread() {
    let mem = patterned(300, 16);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let mut pp = PagePipe::builder().iov_budget(8).build().unwrap();
    pp.add_pages(BASE, 300, BufFlags::empty()).unwrap();
    let mut captured = pp.capture(&source).unwrap();
    let dir = TempDir::new("thread");
    let path = dir.path().to_path_buf();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut w = ImageWriter::create(&path, 1).unwrap();
            captured.dump(&mut w).unwrap();
            w.finish().unwrap();
        });
    });
    assert_restores(dir.path(), BASE, &mem[..]);
}

/// Through the snapshot driver a callback gets the memory itself, with the same entries
/// and bytes the pipe path gives.
#[test]
fn a_callback_sink_is_fed_from_memory_with_the_same_entries() {
    let mem = patterned(900, 17);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let plan = mixed_plan(900, true);
    let mut outs = Vec::new();
    for drain in [Drain::Auto, Drain::Pipes] {
        let mut got: Vec<(PagemapEntry, Vec<u8>)> = Vec::new();
        let mut sink = CallbackSink::new(|e: &PagemapEntry, pages: &[u8]| {
            got.push((*e, pages.to_vec()));
            Ok(())
        });
        let opts = SnapshotOptions {
            drain,
            ..SnapshotOptions::default()
        };
        let r = snapshot(&source, plan.clone(), &mut sink, &opts).unwrap();
        drop(sink);
        assert_eq!(r.path == CapturePath::Direct, drain == Drain::Auto);
        // Join contiguous entries with equal flags, as an image writer would.
        let mut joined: Vec<(PagemapEntry, Vec<u8>)> = Vec::new();
        for (e, bytes) in got {
            match joined.last_mut() {
                Some((l, b)) if l.flags == e.flags && l.end(ps()) == Some(e.vaddr) => {
                    l.pages += e.pages;
                    b.extend(bytes);
                }
                _ => joined.push((e, bytes)),
            }
        }
        for (e, bytes) in &joined {
            if e.is_present() {
                let off = (e.vaddr - BASE) as usize;
                assert!(bytes[..] == mem[off..off + bytes.len()]);
            }
        }
        outs.push(joined);
    }
    assert!(outs[0] == outs[1]);
}
