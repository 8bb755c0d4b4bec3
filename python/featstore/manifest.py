"""The feature's manifest as a document: the fields it holds and where its journals are.

The Rust core reads, writes (atomically) and merges manifests and journals; this module decides
what goes in one. It keeps the fields users of the old scripts read (``total_images``,
``processed_images``, ``data_root``, ``cache_format``, the weights path when known) and adds
featstore's (format, feature, layout, fingerprint, counts per state, version, time, the index).
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from featstore import _core
from featstore.vocabulary import sidecar_suffix

if TYPE_CHECKING:  # the store writes its manifest through this module
    from featstore.status import Status
    from featstore.store import FeatureStore


def write_manifest(store: FeatureStore, status: Status, sources: Iterable[str],
                   fields: Mapping[str, Any] | None = None) -> str:
    """Writes the feature's manifest atomically and returns its path.

    Fields of an existing manifest that featstore does not set are kept; the index lists the
    valid entries among ``sources`` so later lookups and ``status`` open no entry.
    """
    path = store.manifest_path
    old = json.loads(_core.read_manifest(path) or "{}")
    doc: dict[str, Any] = {k: v for k, v in old.items() if k not in ("index", "failures", "format")}
    doc.update(store_fields(store, total_images=status.sources))
    doc["counts"] = dict(status.counts)
    doc.update(fields or {})
    doc["failures"] = old.get("failures", {})
    doc["index"] = {os.fspath(r.source): list(r.as_list()) for r in store.index_records(sources)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _core.write_manifest(path, json.dumps(doc))
    return path


def store_fields(store: FeatureStore, *, total_images: int) -> dict[str, Any]:
    """The manifest fields that describe the store (``processed_images`` is derived from the
    index by the writer)."""
    cache_format = (f"<image_path>{sidecar_suffix(store.feature)}" if store.layout == "sidecar"
                    else f"<cache_dir>/{store.feature}/<key[:2]>/<key[:32]>.safetensors")
    return {"total_images": total_images, "data_root": store.data_root, "cache_format": cache_format,
            "feature": store.feature, "layout": store.layout, "cache_dir": store.cache_dir,
            "fingerprint": store.fingerprint, "featstore_version": _core.__version__,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def journal_paths(manifest_path: str) -> list[str]:
    """The per-rank journals beside a manifest (``<manifest>.rank<R>-of-<N>.jsonl``), sorted."""
    return sorted(glob.glob(glob.escape(manifest_path) + ".rank*-of-*.jsonl"))
