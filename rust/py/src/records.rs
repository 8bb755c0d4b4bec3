//! Named records the binding returns instead of long tuples.

use std::ffi::OsString;
use std::path::PathBuf;

use featstore_core::manifest;
use featstore_core::store::Check;
use pyo3::prelude::*;

/// The verdict of one check: the state name (`"error: ..."` where the check itself failed, in
/// the calls that check many sources), the entry file found or expected, and why.
#[pyclass(module = "featstore._core", name = "Check", frozen, get_all)]
pub struct PyCheck {
    pub state: String,
    pub entry: OsString,
    pub reason: String,
}

impl From<Check> for PyCheck {
    fn from(c: Check) -> Self {
        PyCheck {
            state: c.state.name().to_string(),
            entry: c.entry.into_os_string(),
            reason: c.reason,
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
#[pyclass(module = "featstore._core", name = "IndexRecord", frozen, get_all)]
pub struct PyIndexRecord {
    pub source: OsString,
    pub size: u64,
    pub mtime_ns: i64,
    pub entry_size: u64,
    pub entry_mtime_ns: i64,
    pub check_first: bool,
}

impl PyIndexRecord {
    pub fn new(source: PathBuf, rec: manifest::IndexRecord) -> Self {
        PyIndexRecord {
            source: source.into_os_string(),
            size: rec.source.size,
            mtime_ns: rec.source.mtime_ns,
            entry_size: rec.entry.size,
            entry_mtime_ns: rec.entry.mtime_ns,
            check_first: rec.racy,
        }
    }
}

#[pymethods]
impl PyIndexRecord {
    /// The record as the manifest's JSON index stores it: `[size, mtime_ns, entry size, entry
    /// mtime_ns, check_first as 0/1]`.
    fn as_list(&self) -> (u64, i64, u64, i64, u8) {
        (
            self.size,
            self.mtime_ns,
            self.entry_size,
            self.entry_mtime_ns,
            self.check_first as u8,
        )
    }

    fn __repr__(&self) -> String {
        format!(
            "IndexRecord(source={:?}, size={}, mtime_ns={}, entry_size={}, entry_mtime_ns={}, check_first={})",
            self.source, self.size, self.mtime_ns, self.entry_size, self.entry_mtime_ns, self.check_first
        )
    }
}
