//! I/O on memory known only by address: memory that others may write at any time (a
//! guest's RAM, pages of a running program), which Rust code must never see as a `&[u8]`
//! (that would be a data race). The kernel reads it for `write`/`pwrite`, writes it for
//! `read`/`pread` ([`read_raw_exact`]), and [`copy_from_raw`] reads it with volatile
//! loads.
//!
//! `rustix` takes buffers as slices only, so these wrappers call `libc` with the raw
//! iovecs instead; that is why `libc` is a dependency of this crate.

use std::os::fd::{AsFd, AsRawFd};

use rustix::io::Errno;

use crate::pipe::{Partial, RawIov, Stopped};

fn last_errno() -> Errno {
    Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// `write(fd, iov.base, iov.len)`, repeated until all of it is written (or
/// `pwrite(fd, .., offset)` from `offset` on, when given). The kernel reads the memory;
/// memory that is not mapped gives `EFAULT`, nothing worse, and memory written by others
/// meanwhile gives whatever bytes the kernel found.
///
/// ```
/// use page_pipe_sys::{write_raw_exact, RawIov};
/// let p = page_pipe_sys::pipe()?;
/// let data = *b"raw";
/// write_raw_exact(&p.write, RawIov { base: data.as_ptr(), len: 3 }, None).unwrap();
/// let mut out = [0u8; 3];
/// rustix::io::read(&p.read, &mut out)?;
/// assert_eq!(&out, b"raw");
/// // Nothing is mapped at address 8: an error, not a crash.
/// let bad = RawIov { base: 8 as *const u8, len: 1 };
/// assert_eq!(write_raw_exact(&p.write, bad, None).unwrap_err().errno(), Some(page_pipe_sys::Errno::FAULT));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Partial`] with the bytes written when a call fails (`EFAULT`, `ENOSPC`, `EPIPE`,
/// `EAGAIN` on a non-blocking fd, ...) or writes nothing.
///
/// # References
/// - [`write(2)`](https://man7.org/linux/man-pages/man2/write.2.html),
///   [`pwrite(2)`](https://man7.org/linux/man-pages/man2/pwrite.2.html)
pub fn write_raw_exact(
    fd: impl AsFd,
    iov: RawIov,
    offset: Option<u64>,
) -> std::result::Result<(), Partial> {
    let fd = fd.as_fd().as_raw_fd();
    let mut done = 0usize;
    while done < iov.len {
        let base = iov.base.wrapping_add(done).cast::<libc::c_void>();
        let len = (iov.len - done).min(0x7fff_f000);
        let n = match offset {
            // SAFETY: - `fd` is an open descriptor borrowed for this call;
            // - the kernel only reads `len` bytes at `base` (unmapped: EFAULT), no reference.
            None => unsafe { libc::write(fd, base, len) },
            Some(off) => {
                let Ok(at) = libc::off_t::try_from(off + done as u64) else {
                    return Err(Partial {
                        done,
                        stopped: Stopped::Errno(Errno::FBIG),
                    });
                };
                // SAFETY: as for `write` above; `at` is a file offset.
                unsafe { libc::pwrite(fd, base, len, at) }
            }
        };
        match n {
            0 => {
                return Err(Partial {
                    done,
                    stopped: Stopped::Errno(Errno::IO),
                });
            }
            n if n > 0 => done += n as usize,
            _ => {
                let e = last_errno();
                if e != Errno::INTR {
                    return Err(Partial {
                        done,
                        stopped: Stopped::Errno(e),
                    });
                }
            }
        }
    }
    Ok(())
}

/// `read(fd, dst, len)`, repeated until `len` bytes are read (or `pread(fd, .., offset)`
/// from `offset` on, when given), in calls of at most `0x7fff_f000` bytes, retrying on
/// `EINTR`. The kernel writes the memory: no Rust reference to it is made, so memory that
/// others may read or write meanwhile (a guest's RAM) can be filled this way.
///
/// ```
/// use page_pipe_sys::{read_raw_exact, Stopped};
/// let p = page_pipe_sys::pipe()?;
/// page_pipe_sys::write_exact(&p.write, b"raw").unwrap();
/// let mut out = [0u8; 3];
/// // SAFETY: `out` is ours, writable for 3 bytes, and no reference to it is used during the call.
/// unsafe { read_raw_exact(&p.read, out.as_mut_ptr(), 3, None) }.unwrap();
/// assert_eq!(&out, b"raw");
/// drop(p.write);
/// // SAFETY: as above.
/// let end = unsafe { read_raw_exact(&p.read, out.as_mut_ptr(), 1, None) }.unwrap_err();
/// assert_eq!((end.done, end.stopped), (0, Stopped::EndOfData));
/// // Nothing is mapped at address 8: an error from the kernel, not a write.
/// let p = page_pipe_sys::pipe()?;
/// page_pipe_sys::write_exact(&p.write, b"x").unwrap();
/// // SAFETY: address 8 is never mapped (below `mmap_min_addr`), so the kernel refuses.
/// let bad = unsafe { read_raw_exact(&p.read, 8 as *mut u8, 1, None) }.unwrap_err();
/// assert_eq!(bad.errno(), Some(page_pipe_sys::Errno::FAULT));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Partial`] with the bytes read: [`Stopped::EndOfData`] when the source ends first (a
/// file shorter than `offset + len`, a pipe with no writer left), or the errno (`EFAULT`
/// for memory that is not mapped, `EAGAIN` on an empty non-blocking pipe, ...).
///
/// # Safety
/// - the `len` bytes at `dst` are memory the caller may let the kernel write (mapped
///   writable or not mapped at all, which gives `EFAULT`), and writing any bytes there
///   breaks no invariant of anyone's (it is not memory of Rust values);
/// - no Rust reference to them that assumes they do not change is used during the call.
///
/// # References
/// - [`read(2)`](https://man7.org/linux/man-pages/man2/read.2.html),
///   [`pread(2)`](https://man7.org/linux/man-pages/man2/pread.2.html)
pub unsafe fn read_raw_exact(
    fd: impl AsFd,
    dst: *mut u8,
    len: usize,
    offset: Option<u64>,
) -> std::result::Result<(), Partial> {
    let fd = fd.as_fd().as_raw_fd();
    let mut done = 0usize;
    while done < len {
        let base = dst.wrapping_add(done).cast::<libc::c_void>();
        let n = (len - done).min(0x7fff_f000);
        let got = match offset {
            // SAFETY: - `fd` is an open descriptor borrowed for this call;
            // - the kernel writes at most `n` bytes at `base`, inside what the caller allows.
            None => unsafe { libc::read(fd, base, n) },
            Some(off) => {
                // An offset past `off_t` is one the kernel refuses with EINVAL.
                let at = off.checked_add(done as u64).map(libc::off_t::try_from);
                let Some(Ok(at)) = at else {
                    return Err(Partial {
                        done,
                        stopped: Stopped::Errno(Errno::INVAL),
                    });
                };
                // SAFETY: as for `read` above; `at` is a file offset.
                unsafe { libc::pread(fd, base, n, at) }
            }
        };
        match got {
            0 => {
                return Err(Partial {
                    done,
                    stopped: Stopped::EndOfData,
                });
            }
            got if got > 0 => done += got as usize,
            _ => {
                let e = last_errno();
                if e != Errno::INTR {
                    return Err(Partial {
                        done,
                        stopped: Stopped::Errno(e),
                    });
                }
            }
        }
    }
    Ok(())
}

/// `recv(fd, dst, len, MSG_WAITALL)`, repeated until `len` bytes are received, retrying
/// on `EINTR`: the kernel writes the memory, as [`read_raw_exact`] does, but each call
/// waits for the whole rest (or a signal, the socket's timeout, its end), so a large
/// payload arrives in few calls and wake-ups rather than one per segment.
///
/// ```
/// use std::io::Write;
/// let (mut a, b) = std::os::unix::net::UnixStream::pair()?;
/// let writer = std::thread::spawn(move || {
///     a.write_all(b"ra")?;
///     std::thread::sleep(std::time::Duration::from_millis(10));
///     a.write_all(b"w")
/// });
/// let mut out = [0u8; 3];
/// // SAFETY: `out` is ours, writable for 3 bytes, and no reference to it is used during the call.
/// unsafe { page_pipe_sys::recv_raw_exact(&b, out.as_mut_ptr(), 3) }.unwrap();
/// assert_eq!(&out, b"raw");
/// writer.join().unwrap()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Partial`] with the bytes received: [`Stopped::EndOfData`] when the peer closed
/// first, or the errno (`EAGAIN` when `SO_RCVTIMEO` ran out, `ECONNRESET`, `EFAULT` for
/// memory that is not mapped, `ENOTSOCK` for a descriptor that is no socket).
///
/// # Safety
/// As [`read_raw_exact`]: the `len` bytes at `dst` are memory the caller may let the
/// kernel write, and no Rust reference to them that assumes they do not change is used
/// during the call.
///
/// # References
/// - [`recv(2)`](https://man7.org/linux/man-pages/man2/recv.2.html)
pub unsafe fn recv_raw_exact(
    fd: impl AsFd,
    dst: *mut u8,
    len: usize,
) -> std::result::Result<(), Partial> {
    let fd = fd.as_fd().as_raw_fd();
    let mut done = 0usize;
    while done < len {
        let base = dst.wrapping_add(done).cast::<libc::c_void>();
        let n = (len - done).min(0x7fff_f000);
        // SAFETY: - `fd` is an open descriptor borrowed for this call;
        // - the kernel writes at most `n` bytes at `base`, inside what the caller allows.
        let got = unsafe { libc::recv(fd, base, n, libc::MSG_WAITALL) };
        match got {
            0 => {
                return Err(Partial {
                    done,
                    stopped: Stopped::EndOfData,
                });
            }
            got if got > 0 => done += got as usize,
            _ => {
                let e = last_errno();
                if e != Errno::INTR {
                    return Err(Partial {
                        done,
                        stopped: Stopped::Errno(e),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Copies `dst.len()` bytes from `src` into `dst` with volatile loads: each byte is read
/// from memory once, whatever the compiler knows, so memory that others write meanwhile
/// gives some mix of old and new bytes, never undefined behaviour.
///
/// ```
/// let src = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
/// let mut dst = [0u8; 9];
/// // SAFETY: `src` is readable for 9 bytes during the call.
/// unsafe { page_pipe_sys::copy_from_raw(&mut dst, src.as_ptr()) };
/// assert_eq!(dst, src);
/// ```
///
/// # Safety
/// - `dst.len()` bytes at `src` are mapped and readable during the call;
/// - they do not overlap `dst`.
pub unsafe fn copy_from_raw(dst: &mut [u8], src: *const u8) {
    let words = dst.len() / 8;
    let (head, tail) = dst.split_at_mut(words * 8);
    for (i, chunk) in head.chunks_exact_mut(8).enumerate() {
        // SAFETY: - `src + 8 * i .. + 8` is within the readable bytes (caller's promise);
        // - a `[u8; 8]` has alignment 1, so any address is aligned for it.
        let w = unsafe { std::ptr::read_volatile(src.add(8 * i).cast::<[u8; 8]>()) };
        chunk.copy_from_slice(&w);
    }
    for (i, b) in tail.iter_mut().enumerate() {
        // SAFETY: within the readable bytes, as above.
        *b = unsafe { std::ptr::read_volatile(src.add(8 * words + i)) };
    }
}

/// `send(fd, iov.base, iov.len, MSG_NOSIGNAL [| MSG_MORE])`, repeated until all of it is
/// sent: memory known only by address (which others may write meanwhile) into a socket,
/// without `SIGPIPE` when the peer went away. The kernel reads the memory.
///
/// ```
/// use std::io::Read;
/// let (a, mut b) = std::os::unix::net::UnixStream::pair()?;
/// let data = *b"raw";
/// page_pipe_sys::send_raw_exact(&a, page_pipe_sys::RawIov { base: data.as_ptr(), len: 3 }, false).unwrap();
/// let mut out = [0u8; 3];
/// b.read_exact(&mut out)?;
/// assert_eq!(&out, b"raw");
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
/// [`Partial`] with the bytes sent: `EPIPE`, `ECONNRESET`, `EFAULT`, `EAGAIN` when
/// `SO_SNDTIMEO` ran out.
///
/// # References
/// - [`send(2)`](https://man7.org/linux/man-pages/man2/send.2.html)
pub fn send_raw_exact(fd: impl AsFd, iov: RawIov, more: bool) -> std::result::Result<(), Partial> {
    let fd = fd.as_fd().as_raw_fd();
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    let mut done = 0usize;
    while done < iov.len {
        let base = iov.base.wrapping_add(done).cast::<libc::c_void>();
        // SAFETY:
        // - `fd` is an open descriptor borrowed for this call;
        // - the kernel only reads the bytes at `base` (an unmapped address gives EFAULT).
        let n = unsafe { libc::send(fd, base, iov.len - done, flags) };
        match n {
            0 => {
                return Err(Partial {
                    done,
                    stopped: Stopped::EndOfData,
                });
            }
            n if n > 0 => done += n as usize,
            _ => {
                let e = last_errno();
                if e != Errno::INTR {
                    return Err(Partial {
                        done,
                        stopped: Stopped::Errno(e),
                    });
                }
            }
        }
    }
    Ok(())
}
