"""``featstore precompute --pipeline DIR --part ...``: the flags of a diffusers pipeline's parts
and the :class:`~featstore.encoders.PipelineEncoder` they make."""

from __future__ import annotations

import argparse
from typing import Any

from featstore.cli.common import at_least

#: The stored (and loaded) dtypes by flag value.
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}

# Flags that only mean something with --pipeline (their dest names).
_PIPELINE_ONLY = ("part", "control_dir", "control_field", "captions", "max_sequence_length", "max_length",
                  "image_size", "latent_output", "load_dtype")


# VGGT's flags (dest names): an error with --pipeline, never silently ignored.
_VGGT_ONLY = ("vggt_model_path", "layers", "tokens", "mode", "frames_per_set", "history", "history_window",
              "reverse_frames", "random_weights")


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``diffusion pipeline`` flag group."""
    d = p.add_argument_group(
        "diffusion pipeline (Qwen-Image, Qwen-Image-Edit, SD 1.5, SDXL, Flux, Wan)",
        "Cache one part of a local diffusers pipeline directory: its own encode_prompt for every image's caption, "
        "or its VAE for every image or control image. Nothing is downloaded.")
    d.add_argument("--pipeline", metavar="DIR", default=None,
                   help="the pipeline directory save_pretrained wrote (with model_index.json)")
    d.add_argument("--part", choices=("prompt", "latent", "control_latent"), default=None,
                   help="prompt: feature prompt_embed (tensors prompt_embed, prompt_embeds_mask, pooled_prompt_embed "
                        "as the family has them); latent: pixel_latent; control_latent: control_latent")
    d.add_argument("--control-dir", "--control_dir", dest="control_dir", metavar="DIR", default=None,
                   help="control images: DIR/<same relative path> (or the same stem with another extension); "
                        "keep DIR outside DATA_ROOT")
    d.add_argument("--control-field", "--control_field", dest="control_field", metavar="FIELD", default=None,
                   help="control images: this field of each image's .jsonl line (with --jsonl)")
    d.add_argument("--captions", metavar="FIELD", default=None,
                   help="captions from this field of each image's .jsonl line (with --jsonl IMAGE_FIELD); default: "
                        "img.txt beside img.jpg, else img.jpg.txt")
    d.add_argument("--max-sequence-length", "--max_sequence_length", dest="max_sequence_length", type=at_least(1),
                   default=512, metavar="N", help="passed to encode_prompt where the family takes it (default 512, "
                                                  "the pipelines' own default)")
    d.add_argument("--max-length", "--max_length", dest="max_length", type=at_least(1), default=None, metavar="N",
                   help="store Qwen-Image prompt embeddings padded to N tokens with their mask (default: unpadded)")
    d.add_argument("--image-size", "--image_size", dest="image_size", type=at_least(1), nargs=2, default=None,
                   metavar=("W", "H"), help="latent parts: resize to cover W x H and center-crop (default: each "
                                            "image's size, cropped to the family's multiple)")
    d.add_argument("--latent-output", "--latent_output", dest="latent_output", default="mean",
                   choices=("mean", "mean_logvar", "sample"), help="latent parts: what to store (default mean)")
    d.add_argument("--load-dtype", "--load_dtype", dest="load_dtype", choices=sorted(DTYPES), default=None,
                   help="dtype to load the components in (default: as diffusers loads them)")


def pipeline_encoder(args: argparse.Namespace, parser: argparse.ArgumentParser, root: str) -> Any:
    """The encoder the ``--pipeline`` flags describe (None without ``--pipeline``); usage errors
    for flags that contradict each other."""
    if args.pipeline is None:
        if given := _given(args, parser, _PIPELINE_ONLY):
            parser.error(f"{', '.join(given)} apply to a diffusion pipeline: add --pipeline DIR --part PART")
        return None
    if args.part is None:
        parser.error("--pipeline needs --part prompt, latent or control_latent (one feature per run)")
    if args.encoder != "vggt":
        parser.error("--pipeline and --encoder exclude each other: the pipeline is the encoder")
    if vggt_only := _given(args, parser, _VGGT_ONLY):
        parser.error(f"{', '.join(vggt_only)} apply to VGGT, not to a diffusion pipeline")
    if args.control_dir and args.control_field:
        parser.error("--control-dir and --control-field exclude each other: give one")
    if (args.control_field or args.captions) and not args.jsonl:
        parser.error("--control-field and --captions read each image's .jsonl line: add --jsonl IMAGE_FIELD, the "
                     "field that names the image (e.g. --jsonl image)")
    import torch  # here, not at the top: torch stays out of the CLI's start-up

    from featstore.encoders.diffusion import ControlDir, JsonlField, PipelineEncoder

    control_fn: Any = None
    if args.control_dir:
        control_fn = ControlDir(root, args.control_dir)
    elif args.control_field:
        control_fn = JsonlField(root, args.control_field, image_field=args.jsonl).path_of
    captions: Any = JsonlField(root, args.captions, image_field=args.jsonl) if args.captions else "txt"
    options: dict[str, Any] = {"name": args.feature, "captions": captions, "control_fn": control_fn,
                               "max_sequence_length": args.max_sequence_length, "max_length": args.max_length,
                               "image_size": tuple(args.image_size) if args.image_size else None,
                               "output": args.latent_output}
    if args.dtype:
        options["dtype"] = getattr(torch, DTYPES[args.dtype])
    if args.load_dtype:
        options["torch_dtype"] = getattr(torch, DTYPES[args.load_dtype])
    try:
        return PipelineEncoder(args.pipeline, args.part, **options)
    except ValueError as exc:
        parser.error(str(exc))


def _given(args: argparse.Namespace, parser: argparse.ArgumentParser, dests: tuple[str, ...]) -> list[str]:
    """The flags among ``dests`` given a value other than their default, as typed (``--part``)."""
    return [f"--{dest.replace('_', '-')}" for dest in dests if getattr(args, dest) != parser.get_default(dest)]
