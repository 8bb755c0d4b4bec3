//! The bindings of packs: moving entries into them, dropping packed entries from the index, and
//! what each pack still holds (docs/design.md, "Packs").

use std::ffi::OsString;
use std::path::PathBuf;

use featstore_core::pack::PackedAt;
use featstore_core::store::{pack_name, LiveEntry, PackUsage as CoreUsage, Store};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::{fork, progress_counter, stamp_of, IntoPy, Progress, StampTuple};

/// What a pack run did: `(packs [(path, size)], entries moved, sources whose own file was kept
/// (rewritten since it was copied), already packed, {state: sources without a valid entry},
/// skipped [(rel, why)])`.
pub type PackReport = (
    Vec<(OsString, u64)>,
    usize,
    Vec<OsString>,
    usize,
    std::collections::BTreeMap<&'static str, usize>,
    Vec<(OsString, String)>,
);

pub fn pack_entries(
    py: Python<'_>,
    store: &Store,
    rels: Vec<PathBuf>,
    target_size: u64,
    durable: bool,
    progress: Option<&Bound<'_, Progress>>,
) -> PyResult<PackReport> {
    let counter = progress_counter(progress);
    let run = fork::detached(py, || {
        store.pack_entries(&rels, target_size.max(1), durable, &counter)
    })
    .py_err()?;
    Ok((
        run.packs
            .into_iter()
            .map(|p| (p.path.into_os_string(), p.stamp.size))
            .collect(),
        run.moved,
        run.kept_files
            .into_iter()
            .map(PathBuf::into_os_string)
            .collect(),
        run.already_packed,
        run.not_valid,
        run.skipped
            .into_iter()
            .map(|(r, why)| (r.into_os_string(), why))
            .collect(),
    ))
}

pub fn drop_packed(
    py: Python<'_>,
    store: &Store,
    entries: Vec<(PathBuf, PathBuf, u64, u64)>,
) -> PyResult<Vec<bool>> {
    let mut located = Vec::with_capacity(entries.len());
    for (rel, pack, offset, len) in entries {
        let Some(name) = pack_name(&pack) else {
            return Err(PyValueError::new_err(format!(
                "{} is not a pack's path",
                pack.display()
            )));
        };
        let pack = name.into();
        located.push((rel, PackedAt { pack, offset, len }));
    }
    fork::detached(py, || store.drop_packed(&located)).py_err()
}

/// `(pack path, identity, [(rel bytes, offset, length)] of live entries, entries in its table
/// or -1)`.
pub type PackUsage = (OsString, StampTuple, Vec<(Py<PyBytes>, u64, u64)>, i64);

pub fn pack_usage(py: Python<'_>, store: &Store) -> PyResult<Vec<PackUsage>> {
    let usage: Vec<CoreUsage> = fork::detached(py, || store.pack_usage()).py_err()?;
    Ok(usage
        .into_iter()
        .map(|u| {
            let live = u
                .live
                .iter()
                .map(|e| (PyBytes::new(py, &e.key).unbind(), e.offset, e.len))
                .collect();
            let table = u.table_entries.map_or(-1, |n| n as i64);
            let s = u.stamp;
            let identity = (s.size, s.mtime_ns, s.ino, s.ctime_ns);
            (u.path.into_os_string(), identity, live, table)
        })
        .collect())
}

pub fn repack(
    py: Python<'_>,
    store: &Store,
    path: PathBuf,
    identity: StampTuple,
    live: Vec<(Vec<u8>, u64, u64)>,
    durable: bool,
) -> PyResult<(Vec<OsString>, usize)> {
    let usage = CoreUsage {
        path,
        stamp: stamp_of(identity),
        live: live
            .into_iter()
            .map(|(key, offset, len)| LiveEntry { key, offset, len })
            .collect(),
        table_entries: None,
    };
    let (packs, n) = fork::detached(py, || store.repack(&usage, durable)).py_err()?;
    Ok((
        packs.into_iter().map(|p| p.path.into_os_string()).collect(),
        n,
    ))
}

/// One process's stream of packs for precompute's packed writes (`Store.put_many_packed`).
#[pyclass(module = "featstore._core", name = "PackStream", frozen)]
pub struct PyPackStream {
    pub inner: featstore_core::store::PackStream,
}

#[pymethods]
impl PyPackStream {
    /// Seals a pack once it holds `target_size` bytes or has been open `max_open_s` seconds.
    #[new]
    #[pyo3(signature = (target_size, max_open_s=300.0))]
    fn new(target_size: u64, max_open_s: f64) -> Self {
        let max_open = std::time::Duration::from_secs_f64(max_open_s.max(0.0));
        PyPackStream {
            inner: featstore_core::store::PackStream::new(target_size, max_open),
        }
    }
}
