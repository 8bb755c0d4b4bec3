//! The Python exceptions of featstore's core errors, created once here: each core error variant
//! maps to one class in [`to_py`], so renaming a class is a compile error, not a surprise at
//! raise time. `featstore.errors` re-exports these classes beside its Python-only ones.

use pyo3::exceptions::{PyException, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use featstore_core::Error;

pyo3::create_exception!(
    featstore.errors,
    FeatstoreError,
    PyException,
    "Base class of every error featstore raises deliberately."
);
pyo3::create_exception!(
    featstore.errors,
    CorruptEntryError,
    FeatstoreError,
    "An entry file is unreadable or invalid (truncated, malformed header, bad checksum)."
);
pyo3::create_exception!(
    featstore.errors,
    ManifestError,
    FeatstoreError,
    "A manifest or journal file is unreadable or of an unknown format."
);
pyo3::create_exception!(
    featstore.errors,
    SourceChangedError,
    FeatstoreError,
    "A source changed between the moment the encoder read it and the moment its entry was to be \
     written: the features belong to other bytes, so nothing was written."
);

/// A class with two bases (a featstore error that is also an OS or value error, so `except
/// OSError` keeps working), built once; `create_exception!` takes a single base.
fn two_based(
    py: Python<'_>,
    cell: &'static PyOnceLock<Py<PyType>>,
    name: &str,
    other: Bound<'_, PyType>,
    doc: &str,
) -> PyResult<Py<PyType>> {
    cell.get_or_try_init(py, || {
        let bases = PyTuple::new(py, [py.get_type::<FeatstoreError>(), other])?;
        let attrs = PyDict::new(py);
        attrs.set_item("__module__", "featstore.errors")?;
        attrs.set_item("__doc__", doc)?;
        let cls = py
            .get_type::<PyType>()
            .call1((name, bases, attrs))?
            .cast_into::<PyType>()?;
        Ok(cls.unbind())
    })
    .map(|t| t.clone_ref(py))
}

static DATA_ROOT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static PATH_OUTSIDE_ROOT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static NOT_A_REGULAR_FILE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// `DataRootError(FeatstoreError, OSError)`: the data root does not exist or is not a directory.
pub fn data_root_error(py: Python<'_>) -> PyResult<Py<PyType>> {
    two_based(
        py,
        &DATA_ROOT_ERROR,
        "DataRootError",
        py.get_type::<PyOSError>(),
        "The data root does not exist or is not a directory.",
    )
}

/// `PathOutsideRootError(FeatstoreError, ValueError)`: a source path outside the data root.
pub fn path_outside_root_error(py: Python<'_>) -> PyResult<Py<PyType>> {
    two_based(
        py,
        &PATH_OUTSIDE_ROOT_ERROR,
        "PathOutsideRootError",
        py.get_type::<PyValueError>(),
        "A source path does not lie inside the store's data root.",
    )
}

/// `NotARegularFileError(FeatstoreError, OSError)`: a FIFO, socket, device or directory where
/// featstore would read a file (never opened for a blocking read).
pub fn not_a_regular_file_error(py: Python<'_>) -> PyResult<Py<PyType>> {
    two_based(
        py,
        &NOT_A_REGULAR_FILE_ERROR,
        "NotARegularFileError",
        py.get_type::<PyOSError>(),
        "A path featstore would read is a FIFO, socket, device or directory, not a regular file.",
    )
}

/// Adds every class to the module (at import, so a failure shows there, not at a raise).
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("FeatstoreError", py.get_type::<FeatstoreError>())?;
    m.add("CorruptEntryError", py.get_type::<CorruptEntryError>())?;
    m.add("ManifestError", py.get_type::<ManifestError>())?;
    m.add("SourceChangedError", py.get_type::<SourceChangedError>())?;
    m.add("DataRootError", data_root_error(py)?)?;
    m.add("PathOutsideRootError", path_outside_root_error(py)?)?;
    m.add("NotARegularFileError", not_a_regular_file_error(py)?)?;
    Ok(())
}

fn raise(cls: PyResult<Py<PyType>>, msg: String) -> PyErr {
    Python::attach(|py| match cls {
        Ok(t) => PyErr::from_type(t.into_bound(py), msg),
        Err(e) => e,
    })
}

/// Converts a core error into the Python exception a user can act on. OS errors keep their
/// Python types (OSError picks FileNotFoundError, PermissionError, ... from the errno).
pub fn to_py(err: Error) -> PyErr {
    match err {
        Error::Io { path, source } => match errno_of(&source) {
            Some(errno) => {
                PyOSError::new_err((errno, source.to_string(), path.display().to_string()))
            }
            None => PyOSError::new_err(format!("{}: {source}", path.display())),
        },
        Error::NameTooLong { path, why } => {
            PyOSError::new_err((libc_errno::ENAMETOOLONG, why, path.display().to_string()))
        }
        e @ Error::Corrupt { .. } => CorruptEntryError::new_err(e.to_string()),
        e @ Error::Manifest { .. } => ManifestError::new_err(e.to_string()),
        e @ Error::SourceChanged { .. } => SourceChangedError::new_err(e.to_string()),
        e @ Error::DataRoot { .. } => raise(Python::attach(data_root_error), e.to_string()),
        e @ (Error::OutsideRoot { .. } | Error::WriteOutsideRoot { .. }) => {
            raise(Python::attach(path_outside_root_error), e.to_string())
        }
        e @ Error::NotRegular { .. } => {
            raise(Python::attach(not_a_regular_file_error), e.to_string())
        }
        Error::Invalid(msg) | Error::HeaderTooLarge(msg) => FeatstoreError::new_err(msg),
    }
}

/// The errno behind an I/O error. Wrapped errors (tempfile adds the path to its errors) carry
/// no raw errno, so their kind is mapped back.
fn errno_of(e: &std::io::Error) -> Option<i32> {
    use std::io::ErrorKind::*;
    e.raw_os_error().or(match e.kind() {
        NotFound => Some(libc_errno::ENOENT),
        PermissionDenied => Some(libc_errno::EACCES),
        ReadOnlyFilesystem => Some(libc_errno::EROFS),
        StorageFull => Some(libc_errno::ENOSPC),
        AlreadyExists => Some(libc_errno::EEXIST),
        NotADirectory => Some(libc_errno::ENOTDIR),
        IsADirectory => Some(libc_errno::EISDIR),
        FileTooLarge => Some(libc_errno::EFBIG),
        _ => None,
    })
}

/// Linux errno values (stable ABI constants).
mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const EACCES: i32 = 13;
    pub const EEXIST: i32 = 17;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const ENAMETOOLONG: i32 = 36;
}
