"""The encoder protocol, and the fingerprints that say when an encoder's output changes.

Every encoder has::

    name: str                                   # default feature name ("vggt", "pixel_latent")
    fingerprint() -> str                        # digest of everything that changes the output
    preprocess(path) -> Tensor                  # uint8 [3, H, W]; runs in DataLoader workers
    encode(batch) -> dict[str, Tensor]          # batch: float [B, 3, H, W] in [0, 1] on the device;
                                                # every output has the batch as its first axis

and may have any of these (:func:`capabilities` says which; nothing else asks ``hasattr``)::

    to(device) -> encoder                       # load weights and move there: called once, in the
                                                # main process, before the first batch
    describe() -> dict                          # what the manifest records about it
    inputs(rel, path) -> dict[str, str | bytes] # inputs besides the source (a caption file, a
                                                # control image: paths; a caption text: bytes),
                                                # recorded in the entry and checked on lookup
    encode_items(items) -> dict[str, Tensor]    # preprocess returns an item (a caption), not an
                                                # image: a batch is the list of items; an output
                                                # may be a list of one tensor per item instead
                                                # (ragged: each entry gets its own shape)
    encode_sets(batch) -> dict[str, Tensor]     # frame sets: uint8-derived float [B, S, 3, H, W]
    frames_per_set: int                         # > 1: sources are encoded in ordered sets
    encode_history(batch, lengths=None)         # histories, causally: batch is uint8-derived float
        -> dict[str, Tensor]                    # [B, T, 3, H, W] on the device, in [0, 1], B lists
                                                # of T frames oldest first; every output is
                                                # [B, T, ...], index k the features of the prefix
                                                # of length k + 1 (its last frame given frames
                                                # 0..k), in the per-image features' token/layer
                                                # selection and dtype. ``lengths`` (optional
                                                # parameter): the prefix lengths the caller reads;
                                                # other rows may be left zero
    history: bool                               # False: an encoder that has encode_history still
                                                # encodes per image (VGGTEncoder's default)
    prefixes_share_a_pass: bool                 # False: each prefix length is its own pass (a
                                                # reversed order), so callers ask for the lengths
                                                # they need only (default True)
    frame_passes: int                           # frames fed through the model so far (a history
                                                # encoder counts them; precompute reports them)
    estimate_entry_bytes() -> int               # bytes of one entry, for the dry-run plan
    varying_outputs() -> tuple[str, ...]        # outputs whose first axis may differ between
                                                # items (VGGT's tokens of images of other aspect
                                                # ratios, unpadded prompts): what a dataset pads
                                                # when no manifest sums up the entries' shapes

A history encoder computes every prefix of a list in one causal pass when it can (T frame passes
for T prefixes; precompute writes one entry per prefix a sample names).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from featstore import env


@runtime_checkable
class Encoder(Protocol):
    """What ``featstore precompute`` and ``CachedDataset`` need from an encoder."""

    name: str

    def fingerprint(self) -> str: ...

    def preprocess(self, path: str) -> torch.Tensor: ...

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Capabilities:
    """Which optional parts of the protocol an encoder has (see the module's docstring)."""

    to: bool
    describe: bool
    inputs: bool
    encode_items: bool
    encode_sets: bool
    estimate_entry_bytes: bool
    varying_outputs: bool
    frames_per_set: int
    encode_history: bool = False
    history_lengths: bool = False
    frame_passes: bool = False
    prefixes_share_a_pass: bool = True

    @property
    def items(self) -> bool:
        """``preprocess`` gives items (captions) that ``encode_items`` takes as a list, not images."""
        return self.encode_items

    @property
    def history(self) -> bool:
        """Sources are encoded as ordered histories (``encode_history``), one entry per prefix."""
        return self.encode_history


def capabilities(encoder: Any) -> Capabilities:
    """The optional methods ``encoder`` has: the one place that asks."""
    def has(name: str) -> bool:
        return callable(getattr(encoder, name, None))

    history = has("encode_history") and bool(getattr(encoder, "history", True))
    return Capabilities(to=has("to"), describe=has("describe"), inputs=has("inputs"),
                        encode_items=has("encode_items"), encode_sets=has("encode_sets"),
                        estimate_entry_bytes=has("estimate_entry_bytes"), varying_outputs=has("varying_outputs"),
                        frames_per_set=int(getattr(encoder, "frames_per_set", 1)), encode_history=history,
                        history_lengths=history and _takes(encoder.encode_history, "lengths"),
                        frame_passes=isinstance(getattr(encoder, "frame_passes", None), int),
                        prefixes_share_a_pass=bool(getattr(encoder, "prefixes_share_a_pass", True)))


def _takes(method: Any, parameter: str) -> bool:
    """Whether ``method`` accepts the keyword ``parameter`` (an optional parameter of the protocol)."""
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return parameter in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def digest_of(*parts: Any) -> str:
    """A stable 32-hex-digit digest of JSON-serializable parts (the configuration half of a
    fingerprint)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def state_dict_digest(module: torch.nn.Module) -> str:
    """Digest of a module's class and every tensor of its state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for key, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.hexdigest()[:32]


def _digest_cache_path() -> str:
    return os.path.join(env.user_cache_home(), "featstore", "weight-digests.json")


def weights_digest(path: str | os.PathLike[str]) -> str:
    """Content digest (blake3) of a weights file, or of every weights file in a directory.

    Digests are cached by path and full stamp (size, mtime, inode, ctime: as sources are
    judged) in ``~/.cache/featstore/weight-digests.json``, so a 5 GB checkpoint is read once per
    machine, and a checkpoint copied over the old one with the same size and a restored mtime
    (a sync tool, a swapped pipeline directory) has a new inode or ctime and is digested again.
    Copies on other nodes give the same digest (the fingerprint depends on the bytes, not the
    path).

    Raises
    ------
    NotARegularFileError
        A weights file is a FIFO, socket or device (never opened for a blocking read).
    """
    from featstore import _core
    from featstore.inputs import stamp_of

    root = os.path.abspath(os.fspath(path))
    if os.path.isdir(root):
        files = sorted(os.path.join(root, f) for f in os.listdir(root)
                       if f.endswith((".pt", ".pth", ".bin", ".safetensors", ".json")))
    else:
        files = [root]
    cache_file = _digest_cache_path()
    try:
        with open(cache_file) as f:
            cache: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        cache = {}
    parts = []
    changed = False
    for file in files:
        stamp = list(stamp_of(file))
        hit = cache.get(file)
        if isinstance(hit, list) and len(hit) == 5 and hit[:4] == stamp:
            parts.append(hit[4])
            continue
        digest = _core.file_digest(file)
        if list(stamp_of(file)) == stamp:  # unchanged while it was read: the digest is of these bytes
            cache[file] = [*stamp, digest]
            changed = True
        parts.append(digest)
    if changed:
        try:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            tmp = f"{cache_file}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only home only costs a re-digest next time
    return digest_of([os.path.basename(f) for f in files], parts)


def describe(encoder: Any) -> dict[str, Any]:
    """What the manifest records about an encoder."""
    if capabilities(encoder).describe:
        return dict(encoder.describe())
    return {"name": getattr(encoder, "name", type(encoder).__name__), "class": type(encoder).__qualname__}


def check_outputs(outputs: Any, batch_size: int, encoder_name: str) -> Mapping[str, Any]:
    """Validates what ``encode`` returned: a dict of tensors with the batch as first axis, or of
    lists with one tensor per item (ragged outputs, e.g. unpadded prompt embeddings)."""
    if isinstance(outputs, torch.Tensor):
        outputs = {"features": outputs}
    if not isinstance(outputs, Mapping) or not outputs:
        raise TypeError(f"encoder {encoder_name!r}: encode() must return a dict of tensors, "
                        f"got {type(outputs).__name__}")
    for k, v in outputs.items():
        if isinstance(v, list) and len(v) == batch_size and all(isinstance(t, torch.Tensor) for t in v):
            continue
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != batch_size:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise TypeError(f"encoder {encoder_name!r}: output {k!r} must have the batch ({batch_size}) as its "
                            f"first axis, got {shape}")
    return outputs
