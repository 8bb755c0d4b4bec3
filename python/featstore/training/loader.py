"""Iterating a :class:`CachedDataset` through a DataLoader whose batches get their features in the
main process: the workers hand reads and GPU misses on (:class:`HandOnToFill`), and
:class:`CachedLoader` fills each batch ahead of the training step on a background thread."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from featstore.training.dataset import CachedDataset


class CachedLoader:
    """Iterates a DataLoader over a :class:`CachedDataset`, filling each batch
    (:meth:`CachedDataset.fill`) ``prefetch`` batches ahead on a background thread: the reads
    release the GIL, so they overlap the training step. Anything else (``sampler``,
    ``batch_size``, ``len``) is the DataLoader's."""

    def __init__(self, loader: torch.utils.data.DataLoader, dataset: CachedDataset,  # type: ignore[type-arg]
                 prefetch: int = 2) -> None:
        self.loader = loader
        self.dataset = dataset
        self.prefetch = prefetch

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        if self.prefetch <= 0:
            for batch in batches:
                yield self._fill(batch)
            return
        filled: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        # The current CUDA device is per thread: a DDP rank's set_device must hold there too.
        device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        thread = threading.Thread(target=self._fill_ahead, args=(batches, filled, stop, device),
                                  name="featstore-fill", daemon=True)
        thread.start()
        try:
            while True:
                kind, item = filled.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                yield item
        finally:  # the consumer stopped early (break, an exception): let the thread end
            stop.set()
            while thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    filled.get(timeout=0.1)

    def _fill_ahead(self, batches: Iterator[Any], filled: queue.Queue[tuple[str, Any]], stop: threading.Event,
                    device: int | None) -> None:
        """The background thread: fills batches into ``filled`` until the last, or until ``stop``."""
        if device is not None:
            torch.cuda.set_device(device)
        try:
            for batch in batches:
                item = ("batch", self._fill(batch))
                while not stop.is_set():
                    try:
                        filled.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            filled.put(("end", None))
        except BaseException as exc:  # handed to the consumer, raised there
            filled.put(("error", exc))

    def _fill(self, batch: Any) -> Any:
        if isinstance(batch, dict):
            return self.dataset.fill(batch)
        if self.loader.num_workers > 0:  # its workers handed reads on, which such a batch drops
            raise TypeError(f"the DataLoader's collate_fn made a {type(batch).__name__}: CachedDataset.loader() "
                            "needs featstore.collate's dict (wrap it, or use a plain DataLoader)")
        return batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class HandOnToFill:
    """``worker_init_fn`` of :meth:`CachedDataset.loader`: that worker's samples hand reads and
    GPU misses on to :meth:`CachedDataset.fill` (the dataset elsewhere, ``ds[i]`` or another
    DataLoader, is unchanged). Calls the user's own ``worker_init_fn`` too.

    Parameters
    ----------
    user_init : callable, optional
        The user's ``worker_init_fn``.
    dataset_type : type
        The class of the datasets to switch (passed in: this module cannot import it, since the
        dataset's ``loader()`` imports this module).
    """

    def __init__(self, user_init: Callable[[int], None] | None, dataset_type: type[CachedDataset]) -> None:
        self.user_init = user_init
        self.dataset_type = dataset_type

    def __call__(self, worker_id: int) -> None:
        info = torch.utils.data.get_worker_info()
        if info is not None and isinstance(info.dataset, self.dataset_type):
            info.dataset.hand_on_to_fill()
        if self.user_init is not None:
            self.user_init(worker_id)
