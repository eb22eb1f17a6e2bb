"""The recipe's distributed engines, run for real on two CPU processes with gloo: DeepSpeed ZeRO-3 and torch's FSDP2
(`train/configs/cpu_zero3.yaml`, `cpu_fsdp.yaml`, the CPU twins of the A100 configs) end full stage 2 and LoRA
with the weights of the one-process run, and a killed ZeRO-3 run resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.ports import free_port
from tests.test_train import ROOT, run_train, tiny_world, write_recipe  # noqa: F401 - tiny_world is a fixture
from vidlmm.checkpoint import build_from_parts, load_model, save_model

pytest.importorskip("deepspeed")

ENGINES = {"zero3": "train/configs/cpu_zero3.yaml", "fsdp": "train/configs/cpu_fsdp.yaml"}
FULL = {"language_model": "full", "vision_tower": "frozen", "connector": "full"}
LORA = {"language_model": "lora", "vision_tower": "frozen", "connector": "full"}


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
    """Six readable clips' questions (a skipped sample weighs differently under DeepSpeed, see the trainer) and
    a stage-2 starting point."""
    root = tmp_path_factory.mktemp("engines")
    qa = json.loads((tiny_world["root"] / "qa.json").read_text())[:6]
    (root / "qa.json").write_text(json.dumps(qa))
    model = build_from_parts(str(tiny_world["llm"]), str(tiny_world["vision"]), connector_type="groupresampler",
                             num_queries=16, group=4, seed=0, video_sampling={"mode": "uniform", "num_frames": 4})
    return {"qa": root / "qa.json", "videos": tiny_world["root"], "base": save_model(model, root / "base")}


def recipe(tmp_path, world, name, tune, **fields):
    return write_recipe(tmp_path / f"{name}.yaml", stage="finetune", template="qwen2_base", learning_rate=2e-3,
                        tune=tune, lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                        init=str(world["base"]), annotations=[str(world["qa"])], video_roots=[str(world["videos"])],
                        output_dir=str(tmp_path / name), **fields)


def launch(config: str, recipe_file, env=None, timeout=400):
    port = free_port()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--main_process_port",
           str(port), "-m", "train", "run", str(recipe_file), "--no-progress"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory):
    """The reference: one process accumulating the global batch of two, full stage 2 and LoRA."""
    tmp = tmp_path_factory.mktemp("one")
    runs = {}
    for kind, tune in (("full", FULL), ("lora", LORA)):
        out = run_train([recipe(tmp, world, kind, tune)])
        assert out.returncode == 0, out.stderr[-2000:]
        runs[kind] = tmp / kind / "model"
    return runs


def weights(folder):
    return load_model(folder).state_dict()


def assert_same_model(a, b, start, atol=1e-4):
    """Every weight of b is a's within float tolerance (sharded reductions sum in another order), and the run did
    train: the LLM and the connector moved from the start, by more than ten times the tolerance."""
    a, b, start = weights(a), weights(b), weights(start)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, worst
    moved = {k.split(".")[0] for k in a if not torch.equal(a[k], start[k])}
    assert moved == {"language_model", "connector"}, moved
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 10 * atol


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_train_full_stage2_like_one(engine, world, one_process, tmp_path):
    out = launch(ENGINES[engine], recipe(tmp_path, world, engine, FULL))
    assert out.returncode == 0, out.stderr[-4000:]
    assert "accumulation 1" in out.stdout + out.stderr  # 2 processes x 1 per device = the global batch
    assert_same_model(one_process["full"], tmp_path / engine / "model", world["base"])


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_train_the_lora_adapters_of_one(engine, world, one_process, tmp_path):
    out = launch(ENGINES[engine], recipe(tmp_path, world, engine, LORA))
    assert out.returncode == 0, out.stderr[-4000:]
    a = load_file(one_process["lora"] / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / engine / "model" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # B starts at zero: it trained
    assert_same_model(one_process["lora"], tmp_path / engine / "model", world["base"])  # merged alike


def test_killed_zero3_run_resumes_from_its_checkpoint(world, one_process, tmp_path):
    """SIGKILL of one process after step 3 (checkpoint at step 2) takes the launch down; the rerun resumes from
    DeepSpeed's partitioned checkpoint and ends with the uninterrupted weights."""
    config = recipe(tmp_path, world, "killed", FULL)
    killed = launch(ENGINES["zero3"], config, env={"VIDLMM_TRAIN_DIE_AFTER_STEP": "3"})
    assert killed.returncode != 0
    assert not (tmp_path / "killed" / "model").exists()
    resumed = launch(ENGINES["zero3"], config)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from step-0000002" in resumed.stdout + resumed.stderr
    assert_same_model(one_process["full"], tmp_path / "killed" / "model", world["base"])
