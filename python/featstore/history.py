"""History entries: what causal sequence encoders compute for a sample (docs/design.md, "History
entries"; docs/causal-streaming.md).

A sample of a JanusVLN-style model is an ordered list of frames, its history; its features are
the last frame's outputs given the whole list. The entry of a list is named by a chain of keys,
one per prefix: ``h_0 = blake3("featstore-history-v1\\0" || member(f_0))`` and ``h_k =
blake3(h_{k-1} || member(f_k))``, where a member is the length-prefixed relative path, size and
mtime_ns (the dir layout's key fields). A list that is a prefix of another so shares its keys, and
one causal pass over the longest list writes the entry of every prefix a sample names. Entries
live at ``<root or cache_dir>/.featstore/<feature>/history/<h[:2]>/<h[:32]>.safetensors`` and record
every member (path, stamp with inode and ctime, digest): an edited frame makes stale exactly the
entries whose history holds it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from featstore import _core
from featstore.errors import CorruptEntryError, FeatstoreError
from featstore.members import changed as members_changed
from featstore.members import clear_racy_mark, keyed_files, open_keyed
from featstore.members import record as record_members
from featstore.vocabulary import ENTRY_EXTENSION

if TYPE_CHECKING:
    import torch

    from featstore.store import FeatureStore

_DOMAIN = b"featstore-history-v1\0"
_KIND = "history"


def _member(rel: str, size: int, mtime_ns: int) -> bytes:
    path = os.fsencode(rel)
    return struct.pack("<I", len(path)) + path + struct.pack("<Qq", size, mtime_ns)


def history_keys(store: FeatureStore, rels: Sequence[str]) -> list[str]:
    """The chain keys (64 hex digits) of every prefix of ``rels``, from the members' current
    stamps: ``keys[k]`` names the entry of ``rels[:k + 1]``.

    Raises
    ------
    FileNotFoundError
        A member does not exist.
    """
    keys: list[str] = []
    previous = _DOMAIN
    for rel in rels:
        st = os.stat(os.path.join(store.data_root, rel))
        key = _core.bytes_digest(previous + _member(rel, st.st_size, st.st_mtime_ns))
        keys.append(key)
        previous = bytes.fromhex(key)
    return keys


def _path_of(store: FeatureStore, key: str) -> str:
    return os.path.join(store.state_dir, _KIND, key[:2], key[:32] + "." + ENTRY_EXTENSION)


def history_entry_path(store: FeatureStore, rels: Sequence[str]) -> str:
    """Where the entry of this history is (or would be written) for its frames as they are now."""
    if not rels:
        raise ValueError("a history needs at least one frame")
    return _path_of(store, history_keys(store, rels)[-1])


#: Header bytes kept for everything but the frame list (tensors, stamps, checksums, user metadata).
_HEADER_ROOM = 64 << 10


def put_history(store: FeatureStore, paths: Sequence[str | os.PathLike[str]], tensors: Mapping[str, torch.Tensor],
                *, expected: Sequence[Sequence[int]] | None = None, metadata: Mapping[str, str] | None = None,
                durable: bool = False) -> str:
    """Writes the entry of a history (its last frame's features given every frame before it)
    atomically; returns its path.

    ``expected`` holds the frames' stamps when they were read for encoding: if one changed
    since, :class:`~featstore.errors.SourceChangedError` is raised and nothing is written.
    """
    from featstore._torch import to_raw  # imports torch: not at `import featstore`

    rels = [store.rel(p) for p in paths]
    if not rels:
        raise ValueError("a history needs at least one frame")
    recorded, is_racy = record_members(store.data_root, rels, expected)
    path = _path_of(store, history_keys(store, rels)[-1])
    meta = dict(metadata or {})
    members = json.dumps(recorded)
    if len(members) > _core.MAX_HEADER_LEN - _HEADER_ROOM:
        # The reader refuses a header this long: writing it would make an entry every lookup
        # calls corrupt and every precompute writes again.
        raise FeatstoreError(
            f"the history of {len(rels)} frames ending in {rels[-1]} is too long for one entry: its frames' "
            f"paths and stamps take {len(members):,} bytes, over the {_core.MAX_HEADER_LEN:,}-byte header every "
            "reader accepts. Nothing was written; use shorter histories (split the episode's list into lists "
            "of fewer frames; a history window does not help: every frame fed still defines the entry), "
            "or shorter frame paths")
    meta.update({"feature": store.feature, "fingerprint": store.fingerprint or "", "kind": _KIND,
                 "frames": str(len(rels)), "members": members, "racy": "1" if is_racy else "0"})
    raw, keep = to_raw(tensors)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _core.write_entry(path, raw, meta, durable)
    del keep
    return path


@dataclass
class HistoryVerdict:
    """One history entry file judged from its header.

    Attributes
    ----------
    path : str
        The entry file.
    members : tuple of str
        Its frames in order (empty when they cannot be read).
    state : str
        ``valid``, ``stale`` (a frame changed), ``foreign``, ``orphan`` (a frame is gone) or
        ``corrupt``.
    reason : str
        Why, in words.
    """

    path: str
    members: tuple[str, ...]
    state: str
    reason: str = ""


def judge_history_entry(store: FeatureStore, path: str, *, deep: bool = False,
                        meta: Mapping[str, str] | None = None) -> HistoryVerdict:
    """The state of one history entry file from its header alone. ``deep`` digests every frame
    whatever its stamp (``verify``)."""
    if meta is None:
        try:
            meta, _, _ = _core.read_header(path)
        except CorruptEntryError as exc:
            return HistoryVerdict(path, (), "corrupt", str(exc))
    if meta.get("kind") != _KIND or meta.get("feature") != store.feature:
        return HistoryVerdict(path, (), "corrupt", f"not a history entry of feature {store.feature}")
    try:
        members = tuple(m["path"] for m in json.loads(meta["members"]))
    except (KeyError, TypeError, ValueError) as exc:
        return HistoryVerdict(path, (), "corrupt", f"its frames cannot be read ({type(exc).__name__}: {exc})")
    if not members:
        return HistoryVerdict(path, members, "corrupt", "it records no frame")
    gone = [m for m in members if not os.path.lexists(os.path.join(store.data_root, m))]
    if gone:
        return HistoryVerdict(path, members, "orphan", f"its frame {gone[0]} no longer exists")
    foreign = store.foreign_reason(meta.get("fingerprint", ""))
    if foreign is not None:
        return HistoryVerdict(path, members, "foreign", foreign)
    if members_changed(store.data_root, meta, deep=deep):
        return HistoryVerdict(path, members, "stale", "a frame of its history changed since it was computed")
    return HistoryVerdict(path, members, "valid")


def history_state(store: FeatureStore, paths: Sequence[str | os.PathLike[str]]) -> str:
    """``valid``, ``missing`` (no entry for these frames as they are now, in this order; also
    when a frame no longer exists), ``stale`` (a frame's bytes changed but not its size and
    mtime), ``foreign`` or ``corrupt``."""
    rels = [store.rel(p) for p in paths]
    try:
        path = history_entry_path(store, rels)
        meta, _, _ = _core.read_header(path)
    except FileNotFoundError:
        return "missing"
    except CorruptEntryError:
        return "corrupt"
    verdict = judge_history_entry(store, path, meta=meta)
    if verdict.state == "valid" and verdict.members != tuple(rels):
        return "stale"  # a key collision or a hand-made file: never another history's entry
    return "missing" if verdict.state == "orphan" else verdict.state


def get_history(store: FeatureStore, paths: Sequence[str | os.PathLike[str]], *, device: Any = None,
                dtype: Any = None) -> dict[str, torch.Tensor] | None:
    """The tensors of a history's entry (zero-copy), or None unless it is valid for these frames
    as they are now, in this order, with the store's fingerprint."""
    from featstore._torch import from_capsules  # imports torch: not at `import featstore`

    opened = open_keyed(store, paths, history_entry_path, what="history")
    if opened is None:
        return None
    rels, path, capsules, meta = opened
    verdict = judge_history_entry(store, path, meta=meta)
    if verdict.state != "valid" or verdict.members != tuple(rels):
        return None
    clear_racy_mark(path, meta)
    return from_capsules(capsules, device, dtype)


def history_entry_files(store: FeatureStore) -> list[str]:
    """Every history entry file of the feature, sorted."""
    return keyed_files(os.path.join(store.state_dir, _KIND))


@dataclass(frozen=True)
class HistoryMode:
    """A feature precomputed (or lazily cached) as histories, as its manifest records it.

    Attributes
    ----------
    jsonl : str or None
        The ``.jsonl`` field whose lists are the samples' histories (None: not recorded, so the
        expected histories are unknown and only the entry files can be judged).
    """

    jsonl: str | None = None


def recorded_history(store: FeatureStore) -> HistoryMode | None:
    """The history mode the feature's manifest records (a true ``history`` field, and the
    ``jsonl`` field the lists came from), or None (per image, frame sets, or no manifest)."""
    text = _core.read_manifest(store.manifest_path)
    try:
        doc = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(doc, dict) or not doc.get("history"):
        return None
    jsonl = doc.get("jsonl")
    return HistoryMode(jsonl if isinstance(jsonl, str) and jsonl else None)
