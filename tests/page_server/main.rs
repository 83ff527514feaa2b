//! CRIU's page-server protocol, both ends, against a real CRIU 4.2 session recorded by a
//! proxy (`tests/fixtures/criu-4.2-page-server-a`): our server replays the client's bytes
//! into the same replies and images; our client sends the same bytes for the same
//! entries. Then round trips, faults on both ends, parents, `GET`, several clients.

mod faults;
mod hostile;
mod sessions;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use page_pipe::BufFlags;
use page_pipe::image::{Image, PageFlags, Pagemap, PagemapEntry};
use page_pipe::page_server::wire::{Decoder, ImageId, Limits, Message, WireErrorKind};
use page_pipe::page_server::{
    Incoming, PageServer, PageServerClient, ServerConfig, SessionError, SessionReport, check_stream,
};
use page_pipe::snapshot::{Drain, SnapshotOptions, Span, snapshot};
use page_pipe::{Source, page_size};
use page_pipe_tests::{TempDir, example_binary, fixtures};

/// The recorded session's pid (its pagemap id).
const PID: u64 = 12856;

fn fixture(name: &str) -> PathBuf {
    fixtures().join("criu-4.2-page-server-a").join(name)
}

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

/// The bytes CRIU 4.2's client sent.
fn criu_stream() -> Vec<u8> {
    read(fixture("client-stream.bin"))
}

/// A configuration for tests: no syncing, a short idle timeout.
fn config(dir: &Path) -> ServerConfig {
    ServerConfig {
        sync: false,
        idle_timeout: Some(Duration::from_secs(10)),
        ..ServerConfig::new(dir)
    }
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Sends `bytes` (in pieces of `piece` bytes, pausing `pause` between them), closes
/// the sending side, and returns everything the server sent back until it closed.
fn replay(mut s: UnixStream, bytes: &[u8], piece: usize, pause: Duration) -> Vec<u8> {
    let mut r = s.try_clone().unwrap();
    let reader = thread::spawn(move || {
        let mut back = Vec::new();
        let _ = r.read_to_end(&mut back);
        back
    });
    for chunk in bytes.chunks(piece.max(1)) {
        if s.write_all(chunk).is_err() {
            break;
        }
        if !pause.is_zero() {
            thread::sleep(pause);
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    reader.join().unwrap()
}

/// Serves one session of `server` over a socket pair while `client` plays the other
/// end; returns the session's result and what `client` returned.
fn session<T: Send>(
    server: &PageServer,
    client: impl FnOnce(UnixStream) -> T + Send,
) -> (Result<SessionReport, SessionError>, T) {
    let (a, b) = UnixStream::pair().unwrap();
    thread::scope(|s| {
        let t = s.spawn(move || client(a));
        let r = server.serve(Incoming::from_unix(b));
        (r, t.join().unwrap())
    })
}

/// A server that never listens for others: sessions go through [`session`].
fn server(dir: &Path) -> PageServer {
    PageServer::bind("127.0.0.1:0", config(dir)).unwrap()
}

/// Plays a page server that answers `OPEN2` with `has_parent`, `PARENT` with 0 and
/// `CLOSE` with 0, and returns every byte the client sent.
fn recording_peer(mut s: UnixStream, has_parent: bool) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let limits = Limits::default();
        let mut all = Vec::new();
        loop {
            let mut h = [0u8; 32];
            if s.read_exact(&mut h).is_err() {
                return all;
            }
            all.extend_from_slice(&h);
            let m = Message::decode(&h, &limits).expect("the client sends valid headers");
            let mut pages = vec![0u8; m.payload_len(limits.page_size) as usize];
            s.read_exact(&mut pages).unwrap();
            all.extend_from_slice(&pages);
            match m {
                Message::Open2 { .. } => s.write_all(&[u8::from(has_parent)]).unwrap(),
                Message::Parent { .. } => s.write_all(&0i32.to_ne_bytes()).unwrap(),
                Message::Close | Message::ForceClose => {
                    s.write_all(&0i32.to_ne_bytes()).unwrap();
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest).unwrap();
                    all.extend(rest);
                    return all;
                }
                _ => {}
            }
        }
    })
}

/// The recorded entries with their pages.
fn criu_entries(stream: &[u8]) -> Vec<(PagemapEntry, Vec<u8>)> {
    Decoder::new(stream, Limits::default())
        .map(|f| f.unwrap())
        .filter_map(|f| Some((f.message.entry()?, f.payload.to_vec())))
        .collect()
}

fn assert_like_criu(dir: &Path) {
    assert_eq!(
        names(dir),
        ["pagemap-12856.img", "pages-65537.img"],
        "only the two images, no temporary files"
    );
    assert!(
        read(dir.join("pages-65537.img")) == read(fixture("pages-65537.img")),
        "the pages file is byte-identical to CRIU's"
    );
    let ours = Pagemap::decode(&read(dir.join("pagemap-12856.img")), page_size()).unwrap();
    let criu = Pagemap::decode(&read(fixture("pagemap-12856.img")), page_size()).unwrap();
    assert_eq!(ours, criu, "equal entries and pages id");
    assert!(
        read(dir.join("pagemap-12856.img")) == read(fixture("pagemap-12856.img")),
        "the pagemap is byte-identical to CRIU's too"
    );
}

/// The recorded stream, replayed into our server, gives CRIU's reply bytes and CRIU's
/// images: equal entries, byte-identical pages file and pagemap.
#[test]
fn replaying_criu_s_session_gives_its_replies_and_images() {
    let dir = TempDir::new("ps-replay");
    let srv = server(dir.path());
    let stream = criu_stream();
    let (r, replies) = session(&srv, |c| replay(c, &stream, 1 << 20, Duration::ZERO));
    let report = r.unwrap();
    assert_eq!(replies, read(fixture("server-replies.bin")));
    assert_eq!(report.messages, 78);
    assert_eq!(report.bytes, stream.len() as u64);
    assert_eq!(report.images.len(), 1);
    assert_eq!(report.images[0].pages_id, 65537);
    assert_eq!(report.images[0].summary.entries, 76);
    assert_like_criu(dir.path());
    // Restorable by our own reader, through the pages file.
    let img = Image::open(dir.path()).unwrap();
    assert_eq!(img.entries().len(), 76);
}

/// The same, through the example as a user runs it: `page_server --once` exits 0 after
/// the session; a cut session makes it exit non-zero with no image.
#[test]
fn the_example_serves_one_session_with_once() {
    let exe = example_binary("page_server");
    for cut in [None, Some(1000)] {
        let dir = TempDir::new("ps-once");
        let img = dir.path().join("img");
        let mut child = Command::new(&exe)
            .args(["--dir", img.to_str().unwrap(), "--port", "0", "--once"])
            .args(["--idle-timeout", "10", "--no-sync"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while out.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        let line = String::from_utf8(line).unwrap();
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .trim_end_matches(',')
            .to_string();
        let stream = criu_stream();
        let bytes = &stream[..cut.unwrap_or(stream.len())];
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut replies = Vec::new();
        s.read_to_end(&mut replies).unwrap();
        let status = child.wait().unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        match cut {
            None => {
                assert!(status.success(), "{err}");
                assert_eq!(replies, read(fixture("server-replies.bin")));
                assert_like_criu(&img);
            }
            Some(_) => {
                assert!(!status.success());
                assert!(err.contains("ended in"), "{err}");
                assert_eq!(replies, [0], "only OPEN2 was answered");
                assert!(names(&img).is_empty(), "{:?}", names(&img));
            }
        }
    }
}

/// Our client, given the recorded entries and pages, sends exactly the bytes CRIU's
/// client sent: headers, pages, `CLOSE`.
#[test]
fn our_client_sends_criu_s_bytes_for_the_same_entries() {
    let stream = criu_stream();
    let (a, b) = UnixStream::pair().unwrap();
    let peer = recording_peer(b, false);
    let mut c = PageServerClient::from_unix(a).unwrap();
    assert!(!c.open(ImageId::pagemap(PID).unwrap()).unwrap());
    for (e, pages) in criu_entries(&stream) {
        c.send_entry(e, &pages).unwrap();
    }
    let sent = c.close().unwrap();
    let got = peer.join().unwrap();
    assert_eq!(sent.entries, 76);
    assert_eq!(sent.present_pages, 157);
    assert_eq!(sent.bytes, stream.len() as u64);
    assert_eq!(got.len(), stream.len());
    let first_diff = got.iter().zip(&stream).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "the streams differ");
}

/// The same entries taken through a page pipe (`snapshot` with a source at the recorded
/// addresses) give CRIU's headers too, through pipes or from memory: one `ADD_F` per
/// run, never joined.
#[test]
fn a_snapshot_of_the_recorded_memory_sends_criu_s_bytes() {
    let stream = criu_stream();
    let entries = criu_entries(&stream);
    let pages: u64 = entries.iter().map(|(e, _)| e.pages).sum();
    let limits = page_pipe_sys::PipeLimits::get().unwrap();
    if (limits.max_grant_pages() as u64) < pages {
        eprintln!(
            "SKIPPED a_snapshot_of_the_recorded_memory_sends_criu_s_bytes: pipes hold {} pages here, the recording needs one of {pages} to keep its runs whole",
            limits.max_grant_pages()
        );
        return;
    }
    let ps = page_size();
    let mut mem = page_pipe_tests::AlignedPages::new(pages as usize);
    let mut at = 0;
    for (_, p) in &entries {
        mem.bytes_mut()[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    let mut source = Source::new();
    let mut at = 0;
    for (e, _) in &entries {
        let len = e.pages as usize * ps;
        source = source
            .with_slice(e.vaddr, &mem.bytes()[at..at + len])
            .unwrap();
        at += len;
    }
    let plan: Vec<Span> = entries
        .iter()
        .map(|(e, _)| Span::Pages {
            addr: e.vaddr,
            pages: e.pages,
            flags: if e.flags.contains(PageFlags::LAZY) {
                BufFlags::LAZY
            } else {
                BufFlags::empty()
            },
        })
        .collect();
    for drain in [Drain::Auto, Drain::Pipes, Drain::Memory] {
        let (a, b) = UnixStream::pair().unwrap();
        let peer = recording_peer(b, false);
        let mut c = PageServerClient::from_unix(a).unwrap();
        c.open(ImageId::pagemap(PID).unwrap()).unwrap();
        let opts = SnapshotOptions {
            drain,
            ..SnapshotOptions::default()
        };
        snapshot(&source, plan.clone(), &mut c, &opts).unwrap();
        c.close().unwrap();
        let got = peer.join().unwrap();
        assert!(got == stream, "{drain:?}: the streams differ");
    }
}

/// `check_stream` accepts the recording and finds the pagemap CRIU's server wrote.
#[test]
fn check_stream_finds_the_recorded_entries() {
    let sum = check_stream(&criu_stream(), Limits::default(), 16).unwrap();
    let criu = Pagemap::decode(&read(fixture("pagemap-12856.img")), page_size()).unwrap();
    assert_eq!(sum.messages, 78);
    assert_eq!(sum.payload_bytes, 157 * page_size() as u64);
    assert_eq!(
        sum.images,
        vec![(ImageId::pagemap(PID).unwrap(), criu.entries)]
    );
    // Cut, it is not a session.
    let s = criu_stream();
    assert!(check_stream(&s[..s.len() - 32], Limits::default(), 16).is_err());
    let e = check_stream(&s[..100], Limits::default(), 16).unwrap_err();
    assert!(
        matches!(
            e,
            page_pipe::page_server::SessionErrorKind::Wire(w)
                if w.offset == 32 && matches!(w.kind, WireErrorKind::Truncated { .. })
        ),
        "{e}"
    );
}

/// The demo's two snapshots, sent to `page_server --chain` with `snapshot --to`, land as a
/// full image and an incremental one on it that restore to what the demo writes locally.
#[test]
fn the_demo_s_snapshots_round_trip_through_the_example_server() {
    let top = TempDir::new("ps-demo");
    let srv_dir = top.path().join("srv");
    let mut server = Command::new(example_binary("page_server"))
        .args(["--dir", srv_dir.to_str().unwrap(), "--port", "0", "--chain"])
        .args(["--no-sync", "--idle-timeout", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = server.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let line = String::from_utf8(line).unwrap();
    let addr = line
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .unwrap()
        .trim_end_matches(',')
        .to_string();
    let demo = page_pipe_tests::snapshot_demo();
    let sent = Command::new(&demo)
        .args(["--size", "8M", "--dirty", "25", "--to", &addr])
        .output()
        .unwrap();
    let local_dir = top.path().join("local");
    let local = Command::new(&demo)
        .args([
            "--size",
            "8M",
            "--dirty",
            "25",
            "--dir",
            local_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    // The server is this test's child: stop it by its pid.
    server.kill().unwrap();
    server.wait().unwrap();
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(sent.status.success(), "{}", text(&sent));
    assert!(
        text(&sent).contains("1538 in the parent"),
        "{}",
        text(&sent)
    );
    assert!(local.status.success(), "{}", text(&local));
    // The demo maps its region anew in each run: compare from each image's base.
    for n in ["1", "2"] {
        let remote = Image::open(srv_dir.join(n)).unwrap();
        let here = Image::open(local_dir.join(n)).unwrap();
        assert_eq!(remote.depth(), here.depth(), "snapshot {n}");
        let (rb, hb) = (remote.entries()[0].vaddr, here.entries()[0].vaddr);
        // The server writes an entry per message, as CRIU's; the local writer joins
        // contiguous entries: the same entries once joined.
        let joined = |entries: &[PagemapEntry], base: u64| {
            let mut v: Vec<(u64, u64, PageFlags)> = Vec::new();
            for e in entries {
                let at = e.vaddr - base;
                match v.last_mut() {
                    Some(l) if l.2 == e.flags && l.0 + l.1 * page_size() as u64 == at => {
                        l.1 += e.pages
                    }
                    _ => v.push((at, e.pages, e.flags)),
                }
            }
            v
        };
        assert!(remote.entries().len() >= here.entries().len());
        assert_eq!(
            joined(remote.entries(), rb),
            joined(here.entries(), hb),
            "snapshot {n}: the same entries"
        );
        let len = 2048 * page_size();
        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
        remote.read(rb, &mut a).unwrap();
        here.read(hb, &mut b).unwrap();
        assert!(a == b, "snapshot {n} restores differently");
    }
}
