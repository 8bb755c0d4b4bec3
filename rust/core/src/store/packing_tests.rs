//! Packed entries: moved, served, judged and dropped as entries in files of their own are, and a
//! pack never removed by what removes one entry.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use crate::entry::{Dtype, ReadMode, TensorData};
use crate::key::Stamp;
use crate::store::{Layout, State, Store, StoreConfig};

fn store(root: &Path, layout: Layout) -> Store {
    Store::open(StoreConfig {
        root: root.to_path_buf(),
        feature: "f".into(),
        layout,
        fingerprint: Some("fp".into()),
        legacy_suffix: None,
        read_mode: ReadMode::Map,
    })
    .unwrap()
}

fn write_aged(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap();
    let when = SystemTime::now() - Duration::from_secs(100);
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(when)
        .unwrap();
}

/// Sources `s0.png`.. with entries whose one tensor holds `fill` bytes of `i`.
fn populate(root: &Path, s: &Store, n: usize, size: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let rel = PathBuf::from(format!("s{i}.png"));
            write_aged(&root.join(&rel), format!("image {i}").as_bytes());
            put(s, &rel, i as u8, size);
            rel
        })
        .collect()
}

fn put(s: &Store, rel: &Path, fill: u8, size: usize) -> PathBuf {
    let data = vec![fill; size];
    let t = vec![TensorData {
        name: "x".into(),
        dtype: Dtype::U8,
        shape: vec![size as u64],
        data: &data,
    }];
    s.put(rel, &t, &Default::default(), &[], false, None)
        .unwrap()
        .path
}

fn tensor(s: &Store, rel: &Path) -> Option<Vec<u8>> {
    let e = s.open_valid(rel).unwrap()?;
    let t = e.header.tensor("x").unwrap().clone();
    Some(e.tensor_bytes(&t).to_vec())
}

fn pack(s: &Store, rels: &[PathBuf], target: u64) -> super::PackRun {
    s.pack_entries(rels, target, false, &AtomicU64::new(0))
        .unwrap()
}

#[test]
fn packed_entries_are_served_from_the_pack_here_and_in_another_process() {
    for layout in [
        Layout::Sidecar,
        Layout::Dir {
            cache_dir: PathBuf::from("cache"),
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let layout = match layout {
            Layout::Dir { cache_dir } => Layout::Dir {
                cache_dir: root.join(cache_dir),
            },
            l => l,
        };
        let s = store(root, layout.clone());
        // Small and mapped entries both (a mapping starts at the page holding the entry).
        let rels = populate(root, &s, 6, 20_000);
        let files: Vec<PathBuf> = rels.iter().map(|r| s.check(r).unwrap().entry).collect();
        let run = pack(&s, &rels, 50_000);
        assert_eq!(run.moved, 6);
        assert!(run.packs.len() >= 2, "the target size seals packs");
        assert!(run.kept_files.is_empty());
        assert!(files.iter().all(|f| !f.exists()), "own files removed");
        for (i, rel) in rels.iter().enumerate() {
            let c = s.check(rel).unwrap();
            assert_eq!(c.state, State::Valid, "{c:?}");
            assert!(c.packed.is_some());
            assert!(!c.entry.exists(), "a packed entry's name is no file");
            assert_eq!(tensor(&s, rel).unwrap(), vec![i as u8; 20_000]);
        }
        let other = store(root, layout.clone());
        for (i, rel) in rels.iter().enumerate() {
            assert_eq!(tensor(&other, rel).unwrap(), vec![i as u8; 20_000]);
            // Twice: the second read takes the hot path with the header it kept.
            assert_eq!(tensor(&other, rel).unwrap(), vec![i as u8; 20_000]);
        }
        let mut out = vec![0u8; 6 * 20_000];
        let read = other.read_batch(&rels, "x", Dtype::U8, &[20_000], &mut out, Some(2));
        assert!(read.iter().all(|r| r.is_ok()), "{read:?}");
        assert_eq!(out[5 * 20_000], 5);
    }
}

#[test]
fn a_store_opened_before_the_entries_were_packed_still_serves_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let s = store(root, Layout::Sidecar);
    let rels = populate(root, &s, 3, 100);
    // A training process that read its entries before `featstore pack` ran elsewhere.
    let early = store(root, Layout::Sidecar);
    assert_eq!(tensor(&early, &rels[1]).unwrap(), vec![1; 100]);
    pack(&s, &rels, 1 << 30);
    assert_eq!(tensor(&early, &rels[1]).unwrap(), vec![1; 100]);
    assert_eq!(early.check(&rels[2]).unwrap().state, State::Valid);
}

#[test]
fn an_edited_source_makes_its_packed_entry_stale_and_a_deleted_one_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let s = store(root, Layout::Sidecar);
    let rels = populate(root, &s, 3, 100);
    pack(&s, &rels, 1 << 30);
    let pack_file = s.pack_paths().unwrap().remove(0);
    write_aged(&root.join(&rels[0]), b"another image");
    fs::remove_file(root.join(&rels[1])).unwrap();
    let other = store(root, Layout::Sidecar);
    for st in [&s, &other] {
        let stale = st.check(&rels[0]).unwrap();
        assert_eq!(stale.state, State::Stale, "{stale:?}");
        assert!(tensor(st, &rels[0]).is_none());
        let orphan = st.check(&rels[1]).unwrap();
        assert_eq!(orphan.state, State::Orphan, "{orphan:?}");
        // What removes a judged entry file can never remove the pack.
        let removed =
            crate::judged::remove_judged(&orphan.entry, orphan.identity.unwrap()).unwrap();
        assert!(!removed);
        assert!(pack_file.exists());
    }
    assert_eq!(tensor(&other, &rels[2]).unwrap(), vec![2; 100]);
}

#[test]
fn a_touched_source_with_the_same_bytes_keeps_its_packed_entry_and_the_pack() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let s = store(root, Layout::Sidecar);
    let rels = populate(root, &s, 1, 100);
    pack(&s, &rels, 1 << 30);
    let pack_file = s.pack_paths().unwrap().remove(0);
    let before = Stamp::of(&pack_file).unwrap();
    write_aged(&root.join(&rels[0]), b"image 0");
    let other = store(root, Layout::Sidecar);
    assert_eq!(tensor(&other, &rels[0]).unwrap(), vec![0; 100]);
    assert_eq!(
        Stamp::of(&pack_file).unwrap(),
        before,
        "a pack is never rewritten"
    );
    assert!(!root.join("s0.png.f.safetensors").exists());
}

#[test]
fn an_entry_written_after_packing_is_preferred_to_the_packed_copy_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let s = store(root, Layout::Sidecar);
    let rels = populate(root, &s, 1, 100);
    pack(&s, &rels, 1 << 30);
    let reader = store(root, Layout::Sidecar);
    assert_eq!(tensor(&reader, &rels[0]).unwrap(), vec![0; 100]);
    // The same source, unchanged, gets new tensors from another process's put.
    let writer = store(root, Layout::Sidecar);
    put(&writer, &rels[0], 9, 100);
    assert_eq!(tensor(&reader, &rels[0]).unwrap(), vec![9; 100]);
    assert_eq!(reader.check(&rels[0]).unwrap().packed, None);
}

#[test]
fn entries_whose_data_is_damaged_or_not_valid_are_not_packed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let s = store(root, Layout::Sidecar);
    let rels = populate(root, &s, 3, 100);
    let damaged = s.check(&rels[0]).unwrap().entry;
    let mut bytes = fs::read(&damaged).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    // Same size and mtime: the stamps alone still vouch for it, the checksum does not.
    let meta = fs::metadata(&damaged).unwrap();
    fs::write(&damaged, &bytes).unwrap();
    File::options()
        .write(true)
        .open(&damaged)
        .unwrap()
        .set_modified(meta.modified().unwrap())
        .unwrap();
    write_aged(&root.join(&rels[1]), b"edited");
    let fresh = store(root, Layout::Sidecar);
    let run = pack(&fresh, &rels, 1 << 30);
    assert_eq!(run.moved, 1);
    let why: Vec<&str> = run.skipped.iter().map(|(_, w)| w.as_str()).collect();
    assert!(why.len() == 1 && why[0].contains("checksum"), "{why:?}");
    assert_eq!(run.not_valid.get("stale"), Some(&1));
    assert!(damaged.exists(), "a skipped entry keeps its file");
    // Packing again finds the packed one packed and moves nothing.
    let again = pack(&store(root, Layout::Sidecar), &rels, 1 << 30);
    assert_eq!((again.moved, again.already_packed), (0, 1));
}

#[test]
fn a_dropped_packed_entry_is_missing_and_its_pack_stays() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let s = store(root, Layout::Sidecar);
    let rels = populate(root, &s, 2, 100);
    pack(&s, &rels, 1 << 30);
    let c = s.check(&rels[0]).unwrap();
    let at = c.packed.clone().unwrap();
    assert_eq!(
        s.drop_packed(&[(rels[0].clone(), at.clone())]).unwrap(),
        [true]
    );
    // Dropping it again drops nothing (the index no longer places it there).
    assert_eq!(s.drop_packed(&[(rels[0].clone(), at)]).unwrap(), [false]);
    for st in [&s, &store(root, Layout::Sidecar)] {
        assert_eq!(st.check(&rels[0]).unwrap().state, State::Missing);
        assert_eq!(tensor(st, &rels[1]).unwrap(), vec![1; 100]);
    }
    assert!(s.remove(&rels[1]).unwrap());
    assert_eq!(s.pack_paths().unwrap().len(), 1, "the pack stays");
    assert_eq!(
        store(root, Layout::Sidecar).check(&rels[1]).unwrap().state,
        State::Missing
    );
}

#[test]
fn a_pack_cut_short_is_a_corrupt_entry_never_a_wrong_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let s = store(root, Layout::Sidecar);
    let rels = populate(root, &s, 2, 100);
    pack(&s, &rels, 1 << 30);
    let pack_file = s.pack_paths().unwrap().remove(0);
    let bytes = fs::read(&pack_file).unwrap();
    fs::write(&pack_file, &bytes[..300]).unwrap();
    let fresh = store(root, Layout::Sidecar);
    let c = fresh.check(&rels[1]).unwrap();
    assert_eq!(c.state, State::Corrupt, "{c:?}");
    assert!(c.reason.contains("past the end"), "{}", c.reason);
    assert!(tensor(&fresh, &rels[1]).is_none());
}

#[test]
fn a_pack_stream_indexes_its_entries_only_once_the_pack_is_sealed() {
    use crate::store::{PackStream, PutRequest};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let s = store(root, Layout::Sidecar);
    let data: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 20_000]).collect();
    let requests: Vec<PutRequest> = (0..3)
        .map(|i| {
            let rel = PathBuf::from(format!("s{i}.png"));
            write_aged(&root.join(&rel), format!("image {i}").as_bytes());
            PutRequest {
                rel,
                tensors: vec![TensorData {
                    name: "x".into(),
                    dtype: Dtype::U8,
                    shape: vec![20_000],
                    data: &data[i],
                }],
                meta: Default::default(),
                inputs: Vec::new(),
                expected: None,
            }
        })
        .collect();
    let stream = PackStream::new(1 << 30, Duration::from_secs(3600));
    let appended = s.put_many_packed(&stream, &requests, Some(2));
    assert!(appended.iter().all(|r| r.is_ok()), "{appended:?}");
    assert!(
        s.seal_pack_stream(&stream, false, false)
            .unwrap()
            .is_empty(),
        "not due"
    );
    // Not sealed: nothing is served, and no entry file was written.
    assert_eq!(
        store(root, Layout::Sidecar)
            .check(&requests[1].rel)
            .unwrap()
            .state,
        State::Missing
    );
    assert!(s.pack_paths().unwrap().is_empty());
    let records = s.seal_pack_stream(&stream, true, false).unwrap();
    assert_eq!(records.len(), 3);
    let other = store(root, Layout::Sidecar);
    for (i, r) in requests.iter().enumerate() {
        assert_eq!(tensor(&other, &r.rel).unwrap(), vec![i as u8; 20_000]);
        assert!(!root.join(format!("s{i}.png.f.safetensors")).exists());
    }
    // A source edited after it was read: nothing appended for it.
    let mut stale = requests;
    stale.truncate(1);
    stale[0].expected = Some(Stamp::sized(1, 1));
    let refused = s.put_many_packed(&stream, &stale, None);
    assert!(refused[0]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("changed"));
}
