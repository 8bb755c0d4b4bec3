//! Times the hot-path check on an existing store: `cargo run --release --example hot_check DIR`.
use featstore_core::entry::ReadMode;
use featstore_core::store::{Layout, Store, StoreConfig};
use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let root = PathBuf::from(std::env::args().nth(1).expect("DIR"));
    let cfg = StoreConfig {
        root: root.clone(),
        feature: "vggt".into(),
        layout: Layout::Sidecar,
        fingerprint: None,
        legacy_suffix: None,
        read_mode: ReadMode::Map,
    };
    let store = Store::open(cfg).unwrap();
    let rels: Vec<PathBuf> = (0..64)
        .map(|i| PathBuf::from(format!("img_{i}.jpg")))
        .collect();
    for r in &rels {
        store.check(r).unwrap();
    }
    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        for r in &rels {
            std::hint::black_box(store.check(r).unwrap());
        }
    }
    println!(
        "check: {:.2} us",
        t.elapsed().as_secs_f64() * 1e6 / (n * rels.len()) as f64
    );
    let t = Instant::now();
    for _ in 0..n {
        for r in &rels {
            std::hint::black_box(std::fs::metadata(root.join(r)).unwrap());
        }
    }
    println!(
        "one metadata: {:.2} us",
        t.elapsed().as_secs_f64() * 1e6 / (n * rels.len()) as f64
    );
    let t = Instant::now();
    for _ in 0..n {
        for r in &rels {
            std::hint::black_box(
                featstore_core::entry::open_entry(
                    &store.entry_path(
                        r,
                        featstore_core::key::Stamp {
                            size: 0,
                            mtime_ns: 0,
                        },
                    ),
                    ReadMode::Map,
                )
                .unwrap(),
            );
        }
    }
    let paths: Vec<PathBuf> = rels
        .iter()
        .map(|r| {
            store.entry_path(
                r,
                featstore_core::key::Stamp {
                    size: 0,
                    mtime_ns: 0,
                },
            )
        })
        .collect();
    let t = Instant::now();
    for _ in 0..n {
        for p in &paths {
            let f = std::fs::File::open(p).unwrap();
            let _len = f.metadata().unwrap().len();
            let m = unsafe { memmap2::MmapOptions::new().map_copy(&f) }.unwrap();
            std::hint::black_box(&m);
        }
    }
    println!(
        "open+fstat+mmap+munmap: {:.2} us",
        t.elapsed().as_secs_f64() * 1e6 / (n * rels.len()) as f64
    );
    let bytes: Vec<Vec<u8>> = paths
        .iter()
        .map(|p| std::fs::read(p).unwrap()[..4096].to_vec())
        .collect();
    let t = Instant::now();
    for _ in 0..n {
        for (p, b) in paths.iter().zip(&bytes) {
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            std::hint::black_box(
                featstore_core::entry::parse_header(p, &b[8..8 + n], 0, 1 << 20).unwrap(),
            );
        }
    }
    println!(
        "parse_header: {:.2} us",
        t.elapsed().as_secs_f64() * 1e6 / (n * rels.len()) as f64
    );
    println!(
        "open_entry: {:.2} us",
        t.elapsed().as_secs_f64() * 1e6 / (n * rels.len()) as f64
    );
}

#[allow(dead_code)]
fn unused() {}
