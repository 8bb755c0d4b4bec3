"""Computing history misses during training (``CachedDataset(..., history_fn=...)``): one causal
pass per longest list with ``encode_history``, live (nothing written) or lazily (claimed, then every
missing prefix entry the pass went through written).

A batch's histories that are prefixes of another one in it share that one's pass; a pass over a
list of T frames gives the features of all its T prefixes, so lazy mode writes the entry of each
prefix that has no valid one, and later samples naming a shorter prefix of the same episode read it.
Every frame is stamped before it is decoded (:func:`featstore.encoding.decode_source`) and each
entry is written with the stamps of its frames as ``expected``: a frame edited meanwhile leaves its
entries unwritten (the computed features still serve this step).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from featstore.encoders import Capabilities, capabilities
from featstore.encoding import decode_source, encode_histories
from featstore.errors import FeatstoreError
from featstore.history import history_keys, history_states, longest_lists
from featstore.inputs import Stamp
from featstore.lock import entry_claims
from featstore.store import FeatureStore
from featstore.training.live import LiveEncoder, source_path
from featstore.training.report import WarnOnce

#: A history: its frames, oldest first (store-relative, or absolute with the cache off).
Frames = tuple[str, ...]
Result = tuple[dict[str, torch.Tensor], bool]


def _owners(histories: Sequence[Frames]) -> dict[Frames, set[int]]:
    """The lists no other of ``histories`` extends, each with the lengths of the histories that
    are its prefixes (itself included): one pass over each covers them all."""
    return {frames: set(lengths) for frames, lengths in longest_lists(histories).items()}


class HistoryComputer:
    """Computes a :class:`CachedDataset`'s history misses with the encoder its
    :class:`~featstore.training.live.LiveEncoder` builds.

    Parameters
    ----------
    live : LiveEncoder
        Where the encoder runs (``device``), what relative frames are relative to
        (``data_root``), and the manifest a lazy write creates.
    """

    def __init__(self, live: LiveEncoder) -> None:
        self.live = live
        self._manifest_checked = False
        self._warn_once = WarnOnce()

    def compute(self, enc: Any, store: FeatureStore | None, histories: Sequence[Frames], *, lazy: bool
                ) -> list[Result]:
        """The features of each history and whether it came from the cache after all: computed
        live (nothing written), or with ``lazy`` claimed and written (see the module)."""
        if not capabilities(enc).history:
            raise FeatstoreError(f"encoder {getattr(enc, 'name', type(enc).__name__)!r} cannot compute history "
                                 "entries (no encode_history, or history off): use VGGTEncoder(history=True) or an "
                                 "encoder with encode_history(batch [B, T, 3, H, W]) with history_fn")
        if not lazy or store is None:
            computed = self.encode(enc, _owners(histories))
            return [(computed[h], False) for h in histories]
        return self._compute_lazily(enc, store, histories)

    def _compute_lazily(self, enc: Any, store: FeatureStore, histories: Sequence[Frames]) -> list[Result]:
        """Claims the longest lists' entries (their last chain key), reads what another worker or
        rank wrote meanwhile, and computes the rest, writing every missing prefix entry."""
        results: dict[Frames, Result] = {}
        owners = _owners(histories)
        keys = {frames: self._last_key(store, frames) for frames in owners}
        for wait in (False, True):  # first what nobody else computes, then (waiting) the rest
            rest = [f for f, lengths in owners.items() if any(f[:n] not in results for n in lengths)]
            if not rest:
                break
            with entry_claims(store, [keys[f] for f in rest], wait=wait) as claimed:
                todo: dict[Frames, set[int]] = {}
                for frames in (f for f in rest if keys[f] in claimed):
                    for n in owners[frames]:
                        found = store.get_history(frames[:n])
                        if found is not None:
                            results[frames[:n]] = (found, True)
                    needed = {n for n in owners[frames] if frames[:n] not in results}
                    if needed and capabilities(enc).prefixes_share_a_pass:
                        # Every prefix without a valid entry comes with the same pass: written too.
                        lengths = range(1, len(frames) + 1)
                        states = history_states(store, frames, lengths)
                        todo[frames] = {n for n, state in zip(lengths, states, strict=True)
                                        if state != "valid"} | needed
                    elif needed:  # each prefix its own pass (reversed order): only what is needed
                        todo[frames] = needed
                computed = self.encode(enc, todo, write_to=store)
                results.update((h, (t, False)) for h, t in computed.items() if h not in results)
        return [results[h] for h in histories]

    def _last_key(self, store: FeatureStore, frames: Frames) -> str:
        try:
            return history_keys(store, frames)[-1]
        except FileNotFoundError as exc:
            last = source_path(self.live.data_root, frames[-1])
            raise FeatstoreError(f"cannot compute the history ending in {last}: its frame {exc.filename} does not "
                                 "exist") from exc

    def encode(self, enc: Any, lists: dict[Frames, set[int]], *, write_to: FeatureStore | None = None
               ) -> dict[Frames, dict[str, torch.Tensor]]:
        """One causal pass over each list (lists of one length and frame size streamed together),
        giving the features of the prefixes of the lengths ``lists`` names; with ``write_to``,
        the entry of each is written there."""
        if not lists:
            return {}
        decoded: dict[str, tuple[torch.Tensor, Stamp]] = {}
        sequences: dict[Frames, tuple[torch.Tensor, list[Stamp]]] = {}
        caps = capabilities(enc)  # asked once: it inspects encode_history's signature
        for frames in lists:
            for rel in frames:
                if rel not in decoded:
                    decoded[rel] = self._decode(enc, caps, rel)
            images = [decoded[rel][0] for rel in frames]
            if len({tuple(i.shape) for i in images}) != 1:
                raise FeatstoreError(f"the frames of the history ending in {frames[-1]} have different sizes "
                                     f"({sorted({tuple(i.shape) for i in images})}) after preprocessing")
            sequences[frames] = torch.stack(images), [decoded[rel][1] for rel in frames]
        groups: dict[tuple[int, ...], list[Frames]] = defaultdict(list)
        for frames, (seq, _) in sequences.items():
            groups[tuple(seq.shape)].append(frames)
        out: dict[Frames, dict[str, torch.Tensor]] = {}
        for group in groups.values():
            lengths = sorted(set().union(*(lists[f] for f in group)))
            outputs = encode_histories(enc, torch.device(self.live.device),
                                       torch.stack([sequences[f][0] for f in group]), lengths=lengths)
            for row, frames in enumerate(group):
                computed = {}
                for n in sorted(lists[frames]):
                    # A clone outside inference mode: autograd may save these for backward.
                    computed[n] = out[frames[:n]] = {name: t[row, n - 1].clone() for name, t in outputs.items()}
                if write_to is not None:
                    self._write(enc, write_to, frames, computed, sequences[frames][1])
        return out

    def _decode(self, enc: Any, caps: Capabilities, rel: str) -> tuple[torch.Tensor, Stamp]:
        path = source_path(self.live.data_root, rel)
        item, error, stamp = decode_source(enc, path, caps)  # stamped before it is read
        if error is not None or stamp is None:
            raise FeatstoreError(f"cannot compute {enc.name} history features with the frame {path}: {error}")
        return item, stamp

    def _write(self, enc: Any, store: FeatureStore, frames: Frames, computed: dict[int, dict[str, torch.Tensor]],
               stamps: list[Stamp]) -> None:
        """Stores the lazily computed entries of the prefixes of one list (``computed`` by
        length), its frames recorded once; a failed write (a frame edited since it was read, a
        read-only cache) is warned about once and training goes on."""
        try:
            if not self._manifest_checked:  # first: put_history records the fingerprint alone
                self._manifest_checked = True
                self.live.ensure_manifest(store, history=True,
                                          tensors=self.live.shape_summary(enc, next(iter(computed.values()))))
            store.put_histories(frames, computed, expected=stamps)
        except (OSError, FeatstoreError) as exc:
            self._warn_once(f"write:{type(exc).__name__}",
                            f"featstore: could not store the lazily computed history entry of {frames[-1]} "
                            f"({len(frames)} frames): {exc}. Training goes on with the computed features; further "
                            "such failures are not reported")
