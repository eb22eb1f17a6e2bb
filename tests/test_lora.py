"""LoRA fine-tuning (`tune: {language_model: lora}`) with PEFT on the tiny world: only the adapters train, the run
resumes after a kill to the same adapters, and the merged model answers like the base with the adapter applied."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.ports import free_port
from tests.test_train import run_train, tiny_world, write_recipe  # noqa: F401 - tiny_world is a fixture
from train.plan import make_plan
from train.recipe import load_recipe
from vidlmm.checkpoint import build_from_parts, load_model, save_model

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_world):
    """A stage-2 starting point: the tiny world's LLM and tower composed with a fresh connector."""
    model = build_from_parts(str(tiny_world["llm"]), str(tiny_world["vision"]), connector_type="groupresampler",
                             num_queries=16, group=4, seed=0, video_sampling={"mode": "uniform", "num_frames": 4})
    return save_model(model, tmp_path_factory.mktemp("lora") / "base")


def lora_recipe(tmp_path, world, base, name):
    return write_recipe(tmp_path / f"{name}.yaml", stage="finetune", template="qwen2_base", learning_rate=5e-3,
                        tune={"language_model": "lora", "vision_tower": "frozen", "connector": "frozen"},
                        lora=LORA, init=str(base), annotations=[str(world["root"] / "qa.json")],
                        video_roots=[str(world["root"])], output_dir=str(tmp_path / name))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_world, base):
    tmp = tmp_path_factory.mktemp("lora-run")
    out = run_train([lora_recipe(tmp, tiny_world, base, "straight")])
    assert out.returncode == 0, out.stderr[-2000:]
    return tmp / "straight" / "model"


@pytest.fixture(scope="module")
def lora_recipe_file(lora_run):
    return lora_run.parent.parent / "straight.yaml"


def test_lora_trains_only_the_adapters(lora_run, lora_recipe_file, base):
    adapter = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    start, merged = load_model(base).state_dict(), load_model(lora_run).state_dict()
    lm = load_model(base).language_model
    layers = lm.config.num_hidden_layers
    expected = sum(4 * (m.in_features + m.out_features) for name, m in lm.named_modules()
                   if name.endswith(("q_proj", "v_proj")))
    assert len(adapter) == 2 * 2 * layers and sum(t.numel() for t in adapter.values()) == expected
    changed = sorted(k for k in start if not torch.equal(start[k], merged[k]))
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)  # merged adapters only
    assert len(changed) == 2 * layers
    assert make_plan(load_recipe(lora_recipe_file))["parts"]["language_model"]["trainable"] == expected


def test_merged_model_answers_like_the_base_with_the_adapter(lora_run, base, tiny_world):
    """The saved (merged) model gives the logits and greedy ids of the base with the saved adapter applied by
    PEFT; the base alone gives other logits (the tiny LLM's greedy ids are too flat to tell them apart)."""
    from peft import PeftModel

    from vidlmm.hf import TinyLlavaProcessor

    inputs = TinyLlavaProcessor.from_pretrained(base)(text="What moves?",
                                                      videos=str(tiny_world["root"] / "videos" / "clip0.mp4"))
    merged = load_model(lora_run)
    unmerged = load_model(base)
    unmerged.language_model = PeftModel.from_pretrained(unmerged.language_model, lora_run / "adapter")
    with torch.no_grad():
        a, b, plain = (m(**inputs).logits for m in (merged, unmerged, load_model(base)))
    assert torch.allclose(a, b, atol=1e-4)
    assert (a - plain).abs().max() > 1e-2
    assert torch.equal(merged.generate(**inputs, max_new_tokens=8), unmerged.generate(**inputs, max_new_tokens=8))


def test_killed_lora_run_resumes_to_the_same_adapters(tmp_path, tiny_world, base, lora_run):
    recipe = lora_recipe(tmp_path, tiny_world, base, "killed")
    killed = run_train([recipe], env={"VIDLMM_TRAIN_DIE_AFTER_STEP": "5"})
    assert killed.returncode == -9
    resumed = run_train([recipe])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step-0000004" in resumed.stdout + resumed.stderr
    a = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_lora_is_for_the_language_model_and_a_trained_connector(tmp_path):
    tower = write_recipe(tmp_path / "tower.yaml", tune={"language_model": "frozen", "vision_tower": "lora",
                                                        "connector": "full"})
    with pytest.raises(ValueError, match="lora is for the language model and the connector"):
        load_recipe(tower)
    fresh = write_recipe(tmp_path / "fresh.yaml", tune={"language_model": "frozen", "vision_tower": "frozen",
                                                        "connector": "lora"})
    with pytest.raises(ValueError, match="adapts a trained connector"):
        load_recipe(fresh)
    with pytest.raises(ValueError, match="quantize_base is 4bit"):
        load_recipe(write_recipe(tmp_path / "q.yaml", lora={"quantize_base": "3bit"}))
    with pytest.raises(ValueError, match="lora takes"):
        load_recipe(write_recipe(tmp_path / "typo.yaml", lora={"rank": 4}))


def test_two_cpu_processes_train_the_adapters_of_one(tmp_path, tiny_world, base, lora_run):
    """Under `accelerate launch` (two CPU processes, gloo, one sample each per step) the adapters end as in the
    one-process run accumulating the same global batch of two."""
    import os
    import subprocess
    import sys

    from tests.test_train import ROOT

    recipe = lora_recipe(tmp_path, tiny_world, base, "two")
    port = free_port()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "train/configs/cpu_2proc.yaml",
           "--main_process_port", str(port), "-m", "train", "run", str(recipe), "--no-progress"]
    double = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert double.returncode == 0, double.stderr[-3000:]
    assert "accumulation 1" in double.stdout + double.stderr
    a = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # B starts at zero: it trained


def test_qlora_trains_adapters_over_a_4bit_base_and_merges_them_into_the_full_precision_one(tmp_path, tiny_world,
                                                                                            base):
    """`lora.quantize_base: 4bit`: the LLM's linears are NF4 while the adapters train (the checkpoint holds the
    packed weights and their quantization state), and the saved model is the full-precision base with the adapter
    merged: every weight but the adapted ones is the base's exactly, and it answers like base + adapter."""
    from peft import PeftModel

    from vidlmm.hf import TinyLlavaProcessor

    recipe = lora_recipe(tmp_path, tiny_world, base, "qlora")
    out = run_train([recipe, "lora.quantize_base=4bit"])
    assert out.returncode == 0, out.stderr[-2000:]
    model_dir = tmp_path / "qlora" / "model"
    checkpoint = load_file(next((tmp_path / "qlora" / "checkpoints").glob("step-*")) / "model.safetensors")
    packed = [k for k in checkpoint if "q_proj" in k and "quant_state" in k]
    assert packed and all(checkpoint[k.split(".weight")[0] + ".weight"].dtype == torch.uint8 for k in packed)
    adapter = load_file(model_dir / "adapter" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 1e-3
    start, merged = load_model(base).state_dict(), load_model(model_dir).state_dict()
    changed = sorted(k for k in start if not torch.equal(start[k], merged[k]))
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    inputs = TinyLlavaProcessor.from_pretrained(base)(text="What moves?",
                                                      videos=str(tiny_world["root"] / "videos" / "clip0.mp4"))
    unmerged = load_model(base)
    unmerged.language_model = PeftModel.from_pretrained(unmerged.language_model, model_dir / "adapter")
    with torch.no_grad():
        assert torch.allclose(load_model(model_dir)(**inputs).logits, unmerged(**inputs).logits, atol=1e-4)


def test_connector_lora_trains_adapters_on_its_linears_and_merges_them(tmp_path, tiny_world, base):
    """`connector: lora` on a trained connector: adapters on every linear of the resampler train, its learned
    queries and every other weight stay as they were, the adapter is saved in PEFT's state-dict layout and the
    merged model answers like the base with the adapter injected back."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    from vidlmm.hf import TinyLlavaProcessor

    recipe = write_recipe(tmp_path / "c.yaml", stage="finetune", template="qwen2_base", learning_rate=5e-3,
                          tune={"language_model": "frozen", "vision_tower": "frozen", "connector": "lora"},
                          lora=LORA, init=str(base), annotations=[str(tiny_world["root"] / "qa.json")],
                          video_roots=[str(tiny_world["root"])], output_dir=str(tmp_path / "c"))
    out = run_train([recipe])
    assert out.returncode == 0, out.stderr[-2000:]
    model_dir = tmp_path / "c" / "model"
    adapter = load_file(model_dir / "connector_adapter" / "adapter_model.safetensors")
    linears = {name: m for name, m in load_model(base).connector.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(adapter) == 2 * len(linears) and max(v.abs().max().item() for k, v in adapter.items()
                                                    if "lora_B" in k) > 1e-3
    assert sum(v.numel() for v in adapter.values()) == sum(4 * (m.in_features + m.out_features)
                                                           for m in linears.values())
    assert make_plan(load_recipe(recipe))["parts"]["connector"]["trainable"] == sum(v.numel()
                                                                                   for v in adapter.values())
    start, merged = load_model(base).state_dict(), load_model(model_dir).state_dict()
    changed = {k for k in start if not torch.equal(start[k], merged[k])}
    assert changed and changed <= {f"connector.{name}.weight" for name in linears}
    inputs = TinyLlavaProcessor.from_pretrained(base)(text="What moves?",
                                                      videos=str(tiny_world["root"] / "videos" / "clip0.mp4"))
    unmerged = load_model(base)
    config = LoraConfig.from_pretrained(model_dir / "connector_adapter")
    inject_adapter_in_model(config, unmerged.connector)
    set_peft_model_state_dict(unmerged.connector, adapter)
    with torch.no_grad():
        assert torch.allclose(load_model(model_dir)(**inputs).logits, unmerged(**inputs).logits, atol=1e-4)


def test_qlora_with_connector_lora_saves_both_merged(tmp_path, tiny_world, base):
    """Adapters on both parts over a 4-bit LLM: the connector's adapter is merged before the LLM's is merged into
    the full-precision base, so the save does not meet adapter keys in a plain connector."""
    recipe = write_recipe(tmp_path / "both.yaml", stage="finetune", template="qwen2_base", learning_rate=5e-3,
                          tune={"language_model": "lora", "vision_tower": "frozen", "connector": "lora"},
                          lora={**LORA, "quantize_base": "4bit"}, init=str(base),
                          annotations=[str(tiny_world["root"] / "qa.json")], video_roots=[str(tiny_world["root"])],
                          output_dir=str(tmp_path / "both"), epochs=1)
    out = run_train([recipe])
    assert out.returncode == 0, out.stderr[-2000:]
    start, merged = load_model(base).state_dict(), load_model(tmp_path / "both" / "model").state_dict()
    changed = {k.split(".")[0] for k in start if not torch.equal(start[k], merged[k])}
    assert changed == {"language_model", "connector"}
