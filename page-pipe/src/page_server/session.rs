//! One page-server session: the receive buffer, the images being written, what each
//! message does. The rules of what may come when are in `rules`; this is the I/O.

use std::collections::HashSet;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use page_pipe_sys::{Errno, Pipe, SpliceFlags, send_all, splice_some};

use crate::image::{
    CountFields, Image, ImageWriter, MAX_PAGEMAP_BYTES, PageFlags, Pagemap, PagemapEntry,
    PagesAppender, RestoreOptions, SegmentKind, open_regular, pages_name,
};

use super::FIRST_PAGES_ID;
use super::config::{CommittedImage, Layout, ServerConfig, SessionReport};
use super::error::{SessionError, SessionErrorKind, SessionOp};
use super::rules::{Rules, Step};
use super::stream::{Peer, Stream, is_timeout};
use super::wire::{
    Command, Expected, HEADER_LEN, ImageId, ImageKind, Message, WireError, WireErrorKind,
    get_reply, i32_reply, open2_reply,
};

/// The receive buffer of a session: headers come through it, and payload bytes that
/// arrive with them.
const READ_BUF: usize = 64 << 10;
/// Payloads of at least this many bytes (past what is buffered) are spliced from the
/// socket; shorter ones are received into the buffer.
const SPLICE_MIN: u64 = 64 << 10;
/// Bytes of pages read from an image and sent at a time for `GET`.
const GET_CHUNK: usize = 1 << 20;

/// Images and pages files live sessions hold, so that two sessions never write the same
/// image or pages file.
#[derive(Debug, Default)]
pub(super) struct Registry {
    images: HashSet<(PathBuf, ImageId)>,
    pages: HashSet<(PathBuf, u32)>,
}

/// State shared by a server's sessions.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: ServerConfig,
    pub(super) registry: Mutex<Registry>,
    /// The next session number with [`Layout::Chain`].
    pub(super) chain_next: Mutex<u64>,
    pub(super) stopping: AtomicBool,
}

/// An image and its pages id, held by a live session; released when dropped.
#[derive(Debug)]
struct Reservation {
    shared: Arc<Shared>,
    dir: PathBuf,
    image: ImageId,
    pages_id: u32,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut r = self
            .shared
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        r.images.remove(&(self.dir.clone(), self.image));
        r.pages.remove(&(self.dir.clone(), self.pages_id));
    }
}

/// Reads a pagemap image (a regular file, at most [`MAX_PAGEMAP_BYTES`]) and decodes it.
fn read_pagemap(path: &Path, page_size: usize) -> Option<Pagemap> {
    let (file, size) = open_regular(path).ok()?;
    if size > MAX_PAGEMAP_BYTES {
        return None;
    }
    let mut bytes = vec![0u8; size as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, 0).ok()?;
    Pagemap::decode(&bytes, page_size).ok()
}

fn is_regular(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file())
}

impl Shared {
    /// Reserves `image` in `dir` and picks its pages id: the one of the image it
    /// replaces, if that is free; else the lowest from 65537 that no live session holds
    /// and no file in `dir` has.
    fn reserve(self: &Arc<Self>, dir: &Path, image: ImageId) -> Option<Reservation> {
        let mut r = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        if r.images.contains(&(dir.to_path_buf(), image)) {
            return None;
        }
        let free = |r: &Registry, id: u32| !r.pages.contains(&(dir.to_path_buf(), id));
        let old = read_pagemap(&dir.join(image.file_name()), self.config.limits.page_size)
            .map(|pm| pm.pages_id)
            .filter(|&id| free(&r, id));
        let pages_id = old.or_else(|| {
            (FIRST_PAGES_ID..=u32::MAX).find(|&id| {
                free(&r, id) && std::fs::symlink_metadata(dir.join(pages_name(id))).is_err()
            })
        })?;
        r.images.insert((dir.to_path_buf(), image));
        r.pages.insert((dir.to_path_buf(), pages_id));
        Some(Reservation {
            shared: Arc::clone(self),
            dir: dir.to_path_buf(),
            image,
            pages_id,
        })
    }

    /// Numbered subdirectories of the image directory, highest first.
    pub(super) fn chain_dirs(&self) -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(&self.config.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    }
}

/// An image being written by a session.
#[derive(Debug)]
struct Pending {
    image: ImageId,
    dir: PathBuf,
    writer: ImageWriter,
    /// The parent's entries for this image, for checking holes.
    parent: Option<Vec<PagemapEntry>>,
    // Dropped after the writer, so the pages id is free only once its temporary file is
    // gone or committed.
    _reservation: Reservation,
}

/// The first page of `[start, end)` in no entry of `entries` (ascending), if any.
fn first_uncovered(entries: &[PagemapEntry], start: u64, end: u64, ps: u64) -> Option<u64> {
    let mut i = entries.partition_point(|e| e.vaddr + e.pages * ps <= start);
    let mut at = start;
    while at < end {
        match entries.get(i) {
            Some(e) if e.vaddr <= at => {
                at = e.vaddr + e.pages * ps;
                i += 1;
            }
            _ => return Some(at),
        }
    }
    None
}

/// The receive side of a session: a buffer that headers (and payload bytes that came with
/// them) pass through, the byte count, the pipe payloads are spliced through, and the
/// timeouts.
struct Io<'a> {
    stream: &'a Stream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Bytes of the stream consumed.
    offset: u64,
    /// The pipe for splicing and its capacity in bytes, made on first use.
    pipe: Option<(Pipe, usize)>,
    splice: bool,
    idle: Option<Duration>,
    deadline: Option<(Instant, Duration)>,
    shared: &'a Shared,
}

impl<'a> Io<'a> {
    fn new(stream: &'a Stream, shared: &'a Shared) -> Self {
        let c = &shared.config;
        Self {
            stream,
            buf: vec![0u8; READ_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            offset: 0,
            pipe: None,
            splice: true,
            idle: c.idle_timeout,
            deadline: c.session_timeout.map(|t| (Instant::now() + t, t)),
            shared,
        }
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let s = self.start;
        self.start += n;
        self.offset += n as u64;
        &self.buf[s..s + n]
    }

    /// Sets the socket's timeouts for the next call when a session deadline applies.
    fn arm(&self, op: SessionOp) -> Result<(), SessionErrorKind> {
        let Some((deadline, total)) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SessionErrorKind::Timeout {
                offset: self.offset,
                op,
                after: total,
            });
        }
        let t = self.idle.map_or(left, |i| i.min(left));
        self.stream
            .set_timeouts(Some(t))
            .map_err(|error| SessionErrorKind::Io {
                offset: self.offset,
                op,
                error,
            })
    }

    fn fail(&self, op: SessionOp, error: io::Error) -> SessionErrorKind {
        if self.shared.stopping.load(Ordering::Relaxed) {
            return SessionErrorKind::Stopped;
        }
        if is_timeout(&error) {
            let after = match (self.deadline, self.idle) {
                (Some((d, total)), _) if Instant::now() >= d => total,
                (_, Some(i)) => i,
                (Some((_, total)), None) => total,
                (None, None) => Duration::ZERO,
            };
            return SessionErrorKind::Timeout {
                offset: self.offset,
                op,
                after,
            };
        }
        SessionErrorKind::Io {
            offset: self.offset,
            op,
            error,
        }
    }

    /// Receives once into the buffer's free space (moving what is buffered to the front
    /// first when the buffer is full at its end). 0 at the end of the stream.
    fn recv(&mut self, expected: Expected) -> Result<usize, SessionErrorKind> {
        let op = SessionOp::Receive { expected };
        self.arm(op)?;
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        match page_pipe_sys::recv_some(self.stream.as_fd(), &mut self.buf[self.end..]) {
            Ok(n) => {
                self.end += n;
                Ok(n)
            }
            Err(e) => Err(self.fail(op, e.into())),
        }
    }

    /// The next header and its offset; `None` at the end of the stream between messages.
    fn header(&mut self) -> Result<Option<(u64, [u8; HEADER_LEN])>, SessionErrorKind> {
        while self.buffered() < HEADER_LEN {
            if self.recv(Expected::Header)? == 0 {
                if self.shared.stopping.load(Ordering::Relaxed) {
                    return Err(SessionErrorKind::Stopped);
                }
                if self.buffered() == 0 {
                    return Ok(None);
                }
                return Err(SessionErrorKind::Wire(WireError {
                    offset: self.offset,
                    kind: WireErrorKind::Truncated {
                        expected: Expected::Header,
                        needed: HEADER_LEN as u64,
                        got: self.buffered() as u64,
                    },
                }));
            }
        }
        let at = self.offset;
        let h: [u8; HEADER_LEN] = self.take(HEADER_LEN).try_into().expect("32 bytes");
        Ok(Some((at, h)))
    }

    /// The pipe payloads are spliced through, made (and grown to what the kernel grants)
    /// on first use; `None` when no pipe can be had.
    fn pipe(&mut self) -> Option<&(Pipe, usize)> {
        if self.pipe.is_none() {
            let p = page_pipe_sys::pipe().ok()?;
            let want = page_pipe_sys::PipeLimits::get()
                .map(|l| l.max_grant_pages() * l.page_size.get())
                .unwrap_or(0);
            let cap = page_pipe_sys::set_pipe_capacity(&p.write, want)
                .or_else(|_| page_pipe_sys::pipe_capacity(&p.write))
                .ok()?;
            self.pipe = Some((p, cap));
        }
        self.pipe.as_ref()
    }

    /// Moves the entry's `len` bytes of pages from the stream into `a`.
    fn pages_into(
        &mut self,
        a: &mut PagesAppender<'_>,
        len: u64,
        image: ImageId,
    ) -> Result<(), SessionErrorKind> {
        let entry = a.entry();
        let expected = Expected::Pages { entry };
        let image_err = |error| SessionErrorKind::Image {
            image,
            error: Box::new(error),
        };
        let cut = |io: &Self, left: u64| {
            if io.shared.stopping.load(Ordering::Relaxed) {
                return SessionErrorKind::Stopped;
            }
            SessionErrorKind::Wire(WireError {
                offset: io.offset,
                kind: WireErrorKind::Truncated {
                    expected,
                    needed: len,
                    got: len - left,
                },
            })
        };
        let mut left = len;
        while left > 0 {
            let b = (self.buffered() as u64).min(left) as usize;
            if b > 0 {
                a.append_bytes(self.take(b)).map_err(image_err)?;
                left -= b as u64;
                continue;
            }
            if left >= SPLICE_MIN && self.splice && self.pipe().is_some() {
                let op = SessionOp::Receive { expected };
                self.arm(op)?;
                let (pipe, cap) = self.pipe.as_ref().expect("made above");
                let want = (left as usize).min(*cap);
                match splice_some(self.stream.as_fd(), &pipe.write, want, SpliceFlags::empty()) {
                    Ok(0) => return Err(cut(self, left)),
                    Ok(n) => {
                        a.append_from_pipe(pipe.read.as_fd(), n)
                            .map_err(image_err)?;
                        left -= n as u64;
                        self.offset += n as u64;
                    }
                    // This socket cannot splice: receive into the buffer from now on.
                    Err(Errno::INVAL) => self.splice = false,
                    Err(e) => return Err(self.fail(op, e.into())),
                }
                continue;
            }
            if self.recv(expected)? == 0 {
                return Err(cut(self, left));
            }
        }
        Ok(())
    }

    fn send(&mut self, bytes: &[u8], more: bool, op: SessionOp) -> Result<(), SessionErrorKind> {
        self.arm(op)?;
        send_all(self.stream.as_fd(), bytes, more).map_err(|p| self.fail(op, p.into()))
    }
}

/// One session: the rules, the images being written, the I/O.
struct Session<'a> {
    io: Io<'a>,
    shared: &'a Arc<Shared>,
    rules: Rules,
    images: Vec<Pending>,
    /// The index in `images` entries go to.
    current: Option<usize>,
    /// With [`Layout::Chain`]: this session's directory and its parent, once made.
    chain: Option<(PathBuf, Option<PathBuf>)>,
    /// The image chain `GET` reads, by id.
    get_image: Option<(u64, Image)>,
    report: SessionReport,
}

impl Session<'_> {
    /// The directory this session writes into, and the parent directory of its images.
    fn dirs(&mut self) -> Result<(PathBuf, Option<PathBuf>), SessionErrorKind> {
        let c = &self.shared.config;
        match c.layout {
            Layout::Flat => {
                let link = c.dir.join("parent");
                let parent = c.parent.clone().or_else(|| {
                    std::fs::metadata(&link)
                        .is_ok_and(|m| m.is_dir())
                        .then_some(link)
                });
                Ok((c.dir.clone(), parent))
            }
            Layout::Chain => {
                if let Some(d) = &self.chain {
                    return Ok(d.clone());
                }
                let mut next = self
                    .shared
                    .chain_next
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                loop {
                    let n = *next;
                    let dir = c.dir.join(n.to_string());
                    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                        Ok(()) => {
                            // Past u64::MAX the next session finds this one and stops.
                            *next = n.saturating_add(1);
                            let prev = n
                                .checked_sub(1)
                                .filter(|&p| p > 0)
                                .map(|p| c.dir.join(p.to_string()))
                                .filter(|p| p.is_dir());
                            self.chain = Some((dir, prev));
                            return Ok(self.chain.clone().expect("set above"));
                        }
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                            *next =
                                n.checked_add(1)
                                    .ok_or_else(|| SessionErrorKind::ChainFull {
                                        dir: c.dir.clone(),
                                    })?;
                        }
                        Err(error) => return Err(SessionErrorKind::Dir { path: dir, error }),
                    }
                }
            }
        }
    }

    /// Starts writing `image`; returns whether its parent holds it.
    fn open(&mut self, offset: u64, image: ImageId) -> Result<bool, SessionErrorKind> {
        let (dir, parent_dir) = self.dirs()?;
        let c = &self.shared.config;
        let reservation = self
            .shared
            .reserve(&dir, image)
            .ok_or(SessionErrorKind::Busy { offset, image })?;
        let ps = c.limits.page_size;
        let parent = parent_dir
            .as_ref()
            .map(|p| p.join(image.file_name()))
            .filter(|p| is_regular(p))
            .and_then(|p| read_pagemap(&p, ps))
            .map(|pm| pm.entries);
        let image_err = |error| SessionErrorKind::Image {
            image,
            error: Box::new(error),
        };
        let id = reservation.pages_id;
        let w = match image.kind() {
            ImageKind::Pagemap => ImageWriter::create_with_pages_id(&dir, image.id(), id),
            ImageKind::ShmemPagemap => {
                ImageWriter::create_shmem_with_pages_id(&dir, image.id(), id)
            }
        }
        .map_err(image_err)?
        .with_joining(false)
        .with_count_fields(CountFields::Criu4)
        .with_sync(c.sync);
        let w = match &parent_dir {
            Some(p) if p.is_dir() => w.with_parent(p).map_err(image_err)?,
            _ => w,
        };
        let has_parent = parent.is_some();
        self.images.push(Pending {
            image,
            dir,
            writer: w,
            parent,
            _reservation: reservation,
        });
        self.current = Some(self.images.len() - 1);
        Ok(has_parent)
    }

    /// Whether the parent holds `image` (`PARENT`).
    fn parent_has(&mut self, image: ImageId) -> Result<bool, SessionErrorKind> {
        let c = &self.shared.config;
        let parent = match c.layout {
            Layout::Chain if self.chain.is_none() => {
                // Not opened yet: the parent is the newest session's directory.
                self.shared
                    .chain_dirs()
                    .first()
                    .map(|n| c.dir.join(n.to_string()))
            }
            _ => self.dirs()?.1,
        };
        Ok(parent.is_some_and(|p| is_regular(&p.join(image.file_name()))))
    }

    fn entry(
        &mut self,
        offset: u64,
        image: ImageId,
        entry: PagemapEntry,
    ) -> Result<(), SessionErrorKind> {
        let i = self.current.expect("the rules opened it");
        let p = &mut self.images[i];
        debug_assert_eq!(p.image, image);
        let ps = self.shared.config.limits.page_size as u64;
        let image_err = |error| SessionErrorKind::Image {
            image,
            error: Box::new(error),
        };
        if entry.flags == PageFlags::PARENT {
            let Some(parent) = &p.parent else {
                return Err(SessionErrorKind::HoleWithoutParent {
                    offset,
                    image,
                    entry,
                });
            };
            let end = entry.vaddr + entry.pages * ps;
            if let Some(vaddr) = first_uncovered(parent, entry.vaddr, end, ps) {
                return Err(SessionErrorKind::HoleNotInParent {
                    offset,
                    image,
                    entry,
                    vaddr,
                });
            }
        }
        if entry.is_present() {
            let mut a = p.writer.begin_pages(entry).map_err(image_err)?;
            self.io.pages_into(&mut a, entry.pages * ps, image)?;
            a.finish().map_err(image_err)
        } else {
            p.writer.push(entry).map_err(image_err)
        }
    }

    /// The directory `GET` reads image `id` from.
    fn get_dir(&self, id: u64) -> PathBuf {
        let c = &self.shared.config;
        match c.layout {
            Layout::Flat => c.dir.clone(),
            Layout::Chain => {
                let name = crate::image::pagemap_name(id);
                self.shared
                    .chain_dirs()
                    .into_iter()
                    .map(|n| c.dir.join(n.to_string()))
                    .find(|d| is_regular(&d.join(&name)))
                    .unwrap_or_else(|| c.dir.clone())
            }
        }
    }

    fn get(
        &mut self,
        offset: u64,
        id: u64,
        vaddr: u64,
        pages: u64,
    ) -> Result<(), SessionErrorKind> {
        let get_err = |error| SessionErrorKind::GetImage {
            offset,
            id,
            error: Box::new(error),
        };
        if self.get_image.as_ref().is_none_or(|(i, _)| *i != id) {
            self.get_image = None;
            let img = Image::open_id(self.get_dir(id), id).map_err(get_err)?;
            self.get_image = Some((id, img));
        }
        let (_, img) = self.get_image.as_ref().expect("opened above");
        let limits = self.shared.config.limits;
        let ps = limits.page_size as u64;
        let want = pages.min(limits.max_payload_pages);
        let plan = img
            .plan(vaddr, want * ps, &RestoreOptions::default())
            .map_err(get_err)?;
        let held: u64 = plan
            .segments
            .iter()
            .take_while(|s| matches!(s.kind, SegmentKind::Pages { .. }))
            .map(|s| s.len / ps)
            .sum();
        if held == 0 {
            return Err(SessionErrorKind::GetMissing { offset, id, vaddr });
        }
        let op = SessionOp::SendPages { id, vaddr };
        self.io.send(&get_reply(id, vaddr, held), true, op)?;
        let mut buf = vec![0u8; (held * ps).min(GET_CHUNK as u64) as usize];
        let mut done = 0u64;
        while done < held {
            let n = (held - done).min(buf.len() as u64 / ps);
            let chunk = &mut buf[..(n * ps) as usize];
            let (_, img) = self.get_image.as_ref().expect("opened above");
            img.read(vaddr + done * ps, chunk).map_err(get_err)?;
            done += n;
            self.io.send(chunk, done < held, op)?;
        }
        self.report.pages_served += held;
        Ok(())
    }

    /// Commits the images, replies with the status, and (unless `force`) waits for the
    /// end of the stream.
    fn close(&mut self, force: bool) -> Result<(), SessionErrorKind> {
        // Everything that can fail for want of space or for what sits at an image's
        // name, for every image, before any image is committed.
        let mut failure = self.images.iter_mut().find_map(|p| {
            p.writer
                .prepare()
                .err()
                .map(|error| SessionErrorKind::Image {
                    image: p.image,
                    error: Box::new(error),
                })
        });
        for p in self.images.drain(..) {
            if failure.is_some() {
                continue;
            }
            let (image, dir, pages_id) = (p.image, p.dir.clone(), p.writer.pages_id());
            match p.writer.finish() {
                Ok(summary) => self.report.images.push(CommittedImage {
                    image,
                    dir,
                    pages_id,
                    summary,
                }),
                Err(error) => {
                    failure = Some(SessionErrorKind::Image {
                        image,
                        error: Box::new(error),
                    })
                }
            }
        }
        self.current = None;
        let status = if failure.is_some() { -1 } else { 0 };
        let command = if force {
            Command::ForceClose
        } else {
            Command::Close
        };
        let sent = self
            .io
            .send(&i32_reply(status), false, SessionOp::Reply { command });
        if let Some(f) = failure {
            return Err(f);
        }
        sent?;
        self.report.forced = force;
        if force {
            return Ok(());
        }
        // As CRIU: the client closes first (no TIME_WAIT here); nothing may come before.
        if self.io.buffered() > 0 || self.io.recv(Expected::EndOfStream)? > 0 {
            return Err(SessionErrorKind::DataAfterClose {
                offset: self.io.offset,
            });
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), SessionErrorKind> {
        let limits = self.shared.config.limits;
        loop {
            let Some((offset, head)) = self.io.header()? else {
                return Err(SessionErrorKind::NotClosed {
                    offset: self.io.offset,
                });
            };
            let m = Message::decode(&head, &limits)
                .map_err(|kind| SessionErrorKind::Wire(WireError { offset, kind }))?;
            self.report.messages += 1;
            let step = self
                .rules
                .step(&m)
                .map_err(|error| SessionErrorKind::Rules { offset, error })?;
            match step {
                Step::Open { image, reply } => {
                    let has_parent = self.open(offset, image)?;
                    if reply {
                        let op = SessionOp::Reply {
                            command: Command::Open2,
                        };
                        self.io.send(&open2_reply(has_parent), false, op)?;
                    }
                }
                Step::Parent { image } => {
                    let has = self.parent_has(image)?;
                    let op = SessionOp::Reply {
                        command: Command::Parent,
                    };
                    self.io.send(&i32_reply(i32::from(has)), false, op)?;
                }
                Step::Entry { image, entry, open } => {
                    if open {
                        self.open(offset, image)?;
                    }
                    self.entry(offset, image, entry)?;
                }
                Step::Get { id, vaddr, pages } => self.get(offset, id, vaddr, pages)?,
                Step::Close { force } => return self.close(force),
            }
        }
    }
}

/// Serves one session on `stream`.
pub(super) fn serve_session(
    stream: &Stream,
    peer: Peer,
    shared: &Arc<Shared>,
) -> Result<SessionReport, SessionError> {
    let c = &shared.config;
    let fail = |kind| SessionError {
        peer: peer.clone(),
        kind,
    };
    stream.set_timeouts(c.idle_timeout).map_err(|error| {
        fail(SessionErrorKind::Io {
            offset: 0,
            op: SessionOp::Receive {
                expected: Expected::Header,
            },
            error,
        })
    })?;
    let mut s = Session {
        io: Io::new(stream, shared),
        shared,
        rules: Rules::new(c.max_images, c.limits.page_size),
        images: Vec::new(),
        current: None,
        chain: None,
        get_image: None,
        report: SessionReport {
            peer: peer.clone(),
            images: Vec::new(),
            messages: 0,
            bytes: 0,
            pages_served: 0,
            forced: false,
        },
    };
    let r = s.run();
    s.report.bytes = s.io.offset;
    // A chain directory the session left empty goes (it fails unless empty).
    if let Some((dir, _)) = &s.chain {
        s.images.clear();
        let _ = std::fs::remove_dir(dir);
    }
    match r {
        Ok(()) => Ok(s.report),
        Err(kind) => Err(fail(kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_covered_by_consecutive_parent_entries() {
        let ps = 4096;
        let e = |v: u64, n: u64| PagemapEntry {
            vaddr: v * ps,
            pages: n,
            flags: PageFlags::PRESENT,
        };
        let parent = [e(10, 2), e(12, 3), e(20, 1)];
        assert_eq!(first_uncovered(&parent, 10 * ps, 15 * ps, ps), None);
        assert_eq!(
            first_uncovered(&parent, 11 * ps, 16 * ps, ps),
            Some(15 * ps)
        );
        assert_eq!(first_uncovered(&parent, 9 * ps, 11 * ps, ps), Some(9 * ps));
        assert_eq!(first_uncovered(&parent, 20 * ps, 21 * ps, ps), None);
        assert_eq!(first_uncovered(&[], 0, ps, ps), Some(0));
    }
}
