//! The `page-pipe` command end to end: on the real CRIU 4.2 dump committed with the tests,
//! on broken copies of it, and on bad arguments; exit statuses as documented.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use page_pipe::{PageFlags, PagemapEntry};

fn exe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_page-pipe"))
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/criu-4.2-a")
}

fn run(args: &[&str]) -> Output {
    exe().args(args).output().expect("run page-pipe")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("page-pipe-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    /// A copy of the fixture.
    fn copy_of_fixture(tag: &str) -> Self {
        let s = Self::new(tag);
        for f in std::fs::read_dir(fixture()).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), s.0.join(f.file_name())).unwrap();
        }
        s
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn inspect_json_is_one_object_with_the_entries_as_crit_names_them() {
    let out = run(&["inspect", fixture().to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON value");
    assert_eq!(doc["magic"], "PAGEMAP");
    let entries = doc["entries"].as_array().expect("an entries array");
    // The head first, as crit prints it; then one object per pagemap entry.
    assert_eq!(entries[0]["pages_id"], 1);
    let img = page_pipe::image::Image::open(fixture()).unwrap();
    assert_eq!(entries.len(), img.entries().len() + 1);
    for (j, e) in entries[1..].iter().zip(img.entries()) {
        assert_eq!(j["vaddr"], format!("{:#x}", e.vaddr));
        assert_eq!(j["nr_pages"], e.pages);
        let flags = j["flags"].as_str().unwrap();
        assert_eq!(flags.contains("PE_PRESENT"), e.is_present(), "{flags}");
    }
    let present: u64 = entries[1..]
        .iter()
        .filter(|e| e["flags"].as_str().unwrap().contains("PE_PRESENT"))
        .map(|e| e["nr_pages"].as_u64().unwrap())
        .sum();
    assert_eq!(present, doc["summary"]["present_pages"].as_u64().unwrap());
    // No progress bar or anything else on stderr when it is not a terminal.
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

/// Where crit is installed, our JSON names the same entries with the same addresses and
/// flags as `crit decode --pretty` does (addresses in hex).
#[test]
fn inspect_json_agrees_with_crit() {
    let crit = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("crit"))
            .find(|p| p.is_file())
    });
    let Some(crit) = crit else {
        eprintln!("SKIPPED inspect_json_agrees_with_crit: crit is not installed");
        return;
    };
    let pagemap = fixture().join("pagemap-16426.img");
    let theirs = Command::new(crit)
        .args(["decode", "--pretty", "-i", pagemap.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(theirs.status.success(), "{}", text(&theirs.stderr));
    let theirs: serde_json::Value = serde_json::from_slice(&theirs.stdout).unwrap();
    let ours = run(&["inspect", fixture().to_str().unwrap(), "--json"]);
    let ours: serde_json::Value = serde_json::from_slice(&ours.stdout).unwrap();
    assert_eq!(ours["magic"], theirs["magic"]);
    let (a, b) = (
        ours["entries"].as_array().unwrap(),
        theirs["entries"].as_array().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    assert_eq!(a[0], b[0], "the head");
    for (x, y) in a[1..].iter().zip(&b[1..]) {
        assert_eq!(x["vaddr"], y["vaddr"]);
        assert_eq!(x["flags"], y["flags"]);
    }
}

#[test]
fn inspect_prints_the_notation_and_totals() {
    let out = run(&["inspect", fixture().to_str().unwrap()]);
    assert!(out.status.success());
    let s = text(&out.stdout);
    assert!(s.contains("141 entries"), "{s}");
    assert!(s.contains("totals: 141 entries; 413 present pages"), "{s}");
    assert!(s.lines().nth(2).unwrap().starts_with("00:1,02:2,"), "{s}");
}

/// Extracted pages hold the pattern the dumped program wrote (see the fixture's
/// target.json: byte i of page p of the dense region is (i*7 + p*13 + seed) & 0xff).
#[test]
fn extract_writes_the_dumped_pages() {
    let dir = Scratch::new("extract");
    let out_file = dir.0.join("dense.bin");
    let out = run(&[
        "extract",
        fixture().to_str().unwrap(),
        "--vaddr",
        "7fcc39dc6000",
        "--pages",
        "256",
        "--out",
        out_file.to_str().unwrap(),
        "--strict",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bytes = std::fs::read(&out_file).unwrap();
    assert_eq!(bytes.len(), 256 * 4096);
    for (p, page) in bytes.chunks(4096).enumerate() {
        for (i, &b) in page.iter().enumerate() {
            assert_eq!(
                b as usize,
                (i * 7 + p * 13 + 11) & 0xff,
                "page {p} byte {i}"
            );
        }
    }
    // A page in no entry is refused with --strict: exit 2, one line.
    let out = run(&[
        "extract",
        fixture().to_str().unwrap(),
        "--vaddr",
        "1000",
        "--pages",
        "1",
        "--out",
        out_file.to_str().unwrap(),
        "--strict",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr).lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn verify_passes_a_good_image_and_fails_broken_ones_with_status_1() {
    let out = run(&["verify", fixture().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("verify: ok"),
        "{}",
        text(&out.stdout)
    );

    // A pages file one page short.
    let short = Scratch::copy_of_fixture("verify-short");
    let pages = short.0.join("pages-1.img");
    let len = std::fs::metadata(&pages).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    let out = run(&["verify", short.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("page-pipe: verify:") && err.contains("pages-1.img"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // A pagemap cut inside an entry.
    let cut = Scratch::copy_of_fixture("verify-cut");
    let pm = cut.0.join("pagemap-16426.img");
    let bytes = std::fs::read(&pm).unwrap();
    std::fs::write(&pm, &bytes[..bytes.len() - 3]).unwrap();
    let out = run(&["verify", cut.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));

    // Nothing there at all: that is an error, not a verdict on an image.
    let out = run(&["verify", "/nonexistent/page-pipe-images"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn usage_errors_exit_with_status_2() {
    assert_eq!(run(&["inspect"]).status.code(), Some(2));
    assert_eq!(run(&["frobnicate"]).status.code(), Some(2));
    let out = run(&[
        "extract", "x", "--vaddr", "zz", "--pages", "1", "--out", "y",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let help = run(&["--help"]);
    assert!(help.status.success());
    assert!(text(&help.stdout).contains("Exit status"));
}

#[test]
fn flatten_then_diff_says_the_images_hold_the_same_pages() {
    let dir = Scratch::new("flatten");
    let flat = dir.0.join("flat");
    let out = run(&[
        "flatten",
        fixture().to_str().unwrap(),
        flat.to_str().unwrap(),
        "--no-sync",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("flattened into"),
        "{}",
        text(&out.stdout)
    );
    let same = run(&["diff", fixture().to_str().unwrap(), flat.to_str().unwrap()]);
    assert_eq!(same.status.code(), Some(0), "{}", text(&same.stderr));
    // One byte changed in the flattened pages: exit 1, the page named.
    let pages = std::fs::read_dir(&flat)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("pages-")
        })
        .unwrap();
    let mut bytes = std::fs::read(&pages).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&pages, bytes).unwrap();
    let differ = run(&["diff", fixture().to_str().unwrap(), flat.to_str().unwrap()]);
    assert_eq!(differ.status.code(), Some(1), "{}", text(&differ.stderr));
    assert!(text(&differ.stdout).contains("0x55573d98e000 +1 pages: bytes differ"));
    // An error is status 2.
    let err = run(&["diff", fixture().to_str().unwrap(), "/nonexistent/x"]);
    assert_eq!(err.status.code(), Some(2));
}

/// `page-server --once` takes one session from a client and commits its image; a
/// session that breaks off makes it exit with status 1 and commit nothing.
#[test]
fn page_server_once_serves_one_session() {
    use page_pipe::page_server::PageServerClient;
    use page_pipe::{PageFlags, PagemapEntry};
    use std::io::{BufRead, BufReader};
    for clean in [true, false] {
        let dir = Scratch::new(if clean { "ps-clean" } else { "ps-broken" });
        let mut child = exe()
            .args([
                "page-server",
                "--dir",
                dir.0.to_str().unwrap(),
                "--port",
                "0",
                "--once",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .trim_end_matches(',')
            .to_string();
        let ps = page_pipe::page_size();
        let mut c = PageServerClient::connect(addr.as_str(), 42).unwrap();
        let e = PagemapEntry {
            vaddr: 0x10 * ps as u64,
            pages: 1,
            flags: PageFlags::PRESENT,
        };
        c.send_entry(e, &vec![9u8; ps]).unwrap();
        if clean {
            c.close().unwrap();
        } else {
            drop(c);
        }
        let status = child.wait().unwrap();
        let committed = dir.0.join("pagemap-42.img").exists();
        if clean {
            assert!(status.success() && committed);
        } else {
            assert_eq!(status.code(), Some(1));
            assert!(!committed);
        }
    }
}

/// `receive` on a free TCP port: its address as printed, and the running child.
fn receiver(out: &Path, base: u64, size: &str) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = exe()
        .args(["receive", "--out", out.to_str().unwrap(), "--base"])
        .arg(format!("{base:x}"))
        .args(["--size", size, "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run page-pipe receive");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("receive: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, addr)
}

#[test]
fn receive_writes_the_rounds_into_a_sparse_memory_file_committed_at_close() {
    use page_pipe::page_server::PageServerClient;
    use page_pipe::page_server::wire::ImageId;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let ps = page_pipe::page_size();
    let base = 0x7000_0000u64;
    let dir = Scratch::new("receive");
    let out = dir.0.join("mem.raw");
    let (child, addr) = receiver(&out, base, "64K");
    let entry = |page: u64, pages: u64| PagemapEntry {
        vaddr: base + page * ps as u64,
        pages,
        flags: PageFlags::PRESENT,
    };
    let mut c = PageServerClient::connect_tcp(addr.as_str()).unwrap();
    // Round 1: pages 1 and 2; round 2 writes page 2 again and page 5.
    c.open(ImageId::pagemap(1).unwrap()).unwrap();
    c.send_entry(entry(1, 2), &[[1u8].repeat(ps), [2u8].repeat(ps)].concat())
        .unwrap();
    c.open(ImageId::pagemap(2).unwrap()).unwrap();
    c.send_entry(entry(2, 1), &[9u8].repeat(ps)).unwrap();
    c.send_entry(entry(5, 1), &[5u8].repeat(ps)).unwrap();
    c.close().unwrap();
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", text(&done.stderr));
    let stdout = text(&done.stdout);
    assert!(stdout.contains("4 pages"), "{stdout}");
    let mem = std::fs::read(&out).unwrap();
    assert_eq!(mem.len(), 64 << 10);
    let page = |n: usize| &mem[n * ps..(n + 1) * ps];
    for (n, byte) in [(0, 0u8), (1, 1), (2, 9), (3, 0), (4, 0), (5, 5), (6, 0)] {
        assert!(
            page(n).iter().all(|&b| b == byte),
            "page {n} is not all {byte}"
        );
    }
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Sparse: the pages never sent (or all zeros) take no blocks.
    assert!(meta.blocks() * 512 < meta.len(), "{} blocks", meta.blocks());
    assert_eq!(
        std::fs::read_dir(&dir.0).unwrap().count(),
        1,
        "a temporary file left"
    );
}

#[test]
fn receive_leaves_no_file_when_the_session_fails() {
    use page_pipe::page_server::PageServerClient;
    use page_pipe::page_server::wire::ImageId;
    let ps = page_pipe::page_size() as u64;
    let base = 0x7000_0000u64;
    let dir = Scratch::new("receive-fail");
    // A run past the end of the memory: refused, exit 1, no file.
    let out = dir.0.join("outside.raw");
    let (child, addr) = receiver(&out, base, &format!("{}", 4 * ps));
    let mut c = PageServerClient::connect_tcp(addr.as_str()).unwrap();
    c.open(ImageId::pagemap(1).unwrap()).unwrap();
    let past = PagemapEntry {
        vaddr: base + 3 * ps,
        pages: 2,
        flags: PageFlags::PRESENT,
    };
    let _ = c.send_entry(past, &vec![1u8; 2 * ps as usize]);
    drop(c);
    let done = child.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(1), "{}", text(&done.stderr));
    let err = text(&done.stderr);
    assert!(err.contains(&format!("{:x}", base + 4 * ps)), "{err}");
    // A sender that goes away before CLOSE: exit 1, no file.
    let out2 = dir.0.join("cut.raw");
    let (child, addr) = receiver(&out2, base, "16K");
    let mut c = PageServerClient::connect_tcp(addr.as_str()).unwrap();
    c.open(ImageId::pagemap(1).unwrap()).unwrap();
    drop(c);
    let done = child.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(1), "{}", text(&done.stderr));
    assert_eq!(
        std::fs::read_dir(&dir.0).unwrap().count(),
        0,
        "a file was left"
    );
    // An existing file is not overwritten; a size of part of a page is refused.
    std::fs::write(&out, b"keep").unwrap();
    let o = run(&[
        "receive",
        "--out",
        out.to_str().unwrap(),
        "--base",
        "0",
        "--size",
        "16K",
        "--port",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("exists"), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    let o = run(&[
        "receive",
        "--out",
        out2.to_str().unwrap(),
        "--base",
        "0",
        "--size",
        "100",
        "--port",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("pages"), "{}", text(&o.stderr));
}

/// A session that fails because the peer stopped reading (the server's reply meets
/// `EPIPE`) is a failed session: `--once` exits with status 1 and says so naming the
/// peer, not 0 as for a reader of stdout that went away (`| head`).
#[test]
fn page_server_once_fails_when_the_peer_stops_reading() {
    use page_pipe::page_server::wire::{ImageId, Message};
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let dir = Scratch::new("ps-epipe");
    let sock = dir.0.join("sock");
    let images = dir.0.join("images");
    let mut child = exe()
        .args(["page-server", "--dir", images.to_str().unwrap()])
        .args(["--unix", sock.to_str().unwrap(), "--once"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening"), "{line}");
    let mut s = UnixStream::connect(&sock).unwrap();
    // The server's sends to a Unix socket whose peer shut its reading side fail with
    // EPIPE at once.
    s.shutdown(std::net::Shutdown::Read).unwrap();
    let open = Message::Open2 {
        image: ImageId::pagemap(7).unwrap(),
    };
    s.write_all(&open.encode()).unwrap();
    let out = child.wait_with_output().unwrap();
    drop(s);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("unix:") && err.contains("Broken pipe"),
        "{err}"
    );
    assert!(!images.join("pagemap-7.img").exists());
}

/// A reader of stdout that went away (`| head`) is not an error and never a panic: each
/// command writing to a pipe whose reading end is closed exits 0 quietly.
#[test]
fn a_closed_stdout_is_not_an_error() {
    let dir = Scratch::new("closed-stdout");
    let f = fixture();
    let f = f.to_str().unwrap();
    let flat = dir.0.join("flat");
    let flat = flat.to_str().unwrap();
    let vaddr = "55573d98e000";
    let cases: [&[&str]; 6] = [
        &["inspect", f],
        &["diff", f, f],
        &["inspect", f, "--json"],
        &["verify", f],
        &["flatten", f, flat, "--no-sync"],
        &[
            "extract",
            f,
            "--vaddr",
            vaddr,
            "--pages",
            "1",
            "--out",
            "/dev/null",
        ],
    ];
    for args in cases {
        let (r, w) = std::io::pipe().unwrap();
        drop(r);
        let out = exe()
            .args(args)
            .stdout(w)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

/// `extract --out` naming a file of the image it reads (or a link to one) is refused
/// before anything is truncated: the image stays whole.
#[test]
fn extract_never_truncates_the_image_it_reads() {
    let dir = Scratch::copy_of_fixture("extract-onto-itself");
    let d = dir.0.to_str().unwrap();
    let link = dir.0.join("out-link");
    std::os::unix::fs::symlink(dir.0.join("pages-1.img"), &link).unwrap();
    for out in [
        dir.0.join("pages-1.img"),
        dir.0.join("pagemap-16426.img"),
        link,
    ] {
        let o = run(&[
            "extract",
            d,
            "--vaddr",
            "55573d98e000",
            "--pages",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{}: {err}", out.display());
        assert!(err.contains(out.to_str().unwrap()), "{err}");
        let v = run(&["verify", d]);
        assert!(v.status.success(), "{}: {}", out.display(), text(&v.stderr));
    }
    std::fs::remove_file(dir.0.join("out-link")).unwrap();
}
