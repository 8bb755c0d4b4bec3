"""Naming sources by their path relative to a data root.

Paths given to the API may be relative to the root or absolute inside it, also when the root is
reached under another name (a symlinked root, or its real path). A path outside the root is an
error, never a silent miss.
"""

from __future__ import annotations

import os

from featstore.errors import PathOutsideRootError


class SourceNames:
    """The relative names of sources under one data root (``root``, absolute)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._prefix = root.rstrip(os.sep) + os.sep
        # Other spellings of the root met so far (a symlink to it, its real path): at most a few.
        self._aliases: list[str] = []

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
