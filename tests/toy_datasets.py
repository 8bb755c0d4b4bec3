"""Picklable pieces of CachedDataset tests (DataLoader workers under spawn import this module;
it must not import conftest, which a spawned worker may resolve to another directory's)."""

from __future__ import annotations

import os

import torch
from toy_encoders import MeanColor


class Images:
    """A base dataset of image paths (what a training script's dataset returns, minus the image)."""

    def __init__(self, root: str, rels: list[str]) -> None:
        self.root, self.rels = root, rels

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i: int) -> dict:
        return {"path": os.path.join(self.root, self.rels[i]), "index": i}


def source_of(sample: dict) -> str:
    return sample["path"]


class Logged(MeanColor):
    """MeanColor that appends a line per item it decodes for encoding (``pid path``) and per batch
    it encodes (``pid batch N``) to a log: encoder work counted across processes."""

    def __init__(self, log: str) -> None:
        super().__init__()
        self.log = log

    def preprocess(self, path: str) -> torch.Tensor:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {path}\n")
        return super().preprocess(path)

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} batch {batch.shape[0]}\n")
        return super().encode(batch)


class LoggedFactory:
    """A zero-argument encoder factory that logs each construction (``pid built``)."""

    def __init__(self, log: str) -> None:
        self.log = log

    def __call__(self) -> Logged:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} built\n")
        return Logged(self.log)


class Histories:
    """A base dataset whose samples are histories: ``{"frames": [absolute paths], "index": i}``."""

    def __init__(self, root: str, lists: list[list[str]]) -> None:
        self.root, self.lists = root, lists

    def __len__(self) -> int:
        return len(self.lists)

    def __getitem__(self, i: int) -> dict:
        return {"frames": [os.path.join(self.root, f) for f in self.lists[i]], "index": i}


def frames_of(sample: dict) -> list[str]:
    return sample["frames"]


class CausalFactory:
    """A zero-argument factory of a logging :class:`toy_encoders.CausalMean` (picklable)."""

    def __init__(self, log: str) -> None:
        self.log = log

    def __call__(self):
        from toy_encoders import CausalMean

        return CausalMean(self.log)
