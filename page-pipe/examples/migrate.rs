//! Live migration between two processes over TCP, with writers changing memory during
//! the rounds, the receiver's memory verified equal to the sender's at the final pause.
//!
//! ```text
//! cargo run --release -p page-pipe --example migrate [-- --size 512M --writers 2
//!     --every-us 20 --downtime-ms 50 --bandwidth 0 --max-rounds 30 --tls --loopback]
//! ```
//!
//! The example runs itself three times: as the parent, which sets up the network, starts
//! a receiver and a sender process and compares what they report; as the receiver
//! (`--role receiver`), which writes the stream into fresh memory; and as the sender
//! (`--role sender`), which maps `--size` of memory, fills it, starts `--writers`
//! threads that each write a random page every `--every-us` microseconds through raw
//! pointers (volatile stores), tracks the memory with an asynchronous tracker and
//! migrates it.
//!
//! Network: where the machine lets it (root, `ip`, network namespaces), the two
//! processes run in two network namespaces joined by a veth pair, 10.231.0.1 and
//! 10.231.0.2 (closer to two hosts than loopback: their own stacks, a real device
//! between them); the namespaces are removed on every path out. Otherwise, or with
//! `--loopback`, both run on 127.0.0.1. The receiver binds the address it is given and
//! nothing wider: CRIU's page-server protocol has no authentication (`--tls` adds TLS
//! with both ends authenticated by certificates made for this run).
//!
//! Verification: during the final pause, after the last round, the sender checksums
//! every page of its memory (volatile reads: the writers are paused but the memory is
//! theirs); the receiver checksums every page it received; the parent compares the two
//! lists and prints a line starting `verify:`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::MmapOptions;
use page_pipe::Source;
use page_pipe::migrate::{MemoryRegion, MigrateOptions, ReceiveOptions, Sender, receive};
use page_pipe::page_server::Incoming;
use page_pipe::tls::{TlsClientConfig, TlsIdentity, TlsServerConfig, TlsStream};
use page_pipe::track::{TrackOptions, TrackRegion, Tracker};

/// The address the memory has in the stream (a guest-physical address, say).
const BASE: u64 = 0x1_0000_0000;
const NS_ADDR_A: &str = "10.231.0.1";
const NS_ADDR_B: &str = "10.231.0.2";

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn parse_size(s: &str) -> usize {
    let (n, m) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1usize << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<usize>()
        .expect("--size takes a number with K, M or G")
        * m
}

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("migrate: {msg}");
    std::process::exit(1)
}

/// A checksum of each page: 64-bit words folded with a multiply, enough to tell pages
/// apart for this check.
fn page_sums(pages: impl Iterator<Item = Vec<u8>>) -> Vec<u64> {
    pages
        .map(|p| {
            p.chunks_exact(8).fold(0xcbf2_9ce4_8422_2325u64, |h, w| {
                (h ^ u64::from_ne_bytes(w.try_into().expect("8 bytes")))
                    .wrapping_mul(0x0000_0100_0000_01b3)
                    .rotate_left(5)
            })
        })
        .collect()
}

fn write_sums(path: &Path, sums: &[u64]) {
    let bytes: Vec<u8> = sums.iter().flat_map(|s| s.to_ne_bytes()).collect();
    std::fs::write(path, bytes).unwrap_or_else(|e| die(format!("{}: {e}", path.display())));
}

fn read_sums(path: &Path) -> Vec<u64> {
    std::fs::read(path)
        .unwrap_or_else(|e| die(format!("{}: {e}", path.display())))
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

fn main() {
    match arg("--role").as_deref() {
        Some("sender") => sender(),
        Some("receiver") => receiver(),
        _ => parent(),
    }
}

// ---- the parent: network, processes, verification ----

/// Two network namespaces joined by a veth pair, removed when dropped.
struct Netns {
    a: String,
    b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    fn new() -> Result<Self, String> {
        let id = std::process::id();
        let n = Netns {
            a: format!("ppmig-{id}-a"),
            b: format!("ppmig-{id}-b"),
        };
        // Dropped (namespaces removed) on any error below.
        ip(&["netns", "add", &n.a])?;
        ip(&["netns", "add", &n.b])?;
        ip(&[
            "link", "add", "ppmig-a", "netns", &n.a, "type", "veth", "peer", "name", "ppmig-b",
            "netns", &n.b,
        ])?;
        for (ns, dev, addr) in [(&n.a, "ppmig-a", NS_ADDR_A), (&n.b, "ppmig-b", NS_ADDR_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Removing a namespace removes its end of the veth pair, and so the pair.
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// The parent's children, killed if still running when dropped.
struct Kids(Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

fn self_cmd(netns: Option<&str>) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|e| die(format!("current_exe: {e}")));
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    // Pass the tuning options on.
    for name in [
        "--size",
        "--writers",
        "--every-us",
        "--downtime-ms",
        "--bandwidth",
        "--max-rounds",
    ] {
        if let Some(v) = arg(name) {
            c.args([name, &v]);
        }
    }
    c
}

/// A CA, and a certificate for each end, made for this run (PEM files in `dir`).
fn make_certs(dir: &Path, server_addr: &str) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    fn fail(e: rcgen::Error) -> ! {
        die(format!("making certificates: {e}"))
    }
    let ca_key = KeyPair::generate().unwrap_or_else(|e| fail(e));
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| fail(e));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap_or_else(|e| fail(e));
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let write = |name: &str, s: String| {
        let p = dir.join(name);
        std::fs::write(&p, s).unwrap_or_else(|e| die(format!("{}: {e}", p.display())));
    };
    write("ca.pem", ca.pem());
    for (who, names) in [
        (
            "receiver",
            vec![server_addr.to_string(), "localhost".to_string()],
        ),
        ("sender", vec!["migration-sender".to_string()]),
    ] {
        let key = KeyPair::generate().unwrap_or_else(|e| fail(e));
        let cert = CertificateParams::new(names)
            .and_then(|p| p.signed_by(&key, &issuer))
            .unwrap_or_else(|e| fail(e));
        write(&format!("{who}.pem"), cert.pem());
        write(&format!("{who}.key"), key.serialize_pem());
    }
}

fn parent() {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("page-pipe-migrate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| die(format!("{}: {e}", dir.display())));
    let r = run_parent(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    match r {
        Ok(true) => println!("done in {:.1} s", started.elapsed().as_secs_f64()),
        Ok(false) => std::process::exit(1),
        Err(e) => die(e),
    }
}

fn run_parent(dir: &Path) -> Result<bool, String> {
    let netns = if flag("--loopback") {
        println!("network: loopback (127.0.0.1), as asked");
        None
    } else {
        match Netns::new() {
            Ok(n) => {
                println!(
                    "network: two network namespaces joined by a veth pair ({NS_ADDR_A} -> {NS_ADDR_B})"
                );
                Some(n)
            }
            Err(why) => {
                println!("network: loopback (127.0.0.1); network namespaces unavailable: {why}");
                None
            }
        }
    };
    let listen = match &netns {
        Some(_) => format!("{NS_ADDR_B}:0"),
        None => "127.0.0.1:0".to_string(),
    };
    let tls = flag("--tls");
    if tls {
        make_certs(dir, listen.split(':').next().unwrap_or("127.0.0.1"));
        println!("TLS: both ends authenticated by certificates made for this run");
    } else {
        println!(
            "TLS: off (the page-server protocol has no authentication; the receiver binds {listen} only)"
        );
    }
    let (sender_sums, receiver_sums) = (dir.join("sender.sums"), dir.join("receiver.sums"));
    let mut kids = Kids(Vec::new());

    let mut rc = self_cmd(netns.as_ref().map(|n| n.b.as_str()));
    rc.args(["--role", "receiver", "--listen", &listen])
        .arg("--sums")
        .arg(&receiver_sums)
        .stdout(Stdio::piped());
    if tls {
        rc.arg("--certs").arg(dir).arg("--tls");
    }
    let mut receiver = rc
        .spawn()
        .map_err(|e| format!("cannot start the receiver: {e}"))?;
    let out = receiver.stdout.take().expect("piped");
    kids.0.push(receiver);
    let mut lines = BufReader::new(out).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(a) = l.strip_prefix("listening ") {
                    println!("receiver: {l}");
                    break a.to_string();
                }
                println!("receiver: {l}");
            }
            _ => return Err("the receiver ended before listening".into()),
        }
    };
    let forward = std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            println!("receiver: {l}");
        }
    });

    let mut sc = self_cmd(netns.as_ref().map(|n| n.a.as_str()));
    sc.args(["--role", "sender", "--to", &addr])
        .arg("--sums")
        .arg(&sender_sums);
    if tls {
        sc.arg("--certs").arg(dir).arg("--tls");
    }
    let sender = sc
        .spawn()
        .map_err(|e| format!("cannot start the sender: {e}"))?;
    kids.0.push(sender);
    let s_ok = kids.0[1].wait().map_err(|e| e.to_string())?.success();
    let r_ok = kids.0[0].wait().map_err(|e| e.to_string())?.success();
    let _ = forward.join();
    drop(kids);
    drop(netns);
    if !(s_ok && r_ok) {
        println!("verify: FAILED: the sender or the receiver failed (see above)");
        return Ok(false);
    }
    let (a, b) = (read_sums(&sender_sums), read_sums(&receiver_sums));
    let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    if a.len() == b.len() && differ == 0 {
        println!(
            "verify: the receiver's memory equals the sender's at the final pause ({} pages checked)",
            a.len()
        );
        Ok(true)
    } else {
        println!(
            "verify: FAILED: {differ} of {} pages differ ({} pages received)",
            a.len(),
            b.len()
        );
        Ok(false)
    }
}

// ---- the receiver ----

fn receiver() {
    let size = parse_size(&arg("--size").unwrap_or_else(|| "512M".into()));
    // Loopback unless told another address explicitly.
    let listen = arg("--listen").unwrap_or_else(|| "127.0.0.1:0".into());
    let sums = PathBuf::from(arg("--sums").unwrap_or_else(|| die("--sums PATH")));
    let l = std::net::TcpListener::bind(&listen)
        .unwrap_or_else(|e| die(format!("cannot listen on {listen}: {e}")));
    let tls = flag("--tls").then(|| {
        let d = PathBuf::from(arg("--certs").unwrap_or_else(|| die("--certs DIR")));
        let ca = std::fs::read(d.join("ca.pem")).unwrap_or_else(|e| die(e));
        let id = TlsIdentity::from_pem_files(d.join("receiver.pem"), d.join("receiver.key"))
            .unwrap_or_else(|e| die(e));
        TlsServerConfig::new(&ca, id).unwrap_or_else(|e| die(e))
    });
    println!("listening {}", l.local_addr().unwrap_or_else(|e| die(e)));
    let _ = std::io::stdout().flush();
    let mem = MmapOptions::new()
        .len(size)
        .map_anon()
        .unwrap_or_else(|e| die(e));
    let mut dest = MemoryRegion::from_mmap(BASE, mem).unwrap_or_else(|e| die(e));
    let (tcp, peer) = l.accept().unwrap_or_else(|e| die(e));
    let conn = match &tls {
        Some(cfg) => Incoming::from_tls(
            TlsStream::accept(tcp, cfg, None).unwrap_or_else(|e| die(format!("{peer}: {e:?}"))),
        ),
        None => Incoming::from_tcp(tcp),
    };
    let report = match receive(conn, &mut dest, &ReceiveOptions::default()) {
        Ok(r) => r,
        Err(e) => die(format!("{e}: {}", e.kind)),
    };
    println!(
        "received {} rounds from {}: {} pages, {:.1} MiB in {:.2} s",
        report.rounds.len(),
        report.peer,
        report.pages(),
        report.bytes as f64 / (1 << 20) as f64,
        report.time.as_secs_f64()
    );
    let ps = page_pipe::page_size();
    let map = dest.mmap().expect("owned");
    write_sums(&sums, &page_sums(map.chunks(ps).map(<[u8]>::to_vec)));
}

// ---- the sender ----

fn sender() {
    let size = parse_size(&arg("--size").unwrap_or_else(|| "512M".into()));
    let writers: usize = arg("--writers").map_or(2, |v| v.parse().unwrap_or_else(|e| die(e)));
    let every = Duration::from_micros(
        arg("--every-us").map_or(20, |v| v.parse().unwrap_or_else(|e| die(e))),
    );
    let to = arg("--to").unwrap_or_else(|| die("--to ADDR"));
    let sums = PathBuf::from(arg("--sums").unwrap_or_else(|| die("--sums PATH")));
    let ps = page_pipe::page_size();
    let pages = size / ps;
    let opts = MigrateOptions {
        downtime: Duration::from_millis(
            arg("--downtime-ms").map_or(50, |v| v.parse().unwrap_or_else(|e| die(e))),
        ),
        bandwidth: arg("--bandwidth")
            .map(|v| parse_size(&v) as u64)
            .filter(|&b| b > 0),
        max_rounds: arg("--max-rounds").map_or(30, |v| v.parse().unwrap_or_else(|e| die(e))),
        ..MigrateOptions::default()
    };

    let mut mem = MmapOptions::new()
        .len(size)
        .map_anon()
        .unwrap_or_else(|e| die(e));
    for (i, p) in mem.chunks_mut(ps).enumerate() {
        p.fill(i as u8 ^ 0x5a);
    }
    let base = mem.as_mut_ptr() as usize;
    // From here on the memory is written through raw pointers only.
    let region = TrackRegion::new(BASE, mem.as_ptr(), size);
    let mut tracker = Tracker::start_async(&[region], &TrackOptions::default())
        .unwrap_or_else(|e| die(format!("cannot track the memory: {e}")));
    // SAFETY: `mem` stays mapped until after the source is dropped (end of this
    // function); its writers write it with volatile stores only, and the crate reads it
    // only by the kernel (send from its address) or volatile copies.
    let source = unsafe {
        Source::new().with_volatile(BASE, NonNull::new(base as *mut u8).expect("mapped"), size)
    }
    .unwrap_or_else(|e| die(e));

    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let parked = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (stop, pause, parked, writes) =
                (stop.clone(), pause.clone(), parked.clone(), writes.clone());
            std::thread::spawn(move || {
                let mut x = 0x2545_f491_4f6c_dd1du64.wrapping_mul(w as u64 + 1);
                while !stop.load(Ordering::Acquire) {
                    if pause.load(Ordering::Acquire) {
                        parked.fetch_add(1, Ordering::AcqRel);
                        while pause.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
                            std::thread::sleep(Duration::from_micros(100));
                        }
                        parked.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = (x % pages as u64) as usize;
                    let word = (x >> 32) as usize % (ps / 8);
                    // SAFETY: the word lies within the mapping (page < pages, word <
                    // ps / 8), which outlives the writers (joined below); the memory
                    // is only written with volatile stores, aligned to 8 here.
                    unsafe {
                        std::ptr::write_volatile((base + page * ps + word * 8) as *mut u64, x)
                    };
                    writes.fetch_add(1, Ordering::Relaxed);
                    if !every.is_zero() {
                        std::thread::sleep(every);
                    }
                }
            })
        })
        .collect();
    let pause_all = || {
        pause.store(true, Ordering::Release);
        while parked.load(Ordering::Acquire) < writers as u64 {
            std::thread::yield_now();
        }
    };
    let resume_all = || pause.store(false, Ordering::Release);

    println!(
        "sender: {} MiB, {writers} writer threads each writing a random page every {every:?}, tracker: {}",
        size >> 20,
        tracker.info().method
    );
    let tls = flag("--tls").then(|| {
        let d = PathBuf::from(arg("--certs").unwrap_or_else(|| die("--certs DIR")));
        let ca = std::fs::read(d.join("ca.pem")).unwrap_or_else(|e| die(e));
        let id = TlsIdentity::from_pem_files(d.join("sender.pem"), d.join("sender.key"))
            .unwrap_or_else(|e| die(e));
        let host = to.rsplit_once(':').map_or(to.as_str(), |(h, _)| h);
        TlsClientConfig::new(&ca, id, host).unwrap_or_else(|e| die(e))
    });
    let sender = match &tls {
        Some(cfg) => Sender::connect_tls(to.as_str(), cfg, None),
        None => Sender::connect(to.as_str(), None),
    }
    .unwrap_or_else(|e| die(format!("{e}: {}", e.kind)));
    let result = sender.run(&source, &mut tracker, pause_all, resume_all, &opts);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            stop.store(true, Ordering::Release);
            die(format!("{e}: {}", e.kind))
        }
    };
    // Still paused: the memory holds still. Checksum it with volatile copies.
    let mut page = vec![0u8; ps];
    let sums = {
        let copies = (0..pages).map(|i| {
            // SAFETY: page `i` lies within the mapping, mapped until the end of this
            // function; `page` is ours and does not overlap it.
            unsafe { page_pipe_sys::copy_from_raw(&mut page, (base + i * ps) as *const u8) };
            page.clone()
        });
        let s = page_sums(copies);
        write_sums(&sums, &s);
        s
    };
    resume_all();
    stop.store(true, Ordering::Release);
    for t in threads {
        let _ = t.join();
    }
    drop(source);
    drop(tracker);
    drop(mem);

    println!("round | pages     | MiB      | time      | MiB/s    | written meanwhile");
    for r in &report.rounds {
        println!(
            "{:>5}{} | {:>9} | {:>8.1} | {:>6.1} ms | {:>8.0} | {}",
            r.round,
            if r.is_final { "*" } else { " " },
            r.pages,
            r.bytes as f64 / (1 << 20) as f64,
            r.time.as_secs_f64() * 1e3,
            r.rate() / (1 << 20) as f64,
            if r.is_final {
                "(paused)".to_string()
            } else {
                r.written_meanwhile.to_string()
            }
        );
    }
    println!(
        "stopped pre-copy: {}; estimated pause {:.1} ms; final pause {:.1} ms (* the final round, source paused); total {:.2} s; {} writes by the writers; {} page checksums",
        report.stop,
        report.estimate.as_secs_f64() * 1e3,
        report.final_pause.as_secs_f64() * 1e3,
        report.total.as_secs_f64(),
        writes.load(Ordering::Relaxed),
        sums.len()
    );
}
