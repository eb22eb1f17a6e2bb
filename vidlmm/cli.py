"""Command line: `python -m vidlmm ask|info ...`.

A contract other tools rely on: with `--json`, `ask` prints one JSON object; a user error (bad video, bad
model path, bad option) exits with status 2 and exactly one line `error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from .errors import VidlmmError


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage dump would be more than one line
        raise VidlmmError(message)


def add_sampling_arguments(parser) -> None:
    """--num-frames N | --fps | --rate R, with --max-frames: shared by every command that reads videos."""
    frames = parser.add_mutually_exclusive_group()
    frames.add_argument("--num-frames", type=int, help="uniform sampling of N frames")
    frames.add_argument("--fps", action="store_true", help="reference fps mode: floor(duration) frames, capped")
    frames.add_argument("--rate", type=float, help="one frame every 1/RATE seconds, capped")
    parser.add_argument("--max-frames", type=int, default=64, help="cap for --fps / --rate")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="python -m vidlmm", description="TinyLLaVA-Video models on your videos.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    def model_args(p):
        p.add_argument("--model", help="checkpoint folder or hub id (default: the embedded model)")
        p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--quantization", choices=["8bit", "4bit", "int8"],
                       help="the language model's linear layers: 8bit / 4bit (bitsandbytes) or int8 (torch, CPU)")
        p.add_argument("--revision", help="hub revision (branch, tag or commit) for a hub id; default: the pinned one")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("--token-budget", type=int,
                       help="visual tokens per video for a compressor model (pool, tome, topk) instead of its own")

    ask = sub.add_parser("ask", help="answer a question about a video")
    model_args(ask)
    ask.add_argument("--video", required=True)
    ask.add_argument("--question", required=True)
    add_sampling_arguments(ask)
    ask.add_argument("--max-new-tokens", type=int, default=512)
    ask.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ask.add_argument("--temperature", type=float, default=0.2)
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int)

    info = sub.add_parser("info", help="describe a checkpoint: connector, queries, groups, frames, parameters")
    model_args(info)

    from .eval_cli import add_eval_arguments

    evaluation = sub.add_parser("eval", help="multiple-choice video QA accuracy (MVBench / Video-MME style JSON)")
    model_args(evaluation)
    add_eval_arguments(evaluation)
    return parser


def _load(args):
    from .checkpoint import load_model
    from .defaults import default_model

    source, trained = (args.model, True) if args.model else default_model()
    if not trained:
        print("note: using a tiny random-weight stand-in model (the embedded trained models are not built yet); "
              "its answers are meaningless.", file=sys.stderr)
    model = load_model(source, dtype=args.dtype, device=args.device, quantization=args.quantization,
                       revision=getattr(args, "revision", None))
    if getattr(args, "token_budget", None) is not None:
        set_token_budget(model, args.token_budget)
    return model


def set_token_budget(model, budget: int) -> None:
    """Serve a per-frame compressor at another budget (tokens per frame: min(budget // frames, P))."""
    connector = model.connector
    if not hasattr(connector, "token_budget"):
        raise VidlmmError(f"--token-budget applies to the pool, tome and topk compressors; this model's connector "
                          f"is {connector.registry_name}")
    if budget < 1:
        raise VidlmmError(f"--token-budget must be at least 1, got {budget}")
    connector.token_budget = int(budget)


def sampling_from_args(args, model):
    """--num-frames / --fps / --rate (see add_sampling_arguments), else the checkpoint's own sampling."""
    from .pipeline import default_sampling
    from .video import FrameSampling

    try:
        if getattr(args, "num_frames", None) is not None:
            return FrameSampling.uniform(args.num_frames)
        if getattr(args, "fps", False):
            return FrameSampling.fps(args.max_frames)
        if getattr(args, "rate", None) is not None:
            return FrameSampling.at_rate(args.rate, args.max_frames)
    except ValueError as err:  # e.g. --num-frames 0: a user error, one line
        raise VidlmmError(str(err)) from None
    return default_sampling(model)


def cmd_ask(args) -> int:
    from .pipeline import GenerationSettings, VideoLMM

    from .video import check_video_path

    check_video_path(args.video)  # fail before the model load
    model = _load(args)
    lmm = VideoLMM(model, sampling=sampling_from_args(args, model))
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    answer = lmm.ask(args.video, args.question, generation=settings)
    if args.json:
        print(json.dumps({**answer.to_json(), "precision": _precision_json(model)}))
    else:
        print(answer.text)
    return 0


def cmd_info(args) -> int:
    from .pipeline import default_sampling

    model = _load(args)
    cfg, tower = model.config, model.vision_tower
    sampling = default_sampling(model)
    frames = sampling.num_frames if sampling.mode == "uniform" else 16
    info = {
        "source": model.source,
        "connector": model.connector.registry_name,
        "connector_type": cfg.connector_type,
        "num_queries": cfg.num_queries,
        "groups": cfg.group,
        "frames": sampling.describe(),
        f"visual_tokens_at_{frames}_frames": model.num_visual_tokens(frames),
        "vision_tower": model.tower_type,
        "patch_grid": list(tower.grid),
        "tokens_per_frame": tower.tokens_per_frame,
        "vision_feature_layer": cfg.vision_feature_layer,
        "select_strategy": cfg.vision_feature_select_strategy,
        "llm": cfg.llm_type,
        "hidden_size": cfg.hidden_size,
        "dtype": str(model.dtype).replace("torch.", ""),
        "precision": _precision_json(model),
        "parameters": model.parameter_counts(),
    }
    if args.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            if key == "precision" and value:
                value = f"{value['name']}: {value['reason']}"
            print(f"{key:<{width}}  {value}")
    return 0


def _precision_json(model) -> dict | None:
    """What the model was loaded in and why (`vidlmm.precision.Precision`), None for a model built elsewhere."""
    precision = getattr(model, "precision", None)
    return precision.to_json() if precision is not None else None


def cmd_eval(args) -> int:
    from .eval_cli import distributed_shard, load_eval_items, run_eval_cli

    bench = load_eval_items(args)  # a missing or malformed data file fails before the model load
    distributed_shard()  # under accelerate launch: join the process group first, so each process has its device
    return run_eval_cli(args, _load(args), bench)


def run_user_command(command) -> int:
    """Run `command()` as a command-line program: library chatter off, a user error printed as one line
    `error: ...` with exit status 2, Ctrl-C as status 130. Shared by `python -m vidlmm` and `-m visualizations`."""
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return command()
    except VidlmmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    def command() -> int:
        args = build_parser().parse_args(argv)
        return {"ask": cmd_ask, "info": cmd_info, "eval": cmd_eval}[args.command](args)

    return run_user_command(command)
