"""Why a lookup of one source hits or misses, in words a user can act on (``featstore explain``)."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from featstore import _core
from featstore.errors import CorruptEntryError
from featstore.fmt import human_bytes, timestamp
from featstore.packs import entry_location
from featstore.vocabulary import LEGACY_SIDECAR_SUFFIX, MISS_ADVICE

if TYPE_CHECKING:  # the store calls explain(); explain only uses the store handed to it
    from featstore.store import FeatureStore


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


@dataclass
class Explanation:
    """Why a lookup of one source hits or misses.

    Attributes
    ----------
    source : str
        The source, relative to the data root.
    state : str
        Its entry state; a lookup hits for ``valid`` (and ``legacy`` where allowed).
    entry : str
        The entry file found or expected ('' when there is none to name).
    reason : str
        The core's verdict in words.
    details : list of (str, str)
        Labelled lines: stamps, digests, fingerprints, tensors, the parse error.
    advice : str
        What to do about a miss.
    """

    source: str
    state: str
    entry: str
    reason: str
    details: list[tuple[str, str]] = field(default_factory=list)
    advice: str = ""
    feature: str = ""
    layout: str = ""
    fingerprint: str | None = None

    @property
    def hit(self) -> bool:
        """True when a lookup serves this source."""
        return self.state in ("valid", "legacy")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "state": self.state, "hit": self.hit, "entry": self.entry,
                "reason": self.reason, "details": dict(self.details), "advice": self.advice,
                "feature": self.feature, "layout": self.layout, "fingerprint": self.fingerprint}

    def text(self) -> str:
        lines = [f"{self.source}: {self.state} ({'hit' if self.hit else 'miss'})",
                 f"  entry: {self.entry or '(none)'}"]
        if self.reason:
            lines.append(f"  why: {self.reason}")
        width = max((len(k) for k, _ in self.details), default=0)
        lines.extend(f"  {k + ':':{width + 1}} {v}" for k, v in self.details)
        if self.advice:
            lines.append(f"  fix: {self.advice}")
        lines.append(f"  feature {self.feature}, layout {self.layout}, "
                     f"expected fingerprint {self.fingerprint or '(any)'}")
        return "\n".join(lines)


def _stamp_text(size: int | str | None, mtime_ns: int | str | None) -> str:
    try:
        return f"{int(size or 0):,} bytes, modified {timestamp(int(mtime_ns or 0))} (mtime_ns {mtime_ns})"
    except ValueError:
        return f"size {size}, mtime_ns {mtime_ns}"


def _digest_or_none(path: str) -> str | None:
    try:
        return _core.file_digest(path)
    except OSError:
        return None


def _input_details(store: FeatureStore, meta: dict[str, str]) -> list[tuple[str, str]]:
    """For each recorded file input: what changed (stamp, digest) or that it is gone."""
    try:
        inputs = json.loads(meta.get("inputs", "[]"))
    except ValueError:
        return [("inputs", "the entry's inputs metadata is not JSON")]
    out = []
    for item in inputs if isinstance(inputs, list) else []:
        name, path = item.get("name"), item.get("path")
        if name == "source" or not isinstance(path, str):
            continue
        abs_path = os.path.join(store.data_root, path)
        recorded = _stamp_text(item.get("size"), item.get("mtime_ns"))
        try:
            st = os.stat(abs_path)
        except FileNotFoundError:
            out.append((f"input {name}", f"{abs_path} no longer exists (recorded {recorded})"))
            continue
        if (st.st_size, st.st_mtime_ns) == (item.get("size"), item.get("mtime_ns")):
            continue
        digest = _digest_or_none(abs_path)
        same = digest == item.get("blake3")
        out.append((f"input {name}", f"{abs_path}: recorded {recorded}; now {_stamp_text(st.st_size, st.st_mtime_ns)}; "
                    f"content {'identical' if same else 'differs'}"))
    return out


def explain(store: FeatureStore, path: str | os.PathLike[str]) -> Explanation:
    """Says why a lookup of ``path`` hits or misses.

    For a stale entry: the source's recorded and current stamps and whether its bytes differ
    (or which other input changed); for a foreign one: both fingerprints; for a corrupt one: the
    parse error; for a legacy file: its age against the image's.

    Parameters
    ----------
    store : FeatureStore
        The store to look in.
    path : path
        A source, relative to the data root or absolute inside it.
    """
    rel = store.rel(path)
    checked = store.check(rel)
    state, entry_p, reason = checked.state, checked.entry, checked.reason
    entry = os.fspath(entry_p)
    src = os.path.join(store.data_root, rel)
    details: list[tuple[str, str]] = []
    try:
        src_st: os.stat_result | None = os.stat(src)
    except FileNotFoundError:
        src_st = None
    legacy = entry.endswith(LEGACY_SIDECAR_SUFFIX)
    meta: dict[str, str] = {}
    if checked.packed is not None:
        pack, offset, length = checked.packed
        details.append(("pack", f"{os.fspath(pack)}, bytes {offset:,}..{offset + length:,}"))
    if entry and not legacy and state not in ("missing", "corrupt"):
        try:
            meta, tensors, _ = _core.read_header(*entry_location(checked))
            size = checked.packed[2] if checked.packed is not None else _size(entry)
            details.append(("entry written", f"{timestamp(int(meta.get('created', '0')) * 10**9)[:19]}, "
                            f"{human_bytes(size)}, fingerprint {meta.get('fingerprint') or '(none)'}"))
            details.append(("tensors", ", ".join(f"{n} {dt}{list(shape)}" for n, dt, shape, _, _ in tensors)))
        except (CorruptEntryError, OSError, ValueError):
            pass
    if legacy and state in ("stale", "legacy") and src_st is not None:
        details.append(("image modified", timestamp(src_st.st_mtime_ns)))
        details.append(("cache written", timestamp(os.stat(entry).st_mtime_ns)))
    elif state == "stale" and meta and src_st is not None:
        details.append(("source recorded", _stamp_text(meta.get("source.size"), meta.get("source.mtime_ns"))))
        details.append(("source now", _stamp_text(src_st.st_size, src_st.st_mtime_ns)))
        digest = _digest_or_none(src)
        recorded = meta.get("source.blake3", "")
        details.append(("source content", ("identical" if digest == recorded else "differs")
                        + f" (blake3 recorded {recorded[:16]}, now {(digest or '?')[:16]})"))
        details.extend(_input_details(store, meta))
    elif state == "foreign":
        given = store.requested_fingerprint
        details.append(("entry fingerprint", meta.get("fingerprint") or "(none)"))
        details.append(("expected", f"{store.fingerprint} ("
                        + ("given" if given else f"from the manifest {store.manifest_path}") + ")"))
    elif state == "corrupt" and checked.packed is None:
        details.append(("file", f"{_size(entry):,} bytes"))
    elif state == "missing":
        if src_st is None:
            details.append(("source", f"{src} does not exist"))
        else:
            others = sorted(p[len(src) + 1: -len(".safetensors")]
                            for p in glob.glob(glob.escape(src) + ".*.safetensors"))
            if others:
                details.append(("other features", ", ".join(others) + " (check --feature)"))
    if store.layout == "dir" and src_st is not None:
        details.append(("key", _core.stamp_key(os.fsencode(rel), src_st.st_size, src_st.st_mtime_ns)[:32]))
    advice = {
        "missing": "compute it with `featstore precompute`" if src_st is not None else
                   f"there is no source {src}: check the path (relative to the data root {store.data_root}, "
                   "or absolute inside it)",
        "legacy": "`featstore migrate` converts old-format files",
    }.get(state, MISS_ADVICE.get(state, ""))
    if state == "stale" and legacy:
        advice = "the image changed after the old cache was written; recompute it"
    return Explanation(rel, state, entry, reason, details, advice, store.feature, store.layout, store.fingerprint)
