"""The feature's manifest as a document: the fields it holds and where its journals are.

The Rust core reads, writes (atomically) and merges manifests, journals and the index segments;
this module decides what goes in a manifest. It keeps the fields users of the old scripts read
(``total_images``, ``processed_images``, ``data_root``, ``cache_format``, the weights path when
known) and adds featstore's (format, feature, layout, fingerprint, counts per state, version,
time). The per-entry index is not in it: it lives in the index's segments (``store.index_dir``,
docs/design.md), so reading a manifest costs the same at any size.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from featstore import _core, shapes
from featstore.errors import ManifestError
from featstore.vocabulary import is_feature_name, sidecar_suffix

if TYPE_CHECKING:  # the store writes its manifest through this module
    from featstore.status import Status
    from featstore.store import FeatureStore


def write_manifest(store: FeatureStore, status: Status, sources: Iterable[str],
                   fields: Mapping[str, Any] | None = None) -> str:
    """Writes the feature's manifest atomically and returns its path.

    Fields of an existing manifest that featstore does not set are kept; the index is rewritten
    to hold exactly the valid entries among ``sources``, so later lookups and ``status`` open no
    entry.
    """
    path = store.manifest_path
    old = json.loads(_core.read_manifest(path) or "{}")
    doc: dict[str, Any] = {k: v for k, v in old.items() if k not in ("index", "failures", "format")}
    doc.update(store_fields(store, total_images=status.sources))
    if old.get("fingerprint") != doc.get("fingerprint"):
        doc.pop("tensors", None)  # the shapes of another encoder configuration's entries
    doc["counts"] = dict(status.counts)
    doc.update(fields or {})
    doc["failures"] = old.get("failures", {})
    # The index first: a manifest naming a count its index lacks would be the worse crash.
    doc["processed_images"] = store._core.write_index(list(sources))
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


def ensure_manifest(store: FeatureStore, *, total_images: int = 0, **mode: Any) -> None:
    """Gives a feature whose entries were written outside precompute (lazily in training, or by
    ``put`` on a store opened with a fingerprint) a manifest recording that fingerprint, when it
    has none: a store opened without a fingerprint then serves exactly these entries, and a later
    run with another encoder configuration is told, never served them. ``mode``: fields saying
    how entries are grouped (``history=True``), so that status, verify and gc count them that way.
    A manifest already there is left as it is."""
    # Not FeatureStore.write_manifest: that one records counts and an index from a status of
    # every source; this records the store's description only, and only where none exists.
    # A stat, not a read: a million-entry manifest is not parsed to learn that it exists.
    if store.fingerprint is None or os.path.lexists(store.manifest_path):
        return
    os.makedirs(os.path.dirname(store.manifest_path), exist_ok=True)
    fields = {**store_fields(store, total_images=total_images), **mode}
    _core.write_manifest(store.manifest_path, json.dumps(fields))


def check_fingerprint_field(path: str) -> None:
    """Raises :class:`ManifestError` when the manifest at ``path`` records a fingerprint that is
    neither a string nor null: read as "none", it would let any encoder's entries be served."""
    text = _core.read_manifest(path)
    try:
        doc = json.loads(text) if text else {}
    except ValueError:
        return  # a damaged manifest is the core's to report
    value = doc.get("fingerprint") if isinstance(doc, dict) else None
    if value is None or isinstance(value, str):
        return
    raise ManifestError(
        f"manifest {path}: its fingerprint is {json.dumps(value)} ({type(value).__name__}), not a string, so it "
        "cannot say which encoder's entries are valid. Run `featstore precompute` for this feature again (it "
        "records its encoder's fingerprint), or set \"fingerprint\" there to the encoder's fingerprint string, or "
        "open the store with it (FeatureStore(..., fingerprint=FP), --fingerprint FP)")


def read_document(path: str) -> dict[str, Any]:
    """The manifest at ``path`` as a dict ({} when there is none)."""
    text = _core.read_manifest(path)
    doc = json.loads(text) if text else {}
    return doc if isinstance(doc, dict) else {}


def recorded_shapes(store: FeatureStore) -> shapes.Shapes | None:
    """The shapes of the feature's entries as precompute summed them up in the manifest
    (``"tensors"``, see :mod:`featstore.shapes`), when the manifest is for the store's
    fingerprint; None when there is no such summary."""
    doc = read_document(store.manifest_path)
    if not doc or doc.get("fingerprint") != store.fingerprint:
        return None
    return shapes.from_json(doc.get("tensors"))


def indexed_sources(store: FeatureStore) -> list[str]:
    """The sources the index holds a record of (valid when it was written), in byte order; []
    without an index. A manifest of an earlier version with its index inline gives that one."""
    return [os.fspath(p) for p in store._core.indexed_sources()]


def shape_log_path(journal: str) -> str:
    """Where the process writing ``journal`` sums up its entries' shapes:
    ``<manifest>.rank<R>-of-<N>.shapes.json`` beside ``<manifest>.rank<R>-of-<N>.jsonl``."""
    return journal.removesuffix(".jsonl") + ".shapes.json"


def merge_journals(store: FeatureStore, fields: Mapping[str, Any] | None = None) -> int:
    """Merges the journals beside the manifest into it (the core does; ``fields`` override the
    manifest's), with the processes' shape summaries joined into ``"tensors"``: the old summary
    when it is for the same fingerprint, plus every summary of that fingerprint. Returns the
    number of journals merged. The caller holds the feature's lock."""
    fields = dict(fields or {})
    doc = read_document(store.manifest_path)
    fingerprint = fields.get("fingerprint", doc.get("fingerprint"))
    logs = sorted(glob.glob(glob.escape(store.manifest_path) + ".rank*-of-*.shapes.json"))
    merged: shapes.Shapes = {}
    if doc.get("fingerprint") == fingerprint:
        merged.update(shapes.from_json(doc.get("tensors")) or {})
    for path in logs:
        try:
            with open(path, encoding="utf-8") as f:
                log = json.load(f)
        except (OSError, ValueError):
            continue  # a summary torn by a crash of a featstore older than its atomic write
        if isinstance(log, dict) and log.get("fingerprint") == fingerprint:
            shapes.merge(merged, shapes.from_json(log.get("tensors")) or {})
    # Always set: a summary of another fingerprint's entries must not outlive them.
    fields["tensors"] = shapes.to_json(merged) if merged else None
    journals, *_ = _core.merge_journals(store.manifest_path, store.index_dir, json.dumps(fields))
    for path in logs:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    return journals


def journal_paths(manifest_path: str) -> list[str]:
    """The per-rank journals beside a manifest (``<manifest>.rank<R>-of-<N>.jsonl``), sorted."""
    return sorted(glob.glob(glob.escape(manifest_path) + ".rank*-of-*.jsonl"))


def manifest_features(data_root: str, cache_dir: str | None = None) -> list[str]:
    """The features that have a manifest, sorted: ``<root>/<feature>_cache_manifest.json`` (the
    sidecar layout), or ``<cache_dir>/<feature>/manifest.json`` (the dir layout) when
    ``cache_dir`` is given."""
    if cache_dir is not None:
        found = [os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(glob.escape(cache_dir), "*",
                                                                                        "manifest.json"))]
    else:
        suffix = "_cache_manifest.json"
        found = [os.path.basename(p)[:-len(suffix)] for p in glob.glob(os.path.join(glob.escape(data_root),
                                                                                     "*" + suffix))]
    return sorted(f for f in found if is_feature_name(f))
