"""The survey status, verify and gc share: every source checked, and the entry files no source
claims (orphans, superseded entries) found by walking this feature's files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from featstore import _core
from featstore.errors import CorruptEntryError
from featstore.ops.files import feature_files, file_size
from featstore.store import FeatureStore
from featstore.vocabulary import STATES, check_error, sidecar_suffix


@dataclass
class EntryReport:
    """One entry file and its verdict.

    Attributes
    ----------
    path : str
        The entry file (absolute).
    source : str
        Its source, relative to the data root ('' when unknown: an unreadable dir-layout entry).
    state : str
        One of :data:`featstore.store.STATES`.
    reason : str
        Why, in words.
    bytes : int
        Size of the file in bytes.
    """

    path: str
    source: str
    state: str
    reason: str = ""
    bytes: int = 0
    unclaimed: bool = False  # found by walking, not through a source's check

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "source": self.source, "state": self.state, "reason": self.reason,
                "bytes": self.bytes}


@dataclass
class Survey:
    """What :func:`survey` found.

    Attributes
    ----------
    reports : list of EntryReport
        Every entry file of the feature with its verdict, sorted by path.
    missing : int
        Sources without an entry.
    temps : list of str
        featstore's temporary files, sorted.
    errors : list of (str, str)
        Sources and paths that could not be checked, with the reason.
    """

    reports: list[EntryReport]
    missing: int
    temps: list[str]
    errors: list[tuple[str, str]]

    def counts(self) -> dict[str, int]:
        """Entries per state, and sources without one under ``missing``."""
        counts = {s: 0 for s in STATES}
        counts["missing"] = self.missing
        for r in self.reports:
            counts[r.state] += 1
        return counts


def corrupt_reason(exc: Exception, path: str) -> str:
    """The core's message without its ``corrupt entry <path>: `` prefix."""
    msg = str(exc)
    prefix = f"corrupt entry {path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def survey(store: FeatureStore, rels: Sequence[str], *, deep: bool, threads: int | None,
           progress: bool | None) -> Survey:
    """Checks every source and finds the entries no source claims (orphans, superseded ones).

    ``deep`` forgets what the manifest index vouches for, so every entry's header, fingerprint,
    stamps and inputs are checked again (verify); without it the hot path decides (gc).
    """
    rels = list(rels)
    checks = store.check_many(rels, threads=threads, progress=progress)
    if deep:
        # Only a `valid` verdict can rest on the manifest index alone (every other one came from
        # reading the header): forget those and check them again in full. In the dir layout the
        # first pass has moved entries of touched sources to their current key, where the second
        # finds them.
        again = [i for i, (s, _, _) in enumerate(checks) if s == "valid"]
        for i in again:
            store.forget(rels[i])
        subset = [rels[i] for i in again]
        rechecked = store.check_many(subset, threads=threads, progress=progress, desc="reading headers")
        for i, c in zip(again, rechecked, strict=True):
            checks[i] = c
    by_path: dict[str, EntryReport] = {}
    claimed: dict[str, str] = {}
    errors: list[tuple[str, str]] = []
    missing = 0
    for rel, (state, entry, reason) in zip(rels, checks, strict=True):
        error = check_error(state)
        if error is not None:
            errors.append((rel, error))
            continue
        if state == "missing":
            missing += 1
            continue
        path = os.fspath(entry)
        by_path[path] = EntryReport(path, rel, state, reason, file_size(path))
        claimed[rel] = path
    entries, temps, walk_errors = feature_files(store)
    errors.extend(walk_errors)
    in_scope = set(rels)
    for path in entries:
        if path not in by_path:
            report = _unclaimed(store, path, in_scope, claimed)
            if report is not None:
                report.unclaimed = True
                by_path[path] = report
    return Survey(sorted(by_path.values(), key=lambda r: r.path), missing, sorted(temps), errors)


def _unclaimed(store: FeatureStore, path: str, in_scope: set[str], claimed: dict[str, str]) -> EntryReport | None:
    """The verdict on an entry file no checked source led to, or None when it is out of scope
    (its source exists but is not among the sources looked at)."""
    nbytes = file_size(path)
    if store.layout == "sidecar":
        rel = os.path.relpath(path, store.data_root)[: -len(sidecar_suffix(store.feature))]
        if not os.path.lexists(os.path.join(store.data_root, rel)):
            return EntryReport(path, rel, "orphan", f"the source {rel} no longer exists", nbytes)
        return None
    try:
        meta, _, _ = _core.read_header(path)
    except CorruptEntryError as exc:
        return EntryReport(path, "", "corrupt", corrupt_reason(exc, path) + " (its source is unknown)", nbytes)
    except OSError:
        return None
    rel = meta.get("source", "")
    src = os.path.join(store.data_root, rel)
    if not rel or not os.path.lexists(src):
        return EntryReport(path, rel, "orphan", f"the source {rel or '(unnamed)'} no longer exists", nbytes)
    if rel in claimed:
        return EntryReport(path, rel, "stale", f"superseded: the source's current entry is {claimed[rel]}", nbytes)
    if rel not in in_scope:
        return None
    try:
        same_bytes = _core.file_digest(src) == meta.get("source.blake3")
    except OSError:
        return None
    if same_bytes:
        return EntryReport(path, rel, "valid", "filed under an older stamp of the source (same bytes); "
                           "kept, a lookup through the manifest moves it", nbytes)
    return EntryReport(path, rel, "stale", "written for an older version of the source "
                       f"(size {meta.get('source.size')}, mtime_ns {meta.get('source.mtime_ns')})", nbytes)
