//! The rules of a page-server session, with no I/O: which message may come when, and
//! what the server does for it. The server runs every message through them before it
//! touches a socket or a file; [`check_stream`](super::check_stream) runs a recorded
//! stream through the same rules.

use std::collections::BTreeSet;
use std::fmt;

use crate::image::PagemapEntry;

use super::wire::{ImageId, Message};

/// What the server does for a message that passed the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Start writing `image`; with `reply`, answer whether its parent has it (`OPEN2`).
    Open { image: ImageId, reply: bool },
    /// Answer whether the parent holds `image` (`PARENT`).
    Parent { image: ImageId },
    /// Add `entry` to `image`, reading its pages if it is present. `open` first when
    /// the message names an image other than the current one (CRIU's "IO without
    /// open").
    Entry {
        image: ImageId,
        entry: PagemapEntry,
        open: bool,
    },
    /// Serve pages (`GET`).
    Get { id: u64, vaddr: u64, pages: u64 },
    /// Commit the images and end the session; `force`: `FORCE_CLOSE`, whose client may
    /// not close its socket.
    Close { force: bool },
}

/// Why a message breaks the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RuleError {
    /// An image opened a second time in one session (CRIU would truncate what it wrote).
    Reopened {
        /// The image.
        image: ImageId,
    },
    /// More images in one session than the server admits.
    TooManyImages {
        /// The most admitted.
        max: usize,
    },
    /// An entry that starts below the end of the entry before it in the same image
    /// (CRIU writes such entries as given; its own readers then misread them).
    OutOfOrder {
        /// The image.
        image: ImageId,
        /// The entry.
        entry: PagemapEntry,
        /// Where the entry before it ends.
        prev_end: u64,
    },
    /// A message after `CLOSE`.
    AfterClose,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleError::Reopened { image } => write!(
                f,
                "{image} is opened a second time in one session; each image is sent once"
            ),
            RuleError::TooManyImages { max } => {
                write!(f, "more than {max} images in one session")
            }
            RuleError::OutOfOrder {
                image,
                entry,
                prev_end,
            } => write!(
                f,
                "{image}: entry {entry} starts below {prev_end:#x}, where the entry before it ends; entries must ascend without overlap"
            ),
            RuleError::AfterClose => f.write_str("a message after PS_IOV_CLOSE"),
        }
    }
}

/// The state the rules keep: the image being written and where its last entry ended,
/// the images opened so far, whether the session was closed.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    current: Option<(ImageId, Option<u64>)>,
    opened: BTreeSet<ImageId>,
    max_images: usize,
    page_size: u64,
    closed: bool,
}

impl Rules {
    pub(crate) fn new(max_images: usize, page_size: usize) -> Self {
        Self {
            current: None,
            opened: BTreeSet::new(),
            max_images,
            page_size: page_size as u64,
            closed: false,
        }
    }

    /// Whether `CLOSE` or `FORCE_CLOSE` came.
    pub(crate) fn closed(&self) -> bool {
        self.closed
    }

    fn open(&mut self, image: ImageId) -> Result<(), RuleError> {
        if self.opened.contains(&image) {
            return Err(RuleError::Reopened { image });
        }
        if self.opened.len() >= self.max_images {
            return Err(RuleError::TooManyImages {
                max: self.max_images,
            });
        }
        self.opened.insert(image);
        self.current = Some((image, None));
        Ok(())
    }

    /// The step for `m` (decoded, so its ranges are checked), or why it breaks the rules.
    pub(crate) fn step(&mut self, m: &Message) -> Result<Step, RuleError> {
        if self.closed {
            return Err(RuleError::AfterClose);
        }
        Ok(match *m {
            Message::Open { image } | Message::Open2 { image } => {
                self.open(image)?;
                Step::Open {
                    image,
                    reply: matches!(m, Message::Open2 { .. }),
                }
            }
            Message::Parent { image } => Step::Parent { image },
            Message::Add { image, .. }
            | Message::Hole { image, .. }
            | Message::AddF { image, .. } => {
                let entry = m.entry().expect("entry messages have an entry");
                let open = self.current.is_none_or(|(c, _)| c != image);
                if open {
                    self.open(image)?;
                }
                let (_, last_end) = self.current.as_mut().expect("opened above");
                if let Some(prev_end) = *last_end
                    && entry.vaddr < prev_end
                {
                    return Err(RuleError::OutOfOrder {
                        image,
                        entry,
                        prev_end,
                    });
                }
                // Decoded entries do not pass the end of the address space.
                *last_end = Some(entry.vaddr + entry.pages * self.page_size);
                Step::Entry { image, entry, open }
            }
            Message::Get { id, vaddr, pages } => Step::Get { id, vaddr, pages },
            Message::Close | Message::ForceClose => {
                self.closed = true;
                Step::Close {
                    force: matches!(m, Message::ForceClose),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::PageFlags;

    fn add(image: ImageId, vaddr: u64, pages: u64) -> Message {
        Message::AddF {
            image,
            vaddr,
            pages,
            flags: PageFlags::PRESENT,
        }
    }

    #[test]
    fn entries_ascend_per_image_and_images_open_once() {
        let a = ImageId::pagemap(1).unwrap();
        let b = ImageId::shmem(1).unwrap();
        let mut r = Rules::new(4, 4096);
        assert_eq!(
            r.step(&Message::Open2 { image: a }),
            Ok(Step::Open {
                image: a,
                reply: true
            })
        );
        assert!(r.step(&add(a, 0x2000, 2)).is_ok());
        assert!(matches!(
            r.step(&add(a, 0x3000, 1)),
            Err(RuleError::OutOfOrder {
                prev_end: 0x4000,
                ..
            })
        ));
        // Touching entries are fine; another image opens implicitly, as CRIU allows.
        assert!(r.step(&add(a, 0x4000, 1)).is_ok());
        assert!(matches!(
            r.step(&add(b, 0x1000, 1)),
            Ok(Step::Entry { open: true, .. })
        ));
        assert_eq!(
            r.step(&Message::Open { image: a }),
            Err(RuleError::Reopened { image: a })
        );
        assert_eq!(
            r.step(&Message::ForceClose),
            Ok(Step::Close { force: true })
        );
        assert_eq!(r.step(&Message::Close), Err(RuleError::AfterClose));
    }

    #[test]
    fn the_image_count_is_bounded() {
        let mut r = Rules::new(2, 4096);
        for id in 0..2 {
            let image = ImageId::pagemap(id).unwrap();
            r.step(&Message::Open { image }).unwrap();
        }
        let image = ImageId::pagemap(9).unwrap();
        assert_eq!(
            r.step(&Message::Open2 { image }),
            Err(RuleError::TooManyImages { max: 2 })
        );
    }
}
