"""Cheap encoders for precompute tests (importable as `toy_encoders` with tests/ on the path)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class MeanColor:
    """4x4 average-pooled colors of a 32x32 resize: fast, deterministic, shape [48]."""

    name = "toy"

    def __init__(self, delay: float = 0.0, tag: str = "v1") -> None:
        self.delay = delay
        self.tag = tag
        self.calls = 0

    def fingerprint(self) -> str:
        return f"toy-{self.tag}"

    def preprocess(self, path: str) -> torch.Tensor:
        with Image.open(path) as im:
            rgb = im.convert("RGB").resize((32, 32))
        return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return {"features": F.adaptive_avg_pool2d(batch, 4).flatten(1)}


class OOMAboveTwo(MeanColor):
    """Raises CUDA's out-of-memory error for batches larger than two images."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.sizes.append(batch.shape[0])
        if batch.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().encode(batch)


class Huge(MeanColor):
    def estimate_entry_bytes(self) -> int:
        return 10**18


def make_toy() -> MeanColor:
    return MeanColor()


def make_slow() -> MeanColor:
    return MeanColor(delay=float(os.environ.get("TOY_DELAY", "0.3")))


class TinyConv(torch.nn.Module):
    """A plain nn.Module encoder (stored as `features`)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)

    def preprocess(self, path: str) -> torch.Tensor:
        return MeanColor().preprocess(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def make_module() -> TinyConv:
    return TinyConv()


class EditsDuringEncode(MeanColor):
    """Appends a byte to every image of the batch while encoding it (a user editing the data
    during a run): the features no longer describe the files."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def preprocess(self, path: str) -> torch.Tensor:
        self.seen.append(path)
        return super().preprocess(path)

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        for path in self.seen[-batch.shape[0]:]:
            with open(path, "ab") as f:
                f.write(b"\0")
        return super().encode(batch)


class Wide(MeanColor):
    """MeanColor plus ``wide``: its 48 values repeated to ``width`` floats (256 KiB by default).
    Entries this size make a kill land inside a write often, and every value says which image
    it came from."""

    name = "wide"

    def __init__(self, delay: float = 0.0, width: int = 1 << 16) -> None:
        super().__init__(delay)
        self.width = width

    def fingerprint(self) -> str:
        return f"wide-{self.width}"

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().encode(batch)
        f = out["features"]
        out["wide"] = f.repeat(1, -(-self.width // f.shape[1]))[:, : self.width].contiguous()
        return out


class CaptionLength:
    """Embeds a caption as its length and first byte: an ``encode_items`` encoder whose other
    input is the caption file the caption rule picks (``img.txt``, else ``img.png.txt``), or a
    text from a mapping when ``captions`` is given."""

    name = "caption"

    def __init__(self, captions: dict[str, str] | None = None, after_read=None) -> None:
        self.captions = captions
        self.after_read = after_read  # called with the path once the caption is read (edit races)

    def fingerprint(self) -> str:
        return "caption-v1"

    def _caption(self, path: str) -> str:
        from featstore.encoders.diffusion.inputs import caption_path

        if self.captions is not None:
            return self.captions[os.path.basename(path)]
        with open(caption_path(path), encoding="utf-8") as f:
            text = f.read()
        if self.after_read is not None:
            self.after_read(path)
        return text

    def preprocess(self, path: str) -> str:
        return self._caption(path)

    def inputs(self, rel: str, path: str) -> dict:
        from featstore.encoders.diffusion.inputs import caption_inputs

        if self.captions is not None:
            return {"caption": self.captions[os.path.basename(path)].encode()}
        return caption_inputs(path)

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_items(self, items: list[str]) -> dict[str, torch.Tensor]:
        return {"features": torch.tensor([[len(t), ord(t[0]) if t else 0] for t in items], dtype=torch.float32)}


class CausalMean(MeanColor):
    """A toy history encoder: frame k's features are its own 4x4 pooled colors and the mean of
    those of frames 0..k (causal: never a later frame). ``encode_history(batch [B, T, 3, H, W])``
    returns ``features`` ``[B, T, 96]``; it counts its calls and the frames fed, and with ``log``
    appends ``pid history B T`` per call (counted across processes)."""

    name = "toy"

    def __init__(self, log: str | None = None) -> None:
        super().__init__()
        self.log = log
        self.history_calls = 0
        self.frames_fed = 0

    def fingerprint(self) -> str:
        return "toy-history-v1"

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": self.encode_history(batch[:, None])["features"][:, 0]}

    def encode_history(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t = batch.shape[:2]
        self.history_calls += 1
        self.frames_fed += b * t
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()} history {b} {t}\n")
        own = F.adaptive_avg_pool2d(batch.flatten(0, 1), 4).flatten(1).view(b, t, -1)
        past = own.cumsum(1) / torch.arange(1, t + 1, dtype=own.dtype).view(1, t, 1)
        return {"features": torch.cat([own, past], dim=2)}


def causal_mean_features(root: str, frames: list[str]) -> torch.Tensor:
    """What :class:`CausalMean` gives for the history ``frames`` (its last frame's row)."""
    enc = CausalMean()
    batch = torch.stack([enc.preprocess(os.path.join(root, f)) for f in frames])[None].float() / 255
    return enc.encode_history(batch)["features"][0, -1]
