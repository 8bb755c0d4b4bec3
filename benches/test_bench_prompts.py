"""Prompt embeddings: precomputed once with PipelineEncoder and read per batch, against encoding
every batch's prompts at every training step (what a loop with a frozen text encoder does).

A tiny random Qwen-Image pipeline on the CPU (featstore.examples.pipelines), N captioned images
(N=16 by default, 128 with ``FEATSTORE_BENCH_FULL=1``), batches of 8:

- featstore: one precompute (``PipelineEncoder(dir, "prompt")``: every caption through the
  pipeline's own ``encode_prompt``), then each epoch reads the unpadded entries through
  ``CachedDataset(...).loader()``, which pads each batch with its mask;
- the alternative: each epoch calls ``pipe.encode_prompt`` on every batch's captions.

Printed: seconds per epoch of both, their ratio, the precompute's cost, and the epoch after
which the cache has paid for itself. A real Qwen2.5-VL-7B costs thousands of times the tiny
model per prompt, while a cached read does not depend on the encoder's size: the ratio here is a
lower bound.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import record

import featstore
from featstore.encoders import PipelineEncoder
from featstore.examples import make_captioned

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from featstore.examples.pipelines import save_pipeline  # noqa: E402

BATCH = 8
EPOCH: dict[str, float] = {}


@pytest.fixture(scope="session")
def captioned(tmp_path_factory, full):
    base = tmp_path_factory.mktemp("prompts")
    root = str(base / "data")
    rels = make_captioned(root, 128 if full else 16)
    pipeline = save_pipeline("qwen_image", str(base / "qwen-image"))
    return root, rels, pipeline


def _captions(root: str, rels: list[str]) -> list[str]:
    out = []
    for rel in rels:
        with open(os.path.join(root, os.path.splitext(rel)[0] + ".txt")) as f:
            out.append(f.read().strip())
    return out


def test_prompt_cache_read_per_epoch(benchmark, captioned):
    root, rels, pipeline = captioned
    t0 = time.perf_counter()
    s = featstore.precompute(root, encoder=PipelineEncoder(pipeline, "prompt"), num_workers=0, progress=False)
    EPOCH["precompute"] = time.perf_counter() - t0
    assert s["written"] == len(rels)
    samples = [{"image": r} for r in rels]
    ds = featstore.CachedDataset(samples, featstore.FeatureStore(root, "prompt_embed"), path_fn=lambda x: x["image"],
                                 log_start=False)
    assert ds.pad == ("prompt_embed", "prompt_embeds_mask")
    runs: list[float] = []

    def epoch():
        t = time.perf_counter()
        for batch in ds.loader(batch_size=BATCH, prefetch=0):
            assert batch["cached"].all() and batch["prompt_embed"].dim() == 3
        runs.append(time.perf_counter() - t)

    benchmark.pedantic(epoch, rounds=5, warmup_rounds=1)
    EPOCH["featstore"] = min(runs)
    record(benchmark, f"prompt embeddings, epoch of {len(rels)} (per sample)", "featstore: read padded batches",
           len(rels))


def test_prompt_encode_every_step(benchmark, captioned):
    from diffusers import DiffusionPipeline

    root, rels, pipeline = captioned
    pipe = DiffusionPipeline.from_pretrained(pipeline, local_files_only=True, transformer=None, vae=None)
    captions = _captions(root, rels)
    runs: list[float] = []

    def epoch():
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(captions), BATCH):
                embeds, _ = pipe.encode_prompt(captions[i:i + BATCH], device=torch.device("cpu"),
                                               max_sequence_length=512)
                assert embeds.dim() == 3
        runs.append(time.perf_counter() - t)

    benchmark.pedantic(epoch, rounds=5, warmup_rounds=1)
    EPOCH["encode"] = min(runs)
    record(benchmark, f"prompt embeddings, epoch of {len(rels)} (per sample)", "encode_prompt at every step",
           len(rels))
    if "featstore" in EPOCH:
        read, encode, once = EPOCH["featstore"], EPOCH["encode"], EPOCH["precompute"]
        paid = once / (encode - read) if encode > read else float("inf")
        print(f"\nprompt embeddings, {len(rels)} captions, batches of {BATCH}, tiny Qwen-Image on the CPU: "
              f"reading an epoch from the cache {read * 1e3:.1f} ms, encoding it {encode * 1e3:.1f} ms "
              f"({encode / read:.1f}x); precompute once {once:.2f} s (paid back after {paid:.1f} epochs)")
