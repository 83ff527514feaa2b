//! Capture, dump, sockets and restore against the baselines a user would otherwise write,
//! over a 64 MiB region (the `bench` example runs the same workloads at 1 GiB and prints
//! one table of ratios).
//!
//! ```text
//! cargo bench -p page-pipe --bench sinks
//! ```

mod workloads;

use std::net::TcpListener;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use page_pipe::snapshot::Drain;
use workloads::*;

fn bench(c: &mut Criterion) {
    let r = Region::new(64 << 20);
    let source = r.source();
    let mut g = c.benchmark_group("sinks");
    g.throughput(Throughput::Bytes(r.bytes()));
    g.sample_size(20);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));

    let mut copy = vec![0u8; r.mem.len()];
    g.bench_function("capture/ours", |b| b.iter(|| capture(&r, &source, None)));
    g.bench_function("capture/memcpy", |b| b.iter(|| memcpy(&r, &mut copy)));
    g.bench_function("capture/bare vmsplice", |b| b.iter(|| bare_vmsplice(&r)));

    let dir = std::env::temp_dir().join(format!("page-pipe-sinks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("img");
    for (name, drain) in [
        ("pipes", Drain::Pipes),
        ("memory", Drain::Memory),
        ("default", Drain::Auto),
    ] {
        g.bench_function(format!("file/ours {name}"), |b| {
            b.iter(|| dump_image(&r, &img, drain))
        });
    }
    let fc = dir.join("fc.mem");
    g.bench_function("file/write_all loop", |b| b.iter(|| firecracker(&r, &fc)));

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    for (name, drain) in [
        ("pipes", Drain::Pipes),
        ("memory", Drain::Memory),
        ("default", Drain::Auto),
    ] {
        g.bench_function(format!("unix/ours {name}"), |b| {
            b.iter(|| to_socket(&r, unix_pair(), drain))
        });
        g.bench_function(format!("tcp/ours {name}"), |b| {
            b.iter(|| to_socket(&r, tcp_pair(&listener), drain))
        });
    }
    g.bench_function("unix/write", |b| b.iter(|| write_socket(&r, unix_pair())));
    g.bench_function("tcp/write", |b| {
        b.iter(|| write_socket(&r, tcp_pair(&listener)))
    });

    let mut dst = touched(r.mem.len());
    dump_image(&r, &img, Drain::Auto);
    g.bench_function("restore/ours", |b| {
        b.iter(|| restore(&img, r.base(), &mut dst[..]))
    });
    g.bench_function("restore/pread", |b| {
        b.iter(|| pread(&img.join("pages-1.img"), &mut dst[..]))
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
