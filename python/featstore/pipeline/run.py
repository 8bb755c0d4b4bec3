"""Running a plan: under the feature's lock, journal, stream, wait for the other ranks, finish.

torchrun's ranks are one run: rank 0 holds the lock, every rank journals to its own file, and
rank 0 compacts the journals once all have finished. Ctrl-C stops the stream, and what was written
is still journaled and merged before the interrupt is reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch

from featstore import _core
from featstore.lock import run_lock
from featstore.manifest import ensure_manifest, recorded_shapes
from featstore.pipeline import journal as journal_lines
from featstore.pipeline.items import WorkItem
from featstore.pipeline.journal import journal_path, journal_unindexed
from featstore.pipeline.manifest import finish_manifest
from featstore.pipeline.planning import Plan
from featstore.pipeline.refresh import refresh
from featstore.pipeline.selection import join_process_group
from featstore.pipeline.shape_log import ShapeLog
from featstore.pipeline.streaming import stream
from featstore.pipeline.summary import Counts


@dataclass(frozen=True)
class Outcome:
    """What a run did: its counts, whether Ctrl-C stopped it, the manifest it merged (or None)."""

    counts: Counts
    interrupted: bool
    manifest: str | None


def run_plan(plan: Plan, *, num_workers: int | None, durable: bool) -> Outcome:
    """Computes and writes the planned entries and merges the journals into the manifest."""
    store = plan.store
    counts = Counts()
    journal = journal_path(store, plan.rank, plan.shard)
    interrupted = False
    with contextlib.ExitStack() as stack:
        if plan.rank[0] == 0:
            stack.enter_context(run_lock(store, plan.shard))
        os.makedirs(os.path.dirname(store.manifest_path), exist_ok=True)
        # Before the first entry: a run killed before it merges its journals still leaves a
        # manifest saying which encoder's entries these are, so readers without a fingerprint
        # serve them (and no other encoder's). A manifest already there is merged at the end.
        ensure_manifest(store, total_images=len(plan.found.paths))
        kept = plan.skipped_valid()
        journal_unindexed(store, kept, journal)
        shape_log = ShapeLog(store, journal)
        # Entries this run keeps (or refreshes: same tensors) that the manifest may not have summed
        # up yet (written by an earlier featstore): their headers are read once, so the summary
        # covers every entry, not only this run's. The manifest is parsed only when some are kept.
        if (kept or plan.refresh) and recorded_shapes(store) is None:
            shape_log.observe_entries(store, kept + plan.refresh)
        if plan.refresh:
            plan = dataclasses.replace(plan, todo=plan.todo + refresh_entries(plan, journal, counts))
        if plan.todo:
            try:
                stream(plan, num_workers=num_workers, durable=durable, counts=counts, journal=journal,
                       shape_log=shape_log)
            except KeyboardInterrupt:
                interrupted = True
        if join_process_group(plan.rank[1]):
            torch.distributed.barrier()  # every rank's journal is complete before rank 0 merges
        plan.release_work()
        _core.release_freed_memory()
        # Still under the lock: no other run of the feature appends to a journal being merged.
        manifest = finish_manifest(plan)
    return Outcome(counts=counts, interrupted=interrupted, manifest=manifest)


def refresh_entries(plan: Plan, journal: str, counts: Counts) -> list[WorkItem]:
    """Refreshes the planned entries (see :mod:`.refresh`) and journals them; returns the items
    that no longer qualify (an input changed since planning), to be computed instead."""
    records, left = [], []
    for item in plan.refresh:
        record = refresh(plan.store, plan.encoder, item)
        if record is None:
            left.append(item)
        else:
            records.append(record)
    journal_lines.append(journal, records)
    counts.refreshed += len(records)
    return left
