//! Why a migration failed, on the sending end ([`MigrateError`]) and on the receiving
//! end ([`ReceiveError`]).

use std::fmt;
use std::io;
use std::time::Duration;

use crate::image::PagemapEntry;
use crate::page_server::wire::{Command, ImageId, WireError};
use crate::page_server::{ClientError, Peer, RuleError, SessionOp};
use crate::snapshot::SnapshotError;
use crate::track::TrackError;

use super::RoundReport;

/// Who cancelled a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelledBy {
    /// The sender: it ended the stream with `FORCE_CLOSE`.
    Sender,
    /// This end, through its [`CancelToken`](super::CancelToken).
    Receiver,
}

/// What went wrong on the receiving end; offsets are bytes of the stream.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReceiveErrorKind {
    /// The bytes break the protocol (a stream cut inside a message included).
    Wire(WireError),
    /// A message breaks the session rules (entries out of order in a round, too many
    /// rounds, a message after `CLOSE`).
    Rules {
        /// Byte offset of the message.
        offset: u64,
        /// The rule.
        error: RuleError,
    },
    /// A run with pages outside the destination: refused before any byte of it was
    /// read or written.
    Outside {
        /// Byte offset of the message.
        offset: u64,
        /// The run.
        entry: PagemapEntry,
        /// Its first page outside the destination.
        addr: u64,
    },
    /// Guest memory refused a run for another reason (the `vm-memory` feature).
    #[cfg(feature = "vm-memory")]
    Guest {
        /// Byte offset of the message.
        offset: u64,
        /// The run.
        entry: PagemapEntry,
        /// The error.
        error: Box<crate::vm::VmError>,
    },
    /// A lazy run without its pages: a receiver into memory cannot fetch them later.
    Lazy {
        /// Byte offset of the message.
        offset: u64,
        /// The run.
        entry: PagemapEntry,
    },
    /// A command a receiver does not serve (`GET`).
    Unsupported {
        /// Byte offset of the message.
        offset: u64,
        /// The command.
        command: Command,
    },
    /// A round whose image does not come after the previous round's: rounds are applied
    /// in the order of their ids.
    RoundOrder {
        /// Byte offset of the message.
        offset: u64,
        /// The round's image.
        image: ImageId,
        /// The previous round's.
        previous: ImageId,
    },
    /// The stream ended between messages before `CLOSE`: the sender died or gave up.
    NotClosed {
        /// Bytes received.
        offset: u64,
    },
    /// Data came after `CLOSE`.
    DataAfterClose {
        /// Its offset.
        offset: u64,
    },
    /// The migration was cancelled: by the sender (`FORCE_CLOSE`) or here.
    Cancelled {
        /// Bytes received.
        offset: u64,
        /// Who cancelled.
        by: CancelledBy,
    },
    /// The sender sent nothing within the idle timeout.
    Timeout {
        /// Bytes received.
        offset: u64,
        /// What the receiver was doing.
        op: SessionOp,
        /// The timeout.
        after: Duration,
    },
    /// A socket call failed (`ECONNRESET`, `EPIPE`; `EFAULT` for raw memory that is not
    /// mapped).
    Io {
        /// Bytes received.
        offset: u64,
        /// What the receiver was doing.
        op: SessionOp,
        /// The error.
        error: io::Error,
    },
}

impl fmt::Display for ReceiveErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReceiveErrorKind::Wire(e) => write!(f, "{e}"),
            ReceiveErrorKind::Rules { offset, error } => write!(f, "byte {offset}: {error}"),
            ReceiveErrorKind::Outside {
                offset,
                entry,
                addr,
            } => write!(
                f,
                "byte {offset}: run {entry} has page {addr:#x} outside the destination; refused before anything of it was written"
            ),
            #[cfg(feature = "vm-memory")]
            ReceiveErrorKind::Guest { offset, entry, .. } => {
                write!(f, "byte {offset}: guest memory refused run {entry}")
            }
            ReceiveErrorKind::Lazy { offset, entry } => write!(
                f,
                "byte {offset}: lazy run {entry} without its pages; memory cannot fetch them later"
            ),
            ReceiveErrorKind::Unsupported { offset, command } => {
                write!(
                    f,
                    "byte {offset}: {command} is not served by a receiver into memory"
                )
            }
            ReceiveErrorKind::RoundOrder {
                offset,
                image,
                previous,
            } => write!(
                f,
                "byte {offset}: round {image} does not come after round {previous}"
            ),
            ReceiveErrorKind::NotClosed { offset } => write!(
                f,
                "the stream ended after {offset} bytes without PS_IOV_CLOSE"
            ),
            ReceiveErrorKind::DataAfterClose { offset } => {
                write!(f, "byte {offset}: data after PS_IOV_CLOSE")
            }
            ReceiveErrorKind::Cancelled { offset, by } => match by {
                CancelledBy::Sender => write!(
                    f,
                    "the sender cancelled (PS_IOV_FORCE_CLOSE at byte {offset})"
                ),
                CancelledBy::Receiver => write!(f, "cancelled here after {offset} bytes"),
            },
            ReceiveErrorKind::Timeout { offset, op, after } => write!(
                f,
                "after {offset} bytes: cannot {op}: nothing moved for {after:?}"
            ),
            ReceiveErrorKind::Io { offset, op, .. } => {
                write!(f, "after {offset} bytes: cannot {op}")
            }
        }
    }
}

impl std::error::Error for ReceiveErrorKind {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReceiveErrorKind::Io { error, .. } => Some(error),
            #[cfg(feature = "vm-memory")]
            ReceiveErrorKind::Guest { error, .. } => Some(error.as_ref()),
            _ => None,
        }
    }
}

/// Why a receiver stopped: with whom, how many rounds it had applied whole, and what
/// went wrong (its [`source`](std::error::Error::source)). The memory then holds those
/// rounds and perhaps part of the next: not a consistent copy.
///
/// ```
/// use page_pipe::migrate::{ReceiveError, ReceiveErrorKind};
/// use page_pipe::page_server::Peer;
/// let e = ReceiveError { peer: Peer::Unix(None), rounds: 2, kind: ReceiveErrorKind::NotClosed { offset: 64 } };
/// assert_eq!(e.to_string(), "migration from a Unix socket peer stopped after 2 whole rounds; the memory is incomplete");
/// ```
#[derive(Debug)]
pub struct ReceiveError {
    /// The sender.
    pub peer: Peer,
    /// Rounds applied whole before it stopped.
    pub rounds: u32,
    /// What went wrong.
    pub kind: ReceiveErrorKind,
}

impl fmt::Display for ReceiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "migration from {} stopped after {} whole rounds; the memory is incomplete",
            self.peer, self.rounds
        )
    }
}

impl std::error::Error for ReceiveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.kind)
    }
}

/// Where a sender was when it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting (and, over TLS, the handshake).
    Connect,
    /// A pre-copy round (1: everything present), the source running.
    Round(u32),
    /// The last round, the source paused.
    Final(u32),
    /// Closing the stream after the last round.
    Close,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Connect => f.write_str("connecting"),
            Phase::Round(n) => write!(f, "round {n}"),
            Phase::Final(n) => write!(f, "the final round ({n})"),
            Phase::Close => f.write_str("closing"),
        }
    }
}

/// What went wrong on the sending end.
#[derive(Debug)]
#[non_exhaustive]
pub enum MigrateErrorKind {
    /// The [`CancelToken`](super::CancelToken) was cancelled; the stream ended with
    /// `FORCE_CLOSE` where it was at a safe point.
    Cancelled,
    /// The connection could not be made, or the receiver's answer failed (over TLS: a
    /// certificate refused shows here).
    Connect(Box<ClientError>),
    /// The tracker could not give the pages written.
    Track(Box<TrackError>),
    /// Sending a round failed (the receiver went away, a timeout, a page in no region of
    /// the source).
    Send(Box<SnapshotError>),
    /// Opening a round or closing the stream failed, or the receiver refused it.
    Stream(Box<ClientError>),
}

impl fmt::Display for MigrateErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrateErrorKind::Cancelled => "cancelled",
            MigrateErrorKind::Connect(_) => "cannot connect to the receiver",
            MigrateErrorKind::Track(_) => "cannot learn which pages were written",
            MigrateErrorKind::Send(_) => "cannot send the round",
            MigrateErrorKind::Stream(_) => "the receiver's stream failed",
        })
    }
}

impl std::error::Error for MigrateErrorKind {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MigrateErrorKind::Cancelled => None,
            MigrateErrorKind::Connect(e) | MigrateErrorKind::Stream(e) => Some(e.as_ref()),
            MigrateErrorKind::Track(e) => Some(e.as_ref()),
            MigrateErrorKind::Send(e) => Some(e.as_ref()),
        }
    }
}

/// Why a migration did not complete: where the sender was, the rounds it had sent, and
/// what went wrong (its [`source`](std::error::Error::source)). The source was resumed
/// if the sender had paused it; the receiver's memory is incomplete.
#[derive(Debug)]
pub struct MigrateError {
    /// Where it stopped.
    pub phase: Phase,
    /// The rounds sent whole before.
    pub rounds: Vec<RoundReport>,
    /// What went wrong.
    pub kind: MigrateErrorKind,
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "migration stopped in {} after {} rounds sent",
            self.phase,
            self.rounds.len()
        )
    }
}

impl std::error::Error for MigrateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.kind)
    }
}
