//! The sending end: pre-copy rounds, the stop rule, the final round with the source
//! paused.

use std::fmt;
use std::net::ToSocketAddrs;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use crate::dump::{DumpErrorKind, DumpSink, sealed};
use crate::image::PagemapEntry;
use crate::page_server::wire::ImageId;
use crate::page_server::{ClientError, PageServerClient, Peer};
use crate::snapshot::{SnapshotError, SnapshotOptions, Span, snapshot};
use crate::source::{Chunk, Source};
use crate::track::Tracker;

use super::cancel::{CancelToken, sleep};
use super::error::{MigrateError, MigrateErrorKind, Phase};

/// Pre-copy rounds at most, by default (round 1 included).
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// The final pause a migration aims for, by default.
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(300);
/// A round that leaves fewer pages than this written ends the pre-copy, by default.
pub const DEFAULT_MIN_ROUND_PAGES: u64 = 64;

/// How a migration runs.
///
/// ```
/// use std::time::Duration;
/// use page_pipe::migrate::{CancelToken, MigrateOptions};
/// let cancel = CancelToken::new();
/// let opts = MigrateOptions {
///     downtime: Duration::from_millis(50),
///     bandwidth: Some(100 << 20), // 100 MiB/s while the source runs
///     cancel: Some(cancel.clone()),
///     ..MigrateOptions::default()
/// };
/// assert_eq!(opts.max_rounds, page_pipe::migrate::DEFAULT_MAX_ROUNDS);
/// ```
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Pre-copy rounds at most, round 1 included (default [`DEFAULT_MAX_ROUNDS`]; at
    /// least 1). After that many the final round comes whatever the estimate.
    pub max_rounds: u32,
    /// The final pause to aim for (default [`DEFAULT_DOWNTIME`]): the pre-copy stops
    /// once the pages written during a round, at the bandwidth that round measured,
    /// would take less than this to send (zero: never on the estimate).
    pub downtime: Duration,
    /// The pre-copy also stops when a round leaves fewer than this many pages written
    /// (default [`DEFAULT_MIN_ROUND_PAGES`]; 0: never on the count).
    pub min_round_pages: u64,
    /// The most bytes per second the pre-copy rounds send (default `None`: as fast as
    /// the connection goes). Paced entry by entry: after each, the sender waits until the
    /// bytes of the round so far fit the rate. The final round is not paced: the source
    /// is paused then, and every millisecond is downtime (QEMU does the same).
    pub bandwidth: Option<u64>,
    /// Cancels the migration from another thread (default none): see
    /// [`CancelToken`].
    pub cancel: Option<CancelToken>,
    /// How each round's snapshot runs (default: straight from memory, chunk mode).
    pub snapshot: SnapshotOptions,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            max_rounds: DEFAULT_MAX_ROUNDS,
            downtime: DEFAULT_DOWNTIME,
            min_round_pages: DEFAULT_MIN_ROUND_PAGES,
            bandwidth: None,
            cancel: None,
            snapshot: SnapshotOptions::default(),
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundReport {
    /// Its number, from 1 (sent as `pagemap-<round>.img`).
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Bytes sent, headers included.
    pub bytes: u64,
    /// How long it took.
    pub time: Duration,
    /// Pages written while it ran (what the next round sends); 0 for the final round.
    pub written_meanwhile: u64,
    /// Whether it is the final round, sent with the source paused.
    pub is_final: bool,
}

impl RoundReport {
    /// Bytes per second it sent at (0 for an empty round).
    pub fn rate(&self) -> f64 {
        let s = self.time.as_secs_f64();
        if s > 0.0 && self.bytes > 0 {
            self.bytes as f64 / s
        } else {
            0.0
        }
    }
}

/// Why the pre-copy stopped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StopReason {
    /// A round left fewer than [`MigrateOptions::min_round_pages`] pages written.
    FewPages {
        /// Pages it left.
        pages: u64,
    },
    /// Sending what a round left was estimated to take less than
    /// [`MigrateOptions::downtime`].
    Downtime {
        /// The estimate.
        estimate: Duration,
    },
    /// [`MigrateOptions::max_rounds`] rounds were sent.
    MaxRounds,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::FewPages { pages } => write!(f, "{pages} pages left, below the threshold"),
            StopReason::Downtime { estimate } => {
                write!(f, "estimated final pause {estimate:?}, within the target")
            }
            StopReason::MaxRounds => f.write_str("the most rounds were sent"),
        }
    }
}

/// What a migration did.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrateReport {
    /// Every round, the final one last.
    pub rounds: Vec<RoundReport>,
    /// Why the pre-copy stopped.
    pub stop: StopReason,
    /// The estimate of the final pause when it stopped (pages left over the last
    /// round's rate).
    pub estimate: Duration,
    /// The final pause: from the call to `pause` until the receiver acknowledged the
    /// last round (`CLOSE` answered).
    pub final_pause: Duration,
    /// From the first round to the end.
    pub total: Duration,
}

impl MigrateReport {
    /// Pages sent over all rounds.
    pub fn pages(&self) -> u64 {
        self.rounds.iter().map(|r| r.pages).sum()
    }

    /// Bytes sent over all rounds.
    pub fn bytes(&self) -> u64 {
        self.rounds.iter().map(|r| r.bytes).sum()
    }
}

/// The sending end of a migration: a connection to a receiver (or a page server) and the
/// loop of rounds; see the [module docs](super).
///
/// ```
/// use memmap2::MmapOptions;
/// use page_pipe::migrate::{receive, MemoryRegion, MigrateOptions, ReceiveOptions, Sender};
/// use page_pipe::page_server::{Incoming, PageServerClient};
/// use page_pipe::track::{TrackOptions, TrackRegion, Tracker};
/// use page_pipe::Source;
/// let ps = page_pipe::page_size();
/// let base = 0x1_0000_0000;
/// let mut mem = MmapOptions::new().len(64 * ps).map_anon()?;
/// mem.fill(3);
/// let mut tracker = match Tracker::start_async(&[TrackRegion::of(base, &mem[..])], &TrackOptions::default()) {
///     Ok(t) => t,
///     Err(e) => { println!("no tracking here: {e}"); return Ok(()); }
/// };
/// let (a, b) = std::os::unix::net::UnixStream::pair()?;
/// let receiver = std::thread::spawn(move || {
///     let mut dest = MemoryRegion::from_mmap(base, MmapOptions::new().len(64 * ps).map_anon()?)?;
///     receive(Incoming::from_unix(b), &mut dest, &ReceiveOptions::default())?;
///     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(dest)
/// });
/// // Nothing writes `mem` in this example, so it can be borrowed; a running program's
/// // memory comes in with `Source::with_volatile`.
/// let source = Source::new().with_slice(base, &mem[..])?;
/// let sender = Sender::new(PageServerClient::from_unix(a)?);
/// let report = sender.run(&source, &mut tracker, || {}, || {}, &MigrateOptions::default())?;
/// let dest = receiver.join().unwrap().map_err(|e| e.to_string())?;
/// assert!(dest.mmap().unwrap()[..] == mem[..]);
/// assert_eq!(report.rounds.last().unwrap().is_final, true);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Sender {
    client: PageServerClient,
}

impl Sender {
    /// A sender on a connected page-server client (no image open yet): a Unix socket, a
    /// TCP or TLS connection made elsewhere.
    pub fn new(client: PageServerClient) -> Self {
        Self { client }
    }

    /// Connects to the receiver at `addr` over TCP. Checks `cancel` first.
    ///
    /// # Errors
    /// [`MigrateError`] in [`Phase::Connect`]: [`MigrateErrorKind::Cancelled`], or
    /// [`MigrateErrorKind::Connect`].
    pub fn connect(
        addr: impl ToSocketAddrs + fmt::Debug,
        cancel: Option<&CancelToken>,
    ) -> Result<Self, MigrateError> {
        check_connect(cancel)?;
        let client = PageServerClient::connect_tcp(addr).map_err(connect_error)?;
        Ok(Self::new(client))
    }

    /// Connects to the receiver at `addr` over TLS (the `tls` feature): the receiver's
    /// certificate checked against the CA of `tls`, ours presented. Asks the receiver a
    /// question (`PS_IOV_PARENT`) before returning, so that a certificate the receiver
    /// refuses after a TLS 1.3 handshake fails here, not in round 1. Checks `cancel`
    /// first.
    ///
    /// # Errors
    /// As [`connect`](Self::connect); a refused certificate is
    /// [`MigrateErrorKind::Connect`] with [`ClientError::Tls`] (or the connection closed,
    /// when the receiver refused ours).
    #[cfg(feature = "tls")]
    pub fn connect_tls(
        addr: impl ToSocketAddrs + fmt::Debug,
        tls: &crate::tls::TlsClientConfig,
        cancel: Option<&CancelToken>,
    ) -> Result<Self, MigrateError> {
        check_connect(cancel)?;
        let s = crate::tls::TlsStream::connect(addr, tls, None)
            .map_err(|error| connect_error(ClientError::Tls { error }))?;
        let mut client = PageServerClient::from_tls(s).map_err(connect_error)?;
        let probe = ImageId::pagemap(0).expect("0 fits 56 bits");
        client.parent_has(probe).map_err(connect_error)?;
        Ok(Self::new(client))
    }

    /// The receiver.
    pub fn peer(&self) -> &Peer {
        self.client.peer()
    }

    /// Migrates `source` to the receiver (see the [module docs](super)): round 1 sends
    /// every page of `tracker`'s [`full_plan`](Tracker::full_plan); each later round sends
    /// what [`take`](Tracker::take) says was written during the one before, while the
    /// source runs, until a stop condition of `opts` holds; then `pause` is called, the
    /// pages written since are sent as the final round, and the stream is closed. On
    /// success the source is left paused: the receiver's memory equals it now (resume it,
    /// or hand over to the destination). On any failure after `pause`, `resume` is called
    /// before returning.
    ///
    /// `tracker` must track the memory of `source` under the same addresses, started
    /// before round 1 (an asynchronous tracker: the source's writers never wait), and
    /// `source` must read memory others write as volatile memory
    /// ([`Source::with_volatile`]). Pages the tracker found never touched are not sent:
    /// the destination must read as zeros there (fresh memory), or start the tracker
    /// with [`leave_out_untouched`](crate::track::TrackOptions::leave_out_untouched) off.
    ///
    /// # Errors
    /// [`MigrateError`]: where it stopped, the rounds sent, and why. A cancel stops at
    /// the next safe point and ends the stream with `FORCE_CLOSE`.
    pub fn run(
        self,
        source: &Source<'_>,
        tracker: &mut Tracker,
        mut pause: impl FnMut(),
        mut resume: impl FnMut(),
        opts: &MigrateOptions,
    ) -> Result<MigrateReport, MigrateError> {
        let mut run = Run {
            client: Some(self.client),
            rounds: Vec::new(),
            opts,
            page_size: source.page_size() as u64,
        };
        let start = Instant::now();
        let mut plan = tracker.full_plan();
        let (stop, estimate, left) = loop {
            let round = run.rounds.len() as u32 + 1;
            let phase = Phase::Round(round);
            run.check_cancel(phase)?;
            let (pages, bytes, time) = run.send_round(source, &plan, round, phase, true)?;
            let written = match tracker.take() {
                Ok(p) => p,
                Err(e) => return Err(run.fail(phase, MigrateErrorKind::Track(Box::new(e)))),
            };
            let left = pages_of(&written);
            run.rounds.push(RoundReport {
                round,
                pages,
                bytes,
                time,
                written_meanwhile: left,
                is_final: false,
            });
            let rate = run.rounds.last().map_or(0.0, RoundReport::rate);
            let estimate = if rate > 0.0 {
                Duration::from_secs_f64((left * run.page_size) as f64 / rate)
            } else {
                Duration::ZERO
            };
            if left < opts.min_round_pages {
                break (StopReason::FewPages { pages: left }, estimate, written);
            }
            if estimate < opts.downtime {
                break (StopReason::Downtime { estimate }, estimate, written);
            }
            if round >= opts.max_rounds.max(1) {
                break (StopReason::MaxRounds, estimate, written);
            }
            plan = written;
        };
        // The pages `take` just reported are protected again: mark them, so that the take
        // in the pause returns them with whatever is written from now on.
        let round = run.rounds.len() as u32 + 1;
        let phase = Phase::Final(round);
        run.check_cancel(phase)?;
        for s in &left {
            if let Span::Pages { addr, pages, .. } = *s
                && let Err(e) = tracker.mark_written(addr, pages)
            {
                return Err(run.fail(phase, MigrateErrorKind::Track(Box::new(e))));
            }
        }
        pause();
        let paused = Instant::now();
        let r = run.final_round(source, tracker, round);
        match r {
            Ok(()) => {
                let final_pause = paused.elapsed();
                Ok(MigrateReport {
                    rounds: run.rounds,
                    stop,
                    estimate,
                    final_pause,
                    total: start.elapsed(),
                })
            }
            Err(e) => {
                resume();
                Err(e)
            }
        }
    }
}

fn check_connect(cancel: Option<&CancelToken>) -> Result<(), MigrateError> {
    if cancel.is_some_and(CancelToken::is_cancelled) {
        return Err(MigrateError {
            phase: Phase::Connect,
            rounds: Vec::new(),
            kind: MigrateErrorKind::Cancelled,
        });
    }
    Ok(())
}

fn connect_error(e: ClientError) -> MigrateError {
    MigrateError {
        phase: Phase::Connect,
        rounds: Vec::new(),
        kind: MigrateErrorKind::Connect(Box::new(e)),
    }
}

/// Pages in the [`Span::Pages`] of `plan`.
fn pages_of(plan: &[Span]) -> u64 {
    plan.iter()
        .map(|s| match s {
            Span::Pages { pages, .. } => *pages,
            Span::Hole { .. } => 0,
        })
        .sum()
}

struct Run<'o> {
    /// `None` once closed or given up.
    client: Option<PageServerClient>,
    rounds: Vec<RoundReport>,
    opts: &'o MigrateOptions,
    page_size: u64,
}

impl Run<'_> {
    fn cancelled(&self) -> bool {
        self.opts
            .cancel
            .as_ref()
            .is_some_and(CancelToken::is_cancelled)
    }

    /// Ends the migration: the stream closed with `FORCE_CLOSE` if it is at a safe
    /// point (the client is not out of step), else just dropped.
    fn fail(&mut self, phase: Phase, kind: MigrateErrorKind) -> MigrateError {
        if let Some(c) = self.client.take() {
            // A client whose last call failed refuses to send (`Broken`); dropping it
            // closes the connection, which the receiver sees as a cut stream.
            let _ = c.force_close();
        }
        MigrateError {
            phase,
            rounds: std::mem::take(&mut self.rounds),
            kind,
        }
    }

    fn check_cancel(&mut self, phase: Phase) -> Result<(), MigrateError> {
        if self.cancelled() {
            return Err(self.fail(phase, MigrateErrorKind::Cancelled));
        }
        Ok(())
    }

    /// Sends `plan`'s pages as round `round` (`pagemap-<round>.img`); returns its pages,
    /// bytes and time.
    fn send_round(
        &mut self,
        source: &Source<'_>,
        plan: &[Span],
        round: u32,
        phase: Phase,
        paced: bool,
    ) -> Result<(u64, u64, Duration), MigrateError> {
        let t = Instant::now();
        let client = self.client.as_mut().expect("open until the end");
        let before = client.report().bytes;
        let image = ImageId::pagemap(u64::from(round)).expect("a u32 fits 56 bits");
        if let Err(e) = client.open(image) {
            return Err(self.fail(phase, MigrateErrorKind::Stream(Box::new(e))));
        }
        // Holes are not sent: the receiver keeps what it has (earlier rounds, or zeros
        // where the source was never touched).
        let pages = plan
            .iter()
            .filter(|s| matches!(s, Span::Pages { .. }))
            .copied();
        let mut sink = Paced {
            client,
            rate: if paced { self.opts.bandwidth } else { None },
            cancel: self.opts.cancel.as_ref(),
            start: Instant::now(),
            sent: 0,
        };
        let r = snapshot(source, pages, &mut sink, &self.opts.snapshot);
        let sent = self.client.as_ref().map_or(0, |c| c.report().bytes) - before;
        match r {
            Ok(report) => Ok((report.pages, sent, t.elapsed())),
            Err(e) if self.cancelled() && cancelled_at_safe_point(&e) => {
                Err(self.fail(phase, MigrateErrorKind::Cancelled))
            }
            Err(e) => Err(self.fail(phase, send_error(e))),
        }
    }

    /// The final round, the source paused: what was written since the last round, then
    /// `CLOSE` and the receiver's answer.
    fn final_round(
        &mut self,
        source: &Source<'_>,
        tracker: &mut Tracker,
        round: u32,
    ) -> Result<(), MigrateError> {
        let phase = Phase::Final(round);
        let plan = match tracker.take() {
            Ok(p) => p,
            Err(e) => return Err(self.fail(phase, MigrateErrorKind::Track(Box::new(e)))),
        };
        let (pages, bytes, time) = self.send_round(source, &plan, round, phase, false)?;
        self.check_cancel(phase)?;
        self.rounds.push(RoundReport {
            round,
            pages,
            bytes,
            time,
            written_meanwhile: 0,
            is_final: true,
        });
        let client = self.client.take().expect("open until the end");
        client.close().map_err(|e| MigrateError {
            phase: Phase::Close,
            rounds: std::mem::take(&mut self.rounds),
            kind: MigrateErrorKind::Stream(Box::new(e)),
        })?;
        Ok(())
    }
}

/// The error our pacing sink returns when cancelled, before anything of the entry went.
#[derive(Debug)]
struct CancelledHere;

impl fmt::Display for CancelledHere {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("cancelled between two entries")
    }
}

impl std::error::Error for CancelledHere {}

fn cancelled_at_safe_point(e: &SnapshotError) -> bool {
    let SnapshotError::Dump(d) = e else {
        return false;
    };
    matches!(&d.kind, DumpErrorKind::Sink { error, .. }
        if error.get_ref().is_some_and(|i| i.is::<CancelledHere>()))
}

fn send_error(e: SnapshotError) -> MigrateErrorKind {
    MigrateErrorKind::Send(Box::new(e))
}

/// The client, paced to a rate and stopped by a cancel between entries.
struct Paced<'a> {
    client: &'a mut PageServerClient,
    rate: Option<u64>,
    cancel: Option<&'a CancelToken>,
    start: Instant,
    /// Bytes of pages sent this round.
    sent: u64,
}

impl Paced<'_> {
    fn stop(e: PagemapEntry) -> DumpErrorKind {
        DumpErrorKind::Sink {
            entry: e,
            error: std::io::Error::new(std::io::ErrorKind::Interrupted, CancelledHere),
        }
    }

    /// Before an entry: stop if cancelled.
    fn before(&mut self, e: PagemapEntry) -> Result<(), DumpErrorKind> {
        if self.cancel.is_some_and(CancelToken::is_cancelled) {
            return Err(Self::stop(e));
        }
        Ok(())
    }

    /// After an entry of `len` bytes: wait while the round is ahead of its rate (a
    /// cancel ends the wait and stops before the next entry).
    fn after(&mut self, e: PagemapEntry, len: usize) -> Result<(), DumpErrorKind> {
        self.sent += len as u64;
        if let Some(rate) = self.rate.filter(|&r| r > 0) {
            let due = Duration::from_secs_f64(self.sent as f64 / rate as f64);
            let ahead = due.saturating_sub(self.start.elapsed());
            if !ahead.is_zero() && sleep(self.cancel, ahead) {
                return Err(Self::stop(e));
            }
        }
        Ok(())
    }
}

impl sealed::Sealed for Paced<'_> {}
impl DumpSink for Paced<'_> {
    fn present(
        &mut self,
        e: PagemapEntry,
        pipe: BorrowedFd<'_>,
        len: usize,
        pinned: bool,
    ) -> Result<(), DumpErrorKind> {
        self.before(e)?;
        self.client.present(e, pipe, len, pinned)?;
        self.after(e, len)
    }
    fn absent(&mut self, e: PagemapEntry) -> Result<(), DumpErrorKind> {
        self.before(e)?;
        self.client.absent(e)
    }
    fn present_chunks(
        &mut self,
        e: PagemapEntry,
        chunks: &[Chunk<'_>],
    ) -> Result<(), DumpErrorKind> {
        self.before(e)?;
        self.client.present_chunks(e, chunks)?;
        self.after(e, chunks.iter().map(Chunk::len).sum())
    }
    fn prefers_memory(&self, sealed: bool) -> bool {
        self.client.prefers_memory(sealed)
    }
}
