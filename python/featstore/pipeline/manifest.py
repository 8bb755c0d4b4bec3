"""Finishing a run: compacting the journals into the feature's manifest.

Rank 0 merges under torchrun (after every rank's journal is complete); with ``--shard I/N`` the
last shard to finish does, and a later run or ``featstore status`` merges what an earlier one
left. The caller holds the run's lock, so no other run appends to a journal being merged.
"""

from __future__ import annotations

import os

from featstore.encoders import describe
from featstore.lock import lock_dir, lock_is_held
from featstore.manifest import merge_journals
from featstore.pipeline.planning import Plan
from featstore.pipeline.summary import history_mode


def finish_manifest(plan: Plan) -> str | None:
    """Merges the journals into the manifest and returns its path, or None when another
    process of the split merges (a rank other than 0, a shard while another still runs)."""
    store, rank, shard = plan.store, plan.rank, plan.shard
    if rank[0] != 0:
        return None
    if shard is not None:
        others = [os.path.join(lock_dir(store), f"precompute.shard{i}-of-{shard[1]}.lock") for i in range(shard[1])
                  if i != shard[0]]
        if any(lock_is_held(p) for p in others):
            return None  # a shard still running merges when it finishes
    fields = store.manifest_fields(total_images=len(plan.found.paths))
    # Described again: a loaded encoder may name more (its model class) than the planned one did.
    # The frame-set or history mode, so that status, verify and gc group the sources as this run
    # did (history: {"window": [start, recent] or null, "order": "forward" or "reverse"}).
    description = describe(plan.encoder)
    fields.update({"encoder": description, "frames_per_set": plan.caps.frames_per_set, "jsonl": plan.jsonl,
                   "history": history_mode(description) if plan.caps.history else None})
    weights = plan.description.get("model_path")
    if weights:
        fields["vggt_model_path" if plan.description.get("name") == "vggt" else "weights_path"] = weights
    if plan.model_path:
        fields["model_path"] = plan.model_path
    merge_journals(store, fields)
    return store.manifest_path
