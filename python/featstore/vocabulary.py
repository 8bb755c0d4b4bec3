"""The words every part of featstore uses about entries, in one place.

Entry states and their subsets, what to do about each kind of miss, and the naming rules for
features and entry files. The Rust core reports the same states (``_core.STATES``; a test holds
the two lists equal). Nothing here imports anything but the standard library.
"""

from __future__ import annotations

import os
import re

#: Every state an entry can be in; reads serve only ``valid`` (and ``legacy`` where allowed).
STATES: tuple[str, ...] = ("valid", "missing", "stale", "foreign", "corrupt", "orphan", "legacy")

#: Where entries live: beside each source, or under a cache directory named by key.
LAYOUTS: tuple[str, ...] = ("sidecar", "dir")

#: What precompute (re)computes without ``--overwrite``.
TODO_STATES: tuple[str, ...] = ("missing", "stale", "foreign", "corrupt", "legacy")

#: What ``verify`` reports and quarantines, and (all but ``corrupt``) what ``gc`` removes.
BAD_STATES: tuple[str, ...] = ("corrupt", "stale", "foreign", "orphan")

#: Misses that count in ``FeatureStore.stats`` besides the states: an entry featstore may not read.
UNREADABLE = "unreadable"

#: What to do about each kind of miss, for the one warning a store gives per kind.
MISS_ADVICE: dict[str, str] = {
    "stale": "an input changed since caching; recompute with `featstore precompute`",
    "foreign": "written by another encoder configuration; recompute, or open the store with that fingerprint",
    "corrupt": "the file is damaged; `featstore verify --quarantine` moves it aside, then recompute",
    "orphan": "the source is gone; `featstore gc` removes such entries",
    UNREADABLE: "featstore may not read the entry file; fix its permissions, or use a readable cache_dir",
}

#: The old scripts' per-image pickle beside each image (read-only, migrated by ``featstore migrate``).
LEGACY_SIDECAR_SUFFIX = ".vggt_cache.pt"

#: Entry files are safetensors files.
ENTRY_EXTENSION = "safetensors"

#: featstore's own directory under a data root or cache directory (histories, frame sets, locks,
#: quarantine); the core's scan never enters it (``rust/core/src/scan.rs``, ``STATE_DIR``).
STATE_DIR = ".featstore"

_FEATURE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# A check that failed (an OS error on a source) comes back from the core as "error: <reason>"
# in place of a state.
_ERROR_PREFIX = "error: "


def is_feature_name(name: object) -> bool:
    """True when ``name`` may name a feature (it becomes part of file names)."""
    return isinstance(name, str) and _FEATURE_NAME.match(name) is not None


def check_feature_name(name: str) -> str:
    """``name`` if it may name a feature, else ValueError saying what is allowed."""
    if not is_feature_name(name):
        raise ValueError(f"feature name {name!r} must be letters, digits, '_', '.' or '-' (not starting with "
                         "'.', '_' or '-')")
    return name


def sidecar_suffix(feature: str) -> str:
    """The ending of a sidecar entry's file name: ``.<feature>.safetensors``."""
    return f".{feature}.{ENTRY_EXTENSION}"


def check_error(state: str) -> str | None:
    """The reason when ``state`` is a failed check's report (``"error: ..."``), else None.

    This is the one place that tells an error from a state."""
    return state[len(_ERROR_PREFIX):] if state.startswith(_ERROR_PREFIX) else None


def path_to_json(rel: str) -> str:
    """How a relative path is written in JSON (journal lines, the manifest index's keys): itself
    when it is UTF-8, else a NUL (which no path contains) and its bytes in hex. The Rust core
    (``manifest::path_to_json``) reads and writes the same."""
    raw = os.fsencode(rel)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "\0" + raw.hex()


def path_from_json(text: str) -> str:
    """The path :func:`path_to_json` wrote (non-UTF-8 bytes as ``os.fsdecode`` gives them)."""
    if text.startswith("\0"):
        return os.fsdecode(bytes.fromhex(text[1:]))
    return text
