"""The layer-selecting aggregator and LayerSelectView: same numbers, fewer layers kept, early exit."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from featstore.models.vggt import Aggregator, CameraHead, DPTHead, LayerSelectView
from featstore.models.vggt.aggregator import normalize_layer_selection


def _tiny_aggregator(**overrides) -> Aggregator:
    torch.manual_seed(0)
    args = {"img_size": 56, "embed_dim": 32, "depth": 6, "num_heads": 2, "patch_embed": "conv"}
    args.update(overrides)
    aggregator = Aggregator(**args).eval()
    with torch.no_grad():
        for name, param in aggregator.named_parameters():
            if name.endswith("gamma"):
                param.normal_(0, 0.3)
    return aggregator


def _run(aggregator: Aggregator, images: torch.Tensor, selection) -> tuple:
    aggregator.selected_layer_idx = selection
    with torch.no_grad():
        return aggregator(images)


# --- selection arguments -------------------------------------------------------------------------


def test_selection_is_normalized_to_sorted_absolute_layers() -> None:
    assert normalize_layer_selection([-1, 4, 11, 4, -7], 24) == (4, 11, 17, 23)
    assert normalize_layer_selection(22, 24) == (22,)
    assert normalize_layer_selection(range(2), 24) == (0, 1)
    assert normalize_layer_selection(None, 24) is None


@pytest.mark.parametrize("bad", [[24], [-25], [3, 100]])
def test_selection_out_of_range(bad: list[int]) -> None:
    with pytest.raises(ValueError, match=r"layer -?\d+ does not exist: the aggregator has 24 layers"):
        normalize_layer_selection(bad, 24)


def test_selection_empty_or_not_integers() -> None:
    with pytest.raises(ValueError, match="empty"):
        normalize_layer_selection([], 24)
    with pytest.raises(TypeError):
        normalize_layer_selection([1.5], 24)
    with pytest.raises(TypeError):
        normalize_layer_selection([True], 24)


def test_aggregator_rejects_a_bad_selection() -> None:
    aggregator = _tiny_aggregator()
    with pytest.raises(ValueError, match="6 layers"):
        aggregator.selected_layer_idx = [6]
    with pytest.raises(ValueError):
        _tiny_aggregator(selected_layer_idx=[-7])


# --- the view --------------------------------------------------------------------------------------


@pytest.fixture
def view() -> LayerSelectView:
    return LayerSelectView(
        24, {4: torch.zeros(1, 2, 3, 8), 22: torch.ones(1, 2, 3, 8), 23: torch.full((1, 2, 3, 8), 2.0)}
    )


def test_view_length_is_the_depth(view: LayerSelectView) -> None:
    assert len(view) == 24 == view.depth
    assert view.layers == (4, 22, 23)


def test_view_takes_absolute_and_negative_indices(view: LayerSelectView) -> None:
    assert view[22] is view[-2]
    assert view[-1] is view[23]
    assert view[4] is view[-20]
    assert 22 in view and -1 in view and 5 not in view and 99 not in view


def test_view_raises_key_error_naming_a_missing_layer(view: LayerSelectView) -> None:
    with pytest.raises(KeyError, match=re.escape("layer 5 was not kept")):
        view[5]
    with pytest.raises(KeyError, match=re.escape("-3 (layer 21)")):
        view[-3]


def test_view_out_of_range_is_an_index_error(view: LayerSelectView) -> None:
    with pytest.raises(IndexError):
        view[24]
    with pytest.raises(IndexError):
        view[-25]


def test_view_helpers(view: LayerSelectView) -> None:
    assert [layer for layer, _ in view.items()] == [4, 22, 23]
    assert view.get(5) is None and view.get(-1) is view[23]
    assert view.nbytes == 3 * 1 * 2 * 3 * 8 * 4
    assert view[22:] == [view[22], view[23]]
    with pytest.raises(KeyError):
        view[20:]
    with pytest.raises(TypeError, match="items"):
        list(view)
    assert "layers=[4, 22, 23]" in repr(view)


# --- equality with the full aggregator ----------------------------------------------------------


@pytest.mark.parametrize("selection", [[0], [2], [-1], [1, 3, 5], [5, 0], list(range(6))])
def test_selected_layers_equal_the_full_aggregator_bit_for_bit(selection: list[int]) -> None:
    aggregator = _tiny_aggregator()
    images = torch.rand(2, 3, 3, 28, 42)
    full, start_full = _run(aggregator, images, None)
    view, start_view = _run(aggregator, images, selection)
    assert isinstance(full, list) and len(full) == 6
    assert isinstance(view, LayerSelectView) and len(view) == 6
    assert start_full == start_view == 5
    for layer in selection:
        assert torch.equal(view[layer], full[layer])
    assert set(view.layers) == {layer % 6 for layer in selection}


def test_dinov2_patch_embed_selection_matches_on_non_square_images() -> None:
    # ViT-S patch embed at a tiny training size: 28x42 images need the interpolated pos embed.
    aggregator = _tiny_aggregator(embed_dim=384, num_heads=6, depth=2, patch_embed="dinov2_vits14_reg")
    images = torch.rand(1, 2, 3, 28, 42)
    full, _ = _run(aggregator, images, None)
    view, _ = _run(aggregator, images, [0])
    assert full[0].shape == (1, 2, 5 + 2 * 3, 768)
    assert torch.equal(view[0], full[0])


def test_grouped_blocks_and_global_first_order() -> None:
    aggregator = _tiny_aggregator(aa_block_size=2, aa_order=("global", "frame"))
    images = torch.rand(1, 2, 3, 28, 28)
    full, _ = _run(aggregator, images, None)
    view, _ = _run(aggregator, images, [2])
    assert torch.equal(view[2], full[2])


def test_forward_layers_overrides_the_configured_selection() -> None:
    aggregator = _tiny_aggregator()
    images = torch.rand(1, 2, 3, 28, 28)
    full, _ = _run(aggregator, images, None)
    with torch.no_grad():
        view, _ = aggregator.forward_layers(images, [-2])
    assert view.layers == (4,) and torch.equal(view[4], full[4])
    assert aggregator.selected_layer_idx is None


# --- early exit and memory ----------------------------------------------------------------------


def _count_block_calls(aggregator: Aggregator) -> dict[str, int]:
    calls = {"frame": 0, "global": 0}
    for kind in calls:
        for block in getattr(aggregator, f"{kind}_blocks"):
            block.register_forward_hook(lambda *_, kind=kind: calls.__setitem__(kind, calls[kind] + 1))
    return calls


@pytest.mark.parametrize(("selection", "blocks_run"), [(None, 6), ([2], 3), ([0, 2], 3), ([-1], 6), ([0], 1)])
def test_aggregator_stops_after_the_deepest_selected_layer(selection, blocks_run: int) -> None:
    aggregator = _tiny_aggregator()
    calls = _count_block_calls(aggregator)
    _run(aggregator, torch.rand(1, 2, 3, 28, 28), selection)
    assert calls == {"frame": blocks_run, "global": blocks_run}


def test_early_exit_with_grouped_blocks_runs_whole_groups() -> None:
    aggregator = _tiny_aggregator(aa_block_size=2)
    calls = _count_block_calls(aggregator)
    _run(aggregator, torch.rand(1, 2, 3, 28, 28), [2])
    assert calls == {"frame": 4, "global": 4}


def test_view_stores_only_the_selected_layers() -> None:
    aggregator = _tiny_aggregator()
    images = torch.rand(1, 2, 3, 28, 28)
    full, _ = _run(aggregator, images, None)
    view, _ = _run(aggregator, images, [1, 4])
    full_bytes = sum(t.numel() * t.element_size() for t in full)
    assert view.nbytes * 3 == full_bytes
    # Each kept layer is its own tensor, not a view into a larger buffer that would keep it alive.
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for _, t in view.items())


# --- heads on the view ------------------------------------------------------------------------------


def test_heads_on_the_view_equal_heads_on_the_full_list() -> None:
    aggregator = _tiny_aggregator()
    torch.manual_seed(1)
    camera = CameraHead(dim_in=64, num_heads=2, trunk_depth=2).eval()
    dpt = DPTHead(
        dim_in=64, features=16, out_channels=(8, 16, 32, 32), intermediate_layer_idx=(1, 2, 4, 5)
    ).eval()
    images = torch.rand(1, 3, 3, 28, 42)
    full, start = _run(aggregator, images, None)
    view, _ = _run(aggregator, images, [1, 2, 4, 5])
    with torch.no_grad():
        for full_pose, view_pose in zip(camera(full), camera(view), strict=True):
            assert torch.equal(full_pose, view_pose)
        full_points, full_conf = dpt(full, images, start)
        view_points, view_conf = dpt(view, images, start)
    assert torch.equal(full_points, view_points) and torch.equal(full_conf, view_conf)


def test_a_head_reading_a_dropped_layer_fails_loudly() -> None:
    aggregator = _tiny_aggregator()
    dpt = DPTHead(
        dim_in=64, features=16, out_channels=(8, 16, 32, 32), intermediate_layer_idx=(1, 2, 4, 5)
    ).eval()
    images = torch.rand(1, 1, 3, 28, 28)
    view, start = _run(aggregator, images, [1, 2])
    with pytest.raises(KeyError, match="layer 4 was not kept"):
        dpt(view, images, start)


# --- VGGT with a selection ------------------------------------------------------------------------


def test_vggt_keeps_the_union_of_selection_and_head_layers(
    make_tiny_vggt: Callable, tiny_images: torch.Tensor
) -> None:
    reference = make_tiny_vggt()
    selecting = make_tiny_vggt(selected_layer_idx=[0, -3])
    assert selecting.selected_layer_idx == (0, 3)
    assert selecting.head_layers() == (1, 2, 4, 5)
    assert selecting.aggregator.selected_layer_idx == (0, 1, 2, 3, 4, 5)
    with torch.no_grad():
        expected = reference(tiny_images)
        actual = selecting(tiny_images)
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        assert torch.equal(actual[key], expected[key]), key
    tokens = actual["aggregated_tokens"]
    assert isinstance(tokens, LayerSelectView) and tokens.layers == (0, 3) and actual["patch_start_idx"] == 5
    assert "aggregated_tokens" not in expected


def test_vggt_without_heads_exits_early(make_tiny_vggt: Callable, tiny_images: torch.Tensor) -> None:
    model = make_tiny_vggt(
        enable_camera=False,
        enable_point=False,
        enable_depth=False,
        enable_track=False,
        selected_layer_idx=[2],
    )
    full = make_tiny_vggt(enable_camera=False, enable_point=False, enable_depth=False, enable_track=False)
    full.load_state_dict(model.state_dict())
    calls = _count_block_calls(model.aggregator)
    with torch.no_grad():
        predictions = model(tiny_images)
        reference, _ = full.aggregator(tiny_images)
    assert calls == {"frame": 3, "global": 3}
    assert torch.equal(predictions["aggregated_tokens"][2], reference[2])
    assert set(predictions) == {"aggregated_tokens", "patch_start_idx", "images"}


def test_vggt_selection_can_be_changed(make_tiny_vggt: Callable) -> None:
    model = make_tiny_vggt(enable_point=False, enable_depth=False, enable_track=False)
    model.selected_layer_idx = 1
    assert model.aggregator.selected_layer_idx == (1, 5)
    model.selected_layer_idx = None
    assert model.aggregator.selected_layer_idx is None


def test_query_points_are_not_supported(make_tiny_vggt: Callable, tiny_images: torch.Tensor) -> None:
    model = make_tiny_vggt()
    with pytest.raises(NotImplementedError, match="tracking"):
        model(tiny_images, query_points=torch.zeros(4, 2))


def test_training_after_inference_mode() -> None:
    # Cached RoPE tables made under inference_mode must not leak into autograd.
    aggregator = _tiny_aggregator(selected_layer_idx=[1])
    images = torch.rand(1, 2, 3, 28, 28)
    with torch.inference_mode():
        aggregator(images)
    view, _ = aggregator(images)
    view[1].sum().backward()
    assert aggregator.frame_blocks[0].attn.qkv.weight.grad is not None


def test_training_mode_checkpoints_and_matches_eval() -> None:
    aggregator = _tiny_aggregator(selected_layer_idx=[3])
    images = torch.rand(1, 2, 3, 28, 28)
    with torch.no_grad():
        expected, _ = aggregator(images)
    aggregator.train()
    view, _ = aggregator(images)
    torch.testing.assert_close(view[3], expected[3])
    view[3].sum().backward()
    assert aggregator.frame_blocks[0].attn.qkv.weight.grad is not None
    assert aggregator.frame_blocks[4].attn.qkv.weight.grad is None  # never ran
