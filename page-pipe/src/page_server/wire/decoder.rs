//! A decoder for whole recorded streams, message by message.

use super::{Expected, HEADER_LEN, Limits, Message, WireError, WireErrorKind};

/// One message of a stream, as [`Decoder`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Byte offset of its header.
    pub offset: u64,
    /// The message.
    pub message: Message,
    /// Its pages (empty when none follow).
    pub payload: &'a [u8],
}

/// Walks a recorded client stream message by message (see the [module rules](crate::page_server::wire)).
///
/// ```
/// use page_pipe::page_server::wire::{Decoder, ImageId, Limits, Message};
/// let img = ImageId::pagemap(1).unwrap();
/// let mut stream = Message::Open2 { image: img }.to_vec();
/// stream.extend(Message::Close.encode());
/// let frames: Vec<_> = Decoder::new(&stream, Limits::default()).collect::<Result<_, _>>()?;
/// assert_eq!(frames.len(), 2);
/// assert_eq!((frames[1].offset, frames[1].message), (32, Message::Close));
/// # Ok::<(), page_pipe::page_server::wire::WireError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    input: &'a [u8],
    offset: u64,
    limits: Limits,
    failed: bool,
}

impl<'a> Decoder<'a> {
    /// A decoder of `input`.
    pub fn new(input: &'a [u8], limits: Limits) -> Self {
        Self {
            input,
            offset: 0,
            limits,
            failed: false,
        }
    }

    /// Bytes decoded so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes not decoded yet.
    pub fn rest(&self) -> &'a [u8] {
        self.input
    }

    fn next_frame(&mut self) -> Result<Frame<'a>, WireError> {
        let at = self.offset;
        let fail = |kind| WireError { offset: at, kind };
        let Some((head, rest)) = self.input.split_first_chunk::<HEADER_LEN>() else {
            return Err(fail(WireErrorKind::Truncated {
                expected: Expected::Header,
                needed: HEADER_LEN as u64,
                got: self.input.len() as u64,
            }));
        };
        let message = Message::decode(head, &self.limits).map_err(fail)?;
        // At most `max_payload_pages` pages: checked, and in range of `usize` here as it
        // is a length the input may hold.
        let needed = message.payload_len(self.limits.page_size);
        let len = usize::try_from(needed)
            .ok()
            .filter(|&l| l <= rest.len())
            .ok_or_else(|| {
                fail(WireErrorKind::Truncated {
                    expected: Expected::Pages {
                        entry: message.entry().expect("a payload belongs to an entry"),
                    },
                    needed,
                    got: rest.len() as u64,
                })
            })?;
        let (payload, rest) = rest.split_at(len);
        self.input = rest;
        self.offset += (HEADER_LEN + len) as u64;
        Ok(Frame {
            offset: at,
            message,
            payload,
        })
    }
}

impl<'a> Iterator for Decoder<'a> {
    type Item = Result<Frame<'a>, WireError>;

    /// The next message, or its error (then nothing more).
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.input.is_empty() {
            return None;
        }
        let r = self.next_frame();
        self.failed = r.is_err();
        Some(r)
    }
}
