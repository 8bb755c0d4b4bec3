"""The default VGGT's state dict is VGGT-1B's, key for key and shape for shape (built on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from featstore.models.vggt import VGGT, Aggregator


def _reference_keys(keys_file: Path) -> list[tuple[str, tuple[int, ...]]]:
    entries = []
    for line in keys_file.read_text().splitlines():
        key, shape = line.split("\t")
        entries.append((key, tuple(int(n) for n in shape.strip("()").split(",") if n.strip())))
    return entries


@pytest.fixture(scope="module")
def meta_vggt() -> VGGT:
    with torch.device("meta"):
        return VGGT()


def test_default_state_dict_matches_vggt1b(meta_vggt: VGGT, keys_file: Path) -> None:
    expected = _reference_keys(keys_file)
    actual = [(key, tuple(value.shape)) for key, value in meta_vggt.state_dict().items()]
    assert len(expected) == 1797
    assert dict(actual) == dict(expected)
    # Same order too, so a diff of the two lists is readable.
    assert actual == expected


def test_nothing_was_materialized(meta_vggt: VGGT) -> None:
    assert all(p.is_meta for p in meta_vggt.parameters())


def test_caches_and_normalization_are_not_in_the_state_dict(meta_vggt: VGGT) -> None:
    keys = meta_vggt.state_dict().keys()
    assert not [k for k in keys if "rope" in k or "resnet" in k or "position" in k]
    buffers = dict(meta_vggt.named_buffers())
    assert set(buffers) == {"aggregator._resnet_mean", "aggregator._resnet_std"}


def test_track_head_has_394_keys(meta_vggt: VGGT) -> None:
    assert sum(k.startswith("track_head.") for k in meta_vggt.state_dict()) == 394


def test_disabled_heads_have_no_keys() -> None:
    with torch.device("meta"):
        model = VGGT(enable_camera=False, enable_point=False, enable_depth=False, enable_track=False)
    assert {k.split(".")[0] for k in model.state_dict()} == {"aggregator"}


@pytest.mark.parametrize(
    ("patch_embed", "embed_dim", "vit_depth"),
    [("dinov2_vits14_reg", 384, 12), ("dinov2_vitb14_reg", 768, 12), ("dinov2_vitl14_reg", 1024, 24)],
)
def test_dinov2_patch_embed_sizes(patch_embed: str, embed_dim: int, vit_depth: int) -> None:
    with torch.device("meta"):
        aggregator = Aggregator(
            embed_dim=embed_dim, depth=2, num_heads=embed_dim // 64, patch_embed=patch_embed
        )
    state = aggregator.state_dict()
    assert state["patch_embed.pos_embed"].shape == (1, 1 + 37 * 37, embed_dim)
    assert state["patch_embed.register_tokens"].shape == (1, 4, embed_dim)
    assert state["patch_embed.mask_token"].shape == (1, embed_dim)
    assert f"patch_embed.blocks.{vit_depth - 1}.ls2.gamma" in state
    assert f"patch_embed.blocks.{vit_depth}.ls2.gamma" not in state


def test_conv_patch_embed_keys() -> None:
    with torch.device("meta"):
        aggregator = Aggregator(embed_dim=64, depth=2, num_heads=4, patch_embed="conv")
    assert [k for k in aggregator.state_dict() if k.startswith("patch_embed")] == [
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    ]


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="patch_embed"):
        Aggregator(embed_dim=64, depth=2, num_heads=4, patch_embed="resnet")
    with pytest.raises(ValueError, match="384"):
        Aggregator(embed_dim=64, depth=2, num_heads=4, patch_embed="dinov2_vits14_reg")
    with pytest.raises(ValueError, match="aa_block_size"):
        Aggregator(embed_dim=64, depth=3, num_heads=4, patch_embed="conv", aa_block_size=2)
    with pytest.raises(ValueError, match="rope_freq"):
        Aggregator(embed_dim=64, depth=2, num_heads=4, patch_embed="conv", rope_freq=0)
    with pytest.raises(ValueError, match="intermediate_layer_idx"), torch.device("meta"):
        VGGT(embed_dim=64, aggregator_kwargs={"depth": 4, "num_heads": 4, "patch_embed": "conv"})
