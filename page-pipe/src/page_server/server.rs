//! [`PageServer`]: receives dumps as CRIU's page server does and writes CRIU images;
//! serves pages of the images back (`GET`).
//!
//! # Rules
//!
//! - A session is one connection. Its messages pass the [wire checks](super::wire) and
//!   the session rules ([`RuleError`]) before anything is written; each entry becomes one
//!   pagemap entry, in stream order, never joined, with its count as CRIU 4.x writes it.
//! - Payloads are moved as they arrive: from the socket into a pipe with `splice` and
//!   from the pipe into the pages file (bytes already buffered, and short tails, are
//!   written from the buffer). Nothing is allocated by what a peer claims.
//! - The images of a session are committed at `CLOSE`, each atomically, and the reply
//!   says whether they were (0) or not (-1). Every image is first written out, synced
//!   and its old pagemap removed; only when all of that succeeded is any renamed into
//!   place, so a failure there commits none of them (only a failed rename, after
//!   others, leaves those committed). A session that ends any other way commits
//!   nothing: the writers remove their temporary files.
//! - Every blocking call is bounded by the idle timeout, and the whole session by the
//!   session timeout when one is set; a stopped server shuts its sessions' sockets.
//! - File names come from numbers: `pagemap-<id>.img`, `pagemap-shmem-<id>.img`,
//!   `pages-<n>.img` in the configured directory (or its numbered subdirectories with
//!   [`Layout::Chain`]); the only link made is `parent`.

use std::fmt;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::image::PagemapEntry;

use super::rules::{Rules, Step};
use super::session::{Registry, Shared, serve_session};
use super::stream::{Peer, Stream};
use super::wire::{Decoder, ImageId, Limits};

use super::config::*;
use super::error::*;

/// A connection accepted by [`PageServer::accept`], to hand to [`PageServer::serve`];
/// or one made otherwise (a socket pair, a socket handed down).
///
/// ```
/// use std::os::unix::net::UnixStream;
/// use page_pipe::page_server::{Incoming, PageServer, PageServerClient, ServerConfig};
/// let dir = std::env::temp_dir().join(format!("pp-doc-incoming-{}", std::process::id()));
/// let server = PageServer::bind("127.0.0.1:0", ServerConfig::new(&dir))?;
/// let (a, b) = UnixStream::pair()?;
/// let client = std::thread::spawn(move || {
///     let mut c = PageServerClient::from_unix(a)?;
///     c.open(page_pipe::page_server::wire::ImageId::pagemap(3).unwrap())?;
///     c.close()
/// });
/// let report = server.serve(Incoming::from_unix(b))?;
/// assert_eq!(report.images.len(), 1);
/// client.join().unwrap()?;
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Incoming {
    stream: Stream,
    peer: Peer,
}

impl Incoming {
    /// A connected TCP stream to serve.
    pub fn from_tcp(s: std::net::TcpStream) -> Self {
        let _ = s.set_nodelay(true);
        let stream = Stream::Tcp(s);
        let peer = stream.peer(None);
        Self { stream, peer }
    }

    /// A connected Unix stream to serve (a socket pair, or a socket handed down, as
    /// CRIU's `--ps-socket`).
    pub fn from_unix(s: UnixStream) -> Self {
        let stream = Stream::Unix(s);
        let peer = stream.peer(None);
        Self { stream, peer }
    }

    /// A TLS connection to serve, its handshake done (the `tls` feature; see
    /// [`tls`](crate::tls)).
    #[cfg(feature = "tls")]
    pub fn from_tls(s: crate::tls::TlsStream) -> Self {
        let stream = Stream::Tls(s);
        let peer = stream.peer(None);
        Self { stream, peer }
    }

    /// The stream and its peer.
    pub(crate) fn into_parts(self) -> (Stream, Peer) {
        (self.stream, self.peer)
    }

    /// The client.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

/// How long the accept loop waits before it tries again when `accept` fails for want of
/// descriptors or memory (sooner when a session ends).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A page server: listens on TCP (127.0.0.1 unless told otherwise) or a Unix socket,
/// writes CRIU images of what its clients send, and serves pages back. See the
/// [module docs](super) for what it accepts and how it differs from CRIU's.
///
/// Serve one session on the calling thread ([`accept`](Self::accept) then
/// [`serve`](Self::serve), as `criu page-server` does), or many at once on threads of
/// their own ([`spawn`](Self::spawn)).
///
/// ```
/// use page_pipe::image::{Image, PageFlags, PagemapEntry};
/// use page_pipe::page_server::{PageServer, PageServerClient, ServerConfig};
/// let dir = std::env::temp_dir().join(format!("pp-doc-server-{}", std::process::id()));
/// let server = PageServer::bind("127.0.0.1:0", ServerConfig::new(&dir))?;
/// let addr = server.local_addr().unwrap();
/// let ps = page_pipe::page_size();
/// let client = std::thread::spawn(move || {
///     let mut c = PageServerClient::connect(addr, 7)?;
///     let e = PagemapEntry { vaddr: 0x1000 * ps as u64, pages: 1, flags: PageFlags::PRESENT };
///     c.send_entry(e, &vec![3u8; ps])?;
///     c.close()
/// });
/// let report = server.serve(server.accept()?)?;
/// assert_eq!(report.images[0].pages_id, 65537);
/// client.join().unwrap()?;
/// let img = Image::open_id(&dir, 7)?;
/// assert_eq!(img.entries().len(), 1);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct PageServer {
    listener: Listener,
    shared: Arc<Shared>,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::TlsServerConfig>,
}

impl PageServer {
    fn new(listener: Listener, config: ServerConfig) -> Result<Self, ServerError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.dir)
            .map_err(|error| ServerError::Dir {
                path: config.dir.clone(),
                error,
            })?;
        let shared = Arc::new(Shared {
            config,
            registry: Mutex::new(Registry::default()),
            chain_next: Mutex::new(1),
            stopping: AtomicBool::new(false),
        });
        let first = shared
            .chain_dirs()
            .first()
            .map_or(1, |n| n.saturating_add(1));
        *shared
            .chain_next
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = first;
        Ok(Self {
            listener,
            shared,
            #[cfg(feature = "tls")]
            tls: None,
        })
    }

    /// Requires TLS of every TCP client (the `tls` feature): [`accept`](Self::accept)
    /// completes the handshake, which refuses clients without a certificate the
    /// configured CA signed, before a session starts. The handshake runs on the accepting
    /// thread, bounded by the idle timeout.
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, tls: crate::tls::TlsServerConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Listens on TCP address `addr` (`"127.0.0.1:0"` for any free port).
    ///
    /// # Errors
    /// [`ServerError::Bind`], or [`ServerError::Dir`] when the image directory cannot be
    /// made.
    pub fn bind(
        addr: impl ToSocketAddrs + fmt::Debug,
        config: ServerConfig,
    ) -> Result<Self, ServerError> {
        let l = TcpListener::bind(&addr).map_err(|error| ServerError::Bind {
            addr: format!("{addr:?}"),
            error,
        })?;
        Self::new(Listener::Tcp(l), config)
    }

    /// Listens on a Unix socket made at `path` (which must not exist; it is removed when
    /// the server is dropped).
    ///
    /// # Errors
    /// As [`bind`](Self::bind).
    pub fn bind_unix(path: impl AsRef<Path>, config: ServerConfig) -> Result<Self, ServerError> {
        let path = path.as_ref();
        let l = UnixListener::bind(path).map_err(|error| ServerError::Bind {
            addr: path.display().to_string(),
            error,
        })?;
        Self::new(Listener::Unix(l, path.to_path_buf()), config)
    }

    /// The TCP address it listens on (`None` on a Unix socket).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// The Unix socket it listens on (`None` on TCP).
    pub fn unix_path(&self) -> Option<&Path> {
        match &self.listener {
            Listener::Tcp(_) => None,
            Listener::Unix(_, p) => Some(p),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// Waits for a connection.
    ///
    /// # Errors
    /// [`ServerError::Accept`].
    pub fn accept(&self) -> Result<Incoming, ServerError> {
        let accept_err = |error| ServerError::Accept { error };
        Ok(match &self.listener {
            #[cfg(feature = "tls")]
            Listener::Tcp(l) if self.tls.is_some() => {
                let tcp = l.accept().map_err(accept_err)?.0;
                // Accepted sockets may inherit nothing, but make sure: the handshake blocks.
                tcp.set_nonblocking(false).map_err(accept_err)?;
                let tls = self.tls.as_ref().expect("checked above");
                let s = crate::tls::TlsStream::accept(tcp, tls, self.shared.config.idle_timeout)
                    .map_err(|error| ServerError::Tls { error })?;
                Incoming::from_tls(s)
            }
            Listener::Tcp(l) => Incoming::from_tcp(l.accept().map_err(accept_err)?.0),
            Listener::Unix(l, path) => {
                let stream = Stream::Unix(l.accept().map_err(accept_err)?.0);
                let peer = stream.peer(Some(path));
                Incoming { stream, peer }
            }
        })
    }

    /// Serves one session on the calling thread, to its end.
    ///
    /// # Errors
    /// [`SessionError`]: why the session failed; it committed nothing then (unless the
    /// failure came after `CLOSE`'s reply: data after `CLOSE`, or its end not coming
    /// within the idle timeout).
    pub fn serve(&self, c: Incoming) -> Result<SessionReport, SessionError> {
        serve_session(&c.stream, c.peer, &self.shared)
    }

    /// Serves sessions on threads of their own (at most [`ServerConfig::max_sessions`] at
    /// once) until [`RunningServer::stop`].
    ///
    /// # Errors
    /// [`ServerError::Spawn`] when the accepting thread cannot start.
    pub fn spawn(self) -> Result<RunningServer, ServerError> {
        let spawn_err = |error| ServerError::Spawn { error };
        let (wake_r, wake_w) = UnixStream::pair().map_err(spawn_err)?;
        wake_r.set_nonblocking(true).map_err(spawn_err)?;
        wake_w.set_nonblocking(true).map_err(spawn_err)?;
        let wake_w = Arc::new(wake_w);
        let (tx, rx) = channel();
        let addr = self.local_addr();
        let unix_path = self.unix_path().map(Path::to_path_buf);
        let shared = Arc::clone(&self.shared);
        let w = Arc::clone(&wake_w);
        let accept = std::thread::Builder::new()
            .name("page-server".into())
            .spawn(move || self.accept_loop(&wake_r, &w, &tx))
            .map_err(spawn_err)?;
        Ok(RunningServer {
            addr,
            unix_path,
            shared,
            wake: wake_w,
            accept: Some(accept),
            outcomes: rx,
        })
    }

    fn accept_loop(
        self,
        wake_r: &UnixStream,
        wake_w: &Arc<UnixStream>,
        tx: &Sender<SessionOutcome>,
    ) -> ServerStats {
        let mut stats = ServerStats::default();
        let live: Arc<Mutex<Vec<(u64, Stream)>>> = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        // Sessions that ended cleanly, and that failed.
        let ends = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut next = 0u64;
        let listener_fd = match &self.listener {
            Listener::Tcp(l) => {
                let _ = l.set_nonblocking(true);
                l.as_fd()
            }
            Listener::Unix(l, _) => {
                let _ = l.set_nonblocking(true);
                l.as_fd()
            }
        };
        while !self.shared.stopping.load(Ordering::Acquire) {
            threads.retain(|t| !t.is_finished());
            let room = count.load(Ordering::Acquire) < self.shared.config.max_sessions.max(1);
            let mut fds = vec![wake_r.as_fd()];
            if room {
                fds.push(listener_fd);
            }
            let Ok(ready) = page_pipe_sys::poll_readable(&fds, None) else {
                break;
            };
            if ready[0] {
                let mut sink = [0u8; 64];
                while page_pipe_sys::recv_some(wake_r, &mut sink).is_ok_and(|n| n > 0) {}
            }
            if !room || !ready.get(1).copied().unwrap_or(false) {
                continue;
            }
            let incoming = match self.accept() {
                Ok(c) => c,
                // Nothing waiting any more, or a connection that went away meanwhile.
                Err(ServerError::Accept { error })
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::Interrupted
                            | std::io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue;
                }
                // Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS): the connection
                // stays queued and the listener readable, so wait a little (or until a
                // session ends or the server stops) rather than spin on `accept`.
                Err(_) => {
                    let _ = page_pipe_sys::poll_readable(&[wake_r.as_fd()], Some(ACCEPT_RETRY));
                    continue;
                }
            };
            // Accepted sockets do not inherit the listener's non-blocking mode on Linux;
            // make sure, as the session relies on blocking calls with timeouts.
            let _ = match &incoming.stream {
                Stream::Tcp(s) => s.set_nonblocking(false),
                Stream::Unix(s) => s.set_nonblocking(false),
                #[cfg(feature = "tls")]
                Stream::Tls(_) => Ok(()),
            };
            stats.sessions += 1;
            next += 1;
            let id = next;
            if let Ok(c) = incoming.stream.try_clone() {
                live.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((id, c));
            }
            count.fetch_add(1, Ordering::AcqRel);
            let (shared, live2, count2) = (
                Arc::clone(&self.shared),
                Arc::clone(&live),
                Arc::clone(&count),
            );
            let (tx2, wake2, ends2) = (tx.clone(), Arc::clone(wake_w), Arc::clone(&ends));
            let spawned = std::thread::Builder::new()
                .name(format!("page-server-{id}"))
                .spawn(move || {
                    let peer = incoming.peer.clone();
                    let result = serve_session(&incoming.stream, incoming.peer, &shared);
                    drop(incoming.stream);
                    live2
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .retain(|(i, _)| *i != id);
                    ends2[usize::from(result.is_err())].fetch_add(1, Ordering::AcqRel);
                    let _ = tx2.send(SessionOutcome { peer, result });
                    count2.fetch_sub(1, Ordering::AcqRel);
                    let _ = page_pipe_sys::send_all(wake2.as_fd(), &[1], false);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(_) => {
                    // The closure (and the connection in it) is gone: no thread runs it.
                    stats.refused += 1;
                    stats.sessions -= 1;
                    count.fetch_sub(1, Ordering::AcqRel);
                    live.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .retain(|(i, _)| *i != id);
                }
            }
        }
        self.shared.stopping.store(true, Ordering::Release);
        for (_, s) in live.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            s.shutdown();
        }
        for t in threads {
            let _ = t.join();
        }
        stats.ok = ends[0].load(Ordering::Acquire);
        stats.failed = ends[1].load(Ordering::Acquire);
        stats
    }
}

impl Drop for PageServer {
    /// Removes the Unix socket it made, if a socket is still there.
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = &self.listener {
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A [`PageServer`] serving on threads of its own. [`stop`](Self::stop) (or dropping it)
/// stops accepting, shuts down the sessions still running (they commit nothing), and
/// joins every thread.
///
/// ```
/// use std::io::Write;
/// use std::time::Duration;
/// use page_pipe::page_server::{PageServer, ServerConfig, SessionErrorKind};
/// let dir = std::env::temp_dir().join(format!("pp-doc-running-{}", std::process::id()));
/// let running = PageServer::bind("127.0.0.1:0", ServerConfig::new(&dir))?.spawn()?;
/// // A client that sends half a header and leaves.
/// let mut s = std::net::TcpStream::connect(running.local_addr().unwrap())?;
/// s.write_all(&[4, 0, 0])?;
/// drop(s);
/// let out = running.next_outcome(Duration::from_secs(5)).unwrap();
/// assert!(matches!(out.result.unwrap_err().kind, SessionErrorKind::Wire(_)));
/// let stats = running.stop();
/// assert_eq!((stats.sessions, stats.ok, stats.failed), (1, 0, 1));
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct RunningServer {
    addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
    shared: Arc<Shared>,
    wake: Arc<UnixStream>,
    accept: Option<JoinHandle<ServerStats>>,
    outcomes: Receiver<SessionOutcome>,
}

impl RunningServer {
    /// The TCP address it listens on (`None` on a Unix socket).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// The Unix socket it listens on (`None` on TCP).
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix_path.as_deref()
    }

    /// The next session to end, waiting at most `timeout` for one.
    pub fn next_outcome(&self, timeout: Duration) -> Option<SessionOutcome> {
        self.outcomes.recv_timeout(timeout).ok()
    }

    fn halt(&mut self) -> ServerStats {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = page_pipe_sys::send_all(self.wake.as_fd(), &[1], false);
        self.accept
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }

    /// Stops: no more connections, the sessions still running are shut down, and every
    /// thread joined. Returns what the server did.
    pub fn stop(mut self) -> ServerStats {
        self.halt()
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// What [`check_stream`] found in a client stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamSummary {
    /// Messages.
    pub messages: u64,
    /// Each image opened, in order, with its entries in stream order.
    pub images: Vec<(ImageId, Vec<PagemapEntry>)>,
    /// Bytes of pages.
    pub payload_bytes: u64,
    /// `GET` messages.
    pub gets: u64,
    /// Whether it ended with `FORCE_CLOSE`.
    pub forced: bool,
}

/// Checks a recorded client stream (all the bytes a client sent) against the server's
/// rules without writing anything: every header, every payload length, the session
/// rules, `CLOSE` at the end and nothing after it. Holes are not checked (there is no
/// parent here). Memory is bounded by the input.
///
/// ```
/// use page_pipe::image::{PageFlags, PagemapEntry};
/// use page_pipe::page_server::check_stream;
/// use page_pipe::page_server::wire::{ImageId, Limits, Message};
/// let img = ImageId::pagemap(1).unwrap();
/// let e = PagemapEntry { vaddr: 0x10000, pages: 2, flags: PageFlags::LAZY };
/// let mut s = Message::Open2 { image: img }.to_vec();
/// s.extend(Message::add_f(img, e).encode());
/// s.extend(Message::Close.encode());
/// let sum = check_stream(&s, Limits::default(), 16)?;
/// assert_eq!(sum.images, vec![(img, vec![e])]);
/// # Ok::<(), page_pipe::page_server::SessionErrorKind>(())
/// ```
///
/// # Errors
/// [`SessionErrorKind`]: the first problem, with its byte offset.
pub fn check_stream(
    bytes: &[u8],
    limits: Limits,
    max_images: usize,
) -> Result<StreamSummary, SessionErrorKind> {
    let mut rules = Rules::new(max_images, limits.page_size);
    let mut sum = StreamSummary::default();
    let mut d = Decoder::new(bytes, limits);
    for f in d.by_ref() {
        let f = f.map_err(SessionErrorKind::Wire)?;
        sum.messages += 1;
        sum.payload_bytes += f.payload.len() as u64;
        let step = rules
            .step(&f.message)
            .map_err(|error| SessionErrorKind::Rules {
                offset: f.offset,
                error,
            })?;
        match step {
            Step::Open { image, .. } => sum.images.push((image, Vec::new())),
            Step::Entry { image, entry, open } => {
                if open {
                    sum.images.push((image, Vec::new()));
                }
                sum.images
                    .last_mut()
                    .expect("opened by the rules")
                    .1
                    .push(entry);
            }
            Step::Get { .. } => sum.gets += 1,
            Step::Parent { .. } => {}
            Step::Close { force } => {
                sum.forced = force;
                break;
            }
        }
    }
    if !rules.closed() {
        return Err(SessionErrorKind::NotClosed { offset: d.offset() });
    }
    if !d.rest().is_empty() {
        return Err(SessionErrorKind::DataAfterClose { offset: d.offset() });
    }
    Ok(sum)
}
