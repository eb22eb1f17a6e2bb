"""The one-command rebuild of the embedded models and the ablations, in smoke mode (a tiny world, minimal
budgets; 23 s on 2 cores with the groups ablation). It runs in CI: the full rebuild takes about three hours (README),
the smoke one checks the same chain of phases."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from train.build_embedded import Phases, Variant, build
from vidlmm.checkpoint import load_model


def test_smoke_rebuild_writes_loadable_models_and_a_table(tmp_path):
    summary = build(tmp_path / "models", tmp_path / "work", seed=0, smoke=True, progress=False,
                    heldout=tmp_path / "heldout")
    for name in ("group", "naive", "image"):
        model = load_model(tmp_path / "models" / name)
        assert model.config.video_sampling == {"mode": "uniform", "num_frames": 16}
        assert summary["results"][name]["n"] > 0
    table = (tmp_path / "models" / "results.md").read_text()
    assert table.startswith("| model | visual tokens | overall [95 % interval] | static | temporal | chance |")
    assert "video-level (group) vs image-level resampler" in table  # the paper's comparisons, with intervals
    group = load_model(tmp_path / "models" / "group")
    assert summary["results"]["group"]["visual_tokens"] == group.num_visual_tokens(16)
    assert json.loads((tmp_path / "models" / "results.json").read_text())["smoke"] is True
    items = json.loads((tmp_path / "heldout" / "eval_mc.json").read_text())
    assert all((tmp_path / "heldout" / item["video"]).is_file() for item in items)
    assert_every_model_trained(tmp_path / "work")
    # a second run finds every phase done: nothing is retrained, the recorded phase times are reused (the scoring's
    # too: the rerun reads the kept records in a moment, and that moment is not the scoring's time)
    state = json.loads((tmp_path / "work" / "build_state.json").read_text())
    written = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "work" / "world").glob("*.json")}
    again = build(tmp_path / "models", tmp_path / "work", seed=0, smoke=True, progress=False)
    # nor are the stages' annotation files written again
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "work" / "world").glob("*.json")} == written
    for phase in ("world", "stage0", "stage1_group", "train_group", "train_naive", "train_image", "eval_group",
                  "eval_naive"):
        assert again["timings_s"][phase] == state["phases"][phase]
    # a variant that changes only stage 2 (one MC question per clip, the shipped recipe has three, and one asked of
    # another clip's video, trained by the option loss) trains stage 2 alone on the shared stage 1, whose time its
    # table counts once
    with pytest.raises(ValueError, match="option_weight"):  # questions with no loss to train them
        build(tmp_path / "one", tmp_path / "work", seed=0, smoke=True, progress=False, connectors=("group",),
              variant=Variant(mc_other_video=1))
    with pytest.raises(ValueError, match="--mc-turns"):  # an option loss scores one answer, turns are several
        build(tmp_path / "one", tmp_path / "work", seed=0, smoke=True, progress=False, connectors=("group",),
              variant=Variant(mc_turns=True, stage2=("option_weight=1",)))
    variant = Variant(mc_per_clip=1, mc_other_video=1, stage2=("option_weight=1",))
    one = build(tmp_path / "one", tmp_path / "work", seed=0, smoke=True, progress=False, connectors=("group",),
                variant=variant)
    done = json.loads((tmp_path / "work" / "build_state.json").read_text())["phases"]
    name = "group+mc1+other1+option_weight=1"
    assert done["stage1_group"] == state["phases"]["stage1_group"] and f"train_{name}" in done
    assert one["timings_s"]["total"] == pytest.approx(sum(done[k] for k in (
        "world", "stage0", "stage1_group", f"train_{name}", f"eval_{name}")))
    assert "| group (+mc1+other1+option_weight=1) |" in (tmp_path / "one" / "results.md").read_text()
    other = json.loads((tmp_path / "work" / "world" / "mc_other1.json").read_text())
    assert other and all(r["answer_known"] is False for r in other)
    # the ablations reuse the world, stage 0 and the embedded runs they share, and train the rest
    from train.ablations import run_ablations

    report = run_ablations(tmp_path / "work", tmp_path / "ablations", studies=("groups",), smoke=True,
                           progress=False)
    runs = [e["run"] for e in report["studies"]["groups"]["entries"]]
    assert runs == ["naive", "group_g2_q64", "group_g4_q64", "group_g8_q64", "group"]
    after = json.loads((tmp_path / "work" / "build_state.json").read_text())["phases"]
    assert after["train_naive"] == state["phases"]["train_naive"] and "train_group_g4_q64" in after
    assert "| 4 | group_g4_q64 |" in (tmp_path / "ablations" / "ablations.md").read_text()
    assert (tmp_path / "ablations" / "groups.png").is_file()


def test_a_stopped_phase_keeps_the_time_it_ran(tmp_path):
    """A phase stopped part way keeps the time it ran in ``partial`` (the heartbeat writes it while the phase runs,
    which is what a SIGKILL leaves; an exception writes it once more), and the run that finishes the phase records
    its own time plus the stopped run's: a resumed rebuild's total is not short of the work it redid or kept."""
    state_file = tmp_path / "build_state.json"

    def stopped():
        time.sleep(0.3)
        assert json.loads(state_file.read_text())["partial"]["train_x"] >= 0.1  # the heartbeat's, mid-phase
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Phases(tmp_path, {"seed": 0}, progress=False, beat_s=0.05).run("train_x", stopped)
    kept = json.loads(state_file.read_text())
    assert kept["partial"]["train_x"] >= 0.3 and "train_x" not in kept["phases"]
    Phases(tmp_path, {"seed": 0}, progress=False).run("train_x", lambda: time.sleep(0.1))
    done = json.loads(state_file.read_text())
    assert done["partial"] == {} and done["phases"]["train_x"] >= kept["partial"]["train_x"] + 0.1
    assert [p.name for p in tmp_path.iterdir()] == ["build_state.json"]  # no temporary file left beside it


def assert_every_model_trained(work) -> None:
    """Each shipped model trained in both stages: stage 1 moved the connector from the initialisation the trainer
    started from (and left the LLM and the tower), stage 2 moved the connector and the LLM from stage 1's (and
    left the tower), and stage 2's loss fell (smoke: 12 logged steps, 24 clips' QA and three multiple-choice
    questions each at 8 a step; the last 3 below the first 3)."""
    from accelerate.utils import set_seed

    from tests.test_train import logged_losses
    from train.build_embedded import SHIPPED
    from train.recipe import Recipe
    from train.trainer import build_model

    def moved(a: dict, b: dict, part: str) -> float:
        keys = [k for k in a if k.startswith(part + ".")]
        assert keys and all(k in b for k in keys), part
        return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)

    for name in SHIPPED:
        one, two = work / name / "stage1" / "model", work / name / "stage2" / "model"
        recipe = Recipe(**json.loads((one / "trainer_state.json").read_text())["recipe"])
        # the symbols' loss for the connectors whose tokens match a frame's symbols, the per-patch one for top-k's
        assert bool(recipe.patch_symbol_weight) == (name == "topk"), name
        if recipe.symbol_weight or recipe.patch_symbol_weight:
            first = json.loads(Path(recipe.annotations[0]).read_text())[0]
            assert "symbols" in first and ("patch_symbols" in first) == bool(recipe.patch_symbol_weight), name
        set_seed(recipe.seed)  # as the trainer does before it builds the model
        start, after_one, after_two = (build_model(recipe).state_dict(), load_model(one).state_dict(),
                                       load_model(two).state_dict())
        assert moved(after_one, start, "connector") > 1e-3, name
        assert moved(after_one, start, "language_model") == moved(after_one, start, "vision_tower") == 0.0, name
        assert moved(after_two, after_one, "connector") > 1e-3, name
        assert moved(after_two, after_one, "language_model") > 1e-3, name
        assert moved(after_two, after_one, "vision_tower") == 0.0, name
        losses = logged_losses(work / name / "stage2")
        assert sorted(losses) == list(range(1, 13)), (name, losses)
        assert sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3)), (name, losses)


def test_a_partial_rebuild_keeps_the_other_models_rows(tmp_path):
    from train.build_embedded import _earlier_results

    out = tmp_path / "models"
    for name in ("group", "naive"):
        (out / name).mkdir(parents=True)
    (out / "group" / "config.json").write_text("{}")  # naive's folder has no model: its row is dropped
    rows = {"group": {"accuracy": 0.5}, "naive": {"accuracy": 0.4}}
    (out / "results.json").write_text(json.dumps({"seed": 0, "smoke": False, "results": rows}))
    assert _earlier_results(out, {"seed": 0, "smoke": False}) == {"group": {"accuracy": 0.5}}
    assert _earlier_results(out, {"seed": 1, "smoke": False}) == {}  # another seed's table is not mixed in
    assert _earlier_results(tmp_path / "nothing", {"seed": 0, "smoke": False}) == {}


def test_the_table_gives_each_models_visual_tokens_also_for_earlier_rows(tmp_path):
    # the tokens the model is served with (not its training budget); rows written before the column existed
    # get it from the model folder
    from train.build_embedded import _earlier_results, _write_results
    from vidlmm.tiny import write_tiny_checkpoint

    out = tmp_path / "models"
    write_tiny_checkpoint(out / "pool", "pool", connector_options={"token_budget": 64, "train_token_budget": 144},
                          video_sampling={"mode": "uniform", "num_frames": 16})
    row = {"accuracy": 0.5, "chance": 0.25, "unparsable": 3, "per_category": {}}
    (out / "results.json").write_text(json.dumps({"seed": 0, "smoke": False, "results": {"pool": row}}))
    rows = _earlier_results(out, {"seed": 0, "smoke": False})
    assert rows["pool"]["visual_tokens"] == 16 * 4  # 64 // 16 frames, a square
    _write_results(out, {"phases": {}}, 0, False, rows)
    assert "| pool | 64 | 50.0 |" in (out / "results.md").read_text()


def test_the_total_counts_only_the_phases_behind_the_table(tmp_path):
    from train.build_embedded import _write_results

    phases = {"world": 1.0, "stage0": 2.0, "train_group": 3.0, "eval_group": 1.0, "train_group+single": 10.0,
              "eval_group+single": 1.0, "train_naive": 5.0, "eval_naive": 1.0}
    row = {"accuracy": 0.5, "chance": 0.25, "unparsable": 0, "per_category": {}}
    phases |= {"stage1_group": 4.0, "stage1_group+epochs=1": 8.0}
    both = {"group": {**row, "single_object_qa": True, "stage1_phase": "stage1_group"},
            "naive": {**row, "single_object_qa": False}}  # a row written before stage 1 was a phase of its own
    summary = _write_results(tmp_path, {"phases": phases}, 0, False, both)
    assert summary["timings_s"]["total"] == 1 + 2 + 4 + 10 + 1 + 5 + 1  # not the other variants' group phases
    assert "| group (+single) |" in (tmp_path / "results.md").read_text()  # the variant names its row


def test_the_default_rebuild_ships_seven_models_and_the_fusion_variant_is_opt_in():
    from train.build_embedded import CONNECTORS, SHIPPED, main

    assert SHIPPED == ("group", "naive", "image", "llava_mini", "pool", "tome", "topk")
    assert set(SHIPPED) < set(CONNECTORS)
    # the shipped LLaVA-Mini is its compression alone; the pre-fusion variant is only built when asked for
    assert CONNECTORS["llava_mini"]["connector_options"]["prefusion_layers"] == 0
    assert CONNECTORS["llava_mini_fusion"]["connector_options"]["prefusion_layers"] == 1
    with pytest.raises(SystemExit):
        main(["--connectors", "no_such_model"])
    # the shipped stage 2 names no phase suffix; what differs from it does
    assert Variant().suffix() == "" and Variant().mc_per_clip == 3
    assert Variant(mc_per_clip=1, mc_letter=True, stage2=("epochs=4",)).suffix() == "+mc1+mcletter+epochs=4"
    assert Variant(mc_other_video=2, stage2=("option_weight=1",)).suffix() == "+other2+option_weight=1"
    assert Variant(mc_turns=True).suffix() == "+mcturns" and Variant(mc_turns=True).stage1_suffix() == ""


def test_every_shipped_model_reads_the_same_64_visual_tokens():
    # the README's table compares the connectors at one budget; pool trains above it (train_token_budget) but is
    # served at it
    from pathlib import Path

    from train.build_embedded import SHIPPED, visual_tokens

    models = Path(__file__).resolve().parent.parent / "assets" / "models"
    if not (models / "group" / "config.json").is_file():
        pytest.skip("the embedded models are not built")
    assert {name: visual_tokens(load_model(models / name)) for name in SHIPPED} == {name: 64 for name in SHIPPED}
    assert load_model(models / "pool").connector.train_token_budget == 144


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    from vidlmm.tiny import write_tiny_parts

    return write_tiny_parts(tmp_path_factory.mktemp("parts"))


def training_settings() -> list[tuple[str, dict]]:
    from train.ablations import STUDIES
    from train.build_embedded import CONNECTORS

    return [*CONNECTORS.items(), *((f"{study}={value}", spec) for study, (_, values) in STUDIES.items()
                                   for value, spec in values)]


@pytest.mark.parametrize("name,spec", [pytest.param(n, spec, id=n) for n, spec in training_settings()])
def test_every_setting_trained_with_the_symbols_loss_gives_a_token_per_symbol(name, spec, tiny_parts):
    """Stage 1's symbols' loss pairs a frame's visual tokens with its 4 symbols and refuses any other count at the
    first step, hours into a rebuild or an ablation run: every connector setting the recipe trains with it must
    give 4 tokens per frame in training (pool's random count and the image-level study's other counts train without
    it)."""
    import torch

    from train.build_embedded import _overrides
    from train.recipe import load_recipe
    from train.trainer import build_model

    llm, vision = tiny_parts
    recipe = load_recipe("toy_stage1.yaml", [*_overrides(spec), f"llm={llm}", f"vision_tower={vision}"])
    model = build_model(recipe).train()
    frames, side = recipe.sampling["num_frames"], model.image_processor.size
    with torch.no_grad():
        counts = {model.connect(model.vision_tower(torch.randn(frames, 3, side, side))).tokens.shape[1]
                  for _ in range(4)}
    if recipe.symbol_weight:
        assert counts == {frames * 4}, (name, counts)
    elif name == "pool":  # why pool trains without it: its count is drawn per step
        assert counts != {frames * 4}, counts
