"""`python -m visualizations attention|picture|redundancy|budget`: figures and the numbers behind them, into --out.

    python -m visualizations attention  --model M --video V --out DIR [--layer -1] [--head H] [--scale log]
    python -m visualizations picture    --model M --video V --out DIR [--frames-shown 4]
    python -m visualizations llm-attention --model M [--model M2 ...] --video V --question Q --out DIR [--token K]
    python -m visualizations llm-attention --model M [--model M2 ...] --mc BENCH [--limit N] --out DIR
    python -m visualizations redundancy --model M [--model M2 ...] --video V [--question Q] --out DIR
    python -m visualizations redundancy --model M [--model M2 ...] --mc BENCH [--video-root D] --out DIR
                                        [--records DIR]      (resumable; split over `accelerate launch` processes)
    python -m visualizations budget     [--model M ...] [--with-connectors] [--frames 1 2 4 ...] --out DIR

Each figure is written in every --formats (png, svg, pdf) at --dpi, with its numbers beside it as JSON and CSV
(a picture's numbers are arrays: JSON only).
--model takes a checkpoint folder (or hub id) and defaults to the embedded model. The written paths are printed,
one per line. A user error exits with status 2 and one line `error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

from vidlmm.errors import VidlmmError

from .io import FIGURE_FORMATS, Exporter


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like `python -m vidlmm`
        raise VidlmmError(message)


def build_parser() -> argparse.ArgumentParser:
    from vidlmm.analysis import ATTENTION_STRATEGIES, FRACTIONS, STRATEGIES
    from vidlmm.benchmarks import FORMATS
    from vidlmm.cli import add_sampling_arguments
    from vidlmm.evaluate import STYLES

    parser = _Parser(prog="python -m visualizations", description="Attention, redundancy and token-budget figures.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p, video: str):
        p.add_argument("--model", action="append", help="checkpoint folder or hub id; repeat to compare "
                                                       "(default: the embedded model)")
        if video == "required":
            p.add_argument("--video", required=True, help="video file")
        elif video == "optional":
            p.add_argument("--video", help="video file")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--formats", nargs="+", choices=FIGURE_FORMATS, default=["png"], help="figure formats")
        p.add_argument("--dpi", type=int, default=150)
        p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        if video != "none":
            add_sampling_arguments(p)

    def question_set(p, what: str):
        """--mc and what goes with it: a benchmark instead of one video."""
        p.add_argument("--mc", help=what)
        p.add_argument("--format", choices=list(FORMATS), help="the --mc data's format (default: detected)")
        p.add_argument("--video-root", help="folder the --mc videos are in (default: where the format keeps them)")
        p.add_argument("--limit", type=int, help="only the first N --mc questions")
        p.add_argument("--style", choices=list(STYLES), help="--mc prompt style (default: the benchmark's)")

    att = sub.add_parser("attention", help="connector attention: heatmap, frame overlays, temporal profile, "
                                           "redundancy statistics")
    common(att, "required")
    att.add_argument("--layer", type=int, default=-1, help="connector layer (default: the last)")
    att.add_argument("--head", type=int, help="one head (default: mean of heads)")
    att.add_argument("--scale", choices=["linear", "log"], default="linear")
    which = att.add_mutually_exclusive_group()
    which.add_argument("--query", type=int, help="frame overlays for one query")
    which.add_argument("--group", type=int, help="frame overlays for one query group")
    att.add_argument("--frames-shown", type=int, default=16, help="frames drawn in the overlay figure")

    pic = sub.add_parser("picture", help="what a per-frame compressor (llava_mini, pool, tome, topk) does to each "
                                         "frame, drawn over the frames")
    common(pic, "required")
    pic.add_argument("--frames-shown", type=int, default=4, help="frames drawn")

    llm = sub.add_parser("llm-attention", help="where the language model looks while it answers: its attention per "
                                               "generated token and layer, traced through the connector to frames "
                                               "and patches")
    common(llm, "optional")
    llm.add_argument("--question", default="Describe what happens in the video.")
    question_set(llm, "instead of one video: the visual share per layer over a multiple-choice benchmark (any "
                      "format `eval` reads), each question answered with its prompt")
    llm.add_argument("--max-new-tokens", type=int, default=32, help="answer length")
    llm.add_argument("--token", type=int, action="append",
                     help="also draw the patches of this answer token (repeatable; default: the whole answer)")
    llm.add_argument("--frames-shown", type=int, default=16, help="frames drawn in the patch figure")

    red = sub.add_parser("redundancy", help="query-zeroing curves on one video or a multiple-choice set")
    common(red, "optional")
    red.add_argument("--question", default="Describe what happens in the video.",
                     help="question for the single-video curve")
    question_set(red, "a multiple-choice benchmark as it ships (a root or its file: MVBench, Video-MME, MLVU, MMVU, "
                      "LongVideoBench, EgoSchema) or a JSON list: accuracy curves")
    red.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS), help="shares of tokens kept")
    red.add_argument("--strategies", nargs="+", choices=list(STRATEGIES + ATTENTION_STRATEGIES),
                     default=list(STRATEGIES), help="most_attended / least_attended zero first the tokens the "
                                                    "language model attends to most / least while it answers")
    red.add_argument("--margin", action="store_true",
                     help="--mc: also the likelihood margin (right option minus the best wrong one) at each point")
    red.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    red.add_argument("--metric", help="metric to plot (default: relative likelihood / relative accuracy)")
    red.add_argument("--max-new-tokens", type=int, help="answer length (default 64, or 16 with --mc)")
    red.add_argument("--records", metavar="DIR",
                     help="--mc: keep every scored question in DIR/<model>.jsonl as it is scored; a rerun skips "
                          "those already kept (under accelerate launch the videos are split over the processes)")

    bud = sub.add_parser("budget", help="visual tokens and LLM prefill cost vs frames")
    common(bud, "none")
    bud.add_argument("--frames", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    bud.add_argument("--text-tokens", type=int, default=64, help="text tokens added to each prompt")
    bud.add_argument("--with-connectors", action="store_true",
                     help="add naive / group / image-level / MLP and the related-work (llava-mini, pool, tome, "
                          "topk) variants of the first model's backbone")
    return parser


# ---- helpers ------------------------------------------------------------------------------------------------

def _sources(args) -> list[tuple[str, str]]:
    """(label, folder or hub id) per --model; labels are folder names, made unique."""
    from vidlmm.defaults import default_model

    models = args.model
    if not models:
        source, trained = default_model()
        if not trained:
            print("note: using a tiny random-weight stand-in model (the embedded trained models are not built "
                  "yet); its numbers are meaningless.", file=sys.stderr)
        models = [source]
    out, seen = [], {}
    for source in models:
        label = Path(str(source).rstrip("/")).name or str(source)
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label}-{seen[label]}", source))
    return out


def _load(source: str, args):
    from vidlmm.checkpoint import load_model

    return load_model(source, dtype=args.dtype, device=args.device)


def _lmm(model, args):
    from vidlmm.cli import sampling_from_args
    from vidlmm.pipeline import VideoLMM

    return VideoLMM(model, sampling=sampling_from_args(args, model))


class _Ticker:
    """Progress on stderr with the time left: rewritten in place on a terminal, else one line per 10 %."""

    def __init__(self):
        self.start, self.shown = time.perf_counter(), -1

    def __call__(self, done: int, total: int, message: str) -> None:
        eta = (time.perf_counter() - self.start) / max(done, 1) * (total - done)
        text = f"{message} (eta {eta:.0f} s)"
        if sys.stderr.isatty():
            print(f"\r{text}", end="" if done < total else "\n", file=sys.stderr, flush=True)
        elif done * 10 // max(total, 1) > self.shown:
            self.shown = done * 10 // max(total, 1)
            print(text, file=sys.stderr, flush=True)


# ---- commands -----------------------------------------------------------------------------------------------

def cmd_attention(args, writer: Exporter) -> None:
    import numpy as np

    from vidlmm.analysis import attention_maps, redundancy_stats
    from vidlmm.video import check_video_path
    from visualizations import (plot_attention_heatmap, plot_frame_overlays, plot_redundancy_stats,
                                plot_temporal_profile)

    check_video_path(args.video)
    sources = _sources(args)
    for label, source in sources:
        prefix = f"{label}_" if len(sources) > 1 else ""
        lmm = _lmm(_load(source, args), args)
        maps = attention_maps(lmm, args.video)
        layer, head = args.layer, args.head
        writer.figure(plot_attention_heatmap(maps, layer, head, scale=args.scale), f"{prefix}attention_heatmap")
        writer.figure(plot_frame_overlays(maps, layer, head, query=args.query, group=args.group,
                                          max_frames=args.frames_shown), f"{prefix}attention_frames")
        writer.figure(plot_temporal_profile(maps, layer, head), f"{prefix}attention_temporal")
        writer.data(maps, f"{prefix}attention", csv_rows=maps.rows(layer, head))
        stats = redundancy_stats(maps, layer)
        writer.figure(plot_redundancy_stats(stats), f"{prefix}attention_redundancy")
        writer.data(stats, f"{prefix}attention_redundancy")
        full = writer.folder / f"{prefix}attention.npz"  # the full arrays, too big for JSON
        np.savez_compressed(full, media=maps.media, latents=maps.latents, query_groups=maps.query_groups,
                            tokens=maps.tokens, frame_indices=np.asarray(maps.frame_indices),
                            timestamps=np.asarray(maps.timestamps))
        writer.add(full)
        del lmm, maps
        gc.collect()


def cmd_llm_attention(args, writer: Exporter) -> None:
    import numpy as np

    from vidlmm.analysis import llm_attention
    from vidlmm.video import check_video_path
    from visualizations import plot_frame_relevance, plot_patch_relevance, plot_visual_share

    if args.max_new_tokens < 1 or args.frames_shown < 1:
        raise VidlmmError("--max-new-tokens and --frames-shown must be at least 1.")
    if bool(args.mc) == bool(args.video):
        raise VidlmmError("Give either --video (one video and --question) or --mc (a question set).")
    if args.mc:
        return _llm_attention_on_set(args, writer)
    check_video_path(args.video)
    sources = _sources(args)
    results = {}
    for label, source in sources:
        prefix = f"{label}_" if len(sources) > 1 else ""
        result = llm_attention(_lmm(_load(source, args), args), args.video, args.question,
                               max_new_tokens=args.max_new_tokens)
        for token in args.token or []:
            if not 0 <= token < len(result.tokens):
                raise VidlmmError(f"--token {token} does not exist: the answer has {len(result.tokens)} tokens.")
        share = result.visual_share()
        rows = [{"model": label, "token": k, "text": text, "layer": layer + 1, "visual_share": float(share[k, layer])}
                for k, text in enumerate(result.tokens) for layer in range(result.num_layers)]
        writer.data(result.to_json(), f"{prefix}llm_attention", csv_rows=rows)
        writer.table([{"model": label, "token": k, "text": text,
                       **{f"frame_{t}": float(v) for t, v in enumerate(result.frame_relevance(token=k))}}
                      for k, text in enumerate(result.tokens)], f"{prefix}llm_frame_relevance")
        patches = writer.folder / f"{prefix}llm_attention_patches.npz"  # [A, T, rows, cols]: too big for JSON
        np.savez_compressed(patches, **result.patch_arrays())
        writer.add(patches)
        writer.figure(plot_frame_relevance(result), f"{prefix}llm_frame_relevance")
        for token in [None, *(args.token or [])]:
            stem = "llm_patches" if token is None else f"llm_patches_token{token}"
            writer.figure(plot_patch_relevance(result, token, max_frames=args.frames_shown), f"{prefix}{stem}")
        results[label] = result.visual_share()
        gc.collect()
    writer.figure(plot_visual_share(results), "llm_visual_share")  # the connectors side by side


def _llm_attention_on_set(args, writer: Exporter) -> None:
    """`llm-attention --mc`: the visual share per layer over a question set, one line per model."""
    from vidlmm.analysis.llm_attention import PARTS, visual_share_on_set
    from vidlmm.benchmarks import load_benchmark
    from visualizations import plot_visual_share

    if args.limit is not None and args.limit < 1:
        raise VidlmmError("--limit must be at least 1.")
    bench = load_benchmark(args.mc, args.video_root, format=args.format)
    items = bench.items[: args.limit]
    if not items:
        raise VidlmmError(f"'{Path(args.mc).name}' holds no question whose video is here.")
    shares, summary, rows = {}, {}, []
    for label, source in _sources(args):
        got = visual_share_on_set(_lmm(_load(source, args), args), items, style=args.style or bench.style,
                                  max_new_tokens=args.max_new_tokens, progress=_Ticker())
        share = got["visual_share"]
        shares[label] = share
        summary[label] = {"n": len(got["ids"]), "visual_share_mean": share.mean(axis=0).tolist(),
                          "visual_share_std": share.std(axis=0).tolist(),
                          "parts": dict(zip(PARTS, got["parts"].mean(axis=0).tolist())),
                          "missing": bench.missing + got["missing"]}
        rows += [{"model": label, "layer": k + 1, "visual_share_mean": float(share[:, k].mean()),
                  "visual_share_std": float(share[:, k].std()), "n": len(got["ids"])} for k in range(share.shape[1])]
        gc.collect()
    writer.data(summary, "llm_visual_share", csv_rows=rows)
    writer.figure(plot_visual_share(shares, over="questions"), "llm_visual_share")


def cmd_picture(args, writer: Exporter) -> None:
    from vidlmm.analysis import connector_picture
    from vidlmm.video import check_video_path
    from visualizations import picture_data, plot_connector_picture

    check_video_path(args.video)
    if args.frames_shown < 1:
        raise VidlmmError("--frames-shown must be at least 1.")
    sources = _sources(args)
    for label, source in sources:
        prefix = f"{label}_" if len(sources) > 1 else ""
        picture = connector_picture(_lmm(_load(source, args), args), args.video)
        writer.figure(plot_connector_picture(picture, args.frames_shown), f"{prefix}picture")
        writer.json(picture_data(picture), f"{prefix}picture")
        del picture
        gc.collect()


def cmd_redundancy(args, writer: Exporter) -> None:
    from vidlmm.analysis import zeroing_curve, zeroing_mc_records, zeroing_mc_result
    from vidlmm.benchmarks import load_benchmark
    from vidlmm.eval_cli import run_sharded
    from vidlmm.video import check_video_path
    from visualizations import plot_zeroing

    if args.mc and args.video:
        raise VidlmmError("Give either --video (one video and --question) or --mc (a question set), not both.")
    if not args.mc and not args.video:
        raise VidlmmError("Give --video (with --question) or --mc (a multiple-choice JSON).")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise VidlmmError("--max-new-tokens must be at least 1.")
    items, missing, style = None, [], args.style
    if args.mc:
        if args.limit is not None and args.limit < 1:
            raise VidlmmError("--limit must be at least 1.")
        bench = load_benchmark(args.mc, args.video_root, format=args.format)
        items, missing, style = bench.items[: args.limit], bench.missing, style or bench.style
        if not items:
            raise VidlmmError(f"'{Path(args.mc).name}' holds no question whose video is here.")
    else:
        if args.records:
            raise VidlmmError("--records keeps the questions of an --mc run; a single video's curve has none.")
        check_video_path(args.video)
    if args.records and Path(args.records).is_file():
        raise VidlmmError(f"--records '{args.records}' is a file; name a folder (one records file per model).")

    results = []
    for label, source in _sources(args):
        lmm = _lmm(_load(source, args), args)
        plan = dict(fractions=args.fractions, strategies=args.strategies, seeds=args.seeds)
        if items is not None:
            records = str(Path(args.records) / f"{label}.jsonl") if args.records else None
            parts = run_sharded(lambda shard: zeroing_mc_records(
                lmm, items, style=style, max_new_tokens=args.max_new_tokens or 16, records=records, shard=shard,
                progress=_Ticker() if shard[0] == 0 else None, margin=args.margin, **plan))
            if parts is None:
                lmm = None
                gc.collect()
                continue  # another process writes the figures
            order = {item.id: k for k, item in enumerate(items)}
            scored = sorted((r for part, _ in parts for r in part), key=lambda r: order[r.id])
            unread = sorted((m for _, part in parts for m in part), key=lambda m: order[m["id"]])
            results.append(zeroing_mc_result(scored, missing + unread, style=style, model=label,
                                             connector_type=lmm.model.connector.registry_name, **plan))
        else:
            results.append(zeroing_curve(lmm, args.video, args.question, max_new_tokens=args.max_new_tokens or 64,
                                         name=label, progress=_Ticker(), **plan))
        lmm = None  # the next model loads into the memory this one held
        gc.collect()
    if not results:
        return
    metric = args.metric
    if metric is not None and metric not in results[0].metrics:
        raise VidlmmError(f"Unknown metric '{metric}' (use {', '.join(results[0].metrics)}).")
    writer.figure(plot_zeroing(results, metric), "zeroing")
    writer.data({"results": results}, "zeroing", csv_rows=[row for r in results for row in r.rows()])
    writer.table([row for r in results for row in r.summary()], "zeroing_summary")


def cmd_budget(args, writer: Exporter) -> None:
    from vidlmm.analysis import model_config, connector_variants, token_budget
    from visualizations import plot_token_budget

    if args.text_tokens < 0:
        raise VidlmmError("--text-tokens cannot be negative.")
    models = dict(_sources(args))
    if args.with_connectors:
        base = model_config(next(iter(models.values())))
        for name, config in connector_variants(base, related=True).items():
            models[name if name not in models else f"{name} (variant)"] = config
    budget = token_budget(models, frames=args.frames, text_tokens=args.text_tokens)
    writer.figure(plot_token_budget(budget), "budget")
    writer.data(budget, "budget")


def main(argv: list[str] | None = None) -> int:
    from vidlmm.cli import run_user_command

    def command() -> int:
        args = build_parser().parse_args(argv)
        if args.dpi < 10:
            raise VidlmmError("--dpi must be at least 10.")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise VidlmmError(f"--out '{args.out}' exists and is not a folder.")
        writer = Exporter(args.out, args.formats, args.dpi)
        {"attention": cmd_attention, "llm-attention": cmd_llm_attention, "picture": cmd_picture,
         "redundancy": cmd_redundancy, "budget": cmd_budget}[args.command](args, writer)
        for path in writer.written:
            print(path)
        return 0

    return run_user_command(command)


if __name__ == "__main__":
    sys.exit(main())
