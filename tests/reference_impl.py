"""A separate, deliberately plain implementation of the reference's math, for parity tests.

Written from the spec (shared/spec/reference-tinyllava-video.md §1, §2, §4, §5) with functional ops on raw
state-dict tensors, in the reference's shapes ([b, 1, n, D] media, a Python loop over groups, a float16 PE
buffer), so it shares no code with vidlmm's modules.
"""

from __future__ import annotations

import math

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
    return {k: v.float() for k, v in model.connector._connector.state_dict().items()}


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
    """The whole reference inference path; returns generated ids (new tokens only)."""
    frames, _ = ref_frames(video_path, num_frames)
    pixels = ref_pixels(frames, model.vision_tower.config.image_size)
    with torch.no_grad():
        hidden = model.vision_tower._vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        feats = hidden[-2][:, 1:]
        x = feats.reshape(1, -1, feats.shape[-1])
        sd = connector_state(model)
        cfg = model.config
        if cfg.connector_type == "groupresampler":
            visual = ref_group(sd, x, cfg.group)
        else:
            visual = ref_naive(sd, x)
        ids = ref_prompt_ids(question, model.tokenizer)
        cut = ids.index(-200)
        embed = model.language_model.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor(ids[:cut])), visual[0], embed(torch.tensor(ids[cut + 1:]))])
        eos = cfg.text_config["eos_token_id"]
        out = model.language_model.generate(inputs_embeds=embeds.unsqueeze(0), max_new_tokens=max_new_tokens,
                                            do_sample=False, eos_token_id=eos, pad_token_id=eos, use_cache=True,
                                            temperature=None, top_p=None, top_k=None)
    return out[0].tolist(), visual
