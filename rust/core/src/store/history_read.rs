//! The hot path of reading a history's entry (docs/design.md, "History entries"): one `stat` of
//! each frame, the entry named by the list's key chain, served while its header records this
//! list's key, length and stamps chain. Anything else (a frame gone, a moved stamp, a racy entry,
//! an entry of an earlier version) is left to the full judgement in Python, which may digest.

use std::path::PathBuf;

use super::Store;
use crate::entry::{self, Entry};
use crate::history;

/// What a chain entry's header says it is (Python's `featstore.history.KIND` and `FORMAT`).
const KIND: &str = "history";
const FORMAT: &str = "2";

impl Store {
    /// Where the entry named by a history's last chain key is.
    pub fn history_entry_path(&self, key: &history::Digest) -> PathBuf {
        let key = hex::encode(key);
        self.state_dir()
            .join(KIND)
            .join(&key[..2])
            .join(format!("{}.safetensors", &key[..32]))
    }

    /// The entry of the history `rels` (relative to the data root, in order) when its stamps
    /// alone vouch for it: the entry of these frames as they are now, of this feature and an
    /// encoder this store serves, recording exactly this list's key, length and stamps chain,
    /// and not marked racy. None otherwise, and on any error: the caller's full judgement then
    /// decides (a miss costs that judgement, a hit costs this).
    pub fn open_history_trusted<P: AsRef<std::path::Path>>(&self, rels: &[P]) -> Option<Entry> {
        let links = history::links(&self.cfg.root, rels, true).ok()?;
        let (key, stamps) = (links.keys.last()?, links.stamps.last()?);
        let entry = entry::open_entry(&self.history_entry_path(key), self.cfg.read_mode).ok()?;
        let served = self.trusts_history_header(&entry.header.metadata, rels.len(), key, stamps);
        served.then_some(entry)
    }

    fn trusts_history_header(
        &self,
        meta: &std::collections::BTreeMap<String, String>,
        frames: usize,
        key: &history::Digest,
        stamps: &history::Digest,
    ) -> bool {
        let is = |field: &str, value: &str| meta.get(field).map(String::as_str) == Some(value);
        is("kind", KIND)
            && is("feature", &self.cfg.feature)
            && is("format", FORMAT)
            && is("frames", &frames.to_string())
            && is("key", &hex::encode(key))
            && is("stamps", &hex::encode(stamps))
            && !is("racy", "1")
            && self
                .foreign_reason(meta.get("fingerprint").map_or("", String::as_str))
                .is_none()
    }
}
