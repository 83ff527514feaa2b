//! [`PageServerClient`]: a dump sink that streams entries and pages to a page server.

use std::fmt;
use std::io::{self, IoSlice};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use page_pipe_sys::{SpliceFlags, send_all, send_vectored_all, splice_exact};

use crate::dump::{DumpErrorKind, DumpSink, sealed};
use crate::image::{PageFlags, PagemapEntry};
use crate::source::Chunk;

use super::error::{ClientError, ClientOp};
use super::stream::{Peer, Stream, is_timeout};
use super::wire::{
    Command, Expected, HEADER_LEN, ImageId, Limits, Message, WireErrorKind, parse_get_reply,
    parse_open2_reply,
};

/// The timeout a client starts with, for each send and each reply it waits for.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Headers of entries without pages are kept until this many bytes are waiting (or
/// pages, a reply or the end follow), then sent in one call.
const HEADER_BATCH: usize = 16 << 10;

/// Bytes read out of a pipe at a time when pages go as copies.
const BOUNCE: usize = 1 << 20;

/// What a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientReport {
    /// Messages sent.
    pub messages: u64,
    /// Entries sent (`ADD_F`).
    pub entries: u64,
    /// Pages sent with their entries.
    pub present_pages: u64,
    /// Pages in `PARENT` entries.
    pub parent_pages: u64,
    /// Pages in `LAZY` entries sent without their pages.
    pub lazy_pages: u64,
    /// Bytes sent, headers included.
    pub bytes: u64,
    /// Pages received (`GET`).
    pub pages_received: u64,
}

/// A client of CRIU's page server: a [`DumpSink`] that sends each entry as CRIU's own
/// client does (see the [module docs](super)), over TCP or a Unix socket.
///
/// Made with [`connect`](Self::connect), it has sent `OPEN2` for `pagemap-<id>.img` and
/// read the answer ([`has_parent`](Self::has_parent): whether an incremental dump may
/// send holes). Give it to [`snapshot`](crate::snapshot::snapshot) or
/// [`Captured::dump`](crate::Captured::dump), then [`close`](Self::close) it: `CLOSE`,
/// the server's acknowledgement that the images are written, and the connection closed.
///
/// ```
/// use memmap2::MmapOptions;
/// use page_pipe::image::Image;
/// use page_pipe::page_server::{PageServer, PageServerClient, ServerConfig};
/// use page_pipe::snapshot::{snapshot, SnapshotOptions, Span};
/// use page_pipe::{BufFlags, Source};
/// let ps = page_pipe::page_size();
/// let dir = std::env::temp_dir().join(format!("pp-doc-client-{}", std::process::id()));
/// let server = PageServer::bind("127.0.0.1:0", ServerConfig::new(&dir))?.spawn()?;
///
/// let mut mem = MmapOptions::new().len(16 * ps).map_anon()?;
/// mem.fill(7);
/// let base = 0x7f00_0000_0000;
/// let source = Source::new().with_slice(base, &mem[..])?;
/// let mut client = PageServerClient::connect(server.local_addr().unwrap(), 42)?;
/// assert!(!client.has_parent());
/// let plan = [Span::Pages { addr: base, pages: 16, flags: BufFlags::empty() }];
/// snapshot(&source, plan, &mut client, &SnapshotOptions::default())?;
/// let sent = client.close()?;
/// assert_eq!(sent.present_pages, 16);
///
/// server.stop();
/// let mut back = vec![0u8; 16 * ps];
/// Image::open(&dir)?.read(base, &mut back)?;
/// assert!(back == mem[..]);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct PageServerClient {
    stream: Stream,
    peer: Peer,
    image: Option<ImageId>,
    has_parent: bool,
    zero_copy: bool,
    limits: Limits,
    timeout: Option<Duration>,
    /// Headers not sent yet.
    pending: Vec<u8>,
    bounce: Vec<u8>,
    report: ClientReport,
    broken: bool,
}

impl PageServerClient {
    /// Connects to a page server over TCP and opens `pagemap-<pagemap_id>.img` (`OPEN2`),
    /// reading the server's answer.
    ///
    /// # Errors
    /// [`ClientError`]: the connection, the send or the reply failed, or the id does not
    /// fit 56 bits.
    pub fn connect(
        addr: impl ToSocketAddrs + fmt::Debug,
        pagemap_id: u64,
    ) -> Result<Self, ClientError> {
        let image = ImageId::pagemap(pagemap_id).ok_or(ClientError::BadId { id: pagemap_id })?;
        let mut c = Self::connect_tcp(addr)?;
        c.open(image)?;
        Ok(c)
    }

    /// As [`connect`](Self::connect), over the Unix socket at `path`.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub fn connect_unix(path: impl AsRef<Path>, pagemap_id: u64) -> Result<Self, ClientError> {
        let image = ImageId::pagemap(pagemap_id).ok_or(ClientError::BadId { id: pagemap_id })?;
        let mut c = Self::connect_unix_only(path)?;
        c.open(image)?;
        Ok(c)
    }

    /// Connects over TCP without opening an image: for [`get`](Self::get) (as CRIU's
    /// lazy-pages daemon asks a page server for pages) or a later [`open`](Self::open).
    ///
    /// # Errors
    /// [`ClientError::Connect`].
    pub fn connect_tcp(addr: impl ToSocketAddrs + fmt::Debug) -> Result<Self, ClientError> {
        let name = format!("{addr:?}");
        let s = TcpStream::connect(&addr).map_err(|error| ClientError::Connect {
            addr: name.clone(),
            error,
        })?;
        // Replies are awaited after small messages: no Nagle delay.
        s.set_nodelay(true)
            .map_err(|error| ClientError::Connect { addr: name, error })?;
        Self::new(Stream::Tcp(s), None)
    }

    /// As [`connect_tcp`](Self::connect_tcp), over the Unix socket at `path`.
    ///
    /// # Errors
    /// [`ClientError::Connect`].
    pub fn connect_unix_only(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let s = UnixStream::connect(path).map_err(|error| ClientError::Connect {
            addr: path.display().to_string(),
            error,
        })?;
        Self::new(Stream::Unix(s), Some(path))
    }

    /// A client on a connected TCP stream, no image open yet.
    ///
    /// # Errors
    /// [`ClientError::Io`] when the socket cannot be set up.
    pub fn from_tcp(s: TcpStream) -> Result<Self, ClientError> {
        Self::new(Stream::Tcp(s), None)
    }

    /// Connects over TLS (the `tls` feature; see [`tls`](crate::tls))
    /// and opens `pagemap-<pagemap_id>.img`, as [`connect`](Self::connect) does over
    /// plain TCP. Pages go as copies (encrypted), whatever the client is told.
    ///
    /// # Errors
    /// [`ClientError::Tls`] when the connection or the handshake fails; as
    /// [`connect`](Self::connect) otherwise.
    #[cfg(feature = "tls")]
    pub fn connect_tls(
        addr: impl ToSocketAddrs + fmt::Debug,
        tls: &crate::tls::TlsClientConfig,
        pagemap_id: u64,
    ) -> Result<Self, ClientError> {
        let image = ImageId::pagemap(pagemap_id).ok_or(ClientError::BadId { id: pagemap_id })?;
        let s = crate::tls::TlsStream::connect(addr, tls, None)
            .map_err(|error| ClientError::Tls { error })?;
        let mut c = Self::from_tls(s)?;
        c.open(image)?;
        Ok(c)
    }

    /// A client on a TLS connection (the `tls` feature), no image open yet.
    ///
    /// # Errors
    /// [`ClientError::Io`] when the socket cannot be set up.
    #[cfg(feature = "tls")]
    pub fn from_tls(s: crate::tls::TlsStream) -> Result<Self, ClientError> {
        Self::new(Stream::Tls(s), None)
    }

    /// A client on a connected Unix stream (a socket pair, or a socket a parent process
    /// handed down), no image open yet.
    ///
    /// # Errors
    /// [`ClientError::Io`] when the socket cannot be set up.
    pub fn from_unix(s: UnixStream) -> Result<Self, ClientError> {
        Self::new(Stream::Unix(s), None)
    }

    fn new(stream: Stream, path: Option<&Path>) -> Result<Self, ClientError> {
        let peer = stream.peer(path);
        let timeout = Some(DEFAULT_CLIENT_TIMEOUT);
        stream
            .set_timeouts(timeout)
            .map_err(|error| ClientError::Io {
                peer: peer.clone(),
                op: ClientOp::Connect,
                error,
            })?;
        Ok(Self {
            stream,
            peer,
            image: None,
            has_parent: false,
            zero_copy: false,
            limits: Limits::default(),
            timeout,
            pending: Vec::new(),
            bounce: Vec::new(),
            report: ClientReport::default(),
            broken: false,
        })
    }

    /// How long each send and each wait for a reply may take before it fails with
    /// [`ClientError::Timeout`] (default [`DEFAULT_CLIENT_TIMEOUT`]; `None`: for ever).
    ///
    /// # Errors
    /// [`ClientError::Io`] when the socket refuses the timeout.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream
            .set_timeouts(timeout)
            .map_err(|error| ClientError::Io {
                peer: self.peer.clone(),
                op: ClientOp::Connect,
                error,
            })?;
        self.timeout = timeout;
        Ok(())
    }

    /// Lets pages leave by reference (spliced from the capture's pipes into the socket)
    /// even when they reference memory that may change, as
    /// [`FdSink::new_zero_copy`](crate::FdSink::new_zero_copy) does.
    ///
    /// # Safety
    /// This is not about memory safety but about the consistency the crate promises: the
    /// memory of every page dumped into this client stays unchanged until the server has
    /// read it from the socket (DESIGN.md, "When page references may leave the crate").
    /// Breaking it does not cause undefined behaviour; the server gets later bytes than
    /// the capture's.
    // The contract is the crate's consistency promise, not memory safety, so `unsafe` here
    // marks an opt-in rather than code that could cause undefined behaviour.
    #[allow(unsafe_code)]
    pub unsafe fn allow_zero_copy(mut self) -> Self {
        self.zero_copy = true;
        self
    }

    /// A second descriptor of the connection, for a thread that must wake another one
    /// blocked on it (`shutdown(2)` of it ends the connection for both).
    pub(crate) fn socket_handle(&self) -> io::Result<std::os::fd::OwnedFd> {
        self.stream.as_fd().try_clone_to_owned()
    }

    /// The server.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The image entries go to, if one is open.
    pub fn image(&self) -> Option<ImageId> {
        self.image
    }

    /// The server's answer to the last `OPEN2`: whether its parent directory holds this
    /// image, so that holes (`PARENT` entries) may be sent.
    pub fn has_parent(&self) -> bool {
        self.has_parent
    }

    /// What was sent so far.
    pub fn report(&self) -> ClientReport {
        self.report
    }

    fn check(&self) -> Result<(), ClientError> {
        if self.broken {
            Err(ClientError::Broken {
                peer: self.peer.clone(),
            })
        } else {
            Ok(())
        }
    }

    /// Maps a failed call, and marks the stream out of step.
    fn fail(&mut self, op: ClientOp, error: io::Error) -> ClientError {
        self.broken = true;
        match self.timeout {
            Some(after) if is_timeout(&error) => ClientError::Timeout {
                peer: self.peer.clone(),
                op,
                after,
            },
            _ => ClientError::Io {
                peer: self.peer.clone(),
                op,
                error,
            },
        }
    }

    /// Sends the waiting headers, then `m`'s header and `pages` in as few calls as the
    /// socket takes; `more`: more of this message follows (hold the last segment back).
    fn send(&mut self, m: &Message, pages: &[&[u8]], more: bool) -> Result<(), ClientError> {
        let head = m.encode();
        let mut bufs = Vec::with_capacity(2 + pages.len());
        if !self.pending.is_empty() {
            bufs.push(IoSlice::new(&self.pending));
        }
        bufs.push(IoSlice::new(&head));
        bufs.extend(pages.iter().map(|p| IoSlice::new(p)));
        // Queued headers were counted when they were queued.
        let total = head.len() + pages.iter().map(|p| p.len()).sum::<usize>();
        let r = send_vectored_all(self.stream.as_fd(), &bufs, more);
        drop(bufs);
        let op = match (m.entry(), pages.is_empty()) {
            (Some(entry), false) => ClientOp::SendPages { entry },
            _ => ClientOp::Send {
                command: m.command(),
            },
        };
        r.map_err(|p| self.fail(op, p.into()))?;
        self.pending.clear();
        self.report.messages += 1;
        self.report.bytes += total as u64;
        Ok(())
    }

    /// Queues a header without pages, sending the queue when it is large.
    fn queue(&mut self, m: &Message) -> Result<(), ClientError> {
        self.pending.extend_from_slice(&m.encode());
        self.report.messages += 1;
        self.report.bytes += HEADER_LEN as u64;
        if self.pending.len() >= HEADER_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends the queued headers.
    fn flush(&mut self) -> Result<(), ClientError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let r = send_all(self.stream.as_fd(), &self.pending, false);
        r.map_err(|p| {
            self.fail(
                ClientOp::Send {
                    command: Command::AddF,
                },
                p.into(),
            )
        })?;
        self.pending.clear();
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes of a reply.
    fn receive(&mut self, buf: &mut [u8], expected: Expected) -> Result<(), ClientError> {
        let mut got = 0;
        while got < buf.len() {
            match page_pipe_sys::recv_some(self.stream.as_fd(), &mut buf[got..]) {
                Ok(0) => {
                    self.broken = true;
                    return Err(ClientError::Closed {
                        peer: self.peer.clone(),
                        expected,
                        got,
                    });
                }
                Ok(n) => got += n,
                Err(e) => return Err(self.fail(ClientOp::Receive { expected }, e.into())),
            }
        }
        Ok(())
    }

    /// Opens `image` (`OPEN2`) on this connection: the entries sent next go to it. Returns
    /// the server's answer, whether its parent holds the image. A dump of several
    /// processes (or a process and its shared memory, [`ImageId::shmem`]) opens each in
    /// turn, as CRIU does.
    ///
    /// # Errors
    /// [`ClientError`]: the send or the reply failed.
    pub fn open(&mut self, image: ImageId) -> Result<bool, ClientError> {
        self.check()?;
        self.send(&Message::Open2 { image }, &[], false)?;
        let mut b = [0u8; 1];
        self.receive(&mut b, Expected::Open2Reply)?;
        let has_parent = parse_open2_reply(b[0]).map_err(|error| {
            self.broken = true;
            ClientError::Reply {
                peer: self.peer.clone(),
                error,
            }
        })?;
        self.image = Some(image);
        self.has_parent = has_parent;
        Ok(has_parent)
    }

    /// Asks whether the server's parent directory holds `image` (`PARENT`), as CRIU does
    /// before it decides on an incremental dump.
    ///
    /// # Errors
    /// [`ClientError`]: the send or the reply failed, or the reply is not 0 or 1.
    pub fn parent_has(&mut self, image: ImageId) -> Result<bool, ClientError> {
        self.check()?;
        self.send(&Message::Parent { image }, &[], false)?;
        let mut b = [0u8; 4];
        self.receive(&mut b, Expected::ParentReply)?;
        match i32::from_ne_bytes(b) {
            0 => Ok(false),
            1 => Ok(true),
            v => {
                self.broken = true;
                Err(ClientError::Reply {
                    peer: self.peer.clone(),
                    error: WireErrorKind::BadReply {
                        expected: Expected::ParentReply,
                        value: i64::from(v),
                    },
                })
            }
        }
    }

    /// The `ADD_F` message for `e`, checked as a server would check it.
    fn entry_message(&self, e: PagemapEntry, bytes: usize) -> Result<Message, ClientError> {
        let image = self.image.ok_or(ClientError::NotOpen)?;
        let m = Message::add_f(image, e);
        let ok = Message::decode(&m.encode(), &self.limits).is_ok()
            && bytes as u64 == m.payload_len(self.limits.page_size);
        if ok {
            Ok(m)
        } else {
            Err(ClientError::BadEntry { entry: e, bytes })
        }
    }

    fn count(&mut self, e: &PagemapEntry) {
        self.report.entries += 1;
        if e.is_present() {
            self.report.present_pages += e.pages;
        } else if e.flags.contains(PageFlags::PARENT) {
            self.report.parent_pages += e.pages;
        } else {
            self.report.lazy_pages += e.pages;
        }
    }

    /// Sends one entry of the open image (`ADD_F` with its flags), and its pages if it is
    /// `PRESENT` (`pages` holds exactly its pages; empty otherwise). For callers that
    /// walk memory themselves; a dump calls it for each entry.
    ///
    /// # Errors
    /// [`ClientError::BadEntry`] for an entry the protocol cannot carry (nothing is
    /// sent); [`ClientError`] when the send fails.
    pub fn send_entry(&mut self, e: PagemapEntry, pages: &[u8]) -> Result<(), ClientError> {
        self.send_entry_slices(e, &[pages])
    }

    fn send_entry_slices(&mut self, e: PagemapEntry, pages: &[&[u8]]) -> Result<(), ClientError> {
        self.check()?;
        let bytes = pages.iter().map(|p| p.len()).sum();
        let m = self.entry_message(e, bytes)?;
        if e.is_present() {
            self.send(&m, pages, false)?;
        } else {
            self.queue(&m)?;
        }
        self.count(&e);
        Ok(())
    }

    /// Sends a present entry whose pages are chunks of memory others may write: the
    /// header, then each chunk as the kernel reads it.
    fn send_entry_chunks(
        &mut self,
        e: PagemapEntry,
        chunks: &[Chunk<'_>],
    ) -> Result<(), ClientError> {
        self.check()?;
        let bytes = chunks.iter().map(Chunk::len).sum();
        let m = self.entry_message(e, bytes)?;
        self.send(&m, &[], true)?;
        let op = ClientOp::SendPages { entry: e };
        for (i, c) in chunks.iter().enumerate() {
            c.send_to(self.stream.as_fd(), i + 1 < chunks.len())
                .map_err(|p| self.fail(op, p.into()))?;
        }
        self.report.bytes += bytes as u64;
        self.count(&e);
        Ok(())
    }

    /// Sends a present entry whose pages are at the front of `pipe`: by reference when
    /// allowed, else read out through a bounce buffer and sent as copies.
    fn send_entry_from_pipe(
        &mut self,
        e: PagemapEntry,
        pipe: BorrowedFd<'_>,
        len: usize,
        pinned: bool,
    ) -> Result<(), ClientError> {
        self.check()?;
        let m = self.entry_message(e, len)?;
        // The header goes first, held back for the pages that follow.
        self.send(&m, &[], true)?;
        let op = ClientOp::SendPages { entry: e };
        if !pinned || self.zero_copy {
            splice_exact(
                pipe,
                None,
                self.stream.as_fd(),
                None,
                len,
                SpliceFlags::empty(),
            )
            .map_err(|p| self.fail(op, p.into()))?;
        } else {
            let mut bounce = std::mem::take(&mut self.bounce);
            bounce.resize(len.min(BOUNCE), 0);
            let mut left = len;
            let mut r = Ok(());
            while left > 0 {
                let n = left.min(BOUNCE);
                if let Err(p) = page_pipe_sys::read_exact(pipe, &mut bounce[..n]) {
                    r = Err(self.fail(ClientOp::ReadPipe { entry: e }, p.into()));
                    break;
                }
                if let Err(p) = send_all(self.stream.as_fd(), &bounce[..n], left > n) {
                    r = Err(self.fail(op, p.into()));
                    break;
                }
                left -= n;
            }
            self.bounce = bounce;
            r?;
        }
        self.report.bytes += len as u64;
        self.count(&e);
        Ok(())
    }

    /// Asks for up to `dst.len()` bytes (whole pages) of image `id` from `vaddr`
    /// (`GET`, as CRIU's lazy-pages daemon does) and reads them into `dst`. Returns the
    /// pages received: the server may send fewer than asked (the run of pages it holds
    /// from `vaddr` ends), never none.
    ///
    /// # Errors
    /// [`ClientError::Closed`] when the server holds no page at `vaddr` (CRIU's server,
    /// and this crate's, then end the session); [`ClientError::Reply`] for a reply that
    /// is not for this request; [`ClientError::BadEntry`] when `dst` is not whole pages.
    pub fn get(&mut self, id: u64, vaddr: u64, dst: &mut [u8]) -> Result<u64, ClientError> {
        self.check()?;
        let ps = self.limits.page_size;
        let pages = (dst.len() / ps) as u64;
        let m = Message::Get { id, vaddr, pages };
        if !dst.len().is_multiple_of(ps) || Message::decode(&m.encode(), &self.limits).is_err() {
            return Err(ClientError::BadEntry {
                entry: PagemapEntry {
                    vaddr,
                    pages,
                    flags: PageFlags::PRESENT,
                },
                bytes: dst.len(),
            });
        }
        self.send(&m, &[], false)?;
        let mut head = [0u8; HEADER_LEN];
        self.receive(&mut head, Expected::GetReply)?;
        let got = parse_get_reply(&head, id, vaddr, pages, &self.limits).map_err(|error| {
            self.broken = true;
            ClientError::Reply {
                peer: self.peer.clone(),
                error,
            }
        })?;
        let entry = PagemapEntry {
            vaddr,
            pages: got,
            flags: PageFlags::PRESENT,
        };
        self.receive(&mut dst[..got as usize * ps], Expected::Pages { entry })?;
        self.report.pages_received += got;
        Ok(got)
    }

    /// Ends the session: `CLOSE`, the server's status (0: its images are written), then
    /// closes the connection, and says what was sent.
    ///
    /// # Errors
    /// [`ClientError::Refused`] for a non-zero status; [`ClientError`] when the send or
    /// the reply failed (then the server commits nothing).
    pub fn close(mut self) -> Result<ClientReport, ClientError> {
        self.end(Message::Close)
    }

    /// As [`close`](Self::close), with `FORCE_CLOSE`: for a socket that stays open after
    /// this client is done with it (the server does not wait for its end).
    ///
    /// # Errors
    /// As [`close`](Self::close).
    pub fn force_close(mut self) -> Result<ClientReport, ClientError> {
        self.end(Message::ForceClose)
    }

    fn end(&mut self, m: Message) -> Result<ClientReport, ClientError> {
        self.check()?;
        self.send(&m, &[], false)?;
        let mut b = [0u8; 4];
        self.receive(&mut b, Expected::CloseReply)?;
        let status = i32::from_ne_bytes(b);
        self.stream.shutdown_write();
        if status != 0 {
            return Err(ClientError::Refused {
                peer: self.peer.clone(),
                status,
            });
        }
        Ok(self.report)
    }
}

impl sealed::Sealed for PageServerClient {}
impl DumpSink for PageServerClient {
    fn present(
        &mut self,
        e: PagemapEntry,
        pipe: BorrowedFd<'_>,
        len: usize,
        pinned: bool,
    ) -> Result<(), DumpErrorKind> {
        self.send_entry_from_pipe(e, pipe, len, pinned)
            .map_err(|c| DumpErrorKind::Sink {
                entry: e,
                error: c.into_io(),
            })
    }
    fn absent(&mut self, e: PagemapEntry) -> Result<(), DumpErrorKind> {
        self.send_entry_slices(e, &[])
            .map_err(|c| DumpErrorKind::Sink {
                entry: e,
                error: c.into_io(),
            })
    }
    fn present_chunks(
        &mut self,
        e: PagemapEntry,
        chunks: &[Chunk<'_>],
    ) -> Result<(), DumpErrorKind> {
        let as_io = |c: ClientError| DumpErrorKind::Sink {
            entry: e,
            error: c.into_io(),
        };
        match chunks
            .iter()
            .map(Chunk::as_slice)
            .collect::<Option<Vec<_>>>()
        {
            Some(slices) => self.send_entry_slices(e, &slices).map_err(as_io),
            // Memory others may write: only the kernel reads it.
            None => self.send_entry_chunks(e, chunks).map_err(as_io),
        }
    }
    /// Straight from memory, unless zero copy was asked for with
    /// [`allow_zero_copy`](PageServerClient::allow_zero_copy). Pages of borrowed memory
    /// must be copied anyway; for sealed memory, splicing page references into a socket
    /// measured slower than sending copies from memory on loopback (README,
    /// "Performance": the receiver copies either way, and references cost per page).
    fn prefers_memory(&self, _sealed: bool) -> bool {
        !self.zero_copy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn bad_entries_are_refused_before_anything_is_sent() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut c = PageServerClient::from_unix(a).unwrap();
        assert!(matches!(
            c.send_entry(
                PagemapEntry {
                    vaddr: 0,
                    pages: 1,
                    flags: PageFlags::PRESENT
                },
                &[]
            ),
            Err(ClientError::NotOpen)
        ));
        c.image = ImageId::pagemap(1);
        let ps = page_pipe_sys::page_size().get();
        for (e, bytes) in [
            (
                PagemapEntry {
                    vaddr: 1,
                    pages: 1,
                    flags: PageFlags::PRESENT,
                },
                ps,
            ),
            (
                PagemapEntry {
                    vaddr: 0,
                    pages: 0,
                    flags: PageFlags::LAZY,
                },
                0,
            ),
            (
                PagemapEntry {
                    vaddr: 0,
                    pages: 2,
                    flags: PageFlags::PRESENT,
                },
                ps,
            ),
            (
                PagemapEntry {
                    vaddr: 0,
                    pages: 1,
                    flags: PageFlags::PARENT | PageFlags::LAZY,
                },
                0,
            ),
        ] {
            let r = c.send_entry(e, &vec![0u8; bytes]);
            assert!(matches!(r, Err(ClientError::BadEntry { .. })), "{e}: {r:?}");
        }
        drop(c);
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "nothing was sent");
    }
}
