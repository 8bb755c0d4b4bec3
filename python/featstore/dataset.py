"""The training side: :class:`CachedDataset` adds cached features to a dataset's samples.

Modes
-----
``read``
    Serve valid entries. A miss (missing, stale, corrupt, another encoder's) is computed live
    with the encoder and not written (``on_miss="compute"``), or the sample comes without
    features (``"skip"``), or it is an error (``"error"``).
``lazy``
    A miss is computed once and written atomically: the first epoch computes, later epochs read.
``off``
    The store is never touched (``use_cache=False``, ``USE_VGGT_CACHE=false`` or
    ``FEATSTORE_USE_CACHE=0``): features are computed live, or left out without an encoder.

Where misses are computed: a CPU encoder runs where the sample is loaded (a DataLoader worker).
An encoder on a GPU runs in the main process only, because CUDA cannot be used in a forked
worker: workers hand the miss on, and :meth:`CachedDataset.fill` (which
:meth:`CachedDataset.loader` calls on every batch) encodes a batch's misses together.

Fast batches: with a batch size, the DataLoader hands a batch's indices to ``__getitems__``,
which reads each fixed-shape tensor of all the batch's entries into one tensor with
:meth:`FeatureStore.read_batch` (parallel ``pread`` without the GIL, into shared memory in a
worker, so the batch crosses to the main process without another copy), and :func:`collate`
passes that tensor on instead of stacking per-sample copies.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import sys
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from featstore import env
from featstore.errors import BatchReadError, FeatstoreError, StaleEntryError
from featstore.store import FeatureStore

MODES = ("read", "lazy", "off")
ON_MISS = ("compute", "skip", "error")
#: Environment switches of the cache, first set wins (``USE_VGGT_CACHE`` is the old scripts' name).
USE_CACHE_VARIABLES = env.USE_CACHE_VARIABLES
#: The key under which a sample hands work on to :meth:`CachedDataset.fill` in the main process:
#: ``("read", source)`` (read there, into one reused batch buffer) or ``("encode", source)``.
HANDOFF = "_featstore_handoff"
#: Batch buffers kept per shape for reuse in the main process (a fresh buffer costs a page fault
#: and a zeroed page per 4 KiB, as much as the copy itself).
POOLED_BUFFERS = 8

log = logging.getLogger("featstore")


def use_cache_default(default: bool = True) -> bool:
    """Whether the cache is on, from ``FEATSTORE_USE_CACHE`` or ``USE_VGGT_CACHE`` (unset: ``default``)."""
    return env.use_cache(default)


@dataclass
class CacheArguments:
    """Training arguments of the feature cache, for ``HfArgumentParser``-style dataclasses (inherit
    from it, or use it beside your own)."""

    use_cache: bool = field(default_factory=use_cache_default, metadata={
        "help": "Read precomputed features (default: $FEATSTORE_USE_CACHE or $USE_VGGT_CACHE, else true). "
                "false bypasses the cache: features are computed live."})
    cache_mode: str = field(default="read", metadata={
        "help": "read: serve cached features, compute misses live; lazy: compute a miss once and store it; "
                "off: never touch the cache."})
    cache_dir: str | None = field(default_factory=env.vggt_cache_dir, metadata={
        "help": "Keep entries in this directory (dir layout) instead of beside the images (default: "
                "$VGGT_CACHE_DIR)."})


class CachedDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A dataset whose samples carry their cached features.

    Parameters
    ----------
    base : dataset
        ``base[i]`` is a dict (anything else is wrapped as ``{"sample": x}``).
    store : FeatureStore
        Where the features are (None only with the cache off).
    path_fn : callable, optional
        ``path_fn(sample) -> str``: the sample's source (absolute, or relative to the data root).
    paths : sequence of str, optional
        The sources in dataset order, instead of ``path_fn``; also lets the start log line count
        exactly what is cached.
    encoder : encoder, nn.Module or zero-argument factory, optional
        Computes misses. A factory is called on the first miss only (in each process that meets
        one), so a fully cached run never loads the encoder.
    mode : {"read", "lazy", "off"}
        See the module documentation.
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
    pad : iterable of str
        Variable-length tensors (e.g. ``prompt_embed``) that :meth:`collate` pads to the longest
        in the batch along their first axis, adding ``<name>_mask``.
    pin_memory : bool
        Read batches into pinned memory when loading in the main process.
    log_start : bool
        Log one line saying what is on (``feature cache enabled: feature vggt, ...``).

    Each returned sample is the base sample plus the entry's tensors under their names and
    ``cached``: True when the features came from the cache (False when computed live, or absent
    with ``on_miss="skip"``).
    """

    def __init__(self, base: Any, store: FeatureStore | None, *, path_fn: Callable[[Any], str] | None = None,
                 paths: Sequence[str] | None = None, encoder: Any = None, mode: str = "read",
                 use_cache: bool | None = None, on_miss: str | None = None, device: str = "cpu",
                 encode_in_workers: bool | None = None, pad: Iterable[str] = (), pin_memory: bool = False,
                 log_start: bool = True) -> None:
        if use_cache is None:
            use_cache = use_cache_default()
        self.switched_off = not use_cache
        if self.switched_off:
            mode = "off"
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if on_miss is None:
            on_miss = "compute" if encoder is not None else "skip"
        if on_miss not in ON_MISS:
            raise ValueError(f"on_miss {on_miss!r} is not one of {ON_MISS}")
        if mode == "off" and on_miss == "error":
            on_miss = "compute" if encoder is not None else "skip"  # off never looks, so nothing misses
        if encoder is None and (mode == "lazy" or on_miss == "compute"):
            raise ValueError(f"mode {mode!r} with on_miss {on_miss!r} computes misses: pass encoder= (an encoder, "
                             "an nn.Module, or a zero-argument factory of one)")
        if path_fn is None and paths is None:
            raise ValueError("name each sample's source: pass path_fn=(sample -> path) or paths=[...]")
        if paths is not None and len(paths) != len(base):
            raise ValueError(f"paths has {len(paths)} sources but the dataset has {len(base)} samples")
        if store is None and mode != "off":
            raise ValueError(f"mode {mode!r} needs a FeatureStore (store=None only with the cache off)")
        self.base = base
        self.mode = mode
        self.on_miss = on_miss if mode != "lazy" else "compute"
        self.data_root = store.data_root if store is not None else None
        # Off means off: not even a reference that could be used by accident.
        self.store = store if mode != "off" else None
        self.path_fn = path_fn
        self.paths = list(paths) if paths is not None else None
        self.encoder_spec = encoder
        self.device = device
        self.encode_in_workers = (torch.device(device).type == "cpu") if encode_in_workers is None \
            else encode_in_workers
        self.pad = tuple(pad)
        self.pin_memory = pin_memory
        self._encoder: Any = None  # built on the first miss, in each process
        # name -> (dtype, shape) of the fixed-shape tensors, learned from the first hit.
        self._layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None = None
        self._warned: set[str] = set()
        # True in the workers of loader(), which calls fill() on every batch in the main
        # process: samples then hand their reads and GPU misses on to it.
        self._main_fills = False
        self._manifest_checked = False
        self._pool: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        if log_start:
            self._log_start()

    # Workers under spawn get the dataset pickled: never ship a loaded encoder, only its factory.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_encoder"] = None
        state["_pool"] = {}
        if not self.encode_in_workers:
            state["encoder_spec"] = None  # workers hand misses on: they never need it
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
        """:func:`collate` with this dataset's padded tensors."""
        return collate(samples, pad=self.pad)

    def loader(self, *, prefetch: int = 2, **dataloader_args: Any) -> CachedLoader:
        """A ``DataLoader`` over this dataset (``dataloader_args`` are its own) whose batches get
        their features in the main process (:meth:`fill`): workers load the base samples and
        check the entries (two ``stat`` s each), then each batch's features are read with one
        parallel ``read_batch`` per tensor into a reused (or pinned) buffer, and GPU misses are
        encoded together. ``prefetch`` batches are filled ahead on a background thread (0: on
        the consumer's thread)."""
        dataloader_args.setdefault("collate_fn", self.collate)
        dataloader_args["worker_init_fn"] = _HandOnToFill(dataloader_args.get("worker_init_fn"))
        if dataloader_args.get("pin_memory"):
            self.pin_memory = True  # the features are read after the DataLoader pins the batch
        return CachedLoader(torch.utils.data.DataLoader(self, **dataloader_args), self, prefetch)

    # ----------------------------------------------------------------------------- loading
    def _load(self, indices: list[int]) -> list[dict[str, Any]]:
        samples = []
        for i in indices:
            x = self.base[i]
            samples.append(dict(x) if isinstance(x, Mapping) else {"sample": x})
        sources = [self._source(i, s) for i, s in zip(indices, samples, strict=True)]
        if self.store is None:
            misses = list(range(len(samples)))
        elif self._main_fills:  # fill() reads the hits, all of a batch at once
            misses = []
            for j, state in enumerate(self.store.states(sources, threads=1)):
                if state in ("valid", "legacy"):
                    samples[j][HANDOFF] = ("read", sources[j])
                else:
                    misses.append(j)
        else:
            misses = self._read(samples, sources)
        missed = set(misses)
        for j, sample in enumerate(samples):
            sample["cached"] = j not in missed
        if misses:
            self._miss(samples, sources, misses)
        return samples

    def _source(self, index: int, sample: dict[str, Any]) -> str:
        path = self.paths[index] if self.paths is not None else self.path_fn(sample)  # type: ignore[misc]
        path = os.fspath(path)
        return self.store.rel(path) if self.store is not None else self._abs(path)

    def _abs(self, source: str) -> str:
        return source if os.path.isabs(source) or self.data_root is None else os.path.join(self.data_root, source)

    def _read(self, samples: list[dict[str, Any]], sources: list[str]) -> list[int]:
        """Adds the cached tensors to the samples (rows of one batch tensor per name, which
        :func:`collate` passes on); returns the rows that missed."""
        assert self.store is not None
        each: Iterable[int] = range(len(samples))
        fixed = self._fixed_layout(sources) if len(samples) > 1 and not self.pad else None
        if fixed:
            tensors, failed = self._read_fixed(sources, fixed)
            for j, sample in enumerate(samples):
                if j not in failed:
                    sample.update({name: t[j] for name, t in tensors.items()})
            each = sorted(failed)
        misses = []
        for j in each:
            found = self.store.get(sources[j])
            if found is None:
                misses.append(j)
            else:
                samples[j].update(found)
        return misses

    def _fixed_layout(self, sources: Sequence[str]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]] | None:
        """The dtype and shape of each fixed-shape tensor of the entries, from the first valid
        entry's header (then remembered)."""
        if self._layout is None:
            assert self.store is not None
            layout = next((lay for lay in map(self.store.entry_layout, sources) if lay), None)
            if layout is not None:
                self._layout = {n: spec for n, spec in layout.items() if n not in self.pad}
        return self._layout

    def _read_fixed(self, sources: Sequence[str], fixed: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]
                    ) -> tuple[dict[str, torch.Tensor], set[int]]:
        """One ``read_batch`` per tensor into a batch tensor; returns them and the rows that
        could not be read (another shape, a legacy entry, a miss): those rows hold nothing."""
        assert self.store is not None
        tensors: dict[str, torch.Tensor] = {}
        failed: set[int] = set()
        for name, (dtype, shape) in fixed.items():
            tensors[name] = out = self._batch_tensor(len(sources), dtype, shape)
            try:
                self.store.read_batch(sources, name, out)
            except BatchReadError as exc:
                failed.update(i for i, _, _ in exc.failed)
        return tensors, failed

    def _batch_tensor(self, rows: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialized ``[rows, *shape]`` tensor to read a batch into. In a DataLoader worker
        it is in shared memory (the batch then reaches the main process without another copy).
        In the main process it is pinned on request (torch's caching host allocator reuses
        pinned blocks once their copies to the GPU are done), else a pooled buffer that nothing
        else references any more."""
        if torch.utils.data.get_worker_info() is not None:
            nbytes = rows * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            return _tensor_on(torch.UntypedStorage._new_shared(nbytes), dtype, (rows, *shape))
        if self.pin_memory and torch.cuda.is_available():
            return torch.empty((rows, *shape), dtype=dtype, pin_memory=True)
        pool = self._pool.setdefault((dtype, rows, shape), [])
        for buf in pool:
            if _unreferenced(buf):
                return buf.view(buf.shape)  # a new view: while it lives, the buffer counts as used
        buf = torch.empty((rows, *shape), dtype=dtype)
        if len(pool) < POOLED_BUFFERS and _unreferenced(buf):
            pool.append(buf)
            return buf.view(buf.shape)
        return buf

    # ----------------------------------------------------------------------------- misses
    def _miss(self, samples: list[dict[str, Any]], sources: list[str], rows: list[int]) -> None:
        if self.on_miss != "compute":
            self._unresolved([sources[j] for j in rows])
            return
        if not self.encode_in_workers and torch.utils.data.get_worker_info() is not None:
            # CUDA cannot run in a forked worker: the main process encodes these (fill).
            for j in rows:
                samples[j][HANDOFF] = ("encode", sources[j])
            if not self._main_fills:
                self._warn_once("pending", "featstore: misses are encoded in the main process (a GPU encoder); "
                                "iterate over dataset.loader(...), or call dataset.fill(batch) on each batch")
            return
        for j, (tensors, cached) in zip(rows, self.compute([sources[j] for j in rows]), strict=True):
            samples[j].update(tensors)
            samples[j]["cached"] = cached

    def _unresolved(self, sources: Sequence[str]) -> None:
        """Misses with ``on_miss`` skip (the samples stay without features) or error."""
        if self.on_miss == "error":
            assert self.store is not None
            raise StaleEntryError(f"{len(sources)} sample(s) have no valid {self.store.feature} entry, e.g. "
                                  f"{self._abs(sources[0])} ({self.store.state(sources[0])}); run `featstore "
                                  "precompute`, or use mode='lazy' or on_miss='compute'")

    def fill(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Does, in this process, what samples handed on (:meth:`loader` calls it on every
        batch): reads the batch's entries, one ``read_batch`` per fixed-shape tensor into one
        buffer, and encodes its misses in one encoder call (a GPU encoder), writing them in lazy
        mode. ``batch`` is a collated batch, or one sample; one with nothing handed on is
        returned as is."""
        handoff = batch.pop(HANDOFF, None)
        if handoff is None:
            return batch
        if isinstance(handoff, tuple):  # one sample (a DataLoader without a batch size)
            what, source = handoff
            tensors = self.store.get(source) if what == "read" and self.store is not None else None
            if tensors is None:
                batch["cached"] = False
                if self.on_miss != "compute":
                    self._unresolved([source])
                    return batch
                tensors, batch["cached"] = self.compute([source])[0]
            batch.update(tensors)
            return batch
        if not isinstance(handoff, list) or not all(h is None or isinstance(h, tuple) for h in handoff):
            raise TypeError(f"the batch's {HANDOFF!r} is {type(handoff).__name__}, not the per-sample list "
                            "featstore.collate makes: a custom collate_fn must pass that key through (wrap "
                            "featstore.collate, or call it for the batch)")
        rows = len(handoff)
        reads = [(j, h[1]) for j, h in enumerate(handoff) if h is not None and h[0] == "read"]
        misses = [(j, h[1]) for j, h in enumerate(handoff) if h is not None and h[0] == "encode"]
        if reads:
            misses += self._read_rows(batch, reads, rows)
        if not misses:
            return batch
        for j, _ in misses:
            batch["cached"][j] = False
        if self.on_miss != "compute":
            self._unresolved([source for _, source in misses])
            for j, _ in misses:  # rows a failed batch read left undefined
                for name in self._layout or {}:
                    if isinstance(batch.get(name), torch.Tensor):
                        batch[name][j].zero_()
            return batch
        for (j, _), (tensors, cached) in zip(misses, self.compute([s for _, s in misses]), strict=True):
            for name, t in tensors.items():
                _put_row(batch, name, j, t, rows, padded=name in self.pad)
            batch["cached"][j] = cached
        return batch

    def _read_rows(self, batch: dict[str, Any], reads: list[tuple[int, str]], rows: int) -> list[tuple[int, str]]:
        """Reads the entries of ``reads`` (row, source) into ``batch``; returns those that missed."""
        assert self.store is not None
        each = reads
        fixed = self._fixed_layout([s for _, s in reads])
        if fixed and len(reads) == rows and not self.pad and not any(name in batch for name in fixed):
            tensors, failed = self._read_fixed([s for _, s in reads], fixed)
            batch.update(tensors)
            each = [reads[i] for i in sorted(failed)]
        missed = []
        for j, source in each:
            found = self.store.get(source)
            if found is None:
                missed.append((j, source))
                continue
            for name, t in found.items():
                _put_row(batch, name, j, t, rows, padded=name in self.pad)
        return missed

    def compute(self, sources: Sequence[str]) -> list[tuple[dict[str, torch.Tensor], bool]]:
        """The features of ``sources`` (store-relative or absolute paths) and whether each came
        from the cache after all. Lazy mode claims the entries first: a worker or rank that meets
        an entry another one is computing waits, then reads it; the rest are encoded in one
        batch and written atomically."""
        from featstore.lock import entry_claims

        if self.mode != "lazy":
            return [(t, False) for t in self._encode(sources)]
        assert self.store is not None
        self._encoder_instance()  # adopts the encoder's fingerprint before any lookup below
        results: dict[str, tuple[dict[str, torch.Tensor], bool]] = {}
        # First the entries nobody else is computing, then (waiting) those somebody is.
        for wait in (False, True):
            rest = [s for s in dict.fromkeys(sources) if s not in results]
            if not rest:
                break
            with entry_claims(self.store, rest, wait=wait) as claimed:
                mine = [s for s in rest if s in claimed]
                found = {s: self.store.get(s) for s in mine}
                todo = [s for s in mine if found[s] is None]
                results.update(zip(todo, ((t, False) for t in self._encode(todo, write=True)), strict=True))
                results.update((s, (t, True)) for s, t in found.items() if t is not None)
        return [results[s] for s in sources]

    def _encode(self, sources: Sequence[str], write: bool = False) -> list[dict[str, torch.Tensor]]:
        """Encodes sources in batches of equal input shape; with ``write``, stores each entry."""
        from featstore.encoding import decode_source, encode_batch

        if not sources:
            return []
        enc = self._encoder_instance()
        decoded = []
        for source in sources:
            item, error, stamp = decode_source(enc, self._abs(source))
            if error is not None:
                raise FeatstoreError(f"cannot compute {getattr(enc, 'name', 'the')} features of "
                                     f"{self._abs(source)}: {error}")
            decoded.append((item, stamp))
        items_mode = hasattr(enc, "encode_items")
        groups: dict[Any, list[int]] = defaultdict(list)
        for k, (item, _) in enumerate(decoded):
            groups[() if items_mode else tuple(item.shape)].append(k)
        results: list[dict[str, torch.Tensor]] = [{} for _ in sources]
        for ks in groups.values():
            batch = [decoded[k][0] for k in ks] if items_mode else torch.stack([decoded[k][0] for k in ks])
            outputs = encode_batch(enc, torch.device(self.device), batch)
            for row, k in enumerate(ks):
                # A clone outside inference mode: autograd may save these for backward.
                results[k] = {name: t[row].clone() for name, t in outputs.items()}
        if write:
            for source, (_, stamp), tensors in zip(sources, decoded, results, strict=True):
                self._write(enc, source, tensors, stamp)
        return results

    def _write(self, enc: Any, source: str, tensors: dict[str, torch.Tensor], stamp: Any) -> None:
        """Stores a lazily computed entry; a failed write is warned about once (training goes on
        with the computed features, the next epoch computes them again)."""
        assert self.store is not None
        try:
            inputs = enc.inputs(source, self._abs(source)) if hasattr(enc, "inputs") else None
            self.store.write(source, tensors, inputs=inputs, expected=stamp)
            if not self._manifest_checked:
                self._manifest_checked = True
                self._ensure_manifest()
        except (OSError, FeatstoreError) as exc:
            self._warn_once(f"write:{type(exc).__name__}",
                            f"featstore: could not store the lazily computed entry of {self._abs(source)}: {exc}. "
                            "Training goes on with the computed features; further such failures are not reported")

    def _ensure_manifest(self) -> None:
        """Gives a feature cached only lazily a manifest recording the encoder's fingerprint, so
        that a later run with another encoder configuration is told, instead of being served
        these entries by a store that checks no fingerprint."""
        import json

        from featstore import _core

        assert self.store is not None
        if _core.read_manifest(self.store.manifest_path) is None:
            os.makedirs(os.path.dirname(self.store.manifest_path), exist_ok=True)
            fields = self.store.manifest_fields(total_images=len(self))
            _core.write_manifest(self.store.manifest_path, json.dumps(fields))

    def _encoder_instance(self) -> Any:
        """The encoder, built on first use in this process; checks that it writes what the store
        expects."""
        if self._encoder is not None:
            return self._encoder
        from featstore.encoders import resolve_encoder

        enc = resolve_encoder(self.encoder_spec)
        if hasattr(enc, "to"):
            enc.to(self.device)
        if self.store is not None:
            fingerprint = enc.fingerprint()
            if self.store.fingerprint is None:
                # Entries written now must carry the encoder's fingerprint, and the lookups
                # check it from here on.
                self.store = self.store.with_fingerprint(fingerprint)
            elif self.store.fingerprint != fingerprint:
                raise FeatstoreError(
                    f"the encoder's fingerprint {fingerprint} differs from the one entries of feature "
                    f"{self.store.feature} are checked against ({self.store.fingerprint}, from "
                    f"{self.store.manifest_path} or as given): its features would not match the cached ones. "
                    "Use the encoder the cache was computed with, or open the store with "
                    "fingerprint=encoder.fingerprint() (then the old entries are recomputed)")
        self._encoder = enc
        return enc

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, stacklevel=3)

    # ----------------------------------------------------------------------------- the start line
    def describe(self) -> str:
        """The start log line: what is on, and how much is cached."""
        if self.store is None:
            why = "use_cache=False" if self.switched_off else "mode off"
            then = "features are computed live" if self.on_miss == "compute" else "samples come without features"
            return f"feature cache disabled ({why}): {then}"
        s = self.store
        if self.paths is not None:
            valid = s.states(self.paths).count("valid")
            cached = f"{valid:,} of {len(self.paths):,} cached"
        else:
            cached = _cached_from_manifest(s)
        where = f", cache_dir {s.cache_dir}" if s.cache_dir else ""
        return f"feature cache enabled: feature {s.feature}, layout {s.layout}{where}, {cached}, mode {self.mode}"

    def _log_start(self) -> None:
        if env.distributed_rank()[0] != 0:
            return  # one line per job, not per rank
        line = self.describe()
        if log.hasHandlers() and log.isEnabledFor(logging.INFO):
            log.info(line)
        else:  # logging is not configured: the line should still be seen
            print(f"[featstore] {line}", file=sys.stderr)


def _cached_from_manifest(store: FeatureStore) -> str:
    import json

    from featstore import _core

    text = _core.read_manifest(store.manifest_path)
    if text is None:
        return "cached count unknown (no manifest yet; pass paths= to count)"
    fields = json.loads(text)
    return f"{fields.get('processed_images', 0):,} of {fields.get('total_images', 0):,} cached (manifest)"


class CachedLoader:
    """Iterates a DataLoader over a :class:`CachedDataset`, filling each batch
    (:meth:`CachedDataset.fill`) ``prefetch`` batches ahead on a background thread: the reads
    release the GIL, so they overlap the training step. Anything else (``sampler``,
    ``batch_size``, ``len``) is the DataLoader's."""

    def __init__(self, loader: torch.utils.data.DataLoader, dataset: CachedDataset,  # type: ignore[type-arg]
                 prefetch: int = 2) -> None:
        self.loader = loader
        self.dataset = dataset
        self.prefetch = prefetch

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        if self.prefetch <= 0:
            for batch in batches:
                yield self._fill(batch)
            return
        filled: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        # The current CUDA device is per thread: a DDP rank's set_device must hold here too.
        device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

        def work() -> None:
            if device is not None:
                torch.cuda.set_device(device)
            try:
                for batch in batches:
                    item = ("batch", self._fill(batch))
                    while not stop.is_set():
                        try:
                            filled.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                filled.put(("end", None))
            except BaseException as exc:  # handed to the consumer, raised there
                filled.put(("error", exc))

        thread = threading.Thread(target=work, name="featstore-fill", daemon=True)
        thread.start()
        try:
            while True:
                kind, item = filled.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                yield item
        finally:  # the consumer stopped early (break, an exception): let the thread end
            stop.set()
            while thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    filled.get(timeout=0.1)

    def _fill(self, batch: Any) -> Any:
        if isinstance(batch, dict):
            return self.dataset.fill(batch)
        if self.loader.num_workers > 0:  # its workers handed reads on, which such a batch drops
            raise TypeError(f"the DataLoader's collate_fn made a {type(batch).__name__}: CachedDataset.loader() "
                            "needs featstore.collate's dict (wrap it, or use a plain DataLoader)")
        return batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _HandOnToFill:
    """``worker_init_fn`` of :meth:`CachedDataset.loader`: that worker's samples hand reads and
    GPU misses on to :meth:`CachedDataset.fill` (the dataset elsewhere, ``ds[i]`` or another
    DataLoader, is unchanged). Calls the user's own ``worker_init_fn`` too."""

    def __init__(self, user_init: Callable[[int], None] | None) -> None:
        self.user_init = user_init

    def __call__(self, worker_id: int) -> None:
        info = torch.utils.data.get_worker_info()
        if info is not None and isinstance(info.dataset, CachedDataset):
            info.dataset._main_fills = True
        if self.user_init is not None:
            self.user_init(worker_id)


# ----------------------------------------------------------------------------------- collate
_ABSENT = object()


def collate(samples: list[dict[str, Any]], *, pad: Iterable[str] = ()) -> dict[str, Any]:
    """Collates :class:`CachedDataset` samples; batches may mix cached and uncached samples.

    - Rows of one batch tensor (``__getitems__`` read the batch into it) are passed on as that
      tensor: no copy.
    - Other tensors are stacked; rows of samples without them (``on_miss="skip"``) are zeros,
      and ``cached`` (a bool tensor) says which rows hold features.
    - Tensors named in ``pad`` are padded with zeros to the longest in the batch along their first
      axis, with ``<name>_mask`` (bool ``[B, L]``, True where real).
    - Anything else goes through torch's ``default_collate``.
    """
    pad = set(pad)
    keys: dict[str, None] = {}
    for s in samples:
        keys.update(dict.fromkeys(s))
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s.get(key, _ABSENT) for s in samples]
        if key == HANDOFF:
            batch[key] = [None if v is _ABSENT else v for v in values]
        elif key in pad:
            batch[key], batch[f"{key}_mask"] = _pad_stack(key, values)
        elif all(v is not _ABSENT for v in values):
            joined = _rows_of_one_tensor(values)
            if joined is None and all(isinstance(v, torch.Tensor) for v in values):
                _one_shape(key, values)
            batch[key] = joined if joined is not None else torch.utils.data.default_collate(values)
        elif all(v is _ABSENT or isinstance(v, torch.Tensor) for v in values):
            batch[key] = _stack_with_zeros(key, values)
        else:
            batch[key] = [None if v is _ABSENT else v for v in values]
    return batch


def _rows_of_one_tensor(values: list[Any]) -> torch.Tensor | None:
    """The batch tensor when ``values`` are its rows 0..B-1 in order (and fill all of it)."""
    first = values[0]
    if not isinstance(first, torch.Tensor) or not first.is_contiguous():
        return None
    storage = first.untyped_storage()
    n = first.numel()
    if storage.nbytes() != len(values) * n * first.element_size():
        return None
    for j, v in enumerate(values):
        if (not isinstance(v, torch.Tensor) or v.dtype != first.dtype or v.shape != first.shape
                or v.untyped_storage().data_ptr() != storage.data_ptr() or v.storage_offset() != j * n
                or not v.is_contiguous()):
            return None
    return _tensor_on(storage, first.dtype, (len(values), *first.shape))


def _tensor_on(storage: torch.UntypedStorage, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous tensor of ``shape`` over all of ``storage`` (no copy)."""
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return torch.empty((0,), dtype=dtype, device=storage.device).set_(storage, 0, shape, strides)


def _one_shape(key: str, tensors: list[Any]) -> None:
    shapes = {tuple(v.shape) for v in tensors}
    if len(shapes) != 1:
        raise ValueError(f"collate: tensor {key!r} has shapes {sorted(shapes)} in one batch; name it in pad= "
                         "(CachedDataset(..., pad=[...])) to pad it with a mask")


def _stack_with_zeros(key: str, values: list[Any]) -> torch.Tensor:
    present = [v for v in values if v is not _ABSENT]
    _one_shape(key, present)
    out = present[0].new_zeros((len(values), *present[0].shape))
    for j, v in enumerate(values):
        if v is not _ABSENT:
            out[j] = v
    return out


def _pad_stack(key: str, values: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    present = [v for v in values if v is not _ABSENT]
    if not present:
        raise ValueError(f"collate: no sample in the batch has {key!r}")
    tails = {tuple(v.shape[1:]) for v in present}
    if len(tails) != 1 or present[0].dim() == 0:
        raise ValueError(f"collate: {key!r} can be padded only along its first axis; shapes "
                         f"{sorted(tuple(v.shape) for v in present)}")
    length = max(v.shape[0] for v in present)
    out = present[0].new_zeros((len(values), length, *present[0].shape[1:]))
    mask = torch.zeros((len(values), length), dtype=torch.bool)
    for j, v in enumerate(values):
        if v is not _ABSENT:
            out[j, :v.shape[0]] = v
            mask[j, :v.shape[0]] = True
    return out, mask


def _put_row(batch: dict[str, Any], name: str, row: int, t: torch.Tensor, rows: int, *, padded: bool) -> None:
    """Puts one computed sample's tensor into row ``row`` of a collated batch (creating, or for
    padded tensors lengthening, the batch tensor)."""
    current = batch.get(name)
    if not padded:
        if current is None:
            batch[name] = current = t.new_zeros((rows, *t.shape))
        _one_shape(name, [current[row], t])  # no broadcasting a [1, D] entry into a [T, D] row
        current[row] = t
        return
    if current is None:
        current = t.new_zeros((rows, t.shape[0], *t.shape[1:]))
        mask = torch.zeros((rows, t.shape[0]), dtype=torch.bool)
    else:
        mask = batch[f"{name}_mask"]
    if t.shape[0] > current.shape[1]:  # longer than the batch so far: lengthen
        longer = current.new_zeros((rows, t.shape[0], *current.shape[2:]))
        longer[:, :current.shape[1]] = current
        wider = torch.zeros((rows, t.shape[0]), dtype=torch.bool)
        wider[:, :mask.shape[1]] = mask
        current, mask = longer, wider
    current[row].zero_()
    current[row, :t.shape[0]] = t
    mask[row].zero_()
    mask[row, :t.shape[0]] = True
    batch[name], batch[f"{name}_mask"] = current, mask


def _unreferenced(buf: torch.Tensor) -> bool:
    """True when no tensor but ``buf`` itself uses its memory (the pool may refill it). Without
    torch's storage use count, nothing is ever reused."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return False
    return bool(use_count(buf.untyped_storage()._cdata) <= 2)  # buf, and the wrapper made to ask
