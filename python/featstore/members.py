"""Entries computed from several sources at once (frame sets, histories): how their members are
recorded and checked.

An entry's header records every member in order (path, stamp with inode and ctime, blake3). A
lookup compares each member's current stamp with the recorded one; only when a stamp moved (a
touch, a copy, a frame renamed onto a member's name with the same size and mtime) or the entry is
``racy`` (written while a member's mtime was within the timestamp granularity) are the members
digested, and the bytes decide.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from featstore import _core
from featstore.errors import CorruptEntryError, FeatstoreError, SourceChangedError
from featstore.inputs import Stamp
from featstore.vocabulary import ENTRY_EXTENSION

if TYPE_CHECKING:  # the store calls in with itself
    from featstore.store import FeatureStore

_KEYED_FILE = re.compile(r"^[0-9a-f]{32}\." + ENTRY_EXTENSION + "$")


def record(root: str, rels: Sequence[str], expected: Sequence[Sequence[int]] | None = None
           ) -> tuple[list[dict[str, Any]], bool]:
    """The members' records (path, stamp, digest) for an entry's header, and whether the entry is
    racy. ``expected``: the members' stamps when the encoder read them (``(size, mtime_ns)`` or the
    full ``(size, mtime_ns, ino, ctime_ns)``); a member changed since raises
    :class:`SourceChangedError` and nothing may be written."""
    stats = [os.stat(os.path.join(root, r)) for r in rels]
    if expected is not None:
        for rel, st, seen in zip(rels, stats, expected, strict=True):
            if _stamp(st)[:len(seen)] != tuple(seen):
                raise SourceChangedError(f"{os.path.join(root, rel)} changed after it was read for encoding; "
                                         "its features were not stored, run again to encode the new version")
    digests = _core.file_digests([os.path.join(root, r) for r in rels])
    if [_stamp(os.stat(os.path.join(root, r))) for r in rels] != [_stamp(st) for st in stats]:
        raise SourceChangedError(f"a member of {rels[0]}... changed while its entry was being written; write it again")
    records = [{"path": r, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
                "ctime_ns": st.st_ctime_ns, "blake3": d} for r, st, d in zip(rels, stats, digests, strict=True)]
    return records, racy([st.st_mtime_ns for st in stats])


def _stamp(st: os.stat_result) -> Stamp:
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def racy(mtimes_ns: Sequence[int]) -> bool:
    """True while a same-size edit of a file with one of these mtimes could keep its stamp."""
    return time.time_ns() - max(mtimes_ns, default=0) <= _core.RACY_WINDOW_NS


def changed(root: str, meta: Mapping[str, str], *, deep: bool = False) -> bool | None:
    """Whether a member's bytes differ from those the entry was computed from: True (or when they
    cannot be compared), False when digests were compared and all match, None when every
    member's full stamp is the recorded one and the entry is not racy (nothing digested).
    ``deep`` digests whatever the stamps say (``verify``)."""
    try:
        members = json.loads(meta["members"])
        paths = [os.path.join(root, m["path"]) for m in members]
        recorded = [m["blake3"] for m in members]
        stamps = [(m["size"], m["mtime_ns"], m.get("ino"), m.get("ctime_ns")) for m in members]
    except (KeyError, TypeError, ValueError):
        return True  # an entry whose members cannot be checked is not served
    try:
        now = [_stamp(os.stat(p)) for p in paths]
    except OSError:
        return True
    if not deep and meta.get("racy") != "1" and now == stamps:
        return None
    return _core.file_digests(list[str | os.PathLike[str]](paths)) != recorded


def clear_racy_mark(path: str, meta: Mapping[str, str]) -> None:
    """Rewrites a racy entry whose members were just verified outside the window with the mark
    cleared: no later edit can keep their stamps, so lookups stop digesting them. Best effort (a
    read-only cache still serves the entry)."""
    if meta.get("racy") != "1" or racy([m["mtime_ns"] for m in json.loads(meta["members"])]):
        return
    rewrite_without_racy_mark(path)


def rewrite_without_racy_mark(path: str) -> None:
    """Rewrites the entry at ``path`` with its ``racy`` mark cleared, if it still has one (the
    caller verified its members outside the window). Best effort."""
    import torch  # here: `import featstore` does not import torch

    from featstore._torch import to_raw

    with contextlib.suppress(OSError, FeatstoreError):
        capsules, now, _ = _core.read_entry(path, pread=True)  # the file as it is now
        if now.get("racy") != "1":
            return
        raw, keep = to_raw({name: torch.from_dlpack(c) for name, c in capsules})
        _core.write_entry(path, raw, {**now, "racy": "0"})
        del keep


def keyed_files(base: str) -> list[str]:
    """Every entry file named by key under ``base`` (``<base>/<key[:2]>/<key[:32]>.safetensors``),
    sorted: the frame sets' or histories' entries of a feature."""
    found: list[str] = []
    for directory, _, files in os.walk(base):
        parent = os.path.basename(directory)
        found.extend(os.path.join(directory, f) for f in files
                     if _KEYED_FILE.match(f) and f[:2] == parent and os.path.dirname(directory) == base)
    return sorted(found)


def open_keyed(store: FeatureStore, paths: Sequence[str | os.PathLike[str]],
               entry_path: Callable[[FeatureStore, list[str]], str], *, what: str
               ) -> tuple[list[str], str, list[tuple[str, Any]], dict[str, str]] | None:
    """``(the members' relative paths, the entry's path, its tensors as DLPack capsules, its
    metadata)`` of the key-named entry of ``paths`` (``entry_path(store, rels)`` names it), or
    None when there is none (or a member is gone); a damaged one is a miss with a warning naming
    ``what`` it is. Whether it is valid is the caller's to judge."""
    rels = [store.rel(p) for p in paths]
    try:
        path = entry_path(store, rels)
        capsules, meta, _ = _core.read_entry(path, pread=store.read_mode == "pread")
    except FileNotFoundError:
        return None
    except CorruptEntryError as exc:
        warnings.warn(f"featstore: corrupt {what} entry: {exc}; recompute it", stacklevel=4)
        return None
    return rels, path, capsules, meta
