"""Image loading for VGGT, identical to the reference loader (``"crop"`` and ``"pad"`` modes).

The geometry (resize size, crop, padding) is computed once, by :func:`plan_resize`; the float
loader :func:`preprocess_images` is the uint8 loader :func:`preprocess_image_uint8` followed by
:func:`to_unit_float`, so the two cannot disagree. Data-loader workers use the uint8 form (4x
smaller to pass between processes and to the GPU) and the conversion to float happens on the
device. Values end in [0, 1]: normalization belongs to the model, and doing it here as well would
normalize twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from featstore.errors import NotARegularFileError
from featstore.regular import open_regular

__all__ = [
    "ResizePlan",
    "TARGET_SIZE",
    "plan_resize",
    "preprocess_image_uint8",
    "preprocess_images",
    "stack_uint8_images",
    "to_unit_float",
]

TARGET_SIZE = 518
"""Image side VGGT was trained at, pixels."""

_MULTIPLE = 14  # VGGT's patch size: every side is rounded to a multiple of it
_WHITE = 255

PreprocessMode = Literal["crop", "pad"]
ImageSource = str | os.PathLike[str] | Image.Image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResizePlan:
    """Where one image of a given size ends up.

    Attributes
    ----------
    resize_width, resize_height : int
        Size after the bicubic resize, pixels.
    crop_top : int
        Rows dropped at the top ("crop" mode, images taller than the target after resizing).
    height, width : int
        Size after cropping, before padding.
    pad_top, pad_bottom, pad_left, pad_right : int
        White padding ("pad" mode), pixels.
    """

    resize_width: int
    resize_height: int
    crop_top: int
    height: int
    width: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int

    @property
    def output_size(self) -> tuple[int, int]:
        """Final ``(height, width)``, pixels."""
        return self.height + self.pad_top + self.pad_bottom, self.width + self.pad_left + self.pad_right


def _round_to_multiple(length: float) -> int:
    # Python's round (half to even), exactly as the reference.
    return round(length / _MULTIPLE) * _MULTIPLE


def plan_resize(
    width: int, height: int, mode: PreprocessMode = "crop", target_size: int = TARGET_SIZE
) -> ResizePlan:
    """Compute VGGT's preprocessing geometry for an image of ``width`` x ``height`` pixels.

    Parameters
    ----------
    width, height : int
        Input size, pixels.
    mode : {"crop", "pad"}
        ``"crop"``: width becomes ``target_size``, height keeps the aspect ratio rounded to a
        multiple of 14, then is center-cropped to ``target_size`` if taller. ``"pad"``: the
        longest side becomes ``target_size``, the other keeps the aspect ratio rounded to a
        multiple of 14, then the image is padded with white, centered, to a square.
    target_size : int
        Output side, pixels.

    Returns
    -------
    ResizePlan
        The resize size, crop and padding.

    Raises
    ------
    ValueError
        For an unknown mode, or an image so elongated that a side would round to zero.
    """
    if mode not in ("crop", "pad"):
        raise ValueError(f"unknown preprocessing mode {mode!r}; use 'crop' or 'pad'")
    if mode == "pad" and height > width:
        new_height = target_size
        new_width = _round_to_multiple(width * (new_height / height))
    else:
        new_width = target_size
        new_height = _round_to_multiple(height * (new_width / width))
    if new_width <= 0 or new_height <= 0:
        raise ValueError(
            f"an image of {width}x{height} pixels is too elongated: "
            f"its short side rounds to 0 at {target_size} pixels"
        )
    crop_top = 0
    out_h, out_w = new_height, new_width
    if mode == "crop" and new_height > target_size:
        crop_top = (new_height - target_size) // 2
        out_h = target_size
    pad_top = pad_bottom = pad_left = pad_right = 0
    if mode == "pad":
        pad_h, pad_w = target_size - out_h, target_size - out_w
        pad_top, pad_left = pad_h // 2, pad_w // 2
        pad_bottom, pad_right = pad_h - pad_top, pad_w - pad_left
    return ResizePlan(new_width, new_height, crop_top, out_h, out_w, pad_top, pad_bottom, pad_left, pad_right)


def _open_rgb(image: ImageSource) -> Image.Image:
    """Decode to RGB; RGBA is composited onto white first (other modes simply convert)."""
    if isinstance(image, Image.Image):
        img = image
    else:
        try:
            with open_regular(image, "image") as file, Image.open(file) as opened:
                opened.load()
                img = opened.copy() if opened.mode == "RGBA" else opened.convert("RGB")
        except (FileNotFoundError, NotARegularFileError):
            raise
        except (OSError, SyntaxError, ValueError) as exc:
            raise UnidentifiedImageError(
                f"cannot decode image {os.fspath(image)}: {exc}; check that the file is a complete image "
                "(copy it again) or leave it out"
            ) from exc
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (_WHITE, _WHITE, _WHITE, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def preprocess_image_uint8(
    image: ImageSource, mode: PreprocessMode = "crop", *, target_size: int = TARGET_SIZE
) -> torch.Tensor:
    """Load one image with VGGT's geometry, as uint8 (for data-loader workers).

    Parameters
    ----------
    image : str, PathLike, or PIL.Image.Image
        The image file (decoded with Pillow) or an already decoded image.
    mode : {"crop", "pad"}
        See :func:`plan_resize`.
    target_size : int
        Output width ("crop") or side ("pad"), pixels.

    Returns
    -------
    Tensor
        uint8 ``[3, H, W]``; ``H`` and ``W`` multiples of 14, at most ``target_size``. Convert
        with :func:`to_unit_float` (on the device) to get the model's input.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    PIL.UnidentifiedImageError
        When it cannot be decoded (the message names the file).
    """
    rgb = _open_rgb(image)
    plan = plan_resize(rgb.width, rgb.height, mode, target_size)
    resized = rgb.resize((plan.resize_width, plan.resize_height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)
    pixels = pixels[:, plan.crop_top : plan.crop_top + plan.height, :]
    if plan.pad_top or plan.pad_bottom or plan.pad_left or plan.pad_right:
        pixels = F.pad(pixels, (plan.pad_left, plan.pad_right, plan.pad_top, plan.pad_bottom), value=_WHITE)
    return pixels.contiguous()


def stack_uint8_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack ``[3, H, W]`` images, padding smaller ones with white, centered, to the largest size.

    Parameters
    ----------
    images : sequence of Tensor
        Outputs of :func:`preprocess_image_uint8` (any dtype works; padding is 255 for uint8 and
        1.0 otherwise).

    Returns
    -------
    Tensor
        ``[N, 3, H_max, W_max]``.
    """
    if not images:
        raise ValueError("at least one image is required")
    heights = {img.shape[-2] for img in images}
    widths = {img.shape[-1] for img in images}
    if len(heights) == 1 and len(widths) == 1:
        return torch.stack(list(images))
    max_h, max_w = max(heights), max(widths)
    logger.info("padding images of different sizes to %dx%d", max_h, max_w)
    padded = []
    for img in images:
        pad_h, pad_w = max_h - img.shape[-2], max_w - img.shape[-1]
        white = _WHITE if img.dtype == torch.uint8 else 1.0
        padded.append(
            F.pad(img, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=white)
        )
    return torch.stack(padded)


def to_unit_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Convert uint8 pixels to floats in [0, 1] (``x / 255``, as torchvision's ``ToTensor``).

    Parameters
    ----------
    images : Tensor
        uint8 images of any shape; other dtypes are returned cast to ``dtype`` unchanged in value.
    dtype : torch.dtype
        Floating dtype of the result.

    Returns
    -------
    Tensor
        Same shape, on the same device.
    """
    if images.dtype != torch.uint8:
        return images.to(dtype)
    return images.to(dtype).div(255)


def preprocess_images(
    paths: Sequence[ImageSource] | ImageSource,
    mode: PreprocessMode = "crop",
    *,
    target_size: int = TARGET_SIZE,
) -> torch.Tensor:
    """Load images for VGGT exactly as the reference ``load_and_preprocess_images`` does.

    Parameters
    ----------
    paths : sequence of (str, PathLike, or PIL.Image.Image), or one of them
        The images, in sequence order (the first is VGGT's reference frame).
    mode : {"crop", "pad"}
        See :func:`plan_resize`. Images that end up with different sizes (crop mode with mixed
        aspect ratios) are padded with white, centered, to the largest height and width.
    target_size : int
        Output width ("crop") or side ("pad"), pixels.

    Returns
    -------
    Tensor
        float32 ``[N, 3, H, W]`` with values in [0, 1], not normalized (the model normalizes).

    Raises
    ------
    ValueError
        For no images or an unknown mode.
    FileNotFoundError, PIL.UnidentifiedImageError
        For a missing or undecodable file.
    """
    if isinstance(paths, (str, os.PathLike, Image.Image)):
        paths = [paths]
    if len(paths) == 0:
        raise ValueError("at least one image is required")
    if mode not in ("crop", "pad"):
        raise ValueError(f"unknown preprocessing mode {mode!r}; use 'crop' or 'pad'")
    return to_unit_float(
        stack_uint8_images([preprocess_image_uint8(p, mode, target_size=target_size) for p in paths])
    )
