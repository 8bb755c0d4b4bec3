//! A field of a `.jsonl` listing, by the path each line lists: what an entry whose caption (or
//! control image) came from one line depends on (docs/design.md, "Inputs from a `.jsonl` line").
//!
//! An edit of one line must cost one entry, not every entry the file captions: an entry records
//! the string its line listed and the digest of the field's value, and stays valid while the
//! file's stamp is unchanged, or, once it changed, while the file still gives that listed path a
//! value with that digest. The table of a file is built once per stamp (one read and parse,
//! whatever the number of entries that ask), and the last few tables are kept.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::error::{Error, IoContext, Result};
use crate::key::{bytes_digest, open_regular, Stamp};

/// Which field of which lines: the field naming the image(s) and the field read for each.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fields {
    pub image_field: String,
    pub field: String,
}

/// One file's table: listed path -> digest of the field's value (as [`bytes_digest`] gives it
/// for the value's UTF-8 bytes). A path listed twice takes its last line's value, as
/// `featstore.encoders.diffusion.JsonlField` does; two spellings of one path (`a.png`,
/// `./a.png`, the file's own folder spelled out in full) are one path ([`Table::digest_of`]).
#[derive(Debug, Default)]
pub struct Table {
    /// The listing's folder: relative listed paths are relative to it.
    dir: PathBuf,
    digests: HashMap<String, String>,
}

impl Table {
    /// The digest of the value the listing gives `listed` (however the entry's line spelled
    /// it), or None when no line lists it.
    pub fn digest_of(&self, listed: &str) -> Option<&str> {
        self.digests
            .get(&spelling(&self.dir, listed))
            .map(String::as_str)
    }

    fn insert(&mut self, listed: &str, digest: String) {
        self.digests.insert(spelling(&self.dir, listed), digest);
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }
}

/// One spelling per path a line may list: lexically normalized (`.` dropped, `..` taken back
/// where it can be), and an absolute path inside the listing's folder made relative to it.
fn spelling(dir: &Path, listed: &str) -> String {
    let listed = Path::new(listed);
    let relative = if listed.is_absolute() {
        match listed.strip_prefix(dir) {
            Ok(inside) => inside,
            Err(_) => listed,
        }
    } else {
        listed
    };
    let mut parts: Vec<&str> = Vec::new();
    let absolute = relative.is_absolute();
    for c in relative.to_str().unwrap_or_default().split('/') {
        match c {
            "" | "." => {}
            ".." if parts.last().is_some_and(|p| *p != "..") => {
                parts.pop();
            }
            ".." if absolute => {}
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    if absolute {
        format!("/{joined}")
    } else {
        joined
    }
}

type Key = (PathBuf, Stamp, Fields);

/// Tables kept: a run reads one or a few listings; more would only hold memory.
const KEPT: usize = 4;

static TABLES: Mutex<Vec<(Key, Arc<Table>)>> = Mutex::new(Vec::new());

/// The table of `path` as it is with stamp `stamp`; an error when the file is not that file any
/// more (its stamp changed since, or while it was read) or cannot be read.
pub fn table(path: &Path, stamp: Stamp, fields: &Fields) -> Result<Arc<Table>> {
    let key = (path.to_path_buf(), stamp, fields.clone());
    {
        let tables = TABLES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, t)) = tables.iter().find(|(k, _)| *k == key) {
            return Ok(t.clone());
        }
    }
    let (mut file, meta) = open_regular(path)?;
    let before = Stamp::from_metadata(&meta);
    let mut text = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut text).at(path)?;
    if before != stamp || Stamp::of(path)? != stamp {
        return Err(Error::SourceChanged {
            path: path.to_path_buf(),
            what: "while it was read for its lines' digests; look it up again".into(),
        });
    }
    let dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let table = Arc::new(parse(&text, fields, dir));
    let mut tables = TABLES.lock().unwrap_or_else(|p| p.into_inner());
    if tables.len() >= KEPT {
        tables.remove(0);
    }
    tables.push((key, table.clone()));
    Ok(table)
}

/// Parses lines; lines that are not JSON objects with the two fields are left out (they list
/// nothing, so no entry can depend on them).
fn parse(text: &[u8], fields: &Fields, dir: PathBuf) -> Table {
    let mut out = Table {
        dir,
        digests: HashMap::new(),
    };
    for line in text.split(|&b| b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(Value::Object(record)) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        let Some(Value::String(value)) = record.get(&fields.field) else {
            continue;
        };
        let digest = bytes_digest(value.as_bytes());
        match record.get(&fields.image_field) {
            Some(Value::String(listed)) => out.insert(listed, digest),
            Some(Value::Array(listed)) => {
                for l in listed.iter().filter_map(Value::as_str) {
                    out.insert(l, digest.clone());
                }
            }
            _ => {}
        }
    }
    out
}

/// One listed path of a line, as the encoders read it (`JsonlField`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The line's number (from 1).
    pub line: usize,
    /// The path as the line spells it.
    pub listed: String,
    /// The line's field value.
    pub value: String,
}

/// A line that lists nothing usable: its number and why.
pub type Skipped = (usize, String);

/// Every path the lines of the listing `path` list with their field value, in order, and the
/// lines that list nothing usable (number, why). The lines are split and parsed as [`table`]
/// parses them, so what an encoder reads and what lookups check are the same lines.
pub fn listed_values(path: &Path, fields: &Fields) -> Result<(Vec<Listed>, Vec<Skipped>)> {
    let (mut file, meta) = open_regular(path)?;
    let mut text = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut text).at(path)?;
    if std::str::from_utf8(&text).is_err() {
        return Err(Error::Invalid(format!(
            "{} is not UTF-8 text",
            path.display()
        )));
    }
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record = match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(record)) => record,
            Ok(_) => {
                skipped.push((i + 1, "not a JSON object".to_string()));
                continue;
            }
            Err(e) => {
                skipped.push((i + 1, format!("not valid JSON: {e}")));
                continue;
            }
        };
        let (Some(Value::String(value)), Some(images)) =
            (record.get(&fields.field), record.get(&fields.image_field))
        else {
            skipped.push((
                i + 1,
                format!(
                    "no string field {:?} or no {:?}",
                    fields.field, fields.image_field
                ),
            ));
            continue;
        };
        let listed: Vec<&str> = match images {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        for l in listed {
            found.push(Listed {
                line: i + 1,
                listed: l.to_string(),
                value: value.clone(),
            });
        }
    }
    Ok((found, skipped))
}

/// Where a listed path leads, as the scan resolves it: an absolute one as it is; a relative one
/// relative to the listing's folder `base` when a file is there, else relative to `root` when a
/// file is there, and then also the folder's candidate it passed over (which must stay absent);
/// else the folder's candidate. Lexically normalized, symlinks kept.
pub fn resolve_listed(root: &Path, base: &Path, listed: &str) -> (PathBuf, Option<PathBuf>) {
    let p = Path::new(listed);
    if p.is_absolute() {
        return (crate::scan::normalize(p), None);
    }
    let is_file = |c: &Path| std::fs::metadata(c).map(|m| m.is_file()).unwrap_or(false);
    let first = crate::scan::normalize(&base.join(p));
    if is_file(&first) {
        return (first, None);
    }
    let second = crate::scan::normalize(&root.join(p));
    if second != first && is_file(&second) {
        (second, Some(first))
    } else {
        (first, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Fields {
        Fields {
            image_field: "image".into(),
            field: "prompt".into(),
        }
    }

    #[test]
    fn each_listed_path_maps_to_its_lines_value() {
        let text = br#"{"image": "a.png", "prompt": "a cat"}
not json
{"image": ["b.png", "c.png"], "prompt": "two dogs"}

{"image": "d.png"}
{"image": "a.png", "prompt": "a cat, again"}
"#;
        let t = parse(text, &fields(), PathBuf::from("/data/sub"));
        let cat = bytes_digest("a cat, again".as_bytes());
        assert_eq!(t.digest_of("a.png"), Some(cat.as_str()));
        assert_eq!(t.digest_of("b.png"), t.digest_of("c.png"));
        assert_eq!(
            t.digest_of("c.png"),
            Some(bytes_digest(b"two dogs").as_str())
        );
        assert_eq!(t.digest_of("d.png"), None);
        assert_eq!(t.len(), 3);
        // Other spellings of a listed path are that path.
        for same in [
            "./a.png",
            "x/../a.png",
            "/data/sub/a.png",
            "/data/sub/./a.png",
        ] {
            assert_eq!(t.digest_of(same), Some(cat.as_str()), "{same}");
        }
        assert_eq!(t.digest_of("../a.png"), None);
        assert_eq!(t.digest_of("/data/a.png"), None);
    }

    #[test]
    fn a_table_is_built_once_per_stamp_and_refused_for_another() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.jsonl");
        std::fs::write(&p, "{\"image\": \"a.png\", \"prompt\": \"x\"}\n").unwrap();
        let stamp = Stamp::of(&p).unwrap();
        let first = table(&p, stamp, &fields()).unwrap();
        assert!(Arc::ptr_eq(&first, &table(&p, stamp, &fields()).unwrap()));
        std::fs::write(&p, "{\"image\": \"a.png\", \"prompt\": \"yy\"}\n").unwrap();
        // Asked for a stamp the file no longer has (and never cached): refused, not misread.
        let gone = Stamp { size: 999, ..stamp };
        assert!(matches!(
            table(&p, gone, &fields()),
            Err(Error::SourceChanged { .. })
        ));
        let now = Stamp::of(&p).unwrap();
        assert_eq!(
            table(&p, now, &fields()).unwrap().digest_of("a.png"),
            Some(bytes_digest(b"yy").as_str())
        );
    }
}
