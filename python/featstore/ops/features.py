"""Which features a data root (or cache directory) holds: so that a mistyped ``--feature`` is an
error naming the features that exist, never an empty success (``verify --feature vgg`` reporting
"no bad entries" would let a CI job guarding a cache pass)."""

from __future__ import annotations

import difflib
import os

from featstore import _core
from featstore.errors import FeatstoreError
from featstore.manifest import manifest_features
from featstore.vocabulary import ENTRY_EXTENSION, LEGACY_SIDECAR_SUFFIX, STATE_DIR, is_feature_name


class UnknownFeatureError(FeatstoreError):
    """A feature named that has neither a manifest nor entries where it was looked for."""


def feature_exists(data_root: str, cache_dir: str | None, feature: str) -> bool:
    """Whether ``feature`` has a manifest, featstore state (histories, frame sets, locks) or an
    entry under ``data_root`` (sidecars) or ``cache_dir``. Cheap when it has a manifest; else
    sidecars are looked for with one scan."""
    if cache_dir is not None:
        base = cache_dir
        if os.path.isdir(os.path.join(cache_dir, feature)):
            return True
    else:
        base = data_root
        if os.path.isfile(os.path.join(data_root, f"{feature}_cache_manifest.json")):
            return True
    if os.path.isdir(os.path.join(base, STATE_DIR, feature)):
        return True
    return cache_dir is None and feature in _sidecar_features(data_root)


def known_features(data_root: str, cache_dir: str | None) -> list[str]:
    """Every feature with a manifest, featstore state or an entry there, sorted."""
    base = cache_dir if cache_dir is not None else data_root
    found = set(manifest_features(data_root, cache_dir))
    state = os.path.join(base, STATE_DIR)
    if os.path.isdir(state):
        found.update(name for name in os.listdir(state) if os.path.isdir(os.path.join(state, name)))
    if cache_dir is not None and os.path.isdir(cache_dir):
        found.update(name for name in os.listdir(cache_dir) if os.path.isdir(os.path.join(cache_dir, name)))
    else:
        found |= _sidecar_features(data_root)
    return sorted(f for f in found if is_feature_name(f) and f != STATE_DIR)


def require_feature(data_root: str, cache_dir: str | None, feature: str) -> None:
    """Raises :class:`UnknownFeatureError` naming the features that exist (and the closest one)
    when ``feature`` has no manifest and no entries."""
    if feature_exists(data_root, cache_dir, feature):
        return
    where = cache_dir or data_root
    known = known_features(data_root, cache_dir)
    close = difflib.get_close_matches(feature, known, n=1, cutoff=0.5)
    if not close:
        close = [f for f in known if f.lower() == feature.lower()]
    hint = f"; did you mean --feature {close[0]}?" if close else ""
    listed = (f"the features there: {', '.join(known)}" if known
              else "none has a manifest or entries there (run `featstore precompute` first)")
    raise UnknownFeatureError(f"feature {feature!r} has no manifest and no entries in {where} ({listed}){hint}")


def _sidecar_features(data_root: str) -> set[str]:
    """The features of the sidecar entries under ``data_root`` (``<image>.<feature>.safetensors``),
    and ``vggt`` when old ``.vggt_cache.pt`` sidecars are there."""
    paths, *_ = _core.scan(data_root, extensions=[ENTRY_EXTENSION, "pt"], progress=None)
    found = set()
    for p in map(os.fspath, paths):
        if p.endswith(LEGACY_SIDECAR_SUFFIX):
            found.add("vggt")
            continue
        stem = p[: -len(ENTRY_EXTENSION) - 1]
        if "." in os.path.basename(stem):
            found.add(stem.rsplit(".", 1)[1])
    return found
