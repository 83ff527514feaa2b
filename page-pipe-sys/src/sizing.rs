//! Pipe sizing math, as the kernel and CRIU do it.

use crate::layout::PIPE_BUFFER_SIZE;

/// Orders above this are "costly" for the kernel's page allocator and fail often under
/// memory pressure (`include/linux/mmzone.h`).
pub const PAGE_ALLOC_COSTLY_ORDER: u32 = 3;

/// The most pipes a page pipe in chunk mode holds at once before it reports "full".
pub const NR_PIPES_PER_CHUNK: usize = 8;

/// Slots of a new pipe (`PIPE_DEF_BUFFERS`, `include/linux/pipe_fs_i.h`): 16 pages.
pub const PIPE_DEF_BUFFERS: usize = 16;

/// Slots of a new pipe made by an unprivileged user who is past
/// `/proc/sys/fs/pipe-user-pages-soft` (`PIPE_MIN_DEF_BUFFERS`, `fs/pipe.c`).
pub const PIPE_MIN_DEF_BUFFERS: usize = 2;

/// The most iovecs one `vmsplice` call takes (`UIO_MAXIOV`, `include/uapi/linux/uio.h`).
pub const UIO_MAXIOV: usize = 1024;

/// The largest pipe size in bytes `F_SETPIPE_SZ` can ever grant: `round_pipe_size` refuses
/// anything above `1 << 31` (`fs/pipe.c`), and `fcntl` takes an `int`.
pub const PIPE_SIZE_LIMIT: usize = 1 << 31;

/// `PIPE_MAX_SIZE` in pages: the most slots a pipe may have while its slot array still fits
/// an allocation of order [`PAGE_ALLOC_COSTLY_ORDER`].
///
/// Mirrors CRIU's `PIPE_MAX_SIZE`, which is
/// `(1 << PAGE_ALLOC_COSTLY_ORDER) * PAGE_SIZE / sizeof(struct pipe_buffer)`; the slot
/// array itself is allocated by `pipe_resize_ring()` in `fs/pipe.c`.
///
/// ```
/// assert_eq!(page_pipe_sys::pipe_max_size_pages(4096), 819);
/// assert_eq!(page_pipe_sys::pipe_max_size_pages(16384), 3276);
/// ```
pub const fn pipe_max_size_pages(page_size: usize) -> usize {
    (1usize << PAGE_ALLOC_COSTLY_ORDER) * page_size / PIPE_BUFFER_SIZE
}

/// The pipe size in bytes the kernel uses for a request of `bytes`: at least one page,
/// rounded up to a power of two; `None` where the kernel refuses the request outright.
///
/// Mirrors `round_pipe_size()` in `fs/pipe.c`, which `F_SETPIPE_SZ` (`pipe_set_size()`)
/// and the `pipe-max-size` sysctl both apply.
///
/// ```
/// use page_pipe_sys::round_pipe_size;
/// assert_eq!(round_pipe_size(1, 4096), Some(4096));
/// assert_eq!(round_pipe_size(3 * 4096, 4096), Some(4 * 4096));
/// assert_eq!(round_pipe_size(819 * 4096, 4096), Some(1024 * 4096));
/// assert_eq!(round_pipe_size((1 << 31) + 1, 4096), None);
/// ```
pub const fn round_pipe_size(bytes: usize, page_size: usize) -> Option<usize> {
    if bytes > PIPE_SIZE_LIMIT {
        return None;
    }
    if bytes < page_size {
        return Some(page_size);
    }
    Some(bytes.next_power_of_two())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_max_size_matches_criu_for_common_page_sizes() {
        assert_eq!(pipe_max_size_pages(4096), 819);
        assert_eq!(pipe_max_size_pages(65536), 13107);
    }

    #[test]
    fn rounding_is_monotonic_and_a_power_of_two() {
        let ps = 4096;
        let mut last = 0;
        for pages in 1..=2048usize {
            let got = round_pipe_size(pages * ps, ps).unwrap();
            assert!(got.is_power_of_two());
            assert!(got >= pages * ps);
            assert!(got < 2 * pages * ps || pages == 1);
            assert!(got >= last);
            last = got;
        }
        assert_eq!(round_pipe_size(PIPE_SIZE_LIMIT, ps), Some(PIPE_SIZE_LIMIT));
        assert_eq!(round_pipe_size(0, ps), Some(ps));
    }
}
