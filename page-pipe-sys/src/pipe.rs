//! Thin wrappers over `rustix::pipe` that move exact byte counts.

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};

use rustix::io::{Errno, Result};
use rustix::pipe::{IoSliceRaw, PipeFlags, SpliceFlags};

use crate::sizing::UIO_MAXIOV;

/// Both ends of a pipe, each an [`OwnedFd`] opened close-on-exec.
#[derive(Debug)]
pub struct Pipe {
    /// The read end.
    pub read: OwnedFd,
    /// The write end.
    pub write: OwnedFd,
}

/// `pipe2(fds, O_CLOEXEC)`: makes a pipe.
///
/// ```
/// let p = page_pipe_sys::pipe()?;
/// assert!(page_pipe_sys::pipe_capacity(&p.read)? >= 4096);
/// # Ok::<(), page_pipe_sys::Errno>(())
/// ```
///
/// # Errors
/// `EMFILE` or `ENFILE` when out of file descriptors; `ENFILE` also when an unprivileged
/// user is past `pipe-user-pages-hard`.
///
/// # References
/// - [`pipe2(2)`](https://man7.org/linux/man-pages/man2/pipe2.2.html)
pub fn pipe() -> Result<Pipe> {
    let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
    Ok(Pipe { read, write })
}

/// `fcntl(fd, F_GETPIPE_SZ)`: the capacity of the pipe, in bytes.
///
/// # Errors
/// `EBADF` if `fd` is not a pipe.
///
/// # References
/// - [`fcntl(2)`](https://man7.org/linux/man-pages/man2/fcntl.2.html)
pub fn pipe_capacity(fd: impl AsFd) -> Result<usize> {
    rustix::pipe::fcntl_getpipe_size(fd)
}

/// `fcntl(fd, F_SETPIPE_SZ, bytes)`: asks for a capacity of `bytes` and returns the
/// capacity the kernel granted, in bytes (a power of two pages, at least `bytes`).
///
/// ```
/// let p = page_pipe_sys::pipe()?;
/// let ps = page_pipe_sys::page_size().get();
/// assert_eq!(page_pipe_sys::set_pipe_capacity(&p.write, 3 * ps)?, 4 * ps);
/// # Ok::<(), page_pipe_sys::Errno>(())
/// ```
///
/// # Errors
/// `EPERM` above `/proc/sys/fs/pipe-max-size` without `CAP_SYS_RESOURCE`, or past
/// `pipe-user-pages-soft` for an unprivileged user; `EBUSY` when shrinking below what
/// the pipe holds; `ENOMEM`.
///
/// # References
/// - [`fcntl(2)`](https://man7.org/linux/man-pages/man2/fcntl.2.html)
pub fn set_pipe_capacity(fd: impl AsFd, bytes: usize) -> Result<usize> {
    rustix::pipe::fcntl_setpipe_size(fd, bytes)
}

/// `ioctl(fd, FIONREAD)`: the bytes waiting to be read from the pipe.
///
/// ```
/// let p = page_pipe_sys::pipe()?;
/// page_pipe_sys::write_exact(&p.write, b"four").unwrap();
/// assert_eq!(page_pipe_sys::pipe_bytes(&p.read)?, 4);
/// # Ok::<(), page_pipe_sys::Errno>(())
/// ```
///
/// # Errors
/// `EBADF`, `ENOTTY` for a descriptor that is not a pipe or file.
///
/// # References
/// - [`pipe(7)`](https://man7.org/linux/man-pages/man7/pipe.7.html), "I/O on pipes and FIFOs"
pub fn pipe_bytes(fd: impl AsFd) -> Result<usize> {
    rustix::io::ioctl_fionread(fd).map(|n| n as usize)
}

/// What a file descriptor refers to, as far as moving pages into it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// A regular file.
    File,
    /// A pipe or FIFO.
    Pipe,
    /// A Unix domain socket.
    UnixSocket,
    /// An IPv4 or IPv6 socket.
    InetSocket,
    /// Anything else, or a descriptor `fstat` refuses.
    Other,
}

/// `fstat(fd)`, and `getsockname(fd)` for a socket: what `fd` refers to.
///
/// ```
/// use page_pipe_sys::{fd_kind, FdKind};
/// let p = page_pipe_sys::pipe()?;
/// assert_eq!(fd_kind(&p.read), FdKind::Pipe);
/// let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
/// assert_eq!(fd_kind(&a), FdKind::UnixSocket);
/// # Ok::<(), page_pipe_sys::Errno>(())
/// ```
///
/// # References
/// - [`fstat(2)`](https://man7.org/linux/man-pages/man2/fstat.2.html),
///   [`getsockname(2)`](https://man7.org/linux/man-pages/man2/getsockname.2.html)
pub fn fd_kind(fd: impl AsFd) -> FdKind {
    use rustix::fs::FileType;
    let Ok(st) = rustix::fs::fstat(&fd) else {
        return FdKind::Other;
    };
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => FdKind::File,
        FileType::Fifo => FdKind::Pipe,
        FileType::Socket => match rustix::net::getsockname(&fd) {
            Ok(addr) => match addr.address_family() {
                rustix::net::AddressFamily::UNIX => FdKind::UnixSocket,
                rustix::net::AddressFamily::INET | rustix::net::AddressFamily::INET6 => {
                    FdKind::InetSocket
                }
                _ => FdKind::Other,
            },
            Err(_) => FdKind::Other,
        },
        _ => FdKind::Other,
    }
}

/// Why a transfer stopped before moving all it was asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The call failed with this errno (`EAGAIN` on a full or empty pipe in
    /// non-blocking mode, `EFAULT`, `ENOSPC`, `EPIPE`, ...).
    Errno(Errno),
    /// The call returned 0: the source has no more data (a pipe with no writers, or the
    /// end of a file).
    EndOfData,
}

/// A transfer that stopped early: how many bytes it moved, and why it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partial {
    /// Bytes moved before the transfer stopped.
    pub done: usize,
    /// Why it stopped.
    pub stopped: Stopped,
}

impl Partial {
    /// The errno, if the transfer stopped on one.
    pub fn errno(&self) -> Option<Errno> {
        match self.stopped {
            Stopped::Errno(e) => Some(e),
            Stopped::EndOfData => None,
        }
    }
}

impl fmt::Display for Partial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.stopped {
            Stopped::Errno(e) => write!(f, "stopped after {} bytes: {e}", self.done),
            Stopped::EndOfData => write!(f, "stopped after {} bytes: no more data", self.done),
        }
    }
}

impl std::error::Error for Partial {}

/// A transfer that stopped early as an [`std::io::Error`]: the errno it stopped on, or
/// `UnexpectedEof` (naming the bytes moved) when the source ran out of data.
///
/// ```
/// use page_pipe_sys::{Errno, Partial, Stopped};
/// let e = std::io::Error::from(Partial { done: 3, stopped: Stopped::Errno(Errno::PIPE) });
/// assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
/// let e = std::io::Error::from(Partial { done: 3, stopped: Stopped::EndOfData });
/// assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
/// assert!(e.to_string().contains("after 3 bytes"));
/// ```
impl From<Partial> for std::io::Error {
    fn from(p: Partial) -> Self {
        match p.stopped {
            Stopped::Errno(e) => std::io::Error::from(e),
            Stopped::EndOfData => std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("no more data after {} bytes", p.done),
            ),
        }
    }
}

/// Runs `step` until `len` bytes have moved, retrying on `EINTR`.
fn move_exact(
    len: usize,
    mut step: impl FnMut(usize) -> Result<usize>,
) -> std::result::Result<(), Partial> {
    let mut done = 0;
    while done < len {
        match step(len - done) {
            Ok(0) => {
                return Err(Partial {
                    done,
                    stopped: Stopped::EndOfData,
                });
            }
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => {
                return Err(Partial {
                    done,
                    stopped: Stopped::Errno(e),
                });
            }
        }
    }
    Ok(())
}

/// One iovec as the kernel takes it: `len` bytes at `base`. Unlike a slice it makes no
/// promise that the memory is mapped, so memory known only by address can be described
/// without creating a reference to it (the kernel reports `EFAULT` for memory that is
/// not mapped).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawIov {
    /// The first byte.
    pub base: *const u8,
    /// The length in bytes.
    pub len: usize,
}

impl RawIov {
    /// The iovec of a slice.
    pub fn of(buf: &[u8]) -> Self {
        Self {
            base: buf.as_ptr(),
            len: buf.len(),
        }
    }

    fn skip(self, n: usize) -> Self {
        Self {
            base: self.base.wrapping_add(n),
            len: self.len - n,
        }
    }
}

// `RawIov` stands for a `struct iovec`, which rustix's `IoSliceRaw` wraps transparently
// ("guaranteed to be ABI compatible with the iovec type").
const _: () = {
    assert!(std::mem::size_of::<RawIov>() == std::mem::size_of::<IoSliceRaw<'static>>());
    assert!(std::mem::align_of::<RawIov>() == std::mem::align_of::<IoSliceRaw<'static>>());
};

/// `vmsplice(fd, iov, flags)`, repeated: puts all of `bufs` into the pipe whose write end
/// is `write_end`, in order, at most [`UIO_MAXIOV`] iovecs a call, looping on short
/// transfers and `EINTR`. Returns the bytes moved, the sum of the lengths of `bufs`.
///
/// On a kernel that references pages (see [`probe_vmsplice`](crate::probe_vmsplice)) the
/// pipe holds references to the memory, not copies: a later write to the memory shows up
/// when the pipe is read, and the contents survive an unmap of the memory.
///
/// ```
/// use page_pipe_sys::{pipe, vmsplice_all, SpliceFlags};
/// let p = pipe()?;
/// let (a, b) = (*b"hello ", *b"pipe");
/// // SAFETY: `p.write` is a pipe's write end; no GIFT.
/// let n = unsafe { vmsplice_all(&p.write, &[&a[..], &b[..]], SpliceFlags::empty()) }?;
/// assert_eq!(n, 10);
/// let mut out = [0u8; 10];
/// rustix::io::read(&p.read, &mut out)?;
/// assert_eq!(&out, b"hello pipe");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Partial`] with the bytes moved when a call fails: `EAGAIN` when the pipe is full and
/// `flags` has `NONBLOCK`; `EPERM` or `ENOSYS` when a seccomp filter refuses `vmsplice`;
/// `EOPNOTSUPP` from kernels that refuse `SPLICE_F_GIFT`.
///
/// # Safety
/// - `write_end` is the write end of a pipe; on a read end the kernel would write into
///   memory that `bufs` only lends for reading.
/// - With `SpliceFlags::GIFT`, every buffer is page-aligned and a whole number of pages,
///   and nobody modifies that memory while its pages sit in the pipe.
///
/// # References
/// - [`vmsplice(2)`](https://man7.org/linux/man-pages/man2/vmsplice.2.html)
pub unsafe fn vmsplice_all(
    write_end: impl AsFd,
    bufs: &[&[u8]],
    flags: SpliceFlags,
) -> std::result::Result<usize, Partial> {
    let iovs: Vec<RawIov> = bufs.iter().map(|b| RawIov::of(b)).collect();
    // SAFETY: the slices are valid for reads for this call; the rest is this function's
    // contract.
    unsafe { vmsplice_raw(write_end, &iovs, flags) }
}

/// [`vmsplice_all`] over raw iovecs. Memory that is not mapped makes the call stop with
/// `EFAULT` (reported in [`Partial`]) rather than anything worse: only the kernel touches
/// it.
///
/// ```
/// use page_pipe_sys::{pipe, vmsplice_raw, Errno, RawIov, SpliceFlags};
/// let p = pipe()?;
/// // An address nothing is mapped at.
/// let iov = RawIov { base: 8 as *const u8, len: 4096 };
/// // SAFETY: `p.write` is a pipe's write end; no GIFT.
/// let err = unsafe { vmsplice_raw(&p.write, &[iov], SpliceFlags::NONBLOCK) }.unwrap_err();
/// assert_eq!((err.done, err.errno()), (0, Some(Errno::FAULT)));
/// # Ok::<(), Errno>(())
/// ```
///
/// # Errors
/// As [`vmsplice_all`], and `EFAULT` for memory that is not mapped.
///
/// # Safety
/// - `write_end` is the write end of a pipe (the kernel then only reads the memory).
/// - With `SpliceFlags::GIFT`, every iovec is page-aligned and a whole number of pages,
///   and nobody modifies that memory while its pages sit in the pipe.
pub unsafe fn vmsplice_raw(
    write_end: impl AsFd,
    iovs: &[RawIov],
    flags: SpliceFlags,
) -> std::result::Result<usize, Partial> {
    let fd = write_end.as_fd();
    let mut done = 0usize;
    let mut batch: Vec<RawIov> = Vec::with_capacity(iovs.len().min(UIO_MAXIOV));
    // Index of the first iovec not yet fully moved, and how much of it has moved.
    let (mut first, mut skip) = (0usize, 0usize);
    while first < iovs.len() {
        if iovs[first].len == skip {
            first += 1;
            skip = 0;
            continue;
        }
        batch.clear();
        batch.push(iovs[first].skip(skip));
        batch.extend(iovs[first + 1..].iter().take(UIO_MAXIOV - 1));
        let raw = batch.as_slice() as *const [RawIov] as *const [IoSliceRaw<'_>];
        // SAFETY: `RawIov` and `IoSliceRaw` both have the layout of `struct iovec` (checked
        // above) and no invalid values: the cast only renames a live slice's element type.
        let raw = unsafe { &*raw };
        // SAFETY: - `fd` is a pipe's write end (our contract): the kernel only reads memory;
        // - the GIFT obligations are our contract too; - `raw` has at most UIO_MAXIOV iovecs.
        let r = unsafe { rustix::pipe::vmsplice(fd, raw, flags) };
        match r {
            Ok(0) => {
                return Err(Partial {
                    done,
                    stopped: Stopped::EndOfData,
                });
            }
            Ok(mut n) => {
                done += n;
                // Advance (first, skip) by n bytes.
                while n > 0 {
                    let left = iovs[first].len - skip;
                    if n >= left {
                        n -= left;
                        first += 1;
                        skip = 0;
                    } else {
                        skip += n;
                        n = 0;
                    }
                }
            }
            Err(Errno::INTR) => {}
            Err(e) => {
                return Err(Partial {
                    done,
                    stopped: Stopped::Errno(e),
                });
            }
        }
    }
    Ok(done)
}

/// `splice(from, off_in, to, off_out, len, flags)`, repeated until exactly `len` bytes have
/// moved from `from` to `to`. One of the two must be a pipe; the offset of the other may be
/// given (and is advanced), else its file position is used.
///
/// ```
/// use page_pipe_sys::{pipe, splice_exact, SpliceFlags};
/// let (a, b) = (pipe()?, pipe()?);
/// rustix::io::write(&a.write, b"0123456789")?;
/// splice_exact(&a.read, None, &b.write, None, 4, SpliceFlags::empty())?;
/// let mut out = [0u8; 4];
/// rustix::io::read(&b.read, &mut out)?;
/// assert_eq!(&out, b"0123");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Partial`] with the bytes moved: `ENOSPC`, `EFBIG`, `EPIPE` from the destination;
/// `EAGAIN` with `NONBLOCK`; [`Stopped::EndOfData`] when the source runs dry.
///
/// # References
/// - [`splice(2)`](https://man7.org/linux/man-pages/man2/splice.2.html)
pub fn splice_exact(
    from: impl AsFd,
    mut off_in: Option<&mut u64>,
    to: impl AsFd,
    mut off_out: Option<&mut u64>,
    len: usize,
    flags: SpliceFlags,
) -> std::result::Result<(), Partial> {
    let (from, to) = (from.as_fd(), to.as_fd());
    move_exact(len, |left| {
        rustix::pipe::splice(
            from,
            off_in.as_deref_mut(),
            to,
            off_out.as_deref_mut(),
            left,
            flags,
        )
    })
}

/// `tee(from, to, len, flags)`, repeated until exactly `len` bytes of pipe `from` are
/// duplicated into pipe `to`. `from` keeps its data; each call starts again at the
/// beginning of `from`, so this only loops when nothing was duplicated yet.
///
/// ```
/// use page_pipe_sys::{pipe, tee_exact, SpliceFlags};
/// let (a, b) = (pipe()?, pipe()?);
/// rustix::io::write(&a.write, b"abcdef")?;
/// tee_exact(&a.read, &b.write, 6, SpliceFlags::empty())?;
/// let (mut x, mut y) = ([0u8; 6], [0u8; 6]);
/// rustix::io::read(&a.read, &mut x)?;
/// rustix::io::read(&b.read, &mut y)?;
/// assert_eq!(x, y);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Partial`]: `tee` cannot resume from an offset, so a short `tee` (the destination had
/// room for less than `len`) stops with `EAGAIN` and the bytes duplicated so far.
///
/// # References
/// - [`tee(2)`](https://man7.org/linux/man-pages/man2/tee.2.html)
pub fn tee_exact(
    from: impl AsFd,
    to: impl AsFd,
    len: usize,
    flags: SpliceFlags,
) -> std::result::Result<(), Partial> {
    let (from, to) = (from.as_fd(), to.as_fd());
    loop {
        match rustix::pipe::tee(from, to, len, flags) {
            Ok(n) if n == len => return Ok(()),
            Ok(0) if len > 0 => {
                return Err(Partial {
                    done: 0,
                    stopped: Stopped::EndOfData,
                });
            }
            Ok(n) => {
                return Err(Partial {
                    done: n,
                    stopped: Stopped::Errno(Errno::AGAIN),
                });
            }
            Err(Errno::INTR) => {}
            Err(e) => {
                return Err(Partial {
                    done: 0,
                    stopped: Stopped::Errno(e),
                });
            }
        }
    }
}

/// `read(fd, buf)`, repeated until `buf` is full.
///
/// ```
/// let p = page_pipe_sys::pipe()?;
/// page_pipe_sys::write_exact(&p.write, b"12345").unwrap();
/// let mut out = [0u8; 5];
/// page_pipe_sys::read_exact(&p.read, &mut out).unwrap();
/// assert_eq!(&out, b"12345");
/// # Ok::<(), page_pipe_sys::Errno>(())
/// ```
///
/// # Errors
/// [`Partial`] with the bytes read; [`Stopped::EndOfData`] when the source runs dry.
///
/// # References
/// - [`read(2)`](https://man7.org/linux/man-pages/man2/read.2.html)
pub fn read_exact(fd: impl AsFd, buf: &mut [u8]) -> std::result::Result<(), Partial> {
    let fd = fd.as_fd();
    let len = buf.len();
    let mut off = 0;
    move_exact(len, |_| {
        let n = rustix::io::read(fd, &mut buf[off..])?;
        off += n;
        Ok(n)
    })
}

/// `write(fd, buf)`, repeated until all of `buf` is written.
///
/// ```
/// let p = page_pipe_sys::pipe()?;
/// page_pipe_sys::write_exact(&p.write, b"copy")?;
/// let mut out = [0u8; 4];
/// rustix::io::read(&p.read, &mut out)?;
/// assert_eq!(&out, b"copy");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Partial`] with the bytes written.
///
/// # References
/// - [`write(2)`](https://man7.org/linux/man-pages/man2/write.2.html)
pub fn write_exact(fd: impl AsFd, buf: &[u8]) -> std::result::Result<(), Partial> {
    let fd = fd.as_fd();
    let mut off = 0;
    move_exact(buf.len(), |_| {
        let n = rustix::io::write(fd, &buf[off..])?;
        off += n;
        Ok(n)
    })
}
