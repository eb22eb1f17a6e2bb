"""bitsandbytes quantization of the language model only (vision tower and connector stay in full precision).

Our models are built by our own code, not `from_pretrained`, so instead of transformers' `BitsAndBytesConfig`
integration we swap the LLM's `nn.Linear` layers for bitsandbytes layers after the weights are loaded, then
move them to the target device, which is when bitsandbytes quantizes them (on CPU as well as on CUDA).

* ``"8bit"``: ``bnb.nn.Linear8bitLt`` (LLM.int8(), ``has_fp16_weights=False``, outlier threshold 6.0 as
  transformers' default).
* ``"4bit"``: ``bnb.nn.Linear4bit`` with NF4 and the model's dtype as compute dtype (fp32 on CPU, bf16 on GPU).

`lm_head` is never quantized (it is tied to the input embeddings in the published models, and quantizing it
would break the tie). Checked with bitsandbytes 0.50.2 on a CPU without a GPU: both modes load and generate.
On CPUs with AVX-512 BF16, bitsandbytes repacks 4-bit weights for its fused kernel at the first eval-mode call,
which fails unless out_features is a multiple of 32 and in_features a multiple of the block size (64); such a
layer is left unquantized there instead of failing at the first forward (no published LLM has one: Qwen2.5-3B's
narrowest layers are k/v_proj, 2048 -> 256). The report lists the skipped layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import CheckpointError

MODES = ("8bit", "4bit")
CPU_4BIT_BLOCK_N = 32  # bitsandbytes' CPU weight packing for the 4-bit kernel works in blocks of 32 rows...
BLOCKSIZE_4BIT = 64  # ...and needs whole quantization blocks per row (Params4bit's default block size)
INT8_THRESHOLD = 6.0


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


def _quantizable_linears(language_model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, module) for name, module in language_model.named_modules()
            if type(module) is nn.Linear and name.split(".")[-1] != "lm_head"]


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


def quantize_language_model(model: nn.Module, mode: str, device: str | torch.device = "cpu") -> QuantizationReport:
    """Replace every `nn.Linear` of `model.language_model` except `lm_head` by a bitsandbytes layer, in place,
    and move those layers to `device` (which quantizes them). Returns what was quantized and what was skipped.

    Raises CheckpointError (one line) for an unknown mode or when bitsandbytes cannot be imported.
    """
    if mode not in MODES:
        raise CheckpointError(f"Unknown quantization '{mode}' (use 8bit or 4bit).")
    device = torch.device(device)
    bnb = _import_bitsandbytes()
    language_model = model.language_model
    params = [p for p in language_model.parameters() if p.is_floating_point()]
    compute_dtype = params[0].dtype if params else torch.float32
    report = QuantizationReport(mode)
    cpu_packing = mode == "4bit" and device.type == "cpu" and bool(getattr(bnb.functional, "has_avx512bf16", lambda: False)())
    for name, linear in _quantizable_linears(language_model):
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


__all__ = ["MODES", "QuantizationReport", "quantize_language_model"]
