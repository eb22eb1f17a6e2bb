"""The full-size TinyLLaVA-Video architecture (random weights): memory estimate, and measured runs on CPU / CUDA.

    python benchmarks/bench_fullsize.py [--frames 16 64] [--json OUT] [--md OUT]   # (a) estimate only, seconds
    python benchmarks/bench_fullsize.py --measure-weights                           # (a) + weights measured
    python benchmarks/bench_fullsize.py --tower-chunks --frames 16 64               # (b) the tower alone on CPU
    python benchmarks/bench_fullsize.py --run-cpu [--frames 16] [--precision auto]  # (b) on CPU: minutes
    python benchmarks/bench_fullsize.py --cuda                                      # (c) needs a GPU
    python benchmarks/bench_fullsize.py --tiny --run-cpu --frames 4                 # the same code at toy size

Architecture: SigLIP-so400m tower (27 layers, 1152 wide, 16 heads, MLP 4304, 384 px, patch 14: 729 patches,
728 kept per frame), group resampler (512 queries, 16 groups, 3 layers), Qwen2.5-3B (36 layers, 2048 wide,
16 heads, 2 KV heads, MLP 11008, vocabulary 151936, tied embeddings).

(a) ESTIMATE (always; nothing is allocated: the model is built on the meta device and its parameters counted
    per part; the formula is `vidlmm.memory.weight_bytes`, the one `load_model` checks before loading).
    Weights: fp32 4 B, bf16 2 B; 8-bit / 4-bit (bitsandbytes, `vidlmm.quantize`) quantize the LLM's
    linear layers only (1 B + a fp32 scale per row / 0.5 B + double-quantized absmax per 64 weights); the
    embeddings (tied lm_head), norms, biases, tower and connector stay bf16. Activations per phase (they do not
    overlap): the tower as `vidlmm.vision.VisionTower` runs it (chunks of about 4096 tokens, 5 frames for so400m,
    stopping at layer -2 with one hidden state in flight, one layer's transients, sdpa; the reference runs all
    frames in one pass and its output_hidden_states keeps all 28), the batched connector, and the LLM (prefill
    transients with sdpa, logits of the last position only, KV cache for prompt + new tokens). The reference
    column uses its choices: fp32, eager attention (tower and LLM), full-sequence logits in the prefill.
    Peak = weights + the largest phase; the CUDA context (about 0.5 GiB) is shown apart.
(b) --run-cpu: builds it for real on CPU at the precision `load_model(dtype="auto")` picks on this machine
    (`vidlmm.precision`: the fastest of fp32 / bf16 / int8 measured here whose weights fit; int8 holds about
    6.2 GB, bf16 7.3 GB, fp32 14.5 GB), or at --precision, times each stage at the given frame counts on random
    pixels (decode is not part of it), and reports time to first token and peak RSS with the CPU named.
(c) --cuda: peak `torch.cuda.max_memory_allocated` for fp32, bf16, 8-bit, 4-bit, time to first token and
    tokens/s at 16 and 64 frames; bf16 with sdpa and, when flash-attn is installed, flash-attention 2.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time

from common import Report, machine, reset_peak_rss, self_rss_mb

from vidlmm.errors import CheckpointError
from vidlmm.memory import parameter_breakdown, storage_bytes, weight_bytes  # the library's formula
from vidlmm.precision import describe_cpu

GIB = 1024**3
TEXT_TOKENS = 64  # prompt text around the visual tokens (system prompt + question)
MODES = ("fp32", "bf16", "8bit", "4bit")


# ---- configs ---------------------------------------------------------------------------------------------------

def full_config():
    from transformers import AutoConfig

    from vidlmm.config import TinyLlavaConfig

    eos = 151643
    text = AutoConfig.for_model(
        "qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
        tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos).to_dict()
    vision = AutoConfig.for_model(
        "siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14).to_dict()
    return TinyLlavaConfig.compose(
        text, vision, connector_type="groupresampler", group=16, num_queries=512, num_resampler_layers=3,
        llm_model_name_or_path="Qwen/Qwen2.5-3B", tokenizer_name_or_path="Qwen/Qwen2.5-3B",
        vision_model_name_or_path="google/siglip-so400m-patch14-384", conv_version="qwen2_base")


def tiny_full_config():
    """The same structure at toy size (smoke tests)."""
    from vidlmm.tiny import tiny_config

    return tiny_config("groupresampler", vocab_size=400, num_queries=64, group=4)


def build_meta(config, attn: str = "sdpa"):
    """The model with its parameters on the meta device (buffers real, like `load_model`)."""
    from vidlmm.memory import build_meta_model

    return build_meta_model(config, attn)


def materialize(model, dtype, device: str, seed: int = 0, skip: frozenset = frozenset()):
    """Random weights in `dtype` on `device`: matrices N(0, 0.02), latents N(0, 1), norms 1, biases 0.
    Parameters named in `skip` stay on the meta device (int8 fills the LLM's linears one at a time)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in list(model.named_parameters()):
        if name.startswith("language_model.lm_head.") or name in skip:
            continue  # lm_head: tied to the input embeddings below
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        data = torch.empty(param.shape, dtype=dtype, device=device)
        if attr == "latents":
            data.normal_(0.0, 1.0, generator=gen)
        elif param.dim() >= 2:
            data.normal_(0.0, 0.02, generator=gen)
        elif attr == "bias":
            data.zero_()
        else:
            data.fill_(1.0)
        module._parameters[attr] = torch.nn.Parameter(data, requires_grad=False)
    model.language_model.tie_weights()
    for name, buf in list(model.named_buffers()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._buffers[attr] = buf.to(device)
    return model.eval()


# ---- (a) the estimate ------------------------------------------------------------------------------------------

def activation_bytes(config, frames: int, b: int, *, eager: bool, full_logits: bool, new_tokens: int) -> dict:
    """Peak activation bytes per phase (b bytes per element), see the module docstring. The reference (eager)
    runs every frame through the tower in one pass; ours CHUNK_TOKENS tokens at a time."""
    from vidlmm.vision import chunk_frames_for

    v = config.vision_config
    dv, iv, lv, hv = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], v["num_attention_heads"]
    pv = (v["image_size"] // v["patch_size"]) ** 2
    kept = pv - 1
    c = frames if eager else min(frames, chunk_frames_for(pv))  # SigLIP: no class token, pv tokens a frame
    features = frames * kept * dv * b
    vision_layer = c * pv * (4 * dv + 2 * iv) * b  # q, k, v, attn out + MLP in/out
    if eager:
        vision_layer += 2 * c * hv * pv * pv * b  # scores and their softmax
    held = (lv + 1) if eager else 2  # the reference keeps every hidden state; ours stops at layer -2 with one
    vision = held * c * pv * dv * b + vision_layer + features
    t = config.text_config
    d, i, layers, heads, kv = (t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"],
                               t["num_attention_heads"], t["num_key_value_heads"])
    q = config.num_queries
    n = frames * kept
    group = config.group or 1
    connector = features + n * (2 * d + 2 * 512) * b + group * 8 * q // group * (n // group + q // group) * b
    s = q + TEXT_TOKENS
    head_dim = d // heads
    kv_cache = 2 * layers * kv * head_dim * (s + new_tokens) * b
    prefill = s * (4 * d + 3 * i) * b
    if eager:
        prefill += 2 * heads * s * s * b
    logits = (s if full_logits else 1) * t["vocab_size"] * 4
    llm = q * d * b + kv_cache + prefill + logits
    return {"vision": vision, "connector": connector, "llm": llm, "kv_cache": kv_cache}


def estimate(config, frames_list, new_tokens: int) -> dict:
    model = build_meta(config)
    params = parameter_breakdown(model)
    del model
    rows = []
    for frames in frames_list:
        for mode in ("reference fp32", *MODES):
            ref = mode.startswith("reference")
            b = 4 if mode.endswith("fp32") else 2
            weights = weight_bytes(params, "fp32" if ref else mode)
            act = activation_bytes(config, frames, b, eager=ref, full_logits=ref, new_tokens=new_tokens)
            phase = max(act["vision"], act["connector"], act["llm"])
            rows.append({"frames": frames, "mode": mode, "weights_gib": weights / GIB,
                         "vision_gib": act["vision"] / GIB, "connector_gib": act["connector"] / GIB,
                         "llm_gib": act["llm"] / GIB, "kv_cache_gib": act["kv_cache"] / GIB,
                         "peak_gib": (weights + phase) / GIB, "with_context_gib": (weights + phase) / GIB + 0.5})
    return {"params": params, "rows": rows, "new_tokens": new_tokens, "text_tokens": TEXT_TOKENS}


# ---- (b) / (c): real runs --------------------------------------------------------------------------------------

def run_stages(model, frames: int, new_tokens: int, sync=lambda: None) -> dict:
    """Random pixels -> vision -> connector -> splice -> greedy generate of exactly `new_tokens` tokens."""
    import torch
    from transformers import LogitsProcessorList

    from vidlmm.conversation import IMAGE_TOKEN_INDEX
    from vidlmm.pipeline import StepClock

    size = model.vision_tower.config.image_size
    vocab = model.language_model.config.vocab_size
    gen = torch.Generator().manual_seed(frames)
    pixels = torch.rand(frames, 3, size, size, generator=gen) * 2 - 1
    ids = [int(x) for x in torch.randint(0, vocab - 1, (TEXT_TOKENS,), generator=gen)]
    ids = ids[:TEXT_TOKENS - 12] + [IMAGE_TOKEN_INDEX] + ids[TEXT_TOKENS - 12:]
    clock = StepClock()
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        features = model.encode_frames(pixels)
        sync()
        t1 = time.perf_counter()
        visual = model.connect(features).tokens[0]
        sync()
        t2 = time.perf_counter()
        embeds, mask, _ = model.build_inputs([ids], [visual])
        out = model.generate(embeds, mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             logits_processor=LogitsProcessorList([clock]))
        sync()
        t3 = time.perf_counter()
    first = clock.stamps[0] if clock.stamps else t3
    generated = out.shape[1]
    decode_s = t3 - first
    return {"frames": frames, "vision_s": t1 - t0, "connector_s": t2 - t1, "prefill_s": first - t2,
            "ttft_s": first - t0, "generation_s": decode_s, "new_tokens": int(generated),
            "tokens_per_s": (generated - 1) / decode_s if decode_s > 0 else 0.0,
            "visual_tokens": int(visual.shape[0]), "sequence": int(embeds.shape[1])}


def build_cpu(config, precision):
    """The model with random weights in `precision` on CPU; int8 draws and quantizes the LLM's linears one at a
    time, so the fp32 LLM never sits in memory whole (peak: the int8 model plus one fp32 layer)."""
    import torch

    from vidlmm.memory import quantizable_linears
    from vidlmm.quantize import quantize_language_model

    model = build_meta(config)
    if precision.quantization != "int8":
        return materialize(model, precision.dtype, "cpu")
    linears = dict(quantizable_linears(model.language_model))
    materialize(model, torch.float32, "cpu", skip=frozenset(f"language_model.{n}.weight" for n in linears))
    gen = torch.Generator().manual_seed(1)
    quantize_language_model(model, "int8", "cpu", weight_of=lambda name: torch.empty(
        linears[name].weight.shape).normal_(0.0, 0.02, generator=gen))
    return model


def run_cpu(config, frames_list, new_tokens: int, threads: int | None, dtype: str = "auto") -> dict:
    """Time to first token on CPU at the precision `load_model` would choose here (or `dtype` when given)."""
    import torch

    from vidlmm.precision import check_precision_fits, describe_cpu, plan_precision

    if threads:
        torch.set_num_threads(threads)
    quantization = "int8" if dtype == "int8" else None
    t0 = time.perf_counter()
    precision = plan_precision(parameter_breakdown(build_meta(config)), "cpu",
                               dtype="auto" if dtype in ("auto", "int8") else dtype, quantization=quantization)
    choose_s = time.perf_counter() - t0
    print(f"  cpu precision: {precision.name}: {precision.reason}", flush=True)
    check_precision_fits(precision, name="full-size random" if config.num_queries == 512 else "tiny random")
    t0 = time.perf_counter()
    model = build_cpu(config, precision)
    build_s = time.perf_counter() - t0
    after_build = self_rss_mb()
    runs = []
    for frames in frames_list:
        runs.append(run_stages(model, frames, new_tokens))
        print(f"  cpu {precision.name}, {frames} frames: ttft {runs[-1]['ttft_s']:.1f} s", flush=True)
    return {"dtype": precision.name, "precision": precision.to_json(), "cpu": describe_cpu(),
            "threads": torch.get_num_threads(), "choose_s": choose_s, "build_s": build_s,
            "rss_after_build_mb": after_build.get("rss_mb"), "runs": runs, "rss": self_rss_mb()}


def _release_freed_memory() -> bool:
    """Ask glibc to serve allocations of 64 KiB and more with mmap (returned to the system when freed), so the
    RSS follows the live tensors and its peak measures activations; False where glibc is not there."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 << 10))  # M_MMAP_THRESHOLD; setting it also stops glibc from raising it
    except (OSError, AttributeError):
        return False


def run_tower_chunks(config, frames_list) -> dict:
    """The vision tower alone in bf16 on CPU, each frame count run in one pass (the reference) and in our
    token-bounded chunks: time and the peak RSS above the resident weights (activation memory, measured)."""
    import torch

    from vidlmm.vision import VisionTower

    precise = _release_freed_memory()
    vision = dict(config.vision_config)
    tower = VisionTower(vision, tower_type="siglip").to(torch.bfloat16).eval()
    with torch.no_grad():  # warm-up: first-call allocations (kernels, thread pools) are not activations
        tower(torch.zeros(1, 3, tower.config.image_size, tower.config.image_size, dtype=torch.bfloat16))
    runs = []
    for frames in frames_list:
        pixels = torch.rand(frames, 3, tower.config.image_size, tower.config.image_size,
                            generator=torch.Generator().manual_seed(frames)) * 2 - 1
        for label, chunk in (("ours", tower.chunk_frames()), ("one pass", frames)):
            gc.collect()
            can_reset = reset_peak_rss()
            before = self_rss_mb()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = tower(pixels, chunk_frames=chunk)
            seconds = time.perf_counter() - t0
            after = self_rss_mb()
            peak = after.get("hwm_mb") if can_reset else None
            runs.append({"frames": frames, "chunking": label, "chunk_frames": min(chunk, frames), "seconds": seconds,
                         "peak_above_weights_mb": None if peak is None else peak - before["rss_mb"],
                         "features_mb": out.numel() * out.element_size() / 2**20})
            print(f"  tower {frames} frames, {label} ({min(chunk, frames)} per pass): {seconds:.1f} s, "
                  f"peak +{runs[-1]['peak_above_weights_mb'] or float('nan'):.0f} MiB", flush=True)
            del out
    return {"dtype": "bf16", "threads": torch.get_num_threads(), "runs": runs, "mmap_allocations": precise}


def build_cuda(config, mode: str, attn: str):
    import torch

    from vidlmm.quantize import quantize_language_model

    if mode in ("fp32", "bf16"):
        return materialize(build_meta(config, attn), torch.float32 if mode == "fp32" else torch.bfloat16, "cuda")
    # bitsandbytes quantizes while moving the LLM's linears to the GPU: build bf16 on CPU first
    model = materialize(build_meta(config, attn), torch.bfloat16, "cpu")
    quantize_language_model(model, mode, "cuda")
    return model.to("cuda")


def measure_int8_layers(layers: int = 6, shape: tuple[int, int] = (11008, 2048)) -> dict:
    """torch's packed int8 layers hide their storage from Python, so count it as the RSS they add: `layers`
    Qwen2.5-3B MLP-shaped linears (out, in), each drawn in fp32, quantized as `--quantization int8` does, and its
    fp32 weight dropped (glibc's mmap threshold at 64 KiB so freed memory leaves the RSS)."""
    import torch

    from vidlmm.memory import INT8_ROW_BYTES
    from vidlmm.quantize import int8_linear

    precise = _release_freed_memory()
    out_features, in_features = shape
    kept = [int8_linear(torch.nn.Linear(4, 4))]  # warm-up: torch's quantized engine and its first allocations
    gc.collect()
    before = self_rss_mb()["rss_mb"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(layers):
        linear = torch.nn.Linear(in_features, out_features, bias=False, device="meta")
        weight = torch.empty(out_features, in_features).normal_(0.0, 0.02, generator=gen)
        kept.append(int8_linear(linear, weight))
        del weight
        gc.collect()
    per_layer = (self_rss_mb()["rss_mb"] - before) / layers * 2**20
    estimated = out_features * in_features + INT8_ROW_BYTES * out_features
    return {"shape": [out_features, in_features], "layers": layers, "measured_bytes_per_layer": per_layer,
            "estimated_bytes_per_layer": estimated, "mmap_allocations": precise}


def measure_weights(config, modes=("bf16", "8bit", "4bit")) -> list[dict]:
    """Build the model on CPU in bf16, quantize it as `--quantization` would, and count its storage bytes."""
    import torch

    from vidlmm.quantize import quantize_language_model

    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        model = materialize(build_meta(config), torch.bfloat16, "cpu")
        report = quantize_language_model(model, mode, "cpu") if mode != "bf16" else None
        rows.append({"mode": mode, "bytes": storage_bytes(model), "seconds": time.perf_counter() - t0,
                     "skipped_layers": len(report.skipped) if report else 0})
        print(f"  weights {mode}: {rows[-1]['bytes'] / 2**20:,.1f} MiB ({rows[-1]['seconds']:.0f} s)", flush=True)
        del model
        gc.collect()
    return rows


def run_cuda(config, frames_list, new_tokens: int) -> dict:
    import torch

    attns = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    plan = [(mode, "sdpa") for mode in MODES] + [("bf16", a) for a in attns[1:]]
    results = []
    for mode, attn in plan:
        entry = {"mode": mode, "attn": attn}
        model = None
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model = build_cuda(config, mode, attn)
            torch.cuda.synchronize()
            entry["weights_gib"] = torch.cuda.memory_allocated() / GIB
            entry["runs"] = []
            run_stages(model, frames_list[0], 2, torch.cuda.synchronize)  # warm-up: kernels, allocator
            for frames in frames_list:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                r = run_stages(model, frames, new_tokens, torch.cuda.synchronize)
                r["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
                r["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
                entry["runs"].append(r)
                print(f"  cuda {mode} {attn}, {frames} frames: peak {r['peak_gib']:.2f} GiB, "
                      f"ttft {r['ttft_s']:.2f} s, {r['tokens_per_s']:.1f} tok/s", flush=True)
        except Exception as err:  # noqa: BLE001 - one mode failing (e.g. no bitsandbytes CUDA) must not hide the rest
            entry["error"] = f"{type(err).__name__}: {err}"
            print(f"  cuda {mode} {attn}: failed: {entry['error']}", flush=True)
        finally:
            del model
            gc.collect()
            torch.cuda.empty_cache()
        results.append(entry)
    return {"device": torch.cuda.get_device_name(0), "flash_attn_installed": len(attns) > 1, "results": results}


# ---- report ----------------------------------------------------------------------------------------------------

def gib(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=None,
                        help="frame counts (default: 16 64 for the estimate and CUDA, 16 for --run-cpu)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    parser.add_argument("--run-cpu", action="store_true",
                        help="(b) build it on CPU at the precision chosen for this CPU and time it (minutes)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                        help="--run-cpu precision (default auto: what load_model would choose here)")
    parser.add_argument("--measure-weights", action="store_true",
                        help="build bf16 / 8-bit / 4-bit on CPU and count the weights' bytes (about 8 GB of RAM)")
    parser.add_argument("--tower-chunks", action="store_true",
                        help="(b) the vision tower alone on CPU: one pass over all frames against our chunks")
    parser.add_argument("--cuda", action="store_true", help="(c) measure on the GPU when one is available")
    parser.add_argument("--threads", type=int, help="CPU threads for --run-cpu (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="a toy-size model of the same structure (smoke tests)")
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--md", metavar="OUT")
    args = parser.parse_args(argv)
    frames_list = args.frames or [16, 64]

    config = tiny_full_config() if args.tiny else full_config()
    report = Report()
    data: dict = {"architecture": "tiny stand-in (--tiny)" if args.tiny else
                  "SigLIP-so400m + group resampler (512 q, 16 g, 3 layers) + Qwen2.5-3B", "machine": machine()}
    report(f"architecture: {data['architecture']}, random weights")

    # (a)
    est = estimate(config, frames_list, args.new_tokens)
    data["estimate"] = est
    p = est["params"]
    report()
    report("## (a) ESTIMATE of GPU memory from parameter and activation counts (not measured)")
    report()
    report.table(["part", "parameters"], [[k, f"{p[k] / 1e6:,.1f} M"] for k in
                                          ("vision_tower", "connector", "language_model", "total",
                                           "llm_linear_weights")])
    report()
    report(f"prompt: {config.num_queries} visual + {TEXT_TOKENS} text tokens, KV cache for {args.new_tokens} new "
           f"tokens; activations are per phase (vision / connector / LLM), peak = weights + largest phase")
    report()
    report.table(["frames", "precision", "weights (GiB)", "vision act.", "connector act.", "LLM act. (KV)",
                  "est. peak (GiB)", "+ CUDA context"],
                 [[r["frames"], r["mode"], gib(r["weights_gib"]), gib(r["vision_gib"]), gib(r["connector_gib"]),
                   f"{gib(r['llm_gib'])} ({gib(r['kv_cache_gib'])})", gib(r["peak_gib"]),
                   gib(r["with_context_gib"])] for r in est["rows"]])
    at16 = {r["mode"]: r for r in est["rows"] if r["frames"] == 16}
    if at16 and not args.tiny:
        goals = {"bf16": 9.0, "4bit": 4.0}
        report()
        v = config.vision_config
        kept = (v["num_hidden_layers"] + 1) * 16 * (v["image_size"] // v["patch_size"]) ** 2 * v["hidden_size"] * 2
        report(f"the {v['num_hidden_layers'] + 1} hidden states that output_hidden_states keeps at 16 frames would "
               f"be {kept / GIB:.2f} GiB in bf16; VisionTower stops at layer -2 and holds one, so ours does not")
        data["estimate"]["kept_hidden_states_bf16_16_frames_gib"] = kept / GIB
        ref = at16["reference fp32"]
        report(f"reference fp32 at 16 frames, estimated: weights {ref['weights_gib'] * GIB / 1e9:.1f} GB, peak "
               f"{ref['peak_gib'] * GIB / 1e9:.1f} GB allocated (its users report ~15-16 GB, 24 GB cards)")
        data["goals_estimated"] = {}
        for mode, goal in goals.items():
            alloc, total = at16[mode]["peak_gib"] * GIB / 1e9, at16[mode]["with_context_gib"] * GIB / 1e9
            data["goals_estimated"][mode] = {"allocated_gb": alloc, "with_context_gb": total, "goal_gb": goal,
                                             "met_allocated": alloc <= goal, "met_with_context": total <= goal}
            report(f"ESTIMATE {mode} at 16 frames: {alloc:.2f} GB allocated, {total:.2f} GB with the CUDA context; "
                   f"goal <= {goal:g} GB: {'met' if alloc <= goal else 'NOT met'} (allocated), "
                   f"{'met' if total <= goal else 'NOT met'} (with context); "
                   f"{ref['peak_gib'] / at16[mode]['peak_gib']:.1f}x less than the reference's estimate")

    if args.measure_weights:
        measured = measure_weights(config)
        params = est["params"]
        for r in measured:
            r["estimated_bytes"] = weight_bytes(params, r["mode"])
        data["weights_measured"] = measured
        report()
        report("weights measured: the model built on CPU and quantized with bitsandbytes as `--quantization` does, "
               "its storage counted (parameters, buffers, quantization statistics; bitsandbytes packs the same way on "
               "CUDA, not checked on a GPU here)")
        report()
        report.table(["precision", "measured (MiB)", "estimated (MiB)", "measured / estimated"],
                     [[r["mode"], f"{r['bytes'] / 2**20:,.1f}", f"{weight_bytes(params, r['mode']) / 2**20:,.1f}",
                       f"{r['bytes'] / weight_bytes(params, r['mode']):.4f}"] for r in measured])
        int8 = measure_int8_layers()
        data["int8_layers_measured"] = int8
        report()
        report(f"int8 (torch dynamic, `--quantization int8`): {int8['layers']} linears of {int8['shape'][1]} -> "
               f"{int8['shape'][0]} add {int8['measured_bytes_per_layer'] / 2**20:.1f} MiB of RSS each, estimated "
               f"{int8['estimated_bytes_per_layer'] / 2**20:.1f} MiB (measured / estimated "
               f"{int8['measured_bytes_per_layer'] / int8['estimated_bytes_per_layer']:.3f})")

    # (b)
    report()
    report(f"## (b) measured on CPU: {describe_cpu()}")
    report()
    cpu = None
    if args.run_cpu:
        try:
            cpu = run_cpu(config, args.frames or [16], args.new_tokens, args.threads, args.precision)
        except CheckpointError as err:  # the weights cannot fit this machine's free memory
            report(f"skipped: {err}")
            data["cpu"] = {"skipped": str(err)}
    if cpu is not None:
        data["cpu"] = cpu
        p = cpu["precision"]
        report(f"precision {p['name']}: {p['reason']}")
        report(f"built in {cpu['build_s']:.1f} s; RSS after build {cpu['rss_after_build_mb']:.0f} MiB, peak "
               f"{cpu['rss']['peak_rss_mb']:.0f} MiB; {cpu['threads']} threads; random pixels (no decode)")
        report()
        report.table(["frames", "vision (s)", "connector (s)", "prefill (s)", "time to first token (s)",
                      "tokens/s"],
                     [[r["frames"], f"{r['vision_s']:.2f}", f"{r['connector_s']:.2f}", f"{r['prefill_s']:.2f}",
                       f"{r['ttft_s']:.2f}", f"{r['tokens_per_s']:.2f}"] for r in cpu["runs"]])
        for r in cpu["runs"]:
            report(f"time to first token at {r['frames']} frames: {r['ttft_s']:.1f} s in {p['name']} on "
                   f"{cpu['cpu']}")
    elif not args.run_cpu:
        report("skipped (pass --run-cpu; 7 to 15 GB of RAM by precision and minutes per frame count on 2 cores)")
    if args.tower_chunks:
        tower = run_tower_chunks(config, frames_list)
        data["tower_chunks"] = tower
        report()
        report(f"the vision tower alone, bf16, {tower['threads']} threads, random pixels: every frame in one pass "
               "(as the reference batches them, with our early exit) against our token-bounded chunks; peak = VmHWM "
               "above the RSS before the call (activations, measured on CPU"
               + (", with glibc's mmap threshold at 64 KiB so freed memory leaves the RSS)" if tower["mmap_allocations"]
                  else "; glibc's allocator not found, freed memory may hide part of the peak)"))
        report()
        report.table(["frames", "chunking", "frames per pass", "time (s)", "peak above weights (MiB)",
                      "features (MiB)"],
                     [[r["frames"], r["chunking"], r["chunk_frames"], f"{r['seconds']:.2f}",
                       "-" if r["peak_above_weights_mb"] is None else f"{r['peak_above_weights_mb']:.0f}",
                       f"{r['features_mb']:.0f}"] for r in tower["runs"]])

    # (c)
    report()
    report("## (c) measured on CUDA")
    report()
    import torch

    if not args.cuda:
        report("skipped (pass --cuda)")
    elif not torch.cuda.is_available():
        report("skipped: torch.cuda.is_available() is False on this machine")
        data["cuda"] = {"skipped": "no CUDA device"}
    else:
        cuda = run_cuda(config, frames_list, args.new_tokens)
        data["cuda"] = cuda
        report(f"{cuda['device']}; flash-attn installed: {cuda['flash_attn_installed']}; peak = "
               "torch.cuda.max_memory_allocated (the CUDA context comes on top)")
        report()
        rows = []
        for e in cuda["results"]:
            if "error" in e:
                rows.append([e["mode"], e["attn"], "-", "-", "-", "-", "-", e["error"][:80]])
                continue
            for r in e["runs"]:
                rows.append([e["mode"], e["attn"], r["frames"], f"{e['weights_gib']:.2f}", f"{r['peak_gib']:.2f}",
                             f"{r['ttft_s']:.3f}", f"{r['tokens_per_s']:.1f}", ""])
        report.table(["precision", "attention", "frames", "weights (GiB)", "peak (GiB)", "TTFT (s)", "tokens/s",
                      "error"], rows)
        measured = {e["mode"]: e["runs"][0]["peak_gib"] for e in cuda["results"]
                    if e["attn"] == "sdpa" and "runs" in e and e["runs"] and e["runs"][0]["frames"] == 16}
        if not args.tiny:
            report()
            for mode, goal in (("bf16", 9.0), ("4bit", 4.0)):
                if mode in measured:
                    report(f"{mode} at 16 frames, measured: {measured[mode]:.2f} GiB: goal <= {goal:g} GB "
                           f"{'met' if measured[mode] * GIB / 1e9 <= goal else 'NOT met'}")
    report.save(args.md, args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
