//! Times scan_tree on a directory: `cargo run --release --example scan_time DIR`.
use std::sync::atomic::AtomicU64;
use std::time::Instant;
fn main() {
    let root = std::path::PathBuf::from(std::env::args().nth(1).expect("DIR"));
    for threads in [1usize, 2] {
        let opts = featstore_core::scan::ScanOptions {
            threads: Some(threads),
            ..Default::default()
        };
        let t = Instant::now();
        let s = featstore_core::scan::scan_tree(&root, &opts, &AtomicU64::new(0)).unwrap();
        println!(
            "scan_tree threads={threads}: {} files in {:.3} s",
            s.sources.len(),
            t.elapsed().as_secs_f64()
        );
    }
    let t = Instant::now();
    let mut n = 0;
    for e in std::fs::read_dir(&root).unwrap() {
        let d = e.unwrap().path().join("rgb");
        for f in std::fs::read_dir(&d).unwrap() {
            let f = f.unwrap();
            let _m = std::fs::metadata(f.path()).unwrap();
            n += 1;
        }
    }
    println!(
        "plain read_dir + metadata(path), 1 thread: {n} in {:.3} s",
        t.elapsed().as_secs_f64()
    );
}
