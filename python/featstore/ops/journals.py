"""Journals an interrupted precompute left beside the manifest (and the inline index of a manifest
of an earlier version), merged into the index by whoever comes next."""

from __future__ import annotations

from featstore.errors import LockHeldError, ReadOnlyDataRootError
from featstore.lock import maintenance_lock
from featstore.manifest import merge_journals
from featstore.store import FeatureStore


def merge_leftover_journals(store: FeatureStore) -> int:
    """Merges journals an interrupted or unfinished precompute left beside the manifest, when no
    run of the feature holds its lock (a running one merges its own at the end). Returns the
    number of journals merged; 0 when there were none, a run is active, or the manifest's
    directory is not writable (status never fails for that). A manifest of an earlier version that
    holds its index inline is upgraded the same way: the merge writes that index as a segment."""
    if not store.journal_paths() and not store._core.holds_inline_index:
        return 0
    try:
        with maintenance_lock(store, "merge journals"):
            journals = merge_journals(store)
    except (LockHeldError, ReadOnlyDataRootError, PermissionError):
        return 0
    return journals
