"""Naming sources by their path relative to a data root, and the one rule for paths users give.

Paths given to the store API may be relative to the root or absolute inside it, also when the
root is reached under another name (a symlinked root, or its real path). A path outside the root
is an error, never a silent miss.

Paths a user's samples or command line give (``CachedDataset``'s ``path_fn``, ``paths`` and
``history_fn``; ``featstore explain``) follow one rule (:func:`reading_of`): absolute as they
are; relative to the data root; or relative to the working directory when only that names a file
and it lies inside the root (``glob("data/**/*.jpg")`` with the root ``data``). A path that names
one file either way is refused, naming both.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from featstore.errors import AmbiguousPathError, PathOutsideRootError


def _all_normal(joined: str) -> bool:
    """Whether every path of ``joined`` (NUL-separated: NUL cannot be part of a path) is already
    relative and normal, as :meth:`SourceNames.rels` takes them: none absolute, starting with
    ``./`` or ``../``, being ``..``, holding ``/.`` or ``//``, or ending with ``/``. Substring
    tests run in C: a history's 64 frames cost a few microseconds on every lookup."""
    bounded = "\0" + joined + "\0"
    return not any(bad in bounded for bad in ("\0/", "\0./", "\0../", "\0..\0", "/.", "//", "/\0"))


#: How a relative path a user gave is read: relative to the data root, or to the working directory.
ROOT, CWD = "root", "cwd"


def reading_of(root: str, path: str | os.PathLike[str], cwd: str | None = None) -> str | None:
    """How the relative ``path`` names a file: ``ROOT`` when ``<root>/<path>`` exists, ``CWD``
    when only ``<cwd>/<path>`` does and lies inside ``root``, None when the path is absolute,
    both readings are one file, or neither exists (a deleted source: read relative to the root).

    Raises
    ------
    AmbiguousPathError
        Both readings exist and are different files.
    """
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if os.path.isabs(p):
        return None
    from_root = os.path.normpath(os.path.join(root, p))
    from_cwd = os.path.normpath(os.path.join(cwd or os.getcwd(), p))
    prefix = root.rstrip(os.sep) + os.sep
    if from_cwd == from_root or not from_cwd.startswith(prefix):
        return None
    in_root, in_cwd = os.path.lexists(from_root), os.path.lexists(from_cwd)
    if in_root and in_cwd:
        raise AmbiguousPathError(
            f"the source path {p!r} names {from_root} (relative to the data root) and {from_cwd} (relative to "
            f"the working directory), two files: give absolute paths, or paths relative to the data root {root}")
    return ROOT if in_root else CWD if in_cwd else None


class SourceNames:
    """The relative names of sources under one data root (``root``, absolute)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._prefix = root.rstrip(os.sep) + os.sep
        # Other spellings of the root met so far (a symlink to it, its real path): at most a few.
        self._aliases: list[str] = []

    def rels(self, paths: Iterable[str | os.PathLike[str]]) -> list[str]:
        """:meth:`rel` of many paths. Paths that are already relative and normal (a scan's, a
        manifest's) are taken as they are: a million of them cost a pass, not a million calls."""
        if isinstance(paths, (list, tuple)):
            # One pass over all of them in C (a history's frames on every lookup, a million
            # sources for status); NUL cannot be part of a path, so it separates them. Joining
            # refuses anything but str (bytes, PathLike): those go the long way below.
            try:
                joined = "\0".join(paths)
            except TypeError:
                joined = None
            if joined is not None and _all_normal(joined):
                return list(paths)
        out = []
        for p in paths:
            if type(p) is str and not p.startswith(("/", "./", "../")) and p != ".." and "/." not in p \
                    and "//" not in p and not p.endswith("/"):
                out.append(p)
            else:
                out.append(self.rel(p))
        return out

    def rel(self, path: str | os.PathLike[str]) -> str:
        """The path of a source relative to the data root (absolute paths must lie inside it)."""
        p = os.fspath(path)
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        if p.startswith(self._prefix):
            p = p[len(self._prefix):]
        elif os.path.isabs(p):
            inside = self._under_root(p)
            if inside is None:
                raise PathOutsideRootError(f"{p} is outside the data root {self.root}; "
                                           "open a store on a root that contains it")
            p = inside
        # Only spellings that normalize to another path pay for normpath (keys hash the bytes).
        if p.startswith(("./", "..")) or "/." in p or "//" in p or p.endswith("/"):
            norm = os.path.normpath(p)
            if norm == ".." or norm.startswith("../"):
                raise PathOutsideRootError(f"{path} is outside the data root {self.root}")
            p = norm
        return p

    def _under_root(self, p: str) -> str | None:
        """``p`` relative to the root when one of its parent directories is the root under another
        name (a symlinked root, or the root's real path), else None. Such a spelling is remembered,
        so later paths pay a string comparison."""
        for alias in self._aliases:
            if p.startswith(alias):
                return p[len(alias):]
        try:
            root = os.stat(self.root)
        except OSError:
            return None
        d = os.path.dirname(p)
        while True:
            try:
                st = os.stat(d)
                same = (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino)
            except OSError:
                same = False
            if same:
                alias = d.rstrip(os.sep) + os.sep
                if len(self._aliases) < 8:
                    self._aliases.append(alias)
                return p[len(alias):]
            parent = os.path.dirname(d)
            if parent == d:
                return None
            d = parent
