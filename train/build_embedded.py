"""Rebuild the embedded models from scratch: world -> stage 0 -> stage 1 + 2 per connector -> eval -> assets/.

    python -m train.build_embedded [--out assets/models] [--work runs/embedded] [--seed 0] [--smoke]

Everything runs through the same code as the A100 recipe (`train/trainer.py` with `train/configs/toy_stage*.yaml`),
deterministic given the seed. The held-out multiple-choice set is scored with `vidlmm.evaluate` and the table is
written to `<out>/results.md` and `<out>/results.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .recipe import load_recipe

CONNECTORS = {
    "group": {"connector_type": "groupresampler", "num_queries": 64, "group": 16},
    "naive": {"connector_type": "naiveresampler", "num_queries": 64, "group": None},
    "image": {"connector_type": "resampler", "num_queries": 4, "group": None},  # 4 per frame x 16 frames
    # the related work's compressors, at the same 64 visual tokens (4 per frame x 16 frames). LLaVA-Mini's query
    # compression alone: with its pre-fusion layer (`llava_mini_fusion`) the toy model missed the held-out goal
    # (README, "LLaVA-Mini's pre-fusion at toy scale")
    "llava_mini": {"connector_type": "llava_mini", "num_queries": 4, "group": None,
                   "connector_options": {"prefusion_layers": 0}},
    # Dynamic-VLM's random tokens per frame in training, drawn from [4, P] and capped by 144 // frames: 9 (3 x 3)
    # per frame at 16 frames, bins that hold one cell of the world's 3 x 3 layout each. Served at 4 per frame
    # like the others; trained at 4 per frame (2 x 2 bins cut the centre cell in four) it missed the held-out
    # goal (README, "Pool")
    "pool": {"connector_type": "pool", "group": None,
             "connector_options": {"token_budget": 64, "train_token_budget": 144, "min_frame_tokens": 4}},
    "tome": {"connector_type": "tome", "group": None, "connector_options": {"token_budget": 64}},
    "topk": {"connector_type": "topk", "group": None, "connector_options": {"token_budget": 64}},
}
# not shipped (the default --connectors are SHIPPED): the same LLaVA-Mini with one pre-fusion layer
CONNECTORS["llava_mini_fusion"] = {**CONNECTORS["llava_mini"], "connector_options": {"prefusion_layers": 1}}
SHIPPED = ("group", "naive", "image", "llava_mini", "pool", "tome", "topk")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _overrides(spec: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if v is not None else 'null'}" for k, v in spec.items()]


def ship_heldout(world: Path, dest: Path, examples: int = 3) -> None:
    """The held-out multiple-choice set with its clips (about 1 MB), so the app's held-out redundancy curve and
    `vidlmm eval` work offline; the first clips also join the app's example gallery."""
    items = json.loads((world / "eval_mc.json").read_text())
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "videos").mkdir(parents=True)
    videos = list(dict.fromkeys(item["video"] for item in items))
    for rel in videos:
        shutil.copy2(world / rel, dest / rel)
    (dest / "eval_mc.json").write_text(json.dumps(items, indent=1))
    gallery = dest.parent / "examples"
    gallery.mkdir(exist_ok=True)
    for rel in videos[:examples]:
        shutil.copy2(world / rel, gallery / f"world_{Path(rel).name}")


def build(out: Path, work: Path, *, seed: int = 0, smoke: bool = False, connectors=SHIPPED,
          progress: bool = True, heldout: Path | None = None, single_object_qa: bool = False) -> dict:
    from vidlmm.checkpoint import load_model
    from vidlmm.evaluate import evaluate, load_mc_items
    from vidlmm.pipeline import VideoLMM

    from .stage0 import run_stage0, write_mc_annotations, write_single_object_annotations
    from .trainer import run
    from .world import WorldConfig, generate_world

    # each finished phase is recorded with its own wall time in <work>/build_state.json: a killed rebuild
    # resumes at the first unfinished phase (training phases resume from their own checkpoints), and the
    # reported total is the sum of the phases' measured times
    state_file = work / "build_state.json"
    key = {"seed": seed, "smoke": smoke}
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("key") != key:
        state = {"key": key, "phases": {}}
    work.mkdir(parents=True, exist_ok=True)

    def save_state() -> None:
        state_file.write_text(json.dumps(state, indent=1))

    def phase(name: str, fn):
        if name in state["phases"]:
            if progress:
                print(f"{name}: done in an earlier run ({state['phases'][name]:.0f} s)", file=sys.stderr)
            return
        t = time.perf_counter()
        fn()
        state["phases"][name] = time.perf_counter() - t
        save_state()

    # a run over some connectors keeps the table rows of the others (same seed and budget) already in `out`
    results = _earlier_results(out, key)
    world = work / "world"
    sizes = dict(num_train=24, num_eval=8) if smoke else dict(num_train=4000, num_eval=200)
    phase("world", lambda: generate_world(world, WorldConfig(seed=seed, **sizes), workers=os.cpu_count() or 1,
                                          progress=progress))
    phase("stage0", lambda: run_stage0(world, work / "stage0", budget="smoke" if smoke else "full", seed=seed,
                                       progress=progress))
    mc_train = write_mc_annotations(world, world / "mc_train.json", seed=seed, per_clip=1)
    stage2_data = [str(world / "qa.json"), str(mc_train)]
    if single_object_qa:
        stage2_data.append(str(write_single_object_annotations(world, world / "single_train.json", seed=seed)))
    variant = _variant(single_object_qa)  # stage 1 is shared; stage 2 and its phase are separate
    common = [f"seed={seed}", f"video_roots=[{json.dumps(str(world))}]"]
    if smoke:
        common += ["epochs=1", "global_batch_size=8", "per_device_batch_size=4"]
    items = load_mc_items(world / "eval_mc.json")
    for name in connectors:
        spec = CONNECTORS[name]
        stage1 = load_recipe("toy_stage1.yaml", [*common, *_overrides(spec), f"name={name}-stage1",
                                                 f"llm={work / 'stage0' / 'llm'}", f"vision_tower={work / 'stage0' / 'vision'}",
                                                 f"annotations=[{json.dumps(str(world / 'captions.json'))}]",
                                                 f"output_dir={work / name / 'stage1'}"])
        stage1_out = Path(stage1.output_dir) / "model"
        stage2 = load_recipe("toy_stage2.yaml", [*common, f"name={name}-stage2", f"init={stage1_out}",
                                                 f"annotations={json.dumps(stage2_data)}",
                                                 f"output_dir={work / name / ('stage2' + variant)}"])
        model_dir = Path(stage2.output_dir) / "model"
        phase(f"train_{name}{variant}", lambda: (run(stage1, progress=progress), run(stage2, progress=progress)))
        t = time.perf_counter()
        model = load_model(model_dir)
        result = evaluate(VideoLMM(model), items)
        state["phases"][f"eval_{name}{variant}"] = time.perf_counter() - t
        save_state()  # so the last eval's time survives the run too
        results[name] = {**result.to_json(), "single_object_qa": single_object_qa,
                         "visual_tokens": visual_tokens(model)}
        target = out / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for file in MODEL_FILES:
            if (model_dir / file).is_file():
                shutil.copy2(model_dir / file, target / file)
        _write_results(out, state, seed, smoke, results)  # after every model: a partial table survives
    if heldout is not None:
        ship_heldout(world, heldout)
    return _write_results(out, state, seed, smoke, results)


def visual_tokens(model) -> int:
    """Visual tokens the model's LLM reads per clip at its own frame sampling."""
    from vidlmm.pipeline import default_sampling

    return model.num_visual_tokens(default_sampling(model).max_frames_taken())


def _variant(single_object_qa: bool) -> str:
    """The suffix of a stage-2 variant's phase names and work folder."""
    return "+single" if single_object_qa else ""


def _earlier_results(out: Path, key: dict) -> dict:
    try:
        earlier = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    if {"seed": earlier.get("seed"), "smoke": earlier.get("smoke")} != key:
        return {}
    from vidlmm.checkpoint import load_model
    from vidlmm.errors import CheckpointError

    kept = {name: r for name, r in earlier.get("results", {}).items() if (out / name / "config.json").is_file()}
    for name, r in kept.items():  # rows written before the table had the column
        if "visual_tokens" not in r:
            try:
                r["visual_tokens"] = visual_tokens(load_model(out / name))
            except CheckpointError:  # not a loadable model: the column shows "-"
                pass
    return kept


def _write_results(out: Path, state: dict, seed: int, smoke: bool, results: dict) -> dict:
    timings = dict(state["phases"])
    # the total counts the phases that made the table's models (a work folder may also hold the other variant's)
    made = {"world", "stage0"} | {f"{step}_{name}{_variant(r.get('single_object_qa', False))}"
                                  for name, r in results.items() for step in ("train", "eval")}
    timings["total"] = sum(v for k, v in timings.items() if k in made)
    summary = {"seed": seed, "smoke": smoke, "timings_s": timings, "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(results_table(summary))
    return summary


def results_table(summary: dict) -> str:
    lines = ["| model | visual tokens | overall | static | temporal | chance | unparsable |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in summary["results"].items():
        cat = r.get("per_category", {})

        def acc(c):
            return f"{100 * cat[c]['accuracy']:.1f}" if c in cat else "-"

        label = name + (" (+ single-object QA)" if r.get("single_object_qa") else "")
        lines.append(f"| {label} | {r.get('visual_tokens', '-')} | {100 * r['accuracy']:.1f} | {acc('static')} | "
                     f"{acc('temporal')} | {100 * r['chance']:.1f} | {r['unparsable']} |")
    total = summary["timings_s"]["total"]
    lines.append(f"\nrebuild wall time: {total / 60:.1f} min (seed {summary['seed']})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.build_embedded", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="assets/models")
    parser.add_argument("--work", default="runs/embedded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", default="assets/heldout", help="where the held-out MC set and its clips go")
    parser.add_argument("--smoke", action="store_true", help="tiny world and budgets: checks the pipeline in ~1 min")
    parser.add_argument("--single-object-qa", action="store_true",
                        help="add single-turn colour/shape questions about the one-object clips to stage 2 "
                             "(see the README; the shipped models were trained without them)")
    parser.add_argument("--connectors", nargs="+", choices=list(CONNECTORS), default=list(SHIPPED),
                        help="default: the shipped models (%(default)s)")
    args = parser.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    summary = build(out, work, seed=args.seed, smoke=args.smoke, connectors=args.connectors,
                    heldout=Path(args.heldout) if args.heldout else None, single_object_qa=args.single_object_qa)
    print(results_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
