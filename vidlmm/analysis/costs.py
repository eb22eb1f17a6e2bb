"""What the language model pays for the visual tokens: tokens, sequence length, prefill FLOPs and KV cache vs
frames per model or config (`token_budget`), without loading or allocating any weights."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import VidlmmError
from .jsonable import to_jsonable


@dataclass
class BudgetResult:
    """rows: one per (name, frames) with connector, setting, visual_tokens, text_tokens, sequence_length,
    fits_context, prefill_gflops (LLM forward over the prompt: 2 x non-embedding parameters x tokens + causal
    attention 2 x layers x tokens^2 x width, an estimate) and kv_cache_mib (bf16)."""

    rows: list[dict]

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(r["name"] for r in self.rows))

    def series(self, name: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(frames, values of `key`) for one name."""
        rows = [r for r in self.rows if r["name"] == name]
        return np.array([r["frames"] for r in rows]), np.array([r[key] for r in rows], dtype=np.float64)

    def to_json(self) -> dict:
        return to_jsonable({"rows": self.rows})


def model_config(value):
    """A TinyLlavaConfig from a config, a config dict, a model, a VideoLMM or a checkpoint folder / hub id."""
    from ..config import TinyLlavaConfig

    if isinstance(value, TinyLlavaConfig):
        return value
    if hasattr(value, "model") and hasattr(value.model, "config"):  # a VideoLMM
        return value.model.config
    if hasattr(value, "config") and isinstance(value.config, TinyLlavaConfig):
        return value.config
    if isinstance(value, dict):
        return TinyLlavaConfig.from_dict(value)
    if isinstance(value, (str, os.PathLike)):
        from ..checkpoint import resolve_checkpoint

        return TinyLlavaConfig.from_json_file(resolve_checkpoint(value) / "config.json")
    raise VidlmmError(f"Cannot read a model configuration from {type(value).__name__}.")


def _llm_costs(text_config: dict) -> tuple[int, int, int, int]:
    """(non-embedding parameters, layers, width, kv width) of the LLM from its config."""
    h = int(text_config["hidden_size"])
    layers = int(text_config["num_hidden_layers"])
    heads = int(text_config["num_attention_heads"])
    kv_heads = int(text_config.get("num_key_value_heads") or heads)
    head_dim = int(text_config.get("head_dim") or h // heads)
    inter = int(text_config.get("intermediate_size") or 4 * h)
    per_layer = h * heads * head_dim * 2 + 2 * h * kv_heads * head_dim + 3 * h * inter
    return per_layer * layers, layers, heads * head_dim, kv_heads * head_dim


def connector_setting(config) -> str:
    """A short description of a config's connector setting, e.g. 'groupresampler, 512 queries, 16 groups'."""
    from ..connectors import connector_class

    return connector_class(config.connector_type).describe_config(config)


def connector_variants(config, related: bool = False) -> dict:
    """The same backbone with each connector family at the config's query budget (for Figure 3 style plots):
    naive Q queries, group Q queries in G groups (16 when unset), image-level Q/16 per frame, MLP.

    related=True adds the per-frame compressors of the related work at the same budget: "llava-mini" with the
    largest square <= Q/16 queries per frame, and "pool", "tome", "topk" with a budget of Q tokens per video
    (tokens per frame = min(Q // frames, P), pool floored to a square)."""
    q, g = int(config.num_queries), int(config.group or 16)
    variants = {"naive": config.replace(connector_type="naiveresampler", group=None),
                "group": config.replace(connector_type="groupresampler", group=g),
                "image-level": config.replace(connector_type="resampler", num_queries=max(1, q // 16), group=None),
                "mlp": config.replace(connector_type="mlp2x_gelu", group=None)}
    if related:
        variants["llava-mini"] = config.replace(connector_type="llava_mini", group=None,
                                                num_queries=math.isqrt(max(1, q // 16)) ** 2)
        for name in ("pool", "tome", "topk"):  # the budget in tokens per video, no other budget key kept
            variants[name] = config.replace(connector_type=name, group=None, token_budget=q, frame_tokens=None,
                                            max_frame_tokens=None)
    return variants


def token_budget(models: dict, frames=(1, 2, 4, 8, 16, 32, 64), text_tokens: int = 64) -> BudgetResult:
    """Visual tokens reaching the LLM and its prefill cost vs frames, per named model or config.

    models: {name: TinyLlavaConfig | config dict | model | VideoLMM | checkpoint folder}. Nothing is loaded or
    allocated: the tower and connector are built on the meta device only to ask them their token counts.
    """
    import torch

    from ..connectors import connector_kwargs_from_config, create_connector
    from ..vision import VisionTower, tower_type_for

    if not models:
        raise VidlmmError("Give at least one model for the token budget.")
    if any(int(f) < 1 for f in frames):
        raise VidlmmError("Frame counts must be at least 1.")
    rows = []
    for name, value in models.items():
        config = model_config(value)
        try:
            with torch.device("meta"):
                tower = VisionTower(config.vision_config,
                                    tower_type=tower_type_for(config.vision_config, config.vision_model_name_or_path),
                                    select_strategy=config.vision_feature_select_strategy)
                connector = create_connector(config.connector_type, **connector_kwargs_from_config(config))
        except ValueError as err:
            raise VidlmmError(f"Cannot read the connector of '{name}': {err}") from None
        params, layers, width, kv_width = _llm_costs(config.text_config)
        vocab = int(config.text_config.get("vocab_size", 0))
        for t in frames:
            visual = int(connector.num_output_tokens(int(t), tower.tokens_per_frame))
            length = visual + int(text_tokens)
            flops = 2 * params * length + 2 * layers * length**2 * width + 2 * width * vocab
            rows.append({"name": str(name), "connector": connector.registry_name, "setting": connector_setting(config),
                         "frames": int(t), "tokens_per_frame": int(tower.tokens_per_frame), "visual_tokens": visual,
                         "text_tokens": int(text_tokens), "sequence_length": length,
                         "context": int(config.tokenizer_model_max_length),
                         "fits_context": length <= int(config.tokenizer_model_max_length),
                         "prefill_gflops": flops / 1e9, "kv_cache_mib": 2 * layers * length * kv_width * 2 / 2**20})
    return BudgetResult(rows)


__all__ = ["BudgetResult", "connector_setting", "connector_variants", "model_config", "token_budget"]
