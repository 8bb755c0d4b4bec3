"""The old loader's SHA256-named cache directories: their files, and which source each belongs to.

A file there is ``<sha16>.pt`` with ``sha16 = sha256(path as the old loader passed it + image
bytes)[:16]``. The hash-to-path map is rebuilt by computing that key for every source under each
root the old loader may have used; an old ``manifest.json`` only hints (every match is a
recomputed key).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence

from featstore import _core
from featstore.progress import bar as progress_bar
from featstore.store import FeatureStore

# Names of a legacy SHA256 cache directory: sha256(path + image bytes) hex, first 16 digits.
_LEGACY_KEY = re.compile(r"^[0-9a-f]{16}$")
# Sources whose keys are computed per call to the core (a step of the progress bar).
_CHUNK = 4096


def list_legacy_dirs(dirs: Sequence[str]) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """``{sha16: [files]}`` of the ``<sha16>.pt`` files in ``dirs``, and the ``.pt`` files there
    not named so, with why they are not legacy cache files."""
    files: dict[str, list[str]] = {}
    misnamed: list[tuple[str, str]] = []
    for d in dirs:
        with os.scandir(d) as it:
            for e in sorted(it, key=lambda e: e.name):
                if not e.name.endswith(".pt") or not e.is_file():
                    continue
                key = e.name[:-3]
                if _LEGACY_KEY.match(key):
                    files.setdefault(key, []).append(e.path)
                else:
                    misnamed.append((e.path, "not named <sha256[:16]>.pt: not a legacy cache file"))
    return files, misnamed


def old_root(given: str, rel: str) -> str:
    """The root the old loader saw, from a path it passed (``given``) and the source's ``rel``."""
    return given[: -len(rel)].rstrip("/") or "/"


def match_keys(store: FeatureStore, rels: Sequence[str], keys: set[str], dirs: Sequence[str],
               old_roots: Sequence[str], threads: int | None, progress: bool | None) -> dict[str, tuple[str, str]]:
    """``{sha16: (source, path as the old loader passed it)}`` for each of ``keys`` some source's
    recomputed key equals.

    The hints of the old ``manifest.json`` files in ``dirs`` are tried first (they may reveal an
    old root), then every source under each root: the data root, ``old_roots`` (as the old loader
    saw them: not made absolute), and the roots the hints revealed.
    """
    remaining = set(keys)
    matches: dict[str, tuple[str, str]] = {}
    prefixes = [store.data_root] + [r.rstrip("/") or "/" for r in old_roots]
    hints = {k: v for d in dirs for k, v in _manifest_hints(d).items() if k in remaining}

    def take(pairs: list[tuple[str, str]], desc: str) -> list[tuple[str, str]]:
        """Computes the keys of ``(path as given, source)`` pairs; records and returns the pairs
        whose key is still unmatched."""
        taken = []
        for (given, rel), key in zip(pairs, _legacy_keys(store, pairs, threads, progress, desc), strict=True):
            if key in remaining:
                matches[key] = (rel, given)
                remaining.discard(key)
                taken.append((given, rel))
        return taken

    if hints:
        for given, rel in take(_hinted_pairs(rels, hints.values()), "checking manifest hints"):
            prefix = old_root(given, rel)
            if prefix not in prefixes:
                prefixes.append(prefix)
    for prefix in prefixes:
        if not remaining:
            break
        done = {m[0] for m in matches.values()}
        take([(os.path.join(prefix, r), r) for r in rels if r not in done], f"legacy keys via {prefix}")
    return matches


def _hinted_pairs(rels: Sequence[str], given_paths: Iterable[str]) -> list[tuple[str, str]]:
    """``(path as given, source)`` for each hinted path that ends with a source's relative path
    (the longest such source)."""
    by_name: dict[str, list[str]] = {}
    for rel in rels:
        by_name.setdefault(os.path.basename(rel), []).append(rel)
    pairs = []
    for given in given_paths:
        cands = [r for r in by_name.get(os.path.basename(given), []) if given == r or given.endswith("/" + r)]
        if cands:
            pairs.append((given, max(cands, key=len)))
    return pairs


def _manifest_hints(directory: str) -> dict[str, str]:
    """``{sha16: path as the old loader gave it}`` from an old cache's ``manifest.json``, when it
    maps hashes to paths (in either direction, at the top level or one level down). Optional:
    migration matches by recomputing keys; hints only save work and reveal a moved root."""
    try:
        with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    hints: dict[str, str] = {}

    def key_of(v: object) -> str | None:
        if isinstance(v, str):
            k = v.removesuffix(".pt")
            return k if _LEGACY_KEY.match(k) else None
        return None

    def path_of(v: object) -> str | None:
        if isinstance(v, str):
            return v
        if isinstance(v, dict):
            for name in ("path", "image_path", "source", "file"):
                if isinstance(v.get(name), str):
                    return v[name]
        return None

    def visit(obj: object, depth: int) -> None:
        if depth > 2:
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                key, path = key_of(k), path_of(v)
                if key and path:
                    hints[key] = path
                elif isinstance(k, str) and key_of(v):
                    hints[key_of(v) or ""] = k
                else:
                    visit(v, depth + 1)
        elif isinstance(obj, list):
            for item in obj:
                if isinstance(item, dict):
                    key = next((key_of(item.get(n)) for n in ("hash", "key", "cache_key", "sha256")
                                if key_of(item.get(n))), None)
                    path = path_of(item)
                    if key and path:
                        hints[key] = path
                        continue
                visit(item, depth + 1)

    visit(doc, 0)
    return hints


def _legacy_keys(store: FeatureStore, pairs: Sequence[tuple[str, str]], threads: int | None,
                 progress: bool | None, desc: str) -> list[str | None]:
    """Legacy keys of ``(path as given, relative source)`` pairs, in parallel, in chunks (for
    the progress bar); None where a source cannot be read."""
    out: list[str | None] = []
    with progress_bar(len(pairs), desc, show=progress, unit="sources") as bar:
        for i in range(0, len(pairs), _CHUNK):
            part = pairs[i: i + _CHUNK]
            out.extend(_core.legacy_sha256_keys([os.fsencode(g) for g, _ in part],
                                                [os.path.join(store.data_root, r) for _, r in part], threads))
            bar.update(len(part))
    return out
