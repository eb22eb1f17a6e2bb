"""A separate, deliberately plain implementation of the reference's math, for parity tests.

Written from the spec (shared/spec/reference-tinyllava-video.md §1, §2, §4, §5) with functional ops on raw
state-dict tensors, in the reference's shapes ([b, 1, n, D] media, a Python loop over groups, a float16 PE
buffer), so it shares no code with vidlmm's modules.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions. ")


def ref_position_encoding(seq_len: int, d_model: int, dtype) -> torch.Tensor:
    pe = torch.zeros(seq_len, d_model, dtype=torch.float16)  # the reference's buffer is fp16
    position = torch.arange(0, seq_len, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.unsqueeze(0).to(dtype)


def _ln(x, sd, name):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)


def ref_perceiver_attention(sd, prefix, x, latents, heads=8, dim_head=64):
    """x: [b, 1, n1, D], latents: [b, 1, n2, D] -> [b, 1, n2, D]."""
    x = _ln(x, sd, prefix + "norm_media")
    latents = _ln(latents, sd, prefix + "norm_latents")
    q = latents @ sd[prefix + "to_q.weight"].T
    kv_input = torch.cat((x, latents), dim=-2)
    k, v = (kv_input @ sd[prefix + "to_kv.weight"].T).chunk(2, dim=-1)

    def split_heads(t):  # b t n (h d) -> b h t n d
        b, tt, n, _ = t.shape
        return t.reshape(b, tt, n, heads, dim_head).permute(0, 3, 1, 2, 4)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    q = q * dim_head**-0.5
    sim = torch.einsum("... i d, ... j d -> ... i j", q, k)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    attn = sim.softmax(dim=-1)
    out = torch.einsum("... i j, ... j d -> ... i d", attn, v)
    b, h, tt, n, d = out.shape
    out = out.permute(0, 2, 3, 1, 4).reshape(b, tt, n, h * d)  # b h t n d -> b t n (h d)
    return out @ sd[prefix + "to_out.weight"].T


def ref_feed_forward(sd, prefix, x):
    x = _ln(x, sd, prefix + "0")
    x = x @ sd[prefix + "1.weight"].T
    x = F.gelu(x)
    return x @ sd[prefix + "3.weight"].T


def _layers(sd):
    return sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})


def ref_resample(sd, x, latents):
    """x [b, 1, n, D] media (already projected), latents [b, 1, L, D] -> normed latents [b, L, D]."""
    for i in _layers(sd):
        latents = ref_perceiver_attention(sd, f"layers.{i}.0.", x, latents) + latents
        latents = ref_feed_forward(sd, f"layers.{i}.1.", latents) + latents
    return _ln(latents, sd, "norm").squeeze(1)


def ref_naive(sd, x):
    """The naive resampler: x [b, N, Dv] -> [b, L, D]; PE on the input tokens."""
    x = x @ sd["linear.weight"].T + sd["linear.bias"]
    x = x + ref_position_encoding(x.shape[1], x.shape[-1], x.dtype)
    b = x.shape[0]
    latents = sd["latents"].unsqueeze(0).unsqueeze(0).repeat(b, 1, 1, 1)
    return ref_resample(sd, x.unsqueeze(1), latents)


def ref_group(sd, x, group):
    """The group resampler: per-chunk loop, shared latents, PE on the outputs."""
    x = x @ sd["linear.weight"].T + sd["linear.bias"]
    n = x.shape[1]
    avg, rem = n // group, n % group
    sizes = [avg + 1] * rem + [avg] * (group - rem)
    outs = []
    for chunk in torch.split(x, sizes, dim=1):
        latents = sd["latents"].unsqueeze(0).unsqueeze(0).repeat(x.shape[0], 1, 1, 1)
        outs.append(ref_resample(sd, chunk.unsqueeze(1), latents))
    out = torch.cat(outs, dim=1)
    return out + ref_position_encoding(out.shape[1], out.shape[-1], out.dtype)


def ref_image_level(sd, x, tokens_per_frame):
    """The Factory's per-image resampler applied to each frame, no PE."""
    x = x @ sd["linear.weight"].T + sd["linear.bias"]
    outs = []
    for frame in torch.split(x, tokens_per_frame, dim=1):
        latents = sd["latents"].unsqueeze(0).unsqueeze(0).repeat(x.shape[0], 1, 1, 1)
        outs.append(ref_resample(sd, frame.unsqueeze(1), latents))
    return torch.cat(outs, dim=1)


def connector_state(model) -> dict:
    return {k: v.float() for k, v in model.connector.state_dict().items()}


def ref_frames(path, num_frames):
    """The reference's loading: decode EVERY frame to float32, then subsample with linspace."""
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0))
    everything = vr.get_batch(list(range(len(vr)))).asnumpy().astype(np.float32)
    idx = np.linspace(0, len(vr) - 1, num_frames, dtype=int)
    return everything[idx], idx


def ref_pixels(frames_float, image_size):
    """transformers' own SigLIP image processor (PIL path) with the hub's preprocessor settings."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    proc = SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, resample=3, do_rescale=True,
                                   rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3)
    images = [f.astype(np.uint8) for f in frames_float]
    return torch.as_tensor(np.asarray(proc(images, return_tensors="np")["pixel_values"]))


def ref_prompt_ids(question, tokenizer):
    prompt = SYSTEM + "USER: " + "<image>\n" + question.strip() + " ASSISTANT:"
    chunks = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in prompt.split("<image>")]
    return chunks[0] + [-200] + chunks[1]


def ref_answer_ids(model, video_path, question, num_frames, max_new_tokens):
    """The whole reference inference path on the modules of a vidlmm model; returns generated ids (new tokens
    only) and the visual tokens."""
    parts = RefModel(config={"connector_type": model.config.connector_type, "group": model.config.group,
                             "text_config": model.config.text_config},
                     tower=model.vision_tower._vision_tower, connector=connector_state(model),
                     llm=model.language_model, tokenizer=model.tokenizer)
    return ref_generate(parts, video_path, question, num_frames, max_new_tokens)


@dataclass
class RefModel:
    """What the reference's inference needs: config.json as a dict, a transformers vision model, the connector's
    state dict (keys below `_connector.`, fp32), a transformers causal LM and its tokenizer."""

    config: dict
    tower: object
    connector: dict
    llm: object
    tokenizer: object


def ref_generate(ref: RefModel, video_path, question, num_frames, max_new_tokens):
    """The reference's inference (spec §2, §4, §5): every frame decoded then subsampled, SigLIP hidden layer -2
    without token 0, the connector math above, the prompt split at <image>, greedy generation from the spliced
    embeddings. Returns (generated ids, new tokens only; visual tokens [1, Q, D])."""
    cfg = ref.config
    frames, _ = ref_frames(video_path, num_frames)
    pixels = ref_pixels(frames, ref.tower.config.image_size)
    with torch.no_grad():
        hidden = ref.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        feats = hidden[cfg.get("vision_feature_layer", -2)]
        if cfg.get("vision_feature_select_strategy", "patch") == "patch":
            feats = feats[:, 1:]
        x = feats.reshape(1, -1, feats.shape[-1])
        if cfg["connector_type"] == "groupresampler":
            visual = ref_group(ref.connector, x, cfg["group"])
        else:
            visual = ref_naive(ref.connector, x)
        ids = ref_prompt_ids(question, ref.tokenizer)
        cut = ids.index(-200)
        embed = ref.llm.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor(ids[:cut])), visual[0], embed(torch.tensor(ids[cut + 1:]))])
        eos = cfg["text_config"]["eos_token_id"]
        out = ref.llm.generate(inputs_embeds=embeds.unsqueeze(0), max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=eos, pad_token_id=eos, use_cache=True,
                               temperature=None, top_p=None, top_k=None)
    return out[0].tolist(), visual


def ref_fps_num_frames(video_path, max_frames):
    """The reference's "1 fps" frame count (spec §5): n = min(max_frame, max(1, int(len(vr) / avg fps)))."""
    import decord

    vr = decord.VideoReader(video_path, ctx=decord.cpu(0))
    return min(max_frames, max(1, int(len(vr) / vr.get_avg_fps())))


# ---- a loader of its own, for published files that vidlmm did not write --------------------------------------
LLM_PREFIX = "language_model."
TOWER_PREFIX = "vision_tower._vision_tower.vision_model."
CONNECTOR_PREFIX = "connector._connector."


def ref_read_weights(folder) -> dict:
    """Every tensor of a published checkpoint folder: model.safetensors, or the shards its index names."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    state = {}
    for name in names:
        state.update(load_file(str(folder / name)))
    return state


def _sub_config(config_class, data: dict):
    data = {k: v for k, v in data.items() if k not in ("model_type", "architectures", "transformers_version",
                                                        "model_name_or_path", "_name_or_path")}
    return config_class(**data)


def ref_load_published(folder) -> RefModel:
    """The reference's loading, minimally: config.json read as a dict; transformers' own Qwen2ForCausalLM and
    SiglipVisionModel built from its `text_config` / `vision_config` in fp32; each prefix's tensors loaded
    strictly (only the tied lm_head may be absent, and is then tied to embed_tokens); the connector kept as a
    plain state dict for the functional math above; the tokenizer read from the folder's vocab.json/merges.txt."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer, SiglipVisionConfig, SiglipVisionModel

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    state = {k: v.float() for k, v in ref_read_weights(folder).items()}
    unknown = [k for k in state if not k.startswith((LLM_PREFIX, TOWER_PREFIX, CONNECTOR_PREFIX))]
    assert not unknown, f"keys outside the published prefixes: {unknown[:4]}"

    llm = Qwen2ForCausalLM(_sub_config(Qwen2Config, config["text_config"])).float().eval()
    llm_state = {k[len(LLM_PREFIX):]: v for k, v in state.items() if k.startswith(LLM_PREFIX)}
    missing, unexpected = llm.load_state_dict(llm_state, strict=False)
    tied = config["text_config"].get("tie_word_embeddings", False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), (missing, unexpected)
    if tied:
        llm.lm_head.weight = llm.model.embed_tokens.weight

    tower = SiglipVisionModel(_sub_config(SiglipVisionConfig, config["vision_config"])).float().eval()
    # transformers 5's SiglipVisionModel is the published `vision_model.` level itself (spec §11)
    tower_state = {k[len(TOWER_PREFIX):]: v for k, v in state.items() if k.startswith(TOWER_PREFIX)}
    missing, unexpected = tower.load_state_dict(tower_state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)

    connector = {k[len(CONNECTOR_PREFIX):]: v for k, v in state.items() if k.startswith(CONNECTOR_PREFIX)}
    tokenizer = Qwen2Tokenizer.from_pretrained(str(folder))
    return RefModel(config=config, tower=tower, connector=connector, llm=llm, tokenizer=tokenizer)


# ---- the related work's compressors (vidlmm/compressors.py), from their descriptions -------------------------------
# Each takes a compressor's raw state dict (module.state_dict()) and one video's frames x [T, P, Dv], and computes
# in float64 with explicit formulas (no nn modules, no vidlmm code).

def _ref_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _ref_projector(sd, x):
    """LLaVA's mlp2x_gelu: W2 gelu(W1 x + b1) + b2."""
    hidden = _ref_gelu(x @ sd["projector.0.weight"].T + sd["projector.0.bias"])
    return hidden @ sd["projector.2.weight"].T + sd["projector.2.bias"]


def _double(sd):
    return {k: v.detach().double() for k, v in sd.items()}


def ref_topk(sd, x, k):
    """Top-k pruning at inference: each token's score is Linear(GELU(Linear(LayerNorm(x)))); each frame keeps
    its k highest-scoring tokens, listed in their original (raster) order, and the kept features go through
    the projector. Returns (tokens [T*k, D], kept indices [T][k] as Python lists)."""
    sd, x = _double(sd), x.double()
    normed = _ref_layer_norm(x, sd["scorer.0.weight"], sd["scorer.0.bias"])
    hidden = _ref_gelu(normed @ sd["scorer.1.weight"].T + sd["scorer.1.bias"])
    scores = (hidden @ sd["scorer.3.weight"].T + sd["scorer.3.bias"])[..., 0]  # [T, P]
    kept, rows = [], []
    for t in range(x.shape[0]):
        best = sorted(range(x.shape[1]), key=lambda i: -float(scores[t, i]))[:k]
        chosen = sorted(best)
        kept.append(chosen)
        rows.append(x[t, chosen])
    return _ref_projector(sd, torch.cat(rows)), kept


def _ref_sincos_2d(rows, cols, dim):
    """MAE's 2D sin-cos position encoding: channels [sin(r w), cos(r w), sin(c w), cos(c w)], w_i =
    10000^(-i / (dim/4)) for i < dim/4; any channels left over (dim not a multiple of 4) are 0."""
    quarter = dim // 4
    out = torch.zeros(len(rows), dim, dtype=torch.float64)
    for n, (r, c) in enumerate(zip(rows, cols)):
        for i in range(quarter):
            w = 10000.0 ** (-i / quarter)
            out[n, i], out[n, quarter + i] = math.sin(r * w), math.cos(r * w)
            out[n, 2 * quarter + i], out[n, 3 * quarter + i] = math.sin(c * w), math.cos(c * w)
    return out


def ref_llava_mini(sd, x, num_queries, heads):
    """LLaVA-Mini's compression without pre-fusion (vidlmm.compressors.LlavaMiniCompressor's docstring): per frame,
    C x C learnable queries attend once (multi-head attention, in-projections with biases, an out-projection)
    with queries LN_q(query) + PE(query cell centre), keys LN_kv(x) + PE(patch cell), values LN_kv(x); then the
    projector. The patch grid behind P tokens: P = s*s - 1 is SigLIP without its first cell (token i sits in
    cell i + 1); P = s*s + e has e leading tokens that are no patch (PE 0). Cell (row, col) = divmod(cell, s).
    Query j of a C x C grid covers a block of s / C patches; its centre, in patch units, is
    ((j // C + 0.5) s / C - 0.5, (j % C + 0.5) s / C - 0.5).
    Returns (tokens [T*C*C, D], head-mean attention [T, C*C, P])."""
    sd, x = _double(sd), x.double()
    t_count, p, dim = x.shape
    side = math.isqrt(p + 1)
    if side * side == p + 1:
        cells = [i + 1 for i in range(p)]
    else:
        side = math.isqrt(p)
        extra = p - side * side
        cells = [i - extra for i in range(p)]
    pe_k = _ref_sincos_2d([max(c, 0) // side for c in cells], [max(c, 0) % side for c in cells], dim)
    pe_k[[i for i, c in enumerate(cells) if c < 0]] = 0.0
    qs = math.isqrt(num_queries)
    centre = [(j + 0.5) * side / qs - 0.5 for j in range(qs)]
    pe_q = _ref_sincos_2d([centre[j // qs] for j in range(num_queries)],
                          [centre[j % qs] for j in range(num_queries)], dim)
    w_q, w_k, w_v = sd["attn.in_proj_weight"].chunk(3)
    b_q, b_k, b_v = sd["attn.in_proj_bias"].chunk(3)
    queries = _ref_layer_norm(sd["query"], sd["ln_q.weight"], sd["ln_q.bias"]) + pe_q
    head_dim = dim // heads
    tokens, maps = [], []
    for t in range(t_count):
        values = _ref_layer_norm(x[t], sd["ln_kv.weight"], sd["ln_kv.bias"])
        q, k, v = queries @ w_q.T + b_q, (values + pe_k) @ w_k.T + b_k, values @ w_v.T + b_v
        outs, attn_sum = [], 0.0
        for h in range(heads):
            cut = slice(h * head_dim, (h + 1) * head_dim)
            attn = torch.softmax(q[:, cut] @ k[:, cut].T / math.sqrt(head_dim), dim=-1)
            outs.append(attn @ v[:, cut])
            attn_sum = attn_sum + attn
        out = torch.cat(outs, dim=-1) @ sd["attn.out_proj.weight"].T + sd["attn.out_proj.bias"]
        tokens.append(_ref_projector(sd, out))
        maps.append(attn_sum / heads)
    return torch.cat(tokens), torch.stack(maps)
