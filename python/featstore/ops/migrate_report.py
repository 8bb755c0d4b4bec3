"""What ``featstore migrate`` plans and does: one item per legacy file to convert, and the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from featstore.fmt import human_bytes
from featstore.ops.files import Identity
from featstore.vocabulary import LEGACY_SIDECAR_SUFFIX


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
    identity : (int, int, int, int) or None
        The legacy file's stamp ``(size, mtime_ns, ino, ctime_ns)`` when planned: ``--delete-old``
        removes only that file, and only once that very file was converted.
    """

    source: str
    legacy: str
    kind: str
    bytes: int
    stamp: tuple[int, int]
    via: str = ""
    identity: Identity | None = None

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
    kept : list of (str, str)
        Executed with ``delete_old``: converted legacy files not deleted, with why (``"kept:
        rewritten since it was judged"``: a writer replaced the file planned).
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
    kept: list[tuple[str, str]] = field(default_factory=list)
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
                "failed": [list(f) for f in self.failed], "deleted": self.deleted,
                "kept": [list(k) for k in self.kept], "manifest": self.manifest,
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
            lines.extend(f"  left in place {p}: {why}" for p, why in self.kept[:limit])
        if self.unmatched and self.legacy_dirs and not self.old_roots:
            lines.append("hint: if the data root moved since the legacy cache was made, pass --old-root PREFIX "
                         "(the data root as the old loader saw it)")
        return "\n".join(lines)
