"""Generated example data: image trees for the README's first command, tests and benchmarks.

Run ``python -m featstore.examples DIR [--count N]`` to make a small tree of JPEGs and PNGs.
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def make_image_tree(root: str | os.PathLike[str], count: int = 24, *, scenes: int = 3, size: int = 96,
                    target_bytes: int | None = None, seed: int = 0, png_every: int = 5) -> list[str]:
    """Writes ``count`` images under ``root/scene###/`` and returns their relative paths.

    Parameters
    ----------
    count : int
        Number of images.
    scenes : int
        Number of subdirectories the images are spread over.
    size : int
        Width and height in pixels when ``target_bytes`` is not given.
    target_bytes : int, optional
        Approximate file size: noise images of about this many bytes (JPEG quality 95 stores
        random noise in roughly 1.2 bytes per pixel).
    seed : int
        Seed of the pixel noise (same seed, same bytes).
    png_every : int
        Every n-th image is a PNG (0: JPEGs only).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    if target_bytes is not None:
        size = max(16, int((target_bytes / 1.2) ** 0.5))
    rels = []
    for i in range(count):
        scene = f"scene{i % max(scenes, 1):03d}"
        os.makedirs(os.path.join(root, scene), exist_ok=True)
        ext = "png" if png_every and i % png_every == png_every - 1 else "jpg"
        rel = f"{scene}/img_{i:05d}.{ext}"
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, rel), quality=95)
        rels.append(rel)
    return sorted(rels)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a small example image tree.")
    parser.add_argument("root")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args()
    rels = make_image_tree(args.root, args.count, size=args.size)
    print(f"wrote {len(rels)} images under {os.path.abspath(args.root)}")


if __name__ == "__main__":
    main()
