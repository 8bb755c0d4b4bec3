"""What a precompute run counts, and the summary ``featstore precompute --json`` prints.

The summary has two halves: the plan's (what was found, selected and planned, the estimate) and,
after a run, the counts' (what was written and failed, where the time went).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from featstore import _core
from featstore.packs import entry_location
from featstore.pipeline.items import kind_for, noun
from featstore.pipeline.planning import Plan
from featstore.vocabulary import check_error


@dataclass
class Counts:
    """The tallies of a run, kept by the encoding loop and the writer thread."""

    written: int = 0
    frames: int = 0  # the images the written entries hold: one each, or a frame set's members
    frame_passes: int = 0  # history mode: frames fed through the model (a T-frame list streamed: T)
    failed: int = 0
    refreshed: int = 0  # entries rewritten with their own tensors after a shared input changed elsewhere
    bytes: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def plan_summary(plan: Plan, *, dry_run: bool) -> dict[str, Any]:
    """The summary of a plan (all of it for ``dry_run``). ``selected``, ``planned`` and
    ``skipped`` count entries: images, frame sets, or samples in history mode (``unit``);
    ``sources`` counts the files found, in set mode ``sets`` all the sets they make, and in
    history mode ``history`` the mode and ``lists`` the longest lists streamed (``planned_lists``
    of them this run). ``replaced`` counts the planned entries of another encoder configuration
    (``foreign``; ``replaced_fingerprint`` is one's fingerprint), ``unscanned`` lists the first 100
    paths the scan could not read (``scan_errors`` counts them all), ``weights_unchecked`` says why
    a dry run has no fingerprint (None when it has one) and ``estimate_from`` where
    ``estimated_bytes`` came from (``entries``: the mean size of entries already written;
    ``encoder``: the encoder's upper bound). ``to_refresh`` counts the stale entries that only a
    shared input made stale (a ``.jsonl`` edited on other lines): rewritten, not computed."""
    store, shard, rank = plan.store, plan.shard, plan.rank
    counts_by_state: dict[str, int] = defaultdict(int)
    for s in plan.states_of_entries():
        counts_by_state["error" if check_error(s) is not None else s] += 1
    frames = plan.caps.frames_per_set
    history = history_mode(plan.description) if plan.caps.history else None
    selected = sum(item.entries for item in plan.items)
    planned = sum(item.entries for item in plan.todo)
    replaced = counts_by_state.get("foreign", 0)
    return {
        "replaced": replaced, "replaced_fingerprint": _foreign_fingerprint(plan) if replaced else None,
        "weights_unchecked": plan.unchecked,
        "unscanned": [list(e) for e in plan.found.errors[:100]],
        "estimate_from": plan.estimate_from,
        "data_root": store.data_root, "feature": store.feature, "layout": store.layout, "cache_dir": store.cache_dir,
        "fingerprint": store.requested_fingerprint, "encoder": plan.description, "device": plan.device,
        "sources": len(plan.found), "selected": selected, "planned": planned, "to_refresh": len(plan.refresh),
        "skipped": selected - planned, "states": dict(counts_by_state),
        "estimated_bytes": plan.estimated_bytes, "free_bytes": plan.free_bytes,
        "plan_seconds": round(plan.plan_seconds, 3), "dry_run": dry_run, "scan_errors": len(plan.found.errors),
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        "rank": f"{rank[0]}/{rank[1]}" if rank[1] > 1 else None, "frames_per_set": frames,
        "model_path": plan.model_path, "note": _history_note(history) if history else _note(frames),
        # An encoder of items (captions, not pixels) counts items, not images.
        "unit": "items" if plan.caps.items and kind_for(plan.caps) == "image" else noun(kind_for(plan.caps)),
        **({"sets": plan.total_items} if frames > 1 else {}),
        **({"history": history, "lists": plan.total_items, "planned_lists": len(plan.todo)} if history else {}),
    }


def _foreign_fingerprint(plan: Plan) -> str | None:
    """The fingerprint of the first foreign entry of a selected image (None for sets and histories,
    or when it cannot be read): what a changed configuration replaces."""
    for item, state in zip(plan.items, plan.states, strict=True):
        if state == "foreign" and item.kind == "image":
            try:
                meta, _, _ = _core.read_header(*entry_location(plan.store.check(item.paths[0])))
            except Exception:  # unreadable now: the count alone still says it
                return None
            return meta.get("fingerprint")
    return None


def history_mode(description: dict[str, Any]) -> dict[str, Any]:
    """The history mode an encoder description (``describe()``) records: ``{"window": [start,
    recent] or None, "order": "forward" or "reverse"}`` (what the summary and the manifest say)."""
    window = description.get("window")
    return {"window": list(window) if window else None,
            "order": "reverse" if description.get("reverse") else "forward"}


def run_summary(counts: Counts, seconds: float, interrupted: bool, *, frames_per_set: int = 1,
                history: bool = False) -> dict[str, Any]:
    """The summary of a run (added to the plan's) from its counts and its length in seconds.
    ``written`` and ``failed`` count entries: images, or frame sets of up to ``frames_per_set``
    frames (then ``frames_written`` and ``sets_per_second`` too; ``images_per_second`` counts
    the frames), or samples in ``history`` mode (then ``frame_passes``, the frames fed through
    the model, and ``samples_per_second`` and ``frame_passes_per_second``)."""

    def rate(n: int) -> float | None:
        return round(n / seconds, 2) if seconds > 0 else None

    done = {
        "written": counts.written, "failed": counts.failed, "refreshed": counts.refreshed,
        "bytes_written": counts.bytes,
        "failures": [list(f) for f in counts.failures[:100]], "seconds": round(seconds, 3),
        "images_per_second": rate(counts.frames),
        "stage_seconds": {k: round(v, 3) for k, v in counts.stage_seconds.items()},
        "interrupted": interrupted,
    }
    if frames_per_set > 1:
        done.update({"frames_written": counts.frames, "sets_per_second": rate(counts.written)})
    if history:
        done.update({"frame_passes": counts.frame_passes, "samples_per_second": rate(counts.written),
                     "frame_passes_per_second": rate(counts.frame_passes)})
    return done


def _history_note(history: dict[str, Any]) -> str:
    """What history entries are valid for."""
    window = history["window"]
    how = (f"a key/value window of the first {window[0]} and last {window[1]} frames" if window
           else "every earlier frame")
    if history["order"] == "reverse":
        order = "last to first (each sample its own pass)"
        held = "the features of the frame fed last (the list's first)"
    else:
        order, held = "oldest first (one pass per longest list)", "the last frame's features"
    return (f"history: each sample's frames (a .jsonl list) are streamed causally, {order}, each attending to "
            f"{how}; an entry holds {held} given the sample's whole history (JanusVLN-style models); read them with "
            "FeatureStore.get_history(frames)")


def _note(frames: int) -> str:
    """What the entries of this frames-per-set mode are valid for."""
    if frames == 1:
        return ("frames-per-set 1: each image is encoded alone (S=1); its features differ from those computed "
                "with other frames and are valid only for single-frame use")
    return (f"frames-per-set {frames}: frames are encoded together in sets of up to {frames} (from .jsonl "
            "lists, else each directory's sorted images); read them with FeatureStore.get_set(members)")
