"""Which precision a model runs in: chosen by what this CPU runs fast and what fits, not by habit.

Measured on this project's machines: a 2-core AVX2-only AMD EPYC (no AVX-512, no AVX512-BF16, no AMX) runs a
linear layer at about 105 GFLOPS in fp32, 21 in bf16 (torch has no fast bf16 kernel without AVX512-BF16 / AMX),
and 296 with torch's dynamic int8 quantization; on AVX512-BF16 machines bf16 is the fast path. So:

* GPU: bf16 (its native fast dtype; unchanged).
* CPU, small model (fp32 weights under TINY_WEIGHT_BYTES): fp32, the reference's numerics (parity tests rely on it).
* CPU, big model: the fastest precision, measured here once per process, among fp32, bf16 and int8 whose weights
  fit the free memory (`vidlmm.memory`); a less exact one must be clearly faster (LESS_EXACT_SPEEDUP) to win.

`load_model(dtype="auto")` uses `plan_precision`; the loaded model carries the result as `model.precision`.
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from .errors import CheckpointError
from . import memory
from .memory import gigabytes, needed_bytes, weight_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
                 "float16": "fp16"}
CPU_CANDIDATES = ("fp32", "bf16", "int8")  # most exact first
# under 1 GB of fp32 weights: everything this project trains (a few MB) and far below the smallest published
# TinyLLaVA checkpoint (Qwen2.5-0.5B + SigLIP, ~0.9 B parameters, 3.6 GB in fp32); fp32 costs them little
TINY_WEIGHT_BYTES = 10**9
# a less exact precision must be this much faster: the micro-benchmark moves by +-20 % on a shared 2-core machine
LESS_EXACT_SPEEDUP = 1.25
# one linear layer: 128 tokens through 1024 -> 1024 (0.27 GFLOP; 2.5 ms in fp32, 13 ms in bf16 on AVX2)
BENCH_TOKENS, BENCH_IN, BENCH_OUT = 128, 1024, 1024
BENCH_SECONDS = 0.03  # per precision and round: three rounds of the three take about 0.3 s
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")


# ---- what the CPU can do ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuCapability:
    """The CPU's model name, torch's threads, the instruction-set flags that decide fp32 / bf16 / int8 speed,
    and torch's own dispatch level (`torch.backends.cpu.get_cpu_capability()`: DEFAULT, AVX2, AVX512...)."""

    model: str
    threads: int
    flags: frozenset = field(default_factory=frozenset)
    torch_level: str = ""

    @property
    def fast_bf16(self) -> bool:
        """bf16 matmuls have native kernels (AVX512-BF16 or AMX); without them torch emulates bf16 slowly."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    def describe(self) -> str:
        """One line, e.g. 'AMD EPYC 7B13, 2 threads, AVX2 (no AVX-512, no AVX512-BF16, no AMX)'."""
        f = self.flags
        threads = f"{self.threads} thread" + ("" if self.threads == 1 else "s")
        if not f & {"avx2", "avx512f"}:
            return f"{self.model}, {threads}, torch kernels {self.torch_level or 'unknown'}"
        isa = "AVX-512" if "avx512f" in f else "AVX2"
        extras = [("AVX-512", "avx512f" in f)] if isa == "AVX2" else []
        extras += [("AVX512-BF16", "avx512_bf16" in f), ("AMX", bool(f & {"amx_bf16", "amx_int8"}))]
        if f & {"avx512_vnni", "avx_vnni"}:
            extras.append(("VNNI", True))
        notes = ", ".join(name if has else f"no {name}" for name, has in extras)
        return f"{self.model}, {threads}, {isa} ({notes})"


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; ('', empty) where there is none."""
    model, flags = "", set()
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
            if model and flags:
                break
    except OSError:
        pass
    return model, flags


def detect_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuCapability:
    """This machine's CPU capability (cheap: reads /proc/cpuinfo and asks torch)."""
    model, flags = _cpuinfo(cpuinfo)
    try:
        level = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        level = ""
    return CpuCapability(model=model or platform.processor() or platform.machine() or "unknown CPU",
                         threads=torch.get_num_threads(), flags=frozenset(flags & set(CPU_FLAGS)),
                         torch_level=level)


def describe_cpu() -> str:
    """One line naming this CPU and what decides its speed, for every CPU figure a benchmark prints."""
    return detect_cpu().describe()


# ---- what the CPU runs fast ------------------------------------------------------------------------------
def _best_seconds(fn: Callable[[], object], budget: float) -> float:
    best, end, runs = float("inf"), time.perf_counter() + budget, 0
    while runs < 2 or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def measure_linear_gflops(rounds: int = 3, budget: float = BENCH_SECONDS) -> dict[str, float]:
    """GFLOPS of one linear layer (BENCH_TOKENS x BENCH_IN -> BENCH_OUT) in fp32, bf16 and int8 (torch dynamic
    quantization, as `vidlmm.quantize` builds it), best of a few runs; rounds interleave the precisions so a
    neighbour's burst of work does not land on one of them only. Takes about 0.3 s."""
    from torch.nn import functional as F

    from .quantize import int8_linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BENCH_TOKENS, BENCH_IN, generator=gen)
    linear = torch.nn.Linear(BENCH_IN, BENCH_OUT)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02, generator=gen)
        linear.bias.zero_()
        int8 = int8_linear(linear)
        xb, wb, bb = x.bfloat16(), linear.weight.bfloat16(), linear.bias.bfloat16()
        runs = {"fp32": lambda: F.linear(x, linear.weight, linear.bias), "bf16": lambda: F.linear(xb, wb, bb),
                "int8": lambda: int8(x)}
        for fn in runs.values():
            fn()  # warm-up: kernel selection, packing caches
        best = {name: float("inf") for name in runs}
        for _ in range(rounds):
            for name, fn in runs.items():
                best[name] = min(best[name], _best_seconds(fn, budget))
    flops = 2.0 * BENCH_TOKENS * BENCH_IN * BENCH_OUT
    return {name: flops / seconds / 1e9 for name, seconds in best.items()}


@functools.lru_cache(maxsize=1)
def cpu_linear_gflops() -> dict[str, float]:
    """`measure_linear_gflops()`, measured once per process (the first big model loaded on CPU pays for it)."""
    return measure_linear_gflops()


# ---- the choice ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """How a model is loaded: `dtype` of its unquantized parts, `quantization` of the LLM's linear layers (None,
    "int8", "8bit", "4bit"), the measured GFLOPS of a linear layer in this precision (None when not measured),
    one sentence saying why, the estimated weight bytes, and the CPU it was chosen for."""

    dtype: torch.dtype
    quantization: str | None
    gflops: float | None
    reason: str
    weight_bytes: int | None = None
    cpu: str | None = None
    measured: Mapping[str, float] | None = None  # GFLOPS of every precision measured, when the choice measured

    @property
    def name(self) -> str:
        """'fp32', 'bf16', 'fp16', 'int8', or '<dtype> + 8bit' / '<dtype> + 4bit' (bitsandbytes)."""
        base = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, str(self.dtype))
        if self.quantization == "int8":
            return "int8"
        return f"{base} + {self.quantization}" if self.quantization else base

    @property
    def mode(self) -> str:
        """The weight-estimate mode of `vidlmm.memory` (fp32, bf16, fp16, 8bit, 4bit, int8)."""
        return self.quantization or self.name

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": str(self.dtype).replace("torch.", ""), "quantization": self.quantization,
                "gflops": None if self.gflops is None else round(self.gflops, 1), "reason": self.reason,
                "weight_bytes": self.weight_bytes, "cpu": self.cpu,
                "measured_gflops": None if self.measured is None else
                {k: round(v, 1) for k, v in self.measured.items()}}


def _int8_precision(gflops, reason, weights, cpu, measured) -> Precision:
    return Precision(torch.float32, "int8", gflops, reason, weights, cpu, measured)


def _gflops_text(speeds: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {speeds[name]:.0f}" for name in CPU_CANDIDATES if name in speeds)


def choose_precision(weights: Mapping[str, int], device: str | torch.device = "cpu", *, free: int | None = None,
                     speeds: Mapping[str, float] | Callable[[], Mapping[str, float]] | None = None,
                     capability: CpuCapability | None = None, gpu_bf16: bool | None = None) -> Precision:
    """The precision for a model whose weights take `weights[mode]` bytes (modes fp32, bf16, int8) on `device`.

    GPU: bf16, or fp16 on a GPU without bf16 (`gpu_bf16`, default from its compute capability). CPU: fp32 when
    the fp32 weights are under TINY_WEIGHT_BYTES; otherwise the fastest (GFLOPS of a linear layer, `speeds`,
    default measured once per process) of fp32, bf16, int8 whose weights plus the margin fit `free` bytes
    (default: the CPU's free memory); a less exact precision wins only when LESS_EXACT_SPEEDUP
    times faster. When none fits, the smallest is returned and `vidlmm.memory.check_weights_fit` refuses it.
    speeds / free / capability / gpu_bf16 are injectable for tests and for callers that measured already."""
    device = torch.device(device)
    if device.type == "cuda":
        if gpu_bf16 is None:
            gpu_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
        if gpu_bf16:
            return Precision(torch.bfloat16, None, None, "bf16 on the GPU: its native fast dtype, half the memory "
                             "of fp32.", weights.get("bf16"))
        return Precision(torch.float16, None, None, "fp16 because this GPU has no bf16 (compute capability under "
                         "8.0, e.g. a T4): half the memory of fp32.", weights.get("bf16"))
    fp32 = weights["fp32"]
    if fp32 < TINY_WEIGHT_BYTES:
        return Precision(torch.float32, None, None,
                         f"fp32 because the weights are small ({gigabytes(fp32)}, under "
                         f"{gigabytes(TINY_WEIGHT_BYTES)}): full precision costs little and keeps the reference's "
                         "numerics.", fp32)
    capability = capability or detect_cpu()
    cpu = capability.describe()
    free = memory.free_memory_bytes("cpu") if free is None else free
    if speeds is None:
        speeds = cpu_linear_gflops()
    elif callable(speeds):
        speeds = speeds()
    speeds = dict(speeds)
    fitting = [m for m in CPU_CANDIDATES if m in weights and m in speeds and needed_bytes(weights[m]) <= free]
    if not fitting:
        smallest = min((m for m in CPU_CANDIDATES if m in weights), key=lambda m: weights[m])
        reason = (f"{smallest}, the smallest precision, because none fits the {gigabytes(free)} free "
                  f"(the weights alone take {gigabytes(weights[smallest])}).")
        if smallest == "int8":
            return _int8_precision(speeds.get("int8"), reason, weights[smallest], cpu, speeds)
        return Precision(DTYPES[smallest], None, speeds.get(smallest), reason, weights[smallest], cpu, speeds)
    best = fitting[0]
    for mode in fitting[1:]:  # ordered most exact first
        if speeds[mode] >= LESS_EXACT_SPEEDUP * speeds[best]:
            best = mode
    left_out = [m for m in CPU_CANDIDATES if m in weights and m not in fitting]
    fits_note = f"; {', '.join(left_out)} would not fit the {gigabytes(free)} free" if left_out else ""
    what = "int8 (torch dynamic quantization of the LLM's linear layers)" if best == "int8" else best
    reason = (f"{what} because it is the fastest precision that fits on this CPU ({cpu}): a linear layer runs at "
              f"{_gflops_text(speeds)} GFLOPS{fits_note}.")
    if best == "int8":
        return _int8_precision(speeds[best], reason, weights[best], cpu, speeds)
    return Precision(DTYPES[best], None, speeds[best], reason, weights[best], cpu, speeds)


def _asked_dtype(dtype) -> str | None:
    """'fp32' / 'bf16' / 'fp16' for an explicit dtype, None for auto."""
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise CheckpointError(f"Unsupported dtype {dtype} (use fp32, bf16 or fp16).")
        return names[dtype]
    if dtype in (None, "auto"):
        return None
    if dtype not in DTYPE_ALIASES:
        raise CheckpointError(f"Unknown dtype '{dtype}' (use fp32, bf16 or fp16).")
    return DTYPE_ALIASES[dtype]


def plan_precision(params: dict, device: str | torch.device, *, dtype="auto", quantization: str | None = None,
                   free: int | None = None, speeds=None, capability: CpuCapability | None = None) -> Precision:
    """What `load_model` loads in, from the model's parameter counts (`vidlmm.memory.parameter_breakdown`):
    an explicit dtype and / or quantization as asked, otherwise `choose_precision`. Raises CheckpointError for
    an unknown dtype or quantization, or a combination that cannot run (int8 off the CPU or not in fp32)."""
    from .quantize import MODES as QUANTIZATION_MODES

    device = torch.device(device)
    asked = _asked_dtype(dtype)
    if quantization is not None and quantization not in QUANTIZATION_MODES:
        raise CheckpointError(f"Unknown quantization '{quantization}' (use {', '.join(QUANTIZATION_MODES)}).")
    if quantization == "int8":
        if device.type != "cpu":
            raise CheckpointError("int8 quantization runs on the CPU only; use 8bit or 4bit on a GPU.")
        if asked not in (None, "fp32"):
            raise CheckpointError(f"int8 quantization computes in fp32; drop the {asked} dtype or pick 8bit / 4bit.")
        return _int8_precision(None, "int8, as asked.", weight_bytes(params, "int8"), None, None)
    if quantization is not None:  # bitsandbytes: the rest stays in the dtype asked, fp32 on CPU and bf16 on GPU
        rest = asked or ("bf16" if device.type == "cuda" else "fp32")
        return Precision(DTYPES[rest], quantization, None, f"{rest} with {quantization} bitsandbytes linear layers "
                         "in the LLM, as asked.", weight_bytes(params, quantization, dtype=rest))
    if asked is not None:
        return Precision(DTYPES[asked], None, None, f"{asked}, as asked.", weight_bytes(params, asked))
    weights = {mode: weight_bytes(params, mode) for mode in CPU_CANDIDATES}
    return choose_precision(weights, device, free=free, speeds=speeds, capability=capability)


def check_precision_fits(precision: Precision, *, name: str, device: str | torch.device = "cpu",
                         free: int | None = None) -> int:
    """`vidlmm.memory.check_weights_fit` for a planned precision: raise CheckpointError when its weights plus
    the margin do not fit; return the bytes needed."""
    return memory.check_weights_fit(precision.weight_bytes or 0, name=name, precision=precision.name, device=device,
                             free=free)


__all__ = ["CpuCapability", "Precision", "detect_cpu", "describe_cpu", "measure_linear_gflops", "cpu_linear_gflops",
           "choose_precision", "plan_precision", "check_precision_fits", "TINY_WEIGHT_BYTES", "LESS_EXACT_SPEEDUP"]
