"""featstore: precomputed frozen-encoder features, stored beside the data, served zero-copy.

The public surface::

    featstore.scan(root, ...) -> ScanResult
    featstore.FeatureStore(data_root, feature, ...)       # get / put / contains / status ...
    featstore.precompute(data_root, encoder=..., ...)     # the engine of `featstore precompute`
    featstore.CachedDataset(base, store, path_fn=..., ...)  # training: cached features per sample
    featstore.stamp_key(path, data_root), featstore.legacy_sha256_key(path)
    featstore.EmbeddingCacheManager(cache_dir), featstore.file_hash(path)
    featstore.errors: FeatstoreError and its subclasses

``import featstore`` does not import torch; the functions that need it import it themselves.
"""

from featstore._core import __version__
from featstore.compat import EmbeddingCacheManager, file_hash, legacy_sha256_key, stamp_key
from featstore.errors import (
    BatchReadError,
    CheckpointError,
    CorruptEntryError,
    DataRootError,
    FeatstoreError,
    ForeignEntryError,
    LockHeldError,
    ManifestError,
    NoImagesFoundError,
    PathOutsideRootError,
    ReadOnlyDataRootError,
    SourceChangedError,
    StaleEntryError,
    TensorNameError,
)
from featstore.scan import DEFAULT_EXTENSIONS, ScanResult, scan
from featstore.status import Status
from featstore.store import FeatureStore
from featstore.vocabulary import LAYOUTS, STATES

__all__ = [
    "__version__",
    "precompute",
    "CachedDataset",
    "CacheArguments",
    "collate",
    "scan",
    "ScanResult",
    "DEFAULT_EXTENSIONS",
    "FeatureStore",
    "Status",
    "STATES",
    "LAYOUTS",
    "stamp_key",
    "legacy_sha256_key",
    "file_hash",
    "EmbeddingCacheManager",
    "FeatstoreError",
    "BatchReadError",
    "CorruptEntryError",
    "StaleEntryError",
    "ForeignEntryError",
    "CheckpointError",
    "DataRootError",
    "NoImagesFoundError",
    "ManifestError",
    "PathOutsideRootError",
    "ReadOnlyDataRootError",
    "LockHeldError",
    "SourceChangedError",
    "TensorNameError",
]


#: Names that import torch, loaded on first use rather than with the package.
_TORCH_SIDE = {"precompute": "featstore.pipeline", "CachedDataset": "featstore.training",
               "CacheArguments": "featstore.training", "collate": "featstore.training"}


def __getattr__(name: str) -> object:
    if name in _TORCH_SIDE:
        import importlib

        return getattr(importlib.import_module(_TORCH_SIDE[name]), name)
    raise AttributeError(f"module 'featstore' has no attribute {name!r}")
