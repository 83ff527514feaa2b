use super::*;

/// A pagemap that would pass the readers' bound fails the push that takes it past
/// (its buffer flushed), naming the pagemap; the writer then refuses to finish.
#[test]
fn a_pagemap_past_the_readers_bound_is_refused() {
    let ps = page_pipe_sys::page_size().get() as u64;
    let root = std::env::temp_dir().join(format!("pp-cap-{}", std::process::id()));
    let mut w = ImageWriter::create(&root, 1).unwrap().with_sync(false);
    w.max_pagemap = 1 << 20;
    let mut pushed = 0u64;
    let err = loop {
        let e = PagemapEntry {
            vaddr: 0x100000 + 2 * pushed * ps,
            pages: 1,
            flags: PageFlags::LAZY,
        };
        match w.push(e) {
            Ok(()) => pushed += 1,
            Err(err) => break err,
        }
        assert!(pushed < 1 << 20, "no error after {pushed} entries");
    };
    assert!(
        matches!(&err, ImageError::TooLarge { path, size } if path.ends_with("pagemap-1.img") && *size > 1 << 20 && *size <= (1 << 20) + FLUSH_AT as u64 + 64),
        "{err:?}"
    );
    assert!(matches!(w.finish(), Err(ImageError::TooLarge { .. })));
    assert!(!root.join("pagemap-1.img").exists());
    // Up to the bound, it commits.
    let mut w = ImageWriter::create(&root, 1).unwrap().with_sync(false);
    w.max_pagemap = 1 << 20;
    for i in 0..pushed / 2 {
        let e = PagemapEntry {
            vaddr: 0x100000 + 2 * i * ps,
            pages: 1,
            flags: PageFlags::LAZY,
        };
        w.push(e).unwrap();
    }
    assert!(w.finish().unwrap().pagemap_bytes <= 1 << 20);
    std::fs::remove_dir_all(&root).unwrap();
}

/// Copies pages of a source file in the kernel and through the buffer, and a source
/// too short for its pages fails the writer naming the source.
#[test]
fn pages_are_copied_from_a_file_either_way() {
    let ps = page_pipe_sys::page_size().get();
    let root = std::env::temp_dir().join(format!("pp-copy-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let src_path = root.join("src.bin");
    let bytes: Vec<u8> = (0..6 * ps).map(|i| (i / 7) as u8).collect();
    std::fs::write(&src_path, &bytes).unwrap();
    let src = File::open(&src_path).unwrap();
    for kernel in [true, false] {
        let dir = root.join(format!("img-{kernel}"));
        let mut w = ImageWriter::create(&dir, 1).unwrap().with_sync(false);
        w.copy_range = kernel;
        let e = |p: u64, pages| PagemapEntry {
            vaddr: 0x100000 + p * ps as u64,
            pages,
            flags: PageFlags::PRESENT,
        };
        w.push_copy(e(0, 2), &src, &src_path, 3 * ps as u64)
            .unwrap();
        w.push_copy(e(4, 1), &src, &src_path, 0).unwrap();
        w.finish().unwrap();
        let got = std::fs::read(dir.join("pages-1.img")).unwrap();
        let want = [&bytes[3 * ps..5 * ps], &bytes[..ps]].concat();
        assert!(got == want, "copy_file_range: {kernel}");

        let mut w = ImageWriter::create(&dir, 2).unwrap().with_sync(false);
        w.copy_range = kernel;
        let err = w.push_copy(e(0, 2), &src, &src_path, 5 * ps as u64);
        assert!(
            matches!(&err, Err(ImageError::ShortRead { path, offset }) if *path == src_path && *offset == 6 * ps as u64),
            "{err:?}"
        );
        assert!(matches!(w.finish(), Err(ImageError::ShortRead { .. })));
        assert!(!dir.join("pagemap-2.img").exists());
    }
    std::fs::remove_dir_all(&root).unwrap();
}
