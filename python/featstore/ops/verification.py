"""``featstore verify``: every entry read in full, and the bad ones moved into the quarantine."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from featstore import _core
from featstore.compat import load_legacy_sidecar
from featstore.errors import CorruptEntryError
from featstore.fmt import count, error_lines, human_bytes, shown
from featstore.lock import maintenance_lock
from featstore.ops.files import KEPT_REWRITTEN, Identity, base_dir, not_writable, read_judged, same_file
from featstore.ops.survey import EntryReport, Survey, corrupt_reason, survey
from featstore.progress import bar as progress_bar
from featstore.store import FeatureStore
from featstore.vocabulary import BAD_STATES, LEGACY_SIDECAR_SUFFIX


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
    kept : list of (str, str)
        Bad entries left in place by ``--quarantine``, with why (``"kept: rewritten since it was
        judged"``: a writer replaced the file judged bad with a fresh one).
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
    sets: int | None = None  # with a frame-set mode: the sets the sources make (``missing`` counts sets)
    kept: list[tuple[str, str]] = field(default_factory=list)
    histories: int | None = None  # when the entries are histories: those counted (``missing`` counts them)

    @property
    def ok(self) -> bool:
        """No bad entry and nothing that could not be checked."""
        return not self.problems and not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "layout": self.layout, "data_root": self.data_root,
                "sources": self.sources, "counts": self.counts, "entries": self.entries,
                "bytes": self.bytes, "problems": [p.to_dict() for p in self.problems],
                "quarantined": [list(q) for q in self.quarantined], "quarantine_dir": self.quarantine_dir,
                "kept": [list(k) for k in self.kept],
                "errors": [list(e) for e in self.errors], "seconds": round(self.seconds, 3), "ok": self.ok,
                **({"sets": self.sets, "unit": "sets"} if self.sets is not None else {}),
                **({"histories": self.histories, "unit": "histories"} if self.histories is not None else {})}

    def text(self) -> str:
        found = (f"{self.sources:,} frames in {self.sets:,} frame sets" if self.sets is not None
                 else f"{self.sources:,} frames, {self.histories:,} histories" if self.histories is not None
                 else f"{self.sources:,} sources")
        lines = [f"verified feature {self.feature} under {self.data_root} ({self.layout} layout): "
                 f"{found}, {self.entries:,} entries read in full "
                 f"({human_bytes(self.bytes)}) in {self.seconds:.2f} s",
                 "  " + "  ".join(f"{s} {n:,}" for s, n in self.counts.items())]
        if self.problems:
            lines.append(f"{count(len(self.problems), 'bad entry', 'bad entries')}:")
            lines.extend(f"  {p.state:8} {shown(self.base, p.path)}: {p.reason}" for p in self.problems)
        else:
            lines.append("no bad entries")
        if self.quarantined:
            lines.append(f"moved {count(len(self.quarantined), 'bad entry', 'bad entries')} into {self.quarantine_dir} "
                         "(nothing deleted; see quarantine.jsonl there)")
        elif self.problems and not self.kept:
            lines.append("`featstore verify --quarantine` moves them aside; `featstore gc` removes stale, "
                         "foreign and orphaned ones")
        lines.extend(f"  left in place {shown(self.base, p)}: {why}" for p, why in self.kept)
        if self.errors:
            lines.extend(error_lines(self.errors, "could not be checked"))
        return "\n".join(lines)


def verify(store: FeatureStore, sources: Sequence[str], *, quarantine_bad: bool = False,
           threads: int | None = None, progress: bool | None = None) -> VerifyReport:
    """Reads every entry in full and reports each bad one with its reason.

    Each entry's header is validated (bounded JSON, dtypes, shapes against byte counts, offsets
    in range, no overlaps), its data checked against ``data.blake3``, its fingerprint, source
    stamp (digest when the stamp moved) and extra inputs compared, the manifest's index
    notwithstanding. Legacy sidecars are unpickled with ``weights_only=True``. Entries whose
    source is gone are reported as orphans. Frame-set and history entries are judged from the
    members they record, every member digested.

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
    found = survey(store, sources, deep=True, threads=threads, progress=progress)
    _read_in_full(store, found, threads, progress)
    problems = [r for r in found.reports if r.state in BAD_STATES]
    read = [r for r in found.reports if r.state != "orphan"]
    kept: list[tuple[str, str]] = []
    moved = quarantine(store, problems, kept=kept) if quarantine_bad and problems else []
    return VerifyReport(store.feature, store.layout, store.data_root, len(sources), found.counts(), len(read),
                        sum(r.bytes for r in read), problems, moved, quarantine_dir(store) if moved else None,
                        found.errors, time.perf_counter() - t0, base_dir(store), found.sets, kept, found.histories)


def _read_in_full(store: FeatureStore, found: Survey, threads: int | None, progress: bool | None) -> None:
    """Reads every readable entry in full (header, shapes, ``data.blake3``) and every legacy
    sidecar (``weights_only`` unpickling), marking the bad ones corrupt."""
    todo = [r for r in found.reports if r.state in ("valid", "stale", "foreign", "legacy")]
    if any(r.state == "legacy" or r.path.endswith(LEGACY_SIDECAR_SUFFIX) for r in todo):
        import torch  # noqa: F401  (import once here, not concurrently in the workers)

    def check(r: EntryReport) -> tuple[str, str] | None:
        if r.path.endswith(LEGACY_SIDECAR_SUFFIX):
            try:
                load_legacy_sidecar(r.path)
            except CorruptEntryError as exc:
                return "corrupt", str(exc)
            return None
        file, span = (r.packed[0], r.packed[1:]) if r.packed is not None else (r.path, None)
        try:
            meta = _core.verify_entry(file, span)
        except CorruptEntryError as exc:
            return "corrupt", corrupt_reason(exc, file)
        if meta.get("feature") != store.feature:
            return "corrupt", f"the entry belongs to feature {meta.get('feature')!r}, not {store.feature!r}"
        if store.layout == "dir" and r.source and meta.get("source") != r.source:
            return "corrupt", f"the entry names its source {meta.get('source')!r}, not {r.source!r}"
        return None

    def guarded(r: EntryReport) -> tuple[tuple[str, str] | None, Identity | None]:
        try:
            # A packed entry's verdict is about its pack as it was while the entry was read.
            return read_judged(r.packed[0] if r.packed is not None else r.path, lambda _: check(r))
        except OSError as exc:
            return ("error", str(exc)), None

    workers = threads or _core.default_threads()
    with ThreadPoolExecutor(max_workers=workers) as pool, progress_bar(
            len(todo), "verifying entries", show=progress, unit="entries") as bar:
        for r, (verdict, identity) in zip(todo, pool.map(guarded, todo), strict=True):
            bar.update(1)
            if verdict is None:
                continue  # the survey's verdict stands, on the file it judged
            if verdict[0] == "error":
                found.errors.append((r.path, verdict[1]))
            else:
                # The verdict is about the file just read, perhaps not the one the survey judged
                # (None: it changed while being read, so quarantine leaves it).
                r.state, r.reason = verdict
                r.identity = identity
                store.forget(r.source)


#: What the quarantine says of a packed entry it dropped (its ``to``).
PACKED_DROPPED = "(dropped from the index: its pack keeps the bytes until `featstore gc` compacts it)"


def quarantine_dir(store: FeatureStore) -> str:
    """``<data root or cache dir>/.featstore/<feature>/quarantine``: where bad entries are moved."""
    return os.path.join(store.state_dir, "quarantine")


def quarantine(store: FeatureStore, bad: Sequence[EntryReport], *,
               kept: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """:func:`_quarantine` under the feature's lock: refused while a precompute runs."""
    with maintenance_lock(store, "quarantine entries"):
        return _quarantine(store, bad, kept)


def _quarantine(store: FeatureStore, bad: Sequence[EntryReport],
                kept: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Moves bad entry files into :func:`quarantine_dir`, keeping their names relative to the
    data root (sidecar) or cache directory (dir). Never deletes; logs each move to
    ``quarantine.jsonl`` there with the verdict on the file moved. Returns ``(from, to)`` pairs.

    Only the file judged is moved (:func:`featstore._core.move_judged` compares its identity once
    the name is held): one a writer replaced since (a lazy training loop's fresh entry) stays
    where it is, and ``(path, "kept: rewritten since it was judged")`` is appended to ``kept``.

    Raises
    ------
    PermissionError
        The cache is not writable by this user (the message names the path and what to do).
    """
    qdir = quarantine_dir(store)
    base = base_dir(store)
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
        if r.identity is None or r.keep:
            if kept is not None:
                kept.append((r.path, r.keep or "kept: it changed while it was judged"))
            continue
        if r.packed is not None:
            # Its pack holds other entries: this one leaves the index (its source is then computed
            # again), and gc compacts the bytes away.
            if store._core.drop_packed([(r.source, *r.packed)])[0]:
                moved.append((r.path, PACKED_DROPPED))
            elif kept is not None:
                kept.append((r.path, "kept: the index places this source's entry elsewhere since"))
            continue
        try:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if not _move_judged(r.path, dst, r.identity):
                if kept is not None and os.path.lexists(r.path):
                    kept.append((r.path, KEPT_REWRITTEN))
                continue
            with open(os.path.join(qdir, "quarantine.jsonl"), "a", encoding="utf-8") as log:
                log.write(json.dumps({"from": r.path, "to": dst, "state": r.state, "reason": r.reason,
                                      "source": r.source, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        except PermissionError as exc:
            raise not_writable(exc, r.path, base, "move into the quarantine", len(moved), len(bad),
                               "run `featstore verify --quarantine` as the cache's owner, or without "
                               "--quarantine to only report") from exc
        if r.source:
            store.forget(r.source)
        moved.append((r.path, dst))
    return moved


def _move_judged(path: str, dst: str, identity: Identity) -> bool:
    """Moves ``path`` to ``dst`` if it is still the file judged; False when it is gone or was
    replaced. Across file systems (a quarantine on another mount than a symlinked part of the
    data root) the judged file's bytes are copied from a descriptor checked to be that file, and
    the original removed only if it still is; otherwise the copy is dropped."""
    try:
        return _core.move_judged(path, dst, identity)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    try:
        src = open(path, "rb")  # noqa: SIM115  (closed below; fstat'ed before reading)
    except FileNotFoundError:
        return False
    with src:
        st = os.fstat(src.fileno())
        if not same_file((st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns), identity):
            return False
        with open(dst, "xb") as out:
            shutil.copyfileobj(src, out)
    if _core.remove_judged(path, identity):
        return True
    os.remove(dst)
    return False
