"""The diffusion pipeline families :class:`~featstore.encoders.PipelineEncoder` knows: which
components each part needs, how each family's own ``encode_prompt`` is called for one caption,
and the names its outputs are stored under (the diffusion users' cache names: ``prompt_embed``,
``prompt_embeds_mask``, ``pooled_prompt_embed``).

featstore never re-implements a family's prompt encoding: it calls the pipeline's method, so a
cached embedding is what that pipeline computes at inference, by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

#: One caption's prompt tensors, without a batch axis.
PromptTensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """How featstore uses one family of diffusers pipelines.

    Attributes
    ----------
    name : str
        featstore's name for it (``"qwen_image_edit"``).
    pipelines : tuple of str
        The diffusers pipeline classes of the family (``model_index.json``'s ``_class_name``).
    prompt_components : tuple of str
        The components ``encode_prompt`` uses: only these are loaded for the ``prompt`` part.
    encode : callable
        ``encode(pipe, caption, control_image, device, max_sequence_length) -> {name: tensor}``:
        the pipeline's own ``encode_prompt`` for one caption (and, for an edit family, its
        control image prepared as the pipeline's ``__call__`` prepares it), without the batch
        axis. ``max_sequence_length`` is passed where the family takes one (its ``__call__``
        default is 512 for all of them; CLIP's 77 tokens are fixed).
    takes_control : bool
        The prompt embedding depends on the control image (Qwen-Image-Edit).
    masked : bool
        ``encode_prompt`` returns a mask and pads with zeros beyond it: the embedding is stored
        unpadded, at the caption's length (padding to ``max_length`` is an option). Families
        whose padding tokens carry information (CLIP, T5 without a mask) store what the pipeline
        returns, at its fixed length.
    latent_multiple : int
        Image sides for the VAE parts are multiples of this (the VAE's downsampling times the
        transformer's patch size).
    """

    name: str
    pipelines: tuple[str, ...]
    prompt_components: tuple[str, ...]
    encode: Callable[[Any, str, Any, torch.device, int], PromptTensors]
    takes_control: bool = False
    masked: bool = False
    latent_multiple: int = 8


def _qwen(pipe: Any, caption: str, control: Any, device: torch.device, max_sequence_length: int
          ) -> PromptTensors:
    kwargs = {"image": control} if control is not None else {}
    embeds, mask = pipe.encode_prompt(prompt=[caption], device=device, num_images_per_prompt=1,
                                      max_sequence_length=max_sequence_length, **kwargs)
    if mask is None:  # diffusers drops an all-ones mask in some versions: every token is real
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return {"prompt_embed": embeds[0], "prompt_embeds_mask": mask[0].to(torch.int64)}


def _sd15(pipe: Any, caption: str, control: Any, device: torch.device, max_sequence_length: int
          ) -> PromptTensors:
    embeds, _ = pipe.encode_prompt(caption, device, 1, False)
    return {"prompt_embed": embeds[0]}


def _sdxl(pipe: Any, caption: str, control: Any, device: torch.device, max_sequence_length: int
          ) -> PromptTensors:
    embeds, _, pooled, _ = pipe.encode_prompt(caption, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {"prompt_embed": embeds[0], "pooled_prompt_embed": pooled[0]}


def _flux(pipe: Any, caption: str, control: Any, device: torch.device, max_sequence_length: int
          ) -> PromptTensors:
    embeds, pooled, _ = pipe.encode_prompt(prompt=caption, prompt_2=None, device=device, num_images_per_prompt=1,
                                           max_sequence_length=max_sequence_length)
    return {"prompt_embed": embeds[0], "pooled_prompt_embed": pooled[0]}


def _wan(pipe: Any, caption: str, control: Any, device: torch.device, max_sequence_length: int
         ) -> PromptTensors:
    embeds, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                   max_sequence_length=max_sequence_length, device=device)
    return {"prompt_embed": embeds[0]}


FAMILIES: tuple[Family, ...] = (
    Family("qwen_image", ("QwenImagePipeline",), ("text_encoder", "tokenizer"), _qwen, masked=True,
           latent_multiple=16),
    Family("qwen_image_edit", ("QwenImageEditPipeline",), ("text_encoder", "tokenizer", "processor"), _qwen,
           takes_control=True, masked=True, latent_multiple=16),
    Family("sd15", ("StableDiffusionPipeline",), ("text_encoder", "tokenizer"), _sd15),
    Family("sdxl", ("StableDiffusionXLPipeline",),
           ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"), _sdxl),
    Family("flux", ("FluxPipeline",), ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"), _flux,
           latent_multiple=16),
    Family("wan", ("WanPipeline",), ("text_encoder", "tokenizer"), _wan, latent_multiple=16),
)


def family_of(pipeline_class: str) -> Family:
    """The family of a diffusers pipeline class name.

    Raises
    ------
    ValueError
        featstore does not know the class (the message lists the ones it knows).
    """
    for family in FAMILIES:
        if pipeline_class in family.pipelines:
            return family
    known = ", ".join(p for f in FAMILIES for p in f.pipelines)
    raise ValueError(f"featstore does not know the pipeline class {pipeline_class!r}; PipelineEncoder supports "
                     f"{known}. For another family, use VAEEncoder and TextEncoder, or write an encoder "
                     "(docs/development.md, \"Adding an encoder\")")


def qwen_edit_prompt_image(image: Any) -> Any:
    """The control image (PIL) as ``QwenImageEditPipeline.__call__`` hands it to ``encode_prompt``:
    resized to the area of 1024x1024 at the image's aspect ratio, sides rounded to multiples of 32
    (its ``calculate_dimensions``), by its image processor's resize (a PIL Lanczos resize). A test
    holds this equal to the pipeline's own ``image_processor.resize``."""
    from PIL import Image

    ratio = image.size[0] / image.size[1]
    width = math.sqrt(1024 * 1024 * ratio)
    height = width / ratio
    size = (round(width / 32) * 32, round(height / 32) * 32)
    return image.resize(size, resample=Image.Resampling.LANCZOS)
