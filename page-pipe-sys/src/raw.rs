//! I/O on memory known only by address: memory that others may write at any time (a
//! guest's RAM, pages of a running program), which Rust code must never see as a `&[u8]`
//! (that would be a data race). The kernel reads it for `write`/`pwrite`, and
//! [`copy_from_raw`] reads it with volatile loads.
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
            // SAFETY:
            // - `fd` is an open descriptor borrowed for this call;
            // - the kernel only reads `len` bytes at `base` (an unmapped address gives
            //   EFAULT), so no Rust reference to that memory is made or needed.
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
        // SAFETY:
        // - `src + 8 * i .. + 8` is within the `dst.len()` readable bytes (the caller's
        //   promise);
        // - a `[u8; 8]` has alignment 1, so any address is aligned for it.
        let w = unsafe { std::ptr::read_volatile(src.add(8 * i).cast::<[u8; 8]>()) };
        chunk.copy_from_slice(&w);
    }
    for (i, b) in tail.iter_mut().enumerate() {
        // SAFETY: within the readable bytes, as above.
        *b = unsafe { std::ptr::read_volatile(src.add(8 * words + i)) };
    }
}
