"""Precompute throughput: featstore's pipeline against the naive loop it replaces.

The naive loop (what the old scripts did): for each image, PIL load and resize, encode one image,
``torch.save`` a sidecar. featstore: decoding in a DataLoader worker, batches, a background
writer. The encoder is a cheap conv net sized so that decoding and resizing take about three
quarters of the naive loop, as with the users' real encoders on GPUs; on 2 cores the gain comes
from overlap. Target: >= 1.5x. Each stage's share of time is printed.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import RESULTS, record

from featstore.encoders import ModuleEncoder
from featstore.examples import make_image_tree
from featstore.pipeline import precompute


class CheapEncoder(torch.nn.Module):
    """Patchify at 14 px like VGGT, then a few pointwise layers: a few ms per 518x518 image."""

    def __init__(self, width: int = 96) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch = torch.nn.Conv2d(3, width, 14, stride=14)
        self.mlp = torch.nn.Sequential(torch.nn.Conv2d(width, width, 1), torch.nn.GELU(), torch.nn.Conv2d(width, 64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.patch(x)).flatten(2).transpose(1, 2)  # [B, P, 64]


@pytest.fixture(scope="session")
def images(tmp_path_factory, full):
    n = 200 if full else 12
    root = str(tmp_path_factory.mktemp("precompute") / "data")
    return root, make_image_tree(root, n, target_bytes=300_000 if full else 30_000, png_every=0)


def naive_loop(root: str, rels: list[str], enc: ModuleEncoder) -> dict[str, float]:
    stages = {"decode+resize": 0.0, "encode": 0.0, "save": 0.0}
    for rel in rels:
        path = os.path.join(root, rel)
        t0 = time.perf_counter()
        image = enc.preprocess(path).float().div_(255)  # PIL decode + bicubic resize (VGGT "crop")
        t1 = time.perf_counter()
        with torch.inference_mode():
            features = enc.encode(image[None])["features"][0]
        t2 = time.perf_counter()
        torch.save({"features": features, "path": path}, path + ".naive_cache.pt")
        stages["save"] += time.perf_counter() - t2
        stages["encode"] += t2 - t1
        stages["decode+resize"] += t1 - t0
    return stages


def _shares(stages: dict[str, float]) -> str:
    total = sum(stages.values()) or 1.0
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in stages.items())


def test_precompute_featstore_pipeline(benchmark, images):
    root, rels = images
    enc = ModuleEncoder(CheapEncoder(), name="cheap")
    summaries = []

    def go():
        summaries.append(precompute(root, encoder=enc, overwrite=True, batch_size=8, progress=False, device="cpu"))

    benchmark.pedantic(go, rounds=3, warmup_rounds=1)
    assert summaries[-1]["written"] == len(rels)
    record(benchmark, "precompute (per image)", "featstore precompute (workers, batches, writer)", len(rels))
    if RESULTS.get("precompute (per image)"):
        stages = summaries[-1]["stage_seconds"]
        print(f"\nfeatstore stages (main process, overlapping the worker): {_shares(stages)}")


def test_precompute_naive_loop(benchmark, images):
    root, rels = images
    enc = ModuleEncoder(CheapEncoder(), name="cheap")
    stages = []
    benchmark.pedantic(lambda: stages.append(naive_loop(root, rels, enc)), rounds=3, warmup_rounds=1)
    record(benchmark, "precompute (per image)", "naive loop (load, resize, encode, torch.save)", len(rels))
    if RESULTS.get("precompute (per image)"):
        print(f"\nnaive loop stages: {_shares(stages[-1])}")
