"""What ``FeatureStore.read_batch`` needs around its one Rust call: the batch tensor (given, or
made after the first valid entry's layout) and the errors a user can act on."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from featstore import _core
from featstore.errors import BatchReadError, CorruptEntryError, StaleEntryError, TensorNameError
from featstore.packs import entry_location

if TYPE_CHECKING:  # the store reads batches through this module
    import torch

    from featstore.store import FeatureStore


def entry_layout(store: FeatureStore, path: str | os.PathLike[str]) -> dict[str, tuple[Any, tuple[int, ...]]] | None:
    """:meth:`FeatureStore.entry_layout`: each tensor's torch dtype and shape in the valid entry
    of ``path``, from its header (nothing mapped), or None when there is no valid entry."""
    from featstore._torch import SAFETENSORS_TO_TORCH  # imports torch: not at `import featstore`

    check = store.check(path)
    if check.state != "valid":
        return None
    try:
        _, tensors, _ = _core.read_header(*entry_location(check))
    except (CorruptEntryError, FileNotFoundError):
        return None  # replaced or removed since the check
    # A dtype torch cannot hold (float8) gives no layout: read_batch then finds no entry to use.
    return {name: (SAFETENSORS_TO_TORCH[dt], tuple(shape)) for name, dt, shape, _, _ in tensors
            if dt in SAFETENSORS_TO_TORCH}


def checked_out(store: FeatureStore, rels: Sequence[str], name: str, out: torch.Tensor | None, *,
                pin_memory: bool) -> torch.Tensor:
    """``out`` when it can hold the batch, else a new tensor shaped after the first valid entry
    holding ``name``. A name no valid entry holds is a :class:`TensorNameError` naming those it
    holds; no valid entry at all is a :class:`StaleEntryError`."""
    import torch  # here, not at the top: `import featstore` does not import torch

    if out is not None:
        if out.device.type != "cpu" or not out.is_contiguous() or out.shape[0] != len(rels):
            raise ValueError(f"out must be a contiguous CPU tensor with {len(rels)} rows, got {tuple(out.shape)} "
                             f"on {out.device}")
        return out
    seen: tuple[str, list[str]] | None = None  # the first valid entry's tensors, when none has ``name``
    for rel in rels:
        layout = store.entry_layout(rel)
        if layout and name in layout:
            dtype, shape = layout[name]
            return torch.empty((len(rels), *shape), dtype=dtype, pin_memory=pin_memory)
        if layout and seen is None:
            seen = (rel, list(layout))
    if seen is not None:
        raise TensorNameError(no_tensor(store, name, *seen))
    raise StaleEntryError(f"none of the {len(rels)} sources has a valid entry with a tensor {name!r} "
                          f"(feature {store.feature}); run `featstore precompute` first")


def core_dtype(out: torch.Tensor) -> str:
    """The entry dtype name of ``out``'s dtype (ValueError for one entries cannot hold)."""
    from featstore._torch import TORCH_TO_SAFETENSORS  # imports torch: not at `import featstore`

    dtype = TORCH_TO_SAFETENSORS.get(out.dtype)
    if dtype is None:
        raise ValueError(f"out has dtype {out.dtype}, which entries cannot hold; use one of "
                         f"{', '.join(str(d).replace('torch.', '') for d in TORCH_TO_SAFETENSORS)}")
    return dtype


def read_failure(store: FeatureStore, rels: Sequence[str], name: str, failed: Sequence[tuple[int, str, str]],
                 out: Any) -> Exception:
    """The error for slots that could not be filled: a misspelled tensor name when a valid entry
    lacks it, else :class:`BatchReadError` naming the first failure (``failed`` lists them all)."""
    i, rel, why = failed[0]
    layout = store.entry_layout(rel)
    if layout and name not in layout:
        return TensorNameError(no_tensor(store, name, rel, list(layout)))
    return BatchReadError(f"{len(failed)} of {len(rels)} entries were not read into the batch, e.g. "
                          f"{rel} (slot {i}): {why}", list(failed), out)


def no_tensor(store: FeatureStore, name: str, rel: str, names: Sequence[str]) -> str:
    """The message for a tensor name the entries do not hold."""
    return (f"no tensor {name!r} in the {store.feature} entries: the valid entry of {rel} holds "
            f"{', '.join(repr(n) for n in sorted(names))}; read one of those")


def read_batch(store: FeatureStore, rels: list[str], name: str, out: torch.Tensor | None, *, pin_memory: bool,
               threads: int | None) -> torch.Tensor:
    """:meth:`FeatureStore.read_batch` of sources already named relative to the root: one
    ``pread`` per entry into its slot of ``out`` (made from the first valid entry when None), in
    Rust without the GIL; raises :class:`BatchReadError` naming the slots that failed."""
    out = checked_out(store, rels, name, out, pin_memory=pin_memory)
    errors = store._core.read_batch(rels, name, core_dtype(out), list(out.shape[1:]), out.data_ptr(),
                                    out.numel() * out.element_size(), threads)
    failed = [(i, rels[i], why) for i, why in enumerate(errors) if why is not None]
    if failed:
        raise read_failure(store, rels, name, failed, out)
    store.stats["hits"] += len(rels)
    return out
