//! The connected socket both ends use (TCP or Unix), and how a peer is named.

use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// The other end of a connection, for errors and reports.
///
/// ```
/// use page_pipe::page_server::Peer;
/// let p = Peer::Tcp("127.0.0.1:4000".parse().unwrap());
/// assert_eq!(p.to_string(), "127.0.0.1:4000");
/// assert_eq!(Peer::Unix(None).to_string(), "a Unix socket peer");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A Unix socket peer, with its path when it has one (a client's end has none).
    Unix(Option<PathBuf>),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Unix(Some(p)) => write!(f, "unix:{}", p.display()),
            Peer::Unix(None) => f.write_str("a Unix socket peer"),
        }
    }
}

/// A connected socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// TLS: the plaintext side of a tunnel (a Unix socket), whose thread lives as long
    /// as this.
    #[cfg(feature = "tls")]
    Tls(crate::tls::TlsStream),
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
            #[cfg(feature = "tls")]
            Stream::Tls(t) => t.local().as_fd(),
        }
    }
}

impl Stream {
    /// The peer's name (for a Unix peer without a path: `fallback`, the path the server
    /// listens on or the client connected to).
    pub(crate) fn peer(&self, fallback: Option<&std::path::Path>) -> Peer {
        match self {
            Stream::Tcp(s) => match s.peer_addr() {
                Ok(a) => Peer::Tcp(a),
                Err(_) => Peer::Tcp(SocketAddr::from(([0, 0, 0, 0], 0))),
            },
            Stream::Unix(s) => Peer::Unix(
                s.peer_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(PathBuf::from))
                    .or_else(|| fallback.map(PathBuf::from)),
            ),
            #[cfg(feature = "tls")]
            Stream::Tls(t) => Peer::Tcp(t.peer()),
        }
    }

    /// `SO_RCVTIMEO` and `SO_SNDTIMEO` (`None`: wait for ever).
    pub(crate) fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        // A zero timeout means "none" to the kernel; the smallest real one stands in.
        let t = t.map(|d| d.max(Duration::from_micros(1)));
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                s.local().set_read_timeout(t)?;
                s.local().set_write_timeout(t)
            }
        }
    }

    /// Ends both directions, waking a thread blocked on the socket.
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.local().shutdown(Shutdown::Both),
        };
    }

    /// Ends the sending direction (the peer reads the end of the stream).
    pub(crate) fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.local().shutdown(Shutdown::Write),
        };
    }

    /// A second handle on the same socket (for TLS, on its plaintext side: enough to
    /// shut it down; the tunnel stays with the first).
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Stream::Unix(s.local().try_clone()?),
        })
    }
}

/// Whether an error is a socket timeout running out (`EAGAIN`).
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
