//! How a page server runs, and what its sessions did.

use std::path::PathBuf;
use std::time::Duration;

use crate::image::ImageSummary;

use super::error::SessionError;
use super::stream::Peer;
use super::wire::{ImageId, Limits};

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

/// How a [`PageServer`](crate::page_server::PageServer) runs.
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
    /// Sessions served at once by [`PageServer::spawn`](crate::page_server::PageServer::spawn) (default
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

/// A session's end, as a [`RunningServer`](crate::page_server::RunningServer) reports it.
#[derive(Debug)]
pub struct SessionOutcome {
    /// The client.
    pub peer: Peer,
    /// What it did, or why it failed.
    pub result: Result<SessionReport, SessionError>,
}

/// What a [`RunningServer`](crate::page_server::RunningServer) did, when stopped.
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
