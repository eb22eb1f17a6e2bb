"""Stage-2 fine-tuning cost: full fine-tuning of the language model, LoRA and QLoRA (4-bit base), each in its own
process, on the same batches of the held-out questions, with the trainer's own pieces (build_model,
apply_tuning, TrainingStep, AdamW groups, clipping).

    python benchmarks/bench_finetune.py [--model M] [--steps 6] [--batch 4] [--json OUT] [--md OUT]

Per mode: trainable parameters, the bytes of the LLM's weights as stored (4-bit: packed) and of the gradients
and AdamW moments of what trains (counted from the tensors), the training step's median time (forward + backward + AdamW over a batch; the
first step, which allocates the optimizer state, is left out), the process's resident memory with the model
loaded and its peak over the steps (VmHWM), and the growth the steps add over the loaded model (gradients,
AdamW's two moments, activations). Ratios are against full fine-tuning measured in the same invocation. The
recipes are train/configs/toy_stage2.yaml and toy_stage2_lora.yaml (QLoRA: lora.quantize_base=4bit), with the
tower frozen and the connector trained in every mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, Report, reset_peak_rss, resolve_model, self_rss_mb

MODES = {"full": ("toy_stage2.yaml", []), "lora": ("toy_stage2_lora.yaml", []),
         "qlora": ("toy_stage2_lora.yaml", ["lora.quantize_base=4bit"])}
HELDOUT = os.path.join(ROOT, "assets", "heldout")


def write_annotations(folder: str, count: int) -> str:
    """The first `count` held-out questions as stage-2 conversations (question + options -> the right option)."""
    items = json.load(open(os.path.join(HELDOUT, "eval_mc.json")))[:count]
    samples = [{"id": it["id"], "video": it["video"], "conversations": [
        {"from": "human", "value": "<image>\n" + it["question"] + "\n" + "\n".join(it["options"])},
        {"from": "gpt", "value": next(o for o in it["options"] if o.startswith(it["answer"] + "."))}]}
        for it in items]
    path = os.path.join(folder, "qa.json")
    with open(path, "w") as fh:
        json.dump(samples, fh)
    return path


def child(mode: str, model: str, steps: int, batch: int, tmp: str) -> dict:
    import torch

    from train.recipe import load_recipe
    from train.trainer import TrainingStep, _dataset, apply_tuning, build_model, optimizer_groups
    from train.data import collate

    config, overrides = MODES[mode]
    recipe = load_recipe(os.path.join(ROOT, "train", "configs", config),
                         [*overrides, f"init={model}", f"per_device_batch_size={batch}", f"global_batch_size={batch}",
                          f"annotations=[{write_annotations(tmp, batch)}]", f"video_roots=[{HELDOUT}]",
                          "feature_cache_mb=0", "decode_time_limit_s=0"])
    torch.manual_seed(0)
    model_ = build_model(recipe)
    trainable = apply_tuning(model_, recipe)
    dataset, _, _ = _dataset(model_, recipe)
    inputs = collate([dataset[i] for i in range(len(dataset))])
    step = TrainingStep(model_)
    optimizer = torch.optim.AdamW(optimizer_groups(model_, recipe.weight_decay), lr=recipe.learning_rate)
    params = [p for p in model_.parameters() if p.requires_grad]
    tensors = dict.fromkeys([*model_.parameters(), *model_.buffers()])
    weights_mb = sum(t.numel() * t.element_size() for t in tensors) / 2**20  # 4-bit: the packed bytes
    lm_weights_mb = sum(t.numel() * t.element_size() for t in dict.fromkeys(model_.language_model.parameters())) / 2**20
    # fp32 gradient + AdamW's two fp32 moments per trainable value
    optimizer_mb = sum(p.numel() for p in params) * 12 / 2**20
    loaded = self_rss_mb()["rss_mb"]
    reset_peak_rss()
    times, losses = [], []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = step(inputs["pixel_values"], inputs["input_ids"], inputs["labels"]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    peak = self_rss_mb()
    return {"mode": mode, "trainable": trainable, "trainable_total": sum(trainable.values()),
            "weights_mb": weights_mb, "lm_weights_mb": lm_weights_mb, "grads_adamw_mb": optimizer_mb,
            "step_s": statistics.median(times[1:]), "first_step_s": times[0], "rss_loaded_mb": loaded,
            "peak_rss_mb": peak.get("hwm_mb", peak["peak_rss_mb"]), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="stage-2 starting checkpoint (default: the embedded group model)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint (smoke test)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode (default 6)")
    parser.add_argument("--batch", type=int, default=4, help="samples per step (default 4)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--md", metavar="OUT")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.child:
            print(json.dumps(child(args.child, args.model, args.steps, args.batch, tmp)))
            return
        report = Report()
        model, why = resolve_model(args, tmp)
        report(f"model: {os.path.basename(model.rstrip('/'))} ({why}); {args.batch} held-out questions per step, "
               f"16 frames; median of {args.steps} steps after the first")
        results = {}
        for mode in MODES:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--model", model, "--steps",
                   str(args.steps), "--batch", str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        full = results["full"]
        rows = []
        for mode, r in results.items():
            growth = r["peak_rss_mb"] - r["rss_loaded_mb"]
            rows.append([mode, f"{r['trainable']['language_model']:,}", f"{r['trainable']['connector']:,}",
                         f"{r['lm_weights_mb']:.2f}", f"{r['grads_adamw_mb']:.2f}", f"{r['step_s'] * 1000:.0f} ms", f"{r['step_s'] / full['step_s']:.2f}x",
                         f"{r['rss_loaded_mb']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{growth:.0f}",
                         f"{growth / max(full['peak_rss_mb'] - full['rss_loaded_mb'], 1e-9):.2f}x",
                         f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"])
        report.table(["mode", "LLM trainable", "connector trainable", "LLM weights MiB", "grads + AdamW MiB",
                      "step", "vs full", "loaded MiB",
                      "peak MiB", "steps add MiB", "vs full", "loss"], rows)
        report.save(args.md, args.json, {"model": model, "batch": args.batch, "steps": args.steps, **results})


if __name__ == "__main__":
    main()
