//! CRIU-compatible images: write them, read them back, restore memory through the parent
//! chain (eagerly, or by mapping), flatten chains and compare images.
//!
//! An image directory holds `pagemap-<id>.img` (the image magic `0x54564319`, the pagemap
//! magic `0x56084025`, then u32-length-prefixed protobuf messages: one `pagemap_head`,
//! then `pagemap_entry`s in address order) and `pages-<pages_id>.img` (the present pages,
//! raw, in entry order). In CRIU the pagemap's `id` is the id of the dumped process, and
//! `pages_id`, written in the pagemap's head, names the pages file. An incremental
//! snapshot has a `parent` symlink to its parent's directory; its `PARENT` entries are
//! found there.
//!
//! # Rules
//!
//! Images are memory, so they are kept private and whole:
//!
//! - Entries are page-aligned, non-empty, ascending and do not overlap; their flags are
//!   `PRESENT`, `LAZY`, `LAZY | PRESENT` or `PARENT`. The pages file holds exactly the
//!   present pages of the entries.
//! - [`ImageWriter`] creates its files with mode 0600 and the directories it makes with
//!   mode 0700 (the umask may only take bits away). It writes under temporary names it
//!   creates itself (`O_CREAT | O_EXCL | O_NOFOLLOW`), so it never follows or writes
//!   through a file or symlink planted at an image's name.
//! - The commit is atomic: the pagemap appears under its name only when
//!   [`ImageWriter::finish`] succeeds, after the pages file and the `parent` link are in
//!   place, and by default after the data and the directory were synced
//!   ([`ImageWriter::with_sync`] turns syncing off). A full image removes an old `parent`
//!   link; an incremental one replaces it. A pages file that another pagemap of the
//!   directory reads is never replaced ([`ImageError::PagesInUse`]): images that share a
//!   directory need their own pages ids. A writer that met an error refuses to finish
//!   with that first error, and commits nothing; a writer dropped without `finish`
//!   removes its temporary files.
//! - It writes each entry's page count in both `compat_nr_pages` (field 2, which older
//!   CRIU and `crit` read) and `nr_pages` (field 5, which CRIU 4.x reads), splitting
//!   entries of more than `u32::MAX` pages; [`ImageWriter::with_count_fields`] writes
//!   them as CRIU 4.x does instead (field 5 only, field 2 zero). By default it joins
//!   contiguous entries with equal flags, so a capture made in chunks writes the same
//!   image as one made in one pass ([`ImageWriter::with_joining`] turns it off, as CRIU's
//!   page server writes).
//! - [`Image::open`] opens image files with `O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC` and
//!   accepts regular files only: a symlink, FIFO, device, socket or directory at an
//!   image's name is an error ([`ImageError::Symlink`], [`ImageError::NotRegular`]), at
//!   once. It reads the pagemap by its size, at most [`MAX_PAGEMAP_BYTES`], and checks
//!   all of the rules above. The only link it follows is `parent` (a directory, as CRIU
//!   makes it), along a chain of at most [`MAX_PARENT_DEPTH`] images that must not loop;
//!   a `PARENT` entry needs a parent. Once the pages file and the parent link are
//!   open it checks that the pagemap it read is still under its name: a writer
//!   committing over the image removes the old pagemap first, so a reader never pairs
//!   a pagemap with the pages file or link of the image replacing it (it opens the
//!   image again, at most a few times, then [`ImageError::Replaced`]).
//! - Pages are read with positional reads from the files the [`Image`] keeps open, never
//!   mapped by safe code: a file truncated or rewritten by someone else while open gives
//!   [`ImageError::ShortRead`] or the new bytes, never undefined behaviour. Mapping the
//!   files over memory ([`Image::map_into`]) is an `unsafe fn` whose caller promises the
//!   files stay unchanged while mapped; it lives in the module's one opt-in to `unsafe`
//!   (`map.rs`), which states what it relies on.
//! - One plan decides where each page comes from ([`Image::plan`]): the nearest image of
//!   the chain that holds it. Every way of moving pages follows it: the eager restore,
//!   the restore by mapping, [`Image::flatten`] and [`Image::diff`].
//! - A restore ([`Image::restore`], [`Image::read`]) reads each byte once; pages the chain
//!   does not hold are zeros and counted in the [`ReadReport`], or an error
//!   ([`ImageError::NotInImage`]) with [`RestoreOptions::strict`]. It reads straight into
//!   the destination, 1 MiB at a time per thread, each piece not yet in memory
//!   prefaulted first (`madvise(MADV_POPULATE_WRITE)`, which changes no byte), so that
//!   threads fault fresh memory in side by side.
//! - A restore by mapping makes one private mapping per run of pages contiguous in
//!   memory and in a pages file, and counts them first: a plan that would bring the
//!   process near `vm.max_map_count` is [`ImageError::TooManyMappings`], and nothing is
//!   mapped.
//! - [`Image::flatten`] writes the chain as one full image that restores to the same
//!   pages (lazy-only pages stay lazy), streamed with `copy_file_range`, committed as
//!   every image is; [`Image::diff`] compares two chains through their plans, 1 MiB at a
//!   time. Neither holds more than a few MiB of pages in memory, however large the
//!   image.

mod diff;
mod error;
mod files;
mod flatten;
mod format;
mod map;
mod reader;
mod restore;
mod writer;

pub use diff::{DiffKind, DiffSpan, diff};
pub use error::{FileKind, FileOp, ImageError};
pub(crate) use files::{open_regular, read_exact_at};
pub use flatten::{FlattenOptions, flatten};
pub use format::{
    CountFields, FormatAt, FormatError, IMG_COMMON_MAGIC, PAGEMAP_MAGIC, PageFlags, Pagemap,
    PagemapEntry,
};
pub use map::{MAP_COUNT_RESERVE, MapOptions, MapReport, max_map_count};
pub use reader::{Image, Page};
pub use restore::{
    MAX_AUTO_THREADS, MIN_BYTES_PER_THREAD, ReadReport, RestoreOptions, RestorePlan, Segment,
    SegmentKind,
};
pub use writer::{ImageSummary, ImageWriter, PagesAppender};

/// The deepest parent chain [`Image::open`] follows.
pub const MAX_PARENT_DEPTH: usize = 64;

/// The largest pagemap image [`Image::open`] reads: 256 MiB.
///
/// An entry takes at least 8 bytes on disk (a length word and two one-byte fields;
/// CRIU's and ours take 14 to 20), so this admits at least 13 million entries: hundreds
/// of GiB of memory even in scattered single pages. Decoded, an entry costs 32 bytes, so
/// the largest pagemap admitted needs at most about 1 GiB; a larger file (or a sparse
/// one claiming to be) is [`ImageError::TooLarge`] before anything is allocated.
pub const MAX_PAGEMAP_BYTES: u64 = 256 << 20;

/// The name of the pagemap image with id `id`.
///
/// ```
/// assert_eq!(page_pipe::image::pagemap_name(7), "pagemap-7.img");
/// ```
pub fn pagemap_name(id: u64) -> String {
    format!("pagemap-{id}.img")
}

/// The name of the shared-memory pagemap image with id `id` (CRIU's
/// `pagemap-shmem-<id>.img`, which its page server receives as image type 2).
///
/// ```
/// assert_eq!(page_pipe::image::shmem_pagemap_name(7), "pagemap-shmem-7.img");
/// ```
pub fn shmem_pagemap_name(id: u64) -> String {
    format!("pagemap-shmem-{id}.img")
}

/// The name of the pages file with id `pages_id`.
///
/// ```
/// assert_eq!(page_pipe::image::pages_name(1), "pages-1.img");
/// ```
pub fn pages_name(pages_id: u32) -> String {
    format!("pages-{pages_id}.img")
}
