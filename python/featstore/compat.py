"""Drop-ins for the caches featstore replaces: keys, legacy sidecars, the per-type manager.

- :func:`legacy_sha256_key`: the old cache-directory key, ``sha256(path + file bytes)[:16]``.
- :func:`load_legacy_sidecar`: old ``<image>.vggt_cache.pt`` files, unpickled with
  ``weights_only=True`` so a crafted file cannot run code.
- :class:`EmbeddingCacheManager` and :func:`file_hash`: the old per-type cache manager's exact
  surface, storing featstore entries (atomic, zero-copy) instead of ``torch.save`` pickles.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from featstore import _core
from featstore.errors import CorruptEntryError, PathOutsideRootError
from featstore.vocabulary import is_feature_name

if TYPE_CHECKING:
    import torch



def stamp_key(path: str | os.PathLike[str], data_root: str | os.PathLike[str]) -> str:
    """The v1 key of a source (64 hex digits): blake3 over its path relative to ``data_root``
    and its current size and mtime. The ``dir`` layout names entries by its first 32 digits."""
    root = os.path.abspath(os.fspath(data_root))
    p = os.path.abspath(os.path.join(root, os.fspath(path)))
    rel = os.path.relpath(p, root)
    if rel == ".." or rel.startswith("../"):  # perhaps the root spelled another way (a symlink to it)
        rel = os.path.relpath(os.path.realpath(p), os.path.realpath(root))
    if rel == ".." or rel.startswith("../"):
        raise PathOutsideRootError(f"{p} is outside the data root {root}")
    st = os.stat(p)
    return _core.stamp_key(os.fsencode(rel), st.st_size, st.st_mtime_ns)


def legacy_sha256_key(path: str | os.PathLike[str]) -> str:
    """The old scripts' cache key: ``sha256(path exactly as given + the file's bytes)``, first 16
    hex digits. Reads the whole file (that is why the old lookups took milliseconds)."""
    p = os.fspath(path)
    return _core.legacy_sha256_key(os.fsencode(p), p)


def file_hash(path: str | os.PathLike[str]) -> str:
    """A cache key for :class:`EmbeddingCacheManager` from the absolute path, size and mtime
    (32 hex digits). Reads no content: any edit changes size or mtime, so it changes the key."""
    p = os.path.abspath(os.fspath(path))
    st = os.stat(p)
    return _core.stamp_key(os.fsencode(p), st.st_size, st.st_mtime_ns)[:32]


def load_legacy_sidecar(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Reads an old ``torch.save`` cache file safely; returns its tensors.

    A dict keeps its tensor values (``features``, ...; strings such as ``path`` are dropped); a
    bare tensor is returned as ``{"features": tensor}``.

    Raises
    ------
    CorruptEntryError
        The file is not a pickle of plain tensors (it may be damaged, or crafted to run code).
    """
    import pickle

    import torch

    p = os.fspath(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        raise CorruptEntryError(
            f"{p}: refused to load: not a plain tensor pickle ({str(exc).splitlines()[0]}). It may be damaged "
            "or crafted to run code; featstore never unpickles such files. Delete it and recompute.") from exc
    if isinstance(obj, torch.Tensor):
        return {"features": obj}
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CorruptEntryError(f"{p}: holds no tensors (found {type(obj).__name__}); delete it and recompute")


class EmbeddingCacheManager:
    """The old per-type embedding cache, same method names, featstore entries underneath.

    Entries live at ``<cache_dir>/<cache_type>/<file_hash>.safetensors`` and are written
    atomically; old ``<file_hash>.pt`` files in the same place are still read (safely).

    Parameters
    ----------
    cache_dir : path
        The cache directory (created on first save).
    """

    #: The cache types the diffusion training scripts use.
    CACHE_TYPES = ("pixel_latent", "control_latent", "prompt_embed", "prompt_embeds_mask")

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))

    def _path(self, cache_type: str, file_hash: str, ext: str = ".safetensors") -> str:
        for what, v in (("cache_type", cache_type), ("file_hash", file_hash)):
            if not isinstance(v, str) or not is_feature_name(v):
                raise ValueError(f"{what} {v!r} must be letters, digits, '_', '.' or '-' (it names a file)")
        return os.path.join(self.cache_dir, cache_type, file_hash + ext)

    def save_cache(self, cache_type: str, file_hash: str, data: torch.Tensor | dict[str, torch.Tensor]) -> str:
        """Stores a tensor (or a dict of tensors) atomically; returns the file path."""
        import torch

        from featstore._torch import to_raw

        path = self._path(cache_type, file_hash)
        tensors = {"data": data} if isinstance(data, torch.Tensor) else data
        raw, keep = to_raw(tensors)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        single = "1" if isinstance(data, torch.Tensor) else "0"
        meta = {"cache_type": cache_type, "file_hash": file_hash, "single": single}
        _core.write_entry(path, raw, meta)
        del keep
        return path

    def load_cache(self, cache_type: str, file_hash: str) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """The stored tensor (or dict), zero-copy; None when absent or unreadable (with a warning)."""
        import warnings

        import torch

        path = self._path(cache_type, file_hash)
        try:
            capsules, meta, _ = _core.read_entry(path)
        except FileNotFoundError:
            legacy = self._path(cache_type, file_hash, ".pt")
            if not os.path.exists(legacy):
                return None
            try:
                tensors = load_legacy_sidecar(legacy)
            except CorruptEntryError as exc:
                warnings.warn(str(exc), stacklevel=2)
                return None
            return tensors.get("features", next(iter(tensors.values()))) if len(tensors) == 1 else tensors
        except CorruptEntryError as exc:
            warnings.warn(f"{exc}; treated as not cached", stacklevel=2)
            return None
        tensors = {name: torch.from_dlpack(c) for name, c in capsules}
        return tensors["data"] if meta.get("single") == "1" else tensors

    def cache_exists(self, cache_type: str, file_hash: str) -> bool:
        """True when an entry (or an old ``.pt``) exists for this type and hash."""
        return os.path.exists(self._path(cache_type, file_hash)) or os.path.exists(
            self._path(cache_type, file_hash, ".pt"))

    def get_cache_stats(self) -> dict[str, dict[str, float]]:
        """``{cache_type: {"count": files, "size_mb": megabytes}}`` for every type present."""
        stats: dict[str, dict[str, float]] = {}
        if not os.path.isdir(self.cache_dir):
            return stats
        for cache_type in sorted(os.listdir(self.cache_dir)):
            d = os.path.join(self.cache_dir, cache_type)
            if not os.path.isdir(d):
                continue
            files = [e for e in os.scandir(d) if e.is_file() and e.name.endswith((".safetensors", ".pt"))]
            stats[cache_type] = {"count": len(files), "size_mb": sum(e.stat().st_size for e in files) / 2**20}
        return stats

    def clear_cache(self, cache_type: str | None = None) -> None:
        """Deletes one type's entries, or every type's when ``cache_type`` is None."""
        if cache_type is None:
            for t in os.listdir(self.cache_dir) if os.path.isdir(self.cache_dir) else []:
                if os.path.isdir(os.path.join(self.cache_dir, t)):
                    shutil.rmtree(os.path.join(self.cache_dir, t))
            return
        self._path(cache_type, "x")
        shutil.rmtree(os.path.join(self.cache_dir, cache_type), ignore_errors=True)


