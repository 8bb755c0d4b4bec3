"""``featstore status``: counts per state from the hot path (no entry the manifest indexes is opened)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from featstore.fmt import error_lines
from featstore.history import recorded_history
from featstore.ops.files import feature_files
from featstore.ops.histories import counted_histories, judge_histories
from featstore.ops.survey import frame_set_groups, judge_sets
from featstore.scan import scan
from featstore.sets import group_states, recorded_mode
from featstore.store import FeatureStore, Status
from featstore.vocabulary import STATES


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
        what = {"sets": f"{st.items:,} frame sets of up to {st.frames_per_set} frames ({st.sources:,} frames); "
                        "counts are sets",
                "histories": f"{st.items:,} histories, one per sample ({st.sources:,} frames); counts are "
                             "histories"}.get(st.unit, f"{st.sources:,} sources")
        lines = [f"feature {st.feature} under {st.data_root} ({st.layout} layout, fingerprint "
                 f"{st.fingerprint or 'any'}): {what}"]
        grouped = st.unit in ("sets", "histories")
        hidden_at_zero = ("corrupt", "legacy") if grouped else ("corrupt",)  # sets and histories have no legacy
        for s in STATES:
            if s not in hidden_at_zero or counts.get(s):
                lines.append(f"  {s:8} {counts.get(s, 0):>10,}")
        if grouped:
            noun = "frame sets" if st.unit == "sets" else "history entries"
            lines.append(f"checked in {self.seconds:.2f} s; {noun} have no index: each entry's header was read")
        elif self.manifest:
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
            lines.extend(error_lines(st.errors, "source could not be checked", "sources could not be checked"))
        return "\n".join(lines)


def status(store: FeatureStore, sources: Sequence[str] | None = None, *, lists: Sequence[Sequence[str]] | None = None,
           threads: int | None = None, progress: bool | None = None,
           entries: Sequence[str] | None = None, stamps: np.ndarray | None = None) -> StatusReport:
    """Counts entries per state: two ``stat`` calls per source (one with ``stamps`` from the
    scan that found them), no entry opened for sources the manifest indexes. ``corrupt``
    entries are only found by :func:`featstore.ops.verify`.

    When the feature's manifest records a frame-set mode (``precompute --frames-per-set N``), the
    counts are of frame sets (``Status.unit``): each set the sources make, as precompute grouped
    them, by its entry's state, and the set entries whose members are gone as ``orphan``. When
    its entries are histories (``precompute --jsonl FIELD --history``, or lazy training with
    ``history_fn``), the counts are of histories: each distinct list of the recorded field by
    its entry's state (every history entry file by its verdict where the lists are unknown),
    and the history entries whose frames are gone as ``orphan``.

    Parameters
    ----------
    store : FeatureStore
        The store (its manifest index was read when it was opened).
    sources : sequence of str, optional
        Relative source paths (default: a scan of the data root).
    lists : sequence of sequence of str, optional
        The ``.jsonl`` lists of a scan (frame sets; default: scanned with the recorded field).
    threads : int, optional
        Worker threads (default: one per core).
    progress : bool or None
        Progress bar on stderr for long checks (None: when it lasts over half a second).
    entries : sequence of str, optional
        The feature's sidecar entry files (relative), when the scan of ``sources`` listed them
        (``scan(..., named_suffix=...)``): orphans are counted among them without another walk.
    stamps : numpy.ndarray, optional
        The stamps that scan took of ``sources`` (:attr:`featstore.scan.ScanResult.stamps`):
        each source's check uses its stamp rather than ``stat`` it again.
    """
    t0 = time.perf_counter()
    st = (_set_status(store, sources, lists, threads) or _history_status(store, sources, lists, threads)
          or store.status(sources, threads=threads, progress=progress, entries=entries, stamps=stamps))
    seconds = time.perf_counter() - t0
    manifest = store.manifest_path if os.path.exists(store.manifest_path) else None
    return StatusReport(st, seconds, manifest, store.journal_paths())


def _set_status(store: FeatureStore, sources: Sequence[str] | None, lists: Sequence[Sequence[str]] | None,
                threads: int | None) -> Status | None:
    """The counts per state of the frame sets the sources make, when the manifest records a
    frame-set mode (else None)."""
    errors: list[tuple[str, str]] = []
    mode = recorded_mode(store)
    if mode is None:
        return None  # entries are per image: no pass over the sources here
    if sources is None:
        found = scan(store.data_root, jsonl=mode.jsonl, skip_dirs=[store.cache_dir] if store.cache_dir else (),
                     threads=threads, progress=False)
        sources, lists, errors = found.paths, found.sets, list(found.errors)
    rels = store.rels(sources)
    grouped = frame_set_groups(store, rels, lists)
    if grouped is None:
        return None
    mode, groups = grouped
    verdicts, unreadable = judge_sets(store, deep=False, threads=threads)
    counts = dict.fromkeys(STATES, 0)
    for state in group_states(store, groups, verdicts):
        counts[state] += 1
    counts["orphan"] = sum(v.state == "orphan" for v in verdicts)
    framed = {m for g in groups for m in g}
    return Status(counts=counts, feature=store.feature, layout=store.layout, data_root=store.data_root,
                  fingerprint=store.fingerprint, errors=errors + unreadable, unit="sets", frames=len(framed),
                  frames_per_set=mode.frames)


def _history_status(store: FeatureStore, sources: Sequence[str] | None, lists: Sequence[Sequence[str]] | None,
                    threads: int | None) -> Status | None:
    """The counts per state of the histories the samples name, when the feature's entries are
    histories (see :mod:`featstore.ops.histories`; else None)."""
    mode = recorded_history(store)
    verdicts, unreadable = judge_histories(store, deep=False, threads=threads)
    if mode is None and not verdicts:
        return None
    errors: list[tuple[str, str]] = []
    if sources is None:
        found = scan(store.data_root, jsonl=mode.jsonl if mode else None,
                     skip_dirs=[store.cache_dir] if store.cache_dir else (), threads=threads, progress=False)
        sources, lists, errors = found.paths, found.sets, list(found.errors)
    image_entries = mode is None and bool(feature_files(store)[0])  # only asked without a recorded mode
    counted = counted_histories(store, store.rels(sources), verdicts, lists=lists or None,
                                image_entries=image_entries)
    if counted is None:
        return None
    states, frames = counted
    counts = dict.fromkeys(STATES, 0)
    for state in states:
        counts[state] += 1
    counts["orphan"] = sum(v.state == "orphan" for v in verdicts)
    return Status(counts=counts, feature=store.feature, layout=store.layout, data_root=store.data_root,
                  fingerprint=store.fingerprint, errors=errors + unreadable, unit="histories", frames=frames)
