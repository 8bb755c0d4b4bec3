//! `featstore._core`: thin PyO3 bindings of featstore-core. Types and errors are converted here;
//! all logic lives in the core crate. Every call that does real work releases the GIL.

mod dlpack;
mod error;
mod fork;
mod packs;
mod records;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use featstore_core::entry::{self, Dtype, ReadMode, TensorData};
use featstore_core::history;
use featstore_core::index;
use featstore_core::jsonl;
use featstore_core::key::{self, Stamp};
use featstore_core::manifest::{self, Manifest};
use featstore_core::pool;
use featstore_core::scan::{self, ScanOptions};
use featstore_core::store::{
    Depth, Input, Layout, NowInput, PutRequest, State, Store, StoreConfig, Written,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::{PyBytes, PyDict, PyString};
use rayon::prelude::*;
use records::{PyCheck, PyIndexRecord};

trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for featstore_core::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(error::to_py)
    }
}

fn parse_dtype(name: &str) -> PyResult<Dtype> {
    Dtype::parse(name).ok_or_else(|| PyValueError::new_err(format!("unknown dtype {name:?}")))
}

/// A counter another thread can read while a long call runs without the GIL.
#[pyclass(module = "featstore._core", frozen)]
#[derive(Default)]
struct Progress {
    count: Arc<AtomicU64>,
}

#[pymethods]
impl Progress {
    #[new]
    fn new() -> Self {
        Progress::default()
    }

    /// Items done so far.
    #[getter]
    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

fn progress_counter(progress: Option<&Bound<'_, Progress>>) -> Arc<AtomicU64> {
    progress
        .map(|p| Arc::clone(&p.get().count))
        .unwrap_or_default()
}

type ScanTuple<'py> = (
    Vec<OsString>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Vec<(String, String)>,
    Vec<Vec<OsString>>,
    Vec<OsString>,
    Bound<'py, PyBytes>,
);

/// A stamp as 32 little-endian bytes: size, mtime_ns, ino, ctime_ns.
fn stamp_bytes(s: Stamp) -> impl Iterator<Item = u8> {
    [s.size, s.mtime_ns as u64, s.ino, s.ctime_ns as u64]
        .into_iter()
        .flat_map(u64::to_le_bytes)
}

/// Stamps packed as [`stamp_bytes`] writes them; None when `packed` is not a whole number of them.
fn stamps_from_bytes(packed: &[u8]) -> Option<Vec<Stamp>> {
    if packed.len() % 32 != 0 {
        return None;
    }
    let word = |c: &[u8], i: usize| u64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().expect("8"));
    Some(
        packed
            .chunks_exact(32)
            .map(|c| Stamp {
                size: word(c, 0),
                mtime_ns: word(c, 1) as i64,
                ino: word(c, 2),
                ctime_ns: word(c, 3) as i64,
            })
            .collect(),
    )
}

fn scan_to_python(py: Python<'_>, s: scan::Scan, with_stamps: bool) -> ScanTuple<'_> {
    // Sizes and mtimes go out as raw little-endian arrays: numpy.frombuffer turns them into
    // arrays without a Python int per file.
    let sizes: Vec<u8> = s
        .sources
        .iter()
        .flat_map(|x| x.stamp.size.to_le_bytes())
        .collect();
    let mtimes: Vec<u8> = s
        .sources
        .iter()
        .flat_map(|x| x.stamp.mtime_ns.to_le_bytes())
        .collect();
    // Each source's whole stamp (size, mtime_ns, ino, ctime_ns): `status` checks with it
    // rather than stat every source a second time.
    let stamps: Vec<u8> = if with_stamps {
        s.sources
            .iter()
            .flat_map(|x| stamp_bytes(x.stamp))
            .collect()
    } else {
        Vec::new()
    };
    let paths = s
        .sources
        .into_iter()
        .map(|x| x.rel.into_os_string())
        .collect();
    let sets = s
        .sets
        .into_iter()
        .map(|set| set.into_iter().map(PathBuf::into_os_string).collect())
        .collect();
    let named = s.named.into_iter().map(PathBuf::into_os_string).collect();
    (
        paths,
        PyBytes::new(py, &sizes),
        PyBytes::new(py, &mtimes),
        s.errors,
        sets,
        named,
        PyBytes::new(py, &stamps),
    )
}

/// Scans a directory tree (or `.jsonl` fields, or a list) and returns
/// `(paths, sizes_le_u64, mtimes_le_i64, errors, sets, named, stamps)`; `named` lists the files
/// named with `named_suffix` (a tree scan only), found without a `stat`; `stamps` holds each
/// source's whole stamp (32 bytes each) with `with_stamps`, else nothing.
#[pyfunction(name = "scan")]
#[pyo3(signature = (root, *, extensions=Vec::new(), follow_symlinks=true, skip_dirs=Vec::new(), jsonl=None, listed=None, threads=None, progress=None, named_suffix=None, with_stamps=false))]
#[allow(clippy::too_many_arguments)]
fn scan_sources<'py>(
    py: Python<'py>,
    root: PathBuf,
    extensions: Vec<String>,
    follow_symlinks: bool,
    skip_dirs: Vec<PathBuf>,
    jsonl: Option<String>,
    listed: Option<Vec<String>>,
    threads: Option<usize>,
    progress: Option<&Bound<'py, Progress>>,
    named_suffix: Option<String>,
    with_stamps: bool,
) -> PyResult<ScanTuple<'py>> {
    let counter = progress_counter(progress);
    let opts = ScanOptions {
        extensions,
        follow_symlinks,
        skip_dirs,
        threads,
        named_suffix,
    };
    let result = fork::detached(py, || match (&jsonl, &listed) {
        (_, Some(list)) => scan::scan_list(&root, list, threads, &counter),
        (Some(field), None) => scan::scan_jsonl(&root, field, &opts, &counter),
        (None, None) => scan::scan_tree(&root, &opts, &counter),
    });
    Ok(scan_to_python(py, result.py_err()?, with_stamps))
}

/// The v1 key of a relative path (raw bytes) with a stamp, as 64 hex digits.
#[pyfunction]
fn stamp_key(rel: &[u8], size: u64, mtime_ns: i64) -> String {
    key::stamp_key(rel, Stamp::sized(size, mtime_ns))
}

/// blake3 of a text's bytes (64 hex digits): what an entry records for a text input.
#[pyfunction]
fn bytes_digest(data: &[u8]) -> String {
    key::bytes_digest(data)
}

/// blake3 of a file's bytes (64 hex digits).
#[pyfunction]
fn file_digest(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    fork::detached(py, || key::file_digest(&path)).py_err()
}

/// blake3 of many files in parallel; `None` where a file cannot be read.
#[pyfunction]
#[pyo3(signature = (paths, threads=None))]
fn file_digests(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    threads: Option<usize>,
) -> Vec<Option<String>> {
    fork::detached(py, || {
        pool::pool(threads).install(|| paths.par_iter().map(|p| key::file_digest(p).ok()).collect())
    })
}

/// The key chain of every prefix of a history (`featstore_core::history`) and its stamps chain
/// (of every prefix, or with `last_only` of the whole list), as 64 hex digits each, from one
/// `stat` of each frame; and its frames' newest mtime.
#[pyfunction]
#[pyo3(signature = (root, rels, last_only=false))]
fn history_links(
    py: Python<'_>,
    root: PathBuf,
    rels: Vec<PathBuf>,
    last_only: bool,
) -> PyResult<(Vec<String>, Vec<String>, i64)> {
    let links = fork::detached(py, || history::links(&root, &rels, last_only)).py_err()?;
    let skip = if last_only {
        links.keys.len().saturating_sub(1)
    } else {
        0
    };
    Ok((
        links.keys[skip..].iter().map(hex::encode).collect(),
        links.stamps.iter().map(hex::encode).collect(),
        links.newest_mtime_ns,
    ))
}

/// The key and stamps chains of every prefix from recorded stamps `(size, mtime_ns, ino,
/// ctime_ns)` instead of a `stat` (what a pass records is what its entries hold).
#[pyfunction]
fn history_chains(
    rels: Vec<PathBuf>,
    stamps: Vec<(u64, i64, u64, i64)>,
) -> PyResult<(Vec<String>, Vec<String>)> {
    if rels.len() != stamps.len() {
        return Err(PyValueError::new_err("one stamp per frame"));
    }
    let members: Vec<(&[u8], Stamp)> = rels
        .iter()
        .zip(stamps)
        .map(|(rel, (size, mtime_ns, ino, ctime_ns))| {
            (
                key::path_bytes(rel),
                Stamp {
                    size,
                    mtime_ns,
                    ino,
                    ctime_ns,
                },
            )
        })
        .collect();
    let links = history::chains(&members, false);
    Ok((
        links.keys.iter().map(hex::encode).collect(),
        links.stamps.iter().map(hex::encode).collect(),
    ))
}

/// The content chain of every prefix from the frames' digests (64 hex digits each).
#[pyfunction]
fn history_content_chain(rels: Vec<PathBuf>, digests: Vec<String>) -> PyResult<Vec<String>> {
    if rels.len() != digests.len() {
        return Err(PyValueError::new_err("one digest per frame"));
    }
    let members: Vec<(&[u8], &str)> = rels
        .iter()
        .map(|r| key::path_bytes(r))
        .zip(digests.iter().map(String::as_str))
        .collect();
    Ok(history::content_chain(&members)
        .iter()
        .map(hex::encode)
        .collect())
}

/// The content chain of every prefix of a history (each frame digested once, in parallel).
#[pyfunction]
#[pyo3(signature = (root, rels, threads=None))]
fn history_contents(
    py: Python<'_>,
    root: PathBuf,
    rels: Vec<PathBuf>,
    threads: Option<usize>,
) -> PyResult<Vec<String>> {
    let chain =
        fork::detached(py, || history::contents(&root, &rels, &pool::pool(threads))).py_err()?;
    Ok(chain.iter().map(hex::encode).collect())
}

/// A listed path, its line's value, where it leads and the candidate it passed over.
/// Paths go back as `OsString` (a Python `str`, undecodable bytes escaped as `os.fsdecode` does),
/// not `PathBuf` (a `pathlib.Path`: microseconds each, times a million lines).
type ListedValue = (String, String, OsString, Option<OsString>);

/// What a `.jsonl` listing gives each path its lines list (`JsonlField`): `(listed, value,
/// where it leads, the folder's candidate it passed over)` in line order, each listed path
/// resolved in parallel, and the lines that list nothing usable `(line number, why)`.
#[pyfunction]
#[pyo3(signature = (root, path, image_field, field, threads=None))]

fn jsonl_field(
    py: Python<'_>,
    root: PathBuf,
    path: PathBuf,
    image_field: String,
    field: String,
    threads: Option<usize>,
) -> PyResult<(Vec<ListedValue>, Vec<jsonl::Skipped>)> {
    let fields = jsonl::Fields { image_field, field };
    fork::detached(py, || {
        let (found, skipped) = jsonl::listed_values(&path, &fields)?;
        let base = path.parent().unwrap_or(&root).to_path_buf();
        let resolved: Vec<_> = pool::pool(threads).install(|| {
            found
                .into_par_iter()
                .map(|l| {
                    let (to, passed_over) = jsonl::resolve_listed(&root, &base, &l.listed);
                    (
                        l.listed,
                        l.value,
                        to.into_os_string(),
                        passed_over.map(PathBuf::into_os_string),
                    )
                })
                .collect()
        });
        Ok((resolved, skipped))
    })
    .py_err()
}

/// The old scripts' key: `sha256(path_as_given + bytes of read_from)[:16]`.
#[pyfunction]
fn legacy_sha256_key(py: Python<'_>, path_as_given: &[u8], read_from: PathBuf) -> PyResult<String> {
    let given = path_as_given.to_vec();
    fork::detached(py, || key::legacy_sha256_key(&given, &read_from)).py_err()
}

/// Legacy keys of many files in parallel; `None` where a file cannot be read.
#[pyfunction]
#[pyo3(signature = (paths_as_given, read_from, threads=None))]
fn legacy_sha256_keys(
    py: Python<'_>,
    paths_as_given: Vec<Vec<u8>>,
    read_from: Vec<PathBuf>,
    threads: Option<usize>,
) -> PyResult<Vec<Option<String>>> {
    if paths_as_given.len() != read_from.len() {
        return Err(PyValueError::new_err(
            "paths_as_given and read_from differ in length",
        ));
    }
    Ok(fork::detached(py, || {
        pool::pool(threads).install(|| {
            paths_as_given
                .par_iter()
                .zip(read_from.par_iter())
                .map(|(g, r)| key::legacy_sha256_key(g, r).ok())
                .collect()
        })
    }))
}

/// Tensors from Python: `(name, dtype, shape, data_ptr, nbytes)`.
type RawTensor = (String, String, Vec<u64>, usize, usize);

/// Views the callers' tensor memory.
///
/// # Safety
/// Each pointer must be valid for `nbytes` bytes and stay alive and unmodified until the returned
/// views are dropped. The Python callers (`featstore.store`) pass `data_ptr()` of contiguous CPU
/// tensors that they hold references to for the duration of the call.
unsafe fn tensor_views(raw: &[RawTensor]) -> PyResult<Vec<TensorData<'_>>> {
    raw.iter()
        .map(|(name, dtype, shape, ptr, nbytes)| {
            let data: &[u8] = if *nbytes == 0 {
                &[]
            } else {
                // SAFETY: guaranteed by this function's contract.
                unsafe { std::slice::from_raw_parts(*ptr as *const u8, *nbytes) }
            };
            Ok(TensorData {
                name: name.clone(),
                dtype: parse_dtype(dtype)?,
                shape: shape.clone(),
                data,
            })
        })
        .collect()
}

/// Writes an entry file atomically. `tensors` are `(name, dtype, shape, data_ptr, nbytes)` of
/// contiguous CPU memory the caller keeps alive; returns the file size.
#[pyfunction]
#[pyo3(signature = (path, tensors, metadata, durable=false))]
fn write_entry(
    py: Python<'_>,
    path: PathBuf,
    tensors: Vec<RawTensor>,
    metadata: BTreeMap<String, String>,
    durable: bool,
) -> PyResult<u64> {
    // SAFETY: see tensor_views; the caller holds the tensors for the duration of this call.
    let views = unsafe { tensor_views(&tensors)? };
    fork::detached(py, || entry::write_entry(&path, &views, &metadata, durable))
        .map(|(bytes, _)| bytes)
        .py_err()
}

type HeaderTuple = (
    BTreeMap<String, String>,
    Vec<(String, String, Vec<u64>, u64, u64)>,
    u64,
);

fn header_tuple(h: &entry::Header) -> HeaderTuple {
    (
        h.metadata.clone(),
        h.tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    t.dtype.name().to_string(),
                    t.shape.clone(),
                    t.start,
                    t.end,
                )
            })
            .collect(),
        h.data_start,
    )
}

/// An entry's place in the file at a path: `(offset, length)` of a packed entry, or None for
/// a file that is one entry.
fn span(at: Option<(u64, u64)>) -> Option<entry::Span> {
    at.map(|(offset, len)| entry::Span { offset, len })
}

/// Reads and validates an entry's header only: `(metadata, [(name, dtype, shape, start, end)],
/// data_start)`. `span`: `(offset, length)` of a packed entry in the pack at `path`.
#[pyfunction]
#[pyo3(signature = (path, span=None))]
fn read_header(py: Python<'_>, path: PathBuf, span: Option<(u64, u64)>) -> PyResult<HeaderTuple> {
    let h = fork::detached(py, || match self::span(span) {
        None => entry::read_header(&path),
        Some(at) => entry::read_header_in(&path, at).map(|(h, _)| h),
    })
    .py_err()?;
    Ok(header_tuple(&h))
}

/// `[(name, dltensor capsule)]` of an entry.
type Capsules<'py> = Vec<(String, Bound<'py, PyAny>)>;

/// Tensors, metadata and the `(address, length)` of the bytes they view.
type OpenedEntry<'py> = (Capsules<'py>, BTreeMap<String, String>, (usize, usize));

fn tensors_of<'py>(py: Python<'py>, e: &entry::Entry) -> PyResult<Capsules<'py>> {
    e.header
        .tensors
        .iter()
        .map(|t| {
            Ok((
                t.name.clone(),
                dlpack::capsule(py, &e.bytes, e.header.data_start, t)?,
            ))
        })
        .collect()
}

fn read_mode(pread: bool) -> ReadMode {
    if pread {
        ReadMode::Pread
    } else {
        ReadMode::Map
    }
}

/// Opens an entry file: `([(name, dltensor capsule)], metadata, (address, length))`. The
/// address range is that of the mapping (or buffer) the tensors view.
#[pyfunction]
#[pyo3(signature = (path, pread=false, span=None))]
fn read_entry<'py>(
    py: Python<'py>,
    path: PathBuf,
    pread: bool,
    span: Option<(u64, u64)>,
) -> PyResult<OpenedEntry<'py>> {
    let e = py
        .detach(|| entry::open_entry_in(&path, self::span(span), read_mode(pread), None))
        .py_err()?
        .0;
    let range = (e.bytes.as_ptr() as usize, e.bytes.as_slice().len());
    Ok((tensors_of(py, &e)?, e.header.metadata.clone(), range))
}

/// Opens an entry and checks its data against `data.blake3`; returns its metadata.
#[pyfunction]
#[pyo3(signature = (path, span=None))]
fn verify_entry(
    py: Python<'_>,
    path: PathBuf,
    span: Option<(u64, u64)>,
) -> PyResult<BTreeMap<String, String>> {
    fork::detached(py, || {
        let (e, _) = entry::open_entry_in(&path, self::span(span), ReadMode::Pread, None)?;
        e.verify_checksum(&path)?;
        Ok(e.header.metadata.clone())
    })
    .py_err()
}

/// Gives the C heap's free pages back to the system (glibc's `malloc_trim`; elsewhere nothing):
/// a batch of checks frees its temporary buffers, but the heap keeps their pages, which a
/// million-source precompute would otherwise carry through its whole run. True when pages went
/// back.
#[pyfunction]
fn release_freed_memory(py: Python<'_>) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks and trims glibc's own arenas, under their locks.
        fork::detached(py, || unsafe { libc::malloc_trim(0) } == 1)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = py;
        false
    }
}

/// True when `path` is on a network file system (featstore then reads with pread).
#[pyfunction]
fn is_network_fs(path: PathBuf) -> bool {
    entry::is_network_fs(&path)
}

/// Reads a manifest as JSON text (index included), or None if there is none.
#[pyfunction]
fn read_manifest(py: Python<'_>, path: PathBuf) -> PyResult<Option<String>> {
    let m = fork::detached(py, || Manifest::read(&path)).py_err()?;
    Ok(m.map(|m| String::from_utf8(m.to_json_bytes()).expect("JSON is UTF-8")))
}

/// Writes a manifest (JSON text of the whole manifest) atomically.
#[pyfunction]
#[pyo3(signature = (path, json, durable=true))]
fn write_manifest(py: Python<'_>, path: PathBuf, json: &str, durable: bool) -> PyResult<()> {
    let m = Manifest::parse(&path, json.as_bytes()).py_err()?;
    fork::detached(py, || m.write(&path, durable)).py_err()
}

/// fsyncs files, then their directories once each, from up to 16 threads.
#[pyfunction]
fn sync_all(py: Python<'_>, paths: Vec<PathBuf>) -> PyResult<()> {
    fork::detached(py, || featstore_core::store::sync_all(&paths)).py_err()
}

/// The journal path of rank `rank` of `world` beside a manifest.
#[pyfunction]
fn journal_path(manifest: PathBuf, rank: u32, world: u32) -> OsString {
    manifest::journal_path(&manifest, rank, world).into_os_string()
}

/// Appends records (JSON texts of objects) to a journal in one write.
#[pyfunction]
#[pyo3(signature = (path, records, durable=false))]
fn append_journal(
    py: Python<'_>,
    path: PathBuf,
    records: Vec<String>,
    durable: bool,
) -> PyResult<()> {
    let values = records
        .iter()
        .map(|r| {
            serde_json::from_str(r)
                .map_err(|e| PyValueError::new_err(format!("journal record is not JSON: {e}")))
        })
        .collect::<PyResult<Vec<serde_json::Value>>>()?;
    fork::detached(py, || manifest::append_journal(&path, &values, durable)).py_err()
}

/// Merges every journal beside the manifest into one index segment in `index_dir` and the
/// manifest (with `fields` JSON overriding its fields) and deletes the journals; returns
/// `(journals, records, skipped_lines, foreign_records)` (records of another fingerprint are left
/// out of the index).
#[pyfunction]
#[pyo3(signature = (manifest_path, index_dir, fields=None, durable=true))]
fn merge_journals(
    py: Python<'_>,
    manifest_path: PathBuf,
    index_dir: PathBuf,
    fields: Option<String>,
    durable: bool,
) -> PyResult<(usize, usize, usize, usize)> {
    let updates: Option<serde_json::Map<String, serde_json::Value>> = match fields {
        Some(f) => Some(serde_json::from_str(&f).map_err(|e| {
            PyValueError::new_err(format!("manifest fields are not a JSON object: {e}"))
        })?),
        None => None,
    };
    let (_, s) = py
        .detach(|| {
            let mut base = Manifest::read(&manifest_path)?.unwrap_or_default();
            if let Some(u) = updates {
                base.update_fields(u);
            }
            manifest::merge_journals(&manifest_path, &index_dir, Some(base), durable)
        })
        .py_err()?;
    Ok((s.journals, s.records, s.skipped_lines, s.foreign_records))
}

/// Inputs by name, each a tuple whose first item says its kind.
type NamedInputs<'py> = Vec<(String, Bound<'py, PyAny>)>;

/// What `put` wrote, as Python sees it.
fn written_dict(py: Python<'_>, w: Written) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("path", w.path.into_os_string())?;
    d.set_item("source", stamp_tuple(w.source))?;
    d.set_item("entry", stamp_tuple(w.entry))?;
    d.set_item("racy", w.racy)?;
    d.set_item("check_first", w.check_first)?;
    d.set_item("inputs", w.inputs.as_deref())?;
    d.set_item("bytes", w.bytes)?;
    Ok(d)
}

/// A manifest index record: source size, source mtime_ns, entry size, entry mtime_ns, check-first.
/// A feature's entries under a data root: layouts, the validity check, writes and reads.
#[pyclass(module = "featstore._core", name = "Store", frozen)]
struct PyStore {
    inner: Arc<Store>,
}

/// A stamp as Python passes it: `(size, mtime_ns, ino, ctime_ns)`.
type StampTuple = (u64, i64, u64, i64);

fn depth(deep: bool) -> Depth {
    if deep {
        Depth::Digests
    } else {
        Depth::Stamps
    }
}

fn stamp_of((size, mtime_ns, ino, ctime_ns): StampTuple) -> Stamp {
    Stamp {
        size,
        mtime_ns,
        ino,
        ctime_ns,
    }
}

fn stamp_tuple(s: Stamp) -> StampTuple {
    (s.size, s.mtime_ns, s.ino, s.ctime_ns)
}

/// Inputs as `featstore.store` passes them: `(name, ("file", path, stamp or None))`,
/// `(name, ("text", bytes))`, `(name, ("absent", path))` or
/// `(name, ("jsonl", path, image_field, field, listed, text bytes))`.
fn parse_inputs(inputs: Vec<(String, Bound<'_, PyAny>)>) -> PyResult<Vec<Input>> {
    inputs
        .into_iter()
        .map(|(name, v)| {
            let kind: String = v.get_item(0)?.extract()?;
            match kind.as_str() {
                "file" => Ok(Input::File {
                    name,
                    path: v.get_item(1)?.extract::<PathBuf>()?,
                    expected: v
                        .get_item(2)?
                        .extract::<Option<StampTuple>>()?
                        .map(stamp_of),
                }),
                "jsonl" => Ok(Input::JsonlLine {
                    name,
                    path: v.get_item(1)?.extract::<PathBuf>()?,
                    fields: featstore_core::jsonl::Fields {
                        image_field: v.get_item(2)?.extract()?,
                        field: v.get_item(3)?.extract()?,
                    },
                    listed: v.get_item(4)?.extract()?,
                    text: v.get_item(5)?.cast::<PyBytes>()?.as_bytes().to_vec(),
                }),
                "text" => Ok(Input::Text {
                    name,
                    text: v.get_item(1)?.cast::<PyBytes>()?.as_bytes().to_vec(),
                }),
                "absent" => Ok(Input::Absent {
                    name,
                    path: v.get_item(1)?.extract::<PathBuf>()?,
                }),
                other => Err(PyValueError::new_err(format!(
                    "input {name:?}: unknown kind {other:?} (file, text or absent)"
                ))),
            }
        })
        .collect()
}

/// `put_many`'s items, as Python gives them: `(rel, tensors, metadata, inputs, expected)`.
type PutItems<'py> = Vec<(
    PathBuf,
    Vec<RawTensor>,
    BTreeMap<String, String>,
    Vec<(String, Bound<'py, PyAny>)>,
    Option<StampTuple>,
)>;

/// A parsed item of a batched write, its tensors apart (the views borrow them).
type ParsedItem = (PathBuf, BTreeMap<String, String>, Vec<Input>, Option<Stamp>);

/// Parses a batch's items: their raw tensors, and the rest of each request.
fn put_items(items: PutItems<'_>) -> PyResult<(Vec<Vec<RawTensor>>, Vec<ParsedItem>)> {
    let mut raws = Vec::with_capacity(items.len());
    let mut requests = Vec::with_capacity(items.len());
    for (rel, tensors, meta, inputs, expected) in items {
        raws.push(tensors);
        requests.push((rel, meta, parse_inputs(inputs)?, expected.map(stamp_of)));
    }
    Ok((raws, requests))
}

/// The core's requests of a parsed batch, viewing the tensors of `raws`.
fn put_batch(requests: Vec<ParsedItem>, raws: &[Vec<RawTensor>]) -> PyResult<Vec<PutRequest<'_>>> {
    let mut batch = Vec::with_capacity(requests.len());
    for ((rel, meta, inputs, expected), raw) in requests.into_iter().zip(raws) {
        batch.push(PutRequest {
            rel,
            // SAFETY: see tensor_views; `featstore.writes` holds the tensors during the call
            // the batch is made for.
            tensors: unsafe { tensor_views(raw)? },
            meta,
            inputs,
            expected,
        });
    }
    Ok(batch)
}

#[pymethods]
impl PyStore {
    #[new]
    #[pyo3(signature = (root, feature, *, cache_dir=None, fingerprint=None, legacy_suffix=None, pread=false))]
    fn new(
        py: Python<'_>,
        root: PathBuf,
        feature: String,
        cache_dir: Option<PathBuf>,
        fingerprint: Option<String>,
        legacy_suffix: Option<String>,
        pread: bool,
    ) -> PyResult<Self> {
        let layout = match cache_dir {
            Some(d) => Layout::Dir {
                cache_dir: std::path::absolute(&d)
                    .map_err(|e| error::to_py(featstore_core::Error::io(&d, e)))?,
            },
            None => Layout::Sidecar,
        };
        let cfg = StoreConfig {
            root,
            feature,
            layout,
            fingerprint,
            legacy_suffix,
            read_mode: read_mode(pread),
        };
        let store = fork::detached(py, || Store::open(cfg)).py_err()?;
        Ok(PyStore {
            inner: Arc::new(store),
        })
    }

    /// The fingerprint this store checks entries against (None: only entries written without
    /// one are served).
    #[getter]
    fn fingerprint(&self) -> Option<String> {
        self.inner.fingerprint().map(str::to_string)
    }

    /// Why an entry written with fingerprint `actual` is foreign to this store (None: it is not).
    fn foreign_reason(&self, actual: &str) -> Option<String> {
        self.inner.foreign_reason(actual)
    }

    #[getter]
    fn manifest_path(&self) -> OsString {
        self.inner.manifest_path().into_os_string()
    }

    #[getter]
    fn state_dir(&self) -> OsString {
        self.inner.state_dir().into_os_string()
    }

    /// True when the manifest (of an earlier version) holds the index inline: the next merge
    /// of journals moves it into a segment.
    #[getter]
    fn holds_inline_index(&self) -> bool {
        self.inner.holds_inline_index()
    }

    #[getter]
    fn index_dir(&self) -> OsString {
        self.inner.index_dir().into_os_string()
    }

    /// The sources the index (as mapped when the store was opened) holds a record of, in byte
    /// order.
    fn indexed_sources(&self, py: Python<'_>) -> Vec<OsString> {
        py.detach(|| {
            self.inner
                .indexed_sources()
                .into_iter()
                .map(PathBuf::into_os_string)
                .collect()
        })
    }

    /// Writes the index records of `rels` (those whose entries this process found valid) as the
    /// whole index, replacing its segments; returns how many it wrote. The records of packed
    /// entries of other sources are kept: the index is the only thing that locates them.
    #[pyo3(signature = (rels, durable=true))]
    fn write_index(&self, py: Python<'_>, rels: Vec<PathBuf>, durable: bool) -> PyResult<usize> {
        use featstore_core::key::path_bytes;
        let mut records: Vec<(Vec<u8>, index::Slot)> = rels
            .iter()
            .filter_map(|r| {
                let rec = self.inner.index_record(r)?;
                Some((path_bytes(r).to_vec(), index::Slot::Entry(rec)))
            })
            .collect();
        let listed: std::collections::HashSet<&[u8]> = rels.iter().map(|r| path_bytes(r)).collect();
        let current = self.inner.index();
        let others: Vec<(Vec<u8>, index::Slot)> = current
            .live()
            .filter(|(k, r)| r.packed.is_some() && !listed.contains(k))
            .map(|(k, r)| (k.to_vec(), index::Slot::Entry(r)))
            .collect();
        records.extend(others);
        let (dir, fp) = (self.inner.index_dir(), self.inner.fingerprint());
        py.detach(|| index::replace(&dir, fp, records, durable))
            .py_err()
    }

    fn entry_path(&self, rel: PathBuf, size: u64, mtime_ns: i64) -> OsString {
        self.inner
            .entry_path(&rel, Stamp::sized(size, mtime_ns))
            .into_os_string()
    }

    /// The check of one source; `deep` digests the source and its inputs whatever their stamps.
    #[pyo3(signature = (rel, deep=false))]
    fn check(&self, py: Python<'_>, rel: PathBuf, deep: bool) -> PyResult<PyCheck> {
        let c = py
            .detach(|| self.inner.check_at(&rel, depth(deep)))
            .py_err()?;
        Ok(PyCheck::of(c, &self.inner))
    }

    /// The state name of one source: the hot path (the GIL is kept: the call is shorter than
    /// releasing it).
    fn state(&self, rel: PathBuf) -> PyResult<&'static str> {
        Ok(self.inner.check(&rel).py_err()?.state.name())
    }

    /// The checks of many sources, in parallel; the state is `"error: ..."` where a check
    /// failed. `deep` as for `check`.
    #[pyo3(signature = (rels, threads=None, progress=None, deep=false))]
    fn check_many_full(
        &self,
        py: Python<'_>,
        rels: Vec<PathBuf>,
        threads: Option<usize>,
        progress: Option<&Bound<'_, Progress>>,
        deep: bool,
    ) -> Vec<PyCheck> {
        let counter = progress_counter(progress);
        let checks = fork::detached(py, || {
            self.inner
                .check_many(&rels, None, depth(deep), threads, &counter, |c| c)
        });
        checks
            .into_iter()
            .map(|c| c.map_or_else(PyCheck::failed, |c| PyCheck::of(c, &self.inner)))
            .collect()
    }

    /// State names of many sources, checked in parallel; `"error: ..."` where a check failed.
    /// `stamps`: each source's stamp as a scan just took it (32 bytes each: size, mtime_ns,
    /// ino, ctime_ns), so that no source is stat'ed a second time.
    #[pyo3(signature = (rels, threads=None, progress=None, stamps=None))]
    fn check_many(
        &self,
        py: Python<'_>,
        rels: Vec<PathBuf>,
        threads: Option<usize>,
        progress: Option<&Bound<'_, Progress>>,
        stamps: Option<&[u8]>,
    ) -> PyResult<Vec<Py<PyString>>> {
        let stamps = match stamps.map(stamps_from_bytes) {
            Some(Some(s)) if s.len() == rels.len() => Some(s),
            None => None,
            Some(_) => {
                return Err(PyValueError::new_err(
                    "stamps must be 32 bytes per source, one per path",
                ))
            }
        };
        let counter = progress_counter(progress);
        let states = fork::detached(py, || {
            self.inner.check_many(
                &rels,
                stamps.as_deref(),
                Depth::Stamps,
                threads,
                &counter,
                |c| c.map(|c| c.state).map_err(|e| e.to_string()),
            )
        });
        // State names as interned Python strings, made once: a million states share a few
        // objects.
        let names: Vec<Py<PyString>> = State::ALL
            .iter()
            .map(|s| PyString::intern(py, s.name()).unbind())
            .collect();
        Ok(states
            .into_iter()
            .map(|s| match s {
                Ok(state) => match State::ALL.iter().position(|&x| x == state) {
                    Some(i) => names[i].clone_ref(py),
                    None => PyString::new(py, state.name()).unbind(),
                },
                Err(e) => PyString::new(py, &format!("error: {e}")).unbind(),
            })
            .collect())
    }

    /// Writes the entry of `rel`; returns `{"path", "source": stamp, "entry": stamp, "racy",
    /// "check_first", "bytes"}` (stamps as `(size, mtime_ns, ino, ctime_ns)`). Tensors as for
    /// `write_entry`; inputs as `parse_inputs` reads them; `expected` is the source's stamp when
    /// the encoder read it.
    #[pyo3(signature = (rel, tensors, metadata, inputs, durable=false, expected=None))]
    #[allow(clippy::too_many_arguments)]
    fn put<'py>(
        &self,
        py: Python<'py>,
        rel: PathBuf,
        tensors: Vec<RawTensor>,
        metadata: BTreeMap<String, String>,
        inputs: Vec<(String, Bound<'py, PyAny>)>,
        durable: bool,
        expected: Option<StampTuple>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let expected = expected.map(stamp_of);
        let inputs = parse_inputs(inputs)?;
        // SAFETY: see tensor_views; `featstore.store` holds the tensors during this call.
        let views = unsafe { tensor_views(&tensors)? };
        let w = py
            .detach(|| {
                self.inner
                    .put(&rel, &views, &metadata, &inputs, durable, expected)
            })
            .py_err()?;
        written_dict(py, w)
    }

    /// Writes a batch of entries in parallel without the GIL (`items`: `(rel, tensors, metadata,
    /// inputs, expected)` as `put` takes them), then with `durable` fsyncs them all before
    /// returning. One result per item: `put`'s dict, or the exception its write raised (the
    /// others are written); a failed fsync raises.
    #[pyo3(signature = (items, durable=false, threads=None))]
    #[allow(clippy::type_complexity)]
    fn put_many<'py>(
        &self,
        py: Python<'py>,
        items: PutItems<'py>,
        durable: bool,
        threads: Option<usize>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let (raws, requests) = put_items(items)?;
        let batch = put_batch(requests, &raws)?;
        let results =
            fork::detached(py, || self.inner.put_many(&batch, durable, threads)).py_err()?;
        results
            .into_iter()
            .map(|r| match r {
                Ok(w) => Ok(written_dict(py, w)?.into_any()),
                Err(e) => Ok(error::to_py(e).into_value(py).into_bound(py).into_any()),
            })
            .collect()
    }

    /// Writes a batch of entries into `stream`'s open pack (`items` as `put_many` takes them),
    /// in parallel without the GIL. One result per item: the entry's length in bytes, or the
    /// exception its write raised. Nothing is served until `seal_pack_stream` indexes the pack.
    #[pyo3(signature = (stream, items, threads=None))]
    #[allow(clippy::type_complexity)]
    fn put_many_packed<'py>(
        &self,
        py: Python<'py>,
        stream: &packs::PyPackStream,
        items: PutItems<'py>,
        threads: Option<usize>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let (raws, requests) = put_items(items)?;
        let batch = put_batch(requests, &raws)?;
        let results = fork::detached(py, || {
            self.inner.put_many_packed(&stream.inner, &batch, threads)
        });
        results
            .into_iter()
            .map(|r| match r {
                Ok(n) => Ok(n.into_pyobject(py)?.into_any()),
                Err(e) => Ok(error::to_py(e).into_value(py).into_bound(py).into_any()),
            })
            .collect()
    }

    /// Seals `stream`'s open pack when it is due (`force`: whatever it holds) and indexes its
    /// entries; returns their index records (for the journal), empty when nothing was sealed.
    #[pyo3(signature = (stream, force=false, durable=true))]
    fn seal_pack_stream(
        &self,
        py: Python<'_>,
        stream: &packs::PyPackStream,
        force: bool,
        durable: bool,
    ) -> PyResult<Vec<PyIndexRecord>> {
        let sealed = fork::detached(py, || {
            self.inner.seal_pack_stream(&stream.inner, force, durable)
        })
        .py_err()?;
        Ok(sealed
            .into_iter()
            .map(|(rel, r)| PyIndexRecord::new(rel, r))
            .collect())
    }

    /// The tensors of `rel`'s entry as `[(name, dltensor capsule)]`, or None unless it is valid.
    fn read<'py>(&self, py: Python<'py>, rel: PathBuf) -> PyResult<Option<Capsules<'py>>> {
        // The hot path keeps the GIL (shorter than releasing it); the slow one, which parses the
        // header and may digest the source, releases it.
        let entry = match self.inner.open_known(&rel).py_err()? {
            Some(e) => Some(e),
            None => fork::detached(py, || self.inner.open_checked(&rel)).py_err()?,
        };
        match entry {
            Some(e) => Ok(Some(tensors_of(py, &e)?)),
            None => Ok(None),
        }
    }

    /// The tensors of the history `rels`' entry as `[(name, dltensor capsule)]` when its frames'
    /// stamps alone vouch for it (`Store::open_history_trusted`), else None: the caller then
    /// judges it in full. The frames come as `str` (a relative path as the store names it):
    /// borrowing a `str`'s UTF-8 is a fraction of extracting a path, which a 64-frame lookup would feel.
    fn read_history<'py>(
        &self,
        py: Python<'py>,
        rels: Vec<PyBackedStr>,
    ) -> PyResult<Option<Capsules<'py>>> {
        let rels: Vec<&str> = rels.iter().map(|r| &**r).collect();
        match fork::detached(py, || self.inner.open_history_trusted(&rels)) {
            Some(e) => Ok(Some(tensors_of(py, &e)?)),
            None => Ok(None),
        }
    }

    /// Reads tensor `name` of many entries into one buffer (`data_ptr`, `nbytes`: a contiguous
    /// CPU tensor the caller holds), in parallel without the GIL. Returns None per filled slot,
    /// else why it was not filled.
    #[pyo3(signature = (rels, name, dtype, shape, data_ptr, nbytes, threads=None))]
    #[allow(clippy::too_many_arguments)]
    fn read_batch(
        &self,
        py: Python<'_>,
        rels: Vec<PathBuf>,
        name: String,
        dtype: String,
        shape: Vec<u64>,
        data_ptr: usize,
        nbytes: usize,
        threads: Option<usize>,
    ) -> PyResult<Vec<Option<String>>> {
        let dtype = parse_dtype(&dtype)?;
        let per_item = shape.iter().product::<u64>() * dtype.size() as u64;
        if per_item * rels.len() as u64 != nbytes as u64 {
            return Err(PyValueError::new_err(format!(
                "the batch buffer holds {nbytes} bytes, {} entries of {} {:?} need {}",
                rels.len(),
                dtype.name(),
                shape,
                per_item * rels.len() as u64
            )));
        }
        let results = fork::detached(py, || {
            // SAFETY: the caller passes the data pointer of a contiguous tensor of nbytes bytes
            // that it holds, and nothing else writes, for the duration of this call.
            // An empty tensor's data pointer may be null, which no slice may hold.
            let out: &mut [u8] = if nbytes == 0 {
                &mut []
            } else {
                unsafe { std::slice::from_raw_parts_mut(data_ptr as *mut u8, nbytes) }
            };
            self.inner
                .read_batch(&rels, &name, dtype, &shape, out, threads)
        });
        Ok(results.into_iter().map(|r| r.err()).collect())
    }

    /// Removes `rel`'s entry; True if a file was removed.
    fn remove(&self, py: Python<'_>, rel: PathBuf) -> PyResult<bool> {
        fork::detached(py, || self.inner.remove(&rel)).py_err()
    }

    /// Manifest index records `(rel, [source size, mtime_ns, entry size, mtime_ns, racy])` of the
    /// given sources whose entries this process found valid.
    fn index_records(&self, rels: Vec<PathBuf>) -> Vec<PyIndexRecord> {
        rels.into_iter()
            .filter_map(|r| {
                let rec = self.inner.index_record(&r)?;
                Some(PyIndexRecord::new(r, rec))
            })
            .collect()
    }

    /// Whether any entry this process found valid was judged outside the index (else
    /// `unindexed_records` of any list is empty).
    fn judged_outside_the_index(&self) -> bool {
        self.inner.judged_outside_the_index()
    }

    /// Like `index_records`, for the sources whose entries this process judged valid itself (or
    /// wrote) rather than taking them from the manifest's index: the records the manifest may
    /// lack (entries a killed run wrote before journaling them, refreshed stamps).
    fn unindexed_records(&self, rels: Vec<PathBuf>) -> Vec<PyIndexRecord> {
        rels.into_iter()
            .filter_map(|r| {
                let rec = self.inner.unindexed_record(&r)?;
                Some(PyIndexRecord::new(r, rec))
            })
            .collect()
    }

    /// For each `(rel, inputs now)`: whether the inputs its entry recorded differ from what the
    /// encoder would read now (names, texts, files and `.jsonl` lines taken from elsewhere), in
    /// parallel without the GIL. Inputs: `(name, ("text", bytes))`, `(name, ("file", path))`,
    /// `(name, ("absent",))`, `(name, ("jsonl", path, listed))`.
    #[pyo3(signature = (items, threads=None))]
    fn inputs_differ_many(
        &self,
        py: Python<'_>,
        items: Vec<(PathBuf, NamedInputs<'_>)>,
        threads: Option<usize>,
    ) -> PyResult<Vec<bool>> {
        let mut parsed = Vec::with_capacity(items.len());
        for (rel, inputs) in items {
            let mut now = Vec::with_capacity(inputs.len());
            for (name, v) in inputs {
                let kind: String = v.get_item(0)?.extract()?;
                now.push(match kind.as_str() {
                    "text" => NowInput::Text {
                        name,
                        text: v.get_item(1)?.cast::<PyBytes>()?.as_bytes().to_vec(),
                    },
                    "file" => NowInput::File {
                        name,
                        path: v.get_item(1)?.extract()?,
                    },
                    "absent" => NowInput::Absent { name },
                    "jsonl" => NowInput::Line {
                        name,
                        path: v.get_item(1)?.extract()?,
                        listed: v.get_item(2)?.extract()?,
                    },
                    other => {
                        return Err(PyValueError::new_err(format!(
                            "input {name:?}: unknown kind {other:?}"
                        )))
                    }
                });
            }
            parsed.push((rel, now));
        }
        Ok(fork::detached(py, || {
            self.inner.inputs_differ_many(&parsed, threads)
        }))
    }

    /// Forgets what this process remembers about `rel`.
    fn forget(&self, rel: PathBuf) {
        self.inner.forget(&rel)
    }

    /// Where the feature's packs are.
    #[getter]
    fn packs_dir(&self) -> OsString {
        self.inner.packs_dir().into_os_string()
    }

    /// Moves the valid entries of `rels` in files of their own into packs of about
    /// `target_size` bytes (see `packs::pack_entries`).
    #[pyo3(signature = (rels, target_size, durable=true, progress=None))]
    fn pack_entries(
        &self,
        py: Python<'_>,
        rels: Vec<PathBuf>,
        target_size: u64,
        durable: bool,
        progress: Option<&Bound<'_, Progress>>,
    ) -> PyResult<packs::PackReport> {
        packs::pack_entries(py, &self.inner, rels, target_size, durable, progress)
    }

    /// Drops packed entries from the index: `[(rel, pack path, offset, length)]`, those the
    /// index still places there; returns, per entry, whether it was dropped.
    fn drop_packed(
        &self,
        py: Python<'_>,
        entries: Vec<(PathBuf, PathBuf, u64, u64)>,
    ) -> PyResult<Vec<bool>> {
        packs::drop_packed(py, &self.inner, entries)
    }

    /// Every pack of the feature and which of its entries the index still places in it:
    /// `[(pack path, size, [(rel bytes, offset, length)] of live entries, entries in its table)]`
    /// (a pack whose table cannot be read lists none, and -1 entries).
    fn pack_usage(&self, py: Python<'_>) -> PyResult<Vec<packs::PackUsage>> {
        packs::pack_usage(py, &self.inner)
    }

    /// Rewrites the pack at `path` with only its live entries (`pack_usage`'s list), then
    /// removes it if it is still the file of stamp `identity`; returns `(new packs, records)`.
    #[pyo3(signature = (path, identity, live, durable=true))]
    fn repack(
        &self,
        py: Python<'_>,
        path: PathBuf,
        identity: StampTuple,
        live: Vec<(Vec<u8>, u64, u64)>,
        durable: bool,
    ) -> PyResult<(Vec<OsString>, usize)> {
        packs::repack(py, &self.inner, path, identity, live, durable)
    }
}

/// Removes the file at `path` if it is still the one judged (`identity`, the stamp a check
/// returned); False, and nothing removed, when another file is there now or none is.
#[pyfunction]
fn remove_judged(py: Python<'_>, path: PathBuf, identity: StampTuple) -> PyResult<bool> {
    fork::detached(py, || {
        featstore_core::judged::remove_judged(&path, stamp_of(identity))
    })
    .py_err()
}

/// Moves the file at `path` to `dest` if it is still the one judged; False otherwise.
#[pyfunction]
fn move_judged(
    py: Python<'_>,
    path: PathBuf,
    dest: PathBuf,
    identity: StampTuple,
) -> PyResult<bool> {
    fork::detached(py, || {
        featstore_core::judged::move_judged(&path, &dest, stamp_of(identity))
    })
    .py_err()
}

/// The threads featstore uses by default (one per core).
#[pyfunction]
fn default_threads() -> usize {
    pool::default_threads()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "STATES",
        featstore_core::store::State::ALL
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>(),
    )?;
    error::register(m)?;
    fork::install();
    m.add("DEFAULT_EXTENSIONS", scan::DEFAULT_EXTENSIONS.to_vec())?;
    m.add("RACY_WINDOW_NS", featstore_core::store::RACY_WINDOW_NS)?;
    m.add("MAX_HEADER_LEN", featstore_core::entry::MAX_HEADER_LEN)?;
    m.add_class::<Progress>()?;
    m.add_class::<PyStore>()?;
    m.add_class::<PyCheck>()?;
    m.add_class::<PyIndexRecord>()?;
    m.add_class::<packs::PyPackStream>()?;
    for f in [
        wrap_pyfunction!(scan_sources, m)?,
        wrap_pyfunction!(stamp_key, m)?,
        wrap_pyfunction!(file_digest, m)?,
        wrap_pyfunction!(bytes_digest, m)?,
        wrap_pyfunction!(file_digests, m)?,
        wrap_pyfunction!(history_links, m)?,
        wrap_pyfunction!(history_contents, m)?,
        wrap_pyfunction!(history_chains, m)?,
        wrap_pyfunction!(jsonl_field, m)?,
        wrap_pyfunction!(history_content_chain, m)?,
        wrap_pyfunction!(legacy_sha256_key, m)?,
        wrap_pyfunction!(legacy_sha256_keys, m)?,
        wrap_pyfunction!(write_entry, m)?,
        wrap_pyfunction!(read_header, m)?,
        wrap_pyfunction!(read_entry, m)?,
        wrap_pyfunction!(verify_entry, m)?,
        wrap_pyfunction!(is_network_fs, m)?,
        wrap_pyfunction!(release_freed_memory, m)?,
        wrap_pyfunction!(read_manifest, m)?,
        wrap_pyfunction!(write_manifest, m)?,
        wrap_pyfunction!(journal_path, m)?,
        wrap_pyfunction!(append_journal, m)?,
        wrap_pyfunction!(sync_all, m)?,
        wrap_pyfunction!(merge_journals, m)?,
        wrap_pyfunction!(default_threads, m)?,
        wrap_pyfunction!(remove_judged, m)?,
        wrap_pyfunction!(move_judged, m)?,
    ] {
        m.add_function(f)?;
    }
    Ok(())
}
