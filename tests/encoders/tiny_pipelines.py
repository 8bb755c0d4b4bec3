"""Tiny, random, offline diffusers pipelines for encoder tests (importable as `tiny_pipelines`).

Each family's pipeline is built from seeded random weights and tokenizers made here from a small vocabulary,
so nothing is downloaded and a build takes well under a second or two on a CPU. The components keep the
real models' *structure* where encoders depend on it:

- the VAEs downsample by 8 like the real ones, and keep real `scaling_factor` / `shift_factor`; the
  Qwen-Image and Wan VAEs get non-trivial `latents_mean` / `latents_std` so a missed normalisation shows;
- the text encoders' hidden sizes match what the pipeline's transformer/UNet expects, so `__call__` works;
- the Qwen tokenizer splits the pipelines' prompt templates into exactly as many tokens as the real
  Qwen2.5-VL tokenizer does (every template word is one token), so `prompt_template_encode_start_idx`
  (34 for Qwen-Image, 64 for Qwen-Image-Edit) drops the same prefix it drops in the real pipelines, and the
  model config's `image_token_id` / `vision_start_token_id` / ... are the tiny tokenizer's ids.

    pipe = build_pipeline("flux")                 # in memory, float32, CPU
    path = save_pipeline("flux", str(tmp_path))   # save_pretrained layout; DiffusionPipeline.from_pretrained(path)
"""

from __future__ import annotations

import functools
import heapq
import inspect
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import pairwise

import torch

FAMILIES = ("sd15", "sdxl", "flux", "qwen_image", "qwen_image_edit", "wan")

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


# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------


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
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=77)


def _qwen_templates() -> list[str]:
    """The prompt templates of QwenImagePipeline and QwenImageEditPipeline, read from the installed diffusers.

    `__init__` is where the pipelines set them, so construct each with every component None.
    """
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    texts = []
    for cls in (QwenImagePipeline, QwenImageEditPipeline):
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
    texts += [" ".join(WORDS), " ".join(w.capitalize() for w in WORDS)]
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


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


def _seeded(seed: int, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`make()` under its own seed, leaving the caller's global RNG state as it was; float32, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().to(torch.float32).eval()


def _clip_text(seed: int, tokenizer, projection: bool = False):
    """A 2-layer CLIP text encoder; `projection=True` gives SDXL's CLIPTextModelWithProjection (pooled output).

    `eos_token_id` must be the tokenizer's: CLIP pools the hidden state at the first EOS token.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _seeded(seed, lambda: cls(config))


def _t5_encoder(seed: int, vocab_size: int, umt5: bool = False):
    """A 2-layer gated-GELU T5 (Flux) or UMT5 (Wan) encoder with d_model 32."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kwargs = dict(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )  # fmt: skip
    if umt5:
        return _seeded(seed, lambda: UMT5EncoderModel(UMT5Config(**kwargs)))
    return _seeded(seed, lambda: T5EncoderModel(T5Config(**kwargs)))


def _qwen_vl(seed: int, vocab_size: int):
    """A 2-layer Qwen2.5-VL (text hidden 16, vision hidden 16) whose special-token ids are the tiny tokenizer's."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = qwen_token_ids()
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    return _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config))


def _vae_kl(seed: int, latent_channels: int, **config):
    """AutoencoderKL with four blocks (downsampling by 8, like the real ones) of 8 channels."""
    from diffusers import AutoencoderKL

    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            latent_channels=latent_channels, norm_num_groups=4, sample_size=32, **config,
        ),
    )  # fmt: skip


_LATENTS_MEAN = [0.25, -0.5, 0.75, -1.0]  # non-trivial, so a missing (x - mean) / std is visible
_LATENTS_STD = [2.0, 0.5, 1.5, 4.0]


def _vae_qwen(seed: int):
    """AutoencoderKLQwenImage, z_dim 4, three spatial downsamplings (x8) like the real one."""
    from diffusers import AutoencoderKLQwenImage

    return _seeded(
        seed,
        lambda: AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=_LATENTS_MEAN, latents_std=_LATENTS_STD,
        ),
    )  # fmt: skip


def _vae_wan(seed: int):
    """AutoencoderKLWan, z_dim 4, x8 spatial / x4 temporal like Wan 2.1's."""
    from diffusers import AutoencoderKLWan

    return _seeded(
        seed,
        lambda: AutoencoderKLWan(
            base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=_LATENTS_MEAN, latents_std=_LATENTS_STD,
        ),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------------------


def _sd15(seed: int):
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer()
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
            norm_num_groups=4,
        ),
    )  # fmt: skip
    return StableDiffusionPipeline(
        vae=_vae_kl(seed, 4, scaling_factor=0.18215),
        text_encoder=_clip_text(seed, tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(seed: int):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=4,
        ),
    )  # fmt: skip  # 80 = 6 time ids * 8 + the 32-d pooled text embedding; 64 = 32 + 32 (both encoders)
    return StableDiffusionXLPipeline(
        vae=_vae_kl(seed, 4, scaling_factor=0.13025, force_upcast=True),
        text_encoder=_clip_text(seed, tokenizer),
        text_encoder_2=_clip_text(seed + 1, tokenizer_2, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
            steps_offset=1,
        ),
    )  # fmt: skip


def _flux(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    transformer = _seeded(
        seed,
        lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        ),
    )  # fmt: skip
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae_kl(
            seed, 4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
        ),
        text_encoder=_clip_text(seed, tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(seed + 1, len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _qwen_transformer(seed: int):
    from diffusers import QwenImageTransformer2DModel

    return _seeded(
        seed,
        lambda: QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        ),
    )  # fmt: skip


def qwen_processor(tokenizer=None):
    """A Qwen2VLProcessor: Qwen2-VL image processor (14-px patches, 2x2 merge, the 7B's min/max pixels) + tokenizer.

    Uses the PIL backend of the image processor, which needs no torchvision.
    """
    from transformers import Qwen2VLProcessor

    try:
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import Qwen2VLImageProcessor as ImageProcessor
    image_processor = ImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer or qwen_tokenizer())


def _qwen_image(seed: int, edit: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImagePipeline

    tokenizer = qwen_tokenizer()
    components = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae_qwen(seed),
        text_encoder=_qwen_vl(seed, len(tokenizer)),
        tokenizer=tokenizer,
        transformer=_qwen_transformer(seed),
    )
    if edit:
        return QwenImageEditPipeline(processor=qwen_processor(tokenizer), **components)
    return QwenImagePipeline(**components)


def _wan(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = t5_tokenizer()
    transformer = _seeded(
        seed,
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ),
    )  # fmt: skip
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(seed, len(tokenizer), umt5=True),
        vae=_vae_wan(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


_BUILDERS: dict[str, Callable[[int], object]] = {
    "sd15": _sd15,
    "sdxl": _sdxl,
    "flux": _flux,
    "qwen_image": _qwen_image,
    "qwen_image_edit": lambda seed: _qwen_image(seed, edit=True),
    "wan": _wan,
}


def build_pipeline(family: str, seed: int = 0):
    """The family's tiny pipeline, in memory (float32, CPU, eval mode); same seed, same weights and vocabulary."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    pipe = _BUILDERS[family](seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(family: str, directory: str, seed: int = 0) -> str:
    """Build the family's pipeline and `save_pretrained` it (safetensors) into `directory`; returns `directory`.

    Afterwards `DiffusionPipeline.from_pretrained(directory)` and per-component loads
    (`AutoencoderKL.from_pretrained(directory, subfolder="vae")`, tokenizers from `tokenizer/`, ...) work offline.
    """
    build_pipeline(family, seed).save_pretrained(directory, safe_serialization=True)
    return directory
