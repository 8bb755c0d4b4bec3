"""What each process of a run saw of its entries' shapes (:mod:`featstore.shapes`), kept in a
small file beside its journal and merged into the manifest's ``"tensors"`` with the journals
(:func:`featstore.manifest.merge_journals`).

The file is rewritten (atomically) before a batch whose outputs add a shape is written, so a
killed run's file covers every entry its journal names, and more (a batch that failed to write).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import torch

from featstore import _core, shapes
from featstore._torch import TORCH_TO_SAFETENSORS
from featstore.errors import FeatstoreError
from featstore.history import history_key_path, history_keys
from featstore.manifest import shape_log_path
from featstore.pipeline.items import WorkItem
from featstore.sets import set_entry_path
from featstore.store import FeatureStore


class ShapeLog:
    """The shapes this process wrote (or found valid), saved beside its journal."""

    def __init__(self, store: FeatureStore, journal: str) -> None:
        self.path = shape_log_path(journal)
        self.fingerprint = store.fingerprint
        self.shapes: shapes.Shapes = {}

    def observe_outputs(self, items: Sequence[WorkItem], outputs: Mapping[str, torch.Tensor | list[torch.Tensor]]
                        ) -> None:
        """Adds a batch's outputs (the batch is their first axis, or a list of one tensor per item;
        a history item's outputs also have one row per prefix) and saves the file when they add a
        shape."""
        changed = False
        batch = {name: t for name, t in outputs.items() if isinstance(t, torch.Tensor) and len(t) >= len(items)}
        if len(batch) == len(outputs) and not any(item.kind == "history" for item in items):
            # Every entry's tensor is one row of the batch: one shape per output.
            changed = shapes.observe(self.shapes, ((name, TORCH_TO_SAFETENSORS[t.dtype], t.shape[1:])
                                                   for name, t in batch.items()))
            if changed:
                self.save()
            return
        for i, item in enumerate(items):
            # The entry's tensor: row i (a history's rows are its prefixes: one more axis).
            rows = {name: t[i] for name, t in outputs.items() if len(t) > i}
            if item.kind == "history":
                rows = {name: t[0] for name, t in rows.items() if t.dim() > 0 and len(t)}
            changed |= shapes.observe(self.shapes, ((name, TORCH_TO_SAFETENSORS[t.dtype], t.shape)
                                                    for name, t in rows.items()))
        if changed:
            self.save()

    def observe_entries(self, store: FeatureStore, items: Sequence[WorkItem]) -> None:
        """Adds the shapes of ``items``' entries from their headers (entries a run leaves alone
        when the manifest holds no summary for the encoder yet, e.g. written by an earlier
        featstore), and saves the file."""
        for path in _entry_paths(store, items):
            try:
                _, tensors, _ = _core.read_header(path)
            except (OSError, FeatstoreError):
                continue  # judged valid moments ago; a concurrent change is the next run's to see
            shapes.observe(self.shapes, ((name, dtype, shape) for name, dtype, shape, *_ in tensors))
        self.save()

    def save(self) -> None:
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"fingerprint": self.fingerprint, "tensors": shapes.to_json(self.shapes)}, f)
        os.replace(tmp, self.path)


def _entry_paths(store: FeatureStore, items: Sequence[WorkItem]) -> list[str]:
    paths = []
    for item in items:
        if item.kind == "image":
            paths.append(store.entry_path(item.paths[0]))
        elif item.kind == "set":
            paths.append(set_entry_path(store, list(item.paths)))
        else:
            keys = history_keys(store, item.paths)  # one stat per frame for every prefix
            paths.extend(history_key_path(store, keys[n - 1]) for n in item.lengths)
    return paths
