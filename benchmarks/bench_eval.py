"""Evaluation throughput: questions per second of `eval` and of a Figure-5 zeroing curve, against re-reading the
video for every question, and the speedup of two processes (`accelerate launch`) over one.

    python benchmarks/bench_eval.py [--model M] [--data assets/heldout/eval_mc.json] [--limit 400] [--json OUT]

- eval: `vidlmm.evaluate.evaluate` (each video decoded and encoded once, its questions reuse the features)
  against the same questions each with its own decode + encode (the reference's loop), in this process, the
  feature cache off in both; the answers must be identical.
- zeroing: `zeroing_mc_curve` (each video read once, every level and seed reuses its connector output) against
  re-reading the video for every question and level, on the first `--zeroing-limit` questions.
- processes: `python -m vidlmm eval` as a command, one process against `accelerate launch` with two CPU processes
  (train/configs/cpu_2proc.yaml; one thread each, the machine's cores split between them); the merged result
  must equal the one process's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import ROOT, Report, free_port, resolve_model

HELDOUT = os.path.join(ROOT, "assets", "heldout", "eval_mc.json")


def in_process(model_dir: str, data: str, limit: int, zeroing_limit: int, report) -> dict:
    from vidlmm.analysis import query_group_spans, zero_mask, zeroed_output, zeroing_mc_curve
    from vidlmm.benchmarks import load_benchmark
    from vidlmm.checkpoint import load_model
    from vidlmm.evaluate import build_mc_question, evaluate, parse_choice
    from vidlmm.pipeline import GenerationSettings, VideoLMM

    items = load_benchmark(data).items[:limit]
    lmm = VideoLMM(load_model(model_dir), cache_bytes=0)
    generation = GenerationSettings(max_new_tokens=16)
    videos = len({item.video for item in items})
    start = time.perf_counter()
    grouped = evaluate(lmm, items, generation=generation)
    grouped_s = time.perf_counter() - start
    start = time.perf_counter()
    replies = []
    for item in items:  # the reference's loop: every question reads and encodes its video again
        prepared, _ = lmm.prepare(item.video)
        replies.append(lmm.ask(prepared, build_mc_question(item), generation=generation).text)
    each_s = time.perf_counter() - start
    assert replies == [r.response for r in grouped.items], "the two loops answered differently"
    report(f"eval: {len(items)} questions on {videos} videos; {len(items) / grouped_s:.2f} q/s grouped by video "
           f"against {len(items) / each_s:.2f} q/s re-reading per question: {each_s / grouped_s:.2f}x")

    sub = items[:zeroing_limit]
    fractions, strategies, seeds = (0.25, 0.5, 1.0), ("random",), (0,)
    start = time.perf_counter()
    curve = zeroing_mc_curve(lmm, sub, fractions=fractions, strategies=strategies, seeds=seeds)
    curve_s = time.perf_counter() - start
    start = time.perf_counter()
    answers = []
    for item in sub:  # re-read per question and level
        for fraction in fractions:
            prepared, _ = lmm.prepare(item.video)
            out = lmm.visual_tokens(prepared)
            mask = zero_mask(int(out.tokens.shape[1]), fraction, "random", seed=0,
                             group_spans=query_group_spans(out.query_groups.cpu().numpy()))
            answer = lmm.ask(prepared, build_mc_question(item), generation=generation,
                             visual=zeroed_output(out, mask).tokens[0])
            answers.append(parse_choice(answer.text, item.options, item.letters))
    each_curve_s = time.perf_counter() - start
    points = len(sub) * len(fractions)
    report(f"zeroing: {len(sub)} questions x {len(fractions)} levels; {points / curve_s:.2f} points/s reusing each "
           f"video's features against {points / each_curve_s:.2f} re-reading: {each_curve_s / curve_s:.2f}x")
    return {"questions": len(items), "videos": videos, "eval_grouped_s": grouped_s, "eval_each_s": each_s,
            "zeroing_questions": len(sub), "zeroing_points": points, "zeroing_s": curve_s,
            "zeroing_each_s": each_curve_s, "accuracy": grouped.accuracy,
            "zeroing_full_accuracy": curve.reference["accuracy"]}


def processes(model_dir: str, data: str, limit: int, report) -> dict:
    args = ["-m", "vidlmm", "eval", "--model", model_dir, "--data", data, "--limit", str(limit), "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    one = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    one_s = time.perf_counter() - start
    port = free_port()
    threads = max(1, (os.cpu_count() or 2) // 2)
    start = time.perf_counter()
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          "train/configs/cpu_2proc.yaml", "--main_process_port", str(port), *args], cwd=ROOT,
                         capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": str(threads)})
    two_s = time.perf_counter() - start
    if one.returncode or two.returncode:
        sys.exit((one.stderr + two.stderr)[-3000:])
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    same = [r["response"] for r in a["items"]] == [r["response"] for r in b["items"]]
    report(f"processes: `eval` on {limit} questions, whole command: 1 process {one_s:.1f} s, 2 processes "
           f"({threads} thread(s) each) {two_s:.1f} s: {one_s / two_s:.2f}x; same answers: {same}")
    return {"one_process_s": one_s, "two_processes_s": two_s, "same_answers": same, "threads_each": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the embedded group model)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint (smoke test)")
    parser.add_argument("--data", default=HELDOUT, help="benchmark root or file (default: the held-out set)")
    parser.add_argument("--limit", type=int, default=400, help="questions for eval (default 400)")
    parser.add_argument("--zeroing-limit", type=int, default=100, help="questions for the zeroing curve (default 100)")
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--md", metavar="OUT")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = Report()
        model, why = resolve_model(args, tmp)
        report(f"model: {os.path.basename(model.rstrip('/'))} ({why}); data: {os.path.basename(args.data)}")
        results = {"model": model, **in_process(model, args.data, args.limit, args.zeroing_limit, report),
                   **processes(model, args.data, args.limit, report)}
        report.save(args.md, args.json, results)


if __name__ == "__main__":
    main()
