//! Where entries live and whether they may be served.
//!
//! One vocabulary of states for every command and API ([`State`]). The hot path ([`Store::check`]
//! on an entry seen before) costs two `stat`s (source and entry) plus one per extra file input,
//! and opens nothing: the stamps from the entry's header, or from the manifest's index, are kept
//! in memory and compared with fresh ones. Everything slower (first look at an entry, a touched
//! source, a racy entry) runs once per entry and process, then is remembered.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::entry::{self, ReadMode, TensorData};
use crate::error::{Error, IoContext, Result};
use crate::key::{file_digest, path_bytes, stamp_key, Stamp, KEY_NAME_LEN};
use crate::manifest::Manifest;
use crate::pool;

/// Sources modified less than this long before their entry was written are *racy*: a same-size
/// edit within the file system's timestamp granularity would keep the stamp, so such entries are
/// checked by digest on first use. 2 s covers the coarsest local file systems (FAT, ext3: 1-2 s).
pub const RACY_WINDOW_NS: i64 = 2_000_000_000;

/// Where entries are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// `<source>.<feature>.safetensors` beside each source.
    Sidecar,
    /// `<cache_dir>/<feature>/<key[:2]>/<key32>.safetensors`.
    Dir { cache_dir: PathBuf },
}

/// The state of a source's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Valid,
    Missing,
    Stale,
    Foreign,
    Corrupt,
    Orphan,
    Legacy,
}

impl State {
    /// The name used everywhere (CLI output, JSON, Python).
    pub fn name(self) -> &'static str {
        match self {
            State::Valid => "valid",
            State::Missing => "missing",
            State::Stale => "stale",
            State::Foreign => "foreign",
            State::Corrupt => "corrupt",
            State::Orphan => "orphan",
            State::Legacy => "legacy",
        }
    }
}

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Absolute data root.
    pub root: PathBuf,
    /// Feature name (`vggt`, `pixel_latent`, ...): part of entry and manifest names.
    pub feature: String,
    pub layout: Layout,
    /// Expected encoder fingerprint; None adopts the manifest's (or accepts any, without one).
    pub fingerprint: Option<String>,
    /// Suffix of legacy sidecars (`.vggt_cache.pt`), reported as `legacy` when present.
    pub legacy_suffix: Option<String>,
    pub read_mode: ReadMode,
}

/// The answer of a check: the state, where the entry is (or would be), and why.
#[derive(Debug, Clone)]
pub struct Check {
    pub state: State,
    pub entry: PathBuf,
    pub reason: String,
}

/// An input of an entry besides its source.
#[derive(Debug, Clone)]
pub enum Input {
    /// A file (caption `.txt`, control image): recorded by stamp and digest, checked on lookup.
    File { name: String, path: PathBuf },
    /// A text (a caption from a `.jsonl` field): recorded by digest.
    Text { name: String, text: Vec<u8> },
}

/// What [`Store::put`] wrote (the journal records it).
#[derive(Debug, Clone)]
pub struct Written {
    pub path: PathBuf,
    pub source: Stamp,
    pub entry: Stamp,
    pub racy: bool,
    /// The manifest index must not trust this entry's stamps alone (racy, or extra inputs).
    pub check_first: bool,
    pub bytes: u64,
}

/// What this process knows about one entry, valid while every stamp in it is unchanged.
#[derive(Debug, Clone)]
struct Known {
    source: Stamp,
    /// The entry file the verdict is about (in the dir layout its name follows the stamp the
    /// entry was written for, which may be older than `source`).
    path: PathBuf,
    entry: Stamp,
    /// Extra file inputs (absolute path, stamp when the entry was checked).
    inputs: Vec<(PathBuf, Stamp)>,
    state: State,
    reason: String,
    /// False for racy manifest records: they locate the entry but still need a full check.
    trusted: bool,
    /// Reached (or written) while the source's mtime was within [`RACY_WINDOW_NS`] of the clock:
    /// a same-size edit since then may have kept the stamp, so every use checks again (digest
    /// included) until a check made outside the window settles it.
    racy: bool,
    /// Taken from the manifest's index and not judged since: the index already holds it.
    indexed: bool,
    /// The entry's validated header and the file it was validated for, once read.
    header: Option<(entry::FileId, Arc<entry::Header>)>,
}

impl Known {
    /// True when unchanged stamps alone vouch for this verdict (the hot path).
    fn hot(&self) -> bool {
        self.trusted && !self.racy
    }
}

/// True while a same-size edit of a source with this stamp could keep its mtime: the mtime is
/// within the file system's timestamp granularity of now (or in the future).
fn racy_now(source: Stamp) -> bool {
    now_ns() - source.mtime_ns <= RACY_WINDOW_NS
}

/// A feature's entries under one data root.
pub struct Store {
    cfg: StoreConfig,
    known: RwLock<HashMap<PathBuf, Known>>,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn stat_opt(path: &Path) -> Result<Option<Stamp>> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(Stamp::from_metadata(&m))),
        Err(e) if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::NotADirectory => {
            Ok(None)
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

fn recorded_stamp(meta: &BTreeMap<String, String>, prefix: &str) -> Option<Stamp> {
    Some(Stamp {
        size: meta.get(&format!("{prefix}.size"))?.parse().ok()?,
        mtime_ns: meta.get(&format!("{prefix}.mtime_ns"))?.parse().ok()?,
    })
}

impl Store {
    /// Opens a store. Reads the feature's manifest, if any, to adopt its fingerprint (when none
    /// is given) and to seed the in-memory index, so lookups of listed entries open no file.
    pub fn open(mut cfg: StoreConfig) -> Result<Store> {
        let manifest_path = Store::manifest_path_of(&cfg);
        let manifest = Manifest::read(&manifest_path)?;
        let manifest_fp = manifest
            .as_ref()
            .and_then(|m| m.fields.get("fingerprint"))
            .and_then(Value::as_str)
            .map(str::to_string);
        if cfg.fingerprint.is_none() {
            cfg.fingerprint = manifest_fp.clone();
        }
        let store = Store {
            cfg,
            known: RwLock::new(HashMap::new()),
        };
        // Index records were valid for the manifest's fingerprint: trust them only for that one.
        if let Some(m) = manifest {
            if manifest_fp == store.cfg.fingerprint {
                store.seed(&m);
            }
        }
        Ok(store)
    }

    fn seed(&self, m: &Manifest) {
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        for (rel, r) in &m.index {
            // Racy records still need their digest check on first use (untrusted), but they tell
            // the dir layout where the entry is.
            {
                let rel = PathBuf::from(rel);
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

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    fn manifest_path_of(cfg: &StoreConfig) -> PathBuf {
        match &cfg.layout {
            Layout::Sidecar => cfg
                .root
                .join(format!("{}_cache_manifest.json", cfg.feature)),
            Layout::Dir { cache_dir } => cache_dir.join(&cfg.feature).join("manifest.json"),
        }
    }

    /// The feature's manifest: `<root>/<feature>_cache_manifest.json` (sidecar) or
    /// `<cache_dir>/<feature>/manifest.json` (dir).
    pub fn manifest_path(&self) -> PathBuf {
        Store::manifest_path_of(&self.cfg)
    }

    /// Where featstore keeps frame sets and locks: `<root or cache_dir>/.featstore/<feature>`.
    pub fn state_dir(&self) -> PathBuf {
        let base = match &self.cfg.layout {
            Layout::Sidecar => &self.cfg.root,
            Layout::Dir { cache_dir } => cache_dir,
        };
        base.join(crate::scan::STATE_DIR).join(&self.cfg.feature)
    }

    /// The entry path of source `rel` with stamp `stamp` (the sidecar layout ignores the stamp).
    pub fn entry_path(&self, rel: &Path, stamp: Stamp) -> PathBuf {
        match &self.cfg.layout {
            Layout::Sidecar => {
                let mut name = self.cfg.root.join(rel).into_os_string();
                name.push(format!(".{}.safetensors", self.cfg.feature));
                PathBuf::from(name)
            }
            Layout::Dir { cache_dir } => {
                let key = stamp_key(path_bytes(rel), stamp);
                cache_dir
                    .join(&self.cfg.feature)
                    .join(&key[..2])
                    .join(format!("{}.safetensors", &key[..KEY_NAME_LEN]))
            }
        }
    }

    /// The legacy sidecar of `rel`, when this store reads legacy sidecars.
    pub fn legacy_path(&self, rel: &Path) -> Option<PathBuf> {
        let suffix = self.cfg.legacy_suffix.as_ref()?;
        let mut name = self.cfg.root.join(rel).into_os_string();
        name.push(suffix);
        Some(PathBuf::from(name))
    }

    fn remember(&self, rel: &Path, k: Known) {
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rel.to_path_buf(), k);
    }

    fn recall(&self, rel: &Path) -> Option<Known> {
        self.known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(rel)
            .cloned()
    }

    /// Forgets what this process knows about `rel` (after a removal).
    pub fn forget(&self, rel: &Path) {
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(rel);
    }

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

    fn inputs_unchanged(&self, inputs: &[(PathBuf, Stamp)]) -> Result<bool> {
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
    fn settle(
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

    /// The manifest index record of `rel`, if this process found (or wrote) its entry valid.
    pub fn index_record(&self, rel: &Path) -> Option<crate::manifest::IndexRecord> {
        let k = self.recall(rel)?;
        (k.trusted && k.state == State::Valid).then(|| crate::manifest::IndexRecord {
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
    pub fn unindexed_record(&self, rel: &Path) -> Option<crate::manifest::IndexRecord> {
        self.recall(rel)
            .filter(|k| !k.indexed)
            .and_then(|_| self.index_record(rel))
    }

    /// Checks many sources in parallel (in featstore's pool); results in input order.
    /// `progress` counts checked sources, for a display on another thread.
    pub fn check_many(
        &self,
        rels: &[PathBuf],
        threads: Option<usize>,
        progress: &std::sync::atomic::AtomicU64,
    ) -> Vec<Result<Check>> {
        pool::pool(threads).install(|| {
            rels.par_iter()
                .map(|r| {
                    progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.check(r)
                })
                .collect()
        })
    }

    /// Writes the entry of `rel` atomically and remembers it as valid.
    ///
    /// Records the source's stamp and digest, every extra input's stamp and digest (or a text's
    /// digest), the fingerprint, and whether the entry is racy. Fails if the source changes while
    /// its digest is computed.
    ///
    /// `expected` is the source's stamp when its pixels were read (precompute stats it before
    /// decoding): if the source changed since, the features belong to other bytes and nothing
    /// is written.
    #[allow(clippy::too_many_arguments)]
    pub fn put(
        &self,
        rel: &Path,
        tensors: &[TensorData],
        user_meta: &BTreeMap<String, String>,
        inputs: &[Input],
        durable: bool,
        expected: Option<Stamp>,
    ) -> Result<Written> {
        let src = self.cfg.root.join(rel);
        let before = Stamp::of(&src)?;
        if let Some(seen) = expected {
            if seen != before {
                return Err(Error::Invalid(format!(
                    "{} changed after it was read for encoding (size {} -> {}, mtime_ns {} -> {}); \
                     its features were not stored, run again to encode the new version",
                    src.display(), seen.size, before.size, seen.mtime_ns, before.mtime_ns
                )));
            }
        }
        let digest = file_digest(&src)?;
        if Stamp::of(&src)? != before {
            return Err(Error::Invalid(format!(
                "{} changed while its entry was being written; write it again",
                src.display()
            )));
        }
        let racy = racy_now(before);
        let rel_str = rel.to_string_lossy().into_owned();
        let mut input_records = vec![
            json!({"name": "source", "path": rel_str, "size": before.size, "mtime_ns": before.mtime_ns, "blake3": digest}),
        ];
        let mut known_inputs = Vec::new();
        for input in inputs {
            match input {
                Input::File { name, path } => {
                    let abs = if path.is_absolute() {
                        path.clone()
                    } else {
                        self.cfg.root.join(path)
                    };
                    let stamp = Stamp::of(&abs)?;
                    let shown = abs
                        .strip_prefix(&self.cfg.root)
                        .map(|p| p.to_path_buf())
                        .unwrap_or_else(|_| abs.clone());
                    input_records.push(json!({"name": name, "path": shown.to_string_lossy(), "size": stamp.size, "mtime_ns": stamp.mtime_ns, "blake3": file_digest(&abs)?}));
                    known_inputs.push((abs, stamp));
                }
                Input::Text { name, text } => input_records
                    .push(json!({"name": name, "blake3": crate::key::bytes_digest(text)})),
            }
        }
        let mut meta = user_meta.clone();
        let reserved = [
            ("feature", self.cfg.feature.clone()),
            (
                "fingerprint",
                self.cfg.fingerprint.clone().unwrap_or_default(),
            ),
            ("source", rel_str),
            ("source.size", before.size.to_string()),
            ("source.mtime_ns", before.mtime_ns.to_string()),
            ("source.blake3", digest),
            ("inputs", Value::Array(input_records).to_string()),
            ("racy", if racy { "1" } else { "0" }.to_string()),
            ("created", (now_ns() / 1_000_000_000).to_string()),
        ];
        for (k, v) in reserved {
            meta.insert(k.to_string(), v);
        }
        let path = self.entry_path(rel, before);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).at(parent)?;
        }
        let bytes = entry::write_entry(&path, tensors, &meta, durable)?;
        let entry_stamp = Stamp::of(&path)?;
        if let (Layout::Dir { .. }, Some(old)) = (&self.cfg.layout, self.recall(rel)) {
            if old.path != path {
                let _ = fs::remove_file(&old.path);
            }
        }
        // A racy entry is checked again (digest included) on every use, here as in other
        // processes, until a check outside the window: an edit that keeps the stamp may follow.
        self.remember(
            rel,
            Known {
                source: before,
                path: path.clone(),
                entry: entry_stamp,
                inputs: known_inputs,
                state: State::Valid,
                reason: String::new(),
                trusted: true,
                racy,
                indexed: false,
                header: None,
            },
        );
        Ok(Written {
            path,
            source: before,
            entry: entry_stamp,
            racy,
            check_first: racy || !inputs.is_empty(),
            bytes,
        })
    }

    /// Removes the entry of `rel` (at its current and last known key); true if one was removed.
    pub fn remove(&self, rel: &Path) -> Result<bool> {
        let mut candidates = Vec::new();
        if let Some(s) = stat_opt(&self.cfg.root.join(rel))? {
            candidates.push(self.entry_path(rel, s));
        }
        if let Some(k) = self.recall(rel) {
            candidates.push(k.path);
        }
        if self.cfg.layout == Layout::Sidecar {
            candidates.push(self.entry_path(
                rel,
                Stamp {
                    size: 0,
                    mtime_ns: 0,
                },
            ));
        }
        let mut removed = false;
        for c in candidates {
            match fs::remove_file(&c) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&c, e)),
            }
        }
        self.forget(rel);
        Ok(removed)
    }

    /// Reads tensor `name` of each source's valid entry straight into consecutive slots of
    /// `out` with `pread`, in parallel (featstore's pool): one copy, no mapping, no page-fault
    /// storm. Every slot is `out.len() / rels.len()` bytes and must match the tensor's `dtype`
    /// and `shape`. Returns, per source, `Ok` or why its slot was not filled (its state and
    /// reason, a missing tensor, another dtype or shape); the caller decides what a miss means.
    pub fn read_batch(
        &self,
        rels: &[PathBuf],
        name: &str,
        dtype: entry::Dtype,
        shape: &[u64],
        out: &mut [u8],
        threads: Option<usize>,
    ) -> Vec<std::result::Result<(), String>> {
        if rels.is_empty() {
            return Vec::new();
        }
        let slot = out.len() / rels.len();
        if slot == 0 {
            // Empty tensors: nothing to copy, but each entry is still checked.
            return rels
                .iter()
                .map(|r| self.read_into(r, name, dtype, shape, &mut []))
                .collect();
        }
        pool::pool(threads).install(|| {
            out.par_chunks_mut(slot.max(1))
                .zip(rels.par_iter())
                .map(|(dst, rel)| self.read_into(rel, name, dtype, shape, &mut dst[..slot]))
                .collect()
        })
    }

    /// Takes a header parsed now (not one validated before) for the entry `c` judged valid: checks
    /// its fingerprint (the stamps may have come from a manifest index) and remembers it, so later
    /// reads skip the parse. Only for the very file the check judged (not one renamed over it in
    /// between), so the fast path never serves an unchecked file. False: another encoder's
    /// entry, now settled as foreign.
    fn adopt_header(
        &self,
        rel: &Path,
        c: &Check,
        id: entry::FileId,
        header: &Arc<entry::Header>,
    ) -> Result<bool> {
        if let Some(expected) = &self.cfg.fingerprint {
            let actual = header
                .metadata
                .get("fingerprint")
                .map(String::as_str)
                .unwrap_or("");
            if actual != expected {
                let reason = format!(
                    "written by encoder fingerprint {actual:?}, this store expects {expected:?}"
                );
                let source = stat_opt(&self.cfg.root.join(rel))?.unwrap_or(Stamp {
                    size: 0,
                    mtime_ns: 0,
                });
                self.settle(rel, source, &c.entry, Vec::new(), State::Foreign, reason)?;
                return Ok(false);
            }
        }
        let judged = |k: &&mut Known| {
            k.path == c.entry
                && k.entry
                    == Stamp {
                        size: id.size,
                        mtime_ns: id.mtime_ns,
                    }
        };
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = known.get_mut(rel).filter(judged) {
            k.header = Some((id, Arc::clone(header)));
        }
        Ok(true)
    }

    fn read_into(
        &self,
        rel: &Path,
        name: &str,
        dtype: entry::Dtype,
        shape: &[u64],
        dst: &mut [u8],
    ) -> std::result::Result<(), String> {
        use std::os::unix::fs::FileExt;

        let c = self.check(rel).map_err(|e| e.to_string())?;
        if c.state != State::Valid {
            return Err(format!("{}: {}", c.state.name(), c.reason));
        }
        let file = fs::File::open(&c.entry).map_err(|e| format!("{}: {e}", c.entry.display()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("{}: {e}", c.entry.display()))?;
        let id = entry::FileId::of(&meta);
        let known = self
            .recall(rel)
            .filter(|k| k.path == c.entry)
            .and_then(|k| k.header);
        let header = match known {
            Some((known_id, h)) if known_id == id => h,
            _ => {
                let h = Arc::new(
                    entry::read_header_of(&file, &c.entry, meta.len())
                        .map_err(|e| e.to_string())?,
                );
                if !self
                    .adopt_header(rel, &c, id, &h)
                    .map_err(|e| e.to_string())?
                {
                    return Err(format!(
                        "foreign: {} was written by another encoder fingerprint",
                        c.entry.display()
                    ));
                }
                h
            }
        };
        let t = header
            .tensor(name)
            .ok_or_else(|| format!("no tensor {name:?} in {}", c.entry.display()))?;
        if t.dtype != dtype || t.shape != shape || (t.end - t.start) as usize != dst.len() {
            return Err(format!(
                "tensor {name:?} of {} is {} {:?}, the batch holds {} {:?}",
                c.entry.display(),
                t.dtype.name(),
                t.shape,
                dtype.name(),
                shape
            ));
        }
        file.read_exact_at(dst, header.data_start + t.start)
            .map_err(|e| format!("{}: {e}", c.entry.display()))
    }

    /// Opens the valid entry of `rel` for reading, or None when it is not valid: the fast path
    /// ([`Store::open_known`]), else a full [`Store::check`] first ([`Store::open_checked`]).
    pub fn open_valid(&self, rel: &Path) -> Result<Option<entry::Entry>> {
        match self.open_known(rel)? {
            Some(e) => Ok(Some(e)),
            None => self.open_checked(rel),
        }
    }

    /// The fast path of [`Store::open_valid`], for an entry this process already validated: stat
    /// the source, open the entry and take its stamp from the open descriptor (no separate stat),
    /// map it, and reuse the header validated on the first read while the file is the same. None
    /// when anything differs: then [`Store::open_checked`] decides.
    pub fn open_known(&self, rel: &Path) -> Result<Option<entry::Entry>> {
        if let Some(k) = self
            .recall(rel)
            .filter(|k| k.hot() && k.state == State::Valid)
        {
            if let (Some(src_stamp), Some((id, header))) =
                (stat_opt(&self.cfg.root.join(rel))?, &k.header)
            {
                let unchanged = src_stamp == k.source
                    && k.path == self.entry_path(rel, src_stamp)
                    && self.inputs_unchanged(&k.inputs)?;
                if unchanged {
                    match entry::open_entry_with(
                        &k.path,
                        self.cfg.read_mode,
                        Some((*id, Arc::clone(header))),
                    ) {
                        Ok((e, opened)) if opened == *id => return Ok(Some(e)),
                        // The entry file changed since we validated it: take the slow path.
                        Ok(_) | Err(_) => {}
                    }
                }
            }
        }
        Ok(None)
    }

    /// The slow path of [`Store::open_valid`]: a full check (header parse, digests when racy),
    /// then the open.
    pub fn open_checked(&self, rel: &Path) -> Result<Option<entry::Entry>> {
        let c = self.check(rel)?;
        if c.state != State::Valid {
            return Ok(None);
        }
        let known_header = self
            .recall(rel)
            .filter(|k| k.path == c.entry)
            .and_then(|k| k.header);
        let reused = known_header.as_ref().map(|(id, _)| *id);
        match entry::open_entry_with(&c.entry, self.cfg.read_mode, known_header) {
            Ok((e, id)) => {
                if reused != Some(id) && !self.adopt_header(rel, &c, id, &e.header)? {
                    return Ok(None);
                }
                Ok(Some(e))
            }
            // Replaced or removed between the check and the open: a miss, not an error.
            Err(e) if e.is_io_kind(ErrorKind::NotFound) => Ok(None),
            Err(Error::Corrupt { .. }) => {
                self.forget(rel);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}
