"""Inputs edited while they are encoded: the caption (a file input) or the image itself changes
after the encoder read it and before the entry is written. No entry may then record the new
file while holding the old bytes' features, in precompute as in lazy training."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image
from toy_encoders import CaptionLength, MeanColor

from featstore import FeatureStore
from featstore.pipeline import precompute
from featstore.training import CachedDataset

IMAGES = 8


def _tree(root: str) -> list[str]:
    os.makedirs(root, exist_ok=True)
    names = []
    for i in range(IMAGES):
        name = f"{i:02d}.png"
        Image.fromarray(np.full((16, 16, 3), 25 * i, np.uint8)).save(os.path.join(root, name))
        with open(os.path.join(root, f"{i:02d}.txt"), "w") as f:
            f.write(f"caption {i}")
        names.append(name)
    return names


def _edit_caption(path: str) -> None:
    with open(os.path.splitext(path)[0] + ".txt", "a") as f:
        f.write(" edited while encoded")


class EditsImageAfterReading(MeanColor):
    """Rewrites every odd image (other pixels) right after reading it."""

    def preprocess(self, path: str) -> torch.Tensor:
        pixels = super().preprocess(path)
        if int(os.path.basename(path)[:2]) % 2:
            Image.fromarray(np.full((16, 16, 3), 255, np.uint8)).save(path)
        return pixels


def test_inputs_edited_while_encoded_never_get_an_entry(tmp_path, figures):
    fig = figures("input races: edited while encoded")
    cases = failures = 0

    def check(ok: bool) -> None:
        nonlocal cases, failures
        cases += 1
        failures += not ok

    # Captions edited after the encoder read them, in precompute: nothing stored, then the new text.
    root = str(tmp_path / "captions")
    names = _tree(root)
    first = precompute(root, encoder=CaptionLength(after_read=_edit_caption), num_workers=0, progress=False)
    check(first["written"] == 0 and first["failed"] == IMAGES)
    again = precompute(root, encoder=CaptionLength(), num_workers=0, progress=False)
    store = FeatureStore(root, "caption")
    for n in names:
        got = store.get(n)
        want = len(open(os.path.join(root, n[:2] + ".txt")).read())
        check(got is not None and got["features"][0].item() == want)
    check(again["written"] == IMAGES)

    # The same in lazy training: the computed features are used, never stored.
    root = str(tmp_path / "lazy")
    names = _tree(root)
    ds = CachedDataset([{"image": n} for n in names], FeatureStore(root, "caption"), path_fn=lambda s: s["image"],
                       mode="lazy", encoder=lambda: CaptionLength(after_read=_edit_caption))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(len(ds)):
            ds[i]
    check(all(s == "missing" for s in FeatureStore(root, "caption").states(names)))

    # Images rewritten after they were read: their features are not stored, the others are.
    root = str(tmp_path / "images")
    names = _tree(root)
    run = precompute(root, encoder=EditsImageAfterReading(), num_workers=0, progress=False)
    states = FeatureStore(root, "toy").states(names)
    check(run["written"] == IMAGES // 2 and run["failed"] == IMAGES // 2)
    check(all(s == ("missing" if int(n[:2]) % 2 else "valid") for n, s in zip(names, states, strict=True)))
    fig.add(runs=3, cases=cases, failures=failures)
    fig.note(f"{IMAGES} captions edited after the encoder read them (precompute and lazy training) and "
             f"{IMAGES // 2} images rewritten after decoding: none stored; the rerun stored each new version")
    assert failures == 0
