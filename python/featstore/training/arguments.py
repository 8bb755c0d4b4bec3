"""The training side's switches: the cache modes, what a miss does, the environment variables
that turn the cache off, and :class:`CacheArguments` for training scripts' argument parsers."""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass, field
from typing import Any

from featstore import env

MODES = ("read", "lazy", "off")
ON_MISS = ("compute", "skip", "error")
#: Environment switches of the cache, first set wins (``USE_VGGT_CACHE`` is the old scripts' name).
USE_CACHE_VARIABLES = env.USE_CACHE_VARIABLES


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


def settle_modes(base: Sized, store: Any, *, path_fn: Any, paths: Sized | None, encoder: Any, mode: str,
                 use_cache: bool, on_miss: str | None, history_fn: Any = None) -> tuple[str, str]:
    """The ``(mode, on_miss)`` a :class:`CachedDataset` runs with, after checking its arguments
    together; a combination that cannot work is a ``ValueError`` saying what to pass."""
    if not use_cache:
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
    if history_fn is not None and (path_fn is not None or paths is not None):
        raise ValueError("history_fn names each sample's frames (its history entry is served): pass it instead of "
                         "path_fn or paths, not with them")
    if path_fn is None and paths is None and history_fn is None:
        raise ValueError("name each sample's source: pass path_fn=(sample -> path) or paths=[...], or "
                         "history_fn=(sample -> list of frames) for history entries")
    if paths is not None and len(paths) != len(base):
        raise ValueError(f"paths has {len(paths)} sources but the dataset has {len(base)} samples")
    if store is None and mode != "off":
        raise ValueError(f"mode {mode!r} needs a FeatureStore (store=None only with the cache off)")
    return mode, on_miss if mode != "lazy" else "compute"
