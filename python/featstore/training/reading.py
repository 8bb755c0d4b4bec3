"""Reading entries into samples and batches: each fixed-shape tensor of a whole batch with one
parallel :meth:`FeatureStore.read_batch` into one buffer, anything else entry by entry; and the
zeros that stand in for a miss, so that a batch's keys and shapes never depend on which rows hit."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from itertools import islice
from typing import Any

import torch

from featstore import _core
from featstore.compat import load_legacy_sidecar
from featstore.errors import BatchReadError, CorruptEntryError, StaleEntryError
from featstore.manifest import indexed_sources
from featstore.store import FeatureStore
from featstore.training.batching import mask_key, put_row
from featstore.training.buffers import BatchBuffers
from featstore.vocabulary import ENTRY_EXTENSION, LEGACY_SIDECAR_SUFFIX, sidecar_suffix

#: name -> (dtype, shape) of an entry's tensors.
Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]

#: What names a sample's entry: its source path (store-relative), or for history entries the
#: tuple of its frames (see :mod:`featstore.training.history_reading`).
Source = Any


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
        #: The fixed-shape tensors of the entries, learned from the first hit (or by :meth:`learn`).
        self.layout: Layout | None = None
        #: Every tensor of the entries, padded ones too: what a miss gets as zeros (:meth:`learn`).
        self.shapes: Layout | None = None

    def learn(self, store: FeatureStore, sources: Sequence[str | os.PathLike[str]] | None) -> None:
        """Learns the entries' tensors from some valid entry (see :func:`find_layout`), so that
        misses get zeros of the same dtype and shape.

        Raises
        ------
        StaleEntryError
            The feature has no valid entry at all.
        """
        shapes = find_layout(store, sources)
        if shapes is None:
            where = store.cache_dir or store.data_root
            raise StaleEntryError(
                f"no valid {store.feature} entry to learn shapes from: neither the dataset's sources, the "
                f"manifest's index nor the entry files under {where} hold one, and without an encoder a miss "
                "is served as zeros of the entries' shapes. Run `featstore precompute` for this feature first, "
                "or pass an encoder (encoder=...) to compute misses")
        self.shapes = shapes
        self.layout = {n: spec for n, spec in shapes.items() if n not in self.pad}

    def zeros_into_sample(self, sample: MutableMapping[str, Any]) -> None:
        """Adds zeros for each tensor a missed sample lacks (padded ones with length 0)."""
        for name, (dtype, shape) in (self.shapes or {}).items():
            if name not in sample:
                sample[name] = torch.zeros((0, *shape[1:]) if name in self.pad else shape, dtype=dtype)

    def zeros_into_batch(self, batch: MutableMapping[str, Any], rows: int) -> None:
        """Adds zeros for each tensor a collated batch of ``rows`` rows lacks (no row hit):
        ``[rows, *shape]``, padded ones ``[rows, 0, ...]`` with an all-False mask."""
        for name, (dtype, shape) in (self.shapes or {}).items():
            if name in batch:
                continue
            if name in self.pad:
                batch[name] = torch.zeros((rows, 0, *shape[1:]), dtype=dtype)
                if (named := mask_key(name, dtype)) is not None:
                    batch[named] = torch.zeros((rows, 0), dtype=torch.bool)
            else:
                batch[name] = self.buffers.take(rows, dtype, shape).zero_()

    def into_samples(self, store: FeatureStore, samples: list[dict[str, Any]], sources: list[Source], *,
                     zeros: bool = False) -> list[int]:
        """Adds the cached tensors to the samples (rows of one batch tensor per name, which
        :func:`collate` passes on); returns the rows that missed. With ``zeros`` a missed row
        gets zeros of every tensor instead (zeroed rows of the same batch tensors)."""
        each: Iterable[int] = range(len(samples))
        fixed = self.fixed_layout(store, sources) if len(samples) > 1 and not self.pad else None
        tensors: dict[str, torch.Tensor] = {}
        if fixed:
            tensors, failed = self._read_fixed(store, sources, fixed)
            for j, sample in enumerate(samples):
                if j not in failed:
                    sample.update({name: t[j] for name, t in tensors.items()})
            each = sorted(failed)
        misses = []
        for j in each:
            found = self.get(store, sources[j])
            if found is None:
                misses.append(j)
            else:
                samples[j].update(found)
        if zeros:
            for j in misses:
                samples[j].update({name: t[j].zero_() for name, t in tensors.items()})
                self.zeros_into_sample(samples[j])
        return misses

    def into_batch(self, store: FeatureStore, batch: MutableMapping[str, Any], reads: list[tuple[int, Source]],
                   rows: int) -> list[tuple[int, Source]]:
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
            found = self.get(store, source)
            if found is None:
                missed.append((j, source))
                continue
            for name, t in found.items():
                put_row(batch, name, j, t, rows, padded=name in self.pad)
        return missed

    def get(self, store: FeatureStore, source: Source) -> dict[str, torch.Tensor] | None:
        """One sample's entry, or None on a miss."""
        return store.get(source)

    def states(self, store: FeatureStore, sources: Sequence[Source]) -> list[str]:
        """The state of each sample's entry (two ``stat`` s each, nothing opened)."""
        return store.states(sources, threads=1)

    def fixed_layout(self, store: FeatureStore, sources: Sequence[Source]) -> Layout | None:
        """The dtype and shape of each fixed-shape tensor of the entries, from the first valid
        entry's header (then remembered)."""
        if self.layout is None:
            layout = next((lay for lay in map(store.entry_layout, sources) if lay), None)
            if layout is not None:
                self.layout = {n: spec for n, spec in layout.items() if n not in self.pad}
        return self.layout

    def _read_fixed(self, store: FeatureStore, sources: Sequence[Source], fixed: Layout
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


#: Sources checked at once while looking for an entry to learn the layout from.
_CHUNK = 4096


def find_layout(store: FeatureStore, sources: Sequence[str | os.PathLike[str]] | None) -> Layout | None:
    """The dtype and shape of every tensor of one valid (or served legacy) entry of the feature:
    the first among ``sources``, else among the manifest's index, else among the entry files on
    disk. None when there is none at all."""
    places: list[Callable[[], Iterable[str | os.PathLike[str]]]] = [
        lambda: sources or (), lambda: indexed_sources(store), lambda: _entry_sources(store)]
    for place in places:
        layout = _first_layout(store, place())
        if layout is not None:
            return layout
    return None


def _first_layout(store: FeatureStore, candidates: Iterable[str | os.PathLike[str]]) -> Layout | None:
    """The layout of the first candidate whose entry is served, checking a chunk at a time."""
    it = iter(candidates)
    while chunk := list(islice(it, _CHUNK)):
        rels = []
        for p in chunk:
            try:
                rels.append(store.rel(p))
            except ValueError:  # outside the root: it has no entry here
                continue
        for rel, state in zip(rels, store.states(rels), strict=True):
            layout = None
            if state == "valid":
                layout = store.entry_layout(rel)
            elif state == "legacy" and store.allow_legacy:
                try:
                    legacy = load_legacy_sidecar(os.path.join(store.data_root, rel) + LEGACY_SIDECAR_SUFFIX)
                    layout = {n: (t.dtype, tuple(t.shape)) for n, t in legacy.items()}
                except (CorruptEntryError, OSError):
                    layout = None
            if layout:
                return layout
    return None


def _entry_sources(store: FeatureStore) -> Iterator[str]:
    """The sources of the feature's entry files on disk: sidecars (and legacy sidecars) under the
    root, or the sources the dir layout's entries name in their headers."""
    if store.layout == "sidecar":
        suffix = sidecar_suffix(store.feature)
        yield from (rel[: -len(suffix)] for rel in store.entry_files())
        if store.allow_legacy and store.feature == "vggt":  # only vggt had the old per-image pickles
            paths, *_ = _core.scan(store.data_root, extensions=["pt"])
            legacy = LEGACY_SIDECAR_SUFFIX
            yield from (os.fspath(p)[: -len(legacy)] for p in paths if os.fspath(p).endswith(legacy))
        return
    assert store.cache_dir is not None
    for directory, _, files in os.walk(os.path.join(store.cache_dir, store.feature)):
        for name in sorted(files):
            if not name.endswith(f".{ENTRY_EXTENSION}") or name.startswith("."):
                continue
            try:
                meta, _, _ = _core.read_header(os.path.join(directory, name))
            except (CorruptEntryError, OSError):
                continue
            if meta.get("source"):
                yield meta["source"]
