"""Loading VGGT checkpoints (``.pt``, ``.pth``, ``.safetensors``, or a directory holding one).

The model is built on the meta device and the checkpoint's tensors are assigned to it directly,
so at no point do two full copies of the weights exist: ``.pt`` files are memory-mapped and
safetensors files are read tensor by tensor.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from featstore.errors import CheckpointError, NotARegularFileError
from featstore.models.vggt.aggregator import LayerSelection
from featstore.models.vggt.model import VGGT
from featstore.regular import require_regular

__all__ = ["load_vggt", "find_checkpoint_file"]

_PREFERRED_NAMES = ("model.safetensors", "model.safetensors.index.json", "model.pt", "model.pth")
_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_HEAD_PREFIXES = {
    "enable_camera": "camera_head.",
    "enable_point": "point_head.",
    "enable_depth": "depth_head.",
    "enable_track": "track_head.",
}
_HOW_TO_GET = (
    "download the VGGT-1B checkpoint (model.pt of the Hugging Face model facebook/VGGT-1B) and pass "
    "its path with --vggt-model-path or the VGGT_MODEL_PATH environment variable"
)
_EXAMPLES = 5


def find_checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """Resolve a checkpoint argument to one file.

    Parameters
    ----------
    path : str or PathLike
        A ``.pt``, ``.pth`` or ``.safetensors`` file, a ``*.safetensors.index.json`` shard index,
        or a directory holding one of them (``model.safetensors`` is preferred, then
        ``model.safetensors.index.json``, ``model.pt``, ``model.pth``, then a single other
        checkpoint file).

    Returns
    -------
    Path
        The file to load.

    Raises
    ------
    CheckpointError
        When the path does not exist, or a directory holds no checkpoint or several candidates.
    """
    resolved = Path(os.fspath(path)).expanduser()
    if not resolved.exists():
        raise CheckpointError(f"VGGT checkpoint not found: {resolved} does not exist; {_HOW_TO_GET}")
    if resolved.is_file():
        return resolved
    if not resolved.is_dir():
        raise CheckpointError(f"VGGT checkpoint {resolved} is neither a file nor a directory; {_HOW_TO_GET}")
    for name in _PREFERRED_NAMES:
        if (resolved / name).is_file():
            return resolved / name
    candidates = sorted(
        p
        for p in resolved.iterdir()
        if p.is_file() and (p.suffix in _SUFFIXES or p.name.endswith(".safetensors.index.json"))
    )
    index_files = [p for p in candidates if p.name.endswith(".index.json")]
    if len(index_files) == 1:
        return index_files[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointError(
            f"no VGGT checkpoint in directory {resolved}: looked for {', '.join(_PREFERRED_NAMES)} or any "
            f"*.safetensors / *.pt / *.pth / *.bin file; {_HOW_TO_GET}"
        )
    names = ", ".join(p.name for p in candidates[:_EXAMPLES])
    raise CheckpointError(
        f"directory {resolved} holds several checkpoint files ({names}); pass the path of the one to load"
    )


class _Checkpoint:
    """Key-to-shape view of a checkpoint file whose tensors are read only when asked for."""

    def __init__(self, path: Path):
        self.path = path
        self._safetensors: dict[str, Any] = {}
        self._tensors: Mapping[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        try:
            require_regular(path, "VGGT checkpoint")  # a FIFO would block torch.load forever
        except NotARegularFileError as exc:
            raise CheckpointError(str(exc)) from exc
        try:
            if path.name.endswith(".safetensors.index.json"):
                self._open_safetensors_index()
            elif path.suffix == ".safetensors":
                self._open_safetensors([path])
            elif path.suffix in (".pt", ".pth", ".bin"):
                self._open_torch()
            else:
                raise CheckpointError(
                    f"cannot load VGGT checkpoint {path}: unknown file type {path.suffix!r}; "
                    "use a .pt, .pth, .bin or .safetensors state dict"
                )
        except CheckpointError:
            raise
        except PermissionError as exc:
            raise CheckpointError(
                f"cannot read VGGT checkpoint {path}: permission denied; check its mode"
            ) from exc
        except Exception as exc:  # the readers raise many types for a damaged file
            raise CheckpointError(self._damaged(exc)) from exc

    def _open_safetensors(self, files: Iterable[Path]) -> None:
        from safetensors import safe_open

        for file in files:
            handle = safe_open(str(file), framework="pt", device="cpu")
            for key in handle.keys():
                self._safetensors[key] = handle
                self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def _open_safetensors_index(self) -> None:
        weight_map = json.loads(self.path.read_text())["weight_map"]
        shards = sorted({self.path.parent / name for name in weight_map.values()})
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(
                f"VGGT checkpoint index {self.path} names shard files that do not exist: "
                f"{', '.join(missing[:_EXAMPLES])}; download every shard into the same directory"
            )
        self._open_safetensors(shards)

    def _open_torch(self) -> None:
        try:
            try:
                # mmap: tensors stay backed by the file until they are moved or cast.
                loaded = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # Files saved with the legacy (non-zip) serialization cannot be mapped.
                loaded = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # Refused objects name a GLOBAL (a class, a function); garbage fails otherwise.
            if "weights only" not in str(exc).lower() or "global" not in str(exc).lower():
                raise
            raise CheckpointError(
                f"cannot load VGGT checkpoint {self.path} safely: it holds objects other than tensors. "
                "featstore loads plain state dicts only, never code from a file: re-save it with "
                "torch.save(model.state_dict(), path), or use the published model.pt of facebook/VGGT-1B"
            ) from exc
        state = _unwrap_state_dict(loaded)
        if state is None:
            raise CheckpointError(
                f"VGGT checkpoint {self.path} is not a state dict (found {type(loaded).__name__}); "
                "save it with torch.save(model.state_dict(), path)"
            )
        self._tensors = state
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}

    def _damaged(self, exc: BaseException) -> str:
        """featstore's fix first, then torch's reason without its advice to load with
        ``weights_only=False`` (that would run code from the file)."""
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "weights_only" not in line and "re-running" not in line.lower()),
                      "")
        reason = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        return (f"cannot read VGGT checkpoint {self.path}: the file is damaged or not a PyTorch checkpoint; "
                f"{_HOW_TO_GET} (download it again if it was cut short). torch said: {reason[:300]}")

    def tensor(self, key: str) -> torch.Tensor:
        """Read one tensor (on the CPU; mapped rather than copied for ``.pt`` files)."""
        if key in self._safetensors:
            return self._safetensors[key].get_tensor(key)
        return self._tensors[key]


def _unwrap_state_dict(loaded: Any) -> dict[str, torch.Tensor] | None:
    """Accept a plain state dict, ``{"model": sd}`` / ``{"state_dict": sd}``, and DDP ``module.`` prefixes."""
    if not isinstance(loaded, dict):
        return None
    if len(loaded) <= 2:
        for wrapper in ("model", "state_dict"):
            if isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
                break
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        return None
    if loaded and all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module.") :]: v for k, v in loaded.items()}
    return loaded


def _examples(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:_EXAMPLES])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _EXAMPLES else "")


def load_vggt(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    selected_layer_idx: LayerSelection = None,
    enable_camera: bool = True,
    enable_point: bool = True,
    enable_depth: bool = True,
    enable_track: bool = True,
    config: Mapping[str, Any] | None = None,
) -> VGGT:
    """Build a :class:`VGGT` and fill it from a checkpoint, without a second copy of the weights.

    Parameters
    ----------
    path : str or PathLike
        A ``.pt`` / ``.pth`` state dict (loaded with ``weights_only=True``, memory-mapped), a
        ``.safetensors`` file or shard index, or a directory holding one (see
        :func:`find_checkpoint_file`).
    device : torch.device or str
        Where the weights go.
    dtype : torch.dtype or None
        Floating-point dtype of the weights; ``None`` keeps the checkpoint's.
    selected_layer_idx : int, iterable of int, or None
        Passed to :class:`VGGT` (layers to keep and return).
    enable_camera, enable_point, enable_depth, enable_track : bool
        Heads to build; the checkpoint keys of disabled heads are skipped, never read. For
        feature extraction only, disable them all.
    config : Mapping, optional
        Further :class:`VGGT` constructor arguments for a checkpoint of another size (e.g.
        ``embed_dim`` and ``aggregator_kwargs``); the default is VGGT-1B.

    Returns
    -------
    VGGT
        The model in eval mode on ``device``.

    Raises
    ------
    CheckpointError
        For a missing path, an unreadable or damaged file, missing or unexpected keys, or tensors
        whose shapes do not fit the model. Messages name the file and list a few offending keys.
    """
    device = torch.device(device)
    file = find_checkpoint_file(path)
    kwargs: dict[str, Any] = dict(config or {})
    heads = {
        "enable_camera": enable_camera,
        "enable_point": enable_point,
        "enable_depth": enable_depth,
        "enable_track": enable_track,
    }
    kwargs.update(heads)
    kwargs["selected_layer_idx"] = selected_layer_idx
    with torch.device("meta"):
        model = VGGT(**kwargs)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    checkpoint = _Checkpoint(file)
    skipped = tuple(prefix for flag, prefix in _HEAD_PREFIXES.items() if not heads[flag])
    found = {k: s for k, s in checkpoint.shapes.items() if not k.startswith(skipped)}
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    mismatched = [
        f"{k} (checkpoint {list(found[k])}, model {list(expected[k])})"
        for k in sorted(expected.keys() & found.keys())
        if found[k] != expected[k]
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} keys missing: {_examples(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_examples(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches: {', '.join(mismatched[:_EXAMPLES])}")
        size = "the configuration given in config" if config else "VGGT-1B"
        raise CheckpointError(
            f"VGGT checkpoint {file} does not fit {size}: {'; '.join(problems)}. Check that the file is a "
            "VGGT state dict of this size (pass config=... for other sizes)"
        )

    state: dict[str, torch.Tensor] = {}
    try:
        for key in expected:
            tensor = checkpoint.tensor(key)
            target_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            # One tensor at a time: the previous one is already owned by the state dict, so peak
            # memory is the weights plus one tensor in transit.
            state[key] = tensor.to(device=device, dtype=target_dtype)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read tensor data from VGGT checkpoint {file}: {type(exc).__name__}: {exc}. "
            f"The file is damaged or incomplete; download it again ({_HOW_TO_GET})"
        ) from exc
    del checkpoint
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.aggregator.reset_constant_buffers(device, model.aggregator.camera_token.dtype)
    leftovers = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftovers:  # a bug in featstore, not in the file
        raise RuntimeError(f"tensors left uninitialized after loading {file}: {leftovers[:_EXAMPLES]}")
    return model.eval()
