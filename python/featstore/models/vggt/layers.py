"""Transformer building blocks shared by the aggregator, the DINOv2 patch embed and the camera head.

Attribute names (``norm1``, ``attn.qkv``, ``ls1.gamma``, ``mlp.fc1`` ...) are part of the VGGT-1B
checkpoint keys and must not change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention",
    "Block",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "RotaryPositionEmbedding2D",
    "patch_positions",
]


class Mlp(nn.Module):
    """Two-layer perceptron with an exact (erf) GELU in between.

    Parameters
    ----------
    in_features : int
        Input channels.
    hidden_features : int
        Channels after ``fc1``.
    out_features : int
        Output channels of ``fc2``.
    bias : bool
        Whether both linear layers have a bias (every VGGT MLP has one).
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``fc2(gelu(fc1(x)))`` on the last axis."""
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel learned scale ``x * gamma``.

    Parameters
    ----------
    dim : int
        Channels.
    init_values : float
        Initial value of every entry of ``gamma``.
    """

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale ``x`` channel-wise (never in place: the input may be a view that is still needed)."""
        return x * self.gamma


class RotaryPositionEmbedding2D(nn.Module):
    """2D rotary position embedding: the first half of each head rotates with y, the second with x.

    Holds no parameters or buffers (the checkpoint has no keys for it); cosine and sine tables are
    cached in a plain dict keyed by width, length, device, dtype and inference mode.

    Parameters
    ----------
    frequency : float
        Base frequency (100 in VGGT).
    """

    def __init__(self, frequency: float = 100.0):
        super().__init__()
        self.frequency = float(frequency)
        self._tables: dict[
            tuple[int, int, torch.device, torch.dtype, bool], tuple[torch.Tensor, torch.Tensor]
        ] = {}
        # Every block of a forward passes the same positions tensor; remembering its maximum saves
        # a device-to-host sync per attention call on GPUs.
        self._last_positions: torch.Tensor | None = None
        self._last_length = 0

    def _cos_sin(
        self, width: int, length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Tables made under inference_mode are inference tensors, which autograd refuses to save:
        # they are cached apart from those made outside it.
        key = (width, length, device, dtype, torch.is_inference_mode_enabled())
        if key not in self._tables:
            # The reference's float32 recipe, step for step: a float64 or exp/log formulation
            # differs in the last bits, and over 24 layers that difference shows.
            inv_freq = 1.0 / (self.frequency ** (torch.arange(0, width, 2, device=device).float() / width))
            positions = torch.arange(length, device=device, dtype=inv_freq.dtype)
            angles = (positions[:, None] * inv_freq[None, :]).to(dtype)
            angles = torch.cat((angles, angles), dim=-1)
            self._tables[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
        return self._tables[key]

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def _rotate(
        self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        cos_at = F.embedding(positions, cos)[:, None, :, :]
        sin_at = F.embedding(positions, sin)[:, None, :, :]
        return (x * cos_at) + (self._rotate_half(x) * sin_at)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` by its tokens' positions.

        Parameters
        ----------
        x : Tensor
            Queries or keys, ``[B, heads, N, head_dim]``.
        positions : Tensor
            Integer ``(y, x)`` positions, ``[B, N, 2]``.

        Returns
        -------
        Tensor
            Same shape and dtype as ``x``.
        """
        width = x.shape[-1] // 2
        if positions is not self._last_positions:
            self._last_positions = positions
            self._last_length = int(positions.max()) + 1
        cos, sin = self._cos_sin(width, self._last_length, x.device, x.dtype)
        along_y, along_x = x.chunk(2, dim=-1)
        along_y = self._rotate(along_y, positions[..., 0], cos, sin)
        along_x = self._rotate(along_x, positions[..., 1], cos, sin)
        return torch.cat((along_y, along_x), dim=-1)


def patch_positions(
    batch: int, grid_h: int, grid_w: int, num_special: int, device: torch.device
) -> torch.Tensor:
    """RoPE positions of one frame's tokens, repeated over a batch of frames.

    Patch ``(i, j)`` (row-major) gets ``(y, x) = (i + 1, j + 1)``; the ``num_special`` camera and
    register tokens in front get ``(0, 0)``.

    Parameters
    ----------
    batch : int
        Number of frames.
    grid_h, grid_w : int
        Patch grid size (image height and width divided by the patch size).
    num_special : int
        Tokens before the first patch token.
    device : torch.device
        Where the positions live.

    Returns
    -------
    Tensor
        int64 ``[batch, num_special + grid_h * grid_w, 2]``.
    """
    patches = (
        torch.cartesian_prod(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device)) + 1
    )
    special = torch.zeros(num_special, 2, dtype=patches.dtype, device=patches.device)
    return torch.cat((special, patches), dim=0)[None].expand(batch, -1, -1).contiguous()


class Attention(nn.Module):
    """Multi-head self-attention with optional per-head LayerNorm on q and k and optional RoPE.

    Parameters
    ----------
    dim : int
        Channels.
    num_heads : int
        Heads; ``dim`` must be divisible by it.
    qk_norm : bool
        LayerNorm(head_dim, eps 1e-5, affine) on queries and keys, shared by all heads.
    rope : RotaryPositionEmbedding2D or None
        Applied to q and k after the norm when given.
    """

    def __init__(
        self, dim: int, num_heads: int, qk_norm: bool = False, rope: RotaryPositionEmbedding2D | None = None
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm: nn.Module = nn.LayerNorm(self.head_dim, eps=1e-5) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = nn.LayerNorm(self.head_dim, eps=1e-5) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)
        # One instance shared by all blocks, so its table cache is shared too; it has no weights.
        self.rope = rope

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw queries, keys and values of ``x``, each ``[B, heads, N, head_dim]`` (no norm, no RoPE)."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend over the tokens of ``x`` (``[B, N, C]``); ``pos`` (``[B, N, 2]``) feeds RoPE.

        ``attn_mask`` (bool, ``[N, N]`` or broadcastable to ``[B, heads, N, N]``) is True where a
        query may attend to a key.
        """
        batch, tokens, channels = x.shape
        q, k, v = self._project(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q = self.rope(q, pos)
            k = self.rope(k, pos)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x.transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj(x)

    def forward_with_past(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None,
        past_keys: Sequence[torch.Tensor],
        past_values: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend from one frame's tokens to earlier frames' raw keys and values and to its own.

        Parameters
        ----------
        x : Tensor
            The new frame's tokens, ``[B, N, C]``.
        pos : Tensor or None
            Their RoPE positions, ``[B, N, 2]``; every earlier frame has the same positions.
        past_keys, past_values : sequence of Tensor
            Earlier frames' keys and values as :meth:`_project` produced them (before the q/k
            norm and RoPE), ``[B, heads, N, head_dim]`` each, in frame order.

        Returns
        -------
        out : Tensor
            ``[B, N, C]``.
        keys, values : Tensor
            The new frame's raw keys and values, for the caller to cache.
        """
        batch, tokens, channels = x.shape
        q, k_raw, v_raw = self._project(x)
        k = torch.cat([*(t.to(k_raw.dtype) for t in past_keys), k_raw], dim=2) if past_keys else k_raw
        v = torch.cat([*(t.to(v_raw.dtype) for t in past_values), v_raw], dim=2) if past_values else v_raw
        frames = k.shape[2] // tokens
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q = self.rope(q, pos)
            # Frames along the head axis: one [B, N, 2] position grid then serves every frame.
            k = self.rope(k.reshape(batch, self.num_heads * frames, tokens, self.head_dim), pos)
            k = k.reshape(batch, self.num_heads, frames * tokens, self.head_dim)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj(x), k_raw, v_raw


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``.

    Parameters
    ----------
    dim : int
        Channels.
    num_heads : int
        Attention heads.
    mlp_ratio : float
        Hidden width of the MLP relative to ``dim``.
    init_values : float
        Initial LayerScale value.
    qk_norm : bool
        LayerNorm on queries and keys.
    rope : RotaryPositionEmbedding2D or None
        Rotary embedding applied inside attention.
    norm_eps : float
        Epsilon of ``norm1`` and ``norm2`` (1e-5 in the aggregator and camera head, 1e-6 in DINOv2).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
        qk_norm: bool = False,
        rope: RotaryPositionEmbedding2D | None = None,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)
        self.ls2 = LayerScale(dim, init_values)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Apply the block to ``x`` (``[B, N, C]``), with RoPE positions ``pos`` when it has RoPE.

        ``attn_mask`` (bool, True where a query may attend to a key) restricts the attention.
        """
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos, attn_mask=attn_mask))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x

    def forward_with_past(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None,
        past_keys: Sequence[torch.Tensor],
        past_values: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply the block to one frame, its attention also reading earlier frames' raw keys and values.

        See :meth:`Attention.forward_with_past`; returns the block's output and the frame's raw
        keys and values.
        """
        attended, keys, values = self.attn.forward_with_past(self.norm1(x), pos, past_keys, past_values)
        x = x + self.ls1(attended)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, keys, values


class PatchEmbed(nn.Module):
    """Non-overlapping convolutional patch embedding: ``[B, 3, H, W] -> [B, (H/p)(W/p), C]``.

    Parameters
    ----------
    patch_size : int
        Kernel size and stride, pixels.
    in_chans : int
        Image channels.
    embed_dim : int
        Output channels.
    """

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 1024):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed every patch of ``x`` as one token (row-major order)."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                "resize or crop it (preprocess_images does)"
            )
        return self.proj(x).flatten(2).transpose(1, 2)
