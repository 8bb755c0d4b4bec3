"""preprocess_images reproduces VGGT's reference loader; the uint8 form has the same geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from featstore.models.vggt import (
    plan_resize,
    preprocess_image_uint8,
    preprocess_images,
    stack_uint8_images,
    to_unit_float,
)


def _reference_loader(paths: list[Path], mode: str) -> torch.Tensor:
    """The reference algorithm, written out step by step as an independent oracle."""
    images = []
    for path in paths:
        img = Image.open(path)
        if img.mode == "RGBA":
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
        img = img.convert("RGB")
        width, height = img.size
        if mode == "pad" and height > width:
            new_height = 518
            new_width = round(width * (new_height / height) / 14) * 14
        else:
            new_width = 518
            new_height = round(height * (new_width / width) / 14) * 14
        img = img.resize((new_width, new_height), Image.Resampling.BICUBIC)
        tensor = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        if mode == "crop" and new_height > 518:
            top = (new_height - 518) // 2
            tensor = tensor[:, top : top + 518, :]
        if mode == "pad":
            h_pad, w_pad = 518 - tensor.shape[1], 518 - tensor.shape[2]
            tensor = F.pad(
                tensor, (w_pad // 2, w_pad - w_pad // 2, h_pad // 2, h_pad - h_pad // 2), value=1.0
            )
        images.append(tensor)
    max_h = max(t.shape[1] for t in images)
    max_w = max(t.shape[2] for t in images)
    padded = []
    for t in images:
        h_pad, w_pad = max_h - t.shape[1], max_w - t.shape[2]
        padded.append(F.pad(t, (w_pad // 2, w_pad - w_pad // 2, h_pad // 2, h_pad - h_pad // 2), value=1.0))
    return torch.stack(padded)


def _save(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    width, height = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    if mode == "RGBA":
        data[: height // 2, :, 3] = 0  # transparent top half
    image = Image.fromarray(data[..., 0] if mode == "L" else data, mode=mode)
    image.save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    return {
        "landscape": _save(tmp_path / "landscape.png", (640, 480)),
        "portrait": _save(tmp_path / "portrait.png", (480, 640), seed=1),
        "rgba": _save(tmp_path / "rgba.png", (300, 200), "RGBA", seed=2),
        "gray": _save(tmp_path / "gray.png", (200, 300), "L", seed=3),
        "square": _save(tmp_path / "square.jpg", (518, 518), seed=4),
    }


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize(
    "names",
    [["landscape"], ["portrait"], ["rgba"], ["gray"], ["square"], ["landscape", "portrait", "rgba", "gray"]],
)
def test_matches_the_reference_loader(images: dict[str, Path], mode: str, names: list[str]) -> None:
    paths = [images[name] for name in names]
    expected = _reference_loader(paths, mode)
    actual = preprocess_images(paths, mode)
    assert actual.dtype == torch.float32
    assert torch.equal(actual, expected)


def test_shapes(images: dict[str, Path]) -> None:
    assert preprocess_images([images["landscape"]], "crop").shape == (1, 3, 392, 518)
    assert preprocess_images([images["portrait"]], "crop").shape == (1, 3, 518, 518)
    assert preprocess_images([images["portrait"]], "pad").shape == (1, 3, 518, 518)
    # Mixed shapes in crop mode are padded to the largest height and width.
    assert preprocess_images([images["landscape"], images["portrait"]], "crop").shape == (2, 3, 518, 518)
    assert preprocess_images(images["landscape"]).shape == (1, 3, 392, 518)  # one path, not a list


def test_values_are_in_unit_range_and_not_normalized(images: dict[str, Path]) -> None:
    batch = preprocess_images(list(images.values()), "pad")
    assert batch.min() >= 0 and batch.max() <= 1
    assert batch.max() == 1.0  # white padding


def test_transparent_pixels_become_white(images: dict[str, Path]) -> None:
    batch = preprocess_images([images["rgba"]], "crop")
    assert batch.shape == (1, 3, 350, 518)
    assert torch.all(batch[0, :, :150] == 1.0)


def test_pad_mode_centers_the_image_on_white(images: dict[str, Path]) -> None:
    plan = plan_resize(640, 480, "pad")
    assert (plan.resize_width, plan.resize_height) == (518, 392)
    assert (plan.pad_top, plan.pad_bottom, plan.pad_left, plan.pad_right) == (63, 63, 0, 0)
    batch = preprocess_images([images["landscape"]], "pad")
    assert torch.all(batch[0, :, :63] == 1.0) and torch.all(batch[0, :, -63:] == 1.0)


def test_rounding_is_pythons_half_to_even() -> None:
    # 35 * (518 / 518) / 14 = 2.5 rounds to 2 (not 3), as Python's round does in the reference.
    assert plan_resize(518, 35, "crop").resize_height == 28
    assert plan_resize(518, 21, "crop").resize_height == 28  # 1.5 -> 2
    for width, height in [(1920, 1080), (1080, 1920), (333, 777), (777, 333)]:
        for mode in ("crop", "pad"):
            plan = plan_resize(width, height, mode)
            assert plan.resize_width % 14 == 0 and plan.resize_height % 14 == 0
            assert plan.output_size[0] <= 518 and plan.output_size[1] <= 518
            assert plan.output_size[0] % 14 == 0 and plan.output_size[1] % 14 == 0


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_uint8_variant_has_the_same_geometry(images: dict[str, Path], mode: str) -> None:
    for path in images.values():
        pixels = preprocess_image_uint8(path, mode)
        assert pixels.dtype == torch.uint8 and pixels.dim() == 3 and pixels.shape[0] == 3
        assert torch.equal(to_unit_float(pixels)[None], preprocess_images([path], mode))
    stacked = stack_uint8_images([preprocess_image_uint8(p, mode) for p in images.values()])
    assert torch.equal(to_unit_float(stacked), preprocess_images(list(images.values()), mode))


def test_pil_images_are_accepted(images: dict[str, Path]) -> None:
    with Image.open(images["landscape"]) as image:
        assert torch.equal(preprocess_images([image.copy()]), preprocess_images([images["landscape"]]))


def test_bad_inputs(images: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one image"):
        preprocess_images([])
    with pytest.raises(ValueError, match="'stretch'"):
        preprocess_images([images["square"]], "stretch")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        preprocess_images([tmp_path / "missing.png"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(UnidentifiedImageError, match=str(broken)):
        preprocess_image_uint8(broken)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(images["landscape"].read_bytes()[:2000])
    with pytest.raises(OSError, match=str(truncated)):
        preprocess_images([truncated])
    with pytest.raises(ValueError, match="too elongated"):
        plan_resize(10000, 5, "crop")
