"""Weight-memory estimates, free memory, and the refusal before loading (vidlmm/memory.py, load_model's check).

The estimate must equal what `load_model` really allocates for a tiny model (exactly for fp32 / bf16 / fp16), and a
model whose weights cannot fit must be refused with one sentence before any weight file is opened.
"""

from __future__ import annotations

import json

import pytest
import torch

from vidlmm import memory
from vidlmm.checkpoint import check_checkpoint_fits, load_model
from vidlmm.errors import CheckpointError
from vidlmm.memory import (MARGIN_BYTES, cgroup_free_bytes, check_weights_fit, estimate_weight_bytes,
                           free_memory_bytes, needed_bytes, storage_bytes, weight_bytes)


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def parameter_bytes(model) -> int:
    """Bytes of every distinct parameter (tied lm_head once), as loaded."""
    return sum(p.numel() * p.element_size() for p in dict.fromkeys(model.parameters()))


def full_size_config():
    """The published model's shapes (SigLIP-so400m, group resampler 512 x 16, Qwen2.5-3B): 3.6 B parameters."""
    from transformers import AutoConfig

    from vidlmm.config import TinyLlavaConfig

    text = AutoConfig.for_model(
        "qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=151643,
        eos_token_id=151643, pad_token_id=151643).to_dict()
    vision = AutoConfig.for_model("siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                                  num_hidden_layers=27, num_attention_heads=16, image_size=384,
                                  patch_size=14).to_dict()
    return TinyLlavaConfig.compose(text, vision, connector_type="groupresampler", group=16, num_queries=512,
                                   num_resampler_layers=3, vision_model_name_or_path="google/siglip-so400m-patch14-384")


@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16"])
def test_estimate_equals_the_parameter_bytes_load_model_allocates(tiny_checkpoints, mode):
    folder = tiny_checkpoints["group"]
    model = load_model(folder, dtype=mode, tokenizer=False)
    assert estimate_weight_bytes(folder, mode) == parameter_bytes(model)
    assert model.precision.weight_bytes == parameter_bytes(model)


def test_int8_estimate_matches_the_loaded_int8_model(tiny_checkpoints):
    folder = tiny_checkpoints["group"]
    model = load_model(folder, quantization="int8", tokenizer=False)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert estimate_weight_bytes(folder, "int8") == storage_bytes(model) - buffers


def test_estimate_from_a_config_or_a_folder_and_per_mode_order(tiny_checkpoints):
    folder = tiny_checkpoints["naive"]
    from vidlmm.config import TinyLlavaConfig

    config = TinyLlavaConfig.from_json_file(folder / "config.json")
    sizes = {mode: estimate_weight_bytes(config, mode) for mode in memory.MODES}
    assert sizes == {mode: estimate_weight_bytes(folder, mode) for mode in memory.MODES}
    assert sizes["fp32"] == 2 * sizes["bf16"] == 2 * sizes["fp16"]
    assert sizes["fp32"] > sizes["int8"] and sizes["bf16"] > sizes["8bit"] > sizes["4bit"]
    with pytest.raises(CheckpointError, match="Unknown precision 'int3'"):
        estimate_weight_bytes(config, "int3")


def test_full_size_estimate_allocates_nothing():
    """3.6 B parameters counted on the meta device: the process does not grow by gigabytes."""
    config = full_size_config()
    before = rss_mb()
    fp32 = estimate_weight_bytes(config, "fp32")
    grew = rss_mb() - before
    assert 3.5e9 * 4 < fp32 < 3.8e9 * 4
    assert grew < 300, f"the estimate allocated {grew:.0f} MiB"
    int8 = estimate_weight_bytes(config, "int8")
    assert 5.5e9 < int8 < 7e9  # LLM linears at 1 B, the rest (0.86 B parameters) in fp32


def _write_config_only(folder, config):
    folder.mkdir()
    config.save(folder)
    return folder


def test_a_model_that_cannot_fit_is_refused_before_any_weight_is_read(tiny_checkpoints, monkeypatch):
    folder = tiny_checkpoints["group"]
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device="cpu": 100 * 10**6)

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight file was opened before the memory check")

    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", no_reading)
    monkeypatch.setattr(torch, "load", no_reading)
    with pytest.raises(CheckpointError) as info:
        load_model(folder, dtype="fp32")
    message = str(info.value)
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert f"Model '{folder.name}'" in message and "in fp32" in message and "100 MB is free" in message
    assert str(folder.parent) not in message  # never a full server path
    with pytest.raises(CheckpointError, match="needs .* in fp32"):
        check_checkpoint_fits(folder, dtype="fp32")
    plan = check_checkpoint_fits(folder, dtype="fp32", free=10**12)  # a caller that will free memory first
    assert plan.weight_bytes == estimate_weight_bytes(folder, "fp32")


def test_full_size_config_without_weights_is_refused_in_one_sentence(tmp_path, monkeypatch):
    """The published shapes on a machine with 4 GB free: even int8 (the smallest CPU precision, chosen because
    nothing fits) needs more, so load_model refuses with the numbers before looking for weights (there are none)."""
    folder = _write_config_only(tmp_path / "full-size", full_size_config())
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device="cpu": 4 * 10**9)
    import vidlmm.precision as precision

    monkeypatch.setattr(precision, "cpu_linear_gflops", lambda: {"fp32": 105.0, "bf16": 21.0, "int8": 296.0})
    with pytest.raises(CheckpointError) as info:
        load_model(folder, device="cpu")
    message = str(info.value)
    assert "'full-size' needs" in message and "in int8" in message and "4.0 GB is free" in message, message
    print(f"\n[memory] {message}")


def test_check_memory_false_skips_the_check(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device="cpu": 0)
    model = load_model(tiny_checkpoints["naive"], check_memory=False, tokenizer=False)
    assert model.precision.name == "fp32"


def test_check_weights_fit_margin_and_sentence():
    weights = 10 * 10**9
    need = needed_bytes(weights)
    assert need == int(weights * (1 + memory.MARGIN_FRACTION) + MARGIN_BYTES)
    assert check_weights_fit(weights, name="m", precision="bf16", free=need) == need
    with pytest.raises(CheckpointError, match=r"Model 'm' needs 11\.5 GB of memory in bf16 \(10\.0 GB of weights"):
        check_weights_fit(weights, name="m", precision="bf16", free=need - 1)


def test_free_memory_is_positive_and_bounded_by_meminfo():
    free = free_memory_bytes("cpu")
    available = memory.meminfo_available_bytes()
    assert free > 0
    if available is not None:
        assert free <= available


def _cgroup_v2(root, rel, limit, usage, inactive_file=0):
    folder = root / rel.lstrip("/")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "memory.max").write_text(f"{limit}\n")
    (folder / "memory.current").write_text(f"{usage}\n")
    (folder / "memory.stat").write_text(f"anon {usage}\ninactive_file {inactive_file}\n")
    return folder


def test_cgroup_v2_limit_minus_usage_tightest_level_wins(tmp_path):
    root = tmp_path / "cgroup"
    _cgroup_v2(root, "/", "max", 5 * 2**30)
    _cgroup_v2(root, "/space", 16 * 2**30, 3 * 2**30, inactive_file=2**30)  # 1 GiB of it is reclaimable cache
    _cgroup_v2(root, "/space/app", "max", 2**30)
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/space/app\n")
    assert cgroup_free_bytes(root, proc) == 16 * 2**30 - 2 * 2**30
    _cgroup_v2(root, "/space/app", 4 * 2**30, 3 * 2**30)
    assert cgroup_free_bytes(root, proc) == 2**30


def test_cgroup_v1_and_no_limit(tmp_path):
    root = tmp_path / "cgroup"
    folder = root / "memory" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "memory.limit_in_bytes").write_text(f"{8 * 2**30}\n")
    (folder / "memory.usage_in_bytes").write_text(f"{2**30}\n")
    (folder / "memory.stat").write_text("cache 0\ntotal_inactive_file 0\n")
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit at the top
    proc = tmp_path / "proc_cgroup"
    proc.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n")
    assert cgroup_free_bytes(root, proc) == 7 * 2**30
    proc.write_text("4:memory:/\n")
    assert cgroup_free_bytes(root, proc) is None


def test_bitsandbytes_formula_is_the_one_the_benchmark_uses():
    """bench_fullsize imports the library's formula (tests/test_benchmarks.py checks it against bitsandbytes)."""
    import importlib.util
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location("bench_fullsize_under_test", bench_dir / "bench_fullsize.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(bench_dir))
    assert bench.weight_bytes is weight_bytes and bench.storage_bytes is storage_bytes
    params = {"total": 1000, "llm_linear_weights": 600, "llm_linear_rows": 10, "llm_linear_biases": 0}
    assert weight_bytes(params, "8bit") == 2 * 400 + 600 + 40
    assert weight_bytes(params, "8bit", dtype="fp32") == 4 * 400 + 600 + 40
    assert weight_bytes(params, "int8") == 4 * 400 + 600 + memory.INT8_ROW_BYTES * 10
    assert json.dumps(weight_bytes(params, "4bit"))  # an int, JSON-ready
