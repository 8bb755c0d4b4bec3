"""DINOv2-with-registers ViT used as VGGT's patch embed (``dinov2_vit{s,b,l}14_reg``).

Only what VGGT uses is here: no classifier head, no masking at inference, no drop path. The
parameter layout (``cls_token``, ``pos_embed``, ``register_tokens``, ``mask_token``,
``patch_embed.proj``, ``blocks.N``, ``norm``) matches the checkpoint's
``aggregator.patch_embed.*`` keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from featstore.models.vggt.layers import Block, PatchEmbed

__all__ = ["DINOV2_VARIANTS", "DinoV2Spec", "DinoVisionTransformer"]


@dataclass(frozen=True)
class DinoV2Spec:
    """Size of one DINOv2 variant.

    Attributes
    ----------
    embed_dim : int
        Token channels.
    depth : int
        Transformer blocks.
    num_heads : int
        Attention heads.
    """

    embed_dim: int
    depth: int
    num_heads: int


DINOV2_VARIANTS: dict[str, DinoV2Spec] = {
    "dinov2_vits14_reg": DinoV2Spec(embed_dim=384, depth=12, num_heads=6),
    "dinov2_vitb14_reg": DinoV2Spec(embed_dim=768, depth=12, num_heads=12),
    "dinov2_vitl14_reg": DinoV2Spec(embed_dim=1024, depth=24, num_heads=16),
}
"""The patch embeds VGGT's ``Aggregator(patch_embed=...)`` accepts besides ``"conv"``."""


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT with register tokens, returning normalized patch tokens only.

    Parameters
    ----------
    img_size : int
        Training image size, pixels; the positional embedding covers an ``M x M`` grid with
        ``M = img_size / patch_size`` and is resized for other grids.
    patch_size : int
        Patch size, pixels.
    embed_dim, depth, num_heads : int
        Transformer size (see :data:`DINOV2_VARIANTS`).
    mlp_ratio : float
        MLP width relative to ``embed_dim``.
    num_register_tokens : int
        Register tokens inserted after the class token.
    init_values : float
        Initial LayerScale value (1.0 in VGGT).
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        init_values: float = 1.0,
    ):
        super().__init__()
        grid = img_size // patch_size
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        # Unused at inference, kept because the checkpoint has it.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=3, embed_dim=embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, init_values=init_values, norm_eps=1e-6)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)

    def _positional_embedding(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        num_patches = tokens.shape[1] - 1
        trained = self.pos_embed.shape[1] - 1
        if num_patches == trained and height == width:
            return self.pos_embed
        grid = int(math.sqrt(trained))
        pos_embed = self.pos_embed.float()
        channels = tokens.shape[-1]
        patch_part = pos_embed[:, 1:].reshape(1, grid, grid, channels).permute(0, 3, 1, 2)
        # Antialiasing stays on even when upsampling: it changes the bicubic kernel, and the
        # checkpoint was trained with it.
        patch_part = F.interpolate(
            patch_part,
            size=(height // self.patch_size, width // self.patch_size),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        patch_part = patch_part.permute(0, 2, 3, 1).reshape(1, -1, channels)
        return torch.cat((pos_embed[:, :1], patch_part), dim=1).to(tokens.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed normalized images.

        Parameters
        ----------
        images : Tensor
            ``[N, 3, H, W]``, already normalized with the ImageNet mean and std.

        Returns
        -------
        Tensor
            Normalized patch tokens ``[N, (H/p)(W/p), C]`` (class and register tokens dropped).
        """
        height, width = images.shape[-2:]
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self._positional_embedding(x, height, width)
        x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 1 + self.num_register_tokens :]
