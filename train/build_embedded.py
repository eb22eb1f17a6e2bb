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
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .recipe import load_recipe
from .results import comparisons, comparisons_table, model_row, questions, table

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
    # goal (README, "Pool"). That random count has no one-to-one match with a frame's 4 symbols: no symbols' loss
    "pool": {"connector_type": "pool", "group": None, "symbol_weight": 0,
             "connector_options": {"token_budget": 64, "train_token_budget": 144, "min_frame_tokens": 4}},
    # ToMe and top-k answer better without the symbols' loss (static +4.0 and +24.9 points in the rebuild of
    # docs/embedded-models.md, "The symbols' recipe in one rebuild"): their tokens are patches, merged or kept.
    # Top-k learns each patch's symbol instead (patch_symbol_weight: static +6.6 points; pool and ToMe did not gain
    # from it: docs/embedded-models.md, "Stage 1's per-patch symbols' loss")
    "tome": {"connector_type": "tome", "group": None, "symbol_weight": 0, "connector_options": {"token_budget": 64}},
    "topk": {"connector_type": "topk", "group": None, "symbol_weight": 0, "patch_symbol_weight": 4,
             "connector_options": {"token_budget": 64}},
}
# not shipped (the default --connectors are SHIPPED): the same LLaVA-Mini with one pre-fusion layer
CONNECTORS["llava_mini_fusion"] = {**CONNECTORS["llava_mini"], "connector_options": {"prefusion_layers": 1}}
SHIPPED = ("group", "naive", "image", "llava_mini", "pool", "tome", "topk")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _overrides(spec: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if v is not None else 'null'}" for k, v in spec.items()]


SHIPPED_HELDOUT_CLIPS = 200  # of the world's held-out clips, the first 200 (400 questions, 0.9 MB) ship in assets/


def ship_heldout(world: Path, dest: Path, examples: int = 3, clips: int = SHIPPED_HELDOUT_CLIPS) -> None:
    """The first ``clips`` held-out clips with their multiple-choice questions (about 1 MB), so the app's held-out
    redundancy curve and `vidlmm eval` work offline; the first clips also join the app's example gallery. The
    whole held-out set (2,000 questions) stays in the work folder's world: it does not fit in the 50 MB of assets,
    and the world phase renders it again in about a minute."""
    items = json.loads((world / "eval_mc.json").read_text())
    keep = list(dict.fromkeys(item["video"] for item in items))[:clips]
    items = [item for item in items if item["video"] in keep]
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


# Multiple-choice questions per training clip in the shipped stage 2: three against one gave group +5.6 points
# on temporal questions, with the twice longer stage 2 they bring (docs/embedded-models.md)
MC_PER_CLIP = 3


@dataclass(frozen=True)
class Variant:
    """What a run changes from the shipped recipe (the default is the shipped recipe): stage-2 data
    (single-object QA, multiple-choice questions per training clip) and any recipe field of either stage
    (``key=value``, as on `python -m train run`'s command line). It names the run's phases, work folders and table
    row, so variants of one connector sit side by side in one work folder and share what they do not change."""

    single_object_qa: bool = False
    lookup_qa: bool = False
    mc_per_clip: int = MC_PER_CLIP
    mc_letter: bool = False  # the MC answers end with the option's letter ("Red (B)")
    mc_turns: bool = False  # a clip's MC questions as the turns of one conversation, not one sample each
    mc_other_video: int = 0  # MC questions per clip asked of another clip's video, trained by the option loss alone
    stage1: tuple = ()
    stage2: tuple = ()
    stage0: tuple = ()  # "llm.<key>=<value>" / "vision.<key>=<value>": stage-0 settings (train/stage0/common.py)

    def stage0_suffix(self) -> str:
        return "".join(f"+{o}" for o in self.stage0)

    def stage0_overrides(self) -> dict:
        from .stage0.run import parse_settings

        return parse_settings(self.stage0)

    def stage1_suffix(self) -> str:
        return self.stage0_suffix() + "".join(f"+{o}" for o in self.stage1)

    def suffix(self) -> str:
        return (self.stage1_suffix() + ("+single" if self.single_object_qa else "")
                + ("+lookup" if self.lookup_qa else "")
                + (f"+mc{self.mc_per_clip}" if self.mc_per_clip != MC_PER_CLIP else "")
                + ("+mcletter" if self.mc_letter else "")
                + ("+mcturns" if self.mc_turns else "")
                + (f"+other{self.mc_other_video}" if self.mc_other_video else "")
                + "".join(f"+{o}" for o in self.stage2))


class Phases:
    """Each finished phase is recorded with its own wall time in ``<work>/build_state.json``: a killed run resumes
    at the first unfinished phase (training phases resume from their own checkpoints), and a reported total is the
    sum of the phases' measured times. A phase stopped part way keeps the time it ran: a heartbeat writes it to
    ``partial`` every ``beat_s`` seconds (and once more when the phase raises), and the run that finishes the phase
    records the sum of its own time and the stopped runs' (a kill loses at most ``beat_s``). The file is replaced
    whole, never left half written."""

    def __init__(self, work: Path, key: dict, progress: bool = True, beat_s: float = 30.0):
        self.file, self.progress, self.beat_s = work / "build_state.json", progress, beat_s
        state = json.loads(self.file.read_text()) if self.file.is_file() else {}
        self.state = state if state.get("key") == key else {"key": key, "phases": {}}
        self.state.setdefault("partial", {})
        self._lock = threading.RLock()  # the heartbeat thread writes too
        work.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        """Written to a file of its own, flushed to disk, then renamed over the state (one build per work folder at a
        time: each holds the whole state in memory)."""
        with self._lock:
            fd, temporary = tempfile.mkstemp(dir=self.file.parent, prefix=self.file.name + ".")
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(self.state, indent=1))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.file)

    def run(self, name: str, fn) -> None:
        if name in self.state["phases"]:
            if self.progress:
                print(f"{name}: done in an earlier run ({self.state['phases'][name]:.0f} s)", file=sys.stderr)
            return
        earlier = self.state["partial"].get(name, 0.0)
        t, stop = time.perf_counter(), threading.Event()

        def keep_partial() -> None:
            with self._lock:
                self.state["partial"][name] = earlier + time.perf_counter() - t
                self.save()

        def beat() -> None:
            while not stop.wait(self.beat_s):
                try:
                    keep_partial()
                except OSError as err:  # a full disk must not end the phase; the time is then kept at its end
                    print(f"{name}: could not write {self.file.name} ({err})", file=sys.stderr)

        heart = threading.Thread(target=beat, daemon=True)
        heart.start()
        try:
            fn()
        except BaseException:
            keep_partial()
            raise
        finally:
            stop.set()
            heart.join()
        with self._lock:
            self.state["partial"].pop(name, None)
            self.record(name, earlier + time.perf_counter() - t)

    def record(self, name: str, seconds: float) -> None:
        with self._lock:
            self.state["phases"][name] = seconds
            self.save()


def prepare(work: Path, phases: Phases, *, seed: int = 0, smoke: bool = False, progress: bool = True,
            variant: Variant = Variant()) -> Path:
    """The world and stage 0 of a work folder (each once), and a variant's own stage 0 in ``stage0<suffix>`` (what
    it does not change copied from the shipped stage 0: the tokenizer and LLM when only the tower changes, the tower
    when only the LLM does); returns the world's folder."""
    from .stage0 import run_stage0
    from .world import WorldConfig, generate_world

    world = work / "world"
    sizes = dict(num_train=24, num_eval=8) if smoke else dict(num_train=4000, num_eval=1000)
    phases.run("world", lambda: generate_world(world, WorldConfig(seed=seed, **sizes), workers=os.cpu_count() or 1,
                                               progress=progress))
    budget = "smoke" if smoke else "full"
    phases.run("stage0", lambda: run_stage0(world, work / "stage0", budget=budget, seed=seed, progress=progress))
    if variant.stage0:
        changes = variant.stage0_overrides()
        phases.run(f"stage0{variant.stage0_suffix()}", lambda: run_stage0(
            world, work / f"stage0{variant.stage0_suffix()}", budget=budget, seed=seed, progress=progress,
            overrides=changes, reuse_text=None if "llm" in changes else work / "stage0",
            reuse_vision=None if "vision" in changes else work / "stage0"))
    return world


def train_and_score(name: str, spec: dict, work: Path, phases: Phases, *, seed: int = 0, smoke: bool = False,
                    variant: Variant = Variant(), progress: bool = True):
    """Stage 1 + 2 of one connector ``spec`` (a `CONNECTORS` entry) on a prepared work folder, then its held-out
    score: (its results row, the trained model's folder). Phases ``stage1_<name><stage-1 suffix>`` (shared by the
    variants that change only stage 2), ``train_<name><suffix>`` (stage 2) and ``eval_<name><suffix>``, which the
    row lists as ``phases``."""
    from vidlmm.checkpoint import load_model
    from vidlmm.evaluate import evaluate, load_mc_items
    from vidlmm.pipeline import VideoLMM

    from .stage0 import (write_lookup_annotations, write_mc_annotations, write_other_video_annotations,
                         write_single_object_annotations)
    from .trainer import run

    world = work / "world"
    mc_name = ("mc_train" + (str(variant.mc_per_clip) if variant.mc_per_clip != 1 else "")
               + ("_letter" if variant.mc_letter else "") + ("_turns" if variant.mc_turns else "") + ".json")
    # stage 2's annotation files and their writers: written when stage 2 runs, not on every call that finds it done
    stage2_writes = {world / mc_name: lambda path: write_mc_annotations(
        world, path, seed=seed, per_clip=variant.mc_per_clip, letter=variant.mc_letter, turns=variant.mc_turns)}
    if variant.single_object_qa:
        stage2_writes[world / "single_train.json"] = lambda path: write_single_object_annotations(world, path,
                                                                                                  seed=seed)
    if variant.lookup_qa:
        stage2_writes[world / "lookup_train.json"] = lambda path: write_lookup_annotations(world, path, seed=seed)
    if variant.mc_other_video:
        stage2_writes[world / f"mc_other{variant.mc_other_video}.json"] = lambda path: write_other_video_annotations(
            world, path, seed=seed, per_clip=variant.mc_other_video)
    stage2_data = [str(world / "qa.json"), *map(str, stage2_writes)]
    common = [f"seed={seed}", f"video_roots=[{json.dumps(str(world))}]"]
    if smoke:
        common += ["epochs=1", "global_batch_size=8", "per_device_batch_size=4"]
    stage0 = work / f"stage0{variant.stage0_suffix()}"
    stage1 = load_recipe("toy_stage1.yaml", [*common, *_overrides(spec), f"name={name}-stage1",
                                             f"llm={stage0 / 'llm'}", f"vision_tower={stage0 / 'vision'}",
                                             f"annotations=[{json.dumps(str(world / 'captions.json'))}]",
                                             f"output_dir={work / name / ('stage1' + variant.stage1_suffix())}",
                                             *variant.stage1])
    symbol_file = grid = None
    if stage1.symbol_weight or stage1.patch_symbol_weight:
        if stage1.patch_symbol_weight:  # the tower's patches per side
            tower = json.loads((stage0 / "vision" / "config.json").read_text())
            grid = tower["image_size"] // tower["patch_size"]
        symbol_file = world / f"captions_{'patch_' if grid else ''}symbols.json"
        stage1.annotations = [str(symbol_file)]

    def train_stage1():
        if symbol_file is not None:  # written when stage 1 runs, not again on every resume that finds it done
            from .stage0 import write_symbol_annotations

            write_symbol_annotations(world, world / "captions.json", symbol_file, grid)
        return run(stage1, progress=progress)

    stage2 = load_recipe("toy_stage2.yaml", [*common, f"name={name}-stage2",
                                             f"init={Path(stage1.output_dir) / 'model'}",
                                             f"annotations={json.dumps(stage2_data)}",
                                             f"output_dir={work / name / ('stage2' + variant.suffix())}",
                                             *variant.stage2])
    if variant.mc_turns and stage2.option_weight:
        raise ValueError("The option loss scores one answer per sample; --mc-turns asks several in one "
                         "conversation: use one of them.")
    if variant.mc_other_video and not stage2.option_weight:
        raise ValueError("--mc-other-video trains its questions by the option loss alone: give it a weight "
                         "(--stage2 option_weight=1).")
    model_dir = Path(stage2.output_dir) / "model"
    suffix = variant.suffix()
    records = work / name / f"heldout{suffix}.jsonl"
    training, scoring = f"train_{name}{suffix}", f"eval_{name}{suffix}"
    if training not in phases.state["phases"]:
        records.unlink(missing_ok=True)  # scored by an earlier model of that name
        phases.state["phases"].pop(scoring, None)
    # stage 1 is a phase of its own: variants that change only stage 2 share it, and its time once
    stage1_phase = f"stage1_{name}{variant.stage1_suffix()}"
    phases.run(stage1_phase, train_stage1)

    def train_stage2():
        for path, write in stage2_writes.items():
            write(path)
        return run(stage2, progress=progress)

    phases.run(training, train_stage2)
    t = time.perf_counter()
    model = load_model(model_dir)
    qs = questions(world / "eval_mc.json")
    # every scored question is kept as it is scored: a killed run does not score it again (records of another
    # model or another version of the scoring are the build's own stale cache: started again)
    result = evaluate(VideoLMM(model), load_mc_items(world / "eval_mc.json"), records=records, restart_records=True)
    if scoring not in phases.state["phases"]:  # a rerun that reads the kept records keeps the scoring's own time
        phases.record(scoring, time.perf_counter() - t)
    row = {**model_row(result, qs), "variant": suffix, "stage0_phase": f"stage0{variant.stage0_suffix()}",
           "stage1_phase": stage1_phase, "phases": [stage1_phase, training, scoring],
           "visual_tokens": visual_tokens(model)}
    return row, model_dir


def build(out: Path, work: Path, *, seed: int = 0, smoke: bool = False, connectors=SHIPPED,
          progress: bool = True, heldout: Path | None = None, variant: Variant = Variant()) -> dict:
    key = {"seed": seed, "smoke": smoke}
    phases = Phases(work, key, progress)
    world = prepare(work, phases, seed=seed, smoke=smoke, progress=progress, variant=variant)
    qs = questions(world / "eval_mc.json")
    # a run over some connectors keeps the table rows of the others (same seed, budget and questions) in `out`
    results = _earlier_results(out, key, qs)
    for name in connectors:
        results[name], model_dir = train_and_score(name, CONNECTORS[name], work, phases, seed=seed, smoke=smoke,
                                                   variant=variant, progress=progress)
        target = out / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for file in MODEL_FILES:
            if (model_dir / file).is_file():
                shutil.copy2(model_dir / file, target / file)
        _write_results(out, phases.state, seed, smoke, results, qs)  # after every model: a partial table survives
    if heldout is not None:
        ship_heldout(world, heldout)
    return _write_results(out, phases.state, seed, smoke, results, qs)


def visual_tokens(model) -> int:
    """Visual tokens the model's LLM reads per clip at its own frame sampling."""
    from vidlmm.pipeline import default_sampling

    return model.num_visual_tokens(default_sampling(model).max_frames_taken())


def _suffix(row: dict) -> str:
    """The variant suffix of a table row (rows written before `Variant` had only the single-object flag)."""
    return row.get("variant", "+single" if row.get("single_object_qa") else "")


def _earlier_results(out: Path, key: dict, qs: list[dict] | None = None) -> dict:
    try:
        earlier = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    if {"seed": earlier.get("seed"), "smoke": earlier.get("smoke")} != key:
        return {}
    if qs is not None and earlier.get("questions") != qs:  # scored on another held-out set: not comparable
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


def _write_results(out: Path, state: dict, seed: int, smoke: bool, results: dict,
                   qs: list[dict] | None = None) -> dict:
    timings = dict(state["phases"])
    # the total counts the phases that made the table's models (a work folder may also hold the other variant's)
    made = {"world", "stage0"} | {r.get("stage0_phase", "stage0") for r in results.values()} | {
        r["stage1_phase"] for r in results.values() if "stage1_phase" in r} | {
        f"{step}_{name}{_suffix(r)}" for name, r in results.items() for step in ("train", "eval")}
    timings["total"] = sum(v for k, v in timings.items() if k in made)
    summary = {"seed": seed, "smoke": smoke, "timings_s": timings, "results": results}
    if qs is not None:
        summary["questions"] = qs
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(results_table(summary))
    return summary


def results_table(summary: dict) -> str:
    """The held-out table with 95 % intervals, then the paper's comparisons (where both models are in it)."""
    rows = summary["results"]
    labels = {name + (f" ({_suffix(r)})" if _suffix(r) else ""): r for name, r in rows.items()}
    tokens = {label: {"visual tokens": r.get("visual_tokens", "-")} for label, r in labels.items()}
    text = table(labels, tokens)
    if summary.get("questions"):
        text += "\n" + comparisons_table(comparisons(rows, summary["questions"]))
    total = summary["timings_s"]["total"]
    return text + f"\nrebuild wall time: {total / 60:.1f} min (seed {summary['seed']})\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.build_embedded", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="assets/models")
    parser.add_argument("--work", default="runs/embedded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", default="assets/heldout", help="where the held-out MC set and its clips go")
    parser.add_argument("--smoke", action="store_true", help="tiny world and budgets: checks the pipeline in ~1 min")
    parser.add_argument("--single-object-qa", action="store_true",
                        help="add single-turn colour/shape questions about the one-object clips to stage 2 "
                             "(see docs/embedded-models.md; the shipped models were trained without them)")
    parser.add_argument("--lookup-qa", action="store_true",
                        help="add every colour/shape question about each several-object clip, one conversation per "
                             "clip, to stage 2 (see docs/embedded-models.md)")
    parser.add_argument("--mc-per-clip", type=int, default=MC_PER_CLIP,
                        help="multiple-choice questions per training clip in stage 2 (default %(default)s)")
    parser.add_argument("--mc-letter", action="store_true",
                        help="stage 2's multiple-choice answers end with the option's letter, \"Red (B)\" (default: "
                             "the option's text alone; tried on group: the letter is mostly wrong, see "
                             "docs/embedded-models.md)")
    parser.add_argument("--mc-turns", action="store_true",
                        help="ask each training clip's multiple-choice questions as the turns of one conversation "
                             "(one sample per clip, the clip read once) instead of one sample per question")
    parser.add_argument("--mc-other-video", type=int, default=0, metavar="N",
                        help="add N multiple-choice questions per training clip asked of another clip's video, "
                             "trained only to keep the reply on the options (needs --stage2 option_weight=W; tried "
                             "on group: 77 unparsable replies against 90, accuracy not shown apart, see "
                             "docs/embedded-models.md)")
    parser.add_argument("--stage0", nargs="*", default=[], metavar="PART.KEY=VALUE",
                        help="stage-0 settings to change: the budget's (train/stage0/common.py) or any keyword of "
                             "pretrain_llm / pretrain_vision, e.g. vision.set_weight=1 (the shipped stage 0 is made "
                             "too; the part that does not change is copied from it: with llm.* only the tower, with "
                             "vision.* only the tokenizer and LLM)")
    parser.add_argument("--stage1", nargs="*", default=[], metavar="KEY=VALUE",
                        help="stage-1 recipe fields to change (train/configs/toy_stage1.yaml), e.g. epochs=2")
    parser.add_argument("--stage2", nargs="*", default=[], metavar="KEY=VALUE",
                        help="stage-2 recipe fields to change (train/configs/toy_stage2.yaml)")
    parser.add_argument("--connectors", nargs="+", choices=list(CONNECTORS), default=list(SHIPPED),
                        help="default: the shipped models (%(default)s)")
    args = parser.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    variant = Variant(single_object_qa=args.single_object_qa, lookup_qa=args.lookup_qa,
                      mc_per_clip=args.mc_per_clip, mc_letter=args.mc_letter, mc_turns=args.mc_turns,
                      mc_other_video=args.mc_other_video,
                      stage1=tuple(args.stage1),
                      stage2=tuple(args.stage2), stage0=tuple(args.stage0))
    summary = build(out, work, seed=args.seed, smoke=args.smoke, connectors=args.connectors,
                    heldout=Path(args.heldout) if args.heldout else None, variant=variant)
    print(results_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
