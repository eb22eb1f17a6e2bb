"""The cost of tracing where the language model looks (`llm_attention`) against an ordinary answer.

    python benchmarks/bench_llm_attention.py [--model DIR | --tiny] [--video PATH] [--frames 16]
                                             [--max-new-tokens 32] [--repeats 3] [--json OUT] [--md OUT]

Same model, prepared video (decoded and encoded once, as the app's cache holds it) and question; greedy answers.
(a) an ordinary answer: `VideoLMM.ask` (sdpa). (b) the whole-answer analysis: `llm_attention`, which answers the
same way, runs the connector with its attention, and makes one teacher-forced pass with eager attention whose
hooks keep only the answer's rows, reduced. Goal: (b) <= 2x (a). Peak RSS above the loaded model is measured for each
(the peak mark reset before each), and the bytes the analysis holds are given by the formula (`analysis_bytes`),
checked against the returned arrays here and worked out for the published 3B model at 16 frames.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from common import Report, add_model_video_args, reset_peak_rss, resolve_inputs, self_rss_mb

QUESTION = "What happens in the video?"
GOAL = 2.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_video_args(parser, seconds=8, size="320x240", fps=10)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from vidlmm.analysis.llm_attention import analysis_bytes, llm_attention
    from vidlmm.checkpoint import load_model
    from vidlmm.pipeline import GenerationSettings, VideoLMM
    from vidlmm.video import FrameSampling

    report = Report()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, video, inputs = resolve_inputs(args, tmp, report)
        lmm = VideoLMM(load_model(model_dir, dtype="fp32", device="cpu"),
                       sampling=FrameSampling.uniform(args.frames))
        prepared = lmm.prepare(video)[0]
        generation = GenerationSettings(max_new_tokens=args.max_new_tokens)
        answer = lmm.ask(prepared, QUESTION, generation=generation)  # warm-up of both paths
        result = llm_attention(lmm, prepared, QUESTION, max_new_tokens=args.max_new_tokens)
        # the same answer (the analysis leaves a closing end-of-sequence token untraced)
        assert result.token_ids == list(answer.token_ids)[:len(result.token_ids)] and result.answer == answer.text, \
            "the analysis must answer as the ordinary path does"

        def timed(fn):
            times, peaks = [], []
            for _ in range(args.repeats):
                base = self_rss_mb().get("rss_mb", 0.0)
                reset_peak_rss()
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
                peaks.append(self_rss_mb().get("hwm_mb", 0.0) - base)
            return statistics.median(times), max(peaks)

        ask_s, ask_mb = timed(lambda: lmm.ask(prepared, QUESTION, generation=generation))
        llm_s, llm_mb = timed(lambda: llm_attention(lmm, prepared, QUESTION, max_new_tokens=args.max_new_tokens))
    cfg = lmm.model.language_model.config
    q = int(result.sources.shape[0])
    prompt_text = len(lmm.prompt_ids(QUESTION)) - 1
    formula = analysis_bytes(cfg.num_hidden_layers, cfg.num_attention_heads, q, prompt_text, len(result.token_ids),
                             int(result.sources.shape[1]))
    held = result.visual.nbytes + result.shares.nbytes + result.sources.nbytes
    report(f"{args.frames} frames, {q} visual tokens, {prompt_text} prompt text tokens, answer of "
           f"{len(result.token_ids)} tokens (greedy, max {args.max_new_tokens}); median of {args.repeats}")
    report("")
    report.table(["", "seconds", "peak RSS above the loaded model (MiB)"],
                 [["ordinary answer (`VideoLMM.ask`)", f"{ask_s:.3f}", f"{ask_mb:.0f}"],
                  ["whole-answer analysis (`llm_attention`)", f"{llm_s:.3f}", f"{llm_mb:.0f}"]])
    ratio = llm_s / ask_s
    report("")
    report(f"analysis / answer: **{ratio:.2f}x** (goal <= {GOAL:g}x: {'met' if ratio <= GOAL else 'NOT met'})")
    report(f"arrays kept (attention and the connector's sources): {held / 2**20:.2f} MiB measured, "
           f"{(formula['kept'] + formula['sources']) / 2**20:.2f} MiB by the formula; one layer's eager attention "
           f"{formula['eager_layer'] / 2**20:.2f} MiB (S = {formula['sequence']})")
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_fullsize import full_config

    full = full_config()
    text = full.text_config
    patches = (full.vision_config["image_size"] // full.vision_config["patch_size"]) ** 2 - 1  # 728: patch strategy
    published = analysis_bytes(text["num_hidden_layers"], text["num_attention_heads"], full.num_queries,
                               prompt_text, 32, 16 * patches, dtype_bytes=2)
    report(f"published Group-16-512 at 16 frames (Qwen2.5-3B: {text['num_hidden_layers']} layers x "
           f"{text['num_attention_heads']} heads, {full.num_queries} visual tokens, {prompt_text} text tokens as "
           f"here, a 32-token answer, bf16): attention kept {published['kept'] / 2**20:.1f} MiB + sources "
           f"{published['sources'] / 2**20:.1f} MiB + one layer's eager attention "
           f"{published['eager_layer'] / 2**20:.1f} MiB at a time (S = {published['sequence']}): "
           f"{published['total'] / 2**20:.0f} MiB above answering")
    report.save(args.md, args.json, {"inputs": inputs, "answer_s": ask_s, "analysis_s": llm_s, "ratio": ratio,
                                     "kept_formula_bytes": formula["kept"] + formula["sources"],
                                     "answer_peak_mb": ask_mb, "analysis_peak_mb": llm_mb, "kept_bytes": held,
                                     "formula": formula, "published_formula": published})
    # the time goal is reported, not tested (timings vary by machine); the formula must match the arrays
    return 0 if held == formula["kept"] + formula["sources"] else 1


if __name__ == "__main__":
    sys.exit(main())
