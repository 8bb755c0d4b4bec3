"""What the training side tells its user: one start line per job (what is on, how much is
cached), and warnings given once per kind rather than once per sample."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

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
    elif paths is not None:
        valid = store.states(paths).count("valid")
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
    return f"{fields.get('processed_images', 0):,} of {fields.get('total_images', 0):,} cached (manifest)"


class WarnOnce:
    """Warns once per kind of trouble in this process (later ones of the kind are silent)."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def __call__(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, stacklevel=3)
