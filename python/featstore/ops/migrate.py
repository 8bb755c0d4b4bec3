"""``featstore migrate``: legacy caches planned into featstore entries, then converted under the
feature's lock. Nothing is written when planning; the old cache is kept unless asked otherwise."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from featstore import _core
from featstore.compat import load_legacy_sidecar
from featstore.errors import CorruptEntryError, FeatstoreError
from featstore.fmt import timestamp
from featstore.lock import maintenance_lock
from featstore.ops.files import KEPT_REWRITTEN, Identity, file_identity, file_size, not_writable, read_judged, same_file
from featstore.ops.legacy_caches import list_legacy_dirs, match_keys, old_root
from featstore.ops.migrate_report import MigrateItem, MigrateReport
from featstore.progress import each
from featstore.store import FeatureStore
from featstore.vocabulary import LEGACY_SIDECAR_SUFFIX


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
    rels = list(sources)
    dirs = [os.path.abspath(d) for d in legacy_dirs]
    planner = _Planner(store, rels, dirs, old_roots)
    planner.add_sidecars()
    for d in dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(errno.ENOENT, f"legacy cache directory {d} does not exist; pass the directory "
                                    "holding the old <sha16>.pt files (--legacy-dir)", d)
    files, misnamed = list_legacy_dirs(dirs)
    planner.report.unmatched.extend(misnamed)
    matches = match_keys(store, rels, set(files), dirs, old_roots, threads, progress)
    planner.add_dir_files(files, matches)
    return planner.report


class _Planner:
    """Sorts legacy files into a :class:`MigrateReport`: planned for conversion, skipped, refused
    or unmatched. A source gets one file converted; its other legacy files are kept as
    alternatives, tried in order when that one is refused."""

    def __init__(self, store: FeatureStore, rels: list[str], dirs: list[str], old_roots: Sequence[str]) -> None:
        self.store = store
        self.in_scope = set(rels)
        self.report = MigrateReport(store.feature, store.layout, store.data_root, store.fingerprint, dirs,
                                    list(old_roots), convert=[], skipped=[], refused=[], unmatched=[],
                                    matched_by={}, sources=rels, alternatives={})
        self._stamps: dict[str, tuple[int, int]] = {}
        self._taken: dict[str, str] = {}  # source -> legacy file planned for it

    def stamp(self, rel: str) -> tuple[int, int] | None:
        """The source's (size, mtime_ns), read once; None when it cannot be read."""
        if rel not in self._stamps:
            try:
                st = os.stat(os.path.join(self.store.data_root, rel))
            except OSError:
                return None
            self._stamps[rel] = (st.st_size, st.st_mtime_ns)
        return self._stamps[rel]

    def consider(self, rel: str, legacy: str, kind: str, via: str = "") -> None:
        """Plans ``legacy`` for source ``rel`` unless the source already has an entry to keep or
        another legacy file planned."""
        report = self.report
        if rel in self._taken:
            report.skipped.append((legacy, f"duplicate: {self._taken[rel]} is converted for {rel} "
                                   "(this one if that is refused)"))
            report.alternatives.setdefault(rel, []).append(
                MigrateItem(rel, legacy, kind, file_size(legacy), self._stamps[rel], via, file_identity(legacy)))
            return
        src_stamp = self.stamp(rel)
        if src_stamp is None:
            report.unmatched.append((legacy, f"its image {rel} cannot be read"))
            return
        state = self.store.check(rel).state
        if state == "valid":
            report.skipped.append((legacy, f"{rel} already has a valid featstore entry"))
            return
        if state == "foreign":
            report.skipped.append((legacy, f"{rel} has a featstore entry of another fingerprint; left as it is"))
            return
        self._taken[rel] = legacy
        report.convert.append(MigrateItem(rel, legacy, kind, file_size(legacy), src_stamp, via, file_identity(legacy)))

    def add_sidecars(self) -> None:
        """Every ``<x>.vggt_cache.pt`` under the data root, whether or not ``x`` is a source."""
        store, root = self.store, self.store.data_root
        found, *_ = _core.scan(root, extensions=["pt"], skip_dirs=[store.cache_dir] if store.cache_dir else [])
        for p in sorted(map(os.fspath, found)):
            if not p.endswith(LEGACY_SIDECAR_SUFFIX):
                continue
            legacy = os.path.join(root, p)
            rel = p[: -len(LEGACY_SIDECAR_SUFFIX)]
            if rel not in self.in_scope:
                gone = not os.path.lexists(os.path.join(root, rel))
                self.report.unmatched.append((legacy, f"its image {rel} " + (
                    "no longer exists" if gone else "is not among the sources (see --ext)")))
                continue
            src_stamp = self.stamp(rel)
            legacy_mtime = os.stat(legacy).st_mtime_ns
            if src_stamp is not None and legacy_mtime < src_stamp[1]:
                self.report.refused.append((legacy, f"older than its image (image modified {timestamp(src_stamp[1])}, "
                                            f"cache written {timestamp(legacy_mtime)}): the image changed after "
                                            "caching; recompute it instead"))
                continue
            self.consider(rel, legacy, "sidecar")

    def add_dir_files(self, files: dict[str, list[str]], matches: dict[str, tuple[str, str]]) -> None:
        """The files of SHA256-named directories (``{sha16: [files]}``), planned for the source
        their key matched (``{sha16: (source, path as the old loader passed it)}``)."""
        matched_by = self.report.matched_by
        for key in sorted(files):
            paths = files[key]
            if key not in matches:
                for p in paths:
                    self.report.unmatched.append((p, "matched no source: its image changed or moved since caching, "
                                                  "or the old loader passed another path (--old-root PREFIX)"))
                continue
            rel, given = matches[key]
            prefix = old_root(given, rel)
            matched_by[prefix] = matched_by.get(prefix, 0) + len(paths)
            for p in paths:
                self.consider(rel, p, "dir", given)


def execute_migrate(store: FeatureStore, plan: MigrateReport, *, delete_old: bool = False,
                    progress: bool | None = None) -> MigrateReport:
    """:func:`_execute_migrate` under the feature's lock: refused while a precompute runs."""
    with maintenance_lock(store, "migrate"):
        return _execute_migrate(store, plan, delete_old=delete_old, progress=progress)


def _execute_migrate(store: FeatureStore, plan: MigrateReport, *, delete_old: bool = False,
                     progress: bool | None = None) -> MigrateReport:
    """Converts the planned legacy files into entries (``FeatureStore.put``: stamps, digests,
    fingerprint and inputs recorded as for a fresh entry), writes the manifest, and with
    ``delete_old`` removes each legacy file once its entry is written: only the file planned, and
    only when that very file is the one converted (:func:`featstore._core.remove_judged`); one a
    writer replaced meanwhile is kept and listed in ``kept``. Returns ``plan`` completed.

    A legacy file that is not a pickle of plain tensors is refused (it is never unpickled with
    code execution); a source changed since planning is not converted.

    Raises
    ------
    PermissionError
        The entries cannot be written (a read-only data root or cache directory); the message
        says what to do. Entries written before stay, the old cache is untouched.
    """
    plan.executed = True
    for planned in each(plan.convert, "converting", progress, "files"):
        for item in [planned, *plan.alternatives.get(planned.source, [])]:
            done = _convert_one(store, plan, item)
            if done is None:
                continue
            entry, converted = done
            plan.converted.append((item, entry))
            if delete_old:
                _delete_judged(plan, item, converted)
            break
    if plan.converted:
        plan.manifest = store.write_manifest(store.status(plan.sources, progress=progress), plan.sources)
    return plan


def _delete_judged(plan: MigrateReport, item: MigrateItem, converted: Identity | None) -> None:
    """Deletes a converted legacy file if it is the one planned and converted (``converted``: the
    identity of the file read), recording the outcome in ``plan``."""
    if item.identity is None or not same_file(converted, item.identity):
        plan.kept.append((item.legacy, KEPT_REWRITTEN))
        return
    try:
        if _core.remove_judged(item.legacy, item.identity):
            plan.deleted.append(item.legacy)
        elif os.path.lexists(item.legacy):
            plan.kept.append((item.legacy, KEPT_REWRITTEN))
    except OSError as exc:
        plan.failed.append((item.legacy, f"converted, but could not delete the old file: {exc}"))


def _convert_one(store: FeatureStore, plan: MigrateReport, item: MigrateItem) -> tuple[str, Identity | None] | None:
    """Writes the entry of one legacy file; returns its path and the identity of the legacy file
    read (None: it changed while being read), or None after recording in ``plan`` why it was
    refused or failed."""
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
        tensors, converted = read_judged(item.legacy, load_legacy_sidecar)
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
        raise not_writable(exc, exc.filename or where, where, "write the entry into", len(plan.converted),
                           len(plan.convert), "pass a writable --cache-dir, or run as the cache's owner; "
                           "the old cache is untouched") from exc
    except (FeatstoreError, OSError, TypeError) as exc:
        plan.failed.append((item.legacy, str(exc)))
        return None
    (written, _, _), identity = read_judged(entry, _core.read_header)
    if (int(written["source.size"]), int(written["source.mtime_ns"])) != item.stamp:
        if identity is not None:
            _core.remove_judged(entry, identity)  # the entry just judged; a newer write stays
        store.forget(item.source)
        plan.failed.append((item.legacy, f"its image {item.source} changed while converting; run migrate again"))
        return None
    return entry, converted
