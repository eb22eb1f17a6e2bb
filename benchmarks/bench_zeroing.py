"""The query-zeroing curve: `zeroing_curve` (encode once, score every mask) vs. recomputing every point from scratch.

    python benchmarks/bench_zeroing.py [--model DIR | --tiny] [--video PATH] [--frames 16]
                                       [--max-new-tokens 64] [--json OUT] [--md OUT]

Same checkpoint, video and question; 6 active fractions x 3 seeds x 4 strategies = 72 points.

(a) ours: ``vidlmm.analysis.zeroing_curve``: the video is decoded and encoded once, the connector runs once,
    the full model answers once, and each DISTINCT mask (deterministic strategies and 100 % repeat across seeds)
    costs one batched teacher-forced LLM pass that tells exactly whether the greedy answer would change.
(b) from scratch, what a user of the reference would run per point: the reference pipeline
    (``tests/reference_impl.py``: decode every frame to float32 and subsample, transformers' processor, tower,
    per-group loop; fp32, eager attention), zero the same tokens, regenerate greedily, compare with the full answer.

Checks: the 100 % points are the unmodified answer (ours: not changed and the teacher-forced pass reproduces the
answer; from scratch: the regenerated ids equal the full answer's ids). The agreement of the two methods on
"answer changed" over all points is shown too (near-ties in the logits can flip a point between eager and sdpa).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from common import Report, add_model_video_args, machine, resolve_inputs, self_rss_mb

QUESTION = "What happens in the video?"


def from_scratch(model_dir: str, video: str, frames: int, points: list[dict], spans, num_tokens: int,
                 max_new_tokens: int) -> tuple[list[list[int]], float]:
    """Every point through the whole reference pipeline; returns (generated ids per point, seconds)."""
    import torch

    from tests.reference_impl import connector_state, ref_frames, ref_group, ref_naive, ref_pixels, ref_prompt_ids
    from vidlmm.analysis import zero_mask
    from vidlmm.checkpoint import load_model

    model = load_model(model_dir, dtype=torch.float32, device="cpu", attn_implementation="eager")
    tower = model.vision_tower._vision_tower
    tower.config._attn_implementation = "eager"
    sd = connector_state(model)
    cfg = model.config
    eos = cfg.text_config["eos_token_id"]
    embed = model.language_model.get_input_embeddings()
    ids = ref_prompt_ids(QUESTION, model.tokenizer)
    cut = ids.index(-200)
    results = []
    start = time.perf_counter()
    for i, p in enumerate(points):
        frames_f32, _ = ref_frames(video, frames)
        pixels = ref_pixels(frames_f32, tower.config.image_size)
        del frames_f32
        with torch.no_grad():
            feats = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            x = feats.reshape(1, -1, feats.shape[-1])
            visual = ref_group(sd, x, cfg.group) if cfg.connector_type == "groupresampler" else ref_naive(sd, x)
            mask = zero_mask(num_tokens, p["fraction"], p["strategy"], seed=p["seed"], group_spans=spans)
            visual = visual[0] * torch.as_tensor(mask, dtype=visual.dtype)[:, None]
            embeds = torch.cat([embed(torch.tensor(ids[:cut])), visual, embed(torch.tensor(ids[cut + 1:]))])
            out = model.language_model.generate(
                inputs_embeds=embeds.unsqueeze(0), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                pad_token_id=eos, use_cache=True, temperature=None, top_p=None, top_k=None)
        results.append(out[0].tolist())
        if (i + 1) % 12 == 0:
            print(f"  from scratch: {i + 1}/{len(points)} points ({time.perf_counter() - start:.0f} s)", flush=True)
    return results, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_video_args(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from vidlmm.analysis import FRACTIONS, STRATEGIES, query_group_spans, zeroing_curve
    from vidlmm.checkpoint import load_model
    from vidlmm.pipeline import VideoLMM
    from vidlmm.video import FrameSampling

    seeds = (0, 1, 2)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="bench_zeroing_") as tmp:
        model_dir, video, chosen = resolve_inputs(args, tmp, report)
        report(f"{args.frames} uniform frames; {len(FRACTIONS)} fractions x {len(seeds)} seeds x "
               f"{len(STRATEGIES)} strategies; greedy, max_new_tokens {args.max_new_tokens}; question {QUESTION!r}")

        lmm = VideoLMM(load_model(model_dir), sampling=FrameSampling.uniform(args.frames))
        start = time.perf_counter()
        curve = zeroing_curve(lmm, video, QUESTION, fractions=FRACTIONS, strategies=STRATEGIES, seeds=seeds,
                              max_new_tokens=args.max_new_tokens)
        ours_s = time.perf_counter() - start
        print(f"  ours: {ours_s:.1f} s", flush=True)
        prepared, _ = lmm.prepare(video)
        spans = query_group_spans(lmm.visual_tokens(prepared).query_groups.cpu().numpy())
        scratch_ids, scratch_s = from_scratch(model_dir, video, args.frames, curve.points, spans, curve.num_tokens,
                                              args.max_new_tokens)

    full_ids = list(curve.reference["answer_token_ids"])
    points = curve.points
    full_points = [i for i, p in enumerate(points) if p["fraction"] == 1.0]
    ours_full_ok = all(points[i]["answer_changed"] == 0 for i in full_points) and \
        bool(curve.reference["teacher_forced_reproduces_answer"])
    scratch_full_ok = all(scratch_ids[i] == full_ids for i in full_points)
    scratch_changed = [float(ids != full_ids) for ids in scratch_ids]
    agree = sum(float(p["answer_changed"]) == c for p, c in zip(points, scratch_changed))
    masks = curve.reference["masks_evaluated"]

    report()
    report.table(["approach", "points", "video encodes", "LLM passes", "time (s)", "per point (s)"], [
        ["ours: zeroing_curve (encode once, distinct masks, teacher-forced)", len(points), 1,
         f"{masks} scored + 1 answer", f"{ours_s:.1f}", f"{ours_s / len(points):.3f}"],
        ["from scratch: reference pipeline + regenerate per point", len(points), len(points),
         f"{len(points)} generations", f"{scratch_s:.1f}", f"{scratch_s / len(points):.3f}"],
    ])
    ratio = scratch_s / ours_s
    report()
    report(f"speedup of the curve: {ratio:.1f}x")
    report()
    report("share of points whose greedy answer changes (ours: teacher-forced / from scratch: regenerated):")
    report()
    rows = []
    for strategy in STRATEGIES:
        row = [strategy]
        for fraction in FRACTIONS:
            idx = [i for i, p in enumerate(points) if p["strategy"] == strategy and p["fraction"] == fraction]
            a = sum(points[i]["answer_changed"] for i in idx) / len(idx)
            b = sum(scratch_changed[i] for i in idx) / len(idx)
            row.append(f"{a:.2f} / {b:.2f}")
        rows.append(row)
    report.table(["strategy"] + [f"{f:g}" for f in FRACTIONS], rows)
    report()
    report(f"100 % point equals the unmodified answer: ours {'yes' if ours_full_ok else 'NO'}, "
           f"from scratch {'yes' if scratch_full_ok else 'NO'}")
    report(f"the two methods agree on 'answer changed' at {agree}/{len(points)} points")
    report(f"full answer: {curve.reference['answer']!r} ({len(full_ids)} tokens)")
    ok = ours_full_ok and scratch_full_ok
    report.save(args.md, args.json, {
        "model": model_dir, **chosen, "frames": args.frames,
        "question": QUESTION, "max_new_tokens": args.max_new_tokens, "machine": machine(),
        "ours_s": ours_s, "from_scratch_s": scratch_s, "speedup": ratio, "points": len(points),
        "masks_evaluated": masks, "full_point_equals_answer": ok, "ours_full_point_ok": ours_full_ok,
        "from_scratch_full_point_ok": scratch_full_ok, "agreement": agree, "full_answer_ids": full_ids,
        "curve": curve.to_json(), "from_scratch_changed": scratch_changed, "peak_rss": self_rss_mb()})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
