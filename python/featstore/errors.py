"""The featstore exception family.

Every error featstore raises on purpose is a :class:`FeatstoreError`. Errors that are really
operating-system errors keep their Python types as well (a read-only data root is both a
``FeatstoreError`` and a ``PermissionError``), so ``except PermissionError`` keeps working.
Messages name the offending path or value and say what to do about it.

The classes the Rust core raises are created once in the extension (``rust/py/src/error.rs``)
and re-exported here; the others are defined here. Either way there is one definition of each.
"""

from __future__ import annotations

from featstore._core import (
    CorruptEntryError,
    DataRootError,
    FeatstoreError,
    ManifestError,
    NotARegularFileError,
    PathOutsideRootError,
    SourceChangedError,
)


class StaleEntryError(FeatstoreError):
    """An entry exists but one of its inputs changed since it was written."""


class BatchReadError(StaleEntryError):
    """Some entries of a batch could not be read (missing, stale, foreign, corrupt, another
    shape). ``failed`` lists ``(index, path, reason)``; ``out`` is the batch tensor, filled
    everywhere else."""

    def __init__(self, message: str, failed: list[tuple[int, str, str]], out: object) -> None:
        super().__init__(message)
        self.failed = failed
        self.out = out


class TensorNameError(FeatstoreError, KeyError):
    """Entries hold no tensor of the name asked for; the message names the tensors they hold."""

    def __str__(self) -> str:  # the message as written, not KeyError's repr of it
        return str(self.args[0]) if self.args else ""


class ForeignEntryError(FeatstoreError):
    """An entry was written with another encoder fingerprint than the store expects."""


class CheckpointError(FeatstoreError):
    """A model checkpoint is missing, unreadable, or does not fit the model."""


class NoImagesFoundError(FeatstoreError):
    """A scan found no source files to work on."""


class AmbiguousPathError(FeatstoreError, ValueError):
    """A relative source path names one file relative to the data root and another relative to
    the working directory: featstore will not guess which one the sample means."""


class ReadOnlyDataRootError(FeatstoreError, PermissionError):
    """A sidecar entry could not be written because the data root is read-only."""


class LockHeldError(FeatstoreError):
    """Another live process holds the lock of this feature."""


__all__ = [
    "FeatstoreError",
    "CorruptEntryError",
    "StaleEntryError",
    "BatchReadError",
    "TensorNameError",
    "ForeignEntryError",
    "CheckpointError",
    "DataRootError",
    "NoImagesFoundError",
    "ManifestError",
    "PathOutsideRootError",
    "NotARegularFileError",
    "ReadOnlyDataRootError",
    "AmbiguousPathError",
    "LockHeldError",
    "SourceChangedError",
]
