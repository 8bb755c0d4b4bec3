"""Operating a cache: ``explain``, ``status``, ``verify``, ``gc``, ``migrate`` and ``bench``.

The ``featstore`` subcommands of the same names are thin wrappers around these functions. Each
returns a report with ``to_dict()`` (what ``--json`` prints) and ``text()`` (what a person reads).
Every verdict uses the entry states of :data:`featstore.store.STATES`.

What may be removed or moved is decided in one place, :func:`_feature_files`: files named like
this feature's entries (``<source>.<feature>.safetensors`` beside a source, or
``<cache_dir>/<feature>/<key[:2]>/<key32>.safetensors``) and the temporary files featstore's
atomic writes leave when interrupted (``.<entry or manifest name>.<random>.tmp``). Before an
entry is removed its header must name it a featstore entry of this feature, so a user's file that
merely looks like one is never touched, and a source never is.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from featstore import _core
from featstore.compat import load_legacy_sidecar
from featstore.errors import CorruptEntryError, DataRootError, FeatstoreError, NoImagesFoundError
from featstore.fmt import age as _age
from featstore.fmt import error_lines, human_bytes
from featstore.fmt import shown as _shown
from featstore.fmt import timestamp as _when
from featstore.progress import bar as _progress_bar
from featstore.store import FeatureStore, Status
from featstore.vocabulary import BAD_STATES, LEGACY_SIDECAR_SUFFIX, STATES, check_error

if TYPE_CHECKING:
    pass

# Names of a legacy SHA256 cache directory: sha256(path + image bytes) hex, first 16 digits.
_LEGACY_KEY = re.compile(r"^[0-9a-f]{16}$")
_DIR_ENTRY = re.compile(r"^[0-9a-f]{32}\.safetensors$")
# The random part the Rust writer (tempfile) puts between the target name and ".tmp".
_TMP_RANDOM = r"\.[A-Za-z0-9]+\.tmp$"
# Temporary files younger than this may belong to a write in progress: gc leaves them.
DEFAULT_MIN_TMP_AGE_S = 900.0


# ----------------------------------------------------------------------------------- helpers










def _base(store: FeatureStore) -> str:
    """Where the feature's files live: the data root (sidecar) or the cache directory (dir)."""
    return store.cache_dir or store.data_root




def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _corrupt_reason(exc: Exception, path: str) -> str:
    """The core's message without its ``corrupt entry <path>: `` prefix."""
    msg = str(exc)
    prefix = f"corrupt entry {path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def _featstore_meta(store: FeatureStore, path: str) -> dict[str, str] | None:
    """The header metadata of ``path`` if it is a readable featstore entry of this feature."""
    try:
        meta, _, _ = _core.read_header(path)
    except (CorruptEntryError, OSError):
        return None
    if not meta.get("featstore.format", "").startswith("featstore-entry") or meta.get("feature") != store.feature:
        return None
    return meta


def _not_writable(exc: OSError, path: str, directory: str, doing: str, done: int, total: int,
                  fix: str) -> PermissionError:
    """The error for a read-only cache: the path, what was done before it, and what to do."""
    return PermissionError(
        exc.errno or errno.EACCES,
        f"cannot {doing} {path}: {exc.strerror or exc}. {directory} is not writable by this user; {fix}. "
        f"{done} of {total} done before this, nothing was lost",
        path)


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


def _feature_files(store: FeatureStore) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """This feature's entry files and featstore's temporary files (absolute paths), and walk errors.

    Sidecar: ``*.<feature>.safetensors`` under the data root. Dir: ``<key[:2]>/<key32>.safetensors``
    under ``<cache_dir>/<feature>``. Temporary files: ``.<such a name>.<random>.tmp`` beside
    them, and ``.<manifest name>.<random>.tmp`` beside the manifest. ``.featstore`` directories
    (frame sets, quarantine) are not walked.
    """
    suffix = f".{store.feature}.safetensors"
    manifest = store.manifest_path
    tmp_manifest = re.compile(r"^\." + re.escape(os.path.basename(manifest)) + _TMP_RANDOM)
    if store.layout == "sidecar":
        base = store.data_root
        tmp_entry = re.compile(r"^\..+" + re.escape(suffix) + _TMP_RANDOM)
    else:
        assert store.cache_dir is not None
        base = os.path.join(store.cache_dir, store.feature)
        if not os.path.isdir(base):
            return [], [], []
        tmp_entry = re.compile(r"^\.[0-9a-f]{32}\.safetensors" + _TMP_RANDOM)
    paths, _, _, errors, _ = _core.scan(base, extensions=["safetensors", "tmp"])
    entries: list[str] = []
    temps: list[str] = []
    for p in map(os.fspath, paths):
        full = os.path.join(base, p)
        name, parent = os.path.basename(p), os.path.dirname(p)
        in_key_dir = store.layout == "sidecar" or parent == name[1:3]
        if name.endswith(".tmp"):
            if (tmp_entry.match(name) and in_key_dir) or (
                    tmp_manifest.match(name) and os.path.dirname(full) == os.path.dirname(manifest)):
                temps.append(full)
        elif store.layout == "sidecar":
            if name.endswith(suffix) and len(name) > len(suffix):
                entries.append(full)
        elif _DIR_ENTRY.match(name) and parent == name[:2]:
            entries.append(full)
    return entries, temps, [(os.fspath(a), b) for a, b in errors]


@dataclass
class _Survey:
    reports: list[EntryReport]
    missing: int
    temps: list[str]
    errors: list[tuple[str, str]]

    def counts(self) -> dict[str, int]:
        counts = {s: 0 for s in STATES}
        counts["missing"] = self.missing
        for r in self.reports:
            counts[r.state] += 1
        return counts


def _survey(store: FeatureStore, rels: Sequence[str], *, deep: bool, threads: int | None,
            progress: bool | None) -> _Survey:
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
        by_path[path] = EntryReport(path, rel, state, reason, _size(path))
        claimed[rel] = path
    entries, temps, walk_errors = _feature_files(store)
    errors.extend(walk_errors)
    in_scope = set(rels)
    for path in entries:
        if path not in by_path:
            report = _unclaimed(store, path, in_scope, claimed)
            if report is not None:
                report.unclaimed = True
                by_path[path] = report
    survey = _Survey(sorted(by_path.values(), key=lambda r: r.path), missing, sorted(temps), errors)
    if deep:
        _verify_contents(store, survey, threads, progress)
    return survey


def _unclaimed(store: FeatureStore, path: str, in_scope: set[str], claimed: dict[str, str]) -> EntryReport | None:
    """The verdict on an entry file no checked source led to, or None when it is out of scope
    (its source exists but is not among the sources looked at)."""
    nbytes = _size(path)
    if store.layout == "sidecar":
        rel = os.path.relpath(path, store.data_root)[: -len(f".{store.feature}.safetensors")]
        if not os.path.lexists(os.path.join(store.data_root, rel)):
            return EntryReport(path, rel, "orphan", f"the source {rel} no longer exists", nbytes)
        return None
    try:
        meta, _, _ = _core.read_header(path)
    except CorruptEntryError as exc:
        return EntryReport(path, "", "corrupt", _corrupt_reason(exc, path) + " (its source is unknown)", nbytes)
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


def _verify_contents(store: FeatureStore, survey: _Survey, threads: int | None, progress: bool | None) -> None:
    """Reads every readable entry in full (header, shapes, ``data.blake3``) and every legacy
    sidecar (``weights_only`` unpickling), marking the bad ones corrupt."""
    todo = [r for r in survey.reports if r.state in ("valid", "stale", "foreign", "legacy")]
    if any(r.state == "legacy" or r.path.endswith(LEGACY_SIDECAR_SUFFIX) for r in todo):
        import torch  # noqa: F401  (import once here, not concurrently in the workers)

    def check(r: EntryReport) -> tuple[str, str] | None:
        if r.path.endswith(LEGACY_SIDECAR_SUFFIX):
            try:
                load_legacy_sidecar(r.path)
            except CorruptEntryError as exc:
                return "corrupt", str(exc)
            return None
        try:
            meta = _core.verify_entry(r.path)
        except CorruptEntryError as exc:
            return "corrupt", _corrupt_reason(exc, r.path)
        if meta.get("feature") != store.feature:
            return "corrupt", f"the entry belongs to feature {meta.get('feature')!r}, not {store.feature!r}"
        if store.layout == "dir" and r.source and meta.get("source") != r.source:
            return "corrupt", f"the entry names its source {meta.get('source')!r}, not {r.source!r}"
        return None

    def guarded(r: EntryReport) -> tuple[str, str] | None:
        try:
            return check(r)
        except OSError as exc:
            return "error", str(exc)

    workers = threads or _core.default_threads()
    with ThreadPoolExecutor(max_workers=workers) as pool, _progress_bar(
            len(todo), "verifying entries", show=progress, unit="entries") as bar:
        for r, verdict in zip(todo, pool.map(guarded, todo), strict=True):
            bar.update(1)
            if verdict is None:
                continue
            if verdict[0] == "error":
                survey.errors.append((r.path, verdict[1]))
            else:
                r.state, r.reason = verdict
                store.forget(r.source)


def merge_leftover_journals(store: FeatureStore) -> int:
    """Merges journals an interrupted or unfinished precompute left beside the manifest, when no
    run of the feature holds its lock (a running one merges its own at the end). Returns the
    number of journals merged; 0 when there were none, a run is active, or the manifest's
    directory is not writable (status never fails for that)."""
    from featstore.errors import LockHeldError, ReadOnlyDataRootError
    from featstore.lock import maintenance_lock

    if not store.journal_paths():
        return 0
    try:
        with maintenance_lock(store, "merge journals"):
            journals, _, _ = _core.merge_journals(store.manifest_path)
    except (LockHeldError, ReadOnlyDataRootError, PermissionError):
        return 0
    return journals




# ----------------------------------------------------------------------------------- status
@dataclass
class StatusReport:
    """Counts per state (``FeatureStore.status``) plus where they came from.

    Attributes
    ----------
    status : Status
        The counts.
    seconds : float
        Time the check took.
    manifest : str or None
        The manifest whose index answered for indexed sources (None: there is none).
    journals : list of str
        Per-rank journals beside the manifest, not yet merged into it.
    """

    status: Status
    seconds: float
    manifest: str | None
    journals: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {**self.status.to_dict(), "seconds": round(self.seconds, 3), "manifest": self.manifest,
                "journals": self.journals}

    def text(self) -> str:
        st = self.status
        counts = st.counts
        lines = [f"feature {st.feature} under {st.data_root} ({st.layout} layout, fingerprint "
                 f"{st.fingerprint or 'any'}): {st.sources:,} sources"]
        for s in STATES:
            if s != "corrupt" or counts.get(s):
                lines.append(f"  {s:8} {counts.get(s, 0):>10,}")
        if self.manifest:
            lines.append(f"checked in {self.seconds:.2f} s; sources indexed by {self.manifest} opened no entry")
        else:
            lines.append(f"checked in {self.seconds:.2f} s; no manifest, so each entry's header was read once "
                         f"(`featstore scan --feature {st.feature} --write-manifest` indexes them)")
        if self.journals:
            lines.append(f"{len(self.journals)} per-rank journals beside the manifest are not merged yet "
                         "(a precompute is running or was interrupted): " + ", ".join(self.journals))
        lines.append("corrupt entries are found by `featstore verify`, which reads every entry")
        if counts.get("legacy"):
            lines.append("`featstore migrate` converts the legacy files")
        if counts.get("stale") or counts.get("orphan") or counts.get("foreign"):
            lines.append("`featstore gc --dry-run` lists what can be removed")
        if st.errors:
            lines.extend(error_lines(st.errors, "sources could not be checked"))
        return "\n".join(lines)


def status(store: FeatureStore, sources: Sequence[str] | None = None, *, threads: int | None = None,
           progress: bool | None = None) -> StatusReport:
    """Counts entries per state: two ``stat`` calls per source, no entry opened for sources the
    manifest indexes. ``corrupt`` entries are only found by :func:`verify`.

    Parameters
    ----------
    store : FeatureStore
        The store (its manifest index was read when it was opened).
    sources : sequence of str, optional
        Relative source paths (default: a scan of the data root).
    threads : int, optional
        Worker threads (default: one per core).
    progress : bool or None
        Progress bar on stderr for long checks (None: when it lasts over half a second).
    """
    t0 = time.perf_counter()
    st = store.status(sources, threads=threads, progress=progress)
    seconds = time.perf_counter() - t0
    manifest = store.manifest_path if os.path.exists(store.manifest_path) else None
    return StatusReport(st, seconds, manifest, store.journal_paths())


# ----------------------------------------------------------------------------------- verify
@dataclass
class VerifyReport:
    """What :func:`verify` found.

    Attributes
    ----------
    counts : dict of str to int
        Entries (and sources without one, ``missing``) per state after reading every entry.
    problems : list of EntryReport
        Every bad entry (corrupt, stale, foreign, orphan) with its reason.
    quarantined : list of (str, str)
        ``(from, to)`` of the entries moved aside.
    """

    feature: str
    layout: str
    data_root: str
    sources: int
    counts: dict[str, int]
    entries: int
    bytes: int
    problems: list[EntryReport]
    quarantined: list[tuple[str, str]]
    quarantine_dir: str | None
    errors: list[tuple[str, str]]
    seconds: float
    base: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems and not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "layout": self.layout, "data_root": self.data_root,
                "sources": self.sources, "counts": self.counts, "entries": self.entries,
                "bytes": self.bytes, "problems": [p.to_dict() for p in self.problems],
                "quarantined": [list(q) for q in self.quarantined], "quarantine_dir": self.quarantine_dir,
                "errors": [list(e) for e in self.errors], "seconds": round(self.seconds, 3), "ok": self.ok}

    def text(self) -> str:
        def shown(p: str) -> str:
            return _shown(self.base, p)

        lines = [f"verified feature {self.feature} under {self.data_root} ({self.layout} layout): "
                 f"{self.sources:,} sources, {self.entries:,} entries read in full "
                 f"({human_bytes(self.bytes)}) in {self.seconds:.2f} s",
                 "  " + "  ".join(f"{s} {n:,}" for s, n in self.counts.items())]
        if self.problems:
            lines.append(f"{len(self.problems):,} bad entries:")
            lines.extend(f"  {p.state:8} {shown(p.path)}: {p.reason}" for p in self.problems)
        else:
            lines.append("no bad entries")
        if self.quarantined:
            lines.append(f"moved {len(self.quarantined):,} bad entries into {self.quarantine_dir} "
                         "(nothing deleted; see quarantine.jsonl there)")
        elif self.problems:
            lines.append("`featstore verify --quarantine` moves them aside; `featstore gc` removes stale, "
                         "foreign and orphaned ones")
        if self.errors:
            lines.extend(error_lines(self.errors, "could not be checked"))
        return "\n".join(lines)


def quarantine_dir(store: FeatureStore) -> str:
    """``<data root or cache dir>/.featstore/<feature>/quarantine``: where bad entries are moved."""
    return os.path.join(store.state_dir, "quarantine")


def quarantine(store: FeatureStore, bad: Sequence[EntryReport]) -> list[tuple[str, str]]:
    """:func:`_quarantine` under the feature's lock: refused while a precompute runs."""
    from featstore.lock import maintenance_lock

    with maintenance_lock(store, "quarantine entries"):
        return _quarantine(store, bad)


def _quarantine(store: FeatureStore, bad: Sequence[EntryReport]) -> list[tuple[str, str]]:
    """Moves bad entry files into :func:`quarantine_dir`, keeping their names relative to the
    data root (sidecar) or cache directory (dir). Never deletes; logs each move to
    ``quarantine.jsonl`` there. Returns ``(from, to)`` pairs.

    Raises
    ------
    PermissionError
        The cache is not writable by this user (the message names the path and what to do).
    """
    qdir = quarantine_dir(store)
    base = _base(store)
    moved: list[tuple[str, str]] = []
    for r in bad:
        rel = os.path.relpath(r.path, base)
        if rel.startswith(".."):
            rel = os.path.basename(r.path)
        dst = os.path.join(qdir, rel)
        n = 1
        while os.path.lexists(dst):
            dst = f"{os.path.join(qdir, rel)}.{n}"
            n += 1
        try:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.rename(r.path, dst)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                shutil.move(r.path, dst)
            with open(os.path.join(qdir, "quarantine.jsonl"), "a", encoding="utf-8") as log:
                log.write(json.dumps({"from": r.path, "to": dst, "state": r.state, "reason": r.reason,
                                      "source": r.source, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        except FileNotFoundError:
            if not os.path.lexists(r.path):
                continue  # removed by someone else meanwhile
            raise
        except PermissionError as exc:
            raise _not_writable(exc, r.path, base, "move into the quarantine", len(moved), len(bad),
                                "run `featstore verify --quarantine` as the cache's owner, or without "
                                "--quarantine to only report") from exc
        if r.source:
            store.forget(r.source)
        moved.append((r.path, dst))
    return moved


def verify(store: FeatureStore, sources: Sequence[str], *, quarantine_bad: bool = False,
           threads: int | None = None, progress: bool | None = None) -> VerifyReport:
    """Reads every entry in full and reports each bad one with its reason.

    Each entry's header is validated (bounded JSON, dtypes, shapes against byte counts, offsets
    in range, no overlaps), its data checked against ``data.blake3``, its fingerprint, source
    stamp (digest when the stamp moved) and extra inputs compared, the manifest's index
    notwithstanding. Legacy sidecars are unpickled with ``weights_only=True``. Entries whose
    source is gone are reported as orphans.

    Parameters
    ----------
    store : FeatureStore
        The store to verify.
    sources : sequence of str
        Relative source paths (a scan of the data root).
    quarantine_bad : bool
        Move every bad entry into :func:`quarantine_dir` (never deletes).
    threads : int, optional
        Worker threads (default: one per core).
    progress : bool or None
        Progress bars on stderr for long work.
    """
    t0 = time.perf_counter()
    survey = _survey(store, sources, deep=True, threads=threads, progress=progress)
    problems = [r for r in survey.reports if r.state in BAD_STATES]
    read = [r for r in survey.reports if r.state != "orphan"]
    moved = quarantine(store, problems) if quarantine_bad and problems else []
    return VerifyReport(store.feature, store.layout, store.data_root, len(sources), survey.counts(), len(read),
                        sum(r.bytes for r in read), problems, moved, quarantine_dir(store) if moved else None,
                        survey.errors, time.perf_counter() - t0, _base(store))


# ----------------------------------------------------------------------------------- gc
@dataclass
class GcItem:
    """A file gc removes (or keeps, with the reason).

    Attributes
    ----------
    path : str
        The file (absolute).
    kind : str
        ``orphan``, ``stale``, ``foreign``, ``temp``, or for kept files ``corrupt``, ``legacy``,
        ``valid``.
    reason : str
        Why.
    bytes : int
        Its size.
    """

    path: str
    kind: str
    reason: str
    bytes: int
    source: str = ""
    identity: tuple[int, int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "reason": self.reason, "bytes": self.bytes,
                "source": self.source}


@dataclass
class GcReport:
    """gc's plan and, unless a dry run, what it removed.

    Attributes
    ----------
    remove : list of GcItem
        Files to remove (planned).
    kept : list of GcItem
        Files gc leaves, with the reason (corrupt: ``verify --quarantine``; legacy: ``migrate``).
    removed : list of GcItem
        Files removed (empty in a dry run).
    skipped : list of (str, str)
        Planned files left alone at removal time (changed or gone meanwhile).
    """

    feature: str
    layout: str
    data_root: str
    base: str
    remove: list[GcItem]
    kept: list[GcItem]
    dry_run: bool
    removed: list[GcItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Bytes of the files planned for removal."""
        return sum(i.bytes for i in self.remove)

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "layout": self.layout, "data_root": self.data_root,
                "dry_run": self.dry_run, "bytes": self.bytes, "remove": [i.to_dict() for i in self.remove],
                "kept": [i.to_dict() for i in self.kept], "removed": [i.to_dict() for i in self.removed],
                "removed_bytes": sum(i.bytes for i in self.removed),
                "skipped": [list(s) for s in self.skipped], "errors": [list(e) for e in self.errors]}

    def text(self, limit: int = 100) -> str:
        def shown(p: str) -> str:
            return _shown(self.base, p)

        lines = [f"gc of feature {self.feature} under {self.data_root} ({self.layout} layout): "
                 f"{len(self.remove):,} files, {human_bytes(self.bytes)} to remove"]
        for kind in ("orphan", "stale", "foreign", "temp"):
            items = [i for i in self.remove if i.kind == kind]
            for i in items[:limit]:
                lines.append(f"  {kind:8} {shown(i.path)}  {human_bytes(i.bytes)}  ({i.reason})")
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit:,} more {kind} files (--json lists all)")
        if self.kept:
            by_kind: dict[str, int] = {}
            for i in self.kept:
                by_kind[i.kind] = by_kind.get(i.kind, 0) + 1
            lines.append("kept: " + ", ".join(f"{n:,} {k}" for k, n in sorted(by_kind.items())))
            lines.extend(f"  {i.kind:8} {shown(i.path)}  ({i.reason})" for i in self.kept[:limit])
        if self.dry_run:
            lines.append("dry run: nothing removed; run without --dry-run to remove them")
        else:
            lines.append(f"removed {len(self.removed):,} files, {human_bytes(sum(i.bytes for i in self.removed))}")
        for p, why in self.skipped[:limit]:
            lines.append(f"  left alone {shown(p)}: {why}")
        if self.errors:
            lines.extend(error_lines(self.errors, "paths could not be checked"))
        return "\n".join(lines)


class WrongDataRootError(DataRootError):
    """gc found entries but none belongs to a source under the data root: probably the wrong root."""


def _recorded_data_root(store: FeatureStore) -> str | None:
    """The data root a dir-layout cache's manifest records (sidecar entries sit beside their
    sources, so any root that holds them is theirs)."""
    if store.layout != "dir":
        return None
    try:
        text = _core.read_manifest(store.manifest_path)
        recorded = json.loads(text).get("data_root") if text else None
    except (FeatstoreError, OSError, ValueError):
        return None
    return os.path.abspath(recorded) if isinstance(recorded, str) else None


def plan_gc(store: FeatureStore, sources: Sequence[str], *, keep_fingerprints: Iterable[str] = (),
            min_tmp_age_s: float = DEFAULT_MIN_TMP_AGE_S, force: bool = False, threads: int | None = None,
            progress: bool | None = None) -> GcReport:
    """Lists what :func:`execute_gc` would remove: orphaned, stale and foreign entries of this
    feature, and featstore's temporary files older than ``min_tmp_age_s``.

    Corrupt entries are kept (``featstore verify --quarantine`` moves them aside) and so are
    legacy files (``featstore migrate``). A file is planned only if its name is this feature's
    entry naming (or featstore's temporary naming) and, for entries, its header says it is a
    featstore entry of this feature: a source is never planned.

    Parameters
    ----------
    store : FeatureStore
        The store; its fingerprint decides what is foreign.
    sources : sequence of str
        Relative source paths (a scan of the data root).
    keep_fingerprints : iterable of str
        Foreign entries with one of these fingerprints are kept.
    min_tmp_age_s : float
        Temporary files younger than this (seconds) may be a write in progress: kept.
    force : bool
        Plan even for a data root the cache does not seem to be made for: another root than the
        one a dir-layout manifest records, or one where every entry would be an orphan.

    Raises
    ------
    WrongDataRootError
        One of those, and ``force`` is not set.
    """
    keep_fps = set(keep_fingerprints)
    recorded = _recorded_data_root(store)
    if recorded and recorded != store.data_root and not force:
        raise WrongDataRootError(
            f"the cache {_base(store)} was made for the data root {recorded} (its manifest says so), not "
            f"{store.data_root}: against another root its entries would look orphaned or stale. Pass that root, "
            "or --force if the data really moved there")
    survey = _survey(store, sources, deep=False, threads=threads, progress=progress)
    never = {os.path.join(store.data_root, s) for s in sources}
    remove: list[GcItem] = []
    kept: list[GcItem] = []
    for r in survey.reports:
        legacy = r.path.endswith(LEGACY_SIDECAR_SUFFIX)
        item = GcItem(r.path, r.state, r.reason, r.bytes, r.source, _identity(r.path))
        if r.state not in ("orphan", "stale", "foreign") or legacy:
            if legacy:
                item.kind = "legacy"
                item.reason = "old-format cache: `featstore migrate` converts it, gc never removes it"
                kept.append(item)
            elif r.state == "corrupt":
                item.reason += "; `featstore verify --quarantine` moves it aside"
                kept.append(item)
            elif r.unclaimed and r.state == "valid":
                kept.append(item)  # filed under an older stamp of its source: still good
            continue
        meta = _featstore_meta(store, r.path)
        if meta is None or r.path in never:
            item.kind, item.reason = "unknown", "named like an entry but not a featstore entry of this feature"
            kept.append(item)
            continue
        if r.state == "foreign" and meta.get("fingerprint", "") in keep_fps:
            item.reason = f"kept: fingerprint {meta.get('fingerprint')} is in --keep-fingerprint"
            kept.append(item)
            continue
        remove.append(item)
    now = time.time_ns()
    for t in survey.temps:
        ident = _identity(t)
        if ident is None or t in never:
            continue
        age_s = (now - ident[2]) / 1e9
        if age_s < min_tmp_age_s:
            kept.append(GcItem(t, "temp", f"written {age_s:.0f} s ago: may be a write in progress "
                               f"(--min-tmp-age {min_tmp_age_s:.0f})", ident[1], "", ident))
        else:
            remove.append(GcItem(t, "temp", f"left by an interrupted write {_age(age_s)} ago", ident[1], "", ident))
    belongs = [r for r in survey.reports if r.state != "orphan"]
    orphans = [i for i in remove if i.kind == "orphan"]
    if orphans and not belongs and not force:
        raise WrongDataRootError(
            f"all {len(orphans):,} entries of feature {store.feature} under {_base(store)} are orphans: none "
            f"belongs to a source under {store.data_root} ({len(sources):,} sources found). Is that the data "
            "root these entries were made for? Pass --force to remove them anyway")
    return GcReport(store.feature, store.layout, store.data_root, _base(store), remove, kept, True,
                    errors=survey.errors)


def execute_gc(store: FeatureStore, plan: GcReport, *, progress: bool | None = None) -> GcReport:
    """:func:`_execute_gc` under the feature's lock: refused while a precompute runs."""
    from featstore.lock import maintenance_lock

    with maintenance_lock(store, "collect garbage"):
        return _execute_gc(store, plan, progress=progress)


def _execute_gc(store: FeatureStore, plan: GcReport, *, progress: bool | None = None) -> GcReport:
    """Removes the files of ``plan`` (from :func:`plan_gc`) and returns it completed.

    A planned file that changed since planning (another size, mtime or inode: a writer replaced
    it) or vanished is left alone and listed in ``skipped``. Empty key directories of the dir
    layout are removed.

    Raises
    ------
    PermissionError
        The cache is not writable by this user; the message names the path and what to do. Files
        removed before it stay removed, nothing else is touched.
    """
    plan.dry_run = False
    key_dirs: set[str] = set()
    with _progress_bar(len(plan.remove), "removing", show=progress, unit="files") as bar:
        for item in plan.remove:
            bar.update(1)
            if _identity(item.path) != item.identity:
                plan.skipped.append((item.path, "changed or gone since planning"))
                continue
            try:
                os.remove(item.path)
            except FileNotFoundError:
                plan.skipped.append((item.path, "already gone"))
                continue
            except PermissionError as exc:
                raise _not_writable(exc, item.path, os.path.dirname(item.path), "remove", len(plan.removed),
                                    len(plan.remove), "run gc as the cache's owner, or make it writable "
                                    "(chmod u+w)") from exc
            plan.removed.append(item)
            if item.source and item.kind != "temp":
                store.forget(item.source)
            key_dirs.add(os.path.dirname(item.path))
    if store.layout == "dir":
        for d in sorted(key_dirs):  # key directories gc emptied
            try:
                os.rmdir(d)  # only succeeds when empty
            except OSError:
                pass
    return plan


# ----------------------------------------------------------------------------------- migrate
@dataclass
class MigrateItem:
    """One legacy file to convert.

    Attributes
    ----------
    source : str
        The source it belongs to, relative to the data root.
    legacy : str
        The legacy file (``<image>.vggt_cache.pt`` or ``<legacy dir>/<sha16>.pt``).
    kind : str
        ``sidecar`` or ``dir``.
    bytes : int
        Size of the legacy file.
    stamp : (int, int)
        The source's (size, mtime_ns) when planned; conversion refuses a source changed since.
    via : str
        For ``dir``: the path as the old loader passed it (what its key was computed over).
    """

    source: str
    legacy: str
    kind: str
    bytes: int
    stamp: tuple[int, int]
    via: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "legacy": self.legacy, "kind": self.kind, "bytes": self.bytes,
                "via": self.via}


@dataclass
class MigrateReport:
    """The plan of :func:`plan_migrate` and, once executed, its outcome.

    Attributes
    ----------
    convert : list of MigrateItem
        Legacy files to convert (planned).
    skipped : list of (str, str)
        Legacy files with nothing to do (the source already has a valid entry, a duplicate).
    refused : list of (str, str)
        Legacy files that will not be converted: older than their image, not a pickle of plain
        tensors (found when converting).
    unmatched : list of (str, str)
        Legacy files that belong to no source.
    converted : list of (MigrateItem, str)
        Executed: each converted item and the entry written.
    failed : list of (str, str)
        Executed: legacy files whose conversion failed, with the reason.
    deleted : list of str
        Executed with ``delete_old``: the legacy files removed after conversion.
    """

    feature: str
    layout: str
    data_root: str
    fingerprint: str | None
    legacy_dirs: list[str]
    old_roots: list[str]
    convert: list[MigrateItem]
    skipped: list[tuple[str, str]]
    refused: list[tuple[str, str]]
    unmatched: list[tuple[str, str]]
    matched_by: dict[str, int]
    sources: list[str] = field(default_factory=list, repr=False)
    # Other legacy files of a planned source, tried in order when the planned one is refused.
    alternatives: dict[str, list[MigrateItem]] = field(default_factory=dict, repr=False)
    executed: bool = False
    converted: list[tuple[MigrateItem, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    manifest: str | None = None

    @property
    def ok(self) -> bool:
        """Nothing refused, unmatched or failed, and something found to migrate."""
        found = self.convert or self.skipped or self.converted
        return bool(found) and not (self.refused or self.unmatched or self.failed)

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "layout": self.layout, "data_root": self.data_root,
                "fingerprint": self.fingerprint, "legacy_dirs": self.legacy_dirs, "old_roots": self.old_roots,
                "executed": self.executed, "convert": [i.to_dict() for i in self.convert],
                "bytes": sum(i.bytes for i in self.convert), "matched_by": self.matched_by,
                "skipped": [list(s) for s in self.skipped], "refused": [list(r) for r in self.refused],
                "unmatched": [list(u) for u in self.unmatched],
                "converted": [{**i.to_dict(), "entry": e} for i, e in self.converted],
                "failed": [list(f) for f in self.failed], "deleted": self.deleted, "manifest": self.manifest,
                "ok": self.ok}

    def text(self, limit: int = 100) -> str:
        lines = [f"migrate legacy caches into feature {self.feature} under {self.data_root} ({self.layout} "
                 "layout); new entries get fingerprint "
                 f"{self.fingerprint or '(none)'}"]
        sidecars = [i for i in self.convert if i.kind == "sidecar"]
        dirs = [i for i in self.convert if i.kind == "dir"]
        lines.append(f"  convert   {len(self.convert):>8,}  {human_bytes(sum(i.bytes for i in self.convert))}: "
                     f"{len(sidecars):,} <image>{LEGACY_SIDECAR_SUFFIX} sidecars, {len(dirs):,} from "
                     + (", ".join(self.legacy_dirs) or "no legacy cache directory"))
        for prefix, n in self.matched_by.items():
            lines.append(f"            {n:>8,}  matched as the old loader passed {prefix}/<relative path>")
        for label, items in (("skip", self.skipped), ("refuse", self.refused), ("unmatched", self.unmatched)):
            lines.append(f"  {label:9} {len(items):>8,}")
            lines.extend(f"    {p}: {why}" for p, why in items[:limit])
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit:,} more (--json lists all)")
        if not self.executed:
            if self.convert:
                lines.append("plan only: nothing written. Run again with --yes to convert; the old cache is kept "
                             "unless --delete-old. Each file is unpickled with weights_only=True when converted; "
                             "one that is not plain tensors is refused then.")
            elif not (self.skipped or self.refused or self.unmatched):
                lines.append(f"no legacy cache found: no <image>{LEGACY_SIDECAR_SUFFIX} beside the sources"
                             + (f" and no <sha16>.pt in {', '.join(self.legacy_dirs)}" if self.legacy_dirs else
                                "; pass --legacy-dir DIR for a SHA256-named cache directory"))
        else:
            lines.append(f"converted {len(self.converted):,} files into featstore entries"
                         + (f"; manifest written: {self.manifest}" if self.manifest else ""))
            lines.extend(f"  failed {p}: {why}" for p, why in self.failed[:limit])
            lines.append(f"deleted {len(self.deleted):,} converted legacy files" if self.deleted
                         else "the old cache is kept (--delete-old removes converted files)")
        if self.unmatched and self.legacy_dirs and not self.old_roots:
            lines.append("hint: if the data root moved since the legacy cache was made, pass --old-root PREFIX "
                         "(the data root as the old loader saw it)")
        return "\n".join(lines)


def _legacy_manifest_hints(directory: str) -> dict[str, str]:
    """``{sha16: path as the old loader gave it}`` from an old cache's ``manifest.json``, when it
    maps hashes to paths (in either direction, at the top level or one level down). Optional:
    migration matches by recomputing keys; hints only save work and reveal a moved root."""
    try:
        with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    hints: dict[str, str] = {}

    def key_of(v: object) -> str | None:
        if isinstance(v, str):
            k = v.removesuffix(".pt")
            return k if _LEGACY_KEY.match(k) else None
        return None

    def path_of(v: object) -> str | None:
        if isinstance(v, str):
            return v
        if isinstance(v, dict):
            for name in ("path", "image_path", "source", "file"):
                if isinstance(v.get(name), str):
                    return v[name]
        return None

    def visit(obj: object, depth: int) -> None:
        if depth > 2:
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                key, path = key_of(k), path_of(v)
                if key and path:
                    hints[key] = path
                elif isinstance(k, str) and key_of(v):
                    hints[key_of(v) or ""] = k
                else:
                    visit(v, depth + 1)
        elif isinstance(obj, list):
            for item in obj:
                if isinstance(item, dict):
                    key = next((key_of(item.get(n)) for n in ("hash", "key", "cache_key", "sha256")
                                if key_of(item.get(n))), None)
                    path = path_of(item)
                    if key and path:
                        hints[key] = path
                        continue
                visit(item, depth + 1)

    visit(doc, 0)
    return hints


def _legacy_keys(store: FeatureStore, pairs: Sequence[tuple[str, str]], threads: int | None,
                 progress: bool | None, desc: str) -> list[str | None]:
    """Legacy keys of ``(path as given, relative source)`` pairs, in parallel, in chunks (for
    the progress bar); None where a source cannot be read."""
    out: list[str | None] = []
    chunk = 4096
    with _progress_bar(len(pairs), desc, show=progress, unit="sources") as bar:
        for i in range(0, len(pairs), chunk):
            part = pairs[i: i + chunk]
            out.extend(_core.legacy_sha256_keys([os.fsencode(g) for g, _ in part],
                                                [os.path.join(store.data_root, r) for _, r in part], threads))
            bar.update(len(part))
    return out


def plan_migrate(store: FeatureStore, sources: Sequence[str], *, legacy_dirs: Sequence[str] = (),
                 old_roots: Sequence[str] = (), threads: int | None = None,
                 progress: bool | None = None) -> MigrateReport:
    """Plans converting legacy caches into featstore entries; writes nothing.

    Two kinds of legacy cache are found:

    - ``<image>.vggt_cache.pt`` sidecars beside the sources. One older than its image (the image
      was edited after caching) is refused.
    - SHA256-named cache directories (``legacy_dirs``): ``<dir>/<sha16>.pt`` where ``sha16`` is
      ``sha256(path as the old loader passed it + image bytes)[:16]``. The hash-to-path map is
      rebuilt by computing that key for every source, in parallel, for each way the old loader
      may have named it: ``<data root>/<rel>`` and ``<old root>/<rel>`` for each of
      ``old_roots`` (given as the old loader saw them: not made absolute). An old
      ``manifest.json`` mapping hashes to paths is used as a hint when present (it also reveals
      an old root) but never trusted: every match is a recomputed key. An image changed since
      caching matches nothing (its bytes are in the key).

    Legacy files that belong to no source are reported as unmatched.

    Parameters
    ----------
    store : FeatureStore
        Where the entries will be written (layout, feature, fingerprint).
    sources : sequence of str
        Relative source paths (a scan of the data root).
    legacy_dirs : sequence of str
        SHA256-named cache directories.
    old_roots : sequence of str
        Where the data was when the legacy cache was made.
    """
    root = store.data_root
    rels = list(sources)
    in_scope = set(rels)
    stamps: dict[str, tuple[int, int]] = {}

    def stamp(rel: str) -> tuple[int, int] | None:
        if rel not in stamps:
            try:
                st = os.stat(os.path.join(root, rel))
            except OSError:
                return None
            stamps[rel] = (st.st_size, st.st_mtime_ns)
        return stamps[rel]

    convert: list[MigrateItem] = []
    skipped: list[tuple[str, str]] = []
    refused: list[tuple[str, str]] = []
    unmatched: list[tuple[str, str]] = []
    taken: dict[str, str] = {}  # source -> legacy file planned for it
    alternatives: dict[str, list[MigrateItem]] = {}

    def consider(rel: str, legacy: str, kind: str, via: str = "") -> None:
        if rel in taken:
            skipped.append((legacy, f"duplicate: {taken[rel]} is converted for {rel} (this one if that is refused)"))
            alternatives.setdefault(rel, []).append(MigrateItem(rel, legacy, kind, _size(legacy), stamps[rel], via))
            return
        src_stamp = stamp(rel)
        if src_stamp is None:
            unmatched.append((legacy, f"its image {rel} cannot be read"))
            return
        state = store.check(rel)[0]
        if state == "valid":
            skipped.append((legacy, f"{rel} already has a valid featstore entry"))
            return
        if state == "foreign":
            skipped.append((legacy, f"{rel} has a featstore entry of another fingerprint; left as it is"))
            return
        taken[rel] = legacy
        convert.append(MigrateItem(rel, legacy, kind, _size(legacy), src_stamp, via))

    # Sidecars: every <x>.vggt_cache.pt under the root, whether or not x is a source.
    found, _, _, _, _ = _core.scan(root, extensions=["pt"], skip_dirs=[store.cache_dir] if store.cache_dir else [])
    for p in sorted(map(os.fspath, found)):
        if not p.endswith(LEGACY_SIDECAR_SUFFIX):
            continue
        legacy = os.path.join(root, p)
        rel = p[: -len(LEGACY_SIDECAR_SUFFIX)]
        if rel not in in_scope:
            gone = not os.path.lexists(os.path.join(root, rel))
            unmatched.append((legacy, f"its image {rel} " + ("no longer exists" if gone else
                                                             "is not among the sources (see --ext)")))
            continue
        src_stamp = stamp(rel)
        legacy_mtime = os.stat(legacy).st_mtime_ns
        if src_stamp is not None and legacy_mtime < src_stamp[1]:
            refused.append((legacy, f"older than its image (image modified {_when(src_stamp[1])}, cache written "
                            f"{_when(legacy_mtime)}): the image changed after caching; recompute it instead"))
            continue
        consider(rel, legacy, "sidecar")

    # SHA256-named directories.
    matched_by: dict[str, int] = {}
    dirs = [os.path.abspath(d) for d in legacy_dirs]
    for d in dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(errno.ENOENT, f"legacy cache directory {d} does not exist; pass the directory "
                                    "holding the old <sha16>.pt files (--legacy-dir)", d)
    files: dict[str, list[str]] = {}
    for d in dirs:
        with os.scandir(d) as it:
            for e in sorted(it, key=lambda e: e.name):
                if not e.name.endswith(".pt") or not e.is_file():
                    continue
                key = e.name[:-3]
                if _LEGACY_KEY.match(key):
                    files.setdefault(key, []).append(e.path)
                else:
                    unmatched.append((e.path, "not named <sha256[:16]>.pt: not a legacy cache file"))
    remaining = set(files)
    matches: dict[str, tuple[str, str]] = {}  # key -> (rel, path as given)
    prefixes = [root] + [r.rstrip("/") or "/" for r in old_roots]
    hints = {k: v for d in dirs for k, v in _legacy_manifest_hints(d).items() if k in remaining}
    if hints:
        by_name: dict[str, list[str]] = {}
        for rel in rels:
            by_name.setdefault(os.path.basename(rel), []).append(rel)
        pairs = []
        for given in hints.values():
            cands = [r for r in by_name.get(os.path.basename(given), []) if given == r or given.endswith("/" + r)]
            if cands:
                pairs.append((given, max(cands, key=len)))
        hinted = _legacy_keys(store, pairs, threads, progress, "checking manifest hints")
        for (given, rel), computed in zip(pairs, hinted, strict=True):
            if computed in remaining:
                matches[computed] = (rel, given)
                remaining.discard(computed)
                prefix = given[: -len(rel)].rstrip("/") or "/"
                if prefix not in prefixes:
                    prefixes.append(prefix)
    for prefix in prefixes:
        if not remaining:
            break
        done = {m[0] for m in matches.values()}
        todo = [r for r in rels if r not in done]
        pairs = [(os.path.join(prefix, r), r) for r in todo]
        keys = _legacy_keys(store, pairs, threads, progress, f"legacy keys via {prefix}")
        for (given, rel), computed in zip(pairs, keys, strict=True):
            if computed in remaining:
                matches[computed] = (rel, given)
                remaining.discard(computed)
    for key in sorted(files):
        paths = files[key]
        if key not in matches:
            for p in paths:
                unmatched.append((p, "matched no source: its image changed or moved since caching, or the old "
                                  "loader passed another path (--old-root PREFIX)"))
            continue
        rel, given = matches[key]
        prefix = given[: -len(rel)].rstrip("/") or "/"
        matched_by[prefix] = matched_by.get(prefix, 0) + len(paths)
        for p in paths:
            consider(rel, p, "dir", given)
    return MigrateReport(store.feature, store.layout, root, store.fingerprint, dirs, list(old_roots), convert,
                         skipped, refused, unmatched, matched_by, rels, alternatives)


def execute_migrate(store: FeatureStore, plan: MigrateReport, *, delete_old: bool = False,
                    progress: bool | None = None) -> MigrateReport:
    """:func:`_execute_migrate` under the feature's lock: refused while a precompute runs."""
    from featstore.lock import maintenance_lock

    with maintenance_lock(store, "migrate"):
        return _execute_migrate(store, plan, delete_old=delete_old, progress=progress)


def _execute_migrate(store: FeatureStore, plan: MigrateReport, *, delete_old: bool = False,
                     progress: bool | None = None) -> MigrateReport:
    """Converts the planned legacy files into entries (``FeatureStore.put``: stamps, digests,
    fingerprint and inputs recorded as for a fresh entry), writes the manifest, and with
    ``delete_old`` removes each legacy file once its entry is written. Returns ``plan`` completed.

    A legacy file that is not a pickle of plain tensors is refused (it is never unpickled with
    code execution); a source changed since planning is not converted.

    Raises
    ------
    PermissionError
        The entries cannot be written (a read-only data root or cache directory); the message
        says what to do. Entries written before stay, the old cache is untouched.
    """
    plan.executed = True
    for planned in _progress_iter(plan.convert, "converting", progress, "files"):
        for item in [planned, *plan.alternatives.get(planned.source, [])]:
            entry = _convert_one(store, plan, item)
            if entry is None:
                continue
            plan.converted.append((item, entry))
            if delete_old:
                try:
                    os.remove(item.legacy)
                    plan.deleted.append(item.legacy)
                except OSError as exc:
                    plan.failed.append((item.legacy, f"converted, but could not delete the old file: {exc}"))
            break
    if plan.converted:
        plan.manifest = store.write_manifest(store.status(plan.sources, progress=progress), plan.sources)
    return plan


def _convert_one(store: FeatureStore, plan: MigrateReport, item: MigrateItem) -> str | None:
    """Writes the entry of one legacy file; returns its path, or None after recording in
    ``plan`` why it was refused or failed."""
    src = os.path.join(store.data_root, item.source)
    try:
        st = os.stat(src)
    except OSError as exc:
        plan.failed.append((item.legacy, f"its image {src} cannot be read: {exc}"))
        return None
    if (st.st_size, st.st_mtime_ns) != item.stamp:
        plan.failed.append((item.legacy, f"its image {item.source} changed since planning; run migrate again"))
        return None
    try:
        tensors = load_legacy_sidecar(item.legacy)
    except CorruptEntryError as exc:
        msg = str(exc)
        plan.refused.append((item.legacy, msg.removeprefix(f"{item.legacy}: ")))
        return None
    except OSError as exc:
        plan.failed.append((item.legacy, str(exc)))
        return None
    meta = {"migrated_from": item.legacy}
    if item.via:
        meta["migrated_key_path"] = item.via
    try:
        entry = store.put(item.source, tensors, metadata=meta)
    except PermissionError as exc:
        if isinstance(exc, FeatstoreError):
            raise  # ReadOnlyDataRootError: its message already suggests --cache-dir
        where = store.cache_dir or os.path.dirname(src)
        raise _not_writable(exc, exc.filename or where, where, "write the entry into", len(plan.converted),
                            len(plan.convert), "pass a writable --cache-dir, or run as the cache's owner; "
                            "the old cache is untouched") from exc
    except (FeatstoreError, OSError, TypeError) as exc:
        plan.failed.append((item.legacy, str(exc)))
        return None
    written = _core.read_header(entry)[0]
    if (int(written["source.size"]), int(written["source.mtime_ns"])) != item.stamp:
        store.remove(item.source)
        plan.failed.append((item.legacy, f"its image {item.source} changed while converting; run migrate again"))
        return None
    return entry


def _progress_iter(items: Sequence[Any], desc: str, show: bool | None, unit: str) -> Iterable[Any]:
    with _progress_bar(len(items), desc, show=show, unit=unit) as bar:
        for item in items:
            yield item
            bar.update(1)


# ----------------------------------------------------------------------------------- bench
@dataclass
class BenchRow:
    """One measured operation.

    Attributes
    ----------
    group : str
        ``lookup`` or ``read``.
    name : str
        What was timed.
    seconds : float
        Per item (the fastest of the repeated passes), in seconds.
    ratio : float
        ``seconds`` over featstore's time for the same group (above 1: slower than featstore).
    note : str
        What the scheme checks, or does not.
    """

    group: str
    name: str
    seconds: float
    ratio: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "name": self.name, "seconds": self.seconds, "us": round(self.seconds * 1e6, 3),
                "ratio": round(self.ratio, 3), "note": self.note}


@dataclass
class BenchReport:
    """Per-item latencies of featstore and the schemes it replaces on the user's own data."""

    data_root: str
    feature: str
    samples: int
    repeat: int
    image_bytes: int
    entry_bytes: int
    legacy_copies: str
    rows: list[BenchRow]

    def to_dict(self) -> dict[str, Any]:
        return {"data_root": self.data_root, "feature": self.feature, "samples": self.samples, "repeat": self.repeat,
                "mean_image_bytes": self.image_bytes, "mean_entry_bytes": self.entry_bytes,
                "legacy_copies": self.legacy_copies, "rows": [r.to_dict() for r in self.rows]}

    def text(self) -> str:
        width = max(len(r.name) for r in self.rows)
        lines = [f"bench of feature {self.feature} under {self.data_root}: {self.samples} sources with valid "
                 f"entries (images {human_bytes(self.image_bytes)}, entries {human_bytes(self.entry_bytes)} on "
                 f"average), fastest of {self.repeat} passes, warm page cache, one torch thread",
                 f"  {'operation':{width}}  {'per item':>10}  {'vs featstore':>12}"]
        group = ""
        for r in self.rows:
            if r.group != group:
                group = r.group
                lines.append(f"{group}:")
            lines.append(f"  {r.name:{width}}  {_fmt_seconds(r.seconds):>10}  {r.ratio:>11.2f}x  {r.note}")
        lines.append("legacy reads use torch.save copies of the sampled entries' tensors, written to "
                     f"{self.legacy_copies} for the run and removed after")
        return "\n".join(lines)


def _fmt_seconds(s: float) -> str:
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _legacy_key_python(path: str) -> str:
    # What the old data loader did for every sample (Python's hashlib over path + whole image).
    h = hashlib.sha256(path.encode("utf-8"))
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]


def bench(store: FeatureStore, sources: Sequence[str], *, samples: int = 200, repeat: int = 3,
          threads: int | None = None, progress: bool | None = None, seed: int = 0) -> BenchReport:
    """Measures lookup and read latency per item on the store's own data.

    Samples up to ``samples`` sources with valid entries and times, per item, the fastest of
    ``repeat`` passes after one warm-up pass (so the page cache is warm for every scheme):

    - lookup: ``FeatureStore.contains`` (two stats, catches edits); the legacy SHA256 scheme
      (``sha256(path + image bytes)[:16]`` in Python, as the old loader did, then ``exists``);
      the path-concatenation check ``os.path.exists(path + ".vggt_cache.pt")`` (checks nothing).
    - read: ``FeatureStore.get`` (zero-copy), ``get`` plus a copy of every tensor (touches
      every byte), and ``torch.load(weights_only=True)`` of ``torch.save`` copies of the same
      tensors, with and without the SHA256 key.

    The copies are written to a temporary directory beside the entries (same file system) and
    removed afterwards. torch runs on one thread meanwhile, as in DataLoader workers.

    Raises
    ------
    NoImagesFoundError
        No source has a valid entry to measure.
    """
    import torch

    rels = list(sources)
    states = store.states(rels, threads=threads, progress=progress)
    valid = [r for r, s in zip(rels, states, strict=True) if s == "valid"]
    if not valid:
        raise NoImagesFoundError(f"no source under {store.data_root} has a valid {store.feature} entry to measure "
                                 f"({len(rels):,} sources checked); compute entries first (`featstore precompute`)")
    picked = sorted(random.Random(seed).sample(valid, min(samples, len(valid))))
    paths = [os.path.join(store.data_root, r) for r in picked]
    fresh = FeatureStore(**store.__getstate__())  # a new store: as a new training process sees it
    try:
        copies = tempfile.mkdtemp(prefix=".featstore-bench-", dir=_base(store))
    except OSError:
        copies = tempfile.mkdtemp(prefix="featstore-bench-")
    # One torch thread, as in DataLoader workers: per-sample copies are too small to gain from
    # more, and on a busy machine waking a thread pool costs milliseconds of noise.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        legacy_files = []
        entry_bytes = 0
        for rel, path in zip(_progress_iter(picked, "preparing", progress, "sources"), paths, strict=True):
            tensors = fresh.get(rel)
            assert tensors is not None
            entry_bytes += _size(fresh.entry_path(rel))
            target = os.path.join(copies, _legacy_key_python(path) + ".pt")
            torch.save({k: v.clone() for k, v in tensors.items()}, target)
            legacy_files.append(target)

        def sha256_lookup(path: str) -> bool:
            return os.path.exists(os.path.join(copies, _legacy_key_python(path) + ".pt"))

        def sha256_read(path: str) -> Any:
            return torch.load(os.path.join(copies, _legacy_key_python(path) + ".pt"), weights_only=True)

        def get_copy(rel: str) -> Any:
            got = fresh.get(rel)
            return {k: v.clone() for k, v in (got or {}).items()}

        suffix = LEGACY_SIDECAR_SUFFIX
        ops: list[tuple[str, str, Callable[[Any], Any], Sequence[Any], str]] = [
            ("lookup", "featstore contains", fresh.contains, picked, "2 stats; catches edited images"),
            ("lookup", "sha256(path + bytes) + exists", sha256_lookup, paths, "reads the whole image"),
            ("lookup", f"exists(path + '{suffix}')", lambda p: os.path.exists(p + suffix), paths,
             "checks nothing: serves stale features"),
            ("read", "featstore get (zero-copy)", fresh.get, picked, "maps the entry"),
            ("read", "featstore get + copy", get_copy, picked, "touches every byte"),
            ("read", "sha256 key + torch.load", sha256_read, paths, "the legacy SHA256 cache"),
            ("read", "torch.load (path-concat)", lambda f: torch.load(f, weights_only=True), legacy_files,
             "the legacy sidecar"),
        ]
        timed: list[tuple[str, str, float, str]] = []
        for group, name, fn, args, note in _progress_iter(ops, "measuring", progress, "operations"):
            for a in args:  # warm-up: page cache, headers, first-use checks
                fn(a)
            best = float("inf")
            for _ in range(max(1, repeat)):
                t0 = time.perf_counter()
                for a in args:
                    fn(a)
                best = min(best, time.perf_counter() - t0)
            timed.append((group, name, best / len(args), note))
    finally:
        torch.set_num_threads(torch_threads)
        shutil.rmtree(copies, ignore_errors=True)
    base = {g: s for g, n, s, _ in timed if n.startswith("featstore contains") or n.startswith("featstore get (")}
    rows = [BenchRow(g, n, s, s / base[g] if base[g] > 0 else float("nan"), note) for g, n, s, note in timed]
    image_bytes = sum(_size(p) for p in paths) // len(paths)
    return BenchReport(store.data_root, store.feature, len(picked), repeat, image_bytes, entry_bytes // len(paths),
                       copies, rows)
