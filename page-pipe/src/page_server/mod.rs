//! CRIU's page-server protocol, both ends: a client that streams a dump to a page server
//! ([`PageServerClient`], a [`DumpSink`](crate::DumpSink)), and a server that writes what
//! it receives as CRIU images and serves pages back for lazy restore ([`PageServer`]).
//! Either end talks to CRIU 4.x (`criu dump --page-server`, `criu page-server`) or to the
//! other.
//!
//! # The protocol
//!
//! The client connects over TCP (or a Unix socket) and sends messages; each is a
//! 32-byte header ([`wire`]), `u32 cmd = flags << 16 | command`, `u32` padding, `u64
//! nr_pages`, `u64 vaddr`, `u64 dst_id = id << 8 | type`, in host byte order, with no
//! magic and no version. A dump goes:
//!
//! ```text
//! client                                      server
//! OPEN2   dst_id = pid << 8 | 1          ->   opens pagemap-<pid>.img, pages-<n>.img
//!                                        <-   1 byte: 1 if parent/pagemap-<pid>.img exists
//! ADD_F   flags PARENT, a hole           ->   a PARENT entry (checked against the parent)
//! ADD_F   flags PRESENT (| LAZY), pages  ->   an entry, its pages into pages-<n>.img
//! ADD_F   flags LAZY, no pages           ->   a LAZY entry
//! ...     (one message per run, in address order; another OPEN2 starts another image)
//! CLOSE   dst_id 0                       ->   writes the images
//!                                        <-   i32 0
//! close                                  ->   sees the end of the stream; the session ends
//! ```
//!
//! `PARENT` asks the same question as `OPEN2`'s reply and gets an `i32`. The old `OPEN`
//! (no reply), `ADD` (pages, as `ADD_F` with `PRESENT`) and `HOLE` (as `ADD_F` with
//! `PARENT`) are still accepted, as is a message naming an image that was not opened
//! (it opens it). `GET` (a lazy-pages daemon asking for pages of image `id`, bare in
//! `dst_id`) is answered with an `ADD_F` header with `PRESENT` and the pages.
//! `FORCE_CLOSE` is `CLOSE` from a client that may not close its socket: the server
//! answers and ends the session without waiting for the end of the stream.
//!
//! # What matches CRIU
//!
//! - The client sends, for the same entries, the bytes CRIU 4.2's client sends: one
//!   `ADD_F` per run (never joined), holes as `ADD_F` with `PARENT`, lazy runs as
//!   `LAZY | PRESENT` with their pages (or `LAZY` alone when kept for a lazy-pages
//!   server), then `CLOSE` with a zero `dst_id`. `tests/page_server` holds it to a
//!   recorded CRIU 4.2 session.
//! - The server writes what CRIU 4.2's page server writes: one pagemap entry per
//!   message, in stream order, never joined, the count in field 5 and 0 in field 2
//!   ([`CountFields::Criu4`](crate::image::CountFields::Criu4)); pages files numbered
//!   from 65537 upward, one per image opened; the same reply bytes. Replaying the
//!   recorded session gives byte-identical `pagemap-<pid>.img` and `pages-65537.img`.
//! - `GET` is answered as CRIU answers it: clamped to the run of pages the image chain
//!   holds from `vaddr` (and to [`Limits::max_payload_pages`](wire::Limits)); for a page
//!   the chain does not hold (in no entry, or lazy without `PRESENT`) CRIU's server
//!   sends nothing and ends the session, and so does this one
//!   ([`SessionErrorKind::GetMissing`]). CRIU's lazy-pages daemon only asks for pages of
//!   lazy entries, and maps a zero page itself for addresses in no entry.
//!
//! # Where the server is stricter than CRIU
//!
//! - Entries of one image must ascend without overlap; CRIU writes out-of-order or
//!   overlapping entries as given (and its readers then misread them). Here they end the
//!   session with [`RuleError::OutOfOrder`].
//! - Nothing is committed until `CLOSE`: the images of a session appear only when it
//!   closes cleanly, each atomically ([`ImageWriter::finish`](crate::image::ImageWriter::finish));
//!   a session that breaks (a cut stream, a timeout, a bad message) leaves none, where
//!   CRIU leaves what it wrote so far.
//! - A hole (`PARENT` entry) needs a parent image that has an entry for each of its
//!   pages; CRIU writes holes unchecked when its directory has no parent, making an image
//!   that cannot be restored.
//! - An image opened twice in one session, an unknown command, flags where none belong,
//!   unaligned or empty entries, an unknown image type, more pages than
//!   [`Limits::max_payload_pages`](wire::Limits), data after `CLOSE`, or an idle peer
//!   past the timeout end the session with a typed error naming the byte offset and the
//!   peer; CRIU reads some of these as garbage and waits forever on an idle peer.
//! - Two sessions at once never share a pages file: ids are taken from 65537 up, skipping
//!   ids a live session holds or a file in the directory has; a session replacing an
//!   image takes over the pages id of the image it replaces.
//!
//! # Security
//!
//! CRIU's page server has no authentication and no encryption (CRIU offers TLS as an
//! option): anyone who can connect can write images into the server's directory or,
//! with `GET`, read pages of the images there. The server binds 127.0.0.1 unless told
//! otherwise; put anything wider behind a tunnel or a network namespace you control, or,
//! with the `tls` cargo feature, require TLS with client certificates
//! ([`PageServer::with_tls`], [`PageServerClient::connect_tls`]; see
//! [`tls`](crate::tls): the same protocol inside, both ends
//! authenticated, no zero-copy paths through it; not tested against CRIU's own TLS). What a peer can do is bounded: file names are made from
//! numbers only, nothing is written outside the directory (and its numbered
//! subdirectories with [`Layout::Chain`]), every length is checked before anything is
//! read or allocated, and each session is bounded in images, in message size and in idle
//! time ([`ServerConfig`]).
//!
//! # Pages that leave by reference
//!
//! The client follows the crate's rule (DESIGN.md, "When page references may leave the
//! crate"): from a capture's pipes ([`Captured::dump`](crate::Captured::dump), or
//! [`Drain::Pipes`](crate::snapshot::Drain::Pipes)), pages of memory nobody can write any
//! more (an owned anonymous mapping, see [`Source::is_sealed`](crate::Source::is_sealed))
//! are spliced into the socket, and pages of borrowed memory are read out through a
//! bounce buffer and sent as copies, unless the client was made with the `unsafe`
//! [`PageServerClient::allow_zero_copy`]. A [`snapshot`](crate::snapshot::snapshot) with
//! the default drain sends copies straight from memory (`sendmsg`) unless zero copy was
//! allowed: measured on loopback, references into a socket were no faster than copies
//! (slower over TCP), since the receiver copies either way.

mod client;
mod config;
mod error;
pub(crate) mod rules;
mod server;
mod session;
pub(crate) mod stream;
pub mod wire;

pub use client::{ClientReport, DEFAULT_CLIENT_TIMEOUT, PageServerClient};
pub use config::{
    CommittedImage, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_IMAGES, DEFAULT_MAX_SESSIONS, Layout,
    ServerConfig, ServerStats, SessionOutcome, SessionReport,
};
pub use error::{ClientError, ClientOp};
pub use error::{ServerError, SessionError, SessionErrorKind, SessionOp};
pub use rules::RuleError;
pub use server::{Incoming, PageServer, RunningServer, StreamSummary, check_stream};
pub use stream::Peer;

/// The first pages id CRIU's page server gives (`0x10001`): it counts pages images from
/// 65537 up, where a local dump counts from 1.
pub const FIRST_PAGES_ID: u32 = 0x1_0001;
