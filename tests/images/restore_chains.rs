//! Restores through random image chains against a model of what each page should be,
//! the strict option, and threads.

use std::num::NonZeroUsize;
use std::path::Path;

use page_pipe::image::{
    Image, ImageError, ImageWriter, MIN_BYTES_PER_THREAD, Page, PageFlags, PagemapEntry,
    ReadReport, RestoreOptions,
};
use page_pipe_tests::{TempDir, Unprivileged, patterned, unprivileged};
use proptest::prelude::*;

use super::{BASE, ps};

/// What one image of a chain holds for one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Held {
    /// In no entry.
    None,
    /// In its pages file.
    Present,
    /// In its pages file, in a `LAZY | PRESENT` entry.
    LazyPresent,
    /// In a lazy entry without `PRESENT`.
    Lazy,
    /// In a `PARENT` entry.
    Parent,
}

/// A chain, base first: each level holds `pages` pages from `BASE`.
#[derive(Debug, Clone)]
pub(super) struct Chain {
    pub(super) levels: Vec<Vec<Held>>,
    /// Whether each level's writer joins contiguous entries.
    pub(super) join: Vec<bool>,
}

fn held(parent: bool) -> impl Strategy<Value = Held> {
    if parent {
        prop_oneof![
            1 => Just(Held::None),
            3 => Just(Held::Present),
            1 => Just(Held::LazyPresent),
            1 => Just(Held::Lazy),
            3 => Just(Held::Parent),
        ]
        .boxed()
    } else {
        prop_oneof![
            1 => Just(Held::None),
            3 => Just(Held::Present),
            1 => Just(Held::LazyPresent),
            1 => Just(Held::Lazy),
        ]
        .boxed()
    }
}

pub(super) fn chain() -> impl Strategy<Value = Chain> {
    (1usize..=3, 1usize..=40).prop_flat_map(|(depth, pages)| {
        let levels: Vec<_> = (0..depth)
            .map(|l| proptest::collection::vec(held(l > 0), pages))
            .collect();
        (levels, proptest::collection::vec(any::<bool>(), depth)).prop_map(|(mut levels, join)| {
            // A PARENT page needs a parent entry for it.
            for l in 1..levels.len() {
                for p in 0..levels[l].len() {
                    if levels[l][p] == Held::Parent && levels[l - 1][p] == Held::None {
                        levels[l][p] = Held::Present;
                    }
                }
            }
            Chain { levels, join }
        })
    })
}

/// The contents of page `p` as level `l` captured it.
pub(super) fn content(l: usize, p: usize) -> Vec<u8> {
    let mut v = patterned(1, (l * 64 + p) as u8 ^ 0x5a).to_vec();
    v[0] = l as u8;
    v
}

pub(super) fn write_chain(root: &Path, c: &Chain) -> Vec<std::path::PathBuf> {
    let mut dirs = Vec::new();
    for (l, level) in c.levels.iter().enumerate() {
        let dir = root.join(l.to_string());
        let mut w = ImageWriter::create(&dir, 1)
            .unwrap()
            .with_sync(false)
            .with_joining(c.join[l]);
        if l > 0 {
            w = w.with_parent(&dirs[l - 1]).unwrap();
        }
        for (p, h) in level.iter().enumerate() {
            let vaddr = BASE + (p * ps()) as u64;
            let e = |flags| PagemapEntry {
                vaddr,
                pages: 1,
                flags,
            };
            match h {
                Held::None => {}
                Held::Present => w.push_bytes(e(PageFlags::PRESENT), &content(l, p)).unwrap(),
                Held::LazyPresent => w
                    .push_bytes(e(PageFlags::LAZY | PageFlags::PRESENT), &content(l, p))
                    .unwrap(),
                Held::Lazy => w.push(e(PageFlags::LAZY)).unwrap(),
                Held::Parent => w.push(e(PageFlags::PARENT)).unwrap(),
            }
        }
        w.finish().unwrap();
        dirs.push(dir);
    }
    dirs
}

/// What the model says page `p` restores to: where it is, and its bytes.
pub(super) fn resolve(c: &Chain, p: usize) -> (Page, Vec<u8>) {
    let top = c.levels.len() - 1;
    let mut l = top;
    loop {
        match c.levels[l].get(p).copied().unwrap_or(Held::None) {
            Held::None => {
                assert_eq!(l, top, "PARENT pages are held");
                return (Page::Zero, vec![0; ps()]);
            }
            Held::Lazy => return (Page::Lazy, vec![0; ps()]),
            Held::Present | Held::LazyPresent => {
                let before = c.levels[l][..p]
                    .iter()
                    .filter(|&&h| matches!(h, Held::Present | Held::LazyPresent))
                    .count();
                let page = Page::Data {
                    depth: top - l,
                    offset: (before * ps()) as u64,
                };
                return (page, content(l, p));
            }
            Held::Parent => l -= 1,
        }
    }
}

/// The model's restore of pages `from..to` (which may pass the chain's pages): bytes,
/// report, and the first page a strict restore refuses.
pub(super) fn model(
    c: &Chain,
    from: usize,
    to: usize,
) -> (Vec<u8>, ReadReport, Option<(usize, bool)>) {
    let mut bytes = Vec::new();
    let mut r = ReadReport::default();
    let mut refused = None;
    for p in from..to {
        let (page, b) = resolve(c, p);
        match page {
            Page::Data { depth: 0, .. } => r.present += 1,
            Page::Data { .. } => r.from_parents += 1,
            Page::Zero => r.zero += 1,
            Page::Lazy => r.lazy += 1,
        }
        if refused.is_none() && matches!(page, Page::Zero | Page::Lazy) {
            refused = Some((p, page == Page::Lazy));
        }
        bytes.extend(b);
    }
    (bytes, r, refused)
}

proptest! {
    #![proptest_config(page_pipe_tests::proptest_config(48, "images"))]

    /// Every way of restoring a random chain gives what the model says, page for page:
    /// `read`, `restore` on 1 to 4 threads, `read_page`, and a strict restore that
    /// refuses the first page the chain lacks.
    #[test]
    fn restores_of_random_chains_match_the_model(
        c in chain(),
        cut in (0usize..=41, 0usize..=41),
    ) {
        let root = TempDir::new("chains");
        let dirs = write_chain(root.path(), &c);
        let img = Image::open(dirs.last().unwrap()).unwrap();
        prop_assert_eq!(img.depth(), c.levels.len());
        let pages = c.levels[0].len();
        // A range of at least a page that may end past the chain's pages.
        let from = cut.0.min(cut.1).min(pages);
        let to = cut.0.max(cut.1).max(from + 1);
        let (expect, report, refused) = model(&c, from, to);
        let vaddr = BASE + (from * ps()) as u64;
        let mut got = vec![0x77u8; (to - from) * ps()];
        let r = img.read(vaddr, &mut got).unwrap();
        prop_assert!(got == expect, "read differs");
        prop_assert_eq!(ReadReport { threads: 0, ..r }, report);
        for threads in 1..=4 {
            got.fill(0x77);
            let opts = RestoreOptions { threads: NonZeroUsize::new(threads), ..RestoreOptions::default() };
            let r = img.restore(vaddr, &mut got, &opts).unwrap();
            prop_assert!(got == expect, "restore on {} threads differs", threads);
            prop_assert_eq!(r.threads, threads.min(to - from));
        }
        let strict = RestoreOptions { strict: true, ..RestoreOptions::default() };
        got.fill(0x77);
        match (img.restore(vaddr, &mut got, &strict), refused) {
            (Ok(_), None) => prop_assert!(got == expect),
            (Err(ImageError::NotInImage { vaddr: at, lazy, .. }), Some((p, l))) => {
                prop_assert_eq!(at, BASE + (p * ps()) as u64);
                prop_assert_eq!(lazy, l);
                prop_assert!(got.iter().all(|&b| b == 0x77), "a refused plan touched dst");
            }
            (r, want) => prop_assert!(false, "strict: {:?}, model refuses {:?}", r, want),
        }
        let mut page = vec![0u8; ps()];
        for p in from..to {
            let (where_, bytes) = resolve(&c, p);
            let at = BASE + (p * ps()) as u64;
            prop_assert_eq!(img.page(at).unwrap(), where_);
            prop_assert_eq!(img.read_page(at, &mut page).unwrap(), where_);
            prop_assert!(page == bytes, "read_page of page {}", p);
        }
    }
}

#[test]
fn a_strict_restore_refuses_pages_the_chain_lacks_and_names_them() {
    let dir = TempDir::new("strict");
    let at = |p: u64| BASE + p * ps() as u64;
    let mut w = ImageWriter::create(dir.path(), 1).unwrap();
    let mem = patterned(2, 50);
    w.push_bytes(
        PagemapEntry {
            vaddr: at(0),
            pages: 2,
            flags: PageFlags::PRESENT,
        },
        &mem,
    )
    .unwrap();
    w.push(PagemapEntry {
        vaddr: at(3),
        pages: 1,
        flags: PageFlags::LAZY,
    })
    .unwrap();
    w.finish().unwrap();
    let img = Image::open(dir.path()).unwrap();
    let strict = RestoreOptions {
        strict: true,
        ..RestoreOptions::default()
    };
    let mut dst = vec![0x55u8; 4 * ps()];
    let r = img.restore(at(0), &mut dst[..2 * ps()], &strict).unwrap();
    assert_eq!((r.present, r.zero), (2, 0));
    assert!(dst[..2 * ps()] == mem[..]);
    dst.fill(0x55);
    let err = img.restore(at(0), &mut dst, &strict).unwrap_err();
    assert!(
        matches!(err, ImageError::NotInImage { vaddr, lazy: false, .. } if vaddr == at(2)),
        "{err}"
    );
    assert!(err.to_string().contains(&format!("{:#x}", at(2))), "{err}");
    assert!(err.to_string().contains("pagemap-1.img"), "{err}");
    assert!(dst.iter().all(|&b| b == 0x55), "a refused restore wrote");
    let err = img.restore(at(3), &mut dst[..ps()], &strict).unwrap_err();
    assert!(
        matches!(err, ImageError::NotInImage { vaddr, lazy: true, .. } if vaddr == at(3)),
        "{err}"
    );
    // Not strict: zeros, counted.
    let r = img.read(at(0), &mut dst).unwrap();
    assert_eq!((r.present, r.zero, r.lazy), (2, 1, 1));
    assert!(dst[2 * ps()..].iter().all(|&b| b == 0));
}

#[test]
fn a_large_restore_shares_the_work_between_threads() {
    let bytes = 2 * MIN_BYTES_PER_THREAD;
    let pages = bytes / ps();
    let mem = patterned(pages, 51);
    let dir = TempDir::new("threads");
    let mut w = ImageWriter::create(dir.path(), 1).unwrap().with_sync(false);
    // Every 16th page left out, so the plan has many segments to share.
    for p in (0..pages).filter(|p| p % 16 != 0) {
        let e = PagemapEntry {
            vaddr: BASE + (p * ps()) as u64,
            pages: 1,
            flags: PageFlags::PRESENT,
        };
        w.push_bytes(e, &mem[p * ps()..][..ps()]).unwrap();
    }
    w.finish().unwrap();
    let img = Image::open(dir.path()).unwrap();
    let mut back = vec![0x66u8; bytes];
    let r = img.read(BASE, &mut back).unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(r.threads, cpus.min(2), "{r:?}");
    assert_eq!(r.zero, pages as u64 / 16);
    for (p, page) in back.chunks(ps()).enumerate() {
        if p % 16 == 0 {
            assert!(page.iter().all(|&b| b == 0), "page {p}");
        } else {
            assert!(page == &mem[p * ps()..][..ps()], "page {p}");
        }
    }
    // A small read stays on the calling thread.
    let r = img.read(BASE, &mut back[..MIN_BYTES_PER_THREAD]).unwrap();
    assert_eq!(r.threads, 1);
}

/// With no thread to be had (user nobody at `RLIMIT_NPROC`), a restore asked for four
/// threads runs on the calling thread, with the right bytes, instead of failing.
#[test]
fn a_restore_without_threads_to_spare_runs_on_the_calling_thread() {
    let name = "restore_chains::a_restore_without_threads_to_spare_runs_on_the_calling_thread";
    if unprivileged(name) != Unprivileged::RunBody {
        return;
    }
    let mem = patterned(64, 52);
    let dir = TempDir::new("nproc");
    let mut w = ImageWriter::create(dir.path(), 1).unwrap().with_sync(false);
    let e = PagemapEntry {
        vaddr: BASE,
        pages: 64,
        flags: PageFlags::PRESENT,
    };
    w.push_bytes(e, &mem).unwrap();
    w.finish().unwrap();
    let img = Image::open(dir.path()).unwrap();
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let old = getrlimit(Resource::Nproc);
    setrlimit(
        Resource::Nproc,
        Rlimit {
            current: Some(1),
            maximum: old.maximum,
        },
    )
    .unwrap();
    assert!(
        std::thread::Builder::new().spawn(|| {}).is_err(),
        "a thread could still be started"
    );
    let mut back = vec![0u8; mem.len()];
    let opts = RestoreOptions {
        threads: NonZeroUsize::new(4),
        ..RestoreOptions::default()
    };
    let r = img.restore(BASE, &mut back, &opts).unwrap();
    assert_eq!(r.threads, 1);
    assert!(back == mem[..]);
}
