"""The training recipe: plan of the A100 stages, what each stage trains, a tiny two-stage run end to end,
kill-and-resume to the same weights, and 2-process data parallel on CPU (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.videos import make_moving_square_frames, write_video
from train.recipe import load_recipe
from train.trainer import apply_tuning
from vidlmm.checkpoint import load_model, read_state_dict
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


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_world):
    straight = run_train([stage1_recipe(tmp_path, tiny_world, "straight")])
    assert straight.returncode == 0, straight.stderr[-2000:]
    recipe = stage1_recipe(tmp_path, tiny_world, "killed")
    killed = run_train([recipe], env={"VIDLMM_TRAIN_DIE_AFTER_STEP": "5"})
    assert killed.returncode == -9  # really killed, after the checkpoint of step 4 and one more step
    assert not (tmp_path / "killed" / "model").exists()
    resumed = run_train([recipe])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step-0000004" in resumed.stdout + resumed.stderr
    a = torch.load(tmp_path / "straight" / "model" / "connector" / "pytorch_model.bin", weights_only=True)
    b = torch.load(tmp_path / "killed" / "model" / "connector" / "pytorch_model.bin", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_cpu_processes_match_one(tmp_path, tiny_world):
    single = run_train([stage1_recipe(tmp_path, tiny_world, "one"), "epochs=1"])
    assert single.returncode == 0, single.stderr[-2000:]
    recipe = stage1_recipe(tmp_path, tiny_world, "two")
    with socket.socket() as sock:  # a free loopback port for the two processes' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "train/configs/cpu_2proc.yaml",
           "--main_process_port", str(port), "-m", "train", "run", str(recipe), "epochs=1", "--no-progress"]
    double = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert double.returncode == 0, double.stderr[-3000:]
    assert "accumulation 1" in double.stdout + double.stderr  # 2 processes x 1 per device = global batch 2
    assert "accumulation 2" in single.stdout + single.stderr
    a = torch.load(tmp_path / "one" / "model" / "connector" / "pytorch_model.bin", weights_only=True)
    b = torch.load(tmp_path / "two" / "model" / "connector" / "pytorch_model.bin", weights_only=True)
    start = read_state_dict(tmp_path / "one" / "model")  # sanity: training moved the weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert start


def test_feature_cache_changes_nothing_but_the_work(tmp_path, tiny_world):
    """A frozen tower's features cached per clip: the trained weights are identical to a run without the cache,
    and the second epoch reads every readable clip from the cache instead of decoding it again."""
    from train.data import shared_feature_cache
    from train.trainer import run

    plain = run(load_recipe(stage1_recipe(tmp_path, tiny_world, "plain")), progress=False)
    cached_recipe = load_recipe(stage1_recipe(tmp_path, tiny_world, "cached"), ["feature_cache_mb=7"])
    cached = run(cached_recipe, progress=False)
    cache = shared_feature_cache(7 << 20)
    assert cache.hits >= 7  # epoch 2: the 7 readable clips (the corrupt one is never cached)
    a = torch.load(plain / "connector" / "pytorch_model.bin", weights_only=True)
    b = torch.load(cached / "connector" / "pytorch_model.bin", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_overrides_read_numbers_without_a_dot():
    recipe = load_recipe("train/configs/toy_stage1.yaml", ["learning_rate=2e-3", "epochs=3", "seed=7"])
    assert recipe.learning_rate == 0.002 and recipe.epochs == 3 and recipe.seed == 7
    assert isinstance(recipe.seed, int)


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
