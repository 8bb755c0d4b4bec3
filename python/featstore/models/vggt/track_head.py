"""The parameter layout of VGGT's point-tracking head, so that the full checkpoint loads.

featstore caches geometry features and does not track points; the 394 ``track_head.*`` weights
are loaded (the checkpoint is used as published, and keys are checked strictly) but the head's
forward is not implemented. Calling it raises :class:`NotImplementedError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from featstore.models.vggt.dpt_head import DPTHead
from featstore.models.vggt.layers import Mlp

__all__ = ["TRACKING_NOT_IMPLEMENTED", "TrackHead"]

TRACKING_NOT_IMPLEMENTED = (
    "featstore's VGGT does not implement point tracking (the track head's weights load, its forward "
    "does not run); call the model without query_points, or build it with enable_track=False"
)


class _AttnBlock(nn.Module):
    """Self-attention block of the tracker's update transformer (weights only)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)


class _CrossAttnBlock(nn.Module):
    """Cross-attention block of the tracker's update transformer (weights only)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.norm_context = nn.LayerNorm(hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)


class _UpdateFormer(nn.Module):
    """Space-time transformer that updates track coordinates and features (weights only)."""

    def __init__(
        self,
        input_dim: int,
        hidden_size: int,
        output_dim: int,
        depth: int,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        num_virtual_tracks: int = 64,
    ):
        super().__init__()
        # The misspelling is the checkpoint's key.
        self.virual_tracks = nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size))
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim)
        self.time_blocks = nn.ModuleList(_AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.space_virtual_blocks = nn.ModuleList(
            _AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.space_point2virtual_blocks = nn.ModuleList(
            _CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.space_virtual2point_blocks = nn.ModuleList(
            _CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)
        )


class _TrackerPredictor(nn.Module):
    """Iterative correlation-based track refiner (weights only)."""

    def __init__(
        self,
        latent_dim: int,
        hidden_size: int,
        corr_levels: int,
        corr_radius: int,
        depth: int,
        predict_conf: bool,
    ):
        super().__init__()
        transformer_dim = 3 * latent_dim + 4
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, transformer_dim))
        self.corr_mlp = Mlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden_size, latent_dim)
        self.updateformer = _UpdateFormer(transformer_dim, hidden_size, latent_dim + 2, depth)
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        if predict_conf:
            self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1))


class TrackHead(nn.Module):
    """VGGT's track head: a feature-only DPT head plus a tracker. Weights load; forward does not run.

    Parameters
    ----------
    dim_in : int
        Channels of the aggregated tokens (``2 * embed_dim``).
    patch_size : int
        Patch size, pixels.
    features : int
        Channels of the feature maps the tracker correlates.
    iters : int
        Refinement iterations.
    predict_conf : bool
        Whether the tracker has a confidence predictor.
    corr_levels, corr_radius : int
        Correlation pyramid levels and lookup radius.
    hidden_size : int
        Width of the update transformer.
    depth : int
        Blocks of each kind in the update transformer.
    intermediate_layer_idx : sequence of int
        Aggregator layers read by the feature extractor.
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        features: int = 128,
        iters: int = 4,
        predict_conf: bool = True,
        corr_levels: int = 7,
        corr_radius: int = 4,
        hidden_size: int = 384,
        depth: int = 6,
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
    ):
        super().__init__()
        self.iters = iters
        self.feature_extractor = DPTHead(
            dim_in,
            patch_size=patch_size,
            features=features,
            feature_only=True,
            down_ratio=2,
            pos_embed=False,
            intermediate_layer_idx=intermediate_layer_idx,
        )
        self.tracker = _TrackerPredictor(features, hidden_size, corr_levels, corr_radius, depth, predict_conf)

    @property
    def intermediate_layer_idx(self) -> tuple[int, ...]:
        """Aggregator layers this head reads."""
        return self.feature_extractor.intermediate_layer_idx

    def forward(self, *args: object, **kwargs: object) -> None:
        """Not implemented: featstore loads the track head's weights but does not track points."""
        raise NotImplementedError(TRACKING_NOT_IMPLEMENTED)
