"""User encoders: ``--encoder module:callable``, and plain ``nn.Module`` s wrapped as encoders."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from featstore.encoders.base import Encoder, state_dict_digest


class ModuleEncoder:
    """Wraps an ``nn.Module`` that maps a float ``[B, 3, H, W]`` batch in [0, 1] to one tensor.

    The output is stored as ``features``; the fingerprint is the digest of the module's class and
    state dict (plus ``extra_fingerprint``); preprocessing is the module's ``preprocess``
    attribute when it has one, else VGGT's "crop" (518 wide, height a multiple of 14).

    Parameters
    ----------
    module : nn.Module
        The frozen encoder (put in eval mode).
    name : str, optional
        Feature name (default: the class name in lower case).
    extra_fingerprint : str
        Anything else that changes the output (a variant, a flag).
    """

    def __init__(self, module: torch.nn.Module, name: str | None = None, extra_fingerprint: str = "") -> None:
        self.module = module.eval()
        self.name = name or type(module).__name__.lower()
        self._extra = extra_fingerprint
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = f"{state_dict_digest(self.module)}{self._extra}"
        return self._fingerprint

    def preprocess(self, path: str) -> torch.Tensor:
        custom = getattr(self.module, "preprocess", None)
        if callable(custom):
            return custom(path)
        from featstore.models.vggt import preprocess_image_uint8

        return preprocess_image_uint8(path, "crop")

    def to(self, device: torch.device | str) -> ModuleEncoder:
        self.module.to(device)
        return self

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": self.module(batch)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "class": f"{type(self.module).__module__}.{type(self.module).__qualname__}"}


def as_encoder(obj: Any, name: str | None = None) -> Encoder:
    """An encoder from what a factory returned: an encoder as is, an ``nn.Module`` wrapped."""
    if isinstance(obj, torch.nn.Module) and not isinstance(obj, Encoder):
        return ModuleEncoder(obj, name=name)
    missing = [a for a in ("name", "fingerprint", "preprocess", "encode") if not hasattr(obj, a)]
    if missing:
        raise TypeError(f"{obj!r} is not an encoder: it lacks {', '.join(missing)} (see featstore.encoders.base), "
                        "and it is not an nn.Module")
    return obj


def load_callable(spec: str) -> Callable[..., Any]:
    """Imports ``module.path:callable`` (e.g. ``mypkg.encoders:make_encoder``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"encoder {spec!r} is not of the form module.path:callable")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for encoder {spec!r}: {exc}. Is it on PYTHONPATH?") from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attr!r} (encoder {spec!r})") from None
    if not callable(obj):
        raise ValueError(f"encoder {spec!r} is not callable")
    return obj
