"""Quantization of the language model only (vision tower and connector stay in full precision).

Two ways in, the same layers out. A checkpoint is quantized as it loads (`load_model(quantization=...)`): through
transformers' `from_pretrained` with `quantization_config(...)`, i.e. bitsandbytes' `BitsAndBytesConfig`, or for
torch's dynamic int8 the quantizer registered here (`torch_int8_config()`; transformers has none without torchao).
A model already in memory (QLoRA's base in `train/`, the full-size benchmark's random models) is quantized in place
by `quantize_language_model`, which swaps the LLM's `nn.Linear` layers for bitsandbytes layers and moves them to the
target device, which is when bitsandbytes quantizes them (on CPU as well as on CUDA).

* ``"8bit"``: ``bnb.nn.Linear8bitLt`` (LLM.int8(), ``has_fp16_weights=False``, outlier threshold 6.0 as
  transformers' default).
* ``"4bit"``: ``bnb.nn.Linear4bit`` with NF4 and the model's dtype as compute dtype (fp32 on CPU, bf16 on GPU).

`lm_head` is never quantized (it is tied to the input embeddings in the published models, and quantizing it
would break the tie). Checked with bitsandbytes 0.50.2 on a CPU without a GPU: both modes load and generate.
On CPUs with AVX-512 BF16, bitsandbytes repacks 4-bit weights for its fused kernel at the first eval-mode call,
which fails unless out_features is a multiple of 32 and in_features a multiple of the block size (64); such a
layer is left unquantized there instead of failing at the first forward (no published LLM has one: Qwen2.5-3B's
narrowest layers are k/v_proj, 2048 -> 256). The report lists the skipped layers.

* ``"int8"``: torch's own dynamic quantization (``torch.ao.nn.quantized.dynamic.Linear``, int8 weights with a
  scale per output row, activations quantized per call), CPU only, in fp32 (its kernels take fp32 inputs). On
  AVX2-only CPUs without fast bf16 it is the fastest path measured (296 GFLOPS for a linear layer against 105 in
  fp32 and 21 in bf16; `vidlmm.precision`). The same layers as bitsandbytes: the LLM's linears but lm_head.
  The vision tower and the connector stay in fp32 because the connector's attention maps are what this project
  shows, and they would change with their inputs; the LLM holds 76 % of the full-size model's weights and most of
  its time after the first token.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import CheckpointError
from .memory import quantizable_linears

MODES = ("8bit", "4bit", "int8")
BITSANDBYTES_MODES = ("8bit", "4bit")
CPU_4BIT_BLOCK_N = 32  # bitsandbytes' CPU weight packing for the 4-bit kernel works in blocks of 32 rows...
BLOCKSIZE_4BIT = 64  # ...and needs whole quantization blocks per row (Params4bit's default block size)
INT8_THRESHOLD = 6.0
# what stays in full precision when a checkpoint is quantized on load (transformers' `modules_to_not_convert`)
FULL_PRECISION_MODULES = ("vision_tower", "connector", "lm_head")


@dataclass
class QuantizationReport:
    """What `quantize_language_model` did: names are relative to `model.language_model`."""

    mode: str
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # kept in full precision (shape unsupported here)


def _import_bitsandbytes():
    # bitsandbytes logs warnings at import on some CPUs (no optional `kernels` package) and on EVERY 8-bit matmul
    # of fp32/bf16 inputs ("inputs will be cast ... to float16"): noise for a user, so unless someone configured
    # its logger, only its errors get through
    bnb_logger = logging.getLogger("bitsandbytes")
    if bnb_logger.level == logging.NOTSET:
        bnb_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional  # noqa: F401
        import bitsandbytes.nn  # noqa: F401 - the layer classes
    except Exception as err:  # ImportError, or a broken native library raising something else
        raise CheckpointError(f"Quantization needs bitsandbytes, which cannot be imported here "
                              f"({type(err).__name__}: {err}). Install it or run without --quantization.") from None
    return bnb


@contextmanager
def quiet_torch_quantization():
    """Silence torch's deprecation notices for torch.ao quantization (present and working in torch 2.13) while
    our own int8 code runs: they name a migration a user cannot act on. Other code's warnings are untouched."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.ao\.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r".*quantized tensor creation functions", UserWarning)
        yield


def int8_linear(linear: nn.Linear, weight: torch.Tensor | None = None) -> nn.Module:
    """`linear` as torch's dynamic int8 layer: per-output-row symmetric int8 weights (torch's
    `per_channel_dynamic_qconfig`, as `quantize_dynamic` with it would make), fp32 bias, fp32 in and out.

    weight: the fp32 [out, in] weight to quantize when `linear` has none yet (a meta tensor)."""
    bias = None if linear.bias is None else linear.bias.detach().to("cpu", torch.float32)
    return _dynamic_int8(_quantized_weight(linear.weight if weight is None else weight), bias)


def _dynamic_int8(qweight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    with quiet_torch_quantization():
        from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

        out_features, in_features = qweight.shape
        layer = DynamicInt8Linear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        layer.set_weight_bias(qweight, bias)
        return layer


def _make_layer(bnb, mode: str, linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weights, still unquantized (that happens on `.to(device)`)."""
    weight = linear.weight.detach()
    has_bias = linear.bias is not None
    if mode == "8bit":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to("cpu").clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.to("cpu").clone(), requires_grad=False, quant_type="nf4",
                                         blocksize=BLOCKSIZE_4BIT, module=layer)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype).clone(), requires_grad=False)
    return layer


def quantize_language_model(model: nn.Module, mode: str, device: str | torch.device = "cpu",
                            weight_of=None) -> QuantizationReport:
    """Replace every `nn.Linear` of `model.language_model` except `lm_head` by a quantized layer, in place:
    bitsandbytes' (8bit, 4bit; moved to `device`, which quantizes them) or torch's dynamic int8 (CPU only).
    Returns what was quantized and what was skipped.

    weight_of: int8 only, `name -> fp32 weight` for layers whose weight is a meta tensor (bench_fullsize fills each
    one just before quantizing it, so the full-precision LLM never sits in memory at once; loading a checkpoint
    does the same through `from_pretrained` and `torch_int8_config`).
    Raises CheckpointError (one line) for an unknown mode, int8 off the CPU, or bitsandbytes not importable.
    """
    if mode not in MODES:
        raise CheckpointError(f"Unknown quantization '{mode}' (use 8bit, 4bit or int8).")
    device = torch.device(device)
    if mode == "int8":
        return _quantize_int8(model, device, weight_of)
    bnb = _import_bitsandbytes()
    language_model = model.language_model
    params = [p for p in language_model.parameters() if p.is_floating_point()]
    compute_dtype = params[0].dtype if params else torch.float32
    report = QuantizationReport(mode)
    cpu_packing = mode == "4bit" and device.type == "cpu" and bool(getattr(bnb.functional, "has_avx512bf16", lambda: False)())
    for name, linear in quantizable_linears(language_model):
        if cpu_packing and (linear.out_features % CPU_4BIT_BLOCK_N or linear.in_features % BLOCKSIZE_4BIT):
            report.skipped.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = language_model.get_submodule(parent_name) if parent_name else language_model
        try:
            layer = _make_layer(bnb, mode, linear, compute_dtype).to(device)
        except Exception as err:  # a backend that cannot quantize on this device
            raise CheckpointError(f"bitsandbytes cannot quantize the language model to {mode} on "
                                  f"{device.type} ({type(err).__name__}: {err}).") from None
        layer.requires_grad_(False)
        setattr(parent, child, layer)
        report.quantized.append(name)
    return report


def _quantize_int8(model: nn.Module, device: torch.device, weight_of=None) -> QuantizationReport:
    if device.type != "cpu":
        raise CheckpointError(f"int8 quantization runs on the CPU only, not on {device.type}; use 8bit or 4bit "
                              "there.")
    language_model = model.language_model
    report = QuantizationReport("int8")
    for name, linear in quantizable_linears(language_model):
        weight = weight_of(name) if weight_of is not None and linear.weight.is_meta else None
        parent_name, _, child = name.rpartition(".")
        parent = language_model.get_submodule(parent_name) if parent_name else language_model
        setattr(parent, child, int8_linear(linear, weight))
        report.quantized.append(name)
        del weight  # the fp32 copy goes before the next layer is read
    return report


# ---- torch int8 inside transformers' from_pretrained ---------------------------------------------------------
# transformers has no quantizer for torch's dynamic int8 (its torchao one needs torchao), so `TorchInt8Config`
# registers one: each LLM linear's weight is quantized the moment the loader reads it (the fp32 LLM never sits in
# memory at once), held as a quantized tensor until every weight is read, then packed into torch's dynamic layer
# with its bias, as `int8_linear` packs a layer quantized in memory.
INT8_METHOD = "vidlmm_torch_int8"


class _PendingInt8Linear(nn.Module):
    """Where an LLM linear is while loading: its weight arrives already quantized (a buffer, so the loader keeps the
    quantized tensor as it is), its bias as read."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.empty(linear.out_features, linear.in_features, device="meta"))
        self.bias = None if linear.bias is None else nn.Parameter(torch.empty(linear.out_features, device="meta"),
                                                                  requires_grad=False)


def _quantized_weight(weight: torch.Tensor) -> torch.Tensor:
    """The per-row symmetric qint8 tensor `int8_linear` gives the same weight (torch's per-channel dynamic qconfig)."""
    with quiet_torch_quantization():
        from torch.ao.nn.quantized.modules.utils import _quantize_weight
        from torch.ao.quantization.qconfig import per_channel_dynamic_qconfig

        observer = per_channel_dynamic_qconfig.weight()
        w = weight.detach().to("cpu", torch.float32)
        observer(w)
        return _quantize_weight(w, observer)


def _register_int8_quantizer() -> None:
    """Register `TorchInt8Config` and its quantizer with transformers (once; from `vidlmm.hf.register`)."""
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config,
                                              register_quantizer)
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if INT8_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        return

    @register_quantization_config(INT8_METHOD)
    class TorchInt8Config(QuantizationConfigMixin):
        """torch's dynamic int8 (per-row int8 weights, CPU, fp32 in and out) for the language model's linears but
        lm_head; `modules_to_not_convert` (default: the tower, the connector, lm_head) stay in full precision."""

        def __init__(self, modules_to_not_convert: list[str] | None = None, **kwargs):
            self.quant_method = INT8_METHOD
            self.modules_to_not_convert = modules_to_not_convert

    class QuantizeOnRead(ConversionOps):
        def __init__(self, quantizer):
            self.quantizer = quantizer

        def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
            return {name: _quantized_weight(value[0] if isinstance(value, list) else value)
                    for name, value in input_dict.items()}

    @register_quantizer(INT8_METHOD)
    class TorchInt8Quantizer(HfQuantizer):
        requires_calibration = False

        def validate_environment(self, *args, device_map=None, **kwargs):
            devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map or "cpu"}
            if {str(d) for d in devices} - {"cpu"}:
                raise CheckpointError("int8 quantization runs on the CPU only; use 8bit or 4bit on a GPU.")

        def update_dtype(self, dtype):
            return torch.float32  # the dynamic int8 kernels take and give fp32

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            module_name, _, tensor = param_name.rpartition(".")
            return tensor == "weight" and isinstance(model.get_submodule(module_name), _PendingInt8Linear)

        def _process_model_before_weight_loading(self, model, **kwargs):
            from transformers.quantizers.quantizers_utils import should_convert_module

            skip = self.quantization_config.modules_to_not_convert or list(FULL_PRECISION_MODULES)
            for name, module in list(model.named_modules()):
                if type(module) is nn.Linear and should_convert_module(name, skip):
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, child, _PendingInt8Linear(module))

        def _process_model_after_weight_loading(self, model, **kwargs):
            for name, module in list(model.named_modules()):
                if isinstance(module, _PendingInt8Linear):
                    layer = _dynamic_int8(module.weight, None if module.bias is None else module.bias.detach())
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, child, layer)
            return model

        def is_serializable(self):
            return False

        @property
        def is_trainable(self) -> bool:
            return False

        def get_quantize_ops(self):
            return QuantizeOnRead(self)


def quantization_config(model: nn.Module, mode: str, device: torch.device, dtype: torch.dtype):
    """The `from_pretrained(quantization_config=...)` that quantizes `model`'s (a meta model of the checkpoint) LLM
    as `quantize_language_model` does: 8bit (LLM.int8, threshold 6.0), 4bit (NF4, double quantization, `dtype`
    compute) or int8 (torch dynamic, CPU). On a CPU whose bitsandbytes repacks 4-bit weights (AVX512-BF16), the
    layers it cannot pack are kept in full precision by name."""
    if mode not in MODES:
        raise CheckpointError(f"Unknown quantization '{mode}' (use 8bit, 4bit or int8).")
    if mode == "int8":
        if device.type != "cpu":
            raise CheckpointError(f"int8 quantization runs on the CPU only, not on {device.type}; use 8bit or 4bit "
                                  "there.")
        return torch_int8_config()
    import re

    from transformers import BitsAndBytesConfig

    bnb = _import_bitsandbytes()
    skip = list(FULL_PRECISION_MODULES)
    if mode == "4bit" and device.type == "cpu" and bool(getattr(bnb.functional, "has_avx512bf16", lambda: False)()):
        skip += [re.escape(f"language_model.{name}") for name, linear in quantizable_linears(model.language_model)
                 if linear.out_features % CPU_4BIT_BLOCK_N or linear.in_features % BLOCKSIZE_4BIT]
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=skip)


def torch_int8_config(**kwargs):
    """A `from_pretrained(quantization_config=...)` for torch's dynamic int8 (registered by `import vidlmm`)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    _register_int8_quantizer()
    return AUTO_QUANTIZATION_CONFIG_MAPPING[INT8_METHOD](**kwargs)


__all__ = ["MODES", "BITSANDBYTES_MODES", "FULL_PRECISION_MODULES", "INT8_METHOD", "QuantizationReport",
           "int8_linear", "quantization_config", "quantize_language_model", "quiet_torch_quantization",
           "torch_int8_config"]
