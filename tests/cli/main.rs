//! The `snapshot` demo as a user runs it: the demo itself restoring each way, `inspect`,
//! `extract`, `flatten` and `diff`, and one-line errors with a non-zero exit for bad
//! input.

use std::process::{Command, Output};

use page_pipe::image::{DiffKind, Image};
use page_pipe_tests::{TempDir, fixtures, snapshot_demo};

fn run(args: &[&str]) -> Output {
    Command::new(snapshot_demo())
        .args(args)
        .output()
        .expect("run the demo")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn the_demo_snapshots_restores_and_verifies() {
    let dir = TempDir::new("demo");
    let d = dir.path().to_str().unwrap();
    let o = run(&["--size", "8M", "--dirty", "25", "--dir", d]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("matches the region byte for byte"), "{out}");
    assert!(out.contains("chunk mode"), "{out}");
    // Snapshot 2 holds about a quarter of the 2048 pages, the rest is in its parent.
    let img = Image::open(dir.path().join("2")).unwrap();
    assert_eq!(img.depth(), 2);
    let present: u64 = img
        .entries()
        .iter()
        .filter(|e| e.is_present())
        .map(|e| e.pages)
        .sum();
    assert!((350..=700).contains(&present), "{present} pages changed");

    let o = run(&["inspect", &format!("{d}/2")]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(
        out.contains(&format!("{} entries", img.entries().len())),
        "{out}"
    );
    assert!(out.contains(":P"), "{out}");
    assert!(out.contains(&format!("{present} present pages")), "{out}");

    let base = img.entries()[0].vaddr;
    let file = dir.path().join("out.bin");
    let o = run(&[
        "extract",
        &format!("{d}/2"),
        "--vaddr",
        &format!("{base:x}"),
        "--pages",
        "300",
        "--out",
        file.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let mut expect = vec![0u8; 300 * 4096];
    let r = img.read(base, &mut expect).unwrap();
    assert!(std::fs::read(&file).unwrap() == expect);
    assert!(
        out.contains(&format!(
            "{} from this image, {} from parents",
            r.present, r.from_parents
        )),
        "{out}"
    );
}

#[test]
fn extract_reports_pages_in_no_entry_as_zeros() {
    let dir = TempDir::new("demo-zero");
    let d = dir.path().to_str().unwrap();
    assert!(run(&["--size", "64K", "--dir", d]).status.success());
    let file = dir.path().join("z.bin");
    let o = run(&[
        "extract",
        &format!("{d}/1"),
        "--vaddr",
        "1000",
        "--pages",
        "3",
        "--out",
        file.to_str().unwrap(),
    ]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(out.contains("3 zero"), "{out}");
    assert_eq!(std::fs::read(&file).unwrap(), vec![0u8; 3 * 4096]);
}

#[test]
fn bad_arguments_and_directories_are_one_line_errors() {
    let dir = TempDir::new("demo-bad");
    let d = dir.path().to_str().unwrap();
    let cases: &[&[&str]] = &[
        &["--size", "12Q"],
        &["--dirty", "101"],
        &["--bogus"],
        &["inspect"],
        &["inspect", d],
        &["inspect", "/nonexistent/dir"],
        &[
            "extract",
            d,
            "--vaddr",
            "zz",
            "--pages",
            "1",
            "--out",
            "/dev/null",
        ],
        &[
            "extract",
            d,
            "--vaddr",
            "1000",
            "--pages",
            "0",
            "--out",
            "/dev/null",
        ],
        &["extract", d, "--vaddr", "1000"],
        &["--restore", "lazily"],
        &["flatten", d],
        &["flatten", "/nonexistent/dir", d],
    ];
    for args in cases {
        let o = run(args);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("snapshot: error: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn the_demo_restores_by_mapping_and_verifies() {
    let dir = TempDir::new("demo-map");
    let d = dir.path().to_str().unwrap();
    let p = page_pipe_sys::probe_userfaultfd();
    let lazy = p.kernel_faults() || p.user_mode_only.is_ok();
    if !lazy {
        eprintln!("SKIPPED the_demo_restores_by_mapping_and_verifies (lazy): no userfaultfd: {p}");
    }
    let hows = ["eager", "map", "lazy"];
    for how in hows.into_iter().filter(|h| lazy || *h != "lazy") {
        let o = run(&["--size", "4M", "--dir", d, "--restore", how]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{how}: {out}\n{err}");
        let verify: Vec<_> = out.lines().filter(|l| l.starts_with("verify:")).collect();
        assert_eq!(verify.len(), 1, "{how}: {out}");
        assert!(
            verify[0].contains("matches the region byte for byte"),
            "{out}"
        );
        let said = match how {
            "map" => "(by mapping)",
            "lazy" => "(lazily, with userfaultfd)",
            _ => "(eager)",
        };
        assert!(verify[0].contains(said), "{how}: {out}");
        if how == "lazy" {
            assert!(out.contains("lazy restore: memory usable after"), "{out}");
        }
    }
}

/// `flatten` writes one image that `diff` finds equal to the chain (exit 0); the chain's
/// two images differ (exit 1, one line per span and a total); a missing image is exit 2
/// with a one-line error.
#[test]
fn flatten_and_diff_work_on_the_demos_images_with_diffs_exit_status() {
    let dir = TempDir::new("demo-flatten");
    let d = dir.path().to_str().unwrap();
    assert!(
        run(&["--size", "2M", "--dirty", "20", "--dir", d])
            .status
            .success()
    );
    let flat = format!("{d}/flat");
    let o = run(&["flatten", &format!("{d}/2"), &flat]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("chain of 2 images"), "{out}");
    assert_eq!(Image::open(&flat).unwrap().depth(), 1);

    let o = run(&["diff", &format!("{d}/2"), &flat]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.contains("hold the same pages"), "{out}");

    let o = run(&["diff", &format!("{d}/1"), &flat]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    let spans = page_pipe::image::diff(format!("{d}/1"), &flat).unwrap();
    assert!(!spans.is_empty());
    assert!(spans.iter().all(|s| s.kind == DiffKind::Bytes));
    assert_eq!(out.lines().count(), spans.len() + 1, "{out}");
    let pages: u64 = spans.iter().map(|s| s.pages).sum();
    assert!(out.contains(&format!("differ in {pages} pages")), "{out}");
    assert!(
        out.contains(&format!(
            "{:#x} +{} pages: bytes differ",
            spans[0].vaddr, spans[0].pages
        )),
        "{out}"
    );

    for args in [
        vec!["diff", d, &flat],
        vec!["diff", &flat],
        vec!["diff", &flat, "/nonexistent/dir"],
    ] {
        let o = run(&args);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("snapshot: error: "), "{args:?}: {err}");
    }
}

/// Both CRIU fixtures flatten, and diff equal to the flattened images.
#[test]
fn flatten_and_diff_work_on_the_criu_fixtures() {
    let dir = TempDir::new("demo-criu");
    for name in ["criu-4.2-a", "criu-4.2-page-server-a"] {
        let src = fixtures().join(name);
        let src = src.to_str().unwrap();
        let flat = dir.path().join(name);
        let flat = flat.to_str().unwrap();
        let o = run(&["flatten", src, flat]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{name}: {out}{err}");
        let o = run(&["diff", src, flat]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{name}: {out}{err}");
    }
}
