//! The one error type of the core. Every variant carries the path (or value) it is about, so the
//! bindings can raise a Python exception that names it and says what to do.

use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong in featstore-core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on `path`; the bindings keep the OS error type
    /// (`FileNotFoundError`, `PermissionError`, ...).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An entry file that is not a valid featstore/safetensors file.
    #[error("corrupt entry {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A manifest or journal that cannot be read.
    #[error("bad manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    /// The data root to scan is missing or not a directory.
    #[error("data root {path}: {reason}")]
    DataRoot { path: PathBuf, reason: String },
    /// A source path that does not lie inside the data root.
    #[error("{path} is outside the data root {root}")]
    OutsideRoot { path: PathBuf, root: PathBuf },
    /// A sidecar would be written outside the data root: the source's directory is reached
    /// through a symbolic link inside the root that leads elsewhere (someone else's tree).
    #[error("{} lies outside the data root {} (a symbolic link inside the root leads to {}): featstore reads through such links but writes only inside the data root; keep entries in a cache directory instead (--cache-dir DIR, FeatureStore(..., cache_dir=DIR))", dir.display(), root.display(), real.display())]
    WriteOutsideRoot {
        dir: PathBuf,
        real: PathBuf,
        root: PathBuf,
    },
    /// A source changed between the moment the encoder read it and the moment its entry was to
    /// be written: the features belong to other bytes, so nothing was written.
    #[error("{} changed {what}", path.display())]
    SourceChanged { path: PathBuf, what: String },
    /// An entry's file name would be longer than the file system allows.
    #[error("{}: {why}", path.display())]
    NameTooLong { path: PathBuf, why: String },
    /// A path featstore would read (a source, frame, caption, control image, weights file) that
    /// is not a regular file: a FIFO, socket, device or directory. Found without opening it for
    /// a blocking read.
    #[error("{} is not a regular file ({kind}): featstore reads only regular files; put the file itself there, or leave it out", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    /// An entry whose header would exceed the readers' limit: refused before anything is written.
    #[error("{0}")]
    HeaderTooLarge(String),
    /// A caller passed a value the core cannot use (unknown dtype, inconsistent sizes, ...).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl AsRef<Path>, source: io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A corrupt-entry error for `path` with a human-readable reason.
    pub fn corrupt(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.as_ref().to_path_buf(),
            reason: reason.into(),
        }
    }

    /// True when this is an I/O error of the given kind (used to tell "missing" from "broken").
    pub fn is_io_kind(&self, kind: io::ErrorKind) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == kind)
    }
}

/// Adds the path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
