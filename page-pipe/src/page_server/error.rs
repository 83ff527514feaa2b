//! Why a page-server session or server failed.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::image::{ImageError, PagemapEntry};

use super::rules::RuleError;
use super::stream::Peer;
use super::wire::{Command, Expected, ImageId, WireError, WireErrorKind};

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
    /// With [`Layout::Chain`](super::Layout::Chain): the session directories' numbers
    /// reached `u64::MAX`, so there is none for another session.
    ChainFull {
        /// The image directory.
        dir: PathBuf,
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
            SessionErrorKind::ChainFull { dir } => write!(
                f,
                "{}: a session directory is numbered {}, so no number is left for another",
                dir.display(),
                u64::MAX
            ),
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
    /// A client's TLS handshake failed (the `tls` feature): no certificate, one the CA
    /// did not sign, or a broken connection.
    #[cfg(feature = "tls")]
    Tls {
        /// The error, naming the client.
        error: crate::tls::TlsError,
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
            #[cfg(feature = "tls")]
            ServerError::Tls { .. } => f.write_str("cannot accept a TLS client"),
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
            #[cfg(feature = "tls")]
            ServerError::Tls { error } => Some(error),
        }
    }
}

/// What the client was doing when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientOp {
    /// Connecting or setting the socket up.
    Connect,
    /// Sending a message header.
    Send {
        /// Its command.
        command: Command,
    },
    /// Sending the pages of an entry.
    SendPages {
        /// The entry.
        entry: PagemapEntry,
    },
    /// Reading an entry's pages out of the capture's pipe.
    ReadPipe {
        /// The entry.
        entry: PagemapEntry,
    },
    /// Waiting for a reply.
    Receive {
        /// Which reply.
        expected: Expected,
    },
}

impl fmt::Display for ClientOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientOp::Connect => f.write_str("connect"),
            ClientOp::Send { command } => write!(f, "send {command}"),
            ClientOp::SendPages { entry } => write!(f, "send the pages of entry {entry}"),
            ClientOp::ReadPipe { entry } => {
                write!(f, "read the pages of entry {entry} from the capture's pipe")
            }
            ClientOp::Receive { expected } => write!(f, "receive {expected}"),
        }
    }
}

/// Why a client failed. [`Display`](fmt::Display) names the peer and what the client was
/// doing; [`source`](std::error::Error::source) gives the cause.
///
/// ```
/// use std::error::Error;
/// use page_pipe::page_server::{ClientError, PageServerClient};
/// // A port nothing listens on (bound, then closed).
/// let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
/// let e = PageServerClient::connect(("127.0.0.1", port), 1).unwrap_err();
/// assert!(matches!(e, ClientError::Connect { .. }));
/// assert!(e.source().is_some(), "the io::Error underneath");
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// The connection could not be made.
    Connect {
        /// The address as given.
        addr: String,
        /// The error.
        error: io::Error,
    },
    /// The TLS connection could not be made (the `tls` feature): the server's
    /// certificate refused, ours refused, or the handshake cut.
    #[cfg(feature = "tls")]
    Tls {
        /// The error, naming the server.
        error: crate::tls::TlsError,
    },
    /// A socket or pipe call failed.
    Io {
        /// The server.
        peer: Peer,
        /// What the client was doing.
        op: ClientOp,
        /// The error.
        error: io::Error,
    },
    /// The server did not take or send data within the timeout.
    Timeout {
        /// The server.
        peer: Peer,
        /// What the client was doing.
        op: ClientOp,
        /// The timeout.
        after: Duration,
    },
    /// The server closed the connection before its reply (CRIU's server does so for a
    /// `GET` of pages it does not hold, and when it fails).
    Closed {
        /// The server.
        peer: Peer,
        /// The reply it did not send.
        expected: Expected,
        /// Bytes of it that came.
        got: usize,
    },
    /// A reply the protocol does not allow.
    Reply {
        /// The server.
        peer: Peer,
        /// What is wrong.
        error: WireErrorKind,
    },
    /// The server answered `CLOSE` with a non-zero status: it did not write the images.
    Refused {
        /// The server.
        peer: Peer,
        /// The status.
        status: i32,
    },
    /// An entry the protocol cannot carry: unaligned, empty, past the end of the address
    /// space, with bad flags, or with pages of the wrong length.
    BadEntry {
        /// The entry.
        entry: PagemapEntry,
        /// Bytes of pages given.
        bytes: usize,
    },
    /// An image id of more than 56 bits.
    BadId {
        /// The id.
        id: u64,
    },
    /// Entries were sent before any image was opened (a connection made for `GET`).
    NotOpen,
    /// An earlier call failed part way: the stream is out of step with the server, so
    /// nothing more is sent.
    Broken {
        /// The server.
        peer: Peer,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { addr, .. } => write!(f, "cannot connect to page server {addr}"),
            #[cfg(feature = "tls")]
            ClientError::Tls { .. } => f.write_str("cannot connect to the page server over TLS"),
            ClientError::Io { peer, op, .. } => write!(f, "page server {peer}: cannot {op}"),
            ClientError::Timeout { peer, op, after } => write!(
                f,
                "page server {peer}: cannot {op}: nothing moved for {after:?}"
            ),
            ClientError::Closed {
                peer,
                expected,
                got,
            } => write!(
                f,
                "page server {peer} closed the connection before {expected} ({got} bytes of it came)"
            ),
            ClientError::Reply { peer, error } => write!(f, "page server {peer}: {error}"),
            ClientError::Refused { peer, status } => write!(
                f,
                "page server {peer} answered PS_IOV_CLOSE with status {status}: the images were not written"
            ),
            ClientError::BadEntry { entry, bytes } => write!(
                f,
                "entry {entry} with {bytes} bytes of pages cannot be sent (unaligned, empty, bad flags or the wrong length)"
            ),
            ClientError::BadId { id } => write!(f, "image id {id} does not fit 56 bits"),
            ClientError::NotOpen => f.write_str("no image is open on this connection"),
            ClientError::Broken { peer } => write!(
                f,
                "page server {peer}: an earlier call failed part way, so the stream is out of step"
            ),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect { error, .. } | ClientError::Io { error, .. } => Some(error),
            #[cfg(feature = "tls")]
            ClientError::Tls { error } => Some(error),
            _ => None,
        }
    }
}

impl ClientError {
    /// The error as an `io::Error` of a fitting kind, for the dump's
    /// [`DumpErrorKind::Sink`] (the typed error is its inner error).
    pub(super) fn into_io(self) -> io::Error {
        let kind = match &self {
            ClientError::Connect { error, .. } | ClientError::Io { error, .. } => error.kind(),
            ClientError::Timeout { .. } => io::ErrorKind::TimedOut,
            ClientError::Closed { .. } => io::ErrorKind::UnexpectedEof,
            ClientError::BadEntry { .. } | ClientError::BadId { .. } => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}
