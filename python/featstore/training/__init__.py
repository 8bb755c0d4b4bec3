"""The training side: :class:`CachedDataset` adds cached features to a dataset's samples.

Modes
-----
``read``
    Serve valid entries. A miss (missing, stale, corrupt, another encoder's) is computed live
    with the encoder and not written (``on_miss="compute"``), or the sample gets zeros of the
    entries' shapes with ``cached`` False (``"skip"``), or it is an error (``"error"``).
``lazy``
    A miss is computed once and written atomically: the first epoch computes, later epochs read.
``off``
    The store is never touched (``use_cache=False``, ``USE_VGGT_CACHE=false`` or
    ``FEATSTORE_USE_CACHE=0``): features are computed live, or left out without an encoder.

Where misses are computed: a CPU encoder runs where the sample is loaded (a DataLoader worker).
An encoder on a GPU runs in the main process only, because CUDA cannot be used in a forked
worker: workers hand the miss on, and :meth:`CachedDataset.fill` (which
:meth:`CachedDataset.loader` calls on every batch) encodes a batch's misses together.

History entries: with ``history_fn=lambda s: s["images"]`` a sample's features are the entry of
its history (its frames, oldest first; :mod:`featstore.history`), read with the same stable batch
keys; a miss is computed with the encoder's ``encode_history``, one causal pass per longest list
of the batch, and lazy mode writes the entry of every missing prefix that pass went through.

Fast batches: with a batch size, the DataLoader hands a batch's indices to ``__getitems__``,
which reads each fixed-shape tensor of all the batch's entries into one tensor with
:meth:`FeatureStore.read_batch` (parallel ``pread`` without the GIL, into shared memory in a
worker, so the batch crosses to the main process without another copy), and :func:`collate`
passes that tensor on instead of stacking per-sample copies.

Modules: :mod:`~featstore.training.dataset` (the samples), :mod:`~featstore.training.loader`
(the DataLoader and its hand-off to the main process), :mod:`~featstore.training.reading` (entries
into samples and batches), :mod:`~featstore.training.buffers` (where batches are read to),
:mod:`~featstore.training.batching` (:func:`collate`), :mod:`~featstore.training.live` (computing
misses), :mod:`~featstore.training.history_reading` and :mod:`~featstore.training.live_history`
(the same for history entries), :mod:`~featstore.training.arguments` (the switches), :mod:`~featstore.training.report`
(the start line, warnings).
"""

from featstore.training.arguments import MODES, ON_MISS, USE_CACHE_VARIABLES, CacheArguments, use_cache_default
from featstore.training.batching import HANDOFF, collate
from featstore.training.buffers import POOLED_BUFFERS
from featstore.training.dataset import CachedDataset
from featstore.training.loader import CachedLoader

__all__ = ["CachedDataset", "CachedLoader", "CacheArguments", "collate", "use_cache_default", "MODES", "ON_MISS",
           "USE_CACHE_VARIABLES", "HANDOFF", "POOLED_BUFFERS"]
