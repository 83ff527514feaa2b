//! The kernel's `struct pipe_buffer`, mirrored for its size.

use std::ffi::{c_uint, c_ulong, c_void};
use std::mem::{offset_of, size_of};

/// A `#[repr(C)]` mirror of the kernel's `struct pipe_buffer`
/// (`include/linux/pipe_fs_i.h`): one slot of a pipe's ring.
///
/// User space never sees these; the layout matters only for its size, which decides how
/// many slots fit the allocation the kernel makes for a pipe's ring
/// ([`pipe_max_size_pages`](crate::pipe_max_size_pages)). The fields are those of Linux 6.x:
///
/// | field     | C type                              | offset (64-bit) |
/// |-----------|-------------------------------------|-----------------|
/// | `page`    | `struct page *`                     | 0               |
/// | `offset`  | `unsigned int`                      | 8               |
/// | `len`     | `unsigned int`                      | 12              |
/// | `ops`     | `const struct pipe_buf_operations *`| 16              |
/// | `flags`   | `unsigned int`                      | 24              |
/// | `private` | `unsigned long`                     | 32              |
///
/// ```
/// assert_eq!(std::mem::size_of::<page_pipe_sys::PipeBuffer>(), page_pipe_sys::PIPE_BUFFER_SIZE);
/// ```
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PipeBuffer {
    /// The page holding the data.
    pub page: *mut c_void,
    /// Offset of the data in the page.
    pub offset: c_uint,
    /// Length of the data.
    pub len: c_uint,
    /// Operations on this buffer (`anon_pipe_buf_ops`, `user_page_pipe_buf_ops`, ...).
    pub ops: *const c_void,
    /// `PIPE_BUF_FLAG_*`.
    pub flags: c_uint,
    /// Private data of the owner of `ops`.
    pub private: c_ulong,
}

/// `sizeof(struct pipe_buffer)` on this target: 40 bytes on 64-bit Linux, 24 on 32-bit.
pub const PIPE_BUFFER_SIZE: usize = size_of::<PipeBuffer>();

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(PIPE_BUFFER_SIZE == 40);
    assert!(offset_of!(PipeBuffer, page) == 0);
    assert!(offset_of!(PipeBuffer, offset) == 8);
    assert!(offset_of!(PipeBuffer, len) == 12);
    assert!(offset_of!(PipeBuffer, ops) == 16);
    assert!(offset_of!(PipeBuffer, flags) == 24);
    assert!(offset_of!(PipeBuffer, private) == 32);
};

#[cfg(target_pointer_width = "32")]
const _: () = {
    assert!(PIPE_BUFFER_SIZE == 24);
    assert!(offset_of!(PipeBuffer, flags) == 16);
    assert!(offset_of!(PipeBuffer, private) == 20);
};
