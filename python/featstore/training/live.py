"""Computing misses with the encoder during training: live (``read`` and ``off`` modes, nothing
written), or lazily (claimed, so that workers and ranks meeting the same missing entry compute it
once, then written atomically beside the other entries)."""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from featstore import shapes
from featstore._torch import TORCH_TO_SAFETENSORS
from featstore.encoders import capabilities, resolve_encoder
from featstore.encoding import decode_source, encode_batch, read_inputs
from featstore.errors import FeatstoreError
from featstore.lock import entry_claims
from featstore.manifest import ensure_manifest
from featstore.store import FeatureStore
from featstore.training.report import WarnOnce


def source_path(data_root: str | None, source: str) -> str:
    """The file of ``source`` (store-relative, or absolute)."""
    return source if os.path.isabs(source) or data_root is None else os.path.join(data_root, source)


class LiveEncoder:
    """The encoder of a :class:`CachedDataset`, built on the first miss in each process that meets
    one (a fully cached run never loads it), and what it computes.

    Parameters
    ----------
    spec : encoder, nn.Module or zero-argument factory
        What :func:`featstore.encoders.resolve_encoder` builds the encoder from.
    device : str
        Where the encoder runs.
    data_root : str, optional
        What store-relative sources are relative to.
    total_images : int
        The dataset's length, recorded in a manifest that lazy writes create.
    """

    def __init__(self, spec: Any, *, device: str, data_root: str | None, total_images: int) -> None:
        self.spec = spec
        self.device = device
        self.data_root = data_root
        self.total_images = total_images
        self._encoder: Any = None
        self._built: Any = None  # built (by varying_outputs) but not yet moved to the device
        self._manifest_checked = False
        self._warn_once = WarnOnce()

    # Workers under spawn get the dataset pickled: never ship a loaded encoder, only its factory.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_encoder": None, "_built": None}

    def without_spec(self) -> LiveEncoder:
        """A copy that cannot build the encoder, for workers that hand their misses on."""
        bare = copy.copy(self)  # through __getstate__: without the built encoder either
        bare.spec = None
        return bare

    def encoder(self, store: FeatureStore | None) -> tuple[Any, FeatureStore | None]:
        """The encoder, built on first use in this process, and the store to use from then on:
        ``store`` itself, or where it checks no fingerprint, the same store checking (and writing)
        the encoder's. An encoder whose fingerprint differs from the one ``store`` checks is an
        error: its features would not match the cached ones."""
        if self._encoder is not None:
            return self._encoder, store
        enc: Any = self._built if self._built is not None else resolve_encoder(self.spec)
        self._built = None
        if capabilities(enc).to:
            enc.to(self.device)  # type: ignore[attr-defined]
        if store is not None:
            fingerprint = enc.fingerprint()
            if store.fingerprint is None:
                # Entries written now must carry the encoder's fingerprint, and the lookups
                # check it from here on.
                store = store.with_fingerprint(fingerprint)
            elif store.fingerprint != fingerprint:
                raise FeatstoreError(
                    f"the encoder's fingerprint {fingerprint} differs from the one entries of feature "
                    f"{store.feature} are checked against ({store.fingerprint}, from "
                    f"{store.manifest_path} or as given): its features would not match the cached ones. "
                    "Use the encoder the cache was computed with, or open the store with "
                    "fingerprint=encoder.fingerprint() (then the old entries are recomputed)")
        self._encoder = enc
        return enc, store

    def varying_outputs(self) -> tuple[str, ...]:
        """The outputs the encoder says may differ in the length of their first axis between
        items (its ``varying_outputs()``; none when it does not say). A factory is called for it
        once (building an encoder does not load its weights; ``to`` does) and what it built is
        used on the first miss."""
        if self.spec is None:
            return ()
        if self._encoder is None and self._built is None:
            self._built = resolve_encoder(self.spec)
        enc = self._encoder if self._encoder is not None else self._built
        return tuple(enc.varying_outputs()) if capabilities(enc).varying_outputs else ()

    def compute_lazily(self, enc: Any, store: FeatureStore, sources: Sequence[str]
                       ) -> list[tuple[dict[str, torch.Tensor], bool]]:
        """The features of ``sources`` and whether each came from the cache after all. Claims the
        entries first: an entry another worker or rank is computing is waited for, then read; the
        rest are encoded in one batch and written atomically."""
        results: dict[str, tuple[dict[str, torch.Tensor], bool]] = {}
        # First the entries nobody else is computing, then (waiting) those somebody is.
        for wait in (False, True):
            rest = [s for s in dict.fromkeys(sources) if s not in results]
            if not rest:
                break
            with entry_claims(store, rest, wait=wait) as claimed:
                mine = [s for s in rest if s in claimed]
                found = {s: store.get(s) for s in mine}
                todo = [s for s in mine if found[s] is None]
                computed = self.encode(enc, todo, write_to=store)
                results.update(zip(todo, ((t, False) for t in computed), strict=True))
                results.update((s, (t, True)) for s, t in found.items() if t is not None)
        return [results[s] for s in sources]

    def encode(self, enc: Any, sources: Sequence[str], *, write_to: FeatureStore | None = None
               ) -> list[dict[str, torch.Tensor]]:
        """Encodes ``sources`` in batches of equal input shape; with ``write_to``, stores each entry
        there (recording the source's stamp from before it was read)."""
        if not sources:
            return []
        caps = capabilities(enc)
        items = caps.items
        decoded = []
        for source in sources:
            # Inputs first: stamped before the encoder reads them (see featstore.encoding).
            inputs, error = read_inputs(enc, source, self.data_root or "", caps)
            item, decode_error, stamp = decode_source(enc, source_path(self.data_root, source), caps)
            error = error or decode_error
            if error is not None:
                raise FeatstoreError(f"cannot compute {enc.name} features of "
                                     f"{source_path(self.data_root, source)}: {error}")
            decoded.append((item, (stamp, inputs)))
        groups: dict[Any, list[int]] = defaultdict(list)
        for k, (item, _) in enumerate(decoded):
            groups[() if items else tuple(item.shape)].append(k)
        results: list[dict[str, torch.Tensor]] = [{} for _ in sources]
        for ks in groups.values():
            batch = [decoded[k][0] for k in ks] if items else torch.stack([decoded[k][0] for k in ks])
            outputs = encode_batch(enc, torch.device(self.device), batch)
            for row, k in enumerate(ks):
                # A clone outside inference mode: autograd may save these for backward.
                results[k] = {name: t[row].clone() for name, t in outputs.items()}
        if write_to is not None:
            for source, (_, read), tensors in zip(sources, decoded, results, strict=True):
                self._write(enc, write_to, source, tensors, read)
        return results

    def _write(self, enc: Any, store: FeatureStore, source: str, tensors: dict[str, torch.Tensor],
               read: Any) -> None:
        """Stores a lazily computed entry; a failed write is warned about once (training goes on
        with the computed features, the next epoch computes them again)."""
        path = source_path(self.data_root, source)
        try:
            stamp, inputs = read
            store.write(source, tensors, inputs=inputs, expected=stamp)
            if not self._manifest_checked:
                self._manifest_checked = True
                self.ensure_manifest(store, tensors=self.shape_summary(enc, tensors))
        except (OSError, FeatstoreError) as exc:
            self._warn_once(f"write:{type(exc).__name__}",
                            f"featstore: could not store the lazily computed entry of {path}: {exc}. "
                            "Training goes on with the computed features; further such failures are not reported")

    def ensure_manifest(self, store: FeatureStore, **mode: Any) -> None:
        """See :func:`featstore.manifest.ensure_manifest` (the dataset's length as ``total_images``)."""
        ensure_manifest(store, total_images=self.total_images, **mode)

    @staticmethod
    def shape_summary(enc: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The manifest's ``"tensors"`` summary for lazily written entries: one entry's shapes,
        with the first axis of what the encoder says varies (``varying_outputs()``) left open, so
        a later dataset pads it without asking the encoder again."""
        varying = set(enc.varying_outputs()) if capabilities(enc).varying_outputs else set()
        summary: shapes.Shapes = {}
        for name, t in tensors.items():
            shape: tuple[int | None, ...] = tuple(t.shape)
            if name in varying and shape:
                shape = (None, *shape[1:])
            summary[name] = (TORCH_TO_SAFETENSORS[t.dtype], shape)
        return shapes.to_json(summary)
