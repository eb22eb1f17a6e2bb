"""The CPU precision choice (vidlmm/precision.py): capability detection, the micro-benchmark, and `choose`.

The choice logic runs on injected capabilities, speeds and free memory, so each kind of machine is tested here:
one where bf16 is fastest (AVX512-BF16), one where fp32 is (AVX2 without int8 help), one where only int8 fits.
"""

from __future__ import annotations

import pytest
import torch

import vidlmm.precision as precision
from vidlmm.checkpoint import load_model
from vidlmm.errors import CheckpointError
from vidlmm.precision import (LESS_EXACT_SPEEDUP, TINY_WEIGHT_BYTES, CpuCapability, choose_precision, detect_cpu,
                              measure_linear_gflops, plan_precision)

GB = 10**9
FULL = {"fp32": int(14.5 * GB), "bf16": int(7.3 * GB), "int8": int(6.2 * GB)}  # the 3B model's weights
AVX2 = CpuCapability("AMD EPYC 7B13", 2, frozenset({"avx2"}), "AVX2")
SAPPHIRE = CpuCapability("Intel Xeon Platinum 8480+", 8,
                         frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni"}),
                         "AVX512")


def must_not_measure():
    raise AssertionError("the CPU was measured for a choice that needs no measurement")


# ------------------------------------------------------------------ what the CPU is
def test_describe_names_what_decides_the_speed():
    assert AVX2.describe() == "AMD EPYC 7B13, 2 threads, AVX2 (no AVX-512, no AVX512-BF16, no AMX)"
    assert SAPPHIRE.describe() == "Intel Xeon Platinum 8480+, 8 threads, AVX-512 (AVX512-BF16, AMX, VNNI)"
    assert not AVX2.fast_bf16 and SAPPHIRE.fast_bf16
    arm = CpuCapability("aarch64", 4, frozenset(), "DEFAULT")
    assert arm.describe() == "aarch64, 4 threads, torch kernels DEFAULT"


def test_detect_cpu_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n")
    cpu = detect_cpu(info)
    assert cpu.model == "AMD EPYC 7B13" and cpu.flags == frozenset({"avx2"})
    assert cpu.threads == torch.get_num_threads()
    assert cpu.torch_level == torch.backends.cpu.get_cpu_capability()
    here = detect_cpu()
    print(f"\n[precision] this machine: {here.describe()}")
    assert str(here.threads) in here.describe()


def test_micro_benchmark_measures_three_precisions_quickly():
    import time

    t0 = time.perf_counter()
    speeds = measure_linear_gflops()
    took = time.perf_counter() - t0
    print(f"\n[precision] linear layer GFLOPS here: {speeds} in {took:.2f} s")
    assert set(speeds) == {"fp32", "bf16", "int8"} and all(v > 0 for v in speeds.values())
    assert took < 10, "hang guard"  # about 0.3 s on an idle 2-core machine
    assert precision.cpu_linear_gflops() is precision.cpu_linear_gflops()  # measured once per process


# ------------------------------------------------------------------ the choice
def test_gpu_keeps_bf16_where_it_has_it():
    chosen = choose_precision(FULL, "cuda", speeds=must_not_measure, free=0, gpu_bf16=True)
    assert chosen.dtype == torch.bfloat16 and chosen.quantization is None and "GPU" in chosen.reason
    t4 = choose_precision(FULL, "cuda", speeds=must_not_measure, free=0, gpu_bf16=False)  # compute capability 7.5
    assert t4.dtype == torch.float16 and t4.weight_bytes == FULL["bf16"] and "no bf16" in t4.reason


def test_tiny_models_stay_fp32_without_measuring():
    weights = {"fp32": 3 * 10**6, "bf16": 1.5 * 10**6, "int8": 2 * 10**6}
    chosen = choose_precision(weights, "cpu", speeds=must_not_measure, free=0, capability=AVX2)
    assert chosen.dtype == torch.float32 and chosen.quantization is None and chosen.gflops is None
    assert "reference's numerics" in chosen.reason
    assert choose_precision({"fp32": TINY_WEIGHT_BYTES - 1}, "cpu", speeds=must_not_measure).name == "fp32"


def test_bf16_machine_picks_bf16():
    speeds = {"fp32": 150.0, "bf16": 600.0, "int8": 520.0}  # AMX: bf16 fastest, int8 not 1.25x faster than it
    chosen = choose_precision(FULL, "cpu", speeds=speeds, free=64 * GB, capability=SAPPHIRE)
    assert chosen.name == "bf16" and chosen.dtype == torch.bfloat16 and chosen.gflops == 600.0
    assert "AVX512-BF16" in chosen.reason and "fp32 150, bf16 600, int8 520" in chosen.reason
    assert chosen.weight_bytes == FULL["bf16"] and chosen.cpu == SAPPHIRE.describe()


def test_fp32_machine_picks_fp32():
    speeds = {"fp32": 105.0, "bf16": 21.0, "int8": 120.0}  # int8 within the noise of fp32: keep the exact one
    assert 120.0 < LESS_EXACT_SPEEDUP * 105.0
    chosen = choose_precision(FULL, "cpu", speeds=speeds, free=64 * GB, capability=AVX2)
    assert chosen.name == "fp32" and chosen.quantization is None
    assert "no AVX512-BF16" in chosen.reason


def test_avx2_machine_with_room_picks_int8_when_clearly_faster():
    speeds = {"fp32": 105.0, "bf16": 21.0, "int8": 296.0}  # this project's EPYCs
    chosen = choose_precision(FULL, "cpu", speeds=speeds, free=64 * GB, capability=AVX2)
    assert chosen.name == "int8" and chosen.quantization == "int8" and chosen.dtype == torch.float32


def test_only_int8_fits():
    speeds = {"fp32": 105.0, "bf16": 100.0, "int8": 50.0}  # int8 slowest, but the only one that fits
    free = 7.5 * GB  # int8 needs 6.2 * 1.1 + 0.5 GiB = 7.4 GB; bf16 8.6 GB
    chosen = choose_precision(FULL, "cpu", speeds=speeds, free=free, capability=AVX2)
    assert chosen.name == "int8"
    assert "fp32, bf16 would not fit the 7.5 GB free" in chosen.reason


def test_nothing_fits_returns_the_smallest_and_the_check_refuses_it():
    speeds = {"fp32": 105.0, "bf16": 21.0, "int8": 296.0}
    chosen = choose_precision(FULL, "cpu", speeds=speeds, free=2 * GB, capability=AVX2)
    assert chosen.name == "int8" and "none fits" in chosen.reason
    with pytest.raises(CheckpointError, match="Model 'big' needs 7.4 GB of memory in int8"):
        precision.check_precision_fits(chosen, name="big", free=2 * GB)


def test_plan_respects_explicit_choices():
    params = {"total": 10**6, "llm_linear_weights": 6 * 10**5, "llm_linear_rows": 10**3, "llm_linear_biases": 0}
    bf16 = plan_precision(params, "cpu", dtype="bf16", speeds=must_not_measure)
    assert bf16.name == "bf16" and bf16.reason == "bf16, as asked." and bf16.weight_bytes == 2 * 10**6
    assert plan_precision(params, "cpu", dtype=torch.float16).name == "fp16"
    int8 = plan_precision(params, "cpu", quantization="int8")
    assert int8.name == "int8" and int8.dtype == torch.float32
    bnb = plan_precision(params, "cpu", quantization="4bit")
    assert bnb.name == "fp32 + 4bit" and bnb.mode == "4bit"
    with pytest.raises(CheckpointError, match="int8 quantization computes in fp32"):
        plan_precision(params, "cpu", dtype="bf16", quantization="int8")
    with pytest.raises(CheckpointError, match="CPU only"):
        plan_precision(params, "cuda", quantization="int8")
    with pytest.raises(CheckpointError, match="Unknown quantization '2bit'"):
        plan_precision(params, "cpu", quantization="2bit")
    with pytest.raises(CheckpointError, match="Unknown dtype 'int3'"):
        plan_precision(params, "cpu", dtype="int3")


# ------------------------------------------------------------------ through load_model
def test_tiny_checkpoints_load_in_fp32_by_default(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(precision, "cpu_linear_gflops", must_not_measure)
    model = load_model(tiny_checkpoints["group"], tokenizer=False)
    assert model.dtype == torch.float32 and model.precision.name == "fp32"
    assert model.precision.to_json()["reason"].startswith("fp32 because the weights are small")


def test_auto_on_a_big_model_loads_the_chosen_int8_and_generates(tiny_checkpoints, monkeypatch, small_video):
    """A tiny checkpoint treated as big (threshold 0) on a machine where int8 measures fastest."""
    from vidlmm.pipeline import GenerationSettings, VideoLMM

    monkeypatch.setattr(precision, "TINY_WEIGHT_BYTES", 0)
    monkeypatch.setattr(precision, "cpu_linear_gflops", lambda: {"fp32": 105.0, "bf16": 21.0, "int8": 296.0})
    model = load_model(tiny_checkpoints["group"], device="cpu")
    assert model.precision.name == "int8" and model.precision.gflops == 296.0
    assert "fastest precision that fits" in model.precision.reason
    answer = VideoLMM(model, cache_bytes=0).ask(small_video, "What is moving?",
                                                generation=GenerationSettings(max_new_tokens=4))
    assert 1 <= len(answer.token_ids) <= 4
