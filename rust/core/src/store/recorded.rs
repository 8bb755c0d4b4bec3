//! What an entry recorded of its inputs, against what the encoder would read now.
//!
//! Lookups compare recorded files with the files (stamps, digests, a `.jsonl` line's value);
//! only the planner knows the encoder's current choices: which inputs it has, the texts it was
//! given, which file a rule picks. [`Store::inputs_differ_many`] compares those for a whole plan
//! in one parallel pass, from the index's copy of each entry's record (or its header).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::Value;

use super::Store;
use crate::entry;
use crate::error::Result;
use crate::key::bytes_digest;

/// An input as the encoder would read it now.
#[derive(Debug, Clone)]
pub enum NowInput {
    /// A text (a caption given as bytes): recorded by digest.
    Text { name: String, text: Vec<u8> },
    /// A file the encoder reads (absolute, or relative to the data root).
    File { name: String, path: PathBuf },
    /// A file that must stay absent (compared by name only: lookups check it).
    Absent { name: String },
    /// One line of a `.jsonl` listing: its file and the path as the line spells it.
    Line {
        name: String,
        path: PathBuf,
        listed: String,
    },
}

impl NowInput {
    fn name(&self) -> &str {
        match self {
            NowInput::Text { name, .. }
            | NowInput::File { name, .. }
            | NowInput::Absent { name, .. }
            | NowInput::Line { name, .. } => name,
        }
    }
}

/// `path` made absolute against `root` and normalized lexically (`.` dropped, `..` taken back),
/// as Python's `os.path.normpath(os.path.join(root, path))`.
fn normalized(root: &Path, path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in root.join(path).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

impl Store {
    /// Whether the inputs the entry of `rel` recorded differ from `now`: another set of names, a
    /// text with another digest, a file (or a `.jsonl` line) taken from elsewhere. True also when
    /// the entry or its header cannot be read (the run then finds out why). Meant for entries a
    /// check just found valid: it reads the header of the entry at the source's current stamp
    /// without checking it again.
    pub fn inputs_differ(&self, rel: &Path, now: &[NowInput]) -> bool {
        self.recorded_inputs_differ(rel, now).unwrap_or(true)
    }

    /// The inputs the entry of `rel` recorded (its header's `inputs`, or the index's copy of
    /// them; None: none), for an entry a check just found valid.
    fn recorded_inputs(&self, rel: &Path) -> Result<Option<Arc<str>>> {
        // The verdict that check reached holds the entry's own record of its inputs: an entry
        // judged (or written) here, or an index record it trusted.
        if let Some(k) = self.recall(rel).filter(|k| k.trusted) {
            return Ok(k.recorded_inputs);
        }
        // Else (a record of an earlier version, which did not hold them) the header of the
        // entry where the source as it is now has it.
        let stamp = crate::key::Stamp::of(&self.cfg.root.join(rel))?;
        let header = entry::read_header(&self.entry_path(rel, stamp))?;
        Ok(header
            .metadata
            .get("inputs")
            .map(|raw| Arc::from(raw.as_str())))
    }

    fn recorded_inputs_differ(&self, rel: &Path, now: &[NowInput]) -> Result<bool> {
        let Some(Ok(Value::Array(items))) = self
            .recorded_inputs(rel)?
            .map(|raw| serde_json::from_str::<Value>(&raw))
        else {
            return Ok(!now.is_empty());
        };
        let recorded: Vec<&Value> = items
            .iter()
            .filter(|r| r.get("name").and_then(Value::as_str) != Some("source"))
            .collect();
        let find = |name: &str| {
            recorded
                .iter()
                .find(|r| r.get("name").and_then(Value::as_str) == Some(name))
        };
        if recorded.len() != now.len() || now.iter().any(|n| find(n.name()).is_none()) {
            return Ok(true);
        }
        let root = &self.cfg.root;
        let recorded_path = |r: &Value| {
            r.get("path")
                .and_then(Value::as_str)
                .map(|p| normalized(root, Path::new(p)))
        };
        for input in now {
            let r = find(input.name()).expect("every name was found above");
            let same = match input {
                NowInput::Text { text, .. } => {
                    r.get("blake3").and_then(Value::as_str) == Some(bytes_digest(text).as_str())
                }
                NowInput::File { path, .. } => recorded_path(r) == Some(normalized(root, path)),
                // Lookups check that it is still absent; which file the rule prefers follows
                // from the file it picks, compared above.
                NowInput::Absent { .. } => true,
                NowInput::Line { path, listed, .. } => {
                    recorded_path(r) == Some(normalized(root, path))
                        && r.pointer("/line/listed").and_then(Value::as_str)
                            == Some(listed.as_str())
                }
            };
            if !same {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// [`Store::inputs_differ`] of many entries, in parallel on featstore's pool.
    pub fn inputs_differ_many(
        &self,
        items: &[(PathBuf, Vec<NowInput>)],
        threads: Option<usize>,
    ) -> Vec<bool> {
        crate::pool::pool(threads).install(|| {
            items
                .par_iter()
                .map(|(rel, now)| self.inputs_differ(rel, now))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{Dtype, ReadMode};
    use crate::store::{Input, Layout, StoreConfig};

    #[test]
    fn the_encoders_choices_now_are_compared_with_what_the_entry_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for f in ["a.png", "cap.txt", "other.txt"] {
            std::fs::write(root.join(f), f).unwrap();
        }
        let s = Store::open(StoreConfig {
            root: root.to_path_buf(),
            feature: "f".into(),
            layout: Layout::Sidecar,
            fingerprint: Some("fp".into()),
            legacy_suffix: None,
            read_mode: ReadMode::Map,
        })
        .unwrap();
        let data = [0u8; 4];
        let tensors = [entry::TensorData {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![1],
            data: &data,
        }];
        let inputs = [
            Input::Text {
                name: "caption".into(),
                text: b"a cat".to_vec(),
            },
            Input::File {
                name: "caption_file".into(),
                path: PathBuf::from("cap.txt"),
                expected: None,
            },
        ];
        let rel = Path::new("a.png");
        s.put(rel, &tensors, &Default::default(), &inputs, false, None)
            .unwrap();
        let text = |t: &[u8]| NowInput::Text {
            name: "caption".into(),
            text: t.to_vec(),
        };
        let file = |p: &str| NowInput::File {
            name: "caption_file".into(),
            path: PathBuf::from(p),
        };
        assert!(!s.inputs_differ(rel, &[text(b"a cat"), file("./cap.txt")]));
        assert!(!s.inputs_differ(
            rel,
            &[
                text(b"a cat"),
                file(&root.join("cap.txt").to_string_lossy())
            ]
        ));
        assert!(s.inputs_differ(rel, &[text(b"a dog"), file("cap.txt")]));
        assert!(s.inputs_differ(rel, &[text(b"a cat"), file("other.txt")]));
        assert!(s.inputs_differ(rel, &[text(b"a cat")]));
        assert!(s.inputs_differ(Path::new("missing.png"), &[]));
    }

    #[test]
    fn paths_normalize_as_python_does() {
        let root = Path::new("/data");
        assert_eq!(
            normalized(root, Path::new("a/./b/../c.png")),
            Path::new("/data/a/c.png")
        );
        assert_eq!(
            normalized(root, Path::new("/abs/x.png")),
            Path::new("/abs/x.png")
        );
        assert_eq!(
            normalized(root, Path::new("../up.png")),
            Path::new("/up.png")
        );
    }
}
