""":class:`CachedDataset`: a dataset's samples with their cached features, in the ``read``,
``lazy`` and ``off`` modes (see :mod:`featstore.training`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from featstore.errors import StaleEntryError
from featstore.manifest import recorded_shapes
from featstore.store import FeatureStore
from featstore.training.arguments import settle_modes, use_cache_default
from featstore.training.batching import HANDOFF, collate, put_row, settle_pad
from featstore.training.buffers import BatchBuffers
from featstore.training.history_reading import HistoryReader
from featstore.training.live import LiveEncoder, source_path
from featstore.training.live_history import HistoryComputer
from featstore.training.loader import CachedLoader, HandOnToFill
from featstore.training.names import Served, check_rename, gets_mask
from featstore.training.paths import PathReading
from featstore.training.reading import EntryReader, Source
from featstore.training.report import WarnOnce, log_start_line, nothing_cached, start_line


class CachedDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A dataset whose samples carry their cached features.

    Each returned sample is the base sample plus the entry's tensors under their names and
    ``cached``: True when the features came from the cache (False when computed live, or zeros
    with ``on_miss="skip"``: the entries' dtypes and shapes are learned from a valid entry when the
    dataset is built, so a batch's keys and shapes never depend on which rows hit).

    Parameters
    ----------
    base : dataset
        ``base[i]`` is a dict (anything else is wrapped as ``{"sample": x}``).
    store : FeatureStore
        Where the features are (None only with the cache off).
    path_fn : callable, optional
        ``path_fn(sample) -> str``: the sample's source: absolute, relative to the data root, or
        relative to the working directory when only that names a file inside the root (decided
        once, when the dataset is built; a path naming a file either way is an
        :class:`AmbiguousPathError`).
    paths : sequence of str, optional
        The sources in dataset order, instead of ``path_fn``; also lets the start log line count
        exactly what is cached.
    history_fn : callable, optional
        ``history_fn(sample) -> list of str``: the sample's history, its frames oldest first
        (instead of ``path_fn``). The sample's features are then its history entry
        (:meth:`FeatureStore.get_history`: the last frame's features given every frame before
        it), and misses are computed with the encoder's ``encode_history``, one causal pass per
        longest list; lazy mode writes the entry of every prefix that pass went through.
    encoder : encoder, nn.Module or zero-argument factory, optional
        Computes misses. A factory is called on the first miss only (in each process that meets
        one), so a fully cached run never loads the encoder.
    mode : {"read", "lazy", "off"}
        See :mod:`featstore.training`.
    use_cache : bool, optional
        False forces mode ``off``. Default: ``$FEATSTORE_USE_CACHE`` / ``$USE_VGGT_CACHE``, else true.
    on_miss : {"compute", "skip", "error"}, optional
        What a miss does in ``read`` and ``off`` mode (default: compute when there is an encoder,
        else skip).
    device : str
        Where the encoder runs.
    encode_in_workers : bool, optional
        Whether DataLoader workers compute misses themselves; otherwise they hand them on to the
        main process, which encodes each batch's misses in one call (:meth:`fill`). Default: on
        the CPU they do; a GPU encoder runs in the main process only.
    pad : "auto" or iterable of str
        Variable-length tensors that :meth:`collate` pads to the longest in the batch along their
        first axis, adding ``<name>_mask`` (bool, True where real). ``"auto"`` (default): those
        whose entries differ in that length, as precompute recorded in the manifest (VGGT features
        of images with other aspect ratios, prompt embeddings of other lengths).
    pin_memory : bool
        Read batches into pinned memory when loading in the main process.
    log_start : bool
        Log one line saying what is on (``feature cache enabled: feature vggt, ...``).
    cached_key : str
        The key saying whether a sample's features came from the cache. Datasets serving several
        features wrap each other (``CachedDataset(CachedDataset(base, latents, ...), prompts,
        ...)``): give each its own key (``"pixel_latent_cached"``) so none overwrites another's.
    rename : mapping of str to str, optional
        Serve the entries' tensors under other names (``{"features": "features_l11"}``; a padded
        tensor's mask follows: ``features_l11_mask``). Stacked features that store the same
        tensor name (VGGT layer 11 and layer 22, both ``features``) need it for one of them: a
        sample or batch never holds two tensors under one name, and a dataset whose names
        collide with those of the dataset it wraps (or of its base samples) is refused.

    Raises
    ------
    StaleEntryError
        ``on_miss="skip"`` and the feature has no valid entry to learn the shapes from.
    ValueError
        The manifest records entries that cannot be batched even padded (shapes that differ
        beyond their first axis, or in the first axis of a tensor ``pad`` leaves out); or its
        tensor names collide with those of the dataset it wraps (``rename`` is the fix; found
        when the dataset is built where the names are known, else at the first sample).
    """

    def __init__(self, base: Any, store: FeatureStore | None, *, path_fn: Callable[[Any], str] | None = None,
                 paths: Sequence[str] | None = None, history_fn: Callable[[Any], Sequence[str]] | None = None,
                 encoder: Any = None, mode: str = "read", use_cache: bool | None = None, on_miss: str | None = None,
                 device: str = "cpu", encode_in_workers: bool | None = None, pad: str | Iterable[str] = "auto",
                 pin_memory: bool = False, log_start: bool = True, cached_key: str = "cached",
                 rename: Mapping[str, str] | None = None) -> None:
        if use_cache is None:
            use_cache = use_cache_default()
        self.switched_off = not use_cache
        self.mode, self.on_miss = settle_modes(base, store, path_fn=path_fn, paths=paths, history_fn=history_fn,
                                               encoder=encoder, mode=mode, use_cache=use_cache, on_miss=on_miss)
        self.base = base
        self.data_root = store.data_root if store is not None else None
        # Off means off: not even a reference that could be used by accident.
        self.store = store if self.mode != "off" else None
        self.path_fn = path_fn
        self.paths = list(paths) if paths is not None else None
        self.history_fn = history_fn
        # Relative paths: to the data root, or to the working directory (see featstore.roots).
        self._reading = PathReading.settle(self.data_root, base, paths=paths, path_fn=path_fn, history_fn=history_fn)
        self.device = device
        self.encode_in_workers = (torch.device(device).type == "cpu") if encode_in_workers is None \
            else encode_in_workers
        self._live = LiveEncoder(encoder, device=device, data_root=self.data_root, total_images=len(base))
        # What the encoder computes is padded as what precompute summed up: asked of the encoder
        # only when there is one (a factory is then built, not loaded).
        self.pad = settle_pad(pad, self.store, self._live.varying_outputs if encoder is not None else tuple)
        self.rename = check_rename(rename)
        self.cached_key = cached_key
        # Where a sample hands its read on to fill(): one key per dataset of a stack.
        self.handoff_key = HANDOFF if cached_key == "cached" else f"{HANDOFF}:{cached_key}"
        self._names_key = f"{self.handoff_key}:names"  # collated as a per-sample list, as handoffs are
        self._buffers = BatchBuffers(pin_memory)
        self._reader = (HistoryReader if history_fn is not None else EntryReader)(self.pad, self._buffers)
        self._histories = HistoryComputer(self._live) if history_fn is not None else None
        self._warn_once = WarnOnce()
        # True in the workers of loader(), which calls fill() on every batch in the main
        # process: samples then hand their reads and GPU misses on to it.
        self._main_fills = False
        if self.store is not None and self.on_miss == "skip":
            # A skipped miss is served as zeros of the entries' shapes: learned now, not mid-epoch.
            self._reader.learn(self.store, self.paths)
        self._seen_hit = False  # read mode: a first batch with no hit is said loudly, once
        if isinstance(base, CachedDataset):
            self._check_names(base.served_names(), known_only=True)
        if log_start:
            log_start_line(self.describe)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if not self.encode_in_workers:
            state["_live"] = self._live.without_spec()  # workers hand misses on: they never need it
        return state

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._load([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A whole batch at once (the DataLoader calls this with a batch size): fixed-shape
        tensors are read into one batch tensor each, and samples hold its rows."""
        return self._load(list(indices))

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """:func:`collate` with this dataset's padded tensors (and those of the datasets it wraps)."""
        return collate(samples, pad=[ds.rename.get(name, name) for ds in self._stack() for name in ds.pad])

    def loader(self, *, prefetch: int = 2, **dataloader_args: Any) -> CachedLoader:
        """A ``DataLoader`` over this dataset (``dataloader_args`` are its own) whose batches get
        their features in the main process (:meth:`fill`): workers load the base samples and
        check the entries (two ``stat`` s each), then each batch's features are read with one
        parallel ``read_batch`` per tensor into a reused (or pinned) buffer, and GPU misses are
        encoded together. ``prefetch`` batches are filled ahead on a background thread (0: on
        the consumer's thread)."""
        dataloader_args.setdefault("collate_fn", self.collate)
        dataloader_args["worker_init_fn"] = HandOnToFill(dataloader_args.get("worker_init_fn"), CachedDataset)
        if dataloader_args.get("pin_memory"):
            for ds in self._stack():
                ds._buffers.pin_memory = True  # the features are read after the DataLoader pins the batch
        return CachedLoader(torch.utils.data.DataLoader(self, **dataloader_args), self, prefetch)

    def hand_on_to_fill(self) -> None:
        """From now on this copy's samples hand their reads and GPU misses on to :meth:`fill` in
        the main process (what :meth:`loader` makes its workers do), and so do those of the
        datasets it wraps."""
        for ds in self._stack():
            ds._main_fills = True

    def _stack(self) -> list[CachedDataset]:
        """This dataset and the CachedDatasets it wraps, outermost first."""
        stack, ds = [], self
        while isinstance(ds, CachedDataset):
            stack.append(ds)
            ds = ds.base
        return stack

    def describe(self) -> str:
        """The start log line: what is on, and how much is cached."""
        line = start_line(self.store, paths=self.paths, mode=self.mode, switched_off=self.switched_off,
                          on_miss=self.on_miss, histories=self.history_fn is not None)
        return f"{line}, padded {', '.join(self.pad)}" if self.pad and self.store is not None else line

    def _load(self, indices: list[int]) -> list[dict[str, Any]]:
        samples = []
        for i in indices:
            x = self.base[i]
            samples.append(dict(x) if isinstance(x, Mapping) else {"sample": x})
        sources = [self._source(i, s) for i, s in zip(indices, samples, strict=True)]
        # This dataset's tensors go into dicts of their own first: renamed, then checked against
        # what the samples hold (a wrapped dataset's features), never written over them.
        own: list[dict[str, Any]] = [{} for _ in samples]
        if self.store is None:
            misses = list(range(len(samples)))
        elif self._main_fills:  # fill() reads the hits, all of a batch at once
            misses = []
            for j, state in enumerate(self._reader.states(self.store, sources)):
                if state in ("valid", "legacy"):
                    own[j][self.handoff_key] = ("read", sources[j])
                else:
                    misses.append(j)
        else:
            misses = self._reader.into_samples(self.store, own, sources, zeros=self.on_miss == "skip")
        missed = set(misses)
        if self.store is not None and self.mode == "read" and not self._seen_hit:
            self._seen_hit = len(missed) < len(samples)
            if not self._seen_hit:
                self._warn_once("nothing-cached", nothing_cached(self.store, self._reader, sources, misses,
                                                                   self.on_miss))
        for j, sample in enumerate(own):
            sample[self.cached_key] = j not in missed
        if misses:
            self._miss(own, sources, misses)
        for sample, mine in zip(samples, own, strict=True):
            self._merge(sample, mine)
            if self._main_fills:  # fill() completes these names, and refuses any other it meets
                sample[self._names_key] = tuple(self._served_name(n) for n in mine
                                                if n not in (self.handoff_key, self.cached_key))
        return samples

    def _merge(self, into: dict[str, Any], mine: dict[str, Any]) -> None:
        """Adds this dataset's tensors (``mine``, under their entry names) to ``into`` (a sample,
        or a collated batch) under their served names; a name ``into`` already holds is an error,
        never a silent replacement."""
        if self.rename:
            mine = {self._served_name(name): value for name, value in mine.items()}
        clash = sorted(set(mine) & set(into))
        if clash:
            self._refuse_names(clash)
        into.update(mine)

    def _served_name(self, name: str) -> str:
        """The name under which this dataset serves its entries' tensor (or mask) ``name``."""
        if name in self.rename:
            return self.rename[name]
        stem = name[: -len("_mask")]
        return f"{self.rename[stem]}_mask" if name.endswith("_mask") and stem in self.rename else name

    def served_names(self) -> set[str]:
        """The keys this dataset and the datasets it wraps add to a sample, as far as they are
        known (the manifest's shape summary, or entries read so far)."""
        names: set[str] = set()
        for ds in self._stack():
            names |= ds._own_names() or set()
            names.add(ds.cached_key)
        return names

    def _own_names(self) -> set[str] | None:
        """The tensor names (renamed, masks included) this dataset adds, when known."""
        if self.store is None:
            return None
        shapes = recorded_shapes(self.store) or self._reader.shapes or self._reader.layout
        if not shapes:
            return None
        names = set()
        for name, spec in shapes.items():
            served = self.rename.get(name, name)
            names.add(served)
            if name in self.pad and gets_mask(name, spec[0]):
                names.add(f"{served}_mask")
        return names | {self.cached_key}

    def _check_names(self, others: set[str], *, known_only: bool) -> None:
        """Refuses tensor names that collide with ``others`` (the wrapped datasets' names)."""
        mine = self._own_names()
        if mine is None and known_only:
            return
        clash = sorted((mine or set()) & others)
        if clash:
            self._refuse_names(clash)

    def _refuse_names(self, clash: list[str]) -> None:
        feature = self.store.feature if self.store is not None else "(cache off)"
        wrapped = [ds.store.feature for ds in self._stack()[1:] if ds.store is not None]
        where = (f"the CachedDataset it wraps (feature {', '.join(wrapped)})" if wrapped
                 else "the base samples")
        if self.cached_key in clash:
            fix = f"give each dataset its own cached_key (cached_key='{feature}_cached')"
        else:
            fix = ("serve one feature's tensors under other names: CachedDataset(..., rename={"
                   + ", ".join(f"{n!r}: '{n}_{feature}'" for n in clash) + "})")
        raise ValueError(f"feature {feature} serves {', '.join(map(repr, clash))}, which {where} already holds: "
                         f"one would silently replace the other; {fix}")

    def _source(self, index: int, sample: dict[str, Any]) -> Source:
        """What names the sample's entry: its source, or with ``history_fn`` the tuple of its frames."""
        if self.history_fn is not None:
            return tuple(self._path(p) for p in self.history_fn(sample))
        return self._path(self.paths[index] if self.paths is not None else self.path_fn(sample))  # type: ignore[misc]

    def _path(self, path: str | os.PathLike[str]) -> str:
        path = self._reading(os.fspath(path))
        return self.store.rel(path) if self.store is not None else source_path(self.data_root, path)

    def _miss(self, samples: list[dict[str, Any]], sources: list[Source], rows: list[int]) -> None:
        if self.on_miss != "compute":
            self._unresolved([sources[j] for j in rows])
            return
        if not self.encode_in_workers and torch.utils.data.get_worker_info() is not None:
            # CUDA cannot run in a forked worker: the main process encodes these (fill).
            for j in rows:
                samples[j][self.handoff_key] = ("encode", sources[j])
            if not self._main_fills:
                self._warn_once("pending", "featstore: misses are encoded in the main process (a GPU encoder); "
                                "iterate over dataset.loader(...), or call dataset.fill(batch) on each batch")
            return
        for j, (tensors, cached) in zip(rows, self.compute([sources[j] for j in rows]), strict=True):
            samples[j].update(tensors)
            samples[j][self.cached_key] = cached

    def _unresolved(self, sources: Sequence[Source]) -> None:
        """Misses with ``on_miss`` skip (the samples get zeros) or error."""
        if self.on_miss == "error":
            assert self.store is not None
            first = sources[0]
            what = (f"the history of {len(first)} frames ending in {source_path(self.data_root, first[-1])}"
                    if isinstance(first, tuple) else source_path(self.data_root, first))
            raise StaleEntryError(f"{len(sources)} sample(s) have no valid {self.store.feature} entry, e.g. "
                                  f"{what} ({self._reader.states(self.store, [first])[0]}); "
                                  "run `featstore precompute`, or use mode='lazy' or on_miss='compute'")

    def fill(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Does, in this process, what samples handed on (:meth:`loader` calls it on every
        batch): reads the batch's entries, one ``read_batch`` per fixed-shape tensor into one
        buffer, and encodes its misses in one encoder call (a GPU encoder), writing them in lazy
        mode. ``batch`` is a collated batch, or one sample; one with nothing handed on is
        returned as is."""
        # The names this dataset's workers put in the samples (rows they computed): its own. Any
        # other name the batch holds, or that the wrapped datasets fill now, is not to be replaced.
        ours = batch.pop(self._names_key, None)
        ours = set(ours) if isinstance(ours, tuple) else set().union(*(n for n in ours or () if n))
        if isinstance(self.base, CachedDataset):  # the features of the datasets it wraps first
            batch = self.base.fill(batch)
        served = Served(self, batch, foreign=set(batch) - ours)
        handoff = batch.pop(self.handoff_key, None)
        if isinstance(handoff, tuple):  # one sample (a DataLoader without a batch size)
            self._fill_sample(batch, served, *handoff)
        elif handoff is not None:
            self._fill_batch(batch, served, handoff)
        if self.on_miss == "skip" and self._reader.shapes is not None:
            # Zeros for the tensors no row has, so that keys and shapes never depend on which rows hit.
            cached = batch.get(self.cached_key)
            zeros: dict[str, Any] = {}
            if isinstance(cached, torch.Tensor) and cached.dim() == 1:
                self._reader.zeros_into_batch(zeros, len(cached))
            elif isinstance(cached, bool):
                self._reader.zeros_into_sample(zeros)
            for name, t in zeros.items():
                if self._served_name(name) not in batch:  # only what no row has
                    served[name] = t
        return batch

    def _fill_batch(self, batch: dict[str, Any], served: Served, handoff: Any) -> None:
        """:meth:`fill` of a collated batch; tensors go into ``served`` (the batch, by served name)."""
        if not isinstance(handoff, list) or not all(h is None or isinstance(h, tuple) for h in handoff):
            raise TypeError(f"the batch's {self.handoff_key!r} is {type(handoff).__name__}, not the per-sample list "
                            "featstore.collate makes: a custom collate_fn must pass that key through (wrap "
                            "featstore.collate, or call it for the batch)")
        rows = len(handoff)
        reads = [(j, h[1]) for j, h in enumerate(handoff) if h is not None and h[0] == "read"]
        misses = [(j, h[1]) for j, h in enumerate(handoff) if h is not None and h[0] == "encode"]
        if reads:
            assert self.store is not None
            misses += self._reader.into_batch(self.store, served, reads, rows)
        if not misses:
            return
        for j, _ in misses:
            batch[self.cached_key][j] = False
        if self.on_miss != "compute":
            self._unresolved([source for _, source in misses])
            for j, _ in misses:  # rows a failed batch read left undefined
                for name in self._reader.layout or {}:
                    if isinstance(served.get(name), torch.Tensor):
                        served[name][j].zero_()
            return
        for (j, _), (tensors, cached) in zip(misses, self.compute([s for _, s in misses]), strict=True):
            for name, t in tensors.items():
                put_row(served, name, j, t, rows, padded=name in self.pad)
            batch[self.cached_key][j] = cached

    def _fill_sample(self, sample: dict[str, Any], served: Served, what: str, source: Source) -> None:
        """:meth:`fill` of one uncollated sample; tensors go into ``served``."""
        tensors = self._reader.get(self.store, source) if what == "read" and self.store is not None else None
        if tensors is None:
            sample[self.cached_key] = False
            if self.on_miss != "compute":
                self._unresolved([source])
                return
            tensors, sample[self.cached_key] = self.compute([source])[0]
        served.update(tensors)

    def compute(self, sources: Sequence[Source]) -> list[tuple[dict[str, torch.Tensor], bool]]:
        """The features of ``sources`` (store-relative or absolute paths; with ``history_fn``,
        tuples of frames) and whether each came from the cache after all. Lazy mode claims the
        entries first: a worker or rank that meets an entry another one is computing waits, then
        reads it; the rest are encoded in one batch and written atomically."""
        if self.mode != "lazy" and not sources:
            return []
        # Building the encoder may give the store the encoder's fingerprint: before any lookup.
        enc, self.store = self._live.encoder(self.store)
        if self._histories is not None:
            return self._histories.compute(enc, self.store, sources, lazy=self.mode == "lazy")
        if self.mode != "lazy":
            return [(t, False) for t in self._live.encode(enc, sources)]
        assert self.store is not None
        return self._live.compute_lazily(enc, self.store, sources)
