//! The `snapshot` demo as a user runs it: the demo itself, `inspect` and `extract`, and
//! one-line errors with a non-zero exit for bad input.

use std::process::{Command, Output};

use page_pipe::image::Image;
use page_pipe_tests::{TempDir, snapshot_demo};

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
