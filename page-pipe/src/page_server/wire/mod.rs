//! The bytes of CRIU's page-server protocol: 32-byte message headers, their replies, and
//! a decoder for untrusted streams.
//!
//! # Rules
//!
//! - A header is `u32 cmd` (`flags << 16 | command`), `u32` padding, `u64 nr_pages`,
//!   `u64 vaddr`, `u64 dst_id`, in this machine's byte order (little-endian on the
//!   machines CRIU runs on). [`Header`] holds the raw fields; [`Message`] is a header
//!   that passed every check below.
//! - [`Message::decode`] reads only the 32 bytes it is given and allocates nothing. It
//!   refuses unknown commands, flags on commands that take none, `ADD_F` flags that are
//!   not `PRESENT`, `LAZY`, `LAZY | PRESENT` or `PARENT`, image types CRIU never sent,
//!   entries of no pages, unaligned addresses, ranges past the end of the address space,
//!   and payloads of more than [`Limits::max_payload_pages`] pages, each with a
//!   [`WireErrorKind`] naming what was found and what was expected. The padding word is
//!   not checked (CRIU's C structs do not promise it is zero); it is sent as zero.
//! - The payload length is computed from checked numbers before anything is read or
//!   allocated, so a header claiming 2^40 pages is an error at once.
//! - `dst_id` is `id << 8 | type` for every command but `GET`, whose `dst_id` is the bare
//!   image id (CRIU's lazy-pages daemon sends it so, and the reply echoes it). Types 1
//!   (`pagemap-<id>.img`) and 2 (`pagemap-shmem-<id>.img`) are current; the type numbers
//!   older CRIU releases sent for the same two images are accepted on input.
//! - [`Decoder`] walks a whole recorded stream: each message with its payload and byte
//!   offset, stopping at the first error, which names the offset.

use std::fmt;

use crate::image::{PageFlags, PagemapEntry, pagemap_name, shmem_pagemap_name};

/// Bytes of a message header.
pub const HEADER_LEN: usize = 32;

/// Bits of `cmd` that hold the command; the flags sit above them.
const CMD_BITS: u32 = 16;
/// Bits of `dst_id` that hold the image type; the id sits above them.
const TYPE_BITS: u32 = 8;

/// The largest payload [`Limits::default`] admits in one message: 2^18 pages (1 GiB of
/// 4 KiB pages). CRIU sends one message per run of a pipe, at most a pipe's capacity
/// (a few MiB); this crate's client sends at most a pipe too.
pub const DEFAULT_MAX_PAYLOAD_PAGES: u64 = 1 << 18;

/// A command of the protocol (the low 16 bits of `cmd`).
///
/// ```
/// use page_pipe::page_server::wire::Command;
/// assert_eq!(Command::from_code(0x1023), Some(Command::Close));
/// assert_eq!(Command::AddF.code(), 6);
/// assert_eq!(Command::from_code(8), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `PS_IOV_ADD` (1): an entry with its pages, the old form of `ADD_F` with `PRESENT`.
    Add,
    /// `PS_IOV_HOLE` (2): an entry in the parent, the old form of `ADD_F` with `PARENT`.
    Hole,
    /// `PS_IOV_OPEN` (3): opens an image, no reply (the old form of `OPEN2`).
    Open,
    /// `PS_IOV_OPEN2` (4): opens an image; the reply says whether it has a parent.
    Open2,
    /// `PS_IOV_PARENT` (5): asks whether the parent holds an image; an `i32` reply.
    Parent,
    /// `PS_IOV_ADD_F` (6): an entry with flags, followed by its pages if `PRESENT`.
    AddF,
    /// `PS_IOV_GET` (7): asks for pages (lazy restore).
    Get,
    /// `PS_IOV_CLOSE` (0x1023): the end of the dump; an `i32` reply.
    Close,
    /// `PS_IOV_FORCE_CLOSE` (0x1024): as `CLOSE`, from a client that may not close its
    /// socket.
    ForceClose,
}

impl Command {
    /// The command's number on the wire.
    pub const fn code(self) -> u16 {
        match self {
            Command::Add => 1,
            Command::Hole => 2,
            Command::Open => 3,
            Command::Open2 => 4,
            Command::Parent => 5,
            Command::AddF => 6,
            Command::Get => 7,
            Command::Close => 0x1023,
            Command::ForceClose => 0x1024,
        }
    }

    /// The command with number `code`, if there is one.
    pub const fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1 => Command::Add,
            2 => Command::Hole,
            3 => Command::Open,
            4 => Command::Open2,
            5 => Command::Parent,
            6 => Command::AddF,
            7 => Command::Get,
            0x1023 => Command::Close,
            0x1024 => Command::ForceClose,
            _ => return None,
        })
    }

    /// CRIU's name for it.
    pub const fn name(self) -> &'static str {
        match self {
            Command::Add => "PS_IOV_ADD",
            Command::Hole => "PS_IOV_HOLE",
            Command::Open => "PS_IOV_OPEN",
            Command::Open2 => "PS_IOV_OPEN2",
            Command::Parent => "PS_IOV_PARENT",
            Command::AddF => "PS_IOV_ADD_F",
            Command::Get => "PS_IOV_GET",
            Command::Close => "PS_IOV_CLOSE",
            Command::ForceClose => "PS_IOV_FORCE_CLOSE",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which pagemap image a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ImageKind {
    /// A process's memory: `pagemap-<id>.img` (type 1; CRIU's `id` is the pid).
    Pagemap,
    /// A shared memory object: `pagemap-shmem-<id>.img` (type 2).
    ShmemPagemap,
}

impl ImageKind {
    /// The type number CRIU 3.3 and later send.
    pub const fn wire_type(self) -> u8 {
        match self {
            ImageKind::Pagemap => 1,
            ImageKind::ShmemPagemap => 2,
        }
    }

    /// The kind a type number stands for: 1 and 2, and the numbers older CRIU releases
    /// sent for the same images (10, 11, 16, 17; 27, 28, 29, 32, 33, 34).
    pub const fn from_wire_type(t: u8) -> Option<Self> {
        match t {
            1 | 10 | 11 | 16 | 17 => Some(ImageKind::Pagemap),
            2 | 27 | 28 | 29 | 32 | 33 | 34 => Some(ImageKind::ShmemPagemap),
            _ => None,
        }
    }
}

/// A pagemap image named on the wire: its kind and id (`dst_id = id << 8 | type`).
///
/// ```
/// use page_pipe::page_server::wire::{ImageId, ImageKind};
/// let img = ImageId::pagemap(12856).unwrap();
/// assert_eq!(img.dst_id(), 0x323801);
/// assert_eq!(ImageId::from_dst_id(0x323801), Ok(img));
/// assert_eq!(img.file_name(), "pagemap-12856.img");
/// assert!(ImageId::pagemap(1 << 56).is_none(), "ids have 56 bits");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageId {
    kind: ImageKind,
    id: u64,
}

impl ImageId {
    /// The largest id `dst_id` can carry (56 bits).
    pub const MAX_ID: u64 = (1 << (64 - TYPE_BITS)) - 1;

    /// The image `kind` with `id`, if `id` fits 56 bits.
    pub const fn new(kind: ImageKind, id: u64) -> Option<Self> {
        if id > Self::MAX_ID {
            None
        } else {
            Some(Self { kind, id })
        }
    }

    /// `pagemap-<id>.img`, if `id` fits 56 bits.
    pub const fn pagemap(id: u64) -> Option<Self> {
        Self::new(ImageKind::Pagemap, id)
    }

    /// `pagemap-shmem-<id>.img`, if `id` fits 56 bits.
    pub const fn shmem(id: u64) -> Option<Self> {
        Self::new(ImageKind::ShmemPagemap, id)
    }

    /// The kind.
    pub const fn kind(&self) -> ImageKind {
        self.kind
    }

    /// The id.
    pub const fn id(&self) -> u64 {
        self.id
    }

    /// `id << 8 | type`.
    pub const fn dst_id(&self) -> u64 {
        self.id << TYPE_BITS | self.kind.wire_type() as u64
    }

    /// Decodes `dst_id`.
    ///
    /// # Errors
    /// [`WireErrorKind::UnknownImageType`] for a type CRIU never sent.
    pub const fn from_dst_id(dst_id: u64) -> Result<Self, WireErrorKind> {
        match ImageKind::from_wire_type(dst_id as u8) {
            Some(kind) => Ok(Self {
                kind,
                id: dst_id >> TYPE_BITS,
            }),
            None => Err(WireErrorKind::UnknownImageType { dst_id }),
        }
    }

    /// The pagemap image's file name: made from the number, never from peer text.
    pub fn file_name(&self) -> String {
        match self.kind {
            ImageKind::Pagemap => pagemap_name(self.id),
            ImageKind::ShmemPagemap => shmem_pagemap_name(self.id),
        }
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file_name())
    }
}

/// A header's raw fields, before any check.
///
/// ```
/// use page_pipe::page_server::wire::Header;
/// let h = Header { cmd: 0x4_0006, pad: 0, nr_pages: 1, vaddr: 0x1000, dst_id: 0x101 };
/// assert_eq!(Header::from_bytes(&h.to_bytes()), h);
/// assert_eq!((h.command_code(), h.flags()), (6, 4));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Header {
    /// `flags << 16 | command`.
    pub cmd: u32,
    /// The padding word (zero when we send).
    pub pad: u32,
    /// Pages.
    pub nr_pages: u64,
    /// The address of the first page.
    pub vaddr: u64,
    /// `id << 8 | type` (the bare id for `GET`).
    pub dst_id: u64,
}

impl Header {
    /// The 32 bytes on the wire.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.cmd.to_ne_bytes());
        b[4..8].copy_from_slice(&self.pad.to_ne_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_ne_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_ne_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_ne_bytes());
        b
    }

    /// The fields of 32 bytes from the wire.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Self {
            cmd: u32_at(0),
            pad: u32_at(4),
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        }
    }

    /// The command number (low 16 bits of `cmd`).
    pub fn command_code(&self) -> u16 {
        self.cmd as u16
    }

    /// The flags (high 16 bits of `cmd`).
    pub fn flags(&self) -> u16 {
        (self.cmd >> CMD_BITS) as u16
    }
}

/// What the decoder admits, and the page size pages are counted in.
///
/// ```
/// use page_pipe::page_server::wire::{Limits, DEFAULT_MAX_PAYLOAD_PAGES};
/// let l = Limits::default();
/// assert_eq!(l.page_size, page_pipe::page_size());
/// assert_eq!(l.max_payload_pages, DEFAULT_MAX_PAYLOAD_PAGES);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes per page (a power of two).
    pub page_size: usize,
    /// The most pages one message may carry (or one `GET` reply return).
    pub max_payload_pages: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            page_size: page_pipe_sys::page_size().get(),
            max_payload_pages: DEFAULT_MAX_PAYLOAD_PAGES,
        }
    }
}

/// A checked message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Message {
    /// `ADD`: `pages` pages from `vaddr`, which follow (a `PRESENT` entry).
    Add {
        /// The image.
        image: ImageId,
        /// The first page.
        vaddr: u64,
        /// Pages.
        pages: u64,
    },
    /// `HOLE`: `pages` pages from `vaddr` are in the parent (a `PARENT` entry).
    Hole {
        /// The image.
        image: ImageId,
        /// The first page.
        vaddr: u64,
        /// Pages.
        pages: u64,
    },
    /// `OPEN`: start writing `image`; no reply.
    Open {
        /// The image.
        image: ImageId,
    },
    /// `OPEN2`: start writing `image`; the reply says whether its parent has it.
    Open2 {
        /// The image.
        image: ImageId,
    },
    /// `PARENT`: does the parent hold `image`?
    Parent {
        /// The image.
        image: ImageId,
    },
    /// `ADD_F`: an entry; its pages follow if `flags` hold `PRESENT`.
    AddF {
        /// The image.
        image: ImageId,
        /// The first page.
        vaddr: u64,
        /// Pages.
        pages: u64,
        /// `PRESENT`, `LAZY`, `LAZY | PRESENT` or `PARENT`.
        flags: PageFlags,
    },
    /// `GET`: send back up to `pages` pages of image `id` from `vaddr`.
    Get {
        /// The bare image id (not `id << 8 | type`).
        id: u64,
        /// The first page.
        vaddr: u64,
        /// Pages asked for.
        pages: u64,
    },
    /// `CLOSE`: the dump is over.
    Close,
    /// `FORCE_CLOSE`: the dump is over, and the client may not close its socket.
    ForceClose,
}

/// Whether `flags` are a combination an entry may have.
fn entry_flags_ok(flags: PageFlags) -> bool {
    flags == PageFlags::PRESENT
        || flags == PageFlags::LAZY
        || flags == PageFlags::LAZY | PageFlags::PRESENT
        || flags == PageFlags::PARENT
}

impl Message {
    /// An `ADD_F` for `entry` of `image` (with its pages to follow if `PRESENT`).
    pub fn add_f(image: ImageId, entry: PagemapEntry) -> Self {
        Message::AddF {
            image,
            vaddr: entry.vaddr,
            pages: entry.pages,
            flags: entry.flags,
        }
    }

    /// The command.
    pub fn command(&self) -> Command {
        match self {
            Message::Add { .. } => Command::Add,
            Message::Hole { .. } => Command::Hole,
            Message::Open { .. } => Command::Open,
            Message::Open2 { .. } => Command::Open2,
            Message::Parent { .. } => Command::Parent,
            Message::AddF { .. } => Command::AddF,
            Message::Get { .. } => Command::Get,
            Message::Close => Command::Close,
            Message::ForceClose => Command::ForceClose,
        }
    }

    /// The image it names (`None` for `GET`, `CLOSE` and `FORCE_CLOSE`).
    pub fn image(&self) -> Option<ImageId> {
        match *self {
            Message::Add { image, .. }
            | Message::Hole { image, .. }
            | Message::Open { image }
            | Message::Open2 { image }
            | Message::Parent { image }
            | Message::AddF { image, .. } => Some(image),
            Message::Get { .. } | Message::Close | Message::ForceClose => None,
        }
    }

    /// The pagemap entry it adds (`ADD` as `PRESENT`, `HOLE` as `PARENT`, `ADD_F` with
    /// its flags), if it adds one.
    pub fn entry(&self) -> Option<PagemapEntry> {
        match *self {
            Message::Add { vaddr, pages, .. } => Some(PagemapEntry {
                vaddr,
                pages,
                flags: PageFlags::PRESENT,
            }),
            Message::Hole { vaddr, pages, .. } => Some(PagemapEntry {
                vaddr,
                pages,
                flags: PageFlags::PARENT,
            }),
            Message::AddF {
                vaddr,
                pages,
                flags,
                ..
            } => Some(PagemapEntry {
                vaddr,
                pages,
                flags,
            }),
            _ => None,
        }
    }

    /// Pages that follow the header on the wire.
    pub fn payload_pages(&self) -> u64 {
        match self.entry() {
            Some(e) if e.is_present() => e.pages,
            _ => 0,
        }
    }

    /// The header's fields.
    pub fn header(&self) -> Header {
        let (code, flags) = (
            self.command().code() as u32,
            match self {
                Message::AddF { flags, .. } => flags.bits(),
                _ => 0,
            },
        );
        let (nr_pages, vaddr, dst_id) = match *self {
            Message::Add {
                image,
                vaddr,
                pages,
            }
            | Message::Hole {
                image,
                vaddr,
                pages,
            }
            | Message::AddF {
                image,
                vaddr,
                pages,
                ..
            } => (pages, vaddr, image.dst_id()),
            Message::Open { image } | Message::Open2 { image } | Message::Parent { image } => {
                (0, 0, image.dst_id())
            }
            Message::Get { id, vaddr, pages } => (pages, vaddr, id),
            Message::Close | Message::ForceClose => (0, 0, 0),
        };
        Header {
            cmd: flags << CMD_BITS | code,
            pad: 0,
            nr_pages,
            vaddr,
            dst_id,
        }
    }

    /// The 32 bytes on the wire (fields CRIU leaves at zero are zero).
    ///
    /// ```
    /// use page_pipe::page_server::wire::{ImageId, Message};
    /// let open = Message::Open2 { image: ImageId::pagemap(12856).unwrap() };
    /// let mut want = [0u8; 32];
    /// want[0] = 4;
    /// want[24..27].copy_from_slice(&[0x01, 0x38, 0x32]);
    /// assert_eq!(open.encode(), want);
    /// ```
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        self.header().to_bytes()
    }

    /// Decodes and checks a header (see the [module rules](self)).
    ///
    /// ```
    /// use page_pipe::page_server::wire::{Limits, Message, WireErrorKind};
    /// let mut b = [0u8; 32];
    /// b[0..4].copy_from_slice(&0x4_0006u32.to_ne_bytes()); // ADD_F, PRESENT
    /// b[8..16].copy_from_slice(&(1u64 << 40).to_ne_bytes()); // 2^40 pages
    /// b[24] = 1;
    /// let err = Message::decode(&b, &Limits::default()).unwrap_err();
    /// assert!(matches!(err, WireErrorKind::TooManyPages { pages, .. } if pages == 1 << 40));
    /// ```
    ///
    /// # Errors
    /// [`WireErrorKind`]: what is wrong with the header.
    pub fn decode(bytes: &[u8; HEADER_LEN], limits: &Limits) -> Result<Self, WireErrorKind> {
        let h = Header::from_bytes(bytes);
        let Some(command) = Command::from_code(h.command_code()) else {
            return Err(WireErrorKind::UnknownCommand { cmd: h.cmd });
        };
        let flags = h.flags();
        if command != Command::AddF && flags != 0 {
            return Err(WireErrorKind::FlagsNotAllowed { command, flags });
        }
        let image = || ImageId::from_dst_id(h.dst_id);
        let m = match command {
            Command::Open => Message::Open { image: image()? },
            Command::Open2 => Message::Open2 { image: image()? },
            Command::Parent => Message::Parent { image: image()? },
            Command::Close => Message::Close,
            Command::ForceClose => Message::ForceClose,
            Command::Get => Message::Get {
                id: h.dst_id,
                vaddr: h.vaddr,
                pages: h.nr_pages,
            },
            Command::Add => Message::Add {
                image: image()?,
                vaddr: h.vaddr,
                pages: h.nr_pages,
            },
            Command::Hole => Message::Hole {
                image: image()?,
                vaddr: h.vaddr,
                pages: h.nr_pages,
            },
            Command::AddF => {
                let flags = PageFlags::from_bits(u32::from(flags))
                    .filter(|f| entry_flags_ok(*f))
                    .ok_or(WireErrorKind::BadFlags { flags })?;
                Message::AddF {
                    image: image()?,
                    vaddr: h.vaddr,
                    pages: h.nr_pages,
                    flags,
                }
            }
        };
        if let Message::Add { vaddr, pages, .. }
        | Message::Hole { vaddr, pages, .. }
        | Message::AddF { vaddr, pages, .. }
        | Message::Get { vaddr, pages, .. } = m
        {
            check_range(command, vaddr, pages, limits)?;
        }
        let payload = m.payload_pages();
        if payload > limits.max_payload_pages {
            return Err(WireErrorKind::TooManyPages {
                command,
                pages: payload,
                max: limits.max_payload_pages,
            });
        }
        Ok(m)
    }

    /// Bytes that follow the header: [`payload_pages`](Self::payload_pages) pages. A
    /// decoded message's payload is at most [`Limits::max_payload_pages`] pages, whose
    /// bytes fit a `u64`.
    pub fn payload_len(&self, page_size: usize) -> u64 {
        self.payload_pages().saturating_mul(page_size as u64)
    }
}

/// Checks that `pages` pages from `vaddr` are a non-empty, aligned range in the address
/// space.
fn check_range(
    command: Command,
    vaddr: u64,
    pages: u64,
    limits: &Limits,
) -> Result<(), WireErrorKind> {
    let ps = limits.page_size as u64;
    if pages == 0 {
        return Err(WireErrorKind::NoPages { command });
    }
    if !vaddr.is_multiple_of(ps) {
        return Err(WireErrorKind::Unaligned { command, vaddr });
    }
    if pages
        .checked_mul(ps)
        .and_then(|l| vaddr.checked_add(l))
        .is_none()
    {
        return Err(WireErrorKind::Overflow {
            command,
            vaddr,
            pages,
        });
    }
    Ok(())
}

/// The reply to `OPEN2`: one byte, 1 when the server's parent holds the image.
///
/// ```
/// use page_pipe::page_server::wire::{open2_reply, parse_open2_reply};
/// assert_eq!(open2_reply(true), [1]);
/// assert_eq!(parse_open2_reply(0), Ok(false));
/// assert!(parse_open2_reply(7).is_err());
/// ```
pub fn open2_reply(has_parent: bool) -> [u8; 1] {
    [u8::from(has_parent)]
}

/// Reads an `OPEN2` reply byte: 0 or 1 (CRIU's server sends nothing else).
///
/// # Errors
/// [`WireErrorKind::BadReply`] for any other value.
pub fn parse_open2_reply(b: u8) -> Result<bool, WireErrorKind> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(WireErrorKind::BadReply {
            expected: Expected::Open2Reply,
            value: i64::from(v),
        }),
    }
}

/// The reply to `PARENT` (an `i32`: 1 when the parent holds the image, else 0), or to
/// `CLOSE` and `FORCE_CLOSE` (an `i32` status: 0 when the images are written).
///
/// ```
/// use page_pipe::page_server::wire::i32_reply;
/// assert_eq!(i32_reply(1), [1, 0, 0, 0]);
/// ```
pub fn i32_reply(v: i32) -> [u8; 4] {
    v.to_ne_bytes()
}

/// The header of the reply to `GET`: an `ADD_F` with `PRESENT` for the `pages` pages
/// from `vaddr` that follow, `dst_id` the bare image id, as CRIU sends it.
///
/// ```
/// use page_pipe::page_server::wire::{get_reply, parse_get_reply, Limits};
/// let b = get_reply(12856, 0x7f00_0000_0000, 3);
/// assert_eq!(parse_get_reply(&b, 12856, 0x7f00_0000_0000, 4, &Limits::default()), Ok(3));
/// ```
pub fn get_reply(id: u64, vaddr: u64, pages: u64) -> [u8; HEADER_LEN] {
    Header {
        cmd: PageFlags::PRESENT.bits() << CMD_BITS | u32::from(Command::AddF.code()),
        pad: 0,
        nr_pages: pages,
        vaddr,
        dst_id: id,
    }
    .to_bytes()
}

/// Reads the header of a `GET` reply to a request for `asked` pages of image `id` from
/// `vaddr`: returns the pages that follow (at least 1, at most `asked`).
///
/// # Errors
/// [`WireErrorKind::BadReply`] when it is not an `ADD_F` with `PRESENT` for the same
/// image and address with 1 to `asked` pages (at most [`Limits::max_payload_pages`]).
pub fn parse_get_reply(
    bytes: &[u8; HEADER_LEN],
    id: u64,
    vaddr: u64,
    asked: u64,
    limits: &Limits,
) -> Result<u64, WireErrorKind> {
    let h = Header::from_bytes(bytes);
    let ok = h.command_code() == Command::AddF.code()
        && u32::from(h.flags()) == PageFlags::PRESENT.bits()
        && h.dst_id == id
        && h.vaddr == vaddr
        && (1..=asked.min(limits.max_payload_pages)).contains(&h.nr_pages);
    if ok {
        Ok(h.nr_pages)
    } else {
        Err(WireErrorKind::BadReply {
            expected: Expected::GetReply,
            value: i64::from(h.cmd),
        })
    }
}

mod error;
pub use error::{Expected, WireError, WireErrorKind};

impl Message {
    /// The encoded header as a `Vec` (to append pages to).
    pub fn to_vec(&self) -> Vec<u8> {
        self.encode().to_vec()
    }
}

mod decoder;
pub use decoder::{Decoder, Frame};

#[cfg(test)]
mod tests;
