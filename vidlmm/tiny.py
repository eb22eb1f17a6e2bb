"""Tiny configs and a tiny-checkpoint writer: the published layout at toy size, built offline in seconds.

Tests use these to exercise the real loading code (no weights can be downloaded here). The shapes keep the
published structure (SigLIP tower, Qwen2 LLM, the reference's 8-head x 64 Perceiver) at a width of 64.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import save_model, save_split_layout
from .config import TinyLlavaConfig
from .model import TinyLlavaVideo


def tiny_text_config(vocab_size: int, *, llm: str = "qwen2", hidden_size: int = 64, layers: int = 2) -> dict:
    """A Qwen2 (or Phi / Gemma) config dict with the published model's conventions (eos = pad = last id)."""
    from transformers import AutoConfig

    eos = vocab_size - 1
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if llm == "qwen2":
        extra = dict(tie_word_embeddings=True, rope_theta=1e6)
    elif llm == "phi":
        extra = dict(tie_word_embeddings=False)
    elif llm == "gemma":
        extra = dict(tie_word_embeddings=True, head_dim=16)
    else:
        raise ValueError(f"No tiny config for LLM '{llm}'.")
    return AutoConfig.for_model(llm, **common, **extra).to_dict()


def tiny_vision_config(tower: str = "siglip", *, image_size: int = 56, patch_size: int = 14,
                       hidden_size: int = 32) -> dict:
    from transformers import AutoConfig

    model_type = {"siglip": "siglip_vision_model", "clip": "clip_vision_model", "dinov2": "dinov2"}[tower]
    cfg = AutoConfig.for_model(model_type, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                               num_hidden_layers=3, num_attention_heads=2, image_size=image_size,
                               patch_size=patch_size).to_dict()
    return cfg


def tiny_config(connector_type: str = "groupresampler", *, vocab_size: int, num_queries: int = 64,
                group: int | None = 4, tower: str = "siglip", llm: str = "qwen2", image_size: int = 56,
                select_strategy: str = "patch", video_sampling: dict | None = None,
                connector_options: dict | None = None) -> TinyLlavaConfig:
    """A complete TinyLLaVA config at toy size. Hub names are the published ones: nothing resolves them.

    connector_options: extra config.json keys for the connector (e.g. {"prefusion_layers": 2} for llava_mini,
    {"token_budget": 32} for pool / tome / topk; see `vidlmm.compressors`)."""
    text = tiny_text_config(vocab_size, llm=llm)
    vision = tiny_vision_config(tower, image_size=image_size)
    return TinyLlavaConfig.compose(
        text, vision, connector_type=connector_type, group=group, num_queries=num_queries,
        vision_feature_select_strategy=select_strategy,
        llm_model_name_or_path="Qwen/Qwen2.5-3B", tokenizer_name_or_path="Qwen/Qwen2.5-3B",
        vision_model_name_or_path="google/siglip-so400m-patch14-384", pad_token="<|endoftext|>",
        video_sampling=video_sampling,
        extra={"resampler_hidden_size": 768, "cache_dir": None, "use_cache": True, "tokenizer_use_fast": False,
               **(connector_options or {})},
    )


def init_weights(model: TinyLlavaVideo, seed: int, initializer_range: float = 0.02) -> None:
    """Random init as the reference's `_init_weights`: every Linear N(0, 0.02) with zero bias, latents N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("latents"):
                param.copy_(torch.randn(param.shape, generator=gen))
            elif param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * initializer_range)
            elif name.endswith("bias"):
                param.zero_()
            else:  # norms
                param.fill_(1.0)
        model.language_model.tie_weights()


def build_tiny_model(connector_type: str = "groupresampler", *, seed: int = 0, tokenizer=None,
                     initializer_range: float = 0.02, **config_kwargs) -> TinyLlavaVideo:
    """A random tiny model with a real (tiny, offline-trained) tokenizer attached."""
    if tokenizer is None:
        from .tokenizer import build_bpe_tokenizer

        tokenizer = build_bpe_tokenizer(None, vocab_size=400)
    config = tiny_config(connector_type, vocab_size=len(tokenizer), **config_kwargs)
    model = TinyLlavaVideo(config)
    init_weights(model, seed, initializer_range)
    model.tokenizer = tokenizer
    return model.eval()


def write_tiny_checkpoint(folder: str | os.PathLike, connector_type: str = "groupresampler", *, seed: int = 0,
                          layout: str = "published", dtype: torch.dtype = torch.float32,
                          max_shard_bytes: int | None = None, tokenizer_layout: str = "hub",
                          initializer_range: float = 0.02, **config_kwargs) -> Path:
    """Write a tiny checkpoint (a larger `initializer_range` gives less uniform, more varied greedy output).

    layout: "published" (safetensors; sharded when `max_shard_bytes` is small)
    or "split" (the reference's stage-1 sub-folders). The tokenizer is written in the hub's file layout."""
    from .tokenizer import build_bpe_tokenizer

    folder = Path(folder)
    tokenizer = build_bpe_tokenizer(None, vocab_size=400, out_dir=folder, layout=tokenizer_layout)
    model = build_tiny_model(connector_type, seed=seed, tokenizer=tokenizer, initializer_range=initializer_range,
                             **config_kwargs)
    model.tokenizer = None  # the tokenizer files are already in the folder, in the hub layout
    if layout == "split":
        return save_split_layout(model, folder)
    return save_model(model, folder, dtype=dtype, max_shard_bytes=max_shard_bytes or 2 * 1024**3)


def write_tiny_parts(folder: str | os.PathLike, *, seed: int = 0, llm: str = "qwen2",
                     tower: str = "siglip") -> tuple[Path, Path]:
    """Pretrained-style backbone folders (what stage 1 starts from): an LLM with its tokenizer, and a tower.
    Returns (llm_dir, vision_dir), both loadable with transformers' from_pretrained."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from .tokenizer import build_bpe_tokenizer
    from .vision import TOWERS

    folder = Path(folder)
    torch.manual_seed(seed)
    llm_dir, vision_dir = folder / "llm", folder / "vision"
    tokenizer = build_bpe_tokenizer(None, vocab_size=400, out_dir=llm_dir)
    text = tiny_text_config(len(tokenizer), llm=llm)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**text)).save_pretrained(llm_dir)
    vision = tiny_vision_config(tower)
    model_class = getattr(transformers, TOWERS[tower].model_class)
    model_class(AutoConfig.for_model(**vision)).save_pretrained(vision_dir)
    return llm_dir, vision_dir
