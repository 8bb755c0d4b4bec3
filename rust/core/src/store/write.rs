//! Writing and removing entries: atomic writes that record every input as the encoder read it,
//! one at a time ([`Store::put`]) or a batch at once ([`Store::put_many`]: in parallel, with one
//! parallel fsync pass for the batch).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use serde_json::{json, Value};

use super::{
    name_too_long, now_ns, racy_now, stat_opt, Input, Known, Layout, State, Store, Written,
};
use crate::entry::{self, TensorData};
use crate::error::{Error, IoContext, Result};
use crate::key::{stamped_file_digest, Stamp};

/// The stamp and digest of an input as the encoder read it: `expected` is its stamp then (taken
/// before reading); if it changed since, or changes while the digest is computed, the features
/// belong to other bytes and nothing may be written.
pub(super) fn stamped_digest(
    path: &Path,
    name: &str,
    expected: Option<Stamp>,
) -> Result<(Stamp, String)> {
    let (before, digest) = stamped_file_digest(path)?;
    if let Some(seen) = expected {
        if seen != before {
            let what = if name == "source" {
                "after it was read for encoding".to_string()
            } else {
                format!("(input {name}) after the encoder read it")
            };
            return Err(Error::SourceChanged {
                path: path.to_path_buf(),
                what: format!(
                    "{what} (size {} -> {}, mtime_ns {} -> {}); its features were not stored, \
                     run again to encode the new version",
                    seen.size, before.size, seen.mtime_ns, before.mtime_ns
                ),
            });
        }
    }
    Ok((before, digest))
}

/// An input's record in the entry's `inputs` metadata.
fn stamp_record(name: &str, path: &str, stamp: Stamp, digest: &str) -> Value {
    json!({"name": name, "path": path, "size": stamp.size, "mtime_ns": stamp.mtime_ns,
           "ino": stamp.ino, "ctime_ns": stamp.ctime_ns, "blake3": digest})
}

/// An extra input's record. One stamped within the timestamp granularity of now is marked
/// `racy`: an edit of the same size may follow and keep its stamp, so every check reads it
/// (its digest, or its line) whatever its stamp.
fn input_record(name: &str, path: &str, stamp: Stamp, digest: &str) -> Value {
    let mut record = stamp_record(name, path, stamp, digest);
    if racy_now(stamp) {
        record["racy"] = Value::Bool(true);
    }
    record
}

/// What an entry records besides its tensors ([`Store::prepare_entry`]).
pub(super) struct Prepared {
    pub racy: bool,
    pub inputs_racy: bool,
    pub known_inputs: Vec<(PathBuf, Option<Stamp>)>,
    pub extra_inputs: Option<Arc<str>>,
    pub meta: BTreeMap<String, String>,
}

/// One entry of a batched write ([`Store::put_many`]): what [`Store::put`] takes.
pub struct PutRequest<'a> {
    pub rel: PathBuf,
    pub tensors: Vec<TensorData<'a>>,
    pub meta: BTreeMap<String, String>,
    pub inputs: Vec<Input>,
    pub expected: Option<Stamp>,
}

/// Directories a batch found inside the root and existing: each is checked (canonicalized) and
/// created once per batch rather than once per entry. Per batch only, so that a directory
/// replaced by a link between batches is checked again.
#[derive(Default)]
struct CheckedDirs(Mutex<HashSet<PathBuf>>);

impl CheckedDirs {
    fn contains(&self, dir: &Path) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(dir)
    }

    fn insert(&self, dir: &Path) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dir.to_path_buf());
    }
}

/// fsyncs every file of `paths`, then each of their directories once (which makes the renames
/// durable), from up to 16 threads: the latency of one fsync is mostly the device's or the
/// server's, and concurrent ones are committed together.
pub fn sync_all(paths: &[PathBuf]) -> Result<()> {
    let dirs: Vec<PathBuf> = paths
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    for group in [paths, &dirs[..]] {
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        let threads = group.len().clamp(1, 16);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = group.get(i) else { break };
                    if let Err(e) = fs::File::open(p).and_then(|f| f.sync_all()) {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Error::io(p, e));
                        break;
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
    }
    Ok(())
}

impl Store {
    /// Writes a batch of entries in parallel on featstore's pool (`threads`: its size), each as
    /// [`Store::put`] does but without remembering them (memory stays flat however many a run
    /// writes; a lookup in this process judges each from its header once); with `durable`, then fsyncs every written entry and its directory
    /// (in parallel) before returning. One result per request, in order; the outer error is a
    /// failed fsync, after which no entry of the batch may be called durable.
    pub fn put_many(
        &self,
        requests: &[PutRequest<'_>],
        durable: bool,
        threads: Option<usize>,
    ) -> Result<Vec<Result<Written>>> {
        let dirs = CheckedDirs::default();
        let results: Vec<Result<Written>> = crate::pool::pool(threads).install(|| {
            requests
                .par_iter()
                .map(|r| {
                    self.put_checked(
                        &r.rel, &r.tensors, &r.meta, &r.inputs, false, r.expected, &dirs, false,
                    )
                })
                .collect()
        });
        if durable {
            let written: Vec<PathBuf> = results
                .iter()
                .filter_map(|r| r.as_ref().ok().map(|w| w.path.clone()))
                .collect();
            sync_all(&written)?;
        }
        Ok(results)
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
        let dirs = CheckedDirs::default();
        self.put_checked(
            rel, tensors, user_meta, inputs, durable, expected, &dirs, true,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn put_checked(
        &self,
        rel: &Path,
        tensors: &[TensorData],
        user_meta: &BTreeMap<String, String>,
        inputs: &[Input],
        durable: bool,
        expected: Option<Stamp>,
        dirs: &CheckedDirs,
        remember: bool,
    ) -> Result<Written> {
        let src = self.cfg.root.join(rel);
        // The source is read first: its stamp then names the entry (the dir layout's key).
        let (before, digest) = stamped_digest(&src, "source", expected)?;
        let path = self.entry_path(rel, before);
        let parent = path.parent().unwrap_or(Path::new("/"));
        let checked = dirs.contains(parent);
        if !checked {
            self.check_inside_root(&path)?;
        }
        if path.file_name().map_or(0, |n| n.len()) > entry::NAME_MAX {
            return Err(Error::NameTooLong {
                path: path.clone(),
                why: name_too_long(&path),
            });
        }
        let Prepared {
            racy,
            inputs_racy,
            known_inputs,
            extra_inputs,
            meta,
        } = self.prepare_entry(rel, before, digest, user_meta, inputs)?;
        if let Some(parent) = path.parent().filter(|p| !dirs.contains(p)) {
            fs::create_dir_all(parent).at(parent)?;
            // Checked inside the root (sidecars) and now existing: the batch's next entries
            // there skip both.
            dirs.insert(parent);
        }
        let (bytes, entry_stamp) = entry::write_entry(&path, tensors, &meta, durable)?;
        // An entry under this source's earlier key (dir layout) is left alone: another data root
        // sharing the cache (a copy of the dataset) may still use it; `featstore gc` removes
        // entries no source claims.
        //
        // A racy entry is checked again (digest included) on every use, here as in other
        // processes, until a check outside the window: an edit that keeps the stamp may follow.
        //
        // A batch (precompute's writer) remembers nothing: its entries go to the journal, and
        // memory must not grow with the number written; a lookup here reads the header once.
        if remember {
            self.remember(
                rel,
                Known {
                    source: before,
                    path: path.clone(),
                    packed: None,
                    entry: entry_stamp,
                    inputs: known_inputs,
                    state: State::Valid,
                    reason: String::new(),
                    trusted: true,
                    racy: racy || inputs_racy,
                    indexed: false,
                    recorded_inputs: extra_inputs.clone(),
                    header: None,
                },
            );
        }
        Ok(Written {
            path,
            source: before,
            entry: entry_stamp,
            racy,
            check_first: racy || inputs_racy,
            inputs: extra_inputs,
            bytes,
        })
    }

    /// What an entry of `rel` records besides its tensors, from the source's stamp and digest
    /// (read before the encoder's output is stored) and its other inputs, each stamped and
    /// digested now and refused when it changed since the encoder read it.
    pub(super) fn prepare_entry(
        &self,
        rel: &Path,
        before: Stamp,
        digest: String,
        user_meta: &BTreeMap<String, String>,
        inputs: &[Input],
    ) -> Result<Prepared> {
        let racy = racy_now(before);
        let rel_str = rel.to_string_lossy().into_owned();
        let mut input_records = vec![stamp_record("source", &rel_str, before, &digest)];
        let mut known_inputs = Vec::new();
        let mut inputs_racy = false;
        for input in inputs {
            match input {
                Input::File {
                    name,
                    path,
                    expected,
                } => {
                    let abs = self.abs(path);
                    let (stamp, digest) = stamped_digest(&abs, name, *expected)?;
                    let shown = self.shown(&abs);
                    input_records.push(input_record(name, &shown, stamp, &digest));
                    inputs_racy |= racy_now(stamp);
                    known_inputs.push((abs, Some(stamp)));
                }
                Input::Text { name, text } => input_records
                    .push(json!({"name": name, "blake3": crate::key::bytes_digest(text)})),
                Input::JsonlLine {
                    name,
                    path,
                    fields,
                    listed,
                    text,
                } => {
                    let abs = self.abs(path);
                    let stamp = Stamp::of(&abs)?;
                    let digest = crate::key::bytes_digest(text);
                    let table = crate::jsonl::table(&abs, stamp, fields)?;
                    if table.digest_of(listed) != Some(digest.as_str()) {
                        return Err(Error::SourceChanged {
                            path: abs,
                            what: format!(
                                "(input {name}: the line listing {listed:?}) after the encoder read it; \
                                 its features were not stored, run again to encode the new text"
                            ),
                        });
                    }
                    let mut record = input_record(name, &self.shown(&abs), stamp, &digest);
                    inputs_racy |= racy_now(stamp);
                    record["line"] = json!({"image_field": fields.image_field,
                                            "field": fields.field, "listed": listed});
                    input_records.push(record);
                    known_inputs.push((abs, Some(stamp)));
                }
                Input::Absent { name, path } => {
                    let abs = self.abs(path);
                    if stat_opt(&abs)?.is_some() {
                        return Err(Error::SourceChanged {
                            path: abs,
                            what: format!("appeared while the entry was computed (the rule of input {name} now prefers it); write it again"),
                        });
                    }
                    input_records
                        .push(json!({"name": name, "path": self.shown(&abs), "absent": true}));
                    known_inputs.push((abs, None));
                }
            }
        }
        // The index holds the extra inputs, so that a lookup checks them without the header.
        let extra_inputs: Option<Arc<str>> = (input_records.len() > 1)
            .then(|| Value::Array(input_records[1..].to_vec()).to_string().into());
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
            ("source.ino", before.ino.to_string()),
            ("source.ctime_ns", before.ctime_ns.to_string()),
            ("source.blake3", digest),
            ("inputs", Value::Array(input_records).to_string()),
            ("racy", if racy { "1" } else { "0" }.to_string()),
            ("created", (now_ns() / 1_000_000_000).to_string()),
        ];
        for (k, v) in reserved {
            meta.insert(k.to_string(), v);
        }
        Ok(Prepared {
            racy,
            inputs_racy,
            known_inputs,
            extra_inputs,
            meta,
        })
    }

    /// Sidecar entries are written only inside the data root: a directory reached through a
    /// symbolic link in the root that leads elsewhere is read through, never written into.
    pub(super) fn check_inside_root(&self, entry: &Path) -> Result<()> {
        let (Layout::Sidecar, Some(dir)) = (&self.cfg.layout, entry.parent()) else {
            return Ok(());
        };
        let root = match self.real_root.get() {
            Some(root) => root,
            None => {
                let real = fs::canonicalize(&self.cfg.root).at(&self.cfg.root)?;
                self.real_root.get_or_init(|| real)
            }
        };
        let real = fs::canonicalize(dir).at(dir)?;
        if real.starts_with(root) {
            return Ok(());
        }
        Err(Error::WriteOutsideRoot {
            dir: dir.to_path_buf(),
            real,
            root: self.cfg.root.clone(),
        })
    }

    fn abs(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.cfg.root.join(path)
        }
    }

    /// `abs` relative to the data root when inside it (entries stay valid when the root moves).
    fn shown(&self, abs: &Path) -> String {
        abs.strip_prefix(&self.cfg.root)
            .unwrap_or(abs)
            .to_string_lossy()
            .into_owned()
    }

    /// Removes the entry of `rel` (at its current and last known key, and from its pack when
    /// one holds it); true if one was removed.
    pub fn remove(&self, rel: &Path) -> Result<bool> {
        let mut candidates = Vec::new();
        if let Some(s) = stat_opt(&self.cfg.root.join(rel))? {
            candidates.push(self.entry_path(rel, s));
        }
        // Never a pack: it holds other sources' entries (a packed entry is dropped from the
        // index instead, `Store::drop_packed`).
        if let Some(k) = self.recall(rel).filter(|k| k.packed.is_none()) {
            candidates.push(k.path);
        }
        if self.cfg.layout == Layout::Sidecar {
            candidates.push(self.entry_path(rel, Stamp::sized(0, 0)));
        }
        let mut removed = false;
        if let Some(at) = self.recall(rel).and_then(|k| k.packed) {
            removed |= self.drop_packed(&[(rel.to_path_buf(), at)])?[0];
        }
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
}
