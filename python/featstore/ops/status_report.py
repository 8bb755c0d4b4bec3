"""``featstore status``: counts per state from the hot path (no entry the manifest indexes is opened)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from featstore.fmt import error_lines
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
    manifest indexes. ``corrupt`` entries are only found by :func:`featstore.ops.verify`.

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
