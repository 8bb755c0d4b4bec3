"""The scale benchmark's data and encoder: many tiny sources and an encoder that costs nothing, so
that only featstore's own costs show (benches/test_bench_scale.py)."""

from __future__ import annotations

import os

import torch

SOURCE_BYTES = 64
PER_DIR = 1000


class Trivial:
    """Reads a source's first 48 bytes as a [3, 4, 4] image and returns them as floats: no
    decoding, no model."""

    name = "trivial"

    def fingerprint(self) -> str:
        return "trivial-bench-v1"

    def preprocess(self, path: str) -> torch.Tensor:
        with open(path, "rb") as f:
            return torch.frombuffer(bytearray(f.read(48)), dtype=torch.uint8).view(3, 4, 4)

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": batch.float()}


class TrivialCaptions:
    """Embeds each source's caption from ``captions.jsonl`` (its length and first byte), with
    the per-line inputs ``JsonlField`` records, as the text encoders do: no model."""

    name = "caption"

    def __init__(self, root: str) -> None:
        from featstore.encoders.diffusion import JsonlField

        self.captions = JsonlField(root, "prompt")

    def fingerprint(self) -> str:
        return "trivial-captions-bench-v1"

    def preprocess(self, path: str) -> str:
        return self.captions[path]

    def inputs(self, rel: str, path: str) -> dict:
        return self.captions.listing_inputs(path, "caption")

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_items(self, items: list[str]) -> dict[str, torch.Tensor]:
        return {"features": torch.tensor([[len(t), ord(t[0])] for t in items], dtype=torch.float32)}


def write_captions(root: str, rels: list[str], edited: int | None = None) -> str:
    """Writes ``captions.jsonl`` at the root, one line per source (line ``edited`` with another
    caption); returns its path."""
    path = os.path.join(root, "captions.jsonl")
    with open(path, "w") as f:
        for i, rel in enumerate(rels):
            caption = "an edited caption" if i == edited else f"caption {i}"
            f.write(f'{{"image": "{rel}", "prompt": "{caption}"}}\n')
    return path


def build_tree(root: str, n: int) -> list[str]:
    """Writes ``n`` sources of 64 distinct bytes, 1,000 per directory; returns their relative
    paths, sorted."""
    rels = []
    for i in range(n):
        d = f"ep{i // PER_DIR:05d}"
        if i % PER_DIR == 0:
            os.makedirs(os.path.join(root, d), exist_ok=True)
        rel = f"{d}/{i % PER_DIR:04d}.jpg"
        with open(os.path.join(root, rel), "wb") as f:
            f.write(i.to_bytes(8, "little") * (SOURCE_BYTES // 8))
        rels.append(rel)
    return rels


def file_writes_per_second(base: str, n: int, size: int = 960) -> float:
    """The disk's floor for writing ``n`` entries: files of ``size`` bytes (a trivial entry's),
    each written to a temporary name and renamed, as entries are, from one Python thread, into
    a fresh tree under ``base`` laid out as the sources are (1,000 per directory). The files
    are left for the caller to remove later: removing many files just before other files are
    created slows ext4's inode allocation for minutes (it skips recently freed inodes)."""
    import time

    payload = b"\0" * size
    t0 = time.perf_counter()
    for i in range(n):
        d = os.path.join(base, f"ep{i // PER_DIR:05d}")
        if i % PER_DIR == 0:
            os.makedirs(d, exist_ok=True)
        name = os.path.join(d, f"{i % PER_DIR:04d}.bin")
        with open(name + ".tmp", "wb") as f:
            f.write(payload)
        os.rename(name + ".tmp", name)
    return n / (time.perf_counter() - t0)
