//! A VMM's snapshot cycle with rust-vmm's guest memory, and not one `unsafe` in it:
//!
//! ```text
//! cargo run --release -p page-pipe --features vm-memory --example vmm [-- --size 96M --dir DIR]
//! ```
//!
//! 1. a `GuestMemoryMmap<AtomicBitmap>` of two regions with a gap between them (below and
//!    above 4 GiB, as x86 VMMs lay out RAM), filled with a pattern;
//! 2. a full snapshot (`Source::with_guest_memory`, `vm::full_plan`) into `DIR/1`;
//! 3. "guest" writes through vm-memory's `Bytes` methods, which mark its `AtomicBitmap`;
//! 4. the dirty set from the bitmaps (`DirtySet::take_bitmaps`), checked against the
//!    pages written, and an incremental snapshot on top of `DIR/1` into `DIR/2`;
//! 5. a restore of `DIR/2` through the chain into a fresh `GuestMemoryMmap`, verified
//!    byte for byte (the line starting `verify:`), and the same restore refused by a
//!    guest memory that lacks the second region.
//!
//! `--size` is the guest RAM (K/M/G, default 96M: two thirds below 4 GiB, a third
//! above). Without `--dir` the images go to a temporary directory, removed at the end.
#![forbid(unsafe_code)]

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use page_pipe::Source;
use page_pipe::image::{Image, ImageWriter};
use page_pipe::snapshot::{SnapshotOptions, SnapshotReport, snapshot};
use page_pipe::vm::{self, DirtySet, GuestRestoreOptions, VmError};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn parse_size(s: &str) -> Result<u64, Box<dyn Error>> {
    let (n, m) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    Ok(n.parse::<u64>()? * m)
}

/// The byte at offset `i` of the guest page at `gpa` in round `round`.
fn pattern(gpa: u64, i: usize, round: u8) -> u8 {
    ((gpa >> 12) as u8).wrapping_mul(31) ^ (i as u8).wrapping_mul(7) ^ round
}

/// A small deterministic generator (xorshift), so runs are repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn describe(what: &str, r: &SnapshotReport, secs: f64) {
    println!(
        "{what}: {} pages captured, {} in holes, {} MiB written in {:.1} ms",
        r.pages,
        r.hole_pages,
        r.dump.bytes >> 20,
        secs * 1e3
    );
}

fn main() -> Result<ExitCode, Box<dyn Error>> {
    let ps = page_pipe::page_size();
    let size = parse_size(&arg("--size").unwrap_or_else(|| "96M".into()))?;
    let pages = (size / ps as u64).max(3);
    let low_pages = pages * 2 / 3;
    let high_pages = pages - low_pages;
    // Below 4 GiB, then a gap (where an x86 VMM puts its MMIO hole), then above.
    let layout = [
        (GuestAddress(0), low_pages as usize * ps),
        (GuestAddress(4 << 30), high_pages as usize * ps),
    ];
    let (dir, temporary) = match arg("--dir") {
        Some(d) => (PathBuf::from(d), false),
        None => (
            std::env::temp_dir().join(format!("page-pipe-vmm-{}", std::process::id())),
            true,
        ),
    };
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "guest memory: {} MiB at {:#x} and {} MiB at {:#x}; images in {}",
        layout[0].1 >> 20,
        layout[0].0.0,
        layout[1].1 >> 20,
        layout[1].0.0,
        dir.display()
    );

    // 1. The guest memory, filled with a pattern.
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&layout)?;
    let mut page = vec![0u8; ps];
    for &(base, len) in &layout {
        for p in 0..(len / ps) as u64 {
            let gpa = base.0 + p * ps as u64;
            page.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = pattern(gpa, i, 0));
            mem.write_slice(&page, GuestAddress(gpa))?;
        }
    }
    // Tracking starts now: what the bitmaps hold so far (the fill) is forgotten.
    DirtySet::new(&mem)?.take_bitmaps(&mem)?;

    // 2. A full snapshot (the vCPUs would be paused for it).
    let opts = SnapshotOptions::default();
    let source = Source::new().with_guest_memory(&mem)?;
    let t = Instant::now();
    let mut full = ImageWriter::create(dir.join("1"), 1)?;
    let report = snapshot(&source, vm::full_plan(&mem)?, &mut full, &opts)?;
    full.finish()?;
    describe("full snapshot", &report, t.elapsed().as_secs_f64());
    drop(source);

    // 3. The guest runs: 5% of its pages written through vm-memory, which marks them in
    //    the regions' AtomicBitmaps.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut written = Vec::new();
    for _ in 0..(pages / 20).max(1) {
        let (base, len) = layout[rng.next().is_multiple_of(3) as usize];
        let p = rng.next() % (len / ps) as u64;
        let gpa = base.0 + p * ps as u64;
        let off = (rng.next() % (ps as u64 - 64)) as usize;
        let bytes: Vec<u8> = (0..64).map(|i| pattern(gpa, off + i, 1)).collect();
        mem.write_slice(&bytes, GuestAddress(gpa + off as u64))?;
        written.push(gpa);
    }
    written.sort_unstable();
    written.dedup();

    // 4. The dirty set from the bitmaps, then an incremental snapshot on top of the full.
    let mut dirty = DirtySet::new(&mem)?;
    let marked = dirty.take_bitmaps(&mem)?;
    let missed = written
        .iter()
        .filter(|&&g| !dirty.is_dirty(GuestAddress(g)))
        .count();
    println!(
        "dirty set: {marked} pages from the AtomicBitmaps ({} pages written, {missed} missed)",
        written.len()
    );
    if missed > 0 || marked != written.len() as u64 {
        println!("verify: FAILED: the dirty set is not the pages written");
        return Ok(ExitCode::FAILURE);
    }
    let plan = dirty.plan(&Image::open(dir.join("1"))?)?;
    let source = Source::new().with_guest_memory(&mem)?;
    let t = Instant::now();
    let mut incremental = ImageWriter::create(dir.join("2"), 1)?.with_parent(dir.join("1"))?;
    let report = snapshot(&source, plan, &mut incremental, &opts)?;
    incremental.finish()?;
    describe("incremental snapshot", &report, t.elapsed().as_secs_f64());
    drop(source);

    // 5. A restore through the chain into fresh guest memory, verified.
    let image = Image::open(dir.join("2"))?;
    let fresh = GuestMemoryMmap::<()>::from_ranges(&layout)?;
    let restore = GuestRestoreOptions {
        fresh: true,
        ..GuestRestoreOptions::default()
    };
    let t = Instant::now();
    let read = vm::restore(&image, &fresh, &restore)?;
    println!(
        "restore: {} pages from the incremental image, {} from its parent, in {:.1} ms on {} threads",
        read.present,
        read.from_parents,
        t.elapsed().as_secs_f64() * 1e3,
        read.threads
    );
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for &(base, len) in &layout {
        let mut off = 0;
        while off < len {
            let n = a.len().min(len - off);
            let at = GuestAddress(base.0 + off as u64);
            mem.read_slice(&mut a[..n], at)?;
            fresh.read_slice(&mut b[..n], at)?;
            if a[..n] != b[..n] {
                let i = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0);
                println!("verify: FAILED at guest address {:#x}", at.0 + i as u64);
                return Ok(ExitCode::FAILURE);
            }
            off += n;
        }
    }
    println!(
        "verify: the restored guest memory equals the original byte for byte ({} MiB in 2 regions)",
        (layout[0].1 + layout[1].1) >> 20
    );

    // A guest memory without the second region cannot take the image: refused before
    // anything is written, naming the first guest page it has no room for.
    let smaller = GuestMemoryMmap::<()>::from_ranges(&layout[..1])?;
    match vm::restore(&image, &smaller, &restore) {
        Err(e @ VmError::OutsideMemory { .. }) => println!("without the second region: {e}"),
        other => {
            println!("verify: FAILED: a restore into too little memory gave {other:?}");
            return Ok(ExitCode::FAILURE);
        }
    }
    if temporary {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(ExitCode::SUCCESS)
}
