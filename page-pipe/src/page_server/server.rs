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
//!   says whether they were (0) or not (-1). A session that ends any other way commits
//!   nothing: the writers remove their temporary files.
//! - Every blocking call is bounded by the idle timeout, and the whole session by the
//!   session timeout when one is set; a stopped server shuts its sessions' sockets.
//! - File names come from numbers: `pagemap-<id>.img`, `pagemap-shmem-<id>.img`,
//!   `pages-<n>.img` in the configured directory (or its numbered subdirectories with
//!   [`Layout::Chain`]); the only link made is `parent`.

use std::fmt;
use std::io;
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

use crate::image::{ImageError, ImageSummary, PagemapEntry};

use super::rules::{RuleError, Rules, Step};
use super::session::{Registry, Shared, serve_session};
use super::stream::{Peer, Stream};
use super::wire::{Command, Decoder, Expected, ImageId, Limits, WireError};

/// How long a session may be silent (each receive and each send) before it fails, by
/// default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Sessions served at once, by default.
pub const DEFAULT_MAX_SESSIONS: usize = 16;
/// Images one session may open, by default (each holds two files open until `CLOSE`).
pub const DEFAULT_MAX_IMAGES: usize = 256;

/// Where a server writes the images of its sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// Every session writes into the directory, as `criu page-server -D DIR` does; its
    /// parent is [`ServerConfig::parent`], or the directory's `parent` link. The default.
    #[default]
    Flat,
    /// Session `n` writes into the subdirectory `<n>` (counting on from the highest number
    /// already there), whose parent is `<n - 1>`: the images of an iterative migration
    /// (pre-dumps, then the dump) from one long-running server, each session an
    /// incremental image on the one before.
    Chain,
}

/// How a [`PageServer`] runs.
///
/// ```
/// use std::time::Duration;
/// use page_pipe::page_server::{Layout, ServerConfig};
/// let c = ServerConfig {
///     layout: Layout::Chain,
///     idle_timeout: Some(Duration::from_secs(5)),
///     ..ServerConfig::new("/var/lib/migration")
/// };
/// assert!(c.sync);
/// ```
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The image directory (made, mode 0700, if missing).
    pub dir: PathBuf,
    /// Where sessions write (default [`Layout::Flat`]).
    pub layout: Layout,
    /// With [`Layout::Flat`]: the parent images (CRIU's `--prev-images-dir`); each image
    /// gets a `parent` link to it. Default: none, or the directory's own `parent` link
    /// when it has one.
    pub parent: Option<PathBuf>,
    /// The longest a session may wait for its peer in one call (default
    /// [`DEFAULT_IDLE_TIMEOUT`]; `None`: for ever, as CRIU).
    pub idle_timeout: Option<Duration>,
    /// The longest a whole session may take (default: no limit). The idle timeout bounds
    /// silence; this bounds a peer that sends a byte now and then.
    pub session_timeout: Option<Duration>,
    /// Sessions served at once by [`PageServer::spawn`] (default
    /// [`DEFAULT_MAX_SESSIONS`]); more connections wait to be accepted.
    pub max_sessions: usize,
    /// Images one session may open (default [`DEFAULT_MAX_IMAGES`]).
    pub max_images: usize,
    /// What a message may claim, and the page size (default [`Limits::default`]).
    pub limits: Limits,
    /// Whether images are synced before they are committed (default on; see
    /// [`ImageWriter::with_sync`](crate::image::ImageWriter::with_sync)).
    pub sync: bool,
}

impl ServerConfig {
    /// The defaults, writing into `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            layout: Layout::Flat,
            parent: None,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            session_timeout: None,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_images: DEFAULT_MAX_IMAGES,
            limits: Limits::default(),
            sync: true,
        }
    }
}

/// An image a session committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedImage {
    /// The image.
    pub image: ImageId,
    /// Its directory.
    pub dir: PathBuf,
    /// Its pages file, `pages-<pages_id>.img`.
    pub pages_id: u32,
    /// What it holds.
    pub summary: ImageSummary,
}

/// What a session did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionReport {
    /// The client.
    pub peer: Peer,
    /// The images committed, in the order they were opened.
    pub images: Vec<CommittedImage>,
    /// Messages received.
    pub messages: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Pages served (`GET`).
    pub pages_served: u64,
    /// Whether it ended with `FORCE_CLOSE`.
    pub forced: bool,
}

/// A session's end, as a [`RunningServer`] reports it.
#[derive(Debug)]
pub struct SessionOutcome {
    /// The client.
    pub peer: Peer,
    /// What it did, or why it failed.
    pub result: Result<SessionReport, SessionError>,
}

/// What a [`RunningServer`] did, when stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerStats {
    /// Connections served.
    pub sessions: u64,
    /// Sessions that ended cleanly.
    pub ok: u64,
    /// Sessions that failed.
    pub failed: u64,
    /// Connections dropped unserved (no thread could be started).
    pub refused: u64,
}

/// What the server was doing when a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOp {
    /// Receiving.
    Receive {
        /// What it waited for.
        expected: Expected,
    },
    /// Sending the reply to a command.
    Reply {
        /// The command.
        command: Command,
    },
    /// Sending pages for `GET`.
    SendPages {
        /// The image id.
        id: u64,
        /// The first page.
        vaddr: u64,
    },
}

impl fmt::Display for SessionOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionOp::Receive { expected } => write!(f, "receive {expected}"),
            SessionOp::Reply { command } => write!(f, "reply to {command}"),
            SessionOp::SendPages { id, vaddr } => {
                write!(f, "send pages of image {id} from {vaddr:#x}")
            }
        }
    }
}

/// Why a session failed; the offset is the byte of the client's stream where it did.
///
/// ```
/// use page_pipe::page_server::wire::{ImageId, Limits, Message};
/// use page_pipe::page_server::{check_stream, SessionErrorKind};
/// // OPEN2, then the stream ends without CLOSE.
/// let s = Message::Open2 { image: ImageId::pagemap(1).unwrap() }.to_vec();
/// let e = check_stream(&s, Limits::default(), 16).unwrap_err();
/// assert!(matches!(e, SessionErrorKind::NotClosed { offset: 32 }));
/// assert!(e.to_string().contains("without PS_IOV_CLOSE"));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum SessionErrorKind {
    /// The bytes break the protocol (a cut stream included).
    Wire(WireError),
    /// A message breaks the session rules.
    Rules {
        /// Byte offset of the message.
        offset: u64,
        /// The rule.
        error: RuleError,
    },
    /// The stream ended between messages before `CLOSE` (CRIU: "the data were not
    /// flushed").
    NotClosed {
        /// Bytes received.
        offset: u64,
    },
    /// Data came after `CLOSE`.
    DataAfterClose {
        /// Its offset.
        offset: u64,
    },
    /// The peer sent or took nothing within the idle timeout, or the session timeout
    /// ran out.
    Timeout {
        /// Bytes received.
        offset: u64,
        /// What the server was doing.
        op: SessionOp,
        /// The timeout that ran out.
        after: Duration,
    },
    /// A socket or pipe call failed (`ECONNRESET`, `EPIPE`).
    Io {
        /// Bytes received.
        offset: u64,
        /// What the server was doing.
        op: SessionOp,
        /// The error.
        error: io::Error,
    },
    /// Writing or committing an image failed.
    Image {
        /// The image.
        image: ImageId,
        /// The error, naming the file.
        error: Box<ImageError>,
    },
    /// Another session is writing the same image in the same directory.
    Busy {
        /// Byte offset of the message.
        offset: u64,
        /// The image.
        image: ImageId,
    },
    /// A hole for an image whose parent does not hold it (or no parent at all).
    HoleWithoutParent {
        /// Byte offset of the message.
        offset: u64,
        /// The image.
        image: ImageId,
        /// The hole.
        entry: PagemapEntry,
    },
    /// A hole with a page in no entry of the parent image.
    HoleNotInParent {
        /// Byte offset of the message.
        offset: u64,
        /// The image.
        image: ImageId,
        /// The hole.
        entry: PagemapEntry,
        /// The first page the parent lacks.
        vaddr: u64,
    },
    /// `GET` for a page the image chain does not hold: as CRIU's server, no reply, and
    /// the session ends.
    GetMissing {
        /// Byte offset of the message.
        offset: u64,
        /// The image id.
        id: u64,
        /// The page.
        vaddr: u64,
    },
    /// `GET` for an image that cannot be read.
    GetImage {
        /// Byte offset of the message.
        offset: u64,
        /// The image id.
        id: u64,
        /// The error.
        error: Box<ImageError>,
    },
    /// A directory for the session's images could not be made.
    Dir {
        /// The directory.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// The server was stopped.
    Stopped,
}

impl fmt::Display for SessionErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionErrorKind::Wire(e) => write!(f, "{e}"),
            SessionErrorKind::Rules { offset, error } => write!(f, "byte {offset}: {error}"),
            SessionErrorKind::NotClosed { offset } => write!(
                f,
                "the stream ended after {offset} bytes without PS_IOV_CLOSE; nothing was committed"
            ),
            SessionErrorKind::DataAfterClose { offset } => {
                write!(f, "byte {offset}: data after PS_IOV_CLOSE")
            }
            SessionErrorKind::Timeout { offset, op, after } => write!(
                f,
                "after {offset} bytes: cannot {op}: nothing moved for {after:?}"
            ),
            SessionErrorKind::Io { offset, op, .. } => {
                write!(f, "after {offset} bytes: cannot {op}")
            }
            SessionErrorKind::Image { image, .. } => write!(f, "cannot write {image}"),
            SessionErrorKind::Busy { offset, image } => write!(
                f,
                "byte {offset}: another session is writing {image} in the same directory"
            ),
            SessionErrorKind::HoleWithoutParent {
                offset,
                image,
                entry,
            } => write!(
                f,
                "byte {offset}: {image}: hole {entry}, but the parent holds no {image}"
            ),
            SessionErrorKind::HoleNotInParent {
                offset,
                image,
                entry,
                vaddr,
            } => write!(
                f,
                "byte {offset}: {image}: hole {entry}, but page {vaddr:#x} is in no entry of the parent"
            ),
            SessionErrorKind::GetMissing { offset, id, vaddr } => write!(
                f,
                "byte {offset}: PS_IOV_GET of page {vaddr:#x} of image {id}, which the images do not hold; the session ends, as CRIU's does"
            ),
            SessionErrorKind::GetImage { offset, id, .. } => {
                write!(f, "byte {offset}: PS_IOV_GET: cannot read image {id}")
            }
            SessionErrorKind::Dir { path, .. } => {
                write!(f, "cannot make the directory {}", path.display())
            }
            SessionErrorKind::Stopped => f.write_str("the server was stopped"),
        }
    }
}

impl std::error::Error for SessionErrorKind {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SessionErrorKind::Io { error, .. } | SessionErrorKind::Dir { error, .. } => Some(error),
            SessionErrorKind::Image { error, .. } | SessionErrorKind::GetImage { error, .. } => {
                Some(error.as_ref())
            }
            _ => None,
        }
    }
}

/// Why a session failed, and with whom. Its [`source`](std::error::Error::source) is the
/// [`SessionErrorKind`].
#[derive(Debug)]
pub struct SessionError {
    /// The client.
    pub peer: Peer,
    /// What went wrong.
    pub kind: SessionErrorKind,
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page-server session with {}", self.peer)
    }
}

impl std::error::Error for SessionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.kind)
    }
}

/// Why a server could not start or go on.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerError {
    /// The address could not be bound.
    Bind {
        /// The address as given.
        addr: String,
        /// The error.
        error: io::Error,
    },
    /// The image directory could not be made or read.
    Dir {
        /// The directory.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// A connection could not be accepted.
    Accept {
        /// The error.
        error: io::Error,
    },
    /// The server's thread could not be started.
    Spawn {
        /// The error.
        error: io::Error,
    },
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Bind { addr, .. } => write!(f, "cannot listen on {addr}"),
            ServerError::Dir { path, .. } => {
                write!(f, "cannot use the image directory {}", path.display())
            }
            ServerError::Accept { .. } => f.write_str("cannot accept a connection"),
            ServerError::Spawn { .. } => f.write_str("cannot start the server's thread"),
        }
    }
}

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServerError::Bind { error, .. }
            | ServerError::Dir { error, .. }
            | ServerError::Accept { error }
            | ServerError::Spawn { error } => Some(error),
        }
    }
}

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

    /// The client.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

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
        Ok(Self { listener, shared })
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
                Err(_) => continue,
            };
            // Accepted sockets do not inherit the listener's non-blocking mode on Linux;
            // make sure, as the session relies on blocking calls with timeouts.
            let _ = match &incoming.stream {
                Stream::Tcp(s) => s.set_nonblocking(false),
                Stream::Unix(s) => s.set_nonblocking(false),
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
