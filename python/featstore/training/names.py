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
    refusing a name that something else put there: ``foreign`` holds the names the batch has
    that are not this dataset's (a wrapped dataset's features, the base sample's keys); rows this
    dataset's workers computed are its own and are completed, not refused."""

    def __init__(self, dataset: CachedDataset, target: dict[str, Any], *, foreign: set[str]) -> None:
        self.dataset, self.target, self.foreign = dataset, target, foreign

    def _key(self, name: str) -> str:
        """The served name of ``name``; refused when it is someone else's (this dataset only
        ever looks up a name to write it)."""
        key = self.dataset._served_name(name)
        if key in self.foreign:
            self.dataset._refuse_names([key])
        return key

    def __getitem__(self, name: str) -> Any:
        return self.target[self._key(name)]

    def __setitem__(self, name: str, value: Any) -> None:
        self.target[self._key(name)] = value

    def __delitem__(self, name: str) -> None:
        del self.target[self._key(name)]

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
