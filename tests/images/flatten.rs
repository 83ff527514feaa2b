//! Flattening chains and diffing images: random chains against the model, and the real
//! CRIU 4.2 fixtures.

use std::path::Path;

use page_pipe::image::{
    self, DiffKind, DiffSpan, FlattenOptions, Image, ImageWriter, Page, PageFlags, PagemapEntry,
};
use page_pipe_tests::{TempDir, fixtures};
use proptest::prelude::*;

use super::restore_chains::{Chain, Held, chain, content, resolve, write_chain};
use super::{BASE, ps};

const NO_SYNC: FlattenOptions = FlattenOptions {
    sync: false,
    progress: None,
};

/// The flags the model says a flattened image gives page `p`: those of the entry of the
/// nearest level that holds it (`None`: in no entry).
fn flags_of(c: &Chain, p: usize) -> Option<PageFlags> {
    let mut l = c.levels.len() - 1;
    loop {
        match c.levels[l].get(p).copied().unwrap_or(Held::None) {
            Held::None => return None,
            Held::Present => return Some(PageFlags::PRESENT),
            Held::LazyPresent => return Some(PageFlags::LAZY | PageFlags::PRESENT),
            Held::Lazy => return Some(PageFlags::LAZY),
            Held::Parent => l -= 1,
        }
    }
}

fn at(p: usize) -> u64 {
    BASE + (p * ps()) as u64
}

/// The entry of `img` that holds `vaddr`, if one does.
fn entry_of(img: &Image, vaddr: u64) -> Option<PagemapEntry> {
    img.entries()
        .iter()
        .find(|e| e.vaddr <= vaddr && vaddr < e.vaddr + e.pages * ps() as u64)
        .copied()
}

/// How the model says two chains hold page `p` differently (`None`: the same).
fn model_diff(a: &Chain, b: &Chain, p: usize) -> Option<DiffKind> {
    let (pa, ba) = resolve(a, p);
    let (pb, bb) = resolve(b, p);
    match (pa, pb) {
        (Page::Zero, Page::Zero) | (Page::Lazy, Page::Lazy) => None,
        (_, Page::Zero) => Some(DiffKind::OnlyInA),
        (Page::Zero, _) => Some(DiffKind::OnlyInB),
        (Page::Lazy, _) | (_, Page::Lazy) => Some(DiffKind::Lazy),
        _ => (ba != bb).then_some(DiffKind::Bytes),
    }
}

/// Spans, one page at a time.
fn per_page(spans: &[DiffSpan]) -> Vec<(u64, DiffKind)> {
    spans
        .iter()
        .flat_map(|s| (0..s.pages).map(move |i| (s.vaddr + i * ps() as u64, s.kind)))
        .collect()
}

fn pages_of(c: &Chain) -> usize {
    c.levels[0].len()
}

proptest! {
    #![proptest_config(page_pipe_tests::proptest_config(48, "images"))]

    /// A flattened random chain is one image that restores, page for page, to what the
    /// chain restores, keeps each page's flags (lazy ones lazy), holds no page the chain
    /// lacks, joins what it can, and diffs equal to the chain.
    #[test]
    fn a_flattened_random_chain_restores_what_the_chain_restores(c in chain()) {
        let root = TempDir::new("flatten-prop");
        let dirs = write_chain(root.path(), &c);
        let top = Image::open(dirs.last().unwrap()).unwrap();
        let flat_dir = root.path().join("flat");
        let summary = top.flatten(&flat_dir, &NO_SYNC).unwrap();
        let flat = Image::open(&flat_dir).unwrap();
        prop_assert_eq!(flat.depth(), 1);
        prop_assert_eq!(flat.id(), top.id());
        let pages = pages_of(&c);
        let (mut present, mut lazy) = (0, 0);
        let mut page = vec![0u8; ps()];
        for p in 0..=pages {
            let (want, bytes) = resolve(&c, p);
            let got = flat.read_page(at(p), &mut page).unwrap();
            match want {
                Page::Data { .. } => {
                    present += 1;
                    prop_assert!(matches!(got, Page::Data { depth: 0, .. }), "page {}: {:?}", p, got);
                }
                other => prop_assert_eq!(got, other, "page {}", p),
            }
            if want == Page::Lazy {
                lazy += 1;
            }
            prop_assert!(page == bytes, "page {} differs", p);
            prop_assert_eq!(entry_of(&flat, at(p)).map(|e| e.flags), flags_of(&c, p), "page {}", p);
        }
        prop_assert_eq!((summary.present_pages, summary.lazy_pages, summary.parent_pages), (present, lazy, 0));
        // Joined: no two entries that touch have the same flags.
        for w in flat.entries().windows(2) {
            prop_assert!(w[0].vaddr + w[0].pages * ps() as u64 != w[1].vaddr || w[0].flags != w[1].flags, "{} and {} not joined", w[0], w[1]);
        }
        prop_assert!(flat.diff(&top).unwrap().is_empty());
        prop_assert!(top.diff(&flat).unwrap().is_empty());
    }

    /// The diff of two random chains says, page for page, what comparing the model's
    /// pages says; and a chain is equal to itself.
    #[test]
    fn diffs_of_random_chains_match_a_page_by_page_comparison(a in chain(), b in chain()) {
        let root = TempDir::new("diff-prop");
        let da = write_chain(&root.path().join("a"), &a);
        let db = write_chain(&root.path().join("b"), &b);
        let ia = Image::open(da.last().unwrap()).unwrap();
        let ib = Image::open(db.last().unwrap()).unwrap();
        let want: Vec<(u64, DiffKind)> = (0..=pages_of(&a).max(pages_of(&b)))
            .filter_map(|p| model_diff(&a, &b, p).map(|k| (at(p), k)))
            .collect();
        let spans = ia.diff(&ib).unwrap();
        prop_assert_eq!(per_page(&spans), want);
        // Spans are joined: none touches the next with the same kind.
        for w in spans.windows(2) {
            prop_assert!(w[0].vaddr + w[0].pages * ps() as u64 != w[1].vaddr || w[0].kind != w[1].kind);
        }
        let swap = |k| match k {
            DiffKind::OnlyInA => DiffKind::OnlyInB,
            DiffKind::OnlyInB => DiffKind::OnlyInA,
            k => k,
        };
        let back: Vec<_> = per_page(&ib.diff(&ia).unwrap()).into_iter().map(|(v, k)| (v, swap(k))).collect();
        prop_assert_eq!(back, per_page(&spans));
        prop_assert!(ia.diff(&ia).unwrap().is_empty());
    }
}

/// `entries` with each run of touching entries of equal flags joined into one.
fn joined(entries: &[PagemapEntry]) -> Vec<PagemapEntry> {
    let mut out: Vec<PagemapEntry> = Vec::new();
    for e in entries {
        match out.last_mut() {
            Some(l) if l.flags == e.flags && l.vaddr + l.pages * ps() as u64 == e.vaddr => {
                l.pages += e.pages
            }
            _ => out.push(*e),
        }
    }
    out
}

/// Flattens the image in `src` and checks the result against it: one image, same ids,
/// the same entries joined where they touch with equal flags, same bytes over every
/// entry, no difference. Returns it.
fn flatten_and_compare(src: &Path, dst: &Path) -> Image {
    let orig = Image::open(src).unwrap();
    let summary = image::flatten(src, dst, &FlattenOptions::default()).unwrap();
    let flat = Image::open(dst).unwrap();
    assert_eq!(flat.depth(), 1);
    assert_eq!(flat.id(), orig.id());
    assert_eq!(flat.pagemap().pages_id, orig.pagemap().pages_id);
    assert_eq!(flat.pages_path().file_name(), orig.pages_path().file_name());
    let present: u64 = orig
        .entries()
        .iter()
        .filter(|e| e.is_present())
        .map(|e| e.pages)
        .sum();
    assert_eq!(summary.present_pages, present);
    assert_eq!(flat.entries(), joined(orig.entries()));
    for e in orig.entries() {
        let len = (e.pages * ps() as u64) as usize;
        let (mut a, mut b) = (vec![1u8; len], vec![2u8; len]);
        orig.read(e.vaddr, &mut a).unwrap();
        flat.read(e.vaddr, &mut b).unwrap();
        assert!(a == b, "entry {e} restores differently");
        for p in 0..e.pages {
            let f = entry_of(&flat, e.vaddr + p * ps() as u64).expect("page kept");
            assert_eq!(f.flags, e.flags, "flags of entry {e}");
        }
    }
    assert_eq!(orig.diff(&flat).unwrap(), []);
    flat
}

/// Every page of each region of a fixture's `target.json` restores from `img` to the
/// pattern (written pages) or zeros (the others).
fn check_pattern(img: &Image, target: &Path) {
    let target: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(target).unwrap()).unwrap();
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
        img.read(addr, &mut got).unwrap();
        for p in 0..pages {
            let page = &got[p as usize * 4096..][..4096];
            let want = |i: usize| {
                if p % stride == 0 {
                    ((i as u64 * 7 + p * 13 + seed) & 0xff) as u8
                } else {
                    0
                }
            };
            assert!(
                page.iter().enumerate().all(|(i, &b)| b == want(i)),
                "{} page {p}",
                region["name"]
            );
        }
    }
}

/// The real CRIU 4.2 dump, flattened, is the same image: same pages, bytes and flags,
/// its pattern intact.
#[test]
fn the_criu_fixture_flattens_to_itself() {
    if ps() != 4096 {
        eprintln!("SKIPPED the_criu_fixture_flattens_to_itself: the fixture has 4 KiB pages");
        return;
    }
    let src = fixtures().join("criu-4.2-a");
    let root = TempDir::new("flatten-criu");
    let flat = flatten_and_compare(&src, &root.path().join("flat"));
    check_pattern(&flat, &src.join("target.json"));
}

/// The images CRIU 4.2's page server wrote (one entry per message, pages id 65537):
/// flattened, the same image.
#[test]
fn the_criu_page_server_fixture_flattens_to_itself() {
    if ps() != 4096 {
        eprintln!(
            "SKIPPED the_criu_page_server_fixture_flattens_to_itself: the fixture has 4 KiB pages"
        );
        return;
    }
    let src = fixtures().join("criu-4.2-page-server-a");
    let orig = Image::open(&src).unwrap();
    assert_eq!((orig.id(), orig.pagemap().pages_id), (12856, 65537));
    let root = TempDir::new("flatten-ps");
    let flat = flatten_and_compare(&src, &root.path().join("flat"));
    check_pattern(&flat, &src.join("target.json"));
    assert_eq!(image::diff(&src, root.path().join("flat")).unwrap(), []);
    // Written again one entry per page, as unjoined as can be: it flattens to the same.
    let split = root.path().join("split");
    let mut w = ImageWriter::create_with_pages_id(&split, 12856, 65537)
        .unwrap()
        .with_sync(false)
        .with_joining(false);
    let mut page = vec![0u8; ps()];
    for e in orig.entries() {
        for p in 0..e.pages {
            let one = PagemapEntry {
                vaddr: e.vaddr + p * ps() as u64,
                pages: 1,
                ..*e
            };
            orig.read_page(one.vaddr, &mut page).unwrap();
            w.push_bytes(one, &page).unwrap();
        }
    }
    w.finish().unwrap();
    let pieces = Image::open(&split).unwrap();
    assert!(pieces.entries().len() > orig.entries().len());
    assert_eq!(pieces.diff(&orig).unwrap(), []);
    let again = flatten_and_compare(&split, &root.path().join("again"));
    assert_eq!(again.entries(), flat.entries());
}

/// Flattening an image into its own directory replaces it atomically with the full
/// image: the `parent` link goes, the pages stay.
#[test]
fn a_chain_flattened_in_place_becomes_a_full_image() {
    let root = TempDir::new("flatten-in-place");
    let (d1, d2) = (root.path().join("1"), root.path().join("2"));
    let mut w = ImageWriter::create(&d1, 1).unwrap().with_sync(false);
    let e = |p: usize, pages, flags| PagemapEntry {
        vaddr: at(p),
        pages,
        flags,
    };
    w.push_bytes(
        e(0, 4, PageFlags::PRESENT),
        &[content(0, 0), content(0, 1), content(0, 2), content(0, 3)].concat(),
    )
    .unwrap();
    w.finish().unwrap();
    let mut w = ImageWriter::create(&d2, 1)
        .unwrap()
        .with_sync(false)
        .with_parent(&d1)
        .unwrap();
    w.push(e(0, 2, PageFlags::PARENT)).unwrap();
    w.push_bytes(e(2, 1, PageFlags::PRESENT), &content(1, 2))
        .unwrap();
    w.push(e(3, 1, PageFlags::PARENT)).unwrap();
    w.finish().unwrap();
    let chain = Image::open(&d2).unwrap();
    let mut before = vec![0u8; 4 * ps()];
    chain.read(at(0), &mut before).unwrap();
    chain.flatten(&d2, &NO_SYNC).unwrap();
    assert!(std::fs::symlink_metadata(d2.join("parent")).is_err());
    let flat = Image::open(&d2).unwrap();
    assert_eq!(flat.depth(), 1);
    assert_eq!(
        flat.entries(),
        [e(0, 4, PageFlags::PRESENT)],
        "one joined entry"
    );
    let mut after = vec![0u8; 4 * ps()];
    flat.read(at(0), &mut after).unwrap();
    assert!(before == after);
    // Nothing else is left in the directory: the pagemap and the pages file.
    let mut names: Vec<_> = std::fs::read_dir(&d2)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["pagemap-1.img", "pages-1.img"]);
}

/// Restoring on several threads, mapping, flattening (also when it fails) and diffing
/// leave no file descriptor and no thread behind.
#[test]
fn restore_map_flatten_and_diff_leave_no_fds_or_threads() {
    if !page_pipe_tests::alone("flatten::restore_map_flatten_and_diff_leave_no_fds_or_threads") {
        return;
    }
    let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
    let root = TempDir::new("flatten-fds");
    let (d1, d2) = (root.path().join("1"), root.path().join("2"));
    let mut w = ImageWriter::create(&d1, 1).unwrap().with_sync(false);
    let pages = 256;
    let bytes: Vec<u8> = (0..pages).flat_map(|p| content(0, p)).collect();
    w.push_bytes(
        PagemapEntry {
            vaddr: at(0),
            pages: pages as u64,
            flags: PageFlags::PRESENT,
        },
        &bytes,
    )
    .unwrap();
    w.finish().unwrap();
    let mut w = ImageWriter::create(&d2, 1)
        .unwrap()
        .with_sync(false)
        .with_parent(&d1)
        .unwrap();
    for p in 0..pages {
        let e = PagemapEntry {
            vaddr: at(p),
            pages: 1,
            flags: if p % 3 == 0 {
                PageFlags::PRESENT
            } else {
                PageFlags::PARENT
            },
        };
        if p % 3 == 0 {
            w.push_bytes(e, &content(1, p)).unwrap();
        } else {
            w.push(e).unwrap();
        }
    }
    w.finish().unwrap();
    let (fds, tasks) = (page_pipe_tests::open_fds(), threads());
    {
        let img = Image::open(&d2).unwrap();
        let mut back = vec![0u8; pages * ps()];
        let opts = page_pipe::image::RestoreOptions {
            threads: std::num::NonZeroUsize::new(4),
            ..Default::default()
        };
        assert_eq!(img.restore(at(0), &mut back, &opts).unwrap().threads, 4);
        let mut mem = memmap2::MmapOptions::new()
            .len(pages * ps())
            .map_anon()
            .unwrap();
        // SAFETY: `mem` is ours, no reference into it is alive across the call, and the
        // files stay unchanged while it is mapped.
        unsafe {
            img.map_into(
                at(0),
                mem.as_mut_ptr(),
                mem.len(),
                &page_pipe::image::MapOptions::default(),
            )
        }
        .unwrap();
        assert!(mem[..] == back[..]);
        drop(mem);
        img.flatten(root.path().join("flat"), &NO_SYNC).unwrap();
        assert_eq!(image::diff(&d2, root.path().join("flat")).unwrap(), []);
        // A flatten that fails: the parent's pages cut short.
        std::fs::OpenOptions::new()
            .write(true)
            .open(d1.join("pages-1.img"))
            .unwrap()
            .set_len(ps() as u64)
            .unwrap();
        assert!(img.flatten(root.path().join("bad"), &NO_SYNC).is_err());
    }
    assert_eq!(
        page_pipe_tests::open_fds(),
        fds,
        "file descriptors left open"
    );
    assert_eq!(threads(), tasks, "threads left running");
}
