"""Encoders featstore can precompute: the protocol, the built-ins, and user encoders.

- ``vggt``: :class:`VGGTEncoder` (patch tokens of selected VGGT layers);
- ``module:callable``: a user factory returning an encoder or an ``nn.Module`` (see
  :func:`resolve_encoder`);
- diffusion (:mod:`featstore.encoders.diffusion`, loaded on first use so that importing this
  package imports neither diffusers nor transformers): :class:`PipelineEncoder` (a diffusers
  pipeline's own ``encode_prompt`` and VAE: ``prompt_embed``, ``pixel_latent``,
  ``control_latent``), :class:`VAEEncoder`, :class:`TextEncoder`, :class:`JsonlField`,
  :class:`ControlDir`.
"""

from typing import Any

from featstore.encoders.base import (
    Capabilities,
    Encoder,
    capabilities,
    describe,
    digest_of,
    state_dict_digest,
    weights_digest,
)
from featstore.encoders.module import ModuleEncoder, as_encoder, load_callable
from featstore.encoders.vggt import TINY_CONFIG, VGGTEncoder


def resolve_encoder(spec: object, **vggt_options: object) -> Encoder:
    """An encoder from ``"vggt"``, ``"module:callable"``, an encoder object, an ``nn.Module`` or a
    zero-argument factory of one. ``vggt_options`` go to :class:`VGGTEncoder`."""
    if isinstance(spec, str):
        if spec == "vggt":
            return VGGTEncoder(**vggt_options)  # type: ignore[arg-type]
        if ":" in spec:
            return as_encoder(load_callable(spec)())
        raise ValueError(f"unknown encoder {spec!r}: use 'vggt' or 'module.path:callable'")
    # A class is a factory too (it has `encode` as a function, not as a bound method).
    if isinstance(spec, type) or (callable(spec) and not hasattr(spec, "encode") and not hasattr(spec, "forward")):
        return as_encoder(spec())
    return as_encoder(spec)


_DIFFUSION = ("PipelineEncoder", "VAEEncoder", "TextEncoder", "JsonlField", "ControlDir")


def __getattr__(name: str) -> Any:
    if name in _DIFFUSION:
        from featstore.encoders import diffusion

        return getattr(diffusion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Encoder", "Capabilities", "capabilities", "ModuleEncoder", "VGGTEncoder", "TINY_CONFIG", "resolve_encoder",
           "as_encoder", "load_callable",
           "describe", "digest_of", "state_dict_digest", "weights_digest", *_DIFFUSION]
