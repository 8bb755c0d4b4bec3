"""``python -m featstore.examples KIND DIR``: example data for trying featstore and for the
README's quick starts (tiny, generated here; nothing is downloaded)."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m featstore.examples",
        description="Write example data: image trees, navigation episodes, captioned images, tiny diffusers "
                    "pipelines with random weights (for trying featstore; their outputs mean nothing).")
    sub = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    images = sub.add_parser("images", help="an image tree in scene folders")
    images.add_argument("root")
    images.add_argument("--count", type=int, default=24)
    images.add_argument("--size", type=int, default=96)
    images.add_argument("--mixed-sizes", action="store_true", help="landscape, portrait and square images")
    episodes = sub.add_parser("episodes", help="navigation episodes and train.jsonl listing each step's history")
    episodes.add_argument("root")
    episodes.add_argument("--episodes", type=int, default=3)
    episodes.add_argument("--steps", type=int, default=6)
    captioned = sub.add_parser("captioned", help="images of mixed sizes with captions (img.txt, or metadata.jsonl)")
    captioned.add_argument("root")
    captioned.add_argument("--count", type=int, default=6)
    captioned.add_argument("--control-dir", default=None, metavar="DIR", help="also write control images there")
    captioned.add_argument("--jsonl", action="store_true", help="captions in root/metadata.jsonl, not .txt files")
    pipeline = sub.add_parser("pipeline", help="a tiny diffusers pipeline with random weights (save_pretrained layout)")
    pipeline.add_argument("family", choices=("sd15", "sdxl", "flux", "qwen_image", "qwen_image_edit", "wan"))
    pipeline.add_argument("root")
    args = parser.parse_args(argv)

    if args.kind == "images":
        from featstore.examples.images import make_image_tree

        n = len(make_image_tree(args.root, args.count, size=args.size, mixed_sizes=args.mixed_sizes))
        print(f"wrote {n} images under {os.path.abspath(args.root)}")
    elif args.kind == "episodes":
        from featstore.examples.datasets import make_episodes

        samples = make_episodes(args.root, args.episodes, args.steps)
        print(f"wrote {args.episodes} episodes of {args.steps} frames under {os.path.abspath(args.root)} and "
              f"{len(samples)} samples in {os.path.join(os.path.abspath(args.root), 'train.jsonl')}")
    elif args.kind == "captioned":
        from featstore.examples.datasets import make_captioned

        n = len(make_captioned(args.root, args.count, control_root=args.control_dir, jsonl=args.jsonl))
        where = "metadata.jsonl" if args.jsonl else ".txt files beside them"
        controls = f", control images under {os.path.abspath(args.control_dir)}" if args.control_dir else ""
        print(f"wrote {n} captioned images under {os.path.abspath(args.root)} (captions in {where}{controls})")
    else:
        from featstore.examples.pipelines import save_pipeline, unavailable

        missing = unavailable(args.family)
        if missing:
            print(f"featstore.examples: cannot build {args.family}: {missing}; pip install "
                  "'featstore[diffusers,transformers]'", file=sys.stderr)
            return 1
        save_pipeline(args.family, args.root)
        print(f"wrote a tiny {args.family} pipeline with RANDOM WEIGHTS to {os.path.abspath(args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
