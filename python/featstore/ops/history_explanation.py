"""``featstore explain --history FRAME ...``: why the lookup of one history's entry hits or misses,
in words a user can act on: the state, the entry file, which frame changed (recorded and current
stamp, whether its bytes differ) or is gone, both fingerprints of a foreign entry, and for a miss
the longest prefix that is cached."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from featstore import _core
from featstore.errors import CorruptEntryError
from featstore.explain import Explanation
from featstore.fmt import human_bytes, timestamp
from featstore.history import history_entry_files, history_entry_path, judge_history_entry, recorded_members
from featstore.ops.files import file_size
from featstore.ops.histories import judge_history_file
from featstore.store import FeatureStore
from featstore.vocabulary import MISS_ADVICE


@dataclass
class HistoryExplanation(Explanation):
    """:class:`~featstore.explain.Explanation` of a history's lookup; ``source`` names the history
    in words and ``frames`` lists it, oldest first."""

    frames: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "frames": list(self.frames)}


def explain_history(store: FeatureStore, frames: Sequence[str | os.PathLike[str]]) -> HistoryExplanation:
    """Says why a lookup of the history ``frames`` (oldest first; relative to the data root or
    absolute inside it) hits or misses.

    Where the frames' current key has no entry, the history entry files are searched for an older
    entry of the same frames (each header read), so that an edited frame is named: the history
    is then ``stale``, as ``featstore status`` counts it.
    """
    rels = tuple(store.rel(f) for f in frames)
    if not rels:
        raise ValueError("a history needs at least one frame")
    name = f"history of {len(rels)} frame{'s' if len(rels) > 1 else ''} ending in {rels[-1]}"

    def explained(state: str, entry: str, reason: str, details: list[tuple[str, str]]) -> HistoryExplanation:
        compute = ("`featstore precompute --jsonl FIELD --history`, or a training pass with "
                   "CachedDataset(..., history_fn=..., mode='lazy')")
        advice = {"missing": f"compute it with {compute}",
                  "stale": f"a frame changed since caching: recompute it with {compute}; `featstore gc` removes the "
                           "stale entry"}.get(state, MISS_ADVICE.get(state, ""))
        return HistoryExplanation(name, state, entry, reason, details, advice, store.feature, store.layout,
                                  store.fingerprint, frames=rels)

    gone = [f for f in rels if not os.path.lexists(os.path.join(store.data_root, f))]
    if gone:
        return explained("missing", "", f"its frame {gone[0]} does not exist", [])
    entry = history_entry_path(store, rels)
    if os.path.lexists(entry):
        return explained(*_current(store, rels, entry))
    older = _older_entry(store, rels)
    if older is not None:
        return explained(*older)
    details = _cached_prefix(store, rels)
    return explained("missing", entry, "no entry for these frames as they are now, in this order", details)


def _current(store: FeatureStore, rels: tuple[str, ...], entry: str) -> tuple[str, str, str, list[tuple[str, str]]]:
    """State, entry, reason and details from the entry at the frames' current key."""
    try:
        meta, tensors, _ = _core.read_header(entry)
    except CorruptEntryError as exc:
        return "corrupt", entry, str(exc), [("file", f"{file_size(entry):,} bytes")]
    details = _entry_details(meta, tensors, entry)
    verdict = judge_history_entry(store, entry, meta=meta)
    state = verdict.state
    if state == "valid" and verdict.members != rels:
        return "stale", entry, f"the entry at this key records other frames ({' > '.join(verdict.members)})", details
    if state == "orphan":  # a frame vanished since the look above
        state = "missing"
    if state == "foreign":
        details.append(("entry fingerprint", meta.get("fingerprint") or "(none)"))
        details.append(("expected", store.fingerprint or "(any)"))
    if state == "stale":
        details.extend(_changed_frames(store, meta))
    return state, entry, verdict.reason, details


def _older_entry(store: FeatureStore, rels: tuple[str, ...]) -> tuple[str, str, str, list[tuple[str, str]]] | None:
    """An entry of these frames filed under older stamps of them (a frame edited or touched since),
    judged; None when there is none."""
    found = None
    for path in history_entry_files(store):
        try:
            meta, tensors, _ = _core.read_header(path)
            recorded = tuple(m["path"] for m in recorded_members(store, meta) or ())
        except (CorruptEntryError, OSError, KeyError, TypeError):
            continue
        if recorded != rels:
            continue
        verdict = judge_history_file(store, path)
        details = _entry_details(meta, tensors, path)
        if verdict.state == "stale":
            return "stale", path, verdict.reason, details + _changed_frames(store, meta)
        found = found or ("missing", path, f"an entry of these frames exists under older stamps of them: "
                          f"{verdict.reason or verdict.state}", details + _changed_frames(store, meta))
    return found


def _entry_details(meta: dict[str, str], tensors: list[Any], path: str) -> list[tuple[str, str]]:
    try:  # the header's creation time, else the file's (history entries may not record one)
        written_ns = int(meta["created"]) * 10**9
    except (KeyError, ValueError):
        written_ns = os.stat(path).st_mtime_ns if os.path.exists(path) else 0
    written = timestamp(written_ns)[:19]
    return [("entry written", f"{written}, {human_bytes(file_size(path))}, fingerprint "
                              f"{meta.get('fingerprint') or '(none)'}"),
            ("tensors", ", ".join(f"{n} {dt}{list(shape)}" for n, dt, shape, _, _ in tensors))]


def _changed_frames(store: FeatureStore, meta: dict[str, str]) -> list[tuple[str, str]]:
    """For each recorded frame whose stamp moved: recorded and current stamps, whether its bytes
    differ."""
    members = recorded_members(store, meta)
    if members is None:
        return [("frames", "the entry's frames cannot be read (its frames record is missing or damaged)")]
    out = []
    for i, m in enumerate(members):
        path = os.path.join(store.data_root, m.get("path", ""))
        recorded = _stamp_text(m.get("size"), m.get("mtime_ns"))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            out.append((f"frame {i}", f"{path} no longer exists (recorded {recorded})"))
            continue
        now = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        if now == (m.get("size"), m.get("mtime_ns"), m.get("ino"), m.get("ctime_ns")) and meta.get("racy") != "1":
            continue
        try:
            same = _core.file_digest(path) == m.get("blake3")
        except OSError:
            same = False
        if same and now[:2] == (m.get("size"), m.get("mtime_ns")):
            continue
        out.append((f"frame {i}", f"{path}: recorded {recorded}; now {_stamp_text(st.st_size, st.st_mtime_ns)}; "
                    f"content {'identical' if same else 'differs'}"))
    return out


def _cached_prefix(store: FeatureStore, rels: tuple[str, ...]) -> list[tuple[str, str]]:
    """The longest prefix of the history with a valid entry, if any (what a lazy miss reuses)."""
    for k in range(len(rels) - 1, 0, -1):
        if store.history_state(rels[:k]) == "valid":
            return [("cached prefix", f"the first {k} frames (ending in {rels[k - 1]}) have a valid entry")]
    return [("cached prefix", "none: no prefix of this history has a valid entry")]


def _stamp_text(size: Any, mtime_ns: Any) -> str:
    try:
        return f"{int(size or 0):,} bytes, modified {timestamp(int(mtime_ns or 0))} (mtime_ns {mtime_ns})"
    except (TypeError, ValueError):
        return f"size {size}, mtime_ns {mtime_ns}"
