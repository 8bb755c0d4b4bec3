"""Batches of :class:`~featstore.training.CachedDataset` samples: :func:`collate`, padding of
variable-length tensors, and the zero-copy pass-through of rows read into one batch tensor."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import torch

from featstore import shapes
from featstore.manifest import recorded_shapes
from featstore.store import FeatureStore
from featstore.training.buffers import tensor_on

#: The key under which a sample hands work on to :meth:`CachedDataset.fill` in the main process:
#: ``("read", source)`` (read there, into one reused batch buffer) or ``("encode", source)``.
#: :func:`collate` passes it on as a list with one item (or None) per sample. A dataset with
#: another ``cached_key`` (one of a stack serving several features) uses ``HANDOFF:<cached_key>``.
HANDOFF = "_featstore_handoff"

_ABSENT = object()


def collate(samples: list[dict[str, Any]], *, pad: Iterable[str] = ()) -> dict[str, Any]:
    """Collates :class:`CachedDataset` samples; batches may mix cached and uncached samples.

    - Rows of one batch tensor (``__getitems__`` read the batch into it) are passed on as that
      tensor: no copy.
    - Other tensors are stacked; rows of samples without them (``on_miss="skip"``) are zeros,
      and ``cached`` (a bool tensor) says which rows hold features.
    - Tensors named in ``pad`` are padded with zeros to the longest in the batch along their first
      axis, with ``<name>_mask`` (bool ``[B, L]``, True where real); a padded tensor that is a mask
      itself (see :func:`mask_key`, e.g. ``prompt_embeds_mask``) is only padded with zeros.
    - Anything else goes through torch's ``default_collate``.
    """
    pad = set(pad)
    keys: dict[str, None] = {}
    for s in samples:
        keys.update(dict.fromkeys(s))
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s.get(key, _ABSENT) for s in samples]
        if key == HANDOFF or key.startswith(HANDOFF + ":"):  # one per dataset of a stack
            batch[key] = [None if v is _ABSENT else v for v in values]
        elif key in pad:
            batch[key], mask = _pad_stack(key, values)
            if (named := mask_key(key, batch[key].dtype)) is not None:
                batch[named] = mask
        elif all(v is not _ABSENT for v in values):
            joined = _rows_of_one_tensor(values)
            if joined is None and all(isinstance(v, torch.Tensor) for v in values):
                _one_shape(key, values)
            batch[key] = joined if joined is not None else _default_collate(values)
        elif all(v is _ABSENT or isinstance(v, torch.Tensor) for v in values):
            batch[key] = _stack_with_zeros(key, values)
        else:
            batch[key] = [None if v is _ABSENT else v for v in values]
    return batch


def mask_key(name: str, dtype: torch.dtype) -> str | None:
    """The key of a padded tensor's mask: ``<name>_mask``, or None for a tensor that is a mask
    itself (an integer or bool tensor whose name ends in ``mask``, like Qwen-Image's
    ``prompt_embeds_mask``): padded with zeros, it already says which positions are real."""
    is_mask = name.endswith("mask") and not dtype.is_floating_point and not dtype.is_complex
    return None if is_mask else f"{name}_mask"


def settle_pad(pad: str | Iterable[str], store: FeatureStore | None,
               varying: Callable[[], Iterable[str]] = tuple) -> tuple[str, ...]:
    """The tensors a dataset pads, checked against the shapes precompute recorded in the manifest
    (:func:`featstore.manifest.recorded_shapes`) so that a tensor that cannot be batched is found
    when the dataset is built, not in the middle of an epoch.

    ``"auto"`` pads every tensor whose entries differ in the length of their first axis only
    (VGGT's "crop" preprocessing of images with other aspect ratios); a list pads those named.
    Without a summary, ``"auto"`` pads what ``varying()`` names: the outputs the dataset's
    encoder says may differ in length (its ``varying_outputs()``; lazy writes then record the
    summary, so later runs need not ask). Without either (entries from ``put`` only, an encoder
    that does not say), nothing, and a batch with unequal shapes raises the collate error that
    names the fix.
    """
    recorded = recorded_shapes(store) if store is not None else None
    if isinstance(pad, str):
        if pad != "auto":
            raise ValueError(f"pad must be 'auto' or a list of tensor names, got {pad!r}")
        names = tuple(shapes.padded_names(recorded)) if recorded else tuple(varying())
    else:
        names = tuple(pad)
    problems = shapes.unbatchable(recorded, names) if recorded else {}
    if problems:
        assert store is not None
        listed = "; ".join(f"{name!r}: {why}" for name, why in sorted(problems.items()))
        raise ValueError(
            f"the {store.feature} entries cannot be batched ({listed}; recorded in {store.manifest_path}). "
            "Tensors that differ only in their first axis are padded with a mask by pad='auto' (the default) or "
            "by naming them in pad=[...]; for the others, precompute with preprocessing that gives every image "
            "the same size (VGGT: --mode pad; VAE: image_size=(W, H)), or iterate with batch_size=1")
    return names


def put_row(batch: MutableMapping[str, Any], name: str, row: int, t: torch.Tensor, rows: int, *, padded: bool) -> None:
    """Puts one sample's tensor into row ``row`` of a collated batch (creating, or for padded
    tensors lengthening, the batch tensor)."""
    current = batch.get(name)
    if not padded:
        if current is None:
            batch[name] = current = t.new_zeros((rows, *t.shape))
        _one_shape(name, [current[row], t])  # no broadcasting a [1, D] entry into a [T, D] row
        current[row] = t
        return
    named = mask_key(name, t.dtype)
    if current is None:
        current = t.new_zeros((rows, t.shape[0], *t.shape[1:]))
        mask = torch.zeros((rows, t.shape[0]), dtype=torch.bool)
    else:  # a mask tensor has no mask of its own: nothing to keep in step with it
        mask = batch[named] if named is not None else torch.zeros(current.shape[:2], dtype=torch.bool)
    if t.shape[0] > current.shape[1]:  # longer than the batch so far: lengthen
        longer = current.new_zeros((rows, t.shape[0], *current.shape[2:]))
        longer[:, :current.shape[1]] = current
        wider = torch.zeros((rows, t.shape[0]), dtype=torch.bool)
        wider[:, :mask.shape[1]] = mask
        current, mask = longer, wider
    current[row].zero_()
    current[row, :t.shape[0]] = t
    mask[row].zero_()
    mask[row, :t.shape[0]] = True
    batch[name] = current
    if named is not None:
        batch[named] = mask


def _rows_of_one_tensor(values: list[Any]) -> torch.Tensor | None:
    """The batch tensor when ``values`` are its rows 0..B-1 in order (and fill all of it)."""
    first = values[0]
    if not isinstance(first, torch.Tensor) or not first.is_contiguous():
        return None
    storage = first.untyped_storage()
    n = first.numel()
    if storage.nbytes() != len(values) * n * first.element_size():
        return None
    for j, v in enumerate(values):
        if (not isinstance(v, torch.Tensor) or v.dtype != first.dtype or v.shape != first.shape
                or v.untyped_storage().data_ptr() != storage.data_ptr() or v.storage_offset() != j * n
                or not v.is_contiguous()):
            return None
    return tensor_on(storage, first.dtype, (len(values), *first.shape))


def _default_collate(values: list[Any]) -> Any:
    """torch's ``default_collate``, except that lists it cannot batch (a history's frame paths,
    of another length in each sample) stay a list with one item per sample."""
    try:
        return torch.utils.data.default_collate(values)
    except RuntimeError:
        if any(isinstance(v, torch.Tensor) for v in values):
            raise
        return list(values)


def _one_shape(key: str, tensors: list[Any]) -> None:
    seen = {tuple(v.shape) for v in tensors}
    if len(seen) != 1:
        raise ValueError(f"collate: tensor {key!r} has shapes {sorted(seen)} in one batch; name it in pad= "
                         "(CachedDataset(..., pad=[...])) to pad it with a mask, or precompute with preprocessing "
                         "that gives every image the same size (VGGT: --mode pad)")


def _stack_with_zeros(key: str, values: list[Any]) -> torch.Tensor:
    present = [v for v in values if v is not _ABSENT]
    _one_shape(key, present)
    out = present[0].new_zeros((len(values), *present[0].shape))
    for j, v in enumerate(values):
        if v is not _ABSENT:
            out[j] = v
    return out


def _pad_stack(key: str, values: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    present = [v for v in values if v is not _ABSENT]
    if not present:
        raise ValueError(f"collate: no sample in the batch has {key!r}")
    tails = {tuple(v.shape[1:]) for v in present}
    if len(tails) != 1 or present[0].dim() == 0:
        raise ValueError(f"collate: {key!r} can be padded only along its first axis; shapes "
                         f"{sorted(tuple(v.shape) for v in present)}")
    length = max(v.shape[0] for v in present)
    out = present[0].new_zeros((len(values), length, *present[0].shape[1:]))
    mask = torch.zeros((len(values), length), dtype=torch.bool)
    for j, v in enumerate(values):
        if v is not _ABSENT:
            out[j, :v.shape[0]] = v
            mask[j, :v.shape[0]] = True
    return out, mask
