"""VGGT's DPT head: dense per-pixel predictions (depth, world points) from four aggregator layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DPTHead"]

_ACTIVATIONS = ("exp", "inv_log", "linear", "relu", "sigmoid", "norm", "norm_exp", "xy_inv_log")
_CONF_ACTIVATIONS = ("expp1", "expp0", "sigmoid")

# F.interpolate indexes with 32-bit integers on some backends; above this many output elements
# the batch is split.
_INTERPOLATE_MAX_ELEMENTS = 1_610_612_736


def _interpolate(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True``, split over the batch when the output is huge."""
    elements = size[0] * size[1] * x.shape[0] * x.shape[1]
    if elements <= _INTERPOLATE_MAX_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    chunks = torch.chunk(x, elements // _INTERPOLATE_MAX_ELEMENTS + 1, dim=0)
    return torch.cat(
        [F.interpolate(c, size=size, mode="bilinear", align_corners=True) for c in chunks]
    ).contiguous()


def _inverse_log(y: torch.Tensor) -> torch.Tensor:
    return torch.sign(y) * torch.expm1(torch.abs(y))


def _sincos_1d(channels: int, positions: torch.Tensor, omega_0: float) -> torch.Tensor:
    """``[sin(p * omega), cos(p * omega)]`` with ``channels / 2`` frequencies, computed in float64."""
    omega = torch.arange(channels // 2, dtype=torch.float64, device=positions.device)
    omega /= channels / 2.0
    omega = 1.0 / omega_0**omega
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def _uv_positional_embedding(
    channels: int, height: int, width: int, aspect: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Sin-cos embedding ``[channels, height, width]`` of a centred grid normalized by the image diagonal.

    ``aspect`` is the image's width over its height (not the map's); u runs horizontally.
    """
    diag = (aspect**2 + 1.0) ** 0.5
    span_x = aspect / diag
    span_y = 1.0 / diag
    u = torch.linspace(
        -span_x * (width - 1) / width, span_x * (width - 1) / width, steps=width, dtype=dtype, device=device
    )
    v = torch.linspace(
        -span_y * (height - 1) / height,
        span_y * (height - 1) / height,
        steps=height,
        dtype=dtype,
        device=device,
    )
    uu, vv = torch.meshgrid(u, v, indexing="xy")
    grid = torch.stack((uu, vv), dim=-1).reshape(-1, 2)
    embedding = torch.cat(
        [
            _sincos_1d(channels // 2, grid[:, 0], omega_0=100),
            _sincos_1d(channels // 2, grid[:, 1], omega_0=100),
        ],
        dim=-1,
    )
    return embedding.view(height, width, channels).permute(2, 0, 1)


def _add_positional_embedding(x: torch.Tensor, image_width: int, image_height: int) -> torch.Tensor:
    embedding = _uv_positional_embedding(
        x.shape[1], x.shape[-2], x.shape[-1], image_width / image_height, x.dtype, x.device
    )
    return x + (embedding * 0.1)[None].expand(x.shape[0], -1, -1, -1)


class ResidualConvUnit(nn.Module):
    """``r = relu(x); r + conv2(relu(conv1(r)))`` with 3x3 convolutions.

    The skip carries ``relu(x)``, not ``x``: the reference applies its ReLU in place to the input.

    Parameters
    ----------
    features : int
        Channels in and out.
    """

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the unit (``x`` is not modified)."""
        rectified = F.relu(x)
        return rectified + self.conv2(F.relu(self.conv1(rectified)))


class FeatureFusionBlock(nn.Module):
    """RefineNet-style fusion: add the refined skip, refine, upsample, project with a 1x1 conv.

    Parameters
    ----------
    features : int
        Channels.
    has_residual : bool
        Whether a skip input is fused (``refinenet4``, the deepest, has none).
    """

    def __init__(self, features: int, has_residual: bool = True):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1, stride=1, padding=0, bias=True)
        self.has_residual = has_residual
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Fuse ``x`` with ``skip`` and upsample to ``size`` (twice the size when None)."""
        out = x
        if self.has_residual:
            if skip is None:
                raise ValueError("this fusion block needs a skip input")
            out = out + self.resConfUnit1(skip)
        out = self.resConfUnit2(out)
        if size is None:
            size = (int(out.shape[-2] * 2), int(out.shape[-1] * 2))
        out = _interpolate(out, size)
        return self.out_conv(out)


class _Scratch(nn.Module):
    """The fusion pyramid and output convolutions (the checkpoint's ``scratch.*`` keys)."""

    def __init__(self, in_channels: Sequence[int], features: int, output_dim: int, feature_only: bool):
        super().__init__()
        # The pyramid's own 3x3 convolutions are the only ones without a bias.
        self.layer1_rn = nn.Conv2d(in_channels[0], features, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer2_rn = nn.Conv2d(in_channels[1], features, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer3_rn = nn.Conv2d(in_channels[2], features, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer4_rn = nn.Conv2d(in_channels[3], features, kernel_size=3, stride=1, padding=1, bias=False)
        self.refinenet1 = FeatureFusionBlock(features)
        self.refinenet2 = FeatureFusionBlock(features)
        self.refinenet3 = FeatureFusionBlock(features)
        self.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        self.output_conv2: nn.Sequential | None = None
        if feature_only:
            self.output_conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1)
        else:
            self.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, stride=1, padding=1)
            self.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, kernel_size=3, stride=1, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, output_dim, kernel_size=1, stride=1, padding=0),
            )

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        """Fuse the four resized maps, finest first, into one map at twice the finest resolution."""
        layer1 = self.layer1_rn(pyramid[0])
        layer2 = self.layer2_rn(pyramid[1])
        layer3 = self.layer3_rn(pyramid[2])
        layer4 = self.layer4_rn(pyramid[3])
        pyramid.clear()  # the caller's references to the unfused maps go; free them early
        out = self.refinenet4(layer4, size=tuple(layer3.shape[2:]))
        del layer4
        out = self.refinenet3(out, layer3, size=tuple(layer2.shape[2:]))
        del layer3
        out = self.refinenet2(out, layer2, size=tuple(layer1.shape[2:]))
        del layer2
        out = self.refinenet1(out, layer1)
        del layer1
        return self.output_conv1(out)


class DPTHead(nn.Module):
    """Dense prediction head on four aggregator layers (VGGT's depth and point heads).

    Parameters
    ----------
    dim_in : int
        Channels of the aggregated tokens (``2 * embed_dim``).
    patch_size : int
        Patch size, pixels (VGGT builds both heads with 14).
    output_dim : int
        Output channels including the confidence (2 for depth, 4 for points).
    activation : str
        Activation of the prediction channels: ``"exp"``, ``"inv_log"`` (``sign(y) expm1|y|``),
        ``"linear"``, ``"relu"``, ``"sigmoid"``, ``"norm"``, ``"norm_exp"`` or ``"xy_inv_log"``.
    conf_activation : str
        Activation of the confidence channel: ``"expp1"`` (``1 + exp``), ``"expp0"`` or ``"sigmoid"``.
    features : int
        Channels of the fusion pyramid.
    out_channels : sequence of 4 int
        Channels of the four projected layers.
    intermediate_layer_idx : sequence of 4 int
        Absolute layer numbers read from the aggregator's outputs.
    pos_embed : bool
        Add the sin-cos UV positional embedding after projection and before the output convs.
    feature_only : bool
        Return the fused feature map instead of predictions (the track head's feature extractor).
    down_ratio : int
        Output resolution divisor for ``feature_only`` use.
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
    ):
        super().__init__()
        if len(out_channels) != 4 or len(intermediate_layer_idx) != 4:
            raise ValueError("out_channels and intermediate_layer_idx must each have 4 entries")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use one of {_ACTIVATIONS}")
        if conf_activation not in _CONF_ACTIVATIONS:
            raise ValueError(f"unknown conf_activation {conf_activation!r}; use one of {_CONF_ACTIVATIONS}")
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self.intermediate_layer_idx = tuple(int(i) for i in intermediate_layer_idx)

        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(
            nn.Conv2d(dim_in, oc, kernel_size=1, stride=1, padding=0) for oc in out_channels
        )
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4, padding=0),
                nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2, padding=0),
                nn.Identity(),
                nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = _Scratch(out_channels, features, output_dim, feature_only)

    def forward(
        self,
        aggregated_tokens_list: Sequence[torch.Tensor],
        images: torch.Tensor,
        patch_start_idx: int,
        frames_chunk_size: int | None = 8,
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Predict per-pixel outputs, ``frames_chunk_size`` frames at a time.

        Parameters
        ----------
        aggregated_tokens_list : sequence of Tensor
            The aggregator's per-layer outputs ``[B, S, N, 2C]`` (a list or a
            :class:`LayerSelectView` holding at least ``intermediate_layer_idx``).
        images : Tensor
            ``[B, S, 3, H, W]``; only its shape is used.
        patch_start_idx : int
            Index of the first patch token.
        frames_chunk_size : int or None
            Frames processed together (bounds memory; the result does not depend on it).
            ``None`` processes all at once.

        Returns
        -------
        (preds, conf) : tuple of Tensor
            ``preds [B, S, H, W, output_dim - 1]`` and ``conf [B, S, H, W]``.
        features : Tensor
            With ``feature_only``: ``[B, S, features, H / down_ratio, W / down_ratio]``.
        """
        frames = images.shape[1]
        if frames_chunk_size is None or frames_chunk_size >= frames:
            return self._forward_frames(aggregated_tokens_list, images, patch_start_idx, 0, frames)
        if frames_chunk_size <= 0:
            raise ValueError(f"frames_chunk_size must be positive or None, got {frames_chunk_size}")
        chunks = [
            self._forward_frames(
                aggregated_tokens_list, images, patch_start_idx, start, min(start + frames_chunk_size, frames)
            )
            for start in range(0, frames, frames_chunk_size)
        ]
        if self.feature_only:
            return torch.cat(chunks, dim=1)  # type: ignore[arg-type]  # feature_only chunks are tensors
        return torch.cat([c[0] for c in chunks], dim=1), torch.cat([c[1] for c in chunks], dim=1)

    def _forward_frames(
        self,
        tokens_list: Sequence[torch.Tensor],
        images: torch.Tensor,
        patch_start_idx: int,
        start: int,
        end: int,
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        batch = images.shape[0]
        frames = end - start
        height, width = images.shape[-2:]
        patch_h, patch_w = height // self.patch_size, width // self.patch_size

        pyramid = []
        for level, layer in enumerate(self.intermediate_layer_idx):
            x = tokens_list[layer][:, start:end, patch_start_idx:]
            x = x.reshape(batch * frames, -1, x.shape[-1]).to(self.norm.weight.dtype)
            x = self.norm(x)
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], patch_h, patch_w)
            x = self.projects[level](x)
            if self.pos_embed:
                x = _add_positional_embedding(x, width, height)
            pyramid.append(self.resize_layers[level](x))

        out = self.scratch(pyramid)
        out = _interpolate(
            out,
            (
                int(patch_h * self.patch_size / self.down_ratio),
                int(patch_w * self.patch_size / self.down_ratio),
            ),
        )
        if self.pos_embed:
            out = _add_positional_embedding(out, width, height)
        if self.feature_only:
            return out.reshape(batch, frames, *out.shape[1:])
        assert self.scratch.output_conv2 is not None  # built whenever feature_only is False
        out = self.scratch.output_conv2(out)
        preds, conf = self._activate(out)
        return preds.reshape(batch, frames, *preds.shape[1:]), conf.reshape(batch, frames, *conf.shape[1:])

    def _activate(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channels_last = out.permute(0, 2, 3, 1)
        y = channels_last[..., :-1]
        conf = channels_last[..., -1]
        if self.activation == "exp":
            preds = torch.exp(y)
        elif self.activation == "inv_log":
            preds = _inverse_log(y)
        elif self.activation == "linear":
            preds = y
        elif self.activation == "relu":
            preds = F.relu(y)
        elif self.activation == "sigmoid":
            preds = torch.sigmoid(y)
        elif self.activation == "norm":
            preds = y / y.norm(dim=-1, keepdim=True)
        elif self.activation == "norm_exp":
            length = y.norm(dim=-1, keepdim=True).clamp(min=1e-8)
            preds = (y / length) * torch.expm1(length)
        else:  # "xy_inv_log"
            xy, z = y.split([2, 1], dim=-1)
            z = _inverse_log(z)
            preds = torch.cat([xy * z, z], dim=-1)

        if self.conf_activation == "expp1":
            conf = 1 + conf.exp()
        elif self.conf_activation == "expp0":
            conf = conf.exp()
        else:
            conf = torch.sigmoid(conf)
        return preds, conf
