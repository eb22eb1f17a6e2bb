"""Group resampler: our batched masked pass vs. the reference's per-group Python loop, same weights and inputs.

    python benchmarks/bench_connectors.py [--frames 16 64] [--json OUT] [--full-width] [--repeats 5]

(a) batched: ``GroupResampler.forward`` (vidlmm/connectors.py): the `group` chunks of the flat T*P token
    sequence go through the Perceiver layers as a batch of G sequences (padded + masked when uneven); on CPU
    in slices of about 16 MB of key/value activations (see `cpu_slice_bytes`).
(b) loop: what the reference's ``groupresampler.py`` does: project with ``linear``, ``torch.split`` the tokens
    by ``group_sizes``, run the same Perceiver layers (``module.resample(chunk)``) once per chunk, concatenate,
    add the sinusoidal position encoding to the outputs.
(c) naive: a ``NaiveResampler`` of the same width (512 queries over all T*P tokens, PE on the inputs), for scale.

Shapes follow the released models: SigLIP-so400m at 384 px gives 729 patches, 728 kept per frame (Dv = 1152);
512 queries in 16 groups; 3 Perceiver layers of 8 heads x 64. The LLM width D is 512 by default so the run fits
2 CPU cores in about a minute; ``--full-width`` uses the released D = 2048 (Qwen2.5-3B). fp32, no_grad, a
warm-up call, then the median of several timed calls. Both paths must give the same tokens (max |diff| shown).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vidlmm.connectors import (GroupResampler, NaiveResampler, group_sizes,  # noqa: E402
                               sinusoidal_position_encoding)


def loop_forward(module: GroupResampler, x: torch.Tensor) -> torch.Tensor:
    """The reference's per-group loop on `module`'s own weights: x [B, T, P, Dv] -> tokens [B, G*L, D]."""
    b, t, p, _ = x.shape
    h = module.linear(x.reshape(b, t * p, -1))
    chunks = torch.split(h, group_sizes(t * p, module.group), dim=1)
    tokens = torch.cat([module.resample(chunk)[0] for chunk in chunks], dim=1)
    return tokens + sinusoidal_position_encoding(tokens.shape[1], module.hidden_size, dtype=tokens.dtype,
                                                 device=tokens.device)


def time_call(fn, warmup: int, repeats: int) -> dict:
    """Median wall time (ms) over `repeats` calls after `warmup` calls, plus the kernel's share per call:
    minor page faults and system CPU time (fresh memory that the kernel must map and zero)."""
    for _ in range(warmup):
        fn()
    times = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"ms": statistics.median(times), "all_ms": times,
            "minor_faults": (r1.ru_minflt - r0.ru_minflt) / repeats,
            "sys_s": (r1.ru_stime - r0.ru_stime) / repeats, "user_s": (r1.ru_utime - r0.ru_utime) / repeats}


def bench(frames: int, args, group_module: GroupResampler, naive_module: NaiveResampler | None) -> dict:
    gen = torch.Generator().manual_seed(frames)
    x = torch.randn(1, frames, args.tokens_per_frame, args.vision_width, generator=gen)
    sizes = group_sizes(frames * args.tokens_per_frame, args.groups)
    with torch.no_grad():
        batched_out = group_module(x).tokens
        loop_out = loop_forward(group_module, x)
        diff = (batched_out - loop_out).abs().max().item()
        scale = loop_out.abs().max().item()
        batched = time_call(lambda: group_module(x), args.warmup, args.repeats)
        loop = time_call(lambda: loop_forward(group_module, x), args.warmup, args.repeats)
        group_module.cpu_slice_bytes = 1 << 62  # every group in a single pass: what the GPU path does
        one_pass = time_call(lambda: group_module(x), args.warmup, args.repeats)
        del group_module.cpu_slice_bytes  # back to the class default
        naive = None
        if naive_module is not None:
            naive = time_call(lambda: naive_module(x), args.warmup, max(1, args.repeats // 2))
    return {"frames": frames, "tokens": frames * args.tokens_per_frame, "chunk_sizes": sorted(set(sizes)),
            "batched_ms": batched["ms"], "loop_ms": loop["ms"], "speedup": loop["ms"] / batched["ms"],
            "one_pass_ms": one_pass["ms"],
            "naive_ms": naive["ms"] if naive else None, "max_abs_diff": diff, "max_abs_output": scale,
            "output_shape": list(batched_out.shape), "detail": {"batched": batched, "loop": loop, "one_pass": one_pass,
                                                          "naive": naive}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    parser.add_argument("--full-width", action="store_true", help="D = 2048 (Qwen2.5-3B) instead of 512")
    parser.add_argument("--width", type=int, help="LLM width D (overrides --full-width)")
    parser.add_argument("--vision-width", type=int, default=1152)
    parser.add_argument("--tokens-per-frame", type=int, default=728)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-naive", action="store_true", help="skip the naive resampler")
    args = parser.parse_args(argv)
    width = args.width or (2048 if args.full_width else 512)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    group_module = GroupResampler(vision_hidden_size=args.vision_width, hidden_size=width,
                                  num_queries=args.queries, group=args.groups,
                                  num_resampler_layers=args.layers).eval()
    naive_module = None if args.no_naive else NaiveResampler(
        vision_hidden_size=args.vision_width, hidden_size=width, num_queries=args.queries,
        num_resampler_layers=args.layers).eval()
    from common import machine, machine_line

    print(machine_line())
    print(f"GroupResampler D={width} Dv={args.vision_width} queries={args.queries} groups={args.groups} "
          f"layers={args.layers}, {args.tokens_per_frame} tokens/frame, fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} after {args.warmup} warm-up")
    results = []
    for frames in args.frames:
        r = bench(frames, args, group_module, naive_module)
        results.append(r)
        print(f"  {frames} frames done: batched {r['batched_ms']:.0f} ms, loop {r['loop_ms']:.0f} ms, "
              f"max |diff| {r['max_abs_diff']:.2e}", flush=True)
    print()
    print("| frames | tokens | chunk sizes | ours (ms) | per-group loop (ms) | speedup | all groups in one pass (ms) "
          "| naive (ms) | max abs diff |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        naive = f"{r['naive_ms']:.0f}" if r["naive_ms"] is not None else "-"
        print(f"| {r['frames']} | {r['tokens']} | {'/'.join(map(str, r['chunk_sizes']))} | {r['batched_ms']:.0f} "
              f"| {r['loop_ms']:.0f} | {r['speedup']:.2f}x | {r['one_pass_ms']:.0f} | {naive} "
              f"| {r['max_abs_diff']:.1e} |")
    print("\nper call, kernel side (fresh memory the kernel maps and zeroes; one pass materialises G x larger"
          " intermediates):")
    print("| frames | path | minor faults | sys s | user s |")
    print("|---:|---|---:|---:|---:|")
    for r in results:
        for path in ("batched", "one_pass", "loop"):
            d = r["detail"][path]
            print(f"| {r['frames']} | {path} | {d['minor_faults']:.0f} | {d['sys_s']:.2f} | {d['user_s']:.2f} |")
    worst = max(r["max_abs_diff"] / max(r["max_abs_output"], 1e-12) for r in results)
    ok = worst < 1e-4
    print(f"\noutputs match: {'yes' if ok else 'NO'} (worst max |diff| / max |output| = {worst:.1e})")
    if args.json:
        meta = {"width": width, "vision_width": args.vision_width, "queries": args.queries, "groups": args.groups,
                "layers": args.layers, "tokens_per_frame": args.tokens_per_frame, "threads": torch.get_num_threads(),
                "repeats": args.repeats, "torch": torch.__version__, "machine": platform.machine(),
                "cpu_count": os.cpu_count(), "cpu": machine()["cpu"]}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"config": meta, "results": results, "outputs_match": ok}, fh, indent=2)
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
