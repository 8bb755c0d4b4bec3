"""Encoders for diffusion fine-tuning: VAE latents of images and control images, and embeddings
of captions.

- :class:`PipelineEncoder`: one part of a diffusers pipeline (Qwen-Image, Qwen-Image-Edit, SD 1.5,
  SDXL, Flux, Wan): its own ``encode_prompt`` (``prompt_embed``) or its VAE (``pixel_latent``,
  ``control_latent``); the families are described in :mod:`.families`;
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

from featstore.encoders.diffusion.inputs import ControlDir, JsonlField, caption_path
from featstore.encoders.diffusion.loading import load_image_uint8
from featstore.encoders.diffusion.pipeline import PARTS, PipelineEncoder
from featstore.encoders.diffusion.text import TextEncoder, tokenizer_digest
from featstore.encoders.diffusion.vae import OUTPUTS, VAEEncoder

__all__ = ["OUTPUTS", "PARTS", "ControlDir", "JsonlField", "PipelineEncoder", "TextEncoder", "VAEEncoder",
           "caption_path", "load_image_uint8", "tokenizer_digest"]
