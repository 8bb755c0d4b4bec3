"""Tiny, random, offline diffusers pipelines: for the tests of PipelineEncoder, the README's diffusion quick
start (``python -m featstore.examples pipeline qwen_image_edit DIR``) and benchmarks.

Each family's pipeline is built from seeded random weights and tokenizers made here from a small vocabulary,
so nothing is downloaded; once torch/diffusers/transformers are imported, a build + save_pretrained +
from_pretrained takes well under a second on a CPU. The components keep the real models' *structure* where
encoders depend on it:

- the VAEs downsample by 8 like the real ones, and keep real `scaling_factor` / `shift_factor`; the
  Qwen-Image and Wan VAEs get non-trivial `latents_mean` / `latents_std` so a missed normalisation shows;
- the text encoders' hidden sizes match what the pipeline's transformer/UNet expects, so `__call__` works;
- the Qwen tokenizer splits the pipelines' prompt templates into exactly as many tokens as the real
  Qwen2.5-VL tokenizer does (every template word is one token), so `prompt_template_encode_start_idx`
  (34 for Qwen-Image, 64 for Qwen-Image-Edit) drops the same prefix it drops in the real pipelines, and the
  model config's `image_token_id` / `vision_start_token_id` / ... are the tiny tokenizer's ids.

    pipe = build_pipeline("flux")                 # in memory, float32, CPU, eval mode
    path = save_pipeline("flux", str(tmp_path))   # save_pretrained layout; DiffusionPipeline.from_pretrained(path)
    if (reason := unavailable("wan")):            # a library this family needs is missing here
        pytest.skip(reason)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from featstore.examples.tokenizers import clip_tokenizer, qwen_token_ids, qwen_tokenizer, t5_tokenizer

FAMILIES = ("sd15", "sdxl", "flux", "qwen_image", "qwen_image_edit", "wan")




def _seeded(seed: int, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`make()` under its own seed, leaving the caller's global RNG state as it was; float32, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    if any(p.dtype != torch.float32 for p in model.parameters()):  # only if the default dtype was changed:
        model = model.float()  # diffusers warns on every `.to(dtype)` of a model with fp32-kept modules
    return model.eval()


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


def _video_vae(seed: int, class_name: str):
    """AutoencoderKLQwenImage or AutoencoderKLWan (the same architecture): z_dim 4, three spatial
    downsamplings (x8) and two temporal ones, like the real ones."""
    import diffusers

    cls = getattr(diffusers, class_name)
    return _seeded(
        seed,
        lambda: cls(
            base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=_LATENTS_MEAN, latents_std=_LATENTS_STD,
        ),
    )  # fmt: skip


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
        scheduler=PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
        ),
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


def unavailable(family: str) -> str | None:
    """Why `family` cannot be built, saved and reloaded whole here (a reason for `pytest.skip`), or None.

    Both gaps are in the libraries, not in these tiny models, and real checkpoints hit them too:
    - Qwen-Image-Edit's Qwen2VLProcessor: transformers 5 neither constructs nor loads one without torchvision,
      because its `video_processor` (Qwen2VLVideoProcessor, torchvision-backed) is a required part even though
      the pipeline never sends video.
    - Wan: diffusers 0.42.1 loads WanTransformer3DModel (it has `_keep_in_fp32_modules`) only with
      `low_cpu_mem_usage=True`, which needs accelerate; without it `from_pretrained` raises. Building, saving
      and loading the other components (text encoder, tokenizer, VAE) work without accelerate.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    from diffusers.utils import is_accelerate_available
    from transformers.utils import is_torchvision_available

    if family == "qwen_image_edit" and not is_torchvision_available():
        return "Qwen2VLProcessor (Qwen-Image-Edit) needs torchvision in transformers 5"
    if family == "wan" and not is_accelerate_available():
        return "WanTransformer3DModel.from_pretrained needs accelerate in diffusers 0.42.1"
    return None


def qwen_processor(tokenizer=None):
    """A Qwen2VLProcessor like Qwen-Image-Edit's: Qwen2-VL image processor (14-px patches, 2x2 merge, the
    Qwen2.5-VL-7B min/max pixels 3136 / 12845056), the tiny Qwen tokenizer, and the (unused) video processor.

    Needs torchvision (see `unavailable`); raises ImportError without it.
    """
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        raise ImportError(unavailable("qwen_image_edit"))
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2),
        tokenizer=tokenizer or qwen_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(),
    )


def _qwen_image(seed: int, edit: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImagePipeline

    tokenizer = qwen_tokenizer()
    components = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_video_vae(seed, "AutoencoderKLQwenImage"),
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
        vae=_video_vae(seed, "AutoencoderKLWan"),
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
