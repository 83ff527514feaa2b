//! The bytes of CRIU's pagemap image: magics, then size-prefixed protobuf messages.

use std::fmt;

use crate::addr::{PageRange, RangeError};
use bitflags::bitflags;
use prost::Message;

/// The magic every CRIU image starts with (`IMG_COMMON_MAGIC`, "Sarov").
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// The magic of a pagemap image (`PAGEMAP_MAGIC`, "Vladimir").
pub const PAGEMAP_MAGIC: u32 = 0x5608_4025;

bitflags! {
    /// Flags of a pagemap entry (CRIU's `PE_*`).
    ///
    /// ```
    /// use page_pipe::image::PageFlags;
    /// assert_eq!((PageFlags::LAZY | PageFlags::PRESENT).bits(), 6);
    /// ```
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PageFlags: u32 {
        /// The pages are in the parent snapshot (`PE_PARENT`).
        const PARENT = 1;
        /// The pages may be restored lazily (`PE_LAZY`).
        const LAZY = 2;
        /// The pages are in this image's pages file (`PE_PRESENT`).
        const PRESENT = 4;
    }
}

/// One entry of a pagemap image: `pages` pages from `vaddr`, with `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PagemapEntry {
    /// The address of the first page.
    pub vaddr: u64,
    /// The number of pages.
    pub pages: u64,
    /// Where the pages are.
    pub flags: PageFlags,
}

impl PagemapEntry {
    /// The address just past the last page, if it does not overflow.
    pub fn end(&self, page_size: usize) -> Option<u64> {
        self.range(page_size).ok().map(|r| r.end())
    }

    /// The pages it covers, checked (aligned, within the address space).
    ///
    /// # Errors
    /// [`RangeError`] for an unaligned address or a range past the end.
    pub fn range(&self, page_size: usize) -> Result<PageRange, RangeError> {
        PageRange::new(self.vaddr, self.pages, page_size)
    }

    /// Whether its pages are in this image's pages file.
    pub fn is_present(&self) -> bool {
        self.flags.contains(PageFlags::PRESENT)
    }
}

impl fmt::Display for PagemapEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}:{}", self.vaddr, self.pages)?;
        let names = [
            (PageFlags::PARENT, "P"),
            (PageFlags::LAZY, "L"),
            (PageFlags::PRESENT, "+"),
        ];
        for (flag, name) in names {
            if self.flags.contains(flag) {
                write!(f, ":{name}")?;
            }
        }
        Ok(())
    }
}

// The proto2 `required` fields are declared optional here, so that a message missing one
// is seen (prost does not check presence); on the wire a set optional field and a
// required one are the same bytes.

/// `pagemap_head` of `images/pagemap.proto`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct PagemapHead {
    /// Required.
    #[prost(uint32, optional, tag = "1")]
    pub(crate) pages_id: Option<u32>,
}

/// `pagemap_entry` of `images/pagemap.proto`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct PagemapEntryMsg {
    /// Required.
    #[prost(uint64, optional, tag = "1")]
    pub(crate) vaddr: Option<u64>,
    /// Required. The page count as old CRIU wrote it; CRIU 4.x writes 0 here and uses
    /// `nr_pages`.
    #[prost(uint32, optional, tag = "2")]
    pub(crate) compat_nr_pages: Option<u32>,
    #[prost(bool, optional, tag = "3")]
    pub(crate) in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    pub(crate) flags: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    pub(crate) nr_pages: Option<u64>,
}

/// The most pages one entry may hold when written: both page count fields carry it.
pub(crate) const MAX_ENTRY_PAGES: u64 = u32::MAX as u64;

/// Appends the image header and `pagemap_head`.
pub(crate) fn encode_head(pages_id: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    out.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
    put_message(
        &PagemapHead {
            pages_id: Some(pages_id),
        },
        out,
    );
}

/// Which fields of a pagemap entry carry its page count when it is written.
///
/// CRIU 1.x to 3.x read `compat_nr_pages` (field 2, 32 bits); CRIU 4.x and its `crit` read
/// `nr_pages` (field 5) when it is there, and write 0 in field 2 (which is required, so
/// it is always written). Readers of this crate take field 5 when present, else field 2.
///
/// ```
/// use page_pipe::image::CountFields;
/// assert_eq!(CountFields::default(), CountFields::Both);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CountFields {
    /// Both fields (entries of more than `u32::MAX` pages are split so that field 2
    /// holds them): old and new CRIU and `crit` read the same counts. The default.
    #[default]
    Both,
    /// Field 5 only, field 2 written as 0, entries never split: byte for byte what CRIU
    /// 4.x writes (its dump and its page server). CRIU and `crit` before 4.0 read every
    /// entry as 0 pages.
    Criu4,
}

/// Appends one entry, with its page count in both fields (it must fit 32 bits).
pub(crate) fn encode_entry(e: &PagemapEntry, out: &mut Vec<u8>) {
    encode_entry_counts(e, CountFields::Both, out)
}

/// Appends one entry, with its page count in the fields `counts` says (with
/// [`CountFields::Both`] it must fit 32 bits).
pub(crate) fn encode_entry_counts(e: &PagemapEntry, counts: CountFields, out: &mut Vec<u8>) {
    let compat = match counts {
        CountFields::Both => {
            debug_assert!(e.pages <= MAX_ENTRY_PAGES);
            e.pages as u32
        }
        CountFields::Criu4 => 0,
    };
    let msg = PagemapEntryMsg {
        vaddr: Some(e.vaddr),
        compat_nr_pages: Some(compat),
        in_parent: None,
        flags: Some(e.flags.bits()),
        nr_pages: Some(e.pages),
    };
    put_message(&msg, out);
}

fn put_message(m: &impl Message, out: &mut Vec<u8>) {
    let len = m.encoded_len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    m.encode(out).expect("a Vec grows as needed");
}

/// What is wrong with the bytes of a pagemap image.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// The file ends inside the header or a message.
    Truncated {
        /// Bytes needed from `offset`.
        needed: u64,
    },
    /// The first word is not [`IMG_COMMON_MAGIC`].
    BadImageMagic {
        /// The word found.
        found: u32,
    },
    /// The second word is not [`PAGEMAP_MAGIC`].
    BadPagemapMagic {
        /// The word found.
        found: u32,
    },
    /// A message does not decode as protobuf.
    Protobuf {
        /// The decoder's complaint.
        reason: String,
    },
    /// The file holds no `pagemap_head`.
    NoHead,
    /// A message lacks a required field.
    MissingField {
        /// The field's name.
        field: &'static str,
    },
    /// An entry has a page count of zero.
    NoPages,
    /// An entry's address is not page-aligned.
    Unaligned,
    /// An entry passes the end of the address space.
    Overflow,
    /// An entry starts below the end of the one before it (out of order or
    /// overlapping).
    OutOfOrder {
        /// Where the entry before ends.
        prev_end: u64,
    },
    /// An entry's flags have unknown bits, or a combination that means nothing
    /// (`PARENT` with `PRESENT` or `LAZY`).
    BadFlags {
        /// The flags.
        flags: u32,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Truncated { needed } => {
                write!(f, "the file ends early ({needed} more bytes needed)")
            }
            FormatError::BadImageMagic { found } => write!(
                f,
                "not a CRIU image: magic {found:#010x}, expected {IMG_COMMON_MAGIC:#010x}"
            ),
            FormatError::BadPagemapMagic { found } => write!(
                f,
                "not a pagemap image: magic {found:#010x}, expected {PAGEMAP_MAGIC:#010x}"
            ),
            FormatError::Protobuf { reason } => write!(f, "bad protobuf message: {reason}"),
            FormatError::NoHead => f.write_str("no pagemap_head"),
            FormatError::MissingField { field } => {
                write!(f, "the required field {field} is missing")
            }
            FormatError::NoPages => f.write_str("the entry has no pages"),
            FormatError::Unaligned => f.write_str("the entry's address is not page-aligned"),
            FormatError::Overflow => f.write_str("the entry passes the end of the address space"),
            FormatError::OutOfOrder { prev_end } => write!(
                f,
                "the entry starts below {prev_end:#x}, where the entry before it ends"
            ),
            FormatError::BadFlags { flags } => write!(f, "the entry has bad flags {flags:#x}"),
        }
    }
}

/// Where in a pagemap image a [`FormatError`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatAt {
    /// Byte offset of the message (or header word) at fault.
    pub offset: u64,
    /// Index of the entry at fault (from 0, not counting the head), if it is one.
    pub entry: Option<usize>,
    /// The address of the entry at fault, once known.
    pub vaddr: Option<u64>,
    /// What is wrong.
    pub error: FormatError,
}

impl fmt::Display for FormatAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.entry, self.vaddr) {
            (Some(i), Some(v)) => write!(f, "entry {i} ({v:#x}) at byte {}: ", self.offset)?,
            (Some(i), None) => write!(f, "entry {i} at byte {}: ", self.offset)?,
            _ => write!(f, "byte {}: ", self.offset)?,
        }
        write!(f, "{}", self.error)
    }
}

/// A decoded pagemap image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    /// The id of the pages file, `pages-<pages_id>.img`.
    pub pages_id: u32,
    /// The entries, in address order.
    pub entries: Vec<PagemapEntry>,
}

impl Pagemap {
    /// Decodes and checks a pagemap image: magics, head, and entries that are aligned,
    /// non-empty, in ascending order without overlap, with known flags. The page count is
    /// read from `nr_pages` when present, else from `compat_nr_pages`; an entry without
    /// `flags` is `PRESENT`, or `PARENT` if its old `in_parent` field is set, as CRIU
    /// reads it.
    ///
    /// Memory use is bounded by the input: each entry takes at least eight input bytes
    /// (a length word, then `vaddr` and `compat_nr_pages`, a key and a byte each).
    ///
    /// ```
    /// use page_pipe::image::{Pagemap, PagemapEntry, PageFlags};
    /// let bytes = [
    ///     0x19, 0x43, 0x56, 0x54, 0x25, 0x40, 0x08, 0x56, // magics
    ///     2, 0, 0, 0, 0x08, 1, // head: pages_id 1
    ///     5, 0, 0, 0, 0x08, 0x80, 0x20, 0x10, 2, // entry: vaddr 0x1000, compat 2
    /// ];
    /// let pm = Pagemap::decode(&bytes, 4096)?;
    /// assert_eq!(pm.pages_id, 1);
    /// assert_eq!(pm.entries, [PagemapEntry { vaddr: 0x1000, pages: 2, flags: PageFlags::PRESENT }]);
    /// # Ok::<(), page_pipe::image::FormatAt>(())
    /// ```
    ///
    /// # Errors
    /// [`FormatAt`]: what is wrong, at which byte and entry.
    pub fn decode(bytes: &[u8], page_size: usize) -> Result<Self, FormatAt> {
        let at = |offset: usize, entry: Option<usize>, error| FormatAt {
            offset: offset as u64,
            entry,
            vaddr: None,
            error,
        };
        let word = |off: usize| -> Result<u32, FormatAt> {
            let b = bytes.get(off..off + 4).ok_or_else(|| {
                at(
                    off,
                    None,
                    FormatError::Truncated {
                        needed: (off + 4 - bytes.len()) as u64,
                    },
                )
            })?;
            Ok(u32::from_le_bytes(b.try_into().expect("four bytes")))
        };
        let magic = word(0)?;
        if magic != IMG_COMMON_MAGIC {
            return Err(at(0, None, FormatError::BadImageMagic { found: magic }));
        }
        let magic = word(4)?;
        if magic != PAGEMAP_MAGIC {
            return Err(at(4, None, FormatError::BadPagemapMagic { found: magic }));
        }
        let mut off = 8;
        let mut head: Option<u32> = None;
        let mut entries = Vec::new();
        let mut prev_end: Option<u64> = None;
        while off < bytes.len() {
            let index = head.map(|_| entries.len());
            let len = word(off).map_err(|mut e| {
                e.entry = index;
                e
            })? as usize;
            let body = bytes.get(off + 4..).unwrap_or_default();
            if body.len() < len {
                return Err(at(
                    off,
                    index,
                    FormatError::Truncated {
                        needed: (len - body.len()) as u64,
                    },
                ));
            }
            let body = &body[..len];
            let Some(index) = index else {
                let h = PagemapHead::decode(body).map_err(|e| {
                    at(
                        off,
                        None,
                        FormatError::Protobuf {
                            reason: e.to_string(),
                        },
                    )
                })?;
                let id = h.pages_id.ok_or(at(
                    off,
                    None,
                    FormatError::MissingField { field: "pages_id" },
                ))?;
                head = Some(id);
                off += 4 + len;
                continue;
            };
            let m = PagemapEntryMsg::decode(body).map_err(|e| {
                at(
                    off,
                    Some(index),
                    FormatError::Protobuf {
                        reason: e.to_string(),
                    },
                )
            })?;
            let (Some(vaddr), Some(compat)) = (m.vaddr, m.compat_nr_pages) else {
                let field = if m.vaddr.is_none() {
                    "vaddr"
                } else {
                    "compat_nr_pages"
                };
                return Err(at(off, Some(index), FormatError::MissingField { field }));
            };
            let fail = |error| FormatAt {
                offset: off as u64,
                entry: Some(index),
                vaddr: Some(vaddr),
                error,
            };
            let pages = m.nr_pages.unwrap_or(u64::from(compat));
            let bits = match (m.in_parent, m.flags) {
                (Some(true), f) => f.unwrap_or(0) | PageFlags::PARENT.bits(),
                (_, Some(f)) => f,
                (_, None) => PageFlags::PRESENT.bits(),
            };
            let flags =
                PageFlags::from_bits(bits).ok_or(fail(FormatError::BadFlags { flags: bits }))?;
            if flags.contains(PageFlags::PARENT)
                && flags.intersects(PageFlags::PRESENT | PageFlags::LAZY)
            {
                return Err(fail(FormatError::BadFlags { flags: bits }));
            }
            if pages == 0 {
                return Err(fail(FormatError::NoPages));
            }
            let end = match PageRange::new(vaddr, pages, page_size) {
                Ok(r) => r.end(),
                Err(RangeError::Unaligned { .. }) => return Err(fail(FormatError::Unaligned)),
                Err(_) => return Err(fail(FormatError::Overflow)),
            };
            let e = PagemapEntry {
                vaddr,
                pages,
                flags,
            };
            if let Some(p) = prev_end
                && e.vaddr < p
            {
                return Err(fail(FormatError::OutOfOrder { prev_end: p }));
            }
            prev_end = Some(end);
            entries.push(e);
            off += 4 + len;
        }
        let pages_id = head.ok_or(at(off, None, FormatError::NoHead))?;
        Ok(Pagemap { pages_id, entries })
    }

    /// Encodes the image: header, head, entries.
    ///
    /// # Panics
    /// If an entry holds more than `u32::MAX` pages (split it first; the writer does).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 20 * self.entries.len());
        encode_head(self.pages_id, &mut out);
        for e in &self.entries {
            assert!(
                e.pages <= MAX_ENTRY_PAGES,
                "entry {e} is too large for one message"
            );
            encode_entry(e, &mut out);
        }
        out
    }

    /// Bytes of the pages file the entries need: their present pages.
    pub fn present_bytes(&self, page_size: usize) -> Option<u64> {
        self.entries
            .iter()
            .filter(|e| e.is_present())
            .try_fold(0u64, |acc, e| {
                acc.checked_add(e.pages.checked_mul(page_size as u64)?)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(vaddr: u64, pages: u64, flags: PageFlags) -> PagemapEntry {
        PagemapEntry {
            vaddr,
            pages,
            flags,
        }
    }

    #[test]
    fn encoding_round_trips_and_writes_both_counts() {
        let pm = Pagemap {
            pages_id: 3,
            entries: vec![
                e(0x1000, 2, PageFlags::PARENT),
                e(0x3000, 1, PageFlags::PRESENT),
                e(0x4000, 5, PageFlags::LAZY | PageFlags::PRESENT),
                e(0x9000, 1, PageFlags::LAZY),
            ],
        };
        let bytes = pm.encode();
        assert_eq!(Pagemap::decode(&bytes, 4096).unwrap(), pm);
        // The header is 8 bytes, the head message 4 + 2; then the first entry.
        let len = u32::from_le_bytes(bytes[14..18].try_into().unwrap()) as usize;
        let m = PagemapEntryMsg::decode(&bytes[18..18 + len]).unwrap();
        assert_eq!((m.compat_nr_pages, m.nr_pages), (Some(2), Some(2)));
    }

    #[test]
    fn criu4_counts_leave_field_2_at_zero_and_read_back_from_field_5() {
        let entry = e(
            0x7f00_0000_0000,
            0x1_0000_0002,
            PageFlags::LAZY | PageFlags::PRESENT,
        );
        let mut bytes = Vec::new();
        encode_head(65537, &mut bytes);
        encode_entry_counts(&entry, CountFields::Criu4, &mut bytes);
        // The magics, then the head's length word and body, then the entry's.
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let at = 8 + 4 + word(8);
        let len = word(at);
        let m = PagemapEntryMsg::decode(&bytes[at + 4..at + 4 + len]).unwrap();
        assert_eq!(
            (m.compat_nr_pages, m.nr_pages),
            (Some(0), Some(entry.pages))
        );
        assert_eq!(m.in_parent, None);
        let pm = Pagemap::decode(&bytes, 4096).unwrap();
        assert_eq!((pm.pages_id, pm.entries), (65537, vec![entry]));
    }

    #[test]
    fn old_style_entries_read_as_criu_reads_them() {
        let mut bytes = Vec::new();
        encode_head(1, &mut bytes);
        for m in [
            PagemapEntryMsg {
                vaddr: Some(0x1000),
                compat_nr_pages: Some(3),
                in_parent: None,
                flags: None,
                nr_pages: None,
            },
            PagemapEntryMsg {
                vaddr: Some(0x8000),
                compat_nr_pages: Some(1),
                in_parent: Some(true),
                flags: None,
                nr_pages: None,
            },
            PagemapEntryMsg {
                vaddr: Some(0x9000),
                compat_nr_pages: Some(0),
                in_parent: None,
                flags: Some(4),
                nr_pages: Some(7),
            },
        ] {
            put_message(&m, &mut bytes);
        }
        let pm = Pagemap::decode(&bytes, 4096).unwrap();
        assert_eq!(
            pm.entries,
            vec![
                e(0x1000, 3, PageFlags::PRESENT),
                e(0x8000, 1, PageFlags::PARENT),
                e(0x9000, 7, PageFlags::PRESENT)
            ]
        );
    }

    #[test]
    fn bad_entries_are_named_by_index_and_offset() {
        let good = Pagemap {
            pages_id: 1,
            entries: vec![
                e(0x1000, 2, PageFlags::PRESENT),
                e(0x2000, 1, PageFlags::PRESENT),
            ],
        };
        let err = Pagemap::decode(&good.encode(), 4096).unwrap_err();
        assert_eq!(err.entry, Some(1));
        assert_eq!(err.vaddr, Some(0x2000));
        assert_eq!(err.error, FormatError::OutOfOrder { prev_end: 0x3000 });
        assert!(err.to_string().contains("entry 1 (0x2000)"), "{err}");
    }
}
