"""The VGGT model: aggregator plus camera, depth, point and track heads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from featstore.models.vggt.aggregator import (
    Aggregator,
    LayerSelection,
    LayerSelectView,
    normalize_layer_selection,
)
from featstore.models.vggt.camera_head import CameraHead
from featstore.models.vggt.dpt_head import DPTHead
from featstore.models.vggt.track_head import TRACKING_NOT_IMPLEMENTED, TrackHead

__all__ = ["VGGT"]


@contextlib.contextmanager
def _full_precision(device_type: str) -> Iterator[None]:
    """Disable autocast on ``device_type``: the heads are trained and evaluated in float32."""
    if device_type in ("cuda", "cpu", "xpu", "mps"):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


class VGGT(nn.Module):
    """Visual Geometry Grounded Transformer (VGGT-1B by default), checkpoint-compatible.

    Parameters
    ----------
    img_size : int
        Training image size, pixels.
    patch_size : int
        Patch size of the aggregator, pixels (the DPT heads always use 14, as the reference does).
    embed_dim : int
        Aggregator width ``C``; heads read ``2C`` channels.
    enable_camera, enable_point, enable_depth, enable_track : bool
        Which heads to build. A disabled head has no weights (its checkpoint keys are skipped by
        :func:`load_vggt`) and no cost.
    selected_layer_idx : int, iterable of int, or None
        Aggregator layers to keep and return as ``predictions["aggregated_tokens"]`` (absolute
        numbers, negatives count from the end). The aggregator also keeps what the enabled heads
        read (the camera head the last layer, DPT heads their ``intermediate_layer_idx``) and
        stops after the deepest layer needed: disable the heads to stop early. ``None`` keeps the
        reference behaviour (all layers, nothing extra returned).
    aggregator_kwargs : dict, optional
        Extra :class:`Aggregator` arguments (``depth``, ``num_heads``, ``patch_embed`` ...); they
        override the defaults, including ``img_size``, ``patch_size`` and ``embed_dim``.
    camera_head_kwargs, depth_head_kwargs : dict, optional
        Extra :class:`CameraHead` and depth :class:`DPTHead` arguments.
    point_head_kwargs, track_head_kwargs : dict, optional
        Extra point :class:`DPTHead` and :class:`TrackHead` arguments (the DPT and track heads'
        ``intermediate_layer_idx`` must exist in a shallower aggregator).

    Attributes
    ----------
    config : dict
        The resolved constructor arguments (JSON-serializable), e.g. for fingerprints.
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        enable_camera: bool = True,
        enable_point: bool = True,
        enable_depth: bool = True,
        enable_track: bool = True,
        *,
        selected_layer_idx: LayerSelection = None,
        aggregator_kwargs: Mapping[str, Any] | None = None,
        camera_head_kwargs: Mapping[str, Any] | None = None,
        depth_head_kwargs: Mapping[str, Any] | None = None,
        point_head_kwargs: Mapping[str, Any] | None = None,
        track_head_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        aggregator_args: dict[str, Any] = {
            "img_size": img_size,
            "patch_size": patch_size,
            "embed_dim": embed_dim,
        }
        aggregator_args.update(aggregator_kwargs or {})
        if "selected_layer_idx" in aggregator_args:
            raise ValueError("pass selected_layer_idx to VGGT itself, not in aggregator_kwargs")
        self.aggregator = Aggregator(**aggregator_args)
        dim_in = 2 * self.aggregator.embed_dim

        camera_args: dict[str, Any] = dict(camera_head_kwargs or {})
        point_args: dict[str, Any] = {"output_dim": 4, "activation": "inv_log", "conf_activation": "expp1"}
        point_args.update(point_head_kwargs or {})
        depth_args: dict[str, Any] = {"output_dim": 2, "activation": "exp", "conf_activation": "expp1"}
        depth_args.update(depth_head_kwargs or {})
        track_args: dict[str, Any] = {"patch_size": self.aggregator.patch_size}
        track_args.update(track_head_kwargs or {})

        self.camera_head = CameraHead(dim_in=dim_in, **camera_args) if enable_camera else None
        self.point_head = DPTHead(dim_in=dim_in, **point_args) if enable_point else None
        self.depth_head = DPTHead(dim_in=dim_in, **depth_args) if enable_depth else None
        self.track_head = TrackHead(dim_in=dim_in, **track_args) if enable_track else None

        depth = self.aggregator.depth
        for name, head in (
            ("point", self.point_head),
            ("depth", self.depth_head),
            ("track", self.track_head),
        ):
            if head is not None and any(not -depth <= i < depth for i in head.intermediate_layer_idx):
                raise ValueError(
                    f"the {name} head reads layers {list(head.intermediate_layer_idx)} but the aggregator "
                    f"has {depth}; pass intermediate_layer_idx in {name}_head_kwargs"
                )

        self.config: dict[str, Any] = {
            "img_size": img_size,
            "patch_size": patch_size,
            "embed_dim": embed_dim,
            "enable_camera": enable_camera,
            "enable_point": enable_point,
            "enable_depth": enable_depth,
            "enable_track": enable_track,
            "aggregator_kwargs": _jsonable(aggregator_kwargs),
            "camera_head_kwargs": _jsonable(camera_head_kwargs),
            "depth_head_kwargs": _jsonable(depth_head_kwargs),
            "point_head_kwargs": _jsonable(point_head_kwargs),
            "track_head_kwargs": _jsonable(track_head_kwargs),
        }
        self.selected_layer_idx = selected_layer_idx  # type: ignore[assignment]

    def head_layers(self) -> tuple[int, ...]:
        """Absolute aggregator layers read by the enabled heads, ascending.

        Returns
        -------
        tuple of int
            The last layer for the camera head, ``intermediate_layer_idx`` for the DPT and track heads.
        """
        depth = self.aggregator.depth
        layers: set[int] = set()
        if self.camera_head is not None:
            layers.add(depth - 1)
        for head in (self.depth_head, self.point_head, self.track_head):
            if head is not None:
                layers.update(i % depth for i in head.intermediate_layer_idx)
        return tuple(sorted(layers))

    @property
    def selected_layer_idx(self) -> tuple[int, ...] | None:
        """The layers the caller asked for (sorted absolute numbers), or ``None``."""
        return self._selected_layer_idx

    @selected_layer_idx.setter
    def selected_layer_idx(self, selection: LayerSelection) -> None:
        selected = normalize_layer_selection(selection, self.aggregator.depth)
        self._selected_layer_idx = selected
        # The aggregator keeps the union of the caller's layers and the heads' layers.
        self.aggregator.selected_layer_idx = (
            None if selected is None else sorted({*selected, *self.head_layers()})
        )

    def forward(
        self,
        images: torch.Tensor,
        query_points: torch.Tensor | None = None,
        *,
        frames_chunk_size: int | None = 8,
    ) -> dict[str, Any]:
        """Predict cameras, depth and world points for sequences of images.

        Parameters
        ----------
        images : Tensor
            ``[B, S, 3, H, W]`` or ``[S, 3, H, W]`` (then ``B = 1``), values in [0, 1] (not
            normalized: the aggregator does it), ``H`` and ``W`` multiples of 14.
        query_points : Tensor, optional
            Points to track, ``[N, 2]`` or ``[B, N, 2]`` pixels. Point tracking is not implemented:
            with a track head, passing points raises :class:`NotImplementedError`.
        frames_chunk_size : int or None
            Frames the DPT heads process at once (bounds memory; results do not depend on it).

        Returns
        -------
        dict
            ``pose_enc [B, S, 9]`` (last refinement), ``pose_enc_list`` (every refinement),
            ``depth [B, S, H, W, 1]``, ``depth_conf [B, S, H, W]``, ``world_points [B, S, H, W, 3]``,
            ``world_points_conf [B, S, H, W]`` for the enabled heads; ``images`` (the 5-D input)
            in eval mode; with a layer selection, ``aggregated_tokens`` (a
            :class:`LayerSelectView` of the selected layers, ``[B, S, N, 2C]`` each) and
            ``patch_start_idx``.
        """
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if query_points is not None and self.track_head is not None:
            raise NotImplementedError(TRACKING_NOT_IMPLEMENTED)

        aggregated_tokens, patch_start_idx = self.aggregator(images)
        predictions: dict[str, Any] = {}
        with _full_precision(images.device.type):
            if self.camera_head is not None:
                pose_enc_list = self.camera_head(aggregated_tokens)
                predictions["pose_enc"] = pose_enc_list[-1]
                predictions["pose_enc_list"] = pose_enc_list
            for head, key in ((self.depth_head, "depth"), (self.point_head, "world_points")):
                if head is not None:
                    predictions[key], predictions[f"{key}_conf"] = head(
                        aggregated_tokens,
                        images=images,
                        patch_start_idx=patch_start_idx,
                        frames_chunk_size=frames_chunk_size,
                    )

        if self._selected_layer_idx is not None:
            predictions["aggregated_tokens"] = LayerSelectView(
                self.aggregator.depth, {layer: aggregated_tokens[layer] for layer in self._selected_layer_idx}
            )
            predictions["patch_start_idx"] = patch_start_idx
        if not self.training:
            predictions["images"] = images
        return predictions


def _jsonable(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in (kwargs or {}).items()}
