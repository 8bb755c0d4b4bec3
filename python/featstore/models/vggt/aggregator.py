"""VGGT's aggregator (alternating frame and global attention) and its layer-selecting output view."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import cast, overload

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from featstore.models.vggt.dinov2 import DINOV2_VARIANTS, DinoVisionTransformer
from featstore.models.vggt.kv_cache import KVCache
from featstore.models.vggt.layers import Block, PatchEmbed, RotaryPositionEmbedding2D, patch_positions

__all__ = ["Aggregator", "LayerSelectView", "LayerSelection", "normalize_layer_selection"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LayerSelection = int | Iterable[int] | None
"""A layer selection as users give it: one layer, several, or ``None`` for all."""


def normalize_layer_selection(selection: LayerSelection, depth: int) -> tuple[int, ...] | None:
    """Turn a user's layer selection into sorted, unique, absolute layer numbers.

    Parameters
    ----------
    selection : int, iterable of int, or None
        Absolute layer numbers; negative numbers count from the end (``-1`` is the last layer).
        ``None`` means "all layers, as a plain list" and is returned unchanged.
    depth : int
        Number of layers of the aggregator.

    Returns
    -------
    tuple of int or None
        Sorted absolute layer numbers in ``[0, depth)``.

    Raises
    ------
    ValueError
        For an empty selection or a layer outside ``[-depth, depth)``.
    TypeError
        For something that is not an integer.
    """
    if selection is None:
        return None
    items = [selection] if isinstance(selection, numbers.Integral) else list(cast(Iterable[int], selection))
    if not items:
        raise ValueError("selected_layer_idx is empty: select at least one layer, or pass None to keep all")
    layers = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(f"selected_layer_idx must hold integers, got {item!r}")
        index = int(item)
        if not -depth <= index < depth:
            raise ValueError(
                f"layer {index} does not exist: the aggregator has {depth} layers, "
                f"so use 0..{depth - 1} or -{depth}..-1"
            )
        layers.add(index % depth)
    return tuple(sorted(layers))


class LayerSelectView:
    """The aggregator's per-layer outputs, of which only the selected layers are kept.

    It stands in for the reference's list of ``depth`` tensors: ``len(view) == depth`` and
    ``view[i]`` takes the absolute layer number ``i`` (negative numbers count from the end), so
    the camera head (``view[-1]``) and the DPT heads (``view[4]``, ``view[11]`` ...) run on it
    unchanged. A layer that was not kept raises :class:`KeyError` naming it, never a silently
    wrong tensor.

    A view cannot be iterated (that would either break ``len`` or hit a missing layer): use
    :meth:`items` for ``(layer, tensor)`` pairs, or :attr:`layers`.

    Parameters
    ----------
    depth : int
        Number of layers of the aggregator that produced it.
    tensors : Mapping[int, Tensor]
        The kept layers by absolute layer number, each ``[B, S, N, 2C]``.
    """

    def __init__(self, depth: int, tensors: Mapping[int, torch.Tensor]):
        for layer in tensors:
            if not 0 <= layer < depth:
                raise ValueError(f"layer {layer} is outside 0..{depth - 1}")
        self._depth = depth
        self._tensors = dict(sorted(tensors.items()))

    @property
    def depth(self) -> int:
        """Number of layers of the aggregator (also ``len(self)``)."""
        return self._depth

    @property
    def layers(self) -> tuple[int, ...]:
        """Absolute numbers of the kept layers, ascending."""
        return tuple(self._tensors)

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept layer outputs."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def __len__(self) -> int:
        return self._depth

    def _absolute(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"layer indices must be integers, got {index!r}")
        index = int(index)
        if not -self._depth <= index < self._depth:
            raise IndexError(f"layer {index} is out of range for {self._depth} layers")
        return index % self._depth

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:
        """The output of absolute layer ``index`` (a slice gives a list; every layer in it must be kept)."""
        if isinstance(index, slice):
            return [self._layer(i) for i in range(self._depth)[index]]
        return self._layer(index)

    def _layer(self, index: int) -> torch.Tensor:
        layer = self._absolute(index)
        try:
            return self._tensors[layer]
        except KeyError:
            asked = f"{index} (layer {layer})" if index != layer else f"{layer}"
            raise KeyError(
                f"layer {asked} was not kept by the aggregator; kept layers: {list(self._tensors)}. "
                "Add it to selected_layer_idx."
            ) from None

    def __contains__(self, index: object) -> bool:
        """Whether absolute layer ``index`` was kept (not whether a tensor is an element)."""
        try:
            return self._absolute(index) in self._tensors  # type: ignore[arg-type]  # checked inside
        except (TypeError, IndexError):
            return False

    def __iter__(self) -> Iterator[torch.Tensor]:
        raise TypeError(
            "a LayerSelectView holds only some layers, so it cannot be iterated like the full list; "
            "use .items() or .layers"
        )

    def __reversed__(self) -> Iterator[torch.Tensor]:
        raise TypeError("a LayerSelectView cannot be iterated; use .items() or .layers")

    def items(self) -> list[tuple[int, torch.Tensor]]:
        """``(layer, tensor)`` pairs of the kept layers, ascending by layer."""
        return list(self._tensors.items())

    def get(self, index: int, default: torch.Tensor | None = None) -> torch.Tensor | None:
        """The output of layer ``index`` if it was kept, else ``default``."""
        return self._tensors.get(self._absolute(index), default)

    def __repr__(self) -> str:
        shape = next(iter(self._tensors.values())).shape if self._tensors else None
        return (
            f"LayerSelectView(depth={self._depth}, layers={list(self._tensors)}, shape={tuple(shape or ())})"
        )


class Aggregator(nn.Module):
    """VGGT's aggregator: patch embed, then alternating frame and global attention.

    Parameters
    ----------
    img_size : int
        Training image size, pixels (sizes the DINOv2 positional embedding).
    patch_size : int
        Patch size, pixels.
    embed_dim : int
        Token channels ``C``; each layer outputs ``2C`` (frame and global outputs concatenated).
    depth : int
        Number of layers, i.e. of frame blocks and of global blocks.
    num_heads : int
        Attention heads of the frame and global blocks.
    mlp_ratio : float
        MLP width relative to ``embed_dim``.
    num_register_tokens : int
        Register tokens per frame (also the DINOv2 patch embed's).
    patch_embed : str
        ``"conv"`` or one of ``"dinov2_vit{s,b,l}14_reg"`` (its width must equal ``embed_dim``).
    aa_order : sequence of str
        Order of the block types within a group, e.g. ``("frame", "global")``.
    aa_block_size : int
        Blocks of each type per group; ``depth`` must be a multiple of it.
    qk_norm : bool
        LayerNorm on queries and keys.
    rope_freq : float
        Base frequency of the 2D RoPE (must be positive).
    init_values : float
        Initial LayerScale value.
    selected_layer_idx : int, iterable of int, or None
        Layers to keep (absolute numbers, negatives count from the end). ``None`` keeps every
        layer and returns a plain list, as the reference does; otherwise the forward returns a
        :class:`LayerSelectView` and stops after the deepest selected layer. Settable later
        through the attribute of the same name.

    Notes
    -----
    Inputs are ``[B, S, 3, H, W]`` images with values in [0, 1]; the aggregator normalizes them
    itself, so callers must not.

    Besides the bidirectional model, it runs JanusVLN's causal variant: ``causal=True`` on a
    whole sequence, or one frame per call through a :class:`KVCache` from :meth:`new_kv_cache`
    (frame ``k`` of a stream equals frame ``k`` of the causal call on frames ``0..k``).
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
        patch_embed: str = "dinov2_vitl14_reg",
        aa_order: Sequence[str] = ("frame", "global"),
        aa_block_size: int = 1,
        qk_norm: bool = True,
        rope_freq: float = 100,
        init_values: float = 0.01,
        selected_layer_idx: LayerSelection = None,
    ):
        super().__init__()
        self._resnet_mean: torch.Tensor
        self._resnet_std: torch.Tensor
        if depth % aa_block_size != 0:
            raise ValueError(f"depth={depth} must be a multiple of aa_block_size={aa_block_size}")
        if set(aa_order) != {"frame", "global"}:
            raise ValueError(
                f"aa_order must name both 'frame' and 'global' (and nothing else), got {list(aa_order)}"
            )
        if rope_freq <= 0:
            raise ValueError(f"rope_freq must be positive (VGGT always uses RoPE), got {rope_freq}")

        self.patch_embed = self._build_patch_embed(
            patch_embed, img_size, patch_size, embed_dim, num_register_tokens
        )
        self.rope = RotaryPositionEmbedding2D(frequency=rope_freq)
        self.frame_blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, init_values=init_values, qk_norm=qk_norm, rope=self.rope)
            for _ in range(depth)
        )
        self.global_blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, init_values=init_values, qk_norm=qk_norm, rope=self.rope)
            for _ in range(depth)
        )
        # Index 0 along dim 1 is for each sequence's first frame, index 1 for all other frames.
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, embed_dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, num_register_tokens, embed_dim))
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)

        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.aa_order = tuple(aa_order)
        self.aa_block_size = aa_block_size
        self.patch_start_idx = 1 + num_register_tokens
        self.reset_constant_buffers()
        self.selected_layer_idx = selected_layer_idx  # type: ignore[assignment]

    @staticmethod
    def _build_patch_embed(
        kind: str, img_size: int, patch_size: int, embed_dim: int, registers: int
    ) -> nn.Module:
        if kind == "conv":
            return PatchEmbed(patch_size=patch_size, in_chans=3, embed_dim=embed_dim)
        if kind not in DINOV2_VARIANTS:
            raise ValueError(f"unknown patch_embed {kind!r}; use 'conv' or one of {sorted(DINOV2_VARIANTS)}")
        spec = DINOV2_VARIANTS[kind]
        if spec.embed_dim != embed_dim:
            raise ValueError(
                f"patch_embed {kind!r} produces {spec.embed_dim} channels but embed_dim={embed_dim}"
            )
        vit = DinoVisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            num_register_tokens=registers,
            init_values=1.0,
        )
        vit.mask_token.requires_grad_(False)
        return vit

    def reset_constant_buffers(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """(Re)create the non-persistent normalization buffers.

        A model built on the meta device and filled with ``load_state_dict(assign=True)`` gets
        no values for buffers that are not in the checkpoint; :func:`load_vggt` calls this.

        Parameters
        ----------
        device : torch.device, str, or None
            Where to put them; ``None`` uses the default device.
        dtype : torch.dtype or None
            Their dtype (that of the weights); ``None`` is float32.
        """
        dtype = dtype or torch.float32
        mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=torch.float32).view(1, 1, 3, 1, 1).to(dtype)
        std = torch.tensor(IMAGENET_STD, device=device, dtype=torch.float32).view(1, 1, 3, 1, 1).to(dtype)
        self.register_buffer("_resnet_mean", mean, persistent=False)
        self.register_buffer("_resnet_std", std, persistent=False)

    @property
    def selected_layer_idx(self) -> tuple[int, ...] | None:
        """Kept layers as sorted absolute numbers, or ``None`` when every layer is returned as a list."""
        return self._selected_layer_idx

    @selected_layer_idx.setter
    def selected_layer_idx(self, selection: LayerSelection) -> None:
        self._selected_layer_idx = normalize_layer_selection(selection, self.depth)

    def new_kv_cache(self, window: Sequence[int] | None = None) -> KVCache:
        """A fresh key/value cache for streaming one batch of sequences frame by frame.

        Parameters
        ----------
        window : (int, int) or None
            ``(start, recent)``: once more than ``start + recent`` frames are cached, keep the
            keys of the first ``start`` and the last ``recent`` frames only (JanusVLN evaluates
            with (8, 48)); ``None`` keeps every frame.

        Returns
        -------
        KVCache
            Pass it as ``kv_cache`` to every call of the stream:
            ``tokens, patch_start_idx = aggregator(images[:, k:k + 1], kv_cache=cache)``.
        """
        return KVCache(self.depth, window=window)

    def _run_block(
        self, block: nn.Module, tokens: torch.Tensor, pos: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return checkpoint(block, tokens, pos, attn_mask, use_reentrant=False)
        return block(tokens, pos=pos, attn_mask=attn_mask)

    def _run_block_with_past(
        self, block: Block, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache, index: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        past_keys, past_values = cache.past(index)
        if self.training and torch.is_grad_enabled():
            return cast(
                tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                checkpoint(block.forward_with_past, tokens, pos, past_keys, past_values, use_reentrant=False),
            )
        return block.forward_with_past(tokens, pos, past_keys, past_values)

    def forward(
        self,
        images: torch.Tensor,
        causal: bool = False,
        *,
        kv_cache: KVCache | None = None,
        frame_mask: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor] | LayerSelectView, int]:
        """Aggregate a batch of image sequences.

        Parameters
        ----------
        images : Tensor
            ``[B, S, 3, H, W]`` with values in [0, 1]; ``H`` and ``W`` multiples of the patch size.
        causal : bool
            In every global block, frame ``i`` attends to frames ``0..i`` only (JanusVLN's
            computation); frame blocks, special tokens and RoPE positions are unchanged.
        kv_cache : KVCache, optional
            Stream one frame (``S = 1``) of the sequences cached in it (from
            :meth:`new_kv_cache`): the frame attends to the cached frames and itself, and its
            raw keys and values join the cache. Frame ``k`` of a stream gives frame ``k`` of the
            causal call on frames ``0..k``. The first frame of a cache is the sequences' frame 0
            (special-token slot 0), every later one uses slot 1.
        frame_mask : Tensor, optional
            bool ``[S, S]``, True where frame ``i`` attends to frame ``j`` in the global blocks
            (diagonal all True); generalizes ``causal`` (the lower triangle). A windowed stream
            equals the call with :func:`window_frame_mask`.

        Returns
        -------
        layers : list of Tensor or LayerSelectView
            Per-layer outputs ``[B, S, N, 2C]`` (``N = patch_start_idx + (H/p)(W/p)`` tokens
            per frame, frame-attention output first on the channel axis): all ``depth`` as a list
            when ``selected_layer_idx`` is None, else a view holding the selected layers.
        patch_start_idx : int
            Index of the first patch token (after the camera and register tokens).
        """
        selection = self._selected_layer_idx
        layers = range(self.depth) if selection is None else selection
        kept = self._aggregate(images, layers, self._frame_mask(images, causal, frame_mask, kv_cache), kv_cache)
        if selection is None:
            return [kept[layer] for layer in range(self.depth)], self.patch_start_idx
        return LayerSelectView(self.depth, kept), self.patch_start_idx

    def forward_layers(
        self,
        images: torch.Tensor,
        layers: LayerSelection,
        causal: bool = False,
        *,
        kv_cache: KVCache | None = None,
        frame_mask: torch.Tensor | None = None,
    ) -> tuple[LayerSelectView, int]:
        """Aggregate keeping ``layers``, whatever ``selected_layer_idx`` says.

        Parameters
        ----------
        images : Tensor
            ``[B, S, 3, H, W]`` with values in [0, 1].
        layers : int or iterable of int
            Absolute layer numbers to keep (negatives count from the end).
        causal, kv_cache, frame_mask
            As for :meth:`forward`.

        Returns
        -------
        layers : LayerSelectView
            The kept layers; nothing after the deepest of them is computed.
        patch_start_idx : int
            Index of the first patch token.
        """
        selection = normalize_layer_selection(layers, self.depth)
        if selection is None:
            raise ValueError(
                "forward_layers needs a layer selection; call the aggregator itself for all layers"
            )
        mask = self._frame_mask(images, causal, frame_mask, kv_cache)
        return LayerSelectView(self.depth, self._aggregate(images, selection, mask, kv_cache)), self.patch_start_idx

    @staticmethod
    def _frame_mask(
        images: torch.Tensor, causal: bool, frame_mask: torch.Tensor | None, kv_cache: KVCache | None
    ) -> torch.Tensor | None:
        """The ``[S, S]`` frame visibility a call asks for, or None for full (bidirectional) attention."""
        frames = images.shape[1] if images.dim() == 5 else 0
        if kv_cache is not None:
            if frame_mask is not None:
                raise ValueError("pass either kv_cache or frame_mask: a stream's visibility is set by its cache")
            if frames != 1:
                raise ValueError(
                    f"with a kv_cache, feed one frame per call ([B, 1, 3, H, W]), got {tuple(images.shape)}; "
                    "stream_history streams a whole history"
                )
            return None
        if frame_mask is not None:
            if causal:
                raise ValueError("pass either causal=True or a frame_mask, not both")
            if frame_mask.dtype != torch.bool or tuple(frame_mask.shape) != (frames, frames):
                raise ValueError(
                    f"frame_mask must be a bool [S, S] = [{frames}, {frames}] tensor, "
                    f"got {frame_mask.dtype} {tuple(frame_mask.shape)}"
                )
            if not bool(frame_mask.diagonal().all()):
                raise ValueError("frame_mask must let every frame attend to itself (its diagonal must be True)")
            return frame_mask
        if causal and frames > 1:
            return torch.ones(frames, frames, dtype=torch.bool).tril()
        return None

    def _aggregate(
        self,
        images: torch.Tensor,
        layers: Iterable[int],
        frame_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> dict[int, torch.Tensor]:
        """Run the blocks up to the deepest of ``layers`` (absolute numbers), keeping only those layers.

        ``frame_mask`` restricts which frames the global blocks attend to; with ``kv_cache`` the
        single frame of ``images`` joins that stream.
        """
        if images.dim() != 5:
            raise ValueError(f"expected images of shape [B, S, 3, H, W], got {tuple(images.shape)}")
        batch, frames, channels, height, width = images.shape
        if channels != 3:
            raise ValueError(f"expected 3 image channels, got {channels} (shape {tuple(images.shape)})")
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                "preprocess_images produces valid sizes"
            )
        keep = set(layers)
        last_group = max(keep) // self.aa_block_size
        if kv_cache is not None:
            tokens_per_frame = self.patch_start_idx + (height // self.patch_size) * (width // self.patch_size)
            kv_cache.check_frame(batch, tokens_per_frame, (last_group + 1) * self.aa_block_size)
        # A stream's first frame is its sequences' frame 0; every later one (also after eviction) is not.
        starts_sequence = kv_cache is None or kv_cache.frames_seen == 0

        images = (images - self._resnet_mean) / self._resnet_std
        images = images.reshape(batch * frames, channels, height, width)
        patch_tokens = self.patch_embed(images)
        del images

        camera = self._per_frame(self.camera_token, batch, frames, starts_sequence)
        registers = self._per_frame(self.register_token, batch, frames, starts_sequence)
        tokens = torch.cat([camera, registers, patch_tokens], dim=1)
        del patch_tokens, camera, registers
        per_frame = tokens.shape[1]
        pos = patch_positions(
            batch * frames,
            height // self.patch_size,
            width // self.patch_size,
            self.patch_start_idx,
            device=tokens.device,
        )

        # Frame attention sees [B*S, N] tokens, global attention [B, S*N]; both use per-frame positions.
        shapes = {
            "frame": (batch * frames, per_frame, self.embed_dim),
            "global": (batch, frames * per_frame, self.embed_dim),
        }
        positions = {kind: pos.reshape(*shape[:2], 2) for kind, shape in shapes.items()}
        masks = {"frame": None, "global": self._token_mask(frame_mask, per_frame, tokens.device)}
        block_lists = {"frame": self.frame_blocks, "global": self.global_blocks}

        kept: dict[int, torch.Tensor] = {}
        new_keys: list[torch.Tensor] = []
        new_values: list[torch.Tensor] = []
        block_index = {"frame": 0, "global": 0}
        for group in range(last_group + 1):
            outputs: dict[str, list[torch.Tensor]] = {}
            for kind in self.aa_order:
                blocks = block_lists[kind]
                tokens = tokens.reshape(shapes[kind])
                pos_here = positions[kind]
                outputs[kind] = []
                for _ in range(self.aa_block_size):
                    index = block_index[kind]
                    if kind == "global" and kv_cache is not None:
                        tokens, keys, values = self._run_block_with_past(
                            cast(Block, blocks[index]), tokens, pos_here, kv_cache, index
                        )
                        new_keys.append(keys)
                        new_values.append(values)
                    else:
                        tokens = self._run_block(blocks[index], tokens, pos_here, masks[kind])
                    block_index[kind] += 1
                    outputs[kind].append(tokens.view(batch, frames, per_frame, self.embed_dim))
            for offset in range(self.aa_block_size):
                layer = group * self.aa_block_size + offset
                if layer in keep:
                    kept[layer] = torch.cat([outputs["frame"][offset], outputs["global"][offset]], dim=-1)
            # Only the kept concatenations outlive the group; the blocks' outputs are freed here.
            del outputs
        if kv_cache is not None:
            kv_cache.append_frame(new_keys, new_values)
        return kept

    @staticmethod
    def _token_mask(frame_mask: torch.Tensor | None, per_frame: int, device: torch.device) -> torch.Tensor | None:
        """Expand a ``[S, S]`` frame visibility to the ``[S*N, S*N]`` token mask of a global block."""
        if frame_mask is None:
            return None
        mask = frame_mask.to(device)
        return mask.repeat_interleave(per_frame, dim=0).repeat_interleave(per_frame, dim=1)

    @staticmethod
    def _per_frame(token: torch.Tensor, batch: int, frames: int, starts_sequence: bool = True) -> torch.Tensor:
        """Expand a ``[1, 2, k, C]`` special token: slot 0 for frame 0, slot 1 for the others.

        With ``starts_sequence=False`` (a streamed frame after the first) every frame takes slot 1.
        """
        if not starts_sequence:
            return token[:, 1:2].expand(batch, frames, *token.shape[2:]).reshape(batch * frames, *token.shape[2:])
        first = token[:, 0:1].expand(batch, 1, *token.shape[2:])
        others = token[:, 1:2].expand(batch, frames - 1, *token.shape[2:])
        return torch.cat([first, others], dim=1).reshape(batch * frames, *token.shape[2:])
