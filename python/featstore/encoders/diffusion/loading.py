"""What the diffusion encoders share: optional imports, local model directories, image decoding."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from featstore.errors import CheckpointError, NotARegularFileError
from featstore.regular import open_regular


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed to load this model: pip install 'featstore[{extra}]' "
                          f"({exc})") from exc


def quiet_off_terminal() -> None:
    """Turns off diffusers' and transformers' own progress bars ("Loading pipeline components")
    when stderr is not a terminal: in a log file they are lines of carriage returns."""
    from featstore.progress import on_terminal

    if on_terminal():
        return
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            import importlib

            importlib.import_module(module).disable_progress_bar()
        except (ImportError, AttributeError):
            continue


def _public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A model config without the keys that name where it was loaded from (``_name_or_path``)
    or which library version saved it: they do not change the output."""
    return {k: v for k, v in dict(config).items() if not str(k).startswith("_")}


def folder_digest(path: str) -> str:
    """Digest of every file under a small folder (a tokenizer's or processor's: vocabularies,
    merges, sentencepiece models, configs), by relative name and content."""
    from featstore import _core

    parts = []
    for d, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            full = os.path.join(d, f)
            parts.append((os.path.relpath(full, path), _core.file_digest(full)))
    return repr(sorted(parts))


def _existing_dir(path: str | os.PathLike[str], subfolder: str | None, what: str) -> str:
    root = os.path.abspath(os.fspath(path))
    where = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(where):
        state = "is not a directory" if os.path.exists(where) else "does not exist"
        raise CheckpointError(f"{what} directory {where} {state}; pass the local directory that holds its "
                              "config.json and weights (save_pretrained output), or the model itself")
    if not os.path.isfile(os.path.join(where, "config.json")):
        raise CheckpointError(f"{what} directory {where} has no config.json; pass the directory "
                              "save_pretrained wrote (with subfolder='vae' or 'text_encoder' for a pipeline)")
    return root


def load_image_uint8(path: str | os.PathLike[str], image_size: tuple[int, int] | None = None,
                     multiple: int = 8) -> torch.Tensor:
    """One image as uint8 ``[3, H, W]``, the way diffusion pipelines load it.

    The EXIF orientation is applied (phone photos), transparency is composited onto white, then
    the image is resized to cover ``image_size`` (Lanczos, aspect ratio kept) and center-cropped
    to it; without ``image_size`` it is only center-cropped to sides that are multiples of
    ``multiple``.

    Parameters
    ----------
    path : path
        The image file.
    image_size : (int, int), optional
        Output ``(width, height)`` in pixels, multiples of ``multiple``.
    multiple : int
        What the sides must be multiples of (the VAE's downsampling).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    PIL.UnidentifiedImageError
        It cannot be decoded.
    ValueError
        It is smaller than ``multiple`` pixels on a side.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with open_regular(path, "image") as file, Image.open(file) as opened:
            opened.load()
            img = ImageOps.exif_transpose(opened)
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            img = img.convert("RGB")
    except (FileNotFoundError, NotARegularFileError):
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnidentifiedImageError(f"cannot decode image {os.fspath(path)}: {exc}; check that the file is a "
                                     "complete image (copy it again) or leave it out") from exc
    w, h = img.size
    if image_size is not None:
        out_w, out_h = image_size
        scale = max(out_w / w, out_h / h)
        new_w, new_h = max(out_w, math.ceil(w * scale - 1e-6)), max(out_h, math.ceil(h * scale - 1e-6))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
        w, h = new_w, new_h
    else:
        out_w, out_h = w // multiple * multiple, h // multiple * multiple
        if out_w == 0 or out_h == 0:
            raise ValueError(f"image {os.fspath(path)} is {w}x{h} pixels, smaller than {multiple} on a side; "
                             "give image_size to resize it")
    left, top = (w - out_w) // 2, (h - out_h) // 2
    if (left, top, out_w, out_h) != (0, 0, w, h):
        img = img.crop((left, top, left + out_w, top + out_h))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
