"""History entries under the maintenance commands (status, verify, gc): every history entry file
judged from the frames it records, and the histories the samples name counted by their entries'
states.

Which histories the samples name: the lists of the ``.jsonl`` field the feature's manifest records
with its history mode (``precompute --jsonl FIELD --history``), one per distinct list. Where that
is unknown (the manifest records the mode without a field, or records no mode while the feature
has history entry files and no per-image entry), each history entry file is counted by its verdict.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Sequence

from featstore.history import (
    HistoryJudge,
    HistoryVerdict,
    history_entry_files,
    history_entry_path,
    history_key_path,
    history_keys,
    history_state,
    judge_history_entry,
    longest_lists,
    recorded_history,
)
from featstore.ops.files import Identity, judge_files
from featstore.scan import scan
from featstore.store import FeatureStore

#: A history: its frames, oldest first, relative to the data root.
Frames = tuple[str, ...]


def judge_histories(store: FeatureStore, *, deep: bool, threads: int | None,
                    identities: dict[str, Identity | None] | None = None
                    ) -> tuple[list[HistoryVerdict], list[tuple[str, str]]]:
    """Every history entry file of the feature judged (in parallel), and those that could not be
    read; ``identities`` receives the identity of each file judged (None: it changed meanwhile).
    ``deep`` digests every frame whatever its stamp (verify)."""
    judge = HistoryJudge(store, deep=deep)  # each episode's frames looked at once, not once per entry
    return judge_files(history_entry_files(store), lambda p: judge_history_file(store, p, deep=deep, judge=judge),
                       threads=threads, identities=identities)


def judge_history_file(store: FeatureStore, path: str, *, deep: bool = False,
                       judge: HistoryJudge | None = None) -> HistoryVerdict:
    """:func:`featstore.history.judge_history_entry`, plus where the file is filed: a valid entry
    not at its frames' current key (a frame touched: same bytes, new stamp) is superseded
    (``stale``) when the current key has an entry, else valid but unreachable by lookups (its
    ``reason`` says so; gc keeps it)."""
    judge = judge or HistoryJudge(store, deep=deep)
    verdict = judge_history_entry(store, path, deep=deep, judge=judge)
    if verdict.state != "valid":
        return verdict
    try:
        current = judge.entry_now(verdict)
    except FileNotFoundError as exc:  # gone since the look
        return HistoryVerdict(path, verdict.members, "orphan", f"its frame {exc.filename} no longer exists")
    if os.path.normpath(current) == os.path.normpath(path):
        return verdict
    if os.path.lexists(current):
        return HistoryVerdict(path, verdict.members, "stale", f"superseded: the history's current entry is {current}")
    return HistoryVerdict(path, verdict.members, "valid", "filed under older stamps of its frames (same bytes); a "
                          "precompute or a lazy miss computes it again under the current ones")


def history_states(store: FeatureStore, histories: Sequence[Frames], verdicts: Sequence[HistoryVerdict]
                   ) -> list[str]:
    """The state of each history: its current entry's verdict, else ``stale`` when an older entry
    of the same frames is stale (a frame edited), else ``missing``."""
    by_path = {os.path.normpath(v.path): v for v in verdicts}
    by_frames: dict[Frames, list[HistoryVerdict]] = defaultdict(list)
    for v in verdicts:
        by_frames[v.members].append(v)
    entry_of = _entry_paths(store, histories)
    states = []
    for frames in histories:
        current = by_path.get(entry_of[frames]) if frames in entry_of else None
        if current is not None and current.state == "corrupt" and current.record:
            # Its frames record is gone: the file alone cannot name its frames, but these frames
            # are known, and their chains decide as a lookup does.
            states.append(history_state(store, frames))
        elif current is not None:
            # A file at this key recording other frames (a collision, a hand-made file) is never theirs.
            states.append("stale" if current.state == "valid" and current.members != frames else current.state)
        elif any(v.state == "stale" for v in by_frames.get(frames, ())):
            states.append("stale")
        else:
            states.append("missing")
    return states


def _entry_paths(store: FeatureStore, histories: Sequence[Frames]) -> dict[Frames, str]:
    """Where the entry of each history is for its frames as they are now (normalized), from one
    ``stat`` of each frame of each longest list (an episode whose every step is a sample costs its
    frames, not the sum of its prefixes); histories with a frame gone have none."""
    paths: dict[Frames, str] = {}
    for longest, lengths in longest_lists(histories).items():
        try:
            keys = history_keys(store, longest)
        except OSError:  # a frame is gone: the prefixes before it may still have entries
            for n in lengths:
                with contextlib.suppress(OSError):
                    paths[longest[:n]] = os.path.normpath(history_entry_path(store, longest[:n]))
            continue
        for n in lengths:
            paths[longest[:n]] = os.path.normpath(history_key_path(store, keys[n - 1]))
    return paths


def counted_histories(store: FeatureStore, rels: Sequence[str], verdicts: Sequence[HistoryVerdict], *,
                      lists: Sequence[Sequence[str]] | None = None, image_entries: bool = True
                      ) -> tuple[list[str], int] | None:
    """When the feature's entries are histories (see the module): the state of each history
    counted (orphaned entries left out: the caller counts them from ``verdicts``) and how many
    distinct frames they hold; None when its entries are per image or frame sets.

    Parameters
    ----------
    rels : sequence of str
        The sources in scope: a history is counted when all its frames are among them.
    lists : sequence of sequence of str, optional
        The ``.jsonl`` lists of a scan (default: scanned with the recorded field).
    image_entries : bool
        Whether the feature has per-image entry files (then, without a recorded history mode, its
        entries are not taken to be histories).
    """
    mode = recorded_history(store)
    if mode is None and (image_entries or not verdicts):
        return None
    if mode is not None and mode.jsonl:
        if lists is None:
            lists = scan(store.data_root, jsonl=mode.jsonl, skip_dirs=[store.cache_dir] if store.cache_dir else (),
                         progress=False).sets
        in_scope = set(rels)
        histories = [h for h in dict.fromkeys(tuple(store.rel(f) for f in x) for x in lists if x)
                     if all(f in in_scope for f in h)]
        return history_states(store, histories, verdicts), len({f for h in histories for f in h})
    kept = [v for v in verdicts if v.state != "orphan"]
    return [v.state for v in kept], len({f for v in kept for f in v.members})
