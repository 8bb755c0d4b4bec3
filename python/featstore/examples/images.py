"""Generated image trees: noise JPEGs and PNGs in scene folders, of one size or of mixed sizes."""

from __future__ import annotations

import os

import numpy as np


def make_image_tree(root: str | os.PathLike[str], count: int = 24, *, scenes: int = 3, size: int = 96,
                    target_bytes: int | None = None, seed: int = 0, png_every: int = 5,
                    mixed_sizes: bool = False) -> list[str]:
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
    mixed_sizes : bool
        Cycle through landscape, portrait and square images of about ``size`` pixels (as photos
        of a real dataset come): VGGT's "crop" preprocessing then gives them other token counts.
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
        w, h = _SHAPES[i % len(_SHAPES)](size) if mixed_sizes else (size, size)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, rel), quality=95)
        rels.append(rel)
    return sorted(rels)


# (width, height) of the mixed sizes: 4:3, 3:4, square, 16:9.
_SHAPES = (lambda s: (s, s * 3 // 4), lambda s: (s * 3 // 4, s), lambda s: (s, s), lambda s: (s, s * 9 // 16))
