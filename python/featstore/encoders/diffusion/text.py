"""Caption embeddings from a transformers text model and its tokenizer (``prompt_embed``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from featstore.encoders.base import digest_of, state_dict_digest, weights_digest
from featstore.encoders.diffusion.inputs import JsonlField, caption_inputs, read_caption
from featstore.encoders.diffusion.loading import _existing_dir, _public_config, _require, quiet_off_terminal
from featstore.errors import CheckpointError
from featstore.inputs import InputValue


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

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.model_path is not None:
            # A spawned DataLoader worker only preprocesses: it gets the directory, not the weights.
            state["model"], state["_device"] = None, None
        return state

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
            quiet_off_terminal()
            try:
                self.model = cls.from_pretrained(self.model_path, **kwargs).eval()
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot load the text model from {self.model_path}: {exc}") from exc
        self._device = torch.device(device)
        self.model.to(self._device)
        return self

    def caption(self, path: str) -> str:
        """The caption of the image at ``path`` (surrounding whitespace stripped)."""
        return read_caption(self.captions, path)

    def preprocess(self, path: str) -> str:
        """The caption (precompute then calls :meth:`encode_items` with a list of them)."""
        return self.caption(path)

    def inputs(self, rel: str, path: str) -> dict[str, InputValue]:
        """The caption file (``.txt``; with the rule's preferred file that must stay absent), or
        the caption's text and its ``.jsonl`` file (stamped when the mapping read it)."""
        if isinstance(self.captions, str):
            return caption_inputs(path)
        if isinstance(self.captions, JsonlField):
            return self.captions.listing_inputs(path, "caption", "captions_jsonl")
        return {"caption": self.caption(path).encode("utf-8")}

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


