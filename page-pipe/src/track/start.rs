//! Starting a tracker: checking regions, choosing the userfaultfd and the method,
//! registering and protecting.

use std::sync::Arc;

use page_pipe_sys::{Errno, Pagemap, RegisterMode, Uffd, UffdFeatures, UffdFlags, UffdIoctls};

use super::bitmap::{for_each_run, new_bitmap, set_range};
use super::error::io_errno;
use super::faults::SyncEngine;
use super::scan::{self, AsyncEngine};
use super::{
    Avoid, Engine, Method, Privilege, Region, SystemOp, TrackError, TrackInfo, TrackOptions,
    TrackRegion, Tracker, Via, maps, protect,
};

fn check_regions(given: &[TrackRegion], ps: usize) -> Result<Vec<Region>, TrackError> {
    let mut regions = Vec::with_capacity(given.len());
    for r in given {
        let unit = if r.granule == 0 { ps } else { r.granule };
        let bad = TrackError::Unaligned {
            addr: r.addr,
            host: r.host,
            len: r.len,
            unit,
        };
        if !unit.is_power_of_two() || unit < ps {
            return Err(bad);
        }
        if r.len == 0 || r.addr % ps as u64 != 0 || r.host % unit != 0 || r.len % unit != 0 {
            return Err(bad);
        }
        if r.addr.checked_add(r.len as u64).is_none() || r.host.checked_add(r.len).is_none() {
            return Err(TrackError::Overflow { addr: r.addr });
        }
        regions.push(Region {
            addr: r.addr,
            host: r.host,
            len: r.len,
            pages: (r.len / ps) as u64,
            granule: (unit / ps) as u64,
            anon: false,
        });
    }
    regions.sort_by_key(|r| r.addr);
    for w in regions.windows(2) {
        if w[0].addr + w[0].len as u64 > w[1].addr {
            return Err(TrackError::Overlap {
                addr: w[1].addr,
                other: w[0].addr,
            });
        }
    }
    let mut by_host: Vec<&Region> = regions.iter().collect();
    by_host.sort_by_key(|r| r.host);
    for w in by_host.windows(2) {
        if w[0].end() > w[1].host {
            return Err(TrackError::Overlap {
                addr: w[1].addr,
                other: w[0].addr,
            });
        }
    }
    Ok(regions)
}

/// Opens a userfaultfd by the system call, or by the device when the call says `EPERM`.
fn open_full(flags: UffdFlags) -> Result<(Uffd, Via), (Errno, Errno)> {
    match Uffd::open(flags) {
        Ok(u) => Ok((u, Via::Syscall)),
        Err(Errno::PERM) => match Uffd::open_dev(flags) {
            Ok(u) => Ok((u, Via::Device)),
            Err(d) => Err((Errno::PERM, d)),
        },
        Err(e) => Err((e, e)),
    }
}

fn unprivileged_userfaultfd() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

impl Tracker {
    /// Starts tracking writes to `regions` asynchronously (`UFFD_FEATURE_WP_ASYNC` and
    /// `PAGEMAP_SCAN`, Linux 6.7): registers them with a new userfaultfd and
    /// write-protects all their pages. No write to them will ever wait.
    ///
    /// Safe: see [What is `unsafe`](crate::track#what-is-unsafe). See the
    /// [module docs](crate::track) for an example.
    ///
    /// # Errors
    /// [`TrackError`]: bad regions; no userfaultfd ([`TrackError::Open`]) or one the
    /// options refuse ([`TrackError::Privilege`]); a kernel without `WP_ASYNC` or
    /// `PAGEMAP_SCAN`, or `opts.avoid` excluding them ([`TrackError::Unsupported`]);
    /// memory the kernel refuses to register ([`TrackError::Register`]: `EINVAL`,
    /// `EBUSY`, `EPERM`). Nothing stays registered after an error.
    pub fn start_async(
        regions: &[TrackRegion],
        opts: &TrackOptions,
    ) -> Result<Tracker, TrackError> {
        Self::start_inner(regions, opts, false)
    }

    /// Starts tracking writes to `regions`: asynchronously where the kernel offers it and
    /// `opts.avoid` allows it ([`start_async`](Self::start_async)), else with synchronous
    /// write faults recorded by a handler thread.
    ///
    /// ```
    /// use memmap2::MmapOptions;
    /// use page_pipe::track::{Avoid, Method, TrackOptions, TrackRegion, Tracker};
    /// let ps = page_pipe_sys::page_size().get();
    /// let mut mem = MmapOptions::new().len(16 * ps).map_anon()?;
    /// let opts = TrackOptions { avoid: Avoid::WP_ASYNC, ..TrackOptions::default() };
    /// // SAFETY: `mem` is this example's own anonymous mapping: no allocator heap, stack,
    /// // lock or kernel-maintained word lives in it, and its only writer is this thread,
    /// // which holds nothing the handler thread needs while it writes.
    /// let tracker = unsafe { Tracker::start(&[TrackRegion::of(0, &mem[..])], &opts) };
    /// let mut tracker = match tracker {
    ///     Ok(t) => t,
    ///     Err(e) => { println!("no tracking here: {e}"); return Ok(()); }
    /// };
    /// assert_eq!(tracker.info().method, Method::Sync);
    /// mem[3 * ps] = 1; // waits for the handler thread, a few microseconds
    /// let plan = tracker.take()?;
    /// assert_eq!(plan.len(), 3); // hole, page 3, hole
    /// assert_eq!(tracker.faults(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`start_async`](Self::start_async); [`TrackError::Unsupported`] only when the
    /// kernel has no userfaultfd write-protection at all.
    ///
    /// # Safety
    /// If tracking is synchronous ([`info`](Self::info) says [`Method::Sync`]), then from
    /// this call until the tracker is dropped, every first write to a page of the regions
    /// after a take, by any thread or by the kernel for the process, waits until the
    /// tracker's handler thread has recorded it. The caller promises, for that time:
    /// - nothing the handler thread needs lives in the regions: no memory the global
    ///   allocator hands out, no thread stack or thread-local storage, no lock or futex
    ///   word, no memory the kernel updates for the process (rseq areas, robust futex
    ///   lists, `clear_child_tid` words);
    /// - no thread writes the regions while holding something the handler thread may
    ///   wait for (the global allocator's lock), and no signal handler writes them;
    /// - with [`Privilege::UserModeOnly`]: nothing relies on the kernel's writes into
    ///   the regions succeeding (they fail with `EFAULT` instead of waiting).
    ///
    /// With asynchronous tracking nothing is promised: no write waits.
    #[allow(unsafe_code)] // declares the contract above; the body has no unsafe operation
    pub unsafe fn start(
        regions: &[TrackRegion],
        opts: &TrackOptions,
    ) -> Result<Tracker, TrackError> {
        Self::start_inner(regions, opts, true)
    }

    fn start_inner(
        given: &[TrackRegion],
        opts: &TrackOptions,
        allow_sync: bool,
    ) -> Result<Tracker, TrackError> {
        let ps = page_pipe_sys::page_size().get();
        let regions = check_regions(given, ps)?;

        // PAGEMAP_SCAN: there, and wanted?
        let pagemap = Pagemap::open_self().map_err(|errno| TrackError::System {
            what: SystemOp::OpenPagemap,
            errno,
        });
        let scan_ok = !opts.avoid.contains(Avoid::PAGEMAP_SCAN)
            && pagemap.as_ref().is_ok_and(|pm| scan::probe(pm, ps).is_ok());

        // Which userfaultfd, and which method.
        let choose = |offered: UffdFeatures| -> Result<Method, TrackError> {
            if !offered.contains(UffdFeatures::PAGEFAULT_FLAG_WP) {
                return Err(TrackError::Unsupported {
                    missing: "userfaultfd write-protection (UFFD_FEATURE_PAGEFAULT_FLAG_WP, Linux 5.7)",
                    offered,
                });
            }
            let async_ok = offered.contains(UffdFeatures::WP_ASYNC)
                && !opts.avoid.contains(Avoid::WP_ASYNC)
                && scan_ok;
            match (async_ok, allow_sync) {
                (true, _) => Ok(Method::Async),
                (false, true) => Ok(Method::Sync),
                (false, false) => Err(TrackError::Unsupported {
                    missing: if opts.avoid.contains(Avoid::WP_ASYNC) {
                        "asynchronous write-protection, which the options avoid"
                    } else if !offered.contains(UffdFeatures::WP_ASYNC) {
                        "asynchronous write-protection (UFFD_FEATURE_WP_ASYNC, Linux 6.7)"
                    } else {
                        "PAGEMAP_SCAN on /proc/self/pagemap (Linux 6.7), or the options avoid it"
                    },
                    offered,
                }),
            }
        };
        let nb = UffdFlags::NONBLOCK;
        let umo = nb | UffdFlags::USER_MODE_ONLY;
        let sys = |what| move |errno| TrackError::System { what, errno };
        // What the kernel offers is asked on a descriptor made for that and closed: a
        // userfaultfd takes UFFDIO_API once.
        let open_umo = || Uffd::open(umo).map_err(|errno| TrackError::Open { errno });
        let (uffd, via, user_mode_only, method, offered) = match opts.privilege {
            Privilege::UserModeOnly => {
                let offered = open_umo()?
                    .api(UffdFeatures::empty())
                    .map_err(sys(SystemOp::AskApi))?
                    .features;
                let method = choose(offered)?;
                (open_umo()?, Via::Syscall, true, method, offered)
            }
            Privilege::Full | Privilege::Auto => match open_full(nb) {
                Ok((probe, _)) => {
                    let offered = probe
                        .api(UffdFeatures::empty())
                        .map_err(sys(SystemOp::AskApi))?
                        .features;
                    drop(probe);
                    let method = choose(offered)?;
                    let (u, via) =
                        open_full(nb).map_err(|(errno, _)| TrackError::Open { errno })?;
                    (u, via, false, method, offered)
                }
                Err((errno, _)) if errno != Errno::PERM => {
                    return Err(TrackError::Open { errno });
                }
                Err((syscall, device)) => {
                    let refused = |sync| TrackError::Privilege {
                        syscall,
                        device,
                        unprivileged_userfaultfd: unprivileged_userfaultfd(),
                        sync,
                    };
                    // No user-mode-only userfaultfd either (before 5.11): say why the
                    // full one was refused.
                    let offered = open_umo()
                        .map_err(|_| refused(!allow_sync))?
                        .api(UffdFeatures::empty())
                        .map_err(sys(SystemOp::AskApi))?
                        .features;
                    let method = choose(offered)?;
                    if opts.privilege == Privilege::Full || method == Method::Sync {
                        return Err(refused(method == Method::Sync));
                    }
                    (open_umo()?, Via::Syscall, true, method, offered)
                }
            },
        };

        // Ask for the features the method needs.
        let mut want =
            UffdFeatures::PAGEFAULT_FLAG_WP | (offered & UffdFeatures::WP_HUGETLBFS_SHMEM);
        if !opts.avoid.contains(Avoid::WP_UNPOPULATED) {
            want |= offered & UffdFeatures::WP_UNPOPULATED;
        }
        match method {
            Method::Async => want |= UffdFeatures::WP_ASYNC,
            // Events that mean tracking is lost; the handler thread reads them at once, so
            // the munmap/madvise/mremap callers they hold are let go.
            Method::Sync => {
                want |= offered
                    & (UffdFeatures::EVENT_REMOVE
                        | UffdFeatures::EVENT_UNMAP
                        | UffdFeatures::EVENT_REMAP)
            }
        }
        // It grants all of `want` or fails (and reports every feature it offers).
        uffd.api(want).map_err(sys(SystemOp::AskFeatures))?;
        let uffd = Arc::new(uffd);
        let info = TrackInfo {
            method,
            user_mode_only,
            via,
            features: want,
        };

        let mut t = Tracker {
            uffd,
            registered: Vec::with_capacity(regions.len()),
            engine: Engine::None,
            pending: regions.iter().map(|r| new_bitmap(r.pages)).collect(),
            scratch: regions.iter().map(|r| new_bitmap(r.pages)).collect(),
            untouched: vec![None; regions.len()],
            regions,
            page_size: ps,
            info,
            failed: None,
        };
        // From here on, dropping `t` unwinds whatever was done.

        // Without /proc/self/maps no region counts as private anonymous memory: its first
        // plan is then every page, which is never wrong.
        let maps = maps::read_maps().unwrap_or_default();
        for r in &mut t.regions {
            r.anon = maps::all_anon_private(&maps, r.host, r.end());
        }
        let mut pagemap = pagemap.ok();

        // Never-touched pages, before any protection.
        let mut populated: Vec<Option<Vec<u64>>> = vec![None; t.regions.len()];
        if opts.leave_out_untouched {
            let presence = scan::Presence::new(pagemap.as_ref(), scan_ok);
            for (i, r) in t.regions.iter().enumerate() {
                if r.anon {
                    let mut bits = new_bitmap(r.pages);
                    presence
                        .populated(r, &mut bits, true)
                        .map_err(|errno| TrackError::Scan {
                            addr: r.addr,
                            host: r.host,
                            errno,
                        })?;
                    populated[i] = Some(bits);
                }
            }
        }

        // Register, learning each region's unit.
        for i in 0..t.regions.len() {
            let r = &t.regions[i];
            let ioctls = t
                .uffd
                .register(r.host, r.len, RegisterMode::WP)
                .map_err(|errno| TrackError::Register {
                    addr: r.addr,
                    host: r.host,
                    len: r.len,
                    errno,
                    mapping: maps::describe(r.host, r.end()),
                })?;
            t.registered.push(i);
            if !ioctls.contains(UffdIoctls::WRITEPROTECT) {
                return Err(TrackError::Unsupported {
                    missing: "UFFDIO_WRITEPROTECT on this memory",
                    offered,
                });
            }
            // hugetlb ranges support neither UFFDIO_ZEROPAGE nor UFFDIO_MOVE.
            if !ioctls.contains(UffdIoctls::ZEROPAGE) {
                let huge = maps::kernel_page_size(r.host)
                    .map_err(|e| TrackError::System {
                        what: SystemOp::ReadSmaps,
                        errno: io_errno(&e),
                    })?
                    .unwrap_or(ps);
                let unit = (huge / ps) as u64;
                let r = &mut t.regions[i];
                r.granule = r.granule.max(unit);
            }
        }

        // Before WP_UNPOPULATED, anonymous pages never populated cannot be protected:
        // map the zero page there first.
        if !want.contains(UffdFeatures::WP_UNPOPULATED) {
            for r in t.regions.iter().filter(|r| r.anon) {
                page_pipe_sys::populate_read(r.host, r.len).map_err(|errno| {
                    TrackError::System {
                        what: SystemOp::PopulateRead,
                        errno,
                    }
                })?;
            }
        }

        t.engine = match method {
            Method::Async => {
                let pm = pagemap.take().ok_or(TrackError::Unsupported {
                    missing: "/proc/self/pagemap",
                    offered,
                })?;
                Engine::Async(AsyncEngine::new(pm))
            }
            Method::Sync => Engine::Sync(SyncEngine::spawn(Arc::clone(&t.uffd), &t.regions, ps)?),
        };

        // Protect everything.
        for r in &t.regions {
            protect(&t.uffd, r, r.host, r.len, true)?;
        }

        // Pages populated while we registered and protected count as populated. (Not
        // where the regions were populated for reading and only /proc/self/pagemap can
        // tell: it hides the zero page's frame number, so every page would count. There,
        // pages first written while `start` runs count as never touched: the first plan
        // is exact only with the writers paused, as a snapshot needs anyway.)
        let zero_page_hidden = !want.contains(UffdFeatures::WP_UNPOPULATED)
            && matches!(t.engine, Engine::Sync(_))
            && !scan_ok;
        let presence = match &t.engine {
            Engine::Async(a) => scan::Presence::new(Some(a.pagemap()), true),
            _ => scan::Presence::new(pagemap.as_ref(), scan_ok),
        };
        for (i, r) in t.regions.iter().enumerate() {
            let Some(bits) = populated[i].as_mut() else {
                continue;
            };
            if !zero_page_hidden {
                presence
                    .populated(r, bits, false)
                    .map_err(|errno| TrackError::Scan {
                        addr: r.addr,
                        host: r.host,
                        errno,
                    })?;
            }
            let mut never = new_bitmap(r.pages);
            for_each_run(bits, r.pages, |s, e, set| {
                if !set {
                    set_range(&mut never, s, e);
                }
            });
            t.untouched[i] = Some(never);
        }
        Ok(t)
    }
}
