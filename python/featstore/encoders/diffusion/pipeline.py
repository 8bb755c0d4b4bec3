"""A diffusers pipeline's own prompt encoding and VAE as featstore encoders
(:class:`PipelineEncoder`): one part of the pipeline per feature."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from featstore.encoders.base import digest_of, state_dict_digest, weights_digest
from featstore.encoders.diffusion.families import Family, family_of, qwen_edit_prompt_image
from featstore.encoders.diffusion.inputs import JsonlField, caption_inputs, read_caption, rule_inputs
from featstore.encoders.diffusion.loading import _require, folder_digest, quiet_off_terminal
from featstore.encoders.diffusion.text import tokenizer_digest
from featstore.encoders.diffusion.vae import VAEEncoder
from featstore.errors import CheckpointError
from featstore.inputs import InputValue

#: The parts of a pipeline and the feature each stores by default (the diffusion users' names).
PARTS: dict[str, str] = {"prompt": "prompt_embed", "latent": "pixel_latent", "control_latent": "control_latent"}


class PipelineEncoder:
    """One part of a diffusers pipeline as an encoder: its ``encode_prompt`` for each image's
    caption (``part="prompt"``), or its VAE for each image (``"latent"``) or each image's control
    image (``"control_latent"``).

    The prompt part calls the pipeline's own ``encode_prompt``, so a cached embedding is the one
    the pipeline computes at inference (Qwen-Image's chat template and the template tokens it
    drops, SDXL's and Flux's pooled embeddings, Qwen-Image-Edit's image-conditioned prompt); the
    library that defines the family defines the embedding.

    Parameters
    ----------
    pipeline : path or DiffusionPipeline
        A local pipeline directory (``save_pretrained`` output with ``model_index.json``; nothing
        is downloaded), or a loaded pipeline. Only the components the part uses are loaded.
    part : {"prompt", "latent", "control_latent"}
        What to store. ``prompt``: tensors ``prompt_embed`` ``[L, D]``, plus
        ``prompt_embeds_mask`` ``[L]`` (int64) for the families whose ``encode_prompt`` returns a
        mask (Qwen-Image, Qwen-Image-Edit: stored unpadded, ``L`` the caption's length, unless
        ``max_length``), plus ``pooled_prompt_embed`` ``[D2]`` where the family has one (SDXL,
        Flux). The others store what the pipeline returns, at its fixed length (CLIP's 77
        tokens, T5's ``max_sequence_length``): their padding tokens are part of the embedding.
        ``latent``/``control_latent``: the tensor named like the feature (``pixel_latent``,
        ``control_latent``) ``[C, h, w]``, or ``<name>_mean`` and ``<name>_logvar`` with
        ``output="mean_logvar"``.
    name : str, optional
        Feature name (default: ``prompt_embed``, ``pixel_latent``, ``control_latent``).
    captions : "txt" or mapping
        ``"txt"``: ``img.txt`` beside ``img.jpg``, else ``img.jpg.txt`` (recorded by stamp and
        digest). A mapping of absolute image path to caption (:class:`JsonlField`): each entry
        records its caption's text by digest and its ``.jsonl`` file as a shared input. Lookups
        treat any edit of the file as a change (they never read it, so they never serve an
        embedding of an edited caption); precompute recomputes the entries whose line's caption
        changed and refreshes the others without encoding.
    control_fn : callable, optional
        Maps an image path to its control image (:class:`ControlDir`,
        :meth:`JsonlField.path_of`). Required for ``control_latent`` and for the prompt part of
        an edit family (Qwen-Image-Edit), whose prompt embedding depends on the control image:
        it is prepared as the pipeline's ``__call__`` prepares it (resized to the area of
        1024x1024 at its aspect ratio) and recorded as the entry's input ``control``.
    max_sequence_length : int
        Passed to ``encode_prompt`` where the family takes it (512: every family's ``__call__``
        default).
    max_length : int, optional
        Store masked prompt embeddings padded with zeros to this many tokens (the mask says
        which are real) instead of unpadded; a longer caption is an error, never truncated.
    image_size : (int, int), optional
        Latent parts: ``(width, height)`` the images are resized to cover and center-cropped to;
        default: each image's own size, center-cropped to multiples of the family's
        ``latent_multiple`` (16 for Qwen-Image, Flux and Wan, 8 for SD).
    output : {"mean", "mean_logvar", "sample"}
        Latent parts: what of the latent distribution to store (``mean``: what the pipelines
        use for their conditioning images).
    scaling : {"config", "none"} or (float, float)
        Latent parts: ``config`` (default) stores the latents the pipeline's transformer sees
        (its VAE config's ``latents_mean``/``latents_std`` or ``shift_factor``/``scaling_factor``).
    torch_dtype : torch.dtype, optional
        Dtype to load the components in (default: as diffusers loads them).
    dtype : torch.dtype
        Stored dtype (default float32).

    Notes
    -----
    The fingerprint holds the pipeline class, the digest of every component the part uses
    (weight files, tokenizer and processor files; the state dicts of a loaded pipeline), the
    dtypes, the part's options, and the diffusers (and, for prompts, transformers) version whose
    code ran: upgrading either library makes the entries ``foreign``, and precompute recomputes
    them, because a new version may encode differently.
    """

    def __new__(cls, pipeline: Any = None, part: str | None = None, **options: Any) -> PipelineEncoder:
        # The prompt part takes captions, not images: its own class has encode_items. (Unpickling
        # calls __new__ with the subclass and no arguments.)
        return super().__new__(_PromptPart if cls is PipelineEncoder and part == "prompt" else cls)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.pipeline_path is not None:
            state["pipe"] = None  # DataLoader workers only preprocess; the directory reloads it
        return state

    def __init__(self, pipeline: Any, part: str, *, name: str | None = None,
                 captions: str | Mapping[str, str] = "txt", control_fn: Callable[[str], Any] | None = None,
                 max_sequence_length: int = 512, max_length: int | None = None,
                 image_size: tuple[int, int] | None = None, output: str = "mean",
                 scaling: str | tuple[float, float] = "config", torch_dtype: torch.dtype | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if part not in PARTS:
            raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
        _check_options(max_sequence_length, max_length, image_size)  # before anything is loaded
        if isinstance(captions, str) and captions != "txt":
            raise ValueError(f"captions must be 'txt' or a mapping of image path to caption (JsonlField), "
                             f"got {captions!r}")
        if isinstance(pipeline, (str, os.PathLike)):
            self.pipeline_path: str | None = _pipeline_dir(pipeline)
            self.pipe: Any = None
            with open(os.path.join(self.pipeline_path, "model_index.json"), encoding="utf-8") as f:
                self._index = json.load(f)
            self.pipeline_class = str(self._index.get("_class_name"))
        else:
            self.pipeline_path, self.pipe = None, pipeline
            self._index = {}
            self.pipeline_class = type(pipeline).__name__
        self.family: Family = family_of(self.pipeline_class)
        needs_control = part == "control_latent" or (part == "prompt" and self.family.takes_control)
        if needs_control and control_fn is None:
            why = ("its prompt embedding is computed from the caption and the control image"
                   if part == "prompt" else "it encodes each image's control image")
            raise ValueError(f"{self.pipeline_class} part {part!r} needs control images ({why}): pass control_fn "
                             "(ControlDir(images_root, control_root), JsonlField(root, field).path_of), or "
                             "--control-dir DIR / --control-field FIELD")
        if control_fn is not None and not needs_control:
            raise ValueError(f"{self.pipeline_class} part {part!r} reads no control images: control_fn (--control-dir, "
                             "--control-field) applies to control_latent and to an edit pipeline's prompt")
        self.part = part
        self.name = name or PARTS[part]
        self.captions = captions
        self.control_fn = control_fn
        self.max_sequence_length = int(max_sequence_length)
        self.max_length = None if max_length is None else int(max_length)
        self.torch_dtype = torch_dtype
        self.dtype = dtype
        self._device: torch.device | None = None
        self._fingerprint: str | None = None
        self._vae: VAEEncoder | None = None
        if part != "prompt":
            vae: Any = self.pipe.vae if self.pipe is not None else self.pipeline_path
            self._vae = VAEEncoder(vae, output=output, image_size=image_size, name=self.name, scaling=scaling,
                                   control_fn=self.control_fn, subfolder=None if self.pipe is not None else "vae",
                                   torch_dtype=torch_dtype, dtype=dtype, multiple=self.family.latent_multiple)

    def fingerprint(self) -> str:
        """See the class's Notes."""
        if self._fingerprint is None:
            diffusers = _require("diffusers", "diffusers")
            if self._vae is not None:
                parts: list[Any] = [self._vae.fingerprint()]
            else:
                transformers = _require("transformers", "transformers")
                parts = [self._components_digest(), transformers.__version__, self.max_sequence_length,
                         self.max_length, str(self.torch_dtype), str(self.dtype)]
            self._fingerprint = digest_of("featstore-pipeline-encoder-v1", self.pipeline_class, self.part,
                                          diffusers.__version__, self.control_fn is not None, *parts)
        return self._fingerprint

    def _components_digest(self) -> list[Any]:
        """The digest of each component the prompt part uses."""
        out = []
        for comp in self.family.prompt_components:
            if self.pipeline_path is not None:
                where = os.path.join(self.pipeline_path, comp)
                if not os.path.isdir(where):
                    raise CheckpointError(f"pipeline {self.pipeline_path} has no {comp}/ folder, which "
                                          f"{self.pipeline_class}.encode_prompt needs")
                digest = weights_digest(where) if comp.startswith("text_encoder") else folder_digest(where)
            else:
                obj = getattr(self.pipe, comp, None)
                if isinstance(obj, torch.nn.Module):
                    digest = state_dict_digest(obj)
                elif comp == "processor" and obj is not None:
                    digest = digest_of(tokenizer_digest(obj.tokenizer), json.dumps(
                        obj.image_processor.to_dict(), sort_keys=True, default=str))
                else:
                    digest = tokenizer_digest(obj) if obj is not None else "absent"
            out.append((comp, digest))
        return out

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "class": "PipelineEncoder", "pipeline": self.pipeline_class,
                             "family": self.family.name, "part": self.part, "model_path": self.pipeline_path,
                             "dtype": str(self.dtype).replace("torch.", ""), "control": self.control_fn is not None,
                             "control_fn": repr(self.control_fn) if self.control_fn is not None else None}
        if self._vae is not None:
            vae = self._vae.describe()
            d.update({k: vae[k] for k in ("output", "image_size", "scaling")})
        else:
            d.update({"captions": _caption_source(self.captions), "max_sequence_length": self.max_sequence_length,
                      "max_length": self.max_length, "stored": "padded" if self.max_length or not
                      self.family.masked else "unpadded"})
        return d

    def varying_outputs(self) -> tuple[str, ...]:
        """The prompt tensors of a masked family stored unpadded (their length is the
        caption's); nothing for latents (their size varies, if at all, beyond the first axis)."""
        if self._vae is not None or not self.family.masked or self.max_length is not None:
            return ()
        return ("prompt_embed", "prompt_embeds_mask")

    def estimate_entry_bytes(self) -> int:
        if self._vae is not None:
            return self._vae.estimate_entry_bytes()
        return self.max_sequence_length * 4096 * self.dtype.itemsize + 8192  # an upper bound: Qwen's width

    def to(self, device: torch.device | str) -> PipelineEncoder:
        """Loads the components the part uses (once) and moves them to ``device``."""
        self._device = torch.device(device)
        if self._vae is not None:
            self._vae.to(self._device)
            return self
        if self.pipe is None:
            self.pipe = self._load_prompt_pipeline()
        for comp in self.family.prompt_components:
            module = getattr(self.pipe, comp, None)
            if isinstance(module, torch.nn.Module):
                module.to(self._device).eval()
        return self

    def _load_prompt_pipeline(self) -> Any:
        """The pipeline with only the components ``encode_prompt`` uses (the rest passed as None:
        no transformer or VAE weights are read)."""
        diffusers = _require("diffusers", "diffusers")
        cls = getattr(diffusers, self.pipeline_class)
        skipped = {comp: None for comp, spec in self._index.items()
                   if not comp.startswith("_") and isinstance(spec, list) and comp not in self.family.prompt_components}
        kwargs: dict[str, Any] = {"local_files_only": True, **skipped}
        if self.torch_dtype is not None:
            kwargs["torch_dtype"] = self.torch_dtype
        quiet_off_terminal()
        try:
            return cls.from_pretrained(self.pipeline_path, **kwargs)
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"cannot load {self.pipeline_class} from {self.pipeline_path}: {exc}") from exc

    def caption(self, path: str) -> str:
        """The caption of the image at ``path`` (surrounding whitespace stripped)."""
        return read_caption(self.captions, path)

    def inputs(self, rel: str, path: str) -> dict[str, InputValue]:
        """The caption (its ``.txt`` file, or its text) and the control image, as the part reads them."""
        if self._vae is not None:
            return self._vae.inputs(rel, path)
        found: dict[str, InputValue]
        if isinstance(self.captions, str):
            found = caption_inputs(path)
        elif isinstance(self.captions, JsonlField):  # the .jsonl is shared: see JsonlField.jsonl_input
            found = self.captions.listing_inputs(path, "caption", "captions_jsonl")
        else:
            found = {"caption": self.caption(path).encode("utf-8")}
        if self.control_fn is not None:
            found.update(rule_inputs(self.control_fn, path, "control"))
        return found

    def preprocess(self, path: str) -> Any:
        """Latent parts: the image (or control image) as uint8 ``[3, H, W]``. Prompt part: the
        caption, and for an edit family the control image as ``__call__`` resizes it (precompute
        then calls :meth:`encode_items` with a list of them)."""
        if self._vae is not None:
            return self._vae.preprocess(path)
        control = None
        if self.control_fn is not None:
            from diffusers.utils import load_image  # the loader diffusers' own examples use

            control = load_image(os.fspath(self.control_fn(path)))
            if self.family.name == "qwen_image_edit":
                control = qwen_edit_prompt_image(control)
        return self.caption(path), control

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latent parts: ``batch`` float ``[B, 3, H, W]`` in [0, 1]."""
        if self._vae is None:
            raise TypeError("the prompt part encodes captions: precompute calls encode_items")
        # VAEEncoder's "latent", "latent_mean", "latent_logvar" under the feature's name.
        return {self.name + k.removeprefix("latent"): v for k, v in self._vae.encode(batch).items()}


class _PromptPart(PipelineEncoder):
    """The ``prompt`` part: the only one whose items are captions (precompute hands
    :meth:`encode_items` lists of them; the latent parts encode image batches)."""

    def encode_items(self, items: Sequence[tuple[str, Any]]) -> dict[str, Any]:
        """The prompt tensors of ``(caption, control image)`` items, one ``encode_prompt`` call
        each (batch size 1, as at inference). Unpadded embeddings come back as lists (one tensor
        per item, of its own length)."""
        if self.pipe is None or self._device is None:
            self.to(self._device or "cpu")
        rows = [self.family.encode(self.pipe, caption, control, self._device or torch.device("cpu"),
                                   self.max_sequence_length) for caption, control in items]
        if self.family.masked:
            rows = [self._unpad(row, caption) for row, (caption, _) in zip(rows, items, strict=True)]
        out: dict[str, Any] = {}
        for key in rows[0]:
            values = [r[key].to(self.dtype if r[key].is_floating_point() else r[key].dtype) for r in rows]
            same = len({tuple(v.shape) for v in values}) == 1
            out[key] = torch.stack(values) if same else values
        return out

    def _unpad(self, row: dict[str, torch.Tensor], caption: str) -> dict[str, torch.Tensor]:
        """A masked family's row cut to its real tokens, or padded to ``max_length``."""
        n = int(row["prompt_embeds_mask"].sum())
        # encode_prompt pads on the right: real tokens first (checked, never assumed).
        if not bool(row["prompt_embeds_mask"][:n].all()):
            raise ValueError(f"{self.pipeline_class}.encode_prompt returned a mask that is not ones then zeros")
        cut = {k: v[:n] for k, v in row.items()}
        if self.max_length is None:
            return cut
        if n > self.max_length:
            raise ValueError(f"caption {caption[:40]!r}... is {n} tokens, more than max_length={self.max_length}; "
                             "raise max_length (a longer caption is never truncated)")
        return {k: torch.cat([v, v.new_zeros((self.max_length - n, *v.shape[1:]))]) for k, v in cut.items()}


def _check_options(max_sequence_length: int, max_length: int | None, image_size: tuple[int, int] | None) -> None:
    """ValueError for an option out of its range (diffusers would fail deep inside instead)."""
    if int(max_sequence_length) < 1:
        raise ValueError(f"max_sequence_length must be at least 1 token (--max-sequence-length), got "
                         f"{max_sequence_length}; the pipelines' own default is 512")
    if max_length is not None and int(max_length) < 1:
        raise ValueError(f"max_length must be at least 1 token (--max-length), got {max_length}; leave it out to "
                         "store prompt embeddings unpadded")
    if image_size is not None and (len(image_size) != 2 or min(int(n) for n in image_size) < 1):
        raise ValueError(f"image_size must be (width, height) in pixels, each at least 1 (--image-size W H), "
                         f"got {image_size}")


def _pipeline_dir(path: str | os.PathLike[str]) -> str:
    root = os.path.abspath(os.fspath(path))
    if not os.path.isfile(os.path.join(root, "model_index.json")):
        state = ("does not exist" if not os.path.exists(root) else
                 "has no model_index.json" if os.path.isdir(root) else "is not a directory")
        raise CheckpointError(f"pipeline directory {root} {state}; pass the local directory a diffusers pipeline's "
                              "save_pretrained wrote (the one with model_index.json; nothing is downloaded)")
    return root


def _caption_source(captions: Any) -> str:
    return ("txt" if isinstance(captions, str) else
            f"jsonl field {captions.field!r}" if isinstance(captions, JsonlField) else "mapping")
