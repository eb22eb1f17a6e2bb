"""bitsandbytes quantization of the language model (vidlmm/quantize.py), through `load_model(quantization=...)`.

Only the LLM's Linear layers change; lm_head (tied to the embeddings), the vision tower and the connector stay
as they are. The quantized model must still generate, and its logits must stay close to the full-precision ones.
The bitsandbytes tests skip with the reason when bitsandbytes cannot import or run on this machine.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from tests.videos import make_moving_square_frames, write_video
from vidlmm.errors import CheckpointError
from vidlmm.quantize import quantize_language_model

# loose: random tiny weights (the reference's N(0, 0.02) init, where the decoder layers still move the logits by
# ~70 %); NF4 has 16 levels. Measured ~0.005 (8-bit) and ~0.06 (4-bit) on a 2-core AVX-512 x86 CPU.
MAX_REL_ERROR = {"8bit": 0.05, "4bit": 0.3}
INPUT_IDS = [[5, 17, 42, 99, 3, 250, 11, 7, 64, 128, 33, 2]]


def _bitsandbytes_problem() -> str | None:
    """None when raw bitsandbytes 8-bit and 4-bit layers quantize and run on this CPU, else why not."""
    try:
        from vidlmm.quantize import _import_bitsandbytes

        bnb = _import_bitsandbytes()
        weight, x = torch.randn(32, 64), torch.randn(1, 3, 64)
        int8 = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
        int8.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
        nf4 = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        nf4.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", module=nf4)
        with torch.no_grad():
            for layer in (int8, nf4):
                layer.to("cpu").eval()(x)
    except Exception as err:  # noqa: BLE001 - any failure means: cannot test quantization here
        return f"bitsandbytes cannot quantize on this machine: {type(err).__name__}: {err}".splitlines()[0]
    return None


@pytest.fixture(scope="module")
def bnb_ok():
    problem = _bitsandbytes_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from vidlmm.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("quant") / "tiny", "groupresampler", seed=3,
                                 num_queries=64, group=4)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("quant-video") / "clip.mp4", make_moving_square_frames(20, 48, 64), 10)


@pytest.fixture(scope="module")
def full_model(checkpoint):
    from vidlmm.checkpoint import load_model

    return load_model(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def quantized(bnb_ok, checkpoint):
    from vidlmm.checkpoint import load_model

    cache = {}

    def get(mode):
        if mode not in cache:
            cache[mode] = load_model(checkpoint, device="cpu", quantization=mode)
        return cache[mode]

    return get


def _bnb_classes():
    import bitsandbytes as bnb

    return {"8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit}


# ------------------------------------------------------------------ no bitsandbytes needed
def test_unknown_mode_is_a_one_line_checkpoint_error(full_model):
    with pytest.raises(CheckpointError) as info:
        quantize_language_model(full_model, "3bit", "cpu")
    assert "\n" not in str(info.value) and "3bit" in str(info.value)


def test_missing_bitsandbytes_is_a_one_line_checkpoint_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    holder = nn.Module()
    holder.language_model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(CheckpointError) as info:
        quantize_language_model(holder, "8bit", "cpu")
    assert "\n" not in str(info.value) and "bitsandbytes" in str(info.value)
    assert isinstance(holder.language_model[0], nn.Linear)  # untouched


# ------------------------------------------------------------------ with bitsandbytes
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_only_language_model_linears_are_quantized(quantized, full_model, mode):
    model = quantized(mode)
    bnb_cls = _bnb_classes()[mode]
    lm = model.language_model
    names = [n for n, m in lm.named_modules() if isinstance(m, bnb_cls)]
    plain = [n for n, m in lm.named_modules() if type(m) is nn.Linear]
    expected = [n for n, m in full_model.language_model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    assert names == expected and len(names) == 7 * lm.config.num_hidden_layers
    assert plain == ["lm_head"]
    assert lm.lm_head.weight is lm.get_input_embeddings().weight  # still tied
    expected_dtype = torch.int8 if mode == "8bit" else torch.uint8
    assert all(lm.get_submodule(n).weight.dtype == expected_dtype for n in names)
    for part in (model.vision_tower, model.connector):
        assert not any(isinstance(m, tuple(_bnb_classes().values())) for m in part.modules())
    for part in ("vision_tower", "connector"):
        got, ref = getattr(model, part).state_dict(), getattr(full_model, part).state_dict()
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref), part
    assert model.dtype == full_model.dtype == torch.float32


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_logits_close_to_full_precision(quantized, full_model, mode):
    ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        ref = full_model.language_model(input_ids=ids).logits.float()
        got = quantized(mode).language_model(input_ids=ids).logits.float()
    assert torch.isfinite(got).all()
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"\n[quantize] {mode}: logits max relative error {rel:.4f}, greedy agreement {agree:.0%}")
    assert rel < MAX_REL_ERROR[mode]


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_model_generates(quantized, video, mode):
    from vidlmm.pipeline import GenerationSettings, VideoLMM

    model = quantized(mode)
    answer = VideoLMM(model, cache_bytes=0).ask(video, "What is moving?",
                                                generation=GenerationSettings(max_new_tokens=5))
    assert 1 <= len(answer.token_ids) <= 5
    assert all(0 <= t < model.language_model.config.vocab_size for t in answer.token_ids)
    assert answer.text == model.tokenizer.decode(answer.token_ids, skip_special_tokens=True).strip()
    assert answer.num_visual_tokens == model.num_visual_tokens(16)


def test_4bit_equals_full_model_with_nf4_rounded_weights(quantized, checkpoint):
    """The 4-bit error is NF4 rounding and nothing else: a full-precision model whose LLM Linear weights went
    through bitsandbytes' own NF4 quantize -> dequantize gives (nearly) the quantized model's logits."""
    import bitsandbytes.functional as bnbf

    from vidlmm.checkpoint import load_model

    simulated = load_model(checkpoint, device="cpu")
    with torch.no_grad():
        for name, module in simulated.language_model.named_modules():
            if type(module) is nn.Linear and name != "lm_head":
                q, state = bnbf.quantize_4bit(module.weight.data, blocksize=64, compress_statistics=True,
                                              quant_type="nf4")
                module.weight.data = bnbf.dequantize_4bit(q, state).to(module.weight.dtype)
        ids = torch.tensor(INPUT_IDS)
        rel = []
        for inp in (ids, ids[:, :1]):  # prefill (many rows) and a single row (bitsandbytes' gemv path)
            ref = simulated.language_model(input_ids=inp).logits
            got = quantized("4bit").language_model(input_ids=inp).logits
            rel.append(((got - ref).abs().max() / ref.abs().max()).item())
    print(f"\n[quantize] 4bit vs NF4-rounded full-precision weights: max relative error {max(rel):.4f}")
    assert max(rel) < 0.03  # what is left is the bf16 compute of bitsandbytes' fused CPU kernel


def test_4bit_on_cpu_skips_layers_bitsandbytes_cannot_pack(bnb_ok):
    """bitsandbytes' fused CPU 4-bit kernel (AVX-512 BF16 CPUs) packs weights in blocks of 32 output rows and
    whole 64-wide quantization blocks per row: other layers stay in full precision instead of failing later."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    class ToyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 64), nn.Linear(64, 64),
                                      nn.Linear(64, 10))
            self.lm_head = nn.Linear(10, 10)

        def forward(self, x):
            return self.lm_head(self.body(x))

    torch.manual_seed(0)
    holder = nn.Module()
    holder.language_model = ToyLM()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref = holder.language_model(x)
    report = quantize_language_model(holder, "4bit", "cpu")
    body = holder.language_model.body
    if bnbf.has_avx512bf16():
        assert report.skipped == ["body.0", "body.2", "body.4"] and report.quantized == ["body.3"]
        assert all(type(body[i]) is nn.Linear for i in (0, 2, 4))
    else:
        assert report.skipped == [] and len(report.quantized) == 4
    assert isinstance(body[3], bnb.nn.Linear4bit)
    assert type(holder.language_model.lm_head) is nn.Linear
    with torch.no_grad():
        got = holder.language_model.eval()(x)  # eval: the mode in which bitsandbytes packs CPU weights
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 0.3


# ------------------------------------------------------------------ torch dynamic int8 (no bitsandbytes needed)
@pytest.fixture(scope="module")
def int8_model(checkpoint):
    import warnings

    from vidlmm.checkpoint import load_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(checkpoint, device="cpu", quantization="int8")
    model.caught_warnings = [str(w.message) for w in caught]
    return model


def test_int8_quantizes_only_language_model_linears(int8_model, full_model):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    lm = int8_model.language_model
    names = [n for n, m in lm.named_modules() if isinstance(m, DynamicInt8Linear)]
    expected = [n for n, m in full_model.language_model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    assert names == expected and len(names) == 7 * lm.config.num_hidden_layers
    assert [n for n, m in lm.named_modules() if type(m) is nn.Linear] == ["lm_head"]
    assert lm.lm_head.weight is lm.get_input_embeddings().weight  # still tied
    for part in ("vision_tower", "connector"):
        got, ref = getattr(int8_model, part).state_dict(), getattr(full_model, part).state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), part
    assert int8_model.dtype == torch.float32 and int8_model.precision.name == "int8"


def test_int8_through_from_pretrained_quantizes_each_weight_as_it_is_read(checkpoint, full_model, monkeypatch):
    """`load_model(quantization="int8")` is transformers' `from_pretrained` with the quantizer vidlmm registers, which
    a transformers user can name too: each LLM linear's weight is quantized once, on read, into the layer
    `int8_linear` makes of the full-precision one (identical int8 weights and scales)."""
    from transformers import AutoModelForCausalLM

    import vidlmm.quantize as quantize
    from vidlmm.quantize import int8_linear, torch_int8_config

    seen = []
    original = quantize._quantized_weight
    monkeypatch.setattr(quantize, "_quantized_weight", lambda w: seen.append(tuple(w.shape)) or original(w))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=torch_int8_config())
    layers = [(n, m) for n, m in full_model.language_model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    assert len(seen) == len(layers)
    for name, linear in layers:
        got, _ = model.language_model.get_submodule(name)._weight_bias()
        want, _ = int8_linear(linear)._weight_bias()
        assert torch.equal(got.int_repr(), want.int_repr()), name
        assert torch.equal(got.q_per_channel_scales(), want.q_per_channel_scales()), name


def test_int8_load_is_quiet(int8_model):
    """torch.ao's deprecation notices are silenced in our code path (they name a migration users cannot act on)."""
    assert not [w for w in int8_model.caught_warnings if "quantiz" in w.lower()], int8_model.caught_warnings


def test_int8_logits_close_to_full_precision(int8_model, full_model):
    ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        ref = full_model.language_model(input_ids=ids).logits
        got = int8_model.language_model(input_ids=ids).logits
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"\n[quantize] int8 (torch dynamic): logits max relative error {rel:.4f}, greedy agreement {agree:.0%}")
    assert rel < MAX_REL_ERROR["8bit"]


def test_int8_model_generates(int8_model, video):
    from vidlmm.pipeline import GenerationSettings, VideoLMM

    answer = VideoLMM(int8_model, cache_bytes=0).ask(video, "What is moving?",
                                                     generation=GenerationSettings(max_new_tokens=5))
    assert 1 <= len(answer.token_ids) <= 5
    assert all(0 <= t < int8_model.language_model.config.vocab_size for t in answer.token_ids)


def test_int8_matches_torch_quantize_dynamic(full_model):
    """Our layer is what torch's own `quantize_dynamic` with per-channel weights makes of the same Linear."""
    import copy
    import warnings

    from torch.ao.quantization import quantize_dynamic
    from torch.ao.quantization.qconfig import per_channel_dynamic_qconfig

    from vidlmm.quantize import int8_linear

    linear = full_model.language_model.model.layers[0].mlp.up_proj
    ours = int8_linear(linear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = quantize_dynamic(nn.Sequential(copy.deepcopy(linear)), {nn.Linear: per_channel_dynamic_qconfig},
                                  dtype=torch.qint8)[0]
    x = torch.randn(3, linear.in_features)
    assert torch.equal(ours(x), theirs(x))


def test_int8_off_the_cpu_is_a_one_line_error(full_model):
    holder = nn.Module()
    holder.language_model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(CheckpointError, match="CPU only") as info:
        quantize_language_model(holder, "int8", "cuda")
    assert "\n" not in str(info.value)
