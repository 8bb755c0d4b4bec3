"""Frame sets: features computed from several images together.

VGGT attends across all frames given together, and the first frame gets different tokens, so a
frame's features depend on the other frames and their order. Such features are stored once per
*set* (an ordered list of sources), never per image, at
``<root or cache_dir>/.featstore/<feature>/sets/<key[:2]>/<key[:32]>.safetensors`` where the key
covers every member's path and stamp in order: any change of a member, or of the order, is a new
key and so a miss. Per-image entries and set entries live apart: a lookup never mixes modes.

A same-size edit within the file system's timestamp granularity keeps a member's stamp, hence the
key. So a set written while a member's mtime was that recent is marked ``racy``: every lookup
compares the members' digests with those recorded, until one made outside the window clears the
mark (as for per-image entries).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from featstore import _core
from featstore.errors import CorruptEntryError
from featstore.members import changed as members_changed
from featstore.members import clear_racy_mark, keyed_files, open_keyed
from featstore.members import record as record_members

if TYPE_CHECKING:
    import torch

    from featstore.store import FeatureStore

_SET_DOMAIN = b"featstore-set-v1\0"


@dataclass(frozen=True)
class SetMode:
    """How a feature's sources were grouped into frame sets, as its manifest records it.

    Attributes
    ----------
    frames : int
        Frames per set (more than 1; a shorter last chunk is its own set).
    jsonl : str or None
        The ``.jsonl`` field the sources came from: its lists are the sets (chunked), and without
        lists each directory's sorted images are. None: the images under the root.
    """

    frames: int
    jsonl: str | None = None

    def describe(self) -> str:
        """The mode in words, for reports."""
        where = f".jsonl field {self.jsonl!r}" if self.jsonl else "each directory's sorted images"
        return f"frame sets of up to {self.frames} frames from {where}"


def recorded_mode(store: FeatureStore) -> SetMode | None:
    """The frame-set mode the feature's manifest records (``frames_per_set`` above 1, and the
    ``jsonl`` field sources came from), or None: entries are per image (or there is no manifest)."""
    text = _core.read_manifest(store.manifest_path)
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    frames = doc.get("frames_per_set") if isinstance(doc, dict) else None
    if not isinstance(frames, int) or isinstance(frames, bool) or frames <= 1:
        return None
    jsonl = doc.get("jsonl")
    return SetMode(frames, jsonl if isinstance(jsonl, str) and jsonl else None)


def group_frames(lists: Sequence[Sequence[str]], paths: Sequence[str], frames: int) -> list[tuple[str, ...]]:
    """The frame sets of ``frames`` frames: each ``.jsonl`` list, else each directory's sorted
    ``paths``, cut into consecutive chunks of up to ``frames`` (a shorter last chunk is its own set).
    Precompute, status, verify and gc all group by this one rule."""
    groups: list[Sequence[str]] = list(lists)
    if not groups:
        by_dir: dict[str, list[str]] = defaultdict(list)
        for p in paths:  # already sorted
            by_dir[os.path.dirname(p)].append(p)
        groups = [by_dir[d] for d in sorted(by_dir)]
    return [tuple(g[i:i + frames]) for g in groups for i in range(0, len(g), frames)]


def set_key(store: FeatureStore, rels: Sequence[str]) -> str:
    """The key of an ordered set of sources: a digest of every member's v1 key (path and stamp).

    Raises
    ------
    FileNotFoundError
        A member does not exist.
    """
    h = hashlib.sha256(_SET_DOMAIN)
    for rel in rels:
        st = os.stat(os.path.join(store.data_root, rel))
        h.update(bytes.fromhex(_core.stamp_key(os.fsencode(rel), st.st_size, st.st_mtime_ns)))
    return h.hexdigest()


def set_entry_path(store: FeatureStore, rels: Sequence[str]) -> str:
    """Where the entry of this set is (or would be written) for its members as they are now."""
    key = set_key(store, rels)
    return os.path.join(store.state_dir, "sets", key[:2], key[:32] + ".safetensors")


def put_set(store: FeatureStore, paths: Sequence[str | os.PathLike[str]], tensors: Mapping[str, torch.Tensor], *,
            metadata: Mapping[str, str] | None = None, durable: bool = False,
            expected: Sequence[tuple[int, int]] | None = None) -> str:
    """Writes the entry of an ordered set of sources atomically; returns its path.

    The metadata records every member (path, stamp, digest), the fingerprint and the set size.
    ``expected`` holds the members' stamps when they were read for encoding: if one
    changed since, :class:`SourceChangedError` is raised and nothing is written.
    """
    from featstore._torch import to_raw

    rels = [store.rel(p) for p in paths]
    if not rels:
        raise ValueError("a frame set needs at least one source")
    recorded, is_racy = record_members(store.data_root, rels, expected)
    path = set_entry_path(store, rels)
    meta = dict(metadata or {})
    meta.update({"feature": store.feature, "fingerprint": store.fingerprint or "", "kind": "frame-set",
                 "frames": str(len(rels)), "members": json.dumps(recorded), "racy": "1" if is_racy else "0"})
    raw, keep = to_raw(tensors)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _core.write_entry(path, raw, meta, durable)
    del keep
    return path


def set_state(store: FeatureStore, paths: Sequence[str | os.PathLike[str]]) -> str:
    """``valid``, ``missing`` (no entry for the members as they are now), ``stale`` (a member
    was edited within the timestamp granularity: same stamp, other bytes), ``foreign`` or
    ``corrupt``; ``missing`` also when a member no longer exists."""
    rels = [store.rel(p) for p in paths]
    try:
        path = set_entry_path(store, rels)
    except FileNotFoundError:
        return "missing"
    try:
        meta, _, _ = _core.read_header(path)
    except FileNotFoundError:
        return "missing"
    except CorruptEntryError:
        return "corrupt"
    if store.foreign_reason(meta.get("fingerprint", "")) is not None:
        return "foreign"
    return "stale" if members_changed(store.data_root, meta) else "valid"


def get_set(store: FeatureStore, paths: Sequence[str | os.PathLike[str]], *, device: Any = None,
            dtype: Any = None) -> dict[str, torch.Tensor] | None:
    """The tensors of a set's entry (zero-copy), or None unless it is valid for the members as
    they are now, in this order, with the store's fingerprint."""
    opened = open_keyed(store, paths, set_entry_path, what="frame-set")
    if opened is None:
        return None
    _, path, capsules, meta = opened
    if store.foreign_reason(meta.get("fingerprint", "")) is not None:
        return None
    from featstore._torch import from_capsules

    changed = members_changed(store.data_root, meta)
    if changed:
        return None
    if changed is False:
        clear_racy_mark(path, meta)
    return from_capsules(capsules, device, dtype)


@dataclass
class SetVerdict:
    """One frame-set entry file judged on its own, from the members its header records.

    Attributes
    ----------
    path : str
        The entry file.
    members : tuple of str
        Its members in order (empty when they cannot be read).
    state : str
        ``valid``, ``stale`` (a member changed, or a newer entry of the same members supersedes
        it), ``foreign``, ``orphan`` (a member is gone) or ``corrupt``.
    reason : str
        Why, in words.
    """

    path: str
    members: tuple[str, ...]
    state: str
    reason: str = ""


def set_entry_files(store: FeatureStore) -> list[str]:
    """Every frame-set entry file of the feature (``<state dir>/sets/<key[:2]>/<key32>.safetensors``),
    sorted."""
    return keyed_files(os.path.join(store.state_dir, "sets"))


def judge_set_entry(store: FeatureStore, path: str, *, deep: bool = False) -> SetVerdict:
    """The state of one frame-set entry file from its header alone (no grouping needed).

    ``deep`` compares every member's digest with the recorded one (what ``verify`` does);
    otherwise only members whose stamp moved, or all of a ``racy`` entry's, are digested.

    Raises
    ------
    OSError
        The file cannot be read (other than being malformed).
    """
    try:
        meta, _, _ = _core.read_header(path)
    except CorruptEntryError as exc:
        return SetVerdict(path, (), "corrupt", str(exc))
    if meta.get("kind") != "frame-set" or meta.get("feature") != store.feature:
        return SetVerdict(path, (), "corrupt", f"not a frame-set entry of feature {store.feature}")
    try:
        recorded = [(m["path"], int(m["size"]), int(m["mtime_ns"]), m["blake3"]) for m in json.loads(meta["members"])]
    except (KeyError, TypeError, ValueError) as exc:
        return SetVerdict(path, (), "corrupt", f"its members cannot be read ({type(exc).__name__}: {exc})")
    members = tuple(m[0] for m in recorded)
    if not members:
        return SetVerdict(path, members, "corrupt", "it records no member")
    gone = [m for m in members if not os.path.lexists(os.path.join(store.data_root, m))]
    if gone:
        return SetVerdict(path, members, "orphan", f"its member {gone[0]} no longer exists")
    foreign = store.foreign_reason(meta.get("fingerprint", ""))
    if foreign is not None:
        return SetVerdict(path, members, "foreign", foreign)
    try:
        current = set_entry_path(store, members)
    except FileNotFoundError as exc:  # gone since the look above
        return SetVerdict(path, members, "orphan", f"a member no longer exists: {exc}")
    moved = os.path.normpath(current) != os.path.normpath(path)
    if moved and os.path.lexists(current):
        return SetVerdict(path, members, "stale", f"superseded: the set's current entry is {current}")
    paths: list[str | os.PathLike[str]] = [os.path.join(store.data_root, m) for m in members]
    stamps_moved = members_changed(store.data_root, meta) is not None
    digests = _core.file_digests(paths) if moved or deep or meta.get("racy") == "1" or stamps_moved else None
    if digests is not None:
        changed = [m for m, now, (_, _, _, then) in zip(members, digests, recorded, strict=True) if now != then]
        if changed:
            return SetVerdict(path, members, "stale", f"its member {changed[0]} changed since the set was computed")
    if moved:
        return SetVerdict(path, members, "valid", "filed under older stamps of its members (same bytes); a "
                          "precompute computes the set again under the current ones")
    return SetVerdict(path, members, "valid")


def group_states(store: FeatureStore, groups: Sequence[Sequence[str]], verdicts: Sequence[SetVerdict]) -> list[str]:
    """The state of each expected frame set (``group_frames``): its current entry's verdict, else
    ``stale`` when an older entry of the same members is stale, else ``missing``."""
    by_path = {os.path.normpath(v.path): v for v in verdicts}
    by_members: dict[tuple[str, ...], list[SetVerdict]] = defaultdict(list)
    for v in verdicts:
        by_members[v.members].append(v)
    states = []
    for group in groups:
        members = tuple(store.rel(p) for p in group)
        try:
            current = by_path.get(os.path.normpath(set_entry_path(store, members)))
        except FileNotFoundError:
            current = None
        if current is not None:
            states.append(current.state)
        elif any(v.state == "stale" for v in by_members.get(members, ())):
            states.append("stale")
        else:
            states.append("missing")
    return states
