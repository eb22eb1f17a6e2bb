"""The training recipe: plan of the A100 stages, what each stage trains, a tiny two-stage run end to end,
kill-and-resume to the same weights, 2-process data parallel on CPU (gloo), and bad data: a rank that reads
nothing, skips repeated after a resume, a decoder that hangs or crashes, a damaged last checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.ports import free_port
from tests.videos import make_moving_square_frames, write_video
from train.recipe import load_recipe
from train.trainer import apply_tuning, build_model, checkpoint_damage, epoch_order, resume_point
from vidlmm.checkpoint import load_model
from vidlmm.errors import VideoReadError
from vidlmm.tiny import build_tiny_model, write_tiny_parts

ROOT = Path(__file__).resolve().parent.parent


def test_a100_plans_show_the_papers_recipe():
    plans = {}
    for stage in ("a100_stage1.yaml", "a100_stage2.yaml"):
        out = subprocess.run([sys.executable, "-m", "train", "plan", f"train/configs/{stage}", "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        plans[stage] = json.loads(out.stdout)
    one, two = plans["a100_stage1.yaml"], plans["a100_stage2.yaml"]
    assert (one["global_batch_size"], two["global_batch_size"]) == (128, 64)
    assert (one["learning_rate"], two["learning_rate"]) == (1e-4, 2e-5)
    assert one["lr_scheduler"] == two["lr_scheduler"] == "cosine"
    assert one["warmup_ratio"] == two["warmup_ratio"] == 0.03
    assert one["weight_decay"] == two["weight_decay"] == 0.0 and one["epochs"] == 1
    assert (one["template"], two["template"]) == ("pretrain", "qwen2_base")
    assert one["parts"]["connector"]["trainable"] == 115_714_048
    assert one["parts"]["language_model"]["trainable"] == 0 == two["parts"]["vision_tower"]["trainable"]
    assert two["parts"]["language_model"]["trainable"] == two["parts"]["language_model"]["parameters"] > 3e9
    # 8 GPUs x 8 per device: accumulation 2 (stage 1) and 1 (stage 2) keep the global batch
    assert (one["gradient_accumulation_steps"], two["gradient_accumulation_steps"]) == (2, 1)


def test_accumulation_is_derived_from_processes():
    recipe = load_recipe("train/configs/a100_stage1.yaml", ["num_processes=4"])
    assert recipe.gradient_accumulation_steps == 4  # the reference's 8 x 4 x 4 = 128
    with pytest.raises(ValueError, match="not a multiple"):
        load_recipe("train/configs/a100_stage1.yaml", ["num_processes=3"])
    with pytest.raises(ValueError, match="Unknown recipe field"):
        load_recipe("train/configs/a100_stage1.yaml", ["learning_rat=1"])


@pytest.mark.parametrize("stage,expected", [("a100_stage1.yaml", {"connector"}),
                                            ("a100_stage2.yaml", {"connector", "language_model"})])
def test_each_stage_trains_exactly_its_parts(stage, expected):
    model = build_tiny_model("groupresampler", num_queries=16, group=4)
    recipe = load_recipe(f"train/configs/{stage}", ["gradient_checkpointing=false"])
    counts = apply_tuning(model, recipe)
    total = model.parameter_counts()
    assert {part for part, n in counts.items() if n} == expected
    for part in expected:
        assert counts[part] == total[part]


# ---- tiny runs -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """8 clips with captions and QA in the reference annotation format; one corrupt video among them."""
    root = tmp_path_factory.mktemp("world")
    (root / "videos").mkdir()
    captions, qa = [], []
    for i in range(8):
        name = f"videos/clip{i}.mp4"
        write_video(root / name, make_moving_square_frames(12, 48, 48, seed=i), fps=6)
        captions.append({"id": f"c{i}", "video": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the video."},
            {"from": "gpt", "value": f"a white square moves right {i}"}]})
        qa.append({"id": f"q{i}", "video": name, "conversations": [
            {"from": "user", "value": "<video>\nWhat moves?"}, {"from": "assistant", "value": "a square"},
            {"from": "user", "value": "Which way?"}, {"from": "assistant", "value": "right"}]})
    (root / "videos" / "clip7.mp4").write_bytes(b"not a video at all")  # skipped, never fatal
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "qa.json").write_text(json.dumps(qa))
    llm, vision = write_tiny_parts(root / "parts")
    return {"root": root, "llm": llm, "vision": vision}


def write_recipe(path: Path, **fields) -> Path:
    base = {"name": "tiny", "mixed_precision": "no", "gradient_checkpointing": False, "num_queries": 16,
            "group": 4, "sampling": {"mode": "uniform", "num_frames": 4}, "max_length": 512,
            "per_device_batch_size": 1, "global_batch_size": 2, "epochs": 2, "save_every_steps": 2,
            "warmup_ratio": 0.1}
    base.update(fields)
    path.write_text(yaml.safe_dump(base))
    return path


def run_train(args, env=None, timeout=300):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "train", "run", *map(str, args), "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def stage1_recipe(tmp_path, world, out_name):
    return write_recipe(tmp_path / f"{out_name}.yaml", stage="pretrain", template="pretrain",
                        learning_rate=1e-3, llm=str(world["llm"]), vision_tower=str(world["vision"]),
                        annotations=[str(world["root"] / "captions.json")], video_roots=[str(world["root"])],
                        output_dir=str(tmp_path / out_name))


def test_two_stages_end_to_end(tmp_path, tiny_world):
    out = run_train([stage1_recipe(tmp_path, tiny_world, "s1")])
    assert out.returncode == 0, out.stderr[-2000:]
    stage1 = tmp_path / "s1" / "model"
    assert (stage1 / "connector" / "pytorch_model.bin").is_file()  # the reference's split layout
    before = load_model(stage1)
    parts_llm = torch.load(stage1 / "language_model" / "pytorch_model.bin", weights_only=True)
    s2 = write_recipe(tmp_path / "s2.yaml", stage="finetune", template="qwen2_base", learning_rate=1e-3,
                      tune={"language_model": "full", "vision_tower": "frozen", "connector": "full"},
                      init=str(stage1), annotations=[str(tiny_world["root"] / "qa.json")],
                      video_roots=[str(tiny_world["root"])], output_dir=str(tmp_path / "s2"))
    out = run_train([s2])
    assert out.returncode == 0, out.stderr[-2000:]
    final = tmp_path / "s2" / "model"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    after = load_model(final)  # the published layout the loader reads
    assert after.config.video_sampling == {"mode": "uniform", "num_frames": 4}
    a, b = before.state_dict(), after.state_dict()
    assert not torch.equal(a["language_model.model.embed_tokens.weight"], b["language_model.model.embed_tokens.weight"])
    assert torch.equal(a["vision_tower._vision_tower.embeddings.patch_embedding.weight"],
                       b["vision_tower._vision_tower.embeddings.patch_embedding.weight"])
    assert torch.equal(parts_llm["model.embed_tokens.weight"], a["language_model.model.embed_tokens.weight"])
    log = out.stdout + out.stderr
    assert "skipping unreadable video" in log and "clip7.mp4" in log
    assert list((tmp_path / "s2").rglob("events.out.tfevents*"))  # TensorBoard logs


def connector_of(model_folder: Path) -> dict:
    """The connector's weights as the stage-1 split layout stores them (the reference's `_connector.` keys)."""
    return torch.load(model_folder / "connector" / "pytorch_model.bin", weights_only=True)


def connector_start(model) -> dict:
    """A freshly built model's connector weights under the split layout's key names (see `connector_of`)."""
    return {"_connector." + k[len("connector."):]: v for k, v in model.state_dict().items()
            if k.startswith("connector.")}


def assert_same_trained_weights(a: dict, b: dict, start: dict, atol: float = 0.0) -> None:
    """a == b (within atol), and training moved them from the start, so the equality is not vacuous."""
    assert a.keys() == b.keys() == start.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= atol
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3


def logged_losses(output_dir: Path) -> dict[int, float]:
    """{step: loss} as the trainer logged it to TensorBoard (every step: the mean loss of the samples read in
    that step). A resumed run writes a second event file; its values win for the steps it logged again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for events in sorted(Path(output_dir).rglob("events.out.tfevents*"), key=lambda p: p.stat().st_mtime_ns):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "loss" in accumulator.Tags()["scalars"]:
            losses.update({event.step: event.value for event in accumulator.Scalars("loss")})
    return losses


def assert_loss_fell(losses: dict[int, float], steps_per_epoch: int = 4, epochs: int = 2) -> None:
    """Every step logged; with two epochs over the same samples, the second epoch's mean loss is lower than the
    first's; with one, the last step's is lower than the first's."""
    assert sorted(losses) == list(range(1, steps_per_epoch * epochs + 1)), sorted(losses)
    if epochs == 1:
        assert losses[steps_per_epoch] < losses[1], losses
        return
    first = [losses[s] for s in range(1, steps_per_epoch + 1)]
    second = [losses[s] for s in range(steps_per_epoch + 1, 2 * steps_per_epoch + 1)]
    assert sum(second) < sum(first), losses


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_world):
    """An uninterrupted stage-1 run over the captions (clip7 unreadable throughout), and its starting weights."""
    tmp = tmp_path_factory.mktemp("straight")
    recipe = stage1_recipe(tmp, tiny_world, "straight")
    out = run_train([recipe])
    assert out.returncode == 0, out.stderr[-2000:]
    start = connector_start(build_model(load_recipe(recipe)))
    losses = logged_losses(tmp / "straight")
    assert_loss_fell(losses)  # the run every comparison below is measured against learned something
    return {"model": tmp / "straight" / "model", "start": start, "losses": losses,
            "state": json.loads((tmp / "straight" / "model" / "trainer_state.json").read_text())}


def assert_same_losses(run_dir: Path, reference: dict[int, float], steps, rel: float = 1e-6) -> None:
    """The run logged the reference's loss at each of these steps (the steps it trained itself after a resume)."""
    losses = logged_losses(run_dir)
    assert {s: losses.get(s) for s in steps} == pytest.approx({s: reference[s] for s in steps}, rel=rel)


def copy_world(world: dict, dest: Path) -> Path:
    """A private copy of the tiny world's videos and annotations, for a test that changes files."""
    shutil.copytree(world["root"] / "videos", dest / "videos")
    for name in ("captions.json", "qa.json"):
        shutil.copy(world["root"] / name, dest / name)
    return dest


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_world, straight):
    recipe = stage1_recipe(tmp_path, tiny_world, "killed")
    killed = run_train([recipe], env={"VIDLMM_TRAIN_DIE_AFTER_STEP": "5"})
    assert killed.returncode == -9  # really killed, after the checkpoint of step 4 and one more step
    assert not (tmp_path / "killed" / "model").exists()
    resumed = run_train([recipe])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step-0000004" in resumed.stdout + resumed.stderr
    assert_same_trained_weights(connector_of(straight["model"]), connector_of(tmp_path / "killed" / "model"),
                                straight["start"])
    assert_same_losses(tmp_path / "killed", straight["losses"], range(5, 9))  # the steps after the resume


def test_resumed_run_repeats_its_skips(tmp_path, tiny_world, straight):
    """clip7 is skipped at step 2 (epoch 0) and comes again at step 7 (epoch 1). Killed after step 3, the run
    resumes from step 2 with clip7 repaired: it must still drop c7 at step 7, as the uninterrupted run did."""
    assert epoch_order(8, 0, 0)[2] == 7 and epoch_order(8, 0, 1)[4] == 7  # steps 2 and 7 at 2 samples a step
    world = copy_world(tiny_world, tmp_path / "world")
    recipe = write_recipe(tmp_path / "r.yaml", stage="pretrain", template="pretrain", learning_rate=1e-3,
                          llm=str(tiny_world["llm"]), vision_tower=str(tiny_world["vision"]),
                          annotations=[str(world / "captions.json")], video_roots=[str(world)],
                          output_dir=str(tmp_path / "run"))
    killed = run_train([recipe], env={"VIDLMM_TRAIN_DIE_AFTER_STEP": "3"})
    assert killed.returncode == -9
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-0000002" / "train_state.json").read_text())
    assert [(s["id"], s["epoch"], s["step"]) for s in saved["skipped"]] == [("c7", 0, 2)]
    write_video(world / "videos" / "clip7.mp4", make_moving_square_frames(12, 48, 48, seed=7), fps=6)
    resumed = run_train([recipe])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step-0000002" in resumed.stdout + resumed.stderr
    state = json.loads((tmp_path / "run" / "model" / "trainer_state.json").read_text())
    strip = [{k: v for k, v in s.items() if k != "video"} for s in state["skipped"]]  # paths differ by world
    assert strip == [{k: v for k, v in s.items() if k != "video"} for s in straight["state"]["skipped"]]
    assert state["skipped"] == saved["skipped"]
    assert state["samples"] == straight["state"]["samples"] == 14  # 2 epochs x 8, c7 dropped in both
    assert_same_trained_weights(connector_of(straight["model"]), connector_of(tmp_path / "run" / "model"),
                                straight["start"])
    assert_same_losses(tmp_path / "run", straight["losses"], range(3, 9))


def test_damaged_last_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_world, straight):
    recipe = stage1_recipe(tmp_path, tiny_world, "damaged")
    killed = run_train([recipe], env={"VIDLMM_TRAIN_DIE_AFTER_STEP": "5"})
    assert killed.returncode == -9
    checkpoints = tmp_path / "damaged" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002", "step-0000004"]  # keep=2
    last = checkpoints / "step-0000004"
    assert checkpoint_damage(last) is None and resume_point(tmp_path / "damaged")[0] == last
    weights = next(last.glob("model*.safetensors"))
    original = {p: p.read_bytes() for p in (weights, last / "train_state.json")}
    damages = [(last / "train_state.json", lambda p: p.write_bytes(original[p][:40]), "train_state.json is damaged"),
               (weights, lambda p: p.write_bytes(original[p][: len(original[p]) // 2]), "has"),
               (weights, lambda p: p.unlink(), "is missing")]
    for path, damage, why in damages:
        damage(path)
        assert why in checkpoint_damage(last)
        assert resume_point(tmp_path / "damaged")[0].name == "step-0000002"
        path.write_bytes(original[path])
    weights.write_bytes(original[weights][:100])  # the run itself resumes past a truncated weights file
    resumed = run_train([recipe])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = resumed.stdout + resumed.stderr
    warning = [line for line in log.splitlines() if "is damaged" in line]
    assert len(warning) == 1 and "step-0000004" in warning[0] and "resuming from step-0000002" in warning[0]
    assert all(checkpoint_damage(p) is None for p in checkpoints.glob("step-*"))  # the damaged one was replaced
    assert_same_trained_weights(connector_of(straight["model"]), connector_of(tmp_path / "damaged" / "model"),
                                straight["start"])
    assert_same_losses(tmp_path / "damaged", straight["losses"], range(3, 9))


def test_two_cpu_processes_match_one_when_a_rank_reads_nothing(tmp_path, tiny_world, straight):
    """Step 2 of epoch 0 holds (c7, c3): with 2 processes rank 0's whole batch is the unreadable clip7, so it
    must still enter every collective (else rank 1 hangs in DDP's all-reduce), and the step's gradient must be
    the mean over the one sample read. The reference is one process accumulating the same two micro-batches,
    with clip7 replaced by a copy of clip3 and c7's caption by c3's: its step 2 is the mean over (c3, c3),
    which is the gradient of c3 alone, i.e. that step without c7, computed with no sample skipped at all.
    A skipped sample counted as a zero loss in the full batch would halve that step and not match."""
    assert epoch_order(8, 0, 0)[2:4] == [7, 3]
    world = copy_world(tiny_world, tmp_path / "world")
    shutil.copy(world / "videos" / "clip3.mp4", world / "videos" / "clip7.mp4")
    captions = json.loads((world / "captions.json").read_text())
    captions[7]["conversations"] = captions[3]["conversations"]
    (world / "captions.json").write_text(json.dumps(captions))
    reference = write_recipe(tmp_path / "one.yaml", stage="pretrain", template="pretrain", learning_rate=1e-3,
                             llm=str(tiny_world["llm"]), vision_tower=str(tiny_world["vision"]),
                             annotations=[str(world / "captions.json")], video_roots=[str(world)],
                             output_dir=str(tmp_path / "one"))
    single = run_train([reference, "epochs=1"])
    assert single.returncode == 0, single.stderr[-2000:]
    recipe = stage1_recipe(tmp_path, tiny_world, "two")
    port = free_port()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "train/configs/cpu_2proc.yaml",
           "--main_process_port", str(port), "-m", "train", "run", str(recipe), "epochs=1", "--no-progress"]
    double = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,  # a hang fails here
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert double.returncode == 0, double.stderr[-3000:]
    assert "accumulation 1" in double.stdout + double.stderr  # 2 processes x 1 per device = global batch 2
    assert "accumulation 2" in single.stdout + single.stderr
    state = json.loads((tmp_path / "two" / "model" / "trainer_state.json").read_text())
    assert [(s["id"], s["step"]) for s in state["skipped"]] == [("c7", 2)] and state["samples"] == 7
    assert_same_trained_weights(connector_of(tmp_path / "one" / "model"), connector_of(tmp_path / "two" / "model"),
                                straight["start"], atol=1e-5)
    # the same loss at every step (step 2: c3's alone in both), and it fell over the epoch
    single_losses = logged_losses(tmp_path / "one")
    assert_loss_fell(single_losses, epochs=1)
    assert_same_losses(tmp_path / "two", single_losses, range(1, 5), rel=1e-5)


def test_decode_worker_survives_a_hang_and_a_crash(tmp_path, monkeypatch):
    from train.data import _decode_pixels
    from train.decode_worker import DecodeFailed, DecodeWorker
    from vidlmm.preprocess import ImageProcessor
    from vidlmm.video import FrameSampling

    good = write_video(tmp_path / "good.mp4", make_moving_square_frames(12, 48, 48), fps=6)
    for name in ("hang.mp4", "crash.mp4"):
        shutil.copy(good, tmp_path / name)
    (tmp_path / "text.mp4").write_text("not a video")
    monkeypatch.setenv("VIDLMM_DECODE_FAULT", "hang:hang.mp4,crash:crash.mp4")
    args = (FrameSampling.uniform(4), ImageProcessor.for_tower("siglip", 32))
    worker = DecodeWorker(_decode_pixels, *args, time_limit_s=2)
    try:
        assert torch.equal(worker(good), _decode_pixels(good, *args))
        with pytest.raises(VideoReadError, match="text file"):
            worker(tmp_path / "text.mp4")
        with pytest.raises(DecodeFailed, match="did not finish within 2 s"):
            worker(tmp_path / "hang.mp4")
        assert torch.equal(worker(good), _decode_pixels(good, *args))  # a fresh worker
        with pytest.raises(DecodeFailed, match="crashed .*SIGSEGV"):
            worker(tmp_path / "crash.mp4")
        assert torch.equal(worker(good), _decode_pixels(good, *args))
    finally:
        worker.close()


@pytest.mark.parametrize("workers", [0, 2])  # 2: the decoder's child runs under each DataLoader worker
def test_a_hanging_or_crashing_decoder_costs_only_its_sample(tmp_path, tiny_world, workers):
    recipe = stage1_recipe(tmp_path, tiny_world, "faults")
    out = run_train([recipe, "epochs=1", "decode_time_limit_s=3", f"dataloader_workers={workers}"],
                    env={"VIDLMM_DECODE_FAULT": "hang:clip2.mp4,crash:clip5.mp4"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = (out.stdout + out.stderr).splitlines()
    assert any("clip2.mp4" in line and "did not finish within 3 s" in line for line in lines)
    assert any("clip5.mp4" in line and "crashed" in line for line in lines)
    state = json.loads((tmp_path / "faults" / "model" / "trainer_state.json").read_text())
    assert sorted(s["id"] for s in state["skipped"]) == ["c2", "c5", "c7"]
    assert state["samples"] == 5 and state["step"] == 4  # every other sample read, every step taken


def test_feature_cache_changes_nothing_but_the_work(tmp_path, tiny_world):
    """A frozen tower's features cached per clip: the trained weights are identical to a run without the cache,
    and the second epoch reads every readable clip from the cache instead of decoding it again."""
    from train.data import shared_feature_cache
    from train.trainer import run

    plain_recipe = load_recipe(stage1_recipe(tmp_path, tiny_world, "plain"))
    plain = run(plain_recipe, progress=False)
    cached_recipe = load_recipe(stage1_recipe(tmp_path, tiny_world, "cached"), ["feature_cache_mb=7"])
    cached = run(cached_recipe, progress=False)
    cache = shared_feature_cache(7 << 20)
    assert cache.hits >= 7  # epoch 2: the 7 readable clips (the corrupt one is never cached)
    start = connector_start(build_model(plain_recipe))
    assert_same_trained_weights(connector_of(plain), connector_of(cached), start)  # identical, and trained
    plain_losses = logged_losses(tmp_path / "plain")
    assert_loss_fell(plain_losses)
    assert_same_losses(tmp_path / "cached", plain_losses, range(1, 9), rel=0)  # the same loss at every step


def test_overrides_read_numbers_without_a_dot():
    recipe = load_recipe("train/configs/toy_stage1.yaml", ["learning_rate=2e-3", "epochs=3", "seed=7"])
    assert recipe.learning_rate == 0.002 and recipe.epochs == 3 and recipe.seed == 7
    assert isinstance(recipe.seed, int)
    assert load_recipe("train/configs/toy_stage1.yaml", ["decode_time_limit_s=2.5"]).decode_time_limit_s == 2.5
    with pytest.raises(ValueError, match="decode_time_limit_s"):
        load_recipe("train/configs/toy_stage1.yaml", ["decode_time_limit_s=-1"])


@pytest.mark.parametrize("connector, options", [("pool", {"token_budget": 144}), ("tome", {"token_budget": 64}),
                                                ("groupresampler", {})])
def test_visual_token_count_matches_the_connector_at_every_frame_count(connector, options):
    # a budget compressor's tokens per frame shrink as frames grow (min(budget // frames, P)): the count the
    # dataset checks max_length with must be the connector's own, not a line through 1 and 2 frames
    from train.data import VisualTokenCount

    kwargs = {"num_queries": 16, "group": 4} if connector == "groupresampler" else {}
    model = build_tiny_model(connector, connector_options=options or None, **kwargs)
    count = VisualTokenCount.of(model, 16)
    assert [count(t) for t in range(1, 17)] == [model.num_visual_tokens(t) for t in range(1, 17)]
    if options:
        assert count(16) == options["token_budget"]  # 9 (pool: a square) x 16 frames, 4 x 16


# ---- stage 2's option_weight -------------------------------------------------------------------------------
def test_option_continuations_follow_the_options_that_share_the_answers_prefix():
    from train.data import option_continuations

    ignore = -100
    labels = [ignore, ignore, 5, 6, 7, 2]  # the answer 5 6 7 <eos> after an unsupervised prompt
    options = [[ignore, ignore, 5, 6, 7, 2], [ignore, ignore, 5, 6, 8, 2], [ignore, ignore, 5, 9, 2],
               [ignore, ignore, 4, 2], [ignore, ignore, 5, 6, 7, 3, 2]]  # the last one extends the answer
    # after "5 6", options 1 and 2 go on with 7 or 8; after "5", with 6 or 9; the answer's own token comes first
    assert option_continuations(labels, options) == [[5, 4], [6, 9], [7, 8], [2, 3]]


def test_option_loss_is_minus_the_log_probability_kept_on_the_options():
    from train.trainer import option_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 10, requires_grad=True)
    labels = torch.full((2, 6), -100)
    labels[0, 3:] = torch.tensor([4, 5, 6])  # positions 2, 3 and 4 predict them
    allowed = [[[4, 1], [5], [6, 0, 9]], None]
    loss = option_loss(logits, labels, allowed)
    p = logits.softmax(-1)
    expected = -(p[0, 2, [4, 1]].sum().log() + p[0, 3, 5].log() + p[0, 4, [6, 0, 9]].sum().log()) / 3
    assert torch.allclose(loss[0], expected) and loss[1] == 0
    # where every token is allowed, nothing is asked
    assert option_loss(logits, labels, [[list(range(10))] * 3, None]).abs().max() < 1e-6
    # its gradient moves probability onto the allowed tokens, not between them
    loss[0].backward()
    grad = logits.grad[0, 2]
    assert (grad[[4, 1]] < 0).all() and (grad[[0, 2, 3, 5, 6, 7, 8, 9]] > 0).all()


def test_option_weight_adds_the_option_loss_to_multiple_choice_samples_only(tmp_path, tiny_world):
    """A stage-2 dataset with options: each answer token's allowed set starts with that token, in the order the
    spliced labels supervise them, and the step's loss grows by the option loss on the samples with options; one
    whose answer is not known (`answer_known: false`) has that loss alone."""
    from train.data import collate
    from train.trainer import TrainingStep, _dataset

    mc = {"id": "mc", "video": "videos/clip0.mp4", "options": ["a square", "a circle", "a cross", "two"],
          "conversations": [{"from": "human", "value": "<image>\nWhat moves?\nA. a square\nB. a circle\nC. a cross"
                             "\nD. two"}, {"from": "gpt", "value": "a square"}]}
    plain = json.loads((tiny_world["root"] / "qa.json").read_text())[0]
    other = {**mc, "id": "other", "video": "videos/clip1.mp4", "answer_known": False}  # asked of another clip
    (tmp_path / "mc.json").write_text(json.dumps([mc, plain, other]))
    recipe = load_recipe(write_recipe(tmp_path / "s2.yaml", stage="finetune", template="qwen2_base",
                                      llm=str(tiny_world["llm"]), vision_tower=str(tiny_world["vision"]),
                                      annotations=[str(tmp_path / "mc.json")],
                                      video_roots=[str(tiny_world["root"])], option_weight=1.0))
    model = build_model(recipe)
    dataset, _, _ = _dataset(model, recipe)
    batch = collate([dataset[0], dataset[1], dataset[2]])
    mc_allowed, plain_allowed, _ = batch["allowed"]
    assert plain_allowed is None and len(mc_allowed[0]) > 1 and mc_allowed[-1] == mc_allowed[-1][:1]  # eos only
    visual = [model.connect(model.vision_tower(p)) for p in batch["pixel_values"]]
    _, _, labels = model.build_inputs(batch["input_ids"], visual, batch["labels"], padding_side="right")
    assert [int(t) for t in labels[0][labels[0] != -100]] == [tokens[0] for tokens in mc_allowed]
    args = (batch["pixel_values"], batch["input_ids"], batch["labels"], None, None, None, batch["allowed"],
            batch["answer_weights"])
    with torch.no_grad():
        weighted = TrainingStep(model, option_weight=1.0)(*args)
        unweighted = TrainingStep(model)(*args)
    assert weighted[0] > unweighted[0] and weighted[1] == unweighted[1]
    # the question asked of another clip's video trains its option loss alone
    assert batch["answer_weights"].tolist() == [1.0, 1.0, 0.0] and unweighted[2] == 0 < weighted[2]
