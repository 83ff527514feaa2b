//! The receiving end: a page-server stream written straight into memory.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use page_pipe_sys::{Partial, Stopped, send_all};

use crate::dump::sealed;
use crate::image::{PageFlags, PagemapEntry};
use crate::page_server::rules::{Rules, Step};
use crate::page_server::stream::{Peer, Stream, is_timeout};
use crate::page_server::wire::{
    Command, Expected, HEADER_LEN, ImageId, Limits, Message, WireError, WireErrorKind, i32_reply,
    open2_reply,
};
use crate::page_server::{DEFAULT_IDLE_TIMEOUT, Incoming, SessionOp};

use super::MemoryRegion;
use super::cancel::CancelToken;
use super::error::{CancelledBy, ReceiveError, ReceiveErrorKind};

/// Where a receiver writes pages: a [`MemoryRegion`] (raw memory, or a mapping it owns),
/// or, with the `vm-memory` feature, rust-vmm guest memory through a
/// [`GuestWriter`](crate::vm::GuestWriter). Sealed.
pub trait Destination: sealed::Sealed {
    /// Checks that every page of `entry` is here; the error names the first that is not.
    #[doc(hidden)]
    fn check(&self, entry: &PagemapEntry, offset: u64) -> Result<(), ReceiveErrorKind>;
    /// Reads the pages of the checked, present `entry` from `fd` into the memory.
    #[doc(hidden)]
    fn fill(
        &mut self,
        entry: &PagemapEntry,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<(), ReceiveErrorKind>;
}

/// The error of a read of `entry`'s pages that stopped after `p.done` bytes.
fn read_error(
    entry: &PagemapEntry,
    len: u64,
    offset: u64,
    error: io::Error,
    done: usize,
) -> ReceiveErrorKind {
    if error.kind() == io::ErrorKind::UnexpectedEof {
        return ReceiveErrorKind::Wire(WireError {
            offset: offset + done as u64,
            kind: WireErrorKind::Truncated {
                expected: Expected::Pages { entry: *entry },
                needed: len,
                got: done as u64,
            },
        });
    }
    ReceiveErrorKind::Io {
        offset: offset + done as u64,
        op: SessionOp::Receive {
            expected: Expected::Pages { entry: *entry },
        },
        error,
    }
}

impl sealed::Sealed for MemoryRegion {}
impl Destination for MemoryRegion {
    fn check(&self, entry: &PagemapEntry, offset: u64) -> Result<(), ReceiveErrorKind> {
        match self.first_outside(entry.vaddr, entry.pages) {
            None => Ok(()),
            Some(addr) => Err(ReceiveErrorKind::Outside {
                offset,
                entry: *entry,
                addr,
            }),
        }
    }

    fn fill(
        &mut self,
        entry: &PagemapEntry,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<(), ReceiveErrorKind> {
        let ps = page_pipe_sys::page_size().get() as u64;
        let len = entry.pages * ps;
        let outside = ReceiveErrorKind::Outside {
            offset,
            entry: *entry,
            addr: self
                .first_outside(entry.vaddr, entry.pages)
                .unwrap_or(entry.vaddr),
        };
        let Ok(n) = usize::try_from(len) else {
            return Err(outside);
        };
        match self.read_from(fd, entry.vaddr, n) {
            Ok(()) => Ok(()),
            Err(None) => Err(outside),
            Err(Some(p)) => Err(read_error(entry, len, offset, partial_error(p), p.done)),
        }
    }
}

fn partial_error(p: Partial) -> io::Error {
    match p.stopped {
        Stopped::EndOfData => io::Error::from(io::ErrorKind::UnexpectedEof),
        Stopped::Errno(e) => io::Error::from(e),
    }
}

#[cfg(feature = "vm-memory")]
mod guest {
    use super::*;
    use crate::vm::{FdReader, GuestWriter, VmError};
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestRegionMmap};

    /// Guest memory: every entry checked against the regions (a page in a gap between
    /// regions is refused), pages read from the socket straight into the regions'
    /// `VolatileSlice`s, dirty bitmaps marked.
    impl<M, B> Destination for GuestWriter<'_, M>
    where
        M: GuestMemoryBackend<R = GuestRegionMmap<B>>,
        B: Bitmap,
    {
        fn check(&self, entry: &PagemapEntry, offset: u64) -> Result<(), ReceiveErrorKind> {
            GuestWriter::check(self, entry).map_err(|e| match e {
                VmError::OutsideMemory { addr, .. } => ReceiveErrorKind::Outside {
                    offset,
                    entry: *entry,
                    addr,
                },
                error => ReceiveErrorKind::Guest {
                    offset,
                    entry: *entry,
                    error: Box::new(error),
                },
            })
        }

        fn fill(
            &mut self,
            entry: &PagemapEntry,
            fd: BorrowedFd<'_>,
            offset: u64,
        ) -> Result<(), ReceiveErrorKind> {
            let len = entry.pages * page_pipe_sys::page_size().get() as u64;
            self.read_from(*entry, &mut FdReader::stream(fd))
                .map_err(|e| match e {
                    VmError::Stream { error, .. } => read_error(entry, len, offset, error, 0),
                    error => ReceiveErrorKind::Guest {
                        offset,
                        entry: *entry,
                        error: Box::new(error),
                    },
                })
        }
    }
}

/// How a receiver runs.
///
/// ```
/// use std::time::Duration;
/// use page_pipe::migrate::ReceiveOptions;
/// let o = ReceiveOptions { idle_timeout: Some(Duration::from_secs(5)), ..ReceiveOptions::default() };
/// assert!(o.cancel.is_none());
/// ```
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// The longest the sender may be silent in one call (default
    /// [`DEFAULT_IDLE_TIMEOUT`]; `None`: for ever).
    pub idle_timeout: Option<Duration>,
    /// What a message may claim (default [`Limits::default`]).
    pub limits: Limits,
    /// The most rounds (images) one stream may have (default 4096).
    pub max_rounds: usize,
    /// Cancels the receiver from another thread (default none).
    pub cancel: Option<CancelToken>,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            limits: Limits::default(),
            max_rounds: 4096,
            cancel: None,
        }
    }
}

/// What one round (one image of the stream) brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundReceived {
    /// The image the round was sent as (`pagemap-<round>.img` from a [`Sender`](super::Sender)).
    pub image: ImageId,
    /// Entries.
    pub entries: u64,
    /// Pages written into memory.
    pub pages: u64,
    /// Pages named as already here (`PARENT` entries).
    pub parent_pages: u64,
    /// Bytes received, headers included.
    pub bytes: u64,
    /// From its `OPEN2` to the next round's (or `CLOSE`).
    pub time: Duration,
}

/// What a receiver received: every round, applied in order, and the stream closed with
/// `CLOSE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveReport {
    /// The sender.
    pub peer: Peer,
    /// The rounds, in order.
    pub rounds: Vec<RoundReceived>,
    /// Messages received.
    pub messages: u64,
    /// Bytes received.
    pub bytes: u64,
    /// From the first byte to the reply to `CLOSE`.
    pub time: Duration,
}

impl ReceiveReport {
    /// Pages written into memory, over all rounds.
    pub fn pages(&self) -> u64 {
        self.rounds.iter().map(|r| r.pages).sum()
    }
}

/// Receives a page-server stream from `conn` into `dest`: every run checked against the
/// destination before a byte of it is read, pages read from the socket straight into
/// the memory, rounds (images) applied in the order they come (their ids must ascend).
/// Returns once the sender has sent `CLOSE` (answered with 0) and closed its side: only
/// then is the memory complete. See the [module docs](super) for what each message
/// does.
///
/// ```
/// use memmap2::MmapOptions;
/// use page_pipe::image::{PageFlags, PagemapEntry};
/// use page_pipe::migrate::{receive, MemoryRegion, ReceiveOptions};
/// use page_pipe::page_server::{Incoming, PageServerClient};
/// let ps = page_pipe::page_size();
/// let (a, b) = std::os::unix::net::UnixStream::pair()?;
/// let sender = std::thread::spawn(move || {
///     let mut c = PageServerClient::from_unix(a)?;
///     c.open(page_pipe::page_server::wire::ImageId::pagemap(1).unwrap())?;
///     c.send_entry(PagemapEntry { vaddr: 0x10_0000 + ps as u64, pages: 1, flags: PageFlags::PRESENT }, &vec![7; ps])?;
///     c.close()
/// });
/// let mut region = MemoryRegion::from_mmap(0x10_0000, MmapOptions::new().len(4 * ps).map_anon()?)?;
/// let report = receive(Incoming::from_unix(b), &mut region, &ReceiveOptions::default())?;
/// sender.join().unwrap()?;
/// assert_eq!((report.rounds.len(), report.pages()), (1, 1));
/// assert_eq!(region.mmap().unwrap()[ps], 7);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`ReceiveError`] naming the sender, the rounds applied whole before it, and what went
/// wrong ([`ReceiveErrorKind`]): a run outside the destination (refused before any byte
/// of it is written), a broken or cut stream, `FORCE_CLOSE` (the sender cancelled), the
/// token cancelled, a timeout. The memory is then not a consistent copy of anything.
pub fn receive<D: Destination + ?Sized>(
    conn: Incoming,
    dest: &mut D,
    opts: &ReceiveOptions,
) -> Result<ReceiveReport, ReceiveError> {
    let (stream, peer) = conn.into_parts();
    let _watch = opts.cancel.as_ref().map(|t| t.watch(&stream));
    let mut r = Receiver {
        stream: &stream,
        opts,
        offset: 0,
        rounds: Vec::new(),
        current: None,
        messages: 0,
    };
    let start = Instant::now();
    let result = stream
        .set_timeouts(opts.idle_timeout)
        .map_err(|error| ReceiveErrorKind::Io {
            offset: 0,
            op: SessionOp::Receive {
                expected: Expected::Header,
            },
            error,
        })
        .and_then(|()| r.run(dest));
    let complete = r.complete_rounds();
    match result {
        Ok(()) => Ok(ReceiveReport {
            peer,
            rounds: r.rounds,
            messages: r.messages,
            bytes: r.offset,
            time: start.elapsed(),
        }),
        Err(kind) => Err(ReceiveError {
            peer,
            rounds: complete,
            kind,
        }),
    }
}

struct Receiver<'a> {
    stream: &'a Stream,
    opts: &'a ReceiveOptions,
    /// Bytes of the stream consumed.
    offset: u64,
    rounds: Vec<RoundReceived>,
    /// When the current round began.
    current: Option<Instant>,
    messages: u64,
}

impl Receiver<'_> {
    /// Rounds applied whole: all but the one still open.
    fn complete_rounds(&self) -> u32 {
        let open = u32::from(self.current.is_some());
        (self.rounds.len() as u32).saturating_sub(open)
    }

    fn cancelled(&self) -> bool {
        self.opts
            .cancel
            .as_ref()
            .is_some_and(CancelToken::is_cancelled)
    }

    /// The error for a failed call, or `Cancelled` when the token woke it.
    fn io_error(&self, op: SessionOp, error: io::Error) -> ReceiveErrorKind {
        if self.cancelled() {
            return ReceiveErrorKind::Cancelled {
                offset: self.offset,
                by: CancelledBy::Receiver,
            };
        }
        match self.opts.idle_timeout {
            Some(after) if is_timeout(&error) => ReceiveErrorKind::Timeout {
                offset: self.offset,
                op,
                after,
            },
            _ => ReceiveErrorKind::Io {
                offset: self.offset,
                op,
                error,
            },
        }
    }

    /// Reads exactly `buf.len()` bytes; `Ok(false)` at the end of the stream before the
    /// first byte.
    fn read_exact(&mut self, buf: &mut [u8], expected: Expected) -> Result<bool, ReceiveErrorKind> {
        let mut got = 0;
        while got < buf.len() {
            match page_pipe_sys::recv_some(self.stream.as_fd(), &mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    if self.cancelled() {
                        return Err(self.io_error(
                            SessionOp::Receive { expected },
                            io::ErrorKind::Interrupted.into(),
                        ));
                    }
                    return Err(ReceiveErrorKind::Wire(WireError {
                        offset: self.offset,
                        kind: WireErrorKind::Truncated {
                            expected,
                            needed: buf.len() as u64,
                            got: got as u64,
                        },
                    }));
                }
                Ok(n) => got += n,
                Err(e) => return Err(self.io_error(SessionOp::Receive { expected }, e.into())),
            }
        }
        self.offset += buf.len() as u64;
        Ok(true)
    }

    fn reply(&mut self, bytes: &[u8], command: Command) -> Result<(), ReceiveErrorKind> {
        send_all(self.stream.as_fd(), bytes, false)
            .map_err(|p| self.io_error(SessionOp::Reply { command }, p.into()))
    }

    /// Starts round `image` (after checking it comes after the last one).
    fn begin_round(&mut self, offset: u64, image: ImageId) -> Result<(), ReceiveErrorKind> {
        if let Some(prev) = self.rounds.last()
            && prev.image >= image
        {
            return Err(ReceiveErrorKind::RoundOrder {
                offset,
                image,
                previous: prev.image,
            });
        }
        self.end_round();
        self.rounds.push(RoundReceived {
            image,
            entries: 0,
            pages: 0,
            parent_pages: 0,
            bytes: HEADER_LEN as u64,
            time: Duration::ZERO,
        });
        self.current = Some(Instant::now());
        Ok(())
    }

    fn end_round(&mut self) {
        if let (Some(t), Some(r)) = (self.current.take(), self.rounds.last_mut()) {
            r.time = t.elapsed();
        }
    }

    fn run<D: Destination + ?Sized>(&mut self, dest: &mut D) -> Result<(), ReceiveErrorKind> {
        let limits = self.opts.limits;
        let ps = limits.page_size as u64;
        let mut rules = Rules::new(self.opts.max_rounds, limits.page_size);
        loop {
            if self.cancelled() {
                return Err(ReceiveErrorKind::Cancelled {
                    offset: self.offset,
                    by: CancelledBy::Receiver,
                });
            }
            let offset = self.offset;
            let mut head = [0u8; HEADER_LEN];
            if !self.read_exact(&mut head, Expected::Header)? {
                if self.cancelled() {
                    return Err(self.io_error(
                        SessionOp::Receive {
                            expected: Expected::Header,
                        },
                        io::ErrorKind::Interrupted.into(),
                    ));
                }
                return Err(ReceiveErrorKind::NotClosed { offset });
            }
            self.messages += 1;
            let m = Message::decode(&head, &limits)
                .map_err(|kind| ReceiveErrorKind::Wire(WireError { offset, kind }))?;
            let step = rules
                .step(&m)
                .map_err(|error| ReceiveErrorKind::Rules { offset, error })?;
            match step {
                Step::Open { image, reply } => {
                    let has_parent = !self.rounds.is_empty();
                    self.begin_round(offset, image)?;
                    if reply {
                        self.reply(&open2_reply(has_parent), Command::Open2)?;
                    }
                }
                Step::Parent { .. } => {
                    let has = i32::from(!self.rounds.is_empty());
                    self.reply(&i32_reply(has), Command::Parent)?;
                }
                Step::Entry { image, entry, open } => {
                    if open {
                        self.begin_round(offset, image)?;
                    }
                    self.entry(dest, offset, entry, ps)?;
                }
                Step::Get { .. } => {
                    return Err(ReceiveErrorKind::Unsupported {
                        offset,
                        command: Command::Get,
                    });
                }
                Step::Close { force } => {
                    self.end_round();
                    let command = if force {
                        Command::ForceClose
                    } else {
                        Command::Close
                    };
                    self.reply(&i32_reply(0), command)?;
                    if force {
                        // The sender gave up: what came is not a whole migration.
                        self.current = Some(Instant::now());
                        return Err(ReceiveErrorKind::Cancelled {
                            offset,
                            by: CancelledBy::Sender,
                        });
                    }
                    return self.after_close();
                }
            }
        }
    }

    fn entry<D: Destination + ?Sized>(
        &mut self,
        dest: &mut D,
        offset: u64,
        entry: PagemapEntry,
        ps: u64,
    ) -> Result<(), ReceiveErrorKind> {
        if entry.flags.contains(PageFlags::LAZY) && !entry.is_present() {
            return Err(ReceiveErrorKind::Lazy { offset, entry });
        }
        // Every page is checked before a byte of the payload is read.
        dest.check(&entry, offset)?;
        let round = self.rounds.last_mut().expect("the rules opened a round");
        round.entries += 1;
        round.bytes += HEADER_LEN as u64;
        if !entry.is_present() {
            round.parent_pages += entry.pages;
            return Ok(());
        }
        let len = entry.pages * ps;
        round.pages += entry.pages;
        round.bytes += len;
        let r = dest.fill(&entry, self.stream.as_fd(), self.offset);
        if r.is_err() && self.cancelled() {
            return Err(ReceiveErrorKind::Cancelled {
                offset: self.offset,
                by: CancelledBy::Receiver,
            });
        }
        r.map_err(|e| match e {
            ReceiveErrorKind::Io { offset, op, error } => match self.opts.idle_timeout {
                Some(after) if is_timeout(&error) => {
                    ReceiveErrorKind::Timeout { offset, op, after }
                }
                _ => ReceiveErrorKind::Io { offset, op, error },
            },
            other => other,
        })?;
        self.offset += len;
        Ok(())
    }

    /// After `CLOSE`'s reply: the sender closes its side; anything else is a fault (the
    /// rounds are all applied either way, but a sender that goes on is out of step).
    fn after_close(&mut self) -> Result<(), ReceiveErrorKind> {
        let mut b = [0u8; 1];
        match page_pipe_sys::recv_some(self.stream.as_fd(), &mut b) {
            Ok(n) if n > 0 => Err(ReceiveErrorKind::DataAfterClose {
                offset: self.offset,
            }),
            // The end of the stream; or a sender that keeps its socket open past the idle
            // timeout, which changes nothing received.
            _ => Ok(()),
        }
    }
}
