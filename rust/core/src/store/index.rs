//! The manifest index as this process sees it: seeding verdicts from a manifest, and the
//! records of entries found or written valid.

use std::path::Path;

use super::{racy_now, Known, State, Store};
use crate::manifest::{path_from_json, IndexRecord, Manifest};

impl Store {
    pub(super) fn seed(&self, m: &Manifest) {
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        for (rel, r) in &m.index {
            // Racy records still need their digest check on first use (untrusted), but they tell
            // the dir layout where the entry is.
            {
                let rel = path_from_json(rel);
                let path = self.entry_path(&rel, r.source);
                known.insert(
                    rel,
                    Known {
                        source: r.source,
                        path,
                        entry: r.entry,
                        inputs: Vec::new(),
                        state: State::Valid,
                        reason: String::new(),
                        trusted: !r.racy,
                        racy: false,
                        indexed: true,
                        header: None,
                    },
                );
            }
        }
    }

    /// The manifest index record of `rel`, if this process found (or wrote) its entry valid.
    pub fn index_record(&self, rel: &Path) -> Option<IndexRecord> {
        let k = self.recall(rel)?;
        (k.trusted && k.state == State::Valid).then(|| IndexRecord {
            source: k.source,
            entry: k.entry,
            // The index holds the source's stamps only: entries with more inputs are checked
            // in full (inputs included) on first use.
            racy: racy_now(k.source) || !k.inputs.is_empty(),
        })
    }

    /// The index record of `rel` when this process found its entry valid by a check of its own
    /// (or wrote it), rather than taking it from the manifest's index: the records the manifest
    /// may lack, such as those of entries a killed run wrote before their journal lines, or a
    /// touched source's refreshed stamp.
    pub fn unindexed_record(&self, rel: &Path) -> Option<IndexRecord> {
        self.recall(rel)
            .filter(|k| !k.indexed)
            .and_then(|_| self.index_record(rel))
    }
}
