"""Work items: what precompute plans, decodes, encodes and writes as one entry.

A work item is one source (kind ``"image"``: the entry is the source's own) or an ordered list of
sources encoded together (kind ``"set"``: one entry for the whole frame set, see
:mod:`featstore.sets`). Each stage looks up what a kind means to it in a table of its own
(planning: how states are judged; decoding: how members become one tensor; writing: which entry
is written and what the journal records), so a new kind (``"history"``: the last frame's features
given the whole list, DESIGN.md "History entries") is a row in each table, not a branch in a loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from featstore.encoders import Capabilities
from featstore.sets import group_frames

Kind = Literal["image", "set"]

# What a progress bar counts for each kind.
_UNITS: dict[str, str] = {"image": "img", "set": "set"}

# What reports call the items of each kind (plural).
_NOUNS: dict[str, str] = {"image": "images", "set": "sets"}

# Kinds whose entries the manifest's per-source index holds (one source, one entry); a set's
# entry is keyed by all its members and documented by its journal line only.
_INDEXED: frozenset[str] = frozenset({"image"})


@dataclass(frozen=True)
class WorkItem:
    """One unit of precompute work: the sources (relative paths, in order) of one entry.

    Attributes
    ----------
    kind : {"image", "set"}
        What entry the sources make (see the module's docstring).
    paths : tuple of str
        The sources: one for an image, the ordered members of a frame set.
    """

    kind: Kind
    paths: tuple[str, ...]

    @classmethod
    def image(cls, rel: str) -> WorkItem:
        """The work item of one source encoded alone."""
        return cls("image", (rel,))

    @classmethod
    def frame_set(cls, members: Sequence[str]) -> WorkItem:
        """The work item of an ordered set of sources encoded together."""
        return cls("set", tuple(members))

    @property
    def name(self) -> str:
        """The item in messages, the journal and the manifest's failures: its source, or its
        members joined by '+'."""
        return "+".join(self.paths)

    @property
    def unit(self) -> str:
        """What a progress bar counts: ``"img"`` or ``"set"``."""
        return _UNITS[self.kind]

    @property
    def indexed(self) -> bool:
        """Whether the manifest's per-source index holds this item's entry (under ``paths[0]``)."""
        return self.kind in _INDEXED


def kind_for(caps: Capabilities) -> Kind:
    """The kind of work item an encoder with these capabilities takes."""
    return "image" if caps.frames_per_set == 1 else "set"


def noun(kind: Kind) -> str:
    """What reports call items of a kind: ``"images"`` or ``"sets"``."""
    return _NOUNS[kind]


def frame_sets(jsonl_sets: Sequence[Sequence[str]], paths: Sequence[str], frames: int) -> list[tuple[str, ...]]:
    """Work items of ``--frames-per-set N``: :func:`featstore.sets.group_frames` (each ``.jsonl``
    list, else each directory's sorted images, cut into consecutive chunks of up to N frames)."""
    return group_frames(jsonl_sets, paths, frames)


def work_items(paths: Sequence[str], jsonl_sets: Sequence[Sequence[str]], caps: Capabilities) -> list[WorkItem]:
    """Every work item of a scan (its sorted ``paths`` and ``.jsonl`` lists) for an encoder with
    these capabilities, in order."""
    if kind_for(caps) == "image":
        return [WorkItem.image(p) for p in paths]
    return [WorkItem.frame_set(members) for members in frame_sets(jsonl_sets, paths, caps.frames_per_set)]
