"""``featstore precompute``: compute and store an encoder's features for every image. The
engine is featstore.pipeline; this module turns flags into its arguments and its summary into text."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from featstore import env
from featstore.cli.common import (
    add_data_root,
    add_json,
    add_sources,
    at_least,
    cache_dir,
    command_parser,
    data_root,
    emit,
    seconds,
    size,
)
from featstore.cli.pipeline_args import DTYPES, add_pipeline_arguments, pipeline_encoder
from featstore.errors import CheckpointError
from featstore.fmt import count, error_lines, human_bytes

if TYPE_CHECKING:
    from featstore.cli.common import Subcommands



def register(sub: Subcommands) -> None:
    """Adds ``precompute``."""
    p = sub.add_parser(
        "precompute", help="compute and store an encoder's features for every image",
        description="Compute the features of every image under DATA_ROOT that has no valid entry (missing, stale, "
                    "foreign, corrupt) and store them: decoding in worker processes, batches of equal shape on the "
                    "device, a background writer, a journal a rerun continues from. Run it again at any time: "
                    "it computes only what changed.",
        epilog="examples:\n"
               "  featstore precompute /data/train --vggt-model-path /models/VGGT-1B\n"
               "  featstore precompute /data/train --dry-run\n"
               "  torchrun --nproc_per_node 8 -m featstore.cli precompute /data/train   # one rank per GPU\n"
               "  featstore precompute /data/train --shard 0/4   # ... and 1/4, 2/4, 3/4 anywhere\n"
               "  featstore precompute /data/train --encoder mypkg.enc:make --feature dino\n"
               "  featstore precompute /data/r2r --jsonl images --history --history-window 8 48   # JanusVLN\n"
               "  featstore precompute /data/edit --pipeline /models/Qwen-Image-Edit --part prompt --control-dir "
               "/data/control\n"
               "environment: " + ", ".join(env.PRECOMPUTE_VARIABLES),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_root(p)
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", default="vggt", help="vggt (default) or module.path:callable returning an encoder "
                   "or an nn.Module")
    g.add_argument("--vggt-model-path", "--vggt_model_path", dest="vggt_model_path", default=None, metavar="PATH",
                   help="VGGT-1B weights: model.pt/.safetensors or its directory (default: $VGGT_MODEL_PATH)")
    g.add_argument("--model-path", "--model_path", dest="model_path", default=None, metavar="PATH",
                   help="the model the features are for (recorded in the manifest, as the old scripts did)")
    g.add_argument("--layers", type=int, nargs="+", default=[-2], metavar="L",
                   help="VGGT aggregator layers to store (default -2: layer 22, read by JanusVLN-style models)")
    g.add_argument("--tokens", choices=("patch", "all"), default="patch", help="patch tokens only (default) or all")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="stored dtype (default: bf16 where the GPU supports it, fp16 on other GPUs, fp32 on CPU)")
    g.add_argument("--mode", choices=("crop", "pad"), default="crop", help="VGGT preprocessing (default crop)")
    g.add_argument("--frames-per-set", "--frames_per_set", dest="frames_per_set", type=at_least(1), default=1,
                   metavar="N",
                   help="frames encoded together (default 1: every image alone, valid for single-frame use only)")
    h = p.add_argument_group(
        "history (JanusVLN-style causal streaming)",
        "For vision-language navigation models of the JanusVLN family, which feed a sample's frames to VGGT one at "
        "a time with a key/value cache (each frame attends to itself and the frames before it) and read the last "
        "frame's features. Per-image entries and frame sets are not what those models compute.")
    h.add_argument("--history", action="store_true",
                   help="read each .jsonl line's list (--jsonl FIELD) as one sample's ordered history, oldest first; "
                        "stream each longest list once and store, for every prefix some sample names, the last "
                        "frame's features given that prefix (T frame passes for a T-step episode with every step a "
                        "sample, instead of T(T+1)/2); read them with FeatureStore.get_history(frames)")
    h.add_argument("--history-window", "--history_window", dest="history_window", type=at_least(0), nargs=2,
                   default=None, metavar=("START", "RECENT"),
                   help="key/value cache window: keep the first START and the last RECENT frames (JanusVLN evaluates "
                        "with 8 48); default: every earlier frame")
    h.add_argument("--reverse-frames", "--reverse_frames", dest="reverse_frames", action="store_true",
                   help="feed each history last to first (JanusVLN's reference_frame other than 'first'); an entry "
                        "then holds the list's first frame, fed last, given the whole list. No prefix shares a "
                        "pass: each sample of n frames costs n frame passes")
    g.add_argument("--random-weights", action="store_true",
                   help="a tiny VGGT with random weights instead of a checkpoint (trying featstore; features "
                        "mean nothing)")
    add_pipeline_arguments(p)
    f = p.add_argument_group("where")
    f.add_argument("--feature", default=None, metavar="F", help="feature name (default: the encoder's, e.g. vggt)")
    f.add_argument("--layout", choices=("sidecar", "dir", "packed"), default=None,
                   help="sidecar: beside each image (default); dir: under --cache-dir; packed: straight into packs "
                        "(under --cache-dir when given, else the data root's .featstore/), for millions of entries")
    f.add_argument("--pack-size", type=size, default=None, metavar="SIZE",
                   help="with --layout packed: seal a pack once it holds this much, e.g. 512MiB (default: 2GiB)")
    f.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None, metavar="DIR",
                   help="cache directory, for read-only datasets (default for vggt: $VGGT_CACHE_DIR)")
    add_sources(p)
    r = p.add_argument_group("run")
    r.add_argument("--device", default=None, help="default $DEVICE, else cuda:0 when available, else cpu")
    r.add_argument("--batch-size", "--batch_size", dest="batch_size", type=at_least(1), default=None, metavar="N",
                   help="images per batch (default $BATCH_SIZE or 16; halved on CUDA out-of-memory)")
    r.add_argument("--num-workers", dest="num_workers", type=at_least(0), default=None, metavar="N",
                   help="decoding processes (default: per core on CPU, cores - 1 with a GPU)")
    r.add_argument("--skip-existing", "--skip_existing", dest="skip_existing", action=argparse.BooleanOptionalAction,
                   default=None, help="skip images whose entry is valid (default: on, or $SKIP_EXISTING)")
    r.add_argument("--overwrite", action="store_true", help="recompute every selected image")
    r.add_argument("--start-idx", "--start_idx", dest="start_idx", type=at_least(0), default=None, metavar="I",
                   help="first index of the sorted source list (of the frame sets with --frames-per-set, of the "
                        "longest lists with --history)")
    r.add_argument("--end-idx", "--end_idx", dest="end_idx", type=at_least(0), default=None, metavar="J",
                   help="end index (exclusive) of that list; before --start-idx is a usage error")
    r.add_argument("--shard", default=None, metavar="I/N", help="every N-th source starting at I")
    r.add_argument("--dry-run", action="store_true", help="print the plan (counts, bytes, free space) and stop")
    r.add_argument("--force", action="store_true", help="start even if the estimate exceeds the free space")
    r.add_argument("--no-durable", action="store_true", help="do not fsync entries (faster, less safe on power loss)")
    r.add_argument("--log-every", "--log_every", dest="log_every", type=seconds, default=None, metavar="SECONDS",
                   help="when stderr is not a terminal (nohup, Slurm), a progress line every SECONDS: done/total, "
                        "rate, ETA, failures (default $FEATSTORE_LOG_EVERY or 30; 0: none); a bar on a terminal")
    add_json(p, "print the summary as JSON")
    p.set_defaults(func=cmd_precompute)


def cmd_precompute(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Runs the engine; exit code 1 when an item failed, 130 when interrupted."""
    parser = command_parser(parser, "precompute")  # usage errors show this command's usage
    if args.pack_size is not None and args.layout != "packed":
        parser.error("--pack-size applies to --layout packed")
    root = data_root(args, parser)
    try:  # checked before anything loads: a typo should not cost a model load
        env.parse_shard(args.shard)
    except ValueError as exc:
        parser.error(str(exc))
    encoder = pipeline_encoder(args, parser, root)  # usage errors first; torch only with --pipeline
    options = _encoder_options(args, parser) if encoder is None else {}
    if encoder is None:
        _check_weights(args, parser)  # in the first second: before torch is imported
    # The engine imports torch: imported here, not at the top, so that the other commands and
    # --help start without it.
    from featstore.pipeline import precompute

    directory = cache_dir(args, args.feature or (encoder.name if encoder is not None else args.encoder))
    try:
        s = precompute(root, encoder=encoder if encoder is not None else args.encoder, feature=args.feature,
                       layout=args.layout or "sidecar",
                       cache_dir=directory, device=args.device, batch_size=args.batch_size,
                       num_workers=args.num_workers, skip_existing=args.skip_existing, overwrite=args.overwrite,
                       start_idx=args.start_idx, end_idx=args.end_idx, shard=args.shard, files_from=args.files_from,
                       extensions=args.ext, jsonl=args.jsonl, dry_run=args.dry_run, force=args.force,
                       durable=not args.no_durable, progress=None if not args.json else False,
                       encoder_options=options, model_path=args.model_path, log_every=args.log_every,
                       on_plan=None if args.json else _print_plan, pack_size=args.pack_size)
    except KeyboardInterrupt as exc:
        done = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        print(f"featstore precompute: interrupted after {done.get('written', 0)} entries; every entry on disk is "
              "complete, and a rerun continues where this one stopped", file=sys.stderr)
        return 130
    emit(args, s, _result_text(s, dry_run=args.dry_run))  # the plan's lines came out before the work
    if s["scan_errors"]:
        what = f"the files listed in {args.files_from}" if args.files_from else "the scan"
        for line in error_lines([tuple(e) for e in s["unscanned"]], f"path of {what} could not be read",
                                f"paths of {what} could not be read"):
            print(f"featstore precompute: {line}", file=sys.stderr)
        print("featstore precompute: fix or remove those paths (exit code 1)"
              if args.files_from else "featstore precompute: those paths were skipped (exit code 1)", file=sys.stderr)
    return 1 if s.get("failed") or s["scan_errors"] else 0


def _check_weights(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The built-in VGGT encoder's weights, checked before anything is imported or loaded: none
    given (a dry run needs none), or a path that does not exist, is a :class:`CheckpointError`
    (exit code 1) naming the flag or variable, the checkpoint to download and ``--random-weights``."""
    if args.encoder != "vggt" or args.random_weights or getattr(args, "pipeline", None):
        return
    flag = args.vggt_model_path
    path = flag or env.vggt_model_path()
    if not path:
        if not args.dry_run:
            raise CheckpointError("no VGGT weights given: pass --vggt-model-path PATH (or set VGGT_MODEL_PATH) to the "
                         "downloaded VGGT-1B checkpoint (model.pt of facebook/VGGT-1B on Hugging Face), or "
                         "--random-weights for a tiny random-weight VGGT (demos and tests: the features mean nothing)")
        return
    if not os.path.exists(path):
        shown = f"--vggt-model-path {path}" if flag else f"$VGGT_MODEL_PATH={path}"
        raise CheckpointError(f"VGGT weights not found: {shown} does not exist; point it to the VGGT-1B model file "
                              "(model.pt or .safetensors of facebook/VGGT-1B) or its directory")


def _print_plan(s: dict[str, Any]) -> None:
    """Prints the plan's lines, flushed, before any work: a log file shows them while the run goes on."""
    print(_plan_text(s), flush=True)


def _encoder_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The built-in VGGT encoder's options from the flags; none for other encoders, where a
    VGGT-only flag given a value is a usage error."""
    if (args.history_window is not None or args.reverse_frames) and not args.history:
        parser.error("--history-window and --reverse-frames apply to history mode: add --history")
    if args.history and args.jsonl is None:
        parser.error("--history reads each sample's history from a .jsonl list: add --jsonl FIELD, the field of each "
                     "line that lists the sample's frames, oldest first (e.g. --jsonl images)")
    if args.history and args.frames_per_set != 1:
        parser.error("--history and --frames-per-set exclude each other: a history is encoded causally frame by "
                     "frame, a frame set bidirectionally; choose one")
    if args.encoder != "vggt":
        if args.frames_per_set != 1:
            parser.error("--frames-per-set applies to the vggt encoder")
        if args.history_window is not None or args.reverse_frames:
            parser.error("--history-window and --reverse-frames apply to the vggt encoder (another encoder's "
                         "history mode is its own encode_history)")
        return {}
    options: dict[str, Any] = {"model_path": args.vggt_model_path, "layers": tuple(args.layers),
                               "tokens": args.tokens, "mode": args.mode, "frames_per_set": args.frames_per_set}
    if args.history:
        options.update({"history": True, "window": tuple(args.history_window) if args.history_window else None,
                        "reverse": args.reverse_frames})
    if args.dtype:
        import torch  # only for a dtype flag: torch stays out of the CLI's start-up

        options["dtype"] = getattr(torch, DTYPES[args.dtype])
    if args.random_weights:
        options["random_weights_seed"] = 0
    return options


def _summary_text(s: dict[str, Any], *, dry_run: bool) -> str:
    """The run summary ``precompute`` returns, as lines for a person: what ran where, the plan,
    and what was done."""
    return _plan_text(s) + "\n" + _result_text(s, dry_run=dry_run)


def _plan_text(s: dict[str, Any]) -> str:
    """What will run where, and the plan: what is found, selected, valid, to compute, replaced."""
    lines = [f"featstore precompute: feature {s['feature']} with {_encoder_text(s['encoder'])} on {s['device']}"]
    est = s["estimated_bytes"]
    sets = s.get("unit") == "sets"
    history = s.get("history")
    found = (f"{s['sets']:,} frame sets ({s['sources']:,} frames, up to {s['frames_per_set']} per set)" if sets
             else f"{s['selected']:,} samples ({s['lists']:,} longest lists, {s['sources']:,} frames)" if history
             else f"{s['sources']:,} sources")
    lines.append(f"plan: {s['selected']:,} of {found} selected, {s['skipped']:,} already valid, "
                 f"{s['planned']:,} to compute" + (f", {_size_word(s)} {human_bytes(est)} ({_estimate_from(s)})"
                                                   if est is not None else "")
                 + f" ({human_bytes(s['free_bytes'])} free); planned in {1000 * s['plan_seconds']:.0f} ms")
    if s.get("to_refresh"):
        lines.append(f"plan: {count(s['to_refresh'], 'entry', 'entries')} to refresh: only their .jsonl changed (on "
                     "other lines); rewritten with their own tensors, not computed")
    if s.get("weights_unchecked"):
        lines.append("weights not given: not checked, nothing loaded (a dry run needs none); states are judged "
                     "against the fingerprint in the manifest, or any; a real run needs --vggt-model-path PATH")
    if s.get("replaced"):
        lines.append(f"note: {_replaced(s)} will be replaced")
    if s["encoder"].get("name") == "vggt":
        lines.append(f"note: {s['note']}")
    return "\n".join(lines)


def _encoder_text(enc: dict[str, Any]) -> str:
    """The encoder, as the plan line names it: what it is and where its weights come from."""
    if enc.get("random_weights"):
        return f"{enc.get('name')} (TINY VGGT WITH RANDOM WEIGHTS: meaningless features, for trying featstore)"
    if enc.get("name") == "vggt":
        return (f"vggt ({enc.get('model_path') or 'no weights given'}, layers {enc.get('layers')}, "
                f"{enc.get('tokens')} tokens, {enc.get('dtype')}, {enc.get('mode')})")
    if enc.get("class") == "PipelineEncoder":
        return f"{enc.get('pipeline')}'s {enc.get('part')} part ({enc.get('model_path') or 'a loaded pipeline'})"
    what = str(enc.get("class") or enc.get("name"))
    return f"{what} ({enc['model_path']})" if enc.get("model_path") else what


def _replaced(s: dict[str, Any]) -> str:
    """What a run replaces: the entries of another encoder configuration (foreign)."""
    other = s.get("replaced_fingerprint")
    return (f"{count(s['replaced'], 'entry', 'entries')} of another encoder configuration (fingerprint "
            f"{other or 'another'}, this run {s.get('fingerprint') or 'unknown'})")


def _result_text(s: dict[str, Any], *, dry_run: bool) -> str:
    """What was done (or, for a dry run, that nothing was)."""
    sets = s.get("unit") == "sets"
    history = s.get("history")
    lines: list[str] = []
    if dry_run:
        lines.append("dry run: nothing loaded, nothing written")
    elif s["planned"] == 0:
        lines.append(f"refreshed {s['refreshed']:,}; nothing to compute" if s.get("refreshed")
                     else "nothing to do: every selected entry is valid")
    else:
        stages = s.get("stage_seconds", {})
        total = sum(stages.values()) or 1.0
        rate = (f"{s['sets_per_second']} sets/s, {s['images_per_second']} frames/s" if sets
                else f"{s['samples_per_second']} samples/s, {s['frame_passes_per_second']} frame passes/s" if history
                else f"{s['images_per_second']} {s.get('unit') or 'images'}/s overall")
        what_written = (f"{s['written']:,} sets ({s['frames_written']:,} frames)" if sets
                        else f"{s['written']:,} samples ({s['frame_passes']:,} frame passes over "
                             f"{s['planned_lists']:,} lists)" if history
                        else f"{s['written']:,}")
        lines.append(f"done: {what_written} written ({human_bytes(s['bytes_written'])}), {s['failed']:,} failed in "
                     f"{s['seconds']:.1f} s ({rate}); main-process time: "
                     + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in stages.items()))
        if s.get("refreshed"):
            lines.append(f"refreshed {s['refreshed']:,} (their .jsonl changed on other lines)")
        for rel, why in s["failures"][:10]:
            lines.append(f"  failed {rel}: {why}")
        if s.get("replaced"):
            lines.append(f"{_replaced(s)} were replaced")
    if s.get("manifest"):
        lines.append(f"manifest: {s['manifest']}")
    return "\n".join(lines)


def _size_word(s: dict[str, Any]) -> str:
    """"about" a mean of written entries; "at most" the encoder's upper bound (a prompt's bound
    assumes every caption takes the longest sequence)."""
    return "about" if s.get("estimate_from") == "entries" else "at most"


def _estimate_from(s: dict[str, Any]) -> str:
    """Where the size estimate came from, said with it."""
    if s.get("estimate_from") == "entries":
        written = s["skipped"]
        n = min(written, 16)  # the planner samples this many of them
        if not n:
            return "estimate: mean size of the entries already written"
        if n < written:
            return f"estimate: mean size of {n:,} of the {written:,} entries already written"
        return f"estimate: mean size of the {count(n, 'entry', 'entries')} already written"
    return "estimate: the encoder's upper bound, no entry written yet"
