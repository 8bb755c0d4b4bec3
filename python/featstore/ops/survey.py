"""The survey status, verify and gc share: every source checked, the entry files no source
claims (orphans, superseded entries) found by walking this feature's files, and every frame-set
and history entry judged from the members it records."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from featstore import _core
from featstore.errors import CorruptEntryError, FeatstoreError
from featstore.history import HistoryVerdict
from featstore.ops.files import Identity, feature_files, file_identity, file_size, judge_files
from featstore.ops.histories import counted_histories, judge_histories
from featstore.scan import scan
from featstore.sets import (
    SetMode,
    SetVerdict,
    group_frames,
    group_states,
    judge_set_entry,
    recorded_mode,
    set_entry_files,
)
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
    identity : (int, int, int, int) or None
        The stamp ``(size, mtime_ns, ino, ctime_ns)`` of the file the verdict was reached on
        (None: no file, or it changed while being judged). ``gc`` and ``verify --quarantine``
        act on the file only while it still has this identity.
    keep : str
        Why ``gc`` and ``verify --quarantine`` must leave this entry although it is bad for this
        root ('' when nothing stops them): in the dir layout, another data root sharing the
        cache (a copy of the dataset) may be the one it was written for.
    """

    path: str
    source: str
    state: str
    reason: str = ""
    bytes: int = 0
    unclaimed: bool = False  # found by walking, not through a source's check
    members: tuple[str, ...] = ()  # a frame set's members or a history's frames, in order (``source`` is '')
    identity: Identity | None = None
    keep: str = ""
    packed: tuple[str, int, int] | None = None  # (pack, offset, length): ``path`` is then no file

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"path": self.path, "source": self.source, "state": self.state, "reason": self.reason,
                               "bytes": self.bytes}
        if self.packed is not None:
            doc["pack"], doc["offset"], _ = self.packed
        if self.members:
            doc["members"] = list(self.members)
        if self.keep:
            doc["keep"] = self.keep
        return doc


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
    sets : int or None
        With a frame-set mode recorded: the frame sets the sources make (``missing`` counts
        those without an entry, not frames).
    histories : int or None
        When the entries are histories (see :mod:`featstore.ops.histories`): the histories
        counted (``missing`` counts those without an entry, not frames).
    """

    reports: list[EntryReport]
    missing: int
    temps: list[str]
    errors: list[tuple[str, str]]
    sets: int | None = None
    histories: int | None = None

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

    Each report carries the identity of the file its verdict was reached on: the core's, taken
    from the descriptor the header was read from (or the stamp the index vouched for), for
    sources' entries; for files found by walking and frame sets, the ``lstat`` before the
    judgment when the one after it agrees (else None: nothing may act on that verdict).
    """
    rels = list(rels)
    checks = store.check_many(rels, threads=threads, progress=progress)
    if deep:
        # Only a `valid` verdict can rest on the manifest index alone (every other one came from
        # reading the header): forget those and check them again in full. In the dir layout the
        # first pass has moved entries of touched sources to their current key, where the second
        # finds them.
        again = [i for i, c in enumerate(checks) if c.state == "valid"]
        for i in again:
            store.forget(rels[i])
        subset = [rels[i] for i in again]
        rechecked = store.check_many(subset, threads=threads, progress=progress, desc="reading headers", deep=True)
        for i, c in zip(again, rechecked, strict=True):
            checks[i] = c
    by_path: dict[str, EntryReport] = {}
    claimed: dict[str, str] = {}
    errors: list[tuple[str, str]] = []
    missing = 0
    for rel, c in zip(rels, checks, strict=True):
        state, entry, reason = c.state, c.entry, c.reason
        error = check_error(state)
        if error is not None:
            errors.append((rel, error))
            continue
        if state == "missing":
            missing += 1
            continue
        path = os.fspath(entry)
        packed = (os.fspath(c.packed[0]), c.packed[1], c.packed[2]) if c.packed is not None else None
        nbytes = packed[2] if packed else c.identity[0] if c.identity is not None else file_size(path)
        by_path[path] = EntryReport(path, rel, state, reason, nbytes, identity=c.identity, packed=packed)
        claimed[rel] = path
    entries, temps, walk_errors = feature_files(store)
    errors.extend(walk_errors)
    in_scope = set(rels)
    for r in _packed_orphans(store, in_scope, threads):
        by_path[r.path] = r
    shared = shared_data_root(store)
    if shared is not None:
        for r in by_path.values():
            if r.state in ("stale", "orphan") and _other_roots_entry(r, os.path.join(shared, r.source)):
                r.keep = (f"kept: the valid entry of {os.path.join(shared, r.source)} (the data root {shared} "
                          "shares this cache)")
                r.reason += f"; {r.keep}"
    for path in entries:
        if path not in by_path:
            report = _unclaimed(store, path, in_scope, claimed, shared)
            if report is not None:
                report.unclaimed = True
                by_path[path] = report
    set_ids: dict[str, Identity | None] = {}
    verdicts, set_errors = judge_sets(store, deep=deep, threads=threads, identities=set_ids)
    errors.extend(set_errors)
    for v in verdicts:
        if v.state == "orphan" or not v.members or all(m in in_scope for m in v.members):
            by_path[v.path] = set_report(v, set_ids.get(v.path))
    sets = None
    grouped = frame_set_groups(store, rels)
    if grouped is not None:  # a frame without an entry of its own is no miss: its set may be
        groups = grouped[1]
        sets, missing = len(groups), group_states(store, groups, verdicts).count("missing")
    history_ids: dict[str, Identity | None] = {}
    judged, history_errors = judge_histories(store, deep=deep, threads=threads, identities=history_ids)
    errors.extend(history_errors)
    for h in judged:
        if h.state == "orphan" or not h.members or all(m in in_scope for m in h.members):
            by_path[h.path] = history_report(h, history_ids.get(h.path))
    histories = None
    counted = counted_histories(store, rels, judged, image_entries=bool(entries))
    if counted is not None:  # frames have no entries of their own: count the histories instead
        histories, missing = len(counted[0]), counted[0].count("missing")
    return Survey(sorted(by_path.values(), key=lambda r: r.path), missing, sorted(temps), errors, sets, histories)


def frame_set_groups(store: FeatureStore, rels: Sequence[str], lists: Sequence[Sequence[str]] | None = None
                     ) -> tuple[SetMode, list[tuple[str, ...]]] | None:
    """The frame-set mode the feature's manifest records and the sets ``rels`` make in it (None:
    entries are per image). The sets are the ``.jsonl`` lists (``lists``, else scanned with the
    recorded field) whose members are all among ``rels``, else each directory's chunks."""
    mode = recorded_mode(store)
    if mode is None:
        return None
    if lists is None and mode.jsonl:
        lists = scan(store.data_root, jsonl=mode.jsonl, skip_dirs=[store.cache_dir] if store.cache_dir else (),
                     progress=False).sets
    groups = group_frames(lists or [], rels, mode.frames)
    if lists:
        in_scope = set(rels)
        groups = [g for g in groups if all(m in in_scope for m in g)]
    return mode, groups


def judge_sets(store: FeatureStore, *, deep: bool, threads: int | None,
               identities: dict[str, Identity | None] | None = None
               ) -> tuple[list[SetVerdict], list[tuple[str, str]]]:
    """Every frame-set entry file of the feature judged (in parallel), and those that could not be
    read; ``identities`` receives the identity of each file judged (None: it changed meanwhile)."""
    return judge_files(set_entry_files(store), lambda p: judge_set_entry(store, p, deep=deep),
                       threads=threads, identities=identities)


def set_report(v: SetVerdict, identity: Identity | None = None) -> EntryReport:
    """The report of a judged frame-set entry (a valid one filed under older stamps is listed as
    unclaimed: kept, never removed); ``identity`` is that of the file judged."""
    what = f"frame set {'+'.join(v.members)}" if v.members else "frame set"
    reason = f"{what}: {v.reason}" if v.reason else what
    return EntryReport(v.path, "", v.state, reason, file_size(v.path), unclaimed=bool(v.reason), members=v.members,
                       identity=identity)


def history_report(v: HistoryVerdict, identity: Identity | None = None) -> EntryReport:
    """The report of a judged history entry (a valid one filed under older stamps is listed as
    unclaimed: kept, never removed); ``identity`` is that of the file judged."""
    what = f"history {' > '.join(v.members)}" if v.members else "history"
    reason = f"{what}: {v.reason}" if v.reason else what
    return EntryReport(v.path, "", v.state, reason, file_size(v.path), unclaimed=bool(v.reason), members=v.members,
                       identity=identity)


def shared_data_root(store: FeatureStore) -> str | None:
    """Another data root known to share this dir-layout cache: the one its manifest records, when
    it is not this store's (a dataset and its copy with one ``--cache-dir``). None otherwise."""
    if store.layout != "dir":
        return None
    try:
        text = _core.read_manifest(store.manifest_path)
        recorded = json.loads(text).get("data_root") if text else None
    except (FeatstoreError, OSError, ValueError, AttributeError):
        return None
    if not isinstance(recorded, str) or os.path.abspath(recorded) == store.data_root:
        return None
    return os.path.abspath(recorded)


def _packed_orphans(store: FeatureStore, in_scope: set[str], threads: int | None) -> list[EntryReport]:
    """The packed entries of sources that are gone: no walk finds them (they are inside packs), the
    index names them."""
    if not os.path.isdir(store._core.packs_dir):
        return []
    gone = [s for s in map(os.fsdecode, store._core.indexed_sources()) if s not in in_scope]
    reports = []
    for rel, c in zip(gone, store.check_many(gone, threads=threads), strict=True):
        if c.packed is not None and c.state == "orphan":
            packed = (os.fspath(c.packed[0]), c.packed[1], c.packed[2])
            reports.append(EntryReport(os.fspath(c.entry), rel, c.state, c.reason, packed[2], identity=c.identity,
                                       packed=packed))
    return reports


def _unclaimed(store: FeatureStore, path: str, in_scope: set[str], claimed: dict[str, str],
               shared: str | None = None) -> EntryReport | None:
    """The verdict on an entry file no checked source led to, or None when it is out of scope
    (its source exists but is not among the sources looked at). Its identity is the file's stamp
    taken around the judgment (the header read, or the source found gone).

    In the dir layout other data roots may share the cache (a dataset and its ``cp -r`` copy),
    and which they are is known only where the manifest records another root (``shared``). An
    entry written for another file at the same relative path (another inode) is not provably
    this root's: valid when its bytes equal this root's source, else stale here, and either way
    marked ``keep`` (gc and quarantine leave it). One written for this very file (same inode) is
    this root's: superseded or stale. One whose source exists under ``shared`` as recorded is
    that root's valid entry."""
    before = file_identity(path)
    if store.layout == "sidecar":
        rel = os.path.relpath(path, store.data_root)[: -len(sidecar_suffix(store.feature))]
        if not os.path.lexists(os.path.join(store.data_root, rel)):
            return EntryReport(path, rel, "orphan", f"the source {rel} no longer exists", file_size(path),
                               identity=before)
        return None
    try:
        meta, _, _ = _core.read_header(path)
    except CorruptEntryError as exc:
        after = file_identity(path)
        return EntryReport(path, "", "corrupt", corrupt_reason(exc, path) + " (its source is unknown)",
                           file_size(path), identity=before if before == after else None)
    except OSError:
        return None
    identity = before if before is not None and before == file_identity(path) else None
    nbytes = identity[0] if identity is not None else file_size(path)

    def report(rel: str, state: str, reason: str) -> EntryReport:
        return EntryReport(path, rel, state, reason, nbytes, identity=identity)

    rel = meta.get("source", "")
    try:
        st: os.stat_result | None = os.stat(os.path.join(store.data_root, rel)) if rel else None
    except FileNotFoundError:
        st = None
    except OSError:
        return None
    if rel and shared is not None and _written_for(meta, os.path.join(shared, rel)):
        kept = report(rel, "valid", f"written for {os.path.join(shared, rel)}: the data root {shared} shares "
                      "this cache; kept (not this root's to remove)")
        kept.keep = kept.reason
        return kept
    if st is None:
        return report(rel, "orphan", f"the source {rel or '(unnamed)'} no longer exists")
    recorded_ino = meta.get("source.ino")
    ours = not recorded_ino or recorded_ino == str(st.st_ino)  # the same file, touched or edited in place
    if rel in claimed and ours:
        return report(rel, "stale", f"superseded: the source's current entry is {claimed[rel]}")
    if rel not in in_scope:
        return None
    try:
        same_bytes = _core.file_digest(os.path.join(store.data_root, rel)) == meta.get("source.blake3")
    except OSError:
        return None
    if same_bytes and not ours:
        same = report(rel, "valid", "written for another file with the same bytes at this path (a copy of the "
                      "data sharing this cache, or the source replaced by an identical file); kept")
        same.keep = same.reason
        return same
    if same_bytes:
        return report(rel, "valid", "filed under an older stamp of the source (same bytes); "
                      "kept, a lookup through the manifest moves it")
    if ours:
        return report(rel, "stale", "written for an older version of the source "
                      f"(size {meta.get('source.size')}, mtime_ns {meta.get('source.mtime_ns')})")
    other = report(rel, "stale", f"written for another file at this path (inode {recorded_ino}, size "
                   f"{meta.get('source.size')}; the source here is inode {st.st_ino}) with other bytes")
    other.keep = ("kept: written for another file at this path, perhaps by a copy of the data sharing this cache, "
                  "so not provably this root's to remove")
    return other


def _other_roots_entry(r: EntryReport, src: str) -> bool:
    """Whether the entry of ``r`` (its file, or its range of a pack) records ``src`` (another
    root's source) as it is now."""
    try:
        meta, _, _ = _core.read_header(*((r.packed[0], r.packed[1:]) if r.packed is not None else (r.path, None)))
    except (CorruptEntryError, OSError):
        return False
    return _written_for(meta, src)


def _written_for(meta: dict[str, str], src: str) -> bool:
    """Whether the file at ``src`` is the one the entry's header records (size, mtime and inode),
    or holds the bytes it records (touched since)."""
    try:
        st = os.stat(src)
    except OSError:
        return False
    recorded_ino = meta.get("source.ino")
    if (meta.get("source.size") == str(st.st_size) and meta.get("source.mtime_ns") == str(st.st_mtime_ns)
            and (not recorded_ino or recorded_ino == str(st.st_ino))):
        return True
    try:
        return meta.get("source.size") == str(st.st_size) and _core.file_digest(src) == meta.get("source.blake3")
    except OSError:
        return False
