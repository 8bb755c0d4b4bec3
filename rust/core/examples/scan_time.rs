//! Times `scan_tree` on a directory with 1 and 2 threads: `cargo run --release --example scan_time DIR`.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use featstore_core::scan::{scan_tree, ScanOptions};

fn main() {
    let root = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: scan_time DIR"));
    for threads in [1usize, 2] {
        let opts = ScanOptions {
            threads: Some(threads),
            ..Default::default()
        };
        let t = Instant::now();
        match scan_tree(&root, &opts, &AtomicU64::new(0)) {
            Ok(s) => println!(
                "threads={threads}: {} files in {:.3} s",
                s.sources.len(),
                t.elapsed().as_secs_f64()
            ),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        }
    }
}
