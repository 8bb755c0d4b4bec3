"""Frame sets: features computed from several images together.

VGGT attends across all frames given together, and the first frame gets different tokens, so a
frame's features depend on the other frames and their order. Such features are stored once per
*set* (an ordered list of sources), never per image, at
``<root or cache_dir>/.featstore/<feature>/sets/<key[:2]>/<key[:32]>.safetensors`` where the key
covers every member's path and stamp in order: any change of a member, or of the order, is a new
key and so a miss. Per-image entries and set entries live apart: a lookup never mixes modes.

A same-size edit within the file system's timestamp granularity keeps a member's stamp, hence the
key. So a set written while a member's mtime was that recent is marked ``racy``: every lookup
compares the members' digests with those recorded, until one made outside the window clears the
mark (as for per-image entries).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from featstore import _core
from featstore.errors import CorruptEntryError, FeatstoreError

if TYPE_CHECKING:
    import torch

    from featstore.store import FeatureStore

_SET_DOMAIN = b"featstore-set-v1\0"


def set_key(store: FeatureStore, rels: Sequence[str]) -> str:
    """The key of an ordered set of sources: a digest of every member's v1 key (path and stamp).

    Raises
    ------
    FileNotFoundError
        A member does not exist.
    """
    h = hashlib.sha256(_SET_DOMAIN)
    for rel in rels:
        st = os.stat(os.path.join(store.data_root, rel))
        h.update(bytes.fromhex(_core.stamp_key(os.fsencode(rel), st.st_size, st.st_mtime_ns)))
    return h.hexdigest()


def set_entry_path(store: FeatureStore, rels: Sequence[str]) -> str:
    """Where the entry of this set is (or would be written) for its members as they are now."""
    key = set_key(store, rels)
    return os.path.join(store.state_dir, "sets", key[:2], key[:32] + ".safetensors")


def put_set(store: FeatureStore, paths: Sequence[str | os.PathLike[str]], tensors: Mapping[str, torch.Tensor], *,
            metadata: Mapping[str, str] | None = None, durable: bool = False,
            expected: Sequence[tuple[int, int]] | None = None) -> str:
    """Writes the entry of an ordered set of sources atomically; returns its path.

    The metadata records every member (path, stamp, digest), the fingerprint and the set size.
    ``expected`` holds the members' ``(size, mtime_ns)`` when they were read for encoding: if one
    changed since, :class:`FeatstoreError` is raised and nothing is written.
    """
    from featstore._torch import to_raw

    rels = [store.rel(p) for p in paths]
    if not rels:
        raise ValueError("a frame set needs at least one source")
    before = [os.stat(os.path.join(store.data_root, r)) for r in rels]
    if expected is not None:
        for r, st, seen in zip(rels, before, expected, strict=True):
            if (st.st_size, st.st_mtime_ns) != tuple(seen):
                raise FeatstoreError(f"{r} changed after it was read for encoding; its set was not stored, "
                                     "run again to encode the new version")
    digests = _core.file_digests([os.path.join(store.data_root, r) for r in rels])
    members = [{"path": r, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "blake3": d}
               for r, st, d in zip(rels, before, digests, strict=True)]
    path = set_entry_path(store, rels)
    meta = dict(metadata or {})
    meta.update({"feature": store.feature, "fingerprint": store.fingerprint or "", "kind": "frame-set",
                 "frames": str(len(rels)), "members": json.dumps(members),
                 "racy": "1" if _racy([st.st_mtime_ns for st in before]) else "0"})
    raw, keep = to_raw(tensors)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _core.write_entry(path, raw, meta, durable)
    del keep
    return path


def _racy(mtimes_ns: Sequence[int]) -> bool:
    """True while a same-size edit of a file with one of these mtimes could keep its stamp."""
    return time.time_ns() - max(mtimes_ns, default=0) <= _core.RACY_WINDOW_NS


def _members_changed(store: FeatureStore, meta: Mapping[str, str]) -> bool | None:
    """Whether a member's bytes differ from those the set was computed from: True (or when they
    cannot be compared), False when all match, None for an entry not marked racy (its key, made
    of the members' stamps, says enough)."""
    if meta.get("racy") != "1":
        return None
    try:
        members = json.loads(meta["members"])
        paths: list[str | os.PathLike[str]] = [os.path.join(store.data_root, m["path"]) for m in members]
        recorded = [m["blake3"] for m in members]
    except (KeyError, TypeError, ValueError):
        return True  # a racy entry whose members cannot be checked is not served
    return _core.file_digests(paths) != recorded


def set_state(store: FeatureStore, paths: Sequence[str | os.PathLike[str]]) -> str:
    """``valid``, ``missing`` (no entry for the members as they are now), ``stale`` (a member
    was edited within the timestamp granularity: same stamp, other bytes), ``foreign`` or
    ``corrupt``; ``missing`` also when a member no longer exists."""
    rels = [store.rel(p) for p in paths]
    try:
        path = set_entry_path(store, rels)
    except FileNotFoundError:
        return "missing"
    try:
        meta, _, _ = _core.read_header(path)
    except FileNotFoundError:
        return "missing"
    except CorruptEntryError:
        return "corrupt"
    if store.fingerprint and meta.get("fingerprint") != store.fingerprint:
        return "foreign"
    return "stale" if _members_changed(store, meta) else "valid"


def get_set(store: FeatureStore, paths: Sequence[str | os.PathLike[str]], *, device: Any = None,
            dtype: Any = None) -> dict[str, torch.Tensor] | None:
    """The tensors of a set's entry (zero-copy), or None unless it is valid for the members as
    they are now, in this order, with the store's fingerprint."""
    rels = [store.rel(p) for p in paths]
    try:
        path = set_entry_path(store, rels)
        capsules, meta, _ = _core.read_entry(path, pread=store.read_mode == "pread")
    except FileNotFoundError:
        return None
    except CorruptEntryError as exc:
        import warnings

        warnings.warn(f"featstore: corrupt frame-set entry: {exc}; recompute it", stacklevel=3)
        return None
    if store.fingerprint and meta.get("fingerprint") != store.fingerprint:
        return None
    from featstore._torch import from_capsules

    changed = _members_changed(store, meta)
    if changed:
        return None
    if changed is False and not _racy([m["mtime_ns"] for m in json.loads(meta["members"])]):
        _clear_racy_mark(path)
    return from_capsules(capsules, device, dtype)


def _clear_racy_mark(path: str) -> None:
    """Rewrites a racy set entry whose members were just verified outside the window with the
    mark cleared: no later edit can keep their stamps, so lookups stop digesting them. Best
    effort (a read-only cache still serves the entry)."""
    import torch

    from featstore._torch import to_raw

    with contextlib.suppress(OSError, FeatstoreError):
        capsules, meta, _ = _core.read_entry(path, pread=True)  # the file as it is now
        if meta.get("racy") != "1":
            return
        raw, keep = to_raw({name: torch.from_dlpack(c) for name, c in capsules})
        _core.write_entry(path, raw, {**meta, "racy": "0"})
        del keep
