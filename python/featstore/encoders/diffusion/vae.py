"""VAE latents of images and control images (``pixel_latent``, ``control_latent``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch

from featstore.encoders.base import digest_of, state_dict_digest, weights_digest
from featstore.encoders.diffusion.inputs import rule_inputs
from featstore.encoders.diffusion.loading import (
    _existing_dir,
    _public_config,
    _require,
    load_image_uint8,
    quiet_off_terminal,
)
from featstore.errors import CheckpointError
from featstore.inputs import InputValue

OUTPUTS = ("mean_logvar", "mean", "sample")
"""VAE output modes: ``mean_logvar`` stores the latent distribution (``latent_mean``,
``latent_logvar``) so training can draw a new sample every epoch; ``mean`` and ``sample`` store
one ``latent``."""

# VAEs whose encoder takes video, [B, C, T, H, W]: an image is one frame.
_VIDEO_VAES = frozenset({"AutoencoderKLQwenImage", "AutoencoderKLWan"})


class VAEEncoder:
    """Latents of a diffusers VAE: ``pixel_latent`` of the images themselves, or
    ``control_latent`` of each image's control image.

    Parameters
    ----------
    model : AutoencoderKL or path
        A VAE module (put in eval mode), or a local directory saved by ``save_pretrained``
        (loaded with ``local_files_only=True`` on :meth:`to`; the class is the config's
        ``_class_name``). ``AutoencoderKLQwenImage``/``AutoencoderKLWan`` get each image as
        one frame.
    output : {"mean_logvar", "mean", "sample"}
        ``mean_logvar`` stores ``latent_mean`` and ``latent_logvar`` ``[C, h, w]`` (sample
        ``mean + exp(logvar / 2) * noise`` in training, anew every epoch); ``mean`` and
        ``sample`` store ``latent`` ``[C, h, w]``. A stored sample is drawn once, with a
        generator seeded by ``seed`` when the encoder first runs: which draw an image gets
        depends on its batch.
    image_size : (int, int), optional
        ``(width, height)`` in pixels, multiples of 8: images are resized to cover it and
        center-cropped. None keeps each image's size, center-cropped to multiples of 8.
    name : str
        Feature name: ``pixel_latent`` by default, ``control_latent`` for control images.
    scaling : {"none", "config"} or (float, float)
        ``none`` stores the VAE's latents as they are (what diffusers' training scripts cache;
        they scale in the training loop). ``config`` applies the model config's normalization:
        ``(z - latents_mean) * scaling_factor / latents_std`` per channel where the config has
        ``latents_mean``/``latents_std`` (Qwen-Image, Wan), else ``(z - shift_factor) *
        scaling_factor`` (SD, SDXL, SD3, Flux). ``(scale, shift)`` gives ``(z - shift) * scale``.
        Log-variances are shifted by ``2 log(scale)`` to match.
    control_fn : callable, optional
        Maps a source image path to its control image path (:class:`ControlDir`,
        :meth:`JsonlField.path_of`). The control image is encoded instead of the source and is
        recorded as the entry's input ``control``: editing it makes the entry stale. Pointing
        ``control_fn`` at other files does not (the old ones are unchanged): recompute with
        ``overwrite=True``.
    subfolder : str, optional
        The VAE's folder inside a pipeline directory (``"vae"``).
    torch_dtype : torch.dtype, optional
        Dtype to load a model directory in (default: as diffusers loads it, float32).
    dtype : torch.dtype
        Stored dtype (default float32; latents are small).
    seed : int
        Seed of the ``sample`` output.
    multiple : int
        Without ``image_size``, images are center-cropped to sides that are multiples of this
        (8: the VAE's downsampling; 16 where the transformer packs 2x2 latents).

    Notes
    -----
    The fingerprint digests the weight files of a directory, or the state dict of a module:
    the same VAE given both ways gets two fingerprints, so give it the same way every time.
    """

    def __init__(self, model: torch.nn.Module | str | os.PathLike[str], *, output: str = "mean_logvar",
                 image_size: tuple[int, int] | None = None, name: str = "pixel_latent",
                 scaling: str | tuple[float, float] = "none",
                 control_fn: Callable[[str], str | os.PathLike[str]] | None = None, subfolder: str | None = None,
                 torch_dtype: torch.dtype | None = None, dtype: torch.dtype = torch.float32, seed: int = 0,
                 multiple: int = 8) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if image_size is not None:
            image_size = (int(image_size[0]), int(image_size[1]))
            if min(image_size) <= 0 or image_size[0] % multiple or image_size[1] % multiple:
                raise ValueError(f"image_size {image_size} must be (width, height) in pixels, multiples of {multiple}")
        if isinstance(scaling, str):
            if scaling not in ("none", "config"):
                raise ValueError(f"scaling must be 'none', 'config' or (scale, shift), got {scaling!r}")
        else:
            scaling = (float(scaling[0]), float(scaling[1]))
        if isinstance(model, torch.nn.Module):
            self.model: Any = model.eval()
            self.model_path: str | None = None
            self._config = _public_config(getattr(model, "config", {}))
        else:
            self.model = None
            self.model_path = _existing_dir(model, subfolder, "VAE")
            where = os.path.join(self.model_path, subfolder or "")
            with open(os.path.join(where, "config.json"), encoding="utf-8") as f:
                raw = json.load(f)
            self._class_name = str(raw.get("_class_name", "AutoencoderKL"))
            self._config = _public_config(raw)
        self.name = name
        self.output = output
        self.image_size = image_size
        self.scaling = scaling
        self.control_fn = control_fn
        self.subfolder = subfolder
        self.torch_dtype = torch_dtype
        self.dtype = dtype
        self.seed = seed
        self.multiple = int(multiple)
        self._device: torch.device | None = None
        self._generator: torch.Generator | None = None
        self._fingerprint: str | None = None

    def _model_class(self) -> str:
        return type(self.model).__name__ if self.model is not None else self._class_name

    def fingerprint(self) -> str:
        """Weights (state dict of a module, file digests of a directory), config, output mode,
        image size, scaling, dtypes and whether it reads control images."""
        if self._fingerprint is None:
            if self.model_path is not None:
                weights = weights_digest(os.path.join(self.model_path, self.subfolder or ""))
            else:
                weights = state_dict_digest(self.model)
            self._fingerprint = digest_of(
                "featstore-vae-encoder-v1", weights, self._model_class(), self._config, self.output,
                self.image_size, self.scaling, str(self.torch_dtype), str(self.dtype),
                self.control_fn is not None, self.seed if self.output == "sample" else None,
                *([self.multiple] if self.multiple != 8 else []))  # 8: as before the option existed
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "class": self._model_class(), "model_path": self.model_path,
                "subfolder": self.subfolder, "output": self.output,
                "image_size": list(self.image_size) if self.image_size else None,
                "scaling": self.scaling if isinstance(self.scaling, str) else list(self.scaling),
                "dtype": str(self.dtype).replace("torch.", ""), "control": self.control_fn is not None,
                "control_fn": repr(self.control_fn) if self.control_fn is not None else None,
                "config": self._config}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.model_path is not None:
            # A spawned DataLoader worker only preprocesses: it gets the directory, not the weights.
            state["model"], state["_device"] = None, None
        return state

    def to(self, device: torch.device | str) -> VAEEncoder:
        """Loads the model directory (once) and moves the model to ``device``."""
        if self.model is None:
            diffusers = _require("diffusers", "diffusers")
            cls = getattr(diffusers, self._class_name, None)
            if cls is None or not self._class_name.startswith("Autoencoder"):
                raise CheckpointError(f"{self.model_path}: config.json names class {self._class_name!r}, which is "
                                      f"not a VAE of diffusers {diffusers.__version__}")
            kwargs: dict[str, Any] = {"local_files_only": True}
            if self.subfolder:
                kwargs["subfolder"] = self.subfolder
            if self.torch_dtype is not None:
                kwargs["torch_dtype"] = self.torch_dtype
            quiet_off_terminal()
            try:
                self.model = cls.from_pretrained(self.model_path, **kwargs).eval()
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot load the VAE from {self.model_path}: {exc}") from exc
        self._device = torch.device(device)
        self.model.to(self._device)
        return self

    def preprocess(self, path: str) -> torch.Tensor:
        """The source image, or its control image with ``control_fn``: uint8 ``[3, H, W]``."""
        return load_image_uint8(self._image_of(path), self.image_size, self.multiple)

    def _image_of(self, path: str) -> str:
        return os.fspath(self.control_fn(path)) if self.control_fn is not None else path

    def inputs(self, rel: str, path: str) -> dict[str, InputValue]:
        """With ``control_fn``: the control image (``control``), and for the built-in rules the
        candidates they prefer, which must stay absent (:func:`rule_inputs`); else nothing."""
        return rule_inputs(self.control_fn, path, "control") if self.control_fn is not None else {}

    def _downsampling(self) -> int:
        blocks = self._config.get("block_out_channels") or self._config.get("dim_mult") or [0] * 4
        return int(2 ** (len(blocks) - 1))

    def estimate_entry_bytes(self) -> int:
        """One entry: the latent(s) of an ``image_size`` image (1024x1024 without one)."""
        w, h = self.image_size or (1024, 1024)
        channels = int(self._config.get("latent_channels") or self._config.get("z_dim") or 16)
        f = self._downsampling()
        per = channels * (h // f) * (w // f) * self.dtype.itemsize
        return per * (2 if self.output == "mean_logvar" else 1) + 4096

    def _scale_shift(self, channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` shaped ``[1, C or 1, 1, 1]``: latents become ``(z - shift) * scale``."""
        if isinstance(self.scaling, tuple):
            scale, shift = torch.tensor([self.scaling[0]]), torch.tensor([self.scaling[1]])
        else:
            cfg = self._config
            factor = float(cfg.get("scaling_factor") or 1.0)
            if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
                shift = torch.tensor(cfg["latents_mean"], dtype=torch.float64).flatten()
                scale = factor / torch.tensor(cfg["latents_std"], dtype=torch.float64).flatten()
            else:
                shift, scale = torch.tensor([float(cfg.get("shift_factor") or 0.0)]), torch.tensor([factor])
        if scale.numel() not in (1, channels) or shift.numel() not in (1, channels):
            raise ValueError(f"the VAE config's latents_mean/latents_std have {shift.numel()}/{scale.numel()} values "
                             f"for {channels} latent channels")
        return (scale.view(1, -1, 1, 1).to(device, torch.float32), shift.view(1, -1, 1, 1).to(device, torch.float32))

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """``batch``: float ``[B, 3, H, W]`` in [0, 1]. Returns ``latent_mean`` and
        ``latent_logvar`` or ``latent``, each ``[B, C, H/f, W/f]``."""
        if self.model is None or self._device is None:
            self.to(batch.device)
        param = next(self.model.parameters(), None)
        x = batch.to(self._device, param.dtype if param is not None else batch.dtype) * 2 - 1
        video = self._model_class() in _VIDEO_VAES
        dist = self.model.encode(x.unsqueeze(2) if video else x).latent_dist
        if self.output == "sample":
            if self._generator is None:
                self._generator = torch.Generator(device=dist.mean.device).manual_seed(self.seed)
            z = dist.sample(generator=self._generator)
            latents = {"latent": z}
        elif self.output == "mean":
            latents = {"latent": dist.mean}
        else:
            latents = {"latent_mean": dist.mean, "latent_logvar": dist.logvar}
        if video:
            latents = {k: v.squeeze(2) for k, v in latents.items()}
        if self.scaling != "none":
            first = next(iter(latents.values()))
            scale, shift = self._scale_shift(first.shape[1], first.device)
            for k, v in latents.items():
                v = v.float()
                latents[k] = v + 2 * torch.log(scale.abs()) if k == "latent_logvar" else (v - shift) * scale
        return {k: v.to(self.dtype) for k, v in latents.items()}
