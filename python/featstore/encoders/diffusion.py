"""Encoders for diffusion fine-tuning: VAE latents of images and control images, and embeddings
of captions.

- :class:`VAEEncoder`: a diffusers VAE (``AutoencoderKL``, or ``AutoencoderKLQwenImage`` /
  ``AutoencoderKLWan`` for Qwen-Image); feature ``pixel_latent``, or ``control_latent`` when it
  reads each source's control image (``control_fn``);
- :class:`TextEncoder`: a transformers text model and its tokenizer; feature ``prompt_embed``
  with the tensors ``prompt_embed`` ``[L, D]`` and ``prompt_embeds_mask`` ``[L]``;
- :class:`JsonlField` and :class:`ControlDir`: where captions and control images are.

Both encoders use the two optional parts of the encoder protocol (see
:mod:`featstore.encoders.base`) that precompute honours:

``inputs(rel, path) -> dict[str, str | bytes]``
    What an entry was computed from besides its source: a file path (a caption ``.txt``, a
    control image; recorded by stamp and digest and checked on every lookup, so an edit makes
    the entry ``stale``) or ``bytes`` (a text, recorded by digest). Called in precompute's writer
    thread for every entry it writes.
``encode_items(items) -> dict[str, Tensor]``
    For encoders whose input is not an image: ``preprocess`` may then return any picklable
    value (here: the caption), and precompute hands ``encode_items`` the list of them instead of
    an image batch.

Importing this module imports neither diffusers nor transformers (optional extras
``featstore[diffusers]``, ``featstore[transformers]``); they are imported when a model is
loaded from a directory. Weights are only ever read from local directories, never downloaded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from featstore.encoders.base import digest_of, state_dict_digest, weights_digest
from featstore.errors import CheckpointError

OUTPUTS = ("mean_logvar", "mean", "sample")
"""VAE output modes: ``mean_logvar`` stores the latent distribution (``latent_mean``,
``latent_logvar``) so training can draw a new sample every epoch; ``mean`` and ``sample`` store
one ``latent``."""

# VAEs whose encoder takes video, [B, C, T, H, W]: an image is one frame.
_VIDEO_VAES = frozenset({"AutoencoderKLQwenImage", "AutoencoderKLWan"})


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed to load this model: pip install 'featstore[{extra}]' "
                          f"({exc})") from exc


def _public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A model config without the keys that name where it was loaded from (``_name_or_path``)
    or which library version saved it: they do not change the output."""
    return {k: v for k, v in dict(config).items() if not str(k).startswith("_")}


def _existing_dir(path: str | os.PathLike[str], subfolder: str | None, what: str) -> str:
    root = os.path.abspath(os.fspath(path))
    where = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(where):
        state = "is not a directory" if os.path.exists(where) else "does not exist"
        raise CheckpointError(f"{what} directory {where} {state}; pass the local directory that holds its "
                              "config.json and weights (save_pretrained output), or the model itself")
    if not os.path.isfile(os.path.join(where, "config.json")):
        raise CheckpointError(f"{what} directory {where} has no config.json; pass the directory "
                              "save_pretrained wrote (with subfolder='vae' or 'text_encoder' for a pipeline)")
    return root


# ----------------------------------------------------------------------------------- images
def load_image_uint8(path: str | os.PathLike[str], image_size: tuple[int, int] | None = None,
                     multiple: int = 8) -> torch.Tensor:
    """One image as uint8 ``[3, H, W]``, the way diffusion pipelines load it.

    The EXIF orientation is applied (phone photos), transparency is composited onto white, then
    the image is resized to cover ``image_size`` (Lanczos, aspect ratio kept) and center-cropped
    to it; without ``image_size`` it is only center-cropped to sides that are multiples of
    ``multiple``.

    Parameters
    ----------
    path : path
        The image file.
    image_size : (int, int), optional
        Output ``(width, height)`` in pixels, multiples of ``multiple``.
    multiple : int
        What the sides must be multiples of (the VAE's downsampling).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    PIL.UnidentifiedImageError
        It cannot be decoded.
    ValueError
        It is smaller than ``multiple`` pixels on a side.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(os.fspath(path)) as opened:
            opened.load()
            img = ImageOps.exif_transpose(opened)
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            img = img.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnidentifiedImageError(f"cannot decode image {os.fspath(path)}: {exc}; check that the file is a "
                                     "complete image (copy it again) or leave it out") from exc
    w, h = img.size
    if image_size is not None:
        out_w, out_h = image_size
        scale = max(out_w / w, out_h / h)
        new_w, new_h = max(out_w, math.ceil(w * scale - 1e-6)), max(out_h, math.ceil(h * scale - 1e-6))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
        w, h = new_w, new_h
    else:
        out_w, out_h = w // multiple * multiple, h // multiple * multiple
        if out_w == 0 or out_h == 0:
            raise ValueError(f"image {os.fspath(path)} is {w}x{h} pixels, smaller than {multiple} on a side; "
                             "give image_size to resize it")
    left, top = (w - out_w) // 2, (h - out_h) // 2
    if (left, top, out_w, out_h) != (0, 0, w, h):
        img = img.crop((left, top, left + out_w, top + out_h))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------------- sources
class JsonlField(Mapping[str, str]):
    """A field of ``.jsonl`` lines, by the image each line lists: captions or control images
    kept next to the image paths that ``featstore scan --jsonl FIELD`` reads.

    Every ``.jsonl`` file under ``root`` is read once, when this is made; each line names its
    image(s) in ``image_field`` (a path, or a list of paths, relative to the jsonl's folder or to
    the root, as the scan resolves them) and holds ``field`` (a string). Keys are absolute,
    normalized image paths.

    Parameters
    ----------
    root : path
        The data root.
    field : str
        The field to look up, e.g. ``"prompt"`` or ``"control"``.
    image_field : str
        The field naming the image (the ``jsonl=`` of the scan).

    Examples
    --------
    >>> captions = JsonlField(root, "prompt", image_field="image")
    >>> TextEncoder(model, tokenizer, max_length=77, captions=captions)
    >>> VAEEncoder(vae_dir, name="control_latent", control_fn=JsonlField(root, "control").path_of)
    """

    def __init__(self, root: str | os.PathLike[str], field: str, *, image_field: str = "image") -> None:
        from featstore.scan import scan

        self.root = os.path.abspath(os.fspath(root))
        self.field, self.image_field = field, image_field
        self._values: dict[str, tuple[str, str]] = {}
        self.errors: list[tuple[str, str]] = []
        for rel in scan(self.root, extensions=["jsonl"]).paths:
            self._read(os.path.join(self.root, rel))

    def _read(self, jsonl: str) -> None:
        base = os.path.dirname(jsonl)
        try:
            with open(jsonl, encoding="utf-8") as f:
                lines = f.readlines()
        except (UnicodeDecodeError, OSError) as exc:
            self.errors.append((jsonl, f"cannot read it as UTF-8 text: {exc}"))
            return
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{jsonl}:{number}"
            try:
                record = json.loads(line)
            except ValueError as exc:
                self.errors.append((where, f"not valid JSON: {exc}"))
                continue
            images = record.get(self.image_field) if isinstance(record, dict) else None
            value = record.get(self.field) if isinstance(record, dict) else None
            if images is None or not isinstance(value, str):
                self.errors.append((where, f"no string field {self.field!r} or no {self.image_field!r}"))
                continue
            for image in images if isinstance(images, list) else [images]:
                if isinstance(image, str):
                    self._values[self._resolve(base, image)] = (value, jsonl)

    def _resolve(self, base: str, listed: str) -> str:
        # As the scan does: relative to the jsonl's folder first, then to the root.
        if os.path.isabs(listed):
            return os.path.normpath(listed)
        first = os.path.normpath(os.path.join(base, listed))
        if os.path.isfile(first):
            return first
        second = os.path.normpath(os.path.join(self.root, listed))
        return second if os.path.isfile(second) else first

    def _key(self, path: str | os.PathLike[str]) -> str:
        return os.path.normpath(os.path.abspath(os.fspath(path)))

    def __getitem__(self, path: str | os.PathLike[str]) -> str:  # type: ignore[override]
        try:
            return self._values[self._key(path)][0]
        except KeyError:
            skipped = (f"; {len(self.errors)} .jsonl lines or files were skipped, e.g. {self.errors[0][0]}: "
                       f"{self.errors[0][1]}") if self.errors else ""
            raise KeyError(f"no .jsonl line under {self.root} lists {os.fspath(path)} in {self.image_field!r} "
                           f"with a {self.field!r}{skipped}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"JsonlField({self.root!r}, {self.field!r}, image_field={self.image_field!r})"

    def jsonl_of(self, path: str | os.PathLike[str]) -> str:
        """The ``.jsonl`` file whose line lists ``path``."""
        self[path]  # noqa: B018 (the KeyError with its message)
        return self._values[self._key(path)][1]

    def path_of(self, path: str | os.PathLike[str]) -> str:
        """The field's value as a path (relative to its jsonl's folder, else the root): a
        ``control_fn`` for :class:`VAEEncoder`."""
        return self._resolve(os.path.dirname(self.jsonl_of(path)), self[path])


class ControlDir:
    """A ``control_fn``: the control image of ``<images_root>/a/b.jpg`` is
    ``<control_root>/a/b.jpg``, or a file of the same stem with another image extension
    (``b.png``).

    Keep ``control_root`` outside the scanned data root (or scan with ``files_from``/``jsonl``):
    otherwise the control images are sources too.
    """

    def __init__(self, images_root: str | os.PathLike[str], control_root: str | os.PathLike[str]) -> None:
        self.images_root = os.path.abspath(os.fspath(images_root))
        self.control_root = os.path.abspath(os.fspath(control_root))

    def __call__(self, path: str | os.PathLike[str]) -> str:
        rel = os.path.relpath(os.path.abspath(os.fspath(path)), self.images_root)
        if rel.startswith(".."):
            raise ValueError(f"{os.fspath(path)} is not under the images root {self.images_root}")
        exact = os.path.join(self.control_root, rel)
        if os.path.isfile(exact):
            return exact
        from featstore.scan import DEFAULT_EXTENSIONS

        stem = os.path.splitext(exact)[0]
        for ext in DEFAULT_EXTENSIONS:
            for candidate in (f"{stem}.{ext}", f"{stem}.{ext.upper()}"):
                if os.path.isfile(candidate):
                    return candidate
        raise FileNotFoundError(f"no control image for {os.fspath(path)}: expected {exact} (or {stem}.<png|jpg|...>)")

    def __repr__(self) -> str:
        return f"ControlDir({self.images_root!r}, {self.control_root!r})"


# ----------------------------------------------------------------------------------- VAE
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

    Notes
    -----
    The fingerprint digests the weight files of a directory, or the state dict of a module:
    the same VAE given both ways gets two fingerprints, so give it the same way every time.
    """

    def __init__(self, model: torch.nn.Module | str | os.PathLike[str], *, output: str = "mean_logvar",
                 image_size: tuple[int, int] | None = None, name: str = "pixel_latent",
                 scaling: str | tuple[float, float] = "none",
                 control_fn: Callable[[str], str | os.PathLike[str]] | None = None, subfolder: str | None = None,
                 torch_dtype: torch.dtype | None = None, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if image_size is not None:
            image_size = (int(image_size[0]), int(image_size[1]))
            if min(image_size) <= 0 or image_size[0] % 8 or image_size[1] % 8:
                raise ValueError(f"image_size {image_size} must be (width, height) in pixels, multiples of 8")
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
                self.control_fn is not None, self.seed if self.output == "sample" else None)
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "class": self._model_class(), "model_path": self.model_path,
                "subfolder": self.subfolder, "output": self.output,
                "image_size": list(self.image_size) if self.image_size else None,
                "scaling": self.scaling if isinstance(self.scaling, str) else list(self.scaling),
                "dtype": str(self.dtype).replace("torch.", ""), "control": self.control_fn is not None,
                "control_fn": repr(self.control_fn) if self.control_fn is not None else None,
                "config": self._config}

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
            try:
                self.model = cls.from_pretrained(self.model_path, **kwargs).eval()
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot load the VAE from {self.model_path}: {exc}") from exc
        self._device = torch.device(device)
        self.model.to(self._device)
        return self

    def preprocess(self, path: str) -> torch.Tensor:
        """The source image, or its control image with ``control_fn``: uint8 ``[3, H, W]``."""
        return load_image_uint8(self._image_of(path), self.image_size)

    def _image_of(self, path: str) -> str:
        return os.fspath(self.control_fn(path)) if self.control_fn is not None else path

    def inputs(self, rel: str, path: str) -> dict[str, str | bytes]:
        """``{"control": control image path}`` with ``control_fn``, else nothing."""
        return {"control": self._image_of(path)} if self.control_fn is not None else {}

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


# ----------------------------------------------------------------------------------- text
def caption_path(path: str | os.PathLike[str]) -> str:
    """The caption file of an image: ``<stem>.txt`` beside it (``img_0001.txt``, the common
    convention), else ``<name>.txt`` (``img_0001.jpg.txt``).

    Raises
    ------
    FileNotFoundError
        Neither exists (the message names both).
    """
    p = os.fspath(path)
    stem, name = f"{os.path.splitext(p)[0]}.txt", f"{p}.txt"
    for candidate in (stem, name):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"no caption for {p}: expected {stem} (or {name})")


def tokenizer_digest(tokenizer: Any) -> str:
    """Digest of a tokenizer's vocabulary, rules and special tokens (a fast tokenizer's whole
    ``tokenizer.json``), so a changed tokenizer changes the fingerprint."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without the truncation and padding settings: a fast tokenizer's call sets them on its
        # backend, so they would change the digest once the tokenizer has been used (and the
        # encoder's own max_length and padding are in its fingerprint).
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        body = json.dumps(spec, sort_keys=True)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    return digest_of(type(tokenizer).__qualname__, body, getattr(tokenizer, "padding_side", None),
                     getattr(tokenizer, "truncation_side", None), str(getattr(tokenizer, "special_tokens_map", "")))


class TextEncoder:
    """Caption embeddings of a transformers text model: feature ``prompt_embed`` with tensors
    ``prompt_embed`` ``[L, D]`` and ``prompt_embeds_mask`` ``[L]`` (int64, 1 for tokens, 0 for
    padding), ``L = max_length``, per image.

    Captions are padded and truncated to ``max_length`` tokens, so every entry has the same
    shape (batch reads need it). The caption is an input of the entry: editing a ``.txt``
    caption makes its entry stale, and the next precompute recomputes exactly that entry.

    Parameters
    ----------
    text_model : nn.Module or path
        The text encoder (``CLIPTextModel``, ``T5EncoderModel``, ...; put in eval mode), or a
        local directory (loaded on :meth:`to` with ``model_class.from_pretrained(...,
        local_files_only=True)``).
    tokenizer : tokenizer or path
        Its tokenizer, or a local directory (``AutoTokenizer``, ``local_files_only=True``).
    max_length : int
        Tokens per caption, ``L``.
    captions : "txt" or mapping
        ``"txt"``: a ``.txt`` file beside each image (:func:`caption_path`), recorded by stamp
        and digest. A mapping from absolute image path to caption (:class:`JsonlField` for a
        field of the ``.jsonl`` lines that list the images): the text is recorded by digest,
        and with a :class:`JsonlField` its ``.jsonl`` file as well: an edit of that file makes
        the entries of the images it lists stale (all of them: featstore cannot tell which line
        changed without reading the file, and lookups never read it).
    name : str
        Feature name.
    hidden_state : int, optional
        Store ``hidden_states[hidden_state]`` (e.g. ``-2``, the penultimate layer) instead of
        ``last_hidden_state``.
    model_class : class or str, optional
        transformers class for a model directory (default ``AutoModel``; give
        ``"CLIPTextModel"`` or ``"T5EncoderModel"`` where ``AutoModel`` would build the whole
        two-tower or encoder-decoder model).
    subfolder : str, optional
        The model's folder in a pipeline directory (``"text_encoder"``); the tokenizer's is
        given with its own path.
    torch_dtype : torch.dtype, optional
        Dtype to load a model directory in.
    dtype : torch.dtype
        Stored dtype of ``prompt_embed`` (default float32).
    """

    def __init__(self, text_model: torch.nn.Module | str | os.PathLike[str], tokenizer: Any, *, max_length: int = 77,
                 captions: str | Mapping[str, str] = "txt", name: str = "prompt_embed",
                 hidden_state: int | None = None, model_class: Any = None, subfolder: str | None = None,
                 torch_dtype: torch.dtype | None = None, dtype: torch.dtype = torch.float32) -> None:
        if int(max_length) < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        if isinstance(captions, str) and captions != "txt":
            raise ValueError(f"captions must be 'txt' or a mapping of image path to caption (JsonlField), "
                             f"got {captions!r}")
        if isinstance(text_model, torch.nn.Module):
            self.model: Any = text_model.eval()
            self.model_path: str | None = None
        else:
            self.model = None
            self.model_path = _existing_dir(text_model, subfolder, "text model")
        if isinstance(tokenizer, (str, os.PathLike)):
            where = os.path.abspath(os.fspath(tokenizer))
            if not os.path.isdir(where):
                raise CheckpointError(f"tokenizer directory {where} does not exist; pass the local directory "
                                      "save_pretrained wrote, or the tokenizer itself")
            transformers = _require("transformers", "transformers")
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot load the tokenizer from {where}: {exc}") from exc
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.captions = captions
        self.name = name
        self.hidden_state = hidden_state
        self.model_class = model_class
        self.subfolder = subfolder
        self.torch_dtype = torch_dtype
        self.dtype = dtype
        self._device: torch.device | None = None
        self._fingerprint: str | None = None

    def _model_config(self) -> dict[str, Any]:
        if self.model is not None:
            to_dict = getattr(getattr(self.model, "config", None), "to_dict", None)
            return _public_config(to_dict() if callable(to_dict) else {})
        with open(os.path.join(self.model_path or "", self.subfolder or "", "config.json"), encoding="utf-8") as f:
            return _public_config(json.load(f))

    def fingerprint(self) -> str:
        """Weights, tokenizer, ``max_length``, layer and stored dtype. The captions are not part
        of it: they are inputs of each entry."""
        if self._fingerprint is None:
            if self.model_path is not None:
                weights = weights_digest(os.path.join(self.model_path, self.subfolder or ""))
                model_class = self.model_class if isinstance(self.model_class, str) else \
                    getattr(self.model_class, "__name__", None)
            else:
                weights = state_dict_digest(self.model)
                model_class = type(self.model).__name__
            self._fingerprint = digest_of(
                "featstore-text-encoder-v1", weights, model_class, tokenizer_digest(self.tokenizer), self.max_length,
                self.hidden_state, str(self.torch_dtype), str(self.dtype))
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        source = ("txt" if isinstance(self.captions, str) else
                  f"jsonl field {self.captions.field!r}" if isinstance(self.captions, JsonlField) else "mapping")
        return {"name": self.name, "class": type(self.model).__name__ if self.model is not None else self.model_class,
                "model_path": self.model_path, "subfolder": self.subfolder,
                "tokenizer": type(self.tokenizer).__name__, "max_length": self.max_length,
                "hidden_state": self.hidden_state, "captions": source, "dtype": str(self.dtype).replace("torch.", "")}

    def to(self, device: torch.device | str) -> TextEncoder:
        """Loads the model directory (once) and moves the model to ``device``."""
        if self.model is None:
            transformers = _require("transformers", "transformers")
            cls = self.model_class or "AutoModel"
            if isinstance(cls, str):
                cls = getattr(transformers, cls)
            kwargs: dict[str, Any] = {"local_files_only": True}
            if self.subfolder:
                kwargs["subfolder"] = self.subfolder
            if self.torch_dtype is not None:
                # transformers 5 renamed the argument (4.56+ accepts both)
                new_name = int(transformers.__version__.split(".")[0]) >= 5
                kwargs["dtype" if new_name else "torch_dtype"] = self.torch_dtype
            try:
                self.model = cls.from_pretrained(self.model_path, **kwargs).eval()
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot load the text model from {self.model_path}: {exc}") from exc
        self._device = torch.device(device)
        self.model.to(self._device)
        return self

    def caption(self, path: str) -> str:
        """The caption of the image at ``path`` (surrounding whitespace stripped)."""
        if isinstance(self.captions, str):
            with open(caption_path(path), encoding="utf-8") as f:
                return f.read().strip()
        return str(self.captions[os.path.normpath(os.path.abspath(path))]).strip()  # type: ignore[index]

    def preprocess(self, path: str) -> str:
        """The caption (precompute then calls :meth:`encode_items` with a list of them)."""
        return self.caption(path)

    def inputs(self, rel: str, path: str) -> dict[str, str | bytes]:
        """The caption file (``.txt``), or the caption's text and its ``.jsonl`` file."""
        if isinstance(self.captions, str):
            return {"caption": caption_path(path)}
        found: dict[str, str | bytes] = {"caption": self.caption(path).encode("utf-8")}
        if isinstance(self.captions, JsonlField):
            found["captions_jsonl"] = self.captions.jsonl_of(path)
        return found

    def estimate_entry_bytes(self) -> int:
        cfg = self._model_config()
        width = int(cfg.get("hidden_size") or cfg.get("d_model") or 4096)
        return self.max_length * (width * self.dtype.itemsize + 8) + 4096

    def encode(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """``prompt_embed`` ``[B, L, D]`` and ``prompt_embeds_mask`` ``[B, L]`` of captions."""
        if isinstance(captions, str):
            raise TypeError("encode() takes a list of captions; wrap a single one in a list")
        if self.model is None or self._device is None:
            self.to(self._device or "cpu")
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        ids = tokens["input_ids"].to(self._device)
        mask = tokens["attention_mask"].to(self._device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=self.hidden_state is not None)
        embeds = out.last_hidden_state if self.hidden_state is None else out.hidden_states[self.hidden_state]
        return {"prompt_embed": embeds.to(self.dtype), "prompt_embeds_mask": mask.to(torch.int64)}

    def encode_items(self, items: Sequence[str]) -> dict[str, torch.Tensor]:
        """What precompute calls with the captions ``preprocess`` returned."""
        return self.encode(items)


__all__ = ["OUTPUTS", "VAEEncoder", "TextEncoder", "JsonlField", "ControlDir", "caption_path", "load_image_uint8",
           "tokenizer_digest"]
