//! Run-time probe: which userfaultfd and pagemap facilities does this kernel offer this
//! process?

use std::fmt;

use rustix::io::Errno;

use crate::pagemap_scan::{PageRegion, Pagemap, PmScanArg};
use crate::uffd::{Uffd, UffdFeatures, UffdFlags};

/// What [`probe_userfaultfd`] found. Each `Err` carries the errno the kernel answered;
/// [`Display`](fmt::Display) says what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UffdProbe {
    /// `userfaultfd(2)` for all faults, kernel-mode ones included: `EPERM` when
    /// `vm.unprivileged_userfaultfd` is 0 and the process lacks `CAP_SYS_PTRACE`;
    /// `ENOSYS` without userfaultfd.
    pub syscall: Result<(), Errno>,
    /// `userfaultfd(2)` with `UFFD_USER_MODE_ONLY`, allowed to every process since 5.11.
    pub user_mode_only: Result<(), Errno>,
    /// `/dev/userfaultfd` and `USERFAULTFD_IOC_NEW` (6.1): `ENOENT` without the device,
    /// `EACCES` when its permissions refuse this user.
    pub dev: Result<(), Errno>,
    /// `/proc/sys/vm/unprivileged_userfaultfd`, when readable.
    pub unprivileged_userfaultfd: Option<u32>,
    /// The API features offered (`UFFDIO_API` asked for none), on the first descriptor
    /// that could be made.
    pub features: Result<UffdFeatures, Errno>,
    /// `PAGEMAP_SCAN` on `/proc/self/pagemap`: `ENOTTY` before 6.7.
    pub pagemap_scan: Result<(), Errno>,
}

impl UffdProbe {
    /// Whether a userfaultfd that sees kernel-mode faults too can be had (by the system
    /// call or the device).
    pub fn kernel_faults(&self) -> bool {
        self.syscall.is_ok() || self.dev.is_ok()
    }

    /// Whether some userfaultfd can be had.
    pub fn any(&self) -> bool {
        self.kernel_faults() || self.user_mode_only.is_ok()
    }

    /// Whether dirty tracking can run asynchronously here: `WP_ASYNC` and
    /// `WP_UNPOPULATED` offered, and `PAGEMAP_SCAN` works.
    pub fn async_tracking(&self) -> bool {
        self.any()
            && self.pagemap_scan.is_ok()
            && self.features.is_ok_and(|f| {
                f.contains(
                    UffdFeatures::PAGEFAULT_FLAG_WP
                        | UffdFeatures::WP_ASYNC
                        | UffdFeatures::WP_UNPOPULATED,
                )
            })
    }
}

/// What an errno from opening a userfaultfd means.
fn open_reason(e: Errno) -> &'static str {
    match e {
        Errno::PERM => {
            "refused: vm.unprivileged_userfaultfd is 0 and the process lacks CAP_SYS_PTRACE"
        }
        Errno::NOSYS => "the kernel has no userfaultfd, or a seccomp filter refuses it",
        Errno::INVAL => "a flag the kernel does not know (UFFD_USER_MODE_ONLY needs Linux 5.11)",
        Errno::ACCESS => "the device's permissions refuse this user",
        Errno::NOENT => "no such device (Linux 6.1 added it)",
        _ => "failed",
    }
}

fn yes_or(f: &mut fmt::Formatter<'_>, name: &str, r: Result<(), Errno>) -> fmt::Result {
    match r {
        Ok(()) => writeln!(f, "{name:<34} yes"),
        Err(e) => writeln!(f, "{name:<34} no: {} ({e})", open_reason(e)),
    }
}

impl fmt::Display for UffdProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        yes_or(f, "userfaultfd(2), kernel faults too:", self.syscall)?;
        yes_or(f, "userfaultfd(2), user-mode only:", self.user_mode_only)?;
        yes_or(f, "/dev/userfaultfd:", self.dev)?;
        match self.unprivileged_userfaultfd {
            Some(v) => writeln!(f, "{:<34} {v}", "vm.unprivileged_userfaultfd:")?,
            None => writeln!(f, "{:<34} not readable", "vm.unprivileged_userfaultfd:")?,
        }
        match self.features {
            Ok(feat) => {
                let names: Vec<String> = feat.iter_names().map(|(n, _)| n.to_string()).collect();
                writeln!(
                    f,
                    "{:<34} {:#x} ({})",
                    "userfaultfd API features:",
                    feat.bits(),
                    names.join(" ")
                )?;
            }
            Err(e) => writeln!(
                f,
                "{:<34} none: no userfaultfd ({e})",
                "userfaultfd API features:"
            )?,
        }
        match self.pagemap_scan {
            Ok(()) => writeln!(f, "{:<34} yes", "PAGEMAP_SCAN:")?,
            Err(Errno::NOTTY) => {
                writeln!(f, "{:<34} no: Linux 6.7 added it (ENOTTY)", "PAGEMAP_SCAN:")?
            }
            Err(e) => writeln!(f, "{:<34} no ({e})", "PAGEMAP_SCAN:")?,
        }
        let wp = self
            .features
            .is_ok_and(|f| f.contains(UffdFeatures::PAGEFAULT_FLAG_WP));
        let how = if self.async_tracking() {
            "asynchronous (WP_ASYNC + PAGEMAP_SCAN): writers never wait"
        } else if self.any() && wp {
            "synchronous write faults: each first write after a scan waits for a handler thread"
        } else {
            "none: no userfaultfd write-protection"
        };
        write!(f, "{:<34} {how}", "write tracking:")?;
        if self.any() && wp && !self.kernel_faults() {
            write!(
                f,
                "; user-mode faults only: asynchronous tracking still sees writes the kernel \
                 makes for the process, synchronous tracking would make them fail (EFAULT)"
            )?;
        }
        Ok(())
    }
}

/// Finds out which userfaultfd and pagemap facilities this kernel offers this process:
/// opens (and closes) userfaultfds by the system call, with and without
/// `UFFD_USER_MODE_ONLY`, and by `/dev/userfaultfd`; asks the first one that opened for
/// the API features offered; and calls `PAGEMAP_SCAN` on one page.
///
/// ```
/// let probe = page_pipe_sys::probe_userfaultfd();
/// println!("{probe}");
/// ```
pub fn probe_userfaultfd() -> UffdProbe {
    let full = Uffd::open(UffdFlags::NONBLOCK);
    let umo = Uffd::open(UffdFlags::NONBLOCK | UffdFlags::USER_MODE_ONLY);
    let dev = Uffd::open_dev(UffdFlags::NONBLOCK);
    let features = match (&full, &dev, &umo) {
        (Ok(u), _, _) | (_, Ok(u), _) | (_, _, Ok(u)) => {
            u.api(UffdFeatures::empty()).map(|a| a.features)
        }
        (Err(e), _, _) => Err(*e),
    };
    let unprivileged_userfaultfd = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    UffdProbe {
        syscall: full.map(drop),
        user_mode_only: umo.map(drop),
        dev: dev.map(drop),
        unprivileged_userfaultfd,
        features,
        pagemap_scan: probe_pagemap_scan(),
    }
}

fn probe_pagemap_scan() -> Result<(), Errno> {
    let pm = Pagemap::open_self()?;
    let ps = crate::page_size().get() as u64;
    // One page of this function's stack: mapped, so the scan has something to walk.
    let here = 0u8;
    let start = (&here as *const u8 as u64) / ps * ps;
    let mut arg = PmScanArg::new(start, start + ps);
    let mut out = [PageRegion::default(); 1];
    pm.scan(&mut arg, &mut out).map(drop)
}
