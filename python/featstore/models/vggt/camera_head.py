"""VGGT's camera head: iterative refinement of a 9-D pose encoding per frame."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featstore.models.vggt.layers import Block, Mlp

__all__ = ["CameraHead", "POSE_ENCODING_DIM"]

POSE_ENCODING_DIM = 9
"""Pose encoding layout: translation (3), quaternion (4), field of view (height, width), radians."""


def _activate_pose(raw: torch.Tensor) -> torch.Tensor:
    # Translation and quaternion stay linear; the field of view must be non-negative.
    return torch.cat([raw[..., :3], raw[..., 3:7], F.relu(raw[..., 7:])], dim=-1)


class CameraHead(nn.Module):
    """Predicts each frame's camera from the last layer's camera token.

    Parameters
    ----------
    dim_in : int
        Channels of the aggregated tokens (``2 * embed_dim``).
    trunk_depth : int
        Transformer blocks in the trunk (they attend across the frames of a sequence).
    num_heads : int
        Attention heads of the trunk.
    mlp_ratio : float
        MLP width of the trunk relative to ``dim_in``.
    init_values : float
        Initial LayerScale value of the trunk.
    """

    def __init__(
        self,
        dim_in: int = 2048,
        trunk_depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4,
        init_values: float = 0.01,
    ):
        super().__init__()
        self.trunk = nn.Sequential(
            *(Block(dim_in, num_heads, mlp_ratio, init_values=init_values) for _ in range(trunk_depth))
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_ENCODING_DIM))
        self.embed_pose = nn.Linear(POSE_ENCODING_DIM, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, POSE_ENCODING_DIM)

    def forward(
        self, aggregated_tokens_list: Sequence[torch.Tensor], num_iterations: int = 4
    ) -> list[torch.Tensor]:
        """Refine the pose encoding ``num_iterations`` times.

        Parameters
        ----------
        aggregated_tokens_list : sequence of Tensor
            The aggregator's per-layer outputs (a list or a :class:`LayerSelectView`); only the
            last layer is read.
        num_iterations : int
            Refinement steps.

        Returns
        -------
        list of Tensor
            One activated pose encoding ``[B, S, 9]`` per iteration, the last one the best.
        """
        tokens = aggregated_tokens_list[-1]
        pose_tokens = tokens[:, :, 0].to(self.token_norm.weight.dtype)
        pose_tokens = self.token_norm(pose_tokens)
        batch, frames, _ = pose_tokens.shape

        raw: torch.Tensor | None = None
        activated = []
        for _ in range(num_iterations):
            if raw is None:
                conditioning = self.embed_pose(self.empty_pose_tokens.expand(batch, frames, -1))
            else:
                # The running sum (not its activated copy) feeds the next step, without gradient.
                raw = raw.detach()
                conditioning = self.embed_pose(raw)
            shift, scale, gate = self.poseLN_modulation(conditioning).chunk(3, dim=-1)
            x = gate * (self.adaln_norm(pose_tokens) * (1 + scale) + shift)
            x = x + pose_tokens
            x = self.trunk(x)
            delta = self.pose_branch(self.trunk_norm(x))
            raw = delta if raw is None else raw + delta
            activated.append(_activate_pose(raw))
        return activated
