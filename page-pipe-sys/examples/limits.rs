//! Prints the page size, `PIPE_MAX_SIZE`, the pipe limits in force, what `vmsplice`
//! does on this kernel, and which userfaultfd and `PAGEMAP_SCAN` facilities it offers this
//! process (for dirty tracking).
//!
//! ```text
//! cargo run --release -p page-pipe-sys --example limits
//! ```

use page_pipe_sys::{PipeLimits, pipe_max_size_pages, probe_vmsplice};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let limits = PipeLimits::get()?;
    let ps = limits.page_size.get();
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
    println!("page size:             {ps} bytes");
    println!(
        "PIPE_MAX_SIZE:         {} pages (CRIU's cap on a pipe)",
        pipe_max_size_pages(ps)
    );
    println!(
        "pipe-max-size:         {} bytes ({} pages)",
        limits.pipe_max_size,
        limits.pipe_max_size / ps
    );
    println!(
        "pipe-user-pages-soft:  {} pages",
        limits.pipe_user_pages_soft
    );
    println!(
        "pipe-user-pages-hard:  {} pages",
        limits.pipe_user_pages_hard
    );
    println!(
        "RLIMIT_NOFILE:         {} soft, {} hard",
        show(limits.nofile_soft),
        show(limits.nofile_hard)
    );
    println!("CAP_SYS_RESOURCE:      {}", yes_no(limits.cap_sys_resource));
    println!("CAP_SYS_ADMIN:         {}", yes_no(limits.cap_sys_admin));
    println!(
        "largest pipe granted:  {} pages{}",
        limits.max_grant_pages(),
        if limits.exempt_from_max_size() {
            " (exempt from pipe-max-size)"
        } else {
            ""
        }
    );
    println!(
        "per-user pipe pages:   {}",
        if limits.exempt_from_user_pages() {
            "exempt"
        } else {
            "limited"
        }
    );
    println!("{}", probe_vmsplice()?);
    println!("{}", page_pipe_sys::probe_userfaultfd());
    Ok(())
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
