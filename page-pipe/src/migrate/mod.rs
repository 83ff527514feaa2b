//! Live migration: memory copied to another process or host while the program keeps
//! running, then a final pause of milliseconds.
//!
//! Pre-copy, as QEMU and cloud-hypervisor migrate their VMs, over CRIU's page-server
//! protocol ([`page_server`](crate::page_server)):
//!
//! ```text
//! sender (Sender::run)                                  receiver (receive)
//! round 1: tracker.full_plan(): every page present  -->  OPEN2 pagemap-1.img, ADD_F ...
//!          (the source runs; its writers never wait:         pages read from the socket
//!           an asynchronous Tracker records writes)          straight into the memory
//! take(): pages written during round 1
//! round 2: those pages                              -->  OPEN2 pagemap-2.img, ADD_F ...
//! ...      until a stop condition holds
//! pause(): the caller stops the source (vCPUs, threads)
//! final round: take() again: everything written     -->  OPEN2 pagemap-<n>.img, ADD_F ...
//!              since the last round
//! CLOSE                                             -->  every round applied; reply 0
//!                                                   <--  i32 0
//! the source stays paused: the receiver's memory equals it
//! ```
//!
//! # The loop, and what each option does
//!
//! - **Round 1** sends every page the tracker's [`full_plan`](crate::track::Tracker::full_plan)
//!   holds (pages never touched are left out: the destination reads as zeros there).
//! - **Each later round** sends the pages [`take`](crate::track::Tracker::take) reports
//!   written during the round before, while the source keeps running. A page written
//!   after it was sent is simply sent again next round.
//! - After each round the sender decides, from the pages the round left written and the
//!   bandwidth it measured (bytes over time), whether to stop: when fewer than
//!   [`min_round_pages`](MigrateOptions::min_round_pages) are left
//!   ([`StopReason::FewPages`]); when sending them is estimated to take less than
//!   [`downtime`](MigrateOptions::downtime) ([`StopReason::Downtime`]); or after
//!   [`max_rounds`](MigrateOptions::max_rounds) rounds ([`StopReason::MaxRounds`]: a
//!   source that writes faster than the link carries never converges).
//! - **The final round**: the sender calls the caller's `pause` (stopping vCPUs or
//!   threads), takes the pages written since the last round and sends them unpaced, then
//!   `CLOSE`; the receiver answers once every round is applied. The report's
//!   [`final_pause`](MigrateReport::final_pause) runs from `pause` to that answer. On
//!   success the source is left paused; on failure after `pause`, `resume` is called.
//! - [`bandwidth`](MigrateOptions::bandwidth) caps the bytes per second of the pre-copy
//!   rounds (paced entry by entry); [`cancel`](MigrateOptions::cancel) takes a
//!   [`CancelToken`] another thread may cancel.
//! - Each [`RoundReport`] says pages, bytes, time and the pages written meanwhile.
//!
//! # One connection, one image per round
//!
//! A migration is one connection; round `n` is the image `pagemap-<n>.img` (`OPEN2`),
//! and the next `OPEN2` (or `CLOSE`) ends it. One connection keeps one TLS handshake and
//! a warm TCP window for all rounds, and its order is the order the rounds are applied
//! in: a receiver refuses a round whose image id does not ascend
//! ([`ReceiveErrorKind::RoundOrder`]). `PARENT` holes are not sent (the receiver keeps
//! what earlier rounds wrote); the stream is an ordinary page-server stream, which
//! `criu page-server` or our [`PageServer`](crate::page_server::PageServer) would write
//! as one image per round. A round is applied whole only when the next begins: on a
//! failure the receiver counts the round it was in as incomplete.
//!
//! # The receiving end
//!
//! [`receive`] takes a page-server stream, from a [`Sender`] or from CRIU's client
//! (`criu dump --page-server`, one image), and writes its pages into a [`Destination`]:
//! a [`MemoryRegion`] (raw memory under an `unsafe` contract, or a mapping it owns), or
//! with the `vm-memory` feature rust-vmm guest memory through a
//! [`GuestWriter`](crate::vm::GuestWriter). Every run is checked against the destination
//! before any byte of it is read ([`ReceiveErrorKind::Outside`] names the first page
//! outside), and its pages are read from the socket straight into the memory, with no
//! buffer between (`recv(2)` into the region; guest memory through its
//! `VolatileSlice`s). `PARENT` entries are checked and kept (their pages are here
//! already); lazy entries without pages and `GET` are refused.
//! `CLOSE` completes the migration; `FORCE_CLOSE` means the sender cancelled
//! ([`ReceiveErrorKind::Cancelled`]), as does a cancel of the receiver's own token; a
//! stream that ends before `CLOSE` is [`ReceiveErrorKind::NotClosed`]. A receiver that
//! failed returns no report: the memory is not claimed complete.
//!
//! # Cancelling
//!
//! A [`CancelToken`] stops either end from another thread, leaving both clean: the
//! sender stops at a safe point (before connecting, between two entries, while it waits
//! for its bandwidth cap; never inside a message) and sends `FORCE_CLOSE`, resuming the
//! source if it was paused; the receiver is woken from its socket at once. Each reports a
//! typed error; nothing is left running (threads joined, sockets closed).
//!
//! # Security: TLS, and CRIU's page server has none
//!
//! **CRIU's page-server protocol has no authentication and no encryption**: whoever can
//! reach the port can write memory into the receiver, and whatever the memory holds
//! crosses the network in the clear. A receiver writes only into its destination and
//! checks every run, but it cannot tell a sender from an attacker. So:
//!
//! - without TLS, bind the receiver to loopback (the examples do unless told another
//!   address explicitly), or carry the connection through a tunnel or a network
//!   namespace you control;
//! - with the `tls` cargo feature, [`tls`](crate::tls) wraps the same protocol in TLS with both ends
//!   authenticated by certificates: the receiver (or page server) requires a client
//!   certificate signed by the CA it trusts, and the sender verifies the receiver's
//!   certificate against the CA it is given ([`Sender::connect_tls`],
//!   [`PageServer::with_tls`](crate::page_server::PageServer::with_tls)). Zero-copy paths
//!   do not apply through TLS: pages are encrypted, so copied, on each side.
//!
//! CRIU's own `--tls` option was not tested against this.

mod cancel;
mod error;
mod receive;
mod region;
mod send;

pub use cancel::CancelToken;
pub use error::{
    CancelledBy, MigrateError, MigrateErrorKind, Phase, ReceiveError, ReceiveErrorKind,
};
pub use receive::{Destination, ReceiveOptions, ReceiveReport, RoundReceived, receive};
pub use region::MemoryRegion;
pub use send::{
    DEFAULT_DOWNTIME, DEFAULT_MAX_ROUNDS, DEFAULT_MIN_ROUND_PAGES, MigrateOptions, MigrateReport,
    RoundReport, Sender, StopReason,
};
