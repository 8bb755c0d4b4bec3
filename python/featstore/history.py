"""History entries: what causal sequence encoders compute for a sample (docs/design.md, "History
entries"; docs/causal-streaming.md).

A sample of a JanusVLN-style model is an ordered list of frames, its history; its features are
the last frame's outputs given the whole list. Each prefix of a list has three chain values
(``rust/core/src/history.rs``): its **key** (from the frames' paths, sizes and mtimes: names the
entry file, so a list that is a prefix of another shares its keys), its **stamps** chain (the
full stamps, inode and ctime included) and its **content** chain (the frames' bytes). An entry
records its own prefix's three values and nothing per frame, so an episode's entries, writes and
checks are linear in its length: a lookup stats every frame once and trusts the entry while the
stamps chain is the recorded one, else digests the frames and compares the content chain.
A pass writes its entries through :mod:`featstore.history_writes`; its frames are recorded once,
in a frames record (:mod:`featstore.history_frames`), for the commands that judge entry files
without knowing their frames.

Entries live at ``<root or cache_dir>/.featstore/<feature>/history/<h[:2]>/<h[:32]>.safetensors``;
frames records under ``history/frames/``. Entries written by earlier versions record every frame
in their header (``members``) and are judged from it, as before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from featstore import _core, lazy_torch
from featstore.errors import CorruptEntryError, FeatstoreError
from featstore.history_frames import FrameDigests, FramesRecord, racy, read_record
from featstore.members import changed as members_changed
from featstore.members import clear_racy_mark, keyed_files, rewrite_without_racy_mark
from featstore.vocabulary import ENTRY_EXTENSION

if TYPE_CHECKING:
    import torch

    from featstore.store import FeatureStore

#: What a history entry's header says it is.
KIND = "history"
#: Entries that record chains (``format`` 2); those without a format record their members.
FORMAT = "2"


def history_keys(store: FeatureStore, rels: Sequence[str]) -> list[str]:
    """The chain keys (64 hex digits) of every prefix of ``rels``, from the frames' current
    stamps: ``keys[k]`` names the entry of ``rels[:k + 1]``.

    Raises
    ------
    FileNotFoundError
        A frame does not exist.
    """
    return _core.history_links(store.data_root, list(rels))[0]


def history_key_path(store: FeatureStore, key: str) -> str:
    """Where the entry named by the chain key ``key`` is."""
    return os.path.join(store.state_dir, KIND, key[:2], key[:32] + "." + ENTRY_EXTENSION)


def frames_record_path(store: FeatureStore, key: str) -> str:
    """Where the frames record named by ``key`` (its list's last chain key) is."""
    return os.path.join(store.state_dir, KIND, "frames", key[:2], key[:32] + ".json")


def history_entry_path(store: FeatureStore, rels: Sequence[str]) -> str:
    """Where the entry of this history is (or would be written) for its frames as they are now."""
    if not rels:
        raise ValueError("a history needs at least one frame")
    return history_key_path(store, _core.history_links(store.data_root, list(rels), last_only=True)[0][-1])


def longest_lists(lists: Iterable[Sequence[str]]) -> dict[tuple[str, ...], list[int]]:
    """Each distinct list that no other list extends, with the lengths of the distinct lists that
    are its prefixes (itself included): one pass over it covers them all. A list prefixing
    several longer ones goes to the longest (the first in input order on a tie); the result is
    ordered by where each longest list first appears."""
    distinct = list(dict.fromkeys(tuple(x) for x in lists if x))
    first_seen = {x: i for i, x in enumerate(distinct)}
    # Longest first: the first list to pass through a trie node is the longest through it, so a
    # list ending at an existing node is a prefix of that node's owner. A trie keeps this linear
    # in the frames named (comparing lists pairwise would be quadratic in the lists).
    trie: dict[str, Any] = {}
    lengths: dict[tuple[str, ...], list[int]] = {}
    for frames in sorted(distinct, key=lambda x: (-len(x), first_seen[x])):
        node, owner = trie, None
        for frame in frames:
            child = node.get(frame)
            if child is None:
                owner = owner or frames
                child = node[frame] = {_OWNER: owner}
            node = child
        root = owner or node[_OWNER]
        if root is frames:
            lengths[frames] = []
        lengths[root].append(len(frames))
    return {frames: sorted(lengths[frames]) for frames in sorted(lengths, key=first_seen.__getitem__)}


# The key under which a trie node names its longest list (not a path: paths never hold NUL).
_OWNER = "\0owner"


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
    record : str
        Its frames record ('' for entries that record their frames in the header).
    """

    path: str
    members: tuple[str, ...]
    state: str
    reason: str = ""
    record: str = ""


def _record_of(store: FeatureStore, meta: Mapping[str, str]) -> tuple[str, FramesRecord, int] | None:
    """A chain entry's frames record (its path, the record, the entry's length), or None when it
    is gone, damaged, or does not give the entry's own key (another list's)."""
    try:
        length = int(meta["frames"])
        path = frames_record_path(store, meta["frames_record"])
    except (KeyError, ValueError):
        return None
    record = read_record(path, store.feature)
    if record is None or not 1 <= length <= len(record.frames) or record.keys[length - 1] != meta.get("key"):
        return None
    return path, record, length


def recorded_members(store: FeatureStore, meta: Mapping[str, str]) -> list[dict[str, Any]] | None:
    """The frames an entry was computed from, as recorded (path, size, mtime_ns, ino, ctime_ns,
    blake3 each): from its header (earlier versions) or its frames record. None when they cannot
    be read, or the record does not give the entry's own key (another list's, or damaged)."""
    if FORMAT != meta.get("format"):
        try:
            members = json.loads(meta["members"])
            return members if isinstance(members, list) else None
        except (KeyError, TypeError, ValueError):
            return None
    found = _record_of(store, meta)
    return None if found is None else list(found[1].frames[:found[2]])


class HistoryJudge:
    """What judging many history entry files in one run remembers: each frames record's frames
    are stat'ed once (and digested once, when needed) however many entries refer to it, so the
    entries of an episode cost its frames, not the sum of its prefixes. Safe to share between
    threads (at worst a record's frames are looked at twice)."""

    def __init__(self, store: FeatureStore, *, deep: bool = False) -> None:
        self.store = store
        self.deep = deep
        self.digests = FrameDigests(store.data_root)
        self._now: dict[str, tuple[int, list[str], list[str]]] = {}
        self._contents: dict[str, list[str]] = {}

    def frames_now(self, record: str, rels: Sequence[str]) -> tuple[int, list[str], list[str]]:
        """How many leading frames of the record's list can be stat'ed now, and the key and
        stamps chains of each of those prefixes."""
        known = self._now.get(record)
        if known is None:
            root = self.store.data_root
            try:
                keys, stamps, _ = _core.history_links(root, list(rels))
                present = len(rels)
            except OSError:
                present = next((i for i, rel in enumerate(rels) if not _stats(root, rel)), len(rels))
                try:
                    keys, stamps, _ = _core.history_links(root, list(rels[:present])) if present else ([], [], 0)
                except OSError:  # changed meanwhile: nothing can be trusted
                    present, keys, stamps = 0, [], []
            known = self._now[record] = (present, keys, stamps)
        return known

    def entry_now(self, verdict: HistoryVerdict) -> str:
        """Where the entry of the verdict's frames is for the frames as they are now
        (FileNotFoundError when one is gone)."""
        known = self._now.get(verdict.record) if verdict.record else None
        n = len(verdict.members)
        if known is not None and known[0] >= n:
            return history_key_path(self.store, known[1][n - 1])
        return history_entry_path(self.store, verdict.members)

    def contents_now(self, record: str, rels: Sequence[str]) -> list[str]:
        """The content chain of every prefix of the record's list as the frames are now (OSError
        when a frame cannot be read); ``deep`` runs digest each frame once however many records
        hold it."""
        known = self._contents.get(record)
        if known is None:
            known = self._contents[record] = (self.digests.contents(rels) if self.deep
                                              else _core.history_contents(self.store.data_root, list(rels)))
        return known


def _stats(root: str, rel: str) -> bool:
    try:
        os.stat(os.path.join(root, rel))
        return True
    except OSError:
        return False


def judge_history_entry(store: FeatureStore, path: str, *, deep: bool = False,
                        meta: Mapping[str, str] | None = None, judge: HistoryJudge | None = None) -> HistoryVerdict:
    """The state of one history entry file from its header (and frames record). ``deep``
    digests every frame whatever its stamps (``verify``); ``judge`` remembers what the entries
    of one run share (each record's frames looked at once)."""
    if meta is None:
        try:
            meta, _, _ = _core.read_header(path)
        except CorruptEntryError as exc:
            return HistoryVerdict(path, (), "corrupt", str(exc))
    if meta.get("kind") != KIND or meta.get("feature") != store.feature:
        return HistoryVerdict(path, (), "corrupt", f"not a history entry of feature {store.feature}")
    if meta.get("format") != FORMAT:
        return _judge_listed(store, path, meta, deep=deep)
    record = frames_record_path(store, meta["frames_record"]) if meta.get("frames_record") else ""
    found = _record_of(store, meta)
    if found is None:
        return HistoryVerdict(path, (), "corrupt", f"its frames record {record} is missing or does not match it",
                              record)
    record, frames, length = found
    try:
        rels = tuple(f["path"] for f in frames.frames)
    except (KeyError, TypeError) as exc:
        return HistoryVerdict(path, (), "corrupt", f"its frames cannot be read ({type(exc).__name__}: {exc})", record)
    members = rels[:length]
    judge = judge or HistoryJudge(store, deep=deep)
    present, _, stamps = judge.frames_now(record, rels)
    if present < length:
        if not os.path.lexists(os.path.join(store.data_root, rels[present])):
            return HistoryVerdict(path, members, "orphan", f"its frame {rels[present]} no longer exists", record)
        return HistoryVerdict(path, members, "stale", f"its frame {rels[present]} cannot be read", record)
    foreign = store.foreign_reason(meta.get("fingerprint", ""))
    if foreign is not None:
        return HistoryVerdict(path, members, "foreign", foreign, record)
    if deep or meta.get("racy") == "1" or stamps[length - 1] != meta.get("stamps"):
        try:
            same = judge.contents_now(record, rels[:present])[length - 1] == meta.get("content")
        except OSError:
            same = False
        if not same:
            return HistoryVerdict(path, members, "stale", "a frame of its history changed since it was computed",
                                  record)
    return HistoryVerdict(path, members, "valid", "", record)


def _judge_listed(store: FeatureStore, path: str, meta: Mapping[str, str], *, deep: bool) -> HistoryVerdict:
    """The state of an entry of an earlier version, which lists its frames in its header."""
    members_list = recorded_members(store, meta)
    try:
        members = tuple(m["path"] for m in members_list or ())
    except (KeyError, TypeError) as exc:
        return HistoryVerdict(path, (), "corrupt", f"its frames cannot be read ({type(exc).__name__}: {exc})")
    if not members:
        return HistoryVerdict(path, (), "corrupt", "its frames cannot be read" if members_list is None
                              else "it records no frame")
    gone = [m for m in members if not os.path.lexists(os.path.join(store.data_root, m))]
    if gone:
        return HistoryVerdict(path, members, "orphan", f"its frame {gone[0]} no longer exists")
    foreign = store.foreign_reason(meta.get("fingerprint", ""))
    if foreign is not None:
        return HistoryVerdict(path, members, "foreign", foreign)
    if members_changed(store.data_root, meta, deep=deep):
        return HistoryVerdict(path, members, "stale", "a frame of its history changed since it was computed")
    return HistoryVerdict(path, members, "valid")


def _chains_differ(store: FeatureStore, rels: Sequence[str], meta: Mapping[str, str], *, stamps: str) -> bool:
    """Whether the frames' bytes differ from those a chain entry was computed from: False at
    once while the stamps chain (``stamps``, the frames' now) is the recorded one and the entry
    is not racy, else the content chain decides."""
    if meta.get("racy") != "1" and stamps == meta.get("stamps"):
        return False
    try:
        content = _core.history_contents(store.data_root, list(rels))[-1]
    except OSError:  # a frame vanished or became unreadable meanwhile
        return True
    return content != meta.get("content")


def _state_of(store: FeatureStore, rels: Sequence[str], path: str, meta: Mapping[str, str],
              key: str, stamps: str) -> str:
    """The state of the entry at ``path`` (read as ``meta``) for the history ``rels`` whose
    frames now give the key chain ``key`` and stamps chain ``stamps``."""
    if meta.get("kind") != KIND or meta.get("feature") != store.feature:
        return "corrupt"
    if meta.get("format") != FORMAT:  # an entry of an earlier version: it lists its frames
        verdict = judge_history_entry(store, path, meta=meta)
        if verdict.state == "valid" and verdict.members != tuple(rels):
            return "stale"  # a key collision or a hand-made file: never another history's entry
        return "missing" if verdict.state == "orphan" else verdict.state
    if store.foreign_reason(meta.get("fingerprint", "")) is not None:
        return "foreign"
    if meta.get("key") != key or meta.get("frames") != str(len(rels)):
        return "stale"  # a key collision (the file name holds half the key) or a hand-made file
    return "stale" if _chains_differ(store, rels, meta, stamps=stamps) else "valid"


def history_state(store: FeatureStore, paths: Sequence[str | os.PathLike[str]]) -> str:
    """``valid``, ``missing`` (no entry for these frames as they are now, in this order; also
    when a frame no longer exists), ``stale`` (a frame's bytes changed but not its size and
    mtime), ``foreign`` or ``corrupt``."""
    rels = [store.rel(p) for p in paths]
    return history_states(store, rels, [len(rels)])[0]


def history_states(store: FeatureStore, rels: Sequence[str], lengths: Sequence[int]) -> list[str]:
    """The state of the entry of each prefix ``rels[:n]`` for ``n`` in ``lengths``, from one
    ``stat`` of each frame (what planning a pass over the list needs)."""
    if not rels:
        raise ValueError("a history needs at least one frame")
    longest = max(lengths)
    try:
        keys, stamps, _ = _core.history_links(store.data_root, list(rels[:longest]))
    except OSError:  # a frame is gone (or cannot be stat'ed): no entry holding it is served,
        if len(lengths) == 1:  # but a prefix before it may still be valid
            return ["missing"]
        return [history_states(store, rels[:n], [n])[0] for n in lengths]
    states = []
    for n in lengths:
        path = history_key_path(store, keys[n - 1])
        try:
            meta, _, _ = _core.read_header(path)
        except FileNotFoundError:
            states.append("missing")
            continue
        except CorruptEntryError:
            states.append("corrupt")
            continue
        states.append(_state_of(store, rels[:n], path, meta, keys[n - 1], stamps[n - 1]))
    return states


def _links(store: FeatureStore, paths: Sequence[str | os.PathLike[str]]
           ) -> tuple[list[str], tuple[list[str], list[str], int]]:
    """The frames relative to the root and the whole list's chains. Frames given as the store
    names them (relative, normal) go to Rust as they are, which checks that; others are named
    first (:meth:`FeatureStore.rels`)."""
    if type(paths) in (list, tuple) and all(type(p) is str for p in paths):
        try:
            return list(paths), _core.history_links(store.data_root, paths, last_only=True)  # type: ignore[arg-type]
        except FeatstoreError:  # not relative and normal: name them first
            pass
    rels = store.rels(paths)
    return rels, _core.history_links(store.data_root, rels, last_only=True)


def get_history(store: FeatureStore, paths: Sequence[str | os.PathLike[str]], *, device: Any = None,
                dtype: Any = None) -> dict[str, torch.Tensor] | None:
    """The tensors of a history's entry (zero-copy), or None unless it is valid for these frames
    as they are now, in this order, with the store's fingerprint."""
    import warnings

    from featstore._torch import from_capsules  # imports torch: not at `import featstore`

    if not paths:
        raise ValueError("a history needs at least one frame")
    if device is None and dtype is None:
        # The hot path: frames named as the store names them (relative `str`s; others are a
        # TypeError here), the entry vouched for by their stamps alone, in one Rust call;
        # anything else is judged in full below.
        try:
            capsules = store._core.read_history(paths)  # type: ignore[arg-type]
        except TypeError:
            capsules = None
        if capsules is not None:
            from_dlpack = lazy_torch.from_dlpack()
            return {name: from_dlpack(cap) for name, cap in capsules}
    try:
        rels, (keys, stamps, newest) = _links(store, paths)
    except OSError:
        return None
    path = history_key_path(store, keys[-1])
    try:
        capsules, meta, _ = _core.read_entry(path, pread=store.read_mode == "pread")
    except FileNotFoundError:
        return None
    except CorruptEntryError as exc:
        warnings.warn(f"featstore: corrupt history entry: {exc}; recompute it", stacklevel=3)
        return None
    if _state_of(store, rels, path, meta, keys[-1], stamps[-1]) != "valid":
        return None
    if meta.get("racy") == "1":
        if meta.get("format") != FORMAT:
            clear_racy_mark(path, meta)
        elif not racy([newest]):  # verified outside the window: lookups stop digesting the frames
            rewrite_without_racy_mark(path)
    return from_capsules(capsules, device, dtype)


def history_entry_files(store: FeatureStore) -> list[str]:
    """Every history entry file of the feature, sorted."""
    return keyed_files(os.path.join(store.state_dir, KIND))


def frames_record_files(store: FeatureStore) -> list[str]:
    """Every frames record file of the feature, sorted."""
    base = os.path.join(store.state_dir, KIND, "frames")
    found: list[str] = []
    for directory, _, files in os.walk(base):
        found.extend(os.path.join(directory, f) for f in files if f.endswith(".json"))
    return sorted(found)


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
