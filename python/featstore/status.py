"""Counts of a feature's entries per state (``FeatureStore.status``, ``featstore status``)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from featstore.scan import scan
from featstore.vocabulary import ENTRY_EXTENSION, STATES, check_error, sidecar_suffix

if TYPE_CHECKING:  # the store counts through this module; it only uses the store handed to it
    import numpy as np

    from featstore.store import FeatureStore


@dataclass
class Status:
    """Counts of entries per state for one feature.

    Attributes
    ----------
    counts : dict of str to int
        One count per state in :data:`STATES`.
    feature, layout, data_root : str
        What was counted.
    fingerprint : str or None
        The fingerprint entries were checked against.
    errors : list of (str, str)
        Sources that could not be checked, with the reason.
    unit : {"sources", "sets", "histories"}
        What the counts count: per-image entries, frame sets (the feature's manifest records a
        frame-set mode), or histories, one per sample (see :func:`featstore.ops.status`).
    frames : int or None
        With frame sets or histories: the frames (images) they are made of.
    frames_per_set : int
        With frame sets: the most frames one set holds.
    """

    counts: dict[str, int]
    feature: str
    layout: str
    data_root: str
    fingerprint: str | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)
    unit: str = "sources"
    frames: int | None = None
    frames_per_set: int = 1

    def __getitem__(self, state: str) -> int:
        return self.counts[state]

    @property
    def sources(self) -> int:
        """Sources that exist: the counts of every state but ``orphan``, or with frame sets and
        histories the frames."""
        if self.unit in ("sets", "histories") and self.frames is not None:
            return self.frames
        return self.items

    @property
    def items(self) -> int:
        """What the counts count (sources, frame sets, histories) that exists: every state but ``orphan``."""
        return sum(n for s, n in self.counts.items() if s != "orphan")

    def to_dict(self) -> dict[str, Any]:
        doc = {"feature": self.feature, "layout": self.layout, "data_root": self.data_root,
               "fingerprint": self.fingerprint, "sources": self.sources, "counts": dict(self.counts),
               "errors": [list(e) for e in self.errors], "unit": self.unit}
        if self.unit == "sets":
            doc.update({"sets": self.items, "frames": self.frames, "frames_per_set": self.frames_per_set})
        elif self.unit == "histories":
            doc.update({"histories": self.items, "frames": self.frames})
        return doc


def count_states(store: FeatureStore, sources: Iterable[str] | None = None, *, threads: int | None = None,
                 progress: bool | None = False, entries: Sequence[str] | None = None,
                 stamps: np.ndarray | None = None) -> Status:
    """:meth:`FeatureStore.status`: counts per state; ``sources`` defaults to a scan of the root.
    ``entries``: the sidecar entry files a caller's scan listed (else found by a walk);
    ``stamps``: the stamps that scan took of ``sources`` (else each is stat'ed by its check)."""
    suffix = sidecar_suffix(store.feature)
    entry_names = [p[: -len(suffix)] for p in entries] if entries is not None and store.layout == "sidecar" else None
    if sources is None:
        # The sidecar entries' names come from the same walk as the sources (no second walk, no
        # stat of theirs: the check below stats each entry it needs).
        sidecar = store.layout == "sidecar"
        found = scan(store.data_root, skip_dirs=[store.cache_dir] if store.cache_dir else (), threads=threads,
                     progress=progress, named_suffix=suffix if sidecar else None, stamps=True)
        rels, stamps = found.paths, found.stamps
        errors = list(found.errors)
        if sidecar and found.named is not None:
            entry_names = [p[: -len(suffix)] for p in found.named]
    else:
        rels = store.rels(sources)
        errors = []
    states = store.states(rels, threads=threads, progress=progress, stamps=stamps)
    counts = {s: 0 for s in STATES}
    tally = Counter(states)
    for state, n in tally.items():
        if state in counts:
            counts[state] += n
    if any(state not in counts for state in tally):  # some checks failed: name their sources
        errors += [(rel, error) for rel, s in zip(rels, states, strict=True) if (error := check_error(s)) is not None]
    known = set(rels)
    candidates = _orphan_candidates(store) if entry_names is None else entry_names
    unknown = {rel for rel in candidates if rel not in known}
    if store.layout == "sidecar" and os.path.isdir(store._core.packs_dir):
        # Packed entries have no file a walk finds: the index names their sources.
        unknown.update(rel for rel in map(os.fsdecode, store._core.indexed_sources()) if rel not in known)
    counts["orphan"] += sum(store.state(rel) == "orphan" for rel in unknown)
    return Status(counts=counts, feature=store.feature, layout=store.layout, data_root=store.data_root,
                  fingerprint=store.fingerprint, errors=errors)


def sidecar_entry_files(store: FeatureStore) -> list[str]:
    """Relative paths of the feature's sidecar entry files under the root ([] in the dir
    layout): regular files only (a FIFO named like an entry is not one)."""
    if store.layout != "sidecar":
        return []
    suffix = sidecar_suffix(store.feature)
    return [p for p in scan(store.data_root, extensions=[ENTRY_EXTENSION]).paths if p.endswith(suffix)]


def _orphan_candidates(store: FeatureStore) -> list[str]:
    """Sources that may have lost their entry's source: the sidecar entries' sources, or the
    manifest index's (the dir layout names entries by key)."""
    if store.layout == "sidecar":
        suffix = sidecar_suffix(store.feature)
        return [p[: -len(suffix)] for p in store.entry_files()]
    return [os.fspath(p) for p in store._core.indexed_sources()]
