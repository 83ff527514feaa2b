//! Helpers shared by the end-to-end tests: open file descriptor counts, running a test
//! again as an unprivileged user, and the paths of committed fixtures.

use std::path::PathBuf;
use std::process::Command;

/// The number of file descriptors this process has open (entries of `/proc/self/fd`).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// The environment variable that marks a test process re-run as an unprivileged user.
pub const AS_NOBODY: &str = "PAGE_PIPE_TEST_AS_NOBODY";

/// The environment variable that marks a test process re-run alone.
pub const ALONE: &str = "PAGE_PIPE_TEST_ALONE";

/// Runs the test `name` of the current test binary again in a process of its own, and
/// returns `true` there; in the parent it asserts the re-run passed and returns `false`.
///
/// Tests that count the open file descriptors of the process call this first, so that
/// tests running in parallel threads cannot disturb the count.
pub fn alone(name: &str) -> bool {
    if std::env::var_os(ALONE).is_some() || std::env::var_os(AS_NOBODY).is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let out = Command::new(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(ALONE, "1")
        .output()
        .expect("re-run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name} failed when run alone:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    eprint!("{stderr}");
    false
}

/// What [`unprivileged`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Unprivileged {
    /// This process is the unprivileged re-run: run the test body.
    RunBody,
    /// The re-run happened and passed; the caller returns.
    Passed,
    /// No unprivileged user could be had; the reason was printed.
    Skipped,
}

/// Runs the test `name` of the current test binary again as user and group 65534
/// (`nobody`) with `setpriv`, and asserts it passed.
///
/// Call it first thing in a test: in the unprivileged re-run it returns
/// [`Unprivileged::RunBody`] and the test goes on with its body; in the parent it waits for
/// the re-run and returns [`Unprivileged::Passed`]. Where the re-run cannot be arranged
/// (not root, no `setpriv`, the test binary not readable by `nobody`) it prints why and
/// returns [`Unprivileged::Skipped`].
pub fn unprivileged(name: &str) -> Unprivileged {
    if std::env::var_os(AS_NOBODY).is_some() {
        return Unprivileged::RunBody;
    }
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED {name}: not root, so cannot switch to an unprivileged user");
        return Unprivileged::Skipped;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(AS_NOBODY, "1")
        .current_dir("/")
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED {name}: cannot run setpriv: {e}");
            return Unprivileged::Skipped;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success()
        && (stderr.contains("Permission denied") || stderr.contains("cannot execute"))
        && !stdout.contains("running 1 test")
    {
        eprintln!(
            "SKIPPED {name}: user nobody cannot run {}: {stderr}",
            exe.display()
        );
        return Unprivileged::Skipped;
    }
    assert!(
        out.status.success(),
        "{name} failed as user nobody:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(
        stdout.contains("1 passed"),
        "{name} did not run as user nobody:\n{stdout}\n{stderr}"
    );
    eprint!("{stderr}");
    Unprivileged::Passed
}

/// Lowers this process's `RLIMIT_NOFILE` (soft and hard) to `n`.
pub fn limit_open_files(n: u64) {
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(n),
            maximum: Some(n),
        },
    )
    .expect("setrlimit(RLIMIT_NOFILE)");
}

/// The folder of committed test fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A buffer of `pages` whole pages that starts on a page boundary, with the page size.
#[derive(Debug)]
pub struct AlignedPages {
    backing: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedPages {
    /// `pages` zeroed pages.
    pub fn new(pages: usize) -> Self {
        let ps = page_pipe_sys::page_size().get();
        let backing = vec![0u8; (pages + 1) * ps];
        let start = backing.as_ptr().align_offset(ps);
        Self {
            backing,
            start,
            len: pages * ps,
        }
    }

    /// The pages.
    pub fn bytes(&self) -> &[u8] {
        &self.backing[self.start..self.start + self.len]
    }

    /// The pages, to change.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.backing[self.start..self.start + self.len]
    }
}

/// Fills `buf` with a pattern that differs from page to page and from `seed` to `seed`.
pub fn fill_pattern(buf: &mut [u8], seed: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7) ^ ((i >> 12) as u8).wrapping_mul(13) ^ seed;
    }
}

/// A proptest configuration of `cases` cases whose failures are kept in
/// `tests/proptest-regressions/<name>.txt`: one file per test binary, since every binary's
/// source file is called `main.rs`.
pub fn proptest_config(cases: u32, name: &'static str) -> proptest::test_runner::Config {
    use proptest::test_runner::{Config, FileFailurePersistence};
    let path: &'static str = Box::leak(format!("proptest-regressions/{name}.txt").into_boxed_str());
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(path))),
        ..Config::default()
    }
}

/// Proptest strategies for page pipe configurations and operation sequences.
pub mod strategies {
    use page_pipe::testing::{Config, FakeKernel, Op};
    use proptest::prelude::*;

    /// One operation; mostly adds, with releases, re-inits and bad addresses mixed in.
    pub fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..4, 1u64..80, any::<bool>())
                .prop_map(|(gap, n, lazy)| Op::Pages { gap, n, lazy }),
            3 => (0u64..3, 1u64..20, any::<bool>())
                .prop_map(|(gap, n, parent)| Op::Holes { gap, n, parent }),
            1 => any::<usize>().prop_map(|nth| Op::Release { nth }),
            1 => Just(Op::Reinit),
            1 => proptest::option::of(0usize..6).prop_map(|ok| Op::Drain { ok }),
            1 => (1u64..8192).prop_map(|off| Op::Unaligned { off }),
            1 => (1u64..8).prop_map(|back| Op::Backwards { back }),
        ]
    }

    /// A fake kernel with small pipes and failures at chosen calls.
    pub fn fake_kernel() -> impl Strategy<Value = FakeKernel> {
        (
            1u64..=16,
            0u32..=8,
            proptest::option::weighted(0.2, 0u64..8),
            proptest::collection::btree_set(0u64..24, 0..3),
            proptest::collection::btree_set(0u64..48, 0..4),
        )
            .prop_map(|(def, max, tiny, fm, fr)| {
                let mut k = FakeKernel::new(4096);
                k.default_pages = def;
                k.max_pages = 1 << max;
                k.tiny_after = tiny;
                k.fail_make = fm;
                k.fail_resize = fr;
                k
            })
    }

    /// A configuration over `kernel`.
    pub fn config(kernel: impl Strategy<Value = FakeKernel>) -> impl Strategy<Value = Config> {
        (
            (any::<bool>(), any::<bool>(), any::<bool>()),
            prop_oneof![1usize..12, 12usize..200],
            proptest::option::weighted(0.3, 1u64..300),
            proptest::option::weighted(0.2, 1u64..300),
            kernel,
        )
            .prop_map(
                |((chunk, lazy_pages, caller_iovs), budget, max, initial, kernel)| Config {
                    chunk,
                    lazy_pages,
                    caller_iovs,
                    budget,
                    max_pipe_pages: max,
                    initial_pipe_pages: initial,
                    kernel,
                },
            )
    }
}

/// The `crit` command (CRIU's image tool), or `None` after saying why the caller skips.
pub fn crit(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("crit"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        eprintln!("SKIPPED {test}: crit is not installed (apt-get install criu)");
    }
    found
}

/// A fresh directory under the system's temporary directory, removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Makes `<tmp>/page-pipe-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("page-pipe-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("make a temporary directory");
        Self(p)
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Asserts that the image in `dir`, read through its parent chain from `base`, holds
/// exactly `mem`.
pub fn assert_restores(dir: &std::path::Path, base: u64, mem: &[u8]) {
    let mut back = vec![0u8; mem.len()];
    page_pipe::image::Image::open(dir)
        .unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
        .read(base, &mut back)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    assert!(
        back == mem,
        "the image in {} differs from the memory",
        dir.display()
    );
}

/// `pages` pages of anonymous memory filled with [`fill_pattern`] and `seed`.
pub fn patterned(pages: usize, seed: u8) -> memmap2::MmapMut {
    let ps = page_pipe_sys::page_size().get();
    let mut m = memmap2::MmapOptions::new()
        .len(pages * ps)
        .map_anon()
        .expect("map anonymous memory");
    fill_pattern(&mut m, seed);
    m
}

/// The `snapshot` demo of the `page-pipe` crate, built (once per test process, unless
/// this is an unprivileged re-run, which cannot write the target directory) so that it
/// is up to date.
pub fn snapshot_demo() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/examples/snapshot
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let demo = profile_dir.join("examples").join("snapshot");
    if std::env::var_os(AS_NOBODY).is_none() {
        BUILT.call_once(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-q", "-p", "page-pipe", "--example", "snapshot"]);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("run cargo build");
            assert!(st.success(), "cannot build the snapshot demo");
        });
    }
    demo
}

/// The example `name` of the `page-pipe` crate, built (once per test process and name,
/// unless this is an unprivileged re-run) in the profile the tests run in.
pub fn example_binary(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = profile_dir.join("examples").join(name);
    if std::env::var_os(AS_NOBODY).is_none() {
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        if !built.iter().any(|b| b == name) {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-q", "-p", "page-pipe", "--example", name]);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("run cargo build");
            assert!(st.success(), "cannot build the example {name}");
            built.push(name.to_string());
        }
    }
    bin
}
