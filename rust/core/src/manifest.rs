//! The manifest (one small JSON file per feature, written atomically: the fields users read) and
//! the per-rank journals that record progress during a run.
//!
//! Workers never rewrite the manifest while they run: each rank appends one line per finished
//! batch to `<manifest>.rank<R>-of-<N>.jsonl`, and whoever comes next (the run's end, or any
//! later run that finds journals) turns the journals into one index segment ([`crate::index`])
//! and the failures and counts into the manifest. A crash can tear only the last line of a
//! journal, and a torn line is skipped when reading.
//!
//! Manifests of earlier versions held the whole index inline (`"index"`); it is read as the
//! oldest segment until the next merge writes it into one ([`merge_journals`]).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::entry::write_atomic;
use crate::error::{Error, IoContext, Result};
use crate::index::{self, Index, Segment, Slot};
use crate::key::{path_bytes, Stamp};
use crate::pack::PackedAt;

/// How a relative path is written in JSON (journal lines, the index's keys): as itself when it
/// is UTF-8, else as a NUL (which no path contains) followed by its bytes in hex. Python's
/// `featstore.vocabulary.path_to_json` writes the same.
pub fn path_to_json(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = p.as_os_str().as_bytes();
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => format!("\0{}", hex::encode(bytes)),
    }
}

/// The path [`path_to_json`] wrote.
pub fn path_from_json(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    match s.strip_prefix('\0').and_then(|h| hex::decode(h).ok()) {
        Some(bytes) => PathBuf::from(std::ffi::OsString::from_vec(bytes)),
        None => PathBuf::from(s),
    }
}

/// Format tag of the manifests this crate writes.
pub const MANIFEST_FORMAT: &str = "featstore-manifest-v1";

/// What the manifest remembers of one valid entry: the source and entry stamps when it was
/// written (so `status` and the hot path open no entry) and whether a lookup must check it in
/// full before trusting the stamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRecord {
    pub source: Stamp,
    pub entry: Stamp,
    /// Check in full on first use: the entry (or one of its inputs) is racy, or it has inputs
    /// besides its source that this record does not hold (records of earlier versions).
    pub racy: bool,
    /// The entry's extra inputs as its header records them (the `inputs` array without the
    /// source's item): a lookup checks them from here, without opening the entry.
    pub inputs: Option<Arc<str>>,
    /// Where the entry is when a pack holds it (its `entry` stamp is then the pack's); None: in
    /// its own file, where the layout puts it.
    pub packed: Option<PackedAt>,
}

impl IndexRecord {
    // Stored as a compact array: `[size, mtime_ns, entry size, entry mtime_ns, check_first,
    // ino, ctime_ns, entry ino, entry ctime_ns]`, then the extra inputs' JSON when there are
    // any (null when there are none but a location follows), then a packed entry's location
    // `[pack, offset, length]` (a journal line's `record`; earlier versions' manifests held
    // these inline).
    pub fn to_json(&self) -> Value {
        let mut fields = vec![
            Value::from(self.source.size),
            Value::from(self.source.mtime_ns),
            Value::from(self.entry.size),
            Value::from(self.entry.mtime_ns),
            Value::from(self.racy as u8),
            Value::from(self.source.ino),
            Value::from(self.source.ctime_ns),
            Value::from(self.entry.ino),
            Value::from(self.entry.ctime_ns),
        ];
        match (&self.inputs, &self.packed) {
            (Some(inputs), _) => fields.push(Value::from(&**inputs)),
            (None, Some(_)) => fields.push(Value::Null),
            (None, None) => {}
        }
        if let Some(p) = &self.packed {
            fields.push(Value::from(vec![
                Value::from(&*p.pack),
                Value::from(p.offset),
                Value::from(p.len),
            ]));
        }
        Value::from(fields)
    }

    /// Reads a record; the 5-field form of earlier versions lacks inodes and ctimes, so its
    /// stamps never match a file's and the entry is checked in full on first use.
    fn from_json(v: &Value) -> Option<IndexRecord> {
        let a = v.as_array()?;
        if !matches!(a.len(), 5 | 9 | 10 | 11) {
            return None;
        }
        let mut source = Stamp::sized(a[0].as_u64()?, a[1].as_i64()?);
        let mut entry = Stamp::sized(a[2].as_u64()?, a[3].as_i64()?);
        if a.len() >= 9 {
            (source.ino, source.ctime_ns) = (a[5].as_u64()?, a[6].as_i64()?);
            (entry.ino, entry.ctime_ns) = (a[7].as_u64()?, a[8].as_i64()?);
        }
        Some(IndexRecord {
            source,
            entry,
            racy: a[4].as_u64()? != 0,
            inputs: match a.get(9) {
                Some(Value::Null) | None => None,
                Some(i) => Some(Arc::from(i.as_str()?)),
            },
            packed: match a.get(10) {
                Some(p) => Some(packed_from_json(p)?),
                None => None,
            },
        })
    }
}

/// A packed entry's location `[pack, offset, length]`; a pack name that could name a file
/// outside the packs directory is no location.
fn packed_from_json(v: &Value) -> Option<PackedAt> {
    let a = v.as_array()?;
    let pack = a
        .first()?
        .as_str()
        .filter(|n| crate::pack::is_pack_name(n))?;
    Some(PackedAt {
        pack: Arc::from(pack),
        offset: a.get(1)?.as_u64()?,
        len: a.get(2)?.as_u64()?,
    })
}

/// A journal stamp: `[size, mtime_ns]` (earlier versions) or `[size, mtime_ns, ino, ctime_ns]`.
fn stamp_from_json(v: &Value) -> Option<Stamp> {
    let a = v.as_array()?;
    let mut stamp = Stamp::sized(a.first()?.as_u64()?, a.get(1)?.as_i64()?);
    if a.len() >= 4 {
        (stamp.ino, stamp.ctime_ns) = (a[2].as_u64()?, a[3].as_i64()?);
    }
    Some(stamp)
}

/// A manifest: free-form fields (the ones users already read, counts, encoder description,
/// timings, ...) plus the failures; `legacy_index` is the inline index of a manifest written
/// before the index moved to segments (empty once merged).
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    pub fields: Map<String, Value>,
    pub legacy_index: BTreeMap<String, IndexRecord>,
    pub failures: BTreeMap<String, String>,
}

impl Manifest {
    /// Reads a manifest; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<Manifest>> {
        match std::fs::read(path) {
            Ok(text) => Manifest::parse(path, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Parses manifest JSON text (`path` names it in errors).
    pub fn parse(path: &Path, text: &[u8]) -> Result<Manifest> {
        let bad = |reason: String| Error::Manifest {
            path: path.to_path_buf(),
            reason,
        };
        let mut fields: Map<String, Value> = serde_json::from_slice(text).map_err(|e| {
            bad(format!(
                "not valid JSON ({e}); move it aside and run `featstore precompute` with the encoder that wrote the entries: it rebuilds the manifest (entries of any other encoder are recomputed)"
            ))
        })?;
        let mut index = BTreeMap::new();
        if let Some(v) = fields.remove("index") {
            let Value::Object(m) = v else {
                return Err(bad("index is not an object".into()));
            };
            for (rel, rec) in m {
                let r = IndexRecord::from_json(&rec)
                    .ok_or_else(|| bad(format!("index record of {rel:?} is malformed")))?;
                index.insert(rel, r);
            }
        }
        let mut failures = BTreeMap::new();
        if let Some(Value::Object(m)) = fields.remove("failures") {
            for (rel, reason) in m {
                failures.insert(rel, reason.as_str().unwrap_or_default().to_string());
            }
        }
        Ok(Manifest {
            fields,
            legacy_index: index,
            failures,
        })
    }

    /// Serializes the manifest (fields first, then failures; a legacy index is never written
    /// back: merging moves it into a segment).
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let mut root = self.fields.clone();
        root.insert("format".into(), Value::from(MANIFEST_FORMAT));
        if !root.contains_key("processed_images") {
            root.insert("processed_images".into(), Value::from(0));
        }
        root.insert(
            "failures".into(),
            Value::Object(
                self.failures
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                    .collect(),
            ),
        );
        let mut out = serde_json::to_vec_pretty(&Value::Object(root)).expect("manifest serializes");
        out.push(b'\n');
        out
    }

    /// Writes the manifest atomically (temporary file, rename).
    pub fn write(&self, path: &Path, durable: bool) -> Result<()> {
        write_atomic(path, &[&self.to_json_bytes()], durable).map(|_| ())
    }

    /// Sets free-form fields. A new `fingerprint` (or a first one) empties the index and the
    /// failures: they were judged for entries of another encoder (or of any), and trusting them
    /// would serve its features.
    pub fn update_fields(&mut self, fields: Map<String, Value>) {
        if let Some(new) = fields.get("fingerprint") {
            // Also when none was recorded: the index may hold records of any encoder.
            if self.fields.get("fingerprint") != Some(new) {
                self.legacy_index.clear();
                self.failures.clear();
            }
        }
        self.fields.extend(fields);
    }

    /// The fingerprint the index was judged for (None: none recorded).
    pub fn fingerprint(&self) -> Option<&str> {
        self.fields.get("fingerprint").and_then(Value::as_str)
    }

    /// Applies one journal record: an entry's index record (or its removal) goes to `delta`, a
    /// failure to the failures. False when it was skipped because another encoder configuration
    /// (fingerprint) wrote it: its entries are foreign to this manifest, and indexing them would
    /// make lookups trust them. Unknown operations are ignored (newer writers).
    pub fn apply(&mut self, record: &Value, delta: &mut Vec<(Vec<u8>, Slot)>) -> bool {
        let Some(rel) = record.get("path").and_then(Value::as_str) else {
            return true;
        };
        let written_by = record.get("fingerprint").and_then(Value::as_str);
        if let (Some(ours), Some(theirs)) = (self.fingerprint(), written_by) {
            if ours != theirs {
                return false;
            }
        }
        let key = || path_bytes(&path_from_json(rel)).to_vec();
        match record.get("op").and_then(Value::as_str) {
            Some("ok") => {
                // Either the stamps of a write, or an index record as the index stores it.
                let stamp = |k: &str| record.get(k).and_then(stamp_from_json);
                let racy = record.get("racy").and_then(Value::as_bool).unwrap_or(false);
                let indexed = match (stamp("source"), stamp("entry"), record.get("record")) {
                    (Some(source), Some(entry), _) => Some(IndexRecord {
                        source,
                        entry,
                        racy,
                        inputs: record.get("inputs").and_then(Value::as_str).map(Arc::from),
                        packed: None,
                    }),
                    (_, _, Some(r)) => IndexRecord::from_json(r),
                    _ => None,
                };
                if let Some(r) = indexed {
                    delta.push((key(), Slot::Entry(r)));
                    self.failures.remove(rel);
                }
            }
            Some("failed") => {
                let reason = record
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                self.failures.insert(rel.to_string(), reason.to_string());
            }
            Some("removed") => {
                delta.push((key(), Slot::Removed));
                self.failures.remove(rel);
            }
            _ => {}
        }
        true
    }

    /// The legacy inline index as segment records.
    fn legacy_records(&self) -> Vec<(Vec<u8>, Slot)> {
        self.legacy_index
            .iter()
            .map(|(rel, r)| {
                (
                    path_bytes(&path_from_json(rel)).to_vec(),
                    Slot::Entry(r.clone()),
                )
            })
            .collect()
    }
}

/// The journal of rank `rank` of `world` beside `manifest`.
pub fn journal_path(manifest: &Path, rank: u32, world: u32) -> PathBuf {
    let mut name = manifest.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".rank{rank}-of-{world}.jsonl"));
    manifest.with_file_name(name)
}

/// Journals found beside `manifest`, sorted by name.
pub fn find_journals(manifest: &Path) -> Result<Vec<PathBuf>> {
    let dir = manifest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let prefix = format!(
        "{}.rank",
        manifest.file_name().unwrap_or_default().to_string_lossy()
    );
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for e in entries {
        let e = e.at(dir)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".jsonl") {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Appends records to a journal with one `write` (lines of one batch land together or, after a
/// crash, the torn tail is skipped by [`read_journal`]). With `durable`, fsyncs the journal.
pub fn append_journal(path: &Path, records: &[Value], durable: bool) -> Result<()> {
    let mut buf = Vec::new();
    for r in records {
        serde_json::to_writer(&mut buf, r).expect("record serializes");
        buf.push(b'\n');
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .at(path)?;
    f.write_all(&buf).at(path)?;
    if durable {
        f.sync_data().at(path)?;
    }
    Ok(())
}

/// Calls `each` with every record of a journal, one line at a time (a million-line journal is
/// never held whole, nor parsed into a million values at once); returns the number of records
/// and of torn or malformed lines skipped.
pub fn read_journal(path: &Path, mut each: impl FnMut(&Value)) -> Result<(usize, usize)> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).at(path)?;
    let (mut records, mut skipped) = (0, 0);
    for line in std::io::BufReader::with_capacity(1 << 20, file).split(b'\n') {
        let line = line.at(path)?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Value>(&line) {
            Ok(v) if v.is_object() => {
                records += 1;
                each(&v);
            }
            _ => skipped += 1,
        }
    }
    Ok((records, skipped))
}

/// What a merge did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MergeSummary {
    pub journals: usize,
    pub records: usize,
    pub skipped_lines: usize,
    /// Records of another encoder configuration, left out of the index.
    pub foreign_records: usize,
}

/// Segments are folded into one when a merge leaves more than this many (or when its own segment
/// rewrote at least half of the index): lookups look in each (newest first), and a merge must
/// cost what the run changed, not the size of the index.
pub const COMPACT_ABOVE: usize = 8;

/// Folds every journal beside `manifest_path` into one new segment of the index in `index_dir`
/// and the failures into the manifest (starting from `base` when given, else from the manifest
/// on disk), writes the manifest atomically, then deletes the journals. Records are applied
/// journal by journal in name order; within one source the last record wins. A manifest of an
/// earlier version has its inline index written as a segment here (when no segment of its
/// fingerprint exists yet: one that does was written from it by a merge that died before it
/// rewrote the manifest). Compacts when more than [`COMPACT_ABOVE`] segments are left, or when
/// another fingerprint's are there. The caller holds the feature's lock.
pub fn merge_journals(
    manifest_path: &Path,
    index_dir: &Path,
    base: Option<Manifest>,
    durable: bool,
) -> Result<(Manifest, MergeSummary)> {
    let mut manifest = match base {
        Some(m) => m,
        None => Manifest::read(manifest_path)?.unwrap_or_default(),
    };
    let fingerprint = manifest.fingerprint().map(str::to_string);
    let journals = find_journals(manifest_path)?;
    let mut summary = MergeSummary {
        journals: journals.len(),
        ..Default::default()
    };
    let existing = Index::open(index_dir, fingerprint.as_deref())?;
    let mut delta = if existing.segments().is_empty() {
        manifest.legacy_records()
    } else {
        Vec::new()
    };
    manifest.legacy_index.clear();
    for j in &journals {
        let mut foreign = 0;
        let (records, skipped) = read_journal(j, |r| {
            if !manifest.apply(r, &mut delta) {
                foreign += 1;
            }
        })?;
        summary.records += records;
        summary.skipped_lines += skipped;
        summary.foreign_records += foreign;
    }
    let before: usize = existing.segments().iter().map(Segment::len).sum();
    let rewrote_most = !delta.is_empty() && delta.len() * 2 >= before;
    drop(existing);
    if !delta.is_empty() {
        index::write_segment(index_dir, fingerprint.as_deref(), delta, durable)?;
    }
    let all = index::segment_paths(index_dir)?;
    let ours = Index::open(index_dir, fingerprint.as_deref())?;
    // A run that rewrote most of the index (a first run, --overwrite) folds it at once: its
    // segment would otherwise sit beside an older one holding the same keys.
    if all.len() > COMPACT_ABOVE
        || all.len() > ours.segments().len()
        || (rewrote_most && all.len() > 1)
    {
        drop(ours);
        index::compact(index_dir, fingerprint.as_deref(), durable)?;
        index::remove_torn_writes(index_dir)?;
    }
    // The old scripts' field, derived here so every writer agrees: entries the index holds.
    let indexed = Index::open(index_dir, fingerprint.as_deref())?
        .live()
        .count();
    manifest
        .fields
        .insert("processed_images".into(), Value::from(indexed));
    manifest.write(manifest_path, durable)?;
    // Only after the segment and the manifest hold everything: a crash in between merges the
    // same records again, which is harmless because applying a record twice gives the same result.
    for j in &journals {
        match std::fs::remove_file(j) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(j, e)),
        }
    }
    Ok((manifest, summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn journal_merge_builds_index_and_failures() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("vggt_cache_manifest.json");
        append_journal(
            &journal_path(&m, 0, 2),
            &[json!({"op": "ok", "path": "a.jpg", "source": [1, 2], "entry": [3, 4]})],
            false,
        )
        .unwrap();
        append_journal(
            &journal_path(&m, 1, 2),
            &[json!({"op": "failed", "path": "b.jpg", "reason": "cannot decode"})],
            false,
        )
        .unwrap();
        // A torn last line, as a crash mid-append leaves it.
        let j1 = journal_path(&m, 1, 2);
        let mut f = OpenOptions::new().append(true).open(&j1).unwrap();
        f.write_all(b"{\"op\": \"ok\", \"pa").unwrap();
        let idx = dir.path().join("index");
        let (manifest, summary) = merge_journals(&m, &idx, None, false).unwrap();
        assert_eq!(
            summary,
            MergeSummary {
                journals: 2,
                records: 2,
                skipped_lines: 1,
                foreign_records: 0,
            }
        );
        let index = Index::open(&idx, None).unwrap();
        assert_eq!(index.get(b"a.jpg").unwrap().source, Stamp::sized(1, 2));
        assert_eq!(manifest.failures["b.jpg"], "cannot decode");
        assert_eq!(manifest.fields["processed_images"], 1);
        assert!(find_journals(&m).unwrap().is_empty());
        let again = Manifest::read(&m).unwrap().unwrap();
        assert!(again.legacy_index.is_empty());
        assert_eq!(again.failures, manifest.failures);
    }

    #[test]
    fn many_small_merges_keep_the_segments_few_and_the_count_exact() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("f_cache_manifest.json");
        let idx = dir.path().join("index");
        let line = |i: u64| json!({"op": "ok", "path": format!("{i:03}.jpg"), "source": [i, 1], "entry": [i, 2]});
        // A first run of 100 entries, then 20 runs that each write one more.
        let first: Vec<Value> = (0..100).map(line).collect();
        append_journal(&journal_path(&m, 0, 1), &first, false).unwrap();
        merge_journals(&m, &idx, None, false).unwrap();
        for i in 100..120 {
            append_journal(&journal_path(&m, 0, 1), &[line(i)], false).unwrap();
            let (manifest, _) = merge_journals(&m, &idx, None, false).unwrap();
            assert_eq!(manifest.fields["processed_images"], i + 1);
            let segments = index::segment_paths(&idx).unwrap().len();
            assert!(
                segments <= COMPACT_ABOVE,
                "{segments} segments after run {i}"
            );
        }
        let index = Index::open(&idx, None).unwrap();
        assert_eq!(index.live().count(), 120);
        assert_eq!(index.get(b"119.jpg").unwrap().source, Stamp::sized(119, 1));
    }

    #[test]
    fn later_success_clears_failure_and_removal_drops_entry() {
        let mut m = Manifest::default();
        let mut delta = Vec::new();
        m.apply(
            &json!({"op": "failed", "path": "x", "reason": "oom"}),
            &mut delta,
        );
        m.apply(
            &json!({"op": "ok", "path": "x", "source": [1, 1], "entry": [2, 2], "racy": true}),
            &mut delta,
        );
        assert!(m.failures.is_empty());
        assert!(matches!(&delta[0].1, Slot::Entry(r) if r.racy));
        m.apply(&json!({"op": "removed", "path": "x"}), &mut delta);
        assert_eq!(delta[1], (b"x".to_vec(), Slot::Removed));
    }

    #[test]
    fn records_of_another_fingerprint_are_not_indexed() {
        let mut m = Manifest::default();
        m.fields.insert("fingerprint".into(), json!("b"));
        let mut delta = Vec::new();
        let theirs = json!({"op": "ok", "path": "x", "source": [1, 1, 5, 6], "entry": [2, 2, 7, 8], "fingerprint": "a"});
        assert!(!m.apply(&theirs, &mut delta));
        assert!(delta.is_empty());
        let ours = json!({"op": "ok", "path": "x", "source": [1, 1, 5, 6], "entry": [2, 2, 7, 8], "fingerprint": "b"});
        assert!(m.apply(&ours, &mut delta));
        let Slot::Entry(r) = &delta[0].1 else {
            panic!("an entry")
        };
        assert_eq!((r.source.ino, r.entry.ctime_ns), (5, 8));
    }

    #[test]
    fn a_record_with_inputs_keeps_every_stamp_and_its_inputs_through_a_journal() {
        let mut source = Stamp::sized(1, 2);
        (source.ino, source.ctime_ns) = (3, 4);
        let mut entry = Stamp::sized(5, 6);
        (entry.ino, entry.ctime_ns) = (7, 8);
        let inputs: Arc<str> = Arc::from(r#"[{"name":"caption","blake3":"ab"}]"#);
        let record = IndexRecord {
            source,
            entry,
            racy: false,
            inputs: Some(inputs.clone()),
            packed: None,
        };
        assert_eq!(
            IndexRecord::from_json(&record.to_json()),
            Some(record.clone())
        );
        // A packed entry's record, with inputs and without.
        let at = PackedAt {
            pack: Arc::from("0000018c00000000-7-0000abcd.fspack"),
            offset: 128,
            len: 4096,
        };
        for inputs in [None, Some(inputs.clone())] {
            let packed = IndexRecord {
                inputs,
                packed: Some(at.clone()),
                ..record.clone()
            };
            assert_eq!(IndexRecord::from_json(&packed.to_json()), Some(packed));
        }
        // A location naming a file outside the packs directory is no record.
        let mut escaping = record.to_json();
        escaping
            .as_array_mut()
            .unwrap()
            .push(json!(["../../x.fspack", 0, 10]));
        assert_eq!(IndexRecord::from_json(&escaping), None);
        // A line of the journal (`record`, as journal_unindexed writes it) and a write's line.
        let mut m = Manifest::default();
        let mut delta = Vec::new();
        m.apply(
            &json!({"op": "ok", "path": "a", "record": record.to_json()}),
            &mut delta,
        );
        m.apply(
            &json!({"op": "ok", "path": "b", "source": [1, 2, 3, 4], "entry": [5, 6, 7, 8],
                    "racy": false, "inputs": &*inputs}),
            &mut delta,
        );
        for (_, slot) in &delta {
            assert_eq!(slot, &Slot::Entry(record.clone()));
        }
    }

    #[test]
    fn paths_that_are_not_utf8_round_trip_through_json() {
        use std::os::unix::ffi::OsStrExt;
        let odd = Path::new(std::ffi::OsStr::from_bytes(b"scene/\xff\xfe.png"));
        let text = path_to_json(odd);
        assert!(text.starts_with('\0'));
        assert_eq!(path_from_json(&text), odd);
        assert_eq!(path_to_json(Path::new("图片/a.png")), "图片/a.png");
        assert_eq!(path_from_json("图片/a.png"), Path::new("图片/a.png"));
    }

    #[test]
    fn malformed_manifest_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m.json");
        std::fs::write(&m, b"{not json").unwrap();
        let err = Manifest::read(&m).unwrap_err().to_string();
        assert!(
            err.contains("m.json") && err.contains("not valid JSON"),
            "{err}"
        );
    }
}
