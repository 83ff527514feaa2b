//! A page server, run the way `criu page-server` is run: it receives dumps from
//! `criu dump --page-server` (or from this crate's `PageServerClient`) and writes CRIU
//! images into a directory, and serves pages back to a lazy-pages daemon.
//!
//! ```text
//! cargo run --release -p page-pipe --example page_server -- --dir DIR --port PORT [--once]
//!     [--addr ADDR] [--unix PATH] [--chain] [--parent DIR] [--idle-timeout SECONDS]
//!     [--no-sync] [--max-sessions N]
//! ```
//!
//! - `--dir DIR`: where images go (made, mode 0700, if missing).
//! - `--port PORT` (0: any free port; the one taken is printed), `--addr ADDR` (default
//!   127.0.0.1: CRIU's page server has no authentication, see the crate docs), or
//!   `--unix PATH` for a Unix socket instead.
//! - `--once`: serve one session, then exit: status 0 only if it ended cleanly (`CLOSE`,
//!   its images committed, the client closed).
//! - `--chain`: session `n` writes into `DIR/<n>` with `parent` -> `<n-1>` (iterative
//!   migration); `--parent DIR`: the parent images (CRIU's `--prev-images-dir`).
//! - `--idle-timeout SECONDS` (default 60; 0: none), `--no-sync` (do not sync images
//!   before committing them), `--max-sessions N` (default 16).
//!
//! It prints one line when it listens (`listening on ADDR`) and one per session.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use page_pipe::page_server::{Layout, PageServer, ServerConfig, SessionError, SessionReport};

const USAGE: &str = "usage: page_server --dir DIR (--port PORT [--addr ADDR] | --unix PATH) [--once] [--chain] [--parent DIR] [--idle-timeout SECONDS] [--no-sync] [--max-sessions N]";

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn report(r: &SessionReport) -> String {
    let images: Vec<String> = r
        .images
        .iter()
        .map(|i| {
            format!(
                "{}/{} + pages-{}.img ({} entries, {} pages)",
                i.dir.display(),
                i.image,
                i.pages_id,
                i.summary.entries,
                i.summary.present_pages
            )
        })
        .collect();
    format!(
        "session with {}: ok, {} messages, {} bytes{}{}",
        r.peer,
        r.messages,
        r.bytes,
        if r.pages_served > 0 {
            format!(", {} pages served", r.pages_served)
        } else {
            String::new()
        },
        if images.is_empty() {
            String::new()
        } else {
            format!("; wrote {}", images.join(", "))
        }
    )
}

fn failed(e: &SessionError) -> String {
    format!(
        "{}; nothing committed unless the error came after the reply to CLOSE",
        chain(e)
    )
}

struct Opts {
    dir: PathBuf,
    port: Option<u16>,
    addr: String,
    unix: Option<PathBuf>,
    once: bool,
    config: ServerConfig,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut dir = None;
    let mut port = None;
    let mut addr = "127.0.0.1".to_string();
    let mut unix = None;
    let mut once = false;
    let mut layout = Layout::Flat;
    let mut parent = None;
    let mut idle = Some(Duration::from_secs(60));
    let mut sync = true;
    let mut max_sessions = page_pipe::page_server::DEFAULT_MAX_SESSIONS;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--dir" | "-D" => dir = Some(PathBuf::from(value()?)),
            "--port" => {
                let v = value()?;
                port = Some(v.parse().map_err(|_| format!("bad port {v:?}"))?);
            }
            "--addr" | "--address" => addr = value()?,
            "--unix" => unix = Some(PathBuf::from(value()?)),
            "--once" => once = true,
            "--chain" => layout = Layout::Chain,
            "--parent" | "--prev-images-dir" => parent = Some(PathBuf::from(value()?)),
            "--idle-timeout" => {
                let v = value()?;
                let s: u64 = v.parse().map_err(|_| format!("bad timeout {v:?}"))?;
                idle = (s > 0).then(|| Duration::from_secs(s));
            }
            "--no-sync" => sync = false,
            "--max-sessions" => {
                let v = value()?;
                max_sessions = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("bad session count {v:?}"))?;
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let dir = dir.ok_or_else(|| format!("--dir is needed\n{USAGE}"))?;
    if port.is_none() == unix.is_none() {
        return Err(format!("give --port or --unix\n{USAGE}"));
    }
    let config = ServerConfig {
        layout,
        parent,
        idle_timeout: idle,
        sync,
        max_sessions,
        ..ServerConfig::new(&dir)
    };
    Ok(Opts {
        dir,
        port,
        addr,
        unix,
        once,
        config,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("page_server: {e}");
            return ExitCode::from(2);
        }
    };
    let server = match (&o.unix, o.port) {
        (Some(path), _) => PageServer::bind_unix(path, o.config),
        (None, Some(port)) => PageServer::bind((o.addr.as_str(), port), o.config),
        (None, None) => unreachable!("checked by parse"),
    };
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            eprintln!("page_server: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let at = match (server.local_addr(), server.unix_path()) {
        (Some(a), _) => a.to_string(),
        (None, Some(p)) => format!("unix:{}", p.display()),
        (None, None) => "?".into(),
    };
    println!(
        "page_server: listening on {at}, images in {}",
        o.dir.display()
    );
    if o.once {
        let incoming = match server.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("page_server: {}", chain(&e));
                return ExitCode::FAILURE;
            }
        };
        return match server.serve(incoming) {
            Ok(r) => {
                println!("page_server: {}", report(&r));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("page_server: {}", failed(&e));
                ExitCode::FAILURE
            }
        };
    }
    let running = match server.spawn() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("page_server: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    };
    // Until killed: a killed server leaves only temporary files of the sessions it was
    // serving (hidden names, never an image).
    loop {
        if let Some(out) = running.next_outcome(Duration::from_secs(3600)) {
            match out.result {
                Ok(r) => println!("page_server: {}", report(&r)),
                Err(e) => eprintln!("page_server: {}", failed(&e)),
            }
        }
    }
}
