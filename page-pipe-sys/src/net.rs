//! Socket calls for streaming pages: `send` and `sendmsg` that never raise `SIGPIPE`
//! (and may hold the data back for more with `MSG_MORE`), `recv`, and single `splice`
//! calls from a socket into a pipe, each retried on `EINTR`.
//!
//! A socket's `SO_RCVTIMEO`/`SO_SNDTIMEO` apply to all of them: a call that times out
//! fails with `EAGAIN` (which is `EWOULDBLOCK` on Linux).

use std::io::IoSlice;
use std::os::fd::AsFd;

use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};
use rustix::pipe::SpliceFlags;

use crate::pipe::{Partial, Stopped};

fn send_flags(more: bool) -> SendFlags {
    if more {
        SendFlags::NOSIGNAL | SendFlags::MORE
    } else {
        SendFlags::NOSIGNAL
    }
}

/// `send(fd, buf, MSG_NOSIGNAL [| MSG_MORE])`, repeated until all of `buf` is sent. With
/// `more`, the kernel may hold the bytes back until data sent without it follows (TCP
/// sends full segments); a peer that went away gives `EPIPE`, never a signal.
///
/// ```
/// use std::io::Read;
/// let (a, mut b) = std::os::unix::net::UnixStream::pair()?;
/// page_pipe_sys::send_all(&a, b"header", true).unwrap();
/// page_pipe_sys::send_all(&a, b"+pages", false).unwrap();
/// let mut out = [0u8; 12];
/// b.read_exact(&mut out)?;
/// assert_eq!(&out, b"header+pages");
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
/// [`Partial`] with the bytes sent: `EPIPE` or `ECONNRESET` when the peer went away,
/// `EAGAIN` when `SO_SNDTIMEO` ran out.
///
/// # References
/// - [`send(2)`](https://man7.org/linux/man-pages/man2/send.2.html)
pub fn send_all(fd: impl AsFd, buf: &[u8], more: bool) -> Result<(), Partial> {
    let fd = fd.as_fd();
    let mut done = 0;
    while done < buf.len() {
        match rustix::net::send(fd, &buf[done..], send_flags(more)) {
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

/// `sendmsg(fd, bufs, MSG_NOSIGNAL [| MSG_MORE])`, repeated until all of `bufs` is sent:
/// several buffers (a header and its pages, say) in as few calls as the socket takes.
///
/// ```
/// use std::io::{IoSlice, Read};
/// let (a, mut b) = std::os::unix::net::UnixStream::pair()?;
/// page_pipe_sys::send_vectored_all(&a, &[IoSlice::new(b"one"), IoSlice::new(b"two")], false).unwrap();
/// let mut out = [0u8; 6];
/// b.read_exact(&mut out)?;
/// assert_eq!(&out, b"onetwo");
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
/// As [`send_all`].
///
/// # References
/// - [`sendmsg(2)`](https://man7.org/linux/man-pages/man2/sendmsg.2.html)
pub fn send_vectored_all(fd: impl AsFd, bufs: &[IoSlice<'_>], more: bool) -> Result<(), Partial> {
    let fd = fd.as_fd();
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut done = 0;
    // The buffers not sent yet: the first one cut at `skip`.
    let (mut first, mut skip) = (0, 0);
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(bufs.len());
    while done < total {
        iov.clear();
        iov.push(IoSlice::new(&bufs[first][skip..]));
        iov.extend(bufs[first + 1..].iter().map(|b| IoSlice::new(b)));
        let r = rustix::net::sendmsg(
            fd,
            &iov,
            &mut rustix::net::SendAncillaryBuffer::default(),
            send_flags(more),
        );
        let mut n = match r {
            Ok(0) => {
                return Err(Partial {
                    done,
                    stopped: Stopped::EndOfData,
                });
            }
            Ok(n) => n,
            Err(Errno::INTR) => continue,
            Err(e) => {
                return Err(Partial {
                    done,
                    stopped: Stopped::Errno(e),
                });
            }
        };
        done += n;
        while n > 0 && first < bufs.len() {
            let left = bufs[first].len() - skip;
            if n < left {
                skip += n;
                n = 0;
            } else {
                n -= left;
                first += 1;
                skip = 0;
            }
        }
        // Skip empty buffers, so that the next call starts with bytes to send.
        while first < bufs.len() && bufs[first].len() == skip {
            first += 1;
            skip = 0;
        }
    }
    Ok(())
}

/// `recv(fd, buf, 0)`, once (retried on `EINTR`): the bytes received, at least one, or 0
/// when the peer closed its side.
///
/// ```
/// use std::io::Write;
/// let (mut a, b) = std::os::unix::net::UnixStream::pair()?;
/// a.write_all(b"abc")?;
/// drop(a);
/// let mut buf = [0u8; 8];
/// assert_eq!(page_pipe_sys::recv_some(&b, &mut buf)?, 3);
/// assert_eq!(page_pipe_sys::recv_some(&b, &mut buf)?, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// The errno: `ECONNRESET`, `EAGAIN` when `SO_RCVTIMEO` ran out.
///
/// # References
/// - [`recv(2)`](https://man7.org/linux/man-pages/man2/recv.2.html)
pub fn recv_some(fd: impl AsFd, buf: &mut [u8]) -> rustix::io::Result<usize> {
    let fd = fd.as_fd();
    loop {
        match rustix::net::recv(fd, &mut *buf, RecvFlags::empty()) {
            Ok((n, _)) => return Ok(n),
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// `splice(from, NULL, to, NULL, len, flags)`, once (retried on `EINTR`): moves at most
/// `len` bytes, as many as are there, from a socket into a pipe (or between any pair
/// with a pipe on one side). Returns the bytes moved, 0 at the end of the data.
///
/// From a TCP socket the pipe gets references to the socket's buffers rather than
/// copies. The call stops short when the pipe's slots run out before `len` bytes, so a
/// caller that empties the pipe between calls never blocks on it.
///
/// ```
/// use std::io::Write;
/// use page_pipe_sys::{pipe, splice_some, SpliceFlags};
/// let (mut a, b) = std::os::unix::net::UnixStream::pair()?;
/// a.write_all(b"pages")?;
/// let p = pipe()?;
/// assert_eq!(splice_some(&b, &p.write, 4096, SpliceFlags::empty())?, 5);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// The errno: `EINVAL` when neither side is a pipe or the source cannot splice,
/// `EAGAIN` when `SO_RCVTIMEO` ran out or with `SPLICE_F_NONBLOCK`.
///
/// # References
/// - [`splice(2)`](https://man7.org/linux/man-pages/man2/splice.2.html)
pub fn splice_some(
    from: impl AsFd,
    to: impl AsFd,
    len: usize,
    flags: SpliceFlags,
) -> rustix::io::Result<usize> {
    let (from, to) = (from.as_fd(), to.as_fd());
    loop {
        match rustix::pipe::splice(from, None, to, None, len, flags) {
            Ok(n) => return Ok(n),
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// `poll(fds, POLLIN, timeout)`, retried on `EINTR` (with the full timeout again):
/// which of `fds` are readable (or closed, or in error), `None` for no timeout. All
/// `false` when the timeout ran out.
///
/// ```
/// use std::io::Write;
/// use std::os::fd::AsFd;
/// use std::time::Duration;
/// let (mut a, b) = std::os::unix::net::UnixStream::pair()?;
/// let quiet = page_pipe_sys::poll_readable(&[b.as_fd()], Some(Duration::from_millis(1)))?;
/// assert_eq!(quiet, [false]);
/// a.write_all(b"x")?;
/// assert_eq!(page_pipe_sys::poll_readable(&[b.as_fd()], None)?, [true]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// The errno (`ENOMEM`, `EINVAL` for too many descriptors).
///
/// # References
/// - [`poll(2)`](https://man7.org/linux/man-pages/man2/poll.2.html)
pub fn poll_readable(
    fds: &[std::os::fd::BorrowedFd<'_>],
    timeout: Option<std::time::Duration>,
) -> rustix::io::Result<Vec<bool>> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(fd, PollFlags::IN))
        .collect();
    let ts = timeout.map(|t| Timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    loop {
        match rustix::event::poll(&mut pfds, ts.as_ref()) {
            Ok(_) => break,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(pfds.iter().map(|p| !p.revents().is_empty()).collect())
}

/// What [`poll_ready`] waits for on one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interest {
    /// `POLLIN`: data to read (or the end of the stream).
    pub read: bool,
    /// `POLLOUT`: room to write.
    pub write: bool,
}

/// What [`poll_ready`] found on one descriptor. A descriptor closed or in error
/// (`POLLHUP`, `POLLERR`, `POLLNVAL`) is both, so that the next call on it reports why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ready {
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
}

/// `poll(fds, POLLIN and/or POLLOUT, timeout)`, retried on `EINTR` (with the full timeout
/// again): which of `fds` are ready for what was asked, `None` for no timeout. All not
/// ready when the timeout ran out. A descriptor asked for nothing is still reported
/// ready when closed or in error.
///
/// ```
/// use std::os::fd::AsFd;
/// use std::time::Duration;
/// use page_pipe_sys::{poll_ready, Interest};
/// let (a, b) = std::os::unix::net::UnixStream::pair()?;
/// let both = Interest { read: true, write: true };
/// let r = poll_ready(&[(a.as_fd(), both)], Some(Duration::from_millis(1)))?;
/// assert!(r[0].write && !r[0].read);
/// drop(b);
/// assert!(poll_ready(&[(a.as_fd(), both)], None)?[0].read);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// The errno (`ENOMEM`, `EINVAL` for too many descriptors).
///
/// # References
/// - [`poll(2)`](https://man7.org/linux/man-pages/man2/poll.2.html)
pub fn poll_ready(
    fds: &[(std::os::fd::BorrowedFd<'_>, Interest)],
    timeout: Option<std::time::Duration>,
) -> rustix::io::Result<Vec<Ready>> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|(fd, i)| {
            let mut f = PollFlags::empty();
            if i.read {
                f |= PollFlags::IN;
            }
            if i.write {
                f |= PollFlags::OUT;
            }
            PollFd::new(fd, f)
        })
        .collect();
    let ts = timeout.map(|t| Timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    loop {
        match rustix::event::poll(&mut pfds, ts.as_ref()) {
            Ok(_) => break,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(pfds
        .iter()
        .map(|p| {
            let r = p.revents();
            let bad = r.intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL);
            Ready {
                read: bad || r.contains(PollFlags::IN),
                write: bad || r.contains(PollFlags::OUT),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn vectored_sends_resume_inside_a_buffer_after_a_short_send() {
        let (a, mut b) = UnixStream::pair().unwrap();
        // Larger than the socket buffer, so that sendmsg comes back short at least once
        // while the reader drains.
        let big = vec![7u8; 4 << 20];
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            b.read_to_end(&mut all).unwrap();
            all
        });
        let bufs = [
            IoSlice::new(b"head"),
            IoSlice::new(&[]),
            IoSlice::new(&big),
            IoSlice::new(b"tail"),
        ];
        send_vectored_all(&a, &bufs, false).unwrap();
        drop(a);
        let all = reader.join().unwrap();
        assert_eq!(all.len(), 8 + big.len());
        assert_eq!(&all[..4], b"head");
        assert_eq!(&all[all.len() - 4..], b"tail");
        assert!(all[4..all.len() - 4].iter().all(|&x| x == 7));
    }

    #[test]
    fn a_closed_peer_is_epipe_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let e = send_all(&a, b"x", false).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::PIPE));
        assert_eq!(e.done, 0);
    }
}
