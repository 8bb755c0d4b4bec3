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
