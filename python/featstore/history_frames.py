"""The frames of a history pass, recorded once (docs/design.md, "History entries").

One causal pass over a list of frames writes the entries of several prefixes. Each entry holds
only its prefix's three chain values (key, stamps, content; see ``rust/core/src/history.rs``);
the frames themselves (path, full stamp, blake3) are recorded once per pass, in a *frames
record* beside the entries, so that an episode costs bytes, stats and digests linear in its
length. Lookups never need the record: the chains decide validity. ``status``, ``gc``,
``verify`` and ``explain`` read it to learn which frames an entry file was computed from.

A pass's chains are computed from the stamps it recorded (not from a second ``stat``), by the same
Rust code that computes a lookup's from the frames as they are now.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from featstore import _core
from featstore.inputs import Stamp

#: What a frames record file says it is.
_RECORD_KIND = "featstore-history-frames"


@dataclass(frozen=True)
class Chains:
    """The chain values of every prefix of a recorded list: ``keys[k]`` and the others belong to
    frames ``0..k`` (64 hex digits each)."""

    keys: list[str]
    stamps: list[str]
    contents: list[str]


def _stamps(records: Sequence[Mapping[str, Any]]) -> list[tuple[int, int, int, int]]:
    return [(r["size"], r["mtime_ns"], r["ino"], r["ctime_ns"]) for r in records]


def chains(records: Sequence[Mapping[str, Any]]) -> Chains:
    """The key, stamps and content chains of every prefix of ``records`` (each with ``path``,
    ``size``, ``mtime_ns``, ``ino``, ``ctime_ns`` and ``blake3``), computed by the same Rust code
    as a lookup's from the frames as they are now."""
    rels = [r["path"] for r in records]
    keys, stamps = _core.history_chains(rels, _stamps(records))
    return Chains(keys, stamps, _core.history_content_chain(rels, [r["blake3"] for r in records]))


def key_chain(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The key chain alone, from the recorded paths, sizes and mtimes."""
    return _core.history_chains([r["path"] for r in records], _stamps(records))[0]


@dataclass
class Recorded:
    """The frames of a pass as they were when their features were computed.

    Attributes
    ----------
    records : list of dict
        One per frame that can be recorded, in order (path, size, mtime_ns, ino, ctime_ns, blake3).
    problem : str or None
        Why the frame after the last record cannot be: it changed since it was read for
        encoding, vanished, or cannot be read. None when every frame is recorded.
    """

    records: list[dict[str, Any]]
    problem: str | None = None


def _stamp(st: os.stat_result) -> Stamp:
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def record_frames(root: str, rels: Sequence[str], expected: Sequence[Sequence[int]] | None = None) -> Recorded:
    """Stamps and digests each frame once. ``expected``: the frames' stamps when the encoder read
    them (``(size, mtime_ns)`` or the full stamp); recording stops at the first frame that
    differs, so the prefixes before it can still be written and none holding it is."""
    stats: list[os.stat_result] = []
    problem = None
    for i, rel in enumerate(rels):
        path = os.path.join(root, rel)
        try:
            st = os.stat(path)
        except OSError as exc:
            problem = f"{path} cannot be read now ({exc.strerror or exc})"
            break
        if expected is not None and (i >= len(expected) or _stamp(st)[:len(expected[i])] != tuple(expected[i])):
            problem = (f"{path} changed after it was read for encoding; its features were not stored, run again to "
                       "encode the new version")
            break
        stats.append(st)
    paths = [os.path.join(root, r) for r in rels[:len(stats)]]
    digests = _core.file_digests(list[str | os.PathLike[str]](paths))
    records: list[dict[str, Any]] = []
    for rel, path, st, digest in zip(rels, paths, stats, digests, strict=False):
        try:
            now = os.stat(path)
        except OSError:
            now = None
        if digest is None or now is None or _stamp(now) != _stamp(st):
            problem = f"{path} changed or vanished while its features were being stored; run again"
            break
        records.append({"path": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
                        "ctime_ns": st.st_ctime_ns, "blake3": digest})
    return Recorded(records, problem)


def write_record(path: str, feature: str, records: Sequence[Mapping[str, Any]], *, durable: bool = False) -> None:
    """Writes a frames record atomically (a temporary file renamed over ``path``)."""
    text = json.dumps({"kind": _RECORD_KIND, "format": 1, "feature": feature, "frames": list(records)})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class FramesRecord:
    """A frames record as read: its frames and the key chain of their recorded stamps."""

    frames: tuple[dict[str, Any], ...]
    keys: tuple[str, ...]


_CACHE: OrderedDict[tuple[str, Stamp], FramesRecord | None] = OrderedDict()
_CACHE_SIZE = 256
_CACHE_LOCK = threading.Lock()


def read_record(path: str, feature: str) -> FramesRecord | None:
    """The frames record at ``path``, or None when it is gone, damaged, or another feature's.
    Parsed once per version of the file in a process (the entries of one pass share it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    ident = (path, _stamp(st))
    with _CACHE_LOCK:  # the threads of one judging pass share it
        if ident in _CACHE:
            _CACHE.move_to_end(ident)
            return _CACHE[ident]
    record: FramesRecord | None = None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("kind") == _RECORD_KIND and doc.get("feature") == feature:
            frames = tuple(doc["frames"])
            record = FramesRecord(frames, tuple(key_chain(frames)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError):
        record = None
    with _CACHE_LOCK:
        _CACHE[ident] = record
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return record


def racy(mtimes_ns: Sequence[int]) -> bool:
    """True while a same-size edit of a file with one of these mtimes could keep its stamp."""
    return time.time_ns() - max(mtimes_ns, default=0) <= _core.RACY_WINDOW_NS


class _Digest:
    """A frame's digest, computed by the first thread that needs it while the others wait."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value = ""
        self.error: OSError | None = None


class FrameDigests:
    """Each frame digested once per run however many histories hold it (``verify``, whose
    threads judge entries side by side): digests are kept by the frame's path and full stamp."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._known: dict[tuple[str, Stamp], _Digest] = {}
        self._lock = threading.Lock()

    def digest(self, rel: str) -> str:
        """The blake3 of the frame ``rel`` as it is now (OSError when it cannot be read)."""
        path = os.path.join(self.root, rel)
        ident = (rel, _stamp(os.stat(path)))
        with self._lock:
            known = self._known.get(ident)
            mine = known is None
            if known is None:
                known = self._known[ident] = _Digest()
        if mine:
            try:
                known.value = _core.file_digest(path)
            except OSError as exc:
                known.error = exc
            finally:
                known.done.set()
        else:
            known.done.wait()
        if known.error is not None:
            raise known.error
        return known.value

    def content(self, rels: Sequence[str]) -> str:
        """The content chain of the whole list (OSError when a frame cannot be read)."""
        return self.contents(rels)[-1]

    def contents(self, rels: Sequence[str]) -> list[str]:
        """The content chain of every prefix of ``rels`` (OSError when a frame cannot be read)."""
        return _core.history_content_chain(list(rels), [self.digest(rel) for rel in rels])
