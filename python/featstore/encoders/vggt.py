"""The ``vggt`` encoder: patch tokens of selected VGGT aggregator layers, one entry per image,
per frame set, or per history (causal streaming, as JanusVLN-style models run VGGT)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from featstore import env
from featstore.encoders.base import digest_of, weights_digest
from featstore.errors import CheckpointError

# A VGGT small enough to run anywhere, for `featstore demo` and tests: random weights.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "aggregator_kwargs": {"depth": 4, "num_heads": 4, "patch_embed": "conv"},
}


def default_stored_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype the aggregator computes in on ``device`` (its autocast dtype: bf16 on Ampere or
    newer, fp16 on older GPUs), fp32 on the CPU: storing more precision than was computed only
    costs space."""
    from featstore.models.vggt.inference import autocast_dtype

    return autocast_dtype(device) or torch.float32


class VGGTEncoder:
    """VGGT aggregator features for single images (``--frames-per-set 1``), frame sets, or
    histories (``history=True``).

    Parameters
    ----------
    model_path : path, optional
        VGGT-1B weights (a ``.pt``/``.safetensors`` file or a directory holding one); defaults to
        ``$VGGT_MODEL_PATH``. Checked when the encoder is made (so a wrong path fails in the
        first second), loaded on :meth:`to`.
    layers : sequence of int
        Aggregator layers to store (absolute, negatives from the end). Default ``(-2,)``: layer
        22, the one JanusVLN-style models read. Several layers are stacked: ``[L, P, 2C]``.
    tokens : {"patch", "all"}
        ``patch`` drops the camera and register tokens (``[P, 2C]`` per image).
    dtype : torch.dtype, optional
        Stored dtype; default bf16 where the GPU supports it, fp16 on other GPUs, fp32 on CPU.
    mode : {"crop", "pad"}
        VGGT's preprocessing.
    config : dict, optional
        ``VGGT(...)`` arguments for weights of another size.
    random_weights_seed : int, optional
        Use :data:`TINY_CONFIG` with random weights instead of a checkpoint (demo and tests only;
        the features mean nothing).
    device : torch.device or str, optional
        Where it will run; decides the default stored dtype (part of the fingerprint).
    frames_per_set : int
        Frames encoded together (:meth:`encode_sets`); part of the fingerprint, since a frame's
        features depend on the frames it was encoded with.
    history : bool
        Encode ordered histories causally (:meth:`encode_history`), as JanusVLN-style models
        do: each frame attends to itself and the frames before it, and a sample's features are
        those of the last frame fed given the whole list. Exclusive with ``frames_per_set > 1``.
    window : (int, int), optional
        ``(start, recent)``: the key/value cache keeps the first ``start`` and the last
        ``recent`` frames (JanusVLN evaluates with ``(8, 48)``); None keeps every frame.
        History mode only.
    reverse : bool
        Feed each history last to first (JanusVLN's ``reference_frame`` other than
        ``"first"``): the stored features are then those of the list's *first* frame, fed last,
        given the whole list. History mode only.
    require_weights : bool
        False (a dry run): no weights path is not an error; :meth:`fingerprint` then raises
        :class:`CheckpointError` (a path given must still exist).

    Attributes
    ----------
    frame_passes : int
        Frames fed through the aggregator by :meth:`encode_history` so far, over all sequences
        of every batch: what a history precompute costs.

    Notes
    -----
    VGGT attends across all frames given together: features of an image computed alone (S=1)
    differ from its features computed with other frames, and are valid only for S=1 use.
    History mode, the fingerprint covers the mode, the window and the order, so entries of
    another setting are never served.
    """

    name = "vggt"

    def __init__(self, model_path: str | os.PathLike[str] | None = None, *, layers: tuple[int, ...] = (-2,),
                 tokens: str = "patch", dtype: torch.dtype | None = None, mode: str = "crop",
                 config: dict[str, Any] | None = None, random_weights_seed: int | None = None,
                 device: torch.device | str | None = None, frames_per_set: int = 1, history: bool = False,
                 window: Sequence[int] | None = None, reverse: bool = False, require_weights: bool = True) -> None:
        if random_weights_seed is None:
            from_flag = bool(model_path)  # else from the environment: the message names which
            model_path = model_path or env.vggt_model_path()
            if not model_path and require_weights:
                raise CheckpointError("no VGGT weights given: pass --vggt-model-path PATH (or set VGGT_MODEL_PATH) "
                                      "to the downloaded VGGT-1B checkpoint")
            if model_path:
                model_path = os.path.abspath(os.fspath(model_path))
                if not os.path.exists(model_path):
                    shown = (f"--vggt-model-path {model_path} (model_path)" if from_flag
                             else f"$VGGT_MODEL_PATH={model_path}")
                    raise CheckpointError(f"VGGT weights not found: {shown} does not exist; point it to the VGGT-1B "
                                          "model file (model.pt or .safetensors) or its directory")
        if tokens not in ("patch", "all"):
            raise ValueError(f"tokens must be 'patch' or 'all', got {tokens!r}")
        if mode not in ("crop", "pad"):
            raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
        if not layers:
            raise ValueError("select at least one layer")
        if frames_per_set < 1:
            raise ValueError(f"frames_per_set must be at least 1, got {frames_per_set}")
        if history and frames_per_set > 1:
            raise ValueError(f"history=True and frames_per_set={frames_per_set} exclude each other: a history is "
                             "encoded causally frame by frame, a frame set bidirectionally; choose one")
        if not history and (window is not None or reverse):
            raise ValueError("window and reverse apply to history mode only: pass history=True (--history)")
        from featstore.models.vggt.kv_cache import normalize_window

        self._frames_per_set = int(frames_per_set)
        self.history = bool(history)
        self.window = normalize_window(window)
        self.reverse = bool(reverse)
        self.frame_passes = 0
        self.model_path = model_path
        self.layers = tuple(int(x) for x in layers)
        self.tokens = tokens
        self.mode = mode
        self.config = dict(TINY_CONFIG if random_weights_seed is not None and config is None else (config or {}))
        self.random_weights_seed = random_weights_seed
        self._dtype = dtype
        self._device: torch.device | None = torch.device(device) if device is not None else None
        self.model: Any = None
        self._fingerprint: str | None = None

    @property
    def frames_per_set(self) -> int:
        """Frames encoded together (1: every image alone)."""
        return self._frames_per_set

    def varying_outputs(self) -> tuple[str, ...]:
        """``("features",)`` with "crop" preprocessing (images of other aspect ratios give other
        token counts; with ``tokens="all"`` too), nothing with "pad" (every image 518x518)."""
        return ("features",) if self.mode == "crop" else ()

    def stored_dtype(self) -> torch.dtype:
        return self._dtype or default_stored_dtype(self._device or "cpu")

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            if self.random_weights_seed is None and not self.model_path:
                raise CheckpointError("no VGGT weights given, so no fingerprint: pass --vggt-model-path PATH (or set "
                                      "VGGT_MODEL_PATH) to the downloaded VGGT-1B checkpoint")
            weights = (f"random-seed-{self.random_weights_seed}" if self.random_weights_seed is not None
                       else weights_digest(self.model_path))  # type: ignore[arg-type]
            # History settings join the digest only in history mode: per-image and frame-set
            # fingerprints (and so their stores) stay what they were.
            history = (("history", self.window, "reverse" if self.reverse else "forward"),) if self.history else ()
            self._fingerprint = digest_of("featstore-vggt-encoder-v1", weights, self.config, self.layers, self.tokens,
                                          str(self.stored_dtype()), self.mode, self.frames_per_set, *history)
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model_path": self.model_path,
                "random_weights": self.random_weights_seed is not None, "layers": list(self.layers),
                "tokens": self.tokens, "dtype": str(self.stored_dtype()).replace("torch.", ""),
                "mode": self.mode, "frames_per_set": self.frames_per_set, "config": self.config,
                **({"history": True, "window": list(self.window) if self.window else None,
                    "reverse": self.reverse} if self.history else {})}

    def to(self, device: torch.device | str) -> VGGTEncoder:
        """Loads the weights (once) onto ``device``; heads are never built."""
        device = torch.device(device)
        if self.model is not None and self._device == device:
            return self
        if self._dtype is None and default_stored_dtype(device) != self.stored_dtype():
            self._fingerprint = None  # the default stored dtype depends on the device
        self._device = device
        from featstore.models.vggt import VGGT, load_vggt

        heads: dict[str, Any] = {"enable_camera": False, "enable_point": False, "enable_depth": False,
                                 "enable_track": False}
        if self.random_weights_seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.random_weights_seed)
                self.model = VGGT(**self.config, **heads)
            self.model.to(device)
        else:
            assert self.model_path is not None
            self.model = load_vggt(self.model_path, device=device, config=self.config or None, **heads)
        self.model.eval()
        return self

    def preprocess(self, path: str) -> torch.Tensor:
        from featstore.models.vggt import preprocess_image_uint8

        return preprocess_image_uint8(path, self.mode)  # type: ignore[arg-type]

    def estimate_entry_bytes(self) -> int:
        """Upper bound of one entry's size: a 518x518 image, every selected layer."""
        dim = 2 * int(self.config.get("embed_dim", 1024))
        tokens = 37 * 37 + (0 if self.tokens == "patch" else 5)
        return len(self.layers) * tokens * dim * self.stored_dtype().itemsize + 4096

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """``features``: ``[B, P, 2C]`` for one layer, ``[B, L, P, 2C]`` for several; each image
        is encoded alone (a set of one)."""
        out = self.encode_sets(batch.unsqueeze(1))
        return {k: v[:, 0] for k, v in out.items()}

    def encode_sets(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frames attend to each other within a set: ``batch`` is ``[B, S, 3, H, W]``;
        ``features`` is ``[B, S, P, 2C]`` (``[B, S, L, P, 2C]`` for several layers)."""
        if self.model is None:
            self.to(batch.device)
        from featstore.models.vggt import extract_layers

        view = extract_layers(self.model, batch, self.layers)
        start = self.model.aggregator.patch_start_idx if self.tokens == "patch" else 0
        per_layer = [view[layer][:, :, start:] for layer in self.layers]
        out = per_layer[0] if len(per_layer) == 1 else torch.stack(per_layer, dim=2)
        return {"features": out.to(self.stored_dtype())}

    @property
    def prefixes_share_a_pass(self) -> bool:
        """Forward order computes every prefix of a list in one pass; reversed order feeds each
        prefix last to first, its own pass."""
        return not self.reverse

    def encode_history(self, batch: torch.Tensor, lengths: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Causal features of every prefix of ``B`` histories streamed together.

        Parameters
        ----------
        batch : Tensor
            ``[B, T, 3, H, W]`` float in [0, 1] on the device: ``B`` lists of ``T`` frames, oldest
            first.
        lengths : sequence of int, optional
            The prefix lengths (1..T) the caller reads; None: all. Forward order computes every
            prefix in one pass anyway (``max(lengths)`` frame passes per list); reversed order
            computes only these.

        Returns
        -------
        dict
            ``features``: ``[B, T, P, 2C]`` (``[B, T, L, P, 2C]`` for several layers) in the stored
            dtype; index ``k`` holds the features of the prefix of length ``k + 1``: its last
            frame given frames ``0..k`` (one streaming pass of ``T`` frame passes). With
            ``reverse=True`` each prefix is fed last to first, so the frames before its last
            fed frame differ from prefix to prefix and nothing is shared: each needed prefix of
            length ``n`` is its own pass of ``n`` frame passes (``T(T+1)/2`` for every prefix),
            and rows of prefixes not in ``lengths`` are zeros. A one-frame history equals the
            per-image feature (:meth:`encode`) up to float rounding.
        """
        if not self.history:
            raise ValueError("encode_history needs a history encoder: VGGTEncoder(history=True)")
        if batch.dim() != 5:
            raise ValueError(f"encode_history takes [B, T, 3, H, W], got {tuple(batch.shape)}")
        if self.model is None:
            self.to(batch.device)
        frames = batch.shape[1]
        wanted = sorted({int(n) for n in lengths}) if lengths is not None else list(range(1, frames + 1))
        if not wanted or wanted[0] < 1 or wanted[-1] > frames:
            raise ValueError(f"prefix lengths must be in 1..{frames}, got {lengths!r}")
        if not self.reverse:
            out = self._stream(batch[:, :wanted[-1]])
            if wanted[-1] < frames:  # rows past the longest wanted prefix were never computed
                pad = out.new_zeros(out.shape[0], frames - wanted[-1], *out.shape[2:])
                out = torch.cat([out, pad], dim=1)
            return {"features": out}
        rows: list[torch.Tensor | None] = [None] * frames
        for n in wanted:
            rows[n - 1] = self._stream(batch[:, :n].flip(1))[:, -1]
        template = next(r for r in rows if r is not None)
        return {"features": torch.stack([r if r is not None else torch.zeros_like(template) for r in rows], dim=1)}

    def _stream(self, batch: torch.Tensor) -> torch.Tensor:
        """One causal streaming pass over ``batch`` ``[B, T, 3, H, W]``: every frame's features
        given the frames before it, ``[B, T, ...]`` in the stored dtype; counts the frame passes."""
        from featstore.models.vggt import stream_history

        cache = self.model.aggregator.new_kv_cache(self.window)
        view = stream_history(self.model, batch, layers=self.layers, tokens=self.tokens, kv_cache=cache)  # type: ignore[arg-type]
        self.frame_passes += cache.frames_seen * batch.shape[0]
        per_layer = [view[layer] for layer in self.layers]
        out = per_layer[0] if len(per_layer) == 1 else torch.stack(per_layer, dim=2)
        return out.to(self.stored_dtype())
