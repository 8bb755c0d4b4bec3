"""Inference helpers: autocast choice, float32 heads, uint8 input, aggregator-only extraction."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from featstore.models.vggt import aggregator_autocast, autocast_dtype, extract_layers, run_vggt


def test_no_autocast_off_cuda() -> None:
    assert autocast_dtype("cpu") is None
    with aggregator_autocast("cpu") as dtype:
        assert dtype is None and not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="amp dtype"):
        with aggregator_autocast("cpu", "bf16"):  # type: ignore[arg-type]
            pass


def test_run_vggt_equals_the_forward(make_tiny_vggt: Callable, tiny_images: torch.Tensor) -> None:
    model = make_tiny_vggt()
    with torch.no_grad():
        expected = model(tiny_images)
    actual = run_vggt(model, tiny_images[0], frames_chunk_size=1)
    assert not actual["depth"].requires_grad and actual["depth"].is_inference()
    torch.testing.assert_close(actual["depth"], expected["depth"])
    torch.testing.assert_close(actual["pose_enc"], expected["pose_enc"])


def test_heads_run_in_float32_under_autocast(make_tiny_vggt: Callable, tiny_images: torch.Tensor) -> None:
    model = make_tiny_vggt()
    predictions = run_vggt(model, tiny_images, amp_dtype=torch.bfloat16)
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        assert predictions[key].dtype == torch.float32, key


def test_extract_layers_stops_early_and_accepts_uint8(make_tiny_vggt: Callable) -> None:
    model = make_tiny_vggt()
    pixels = torch.randint(0, 256, (2, 3, 28, 42), dtype=torch.uint8)
    view = extract_layers(model, pixels, [-4])
    with torch.no_grad():
        full, _ = model.aggregator(pixels.float().div(255)[None])
    assert view.layers == (2,)
    assert torch.equal(view[2], full[2])
    assert model.aggregator.selected_layer_idx is None
    with pytest.raises(ValueError, match="selection"):
        extract_layers(model.aggregator, pixels, None)
