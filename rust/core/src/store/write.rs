//! Writing and removing entries: atomic writes that record every input as the encoder read it.

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use serde_json::{json, Value};

use super::{now_ns, racy_now, stat_opt, Input, Known, Layout, State, Store, Written};
use crate::entry::{self, TensorData};
use crate::error::{Error, IoContext, Result};
use crate::key::{file_digest, Stamp};

impl Store {
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
                return Err(Error::SourceChanged {
                    path: src,
                    what: format!(
                        "after it was read for encoding (size {} -> {}, mtime_ns {} -> {}); \
                         its features were not stored, run again to encode the new version",
                        seen.size, before.size, seen.mtime_ns, before.mtime_ns
                    ),
                });
            }
        }
        let digest = file_digest(&src)?;
        if Stamp::of(&src)? != before {
            return Err(Error::SourceChanged {
                path: src,
                what: "while its entry was being written; write it again".into(),
            });
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
}
