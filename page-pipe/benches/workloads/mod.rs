//! The workloads that `benches/sinks.rs` (criterion) and `examples/bench.rs` (one table
//! of ratios) measure: ours and the baselines a user would otherwise write.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};
use page_pipe::image::{CountFields, Image, ImageWriter};
use page_pipe::page_server::wire::{ImageId, Limits, Message};
use page_pipe::page_server::{Incoming, PageServer, PageServerClient, ServerConfig};
use page_pipe::snapshot::{Drain, SnapshotOptions, Span, snapshot};
use page_pipe::{BufFlags, Captured, FdSink, KernelPipes, PagePipe, PipePool, Source};
use page_pipe_sys::{Pipe, SpliceFlags, pipe, set_pipe_capacity, vmsplice_all};

/// A region of anonymous memory filled with a pattern.
pub struct Region {
    pub mem: MmapMut,
    pub ps: usize,
    pub pages: u64,
}

impl Region {
    pub fn new(bytes: u64) -> Self {
        let ps = page_pipe_sys::page_size().get();
        let pages = bytes.div_ceil(ps as u64);
        let mut mem = MmapOptions::new()
            .len(pages as usize * ps)
            .map_anon()
            .expect("map the region");
        for (i, p) in mem.chunks_exact_mut(ps).enumerate() {
            p.fill(i as u8);
            p[..8].copy_from_slice(&(i as u64).to_le_bytes());
        }
        Self { mem, ps, pages }
    }

    pub fn base(&self) -> u64 {
        self.mem.as_ptr() as u64
    }

    pub fn bytes(&self) -> u64 {
        self.mem.len() as u64
    }

    pub fn source(&self) -> Source<'_> {
        Source::new()
            .with_slice(self.base(), &self.mem[..])
            .expect("a valid region")
    }

    /// The whole region as one span.
    pub fn plan(&self) -> [Span; 1] {
        [Span::Pages {
            addr: self.base(),
            pages: self.pages,
            flags: BufFlags::empty(),
        }]
    }
}

/// The largest pipe the kernel grants here, in pages (capped at CRIU's PIPE_MAX_SIZE).
pub fn pipe_pages() -> usize {
    let l = page_pipe_sys::PipeLimits::get().expect("pipe limits");
    l.max_grant_pages()
        .min(page_pipe_sys::pipe_max_size_pages(l.page_size.get()))
}

/// Ours: record the region and capture it into pipes, sized at once (a bulk capture
/// fills them), made fresh or taken from `pool`.
pub fn capture<'m>(
    r: &'m Region,
    source: &Source<'m>,
    pool: Option<&Arc<PipePool>>,
) -> Captured<'m> {
    let mut backend = KernelPipes::new().expect("limits");
    if let Some(pool) = pool {
        backend = backend.with_pool(Arc::clone(pool));
    }
    let mut pp = PagePipe::builder()
        .iov_budget(r.pages as usize)
        .initial_pipe_pages(u64::MAX)
        .build_with(backend)
        .expect("build");
    pp.add_pages(r.base(), r.pages, BufFlags::empty())
        .expect("add");
    pp.capture(source).expect("capture")
}

/// Empties a captured page pipe's pipes, so that they can go back to a pool.
pub fn discard(mut c: Captured<'_>) {
    let null = File::options()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    // By `splice`, as `empty_pipes` empties the baseline's pipes: an `FdSink::new` into
    // a character device would read borrowed pages out through a bounce buffer, and the
    // next capture measured 20% slower after emptying that way.
    // SAFETY: /dev/null reads nothing, so no reader can see the pages after the capture.
    let mut sink = unsafe { FdSink::new_zero_copy(null) };
    c.dump(&mut sink).expect("discard");
}

/// Pipes of the largest size, enough for the region.
pub fn make_pipes(r: &Region) -> Vec<Pipe> {
    let per = pipe_pages() * r.ps;
    r.mem
        .chunks(per)
        .map(|_| {
            let p = pipe().expect("pipe");
            set_pipe_capacity(&p.write, per).expect("F_SETPIPE_SZ");
            p
        })
        .collect()
}

/// The kernel's limit: one `vmsplice` into each pipe.
pub fn bare_vmsplice_into(r: &Region, pipes: &[Pipe]) {
    let per = pipe_pages() * r.ps;
    for (chunk, p) in r.mem.chunks(per).zip(pipes) {
        // SAFETY: `p.write` is a pipe's write end; the chunk is whole pages of the region,
        // which nobody modifies while the pipes hold them (callers empty or drop the pipes
        // first).
        unsafe {
            vmsplice_all(
                &p.write,
                &[chunk],
                SpliceFlags::GIFT | SpliceFlags::NONBLOCK,
            )
        }
        .expect("vmsplice");
    }
}

/// The kernel's limit with fresh pipes: make them, then one `vmsplice` into each.
pub fn bare_vmsplice(r: &Region) -> Vec<Pipe> {
    let pipes = make_pipes(r);
    bare_vmsplice_into(r, &pipes);
    pipes
}

/// Empties pipes filled by `bare_vmsplice_into`.
pub fn empty_pipes(r: &Region, pipes: &[Pipe]) {
    let null = File::options()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let per = pipe_pages() * r.ps;
    for (chunk, p) in r.mem.chunks(per).zip(pipes) {
        page_pipe_sys::splice_exact(
            &p.read,
            None,
            &null,
            None,
            chunk.len(),
            SpliceFlags::empty(),
        )
        .expect("splice");
    }
}

/// What a copying tool does: copy the region into a buffer.
pub fn memcpy(r: &Region, buf: &mut [u8]) {
    buf.copy_from_slice(&r.mem[..]);
}

fn opts(drain: Drain) -> SnapshotOptions {
    SnapshotOptions {
        drain,
        ..SnapshotOptions::default()
    }
}

/// Ours: a whole snapshot into an image directory. Not synced, as the baseline is not
/// (`ImageWriter::with_sync(false)`): both measure writing into the page cache.
pub fn dump_image(r: &Region, dir: &Path, drain: Drain) {
    let source = r.source();
    let mut w = ImageWriter::create(dir, 1)
        .expect("create the image")
        .with_sync(false);
    snapshot(&source, r.plan(), &mut w, &opts(drain)).expect("snapshot");
    w.finish().expect("finish");
}

/// Firecracker's loop: `write_all` of each run from the mapping, seeking to its place.
pub fn firecracker(r: &Region, path: &Path) {
    let mut f = File::create(path).expect("create");
    let run = 64 << 20;
    for (i, chunk) in r.mem.chunks(run).enumerate() {
        f.seek(SeekFrom::Start((i * run) as u64)).expect("seek");
        f.write_all(chunk).expect("write");
    }
}

/// A connected pair: the read end for a draining thread, the write end for the sender.
pub type Pair = (Box<dyn Read + Send>, OwnedFd);

pub fn unix_pair() -> Pair {
    let (a, b) = UnixStream::pair().expect("socketpair");
    (Box::new(a), b.into())
}

pub fn tcp_pair(listener: &TcpListener) -> Pair {
    let w = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (r, _) = listener.accept().expect("accept");
    (Box::new(r), w.into())
}

fn drain_thread(mut r: Box<dyn Read + Send>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n as u64,
            }
        }
    })
}

/// Ours: a whole snapshot into a socket, a reader thread draining it.
pub fn to_socket(r: &Region, pair: Pair, drain: Drain) {
    let (rx, tx) = pair;
    let reader = drain_thread(rx);
    let source = r.source();
    let mut sink = FdSink::new(tx);
    snapshot(&source, r.plan(), &mut sink, &opts(drain)).expect("snapshot");
    drop(sink);
    assert_eq!(reader.join().expect("reader"), r.bytes());
}

/// The baseline: `write` from the mapping, 1 MiB at a time.
pub fn write_socket(r: &Region, pair: Pair) {
    write_socket_from(&r.mem, pair)
}

/// The baseline: `write` from `mem`, 1 MiB at a time.
pub fn write_socket_from(mem: &[u8], pair: Pair) {
    let (rx, tx) = pair;
    let reader = drain_thread(rx);
    let mut tx = File::from(tx);
    for chunk in mem.chunks(1 << 20) {
        tx.write_all(chunk).expect("write");
    }
    drop(tx);
    assert_eq!(reader.join().expect("reader"), mem.len() as u64);
}

/// Ours: restore the image into `dst`.
pub fn restore(dir: &Path, base: u64, dst: &mut [u8]) {
    let img = Image::open(dir).expect("open the image");
    img.read(base, dst).expect("read");
}

/// The baseline: `pread` the pages file into `dst`, 1 MiB at a time.
pub fn pread(path: &Path, dst: &mut [u8]) {
    let f = File::open(path).expect("open");
    for (i, chunk) in dst.chunks_mut(1 << 20).enumerate() {
        f.read_exact_at(chunk, (i << 20) as u64).expect("pread");
    }
}

/// A fresh anonymous mapping of `bytes`, never touched: its first touch of each page
/// faults it in, as in a VMM's new guest memory.
pub fn fresh(bytes: usize) -> MmapMut {
    MmapOptions::new().len(bytes).map_anon().expect("map")
}

/// A mapping of `bytes`, touched so that its page faults are out of the way.
pub fn touched(bytes: usize) -> MmapMut {
    let mut m = MmapOptions::new().len(bytes).map_anon().expect("map");
    m.fill(1);
    m
}

/// An owned copy of the region that nobody can write any more (an anonymous mapping made
/// read-only and handed to the source): its pages may leave the crate by reference, as
/// those of a process's memory after a fork or a VMM's guest RAM after the guest stopped
/// can (DESIGN.md, "When page references may leave the crate").
pub fn sealed_source(r: &Region) -> Source<'static> {
    let mut m = MmapOptions::new().len(r.mem.len()).map_anon().expect("map");
    m.copy_from_slice(&r.mem);
    let source = Source::new()
        .with_mmap(r.base(), m.make_read_only().expect("read-only"))
        .expect("a valid region");
    assert!(source.is_sealed());
    source
}

/// Ours: a whole snapshot of `source` (the region, borrowed or owned) into a socket, a
/// reader thread draining it.
pub fn source_to_socket(r: &Region, source: &Source<'_>, pair: Pair, drain: Drain) {
    let (rx, tx) = pair;
    let reader = drain_thread(rx);
    let mut sink = FdSink::new(tx);
    snapshot(source, r.plan(), &mut sink, &opts(drain)).expect("snapshot");
    drop(sink);
    assert_eq!(reader.join().expect("reader"), r.bytes());
}

/// A connected stream of either kind.
pub enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(b),
            Conn::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(b),
            Conn::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Conn {
    /// A page-server client on this end.
    pub fn client(self) -> PageServerClient {
        match self {
            Conn::Unix(s) => PageServerClient::from_unix(s),
            Conn::Tcp(s) => PageServerClient::from_tcp(s),
        }
        .expect("client")
    }

    /// This end, for a page server to serve.
    pub fn incoming(self) -> Incoming {
        match self {
            Conn::Unix(s) => Incoming::from_unix(s),
            Conn::Tcp(s) => Incoming::from_tcp(s),
        }
    }
}

/// A connected pair (client end, server end): a Unix socket pair, or TCP on loopback
/// (no Nagle delay, as the page-server client and server set it).
pub fn conn_pair(tcp: Option<&TcpListener>) -> (Conn, Conn) {
    match tcp {
        None => {
            let (a, b) = UnixStream::pair().expect("socketpair");
            (Conn::Unix(a), Conn::Unix(b))
        }
        Some(l) => {
            let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            let (b, _) = l.accept().expect("accept");
            a.set_nodelay(true).expect("nodelay");
            b.set_nodelay(true).expect("nodelay");
            (Conn::Tcp(a), Conn::Tcp(b))
        }
    }
}

/// A page server that writes nothing: answers `OPEN2` and `CLOSE`, reads and drops the
/// pages, and returns the messages it got (the framing).
pub fn sink_server(mut s: Conn) -> std::thread::JoinHandle<Vec<Message>> {
    std::thread::spawn(move || {
        let limits = Limits::default();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let mut h = [0u8; 32];
            if s.read_exact(&mut h).is_err() {
                return got;
            }
            let m = Message::decode(&h, &limits).expect("a valid header");
            let mut left = m.payload_len(limits.page_size) as usize;
            while left > 0 {
                let n = left.min(buf.len());
                s.read_exact(&mut buf[..n]).expect("pages");
                left -= n;
            }
            got.push(m);
            match m {
                Message::Open2 { .. } => s.write_all(&[0]).expect("reply"),
                Message::Close => {
                    s.write_all(&0i32.to_ne_bytes()).expect("reply");
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest);
                    return got;
                }
                _ => {}
            }
        }
    })
}

/// Ours: a snapshot of `source` sent with a page-server client (`OPEN2`, an `ADD_F` per
/// run with its pages, `CLOSE` and its reply).
pub fn to_page_server(r: &Region, source: &Source<'_>, c: Conn) {
    let mut client = c.client();
    client
        .open(ImageId::pagemap(1).expect("id"))
        .expect("OPEN2");
    snapshot(source, r.plan(), &mut client, &SnapshotOptions::default()).expect("snapshot");
    client.close().expect("CLOSE");
}

/// The baseline: the same messages written by hand, `write` of each header and `write`
/// of its pages straight from the mapping, reading the two replies.
pub fn write_framing(r: &Region, framing: &[Message], c: Conn) {
    write_framing_from(r, &r.mem, framing, c)
}

/// As [`write_framing`], with the region's pages taken from `mem` (a copy of it).
pub fn write_framing_from(r: &Region, mem: &[u8], framing: &[Message], mut c: Conn) {
    let ps = r.ps as u64;
    for m in framing {
        c.write_all(&m.encode()).expect("header");
        if let Some(e) = m.entry().filter(|e| e.is_present()) {
            let at = (e.vaddr - r.base()) as usize;
            c.write_all(&mem[at..at + (e.pages * ps) as usize])
                .expect("pages");
        }
        match m {
            Message::Open2 { .. } => {
                let mut b = [0u8; 1];
                c.read_exact(&mut b).expect("OPEN2 reply");
            }
            Message::Close => {
                let mut b = [0u8; 4];
                c.read_exact(&mut b).expect("CLOSE reply");
                assert_eq!(b, [0; 4], "the server wrote the images");
            }
            _ => {}
        }
    }
}

/// Ours: a page server receiving `framing` (sent by [`write_framing`] on another thread)
/// and writing the image into `dir`, not synced; returns when the session is over (the
/// image committed and the client gone).
pub fn page_server_receives(
    r: &Region,
    framing: &[Message],
    dir: &Path,
    tcp: Option<&TcpListener>,
) {
    let server = PageServer::bind(
        "127.0.0.1:0",
        ServerConfig {
            sync: false,
            ..ServerConfig::new(dir)
        },
    )
    .expect("server");
    let (client, end) = conn_pair(tcp);
    std::thread::scope(|s| {
        s.spawn(|| write_framing(r, framing, client));
        let report = server.serve(end.incoming()).expect("session");
        assert_eq!(report.images[0].summary.present_pages, r.pages);
    });
}

/// The baseline: the same entries written into an image in-process from the mapping, as
/// the page server writes them (one entry each, CRIU 4.x counts), not synced.
pub fn image_writer_from_mapping(r: &Region, framing: &[Message], dir: &Path) {
    let mut w = ImageWriter::create_with_pages_id(dir, 1, 65537)
        .expect("create")
        .with_joining(false)
        .with_count_fields(CountFields::Criu4)
        .with_sync(false);
    let ps = r.ps as u64;
    for e in framing.iter().filter_map(Message::entry) {
        let at = (e.vaddr - r.base()) as usize;
        w.push_bytes(e, &r.mem[at..at + (e.pages * ps) as usize])
            .expect("push");
    }
    w.finish().expect("finish");
}
