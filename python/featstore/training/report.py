"""What the training side tells its user: one start line per job (what is on, how much is
cached), and warnings given once per kind rather than once per sample."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from featstore import _core, env
from featstore.store import FeatureStore

log = logging.getLogger("featstore")


def start_line(store: FeatureStore | None, *, paths: Sequence[str] | None, mode: str, switched_off: bool,
               on_miss: str, histories: bool = False) -> str:
    """The start log line: what is on, and how much is cached (counted among ``paths`` when
    given, else taken from the manifest; with ``histories`` not counted: judging a history entry
    costs a ``stat`` per frame, so ``featstore status`` counts them)."""
    if store is None:
        why = "use_cache=False" if switched_off else "mode off"
        then = "features are computed live" if on_miss == "compute" else "samples come without features"
        return f"feature cache disabled ({why}): {then}"
    if histories:
        cached = "history entries (one per sample's frames; `featstore status` counts them)"
    elif store.fingerprint is None and mode == "lazy":
        # Entries are judged against the encoder's fingerprint once it is built: counting now,
        # against none, would say "0 cached" of a cache the epoch then reads.
        cached = "cached count unknown until the encoder is built (no manifest records its fingerprint)"
    elif paths is not None:
        served = ("valid", "legacy") if store.allow_legacy else ("valid",)
        valid = sum(state in served for state in store.states(paths))
        cached = f"{valid:,} of {len(paths):,} cached"
    else:
        cached = _cached_from_manifest(store)
    where = f", cache_dir {store.cache_dir}" if store.cache_dir else ""
    return f"feature cache enabled: feature {store.feature}, layout {store.layout}{where}, {cached}, mode {mode}"


def log_start_line(make_line: Callable[[], str]) -> None:
    """Logs the start line that ``make_line`` makes, on rank 0 only (the other ranks do not even
    make it: counting what is cached costs a ``stat`` per source), to ``logging`` when it is
    configured, else to stderr."""
    if env.distributed_rank()[0] != 0:
        return  # one line per job, not per rank
    line = make_line()
    if log.hasHandlers() and log.isEnabledFor(logging.INFO):
        log.info(line)
    else:  # logging is not configured: the line should still be seen
        print(f"[featstore] {line}", file=sys.stderr)


def _cached_from_manifest(store: FeatureStore) -> str:
    # FeatureStore has no public method giving its manifest's fields: read it with the core, as the store does.
    text = _core.read_manifest(store.manifest_path)
    if text is None:
        return "cached count unknown (no manifest yet; pass paths= to count)"
    fields = json.loads(text)
    indexed, total = int(fields.get("processed_images") or 0), int(fields.get("total_images") or 0)
    when = f", {fields['updated']}" if isinstance(fields.get("updated"), str) else ""
    if indexed > total:
        # The index still lists sources renamed or removed since: "301 of 299" cannot be true.
        return (f"{indexed:,} entries indexed for {total:,} sources at the last precompute (manifest{when}; some "
                "for sources since renamed or removed: `featstore status` counts what is cached now)")
    return f"{indexed:,} of {total:,} cached at the last precompute (manifest{when})"


def nothing_cached(store: FeatureStore, reader: Any, sources: Sequence[Any], misses: Sequence[int],
                   on_miss: str) -> str:
    """The warning for a read-mode dataset whose first samples all missed: how many, the first
    one, its state, and the likely cause (training on zeros must never go unnoticed)."""
    first = sources[misses[0]]
    frames = first if isinstance(first, tuple) else (first,)
    state = reader.states(store, [first])[0]
    shown = os.path.join(store.data_root, frames[-1]) if not os.path.isabs(frames[-1]) else frames[-1]
    if not all(os.path.lexists(os.path.join(store.data_root, f)) for f in frames):
        cause = (f"{shown} does not exist: relative paths are read relative to the data root {store.data_root} "
                 "(or to the working directory when only that names a file); check path_fn")
    elif state == "foreign":
        cause = ("its entry was written by another encoder configuration"
                 + (" and no manifest says which is current: open the store with fingerprint=..."
                    if store.fingerprint is None else ": precompute with this configuration"))
    elif state == "missing":
        cause = f"no entry: run `featstore precompute {store.data_root}` for feature {store.feature} first"
    else:
        cause = f"`featstore explain {shown} --data-root {store.data_root} --feature {store.feature}` says why"
    return (f"featstore: none of the first {len(misses)} samples has a valid {store.feature} entry (the first, "
            f"{shown}: {state}); they get {'live features' if on_miss == 'compute' else 'zeros'} and cached=False. "
            f"Likely cause: {cause}")


class WarnOnce:
    """Warns once per kind of trouble in this process (later ones of the kind are silent)."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def __call__(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, stacklevel=3)
