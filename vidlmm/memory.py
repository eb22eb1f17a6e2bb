"""How many bytes a model's weights take, how many bytes a device has free, and the check between the two.

The estimate comes from the config alone: the model is built on the meta device (nothing allocated) and its
parameters are counted per part. Bytes per weight by precision ("mode"):

* ``fp32`` 4, ``bf16`` / ``fp16`` 2: every parameter.
* ``8bit`` (bitsandbytes LLM.int8): the LLM's linear layers (all but lm_head) at 1 B + a fp32 scale per output row.
* ``4bit`` (bitsandbytes NF4): those layers at 0.5 B + an absmax per 64 weights, double-quantized (1 B, plus a
  fp32 per 256 blocks). The rest (embeddings with the tied lm_head, norms, biases, tower, connector) stays in
  `dtype` for both (bf16 unless told: the GPU's dtype).
* ``int8`` (torch dynamic quantization, `vidlmm.quantize`): those layers at 1 B + 16 B per output row (fbgemm's
  packed matrix, column offsets, scale, zero point); the rest in fp32, the only dtype its kernels take.

The formulas are checked by `benchmarks/bench_fullsize.py --measure-weights`: bitsandbytes' against what it
stores (within 2 % at toy size, 0.01 % at full size), int8 against the RSS its packed layers add (21.5 MiB
measured per 2048 -> 11008 layer, 21.7 MiB estimated).

`load_model` calls `check_weights_fit` after reading config.json and before reading any weights, so a model that
cannot fit is refused with one sentence instead of the process being killed half-way through the load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import CheckpointError

MODES = ("fp32", "bf16", "fp16", "8bit", "4bit", "int8")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
INT8_ROW_BYTES = 16  # fbgemm keeps an int32 column offset, a scale and a zero point per output row, and pads
# headroom on top of the weights: one request's activations (the full-size model at 64 frames: 1.1 GiB in fp32,
# 8 % of its weights; its largest tensor in transit while loading is the same size) and the runtime itself
MARGIN_FRACTION = 0.10
MARGIN_BYTES = 512 * 2**20
GB = 1e9


# ---- counting --------------------------------------------------------------------------------------------
def build_meta_model(config, attn_implementation: str = "sdpa"):
    """The model with its parameters on the meta device (buffers real, as `load_model` builds it); lm_head tied."""
    from accelerate import init_empty_weights

    from .model import TinyLlavaVideo

    with init_empty_weights(include_buffers=False):
        model = TinyLlavaVideo(config, attn_implementation=attn_implementation)
    model.language_model.tie_weights()
    return model


def quantizable_linears(language_model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The LLM's linear layers that 8bit / 4bit / int8 quantize: every `nn.Linear` but lm_head (tied to the
    embeddings in the published models; quantizing it would break the tie)."""
    return [(name, module) for name, module in language_model.named_modules()
            if type(module) is torch.nn.Linear and name.split(".")[-1] != "lm_head"]


def parameter_breakdown(model) -> dict:
    """Parameter counts per part (tied weights once), their total, and the LLM's quantizable linears: weights,
    output rows, biases."""
    counts = model.parameter_counts()
    linear_params = linear_rows = linear_bias = 0
    for _, module in quantizable_linears(model.language_model):
        linear_params += module.weight.numel()
        linear_rows += module.out_features
        linear_bias += module.bias.numel() if module.bias is not None else 0
    return {**counts, "total": sum(counts.values()), "llm_linear_weights": linear_params,
            "llm_linear_rows": linear_rows, "llm_linear_biases": linear_bias}


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "bf16"
    if isinstance(dtype, torch.dtype):
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        if dtype not in names:
            raise CheckpointError(f"No weight estimate for dtype {dtype}.")
        return names[dtype]
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def weight_bytes(params: dict, mode: str, *, dtype=None) -> int:
    """Bytes of the weights at `mode` (see the module docstring) from `parameter_breakdown`'s counts.

    dtype: what the parts 8bit / 4bit leave unquantized are stored in (default bf16); ignored otherwise."""
    if mode not in MODES:
        raise CheckpointError(f"Unknown precision '{mode}' (use {', '.join(MODES)}).")
    total = params["total"]
    if mode in DTYPE_BYTES:
        return DTYPE_BYTES[mode] * total
    linear, rows = params["llm_linear_weights"], params["llm_linear_rows"]
    if mode == "int8":
        return 4 * (total - linear) + linear + INT8_ROW_BYTES * rows
    rest_name = _dtype_name(dtype)
    if rest_name not in DTYPE_BYTES:
        raise CheckpointError(f"Unknown dtype '{dtype}' for the unquantized parts (use fp32, bf16 or fp16).")
    rest = DTYPE_BYTES[rest_name] * (total - linear)
    if mode == "8bit":
        return rest + linear + 4 * rows  # int8 + a fp32 scale per output row
    # nf4: 4 bits per weight + absmax per 64-block, double-quantized (8 bit, fp32 per 256 blocks)
    return int(rest + 0.5 * linear + linear / 64 + 4.0 * linear / (64 * 256))


def read_config(config_or_folder):
    """A TinyLlavaConfig as is, or read from a checkpoint folder / its config.json (never a hub id: no download)."""
    from .config import TinyLlavaConfig

    if isinstance(config_or_folder, TinyLlavaConfig):
        return config_or_folder
    path = Path(config_or_folder)
    path = path / "config.json" if path.is_dir() else path
    try:
        return TinyLlavaConfig.from_json_file(path)
    except OSError:
        raise CheckpointError(f"No config.json in '{path.parent.name}'.") from None
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Bad config.json in '{path.parent.name}': {err}") from None


def estimate_weight_bytes(config_or_folder, mode: str, *, dtype=None) -> int:
    """Bytes the weights of this model take once loaded at `mode` (fp32, bf16, fp16, 8bit, 4bit, int8),
    computed from its config without allocating anything. dtype: see `weight_bytes`."""
    config = read_config(config_or_folder)
    try:
        params = parameter_breakdown(build_meta_model(config))
    except ValueError as err:
        raise CheckpointError(f"Cannot build the model of this config: {err}") from None
    return weight_bytes(params, mode, dtype=dtype)


def storage_bytes(model) -> int:
    """Bytes a loaded model's weights really occupy: every distinct storage behind its parameters and buffers,
    the statistics bitsandbytes keeps beside quantized weights (4-bit: absmax, nested absmax, code tables; 8-bit:
    a scale per row), and torch's packed int8 layers (their int8 matrix and per-row statistics)."""
    seen: set[int] = set()
    total = 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p)
        add(getattr(p, "SCB", None))
        state = getattr(p, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            state = getattr(state, "state2", None)
    for b in model.buffers():
        add(b)
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()  # an unpacked copy: count its size, the packing is the same
            total += weight.numel() + INT8_ROW_BYTES * weight.shape[0]
            total += bias.numel() * bias.element_size() if bias is not None else 0
    return total


# ---- free memory -----------------------------------------------------------------------------------------
CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712 on x86-64)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def _inactive_file(stat: Path, key: str) -> int:
    """Page cache the kernel reclaims before it kills anything: not counted as used (as the kubelet does)."""
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_dirs(proc_cgroup: Path, root: Path) -> list[tuple[Path, int]]:
    """(directory, cgroup version) of this process's memory cgroup and each ancestor up to the mount point."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            base, version = root, 2
        elif "memory" in controllers.split(","):
            base, version = root / "memory", 1
        else:
            continue
        here = base / rel.lstrip("/")
        while True:  # a parent's limit binds too; in a container the path may not exist below the mount
            if here.is_dir():
                out.append((here, version))
            if here == base or base not in here.parents:
                break
            here = here.parent
    return out


def cgroup_free_bytes(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes left under the tightest cgroup (v2 or v1) memory limit of this process: limit minus usage (without
    reclaimable inactive page cache); None when no limit applies."""
    tightest = None
    for folder, version in _cgroup_dirs(proc_cgroup, root):
        if version == 2:
            limit, usage = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
            cache = _inactive_file(folder / "memory.stat", "inactive_file")
        else:
            limit, usage = _read_int(folder / "memory.limit_in_bytes"), _read_int(folder / "memory.usage_in_bytes")
            cache = _inactive_file(folder / "memory.stat", "total_inactive_file")
        if limit is None:
            continue
        left = max(0, limit - max(0, (usage or 0) - cache))
        tightest = left if tightest is None else min(tightest, left)
    return tightest


def meminfo_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable from /proc/meminfo (bytes): what the kernel can hand out without swapping."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_memory_bytes(device: str | torch.device = "cpu") -> int:
    """Bytes free for new tensors on `device`. CPU: MemAvailable, bounded by the cgroup limit minus the cgroup's
    usage when one is set (a container or a Space); CUDA: `torch.cuda.mem_get_info` of that GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        raise CheckpointError(f"Cannot tell the free memory of device '{device}'.")
    candidates = [v for v in (meminfo_available_bytes(), cgroup_free_bytes()) if v is not None]
    if not candidates:  # not Linux: psutil when there, else no bound (nothing is refused)
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            return UNLIMITED
    return min(candidates)


# ---- the check -------------------------------------------------------------------------------------------
def needed_bytes(weights: int) -> int:
    """Weights plus the margin (MARGIN_FRACTION of them and MARGIN_BYTES: activations and the runtime)."""
    return int(weights * (1 + MARGIN_FRACTION) + MARGIN_BYTES)


def gigabytes(n: int) -> str:
    """Decimal units for people: '14.5 GB', '537 MB'."""
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1e6:.0f} MB"


def check_weights_fit(weights: int, *, name: str, precision: str, device: str | torch.device = "cpu",
                      free: int | None = None) -> int:
    """Raise CheckpointError (one sentence: the model, bytes needed, precision, bytes free) when `weights` bytes
    plus the margin do not fit the free memory of `device`; return the bytes needed (weights + margin).

    free: the free bytes to compare against (default: `free_memory_bytes(device)`)."""
    device = torch.device(device)
    need = needed_bytes(weights)
    free = free_memory_bytes(device) if free is None else free
    if need > free:
        where = "this GPU" if device.type == "cuda" else "this machine"
        raise CheckpointError(
            f"Model '{name}' needs {gigabytes(need)} of memory in {precision} ({gigabytes(weights)} of weights and "
            f"{gigabytes(need - weights)} of headroom) but only {gigabytes(free)} is free on {where}; "
            f"try a smaller precision or a smaller model.")
    return need


__all__ = ["MODES", "MARGIN_FRACTION", "MARGIN_BYTES", "build_meta_model", "parameter_breakdown", "weight_bytes",
           "estimate_weight_bytes", "storage_bytes", "free_memory_bytes", "cgroup_free_bytes", "needed_bytes",
           "check_weights_fit", "quantizable_linears"]
