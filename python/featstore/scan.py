"""Finding the sources of a data root (the Rust core walks and stats in parallel)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from featstore import _core
from featstore.errors import NoImagesFoundError
from featstore.progress import run_with_progress
from featstore.vocabulary import sidecar_suffix

DEFAULT_EXTENSIONS: tuple[str, ...] = tuple(_core.DEFAULT_EXTENSIONS)



@dataclass
class ScanResult:
    """Sources found under a data root.

    Attributes
    ----------
    paths : list of str
        Paths relative to the root, POSIX separators, sorted.
    sizes : numpy.ndarray of uint64
        File sizes in bytes, aligned with ``paths``.
    mtimes_ns : numpy.ndarray of int64
        Modification times in nanoseconds since the epoch, aligned with ``paths``.
    errors : list of (str, str)
        ``(path, reason)`` for what could not be scanned (unreadable directory, symlink loop,
        a listed file that does not exist). Not fatal.
    sets : list of list of str
        Ordered groups of relative paths, one per ``.jsonl`` line whose field is a list.
    root : str
        The absolute data root.
    named : list of str or None
        With ``named_suffix``: the files named so, relative, sorted (found without a ``stat``);
        None when not asked for.
    stamps : numpy.ndarray of uint64, shape (N, 4), or None
        With ``scan(..., stamps=True)``: each source's whole stamp as the scan's ``stat`` took
        it (size, mtime_ns, ino, ctime_ns), aligned with ``paths``: ``status`` checks with it
        instead of a second ``stat``.
    """

    paths: list[str]
    sizes: np.ndarray
    mtimes_ns: np.ndarray
    errors: list[tuple[str, str]] = field(default_factory=list)
    sets: list[list[str]] = field(default_factory=list)
    root: str = ""
    named: list[str] | None = None
    stamps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def total_bytes(self) -> int:
        """Sum of the source sizes in bytes."""
        return int(self.sizes.sum()) if len(self.sizes) else 0

    def without_entries_of(self, feature: str) -> ScanResult:
        """The sources but the feature's own sidecar entries (``<source>.<feature>.safetensors``):
        an entry is never a source, whatever ``--ext`` says (else every run would encode the
        last run's entries)."""
        suffix = sidecar_suffix(feature)
        keep = [i for i, p in enumerate(self.paths) if not p.endswith(suffix)]
        if len(keep) == len(self.paths):
            return self
        index = np.asarray(keep, dtype=np.int64)
        sets = [s for s in self.sets if not any(m.endswith(suffix) for m in s)]
        return ScanResult([self.paths[i] for i in keep], self.sizes[index], self.mtimes_ns[index], self.errors,
                          sets, self.root, self.named, None if self.stamps is None else self.stamps[index])

    def by_extension(self) -> dict[str, tuple[int, int]]:
        """``{".jpg": (count, bytes), ...}`` with extensions in lower case."""
        out: dict[str, list[int]] = {}
        for p, s in zip(self.paths, self.sizes.tolist(), strict=True):
            ext = os.path.splitext(p)[1].lower()
            c = out.setdefault(ext, [0, 0])
            c[0] += 1
            c[1] += s
        return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def nothing_found(found: ScanResult, *, extensions: Sequence[str] | None = None, jsonl: str | None = None,
                  files_from: str | os.PathLike[str] | None = None) -> NoImagesFoundError:
    """The error for a scan that found nothing: the root, what was searched, what to try."""
    searched = (f"the field {jsonl!r} of the .jsonl files" if jsonl
                else f"the files listed in {files_from}" if files_from
                else "files with extensions " + ", ".join(extensions or DEFAULT_EXTENSIONS))
    unreadable = (f" ({len(found.errors)} paths could not be read, e.g. {found.errors[0][0]}: {found.errors[0][1]})"
                  if found.errors else "")
    return NoImagesFoundError(f"no images found under {found.root}: searched {searched}. Check DATA_ROOT, or pass "
                              f"--ext / --jsonl FIELD for other sources{unreadable}")


def scan(root: str | os.PathLike[str], *, extensions: Sequence[str] | None = None, jsonl: str | None = None,
         follow_symlinks: bool = True, files_from: str | os.PathLike[str] | None = None,
         skip_dirs: Sequence[str | os.PathLike[str]] = (), threads: int | None = None,
         progress: bool | None = False, named_suffix: str | None = None, stamps: bool = False) -> ScanResult:
    """Finds the sources under ``root``.

    Parameters
    ----------
    root : path
        The data root (a directory).
    extensions : sequence of str, optional
        File extensions to collect, without case (default: jpg, jpeg, png, webp, bmp, tif, tiff).
    jsonl : str, optional
        Instead of walking for images, read this field of every line of every ``.jsonl`` file
        under the root: a path or a list of paths, relative to the jsonl's folder or to the root.
        Each list becomes one entry of ``sets``.
    follow_symlinks : bool
        Follow symbolic links (loops are reported in ``errors``).
    files_from : path, optional
        A text file with one source path per line (relative to the root or absolute inside it);
        only those are stat'ed.
    skip_dirs : sequence of paths
        Directories to leave out (a cache directory inside the data root).
    threads : int, optional
        Worker threads (default: one per core).
    progress : bool or None
        Show a progress counter on stderr for long scans (None: only on a terminal).
    named_suffix : str, optional
        Also list the files whose name ends with this (``.vggt.safetensors``: a feature's
        sidecar entries) in ``named``, in the same walk and without a ``stat`` (a tree scan only).
    stamps : bool
        Also return each source's whole stamp (``ScanResult.stamps``, 32 bytes per source),
        for checks that then need no ``stat`` of their own (``status``).

    Raises
    ------
    DataRootError
        The root does not exist or is not a directory.
    """
    root_abs = os.path.abspath(os.fspath(root))
    listed = None
    if files_from is not None:
        with open(files_from, encoding="utf-8") as f:
            listed = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if progress is None:
        progress = sys.stderr.isatty()
    paths, sizes, mtimes, errors, sets, named, stamps_bytes = run_with_progress(
        lambda p: _core.scan(root_abs, extensions=list(extensions or []), follow_symlinks=follow_symlinks,
                             skip_dirs=[os.path.abspath(os.fspath(d)) for d in skip_dirs], jsonl=jsonl,
                             listed=listed, threads=threads, progress=p, named_suffix=named_suffix,
                             with_stamps=stamps),
        desc=f"scanning {root_abs}", show=progress)
    return ScanResult(paths=paths, sizes=np.frombuffer(sizes, dtype="<u8").copy(),
                      mtimes_ns=np.frombuffer(mtimes, dtype="<i8").copy(), errors=list(errors),
                      sets=sets, root=root_abs, named=named if named_suffix else None,
                      stamps=np.frombuffer(stamps_bytes, dtype="<u8").reshape(-1, 4).copy() if stamps else None)
