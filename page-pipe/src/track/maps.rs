//! What memory a range is, from `/proc/self/maps` (and `/proc/self/smaps` for huge page
//! sizes): to leave never-touched pages out only where that means zeros, to name a
//! mapping in an error, and to find the page size of hugetlb memory.

use std::fmt;

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Vma {
    pub start: usize,
    pub end: usize,
    pub perms: String,
    pub inode: u64,
    pub path: String,
}

impl Vma {
    fn parse(line: &str) -> Option<Vma> {
        let mut it = line.split_ascii_whitespace();
        let (range, perms, _offset, _dev, inode) =
            (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
        let path = it.collect::<Vec<_>>().join(" ");
        let (s, e) = range.split_once('-')?;
        Some(Vma {
            start: usize::from_str_radix(s, 16).ok()?,
            end: usize::from_str_radix(e, 16).ok()?,
            perms: perms.to_string(),
            inode: inode.parse().ok()?,
            path,
        })
    }

    /// Private anonymous memory: a page never populated reads as zeros. (Shared or
    /// file-backed memory may hold data in its file or page cache that this mapping has
    /// not faulted in.)
    pub fn anon_private(&self) -> bool {
        self.inode == 0 && self.perms.ends_with('p') && !self.path.starts_with('/')
    }
}

impl fmt::Display for Vma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.anon_private() {
            "private anonymous memory"
        } else if self.perms.ends_with('s') {
            "a shared mapping"
        } else {
            "a private mapping"
        };
        write!(f, "{kind} {:#x}-{:#x} {}", self.start, self.end, self.perms)?;
        if !self.path.is_empty() {
            write!(f, " of {}", self.path)?;
        }
        Ok(())
    }
}

/// The mappings of this process.
pub(crate) fn read_maps() -> std::io::Result<Vec<Vma>> {
    let text = std::fs::read_to_string("/proc/self/maps")?;
    Ok(text.lines().filter_map(Vma::parse).collect())
}

/// The mappings that overlap `[start, end)`, and whether they cover all of it.
pub(crate) fn vmas_in(maps: &[Vma], start: usize, end: usize) -> (Vec<&Vma>, bool) {
    let found: Vec<&Vma> = maps
        .iter()
        .filter(|v| v.start < end && start < v.end)
        .collect();
    let mut at = start;
    for v in &found {
        if v.start > at {
            return (found, false);
        }
        at = at.max(v.end);
    }
    let covered = at >= end;
    (found, covered)
}

/// Whether all of `[start, end)` is private anonymous memory.
pub(crate) fn all_anon_private(maps: &[Vma], start: usize, end: usize) -> bool {
    let (vmas, covered) = vmas_in(maps, start, end);
    covered && vmas.iter().all(|v| v.anon_private())
}

/// A description of the memory at `[start, end)` for an error message.
pub(crate) fn describe(start: usize, end: usize) -> String {
    let Ok(maps) = read_maps() else {
        return "(/proc/self/maps not readable)".to_string();
    };
    let (vmas, covered) = vmas_in(&maps, start, end);
    let mut s = vmas
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    if !covered {
        if !s.is_empty() {
            s.push_str("; ");
        }
        s.push_str("partly not mapped");
    }
    s
}

/// `KernelPageSize` of the mapping holding `addr`, from `/proc/self/smaps`: the huge page
/// size for hugetlb memory.
pub(crate) fn kernel_page_size(addr: usize) -> std::io::Result<Option<usize>> {
    let text = std::fs::read_to_string("/proc/self/smaps")?;
    let mut inside = false;
    for line in text.lines() {
        if let Some(v) = Vma::parse(line) {
            inside = v.start <= addr && addr < v.end;
            continue;
        }
        let Some(rest) = line.strip_prefix("KernelPageSize:").filter(|_| inside) else {
            continue;
        };
        {
            let kb: usize = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .map_err(|_| std::io::Error::other("bad KernelPageSize line"))?;
            return Ok(Some(kb * 1024));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_classify() {
        let anon = Vma::parse("7f12a0000000-7f12a0400000 rw-p 00000000 00:00 0 ").unwrap();
        assert!(anon.anon_private());
        assert_eq!((anon.start, anon.end), (0x7f12_a000_0000, 0x7f12_a040_0000));
        let heap = Vma::parse("55d0c000-55d0d000 rw-p 00000000 00:00 0   [heap]").unwrap();
        assert!(heap.anon_private());
        let memfd =
            Vma::parse("7f00-8f00 rw-s 00000000 00:01 1025 /memfd:guest (deleted)").unwrap();
        assert!(!memfd.anon_private());
        assert_eq!(memfd.path, "/memfd:guest (deleted)");
        let shared_anon = Vma::parse("7f00-8f00 rw-s 00000000 00:01 7 /dev/zero (deleted)");
        assert!(!shared_anon.unwrap().anon_private());
        let huge = Vma::parse("7f00-8f00 rw-p 00000000 00:0f 99 /anon_hugepage (deleted)");
        assert!(!huge.unwrap().anon_private());
        assert!(Vma::parse("Rss:  4 kB").is_none());
    }

    #[test]
    fn coverage_sees_gaps() {
        let maps = [
            Vma::parse("1000-3000 rw-p 0 00:00 0").unwrap(),
            Vma::parse("4000-5000 rw-p 0 00:00 0").unwrap(),
        ];
        assert!(vmas_in(&maps, 0x1000, 0x3000).1);
        assert!(!vmas_in(&maps, 0x2000, 0x5000).1);
        assert!(all_anon_private(&maps, 0x4000, 0x5000));
        assert!(!all_anon_private(&maps, 0x2000, 0x5000));
    }

    #[test]
    fn this_process_has_its_stack_in_smaps() {
        let here = 0u8;
        let addr = &here as *const u8 as usize;
        let ps = kernel_page_size(addr).unwrap();
        assert_eq!(ps, Some(page_pipe_sys::page_size().get()));
    }
}
