//! Run-time probe: does `vmsplice` reference pages or copy them here?

use std::fmt;

use rustix::io::Errno;
use rustix::pipe::SpliceFlags;

use crate::pipe::{Partial, pipe, vmsplice_all};

/// What `vmsplice` into a pipe does with user memory on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmspliceMode {
    /// The pipe references the pages: a write to the memory after the call shows up when
    /// the pipe is read.
    ZeroCopy,
    /// The pipe holds a copy made during the call (newer kernels do this).
    Copies,
    /// `vmsplice` itself is refused, e.g. `EPERM` or `ENOSYS` from a seccomp filter.
    Refused(Errno),
}

/// Whether `vmsplice` accepts `SPLICE_F_GIFT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiftSupport {
    /// The flag is accepted.
    Accepted,
    /// The call fails with this errno when the flag is set (`EOPNOTSUPP` on kernels whose
    /// `vmsplice` copies).
    Refused(Errno),
}

/// The answer of [`probe_vmsplice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmspliceProbe {
    /// What `vmsplice` does without flags.
    pub mode: VmspliceMode,
    /// Whether `SPLICE_F_GIFT` is accepted.
    pub gift: GiftSupport,
}

impl fmt::Display for VmspliceProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mode {
            VmspliceMode::ZeroCopy => f.write_str("vmsplice: zero-copy")?,
            VmspliceMode::Copies => f.write_str("vmsplice: copies")?,
            VmspliceMode::Refused(e) => write!(f, "vmsplice: refused ({e})")?,
        }
        match self.gift {
            GiftSupport::Accepted => f.write_str(", SPLICE_F_GIFT accepted"),
            GiftSupport::Refused(e) => write!(f, ", SPLICE_F_GIFT refused ({e})"),
        }
    }
}

/// Finds out what `vmsplice` does on this kernel: puts one page of a known pattern into a
/// pipe, overwrites the page, and reads the pipe back (the new pattern means the pipe
/// referenced the page); then tries the same page with `SPLICE_F_GIFT`.
///
/// ```
/// let probe = page_pipe_sys::probe_vmsplice()?;
/// println!("{probe}");
/// # Ok::<(), page_pipe_sys::Errno>(())
/// ```
///
/// # Errors
/// The errno of a pipe, read or write call that failed (not of `vmsplice`, whose refusal
/// is an answer).
pub fn probe_vmsplice() -> Result<VmspliceProbe, Errno> {
    let ps = crate::page_size().get();
    let mut backing = vec![0u8; 2 * ps];
    let start = backing.as_ptr().align_offset(ps);
    let page = &mut backing[start..start + ps];
    let mut out = vec![0u8; ps];

    page.fill(0xA5);
    let p = pipe()?;
    // SAFETY: `p.write` is a pipe's write end; no GIFT, so the page may change afterwards.
    let plain = unsafe { vmsplice_all(&p.write, &[&page[..]], SpliceFlags::NONBLOCK) };
    let mode = match plain {
        Ok(_) => {
            page.fill(0x5A);
            read_exact(&p.read, &mut out)?;
            match out[0] {
                0x5A => VmspliceMode::ZeroCopy,
                _ => VmspliceMode::Copies,
            }
        }
        Err(Partial { done: 0, .. }) => {
            let errno = plain.unwrap_err().errno().unwrap_or(Errno::IO);
            return Ok(VmspliceProbe {
                mode: VmspliceMode::Refused(errno),
                gift: GiftSupport::Refused(errno),
            });
        }
        Err(partial) => return Err(partial.errno().unwrap_or(Errno::IO)),
    };

    // SAFETY: `p.write` is a pipe's write end; `page` is one aligned page, and it is not
    // modified until the pipe has been read empty below.
    let gifted = unsafe {
        vmsplice_all(
            &p.write,
            &[&page[..]],
            SpliceFlags::GIFT | SpliceFlags::NONBLOCK,
        )
    };
    let gift = match gifted {
        Ok(_) => {
            read_exact(&p.read, &mut out)?;
            GiftSupport::Accepted
        }
        Err(partial) => GiftSupport::Refused(partial.errno().unwrap_or(Errno::IO)),
    };
    Ok(VmspliceProbe { mode, gift })
}

fn read_exact(fd: impl std::os::fd::AsFd, buf: &mut [u8]) -> Result<(), Errno> {
    let mut off = 0;
    while off < buf.len() {
        match rustix::io::read(&fd, &mut buf[off..]) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => off += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
