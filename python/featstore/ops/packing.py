"""``featstore pack``: a feature's valid entries moved from files of their own into a few large,
immutable packs (docs/design.md, "Packs"), under the feature's lock.

The core copies each valid entry whose data checksum matches into the pack being written, seals
the packs, writes one index segment that locates every packed entry, and only then removes each
entry's own file, and only while it is still the file copied. A run killed at any point loses
nothing: before the segment the entries are all still in their own files; after it, the own
files left over hold the same bytes and are preferred by every lookup.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from featstore import _core
from featstore.fmt import count, human_bytes, shown
from featstore.lock import maintenance_lock
from featstore.manifest import merge_journals
from featstore.ops.files import Identity, base_dir
from featstore.packs import DEFAULT_TARGET_SIZE
from featstore.progress import run_with_progress
from featstore.store import FeatureStore


@dataclass
class PackReport:
    """What :func:`pack` did.

    Attributes
    ----------
    packs : list of (str, int)
        The packs written and their sizes in bytes.
    moved : int
        Entries now in those packs.
    kept_files : list of str
        Sources whose own entry file stayed although its copy was packed: another file took its
        name meanwhile (a newer entry, which lookups prefer).
    already_packed : int
        Entries that were in a pack already.
    not_valid : dict of str to int
        Sources without a valid entry (nothing to pack), by state.
    skipped : list of (str, str)
        Sources whose valid entry was not packed, with why (its data checksum failed:
        ``featstore verify`` says more; or it was rewritten while being copied).
    """

    feature: str
    layout: str
    data_root: str
    base: str
    sources: int
    packs: list[tuple[str, int]]
    moved: int
    already_packed: int
    skipped: list[tuple[str, str]]
    seconds: float
    kept_files: list[str] = field(default_factory=list)
    not_valid: dict[str, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.packs)

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "layout": self.layout, "data_root": self.data_root,
                "sources": self.sources, "packs": [{"path": p, "bytes": n} for p, n in self.packs],
                "moved": self.moved, "bytes": self.bytes, "already_packed": self.already_packed,
                "not_valid": self.not_valid, "skipped": [list(s) for s in self.skipped],
                "kept_files": self.kept_files,
                "seconds": round(self.seconds, 3)}

    def text(self, limit: int = 20) -> str:
        lines = [f"pack of feature {self.feature} under {self.data_root} ({self.layout} layout): "
                 f"{count(self.sources, 'source')}, {count(self.moved, 'entry', 'entries')} moved into "
                 f"{count(len(self.packs), 'pack')} ({human_bytes(self.bytes)}) in {self.seconds:.2f} s"]
        lines.extend(f"  {shown(self.base, p)}  {human_bytes(n)}" for p, n in self.packs[:limit])
        if self.already_packed:
            lines.append(f"{count(self.already_packed, 'entry', 'entries')} already in a pack")
        if self.not_valid:
            states = ", ".join(f"{s} {n:,}" for s, n in sorted(self.not_valid.items()))
            lines.append(f"{count(sum(self.not_valid.values()), 'source')} without a valid entry ({states}): "
                         "nothing to pack (`featstore status` and `explain` say more)")
        for rel, why in self.skipped[:limit]:
            lines.append(f"  not packed {rel}: {why}")
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit:,} more (--json lists all)")
        for rel in self.kept_files[:limit]:
            lines.append(f"  kept the entry file of {rel}: rewritten since it was packed (the newer one is served)")
        return "\n".join(lines)


def pack(store: FeatureStore, sources: Sequence[str], *, target_size: int = DEFAULT_TARGET_SIZE,
         progress: bool | None = None) -> PackReport:
    """Moves the valid entries of ``sources`` into packs of about ``target_size`` bytes.

    Refused while a precompute of the feature runs (it holds the feature's lock, as gc does).
    Entries already packed stay where they are; entries that are not valid, or whose data does
    not match its checksum, stay in their files.

    Parameters
    ----------
    store : FeatureStore
        The store whose entries to pack.
    sources : sequence of str
        Relative source paths (a scan of the data root).
    target_size : int
        A pack is sealed once it holds this many bytes (default 2 GiB); the last one is smaller.
    progress : bool or None
        A progress bar on stderr (None: when stderr is a terminal).
    """
    if target_size <= 0:
        raise ValueError(f"target_size (--target-size) must be a positive number of bytes, got {target_size}")
    rels = store.rels(sources)
    t0 = time.perf_counter()
    with maintenance_lock(store, "pack entries"):
        # A killed run's journal names entries in their own files: merged now, its records are
        # older than the segments this run writes (merged later, they would win over them and
        # place moved entries back in files that are gone).
        if store.journal_paths():
            merge_journals(store)
        packs, moved, kept, already, not_valid, skipped = run_with_progress(
            lambda p: store._core.pack_entries(rels, target_size, True, p), desc="packing entries",
            total=len(rels), show=progress, unit="entries")
    return PackReport(store.feature, store.layout, store.data_root, base_dir(store), len(rels),
                      [(os.fspath(p), n) for p, n in packs], moved, already,
                      [(os.fsdecode(r), why) for r, why in skipped], time.perf_counter() - t0,
                      [os.fsdecode(r) for r in kept], dict(not_valid))


#: gc rewrites a pack once this fraction of its bytes belongs to no live entry.
DEAD_FRACTION = 0.5


@dataclass
class PackCompaction:
    """A pack gc removes (no live entry in it) or rewrites (mostly dead bytes), or keeps.

    Attributes
    ----------
    path : str
        The pack.
    action : str
        ``remove``, ``rewrite``, or ``keep`` (with the reason).
    size : int
        The pack's size in bytes; ``dead`` of them belong to no live entry.
    identity : (int, int, int, int)
        The pack's stamp when judged: only that file is removed.
    live : list of (bytes, int, int)
        The entries the index still places in it: ``(source, offset, length)``.
    """

    path: str
    action: str
    reason: str
    size: int
    dead: int
    identity: Identity
    live: list[tuple[bytes, int, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "action": self.action, "reason": self.reason, "bytes": self.size,
                "dead_bytes": self.dead, "live_entries": len(self.live)}


def plan_compaction(store: FeatureStore, dropping: set[tuple[str, int]], *, min_age_s: float
                    ) -> list[PackCompaction]:
    """What gc does with each pack once the packed entries in ``dropping`` (``(pack, offset)``)
    are dropped: remove a pack no live entry is in (kept while younger than ``min_age_s``: a pack
    run may be about to index it), rewrite one whose dead bytes reach :data:`DEAD_FRACTION`."""
    if not os.path.isdir(store._core.packs_dir):
        return []
    now = time.time_ns()
    plans = []
    for path, identity, live, table_entries in store._core.pack_usage():
        path = os.fspath(path)
        live = [(k, off, n) for k, off, n in live if (path, off) not in dropping]
        size = identity[0]
        dead = size - sum(n for _, _, n in live)
        age_s = (now - identity[1]) / 1e9
        whole = "" if table_entries >= 0 else "not a whole pack (cut short or damaged); "
        if not live and age_s < min_age_s:
            plan = PackCompaction(path, "keep", f"{whole}no entry is indexed in it yet, written {age_s:.0f} s ago: a "
                                  f"pack run may be indexing it (--min-tmp-age {min_age_s:.0f})", size, dead, identity)
        elif not live:
            plan = PackCompaction(path, "remove", f"{whole}no live entry is in it", size, dead, identity)
        elif dead >= DEAD_FRACTION * size:
            plan = PackCompaction(path, "rewrite", f"{len(live):,} live entries, {human_bytes(dead)} dead "
                                  f"({dead / size:.0%})", size, dead, identity, live)
        else:
            continue
        plans.append(plan)
    return plans


def compact(store: FeatureStore, plans: Sequence[PackCompaction]) -> list[tuple[str, str]]:
    """Removes or rewrites the packs of ``plans`` (the caller holds the feature's lock); returns
    ``(pack, what was done)`` for each. A pack is removed only while it is the file judged; a
    rewrite copies its live entries (those whose checksum matches) into new packs, records their
    new places in the index, then removes it."""
    done = []
    for plan in plans:
        if plan.action == "remove":
            gone = _core.remove_judged(plan.path, plan.identity)
            done.append((plan.path, "removed" if gone else "kept: rewritten or removed since it was judged"))
        elif plan.action == "rewrite":
            new, n = store._core.repack(plan.path, plan.identity, plan.live)
            done.append((plan.path, f"rewritten: {n:,} entries into {', '.join(map(os.fspath, new)) or 'no pack'}"))
    return done
