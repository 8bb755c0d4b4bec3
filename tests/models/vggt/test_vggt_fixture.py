"""Numerical equivalence with the reference implementation on the tiny conv fixture (float32, CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from featstore.models.vggt import VGGT, Aggregator, CameraHead, DPTHead, LayerSelectView

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def reference_outputs(
    reference_case: dict[str, Any], reference_weights: Callable[[str], dict]
) -> dict[str, Any]:
    config = reference_case["config"]
    aggregator = Aggregator(**config["aggregator"])
    dim_in = 2 * config["aggregator"]["embed_dim"]
    camera_head = CameraHead(dim_in=dim_in, **config["camera_head"])
    depth_head = DPTHead(dim_in=dim_in, **config["depth_head"])
    for name, module in (
        ("aggregator", aggregator),
        ("camera_head", camera_head),
        ("depth_head", depth_head),
    ):
        module.load_state_dict(reference_weights(name), strict=True)
        module.eval()
    images = reference_case["tensors"]["inputs.images"]
    with torch.no_grad():
        tokens, patch_start_idx = aggregator(images)
        poses = camera_head(tokens)
        depth, depth_conf = depth_head(tokens, images, patch_start_idx)
    return {
        "aggregator": aggregator,
        "camera_head": camera_head,
        "depth_head": depth_head,
        "images": images,
        "tokens": tokens,
        "patch_start_idx": patch_start_idx,
        "poses": poses,
        "depth": depth,
        "depth_conf": depth_conf,
    }


def _expected(reference_case: dict[str, Any], name: str) -> torch.Tensor:
    return reference_case["tensors"][f"outputs.{name}"]


@pytest.mark.parametrize("layer", range(4))
def test_every_aggregated_layer(reference_outputs: dict, reference_case: dict, layer: int) -> None:
    tokens = reference_outputs["tokens"]
    assert isinstance(tokens, list) and len(tokens) == 4
    torch.testing.assert_close(
        tokens[layer], _expected(reference_case, f"aggregated_tokens.{layer}"), rtol=RTOL, atol=ATOL
    )


def test_patch_start_idx(reference_outputs: dict, reference_case: dict) -> None:
    assert reference_outputs["patch_start_idx"] == reference_case["config"]["patch_start_idx"] == 5


@pytest.mark.parametrize("iteration", range(4))
def test_every_pose_iteration(reference_outputs: dict, reference_case: dict, iteration: int) -> None:
    poses = reference_outputs["poses"]
    assert len(poses) == 4
    torch.testing.assert_close(
        poses[iteration], _expected(reference_case, f"pose_enc.{iteration}"), rtol=RTOL, atol=ATOL
    )


def test_depth_and_confidence(reference_outputs: dict, reference_case: dict) -> None:
    torch.testing.assert_close(
        reference_outputs["depth"], _expected(reference_case, "depth"), rtol=RTOL, atol=ATOL
    )
    torch.testing.assert_close(
        reference_outputs["depth_conf"], _expected(reference_case, "depth_conf"), rtol=RTOL, atol=ATOL
    )


def test_frame_chunking_does_not_change_depth(reference_outputs: dict) -> None:
    with torch.no_grad():
        depth, conf = reference_outputs["depth_head"](
            reference_outputs["tokens"],
            reference_outputs["images"],
            reference_outputs["patch_start_idx"],
            frames_chunk_size=1,
        )
    torch.testing.assert_close(depth, reference_outputs["depth"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(conf, reference_outputs["depth_conf"], rtol=RTOL, atol=ATOL)


def test_selecting_aggregator_matches_the_fixture(reference_outputs: dict, reference_case: dict) -> None:
    aggregator = reference_outputs["aggregator"]
    aggregator.selected_layer_idx = [1, -1]
    try:
        with torch.no_grad():
            view, _ = aggregator(reference_outputs["images"])
    finally:
        aggregator.selected_layer_idx = None
    assert isinstance(view, LayerSelectView) and view.layers == (1, 3)
    for layer in (1, 3):
        torch.testing.assert_close(
            view[layer], _expected(reference_case, f"aggregated_tokens.{layer}"), rtol=RTOL, atol=ATOL
        )


def test_assembled_vggt_matches_the_fixture(
    reference_case: dict, reference_weights: Callable[[str], dict]
) -> None:
    config = reference_case["config"]
    model = VGGT(
        enable_point=False,
        enable_track=False,
        aggregator_kwargs=config["aggregator"],
        camera_head_kwargs=config["camera_head"],
        depth_head_kwargs=config["depth_head"],
    ).eval()
    state = {
        f"{part}.{k}": v
        for part in ("aggregator", "camera_head", "depth_head")
        for k, v in reference_weights(part).items()
    }
    model.load_state_dict(state, strict=True)
    images = reference_case["tensors"]["inputs.images"]
    with torch.no_grad():
        predictions = model(images[0])  # 4-D input: B = 1
    assert predictions["images"].shape == images.shape
    assert predictions["pose_enc"].shape == (1, 3, 9)
    for iteration in range(4):
        torch.testing.assert_close(
            predictions["pose_enc_list"][iteration],
            _expected(reference_case, f"pose_enc.{iteration}"),
            rtol=RTOL,
            atol=ATOL,
        )
    torch.testing.assert_close(predictions["depth"], _expected(reference_case, "depth"), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(
        predictions["depth_conf"], _expected(reference_case, "depth_conf"), rtol=RTOL, atol=ATOL
    )
    assert "aggregated_tokens" not in predictions
