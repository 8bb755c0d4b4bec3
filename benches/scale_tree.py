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
