//! Named records the binding returns instead of long tuples.

use std::ffi::OsString;
use std::path::PathBuf;

use featstore_core::manifest;
use featstore_core::store::{Check, Store};
use pyo3::prelude::*;

/// The verdict of one check: the state name (`"error: ..."` where the check itself failed, in
/// the calls that check many sources), the entry file found or expected, and why.
#[pyclass(module = "featstore._core", name = "Check", frozen, get_all)]
pub struct PyCheck {
    pub state: String,
    pub entry: OsString,
    pub reason: String,
    /// The judged entry file's stamp `(size, mtime_ns, ino, ctime_ns)`, or None when there is
    /// no such file: destructive commands pass it back so that only that very file is touched.
    pub identity: Option<(u64, i64, u64, i64)>,
    /// `(pack path, offset, length)` when a pack holds the entry (`entry` is then a name no
    /// file has, and `identity` the pack's stamp); None: the entry is in a file of its own.
    pub packed: Option<(OsString, u64, u64)>,
}

impl PyCheck {
    /// The binding's record of `c`, a check by `store`.
    pub fn of(c: Check, store: &Store) -> Self {
        PyCheck {
            state: c.state.name().to_string(),
            packed: c.packed.map(|at| {
                let pack = store.pack_path(&at.pack).into_os_string();
                (pack, at.offset, at.len)
            }),
            entry: c.entry.into_os_string(),
            reason: c.reason,
            identity: c.identity.map(|s| (s.size, s.mtime_ns, s.ino, s.ctime_ns)),
        }
    }
}

impl PyCheck {
    /// The record of a check that failed with an error (a permission error on the source).
    pub fn failed(error: impl std::fmt::Display) -> Self {
        PyCheck {
            state: format!("error: {error}"),
            entry: OsString::new(),
            reason: String::new(),
            identity: None,
            packed: None,
        }
    }
}

#[pymethods]
impl PyCheck {
    fn __repr__(&self) -> String {
        format!(
            "Check(state={:?}, entry={:?}, reason={:?})",
            self.state, self.entry, self.reason
        )
    }
}

/// One line of the manifest's index: a source whose entry is valid, with the stamps that vouch
/// for it. `check_first`: the stamps alone do not (racy, or extra inputs): check in full first.
#[pyclass(module = "featstore._core", name = "IndexRecord", frozen)]
pub struct PyIndexRecord {
    source: PathBuf,
    record: manifest::IndexRecord,
}

impl PyIndexRecord {
    pub fn new(source: PathBuf, record: manifest::IndexRecord) -> Self {
        PyIndexRecord { source, record }
    }
}

#[pymethods]
impl PyIndexRecord {
    /// The source, relative to the data root.
    #[getter]
    fn source(&self) -> OsString {
        self.source.clone().into_os_string()
    }

    /// The source's stamp `(size, mtime_ns, ino, ctime_ns)` when the entry was judged.
    #[getter]
    fn stamp(&self) -> (u64, i64, u64, i64) {
        let s = self.record.source;
        (s.size, s.mtime_ns, s.ino, s.ctime_ns)
    }

    #[getter]
    fn check_first(&self) -> bool {
        self.record.racy
    }

    /// The index key and value as the manifest's JSON stores them (the Rust writer's format).
    fn to_json(&self) -> (String, String) {
        (
            manifest::path_to_json(&self.source),
            self.record.to_json().to_string(),
        )
    }

    fn __repr__(&self) -> String {
        format!(
            "IndexRecord(source={:?}, {:?}, check_first={})",
            self.source, self.record, self.record.racy
        )
    }
}
