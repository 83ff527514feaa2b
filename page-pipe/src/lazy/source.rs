//! Where a lazy restore takes its pages from: a local image chain, a page server, or
//! both (CRIU's way), planned once into pieces of the destination, each read one way.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::image::{Image, ImageError, RestoreOptions, SegmentKind, read_exact_at};
use crate::page_server::{ClientError, PageServerClient};

use super::LazyError;

/// Where a lazy restore takes its pages from.
///
/// - [`image`](Self::image): a local image chain; each page from the nearest image that
///   holds it ([`Image::plan`]), read with positional reads; pages in no entry (and
///   lazy pages the chain does not hold) are zeros, as [`Image::restore`] makes them.
/// - [`image`](Self::image) then [`with_page_server`](Self::with_page_server): CRIU's
///   lazy migration. The image's lazy pages (`LAZY` entries without `PRESENT`) come from
///   a page server (`GET` for the image's id), the rest as above.
/// - [`page_server`](Self::page_server): every page from a page server, for the runs
///   it holds; pages outside them are zeros.
///
/// A page the plan says is zeros is mapped with `UFFDIO_ZEROPAGE`, as CRIU's lazy-pages
/// daemon maps a zero page for an address in no lazy range. A page the plan says the
/// server holds and the server does not send (it ends the session, as CRIU's server does
/// for a page it lacks) fails the restore with [`LazyError::Remote`]: CRIU's daemon fails
/// too; guessing zeros there would hand the program memory that is wrong.
///
/// ```
/// use page_pipe::image::{Image, ImageWriter, PageFlags, PagemapEntry};
/// use page_pipe::lazy::LazySource;
/// let dir = std::env::temp_dir().join(format!("pp-doc-lazy-source-{}", std::process::id()));
/// let ps = page_pipe::page_size();
/// let mut w = ImageWriter::create(&dir, 1)?;
/// w.push_bytes(PagemapEntry { vaddr: 0, pages: 1, flags: PageFlags::PRESENT }, &vec![1; ps])?;
/// w.finish()?;
/// let source = LazySource::image(Image::open(&dir)?);
/// println!("{source:?}");
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct LazySource {
    image: Option<Arc<Image>>,
    server: Option<ServerSource>,
}

#[derive(Debug)]
struct ServerSource {
    client: PageServerClient,
    id: u64,
    /// The runs the server holds, `(vaddr, pages)`; `None`: the image's lazy pages.
    held: Option<Vec<(u64, u64)>>,
}

impl LazySource {
    /// Pages from the image chain `image` (an [`Image`] or an `Arc<Image>`).
    pub fn image(image: impl Into<Arc<Image>>) -> Self {
        Self {
            image: Some(image.into()),
            server: None,
        }
    }

    /// The image's lazy pages (in `LAZY` entries without `PRESENT`, anywhere in its
    /// chain) from the page server `client` is connected to, asked for with `GET` under
    /// the image's id ([`Image::id`]), as CRIU's lazy-pages daemon asks the dumping host.
    /// Without a page server those pages are zeros. Replaces a server given before: on a
    /// source made by [`page_server`](Self::page_server), the new server is asked for the
    /// same image id and runs.
    ///
    /// ```no_run
    /// use page_pipe::image::Image;
    /// use page_pipe::lazy::LazySource;
    /// use page_pipe::page_server::PageServerClient;
    /// let client = PageServerClient::connect_tcp("10.0.0.1:4000")?;
    /// let source = LazySource::image(Image::open("restore/1")?).with_page_server(client);
    /// # let _ = source;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_page_server(mut self, client: PageServerClient) -> Self {
        let (id, held) = match (&self.image, self.server.take()) {
            (Some(image), _) => (image.id(), None),
            (None, Some(before)) => (before.id, before.held),
            // No constructor makes a source without both; held: nothing.
            (None, None) => (0, Some(Vec::new())),
        };
        self.server = Some(ServerSource { client, id, held });
        self
    }

    /// Every page from the page server `client` is connected to (`GET` under image id
    /// `id`), for the runs `held` lists as `(vaddr, pages)` (in any order; they may
    /// touch or overlap, and are rounded out to whole pages): what the server holds, as the pagemap copied to this host says
    /// ([`runs_held`] lists them for an image chain). Pages in no run are zeros.
    ///
    /// ```no_run
    /// use page_pipe::image::Image;
    /// use page_pipe::lazy::{LazySource, runs_held};
    /// use page_pipe::page_server::PageServerClient;
    /// // The pagemap tells which pages the server's image holds; the pages stay there.
    /// let layout = Image::open("pagemap-only/1")?;
    /// let client = PageServerClient::connect_tcp("10.0.0.1:4000")?;
    /// let source = LazySource::page_server(client, layout.id(), runs_held(&layout)?);
    /// # let _ = source;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn page_server(
        client: PageServerClient,
        id: u64,
        held: impl IntoIterator<Item = (u64, u64)>,
    ) -> Self {
        Self {
            image: None,
            server: Some(ServerSource {
                client,
                id,
                held: Some(held.into_iter().collect()),
            }),
        }
    }
}

/// The runs of pages the image chain `image` holds in a pages file (present, here or
/// in a parent), as `(vaddr, pages)` in address order, each as long as it can be: what
/// a page server serving that chain answers `GET` for.
///
/// ```
/// use page_pipe::image::{Image, ImageWriter, PageFlags, PagemapEntry};
/// let dir = std::env::temp_dir().join(format!("pp-doc-runs-held-{}", std::process::id()));
/// let ps = page_pipe::page_size() as u64;
/// let mut w = ImageWriter::create(&dir, 1)?;
/// let e = |vaddr, flags| PagemapEntry { vaddr, pages: 2, flags };
/// w.push_bytes(e(0, PageFlags::PRESENT), &vec![1; 2 * ps as usize])?;
/// w.push(e(2 * ps, PageFlags::LAZY))?; // a lazy-pages server holds these, not the image
/// w.push_bytes(e(8 * ps, PageFlags::PRESENT), &vec![2; 2 * ps as usize])?;
/// w.finish()?;
/// let runs = page_pipe::lazy::runs_held(&Image::open(&dir)?)?;
/// assert_eq!(runs, [(0, 2), (8 * ps, 2)]);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// As [`Image::plan`] ([`ImageError::NotInParent`] for a broken chain).
pub fn runs_held(image: &Image) -> Result<Vec<(u64, u64)>, ImageError> {
    let ps = image.page_size() as u64;
    let (Some(first), Some(last)) = (image.entries().first(), image.entries().last()) else {
        return Ok(Vec::new());
    };
    let end = last.vaddr + last.pages * ps;
    let plan = image.plan(first.vaddr, end - first.vaddr, &RestoreOptions::default())?;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for s in &plan.segments {
        if !matches!(s.kind, SegmentKind::Pages { .. }) {
            continue;
        }
        match runs.last_mut() {
            Some((v, n)) if *v + *n * ps == s.vaddr => *n += s.len / ps,
            _ => runs.push((s.vaddr, s.len / ps)),
        }
    }
    Ok(runs)
}

/// Where the pages of a [`Piece`] come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum From {
    /// The pages file of the image `depth` parents up, from byte `offset` (the piece's
    /// first page).
    File { depth: usize, offset: u64 },
    /// Zeros (`UFFDIO_ZEROPAGE`).
    Zero,
    /// The page server (`GET`).
    Remote,
}

/// A run of pages of the destination, counted in pages from its start, read one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Piece {
    pub first: u64,
    pub pages: u64,
    pub from: From,
}

impl Piece {
    pub fn end(&self) -> u64 {
        self.first + self.pages
    }
}

/// The pieces covering `pages` pages from `vaddr`, in order and without gaps.
#[derive(Debug)]
pub(super) struct Plan {
    pub pieces: Vec<Piece>,
}

impl Plan {
    /// The piece holding page `p` (which is in the range).
    pub fn at(&self, p: u64) -> &Piece {
        let i = self.pieces.partition_point(|s| s.end() <= p);
        &self.pieces[i]
    }

    fn push(&mut self, first: u64, pages: u64, from: From, ps: u64) {
        if pages == 0 {
            return;
        }
        if let Some(last) = self.pieces.last_mut() {
            let joined = match (last.from, from) {
                (
                    From::File { depth: a, offset },
                    From::File {
                        depth: b,
                        offset: o,
                    },
                ) => a == b && offset + last.pages * ps == o,
                (a, b) => a == b,
            };
            if joined && last.end() == first {
                last.pages += pages;
                return;
            }
        }
        self.pieces.push(Piece { first, pages, from });
    }
}

/// A source, ready to be read by the restore's threads.
#[derive(Debug)]
pub(super) struct Reader {
    image: Option<Arc<Image>>,
    remote: Option<Remote>,
    vaddr: u64,
    ps: usize,
}

#[derive(Debug)]
struct Remote {
    /// `None` once the session was closed (the restore is complete).
    client: Mutex<Option<PageServerClient>>,
    peer: crate::page_server::Peer,
    id: u64,
    /// Fault-thread requests waiting for the client: the prefetch thread lets them go
    /// first.
    waiting: AtomicU32,
    /// A second descriptor of the connection, to shut it down when the restore stops
    /// (which wakes a thread blocked on it).
    socket: Option<OwnedFd>,
}

impl LazySource {
    /// Plans `pages` pages from `vaddr`, and makes the reader.
    pub(super) fn prepare(
        self,
        vaddr: u64,
        pages: u64,
        ps: usize,
        strict: bool,
    ) -> Result<(Plan, Reader), LazyError> {
        let ps64 = ps as u64;
        // `pages` comes from a length in bytes, so `pages * ps` does not overflow; the
        // address and its end are checked here for every source (the image's plan checks
        // them too, the page server's runs are planned below from them).
        let len = pages * ps64;
        crate::addr::PageRange::of_bytes(vaddr, len, ps)
            .map_err(|_| LazyError::Plan(ImageError::BadRange { vaddr, len }))?;
        let mut plan = Plan { pieces: Vec::new() };
        match (&self.image, &self.server) {
            (Some(img), server) => {
                let segs = img
                    .plan(vaddr, pages * ps64, &RestoreOptions::default())
                    .map_err(LazyError::Plan)?;
                for s in &segs.segments {
                    let first = (s.vaddr - vaddr) / ps64;
                    let n = s.len / ps64;
                    let from = match s.kind {
                        SegmentKind::Pages { depth, offset } => From::File { depth, offset },
                        SegmentKind::Lazy if server.is_some() => From::Remote,
                        kind if strict => {
                            return Err(LazyError::Plan(ImageError::NotInImage {
                                path: img.pagemap_path().to_path_buf(),
                                vaddr: s.vaddr,
                                lazy: kind == SegmentKind::Lazy,
                            }));
                        }
                        SegmentKind::Zero | SegmentKind::Lazy => From::Zero,
                    };
                    plan.push(first, n, from, ps64);
                }
            }
            (None, Some(ServerSource { held, .. })) => {
                let mut runs: Vec<(u64, u64)> = held.clone().unwrap_or_default();
                runs.sort_unstable();
                let end = vaddr + pages * ps64;
                let mut at = vaddr;
                for (v, n) in runs {
                    // A run may claim more pages than the address space holds: it then
                    // holds everything from `v` on.
                    let (s, e) = (v.max(at), v.saturating_add(n.saturating_mul(ps64)).min(end));
                    if s >= e {
                        continue;
                    }
                    let (s, e) = (s / ps64 * ps64, e.div_ceil(ps64) * ps64);
                    if s > at {
                        if strict {
                            return Err(LazyError::NotHeld { vaddr: at });
                        }
                        plan.push((at - vaddr) / ps64, (s - at) / ps64, From::Zero, ps64);
                    }
                    plan.push((s - vaddr) / ps64, (e - s) / ps64, From::Remote, ps64);
                    at = e;
                }
                if at < end {
                    if strict {
                        return Err(LazyError::NotHeld { vaddr: at });
                    }
                    plan.push((at - vaddr) / ps64, (end - at) / ps64, From::Zero, ps64);
                }
            }
            (None, None) => plan.push(0, pages, From::Zero, ps64),
        }
        let remote = self.server.map(|s| {
            let socket = s.client.socket_handle().ok();
            Remote {
                peer: s.client.peer().clone(),
                client: Mutex::new(Some(s.client)),
                id: s.id,
                waiting: AtomicU32::new(0),
                socket,
            }
        });
        let reader = Reader {
            image: self.image,
            remote,
            vaddr,
            ps,
        };
        Ok((plan, reader))
    }
}

/// Which thread reads: the fault thread goes before the prefetch thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Who {
    Fault,
    Prefetch,
}

impl Reader {
    /// Reads pages from page `p` (of `piece`) into `buf` (whole pages, at most the rest
    /// of the piece). Returns the pages read: all of them from a file; from a page server
    /// at least one (it may end its answer where its run ends).
    pub fn read(&self, piece: &Piece, p: u64, buf: &mut [u8], who: Who) -> Result<u64, LazyError> {
        let ps = self.ps as u64;
        let pages = buf.len() as u64 / ps;
        let vaddr = self.vaddr + p * ps;
        debug_assert!(p >= piece.first && p + pages <= piece.end());
        match piece.from {
            From::File { depth, offset } => {
                let img = self.image.as_ref().expect("file pieces come from an image");
                let img = img.ancestor(depth).expect("within the chain");
                let file = img.pages_file().expect("present pages have a file");
                let at = offset + (p - piece.first) * ps;
                read_exact_at(file, img.pages_path(), buf, at).map_err(|error| {
                    LazyError::Read {
                        vaddr,
                        pages,
                        error,
                    }
                })?;
                Ok(pages)
            }
            From::Remote => {
                let remote = self.remote.as_ref().expect("remote pieces have a server");
                let mut client = remote.lock(who);
                let r = match client.as_mut() {
                    Some(c) => c.get(remote.id, vaddr, buf),
                    None => Err(ClientError::Broken {
                        peer: remote.peer.clone(),
                    }),
                };
                r.map_err(|error| LazyError::Remote {
                    vaddr,
                    pages,
                    error,
                })
            }
            From::Zero => unreachable!("zero pieces are not read"),
        }
    }

    /// Ends the page server session as CRIU's lazy-pages daemon does when every page is
    /// in: `CLOSE`, the server's answer, the connection closed. The memory is all in
    /// whatever the server answers, so an error here is not the restore's.
    pub fn close(&self) {
        if let Some(remote) = &self.remote {
            let client = remote
                .client
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(c) = client {
                let _ = c.close();
            }
        }
    }

    /// Wakes a thread blocked on the page server's socket (the restore is stopping).
    pub fn shut_down(&self) {
        if let Some(fd) = self.remote.as_ref().and_then(|r| r.socket.as_ref()) {
            let _ = rustix::net::shutdown(fd.as_fd(), rustix::net::Shutdown::Both);
        }
    }
}

impl Remote {
    fn lock(&self, who: Who) -> MutexGuard<'_, Option<PageServerClient>> {
        match who {
            Who::Fault => {
                self.waiting.fetch_add(1, Ordering::AcqRel);
                let g = self.client.lock().unwrap_or_else(PoisonError::into_inner);
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                g
            }
            Who::Prefetch => loop {
                if self.waiting.load(Ordering::Acquire) > 0 {
                    std::thread::yield_now();
                    continue;
                }
                return self.client.lock().unwrap_or_else(PoisonError::into_inner);
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_join_only_what_reads_on() {
        let ps = 4096;
        let mut plan = Plan { pieces: Vec::new() };
        let file = |offset| From::File { depth: 0, offset };
        plan.push(0, 2, file(0), ps);
        plan.push(2, 1, file(2 * ps), ps); // reads on: joined
        plan.push(3, 1, file(0), ps); // same file, elsewhere: not joined
        plan.push(4, 1, From::Zero, ps);
        plan.push(5, 2, From::Zero, ps);
        plan.push(7, 1, From::Remote, ps);
        plan.push(8, 0, From::Zero, ps);
        let got: Vec<_> = plan.pieces.iter().map(|p| (p.first, p.pages)).collect();
        assert_eq!(got, [(0, 3), (3, 1), (4, 3), (7, 1)]);
        assert_eq!(plan.at(0).pages, 3);
        assert_eq!(plan.at(2).first, 0);
        assert_eq!(plan.at(6).from, From::Zero);
        assert_eq!(plan.at(7).from, From::Remote);
    }
}
