//! The pipe limits in force for this process, read once.

use std::num::NonZeroUsize;
use std::sync::OnceLock;

use rustix::io::Errno;
use rustix::process::{Resource, getrlimit};
use rustix::thread::{CapabilitySet, capabilities};

use crate::sizing::{PIPE_SIZE_LIMIT, round_pipe_size};

/// The size of a page on this machine, from the auxiliary vector (`AT_PAGESZ`).
///
/// ```
/// let ps = page_pipe_sys::page_size();
/// assert!(ps.get().is_power_of_two());
/// ```
pub fn page_size() -> NonZeroUsize {
    // The kernel always passes AT_PAGESZ; a zero would be a broken kernel.
    NonZeroUsize::new(rustix::param::page_size()).expect("AT_PAGESZ is never zero")
}

/// The limits that decide how many pipes this process may make and how large they may
/// grow, read once from `/proc/sys/fs`, `getrlimit(RLIMIT_NOFILE)` and `capget`.
///
/// The kernel applies them in `fs/pipe.c`:
/// - `F_SETPIPE_SZ` above [`pipe_max_size`](Self::pipe_max_size) fails with `EPERM` unless
///   the process has `CAP_SYS_RESOURCE` ([`exempt_from_max_size`](Self::exempt_from_max_size));
/// - once the pipe slots held by this user pass
///   [`pipe_user_pages_soft`](Self::pipe_user_pages_soft), new pipes get
///   [`PIPE_MIN_DEF_BUFFERS`](crate::PIPE_MIN_DEF_BUFFERS) slots and growing any pipe fails
///   with `EPERM`; past [`pipe_user_pages_hard`](Self::pipe_user_pages_hard) no new pipe
///   can be made. Both apply only to a process with neither `CAP_SYS_RESOURCE` nor
///   `CAP_SYS_ADMIN` ([`exempt_from_user_pages`](Self::exempt_from_user_pages));
/// - every pipe takes two file descriptors out of `RLIMIT_NOFILE`.
///
/// ```
/// let limits = page_pipe_sys::PipeLimits::get()?;
/// println!("pipe-max-size: {} bytes", limits.pipe_max_size);
/// assert!(limits.max_grant_pages() >= 1);
/// # Ok::<(), page_pipe_sys::Errno>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipeLimits {
    /// The page size the limits are counted in.
    pub page_size: NonZeroUsize,
    /// `/proc/sys/fs/pipe-max-size`, in bytes.
    pub pipe_max_size: usize,
    /// `/proc/sys/fs/pipe-user-pages-soft`, in pages; 0 means no limit.
    pub pipe_user_pages_soft: u64,
    /// `/proc/sys/fs/pipe-user-pages-hard`, in pages; 0 means no limit.
    pub pipe_user_pages_hard: u64,
    /// The soft `RLIMIT_NOFILE`; `None` is unlimited.
    pub nofile_soft: Option<u64>,
    /// The hard `RLIMIT_NOFILE`; `None` is unlimited.
    pub nofile_hard: Option<u64>,
    /// Whether this thread's effective capabilities include `CAP_SYS_RESOURCE`.
    pub cap_sys_resource: bool,
    /// Whether this thread's effective capabilities include `CAP_SYS_ADMIN`.
    pub cap_sys_admin: bool,
}

impl PipeLimits {
    /// Reads the limits afresh.
    ///
    /// # Errors
    /// The errno of the first `/proc/sys/fs` file or `capget` call that failed.
    pub fn read() -> Result<Self, Errno> {
        let caps = capabilities(None)?.effective;
        let nofile = getrlimit(Resource::Nofile);
        Ok(Self {
            page_size: crate::page_size(),
            pipe_max_size: read_proc_number("/proc/sys/fs/pipe-max-size")? as usize,
            pipe_user_pages_soft: read_proc_number("/proc/sys/fs/pipe-user-pages-soft")?,
            pipe_user_pages_hard: read_proc_number("/proc/sys/fs/pipe-user-pages-hard")?,
            nofile_soft: nofile.current,
            nofile_hard: nofile.maximum,
            cap_sys_resource: caps.contains(CapabilitySet::SYS_RESOURCE),
            cap_sys_admin: caps.contains(CapabilitySet::SYS_ADMIN),
        })
    }

    /// The limits as first read by this process (read on the first call, then cached).
    ///
    /// # Errors
    /// As [`read`](Self::read), on every call if the first read failed.
    pub fn get() -> Result<&'static Self, Errno> {
        static LIMITS: OnceLock<Result<PipeLimits, Errno>> = OnceLock::new();
        LIMITS.get_or_init(Self::read).as_ref().map_err(|e| *e)
    }

    /// Whether `F_SETPIPE_SZ` may go above `pipe-max-size` (`CAP_SYS_RESOURCE`).
    pub fn exempt_from_max_size(&self) -> bool {
        self.cap_sys_resource
    }

    /// Whether `pipe-user-pages-soft` and `-hard` do not apply (`CAP_SYS_RESOURCE` or
    /// `CAP_SYS_ADMIN`, `pipe_is_unprivileged_user()` in `fs/pipe.c`).
    pub fn exempt_from_user_pages(&self) -> bool {
        self.cap_sys_resource || self.cap_sys_admin
    }

    /// The largest capacity, in pages, that `F_SETPIPE_SZ` can grant this process.
    pub fn max_grant_pages(&self) -> usize {
        let ps = self.page_size.get();
        let bytes = if self.exempt_from_max_size() {
            PIPE_SIZE_LIMIT
        } else {
            // The sysctl stores a rounded value already; round again for a value set by
            // other means, and never go under one page.
            round_pipe_size(self.pipe_max_size, ps).map_or(PIPE_SIZE_LIMIT, |b| {
                if b > self.pipe_max_size { b / 2 } else { b }
            })
        };
        (bytes / ps).max(1)
    }

    /// What `F_SETPIPE_SZ` does with a request of `pages` on a pipe of `current` pages,
    /// leaving out the per-user accounting: the capacity in pages it grants, or the errno.
    ///
    /// Mirrors the checks of `pipe_set_size()` in `fs/pipe.c`: the request is rounded up to
    /// a power of two pages; growing above `pipe-max-size` is `EPERM` without
    /// `CAP_SYS_RESOURCE`; a size the kernel cannot represent is `EINVAL` (rustix reports
    /// a size above `i32::MAX` as `EPERM`).
    ///
    /// ```
    /// # let mut limits = *page_pipe_sys::PipeLimits::get()?;
    /// limits.pipe_max_size = 1 << 20;
    /// limits.cap_sys_resource = false;
    /// let ps = limits.page_size.get();
    /// assert_eq!(limits.predict_set_size(16, 3), Ok(4));
    /// assert_eq!(limits.predict_set_size(16, (1 << 20) / ps), Ok((1 << 20) / ps));
    /// assert_eq!(limits.predict_set_size(16, (1 << 20) / ps + 1), Err(page_pipe_sys::Errno::PERM));
    /// # Ok::<(), page_pipe_sys::Errno>(())
    /// ```
    pub fn predict_set_size(&self, current: usize, pages: usize) -> Result<usize, Errno> {
        let ps = self.page_size.get();
        let Some(bytes) = pages.checked_mul(ps) else {
            return Err(Errno::PERM);
        };
        if bytes > i32::MAX as usize {
            return Err(Errno::PERM);
        }
        let size = round_pipe_size(bytes, ps).ok_or(Errno::INVAL)?;
        let slots = size / ps;
        if slots > current && size > self.pipe_max_size && !self.exempt_from_max_size() {
            return Err(Errno::PERM);
        }
        Ok(slots)
    }
}

fn read_proc_number(path: &str) -> Result<u64, Errno> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
    text.trim().parse().map_err(|_| Errno::INVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, resource: bool) -> PipeLimits {
        PipeLimits {
            page_size: NonZeroUsize::new(4096).unwrap(),
            pipe_max_size: max,
            pipe_user_pages_soft: 16384,
            pipe_user_pages_hard: 0,
            nofile_soft: Some(1024),
            nofile_hard: Some(4096),
            cap_sys_resource: resource,
            cap_sys_admin: false,
        }
    }

    #[test]
    fn grant_limit_follows_pipe_max_size_unless_exempt() {
        assert_eq!(limits(1 << 20, false).max_grant_pages(), 256);
        assert_eq!(limits(1 << 20, true).max_grant_pages(), (1 << 31) / 4096);
        // A pipe-max-size that is not a power of two grants the power of two below it.
        assert_eq!(limits(3 << 20, false).max_grant_pages(), 512);
    }

    #[test]
    fn prediction_rounds_and_refuses_like_pipe_set_size() {
        let l = limits(1 << 20, false);
        assert_eq!(l.predict_set_size(16, 17), Ok(32));
        assert_eq!(l.predict_set_size(16, 256), Ok(256));
        assert_eq!(l.predict_set_size(16, 257), Err(Errno::PERM));
        assert_eq!(l.predict_set_size(16, 819), Err(Errno::PERM));
        // Shrinking is always allowed, even above the limit.
        assert_eq!(l.predict_set_size(1024, 819), Ok(1024));
        assert_eq!(limits(1 << 20, true).predict_set_size(16, 819), Ok(1024));
        assert_eq!(l.predict_set_size(16, usize::MAX), Err(Errno::PERM));
    }
}
