//! What is wrong with bytes of the protocol, and where.

use std::fmt;

use super::Command;
use crate::image::PagemapEntry;

/// What a reader was waiting for when the bytes ran out or were wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// A message header.
    Header,
    /// The pages of an entry.
    Pages {
        /// The entry.
        entry: PagemapEntry,
    },
    /// The one-byte reply to `OPEN2`.
    Open2Reply,
    /// The `i32` reply to `PARENT`.
    ParentReply,
    /// The `i32` reply to `CLOSE` or `FORCE_CLOSE`.
    CloseReply,
    /// The header of a reply to `GET`.
    GetReply,
    /// The end of the stream after `CLOSE`.
    EndOfStream,
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expected::Header => f.write_str("a message header"),
            Expected::Pages { entry } => write!(f, "the pages of entry {entry}"),
            Expected::Open2Reply => f.write_str("the reply to PS_IOV_OPEN2"),
            Expected::ParentReply => f.write_str("the reply to PS_IOV_PARENT"),
            Expected::CloseReply => f.write_str("the reply to PS_IOV_CLOSE"),
            Expected::GetReply => f.write_str("the reply to PS_IOV_GET"),
            Expected::EndOfStream => f.write_str("the end of the stream after PS_IOV_CLOSE"),
        }
    }
}

/// What is wrong with bytes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireErrorKind {
    /// The command number is none of the protocol's.
    UnknownCommand {
        /// The whole `cmd` word.
        cmd: u32,
    },
    /// A command other than `ADD_F` carries flags.
    FlagsNotAllowed {
        /// The command.
        command: Command,
        /// The flags.
        flags: u16,
    },
    /// `ADD_F` flags that are not `PRESENT`, `LAZY`, `LAZY | PRESENT` or `PARENT`.
    BadFlags {
        /// The flags.
        flags: u16,
    },
    /// The image type in `dst_id` is none CRIU ever sent.
    UnknownImageType {
        /// The whole `dst_id`.
        dst_id: u64,
    },
    /// An entry or request of no pages.
    NoPages {
        /// The command.
        command: Command,
    },
    /// The address is not page-aligned.
    Unaligned {
        /// The command.
        command: Command,
        /// The address.
        vaddr: u64,
    },
    /// The range passes the end of the address space.
    Overflow {
        /// The command.
        command: Command,
        /// The address.
        vaddr: u64,
        /// Pages.
        pages: u64,
    },
    /// More pages follow than [`Limits::max_payload_pages`](super::Limits::max_payload_pages) admits.
    TooManyPages {
        /// The command.
        command: Command,
        /// Pages claimed.
        pages: u64,
        /// The most admitted.
        max: u64,
    },
    /// The stream ended early.
    Truncated {
        /// What was being read.
        expected: Expected,
        /// Bytes it needed.
        needed: u64,
        /// Bytes there were.
        got: u64,
    },
    /// A reply that is not what the protocol allows.
    BadReply {
        /// Which reply.
        expected: Expected,
        /// The value found (the byte, the `i32`, or the `cmd` word of a `GET` reply).
        value: i64,
    },
}

impl fmt::Display for WireErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireErrorKind::UnknownCommand { cmd } => write!(
                f,
                "unknown command {:#x} (cmd {cmd:#x}); expected one of 1 to 7, 0x1023 or 0x1024",
                cmd & 0xffff
            ),
            WireErrorKind::FlagsNotAllowed { command, flags } => write!(
                f,
                "{command} with flags {flags:#x}; only PS_IOV_ADD_F takes flags"
            ),
            WireErrorKind::BadFlags { flags } => write!(
                f,
                "PS_IOV_ADD_F with flags {flags:#x}; expected PRESENT (4), LAZY (2), LAZY|PRESENT (6) or PARENT (1)"
            ),
            WireErrorKind::UnknownImageType { dst_id } => write!(
                f,
                "dst_id {dst_id:#x} names image type {}; expected 1 (pagemap) or 2 (shmem pagemap)",
                *dst_id as u8
            ),
            WireErrorKind::NoPages { command } => write!(f, "{command} of 0 pages"),
            WireErrorKind::Unaligned { command, vaddr } => {
                write!(f, "{command} at {vaddr:#x}, which is not page-aligned")
            }
            WireErrorKind::Overflow {
                command,
                vaddr,
                pages,
            } => write!(
                f,
                "{command} of {pages} pages at {vaddr:#x} passes the end of the address space"
            ),
            WireErrorKind::TooManyPages {
                command,
                pages,
                max,
            } => write!(
                f,
                "{command} claims {pages} pages of data; at most {max} are admitted"
            ),
            WireErrorKind::Truncated {
                expected,
                needed,
                got,
            } => write!(f, "the stream ended in {expected}: {got} of {needed} bytes"),
            WireErrorKind::BadReply { expected, value } => {
                write!(
                    f,
                    "{expected} is {value:#x}, which the protocol does not allow"
                )
            }
        }
    }
}

/// A [`WireErrorKind`] at a byte offset of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireError {
    /// Byte offset of the message (or reply) at fault.
    pub offset: u64,
    /// What is wrong.
    pub kind: WireErrorKind,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "byte {}: {}", self.offset, self.kind)
    }
}

impl std::error::Error for WireError {}
