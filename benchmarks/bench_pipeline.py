"""First answer and a follow-up question, end to end: vidlmm's pipeline vs. the reference's, per stage and peak RSS.

    python benchmarks/bench_pipeline.py [--model DIR | --tiny] [--video PATH] [--frames 16]
                                        [--max-new-tokens 32] [--json OUT] [--md OUT]

Without ``--video`` it writes a 30 s 854x480 30 fps clip (``bench_decode.make_clip``). Same checkpoint, same video,
same questions, greedy, same ``max_new_tokens``; each pipeline runs in its own child process, so its peak RSS
(``os.wait4``'s ru_maxrss of that child) is its own.

(a) ours: ``VideoLMM.ask`` (sampled decode, our processor, batched connector, sdpa, the checkpoint's dtype on
    CPU); the follow-up (the first question and answer as history) finds the vision features in the cache.
(b) reference: ``tests/reference_impl.py``'s pieces: decode EVERY frame to float32 then subsample, transformers'
    SigLIP processor, the tower, the per-group Python loop, spliced ``generate``; fp32 with eager attention
    (LLM and tower); the follow-up re-decodes and re-encodes the video.

Stages (seconds): decode, preprocess, vision, connector, prefill (up to the first token's logits), generation
(the remaining tokens) and tokens/s. Model loading is timed apart (both pay it once). Both must give the same
token ids for both questions; the script says so and exits 1 when they differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from common import ROOT, Report, add_model_video_args, machine, resolve_inputs, run_measured, \
    self_rss_mb

QUESTIONS = ("What happens in the video?", "What colour is the moving square?")
STAGES = ("decode", "preprocess", "vision", "connector", "prefill", "generation")


# ---- the two pipelines (run inside a child process) ------------------------------------------------------------

def run_ours(model_dir: str, video: str, frames: int, max_new_tokens: int) -> dict:
    from vidlmm.checkpoint import load_model
    from vidlmm.pipeline import GenerationSettings, VideoLMM
    from vidlmm.video import FrameSampling

    t0 = time.perf_counter()
    model = load_model(model_dir)
    load_s = time.perf_counter() - t0
    after_load = self_rss_mb()
    lmm = VideoLMM(model, sampling=FrameSampling.uniform(frames))
    generation = GenerationSettings(max_new_tokens=max_new_tokens)
    answers, history = [], []
    for question in QUESTIONS:
        start = time.perf_counter()
        answer = lmm.ask(video, question, history=history, generation=generation)
        total = time.perf_counter() - start
        answers.append({"question": question, "text": answer.text, "token_ids": answer.token_ids,
                        "cached_video": answer.cached_video, "end_to_end": total,
                        **{k: float(v) for k, v in answer.timings.items()}})
        history = [*history, (question, answer.text)]
    tower = model.vision_tower._vision_tower
    attn = f"{model.language_model.config._attn_implementation} (tower {tower.config._attn_implementation})"
    return {"load_s": load_s, "rss_after_load_mb": after_load.get("rss_mb"), "dtype": str(model.dtype),
            "attn": attn, "answers": answers}


def reference_prompt_ids(history: list[tuple[str, str]], question: str, tokenizer) -> list[int]:
    """The reference's qwen2_base prompt with earlier turns, the video in the first user turn; -200 marks it."""
    from tests.reference_impl import SYSTEM

    turns = [*history, (question, None)]
    prompt = SYSTEM
    for i, (q, a) in enumerate(turns):
        prompt += "USER: " + ("<image>\n" if i == 0 else "") + q.strip() + " "
        prompt += "ASSISTANT:" if a is None else "ASSISTANT: " + a + "<|endoftext|>"
    chunks = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in prompt.split("<image>")]
    return chunks[0] + [-200] + chunks[1]


def run_reference(model_dir: str, video: str, frames: int, max_new_tokens: int) -> dict:
    import torch
    from transformers import LogitsProcessorList

    from tests.reference_impl import connector_state, ref_frames, ref_group, ref_naive, ref_pixels
    from vidlmm.checkpoint import load_model
    from vidlmm.pipeline import StepClock  # the same prefill / generation split as ours

    t0 = time.perf_counter()
    model = load_model(model_dir, dtype=torch.float32, device="cpu", attn_implementation="eager")
    tower = model.vision_tower._vision_tower
    tower.config._attn_implementation = "eager"  # the reference's transformers ran SigLIP with eager attention
    sd = connector_state(model)
    load_s = time.perf_counter() - t0
    after_load = self_rss_mb()
    cfg = model.config
    eos = cfg.text_config["eos_token_id"]
    embed = model.language_model.get_input_embeddings()
    answers, history = [], []
    for question in QUESTIONS:
        times = {}
        start = time.perf_counter()
        frames_f32, _ = ref_frames(video, frames)
        t1 = time.perf_counter()
        pixels = ref_pixels(frames_f32, tower.config.image_size)
        del frames_f32
        t2 = time.perf_counter()
        with torch.no_grad():
            hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
            feats = hidden[-2][:, 1:]
            del hidden
            t3 = time.perf_counter()
            x = feats.reshape(1, -1, feats.shape[-1])
            visual = ref_group(sd, x, cfg.group) if cfg.connector_type == "groupresampler" else ref_naive(sd, x)
            t4 = time.perf_counter()
            ids = reference_prompt_ids(history, question, model.tokenizer)
            cut = ids.index(-200)
            embeds = torch.cat([embed(torch.tensor(ids[:cut])), visual[0], embed(torch.tensor(ids[cut + 1:]))])
            clock = StepClock()
            g0 = time.perf_counter()
            out = model.language_model.generate(
                inputs_embeds=embeds.unsqueeze(0), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                pad_token_id=eos, use_cache=True, temperature=None, top_p=None, top_k=None,
                logits_processor=LogitsProcessorList([clock]))
            g1 = time.perf_counter()
        token_ids = out[0].tolist()
        first = clock.stamps[0] if clock.stamps else g1
        times.update(decode=t1 - start, preprocess=t2 - t1, vision=t3 - t2, connector=t4 - t3, prefill=first - g0,
                     generation=g1 - first)
        times["tokens_per_s"] = (len(token_ids) - 1) / times["generation"] if times["generation"] > 0 else 0.0
        text = model.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
        text = text[: -len("<|endoftext|>")].strip() if text.endswith("<|endoftext|>") else text
        answers.append({"question": question, "text": text, "token_ids": token_ids, "cached_video": False,
                        "end_to_end": g1 - start, **times})
        history = [*history, (question, text)]
    attn = f"{model.language_model.config._attn_implementation} (tower {tower.config._attn_implementation})"
    return {"load_s": load_s, "rss_after_load_mb": after_load.get("rss_mb"), "dtype": str(model.dtype),
            "attn": attn, "answers": answers}


def child_main(args) -> int:
    sys.path.insert(0, ROOT)
    run = run_ours if args.child == "ours" else run_reference
    result = run(args.model, args.video, args.frames, args.max_new_tokens)
    result["self_rss"] = self_rss_mb()
    with open(args.child_out, "w") as fh:
        json.dump(result, fh)
    return 0


# ---- the parent: run both, compare, report ---------------------------------------------------------------------

def run_child(which: str, model: str, video: str, args, tmp: str) -> dict:
    out = os.path.join(tmp, f"{which}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--child-out", out, "--model", model,
           "--video", video, "--frames", str(args.frames), "--max-new-tokens", str(args.max_new_tokens)]
    code, wall, peak = run_measured(cmd, cwd=ROOT)
    if code != 0:
        raise SystemExit(f"the {which} pipeline failed (exit {code})")
    with open(out) as fh:
        result = json.load(fh)
    result.update(peak_rss_mb=peak, process_wall_s=wall)
    return result


def fmt(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_video_args(parser)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--child", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)

    report = Report()
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        model, video, chosen = resolve_inputs(args, tmp, report)
        report(f"{args.frames} uniform frames, greedy, max_new_tokens {args.max_new_tokens}, "
               f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        ours = run_child("ours", model, video, args, tmp)
        print("ours done", flush=True)
        ref = run_child("reference", model, video, args, tmp)
        print("reference done", flush=True)

    report()
    report(f"ours: {ours['dtype']}, {ours['attn']} attention, batched connector; "
           f"reference: {ref['dtype']}, {ref['attn']} attention, per-group loop")
    report()
    header = ["stage (s)", "ours: first", "reference: first", "ours: follow-up", "reference: follow-up"]
    rows = []
    for stage in (*STAGES, "end_to_end"):
        rows.append([stage.replace("_", " ")] + [fmt(r["answers"][i][stage]) for i in (0, 1) for r in (ours, ref)])
    rows.append(["tokens/s"] + [f"{r['answers'][i]['tokens_per_s']:.1f}" for i in (0, 1) for r in (ours, ref)])
    rows.append(["new tokens"] + [str(len(r["answers"][i]["token_ids"])) for i in (0, 1) for r in (ours, ref)])
    report.table(header, rows)
    report()
    report.table(["pipeline", "model load (s)", "RSS after load (MiB)", "peak RSS (MiB)"],
                 [[name, f"{r['load_s']:.2f}", f"{r['rss_after_load_mb']:.0f}", f"{r['peak_rss_mb']:.0f}"]
                  for name, r in (("ours", ours), ("reference", ref))])

    first = ref["answers"][0]["end_to_end"] / ours["answers"][0]["end_to_end"]
    follow = ref["answers"][1]["end_to_end"] / ours["answers"][1]["end_to_end"]
    rss = ours["peak_rss_mb"] / ref["peak_rss_mb"]
    same = [ours["answers"][i]["token_ids"] == ref["answers"][i]["token_ids"] for i in (0, 1)]
    report()
    report(f"first answer speedup: {first:.1f}x (goal >= 5x: {'met' if first >= 5 else 'NOT met'})")
    report(f"follow-up speedup: {follow:.1f}x (goal >= 10x: {'met' if follow >= 10 else 'NOT met'}; "
           f"ours cached the video: {ours['answers'][1]['cached_video']})")
    report(f"peak RSS ratio ours/reference: 1/{1 / rss:.1f} = {rss:.3f} "
           f"(goal <= 1/10: {'met' if rss <= 0.1 else 'NOT met'})")
    report(f"same token ids: first {'yes' if same[0] else 'NO'}, follow-up {'yes' if same[1] else 'NO'}")
    report(f"answers: {ours['answers'][0]['text']!r} / {ours['answers'][1]['text']!r}")
    report.save(args.md, args.json, {
        "model": model, **chosen, "frames": args.frames,
        "max_new_tokens": args.max_new_tokens, "machine": machine(), "ours": ours, "reference": ref,
        "first_answer_speedup": first, "follow_up_speedup": follow, "peak_rss_ratio": rss,
        "same_token_ids": all(same), "same_token_ids_per_question": same,
        "goals": {"first_answer_5x": first >= 5, "follow_up_10x": follow >= 10, "rss_tenth": rss <= 0.1}})
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
