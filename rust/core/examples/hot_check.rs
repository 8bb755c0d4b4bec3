//! Times the read path's parts on a store made by the benchmarks or a test: the hot check, one
//! `stat`, opening and mapping an entry, and parsing its header.
//!
//! `cargo run --release --example hot_check DIR` where DIR holds `img_0.jpg` .. `img_63.jpg` with
//! `vggt` sidecar entries.

use std::path::PathBuf;
use std::time::Instant;

use featstore_core::entry::{self, ReadMode};
use featstore_core::key::Stamp;
use featstore_core::store::{Layout, Store, StoreConfig};

fn per_item(label: &str, items: usize, rounds: usize, mut f: impl FnMut()) {
    let t = Instant::now();
    for _ in 0..rounds {
        f();
    }
    println!(
        "{label:28} {:8.2} us",
        t.elapsed().as_secs_f64() * 1e6 / (rounds * items) as f64
    );
}

fn main() {
    let root = PathBuf::from(std::env::args().nth(1).expect("usage: hot_check DIR"));
    let cfg = StoreConfig {
        root: root.clone(),
        feature: "vggt".into(),
        layout: Layout::Sidecar,
        fingerprint: None,
        legacy_suffix: None,
        read_mode: ReadMode::Map,
    };
    let store = Store::open(cfg).expect("open store");
    let rels: Vec<PathBuf> = (0..64)
        .map(|i| PathBuf::from(format!("img_{i}.jpg")))
        .collect();
    let entries: Vec<PathBuf> = rels
        .iter()
        .map(|r| store.entry_path(r, Stamp::sized(0, 0)))
        .collect();
    for r in &rels {
        store.check(r).expect("check");
    }
    let n = rels.len();
    per_item("check (hot)", n, 200, || {
        for r in &rels {
            std::hint::black_box(store.check(r).unwrap());
        }
    });
    per_item("one metadata()", n, 200, || {
        for r in &rels {
            std::hint::black_box(std::fs::metadata(root.join(r)).unwrap());
        }
    });
    per_item("open_valid (repeat read)", n, 200, || {
        for r in &rels {
            std::hint::black_box(store.open_valid(r).unwrap());
        }
    });
    per_item("open_entry (parse header)", n, 200, || {
        for e in &entries {
            std::hint::black_box(entry::open_entry(e, ReadMode::Map).unwrap());
        }
    });
    per_item("read_header (pread only)", n, 200, || {
        for e in &entries {
            std::hint::black_box(entry::read_header(e).unwrap());
        }
    });
}
