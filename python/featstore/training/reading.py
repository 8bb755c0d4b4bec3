"""Reading entries into samples and batches: each fixed-shape tensor of a whole batch with one
parallel :meth:`FeatureStore.read_batch` into one buffer, anything else entry by entry."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from featstore.errors import BatchReadError
from featstore.store import FeatureStore
from featstore.training.batching import put_row
from featstore.training.buffers import BatchBuffers

#: name -> (dtype, shape) of an entry's tensors.
Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


class EntryReader:
    """Reads a :class:`CachedDataset`'s entries.

    Parameters
    ----------
    pad : tuple of str
        Variable-length tensors: never read into a batch tensor (they are padded instead).
    buffers : BatchBuffers
        Where batch tensors come from.
    """

    def __init__(self, pad: tuple[str, ...], buffers: BatchBuffers) -> None:
        self.pad = pad
        self.buffers = buffers
        #: The fixed-shape tensors of the entries, learned from the first hit.
        self.layout: Layout | None = None

    def into_samples(self, store: FeatureStore, samples: list[dict[str, Any]], sources: list[str]) -> list[int]:
        """Adds the cached tensors to the samples (rows of one batch tensor per name, which
        :func:`collate` passes on); returns the rows that missed."""
        each: Iterable[int] = range(len(samples))
        fixed = self.fixed_layout(store, sources) if len(samples) > 1 and not self.pad else None
        if fixed:
            tensors, failed = self._read_fixed(store, sources, fixed)
            for j, sample in enumerate(samples):
                if j not in failed:
                    sample.update({name: t[j] for name, t in tensors.items()})
            each = sorted(failed)
        misses = []
        for j in each:
            found = store.get(sources[j])
            if found is None:
                misses.append(j)
            else:
                samples[j].update(found)
        return misses

    def into_batch(self, store: FeatureStore, batch: dict[str, Any], reads: list[tuple[int, str]],
                   rows: int) -> list[tuple[int, str]]:
        """Reads the entries of ``reads`` (row, source) into the collated ``batch`` of ``rows``
        rows; returns those that missed."""
        each = reads
        fixed = self.fixed_layout(store, [s for _, s in reads])
        if fixed and len(reads) == rows and not self.pad and not any(name in batch for name in fixed):
            tensors, failed = self._read_fixed(store, [s for _, s in reads], fixed)
            batch.update(tensors)
            each = [reads[i] for i in sorted(failed)]
        missed = []
        for j, source in each:
            found = store.get(source)
            if found is None:
                missed.append((j, source))
                continue
            for name, t in found.items():
                put_row(batch, name, j, t, rows, padded=name in self.pad)
        return missed

    def fixed_layout(self, store: FeatureStore, sources: Sequence[str]) -> Layout | None:
        """The dtype and shape of each fixed-shape tensor of the entries, from the first valid
        entry's header (then remembered)."""
        if self.layout is None:
            layout = next((lay for lay in map(store.entry_layout, sources) if lay), None)
            if layout is not None:
                self.layout = {n: spec for n, spec in layout.items() if n not in self.pad}
        return self.layout

    def _read_fixed(self, store: FeatureStore, sources: Sequence[str], fixed: Layout
                    ) -> tuple[dict[str, torch.Tensor], set[int]]:
        """One ``read_batch`` per tensor into a batch tensor; returns them and the rows that
        could not be read (another shape, a legacy entry, a miss): those rows hold nothing."""
        tensors: dict[str, torch.Tensor] = {}
        failed: set[int] = set()
        for name, (dtype, shape) in fixed.items():
            tensors[name] = out = self.buffers.take(len(sources), dtype, shape)
            try:
                store.read_batch(sources, name, out)
            except BatchReadError as exc:
                failed.update(i for i, _, _ in exc.failed)
        return tensors, failed
