//! The index as this process sees it: verdicts taken from its segments (or from the inline index
//! of a manifest of an earlier version), and the records of entries found or written valid.

use std::path::{Path, PathBuf};

use super::{racy_now, Known, State, Store};
use crate::key::path_bytes;
use crate::manifest::{path_from_json, IndexRecord, Manifest};

/// What an index record says, before this process judged anything: where the entry is (racy
/// records still need their digest check on first use, but they locate the entry).
fn indexed(path: PathBuf, r: IndexRecord) -> Known {
    Known {
        source: r.source,
        path,
        packed: r.packed,
        entry: r.entry,
        inputs: Vec::new(),
        state: State::Valid,
        reason: String::new(),
        trusted: !r.racy,
        racy: false,
        indexed: true,
        recorded_inputs: r.inputs,
        header: None,
    }
}

impl Store {
    /// The index segments' record of `rel` as a verdict (None: not indexed). Not remembered:
    /// the index is the memory of it (a status or a planning pass over a million indexed
    /// entries keeps nothing per entry); reads remember it with the entry's parsed header.
    pub(super) fn learn_from_index(&self, rel: &Path) -> Option<Known> {
        let r = self.index().get(path_bytes(rel))?;
        let path = match &r.packed {
            Some(p) => self.pack_path(&p.pack),
            None => self.entry_path(rel, r.source),
        };
        Some(indexed(path, r))
    }

    /// The sources the index holds a record of, in byte order: its segments' live keys, or the
    /// inline index of a manifest of an earlier version when there are no segments yet.
    pub fn indexed_sources(&self) -> Vec<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        let index = self.index();
        if !index.segments().is_empty() {
            return index
                .live()
                .map(|(k, _)| PathBuf::from(std::ffi::OsStr::from_bytes(k)))
                .collect();
        }
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        let mut seeded: Vec<PathBuf> = known
            .iter()
            .filter(|(_, k)| k.indexed)
            .map(|(rel, _)| rel.clone())
            .collect();
        seeded.sort_by(|a, b| path_bytes(a).cmp(path_bytes(b)));
        seeded
    }

    /// Takes the inline index of a manifest of an earlier version.
    pub(super) fn seed(&self, m: &Manifest) {
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        for (rel, r) in &m.legacy_index {
            let rel = path_from_json(rel);
            let path = self.entry_path(&rel, r.source);
            known.insert(rel, indexed(path, r.clone()));
        }
    }

    /// The manifest index record of `rel`, if this process found (or wrote) its entry valid.
    pub fn index_record(&self, rel: &Path) -> Option<IndexRecord> {
        let k = self.recall(rel)?;
        // An entry whose inputs this process holds only as stamps (judged by a version that
        // did not keep the header's record of them) is checked in full on first use.
        let inputs_unrecorded = !k.inputs.is_empty() && k.recorded_inputs.is_none();
        (k.trusted && k.state == State::Valid).then(|| IndexRecord {
            source: k.source,
            entry: k.entry,
            racy: racy_now(k.source) || k.racy || inputs_unrecorded,
            inputs: k.recorded_inputs.clone(),
            packed: k.packed.clone(),
        })
    }

    /// Whether any entry this process found valid was judged by a full check rather than from
    /// the index: when none was, no [`Store::unindexed_record`] exists, and a no-op run of a
    /// million sources skips asking for each.
    pub fn judged_outside_the_index(&self) -> bool {
        self.known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|k| !k.indexed && k.state == State::Valid)
    }

    /// The index record of `rel` when this process found its entry valid by a check of its own
    /// (or wrote it), rather than taking it from the manifest's index: the records the manifest
    /// may lack, such as those of entries a killed run wrote before their journal lines, or a
    /// touched source's refreshed stamp.
    pub fn unindexed_record(&self, rel: &Path) -> Option<IndexRecord> {
        let record = self
            .recall(rel)
            .filter(|k| !k.indexed)
            .and_then(|_| self.index_record(rel))?;
        // Judged here by a full check (an entry with inputs always is), but the index already
        // holds these very stamps: journaling it again would rewrite the index for nothing.
        let held = self.index().get(path_bytes(rel));
        (held.as_ref() != Some(&record)).then_some(record)
    }
}
