"""The TinyLLaVA checkpoint config (`config.json` with `model_type: "tinyllava"`), read without the reference code.

Unknown keys are kept and written back unchanged, so a published config round-trips. Nothing here touches
the network: the LLM and tower configs come from the saved `text_config` / `vision_config` dicts, never from
`llm_model_name_or_path` or `vision_model_name_or_path`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from dataclasses import fields as dataclass_fields  # `compose` takes **fields
from pathlib import Path

# What the reference's config class fills in when a key is absent.
DEFAULTS = {
    "connector_type": "groupresampler",
    "num_queries": 512,
    "group": None,
    "num_resampler_layers": 3,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "patch",
    "image_aspect_ratio": "square",
    "image_token_index": -200,
    "ignore_index": -100,
    "tokenizer_model_max_length": 3072,
    "tokenizer_padding_side": "right",
    "tokenizer_use_fast": False,
}


@dataclass
class TinyLlavaConfig:
    """Fields the model needs; everything else in config.json lives in `extra` and is saved back as it was.

    hidden_size: LLM width D. vision_hidden_size: tower width Dv. num_queries: visual tokens (per frame for
    the image-level `resampler`). group: groups of the group resampler. video_sampling: our addition, the
    frame sampling the checkpoint was trained with (e.g. {"mode": "uniform", "num_frames": 16}). Hyper-parameters
    of the per-frame compressors (`token_budget`, `prefusion_layers`, ...; see `vidlmm.compressors`) stay in
    `extra` and reach the connector through its `config_keys`.
    """

    text_config: dict
    vision_config: dict
    hidden_size: int
    vision_hidden_size: int
    connector_type: str = DEFAULTS["connector_type"]
    num_queries: int = DEFAULTS["num_queries"]
    group: int | None = DEFAULTS["group"]
    num_resampler_layers: int = DEFAULTS["num_resampler_layers"]
    vision_feature_layer: int = DEFAULTS["vision_feature_layer"]
    vision_feature_select_strategy: str = DEFAULTS["vision_feature_select_strategy"]
    image_aspect_ratio: str = DEFAULTS["image_aspect_ratio"]
    image_token_index: int = DEFAULTS["image_token_index"]
    ignore_index: int = DEFAULTS["ignore_index"]
    llm_model_name_or_path: str = ""
    vision_model_name_or_path: str = ""
    tokenizer_name_or_path: str = ""
    tokenizer_model_max_length: int = DEFAULTS["tokenizer_model_max_length"]
    tokenizer_padding_side: str = DEFAULTS["tokenizer_padding_side"]
    tokenizer_use_fast: bool = DEFAULTS["tokenizer_use_fast"]
    pad_token: str | None = None
    pad_token_id: int | None = None
    conv_version: str = "qwen2_base"
    video_sampling: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "TinyLlavaConfig":
        data = dict(data)
        if data.get("model_type", "tinyllava") != "tinyllava":
            raise ValueError(f"config.json has model_type '{data.get('model_type')}', expected 'tinyllava'.")
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = [k for k in ("text_config", "vision_config", "hidden_size") if k not in data]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}.")
        if "vision_hidden_size" not in data:
            data["vision_hidden_size"] = data["vision_config"]["hidden_size"]
        known = {k: data.pop(k) for k in list(data) if k in names}
        return cls(**known, extra=data)

    @classmethod
    def compose(cls, text_config: dict, vision_config: dict, *, connector_type: str = "groupresampler",
                group: int | None = None, **fields) -> "TinyLlavaConfig":
        """A config for a new model from its LLM and tower config dicts: widths are read from them, pad defaults
        to eos, and `group` is kept only for the group resampler."""
        fields.setdefault("pad_token_id", text_config.get("pad_token_id", text_config.get("eos_token_id")))
        known = {f.name for f in dataclass_fields(cls)}
        extra = {**fields.pop("extra", {}),  # connector keys (token_budget, ...) are kept in `extra`
                 **{k: fields.pop(k) for k in list(fields) if k not in known}}
        return cls(text_config=dict(text_config), vision_config=dict(vision_config),
                   hidden_size=text_config["hidden_size"], vision_hidden_size=vision_config["hidden_size"],
                   connector_type=connector_type, group=group if connector_type == "groupresampler" else None,
                   extra=extra, **fields)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "TinyLlavaConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        out = {"architectures": ["TinyLlavaForConditionalGeneration"], "model_type": "tinyllava"}
        out.update(self.extra)
        for f in fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        if out.get("video_sampling") is None:
            out.pop("video_sampling")
        return out

    def save(self, folder: str | Path) -> None:
        with open(Path(folder) / "config.json", "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @property
    def llm_type(self) -> str:
        """transformers model_type of the LLM (from text_config, else from the LLM's name like the reference)."""
        model_type = self.text_config.get("model_type")
        if model_type:
            return model_type
        name = self.llm_model_name_or_path.lower()
        for key in ("qwen2", "phi", "gemma"):
            if key in name:
                return key
        raise ValueError("Cannot tell the language model type: text_config has no model_type.")

    @property
    def eos_token_id(self) -> int | None:
        eos = self.text_config.get("eos_token_id")
        return eos[0] if isinstance(eos, list) else eos
