"""``featstore gc``: orphaned, stale and foreign entries and leftover temporary files, planned,
then removed under the feature's lock.

Before an entry is planned its header must name it a featstore entry of this feature, so a
user's file that merely looks like one is never touched, and a source never is.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from featstore import _core
from featstore.errors import CorruptEntryError, DataRootError, FeatstoreError
from featstore.fmt import age, error_lines, human_bytes, shown
from featstore.history import frames_record_files, frames_record_path, history_entry_files
from featstore.lock import maintenance_lock
from featstore.manifest import merge_journals
from featstore.ops.files import KEPT_REWRITTEN, Identity, base_dir, file_identity, gone_or_kept, not_writable
from featstore.ops.packing import PackCompaction, compact, plan_compaction
from featstore.ops.survey import EntryReport, Survey, survey
from featstore.progress import bar as progress_bar
from featstore.store import FeatureStore
from featstore.vocabulary import LEGACY_SIDECAR_SUFFIX

#: Temporary files younger than this (seconds) may belong to a write in progress: gc leaves them.
DEFAULT_MIN_TMP_AGE_S = 900.0


@dataclass
class GcItem:
    """A file gc removes (or keeps, with the reason).

    Attributes
    ----------
    path : str
        The file (absolute).
    kind : str
        ``orphan``, ``stale``, ``foreign``, ``temp``, ``frames`` (a history pass's frames record no
        entry refers to), or for kept files ``corrupt``, ``legacy``, ``valid``.
    reason : str
        Why.
    bytes : int
        Its size.
    source : str
        Its source, relative to the data root ('' for temporary files, frame sets and histories).
    identity : (int, int, int, int) or None
        The stamp ``(size, mtime_ns, ino, ctime_ns)`` of the file judged: only that file is
        removed (None: it changed while being judged, so it is left alone).
    packed : (str, int, int) or None
        ``(pack, offset, length)`` of a packed entry: it is dropped from the index (the pack
        holds other entries; a pack no live entry is in is removed, see ``packs``).
    """

    path: str
    kind: str
    reason: str
    bytes: int
    source: str = ""
    identity: Identity | None = None
    packed: tuple[str, int, int] | None = None

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
        Files removed, and packed entries dropped from the index (empty in a dry run).
    packs : list of PackCompaction
        Packs to remove (no live entry in them) or rewrite (mostly dead bytes), or kept (young);
        ``compacted`` says what was done with each.
    skipped : list of (str, str)
        Planned files left alone at removal time: gone meanwhile, or
        ``"kept: rewritten since it was judged"`` (a writer replaced the file judged).
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
    packs: list[PackCompaction] = field(default_factory=list)
    compacted: list[tuple[str, str]] = field(default_factory=list)
    min_tmp_age_s: float = DEFAULT_MIN_TMP_AGE_S

    @property
    def bytes(self) -> int:
        """Bytes of the files planned for removal (and of packed entries to drop)."""
        return sum(i.bytes for i in self.remove)

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "layout": self.layout, "data_root": self.data_root,
                "dry_run": self.dry_run, "bytes": self.bytes, "remove": [i.to_dict() for i in self.remove],
                "kept": [i.to_dict() for i in self.kept], "removed": [i.to_dict() for i in self.removed],
                "removed_bytes": sum(i.bytes for i in self.removed),
                "skipped": [list(s) for s in self.skipped], "rewritten_since_judged": self.rewritten,
                "errors": [list(e) for e in self.errors], "packs": [p.to_dict() for p in self.packs],
                "compacted": [list(c) for c in self.compacted]}

    @property
    def rewritten(self) -> int:
        """Planned files kept because a writer replaced them after they were judged."""
        return sum(why == KEPT_REWRITTEN for _, why in self.skipped)

    def text(self, limit: int = 100) -> str:
        lines = [f"gc of feature {self.feature} under {self.data_root} ({self.layout} layout): "
                 f"{len(self.remove):,} files, {human_bytes(self.bytes)} to remove"]
        for kind in ("orphan", "stale", "foreign", "temp", "frames"):
            items = [i for i in self.remove if i.kind == kind]
            for i in items[:limit]:
                lines.append(f"  {kind:8} {shown(self.base, i.path)}  {human_bytes(i.bytes)}  ({i.reason})")
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit:,} more {kind} files (--json lists all)")
        if self.kept:
            by_kind: dict[str, int] = {}
            for i in self.kept:
                by_kind[i.kind] = by_kind.get(i.kind, 0) + 1
            lines.append("kept: " + ", ".join(f"{n:,} {k}" for k, n in sorted(by_kind.items())))
            lines.extend(f"  {i.kind:8} {shown(self.base, i.path)}  ({i.reason})" for i in self.kept[:limit])
        for pack in self.packs:
            lines.append(f"  pack {pack.action:7} {shown(self.base, pack.path)}  {human_bytes(pack.size)}  "
                         f"({pack.reason})")
        lines.extend(f"  pack {shown(self.base, p)}: {what}" for p, what in self.compacted)
        if self.dry_run:
            lines.append("dry run: nothing removed; run without --dry-run to remove them")
        else:
            lines.append(f"removed {len(self.removed):,} files, {human_bytes(sum(i.bytes for i in self.removed))}")
        if self.rewritten:
            lines.append(f"{self.rewritten:,} planned files were rewritten since they were judged: kept")
        for p, why in self.skipped[:limit]:
            lines.append(f"  left alone {shown(self.base, p)}: {why}")
        if self.errors:
            lines.extend(error_lines(self.errors, "path could not be checked", "paths could not be checked"))
        return "\n".join(lines)


class WrongDataRootError(DataRootError):
    """gc found entries but none belongs to a source under the data root: probably the wrong root."""


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
    ValueError
        ``min_tmp_age_s`` is negative (or not a number): a write in progress could be removed.
    """
    if not min_tmp_age_s >= 0:
        raise ValueError(f"min_tmp_age_s (--min-tmp-age) must be 0 or more seconds, got {min_tmp_age_s}: a younger "
                         "temporary file may be a write in progress")
    recorded = _recorded_data_root(store)
    if recorded and recorded != store.data_root and not force:
        raise WrongDataRootError(
            f"the cache {base_dir(store)} was made for the data root {recorded} (its manifest says so), not "
            f"{store.data_root}: against another root its entries would look orphaned or stale. Pass that root, "
            "or --force if the data really moved there")
    found = survey(store, sources, deep=False, threads=threads, progress=progress)
    never = {os.path.join(store.data_root, s) for s in sources}
    remove, kept = _plan_entries(store, found.reports, never, set(keep_fingerprints), store.fingerprint is not None)
    _plan_temps(found, never, min_tmp_age_s, remove, kept)
    _plan_pack_temps(store, min_tmp_age_s, remove, kept)
    _plan_frames_records(store, min_tmp_age_s, remove, kept)
    packs = plan_compaction(store, {(i.packed[0], i.packed[1]) for i in remove if i.packed is not None},
                            min_age_s=min_tmp_age_s)
    belongs = [r for r in found.reports if r.state != "orphan"]
    orphans = [i for i in remove if i.kind == "orphan"]
    if orphans and not belongs and not force:
        raise WrongDataRootError(
            f"all {len(orphans):,} entries of feature {store.feature} under {base_dir(store)} are orphans: none "
            f"belongs to a source under {store.data_root} ({len(sources):,} sources found). Is that the data "
            "root these entries were made for? Pass --force to remove them anyway")
    return GcReport(store.feature, store.layout, store.data_root, base_dir(store), remove, kept, True,
                    errors=found.errors, packs=packs, min_tmp_age_s=min_tmp_age_s)


def _plan_entries(store: FeatureStore, reports: Sequence[EntryReport], never: set[str],
                  keep_fps: set[str], fingerprint_known: bool) -> tuple[list[GcItem], list[GcItem]]:
    """The entry files to remove and those kept (with why), in the survey's order. Without a
    known fingerprint (none given, no manifest) the store pins the first one it reads, which is
    arbitrary: no entry is removed as foreign on that basis."""
    remove: list[GcItem] = []
    kept: list[GcItem] = []
    for r in reports:
        legacy = r.path.endswith(LEGACY_SIDECAR_SUFFIX)
        item = GcItem(r.path, r.state, r.reason, r.bytes, r.source, r.identity, r.packed)
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
        if r.keep:
            item.reason = r.keep  # perhaps another data root's valid entry (a copy sharing the cache)
            kept.append(item)
            continue
        meta = _featstore_meta(store, r.path, r.packed)
        if meta is None or r.path in never:
            item.kind, item.reason = "unknown", "named like an entry but not a featstore entry of this feature"
            kept.append(item)
            continue
        if r.state == "foreign" and meta.get("fingerprint", "") in keep_fps:
            item.reason = f"kept: fingerprint {meta.get('fingerprint')} is in --keep-fingerprint"
            kept.append(item)
            continue
        if r.state == "foreign" and not fingerprint_known:
            item.reason = (f"kept: fingerprint {meta.get('fingerprint')}, but no fingerprint is known to compare it "
                           "with (no manifest, none given): pass --fingerprint FP to remove other encoders' entries")
            kept.append(item)
            continue
        if r.identity is None:
            item.reason = "kept: it changed while it was judged"
            kept.append(item)
            continue
        remove.append(item)
    return remove, kept


def _plan_temps(found: Survey, never: set[str], min_tmp_age_s: float, remove: list[GcItem],
                kept: list[GcItem]) -> None:
    """Adds featstore's temporary files to ``remove``, or to ``kept`` while they may be a write in
    progress."""
    for t in found.temps:
        if t not in never:
            _plan_temp(t, min_tmp_age_s, "a write in progress", "an interrupted write", remove, kept)


def _plan_temp(path: str, min_tmp_age_s: float, writing: str, left_by: str, remove: list[GcItem],
               kept: list[GcItem]) -> None:
    """Adds one temporary file to ``remove``, or to ``kept`` while younger than ``min_tmp_age_s``
    (it may be ``writing``); nothing when it is gone or not a regular file."""
    ident = file_identity(path)
    if ident is None:
        return
    age_s = (time.time_ns() - ident[1]) / 1e9
    if age_s < min_tmp_age_s:
        kept.append(GcItem(path, "temp", f"written {age_s:.0f} s ago: may be {writing} "
                           f"(--min-tmp-age {min_tmp_age_s:.0f})", ident[0], "", ident))
    else:
        remove.append(GcItem(path, "temp", f"left by {left_by} {age(age_s)} ago", ident[0], "", ident))


def _plan_pack_temps(store: FeatureStore, min_tmp_age_s: float, remove: list[GcItem], kept: list[GcItem]) -> None:
    """Adds the temporary files of pack runs killed before sealing (``.<pack name>.<random>.tmp``
    in the packs directory) to ``remove``, or to ``kept`` while they may be a pack being written."""
    packs_dir = os.fspath(store._core.packs_dir)
    try:
        names = os.listdir(packs_dir)
    except OSError:
        return
    for name in names:
        if _PACK_TEMP.match(name):
            _plan_temp(os.path.join(packs_dir, name), min_tmp_age_s, "a pack being written",
                       "an interrupted pack run", remove, kept)


def _plan_frames_records(store: FeatureStore, min_tmp_age_s: float, remove: list[GcItem], kept: list[GcItem]
                         ) -> None:
    """Adds the frames records of history passes (:mod:`featstore.history_frames`) that no history
    entry left after this gc refers to; a young one is kept, as its pass may still be writing the
    entries that will refer to it."""
    records = frames_record_files(store)
    if not records:
        return
    removing = {i.path for i in remove}
    referenced: set[str] = set()
    for path in history_entry_files(store):
        if path in removing:
            continue
        try:
            meta, _, _ = _core.read_header(path)
        except (CorruptEntryError, OSError):
            continue
        if meta.get("frames_record"):
            referenced.add(os.path.normpath(frames_record_path(store, meta["frames_record"])))
    now = time.time_ns()
    for record in records:
        ident = file_identity(record)
        if ident is None or os.path.normpath(record) in referenced:
            continue
        age_s = (now - ident[1]) / 1e9
        if age_s < min_tmp_age_s:
            kept.append(GcItem(record, "frames", f"no entry refers to it yet, written {age_s:.0f} s ago: a history "
                               f"pass may still be writing (--min-tmp-age {min_tmp_age_s:.0f})", ident[0], "", ident))
        else:
            remove.append(GcItem(record, "frames", "the frames record of history entries that are all gone",
                                 ident[0], "", ident))


#: What a pack run's temporary file is called (the pack's name, then the temporary suffix).
_PACK_TEMP = re.compile(r"^\.[0-9a-f]+-[0-9]+-[0-9a-f]+\.fspack\..+\.tmp$")


def execute_gc(store: FeatureStore, plan: GcReport, *, progress: bool | None = None) -> GcReport:
    """:func:`_execute_gc` under the feature's lock: refused while a precompute runs."""
    with maintenance_lock(store, "collect garbage"):
        # A killed run's journal merged later would win over the segments gc writes (see pack).
        if store.journal_paths():
            merge_journals(store)
        return _execute_gc(store, plan, progress=progress)


def _execute_gc(store: FeatureStore, plan: GcReport, *, progress: bool | None = None) -> GcReport:
    """Removes the files of ``plan`` (from :func:`plan_gc`) and returns it completed.

    Only the file judged is removed (:func:`featstore._core.remove_judged` compares its identity
    once the name is held): a planned file that a writer replaced since (a lazy training loop's
    fresh entry) is kept and listed in ``skipped`` as rewritten, one that vanished as gone. Empty
    key directories of the dir layout are removed.

    Raises
    ------
    PermissionError
        The cache is not writable by this user; the message names the path and what to do. Files
        removed before it stay removed, nothing else is touched.
    """
    plan.dry_run = False
    key_dirs: set[str] = set()
    packed = [i for i in plan.remove if i.packed is not None]
    if packed:  # dropped from the index in one segment; the packs keep the bytes until compacted
        dropped = store._core.drop_packed([(i.source, *i.packed) for i in packed if i.packed is not None])
        for item, was in zip(packed, dropped, strict=True):
            if was:
                plan.removed.append(item)
            else:
                plan.skipped.append((item.path, "kept: the index places this source's entry elsewhere since"))
    with progress_bar(len(plan.remove) - len(packed), "removing", show=progress, unit="files") as bar:
        for item in plan.remove:
            if item.packed is not None:
                continue
            bar.update(1)
            if item.identity is None:
                plan.skipped.append((item.path, "changed while it was judged"))
                continue
            try:
                if not _core.remove_judged(item.path, item.identity):
                    plan.skipped.append((item.path, gone_or_kept(item.path)))
                    continue
            except PermissionError as exc:
                raise not_writable(exc, item.path, os.path.dirname(item.path), "remove", len(plan.removed),
                                   len(plan.remove), "run gc as the cache's owner, or make it writable "
                                   "(chmod u+w)") from exc
            plan.removed.append(item)
            if item.source and item.kind not in ("temp", "frames"):
                store.forget(item.source)
            key_dirs.add(os.path.dirname(item.path))
    if store.layout == "dir":
        for d in sorted(key_dirs):  # key directories gc emptied
            try:
                os.rmdir(d)  # only succeeds when empty
            except OSError:
                pass
    # The packs as they are now that the entries are dropped: judged again, under the lock.
    plan.packs = plan_compaction(store, set(), min_age_s=plan.min_tmp_age_s)
    plan.compacted = compact(store, plan.packs)
    return plan


def _featstore_meta(store: FeatureStore, path: str, packed: tuple[str, int, int] | None = None
                    ) -> dict[str, str] | None:
    """The header metadata of ``path`` (or of the packed entry at ``packed``) if it is a readable
    featstore entry of this feature."""
    try:
        meta, _, _ = _core.read_header(*((packed[0], packed[1:]) if packed is not None else (path, None)))
    except (CorruptEntryError, OSError):
        return None
    if not meta.get("featstore.format", "").startswith("featstore-entry") or meta.get("feature") != store.feature:
        return None
    return meta


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
