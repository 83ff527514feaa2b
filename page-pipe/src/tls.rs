//! TLS for page-server connections (the `tls` cargo feature): both ends authenticated by
//! certificates, the same protocol inside.
//!
//! CRIU's page server has no authentication and no encryption: anyone who can reach its
//! port can write images or, with `GET`, read pages. Memory in flight holds whatever the
//! program keeps in it (keys, passwords), so across hosts this module wraps a connection
//! in TLS with [rustls] (the `ring` provider):
//!
//! - the server ([`TlsServerConfig`]) presents its certificate and **requires** a client
//!   certificate that chains to the CA it is given: a client without one, or with one
//!   another CA signed, is refused in the handshake;
//! - the client ([`TlsClientConfig`]) verifies the server's certificate against the CA it
//!   is given and the name it expects, and presents its own.
//!
//! Certificates and keys come as PEM ([`TlsIdentity`], [`TlsClientConfig::new`]); nothing
//! here makes or stores keys. TLS 1.3 and 1.2 with rustls' safe defaults.
//!
//! # How it carries the protocol
//!
//! A [`TlsStream`] does the handshake on the calling thread, then runs one thread that
//! moves bytes between the TLS connection (a TCP socket) and one end of a Unix socket
//! pair, whose other end the page-server client, server or migration receiver uses as it
//! would use a plain socket: the same messages, the same replies, the same timeouts. The
//! thread ends, and is joined, when the stream is dropped; a close on either side
//! becomes a TLS `close_notify` and then the end of the stream on the other.
//!
//! Bytes are encrypted and decrypted in the thread's buffers, so the zero-copy paths
//! (pages spliced into a socket by reference, or from a socket into a file) do not apply
//! through TLS: every page is copied (and encrypted) on each side, at the cost of a copy
//! through the Unix socket besides.
#![cfg(feature = "tls")]

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use page_pipe_sys::{Interest, poll_ready};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConnection, Connection, RootCertStore, ServerConnection};

/// The longest the handshake may take by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Plaintext or TLS bytes buffered in the tunnel before it stops reading more.
const TUNNEL_BUF: usize = 256 << 10;
/// How long a dropped stream's thread may take to send its `close_notify`.
const LINGER: Duration = Duration::from_secs(1);

/// What a TLS call was doing when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsOp {
    /// Reading certificates or a key.
    Load,
    /// Building the configuration.
    Configure,
    /// Connecting the TCP socket.
    Connect,
    /// The handshake.
    Handshake,
    /// Moving bytes after the handshake.
    Transfer,
}

impl fmt::Display for TlsOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsOp::Load => "load the certificates",
            TlsOp::Configure => "configure TLS",
            TlsOp::Connect => "connect",
            TlsOp::Handshake => "complete the TLS handshake",
            TlsOp::Transfer => "move data over TLS",
        })
    }
}

/// Why TLS failed. [`Display`](fmt::Display) names the peer (or file) and the step;
/// [`source`](std::error::Error::source) gives the cause (the rustls error, the I/O
/// error, the PEM error).
///
/// ```
/// use page_pipe::tls::{TlsError, TlsIdentity};
/// let e = TlsIdentity::from_pem(b"not a certificate", b"nor a key").unwrap_err();
/// assert!(matches!(e, TlsError::Pem { .. }));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsError {
    /// PEM input that holds no certificate or key, or that cannot be read.
    Pem {
        /// What was read: a file, or what the bytes were for.
        what: String,
        /// The error.
        error: rustls::pki_types::pem::Error,
    },
    /// The certificates or the key were refused when building the configuration.
    Config {
        /// The error.
        error: rustls::Error,
    },
    /// The CA certificates cannot verify clients.
    Verifier {
        /// The error.
        error: rustls::server::VerifierBuilderError,
    },
    /// The expected server name is not a DNS name or an IP address.
    ServerName {
        /// The name given.
        name: String,
    },
    /// A socket call failed.
    Io {
        /// The peer (or address given).
        peer: String,
        /// The step.
        op: TlsOp,
        /// The error.
        error: io::Error,
    },
    /// TLS itself failed: a certificate refused by either side, a bad record, an alert
    /// from the peer.
    Tls {
        /// The peer.
        peer: String,
        /// The step.
        op: TlsOp,
        /// The error (for a refused certificate, `InvalidCertificate`, or the alert the
        /// peer sent, `AlertReceived(BadCertificate)` and the like).
        error: rustls::Error,
    },
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Pem { what, .. } => write!(f, "cannot read PEM from {what}"),
            TlsError::Config { .. } => f.write_str("cannot configure TLS with these certificates"),
            TlsError::Verifier { .. } => {
                f.write_str("cannot verify client certificates with this CA")
            }
            TlsError::ServerName { name } => {
                write!(f, "{name:?} is not a DNS name or an IP address")
            }
            TlsError::Io { peer, op, .. } | TlsError::Tls { peer, op, .. } => {
                write!(f, "TLS with {peer}: cannot {op}")
            }
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Pem { error, .. } => Some(error),
            TlsError::Config { error } | TlsError::Tls { error, .. } => Some(error),
            TlsError::Verifier { error } => Some(error),
            TlsError::Io { error, .. } => Some(error),
            TlsError::ServerName { .. } => None,
        }
    }
}

/// A certificate chain and its private key: who an end says it is.
///
/// ```no_run
/// use page_pipe::tls::TlsIdentity;
/// let me = TlsIdentity::from_pem_files("/etc/migrate/host.pem", "/etc/migrate/host.key")?;
/// # Ok::<(), page_pipe::tls::TlsError>(())
/// ```
pub struct TlsIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("TlsIdentity")
            .field("certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

fn certs_from(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |error| TlsError::Pem {
        what: what.to_string(),
        error,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(pem_err(rustls::pki_types::pem::Error::NoItemsFound));
    }
    Ok(certs)
}

impl TlsIdentity {
    /// A certificate chain (PEM, the end entity's certificate first) and its private key
    /// (PEM: PKCS#8, PKCS#1 or SEC1).
    ///
    /// # Errors
    /// [`TlsError::Pem`] when either holds nothing usable.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let chain = certs_from(chain_pem, "the certificate chain")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| TlsError::Pem {
            what: "the private key".into(),
            error,
        })?;
        Ok(Self { chain, key })
    }

    /// As [`from_pem`](Self::from_pem), from files.
    ///
    /// # Errors
    /// [`TlsError::Pem`] naming the file.
    pub fn from_pem_files(
        chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| TlsError::Pem {
                what: p.display().to_string(),
                error: rustls::pki_types::pem::Error::Io(e),
            })
        };
        let (c, k) = (read(chain.as_ref())?, read(key.as_ref())?);
        Self::from_pem(&c, &k).map_err(|e| match e {
            TlsError::Pem { what, error } => TlsError::Pem {
                what: format!(
                    "{} ({what})",
                    PathBuf::from(if what.contains("key") {
                        key.as_ref()
                    } else {
                        chain.as_ref()
                    })
                    .display()
                ),
                error,
            },
            other => other,
        })
    }
}

fn roots(ca_pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs_from(ca_pem, "the CA certificates")? {
        roots.add(c).map_err(|error| TlsError::Config { error })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client's side: the CA that signed the server's certificate, the name the server
/// must have, and the client's own certificate.
#[derive(Debug, Clone)]
pub struct TlsClientConfig {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl TlsClientConfig {
    /// Trusts servers whose certificate chains to a certificate of `ca_pem` and names
    /// `server_name` (a DNS name, or an IP address in the certificate's IP SANs), and
    /// presents `identity`.
    ///
    /// # Errors
    /// [`TlsError`]: PEM that holds no certificate, a name that is neither, a key that
    /// does not fit the certificate.
    pub fn new(ca_pem: &[u8], identity: TlsIdentity, server_name: &str) -> Result<Self, TlsError> {
        let server_name =
            ServerName::try_from(server_name.to_string()).map_err(|_| TlsError::ServerName {
                name: server_name.to_string(),
            })?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Config { error })?
            .with_root_certificates(roots(ca_pem)?)
            .with_client_auth_cert(identity.chain, identity.key)
            .map_err(|error| TlsError::Config { error })?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// The server's side: its own certificate, and the CA that must have signed every
/// client's certificate (clients without one are refused).
#[derive(Debug, Clone)]
pub struct TlsServerConfig {
    config: Arc<rustls::ServerConfig>,
}

impl TlsServerConfig {
    /// Presents `identity` and requires clients to present a certificate that chains to
    /// a certificate of `client_ca_pem`.
    ///
    /// # Errors
    /// [`TlsError`]: PEM that holds no certificate, a key that does not fit the
    /// certificate.
    pub fn new(client_ca_pem: &[u8], identity: TlsIdentity) -> Result<Self, TlsError> {
        let p = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(client_ca_pem)?), p.clone())
                .build()
                .map_err(|error| TlsError::Verifier { error })?;
        let config = rustls::ServerConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Config { error })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(identity.chain, identity.key)
            .map_err(|error| TlsError::Config { error })?;
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

/// A TLS connection, handshake done, whose plaintext is a local socket (see the
/// [module docs](self)). Give it to
/// [`PageServerClient::from_tls`](crate::page_server::PageServerClient::from_tls),
/// [`Incoming::from_tls`](crate::page_server::Incoming::from_tls) or a migration
/// [`Sender`](crate::migrate::Sender); dropping it closes the connection (with `close_notify`) and
/// joins its thread.
///
/// ```
/// use page_pipe::tls::*;
/// // A CA and one certificate for each end (made here; yours come from your PKI).
/// let ca_key = rcgen::KeyPair::generate()?;
/// let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
/// ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
/// let ca_pem = ca.self_signed(&ca_key)?.pem();
/// let issuer = rcgen::Issuer::new(ca, ca_key);
/// let leaf = |name: &str| -> Result<TlsIdentity, Box<dyn std::error::Error>> {
///     let key = rcgen::KeyPair::generate()?;
///     let cert = rcgen::CertificateParams::new(vec![name.to_string()])?.signed_by(&key, &issuer)?;
///     Ok(TlsIdentity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())?)
/// };
/// let server_cfg = TlsServerConfig::new(ca_pem.as_bytes(), leaf("localhost")?)?;
/// let client_cfg = TlsClientConfig::new(ca_pem.as_bytes(), leaf("a-client")?, "localhost")?;
///
/// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
/// let addr = listener.local_addr()?;
/// let server = std::thread::spawn(move || {
///     TlsStream::accept(listener.accept().unwrap().0, &server_cfg, None)
/// });
/// let client = TlsStream::connect(addr, &client_cfg, None)?;
/// let served = server.join().unwrap()?;
/// assert_eq!(served.peer(), client.local_addr());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct TlsStream {
    local: UnixStream,
    tcp: TcpStream,
    peer: SocketAddr,
    failure: Arc<Mutex<Option<rustls::Error>>>,
    closing: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

fn peer_name(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string())
}

/// The rustls error inside an I/O error from `complete_io`, if that is what it is.
fn tls_inside(e: &io::Error) -> Option<rustls::Error> {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .cloned()
}

impl TlsStream {
    /// Connects to `addr` over TCP and completes the handshake as a client, within
    /// `timeout` (default [`DEFAULT_HANDSHAKE_TIMEOUT`]).
    ///
    /// # Errors
    /// [`TlsError::Io`] when the connection fails; [`TlsError::Tls`] when the handshake
    /// does (the server's certificate refused, or ours).
    pub fn connect(
        addr: impl ToSocketAddrs + fmt::Debug,
        config: &TlsClientConfig,
        timeout: Option<Duration>,
    ) -> Result<Self, TlsError> {
        let tcp = TcpStream::connect(&addr).map_err(|error| TlsError::Io {
            peer: format!("{addr:?}"),
            op: TlsOp::Connect,
            error,
        })?;
        Self::client(tcp, config, timeout)
    }

    /// Completes the handshake as a client on a connected TCP stream.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub fn client(
        tcp: TcpStream,
        config: &TlsClientConfig,
        timeout: Option<Duration>,
    ) -> Result<Self, TlsError> {
        let conn = ClientConnection::new(Arc::clone(&config.config), config.server_name.clone())
            .map_err(|error| TlsError::Tls {
                peer: peer_name(&tcp),
                op: TlsOp::Handshake,
                error,
            })?;
        Self::start(tcp, Connection::Client(conn), timeout)
    }

    /// Completes the handshake as a server on an accepted TCP stream, within `timeout`
    /// (default [`DEFAULT_HANDSHAKE_TIMEOUT`]): a client without a certificate the CA
    /// signed is refused here.
    ///
    /// # Errors
    /// [`TlsError::Tls`] when the handshake fails; [`TlsError::Io`] when the socket does.
    pub fn accept(
        tcp: TcpStream,
        config: &TlsServerConfig,
        timeout: Option<Duration>,
    ) -> Result<Self, TlsError> {
        let conn =
            ServerConnection::new(Arc::clone(&config.config)).map_err(|error| TlsError::Tls {
                peer: peer_name(&tcp),
                op: TlsOp::Handshake,
                error,
            })?;
        Self::start(tcp, Connection::Server(conn), timeout)
    }

    fn start(
        mut tcp: TcpStream,
        mut conn: Connection,
        timeout: Option<Duration>,
    ) -> Result<Self, TlsError> {
        let peer = tcp.peer_addr().map_err(|error| TlsError::Io {
            peer: "a TCP peer".into(),
            op: TlsOp::Connect,
            error,
        })?;
        let io_err = |op, error| TlsError::Io {
            peer: peer.to_string(),
            op,
            error,
        };
        let t = timeout.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT);
        tcp.set_read_timeout(Some(t))
            .and_then(|()| tcp.set_write_timeout(Some(t)))
            .and_then(|()| tcp.set_nodelay(true))
            .map_err(|e| io_err(TlsOp::Handshake, e))?;
        let deadline = Instant::now() + t;
        while conn.is_handshaking() {
            if Instant::now() >= deadline {
                return Err(io_err(
                    TlsOp::Handshake,
                    io::Error::from(io::ErrorKind::TimedOut),
                ));
            }
            if let Err(e) = conn.complete_io(&mut tcp) {
                return Err(match tls_inside(&e) {
                    Some(error) => TlsError::Tls {
                        peer: peer.to_string(),
                        op: TlsOp::Handshake,
                        error,
                    },
                    None => io_err(TlsOp::Handshake, e),
                });
            }
        }
        // Flush what the handshake left (a client's Finished, a server's tickets).
        while conn.wants_write() {
            conn.write_tls(&mut tcp)
                .map_err(|e| io_err(TlsOp::Handshake, e))?;
        }
        let (local, remote) = UnixStream::pair().map_err(|e| io_err(TlsOp::Handshake, e))?;
        let tcp2 = tcp.try_clone().map_err(|e| io_err(TlsOp::Handshake, e))?;
        tcp.set_nonblocking(true)
            .and_then(|()| remote.set_nonblocking(true))
            .map_err(|e| io_err(TlsOp::Handshake, e))?;
        // The tunnel reads plaintext only once the TLS output is flushed: that bounds it.
        conn.set_buffer_limit(None);
        let failure = Arc::new(Mutex::new(None));
        let closing = Arc::new(AtomicBool::new(false));
        let (f2, c2) = (Arc::clone(&failure), Arc::clone(&closing));
        let thread = std::thread::Builder::new()
            .name("page-pipe-tls".into())
            .spawn(move || Pump::new(conn, tcp, remote, f2, c2).run())
            .map_err(|e| io_err(TlsOp::Handshake, e))?;
        Ok(Self {
            local,
            tcp: tcp2,
            peer,
            failure,
            closing,
            thread: Some(thread),
        })
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// This end's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// What broke the connection after the handshake, if TLS did: an alert from the
    /// peer (a client certificate refused after a TLS 1.3 handshake shows here), a bad
    /// record. `None` while it works, or when it ended cleanly or by a socket error.
    pub fn failure(&self) -> Option<rustls::Error> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The local socket the plaintext goes through.
    pub(crate) fn local(&self) -> &UnixStream {
        &self.local
    }
}

impl Drop for TlsStream {
    /// Closes the local socket (the thread sends `close_notify`, for at most a second),
    /// then the TCP connection, and joins the thread.
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Release);
        let _ = self.local.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.tcp.shutdown(Shutdown::Both);
    }
}

/// The tunnel thread's state: the TLS connection, its TCP socket, the local socket.
struct Pump {
    conn: Connection,
    tcp: TcpStream,
    local: UnixStream,
    failure: Arc<Mutex<Option<rustls::Error>>>,
    /// Set when the stream is dropped: nobody reads the local side any more.
    closing: Arc<AtomicBool>,
    /// Plaintext received, not yet written to the local socket.
    to_local: Vec<u8>,
    /// The local side closed its sending half (or went away): `close_notify` sent.
    local_eof: bool,
    /// The local side cannot take more (gone): plaintext from the peer is dropped.
    local_gone: bool,
    /// The peer closed (`close_notify` or TCP end): the local side was told.
    peer_eof: bool,
    /// When the local side went away, to bound the last flush.
    closing_since: Option<Instant>,
}

impl Pump {
    fn new(
        conn: Connection,
        tcp: TcpStream,
        local: UnixStream,
        failure: Arc<Mutex<Option<rustls::Error>>>,
        closing: Arc<AtomicBool>,
    ) -> Self {
        Self {
            conn,
            tcp,
            local,
            failure,
            closing,
            to_local: Vec::new(),
            local_eof: false,
            local_gone: false,
            peer_eof: false,
            closing_since: None,
        }
    }

    fn fail(&mut self, e: rustls::Error) {
        *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
    }

    fn run(mut self) {
        let _ = self.pump();
        // Whatever ended the loop, both sides learn of it.
        let _ = self.tcp.shutdown(Shutdown::Both);
        let _ = self.local.shutdown(Shutdown::Both);
    }

    /// Moves bytes until both directions are closed, the local side is gone and the last
    /// bytes are flushed (or the linger ran out), or a call fails.
    fn pump(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 64 << 10];
        self.deliver(&mut buf)?;
        loop {
            // TLS records out.
            while self.conn.wants_write() {
                match self.conn.write_tls(&mut self.tcp) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            // Plaintext to the local side.
            while !self.to_local.is_empty() && !self.local_gone {
                match self.local.write(&self.to_local) {
                    Ok(n) => {
                        self.to_local.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => self.local_gone = true,
                }
            }
            if self.local_gone {
                self.to_local.clear();
            }
            if self.peer_eof && self.to_local.is_empty() {
                let _ = self.local.shutdown(Shutdown::Write);
            }
            let flushed = !self.conn.wants_write();
            if self.local_eof && flushed && (self.peer_eof || self.local_gone) {
                let _ = self.tcp.shutdown(Shutdown::Write);
                return Ok(());
            }
            if let Some(t) = self.closing_since
                && t.elapsed() >= LINGER
            {
                return Ok(());
            }
            let mut want = vec![(
                self.tcp.as_fd(),
                Interest {
                    read: !self.peer_eof && self.to_local.len() < TUNNEL_BUF,
                    write: !flushed,
                },
            )];
            // A local side that is gone is left out: its hang-up would wake every poll.
            if !self.local_gone {
                want.push((
                    self.local.as_fd(),
                    Interest {
                        read: !self.local_eof && flushed,
                        write: !self.to_local.is_empty(),
                    },
                ));
            }
            let timeout = self
                .closing_since
                .map(|t| LINGER.saturating_sub(t.elapsed()));
            let ready = poll_ready(&want, timeout).map_err(io::Error::from)?;
            if self.closing.load(Ordering::Acquire) && !self.local_gone {
                // Dropped: what it sent before is still queued; take it all, then stop
                // serving the local side.
                while !self.local_eof && self.pull_local(&mut buf)? {}
                self.local_closed(true);
                continue;
            }
            let local_ready = ready.get(1).copied().unwrap_or_default();
            if ready[0].read && !self.peer_eof {
                self.pull_peer(&mut buf)?;
            }
            if local_ready.read && !self.local_eof {
                self.pull_local(&mut buf)?;
            }
        }
    }

    /// TLS records in; plaintext into `to_local`.
    fn pull_peer(&mut self, buf: &mut [u8]) -> io::Result<()> {
        match self.conn.read_tls(&mut self.tcp) {
            Ok(0) => self.peer_eof = true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
        self.deliver(buf)
    }

    /// Decrypts the records rustls holds and moves their plaintext into `to_local`. Also
    /// called before the first poll: the handshake's last read may have brought
    /// application data along, which no later readiness of the socket would announce.
    fn deliver(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if let Err(e) = self.conn.process_new_packets() {
            // Send the alert rustls queued, then stop.
            let _ = self.conn.write_tls(&mut self.tcp);
            self.fail(e.clone());
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        loop {
            match self.conn.reader().read(buf) {
                Ok(0) => {
                    self.peer_eof = true;
                    break;
                }
                Ok(n) => self.to_local.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The TCP stream ended without close_notify: a cut, which the reader
                // sees as the end of its stream (the protocol notices what is missing).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.peer_eof = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Plaintext in from the local side, into TLS records; whether bytes came.
    fn pull_local(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        match self.local.read(buf) {
            Ok(0) => self.local_closed(false),
            Ok(n) => {
                self.conn.writer().write_all(&buf[..n])?;
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.local_closed(true),
        }
        Ok(false)
    }

    /// The local side closed its sending half (`gone`: or went away altogether).
    fn local_closed(&mut self, gone: bool) {
        if !self.local_eof {
            self.local_eof = true;
            self.conn.send_close_notify();
        }
        // A reader that still reads gets what the peer sends until it closes; one that
        // went away (the stream dropped) cannot, so the last flush is bounded.
        if gone || self.closing.load(Ordering::Acquire) {
            self.local_gone = true;
            self.closing_since.get_or_insert_with(Instant::now);
        }
    }
}
