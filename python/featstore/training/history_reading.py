"""Reading history entries into samples and batches (``CachedDataset(..., history_fn=...)``): a
sample's features are the entry of its history, the ordered tuple of its frames
(:mod:`featstore.history`). History entries have no per-source index, so each is judged as it is
read; its tensors are copied into rows of one batch tensor per name, as per-image entries are read,
so a batch's keys and shapes never depend on which rows hit."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from featstore import _core
from featstore.errors import CorruptEntryError, StaleEntryError
from featstore.history import history_entry_files, history_entry_path, judge_history_entry
from featstore.store import FeatureStore
from featstore.training.reading import EntryReader, Layout, Source

#: History entry files whose headers are read at most while looking for one to learn shapes from.
_LEARN_LIMIT = 4096


class HistoryReader(EntryReader):
    """Reads a :class:`CachedDataset`'s history entries; ``sources`` are tuples of frames
    (store-relative, oldest first)."""

    def get(self, store: FeatureStore, source: Source) -> dict[str, torch.Tensor] | None:
        return store.get_history(source)

    def states(self, store: FeatureStore, sources: Sequence[Source]) -> list[str]:
        return [store.history_state(frames) for frames in sources]

    def learn(self, store: FeatureStore, sources: Sequence[Source] | None) -> None:
        """Learns the entries' tensors from a valid history entry: one of ``sources``, else any
        history entry file of the feature (judged from its header).

        Raises
        ------
        StaleEntryError
            The feature has no valid history entry at all.
        """
        shapes = find_history_layout(store, sources or ())
        if shapes is None:
            raise StaleEntryError(
                f"no valid {store.feature} history entry to learn shapes from under {store.state_dir}, and without "
                "an encoder a miss is served as zeros of the entries' shapes. Run `featstore precompute --jsonl "
                "FIELD --history` for this feature first, or pass an encoder (encoder=...) to compute misses")
        self.shapes = shapes
        self.layout = {n: spec for n, spec in shapes.items() if n not in self.pad}

    def fixed_layout(self, store: FeatureStore, sources: Sequence[Source]) -> Layout | None:
        if self.layout is None:
            layout = _first_layout(store, _entry_paths(store, sources))
            if layout is not None:
                self.layout = {n: spec for n, spec in layout.items() if n not in self.pad}
        return self.layout

    def _read_fixed(self, store: FeatureStore, sources: Sequence[Source], fixed: Layout
                    ) -> tuple[dict[str, torch.Tensor], set[int]]:
        """Each served entry's tensors copied into its row of one batch tensor per name; the rows
        that missed (or hold other shapes) are returned and hold nothing."""
        tensors = {name: self.buffers.take(len(sources), dtype, shape) for name, (dtype, shape) in fixed.items()}
        failed: set[int] = set()
        for j, frames in enumerate(sources):
            found = store.get_history(frames)
            if found is None or any(name not in found or found[name].dtype != dtype
                                    or tuple(found[name].shape) != shape for name, (dtype, shape) in fixed.items()):
                failed.add(j)
                continue
            for name, t in tensors.items():
                t[j].copy_(found[name])
        return tensors, failed


def find_history_layout(store: FeatureStore, sources: Iterable[Source]) -> Layout | None:
    """The dtype and shape of every tensor of one valid history entry of the feature: the first
    among ``sources`` (tuples of frames), else among the history entry files on disk (the first
    :data:`_LEARN_LIMIT` judged). None when there is none."""
    layout = _first_layout(store, _entry_paths(store, sources))
    if layout is None:
        layout = _first_layout(store, history_entry_files(store)[:_LEARN_LIMIT])
    return layout


def _entry_paths(store: FeatureStore, sources: Iterable[Source]) -> Iterator[str]:
    """Where the entries of ``sources`` (tuples of frames) are, for those whose frames all exist."""
    for frames in sources:
        try:
            yield history_entry_path(store, frames)
        except (FileNotFoundError, ValueError):  # a frame is gone, or an empty history: no entry
            continue


def _first_layout(store: FeatureStore, paths: Iterable[str]) -> Layout | None:
    """The layout of the first of these history entry files that is valid, from its header."""
    from featstore._torch import SAFETENSORS_TO_TORCH

    for path in paths:
        try:
            meta, tensors, _ = _core.read_header(path)
        except (CorruptEntryError, OSError):
            continue
        if judge_history_entry(store, path, meta=meta).state != "valid":
            continue
        layout: dict[str, Any] = {name: (SAFETENSORS_TO_TORCH[dt], tuple(shape)) for name, dt, shape, _, _ in tensors
                                  if dt in SAFETENSORS_TO_TORCH}
        if layout:
            return layout
    return None
