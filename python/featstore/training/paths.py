"""How a :class:`CachedDataset` reads the source paths its samples give (the rule of
:mod:`featstore.roots`): decided once when the dataset is built, from the paths it can see then,
so that a lookup in the training loop costs no extra ``stat``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from featstore.roots import CWD, ROOT, reading_of

#: Paths looked at when the dataset is built (spread over ``paths=``; else the first sample's).
PROBES = 64


class PathReading:
    """Relative sample paths as relative to the data root, or to the working directory the
    dataset was built in (``cwd`` set)."""

    def __init__(self, cwd: str | None = None) -> None:
        self.cwd = cwd

    def __call__(self, path: str) -> str:
        """``path`` as the store takes it (relative to the root, or absolute)."""
        return os.path.join(self.cwd, path) if self.cwd is not None and not os.path.isabs(path) else path

    @classmethod
    def settle(cls, root: str | None, base: Any, *, paths: Sequence[str] | None,
               path_fn: Callable[[Any], str] | None, history_fn: Callable[[Any], Sequence[str]] | None
               ) -> PathReading:
        """The reading the dataset's paths need, from up to :data:`PROBES` of them (``paths=``,
        else the first sample's path or frames).

        Raises
        ------
        AmbiguousPathError
            A path names one file relative to the root and another relative to the working
            directory.
        ValueError
            Some paths name files only relative to the root, others only relative to the
            working directory.
        """
        if root is None:
            return cls()
        probes = _probes(base, paths=paths, path_fn=path_fn, history_fn=history_fn)
        cwd = os.getcwd()
        found: dict[str, str] = {}
        for p in probes:
            reading = reading_of(root, p, cwd)
            if reading is not None:
                found.setdefault(reading, p)
        if CWD in found and ROOT in found:
            raise ValueError(f"the dataset's source paths are read two ways: {found[ROOT]!r} names a file relative to "
                             f"the data root {root}, {found[CWD]!r} one relative to the working directory {cwd}; "
                             "give absolute paths, or paths relative to the data root")
        return cls(cwd if CWD in found else None)


def _probes(base: Any, *, paths: Sequence[str] | None, path_fn: Callable[[Any], str] | None,
            history_fn: Callable[[Any], Sequence[str]] | None) -> list[str]:
    if paths is not None:
        step = max(1, len(paths) // PROBES)
        return [os.fspath(p) for p in list(paths)[::step][:PROBES]]
    try:
        if len(base) == 0:
            return []
        first = base[0]
    except Exception:  # a dataset that cannot be indexed here: its paths are read as given
        return []
    sample = dict(first) if isinstance(first, Mapping) else {"sample": first}
    try:
        if history_fn is not None:
            return [os.fspath(p) for p in history_fn(sample)]
        return [os.fspath(path_fn(sample))] if path_fn is not None else []
    except Exception:  # the dataset's own error shows when the sample is loaded
        return []
