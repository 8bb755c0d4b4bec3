"""Generated datasets shaped like the users' own: navigation episodes whose training samples are
``.jsonl`` lines listing each step's history (JanusVLN), and captioned images with control images
(Qwen-Image-Edit style fine-tuning)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from featstore.examples.images import make_image_tree

_INSTRUCTIONS = ("walk past the sofa and stop at the door", "turn left at the table and wait by the window",
                 "go up the stairs and enter the second room")
_SUBJECTS = ("a red cat", "two dogs", "a small house", "a blue car", "an old tree", "a bird")
_PLACES = ("on the mat", "under a blue sky", "near the sea", "in a dark room", "on the street", "by the window")


def make_episodes(root: str | os.PathLike[str], episodes: int = 3, steps: int = 6, *, size: int = 64,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Writes ``episodes`` folders of ``steps`` frames each and ``root/train.jsonl``: one line per
    step of every episode, ``{"id", "instruction", "images": [frames 0..step]}`` (paths relative
    to the root, oldest first), as JanusVLN's training data lists a sample's history. Returns the
    lines as dicts."""
    root = os.fspath(root)
    samples = []
    for e in range(episodes):
        frames = [f"episode{e:03d}/{rel}" for rel in
                  make_image_tree(os.path.join(root, f"episode{e:03d}"), steps, scenes=1, size=size, seed=seed + e,
                                  png_every=0)]
        for k in range(1, steps + 1):
            samples.append({"id": f"ep{e:03d}_step{k:03d}", "instruction": _INSTRUCTIONS[e % len(_INSTRUCTIONS)],
                            "images": frames[:k]})
    with open(os.path.join(root, "train.jsonl"), "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample) + "\n")
    return samples


def make_captioned(root: str | os.PathLike[str], count: int = 6, *, control_root: str | os.PathLike[str] | None = None,
                   jsonl: bool = False, size: int = 64, seed: int = 0) -> list[str]:
    """Writes ``count`` images of mixed sizes under ``root`` with a caption each: ``img.txt``
    beside ``img.jpg``, or with ``jsonl`` one ``root/metadata.jsonl`` line per image (``{"image",
    "prompt"}``, plus ``"control"`` with ``control_root``). With ``control_root``, a control image
    of another size at the same relative path there. Returns the images' relative paths."""
    root = os.fspath(root)
    rels = make_image_tree(root, count, size=size, seed=seed, png_every=0, mixed_sizes=True)
    rng = np.random.default_rng(seed + 1)
    lines = []
    for i, rel in enumerate(rels):
        caption = f"{_SUBJECTS[i % len(_SUBJECTS)]} {_PLACES[(i * 5 + 1) % len(_PLACES)]}"
        line: dict[str, Any] = {"image": rel, "prompt": caption}
        if control_root is not None:
            from PIL import Image

            control = os.path.join(os.fspath(control_root), rel)
            os.makedirs(os.path.dirname(control), exist_ok=True)
            side = size // 2 + 8 * (i % 3)
            Image.fromarray(rng.integers(0, 256, (side, size, 3), dtype=np.uint8)).save(control, quality=95)
            line["control"] = os.path.abspath(control)
        if jsonl:
            lines.append(line)
        else:
            with open(os.path.join(root, os.path.splitext(rel)[0] + ".txt"), "w", encoding="utf-8") as f:
                f.write(caption + "\n")
    if jsonl:
        with open(os.path.join(root, "metadata.jsonl"), "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    return rels
