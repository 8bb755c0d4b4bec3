"""Tokenizers for the tiny pipelines (tiny_pipelines.py), built here from a small vocabulary so that
nothing is downloaded: CLIP's and Qwen2's byte-level BPE (merges learned in this module, so every process
numbers tokens alike), and T5/UMT5 from an in-memory piece list."""

from __future__ import annotations

import functools
import heapq
import inspect
import re
import string
from collections import Counter
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

# Words every tokenizer knows as whole tokens (anything else still tokenizes, as characters / bytes).
WORDS = (
    "a an the this that of on in under over with and or to is are at by for from near next beside behind "
    "red blue green yellow black white orange purple pink brown gray grey small big large tiny old new "
    "cat cats dog dogs bird birds fish horse cow car cars house tree trees flower flowers sky sun moon water "
    "sea beach mountain road street city room table chair mat bed sofa window door wall floor book cup "
    "man woman person people child girl boy face hand photo picture painting drawing image render sketch "
    "sits sitting stands standing runs running flies flying lies lying holds holding looks looking "
    "make turn change add remove replace it into style color background foreground light dark bright "
    "high quality detailed blurry sharp close up view top side front back left right one two three"
).split()
PUNCTUATION = tuple(".,:;!?'\"()-")

_QWEN_SPECIAL = (  # the Qwen2 / Qwen2.5-VL special tokens in their real order (151643, 151644, ...)
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip




def _learn_merges(pieces: Iterable[tuple[str, ...]]) -> list[tuple[str, str]]:
    """Byte-pair merges that turn every given piece (a tuple of symbols) into a single token.

    A deterministic BPE training loop (most frequent pair first, ties broken by the pair itself), written here
    rather than `tokenizers`' trainer so the vocabulary ids never depend on hash order: the same seed must give
    the same embeddings in every process. Merges learned this way replay exactly under BPE encoding. Pair
    counts are updated incrementally (only the words holding the merged pair are re-counted), which keeps it
    in the tens of milliseconds for a few hundred words.
    """
    words = [list(p) for p in sorted(set(pieces)) if len(p) > 1]
    counts: Counter[tuple[str, str]] = Counter()
    holders: dict[tuple[str, str], set[int]] = {}
    for i, w in enumerate(words):
        for pair in pairwise(w):
            counts[pair] += 1
            holders.setdefault(pair, set()).add(i)
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        negative, best = heapq.heappop(heap)
        if counts.get(best, 0) != -negative or negative == 0:
            continue  # stale entry: the pair's count changed after it was pushed
        merges.append(best)
        joined = best[0] + best[1]
        changed: set[tuple[str, str]] = set()
        for i in sorted(holders.pop(best)):
            w = words[i]
            for pair in pairwise(w):
                counts[pair] -= 1
                changed.add(pair)
            j, out = 0, []
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for pair in pairwise(out):
                counts[pair] += 1
                holders.setdefault(pair, set()).add(i)
                changed.add(pair)
        for pair in changed:
            if counts[pair] > 0:
                heapq.heappush(heap, (-counts[pair], pair))
            else:
                counts.pop(pair, None)
                holders.pop(pair, None)
    return merges


def _byte_alphabet() -> list[str]:
    """The 256 byte-level symbols, sorted (so any text tokenizes, byte by byte if need be)."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _bpe_vocab(base: list[str], merges: list[tuple[str, str]], special: Iterable[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token in [*base, *(a + b for a, b in merges), *special]:
        vocab.setdefault(token, len(vocab))
    return vocab


def _corpus_pieces(tokenizer, texts: Iterable[str], suffix: str = "") -> list[tuple[str, ...]]:
    """Split texts the way `tokenizer` will (normalizer + pre-tokenizer) into symbol tuples for `_learn_merges`."""
    backend = tokenizer.backend_tokenizer
    pieces = []
    for text in texts:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            symbols = list(piece)
            symbols[-1] += suffix
            pieces.append(tuple(symbols))
    return pieces


@functools.cache
def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    base = [*alphabet, *(c + "</w>" for c in alphabet)]
    probe = CLIPTokenizer(vocab={t: i for i, t in enumerate(base)}, merges=[])
    merges = _learn_merges(_corpus_pieces(probe, [" ".join(WORDS)], suffix="</w>"))
    return _bpe_vocab(base, merges, ["<|startoftext|>", "<|endoftext|>"]), merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer (byte-level BPE, `</w>` word ends, 77 positions) knowing WORDS as whole tokens.

    SD 1.5 / Flux pad with `<|endoftext|>`; SDXL's second tokenizer pads with `!`, as the real one does.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token,  # type: ignore[arg-type]
                         model_max_length=77)


def _qwen_templates() -> list[str]:
    """The prompt templates of QwenImagePipeline and QwenImageEditPipeline, read from the installed diffusers.

    `__init__` is where the pipelines set them, so construct each with every component None.
    """
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    texts = []
    classes: tuple[Any, ...] = (QwenImagePipeline, QwenImageEditPipeline)
    for cls in classes:
        names = list(inspect.signature(cls.__init__).parameters)[1:]
        texts.append(cls(**dict.fromkeys(names)).prompt_template_encode)
    return texts


@functools.cache
def _qwen_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from transformers import Qwen2Tokenizer

    alphabet = _byte_alphabet()
    probe = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(alphabet)}, merges=[])
    special = re.compile("|".join(re.escape(t) for t in _QWEN_SPECIAL))
    texts = [part for text in _qwen_templates() for part in special.split(text.replace("{}", "\n"))]
    texts += [" ".join(WORDS), " ".join(w.capitalize() for w in WORDS), *WORDS]  # with and without a space
    merges = _learn_merges(_corpus_pieces(probe, texts))
    return _bpe_vocab(alphabet, merges, _QWEN_SPECIAL), merges


def qwen_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE with Qwen2's split regex) holding the Qwen2.5-VL special tokens.

    Every word of the Qwen-Image prompt templates is one token, as in the real vocabulary, so the templates'
    token counts (and with them `prompt_template_encode_start_idx`) match the real pipelines.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen_vocab()
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=131072)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_SPECIAL[1:]])
    return tokenizer


def qwen_token_ids() -> dict[str, int]:
    """Ids of the Qwen special tokens in `qwen_tokenizer()` (what the Qwen2.5-VL config must agree with)."""
    vocab, _ = _qwen_vocab()
    return {t: vocab[t] for t in _QWEN_SPECIAL}


def t5_tokenizer():
    """A T5Tokenizer (sentencepiece-style Unigram, `<pad>`=0, `</s>`=1, `<unk>`=2) for Flux's T5 and Wan's UMT5.

    Built from (piece, score) pairs rather than a trained `spiece.model`: `sentencepiece` is not needed. Whole
    words score higher than their characters, so WORDS are single pieces; other words fall back to characters.
    """
    from transformers import T5Tokenizer

    chars = sorted(string.ascii_letters + string.digits)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -5.0) for w in WORDS]
    vocab += [(c, -10.0) for c in [*chars, *PUNCTUATION]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
