"""Where a stage-2 step's time goes, per embedded model, and what asking a clip's questions as the turns of one
conversation saves (`build_embedded --mc-turns`).

    python benchmarks/bench_train_step.py [--model NAME=FOLDER ...] [--clips 32] [--steps 4] [--batch 8] [--md OUT]

Stage 2 as the rebuild runs it once its feature cache is warm (the frozen tower's features of every clip are read
from memory from the second epoch of stage 1 on): per step, the connector on each clip's cached features, the
spliced batch through the LM, the loss, backward and AdamW, with the trainer's own pieces (`train/configs/
toy_stage2.yaml`, `TrainingStep`, `_dataset`, `collate`). Samples: the held-out clips' two multiple-choice
questions (assets/heldout), answered with the right option's text as stage 2's multiple-choice records are.

Per model: the median step over `--steps` steps of `--batch` one-question samples, the share of it that the
connector's forward and backward take (timed alone on the same batch) and the LM's (forward + backward on the
same spliced inputs, the visual tokens held fixed); then the same clips with both questions as two turns of one
sample, in questions trained per second, and the ratio of the two in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from common import ROOT, Report

HELDOUT = os.path.join(ROOT, "assets", "heldout")
EMBEDDED = ("group", "naive", "image", "llava_mini", "pool", "tome", "topk")


def write_annotations(folder: str, clips: int, turns: bool) -> str:
    """The held-out questions of the first `clips` clips as stage-2 records: one question each, or (`turns`) one
    record per clip asking its questions in turn."""
    items = json.load(open(os.path.join(HELDOUT, "eval_mc.json")))
    by_clip: dict[str, list] = {}
    for it in items:
        if it["video"] in by_clip or len(by_clip) < clips:
            by_clip.setdefault(it["video"], []).append(it)

    def turn(it: dict, first: bool) -> list[dict]:
        question = ("<image>\n" if first else "") + it["question"] + "\n" + "\n".join(it["options"])
        answer = next(o for o in it["options"] if o.startswith(it["answer"] + ".")).split(". ", 1)[1]
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    if turns:
        records = [{"id": video, "video": video,
                    "conversations": [c for k, it in enumerate(qs) for c in turn(it, k == 0)]}
                   for video, qs in by_clip.items()]
    else:
        records = [{"id": it["id"], "video": video, "conversations": turn(it, True)}
                   for video, qs in by_clip.items() for it in qs]
    path = os.path.join(folder, f"{'turns' if turns else 'single'}.json")
    with open(path, "w") as fh:
        json.dump(records, fh)
    return path


def measure(model_dir: str, clips: int, steps: int, batch: int, tmp: str) -> dict:
    import torch

    from train.data import collate
    from train.recipe import load_recipe
    from train.trainer import TrainingStep, _dataset, apply_tuning, build_model, optimizer_groups

    def prepared(turns: bool):
        return load_recipe(os.path.join(ROOT, "train", "configs", "toy_stage2.yaml"),
                           [f"init={model_dir}", f"annotations=[{write_annotations(tmp, clips, turns)}]",
                            f"video_roots=[{HELDOUT}]", "decode_time_limit_s=0"])

    torch.manual_seed(0)
    recipe = prepared(False)
    model = build_model(recipe)
    apply_tuning(model, recipe)
    step = TrainingStep(model)
    optimizer = torch.optim.AdamW(optimizer_groups(model, recipe.weight_decay), lr=1e-6)

    def batches(recipe) -> list[dict]:
        dataset, _, cache = _dataset(model, recipe)
        with torch.no_grad():  # the warm cache: every clip's tower features, as from stage 1's second epoch on
            for i in range(len(dataset)):
                item = dataset[i]
                if item["features"] is None:
                    cache.put(item["cache_key"], model.vision_tower(item["pixel_values"]).cpu())
        items = [dataset[i] for i in range(len(dataset))]
        return [collate(items[k:k + batch]) for k in range(0, len(items) - batch + 1, batch)]

    def train_steps(bs: list[dict]) -> float:
        """The median step over `steps` steps after an untimed first."""
        times = []
        for b in (bs * (steps // len(bs) + 2))[:steps + 1]:
            start = time.perf_counter()
            loss = step(b["pixel_values"], b["input_ids"], b["labels"], b["features"]).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    single = batches(recipe)
    step_s = train_steps(single)
    b = single[0]
    # the parts on one batch: the connector alone, then the LM on the same spliced inputs
    parts = {"connector": [], "lm": []}
    for _ in range(steps):
        start = time.perf_counter()
        visual = [model.connect(f) for f in b["features"]]
        sum(v.tokens.sum() for v in visual).backward()
        parts["connector"].append(time.perf_counter() - start)
        model.zero_grad()
        fixed = [v.tokens[0].detach() for v in visual]
        start = time.perf_counter()
        embeds, mask, labels = model.build_inputs(b["input_ids"], fixed, b["labels"], padding_side="right")
        logits = model(embeds, mask).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
        parts["lm"].append(time.perf_counter() - start)
        model.zero_grad()
    turns = prepared(True)
    records = json.load(open(turns.annotations[0]))
    questions_per_sample = sum(len(r["conversations"]) // 2 for r in records) / len(records)
    turns_step_s = train_steps(batches(turns))
    return {"step_s": step_s, "connector_s": statistics.median(parts["connector"]),
            "lm_s": statistics.median(parts["lm"]), "questions_per_s": batch / step_s,
            "turns_step_s": turns_step_s, "turns_questions_per_s": batch * questions_per_sample / turns_step_s,
            "questions_per_turns_sample": questions_per_sample}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", metavar="NAME=FOLDER",
                        help="a stage-2 starting checkpoint (default: the seven embedded models)")
    parser.add_argument("--clips", type=int, default=32, help="held-out clips (two questions each; default 32)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setting, after one untimed (default 4)")
    parser.add_argument("--batch", type=int, default=8, help="samples per step (default 8, stage 2's per device)")
    parser.add_argument("--md", metavar="OUT")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    models = dict(m.split("=", 1) for m in args.model) if args.model else {
        name: os.path.join(ROOT, "assets", "models", name) for name in EMBEDDED}
    report = Report()
    report(f"stage 2, warm feature cache, {args.batch} samples per step, median of {args.steps} steps; "
           f"{args.clips} held-out clips")
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in models.items():
            r = results[name] = measure(folder, args.clips, args.steps, args.batch, tmp)
            rows.append([name, f"{r['step_s'] * 1000:.0f} ms", f"{r['connector_s'] * 1000:.0f} ms "
                         f"({r['connector_s'] / r['step_s']:.0%})", f"{r['lm_s'] * 1000:.0f} ms "
                         f"({r['lm_s'] / r['step_s']:.0%})", f"{r['questions_per_s']:.1f}",
                         f"{r['turns_questions_per_s']:.1f}",
                         f"**{r['turns_questions_per_s'] / r['questions_per_s']:.2f}x**"])
    report.table(["model", "step (one question per sample)", "connector fwd+bwd", "LM fwd+bwd",
                  "questions/s", f"questions/s, {results[name]['questions_per_turns_sample']:.0f} per sample as turns",
                  "turns / one per sample"], rows)
    report.save(args.md, args.json, {"batch": args.batch, "steps": args.steps, "clips": args.clips, **results})


if __name__ == "__main__":
    main()
