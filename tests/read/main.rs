//! Serving captured pages on demand over real pipes: random reads against a linear scan
//! (CRIU's lookup) and the memory, boundaries, flags, repeated reads and release.

use page_pipe::{BufFlags, Captured, PagePipe, ServeDest, ServeError, Source};
use page_pipe_tests::{alone, open_fds, patterned};
use proptest::prelude::*;

const BASE: u64 = 0x7f00_0000_0000;

fn ps() -> u64 {
    page_pipe_sys::page_size().get() as u64
}

fn at(i: u64) -> u64 {
    BASE + i * ps()
}

/// What a read should give, found by scanning every live buf and run as CRIU does.
fn expected(c: &Captured<'_>, addr: u64, n: u64) -> Option<(u64, BufFlags)> {
    for b in c.page_pipe().bufs() {
        for r in b.runs {
            let end = r.end(ps() as usize);
            if r.vaddr() <= addr && addr < end {
                return Some((((end - addr) / ps()).min(n), b.flags));
            }
        }
    }
    None
}

/// Reads and checks one request against the scan and the memory.
fn check_read(
    c: &mut Captured<'_>,
    dest: &mut ServeDest,
    mem: &[u8],
    page: u64,
    n: u64,
    want: BufFlags,
) -> Result<u64, String> {
    let addr = at(page);
    let exp = expected(c, addr, n);
    match (c.serve(dest, addr, n, want), exp) {
        (Ok(s), None) if s.pages() == 0 => Ok(0),
        (Err(ServeError::Flags { have, .. }), Some((_, flags))) if !flags.contains(want) => {
            assert_eq!(have, flags);
            Ok(0)
        }
        (Ok(mut s), Some((pages, flags))) if flags.contains(want) => {
            if s.pages() != pages {
                return Err(format!(
                    "read {page:#x}+{n}: {} pages, expected {pages}",
                    s.pages()
                ));
            }
            let mut got = vec![0u8; (pages * ps()) as usize];
            s.read_into(&mut got).map_err(|e| e.to_string())?;
            let off = (page * ps()) as usize;
            if got[..] != mem[off..off + got.len()] {
                return Err(format!("read {page:#x}+{n}: bytes differ"));
            }
            Ok(pages)
        }
        (r, e) => Err(format!(
            "read {page:#x}+{n} {want:?}: got {:?}, expected {e:?}",
            r.map(|s| s.pages())
        )),
    }
}

proptest! {
    #![proptest_config(page_pipe_tests::proptest_config(150, "read"))]

    #[test]
    fn random_reads_match_a_linear_scan_and_the_memory(
        layout in proptest::collection::vec((0u64..3, 1u64..120, any::<bool>()), 1..25),
        lazy_pages in any::<bool>(),
        release_before in proptest::collection::vec(any::<usize>(), 0..3),
        reads in proptest::collection::vec((any::<u64>(), 1u64..300, any::<bool>()), 1..60),
    ) {
        let span: u64 = layout.iter().map(|(g, n, _)| g + n).sum();
        let mem = patterned(span as usize + 1, 21);
        let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
        let mut pp = PagePipe::builder()
            .iov_budget(256)
            .lazy_pages(lazy_pages)
            .build()
            .unwrap();
        let mut next = 0;
        for &(gap, n, lazy) in &layout {
            let flags = if lazy { BufFlags::LAZY } else { BufFlags::empty() };
            pp.add_pages(at(next + gap), n, flags).unwrap();
            next += gap + n;
        }
        for k in release_before {
            let ids: Vec<_> = pp.bufs().map(|b| b.id).collect();
            if !ids.is_empty() {
                pp.release_buf(ids[k % ids.len()]).unwrap();
            }
        }
        let mut c = pp.capture(&source).unwrap();
        let mut dest = ServeDest::for_captured(&c).unwrap();
        for (p, n, lazy) in reads {
            let want = if lazy { BufFlags::LAZY } else { BufFlags::empty() };
            check_read(&mut c, &mut dest, &mem, p % (span + 2), n, want)
                .map_err(TestCaseError::fail)?;
        }
    }
}

#[test]
fn boundaries_of_runs_bufs_and_shared_pipes() {
    let mem = patterned(700, 22);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    // Pipes of at most 64 pages (whatever the machine grants beyond), so that the layout
    // below holds on any machine that grants 64.
    let cap = 64u64.min(page_pipe_sys::PipeLimits::get().unwrap().max_grant_pages() as u64);
    let mut pp = PagePipe::builder()
        .iov_budget(64)
        .max_pipe_pages(cap)
        .build()
        .unwrap();
    // A contiguous run longer than a pipe: the first pipe fills at `cap`, so the run is
    // split across bufs.
    let long = cap + 44;
    pp.add_pages(at(0), long, BufFlags::empty()).unwrap();
    // Bufs of changing flags sharing a pipe, at offsets.
    pp.add_pages(at(long + 10), 5, BufFlags::LAZY).unwrap();
    pp.add_pages(at(long + 20), 7, BufFlags::empty()).unwrap();
    pp.add_pages(at(long + 30), 2, BufFlags::LAZY).unwrap();
    let bufs: Vec<_> = pp.bufs().map(|b| (b.pipe, b.pipe_off, b.pages)).collect();
    let first = bufs[0].2;
    assert_eq!(first, cap);
    let n = bufs.len();
    assert_eq!(bufs[n - 3].0, bufs[n - 2].0, "shared pipe");
    assert!(bufs[n - 1].1 > 0, "the last buf starts at an offset");
    let mut c = pp.capture(&source).unwrap();
    let mut d = ServeDest::for_captured(&c).unwrap();
    let e = BufFlags::empty();
    let second = bufs[1].2;
    let cases = [
        (0, 1, 1),                   // first page of a run
        (0, 1000, first),            // clamped at the end of the first buf's run
        (first - 1, 10, 1),          // last page of the first buf
        (first, 10, 10.min(second)), // first page of the second buf
        (long - 1, 5, 1),            // last page of the split run
        (long, 5, 0),                // a gap
        (long + 14, 3, 1),           // last page of a shared-pipe buf
        (long + 20, 100, 7),         // a buf at an offset in a shared pipe
        (long + 31, 1, 1),
    ];
    for (page, n, pages) in cases {
        let got = check_read(&mut c, &mut d, &mem, page, n, e).unwrap();
        assert_eq!(got, pages, "page {page} n {n}");
    }
    // The same pages again: the source pipes keep them.
    for (page, n, pages) in cases {
        assert_eq!(check_read(&mut c, &mut d, &mem, page, n, e).unwrap(), pages);
    }
}

#[test]
fn flags_dumps_and_releases() {
    if !alone("flags_dumps_and_releases") {
        return;
    }
    let before = open_fds();
    let mem = patterned(64, 23);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let mut pp = PagePipe::builder()
        .iov_budget(16)
        .lazy_pages(true)
        .build()
        .unwrap();
    pp.add_pages(at(0), 8, BufFlags::empty()).unwrap();
    pp.add_pages(at(8), 8, BufFlags::LAZY).unwrap();
    pp.add_pages(at(16), 2, BufFlags::empty()).unwrap();
    // A second lazy buf, sharing the first one's pipe.
    pp.add_pages(at(20), 8, BufFlags::LAZY).unwrap();
    let mut c = pp.capture(&source).unwrap();
    let mut d = ServeDest::for_captured(&c).unwrap();
    // Asking lazy pages of a plain buf is an error naming the address.
    let err = c.serve(&mut d, at(1), 1, BufFlags::LAZY).unwrap_err();
    assert_eq!(
        err,
        ServeError::Flags {
            addr: at(1),
            have: BufFlags::empty(),
            want: BufFlags::LAZY
        }
    );
    assert!(err.to_string().contains(&format!("{:#x}", at(1))));
    // After a dump the plain pages are gone, the lazy ones stay.
    let mut sink = page_pipe::CallbackSink::new(|_: &_, _: &[u8]| Ok(()));
    c.dump(&mut sink).unwrap();
    assert_eq!(
        c.serve(&mut d, at(0), 1, BufFlags::empty()).unwrap_err(),
        ServeError::Dumped { addr: at(0) }
    );
    // Serve the first lazy buf in full, in two reads; then release it.
    let s = c.serve(&mut d, at(8), 5, BufFlags::LAZY).unwrap();
    assert!(!s.buf_done());
    drop(s); // discards the pages waiting in the destination
    let s = c.serve(&mut d, at(12), 8, BufFlags::LAZY).unwrap();
    assert_eq!(s.pages(), 4);
    assert!(s.buf_done());
    let id = s.buf().unwrap();
    drop(s);
    let open = c.page_pipe().open_pipes();
    c.release_buf(id).unwrap();
    assert_eq!(
        c.page_pipe().open_pipes(),
        open,
        "the lazy pipe is still shared"
    );
    assert_eq!(
        c.serve(&mut d, at(8), 1, BufFlags::LAZY).unwrap().pages(),
        0
    );
    // The other lazy buf, behind the released one's pages in the pipe, still serves
    // byte for byte; served in full and released, it closes the pipe.
    assert_eq!(
        check_read(&mut c, &mut d, &mem, 22, 8, BufFlags::LAZY).unwrap(),
        6
    );
    let s = c.serve(&mut d, at(20), 2, BufFlags::LAZY).unwrap();
    assert!(s.buf_done());
    let id = s.buf().unwrap();
    drop(s);
    c.release_buf(id).unwrap();
    assert_eq!(c.page_pipe().open_pipes(), open - 1, "the lazy pipe closed");
    drop((c, d));
    assert_eq!(open_fds(), before);
}

#[test]
fn served_pages_splice_into_a_socket() {
    let mem = patterned(32, 24);
    let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
    let mut pp = PagePipe::builder().iov_budget(4).build().unwrap();
    pp.add_pages(at(0), 32, BufFlags::empty()).unwrap();
    let mut c = pp.capture(&source).unwrap();
    let mut d = ServeDest::for_captured(&c).unwrap();
    let (mut rx, tx) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut s = c.serve(&mut d, at(3), 4, BufFlags::empty()).unwrap();
    s.splice_into(&tx).unwrap();
    assert_eq!(s.bytes_left(), 0);
    drop(s);
    let mut got = vec![0u8; 4 * ps() as usize];
    std::io::Read::read_exact(&mut rx, &mut got).unwrap();
    assert!(got[..] == mem[3 * ps() as usize..7 * ps() as usize]);
    // A wrongly sized buffer is refused, and the pages stay for the right one.
    let mut s = c.serve(&mut d, at(0), 1, BufFlags::empty()).unwrap();
    assert!(s.read_into(&mut [0u8; 10]).is_err());
    let mut page = vec![0u8; ps() as usize];
    s.read_into(&mut page).unwrap();
    assert!(page[..] == mem[..ps() as usize]);
    drop(s);
    assert_eq!(
        c.serve(&mut d, at(1) + 8, 1, BufFlags::empty())
            .unwrap_err(),
        ServeError::Unaligned { addr: at(1) + 8 }
    );
}
