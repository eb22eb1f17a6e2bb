"""The `eval` command: its arguments, the benchmark it reads, one process or several under `accelerate launch`,
and the printed result (one JSON object with --json, else a markdown table). The scoring is `vidlmm.evaluate`'s.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

from .errors import VidlmmError
from .evaluate import STYLES, SCORINGS, evaluate, evaluate_open, merge_results


def add_eval_arguments(parser) -> None:
    """Add the `eval` sub-command's options to an argparse (sub)parser.

    --model and --json are added only when the parser does not have them yet (cli.py's shared model options).
    """
    have = getattr(parser, "_option_string_actions", {})
    if "--model" not in have:
        parser.add_argument("--model", help="checkpoint folder or hub id")
    if "--json" not in have:
        parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--data", required=True,
                        help="a benchmark as it ships (a root folder or its file: MVBench, Video-MME parquet, MLVU, "
                             "MMVU, LongVideoBench, EgoSchema) or a JSON / JSONL list of questions")
    from .benchmarks import FORMATS

    parser.add_argument("--format", choices=list(FORMATS), help="the data's format (default: detected)")
    parser.add_argument("--video-root", help="folder the videos are in (default: where the format keeps them)")
    from .cli import add_sampling_arguments

    add_sampling_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--limit", type=int, help="evaluate only the first N questions")
    parser.add_argument("--style", choices=list(STYLES),
                        help="prompt: mvbench '(A) x' lines or videomme 'A. x' lines (default: the reference's "
                             "for the benchmark)")
    parser.add_argument("--progress", action="store_true", help="one line per question on stderr")
    parser.add_argument("--scoring", choices=list(SCORINGS), default="generate",
                        help="generate: the reference's prompt, a greedy reply, parsed; likelihood: the option whose "
                             "text is the most likely start of the answer to the bare question (nothing unparsable)")
    parser.add_argument("--records", metavar="FILE.jsonl",
                        help="append every scored question to FILE as it is scored; a rerun skips those already in it")
    parser.add_argument("--ignore-bounds", action="store_true",
                        help="sample the whole video file for questions about a window (MVBench's bounded "
                             "tasks), as TinyLLaVA-Video's MVBench script does")


def load_eval_items(args):
    """The benchmark the CLI arguments select (`vidlmm.benchmarks.Benchmark`; its items cut to --limit), read
    before the model is loaded: a malformed file fails at once, questions whose video is not there are listed."""
    from .benchmarks import load_benchmark

    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise VidlmmError("--limit must be at least 1.")
    bench = load_benchmark(args.data, getattr(args, "video_root", None), format=getattr(args, "format", None))
    if not bench.items:
        why = f" ({len(bench.missing)} whose video is not there)" if bench.missing else ""
        raise VidlmmError(f"Data '{Path(args.data).name}' holds no question that can be scored{why}.")
    if getattr(args, "limit", None):
        bench.items, bench.open_ended = bench.items[: args.limit], bench.open_ended[: args.limit]
    return bench


def distributed_shard() -> tuple[int, int]:
    """(rank, processes) of this process: (0, 1) unless started by `accelerate launch` / torchrun with several
    processes, which then join one process group (gloo on CPU) to merge their results."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch
    import torch.distributed.nn  # noqa: F401 - see _leave_group: imported later, it would keep the group alive
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    atexit.unregister(_leave_group)
    atexit.register(_leave_group)
    return state.process_index, state.num_processes


def _leave_group() -> None:
    """Destroy the process group at exit, which joins gloo's worker threads while the interpreter still runs.

    A worker releases a collective's tensors just after the caller has the result; if the interpreter is already
    shutting down by then (rank 1 exits right after the gather), that thread cannot take the GIL and the process
    aborts ("terminate called without an active exception"). Destroying frees the group only if nothing else holds
    it: `torch.distributed.nn.functional`, when first imported after the group exists (the model load does), keeps
    it as its functions' `group=` default, so `distributed_shard` imports it before joining."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def run_sharded(work):
    """work((rank, processes)) on this process's share. One process: [its part]. Several (under `accelerate
    launch`): every process's part on the first, None on the others; a failure on any of them raises its sentence on
    every process (none is left waiting for the others)."""
    rank, processes = shard = distributed_shard()
    try:
        part, failure = work(shard), None
    except Exception as err:  # noqa: BLE001 - with several processes the others must not wait for this one
        if processes == 1:
            raise
        part, failure = None, str(err) if isinstance(err, VidlmmError) else f"{type(err).__name__}: {err}"
    if processes == 1:
        return [part]
    from accelerate.utils import gather_object

    parts = gather_object([(part, failure)])
    failures = [f for _, f in parts if f]
    if failures:
        raise VidlmmError(failures[0])
    return [p for p, _ in parts] if rank == 0 else None


def run_eval_cli(args, model, bench=None) -> int:
    """Run `eval` with an already loaded model; prints one JSON object (--json) or a markdown table."""
    from .pipeline import GenerationSettings, VideoLMM

    if bench is None:
        bench = load_eval_items(args)
    if args.max_new_tokens < 1:
        raise VidlmmError("--max-new-tokens must be at least 1.")
    from .cli import sampling_from_args

    lmm = VideoLMM(model, sampling=sampling_from_args(args, model))
    style = getattr(args, "style", None) or bench.style
    parts = run_sharded(lambda shard: evaluate(
        lmm, bench.items, generation=GenerationSettings(max_new_tokens=args.max_new_tokens), style=style,
        progress=getattr(args, "progress", False) and shard[0] == 0, bounds=not getattr(args, "ignore_bounds", False),
        scoring=getattr(args, "scoring", "generate"), records=getattr(args, "records", None), shard=shard))
    if parts is None:
        return 0  # the first process prints the merged result
    result = parts[0] if len(parts) == 1 else merge_results(parts, bench.items, style)
    result.extra["scoring"] = getattr(args, "scoring", "generate")
    result.missing = bench.missing + result.missing
    if bench.open_ended:  # MMVU: reported apart from the multiple-choice accuracy
        result.extra["open_ended"] = evaluate_open(lmm, bench.open_ended)
    result.extra.update({"format": bench.format, "average": bench.average, "notes": bench.notes})
    if getattr(args, "json", False):
        payload = result.to_json()
        payload["sampling"] = lmm.sampling.describe()
        print(json.dumps(payload))
    else:
        print(result.to_markdown())
    return 0


__all__ = ["add_eval_arguments", "distributed_shard", "load_eval_items", "run_eval_cli", "run_sharded"]
