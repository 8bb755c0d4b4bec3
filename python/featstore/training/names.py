"""The names under which a :class:`~featstore.training.CachedDataset` serves its entries'
tensors: renamed on request (``rename=``), and never written over a name that a wrapped dataset
(another feature of a stack) or the base sample already holds."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch

from featstore.training.batching import mask_key

if TYPE_CHECKING:
    from featstore.training.dataset import CachedDataset


class Served(MutableMapping[str, Any]):
    """A batch (or sample) as one dataset's :meth:`CachedDataset.fill` writes into it: by the
    entries' tensor names, stored under the names the dataset serves them as (``rename``), and
    refusing a name that another dataset of the stack (or the base sample) put there.

    ``taken``: names the wrapped datasets filled in this process; ``collated``: the names the
    batch came with, which are this dataset's own only where it serves that name (rows its
    workers computed)."""

    def __init__(self, dataset: CachedDataset, target: dict[str, Any], *, taken: set[str],
                 collated: set[str]) -> None:
        self.dataset, self.target, self.taken, self.collated = dataset, target, taken, collated
        self._own: set[str] | None = None  # the dataset's names, asked once (it may read the manifest)

    def __getitem__(self, name: str) -> Any:
        return self.target[self.dataset._served_name(name)]

    def __setitem__(self, name: str, value: Any) -> None:
        key = self.dataset._served_name(name)
        if key not in self.target or key in self.taken:
            if key in self.collated and key not in self.taken and self._own is None:
                self._own = self.dataset._own_names() or set()
            if key in self.taken or (key in self.collated and key not in (self._own or ())):
                self.dataset._refuse_names([key])
        self.target[key] = value

    def __delitem__(self, name: str) -> None:
        del self.target[self.dataset._served_name(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.target)

    def __len__(self) -> int:
        return len(self.target)


def check_rename(rename: Mapping[str, str] | None) -> dict[str, str]:
    """``rename`` as a dict, refused when it is not one name per tensor."""
    if rename is None:
        return {}
    if not isinstance(rename, Mapping) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                  for k, v in rename.items()):
        raise TypeError(f"rename must map tensor names to new names (str to str), got {rename!r}")
    if len(set(rename.values())) != len(rename):
        raise ValueError(f"rename gives two tensors one name: {dict(rename)!r}")
    return dict(rename)


def gets_mask(name: str, dtype: Any) -> bool:
    """Whether a padded tensor gets a ``<name>_mask`` twin (see :func:`mask_key`); ``dtype`` is a
    torch dtype or a manifest's dtype name (``"BF16"``, ``"I64"``)."""
    if isinstance(dtype, torch.dtype):
        return mask_key(name, dtype) is not None
    floating = str(dtype).upper().startswith(("F", "BF", "C"))
    return floating or not name.endswith("mask")
