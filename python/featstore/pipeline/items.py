"""Work items: what precompute plans, decodes, encodes and writes together.

A work item is one source (kind ``"image"``: the entry is the source's own), an ordered list of
sources encoded together (kind ``"set"``: one entry for the whole frame set, see
:mod:`featstore.sets`), or the longest of some samples' histories (kind ``"history"``: one causal
pass over the list writes an entry for every prefix a sample names, the last frame's features
given the prefix; docs/design.md "History entries"). Each stage looks up what a kind means to it in a
table of its own (planning: how states are judged; decoding: how members become one tensor;
writing: which entries are written and what the journal records), so a kind is a row in each
table, not a branch in a loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from featstore.encoders import Capabilities
from featstore.history import longest_lists
from featstore.sets import group_frames

Kind = Literal["image", "set", "history"]

# What a progress bar counts for each kind: entries written (a history item writes several).
_UNITS: dict[str, str] = {"image": "img", "set": "set", "history": "sample"}

# What reports call the entries of each kind (plural).
_NOUNS: dict[str, str] = {"image": "images", "set": "sets", "history": "samples"}

# Kinds whose entries the manifest's per-source index holds (one source, one entry); a set's
# entry is keyed by all its members and documented by its journal line only.
_INDEXED: frozenset[str] = frozenset({"image"})


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One unit of precompute work: the sources (relative paths, in order) encoded together.

    Attributes
    ----------
    kind : {"image", "set", "history"}
        What entries the sources make (see the module's docstring).
    paths : tuple of str
        The sources: one for an image, the ordered members of a frame set, a history's frames
        (oldest first) up to its longest prefix written.
    lengths : tuple of int
        History only: the prefix lengths (ascending, 1..len(paths)) whose entries are written,
        each a sample's whole history; empty for the other kinds.
    """

    kind: Kind
    paths: tuple[str, ...]
    lengths: tuple[int, ...] = ()

    @classmethod
    def image(cls, rel: str) -> WorkItem:
        """The work item of one source encoded alone."""
        return cls("image", (rel,))

    @classmethod
    def frame_set(cls, members: Sequence[str]) -> WorkItem:
        """The work item of an ordered set of sources encoded together."""
        return cls("set", tuple(members))

    @classmethod
    def history(cls, frames: Sequence[str], lengths: Sequence[int]) -> WorkItem:
        """The work item of a history streamed once: ``frames`` oldest first, and the prefix
        lengths whose entries it writes (the list is cut after the longest)."""
        wanted = tuple(sorted(set(int(n) for n in lengths)))
        if not wanted or wanted[0] < 1 or wanted[-1] > len(frames):
            raise ValueError(f"prefix lengths must be in 1..{len(frames)}, got {list(lengths)}")
        return cls("history", tuple(frames[:wanted[-1]]), wanted)

    @property
    def name(self) -> str:
        """The item in messages, the journal and the manifest's failures: its source, or its
        members joined by '+' (a long history by its first and last frame)."""
        if self.kind == "history" and len(self.paths) > 3:
            return f"{self.paths[0]}+...+{self.paths[-1]} ({len(self.paths)} frames)"
        return "+".join(self.paths)

    @property
    def unit(self) -> str:
        """What a progress bar counts: ``"img"``, ``"set"`` or ``"sample"``."""
        return _UNITS[self.kind]

    @property
    def entries(self) -> int:
        """Entries the item writes: one, or one per prefix length of a history."""
        return len(self.lengths) if self.kind == "history" else 1

    def prefix(self, length: int) -> tuple[str, ...]:
        """The frames of the history prefix of ``length`` (a sample's whole history)."""
        return self.paths[:length]

    def needing(self, flags: Sequence[bool]) -> WorkItem | None:
        """The item reduced to the entries that ``flags`` (one per entry, in order) mark as
        needing work, or None when none does. A history keeps the frames up to its longest
        such prefix: a prefix's features never depend on later frames."""
        if len(flags) != self.entries:
            raise ValueError(f"{len(flags)} flags for the {self.entries} entries of {self.name}")
        if self.kind != "history":
            return self if flags[0] else None
        lengths = [n for n, f in zip(self.lengths, flags, strict=True) if f]
        return WorkItem.history(self.paths, lengths) if lengths else None

    @property
    def indexed(self) -> bool:
        """Whether the manifest's per-source index holds this item's entry (under ``paths[0]``)."""
        return self.kind in _INDEXED


def kind_for(caps: Capabilities) -> Kind:
    """The kind of work item an encoder with these capabilities takes."""
    if caps.history:
        return "history"
    return "image" if caps.frames_per_set == 1 else "set"


def noun(kind: Kind) -> str:
    """What reports call the entries of a kind: ``"images"``, ``"sets"`` or ``"samples"``."""
    return _NOUNS[kind]


def histories(lists: Sequence[Sequence[str]]) -> list[WorkItem]:
    """The work items of history mode: one per list that no other list extends, writing the
    entries of every distinct list that is a prefix of it (itself included); see
    :func:`featstore.history.longest_lists`."""
    return [WorkItem.history(frames, lengths) for frames, lengths in longest_lists(lists).items()]


def frame_sets(jsonl_sets: Sequence[Sequence[str]], paths: Sequence[str], frames: int) -> list[tuple[str, ...]]:
    """Work items of ``--frames-per-set N``: :func:`featstore.sets.group_frames` (each ``.jsonl``
    list, else each directory's sorted images, cut into consecutive chunks of up to N frames)."""
    return group_frames(jsonl_sets, paths, frames)


def work_items(paths: Sequence[str], jsonl_sets: Sequence[Sequence[str]], caps: Capabilities) -> list[WorkItem]:
    """Every work item of a scan (its sorted ``paths`` and ``.jsonl`` lists) for an encoder with
    these capabilities, in order."""
    kind = kind_for(caps)
    if kind == "history":
        return histories(jsonl_sets)
    if kind == "image":
        return [WorkItem.image(p) for p in paths]
    return [WorkItem.frame_set(members) for members in frame_sets(jsonl_sets, paths, caps.frames_per_set)]
