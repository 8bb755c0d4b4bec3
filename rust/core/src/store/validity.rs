//! Whether an entry may be served: the hot path on stamps, the full evaluation of a header
//! (fingerprint, source stamp and digest, extra inputs), and remembering each verdict.

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde_json::Value;

use super::{racy_now, recorded_stamp, stat_opt, Check, Known, Layout, State, Store};
use crate::entry;
use crate::error::{Error, Result};
use crate::key::{file_digest, Stamp};
use crate::pool;

impl Store {
    /// The state of `rel`'s entry. Errors only for I/O failures other than "not found" (a
    /// permission error on the source, say); every problem with the entry itself is a state.
    pub fn check(&self, rel: &Path) -> Result<Check> {
        let src = self.cfg.root.join(rel);
        let Some(src_stamp) = stat_opt(&src)? else {
            return self.check_without_source(rel);
        };
        let entry = self.entry_path(rel, src_stamp);
        let Some(entry_stamp) = stat_opt(&entry)? else {
            return self.check_without_entry(rel, src_stamp, entry);
        };
        if let Some(k) = self.recall(rel) {
            if k.hot()
                && k.source == src_stamp
                && k.path == entry
                && k.entry == entry_stamp
                && self.inputs_unchanged(&k.inputs)?
            {
                return Ok(Check {
                    state: k.state,
                    entry,
                    reason: k.reason,
                });
            }
        }
        self.evaluate(rel, src_stamp, &entry, &entry)
    }

    pub(super) fn inputs_unchanged(&self, inputs: &[(PathBuf, Stamp)]) -> Result<bool> {
        for (path, stamp) in inputs {
            if stat_opt(path)? != Some(*stamp) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn check_without_source(&self, rel: &Path) -> Result<Check> {
        let entry = match (&self.cfg.layout, self.recall(rel)) {
            (Layout::Sidecar, _) => Some(self.entry_path(
                rel,
                Stamp {
                    size: 0,
                    mtime_ns: 0,
                },
            )),
            (Layout::Dir { .. }, Some(k)) => Some(k.path),
            (Layout::Dir { .. }, None) => None,
        };
        if let Some(entry) = entry {
            if stat_opt(&entry)?.is_some() {
                return Ok(Check {
                    state: State::Orphan,
                    entry,
                    reason: format!(
                        "the source {} no longer exists",
                        self.cfg.root.join(rel).display()
                    ),
                });
            }
            return Ok(Check {
                state: State::Missing,
                entry,
                reason: "neither the source nor an entry exists".into(),
            });
        }
        Ok(Check {
            state: State::Missing,
            entry: PathBuf::new(),
            reason: "neither the source nor an entry exists".into(),
        })
    }

    fn check_without_entry(&self, rel: &Path, src_stamp: Stamp, entry: PathBuf) -> Result<Check> {
        // Dir layout: the key follows the stamp, so a touched source looks for its entry under a
        // new name. The old one (known from the manifest or an earlier look) may still be valid.
        if let (Layout::Dir { .. }, Some(k)) = (&self.cfg.layout, self.recall(rel)) {
            if k.path != entry {
                match stat_opt(&k.path)? {
                    // Judged before with these very stamps (a stale entry): no second digest.
                    Some(es) if k.hot() && k.source == src_stamp && k.entry == es => {
                        return Ok(Check {
                            state: k.state,
                            entry: k.path,
                            reason: k.reason,
                        });
                    }
                    Some(_) => return self.evaluate(rel, src_stamp, &k.path, &entry),
                    None => {}
                }
            }
        }
        if let Some(legacy) = self.legacy_path(rel) {
            if let Some(ls) = stat_opt(&legacy)? {
                return Ok(if ls.mtime_ns >= src_stamp.mtime_ns {
                    Check { state: State::Legacy, entry: legacy, reason: "old-format cache (torch pickle); readable, `featstore migrate` converts it".into() }
                } else {
                    Check { state: State::Stale, entry: legacy, reason: "old-format cache is older than its image: the image was edited after caching".into() }
                });
            }
        }
        Ok(Check {
            state: State::Missing,
            entry,
            reason: "no entry".into(),
        })
    }

    /// Full evaluation of the entry found at `found` (opens its header); `wanted` is where it
    /// belongs for the source's current stamp (differs from `found` only in the dir layout).
    fn evaluate(&self, rel: &Path, src_stamp: Stamp, found: &Path, wanted: &Path) -> Result<Check> {
        let src = self.cfg.root.join(rel);
        let verdict = |state: State, reason: String| {
            Ok(Check {
                state,
                entry: found.to_path_buf(),
                reason,
            })
        };
        let header = match entry::read_header(found) {
            Ok(h) => h,
            Err(Error::Corrupt { reason, .. }) => {
                return self.settle(rel, src_stamp, found, Vec::new(), State::Corrupt, reason)
            }
            Err(e) if e.is_io_kind(ErrorKind::NotFound) => {
                return verdict(State::Missing, "entry vanished while being checked".into())
            }
            Err(e) => return Err(e),
        };
        let meta = &header.metadata;
        if let Some(expected) = &self.cfg.fingerprint {
            let actual = meta.get("fingerprint").map(String::as_str).unwrap_or("");
            if actual != expected {
                let reason = format!(
                    "written by encoder fingerprint {actual:?}, this store expects {expected:?}"
                );
                return self.settle(rel, src_stamp, found, Vec::new(), State::Foreign, reason);
            }
        }
        let Some(recorded) = recorded_stamp(meta, "source") else {
            return self.settle(
                rel,
                src_stamp,
                found,
                Vec::new(),
                State::Corrupt,
                "no source stamp in the entry's metadata".into(),
            );
        };
        let mut refreshed = false;
        let mut reason = String::new();
        let racy = meta.get("racy").is_some_and(|r| r == "1");
        if recorded != src_stamp || racy {
            // Compare bytes, not stamps: a copy, a touch or a restore keeps the bytes.
            let digest = file_digest(&src)?;
            if meta.get("source.blake3") != Some(&digest) {
                let reason = if recorded == src_stamp {
                    "the source was edited within the timestamp granularity of its caching (same size and mtime, different bytes)".to_string()
                } else {
                    format!(
                        "the source changed: size {} -> {}, mtime_ns {} -> {}",
                        recorded.size, src_stamp.size, recorded.mtime_ns, src_stamp.mtime_ns
                    )
                };
                return self.settle(rel, src_stamp, found, Vec::new(), State::Stale, reason);
            }
            refreshed = recorded != src_stamp || !racy_now(src_stamp);
            reason = if recorded != src_stamp {
                "source touched but unchanged: stamp refreshed".into()
            } else {
                String::new()
            };
        }
        let inputs = match self.check_inputs(meta)? {
            Ok(inputs) => inputs,
            Err(why) => return self.settle(rel, src_stamp, found, Vec::new(), State::Stale, why),
        };
        let mut at = found.to_path_buf();
        if refreshed || found != wanted {
            // Record the new stamp (and clear the racy mark once past the window) so other
            // processes skip the digest. Best effort: a read-only cache still serves the entry.
            let still_racy = racy_now(src_stamp);
            let update = |m: &mut BTreeMap<String, String>| {
                m.insert("source.size".into(), src_stamp.size.to_string());
                m.insert("source.mtime_ns".into(), src_stamp.mtime_ns.to_string());
                m.insert("racy".into(), if still_racy { "1" } else { "0" }.into());
            };
            let moved_dir_ok = match wanted.parent() {
                Some(parent) if found != wanted => fs::create_dir_all(parent).is_ok(),
                _ => true,
            };
            if moved_dir_ok && entry::rewrite_metadata_to(found, wanted, update, false).is_ok() {
                if found != wanted {
                    let _ = fs::remove_file(found);
                }
                at = wanted.to_path_buf();
            }
        }
        self.settle(rel, src_stamp, &at, inputs, State::Valid, reason)
    }

    /// Checks an entry's extra file inputs; `Ok(Err(why))` when one changed.
    fn check_inputs(
        &self,
        meta: &BTreeMap<String, String>,
    ) -> Result<std::result::Result<Vec<(PathBuf, Stamp)>, String>> {
        let Some(raw) = meta.get("inputs") else {
            return Ok(Ok(Vec::new()));
        };
        let Ok(Value::Array(items)) = serde_json::from_str::<Value>(raw) else {
            return Ok(Err("the entry's inputs metadata is malformed".into()));
        };
        let mut out = Vec::new();
        for item in items {
            let (Some(name), Some(path)) = (
                item.get("name").and_then(Value::as_str),
                item.get("path").and_then(Value::as_str),
            ) else {
                continue;
            };
            if name == "source" {
                continue;
            }
            let abs = self.cfg.root.join(path);
            let recorded = Stamp {
                size: item.get("size").and_then(Value::as_u64).unwrap_or(u64::MAX),
                mtime_ns: item
                    .get("mtime_ns")
                    .and_then(Value::as_i64)
                    .unwrap_or(i64::MIN),
            };
            let Some(now) = stat_opt(&abs)? else {
                return Ok(Err(format!(
                    "input {name} ({}) no longer exists",
                    abs.display()
                )));
            };
            if now != recorded {
                let digest = file_digest(&abs)?;
                if item.get("blake3").and_then(Value::as_str) != Some(digest.as_str()) {
                    return Ok(Err(format!("input {name} ({}) changed", abs.display())));
                }
            }
            out.push((abs, now));
        }
        Ok(Ok(out))
    }

    /// Remembers a verdict (keyed by the stamps it was reached with) and returns it.
    pub(super) fn settle(
        &self,
        rel: &Path,
        src_stamp: Stamp,
        entry: &Path,
        inputs: Vec<(PathBuf, Stamp)>,
        state: State,
        reason: String,
    ) -> Result<Check> {
        if let Some(entry_stamp) = stat_opt(entry)? {
            self.remember(
                rel,
                Known {
                    source: src_stamp,
                    path: entry.to_path_buf(),
                    entry: entry_stamp,
                    inputs,
                    state,
                    reason: reason.clone(),
                    trusted: true,
                    racy: racy_now(src_stamp),
                    indexed: false,
                    header: None,
                },
            );
        }
        Ok(Check {
            state,
            entry: entry.to_path_buf(),
            reason,
        })
    }

    /// Checks many sources in parallel (in featstore's pool); results in input order.
    /// `progress` counts checked sources, for a display on another thread.
    pub fn check_many(
        &self,
        rels: &[PathBuf],
        threads: Option<usize>,
        progress: &AtomicU64,
    ) -> Vec<Result<Check>> {
        pool::pool(threads).install(|| {
            rels.par_iter()
                .map(|r| {
                    progress.fetch_add(1, Ordering::Relaxed);
                    self.check(r)
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    //! The validity rules, one per test, on real files in a temporary directory. Sources get an
    //! mtime in the past so that entries are not racy (a racy entry is re-digested on every use,
    //! which would hide whether the stamp rules alone hold).

    use std::fs::{self, File};
    use std::path::{Path, PathBuf};
    use std::time::{Duration, SystemTime};

    use crate::entry::{Dtype, ReadMode, TensorData};
    use crate::error::Error;
    use crate::key::Stamp;
    use crate::store::{Input, Layout, State, Store, StoreConfig};

    const DATA: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    fn store(root: &Path, layout: Layout, fingerprint: &str) -> Store {
        Store::open(StoreConfig {
            root: root.to_path_buf(),
            feature: "f".into(),
            layout,
            fingerprint: Some(fingerprint.into()),
            legacy_suffix: None,
            read_mode: ReadMode::Map,
        })
        .unwrap()
    }

    /// Writes `bytes` to `path` with an mtime `age_s` seconds in the past.
    fn write_aged(path: &Path, bytes: &[u8], age_s: u64) {
        fs::write(path, bytes).unwrap();
        let when = SystemTime::now() - Duration::from_secs(age_s);
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    fn tensor() -> Vec<TensorData<'static>> {
        vec![TensorData {
            name: "features".into(),
            dtype: Dtype::U8,
            shape: vec![8],
            data: &DATA,
        }]
    }

    fn put(s: &Store, rel: &str) -> PathBuf {
        let meta = Default::default();
        s.put(Path::new(rel), &tensor(), &meta, &[], false, None)
            .unwrap()
            .path
    }

    fn state(s: &Store, rel: &str) -> State {
        s.check(Path::new(rel)).unwrap().state
    }

    #[test]
    fn written_entry_is_valid_and_stays_valid_on_the_hot_path() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        assert_eq!(state(&s, "a.png"), State::Missing);
        put(&s, "a.png");
        assert_eq!(state(&s, "a.png"), State::Valid);
        // A fresh store (another process) judges it from the header alone.
        assert_eq!(
            state(&store(dir.path(), Layout::Sidecar, "fp"), "a.png"),
            State::Valid
        );
    }

    #[test]
    fn edited_source_makes_the_entry_stale() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.png");
        write_aged(&src, b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        put(&s, "a.png");
        write_aged(&src, b"edited image", 60);
        let c = s.check(Path::new("a.png")).unwrap();
        assert_eq!(c.state, State::Stale);
        assert!(c.reason.contains("the source changed"), "{}", c.reason);
    }

    #[test]
    fn same_size_edit_with_a_new_mtime_is_stale_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.png");
        write_aged(&src, b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        put(&s, "a.png");
        write_aged(&src, b"IMAGE", 60);
        assert_eq!(state(&s, "a.png"), State::Stale);
    }

    #[test]
    fn touched_source_with_the_same_bytes_stays_valid_and_is_refreshed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.png");
        write_aged(&src, b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        put(&s, "a.png");
        write_aged(&src, b"image", 60);
        let c = s.check(Path::new("a.png")).unwrap();
        assert_eq!(c.state, State::Valid);
        assert!(c.reason.contains("refreshed"), "{}", c.reason);
        // The refreshed stamp is in the header: another process needs no digest and agrees.
        assert_eq!(
            state(&store(dir.path(), Layout::Sidecar, "fp"), "a.png"),
            State::Valid
        );
    }

    #[test]
    fn touched_source_in_the_dir_layout_moves_its_entry_to_the_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let (root, cache) = (dir.path().join("data"), dir.path().join("cache"));
        fs::create_dir_all(&root).unwrap();
        let src = root.join("a.png");
        write_aged(&src, b"image", 3600);
        let layout = Layout::Dir { cache_dir: cache };
        let s = store(&root, layout.clone(), "fp");
        let old = put(&s, "a.png");
        write_aged(&src, b"image", 60);
        let fresh = store(&root, layout, "fp");
        let c = fresh.check(Path::new("a.png")).unwrap();
        // A fresh store does not know the old key: the touched source's entry is missing there
        // until the store that wrote it (which remembers the old key) moves it.
        assert_eq!(c.state, State::Missing);
        let c = s.check(Path::new("a.png")).unwrap();
        assert_eq!(c.state, State::Valid);
        assert_ne!(c.entry, old);
        assert!(c.entry.exists() && !old.exists());
        assert_eq!(state(&fresh, "a.png"), State::Valid);
    }

    #[test]
    fn deleted_source_leaves_an_orphan() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.png");
        write_aged(&src, b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        put(&s, "a.png");
        fs::remove_file(&src).unwrap();
        assert_eq!(state(&s, "a.png"), State::Orphan);
    }

    #[test]
    fn another_fingerprint_is_foreign() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        put(&store(dir.path(), Layout::Sidecar, "fp"), "a.png");
        let c = store(dir.path(), Layout::Sidecar, "other")
            .check(Path::new("a.png"))
            .unwrap();
        assert_eq!(c.state, State::Foreign);
        assert!(c.reason.contains("\"fp\""), "{}", c.reason);
    }

    #[test]
    fn damaged_entry_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        let entry = put(&s, "a.png");
        fs::write(&entry, b"not a safetensors file").unwrap();
        assert_eq!(state(&s, "a.png"), State::Corrupt);
    }

    #[test]
    fn changed_extra_input_makes_the_entry_stale() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        let caption = dir.path().join("a.txt");
        write_aged(&caption, b"a cat", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        let inputs = [Input::File {
            name: "caption".into(),
            path: PathBuf::from("a.txt"),
        }];
        let meta = Default::default();
        s.put(Path::new("a.png"), &tensor(), &meta, &inputs, false, None)
            .unwrap();
        assert_eq!(state(&s, "a.png"), State::Valid);
        write_aged(&caption, b"a dog", 60);
        let c = s.check(Path::new("a.png")).unwrap();
        assert_eq!(c.state, State::Stale);
        assert!(c.reason.contains("caption"), "{}", c.reason);
    }

    #[test]
    fn source_changed_after_reading_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.png");
        write_aged(&src, b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        let read_at = Stamp::of(&src).unwrap();
        write_aged(&src, b"edited image", 60);
        let meta = Default::default();
        let err = s
            .put(
                Path::new("a.png"),
                &tensor(),
                &meta,
                &[],
                false,
                Some(read_at),
            )
            .unwrap_err();
        assert!(matches!(err, Error::SourceChanged { .. }), "{err}");
        assert_eq!(state(&s, "a.png"), State::Missing);
    }

    #[test]
    fn state_names_are_distinct_and_listed_once() {
        let names: Vec<&str> = State::ALL.iter().map(|s| s.name()).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
    }
}
