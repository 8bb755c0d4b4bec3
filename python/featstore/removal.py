"""Removing a feature's entries: one judged entry (:meth:`FeatureStore.remove`), or all of them
(:meth:`FeatureStore.clear`). Sources and legacy files are never touched."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from featstore import _core
from featstore.vocabulary import ENTRY_EXTENSION, LEGACY_SIDECAR_SUFFIX

if TYPE_CHECKING:
    from featstore.store import FeatureStore


def remove_entry(store: FeatureStore, rel: str) -> bool:
    """Removes the entry of ``rel``; True if a file was removed (or, for a packed entry, dropped
    from the index: its pack keeps the bytes until ``featstore gc`` compacts it).

    Only the entry file this call judged is removed: :meth:`FeatureStore.check` names it and its
    identity, and :func:`featstore._core.remove_judged` removes it only while it is still that
    file. A fresh entry a concurrent writer renamed over it meanwhile stays (False).
    """
    c = store.check(rel)
    entry = os.fspath(c.entry) if c.entry else ""
    removed = False
    if c.packed is None and c.identity is not None and entry and c.state != "legacy" \
            and not entry.endswith(LEGACY_SIDECAR_SUFFIX):
        removed = _core.remove_judged(entry, c.identity)
        store.forget(rel)
        c = store.check(rel)  # an older copy in a pack would show now: it goes too
    if c.packed is not None:
        # A pack holds other sources' entries too: this one leaves the index, the pack stays.
        pack, offset, length = c.packed
        removed = store._core.drop_packed([(rel, pack, offset, length)])[0] or removed
    store.forget(rel)
    return removed


def remove_all(store: FeatureStore) -> int:
    """Removes every entry file of the feature, its manifest, journals and state directory;
    returns the number of entry files removed."""
    removed = 0
    if store.layout == "dir":
        assert store.cache_dir is not None
        feature_dir = os.path.join(store.cache_dir, store.feature)
        for _, _, files in os.walk(feature_dir):
            removed += sum(1 for f in files if f.endswith(f".{ENTRY_EXTENSION}"))
        shutil.rmtree(feature_dir, ignore_errors=True)
    else:
        for rel in store.entry_files():
            try:
                os.remove(os.path.join(store.data_root, rel))
                removed += 1
            except FileNotFoundError:
                pass
        for p in [store.manifest_path, *store.journal_paths()]:
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
    shutil.rmtree(store.state_dir, ignore_errors=True)
    return removed
